# Sourced by the scripts that start a `relay serve` and drive it (bash).
#
# relay_address LOG PID: waits, up to 30 s, until the relay's log LOG names
# the address it listens on and its certificate's fingerprint, and sets
# `addr` and `fp` (declare them `local` first inside a function to keep
# them there). If the relay PID exits first, or the time runs out, prints
# the log and returns 1.
relay_address() {
    local log=$1 pid=$2
    addr="" fp=""
    for _ in $(seq 1 300); do
        addr=$(sed -n 's/^relay listening on \([^ ]*\).*/\1/p' "$log" | head -1) || true
        fp=$(sed -n 's/.*certificate sha-256: *\([0-9a-f]*\).*/\1/p' "$log" | head -1) || true
        [ -n "$addr" ] && [ -n "$fp" ] && return 0
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    echo "the relay did not start (log $log):" >&2
    cat "$log" >&2
    return 1
}
