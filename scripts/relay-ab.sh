#!/usr/bin/env bash
# Runs one client-sim scenario against two relay builds back to back (A, then
# B, then A, then B … ROUNDS times), each relay pinned to CPU 0 and its
# simulator to CPU 1, and prints each run's relay CPU per delivered frame,
# frame latency and failures, so the two builds are compared in one sitting.
#
#   scripts/relay-ab.sh A_TARGET_DIR B_TARGET_DIR [ROUNDS] [client-sim args...]
#   scripts/relay-ab.sh /work/target-base/release target/release 2 --scenario load --clients 1000 --duration 30s
#
# Each *_TARGET_DIR holds a `relay` and a `client-sim` binary built from the
# revision to compare (`cargo build --release -p ptt-relay -p client-sim`).
#
# A_BIN / B_BIN name another server binary in that directory, run with the
# relay's `serve` arguments; the live path's floor is measured this way
# (issue #15), the relay against the minimal quinn fan-out, same workload:
#
#   cargo build --release -p ptt-relay -p client-sim -p ptt-benches --bin relay --bin client-sim --bin quinn-floor
#   A_BIN=quinn-floor scripts/relay-ab.sh target/release target/release 3 \
#       --scenario load --clients 1000 --duration 30s --talkers-per-group 1
#
# A_ARGS / B_ARGS add arguments to that server's `serve` (split on spaces),
# e.g. the relay's live latency budget: per-frame delivery against the
# floor, then a notes group's coalescing (issue #15):
#
#   A_BIN=quinn-floor B_ARGS="--live-budget-ms 0" scripts/relay-ab.sh T T 2 --scenario live
#   A_BIN=quinn-floor B_ARGS="--live-budget-ms 60" scripts/relay-ab.sh T T 2 --scenario live
#
# A_SIM_ARGS / B_SIM_ARGS add arguments to that side's client-sim, to
# compare two ways of driving one server, e.g. the simulator's event sink
# against its event channel:
#
#   A_SIM_ARGS="--event-channel" A_ARGS="--live-budget-ms 0" B_ARGS="--live-budget-ms 0" \
#       scripts/relay-ab.sh T T 2 --scenario live --media udp
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/relay.sh"
a_bin=${A_BIN:-relay} b_bin=${B_BIN:-relay}
read -r -a a_args <<<"${A_ARGS:-}"
read -r -a b_args <<<"${B_ARGS:-}"
# The simulator's thousands of clients all come from 127.0.0.1, where the
# relay's per-address attack limits (max_connections_per_ip 256, 20
# handshakes per address per second) would refuse most of them: a relay
# under test gets them off, as phones behind thousands of addresses would
# never meet them. (Their effect under attack is measured by the flood
# scenarios, issue #11.)
[ "$a_bin" = relay ] && a_args=(--max-connections-per-ip 0 --handshakes-per-ip-per-second 0 ${a_args[@]+"${a_args[@]}"})
[ "$b_bin" = relay ] && b_args=(--max-connections-per-ip 0 --handshakes-per-ip-per-second 0 ${b_args[@]+"${b_args[@]}"})
a=$1 b=$2 rounds=${3:-1}
shift 3 || true
args=("$@")
[ ${#args[@]} -eq 0 ] && args=(--scenario load --clients 1000 --duration 30s)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

run() {
    local label=$1 dir=$2 n=$3 bin=$4 sim_args=$5
    shift 5
    local -a extra
    read -r -a extra <<<"$sim_args"
    local data="$work/$label-$n"
    local log="$work/$label-$n.relay.log"
    taskset -c 0 "$dir/$bin" serve --data-dir "$data" --listen 127.0.0.1:0 "$@" 2>"$log" &
    local pid=$!
    local addr fp
    relay_address "$log" "$pid" || exit 1
    taskset -c 1 "$dir/client-sim" --relay "$addr" --fingerprint "$fp" \
        --token-key "$data/token.key" --relay-pid "$pid" "${args[@]}" ${extra[@]+"${extra[@]}"} \
        --report "$work/$label-$n.json" >"$work/$label-$n.out" 2>&1 || true
    kill -TERM "$pid"; wait "$pid" 2>/dev/null || true
    python3 - "$label" "$work/$label-$n.json" <<'PY'
import json, sys
label, path = sys.argv[1], sys.argv[2]
r = json.load(open(path))
lat, relay = r["latency_ms"], r["relay"]
failed = r["deliveries_missing"] + r["deliveries_corrupt"] + r["deliveries_duplicate"] + r["misdelivered"]
parts = []
if relay.get("cpu_us_per_frame") is not None:
    parts.append(f"{relay['cpu_us_per_frame']:.1f} us relay CPU per delivered frame")
if r.get("simulator_cpu_s") is not None and relay.get("cpu_s") and relay.get("cpu_us_per_frame"):
    # Same window and frame count as the relay's figure (issue #15 item 6:
    # the simulator must cost less per frame than the server it drives).
    frames = relay["cpu_s"] * 1e6 / relay["cpu_us_per_frame"]
    parts.append(f"simulator {r['simulator_cpu_s'] * 1e6 / frames:.1f} us per frame")
parts.append(f"{r['frames_per_s']/1000:.1f} k frames/s")
if "frame" in lat:
    parts.append(f"frame p50 {lat['frame']['p50']:.2f} ms p99 {lat['frame']['p99']:.2f} ms")
parts.append(f"failed {failed} of {r['deliveries_expected']}")
parts.append(f"relay RSS {relay['rss_mib']:.0f} MiB")
if relay.get("rss_kib_per_client") is not None:
    parts.append(f"{relay['rss_kib_per_client']:.1f} KiB per connected client")
print(f"{label}: " + ", ".join(parts))
PY
}

for n in $(seq 1 "$rounds"); do
    run "A-$a_bin" "$a" "$n" "$a_bin" "${A_SIM_ARGS:-}" ${a_args[@]+"${a_args[@]}"}
    run "B-$b_bin" "$b" "$n" "$b_bin" "${B_SIM_ARGS:-}" ${b_args[@]+"${b_args[@]}"}
done
