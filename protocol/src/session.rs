//! Per-connection rules the relay enforces on a session: authentication
//! first and before a deadline, and the clip rate and concurrency limits.
//!
//! [`SessionState`] is fed what the connection does and the time, and says
//! whether to allow it; the relay turns refusals into error codes.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::error::ErrorCode;

/// Where a session is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionPhase {
    /// Connected, waiting for a hello until the deadline.
    AwaitingHello {
        /// When the session is closed with [`ErrorCode::AuthTimeout`].
        deadline: Instant,
    },
    /// Authenticated as `user`.
    Authenticated {
        /// The user id from the token.
        user: String,
    },
    /// Closed; nothing more is accepted.
    Closed,
}

/// Limits on what one session may upload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionLimits {
    /// Time allowed from connect to hello.
    pub auth_timeout: Duration,
    /// Clips in flight at once.
    pub max_concurrent_clips: u32,
    /// Clips started in any 60-second window.
    pub clips_per_minute: u32,
}

/// The session state machine. See the module documentation.
#[derive(Debug)]
pub struct SessionState {
    phase: SessionPhase,
    limits: SessionLimits,
    clips_in_flight: u32,
    recent_starts: VecDeque<Instant>,
}

impl SessionState {
    /// A session that connected at `now`.
    pub fn new(limits: SessionLimits, now: Instant) -> SessionState {
        SessionState {
            phase: SessionPhase::AwaitingHello {
                deadline: now + limits.auth_timeout,
            },
            limits,
            clips_in_flight: 0,
            recent_starts: VecDeque::new(),
        }
    }

    /// Where the session is.
    pub fn phase(&self) -> &SessionPhase {
        &self.phase
    }

    /// The authenticated user, if any.
    pub fn user(&self) -> Option<&str> {
        match &self.phase {
            SessionPhase::Authenticated { user } => Some(user),
            _ => None,
        }
    }

    /// When the session needs attention (the auth deadline), if ever.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.phase {
            SessionPhase::AwaitingHello { deadline } => Some(deadline),
            _ => None,
        }
    }

    /// Checks the deadline at `now`; `Err` means close with that code.
    pub fn handle_timeout(&mut self, now: Instant) -> Result<(), ErrorCode> {
        match self.phase {
            SessionPhase::AwaitingHello { deadline } if now >= deadline => {
                self.phase = SessionPhase::Closed;
                Err(ErrorCode::AuthTimeout)
            }
            _ => Ok(()),
        }
    }

    /// A hello whose token verified as `user` arrived at `now`.
    pub fn handle_authenticated(&mut self, user: String, now: Instant) -> Result<(), ErrorCode> {
        match self.phase {
            SessionPhase::AwaitingHello { deadline } if now < deadline => {
                self.phase = SessionPhase::Authenticated { user };
                Ok(())
            }
            SessionPhase::AwaitingHello { .. } => {
                self.phase = SessionPhase::Closed;
                Err(ErrorCode::AuthTimeout)
            }
            // A second hello is a protocol violation.
            _ => Err(ErrorCode::Protocol),
        }
    }

    /// Whether a message other than hello may be handled now.
    pub fn check_authenticated(&self) -> Result<&str, ErrorCode> {
        self.user().ok_or(ErrorCode::Protocol)
    }

    /// The session wants to start uploading a clip at `now`.
    pub fn handle_clip_start(&mut self, now: Instant) -> Result<(), ErrorCode> {
        self.check_authenticated()?;
        if self.clips_in_flight >= self.limits.max_concurrent_clips {
            return Err(ErrorCode::TooManyClips);
        }
        let window = Duration::from_secs(60);
        while self
            .recent_starts
            .front()
            .is_some_and(|&t| now.duration_since(t) >= window)
        {
            self.recent_starts.pop_front();
        }
        if self.recent_starts.len() >= self.limits.clips_per_minute as usize {
            return Err(ErrorCode::RateLimited);
        }
        self.recent_starts.push_back(now);
        self.clips_in_flight += 1;
        Ok(())
    }

    /// An upload started by [`SessionState::handle_clip_start`] finished,
    /// whether stored or failed.
    pub fn handle_clip_done(&mut self) {
        self.clips_in_flight = self.clips_in_flight.saturating_sub(1);
    }

    /// The session is over.
    pub fn close(&mut self) {
        self.phase = SessionPhase::Closed;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> SessionLimits {
        SessionLimits {
            auth_timeout: Duration::from_secs(5),
            max_concurrent_clips: 2,
            clips_per_minute: 3,
        }
    }

    #[test]
    fn nothing_before_hello_and_the_deadline_holds() {
        let t = Instant::now();
        let mut s = SessionState::new(limits(), t);
        assert_eq!(s.handle_clip_start(t), Err(ErrorCode::Protocol));
        assert_eq!(s.poll_timeout(), Some(t + Duration::from_secs(5)));
        assert_eq!(s.handle_timeout(t + Duration::from_secs(4)), Ok(()));
        assert_eq!(
            s.handle_timeout(t + Duration::from_secs(5)),
            Err(ErrorCode::AuthTimeout)
        );
        assert_eq!(s.phase(), &SessionPhase::Closed);

        let mut s = SessionState::new(limits(), t);
        assert_eq!(
            s.handle_authenticated("a".into(), t + Duration::from_secs(6)),
            Err(ErrorCode::AuthTimeout)
        );

        let mut s = SessionState::new(limits(), t);
        s.handle_authenticated("a".into(), t).unwrap();
        assert_eq!(s.user(), Some("a"));
        assert_eq!(s.poll_timeout(), None);
        assert_eq!(
            s.handle_authenticated("b".into(), t),
            Err(ErrorCode::Protocol)
        );
    }

    #[test]
    fn concurrency_and_rate_limits_on_a_simulated_clock() {
        let t = Instant::now();
        let mut s = SessionState::new(limits(), t);
        s.handle_authenticated("a".into(), t).unwrap();
        s.handle_clip_start(t).unwrap();
        s.handle_clip_start(t).unwrap();
        assert_eq!(s.handle_clip_start(t), Err(ErrorCode::TooManyClips));
        s.handle_clip_done();
        s.handle_clip_start(t + Duration::from_secs(1)).unwrap();
        s.handle_clip_done();
        s.handle_clip_done();
        // Three starts inside the minute: the fourth waits for the window.
        assert_eq!(
            s.handle_clip_start(t + Duration::from_secs(59)),
            Err(ErrorCode::RateLimited)
        );
        s.handle_clip_start(t + Duration::from_secs(60)).unwrap();
    }
}
