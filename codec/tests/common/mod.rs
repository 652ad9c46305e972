//! Shared helpers for the integration tests: test signals, WAV builders
//! (hound for what it writes, raw bytes for the rest) and measurements.
#![allow(dead_code)]

use std::io::Cursor;
use std::path::PathBuf;

/// The committed speech fixture (16 kHz mono 16-bit, ~9 s of espeak-ng).
pub fn fixture_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/speech.wav")
}

/// The fixture's samples.
pub fn fixture_samples() -> (u32, Vec<i16>) {
    let mut r = hound::WavReader::open(fixture_path()).expect("fixture");
    let rate = r.spec().sample_rate;
    let s = r.samples::<i16>().map(|s| s.unwrap()).collect();
    (rate, s)
}

/// A voiced, speech-like signal (gliding 100–180 Hz pitch, harmonics shaped
/// by two formants, 4 Hz syllable envelope), defined in continuous time so it
/// can be sampled at any rate. `seed` changes pitch and formants so two
/// channels can carry different content.
pub fn speechlike(rate: u32, frames: usize, seed: u32) -> Vec<f32> {
    let s = seed as f32;
    let f1 = 500.0 + 150.0 * s;
    let f2 = 1500.0 + 400.0 * s;
    let mut phase = 0.0f64;
    (0..frames)
        .map(|i| {
            let t = i as f64 / f64::from(rate);
            let f0 = 140.0 + 40.0 * (t * 0.7 + f64::from(s)).sin() + 10.0 * s as f64;
            phase += f0 / f64::from(rate);
            let mut v = 0.0f32;
            let mut h = 1;
            while (h as f64) * f0 < 3_800.0 {
                let fh = (h as f64 * f0) as f32;
                let a = 1.0 / (1.0 + ((fh - f1) / 150.0).powi(2))
                    + 0.5 / (1.0 + ((fh - f2) / 200.0).powi(2))
                    + 0.05;
                v += a * ((std::f64::consts::TAU * phase * h as f64).sin() as f32);
                h += 1;
            }
            let env = 0.5 - 0.45 * ((std::f64::consts::TAU * 4.0 * t + f64::from(s)).cos() as f32);
            v * env * 0.2
        })
        .collect()
}

/// Interleaves channels of equal length.
pub fn interleave(channels: &[Vec<f32>]) -> Vec<f32> {
    let n = channels[0].len();
    let mut out = Vec::with_capacity(n * channels.len());
    for i in 0..n {
        for c in channels {
            out.push(c[i]);
        }
    }
    out
}

/// Averages interleaved frames to mono.
pub fn downmix(interleaved: &[f32], channels: usize) -> Vec<f32> {
    interleaved
        .chunks_exact(channels)
        .map(|f| f.iter().sum::<f32>() / channels as f32)
        .collect()
}

/// Pearson correlation of two equally long signals (at lag 0).
pub fn correlation(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "signals differ in length");
    let n = a.len() as f64;
    let ma = a.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
    let mb = b.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
    let (mut sab, mut saa, mut sbb) = (0.0, 0.0, 0.0);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (f64::from(x) - ma, f64::from(y) - mb);
        sab += x * y;
        saa += x * x;
        sbb += y * y;
    }
    sab / (saa * sbb).sqrt().max(1e-12)
}

/// Builds a WAV with hound.
pub fn hound_wav(spec: hound::WavSpec, interleaved: &[f32]) -> Vec<u8> {
    let mut cur = Cursor::new(Vec::new());
    let mut w = hound::WavWriter::new(&mut cur, spec).unwrap();
    match (spec.sample_format, spec.bits_per_sample) {
        (hound::SampleFormat::Float, _) => {
            for &s in interleaved {
                w.write_sample(s).unwrap();
            }
        }
        (_, 8) => {
            for &s in interleaved {
                w.write_sample((s * 127.0).round() as i8).unwrap();
            }
        }
        (_, 16) => {
            for &s in interleaved {
                w.write_sample((s * 32_767.0).round() as i16).unwrap();
            }
        }
        (_, bits) => {
            let scale = (1i64 << (bits - 1)) as f32 - 1.0;
            for &s in interleaved {
                w.write_sample((f64::from(s) * f64::from(scale)).round() as i32)
                    .unwrap();
            }
        }
    }
    w.finalize().unwrap();
    cur.into_inner()
}

/// A 16-bit integer PCM spec.
pub fn spec16(rate: u32, channels: u16) -> hound::WavSpec {
    hound::WavSpec {
        channels,
        sample_rate: rate,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    }
}

/// KSDATAFORMAT_SUBTYPE_PCM.
pub const SUBTYPE_PCM: [u8; 16] = [
    0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x10, 0x00, 0x80, 0x00, 0x00, 0xaa, 0x00, 0x38, 0x9b, 0x71,
];
/// KSDATAFORMAT_SUBTYPE_IEEE_FLOAT.
pub const SUBTYPE_FLOAT: [u8; 16] = [
    0x03, 0x00, 0x00, 0x00, 0x00, 0x00, 0x10, 0x00, 0x80, 0x00, 0x00, 0xaa, 0x00, 0x38, 0x9b, 0x71,
];

/// The fields of a hand-built fmt chunk.
#[derive(Clone, Copy)]
pub struct Fmt {
    pub tag: u16,
    pub channels: u16,
    pub rate: u32,
    /// Bytes per sample in the file.
    pub container: u16,
    /// wBitsPerSample.
    pub bits: u16,
    /// For WAVE_FORMAT_EXTENSIBLE: valid bits and sub-format.
    pub extensible: Option<(u16, [u8; 16])>,
}

impl Fmt {
    pub fn pcm16(rate: u32, channels: u16) -> Self {
        Fmt {
            tag: 1,
            channels,
            rate,
            container: 2,
            bits: 16,
            extensible: None,
        }
    }

    pub fn chunk(&self) -> Vec<u8> {
        let block = self.channels * self.container;
        let mut b = Vec::new();
        let ext = self.extensible.is_some();
        b.extend_from_slice(&(if ext { 0xFFFEu16 } else { self.tag }).to_le_bytes());
        b.extend_from_slice(&self.channels.to_le_bytes());
        b.extend_from_slice(&self.rate.to_le_bytes());
        b.extend_from_slice(&(self.rate * u32::from(block)).to_le_bytes());
        b.extend_from_slice(&block.to_le_bytes());
        b.extend_from_slice(&self.bits.to_le_bytes());
        if let Some((valid, sub)) = self.extensible {
            b.extend_from_slice(&22u16.to_le_bytes());
            b.extend_from_slice(&valid.to_le_bytes());
            b.extend_from_slice(&0u32.to_le_bytes());
            b.extend_from_slice(&sub);
        } else if self.tag != 1 {
            b.extend_from_slice(&0u16.to_le_bytes());
        }
        b
    }
}

/// Assembles a RIFF/WAVE file from chunks (id, body), padding odd bodies.
pub fn riff(chunks: &[(&[u8; 4], Vec<u8>)]) -> Vec<u8> {
    let mut body = b"WAVE".to_vec();
    for (id, data) in chunks {
        body.extend_from_slice(*id);
        body.extend_from_slice(&(data.len() as u32).to_le_bytes());
        body.extend_from_slice(data);
        if data.len() % 2 == 1 {
            body.push(0);
        }
    }
    let mut out = b"RIFF".to_vec();
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend(body);
    out
}

/// Little-endian integer samples of `bytes` bytes each, left-justified
/// (`shift` = container bits − valid bits).
pub fn int_bytes(
    interleaved: &[f32],
    bytes: usize,
    valid_bits: u32,
    left_justified: bool,
) -> Vec<u8> {
    let scale = (1i64 << (valid_bits - 1)) as f64 - 1.0;
    let shift = if left_justified {
        bytes as u32 * 8 - valid_bits
    } else {
        0
    };
    let mut out = Vec::with_capacity(interleaved.len() * bytes);
    for &s in interleaved {
        let v = ((f64::from(s) * scale).round() as i64) << shift;
        out.extend_from_slice(&v.to_le_bytes()[..bytes]);
    }
    out
}

/// A program on PATH, or `None`; fails the test when it is missing unless
/// `PTT_SKIP_EXTERNAL_DECODERS=1`.
pub fn external_tool(name: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    });
    match found {
        Some(p) => Some(p),
        None if std::env::var("PTT_SKIP_EXTERNAL_DECODERS").as_deref() == Ok("1") => {
            eprintln!("skipping: {name} not installed and PTT_SKIP_EXTERNAL_DECODERS=1");
            None
        }
        None => panic!(
            "{name} is not installed: run `./dev.sh setup` (it installs opus-tools and ffmpeg) \
             or set PTT_SKIP_EXTERNAL_DECODERS=1 to skip the real-decoder checks"
        ),
    }
}
