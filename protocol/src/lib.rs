//! The push-to-talk wire protocol: message types, their encoding over
//! [`bytes`], and the session, clip and floor state machines.
//!
//! This crate does no I/O and has no async runtime: the relay and the client
//! library feed it bytes and time (`now: Instant`), and act on what it
//! returns. PROTOCOL.md at the repository root specifies the same format for
//! client writers in other languages.
//!
//! - [`stream::FrameDecoder`] cuts a QUIC stream into frames.
//! - [`reader::FramedReader`] reads frames and messages from any
//!   [`reader::ChunkSource`] (with the `quinn` feature, a
//!   `quinn::RecvStream`); every stream reader uses it.
//! - [`message`] holds every message and its encoding.
//! - [`clip::ClipReader`] checks one clip stream.
//! - [`floor::FloorState`] decides who may talk in a walkie group.
//! - [`session::SessionState`] enforces auth first and the clip limits.
//! - [`datagram`] holds what travels in QUIC datagrams: a member's
//!   [`LiveRead`] reports of how far it read a live clip.
//! - [`media`] holds the UDP media path: its negotiation, packet format,
//!   keys from the TLS exporter and replay window.

pub mod channel;
pub mod clip;
pub mod coding;
pub mod datagram;
pub mod error;
pub mod floor;
pub mod ids;
pub mod media;
pub mod message;
pub mod reader;
pub mod session;
pub mod stream;

pub use channel::{ChannelCounts, ChannelLimits, ChannelMessage, Role};
pub use clip::{ClipError, ClipEvent, ClipLimits, ClipReader};
pub use datagram::{LIVE_READ_BUFFER, LIVE_READ_INTERVAL, LiveRead, live_reads};
pub use error::{DecodeError, ErrorCode};
pub use floor::{FloorDecision, FloorHolder, FloorState};
pub use ids::{ClipId, GroupMode, is_valid_id};
pub use media::{MediaCrypto, MediaMessage};
pub use message::{
    ClipFormat, ClipHeader, ClipMessage, ClipSummary, ControlMessage, GroupSummary, Limits,
    MemberState, PROTOCOL_VERSION, ReceiptKind, Welcome,
};
pub use reader::{ChunkSource, FramedReader, ReadError};
pub use session::{SessionLimits, SessionPhase, SessionState};
pub use stream::{Frame, FrameDecoder};

/// The ALPN protocol identifier negotiated in the TLS handshake.
pub const ALPN: &[u8] = b"ptt/1";

/// Voice frames may go unacknowledged this many at a time: each end asks
/// its peer for this with the QUIC ACK frequency extension
/// (draft-ietf-quic-ack-frequency). Frames arrive every 20 ms, so the
/// default (an ACK for every second packet) costs each listening phone 25
/// ACK packets a second, and the relay as many to receive. Loss is still
/// reported at once: a gap triggers an immediate ACK.
pub const ACK_ELICITING_THRESHOLD: u32 = 9;

/// The longest a peer is asked to hold back an ACK (see
/// [`ACK_ELICITING_THRESHOLD`]).
///
/// QUIC stacks cap the request at the round-trip time: quinn asks for
/// `max(min(this, smoothed RTT, at least 25 ms), the peer's min_ack_delay)`
/// (quinn-proto `connection/ack_frequency.rs`, `candidate_max_ack_delay`),
/// and quinn peers advertise a `min_ack_delay` of 1 ms that no setting
/// raises, so nothing above the RTT can be asked of a quinn peer. This is
/// 300 ms so that the RTT, not this constant, is the cap at the round
/// trips phones have (80–300 ms): at 80 ms a listener ACKs every 4 frames
/// of 20 ms, at 200 ms and more every 10 (the threshold), where 100 ms
/// stopped at 5. Loss recovery is not held back: a gap still triggers an
/// immediate ACK (reordering threshold 2), only a lost clip tail waits the
/// longer probe timeout.
pub const ACK_MAX_DELAY_MS: u64 = 300;
