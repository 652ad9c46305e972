//! The push-to-talk wire protocol: message types, their encoding over
//! [`bytes`], and the session and clip state machines.
//!
//! This crate does no I/O and has no async runtime: the relay and the client
//! library feed it bytes and time, and act on what it returns. PROTOCOL.md at
//! the repository root specifies the same format for client writers in other
//! languages.

/// The ALPN protocol identifier negotiated in the TLS handshake.
pub const ALPN: &[u8] = b"ptt/1";
