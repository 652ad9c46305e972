//! The connection task: owns the control stream, matches replies to
//! requests, turns relay messages into events, and reconnects.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::BytesMut;
use ptt_protocol::message::MAX_PAYLOAD_LEN;
use ptt_protocol::{
    ControlMessage, ErrorCode, FramedReader, MediaMessage, PROTOCOL_VERSION, ReadError, Welcome,
};
use tokio::sync::{mpsc, oneshot};

use crate::backoff::Backoff;
use crate::error::ClientError;
use crate::event::Event;
use crate::shared::{ConnSlot, Inner, Internal, Stats, StoredClip, lock};

/// What the application's handles ask of the connection task.
pub(crate) enum Command {
    /// Send a request built with the request id the task assigns, and
    /// deliver the reply.
    Request {
        build: Box<dyn FnOnce(u64) -> ControlMessage + Send>,
        kind: PendingKind,
        reply: oneshot::Sender<Result<ControlMessage, ClientError>>,
    },
    /// Send a message that has no reply.
    Send(ControlMessage),
    /// Close the connection and end the task.
    Close { done: oneshot::Sender<()> },
}

/// What a pending request means to the task's own books.
#[derive(Debug, Clone)]
pub(crate) enum PendingKind {
    Plain,
    Join(String),
    Leave(String),
    Fetch(String),
    /// MediaOpen: the offer starts the path; an error leaves frames on
    /// streams.
    Media,
}

struct Pending {
    kind: PendingKind,
    reply: Option<oneshot::Sender<Result<ControlMessage, ClientError>>>,
}

/// An established, authenticated connection.
pub(crate) struct Session {
    pub epoch: u64,
    pub conn: quinn::Connection,
    pub control: quinn::SendStream,
    pub welcome: Welcome,
}

/// Connects, says hello and waits for the welcome; then starts the tasks
/// reading the control stream and accepting clip streams.
pub(crate) async fn establish(inner: &Arc<Inner>, epoch: u64) -> Result<Session, ClientError> {
    let config = &inner.config;
    let attempt = async {
        let addr = *lock(&inner.relay_addr);
        let connecting =
            inner
                .endpoint
                .connect_with(inner.quinn_config.clone(), addr, &config.server_name)?;
        let conn = connecting.await?;
        let (mut send, recv) = conn.open_bi().await?;
        let hello = ControlMessage::Hello {
            version: PROTOCOL_VERSION,
            token: lock(&inner.token).clone(),
            client: config.client_name.clone(),
        };
        send.write_all(&hello.to_bytes())
            .await
            .map_err(|e| write_error(&conn, e))?;
        let mut reader = FramedReader::new(recv, MAX_PAYLOAD_LEN);
        let welcome = loop {
            match reader.next_control().await {
                Ok(Some(ControlMessage::Welcome(w))) => break w,
                Ok(Some(ControlMessage::Error { code, message, .. })) => {
                    return Err(ClientError::Relay { code, message });
                }
                Ok(Some(ControlMessage::Unknown { .. })) => continue,
                Ok(Some(other)) => {
                    return Err(ClientError::Protocol(format!(
                        "expected a welcome, got {other:?}"
                    )));
                }
                Ok(None) => {
                    return Err(ClientError::Protocol(
                        "the relay ended the control stream before its welcome".into(),
                    ));
                }
                Err(ReadError::Stream(quinn::ReadError::ConnectionLost(e))) => {
                    return Err(e.into());
                }
                Err(e) => return Err(ClientError::Protocol(e.to_string())),
            }
        };
        Ok::<_, ClientError>((conn, send, reader, welcome))
    };
    let (conn, send, reader, welcome) =
        match tokio::time::timeout(config.connect_timeout, attempt).await {
            Ok(r) => r?,
            Err(_) => return Err(ClientError::Timeout),
        };
    if welcome.version != PROTOCOL_VERSION {
        conn.close(
            quinn::VarInt::from_u32(ErrorCode::UnsupportedVersion.code()),
            b"unsupported version",
        );
        return Err(ClientError::Relay {
            code: ErrorCode::UnsupportedVersion,
            message: format!("the relay speaks version {}", welcome.version),
        });
    }
    *lock(&inner.welcome) = welcome.clone();
    // The connection's frame router, before any clip stream is read: the
    // media path (if the relay offers it) and live frames in QUIC
    // datagrams (only the measurement harness sends them) feed it.
    *lock(&inner.media_inbox) = Some((conn.stable_id(), Arc::default()));
    tokio::spawn(read_control(inner.clone(), epoch, reader));
    tokio::spawn(accept_clips(inner.clone(), conn.clone()));
    Ok(Session {
        epoch,
        conn,
        control: send,
        welcome,
    })
}

/// A write error, with the connection's close reason when it was closed.
fn write_error(conn: &quinn::Connection, e: quinn::WriteError) -> ClientError {
    match e {
        quinn::WriteError::ConnectionLost(e) => e.into(),
        _ => conn
            .close_reason()
            .map(ClientError::from)
            .unwrap_or_else(|| ClientError::Protocol(e.to_string())),
    }
}

/// Reads the control stream of connection `epoch` and hands each message
/// to the connection task.
async fn read_control(inner: Arc<Inner>, epoch: u64, mut reader: FramedReader<quinn::RecvStream>) {
    let (reason, protocol_error) = loop {
        match reader.next_control().await {
            Ok(Some(ControlMessage::Unknown { kind })) => {
                tracing::debug!(kind, "skipping an unknown control message");
            }
            Ok(Some(msg)) => {
                if inner
                    .internal
                    .send(Internal::Control { epoch, msg })
                    .await
                    .is_err()
                {
                    return;
                }
            }
            Ok(None) => break ("the relay ended the control stream".into(), false),
            Err(ReadError::Stream(e)) => break (e.to_string(), false),
            Err(e) => break (format!("bad control stream: {e}"), true),
        }
    };
    let _ = inner
        .internal
        .send(Internal::ControlEnded {
            epoch,
            reason,
            protocol_error,
        })
        .await;
}

/// Accepts the clip streams the relay opens and reads each in its own task.
async fn accept_clips(inner: Arc<Inner>, conn: quinn::Connection) {
    while let Ok(recv) = conn.accept_uni().await {
        tokio::spawn(crate::receive::read_clip(inner.clone(), conn.clone(), recv));
    }
}

/// The first address `host:port` names.
async fn resolve(address: &str) -> Option<std::net::SocketAddr> {
    if let Ok(addr) = address.parse() {
        return Some(addr);
    }
    tokio::net::lookup_host(address).await.ok()?.next()
}

/// Why a session ended.
struct Loss {
    code: Option<ErrorCode>,
    reason: String,
}

impl Loss {
    fn from_connection(
        err: &quinn::ConnectionError,
        relay_error: Option<&(ErrorCode, String)>,
    ) -> Loss {
        let code = match err {
            quinn::ConnectionError::ApplicationClosed(close) => {
                Some(ErrorCode::from_code(close.error_code.into_inner()))
            }
            _ => None,
        };
        let reason = match relay_error {
            Some((code, message)) => format!("relay error {code}: {message}"),
            None => err.to_string(),
        };
        Loss {
            code: code.or(relay_error.map(|(c, _)| *c)),
            reason,
        }
    }

    fn is_fatal(&self) -> bool {
        matches!(
            self.code,
            Some(
                ErrorCode::InvalidToken
                    | ErrorCode::TokenExpired
                    | ErrorCode::UnsupportedVersion
                    | ErrorCode::Forbidden
            )
        )
    }
}

/// Most played reports kept while disconnected. Each costs a token of the
/// relay's control-message rate limit when sent after the reconnect (they
/// name clips delivered on an earlier connection), so they stay well under
/// its burst of 256, with room for the re-joins.
const OUTBOX_CAP: usize = 128;

/// The connection task's state.
pub(crate) struct Driver {
    inner: Arc<Inner>,
    commands: mpsc::Receiver<Command>,
    internal: mpsc::Receiver<Internal>,
    pending: HashMap<u64, Pending>,
    joined: BTreeSet<String>,
    next_request: u64,
    next_epoch: u64,
    /// Played reports to send once connected again.
    outbox: Vec<ControlMessage>,
    /// An `Error` with request id 0: the reason of the coming close.
    relay_error: Option<(ErrorCode, String)>,
    /// The relay's GoAway on this connection: when (and where, if not
    /// empty) to reconnect after the close.
    go_away: Option<(Duration, String)>,
    /// The current connection's UDP media path, once offered.
    media: Option<crate::media::MediaPath>,
}

enum Step {
    Continue,
    Lost(Loss),
    Close(Option<oneshot::Sender<()>>),
}

impl Driver {
    pub(crate) fn new(
        inner: Arc<Inner>,
        commands: mpsc::Receiver<Command>,
        internal: mpsc::Receiver<Internal>,
        next_epoch: u64,
    ) -> Driver {
        Driver {
            inner,
            commands,
            internal,
            pending: HashMap::new(),
            joined: BTreeSet::new(),
            next_request: 1,
            next_epoch,
            outbox: Vec::new(),
            relay_error: None,
            go_away: None,
            media: None,
        }
    }

    /// Runs until the client is closed, dropped, or the connection is lost
    /// for good.
    pub(crate) async fn run(mut self, first: Session) {
        let mut session = first;
        loop {
            let step = self.serve(&mut session).await;
            self.media = None;
            *lock(&self.inner.media_inbox) = None;
            *lock(&self.inner.conn) = None;
            self.fail_pending();
            match step {
                Step::Close(done) => {
                    self.shutdown(Some(session), ClientError::Closed).await;
                    if let Some(done) = done {
                        let _ = done.send(());
                    }
                    return;
                }
                Step::Continue => unreachable!("serve returns only on an end"),
                Step::Lost(loss) => {
                    session.conn.close(0u32.into(), b"");
                    let reconnecting = self.inner.reconnects() && !loss.is_fatal();
                    tracing::info!(reason = %loss.reason, reconnecting, "connection lost");
                    self.inner
                        .emit(Event::Disconnected {
                            code: loss.code,
                            reason: loss.reason,
                            reconnecting,
                        })
                        .await;
                    if !reconnecting {
                        self.shutdown(None, ClientError::ConnectionLost).await;
                        return;
                    }
                    match self.reconnect().await {
                        Ok(next) => session = next,
                        Err(done) => {
                            self.shutdown(None, ClientError::Closed).await;
                            if let Some(done) = done {
                                let _ = done.send(());
                            }
                            return;
                        }
                    }
                }
            }
        }
    }

    /// Serves one session until it ends.
    async fn serve(&mut self, session: &mut Session) -> Step {
        self.relay_error = None;
        self.go_away = None;
        let step = self.open_media(session).await;
        if !matches!(step, Step::Continue) {
            return step;
        }
        loop {
            let step = tokio::select! {
                cmd = self.commands.recv() => match cmd {
                    None => Step::Close(None),
                    Some(Command::Close { done }) => Step::Close(Some(done)),
                    Some(cmd) => self.command(session, cmd).await,
                },
                Some(msg) = self.internal.recv() => self.internal_message(session, msg).await,
                Ok(datagram) = session.conn.read_datagram() => {
                    self.live_frames(session, datagram);
                    Step::Continue
                }
                err = session.conn.closed() => Step::Lost(Loss::from_connection(&err, self.relay_error.as_ref())),
            };
            if !matches!(step, Step::Continue) {
                return step;
            }
        }
    }

    /// Routes the live frames of a QUIC datagram (`LiveFrames`, sent only
    /// by the measurement harness's DATAGRAM live plane: PROTOCOL.md §4.3)
    /// as the media path routes its `Frames` packets.
    fn live_frames(&self, session: &Session, datagram: bytes::Bytes) {
        let Some(inbox) = self.inner.media_inbox(&session.conn) else {
            return;
        };
        let received_at = std::time::Instant::now();
        for f in ptt_protocol::datagram::live_frames(&datagram) {
            crate::media::deliver_frames(&self.inner, &inbox, f, &datagram, &datagram, received_at);
        }
    }

    /// Asks for the UDP media path (PROTOCOL.md, section 14) when the
    /// configuration wants it; the offer arrives on the control stream.
    async fn open_media(&mut self, session: &mut Session) -> Step {
        if !self.inner.config.media {
            return Step::Continue;
        }
        let id = self.next_request;
        self.next_request += 1;
        self.pending.insert(
            id,
            Pending {
                kind: PendingKind::Media,
                reply: None,
            },
        );
        // Frames packets (several frames in one datagram, PROTOCOL.md
        // §14.3): the media path below reads them.
        let open = ControlMessage::Media(MediaMessage::Open {
            request_id: id,
            features: ptt_protocol::media::FEATURE_FRAMES,
        });
        self.write(session, &open).await
    }

    /// The relay offered the media path: start it.
    async fn media_offered(
        &mut self,
        session: &Session,
        request_id: u64,
        port: u16,
        conn_id: u64,
        epoch: u32,
    ) {
        if !matches!(
            self.pending.get(&request_id).map(|p| &p.kind),
            Some(PendingKind::Media)
        ) || self.media.is_some()
        {
            tracing::debug!(request_id, "unexpected media offer");
            return;
        }
        self.pending.remove(&request_id);
        let inbox = self.inner.media_inbox(&session.conn).unwrap_or_default();
        match crate::media::start(
            self.inner.clone(),
            &session.conn,
            port,
            conn_id,
            epoch,
            inbox.clone(),
        )
        .await
        {
            Ok(path) => {
                tracing::debug!(port, "media path open");
                *lock(&self.inner.media_inbox) = Some((session.conn.stable_id(), inbox));
                self.media = Some(path);
            }
            Err(e) => tracing::warn!(error = %e, "media path not started; frames stay on streams"),
        }
    }

    async fn write(&mut self, session: &mut Session, msg: &ControlMessage) -> Step {
        let mut buf = BytesMut::new();
        msg.encode(&mut buf);
        match session.control.write_all(&buf).await {
            Ok(()) => Step::Continue,
            Err(e) => {
                let err = write_error(&session.conn, e);
                Step::Lost(Loss {
                    code: err.code(),
                    reason: err.to_string(),
                })
            }
        }
    }

    async fn command(&mut self, session: &mut Session, cmd: Command) -> Step {
        match cmd {
            Command::Request { build, kind, reply } => {
                let id = self.next_request;
                self.next_request += 1;
                let msg = build(id);
                if let PendingKind::Fetch(group) = &kind {
                    self.inner.fetch_started(group);
                }
                self.pending.insert(
                    id,
                    Pending {
                        kind,
                        reply: Some(reply),
                    },
                );
                self.write(session, &msg).await
            }
            Command::Send(msg) => self.write(session, &msg).await,
            Command::Close { .. } => unreachable!("handled by serve"),
        }
    }

    async fn internal_message(&mut self, session: &mut Session, msg: Internal) -> Step {
        match msg {
            Internal::Ack { group, seq } => {
                self.write(session, &ControlMessage::DeliveryAck { group, seq })
                    .await
            }
            Internal::Fetch { group, seq } => {
                let id = self.next_request;
                self.next_request += 1;
                self.inner.fetch_started(&group);
                self.pending.insert(
                    id,
                    Pending {
                        kind: PendingKind::Fetch(group.clone()),
                        reply: None,
                    },
                );
                let fetch = ControlMessage::FetchClip {
                    request_id: id,
                    group,
                    seq,
                };
                self.write(session, &fetch).await
            }
            Internal::Control { epoch, msg } if epoch == session.epoch => {
                self.control(session, msg).await
            }
            Internal::ControlEnded {
                epoch,
                reason,
                protocol_error,
            } if epoch == session.epoch => {
                if protocol_error {
                    session.conn.close(
                        quinn::VarInt::from_u32(ErrorCode::Protocol.code()),
                        reason.as_bytes(),
                    );
                    return Step::Lost(Loss {
                        code: Some(ErrorCode::Protocol),
                        reason,
                    });
                }
                // The connection's own close reason is better when it has one.
                let err = tokio::time::timeout(Duration::from_secs(1), session.conn.closed()).await;
                Step::Lost(match err {
                    Ok(err) => Loss::from_connection(&err, self.relay_error.as_ref()),
                    Err(_) => Loss { code: None, reason },
                })
            }
            // From an earlier connection.
            Internal::Control { .. } | Internal::ControlEnded { .. } => Step::Continue,
        }
    }

    /// Handles a message from the relay.
    async fn control(&mut self, session: &mut Session, msg: ControlMessage) -> Step {
        use ControlMessage as M;
        let event = match msg {
            M::Media(MediaMessage::Offer {
                request_id,
                port,
                conn_id,
                epoch,
                ..
            }) => {
                self.media_offered(session, request_id, port, conn_id, epoch)
                    .await;
                None
            }
            M::Channel(ref answer) if answer.request_id() != 0 => {
                let request_id = answer.request_id();
                self.reply(request_id, msg).await;
                None
            }
            M::Ok { request_id }
            | M::Error { request_id, .. }
            | M::Joined { request_id, .. }
            | M::FloorGranted { request_id, .. }
            | M::FloorDenied { request_id, .. }
            | M::GroupList { request_id, .. }
            | M::MemberList { request_id, .. }
            | M::MemberStatus { request_id, .. }
            | M::ClipList { request_id, .. }
            | M::FetchDone { request_id, .. }
                if request_id != 0 =>
            {
                self.reply(request_id, msg).await;
                None
            }
            M::Error { code, message, .. } => {
                tracing::warn!(%code, %message, "relay error");
                self.relay_error = Some((code, message));
                None
            }
            M::Stored {
                group,
                clip_id,
                seq,
            } => {
                let slot = lock(&self.inner.uploads).remove(&clip_id);
                if let Some(mut slot) = slot {
                    Stats::bump(&self.inner.stats.clips_stored);
                    if let Some(done) = slot.done.take() {
                        let _ = done.send(Ok(StoredClip {
                            group: group.clone(),
                            clip_id,
                            seq,
                        }));
                    }
                }
                Some(Event::Stored {
                    group,
                    clip_id,
                    seq,
                })
            }
            M::ClipRejected {
                clip_id,
                code,
                message,
            } => {
                let slot = lock(&self.inner.uploads).remove(&clip_id);
                if let Some(mut slot) = slot {
                    let err = ClientError::ClipRejected {
                        code,
                        message: message.clone(),
                    };
                    lock(&slot.clip).failed = Some(err.clone());
                    if let Some(done) = slot.done.take() {
                        let _ = done.send(Err(err));
                    }
                }
                Some(Event::ClipRejected {
                    clip_id,
                    code,
                    message,
                })
            }
            M::Receipt {
                group,
                seq,
                clip_id,
                user,
                kind,
            } => Some(Event::Receipt {
                group,
                seq,
                clip_id,
                user,
                kind,
            }),
            M::FloorTaken {
                group,
                user,
                emergency,
            } => Some(Event::FloorTaken {
                group,
                user,
                emergency,
            }),
            M::FloorIdle { group } => Some(Event::FloorIdle { group }),
            M::FloorRevoked { group, code } => Some(Event::FloorRevoked { group, code }),
            M::Gap {
                group,
                from_seq,
                to_seq,
            } => Some(Event::Gap {
                group,
                from_seq,
                to_seq,
            }),
            M::CaughtUp { group, seq } => Some(Event::CaughtUp { group, seq }),
            M::GoAway {
                reconnect_after_ms,
                address,
            } => {
                let after = Duration::from_millis(u64::from(reconnect_after_ms));
                tracing::info!(?after, %address, "the relay is going away");
                self.go_away = Some((after, address.clone()));
                Some(Event::GoAway {
                    reconnect_after: after,
                    address: (!address.is_empty()).then_some(address),
                })
            }
            M::GroupLeft { group, code } => {
                // Removed from the group or the group deleted: do not join
                // it again after a reconnect.
                self.joined.remove(&group);
                Some(Event::GroupLeft { group, code })
            }
            M::ClipDeleted {
                group,
                seq,
                clip_id,
            } => Some(Event::ClipDeleted {
                group,
                seq,
                clip_id,
            }),
            other => {
                tracing::debug!(?other, "ignoring an unexpected control message");
                None
            }
        };
        if let Some(event) = event {
            self.inner.emit(event).await;
        }
        Step::Continue
    }

    /// Delivers the reply to request `id`, keeping the task's books.
    async fn reply(&mut self, id: u64, msg: ControlMessage) {
        let Some(mut pending) = self.pending.remove(&id) else {
            tracing::debug!(id, "reply to an unknown request");
            return;
        };
        let ok = !matches!(msg, ControlMessage::Error { .. });
        match &pending.kind {
            PendingKind::Plain => {}
            PendingKind::Media => {
                if let ControlMessage::Error { code, .. } = &msg {
                    tracing::debug!(%code, "no media path; frames stay on streams");
                }
            }
            PendingKind::Join(group) => {
                if ok {
                    self.joined.insert(group.clone());
                } else if pending.reply.is_none() {
                    // A re-join after reconnecting failed.
                    self.joined.remove(group);
                    if let ControlMessage::Error { code, message, .. } = &msg {
                        self.inner
                            .emit(Event::RejoinFailed {
                                group: group.clone(),
                                code: *code,
                                message: message.clone(),
                            })
                            .await;
                    }
                }
            }
            PendingKind::Leave(group) => {
                if ok {
                    self.joined.remove(group);
                }
            }
            PendingKind::Fetch(group) => {
                let count = match &msg {
                    ControlMessage::FetchDone { count, .. } => Some(*count),
                    _ => None,
                };
                self.inner.fetch_finished(group, count);
            }
        }
        if let Some(reply) = pending.reply.take() {
            let _ = reply.send(Ok(msg));
        }
    }

    /// Fails the requests in flight: their replies were lost with the
    /// connection.
    fn fail_pending(&mut self) {
        for (_, mut pending) in self.pending.drain() {
            if let PendingKind::Fetch(group) = &pending.kind {
                self.inner.fetch_finished(group, None);
            }
            if let Some(reply) = pending.reply.take() {
                let _ = reply.send(Err(ClientError::ConnectionLost));
            }
        }
    }

    /// Backs off and reconnects, serving commands meanwhile. `Err` when the
    /// client is closed or gives up (with the close's acknowledgement).
    async fn reconnect(&mut self) -> Result<Session, Option<oneshot::Sender<()>>> {
        let policy = self
            .inner
            .config
            .reconnect
            .clone()
            .expect("reconnect is only called with a policy");
        let jitter = policy.jitter;
        let mut backoff = Backoff::new(policy);
        let mut go_away = self.go_away.take();
        loop {
            // After a GoAway: its hint (plus up to half of it at random, so
            // that the clients of a drained relay do not all arrive at
            // once) and its address, once; then the usual back-off.
            let hinted = go_away.take().map(|(after, address)| {
                let spread = if jitter {
                    rand::random::<f64>() * 0.5
                } else {
                    0.0
                };
                (after.mul_f64(1.0 + spread), address)
            });
            let next = match hinted {
                Some((delay, address)) => Some((delay, Some(address))),
                None => backoff.next_delay().map(|delay| (delay, None)),
            };
            let Some((delay, redirect)) = next else {
                self.inner
                    .emit(Event::Disconnected {
                        code: None,
                        reason: format!("gave up after {} attempts", backoff.attempts() - 1),
                        reconnecting: false,
                    })
                    .await;
                return Err(None);
            };
            let sleep = tokio::time::sleep(delay);
            tokio::pin!(sleep);
            loop {
                tokio::select! {
                    () = &mut sleep => break,
                    cmd = self.commands.recv() => self.offline_command(cmd)?,
                    Some(msg) = self.internal.recv() => self.offline_internal(msg),
                }
            }
            if let Some(address) = redirect.filter(|a| !a.is_empty()) {
                match resolve(&address).await {
                    Some(addr) => {
                        tracing::info!(%addr, "reconnecting to the relay the GoAway named");
                        *lock(&self.inner.relay_addr) = addr;
                    }
                    None => tracing::warn!(%address, "the GoAway's address does not resolve"),
                }
            }
            let epoch = self.next_epoch;
            self.next_epoch += 1;
            let inner = self.inner.clone();
            let attempt = async move { establish(&inner, epoch).await };
            tokio::pin!(attempt);
            let result = loop {
                tokio::select! {
                    r = &mut attempt => break r,
                    cmd = self.commands.recv() => self.offline_command(cmd)?,
                    Some(msg) = self.internal.recv() => self.offline_internal(msg),
                }
            };
            match result {
                Ok(mut session) => {
                    let attempts = backoff.attempts();
                    Stats::bump(&self.inner.stats.reconnects);
                    self.install(&session);
                    self.inner
                        .emit(Event::Reconnected {
                            welcome: session.welcome.clone(),
                            attempts,
                        })
                        .await;
                    if self.resume(&mut session).await.is_ok() {
                        return Ok(session);
                    }
                    // Lost again at once: back off and retry.
                    *lock(&self.inner.conn) = None;
                    self.fail_pending();
                }
                Err(err) if err.is_fatal() => {
                    self.inner
                        .emit(Event::Disconnected {
                            code: err.code(),
                            reason: err.to_string(),
                            reconnecting: false,
                        })
                        .await;
                    return Err(None);
                }
                Err(err) => {
                    tracing::debug!(%err, attempt = backoff.attempts(), "reconnect failed");
                }
            }
        }
    }

    /// A command while disconnected: requests fail at once, reports wait.
    fn offline_command(&mut self, cmd: Option<Command>) -> Result<(), Option<oneshot::Sender<()>>> {
        match cmd {
            None => Err(None),
            Some(Command::Close { done }) => Err(Some(done)),
            Some(Command::Request { reply, .. }) => {
                let _ = reply.send(Err(ClientError::NotConnected));
                Ok(())
            }
            Some(Command::Send(msg)) => {
                // Acknowledgements are not kept: the relay ignores a
                // DeliveryAck for a clip not delivered on the connection it
                // arrives on, and catch-up delivers the clip again (it is
                // acknowledged then). A played report is honoured for a
                // clip at or below the cursor.
                if matches!(msg, ControlMessage::Played { .. }) && self.outbox.len() < OUTBOX_CAP {
                    self.outbox.push(msg);
                }
                Ok(())
            }
        }
    }

    /// A message from a task while disconnected. An acknowledgement is
    /// dropped (see [`Driver::offline_command`]); control messages of the
    /// lost connection are stale.
    fn offline_internal(&mut self, msg: Internal) {
        match msg {
            Internal::Ack { group, seq } => {
                tracing::debug!(%group, seq, "acknowledgement dropped while disconnected");
            }
            // Catch-up after the reconnect delivers the clip again.
            Internal::Fetch { group, seq } => {
                tracing::debug!(%group, seq, "fetch dropped while disconnected");
            }
            Internal::Control { .. } | Internal::ControlEnded { .. } => {}
        }
    }

    /// Makes `session` the current connection.
    pub(crate) fn install(&self, session: &Session) {
        *lock(&self.inner.conn) = Some(ConnSlot {
            epoch: session.epoch,
            conn: session.conn.clone(),
        });
    }

    /// After a reconnect: join the groups again, send the reports kept
    /// while offline, and send again every finished clip not yet stored.
    async fn resume(&mut self, session: &mut Session) -> Result<(), ()> {
        let groups: Vec<String> = self.joined.iter().cloned().collect();
        for group in groups {
            let id = self.next_request;
            self.next_request += 1;
            self.pending.insert(
                id,
                Pending {
                    kind: PendingKind::Join(group.clone()),
                    reply: None,
                },
            );
            let msg = ControlMessage::Join {
                request_id: id,
                group,
            };
            if !matches!(self.write(session, &msg).await, Step::Continue) {
                return Err(());
            }
        }
        for msg in std::mem::take(&mut self.outbox) {
            if !matches!(self.write(session, &msg).await, Step::Continue) {
                return Err(());
            }
        }
        let to_send: Vec<_> = {
            let uploads = lock(&self.inner.uploads);
            uploads
                .values()
                .filter_map(|slot| {
                    let mut clip = lock(&slot.clip);
                    if clip.end.is_some()
                        && clip.failed.is_none()
                        && clip.sent_epoch != session.epoch
                    {
                        clip.sent_epoch = session.epoch;
                        Some(clip.snapshot())
                    } else {
                        None
                    }
                })
                .collect()
        };
        for snapshot in to_send {
            tokio::spawn(crate::talk::send_whole(
                self.inner.clone(),
                session.conn.clone(),
                snapshot,
            ));
        }
        Ok(())
    }

    /// Ends the client: fails the uploads still waiting, closes the
    /// connection politely.
    async fn shutdown(&mut self, session: Option<Session>, err: ClientError) {
        self.inner.closed.store(true, Ordering::Release);
        *lock(&self.inner.conn) = None;
        self.fail_pending();
        let slots: Vec<_> = lock(&self.inner.uploads).drain().collect();
        for (_, mut slot) in slots {
            lock(&slot.clip).failed.get_or_insert(err.clone());
            if let Some(done) = slot.done.take() {
                let _ = done.send(Err(err.clone()));
            }
        }
        if let Some(mut session) = session {
            // Let the acknowledgements already written reach the relay.
            let _ = session.control.finish();
            let _ =
                tokio::time::timeout(Duration::from_millis(500), session.control.stopped()).await;
            session
                .conn
                .close(quinn::VarInt::from_u32(ErrorCode::None.code()), b"bye");
            self.inner
                .emit(Event::Disconnected {
                    code: Some(ErrorCode::None),
                    reason: "closed by the client".into(),
                    reconnecting: false,
                })
                .await;
        }
    }
}
