//! A clip in flight: one shared, append-only buffer of frames that every
//! receiver reads at its own pace.
//!
//! The talker's ingest task appends each frame as it arrives (the very
//! bytes it received, as a [`Bytes`] shared by all receivers, never copied)
//! and wakes the receivers through a [`tokio::sync::watch`] channel. Each
//! receiver keeps its own position, so a late joiner starts at frame 0 and a
//! slow receiver falls behind alone: the talker never waits for anyone.
//! Receivers that are caught up do not wait for the wake: they park their
//! stream on the clip ([`LiveClip::park`]) and the appending task writes
//! into it ([`ParkedWriter`]) for as long as the stream takes each write at
//! once. A transcoded WAV upload is delivered through the same type, filled
//! at once.

use std::sync::{Arc, PoisonError};

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
    /// Members on the UDP media path: each frame is sealed and sent to
    /// them as it is appended ([`crate::media::send_frame`]).
    pub media: Arc<[crate::media::MediaTarget]>,
    /// Frames the talker's UDP uplink brought ahead of its upload stream
    /// and that were sent to the media members then
    /// ([`LiveClip::push_uplink`]), by index: when the stream's copy
    /// arrives it is stored but not sent again. At most
    /// [`UPLINK_AHEAD`](ptt_protocol::media::UPLINK_AHEAD) entries.
    pub uplinked: std::collections::BTreeMap<u32, Bytes>,
}

/// A clip being spoken (or a complete clip on its way to members).
#[derive(Debug)]
pub struct LiveClip {
    /// Identity and audio parameters, with the talker's user id.
    pub meta: ClipMeta,
    /// The talker's connection, for floor release and receipts.
    pub talker_session: u64,
    progress: watch::Sender<Progress>,
    /// Signalled when the clip ends or is aborted: media deliveries wait
    /// for this alone, not for every frame.
    finished: tokio::sync::Notify,
    /// When frames that media members hold for a `Frames` packet are next
    /// due ([`crate::media::fanout`]): the talker's task sleeps until then
    /// ([`media_due`](Self::media_due)).
    media_due: std::sync::Mutex<Option<std::time::Instant>>,
    /// Signalled when `media_due` is set from none (an uplink frame came
    /// while the talker's task waited for its stream).
    media_due_set: tokio::sync::Notify,
    /// Stream deliveries that are caught up: each new frame is written
    /// into their streams by [`push_frame`](Self::push_frame) itself.
    parked: Parking,
}

/// A member's live stream delivery, parked on its clip while it is caught
/// up ([`LiveClip::park`]): the task that appends a frame writes it into
/// the member's stream there and then (or, under a live latency budget,
/// holds it and writes the held frames together when they are due), so a
/// member costs no task wake per frame where its stream has room (issue
/// #15 item 2). What cannot be written at once (the stream is blocked, the
/// member is behind its reports, the clip ended) goes back to the
/// delivery's own task, which resumes it ([`crate::delivery::deliver_live`]).
///
/// A trait, so that this module (the clip) does not depend on the one
/// that writes (the delivery).
pub trait ParkedWriter: Send {
    /// Frame `index` (its framed message, `raw`) was appended at `at`:
    /// write it, or hold it for the budget.
    fn write(&mut self, index: usize, raw: &Bytes, at: std::time::Instant) -> Park;
    /// Writes the held frames if they are due at `now`.
    fn flush(&mut self, now: std::time::Instant) -> Park;
    /// Hands the stream back to its delivery task.
    fn resume(self: Box<Self>);
}

/// What a [`ParkedWriter`] needs after a write or a flush.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Park {
    /// Nothing: it stays parked.
    Writing,
    /// It stays parked, with frames held until this instant: the clip's
    /// talker calls [`LiveClip::flush_media_due`] then.
    Held(std::time::Instant),
    /// Back to its task: the write did not complete at once (what is left
    /// of it is the task's to write), or the member must be checked
    /// against the lag rule.
    Resume,
}

/// The parked writers of a clip, by key.
#[derive(Default)]
struct Parking {
    writers: std::sync::Mutex<Vec<(u64, Box<dyn ParkedWriter>)>>,
    next_key: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Parking {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Parking").finish_non_exhaustive()
    }
}

impl Parking {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(u64, Box<dyn ParkedWriter>)>> {
        self.writers.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Hands every parked writer back to its task.
    fn resume_all(&self) {
        let writers = std::mem::take(&mut *self.lock());
        for (_, writer) in writers {
            writer.resume();
        }
    }
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
            media: Arc::new([]),
            uplinked: std::collections::BTreeMap::new(),
        });
        Arc::new(LiveClip {
            meta,
            talker_session,
            progress,
            finished: tokio::sync::Notify::new(),
            media_due: std::sync::Mutex::new(None),
            media_due_set: tokio::sync::Notify::new(),
            parked: Parking::default(),
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
    ///
    /// Media-path members get the frame at once, sealed and sent by this
    /// call ([`crate::media::send_frame`]), after the frame is in the
    /// buffer: a member registered before the append gets it here, one
    /// registered after gets it in its backlog, never both or neither.
    ///
    /// A frame the talker's UDP uplink brought first
    /// ([`push_uplink`](Self::push_uplink)) went to the media members
    /// then: it is appended, and not sent again.
    pub fn push_frame(&self, raw: Bytes, data: Bytes) {
        let now = std::time::Instant::now();
        let mut media = None;
        let mut appended = 0;
        self.progress.send_modify(|p| {
            let index = p.data.len();
            appended = index;
            let uplinked = !p.uplinked.is_empty() && p.uplinked.remove(&(index as u32)).is_some();
            if !p.media.is_empty() && !uplinked {
                media = Some((p.media.clone(), index));
            }
            p.raw.push(raw.clone());
            p.data.push(data.clone());
            p.newest_at = now;
        });
        if let Some((targets, index)) = media
            && let Some(due) = crate::media::send_frame(&targets, index as u32, &data)
        {
            self.set_media_due(due);
        }
        self.write_parked(appended, &raw, now);
    }

    /// Writes frame `index` (`raw`), just appended, into every parked
    /// stream (or holds it there for the budget); a writer that cannot
    /// take it goes back to its task. A writer parked after the append
    /// already has it (parking counts the frames under the same lock) and
    /// skips it.
    fn write_parked(&self, index: usize, raw: &Bytes, at: std::time::Instant) {
        self.each_parked(|writer| writer.write(index, raw, at));
    }

    /// Runs `step` on every parked writer; hands back those that ask for
    /// it, and has the talker's task call back when held frames are due.
    fn each_parked(&self, mut step: impl FnMut(&mut dyn ParkedWriter) -> Park) {
        let mut due: Option<std::time::Instant> = None;
        {
            let mut writers = self.parked.lock();
            let mut i = 0;
            while i < writers.len() {
                match step(&mut *writers[i].1) {
                    Park::Writing => i += 1,
                    Park::Held(at) => {
                        due = Some(due.map_or(at, |d| d.min(at)));
                        i += 1;
                    }
                    Park::Resume => writers.swap_remove(i).1.resume(),
                }
            }
        }
        if let Some(due) = due {
            self.set_media_due(due);
        }
    }

    /// Parks a stream delivery that has taken `taken` frames (written, or
    /// held until `due`): if the clip is live and has no more frames than
    /// that, `writer` gets every frame appended from now on
    /// ([`ParkedWriter`]), until it goes back to its task (through the
    /// writer itself: [`ParkedWriter::resume`]). Under the same lock as
    /// the frames' writes, so no frame is written twice or skipped. The
    /// key to [`unpark`](Self::unpark) it with, or the writer, not parked.
    pub fn park<W: ParkedWriter + 'static>(
        &self,
        taken: usize,
        due: Option<std::time::Instant>,
        writer: W,
    ) -> Result<u64, W> {
        let key = {
            let mut writers = self.parked.lock();
            {
                let progress = self.progress.borrow();
                if progress.state != ClipState::Live || progress.raw.len() != taken {
                    return Err(writer);
                }
            }
            let key = self
                .parked
                .next_key
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            writers.push((key, Box::new(writer)));
            key
        };
        if let Some(due) = due {
            self.set_media_due(due);
        }
        Ok(key)
    }

    /// Drops the parked writer `key` if it is still parked (its task was
    /// dropped: its stream is reset as the delivery's own would be).
    pub fn unpark(&self, key: u64) {
        let writer = {
            let mut writers = self.parked.lock();
            writers
                .iter()
                .position(|(k, _)| *k == key)
                .map(|i| writers.swap_remove(i))
        };
        drop(writer);
    }

    /// When frames held for media members' `Frames` packets are next due
    /// (`None`: none held): the talker's task calls
    /// [`flush_media_due`](Self::flush_media_due) then.
    pub fn media_due(&self) -> Option<std::time::Instant> {
        *self
            .media_due
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits until [`media_due`](Self::media_due) is set from none.
    pub async fn media_due_set(&self) {
        self.media_due_set.notified().await
    }

    /// Sends the held frames whose budget is spent at `now`: media
    /// members' and parked streams'.
    pub fn flush_media_due(&self, now: std::time::Instant) {
        let targets = self.progress.borrow().media.clone();
        *self
            .media_due
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = None;
        if let Some(due) = crate::media::flush_due(&targets, now) {
            self.set_media_due(due);
        }
        self.each_parked(|writer| writer.flush(now));
    }

    fn set_media_due(&self, due: std::time::Instant) {
        let mut at = self
            .media_due
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let was_none = at.is_none();
        *at = Some(at.map_or(due, |at| at.min(due)));
        drop(at);
        if was_none {
            self.media_due_set.notify_one();
        }
    }

    /// A frame of the talker's UDP uplink (PROTOCOL.md §14.3): sent to
    /// the media members at once if it is new (not appended yet, not
    /// uplinked before), at most
    /// [`UPLINK_AHEAD`](ptt_protocol::media::UPLINK_AHEAD) frames ahead of
    /// the upload stream, there are media members, the clip is live and
    /// `charge` (the user's frame budget, asked only for a new frame)
    /// allows it. The stored clip comes from the stream alone: the frame
    /// is kept only until the stream's copy replaces it. Whether the
    /// frame was sent.
    pub fn push_uplink(&self, index: u32, data: Bytes, charge: impl FnOnce() -> bool) -> bool {
        let mut media = None;
        self.progress.send_if_modified(|p| {
            let next = p.data.len() as u64;
            let index64 = u64::from(index);
            let new = index64 >= next
                && index64 < next + u64::from(ptt_protocol::media::UPLINK_AHEAD)
                && !p.uplinked.contains_key(&index)
                && !p.media.is_empty()
                && p.state == ClipState::Live;
            if new && charge() {
                p.uplinked.insert(index, data.clone());
                media = Some(p.media.clone());
            }
            false
        });
        match media {
            Some(targets) => {
                if let Some(due) = crate::media::send_frame(&targets, index, &data) {
                    self.set_media_due(due);
                }
                true
            }
            None => false,
        }
    }

    /// Whether frame `index` came by the talker's UDP uplink before its
    /// stream copy (it was counted against the user's frame limit then).
    pub fn was_uplinked(&self, index: u32) -> bool {
        self.progress.borrow().uplinked.contains_key(&index)
    }

    /// Adds a media-path member: the frames appended from now on are sent
    /// to it by [`push_frame`](Self::push_frame) (or
    /// [`push_uplink`](Self::push_uplink)), and the frames before (its
    /// backlog: the appended ones, then those the uplink brought ahead)
    /// are sent here (packed, for a client that takes `Frames` packets),
    /// under the same lock as the append, so the member's
    /// frames leave the relay in index order (UDP may still reorder them on
    /// the way; clients place frames by index, PROTOCOL.md §14.4). Sending
    /// the backlog after releasing the lock let a frame appended meanwhile
    /// overtake it (seen as frame 8 before 4 when a cluster node filled in
    /// frames from the store). Returns a guard that
    /// removes the member when dropped. Wakes no receiver.
    pub fn add_media_target(
        self: &Arc<Self>,
        target: crate::media::MediaTarget,
    ) -> MediaRegistration {
        let key = (target.peer.conn_id(), target.stream);
        self.progress.send_if_modified(|p| {
            if !p.data.is_empty() || !p.uplinked.is_empty() {
                let backlog: Vec<(u32, Bytes)> = (0u32..)
                    .zip(p.data.iter().cloned())
                    .chain(p.uplinked.iter().map(|(i, d)| (*i, d.clone())))
                    .collect();
                crate::media::send_backlog(&target, &backlog);
            }
            p.media = p.media.iter().cloned().chain([target]).collect();
            false
        });
        MediaRegistration {
            clip: self.clone(),
            key,
        }
    }

    /// Frames appended so far.
    pub fn frame_count(&self) -> usize {
        self.progress.borrow().data.len()
    }

    /// Waits until the clip is ended or aborted; its final state.
    pub async fn finished(&self) -> ClipState {
        loop {
            let notified = self.finished.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let state = self.state();
            if state != ClipState::Live {
                return state;
            }
            notified.await;
        }
    }

    /// The clip is stored as `seq`.
    pub fn end(&self, seq: u64, waveform: Bytes) {
        self.progress
            .send_modify(|p| p.state = ClipState::Ended { seq, waveform });
        self.parked.resume_all();
        self.finished.notify_waiters();
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
        self.parked.resume_all();
        self.finished.notify_waiters();
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

/// A media-path member of a live clip; removed from the clip when dropped
/// (the delivery ended, or the member left).
#[derive(Debug)]
pub struct MediaRegistration {
    clip: Arc<LiveClip>,
    key: (u64, u64),
}

impl Drop for MediaRegistration {
    fn drop(&mut self) {
        let key = self.key;
        self.clip.progress.send_if_modified(|p| {
            if p.media.iter().any(|t| (t.peer.conn_id(), t.stream) == key) {
                p.media = p
                    .media
                    .iter()
                    .filter(|t| (t.peer.conn_id(), t.stream) != key)
                    .cloned()
                    .collect();
            }
            false
        });
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
