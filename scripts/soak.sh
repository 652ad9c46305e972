#!/usr/bin/env bash
# The soak (issue #12): a `relay serve` process (release build) under the
# `soak` scenario's steady load for MINUTES (30 by default): 100 clients
# in 10 groups talking, with churn (connection drops, talkers mid-clip),
# socket switches (QUIC migration), 2% loss, jitter, reordering and
# duplication, and late members. Every SAMPLE seconds (10) it records the
# relay's resident memory, threads and open file descriptors (/proc) and
# its async runtime's live tasks and connections (the relay's /metrics:
# ptt_runtime_alive_tasks, ptt_connections).
#
# It fails (exit 1) if the simulator reports any lost, damaged or
# duplicated delivery, or if after the warm-up (WARMUP minutes, default a
# fifth of the run, at least 2) a resource grows: the mean of the last
# fifth of the samples against the mean of the first fifth after the
# warm-up may grow by at most 10% + 8 MiB (RSS), 20% + 20 (tasks),
# 10% + 10 (fds), 2 (threads).
#
#   scripts/soak.sh                      # 30 minutes
#   MINUTES=3 scripts/soak.sh            # a short one
#   OUT=soak-out scripts/soak.sh         # keep samples.csv, the report and logs there
#   PROFILE=debug scripts/soak.sh        # debug binaries (no release build)
#   PROFILE=debug MINUTES=2 scripts/soak.sh   # a quick check (samples every 3 s)
#   BIN=/some/dir scripts/soak.sh        # binaries copied aside, no build
#
# Wall time: MINUTES plus about a minute (build, connect, settle).
#
# Traffic stays on loopback. CPU-light: about a tenth of a core.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/relay.sh"
cd "$(dirname "$0")/.."

MINUTES=${MINUTES:-30}
if [ "$MINUTES" -ge 5 ]; then
    SAMPLE=${SAMPLE:-10}
    WARMUP=${WARMUP:-$(( MINUTES / 5 > 2 ? MINUTES / 5 : 2 ))}
else
    # A short check: samples every 3 s, and a warm-up past the late
    # members' arrival (the scenario's offline_for, 60 s).
    SAMPLE=${SAMPLE:-3}
    WARMUP=${WARMUP:-1.1}
fi
target=${CARGO_TARGET_DIR:-target}
out=${OUT:-$(mktemp -d -t soak-XXXXXX)}
mkdir -p "$out"
echo "soak: ${MINUTES} min, sample every ${SAMPLE} s, warm-up ${WARMUP} min; output in $out" >&2

PROFILE=${PROFILE:-release}
profile_flag=--release
[ "$PROFILE" = debug ] && profile_flag=""
# BIN=DIR runs the relay and client-sim binaries in DIR as they are (no
# build): a soak that outlives later builds of the same tree.
if [ -n "${BIN:-}" ]; then
    bin=$BIN
else
    cargo build $profile_flag --locked -p ptt-relay --bin relay -p client-sim --bin client-sim
    bin="$target/$PROFILE"
fi

data="$out/data"
metrics_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
# RELAY_ARGS: more `relay serve` flags (split on spaces). By default the
# store's page cache is capped at 4 MiB: the relay's default (64 MiB) takes
# about 50 minutes of this load's writes to fill, and a cache filling
# toward its cap would read as growth (README, Reliability). Set
# RELAY_ARGS="" to run with the relay's defaults.
read -r -a relay_args <<<"${RELAY_ARGS---store-cache-mib 4}"
"$bin/relay" serve --data-dir "$data" --listen 127.0.0.1:0 \
    --metrics "127.0.0.1:$metrics_port" ${relay_args[@]+"${relay_args[@]}"} 2>"$out/relay.log" &
relay=$!
sim=""
sampler=""
cleanup() {
    [ -n "$sampler" ] && kill "$sampler" 2>/dev/null || true
    [ -n "$sim" ] && kill "$sim" 2>/dev/null || true
    kill -TERM "$relay" 2>/dev/null || true
    wait 2>/dev/null || true
}
trap cleanup EXIT

relay_address "$out/relay.log" "$relay" || exit 1

# Samples: seconds since start, RSS KiB, threads, fds, tasks, connections.
sample_loop() {
    local t0=$SECONDS
    echo "t_s,rss_kib,threads,fds,tasks,connections"
    while kill -0 "$relay" 2>/dev/null; do
        local rss threads fds page tasks conns
        rss=$(awk '/^VmRSS:/ {print $2}' "/proc/$relay/status" 2>/dev/null || echo "")
        threads=$(awk '/^Threads:/ {print $2}' "/proc/$relay/status" 2>/dev/null || echo "")
        fds=$(ls "/proc/$relay/fd" 2>/dev/null | wc -l)
        page=$(python3 -c 'import sys, urllib.request
print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())' \
            "http://127.0.0.1:$metrics_port/metrics" 2>/dev/null || echo "")
        tasks=$(echo "$page" | awk '$1 == "ptt_runtime_alive_tasks" {print $2}')
        conns=$(echo "$page" | awk '$1 == "ptt_connections" {print $2}')
        [ -n "$rss" ] && echo "$(( SECONDS - t0 )),$rss,$threads,$fds,${tasks:-},${conns:-}"
        sleep "$SAMPLE"
    done
}
sample_loop >"$out/samples.csv" &
sampler=$!

sim_status=0
"$bin/client-sim" --relay "$addr" --fingerprint "$fp" \
    --token-key "$data/token.key" --relay-pid "$relay" \
    --scenario soak --duration "${MINUTES}m" --quiet \
    --report "$out/report.json" >"$out/client-sim.out" 2>"$out/client-sim.err" &
sim=$!
wait "$sim" || sim_status=$?
sim=""
# One more sample with the clients gone.
sleep "$SAMPLE"
kill "$sampler" 2>/dev/null || true
wait "$sampler" 2>/dev/null || true
sampler=""
cat "$out/client-sim.out"

python3 - "$out/samples.csv" "$WARMUP" "$sim_status" "$out/report.json" "$PROFILE" "$MINUTES" <<'PY'
import csv, json, sys
path, warmup_min, sim_status, report = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
profile, minutes = sys.argv[5], sys.argv[6]
row = {}
rows = [r for r in csv.DictReader(open(path)) if r["rss_kib"]]
def col(rows, k):
    return [float(r[k]) for r in rows if r.get(k) not in (None, "")]
warm = [r for r in rows if float(r["t_s"]) >= warmup_min * 60]
failed = []
if sim_status != 0:
    failed.append(f"client-sim exited with {sim_status}")
try:
    r = json.load(open(report))
    bad = r["deliveries_missing"] + r["deliveries_corrupt"] + r["deliveries_duplicate"] + r["misdelivered"] + r["seq_inconsistent"]
    print(f"deliveries: {r['deliveries_ok']} of {r['deliveries_expected']} whole and once; "
          f"{bad} failures; {r['client']['errors']} client errors; "
          f"{r['client']['churn_drops']} churn drops, {r['client']['rebinds']} socket switches, "
          f"{r['client']['reconnects']} reconnects")
    row["deliveries"] = (f"{r['deliveries_ok']:,} of {r['deliveries_expected']:,} deliveries whole and once "
                         f"through {r['client']['churn_drops']:,} connection drops and {r['client']['rebinds']:,} socket switches")
    if bad:
        failed.append(f"{bad} failed deliveries")
except (OSError, ValueError, KeyError) as e:
    failed.append(f"no report: {e}")
rss = col(rows, "rss_kib")
if rss:
    print(f"relay RSS: start {rss[0]/1024:.1f} MiB, peak {max(rss)/1024:.1f} MiB, end {rss[-1]/1024:.1f} MiB "
          f"({len(rows)} samples over {float(rows[-1]['t_s'])/60:.1f} min)")
    row["rss"] = f"RSS start {rss[0]/1024:.1f} MiB, peak {max(rss)/1024:.1f}, end {rss[-1]/1024:.1f} MiB"
if len(warm) < 10:
    failed.append(f"only {len(warm)} samples after the warm-up: run longer")
else:
    # The clients close at the end: leave the final (idle) sample out.
    body = warm[:-1]
    fifth = max(len(body) // 5, 1)
    first, last = body[:fifth], body[-fifth:]
    limits = {"rss_kib": (0.10, 8192), "tasks": (0.20, 20), "fds": (0.10, 10), "threads": (0.0, 2)}
    for k, (rel, absolute) in limits.items():
        a, b = col(first, k), col(last, k)
        if not a or not b:
            failed.append(f"no {k} samples")
            continue
        ma, mb = sum(a) / len(a), sum(b) / len(b)
        bound = ma * (1 + rel) + absolute
        peak = max(col(body, k))
        print(f"{k}: after warm-up {ma:.0f}, at the end {mb:.0f} (bound {bound:.0f}), peak {peak:.0f}")
        row[k] = f"{k} {ma:.0f} → {mb:.0f}"
        if mb > bound:
            failed.append(f"{k} grew from {ma:.0f} to {mb:.0f} (bound {bound:.0f})")
    idle = rows[-1]
    print(f"after the clients left: tasks {idle['tasks']}, connections {idle['connections']}, fds {idle['fds']}")
    row["idle"] = f"{idle['connections']} connections and {idle['tasks']} tasks once the clients left"
verdict = "SOAK FAILED: " + "; ".join(failed) if failed else "passed its bounds"
print()
print(f"| soak: `relay serve` under the `soak` scenario ({profile} build) | **{minutes} minutes**: "
      + "; ".join(v for v in (row.get("deliveries"), row.get("rss"), row.get("tasks"), row.get("fds"),
                              row.get("threads"), row.get("idle"), verdict) if v)
      + f" | `PROFILE={profile} MINUTES={minutes} scripts/soak.sh` |")
if failed:
    print("SOAK FAILED: " + "; ".join(failed))
    sys.exit(1)
print("SOAK PASSED")
PY
