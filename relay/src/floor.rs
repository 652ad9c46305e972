//! The floor arbiter: who may talk now in each walkie group, for the whole
//! relay.
//!
//! [`FloorArbiter`] is the seam. The relay asks it for a floor
//! ([`FloorArbiter::request`]), gives floors back ([`FloorArbiter::release`],
//! [`FloorArbiter::release_all`] on disconnect) and checks a holder before a
//! clip ([`FloorArbiter::is_held_by`]). The arbiter reports every change of
//! holder as a [`FloorEvent`], in order, to the [`FloorListener`] it was
//! built with; the relay turns those into `FloorTaken`, `FloorRevoked` and
//! `FloorIdle` messages for the group's members. The seam is shaped so a
//! several-node arbiter fits behind it: every operation is async (a
//! compare-and-set on a replicated key-value store, with the hold as the
//! key's lease), no signature holds a channel or an in-process handle, and
//! changes come back as events (which such an arbiter would read from a
//! watch on its keys) rather than as calls into the hub.
//!
//! The rules, for every implementation:
//! - One holder per group. A request from someone else is
//!   [`FloorGrant::Denied`] with the holder's user id.
//! - A request from the current holder is [`FloorGrant::Granted`] and
//!   changes nothing: no event, the original expiry (asking again never
//!   extends a hold), the original priority.
//! - An emergency request takes the floor from a normal holder
//!   ([`FloorEvent::Revoked`] with [`ErrorCode::Preempted`], then
//!   [`FloorEvent::Taken`]); an emergency holder is never pre-empted.
//! - A hold ends at `max_hold` after it was granted:
//!   [`FloorEvent::Revoked`] with [`ErrorCode::ClipTooLong`] to the holder,
//!   then [`FloorEvent::Idle`]. From its deadline on, the holder counts as
//!   gone for every operation, whether or not the timer has fired yet: a
//!   request then finds the floor free (`Revoked` for the old holder, then
//!   `Taken`, no `Idle` between), a release by the old holder returns
//!   `false`.
//! - A release (or a disconnect) by the holder emits [`FloorEvent::Idle`];
//!   by anyone else it does nothing.
//!
//! [`FloorBoard`] is the sans-IO core: every group's
//! [`ptt_protocol::FloorState`], which session holds what and the deadlines,
//! driven by `handle_*` calls with the time passed in and read with
//! [`FloorBoard::poll_timeout`]. [`LocalFloor`] is the single-node arbiter:
//! the board behind a short lock, and one driver future,
//! [`LocalFloor::run`], that sleeps until the earliest deadline. There is no
//! task per grant and nothing detached: the relay runs `run` in its task
//! tracker and waits for it on shutdown.
//!
//! Session ids identify a connection within one relay process. A
//! several-node arbiter must carry a node id next to them (or make them
//! unique across nodes) before [`FloorEvent::Revoked`] can name a session.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ptt_protocol::{ErrorCode, FloorDecision, FloorHolder, FloorState};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// A boxed future (the arbiter is used as `Arc<dyn FloorArbiter>`).
pub type FloorFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Who asks for or holds a floor: a connection and its user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Talker {
    /// The connection's id, unique in the relay.
    pub session: u64,
    /// The authenticated user.
    pub user: Arc<str>,
}

/// The answer to a floor request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FloorGrant {
    /// The talker holds the floor (now, or already did).
    Granted,
    /// Someone else holds it.
    Denied {
        /// The holder's user id.
        holder: String,
    },
    /// The arbiter cannot decide now (a several-node arbiter whose
    /// key-value store is unreachable): the request is refused with
    /// `Internal`.
    Unavailable,
}

/// A change of a group's floor, announced in order to the
/// [`FloorListener`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FloorEvent {
    /// The floor has a new holder (not announced again when the holder asks
    /// again).
    Taken {
        /// The group.
        group: String,
        /// The new holder's user id.
        user: String,
        /// Taken with emergency priority.
        emergency: bool,
    },
    /// The holder lost the floor without releasing it. Always followed by
    /// the [`FloorEvent::Taken`] or [`FloorEvent::Idle`] that replaces it.
    Revoked {
        /// The group.
        group: String,
        /// The session that held it.
        session: u64,
        /// Why: [`ErrorCode::Preempted`] (an emergency took it) or
        /// [`ErrorCode::ClipTooLong`] (its time ran out).
        code: ErrorCode,
    },
    /// The floor is free: released, expired, or its holder disconnected.
    Idle {
        /// The group.
        group: String,
    },
}

impl FloorEvent {
    /// The group the event is about.
    pub fn group(&self) -> &str {
        match self {
            FloorEvent::Taken { group, .. }
            | FloorEvent::Revoked { group, .. }
            | FloorEvent::Idle { group } => group,
        }
    }
}

/// Receives an arbiter's [`FloorEvent`]s, one at a time, in the order the
/// arbiter decided them.
///
/// Contract: `floor_event` must not block (it runs on whatever thread made
/// the change: a session's task or the arbiter's driver), so it must not
/// wait for the arbiter either; queueing messages without waiting
/// (`try_send`) is what it is for. An event may be delivered after the call
/// that caused it has returned: a distributed arbiter learns of changes
/// from a watch, and [`LocalFloor`] lets whichever caller is already
/// delivering events deliver the next ones too.
pub trait FloorListener: Send + Sync + 'static {
    /// One change of one floor.
    fn floor_event(&self, event: FloorEvent);
}

impl<F> FloorListener for F
where
    F: Fn(FloorEvent) + Send + Sync + 'static,
{
    fn floor_event(&self, event: FloorEvent) {
        self(event)
    }
}

/// Decides who holds the floor of each walkie group. See the module
/// documentation for the rules every implementation follows.
pub trait FloorArbiter: Send + Sync + std::fmt::Debug + 'static {
    /// `talker` asks for `group`'s floor, to hold it at most `max_hold`.
    fn request<'a>(
        &'a self,
        group: &'a str,
        talker: &'a Talker,
        emergency: bool,
        max_hold: Duration,
    ) -> FloorFuture<'a, FloorGrant>;

    /// `session` gives `group`'s floor back; `true` if it held it.
    fn release<'a>(&'a self, group: &'a str, session: u64) -> FloorFuture<'a, bool>;

    /// `session` is gone: every floor it holds is released. Costs in
    /// proportion to the floors it holds, not to the number of groups.
    fn release_all<'a>(&'a self, session: u64) -> FloorFuture<'a, ()>;

    /// Whether `session` holds `group`'s floor now.
    fn is_held_by<'a>(&'a self, group: &'a str, session: u64) -> FloorFuture<'a, bool>;
}

/// The sans-IO floor state of every group: holders, who holds what, and
/// the deadlines, driven with the time passed in.
///
/// - Getters: [`FloorBoard::holder`], [`FloorBoard::is_held_by`],
///   [`FloorBoard::held_count`].
/// - Handlers, each returning the events to announce in order:
///   [`FloorBoard::handle_request`], [`FloorBoard::handle_release`],
///   [`FloorBoard::handle_release_all`], [`FloorBoard::handle_timeout`].
/// - Poller: [`FloorBoard::poll_timeout`], the earliest deadline, after
///   which the caller should call [`FloorBoard::handle_timeout`].
///
/// Memory is in proportion to the floors held now: a free floor has no
/// entry.
#[derive(Debug, Default)]
pub struct FloorBoard {
    /// Groups whose floor is held (possibly past its deadline, until a
    /// handler notices).
    floors: HashMap<String, FloorState>,
    /// Session id to the groups whose floor it holds.
    held: HashMap<u64, Vec<String>>,
    /// `(expires_at, group)` of every held floor.
    deadlines: BTreeSet<(Instant, String)>,
}

impl FloorBoard {
    /// A board with every floor free.
    pub fn new() -> FloorBoard {
        FloorBoard::default()
    }

    /// The holder of `group`'s floor, if any (a holder whose time is up
    /// counts until a handler at or after its deadline removes it).
    pub fn holder(&self, group: &str) -> Option<&FloorHolder> {
        self.floors.get(group).and_then(FloorState::holder)
    }

    /// Whether `session` holds `group`'s floor at `now`.
    pub fn is_held_by(&self, group: &str, session: u64, now: Instant) -> bool {
        self.floors
            .get(group)
            .is_some_and(|floor| floor.is_held_by(session, now))
    }

    /// How many floors are held (including any past their deadline that no
    /// handler has removed yet).
    pub fn held_count(&self) -> usize {
        self.floors.len()
    }

    /// `talker` asks at `now` for `group`'s floor, for at most `max_hold`.
    pub fn handle_request(
        &mut self,
        group: &str,
        talker: &Talker,
        emergency: bool,
        max_hold: Duration,
        now: Instant,
    ) -> (FloorGrant, Vec<FloorEvent>) {
        let mut events = Vec::new();
        // A holder whose time is up has lost the floor, polled or not.
        if let Some(old) = self.take_expired(group, now) {
            events.push(revoked(group, &old, ErrorCode::ClipTooLong));
        }
        let floor = self.floors.entry(group.to_owned()).or_default();
        if floor.is_held_by(talker.session, now) {
            // Asked again: nothing changes, nothing to announce.
            return (FloorGrant::Granted, events);
        }
        match floor.handle_request(talker.session, &talker.user, emergency, max_hold, now) {
            FloorDecision::Granted => {}
            FloorDecision::Preempted { previous } => {
                self.untrack(group, &previous);
                events.push(revoked(group, &previous, ErrorCode::Preempted));
            }
            FloorDecision::Denied { holder } => {
                return (
                    FloorGrant::Denied {
                        holder: holder.user,
                    },
                    events,
                );
            }
        }
        let expires_at = self
            .holder(group)
            .map_or(now + max_hold, |holder| holder.expires_at);
        self.deadlines.insert((expires_at, group.to_owned()));
        self.held
            .entry(talker.session)
            .or_default()
            .push(group.to_owned());
        events.push(FloorEvent::Taken {
            group: group.to_owned(),
            user: talker.user.to_string(),
            emergency,
        });
        (FloorGrant::Granted, events)
    }

    /// `session` gives `group`'s floor back at `now`; `true` if it held it
    /// (a hold whose time is up is no longer held: its expiry is announced
    /// instead).
    pub fn handle_release(
        &mut self,
        group: &str,
        session: u64,
        now: Instant,
    ) -> (bool, Vec<FloorEvent>) {
        if let Some(old) = self.take_expired(group, now) {
            return (false, expired(group, &old));
        }
        let holds = self
            .holder(group)
            .is_some_and(|holder| holder.session == session);
        if !holds {
            return (false, Vec::new());
        }
        if let Some(holder) = self.take(group) {
            self.untrack(group, &holder);
        }
        (true, vec![idle(group)])
    }

    /// `session` is gone at `now`: every floor it holds becomes free. Looks
    /// only at the floors that session holds.
    pub fn handle_release_all(&mut self, session: u64, now: Instant) -> Vec<FloorEvent> {
        let groups = self.held.remove(&session).unwrap_or_default();
        let mut events = Vec::new();
        for group in groups {
            let Some(holder) = self.take(&group) else {
                continue;
            };
            self.untrack(&group, &holder);
            if now >= holder.expires_at {
                events.extend(expired(&group, &holder));
            } else {
                events.push(idle(&group));
            }
        }
        events
    }

    /// Ends every hold whose deadline is at or before `now`, earliest
    /// first.
    pub fn handle_timeout(&mut self, now: Instant) -> Vec<FloorEvent> {
        let mut events = Vec::new();
        while let Some((at, _)) = self.deadlines.first()
            && *at <= now
        {
            let Some((_, group)) = self.deadlines.pop_first() else {
                break;
            };
            if let Some(old) = self.take_expired(&group, now) {
                events.extend(expired(&group, &old));
            }
        }
        events
    }

    /// The earliest deadline of a held floor, if any: call
    /// [`FloorBoard::handle_timeout`] then.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.deadlines.first().map(|(at, _)| *at)
    }

    /// Removes `group`'s holder if its time is up at `now`, with its
    /// bookkeeping.
    fn take_expired(&mut self, group: &str, now: Instant) -> Option<FloorHolder> {
        let old = self.floors.get_mut(group)?.poll_expired(now)?;
        self.floors.remove(group);
        self.untrack(group, &old);
        Some(old)
    }

    /// Removes `group`'s holder, if any (bookkeeping is the caller's).
    fn take(&mut self, group: &str) -> Option<FloorHolder> {
        self.floors.remove(group)?.holder().cloned()
    }

    /// Forgets `holder`'s deadline and its entry in the session index.
    fn untrack(&mut self, group: &str, holder: &FloorHolder) {
        self.deadlines
            .remove(&(holder.expires_at, group.to_owned()));
        if let Some(groups) = self.held.get_mut(&holder.session) {
            groups.retain(|g| g != group);
            if groups.is_empty() {
                self.held.remove(&holder.session);
            }
        }
    }
}

/// The single-node [`FloorArbiter`]: a [`FloorBoard`] in this process's
/// memory, and one driver future, [`LocalFloor::run`], for every deadline.
///
/// The board sits behind a `std::sync::Mutex` held only while it changes,
/// never across an `.await` and never while the listener runs. Events are
/// queued under that lock, so their order is the order of the changes, and
/// delivered outside it by one caller at a time: a caller that finds
/// another one delivering leaves its events to it and returns. The
/// listener therefore never runs concurrently with itself.
///
/// Time is tokio's clock (`tokio::time::Instant`), so tests with paused
/// time drive the deadlines.
pub struct LocalFloor {
    inner: Mutex<Inner>,
    listener: Arc<dyn FloorListener>,
    /// Wakes the driver when a deadline earlier than every other appears.
    wake: Notify,
}

struct Inner {
    board: FloorBoard,
    /// Events decided but not yet delivered, in order.
    pending: VecDeque<FloorEvent>,
    /// Whether a caller is delivering `pending`.
    delivering: bool,
}

impl std::fmt::Debug for LocalFloor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let inner = self.lock();
        f.debug_struct("LocalFloor")
            .field("held", &inner.board.held_count())
            .field("next_deadline", &inner.board.poll_timeout())
            .finish()
    }
}

impl LocalFloor {
    /// An arbiter with every floor free, announcing changes to `listener`.
    /// Deadlines fire only while [`LocalFloor::run`] runs.
    pub fn new(listener: Arc<dyn FloorListener>) -> LocalFloor {
        LocalFloor {
            inner: Mutex::new(Inner {
                board: FloorBoard::new(),
                pending: VecDeque::new(),
                delivering: false,
            }),
            listener,
            wake: Notify::new(),
        }
    }

    /// Ends holds at their deadlines until `shutdown` is cancelled, then
    /// returns at once (held floors stay as they are). Run exactly one per
    /// arbiter, in the relay's task tracker; it sleeps until the earliest
    /// deadline and is woken when an earlier one appears.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            let next = {
                let now = now();
                let mut inner = self.lock();
                let events = inner.board.handle_timeout(now);
                let next = inner.board.poll_timeout();
                // Else this loop would spin without sleeping.
                debug_assert!(next.is_none_or(|at| at > now), "a due deadline is left");
                self.announce(inner, events);
                next
            };
            tokio::select! {
                biased;
                () = shutdown.cancelled() => return,
                () = self.wake.notified() => {}
                () = sleep_until(next) => {}
            }
        }
    }

    /// [`FloorArbiter::request`], without the future.
    fn request_now(
        &self,
        group: &str,
        talker: &Talker,
        emergency: bool,
        max_hold: Duration,
    ) -> FloorGrant {
        let now = now();
        let mut inner = self.lock();
        let before = inner.board.poll_timeout();
        let (grant, events) = inner
            .board
            .handle_request(group, talker, emergency, max_hold, now);
        let after = inner.board.poll_timeout();
        self.announce(inner, events);
        // `notify_one` keeps a permit if the driver is not waiting yet, so
        // a deadline added while it computes its sleep is not missed.
        if earlier(after, before) {
            self.wake.notify_one();
        }
        grant
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock is a bug in the board; its state is
        // still consistent enough to keep arbitrating other groups.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `events` and, unless another caller is delivering, delivers
    /// everything queued, releasing the lock around each batch.
    fn announce<'a>(&'a self, mut inner: MutexGuard<'a, Inner>, events: Vec<FloorEvent>) {
        inner.pending.extend(events);
        if inner.delivering || inner.pending.is_empty() {
            return;
        }
        inner.delivering = true;
        let mut guard = Delivering {
            floor: self,
            armed: true,
        };
        loop {
            let batch = std::mem::take(&mut inner.pending);
            if batch.is_empty() {
                // Cleared under the same lock that saw the queue empty, so
                // no event is left behind.
                inner.delivering = false;
                guard.armed = false;
                return;
            }
            drop(inner);
            for event in batch {
                self.listener.floor_event(event);
            }
            inner = self.lock();
        }
    }
}

/// Clears `delivering` if the listener panics, so later events still go
/// out.
struct Delivering<'a> {
    floor: &'a LocalFloor,
    armed: bool,
}

impl Drop for Delivering<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.floor.lock().delivering = false;
        }
    }
}

impl FloorArbiter for LocalFloor {
    fn request<'a>(
        &'a self,
        group: &'a str,
        talker: &'a Talker,
        emergency: bool,
        max_hold: Duration,
    ) -> FloorFuture<'a, FloorGrant> {
        Box::pin(async move { self.request_now(group, talker, emergency, max_hold) })
    }

    fn release<'a>(&'a self, group: &'a str, session: u64) -> FloorFuture<'a, bool> {
        Box::pin(async move {
            let now = now();
            let mut inner = self.lock();
            let (held, events) = inner.board.handle_release(group, session, now);
            self.announce(inner, events);
            held
        })
    }

    fn release_all<'a>(&'a self, session: u64) -> FloorFuture<'a, ()> {
        Box::pin(async move {
            let now = now();
            let mut inner = self.lock();
            let events = inner.board.handle_release_all(session, now);
            self.announce(inner, events);
        })
    }

    fn is_held_by<'a>(&'a self, group: &'a str, session: u64) -> FloorFuture<'a, bool> {
        Box::pin(async move { self.lock().board.is_held_by(group, session, now()) })
    }
}

/// The arbiter's clock: tokio's, as a std `Instant`.
fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// Sleeps until `deadline`, or forever if there is none.
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
        None => std::future::pending().await,
    }
}

/// Whether deadline `a` comes before `b` (`None` is never).
fn earlier(a: Option<Instant>, b: Option<Instant>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => a < b,
        (Some(_), None) => true,
        (None, _) => false,
    }
}

fn revoked(group: &str, holder: &FloorHolder, code: ErrorCode) -> FloorEvent {
    FloorEvent::Revoked {
        group: group.to_owned(),
        session: holder.session,
        code,
    }
}

fn idle(group: &str) -> FloorEvent {
    FloorEvent::Idle {
        group: group.to_owned(),
    }
}

/// The events of a hold that ran out.
fn expired(group: &str, holder: &FloorHolder) -> Vec<FloorEvent> {
    vec![revoked(group, holder, ErrorCode::ClipTooLong), idle(group)]
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOLD: Duration = Duration::from_secs(20);
    const MS: Duration = Duration::from_millis(1);

    fn talker(session: u64, user: &str) -> Talker {
        Talker {
            session,
            user: user.into(),
        }
    }

    fn taken(group: &str, user: &str, emergency: bool) -> FloorEvent {
        FloorEvent::Taken {
            group: group.into(),
            user: user.into(),
            emergency,
        }
    }

    fn revoked_ev(group: &str, session: u64, code: ErrorCode) -> FloorEvent {
        FloorEvent::Revoked {
            group: group.into(),
            session,
            code,
        }
    }

    fn idle_ev(group: &str) -> FloorEvent {
        FloorEvent::Idle {
            group: group.into(),
        }
    }

    fn denied(holder: &str) -> FloorGrant {
        FloorGrant::Denied {
            holder: holder.into(),
        }
    }

    #[test]
    fn grants_one_talker_and_denies_the_others() {
        let t = Instant::now();
        let mut b = FloorBoard::new();
        let (alice, bob) = (talker(1, "alice"), talker(2, "bob"));
        assert_eq!(
            b.handle_request("g", &alice, false, HOLD, t),
            (FloorGrant::Granted, vec![taken("g", "alice", false)])
        );
        assert_eq!(
            b.handle_request("g", &bob, false, HOLD, t + MS),
            (denied("alice"), vec![])
        );
        assert!(b.is_held_by("g", 1, t + MS));
        assert!(!b.is_held_by("g", 2, t + MS));
        // Another group is independent.
        assert_eq!(
            b.handle_request("h", &bob, false, HOLD, t),
            (FloorGrant::Granted, vec![taken("h", "bob", false)])
        );
        assert_eq!(b.held_count(), 2);
    }

    #[test]
    fn a_re_request_by_the_holder_announces_nothing_and_keeps_the_expiry() {
        let t = Instant::now();
        let mut b = FloorBoard::new();
        let alice = talker(1, "alice");
        b.handle_request("g", &alice, false, HOLD, t);
        for later in [t + MS, t + HOLD / 2, t + HOLD - MS] {
            assert_eq!(
                b.handle_request("g", &alice, false, HOLD, later),
                (FloorGrant::Granted, vec![])
            );
        }
        assert_eq!(b.poll_timeout(), Some(t + HOLD));
        assert_eq!(b.holder("g").map(|h| h.expires_at), Some(t + HOLD));
        assert_eq!(
            b.handle_timeout(t + HOLD),
            vec![revoked_ev("g", 1, ErrorCode::ClipTooLong), idle_ev("g")]
        );
        // The session index holds the group once: nothing left to release.
        assert_eq!(b.handle_release_all(1, t + HOLD), vec![]);
    }

    #[test]
    fn a_hold_expires_at_its_deadline_exactly_once() {
        let t = Instant::now();
        let mut b = FloorBoard::new();
        b.handle_request("g", &talker(1, "alice"), false, HOLD, t);
        assert_eq!(b.poll_timeout(), Some(t + HOLD));
        assert_eq!(b.handle_timeout(t + HOLD - MS), vec![]);
        assert!(b.is_held_by("g", 1, t + HOLD - MS));
        assert!(!b.is_held_by("g", 1, t + HOLD));
        assert_eq!(
            b.handle_timeout(t + HOLD),
            vec![revoked_ev("g", 1, ErrorCode::ClipTooLong), idle_ev("g")]
        );
        assert_eq!(b.handle_timeout(t + HOLD * 2), vec![]);
        assert_eq!(b.poll_timeout(), None);
        assert!(b.holder("g").is_none());
        assert_eq!(b.held_count(), 0);
    }

    #[test]
    fn a_request_after_the_deadline_finds_the_floor_free_before_the_timer() {
        let t = Instant::now();
        let mut b = FloorBoard::new();
        b.handle_request("g", &talker(1, "alice"), false, HOLD, t);
        assert_eq!(
            b.handle_request("g", &talker(2, "bob"), false, HOLD, t + HOLD),
            (
                FloorGrant::Granted,
                vec![
                    revoked_ev("g", 1, ErrorCode::ClipTooLong),
                    taken("g", "bob", false)
                ]
            )
        );
        // The old deadline is gone; the old holder holds nothing.
        assert_eq!(b.poll_timeout(), Some(t + HOLD * 2));
        assert_eq!(b.handle_timeout(t + HOLD), vec![]);
        assert_eq!(b.handle_release_all(1, t + HOLD), vec![]);
        assert!(b.is_held_by("g", 2, t + HOLD));
    }

    #[test]
    fn a_release_after_the_deadline_announces_the_expiry() {
        let t = Instant::now();
        let mut b = FloorBoard::new();
        b.handle_request("g", &talker(1, "alice"), false, HOLD, t);
        assert_eq!(
            b.handle_release("g", 1, t + HOLD),
            (
                false,
                vec![revoked_ev("g", 1, ErrorCode::ClipTooLong), idle_ev("g")]
            )
        );
        assert_eq!(b.handle_timeout(t + HOLD), vec![]);
        assert_eq!(b.poll_timeout(), None);
    }

    #[test]
    fn emergency_preempts_a_normal_holder_but_never_an_emergency_one() {
        let t = Instant::now();
        let mut b = FloorBoard::new();
        let (alice, chief, medic) = (talker(1, "alice"), talker(2, "chief"), talker(3, "medic"));
        b.handle_request("g", &alice, false, HOLD, t);
        assert_eq!(
            b.handle_request("g", &chief, true, HOLD, t + MS),
            (
                FloorGrant::Granted,
                vec![
                    revoked_ev("g", 1, ErrorCode::Preempted),
                    taken("g", "chief", true)
                ]
            )
        );
        assert_eq!(
            b.handle_request("g", &medic, true, HOLD, t + MS * 2),
            (denied("chief"), vec![])
        );
        assert_eq!(
            b.handle_request("g", &alice, false, HOLD, t + MS * 2),
            (denied("chief"), vec![])
        );
        // The pre-empted holder's deadline and index entry are gone.
        assert_eq!(b.poll_timeout(), Some(t + MS + HOLD));
        assert_eq!(b.handle_release_all(1, t + MS * 2), vec![]);
        assert_eq!(b.handle_release("g", 1, t + MS * 2), (false, vec![]));
        assert!(b.is_held_by("g", 2, t + MS * 2));
    }

    #[test]
    fn release_frees_only_a_floor_the_session_holds() {
        let t = Instant::now();
        let mut b = FloorBoard::new();
        assert_eq!(b.handle_release("g", 1, t), (false, vec![]));
        b.handle_request("g", &talker(1, "alice"), false, HOLD, t);
        assert_eq!(b.handle_release("g", 2, t), (false, vec![]));
        assert_eq!(b.handle_release("other", 1, t), (false, vec![]));
        assert_eq!(b.handle_release("g", 1, t), (true, vec![idle_ev("g")]));
        assert_eq!(b.handle_release("g", 1, t), (false, vec![]));
        assert_eq!(b.poll_timeout(), None);
        assert_eq!(b.handle_timeout(t + HOLD), vec![]);
        assert_eq!(b.held_count(), 0);
    }

    #[test]
    fn release_all_frees_only_that_sessions_floors() {
        let t = Instant::now();
        let mut b = FloorBoard::new();
        let (alice, bob) = (talker(1, "alice"), talker(2, "bob"));
        b.handle_request("g1", &alice, false, HOLD, t);
        b.handle_request("g2", &alice, false, HOLD * 2, t);
        b.handle_request("g3", &bob, false, HOLD * 3, t);
        b.handle_request("g1", &bob, false, HOLD, t);
        assert_eq!(
            b.handle_release_all(1, t + MS),
            vec![idle_ev("g1"), idle_ev("g2")]
        );
        assert!(b.is_held_by("g3", 2, t + MS));
        assert_eq!(b.poll_timeout(), Some(t + HOLD * 3));
        assert_eq!(b.handle_release_all(1, t + MS), vec![]);
        assert_eq!(b.handle_release_all(9, t + MS), vec![]);
        // At or after a deadline, the hold ends as an expiry.
        assert_eq!(
            b.handle_release_all(2, t + HOLD * 3),
            vec![revoked_ev("g3", 2, ErrorCode::ClipTooLong), idle_ev("g3")]
        );
        assert_eq!(b.held_count(), 0);
        assert_eq!(b.poll_timeout(), None);
    }

    #[test]
    fn many_groups_expire_in_deadline_order() {
        let t = Instant::now();
        let mut b = FloorBoard::new();
        // Granted in one order, due in another.
        let holds = [("c", 3), ("a", 1), ("e", 5), ("b", 2), ("d", 4)];
        for (i, (group, secs)) in holds.iter().enumerate() {
            let who = talker(i as u64, group);
            b.handle_request(group, &who, false, Duration::from_secs(*secs), t);
        }
        let mut order = Vec::new();
        for _ in 0..holds.len() {
            let at = b.poll_timeout().expect("a deadline is left");
            for event in b.handle_timeout(at) {
                if let FloorEvent::Idle { group } = event {
                    order.push((group, at - t));
                }
            }
        }
        assert_eq!(b.poll_timeout(), None);
        let expected: Vec<(String, Duration)> = ["a", "b", "c", "d", "e"]
            .iter()
            .zip(1..)
            .map(|(g, s)| (g.to_string(), Duration::from_secs(s)))
            .collect();
        assert_eq!(order, expected);

        // All at once: still earliest first, each Revoked before its Idle.
        let mut b = FloorBoard::new();
        for (i, (group, secs)) in holds.iter().enumerate() {
            let who = talker(i as u64, group);
            b.handle_request(group, &who, false, Duration::from_secs(*secs), t);
        }
        let groups: Vec<String> = b
            .handle_timeout(t + Duration::from_secs(10))
            .into_iter()
            .map(|e| e.group().to_owned())
            .collect();
        assert_eq!(groups, ["a", "a", "b", "b", "c", "c", "d", "d", "e", "e"]);
    }

    /// Records events with the (paused) tokio time since `start`.
    struct Recorder {
        start: tokio::time::Instant,
        events: Mutex<Vec<(Duration, FloorEvent)>>,
    }

    impl Recorder {
        fn new() -> Arc<Recorder> {
            Arc::new(Recorder {
                start: tokio::time::Instant::now(),
                events: Mutex::new(Vec::new()),
            })
        }

        fn take(&self) -> Vec<(Duration, FloorEvent)> {
            std::mem::take(&mut *self.events.lock().unwrap())
        }
    }

    impl FloorListener for Recorder {
        fn floor_event(&self, event: FloorEvent) {
            let at = self.start.elapsed();
            self.events.lock().unwrap().push((at, event));
        }
    }

    /// Cancels `shutdown` and waits (a paused second at most) for the
    /// driver to return.
    async fn stop(shutdown: CancellationToken, driver: tokio::task::JoinHandle<()>) {
        shutdown.cancel();
        tokio::time::timeout(secs(1), driver)
            .await
            .expect("run returns when shutdown is cancelled")
            .expect("run does not panic");
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[tokio::test(start_paused = true)]
    async fn the_driver_expires_a_hold_at_its_deadline() {
        let rec = Recorder::new();
        let floor = Arc::new(LocalFloor::new(rec.clone()));
        let shutdown = CancellationToken::new();
        let driver = tokio::spawn(floor.clone().run(shutdown.clone()));
        let alice = talker(1, "alice");
        let grant = floor.request("g", &alice, false, secs(20)).await;
        assert_eq!(grant, FloorGrant::Granted);
        tokio::time::sleep(secs(20) - MS).await;
        assert!(floor.is_held_by("g", 1).await);
        assert_eq!(rec.take(), vec![(secs(0), taken("g", "alice", false))]);
        tokio::time::sleep(secs(40)).await;
        assert!(!floor.is_held_by("g", 1).await);
        assert_eq!(
            rec.take(),
            vec![
                (secs(20), revoked_ev("g", 1, ErrorCode::ClipTooLong)),
                (secs(20), idle_ev("g")),
            ]
        );
        stop(shutdown, driver).await;
    }

    #[tokio::test(start_paused = true)]
    async fn an_earlier_deadline_rearms_the_driver() {
        let rec = Recorder::new();
        let floor = Arc::new(LocalFloor::new(rec.clone()));
        let shutdown = CancellationToken::new();
        let driver = tokio::spawn(floor.clone().run(shutdown.clone()));
        floor
            .request("g1", &talker(1, "alice"), false, secs(20))
            .await;
        // The driver is asleep until 20 s when a 6 s deadline appears.
        tokio::time::sleep(secs(1)).await;
        floor.request("g2", &talker(2, "bob"), false, secs(5)).await;
        tokio::time::sleep(secs(30)).await;
        assert_eq!(
            rec.take(),
            vec![
                (secs(0), taken("g1", "alice", false)),
                (secs(1), taken("g2", "bob", false)),
                (secs(6), revoked_ev("g2", 2, ErrorCode::ClipTooLong)),
                (secs(6), idle_ev("g2")),
                (secs(20), revoked_ev("g1", 1, ErrorCode::ClipTooLong)),
                (secs(20), idle_ev("g1")),
            ]
        );
        stop(shutdown, driver).await;
    }

    #[tokio::test(start_paused = true)]
    async fn cancelling_shutdown_ends_the_driver_at_once_despite_a_pending_deadline() {
        let rec = Recorder::new();
        let floor = Arc::new(LocalFloor::new(rec.clone()));
        let shutdown = CancellationToken::new();
        let driver = tokio::spawn(floor.clone().run(shutdown.clone()));
        floor
            .request("g", &talker(1, "alice"), false, secs(60))
            .await;
        tokio::task::yield_now().await; // the driver sleeps until 60 s
        let start = tokio::time::Instant::now();
        stop(shutdown, driver).await;
        assert_eq!(start.elapsed(), Duration::ZERO);
        // Nothing was left behind holding the arbiter, and the deadline
        // never fired.
        assert_eq!(Arc::strong_count(&floor), 1);
        assert_eq!(rec.take(), vec![(secs(0), taken("g", "alice", false))]);
    }

    #[tokio::test(start_paused = true)]
    async fn release_and_release_all_announce_through_the_arbiter() {
        let rec = Recorder::new();
        let floor: Arc<dyn FloorArbiter> = Arc::new(LocalFloor::new(rec.clone()));
        let (alice, bob) = (talker(1, "alice"), talker(2, "bob"));
        floor.request("g1", &alice, false, HOLD).await;
        floor.request("g2", &alice, false, HOLD).await;
        assert_eq!(
            floor.request("g1", &bob, false, HOLD).await,
            denied("alice")
        );
        assert!(!floor.release("g1", 2).await);
        assert!(floor.release("g1", 1).await);
        floor.release_all(1).await;
        let events: Vec<FloorEvent> = rec.take().into_iter().map(|(_, e)| e).collect();
        assert_eq!(
            events,
            vec![
                taken("g1", "alice", false),
                taken("g2", "alice", false),
                idle_ev("g1"),
                idle_ev("g2"),
            ]
        );
    }

    /// A listener that calls back into the arbiter: `LocalFloor` never runs
    /// it under its lock (else this deadlocks), and what the nested call
    /// announces comes after the event being delivered.
    #[test]
    fn the_listener_runs_outside_the_lock_and_in_order() {
        struct Reentrant {
            floor: std::sync::OnceLock<std::sync::Weak<LocalFloor>>,
            events: Mutex<Vec<FloorEvent>>,
        }
        impl FloorListener for Reentrant {
            fn floor_event(&self, event: FloorEvent) {
                let first = matches!(&event, FloorEvent::Taken { group, .. } if group == "g1");
                self.events.lock().unwrap().push(event);
                if first && let Some(floor) = self.floor.get().and_then(|w| w.upgrade()) {
                    let bob = talker(2, "bob");
                    let mut fut = floor.request("g2", &bob, false, HOLD);
                    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
                    assert!(fut.as_mut().poll(&mut cx).is_ready());
                }
            }
        }
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let listener = Arc::new(Reentrant {
                floor: std::sync::OnceLock::new(),
                events: Mutex::new(Vec::new()),
            });
            let floor = Arc::new(LocalFloor::new(listener.clone()));
            let _ = listener.floor.set(Arc::downgrade(&floor));
            let alice = talker(1, "alice");
            let mut fut = floor.request("g1", &alice, false, HOLD);
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            assert!(fut.as_mut().poll(&mut cx).is_ready());
            drop(fut);
            let events = std::mem::take(&mut *listener.events.lock().unwrap());
            let _ = done_tx.send(events);
        });
        let events = done_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the listener deadlocked on the arbiter's lock");
        assert_eq!(
            events,
            vec![taken("g1", "alice", false), taken("g2", "bob", false)]
        );
    }
}
