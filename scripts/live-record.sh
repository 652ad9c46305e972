#!/usr/bin/env bash
# Issue #15's table of record in one sitting: the relay against quinn's
# floor on every live plane (per frame and coalesced, 0 and 80 ms RTT),
# QUIC DATAGRAM in the floor, the simulator's event sink, idle memory, 15 %
# loss, and the walkie capacity search. About 50 minutes on 2 cores; keep
# the machine otherwise idle. Raw outputs (one file per row) go to OUT.
#
#   cargo build --release -p ptt-relay -p client-sim -p ptt-benches \
#       --bin relay --bin client-sim --bin quinn-floor
#   scripts/live-record.sh target/release /tmp/record
#
# Each row is printed by scripts/relay-ab.sh (server pinned to CPU 0,
# simulator to CPU 1, pairs back to back); OUT/log has each row's start.
# CAPACITY_NOTES=1 adds the notes capacity search (about 25 minutes more).
set -u
T=$(realpath "$1") R=$(mkdir -p "$2" && realpath "$2")
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ab() { # name, then env assignments and relay-ab args
    local name=$1; shift
    echo "== $name $(date +%T)" >>"$R/log"
    env "$@" >"$R/$name.txt" 2>&1
}
for d in 0 40; do
    delay=(); [ "$d" = 40 ] && delay=(--delay 40ms)
    ab streams-pf-$d A_BIN=quinn-floor B_ARGS="--live-budget-ms 0" scripts/relay-ab.sh "$T" "$T" 3 --scenario live --media streams "${delay[@]}"
    ab streams-60-$d A_BIN=quinn-floor A_ARGS="--coalesce 3" B_ARGS="--live-budget-ms 60" scripts/relay-ab.sh "$T" "$T" 2 --scenario live --media streams "${delay[@]}"
    ab udp-pf-$d A_BIN=quinn-floor B_ARGS="--live-budget-ms 0" scripts/relay-ab.sh "$T" "$T" 2 --scenario live --media udp "${delay[@]}"
    ab udp-60-$d A_BIN=quinn-floor A_ARGS="--coalesce 3" B_ARGS="--live-budget-ms 60" scripts/relay-ab.sh "$T" "$T" 2 --scenario live --media udp "${delay[@]}"
    ab dg-pf-$d A_BIN=quinn-floor B_BIN=quinn-floor B_ARGS="--live datagram" scripts/relay-ab.sh "$T" "$T" 2 --scenario live --media streams "${delay[@]}"
    ab dg-3-$d A_BIN=quinn-floor B_BIN=quinn-floor A_ARGS="--coalesce 3" B_ARGS="--live datagram --coalesce 3" scripts/relay-ab.sh "$T" "$T" 1 --scenario live --media streams "${delay[@]}"
done
ab sink-udp A_SIM_ARGS=--event-channel A_ARGS="--live-budget-ms 0" B_ARGS="--live-budget-ms 0" scripts/relay-ab.sh "$T" "$T" 2 --scenario live --media udp
ab sink-streams A_SIM_ARGS=--event-channel A_ARGS="--live-budget-ms 0" B_ARGS="--live-budget-ms 0" scripts/relay-ab.sh "$T" "$T" 1 --scenario live --media streams
ab idle A_BIN=quinn-floor scripts/relay-ab.sh "$T" "$T" 1 --scenario idle
echo "== loss $(date +%T)" >>"$R/log"
"$T/client-sim" --embedded --scenario lossy-mobile --loss 0.15 --delay 40ms --media udp --churn 0 --report "$R/loss-nochurn.json" >"$R/loss-nochurn.txt" 2>&1
"$T/client-sim" --embedded --scenario lossy-mobile --loss 0.15 --delay 40ms --media udp --report "$R/loss-churn.json" >"$R/loss-churn.txt" 2>&1
echo "== capacity $(date +%T)" >>"$R/log"
scripts/capacity.sh "$T" --scenario capacity --media udp --settle 10s --clients 5000 >"$R/cap-walkie.txt" 2>&1
if [ "${CAPACITY_NOTES:-0}" = 1 ]; then
    scripts/capacity.sh "$T" --scenario capacity-notes --media udp --settle 10s --clients 8000 >"$R/cap-notes.txt" 2>&1
fi
echo "== done $(date +%T)" >>"$R/log"
