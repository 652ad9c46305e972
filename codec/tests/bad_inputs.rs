//! Table-driven bad inputs: each gives its typed error, never a panic, and
//! the file API leaves no output (nor a temporary file) behind.

mod common;

use std::io::Cursor;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
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
        let err2 = encode_wav_packets(Cursor::new(&bytes), &config).expect_err(name);
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
        if encode_wav_packets(Cursor::new(bytes), &config).is_err() {
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
    let mut ogg = Cursor::new(Vec::new());
    encode_wav(
        Cursor::new(valid_wav()),
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
        let _ = decode_ogg_opus(Cursor::new(bytes));
    }
}

/// The OpusHead every hostile-header case starts from: mono, 48 kHz.
fn opus_head() -> OpusHead {
    OpusHead {
        channels: 1,
        pre_skip: 312,
        input_sample_rate: 48_000,
        output_gain: 0,
        mapping_family: 0,
    }
}

/// A real Ogg Opus stream (half a second of speech-like audio) with `head`
/// as its OpusHead.
fn ogg_with_head(head: OpusHead) -> Vec<u8> {
    let mut enc = StreamEncoder::new(48_000, 1, &EncoderConfig::default()).unwrap();
    enc.push_f32(&speechlike(48_000, 24_000, 0)).unwrap();
    let end = enc.finish().unwrap();
    let tags = OpusTags::with_comments(Vec::new());
    let mut w = OggOpusWriter::new(Vec::new(), &head, &tags, 7, false).unwrap();
    let mut packets = end.packets;
    let last = packets.pop().unwrap();
    for p in packets {
        w.write_packet(p).unwrap();
    }
    w.finish(last, end.summary.final_granule).unwrap()
}

/// Ogg pages from raw packets, each ending its page, the last one ending the
/// stream with `final_granule`: for headers and packets the encoder would
/// never write.
fn raw_ogg(packets: Vec<Vec<u8>>, final_granule: u64) -> Vec<u8> {
    use ogg::writing::{PacketWriteEndInfo, PacketWriter};
    let mut out = Vec::new();
    let mut w = PacketWriter::new(&mut out);
    let n = packets.len();
    for (i, p) in packets.into_iter().enumerate() {
        let (info, granule) = if i + 1 == n {
            (PacketWriteEndInfo::EndStream, final_granule)
        } else {
            (PacketWriteEndInfo::EndPage, 0)
        };
        w.write_packet(p, 7, info, granule).unwrap();
    }
    out
}

/// An OpusTags packet from a vendor string and raw comments.
fn tags_bytes(vendor_len: u32, vendor: &[u8], count: u32, comments: &[&[u8]]) -> Vec<u8> {
    let mut b = b"OpusTags".to_vec();
    b.extend_from_slice(&vendor_len.to_le_bytes());
    b.extend_from_slice(vendor);
    b.extend_from_slice(&count.to_le_bytes());
    for c in comments {
        b.extend_from_slice(&(c.len() as u32).to_le_bytes());
        b.extend_from_slice(c);
    }
    b
}

/// 120 ms of silence in two bytes: SILK narrowband 60 ms (config 3), code 3
/// with two zero-length frames (each decodes as concealment).
const SILENT_120MS: [u8; 2] = [0x1B, 0x02];

/// Issue #9: an OpusHead declaring an input rate of 3,000,000,000 Hz used to
/// abort the process ("memory allocation of 12162000000 bytes failed") while
/// resampling back to that rate. Now the header is refused when parsed, at
/// every output rate and by `inspect_ogg_opus`.
#[test]
fn an_input_rate_of_3_ghz_is_a_typed_error_not_an_abort() {
    let ogg = ogg_with_head(OpusHead {
        input_sample_rate: 3_000_000_000,
        ..opus_head()
    });
    let e = decode_ogg_opus(Cursor::new(&ogg)).expect_err("3 GHz input rate");
    assert!(
        matches!(
            e,
            CodecError::InvalidInputRate {
                rate: 3_000_000_000
            }
        ),
        "{e:?}"
    );
    assert!(e.to_string().contains("3000000000 Hz"), "{e}");
    for rate in [OutputRate::Native48k, OutputRate::Opus(16_000)] {
        let e = decode_ogg_opus_at(Cursor::new(&ogg), rate).expect_err("3 GHz");
        assert!(matches!(e, CodecError::InvalidInputRate { .. }), "{e:?}");
    }
    let e = inspect_ogg_opus(Cursor::new(&ogg)).expect_err("3 GHz");
    assert!(matches!(e, CodecError::InvalidInputRate { .. }), "{e:?}");
}

#[test]
fn input_rates_outside_8_to_192_khz_are_refused_and_0_means_unknown() {
    for rate in [1, 7_999, 192_001, u32::MAX] {
        let ogg = ogg_with_head(OpusHead {
            input_sample_rate: rate,
            ..opus_head()
        });
        let e = decode_ogg_opus(Cursor::new(&ogg)).expect_err("bad rate");
        assert!(
            matches!(e, CodecError::InvalidInputRate { rate: r } if r == rate),
            "{rate}: {e:?}"
        );
    }
    // The bounds themselves decode, at the original rate; 0 decodes at 48 kHz.
    for (declared, output) in [(8_000, 8_000), (192_000, 192_000), (0, 48_000)] {
        let ogg = ogg_with_head(OpusHead {
            input_sample_rate: declared,
            ..opus_head()
        });
        let audio = decode_ogg_opus(Cursor::new(&ogg)).unwrap();
        assert_eq!(audio.sample_rate, output, "{declared}");
        assert_eq!(
            audio.frames() as u64,
            24_000 * u64::from(output) / 48_000,
            "{declared}"
        );
    }
}

#[test]
fn channel_layouts_other_than_mono_and_stereo_are_refused() {
    for (channels, mapping_family) in [(0, 0), (3, 0), (255, 0), (2, 1), (1, 255), (0, 1)] {
        let ogg = ogg_with_head(OpusHead {
            channels,
            mapping_family,
            ..opus_head()
        });
        let e = decode_ogg_opus(Cursor::new(&ogg)).expect_err("layout");
        assert!(
            matches!(
                e,
                CodecError::UnsupportedChannelLayout { channels: c, mapping_family: f }
                    if (c, f) == (channels, mapping_family)
            ),
            "{channels} channels, family {mapping_family}: {e:?}"
        );
    }
}

#[test]
fn an_incompatible_opus_head_version_is_refused() {
    let mut head = opus_head().to_bytes();
    head[8] = 0x10;
    let tags = OpusTags::with_comments(Vec::new()).to_bytes();
    let ogg = raw_ogg(
        vec![head.clone(), tags.clone(), SILENT_120MS.to_vec()],
        5_760,
    );
    let e = decode_ogg_opus(Cursor::new(ogg)).expect_err("version 16");
    assert!(
        matches!(e, CodecError::UnsupportedOpusVersion { version: 0x10 }),
        "{e:?}"
    );
    // A later minor version (1 to 15) with extra bytes is read.
    head[8] = 0x0F;
    head.extend_from_slice(&[0xAB; 8]);
    let ogg = raw_ogg(vec![head, tags, SILENT_120MS.to_vec()], 5_760);
    assert_eq!(
        decode_ogg_opus(Cursor::new(ogg)).unwrap().frames(),
        5_760 - 312
    );
}

#[test]
fn a_pre_skip_longer_than_the_stream_is_refused() {
    // Half a second: the end granule is 312 + 24,000, less than 65,535.
    let ogg = ogg_with_head(OpusHead {
        pre_skip: u16::MAX,
        ..opus_head()
    });
    let e = decode_ogg_opus(Cursor::new(ogg)).expect_err("pre-skip");
    assert!(
        matches!(
            e,
            CodecError::PreSkipBeyondEnd {
                pre_skip: u16::MAX,
                available: 24_312
            }
        ),
        "{e:?}"
    );
    // An end granule position below the pre-skip.
    let head = opus_head().to_bytes();
    let tags = OpusTags::with_comments(Vec::new()).to_bytes();
    let ogg = raw_ogg(vec![head.clone(), tags.clone(), SILENT_120MS.to_vec()], 100);
    let e = decode_ogg_opus(Cursor::new(ogg)).expect_err("granule");
    assert!(
        matches!(
            e,
            CodecError::PreSkipBeyondEnd {
                pre_skip: 312,
                available: 100
            }
        ),
        "{e:?}"
    );
    // Equal: nothing left, but a valid (empty) clip.
    let ogg = raw_ogg(vec![head, tags, SILENT_120MS.to_vec()], 312);
    assert_eq!(decode_ogg_opus(Cursor::new(ogg)).unwrap().frames(), 0);
}

#[test]
fn granule_positions_only_trim_the_end() {
    // An end granule beyond the audio cannot make the clip longer than what
    // decoded, nor size anything; -1 (no granule) keeps everything.
    let head = opus_head().to_bytes();
    let tags = OpusTags::with_comments(Vec::new()).to_bytes();
    for granule in [5_760 * 2, u64::MAX - 1, u64::MAX] {
        let ogg = raw_ogg(
            vec![
                head.clone(),
                tags.clone(),
                SILENT_120MS.to_vec(),
                SILENT_120MS.to_vec(),
            ],
            granule,
        );
        let audio = decode_ogg_opus(Cursor::new(ogg)).unwrap();
        assert_eq!(audio.frames(), 2 * 5_760 - 312, "{granule}");
    }
}

#[test]
fn any_output_gain_decodes_to_finite_audio() {
    // The full Q7.8 range (-128 to +128 dB) is accepted: libopus applies it
    // as a float factor, so the output is loud or quiet but finite.
    for gain in [i16::MIN, -1, i16::MAX] {
        let ogg = ogg_with_head(OpusHead {
            output_gain: gain,
            ..opus_head()
        });
        for rate in [OutputRate::Native48k, OutputRate::Opus(16_000)] {
            let audio = decode_ogg_opus_at(Cursor::new(&ogg), rate).unwrap();
            assert!(audio.samples.iter().all(|s| s.is_finite()), "{gain}");
            assert!(audio.waveform(100).iter().all(|&b| b <= 31));
        }
        let mut wav = Cursor::new(Vec::new());
        decode_ogg_opus(Cursor::new(&ogg))
            .unwrap()
            .write_wav(&mut wav)
            .unwrap();
    }
}

#[test]
fn opus_tags_lengths_and_counts_are_checked() {
    let head = opus_head().to_bytes();
    let decode = |tags: Vec<u8>| {
        decode_ogg_opus(Cursor::new(raw_ogg(
            vec![head.clone(), tags, SILENT_120MS.to_vec()],
            5_760,
        )))
    };
    type TagsCheck = fn(&CodecError) -> bool;
    let cases: Vec<(&str, Vec<u8>, TagsCheck)> = vec![
        (
            "vendor length 4 GiB",
            tags_bytes(u32::MAX, b"ptt", 0, &[]),
            |e| matches!(e, CodecError::MalformedOpusTags(_)),
        ),
        (
            "vendor one byte past the end",
            {
                let mut t = tags_bytes(3, b"ptt", 0, &[]);
                t.truncate(t.len() - 4);
                t[8..12].copy_from_slice(&4u32.to_le_bytes());
                t
            },
            |e| matches!(e, CodecError::MalformedOpusTags(_)),
        ),
        ("no comment count", b"OpusTags\0\0\0\0".to_vec(), |e| {
            matches!(e, CodecError::MalformedOpusTags(_))
        }),
        (
            "4 billion comments",
            tags_bytes(3, b"ptt", u32::MAX, &[]),
            |e| {
                matches!(
                    e,
                    CodecError::TooManyComments {
                        count: u32::MAX,
                        max: MAX_COMMENTS
                    }
                )
            },
        ),
        (
            "more comments than the packet can hold",
            tags_bytes(3, b"ptt", 3, &[b"A=1", b"B=2"]),
            |e| matches!(e, CodecError::MalformedOpusTags(_)),
        ),
        (
            "comment length past the end",
            {
                let mut t = tags_bytes(3, b"ptt", 1, &[b"A=1"]);
                let n = t.len();
                t[n - 7..n - 3].copy_from_slice(&u32::MAX.to_le_bytes());
                t
            },
            |e| matches!(e, CodecError::MalformedOpusTags(_)),
        ),
        (
            "one comment more than the bound",
            {
                let comments = vec![&b"K=v"[..]; MAX_COMMENTS as usize + 1];
                tags_bytes(3, b"ptt", MAX_COMMENTS + 1, &comments)
            },
            |e| matches!(e, CodecError::TooManyComments { .. }),
        ),
    ];
    for (name, tags, expected) in cases {
        let e = decode(tags).expect_err(name);
        assert!(expected(&e), "{name}: {e:?}");
    }
    // At the bound, with lossy UTF-8 and a comment without '=': read.
    let comments = vec![&b"K=v"[..]; MAX_COMMENTS as usize];
    let audio = decode(tags_bytes(3, b"p\xfft", MAX_COMMENTS, &comments)).unwrap();
    assert_eq!(audio.tags.comments.len(), MAX_COMMENTS as usize);
    assert_eq!(audio.tags.vendor, "p\u{fffd}t");
    let audio = decode(tags_bytes(0, b"", 1, &[b"NOEQUALS"])).unwrap();
    assert_eq!(
        audio.tags.comments,
        vec![("NOEQUALS".into(), String::new())]
    );
}

#[test]
fn oversized_packets_are_refused_before_they_are_buffered() {
    let head = opus_head().to_bytes();
    let tags = OpusTags::with_comments(Vec::new()).to_bytes();
    let header_of = |len: usize| {
        let mut t = tags_bytes((len - 16) as u32, &vec![b'v'; len - 16], 0, &[]);
        assert_eq!(t.len(), len);
        t.shrink_to_fit();
        t
    };
    // A comment header at the bound is read, one byte more is not.
    let ogg = raw_ogg(
        vec![
            head.clone(),
            header_of(MAX_HEADER_PACKET_BYTES),
            SILENT_120MS.to_vec(),
        ],
        5_760,
    );
    assert!(decode_ogg_opus(Cursor::new(ogg)).is_ok());
    let ogg = raw_ogg(
        vec![
            head.clone(),
            header_of(MAX_HEADER_PACKET_BYTES + 1),
            SILENT_120MS.to_vec(),
        ],
        5_760,
    );
    let e = decode_ogg_opus(Cursor::new(ogg)).expect_err("tags");
    assert!(
        matches!(
            e,
            CodecError::PacketTooLarge {
                what: "OpusTags",
                max: MAX_HEADER_PACKET_BYTES
            }
        ),
        "{e:?}"
    );
    // An OpusHead as large.
    let mut big_head = head.clone();
    big_head.resize(MAX_HEADER_PACKET_BYTES + 1, 0);
    let ogg = raw_ogg(vec![big_head, tags.clone(), SILENT_120MS.to_vec()], 5_760);
    let e = decode_ogg_opus(Cursor::new(ogg)).expect_err("head");
    assert!(
        matches!(
            e,
            CodecError::PacketTooLarge {
                what: "OpusHead",
                ..
            }
        ),
        "{e:?}"
    );
    // An audio packet sharing the OpusTags page was buffered under the
    // header bound; it is still held to the audio bound.
    {
        use ogg::writing::{PacketWriteEndInfo, PacketWriter};
        let mut ogg = Vec::new();
        let mut w = PacketWriter::new(&mut ogg);
        w.write_packet(head.clone(), 7, PacketWriteEndInfo::EndPage, 0)
            .unwrap();
        w.write_packet(tags.clone(), 7, PacketWriteEndInfo::NormalPacket, 0)
            .unwrap();
        let mut packet = vec![0u8; MAX_AUDIO_PACKET_BYTES + 1];
        packet[0] = 0x1B;
        w.write_packet(packet, 7, PacketWriteEndInfo::EndStream, 5_760)
            .unwrap();
        let e = decode_ogg_opus(Cursor::new(ogg)).expect_err("audio on the tags page");
        assert!(
            matches!(e, CodecError::PacketTooLarge { what: "audio", .. }),
            "{e:?}"
        );
    }
    // Audio packets: one page (up to 65,025 bytes) or spanning many.
    for len in [MAX_AUDIO_PACKET_BYTES + 1, 65_025, 10_000_000] {
        let mut packet = vec![0u8; len];
        packet[0] = 0x1B; // a TOC byte, so only the size is wrong
        let ogg = raw_ogg(vec![head.clone(), tags.clone(), packet], 5_760);
        let e = decode_ogg_opus(Cursor::new(ogg)).expect_err("audio");
        assert!(
            matches!(
                e,
                CodecError::PacketTooLarge {
                    what: "audio",
                    max: MAX_AUDIO_PACKET_BYTES
                }
            ),
            "{len}: {e:?}"
        );
    }
}

/// Reads a stream and counts the bytes it handed out.
struct CountingReader<R> {
    inner: R,
    read: Arc<AtomicUsize>,
}

impl<R: std::io::Read> std::io::Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read.fetch_add(n, Ordering::Relaxed);
        Ok(n)
    }
}

#[test]
fn a_packet_that_never_ends_is_refused_after_its_bound() {
    // 1,000 pages continuing one packet (65 MB): the decoder stops reading
    // one page past the audio bound.
    let head = opus_head().to_bytes();
    let tags = OpusTags::with_comments(Vec::new()).to_bytes();
    let ogg = raw_ogg(vec![head, tags, vec![0u8; 65_025 * 1_000]], 5_760);
    let read = Arc::default();
    let reader = CountingReader {
        inner: Cursor::new(&ogg),
        read: Arc::clone(&read),
    };
    let e = decode_ogg_opus(reader).expect_err("endless packet");
    assert!(
        matches!(e, CodecError::PacketTooLarge { what: "audio", .. }),
        "{e:?}"
    );
    let read = read.load(Ordering::Relaxed);
    assert!(read < 200_000, "read {read} of {} bytes", ogg.len());
}

#[test]
fn a_small_file_claiming_hours_stops_at_the_duration_bound() {
    // 2 bytes per 120 ms: 40 s of audio from about 1.3 kB of packets.
    let head = opus_head().to_bytes();
    let tags = OpusTags::with_comments(Vec::new()).to_bytes();
    let mut packets = vec![head, tags];
    packets.extend(std::iter::repeat_n(SILENT_120MS.to_vec(), 334));
    let ogg = raw_ogg(packets, u64::MAX);
    let config = DecoderConfig {
        max_duration: Some(Duration::from_secs(30)),
        ..Default::default()
    };
    let e = decode_ogg_opus_with(Cursor::new(&ogg), &config).expect_err("too long");
    assert!(
        matches!(e, CodecError::TooLong { max_seconds, seconds }
            if max_seconds == 30.0 && seconds > 30.0 && seconds < 30.3),
        "{e:?}"
    );
    // Over the bound by less than one packet: refused once trimmed.
    let config = DecoderConfig {
        max_duration: Some(Duration::from_secs(40)),
        ..Default::default()
    };
    let e = decode_ogg_opus_with(Cursor::new(&ogg), &config).expect_err("40.07 s");
    assert!(
        matches!(e, CodecError::TooLong { seconds, .. } if seconds > 40.0 && seconds < 40.1),
        "{e:?}"
    );
    // Within the bound, or unbounded, it decodes.
    let config = DecoderConfig {
        max_duration: Some(Duration::from_secs(41)),
        ..Default::default()
    };
    assert!(decode_ogg_opus_with(Cursor::new(&ogg), &config).is_ok());
    let config = DecoderConfig {
        max_duration: None,
        ..Default::default()
    };
    let audio = decode_ogg_opus_with(Cursor::new(&ogg), &config).unwrap();
    assert_eq!(audio.frames(), 334 * 5_760 - 312);
    // The default bound is the encoder's: an hour.
    assert_eq!(
        DecoderConfig::default().max_duration,
        EncoderConfig::default().max_duration
    );
}

#[test]
fn other_logical_streams_are_skipped_and_bytes_between_pages_refused() {
    use ogg::writing::{PacketWriteEndInfo, PacketWriter};
    let head = opus_head().to_bytes();
    let tags = OpusTags::with_comments(Vec::new()).to_bytes();
    // A second logical stream (serial 9) interleaved with ours (serial 7).
    let mut out = Vec::new();
    let mut w = PacketWriter::new(&mut out);
    w.write_packet(head, 7, PacketWriteEndInfo::EndPage, 0)
        .unwrap();
    w.write_packet(b"other".to_vec(), 9, PacketWriteEndInfo::EndPage, 0)
        .unwrap();
    w.write_packet(tags, 7, PacketWriteEndInfo::EndPage, 0)
        .unwrap();
    w.write_packet(vec![0; 60_000], 9, PacketWriteEndInfo::EndPage, 0)
        .unwrap();
    w.write_packet(
        SILENT_120MS.to_vec(),
        7,
        PacketWriteEndInfo::EndStream,
        5_760,
    )
    .unwrap();
    let audio = decode_ogg_opus(Cursor::new(&out)).unwrap();
    assert_eq!((audio.packets, audio.frames()), (1, 5_760 - 312));
    // Garbage between two pages.
    let first_page = 28 + 19;
    let mut bad = out[..first_page].to_vec();
    bad.extend_from_slice(b"junk");
    bad.extend_from_slice(&out[first_page..]);
    let e = decode_ogg_opus(Cursor::new(bad)).expect_err("junk");
    assert!(matches!(e, CodecError::Ogg(_)), "{e:?}");
}

#[test]
fn wav_blocks_are_bounded_whatever_the_channel_count() {
    // 65,535 channels of 8-bit audio, 20 frames: every frame is read and
    // downmixed, in blocks sized by samples rather than 8,192 frames.
    let channels = u16::MAX;
    let frames = 20;
    let fmt = Fmt {
        bits: 8,
        container: 1,
        ..Fmt::pcm16(16_000, channels)
    };
    let data = vec![128u8; usize::from(channels) * frames];
    let wav = riff(&[(b"fmt ", fmt.chunk()), (b"data", data)]);
    let clip = encode_wav_packets(Cursor::new(wav), &EncoderConfig::default()).unwrap();
    assert_eq!(clip.summary.input_channels, channels);
    assert_eq!(clip.summary.input_frames, frames as u64);
}
