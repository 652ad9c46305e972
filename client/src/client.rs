//! The application's handle on a relay connection.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ptt_protocol::{
    ClipFormat, ClipSummary, ControlMessage, GroupMode, GroupSummary, Limits, MemberState, Welcome,
    is_valid_id,
};
use tokio::sync::{mpsc, oneshot};

use crate::config::ClientConfig;
use crate::dedup::DedupCache;
use crate::driver::{Command, Driver, PendingKind, establish};
use crate::error::ClientError;
use crate::event::{EventTx, Events};
use crate::shared::{ClientStats, Inner, StoredClip, lock};
use crate::talk::{ClipParams, Talk};

/// The answer to [`Client::join`]. Catch-up clips follow as events, then
/// [`crate::Event::CaughtUp`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinInfo {
    /// The group.
    pub group: String,
    /// Walkie (floor control) or notes.
    pub mode: GroupMode,
    /// Every clip up to this sequence number was acknowledged before.
    pub cursor: u64,
    /// The newest stored clip; catch-up sends `cursor + 1 ..= last_seq`.
    pub last_seq: u64,
    /// The group's live latency budget, ms: live frames may arrive in
    /// bursts this far apart (0: each frame as the talker sends it).
    pub live_budget_ms: u32,
}

/// The floor of a walkie group, granted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FloorGrant {
    /// The group.
    pub group: String,
    /// How long it may be held, in ms.
    pub max_ms: u32,
    /// When the grant arrived; the floor is lost at `granted_at + max_ms`.
    pub granted_at: Instant,
}

/// A connection to a relay, with automatic reconnection when configured.
///
/// Cheap to clone; every clone drives the same connection. The connection
/// is closed by [`Client::close`] or when every clone is dropped.
#[derive(Clone)]
pub struct Client {
    pub(crate) inner: Arc<Inner>,
    commands: mpsc::Sender<Command>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("addr", &self.inner.config.addr)
            .field("user", &self.user())
            .field("connected", &self.is_connected())
            .finish()
    }
}

impl Client {
    /// Connects on a new UDP endpoint of its own, says hello, and returns
    /// once the relay welcomed us.
    pub async fn connect(config: ClientConfig) -> Result<(Client, Events), ClientError> {
        let bind: SocketAddr = if config.addr.is_ipv6() {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        };
        let endpoint = quinn::Endpoint::client(bind)?;
        Client::connect_with_endpoint(endpoint, config).await
    }

    /// Connects through `endpoint`, which may carry many clients' connections
    /// (a simulator puts hundreds of clients on a few sockets).
    pub async fn connect_with_endpoint(
        endpoint: quinn::Endpoint,
        config: ClientConfig,
    ) -> Result<(Client, Events), ClientError> {
        let quinn_config = crate::tls::quinn_config(&config)?;
        let (events_tx, events_rx) = mpsc::channel(config.event_capacity.max(1));
        let events_tx = match &config.event_sink {
            // The channel's sender goes: `Events` ends at once.
            Some(sink) => {
                drop(events_tx);
                EventTx::Sink(sink.clone())
            }
            None => EventTx::Channel(events_tx),
        };
        let (internal_tx, internal_rx) = mpsc::channel(1024);
        let (commands_tx, commands_rx) = mpsc::channel(256);
        let inner = Arc::new(Inner {
            token: Mutex::new(config.token.clone()),
            relay_addr: Mutex::new(config.addr),
            dedup: Mutex::new(DedupCache::new(config.dedup_capacity)),
            config,
            endpoint,
            quinn_config,
            conn: Mutex::new(None),
            welcome: Mutex::new(Welcome {
                version: 0,
                user: String::new(),
                server_time_ms: 0,
                limits: Limits {
                    max_clip_ms: 0,
                    max_clip_bytes: 0,
                    max_frame_bytes: 0,
                    max_concurrent_clips: 0,
                    clips_per_minute: 0,
                    idle_timeout_ms: 0,
                },
            }),
            uploads: Mutex::new(Default::default()),
            fetching: Mutex::new(Default::default()),
            events: events_tx,
            internal: internal_tx,
            stats: Default::default(),
            closed: AtomicBool::new(false),
            media_inbox: Mutex::new(None),
        });
        let session = establish(&inner, 1).await?;
        let driver = Driver::new(inner.clone(), commands_rx, internal_rx, 2);
        driver.install(&session);
        tokio::spawn(driver.run(session));
        Ok((
            Client {
                inner,
                commands: commands_tx,
            },
            Events::new(events_rx),
        ))
    }

    /// The relay's latest welcome (user id, limits, clock).
    pub fn welcome(&self) -> Welcome {
        lock(&self.inner.welcome).clone()
    }

    /// Our user id, as the relay authenticated it.
    pub fn user(&self) -> String {
        lock(&self.inner.welcome).user.clone()
    }

    /// Whether a connection is up right now.
    pub fn is_connected(&self) -> bool {
        self.inner.current().is_some()
    }

    /// Whether the client was closed or gave up reconnecting.
    pub fn is_closed(&self) -> bool {
        self.inner.closed.load(Ordering::Acquire)
    }

    /// Counters of what the client did.
    pub fn stats(&self) -> ClientStats {
        self.inner.stats.snapshot()
    }

    /// The underlying QUIC connection, if up (for statistics such as RTT).
    pub fn connection(&self) -> Option<quinn::Connection> {
        self.inner.current().map(|slot| slot.conn)
    }

    /// Replaces the token used by the next reconnection (tokens expire).
    pub fn set_token(&self, token: impl Into<String>) {
        *lock(&self.inner.token) = token.into();
    }

    /// Clips sent but not yet confirmed stored.
    pub fn unconfirmed_clips(&self) -> usize {
        lock(&self.inner.uploads).len()
    }

    pub(crate) async fn request(
        &self,
        kind: PendingKind,
        timeout: Duration,
        build: impl FnOnce(u64) -> ControlMessage + Send + 'static,
    ) -> Result<ControlMessage, ClientError> {
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(Command::Request {
                build: Box::new(build),
                kind,
                reply,
            })
            .await
            .map_err(|_| ClientError::Closed)?;
        match tokio::time::timeout(timeout, rx).await {
            Err(_) => Err(ClientError::Timeout),
            Ok(Err(_)) => Err(ClientError::Closed),
            Ok(Ok(Err(e))) => Err(e),
            Ok(Ok(Ok(ControlMessage::Error { code, message, .. }))) => {
                Err(ClientError::Relay { code, message })
            }
            Ok(Ok(Ok(msg))) => Ok(msg),
        }
    }

    pub(crate) async fn simple_request(
        &self,
        kind: PendingKind,
        build: impl FnOnce(u64) -> ControlMessage + Send + 'static,
    ) -> Result<(), ClientError> {
        match self
            .request(kind, self.inner.config.request_timeout, build)
            .await?
        {
            ControlMessage::Ok { .. } => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    async fn send(&self, msg: ControlMessage) -> Result<(), ClientError> {
        self.commands
            .send(Command::Send(msg))
            .await
            .map_err(|_| ClientError::Closed)
    }

    /// Starts receiving a group: the clips after our cursor arrive as
    /// history, then [`crate::Event::CaughtUp`], then live clips. The group
    /// is joined again automatically after a reconnect.
    pub async fn join(&self, group: &str) -> Result<JoinInfo, ClientError> {
        let group = checked(group)?;
        let g = group.clone();
        match self
            .request(
                PendingKind::Join(group.clone()),
                self.inner.config.request_timeout,
                move |request_id| ControlMessage::Join {
                    request_id,
                    group: g,
                },
            )
            .await?
        {
            ControlMessage::Joined {
                group,
                mode,
                cursor,
                last_seq,
                live_budget_ms,
                ..
            } => Ok(JoinInfo {
                group,
                mode,
                cursor,
                last_seq,
                live_budget_ms,
            }),
            other => Err(unexpected(other)),
        }
    }

    /// Stops receiving a group on this connection.
    pub async fn leave(&self, group: &str) -> Result<(), ClientError> {
        let group = checked(group)?;
        let g = group.clone();
        self.simple_request(PendingKind::Leave(group), move |request_id| {
            ControlMessage::Leave {
                request_id,
                group: g,
            }
        })
        .await
    }

    /// Asks for the floor of a walkie group. Denied is
    /// [`ClientError::FloorDenied`] with the holder.
    pub async fn request_floor(
        &self,
        group: &str,
        emergency: bool,
    ) -> Result<FloorGrant, ClientError> {
        let group = checked(group)?;
        match self
            .request(
                PendingKind::Plain,
                self.inner.config.request_timeout,
                move |request_id| ControlMessage::FloorRequest {
                    request_id,
                    group,
                    emergency,
                },
            )
            .await?
        {
            ControlMessage::FloorGranted { group, max_ms, .. } => Ok(FloorGrant {
                group,
                max_ms,
                granted_at: Instant::now(),
            }),
            ControlMessage::FloorDenied { holder, .. } => Err(ClientError::FloorDenied { holder }),
            other => Err(unexpected(other)),
        }
    }

    /// Gives the floor back without sending a clip (a clip's end releases
    /// it by itself).
    pub async fn release_floor(&self, group: &str) -> Result<(), ClientError> {
        let group = checked(group)?;
        self.send(ControlMessage::FloorRelease { group }).await
    }

    /// Starts a clip: the header goes out now (in a walkie group it is
    /// also a floor request; a refusal arrives as
    /// [`ClientError::ClipRejected`] from the talk), then each
    /// [`Talk::send_frame`], then [`Talk::finish`].
    pub async fn talk(&self, group: &str, params: ClipParams) -> Result<Talk, ClientError> {
        if self.is_closed() {
            return Err(ClientError::Closed);
        }
        Talk::start(self.inner.clone(), group, &params).await
    }

    /// Starts a clip recorded as PCM at `input_rate` Hz with
    /// `input_channels` interleaved channels; the client encodes it to Opus
    /// with `encoder` settings (20 ms mono 24 kbit/s voice by default) and
    /// sends each packet as soon as it is complete.
    pub async fn talk_pcm(
        &self,
        group: &str,
        input_rate: u32,
        input_channels: u16,
        encoder: &crate::EncoderConfig,
        emergency: bool,
    ) -> Result<crate::PcmTalk, ClientError> {
        let encoder = crate::pcm::PcmTalk::encoder(input_rate, input_channels, encoder)?;
        let params = ClipParams {
            format: ClipFormat::Opus,
            sample_rate: input_rate,
            channels: encoder.channels() as u8,
            frame_ms: encoder.frame_duration().millis() as u8,
            emergency,
            ..ClipParams::default()
        };
        let talk = self.talk(group, params).await?;
        Ok(crate::PcmTalk::new(talk, encoder))
    }

    /// Sends a whole clip of Opus packets and waits until it is stored.
    pub async fn send_clip<I, F>(
        &self,
        group: &str,
        params: ClipParams,
        frames: I,
        waveform: impl Into<Bytes>,
    ) -> Result<StoredClip, ClientError>
    where
        I: IntoIterator<Item = F>,
        F: Into<Bytes>,
    {
        let mut talk = self.talk(group, params).await?;
        for frame in frames {
            talk.send_frame(frame).await?;
        }
        talk.finish(waveform).await
    }

    /// Uploads a WAV file for the relay to transcode to Opus (for clients
    /// that cannot encode), in pieces no larger than the relay's frame
    /// limit, and waits until it is stored.
    pub async fn upload_wav(
        &self,
        group: &str,
        wav: impl Into<Bytes>,
    ) -> Result<StoredClip, ClientError> {
        let wav: Bytes = wav.into();
        let (sample_rate, channels) = crate::wav::wav_format(&wav).ok_or_else(|| {
            ClientError::InvalidArgument("not a RIFF/WAVE file with a fmt chunk".into())
        })?;
        let params = ClipParams {
            format: ClipFormat::Wav,
            sample_rate,
            channels: channels.clamp(1, 2) as u8,
            frame_ms: 0,
            ..ClipParams::default()
        };
        let piece = match self.welcome().limits.max_frame_bytes {
            0 => 16 * 1024,
            n => (n as usize).min(16 * 1024),
        };
        let mut talk = self.talk(group, params).await?;
        let mut offset = 0;
        while offset < wav.len() {
            let end = (offset + piece).min(wav.len());
            talk.send_frame(wav.slice(offset..end)).await?;
            offset = end;
        }
        talk.finish(Bytes::new()).await
    }

    /// Acknowledges clip `seq` of `group` (done for us when
    /// [`ClientConfig::auto_ack`] is on): the relay moves our cursor and
    /// tells the talker it was delivered. The relay honours it only for a
    /// clip delivered on the current connection; while disconnected it is
    /// dropped, and the clip comes again after the reconnect (the client
    /// acknowledges that copy itself).
    pub async fn ack(&self, group: &str, seq: u64) -> Result<(), ClientError> {
        let group = checked(group)?;
        self.send(ControlMessage::DeliveryAck { group, seq }).await
    }

    /// Reports that the user listened to clip `seq`; the talker gets a
    /// played receipt.
    pub async fn played(&self, group: &str, seq: u64) -> Result<(), ClientError> {
        let group = checked(group)?;
        self.send(ControlMessage::Played { group, seq }).await
    }

    /// Asks for the group's last `count` stored clips again; they arrive as
    /// history clip events (even those received before), and the call
    /// returns how many the relay sent.
    pub async fn fetch_recent(&self, group: &str, count: u32) -> Result<u32, ClientError> {
        let group = checked(group)?;
        let g = group.clone();
        let timeout = self
            .inner
            .config
            .request_timeout
            .max(Duration::from_secs(60));
        match self
            .request(PendingKind::Fetch(group), timeout, move |request_id| {
                ControlMessage::FetchRecent {
                    request_id,
                    group: g,
                    count,
                }
            })
            .await?
        {
            ControlMessage::FetchDone { count, .. } => Ok(count),
            other => Err(unexpected(other)),
        }
    }

    /// Admin: creates a group.
    pub async fn create_group(&self, group: &str, mode: GroupMode) -> Result<(), ClientError> {
        let group = checked(group)?;
        self.simple_request(PendingKind::Plain, move |request_id| {
            ControlMessage::CreateGroup {
                request_id,
                group,
                mode,
            }
        })
        .await
    }

    /// Admin: adds `user` to `group`.
    pub async fn add_member(&self, group: &str, user: &str) -> Result<(), ClientError> {
        let (group, user) = (checked(group)?, checked(user)?);
        self.simple_request(PendingKind::Plain, move |request_id| {
            ControlMessage::AddMember {
                request_id,
                group,
                user,
            }
        })
        .await
    }

    /// Admin: removes `user` from `group`.
    pub async fn remove_member(&self, group: &str, user: &str) -> Result<(), ClientError> {
        let (group, user) = (checked(group)?, checked(user)?);
        self.simple_request(PendingKind::Plain, move |request_id| {
            ControlMessage::RemoveMember {
                request_id,
                group,
                user,
            }
        })
        .await
    }

    /// Admin: changes a group's mode.
    pub async fn set_mode(&self, group: &str, mode: GroupMode) -> Result<(), ClientError> {
        let group = checked(group)?;
        self.simple_request(PendingKind::Plain, move |request_id| {
            ControlMessage::SetMode {
                request_id,
                group,
                mode,
            }
        })
        .await
    }

    /// Admin: sets a group's live latency budget in ms (`None`: back to
    /// the relay's default).
    pub async fn set_live_budget(
        &self,
        group: &str,
        budget_ms: Option<u32>,
    ) -> Result<(), ClientError> {
        let group = checked(group)?;
        self.simple_request(PendingKind::Plain, move |request_id| {
            ControlMessage::SetLiveBudget {
                request_id,
                group,
                budget_ms,
            }
        })
        .await
    }

    /// The groups we belong to (every group, for an admin).
    pub async fn list_groups(&self) -> Result<Vec<GroupSummary>, ClientError> {
        match self
            .request(
                PendingKind::Plain,
                self.inner.config.request_timeout,
                |request_id| ControlMessage::ListGroups { request_id },
            )
            .await?
        {
            ControlMessage::GroupList { groups, .. } => Ok(groups),
            other => Err(unexpected(other)),
        }
    }

    /// The members of a group we belong to.
    pub async fn list_members(&self, group: &str) -> Result<Vec<String>, ClientError> {
        let group = checked(group)?;
        match self
            .request(
                PendingKind::Plain,
                self.inner.config.request_timeout,
                move |request_id| ControlMessage::ListMembers { request_id, group },
            )
            .await?
        {
            ControlMessage::MemberList { members, .. } => Ok(members),
            other => Err(unexpected(other)),
        }
    }

    /// Admin: a group's members with their cursor and last-seen time.
    pub async fn member_status(&self, group: &str) -> Result<Vec<MemberState>, ClientError> {
        let group = checked(group)?;
        match self
            .request(
                PendingKind::Plain,
                self.inner.config.request_timeout,
                move |request_id| ControlMessage::ListMemberStatus { request_id, group },
            )
            .await?
        {
            ControlMessage::MemberStatus { members, .. } => Ok(members),
            other => Err(unexpected(other)),
        }
    }

    /// Admin: summaries of up to `limit` stored clips with `seq >
    /// after_seq` (the relay answers at most 100 at a time).
    pub async fn list_clips(
        &self,
        group: &str,
        after_seq: u64,
        limit: u32,
    ) -> Result<Vec<ClipSummary>, ClientError> {
        let group = checked(group)?;
        match self
            .request(
                PendingKind::Plain,
                self.inner.config.request_timeout,
                move |request_id| ControlMessage::ListClips {
                    request_id,
                    group,
                    after_seq,
                    limit,
                },
            )
            .await?
        {
            ControlMessage::ClipList { clips, .. } => Ok(clips),
            other => Err(unexpected(other)),
        }
    }

    /// Admin: deletes stored clip `seq`; members get
    /// [`Event::ClipDeleted`](crate::Event::ClipDeleted).
    pub async fn delete_clip(&self, group: &str, seq: u64) -> Result<(), ClientError> {
        let group = checked(group)?;
        self.simple_request(PendingKind::Plain, move |request_id| {
            ControlMessage::DeleteClip {
                request_id,
                group,
                seq,
            }
        })
        .await
    }

    /// Asks for stored clip `seq` again (members and admins); it arrives
    /// as history clip events, and the call returns how many clips the
    /// relay sent (1).
    pub async fn fetch_clip(&self, group: &str, seq: u64) -> Result<u32, ClientError> {
        let group = checked(group)?;
        let g = group.clone();
        let timeout = self
            .inner
            .config
            .request_timeout
            .max(Duration::from_secs(60));
        match self
            .request(PendingKind::Fetch(group), timeout, move |request_id| {
                ControlMessage::FetchClip {
                    request_id,
                    group: g,
                    seq,
                }
            })
            .await?
        {
            ControlMessage::FetchDone { count, .. } => Ok(count),
            other => Err(unexpected(other)),
        }
    }

    /// Closes the connection (after flushing what was written) and ends the
    /// client; clips not yet confirmed stored fail with
    /// [`ClientError::Closed`].
    pub async fn close(&self) {
        let (done, rx) = oneshot::channel();
        if self.commands.send(Command::Close { done }).await.is_ok() {
            let _ = rx.await;
        }
    }
}

pub(crate) fn checked(id: &str) -> Result<String, ClientError> {
    if is_valid_id(id) {
        Ok(id.to_owned())
    } else {
        Err(ClientError::InvalidArgument(format!("invalid id {id:?}")))
    }
}

pub(crate) fn unexpected(msg: ControlMessage) -> ClientError {
    ClientError::Protocol(format!("unexpected reply {msg:?}"))
}
