#!/usr/bin/env bash
# Slow consumers (issue #12): the `slow-consumers` scenario (4 groups of
# 10, one talker each; in every group one member never reads and one reads
# at half rate) against the same run without them, ROUNDS times
# alternating, each against a fresh `relay serve` process (release
# build). Prints the other members' frame latency for each run and the
# difference of the p99s (the issue's bound: within 2 ms), and exits 1 if
# a delivery failed or the mean difference is over 2 ms.
#
#   scripts/slow-consumers.sh            # 3 rounds of 40 s
#   ROUNDS=1 DURATION=20s scripts/slow-consumers.sh
#   PROFILE=debug ROUNDS=1 DURATION=15s scripts/slow-consumers.sh  # a quick check
#
# Wall time: about 2 x ROUNDS x (DURATION + ~10 s).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/relay.sh"
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-40s}
target=${CARGO_TARGET_DIR:-target}
out=${OUT:-$(mktemp -d -t slow-consumers-XXXXXX)}
mkdir -p "$out"
PROFILE=${PROFILE:-release}
profile_flag=--release
[ "$PROFILE" = debug ] && profile_flag=""
cargo build $profile_flag --locked -p ptt-relay --bin relay -p client-sim --bin client-sim
bin="$target/$PROFILE"
echo "slow-consumers: $PROFILE build, $ROUNDS rounds of $DURATION; output in $out" >&2

run() {
    local label=$1 n=$2
    shift 2
    local data="$out/$label-$n" log="$out/$label-$n.relay.log"
    "$bin/relay" serve --data-dir "$data" --listen 127.0.0.1:0 2>"$log" &
    local pid=$!
    local addr fp
    relay_address "$log" "$pid" || exit 1
    "$bin/client-sim" --relay "$addr" --fingerprint "$fp" \
        --token-key "$data/token.key" --relay-pid "$pid" --scenario slow-consumers \
        --duration "$DURATION" --quiet --report "$out/$label-$n.json" "$@" \
        >"$out/$label-$n.out" 2>&1 || echo "$label run $n FAILED (see $out/$label-$n.out)" >&2
    kill -TERM "$pid"; wait "$pid" 2>/dev/null || true
}

for n in $(seq 1 "$ROUNDS"); do
    run without "$n" --stalled-per-group 0 --slow-per-group 0
    run with "$n"
done
python3 - "$out" "$ROUNDS" "$PROFILE" "$DURATION" <<'PY'
import json, sys
out, rounds, profile, duration = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
print(f"slow-consumers scenario against `relay serve`, {profile} build, {rounds} rounds of {duration}:")
print()
print("| run | others' frame p50 | p90 | p99 | slow member p99 | deliveries whole & once | live cuts |")
print("|---|---|---|---|---|---|---|")
diffs = []
failed = []
for n in range(1, rounds + 1):
    p99 = {}
    for label in ("without", "with"):
        try:
            r = json.load(open(f"{out}/{label}-{n}.json"))
        except (OSError, ValueError) as e:
            print(f"| {label} {n} | no report ({e}) |")
            failed.append(f"{label} {n}: no report")
            continue
        f, s = r["latency_ms"]["frame"], r["latency_ms"].get("slow_frame", {})
        p99[label] = f["p99"]
        bad = r["deliveries_missing"] + r["deliveries_corrupt"] + r["deliveries_duplicate"] + r["misdelivered"]
        if bad:
            failed.append(f"{label} {n}: {bad} failed deliveries")
        slow = f"{s['p99']:.1f} ms" if s.get("count") else "-"
        print(f"| {label} {n} | {f['p50']:.2f} ms | {f['p90']:.2f} ms | {f['p99']:.2f} ms | {slow} "
              f"| {r['deliveries_ok']} of {r['deliveries_expected']}{'' if bad == 0 else f' ({bad} FAILED)'} "
              f"| {r['client']['clips_aborted']} |")
    if len(p99) == 2:
        diffs.append(p99["with"] - p99["without"])
print()
if diffs:
    mean = sum(diffs) / len(diffs)
    print("p99 with minus without, per round: " + ", ".join(f"{d:+.2f} ms" for d in diffs)
          + f"; mean {mean:+.2f} ms ({'within' if mean <= 2.0 else 'OVER'} the issue's 2 ms)")
    if mean > 2.0:
        failed.append(f"mean p99 difference {mean:+.2f} ms is over 2 ms")
if failed:
    print("SLOW-CONSUMERS FAILED: " + "; ".join(failed))
    sys.exit(1)
PY
