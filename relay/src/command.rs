//! What the rest of the relay asks a session to do, and the handle it asks
//! through.
//!
//! Each session has one bounded queue of [`SessionCommand`]s. Nothing that
//! must arrive is ever dropped: when a session's queue is full (its client
//! cannot keep up, or its task is stuck), the session is told to close
//! ([`SessionHandle::overflowed`]) with `SlowReceiver`, so that its client
//! reconnects and gets a consistent state (catch-up, the floor) instead of a
//! silent hole in it.
//!
//! Receipts are the exception to one slot per message: a talker gets one
//! per member per clip, so a clip in a group of a thousand brings a
//! thousand within moments, more than the queue holds, however well the
//! talker keeps up. They wait, encoded, in a backlog of their own bounded
//! in bytes ([`RECEIPT_BACKLOG_BYTES`]), behind at most one queue slot
//! ([`SessionCommand::Receipts`]), and go out in one write; a backlog that
//! overflows closes the session as a full queue does.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use ptt_protocol::{ControlMessage, ErrorCode};

use tokio::sync::{Notify, mpsc};

use crate::live::LiveClip;

/// Capacity of a session's command queue.
pub const COMMAND_QUEUE: usize = 512;

/// Most bytes of encoded receipts a session keeps waiting for its control
/// stream: about five thousand receipts (one clip's in a group of five
/// thousand), far above what a client that reads its stream ever has
/// waiting, and a bounded cost (the receipts exist only because members
/// acknowledged clips delivered to them).
pub const RECEIPT_BACKLOG_BYTES: usize = 256 * 1024;

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
    /// Receipts are waiting in the session's backlog: write them all
    /// ([`SessionHandle::take_receipts`]). At most one is queued at a time.
    Receipts,
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
    /// Encoded receipts waiting for the session (see the module docs).
    receipts: Arc<Mutex<BytesMut>>,
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
                receipts: Arc::default(),
            },
            rx,
        )
    }

    /// Queues a command without waiting. A full queue closes the session
    /// (see the module documentation); a closed one means it is gone.
    pub fn offer(&self, command: SessionCommand) {
        match self.tx.try_send(command) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => self.overflow("command queue"),
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }

    /// Marks the session overflowed and wakes it to close.
    fn overflow(&self, what: &str) {
        if !self.overflow.set.swap(true, Ordering::AcqRel) {
            tracing::info!(session = self.id, "{what} full: closing the session");
            self.overflow.wake.notify_waiters();
        }
    }

    /// Queues an encoded `Receipt` (`ControlMessage::Receipt`'s bytes,
    /// encoded once for every session of the talker) in the session's
    /// receipt backlog (see the module documentation), waking the session
    /// if the backlog was empty. A full backlog closes the session.
    pub fn send_receipt(&self, encoded: &[u8]) {
        let wake = {
            let mut backlog = self.receipts.lock().unwrap_or_else(|p| p.into_inner());
            if backlog.len() + encoded.len() > RECEIPT_BACKLOG_BYTES {
                drop(backlog);
                self.overflow("receipt backlog");
                return;
            }
            backlog.extend_from_slice(encoded);
            backlog.len() == encoded.len()
        };
        if wake {
            self.offer(SessionCommand::Receipts);
        }
    }

    /// Takes every receipt waiting, encoded back to back (empty if none).
    pub fn take_receipts(&self) -> Bytes {
        self.receipts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .split()
            .freeze()
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use ptt_protocol::{ClipId, ReceiptKind};

    fn receipt(user: usize) -> ControlMessage {
        ControlMessage::Receipt {
            group: "team".into(),
            seq: 7,
            clip_id: ClipId::from_bytes([1; 16]),
            user: format!("member-{user}"),
            kind: ReceiptKind::Delivered,
        }
    }

    #[tokio::test]
    async fn receipts_share_one_queue_slot_and_go_in_order() {
        let (handle, mut rx) = SessionHandle::new(1, "tina".into());
        for user in 0..COMMAND_QUEUE * 2 {
            handle.send_receipt(&receipt(user).to_bytes());
        }
        assert!(matches!(rx.try_recv(), Ok(SessionCommand::Receipts)));
        assert!(rx.try_recv().is_err(), "one slot for every receipt");
        let mut frames = ptt_protocol::FrameDecoder::new(1024);
        frames.push(handle.take_receipts());
        for user in 0..COMMAND_QUEUE * 2 {
            let frame = frames.next_frame().unwrap().expect("a whole frame");
            let message = ControlMessage::decode(frame.kind, frame.payload).unwrap();
            assert_eq!(message, receipt(user));
        }
        assert_eq!(frames.buffered(), 0);
        // Taken: the next receipt wakes the session again.
        handle.send_receipt(&receipt(0).to_bytes());
        assert!(matches!(rx.try_recv(), Ok(SessionCommand::Receipts)));
        let overflowed = handle.overflowed();
        assert!(futures_ready(overflowed).is_none());
    }

    #[tokio::test]
    async fn a_full_receipt_backlog_closes_the_session() {
        let (handle, _rx) = SessionHandle::new(1, "tina".into());
        let one = receipt(0).to_bytes().len();
        for user in 0..RECEIPT_BACKLOG_BYTES / one {
            handle.send_receipt(&receipt(user % 10).to_bytes());
        }
        assert!(futures_ready(handle.overflowed()).is_none());
        handle.send_receipt(&receipt(0).to_bytes());
        handle.send_receipt(&receipt(0).to_bytes());
        assert!(futures_ready(handle.overflowed()).is_some());
        assert!(handle.take_receipts().len() <= RECEIPT_BACKLOG_BYTES);
    }

    /// Polls `f` once: its output if it is ready now (for tests of
    /// wake-ups without a runtime's timing).
    pub(crate) fn futures_ready<F: Future>(f: F) -> Option<F::Output> {
        let mut f = std::pin::pin!(f);
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        match f.as_mut().poll(&mut cx) {
            std::task::Poll::Ready(v) => Some(v),
            std::task::Poll::Pending => None,
        }
    }
}
