#!/usr/bin/env bash
# A capacity search (issue #15 item 6): a `relay serve` pinned to CPU 0 and
# `client-sim` pinned to CPU 1, the simulator adding 250 clients a step
# until p99 frame latency passes the scenario's limit or a delivery fails.
# Prints the simulator's table, then each step's relay and simulator CPU per
# delivered frame (the simulator must cost less than the relay for the
# search to measure the relay).
#
#   scripts/capacity.sh BIN_DIR [client-sim args...]
#   scripts/capacity.sh target/release --scenario capacity --media udp --settle 10s --clients 5000
#   scripts/capacity.sh target/release --scenario capacity-notes --media udp --settle 10s --clients 5000
#
# BIN_DIR holds `relay` and `client-sim` (cargo build --release -p ptt-relay
# -p client-sim). RELAY_ARGS adds arguments to `relay serve` (split on
# spaces), e.g. RELAY_ARGS="--worker-threads 2". Traffic stays on
# loopback; each step is bounded by the scenario's duration and settle
# time, the search by --clients.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/relay.sh"
read -r -a relay_args <<<"${RELAY_ARGS:-}"
bin=$1
shift
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
data=$work/data
log=$work/relay.log
# The simulator's clients all come from 127.0.0.1: the per-address attack
# limits are off, as in scripts/relay-ab.sh.
taskset -c 0 "$bin/relay" serve --data-dir "$data" --listen 127.0.0.1:0 \
    --max-connections-per-ip 0 --handshakes-per-ip-per-second 0 \
    ${relay_args[@]+"${relay_args[@]}"} 2>"$log" &
pid=$!
relay_address "$log" "$pid" || exit 1
taskset -c 1 "$bin/client-sim" --relay "$addr" --fingerprint "$fp" \
    --token-key "$data/token.key" --relay-pid "$pid" "$@" --report "$work/report.json" || true
kill -TERM "$pid"
wait "$pid" 2>/dev/null || true
python3 - "$work/report.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
for step, run in zip(r["steps"], r["runs"]):
    relay = run["relay"]
    sim = None
    if run.get("simulator_cpu_s") and relay.get("cpu_s") and relay.get("cpu_us_per_frame"):
        frames = relay["cpu_s"] * 1e6 / relay["cpu_us_per_frame"]
        sim = run["simulator_cpu_s"] * 1e6 / frames
    print(f"{step['clients']} clients: {'held' if step['held'] else 'NOT held'}, "
          f"{step['frames_per_s'] / 1000:.1f} k frames/s, p99 {step['frame_p99_ms']:.2f} ms, "
          f"{step['failures']} failed; relay {step['cpu_us_per_frame'] or 0:.1f} us/frame, "
          f"simulator {sim or 0:.1f} us/frame")
PY
