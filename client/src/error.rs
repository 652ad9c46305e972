//! What can go wrong, for the application.

use ptt_protocol::{DecodeError, ErrorCode};

/// An error of a client operation.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    /// The configuration is unusable (bad fingerprint, bad PEM, bad id).
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// An argument is invalid (a malformed group id, an empty clip).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A local I/O error (binding the UDP socket).
    #[error("I/O error: {0}")]
    Io(String),
    /// The QUIC connection could not be started.
    #[error("cannot connect: {0}")]
    Connect(#[from] quinn::ConnectError),
    /// The QUIC connection failed or was closed.
    #[error("connection lost: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// The relay refused a request or the connection with this code.
    #[error("relay error {code}: {message}")]
    Relay {
        /// The relay's error code.
        code: ErrorCode,
        /// The relay's explanation.
        message: String,
    },
    /// The floor of a walkie group is held by someone else.
    #[error("floor denied: {holder} is talking")]
    FloorDenied {
        /// Who holds the floor.
        holder: String,
    },
    /// The relay refused an uploaded clip.
    #[error("clip rejected with {code}: {message}")]
    ClipRejected {
        /// Why.
        code: ErrorCode,
        /// The relay's explanation.
        message: String,
    },
    /// A frame is larger than the relay accepts.
    #[error("frame of {len} bytes exceeds the relay's limit of {max}")]
    FrameTooLarge {
        /// Its size.
        len: usize,
        /// The limit from the relay's welcome.
        max: usize,
    },
    /// The relay sent something that does not decode or breaks the protocol.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// The relay did not answer in time.
    #[error("timed out waiting for the relay")]
    Timeout,
    /// The connection is down and being re-established; try again later.
    #[error("not connected (reconnecting)")]
    NotConnected,
    /// The connection was lost while the operation was under way.
    #[error("connection lost during the operation")]
    ConnectionLost,
    /// The client was closed.
    #[error("client closed")]
    Closed,
    /// PCM could not be encoded.
    #[error("encoder error: {0}")]
    Codec(String),
    /// The talk was aborted.
    #[error("clip aborted")]
    Aborted,
}

impl ClientError {
    /// The protocol error code behind this error, when there is one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Relay { code, .. } | ClientError::ClipRejected { code, .. } => Some(*code),
            ClientError::FloorDenied { .. } => Some(ErrorCode::FloorTaken),
            ClientError::FrameTooLarge { .. } => Some(ErrorCode::TooLarge),
            ClientError::Connection(quinn::ConnectionError::ApplicationClosed(close)) => {
                Some(ErrorCode::from_code(close.error_code.into_inner()))
            }
            _ => None,
        }
    }

    /// Whether retrying the connection cannot help (bad or expired token,
    /// unsupported version): the application must fix something first.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self.code(),
            Some(
                ErrorCode::InvalidToken
                    | ErrorCode::TokenExpired
                    | ErrorCode::UnsupportedVersion
                    | ErrorCode::Forbidden
            )
        ) || matches!(self, ClientError::InvalidConfig(_) | ClientError::Closed)
    }
}

impl From<DecodeError> for ClientError {
    fn from(err: DecodeError) -> ClientError {
        ClientError::Protocol(err.to_string())
    }
}

impl From<std::io::Error> for ClientError {
    fn from(err: std::io::Error) -> ClientError {
        ClientError::Io(err.to_string())
    }
}
