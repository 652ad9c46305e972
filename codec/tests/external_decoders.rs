//! Real decoders: `opusinfo` must validate each stream without a warning, and
//! `opusdec` and `ffmpeg` must decode it to exactly the right length.
//!
//! These tools are part of the CI setup. A missing tool fails the test with a
//! message saying to run the setup, unless `PTT_SKIP_EXTERNAL_DECODERS=1`.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use ptt_codec::*;

struct Stream {
    name: String,
    config: EncoderConfig,
    rate: u32,
    channels: u16,
    pcm: Vec<f32>,
}

fn streams() -> Vec<Stream> {
    let (rate, fixture) = fixture_samples();
    let speech: Vec<f32> = fixture.iter().map(|&s| f32::from(s) / 32_768.0).collect();
    let mut v = vec![Stream {
        name: "speech-default".into(),
        config: EncoderConfig::default(),
        rate,
        channels: 1,
        pcm: speech.clone(),
    }];
    for frame in FrameDuration::ALL {
        v.push(Stream {
            name: format!("frame-{}ms-44k1-stereo-in", frame.millis()),
            config: EncoderConfig {
                frame,
                ..Default::default()
            },
            rate: 44_100,
            channels: 2,
            pcm: interleave(&[speechlike(44_100, 50_001, 0), speechlike(44_100, 50_001, 1)]),
        });
    }
    v.push(Stream {
        name: "stereo-audio-cbr-64k".into(),
        config: EncoderConfig {
            channels: ChannelMode::Stereo,
            application: Application::Audio,
            bitrate_mode: BitrateMode::Cbr,
            bitrate: 64_000,
            ..Default::default()
        },
        rate: 48_000,
        channels: 2,
        pcm: interleave(&[speechlike(48_000, 70_000, 0), speechlike(48_000, 70_000, 2)]),
    });
    v.push(Stream {
        name: "fec-dtx-live-8k".into(),
        config: EncoderConfig {
            fec_expected_loss: Some(15),
            dtx: true,
            live: true,
            ..Default::default()
        },
        rate: 8_000,
        channels: 1,
        pcm: {
            let mut p = vec![0.0; 8_000];
            p.extend(speechlike(8_000, 16_000, 0));
            p
        },
    });
    v.push(Stream {
        name: "lowdelay-22k05".into(),
        config: EncoderConfig {
            application: Application::LowDelay,
            frame: FrameDuration::Ms10,
            ..Default::default()
        },
        rate: 22_050,
        channels: 1,
        pcm: speechlike(22_050, 22_051, 0),
    });
    v.push(Stream {
        name: "one-sample".into(),
        config: EncoderConfig::default(),
        rate: 48_000,
        channels: 1,
        pcm: vec![0.5],
    });
    v
}

fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().expect("run external tool");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn wav_frames(path: &Path) -> (u32, u16, u64) {
    let r = hound::WavReader::open(path).unwrap();
    let s = r.spec();
    (s.sample_rate, s.channels, u64::from(r.duration()))
}

#[test]
fn real_decoders_accept_our_streams() {
    let Some(opusinfo) = external_tool("opusinfo") else {
        return;
    };
    let Some(opusdec) = external_tool("opusdec") else {
        return;
    };
    let Some(ffmpeg) = external_tool("ffmpeg") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    for s in streams() {
        let path = dir.path().join(format!("{}.opus", s.name));
        let mut enc = OggOpusEncoder::new(
            std::fs::File::create(&path).unwrap(),
            s.rate,
            s.channels,
            &s.config,
        )
        .unwrap();
        enc.push_f32(&s.pcm).unwrap();
        let (_, summary) = enc.finish().unwrap();
        let name = &s.name;

        let (ok, text) = run(Command::new(&opusinfo).arg(&path));
        assert!(ok, "{name}: opusinfo failed:\n{text}");
        assert!(
            !text.to_lowercase().contains("warning"),
            "{name}: opusinfo warns:\n{text}"
        );
        assert!(
            text.contains(&format!("Pre-skip: {}", summary.pre_skip)),
            "{name}:\n{text}"
        );
        assert!(
            text.contains(&format!("Original sample rate: {} Hz", s.rate)),
            "{name}:\n{text}"
        );

        let wav = dir.path().join(format!("{name}.opusdec.wav"));
        let (ok, text) = run(Command::new(&opusdec)
            .args(["--quiet", "--rate", "48000"])
            .arg(&path)
            .arg(&wav));
        assert!(ok, "{name}: opusdec failed:\n{text}");
        let (rate, channels, frames) = wav_frames(&wav);
        assert_eq!((rate, channels), (48_000, summary.channels), "{name}");
        assert_eq!(frames, summary.length_48k, "{name}: opusdec length");

        let (ok, text) = run(Command::new(&ffmpeg)
            .args(["-v", "error", "-nostdin", "-y", "-i"])
            .arg(&path)
            .args(["-f", "s16le", "-ar", "48000", "-c:a", "pcm_s16le"])
            .arg(dir.path().join(format!("{name}.raw"))));
        assert!(ok, "{name}: ffmpeg failed:\n{text}");
        assert!(text.trim().is_empty(), "{name}: ffmpeg complains:\n{text}");
        let bytes = std::fs::metadata(dir.path().join(format!("{name}.raw")))
            .unwrap()
            .len();
        assert_eq!(
            bytes / 2 / u64::from(summary.channels),
            summary.length_48k,
            "{name}: ffmpeg length"
        );
    }
}

#[test]
fn we_decode_what_opusenc_writes() {
    let Some(opusenc) = external_tool("opusenc") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("ref.opus");
    let (ok, text) = run(Command::new(&opusenc)
        .args(["--quiet", "--bitrate", "32"])
        .arg(fixture_path())
        .arg(&out));
    assert!(ok, "opusenc failed:\n{text}");
    let (rate, samples) = fixture_samples();
    let decoded = decode_ogg_opus(std::fs::File::open(&out).unwrap()).unwrap();
    assert_eq!(decoded.sample_rate, rate);
    assert_eq!(
        decoded.frames(),
        samples.len(),
        "pre-skip and end trim honoured"
    );
    let pcm: Vec<f32> = samples.iter().map(|&s| f32::from(s) / 32_768.0).collect();
    let c = correlation(&pcm, &decoded.samples);
    assert!(c > 0.9, "correlation {c}");
}
