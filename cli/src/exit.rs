//! Exit statuses that scripts can rely on, and errors in words with the
//! protocol's error code name.

use std::process::ExitCode;

use ptt_client::{ClientError, ErrorCode};

use crate::config::NotLoggedIn;

/// Everything went as asked.
pub const OK: u8 = 0;
/// Any failure not listed below (a file that cannot be written…).
pub const FAILURE: u8 = 1;
/// The command line is wrong (clap's own status).
pub const USAGE: u8 = 2;
/// No stored login, or it is unreadable: run `ptt login`.
pub const NOT_LOGGED_IN: u8 = 3;
/// The relay cannot be reached, the TLS handshake failed (wrong pin or CA),
/// or the connection was lost.
pub const UNREACHABLE: u8 = 4;
/// The relay refused the token (`InvalidToken`, `TokenExpired`,
/// `Forbidden`, `UnsupportedVersion`).
pub const AUTH: u8 = 5;
/// The relay refused the request (`NotMember`, `NoSuchGroup`, a rejected
/// clip, a rate limit…).
pub const REFUSED: u8 = 6;
/// `--timeout` passed before `--count` clips arrived.
pub const TIMEOUT: u8 = 7;
/// The audio input is unusable (not a WAV, a bad rate or channel count).
pub const BAD_INPUT: u8 = 8;

/// An error the command wants to end with a given status.
#[derive(Debug)]
pub struct Status {
    /// The exit status.
    pub code: u8,
    /// What went wrong, in words.
    pub message: String,
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Status {}

/// An [`anyhow::Error`] that ends the program with `code`.
pub fn status(code: u8, message: impl Into<String>) -> anyhow::Error {
    Status {
        code,
        message: message.into(),
    }
    .into()
}

/// The connection ended (an `Event::Disconnected` without reconnection):
/// an error whose status follows the relay's close code, if any.
pub fn lost(code: Option<ErrorCode>, reason: &str) -> anyhow::Error {
    match code {
        Some(code) if code != ErrorCode::None => anyhow::Error::new(ClientError::Relay {
            code,
            message: reason.to_owned(),
        })
        .context("the relay closed the connection"),
        _ => status(UNREACHABLE, format!("the connection was lost: {reason}")),
    }
}

/// The exit status for `err`, from the first cause that says which.
pub fn code_for(err: &anyhow::Error) -> u8 {
    for cause in err.chain() {
        if let Some(s) = cause.downcast_ref::<Status>() {
            return s.code;
        }
        if cause.downcast_ref::<NotLoggedIn>().is_some() {
            return NOT_LOGGED_IN;
        }
        if let Some(e) = cause.downcast_ref::<ClientError>() {
            return client_code(e);
        }
        if cause.downcast_ref::<ptt_codec::CodecError>().is_some() {
            return BAD_INPUT;
        }
    }
    FAILURE
}

fn client_code(err: &ClientError) -> u8 {
    match err.code() {
        Some(
            ErrorCode::InvalidToken
            | ErrorCode::TokenExpired
            | ErrorCode::Forbidden
            | ErrorCode::UnsupportedVersion,
        ) => return AUTH,
        Some(ErrorCode::ShuttingDown) => return UNREACHABLE,
        Some(ErrorCode::None) | None => {}
        Some(_) => return REFUSED,
    }
    match err {
        ClientError::Connect(_)
        | ClientError::Connection(_)
        | ClientError::Timeout
        | ClientError::NotConnected
        | ClientError::ConnectionLost
        | ClientError::Closed
        | ClientError::Io(_) => UNREACHABLE,
        ClientError::Codec(_) | ClientError::InvalidArgument(_) => BAD_INPUT,
        ClientError::InvalidConfig(_) => NOT_LOGGED_IN,
        _ => FAILURE,
    }
}

/// A hint for what to do about a relay error code, if there is a useful one.
pub fn hint(code: ErrorCode) -> Option<&'static str> {
    Some(match code {
        ErrorCode::InvalidToken => {
            "the token is not valid for this relay: log in again with a new one"
        }
        ErrorCode::TokenExpired => "the token has expired: log in again with a new one",
        ErrorCode::Forbidden => "the token does not allow this",
        ErrorCode::NotMember => "you are not a member of this group",
        ErrorCode::NoSuchGroup => "there is no such group",
        ErrorCode::FloorTaken => "someone else is talking in this walkie group",
        ErrorCode::RateLimited => "too many requests or clips: wait a little",
        ErrorCode::ClipTooLong => "the clip is longer than the relay allows",
        ErrorCode::TooLarge => "the clip or a frame is larger than the relay allows",
        _ => return None,
    })
}

/// Prints `err` on stderr in words (with the protocol error code's name
/// and a hint) and returns its exit status.
pub fn report(err: &anyhow::Error) -> ExitCode {
    let code = code_for(err);
    let mut line = format!("ptt: error: {err:#}");
    let wire = err
        .chain()
        .find_map(|c| c.downcast_ref::<ClientError>())
        .and_then(ClientError::code);
    if let Some(hint) = wire.and_then(hint) {
        line.push_str(&format!(" ({hint})"));
    }
    if code == UNREACHABLE && wire.is_none() {
        line.push_str(" (is the relay running, and are the address and the pin or CA right?)");
    }
    eprintln!("{line}");
    ExitCode::from(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_codes_map_to_documented_statuses() {
        let relay = |code| {
            anyhow::Error::new(ClientError::Relay {
                code,
                message: "no".into(),
            })
        };
        assert_eq!(code_for(&relay(ErrorCode::InvalidToken)), AUTH);
        assert_eq!(code_for(&relay(ErrorCode::TokenExpired)), AUTH);
        assert_eq!(code_for(&relay(ErrorCode::NotMember)), REFUSED);
        assert_eq!(
            code_for(&relay(ErrorCode::NoSuchGroup).context("join")),
            REFUSED
        );
        assert_eq!(code_for(&ClientError::Timeout.into()), UNREACHABLE);
        assert_eq!(code_for(&status(TIMEOUT, "late")), TIMEOUT);
        assert_eq!(code_for(&NotLoggedIn("/x".into()).into()), NOT_LOGGED_IN);
        assert_eq!(code_for(&anyhow::anyhow!("disk full")), FAILURE);
    }
}
