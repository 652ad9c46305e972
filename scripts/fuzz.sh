#!/usr/bin/env bash
# Runs every cargo-fuzz target (or the ones named) for SECONDS each (60 by
# default) and prints the executions per target.
#
#   scripts/fuzz.sh                      # all targets, 60 s each
#   SECONDS_PER_TARGET=120 scripts/fuzz.sh auth_token store_record
#
# cargo-fuzz needs nightly compiler flags (-Zsanitizer); this machine has a
# stable toolchain only, so RUSTC_BOOTSTRAP=1 lets stable accept them.
# cargo-fuzz itself is installed with `cargo install cargo-fuzz` if missing.
#
# Corpus: the committed seeds in fuzz/seeds/<target>/ are read but never
# written; what the fuzzer finds goes to a scratch corpus
# ($FUZZ_WORK, default target/fuzz-work/<target>/). A crash is copied to
# fuzz/regressions/<target>/, where `cargo test -p ptt-relay --test
# reliability fuzz_seeds` replays it (with the seeds) from then on: fix the
# bug, keep the file, commit both. Exit status non-zero if any target
# crashed.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${SECONDS_PER_TARGET:-60}
# Absolute: the targets run from fuzz/, where cargo-fuzz wants to be.
work=$(realpath -m "${FUZZ_WORK:-${CARGO_TARGET_DIR:-target}/fuzz-work}")
all=(control_message clip_stream live_read_datagram wav_input ogg_input auth_token store_record ogg_headers)
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=("${all[@]}")

command -v cargo-fuzz >/dev/null 2>&1 || cargo install --locked cargo-fuzz
export RUSTC_BOOTSTRAP=1

failed=()
summary=()
for t in "${targets[@]}"; do
    mkdir -p "$work/$t" "fuzz/seeds/$t"
    log="$work/$t.log"
    echo "==> $t for ${seconds}s"
    set +e
    (cd fuzz && cargo fuzz run "$t" "$work/$t" "seeds/$t" -- \
        -max_total_time="$seconds" -print_final_stats=1 -artifact_prefix="$work/$t-") >"$log" 2>&1
    rc=$?
    set -e
    execs=$(grep -E '^stat::number_of_executed_units' "$log" | awk '{print $2}' | tail -n 1)
    if [ $rc -ne 0 ]; then
        failed+=("$t")
        mkdir -p "fuzz/regressions/$t"
        for crash in "$work/$t"-crash-* "$work/$t"-oom-* "$work/$t"-timeout-*; do
            [ -e "$crash" ] || continue
            cp "$crash" "fuzz/regressions/$t/"
            echo "    crash kept as fuzz/regressions/$t/$(basename "$crash")"
        done
        tail -n 30 "$log"
    fi
    summary+=("$t: ${execs:-?} executions in ${seconds}s, exit $rc")
done
printf '%s\n' "${summary[@]}"
if [ ${#failed[@]} -gt 0 ]; then
    echo "crashed: ${failed[*]} (inputs in fuzz/regressions/)" >&2
    exit 1
fi
