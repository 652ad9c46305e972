//! The UDP media path (PROTOCOL.md §14): live frames to native members in
//! AES-128-GCM-sealed UDP datagrams instead of on their clip streams.
//!
//! Why: a frame on a QUIC stream costs the relay quinn's per-packet
//! machinery (stream framing, packet building, ACK processing, a task wake
//! per member) and, under loss, holds every later frame behind its
//! retransmission. Issue #15 measured plain UDP with a `ring` seal per
//! packet at 3.3 µs CPU per delivered frame against 11.6–16 µs for every
//! per-frame quinn path. The QUIC connection stays the source of truth: the
//! member's live clip stream still carries the clip's header and end, and a
//! member that lost frames fetches the clip whole.
//!
//! - [`MediaPlane`]: the node's media socket, its receive task (Bind in,
//!   BindAck out; everything that does not authenticate dropped without a
//!   reply) and the peers by connection id.
//! - [`MediaPeer`]: one connection's media path: keys, counters, replay
//!   windows ([`ptt_protocol::MediaCrypto`]), the bound address.
//! - [`fanout`]: the fan-out of one frame to every media member of a live
//!   clip ([`send_frame`]), called by the talker's task as it appends the
//!   frame ([`LiveClip::push_frame`]): no task wake per member; in `Frames`
//!   packets of several frames for notes groups' members whose clients
//!   take them.
//! - [`deliver_live_media`]: a media member's live delivery: header and end
//!   on the stream, the frames the clip had before it joined by UDP. The
//!   first [`HEADED_FRAMES`](ptt_protocol::media::HEADED_FRAMES) frame packets of a delivery carry the clip's
//!   header (`HeadedFrame`), so the member can play them before the
//!   stream's header arrives.
//! - The talker's uplink: each frame of an upload also comes as a sealed
//!   `Uplink` packet naming the upload stream ([`MediaPeer::register_upload`]);
//!   the receive task hands it to the clip ([`LiveClip::push_uplink`]),
//!   which sends it to the media members if the stream has not brought it
//!   yet. The stored clip comes from the stream alone.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use dashmap::DashMap;
use ptt_protocol::media::{
    BIND_TIMEOUT, EXPORTER_LABEL, FEATURE_FRAMES, KEY_MATERIAL_LEN, MAX_PACKET_LEN, MediaCrypto,
    MediaError, MediaKeys, PacketType, Side, UplinkPayload,
};
use ptt_protocol::{ClipHeader, ClipMessage};
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

use crate::delivery::{Delivery, Guarded, Sink};
use crate::live::{ClipState, LiveClip, end_message};
use crate::transport::Connection;

pub mod fanout;

pub use fanout::{MediaTarget, flush, flush_due, send_backlog, send_frame};

/// Packets a peer may send in a burst before its rate applies.
const PEER_BURST: f64 = 8.0;
/// Packets per second a peer may send once its burst is spent (a client
/// sends a Bind every 15 s, and a few more when its address changes).
const PEER_RATE: f64 = 2.0;
/// `Uplink` packets a peer may send in a burst (one second of 20 ms
/// frames); a budget of their own, apart from the Binds'.
const UPLINK_BURST: f64 = 50.0;
/// `Uplink` packets per second once the burst is spent: a talker in real
/// time with 10 ms frames, the shortest Opus frames a client may send.
/// The frames also count against the user's `user_frames_per_second`.
const UPLINK_RATE: f64 = 100.0;
/// Uploads one path may have registered for its uplink at once; more are
/// not sped up (their frames still arrive on their streams).
const MAX_UPLINKS: usize = 16;

/// The node's media socket and the connections that opened a media path.
#[derive(Debug)]
pub struct MediaPlane {
    socket: Arc<UdpSocket>,
    port: u16,
    peers: DashMap<u64, Arc<MediaPeer>>,
}

impl MediaPlane {
    /// Binds the media socket on `addr` (large buffers, as the QUIC one).
    pub fn bind(addr: SocketAddr) -> std::io::Result<Arc<MediaPlane>> {
        let socket = crate::net::udp_socket(addr)?;
        socket.set_nonblocking(true)?;
        let socket = UdpSocket::from_std(socket)?;
        let port = socket.local_addr()?.port();
        Ok(Arc::new(MediaPlane {
            socket: Arc::new(socket),
            port,
            peers: DashMap::new(),
        }))
    }

    /// The media socket's UDP port, announced in `MediaOffer`.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Opens the media path of a connection whose client announced
    /// `features` (`MediaOpen`): a random connection id, keys of epoch 0
    /// from its TLS exporter. `None` if the exporter fails.
    pub fn open(&self, conn: &Connection, features: u64) -> Option<Arc<MediaPeer>> {
        let crypto_conn_id = loop {
            let id = random_u64()?;
            if id != 0 && !self.peers.contains_key(&id) {
                break id;
            }
        };
        let material = export(conn, 0)?;
        let peer = Arc::new(MediaPeer {
            conn_id: crypto_conn_id,
            features: features & ptt_protocol::media::FEATURES,
            conn: conn.clone(),
            socket: self.socket.clone(),
            state: Mutex::new(PeerState {
                crypto: MediaCrypto::new(Side::Relay, crypto_conn_id, 0, &material),
                addr: None,
                last_bind: None,
                closed: false,
                tokens: PEER_BURST,
                refilled: Instant::now(),
                uplink_tokens: UPLINK_BURST,
                uplink_refilled: Instant::now(),
                uploads: HashMap::new(),
            }),
        });
        self.peers.insert(crypto_conn_id, peer.clone());
        Some(peer)
    }

    /// Ends a connection's media path (closed, or the client asked).
    pub fn close(&self, peer: &MediaPeer) {
        peer.lock().closed = true;
        self.peers.remove(&peer.conn_id);
    }

    /// Reads the media socket until `shutdown`: Binds are answered, the
    /// rest dropped.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        // One byte more than the largest packet, to see an oversized one.
        let mut buf = vec![0u8; MAX_PACKET_LEN + 1];
        loop {
            let (len, from) = tokio::select! {
                _ = shutdown.cancelled() => return,
                received = self.socket.recv_from(&mut buf) => match received {
                    Ok(received) => received,
                    // ICMP errors of earlier sends surface here on Linux.
                    Err(e) => {
                        tracing::trace!(error = %e, "media socket receive error");
                        continue;
                    }
                },
            };
            if let Some(reply) = self.receive(&mut buf[..len], from, Instant::now()) {
                let _ = self.socket.try_send_to(&reply, from);
            }
        }
    }

    /// One datagram from `from`; the reply to send back, if any.
    fn receive(&self, packet: &mut [u8], from: SocketAddr, now: Instant) -> Option<Vec<u8>> {
        if packet.len() > MAX_PACKET_LEN || packet.len() < 9 {
            return None;
        }
        let conn_id = u64::from_be_bytes(packet[1..9].try_into().ok()?);
        let peer = self.peers.get(&conn_id).map(|p| p.clone())?;
        peer.receive(packet, from, now)
    }
}

/// One connection's media path.
#[derive(Debug)]
pub struct MediaPeer {
    conn_id: u64,
    /// The `MediaOpen` features this relay uses (offered back).
    features: u64,
    /// For the TLS exporter when the keys move to the next epoch.
    conn: Connection,
    socket: Arc<UdpSocket>,
    state: Mutex<PeerState>,
}

#[derive(Debug)]
struct PeerState {
    crypto: MediaCrypto,
    /// Where the last authentic Bind came from.
    addr: Option<SocketAddr>,
    last_bind: Option<Instant>,
    closed: bool,
    tokens: f64,
    refilled: Instant,
    /// The budget of `Uplink` packets.
    uplink_tokens: f64,
    uplink_refilled: Instant,
    /// The connection's live uploads by upload stream id.
    uploads: HashMap<u64, Upload>,
}

/// A live upload whose frames may come by the uplink.
#[derive(Debug, Clone)]
struct Upload {
    clip: Arc<LiveClip>,
    frames: crate::limits::UserFrames,
}

/// An upload registered for the uplink; unregistered when dropped (the
/// upload ended).
#[derive(Debug)]
pub struct UploadRegistration {
    peer: Arc<MediaPeer>,
    stream: u64,
}

impl Drop for UploadRegistration {
    fn drop(&mut self) {
        self.peer.lock().uploads.remove(&self.stream);
    }
}

impl MediaPeer {
    /// The id in every packet of this path.
    pub fn conn_id(&self) -> u64 {
        self.conn_id
    }

    /// The features of the client's `MediaOpen` this relay uses.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// Whether the client takes `Frames` packets (several frames in one).
    pub fn takes_frames(&self) -> bool {
        self.features & FEATURE_FRAMES != 0
    }

    /// The current key epoch.
    pub fn epoch(&self) -> u32 {
        self.lock().crypto.epoch()
    }

    /// Whether frames go to this member by UDP: a Bind authenticated within
    /// [`BIND_TIMEOUT`] and the path is open.
    pub fn is_bound(&self, now: Instant) -> bool {
        let s = self.lock();
        !s.closed
            && s.addr.is_some()
            && s.last_bind
                .is_some_and(|at| now.saturating_duration_since(at) < BIND_TIMEOUT)
    }

    /// Lets the frames of the live upload on stream `stream` (its QUIC id)
    /// come by the uplink too, counted against `frames` (the user's frame
    /// budget) once per index; until the registration is dropped. `None`
    /// when the path already has 16 uploads registered.
    pub fn register_upload(
        self: &Arc<Self>,
        stream: u64,
        clip: Arc<LiveClip>,
        frames: crate::limits::UserFrames,
    ) -> Option<UploadRegistration> {
        let mut s = self.lock();
        if s.closed || s.uploads.len() >= MAX_UPLINKS {
            return None;
        }
        s.uploads.insert(stream, Upload { clip, frames });
        Some(UploadRegistration {
            peer: self.clone(),
            stream,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PeerState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A packet that named this path: checked against the peer's rate,
    /// opened (authentic, not replayed); a Bind records its source address
    /// and is answered with a BindAck echoing its plaintext (never larger
    /// than the Bind: nothing to amplify).
    fn receive(&self, packet: &mut [u8], from: SocketAddr, now: Instant) -> Option<Vec<u8>> {
        let mut s = self.lock();
        if s.closed {
            return None;
        }
        if packet.first() == Some(&(PacketType::Uplink as u8)) {
            let elapsed = now
                .saturating_duration_since(s.uplink_refilled)
                .as_secs_f64();
            s.uplink_refilled = now;
            s.uplink_tokens = (s.uplink_tokens + elapsed * UPLINK_RATE).min(UPLINK_BURST);
            if s.uplink_tokens < 1.0 || s.uploads.is_empty() {
                return None;
            }
            s.uplink_tokens -= 1.0;
        } else {
            let elapsed = now.saturating_duration_since(s.refilled).as_secs_f64();
            s.refilled = now;
            s.tokens = (s.tokens + elapsed * PEER_RATE).min(PEER_BURST);
            if s.tokens < 1.0 {
                return None;
            }
            s.tokens -= 1.0;
        }
        if let Some(epoch) = s.crypto.wants_epoch(packet) {
            // The client moved to the next epoch: follow (the packet must
            // still authenticate under the new keys below).
            let material = export(&self.conn, epoch)?;
            s.crypto.rekey(epoch, &material);
        }
        let (header, plaintext) = match s.crypto.open(packet) {
            Ok(opened) => opened,
            Err(e) => {
                tracing::trace!(error = %e, %from, "media packet dropped");
                return None;
            }
        };
        if header.kind == PacketType::Uplink {
            let uplink = UplinkPayload::decode(plaintext).ok()?;
            let upload = s.uploads.get(&uplink.stream)?.clone();
            let frames: Vec<(u32, Bytes)> = uplink
                .frames
                .iter()
                .map(|(index, data)| (*index, Bytes::copy_from_slice(data)))
                .collect();
            // Not under this path's lock: the fan-out locks the members'.
            drop(s);
            // The oldest first: members get them in order where they can.
            for (index, data) in frames.into_iter().rev() {
                upload
                    .clip
                    .push_uplink(index, data, || upload.frames.frame(now).is_ok());
            }
            return None;
        }
        if header.kind != PacketType::Bind {
            return None;
        }
        let echo = plaintext.to_vec();
        if s.addr != Some(from) {
            tracing::debug!(%from, "media path bound");
        }
        s.addr = Some(from);
        s.last_bind = Some(now);
        let mut reply = Vec::with_capacity(MAX_PACKET_LEN);
        self.seal(&mut s, PacketType::BindAck, &echo, &mut reply)
            .ok()?;
        Some(reply)
    }

    /// Seals one packet, moving to the next epoch when the key is spent.
    fn seal(
        &self,
        s: &mut PeerState,
        kind: PacketType,
        plaintext: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), MediaError> {
        match s.crypto.seal(kind, plaintext, out) {
            Err(MediaError::KeyExhausted) => {
                let next = s.crypto.epoch().wrapping_add(1);
                let material = export(&self.conn, next).ok_or(MediaError::KeyExhausted)?;
                s.crypto.rekey(next, &material);
                s.crypto.seal(kind, plaintext, out)
            }
            other => other,
        }
    }
}

/// Delivers a live clip to a member on the media path: the header (flag
/// MEDIA) on a new clip stream, the frames the clip already had by UDP,
/// later frames by the talker's fan-out, and once the clip is stored its
/// `ClipEnd` on the stream. The task sleeps from the header to the end: it
/// is not woken per frame.
///
/// A header or end the member does not take within `max_stall` cuts the
/// delivery (`SlowReceiver`): the clip then comes from the store.
pub async fn deliver_live_media(
    conn: &Connection,
    clip: &Arc<LiveClip>,
    sink: &Sink,
    peer: &Arc<MediaPeer>,
    max_stall: Duration,
) -> Delivery {
    let Some(mut stream) = Guarded::open(conn, sink).await else {
        return Delivery::Failed;
    };
    let mut header = clip.header();
    header.flags |= sink.header_flags() | ClipHeader::FLAG_MEDIA;
    let header = ClipMessage::Header(header).to_bytes();
    // The frames go by UDP from now on, before the header is written: a
    // connection whose send window is full (a fetch under loss) can hold
    // the header for seconds, and the HeadedFrames carry it anyway.
    let frame = Duration::from_millis(u64::from(clip.meta.frame_ms.max(10)));
    let target = MediaTarget::new(
        peer.clone(),
        stream.quic_id().into(),
        header.clone(),
        sink.live_budget(),
        frame,
    );
    let registration = clip.add_media_target(target.clone());
    match tokio::time::timeout(max_stall, stream.write_chunk(header)).await {
        Ok(Ok(())) => {}
        Ok(Err(_)) => return Delivery::Failed,
        Err(_) => {
            stream
                .reset(ptt_protocol::ErrorCode::SlowReceiver.code())
                .ok();
            return Delivery::Cut;
        }
    }
    let state = clip.finished().await;
    drop(registration);
    match state {
        ClipState::Ended { seq, waveform } => {
            // The frames the member's packet still held go before the end.
            flush(&target);
            let end = end_message(clip.frame_count() as u32, seq, waveform);
            sink.record(seq, &clip.meta);
            match tokio::time::timeout(max_stall, stream.write_chunk(end)).await {
                Ok(Ok(())) => match stream.finish() {
                    Ok(()) => Delivery::Complete,
                    Err(_) => Delivery::Failed,
                },
                Ok(Err(_)) => Delivery::Failed,
                Err(_) => {
                    stream
                        .reset(ptt_protocol::ErrorCode::SlowReceiver.code())
                        .ok();
                    Delivery::Cut
                }
            }
        }
        ClipState::Aborted(code) => {
            stream.reset(code.code()).ok();
            Delivery::Aborted
        }
        ClipState::Live => Delivery::Aborted,
    }
}

/// The exporter's 56 bytes for `epoch` (label [`EXPORTER_LABEL`], context
/// the epoch big-endian).
fn export(conn: &Connection, epoch: u32) -> Option<[u8; KEY_MATERIAL_LEN]> {
    let mut material = [0u8; KEY_MATERIAL_LEN];
    conn.export_keying_material(&mut material, EXPORTER_LABEL, &MediaKeys::context(epoch))
        .ok()?;
    Some(material)
}

fn random_u64() -> Option<u64> {
    use ring::rand::{SecureRandom, SystemRandom};
    let mut b = [0u8; 8];
    SystemRandom::new().fill(&mut b).ok()?;
    Some(u64::from_be_bytes(b))
}
