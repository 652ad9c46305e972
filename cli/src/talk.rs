//! `ptt talk`: a WAV file, or raw PCM from stdin as a microphone gives it,
//! encoded to Opus here and sent live, frame by frame.

use std::io::BufReader;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use ptt_client::{EncoderConfig, Event, Events, PcmTalk};
use ptt_codec::{MAX_SAMPLE_RATE, MIN_SAMPLE_RATE, WavSource};
use tokio::io::AsyncReadExt;
use tokio::time::Instant;

use crate::config::StoredLogin;
use crate::exit::{BAD_INPUT, UNREACHABLE, lost, status};
use crate::session::{ConnectOptions, Ui, connect};

/// What `ptt talk` was asked to do.
#[derive(Debug, Clone)]
pub struct TalkArgs {
    /// The group.
    pub group: String,
    /// A WAV file, or `-` for raw PCM on stdin.
    pub input: PathBuf,
    /// Stdin's sample rate.
    pub rate: u32,
    /// Stdin's channel count.
    pub channels: u16,
    /// Send a file as fast as the connection allows instead of in real time.
    pub fast: bool,
    /// Talk with emergency priority.
    pub emergency: bool,
}

/// Where the audio comes from.
enum Input {
    Wav(WavSource<BufReader<std::fs::File>>),
    Stdin,
}

/// Runs `ptt talk`.
pub async fn run(ui: &Ui, login: &StoredLogin, args: &TalkArgs) -> Result<()> {
    let (input, rate, channels) = open_input(args)?;
    let (client, mut events) = connect(
        login,
        ConnectOptions {
            auto_ack: true,
            reconnect: false,
        },
    )
    .await?;
    let max_clip_ms = client.welcome().limits.max_clip_ms;
    let result = {
        let talk = async {
            let pcm = client
                .talk_pcm(
                    &args.group,
                    rate,
                    channels,
                    &EncoderConfig::default(),
                    args.emergency,
                )
                .await
                .with_context(|| format!("cannot talk in {}", args.group))?;
            let sent_ms = match input {
                Input::Wav(source) => send_wav(ui, pcm, source, args, max_clip_ms).await?,
                Input::Stdin => send_stdin(ui, pcm, rate, channels, max_clip_ms).await?,
            };
            Ok::<_, anyhow::Error>(sent_ms)
        };
        tokio::select! {
            r = talk => r,
            e = drain(&mut events) => Err(e),
        }
    };
    client.close().await;
    let (stored, ms) = result?;
    if ui.interactive() {
        ui.result(&format!(
            "stored as #{} in {} ({:.2} s)",
            stored.seq,
            stored.group,
            ms as f64 / 1000.0
        ));
    } else {
        ui.result(&stored.seq.to_string());
    }
    Ok(())
}

fn open_input(args: &TalkArgs) -> Result<(Input, u32, u16)> {
    if args.input.as_os_str() == "-" {
        if !(MIN_SAMPLE_RATE..=MAX_SAMPLE_RATE).contains(&args.rate) {
            return Err(status(
                BAD_INPUT,
                format!(
                    "--rate {} is outside {MIN_SAMPLE_RATE}..={MAX_SAMPLE_RATE}",
                    args.rate
                ),
            ));
        }
        return Ok((Input::Stdin, args.rate, args.channels));
    }
    let file = std::fs::File::open(&args.input)
        .with_context(|| format!("cannot open {}", args.input.display()))
        .map_err(|e| status(BAD_INPUT, format!("{e:#}")))?;
    let source = WavSource::open(BufReader::new(file), &EncoderConfig::default())
        .with_context(|| format!("{} is not a usable WAV file", args.input.display()))?;
    let (rate, channels) = (source.info().sample_rate, source.info().channels);
    Ok((Input::Wav(source), rate, channels))
}

/// Sends a WAV file in 20 ms blocks, paced in real time unless `--fast`;
/// returns the stored clip and its length in ms.
async fn send_wav(
    ui: &Ui,
    mut pcm: PcmTalk,
    mut source: WavSource<BufReader<std::fs::File>>,
    args: &TalkArgs,
    max_clip_ms: u32,
) -> Result<(ptt_client::StoredClip, u64)> {
    let info = source.info().clone();
    let rate = u64::from(info.sample_rate);
    let total_ms = info.frames * 1000 / rate;
    if total_ms > usable_audio_ms(max_clip_ms) {
        pcm.abort();
        return Err(status(
            BAD_INPUT,
            format!(
                "{} lasts {:.1} s; the relay takes clips of at most {:.1} s",
                args.input.display(),
                total_ms as f64 / 1000.0,
                f64::from(max_clip_ms) / 1000.0
            ),
        ));
    }
    let bar = ui.bar(
        total_ms,
        "{spinner} talking in {msg} [{bar:30}] {pos}/{len} ms [{elapsed}]",
    );
    bar.set_message(args.group.clone());
    let block = (info.sample_rate / 50).max(1) as usize;
    let mut buf = Vec::new();
    let start = Instant::now();
    let mut frames: u64 = 0;
    loop {
        let n = source
            .read_f32(&mut buf, block)
            .with_context(|| format!("cannot read {}", args.input.display()))?;
        if n == 0 {
            break;
        }
        pcm.push_f32(&buf).await?;
        frames += n as u64;
        bar.set_position(frames * 1000 / rate);
        if !args.fast {
            tokio::time::sleep_until(start + Duration::from_micros(frames * 1_000_000 / rate))
                .await;
        }
    }
    bar.set_message(format!("{}: waiting for the relay to store it", args.group));
    let stored = pcm.finish().await?;
    bar.finish_and_clear();
    Ok((stored, frames * 1000 / rate))
}

/// Sends s16le PCM from stdin as it comes, paced in real time (a
/// microphone's pace: data that arrives faster waits for its media time),
/// until end of input, Ctrl-C, or the relay's longest clip.
async fn send_stdin(
    ui: &Ui,
    mut pcm: PcmTalk,
    rate: u32,
    channels: u16,
    max_clip_ms: u32,
) -> Result<(ptt_client::StoredClip, u64)> {
    let bar = ui.spinner("talking from stdin (end of input or Ctrl-C sends)");
    let frame_bytes = 2 * usize::from(channels);
    let mut stdin = tokio::io::stdin();
    let mut raw = vec![0u8; (rate as usize / 50).max(1) * frame_bytes];
    let mut pending: Vec<u8> = Vec::with_capacity(raw.len() * 2);
    let mut samples: Vec<i16> = Vec::with_capacity(raw.len() / 2);
    let max_frames = usable_audio_ms(max_clip_ms).saturating_mul(u64::from(rate)) / 1000;
    let start = Instant::now();
    let mut frames: u64 = 0;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        let n = tokio::select! {
            r = stdin.read(&mut raw) => r.context("cannot read stdin")?,
            _ = &mut ctrl_c => 0,
        };
        if n == 0 {
            break;
        }
        pending.extend_from_slice(&raw[..n]);
        let whole = pending.len() / frame_bytes * frame_bytes;
        let room = usize::try_from(max_frames - frames)
            .unwrap_or(usize::MAX)
            .saturating_mul(frame_bytes);
        let take = whole.min(room);
        samples.clear();
        samples.extend(
            pending[..take]
                .chunks_exact(2)
                .map(|b| i16::from_le_bytes([b[0], b[1]])),
        );
        pending.drain(..take);
        pcm.push_i16(&samples).await?;
        frames += (take / frame_bytes) as u64;
        bar.set_message(format!(
            "talking from stdin: {:.1} s (end of input or Ctrl-C sends)",
            frames as f64 / f64::from(rate)
        ));
        if frames >= max_frames {
            ui.status(&format!(
                "the relay takes clips of at most {:.1} s: sending what was recorded",
                f64::from(max_clip_ms) / 1000.0
            ));
            break;
        }
        tokio::time::sleep_until(
            start + Duration::from_micros(frames * 1_000_000 / u64::from(rate)),
        )
        .await;
    }
    if frames == 0 {
        pcm.abort();
        return Err(status(BAD_INPUT, "no audio on stdin"));
    }
    bar.set_message("waiting for the relay to store it");
    let stored = pcm.finish().await?;
    bar.finish_and_clear();
    Ok((stored, frames * 1000 / u64::from(rate)))
}

/// How much audio fits in a clip of at most `max_clip_ms` (0: no limit):
/// the encoder sends whole frames, one more than the audio needs for its
/// lookahead (6.5 ms), so the audio must leave one frame free below the
/// last whole frame that fits.
fn usable_audio_ms(max_clip_ms: u32) -> u64 {
    if max_clip_ms == 0 {
        return u64::MAX;
    }
    let frame = u64::from(EncoderConfig::default().frame.millis());
    (u64::from(max_clip_ms) / frame * frame).saturating_sub(frame)
}

/// Takes events while the talk goes on (the client answers requests on the
/// task that fills them); returns only when the connection ended, with why.
async fn drain(events: &mut Events) -> anyhow::Error {
    loop {
        match events.next().await {
            Some(Event::Disconnected {
                code,
                reason,
                reconnecting: false,
            }) => return lost(code, &reason),
            Some(_) => {}
            None => return status(UNREACHABLE, "the connection was closed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_audio_that_fits_leaves_a_frame_for_the_encoder_delay() {
        assert_eq!(usable_audio_ms(1_000), 980);
        assert_eq!(usable_audio_ms(1_019), 980);
        assert_eq!(usable_audio_ms(60_000), 59_980);
        assert_eq!(usable_audio_ms(10), 0);
        assert_eq!(usable_audio_ms(0), u64::MAX);
    }
}
