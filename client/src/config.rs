//! How to reach and authenticate with a relay, and how the connection
//! behaves: trust, reconnection, transport tuning.

use std::net::SocketAddr;
use std::time::Duration;

use crate::error::ClientError;

/// How the client decides that the relay's certificate is the right one.
#[derive(Clone, PartialEq, Eq)]
pub enum Trust {
    /// Accept exactly the certificate whose DER encoding has this SHA-256
    /// digest (what the relay prints at start-up). Host names and dates are
    /// not checked; the TLS 1.3 handshake signature still is.
    Fingerprint([u8; 32]),
    /// Verify the chain against these PEM certificates (a CA, or the relay's
    /// own self-signed certificate), with the usual WebPKI name and date
    /// checks against [`ClientConfig::server_name`].
    CertificatePem(Vec<u8>),
}

impl Trust {
    /// Parses a SHA-256 fingerprint written as 64 hexadecimal digits, in
    /// either case, optionally separated by `:` or spaces (as `openssl x509
    /// -fingerprint` prints it) and optionally prefixed by `sha256:`.
    pub fn fingerprint_from_hex(s: &str) -> Result<Trust, ClientError> {
        parse_fingerprint(s).map(Trust::Fingerprint)
    }
}

impl std::fmt::Debug for Trust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Trust::Fingerprint(fp) => {
                let hex: String = fp.iter().map(|b| format!("{b:02x}")).collect();
                write!(f, "Fingerprint({hex})")
            }
            Trust::CertificatePem(pem) => write!(f, "CertificatePem({} bytes)", pem.len()),
        }
    }
}

/// Parses a SHA-256 fingerprint; see [`Trust::fingerprint_from_hex`].
pub fn parse_fingerprint(s: &str) -> Result<[u8; 32], ClientError> {
    let s = s.trim();
    let s = s
        .strip_prefix("sha256:")
        .or_else(|| s.strip_prefix("SHA256:"))
        .unwrap_or(s);
    let digits: Vec<u8> = s
        .bytes()
        .filter(|b| !matches!(b, b':' | b' ' | b'\t'))
        .collect();
    let bad = || ClientError::InvalidConfig(format!("bad SHA-256 fingerprint {s:?}"));
    if digits.len() != 64 {
        return Err(bad());
    }
    let mut out = [0u8; 32];
    for (i, pair) in digits.chunks(2).enumerate() {
        let hi = (pair[0] as char).to_digit(16).ok_or_else(bad)?;
        let lo = (pair[1] as char).to_digit(16).ok_or_else(bad)?;
        out[i] = (hi * 16 + lo) as u8;
    }
    Ok(out)
}

/// When and how often to reconnect after the connection is lost.
///
/// The delay before attempt `n` (from 0) is `initial_delay × multiplier^n`,
/// capped at `max_delay`, and with `jitter` a random fraction of up to half
/// of it is taken off so that many clients cut at once do not come back in
/// lockstep.
#[derive(Debug, Clone, PartialEq)]
pub struct ReconnectPolicy {
    /// The delay before the first attempt.
    pub initial_delay: Duration,
    /// The longest delay between attempts.
    pub max_delay: Duration,
    /// How much the delay grows after each failed attempt.
    pub multiplier: f64,
    /// Whether to randomise each delay (down to half of it).
    pub jitter: bool,
    /// Give up after this many failed attempts in a row (`None`: never).
    pub max_attempts: Option<u32>,
}

impl Default for ReconnectPolicy {
    fn default() -> ReconnectPolicy {
        ReconnectPolicy {
            initial_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(15),
            multiplier: 2.0,
            jitter: true,
            max_attempts: None,
        }
    }
}

/// QUIC transport settings, tuned for voice by default: small flow-control
/// windows (a slow receiver pushes back quickly instead of buffering seconds
/// of audio), frequent keep-alives (NAT bindings on mobile networks expire
/// fast), and room for many parallel clip streams during catch-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransportTuning {
    /// Receive window of each stream, in bytes.
    pub stream_receive_window: u32,
    /// Receive window of the whole connection, in bytes.
    pub receive_window: u32,
    /// Send window of the whole connection, in bytes.
    pub send_window: u64,
    /// Interval of QUIC keep-alive pings.
    pub keep_alive: Duration,
    /// The connection is considered lost after this long without packets.
    pub idle_timeout: Duration,
    /// How many clip streams the relay may have open towards us at once.
    pub max_concurrent_uni_streams: u32,
    /// Ask the relay, with the QUIC ACK frequency extension, to ACK our
    /// uploads a few packets at once (`ptt_protocol::ACK_ELICITING_THRESHOLD`):
    /// fewer packets for the phone to receive while it talks. On by
    /// default; off only to measure what it saves.
    pub ask_fewer_acks: bool,
}

impl Default for TransportTuning {
    fn default() -> TransportTuning {
        TransportTuning {
            stream_receive_window: 64 * 1024,
            receive_window: 1024 * 1024,
            send_window: 1024 * 1024,
            keep_alive: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(30),
            max_concurrent_uni_streams: 256,
            ask_fewer_acks: true,
        }
    }
}

/// Everything [`crate::Client::connect`] needs.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// The relay's UDP address.
    pub addr: SocketAddr,
    /// The name sent in TLS SNI and checked against the certificate with
    /// [`Trust::CertificatePem`] (`localhost` for the relay's default
    /// certificate).
    pub server_name: String,
    /// How the relay's certificate is trusted.
    pub trust: Trust,
    /// The signed token (`ptt1.…`); see [`crate::Client::set_token`] to
    /// replace it before it expires.
    pub token: String,
    /// Free text naming the client software, sent in the hello for logs.
    pub client_name: String,
    /// Reconnect automatically after a connection loss; `None` ends the
    /// client on the first loss.
    pub reconnect: Option<ReconnectPolicy>,
    /// Acknowledge each clip as soon as it has been received whole.
    pub auto_ack: bool,
    /// Time allowed for the QUIC handshake plus hello/welcome.
    pub connect_timeout: Duration,
    /// Time allowed for the relay to answer a request.
    pub request_timeout: Duration,
    /// Capacity of the event channel; when the application does not drain
    /// [`crate::Events`], the client stops reading and QUIC flow control
    /// pushes back on the relay.
    pub event_capacity: usize,
    /// How many completed clips are remembered to drop re-deliveries.
    pub dedup_capacity: usize,
    /// QUIC transport settings.
    pub transport: TransportTuning,
    /// Ask for the UDP media path after each Welcome (PROTOCOL.md, section
    /// 14): live frames then come in sealed UDP datagrams, and a clip that
    /// lost some is fetched whole before it is acknowledged. On by default;
    /// a relay without one answers `MediaUnavailable` and frames stay on
    /// streams.
    pub media: bool,
    /// A simulated network between the media socket and the client (tests,
    /// client-sim's lossy model); `None`: the real one only.
    pub media_link: Option<std::sync::Arc<dyn crate::media::MediaLink>>,
    /// A media socket shared with other clients of this process (a load
    /// generator, a gateway): their live frames are read in batches by one
    /// task. `None`: each connection's media path binds a socket of its
    /// own, as a phone's single client does. A `media_link` still applies to
    /// this client's datagrams on a shared socket.
    pub media_socket: Option<std::sync::Arc<crate::MediaSocket>>,
    /// Takes the client's events where they happen instead of the
    /// [`crate::Events`] channel (which then ends at once, and
    /// `event_capacity` does not apply): see [`crate::EventSink`]. `None`:
    /// the channel.
    pub event_sink: Option<std::sync::Arc<dyn crate::EventSink>>,
}

impl ClientConfig {
    /// A configuration with the defaults: no reconnection, auto-ack on,
    /// the media path on, 10 s connect timeout, 10 s request timeout.
    pub fn new(
        addr: SocketAddr,
        server_name: impl Into<String>,
        trust: Trust,
        token: impl Into<String>,
    ) -> ClientConfig {
        ClientConfig {
            addr,
            server_name: server_name.into(),
            trust,
            token: token.into(),
            client_name: concat!("ptt-client/", env!("CARGO_PKG_VERSION")).to_owned(),
            reconnect: None,
            auto_ack: true,
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(10),
            event_capacity: 1024,
            dedup_capacity: 4096,
            transport: TransportTuning::default(),
            media: true,
            media_link: None,
            media_socket: None,
            event_sink: None,
        }
    }

    /// Sets the reconnect policy.
    pub fn with_reconnect(mut self, policy: ReconnectPolicy) -> ClientConfig {
        self.reconnect = Some(policy);
        self
    }

    /// Sets the client name.
    pub fn with_client_name(mut self, name: impl Into<String>) -> ClientConfig {
        self.client_name = name.into();
        self
    }

    /// Turns the UDP media path on or off.
    pub fn with_media(mut self, media: bool) -> ClientConfig {
        self.media = media;
        self
    }

    /// Turns automatic delivery acknowledgements on or off.
    pub fn with_auto_ack(mut self, auto_ack: bool) -> ClientConfig {
        self.auto_ack = auto_ack;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_parse_in_the_usual_spellings() {
        let hex = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
        let fp = parse_fingerprint(hex).unwrap();
        assert_eq!(fp[0], 0x00);
        assert_eq!(fp[5], 0x55);
        assert_eq!(fp[31], 0xff);
        assert_eq!(parse_fingerprint(&hex.to_uppercase()).unwrap(), fp);
        let colons: Vec<String> = fp.iter().map(|b| format!("{b:02X}")).collect();
        assert_eq!(parse_fingerprint(&colons.join(":")).unwrap(), fp);
        assert_eq!(parse_fingerprint(&format!("sha256:{hex}\n")).unwrap(), fp);
        assert_eq!(
            Trust::fingerprint_from_hex(hex).unwrap(),
            Trust::Fingerprint(fp)
        );
    }

    #[test]
    fn bad_fingerprints_are_refused() {
        for bad in [
            "",
            "00",
            &"0".repeat(63),
            &"0".repeat(65),
            &format!("{}zz", "0".repeat(62)),
            &format!("{}é", "0".repeat(62)),
        ] {
            assert!(parse_fingerprint(bad).is_err(), "{bad:?}");
        }
    }
}
