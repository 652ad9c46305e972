//! Per-connection rules the relay enforces on a session: authentication
//! first and before a deadline, the clip rate and concurrency limits, and
//! the control-message rate limit (a token bucket).
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

/// Default [`SessionLimits::control_burst`].
pub const DEFAULT_CONTROL_BURST: u32 = 256;
/// Default [`SessionLimits::control_per_second`].
pub const DEFAULT_CONTROL_PER_SECOND: u32 = 64;

/// Limits on what one session may upload and send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionLimits {
    /// Time allowed from connect to hello.
    pub auth_timeout: Duration,
    /// Clips in flight at once.
    pub max_concurrent_clips: u32,
    /// Clips started in any 60-second window.
    pub clips_per_minute: u32,
    /// Control messages a session may send at once after being quiet: the
    /// size of the token bucket, full when the session starts. 0 (like a
    /// `control_per_second` of 0) turns the control-message limit off.
    pub control_burst: u32,
    /// Tokens added to the bucket per second, up to `control_burst`.
    pub control_per_second: u32,
}

impl Default for SessionLimits {
    /// The relay's defaults: 10 s to authenticate, 2 uploads at once, 60
    /// started per minute, and bursts of [`DEFAULT_CONTROL_BURST`] control
    /// messages refilled at [`DEFAULT_CONTROL_PER_SECOND`].
    fn default() -> SessionLimits {
        SessionLimits {
            auth_timeout: Duration::from_secs(10),
            max_concurrent_clips: 2,
            clips_per_minute: 60,
            control_burst: DEFAULT_CONTROL_BURST,
            control_per_second: DEFAULT_CONTROL_PER_SECOND,
        }
    }
}

/// The session state machine. See the module documentation.
#[derive(Debug)]
pub struct SessionState {
    phase: SessionPhase,
    limits: SessionLimits,
    clips_in_flight: u32,
    recent_starts: VecDeque<Instant>,
    control: TokenBucket,
}

impl SessionState {
    /// A session that connected at `now`.
    pub fn new(limits: SessionLimits, now: Instant) -> SessionState {
        SessionState {
            phase: SessionPhase::AwaitingHello {
                deadline: now + limits.auth_timeout,
            },
            control: TokenBucket::full(limits.control_burst, now),
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

    /// A control message arrived at `now`: takes one token from the
    /// session's bucket. `Err(RateLimited)` when the bucket is empty: the
    /// relay then closes the connection with that code.
    ///
    /// The relay charges every control message except a `DeliveryAck` or
    /// `Played` naming a clip delivered on the connection and not yet
    /// acknowledged or played (those are bounded by the deliveries).
    pub fn handle_control(&mut self, now: Instant) -> Result<(), ErrorCode> {
        let SessionLimits {
            control_burst: burst,
            control_per_second: rate,
            ..
        } = self.limits;
        if burst == 0 || rate == 0 {
            return Ok(());
        }
        if self.control.take(burst, rate, now) {
            Ok(())
        } else {
            Err(ErrorCode::RateLimited)
        }
    }

    /// Whole control-message tokens left at `now` (for logs and tests);
    /// `u32::MAX` when the limit is off.
    pub fn control_tokens(&self, now: Instant) -> u32 {
        let (burst, rate) = (self.limits.control_burst, self.limits.control_per_second);
        if burst == 0 || rate == 0 {
            return u32::MAX;
        }
        let mut bucket = self.control.clone();
        bucket.refill(burst, rate, now);
        u32::try_from(bucket.nano_tokens / NANOS_PER_TOKEN).unwrap_or(u32::MAX)
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

/// One token in the bucket's fixed-point unit: a token per second of
/// rate is one unit per nanosecond, so refills are exact integers.
const NANOS_PER_TOKEN: u64 = 1_000_000_000;

/// A token bucket counted in billionths of a token, so that any rate adds
/// exactly `elapsed_ns × rate` units without rounding drift.
#[derive(Debug, Clone)]
struct TokenBucket {
    nano_tokens: u64,
    last_refill: Instant,
}

impl TokenBucket {
    fn full(burst: u32, now: Instant) -> TokenBucket {
        TokenBucket {
            nano_tokens: u64::from(burst) * NANOS_PER_TOKEN,
            last_refill: now,
        }
    }

    /// Adds what accrued since the last refill, up to `burst` tokens. Time
    /// that goes backwards adds nothing.
    fn refill(&mut self, burst: u32, rate: u32, now: Instant) {
        let cap = u64::from(burst) * NANOS_PER_TOKEN;
        let elapsed = now.saturating_duration_since(self.last_refill).as_nanos();
        let added = elapsed.saturating_mul(u128::from(rate));
        let total = u128::from(self.nano_tokens).saturating_add(added);
        self.nano_tokens = u64::try_from(total.min(u128::from(cap))).unwrap_or(cap);
        self.last_refill = self.last_refill.max(now);
    }

    /// Takes one token at `now` if there is one.
    fn take(&mut self, burst: u32, rate: u32, now: Instant) -> bool {
        self.refill(burst, rate, now);
        match self.nano_tokens.checked_sub(NANOS_PER_TOKEN) {
            Some(left) => {
                self.nano_tokens = left;
                true
            }
            None => false,
        }
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
            control_burst: 4,
            control_per_second: 2,
        }
    }

    fn session(limits: SessionLimits, t: Instant) -> SessionState {
        let mut s = SessionState::new(limits, t);
        s.handle_authenticated("a".into(), t).unwrap();
        s
    }

    /// Takes tokens at `now` until refused; how many it got.
    fn drain(s: &mut SessionState, now: Instant) -> u32 {
        let mut n = 0;
        while s.handle_control(now).is_ok() {
            n += 1;
            assert!(n <= 1_000_000, "the bucket never empties");
        }
        n
    }

    #[test]
    fn control_messages_burst_then_refill_at_the_rate() {
        let t = Instant::now();
        let ms = Duration::from_millis;
        let mut s = session(limits(), t);
        assert_eq!(s.control_tokens(t), 4);
        assert_eq!(drain(&mut s, t), 4);
        assert_eq!(s.handle_control(t), Err(ErrorCode::RateLimited));
        // 2 a second: one token every 500 ms, not a moment earlier.
        assert_eq!(s.handle_control(t + ms(499)), Err(ErrorCode::RateLimited));
        assert_eq!(s.handle_control(t + ms(500)), Ok(()));
        assert_eq!(s.handle_control(t + ms(500)), Err(ErrorCode::RateLimited));
        // A refused message costs nothing: the next token is still due at
        // 1000 ms, and the fraction accrued while refusing is kept.
        assert_eq!(s.handle_control(t + ms(999)), Err(ErrorCode::RateLimited));
        assert_eq!(s.handle_control(t + ms(1000)), Ok(()));
        // Sustained at the rate, one message every 500 ms never fails.
        for i in 3..100 {
            assert_eq!(s.handle_control(t + ms(500 * i)), Ok(()), "{i}");
        }
    }

    #[test]
    fn an_idle_session_gets_one_burst_back_not_more() {
        let t = Instant::now();
        let mut s = session(limits(), t);
        assert_eq!(drain(&mut s, t), 4);
        let later = t + Duration::from_secs(3600);
        assert_eq!(s.control_tokens(later), 4);
        assert_eq!(drain(&mut s, later), 4);
        // Very large elapsed times neither overflow nor exceed the burst.
        let much_later = later + Duration::from_secs(1 << 32);
        let mut limits = limits();
        limits.control_burst = u32::MAX;
        limits.control_per_second = u32::MAX;
        let mut big = session(limits, t);
        assert_eq!(big.control_tokens(much_later), u32::MAX);
        big.handle_control(much_later).unwrap();
        assert_eq!(big.control_tokens(much_later), u32::MAX - 1);
        assert_eq!(s.control_tokens(much_later), 4);
        // A clock that goes backwards adds nothing.
        assert_eq!(drain(&mut s, much_later), 4);
        assert_eq!(s.handle_control(later), Err(ErrorCode::RateLimited));
    }

    #[test]
    fn rates_that_do_not_divide_a_second_do_not_drift() {
        let t = Instant::now();
        let mut limits = limits();
        limits.control_burst = 2;
        limits.control_per_second = 3;
        let mut s = session(limits, t);
        let mut sent = 0;
        // Ask every millisecond for 60 s: the burst and 3 × 60 messages get
        // through (a token comes every 333.33… ms; none is lost to rounding).
        for i in 0..=60_000 {
            if s.handle_control(t + Duration::from_millis(i)).is_ok() {
                sent += 1;
            }
        }
        assert_eq!(sent, 2 + 3 * 60);
    }

    #[test]
    fn default_limits_and_zero_turns_the_limit_off() {
        let t = Instant::now();
        let mut s = session(SessionLimits::default(), t);
        assert_eq!(drain(&mut s, t), 256);
        let next = t + Duration::from_secs(1);
        assert_eq!(drain(&mut s, next), 64);
        let mut limits = limits();
        limits.control_per_second = 0;
        let mut s = session(limits, t);
        for _ in 0..10_000 {
            assert_eq!(s.handle_control(t), Ok(()));
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
