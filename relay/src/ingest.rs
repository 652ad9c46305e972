//! Receiving a talker's clip: one task per uploaded stream, owned by the
//! talker's session.
//!
//! Each message is checked by [`ClipReader`]; each frame goes straight into
//! the clip's shared buffer, from where every member's writer picks it up.
//! At the end the clip is appended to the group log, and once that is
//! durable the talker gets `Stored`; the members get the clip's end when the
//! log publishes it, in sequence order (see [`crate::hub`]).

use std::io::Cursor;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ptt_protocol::{
    ClipEvent, ClipFormat, ClipHeader, ClipReader, ControlMessage, ErrorCode, FramedReader,
    GroupMode, ReadError, SessionState, message::MAX_PAYLOAD_LEN,
};

use crate::command::{SessionCommand, SessionHandle};
use crate::context::RelayContext;
use crate::floor::{FloorGrant, Talker};
use crate::live::LiveClip;
use crate::log::LiveEvent;
use crate::metrics::Metrics;
use crate::store::{AppendOutcome, ClipMeta, NewClip};
use crate::transport::{Connection, RecvStream};

/// Longest the talker's `Stored` waits for the clip's publication.
const PUBLISH_WAIT: Duration = Duration::from_secs(2);

/// The rate Opus is decoded at, and what a transcoded clip announces.
const OPUS_RATE: u32 = 48_000;

/// Who is uploading.
#[derive(Debug, Clone)]
pub struct Uploader {
    /// The session as the hub knows it.
    pub handle: SessionHandle,
    /// Whether the token allows emergency priority.
    pub emergency: bool,
    /// The session's rate and concurrency limits.
    pub state: Arc<Mutex<SessionState>>,
    /// The connection, closed when refused uploads exhaust the session's
    /// control-message budget.
    pub conn: Connection,
    /// Whether refused uploads are charged to that budget (admins' are
    /// not, as their control messages are not).
    pub charged: bool,
    /// The connection's UDP media path, if open: the upload's frames may
    /// also come by its uplink (PROTOCOL.md §14.3).
    pub media: Option<Arc<crate::media::MediaPeer>>,
}

/// A refusal of an upload: the code and a message for the talker.
struct Refusal(ErrorCode, String);

impl<E: std::fmt::Display> From<(ErrorCode, E)> for Refusal {
    fn from((code, msg): (ErrorCode, E)) -> Refusal {
        Refusal(code, msg.to_string())
    }
}

/// Receives one clip upload to its end.
pub async fn run(recv: RecvStream, ctx: Arc<RelayContext>, who: Uploader) {
    let stream_id = recv.quic_id();
    let mut upload = Upload {
        stream_id,
        uplink: None,
        ctx: &ctx,
        who: &who,
        reader: ClipReader::new(ctx.clip_limits(ClipFormat::Opus)),
        clip: None,
        header: None,
        walkie: false,
        wav: Vec::new(),
        started: false,
        finished: false,
        frames_in: 0,
        bytes_in: 0,
        user_frames: None,
    };
    let mut reader = FramedReader::new(recv, MAX_PAYLOAD_LEN);
    let result = upload.receive(&mut reader).await;
    let metrics = Metrics::get();
    metrics.frames_in.increment(upload.frames_in);
    metrics.bytes_in.increment(upload.bytes_in);
    if let Err(Refusal(code_, _)) = &result
        && *code_ != ErrorCode::Duplicate
    {
        crate::metrics::clip_rejected(*code_);
    }
    if upload.started {
        lock(&who.state).handle_clip_done();
    }
    if upload.walkie
        && let Some(header) = &upload.header
    {
        ctx.floor.release(&header.group, who.handle.id).await;
    }
    let Err(Refusal(code_, message)) = result else {
        return;
    };
    tracing::debug!(code = %code_, %message, "clip refused");
    // A refused upload costs the relay a task, a header read and a
    // ClipRejected, as a control message does: it is charged to the same
    // budget, so a client that opens stream after stream only to have
    // them refused is closed like one that floods control messages. The
    // relay's own refusals (draining, store trouble, pre-emption) and
    // duplicates (a re-send after a reconnect) are not the client's doing.
    let relays_doing = matches!(
        code_,
        ErrorCode::Duplicate
            | ErrorCode::ShuttingDown
            | ErrorCode::Internal
            | ErrorCode::Preempted
            | ErrorCode::ClipAborted
    );
    if who.charged && !relays_doing && lock(&who.state).handle_control(Instant::now()).is_err() {
        Metrics::get().control_rate_limited.increment(1);
        tracing::info!("closing: too many refused uploads");
        who.conn
            .close(ErrorCode::RateLimited.code(), b"too many refused uploads");
        return;
    }
    if !upload.finished {
        // STOP_SENDING only where the talker still writes.
        reader.get_mut().stop(code_).ok();
    }
    if let Some(clip) = upload.clip.take() {
        let reason = if code_ == ErrorCode::Preempted {
            code_
        } else {
            ErrorCode::ClipAborted
        };
        upload.abort(&clip, reason);
    }
    if code_ == ErrorCode::Duplicate {
        // The talker already has its answer: `Stored` with the seq.
        return;
    }
    let clip_id = upload.header.map(|h| h.clip_id).unwrap_or_default();
    who.handle
        .send_wait(SessionCommand::send(ControlMessage::ClipRejected {
            clip_id,
            code: code_,
            message,
        }))
        .await;
}

struct Upload<'a> {
    /// The upload stream's QUIC id, named by the talker's uplink packets.
    stream_id: u64,
    /// The upload's registration with the media path's uplink, while live.
    uplink: Option<crate::media::UploadRegistration>,
    ctx: &'a Arc<RelayContext>,
    who: &'a Uploader,
    reader: ClipReader,
    clip: Option<Arc<LiveClip>>,
    header: Option<ClipHeader>,
    /// The upload took (or holds) the floor of a walkie group.
    walkie: bool,
    wav: Vec<u8>,
    started: bool,
    /// The talker's FIN arrived.
    finished: bool,
    /// Frames and bytes received, added to the metrics at the end.
    frames_in: u64,
    bytes_in: u64,
    /// The uploader's share of `user_frames_per_second`, from the header on.
    user_frames: Option<crate::limits::UserFrames>,
}

impl Upload<'_> {
    async fn receive(&mut self, reader: &mut FramedReader<RecvStream>) -> Result<(), Refusal> {
        loop {
            // Frames that media members hold for a `Frames` packet go when
            // their budget is spent, even if the next frame is slow to come
            // (PROTOCOL.md §14.3): this task wakes for them (the reader is
            // cancel-safe).
            let next = match &self.clip {
                Some(clip) => {
                    let due = clip.media_due();
                    tokio::select! {
                        biased;
                        () = sleep_until_opt(due) => {
                            clip.flush_media_due(Instant::now());
                            continue;
                        }
                        () = clip.media_due_set(), if due.is_none() => continue,
                        next = reader.next_clip() => next,
                    }
                }
                None => reader.next_clip().await,
            };
            let (message, frame) = match next {
                Ok(Some(next)) => next,
                // FIN before ClipEnd, at a frame boundary or inside one.
                Ok(None) | Err(ReadError::Truncated) => {
                    self.finished = true;
                    return Err(Refusal(
                        ErrorCode::OutOfOrder,
                        "the stream ended before the clip end".into(),
                    ));
                }
                Err(ReadError::Stream(_)) => {
                    // The talker vanished (or reset the stream): discard.
                    self.finished = true;
                    if let Some(clip) = self.clip.take() {
                        self.abort(&clip, ErrorCode::ClipAborted);
                    }
                    return Ok(());
                }
                Err(ReadError::Decode(e)) => return Err(Refusal(e.code(), e.to_string())),
            };
            let now = Instant::now();
            let event = self
                .reader
                .handle_message(message, now)
                .map_err(|e| Refusal::from((e.code(), e)))?;
            if self.handle(event, frame.raw, now).await? {
                return Ok(());
            }
        }
    }

    /// Handles one checked event; `true` when the clip is done.
    async fn handle(
        &mut self,
        event: ClipEvent,
        raw: Bytes,
        now: Instant,
    ) -> Result<bool, Refusal> {
        match event {
            ClipEvent::Started(header) => {
                self.start(header).await?;
                Ok(false)
            }
            ClipEvent::Frame { index, data } => {
                self.frames_in += 1;
                self.bytes_in += raw.len() as u64;
                // A frame the uplink brought first was counted then.
                let uplinked = self.clip.as_ref().is_some_and(|c| c.was_uplinked(index));
                if let Some(user_frames) = &self.user_frames
                    && !uplinked
                    && user_frames.frame(now).is_err()
                {
                    metrics::counter!("ptt_clips_rejected_total", "reason" => "user_frame_rate")
                        .increment(1);
                    return Err(Refusal(
                        ErrorCode::RateLimited,
                        format!(
                            "clip refused: more than {} frames a second (burst {}) for this user",
                            self.ctx.config.user_frames_per_second,
                            self.ctx.config.user_frames_burst
                        ),
                    ));
                }
                if let Some(clip) = &self.clip {
                    if let crate::live::ClipState::Aborted(code) = clip.state() {
                        return Err(Refusal(code, "the clip was cut by the relay".into()));
                    }
                    if self.ctx.log.publishes_live() {
                        self.ctx.log.publish_live(LiveEvent::Frame {
                            group: clip.meta.group.clone(),
                            clip_id: clip.meta.clip_id,
                            index,
                            data: data.clone(),
                        });
                    }
                    clip.push_frame(raw, data);
                } else {
                    if self.wav.len() + data.len() > self.ctx.config.max_wav_bytes as usize {
                        return Err(Refusal(ErrorCode::TooLarge, "WAV upload too large".into()));
                    }
                    self.wav.extend_from_slice(&data);
                }
                Ok(false)
            }
            ClipEvent::Ended { waveform, .. } => {
                // Every frame is in: nothing more to take from the uplink.
                self.uplink = None;
                self.end(waveform).await?;
                Ok(true)
            }
        }
    }

    async fn start(&mut self, header: ClipHeader) -> Result<(), Refusal> {
        let who = self.who;
        // Known from here on, so that a refusal names the clip.
        self.header = Some(header.clone());
        let span = tracing::Span::current();
        span.record("group", header.group.as_str());
        span.record("clip", tracing::field::display(header.clip_id));
        lock(&who.state)
            .handle_clip_start(Instant::now())
            .map_err(|c| Refusal(c, format!("clip refused: {c}")))?;
        self.started = true;
        // Over all of the user's connections, not only this one.
        self.ctx
            .user_clips
            .start(
                &who.handle.user,
                self.ctx.config.user_clips_per_minute,
                Instant::now(),
            )
            .map_err(|c| {
                metrics::counter!("ptt_clips_rejected_total", "reason" => "user_rate").increment(1);
                Refusal(
                    c,
                    format!(
                        "clip refused: more than {} clips a minute for this user",
                        self.ctx.config.user_clips_per_minute
                    ),
                )
            })?;
        self.user_frames = Some(self.ctx.user_frames.user(&who.handle.user, Instant::now()));
        let info = self
            .ctx
            .hub
            .talker_group(&header.group, &who.handle.user)
            .await
            .map_err(|c| Refusal(c, format!("cannot talk in {}", header.group)))?;
        if let Some(channel) = info.channel {
            self.channel_limits(&header, channel.limits).await?;
        }
        let emergency = header.flags & ClipHeader::FLAG_EMERGENCY != 0;
        if emergency && !who.emergency {
            return Err(Refusal(
                ErrorCode::Forbidden,
                "token lacks the emergency claim".into(),
            ));
        }
        // A retry of a clip that is already stored: acknowledge, drop.
        if let Some(seq) = self
            .ctx
            .log
            .clip_seq(&header.group, header.clip_id)
            .await
            .map_err(|e| Refusal(e.code(), e.to_string()))?
        {
            who.handle
                .send_wait(SessionCommand::send(ControlMessage::Stored {
                    group: header.group.clone(),
                    clip_id: header.clip_id,
                    seq,
                }))
                .await;
            return Err(Refusal(ErrorCode::Duplicate, "clip stored before".into()));
        }
        if header.format == ClipFormat::Wav {
            Metrics::get().clips_started.increment(1);
            // Recorded clips are not spoken live: no floor, no live copy
            // until transcoded.
            self.reader
                .set_limits(self.ctx.clip_limits(ClipFormat::Wav));
            return Ok(());
        }
        if info.mode == GroupMode::Walkie {
            let talker = Talker {
                session: who.handle.id,
                user: who.handle.user.clone(),
            };
            let hold = Duration::from_millis(u64::from(info.max_clip_ms));
            let grant = self
                .ctx
                .floor
                .request(&header.group, &talker, emergency, hold)
                .await;
            self.walkie = true;
            let metrics = Metrics::get();
            match grant {
                FloorGrant::Granted => metrics.floor_grants.increment(1),
                FloorGrant::Denied { holder } => {
                    metrics.floor_denials.increment(1);
                    return Err(Refusal(
                        ErrorCode::FloorTaken,
                        format!("{holder} holds the floor of {}", header.group),
                    ));
                }
                FloorGrant::Unavailable => {
                    return Err(Refusal(
                        ErrorCode::Internal,
                        "the floor cannot be decided now".into(),
                    ));
                }
            }
        }
        let meta = ClipMeta {
            group: header.group.clone(),
            clip_id: header.clip_id,
            talker: who.handle.user.to_string(),
            format: header.format,
            sample_rate: header.sample_rate,
            channels: header.channels,
            frame_ms: header.frame_ms,
            created_ms: crate::auth::unix_millis(std::time::SystemTime::now()),
            flags: header.flags & ClipHeader::FLAG_EMERGENCY,
        };
        let clip = LiveClip::new(meta, who.handle.id);
        self.ctx
            .hub
            .start_clip(clip.clone())
            .await
            .map_err(|c| Refusal(c, format!("cannot talk in {}: {c}", header.group)))?;
        if self.ctx.log.publishes_live() {
            self.ctx.log.publish_live(LiveEvent::Started {
                meta: clip.meta.clone(),
            });
        }
        if let (Some(peer), Some(frames)) = (&who.media, &self.user_frames) {
            self.uplink = peer.register_upload(self.stream_id, clip.clone(), frames.clone());
        }
        self.clip = Some(clip);
        Metrics::get().clips_started.increment(1);
        Ok(())
    }

    /// A channel's limits: its clips of the last 24 hours, and its
    /// longest clip (which the reader enforces from here on).
    async fn channel_limits(
        &mut self,
        header: &ClipHeader,
        limits: ptt_protocol::ChannelLimits,
    ) -> Result<(), Refusal> {
        let now = crate::auth::unix_millis(std::time::SystemTime::now());
        let per_day = limits
            .clips_per_day
            .min(self.ctx.config.channel_max_clips_per_day);
        if crate::hub::channel_day_full(&*self.ctx.log, &header.group, per_day, now)
            .await
            .map_err(|c| Refusal(c, format!("cannot talk in {}", header.group)))?
        {
            return Err(Refusal(
                ErrorCode::ChannelLimit,
                format!("{} published {per_day} clips in 24 hours", header.group),
            ));
        }
        if header.format == ClipFormat::Opus && limits.max_clip_ms > 0 {
            let mut clip_limits = self.ctx.clip_limits(ClipFormat::Opus);
            clip_limits.max_duration = clip_limits
                .max_duration
                .min(Duration::from_millis(u64::from(limits.max_clip_ms)));
            self.reader.set_limits(clip_limits);
        }
        Ok(())
    }

    async fn end(&mut self, waveform: Bytes) -> Result<(), Refusal> {
        let header = self.header.clone().expect("a clip ends after its header");
        let (clip, waveform) = match self.clip.clone() {
            Some(clip) => (clip, waveform),
            // The relay computed the waveform while transcoding.
            None => {
                let (clip, waveform) = self.transcode(&header).await?;
                self.ctx
                    .hub
                    .start_clip(clip.clone())
                    .await
                    .map_err(|c| Refusal(c, format!("cannot talk in {}: {c}", header.group)))?;
                self.clip = Some(clip.clone());
                (clip, waveform)
            }
        };
        let new = NewClip {
            meta: clip.meta.clone(),
            frames: clip.packets(),
            waveform,
        };
        let commit = Instant::now();
        let appended = self.ctx.log.append(new).await;
        Metrics::get()
            .store_commit_seconds
            .record(commit.elapsed().as_secs_f64());
        let outcome = match appended {
            Ok(outcome) => outcome,
            Err(e) => {
                tracing::error!(error = %e, "storing a clip failed");
                self.clip = None;
                self.abort(&clip, ErrorCode::Internal);
                return Err(Refusal(
                    ErrorCode::Internal,
                    "the clip could not be stored".into(),
                ));
            }
        };
        self.clip = None;
        match outcome {
            AppendOutcome::Duplicate { .. } => {
                // A retry on another connection was stored first.
                self.abort(&clip, ErrorCode::Duplicate);
            }
            AppendOutcome::Stored { .. } => {
                Metrics::get().clips_stored.increment(1);
                // `Stored` follows the clip's publication (its members have
                // its end, a joiner's snapshot includes it): the talker
                // never knows of a clip its group does not see yet. The
                // log's feed publishes within milliseconds; the wait is
                // bounded in case it is failing.
                let _ = tokio::time::timeout(PUBLISH_WAIT, clip.stored()).await;
            }
        }
        self.who
            .handle
            .send_wait(SessionCommand::send(ControlMessage::Stored {
                group: header.group.clone(),
                clip_id: header.clip_id,
                seq: outcome.seq(),
            }))
            .await;
        tracing::debug!(group = %header.group, seq = outcome.seq(), "clip stored");
        Ok(())
    }

    /// Discards the clip in flight, here and on the other nodes.
    fn abort(&self, clip: &Arc<LiveClip>, code: ErrorCode) {
        self.ctx.hub.abort_clip(clip, code);
        if self.ctx.log.publishes_live() {
            self.ctx.log.publish_live(LiveEvent::Aborted {
                group: clip.meta.group.clone(),
                clip_id: clip.meta.clip_id,
                code,
            });
        }
    }

    /// Turns an uploaded WAV into an Opus clip (on a blocking thread: a
    /// minute of audio takes tens of milliseconds to encode).
    async fn transcode(&mut self, header: &ClipHeader) -> Result<(Arc<LiveClip>, Bytes), Refusal> {
        let wav = std::mem::take(&mut self.wav);
        let encoded = tokio::task::spawn_blocking(move || {
            ptt_codec::encode_wav_packets(Cursor::new(wav), &ptt_codec::EncoderConfig::default())
        })
        .await
        .map_err(|e| Refusal(ErrorCode::Internal, e.to_string()))?
        .map_err(|e| Refusal(ErrorCode::TranscodeFailed, e.to_string()))?;
        let meta = ClipMeta {
            group: header.group.clone(),
            clip_id: header.clip_id,
            talker: self.who.handle.user.to_string(),
            format: ClipFormat::Opus,
            // The encoder resamples to Opus's rate; the WAV's own rate is
            // not one an Opus decoder can be opened at.
            sample_rate: OPUS_RATE,
            channels: encoded.channels as u8,
            frame_ms: encoded.frame_ms as u8,
            created_ms: crate::auth::unix_millis(std::time::SystemTime::now()),
            flags: 0,
        };
        let max = self.ctx.clip_limits(ClipFormat::Opus).max_duration;
        if encoded.length_48k > max.as_millis() as u64 * 48 {
            return Err(Refusal(
                ErrorCode::ClipTooLong,
                "the WAV is longer than allowed".into(),
            ));
        }
        let clip = LiveClip::new(meta, self.who.handle.id);
        for (index, packet) in encoded.packets.into_iter().enumerate() {
            clip.push_packet(index as u32, Bytes::from(packet.data));
        }
        Ok((clip, Bytes::from(encoded.waveform)))
    }
}

fn lock(state: &Mutex<SessionState>) -> std::sync::MutexGuard<'_, SessionState> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

/// Sleeps until `at`, or forever.
async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}
