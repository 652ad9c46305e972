//! Table-driven bad inputs: each gives its typed error, never a panic, and
//! the file API leaves no output (nor a temporary file) behind.

mod common;

use std::time::Duration;

use common::*;
use ptt_codec::*;

fn valid_wav() -> Vec<u8> {
    hound_wav(spec16(16_000, 1), &speechlike(16_000, 8_000, 0))
}

fn with_fmt(fmt: Fmt, data: Vec<u8>) -> Vec<u8> {
    riff(&[(b"fmt ", fmt.chunk()), (b"data", data)])
}

type Check = fn(&CodecError) -> bool;

#[test]
fn bad_inputs_give_typed_errors_and_no_output() {
    let pcm16 = Fmt::pcm16(16_000, 1);
    let cases: Vec<(&str, Vec<u8>, EncoderConfig, Check)> = vec![
        ("empty file", vec![], EncoderConfig::default(), |e| {
            matches!(e, CodecError::EmptyInput)
        }),
        (
            "text file",
            b"hello, this is not audio at all".to_vec(),
            EncoderConfig::default(),
            |e| matches!(e, CodecError::NotWav),
        ),
        (
            "an Ogg file",
            b"OggS\0\x02\0\0\0\0\0\0\0\0".to_vec(),
            EncoderConfig::default(),
            |e| matches!(e, CodecError::NotWav),
        ),
        (
            "RIFF but not WAVE",
            b"RIFF\x04\0\0\0AVI ".to_vec(),
            EncoderConfig::default(),
            |e| matches!(e, CodecError::NotWav),
        ),
        ("two bytes", b"RI".to_vec(), EncoderConfig::default(), |e| {
            matches!(e, CodecError::TruncatedHeader)
        }),
        (
            "header cut in fmt",
            valid_wav()[..30].to_vec(),
            EncoderConfig::default(),
            |e| matches!(e, CodecError::TruncatedHeader),
        ),
        (
            "no data chunk",
            riff(&[(b"fmt ", pcm16.chunk())]),
            EncoderConfig::default(),
            |e| matches!(e, CodecError::TruncatedHeader),
        ),
        (
            "data before fmt",
            riff(&[(b"data", vec![0; 4]), (b"fmt ", pcm16.chunk())]),
            EncoderConfig::default(),
            |e| matches!(e, CodecError::MalformedWav(_)),
        ),
        (
            "zero channels",
            with_fmt(
                Fmt {
                    channels: 0,
                    ..pcm16
                },
                vec![0; 4],
            ),
            EncoderConfig::default(),
            |e| matches!(e, CodecError::NoChannels),
        ),
        (
            "zero sample rate",
            with_fmt(Fmt { rate: 0, ..pcm16 }, vec![0; 4]),
            EncoderConfig::default(),
            |e| matches!(e, CodecError::UnsupportedSampleRate { rate: 0 }),
        ),
        (
            "4 kHz",
            with_fmt(
                Fmt {
                    rate: 4_000,
                    ..pcm16
                },
                vec![0; 4],
            ),
            EncoderConfig::default(),
            |e| matches!(e, CodecError::UnsupportedSampleRate { rate: 4_000 }),
        ),
        (
            "absurd rate",
            with_fmt(
                Fmt {
                    rate: 3_000_000,
                    ..pcm16
                },
                vec![0; 4],
            ),
            EncoderConfig::default(),
            |e| matches!(e, CodecError::UnsupportedSampleRate { rate: 3_000_000 }),
        ),
        (
            "ADPCM",
            with_fmt(
                Fmt {
                    tag: 2,
                    bits: 4,
                    container: 1,
                    ..pcm16
                },
                vec![0; 4],
            ),
            EncoderConfig::default(),
            |e| matches!(e, CodecError::UnsupportedFormat(_)),
        ),
        (
            "µ-law",
            with_fmt(
                Fmt {
                    tag: 7,
                    bits: 8,
                    container: 1,
                    ..pcm16
                },
                vec![0; 4],
            ),
            EncoderConfig::default(),
            |e| matches!(e, CodecError::UnsupportedFormat(_)),
        ),
        (
            "12-bit PCM",
            with_fmt(Fmt { bits: 12, ..pcm16 }, vec![0; 4]),
            EncoderConfig::default(),
            |e| matches!(e, CodecError::UnsupportedFormat(_)),
        ),
        (
            "12 valid bits in 16 (extensible)",
            with_fmt(
                Fmt {
                    extensible: Some((12, SUBTYPE_PCM)),
                    ..pcm16
                },
                vec![0; 4],
            ),
            EncoderConfig::default(),
            |e| matches!(e, CodecError::UnsupportedFormat(_)),
        ),
        (
            "64-bit float",
            with_fmt(
                Fmt {
                    tag: 3,
                    bits: 64,
                    container: 8,
                    ..pcm16
                },
                vec![0; 16],
            ),
            EncoderConfig::default(),
            |e| matches!(e, CodecError::UnsupportedFormat(_)),
        ),
        (
            "no samples",
            with_fmt(pcm16, vec![]),
            EncoderConfig::default(),
            |e| matches!(e, CodecError::NoSamples),
        ),
        (
            "half a sample",
            with_fmt(pcm16, vec![0; 3]),
            EncoderConfig::default(),
            |e| matches!(e, CodecError::MalformedWav(_)),
        ),
        (
            "longer than the maximum",
            valid_wav(),
            EncoderConfig {
                max_duration: Some(Duration::from_millis(400)),
                ..Default::default()
            },
            |e| matches!(e, CodecError::TooLong { .. }),
        ),
        (
            "truncated data, refused",
            {
                let mut w = valid_wav();
                let n = w.len();
                w.truncate(n - 1000);
                w
            },
            EncoderConfig {
                truncated: TruncatedPolicy::Refuse,
                ..Default::default()
            },
            |e| {
                matches!(
                    e,
                    CodecError::TruncatedData {
                        expected: 8_000,
                        actual: 7_500
                    }
                )
            },
        ),
        (
            "data chunk claims everything, holds nothing",
            {
                let mut w = with_fmt(pcm16, vec![]);
                let n = w.len();
                w[n - 4..].copy_from_slice(&1_000_000u32.to_le_bytes());
                w
            },
            EncoderConfig::default(),
            |e| matches!(e, CodecError::NoSamples),
        ),
        (
            "bitrate too high",
            valid_wav(),
            EncoderConfig {
                bitrate: 300_000,
                ..Default::default()
            },
            |e| matches!(e, CodecError::InvalidConfig(_)),
        ),
        (
            "complexity 11",
            valid_wav(),
            EncoderConfig {
                complexity: 11,
                ..Default::default()
            },
            |e| matches!(e, CodecError::InvalidConfig(_)),
        ),
        (
            "loss 101 %",
            valid_wav(),
            EncoderConfig {
                fec_expected_loss: Some(101),
                ..Default::default()
            },
            |e| matches!(e, CodecError::InvalidConfig(_)),
        ),
    ];

    let dir = tempfile::tempdir().unwrap();
    for (name, bytes, config, expected) in cases {
        let input = dir.path().join("in.wav");
        std::fs::write(&input, &bytes).unwrap();
        let out_dir = dir.path().join("out");
        std::fs::create_dir_all(&out_dir).unwrap();
        let output = out_dir.join("clip.opus");

        let err = encode_wav_file(&input, &output, &config).expect_err(name);
        assert!(expected(&err), "{name}: unexpected error {err:?}");
        assert!(!err.to_string().is_empty());
        let left: Vec<_> = std::fs::read_dir(&out_dir).unwrap().collect();
        assert!(left.is_empty(), "{name}: output left behind: {left:?}");

        // The in-memory APIs agree.
        let err2 = encode_wav_packets(std::io::Cursor::new(&bytes), &config).expect_err(name);
        assert_eq!(err.to_string(), err2.to_string(), "{name}");
    }
}

#[test]
fn a_failing_writer_leaves_no_file_and_an_existing_output_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("clip.opus");
    std::fs::write(&output, b"previous clip").unwrap();
    let input = dir.path().join("in.wav");
    std::fs::write(&input, b"not a wav").unwrap();
    assert!(encode_wav_file(&input, &output, &EncoderConfig::default()).is_err());
    assert_eq!(std::fs::read(&output).unwrap(), b"previous clip");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
}

#[test]
fn bad_opus_streams_give_typed_errors() {
    use std::io::Cursor;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", vec![]),
        ("not ogg", b"RIFF....WAVEfmt ".to_vec()),
        ("ogg without OpusHead", {
            let mut v = Vec::new();
            let mut w = ogg::writing::PacketWriter::new(&mut v);
            w.write_packet(
                b"vorbis stuff".to_vec(),
                1,
                ogg::writing::PacketWriteEndInfo::EndStream,
                0,
            )
            .unwrap();
            v
        }),
    ];
    for (name, bytes) in cases {
        let e = decode_ogg_opus(Cursor::new(bytes)).expect_err(name);
        assert!(
            matches!(
                e,
                CodecError::InvalidOpusStream(_) | CodecError::Ogg(_) | CodecError::Io(_)
            ),
            "{name}: {e:?}"
        );
    }
    // A stream cut in the middle decodes what is there.
    let mut ogg = Cursor::new(Vec::new());
    encode_wav(
        Cursor::new(valid_wav()),
        &mut ogg,
        &EncoderConfig::default(),
    )
    .unwrap();
    let mut bytes = ogg.into_inner();
    bytes.truncate(bytes.len() * 2 / 3);
    let _ = decode_ogg_opus(Cursor::new(bytes));
    // Random garbage never panics the packet decoder.
    let mut dec = PacketDecoder::new(48_000, 1).unwrap();
    for len in [1usize, 2, 3, 50, 1500] {
        let garbage: Vec<u8> = (0..len).map(|i| (i * 37 % 251) as u8).collect();
        let _ = dec.decode(Some(&garbage), None);
    }
}

/// A small deterministic generator for the mutation tests.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 33
    }
}

#[test]
fn mutated_wav_headers_never_panic() {
    let pcm = speechlike(16_000, 400, 0);
    let seeds: Vec<Vec<u8>> = vec![
        hound_wav(spec16(16_000, 1), &pcm),
        hound_wav(
            hound::WavSpec {
                channels: 2,
                sample_rate: 44_100,
                bits_per_sample: 24,
                sample_format: hound::SampleFormat::Int,
            },
            &pcm,
        ),
        riff(&[
            (
                b"fmt ",
                Fmt {
                    extensible: Some((24, SUBTYPE_PCM)),
                    container: 4,
                    bits: 32,
                    ..Fmt::pcm16(48_000, 2)
                }
                .chunk(),
            ),
            (b"LIST", vec![0; 10]),
            (b"data", int_bytes(&pcm, 4, 24, true)),
        ]),
        // 32-bit float at 44.1 kHz: mutated data bytes become NaN, infinities
        // and huge values, which must not upset the resampler.
        riff(&[
            (
                b"fmt ",
                Fmt {
                    tag: 3,
                    container: 4,
                    bits: 32,
                    ..Fmt::pcm16(44_100, 1)
                }
                .chunk(),
            ),
            (b"data", pcm.iter().flat_map(|s| s.to_le_bytes()).collect()),
        ]),
    ];
    let config = EncoderConfig {
        max_duration: Some(Duration::from_secs(5)),
        ..Default::default()
    };
    let mut rng = Lcg(42);
    let mut errors = 0;
    for i in 0..3_000 {
        let mut bytes = seeds[i % seeds.len()].clone();
        // Mostly the header; every fourth case anywhere in the file.
        let header = if i % 4 == 3 {
            bytes.len()
        } else {
            bytes.len().min(96)
        };
        for _ in 0..1 + rng.next() % 4 {
            let pos = (rng.next() as usize) % header;
            bytes[pos] = match rng.next() % 3 {
                0 => rng.next() as u8,
                1 => 0,
                _ => 0xFF,
            };
        }
        if rng.next().is_multiple_of(4) {
            let cut = (rng.next() as usize) % bytes.len();
            bytes.truncate(cut);
        }
        if encode_wav_packets(std::io::Cursor::new(bytes), &config).is_err() {
            errors += 1;
        }
    }
    assert!(
        errors > 100,
        "the mutations should break most headers ({errors})"
    );
}

#[test]
fn mutated_ogg_streams_never_panic() {
    let mut ogg = std::io::Cursor::new(Vec::new());
    encode_wav(
        std::io::Cursor::new(valid_wav()),
        &mut ogg,
        &EncoderConfig::default(),
    )
    .unwrap();
    let valid = ogg.into_inner();
    let mut rng = Lcg(7);
    for _ in 0..500 {
        let mut bytes = valid.clone();
        for _ in 0..1 + rng.next() % 8 {
            let pos = (rng.next() as usize) % bytes.len();
            bytes[pos] = rng.next() as u8;
        }
        let _ = decode_ogg_opus(std::io::Cursor::new(bytes));
    }
}
