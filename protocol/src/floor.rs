//! Floor control of a walkie group: who may talk now.
//!
//! A [`FloorState`] per group, driven by requests, releases and the clock.
//! The floor is held by one session (a connection, so the same user on two
//! devices are two holders) until it releases, disconnects, or its time runs
//! out; an emergency request takes it from a normal holder.

use std::time::{Duration, Instant};

/// The session that holds the floor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FloorHolder {
    /// The holding connection's id.
    pub session: u64,
    /// The holder's user id.
    pub user: String,
    /// Whether it was taken with emergency priority.
    pub emergency: bool,
    /// When it was granted.
    pub granted_at: Instant,
    /// When it runs out.
    pub expires_at: Instant,
}

/// The answer to a floor request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FloorDecision {
    /// The requester holds the floor now (or already did).
    Granted,
    /// The requester holds the floor now; it was taken from `previous`,
    /// who must be told.
    Preempted {
        /// The holder that lost the floor.
        previous: FloorHolder,
    },
    /// Someone else holds the floor.
    Denied {
        /// The holder.
        holder: FloorHolder,
    },
}

/// The floor of one group.
#[derive(Debug, Clone, Default)]
pub struct FloorState {
    holder: Option<FloorHolder>,
}

impl FloorState {
    /// A free floor.
    pub fn new() -> FloorState {
        FloorState::default()
    }

    /// The current holder, if any (an expired holder counts until
    /// [`FloorState::poll_expired`] removes it).
    pub fn holder(&self) -> Option<&FloorHolder> {
        self.holder.as_ref()
    }

    /// Whether `session` holds the floor at `now`.
    pub fn is_held_by(&self, session: u64, now: Instant) -> bool {
        self.holder
            .as_ref()
            .is_some_and(|h| h.session == session && now < h.expires_at)
    }

    /// Handles a request from `session` at `now` for at most `max_hold`.
    ///
    /// A request from the current holder (before its time is up) is
    /// [`FloorDecision::Granted`] and changes nothing: the hold keeps its
    /// original expiry and priority, so asking again never extends it.
    pub fn handle_request(
        &mut self,
        session: u64,
        user: &str,
        emergency: bool,
        max_hold: Duration,
        now: Instant,
    ) -> FloorDecision {
        let grant = FloorHolder {
            session,
            user: user.to_owned(),
            emergency,
            granted_at: now,
            expires_at: now + max_hold,
        };
        match self.holder.take() {
            // Free or expired.
            None => {
                self.holder = Some(grant);
                FloorDecision::Granted
            }
            Some(h) if now >= h.expires_at => {
                self.holder = Some(grant);
                FloorDecision::Granted
            }
            // Re-requested by the holder: already granted, not extended.
            Some(h) if h.session == session => {
                self.holder = Some(h);
                FloorDecision::Granted
            }
            Some(h) if emergency && !h.emergency => {
                self.holder = Some(grant);
                FloorDecision::Preempted { previous: h }
            }
            Some(h) => {
                self.holder = Some(h.clone());
                FloorDecision::Denied { holder: h }
            }
        }
    }

    /// `session` gives the floor back (clip end, release, disconnect).
    /// Returns whether it held it.
    pub fn handle_release(&mut self, session: u64) -> bool {
        if self.holder.as_ref().is_some_and(|h| h.session == session) {
            self.holder = None;
            true
        } else {
            false
        }
    }

    /// When the floor next needs attention, for the caller's timer.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.holder.as_ref().map(|h| h.expires_at)
    }

    /// Frees the floor if its holder's time is up at `now`, returning the
    /// holder that lost it.
    pub fn poll_expired(&mut self, now: Instant) -> Option<FloorHolder> {
        if self.holder.as_ref().is_some_and(|h| now >= h.expires_at) {
            self.holder.take()
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOLD: Duration = Duration::from_secs(60);

    #[test]
    fn one_talker_at_a_time_then_the_next() {
        let t = Instant::now();
        let mut f = FloorState::new();
        assert_eq!(
            f.handle_request(1, "alice", false, HOLD, t),
            FloorDecision::Granted
        );
        match f.handle_request(2, "bob", false, HOLD, t) {
            FloorDecision::Denied { holder } => assert_eq!(holder.user, "alice"),
            other => panic!("{other:?}"),
        }
        assert!(!f.handle_release(2));
        assert!(f.handle_release(1));
        assert_eq!(
            f.handle_request(2, "bob", false, HOLD, t),
            FloorDecision::Granted
        );
        assert!(f.is_held_by(2, t));
    }

    #[test]
    fn emergency_preempts_normal_but_not_emergency() {
        let t = Instant::now();
        let mut f = FloorState::new();
        f.handle_request(1, "alice", false, HOLD, t);
        match f.handle_request(2, "chief", true, HOLD, t) {
            FloorDecision::Preempted { previous } => assert_eq!(previous.session, 1),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            f.handle_request(3, "medic", true, HOLD, t),
            FloorDecision::Denied { .. }
        ));
        assert!(matches!(
            f.handle_request(1, "alice", false, HOLD, t),
            FloorDecision::Denied { .. }
        ));
    }

    #[test]
    fn a_re_request_by_the_holder_does_not_extend_the_hold() {
        let t = Instant::now();
        let mut f = FloorState::new();
        f.handle_request(1, "alice", false, HOLD, t);
        let later = t + HOLD / 2;
        assert_eq!(
            f.handle_request(1, "alice", true, HOLD, later),
            FloorDecision::Granted
        );
        let holder = f.holder().expect("still held");
        assert_eq!(holder.granted_at, t);
        assert_eq!(holder.expires_at, t + HOLD);
        assert!(!holder.emergency, "asking again does not raise priority");
        assert_eq!(f.poll_timeout(), Some(t + HOLD));
        assert!(!f.is_held_by(1, t + HOLD));
        assert_eq!(f.poll_expired(t + HOLD).map(|h| h.session), Some(1));
    }

    #[test]
    fn the_floor_expires_on_a_simulated_clock() {
        let t = Instant::now();
        let mut f = FloorState::new();
        f.handle_request(1, "alice", false, HOLD, t);
        assert_eq!(f.poll_timeout(), Some(t + HOLD));
        assert_eq!(f.poll_expired(t + HOLD - Duration::from_millis(1)), None);
        assert!(f.is_held_by(1, t + HOLD - Duration::from_millis(1)));
        assert!(!f.is_held_by(1, t + HOLD));
        // Another request after expiry is granted even before polling.
        assert_eq!(
            f.handle_request(2, "bob", false, HOLD, t + HOLD),
            FloorDecision::Granted
        );
        assert_eq!(f.poll_expired(t + HOLD), None);
        assert_eq!(f.poll_expired(t + HOLD * 2).map(|h| h.session), Some(2));
        assert!(f.holder().is_none());
    }
}
