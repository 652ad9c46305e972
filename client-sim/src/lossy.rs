//! A lossy, slow network in process: a [`quinn::AsyncUdpSocket`] wrapping
//! the tokio runtime's UDP socket that does to the datagrams it sends and
//! receives what netem does to a link ([`NetworkFaults`]): drops a
//! fraction, delays the rest (fixed delay plus uniform jitter, kept in
//! order), holds a fraction back so that later ones overtake them
//! (reordering), and sends a fraction twice (duplication). Give it to
//! [`quinn::Endpoint::new_with_abstract_socket`]; every client connection
//! on that endpoint then sees the same network.
//!
//! This machine's kernel has no netem qdisc, which is why the faults are
//! made here, in the simulator's process, rather than on a veth pair.
//!
//! The randomness is a seeded [`SmallRng`], so a run's fault pattern (the
//! sequence of decisions) is reproducible for a given traffic order.

use std::cmp::{Ordering as CmpOrdering, Reverse};
use std::collections::BinaryHeap;
use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use quinn::udp::{EcnCodepoint, RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, Runtime, UdpPoller};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::sync::mpsc;

/// What the network does to the datagrams of one direction, as netem's
/// knobs: every fraction is of all datagrams, 0 to 1.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct NetworkFaults {
    /// Fraction dropped.
    pub loss: f64,
    /// Delay added to each datagram.
    pub delay: Duration,
    /// Uniform random extra delay, 0 to this. Jitter alone keeps the
    /// datagrams in order (a datagram never leaves before the one before
    /// it), as netem does unless told to reorder.
    pub jitter: Duration,
    /// Fraction held back `reorder_delay` beyond their delay and jitter,
    /// outside the order: the datagrams sent in the meantime overtake them.
    pub reorder: f64,
    /// How long a reordered datagram is held back.
    pub reorder_delay: Duration,
    /// Fraction sent twice (the copy with its own delay and jitter).
    pub duplicate: f64,
}

/// Decisions (drop, delay, reorder, duplicate) for one direction.
#[derive(Debug)]
pub struct LossModel {
    rng: SmallRng,
    faults: NetworkFaults,
    last_deadline: Option<Instant>,
}

impl LossModel {
    /// Drops `loss` (0 to 1) of the datagrams and delays the others by
    /// `delay` plus 0 to `jitter`.
    pub fn new(seed: u64, loss: f64, delay: Duration, jitter: Duration) -> LossModel {
        LossModel::with_faults(
            seed,
            NetworkFaults {
                loss,
                delay,
                jitter,
                ..NetworkFaults::default()
            },
        )
    }

    /// Does all of `faults`. Decisions are drawn from one seeded stream in
    /// a fixed order (drop, jitter, reorder, duplicate), and a knob at 0
    /// draws nothing, so a seed gives the same losses whatever else is on.
    pub fn with_faults(seed: u64, faults: NetworkFaults) -> LossModel {
        LossModel {
            rng: SmallRng::seed_from_u64(seed),
            faults,
            last_deadline: None,
        }
    }

    /// Whether the next datagram is lost.
    pub fn drop_next(&mut self) -> bool {
        self.faults.loss > 0.0 && self.rng.random::<f64>() < self.faults.loss
    }

    /// Whether the datagram just scheduled is sent a second time.
    pub fn duplicate_next(&mut self) -> bool {
        self.faults.duplicate > 0.0 && self.rng.random::<f64>() < self.faults.duplicate
    }

    /// Whether datagrams go through a delay line at all (a duplicate or a
    /// reordered datagram needs one too).
    pub fn delays(&self) -> bool {
        let f = &self.faults;
        !f.delay.is_zero() || !f.jitter.is_zero() || f.reorder > 0.0 || f.duplicate > 0.0
    }

    /// When a datagram that arrives `now` leaves: after the delay and a
    /// random jitter, but never before the one before it (no reordering).
    pub fn deadline(&mut self, now: Instant) -> Instant {
        self.schedule(now).0
    }

    /// When a datagram that arrives `now` leaves, and whether it is one
    /// of the reordered: those leave `reorder_delay` after their delay and
    /// jitter, and the in-order datagrams do not wait for them.
    pub fn schedule(&mut self, now: Instant) -> (Instant, bool) {
        let f = self.faults;
        let jitter = if f.jitter.is_zero() {
            Duration::ZERO
        } else {
            f.jitter.mul_f64(self.rng.random::<f64>())
        };
        let at = now + f.delay + jitter;
        if f.reorder > 0.0 && self.rng.random::<f64>() < f.reorder {
            return (at + f.reorder_delay, true);
        }
        let at = self.last_deadline.map_or(at, |last| at.max(last));
        self.last_deadline = Some(at);
        (at, false)
    }
}

/// Counters of what the wrapper did.
#[derive(Debug, Default)]
pub struct LossCounters {
    /// Datagrams handed to the socket to send.
    pub sent: AtomicU64,
    /// Of those, dropped.
    pub sent_dropped: AtomicU64,
    /// Datagrams the socket received.
    pub received: AtomicU64,
    /// Of those, dropped.
    pub received_dropped: AtomicU64,
    /// Datagrams held back out of order, both ways.
    pub reordered: AtomicU64,
    /// Extra copies made, both ways.
    pub duplicated: AtomicU64,
}

impl LossCounters {
    /// (sent, sent dropped, received, received dropped).
    pub fn snapshot(&self) -> (u64, u64, u64, u64) {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        (
            g(&self.sent),
            g(&self.sent_dropped),
            g(&self.received),
            g(&self.received_dropped),
        )
    }

    /// (reordered, duplicated), both ways.
    pub fn reordered_duplicated(&self) -> (u64, u64) {
        (
            self.reordered.load(Ordering::Relaxed),
            self.duplicated.load(Ordering::Relaxed),
        )
    }

    fn count(&self, reordered: bool) {
        if reordered {
            self.reordered.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A datagram waiting in the send delay line.
struct Outgoing {
    at: Instant,
    /// Arrival order, to break ties: equal deadlines leave in order.
    order: u64,
    destination: SocketAddr,
    ecn: Option<EcnCodepoint>,
    src_ip: Option<std::net::IpAddr>,
    data: Vec<u8>,
}

/// A received datagram waiting out its delay.
struct Held {
    at: Instant,
    order: u64,
    meta: RecvMeta,
    data: Vec<u8>,
}

/// Orders delay-line entries by deadline, then arrival.
macro_rules! by_deadline {
    ($t:ty) => {
        impl PartialEq for $t {
            fn eq(&self, other: &Self) -> bool {
                (self.at, self.order) == (other.at, other.order)
            }
        }
        impl Eq for $t {}
        impl PartialOrd for $t {
            fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
                Some(self.cmp(other))
            }
        }
        impl Ord for $t {
            fn cmp(&self, other: &Self) -> CmpOrdering {
                (self.at, self.order).cmp(&(other.at, other.order))
            }
        }
    };
}
by_deadline!(Outgoing);
by_deadline!(Held);

struct SendState {
    model: LossModel,
    order: u64,
}

struct RecvState {
    model: LossModel,
    /// Earliest deadline first.
    queue: BinaryHeap<Reverse<Held>>,
    order: u64,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

/// The lossy socket. See the module documentation.
pub struct LossySocket {
    inner: Arc<dyn AsyncUdpSocket>,
    send: Mutex<SendState>,
    recv: Mutex<RecvState>,
    delay_line: Option<mpsc::UnboundedSender<Outgoing>>,
    counters: Arc<LossCounters>,
}

impl fmt::Debug for LossySocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LossySocket")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl LossySocket {
    /// Wraps `socket` (already bound) with the tokio runtime. Must be
    /// called inside a tokio runtime (the send delay line is a task).
    pub fn wrap(
        socket: std::net::UdpSocket,
        seed: u64,
        loss: f64,
        delay: Duration,
        jitter: Duration,
    ) -> io::Result<Arc<LossySocket>> {
        LossySocket::wrap_with(
            socket,
            seed,
            NetworkFaults {
                loss,
                delay,
                jitter,
                ..NetworkFaults::default()
            },
        )
    }

    /// Wraps `socket` (already bound) with the tokio runtime, doing
    /// `faults` to each direction. Must be called inside a tokio runtime
    /// (the send delay line is a task, which ends when the socket is
    /// dropped).
    pub fn wrap_with(
        socket: std::net::UdpSocket,
        seed: u64,
        faults: NetworkFaults,
    ) -> io::Result<Arc<LossySocket>> {
        let inner = quinn::TokioRuntime.wrap_udp_socket(socket)?;
        // Two independent streams of randomness, one per direction.
        let send = LossModel::with_faults(seed, faults);
        let recv = LossModel::with_faults(seed ^ 0x5bd1_e995_7f4a_7c15, faults);
        let delay_line = if send.delays() {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(run_delay_line(inner.clone(), rx));
            Some(tx)
        } else {
            None
        };
        Ok(Arc::new(LossySocket {
            inner,
            send: Mutex::new(SendState {
                model: send,
                order: 0,
            }),
            recv: Mutex::new(RecvState {
                model: recv,
                queue: BinaryHeap::new(),
                order: 0,
                timer: None,
            }),
            delay_line,
            counters: Arc::default(),
        }))
    }

    /// What it did so far.
    pub fn counters(&self) -> Arc<LossCounters> {
        self.counters.clone()
    }
}

/// Sends delayed datagrams when their time comes, earliest deadline first
/// (a reordered datagram does not hold back the ones behind it). Ends when
/// the socket is dropped.
async fn run_delay_line(inner: Arc<dyn AsyncUdpSocket>, mut rx: mpsc::UnboundedReceiver<Outgoing>) {
    let mut line: BinaryHeap<Reverse<Outgoing>> = BinaryHeap::new();
    loop {
        let next = line.peek().map(|Reverse(o)| o.at);
        tokio::select! {
            received = rx.recv() => match received {
                Some(out) => line.push(Reverse(out)),
                None => return,
            },
            () = sleep_until_some(next) => {
                while line.peek().is_some_and(|Reverse(o)| o.at <= Instant::now()) {
                    let Reverse(out) = line.pop().expect("peeked");
                    send_now(&*inner, &out).await;
                }
            }
        }
    }
}

/// Sleeps until `at`, or forever without one.
async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

async fn send_now(inner: &dyn AsyncUdpSocket, out: &Outgoing) {
    let transmit = Transmit {
        destination: out.destination,
        ecn: out.ecn,
        contents: &out.data,
        segment_size: None,
        src_ip: out.src_ip,
    };
    // A full socket buffer is a congested router: retry briefly, then
    // drop.
    for _ in 0..10 {
        match inner.try_send(&transmit) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            _ => break,
        }
    }
}

/// Drops segments of a (possibly GRO-coalesced) buffer in place; returns
/// the new length. Segments are `stride` bytes, the last one may be
/// shorter; kept segments move down, so only the last can stay short.
fn filter_segments(
    buf: &mut [u8],
    len: usize,
    stride: usize,
    mut drop: impl FnMut() -> bool,
) -> usize {
    let stride = if stride == 0 { len } else { stride };
    let (mut read, mut write) = (0, 0);
    while read < len {
        let seg = stride.min(len - read);
        if !drop() {
            buf.copy_within(read..read + seg, write);
            write += seg;
        }
        read += seg;
    }
    write
}

impl AsyncUdpSocket for LossySocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit<'_>) -> io::Result<()> {
        let segment = transmit
            .segment_size
            .unwrap_or(transmit.contents.len())
            .max(1);
        let mut st = lock(&self.send);
        let st = &mut *st;
        let now = Instant::now();
        for chunk in transmit.contents.chunks(segment) {
            if st.model.drop_next() {
                self.counters.sent.fetch_add(1, Ordering::Relaxed);
                self.counters.sent_dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            match &self.delay_line {
                Some(line) => {
                    self.counters.sent.fetch_add(1, Ordering::Relaxed);
                    let (at, reordered) = st.model.schedule(now);
                    self.counters.count(reordered);
                    let copy = st.model.duplicate_next().then(|| st.model.schedule(now));
                    let mut push = |at: Instant| {
                        st.order += 1;
                        let _ = line.send(Outgoing {
                            at,
                            order: st.order,
                            destination: transmit.destination,
                            ecn: transmit.ecn,
                            src_ip: transmit.src_ip,
                            data: chunk.to_vec(),
                        });
                    };
                    push(at);
                    if let Some((at, reordered)) = copy {
                        self.counters.duplicated.fetch_add(1, Ordering::Relaxed);
                        self.counters.count(reordered);
                        push(at);
                    }
                }
                None => {
                    let one = Transmit {
                        destination: transmit.destination,
                        ecn: transmit.ecn,
                        contents: chunk,
                        segment_size: None,
                        src_ip: transmit.src_ip,
                    };
                    // On WouldBlock quinn retries the same transmit later;
                    // it is counted then.
                    self.inner.try_send(&one)?;
                    self.counters.sent.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        if bufs.is_empty() || meta.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let mut st = lock(&self.recv);
        let st = &mut *st;
        loop {
            // Delayed datagrams whose time has come go first.
            if st
                .queue
                .peek()
                .is_some_and(|Reverse(h)| h.at <= Instant::now())
            {
                let Reverse(held) = st.queue.pop().expect("checked");
                let n = held.data.len().min(bufs[0].len());
                bufs[0][..n].copy_from_slice(&held.data[..n]);
                meta[0] = held.meta;
                meta[0].len = n;
                meta[0].stride = n;
                return Poll::Ready(Ok(1));
            }
            match self.inner.poll_recv(cx, &mut bufs[..1], &mut meta[..1]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Ok(0)),
                Poll::Ready(Ok(_)) => {
                    let m = &mut meta[0];
                    let stride = if m.stride == 0 { m.len } else { m.stride };
                    let segments = m.len.div_ceil(stride.max(1)) as u64;
                    let before = m.len;
                    let model = &mut st.model;
                    let len = filter_segments(&mut bufs[0], m.len, stride, || model.drop_next());
                    let kept = if len == before {
                        segments
                    } else {
                        len.div_ceil(stride.max(1)) as u64
                    };
                    self.counters
                        .received
                        .fetch_add(segments, Ordering::Relaxed);
                    self.counters
                        .received_dropped
                        .fetch_add(segments - kept, Ordering::Relaxed);
                    if len == 0 {
                        continue;
                    }
                    m.len = len;
                    if !st.model.delays() {
                        return Poll::Ready(Ok(1));
                    }
                    // Each datagram of a GRO batch waits (and may be
                    // reordered or copied) on its own.
                    let now = Instant::now();
                    let template = *m;
                    for segment in bufs[0][..len].chunks(stride.max(1)) {
                        let (at, reordered) = st.model.schedule(now);
                        self.counters.count(reordered);
                        let copy = st.model.duplicate_next().then(|| st.model.schedule(now));
                        st.order += 1;
                        st.queue.push(Reverse(Held {
                            at,
                            order: st.order,
                            meta: template,
                            data: segment.to_vec(),
                        }));
                        if let Some((at, reordered)) = copy {
                            self.counters.duplicated.fetch_add(1, Ordering::Relaxed);
                            self.counters.count(reordered);
                            st.order += 1;
                            st.queue.push(Reverse(Held {
                                at,
                                order: st.order,
                                meta: template,
                                data: segment.to_vec(),
                            }));
                        }
                    }
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    let Some(Reverse(front)) = st.queue.peek() else {
                        return Poll::Pending;
                    };
                    let at = tokio::time::Instant::from_std(front.at);
                    let timer = st
                        .timer
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
                    if timer.deadline() != at {
                        timer.as_mut().reset(at);
                    }
                    match timer.as_mut().poll(cx) {
                        Poll::Ready(()) => continue,
                        Poll::Pending => return Poll::Pending,
                    }
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        // One datagram per transmit, so that each can be dropped alone.
        1
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

/// The lossy model for the client's UDP media socket
/// ([`ptt_client::MediaLink`]): drops the same fraction of media datagrams
/// each way, and delays them as [`LossySocket`] does (the client sends its
/// Binds at once, its uplink frames after the delay).
#[derive(Debug)]
pub struct LossyMediaLink {
    send: Mutex<LossModel>,
    recv: Mutex<LossModel>,
}

impl LossyMediaLink {
    /// A link with its own seeded randomness.
    pub fn new(seed: u64, loss: f64, delay: Duration, jitter: Duration) -> LossyMediaLink {
        LossyMediaLink {
            send: Mutex::new(LossModel::new(seed, loss, delay, jitter)),
            recv: Mutex::new(LossModel::new(
                seed ^ 0x5bd1_e995_7f4a_7c15,
                loss,
                delay,
                jitter,
            )),
        }
    }
}

impl ptt_client::MediaLink for LossyMediaLink {
    fn pass(&self, outgoing: bool) -> Option<Duration> {
        let mut model = lock(if outgoing { &self.send } else { &self.recv });
        if model.drop_next() {
            return None;
        }
        let now = Instant::now();
        Some(model.deadline(now).saturating_duration_since(now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_drop_rate_matches_and_is_deterministic() {
        let run = |seed| {
            let mut m = LossModel::new(seed, 0.05, Duration::ZERO, Duration::ZERO);
            (0..100_000).map(|_| m.drop_next()).collect::<Vec<_>>()
        };
        let a = run(42);
        let dropped = a.iter().filter(|&&d| d).count();
        assert!((4_700..=5_300).contains(&dropped), "{dropped}");
        assert_eq!(a, run(42), "same seed, same decisions");
        assert_ne!(a, run(43));
        let mut none = LossModel::new(1, 0.0, Duration::ZERO, Duration::ZERO);
        assert!((0..1000).all(|_| !none.drop_next()));
    }

    #[test]
    fn deadlines_keep_order_within_the_jitter() {
        let mut m = LossModel::new(3, 0.0, Duration::from_millis(40), Duration::from_millis(10));
        let now = Instant::now();
        let mut last = now;
        for i in 0..1000u64 {
            let t = now + Duration::from_micros(i * 100);
            let at = m.deadline(t);
            assert!(at >= last);
            assert!(at >= t + Duration::from_millis(40));
            assert!(at <= t + Duration::from_millis(51));
            last = at;
        }
    }

    #[test]
    fn reordered_datagrams_are_overtaken_and_copies_counted() {
        let faults = NetworkFaults {
            loss: 0.1,
            delay: Duration::from_millis(10),
            jitter: Duration::from_millis(2),
            reorder: 0.2,
            reorder_delay: Duration::from_millis(8),
            duplicate: 0.05,
        };
        let mut m = LossModel::with_faults(9, faults);
        let now = Instant::now();
        let (mut reordered, mut copies, mut last_in_order) = (0, 0, now);
        for i in 0..10_000u64 {
            let t = now + Duration::from_micros(i * 500);
            let (at, out_of_order) = m.schedule(t);
            assert!(at >= t + Duration::from_millis(10));
            if out_of_order {
                reordered += 1;
                // Held back past its in-order slot: the next datagrams
                // (0.5 ms apart) leave before it.
                assert!(at >= t + Duration::from_millis(18));
                assert!(at <= t + Duration::from_millis(20));
            } else {
                assert!(at >= last_in_order, "in-order datagrams keep order");
                assert!(at <= t + Duration::from_millis(12) || at == last_in_order);
                last_in_order = at;
            }
            copies += u32::from(m.duplicate_next());
        }
        assert!((1_800..=2_200).contains(&reordered), "{reordered}");
        assert!((400..=600).contains(&copies), "{copies}");
        // Knobs at 0 draw nothing: the same seed drops the same datagrams
        // as the loss-only model.
        let mut plain = LossModel::new(5, 0.1, Duration::ZERO, Duration::ZERO);
        let mut full = LossModel::with_faults(
            5,
            NetworkFaults {
                loss: 0.1,
                ..NetworkFaults::default()
            },
        );
        assert!((0..1000).all(|_| plain.drop_next() == full.drop_next()));
        assert!(!full.delays());
        assert!(LossModel::with_faults(1, faults).delays());
    }

    #[test]
    fn gro_segments_are_dropped_one_by_one() {
        // Four segments of 4 bytes and a short last one of 2.
        let mut buf: Vec<u8> = (0..18).collect();
        let mut decisions = [false, true, false, true, false].into_iter();
        let len = filter_segments(&mut buf, 18, 4, || decisions.next().unwrap());
        assert_eq!(len, 10);
        assert_eq!(&buf[..10], &[0, 1, 2, 3, 8, 9, 10, 11, 16, 17]);
        let mut one = vec![1u8, 2, 3];
        assert_eq!(filter_segments(&mut one, 3, 0, || true), 0);
        assert_eq!(filter_segments(&mut one, 3, 3, || false), 3);
    }

    fn bound() -> std::net::UdpSocket {
        std::net::UdpSocket::bind("127.0.0.1:0").unwrap()
    }

    /// Real datagrams through the wrapper on loopback: what arrives is
    /// exactly what the seeded model kept, in both directions.
    #[tokio::test]
    async fn real_datagrams_are_dropped_at_the_configured_rate() {
        const N: u64 = 2_000;
        let lossy = LossySocket::wrap(bound(), 42, 0.2, Duration::ZERO, Duration::ZERO).unwrap();
        let sink = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let dest = sink.local_addr().unwrap();
        let mut poller = lossy.clone().create_io_poller();
        let mut got = 0;
        let mut buf = [0u8; 64];
        for i in 0..N {
            let data = i.to_be_bytes();
            let t = Transmit {
                destination: dest,
                ecn: None,
                contents: &data,
                segment_size: None,
                src_ip: None,
            };
            loop {
                match lossy.try_send(&t) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        std::future::poll_fn(|cx| poller.as_mut().poll_writable(cx))
                            .await
                            .unwrap();
                    }
                    Err(e) => panic!("{e}"),
                }
            }
            // Drain as we go: the sink's socket buffer is small.
            while sink.try_recv(&mut buf).is_ok() {
                got += 1;
            }
            if i % 50 == 49 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        let (sent, sent_dropped, _, _) = lossy.counters().snapshot();
        assert_eq!(sent, N);
        while let Ok(Ok(_)) =
            tokio::time::timeout(Duration::from_millis(200), sink.recv(&mut buf)).await
        {
            got += 1;
        }
        assert_eq!(got, N - sent_dropped);
        assert!((300..=500).contains(&sent_dropped), "{sent_dropped}");

        // Receiving side.
        let lossy_rx = LossySocket::wrap(bound(), 7, 0.2, Duration::ZERO, Duration::ZERO).unwrap();
        let to = lossy_rx.local_addr().unwrap();
        let sender = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut got = 0;
        let mut storage = vec![0u8; 65_536];
        for i in 0..N {
            sender.send_to(&i.to_be_bytes(), to).unwrap();
            if i % 50 == 49 {
                while let Ok(Ok(n)) = tokio::time::timeout(
                    Duration::from_millis(20),
                    std::future::poll_fn(|cx| {
                        let mut bufs = [IoSliceMut::new(&mut storage)];
                        let mut meta = [RecvMeta::default()];
                        lossy_rx.poll_recv(cx, &mut bufs, &mut meta)
                    }),
                )
                .await
                {
                    got += n as u64;
                }
            }
        }
        let (_, _, received, received_dropped) = lossy_rx.counters().snapshot();
        assert_eq!(received, N);
        assert_eq!(got, N - received_dropped);
        assert!(
            (300..=500).contains(&received_dropped),
            "{received_dropped}"
        );
    }

    /// Numbered datagrams through a socket that reorders and duplicates
    /// (no loss): every one arrives, some twice, some after later ones.
    #[tokio::test]
    async fn real_datagrams_are_reordered_and_duplicated_both_ways() {
        const N: u32 = 600;
        let faults = NetworkFaults {
            jitter: Duration::from_millis(1),
            reorder: 0.1,
            reorder_delay: Duration::from_millis(5),
            duplicate: 0.1,
            ..NetworkFaults::default()
        };
        fn check(got: &[u32], duplicated: u64, reordered: u64) {
            let mut counts = vec![0u32; N as usize];
            for &i in got {
                counts[i as usize] += 1;
            }
            let wrong: Vec<(usize, u32)> = counts
                .iter()
                .enumerate()
                .filter(|(_, c)| !(1..=2).contains(*c))
                .map(|(i, &c)| (i, c))
                .collect();
            assert!(wrong.is_empty(), "each arrives once or twice: {wrong:?}");
            let twice = counts.iter().filter(|&&c| c == 2).count() as u64;
            assert_eq!(twice, duplicated, "every copy arrives");
            assert!((30..=100).contains(&twice), "{twice}");
            let inversions = got.windows(2).filter(|w| w[1] < w[0]).count();
            assert!(inversions > 10, "{inversions} inversions");
            assert!((30..=100).contains(&reordered), "{reordered}");
        }

        // Sending side.
        let lossy = LossySocket::wrap_with(bound(), 11, faults).unwrap();
        let sink = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mut poller = lossy.clone().create_io_poller();
        let mut got = Vec::new();
        let mut buf = [0u8; 16];
        for i in 0..N {
            let data = i.to_be_bytes();
            let t = Transmit {
                destination: sink.local_addr().unwrap(),
                ecn: None,
                contents: &data,
                segment_size: None,
                src_ip: None,
            };
            while let Err(e) = lossy.try_send(&t) {
                assert_eq!(e.kind(), io::ErrorKind::WouldBlock, "{e}");
                std::future::poll_fn(|cx| poller.as_mut().poll_writable(cx))
                    .await
                    .unwrap();
            }
            // 0.2 ms apart: a held-back datagram is overtaken by ~25.
            if i % 10 == 9 {
                tokio::time::sleep(Duration::from_millis(2)).await;
                // Drain as we go: the sink's socket buffer is small.
                while let Ok(n) = sink.try_recv(&mut buf) {
                    assert_eq!(n, 4);
                    got.push(u32::from_be_bytes(buf[..4].try_into().unwrap()));
                }
            }
        }
        while let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_millis(200), sink.recv(&mut buf)).await
        {
            assert_eq!(n, 4);
            got.push(u32::from_be_bytes(buf[..4].try_into().unwrap()));
        }
        let c = lossy.counters();
        let (reordered, duplicated) = c.reordered_duplicated();
        check(&got, duplicated, reordered);

        // Receiving side.
        let lossy_rx = LossySocket::wrap_with(bound(), 12, faults).unwrap();
        let to = lossy_rx.local_addr().unwrap();
        let sender = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut got = Vec::new();
        let mut storage = vec![0u8; 65_536];
        let mut drain = async |got: &mut Vec<u32>, wait: Duration| {
            while let Ok(Ok((n, len))) = tokio::time::timeout(
                wait,
                std::future::poll_fn(|cx| {
                    let mut bufs = [IoSliceMut::new(&mut storage)];
                    let mut meta = [RecvMeta::default()];
                    lossy_rx
                        .poll_recv(cx, &mut bufs, &mut meta)
                        .map_ok(|n| (n, meta[0].len))
                }),
            )
            .await
            {
                assert_eq!((n, len), (1, 4));
                got.push(u32::from_be_bytes(storage[..4].try_into().unwrap()));
            }
        };
        for i in 0..N {
            sender.send_to(&i.to_be_bytes(), to).unwrap();
            if i % 10 == 9 {
                drain(&mut got, Duration::from_millis(2)).await;
            }
        }
        drain(&mut got, Duration::from_millis(200)).await;
        let (reordered, duplicated) = lossy_rx.counters().reordered_duplicated();
        check(&got, duplicated, reordered);
    }

    #[tokio::test]
    async fn delayed_datagrams_arrive_late() {
        let delay = Duration::from_millis(60);
        let lossy = LossySocket::wrap(bound(), 1, 0.0, delay, Duration::ZERO).unwrap();
        let sink = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let t0 = Instant::now();
        lossy
            .try_send(&Transmit {
                destination: sink.local_addr().unwrap(),
                ecn: None,
                contents: b"hello",
                segment_size: None,
                src_ip: None,
            })
            .unwrap();
        let mut buf = [0u8; 16];
        let n = sink.recv(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"hello");
        assert!(t0.elapsed() >= delay, "{:?}", t0.elapsed());

        // And on the receiving side.
        let lossy_rx = LossySocket::wrap(bound(), 1, 0.0, delay, Duration::ZERO).unwrap();
        let sender = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let t0 = Instant::now();
        sender
            .send_to(b"late", lossy_rx.local_addr().unwrap())
            .unwrap();
        let mut storage = vec![0u8; 65_536];
        let n = std::future::poll_fn(|cx| {
            let mut bufs = [IoSliceMut::new(&mut storage)];
            let mut meta = [RecvMeta::default()];
            lossy_rx
                .poll_recv(cx, &mut bufs, &mut meta)
                .map_ok(|n| (n, meta[0].len))
        })
        .await
        .unwrap();
        assert_eq!(n, (1, 4));
        assert_eq!(&storage[..4], b"late");
        assert!(t0.elapsed() >= delay, "{:?}", t0.elapsed());
    }
}
