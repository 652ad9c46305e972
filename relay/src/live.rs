//! A clip in flight: one shared, append-only buffer of frames that every
//! receiver reads at its own pace.
//!
//! The talker's ingest task appends each frame as it arrives (the very
//! bytes it received, as a [`Bytes`] shared by all receivers, never copied)
//! and wakes the receivers through a [`tokio::sync::watch`] channel. Each
//! receiver keeps its own position, so a late joiner starts at frame 0 and a
//! slow receiver falls behind alone: the talker never waits for anyone. A
//! transcoded WAV upload is delivered through the same type, filled at once.

use std::sync::Arc;

use bytes::Bytes;
use ptt_protocol::{ClipHeader, ClipMessage, ErrorCode};
use tokio::sync::watch;

use crate::store::{ClipMeta, StoredClip};

/// How a clip stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClipState {
    /// Frames are still coming.
    Live,
    /// Complete and stored as `seq`.
    Ended {
        /// The group sequence number.
        seq: u64,
        /// The talker's waveform preview.
        waveform: Bytes,
    },
    /// Discarded; receivers reset their streams with this code.
    Aborted(ErrorCode),
}

/// The frames so far and the state.
#[derive(Debug)]
pub struct Progress {
    /// Each frame as a framed `ClipFrame` message, ready to forward.
    pub raw: Vec<Bytes>,
    /// Each frame's Opus packet (a slice of the same memory as `raw`).
    pub data: Vec<Bytes>,
    /// Live, ended or aborted.
    pub state: ClipState,
    /// When the newest frame was appended (for the frame relay latency
    /// metric).
    pub newest_at: std::time::Instant,
}

/// A clip being spoken (or a complete clip on its way to members).
#[derive(Debug)]
pub struct LiveClip {
    /// Identity and audio parameters, with the talker's user id.
    pub meta: ClipMeta,
    /// The talker's connection, for floor release and receipts.
    pub talker_session: u64,
    progress: watch::Sender<Progress>,
}

/// Frames reserved up front: 15 s of 20 ms frames, a typical voice note,
/// so most clips never reallocate their buffer.
const INITIAL_FRAMES: usize = 750;

impl LiveClip {
    /// A clip whose frames will follow.
    pub fn new(meta: ClipMeta, talker_session: u64) -> Arc<LiveClip> {
        let (progress, _) = watch::channel(Progress {
            raw: Vec::with_capacity(INITIAL_FRAMES),
            data: Vec::with_capacity(INITIAL_FRAMES),
            state: ClipState::Live,
            newest_at: std::time::Instant::now(),
        });
        Arc::new(LiveClip {
            meta,
            talker_session,
            progress,
        })
    }

    /// A stored clip, complete and ended, to deliver like a live one (a
    /// clip this node did not see live: another node's, or one whose live
    /// copy was replaced).
    pub fn from_stored(clip: &StoredClip, talker_session: u64) -> Arc<LiveClip> {
        let live = LiveClip::new(clip.meta.clone(), talker_session);
        for (index, data) in clip.frames.iter().enumerate() {
            live.push_packet(index as u32, data.clone());
        }
        live.end(clip.seq, clip.waveform.clone());
        live
    }

    /// The header members receive for a delivery from this buffer: `seq` 0,
    /// as in every live delivery (the sequence number comes in `ClipEnd`).
    pub fn header(&self) -> ClipHeader {
        member_header(&self.meta, 0, 0)
    }

    /// Appends a frame given as its packet alone (framing it here).
    pub fn push_packet(&self, index: u32, data: Bytes) {
        let mut raw = bytes::BytesMut::with_capacity(data.len() + 8);
        ptt_protocol::message::encode_frame(&mut raw, index, &data);
        self.push_frame(raw.freeze(), data);
    }

    /// Appends a frame: `raw` is the framed message, `data` its packet.
    pub fn push_frame(&self, raw: Bytes, data: Bytes) {
        let now = std::time::Instant::now();
        self.progress.send_modify(|p| {
            p.raw.push(raw);
            p.data.push(data);
            p.newest_at = now;
        });
    }

    /// The clip is stored as `seq`.
    pub fn end(&self, seq: u64, waveform: Bytes) {
        self.progress
            .send_modify(|p| p.state = ClipState::Ended { seq, waveform });
    }

    /// The clip is discarded.
    pub fn abort(&self, code: ErrorCode) {
        self.progress.send_if_modified(|p| {
            if p.state == ClipState::Live {
                p.state = ClipState::Aborted(code);
                true
            } else {
                false
            }
        });
    }

    /// The current state.
    pub fn state(&self) -> ClipState {
        self.progress.borrow().state.clone()
    }

    /// The Opus packets so far.
    pub fn packets(&self) -> Vec<Bytes> {
        self.progress.borrow().data.clone()
    }

    /// Waits until the clip is stored (its sequence number) or discarded
    /// (`None`).
    pub async fn stored(&self) -> Option<u64> {
        let mut rx = self.subscribe();
        loop {
            match &rx.borrow_and_update().state {
                ClipState::Ended { seq, .. } => return Some(*seq),
                ClipState::Aborted(_) => return None,
                ClipState::Live => {}
            }
            if rx.changed().await.is_err() {
                return None;
            }
        }
    }

    /// A receiver of the clip's progress.
    pub fn subscribe(&self) -> watch::Receiver<Progress> {
        self.progress.subscribe()
    }
}

/// The header members receive for a clip: the talker's flags (emergency)
/// plus `extra_flags` (history, fetched); `seq` 0 while live.
pub fn member_header(m: &ClipMeta, seq: u64, extra_flags: u8) -> ClipHeader {
    ClipHeader {
        group: m.group.clone(),
        clip_id: m.clip_id,
        talker: m.talker.clone(),
        seq,
        format: m.format,
        sample_rate: m.sample_rate,
        channels: m.channels,
        frame_ms: m.frame_ms,
        created_ms: m.created_ms,
        flags: (m.flags & ClipHeader::FLAG_EMERGENCY) | extra_flags,
    }
}

/// The framed `ClipEnd` message.
pub fn end_message(frame_count: u32, seq: u64, waveform: Bytes) -> Bytes {
    ClipMessage::End {
        frame_count,
        seq,
        waveform,
    }
    .to_bytes()
}
