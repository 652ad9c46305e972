//! What the relay tells the application, as a stream of events.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use ptt_protocol::{ClipHeader, ClipId, ErrorCode, ReceiptKind, Welcome};
use tokio::sync::mpsc;

/// Something that happened on the connection.
///
/// Events of one clip arrive in order (started, frames, ended or aborted);
/// events of different clips interleave, since each clip has its own QUIC
/// stream: order clips by `seq`. Control events (floor, receipts, catch-up)
/// arrive in the order the relay sent them.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A clip began arriving.
    ClipStarted {
        /// The group.
        group: String,
        /// The talker's clip id.
        clip_id: ClipId,
        /// The talker's user id.
        talker: String,
        /// The clip's sequence number, or 0 for a live clip (known at its end).
        seq: u64,
        /// Whether the clip comes from the store (catch-up or fetch).
        history: bool,
        /// The whole header (format, sample rate, frame duration, flags…).
        header: ClipHeader,
    },
    /// One frame (an Opus packet) of a clip. On the UDP media path
    /// (header flag MEDIA) frames come as they arrive: place them by
    /// `index`, and conceal a missing one rather than wait for it (a
    /// frame may come late, or only in the fetched copy after
    /// [`Event::ClipIncomplete`]). Such a clip may start (and play) before
    /// its stream's header arrives (PROTOCOL.md §14.4).
    Frame {
        /// The group.
        group: String,
        /// The clip.
        clip_id: ClipId,
        /// 0, 1, 2… within the clip.
        index: u32,
        /// The Opus packet.
        data: Bytes,
        /// When the client read it, for jitter buffers and latency metrics.
        received_at: Instant,
    },
    /// A clip arrived whole.
    ClipEnded {
        /// The group.
        group: String,
        /// The clip.
        clip_id: ClipId,
        /// Its sequence number in the group.
        seq: u64,
        /// How many frames it has.
        frame_count: u32,
        /// A waveform preview, one byte (0 to 31) per bucket.
        waveform: Bytes,
    },
    /// A live clip received on the UDP media path (PROTOCOL.md, section 14)
    /// ended with `missing` of its `frame_count` frames lost on the way
    /// (those that arrived came as [`Event::Frame`]s). It takes the place
    /// of [`Event::ClipEnded`] for this copy: the client fetches the clip
    /// whole at once, so the same clip follows from the store as
    /// [`Event::ClipStarted`] (`history`, flag FETCHED), every frame, and
    /// [`Event::ClipEnded`], after which it is acknowledged. Fill the holes
    /// (or replace the live copy) by `clip_id` and frame index.
    ClipIncomplete {
        /// The group.
        group: String,
        /// The clip.
        clip_id: ClipId,
        /// Its sequence number in the group.
        seq: u64,
        /// How many frames it has.
        frame_count: u32,
        /// How many of them did not arrive.
        missing: u32,
    },
    /// A clip stopped before its end.
    ///
    /// `code` is the relay's reset code: [`ErrorCode::SlowReceiver`] (the
    /// clip comes again from the store), [`ErrorCode::ClipAborted`] (the
    /// talker vanished; discard it), [`ErrorCode::ShuttingDown`],
    /// [`ErrorCode::NotMember`] or [`ErrorCode::NoSuchGroup`] (see
    /// [`Event::GroupLeft`]); a
    /// protocol violation found by the client ([`ErrorCode::Protocol`],
    /// [`ErrorCode::OutOfOrder`]); or [`ErrorCode::None`] when the
    /// connection was lost (after a reconnect the relay sends it again
    /// from the store).
    ClipAborted {
        /// The group.
        group: String,
        /// The clip.
        clip_id: ClipId,
        /// Why.
        code: ErrorCode,
    },
    /// A member received or played one of our clips.
    Receipt {
        /// The group.
        group: String,
        /// The clip's sequence number.
        seq: u64,
        /// The clip id we gave it.
        clip_id: ClipId,
        /// The member.
        user: String,
        /// Delivered or played.
        kind: ReceiptKind,
    },
    /// Someone holds the floor of a walkie group.
    FloorTaken {
        /// The group.
        group: String,
        /// The talker.
        user: String,
        /// Taken with emergency priority.
        emergency: bool,
    },
    /// Nobody holds the floor of a walkie group.
    FloorIdle {
        /// The group.
        group: String,
    },
    /// We lost the floor before releasing it.
    FloorRevoked {
        /// The group.
        group: String,
        /// [`ErrorCode::Preempted`] or [`ErrorCode::ClipTooLong`].
        code: ErrorCode,
    },
    /// Clips `from_seq..=to_seq` expired before we received them.
    Gap {
        /// The group.
        group: String,
        /// The first missing clip.
        from_seq: u64,
        /// The last missing clip.
        to_seq: u64,
    },
    /// The relay sent every stored clip of the group up to `seq` (their
    /// streams may still be arriving); what follows is live.
    CaughtUp {
        /// The group.
        group: String,
        /// The newest clip of the catch-up.
        seq: u64,
    },
    /// One of our clips is durable in the store.
    Stored {
        /// The group.
        group: String,
        /// Our clip id.
        clip_id: ClipId,
        /// Its sequence number.
        seq: u64,
    },
    /// The relay refused one of our clips.
    ClipRejected {
        /// Our clip id.
        clip_id: ClipId,
        /// Why.
        code: ErrorCode,
        /// The relay's explanation.
        message: String,
    },
    /// This connection no longer receives the group: we were removed from
    /// it ([`ErrorCode::NotMember`]) or it was deleted
    /// ([`ErrorCode::NoSuchGroup`]). Clips of the group being received end
    /// with [`Event::ClipAborted`] with the same code; the client does not
    /// join the group again when it reconnects.
    GroupLeft {
        /// The group.
        group: String,
        /// Why.
        code: ErrorCode,
    },
    /// An administrator deleted a stored clip: drop it (by clip id) from
    /// the app's history. Sent to members connected at the time and, when
    /// they join again, to members that were away.
    ClipDeleted {
        /// The group.
        group: String,
        /// Its sequence number.
        seq: u64,
        /// Its clip id.
        clip_id: ClipId,
    },
    /// After a reconnect, a group could not be joined again (membership
    /// removed, group deleted).
    RejoinFailed {
        /// The group.
        group: String,
        /// The relay's code.
        code: ErrorCode,
        /// The relay's explanation.
        message: String,
    },
    /// The relay is draining and will close the connection once the clips
    /// in flight finish. The client then reconnects after `reconnect_after`
    /// (with jitter), to `address` when given, if it reconnects at all.
    GoAway {
        /// The relay's reconnect hint.
        reconnect_after: std::time::Duration,
        /// Another relay to reconnect to (`host:port`).
        address: Option<String>,
    },
    /// The connection was lost or closed.
    Disconnected {
        /// The relay's close code, when it closed the connection with one.
        code: Option<ErrorCode>,
        /// What happened, for logs and the user interface.
        reason: String,
        /// Whether the client is trying to reconnect.
        reconnecting: bool,
    },
    /// The client connected again, re-joined its groups and is re-sending
    /// the clips the relay had not confirmed.
    Reconnected {
        /// The relay's new welcome.
        welcome: Welcome,
        /// How many attempts it took.
        attempts: u32,
    },
}

/// The events of a client; see [`Event`].
#[derive(Debug)]
pub struct Events {
    rx: mpsc::Receiver<Event>,
}

impl Events {
    pub(crate) fn new(rx: mpsc::Receiver<Event>) -> Events {
        Events { rx }
    }

    /// The next event, or `None` once the client is closed and every event
    /// was taken.
    pub async fn next(&mut self) -> Option<Event> {
        self.rx.recv().await
    }

    /// The next event if one is waiting.
    pub fn try_next(&mut self) -> Option<Event> {
        self.rx.try_recv().ok()
    }

    /// The underlying channel, for `select!` loops and stream adapters.
    pub fn into_inner(self) -> mpsc::Receiver<Event> {
        self.rx
    }
}

/// Takes a client's events as they happen, in place of [`Events`]
/// ([`ClientConfig::event_sink`](crate::ClientConfig::event_sink)).
///
/// [`event`](Self::event) is called on the client's own tasks, in the order
/// the events would have been queued, one call at a time per clip; the
/// media path's frames on the task that reads the media socket, which a
/// [`MediaSocket`](crate::MediaSocket) shares among many clients. So it
/// must return quickly and never block: the client does not wait for it,
/// nothing pushes back on the relay, and a slow sink slows every client
/// it shares a task with. For a load generator or a gateway that handles
/// thousands of clients' frames where they arrive, without a task wake per
/// frame; an application that plays audio reads [`Events`].
pub trait EventSink: std::fmt::Debug + Send + Sync {
    /// One event.
    fn event(&self, event: Event);
}

/// Where a client's events go: the application's channel, or its sink.
#[derive(Debug, Clone)]
pub(crate) enum EventTx {
    Channel(mpsc::Sender<Event>),
    Sink(Arc<dyn EventSink>),
}

impl EventTx {
    /// Sends an event, waiting for room in the channel; an application
    /// that dropped its [`Events`] loses it.
    pub async fn send(&self, event: Event) {
        match self {
            EventTx::Channel(tx) => {
                let _ = tx.send(event).await;
            }
            EventTx::Sink(sink) => sink.event(event),
        }
    }

    /// Sends an event if there is room at once (a sink always has room).
    /// The error hands the event back, as tokio's `try_send` does.
    #[allow(clippy::result_large_err)]
    pub fn try_send(&self, event: Event) -> Result<(), mpsc::error::TrySendError<Event>> {
        match self {
            EventTx::Channel(tx) => tx.try_send(event),
            EventTx::Sink(sink) => {
                sink.event(event);
                Ok(())
            }
        }
    }

    /// Room for up to two events at once, reserved, or why not: `Full`
    /// while the application is behind, `Closed` once it dropped its
    /// [`Events`].
    pub fn try_reserve_two(&self) -> Result<Reserved<'_>, mpsc::error::TrySendError<()>> {
        match self {
            EventTx::Channel(tx) => {
                let wanted = tx.max_capacity().min(2);
                tx.try_reserve_many(wanted).map(Reserved::Permits)
            }
            EventTx::Sink(sink) => Ok(Reserved::Sink(sink.as_ref())),
        }
    }
}

/// Room for events, from [`EventTx::try_reserve_two`].
pub(crate) enum Reserved<'a> {
    Permits(mpsc::PermitIterator<'a, Event>),
    Sink(&'a dyn EventSink),
}

impl Reserved<'_> {
    /// Sends `event` if a reserved slot is left; whether it went.
    pub fn send(&mut self, event: impl FnOnce() -> Event) -> bool {
        match self {
            Reserved::Permits(permits) => match permits.next() {
                Some(permit) => {
                    permit.send(event());
                    true
                }
                None => false,
            },
            Reserved::Sink(sink) => {
                sink.event(event());
                true
            }
        }
    }
}
