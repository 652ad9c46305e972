#!/usr/bin/env bash
# Times `codec encode` against `opusenc` on the same 60-second speech WAV at
# identical settings (24 kbit/s VBR, complexity 10, 20 ms frames, application
# audio — the only application opusenc uses), alternating the two tools run by
# run, and prints medians and the median speed-up.
#
# It also reports the time spent inside libopus's own encode calls (the
# hidden `codec encode --timing` flag measures them in-process), so the
# pipeline's overhead above libopus is visible, and the batch speed-up of
# `codec encode a.wav b.wav … -o dir/` over encoding one file at a time.
#
# Inputs, all made from codec/tests/fixtures/speech.wav repeated to 60 s:
#   16 kHz mono 16-bit    (a phone's voice note: no resampling on our side)
#   48 kHz mono 16-bit    (no resampling on either side)
#   44.1 kHz stereo 24-bit (downmix + resampling; opusenc gets --downmix-mono)
#
# Usage: scripts/bench-vs-opusenc.sh [RUNS]   (default 7 runs per tool)
# Needs: sox, opusenc, a Rust toolchain. Builds `codec` (the ptt-codec-cli
# crate) in release mode.
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=${1:-7}
BATCH_FILES=${BATCH_FILES:-8}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
for tool in sox opusenc cargo; do
    command -v "$tool" >/dev/null || { echo "error: $tool not found (./dev.sh setup installs it)" >&2; exit 1; }
done

echo "building codec (release)…" >&2
cargo build --release -q -p ptt-codec-cli --bin codec
CODEC=$CARGO_TARGET_DIR/release/codec

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
FIXTURE=codec/tests/fixtures/speech.wav
# shellcheck disable=SC2046
sox $(for _ in 1 2 3 4 5 6 7; do echo "$FIXTURE"; done) "$WORK/16k-mono.wav" trim 0 60
sox "$WORK/16k-mono.wav" -r 48000 "$WORK/48k-mono.wav" rate -v
sox "$WORK/16k-mono.wav" -r 44100 -b 24 "$WORK/44k1-stereo-24bit.wav" rate -v remix 1 1 delay 0 0.013 trim 0 60

now() { date +%s%N; }
median() { sort -g | awk '{a[NR]=$1} END {if (NR % 2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }
field() { sed -n "s/.* $1=\([0-9.]*\).*/\1/p"; }

CODEC_ARGS=(--bitrate 24k --complexity 10 --frame-ms 20 --application audio --vbr)
OPUSENC_ARGS=(--quiet --bitrate 24 --comp 10 --framesize 20 --vbr)

echo
echo "opusenc: $(opusenc --version | head -1)"
echo "codec:   $("$CODEC" --version) ($(nproc) cores, $RUNS alternating runs per tool, medians)"
echo
printf '%-22s %10s %10s %9s %9s %10s %11s %11s\n' input "codec s" "opusenc s" speed-up "codec ×RT" "libopus s" "wall/libopus" "in-proc/libopus"
for name in 16k-mono 48k-mono 44k1-stereo-24bit; do
    in=$WORK/$name.wav
    extra=()
    [ "$name" = 44k1-stereo-24bit ] && extra=(--downmix-mono)
    : > "$WORK/codec.t"; : > "$WORK/opusenc.t"; : > "$WORK/ratio.t"; : > "$WORK/opus.t"; : > "$WORK/inproc.t"; : > "$WORK/wallopus.t"
    for _ in $(seq "$RUNS"); do
        t0=$(now)
        line=$("$CODEC" encode "$in" -o "$WORK/c.opus" "${CODEC_ARGS[@]}" --timing 2>&1)
        t1=$(now)
        opusenc "${OPUSENC_ARGS[@]}" "${extra[@]}" "$in" "$WORK/o.opus" 2>/dev/null
        t2=$(now)
        c=$(awk -v a="$t0" -v b="$t1" 'BEGIN {print (b-a)/1e9}')
        o=$(awk -v a="$t1" -v b="$t2" 'BEGIN {print (b-a)/1e9}')
        opus=$(echo "$line" | field opus_s)
        inproc=$(echo "$line" | field wall_s)
        echo "$c" >> "$WORK/codec.t"
        echo "$o" >> "$WORK/opusenc.t"
        echo "$opus" >> "$WORK/opus.t"
        awk -v c="$c" -v o="$o" 'BEGIN {print o/c}' >> "$WORK/ratio.t"
        awk -v w="$inproc" -v p="$opus" 'BEGIN {print w/p}' >> "$WORK/inproc.t"
        awk -v w="$c" -v p="$opus" 'BEGIN {print w/p}' >> "$WORK/wallopus.t"
    done
    mc=$(median < "$WORK/codec.t"); mo=$(median < "$WORK/opusenc.t"); mr=$(median < "$WORK/ratio.t")
    mp=$(median < "$WORK/opus.t"); mi=$(median < "$WORK/inproc.t"); mw=$(median < "$WORK/wallopus.t")
    echo "$name $mc" >> "$WORK/single.t"
    printf '%-22s %10.3f %10.3f %8.2f× %8.0f× %10.3f %10.3f× %10.3f×\n' \
        "$name" "$mc" "$mo" "$mr" "$(awk -v c="$mc" 'BEGIN {print 60/c}')" "$mp" "$mw" "$mi"
done

echo
echo "batch: $BATCH_FILES × 60 s files in one 'codec encode … -o dir/' against one file at a time"
echo "(cores used = CPU time / wall time of the batch: below 2 means other processes held a core)"
TIMEFORMAT='%R %U %S'
for name in 48k-mono 16k-mono; do
    files=()
    for i in $(seq "$BATCH_FILES"); do
        ln -sf "$WORK/$name.wav" "$WORK/batch-$name-$i.wav"
        files+=("$WORK/batch-$name-$i.wav")
    done
    : > "$WORK/batch.t"; : > "$WORK/seq.t"; : > "$WORK/cores.t"
    for _ in $(seq 3); do
        t0=$(now)
        for f in "${files[@]}"; do "$CODEC" encode "$f" -o "$WORK/seq.opus" "${CODEC_ARGS[@]}"; done
        t1=$(now)
        { time "$CODEC" encode "${files[@]}" -o "$WORK/batch-out/" "${CODEC_ARGS[@]}" ; } 2> "$WORK/time.t"
        awk -v a="$t0" -v b="$t1" 'BEGIN {print (b-a)/1e9}' >> "$WORK/seq.t"
        awk '{print $1}' "$WORK/time.t" >> "$WORK/batch.t"
        awk '{print ($2+$3)/$1}' "$WORK/time.t" >> "$WORK/cores.t"
    done
    ms=$(median < "$WORK/seq.t"); mb=$(median < "$WORK/batch.t"); mcores=$(median < "$WORK/cores.t")
    printf '%-22s one at a time %7.3f s, batch %7.3f s: %.2f× throughput (cores used %.2f)\n' \
        "$name" "$ms" "$mb" "$(awk -v s="$ms" -v b="$mb" 'BEGIN {print s/b}')" "$mcores"
done
