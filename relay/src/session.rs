//! One task per connection: authentication, the control stream, and the
//! clips going in and out.
//!
//! The task owns the control stream and selects over: control messages,
//! new clip uploads (each handed to its own [`ingest`] task), commands from
//! the hub (messages to send, clips to deliver), the results of its delivery
//! tasks, and the relay's shutdown signal. Everything it spawns lives in
//! its `JoinSet`s and ends with it.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use ptt_protocol::{
    ClipId, ControlMessage, ErrorCode, FrameDecoder, GroupSummary, PROTOCOL_VERSION, ReceiptKind,
    SessionState, Welcome, message::MAX_PAYLOAD_LEN,
};
use quinn::{Connection, RecvStream, SendStream};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::auth::Claims;
use crate::delivery::{self, Delivery, code};
use crate::fanout::{SessionCommand, SessionHandle};
use crate::ingest::{self, Uploader};
use crate::live::{ClipState, LiveClip};
use crate::server::RelayContext;

/// Capacity of a session's command queue (hub → session).
const COMMAND_QUEUE: usize = 512;
/// Most clips a catch-up or fetch reads from the store at once.
const CATCH_UP_BATCH: usize = 16;
/// Most clips one fetch may ask for.
const MAX_FETCH: u32 = 100;
/// Most delivered-but-unacknowledged clips remembered per group for
/// receipts.
const MAX_UNACKED: usize = 4096;

/// Runs a connection from handshake to close.
///
/// The task lives as long as the connection (hours for an idle phone), so
/// its future is kept small: the handshake, the hello and the close are
/// short and their futures large, so each runs boxed, and the main loop
/// boxes its handlers (see `Session::serve`). An idle session then holds
/// only the main loop's select.
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
    match Session::authenticate(conn, ctx, id).await {
        Ok(session) => Some(session),
        Err((conn, ErrorCode::None, message)) => {
            tracing::debug!(%message, "gone");
            conn.close(code(ErrorCode::None), b"");
            None
        }
        Err((conn, code_, message)) => {
            tracing::info!(code = %code_, %message, "refused");
            conn.close(code(code_), message.as_bytes());
            None
        }
    }
}

/// What a delivery task reports back.
enum TaskDone {
    /// A clip was delivered (or not) in `group`.
    Clip {
        group: Arc<str>,
        clip: Option<Arc<LiveClip>>,
        result: Delivery,
    },
    /// A catch-up reached its end.
    CaughtUp { group: Arc<str>, seq: u64 },
    /// A fetch sent `count` clips.
    Fetched {
        request_id: u64,
        group: Arc<str>,
        count: u32,
    },
}

/// What the session knows about a joined group.
#[derive(Debug, Default)]
struct Joined {
    /// The durable cursor as far as this session moved it.
    cursor: u64,
    /// Acknowledged sequence numbers above the cursor.
    acked: BTreeSet<u64>,
    /// Clips delivered whole on this connection.
    delivered: HashSet<u64>,
    /// Delivered clips not yet acknowledged: who to send the receipt to,
    /// so that an ack needs no store read.
    unacked: HashMap<u64, (ClipId, String)>,
}

struct Session {
    conn: Connection,
    ctx: Arc<RelayContext>,
    control_send: SendStream,
    control_recv: ControlReader,
    handle: SessionHandle,
    claims: Claims,
    state: Arc<Mutex<SessionState>>,
    commands: mpsc::Receiver<SessionCommand>,
    joined: HashMap<Arc<str>, Joined>,
    deliveries: JoinSet<TaskDone>,
    uploads: JoinSet<()>,
}

type Refused = (Connection, ErrorCode, String);

impl Session {
    /// Waits for the hello (before the deadline, with nothing else first)
    /// and checks its token.
    async fn authenticate(
        conn: Connection,
        ctx: Arc<RelayContext>,
        id: u64,
    ) -> Result<Session, Refused> {
        let now = Instant::now();
        let mut state = SessionState::new(ctx.session_limits(), now);
        let deadline = state.poll_timeout().expect("a new session has a deadline");
        let first = tokio::select! {
            _ = tokio::time::sleep_until(deadline.into()) => {
                let _ = state.handle_timeout(Instant::now());
                return Err((conn, ErrorCode::AuthTimeout, "no hello in time".into()));
            }
            uni = conn.accept_uni() => {
                return Err(match uni {
                    Ok(_) => (conn, ErrorCode::Protocol, "clip stream before hello".into()),
                    Err(e) => (conn, ErrorCode::None, format!("connection lost before hello: {e}")),
                });
            }
            bi = conn.accept_bi() => bi,
        };
        let (mut send, recv) = match first {
            Ok(streams) => streams,
            Err(e) => {
                return Err((
                    conn,
                    ErrorCode::None,
                    format!("connection lost before hello: {e}"),
                ));
            }
        };
        let mut control = ControlReader::new(recv);
        let hello = tokio::time::timeout_at(deadline.into(), control.next()).await;
        let (version, token) = match hello {
            Err(_) => return Err((conn, ErrorCode::AuthTimeout, "no hello in time".into())),
            Ok(Ok(Some(ControlMessage::Hello { version, token, .. }))) => (version, token),
            Ok(Ok(_)) => {
                return Err((
                    conn,
                    ErrorCode::Protocol,
                    "the first message must be hello".into(),
                ));
            }
            Ok(Err((code_, msg))) => return Err((conn, code_, msg)),
        };
        if version != PROTOCOL_VERSION {
            let msg = format!(
                "protocol version {version} is not supported (this relay speaks {PROTOCOL_VERSION})"
            );
            write_then_close(&mut send, ErrorCode::UnsupportedVersion, &msg).await;
            return Err((conn, ErrorCode::UnsupportedVersion, msg));
        }
        let claims = match ctx.verifier.verify(&token, SystemTime::now()) {
            Ok(claims) => claims,
            Err(e) => {
                let msg = e.to_string();
                write_then_close(&mut send, e.code(), &msg).await;
                return Err((conn, e.code(), msg));
            }
        };
        if let Err(code_) = state.handle_authenticated(claims.sub.clone(), Instant::now()) {
            return Err((conn, code_, "no hello in time".into()));
        }
        let welcome = ControlMessage::Welcome(Welcome {
            version: PROTOCOL_VERSION,
            user: claims.sub.clone(),
            server_time_ms: crate::auth::unix_millis(SystemTime::now()),
            limits: ctx.limits.clone(),
        });
        if send.write_all(&welcome.to_bytes()).await.is_err() {
            return Err((conn, ErrorCode::Protocol, "control stream closed".into()));
        }
        let (tx, commands) = mpsc::channel(COMMAND_QUEUE);
        let handle = SessionHandle {
            id,
            user: claims.sub.as_str().into(),
            tx,
        };
        ctx.hub.register(handle.clone());
        Ok(Session {
            conn,
            ctx,
            control_send: send,
            control_recv: control,
            handle,
            claims,
            state: Arc::new(Mutex::new(state)),
            commands,
            joined: HashMap::new(),
            deliveries: JoinSet::new(),
            uploads: JoinSet::new(),
        })
    }

    /// The main loop; returns the code and reason to close with.
    ///
    /// Handlers run boxed: inline, the largest of them would set the size
    /// of every session's future, idle or not (boxing them and the phases
    /// in [`run`] took the task from 2,952 to 1,184 bytes, and the relay
    /// from 35.9 to 34.3 KiB per idle client).
    async fn serve(&mut self) -> (ErrorCode, String) {
        let mut drain_deadline: Option<tokio::time::Instant> = None;
        loop {
            tokio::select! {
                _ = self.ctx.shutdown.cancelled(), if drain_deadline.is_none() => {
                    // Stop taking new uploads; let those in flight finish.
                    drain_deadline = Some(tokio::time::Instant::now() + self.ctx.config.shutdown_grace);
                    if self.uploads.is_empty() {
                        return (ErrorCode::ShuttingDown, "relay shutting down".into());
                    }
                }
                _ = sleep_until_opt(drain_deadline) => {
                    return (ErrorCode::ShuttingDown, "relay shutting down".into());
                }
                message = self.control_recv.next() => match message {
                    Ok(Some(message)) => {
                        if let Err((code_, reason)) = Box::pin(self.handle_control(message)).await {
                            Box::pin(self.send(ControlMessage::Error { request_id: 0, code: code_, message: reason.clone() })).await;
                            return (code_, reason);
                        }
                    }
                    Ok(None) => return (ErrorCode::None, "control stream closed".into()),
                    Err((code_, reason)) => {
                        Box::pin(self.send(ControlMessage::Error { request_id: 0, code: code_, message: reason.clone() })).await;
                        return (code_, reason);
                    }
                },
                stream = self.conn.accept_uni(), if drain_deadline.is_none() => match stream {
                    Ok(recv) => self.start_upload(recv),
                    Err(_) => return (ErrorCode::None, "connection closed".into()),
                },
                Some(command) = self.commands.recv() => Box::pin(self.handle_command(command)).await,
                Some(done) = self.deliveries.join_next() => {
                    if let Ok(done) = done {
                        Box::pin(self.handle_done(done)).await;
                    }
                }
                Some(_) = self.uploads.join_next() => {
                    if drain_deadline.is_some() && self.uploads.is_empty() {
                        return (ErrorCode::ShuttingDown, "relay shutting down".into());
                    }
                }
                reason = self.conn.closed() => {
                    tracing::debug!(%reason, "connection lost");
                    return (ErrorCode::None, "connection lost".into());
                }
            }
        }
    }

    /// Leaves every group and closes the connection with `code_`.
    async fn close(mut self, code_: ErrorCode, reason: String) {
        self.cleanup();
        if code_ == ErrorCode::ShuttingDown {
            // Let the last messages (`Stored` for clips that finished
            // during the drain) reach the client before the close frame.
            self.flush_queued().await;
            let _ = self.control_send.finish();
            let _ = tokio::time::timeout(Duration::from_secs(1), self.control_send.stopped()).await;
        }
        self.conn.close(code(code_), reason.as_bytes());
        tracing::info!(code = %code_, "closed");
    }

    /// Sends the control messages still queued for this session.
    async fn flush_queued(&mut self) {
        while let Ok(command) = self.commands.try_recv() {
            if let SessionCommand::Send(message) = command {
                self.send(*message).await;
            }
        }
    }

    fn cleanup(&mut self) {
        let groups: Vec<Arc<str>> = self.joined.keys().cloned().collect();
        self.ctx.hub.unregister(self.handle.id, &groups);
        self.deliveries.abort_all();
        self.uploads.abort_all();
    }

    fn start_upload(&mut self, recv: RecvStream) {
        let uploader = Uploader {
            handle: self.handle.clone(),
            emergency: self.claims.emg,
            state: self.state.clone(),
        };
        let ctx = self.ctx.clone();
        let span = tracing::debug_span!("clip");
        self.uploads
            .spawn(ingest::run(recv, ctx, uploader).instrument(span));
    }

    async fn send(&mut self, message: ControlMessage) {
        if let Err(e) = self.control_send.write_all(&message.to_bytes()).await {
            tracing::debug!(error = %e, "control write failed");
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

    /// Handles a control message; `Err` closes the connection.
    async fn handle_control(&mut self, message: ControlMessage) -> Result<(), (ErrorCode, String)> {
        use ControlMessage as M;
        match message {
            M::Join { request_id, group } => self.join(request_id, group).await,
            M::Leave { request_id, group } => {
                self.ctx.hub.leave(&group, self.handle.id);
                self.ctx.hub.release_floor(&group, self.handle.id);
                self.joined.remove(group.as_str());
                self.send(M::Ok { request_id }).await;
            }
            M::FloorRequest {
                request_id,
                group,
                emergency,
            } => {
                let result = if emergency && !self.claims.emg {
                    Err(ErrorCode::Forbidden)
                } else {
                    self.ctx
                        .hub
                        .request_floor(&group, &self.handle, emergency, request_id)
                        .await
                };
                if let Ok(M::FloorGranted { .. }) = &result {
                    self.arm_floor_timer(&group);
                }
                self.reply_result(request_id, result).await;
            }
            M::FloorRelease { group } => {
                self.ctx.hub.release_floor(&group, self.handle.id);
            }
            M::DeliveryAck { group, seq } => self.ack(group, seq),
            M::Played { group, seq } => self.receipt(group, seq, ReceiptKind::Played),
            M::FetchRecent {
                request_id,
                group,
                count,
            } => self.fetch(request_id, group, count).await,
            M::CreateGroup { .. }
            | M::AddMember { .. }
            | M::RemoveMember { .. }
            | M::SetMode { .. } => self.admin(message).await,
            M::ListGroups { request_id } => {
                let result = self.list_groups(request_id).await;
                self.reply_result(request_id, result).await;
            }
            M::ListMembers { request_id, group } => {
                let result = self.list_members(request_id, group).await;
                self.reply_result(request_id, result).await;
            }
            M::Hello { .. } => return Err((ErrorCode::Protocol, "a second hello".into())),
            M::Unknown { kind } => tracing::debug!(kind, "unknown control message skipped"),
            other => {
                return Err((
                    ErrorCode::Protocol,
                    format!(
                        "message type {:#x} is sent by relays, not clients",
                        other.kind()
                    ),
                ));
            }
        }
        Ok(())
    }

    async fn join(&mut self, request_id: u64, group: String) {
        let hub = &self.ctx.hub;
        let snapshot = match hub.join(&group, &self.handle).await {
            Ok(s) => s,
            Err(code_) => {
                self.reply_result(request_id, Err(code_)).await;
                return;
            }
        };
        let store = self.ctx.store.clone();
        let user = self.handle.user.clone();
        let (cursor, range) =
            match tokio::try_join!(store.cursor(&group, &user), store.seq_range(&group)) {
                Ok(v) => v,
                Err(e) => {
                    hub.leave(&group, self.handle.id);
                    self.reply_result(request_id, Err(e.code())).await;
                    return;
                }
            };
        let key: Arc<str> = group.as_str().into();
        let entry = self.joined.entry(key.clone()).or_default();
        entry.cursor = entry.cursor.max(cursor);
        let skip = entry.delivered.clone();
        let mut from = entry.cursor;
        self.send(ControlMessage::Joined {
            request_id,
            group: group.clone(),
            mode: snapshot.mode,
            cursor: from,
            last_seq: snapshot.last_seq,
        })
        .await;
        if range.first > from + 1 && from < snapshot.last_seq {
            let to = (range.first - 1).min(snapshot.last_seq);
            self.send(ControlMessage::Gap {
                group: group.clone(),
                from_seq: from + 1,
                to_seq: to,
            })
            .await;
            from = to;
        }
        for clip in snapshot.active {
            self.spawn_live(clip);
        }
        let conn = self.conn.clone();
        let to = snapshot.last_seq;
        self.deliveries.spawn(async move {
            catch_up(&conn, &*store, &key, from, to, &skip).await;
            TaskDone::CaughtUp {
                group: key,
                seq: to,
            }
        });
    }

    fn spawn_live(&mut self, clip: Arc<LiveClip>) {
        let conn = self.conn.clone();
        let lag = self.ctx.lag_policy(clip.meta.frame_ms);
        let group: Arc<str> = clip.meta.group.as_str().into();
        self.deliveries.spawn(async move {
            let result = delivery::deliver_live(&conn, &clip, lag).await;
            TaskDone::Clip {
                group,
                clip: Some(clip),
                result,
            }
        });
    }

    /// After a cut: wait for the clip to be stored, then send it from the
    /// store, whole.
    fn spawn_recovery(&mut self, group: Arc<str>, clip: Arc<LiveClip>) {
        let conn = self.conn.clone();
        let store = self.ctx.store.clone();
        self.deliveries.spawn(async move {
            let seq = wait_stored(&clip).await;
            drop(clip);
            let result = match seq {
                Some(seq) => match store.clips_after(&group, seq - 1, 1).await {
                    Ok(clips) if clips.first().is_some_and(|c| c.seq == seq) => {
                        delivery::deliver_stored(&conn, &clips[0], false).await
                    }
                    _ => Delivery::Aborted,
                },
                None => Delivery::Aborted,
            };
            TaskDone::Clip {
                group,
                clip: None,
                result,
            }
        });
    }

    async fn handle_command(&mut self, command: SessionCommand) {
        match command {
            SessionCommand::Send(message) => {
                // The talker's own clip is not sent back to it: storing it
                // is its delivery, so the cursor does not wait for an ack.
                if let ControlMessage::Stored { group, seq, .. } = &*message {
                    self.mark_acked(group, *seq);
                }
                self.send(*message).await;
            }
            SessionCommand::Deliver(clip) => {
                if self.joined.contains_key(clip.meta.group.as_str()) {
                    self.spawn_live(clip);
                }
            }
            SessionCommand::CatchUp(group) => {
                // The hub could not even queue a clip: catch up on
                // everything stored that this connection has not had.
                if let Some(joined) = self.joined.get(&group) {
                    let skip = joined.delivered.clone();
                    let from = joined.cursor;
                    let conn = self.conn.clone();
                    let store = self.ctx.store.clone();
                    self.deliveries.spawn(async move {
                        let to = store.seq_range(&group).await.map(|r| r.last).unwrap_or(0);
                        catch_up(&conn, &*store, &group, from, to, &skip).await;
                        TaskDone::CaughtUp { group, seq: to }
                    });
                }
            }
        }
    }

    async fn handle_done(&mut self, done: TaskDone) {
        match done {
            TaskDone::Clip {
                group,
                clip,
                result,
            } => match result {
                Delivery::Complete {
                    seq,
                    clip_id,
                    talker,
                } => {
                    if let Some(joined) = self.joined.get_mut(&group) {
                        joined.delivered.insert(seq);
                        // A client that never acks must not grow this
                        // without bound: past the cap, receipts fall back
                        // to a store read.
                        if seq > joined.cursor
                            && talker != *self.handle.user
                            && joined.unacked.len() < MAX_UNACKED
                        {
                            joined.unacked.insert(seq, (clip_id, talker));
                        }
                    }
                }
                Delivery::Cut => {
                    tracing::debug!(%group, "live stream cut; recovering from the store");
                    if let Some(clip) = clip {
                        self.spawn_recovery(group, clip);
                    }
                }
                Delivery::Aborted | Delivery::Failed => {}
            },
            TaskDone::CaughtUp { group, seq } => {
                self.send(ControlMessage::CaughtUp {
                    group: group.to_string(),
                    seq,
                })
                .await;
            }
            TaskDone::Fetched {
                request_id,
                group,
                count,
            } => {
                self.send(ControlMessage::FetchDone {
                    request_id,
                    group: group.to_string(),
                    count,
                })
                .await;
            }
        }
    }

    /// A delivery ack: move the cursor over the contiguous acked prefix and
    /// send the talker a receipt.
    fn ack(&mut self, group: String, seq: u64) {
        if !self.mark_acked(&group, seq) {
            return;
        }
        let known = self
            .joined
            .get_mut(group.as_str())
            .and_then(|j| j.unacked.remove(&seq));
        match known {
            Some((clip_id, talker)) => self.ctx.hub.send_receipt(
                &talker,
                &group,
                seq,
                clip_id,
                &self.handle.user,
                ReceiptKind::Delivered,
            ),
            None => self.receipt(group, seq, ReceiptKind::Delivered),
        }
    }

    /// Records `seq` as acknowledged and persists the cursor if it moved;
    /// `false` if the group is not joined.
    fn mark_acked(&mut self, group: &str, seq: u64) -> bool {
        let Some(joined) = self.joined.get_mut(group) else {
            return false;
        };
        if seq > joined.cursor {
            joined.acked.insert(seq);
        }
        let before = joined.cursor;
        while joined.acked.remove(&(joined.cursor + 1)) {
            joined.cursor += 1;
        }
        let cursor = joined.cursor;
        if cursor > before {
            let store = self.ctx.store.clone();
            let user = self.handle.user.clone();
            let group = group.to_owned();
            tokio::spawn(async move {
                if let Err(e) = store.advance_cursor(&group, &user, cursor).await {
                    tracing::warn!(error = %e, "cursor update failed");
                }
            });
        }
        true
    }

    fn receipt(&self, group: String, seq: u64, kind: ReceiptKind) {
        if !self.joined.contains_key(group.as_str()) {
            return;
        }
        let ctx = self.ctx.clone();
        let member = self.handle.user.clone();
        tokio::spawn(async move {
            if let Ok(Some(meta)) = ctx.store.clip_meta(&group, seq).await
                && meta.talker != *member
            {
                ctx.hub
                    .send_receipt(&meta.talker, &group, seq, meta.clip_id, &member, kind);
            }
        });
    }

    async fn fetch(&mut self, request_id: u64, group: String, count: u32) {
        if let Err(code_) = self.ctx.hub.member_group(&group, &self.handle.user).await {
            self.reply_result(request_id, Err(code_)).await;
            return;
        }
        let conn = self.conn.clone();
        let store = self.ctx.store.clone();
        let key: Arc<str> = group.as_str().into();
        self.deliveries.spawn(async move {
            let clips = store
                .recent_clips(&key, count.min(MAX_FETCH) as usize)
                .await
                .unwrap_or_default();
            let mut sent = 0;
            for clip in &clips {
                if let Delivery::Complete { .. } = delivery::deliver_stored(&conn, clip, true).await
                {
                    sent += 1;
                }
            }
            TaskDone::Fetched {
                request_id,
                group: key,
                count: sent,
            }
        });
    }

    async fn admin(&mut self, message: ControlMessage) {
        use ControlMessage as M;
        let (request_id, group) = match &message {
            M::CreateGroup {
                request_id, group, ..
            }
            | M::AddMember {
                request_id, group, ..
            }
            | M::RemoveMember {
                request_id, group, ..
            }
            | M::SetMode {
                request_id, group, ..
            } => (*request_id, group.clone()),
            _ => unreachable!("admin is called with admin messages"),
        };
        let result = if !self.claims.adm {
            Err(ErrorCode::Forbidden)
        } else {
            crate::admin::apply(&self.ctx, message).await
        };
        let reply = result.map(|()| M::Ok { request_id });
        if reply.is_ok() {
            self.ctx.hub.refresh_group(&group).await;
        }
        self.reply_result(request_id, reply).await;
    }

    async fn list_groups(&self, request_id: u64) -> Result<ControlMessage, ErrorCode> {
        let groups = self.ctx.store.groups().await.map_err(|e| e.code())?;
        let groups = groups
            .into_iter()
            .filter(|g| self.claims.adm || g.members.contains(&*self.handle.user))
            .map(|g| GroupSummary {
                group: g.id,
                mode: g.mode,
            })
            .collect();
        Ok(ControlMessage::GroupList { request_id, groups })
    }

    async fn list_members(
        &self,
        request_id: u64,
        group: String,
    ) -> Result<ControlMessage, ErrorCode> {
        let info = self
            .ctx
            .store
            .group(&group)
            .await
            .map_err(|e| e.code())?
            .ok_or(ErrorCode::NoSuchGroup)?;
        if !self.claims.adm && !info.members.contains(&*self.handle.user) {
            return Err(ErrorCode::NotMember);
        }
        Ok(ControlMessage::MemberList {
            request_id,
            group,
            members: info.members.into_iter().collect(),
        })
    }

    fn arm_floor_timer(&self, group: &str) {
        if let Some(timeout) = self.ctx.hub.floor_timeout(group) {
            let ctx = self.ctx.clone();
            let group = group.to_owned();
            tokio::spawn(async move {
                tokio::time::sleep(timeout).await;
                ctx.hub.expire_floor(&group);
            });
        }
    }
}

/// Sends stored clips with `from < seq <= to` that are not in `skip`.
async fn catch_up(
    conn: &Connection,
    store: &dyn crate::store::ClipStore,
    group: &str,
    from: u64,
    to: u64,
    skip: &HashSet<u64>,
) {
    let mut after = from;
    while after < to {
        let clips = match store.clips_after(group, after, CATCH_UP_BATCH).await {
            Ok(clips) if !clips.is_empty() => clips,
            Ok(_) => break,
            Err(crate::store::StoreError::Corrupt { .. }) => {
                // One damaged clip must not hide the ones after it: read
                // one at a time and step over the damaged one.
                match store.clips_after(group, after, 1).await {
                    Ok(clips) if !clips.is_empty() => clips,
                    Ok(_) => break,
                    Err(e) => {
                        tracing::error!(error = %e, seq = after + 1, "skipping a damaged clip");
                        after += 1;
                        continue;
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "catch-up read failed");
                break;
            }
        };
        for clip in clips {
            if clip.seq > to {
                return;
            }
            after = clip.seq;
            if skip.contains(&clip.seq) {
                continue;
            }
            if let Delivery::Failed = delivery::deliver_stored(conn, &clip, false).await {
                return;
            }
        }
    }
}

/// Waits until a clip is stored (its sequence number) or discarded.
async fn wait_stored(clip: &LiveClip) -> Option<u64> {
    let mut rx = clip.subscribe();
    loop {
        match &rx.borrow_and_update().state {
            ClipState::Ended { seq, .. } => return Some(*seq),
            ClipState::Aborted(_) => return None,
            ClipState::Live => {}
        }
        if rx.changed().await.is_err() {
            return None;
        }
    }
}

async fn sleep_until_opt(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

async fn write_then_close(send: &mut SendStream, code_: ErrorCode, message: &str) {
    let error = ControlMessage::Error {
        request_id: 0,
        code: code_,
        message: message.to_owned(),
    };
    let _ = send.write_all(&error.to_bytes()).await;
    let _ = send.finish();
    // Give the error a moment to leave before the connection closes (the
    // close frame would otherwise discard it); the close code says the
    // same for clients that miss it.
    let _ = tokio::time::timeout(Duration::from_millis(100), send.stopped()).await;
}

/// Reads control messages from the control stream (cancel-safe).
struct ControlReader {
    recv: RecvStream,
    decoder: FrameDecoder,
}

impl ControlReader {
    fn new(recv: RecvStream) -> ControlReader {
        ControlReader {
            recv,
            decoder: FrameDecoder::new(MAX_PAYLOAD_LEN),
        }
    }

    /// The next message; `None` when the client finished the stream.
    async fn next(&mut self) -> Result<Option<ControlMessage>, (ErrorCode, String)> {
        loop {
            let frame = self
                .decoder
                .next_frame()
                .map_err(|e| (ErrorCode::from(&e), e.to_string()))?;
            if let Some(frame) = frame {
                return ControlMessage::decode(frame.kind, frame.payload)
                    .map(Some)
                    .map_err(|e| (ErrorCode::from(&e), e.to_string()));
            }
            match self.recv.read_chunk(MAX_PAYLOAD_LEN, true).await {
                Ok(Some(chunk)) => self.decoder.push(chunk.bytes),
                Ok(None) => return Ok(None),
                Err(e) => return Err((ErrorCode::None, e.to_string())),
            }
        }
    }
}
