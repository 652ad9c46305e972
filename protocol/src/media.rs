//! The UDP media path (PROTOCOL.md, section 14): live voice frames from the
//! relay to a native client in plain UDP datagrams, sealed with AES-128-GCM
//! under keys both ends export from their QUIC connection's TLS session.
//!
//! The QUIC connection stays the source of truth: a member on the media path
//! still gets every clip's `ClipHeader` and `ClipEnd` on a live clip stream
//! (flag [`crate::ClipHeader::FLAG_MEDIA`]), and fetches a clip whose frames
//! did not all arrive. UDP only makes live frames cheap to send and lets a
//! lost one be lost instead of holding every later frame back.
//!
//! This module holds the bytes and the state, no socket:
//!
//! - [`MediaMessage`]: the control messages (`0x60..=0x67`) that negotiate
//!   the path on the control stream.
//! - [`PacketHeader`], [`PacketType`]: the 18-byte clear header of every
//!   packet, which is also the AEAD's associated data.
//! - [`MediaKeys`]: the two directions' keys from the 56 bytes of the TLS
//!   exporter; [`DirectionKey::seal`] and [`DirectionKey::open`].
//! - [`ReplayWindow`]: the 64-packet sliding window of RFC 4303 / RFC 6479.
//! - [`MediaCrypto`]: one end's keys by epoch, send counter and replay
//!   windows, as both the relay and the client keep them.
//! - [`FramePayload`]: what a `Frame` packet carries.
//! - [`UplinkPayload`]: what an `Uplink` packet carries: the newest frame
//!   of an upload and up to two before it (redundancy against loss).
//! - [`HeadedFramePayload`]: a `HeadedFrame`, a frame with its clip's
//!   header, playable before the clip stream's `ClipHeader` arrives.
//! - [`FramesPayload`]: a `Frames` packet, several frames of one delivery
//!   together (and, for its first packets, the clip's header): how the
//!   relay coalesces a notes group's live frames by its latency budget,
//!   for clients that announced [`FEATURE_FRAMES`].
//!
//! No cryptography is ours: the AEAD is `ring`'s, the keys come from the
//! TLS 1.3 exporter (RFC 8446, section 7.5), the nonce is built as TLS 1.3
//! builds it (RFC 8446, section 5.3).

use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use ring::aead::{AES_128_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};

use crate::coding::{get_array, get_varint, get_varint_u32, put_varint};
use crate::error::DecodeError;
use crate::message::request;
use crate::{ClipHeader, ClipMessage};

/// Message type numbers of this module (control stream).
pub mod kind {
    #![allow(missing_docs)]
    /// Client → relay: `0x60..=0x63`.
    pub const MEDIA_OPEN: u64 = 0x60;
    pub const MEDIA_CLOSE: u64 = 0x61;
    /// Relay → client: `0x64..=0x67`.
    pub const MEDIA_OFFER: u64 = 0x64;
}

/// Whether `kind` is one of this module's control message types.
pub fn is_media_kind(kind: u64) -> bool {
    (0x60..=0x67).contains(&kind)
}

/// The TLS exporter label both ends pass to `export_keying_material`.
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-ptt-media";
/// Bytes exported per epoch: relay → client key and IV, then client →
/// relay key and IV.
pub const KEY_MATERIAL_LEN: usize = 2 * (KEY_LEN + IV_LEN);
/// AES-128 key length.
pub const KEY_LEN: usize = 16;
/// IV length (the AEAD nonce length).
pub const IV_LEN: usize = NONCE_LEN;
/// The GCM tag appended to every ciphertext.
pub const TAG_LEN: usize = 16;
/// The clear header: type (1), conn_id (8), epoch (1), counter (8).
pub const HEADER_LEN: usize = 18;
/// Largest packet either end sends or accepts; anything longer is dropped.
/// Fits the 1,280-byte IPv6 minimum MTU with IP and UDP headers.
pub const MAX_PACKET_LEN: usize = 1200;
/// Largest plaintext a packet can carry.
pub const MAX_PLAINTEXT_LEN: usize = MAX_PACKET_LEN - HEADER_LEN - TAG_LEN;
/// Packets a sender seals under one key before it moves to the next epoch:
/// the AES-GCM confidentiality limit QUIC uses (RFC 9001, section 6.6).
pub const REKEY_AFTER: u64 = 1 << 23;
/// How often a client sends `Bind` (NAT keepalive), and at once after its
/// local address changed.
pub const BIND_INTERVAL: Duration = Duration::from_secs(15);
/// A media path without an authenticated `Bind` for this long is unbound:
/// the relay sends that member's frames on streams again.
pub const BIND_TIMEOUT: Duration = Duration::from_secs(45);
/// Width of the replay window, in packets.
pub const REPLAY_WINDOW: u64 = 64;
/// How many of the frame packets of one live delivery the relay sends as
/// [`PacketType::HeadedFrame`] (with the clip's header) before plain
/// `Frame`s: at 15 % loss the chance that all 16 are lost is 10⁻¹³.
pub const HEADED_FRAMES: u32 = 16;
/// Most frames one `Uplink` packet carries: the newest and the two before
/// it, so a frame is lost on the uplink only when three packets in a row
/// are (0.3 % at 15 % loss, against 15 % without).
pub const UPLINK_REDUNDANCY: usize = 3;
/// How far ahead of the frames its upload stream has delivered an
/// `Uplink` frame may be: further ahead, it is dropped unread. 250 frames,
/// five seconds of 20 ms frames: under 15 % loss a QUIC stream can be
/// seconds behind the datagrams, and those are the frames the uplink is
/// for. It bounds what the relay keeps per upload (at most 250 frames,
/// until the stream's copies replace them).
pub const UPLINK_AHEAD: u32 = 250;
/// Most frames one `Frames` packet carries (and no more than fit in
/// [`MAX_PLAINTEXT_LEN`]).
pub const MAX_FRAMES_PER_PACKET: usize = 16;
/// `MediaOpen`'s and `MediaOffer`'s `features` bit: the client accepts
/// [`PacketType::Frames`] packets; the relay will send them.
pub const FEATURE_FRAMES: u64 = 0x01;
/// Every `features` bit this version knows.
pub const FEATURES: u64 = FEATURE_FRAMES;

/// A control message of the media path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MediaMessage {
    /// Ask for the media path (native clients, after Welcome).
    Open {
        /// Echoed in the answer.
        request_id: u64,
        /// What the client's media path understands beyond PROTOCOL.md
        /// §14's first version ([`FEATURE_FRAMES`]); a `MediaOpen` without
        /// the field has none (0).
        features: u64,
    },
    /// Stop using the media path: live frames come on streams again.
    /// Answered `Ok`.
    Close {
        /// Echoed in the answer.
        request_id: u64,
    },
    /// The relay's answer to `Open`: where to bind and with what.
    Offer {
        /// The `Open`'s request id.
        request_id: u64,
        /// The relay's media UDP port, on the address the QUIC connection
        /// goes to.
        port: u16,
        /// Names this connection's media path in every packet.
        conn_id: u64,
        /// The first key epoch (the exporter's context).
        epoch: u32,
        /// The features of the `Open` the relay will use (a subset of
        /// them).
        features: u64,
    },
}

impl MediaMessage {
    /// The message's type number.
    pub fn kind(&self) -> u64 {
        match self {
            MediaMessage::Open { .. } => kind::MEDIA_OPEN,
            MediaMessage::Close { .. } => kind::MEDIA_CLOSE,
            MediaMessage::Offer { .. } => kind::MEDIA_OFFER,
        }
    }

    /// Whether clients send this message (the relay sends the others).
    pub fn is_request(&self) -> bool {
        self.kind() < 0x64
    }

    /// Appends the payload (without type and length).
    pub(crate) fn encode_payload(&self, p: &mut BytesMut) {
        match self {
            MediaMessage::Open {
                request_id,
                features,
            } => {
                put_varint(p, *request_id);
                put_varint(p, *features);
            }
            MediaMessage::Close { request_id } => put_varint(p, *request_id),
            MediaMessage::Offer {
                request_id,
                port,
                conn_id,
                epoch,
                features,
            } => {
                put_varint(p, *request_id);
                put_varint(p, u64::from(*port));
                p.put_u64(*conn_id);
                put_varint(p, u64::from(*epoch));
                put_varint(p, *features);
            }
        }
    }

    /// Decodes the payload of a message of type `k` (`None`: a type of the
    /// range this version does not know).
    pub(crate) fn decode_fields(k: u64, p: &mut Bytes) -> Result<Option<Self>, DecodeError> {
        Ok(Some(match k {
            kind::MEDIA_OPEN => MediaMessage::Open {
                request_id: get_varint(p)?,
                features: optional_varint(p)?,
            },
            kind::MEDIA_CLOSE => MediaMessage::Close {
                request_id: get_varint(p)?,
            },
            kind::MEDIA_OFFER => request(p, |request_id, p| {
                let port = get_varint(p)?;
                let port = u16::try_from(port).map_err(|_| DecodeError::OutOfRange {
                    field: "port",
                    value: port,
                })?;
                Ok(MediaMessage::Offer {
                    request_id,
                    port,
                    conn_id: u64::from_be_bytes(get_array(p)?),
                    epoch: get_varint_u32(p, "epoch")?,
                    features: optional_varint(p)?,
                })
            })?,
            _ => return Ok(None),
        }))
    }
}

/// A field added after the first version of section 14: absent (the
/// payload ends before it, as a peer of that version sends it) reads as 0.
fn optional_varint(p: &mut Bytes) -> Result<u64, DecodeError> {
    if p.has_remaining() {
        get_varint(p)
    } else {
        Ok(0)
    }
}

/// What a media packet is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum PacketType {
    /// Client → relay: "this address is mine" (and a NAT keepalive).
    Bind = 0x01,
    /// Relay → client: the answer to an authenticated `Bind`.
    BindAck = 0x02,
    /// Relay → client: one live voice frame ([`FramePayload`]).
    Frame = 0x03,
    /// Client → relay: the newest frame of the talker's upload and up to
    /// [`UPLINK_REDUNDANCY`]` - 1` before it, sent beside their copies on
    /// the upload stream ([`UplinkPayload`]).
    Uplink = 0x04,
    /// Relay → client: a live frame with its clip's header
    /// ([`HeadedFramePayload`]), the first [`HEADED_FRAMES`] of each
    /// delivery.
    HeadedFrame = 0x05,
    /// Relay → client, to clients that announced [`FEATURE_FRAMES`]:
    /// several live frames of one delivery ([`FramesPayload`]).
    Frames = 0x06,
}

impl PacketType {
    /// The type for its wire byte.
    pub fn from_u8(v: u8) -> Option<PacketType> {
        match v {
            0x01 => Some(PacketType::Bind),
            0x02 => Some(PacketType::BindAck),
            0x03 => Some(PacketType::Frame),
            0x04 => Some(PacketType::Uplink),
            0x05 => Some(PacketType::HeadedFrame),
            0x06 => Some(PacketType::Frames),
            _ => None,
        }
    }

    /// Whether the relay sends this type (with the relay → client key).
    pub fn from_relay(self) -> bool {
        !matches!(self, PacketType::Bind | PacketType::Uplink)
    }
}

/// The clear header of a media packet, authenticated as the AEAD's
/// associated data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PacketHeader {
    /// The packet type.
    pub kind: PacketType,
    /// The connection's media id from `MediaOffer`.
    pub conn_id: u64,
    /// The key epoch, modulo 256.
    pub epoch: u8,
    /// Per direction and epoch, from 0, strictly increasing.
    pub counter: u64,
}

/// Why a media packet was dropped. No error is answered: an unauthenticated
/// packet gets no reply (no amplification, nothing to probe).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MediaError {
    /// Shorter than a header and a tag, or longer than [`MAX_PACKET_LEN`].
    #[error("packet of {0} bytes")]
    BadLength(usize),
    /// An unknown packet type.
    #[error("unknown packet type {0:#x}")]
    UnknownType(u8),
    /// The type travels in the other direction.
    #[error("packet type from the wrong side")]
    WrongDirection,
    /// Not this connection's id.
    #[error("unknown connection id")]
    UnknownConnection,
    /// An epoch this end holds no key for.
    #[error("unknown key epoch {0}")]
    UnknownEpoch(u8),
    /// The counter was seen before or is older than the window.
    #[error("replayed or too old")]
    Replayed,
    /// The tag did not verify.
    #[error("authentication failed")]
    Unauthentic,
    /// The plaintext would make a packet longer than [`MAX_PACKET_LEN`].
    #[error("plaintext of {0} bytes is too large")]
    TooLarge(usize),
    /// The key sealed [`REKEY_AFTER`] packets: move to the next epoch.
    #[error("key exhausted, rekey first")]
    KeyExhausted,
    /// A frame's plaintext is malformed.
    #[error("malformed frame payload")]
    BadPayload,
}

impl PacketHeader {
    /// The header's bytes.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0] = self.kind as u8;
        b[1..9].copy_from_slice(&self.conn_id.to_be_bytes());
        b[9] = self.epoch;
        b[10..18].copy_from_slice(&self.counter.to_be_bytes());
        b
    }

    /// Reads the header of `packet`, checking only its length and type.
    pub fn decode(packet: &[u8]) -> Result<PacketHeader, MediaError> {
        if packet.len() < HEADER_LEN + TAG_LEN || packet.len() > MAX_PACKET_LEN {
            return Err(MediaError::BadLength(packet.len()));
        }
        let kind = PacketType::from_u8(packet[0]).ok_or(MediaError::UnknownType(packet[0]))?;
        let mut rest = &packet[1..HEADER_LEN];
        let conn_id = rest.get_u64();
        let epoch = rest.get_u8();
        let counter = rest.get_u64();
        Ok(PacketHeader {
            kind,
            conn_id,
            epoch,
            counter,
        })
    }
}

/// One direction's AEAD key and IV.
pub struct DirectionKey {
    key: LessSafeKey,
    iv: [u8; IV_LEN],
}

impl std::fmt::Debug for DirectionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DirectionKey(..)")
    }
}

impl DirectionKey {
    /// A key from its 16 bytes and its 12-byte IV.
    pub fn new(key: &[u8; KEY_LEN], iv: [u8; IV_LEN]) -> DirectionKey {
        let key = UnboundKey::new(&AES_128_GCM, key).expect("16 bytes is an AES-128 key");
        DirectionKey {
            key: LessSafeKey::new(key),
            iv,
        }
    }

    /// The nonce of packet `counter`: the IV with the counter, big-endian,
    /// XORed into its last 8 bytes (as TLS 1.3's per-record nonce).
    fn nonce(&self, counter: u64) -> Nonce {
        let mut n = self.iv;
        for (b, c) in n[IV_LEN - 8..].iter_mut().zip(counter.to_be_bytes()) {
            *b ^= c;
        }
        Nonce::assume_unique_for_key(n)
    }

    /// Appends the packet `header | AES-128-GCM(plaintext) | tag` to `out`.
    pub fn seal(
        &self,
        header: &PacketHeader,
        plaintext: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), MediaError> {
        if plaintext.len() > MAX_PLAINTEXT_LEN {
            return Err(MediaError::TooLarge(plaintext.len()));
        }
        let head = header.to_bytes();
        let start = out.len();
        out.extend_from_slice(&head);
        out.extend_from_slice(plaintext);
        let tag = self
            .key
            .seal_in_place_separate_tag(
                self.nonce(header.counter),
                Aad::from(head),
                &mut out[start + HEADER_LEN..],
            )
            .map_err(|_| MediaError::TooLarge(plaintext.len()))?;
        out.extend_from_slice(tag.as_ref());
        Ok(())
    }

    /// Decrypts `packet` (header included) in place; the plaintext.
    pub fn open<'a>(
        &self,
        header: &PacketHeader,
        packet: &'a mut [u8],
    ) -> Result<&'a mut [u8], MediaError> {
        let (head, body) = packet.split_at_mut(HEADER_LEN);
        self.key
            .open_in_place(self.nonce(header.counter), Aad::from(&*head), body)
            .map_err(|_| MediaError::Unauthentic)
    }
}

/// Both directions' keys of one epoch.
#[derive(Debug)]
pub struct MediaKeys {
    /// Seals what the relay sends.
    pub relay_to_client: DirectionKey,
    /// Seals what the client sends.
    pub client_to_relay: DirectionKey,
}

impl MediaKeys {
    /// The exporter's `context` for `epoch`: its 4 bytes, big-endian.
    pub fn context(epoch: u32) -> [u8; 4] {
        epoch.to_be_bytes()
    }

    /// Splits the exporter's 56 bytes: relay → client key (16) and IV (12),
    /// then client → relay key (16) and IV (12).
    pub fn from_exporter(material: &[u8; KEY_MATERIAL_LEN]) -> MediaKeys {
        let part = |at: usize| {
            let key: [u8; KEY_LEN] = material[at..at + KEY_LEN].try_into().expect("16 bytes");
            let iv: [u8; IV_LEN] = material[at + KEY_LEN..at + KEY_LEN + IV_LEN]
                .try_into()
                .expect("12 bytes");
            DirectionKey::new(&key, iv)
        };
        MediaKeys {
            relay_to_client: part(0),
            client_to_relay: part(KEY_LEN + IV_LEN),
        }
    }
}

/// The anti-replay window of RFC 4303 (section 3.4.3) with a 64-bit bitmap:
/// a counter is new if it is above the highest seen, or within the 64 below
/// it and not yet seen. Checked before decryption, updated only after the
/// packet authenticated, so a forged packet cannot move it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplayWindow {
    /// The highest counter accepted, plus one (0: none yet).
    top: u64,
    /// Bit `i`: counter `top - 1 - i` was accepted.
    seen: u64,
}

impl ReplayWindow {
    /// Whether `counter` would be accepted.
    pub fn check(&self, counter: u64) -> bool {
        if counter >= self.top {
            return true;
        }
        let behind = self.top - 1 - counter;
        behind < REPLAY_WINDOW && self.seen & (1 << behind) == 0
    }

    /// Records `counter` as accepted (after [`check`](Self::check) and
    /// authentication).
    pub fn accept(&mut self, counter: u64) {
        if counter >= self.top {
            let shift = counter + 1 - self.top;
            self.seen = if shift >= REPLAY_WINDOW {
                0
            } else {
                self.seen << shift
            };
            self.seen |= 1;
            self.top = counter + 1;
        } else {
            self.seen |= 1 << (self.top - 1 - counter);
        }
    }
}

/// Which end a [`MediaCrypto`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Seals with the relay → client key, opens client → relay packets.
    Relay,
    /// Seals with the client → relay key, opens relay → client packets.
    Client,
}

#[derive(Debug)]
struct Epoch {
    epoch: u32,
    keys: MediaKeys,
    window: ReplayWindow,
}

/// One end's media crypto state: the current epoch's keys and send counter,
/// the previous epoch's keys for packets still in flight, a replay window
/// per epoch. Sans-IO: the caller exports keying material from its TLS
/// session (label [`EXPORTER_LABEL`], context [`MediaKeys::context`]) when
/// [`MediaCrypto::wants_epoch`] or [`MediaError::KeyExhausted`] asks.
#[derive(Debug)]
pub struct MediaCrypto {
    side: Side,
    conn_id: u64,
    current: Epoch,
    previous: Option<Epoch>,
    /// Next counter to seal with in the current epoch.
    sent: u64,
    /// Packets sealed per key before [`MediaError::KeyExhausted`].
    rekey_after: u64,
}

impl MediaCrypto {
    /// State for `side` of connection `conn_id`, starting at `epoch` with
    /// the exporter's output for it.
    pub fn new(
        side: Side,
        conn_id: u64,
        epoch: u32,
        material: &[u8; KEY_MATERIAL_LEN],
    ) -> MediaCrypto {
        MediaCrypto {
            side,
            conn_id,
            current: Epoch {
                epoch,
                keys: MediaKeys::from_exporter(material),
                window: ReplayWindow::default(),
            },
            previous: None,
            sent: 0,
            rekey_after: REKEY_AFTER,
        }
    }

    /// Lowers the per-key packet limit (tests of rekeying).
    pub fn with_rekey_after(mut self, packets: u64) -> MediaCrypto {
        self.rekey_after = packets.max(1);
        self
    }

    /// The connection's media id.
    pub fn conn_id(&self) -> u64 {
        self.conn_id
    }

    /// The current epoch.
    pub fn epoch(&self) -> u32 {
        self.current.epoch
    }

    /// Moves to `epoch` (the current one + 1) with its exported material:
    /// seals from now on with its keys, from counter 0; keeps the current
    /// keys to open packets still in flight.
    pub fn rekey(&mut self, epoch: u32, material: &[u8; KEY_MATERIAL_LEN]) {
        let next = Epoch {
            epoch,
            keys: MediaKeys::from_exporter(material),
            window: ReplayWindow::default(),
        };
        self.previous = Some(std::mem::replace(&mut self.current, next));
        self.sent = 0;
    }

    /// Appends a sealed packet of type `kind` to `out`.
    pub fn seal(
        &mut self,
        kind: PacketType,
        plaintext: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), MediaError> {
        if self.sent >= self.rekey_after {
            return Err(MediaError::KeyExhausted);
        }
        let header = PacketHeader {
            kind,
            conn_id: self.conn_id,
            epoch: self.current.epoch as u8,
            counter: self.sent,
        };
        let key = match self.side {
            Side::Relay => &self.current.keys.relay_to_client,
            Side::Client => &self.current.keys.client_to_relay,
        };
        key.seal(&header, plaintext, out)?;
        self.sent += 1;
        Ok(())
    }

    /// The epoch a packet names if it is the next one this end has no key
    /// for yet (the peer moved on): export its material and
    /// [`rekey`](Self::rekey), then open the packet.
    pub fn wants_epoch(&self, packet: &[u8]) -> Option<u32> {
        let header = PacketHeader::decode(packet).ok()?;
        let next = self.current.epoch.wrapping_add(1);
        (header.conn_id == self.conn_id && header.epoch == next as u8).then_some(next)
    }

    /// Checks, authenticates and decrypts a packet from the peer in place:
    /// its header and plaintext. Drops (an error, no state change) anything
    /// of the wrong length, type, direction or connection, of an unknown
    /// epoch, replayed, or not authentic.
    pub fn open<'a>(
        &mut self,
        packet: &'a mut [u8],
    ) -> Result<(PacketHeader, &'a mut [u8]), MediaError> {
        let header = PacketHeader::decode(packet)?;
        if header.kind.from_relay() != (self.side == Side::Client) {
            return Err(MediaError::WrongDirection);
        }
        if header.conn_id != self.conn_id {
            return Err(MediaError::UnknownConnection);
        }
        let epoch = if header.epoch == self.current.epoch as u8 {
            &mut self.current
        } else {
            match &mut self.previous {
                Some(p) if header.epoch == p.epoch as u8 => p,
                _ => return Err(MediaError::UnknownEpoch(header.epoch)),
            }
        };
        if !epoch.window.check(header.counter) {
            return Err(MediaError::Replayed);
        }
        let key = match self.side {
            Side::Relay => &epoch.keys.client_to_relay,
            Side::Client => &epoch.keys.relay_to_client,
        };
        let plaintext = key.open(&header, packet)?;
        epoch.window.accept(header.counter);
        Ok((header, plaintext))
    }
}

/// What a `Frame` packet carries: the live clip stream it belongs to, the
/// frame's index in the clip, and the Opus packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FramePayload<'a> {
    /// The QUIC stream id of the relay-initiated unidirectional stream that
    /// carries this clip's `ClipHeader` to this client.
    pub stream: u64,
    /// The frame's index in the clip.
    pub index: u32,
    /// The Opus packet.
    pub data: &'a [u8],
}

impl<'a> FramePayload<'a> {
    /// Appends `stream (varint) | index (varint) | data`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        put_varint(out, self.stream);
        put_varint(out, u64::from(self.index));
        out.extend_from_slice(self.data);
    }

    /// Reads a frame payload (the Opus packet is the rest).
    pub fn decode(mut plaintext: &'a [u8]) -> Result<FramePayload<'a>, MediaError> {
        let stream = get_varint(&mut plaintext).map_err(|_| MediaError::BadPayload)?;
        let index = get_varint(&mut plaintext).map_err(|_| MediaError::BadPayload)?;
        let index = u32::try_from(index).map_err(|_| MediaError::BadPayload)?;
        Ok(FramePayload {
            stream,
            index,
            data: plaintext,
        })
    }
}

/// What an `Uplink` packet carries: the upload stream it belongs to, then
/// 1 to [`UPLINK_REDUNDANCY`] frames, the newest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UplinkPayload<'a> {
    /// The QUIC id of the client-initiated unidirectional stream that
    /// uploads the clip.
    pub stream: u64,
    /// `(index, Opus packet)`, the newest first.
    pub frames: Vec<(u32, &'a [u8])>,
}

impl<'a> UplinkPayload<'a> {
    /// Appends `stream (varint) | count (u8) | count × (index (varint) |
    /// length (varint) | data)`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        put_varint(out, self.stream);
        out.push(self.frames.len() as u8);
        for (index, data) in &self.frames {
            put_varint(out, u64::from(*index));
            put_varint(out, data.len() as u64);
            out.extend_from_slice(data);
        }
    }

    /// Reads an uplink payload: 1 to [`UPLINK_REDUNDANCY`] frames, nothing
    /// after the last.
    pub fn decode(mut plaintext: &'a [u8]) -> Result<UplinkPayload<'a>, MediaError> {
        let bad = |_| MediaError::BadPayload;
        let stream = get_varint(&mut plaintext).map_err(bad)?;
        let frames = read_frames(plaintext, UPLINK_REDUNDANCY)?;
        Ok(UplinkPayload { stream, frames })
    }
}

/// `count (u8) | count × (index (varint) | length (varint) | data)`, with
/// 1 to `max` frames and nothing after the last: the frame list of `Uplink`
/// and `Frames` packets.
fn read_frames(mut plaintext: &[u8], max: usize) -> Result<Vec<(u32, &[u8])>, MediaError> {
    let bad = |_| MediaError::BadPayload;
    let (&count, rest) = plaintext.split_first().ok_or(MediaError::BadPayload)?;
    plaintext = rest;
    if count == 0 || usize::from(count) > max {
        return Err(MediaError::BadPayload);
    }
    let mut frames = Vec::with_capacity(usize::from(count));
    for _ in 0..count {
        let index = get_varint(&mut plaintext).map_err(bad)?;
        let index = u32::try_from(index).map_err(|_| MediaError::BadPayload)?;
        let len = get_varint(&mut plaintext).map_err(bad)?;
        if len > plaintext.len() as u64 {
            return Err(MediaError::BadPayload);
        }
        let (data, rest) = plaintext.split_at(len as usize);
        frames.push((index, data));
        plaintext = rest;
    }
    if !plaintext.is_empty() {
        return Err(MediaError::BadPayload);
    }
    Ok(frames)
}

/// A framed `ClipHeader` message (type, length, payload) at the start of
/// `plaintext`, which moves past it.
fn read_header(plaintext: &mut &[u8]) -> Result<ClipHeader, MediaError> {
    let bad = |_| MediaError::BadPayload;
    let kind = get_varint(plaintext).map_err(bad)?;
    let len = get_varint(plaintext).map_err(bad)?;
    if kind != crate::message::kind::CLIP_HEADER || len > plaintext.len() as u64 {
        return Err(MediaError::BadPayload);
    }
    let (payload, rest) = plaintext.split_at(len as usize);
    *plaintext = rest;
    match ClipMessage::decode(kind, Bytes::copy_from_slice(payload)) {
        Ok(ClipMessage::Header(header)) => Ok(header),
        _ => Err(MediaError::BadPayload),
    }
}

/// What a `HeadedFrame` packet carries: a [`FramePayload`]'s stream and
/// index, the clip's `ClipHeader` message as the clip stream carries it
/// (type, length, payload), then the Opus packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeadedFramePayload<'a> {
    /// The QUIC id of the member's live clip stream (as in `Frame`).
    pub stream: u64,
    /// The frame's index in the clip.
    pub index: u32,
    /// The clip's header, as its stream's `ClipHeader` says it (flag MEDIA,
    /// `seq` 0).
    pub header: ClipHeader,
    /// The Opus packet.
    pub data: &'a [u8],
}

impl<'a> HeadedFramePayload<'a> {
    /// Appends `stream | index | ClipHeader message | data`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        put_varint(out, self.stream);
        put_varint(out, u64::from(self.index));
        Self::encode_header(&self.header, out);
        out.extend_from_slice(self.data);
    }

    /// The header part alone: the framed `ClipHeader` message (computed
    /// once per delivery, then [`encode_with`](Self::encode_with)).
    pub fn encode_header(header: &ClipHeader, out: &mut Vec<u8>) {
        out.extend_from_slice(&ClipMessage::Header(header.clone()).to_bytes());
    }

    /// Appends a payload whose header is given already framed
    /// ([`encode_header`](Self::encode_header)).
    pub fn encode_with(
        stream: u64,
        index: u32,
        framed_header: &[u8],
        data: &[u8],
        out: &mut Vec<u8>,
    ) {
        put_varint(out, stream);
        put_varint(out, u64::from(index));
        out.extend_from_slice(framed_header);
        out.extend_from_slice(data);
    }

    /// Reads a headed frame; the header must be a well-formed `ClipHeader`
    /// message (the rest of the packet is the Opus packet).
    pub fn decode(mut plaintext: &'a [u8]) -> Result<HeadedFramePayload<'a>, MediaError> {
        let bad = |_| MediaError::BadPayload;
        let stream = get_varint(&mut plaintext).map_err(bad)?;
        let index = get_varint(&mut plaintext).map_err(bad)?;
        let index = u32::try_from(index).map_err(|_| MediaError::BadPayload)?;
        let header = read_header(&mut plaintext)?;
        Ok(HeadedFramePayload {
            stream,
            index,
            header,
            data: plaintext,
        })
    }
}

/// What a `Frames` packet carries: the member's live clip stream (as in
/// `Frame`), optionally the clip's `ClipHeader` message (as in
/// `HeadedFrame`), and 1 to [`MAX_FRAMES_PER_PACKET`] frames in index
/// order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FramesPayload<'a> {
    /// The QUIC id of the member's live clip stream.
    pub stream: u64,
    /// The clip's header (the first [`HEADED_FRAMES`] packets of a
    /// delivery carry it).
    pub header: Option<ClipHeader>,
    /// `(index, Opus packet)`, in index order.
    pub frames: Vec<(u32, &'a [u8])>,
}

impl<'a> FramesPayload<'a> {
    /// `flags` bit: a framed `ClipHeader` message follows the flags.
    pub const FLAG_HEADER: u8 = 0x01;

    /// Appends `stream (varint) | flags (u8) | [ClipHeader message] | count
    /// (u8) | count × (index (varint) | length (varint) | data)`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let framed = self
            .header
            .as_ref()
            .map(|h| ClipMessage::Header(h.clone()).to_bytes());
        Self::encode_with(
            self.stream,
            framed.as_deref(),
            self.frames.iter().map(|(i, d)| (*i, *d)),
            out,
        );
    }

    /// The bytes [`encode_with`](Self::encode_with) appends for these
    /// frames: to check a packet's size before sealing it.
    pub fn encoded_len(stream: u64, framed_header: Option<&[u8]>, frame_lens: usize) -> usize {
        crate::coding::varint_len(stream) + 2 + framed_header.map_or(0, <[u8]>::len) + frame_lens
    }

    /// One frame's share of [`encoded_len`](Self::encoded_len).
    pub fn frame_len(index: u32, data: &[u8]) -> usize {
        crate::coding::varint_len(u64::from(index))
            + crate::coding::varint_len(data.len() as u64)
            + data.len()
    }

    /// Appends a payload whose header, if any, is given already framed
    /// ([`HeadedFramePayload::encode_header`]). At most
    /// [`MAX_FRAMES_PER_PACKET`] frames (the caller's to check, as the
    /// size).
    pub fn encode_with<'d>(
        stream: u64,
        framed_header: Option<&[u8]>,
        frames: impl ExactSizeIterator<Item = (u32, &'d [u8])>,
        out: &mut Vec<u8>,
    ) {
        put_varint(out, stream);
        match framed_header {
            Some(header) => {
                out.push(Self::FLAG_HEADER);
                out.extend_from_slice(header);
            }
            None => out.push(0),
        }
        out.push(frames.len() as u8);
        for (index, data) in frames {
            put_varint(out, u64::from(index));
            put_varint(out, data.len() as u64);
            out.extend_from_slice(data);
        }
    }

    /// Reads a `Frames` payload: unknown flags, a header that is not a
    /// well-formed `ClipHeader` message, 0 or more than
    /// [`MAX_FRAMES_PER_PACKET`] frames, or bytes after the last frame are
    /// [`MediaError::BadPayload`].
    pub fn decode(mut plaintext: &'a [u8]) -> Result<FramesPayload<'a>, MediaError> {
        let bad = |_| MediaError::BadPayload;
        let stream = get_varint(&mut plaintext).map_err(bad)?;
        let (&flags, rest) = plaintext.split_first().ok_or(MediaError::BadPayload)?;
        plaintext = rest;
        if flags & !Self::FLAG_HEADER != 0 {
            return Err(MediaError::BadPayload);
        }
        let header = if flags & Self::FLAG_HEADER != 0 {
            Some(read_header(&mut plaintext)?)
        } else {
            None
        };
        let frames = read_frames(plaintext, MAX_FRAMES_PER_PACKET)?;
        Ok(FramesPayload {
            stream,
            header,
            frames,
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn material(seed: u8) -> [u8; KEY_MATERIAL_LEN] {
        std::array::from_fn(|i| seed.wrapping_add(i as u8))
    }

    fn pair() -> (MediaCrypto, MediaCrypto) {
        (
            MediaCrypto::new(Side::Relay, 7, 0, &material(1)),
            MediaCrypto::new(Side::Client, 7, 0, &material(1)),
        )
    }

    #[test]
    fn sealed_packets_open_once_and_forgeries_do_not() {
        let (mut relay, mut client) = pair();
        let mut out = Vec::new();
        relay.seal(PacketType::Frame, b"opus", &mut out).unwrap();
        let mut copy = out.clone();
        let (h, p) = client.open(&mut out).unwrap();
        assert_eq!(
            (h.kind, h.counter, &*p),
            (PacketType::Frame, 0, &b"opus"[..])
        );
        // The same packet again: replayed.
        assert_eq!(client.open(&mut copy).unwrap_err(), MediaError::Replayed);
        // A flipped byte anywhere (header or body): not authentic, and the
        // window did not move.
        for at in [0usize, 5, 9, 17, 18, 25] {
            let mut p = Vec::new();
            relay.seal(PacketType::Frame, b"opus-opus", &mut p).unwrap();
            let counter = PacketHeader::decode(&p).unwrap().counter;
            p[at] ^= 0x01;
            assert!(client.open(&mut p).is_err(), "flip at {at}");
            assert!(client.current.window.check(counter));
        }
        // A client's own packet type from the relay key: wrong direction.
        let mut bind = Vec::new();
        client.seal(PacketType::Bind, b"", &mut bind).unwrap();
        assert_eq!(
            client.open(&mut bind.clone()).unwrap_err(),
            MediaError::WrongDirection
        );
        assert!(relay.open(&mut bind).is_ok());
    }

    #[test]
    fn the_window_accepts_reordering_within_64_and_nothing_older() {
        let mut w = ReplayWindow::default();
        for c in [5u64, 3, 4, 70, 7, 69] {
            assert!(w.check(c), "{c}");
            w.accept(c);
        }
        // 70 is the top: 7 is 63 behind (inside), 6 is 64 behind (outside).
        for c in [5u64, 3, 70, 69, 7, 6] {
            assert!(!w.check(c), "{c}");
        }
        assert!(w.check(8) && w.check(68) && w.check(71));
        w.accept(200);
        assert!(!w.check(136) && w.check(137) && !w.check(200) && w.check(199));
    }

    #[test]
    fn a_rekeyed_sender_is_followed_and_old_packets_still_open() {
        let (relay, mut client) = pair();
        let mut relay = relay.with_rekey_after(2);
        let mut old = Vec::new();
        relay.seal(PacketType::Frame, b"a", &mut old).unwrap();
        relay
            .seal(PacketType::Frame, b"b", &mut Vec::new())
            .unwrap();
        assert_eq!(
            relay.seal(PacketType::Frame, b"c", &mut Vec::new()),
            Err(MediaError::KeyExhausted)
        );
        relay.rekey(1, &material(2));
        let mut new = Vec::new();
        relay.seal(PacketType::Frame, b"c", &mut new).unwrap();
        assert_eq!(client.wants_epoch(&new), Some(1));
        assert_eq!(
            client.open(&mut new.clone()),
            Err(MediaError::UnknownEpoch(1))
        );
        client.rekey(1, &material(2));
        assert_eq!(client.wants_epoch(&new), None);
        assert_eq!(&*client.open(&mut new).unwrap().1, b"c");
        assert_eq!(&*client.open(&mut old).unwrap().1, b"a");
    }

    #[test]
    fn lengths_are_bounded_both_ways() {
        let (mut relay, _) = pair();
        let mut out = Vec::new();
        assert_eq!(
            relay.seal(PacketType::Frame, &[0; MAX_PLAINTEXT_LEN + 1], &mut out),
            Err(MediaError::TooLarge(MAX_PLAINTEXT_LEN + 1))
        );
        relay
            .seal(PacketType::Frame, &[0; MAX_PLAINTEXT_LEN], &mut out)
            .unwrap();
        assert_eq!(out.len(), MAX_PACKET_LEN);
        assert!(PacketHeader::decode(&[1; HEADER_LEN + TAG_LEN - 1]).is_err());
        assert!(PacketHeader::decode(&[1; MAX_PACKET_LEN + 1]).is_err());
    }

    #[test]
    fn frame_payloads_round_trip() {
        let mut out = Vec::new();
        let f = FramePayload {
            stream: 7,
            index: 200,
            data: b"\x48\x0b",
        };
        f.encode(&mut out);
        assert_eq!(out, [0x07, 0x40, 0xc8, 0x48, 0x0b]);
        assert_eq!(FramePayload::decode(&out).unwrap(), f);
        assert!(FramePayload::decode(&[0x40]).is_err());
    }

    #[test]
    fn uplink_payloads_round_trip_and_are_bounded() {
        let u = UplinkPayload {
            stream: 2,
            frames: vec![(9, &b"\x48\x0b"[..]), (8, b"\x48"), (7, b"")],
        };
        let mut out = Vec::new();
        u.encode(&mut out);
        assert_eq!(
            out,
            [
                0x02, 0x03, 0x09, 0x02, 0x48, 0x0b, 0x08, 0x01, 0x48, 0x07, 0x00
            ]
        );
        assert_eq!(UplinkPayload::decode(&out).unwrap(), u);
        // No frame, four frames, a length past the end, a byte left over.
        assert!(UplinkPayload::decode(&[0x02, 0x00]).is_err());
        assert!(UplinkPayload::decode(&[0x02, 0x04, 0, 0, 1, 0, 2, 0, 3, 0]).is_err());
        assert!(UplinkPayload::decode(&[0x02, 0x01, 0x09, 0x03, 0x48]).is_err());
        assert!(UplinkPayload::decode(&[0x02, 0x01, 0x09, 0x00, 0x48]).is_err());
    }

    /// A live delivery's header, as HeadedFrame and Frames carry it.
    pub(crate) fn media_header() -> ClipHeader {
        ClipHeader {
            group: "ops".into(),
            clip_id: crate::ClipId::from_bytes([7; 16]),
            talker: "ana".into(),
            seq: 0,
            format: crate::ClipFormat::Opus,
            sample_rate: 48_000,
            channels: 1,
            frame_ms: 20,
            created_ms: 1_767_225_600_123,
            flags: ClipHeader::FLAG_MEDIA,
        }
    }

    #[test]
    fn headed_frames_round_trip_and_reject_a_bad_header() {
        let header = media_header();
        let f = HeadedFramePayload {
            stream: 3,
            index: 2,
            header: header.clone(),
            data: b"\x48\x0b",
        };
        let mut out = Vec::new();
        f.encode(&mut out);
        assert_eq!(HeadedFramePayload::decode(&out).unwrap(), f);
        let mut framed = Vec::new();
        HeadedFramePayload::encode_header(&header, &mut framed);
        let mut again = Vec::new();
        HeadedFramePayload::encode_with(3, 2, &framed, b"\x48\x0b", &mut again);
        assert_eq!(again, out);
        // Not a ClipHeader message, a length past the end, a cut header.
        let mut wrong = out.clone();
        wrong[2] = 0x39;
        assert!(HeadedFramePayload::decode(&wrong).is_err());
        let mut long = out.clone();
        long[3] = 0x3f;
        assert!(HeadedFramePayload::decode(&long).is_err());
        assert!(HeadedFramePayload::decode(&out[..10]).is_err());
    }

    #[test]
    fn frames_payloads_round_trip_and_are_bounded() {
        let header = media_header();
        for header in [None, Some(header)] {
            let f = FramesPayload {
                stream: 7,
                header,
                frames: vec![(4, &b"\x48\x0b"[..]), (5, &b"\x48"[..]), (6, &b""[..])],
            };
            let mut out = Vec::new();
            f.encode(&mut out);
            assert_eq!(FramesPayload::decode(&out).unwrap(), f);
            let framed = f
                .header
                .as_ref()
                .map(|h| ClipMessage::Header(h.clone()).to_bytes());
            let frame_lens: usize = f
                .frames
                .iter()
                .map(|(i, d)| FramesPayload::frame_len(*i, d))
                .sum();
            assert_eq!(
                FramesPayload::encoded_len(7, framed.as_deref(), frame_lens),
                out.len()
            );
            // Cut anywhere: malformed; a byte more: malformed.
            for end in 0..out.len() {
                assert!(FramesPayload::decode(&out[..end]).is_err(), "cut at {end}");
            }
            let mut longer = out.clone();
            longer.push(0);
            assert!(FramesPayload::decode(&longer).is_err());
        }
        // Unknown flags, no frames, more than the maximum.
        assert!(FramesPayload::decode(&[0x07, 0x02, 0x01, 0x00, 0x00]).is_err());
        assert!(FramesPayload::decode(&[0x07, 0x00, 0x00]).is_err());
        let mut many = vec![0x07, 0x00, MAX_FRAMES_PER_PACKET as u8 + 1];
        for i in 0..=MAX_FRAMES_PER_PACKET as u8 {
            many.extend_from_slice(&[i, 0]);
        }
        assert!(FramesPayload::decode(&many).is_err());
    }

    /// `features` came after the first version of section 14: a MediaOpen
    /// or MediaOffer without it reads as features 0.
    #[test]
    fn media_open_and_offer_without_features_read_as_none() {
        use crate::ControlMessage;
        let open = ControlMessage::Media(MediaMessage::Open {
            request_id: 40,
            features: FEATURE_FRAMES,
        });
        let bytes = open.to_bytes();
        // type 40 60, length 2, request id 40 (0x28), features 1.
        assert_eq!(&bytes[..], &[0x40, 0x60, 0x02, 0x28, 0x01]);
        let payload = Bytes::copy_from_slice(&bytes[3..]);
        assert_eq!(
            ControlMessage::decode(kind::MEDIA_OPEN, payload).unwrap(),
            open
        );
        // The first version's: request id 40 alone.
        let old = Bytes::from_static(&[0x28]);
        assert_eq!(
            ControlMessage::decode(kind::MEDIA_OPEN, old).unwrap(),
            ControlMessage::Media(MediaMessage::Open {
                request_id: 40,
                features: 0
            })
        );
    }
}
