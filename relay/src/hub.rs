//! Fan-out: which sessions listen to which group, the clips in flight, the
//! floor, and the order in which stored clips become visible.
//!
//! This is the single-node implementation of [`Fanout`]; connection
//! handling sees only that trait, so a several-node fan-out (NATS
//! JetStream) replaces this type without touching it. Each group's state sits behind its own short
//! `std::sync::Mutex`, never held across an `.await`.
//!
//! Ordering: a clip becomes visible in group order. The store assigns
//! sequence numbers; [`LocalHub::finish_clip`] publishes clip `n` only after
//! `n - 1`, so a member that joins sees every clip either as "stored up to
//! `last_seq`" (catch-up reads it from the store) or as a clip in flight
//! (late entry), never both and never neither.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use ptt_protocol::{
    ClipId, ControlMessage, ErrorCode, FloorDecision, FloorState, GroupMode, ReceiptKind,
};

use crate::fanout::{Fanout, FanoutFuture, JoinSnapshot, SessionCommand, SessionHandle};
use crate::live::LiveClip;
use crate::store::{AppendOutcome, ClipStore, GroupInfo};

struct GroupState {
    info: GroupInfo,
    subscribers: HashMap<u64, SessionHandle>,
    active: Vec<Arc<LiveClip>>,
    floor: FloorState,
    last_published: u64,
    pending: BTreeMap<u64, (Arc<LiveClip>, bool)>,
}

type GroupCell = Arc<Mutex<GroupState>>;

/// The single-node fan-out: everything in this process's memory. See the
/// module documentation.
pub struct LocalHub {
    store: Arc<dyn ClipStore>,
    groups: DashMap<String, GroupCell>,
    sessions: DashMap<u64, SessionHandle>,
    users: DashMap<Arc<str>, Vec<u64>>,
}

impl std::fmt::Debug for LocalHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalHub")
            .field("groups", &self.groups.len())
            .field("sessions", &self.sessions.len())
            .finish()
    }
}

impl LocalHub {
    /// A hub over `store`.
    pub fn new(store: Arc<dyn ClipStore>) -> LocalHub {
        LocalHub {
            store,
            groups: DashMap::new(),
            sessions: DashMap::new(),
            users: DashMap::new(),
        }
    }

    /// Registers a connected, authenticated session.
    pub fn register(&self, session: SessionHandle) {
        self.users
            .entry(session.user.clone())
            .or_default()
            .push(session.id);
        self.sessions.insert(session.id, session);
    }

    /// Removes a session from every group; releases its floors.
    pub fn unregister(&self, session: u64, groups: &[Arc<str>]) {
        if let Some((_, handle)) = self.sessions.remove(&session)
            && let Some(mut ids) = self.users.get_mut(&handle.user)
        {
            ids.retain(|&id| id != session);
        }
        self.users.retain(|_, ids| !ids.is_empty());
        for group in groups {
            self.leave(group, session);
        }
        // Floors may be held in groups the session never joined.
        let cells: Vec<GroupCell> = self.groups.iter().map(|e| e.value().clone()).collect();
        for cell in cells {
            let mut g = lock(&cell);
            if g.floor.handle_release(session) {
                broadcast(
                    &g,
                    ControlMessage::FloorIdle {
                        group: g.info.id.clone(),
                    },
                );
            }
        }
    }

    /// The group's state, loaded from the store on first use.
    async fn cell(&self, group: &str) -> Result<GroupCell, ErrorCode> {
        if let Some(cell) = self.groups.get(group) {
            return Ok(cell.clone());
        }
        let info = self
            .store
            .group(group)
            .await
            .map_err(|e| e.code())?
            .ok_or(ErrorCode::NoSuchGroup)?;
        let range = self.store.seq_range(group).await.map_err(|e| e.code())?;
        let cell = Arc::new(Mutex::new(GroupState {
            info,
            subscribers: HashMap::new(),
            active: Vec::new(),
            floor: FloorState::new(),
            last_published: range.last,
            pending: BTreeMap::new(),
        }));
        Ok(self
            .groups
            .entry(group.to_owned())
            .or_insert(cell)
            .value()
            .clone())
    }

    /// The group, if the user is a member.
    pub async fn member_group(&self, group: &str, user: &str) -> Result<GroupInfo, ErrorCode> {
        let cell = self.cell(group).await?;
        let g = lock(&cell);
        if g.info.members.contains(user) {
            Ok(g.info.clone())
        } else {
            Err(ErrorCode::NotMember)
        }
    }

    /// Subscribes a session to a group's live clips.
    pub async fn join(
        &self,
        group: &str,
        session: &SessionHandle,
    ) -> Result<JoinSnapshot, ErrorCode> {
        let cell = self.cell(group).await?;
        let mut g = lock(&cell);
        if !g.info.members.contains(&*session.user) {
            return Err(ErrorCode::NotMember);
        }
        g.subscribers.insert(session.id, session.clone());
        Ok(JoinSnapshot {
            mode: g.info.mode,
            last_seq: g.last_published,
            active: g.active.clone(),
        })
    }

    /// Unsubscribes a session from a group.
    pub fn leave(&self, group: &str, session: u64) {
        if let Some(cell) = self.groups.get(group).map(|c| c.clone()) {
            lock(&cell).subscribers.remove(&session);
        }
    }

    /// A floor request in a walkie group.
    pub async fn request_floor(
        &self,
        group: &str,
        session: &SessionHandle,
        emergency: bool,
        request_id: u64,
    ) -> Result<ControlMessage, ErrorCode> {
        let cell = self.cell(group).await?;
        let mut g = lock(&cell);
        if !g.info.members.contains(&*session.user) {
            return Err(ErrorCode::NotMember);
        }
        let max_ms = g.info.max_clip_ms;
        if g.info.mode == GroupMode::Notes {
            // Nothing to arbitrate: everyone may talk.
            return Ok(ControlMessage::FloorGranted {
                request_id,
                group: group.to_owned(),
                max_ms,
            });
        }
        Ok(
            match grant_floor(&mut g, session, emergency, Instant::now()) {
                Ok(()) => ControlMessage::FloorGranted {
                    request_id,
                    group: group.to_owned(),
                    max_ms,
                },
                Err(holder) => ControlMessage::FloorDenied {
                    request_id,
                    group: group.to_owned(),
                    holder,
                },
            },
        )
    }

    /// A floor release; `true` if the session held it.
    pub fn release_floor(&self, group: &str, session: u64) -> bool {
        let Some(cell) = self.groups.get(group).map(|c| c.clone()) else {
            return false;
        };
        let mut g = lock(&cell);
        release(&mut g, session)
    }

    /// Frees the floor if its time is up (called by a timer at expiry).
    pub fn expire_floor(&self, group: &str) {
        let Some(cell) = self.groups.get(group).map(|c| c.clone()) else {
            return;
        };
        let mut g = lock(&cell);
        if let Some(holder) = g.floor.poll_expired(Instant::now()) {
            if let Some(handle) = self.sessions.get(&holder.session) {
                handle.offer(SessionCommand::send(ControlMessage::FloorRevoked {
                    group: group.to_owned(),
                    code: ErrorCode::ClipTooLong,
                }));
            }
            broadcast(
                &g,
                ControlMessage::FloorIdle {
                    group: group.to_owned(),
                },
            );
        }
    }

    /// Starts a live clip: checks membership and the floor, then hands the
    /// clip to every subscribed session.
    pub async fn start_clip(
        &self,
        clip: Arc<LiveClip>,
        session: &SessionHandle,
        emergency_allowed: bool,
    ) -> Result<(), ErrorCode> {
        let group = clip.meta.group.clone();
        let cell = self.cell(&group).await?;
        let mut g = lock(&cell);
        if !g.info.members.contains(&*session.user) {
            return Err(ErrorCode::NotMember);
        }
        if g.info.mode == GroupMode::Walkie {
            let now = Instant::now();
            if !g.floor.is_held_by(session.id, now) {
                let emergency = emergency_allowed
                    && clip.meta.flags & ptt_protocol::ClipHeader::FLAG_EMERGENCY != 0;
                grant_floor(&mut g, session, emergency, now).map_err(|_| ErrorCode::FloorTaken)?;
            }
        }
        // A retry of a clip still in flight (the talker switched networks
        // before the old connection died): the new upload wins.
        let clip_id = clip.meta.clip_id;
        if let Some(pos) = g.active.iter().position(|c| c.meta.clip_id == clip_id) {
            let old = g.active.remove(pos);
            old.abort(ErrorCode::ClipAborted);
        }
        g.active.push(clip.clone());
        // Not back to the connection that speaks it (the user's other
        // devices do get it); that session counts it as acknowledged when
        // `Stored` arrives.
        for sub in g.subscribers.values().filter(|s| s.id != session.id) {
            sub.deliver(&clip);
        }
        Ok(())
    }

    /// A clip's upload failed: receivers reset, the floor is freed.
    pub fn abort_clip(&self, clip: &Arc<LiveClip>, code: ErrorCode) {
        clip.abort(code);
        if let Some(cell) = self.groups.get(&clip.meta.group).map(|c| c.clone()) {
            let mut g = lock(&cell);
            g.active.retain(|c| !Arc::ptr_eq(c, clip));
            release(&mut g, clip.talker_session);
        }
    }

    /// A clip was appended to the store: publish it in sequence order.
    /// `live` says whether subscribers already received it as it was
    /// spoken (otherwise it is delivered to them now, complete).
    pub fn finish_clip(&self, clip: Arc<LiveClip>, outcome: AppendOutcome, live: bool) {
        let Some(cell) = self.groups.get(&clip.meta.group).map(|c| c.clone()) else {
            return;
        };
        let mut g = lock(&cell);
        release(&mut g, clip.talker_session);
        match outcome {
            AppendOutcome::Duplicate { .. } => {
                g.active.retain(|c| !Arc::ptr_eq(c, &clip));
                clip.abort(ErrorCode::Duplicate);
            }
            AppendOutcome::Stored { seq } => {
                g.pending.insert(seq, (clip, live));
                loop {
                    let next = g.last_published + 1;
                    let Some((clip, live)) = g.pending.remove(&next) else {
                        break;
                    };
                    publish(&mut g, next, clip, live);
                }
                // A sequence number taken by a clip this node never saw
                // (another writer on the same store) would stall the queue;
                // after a bound, publish what is waiting.
                if g.pending.len() > 64
                    && let Some((&first, _)) = g.pending.first_key_value()
                {
                    g.last_published = first - 1;
                    while let Some((seq, (clip, live))) = g.pending.pop_first() {
                        publish(&mut g, seq, clip, live);
                    }
                }
            }
        }
    }

    /// Sends a receipt to every session of the clip's talker.
    pub fn send_receipt(
        &self,
        talker: &str,
        group: &str,
        seq: u64,
        clip_id: ClipId,
        member: &str,
        kind: ReceiptKind,
    ) {
        let Some(ids) = self.users.get(talker).map(|ids| ids.clone()) else {
            return;
        };
        for id in ids {
            if let Some(handle) = self.sessions.get(&id) {
                handle.offer(SessionCommand::send(ControlMessage::Receipt {
                    group: group.to_owned(),
                    seq,
                    clip_id,
                    user: member.to_owned(),
                    kind,
                }));
            }
        }
    }

    /// Refreshes a group's cached record after an admin change, dropping
    /// subscribers who are no longer members.
    pub async fn refresh_group(&self, group: &str) {
        let Ok(Some(info)) = self.store.group(group).await else {
            self.groups.remove(group);
            return;
        };
        if let Some(cell) = self.groups.get(group).map(|c| c.clone()) {
            let mut g = lock(&cell);
            g.subscribers.retain(|_, s| info.members.contains(&*s.user));
            g.info = info;
        }
    }

    /// How many sessions are connected.
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// The floor hold limit of a group, for the expiry timer.
    pub fn floor_timeout(&self, group: &str) -> Option<Duration> {
        self.groups
            .get(group)
            .map(|cell| Duration::from_millis(u64::from(lock(&cell).info.max_clip_ms)))
    }
}

impl Fanout for LocalHub {
    fn register(&self, session: SessionHandle) {
        LocalHub::register(self, session)
    }

    fn unregister(&self, session: u64, groups: &[Arc<str>]) {
        LocalHub::unregister(self, session, groups)
    }

    fn member_group<'a>(&'a self, group: &'a str, user: &'a str) -> FanoutFuture<'a, GroupInfo> {
        Box::pin(LocalHub::member_group(self, group, user))
    }

    fn join<'a>(
        &'a self,
        group: &'a str,
        session: &'a SessionHandle,
    ) -> FanoutFuture<'a, JoinSnapshot> {
        Box::pin(LocalHub::join(self, group, session))
    }

    fn leave(&self, group: &str, session: u64) {
        LocalHub::leave(self, group, session)
    }

    fn request_floor<'a>(
        &'a self,
        group: &'a str,
        session: &'a SessionHandle,
        emergency: bool,
        request_id: u64,
    ) -> FanoutFuture<'a, ControlMessage> {
        Box::pin(LocalHub::request_floor(
            self, group, session, emergency, request_id,
        ))
    }

    fn release_floor(&self, group: &str, session: u64) -> bool {
        LocalHub::release_floor(self, group, session)
    }

    fn expire_floor(&self, group: &str) {
        LocalHub::expire_floor(self, group)
    }

    fn floor_timeout(&self, group: &str) -> Option<Duration> {
        LocalHub::floor_timeout(self, group)
    }

    fn start_clip<'a>(
        &'a self,
        clip: Arc<LiveClip>,
        session: &'a SessionHandle,
        emergency_allowed: bool,
    ) -> FanoutFuture<'a, ()> {
        Box::pin(LocalHub::start_clip(self, clip, session, emergency_allowed))
    }

    fn abort_clip(&self, clip: &Arc<LiveClip>, code: ErrorCode) {
        LocalHub::abort_clip(self, clip, code)
    }

    fn finish_clip(&self, clip: Arc<LiveClip>, outcome: AppendOutcome, live: bool) {
        LocalHub::finish_clip(self, clip, outcome, live)
    }

    fn send_receipt(
        &self,
        talker: &str,
        group: &str,
        seq: u64,
        clip_id: ClipId,
        member: &str,
        kind: ReceiptKind,
    ) {
        LocalHub::send_receipt(self, talker, group, seq, clip_id, member, kind)
    }

    fn refresh_group<'a>(
        &'a self,
        group: &'a str,
    ) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send + 'a>> {
        Box::pin(LocalHub::refresh_group(self, group))
    }

    fn session_count(&self) -> usize {
        LocalHub::session_count(self)
    }
}

fn lock(cell: &GroupCell) -> std::sync::MutexGuard<'_, GroupState> {
    // A panic while holding a group lock is a bug; the state is still
    // consistent enough to carry on serving other sessions.
    cell.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn broadcast(g: &GroupState, message: ControlMessage) {
    for sub in g.subscribers.values() {
        sub.offer(SessionCommand::send(message.clone()));
    }
}

/// Grants the floor or returns the holder's user id.
fn grant_floor(
    g: &mut GroupState,
    session: &SessionHandle,
    emergency: bool,
    now: Instant,
) -> Result<(), String> {
    let max = Duration::from_millis(u64::from(g.info.max_clip_ms));
    match g
        .floor
        .handle_request(session.id, &session.user, emergency, max, now)
    {
        FloorDecision::Granted => {}
        FloorDecision::Preempted { previous } => {
            // The preempted talker's clip in flight is discarded.
            for clip in g
                .active
                .iter()
                .filter(|c| c.talker_session == previous.session)
            {
                clip.abort(ErrorCode::Preempted);
            }
            g.active.retain(|c| c.talker_session != previous.session);
            if let Some(handle) = g.subscribers.values().find(|s| s.id == previous.session) {
                handle.offer(SessionCommand::send(ControlMessage::FloorRevoked {
                    group: g.info.id.clone(),
                    code: ErrorCode::Preempted,
                }));
            }
        }
        FloorDecision::Denied { holder } => return Err(holder.user),
    }
    broadcast(
        g,
        ControlMessage::FloorTaken {
            group: g.info.id.clone(),
            user: session.user.to_string(),
            emergency,
        },
    );
    Ok(())
}

fn release(g: &mut GroupState, session: u64) -> bool {
    if g.info.mode == GroupMode::Walkie && g.floor.handle_release(session) {
        broadcast(
            g,
            ControlMessage::FloorIdle {
                group: g.info.id.clone(),
            },
        );
        true
    } else {
        false
    }
}

fn publish(g: &mut GroupState, seq: u64, clip: Arc<LiveClip>, live: bool) {
    g.active.retain(|c| !Arc::ptr_eq(c, &clip));
    g.last_published = g.last_published.max(seq);
    if !live {
        for sub in g
            .subscribers
            .values()
            .filter(|s| s.id != clip.talker_session)
        {
            sub.deliver(&clip);
        }
    }
}
