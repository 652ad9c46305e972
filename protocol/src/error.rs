//! Errors of the protocol: decode failures, and the error codes that travel
//! on the wire when a stream or connection is closed or a request refused.

/// Why bytes could not be decoded into a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The input ended inside a value; on a stream, wait for more bytes.
    #[error("message truncated")]
    Short,
    /// A length or count is larger than the protocol allows.
    #[error("{field} is {len} long, more than the limit of {cap}")]
    TooLong {
        /// The field whose length was read.
        field: &'static str,
        /// The length the peer claimed.
        len: u64,
        /// The largest length accepted.
        cap: usize,
    },
    /// A numeric field holds a value outside its range.
    #[error("{field} has invalid value {value}")]
    OutOfRange {
        /// The field that was read.
        field: &'static str,
        /// The value the peer sent.
        value: u64,
    },
    /// A string field is not UTF-8.
    #[error("{field} is not valid UTF-8")]
    InvalidUtf8 {
        /// The field that was read.
        field: &'static str,
    },
    /// A message's payload ended before its required fields did.
    #[error("message type {kind:#x} payload ends before its fields")]
    Truncated {
        /// The message type.
        kind: u64,
    },
    /// A message type that is not allowed on this kind of stream.
    #[error("message type {kind:#x} is not allowed on a {stream} stream")]
    Unexpected {
        /// The message type.
        kind: u64,
        /// The kind of stream it came on.
        stream: &'static str,
    },
    /// A request's field is all there but holds a value the protocol does
    /// not allow (a mode byte other than 1 or 2, a bool byte other than 0 or
    /// 1, an id longer than 64 bytes or not UTF-8, a count over `u32`).
    ///
    /// Not fatal: the frame was read whole, so the stream stays in step.
    /// The relay answers `Error { request_id, InvalidRequest }` and keeps
    /// the connection (PROTOCOL.md, section 2.3).
    #[error("request {request_id}: {field} has an invalid value")]
    InvalidField {
        /// The request's id (never 0: a request with id 0 and a bad field
        /// is decoded as the fatal error its field would otherwise give).
        request_id: u64,
        /// The field that was read.
        field: &'static str,
    },
}

impl DecodeError {
    /// The request this error answers, for an error that refuses one
    /// request and leaves the connection open ([`DecodeError::InvalidField`]).
    /// `None` means the error is fatal for the stream or connection.
    pub fn request_id(&self) -> Option<u64> {
        match self {
            DecodeError::InvalidField { request_id, .. } => Some(*request_id),
            _ => None,
        }
    }

    /// The wire code for this error: [`ErrorCode::TooLarge`] for lengths
    /// over a limit, [`ErrorCode::InvalidRequest`] for a request's invalid
    /// field, [`ErrorCode::Protocol`] for everything else.
    pub fn code(&self) -> ErrorCode {
        ErrorCode::from(self)
    }
}

/// An error code carried by `Error` messages, QUIC `CONNECTION_CLOSE`
/// application codes, and stream `RESET_STREAM`/`STOP_SENDING` codes.
///
/// The numbers are part of the wire format (PROTOCOL.md, "Error codes") and
/// never change meaning; unknown codes received from a peer map to
/// [`ErrorCode::Unknown`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum ErrorCode {
    /// Orderly close, no error.
    None = 0,
    /// The peer sent bytes that do not decode or break the message order.
    Protocol = 1,
    /// The hello's protocol version is not supported.
    UnsupportedVersion = 2,
    /// The token is malformed, its signature is wrong, or it is missing.
    InvalidToken = 3,
    /// The token has expired.
    TokenExpired = 4,
    /// No hello arrived before the authentication deadline.
    AuthTimeout = 5,
    /// The user is not a member of the group.
    NotMember = 6,
    /// The group does not exist.
    NoSuchGroup = 7,
    /// The operation needs a claim (admin, emergency) the token lacks.
    Forbidden = 8,
    /// Another member holds the floor of a walkie group.
    FloorTaken = 9,
    /// A message, frame or clip exceeds a size limit.
    TooLarge = 10,
    /// The user sends clips faster than the per-minute limit.
    RateLimited = 11,
    /// The user has too many clips in flight at once.
    TooManyClips = 12,
    /// The clip is longer than the group's maximum duration.
    ClipTooLong = 13,
    /// Frames arrived out of order or the end's frame count is wrong.
    OutOfOrder = 14,
    /// The receiver fell behind; its live stream was cut and the clip comes
    /// again from the store.
    SlowReceiver = 15,
    /// The talker's upload ended without a clip end; the clip is discarded.
    ClipAborted = 16,
    /// The clip id was stored before; this copy is dropped.
    Duplicate = 17,
    /// The relay failed internally; retrying later may succeed.
    Internal = 18,
    /// The relay is shutting down.
    ShuttingDown = 19,
    /// A group with that id exists already.
    GroupExists = 20,
    /// An uploaded WAV could not be transcoded.
    TranscodeFailed = 21,
    /// A higher-priority talker took the floor.
    Preempted = 22,
    /// The connection or connection limit was exceeded.
    TooManyConnections = 23,
    /// A request names something malformed (an empty group id, a bad mode).
    InvalidRequest = 24,
    /// The clip named by a request (DeleteClip, FetchClip) is not stored:
    /// never was, expired, or was deleted.
    NoSuchClip = 25,
    /// The user is a listener here (a channel's follower, or a group
    /// member given the listener role): it may not talk.
    ListenerOnly = 30,
    /// The invite code is unknown or revoked.
    BadInvite = 31,
    /// The channel published as many clips as its limit allows in 24 hours.
    ChannelLimit = 32,
    /// The operation needs a channel, and the group is not one (or the
    /// reverse).
    NotChannel = 33,
    /// The relay offers no UDP media path to this connection (it is off,
    /// or the connection is a browser's): live frames stay on streams.
    MediaUnavailable = 40,
    /// Any code this version does not know.
    Unknown = u32::MAX,
}

impl ErrorCode {
    /// The code's number on the wire.
    pub fn code(self) -> u32 {
        self as u32
    }

    /// The code for a number received from the peer.
    pub fn from_code(code: u64) -> ErrorCode {
        use ErrorCode::*;
        if let Some(c) = [ListenerOnly, BadInvite, ChannelLimit, NotChannel]
            .into_iter()
            .find(|c| u64::from(c.code()) == code)
        {
            return c;
        }
        if code == u64::from(MediaUnavailable.code()) {
            return MediaUnavailable;
        }
        const ALL: [ErrorCode; 26] = [
            None,
            Protocol,
            UnsupportedVersion,
            InvalidToken,
            TokenExpired,
            AuthTimeout,
            NotMember,
            NoSuchGroup,
            Forbidden,
            FloorTaken,
            TooLarge,
            RateLimited,
            TooManyClips,
            ClipTooLong,
            OutOfOrder,
            SlowReceiver,
            ClipAborted,
            Duplicate,
            Internal,
            ShuttingDown,
            GroupExists,
            TranscodeFailed,
            Preempted,
            TooManyConnections,
            InvalidRequest,
            NoSuchClip,
        ];
        ALL.into_iter()
            .find(|c| u64::from(c.code()) == code)
            .unwrap_or(Unknown)
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self:?} ({})", self.code())
    }
}

impl From<&DecodeError> for ErrorCode {
    fn from(err: &DecodeError) -> ErrorCode {
        match err {
            DecodeError::TooLong { .. } => ErrorCode::TooLarge,
            DecodeError::InvalidField { .. } => ErrorCode::InvalidRequest,
            DecodeError::Short
            | DecodeError::OutOfRange { .. }
            | DecodeError::InvalidUtf8 { .. }
            | DecodeError::Truncated { .. }
            | DecodeError::Unexpected { .. } => ErrorCode::Protocol,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_unknown_is_tolerated() {
        for n in 0..=25u64 {
            let code = ErrorCode::from_code(n);
            assert_ne!(code, ErrorCode::Unknown, "{n}");
            assert_eq!(u64::from(code.code()), n);
        }
        assert_eq!(ErrorCode::from_code(9999), ErrorCode::Unknown);
    }
}
