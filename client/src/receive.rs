//! Reading one clip stream from the relay: validation, events, duplicate
//! suppression and acknowledgement.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ptt_protocol::message::MAX_PAYLOAD_LEN;
use ptt_protocol::{
    ClipEvent, ClipHeader, ClipId, ClipLimits, ClipMessage, ClipReader, ErrorCode, FramedReader,
    ReadError,
};

use crate::event::Event;
use crate::shared::{Inner, Internal, Stats, lock};

/// The clip a stream carries, once its header arrived.
struct Current {
    group: String,
    clip_id: ClipId,
    /// Received whole before: read silently, acknowledge, surface nothing.
    duplicate: bool,
    ended: bool,
}

/// Reads the clip stream `recv` to its end, turning it into events.
pub(crate) async fn read_clip(inner: Arc<Inner>, recv: quinn::RecvStream) {
    let mut stream = FramedReader::new(recv, MAX_PAYLOAD_LEN);
    let mut reader = ClipReader::new(ClipLimits::unlimited());
    let mut current: Option<Current> = None;
    loop {
        let next = match current.as_ref().is_some_and(|c| c.ended) {
            // After the end only the FIN is due; do not wait for it forever.
            true => match tokio::time::timeout(Duration::from_secs(5), stream.next_clip()).await {
                Ok(r) => r,
                Err(_) => return,
            },
            false => stream.next_clip().await,
        };
        let code = match next {
            Ok(Some((msg, _))) => {
                match handle(&inner, msg, &mut reader, &mut current, stream.get_mut()).await {
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
    msg: ClipMessage,
    reader: &mut ClipReader,
    current: &mut Option<Current>,
    recv: &mut quinn::RecvStream,
) -> Result<Flow, ErrorCode> {
    let now = Instant::now();
    match reader.handle_message(msg, now).map_err(|e| e.code())? {
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
            *current = Some(Current {
                group: header.group,
                clip_id: header.clip_id,
                duplicate,
                ended: false,
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
