//! What the rest of the relay asks a session to do, and the handle it asks
//! through.
//!
//! Each session has one bounded queue of [`SessionCommand`]s. Nothing that
//! must arrive is ever dropped: when a session's queue is full (its client
//! cannot keep up, or its task is stuck), the session is told to close
//! ([`SessionHandle::overflowed`]) with `SlowReceiver`, so that its client
//! reconnects and gets a consistent state (catch-up, the floor) instead of a
//! silent hole in it.

use std::sync::Arc;

use ptt_protocol::{ControlMessage, ErrorCode};
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::{Notify, mpsc};

use crate::live::LiveClip;

/// Capacity of a session's command queue.
pub const COMMAND_QUEUE: usize = 512;

/// What a session is asked to do.
#[derive(Debug)]
pub enum SessionCommand {
    /// Send a control message (boxed: the queue's slots are allocated in
    /// blocks per session, and most commands are small).
    Send(Box<ControlMessage>),
    /// Deliver a clip on a new stream, live from its shared buffer.
    Deliver(Arc<LiveClip>),
    /// This connection no longer receives `group` (the member was removed,
    /// or the group deleted): stop its deliveries with `code` and tell the
    /// client.
    Left {
        /// The group.
        group: Arc<str>,
        /// `NotMember` or `NoSuchGroup`.
        code: ErrorCode,
    },
    /// The user muted or unmuted `group` (a channel it follows) on
    /// another connection: this connection's deliveries of it that start
    /// from now on are flagged accordingly.
    Mute {
        /// The channel.
        group: Arc<str>,
        /// Muted (or unmuted).
        muted: bool,
    },
}

impl SessionCommand {
    /// A command to send `message`.
    pub fn send(message: ControlMessage) -> SessionCommand {
        SessionCommand::Send(Box::new(message))
    }
}

/// A session as the rest of the relay sees it.
#[derive(Debug, Clone)]
pub struct SessionHandle {
    /// The connection's id, unique in this relay.
    pub id: u64,
    /// The authenticated user.
    pub user: Arc<str>,
    tx: mpsc::Sender<SessionCommand>,
    overflow: Arc<Overflow>,
}

/// Set (and the session woken) when the session's queue overflowed.
#[derive(Debug, Default)]
struct Overflow {
    set: AtomicBool,
    wake: Notify,
}

impl SessionHandle {
    /// A handle and the receiving end of its queue.
    pub fn new(id: u64, user: Arc<str>) -> (SessionHandle, mpsc::Receiver<SessionCommand>) {
        let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
        (
            SessionHandle {
                id,
                user,
                tx,
                overflow: Arc::default(),
            },
            rx,
        )
    }

    /// Queues a command without waiting. A full queue closes the session
    /// (see the module documentation); a closed one means it is gone.
    pub fn offer(&self, command: SessionCommand) {
        match self.tx.try_send(command) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                if !self.overflow.set.swap(true, Ordering::AcqRel) {
                    tracing::info!(session = self.id, "command queue full: closing the session");
                    self.overflow.wake.notify_waiters();
                }
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }

    /// Queues a control message (see [`SessionHandle::offer`]).
    pub fn send(&self, message: ControlMessage) {
        self.offer(SessionCommand::send(message));
    }

    /// Queues a command, waiting for room (for the session's own tasks,
    /// which may wait for it).
    pub async fn send_wait(&self, command: SessionCommand) {
        let _ = self.tx.send(command).await;
    }

    /// Completes when the queue overflowed and the session must close.
    pub async fn overflowed(&self) {
        let woken = self.overflow.wake.notified();
        let mut woken = std::pin::pin!(woken);
        // Registered before the check: an overflow in between still wakes.
        woken.as_mut().enable();
        if self.overflow.set.load(Ordering::Acquire) {
            return;
        }
        woken.await;
    }
}
