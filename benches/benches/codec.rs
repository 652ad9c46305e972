//! Codec benchmarks: encode throughput (48 kHz mono, 44.1 kHz stereo 24-bit
//! with downmix and resampling, 16 kHz mono), decode, the Ogg writer alone
//! and the resampler alone.
//!
//! Throughput is reported in elements = input frames (samples per channel)
//! per second; each encode/decode case also prints its speed as × realtime.
//!
//! `cargo bench -p ptt-benches --bench codec`

use std::hint::black_box;
use std::io::Cursor;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use ptt_codec::resample::StreamResampler;
use ptt_codec::{
    EncoderConfig, OggOpusWriter, OpusHead, OpusTags, OutputRate, StreamEncoder,
    decode_ogg_opus_at, encode_wav, encode_wav_packets,
};

/// Seconds of audio per benchmark iteration.
const CLIP_SECS: u32 = 10;

/// A voiced, speech-like test signal (gliding pitch, two formants, 4 Hz
/// syllables): libopus works on it as it does on speech.
fn speechlike(rate: u32, frames: usize, seed: u32) -> Vec<f32> {
    let s = seed as f32;
    let (f1, f2) = (500.0 + 150.0 * s, 1500.0 + 400.0 * s);
    let mut phase = 0.0f64;
    (0..frames)
        .map(|i| {
            let t = i as f64 / f64::from(rate);
            let f0 = 140.0 + 40.0 * (t * 0.7 + f64::from(s)).sin();
            phase += f0 / f64::from(rate);
            let mut v = 0.0f32;
            let mut h = 1;
            while f64::from(h) * f0 < 3_800.0 {
                let fh = (f64::from(h) * f0) as f32;
                let a = 1.0 / (1.0 + ((fh - f1) / 150.0).powi(2))
                    + 0.5 / (1.0 + ((fh - f2) / 200.0).powi(2))
                    + 0.05;
                v += a * ((std::f64::consts::TAU * phase * f64::from(h)).sin() as f32);
                h += 1;
            }
            let env = 0.5 - 0.45 * ((std::f64::consts::TAU * 4.0 * t).cos() as f32);
            v * env * 0.2
        })
        .collect()
}

fn wav_bytes(rate: u32, channels: u16, bits: u16, interleaved: &[f32]) -> Vec<u8> {
    let spec = hound::WavSpec {
        channels,
        sample_rate: rate,
        bits_per_sample: bits,
        sample_format: hound::SampleFormat::Int,
    };
    let mut cur = Cursor::new(Vec::new());
    let mut w = hound::WavWriter::new(&mut cur, spec).expect("wav writer");
    let scale = ((1i64 << (bits - 1)) - 1) as f32;
    for &s in interleaved {
        let v = (s.clamp(-1.0, 1.0) * scale) as i32;
        match bits {
            16 => w.write_sample(v as i16).expect("sample"),
            _ => w.write_sample(v).expect("sample"),
        }
    }
    w.finalize().expect("finalize");
    cur.into_inner()
}

/// Prints how many times faster than realtime `f` processes `audio_secs`.
fn print_realtime(name: &str, audio_secs: f64, mut f: impl FnMut()) {
    f();
    let runs = 3;
    let start = Instant::now();
    for _ in 0..runs {
        f();
    }
    let per_run = start.elapsed().as_secs_f64() / f64::from(runs);
    eprintln!(
        "{name}: {:.0}× realtime ({:.2} ms per {audio_secs} s of audio)",
        audio_secs / per_run,
        per_run * 1e3
    );
}

fn encode(c: &mut Criterion) {
    let mut group = c.benchmark_group("encode");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(6));
    let config = EncoderConfig::default();
    let cases: Vec<(&str, u32, u16, u16)> = vec![
        ("48k-mono-16bit", 48_000, 1, 16),
        ("44k1-stereo-24bit", 44_100, 2, 24),
        ("16k-mono-16bit", 16_000, 1, 16),
    ];
    for (name, rate, channels, bits) in cases {
        let frames = (rate * CLIP_SECS) as usize;
        let chans: Vec<Vec<f32>> = (0..u32::from(channels))
            .map(|c| speechlike(rate, frames, c))
            .collect();
        let interleaved: Vec<f32> = (0..frames)
            .flat_map(|i| chans.iter().map(move |c| c[i]))
            .collect();
        let wav = wav_bytes(rate, channels, bits, &interleaved);
        print_realtime(
            &format!("encode/{name} (WAV → Ogg Opus)"),
            f64::from(CLIP_SECS),
            || {
                encode_wav(Cursor::new(&wav), std::io::sink(), &config).expect("encode");
            },
        );
        group.throughput(Throughput::Elements(frames as u64));
        group.bench_function(BenchmarkId::new("wav-to-ogg", name), |b| {
            b.iter(|| {
                encode_wav(Cursor::new(black_box(&wav)), std::io::sink(), &config).expect("encode")
            })
        });
        if name == "48k-mono-16bit" {
            group.bench_function(BenchmarkId::new("wav-to-packets", name), |b| {
                b.iter(|| {
                    encode_wav_packets(Cursor::new(black_box(&wav)), &config).expect("encode")
                })
            });
            let pcm: Vec<i16> = interleaved.iter().map(|&s| (s * 32_767.0) as i16).collect();
            group.bench_function(BenchmarkId::new("stream-push-i16-10ms", name), |b| {
                b.iter(|| {
                    let mut enc = StreamEncoder::new(rate, channels, &config).expect("encoder");
                    let mut n = 0usize;
                    for chunk in pcm.chunks(480) {
                        enc.push_i16(chunk).expect("push");
                        while let Some(p) = enc.next_packet() {
                            n += p.data.len();
                        }
                    }
                    n + enc.finish().expect("finish").packets.len()
                })
            });
        }
    }
    group.finish();
}

fn encoded_clip(rate: u32) -> Vec<u8> {
    let frames = (rate * CLIP_SECS) as usize;
    let wav = wav_bytes(rate, 1, 16, &speechlike(rate, frames, 0));
    let mut out = Vec::new();
    encode_wav(Cursor::new(wav), &mut out, &EncoderConfig::default()).expect("encode");
    out
}

fn decode(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(4));
    for (name, rate, out) in [
        ("48k-to-48k", 48_000u32, OutputRate::Original),
        ("16k-to-16k", 16_000, OutputRate::Original),
        ("44k1-to-44k1-resampled", 44_100, OutputRate::Original),
    ] {
        let ogg = encoded_clip(rate);
        print_realtime(&format!("decode/{name}"), f64::from(CLIP_SECS), || {
            decode_ogg_opus_at(Cursor::new(&ogg), out).expect("decode");
        });
        group.throughput(Throughput::Elements(u64::from(rate * CLIP_SECS)));
        group.bench_function(name, |b| {
            b.iter(|| decode_ogg_opus_at(Cursor::new(black_box(&ogg)), out).expect("decode"))
        });
    }
    group.finish();
}

fn ogg_writer(c: &mut Criterion) {
    let rate = 48_000;
    let mut enc = StreamEncoder::new(rate, 1, &EncoderConfig::default()).expect("encoder");
    enc.push_f32(&speechlike(rate, (rate * CLIP_SECS) as usize, 0))
        .expect("push");
    let mut packets = Vec::new();
    while let Some(p) = enc.next_packet() {
        packets.push(p);
    }
    let end = enc.finish().expect("finish");
    packets.extend(end.packets);
    let final_granule = end.summary.final_granule;
    let head = OpusHead {
        channels: 1,
        pre_skip: 312,
        input_sample_rate: rate,
        output_gain: 0,
        mapping_family: 0,
    };
    let tags = OpusTags::with_comments(Vec::new());
    let mut group = c.benchmark_group("ogg-writer");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(3));
    group.throughput(Throughput::Elements(packets.len() as u64));
    for live in [false, true] {
        group.bench_function(
            if live {
                "500-packets-live"
            } else {
                "500-packets"
            },
            |b| {
                b.iter_batched(
                    || packets.clone(),
                    |mut ps| {
                        let last = ps.pop().expect("packets");
                        let mut w =
                            OggOpusWriter::new(Vec::with_capacity(64 << 10), &head, &tags, 1, live)
                                .expect("writer");
                        for p in ps {
                            w.write_packet(p).expect("write");
                        }
                        w.finish(last, final_granule).expect("finish")
                    },
                    criterion::BatchSize::SmallInput,
                )
            },
        );
    }
    group.finish();
}

fn resampler(c: &mut Criterion) {
    let mut group = c.benchmark_group("resample");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(3));
    for (from, to, channels) in [
        (44_100u32, 48_000u32, 1usize),
        (44_100, 48_000, 2),
        (22_050, 24_000, 1),
        (96_000, 48_000, 1),
    ] {
        let frames = (from * CLIP_SECS) as usize;
        let input: Vec<f32> = speechlike(from, frames * channels, 0);
        group.throughput(Throughput::Elements(frames as u64));
        group.bench_function(format!("{from}-to-{to}-{channels}ch"), |b| {
            b.iter(|| {
                let mut r = StreamResampler::new(from, to, channels).expect("resampler");
                let mut n = 0usize;
                let mut sink = |s: &[f32]| {
                    n += s.len();
                    Ok(())
                };
                for block in input.chunks(4096 * channels) {
                    r.process(block, &mut sink).expect("process");
                }
                r.finish(&mut sink).expect("finish");
                n
            })
        });
    }
    group.finish();
}

criterion_group!(benches, encode, decode, ogg_writer, resampler);
criterion_main!(benches);
