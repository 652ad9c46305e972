#!/usr/bin/env bash
# Issue #14's relay-only figures: the `broadcast` scenario (one publisher,
# CLIENTS followers of a public channel, 30 % online, a 1 s clip every 3 s,
# followers leaving and joining) against a separate `relay serve` process,
# so CPU per delivered clip and memory per online and offline follower are
# the relay's alone (read from its /proc). The relay is started fresh on a
# temporary data directory, with the limits that would refuse thousands of
# simulated clients from one loopback address turned off (connections and
# handshakes per IP, the handshake rate; they are for real clients on
# many addresses) and room for the followers' connections.
#
#   scripts/broadcast-relay.sh                          # 10,000 followers, 60 s, release
#   PROFILE=debug CLIENTS=300 DURATION=15s scripts/broadcast-relay.sh   # a quick check
#   OUT=bc-out scripts/broadcast-relay.sh               # keep the report and logs
#
# Wall time: DURATION plus connecting the followers (7,000 Follows and
# 3,000 connections: about a minute in release) plus the settle. Exit
# status 1 if a follower missed a clip or got one twice.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/relay.sh"
cd "$(dirname "$0")/.."

PROFILE=${PROFILE:-release}
CLIENTS=${CLIENTS:-10000}
DURATION=${DURATION:-60s}
target=${CARGO_TARGET_DIR:-target}
out=${OUT:-$(mktemp -d -t broadcast-relay-XXXXXX)}
mkdir -p "$out"
profile_flag=--release
[ "$PROFILE" = debug ] && profile_flag=""
cargo build $profile_flag --locked -p ptt-relay --bin relay -p client-sim --bin client-sim
bin="$target/$PROFILE"
echo "broadcast-relay: $PROFILE build, $CLIENTS followers, $DURATION; output in $out" >&2

data="$out/data"
"$bin/relay" serve --data-dir "$data" --listen 127.0.0.1:0 \
    --max-connections $(( CLIENTS + 1000 )) --max-connections-per-ip 0 \
    --handshakes-per-second 0 --handshakes-per-ip-per-second 0 \
    --channel-max-clips-per-day 100000 2>"$out/relay.log" &
relay=$!
trap 'kill -TERM "$relay" 2>/dev/null || true; wait "$relay" 2>/dev/null || true' EXIT
relay_address "$out/relay.log" "$relay" || exit 1

status=0
"$bin/client-sim" --relay "$addr" --fingerprint "$fp" --token-key "$data/token.key" \
    --relay-pid "$relay" --scenario broadcast --clients "$CLIENTS" --duration "$DURATION" \
    --report "$out/report.json" >"$out/client-sim.out" 2>"$out/client-sim.err" || status=$?
cat "$out/client-sim.out"
[ -s "$out/report.json" ] || { tail -20 "$out/client-sim.err" >&2; echo "broadcast-relay: no report" >&2; exit 1; }
python3 - "$out/report.json" "$PROFILE" "$DURATION" <<'PY'
import json, sys
r, profile, duration = json.load(open(sys.argv[1])), sys.argv[2], sys.argv[3]
l, d = r["end_to_last_follower_ms"], r["end_to_follower_ms"]
print()
print(f"| broadcast against `relay serve` ({profile} build): {r['followers']:,} followers, {r['online']:,} online, {r['clips']} clips of 1 s every 3 s | figure |")
print("|---|---|")
print(f"| deliveries | {r['deliveries_expected']:,} expected, **{r['deliveries_missing']} missing, {r['deliveries_duplicate']} duplicate** ({r['deliveries_total']:,} in all, leavers included) |")
print(f"| end of clip → last live follower (per clip) | p50 {l['p50']:.1f} ms, p99 {l['p99']:.1f} ms |")
print(f"| end of clip → each live follower | p50 {d['p50']:.1f} ms, p99 {d['p99']:.1f} ms |")
print(f"| relay CPU per delivered clip | {r['cpu_us_per_delivered_clip']:.0f} µs |")
print(f"| relay memory per online follower | {r['rss_kib_per_online_follower']:.1f} KiB |")
print(f"| relay memory per offline follower | {r['rss_bytes_per_offline_follower']:.0f} B |")
print(f"| measured | {r['measured']} |")
PY
[ "$status" = 0 ] || { echo "broadcast-relay: client-sim exited with $status (see $out/client-sim.err)" >&2; exit 1; }
