//! Limits on what one address or one user may cost the relay, across all
//! their connections: connections per IP address, new handshakes per
//! second (with QUIC address validation above the rate), clips per
//! minute per user, and frames per second per user. The per-connection limits (streams, message sizes,
//! control-message rate, clips per connection) live with the session
//! (`ptt_protocol::SessionState`) and the transport (`tls`).
//!
//! Each is sans-IO: time is passed in, so tests run on a simulated clock.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use ptt_protocol::ErrorCode;

/// Open connections per remote IP address.
#[derive(Debug, Default)]
pub struct ConnectionsPerIp {
    open: DashMap<IpAddr, u32>,
}

/// One connection counted against its address; dropping it gives the
/// place back.
#[derive(Debug)]
pub struct IpSlot {
    owner: Arc<ConnectionsPerIp>,
    ip: IpAddr,
}

impl ConnectionsPerIp {
    /// Counts a new connection from `ip` if it has fewer than `max` open;
    /// `None` when it has `max` already.
    pub fn acquire(self: &Arc<Self>, ip: IpAddr, max: u32) -> Option<IpSlot> {
        let mut open = self.open.entry(ip).or_insert(0);
        if *open >= max {
            return None;
        }
        *open += 1;
        Some(IpSlot {
            owner: self.clone(),
            ip,
        })
    }

    /// Connections open from `ip`.
    pub fn count(&self, ip: IpAddr) -> u32 {
        self.open.get(&ip).map(|n| *n).unwrap_or(0)
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        // Entries of addresses with no connection are removed, so the map
        // holds only addresses that have one.
        self.owner.open.remove_if_mut(&self.ip, |_, n| {
            *n = n.saturating_sub(1);
            *n == 0
        });
    }
}

/// A token bucket of new handshakes: `per_second` sustained, the same
/// again as a burst. Above it the relay asks unvalidated addresses to
/// prove they receive at their address (a QUIC Retry) before it spends a
/// handshake on them.
#[derive(Debug)]
pub struct HandshakeRate {
    per_second: f64,
    tokens: f64,
    last: Instant,
}

impl HandshakeRate {
    /// A full bucket at `now`; `per_second` 0 admits everything.
    pub fn new(per_second: u32, now: Instant) -> HandshakeRate {
        HandshakeRate {
            per_second: f64::from(per_second),
            tokens: f64::from(per_second),
            last: now,
        }
    }

    /// Whether the bucket is full at `now` (nothing taken for a while).
    pub fn is_full(&self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens + elapsed * self.per_second >= self.per_second
    }

    /// Whether a new handshake at `now` is within the rate (and takes a
    /// token if so).
    pub fn admit(&mut self, now: Instant) -> bool {
        if self.per_second == 0.0 {
            return true;
        }
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.per_second);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// What to do with a new handshake, per [`HandshakesPerIp`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeVerdict {
    /// Go ahead.
    Admit,
    /// Ask the client to validate its address first (QUIC Retry).
    Retry,
    /// Refuse: a validated address over its rate.
    Refuse,
}

/// New handshakes per remote IP address, in two buckets: every handshake
/// takes from the first, and an address whose first bucket is empty must
/// validate (Retry); validated handshakes take from the second, and an
/// address that is empty there too is refused. A spoofer can drain only
/// the first bucket of the address it fakes (its owner then pays one
/// round trip); only a client that receives at its address drains the
/// second, so one flooding address is held to twice the rate.
#[derive(Debug)]
pub struct HandshakesPerIp {
    per_second: u32,
    buckets: std::collections::HashMap<IpAddr, (HandshakeRate, HandshakeRate)>,
}

/// Addresses tracked at most; past it, idle ones are forgotten, and if
/// none is, a new address must validate (its place costs the relay
/// nothing until it has).
const MAX_TRACKED: usize = 65_536;

impl HandshakesPerIp {
    /// `per_second` handshakes (and as many again once validated) per
    /// address; 0 admits everything.
    pub fn new(per_second: u32) -> HandshakesPerIp {
        HandshakesPerIp {
            per_second,
            buckets: Default::default(),
        }
    }

    /// The verdict for a handshake from `ip` at `now`.
    pub fn check(&mut self, ip: IpAddr, validated: bool, now: Instant) -> HandshakeVerdict {
        if self.per_second == 0 {
            return HandshakeVerdict::Admit;
        }
        if !self.buckets.contains_key(&ip) && self.buckets.len() >= MAX_TRACKED {
            self.buckets
                .retain(|_, (any, valid)| !(any.is_full(now) && valid.is_full(now)));
            if self.buckets.len() >= MAX_TRACKED {
                return if validated {
                    HandshakeVerdict::Admit
                } else {
                    HandshakeVerdict::Retry
                };
            }
        }
        let rate = self.per_second;
        let (any, valid) = self
            .buckets
            .entry(ip)
            .or_insert_with(|| (HandshakeRate::new(rate, now), HandshakeRate::new(rate, now)));
        if validated {
            if valid.admit(now) {
                HandshakeVerdict::Admit
            } else {
                HandshakeVerdict::Refuse
            }
        } else if any.admit(now) {
            HandshakeVerdict::Admit
        } else {
            HandshakeVerdict::Retry
        }
    }
}

/// Clips each user started in the last minute, over all their
/// connections (a client cannot multiply its rate by opening more).
#[derive(Debug, Default)]
pub struct ClipsPerUser {
    starts: DashMap<Arc<str>, VecDeque<Instant>>,
    calls: AtomicU64,
}

/// The window of [`ClipsPerUser`].
const MINUTE: Duration = Duration::from_secs(60);

impl ClipsPerUser {
    /// Records a clip start of `user` at `now` if fewer than `max` started
    /// in the minute before; `Err(RateLimited)` otherwise. `max` 0: no
    /// limit.
    pub fn start(&self, user: &str, max: u32, now: Instant) -> Result<(), ErrorCode> {
        if max == 0 {
            return Ok(());
        }
        // Now and then, forget users with no start in the window, so the
        // map holds only users active in the last minute.
        if self.calls.fetch_add(1, Ordering::Relaxed) % 1024 == 1023 {
            self.starts.retain(|_, starts| {
                starts
                    .back()
                    .is_some_and(|&t| now.saturating_duration_since(t) < MINUTE)
            });
        }
        let mut starts = self.starts.entry(user.into()).or_default();
        while starts
            .front()
            .is_some_and(|&t| now.saturating_duration_since(t) >= MINUTE)
        {
            starts.pop_front();
        }
        if starts.len() >= max as usize {
            return Err(ErrorCode::RateLimited);
        }
        starts.push_back(now);
        Ok(())
    }

    /// Users with a start in the map (tests).
    pub fn users(&self) -> usize {
        self.starts.len()
    }
}

/// A token bucket: `per_second` sustained, at most `burst` at once.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    per_second: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket at `now`.
    pub fn new(per_second: u32, burst: u32, now: Instant) -> TokenBucket {
        TokenBucket {
            per_second: f64::from(per_second),
            burst: f64::from(burst),
            tokens: f64::from(burst),
            last: now,
        }
    }

    /// Takes one token at `now` if there is one.
    pub fn take(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Whether the bucket is full again at `now`.
    pub fn is_full(&self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens + elapsed * self.per_second >= self.burst
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = self.last.max(now);
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.burst);
    }
}

/// Clip frames each user uploads, over all their connections: a token
/// bucket per user, `per_second` sustained with a burst of `burst`. A
/// talker speaking in real time sends 50 frames a second (20 ms frames);
/// the burst lets a client re-send a whole stored clip at once after a
/// reconnect. Without it, frames sent faster than real time are bounded
/// only per clip (`max_clip` of audio), and a user could push
/// `user_clips_per_minute` whole clips a minute through the fan-out.
#[derive(Debug)]
pub struct FramesPerUser {
    per_second: u32,
    burst: u32,
    buckets: DashMap<Arc<str>, Arc<Mutex<TokenBucket>>>,
    calls: AtomicU64,
}

/// One user's share of [`FramesPerUser`], taken at the start of an upload
/// so that each frame costs one uncontended lock, not a map lookup.
#[derive(Debug, Clone)]
pub struct UserFrames(Option<Arc<Mutex<TokenBucket>>>);

impl FramesPerUser {
    /// `per_second` frames sustained per user with a burst of `burst`;
    /// `per_second` 0: no limit.
    pub fn new(per_second: u32, burst: u32) -> FramesPerUser {
        FramesPerUser {
            per_second,
            burst: burst.max(1),
            buckets: DashMap::new(),
            calls: AtomicU64::new(0),
        }
    }

    /// The bucket of `user` (shared by all their uploads), made full at
    /// `now` if the user had none.
    pub fn user(&self, user: &str, now: Instant) -> UserFrames {
        if self.per_second == 0 {
            return UserFrames(None);
        }
        // Now and then, forget users with no upload under way and a full
        // bucket: the map holds only users who uploaded recently.
        if self.calls.fetch_add(1, Ordering::Relaxed) % 1024 == 1023 {
            self.buckets.retain(|_, bucket| {
                Arc::strong_count(bucket) > 1 || !bucket.lock().is_ok_and(|b| b.is_full(now))
            });
        }
        let bucket = self
            .buckets
            .entry(user.into())
            .or_insert_with(|| {
                Arc::new(Mutex::new(TokenBucket::new(
                    self.per_second,
                    self.burst,
                    now,
                )))
            })
            .clone();
        UserFrames(Some(bucket))
    }

    /// Users with a bucket in the map (tests).
    pub fn users(&self) -> usize {
        self.buckets.len()
    }
}

impl UserFrames {
    /// Counts one frame at `now`; `Err(RateLimited)` when the user's
    /// bucket is empty.
    pub fn frame(&self, now: Instant) -> Result<(), ErrorCode> {
        let Some(bucket) = &self.0 else {
            return Ok(());
        };
        // A poisoned lock only means another upload panicked mid-update;
        // the bucket's numbers are still valid.
        let mut bucket = bucket.lock().unwrap_or_else(|e| e.into_inner());
        if bucket.take(now) {
            Ok(())
        } else {
            Err(ErrorCode::RateLimited)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_gets_max_connections_and_its_places_back() {
        let limit = Arc::new(ConnectionsPerIp::default());
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        let other: IpAddr = "192.0.2.8".parse().unwrap();
        let a = limit.acquire(ip, 2).unwrap();
        let _b = limit.acquire(ip, 2).unwrap();
        assert!(limit.acquire(ip, 2).is_none());
        let _c = limit
            .acquire(other, 2)
            .expect("another address is not affected");
        drop(a);
        assert_eq!(limit.count(ip), 1);
        let _d = limit.acquire(ip, 2).unwrap();
        drop((_b, _d));
        assert_eq!(limit.count(ip), 0);
        assert!(!limit.open.contains_key(&ip), "no entry left behind");
    }

    #[test]
    fn handshakes_above_the_rate_are_not_admitted_until_it_refills() {
        let t = Instant::now();
        let mut rate = HandshakeRate::new(10, t);
        assert_eq!(
            (0..15).filter(|_| rate.admit(t)).count(),
            10,
            "a burst of 10"
        );
        assert!(!rate.admit(t + Duration::from_millis(50)));
        assert!(
            rate.admit(t + Duration::from_millis(150)),
            "one more per 100 ms"
        );
        assert!(!rate.admit(t + Duration::from_millis(160)));
        let mut open = HandshakeRate::new(0, t);
        assert!((0..1000).all(|_| open.admit(t)));
    }

    #[test]
    fn a_flooding_address_is_retried_then_refused_and_a_spoofed_one_only_retried() {
        use HandshakeVerdict::*;
        let t = Instant::now();
        let mut limit = HandshakesPerIp::new(2);
        let flooder: IpAddr = "192.0.2.1".parse().unwrap();
        let other: IpAddr = "192.0.2.2".parse().unwrap();
        assert_eq!(limit.check(flooder, false, t), Admit);
        assert_eq!(limit.check(flooder, false, t), Admit);
        assert_eq!(limit.check(flooder, false, t), Retry);
        // Back validated: the second bucket, then refused.
        assert_eq!(limit.check(flooder, true, t), Admit);
        assert_eq!(limit.check(flooder, true, t), Admit);
        assert_eq!(limit.check(flooder, true, t), Refuse);
        assert_eq!(
            limit.check(other, false, t),
            Admit,
            "others are not affected"
        );
        // A spoofer drains only the first bucket: the owner validates and
        // gets in.
        for _ in 0..100 {
            limit.check(other, false, t);
        }
        assert_eq!(limit.check(other, false, t), Retry);
        assert_eq!(limit.check(other, true, t), Admit);
        // Refilled after a second.
        assert_eq!(
            limit.check(flooder, true, t + Duration::from_secs(1)),
            Admit
        );
        assert_eq!(HandshakesPerIp::new(0).check(flooder, false, t), Admit);
    }

    #[test]
    fn a_user_has_max_clips_a_minute_across_connections() {
        let t = Instant::now();
        let clips = ClipsPerUser::default();
        for i in 0..3 {
            clips.start("alice", 3, t + Duration::from_secs(i)).unwrap();
        }
        assert_eq!(
            clips.start("alice", 3, t + Duration::from_secs(10)),
            Err(ErrorCode::RateLimited)
        );
        clips
            .start("bob", 3, t)
            .expect("another user is not affected");
        clips
            .start("alice", 3, t + Duration::from_secs(60))
            .expect("the first start left the window");
        assert!(clips.start("alice", 0, t).is_ok(), "0: no limit");
    }

    #[test]
    fn idle_users_are_forgotten() {
        let t = Instant::now();
        let clips = ClipsPerUser::default();
        for i in 0..1000 {
            clips.start(&format!("user{i}"), 5, t).unwrap();
        }
        let later = t + Duration::from_secs(61);
        for _ in 0..30 {
            clips.start("alice", 1000, later).unwrap();
        }
        assert!(clips.users() <= 2, "{} users kept", clips.users());
    }

    #[test]
    fn a_user_gets_a_burst_of_frames_then_the_rate_over_all_uploads() {
        let t = Instant::now();
        let limit = FramesPerUser::new(50, 100);
        let phone = limit.user("alice", t);
        let laptop = limit.user("alice", t);
        assert!((0..60).all(|_| phone.frame(t).is_ok()));
        assert!((0..40).all(|_| laptop.frame(t).is_ok()));
        assert_eq!(
            phone.frame(t),
            Err(ErrorCode::RateLimited),
            "the burst is shared by the user's uploads"
        );
        let later = t + Duration::from_millis(100);
        assert!((0..5).all(|_| laptop.frame(later).is_ok()), "50 a second");
        assert_eq!(laptop.frame(later), Err(ErrorCode::RateLimited));
        let bob = limit.user("bob", t);
        assert!(
            (0..100).all(|_| bob.frame(t).is_ok()),
            "another user is not affected"
        );
        let full = t + Duration::from_secs(10);
        assert_eq!(
            (0..200).filter(|_| phone.frame(full).is_ok()).count(),
            100,
            "refilled to the burst, not beyond"
        );
        let open = FramesPerUser::new(0, 0).user("alice", t);
        assert!((0..10_000).all(|_| open.frame(t).is_ok()), "0: no limit");
    }

    #[test]
    fn users_without_an_upload_and_a_full_bucket_are_forgotten() {
        let t = Instant::now();
        let limit = FramesPerUser::new(50, 100);
        for i in 0..1000 {
            limit.user(&format!("user{i}"), t).frame(t).unwrap();
        }
        let uploading = limit.user("alice", t);
        let later = t + Duration::from_secs(5);
        for _ in 0..30 {
            limit.user("bob", later);
        }
        assert!(limit.users() <= 3, "{} users kept", limit.users());
        uploading.frame(later).expect("a kept bucket still works");
    }
}
