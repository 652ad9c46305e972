//! The `codec` binary: encode, batch encode, decode, info, and one-line errors.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn codec(args: &[&dyn AsRef<std::ffi::OsStr>]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_codec"));
    for a in args {
        cmd.arg(a);
    }
    cmd.output().expect("run codec")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The codec crate's speech fixture (16 kHz mono 16-bit, ~9 s).
fn fixture_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../codec/tests/fixtures/speech.wav")
}

/// The fixture's rate and length in frames.
fn fixture_rate_and_frames() -> (u32, usize) {
    let r = hound::WavReader::open(fixture_path()).expect("fixture");
    (r.spec().sample_rate, r.duration() as usize)
}

/// Writes `secs` of a 16-bit mono tone with a syllable-like envelope.
fn write_wav(path: &Path, rate: u32, secs: f32) {
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: rate,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut w = hound::WavWriter::create(path, spec).unwrap();
    for i in 0..(rate as f32 * secs) as usize {
        let t = i as f32 / rate as f32;
        let envelope = 0.5 - 0.45 * (std::f32::consts::TAU * 4.0 * t).cos();
        let tone = (std::f32::consts::TAU * 220.0 * t).sin();
        w.write_sample((tone * envelope * 8_000.0) as i16).unwrap();
    }
    w.finalize().unwrap();
}

#[test]
fn encode_info_decode() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("speech.opus");
    let o = codec(&[
        &"encode",
        &fixture_path(),
        &"-o",
        &out,
        &"--bitrate",
        &"32k",
        &"--complexity",
        &"8",
        &"--frame-ms",
        &"40",
        &"--application",
        &"audio",
        &"--fec",
        &"--expected-loss",
        &"10",
        &"--dtx",
        &"--cvbr",
        &"--comment",
        &"TITLE=hello",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).is_empty(), "{}", stderr(&o));

    let o = codec(&[&"info", &out, &"--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let info: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let (rate, frames) = fixture_rate_and_frames();
    assert_eq!(info["input_sample_rate"], rate);
    assert_eq!(info["channels"], 1);
    assert_eq!(info["pre_skip"], 312);
    assert_eq!(info["waveform"].as_array().unwrap().len(), 100);
    assert_eq!(info["comments"][0][0], "TITLE");
    let duration = info["duration_secs"].as_f64().unwrap();
    assert!((duration - frames as f64 / f64::from(rate)).abs() < 1e-6);
    let bitrate = info["average_bitrate"].as_f64().unwrap();
    assert!((20_000.0..45_000.0).contains(&bitrate), "{bitrate}");

    let o = codec(&[&"info", &out]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("input rate: 16000 Hz") && text.contains("waveform:"),
        "{text}"
    );

    let wav = dir.path().join("back.wav");
    let o = codec(&[&"decode", &out, &"-o", &wav]);
    assert!(o.status.success(), "{}", stderr(&o));
    let r = hound::WavReader::open(&wav).unwrap();
    assert_eq!(r.spec().sample_rate, rate);
    assert_eq!(r.duration() as usize, frames);

    // The decoder's duration bound.
    let o = codec(&[&"decode", &out, &"-o", &wav, &"--max-duration", &"1"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("too long"), "{}", stderr(&o));
}

#[test]
fn default_output_name_and_timing_line() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("note.wav");
    write_wav(&input, 48_000, 0.5);
    let o = codec(&[&"encode", &input, &"--timing"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(dir.path().join("note.opus").is_file());
    let err = stderr(&o);
    assert!(
        err.starts_with("timing ") && err.contains("opus_s="),
        "{err}"
    );
}

#[test]
fn batch_encode_into_a_directory() {
    let dir = tempfile::tempdir().unwrap();
    let mut inputs = Vec::new();
    for (i, rate) in [8_000u32, 16_000, 44_100, 48_000].into_iter().enumerate() {
        let p = dir.path().join(format!("clip{i}.wav"));
        write_wav(&p, rate, 0.3);
        inputs.push(p);
    }
    let outdir = dir.path().join("out");
    let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&"encode"];
    for p in &inputs {
        args.push(p);
    }
    args.push(&"-o");
    args.push(&outdir);
    let o = codec(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).is_empty(),
        "no progress bar off a terminal: {}",
        stderr(&o)
    );
    for i in 0..4 {
        assert!(outdir.join(format!("clip{i}.opus")).is_file());
    }
}

#[test]
fn errors_are_one_line_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.wav");
    std::fs::write(&bad, b"this is not a wav").unwrap();
    let good = dir.path().join("good.wav");
    write_wav(&good, 16_000, 0.2);

    let o = codec(&[&"encode", &bad]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("bad.wav") && err.contains("not a WAV file"),
        "{err}"
    );
    assert!(!dir.path().join("bad.opus").exists());

    // In a batch the good file is still encoded, the bad one reported.
    let outdir = dir.path().join("out");
    let o = codec(&[&"encode", &good, &bad, &"-o", &outdir]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("bad.wav"), "{err}");
    assert!(outdir.join("good.opus").is_file());
    assert!(!outdir.join("bad.opus").exists());

    let o = codec(&[&"encode", &good, &"--bitrate", &"1k"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("6k to 256k"), "{}", stderr(&o));

    let o = codec(&[&"info", &good]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("good.wav") && err.contains("Ogg"), "{err}");

    let o = codec(&[
        &"decode",
        &dir.path().join("missing.opus"),
        &"-o",
        &dir.path().join("x.wav"),
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("missing.opus"), "{}", stderr(&o));
}

/// Issue #9 through the command line: a hostile OpusHead input rate exits
/// non-zero with one line naming the file and the rate, not an abort.
#[test]
fn decode_of_a_3_ghz_input_rate_fails_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("ok.opus");
    let o = codec(&[&"encode", &fixture_path(), &"-o", &src]);
    assert!(o.status.success(), "{}", stderr(&o));
    // Patch the input rate (bytes 12..16 of OpusHead, at offset 28 + 12 of
    // the file) and fix the first page's CRC.
    let mut bytes = std::fs::read(&src).unwrap();
    bytes[40..44].copy_from_slice(&3_000_000_000u32.to_le_bytes());
    fix_page_crc(&mut bytes, 0);
    let hostile = dir.path().join("hostile.opus");
    std::fs::write(&hostile, &bytes).unwrap();

    let wav = dir.path().join("out.wav");
    let o = codec(&[&"decode", &hostile, &"-o", &wav]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let err = stderr(&o);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("hostile.opus") && err.contains("3000000000"),
        "{err}"
    );
    assert!(!wav.exists());

    let o = codec(&[&"info", &hostile]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("3000000000"), "{}", stderr(&o));
}

/// Recomputes the CRC of the Ogg page starting at `at` (one-page header
/// packets only: the page ends where its lacing values say).
fn fix_page_crc(bytes: &mut [u8], at: usize) {
    let segments = usize::from(bytes[at + 26]);
    let body: usize = bytes[at + 27..at + 27 + segments]
        .iter()
        .map(|&l| usize::from(l))
        .sum();
    let end = at + 27 + segments + body;
    bytes[at + 22..at + 26].fill(0);
    let mut crc = 0u32;
    for &b in &bytes[at..end] {
        crc ^= u32::from(b) << 24;
        for _ in 0..8 {
            crc = if crc & 0x8000_0000 != 0 {
                (crc << 1) ^ 0x04c1_1db7
            } else {
                crc << 1
            };
        }
    }
    bytes[at + 22..at + 26].copy_from_slice(&crc.to_le_bytes());
}
