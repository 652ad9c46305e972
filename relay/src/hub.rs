//! The node's live plane: which sessions on this node listen to which
//! group, the clips in flight, and the order in which stored clips become
//! visible to them.
//!
//! The hub is the same whatever [`GroupLog`] the relay runs on. For every
//! group that has listeners (or a clip in flight) on this node it keeps one
//! [`GroupFeed`] and applies what it yields, in order:
//!
//! - a **stored** clip ends the matching clip in flight (its members get
//!   `ClipEnd` with the sequence number), or, if this node never saw it live
//!   (another node's, or one whose live copy was replaced), goes to every
//!   listener complete; either way `last_published` moves to it. So a member
//!   that joins sees every clip either as "stored up to `last_published`"
//!   (catch-up reads it) or as a clip in flight (late entry), never both and
//!   never neither, and the order is the log's;
//! - a **live** event of another node's talker feeds a clip in flight here,
//!   exactly as a local talker's ingest does;
//! - a **group** change drops listeners who are no longer members (they get
//!   `GroupLeft`, their deliveries stop) and updates the mode.
//!
//! Floor changes come from the floor arbiter as [`FloorEvent`]s (the hub is
//! its listener) and go to the group's listeners on this node.
//!
//! Each group's state sits behind its own short `std::sync::Mutex`, never
//! held across an `.await`. The feed tasks belong to the hub's task tracker
//! and end with [`Hub::close`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use dashmap::DashMap;
use ptt_protocol::{ClipId, ControlMessage, ErrorCode, GroupMode, ReceiptKind};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::command::{SessionCommand, SessionHandle};
use crate::floor::{FloorEvent, FloorListener};
use crate::live::LiveClip;
use crate::log::{FeedEvent, FollowerChange, GroupFeed, GroupLog, LiveEvent};
use crate::store::{ClipStore, Follower, GroupInfo, StoredClip};
use std::sync::atomic::{AtomicU64, Ordering};

/// How long a feed waits before reading again after a failed read.
const FEED_RETRY: Duration = Duration::from_secs(1);

/// What a joining session gets.
#[derive(Debug)]
pub struct JoinSnapshot {
    /// The group's mode.
    pub mode: GroupMode,
    /// Every clip up to here is stored and visible: catch-up ends here.
    pub last_seq: u64,
    /// Clips in flight, to deliver from their first frame.
    pub active: Vec<Arc<LiveClip>>,
    /// Who holds the floor (walkie groups), and whether in an emergency.
    pub floor: Option<(String, bool)>,
    /// Set when the session's user joins a channel as a follower.
    pub follower: Option<Follower>,
    /// The group's own live latency budget, ms (`None`: the relay's).
    pub live_budget_ms: Option<u32>,
}

/// How often the hub writes what its channels' followers acknowledged and
/// played to the store (one write per channel per period, whatever the
/// number of acknowledgements; a crash loses at most one period's).
pub const TALLY_FLUSH: Duration = Duration::from_secs(5);

/// What a channel's followers on this node acknowledged and played and
/// the store does not hold yet (one per channel, nothing per follower).
#[derive(Debug, Default)]
struct ChannelTally {
    delivered: AtomicU64,
    played: AtomicU64,
}

struct GroupState {
    info: GroupInfo,
    subscribers: HashMap<u64, SessionHandle>,
    active: Vec<Arc<LiveClip>>,
    last_published: u64,
    floor: Option<(String, bool)>,
    /// Removed from the hub's map: whoever still holds the cell must
    /// fetch the group again.
    retired: bool,
    stop: CancellationToken,
}

type GroupCell = Arc<Mutex<GroupState>>;

/// The node's live plane. See the module documentation.
pub struct Hub {
    log: Arc<dyn GroupLog>,
    directory: Arc<dyn ClipStore>,
    groups: DashMap<String, GroupCell>,
    sessions: DashMap<u64, SessionHandle>,
    users: DashMap<Arc<str>, Vec<u64>>,
    tallies: DashMap<String, ChannelTally>,
    tasks: TaskTracker,
    closed: CancellationToken,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("groups", &self.groups.len())
            .field("sessions", &self.sessions.len())
            .finish()
    }
}

impl Hub {
    /// A hub reading clips from `log` and group records from `directory`.
    /// Starts the task that writes the channels' tallies to `directory`
    /// every [`TALLY_FLUSH`] and once more at [`Hub::close`] (so it must
    /// be called inside a tokio runtime).
    pub fn new(log: Arc<dyn GroupLog>, directory: Arc<dyn ClipStore>) -> Arc<Hub> {
        let hub = Arc::new(Hub {
            log,
            directory,
            groups: DashMap::new(),
            sessions: DashMap::new(),
            users: DashMap::new(),
            tallies: DashMap::new(),
            tasks: TaskTracker::new(),
            closed: CancellationToken::new(),
        });
        hub.tasks
            .spawn(flush_tallies_loop(Arc::downgrade(&hub), hub.closed.clone()));
        hub
    }

    /// Stops every feed and waits until their tasks have ended.
    pub async fn close(&self) {
        self.closed.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }

    /// Registers a connected, authenticated session.
    pub fn register(&self, session: SessionHandle) {
        self.users
            .entry(session.user.clone())
            .or_default()
            .push(session.id);
        self.sessions.insert(session.id, session);
    }

    /// Removes a session from the groups it joined. Costs O(those groups):
    /// nothing walks every user or group.
    pub fn unregister(&self, session: u64, user: &str, groups: &[Arc<str>]) {
        self.sessions.remove(&session);
        self.users.remove_if_mut(user, |_, ids| {
            ids.retain(|&id| id != session);
            ids.is_empty()
        });
        for group in groups {
            self.leave(group, session);
        }
    }

    /// Connected sessions on this node.
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// Groups with listeners or clips in flight on this node.
    pub fn group_count(&self) -> usize {
        self.groups.len()
    }

    /// The group's record, if `user` is a member.
    pub async fn member_group(
        self: &Arc<Self>,
        group: &str,
        user: &str,
    ) -> Result<GroupInfo, ErrorCode> {
        let (_, info) = self.locked(group, |g| Ok(g.info.clone())).await?;
        if info.members.contains(user) {
            Ok(info)
        } else {
            Err(ErrorCode::NotMember)
        }
    }

    /// The group's record, if `user` may listen to it: a member, or a
    /// follower of a channel (one point read of its record).
    pub async fn listener_group(
        self: &Arc<Self>,
        group: &str,
        user: &str,
    ) -> Result<GroupInfo, ErrorCode> {
        let (_, info) = self.locked(group, |g| Ok(g.info.clone())).await?;
        if info.members.contains(user) {
            return Ok(info);
        }
        if info.channel.is_some()
            && self
                .directory
                .follower(group, user)
                .await
                .map_err(|e| e.code())?
                .is_some()
        {
            return Ok(info);
        }
        Err(ErrorCode::NotMember)
    }

    /// Subscribes a session to a group's live clips; says where catch-up
    /// ends and what is in flight. A channel's follower is not in the
    /// group record: its record is looked up (one point read) first.
    pub async fn join(
        self: &Arc<Self>,
        group: &str,
        session: &SessionHandle,
    ) -> Result<JoinSnapshot, ErrorCode> {
        let (_, member) = self
            .locked(group, |g| {
                Ok(g.info.channel.is_none() || g.info.members.contains(&*session.user))
            })
            .await?;
        let follower = if member {
            None
        } else {
            self.directory
                .follower(group, &session.user)
                .await
                .map_err(|e| e.code())?
        };
        self.locked(group, |g| {
            let follows = g.info.channel.is_some() && follower.is_some();
            if !follows && !g.info.members.contains(&*session.user) {
                return Err(ErrorCode::NotMember);
            }
            g.subscribers.insert(session.id, session.clone());
            Ok(JoinSnapshot {
                mode: g.info.mode,
                last_seq: g.last_published,
                active: g.active.clone(),
                floor: g.floor.clone(),
                follower: if follows { follower } else { None },
                live_budget_ms: g.info.live_budget_ms,
            })
        })
        .await
        .map(|(_, snapshot)| snapshot)
    }

    /// The group's record, if `user` may talk in it: a listener (a
    /// channel's follower or anyone else not among its members, or a
    /// member with the listener role) gets `ListenerOnly`.
    pub async fn talker_group(
        self: &Arc<Self>,
        group: &str,
        user: &str,
    ) -> Result<GroupInfo, ErrorCode> {
        let (_, info) = self.locked(group, |g| Ok(g.info.clone())).await?;
        talk_check(&info, user)?;
        Ok(info)
    }

    /// Stops every session of `user` on this node receiving `group` (an
    /// unfollow), with `code` in their `GroupLeft`.
    pub fn remove_user(&self, group: &str, user: &str, code: ErrorCode) {
        let Some(cell) = self.groups.get(group).map(|c| c.clone()) else {
            return;
        };
        remove_sessions(&mut lock(&cell), group, user, code);
        self.retire_if_idle(group);
    }

    /// Tells every session of `user` on this node that joined `group`
    /// that the user muted (or unmuted) it: their deliveries that start
    /// after they read the command carry the flag (or not).
    pub fn mute_user(&self, group: &str, user: &str, muted: bool) {
        let Some(cell) = self.groups.get(group).map(|c| c.clone()) else {
            return;
        };
        mute_sessions(&lock(&cell), group, user, muted);
    }

    /// A channel's followers joined on this node now, and the clips its
    /// followers acknowledged and played since it was created (what the
    /// store holds plus what this node has not written yet).
    pub async fn channel_tally(&self, group: &str) -> Result<(u64, u64, u64), ErrorCode> {
        let online = self.groups.get(group).map_or(0, |cell| {
            let g = lock(&cell);
            g.subscribers
                .values()
                .filter(|s| !g.info.members.contains(&*s.user))
                .count() as u64
        });
        let (stored_delivered, stored_played) = self
            .directory
            .channel_counts(group)
            .await
            .map_err(|e| e.code())?;
        let (delivered, played) = self.tallies.get(group).map_or((0, 0), |t| {
            (
                t.delivered.load(Ordering::Relaxed),
                t.played.load(Ordering::Relaxed),
            )
        });
        Ok((
            online,
            stored_delivered.saturating_add(delivered),
            stored_played.saturating_add(played),
        ))
    }

    /// Writes the channels' tallies to the store: one write per channel
    /// with anything new. What a failed write held stays for the next.
    pub async fn flush_tallies(&self) {
        let pending: Vec<(String, u64, u64)> = self
            .tallies
            .iter()
            .map(|t| {
                (
                    t.key().clone(),
                    t.delivered.load(Ordering::Relaxed),
                    t.played.load(Ordering::Relaxed),
                )
            })
            .filter(|&(_, d, p)| d > 0 || p > 0)
            .collect();
        for (group, delivered, played) in pending {
            match self
                .directory
                .add_channel_counts(&group, delivered, played)
                .await
            {
                Ok(()) => {
                    if let Some(t) = self.tallies.get(&group) {
                        t.delivered.fetch_sub(delivered, Ordering::Relaxed);
                        t.played.fetch_sub(played, Ordering::Relaxed);
                    }
                    self.tallies.remove_if(&group, |_, t| {
                        t.delivered.load(Ordering::Relaxed) == 0
                            && t.played.load(Ordering::Relaxed) == 0
                    });
                }
                // A deleted channel's tally has nowhere to go.
                Err(crate::store::StoreError::NoSuchGroup(_)) => {
                    self.tallies.remove(&group);
                }
                Err(e) => {
                    tracing::warn!(error = %e, %group, "writing a channel's counts failed");
                }
            }
        }
    }

    /// Unsubscribes a session from a group.
    pub fn leave(&self, group: &str, session: u64) {
        if let Some(cell) = self.groups.get(group).map(|c| c.clone()) {
            lock(&cell).subscribers.remove(&session);
            self.retire_if_idle(group);
        }
    }

    /// Starts a clip in flight from a talker on this node: checks
    /// membership, then hands the clip to every listener but the talker's
    /// own connection. A retry of a clip still in flight (same id; the
    /// talker switched networks) replaces it.
    pub async fn start_clip(self: &Arc<Self>, clip: Arc<LiveClip>) -> Result<(), ErrorCode> {
        let group = clip.meta.group.clone();
        self.locked(&group, |g| {
            talk_check(&g.info, &clip.meta.talker)?;
            add_active(g, clip.clone());
            Ok(())
        })
        .await
        .map(|_| ())
    }

    /// A clip in flight was discarded: its listeners reset their streams.
    pub fn abort_clip(&self, clip: &Arc<LiveClip>, code: ErrorCode) {
        clip.abort(code);
        if let Some(cell) = self.groups.get(&clip.meta.group).map(|c| c.clone()) {
            lock(&cell).active.retain(|c| !Arc::ptr_eq(c, clip));
            self.retire_if_idle(&clip.meta.group);
        }
    }

    /// Sends a receipt to every session of the clip's talker on this node.
    /// A channel's followers send none: their acknowledgements and Played
    /// are counted for the owner instead ([`Hub::channel_tally`]).
    pub fn send_receipt(
        &self,
        talker: &str,
        group: &str,
        seq: u64,
        clip_id: ClipId,
        member: &str,
        kind: ReceiptKind,
    ) {
        let follower = self.groups.get(group).is_some_and(|cell| {
            let g = lock(&cell);
            g.info.channel.is_some() && !g.info.members.contains(member)
        });
        if follower {
            let tally = self.tallies.entry(group.to_owned()).or_default();
            match kind {
                ReceiptKind::Delivered => tally.delivered.fetch_add(1, Ordering::Relaxed),
                ReceiptKind::Played => tally.played.fetch_add(1, Ordering::Relaxed),
            };
            return;
        }
        let Some(ids) = self.users.get(talker).map(|ids| ids.clone()) else {
            return;
        };
        let receipt = ControlMessage::Receipt {
            group: group.to_owned(),
            seq,
            clip_id,
            user: member.to_owned(),
            kind,
        }
        .to_bytes();
        for id in ids {
            if let Some(handle) = self.sessions.get(&id) {
                handle.send_receipt(&receipt);
            }
        }
    }

    /// Sends a control message to every session on this node that joined
    /// `group` (nothing if none has).
    pub fn send_to_group(&self, group: &str, message: ControlMessage) {
        let Some(cell) = self.groups.get(group).map(|c| c.clone()) else {
            return;
        };
        let subscribers: Vec<SessionHandle> = lock(&cell).subscribers.values().cloned().collect();
        for handle in subscribers {
            handle.send(message.clone());
        }
    }

    /// Runs `f` on the group's state, loading the group (and starting its
    /// feed) on first use. `Err` from the directory or from `f`.
    async fn locked<T>(
        self: &Arc<Self>,
        group: &str,
        f: impl FnOnce(&mut GroupState) -> Result<T, ErrorCode>,
    ) -> Result<(GroupCell, T), ErrorCode> {
        let mut f = Some(f);
        loop {
            let cell = self.cell(group).await?;
            let mut g = lock(&cell);
            if g.retired {
                continue;
            }
            let f = f.take().expect("called once: the loop ends here");
            let out = f(&mut g);
            drop(g);
            if out.is_err() {
                self.retire_if_idle(group);
            }
            return out.map(|v| (cell, v));
        }
    }

    /// The group's cell, loaded on first use.
    async fn cell(self: &Arc<Self>, group: &str) -> Result<GroupCell, ErrorCode> {
        if let Some(cell) = self.groups.get(group) {
            return Ok(cell.clone());
        }
        let info = self
            .directory
            .group(group)
            .await
            .map_err(|e| e.code())?
            .ok_or(ErrorCode::NoSuchGroup)?;
        let last = self.log.range(group).await.map_err(|e| e.code())?.last;
        let stop = self.closed.child_token();
        let cell = Arc::new(Mutex::new(GroupState {
            info,
            subscribers: HashMap::new(),
            active: Vec::new(),
            last_published: last,
            floor: None,
            retired: false,
            stop: stop.clone(),
        }));
        let mut created = false;
        let cell = self
            .groups
            .entry(group.to_owned())
            .or_insert_with(|| {
                created = true;
                cell
            })
            .value()
            .clone();
        if created {
            self.tasks
                .spawn(feed_group(self.clone(), group.to_owned(), last, stop));
        }
        Ok(cell)
    }

    /// Drops a group nobody on this node listens to or talks in.
    fn retire_if_idle(&self, group: &str) {
        self.groups.remove_if(group, |_, cell| {
            let mut g = lock(cell);
            let idle = g.subscribers.is_empty() && g.active.is_empty();
            if idle {
                g.retired = true;
                g.stop.cancel();
            }
            idle
        });
    }

    /// Applies one event of a group's feed.
    fn apply(&self, group: &str, event: FeedEvent) {
        let Some(cell) = self.groups.get(group).map(|c| c.clone()) else {
            return;
        };
        let mut g = lock(&cell);
        match event {
            FeedEvent::Stored(clip) => publish(&mut g, clip),
            FeedEvent::Live(live) => apply_live(&mut g, live),
            FeedEvent::Group(Some(info)) => {
                // A channel's followers are not in its record: only those
                // who were members (staff) and are no more are dropped
                // (an Unfollow drops followers, [`Hub::remove_user`]).
                let was_member =
                    |user: &str| info.channel.is_none() || g.info.members.contains(user);
                let left: Vec<SessionHandle> = g
                    .subscribers
                    .values()
                    .filter(|s| !info.members.contains(&*s.user) && was_member(&s.user))
                    .cloned()
                    .collect();
                for s in &left {
                    g.subscribers.remove(&s.id);
                    s.offer(SessionCommand::Left {
                        group: group.into(),
                        code: ErrorCode::NotMember,
                    });
                }
                g.info = info;
            }
            FeedEvent::Deleted { seq, clip_id } => {
                let message = ControlMessage::ClipDeleted {
                    group: group.into(),
                    seq,
                    clip_id,
                };
                for s in g.subscribers.values() {
                    s.send(message.clone());
                }
            }
            // Another node's follower notice (issue #14 on a cluster).
            FeedEvent::Follower { user, change } => match change {
                FollowerChange::Muted => mute_sessions(&g, group, &user, true),
                FollowerChange::Unmuted => mute_sessions(&g, group, &user, false),
                FollowerChange::Unfollowed => {
                    remove_sessions(&mut g, group, &user, ErrorCode::NotMember);
                }
            },
            FeedEvent::Group(None) => {
                for s in g.subscribers.drain().map(|(_, s)| s) {
                    s.offer(SessionCommand::Left {
                        group: group.into(),
                        code: ErrorCode::NoSuchGroup,
                    });
                }
                for clip in g.active.drain(..) {
                    clip.abort(ErrorCode::NoSuchGroup);
                }
            }
        }
        let idle = g.subscribers.is_empty() && g.active.is_empty();
        drop(g);
        if idle {
            self.retire_if_idle(group);
        }
    }
}

impl FloorListener for Hub {
    fn floor_event(&self, event: FloorEvent) {
        match event {
            FloorEvent::Taken {
                group,
                user,
                emergency,
            } => {
                if let Some(cell) = self.groups.get(&group).map(|c| c.clone()) {
                    let mut g = lock(&cell);
                    g.floor = Some((user.clone(), emergency));
                    broadcast(
                        &g,
                        ControlMessage::FloorTaken {
                            group,
                            user,
                            emergency,
                        },
                    );
                }
            }
            FloorEvent::Idle { group } => {
                if let Some(cell) = self.groups.get(&group).map(|c| c.clone()) {
                    let mut g = lock(&cell);
                    g.floor = None;
                    broadcast(&g, ControlMessage::FloorIdle { group });
                }
            }
            FloorEvent::Revoked {
                group,
                session,
                code,
            } => {
                if code == ErrorCode::Preempted
                    && let Some(cell) = self.groups.get(&group).map(|c| c.clone())
                {
                    // The pre-empted talker's clip in flight is discarded.
                    let mut g = lock(&cell);
                    g.active.retain(|c| {
                        let theirs = c.talker_session == session;
                        if theirs {
                            c.abort(ErrorCode::Preempted);
                        }
                        !theirs
                    });
                }
                if let Some(handle) = self.sessions.get(&session) {
                    handle.send(ControlMessage::FloorRevoked { group, code });
                }
            }
        }
    }
}

/// Reads a group's feed until the group is retired or the hub closes.
async fn feed_group(hub: Arc<Hub>, group: String, after: u64, stop: CancellationToken) {
    let mut feed: Option<Box<dyn GroupFeed>> = None;
    loop {
        let step = async {
            match &mut feed {
                None => hub.log.subscribe(&group, after).await.map(|f| {
                    feed = Some(f);
                    None
                }),
                Some(f) => f.next().await.map(Some),
            }
        };
        let result = tokio::select! {
            _ = stop.cancelled() => return,
            result = step => result,
        };
        match result {
            Ok(None) => {}
            Ok(Some(None)) => return,
            Ok(Some(Some(event))) => hub.apply(&group, event),
            Err(e) => {
                // The group's listeners and clips in flight stay; the feed
                // reads again from where it was.
                tracing::warn!(%group, error = %e, "group feed failed; retrying");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(FEED_RETRY) => {}
                }
            }
        }
    }
}

/// Whether `user` may talk in the group `info` describes.
/// Writes the hub's channel tallies every [`TALLY_FLUSH`], and a last
/// time when the hub closes.
async fn flush_tallies_loop(hub: std::sync::Weak<Hub>, closed: CancellationToken) {
    let mut tick = tokio::time::interval(TALLY_FLUSH);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        let last = tokio::select! {
            _ = closed.cancelled() => true,
            _ = tick.tick() => false,
        };
        let Some(hub) = hub.upgrade() else {
            return;
        };
        hub.flush_tallies().await;
        if last {
            return;
        }
    }
}

fn talk_check(info: &GroupInfo, user: &str) -> Result<(), ErrorCode> {
    match info.role(user) {
        Some(role) if role.talks() => Ok(()),
        Some(_) => Err(ErrorCode::ListenerOnly),
        None if info.channel.is_some() => Err(ErrorCode::ListenerOnly),
        None => Err(ErrorCode::NotMember),
    }
}

/// Whether channel `group` published `per_day` clips in the 24 hours
/// before `now_ms`: one read (the clip `per_day` before the newest), so the
/// check costs the same whatever the limit.
pub async fn channel_day_full(
    log: &dyn GroupLog,
    group: &str,
    per_day: u32,
    now_ms: u64,
) -> Result<bool, ErrorCode> {
    if per_day == 0 {
        return Ok(false);
    }
    let last = log.range(group).await.map_err(|e| e.code())?.last;
    let Some(oldest) = (last + 1)
        .checked_sub(u64::from(per_day))
        .filter(|&s| s > 0)
    else {
        return Ok(false);
    };
    let meta = log.meta(group, oldest).await.map_err(|e| e.code())?;
    Ok(meta.is_some_and(|m| m.created_ms + 24 * 3600 * 1000 > now_ms))
}

/// Stops every session of `user` in `g` receiving the group, with `code`
/// in their `GroupLeft`.
fn remove_sessions(g: &mut GroupState, group: &str, user: &str, code: ErrorCode) {
    let gone: Vec<SessionHandle> = g
        .subscribers
        .values()
        .filter(|s| &*s.user == user)
        .cloned()
        .collect();
    for s in gone {
        g.subscribers.remove(&s.id);
        s.offer(SessionCommand::Left {
            group: group.into(),
            code,
        });
    }
}

/// Tells every session of `user` in `g` that the user muted (or unmuted)
/// the group.
fn mute_sessions(g: &GroupState, group: &str, user: &str, muted: bool) {
    for s in g.subscribers.values().filter(|s| &*s.user == user) {
        s.offer(SessionCommand::Mute {
            group: group.into(),
            muted,
        });
    }
}

fn lock(cell: &GroupCell) -> MutexGuard<'_, GroupState> {
    // A panic while holding a group lock is a bug; the state is still
    // consistent enough to carry on serving other sessions.
    cell.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn broadcast(g: &GroupState, message: ControlMessage) {
    for sub in g.subscribers.values() {
        sub.send(message.clone());
    }
}

/// Puts a clip in flight and hands it to every listener but its talker's
/// connection (which counts it as delivered when `Stored` arrives).
fn add_active(g: &mut GroupState, clip: Arc<LiveClip>) {
    if let Some(pos) = g
        .active
        .iter()
        .position(|c| c.meta.clip_id == clip.meta.clip_id)
    {
        g.active.remove(pos).abort(ErrorCode::ClipAborted);
    }
    g.active.push(clip.clone());
    for sub in g
        .subscribers
        .values()
        .filter(|s| s.id != clip.talker_session)
    {
        sub.offer(SessionCommand::Deliver(clip.clone()));
    }
}

/// A clip was stored: end its live copy, or deliver it complete.
fn publish(g: &mut GroupState, clip: StoredClip) {
    if clip.seq <= g.last_published {
        return;
    }
    g.last_published = clip.seq;
    if let Some(pos) = g
        .active
        .iter()
        .position(|c| c.meta.clip_id == clip.meta.clip_id)
    {
        let live = g.active.remove(pos);
        live.end(clip.seq, clip.waveform);
        return;
    }
    let live = LiveClip::from_stored(&clip, 0);
    for sub in g.subscribers.values() {
        sub.offer(SessionCommand::Deliver(live.clone()));
    }
}

/// Another node's talker: the clip in flight here follows its events.
fn apply_live(g: &mut GroupState, event: LiveEvent) {
    match event {
        LiveEvent::Started { meta } => add_active(g, LiveClip::new(meta, 0)),
        LiveEvent::Frame {
            clip_id,
            index,
            data,
            ..
        } => {
            if let Some(clip) = g.active.iter().find(|c| c.meta.clip_id == clip_id) {
                clip.push_packet(index, data);
            }
        }
        LiveEvent::Aborted { clip_id, code, .. } => {
            g.active.retain(|c| {
                let this = c.meta.clip_id == clip_id;
                if this {
                    c.abort(code);
                }
                !this
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::tests::futures_ready;
    use crate::log::LocalLog;
    use crate::store::{ClipMeta, NewClip, RedbStore};
    use bytes::Bytes;
    use ptt_protocol::ClipFormat;

    struct Setup {
        hub: Arc<Hub>,
        log: Arc<dyn GroupLog>,
        store: Arc<RedbStore>,
        _dir: tempfile::TempDir,
    }

    async fn setup(members: &[&str]) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(RedbStore::open(dir.path()).unwrap());
        store
            .create_group("team", GroupMode::Notes, 60_000)
            .await
            .unwrap();
        for m in members {
            store.add_member("team", m).await.unwrap();
        }
        let log: Arc<dyn GroupLog> = Arc::new(LocalLog::new(store.clone()));
        let hub = Hub::new(log.clone(), store.clone());
        Setup {
            hub,
            log,
            store,
            _dir: dir,
        }
    }

    fn meta(id: u8, talker: &str) -> ClipMeta {
        ClipMeta {
            group: "team".into(),
            clip_id: ClipId::from_bytes([id; 16]),
            talker: talker.into(),
            format: ClipFormat::Opus,
            sample_rate: 48_000,
            channels: 1,
            frame_ms: 20,
            created_ms: 1,
            flags: 0,
        }
    }

    fn new_clip(id: u8, talker: &str) -> NewClip {
        NewClip {
            meta: meta(id, talker),
            frames: vec![Bytes::from_static(b"opus")],
            waveform: Bytes::new(),
        }
    }

    async fn next(rx: &mut tokio::sync::mpsc::Receiver<SessionCommand>) -> SessionCommand {
        tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("a command in time")
            .expect("queue open")
    }

    /// Clips appended concurrently become visible in sequence order, each
    /// once, whatever order their appends return in; a joiner's snapshot
    /// and the clips delivered after it never overlap.
    #[tokio::test]
    async fn stored_clips_are_published_in_log_order() {
        let s = setup(&["alice", "bob"]).await;
        let (bob, mut bob_rx) = SessionHandle::new(2, "bob".into());
        s.hub.register(bob.clone());
        let snapshot = s.hub.join("team", &bob).await.unwrap();
        assert_eq!(snapshot.last_seq, 0);
        let appends = (1..=20u8).map(|i| {
            let log = s.log.clone();
            tokio::spawn(async move { log.append(new_clip(i, "alice")).await.unwrap() })
        });
        for a in appends.collect::<Vec<_>>() {
            a.await.unwrap();
        }
        let mut seqs = Vec::new();
        while seqs.len() < 20 {
            if let SessionCommand::Deliver(clip) = next(&mut bob_rx).await {
                match clip.state() {
                    crate::live::ClipState::Ended { seq, .. } => seqs.push(seq),
                    other => panic!("complete clips expected, got {other:?}"),
                }
            }
        }
        assert_eq!(seqs, (1..=20).collect::<Vec<_>>());
        let late = s.hub.join("team", &bob).await.unwrap();
        assert_eq!(late.last_seq, 20);
        s.hub.close().await;
    }

    /// A member that joins while a clip is spoken gets it from its first
    /// frame (late entry), and its end with the sequence number once
    /// stored; catch-up stops before it.
    #[tokio::test]
    async fn late_entry_then_end_in_order() {
        let s = setup(&["alice", "bob"]).await;
        let clip = LiveClip::new(meta(1, "alice"), 1);
        clip.push_packet(0, Bytes::from_static(b"a"));
        s.hub.start_clip(clip.clone()).await.unwrap();
        clip.push_packet(1, Bytes::from_static(b"b"));
        let (bob, _bob_rx) = SessionHandle::new(2, "bob".into());
        let snapshot = s.hub.join("team", &bob).await.unwrap();
        assert_eq!(snapshot.last_seq, 0);
        assert_eq!(snapshot.active.len(), 1);
        assert_eq!(snapshot.active[0].packets().len(), 2);
        let outcome = s
            .log
            .append(NewClip {
                meta: clip.meta.clone(),
                frames: clip.packets(),
                waveform: Bytes::new(),
            })
            .await
            .unwrap();
        assert_eq!(outcome.seq(), 1);
        let mut rx = clip.subscribe();
        tokio::time::timeout(Duration::from_secs(5), async {
            while !matches!(
                rx.borrow_and_update().state,
                crate::live::ClipState::Ended { seq: 1, .. }
            ) {
                rx.changed().await.unwrap();
            }
        })
        .await
        .expect("the live clip ends once stored");
        let after = s.hub.join("team", &bob).await.unwrap();
        assert_eq!((after.last_seq, after.active.len()), (1, 0));
        s.hub.close().await;
    }

    /// A member removed while a clip is spoken stops receiving: its
    /// session is told, the others keep the clip.
    #[tokio::test]
    async fn membership_removal_mid_clip_reaches_the_subscription() {
        let s = setup(&["alice", "bob", "carol"]).await;
        let (bob, mut bob_rx) = SessionHandle::new(2, "bob".into());
        let (carol, mut carol_rx) = SessionHandle::new(3, "carol".into());
        s.hub.join("team", &bob).await.unwrap();
        s.hub.join("team", &carol).await.unwrap();
        let clip = LiveClip::new(meta(1, "alice"), 1);
        s.hub.start_clip(clip.clone()).await.unwrap();
        assert!(matches!(
            next(&mut bob_rx).await,
            SessionCommand::Deliver(_)
        ));
        assert!(matches!(
            next(&mut carol_rx).await,
            SessionCommand::Deliver(_)
        ));
        s.store.remove_member("team", "bob").await.unwrap();
        match next(&mut bob_rx).await {
            SessionCommand::Left { group, code } => {
                assert_eq!((&*group, code), ("team", ErrorCode::NotMember));
            }
            other => panic!("{other:?}"),
        }
        // The next clip goes to carol only.
        let second = LiveClip::new(meta(2, "alice"), 1);
        s.hub.start_clip(second).await.unwrap();
        assert!(matches!(
            next(&mut carol_rx).await,
            SessionCommand::Deliver(_)
        ));
        assert!(bob_rx.try_recv().is_err());
        assert_eq!(clip.state(), crate::live::ClipState::Live);
        s.hub.close().await;
    }

    /// A session whose queue is full is told to close, never silently
    /// missing a floor change.
    #[tokio::test]
    async fn a_full_queue_closes_the_session() {
        let s = setup(&["alice", "bob"]).await;
        let (bob, _bob_rx) = SessionHandle::new(2, "bob".into());
        s.hub.join("team", &bob).await.unwrap();
        for _ in 0..crate::command::COMMAND_QUEUE {
            s.hub.floor_event(FloorEvent::Idle {
                group: "team".into(),
            });
        }
        assert!(futures_ready(bob.overflowed()).is_none(), "not yet full");
        s.hub.floor_event(FloorEvent::Idle {
            group: "team".into(),
        });
        assert!(futures_ready(bob.overflowed()).is_some());
        s.hub.close().await;
    }

    /// A log whose feeds fail their first read, as a store error would.
    #[derive(Debug)]
    struct FlakyLog(Arc<dyn GroupLog>);

    struct FlakyFeed {
        inner: Box<dyn GroupFeed>,
        failed: bool,
    }

    impl GroupFeed for FlakyFeed {
        fn next(&mut self) -> crate::log::LogFuture<'_, Option<FeedEvent>> {
            if !self.failed {
                self.failed = true;
                return Box::pin(async {
                    Err(crate::store::StoreError::Backend("disk on fire".into()))
                });
            }
            self.inner.next()
        }
    }

    impl GroupLog for FlakyLog {
        fn append(&self, clip: NewClip) -> crate::log::LogFuture<'_, crate::store::AppendOutcome> {
            self.0.append(clip)
        }
        fn clip_seq(&self, g: &str, id: ClipId) -> crate::log::LogFuture<'_, Option<u64>> {
            self.0.clip_seq(g, id)
        }
        fn read(
            &self,
            g: &str,
            after: u64,
            n: usize,
        ) -> crate::log::LogFuture<'_, Vec<StoredClip>> {
            self.0.read(g, after, n)
        }
        fn recent(&self, g: &str, n: usize) -> crate::log::LogFuture<'_, Vec<StoredClip>> {
            self.0.recent(g, n)
        }
        fn meta(&self, g: &str, seq: u64) -> crate::log::LogFuture<'_, Option<ClipMeta>> {
            self.0.meta(g, seq)
        }
        fn range(&self, g: &str) -> crate::log::LogFuture<'_, crate::store::SeqRange> {
            self.0.range(g)
        }
        fn subscribe(&self, g: &str, after: u64) -> crate::log::LogFuture<'_, Box<dyn GroupFeed>> {
            let inner = self.0.subscribe(g, after);
            Box::pin(async move {
                Ok(Box::new(FlakyFeed {
                    inner: inner.await?,
                    failed: false,
                }) as Box<dyn GroupFeed>)
            })
        }
        fn publishes_live(&self) -> bool {
            false
        }
        fn publish_live(&self, _: LiveEvent) {}
        fn close(&self) -> crate::log::LogFuture<'_, ()> {
            self.0.close()
        }
    }

    /// A failed read of the log keeps the group's listeners and its clips
    /// in flight; the feed reads again and publication goes on.
    #[tokio::test(start_paused = true)]
    async fn a_log_error_drops_no_listener_and_no_clip_in_flight() {
        let s = setup(&["alice", "bob"]).await;
        let log: Arc<dyn GroupLog> = Arc::new(FlakyLog(s.log.clone()));
        let hub = Hub::new(log.clone(), s.store.clone());
        let (bob, mut bob_rx) = SessionHandle::new(2, "bob".into());
        hub.join("team", &bob).await.unwrap();
        let clip = LiveClip::new(meta(1, "alice"), 1);
        hub.start_clip(clip.clone()).await.unwrap();
        assert!(matches!(
            next(&mut bob_rx).await,
            SessionCommand::Deliver(_)
        ));
        log.append(new_clip(1, "alice")).await.unwrap();
        let mut rx = clip.subscribe();
        tokio::time::timeout(Duration::from_secs(10), async {
            while !matches!(
                rx.borrow_and_update().state,
                crate::live::ClipState::Ended { seq: 1, .. }
            ) {
                rx.changed().await.unwrap();
            }
        })
        .await
        .expect("published after the retry");
        let again = hub.join("team", &bob).await.unwrap();
        assert_eq!(again.last_seq, 1);
        assert_eq!(hub.group_count(), 1);
        hub.close().await;
        s.hub.close().await;
    }

    /// Groups nobody listens to are dropped with their feed.
    #[tokio::test]
    async fn idle_groups_are_retired() {
        let s = setup(&["alice", "bob"]).await;
        let (bob, _bob_rx) = SessionHandle::new(2, "bob".into());
        s.hub.register(bob.clone());
        s.hub.join("team", &bob).await.unwrap();
        assert_eq!(s.hub.group_count(), 1);
        s.hub.unregister(2, "bob", &["team".into()]);
        assert_eq!(s.hub.group_count(), 0);
        assert_eq!(s.hub.session_count(), 0);
        s.hub.close().await;
    }
}
