#!/usr/bin/env bash
# The long process-kill run (issue #12): kills a real `relay serve` with
# SIGKILL at random moments while talkers upload and listeners receive,
# restarts it on the same data directory, KILLS times (200 by default), and
# checks that no acknowledged clip is lost, none is delivered twice as new,
# none partial as complete, and every re-sent clip landed once with one seq.
#
#   scripts/kill-soak.sh                 # 200 kills, random seed (printed)
#   KILLS=20 SEED=7 scripts/kill-soak.sh # replay a run
#   REPORT=kill.json scripts/kill-soak.sh
#
# The fast version (4 kills) runs in `./dev.sh test`
# (relay/tests/reliability.rs). Exit status non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."

KILLS=${KILLS:-200}
target=${CARGO_TARGET_DIR:-target}
cargo build --locked -p ptt-relay --bin relay -p client-sim --bin kill-soak
args=(--kills "$KILLS")
[ -n "${SEED:-}" ] && args+=(--seed "$SEED")
[ -n "${REPORT:-}" ] && args+=(--report "$REPORT")
exec "$target/debug/kill-soak" "${args[@]}" -- "$target/debug/relay" serve --worker-threads 1
