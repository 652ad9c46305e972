//! The fan-out interface: what connection handling needs from whatever
//! delivers clips across members: sessions and groups, the floor, clips in
//! flight and their publication in sequence order.
//!
//! [`crate::hub::LocalHub`] implements it in memory for one node; a
//! several-node implementation (NATS JetStream) implements the same trait,
//! and the session, ingest and delivery code do not change. Frames do not
//! pass through this interface: they travel in each clip's shared buffer
//! ([`crate::live::LiveClip`]), which a networked fan-out feeds from its
//! subscription.

use std::sync::Arc;
use std::time::Duration;

use ptt_protocol::{ClipId, ControlMessage, ErrorCode, GroupMode, ReceiptKind};
use tokio::sync::mpsc;

use crate::live::LiveClip;
use crate::store::{AppendOutcome, GroupInfo};

/// A boxed future answering with a value or a wire error code.
pub type FanoutFuture<'a, T> =
    std::pin::Pin<Box<dyn Future<Output = Result<T, ErrorCode>> + Send + 'a>>;

/// What the hub asks a session to do. Sent on the session's bounded queue.
#[derive(Debug)]
pub enum SessionCommand {
    /// Send a control message (boxed: the queue's slots are allocated in
    /// blocks per session, and most commands are small).
    Send(Box<ControlMessage>),
    /// Deliver a clip (live or complete) on a new stream.
    Deliver(Arc<LiveClip>),
    /// The session's live delivery fell behind in `group`: catch up.
    CatchUp(Arc<str>),
}

impl SessionCommand {
    /// A command to send `message`.
    pub fn send(message: ControlMessage) -> SessionCommand {
        SessionCommand::Send(Box::new(message))
    }
}

/// A session as the hub sees it.
#[derive(Debug, Clone)]
pub struct SessionHandle {
    /// The connection's id.
    pub id: u64,
    /// The authenticated user.
    pub user: Arc<str>,
    /// The session's command queue.
    pub tx: mpsc::Sender<SessionCommand>,
}

impl SessionHandle {
    /// Queues a command without waiting; `false` if the queue is full or
    /// the session is gone.
    pub fn offer(&self, command: SessionCommand) -> bool {
        self.tx.try_send(command).is_ok()
    }

    /// Queues a live clip; when the queue is full the session is told to
    /// catch up instead (if even that cannot be queued it will catch up
    /// when it next joins: its cursor has not moved past the clip).
    pub fn deliver(&self, clip: &Arc<LiveClip>) {
        if !self.offer(SessionCommand::Deliver(clip.clone())) {
            tracing::debug!(session = self.id, "queue full, live clip cut");
            self.offer(SessionCommand::CatchUp(clip.meta.group.as_str().into()));
        }
    }
}

/// What a joining session gets: where catch-up ends and what is live.
#[derive(Debug)]
pub struct JoinSnapshot {
    /// The group's mode.
    pub mode: GroupMode,
    /// Every clip up to here is in the store.
    pub last_seq: u64,
    /// Clips in flight, to deliver from their first frame.
    pub active: Vec<Arc<LiveClip>>,
}

/// Delivery of clips and control events across a group's members. See the
/// module documentation.
pub trait Fanout: Send + Sync + std::fmt::Debug + 'static {
    /// Registers a connected, authenticated session.
    fn register(&self, session: SessionHandle);
    /// Removes a session from the groups it joined; releases its floors.
    fn unregister(&self, session: u64, groups: &[Arc<str>]);
    /// The group, if `user` is a member.
    fn member_group<'a>(&'a self, group: &'a str, user: &'a str) -> FanoutFuture<'a, GroupInfo>;
    /// Subscribes a session to a group's live clips; says where catch-up
    /// ends and which clips are in flight.
    fn join<'a>(
        &'a self,
        group: &'a str,
        session: &'a SessionHandle,
    ) -> FanoutFuture<'a, JoinSnapshot>;
    /// Unsubscribes a session from a group.
    fn leave(&self, group: &str, session: u64);
    /// A floor request; answers with `FloorGranted` or `FloorDenied`.
    fn request_floor<'a>(
        &'a self,
        group: &'a str,
        session: &'a SessionHandle,
        emergency: bool,
        request_id: u64,
    ) -> FanoutFuture<'a, ControlMessage>;
    /// A floor release; `true` if the session held it.
    fn release_floor(&self, group: &str, session: u64) -> bool;
    /// Frees the floor if its holder's time is up.
    fn expire_floor(&self, group: &str);
    /// How long the floor of a group may be held.
    fn floor_timeout(&self, group: &str) -> Option<Duration>;
    /// Starts a live clip: membership and floor checks, then every
    /// subscribed session gets it.
    fn start_clip<'a>(
        &'a self,
        clip: Arc<LiveClip>,
        session: &'a SessionHandle,
        emergency_allowed: bool,
    ) -> FanoutFuture<'a, ()>;
    /// A clip's upload failed.
    fn abort_clip(&self, clip: &Arc<LiveClip>, code: ErrorCode);
    /// A clip was appended to the store; publish it in sequence order.
    fn finish_clip(&self, clip: Arc<LiveClip>, outcome: AppendOutcome, live: bool);
    /// Sends a receipt to every session of `talker`.
    fn send_receipt(
        &self,
        talker: &str,
        group: &str,
        seq: u64,
        clip_id: ClipId,
        member: &str,
        kind: ReceiptKind,
    );
    /// Reloads a group after an admin change.
    fn refresh_group<'a>(
        &'a self,
        group: &'a str,
    ) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send + 'a>>;
    /// Connected sessions on this node.
    fn session_count(&self) -> usize;
}
