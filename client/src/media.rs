//! The client's end of the UDP media path (PROTOCOL.md, section 14): after
//! the relay's `MediaOffer`, a UDP socket that binds to the relay's media
//! port and receives live frames in sealed datagrams.
//!
//! - [`MediaPath`]: one connection's path, owned by the connection task:
//!   the task that sends `Bind` (at once, again after 0.25, 0.5, 1 s… until a
//!   `BindAck`, then every 15 s) and receives `Frame` packets; aborted when
//!   the connection ends (a new connection opens a new path).
//! - [`MediaInbox`]: hands each frame to the reader of its clip stream
//!   (`receive.rs`), keeping frames that overtook their stream's header for
//!   up to [`EARLY_KEEP`] ([`EARLY_MAX`] at most). A `HeadedFrame` (the
//!   clip's header in the packet) of a stream whose header has not come
//!   yet *announces* the clip: `ClipStarted` and its frames go to the
//!   application at once, and the stream's reader takes over when the
//!   header arrives (the stream stays the authority for the clip's end).
//! - [`Uplink`]: the talker's side of the uplink: each frame of a live
//!   upload also goes to the relay in a sealed `Uplink` packet (with the
//!   two frames before it), beside its copy on the upload stream.
//! - [`MediaLink`]: a seam for a simulated network (client-sim's lossy
//!   model, tests) between the socket and the decryption.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ptt_protocol::media::{
    BIND_INTERVAL, EXPORTER_LABEL, FramePayload, FramesPayload, HeadedFramePayload,
    KEY_MATERIAL_LEN, MAX_PACKET_LEN, MAX_PLAINTEXT_LEN, MediaCrypto, MediaError, MediaKeys,
    PacketType, Side, UPLINK_REDUNDANCY, UplinkPayload,
};
use ptt_protocol::{ClipHeader, ClipId};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

use crate::event::{Event, EventTx};
use crate::media_socket::{MediaSocket, PathKey};
use crate::shared::{Inner, Stats, lock};

/// How long frames of a stream whose header has not arrived are kept.
pub const EARLY_KEEP: Duration = Duration::from_secs(2);
/// Most frames kept for streams whose header has not arrived.
pub const EARLY_MAX: usize = 1024;
/// Frames queued for one clip's reader before more are dropped (and
/// fetched with the clip).
const ROUTE_CAPACITY: usize = 512;
/// Clips announced by a `HeadedFrame` whose stream has not arrived yet,
/// at most; and how long such an announcement waits for its stream.
const ANNOUNCED_MAX: usize = 64;
const ANNOUNCED_KEEP: Duration = Duration::from_secs(30);
/// The first wait for a BindAck before the Bind is sent again (then
/// doubled each time): until the path is bound, a live clip that starts
/// goes on streams for its whole length, so a lost Bind must not cost a
/// second.
const BIND_RETRY: Duration = Duration::from_millis(250);
/// Uplink packets a [`MediaLink`] may delay at once.
const UPLINK_QUEUE: usize = 256;
/// Highest frame index accepted by UDP (21 minutes of 20 ms frames, far
/// above the relay's clip limit): bounds the received-frames bitmap.
pub(crate) const MAX_MEDIA_INDEX: u32 = 1 << 16;

/// What a simulated network does to the client's media datagrams: a seam
/// for client-sim's lossy model and for tests. The client asks it about
/// every datagram it receives (before decryption) and sends.
pub trait MediaLink: Send + Sync + std::fmt::Debug {
    /// `None`: the datagram is lost. `Some(delay)`: it passes after
    /// `delay`, a received one kept in order; a sent `Uplink` one too
    /// (Binds are sent at once).
    fn pass(&self, outgoing: bool) -> Option<Duration>;
}

/// One frame that arrived by UDP.
#[derive(Debug)]
pub(crate) struct MediaFrame {
    pub index: u32,
    pub data: Bytes,
    pub received_at: Instant,
}

/// What a stream's reader learns when it registers.
pub(crate) struct Registration {
    /// The frames it must surface itself: those that came early, and
    /// later ones the socket task could not put on the event channel.
    pub rx: mpsc::Receiver<MediaFrame>,
    /// The clip was announced by a `HeadedFrame`: `ClipStarted` went to
    /// the application, and so did some of its frames; the rest go
    /// straight to the application from now on, as after
    /// [`MediaInbox::surface`].
    pub announced: bool,
}

/// Routes frames to the application, or to the readers of their clip
/// streams.
#[derive(Debug, Default)]
pub(crate) struct MediaInbox {
    state: Mutex<InboxState>,
    /// The talker's side of the uplink, once the path is bound.
    uplink: Mutex<Option<Arc<Uplink>>>,
}

#[derive(Debug, Default)]
struct InboxState {
    routes: HashMap<u64, Route>,
    early: VecDeque<(u64, MediaFrame)>,
    announced: HashMap<u64, Announced>,
}

/// Where the frames of one clip stream go once its header arrived.
#[derive(Debug)]
struct Route {
    /// The clip's reader, for frames that cannot go straight to the
    /// application.
    reader: mpsc::Sender<MediaFrame>,
    /// The clip's group and id once its `ClipStarted` went out (and it is
    /// not a duplicate): a frame then goes straight onto the client's
    /// event channel from the socket task, unless frames wait for the
    /// reader.
    surface: Option<(String, ClipId)>,
    /// Frames handed to the reader and not yet surfaced by it: while there
    /// are any, the next frames queue behind them, so the application sees
    /// frames in the order they arrived.
    queued: usize,
    /// Bit `i`: frame `i` was accepted (surfaced, or handed to the
    /// reader), here or while the clip was announced.
    seen: Vec<u64>,
}

impl Route {
    /// Hands `frame` to the reader; `false` if its queue is full.
    fn queue(&mut self, frame: MediaFrame) -> bool {
        let index = frame.index;
        if self.reader.try_send(frame).is_err() {
            return false;
        }
        mark(&mut self.seen, index);
        self.queued += 1;
        true
    }

    /// Puts `frame` on `events` if nothing waits for the reader, else
    /// hands it to the reader. Copies of accepted frames are dropped.
    fn deliver(&mut self, frame: MediaFrame, events: &EventTx) -> Delivery {
        if has(&self.seen, frame.index) {
            return Delivery::Dropped;
        }
        if self.queued == 0
            && let Some((group, clip_id)) = &self.surface
        {
            let index = frame.index;
            let event = Event::Frame {
                group: group.clone(),
                clip_id: *clip_id,
                index,
                data: frame.data,
                received_at: frame.received_at,
            };
            match events.try_send(event) {
                // Closed: the application dropped its events, which
                // `Inner::emit` ignores too.
                Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => {
                    mark(&mut self.seen, index);
                    return Delivery::Surfaced;
                }
                // The application is behind: the reader waits for room.
                Err(mpsc::error::TrySendError::Full(Event::Frame {
                    index,
                    data,
                    received_at,
                    ..
                })) => {
                    let frame = MediaFrame {
                        index,
                        data,
                        received_at,
                    };
                    return self.queued_or_dropped(frame);
                }
                Err(mpsc::error::TrySendError::Full(_)) => return Delivery::Dropped,
            }
        }
        self.queued_or_dropped(frame)
    }

    fn queued_or_dropped(&mut self, frame: MediaFrame) -> Delivery {
        if self.queue(frame) {
            Delivery::Queued
        } else {
            Delivery::Dropped
        }
    }
}

/// What the inbox did with a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Delivery {
    /// Put on the client's event channel as an [`Event::Frame`].
    Surfaced,
    /// Handed to its clip's reader, or kept until the clip's header comes.
    Queued,
    /// Dropped: a copy of a frame that came before, or queues full.
    Dropped,
}

/// A clip announced by a `HeadedFrame` before its stream's header.
#[derive(Debug)]
struct Announced {
    group: String,
    clip_id: ClipId,
    at: Instant,
    /// Bit `i`: frame `i` went to the application.
    seen: Vec<u64>,
}

/// Sets bit `index`; `false` if it was set.
pub(crate) fn mark(seen: &mut Vec<u64>, index: u32) -> bool {
    if index >= MAX_MEDIA_INDEX {
        return false;
    }
    let (word, bit) = ((index / 64) as usize, index % 64);
    if seen.len() <= word {
        seen.resize(word + 1, 0);
    }
    let new = seen[word] & (1 << bit) == 0;
    seen[word] |= 1 << bit;
    new
}

/// Whether bit `index` is set.
fn has(seen: &[u64], index: u32) -> bool {
    seen.get((index / 64) as usize)
        .is_some_and(|w| w & (1 << (index % 64)) != 0)
}

/// How many of frames `0..frame_count` the bitmap `seen` lacks.
fn missing_in(seen: &[u64], frame_count: u32) -> u32 {
    let count = frame_count.min(MAX_MEDIA_INDEX);
    let full = (count / 64) as usize;
    let mut have: u32 = seen.iter().take(full).map(|w| w.count_ones()).sum();
    let rest = count % 64;
    if rest > 0 {
        have += seen
            .get(full)
            .map_or(0, |w| (w & ((1u64 << rest) - 1)).count_ones());
    }
    frame_count - have
}

impl InboxState {
    /// Drops early frames older than [`EARLY_KEEP`] at `now`.
    fn expire_early(&mut self, now: Instant) {
        while self
            .early
            .front()
            .is_some_and(|(_, f)| now.saturating_duration_since(f.received_at) > EARLY_KEEP)
        {
            self.early.pop_front();
        }
    }

    /// A frame of a stream with a reader goes to the application or the
    /// reader; one of a stream whose header has not come is kept.
    fn deliver(&mut self, stream: u64, frame: MediaFrame, events: &EventTx) -> Delivery {
        self.expire_early(frame.received_at);
        if let Some(route) = self.routes.get_mut(&stream) {
            return route.deliver(frame, events);
        }
        if self.early.len() >= EARLY_MAX {
            self.early.pop_front();
        }
        self.early.push_back((stream, frame));
        Delivery::Queued
    }
}

impl MediaInbox {
    /// Hands a frame of stream `stream` to the application (on `events`,
    /// once its `ClipStarted` went out and nothing waits for the reader)
    /// or to its reader, or keeps it until the stream's header arrives
    /// (what [`deliver_live`](Self::deliver_live) does with a frame that
    /// announces nothing).
    #[cfg(test)]
    pub fn deliver(&self, stream: u64, frame: MediaFrame, events: &EventTx) -> Delivery {
        lock(&self.state).deliver(stream, frame, events)
    }

    /// A frame that may start a clip the application has not heard of:
    /// with `header` (a `HeadedFrame`) for a stream whose header has not
    /// arrived, the clip is announced (`ClipStarted`, then the frame, as
    /// events at once) unless it was received whole before; a frame of an
    /// announced stream goes to the application at once too. Otherwise as
    /// [`deliver`](Self::deliver). Counts the frames it surfaces.
    ///
    /// Never waits: it runs on the socket's reader, which may serve many
    /// clients (a [`MediaSocket`](crate::MediaSocket)). When the events
    /// channel has no room for the announcement, the frame is kept for the
    /// stream's reader, as a frame that announces nothing is.
    pub fn deliver_live(
        &self,
        inner: &Inner,
        stream: u64,
        header: Option<ClipHeader>,
        frame: MediaFrame,
    ) {
        {
            let mut s = lock(&self.state);
            if s.routes.contains_key(&stream)
                || (header.is_none() && !s.announced.contains_key(&stream))
            {
                if s.deliver(stream, frame, &inner.events) == Delivery::Surfaced {
                    Stats::bump(&inner.stats.frames_received);
                }
                return;
            }
        }
        // Events are sent under the inbox's lock, so that a reader that
        // registers later finds them all sent (ClipStarted first).
        let mut permits = match inner.events.try_reserve_two() {
            Ok(permits) => permits,
            Err(mpsc::error::TrySendError::Closed(())) => return,
            Err(mpsc::error::TrySendError::Full(())) => {
                lock(&self.state).deliver(stream, frame, &inner.events);
                return;
            }
        };
        let mut s = lock(&self.state);
        if s.routes.contains_key(&stream) {
            // Released first: the frame may take a slot they hold.
            drop(permits);
            if s.deliver(stream, frame, &inner.events) == Delivery::Surfaced {
                Stats::bump(&inner.stats.frames_received);
            }
            return;
        }
        let now = frame.received_at;
        s.announced
            .retain(|_, a| now.saturating_duration_since(a.at) < ANNOUNCED_KEEP);
        if !s.announced.contains_key(&stream) {
            let Some(header) = header else {
                // Kept until the stream's header comes.
                s.deliver(stream, frame, &inner.events);
                return;
            };
            let duplicate = lock(&inner.dedup).contains(&header.group, header.clip_id);
            if duplicate || s.announced.len() >= ANNOUNCED_MAX || frame.index >= MAX_MEDIA_INDEX {
                // Kept until the stream's header comes.
                s.deliver(stream, frame, &inner.events);
                return;
            }
            s.announced.insert(
                stream,
                Announced {
                    group: header.group.clone(),
                    clip_id: header.clip_id,
                    at: now,
                    seen: Vec::new(),
                },
            );
            permits.send(|| Event::ClipStarted {
                group: header.group.clone(),
                clip_id: header.clip_id,
                talker: header.talker.clone(),
                seq: header.seq,
                history: false,
                header,
            });
            Stats::bump(&inner.stats.media_clips_announced);
        }
        let Some(a) = s.announced.get_mut(&stream) else {
            return;
        };
        // Marked only when it goes out: a frame without a permit (an event
        // queue of one) counts as missing, and the clip is fetched.
        if frame.index < MAX_MEDIA_INDEX
            && !has(&a.seen, frame.index)
            && permits.send(|| Event::Frame {
                group: a.group.clone(),
                clip_id: a.clip_id,
                index: frame.index,
                data: frame.data,
                received_at: frame.received_at,
            })
        {
            mark(&mut a.seen, frame.index);
            Stats::bump(&inner.stats.frames_received);
        }
    }

    /// The clip announced on `stream`, if its reader never took it over
    /// (the stream was reset before its header arrived): its group and id.
    pub fn take_announced(&self, stream: u64) -> Option<(String, ClipId)> {
        lock(&self.state)
            .announced
            .remove(&stream)
            .map(|a| (a.group, a.clip_id))
    }

    /// The talker's side of the uplink, if the path is bound.
    pub fn uplink(&self) -> Option<Arc<Uplink>> {
        lock(&self.uplink).clone()
    }

    /// The frames of `stream` from now on (and those that came early, to
    /// the returned receiver), and whether the clip was announced (its
    /// later frames then go straight to the application). Frames of a clip
    /// not announced go to the receiver until [`surface`](Self::surface).
    pub fn register(&self, stream: u64) -> Registration {
        let (reader, rx) = mpsc::channel(ROUTE_CAPACITY);
        let mut s = lock(&self.state);
        let announced = s.announced.remove(&stream);
        let is_announced = announced.is_some();
        let (surface, seen) = match announced {
            Some(a) => (Some((a.group, a.clip_id)), a.seen),
            None => (None, Vec::new()),
        };
        let mut route = Route {
            reader,
            surface,
            queued: 0,
            seen,
        };
        let early = std::mem::take(&mut s.early);
        for (id, frame) in early {
            if id != stream {
                s.early.push_back((id, frame));
            } else if !has(&route.seen, frame.index) {
                route.queue(frame);
            }
        }
        s.routes.insert(stream, route);
        Registration {
            rx,
            announced: is_announced,
        }
    }

    /// The clip of `stream` (group and id) has its `ClipStarted` out: its
    /// frames may go straight to the application from now on.
    pub fn surface(&self, stream: u64, group: String, clip_id: ClipId) {
        if let Some(route) = lock(&self.state).routes.get_mut(&stream) {
            route.surface = Some((group, clip_id));
        }
    }

    /// Every later frame of `stream` goes to its reader (which then waits
    /// for the stragglers of an ended clip).
    pub fn queue_all(&self, stream: u64) {
        if let Some(route) = lock(&self.state).routes.get_mut(&stream) {
            route.surface = None;
        }
    }

    /// The reader of `stream` surfaced (or dropped, for a duplicate) a
    /// frame it was handed.
    pub fn surfaced(&self, stream: u64) {
        if let Some(route) = lock(&self.state).routes.get_mut(&stream) {
            route.queued = route.queued.saturating_sub(1);
        }
    }

    /// How many of frames `0..frame_count` of `stream` were not accepted.
    pub fn missing(&self, stream: u64, frame_count: u32) -> u32 {
        let s = lock(&self.state);
        let seen = s.routes.get(&stream).map_or(&[][..], |r| &r.seen[..]);
        missing_in(seen, frame_count)
    }

    /// The reader of `stream` is done: no frame goes anywhere after this.
    /// How many of frames `0..frame_count` were not accepted.
    pub fn unregister(&self, stream: u64, frame_count: u32) -> u32 {
        let route = lock(&self.state).routes.remove(&stream);
        missing_in(route.as_ref().map_or(&[][..], |r| &r.seen[..]), frame_count)
    }
}

/// A connection's media path; its task ends when this is dropped (and it
/// leaves its shared socket, if it had one).
#[derive(Debug)]
pub(crate) struct MediaPath {
    task: tokio::task::JoinHandle<()>,
    /// The shared socket it receives on, and its key there.
    shared: Option<(Arc<MediaSocket>, PathKey, Arc<PathCore>)>,
}

impl Drop for MediaPath {
    fn drop(&mut self) {
        self.task.abort();
        if let Some((socket, key, core)) = self.shared.take() {
            socket.leave(key, &core);
        }
    }
}

/// Why the media path could not start (live frames keep coming on streams).
#[derive(Debug, thiserror::Error)]
pub(crate) enum StartError {
    #[error("TLS exporter: {0:?}")]
    Exporter(quinn::crypto::ExportKeyingMaterialError),
    #[error("UDP socket: {0}")]
    Socket(#[from] std::io::Error),
}

/// Starts the media path of `conn` after the relay's offer: keys of
/// `epoch` from the connection's TLS exporter, a UDP socket (its own, or
/// the configured [`MediaSocket`] shared with other clients), the Bind
/// task. Frames go to `inbox`.
pub(crate) async fn start(
    inner: Arc<Inner>,
    conn: &quinn::Connection,
    port: u16,
    conn_id: u64,
    epoch: u32,
    inbox: Arc<MediaInbox>,
) -> Result<MediaPath, StartError> {
    let material = export(conn, epoch).map_err(StartError::Exporter)?;
    let crypto = MediaCrypto::new(Side::Client, conn_id, epoch, &material);
    let relay = SocketAddr::new(conn.remote_address().ip(), port);
    let shared = inner.config.media_socket.clone();
    let (socket, relay) = match &shared {
        Some(shared) => (shared.socket(), shared.reach(relay)),
        None => {
            let local: SocketAddr = match relay {
                SocketAddr::V4(_) => ([0, 0, 0, 0], 0).into(),
                SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
            };
            (Arc::new(UdpSocket::bind(local).await?), relay)
        }
    };
    let crypto = Arc::new(Mutex::new(crypto));
    let (delayed_tx, delayed_rx) = mpsc::channel(UPLINK_QUEUE);
    let uplink = Arc::new(Uplink {
        inner: inner.clone(),
        conn: conn.clone(),
        crypto: crypto.clone(),
        socket: socket.clone(),
        relay,
        delayed: delayed_tx,
    });
    let core = Arc::new(PathCore {
        link: inner.config.media_link.clone(),
        inner,
        conn: conn.clone(),
        crypto,
        inbox,
        uplink,
        bound: AtomicBool::new(false),
        delayed_until: Mutex::new(None),
    });
    let shared = shared.map(|s| {
        let key = (canonical(relay), conn_id);
        s.join(key, core.clone());
        (s, key, core.clone())
    });
    let task = tokio::spawn(run(Runner {
        own_socket: shared.is_none(),
        core,
        socket,
        relay,
        delayed: VecDeque::new(),
        uplink_delayed: delayed_rx,
        uplink_due: VecDeque::new(),
    }));
    Ok(MediaPath { task, shared })
}

/// An address with an IPv4-mapped IPv6 address written as IPv4, so that
/// the relay's address and a datagram's source compare equal.
pub(crate) fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// The talker's side of the uplink (PROTOCOL.md §14.3): seals each frame
/// of a live upload as an `Uplink` packet naming the upload stream, and
/// sends it to the relay's media socket at once, without waiting (a
/// datagram the socket cannot take is dropped: the stream copy follows).
pub(crate) struct Uplink {
    inner: Arc<Inner>,
    conn: quinn::Connection,
    /// Shared with the path's task: one counter for Binds and Uplinks.
    crypto: Arc<Mutex<MediaCrypto>>,
    socket: Arc<UdpSocket>,
    relay: SocketAddr,
    /// Packets a [`MediaLink`] delays, to the path's task.
    delayed: mpsc::Sender<(Instant, Vec<u8>)>,
}

impl std::fmt::Debug for Uplink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Uplink")
            .field("relay", &self.relay)
            .finish()
    }
}

impl Uplink {
    /// Whether this uplink belongs to connection `conn`.
    pub fn is_of(&self, conn: &quinn::Connection) -> bool {
        self.conn.stable_id() == conn.stable_id()
    }

    /// Sends the newest frames of the upload on stream `stream`
    /// (`(index, data)`, the newest first; as many as fit, up to
    /// [`UPLINK_REDUNDANCY`]).
    pub fn send(&self, stream: u64, frames: &[(u32, Bytes)]) {
        let mut fit = Vec::with_capacity(UPLINK_REDUNDANCY);
        let mut len = 16;
        for (index, data) in frames.iter().take(UPLINK_REDUNDANCY) {
            len += data.len() + 10;
            if len > MAX_PLAINTEXT_LEN {
                break;
            }
            fit.push((*index, &data[..]));
        }
        if fit.is_empty() {
            return;
        }
        let mut plain = Vec::with_capacity(len);
        UplinkPayload {
            stream,
            frames: fit,
        }
        .encode(&mut plain);
        let mut packet = Vec::with_capacity(plain.len() + 40);
        if seal(
            &self.conn,
            &mut lock(&self.crypto),
            PacketType::Uplink,
            &plain,
            &mut packet,
        )
        .is_err()
        {
            return;
        }
        match self.inner.config.media_link.as_ref().map(|l| l.pass(true)) {
            None | Some(Some(Duration::ZERO)) => {}
            Some(None) => return,
            Some(Some(delay)) => {
                let _ = self.delayed.try_send((Instant::now() + delay, packet));
                return;
            }
        }
        if self.socket.try_send_to(&packet, self.relay).is_ok() {
            Stats::bump(&self.inner.stats.media_frames_uplinked);
        }
    }
}

/// Seals one packet with the client's key, moving to the next epoch when
/// it is spent.
fn seal(
    conn: &quinn::Connection,
    crypto: &mut MediaCrypto,
    kind: PacketType,
    plaintext: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), MediaError> {
    match crypto.seal(kind, plaintext, out) {
        Err(MediaError::KeyExhausted) => {
            let next = crypto.epoch().wrapping_add(1);
            let material = export(conn, next).map_err(|_| MediaError::KeyExhausted)?;
            crypto.rekey(next, &material);
            crypto.seal(kind, plaintext, out)
        }
        other => other,
    }
}

fn export(
    conn: &quinn::Connection,
    epoch: u32,
) -> Result<[u8; KEY_MATERIAL_LEN], quinn::crypto::ExportKeyingMaterialError> {
    let mut material = [0u8; KEY_MATERIAL_LEN];
    conn.export_keying_material(&mut material, EXPORTER_LABEL, &MediaKeys::context(epoch))?;
    Ok(material)
}

/// What receiving on a media path needs, shared by its own task and, for
/// a path on a [`MediaSocket`], by the shared socket's reader.
pub(crate) struct PathCore {
    /// The client's `media_link`, kept here: the shared reader asks it for
    /// every datagram, and the client's `Inner` is a cold cache line there.
    link: Option<Arc<dyn MediaLink>>,
    inner: Arc<Inner>,
    conn: quinn::Connection,
    /// Shared with the uplink: one counter for Binds and Uplinks.
    crypto: Arc<Mutex<MediaCrypto>>,
    inbox: Arc<MediaInbox>,
    /// Handed to the inbox once the path is bound.
    uplink: Arc<Uplink>,
    /// A BindAck came.
    bound: AtomicBool,
    /// On a shared socket, when the last datagram its [`MediaLink`]
    /// delayed is due: later ones wait behind it (kept in order, as a
    /// socket of its own keeps them).
    delayed_until: Mutex<Option<Instant>>,
}

/// One path's task: Binds on their timer, and for a path with a socket of
/// its own, receiving (through a [`MediaLink`] if one is configured).
struct Runner {
    core: Arc<PathCore>,
    /// The socket is this path's alone (else a [`MediaSocket`]'s reader
    /// receives for it).
    own_socket: bool,
    socket: Arc<UdpSocket>,
    relay: SocketAddr,
    /// Received datagrams a [`MediaLink`] delays: when each is due.
    delayed: VecDeque<(Instant, Vec<u8>)>,
    /// Uplink packets a [`MediaLink`] delays, and when each is due.
    uplink_delayed: mpsc::Receiver<(Instant, Vec<u8>)>,
    uplink_due: VecDeque<(Instant, Vec<u8>)>,
}

/// Most datagrams a [`MediaLink`] may hold back at once.
const DELAYED_MAX: usize = 4096;

async fn run(mut r: Runner) {
    let started = Instant::now();
    let mut bound = false;
    let mut retry = BIND_RETRY;
    let mut next_bind = tokio::time::Instant::now();
    let mut buf = vec![0u8; if r.own_socket { MAX_PACKET_LEN + 1 } else { 0 }];
    // One future for the whole run, not one per datagram.
    let conn = r.core.conn.clone();
    let closed = conn.closed();
    tokio::pin!(closed);
    // One timer, moved when the next Bind moves: a timer made per loop
    // would be registered and cleared for every datagram.
    let bind_timer = tokio::time::sleep_until(next_bind);
    tokio::pin!(bind_timer);
    loop {
        let due = r.delayed.front().map(|(at, _)| (*at).into());
        let uplink_due = r.uplink_due.front().map(|(at, _)| (*at).into());
        if bind_timer.deadline() != next_bind {
            bind_timer.as_mut().reset(next_bind);
        }
        tokio::select! {
            Some(delayed) = r.uplink_delayed.recv() => {
                if r.uplink_due.len() < DELAYED_MAX {
                    r.uplink_due.push_back(delayed);
                }
            }
            () = sleep_until_opt(uplink_due) => {
                if let Some((_, packet)) = r.uplink_due.pop_front()
                    && r.socket.try_send_to(&packet, r.relay).is_ok()
                {
                    Stats::bump(&r.core.inner.stats.media_frames_uplinked);
                }
            }
            () = &mut bind_timer => {
                if r.core.is_bound() && !bound {
                    // Bound since the last Bind (the ack came to the
                    // socket's reader): the next one keeps the binding.
                    bound = true;
                    next_bind = tokio::time::Instant::now() + BIND_INTERVAL;
                    continue;
                }
                r.send_bind(started);
                if bound {
                    next_bind += BIND_INTERVAL;
                } else {
                    next_bind += retry;
                    retry = (retry * 2).min(BIND_INTERVAL);
                }
            }
            () = sleep_until_opt(due) => {
                if let Some((_, mut packet)) = r.delayed.pop_front()
                    && r.core.receive(&mut packet) == Some(PacketType::BindAck)
                    && !bound
                {
                    bound = true;
                    next_bind = tokio::time::Instant::now() + BIND_INTERVAL;
                }
            }
            received = r.socket.recv_from(&mut buf), if r.own_socket => {
                let Ok((len, from)) = received else { continue };
                if canonical(from) != canonical(r.relay) {
                    continue;
                }
                // Opened in place; copied only when a MediaLink delays it.
                let packet = &mut buf[..len];
                match r.core.inner.config.media_link.as_ref().map(|l| l.pass(false)) {
                    None | Some(Some(Duration::ZERO)) => {}
                    Some(None) => continue,
                    Some(Some(delay)) => {
                        if r.delayed.len() < DELAYED_MAX {
                            r.delayed.push_back((Instant::now() + delay, packet.to_vec()));
                        }
                        continue;
                    }
                }
                if r.core.receive(packet) == Some(PacketType::BindAck) && !bound {
                    bound = true;
                    next_bind = tokio::time::Instant::now() + BIND_INTERVAL;
                }
            }
            _ = &mut closed => return,
        }
    }
}

/// Sleeps until `at`; never, without one.
pub(crate) async fn sleep_until_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

impl Runner {
    /// Sends a Bind carrying our clock (ms since the path started).
    fn send_bind(&mut self, started: Instant) {
        if let Some(link) = &self.core.inner.config.media_link
            && link.pass(true).is_none()
        {
            return;
        }
        let clock = started.elapsed().as_millis() as u64;
        let mut packet = Vec::with_capacity(64);
        if seal(
            &self.core.conn,
            &mut lock(&self.core.crypto),
            PacketType::Bind,
            &clock.to_be_bytes(),
            &mut packet,
        )
        .is_ok()
        {
            let _ = self.socket.try_send_to(&packet, self.relay);
        }
    }
}

impl std::fmt::Debug for PathCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PathCore")
            .field("conn", &self.conn.stable_id())
            .field("bound", &self.is_bound())
            .finish()
    }
}

impl PathCore {
    /// Whether a BindAck came.
    fn is_bound(&self) -> bool {
        self.bound.load(Ordering::Relaxed)
    }

    /// What the client's [`MediaLink`], if any, does to a datagram
    /// received at `now` on a shared socket: `None`, lost; `Some(None)`,
    /// open it now; `Some(Some(due))`, hold it until `due` (never before
    /// one held earlier).
    pub(crate) fn pass_received(&self, now: Instant) -> Option<Option<Instant>> {
        let Some(link) = &self.link else {
            return Some(None);
        };
        let delay = link.pass(false)?;
        let mut until = lock(&self.delayed_until);
        let due = match *until {
            Some(last) if last > now => (now + delay).max(last),
            _ if delay.is_zero() => return Some(None),
            _ => now + delay,
        };
        *until = Some(due);
        Some(Some(due))
    }

    /// Opens a datagram from the relay (in place) and routes its frames;
    /// its type if it was accepted. The first BindAck makes the uplink
    /// usable: the relay knows our address.
    pub(crate) fn receive(&self, packet: &mut [u8]) -> Option<PacketType> {
        let (kind, plaintext) = {
            let mut crypto = lock(&self.crypto);
            if let Some(epoch) = crypto.wants_epoch(packet) {
                let material = export(&self.conn, epoch).ok()?;
                crypto.rekey(epoch, &material);
            }
            match crypto.open(packet) {
                Ok((header, plaintext)) => (header.kind, plaintext),
                Err(e) => {
                    tracing::trace!(error = %e, "media packet dropped");
                    return None;
                }
            }
        };
        let received_at = Instant::now();
        match kind {
            PacketType::BindAck => {
                Stats::bump(&self.inner.stats.media_binds_acked);
                if !self.bound.swap(true, Ordering::Relaxed) {
                    *lock(&self.inbox.uplink) = Some(self.uplink.clone());
                }
            }
            PacketType::Frame => {
                let f = FramePayload::decode(plaintext).ok()?;
                let data = Bytes::copy_from_slice(f.data);
                deliver_frame(
                    &self.inner,
                    &self.inbox,
                    f.stream,
                    None,
                    f.index,
                    data,
                    received_at,
                );
            }
            PacketType::HeadedFrame => {
                let f = HeadedFramePayload::decode(plaintext).ok()?;
                let data = Bytes::copy_from_slice(f.data);
                deliver_frame(
                    &self.inner,
                    &self.inbox,
                    f.stream,
                    Some(f.header),
                    f.index,
                    data,
                    received_at,
                );
            }
            PacketType::Frames => {
                let f = FramesPayload::decode(plaintext).ok()?;
                // One allocation for the packet; each frame a slice of it.
                let whole = Bytes::copy_from_slice(plaintext);
                deliver_frames(&self.inner, &self.inbox, f, plaintext, &whole, received_at);
            }
            _ => {}
        }
        Some(kind)
    }
}

/// Routes the frames of a `Frames` payload (a media packet's, or a
/// `LiveFrames` datagram message's) decoded from `buffer`; `whole` holds
/// the same bytes as `buffer`, so each frame is a slice of it rather than
/// a copy.
pub(crate) fn deliver_frames(
    inner: &Inner,
    inbox: &MediaInbox,
    f: FramesPayload<'_>,
    buffer: &[u8],
    whole: &Bytes,
    received_at: Instant,
) {
    let base = buffer.as_ptr() as usize;
    // The header announces the clip with its first frame; the rest follow
    // it.
    let mut header = f.header;
    for (index, data) in &f.frames {
        let at = data.as_ptr() as usize - base;
        let data = whole.slice(at..at + data.len());
        deliver_frame(
            inner,
            inbox,
            f.stream,
            header.take(),
            *index,
            data,
            received_at,
        );
    }
}

/// Routes frame `index` of `stream`; `header`: the clip's, if the packet
/// carries it.
fn deliver_frame(
    inner: &Inner,
    inbox: &MediaInbox,
    stream: u64,
    header: Option<ClipHeader>,
    index: u32,
    data: Bytes,
    received_at: Instant,
) {
    if index >= MAX_MEDIA_INDEX {
        return;
    }
    Stats::bump(&inner.stats.media_frames_received);
    // Only a live delivery's header announces a clip.
    let header = header.filter(|h| h.flags & ClipHeader::FLAG_MEDIA != 0);
    let frame = MediaFrame {
        index,
        data,
        received_at,
    };
    inbox.deliver_live(inner, stream, header, frame);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(index: u32, at: Instant) -> MediaFrame {
        MediaFrame {
            index,
            data: Bytes::from_static(b"x"),
            received_at: at,
        }
    }

    fn events(capacity: usize) -> (EventTx, mpsc::Receiver<Event>) {
        let (tx, rx) = mpsc::channel(capacity);
        (EventTx::Channel(tx), rx)
    }

    fn frame_index(event: Event) -> u32 {
        match event {
            Event::Frame { index, .. } => index,
            other => panic!("not a frame: {other:?}"),
        }
    }

    #[test]
    fn early_frames_wait_for_their_stream_and_are_bounded() {
        let inbox = MediaInbox::default();
        let (tx, _events) = events(8);
        let t0 = Instant::now();
        assert_eq!(inbox.deliver(3, frame(0, t0), &tx), Delivery::Queued);
        assert_eq!(inbox.deliver(7, frame(0, t0), &tx), Delivery::Queued);
        assert_eq!(inbox.deliver(3, frame(1, t0), &tx), Delivery::Queued);
        let registration = inbox.register(3);
        assert!(!registration.announced);
        let mut rx = registration.rx;
        assert_eq!(rx.try_recv().unwrap().index, 0);
        assert_eq!(rx.try_recv().unwrap().index, 1);
        assert_eq!(inbox.deliver(3, frame(2, t0), &tx), Delivery::Queued);
        assert_eq!(rx.try_recv().unwrap().index, 2);
        // A copy of an accepted frame is dropped.
        assert_eq!(inbox.deliver(3, frame(2, t0), &tx), Delivery::Dropped);
        assert_eq!(inbox.unregister(3, 4), 1);
        // Stream 7's frame expires after EARLY_KEEP.
        inbox.deliver(9, frame(0, t0 + EARLY_KEEP + Duration::from_millis(1)), &tx);
        assert!(inbox.register(7).rx.try_recv().is_err());
        // At most EARLY_MAX kept: the oldest go.
        for i in 0..EARLY_MAX as u32 + 10 {
            inbox.deliver(11, frame(i, t0 + EARLY_KEEP * 2), &tx);
        }
        let mut rx = inbox.register(11).rx;
        assert_eq!(rx.try_recv().unwrap().index, 10);
        inbox.unregister(11, 0);
        assert!(!lock(&inbox.state).routes.contains_key(&11));
    }

    #[test]
    fn frames_go_straight_to_the_events_in_arrival_order() {
        let inbox = MediaInbox::default();
        let (tx, mut events) = events(2);
        let t0 = Instant::now();
        let id = ClipId::from_bytes([5; 16]);
        // One came before the header: it is the reader's, and so is every
        // frame until the clip's ClipStarted is out.
        inbox.deliver(4, frame(1, t0), &tx);
        let mut rx = inbox.register(4).rx;
        assert_eq!(inbox.deliver(4, frame(0, t0), &tx), Delivery::Queued);
        inbox.surface(4, "g".into(), id);
        // Frames wait for the reader: the next queue behind them.
        assert_eq!(inbox.deliver(4, frame(9, t0), &tx), Delivery::Queued);
        assert!(events.try_recv().is_err());
        for index in [1, 0, 9] {
            assert_eq!(rx.try_recv().unwrap().index, index);
            inbox.surfaced(4);
        }
        // Nothing queued: straight onto the event channel, once.
        assert_eq!(inbox.deliver(4, frame(2, t0), &tx), Delivery::Surfaced);
        assert_eq!(inbox.deliver(4, frame(2, t0), &tx), Delivery::Dropped);
        assert_eq!(inbox.deliver(4, frame(3, t0), &tx), Delivery::Surfaced);
        // The application is behind (channel full): frames 4 and 5 wait
        // for the reader, in order, even once there is room again.
        assert_eq!(inbox.deliver(4, frame(4, t0), &tx), Delivery::Queued);
        match events.try_recv().unwrap() {
            Event::Frame {
                group,
                clip_id,
                index,
                ..
            } => assert_eq!((group.as_str(), clip_id, index), ("g", id, 2)),
            other => panic!("not a frame: {other:?}"),
        }
        assert_eq!(frame_index(events.try_recv().unwrap()), 3);
        assert_eq!(inbox.deliver(4, frame(5, t0), &tx), Delivery::Queued);
        assert!(events.try_recv().is_err());
        assert_eq!(rx.try_recv().unwrap().index, 4);
        assert_eq!(rx.try_recv().unwrap().index, 5);
        inbox.surfaced(4);
        inbox.surfaced(4);
        assert_eq!(inbox.deliver(4, frame(6, t0), &tx), Delivery::Surfaced);
        assert_eq!(frame_index(events.try_recv().unwrap()), 6);
        // After `queue_all` (the clip ended) stragglers go to the reader.
        inbox.queue_all(4);
        assert_eq!(inbox.deliver(4, frame(8, t0), &tx), Delivery::Queued);
        assert_eq!(inbox.missing(4, 10), 1);
        // After unregistering nothing goes anywhere.
        assert_eq!(inbox.unregister(4, 11), 2);
        assert_eq!(inbox.deliver(4, frame(7, t0), &tx), Delivery::Queued);
        assert!(events.try_recv().is_err());
        assert_eq!(rx.try_recv().unwrap().index, 8);
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn an_announced_clip_goes_on_straight_without_its_frames_again() {
        let inbox = MediaInbox::default();
        let (tx, mut events) = events(8);
        let t0 = Instant::now();
        let id = ClipId::from_bytes([6; 16]);
        let mut seen = Vec::new();
        mark(&mut seen, 0);
        mark(&mut seen, 2);
        lock(&inbox.state).announced.insert(
            5,
            Announced {
                group: "g".into(),
                clip_id: id,
                at: t0,
                seen,
            },
        );
        // A plain Frame that overtook the HeadedFrames waits early.
        inbox.deliver(5, frame(1, t0), &tx);
        inbox.deliver(5, frame(2, t0), &tx);
        let registration = inbox.register(5);
        assert!(registration.announced);
        assert!(inbox.take_announced(5).is_none());
        let mut rx = registration.rx;
        // The early frame the application has not seen goes to the reader
        // (the one it had does not), and the next queue behind it.
        assert_eq!(rx.try_recv().unwrap().index, 1);
        assert!(rx.try_recv().is_err());
        assert_eq!(inbox.deliver(5, frame(3, t0), &tx), Delivery::Queued);
        assert_eq!(inbox.deliver(5, frame(0, t0), &tx), Delivery::Dropped);
        assert_eq!(rx.try_recv().unwrap().index, 3);
        inbox.surfaced(5);
        inbox.surfaced(5);
        assert_eq!(inbox.deliver(5, frame(4, t0), &tx), Delivery::Surfaced);
        assert_eq!(frame_index(events.try_recv().unwrap()), 4);
        assert_eq!(inbox.unregister(5, 5), 0);
    }

    #[test]
    fn missing_counts_whole_words_and_the_rest() {
        assert_eq!(missing_in(&[], 5), 5);
        assert_eq!(missing_in(&[u64::MAX, 0b101], 70), 4);
        assert_eq!(missing_in(&[u64::MAX, u64::MAX], 64), 0);
        assert_eq!(missing_in(&[u64::MAX >> 1], 64), 1);
    }
}
