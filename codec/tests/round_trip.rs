//! Encode → decode round trips: exact lengths, signal fidelity, the Ogg
//! layout RFC 7845 asks for, streaming behaviour and packet-loss decoding.

mod common;

use std::io::{Cursor, Write};
use std::sync::{Arc, Mutex};

use common::*;
use ptt_codec::*;

fn encode_pcm(
    rate: u32,
    channels: u16,
    pcm: &[f32],
    config: &EncoderConfig,
) -> (Vec<u8>, EncodeSummary) {
    let mut enc = OggOpusEncoder::new(Vec::new(), rate, channels, config).unwrap();
    enc.push_f32(pcm).unwrap();
    enc.finish().unwrap()
}

#[test]
fn length_is_exact_for_every_frame_size_and_rate() {
    for frame in FrameDuration::ALL {
        for (rate, frames) in [
            (8_000, 1usize),
            (16_000, 16_000),
            (48_000, 12_345),
            (44_100, 44_101),
            (22_050, 7_000),
            (11_025, 333),
            (12_000, 961),
            (24_000, 2_399),
        ] {
            let config = EncoderConfig {
                frame,
                ..Default::default()
            };
            let pcm = speechlike(rate, frames, 0);
            let (ogg, summary) = encode_pcm(rate, 1, &pcm, &config);
            let ctx = format!("{frame:?} {rate} Hz {frames} frames");
            // Length at the rate libopus ran at, rounded to the nearest sample,
            // in 48 kHz units.
            let opus = u64::from(opus_rate_for(rate));
            let expected_48k =
                (frames as u64 * opus + u64::from(rate) / 2) / u64::from(rate) * (48_000 / opus);
            assert_eq!(summary.length_48k, expected_48k, "{ctx}");
            assert_eq!(summary.input_frames, frames as u64, "{ctx}");

            let decoded = decode_ogg_opus(Cursor::new(&ogg)).unwrap();
            assert_eq!(decoded.sample_rate, rate, "{ctx}");
            assert_eq!(decoded.frames(), frames, "{ctx}: original-rate length");

            let at48 = decode_ogg_opus_at(Cursor::new(&ogg), OutputRate::Native48k).unwrap();
            assert_eq!(at48.frames() as u64, expected_48k, "{ctx}: 48 kHz length");
        }
    }
}

#[test]
fn high_rate_inputs_round_trip_within_one_48k_sample() {
    for rate in [96_000u32, 192_000] {
        let frames = 20_001;
        let (ogg, summary) = encode_pcm(
            rate,
            1,
            &speechlike(rate, frames, 1),
            &EncoderConfig::default(),
        );
        assert_eq!(
            summary.length_48k,
            (frames as u64 * 48_000 + u64::from(rate) / 2) / u64::from(rate)
        );
        let decoded = decode_ogg_opus(Cursor::new(&ogg)).unwrap();
        let ratio = (rate / 48_000) as usize;
        assert!(
            decoded.frames().abs_diff(frames) < ratio,
            "{rate}: {}",
            decoded.frames()
        );
    }
}

/// The threshold separates a working pipeline (0.92 to 0.97 here) from a
/// broken one. Checked by breaking the code while writing these tests, on
/// the 44.1 kHz stereo case: downmixing to the left channel only gives 0.66,
/// a 1 % wrong resampling ratio gives 0.00, and not trimming the
/// resampler's delay gives 0.13.
const MIN_CORRELATION: f64 = 0.9;

#[test]
fn speech_fixture_keeps_its_shape_at_32k() {
    let (rate, samples) = fixture_samples();
    let pcm: Vec<f32> = samples.iter().map(|&s| f32::from(s) / 32_768.0).collect();
    let config = EncoderConfig {
        bitrate: 32_000,
        ..Default::default()
    };
    let (ogg, _) = encode_pcm(rate, 1, &pcm, &config);
    let decoded = decode_ogg_opus(Cursor::new(&ogg)).unwrap();
    let c = correlation(&pcm, &decoded.samples);
    eprintln!("speech fixture correlation at 32 kbit/s: {c:.4}");
    assert!(c > MIN_CORRELATION, "correlation {c}");
}

#[test]
fn resampled_stereo_is_downmixed_and_aligned() {
    // Different content left and right: taking one channel instead of the
    // average, or resampling at the wrong ratio, loses the correlation.
    for rate in [44_100u32, 32_000, 96_000] {
        let frames = rate as usize;
        let left = speechlike(rate, frames, 0);
        let right = speechlike(rate, frames, 3);
        let stereo = interleave(&[left, right]);
        let config = EncoderConfig {
            bitrate: 32_000,
            ..Default::default()
        };
        let (ogg, summary) = encode_pcm(rate, 2, &stereo, &config);
        assert_eq!(summary.channels, 1);
        let decoded = decode_ogg_opus(Cursor::new(&ogg)).unwrap();
        let mono = downmix(&stereo, 2);
        let n = mono.len().min(decoded.samples.len());
        let c = correlation(&mono[..n], &decoded.samples[..n]);
        eprintln!("{rate} Hz stereo → mono correlation: {c:.4}");
        assert!(c > MIN_CORRELATION, "{rate}: correlation {c}");
    }
}

#[test]
fn stereo_on_request_keeps_both_channels() {
    let rate = 48_000;
    let left = speechlike(rate, 24_000, 0);
    let right = speechlike(rate, 24_000, 2);
    let config = EncoderConfig {
        channels: ChannelMode::Stereo,
        bitrate: 64_000,
        application: Application::Audio,
        ..Default::default()
    };
    let (ogg, summary) = encode_pcm(
        rate,
        2,
        &interleave(&[left.clone(), right.clone()]),
        &config,
    );
    assert_eq!(summary.channels, 2);
    let decoded = decode_ogg_opus(Cursor::new(&ogg)).unwrap();
    assert_eq!(decoded.channels, 2);
    let l: Vec<f32> = decoded.samples.iter().step_by(2).copied().collect();
    let r: Vec<f32> = decoded.samples.iter().skip(1).step_by(2).copied().collect();
    assert!(correlation(&left, &l) > MIN_CORRELATION);
    assert!(correlation(&right, &r) > MIN_CORRELATION);
    assert!(correlation(&left, &r) < 0.5, "channels must stay apart");
}

/// One parsed Ogg page.
struct Page {
    flags: u8,
    granule: u64,
    serial: u32,
    packets: Vec<Vec<u8>>,
    /// Whether the last packet continues on the next page.
    continued: bool,
}

fn parse_pages(mut data: &[u8]) -> Vec<Page> {
    let mut pages = Vec::new();
    while !data.is_empty() {
        assert_eq!(&data[..4], b"OggS");
        let flags = data[5];
        let granule = u64::from_le_bytes(data[6..14].try_into().unwrap());
        let serial = u32::from_le_bytes(data[14..18].try_into().unwrap());
        let nseg = data[26] as usize;
        let lacing = &data[27..27 + nseg];
        let mut body = &data[27 + nseg..];
        let mut packets = Vec::new();
        let mut cur = Vec::new();
        let mut continued = false;
        for &l in lacing {
            cur.extend_from_slice(&body[..l as usize]);
            body = &body[l as usize..];
            continued = l == 255;
            if l < 255 {
                packets.push(std::mem::take(&mut cur));
            }
        }
        let consumed = data.len() - body.len();
        pages.push(Page {
            flags,
            granule,
            serial,
            packets,
            continued,
        });
        data = &data[consumed..];
    }
    pages
}

#[test]
fn ogg_layout_follows_rfc_7845() {
    let rate = 16_000;
    let frames = rate as usize * 3 + 123;
    let config = EncoderConfig {
        comments: vec![("TITLE".into(), "walkie-talkie".into())],
        ..Default::default()
    };
    let (ogg, summary) = encode_pcm(rate, 1, &speechlike(rate, frames, 0), &config);
    let pages = parse_pages(&ogg);

    // OpusHead alone on the first page, beginning of stream.
    let head = &pages[0];
    assert_eq!(head.flags, 0x02);
    assert_eq!(head.granule, 0);
    assert_eq!(head.packets.len(), 1);
    assert!(!head.continued);
    let h = OpusHead::parse(&head.packets[0]).unwrap();
    assert_eq!(head.packets[0][8], 1, "version 1");
    assert_eq!(h.channels, 1);
    assert_eq!(h.input_sample_rate, 16_000);
    assert_eq!(h.pre_skip, summary.pre_skip);
    assert_eq!(
        h.pre_skip, 312,
        "libopus lookahead at 16 kHz is 104 samples = 312 at 48 kHz"
    );

    // OpusTags ends the second page.
    let tags = &pages[1];
    assert_eq!(tags.granule, 0);
    assert_eq!(tags.packets.len(), 1);
    assert!(!tags.continued);
    let t = OpusTags::parse(&tags.packets[0]).unwrap();
    assert!(t.vendor.starts_with("ptt-codec"));
    assert_eq!(
        t.comments,
        vec![("TITLE".to_string(), "walkie-talkie".to_string())]
    );

    // Audio pages: same serial, increasing granules, at most a second each,
    // end of stream on the last one with the trimmed granule.
    let mut prev = 0;
    for (i, p) in pages.iter().enumerate() {
        assert_eq!(p.serial, pages[0].serial);
        if i < 2 {
            continue;
        }
        assert!(p.granule > prev, "granules increase");
        assert!(
            p.granule - prev <= 48_000 || i == 2,
            "page {i} spans more than a second"
        );
        let last = i == pages.len() - 1;
        assert_eq!(p.flags & 0x04 != 0, last, "EOS only on the last page");
        if !last {
            let audio: u64 = p.packets.len() as u64 * 960;
            assert_eq!(p.granule - prev, audio, "granule counts 48 kHz samples");
        }
        prev = p.granule;
    }
    assert_eq!(prev, u64::from(summary.pre_skip) + frames as u64 * 3);
    assert_eq!(
        pages[2].granule, 48_000,
        "the first audio page ends after one second"
    );

    // The serial is random.
    let (other, _) = encode_pcm(
        rate,
        1,
        &speechlike(rate, 100, 0),
        &EncoderConfig::default(),
    );
    assert_ne!(parse_pages(&other)[0].serial, pages[0].serial);
    // Unless fixed.
    let fixed = EncoderConfig {
        serial: Some(0xC0DEC),
        ..Default::default()
    };
    let (a, _) = encode_pcm(rate, 1, &speechlike(rate, 100, 0), &fixed);
    assert_eq!(parse_pages(&a)[0].serial, 0xC0DEC);
}

#[derive(Clone, Default)]
struct SharedBuf(Arc<Mutex<Vec<u8>>>);

impl Write for SharedBuf {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn pages_are_written_before_the_clip_ends() {
    let rate = 48_000;
    let pcm = speechlike(rate, rate as usize * 3, 0);
    for live in [false, true] {
        let buf = SharedBuf::default();
        let config = EncoderConfig {
            live,
            ..Default::default()
        };
        let mut enc = OggOpusEncoder::new(buf.clone(), rate, 1, &config).unwrap();
        let mut audio_pages_seen = 0;
        // A microphone delivering 10 ms callbacks.
        for (i, chunk) in pcm.chunks(480).enumerate() {
            enc.push_f32(chunk).unwrap();
            let pages = parse_pages(&buf.0.lock().unwrap());
            let audio = pages.len() - 2;
            if live {
                // Every complete 20 ms frame is on a page at once.
                let chunks_pushed = i + 1;
                assert_eq!(audio, chunks_pushed / 2, "live: chunk {i}");
            }
            audio_pages_seen = audio;
            if !live && i == 110 {
                assert!(audio >= 1, "a page after at most a second");
            }
        }
        assert!(audio_pages_seen >= if live { 149 } else { 2 });
        enc.finish().unwrap();
        let pages = parse_pages(&buf.0.lock().unwrap());
        assert_eq!(pages.last().unwrap().flags & 0x04, 0x04);
    }
}

#[test]
fn chunk_sizes_do_not_change_the_packets() {
    let rate = 44_100;
    let pcm = interleave(&[speechlike(rate, 30_000, 0), speechlike(rate, 30_000, 1)]);
    let config = EncoderConfig::default();
    let run = |chunk: usize| {
        let mut enc = StreamEncoder::new(rate, 2, &config).unwrap();
        let mut packets = Vec::new();
        for c in pcm.chunks(chunk * 2) {
            enc.push_f32(c).unwrap();
            while let Some(p) = enc.next_packet() {
                packets.push(p);
            }
        }
        let end = enc.finish().unwrap();
        packets.extend(end.packets);
        (packets, end.summary.final_granule)
    };
    let whole = run(pcm.len());
    for chunk in [1, 7, 441, 1000, 4096] {
        assert_eq!(run(chunk), whole, "chunk {chunk}");
    }
}

#[test]
fn i16_and_f32_pushes_agree() {
    let pcm16: Vec<i16> = speechlike(16_000, 8_000, 0)
        .iter()
        .map(|&s| (s * 32_767.0) as i16)
        .collect();
    let pcmf: Vec<f32> = pcm16.iter().map(|&s| f32::from(s) / 32_768.0).collect();
    let config = EncoderConfig::default();
    let mut a = StreamEncoder::new(16_000, 1, &config).unwrap();
    a.push_i16(&pcm16).unwrap();
    let mut b = StreamEncoder::new(16_000, 1, &config).unwrap();
    b.push_f32(&pcmf).unwrap();
    assert_eq!(a.finish().unwrap().packets, b.finish().unwrap().packets);
}

#[test]
fn packet_decoder_uses_fec_then_plc() {
    let rate = 16_000;
    let pcm = speechlike(rate, rate as usize * 2, 0);
    let config = EncoderConfig {
        fec_expected_loss: Some(20),
        bitrate: 32_000,
        ..Default::default()
    };
    let clip = {
        let mut enc = StreamEncoder::new(rate, 1, &config).unwrap();
        enc.push_f32(&pcm).unwrap();
        enc.finish().unwrap()
    };
    let packets: Vec<&[u8]> = clip.packets.iter().map(|p| p.data.as_slice()).collect();
    let frame = 320;
    let lost = [10usize, 40, 41, packets.len() - 1];
    let decode = |use_fec: bool| {
        let mut dec = PacketDecoder::new(rate, 1).unwrap();
        let mut out = Vec::new();
        for i in 0..packets.len() {
            let this = (!lost.contains(&i)).then(|| packets[i]);
            let next = packets
                .get(i + 1)
                .copied()
                .filter(|_| use_fec && !lost.contains(&(i + 1)));
            out.extend_from_slice(dec.decode(this, next).unwrap());
        }
        (out, dec.recovered(), dec.concealed())
    };
    let (with_fec, recovered, concealed) = decode(true);
    assert_eq!(with_fec.len(), packets.len() * frame);
    assert_eq!(
        (recovered, concealed),
        (2, 2),
        "10 and 41 from FEC; 40 and the last concealed"
    );
    let (plc_only, _, concealed) = decode(false);
    assert_eq!(concealed, 4);

    // The frame rebuilt from FEC is closer to what was sent than concealment.
    let skip = (clip.summary.pre_skip / 3) as usize;
    let reference: Vec<f32> = {
        let mut dec = PacketDecoder::new(rate, 1).unwrap();
        packets
            .iter()
            .flat_map(|p| dec.decode(Some(p), None).unwrap().to_vec())
            .collect()
    };
    let lost_frame = 10 * frame..11 * frame;
    let c_fec = correlation(
        &reference[lost_frame.clone()],
        &with_fec[lost_frame.clone()],
    );
    let c_plc = correlation(&reference[lost_frame.clone()], &plc_only[lost_frame]);
    eprintln!("lost frame: FEC correlation {c_fec:.3}, PLC {c_plc:.3} (pre-skip {skip})");
    assert!(c_fec > 0.8 && c_fec > c_plc, "FEC {c_fec} PLC {c_plc}");
}

#[test]
fn bitrate_modes_and_dtx() {
    let rate = 48_000;
    let pcm = speechlike(rate, rate as usize, 0);
    let cbr = EncoderConfig {
        bitrate_mode: BitrateMode::Cbr,
        bitrate: 32_000,
        ..Default::default()
    };
    let mut enc = StreamEncoder::new(rate, 1, &cbr).unwrap();
    enc.push_f32(&pcm).unwrap();
    let packets = enc.finish().unwrap().packets;
    assert!(
        packets.iter().all(|p| p.data.len() == 80),
        "CBR 32 kbit/s × 20 ms = 80 bytes"
    );

    let silence = vec![0.0f32; rate as usize * 2];
    let size = |dtx: bool| {
        let config = EncoderConfig {
            dtx,
            ..Default::default()
        };
        let mut enc = StreamEncoder::new(rate, 1, &config).unwrap();
        enc.push_f32(&silence).unwrap();
        enc.finish().unwrap().summary.payload_bytes
    };
    assert!(size(true) < size(false), "DTX shrinks silence");

    // Every application and complexity setting encodes.
    for application in [Application::Voip, Application::Audio, Application::LowDelay] {
        for complexity in [0, 5, 10] {
            let config = EncoderConfig {
                application,
                complexity,
                bitrate_mode: BitrateMode::ConstrainedVbr,
                ..Default::default()
            };
            let (ogg, s) = encode_pcm(rate, 1, &pcm[..9_600], &config);
            if application == Application::LowDelay {
                assert_eq!(s.pre_skip, 120);
            }
            assert_eq!(decode_ogg_opus(Cursor::new(ogg)).unwrap().frames(), 9_600);
        }
    }
}

#[test]
fn waveform_tracks_the_clip() {
    let rate = 16_000;
    let mut pcm = vec![0.0f32; rate as usize];
    pcm.extend(speechlike(rate, rate as usize, 0));
    let (ogg, summary) = encode_pcm(rate, 1, &pcm, &EncoderConfig::default());
    let w = &summary.waveform;
    assert_eq!(w.len(), 100);
    assert!(w[..50].iter().all(|&b| b == 0), "{w:?}");
    assert!(w[50..].contains(&31), "{w:?}");
    assert!(w[50..].iter().all(|&b| b > 0), "{w:?}");
    // The waveform of the decoded clip looks the same.
    let decoded = decode_ogg_opus(Cursor::new(ogg)).unwrap().waveform(100);
    let diff = decoded
        .iter()
        .zip(w)
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap();
    assert!(diff <= 4, "{decoded:?} vs {w:?}");
}

#[test]
fn encode_wav_packets_gives_packets_and_metadata() {
    let data = std::fs::read(fixture_path()).unwrap();
    let clip = encode_wav_packets(Cursor::new(data), &EncoderConfig::default()).unwrap();
    let (rate, samples) = fixture_samples();
    assert_eq!(clip.input_rate, rate);
    assert_eq!(clip.channels, 1);
    assert_eq!(clip.frame_ms, 20);
    assert_eq!(clip.pre_skip, 312);
    assert_eq!(clip.length_48k, samples.len() as u64 * 3);
    assert_eq!(clip.waveform.len(), 100);
    let needed = (clip.length_48k + 312).div_ceil(960);
    assert_eq!(clip.packets.len() as u64, needed);
    assert!(clip.packets.iter().all(|p| p.duration == 960));
    // Same bytes as the Ogg path: one encoding path.
    let mut ogg = Cursor::new(Vec::new());
    let config = EncoderConfig::default();
    encode_wav(
        Cursor::new(std::fs::read(fixture_path()).unwrap()),
        &mut ogg,
        &config,
    )
    .unwrap();
    let pages = parse_pages(ogg.get_ref());
    let ogg_packets: Vec<Vec<u8>> = pages[2..].iter().flat_map(|p| p.packets.clone()).collect();
    let raw: Vec<Vec<u8>> = clip.packets.iter().map(|p| p.data.clone()).collect();
    assert_eq!(ogg_packets, raw);
    let bitrate = clip.summary.average_bitrate();
    assert!((15_000.0..35_000.0).contains(&bitrate), "{bitrate}");
}

#[test]
fn decoder_applies_output_gain() {
    let rate = 48_000;
    let pcm = speechlike(rate, 24_000, 0);
    let mut enc = StreamEncoder::new(rate, 1, &EncoderConfig::default()).unwrap();
    enc.push_f32(&pcm).unwrap();
    let end = enc.finish().unwrap();
    let write = |gain_q8: i16| {
        let head = OpusHead {
            channels: 1,
            pre_skip: end.summary.pre_skip,
            input_sample_rate: rate,
            output_gain: gain_q8,
            mapping_family: 0,
        };
        let tags = OpusTags::with_comments(Vec::new());
        let mut w = OggOpusWriter::new(Vec::new(), &head, &tags, 7, false).unwrap();
        let mut packets = end.packets.clone();
        let last = packets.pop().unwrap();
        for p in packets {
            w.write_packet(p).unwrap();
        }
        let ogg = w.finish(last, end.summary.final_granule).unwrap();
        decode_ogg_opus(Cursor::new(ogg)).unwrap().samples
    };
    let rms =
        |x: &[f32]| (x.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>() / x.len() as f64).sqrt();
    let unity = write(0);
    let minus_6db = write(-1541); // -6.02 dB in Q7.8
    assert_eq!(unity.len(), pcm.len());
    let ratio = rms(&minus_6db) / rms(&unity);
    assert!((ratio - 0.5).abs() < 0.01, "gain ratio {ratio}");
}

#[test]
fn non_finite_float_input_does_not_break_the_stream() {
    // A broken float WAV: libopus (and the resampler in front of it) must
    // still give a valid stream of the right length with finite output.
    for rate in [48_000u32, 44_100] {
        let mut pcm = speechlike(rate, 9_600, 0);
        pcm[100] = f32::NAN;
        pcm[200] = f32::INFINITY;
        pcm[300] = f32::NEG_INFINITY;
        pcm[400] = 1e30;
        let (ogg, summary) = encode_pcm(rate, 1, &pcm, &EncoderConfig::default());
        assert_eq!(summary.input_frames, 9_600);
        let decoded = decode_ogg_opus(Cursor::new(ogg)).unwrap();
        assert_eq!(decoded.frames(), 9_600, "{rate}");
        assert!(decoded.samples.iter().all(|s| s.is_finite()), "{rate}");
    }
}
