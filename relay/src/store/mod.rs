//! Durable storage of groups, members, clips and member cursors.
//!
//! The relay talks to storage only through the [`ClipStore`] trait, so the
//! embedded single-node store ([`redb_store::RedbStore`]) and a later
//! several-node store on NATS JetStream are interchangeable without touching
//! connection handling.
//!
//! Guarantees every implementation gives:
//! - [`ClipStore::append_clip`] returns only once the clip is durable
//!   (fsync'd), and assigns the group's next sequence number (1, 2, 3, ...
//!   per group, never reused, never skipped).
//! - A `(group, clip_id)` pair is stored at most once: appending it again
//!   returns [`AppendOutcome::Duplicate`] with the first copy's sequence
//!   number and stores nothing.
//! - Cursors only move forward. A cursor update may be lost in a crash (it
//!   is committed without fsync and made durable by the next durable
//!   commit); the worst outcome is that a member receives a clip again,
//!   which clients drop by clip id.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use ptt_protocol::{ChannelLimits, ClipFormat, ClipId, ClipSummary, GroupMode, MemberState, Role};

pub mod redb_store;

pub use redb_store::RedbStore;

/// A boxed future, so that the trait can be used as `Arc<dyn ClipStore>`.
pub type StoreFuture<'a, T> =
    std::pin::Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// A group as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupInfo {
    /// The group id.
    pub id: String,
    /// Walkie (floor control) or notes.
    pub mode: GroupMode,
    /// Longest clip (and longest floor hold) in this group, in ms.
    pub max_clip_ms: u32,
    /// The members' user ids. In a channel: its owner, admins and
    /// publishers only; followers are kept apart ([`ClipStore::follower`]),
    /// so a group record stays small whatever the following.
    pub members: BTreeSet<String>,
    /// The roles of members whose role is not [`Role::Member`] (a stored
    /// group without roles reads as everyone a member).
    pub roles: BTreeMap<String, Role>,
    /// Set for a channel.
    pub channel: Option<ChannelInfo>,
    /// The group's own live latency budget, ms (`None`: the relay's
    /// `live_budget_ms`); walkie groups have none whatever it says.
    pub live_budget_ms: Option<u32>,
}

impl GroupInfo {
    /// A group record with no roles, not a channel.
    pub fn plain(id: &str, mode: GroupMode, max_clip_ms: u32, members: BTreeSet<String>) -> Self {
        GroupInfo {
            id: id.to_owned(),
            mode,
            max_clip_ms,
            members,
            roles: BTreeMap::new(),
            channel: None,
            live_budget_ms: None,
        }
    }

    /// The role of `user` among the members (`None`: not a member; a
    /// channel's followers are not members).
    pub fn role(&self, user: &str) -> Option<Role> {
        if !self.members.contains(user) {
            return None;
        }
        Some(self.roles.get(user).copied().unwrap_or(Role::Member))
    }
}

/// What makes a group a channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelInfo {
    /// Listed, and followed without an invite.
    pub public: bool,
    /// Its owner's limits (`max_clip_ms` mirrors the group's).
    pub limits: ChannelLimits,
}

/// A follower's record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Follower {
    /// Its clips are delivered flagged muted.
    pub muted: bool,
}

/// A change of a follower's record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FollowChange {
    /// Follow; a new follower's cursor moves forward to `start` (it
    /// receives the clips after it).
    Follow {
        /// The new follower's starting cursor.
        start: u64,
    },
    /// Stop following (the cursor is kept).
    Unfollow,
    /// Mute or unmute.
    Mute(bool),
}

/// The audio parameters and identity of a clip, as the talker's header gave
/// them (plus the talker's authenticated user id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClipMeta {
    /// The group.
    pub group: String,
    /// The talker's clip id.
    pub clip_id: ClipId,
    /// The talker's user id.
    pub talker: String,
    /// Frame format (always Opus once stored: WAV uploads are transcoded
    /// before they are stored).
    pub format: ClipFormat,
    /// Sample rate of the talker's audio.
    pub sample_rate: u32,
    /// Channels.
    pub channels: u8,
    /// Frame duration in ms.
    pub frame_ms: u8,
    /// When the clip was started, Unix ms (relay clock).
    pub created_ms: u64,
    /// Header flags (emergency).
    pub flags: u8,
}

/// A clip to store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewClip {
    /// Identity and audio parameters.
    pub meta: ClipMeta,
    /// The Opus packets, in order.
    pub frames: Vec<Bytes>,
    /// The waveform preview (may be empty).
    pub waveform: Bytes,
}

/// A clip read back from the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredClip {
    /// Its group sequence number.
    pub seq: u64,
    /// Identity and audio parameters.
    pub meta: ClipMeta,
    /// The Opus packets, in order.
    pub frames: Vec<Bytes>,
    /// The waveform preview (may be empty).
    pub waveform: Bytes,
}

/// What [`ClipStore::append_clip`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppendOutcome {
    /// Stored durably as `seq`.
    Stored {
        /// The new clip's sequence number.
        seq: u64,
    },
    /// The clip id was stored before as `seq`; nothing was written.
    Duplicate {
        /// The earlier copy's sequence number.
        seq: u64,
    },
}

impl AppendOutcome {
    /// The sequence number either way.
    pub fn seq(self) -> u64 {
        match self {
            AppendOutcome::Stored { seq } | AppendOutcome::Duplicate { seq } => seq,
        }
    }
}

/// How long clips are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetentionPolicy {
    /// Clips older than this many ms are deleted (0: keep forever).
    pub max_age_ms: u64,
    /// At most this many clips per group are kept, the newest (0: no cap).
    pub max_clips_per_group: u64,
}

/// The range of clip sequence numbers a group holds now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SeqRange {
    /// The oldest retained clip, or `last + 1` when none is retained.
    pub first: u64,
    /// The newest clip ever stored (0 if none ever was).
    pub last: u64,
}

/// How many writes a store has been asked for since it opened (for tests
/// and metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreCounters {
    /// Clip appends.
    pub appends: u64,
    /// Cursor updates.
    pub cursor_writes: u64,
    /// Follower record changes (follow, unfollow, mute).
    pub follower_writes: u64,
    /// Batches of a channel's counts ([`ClipStore::add_channel_counts`]).
    pub count_writes: u64,
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The group does not exist.
    #[error("no such group: {0}")]
    NoSuchGroup(String),
    /// A group with that id exists already.
    #[error("group exists already: {0}")]
    GroupExists(String),
    /// The data directory is locked by another process (a running relay).
    #[error("the store at {path} is in use by another process (is a relay running on it?)")]
    Locked {
        /// The database file.
        path: String,
    },
    /// A stored record does not decode: the file is damaged or from an
    /// incompatible version.
    #[error("corrupt record in {table}: {detail}")]
    Corrupt {
        /// The table.
        table: &'static str,
        /// What was wrong.
        detail: String,
    },
    /// The underlying database or file system failed.
    #[error("storage failure: {0}")]
    Backend(String),
    /// The operation needs a channel.
    #[error("not a channel: {0}")]
    NotChannel(String),
    /// The user does not follow the channel.
    #[error("not a follower of {0}")]
    NotFollower(String),
}

impl StoreError {
    /// The wire code a client sees for this failure.
    pub fn code(&self) -> ptt_protocol::ErrorCode {
        use ptt_protocol::ErrorCode;
        match self {
            StoreError::NoSuchGroup(_) => ErrorCode::NoSuchGroup,
            StoreError::GroupExists(_) => ErrorCode::GroupExists,
            StoreError::NotChannel(_) => ErrorCode::NotChannel,
            StoreError::NotFollower(_) => ErrorCode::NotMember,
            _ => ErrorCode::Internal,
        }
    }
}

/// The answer of a store that does not implement an optional operation.
fn unsupported<'a, T: Send + 'a>(what: &'static str) -> StoreFuture<'a, T> {
    Box::pin(async move {
        Err(StoreError::Backend(format!(
            "{what} is not supported by this store"
        )))
    })
}

/// Durable storage for the relay. See the module documentation.
pub trait ClipStore: Send + Sync + 'static {
    /// Creates a group with no members.
    fn create_group(&self, group: &str, mode: GroupMode, max_clip_ms: u32) -> StoreFuture<'_, ()>;
    /// Changes a group's mode.
    fn set_mode(&self, group: &str, mode: GroupMode) -> StoreFuture<'_, ()>;
    /// Sets a group's live latency budget in ms (`None`: the relay's
    /// default), and signals the group's watchers.
    fn set_live_budget(&self, group: &str, budget_ms: Option<u32>) -> StoreFuture<'_, ()> {
        let _ = (group, budget_ms);
        unsupported("live latency budgets")
    }
    /// Adds a member (no-op if present).
    fn add_member(&self, group: &str, user: &str) -> StoreFuture<'_, ()>;
    /// Removes a member (no-op if absent).
    fn remove_member(&self, group: &str, user: &str) -> StoreFuture<'_, ()>;
    /// One group with its members.
    fn group(&self, group: &str) -> StoreFuture<'_, Option<GroupInfo>>;
    /// Every group, sorted by id.
    fn groups(&self) -> StoreFuture<'_, Vec<GroupInfo>>;

    /// Stores a clip durably, deduplicated by `(group, clip_id)`.
    fn append_clip(&self, clip: NewClip) -> StoreFuture<'_, AppendOutcome>;
    /// The sequence number of a stored clip id, if it was stored (even if
    /// retention deleted the clip since): lets the relay acknowledge a
    /// retried upload at its header instead of relaying it again.
    fn clip_seq(&self, group: &str, clip_id: ClipId) -> StoreFuture<'_, Option<u64>>;
    /// Up to `limit` clips with `seq > after`, in sequence order.
    fn clips_after(
        &self,
        group: &str,
        after: u64,
        limit: usize,
    ) -> StoreFuture<'_, Vec<StoredClip>>;
    /// The newest `count` clips, oldest first.
    fn recent_clips(&self, group: &str, count: usize) -> StoreFuture<'_, Vec<StoredClip>>;
    /// The metadata of clip `seq`, if retained.
    fn clip_meta(&self, group: &str, seq: u64) -> StoreFuture<'_, Option<ClipMeta>>;
    /// The sequence numbers the group holds.
    fn seq_range(&self, group: &str) -> StoreFuture<'_, SeqRange>;

    /// The member's cursor: every clip up to it was delivered (0: none).
    fn cursor(&self, group: &str, user: &str) -> StoreFuture<'_, u64>;
    /// Moves the cursor to `seq` if that is forward.
    fn advance_cursor(&self, group: &str, user: &str, seq: u64) -> StoreFuture<'_, ()>;

    /// Deletes clips the policy no longer keeps, as of `now_ms`; returns
    /// how many were deleted.
    fn apply_retention(&self, policy: RetentionPolicy, now_ms: u64) -> StoreFuture<'_, u64>;
    /// Summaries (no audio) of up to `limit` clips with `seq > after`, in
    /// sequence order.
    fn clip_summaries(
        &self,
        group: &str,
        after: u64,
        limit: usize,
    ) -> StoreFuture<'_, Vec<ClipSummary>> {
        let _ = (group, after, limit);
        unsupported("listing clips")
    }
    /// Deletes clip `seq` (an administrator's decision) and records a
    /// tombstone at `now_ms`; returns its clip id, or `None` if it is not
    /// stored. Its dedup entry ages out as after retention.
    fn delete_clip(&self, group: &str, seq: u64, now_ms: u64) -> StoreFuture<'_, Option<ClipId>> {
        let _ = (group, seq, now_ms);
        unsupported("deleting clips")
    }
    /// The tombstones of `group` recorded at or after `since_ms`:
    /// `(seq, clip_id)` in sequence order.
    fn tombstones(&self, group: &str, since_ms: u64) -> StoreFuture<'_, Vec<(u64, ClipId)>> {
        let _ = (group, since_ms);
        Box::pin(async { Ok(Vec::new()) })
    }
    /// Every member of `group` with its cursor and last-seen time.
    fn member_status(&self, group: &str) -> StoreFuture<'_, Vec<MemberState>> {
        let _ = group;
        unsupported("member status")
    }
    /// When `user` was last seen in `group` (a join or a cursor write),
    /// Unix ms; 0 if never.
    fn last_seen(&self, group: &str, user: &str) -> StoreFuture<'_, u64> {
        let _ = (group, user);
        Box::pin(async { Ok(0) })
    }
    /// Records that `user` was seen in `group` now.
    fn touch_member(&self, group: &str, user: &str) -> StoreFuture<'_, ()> {
        let _ = (group, user);
        Box::pin(async { Ok(()) })
    }

    /// Makes everything committed so far durable (used at shutdown).
    fn flush(&self) -> StoreFuture<'_, ()>;

    // Roles and channels (issue #14). The defaults refuse, for stores that
    // do not keep channels yet.

    /// Creates a channel owned by `owner` (its only member, role owner)
    /// with `limits` (whose `max_clip_ms` is the group's).
    fn create_channel(
        &self,
        channel: &str,
        owner: &str,
        public: bool,
        limits: ChannelLimits,
    ) -> StoreFuture<'_, ()> {
        let _ = (channel, owner, public, limits);
        no_channels()
    }
    /// Gives `user` a role in a group (adding it as a member). In a
    /// channel, [`Role::Listener`] removes it from the members (a follower
    /// stays a follower).
    fn set_role(&self, group: &str, user: &str, role: Role) -> StoreFuture<'_, ()> {
        let _ = (group, user, role);
        no_channels()
    }
    /// Sets a channel's limits (the group's `max_clip_ms` with them).
    fn set_channel_limits(&self, channel: &str, limits: ChannelLimits) -> StoreFuture<'_, ()> {
        let _ = (channel, limits);
        no_channels()
    }
    /// Changes a follower's record; returns whether anything changed.
    /// Costs O(1) writes, and does not signal the group's watchers.
    fn change_follower(
        &self,
        channel: &str,
        user: &str,
        change: FollowChange,
    ) -> StoreFuture<'_, bool> {
        let _ = (channel, user, change);
        no_channels()
    }
    /// A follower's record, if `user` follows `channel`.
    fn follower(&self, channel: &str, user: &str) -> StoreFuture<'_, Option<Follower>> {
        let _ = (channel, user);
        no_channels()
    }
    /// How many follow `channel`.
    fn follower_count(&self, channel: &str) -> StoreFuture<'_, u64> {
        let _ = channel;
        no_channels()
    }
    /// Up to `limit` public channels whose id starts with `prefix`, sorted.
    fn public_channels(&self, prefix: &str, limit: usize) -> StoreFuture<'_, Vec<String>> {
        let _ = (prefix, limit);
        no_channels()
    }
    /// Stores an invite code for `channel`.
    fn create_invite(&self, channel: &str, code: &str) -> StoreFuture<'_, ()> {
        let _ = (channel, code);
        no_channels()
    }
    /// Deletes an invite code of `channel`; returns whether it existed.
    fn revoke_invite(&self, channel: &str, code: &str) -> StoreFuture<'_, bool> {
        let _ = (channel, code);
        no_channels()
    }
    /// The channel an invite code opens.
    fn invite(&self, code: &str) -> StoreFuture<'_, Option<String>> {
        let _ = code;
        no_channels()
    }
    /// Adds a batch of a channel's followers' acknowledgements
    /// (`delivered`) and Played (`played`) to its stored counts: the hub
    /// writes one such batch per channel every few seconds and at
    /// shutdown, not one per acknowledgement.
    fn add_channel_counts(
        &self,
        channel: &str,
        delivered: u64,
        played: u64,
    ) -> StoreFuture<'_, ()> {
        let _ = (channel, delivered, played);
        no_channels()
    }
    /// A channel's stored counts: (delivered, played) since it was
    /// created.
    fn channel_counts(&self, channel: &str) -> StoreFuture<'_, (u64, u64)> {
        let _ = channel;
        no_channels()
    }
    /// The writes asked for so far.
    fn counters(&self) -> StoreCounters {
        StoreCounters::default()
    }
}

fn no_channels<'a, T: 'a>() -> StoreFuture<'a, T> {
    Box::pin(async {
        Err(StoreError::Backend(
            "this store does not keep channels".into(),
        ))
    })
}
