//! Every WAV variant the codec reads, generated here (hound where it can
//! write the format, raw bytes for the rest), encoded and decoded back: the
//! length must match to the sample and the signal must survive.

mod common;

use std::io::Cursor;

use common::*;
use ptt_codec::*;

/// Encodes a WAV, decodes it at the original rate and checks length and
/// correlation with the mono downmix of `interleaved`.
fn check(
    name: &str,
    wav: Vec<u8>,
    rate: u32,
    channels: usize,
    interleaved: &[f32],
) -> EncodeSummary {
    let config = EncoderConfig {
        bitrate: 32_000,
        ..Default::default()
    };
    let mut ogg = Cursor::new(Vec::new());
    let summary =
        encode_wav(Cursor::new(wav), &mut ogg, &config).unwrap_or_else(|e| panic!("{name}: {e}"));
    let frames = interleaved.len() / channels;
    assert_eq!(summary.input_rate, rate, "{name}");
    assert_eq!(summary.input_channels as usize, channels, "{name}");
    assert_eq!(summary.input_frames as usize, frames, "{name}");
    ogg.set_position(0);
    let decoded = decode_ogg_opus(ogg).unwrap();
    assert_eq!(decoded.sample_rate, rate, "{name}");
    if rate <= 48_000 {
        assert_eq!(decoded.frames(), frames, "{name}: length");
    } else {
        assert!(
            decoded.frames().abs_diff(frames) < (rate / 48_000) as usize,
            "{name}"
        );
    }
    let mono = downmix(interleaved, channels);
    let n = mono.len().min(decoded.frames());
    // A misread format (wrong width, sign, endianness or justification)
    // gives noise or a wrong level; a right one gives the signal back. The
    // fidelity threshold for speech is in round_trip.rs; several different
    // voices mixed together code less cleanly, hence 0.8 here.
    let c = correlation(&mono[..n], &decoded.samples[..n]);
    assert!(c > 0.8, "{name}: correlation {c}");
    let rms =
        |x: &[f32]| (x.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>() / x.len() as f64).sqrt();
    let level = rms(&decoded.samples[..n]) / rms(&mono[..n]);
    assert!((0.8..1.25).contains(&level), "{name}: level ratio {level}");
    summary
}

fn signal(rate: u32, channels: usize, secs: f32) -> Vec<f32> {
    let frames = (rate as f32 * secs) as usize;
    let chans: Vec<Vec<f32>> = (0..channels as u32)
        .map(|c| speechlike(rate, frames, c))
        .collect();
    interleave(&chans)
}

fn int_spec(rate: u32, channels: u16, bits: u16) -> hound::WavSpec {
    hound::WavSpec {
        channels,
        sample_rate: rate,
        bits_per_sample: bits,
        sample_format: hound::SampleFormat::Int,
    }
}

#[test]
fn integer_pcm_of_every_width() {
    for (bits, rate, channels) in [
        (8u16, 8_000u32, 1u16),
        (16, 16_000, 2),
        (24, 44_100, 2),
        (32, 48_000, 1),
    ] {
        let pcm = signal(rate, channels as usize, 0.6);
        let wav = hound_wav(int_spec(rate, channels, bits), &pcm);
        check(&format!("{bits}-bit"), wav, rate, channels as usize, &pcm);
    }
}

#[test]
fn float_pcm() {
    let pcm = signal(22_050, 1, 0.6);
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: 22_050,
        bits_per_sample: 32,
        sample_format: hound::SampleFormat::Float,
    };
    check("f32", hound_wav(spec, &pcm), 22_050, 1, &pcm);
}

#[test]
fn wave_format_extensible() {
    // PCM 16-bit stereo.
    let pcm = signal(48_000, 2, 0.5);
    let fmt = Fmt {
        tag: 1,
        channels: 2,
        rate: 48_000,
        container: 2,
        bits: 16,
        extensible: Some((16, SUBTYPE_PCM)),
    };
    let wav = riff(&[
        (b"fmt ", fmt.chunk()),
        (b"data", int_bytes(&pcm, 2, 16, true)),
    ]);
    check("extensible 16", wav, 48_000, 2, &pcm);

    // 24 valid bits in 32-bit containers, left-justified as the format specifies.
    let pcm = signal(44_100, 2, 0.5);
    let fmt = Fmt {
        tag: 1,
        channels: 2,
        rate: 44_100,
        container: 4,
        bits: 32,
        extensible: Some((24, SUBTYPE_PCM)),
    };
    let wav = riff(&[
        (b"fmt ", fmt.chunk()),
        (b"data", int_bytes(&pcm, 4, 24, true)),
    ]);
    check("24-in-32 left-justified", wav, 44_100, 2, &pcm);

    // The same, right-justified as some writers (hound among them) store it.
    let wav = riff(&[
        (b"fmt ", fmt.chunk()),
        (b"data", int_bytes(&pcm, 4, 24, false)),
    ]);
    let s = check("24-in-32 right-justified", wav, 44_100, 2, &pcm);
    assert!(s.waveform.contains(&31));

    // Float sub-format at 96 kHz.
    let pcm = signal(96_000, 1, 0.3);
    let fmt = Fmt {
        tag: 3,
        channels: 1,
        rate: 96_000,
        container: 4,
        bits: 32,
        extensible: Some((32, SUBTYPE_FLOAT)),
    };
    let data: Vec<u8> = pcm.iter().flat_map(|s| s.to_le_bytes()).collect();
    check(
        "extensible float",
        riff(&[(b"fmt ", fmt.chunk()), (b"data", data)]),
        96_000,
        1,
        &pcm,
    );
}

#[test]
fn many_channels_and_extreme_rates() {
    // 5.1 at 48 kHz, downmixed.
    let pcm = signal(48_000, 6, 0.4);
    check(
        "6 channels",
        hound_wav(spec16(48_000, 6), &pcm),
        48_000,
        6,
        &pcm,
    );
    for rate in [8_000u32, 11_025, 12_000, 24_000, 32_000, 192_000] {
        let pcm = signal(rate, 1, 0.4);
        check(
            &format!("{rate} Hz"),
            hound_wav(spec16(rate, 1), &pcm),
            rate,
            1,
            &pcm,
        );
    }
}

#[test]
fn extra_chunks_before_and_after_the_data() {
    let pcm = signal(16_000, 1, 0.5);
    let mut list = b"INFO".to_vec();
    list.extend_from_slice(b"INAM");
    list.extend_from_slice(&6u32.to_le_bytes());
    list.extend_from_slice(b"hello\0");
    let data = int_bytes(&pcm, 2, 16, false);
    let fmt = Fmt::pcm16(16_000, 1).chunk();
    let cases = [
        (
            "LIST before",
            riff(&[
                (b"fmt ", fmt.clone()),
                (b"LIST", list.clone()),
                (b"data", data.clone()),
            ]),
        ),
        (
            "LIST after",
            riff(&[
                (b"fmt ", fmt.clone()),
                (b"data", data.clone()),
                (b"LIST", list.clone()),
            ]),
        ),
        (
            "junk, bext and fact chunks",
            riff(&[
                (b"JUNK", vec![0; 28]),
                (b"fmt ", fmt.clone()),
                (b"bext", vec![7; 602]),
                (b"fact", (pcm.len() as u32).to_le_bytes().to_vec()),
                (b"data", data.clone()),
                (b"id3 ", vec![1; 10]),
            ]),
        ),
    ];
    for (name, wav) in cases {
        check(name, wav, 16_000, 1, &pcm);
    }
}

#[test]
fn the_committed_speech_fixture() {
    let (rate, samples) = fixture_samples();
    assert_eq!(rate, 16_000);
    let secs = samples.len() as f64 / f64::from(rate);
    assert!((6.0..12.0).contains(&secs), "{secs} s");
    let pcm: Vec<f32> = samples.iter().map(|&s| f32::from(s) / 32_768.0).collect();
    check(
        "speech.wav",
        std::fs::read(fixture_path()).unwrap(),
        rate,
        1,
        &pcm,
    );
}

#[test]
fn truncated_data_is_encoded_up_to_the_end_with_a_warning() {
    // A recorder that crashed: the data chunk announces 2 s, the file holds 0.5 s.
    let pcm = signal(16_000, 1, 0.5);
    let mut wav = riff(&[
        (b"fmt ", Fmt::pcm16(16_000, 1).chunk()),
        (b"data", int_bytes(&pcm, 2, 16, false)),
    ]);
    let data_len_pos = wav.len() - pcm.len() * 2 - 4;
    wav[data_len_pos..data_len_pos + 4].copy_from_slice(&64_000u32.to_le_bytes());
    // A half sample at the end is dropped too.
    wav.push(0x55);
    let summary = check("truncated", wav, 16_000, 1, &pcm);
    assert_eq!(
        summary.warnings,
        vec![Warning::TruncatedData {
            expected: 32_000,
            actual: 8_000
        }]
    );
}

#[test]
fn test_signals_do_not_clip() {
    for seed in 0..6 {
        for rate in [8_000u32, 44_100, 48_000] {
            let peak = speechlike(rate, rate as usize, seed)
                .iter()
                .fold(0.0f32, |m, s| m.max(s.abs()));
            assert!(
                peak < 0.95 && peak > 0.2,
                "seed {seed} at {rate} Hz: peak {peak}"
            );
        }
    }
}
