//! The `codec` command line: encode, decode and inspect voice clips.
//!
//! ```text
//! codec encode IN.wav [-o OUT.opus] [--bitrate 24k] [--complexity 10] [--frame-ms 20]
//!              [--application voip|audio|lowdelay] [--fec --expected-loss 10] [--dtx]
//!              [--stereo] [--vbr|--cvbr|--cbr]
//! codec encode a.wav b.wav -o outdir/      # in parallel on all cores
//! codec decode IN.opus -o OUT.wav [--native] [--max-duration 3600]
//! codec info FILE [--json]
//! ```
//!
//! On failure the exit status is non-zero and stderr has one line per failed
//! file saying what is wrong with it.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use ptt_codec::{
    Application, BitrateMode, ChannelMode, DecoderConfig, EncoderConfig, FrameDuration, OutputRate,
    TruncatedPolicy, decode_ogg_opus_with, encode_wav_file, inspect_ogg_opus, waveform,
    write_atomically,
};
use rayon::prelude::*;

#[derive(Parser)]
#[command(
    name = "codec",
    version,
    about = "Encode, decode and inspect push-to-talk voice clips (WAV ⇄ Ogg Opus)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Encode WAV files to Ogg Opus.
    Encode(EncodeArgs),
    /// Decode an Ogg Opus file to a 16-bit WAV.
    Decode(DecodeArgs),
    /// Describe an Ogg Opus file: duration, rates, bitrate, waveform.
    Info(InfoArgs),
}

#[derive(Clone, Copy, ValueEnum)]
enum AppArg {
    Voip,
    Audio,
    Lowdelay,
}

#[derive(Args)]
struct EncodeArgs {
    /// WAV files to encode.
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
    /// Output file (one input) or directory (several inputs); default: next
    /// to each input with the extension .opus.
    #[arg(short, long)]
    output: Option<PathBuf>,
    /// Target bitrate, in bit/s or with a k suffix (6k to 256k).
    #[arg(long, default_value = "24k", value_parser = parse_bitrate)]
    bitrate: u32,
    /// Encoder complexity, 0 to 10.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u8).range(0..=10))]
    complexity: u8,
    /// Frame duration in milliseconds: 10, 20, 40 or 60.
    #[arg(long, default_value_t = 20, value_parser = parse_frame)]
    frame_ms: u32,
    /// libopus application mode.
    #[arg(long, value_enum, default_value = "voip")]
    application: AppArg,
    /// Unconstrained variable bitrate (the default).
    #[arg(long, group = "rate_mode")]
    vbr: bool,
    /// Constrained variable bitrate.
    #[arg(long, group = "rate_mode")]
    cvbr: bool,
    /// Constant bitrate.
    #[arg(long, group = "rate_mode")]
    cbr: bool,
    /// In-band forward error correction.
    #[arg(long)]
    fec: bool,
    /// Expected packet loss in percent, for FEC (default 10 with --fec).
    #[arg(long, value_parser = clap::value_parser!(u8).range(0..=100))]
    expected_loss: Option<u8>,
    /// Discontinuous transmission during silence.
    #[arg(long)]
    dtx: bool,
    /// Keep stereo instead of downmixing to mono.
    #[arg(long)]
    stereo: bool,
    /// Longest clip accepted, in seconds.
    #[arg(long, default_value = "3600", value_parser = parse_seconds)]
    max_duration: Duration,
    /// Refuse WAV files whose data chunk is cut short instead of encoding
    /// what is there.
    #[arg(long)]
    refuse_truncated: bool,
    /// End an Ogg page after every packet.
    #[arg(long)]
    live: bool,
    /// OpusTags comment KEY=value (repeatable).
    #[arg(long = "comment", value_parser = parse_comment)]
    comments: Vec<(String, String)>,
    /// Files encoded at once (default: all cores).
    #[arg(short, long)]
    jobs: Option<usize>,
    /// Print a timing line per file: wall time against libopus's own encode calls.
    #[arg(long, hide = true)]
    timing: bool,
}

#[derive(Args)]
struct DecodeArgs {
    /// Ogg Opus file.
    input: PathBuf,
    /// WAV file to write.
    #[arg(short, long)]
    output: PathBuf,
    /// Decode at 48 kHz instead of the original input rate.
    #[arg(long)]
    native: bool,
    /// Longest clip decoded, in seconds (a bound on memory: the whole clip
    /// is held while decoding).
    #[arg(long, default_value = "3600", value_parser = parse_seconds)]
    max_duration: Duration,
}

#[derive(Args)]
struct InfoArgs {
    /// Ogg Opus file.
    file: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

fn parse_bitrate(s: &str) -> Result<u32, String> {
    let t = s.trim().to_ascii_lowercase();
    let t = t.strip_suffix("bps").unwrap_or(&t).trim_end_matches('b');
    let (num, mult) = match t.strip_suffix('k') {
        Some(n) => (n, 1000.0),
        None => (t, 1.0),
    };
    let v: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a bitrate such as 24k or 24000"))?;
    let bits = (v * mult).round();
    if !(f64::from(ptt_codec::MIN_BITRATE)..=f64::from(ptt_codec::MAX_BITRATE)).contains(&bits) {
        return Err(format!("{s} is outside 6k to 256k"));
    }
    Ok(bits as u32)
}

fn parse_frame(s: &str) -> Result<u32, String> {
    let ms: u32 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of milliseconds"))?;
    FrameDuration::from_millis(ms)
        .map(|_| ms)
        .ok_or_else(|| format!("{ms} ms is not an Opus frame size here (10, 20, 40 or 60)"))
}

fn parse_seconds(s: &str) -> Result<Duration, String> {
    s.trim()
        .parse::<f64>()
        .ok()
        .and_then(|secs| Duration::try_from_secs_f64(secs).ok())
        .ok_or_else(|| format!("{s:?} is not a number of seconds"))
}

fn parse_comment(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .filter(|(k, _)| !k.is_empty())
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{s:?} is not KEY=value"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Encode(args) => encode(args),
        Command::Decode(args) => decode(&args),
        Command::Info(args) => info(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Batch failures were already reported one line per file.
            if e.downcast_ref::<Reported>().is_none() {
                eprintln!("codec: {e:#}");
            }
            ExitCode::FAILURE
        }
    }
}

/// Marks an error whose details were already printed.
#[derive(Debug, thiserror::Error)]
#[error("{0} of {1} files failed")]
struct Reported(usize, usize);

impl EncodeArgs {
    fn config(&self) -> EncoderConfig {
        EncoderConfig {
            application: match self.application {
                AppArg::Voip => Application::Voip,
                AppArg::Audio => Application::Audio,
                AppArg::Lowdelay => Application::LowDelay,
            },
            bitrate: self.bitrate,
            // The three flags are exclusive (a clap group); none means VBR.
            bitrate_mode: match (self.vbr, self.cvbr, self.cbr) {
                (_, _, true) => BitrateMode::Cbr,
                (_, true, _) => BitrateMode::ConstrainedVbr,
                _ => BitrateMode::Vbr,
            },
            complexity: self.complexity,
            frame: FrameDuration::from_millis(self.frame_ms).unwrap_or_default(),
            channels: if self.stereo {
                ChannelMode::Stereo
            } else {
                ChannelMode::Mono
            },
            fec_expected_loss: if self.fec {
                Some(self.expected_loss.unwrap_or(10))
            } else {
                None
            },
            dtx: self.dtx,
            max_duration: Some(self.max_duration),
            truncated: if self.refuse_truncated {
                TruncatedPolicy::Refuse
            } else {
                TruncatedPolicy::EncodeAvailable
            },
            live: self.live,
            serial: None,
            comments: self.comments.clone(),
        }
    }
}

fn with_opus_extension(input: &Path) -> PathBuf {
    input.with_extension("opus")
}

fn encode(args: EncodeArgs) -> Result<()> {
    if args.expected_loss.is_some() && !args.fec {
        bail!("--expected-loss needs --fec");
    }
    let config = args.config();
    // Where each output goes.
    let jobs: Vec<(PathBuf, PathBuf)> = match (&args.output, args.inputs.len()) {
        (Some(out), 1) if !out.is_dir() && !out.as_os_str().to_string_lossy().ends_with('/') => {
            vec![(args.inputs[0].clone(), out.clone())]
        }
        (Some(dir), _) => {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create output directory {}", dir.display()))?;
            args.inputs
                .iter()
                .map(|i| {
                    let name =
                        with_opus_extension(Path::new(i.file_name().unwrap_or(i.as_os_str())));
                    (i.clone(), dir.join(name))
                })
                .collect()
        }
        (None, _) => args
            .inputs
            .iter()
            .map(|i| (i.clone(), with_opus_extension(i)))
            .collect(),
    };

    let mut seen = std::collections::HashSet::new();
    for (input, output) in &jobs {
        if !seen.insert(output) {
            bail!(
                "{}: another input also writes {} (same file name)",
                input.display(),
                output.display()
            );
        }
    }

    if jobs.len() == 1 {
        let (input, output) = &jobs[0];
        return encode_one(input, output, &config, args.timing);
    }

    let bar = if std::io::stderr().is_terminal() {
        let bar = ProgressBar::new(jobs.len() as u64);
        bar.set_style(
            ProgressStyle::with_template(
                "{bar:40} {pos}/{len} files, {elapsed} ({eta} left) {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar
    } else {
        ProgressBar::hidden()
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(args.jobs.unwrap_or(0))
        .build()
        .context("cannot start worker threads")?;
    let failed = AtomicUsize::new(0);
    pool.install(|| {
        jobs.par_iter().for_each(|(input, output)| {
            if let Err(e) = encode_one(input, output, &config, args.timing) {
                failed.fetch_add(1, Ordering::Relaxed);
                bar.suspend(|| eprintln!("codec: {e:#}"));
            }
            bar.inc(1);
        });
    });
    bar.finish_and_clear();
    let failed = failed.into_inner();
    if failed > 0 {
        return Err(Reported(failed, jobs.len()).into());
    }
    Ok(())
}

fn encode_one(input: &Path, output: &Path, config: &EncoderConfig, timing: bool) -> Result<()> {
    let start = Instant::now();
    let summary =
        encode_wav_file(input, output, config).with_context(|| format!("{}", input.display()))?;
    let wall = start.elapsed();
    for w in &summary.warnings {
        eprintln!("codec: warning: {}: {w}", input.display());
    }
    if timing {
        let opus = summary.opus_encode_time.as_secs_f64();
        eprintln!(
            "timing file={} audio_s={:.3} wall_s={:.6} opus_s={:.6} wall_over_opus={:.4} realtime_x={:.1}",
            input.display(),
            summary.duration_secs(),
            wall.as_secs_f64(),
            opus,
            wall.as_secs_f64() / opus.max(1e-9),
            summary.duration_secs() / wall.as_secs_f64().max(1e-9),
        );
    }
    Ok(())
}

fn decode(args: &DecodeArgs) -> Result<()> {
    let file = std::fs::File::open(&args.input)
        .with_context(|| format!("{}: cannot open", args.input.display()))?;
    let config = DecoderConfig {
        rate: if args.native {
            OutputRate::Native48k
        } else {
            OutputRate::Original
        },
        max_duration: Some(args.max_duration),
    };
    let audio = decode_ogg_opus_with(std::io::BufReader::new(file), &config)
        .with_context(|| format!("{}", args.input.display()))?;
    write_atomically(&args.output, |w| audio.write_wav(w))
        .with_context(|| format!("{}: cannot write", args.output.display()))?;
    Ok(())
}

fn info(args: &InfoArgs) -> Result<()> {
    let file = std::fs::File::open(&args.file)
        .with_context(|| format!("{}: cannot open", args.file.display()))?;
    let info = inspect_ogg_opus(std::io::BufReader::new(file))
        .with_context(|| format!("{}", args.file.display()))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&info)?);
        return Ok(());
    }
    println!("file:       {}", args.file.display());
    println!("duration:   {:.3} s", info.duration_secs);
    println!("input rate: {} Hz", info.input_sample_rate);
    println!("channels:   {}", info.channels);
    println!(
        "bitrate:    {:.1} kbit/s (average)",
        info.average_bitrate / 1000.0
    );
    println!("pre-skip:   {} samples at 48 kHz", info.pre_skip);
    println!("packets:    {}", info.packets);
    println!("vendor:     {}", info.vendor);
    for (k, v) in &info.comments {
        println!("comment:    {k}={v}");
    }
    println!("waveform:   {}", waveform::render_text(&info.waveform));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitrates_parse() {
        assert_eq!(parse_bitrate("24k"), Ok(24_000));
        assert_eq!(parse_bitrate("24000"), Ok(24_000));
        assert_eq!(parse_bitrate("6.5k"), Ok(6_500));
        assert_eq!(parse_bitrate("64kbps"), Ok(64_000));
        assert!(parse_bitrate("5k").is_err());
        assert!(parse_bitrate("fast").is_err());
        assert!(parse_frame("30").is_err());
        assert_eq!(parse_comment("A=b=c"), Ok(("A".into(), "b=c".into())));
        assert_eq!(parse_seconds("1.5"), Ok(Duration::from_millis(1_500)));
        for bad in ["-1", "inf", "NaN", "1e300", "soon"] {
            assert!(parse_seconds(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
