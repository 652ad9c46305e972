#!/bin/sh
# Issue #11: what each kind of flooding client costs the normal clients.
# For each kind, runs the smoke scenario without and with the flood, back
# to back (a shared machine is noisy: compare within a pair), and prints
# the normal clients' frame p50/p99, failed deliveries, and how the relay
# treated the flood. Usage: scripts/flood-figures.sh [KIND[:RATE[:EXTRA FLAGS]]]...
# BOTH="--duration 15s" adds flags to both runs of each pair.
# Default: every kind. Build first: cargo build -p client-sim --bin client-sim
set -eu
SIM=${SIM:-${CARGO_TARGET_DIR:-target}/debug/client-sim}
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
run() { # name, flags...
	name=$1; shift
	# shellcheck disable=SC2086
	"$SIM" --scenario smoke --quiet --report "$OUT/r.json" ${BOTH:-} "$@" >"$OUT/out" 2>"$OUT/err" || true
	python3 - "$OUT/r.json" "$name" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
f = r["latency_ms"].get("frame", {})
v = r
fails = v["deliveries_expected"] - v["deliveries_ok"] + v["deliveries_duplicate"] + v["misdelivered"] + v["connect_failures"]
print(f'{sys.argv[2]:<44} frame p50 {f.get("p50",0):6.2f} p99 {f.get("p99",0):7.2f} ms  failures {fails} of {v["deliveries_expected"]}')
PY
	grep -A20 '^flood' "$OUT/err" | grep -v 'report written' | sed 's/^/    /' || true
}
kinds=${*:-"handshakes:500 never-auth:200 control:500 oversized:50 streams:2000 never-read:50 frames:20000 frames:20000:--user-frames-per-second=100"}
for spec in $kinds; do
	kind=${spec%%:*}; rest=${spec#*:}; rate=${rest%%:*}; extra=""
	[ "$rest" != "$rate" ] && extra=${rest#*:}
	run "no flood"
	# shellcheck disable=SC2086
	run "--flood $kind --flood-rate $rate $extra" --flood "$kind" --flood-rate "$rate" $extra
done
