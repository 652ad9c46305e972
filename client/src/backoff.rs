//! Exponential back-off between reconnection attempts.

use std::time::Duration;

use crate::config::ReconnectPolicy;

/// The delays of successive reconnection attempts under a
/// [`ReconnectPolicy`].
#[derive(Debug, Clone)]
pub struct Backoff {
    policy: ReconnectPolicy,
    attempt: u32,
}

impl Backoff {
    /// Starts before the first attempt.
    pub fn new(policy: ReconnectPolicy) -> Backoff {
        Backoff { policy, attempt: 0 }
    }

    /// Failed attempts so far.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    /// The delay to wait before the next attempt, or `None` when the
    /// policy's attempts are used up. Counts the attempt.
    pub fn next_delay(&mut self) -> Option<Duration> {
        self.next_delay_with(rand::random::<f64>())
    }

    /// [`Backoff::next_delay`] with the random draw (in `[0, 1)`) given, for
    /// tests.
    pub fn next_delay_with(&mut self, random: f64) -> Option<Duration> {
        if self
            .policy
            .max_attempts
            .is_some_and(|max| self.attempt >= max)
        {
            return None;
        }
        let base = self.policy.initial_delay.as_secs_f64()
            * self
                .policy
                .multiplier
                .max(1.0)
                .powi(self.attempt.min(64) as i32);
        let capped = base.min(self.policy.max_delay.as_secs_f64());
        let delay = if self.policy.jitter {
            capped * (1.0 - 0.5 * random.clamp(0.0, 1.0))
        } else {
            capped
        };
        self.attempt = self.attempt.saturating_add(1);
        Some(Duration::from_secs_f64(delay))
    }

    /// A connection succeeded: start again from the initial delay.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(jitter: bool, max_attempts: Option<u32>) -> ReconnectPolicy {
        ReconnectPolicy {
            initial_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(1),
            multiplier: 2.0,
            jitter,
            max_attempts,
        }
    }

    #[test]
    fn delays_double_up_to_the_cap_and_reset() {
        let mut b = Backoff::new(policy(false, None));
        let ms: Vec<u128> = (0..6)
            .map(|_| b.next_delay().unwrap().as_millis())
            .collect();
        assert_eq!(ms, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(b.attempts(), 6);
        b.reset();
        assert_eq!(b.next_delay().unwrap(), Duration::from_millis(100));
    }

    #[test]
    fn jitter_stays_between_half_and_the_full_delay() {
        let mut b = Backoff::new(policy(true, None));
        assert_eq!(b.next_delay_with(0.0).unwrap(), Duration::from_millis(100));
        assert_eq!(b.next_delay_with(1.0).unwrap(), Duration::from_millis(100));
        // Attempts 2 and 3 (400 and 800 ms); from then on the cap applies.
        b.next_delay();
        b.next_delay();
        for _ in 0..100 {
            let d = b.next_delay().unwrap();
            assert!(
                d >= Duration::from_millis(500) && d <= Duration::from_secs(1),
                "{d:?}"
            );
        }
    }

    #[test]
    fn attempts_run_out() {
        let mut b = Backoff::new(policy(false, Some(2)));
        assert!(b.next_delay().is_some());
        assert!(b.next_delay().is_some());
        assert!(b.next_delay().is_none());
        b.reset();
        assert!(b.next_delay().is_some());
    }
}
