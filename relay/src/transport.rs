//! The transport seam: a session runs over a [`Connection`] that is either
//! a native QUIC connection (ALPN `ptt/1`) or a WebTransport session over
//! HTTP/3 (ALPN `h3`, the browser page), and never knows which.
//!
//! Both are [`web_transport_quinn::Session`]s: a native connection is
//! wrapped as a *raw* session (streams, datagrams and error codes pass
//! through as they are, byte for byte what a native client always saw), a
//! browser's goes through the WebTransport handshake first (HTTP/3
//! SETTINGS, the extended CONNECT to [`WEB_PATH`]), after which its streams
//! carry the same messages; the crate adds and strips the WebTransport
//! stream headers and maps error codes into the HTTP/3 range.
//! PROTOCOL.md §12 specifies the mapping.

use bytes::Bytes;
use ptt_protocol::{ChunkSource, ErrorCode};
use quinn::crypto::rustls::HandshakeData;

pub use web_transport_quinn::SendStream;

/// A client's connection, shared by its session and its delivery tasks.
///
/// Behind an `Arc`: a [`web_transport_quinn::Session`] is about 780 bytes
/// (a `quinn::Connection` is 8), and every delivery task holds a handle,
/// so a clone must be a pointer, not a copy of the session.
pub type Connection = std::sync::Arc<web_transport_quinn::Session>;

/// The ALPN of WebTransport (HTTP/3).
pub const WEB_ALPN: &[u8] = b"h3";

/// The path of the WebTransport CONNECT request (`https://host:port/ptt`).
pub const WEB_PATH: &str = "/ptt";

/// Bidirectional streams a browser may open: the HTTP/3 CONNECT request
/// and the control stream.
const WEB_BIDI_STREAMS: u32 = 2;

/// Unidirectional streams a browser opens besides its clips: the HTTP/3
/// control stream and the QPACK encoder and decoder streams.
const WEB_EXTRA_UNI_STREAMS: u32 = 3;

/// A clip or control stream's receiving half, read by
/// [`ptt_protocol::FramedReader`].
#[derive(Debug)]
pub struct RecvStream(web_transport_quinn::RecvStream);

impl RecvStream {
    /// The QUIC stream id (what a client's uplink packets name).
    pub fn quic_id(&self) -> u64 {
        self.0.quic_id().into()
    }

    /// Asks the peer to stop sending (STOP_SENDING) with `code`.
    pub fn stop(&mut self, code: ErrorCode) -> Result<(), quinn::ClosedStream> {
        self.0.stop(code.code())
    }
}

impl From<web_transport_quinn::RecvStream> for RecvStream {
    fn from(stream: web_transport_quinn::RecvStream) -> RecvStream {
        RecvStream(stream)
    }
}

impl ChunkSource for RecvStream {
    type Error = web_transport_quinn::ReadError;

    async fn read_chunk(&mut self, max: usize) -> Result<Option<Bytes>, Self::Error> {
        // Cancel-safe: a thin wrapper over quinn's `read_chunk`.
        let chunk = self.0.read_chunk(max, true).await?;
        Ok(chunk.map(|c| c.bytes))
    }
}

/// Why a connection did not become a session.
#[derive(Debug, thiserror::Error)]
pub enum AcceptError {
    /// The WebTransport handshake failed.
    #[error("WebTransport handshake: {0}")]
    Handshake(#[from] web_transport_quinn::ServerError),
    /// The CONNECT request named another path (answered 404).
    #[error("WebTransport CONNECT to {0}, not {WEB_PATH}")]
    WrongPath(String),
}

/// Whether the TLS handshake of `conn` chose WebTransport's ALPN.
pub fn is_web(conn: &quinn::Connection) -> bool {
    conn.handshake_data()
        .and_then(|data| data.downcast::<HandshakeData>().ok())
        .and_then(|data| data.protocol)
        .is_some_and(|alpn| alpn == WEB_ALPN)
}

/// Turns an established QUIC connection into a session's [`Connection`]:
/// native connections as they are, WebTransport ones after the HTTP/3
/// handshake and the CONNECT to [`WEB_PATH`]. The caller bounds the time.
pub async fn accept(conn: quinn::Connection, tuning_uni: u32) -> Result<Connection, AcceptError> {
    if !is_web(&conn) {
        return Ok(Connection::new(web_transport_quinn::Session::raw(conn)));
    }
    // The endpoint's stream limits are set for native clients (one
    // bidirectional stream); a browser needs room for HTTP/3's own.
    conn.set_max_concurrent_bi_streams(WEB_BIDI_STREAMS.into());
    conn.set_max_concurrent_uni_streams((tuning_uni + WEB_EXTRA_UNI_STREAMS).into());
    let request = web_transport_quinn::Request::accept(conn).await?;
    let path = request.url.path().to_owned();
    if path != WEB_PATH {
        let _ = request
            .reject(web_transport_quinn::http::StatusCode::NOT_FOUND)
            .await;
        return Err(AcceptError::WrongPath(path));
    }
    Ok(Connection::new(request.ok().await?))
}
