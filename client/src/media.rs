//! The client's end of the UDP media path (PROTOCOL.md, section 14): after
//! the relay's `MediaOffer`, a UDP socket that binds to the relay's media
//! port and receives live frames in sealed datagrams.
//!
//! - [`MediaPath`]: one connection's path, owned by the connection task:
//!   the task that sends `Bind` (at once, again after 1, 2, 4 s until a
//!   `BindAck`, then every 15 s) and receives `Frame` packets; aborted when
//!   the connection ends (a new connection opens a new path).
//! - [`MediaInbox`]: hands each frame to the reader of its clip stream
//!   (`receive.rs`), keeping frames that overtook their stream's header for
//!   up to [`EARLY_KEEP`] ([`EARLY_MAX`] at most).
//! - [`MediaLink`]: a seam for a simulated network (client-sim's lossy
//!   model, tests) between the socket and the decryption.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ptt_protocol::media::{
    BIND_INTERVAL, EXPORTER_LABEL, FramePayload, KEY_MATERIAL_LEN, MAX_PACKET_LEN, MediaCrypto,
    MediaError, MediaKeys, PacketType, Side,
};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

use crate::shared::{Inner, Stats, lock};

/// How long frames of a stream whose header has not arrived are kept.
pub const EARLY_KEEP: Duration = Duration::from_secs(2);
/// Most frames kept for streams whose header has not arrived.
pub const EARLY_MAX: usize = 1024;
/// Frames queued for one clip's reader before more are dropped (and
/// fetched with the clip).
const ROUTE_CAPACITY: usize = 512;
/// Highest frame index accepted by UDP (21 minutes of 20 ms frames, far
/// above the relay's clip limit): bounds the received-frames bitmap.
pub(crate) const MAX_MEDIA_INDEX: u32 = 1 << 16;

/// What a simulated network does to the client's media datagrams: a seam
/// for client-sim's lossy model and for tests. The client asks it about
/// every datagram it receives (before decryption) and sends.
pub trait MediaLink: Send + Sync + std::fmt::Debug {
    /// `None`: the datagram is lost. `Some(delay)`: it passes, a received
    /// one after `delay` (kept in order); sent ones are not delayed.
    fn pass(&self, outgoing: bool) -> Option<Duration>;
}

/// One frame that arrived by UDP.
#[derive(Debug)]
pub(crate) struct MediaFrame {
    pub index: u32,
    pub data: Bytes,
    pub received_at: Instant,
}

/// Routes frames to the readers of their clip streams.
#[derive(Debug, Default)]
pub(crate) struct MediaInbox {
    state: Mutex<InboxState>,
}

#[derive(Debug, Default)]
struct InboxState {
    routes: HashMap<u64, mpsc::Sender<MediaFrame>>,
    early: VecDeque<(u64, MediaFrame)>,
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

    /// The frames of `stream` from now on (and those that came early).
    pub fn register(&self, stream: u64) -> mpsc::Receiver<MediaFrame> {
        let (tx, rx) = mpsc::channel(ROUTE_CAPACITY);
        let mut s = lock(&self.state);
        let early = std::mem::take(&mut s.early);
        for (id, frame) in early {
            if id == stream {
                let _ = tx.try_send(frame);
            } else {
                s.early.push_back((id, frame));
            }
        }
        s.routes.insert(stream, tx);
        rx
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
    let socket = UdpSocket::bind(local).await?;
    let task = tokio::spawn(run(Runner {
        inner,
        conn: conn.clone(),
        crypto,
        socket,
        relay,
        inbox,
        delayed: VecDeque::new(),
    }));
    Ok(MediaPath { task })
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
    crypto: MediaCrypto,
    socket: UdpSocket,
    relay: SocketAddr,
    inbox: Arc<MediaInbox>,
    /// Received datagrams a [`MediaLink`] delays: when each is due.
    delayed: VecDeque<(Instant, Vec<u8>)>,
}

/// Most datagrams a [`MediaLink`] may hold back at once.
const DELAYED_MAX: usize = 4096;

async fn run(mut r: Runner) {
    let started = Instant::now();
    let mut bound = false;
    let mut retry = Duration::from_secs(1);
    let mut next_bind = tokio::time::Instant::now();
    let mut buf = vec![0u8; MAX_PACKET_LEN + 1];
    loop {
        let due = r.delayed.front().map(|(at, _)| (*at).into());
        tokio::select! {
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
                    && r.receive(&mut packet) == Some(PacketType::BindAck)
                    && !bound
                {
                    bound = true;
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
                if r.receive(&mut packet) == Some(PacketType::BindAck) && !bound {
                    bound = true;
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
        match self.crypto.seal(PacketType::Bind, plaintext, out) {
            Err(MediaError::KeyExhausted) => {
                let next = self.crypto.epoch().wrapping_add(1);
                let material = export(&self.conn, next).map_err(|_| MediaError::KeyExhausted)?;
                self.crypto.rekey(next, &material);
                self.crypto.seal(PacketType::Bind, plaintext, out)
            }
            other => other,
        }
    }

    /// Opens a datagram from the relay and routes a frame; its type if it
    /// was accepted.
    fn receive(&mut self, packet: &mut [u8]) -> Option<PacketType> {
        if let Some(epoch) = self.crypto.wants_epoch(packet) {
            let material = export(&self.conn, epoch).ok()?;
            self.crypto.rekey(epoch, &material);
        }
        let (header, plaintext) = match self.crypto.open(packet) {
            Ok(opened) => opened,
            Err(e) => {
                tracing::trace!(error = %e, "media packet dropped");
                return None;
            }
        };
        if header.kind == PacketType::BindAck {
            Stats::bump(&self.inner.stats.media_binds_acked);
        }
        if header.kind == PacketType::Frame {
            let frame = FramePayload::decode(plaintext).ok()?;
            if frame.index >= MAX_MEDIA_INDEX {
                return None;
            }
            Stats::bump(&self.inner.stats.media_frames_received);
            self.inbox.deliver(
                frame.stream,
                MediaFrame {
                    index: frame.index,
                    data: Bytes::copy_from_slice(frame.data),
                    received_at: Instant::now(),
                },
            );
        }
        Some(header.kind)
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
        let mut rx = inbox.register(3);
        assert_eq!(rx.try_recv().unwrap().index, 0);
        assert_eq!(rx.try_recv().unwrap().index, 1);
        assert!(inbox.deliver(3, frame(2, t0)));
        assert_eq!(rx.try_recv().unwrap().index, 2);
        // Stream 7's frame expires after EARLY_KEEP.
        inbox.deliver(9, frame(0, t0 + EARLY_KEEP + Duration::from_millis(1)));
        assert!(inbox.register(7).try_recv().is_err());
        // At most EARLY_MAX kept: the oldest go.
        for i in 0..EARLY_MAX as u32 + 10 {
            inbox.deliver(11, frame(i, t0 + EARLY_KEEP * 2));
        }
        let mut rx = inbox.register(11);
        assert_eq!(rx.try_recv().unwrap().index, 10);
        inbox.unregister(11);
        assert!(
            lock(&inbox.state).routes.is_empty() || !lock(&inbox.state).routes.contains_key(&11)
        );
    }
}
