#!/bin/sh
# Issue #11: what each kind of flooding client costs the normal clients.
# For each kind, runs the smoke scenario (embedded relay) without and with
# the flood, back to back (a shared machine is noisy: compare within a
# pair), and prints one markdown table row per run: the normal clients'
# frame p50/p99, failed deliveries, and how the relay treated the flood
# (how its connections ended, its uploads' refusals).
#
#   scripts/flood-figures.sh                       # every kind, release build
#   PROFILE=debug DURATION=5s scripts/flood-figures.sh never-auth:200 control:500
#   scripts/flood-figures.sh KIND[:RATE[:EXTRA FLAGS]]...
#
# PROFILE: debug|release (default release). DURATION: each run's talking
# time (default 10s); the never-auth pair runs at least NEVER_AUTH_DURATION
# (default 15s), longer than the relay's 10 s auth timeout, so the cut of
# the held connections shows (`closed AuthTimeout`). BOTH="..." adds flags
# to both runs of each pair. Wall time: about 2 x (DURATION + 10 s) per
# kind, ~6 min for the default eight in release. Exit status 1 if a run
# without a flood failed a delivery.
set -eu
cd "$(dirname "$0")/.."
PROFILE=${PROFILE:-release}
DURATION=${DURATION:-10s}
NEVER_AUTH_DURATION=${NEVER_AUTH_DURATION:-15s}
profile_flag=--release
[ "$PROFILE" = debug ] && profile_flag=""
# shellcheck disable=SC2086
cargo build $profile_flag --locked -p client-sim --bin client-sim
SIM=${SIM:-${CARGO_TARGET_DIR:-target}/$PROFILE/client-sim}
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
status=0
seconds() { # a humantime "15s" / "2m" as seconds
	case $1 in *ms) echo 0 ;; *s) echo "${1%s}" ;; *m) echo $(( ${1%m} * 60 )) ;; *) echo "$1" ;; esac
}
run() { # name, duration, flags...
	name=$1; duration=$2; shift 2
	rm -f "$OUT/r.json"
	# shellcheck disable=SC2086
	"$SIM" --scenario smoke --quiet --duration "$duration" --report "$OUT/r.json" ${BOTH:-} "$@" \
		>"$OUT/out" 2>"$OUT/err" || true
	python3 - "$OUT/r.json" "$OUT/err" "$name" "$duration" <<'PY' || status=1
import json, re, sys
path, err, name, duration = sys.argv[1:5]
flood = []
lines = open(err, errors="replace").read().splitlines()
for i, line in enumerate(lines):
    if line.startswith("flood "):
        flood.append(re.sub(r"^flood \w+: ", "", line))
        flood += [l.strip() for l in lines[i + 1:i + 20] if l.startswith("  ")]
        break
try:
    r = json.load(open(path))
except (OSError, ValueError) as e:
    print(f"| {name} | {duration} | no report ({e}) | | | |")
    sys.exit(1 if name == "no flood" else 0)
f = r["latency_ms"].get("frame", {})
fails = r["deliveries_expected"] - r["deliveries_ok"] + r["deliveries_duplicate"] + r["misdelivered"] + r["connect_failures"]
print(f'| {name} | {duration} | {f.get("p50", 0):.2f} ms | {f.get("p99", 0):.2f} ms '
      f'| {fails} of {r["deliveries_expected"]} | {"; ".join(flood) or "-"} |')
sys.exit(1 if fails and name == "no flood" else 0)
PY
}
kinds=${*:-"handshakes:500 never-auth:200 control:500 oversized:50 streams:2000 never-read:50 frames:20000 frames:20000:--user-frames-per-second=100"}
echo "flood figures: smoke scenario, embedded relay, $PROFILE build"
echo
echo "| run | talking | normal clients' frame p50 | p99 | failed deliveries | the flood, and how the relay treated it |"
echo "|---|---|---|---|---|---|"
for spec in $kinds; do
	kind=${spec%%:*}; rest=${spec#*:}; rate=${rest%%:*}; extra=""
	[ "$rest" != "$rate" ] && extra=${rest#*:}
	[ "$rest" = "$spec" ] && rate=100
	duration=$DURATION
	if [ "$kind" = never-auth ] && [ "$(seconds "$duration")" -lt "$(seconds "$NEVER_AUTH_DURATION")" ]; then
		duration=$NEVER_AUTH_DURATION
	fi
	run "no flood" "$duration"
	# shellcheck disable=SC2086
	run "--flood $kind --flood-rate $rate${extra:+ $extra}" "$duration" --flood "$kind" --flood-rate "$rate" $extra
done
exit $status
