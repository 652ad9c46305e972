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

use crate::event::Event;
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
    /// Its frames from now on (and those that came early).
    pub rx: mpsc::Receiver<MediaFrame>,
    /// The clip was announced by a `HeadedFrame`: `ClipStarted` went to
    /// the application, and these frames (bit `i`: frame `i`) as well.
    pub announced: Option<Vec<u64>>,
}

/// Routes frames to the readers of their clip streams.
#[derive(Debug, Default)]
pub(crate) struct MediaInbox {
    state: Mutex<InboxState>,
    /// The talker's side of the uplink, once the path is bound.
    uplink: Mutex<Option<Arc<Uplink>>>,
}

#[derive(Debug, Default)]
struct InboxState {
    routes: HashMap<u64, mpsc::Sender<MediaFrame>>,
    early: VecDeque<(u64, MediaFrame)>,
    announced: HashMap<u64, Announced>,
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

impl MediaInbox {
    /// Hands a frame of stream `stream` to its reader, or keeps it until
    /// the stream's header arrives. `false`: dropped (queue full).
    pub fn deliver(&self, stream: u64, frame: MediaFrame) -> bool {
        let mut s = lock(&self.state);
        let now = frame.received_at;
        while s
            .early
            .front()
            .is_some_and(|(_, f)| now.saturating_duration_since(f.received_at) > EARLY_KEEP)
        {
            s.early.pop_front();
        }
        match s.routes.get(&stream) {
            Some(route) => match route.try_send(frame) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => false,
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    s.routes.remove(&stream);
                    false
                }
            },
            None => {
                if s.early.len() >= EARLY_MAX {
                    s.early.pop_front();
                }
                s.early.push_back((stream, frame));
                true
            }
        }
    }

    /// A frame that may start a clip the application has not heard of:
    /// with `header` (a `HeadedFrame`) for a stream whose header has not
    /// arrived, the clip is announced (`ClipStarted`, then the frame, as
    /// events at once) unless it was received whole before; a frame of an
    /// announced stream goes to the application at once too. Otherwise as
    /// [`deliver`](Self::deliver).
    pub async fn deliver_live(
        &self,
        inner: &Inner,
        stream: u64,
        header: Option<ClipHeader>,
        frame: MediaFrame,
    ) {
        {
            let s = lock(&self.state);
            let known = s.announced.contains_key(&stream);
            if s.routes.contains_key(&stream) || (header.is_none() && !known) {
                drop(s);
                self.deliver(stream, frame);
                return;
            }
        }
        // Events are sent under the inbox's lock, so that a reader that
        // registers later finds them all sent (ClipStarted first).
        let wanted = inner.events.max_capacity().min(2);
        let Ok(mut permits) = inner.events.reserve_many(wanted).await else {
            return;
        };
        let mut s = lock(&self.state);
        if s.routes.contains_key(&stream) {
            drop(s);
            self.deliver(stream, frame);
            return;
        }
        let now = frame.received_at;
        s.announced
            .retain(|_, a| now.saturating_duration_since(a.at) < ANNOUNCED_KEEP);
        if !s.announced.contains_key(&stream) {
            let Some(header) = header else {
                drop(s);
                self.deliver(stream, frame);
                return;
            };
            let duplicate = lock(&inner.dedup).contains(&header.group, header.clip_id);
            if duplicate || s.announced.len() >= ANNOUNCED_MAX || frame.index >= MAX_MEDIA_INDEX {
                drop(s);
                self.deliver(stream, frame);
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
            if let Some(permit) = permits.next() {
                permit.send(Event::ClipStarted {
                    group: header.group.clone(),
                    clip_id: header.clip_id,
                    talker: header.talker.clone(),
                    seq: header.seq,
                    history: false,
                    header,
                });
            }
            Stats::bump(&inner.stats.media_clips_announced);
        }
        let Some(a) = s.announced.get_mut(&stream) else {
            return;
        };
        // Marked only when it goes out: a frame without a permit (an event
        // queue of one) counts as missing, and the clip is fetched.
        if let Some(permit) = permits.next()
            && mark(&mut a.seen, frame.index)
        {
            Stats::bump(&inner.stats.frames_received);
            permit.send(Event::Frame {
                group: a.group.clone(),
                clip_id: a.clip_id,
                index: frame.index,
                data: frame.data,
                received_at: frame.received_at,
            });
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

    /// The frames of `stream` from now on (and those that came early), and
    /// whether the clip was announced.
    pub fn register(&self, stream: u64) -> Registration {
        let (tx, rx) = mpsc::channel(ROUTE_CAPACITY);
        let mut s = lock(&self.state);
        let announced = s.announced.remove(&stream).map(|a| a.seen);
        let early = std::mem::take(&mut s.early);
        for (id, frame) in early {
            if id == stream {
                let _ = tx.try_send(frame);
            } else {
                s.early.push_back((id, frame));
            }
        }
        s.routes.insert(stream, tx);
        Registration { rx, announced }
    }

    /// The reader of `stream` is done.
    pub fn unregister(&self, stream: u64) {
        lock(&self.state).routes.remove(&stream);
    }
}

/// A connection's media path; its task ends when this is dropped.
#[derive(Debug)]
pub(crate) struct MediaPath {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for MediaPath {
    fn drop(&mut self) {
        self.task.abort();
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
/// `epoch` from the connection's TLS exporter, a UDP socket, the Bind task.
/// Frames go to `inbox`.
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
    let local: SocketAddr = match relay {
        SocketAddr::V4(_) => ([0, 0, 0, 0], 0).into(),
        SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = Arc::new(UdpSocket::bind(local).await?);
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
    let task = tokio::spawn(run(Runner {
        inner,
        conn: conn.clone(),
        crypto,
        socket,
        relay,
        inbox,
        delayed: VecDeque::new(),
        uplink,
        uplink_delayed: delayed_rx,
        uplink_due: VecDeque::new(),
    }));
    Ok(MediaPath { task })
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

struct Runner {
    inner: Arc<Inner>,
    conn: quinn::Connection,
    crypto: Arc<Mutex<MediaCrypto>>,
    socket: Arc<UdpSocket>,
    relay: SocketAddr,
    inbox: Arc<MediaInbox>,
    /// Received datagrams a [`MediaLink`] delays: when each is due.
    delayed: VecDeque<(Instant, Vec<u8>)>,
    /// Handed to the inbox once the path is bound.
    uplink: Arc<Uplink>,
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
    let mut buf = vec![0u8; MAX_PACKET_LEN + 1];
    loop {
        let due = r.delayed.front().map(|(at, _)| (*at).into());
        let uplink_due = r.uplink_due.front().map(|(at, _)| (*at).into());
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
                    Stats::bump(&r.inner.stats.media_frames_uplinked);
                }
            }
            () = tokio::time::sleep_until(next_bind) => {
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
                    && r.receive(&mut packet).await == Some(PacketType::BindAck)
                    && !bound
                {
                    bound = true;
                    r.bound();
                    next_bind = tokio::time::Instant::now() + BIND_INTERVAL;
                }
            }
            received = r.socket.recv_from(&mut buf) => {
                let Ok((len, from)) = received else { continue };
                if from != r.relay {
                    continue;
                }
                let link = r.inner.config.media_link.clone();
                let mut packet = buf[..len].to_vec();
                match link.map(|l| l.pass(false)) {
                    None | Some(Some(Duration::ZERO)) => {}
                    Some(None) => continue,
                    Some(Some(delay)) => {
                        if r.delayed.len() < DELAYED_MAX {
                            r.delayed.push_back((Instant::now() + delay, packet));
                        }
                        continue;
                    }
                }
                if r.receive(&mut packet).await == Some(PacketType::BindAck) && !bound {
                    bound = true;
                    r.bound();
                    next_bind = tokio::time::Instant::now() + BIND_INTERVAL;
                }
            }
            _ = r.conn.closed() => return,
        }
    }
}

async fn sleep_until_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

impl Runner {
    /// The first BindAck came: the relay knows our address, so uploads
    /// may use the uplink.
    fn bound(&self) {
        *lock(&self.inbox.uplink) = Some(self.uplink.clone());
    }

    /// Sends a Bind carrying our clock (ms since the path started).
    fn send_bind(&mut self, started: Instant) {
        if let Some(link) = &self.inner.config.media_link
            && link.pass(true).is_none()
        {
            return;
        }
        let clock = started.elapsed().as_millis() as u64;
        let mut packet = Vec::with_capacity(64);
        if self.seal(&clock.to_be_bytes(), &mut packet).is_ok() {
            let _ = self.socket.try_send_to(&packet, self.relay);
        }
    }

    fn seal(&mut self, plaintext: &[u8], out: &mut Vec<u8>) -> Result<(), MediaError> {
        seal(
            &self.conn,
            &mut lock(&self.crypto),
            PacketType::Bind,
            plaintext,
            out,
        )
    }

    /// Opens a datagram from the relay and routes a frame; its type if it
    /// was accepted.
    async fn receive(&mut self, packet: &mut [u8]) -> Option<PacketType> {
        let (kind, frames) = {
            let mut crypto = lock(&self.crypto);
            if let Some(epoch) = crypto.wants_epoch(packet) {
                let material = export(&self.conn, epoch).ok()?;
                crypto.rekey(epoch, &material);
            }
            let (header, plaintext) = match crypto.open(packet) {
                Ok(opened) => opened,
                Err(e) => {
                    tracing::trace!(error = %e, "media packet dropped");
                    return None;
                }
            };
            let frames = match header.kind {
                PacketType::Frame => {
                    let f = FramePayload::decode(plaintext).ok()?;
                    Some((
                        f.stream,
                        None,
                        vec![(f.index, Bytes::copy_from_slice(f.data))],
                    ))
                }
                PacketType::HeadedFrame => {
                    let f = HeadedFramePayload::decode(plaintext).ok()?;
                    Some((
                        f.stream,
                        Some(f.header),
                        vec![(f.index, Bytes::copy_from_slice(f.data))],
                    ))
                }
                PacketType::Frames => {
                    let f = FramesPayload::decode(plaintext).ok()?;
                    // One allocation for the packet; each frame a slice of it.
                    let whole = Bytes::copy_from_slice(plaintext);
                    let base = plaintext.as_ptr() as usize;
                    let frames = f
                        .frames
                        .iter()
                        .map(|(index, data)| {
                            let at = data.as_ptr() as usize - base;
                            (*index, whole.slice(at..at + data.len()))
                        })
                        .collect();
                    Some((f.stream, f.header, frames))
                }
                _ => None,
            };
            (header.kind, frames)
        };
        if kind == PacketType::BindAck {
            Stats::bump(&self.inner.stats.media_binds_acked);
        }
        if let Some((stream, header, frames)) = frames {
            // Only a live delivery's header announces a clip.
            let mut header = header.filter(|h| h.flags & ClipHeader::FLAG_MEDIA != 0);
            let received_at = Instant::now();
            for (index, data) in frames {
                if index >= MAX_MEDIA_INDEX {
                    continue;
                }
                Stats::bump(&self.inner.stats.media_frames_received);
                let frame = MediaFrame {
                    index,
                    data,
                    received_at,
                };
                // The header announces the clip with its first frame; the
                // rest follow it.
                self.inbox
                    .deliver_live(&self.inner, stream, header.take(), frame)
                    .await;
            }
        }
        Some(kind)
    }
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

    #[test]
    fn early_frames_wait_for_their_stream_and_are_bounded() {
        let inbox = MediaInbox::default();
        let t0 = Instant::now();
        assert!(inbox.deliver(3, frame(0, t0)));
        assert!(inbox.deliver(7, frame(0, t0)));
        assert!(inbox.deliver(3, frame(1, t0)));
        let mut rx = inbox.register(3).rx;
        assert_eq!(rx.try_recv().unwrap().index, 0);
        assert_eq!(rx.try_recv().unwrap().index, 1);
        assert!(inbox.deliver(3, frame(2, t0)));
        assert_eq!(rx.try_recv().unwrap().index, 2);
        // Stream 7's frame expires after EARLY_KEEP.
        inbox.deliver(9, frame(0, t0 + EARLY_KEEP + Duration::from_millis(1)));
        assert!(inbox.register(7).rx.try_recv().is_err());
        // At most EARLY_MAX kept: the oldest go.
        for i in 0..EARLY_MAX as u32 + 10 {
            inbox.deliver(11, frame(i, t0 + EARLY_KEEP * 2));
        }
        let mut rx = inbox.register(11).rx;
        assert_eq!(rx.try_recv().unwrap().index, 10);
        inbox.unregister(11);
        assert!(
            lock(&inbox.state).routes.is_empty() || !lock(&inbox.state).routes.contains_key(&11)
        );
    }
}
