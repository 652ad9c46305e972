//! Writing clips to a member: one unidirectional stream per clip.
//!
//! A live clip is written from the shared [`LiveClip`] buffer as frames
//! arrive; if the member falls too far behind (or a write stalls), the
//! stream is reset with [`ErrorCode::SlowReceiver`] and the clip is sent
//! again from the store once it is complete. Stored clips (catch-up, fetch,
//! recovery) are written whole, flagged as history.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use ptt_protocol::{ClipHeader, ClipId, ClipMessage, ErrorCode};
use quinn::{Connection, SendStream, VarInt};

use crate::live::{ClipState, LiveClip, end_message, member_header};
use crate::store::{ClipMeta, StoredClip};

/// How a clip delivery ended.
#[derive(Debug)]
pub enum Delivery {
    /// The whole clip, ending with its sequence number, was written.
    Complete {
        /// The clip's sequence number.
        seq: u64,
        /// Its id, for the receipt when the member acknowledges it.
        clip_id: ClipId,
        /// Its talker, for the same receipt.
        talker: String,
    },
    /// The member fell behind; the stream was reset.
    Cut,
    /// The clip was discarded by its talker or the relay.
    Aborted,
    /// The connection or stream failed.
    Failed,
}

/// Limits on how far a live receiver may lag.
#[derive(Debug, Clone, Copy)]
pub struct LagPolicy {
    /// Frames the receiver may be behind the talker.
    pub max_frames: usize,
    /// Longest a single write may block.
    pub max_stall: Duration,
}

/// Writes a live (or just completed) clip from its shared buffer.
pub async fn deliver_live(conn: &Connection, clip: &Arc<LiveClip>, lag: LagPolicy) -> Delivery {
    let mut rx = clip.subscribe();
    let Ok(mut stream) = conn.open_uni().await else {
        return Delivery::Failed;
    };
    let seq_now = match &rx.borrow().state {
        ClipState::Ended { seq, .. } => *seq,
        _ => 0,
    };
    let header = ClipMessage::Header(clip.header(seq_now, 0)).to_bytes();
    if !write(&mut stream, header, lag.max_stall).await {
        return cut_or_failed(&mut stream, conn);
    }
    let mut sent = 0usize;
    let mut batch: Vec<Bytes> = Vec::with_capacity(32);
    // The backlog a late joiner starts with is allowed; beyond it, only
    // `max_frames` more.
    let allowed_lag = rx.borrow().raw.len().max(lag.max_frames);
    loop {
        let state = {
            let progress = rx.borrow_and_update();
            if progress.raw.len() - sent > allowed_lag {
                stream.reset(code(ErrorCode::SlowReceiver)).ok();
                return Delivery::Cut;
            }
            batch.extend(progress.raw[sent..].iter().cloned());
            progress.state.clone()
        };
        for frame in batch.drain(..) {
            if !write(&mut stream, frame, lag.max_stall).await {
                return cut_or_failed(&mut stream, conn);
            }
            sent += 1;
        }
        match state {
            ClipState::Live => {
                if rx.changed().await.is_err() {
                    stream.reset(code(ErrorCode::ClipAborted)).ok();
                    return Delivery::Aborted;
                }
            }
            ClipState::Ended { seq, waveform } => {
                if sent < rx.borrow().raw.len() {
                    continue;
                }
                let end = end_message(sent as u32, seq, waveform);
                if !write(&mut stream, end, lag.max_stall).await {
                    return cut_or_failed(&mut stream, conn);
                }
                return finish(stream, seq, &clip.meta);
            }
            ClipState::Aborted(reason) => {
                stream.reset(code(reason)).ok();
                return Delivery::Aborted;
            }
        }
    }
}

/// Writes a stored clip whole, flagged as history (and as fetched when it
/// answers a fetch).
pub async fn deliver_stored(conn: &Connection, clip: &StoredClip, fetched: bool) -> Delivery {
    let Ok(mut stream) = conn.open_uni().await else {
        return Delivery::Failed;
    };
    let mut buf = BytesMut::new();
    let mut flags = ClipHeader::FLAG_HISTORY;
    if fetched {
        flags |= ClipHeader::FLAG_FETCHED;
    }
    ClipMessage::Header(member_header(&clip.meta, clip.seq, flags)).encode(&mut buf);
    for (index, data) in clip.frames.iter().enumerate() {
        ptt_protocol::message::encode_frame(&mut buf, index as u32, data);
        if buf.len() >= 16 * 1024 && stream.write_chunk(buf.split().freeze()).await.is_err() {
            return Delivery::Failed;
        }
    }
    buf.extend_from_slice(&end_message(
        clip.frames.len() as u32,
        clip.seq,
        clip.waveform.clone(),
    ));
    if stream.write_chunk(buf.freeze()).await.is_err() {
        return Delivery::Failed;
    }
    finish(stream, clip.seq, &clip.meta)
}

fn finish(mut stream: SendStream, seq: u64, meta: &ClipMeta) -> Delivery {
    match stream.finish() {
        Ok(()) => Delivery::Complete {
            seq,
            clip_id: meta.clip_id,
            talker: meta.talker.clone(),
        },
        Err(_) => Delivery::Failed,
    }
}

/// Writes one message, giving up after `max_stall`.
///
/// Almost every write completes at once (there is room in the stream's
/// send buffer), so the first poll is made without a timer; only a write
/// that has to wait arms one. This keeps a timer registration off the
/// per-frame path.
async fn write(stream: &mut SendStream, bytes: Bytes, max_stall: Duration) -> bool {
    let mut write = std::pin::pin!(stream.write_chunk(bytes));
    let first = {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        write.as_mut().poll(&mut cx)
    };
    if let std::task::Poll::Ready(result) = first {
        return result.is_ok();
    }
    matches!(tokio::time::timeout(max_stall, write).await, Ok(Ok(())))
}

fn cut_or_failed(stream: &mut SendStream, conn: &Connection) -> Delivery {
    if conn.close_reason().is_some() {
        return Delivery::Failed;
    }
    stream.reset(code(ErrorCode::SlowReceiver)).ok();
    Delivery::Cut
}

/// An error code as a QUIC varint.
pub fn code(code: ErrorCode) -> VarInt {
    VarInt::from_u32(code.code())
}
