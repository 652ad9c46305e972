//! Reading one clip stream from the relay: validation, events, duplicate
//! suppression, acknowledgement, and `LiveRead` reports of how far a live
//! clip was read.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ptt_protocol::message::MAX_PAYLOAD_LEN;
use ptt_protocol::{
    ClipEvent, ClipHeader, ClipId, ClipLimits, ClipMessage, ClipReader, ErrorCode, FramedReader,
    LiveRead, ReadError,
};

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::event::Event;
use crate::media::{MediaFrame, MediaInbox};
use crate::shared::{Inner, Internal, Stats, lock};

/// The clip a stream carries, once its header arrived.
struct Current {
    group: String,
    clip_id: ClipId,
    /// Received whole before: read silently, acknowledge, surface nothing.
    duplicate: bool,
    ended: bool,
    /// Reports for a live clip (no HISTORY flag) whose frames come on the
    /// stream.
    report: Option<LiveReport>,
    /// A live clip whose frames come by UDP (flag MEDIA).
    media: Option<MediaClip>,
}

/// How long after a media clip's end frames still missing may arrive
/// (UDP may lag the stream) before the clip is fetched.
const MEDIA_END_GRACE: Duration = Duration::from_millis(200);

/// The frames of a MEDIA clip (PROTOCOL.md, section 14.4), as they arrive
/// by UDP in any order. Once the clip's `ClipStarted` is out and while the
/// application keeps up, the media socket's task puts them on the event
/// channel itself; the reader surfaces those queued for it (early ones,
/// those that came while the application was behind or before the
/// `ClipStarted`, all of a duplicate). The inbox keeps which arrived.
struct MediaClip {
    inbox: Arc<MediaInbox>,
    stream: u64,
    rx: mpsc::Receiver<MediaFrame>,
    /// A `HeadedFrame` announced the clip before its header came: the
    /// application has its `ClipStarted` (and some of its frames).
    announced: bool,
}

impl MediaClip {
    fn new(inbox: Arc<MediaInbox>, stream: u64) -> MediaClip {
        let registration = inbox.register(stream);
        MediaClip {
            inbox,
            stream,
            rx: registration.rx,
            announced: registration.announced,
        }
    }
}

impl Drop for MediaClip {
    fn drop(&mut self) {
        self.inbox.unregister(self.stream, 0);
    }
}

/// Tells the relay how far the application has read a live clip stream
/// (PROTOCOL.md, section 9.7), so that it measures our lag against what we
/// read rather than against flow control: after the header, then every
/// [`LiveRead::interval_frames`] frames (25 at 20 ms).
struct LiveReport {
    conn: quinn::Connection,
    stream: u64,
    every: u32,
}

impl LiveReport {
    fn new(conn: &quinn::Connection, recv: &quinn::RecvStream, frame_ms: u8) -> LiveReport {
        LiveReport {
            conn: conn.clone(),
            stream: recv.id().into(),
            every: LiveRead::interval_frames(frame_ms),
        }
    }

    /// Frame `index` was handed to the application.
    fn frame_read(&self, inner: &Inner, index: u32) {
        let frames = index.saturating_add(1);
        if frames.is_multiple_of(self.every) {
            self.send(inner, frames);
        }
    }

    /// Reports `frames` read. A report that cannot be sent or is lost
    /// costs nothing: the next one supersedes it.
    fn send(&self, inner: &Inner, frames: u32) {
        let read = LiveRead {
            stream: self.stream,
            frames,
        };
        if self.conn.send_datagram(read.to_bytes()).is_ok() {
            Stats::bump(&inner.stats.live_reads_sent);
        }
    }
}

/// Reads the clip stream `recv` to its end, turning it into events.
pub(crate) async fn read_clip(inner: Arc<Inner>, conn: quinn::Connection, recv: quinn::RecvStream) {
    let stream_id = u64::from(recv.id());
    let mut stream = FramedReader::new(recv, MAX_PAYLOAD_LEN);
    let mut reader = ClipReader::new(ClipLimits::unlimited());
    let mut current: Option<Current> = None;
    loop {
        let next = match current.as_mut() {
            // After the end only the FIN is due; do not wait for it forever.
            Some(c) if c.ended => {
                match tokio::time::timeout(Duration::from_secs(5), stream.next_clip()).await {
                    Ok(r) => r,
                    Err(_) => return,
                }
            }
            Some(Current {
                group,
                clip_id,
                duplicate,
                media: Some(media),
                ..
            }) => {
                // The stream's next message (the end) is read by one
                // future that lives across the frames, so a frame costs
                // no stream poll.
                let read = stream.next_clip();
                tokio::pin!(read);
                loop {
                    tokio::select! {
                        biased;
                        Some(frame) = media.rx.recv() => {
                            media_frame(&inner, group, *clip_id, *duplicate, media, frame).await;
                        }
                        next = &mut read => break next,
                    }
                }
            }
            _ => stream.next_clip().await,
        };
        let code = match next {
            Ok(Some((msg, _))) => {
                match handle(
                    &inner,
                    &conn,
                    msg,
                    &mut reader,
                    &mut current,
                    stream.get_mut(),
                )
                .await
                {
                    Ok(Flow::Continue) => continue,
                    Ok(Flow::Done) => return,
                    Err(code) => {
                        let _ = stream.get_mut().stop(quinn::VarInt::from_u32(code.code()));
                        code
                    }
                }
            }
            Ok(None) => {
                if current.as_ref().is_none_or(|c| c.ended) {
                    return;
                }
                // FIN without a clip end.
                ErrorCode::OutOfOrder
            }
            // FIN inside a frame: a FIN without a clip end too.
            Err(ReadError::Truncated) => ErrorCode::OutOfOrder,
            Err(ReadError::Decode(e)) => {
                let code = e.code();
                let _ = stream.get_mut().stop(quinn::VarInt::from_u32(code.code()));
                code
            }
            Err(ReadError::Stream(quinn::ReadError::Reset(code))) => {
                ErrorCode::from_code(code.into_inner())
            }
            Err(ReadError::Stream(_)) => ErrorCode::None,
        };
        if let Some(c) = current.as_mut() {
            // No frame may follow the abort.
            c.media = None;
        }
        if current.is_none()
            && let Some((group, clip_id)) = inner
                .media_inbox(&conn)
                .and_then(|inbox| inbox.take_announced(stream_id))
        {
            // Announced by a HeadedFrame, reset before its header came.
            Stats::bump(&inner.stats.clips_aborted);
            inner
                .emit(Event::ClipAborted {
                    group,
                    clip_id,
                    code,
                })
                .await;
        }
        if let Some(c) = current
            && !c.ended
            && !c.duplicate
        {
            Stats::bump(&inner.stats.clips_aborted);
            inner
                .emit(Event::ClipAborted {
                    group: c.group,
                    clip_id: c.clip_id,
                    code,
                })
                .await;
        }
        return;
    }
}

enum Flow {
    Continue,
    Done,
}

/// Handles one message of the clip stream.
async fn handle(
    inner: &Arc<Inner>,
    conn: &quinn::Connection,
    msg: ClipMessage,
    reader: &mut ClipReader,
    current: &mut Option<Current>,
    recv: &mut quinn::RecvStream,
) -> Result<Flow, ErrorCode> {
    let now = Instant::now();
    if let Some(c) = current.as_mut()
        && c.media.is_some()
    {
        // A MEDIA clip's stream carries its header and end, no frame.
        let ClipMessage::End {
            frame_count,
            seq,
            waveform,
        } = msg
        else {
            return Err(ErrorCode::OutOfOrder);
        };
        media_end(inner, c, frame_count, seq, waveform).await;
        return Ok(Flow::Continue);
    }
    match reader.handle_message(msg, now).map_err(|e| e.code())? {
        ClipEvent::Started(header) if header.flags & ClipHeader::FLAG_MEDIA != 0 => {
            let stream = u64::from(recv.id());
            // A MEDIA clip without a path (it ended with the connection):
            // no frame will come, the clip is fetched at its end.
            let inbox = inner.media_inbox(conn).unwrap_or_default();
            let media = MediaClip::new(inbox, stream);
            // Announced by a HeadedFrame: ClipStarted went out then.
            let duplicate = !media.announced && is_duplicate(inner, &header);
            if duplicate {
                Stats::bump(&inner.stats.duplicates_dropped);
            } else if !media.announced {
                emit_started(inner, &header).await;
                // Its frames may overtake the reader from now on.
                media
                    .inbox
                    .surface(stream, header.group.clone(), header.clip_id);
            }
            *current = Some(Current {
                group: header.group,
                clip_id: header.clip_id,
                duplicate,
                ended: false,
                report: None,
                media: Some(media),
            });
        }
        ClipEvent::Started(header) => {
            let duplicate = is_duplicate(inner, &header);
            if duplicate {
                Stats::bump(&inner.stats.duplicates_dropped);
                tracing::debug!(group = %header.group, clip = %header.clip_id, "duplicate clip dropped");
                if header.seq != 0 {
                    // Stored clip: its seq is known, no need to read it.
                    ack(inner, &header.group, header.seq).await;
                    let _ = recv.stop(quinn::VarInt::from_u32(ErrorCode::Duplicate.code()));
                    return Ok(Flow::Done);
                }
            } else {
                emit_started(inner, &header).await;
            }
            // A live clip is reported even when it is a duplicate: we
            // still read it, and the relay cuts a live stream whose reports
            // stop.
            let live = header.flags & ClipHeader::FLAG_HISTORY == 0;
            let report = live.then(|| LiveReport::new(conn, recv, header.frame_ms));
            if let Some(report) = &report {
                report.send(inner, 0);
            }
            *current = Some(Current {
                group: header.group,
                clip_id: header.clip_id,
                duplicate,
                ended: false,
                report,
                media: None,
            });
        }
        ClipEvent::Frame { index, data } => {
            let c = current.as_ref().expect("the reader checked the header");
            if !c.duplicate {
                Stats::bump(&inner.stats.frames_received);
                inner
                    .emit(Event::Frame {
                        group: c.group.clone(),
                        clip_id: c.clip_id,
                        index,
                        data,
                        received_at: now,
                    })
                    .await;
            }
            if let Some(report) = &c.report {
                report.frame_read(inner, index);
            }
        }
        ClipEvent::Ended {
            frame_count,
            seq,
            waveform,
        } => {
            let c = current.as_mut().expect("the reader checked the header");
            c.ended = true;
            let new = lock(&inner.dedup).insert(&c.group, c.clip_id);
            if c.duplicate {
                // Delivered again because our acknowledgement did not
                // reach the relay: acknowledge it again, whatever
                // `auto_ack` says, since the application had it.
                ack(inner, &c.group, seq).await;
            } else {
                Stats::bump(&inner.stats.clips_received);
                inner
                    .emit(Event::ClipEnded {
                        group: c.group.clone(),
                        clip_id: c.clip_id,
                        seq,
                        frame_count,
                        waveform,
                    })
                    .await;
                if new && inner.config.auto_ack {
                    ack(inner, &c.group, seq).await;
                }
            }
        }
    }
    Ok(Flow::Continue)
}

async fn emit_started(inner: &Inner, header: &ClipHeader) {
    inner
        .emit(Event::ClipStarted {
            group: header.group.clone(),
            clip_id: header.clip_id,
            talker: header.talker.clone(),
            seq: header.seq,
            history: header.flags & ClipHeader::FLAG_HISTORY != 0,
            header: header.clone(),
        })
        .await;
}

/// A frame of a MEDIA clip, queued for the reader by the inbox (which
/// drops copies), is surfaced.
async fn media_frame(
    inner: &Inner,
    group: &str,
    clip_id: ClipId,
    duplicate: bool,
    media: &mut MediaClip,
    frame: MediaFrame,
) {
    if !duplicate {
        Stats::bump(&inner.stats.frames_received);
        inner
            .emit(Event::Frame {
                group: group.to_owned(),
                clip_id,
                index: frame.index,
                data: frame.data,
                received_at: frame.received_at,
            })
            .await;
    }
    media.inbox.surfaced(media.stream);
}

/// A MEDIA clip's end (PROTOCOL.md, section 14.4): complete, it ends as
/// any clip; with holes (after [`MEDIA_END_GRACE`] for stragglers), the app
/// gets [`Event::ClipIncomplete`] and the clip is fetched whole, to be
/// acknowledged after the fetched copy's end.
async fn media_end(inner: &Inner, c: &mut Current, frame_count: u32, seq: u64, waveform: Bytes) {
    c.ended = true;
    let deadline = tokio::time::Instant::now() + MEDIA_END_GRACE;
    let mut missing = 0;
    if let Some(mut media) = c.media.take() {
        // Stragglers come to us from now on, so that we wake for them.
        let inbox = media.inbox.clone();
        inbox.queue_all(media.stream);
        while inbox.missing(media.stream, frame_count) > 0 {
            match tokio::time::timeout_at(deadline, media.rx.recv()).await {
                Ok(Some(frame)) => {
                    media_frame(inner, &c.group, c.clip_id, c.duplicate, &mut media, frame).await;
                }
                Ok(None) | Err(_) => break,
            }
        }
        // No frame is accepted after this; those accepted before and
        // still queued are surfaced before the end.
        missing = inbox.unregister(media.stream, frame_count);
        while let Ok(frame) = media.rx.try_recv() {
            media_frame(inner, &c.group, c.clip_id, c.duplicate, &mut media, frame).await;
        }
    }
    if c.duplicate {
        // The app had it whole before; acknowledge again.
        ack(inner, &c.group, seq).await;
        return;
    }
    if missing == 0 {
        let new = lock(&inner.dedup).insert(&c.group, c.clip_id);
        Stats::bump(&inner.stats.clips_received);
        inner
            .emit(Event::ClipEnded {
                group: c.group.clone(),
                clip_id: c.clip_id,
                seq,
                frame_count,
                waveform,
            })
            .await;
        if new && inner.config.auto_ack {
            ack(inner, &c.group, seq).await;
        }
        return;
    }
    Stats::bump(&inner.stats.media_clips_fetched);
    inner
        .emit(Event::ClipIncomplete {
            group: c.group.clone(),
            clip_id: c.clip_id,
            seq,
            frame_count,
            missing,
        })
        .await;
    if seq != 0 {
        let _ = inner
            .internal
            .send(Internal::Fetch {
                group: c.group.clone(),
                seq,
            })
            .await;
    }
}

/// Whether a clip starting with `header` was received whole before and is
/// not part of a fetch.
fn is_duplicate(inner: &Inner, header: &ClipHeader) -> bool {
    let history = header.flags & ClipHeader::FLAG_HISTORY != 0;
    let fetched = history && inner.take_fetch_bypass(&header.group);
    !fetched && lock(&inner.dedup).contains(&header.group, header.clip_id)
}

async fn ack(inner: &Inner, group: &str, seq: u64) {
    if seq == 0 {
        return;
    }
    let _ = inner
        .internal
        .send(Internal::Ack {
            group: group.to_owned(),
            seq,
        })
        .await;
}
