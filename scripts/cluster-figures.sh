#!/usr/bin/env bash
# One relay node against two (issue #10), same workload: starts one
# nats-server with JetStream (loopback, a temporary store), then
#   run 1: relay node A on it, client-sim --scenario cluster --relay A
#   run 2: relay nodes A and B on it, client-sim --scenario cluster --relay A,B
# (fresh relay processes for each run, the same NATS server), and prints a
# table: frame latency p50/p99, relay CPU per delivered frame per node
# (utime+stime from /proc/PID/stat over the talking and settling, as
# client-sim measures it with --relay-pid, ÷ the frames that node delivered
# to its clients), the clip store latency (the relay's
# ptt_store_commit_seconds histogram from /metrics: JetStream's publish
# acknowledgement and the index writes; p50/p99 are bucket bounds), the
# time from a clip's last frame to its talker's `Stored` (client-sim's
# stored_ack, all talkers) and failed deliveries (must be 0).
#
#   scripts/cluster-figures.sh [client-sim args...]
#   PROFILE=debug scripts/cluster-figures.sh --clients 100 --duration 10s
#   NATS_SYNC=always NATS_SERVER=~/.venv/bin/nats-server scripts/cluster-figures.sh
#
# PROFILE     release (default) or debug: which build of relay and client-sim
#             (built here, in $CARGO_TARGET_DIR or target/).
# NATS_SERVER the nats-server binary (default: the one on the PATH or
#             /usr/sbin; Debian's is 2.9).
# NATS_SYNC   a JetStream sync_interval for the server (`always`: fsync
#             before every acknowledgement; NATS 2.10 or later).
# RUNS        which runs: "1 2" (default), "1" or "2".
# KEEP        set: keep the relays' logs and client-sim's reports.
# PIN         1 (default on 2+ cores): relays on CPU 0, NATS and the
#             simulator on CPU 1, in both runs, so the relay work has the
#             same one core whether one node or two do it and the simulator
#             does not take from it; 0: no pinning.
#
# One NATS server, not the three of deploy/cluster/: what is compared is
# the relay nodes, and three NATS processes replicating every write would
# take the cores the relays are measured on (the durability of three
# servers is what relay/tests/cluster3.rs checks).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/relay.sh"
cd "$(dirname "$0")/.."
profile=${PROFILE:-release}
runs=${RUNS:-1 2}
args=("$@")
[ ${#args[@]} -eq 0 ] && args=(--scenario cluster)
printf '%s\n' "${args[@]}" | grep -qx -- '--scenario' || args=(--scenario cluster "${args[@]}")

case "$profile" in
    release) build=(--release) ;;
    debug) build=() ;;
    *) echo "PROFILE must be release or debug" >&2; exit 2 ;;
esac
nice -n 10 cargo build ${build[@]+"${build[@]}"} --locked -p ptt-relay --bin relay -p client-sim --bin client-sim >&2
bin="${CARGO_TARGET_DIR:-target}/$profile"

nats=${NATS_SERVER:-}
if [ -z "$nats" ]; then
    nats=$(command -v nats-server || true)
    [ -z "$nats" ] && [ -x /usr/sbin/nats-server ] && nats=/usr/sbin/nats-server
fi
[ -n "$nats" ] || { echo "no nats-server (./dev.sh setup installs it, or set NATS_SERVER)" >&2; exit 1; }

# `pin CPU command…` execs the command (pinned to CPU), so that `pin … &`
# gives the command's own pid in $! (measured and stopped by it); run it
# in the foreground only in a subshell.
pin() { exec "${@:2}"; }
if [ "${PIN:-1}" = 1 ] && [ "$(nproc)" -ge 2 ] && command -v taskset >/dev/null; then
    pin() { exec taskset -c "$1" "${@:2}"; }
fi
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

work=$(mktemp -d -t cluster-figures.XXXXXX)
pids=()
cleanup() {
    local p
    for p in ${pids[@]+"${pids[@]}"}; do kill -TERM "$p" 2>/dev/null || true; done
    for p in ${pids[@]+"${pids[@]}"}; do wait "$p" 2>/dev/null || true; done
    if [ -n "${KEEP:-}" ]; then echo "logs and reports kept in $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT

# The NATS server.
nats_port=$(free_port)
{
    echo "listen: 127.0.0.1:$nats_port"
    echo "max_payload: 8MB"
    echo "jetstream {"
    echo "    store_dir: \"$work/nats\""
    [ -n "${NATS_SYNC:-}" ] && echo "    sync_interval: ${NATS_SYNC}"
    echo "}"
} >"$work/nats.conf"
pin 1 "$nats" -c "$work/nats.conf" >"$work/nats.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$nats_port") 2>/dev/null && break
    sleep 0.1
done
nats_version=$("$nats" --version 2>&1 | head -1)
echo "NATS: $nats_version on 127.0.0.1:$nats_port, sync_interval ${NATS_SYNC:-default}; $profile build; pinning ${PIN:-1}" >&2

# Starts relay node $1 (its data directory $work/$1, a token key copied
# from $2 if given) and sets addr, fp, pid, metrics.
start_node() {
    local name=$1 keys_from=${2:-}
    local data="$work/$name" log="$work/$name.log"
    mkdir -p "$data"
    : >"$log"
    [ -n "$keys_from" ] && cp "$work/$keys_from/token.key" "$data/token.key"
    metrics=127.0.0.1:$(free_port)
    pin 0 "$bin/relay" serve --data-dir "$data" --listen 127.0.0.1:0 \
        --nats "nats://127.0.0.1:$nats_port" --metrics "$metrics" \
        --max-connections-per-ip 0 --handshakes-per-ip-per-second 0 \
        --user-clips-per-minute 0 --user-frames-per-second 0 2>"$log" &
    pid=$!
    pids+=("$pid")
    relay_address "$log" "$pid" || exit 1
}

stop_node() {
    kill -TERM "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}

rows="$work/rows"
: >"$rows"
for run in $runs; do
    case "$run" in
        1) names=(a) ;;
        2) names=(a b) ;;
        *) echo "RUNS: 1 or 2" >&2; exit 2 ;;
    esac
    addrs=() fps=() nodepids=() metrics_of=()
    for name in "${names[@]}"; do
        if [ "$name" = a ]; then start_node "$name-$run"; else start_node "$name-$run" "a-$run"; fi
        addrs+=("$addr") fps+=("$fp") nodepids+=("$pid") metrics_of+=("$metrics")
    done
    join() { local IFS=,; echo "$*"; }
    echo "run $run: ${#names[@]} node(s) at $(join "${addrs[@]}")" >&2
    out="$work/run-$run.json"
    (pin 1 "$bin/client-sim" --relay "$(join "${addrs[@]}")" --fingerprint "$(join "${fps[@]}")" \
        --token-key "$work/a-$run/token.key" --relay-pid "$(join "${nodepids[@]}")" \
        --quiet --report "$out" "${args[@]}") >"$work/run-$run.out" 2>&1 || true
    if [ ! -s "$out" ]; then
        echo "run $run: client-sim wrote no report:" >&2
        tail -30 "$work/run-$run.out" >&2
        exit 1
    fi
    for m in "${metrics_of[@]}"; do
        curl -s "http://$m/metrics" >"$work/run-$run-$m.prom" || true
    done
    for p in "${nodepids[@]}"; do stop_node "$p"; done
    python3 - "$run" "$out" "${metrics_of[@]/#/$work/run-$run-}" >>"$rows" <<'PY'
import json, sys
run, path, proms = sys.argv[1], sys.argv[2], [p + ".prom" for p in sys.argv[3:]]
r = json.load(open(path))
lat = r["latency_ms"].get("frame", {})
failed = (r["deliveries_missing"] + r["deliveries_corrupt"] + r["deliveries_duplicate"]
          + r["misdelivered"] + r["connect_failures"])

def commit(prom):
    """Mean, p50 and p99 (upper bucket bounds) of ptt_store_commit_seconds, ms."""
    buckets, total, count = [], 0.0, 0
    try:
        for line in open(prom):
            if line.startswith("ptt_store_commit_seconds_bucket"):
                le = line.split('le="')[1].split('"')[0]
                buckets.append((float("inf") if le == "+Inf" else float(le), float(line.split()[-1])))
            elif line.startswith("ptt_store_commit_seconds_sum"):
                total = float(line.split()[-1])
            elif line.startswith("ptt_store_commit_seconds_count"):
                count = int(float(line.split()[-1]))
    except OSError:
        return None
    if count == 0:
        return None
    def q(p):
        for le, c in sorted(buckets):
            if c >= p * count:
                return le * 1000
        return float("inf")
    return (total / count * 1000, q(0.5), q(0.99), count)

ack = r["latency_ms"].get("stored_ack")
acked = f"{ack['p50']:.1f} / {ack['p99']:.1f}" if ack else "n/a"
nodes = r.get("nodes") or [{"addr": r["relay_addr"], "clients_connected": r["clients_connected"],
                            "frames_delivered": r["frames_delivered"], "relay": r["relay"]}]
for k, n in enumerate(nodes):
    cpu = n["relay"].get("cpu_us_per_frame")
    c = commit(proms[k]) if k < len(proms) else None
    store = f"{c[0]:.1f} / {c[1]:g} / {c[2]:g} ({c[3]})" if c else "n/a"
    print(f"| {len(nodes)} node{'s' if len(nodes) > 1 else ''} | {'AB'[k]} {n['addr']} | "
          f"{n['clients_connected']} | {n['frames_delivered']} | "
          f"{'n/a' if cpu is None else f'{cpu:.1f}'} | "
          f"{lat.get('p50', float('nan')):.2f} / {lat.get('p99', float('nan')):.2f} | "
          f"{store} | {acked} | {failed} of {r['deliveries_expected']} |")
PY
done

echo
echo "| run | node | clients | frames delivered | relay CPU per delivered frame (µs) | frame p50 / p99, all clients (ms) | store commit mean / p50 / p99 (ms, clips) | Stored after the last frame p50 / p99 (ms) | failed deliveries |"
echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
cat "$rows"
echo
echo "client-sim ${args[*]}; $nats_version, sync_interval ${NATS_SYNC:-default}; $profile build; load average $(cut -d' ' -f1-3 /proc/loadavg)"
