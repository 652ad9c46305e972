//! `ptt listen` and `ptt history`: clips as they arrive (catch-up, then
//! live) or the group's recent clips, one line each with a waveform, saved
//! as Ogg Opus files on request.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use indicatif::ProgressBar;
use ptt_client::{Client, ClientError, ClipId, Event, Events};
use tokio::time::Instant;

use crate::clip::{ClipInProgress, file_name};
use crate::config::StoredLogin;
use crate::exit::{TIMEOUT, lost, status};
use crate::session::{ConnectOptions, Ui, connect};
use crate::waveform;

/// Clips received at once at most (the client lets the relay open 256 clip
/// streams; more in-progress clips than that are not possible).
const MAX_CLIPS_IN_PROGRESS: usize = 256;

/// Characters of the waveform column.
const WAVEFORM_WIDTH: usize = 40;

/// What `ptt listen` was asked to do.
#[derive(Debug, Clone)]
pub struct ListenArgs {
    /// The group.
    pub group: String,
    /// Save each clip as an Ogg Opus file in this folder.
    pub save: Option<PathBuf>,
    /// Report each clip as played once printed (and saved).
    pub played: bool,
    /// Stop after this many clips.
    pub count: Option<u64>,
    /// Stop after this long.
    pub timeout: Option<Duration>,
}

/// What `ptt history` was asked to do.
#[derive(Debug, Clone)]
pub struct HistoryArgs {
    /// The group.
    pub group: String,
    /// How many recent clips (1 to 100).
    pub count: u32,
    /// Save each clip as an Ogg Opus file in this folder.
    pub save: Option<PathBuf>,
    /// Give up after this long.
    pub timeout: Duration,
}

/// A clip received whole.
#[derive(Debug)]
struct Received {
    seq: u64,
    line: String,
}

/// Runs `ptt listen`.
pub async fn listen(ui: &Ui, login: &StoredLogin, args: &ListenArgs) -> Result<()> {
    prepare_dir(args.save.as_deref())?;
    // Acknowledged by hand once printed and saved: a clip that could not be
    // saved is not acknowledged, so it comes again next time.
    let (client, mut events) = connect(
        login,
        ConnectOptions {
            auto_ack: false,
            reconnect: true,
        },
    )
    .await?;
    let result = listen_on(ui, &client, &mut events, args).await;
    client.close().await;
    result
}

async fn listen_on(ui: &Ui, client: &Client, events: &mut Events, args: &ListenArgs) -> Result<()> {
    let info = client
        .join(&args.group)
        .await
        .with_context(|| format!("cannot join {}", args.group))?;
    let waiting = info.last_seq.saturating_sub(info.cursor);
    ui.status(&format!(
        "joined {} ({}): {waiting} clip{} to catch up",
        info.group,
        crate::session::mode_name(info.mode),
        if waiting == 1 { "" } else { "s" }
    ));
    let spinner = ui.spinner(format!("listening to {}", args.group));
    let mut receiver = Receiver::new(ui, &args.group, args.save.as_deref(), spinner.clone());
    let deadline = args.timeout.map(|t| Instant::now() + t);
    let mut received: u64 = 0;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let outcome = loop {
        if args.count.is_some_and(|n| received >= n) {
            break Ok(());
        }
        let event = tokio::select! {
            event = events.next() => event,
            _ = sleep_until(deadline) => {
                break match args.count {
                    Some(n) => Err(status(TIMEOUT, format!(
                        "timed out after {received} of {n} clips"
                    ))),
                    None => Ok(()),
                };
            }
            _ = &mut ctrl_c => break Ok(()),
        };
        let Some(event) = event else {
            break Err(status(
                crate::exit::UNREACHABLE,
                "the connection was closed",
            ));
        };
        if let Some(clip) = receiver.handle(event)? {
            ui.result(&clip.line);
            client.ack(&args.group, clip.seq).await?;
            if args.played {
                client.played(&args.group, clip.seq).await?;
            }
            received += 1;
            spinner.set_message(format!(
                "listening to {}: {received} clip{}",
                args.group,
                if received == 1 { "" } else { "s" }
            ));
        }
    };
    spinner.finish_and_clear();
    outcome
}

/// Runs `ptt history`.
pub async fn history(ui: &Ui, login: &StoredLogin, args: &HistoryArgs) -> Result<()> {
    prepare_dir(args.save.as_deref())?;
    // Looking at history must not move the cursor that `ptt listen` catches
    // up from: the group is not joined (the relay ignores acknowledgements
    // for groups not joined on the connection), and none is sent anyway.
    let (client, mut events) = connect(
        login,
        ConnectOptions {
            auto_ack: false,
            reconnect: false,
        },
    )
    .await?;
    let result = history_on(ui, &client, &mut events, args).await;
    client.close().await;
    let mut clips = result?;
    clips.sort_by_key(|c| c.seq);
    for clip in &clips {
        ui.result(&clip.line);
    }
    Ok(())
}

async fn history_on(
    ui: &Ui,
    client: &Client,
    events: &mut Events,
    args: &HistoryArgs,
) -> Result<Vec<Received>> {
    let bar = ui.bar(
        u64::from(args.count),
        "{spinner} fetching {msg} [{bar:30}] {pos}/{len} clips",
    );
    bar.set_message(args.group.clone());
    let mut receiver = Receiver::new(ui, &args.group, args.save.as_deref(), bar.clone());
    let fetch = client.fetch_recent(&args.group, args.count);
    tokio::pin!(fetch);
    let deadline = Instant::now() + args.timeout;
    let mut expected: Option<u32> = None;
    let mut clips = Vec::new();
    let mut ended: u32 = 0;
    loop {
        if expected.is_some_and(|n| ended >= n) {
            break;
        }
        tokio::select! {
            r = &mut fetch, if expected.is_none() => {
                let n = r.with_context(|| format!("cannot fetch the history of {}", args.group))?;
                bar.set_length(u64::from(n));
                expected = Some(n);
            }
            event = events.next() => {
                let Some(event) = event else {
                    return Err(status(crate::exit::UNREACHABLE, "the connection was closed"));
                };
                let aborted = matches!(event, Event::ClipAborted { .. });
                if let Some(clip) = receiver.handle(event)? {
                    clips.push(clip);
                    ended += 1;
                } else if aborted {
                    ended += 1;
                }
                bar.set_position(u64::from(ended));
            }
            _ = tokio::time::sleep_until(deadline) => {
                return Err(status(TIMEOUT, format!(
                    "timed out after {} of {} clips",
                    clips.len(),
                    expected.map_or("?".to_owned(), |n| n.to_string())
                )));
            }
        }
    }
    bar.finish_and_clear();
    Ok(clips)
}

/// Turns events into whole clips: gathers frames, saves, formats the line;
/// tells the user about the rest.
struct Receiver<'a> {
    ui: &'a Ui,
    group: &'a str,
    save: Option<&'a Path>,
    status: ProgressBar,
    clips: HashMap<ClipId, ClipInProgress>,
}

impl<'a> Receiver<'a> {
    fn new(ui: &'a Ui, group: &'a str, save: Option<&'a Path>, status: ProgressBar) -> Self {
        Receiver {
            ui,
            group,
            save,
            status,
            clips: HashMap::new(),
        }
    }

    /// Handles one event; a clip received whole (and saved) is returned.
    fn handle(&mut self, event: Event) -> Result<Option<Received>> {
        match event {
            Event::ClipStarted {
                group,
                clip_id,
                talker,
                history,
                header,
                ..
            } if group == self.group => {
                if self.clips.len() >= MAX_CLIPS_IN_PROGRESS {
                    self.ui
                        .status(&format!("too many clips at once: skipping {talker}'s"));
                    return Ok(None);
                }
                if !history {
                    self.status
                        .set_message(format!("{talker} is talking in {group}"));
                }
                self.clips
                    .insert(clip_id, ClipInProgress::new(header, talker));
            }
            Event::Frame {
                clip_id,
                index,
                data,
                ..
            } => {
                if let Some(clip) = self.clips.get_mut(&clip_id)
                    && !clip.push(index, data)
                {
                    let talker = self.clips.remove(&clip_id).map(|c| c.talker);
                    self.ui.status(&format!(
                        "a clip from {} is too large to keep: skipped",
                        talker.unwrap_or_default()
                    ));
                }
            }
            Event::ClipEnded {
                clip_id,
                seq,
                waveform,
                ..
            } => {
                if let Some(clip) = self.clips.remove(&clip_id) {
                    return self.finished(clip, seq, &waveform).map(Some);
                }
            }
            Event::ClipAborted { clip_id, code, .. } => {
                if let Some(clip) = self.clips.remove(&clip_id) {
                    let what = match code {
                        ptt_client::ErrorCode::SlowReceiver | ptt_client::ErrorCode::None => {
                            "it comes again from the store"
                        }
                        _ => "discarded",
                    };
                    self.ui
                        .status(&format!("{}'s clip was cut ({code}): {what}", clip.talker));
                }
            }
            Event::CaughtUp { group, seq } if group == self.group => {
                self.ui
                    .status(&format!("caught up with {group} (to #{seq}); now live"));
            }
            Event::Gap {
                group,
                from_seq,
                to_seq,
            } if group == self.group => {
                self.ui.status(&format!(
                    "clips #{from_seq} to #{to_seq} of {group} expired before they reached you"
                ));
            }
            Event::FloorTaken { group, user, .. } if group == self.group => {
                self.status
                    .set_message(format!("{user} holds the floor of {group}"));
            }
            Event::FloorIdle { group } if group == self.group => {
                self.status.set_message(format!("listening to {group}"));
            }
            Event::GroupLeft { group, code } if group == self.group => {
                return Err(anyhow::Error::new(ClientError::Relay {
                    code,
                    message: format!("no longer receiving {group}"),
                }));
            }
            Event::RejoinFailed {
                group,
                code,
                message,
            } if group == self.group => {
                return Err(anyhow::Error::new(ClientError::Relay { code, message })
                    .context(format!("cannot join {group} again after reconnecting")));
            }
            Event::Disconnected {
                code,
                reason,
                reconnecting,
            } => {
                self.clips.clear();
                if !reconnecting {
                    return Err(lost(code, &reason));
                }
                self.ui
                    .status(&format!("connection lost ({reason}); reconnecting"));
            }
            Event::Reconnected { attempts, .. } => {
                self.ui
                    .status(&format!("reconnected after {attempts} attempt(s)"));
            }
            _ => {}
        }
        Ok(None)
    }

    fn finished(&self, clip: ClipInProgress, seq: u64, preview: &[u8]) -> Result<Received> {
        let path = match self.save {
            Some(dir) => {
                let path = file_name(dir, self.group, seq);
                clip.save_ogg(&path, seq)?;
                format!(" {}", path.display())
            }
            None => String::new(),
        };
        let created = std::time::UNIX_EPOCH + Duration::from_millis(clip.header.created_ms);
        let line = format!(
            "{} #{seq} {} {} {:.2}s {}{path}",
            self.group,
            humantime::format_rfc3339_seconds(created),
            clip.talker,
            clip.duration_ms() as f64 / 1000.0,
            waveform::render(preview, WAVEFORM_WIDTH),
        );
        Ok(Received { seq, line })
    }
}

fn prepare_dir(dir: Option<&Path>) -> Result<()> {
    if let Some(dir) = dir {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    Ok(())
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
