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
#   NATS=1 KILLS=20 scripts/kill-soak.sh # the relay on the cluster backend
#   PROFILE=release scripts/kill-soak.sh # release binaries (default: debug)
#
# NATS=1: a `nats-server` with JetStream (the one on the PATH, /usr/sbin, or
# $NATS_SERVER; `./dev.sh setup` installs it) on a free loopback port with
# its store in a temporary directory runs for the whole run, and the relay
# runs with `--nats`; only the relay is killed (the NATS server keeps its
# clips, the relay its keys and certificate in the data directory).
#
# The fast version (4 kills) runs in `./dev.sh test`
# (relay/tests/reliability.rs). Exit status non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."

KILLS=${KILLS:-200}
PROFILE=${PROFILE:-debug}
target=${CARGO_TARGET_DIR:-target}
profile_flag=""
[ "$PROFILE" = release ] && profile_flag=--release
cargo build $profile_flag --locked -p ptt-relay --bin relay -p client-sim --bin kill-soak
bin="$target/$PROFILE"
args=(--kills "$KILLS")
[ -n "${SEED:-}" ] && args+=(--seed "$SEED")
[ -n "${REPORT:-}" ] && args+=(--report "$REPORT")
relay=("$bin/relay" serve --worker-threads 1)

if [ "${NATS:-0}" = 1 ]; then
    nats_bin=${NATS_SERVER:-$(PATH="$PATH:/usr/sbin:/usr/local/sbin" command -v nats-server || true)}
    [ -n "$nats_bin" ] || { echo "kill-soak: no nats-server (./dev.sh setup installs it)" >&2; exit 1; }
    nats_dir=$(mktemp -d -t kill-soak-nats-XXXXXX)
    nats_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    "$nats_bin" -a 127.0.0.1 -p "$nats_port" -js -sd "$nats_dir" >"$nats_dir/nats.log" 2>&1 &
    nats_pid=$!
    stop_nats() {
        # What the relay kept in JetStream: its streams and buckets.
        echo "kill-soak: JetStream streams: $(ls "$nats_dir"/jetstream/*/streams 2>/dev/null | tr '\n' ' ')"
        kill -TERM "$nats_pid" 2>/dev/null || true
        wait "$nats_pid" 2>/dev/null || true
        rm -rf "$nats_dir"
    }
    trap stop_nats EXIT
    for _ in $(seq 1 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$nats_port") 2>/dev/null && break
        kill -0 "$nats_pid" 2>/dev/null || { cat "$nats_dir/nats.log" >&2; exit 1; }
        sleep 0.1
    done
    echo "kill-soak: nats-server $("$nats_bin" --version 2>&1 | head -1) with JetStream on 127.0.0.1:$nats_port ($nats_dir)"
    relay+=(--nats "nats://127.0.0.1:$nats_port")
    # Not exec: the trap stops the NATS server at the end.
    "$bin/kill-soak" "${args[@]}" -- "${relay[@]}"
else
    exec "$bin/kill-soak" "${args[@]}" -- "${relay[@]}"
fi
