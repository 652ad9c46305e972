//! Receiving a talker's clip: one task per uploaded stream.
//!
//! Each message is checked by [`ClipReader`]; each frame goes straight into
//! the clip's shared buffer, from where every member's writer picks it up.
//! At the end the clip is appended to the store, and only once that is
//! durable does the talker get `Stored` and the members the clip's end.

use std::io::Cursor;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use ptt_protocol::{
    ClipEvent, ClipFormat, ClipHeader, ClipMessage, ClipReader, ControlMessage, ErrorCode,
    FrameDecoder, SessionState, message::MAX_PAYLOAD_LEN,
};
use quinn::RecvStream;

use crate::delivery::code;
use crate::fanout::{SessionCommand, SessionHandle};
use crate::live::LiveClip;
use crate::server::RelayContext;
use crate::store::{AppendOutcome, ClipMeta, NewClip};

/// Who is uploading.
#[derive(Debug, Clone)]
pub struct Uploader {
    /// The session as the hub knows it.
    pub handle: SessionHandle,
    /// Whether the token allows emergency priority.
    pub emergency: bool,
    /// The session's rate and concurrency limits.
    pub state: Arc<Mutex<SessionState>>,
}

/// A refusal of an upload: the code and a message for the talker.
struct Refusal(ErrorCode, String);

impl<E: std::fmt::Display> From<(ErrorCode, E)> for Refusal {
    fn from((code, msg): (ErrorCode, E)) -> Refusal {
        Refusal(code, msg.to_string())
    }
}

/// Receives one clip upload to its end.
pub async fn run(mut recv: RecvStream, ctx: Arc<RelayContext>, who: Uploader) {
    let mut upload = Upload {
        ctx: &ctx,
        who: &who,
        reader: ClipReader::new(ctx.clip_limits(ClipFormat::Opus)),
        clip: None,
        header: None,
        wav: Vec::new(),
        started: false,
    };
    let result = upload.receive(&mut recv).await;
    if upload.started {
        lock(&who.state).handle_clip_done();
    }
    if let Err(Refusal(code_, message)) = result {
        tracing::debug!(code = %code_, %message, "clip refused");
        recv.stop(code(code_)).ok();
        if let Some(clip) = &upload.clip {
            ctx.hub.abort_clip(
                clip,
                if code_ == ErrorCode::Preempted {
                    code_
                } else {
                    ErrorCode::ClipAborted
                },
            );
        }
        if code_ == ErrorCode::Duplicate {
            // The talker already has its answer: `Stored` with the seq.
            return;
        }
        let clip_id = upload.header.map(|h| h.clip_id).unwrap_or_default();
        let _ = who
            .handle
            .tx
            .send(SessionCommand::send(ControlMessage::ClipRejected {
                clip_id,
                code: code_,
                message,
            }))
            .await;
    }
}

struct Upload<'a> {
    ctx: &'a Arc<RelayContext>,
    who: &'a Uploader,
    reader: ClipReader,
    clip: Option<Arc<LiveClip>>,
    header: Option<ClipHeader>,
    wav: Vec<u8>,
    started: bool,
}

impl Upload<'_> {
    async fn receive(&mut self, recv: &mut RecvStream) -> Result<(), Refusal> {
        let mut decoder = FrameDecoder::new(MAX_PAYLOAD_LEN);
        loop {
            while let Some(frame) = decoder
                .next_frame()
                .map_err(|e| Refusal::from((ErrorCode::from(&e), e)))?
            {
                let message = ClipMessage::decode(frame.kind, frame.payload)
                    .map_err(|e| Refusal::from((ErrorCode::from(&e), e)))?;
                let event = self
                    .reader
                    .handle_message(message, Instant::now())
                    .map_err(|e| Refusal::from((e.code(), e)))?;
                if self.handle(event, frame.raw).await? {
                    return Ok(());
                }
            }
            match recv.read_chunk(64 * 1024, true).await {
                Ok(Some(chunk)) => decoder.push(chunk.bytes),
                Ok(None) => {
                    return Err(Refusal(
                        ErrorCode::ClipAborted,
                        "stream ended before the clip end".into(),
                    ));
                }
                Err(_) => {
                    // The talker vanished (or reset the stream): discard.
                    if let Some(clip) = &self.clip {
                        self.ctx.hub.abort_clip(clip, ErrorCode::ClipAborted);
                    }
                    return Ok(());
                }
            }
        }
    }

    /// Handles one checked event; `true` when the clip is done.
    async fn handle(&mut self, event: ClipEvent, raw: Bytes) -> Result<bool, Refusal> {
        match event {
            ClipEvent::Started(header) => {
                self.start(header).await?;
                Ok(false)
            }
            ClipEvent::Frame { data, .. } => {
                if let Some(clip) = &self.clip {
                    if let crate::live::ClipState::Aborted(code) = clip.state() {
                        return Err(Refusal(code, "the clip was cut by the relay".into()));
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
                self.end(waveform).await?;
                Ok(true)
            }
        }
    }

    async fn start(&mut self, header: ClipHeader) -> Result<(), Refusal> {
        let who = self.who;
        // Known from here on, so that a refusal names the clip.
        self.header = Some(header.clone());
        lock(&who.state)
            .handle_clip_start(Instant::now())
            .map_err(|c| Refusal(c, format!("clip refused: {c}")))?;
        self.started = true;
        let hub = &self.ctx.hub;
        hub.member_group(&header.group, &who.handle.user)
            .await
            .map_err(|c| Refusal(c, format!("cannot talk in {}", header.group)))?;
        if header.flags & ClipHeader::FLAG_EMERGENCY != 0 && !who.emergency {
            return Err(Refusal(
                ErrorCode::Forbidden,
                "token lacks the emergency claim".into(),
            ));
        }
        // A retry of a clip that is already stored: acknowledge, drop.
        if let Some(seq) = self
            .ctx
            .store
            .clip_seq(&header.group, header.clip_id)
            .await
            .map_err(|e| Refusal(e.code(), e.to_string()))?
        {
            let _ = who
                .handle
                .tx
                .send(SessionCommand::send(ControlMessage::Stored {
                    group: header.group.clone(),
                    clip_id: header.clip_id,
                    seq,
                }))
                .await;
            return Err(Refusal(ErrorCode::Duplicate, "clip stored before".into()));
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
        match header.format {
            ClipFormat::Opus => {
                let clip = LiveClip::new(meta, who.handle.id);
                hub.start_clip(clip.clone(), &who.handle, who.emergency)
                    .await
                    .map_err(|c| Refusal(c, format!("cannot talk in {}: {c}", header.group)))?;
                self.clip = Some(clip);
            }
            ClipFormat::Wav => {
                self.reader
                    .set_limits(self.ctx.clip_limits(ClipFormat::Wav));
            }
        }
        Ok(())
    }

    async fn end(&mut self, waveform: Bytes) -> Result<(), Refusal> {
        let header = self.header.clone().expect("a clip ends after its header");
        let (clip, live, waveform) = match self.clip.clone() {
            Some(clip) => (clip, true, waveform),
            // The relay computed the waveform while transcoding.
            None => {
                let (clip, waveform) = self.transcode(&header).await?;
                (clip, false, waveform)
            }
        };
        let new = NewClip {
            meta: clip.meta.clone(),
            frames: clip.packets(),
            waveform: waveform.clone(),
        };
        let outcome = match self.ctx.store.append_clip(new).await {
            Ok(outcome) => outcome,
            Err(e) => {
                tracing::error!(error = %e, "storing a clip failed");
                self.ctx.hub.abort_clip(&clip, ErrorCode::Internal);
                self.clip = None;
                return Err(Refusal(
                    ErrorCode::Internal,
                    "the clip could not be stored".into(),
                ));
            }
        };
        if let AppendOutcome::Stored { seq } = outcome {
            clip.end(seq, waveform);
        }
        self.ctx.hub.finish_clip(clip, outcome, live);
        let _ = self
            .who
            .handle
            .tx
            .send(SessionCommand::send(ControlMessage::Stored {
                group: header.group.clone(),
                clip_id: header.clip_id,
                seq: outcome.seq(),
            }))
            .await;
        tracing::debug!(group = %header.group, seq = outcome.seq(), "clip stored");
        Ok(())
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
            sample_rate: encoded.input_rate,
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
        let mut buf = bytes::BytesMut::new();
        for (index, packet) in encoded.packets.into_iter().enumerate() {
            let packet = Bytes::from(packet.data);
            ptt_protocol::message::encode_frame(&mut buf, index as u32, &packet);
            clip.push_frame(buf.split().freeze(), packet);
        }
        Ok((clip, Bytes::from(encoded.waveform)))
    }
}

fn lock(state: &Mutex<SessionState>) -> std::sync::MutexGuard<'_, SessionState> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}
