//! The group log: the seam between the relay and whatever keeps each
//! group's clips in order.
//!
//! Every group is an append-only log of clips numbered 1, 2, 3 … without
//! gaps. The relay needs four things from it, and nothing else:
//!
//! - **append** a finished clip, deduplicated by its clip id as a property
//!   of the log (appending an id again answers with the first copy's
//!   sequence number and stores nothing), returning only once the clip is
//!   durable;
//! - **read** stored clips after a sequence number (catch-up, recovery,
//!   fetch);
//! - **subscribe** to a group from a sequence number: a [`GroupFeed`] that
//!   yields every clip stored after it, in sequence order, each once, then
//!   each new one as it is stored; the live clips other nodes' talkers are
//!   speaking, frame by frame ([`LiveEvent`]); and the group's record
//!   whenever its membership or mode changes (membership is a watched
//!   source);
//! - **publish live** events of the talkers on this node, for the other
//!   nodes' feeds.
//!
//! Publication order is the log's: a node learns that clip `n` is stored
//! from its feed, after `n - 1`, never from the talker that appended it.
//! Live frames of this node's own talkers do not go through the log: the
//! node fans them out locally (the hub) and publishes them for the
//! others, as a remote origin is just another producer in the same model
//! (moq-rs's origin/cluster split).
//!
//! [`local::LocalLog`] is the single-node implementation over the embedded
//! redb store; a NATS JetStream log (a stream of clips per group subject, a
//! key-value watch for membership, core NATS subjects for live frames)
//! implements the same trait.

use bytes::Bytes;
use ptt_protocol::{ClipId, ErrorCode};

use crate::store::{AppendOutcome, ClipMeta, GroupInfo, NewClip, SeqRange, StoreError, StoredClip};

pub mod local;

pub use local::LocalLog;

/// A boxed future of the log (the trait is used as `Arc<dyn GroupLog>`).
pub type LogFuture<'a, T> =
    std::pin::Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// One thing a [`GroupFeed`] yields.
#[derive(Debug, Clone)]
pub enum FeedEvent {
    /// A clip was stored; feeds yield these in sequence order, each once.
    Stored(StoredClip),
    /// A clip being spoken on another node.
    Live(LiveEvent),
    /// The group's record changed (members added or removed, mode), or the
    /// group was deleted (`None`).
    Group(Option<GroupInfo>),
    /// An administrator deleted stored clip `seq` on another node (or
    /// offline): this node's members get `ClipDeleted`.
    Deleted {
        /// The clip's number.
        seq: u64,
        /// The clip's id.
        clip_id: ClipId,
    },
    /// A follower of the channel muted, unmuted or unfollowed it on
    /// another node (issue #14): its connections on this node follow.
    Follower {
        /// The follower.
        user: String,
        /// What it did.
        change: FollowerChange,
    },
}

/// What a follower did to a channel, as one node tells the others
/// ([`GroupLog::publish_follower`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FollowerChange {
    /// Muted: clips still arrive, flagged muted.
    Muted,
    /// Unmuted.
    Unmuted,
    /// Unfollowed (and holds no role): its connections stop receiving.
    Unfollowed,
}

/// A live clip's progress, as one node tells the others.
#[derive(Debug, Clone)]
pub enum LiveEvent {
    /// A talker started a clip (its frames follow).
    Started {
        /// The clip's identity and audio parameters.
        meta: ClipMeta,
    },
    /// The next frame of a clip.
    Frame {
        /// The group.
        group: String,
        /// The clip.
        clip_id: ClipId,
        /// The frame's index (0, 1, 2 …).
        index: u32,
        /// The Opus packet.
        data: Bytes,
    },
    /// The talker discarded the clip (or the relay did): nothing is stored.
    Aborted {
        /// The group.
        group: String,
        /// The clip.
        clip_id: ClipId,
        /// Why.
        code: ErrorCode,
    },
}

impl LiveEvent {
    /// The group the event belongs to.
    pub fn group(&self) -> &str {
        match self {
            LiveEvent::Started { meta } => &meta.group,
            LiveEvent::Frame { group, .. } | LiveEvent::Aborted { group, .. } => group,
        }
    }
}

/// A subscription to one group (see [`GroupLog::subscribe`]).
pub trait GroupFeed: Send + 'static {
    /// The next event; `Ok(None)` when the log is closing. Cancel-safe: a
    /// future dropped before it completes loses nothing.
    fn next(&mut self) -> LogFuture<'_, Option<FeedEvent>>;
}

/// Each group's ordered clips. See the module documentation.
pub trait GroupLog: Send + Sync + std::fmt::Debug + 'static {
    /// Stores a clip durably as the group's next sequence number,
    /// deduplicated by `(group, clip_id)`.
    fn append(&self, clip: NewClip) -> LogFuture<'_, AppendOutcome>;
    /// The sequence number of a clip id appended before, if any (even if
    /// retention deleted the clip since): a retried upload is acknowledged
    /// at its header instead of being relayed again.
    fn clip_seq(&self, group: &str, clip_id: ClipId) -> LogFuture<'_, Option<u64>>;
    /// Up to `limit` stored clips with `seq > after`, in order.
    fn read(&self, group: &str, after: u64, limit: usize) -> LogFuture<'_, Vec<StoredClip>>;
    /// The newest `count` stored clips, oldest first.
    fn recent(&self, group: &str, count: usize) -> LogFuture<'_, Vec<StoredClip>>;
    /// The metadata of stored clip `seq`, if it is retained.
    fn meta(&self, group: &str, seq: u64) -> LogFuture<'_, Option<ClipMeta>>;
    /// The sequence numbers the group holds now.
    fn range(&self, group: &str) -> LogFuture<'_, SeqRange>;
    /// A feed of the group's clips stored after `after`, then of new ones,
    /// live clips from other nodes and changes of the group's record.
    fn subscribe(&self, group: &str, after: u64) -> LogFuture<'_, Box<dyn GroupFeed>>;
    /// Whether [`GroupLog::publish_live`] reaches anyone (a single node has
    /// no one to tell, so ingest need not build the events).
    fn publishes_live(&self) -> bool;
    /// Tells the other nodes about a live clip of this node's talkers.
    fn publish_live(&self, event: LiveEvent);
    /// Tells the other nodes that `user` muted, unmuted or unfollowed
    /// `channel` here, so that the user's connections there follow (their
    /// feeds of the channel yield [`FeedEvent::Follower`]). Returns once
    /// the notice is on its way ahead of any live clip this node
    /// publishes after it. A single node has no one to tell.
    fn publish_follower(
        &self,
        channel: &str,
        user: &str,
        change: FollowerChange,
    ) -> LogFuture<'_, ()> {
        let _ = (channel, user, change);
        Box::pin(async { Ok(()) })
    }
    /// Makes everything appended so far durable and stops: called once,
    /// when the relay has stopped using the log.
    fn close(&self) -> LogFuture<'_, ()>;
}
