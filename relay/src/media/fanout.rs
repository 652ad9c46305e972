//! The live fan-out on the media path: a clip's frames sealed for each of
//! its media members and handed to the kernel together.
//!
//! - [`MediaTarget`]: one member's live delivery of one clip: its path, the
//!   stream its frames name, and how many frames go in one packet.
//! - [`send_frame`]: one frame to every member, called by the talker's task
//!   as it appends the frame ([`crate::live::LiveClip::push_frame`]): no task
//!   wake per member, nothing queued beyond what a member's packet holds.
//! - [`send_backlog`]: the frames a clip had before a member joined.
//! - [`flush`]: what a member's packet still holds when the clip ends.
//!
//! A member whose client announced `FEATURE_FRAMES` (PROTOCOL.md §14.1) in
//! a group with a live latency budget gets its frames in `Frames` packets,
//! `budget ÷ frame` at a time (`Held`): three 20 ms frames a packet under
//! the default 60 ms, a third of the datagrams, the seals and the kernel's
//! per-datagram work (issue #15 item 3 on the media path). Walkie groups
//! (no budget) and older clients get each frame alone, at once.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ptt_protocol::media::{
    BIND_TIMEOUT, FramePayload, FramesPayload, HEADED_FRAMES, HeadedFramePayload,
    MAX_FRAMES_PER_PACKET, MAX_PLAINTEXT_LEN, PacketType,
};
use tokio::net::UdpSocket;

use super::MediaPeer;
use crate::net::{Batch, SEND_BATCH};

/// A media member's live stream for one clip: where its frames go.
#[derive(Debug, Clone)]
pub struct MediaTarget {
    /// The member's media path.
    pub peer: Arc<MediaPeer>,
    /// The QUIC id of the member's live clip stream (named in every frame).
    pub stream: u64,
    /// The clip's `ClipHeader` message as the member's stream carries it,
    /// sent in the first [`HEADED_FRAMES`] frame packets.
    pub header: Bytes,
    /// Frame packets sealed for this delivery so far.
    pub sent: Arc<AtomicU32>,
    /// Frames per packet: 1 sends each frame at once.
    hold: usize,
    /// The group's live latency budget: a frame that waited this long goes
    /// with the next one to arrive, whatever the count.
    budget: Duration,
    /// The frames waiting for the rest of their packet.
    held: Arc<Mutex<Held>>,
}

impl MediaTarget {
    /// A member's delivery on `stream` of a clip of `frame`-long frames, in
    /// a group whose live latency budget is `budget`: frames go
    /// `budget ÷ frame` to a packet (at most [`MAX_FRAMES_PER_PACKET`]) if
    /// the member's client takes `Frames` packets, else one by one.
    pub fn new(
        peer: Arc<MediaPeer>,
        stream: u64,
        header: Bytes,
        budget: Duration,
        frame: Duration,
    ) -> MediaTarget {
        let hold = if peer.takes_frames() && !frame.is_zero() {
            ((budget.as_micros() / frame.as_micros()) as usize).clamp(1, MAX_FRAMES_PER_PACKET)
        } else {
            1
        };
        MediaTarget {
            peer,
            stream,
            header,
            sent: Arc::new(AtomicU32::new(0)),
            hold,
            budget,
            held: Arc::default(),
        }
    }

    /// How many frames go in one packet (1: each at once).
    pub fn frames_per_packet(&self) -> usize {
        self.hold
    }

    fn held(&self) -> std::sync::MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The frames one member's next packet holds, without I/O (time is passed
/// in).
#[derive(Debug, Default)]
struct Held {
    frames: Vec<(u32, Bytes)>,
    /// When the oldest of `frames` arrived.
    since: Option<Instant>,
    /// The delivery ended: frames that still come (a late uplink copy) go
    /// at once.
    closed: bool,
}

impl Held {
    /// Holds a frame; whether the packet is due now: `hold` frames are
    /// held, the oldest waited `budget`, or the delivery has ended. The
    /// caller sends `frames` (in index order) and clears them.
    fn add(
        &mut self,
        index: u32,
        data: &Bytes,
        now: Instant,
        hold: usize,
        budget: Duration,
    ) -> bool {
        self.frames.push((index, data.clone()));
        let since = *self.since.get_or_insert(now);
        let due = self.closed
            || self.frames.len() >= hold
            || now.saturating_duration_since(since) >= budget;
        if due {
            self.since = None;
            // The uplink can bring frames out of order.
            self.frames.sort_unstable_by_key(|(index, _)| *index);
        }
        due
    }

    /// The held frames go now (their budget is spent), in index order.
    fn close_packet(&mut self) {
        self.since = None;
        self.frames.sort_unstable_by_key(|(index, _)| *index);
    }

    /// The delivery ended: what is held is due.
    fn close(&mut self) {
        self.closed = true;
        self.close_packet();
    }
}

/// Sends frame `index` of a clip to each target whose path is bound:
/// alone in one sealed datagram each, or, for a target that holds frames,
/// with those it held once its packet is due. Everything is handed to the
/// kernel together ([`crate::net::send_batch`], one `sendmmsg` per 64),
/// fire-and-forget: a datagram the socket cannot take at once is dropped
/// (the member fetches the clip). Counts the frames and bytes sent in the
/// metrics, once per call.
///
/// Returns when the earliest of the frames still held is due (its budget
/// spent): the talker's task wakes then for [`flush_due`], so that a
/// pause in the talk (or an upload stream held up under loss while the
/// uplink brought the frames) does not hold a frame longer.
pub fn send_frame(targets: &[MediaTarget], index: u32, data: &Bytes) -> Option<Instant> {
    let mut out = Outgoing::new(targets.len().min(SEND_BATCH) * (data.len() + 48));
    let mut due: Option<Instant> = None;
    for target in targets {
        if target.hold > 1 {
            let mut held = target.held();
            if held.add(index, data, out.now, target.hold, target.budget) {
                out.frames(target, &held.frames);
                held.frames.clear();
            } else if let Some(since) = held.since {
                due = earliest(due, since + target.budget);
            }
        } else {
            out.frame(target, index, data);
        }
    }
    out.finish();
    due
}

/// Sends the frames of each target that waited their budget by `now`;
/// when the next held frames are due, if any.
pub fn flush_due(targets: &[MediaTarget], now: Instant) -> Option<Instant> {
    let mut out = Outgoing::new(1200);
    let mut due: Option<Instant> = None;
    for target in targets.iter().filter(|t| t.hold > 1) {
        let mut held = target.held();
        let Some(since) = held.since else { continue };
        if now.saturating_duration_since(since) >= target.budget {
            held.close_packet();
            out.frames(target, &held.frames);
            held.frames.clear();
        } else {
            due = earliest(due, since + target.budget);
        }
    }
    out.finish();
    due
}

/// The earlier of a deadline and another.
fn earliest(a: Option<Instant>, b: Instant) -> Option<Instant> {
    Some(a.map_or(b, |a| a.min(b)))
}

/// Sends a member the frames its clip had before it joined (`frames`, in
/// index order): packed into as few `Frames` packets as they fit if its
/// client takes them, else one datagram each.
pub fn send_backlog(target: &MediaTarget, frames: &[(u32, Bytes)]) {
    let mut out = Outgoing::new(frames.iter().map(|(_, d)| d.len() + 8).sum::<usize>() + 64);
    if target.peer.takes_frames() {
        out.frames(target, frames);
    } else {
        for (index, data) in frames {
            out.frame(target, *index, data);
        }
    }
    out.finish();
}

/// The member's delivery ended: the frames it held go now (before the
/// stream's `ClipEnd`), and any that still come go at once.
pub fn flush(target: &MediaTarget) {
    let mut held = target.held();
    held.close();
    if !held.frames.is_empty() {
        let mut out = Outgoing::new(1200);
        out.frames(target, &held.frames);
        held.frames.clear();
        out.finish();
    }
}

/// The datagrams of one fan-out, sealed into one [`Batch`] per socket and
/// sent in `sendmmsg` calls of up to [`SEND_BATCH`].
struct Outgoing<'a> {
    now: Instant,
    plain: Vec<u8>,
    batch: Batch,
    /// Frames in each datagram of `batch`.
    frames_in: Vec<u64>,
    socket: Option<&'a Arc<UdpSocket>>,
    sent_frames: u64,
    sent_bytes: u64,
}

impl<'a> Outgoing<'a> {
    fn new(reserve: usize) -> Outgoing<'a> {
        let mut batch = Batch::default();
        batch.bytes.reserve(reserve);
        Outgoing {
            now: Instant::now(),
            plain: Vec::with_capacity(MAX_PLAINTEXT_LEN),
            batch,
            frames_in: Vec::new(),
            socket: None,
            sent_frames: 0,
            sent_bytes: 0,
        }
    }

    /// One frame alone: a `HeadedFrame` among the delivery's first
    /// [`HEADED_FRAMES`] packets (if the header fits), else a `Frame`.
    fn frame(&mut self, target: &'a MediaTarget, index: u32, data: &[u8]) {
        self.plain.clear();
        let headed = target.sent.fetch_add(1, Ordering::Relaxed) < HEADED_FRAMES
            && target.header.len() + data.len() + 16 <= MAX_PLAINTEXT_LEN;
        let kind = if headed {
            HeadedFramePayload::encode_with(
                target.stream,
                index,
                &target.header,
                data,
                &mut self.plain,
            );
            PacketType::HeadedFrame
        } else {
            FramePayload {
                stream: target.stream,
                index,
                data,
            }
            .encode(&mut self.plain);
            PacketType::Frame
        };
        self.seal(target, kind, 1);
    }

    /// Frames in index order, as few `Frames` packets as they fit in
    /// (at most [`MAX_FRAMES_PER_PACKET`] each); the delivery's first
    /// [`HEADED_FRAMES`] packets carry the header where it fits. A single
    /// frame goes as [`frame`](Self::frame) sends it.
    fn frames(&mut self, target: &'a MediaTarget, frames: &[(u32, Bytes)]) {
        if let [(index, data)] = frames {
            return self.frame(target, *index, data);
        }
        let mut rest = frames;
        while let Some((first, _)) = rest.first() {
            let first_len = FramesPayload::frame_len(*first, &rest[0].1);
            let headed = target.sent.fetch_add(1, Ordering::Relaxed) < HEADED_FRAMES;
            let header = Some(&target.header[..]).filter(|h| {
                headed
                    && FramesPayload::encoded_len(target.stream, Some(h), first_len)
                        <= MAX_PLAINTEXT_LEN
            });
            let mut len = FramesPayload::encoded_len(target.stream, header, first_len);
            let mut take = 1;
            while let Some((index, data)) = rest.get(take) {
                let more = FramesPayload::frame_len(*index, data);
                if take == MAX_FRAMES_PER_PACKET || len + more > MAX_PLAINTEXT_LEN {
                    break;
                }
                len += more;
                take += 1;
            }
            let (packet, later) = rest.split_at(take);
            rest = later;
            self.plain.clear();
            FramesPayload::encode_with(
                target.stream,
                header,
                packet.iter().map(|(index, data)| (*index, &data[..])),
                &mut self.plain,
            );
            self.seal(target, PacketType::Frames, take as u64);
        }
    }

    /// Seals `plain` as a `kind` packet of `frames` frames to the target's
    /// media address, if its path is bound.
    fn seal(&mut self, target: &'a MediaTarget, kind: PacketType, frames: u64) {
        let socket = &target.peer.socket;
        // Every peer of a node shares its plane's socket; should one not,
        // what is batched goes out on its own socket first.
        if self.socket.is_some_and(|s| !Arc::ptr_eq(s, socket)) || self.batch.len() == SEND_BATCH {
            self.send();
        }
        let mut s = target.peer.lock();
        let bound = !s.closed
            && s.last_bind
                .is_some_and(|at| self.now.saturating_duration_since(at) < BIND_TIMEOUT);
        let Some(addr) = s.addr.filter(|_| bound) else {
            return;
        };
        let start = self.batch.bytes.len();
        if target
            .peer
            .seal(&mut s, kind, &self.plain, &mut self.batch.bytes)
            .is_err()
        {
            self.batch.bytes.truncate(start);
            return;
        }
        self.batch.push(addr);
        self.frames_in.push(frames);
        self.socket = Some(socket);
    }

    /// Sends what is batched.
    fn send(&mut self) {
        if let Some(socket) = self.socket
            && !self.batch.is_empty()
        {
            let (datagrams, bytes) = crate::net::send_batch(socket, &self.batch);
            self.sent_frames += self.frames_in[..datagrams as usize].iter().sum::<u64>();
            self.sent_bytes += bytes;
        }
        self.batch.clear();
        self.frames_in.clear();
    }

    /// Sends the rest and counts what went out.
    fn finish(mut self) {
        self.send();
        if self.sent_frames > 0 {
            let m = crate::metrics::Metrics::get();
            m.frames_out.increment(self.sent_frames);
            m.bytes_out.increment(self.sent_bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue #15 item 3 on the media path, on a simulated clock: under a
    /// 60 ms budget with 20 ms frames a member's packet is due every third
    /// frame; a frame that waited the budget goes with the next one
    /// whatever the count; the frames come out in index order; after the
    /// delivery ends, each frame is due at once.
    #[test]
    fn frames_are_held_to_the_count_or_the_budget_then_sent_in_order() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let budget = ms(60);
        let data = Bytes::from_static(b"\x48");
        let mut held = Held::default();
        let mut due_at = Vec::new();
        for i in 0..9u32 {
            if held.add(i, &data, t0 + ms(20 * u64::from(i)), 3, budget) {
                due_at.push(i);
                held.frames.clear();
            }
        }
        assert_eq!(due_at, [2, 5, 8], "one packet per three frames");
        // A stall: frame 9, then frame 10 only 100 ms later.
        assert!(!held.add(9, &data, t0 + ms(180), 3, budget));
        assert!(
            held.add(10, &data, t0 + ms(280), 3, budget),
            "waited the budget"
        );
        held.frames.clear();
        // Out of order (the uplink overtook the stream): sorted when due.
        assert!(!held.add(13, &data, t0 + ms(300), 3, budget));
        assert!(!held.add(11, &data, t0 + ms(301), 3, budget));
        assert!(held.add(12, &data, t0 + ms(302), 3, budget));
        let order: Vec<u32> = held.frames.iter().map(|(i, _)| *i).collect();
        assert_eq!(order, [11, 12, 13]);
        held.frames.clear();
        // The end: what is held is due, and so is every later frame.
        assert!(!held.add(15, &data, t0 + ms(340), 3, budget));
        assert!(!held.add(14, &data, t0 + ms(341), 3, budget));
        held.close();
        let order: Vec<u32> = held.frames.iter().map(|(i, _)| *i).collect();
        assert_eq!(order, [14, 15]);
        held.frames.clear();
        assert!(held.add(16, &data, t0 + ms(400), 3, budget));
    }
}
