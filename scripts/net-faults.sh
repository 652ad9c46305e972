#!/usr/bin/env bash
# Network faults (issue #12): the `netfaults` scenario (60 clients, walkie
# and notes groups, late members; 20 ms delay + 10 ms jitter, 2% of
# datagrams reordered and 1% duplicated each way) at each loss level of
# LEVELS (0, 1, 5 and 15% each way by default), on an embedded relay.
# Every stored clip must reach every member whole and once; prints one
# table row per level with the frame latency percentiles.
#
#   scripts/net-faults.sh
#   LEVELS="0.05" DURATION=20s scripts/net-faults.sh
#   OUT=net-out scripts/net-faults.sh      # keep each level's JSON report
#   PROFILE=debug DURATION=10s scripts/net-faults.sh   # a quick check (default: release, 40s)
#
# Wall time: about (DURATION + ~15 s of connect and settle) per level.
#
# The faults come from the simulator's lossy socket (client-sim/src/lossy.rs):
# this machine's kernel has no netem qdisc. Exit status 1 if any level
# lost, damaged or duplicated a delivery.
set -euo pipefail
cd "$(dirname "$0")/.."

LEVELS=${LEVELS:-"0 0.01 0.05 0.15"}
DURATION=${DURATION:-40s}
target=${CARGO_TARGET_DIR:-target}
out=${OUT:-$(mktemp -d -t net-faults-XXXXXX)}
mkdir -p "$out"
PROFILE=${PROFILE:-release}
profile_flag=--release
[ "$PROFILE" = debug ] && profile_flag=""
cargo build $profile_flag --locked -p client-sim --bin client-sim
echo "net-faults: $PROFILE build, $DURATION per level, levels $LEVELS; output in $out" >&2

status=0
for loss in $LEVELS; do
    "$target/$PROFILE/client-sim" --embedded --scenario netfaults --loss "$loss" \
        --duration "$DURATION" --quiet --report "$out/loss-$loss.json" \
        >"$out/loss-$loss.out" 2>&1 || status=1
done
python3 - "$out" "$PROFILE" "$DURATION" $LEVELS <<'PY'
import json, sys
out, profile, duration, levels = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
print(f"netfaults scenario, {profile} build, {duration} per level:")
print()
print("| loss each way | datagrams dropped (out / in) | reordered | duplicated | deliveries whole & once | frame p50 | p90 | p99 | clip complete p99 |")
print("|---|---|---|---|---|---|---|---|---|")
for loss in levels:
    try:
        r = json.load(open(f"{out}/loss-{loss}.json"))
    except (OSError, ValueError) as e:
        print(f"| {float(loss)*100:g} % | no report ({e}) |")
        continue
    n, f, c = r["network"] or {}, r["latency_ms"]["frame"], r["latency_ms"]["clip_complete"]
    pct = lambda a, b: 100 * a / b if b else 0
    bad = r["deliveries_missing"] + r["deliveries_corrupt"] + r["deliveries_duplicate"] + r["misdelivered"] + r["seq_inconsistent"]
    print(f"| {float(loss)*100:g} % | {pct(n.get('sent_dropped',0), n.get('sent',0)):.1f} % / {pct(n.get('received_dropped',0), n.get('received',0)):.1f} % "
          f"| {n.get('reordered',0)} | {n.get('duplicated',0)} "
          f"| {r['deliveries_ok']} of {r['deliveries_expected']}{'' if bad == 0 else f' ({bad} FAILED)'} "
          f"| {f['p50']:.1f} ms | {f['p90']:.1f} ms | {f['p99']:.1f} ms | {c['p99']:.0f} ms |")
PY
[ "$status" = 0 ] || { echo "net-faults: a level FAILED; see $out/*.out" >&2; exit 1; }
