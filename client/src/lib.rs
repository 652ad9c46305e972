//! A client of the push-to-talk relay that a mobile app can embed: connect,
//! authenticate, talk, and receive clips live and from the store.
//!
//! ```no_run
//! # async fn demo() -> Result<(), ptt_client::ClientError> {
//! use ptt_client::{Client, ClientConfig, ClipParams, Event, ReconnectPolicy, Trust};
//!
//! let trust = Trust::fingerprint_from_hex(
//!     "3f0c6a0d2b6e8f1e4c1a9b7d5e3f2a1b0c9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f",
//! )?;
//! let config = ClientConfig::new("127.0.0.1:4433".parse().unwrap(), "localhost", trust, "ptt1.…")
//!     .with_reconnect(ReconnectPolicy::default());
//! let (client, mut events) = Client::connect(config).await?;
//! client.join("team").await?;
//! let mut talk = client.talk("team", ClipParams::default()).await?;
//! talk.send_frame(vec![0xf8, 0xff, 0xfe]).await?; // one Opus packet
//! let stored = talk.finish(Vec::new()).await?;
//! println!("stored as #{}", stored.seq);
//! while let Some(event) = events.next().await {
//!     if let Event::Frame { data, .. } = event {
//!         // hand `data` to the Opus decoder and the jitter buffer
//!         let _ = data;
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! One task per connection owns the control stream; each clip stream the
//! relay opens is read by its own task, checked with
//! [`ptt_protocol::ClipReader`], and surfaced as [`Event`]s. Each
//! [`Talk`] writes its frames straight to its own QUIC stream. PROTOCOL.md
//! at the repository root describes the wire format.

mod backoff;
mod channel;
mod client;
mod config;
mod dedup;
mod driver;
mod error;
mod event;
mod media;
mod media_socket;
mod pcm;
mod receive;
mod shared;
mod talk;
mod tls;
mod wav;

pub use backoff::Backoff;
pub use client::{Client, FloorGrant, JoinInfo};
pub use config::{ClientConfig, ReconnectPolicy, TransportTuning, Trust, parse_fingerprint};
pub use dedup::DedupCache;
pub use error::ClientError;
pub use event::{Event, EventSink, Events};
pub use media::{EARLY_KEEP, EARLY_MAX, MediaLink};
pub use media_socket::MediaSocket;
pub use pcm::PcmTalk;
pub use ptt_codec::EncoderConfig;
pub use shared::{ClientStats, StoredClip};
pub use talk::{ClipParams, Talk, random_clip_id};
pub use tls::{FingerprintVerifier, quinn_config, rustls_config, sha256};
pub use wav::wav_format;

pub use ptt_protocol;

/// The README's examples, compiled as doc tests so that they stay true.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
pub use ptt_protocol::{ChannelCounts, ChannelLimits, Role};
pub use ptt_protocol::{
    ClipFormat, ClipHeader, ClipId, ClipSummary, ErrorCode, GroupMode, MemberState, ReceiptKind,
};
