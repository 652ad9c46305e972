//! One task per connection: the handshake and hello, the control stream,
//! the clips going in and out, and the close.
//!
//! The task owns the control stream and selects over: control messages
//! (each handled in the `cmd` module named for it), new clip uploads
//! (each an [`ingest`](crate::ingest::run) task), commands from the hub
//! (messages to send, clips to deliver, groups left), the results of its
//! delivery tasks and cursor writes, and the relay's shutdown signal.
//! Everything it spawns lives in its `JoinSet`s and ends with it; a
//! delivery stopped before its clip was written whole resets its stream
//! with a code (`ShuttingDown` when the relay stops), never a bare FIN.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use ptt_protocol::{
    ControlMessage, ErrorCode, FramedReader, PROTOCOL_VERSION, SessionState, Welcome,
    message::MAX_PAYLOAD_LEN,
};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::auth::Claims;
use crate::command::{SessionCommand, SessionHandle};
use crate::context::RelayContext;
use crate::delivery::{Delivery, Sink};
use crate::ingest::{self, Uploader};
use crate::live::LiveClip;
use crate::subscription::Subscription;
use crate::transport::{self, Connection, RecvStream, SendStream};

mod cmd;
mod deliver;

/// Largest frame read before the hello: a hello is a token (2,048 bytes at
/// most), a client name (1,024) and a few bytes more, and nothing larger
/// is buffered for a client that has not authenticated.
pub const MAX_HELLO_FRAME: usize = 4096;

/// Runs a connection from handshake to close.
///
/// The task lives as long as the connection (hours for an idle phone), so
/// its future is kept small: the handshake, the hello and the close are
/// short and their futures large, so each runs boxed, and the main loop
/// boxes its handlers. An idle session then holds only the main loop's
/// select.
pub fn run(
    incoming: quinn::Incoming,
    ctx: Arc<RelayContext>,
    id: u64,
) -> impl Future<Output = ()> + Send {
    let addr = incoming.remote_address();
    let span = tracing::info_span!("session", id, %addr, user = tracing::field::Empty);
    // Boxed before the task captures it: `quinn::Incoming` is large, and a
    // captured value stays in the task for its whole life.
    let connect = Box::pin(connect(incoming, ctx, id));
    async move {
        let metrics = crate::metrics::Metrics::get();
        metrics.connections.increment(1.0);
        let _alive = scopeguard(|| metrics.connections.decrement(1.0));
        let Some(mut session) = connect.await else {
            return;
        };
        tracing::Span::current().record("user", &*session.handle.user);
        tracing::info!("connected");
        let (code_, reason) = session.serve().await;
        Box::pin(session.close(code_, reason)).await;
    }
    .instrument(span)
}

/// Completes the handshake and authenticates; `None` when the connection
/// failed or was refused (and is closed).
async fn connect(incoming: quinn::Incoming, ctx: Arc<RelayContext>, id: u64) -> Option<Session> {
    let conn = match incoming.await {
        Ok(conn) => conn,
        Err(e) => {
            tracing::debug!(error = %e, "handshake failed");
            return None;
        }
    };
    // A browser's WebTransport handshake (HTTP/3 SETTINGS and CONNECT)
    // comes first, within the hello's deadline; then it is a session like
    // any other.
    let web = transport::accept(conn.clone(), ctx.config.max_streams_per_connection);
    let conn = match tokio::time::timeout(ctx.config.auth_timeout, web).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "WebTransport handshake failed");
            conn.close(
                ErrorCode::Protocol.code().into(),
                b"WebTransport handshake failed",
            );
            return None;
        }
        Err(_) => {
            conn.close(
                ErrorCode::AuthTimeout.code().into(),
                b"no WebTransport CONNECT in time",
            );
            return None;
        }
    };
    match Session::authenticate(conn.clone(), ctx, id).await {
        Ok(session) => Some(session),
        Err(refusal) => {
            refusal.close(&conn).await;
            None
        }
    }
}

/// Why a connection was refused before its session started.
struct Refusal {
    code: ErrorCode,
    message: String,
    /// The control stream, if the client opened one: the refusal is sent
    /// on it as `Error{0, code}` before the connection closes.
    control: Option<SendStream>,
}

impl Refusal {
    fn new(code: ErrorCode, message: impl Into<String>, control: Option<SendStream>) -> Refusal {
        Refusal {
            code,
            message: message.into(),
            control,
        }
    }

    async fn close(self, conn: &Connection) {
        if self.code == ErrorCode::None {
            tracing::debug!(message = %self.message, "gone");
            conn.close(ErrorCode::None.code(), b"");
            return;
        }
        tracing::info!(code = %self.code, message = %self.message, "refused");
        if self.code != ErrorCode::ShuttingDown {
            crate::metrics::auth_failure(self.code);
        }
        if let Some(mut send) = self.control {
            write_then_close(&mut send, self.code, &self.message).await;
        }
        conn.close(self.code.code(), self.message.as_bytes());
    }
}

/// What a session task's helpers report back.
enum TaskDone {
    /// A clip was delivered (or not) in `group`.
    Clip {
        group: Arc<str>,
        clip: Option<Arc<LiveClip>>,
        result: Delivery,
    },
    /// A catch-up reached its end; `deleted` are the seqs it found
    /// missing between stored clips (deleted by an administrator).
    CaughtUp {
        group: Arc<str>,
        seq: u64,
        deleted: Vec<u64>,
    },
    /// A fetch sent `count` clips.
    Fetched {
        request_id: u64,
        group: Arc<str>,
        count: u32,
    },
    /// A Played for an older clip was looked up (and its receipt sent).
    LookedUp,
    /// A cursor write of `group` to `cursor` finished.
    CursorWritten(Arc<str>, Option<u64>),
}

/// A joined group on this connection.
struct Joined {
    sub: Subscription,
    /// This group's delivery tasks still running, to abort them when the
    /// member is removed (pruned as they finish; empty while idle).
    tasks: Vec<tokio::task::AbortHandle>,
    /// Where its deliveries record what they delivered, and the code their
    /// streams are reset with if stopped.
    sink: Sink,
    /// A cursor write for this group is in flight.
    writing: bool,
}

/// Most store look-ups for Played receipts in flight per session; more
/// Played messages for old clips are dropped meanwhile (the receipt is a
/// courtesy, and the rate limit already bounds them).
const MAX_LOOKUPS: usize = 16;

pub(crate) struct Session {
    conn: Connection,
    ctx: Arc<RelayContext>,
    control_send: SendStream,
    control_recv: FramedReader<RecvStream>,
    handle: SessionHandle,
    claims: Claims,
    state: Arc<Mutex<SessionState>>,
    commands: mpsc::Receiver<SessionCommand>,
    /// Boxed: a map of one or two groups still allocates four buckets, and
    /// an idle connection should pay for one `Joined`, not four.
    joined: HashMap<Arc<str>, Box<Joined>>,
    /// Deliveries, catch-ups, fetches, look-ups and cursor writes (at most
    /// one per joined group).
    deliveries: JoinSet<TaskDone>,
    /// Uploads.
    uploads: JoinSet<()>,
    /// Cursor writes in flight.
    writes: usize,
    lookups: usize,
    /// Fetches in flight.
    fetches: usize,
    /// What the member reports reading of its live streams (made with
    /// the first live delivery or report: idle sessions have none).
    live_reads: Option<crate::delivery::LiveReads>,
    /// The connection's UDP media path, once opened (`MediaOpen`).
    media: Option<Arc<crate::media::MediaPeer>>,
}

impl Session {
    /// Waits for the hello (before the deadline, with nothing else first)
    /// and checks its token.
    async fn authenticate(
        conn: Connection,
        ctx: Arc<RelayContext>,
        id: u64,
    ) -> Result<Session, Refusal> {
        let now = Instant::now();
        let mut state = SessionState::new(ctx.session_limits(), now);
        let deadline = state.poll_timeout().expect("a new session has a deadline");
        let first = tokio::select! {
            _ = tokio::time::sleep_until(deadline.into()) => {
                let _ = state.handle_timeout(Instant::now());
                return Err(Refusal::new(ErrorCode::AuthTimeout, "no hello in time", None));
            }
            _ = ctx.shutdown.cancelled() => {
                return Err(Refusal::new(ErrorCode::ShuttingDown, "relay shutting down", None));
            }
            uni = conn.accept_uni() => {
                return Err(match uni {
                    Ok(_) => Refusal::new(ErrorCode::Protocol, "clip stream before hello", None),
                    Err(e) => Refusal::new(ErrorCode::None, format!("connection lost before hello: {e}"), None),
                });
            }
            bi = conn.accept_bi() => bi,
        };
        let (mut send, recv) = first.map_err(|e| {
            Refusal::new(
                ErrorCode::None,
                format!("connection lost before hello: {e}"),
                None,
            )
        })?;
        let mut control = FramedReader::new(RecvStream::from(recv), MAX_HELLO_FRAME);
        let hello = tokio::time::timeout_at(deadline.into(), control.next_control()).await;
        let (version, token) = match hello {
            Err(_) => {
                return Err(Refusal::new(
                    ErrorCode::AuthTimeout,
                    "no hello in time",
                    Some(send),
                ));
            }
            Ok(Ok(Some(ControlMessage::Hello { version, token, .. }))) => (version, token),
            Ok(Ok(_)) => {
                return Err(Refusal::new(
                    ErrorCode::Protocol,
                    "the first message must be hello",
                    Some(send),
                ));
            }
            Ok(Err(e)) => {
                return Err(match e.code() {
                    // An invalid field in a request before the hello is
                    // still a message out of place.
                    Some(ErrorCode::InvalidRequest) => Refusal::new(
                        ErrorCode::Protocol,
                        "the first message must be hello",
                        Some(send),
                    ),
                    Some(c) => Refusal::new(c, e.to_string(), Some(send)),
                    None => Refusal::new(ErrorCode::None, e.to_string(), None),
                });
            }
        };
        if version != PROTOCOL_VERSION {
            let msg = format!(
                "protocol version {version} is not supported (this relay speaks {PROTOCOL_VERSION})"
            );
            return Err(Refusal::new(ErrorCode::UnsupportedVersion, msg, Some(send)));
        }
        let claims = match ctx.verifier.verify(&token, SystemTime::now()) {
            Ok(claims) => claims,
            Err(e) => return Err(Refusal::new(e.code(), e.to_string(), Some(send))),
        };
        if let Err(code_) = state.handle_authenticated(claims.sub.clone(), Instant::now()) {
            return Err(Refusal::new(code_, "no hello in time", Some(send)));
        }
        control.set_max_payload(MAX_PAYLOAD_LEN);
        let welcome = ControlMessage::Welcome(Welcome {
            version: PROTOCOL_VERSION,
            user: claims.sub.clone(),
            server_time_ms: crate::auth::unix_millis(SystemTime::now()),
            limits: ctx.limits.clone(),
        });
        if send.write_all(&welcome.to_bytes()).await.is_err() {
            return Err(Refusal::new(ErrorCode::None, "control stream closed", None));
        }
        let (handle, commands) = SessionHandle::new(id, claims.sub.as_str().into());
        ctx.hub.register(handle.clone());
        Ok(Session {
            conn,
            control_send: send,
            control_recv: control,
            handle,
            claims,
            state: Arc::new(Mutex::new(state)),
            commands,
            joined: HashMap::new(),
            deliveries: JoinSet::new(),
            uploads: JoinSet::new(),
            writes: 0,
            lookups: 0,
            fetches: 0,
            live_reads: None,
            media: None,
            ctx,
        })
    }

    /// The main loop; returns the code and reason to close with.
    ///
    /// Handlers run boxed: inline, the largest of them would set the size
    /// of every session's future, idle or not.
    async fn serve(&mut self) -> (ErrorCode, String) {
        let mut drain_deadline: Option<tokio::time::Instant> = None;
        loop {
            tokio::select! {
                biased;
                _ = self.handle.overflowed() => {
                    crate::metrics::Metrics::get().overflow_closed.increment(1);
                    return (ErrorCode::SlowReceiver, "the session could not keep up with its events".into());
                }
                _ = self.ctx.shutdown.cancelled(), if drain_deadline.is_none() => {
                    // Stop taking new uploads; let those in flight finish.
                    drain_deadline = Some(tokio::time::Instant::now() + self.ctx.config.shutdown_grace);
                    Box::pin(self.send_go_away()).await;
                    if self.uploads.is_empty() {
                        return shutting_down();
                    }
                }
                _ = sleep_until_opt(drain_deadline) => return shutting_down(),
                message = self.control_recv.next_control() => match message {
                    Ok(Some(message)) => {
                        if let Err((code_, reason)) = Box::pin(self.handle_control(message)).await {
                            return (code_, reason);
                        }
                    }
                    Ok(None) => return (ErrorCode::None, "control stream closed".into()),
                    Err(e) => match (e.request_id(), e.code()) {
                        (Some(request_id), Some(code_)) => {
                            Box::pin(self.send(ControlMessage::Error { request_id, code: code_, message: e.to_string() })).await;
                        }
                        (_, Some(code_)) => return (code_, e.to_string()),
                        (_, None) => return (ErrorCode::None, format!("control stream failed: {e}")),
                    },
                },
                stream = self.conn.accept_uni(), if drain_deadline.is_none() => match stream {
                    Ok(recv) => self.start_upload(recv.into()),
                    Err(_) => return (ErrorCode::None, "connection closed".into()),
                },
                Some(command) = self.commands.recv() => Box::pin(self.handle_command(command)).await,
                Ok(datagram) = self.conn.read_datagram() => {
                    self.live_reads.get_or_insert_default().receive(datagram);
                }
                Some(done) = self.deliveries.join_next() => {
                    if let Ok(done) = done {
                        Box::pin(self.handle_done(done)).await;
                    }
                }
                Some(_) = self.uploads.join_next() => {
                    if drain_deadline.is_some() && self.uploads.is_empty() {
                        return shutting_down();
                    }
                }
                reason = self.conn.closed() => {
                    tracing::debug!(%reason, "connection lost");
                    return (ErrorCode::None, "connection lost".into());
                }
            }
        }
    }

    /// Leaves every group, stops every task, tells the client why (when
    /// there is a reason) and closes the connection with `code_`.
    async fn close(mut self, code_: ErrorCode, reason: String) {
        // Deliveries stop first (their streams reset with ShuttingDown),
        // before the connection goes.
        for joined in self.joined.values() {
            joined.sink.set_drop_code(ErrorCode::ShuttingDown);
        }
        let groups: Vec<Arc<str>> = self.joined.keys().cloned().collect();
        self.ctx
            .hub
            .unregister(self.handle.id, &self.handle.user, &groups);
        self.ctx.floor.release_all(self.handle.id).await;
        self.close_media();
        self.uploads.abort_all();
        self.deliveries.abort_all();
        while self.uploads.join_next().await.is_some() {}
        while self.deliveries.join_next().await.is_some() {}
        // The member's progress: each cursor that moved beyond what a
        // finished write stored is written now (cursors only move forward,
        // so a write that was cut short does no harm).
        for group in &groups {
            self.sync_delivered(group);
            let Some(cursor) = self.joined.get(group).and_then(|j| j.sub.unconfirmed()) else {
                continue;
            };
            if let Err(e) = self
                .ctx
                .store
                .advance_cursor(group, &self.handle.user, cursor)
                .await
            {
                tracing::warn!(error = %e, %group, "cursor update failed");
            }
        }
        if code_ == ErrorCode::ShuttingDown {
            // Let the last messages (`Stored` for clips that finished
            // during the drain) reach the client before the close frame.
            self.flush_queued().await;
        }
        if code_ != ErrorCode::None {
            write_then_close(&mut self.control_send, code_, &reason).await;
        }
        self.conn.close(code_.code(), reason.as_bytes());
        tracing::info!(code = %code_, "closed");
    }

    /// Tells the client the relay is draining: where and when to
    /// reconnect. A client that does not read its control stream cannot
    /// hold the drain up: the write gives up after a second.
    async fn send_go_away(&mut self) {
        let config = &self.ctx.config;
        let go_away = ControlMessage::GoAway {
            reconnect_after_ms: config
                .goaway_reconnect_after
                .as_millis()
                .min(u128::from(u32::MAX)) as u32,
            address: config.goaway_address.clone().unwrap_or_default(),
        };
        if tokio::time::timeout(Duration::from_secs(1), self.send(go_away))
            .await
            .is_err()
        {
            tracing::debug!("GoAway not written: the client does not read");
        }
    }

    /// Sends the control messages still queued for this session.
    async fn flush_queued(&mut self) {
        while let Ok(command) = self.commands.try_recv() {
            match command {
                SessionCommand::Send(message) => self.send(*message).await,
                SessionCommand::Receipts => self.send_receipts().await,
                _ => {}
            }
        }
    }

    fn start_upload(&mut self, recv: RecvStream) {
        let uploader = Uploader {
            handle: self.handle.clone(),
            emergency: self.claims.emg,
            state: self.state.clone(),
            conn: self.conn.clone(),
            charged: !self.claims.adm,
            media: self.media.clone(),
        };
        let ctx = self.ctx.clone();
        // The session's span (its parent) names the user; the group and
        // clip id are recorded once the header is read.
        let span = tracing::info_span!(
            "clip",
            group = tracing::field::Empty,
            clip = tracing::field::Empty
        );
        self.uploads
            .spawn(ingest::run(recv, ctx, uploader).instrument(span));
    }

    /// Writes a control message. A client that does not read its control
    /// stream blocks the write; meanwhile its queue fills, and the
    /// overflow ends the wait (the session then closes with
    /// `SlowReceiver`).
    async fn send(&mut self, message: ControlMessage) {
        self.write(&message.to_bytes()).await;
    }

    /// Writes every receipt waiting in the session's backlog, in one write.
    async fn send_receipts(&mut self) {
        let receipts = self.handle.take_receipts();
        if !receipts.is_empty() {
            self.write(&receipts).await;
        }
    }

    /// Writes encoded control messages (see [`Session::send`]).
    async fn write(&mut self, bytes: &[u8]) {
        tokio::select! {
            written = self.control_send.write_all(bytes) => {
                if let Err(e) = written {
                    tracing::debug!(error = %e, "control write failed");
                }
            }
            _ = self.handle.overflowed() => {}
        }
    }

    async fn reply_result(&mut self, request_id: u64, result: Result<ControlMessage, ErrorCode>) {
        let message = result.unwrap_or_else(|code_| ControlMessage::Error {
            request_id,
            code: code_,
            message: code_.to_string(),
        });
        self.send(message).await;
    }

    async fn handle_command(&mut self, command: SessionCommand) {
        match command {
            SessionCommand::Send(message) => {
                // The talker's own clip is not sent back to it: storing it
                // is its delivery and its acknowledgement.
                if let ControlMessage::Stored {
                    group,
                    seq,
                    clip_id,
                } = &*message
                    && let Some(joined) = self.joined.get_mut(group.as_str())
                {
                    joined.sub.stored_own(*seq, *clip_id);
                    let group: Arc<str> = group.as_str().into();
                    self.write_cursor(&group);
                }
                // A deleted clip counts as received: the cursor moves on.
                if let ControlMessage::ClipDeleted { group, seq, .. } = &*message
                    && let Some(joined) = self.joined.get_mut(group.as_str())
                {
                    joined.sub.deleted(*seq);
                    let group: Arc<str> = group.as_str().into();
                    self.write_cursor(&group);
                }
                self.send(*message).await;
            }
            SessionCommand::Receipts => self.send_receipts().await,
            SessionCommand::Deliver(clip) => {
                if self.joined.contains_key(clip.meta.group.as_str()) {
                    self.spawn_live(clip);
                }
            }
            SessionCommand::Left { group, code: code_ } => {
                self.sync_delivered(&group);
                self.final_cursor_write(&group);
                if let Some(joined) = self.joined.remove(&group) {
                    joined.sink.set_drop_code(code_);
                    for task in joined.tasks {
                        task.abort();
                    }
                    self.send(ControlMessage::GroupLeft {
                        group: group.to_string(),
                        code: code_,
                    })
                    .await;
                }
            }
            SessionCommand::Mute { group, muted } => {
                if let Some(joined) = self.joined.get(&group) {
                    joined
                        .sink
                        .set_header_flag(ptt_protocol::ClipHeader::FLAG_MUTED, muted);
                }
            }
        }
    }

    async fn handle_done(&mut self, done: TaskDone) {
        let group = match &done {
            TaskDone::Clip { group, .. } | TaskDone::CaughtUp { group, .. } => Some(group.clone()),
            _ => None,
        };
        if let Some(joined) = group.and_then(|g| self.joined.get_mut(&g)) {
            joined.tasks.retain(|task| !task.is_finished());
        }
        match done {
            TaskDone::Clip {
                group,
                clip,
                result,
            } => match result {
                // The delivery recorded itself in the group's sink before
                // it wrote the clip's end.
                Delivery::Complete => self.sync_delivered(&group),
                Delivery::Cut => {
                    crate::metrics::Metrics::get().live_cuts.increment(1);
                    tracing::debug!(%group, "live stream cut; recovering from the store");
                    if let Some(clip) = clip {
                        self.spawn_recovery(group, clip);
                    }
                }
                Delivery::Aborted | Delivery::Failed => {}
            },
            TaskDone::CaughtUp {
                group,
                seq,
                deleted,
            } => {
                if let Some(joined) = self.joined.get_mut(&group)
                    && !deleted.is_empty()
                {
                    for seq in deleted {
                        joined.sub.deleted(seq);
                    }
                    self.write_cursor(&group);
                }
                if self.joined.contains_key(&group) {
                    self.send(ControlMessage::CaughtUp {
                        group: group.to_string(),
                        seq,
                    })
                    .await;
                }
            }
            TaskDone::Fetched {
                request_id,
                group,
                count,
            } => {
                self.fetches -= 1;
                self.send(ControlMessage::FetchDone {
                    request_id,
                    group: group.to_string(),
                    count,
                })
                .await;
            }
            TaskDone::LookedUp => self.lookups -= 1,
            TaskDone::CursorWritten(group, stored) => {
                self.writes -= 1;
                if let (Some(joined), Some(cursor)) = (self.joined.get_mut(&group), stored) {
                    joined.sub.confirm(cursor);
                }
                self.cursor_written(&group);
            }
        }
    }
}

/// Runs `f` when dropped (the connection gauge goes down however the
/// task ends).
fn scopeguard(f: impl FnOnce()) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}

fn shutting_down() -> (ErrorCode, String) {
    (ErrorCode::ShuttingDown, "relay shutting down".into())
}

async fn sleep_until_opt(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Sends `Error{0, code}` on the control stream and finishes it, giving
/// the error a moment to leave before the connection closes (the close
/// frame would otherwise discard it); the close code says the same for
/// clients that miss it.
async fn write_then_close(send: &mut SendStream, code_: ErrorCode, message: &str) {
    let error = ControlMessage::Error {
        request_id: 0,
        code: code_,
        message: message.to_owned(),
    };
    let written = tokio::time::timeout(Duration::from_millis(500), async {
        send.write_all(&error.to_bytes()).await.is_ok()
    })
    .await
    .unwrap_or(false);
    let _ = send.finish();
    if written {
        let _ = tokio::time::timeout(Duration::from_millis(100), send.stopped()).await;
    }
}
