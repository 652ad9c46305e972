//! Uploading a clip frame by frame, and keeping it until the relay confirms
//! it stored.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use ptt_protocol::message::encode_frame;
use ptt_protocol::{ClipFormat, ClipHeader, ClipId, ClipMessage, ErrorCode};
use tokio::sync::oneshot;

use crate::error::ClientError;
use crate::shared::{ClipData, ConnSlot, Inner, Shared, Stats, StoredClip, lock};

/// The audio parameters of a clip to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClipParams {
    /// The frames' format.
    pub format: ClipFormat,
    /// The sample rate of the audio the Opus packets encode.
    pub sample_rate: u32,
    /// 1 or 2.
    pub channels: u8,
    /// Duration of each Opus packet in ms (10, 20, 40, 60, 80, 100 or 120;
    /// 0 for WAV).
    pub frame_ms: u8,
    /// Talk with emergency priority (needs the token's emergency claim).
    pub emergency: bool,
    /// The clip id; a random one when `None`. Give one to retry an upload
    /// made by an earlier client instance.
    pub clip_id: Option<ClipId>,
    /// When recording started, Unix ms; now when `None`.
    pub created_ms: Option<u64>,
}

impl Default for ClipParams {
    /// Mono 48 kHz Opus in 20 ms packets.
    fn default() -> ClipParams {
        ClipParams {
            format: ClipFormat::Opus,
            sample_rate: 48_000,
            channels: 1,
            frame_ms: 20,
            emergency: false,
            clip_id: None,
            created_ms: None,
        }
    }
}

impl ClipParams {
    /// Opus at `sample_rate` with `channels` and `frame_ms` packets.
    pub fn opus(sample_rate: u32, channels: u8, frame_ms: u8) -> ClipParams {
        ClipParams {
            sample_rate,
            channels,
            frame_ms,
            ..ClipParams::default()
        }
    }

    /// The header that starts the upload of clip `clip_id` into `group`.
    pub(crate) fn header(&self, group: &str, clip_id: ClipId) -> ClipHeader {
        ClipHeader {
            group: group.to_owned(),
            clip_id,
            talker: String::new(),
            seq: 0,
            format: self.format,
            sample_rate: self.sample_rate,
            channels: self.channels,
            frame_ms: self.frame_ms,
            created_ms: self.created_ms.unwrap_or_else(unix_ms),
            flags: if self.emergency {
                ClipHeader::FLAG_EMERGENCY
            } else {
                0
            },
        }
    }
}

/// Milliseconds since the Unix epoch.
pub(crate) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A random clip id.
pub fn random_clip_id() -> ClipId {
    ClipId::from_bytes(rand::random())
}

/// A clip being spoken: each [`Talk::send_frame`] goes on the wire at once
/// (the relay fans it out live), and the frames are also kept in memory
/// until the relay confirms the clip stored, so that after a reconnect the
/// clip is sent again whole under the same id.
///
/// Dropping a `Talk` without [`Talk::finish`] aborts the clip.
pub struct Talk {
    inner: Arc<Inner>,
    group: String,
    clip_id: ClipId,
    clip: Shared<ClipData>,
    stream: Option<(u64, quinn::SendStream)>,
    done: Option<oneshot::Receiver<Result<StoredClip, ClientError>>>,
    max_frame: usize,
    /// Whether this handle still owns the upload (until `finish` hands it
    /// to the connection task, or it is aborted).
    active: bool,
    /// The relay said the clip id was stored before (STOP_SENDING
    /// Duplicate, with `Stored` on the control stream): nothing more to send.
    already_stored: bool,
}

impl std::fmt::Debug for Talk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Talk")
            .field("group", &self.group)
            .field("clip_id", &self.clip_id)
            .field("frames", &self.frames())
            .finish()
    }
}

impl Talk {
    /// Registers the upload and sends its header.
    pub(crate) async fn start(
        inner: Arc<Inner>,
        group: &str,
        params: &ClipParams,
    ) -> Result<Talk, ClientError> {
        if !ptt_protocol::is_valid_id(group) {
            return Err(ClientError::InvalidArgument(format!(
                "invalid group id {group:?}"
            )));
        }
        let clip_id = params.clip_id.unwrap_or_else(random_clip_id);
        let clip = Arc::new(std::sync::Mutex::new(ClipData {
            header: params.header(group, clip_id),
            frames: Vec::new(),
            end: None,
            sent_epoch: 0,
            failed: None,
        }));
        let (tx, rx) = oneshot::channel();
        {
            let mut uploads = lock(&inner.uploads);
            if uploads.contains_key(&clip_id) {
                return Err(ClientError::InvalidArgument(format!(
                    "clip {clip_id} is already being sent"
                )));
            }
            uploads.insert(
                clip_id,
                crate::shared::UploadSlot {
                    clip: clip.clone(),
                    done: Some(tx),
                },
            );
        }
        let max_frame = match lock(&inner.welcome).limits.max_frame_bytes {
            0 => usize::MAX,
            n => n as usize,
        };
        let mut talk = Talk {
            inner,
            group: group.to_owned(),
            clip_id,
            clip,
            stream: None,
            done: Some(rx),
            max_frame,
            active: true,
            already_stored: false,
        };
        talk.deliver(Bytes::new()).await?;
        Ok(talk)
    }

    /// The clip's id.
    pub fn clip_id(&self) -> ClipId {
        self.clip_id
    }

    /// The group.
    pub fn group(&self) -> &str {
        &self.group
    }

    /// Frames sent so far.
    pub fn frames(&self) -> u32 {
        lock(&self.clip).frames.len() as u32
    }

    /// Sends one Opus packet now. While the connection is down (and the
    /// client reconnects) the frame is only kept, and goes out with the
    /// rest of the clip on the new connection.
    pub async fn send_frame(&mut self, data: impl Into<Bytes>) -> Result<(), ClientError> {
        let data = data.into();
        if data.len() > self.max_frame {
            return Err(ClientError::FrameTooLarge {
                len: data.len(),
                max: self.max_frame,
            });
        }
        let (index, wire) = {
            let mut clip = lock(&self.clip);
            if let Some(err) = &clip.failed {
                return Err(err.clone());
            }
            let index = clip.frames.len() as u32;
            clip.frames.push(data.clone());
            let mut buf = BytesMut::with_capacity(data.len() + 8);
            encode_frame(&mut buf, index, &data);
            (index, buf.freeze())
        };
        self.uplink(index);
        self.deliver(wire).await
    }

    /// Sends frame `index` (with the two before it) by the media path's
    /// uplink too (PROTOCOL.md §14.3), if the path is bound and the upload stream is on the
    /// current connection: the relay forwards whichever copy comes first;
    /// the stream's stays the one stored.
    fn uplink(&self, index: u32) {
        if self.already_stored {
            return;
        }
        let (Some((epoch, stream)), Some(slot)) = (&self.stream, self.inner.current()) else {
            return;
        };
        if *epoch != slot.epoch {
            return;
        }
        if let Some(uplink) = self
            .inner
            .media_inbox(&slot.conn)
            .and_then(|inbox| inbox.uplink())
            .filter(|u| u.is_of(&slot.conn))
        {
            // This frame and the two before it: one lost packet loses no
            // frame.
            let newest: Vec<(u32, Bytes)> = {
                let clip = lock(&self.clip);
                (0..=index)
                    .rev()
                    .take(ptt_protocol::media::UPLINK_REDUNDANCY)
                    .filter_map(|i| clip.frames.get(i as usize).map(|d| (i, d.clone())))
                    .collect()
            };
            uplink.send(u64::from(stream.id()), &newest);
        }
    }

    /// Writes `wire` (the newest message) on this connection's stream, or
    /// opens a stream on the current connection and writes everything so
    /// far when the stream is missing or belongs to a lost connection.
    async fn deliver(&mut self, wire: Bytes) -> Result<(), ClientError> {
        if self.already_stored {
            return Ok(());
        }
        let current = self.inner.current();
        if let (Some((epoch, stream)), Some(slot)) = (&mut self.stream, &current)
            && *epoch == slot.epoch
        {
            return match stream.write_all(&wire).await {
                Ok(()) => Ok(()),
                Err(e) => self.write_failed(e),
            };
        }
        self.stream = None;
        let Some(ConnSlot { epoch, conn }) = current else {
            return self.connection_lost();
        };
        let snapshot = {
            let mut clip = lock(&self.clip);
            // Sent on an earlier connection: this resumes it on a new one.
            if clip.sent_epoch != 0 && clip.sent_epoch != epoch {
                Stats::bump(&self.inner.stats.clips_resent);
            }
            clip.sent_epoch = epoch;
            clip.snapshot()
        };
        let mut stream = match conn.open_uni().await {
            Ok(s) => s,
            Err(_) => return self.connection_lost(),
        };
        // Voice first: live clips go before catch-up and re-sent clips.
        let _ = stream.set_priority(1);
        match stream.write_all(&snapshot).await {
            Ok(()) => {
                self.stream = Some((epoch, stream));
                Ok(())
            }
            Err(e) => self.write_failed(e),
        }
    }

    fn write_failed(&mut self, err: quinn::WriteError) -> Result<(), ClientError> {
        self.stream = None;
        match err {
            quinn::WriteError::Stopped(code)
                if ErrorCode::from_code(code.into_inner()) == ErrorCode::Duplicate =>
            {
                // Stored before (a retry): `Stored` answers `finish`.
                self.already_stored = true;
                Ok(())
            }
            quinn::WriteError::Stopped(code)
                if ErrorCode::from_code(code.into_inner()) != ErrorCode::ShuttingDown =>
            {
                let err = ClientError::ClipRejected {
                    code: ErrorCode::from_code(code.into_inner()),
                    message: "the relay stopped the upload".into(),
                };
                lock(&self.clip).failed.get_or_insert(err.clone());
                Err(err)
            }
            _ => self.connection_lost(),
        }
    }

    fn connection_lost(&self) -> Result<(), ClientError> {
        if self.inner.reconnects() {
            Ok(())
        } else {
            let err = ClientError::ConnectionLost;
            lock(&self.clip).failed.get_or_insert(err.clone());
            Err(err)
        }
    }

    /// Ends the clip with its waveform preview (one byte 0 to 31 per bucket,
    /// up to 256; may be empty) and waits until the relay stored it,
    /// across reconnects. Returns the clip's sequence number.
    pub async fn finish(mut self, waveform: impl Into<Bytes>) -> Result<StoredClip, ClientError> {
        let waveform = waveform.into();
        let done = self.done.take().expect("finish consumes the talk");
        let action = {
            let mut clip = lock(&self.clip);
            if let Some(err) = &clip.failed {
                return Err(err.clone());
            }
            let frame_count = clip.frames.len() as u32;
            clip.end = Some((frame_count, waveform.clone()));
            let end = ClipMessage::End {
                frame_count,
                seq: 0,
                waveform,
            }
            .to_bytes();
            match (&self.stream, self.inner.current()) {
                _ if self.already_stored => Finish::Later,
                (Some((epoch, _)), Some(slot)) if *epoch == slot.epoch => Finish::OnStream(end),
                (_, Some(slot)) if clip.sent_epoch != slot.epoch => {
                    clip.sent_epoch = slot.epoch;
                    Finish::Resend(slot.conn, clip.snapshot())
                }
                // Not connected: the connection task sends it on the next
                // connection.
                _ => Finish::Later,
            }
        };
        match action {
            Finish::OnStream(end) => {
                let (_, mut stream) = self.stream.take().expect("matched above");
                match stream.write_all(&end).await {
                    Ok(()) => {
                        let _ = stream.finish();
                    }
                    Err(e) => self.write_failed(e)?,
                }
            }
            Finish::Resend(conn, snapshot) => {
                self.stream = None;
                tokio::spawn(send_whole(self.inner.clone(), conn, snapshot));
            }
            Finish::Later if self.already_stored => {}
            Finish::Later => self.connection_lost()?,
        }
        // From here the connection task owns the upload.
        self.active = false;
        match done.await {
            Ok(result) => result,
            Err(_) => Err(ClientError::Closed),
        }
    }

    /// Abandons the clip: the relay discards it and receivers get it as
    /// aborted.
    pub fn abort(mut self) {
        self.abort_inner();
    }

    fn abort_inner(&mut self) {
        if let Some((_, mut stream)) = self.stream.take() {
            let _ = stream.reset(quinn::VarInt::from_u32(ErrorCode::ClipAborted.code()));
        }
        lock(&self.clip).failed.get_or_insert(ClientError::Aborted);
        self.forget();
    }

    /// Removes the upload from the connection task's books.
    fn forget(&mut self) {
        if self.active {
            lock(&self.inner.uploads).remove(&self.clip_id);
        }
        self.active = false;
    }
}

impl Drop for Talk {
    fn drop(&mut self) {
        if self.active {
            self.abort_inner();
        }
    }
}

enum Finish {
    OnStream(Bytes),
    Resend(quinn::Connection, Bytes),
    Later,
}

/// Sends a whole finished clip on a new stream of `conn`. A failure is left
/// to the next connection: the clip stays in the uploads until stored.
pub(crate) async fn send_whole(inner: Arc<Inner>, conn: quinn::Connection, snapshot: Bytes) {
    Stats::bump(&inner.stats.clips_resent);
    let result = async {
        let mut stream = conn.open_uni().await?;
        stream.write_all(&snapshot).await?;
        stream.finish()?;
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
    }
    .await;
    if let Err(e) = result {
        tracing::debug!("re-sending a clip failed: {e}");
    }
}
