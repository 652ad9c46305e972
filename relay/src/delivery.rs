//! Writing clips to a member: one unidirectional stream per clip.
//!
//! A live clip is written from the shared [`LiveClip`] buffer as frames
//! arrive; if the member falls too far behind, the stream is reset with
//! [`ErrorCode::SlowReceiver`] and the clip is sent again from the store
//! once it is complete. Stored clips (catch-up, fetch, recovery) are
//! written whole, flagged as history.
//!
//! "Behind" is measured in frames, against what the member has *read*. A
//! QUIC sender cannot see that: a write completes as soon as the bytes fit
//! the member's flow-control credit, and with the 64 KiB stream window
//! PROTOCOL.md recommends that is about 1,000 voice frames (20 s) ahead of
//! the application; quinn exposes neither per-stream credit nor
//! acknowledged offsets. So members report how many frames of each live
//! stream they have read, in `LiveRead` datagrams ([`LiveReads`]); a
//! connection that never reports falls back to the transport's signal, a
//! write that blocks longer than [`LagPolicy::max_stall`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use ptt_protocol::{ClipHeader, ClipId, ClipMessage, ErrorCode, GroupMode};
use quinn::VarInt;

use tokio::sync::watch;

use crate::live::{ClipState, LiveClip, Park, Progress, end_message, member_header};
use crate::store::{ClipMeta, StoredClip};
use crate::transport::{Connection, SendStream};

/// How a clip delivery ended.
#[derive(Debug)]
pub enum Delivery {
    /// The whole clip, ending with its sequence number, was written (and
    /// recorded in the subscription's [`Sink`] before its end went out).
    Complete,
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
    /// Frames the receiver may be behind the talker: behind what it has
    /// reported reading (plus the age of a report), or not yet written to
    /// its stream.
    pub max_frames: usize,
    /// Longest a single write may block.
    pub max_stall: Duration,
}

/// Where a subscription's delivery tasks leave what the session needs to
/// know: the code their streams are reset with if stopped, and the clips
/// they delivered, recorded *before* each clip's end is written, so that a
/// member's acknowledgement can never overtake the record of the delivery.
#[derive(Debug, Clone)]
pub struct Sink(Arc<SinkInner>);

#[derive(Debug)]
struct SinkInner {
    drop_code: AtomicU32,
    /// Header flags every delivery of this sink adds (muted).
    flags: std::sync::atomic::AtomicU8,
    /// The group's live latency budget, ms ([`Coalescer`]); 0: each frame
    /// at once.
    live_budget_ms: AtomicU32,
    delivered: Mutex<Vec<DeliveredClip>>,
}

/// A clip a delivery wrote whole: `(seq, clip id, talker)`.
pub type DeliveredClip = (u64, ClipId, Arc<str>);

impl Sink {
    /// A sink whose streams reset with `code` when stopped.
    pub fn new(code: ErrorCode) -> Sink {
        Sink(Arc::new(SinkInner {
            drop_code: AtomicU32::new(code.code()),
            flags: std::sync::atomic::AtomicU8::new(0),
            live_budget_ms: AtomicU32::new(0),
            delivered: Mutex::new(Vec::new()),
        }))
    }

    /// Changes the reset code for every stream of this sink.
    pub fn set_drop_code(&self, code: ErrorCode) {
        self.0.drop_code.store(code.code(), Ordering::Relaxed);
    }

    /// Sets or clears `flag` in the header of every delivery that starts
    /// from now on (a channel's follower muting it).
    pub fn set_header_flag(&self, flag: u8, on: bool) {
        if on {
            self.0.flags.fetch_or(flag, Ordering::Relaxed);
        } else {
            self.0.flags.fetch_and(!flag, Ordering::Relaxed);
        }
    }

    /// Sets the live latency budget of every live delivery that starts
    /// from now on: frames may wait up to `ms` to be written together
    /// ([`Coalescer`]); 0 writes each frame at once.
    pub fn set_live_budget(&self, ms: u32) {
        self.0.live_budget_ms.store(ms, Ordering::Relaxed);
    }

    /// The live latency budget set by [`Sink::set_live_budget`].
    pub fn live_budget(&self) -> Duration {
        Duration::from_millis(u64::from(self.0.live_budget_ms.load(Ordering::Relaxed)))
    }

    pub(crate) fn header_flags(&self) -> u8 {
        self.0.flags.load(Ordering::Relaxed)
    }

    fn drop_code(&self) -> u32 {
        self.0.drop_code.load(Ordering::Relaxed)
    }

    /// Takes the clips recorded as delivered since the last call.
    pub fn take_delivered(&self) -> Vec<DeliveredClip> {
        std::mem::take(
            &mut *self
                .0
                .delivered
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        )
    }

    pub(crate) fn record(&self, seq: u64, meta: &ClipMeta) {
        self.0
            .delivered
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((seq, meta.clip_id, meta.talker.as_str().into()));
    }
}

/// A delivery stream that is never left to end with a bare FIN: dropped
/// before [`Guarded::finish`], it is reset with its sink's drop code (quinn
/// finishes a dropped stream, which a reader would take for a clip cut
/// short without a reason).
pub(crate) struct Guarded {
    stream: SendStream,
    on_drop: Sink,
    done: bool,
}

impl Guarded {
    pub(crate) async fn open(conn: &Connection, on_drop: &Sink) -> Option<Guarded> {
        let stream = conn.open_uni().await.ok()?;
        Some(Guarded {
            stream,
            on_drop: on_drop.clone(),
            done: false,
        })
    }

    pub(crate) fn finish(mut self) -> Result<(), web_transport_quinn::ClosedStream> {
        self.done = true;
        self.stream.finish()
    }
}

impl std::ops::Deref for Guarded {
    type Target = SendStream;
    fn deref(&self) -> &SendStream {
        &self.stream
    }
}

impl std::ops::DerefMut for Guarded {
    fn deref_mut(&mut self) -> &mut SendStream {
        &mut self.stream
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        if !self.done {
            // Already reset or finished streams answer with an error: fine.
            let _ = self.stream.reset(self.on_drop.drop_code());
        }
    }
}

/// What a member has read of its live clip streams, as it reports in
/// `LiveRead` datagrams. One per connection, shared by the session (which
/// feeds it each datagram) and the connection's live deliveries.
///
/// A connection is held to its reports from its first report on; until
/// then (a client that does not report), only a blocked write cuts it.
#[derive(Debug, Clone, Default)]
pub struct LiveReads(Arc<ReadsInner>);

#[derive(Debug, Default)]
struct ReadsInner {
    reporting: AtomicBool,
    streams: Mutex<HashMap<u64, Arc<AtomicU32>>>,
}

impl LiveReads {
    /// Takes one datagram from the member: one or more framed messages, of
    /// which `LiveRead`s are counted; others, reports for streams that are
    /// not live, and a damaged tail are ignored.
    pub fn receive(&self, datagram: Bytes) {
        for read in ptt_protocol::live_reads(&datagram) {
            self.report(read.stream, read.frames);
        }
    }

    /// The member has read `frames` frames of the live clip on `stream`.
    pub fn report(&self, stream: u64, frames: u32) {
        self.0.reporting.store(true, Ordering::Relaxed);
        let streams = self
            .0
            .streams
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(read) = streams.get(&stream) {
            read.fetch_max(frames, Ordering::Relaxed);
        }
    }

    /// Starts counting what the member reads of `stream`.
    fn track(&self, stream: u64) -> ReadCount {
        let frames = Arc::new(AtomicU32::new(0));
        self.0
            .streams
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(stream, frames.clone());
        ReadCount {
            view: ReadView {
                reads: self.clone(),
                frames,
            },
            stream,
        }
    }
}

/// One live stream's reported reading.
#[derive(Clone)]
struct ReadView {
    reads: LiveReads,
    frames: Arc<AtomicU32>,
}

impl ReadView {
    /// Frames the member says it has read, `None` if it does not report.
    fn frames(&self) -> Option<usize> {
        self.reads
            .0
            .reporting
            .load(Ordering::Relaxed)
            .then(|| self.frames.load(Ordering::Relaxed) as usize)
    }
}

/// One live stream's reported reading; stops counting when dropped.
struct ReadCount {
    view: ReadView,
    stream: u64,
}

impl Drop for ReadCount {
    fn drop(&mut self) {
        self.view
            .reads
            .0
            .streams
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.stream);
    }
}

/// Writes a live (or just completed) clip from its shared buffer.
///
/// Cuts the stream when the member is more than `lag.max_frames` frames
/// behind the talker, counted from the frames it reported reading in
/// `reads` (allowing a report's age: [`ptt_protocol::LIVE_READ_INTERVAL`] and a round
/// trip), or when a write blocks longer than `lag.max_stall`.
pub async fn deliver_live(
    conn: &Connection,
    clip: &Arc<LiveClip>,
    lag: LagPolicy,
    sink: &Sink,
    reads: &LiveReads,
) -> Delivery {
    let mut rx = clip.subscribe();
    let Some(mut stream) = Guarded::open(conn, sink).await else {
        return Delivery::Failed;
    };
    let frame = Duration::from_millis(u64::from(clip.meta.frame_ms.max(10)));
    let mut coalescer = Coalescer::new(sink.live_budget(), frame);
    // Frames held back on purpose are not lag: they are allowed on top.
    let held = coalescer.held_frames();
    // The backlog a late joiner starts with is allowed; beyond it, only
    // `max_frames` more.
    let allowed_lag = rx.borrow().raw.len().max(lag.max_frames) + held;
    let count = reads.track(stream.quic_id().into());
    let mut reading = Reading {
        rule: LagRule {
            reads: count.view.clone(),
            allowed_unread: allowed_lag + frames_in(ptt_protocol::LIVE_READ_INTERVAL, frame),
            conn: conn.clone(),
            frame,
        },
        _count: count,
        progress: clip.subscribe(),
        max_stall: lag.max_stall,
    };
    let mut header = clip.header();
    header.flags |= sink.header_flags();
    let header = ClipMessage::Header(header).to_bytes();
    if !reading.write(&mut stream, header, 0).await {
        return cut_or_failed(&mut stream, conn);
    }
    // `sent` frames are written; `taken` are in `batch` or written.
    let mut sent = 0usize;
    let mut taken = 0usize;
    let mut batch: Vec<Bytes> = Vec::with_capacity(32);
    // Frames and bytes are counted here and added to the metrics once,
    // when the delivery ends.
    let mut counted = OutCount::default();
    loop {
        let (state, available, newest_at) = {
            let progress = rx.borrow_and_update();
            let available = progress.raw.len();
            if available - sent > allowed_lag {
                stream.reset(ErrorCode::SlowReceiver.code()).ok();
                return Delivery::Cut;
            }
            batch.extend(progress.raw[taken..].iter().cloned());
            taken = available;
            (progress.state.clone(), available, progress.newest_at)
        };
        if reading.too_far_behind(available, sent) {
            stream.reset(ErrorCode::SlowReceiver.code()).ok();
            return Delivery::Cut;
        }
        let live = state == ClipState::Live;
        if !batch.is_empty()
            && (!live || coalescer.pending(tokio::time::Instant::now().into_std(), batch.len()))
        {
            let sampled =
                sent / crate::metrics::LATENCY_SAMPLE != available / crate::metrics::LATENCY_SAMPLE;
            for frame in &batch {
                counted.add(frame.len());
            }
            if !reading.write_all(&mut stream, &mut batch, sent).await {
                return cut_or_failed(&mut stream, conn);
            }
            batch.clear();
            sent = taken;
            coalescer.written();
            if sampled {
                crate::metrics::Metrics::get()
                    .frame_relay_seconds
                    .record(newest_at.elapsed().as_secs_f64());
            }
        }
        match state {
            ClipState::Live => {
                // Caught up: the talker's task writes the next frames into
                // the stream itself (when the budget lets them go) while
                // it has room, and this task sleeps until they no longer
                // fit, the member lags or the clip ends.
                let writing = Writing {
                    stream,
                    sent,
                    batch,
                    coalescer,
                    rule: reading.rule.clone(),
                    direct: OutCount::default(),
                };
                let (back, parked) = match park(clip, writing).await {
                    Parking::Back(back) => (back, true),
                    Parking::NotParked(back) => (back, false),
                    Parking::Lost => return Delivery::Failed,
                };
                stream = back.stream;
                sent = back.sent;
                // Frames taken and not written whole: held for the budget,
                // or what is left of a write the talker's task began.
                batch = back.batch;
                taken = sent + batch.len();
                coalescer = back.coalescer;
                counted.absorb(back.direct);
                if parked {
                    continue;
                }
                // Frames held back wait for the budget's timer (or for
                // more frames, which join them); otherwise for the talker.
                let changed = match coalescer.poll_timeout() {
                    Some(deadline) => tokio::select! {
                        biased;
                        changed = rx.changed() => changed,
                        () = tokio::time::sleep_until(deadline.into()) => Ok(()),
                    },
                    None => rx.changed().await,
                };
                if changed.is_err() {
                    stream.reset(ErrorCode::ClipAborted.code()).ok();
                    return Delivery::Aborted;
                }
            }
            ClipState::Ended { seq, waveform } => {
                if sent < rx.borrow().raw.len() {
                    continue;
                }
                let end = end_message(sent as u32, seq, waveform);
                sink.record(seq, &clip.meta);
                if !reading.write(&mut stream, end, sent).await {
                    return cut_or_failed(&mut stream, conn);
                }
                return finish(stream);
            }
            ClipState::Aborted(reason) => {
                stream.reset(reason.code()).ok();
                return Delivery::Aborted;
            }
        }
    }
}

/// A live delivery's stream while it is parked on its clip, and what the
/// talker's task needs to write frames into it under the budget and the
/// lag rule.
struct Writing {
    stream: Guarded,
    /// Frames written whole.
    sent: usize,
    /// The frames after `sent` taken and not written whole: held for the
    /// budget, or, after a write that took only part of them, what is left
    /// (the delivery's task writes it before anything else).
    batch: Vec<Bytes>,
    coalescer: Coalescer,
    rule: LagRule,
    /// Frames (and bytes) the talker's task wrote.
    direct: OutCount,
}

impl Writing {
    /// Staying parked: with frames held until the budget's deadline, if
    /// any.
    fn stay(&self) -> Park {
        self.coalescer
            .poll_timeout()
            .map_or(Park::Writing, Park::Held)
    }

    /// Writes the batch, if it has to go at `now`, with one poll: it fits
    /// the stream, or the delivery's task takes over.
    fn write_due(&mut self, now: std::time::Instant) -> Park {
        if self.batch.is_empty() {
            return Park::Writing;
        }
        if !self.coalescer.pending(now, self.batch.len()) {
            return self.stay();
        }
        let before: usize = self.batch.iter().map(Bytes::len).sum();
        let written = {
            let write = std::pin::pin!(self.stream.write_all_chunks(&mut self.batch));
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            write.poll(&mut cx)
        };
        // Quinn empties each chunk it took whole and advances the one it
        // took part of.
        let whole = self.batch.iter().take_while(|c| c.is_empty()).count();
        let left: usize = self.batch[whole..].iter().map(Bytes::len).sum();
        let sampled = self.sent / crate::metrics::LATENCY_SAMPLE
            != (self.sent + whole) / crate::metrics::LATENCY_SAMPLE;
        self.sent += whole;
        self.direct.add_direct(whole as u64, (before - left) as u64);
        self.batch.drain(..whole);
        if sampled {
            crate::metrics::Metrics::get()
                .frame_relay_seconds
                .record(now.elapsed().as_secs_f64());
        }
        match written {
            std::task::Poll::Ready(Ok(())) => {
                self.coalescer.written();
                Park::Writing
            }
            // The delivery's task writes what is left and meets the error
            // (or the blocked stream) itself.
            std::task::Poll::Ready(Err(_)) | std::task::Poll::Pending => Park::Resume,
        }
    }
}

/// A [`Writing`] parked on its clip, with the way back to its task.
struct Parked {
    writing: Writing,
    back: tokio::sync::oneshot::Sender<Writing>,
}

impl crate::live::ParkedWriter for Parked {
    fn write(&mut self, index: usize, raw: &Bytes, at: std::time::Instant) -> Park {
        let w = &mut self.writing;
        let next = w.sent + w.batch.len();
        if index < next {
            // Appended before the delivery parked, and taken by it.
            return w.stay();
        }
        // A gap, or a member near the lag limit: its task checks it.
        if index > next || w.rule.too_far_behind(index + 1, w.sent) {
            return Park::Resume;
        }
        w.batch.push(raw.clone());
        w.write_due(at)
    }

    fn flush(&mut self, now: std::time::Instant) -> Park {
        self.writing.write_due(now)
    }

    fn resume(self: Box<Self>) {
        let Parked { writing, back } = *self;
        // A task that is gone dropped its end of `back`: the stream is
        // dropped here and reset with its sink's code.
        let _ = back.send(writing);
    }
}

/// How parking a delivery went.
enum Parking {
    /// It was parked, and handed back as it stands now.
    Back(Writing),
    /// It was not parked: the clip moved on meanwhile.
    NotParked(Writing),
    /// It was lost (never: every parked writer is handed back or dropped
    /// with its task).
    Lost,
}

/// Parks `writing` on `clip` until the talker's task hands it back.
async fn park(clip: &LiveClip, writing: Writing) -> Parking {
    let (back, returned) = tokio::sync::oneshot::channel();
    let due = writing.coalescer.poll_timeout();
    let taken = writing.sent + writing.batch.len();
    let key = match clip.park(taken, due, Parked { writing, back }) {
        Ok(key) => key,
        Err(parked) => return Parking::NotParked(parked.writing),
    };
    // If this task is dropped while parked, its stream leaves the clip too.
    let _unpark = Unpark { clip, key };
    match returned.await {
        Ok(writing) => Parking::Back(writing),
        Err(_) => Parking::Lost,
    }
}

/// Takes a parked writer off its clip when its task is dropped.
struct Unpark<'a> {
    clip: &'a LiveClip,
    key: u64,
}

impl Drop for Unpark<'_> {
    fn drop(&mut self) {
        self.clip.unpark(self.key);
    }
}

/// The live latency budget of a group in `mode`, ms: its own
/// (`group_budget_ms`) or the relay's, at most
/// [`crate::config::MAX_LIVE_BUDGET_MS`]; walkie groups get each frame at
/// once (0).
pub fn live_budget_ms(mode: GroupMode, group_budget_ms: Option<u32>, relay_budget_ms: u32) -> u32 {
    match mode {
        GroupMode::Walkie => 0,
        GroupMode::Notes => group_budget_ms
            .unwrap_or(relay_budget_ms)
            .min(crate::config::MAX_LIVE_BUDGET_MS),
    }
}

/// When a live delivery writes the frames it has pending, by the group's
/// live latency budget, without I/O (time is passed in).
///
/// Without a budget (walkie groups), or with one no longer than a frame,
/// every frame is written as soon as it arrives. With one, the first
/// pending frame starts a timer of the budget; the frames that arrive
/// meanwhile join it, and all are written together (one write, so one
/// packet) when they are as many as the budget holds, when the timer
/// fires, or at once when the clip ends. A member of a notes group with a
/// 60 ms budget and 20 ms frames so gets a packet of three frames every
/// 60 ms instead of three packets.
#[derive(Debug, Clone, Copy)]
pub struct Coalescer {
    budget: Option<Duration>,
    held_frames: usize,
    deadline: Option<std::time::Instant>,
}

impl Coalescer {
    /// The rule for a group's `budget` and the clip's `frame` duration.
    pub fn new(budget: Duration, frame: Duration) -> Coalescer {
        let budget = (budget > frame).then_some(budget);
        Coalescer {
            budget,
            held_frames: budget.map_or(0, |b| frames_in(b, frame)),
            deadline: None,
        }
    }

    /// `held` frames are pending at `now`: whether to write them now. The
    /// first pending frame arms the timer; they go when it fires, or as
    /// soon as they are as many as the budget can hold (no later frame
    /// could join them within it: a write every third 20 ms frame under a
    /// 60 ms budget, as the coalescing floor writes).
    pub fn pending(&mut self, now: std::time::Instant, held: usize) -> bool {
        let Some(budget) = self.budget else {
            return true;
        };
        now >= *self.deadline.get_or_insert(now + budget) || held >= self.held_frames
    }

    /// When the pending frames are to be written (`None`: nothing held).
    pub fn poll_timeout(&self) -> Option<std::time::Instant> {
        self.deadline
    }

    /// The pending frames were written.
    pub fn written(&mut self) {
        self.deadline = None;
    }

    /// How many frames the budget may hold back at most.
    pub fn held_frames(&self) -> usize {
        self.held_frames
    }
}

/// Frames and bytes written by one delivery, added to the metrics when it
/// ends (one atomic add per delivery instead of one per frame).
#[derive(Default)]
struct OutCount {
    frames: u64,
    bytes: u64,
    /// Of `frames`, those the talker's task wrote into a parked stream.
    direct: u64,
}

impl OutCount {
    fn add(&mut self, bytes: usize) {
        self.frames += 1;
        self.bytes += bytes as u64;
    }

    /// `frames` whole frames and `bytes` (theirs, and part of the next
    /// one's) written by the talker's task.
    fn add_direct(&mut self, frames: u64, bytes: u64) {
        self.frames += frames;
        self.bytes += bytes;
        self.direct += frames;
    }

    /// Takes over `other`'s counts.
    fn absorb(&mut self, mut other: OutCount) {
        self.frames += std::mem::take(&mut other.frames);
        self.bytes += std::mem::take(&mut other.bytes);
        self.direct += std::mem::take(&mut other.direct);
    }
}

impl Drop for OutCount {
    fn drop(&mut self) {
        if self.frames > 0 {
            let m = crate::metrics::Metrics::get();
            m.frames_out.increment(self.frames);
            m.bytes_out.increment(self.bytes);
            if self.direct > 0 {
                m.live_frames_direct.increment(self.direct);
            }
        }
    }
}

/// One live delivery's lag rules: how far behind its reported reading a
/// member may be, and how long a write may block.
struct Reading {
    rule: LagRule,
    /// Keeps the member's reports of this stream counted.
    _count: ReadCount,
    /// The clip's progress, read while a write is blocked (the delivery
    /// loop keeps its own receiver, so this one never hides a change from
    /// it).
    progress: watch::Receiver<Progress>,
    max_stall: Duration,
}

/// One live delivery's lag rule by the member's reports, applied by its
/// task and, while it is parked, by the talker's task.
#[derive(Clone)]
struct LagRule {
    reads: ReadView,
    /// Frames the talker may be ahead of the member's last report.
    allowed_unread: usize,
    conn: Connection,
    frame: Duration,
}

impl LagRule {
    /// Whether the talker, at `available` frames, is too far ahead of what
    /// the member reported reading; it cannot have read more than the
    /// `sent` frames written to it. A report is up to a round trip old: the
    /// RTT is only looked up when the member is near the limit.
    fn too_far_behind(&self, available: usize, sent: usize) -> bool {
        let Some(read) = self.reads.frames() else {
            return false;
        };
        let behind = lag_exceeded(available, read, sent, self.allowed_unread, || {
            frames_in(self.conn.rtt(), self.frame)
        });
        if behind {
            tracing::debug!(available, read, "live receiver behind its reports");
        }
        behind
    }
}

impl Reading {
    fn too_far_behind(&self, available: usize, sent: usize) -> bool {
        self.rule.too_far_behind(available, sent)
    }

    /// Writes one message, after `sent` frames; false if the stream failed,
    /// the write blocked longer than `max_stall`, or, while it was blocked,
    /// the talker got too far ahead of the member's reports.
    ///
    /// Almost every write completes at once (there is room in the stream's
    /// send buffer), so the first poll is made without a timer; only a write
    /// that has to wait arms one. This keeps a timer registration off the
    /// per-frame path.
    async fn write(&mut self, stream: &mut SendStream, bytes: Bytes, sent: usize) -> bool {
        self.wait_for(stream.write_chunk(bytes), sent).await
    }

    /// Writes several messages in one write (one packet, if they fit), as
    /// [`Reading::write`] writes one.
    async fn write_all(
        &mut self,
        stream: &mut SendStream,
        bytes: &mut [Bytes],
        sent: usize,
    ) -> bool {
        if let [one] = bytes {
            let one = std::mem::take(one);
            return self.write(stream, one, sent).await;
        }
        self.wait_for(stream.write_all_chunks(bytes), sent).await
    }

    /// Drives a write to its end under the lag rules.
    async fn wait_for<E>(
        &mut self,
        write: impl Future<Output = Result<(), E>>,
        sent: usize,
    ) -> bool {
        let mut write = std::pin::pin!(write);
        let first = {
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            write.as_mut().poll(&mut cx)
        };
        if let std::task::Poll::Ready(result) = first {
            return result.is_ok();
        }
        // One timer, not two: it fires at the next lag check or at the
        // stall limit, whichever is first. While blocked, the lag rule is
        // checked a few times a second, not at every frame the talker adds:
        // a thousand blocked members must not be woken a thousand times per
        // frame.
        let give_up = tokio::time::Instant::now() + self.max_stall;
        let next_check = |now: tokio::time::Instant| (now + BLOCKED_CHECK).min(give_up);
        let timer = tokio::time::sleep_until(next_check(tokio::time::Instant::now()));
        tokio::pin!(timer);
        loop {
            tokio::select! {
                biased;
                result = &mut write => return result.is_ok(),
                () = &mut timer => {
                    let now = tokio::time::Instant::now();
                    if now >= give_up {
                        return false;
                    }
                    let available = self.progress.borrow().raw.len();
                    if self.too_far_behind(available, sent) {
                        return false;
                    }
                    timer.as_mut().reset(next_check(now));
                }
            }
        }
    }
}

/// How often a blocked write checks the lag rule.
const BLOCKED_CHECK: Duration = Duration::from_millis(100);

/// The lag rule, without I/O: the talker is at `available` frames, the
/// member reported reading `read` of the `sent` written to it (it cannot
/// have read more); it is too far behind when more than `allowed` frames
/// plus a round trip's worth (`rtt_frames`, asked for only near the limit)
/// are unread.
fn lag_exceeded(
    available: usize,
    read: usize,
    sent: usize,
    allowed: usize,
    rtt_frames: impl FnOnce() -> usize,
) -> bool {
    let unread = available.saturating_sub(read.min(sent));
    unread > allowed && unread > allowed + rtt_frames()
}

/// How many `frame`s `d` spans, rounded up.
fn frames_in(d: Duration, frame: Duration) -> usize {
    d.as_micros().div_ceil(frame.as_micros().max(1)) as usize
}

/// Writes a stored clip whole, flagged as history (and as fetched when it
/// answers a fetch).
pub async fn deliver_stored(
    conn: &Connection,
    clip: &StoredClip,
    fetched: bool,
    sink: &Sink,
) -> Delivery {
    let Some(mut stream) = Guarded::open(conn, sink).await else {
        return Delivery::Failed;
    };
    let mut buf = BytesMut::new();
    let mut flags = ClipHeader::FLAG_HISTORY | sink.header_flags();
    if fetched {
        flags |= ClipHeader::FLAG_FETCHED;
    }
    ClipMessage::Header(member_header(&clip.meta, clip.seq, flags)).encode(&mut buf);
    let mut counted = OutCount::default();
    for (index, data) in clip.frames.iter().enumerate() {
        let before = buf.len();
        ptt_protocol::message::encode_frame(&mut buf, index as u32, data);
        counted.add(buf.len() - before);
        if buf.len() >= 16 * 1024 && stream.write_chunk(buf.split().freeze()).await.is_err() {
            return Delivery::Failed;
        }
    }
    buf.extend_from_slice(&end_message(
        clip.frames.len() as u32,
        clip.seq,
        clip.waveform.clone(),
    ));
    if !fetched {
        sink.record(clip.seq, &clip.meta);
    }
    if stream.write_chunk(buf.freeze()).await.is_err() {
        return Delivery::Failed;
    }
    let done = finish(stream);
    if !fetched && matches!(done, Delivery::Complete) {
        crate::metrics::Metrics::get()
            .catchup_deliveries
            .increment(1);
    }
    done
}

fn finish(stream: Guarded) -> Delivery {
    match stream.finish() {
        Ok(()) => Delivery::Complete,
        Err(_) => Delivery::Failed,
    }
}

fn cut_or_failed(stream: &mut SendStream, conn: &Connection) -> Delivery {
    if conn.close_reason().is_some() {
        return Delivery::Failed;
    }
    stream.reset(ErrorCode::SlowReceiver.code()).ok();
    Delivery::Cut
}

/// An error code as a QUIC varint.
pub fn code(code: ErrorCode) -> VarInt {
    VarInt::from_u32(code.code())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ptt_protocol::coding::put_varint;

    fn live_read(buf: &mut BytesMut, stream: u64, frames: u64) {
        let mut payload = BytesMut::new();
        put_varint(&mut payload, stream);
        put_varint(&mut payload, frames);
        put_varint(buf, ptt_protocol::message::kind::LIVE_READ);
        put_varint(buf, payload.len() as u64);
        buf.extend_from_slice(&payload);
    }

    /// Issue #15 item 3, on a simulated clock: with a 60 ms budget and
    /// 20 ms frames, the first frame arms a 60 ms timer and the next ones
    /// join it; the third fills what the budget holds, and all three go
    /// then, as the coalescing floor writes. Fewer frames (a pause) go at
    /// the timer.
    #[test]
    fn frames_wait_for_the_budget_then_go_together() {
        let t0 = std::time::Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut c = Coalescer::new(Duration::from_millis(60), Duration::from_millis(20));
        assert_eq!(c.held_frames(), 3);
        assert_eq!(c.poll_timeout(), None, "nothing held yet");
        assert!(!c.pending(at(0), 1));
        assert_eq!(c.poll_timeout(), Some(at(60)));
        // Later frames join the first; they do not push the timer.
        assert!(!c.pending(at(20), 2));
        assert_eq!(c.poll_timeout(), Some(at(60)));
        assert!(c.pending(at(40), 3), "three frames: the budget's worth");
        c.written();
        assert_eq!(c.poll_timeout(), None);
        // The talker pauses: what is held goes at the timer.
        assert!(!c.pending(at(80), 1));
        assert_eq!(c.poll_timeout(), Some(at(140)));
        assert!(!c.pending(at(139), 1));
        assert!(c.pending(at(140), 1));
        c.written();
        // A late wake-up writes at once what waited the budget or more.
        assert!(!c.pending(at(200), 1));
        assert!(c.pending(at(275), 2));
        c.written();
        // 60 ms frames under a 250 ms budget: up to 5 held.
        let mut long = Coalescer::new(Duration::from_millis(250), Duration::from_millis(60));
        assert_eq!(long.held_frames(), 5);
        assert!(!long.pending(at(0), 1));
        assert_eq!(long.poll_timeout(), Some(at(250)));
        assert!(!long.pending(at(240), 4));
        assert!(long.pending(at(240), 5));
    }

    /// No budget, or one no longer than the clip's frames: every frame is
    /// written as it comes, nothing is held, no timer is armed.
    #[test]
    fn a_budget_no_longer_than_a_frame_writes_each_frame_at_once() {
        let t0 = std::time::Instant::now();
        for (budget, frame) in [(0, 20), (20, 20), (40, 40), (60, 60), (50, 60)] {
            let mut c = Coalescer::new(Duration::from_millis(budget), Duration::from_millis(frame));
            assert_eq!(c.held_frames(), 0, "{budget} ms budget, {frame} ms frames");
            for i in 0..5 {
                assert!(c.pending(t0 + Duration::from_millis(i * frame), 1));
                assert_eq!(c.poll_timeout(), None);
                c.written();
            }
        }
        // 40 ms frames under a 60 ms budget still coalesce (2 at a time).
        let c = Coalescer::new(Duration::from_millis(60), Duration::from_millis(40));
        assert_eq!(c.held_frames(), 2);
    }

    #[test]
    fn walkie_groups_have_no_budget_notes_groups_theirs_or_the_relays() {
        use GroupMode::{Notes, Walkie};
        assert_eq!(live_budget_ms(Walkie, None, 60), 0);
        assert_eq!(live_budget_ms(Walkie, Some(100), 60), 0);
        assert_eq!(live_budget_ms(Notes, None, 60), 60);
        assert_eq!(live_budget_ms(Notes, Some(0), 60), 0);
        assert_eq!(live_budget_ms(Notes, Some(40), 60), 40);
        assert_eq!(live_budget_ms(Notes, None, 10_000), 250, "capped");
    }

    /// The lag rule on made-up numbers: 100 frames allowed (+ 25 for a
    /// report's age, folded into `allowed` here) and 4 frames of RTT.
    #[test]
    fn the_lag_rule_counts_frames_behind_the_reports() {
        let rtt = || 4;
        // A member that reads as fast as it gets: never behind.
        assert!(!lag_exceeded(500, 499, 500, 125, rtt));
        // It stopped reading at 50: cut once the talker is 130 ahead.
        assert!(!lag_exceeded(179, 50, 179, 125, rtt));
        assert!(lag_exceeded(180, 50, 180, 125, rtt));
        // Reports beyond what was written count as what was written.
        assert!(!lag_exceeded(300, 10_000, 200, 125, rtt));
        assert!(lag_exceeded(400, 10_000, 200, 125, rtt));
        // The RTT is not looked up while the member is within the limit.
        assert!(!lag_exceeded(100, 0, 100, 125, || panic!("not needed")));
    }

    #[test]
    fn reports_count_for_their_stream_only_and_never_go_back() {
        let reads = LiveReads::default();
        let a = reads.track(3);
        let b = reads.track(7);
        assert_eq!(a.view.frames(), None, "a connection that never reported");
        let mut datagram = BytesMut::new();
        live_read(&mut datagram, 3, 25);
        // Another message type, then a report for a stream that is not live.
        datagram.extend_from_slice(&[0x3e, 0x02, 0xca, 0xfe]);
        live_read(&mut datagram, 11, 99);
        live_read(&mut datagram, 7, 50);
        reads.receive(datagram.freeze());
        assert_eq!(a.view.frames(), Some(25));
        assert_eq!(b.view.frames(), Some(50));
        // An older report arriving late changes nothing.
        let mut old = BytesMut::new();
        live_read(&mut old, 3, 10);
        reads.receive(old.freeze());
        assert_eq!(a.view.frames(), Some(25));
    }

    #[test]
    fn damaged_datagrams_are_ignored_and_ended_streams_forgotten() {
        let reads = LiveReads::default();
        let a = reads.track(3);
        // Truncated length, a payload cut short, an empty datagram.
        reads.receive(Bytes::from_static(&[0x3b, 0x40]));
        reads.receive(Bytes::from_static(&[0x3b, 0x05, 0x03]));
        reads.receive(Bytes::new());
        // A count beyond u32 is not a report.
        let mut big = BytesMut::new();
        live_read(&mut big, 3, u64::from(u32::MAX) + 5);
        reads.receive(big.freeze());
        assert_eq!(a.view.frames(), None);
        drop(a);
        assert!(reads.0.streams.lock().unwrap().is_empty());
    }
}
