//! The relay server: accept loop, connection limit, shutdown and the
//! handle tests and the simulator use to run a relay in-process.
//!
//! Model: mini-redis's `server.rs`. [`run`] takes the shutdown trigger as a
//! future; every connection task watches the same cancellation token; a
//! task tracker waits until all of them are gone before the store is
//! flushed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use ptt_protocol::{ErrorCode, Limits};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::{KeyRing, TokenIssuer, TokenVerifier, parse_public_key};
use crate::config::RelayConfig;
use crate::context::RelayContext;
use crate::delivery::code;
use crate::floor::{FloorArbiter, LocalFloor};
use crate::hub::Hub;
use crate::limits::HandshakeVerdict;
use crate::log::{GroupLog, LocalLog};
use crate::metrics::Metrics;
#[cfg(feature = "nats")]
use crate::nats::{Nats, NatsFloor, NatsLog, NatsStore};
use crate::store::{ClipStore, RedbStore, RetentionPolicy};
use crate::tls::{CertFiles, CertResolver, Identity, TransportTuning};

/// Why the relay could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The store could not be opened.
    #[error("store: {0}")]
    Store(#[from] crate::store::StoreError),
    /// The certificate could not be loaded or made.
    #[error("certificate: {0}")]
    Tls(#[from] crate::tls::TlsError),
    /// The token key could not be loaded or made, or is invalid.
    #[error("token key: {0}")]
    Key(String),
    /// The metrics listener could not start.
    #[error("metrics: {0}")]
    Metrics(#[from] crate::metrics::MetricsError),
    /// The web page's TCP listener could not be bound.
    #[error("cannot listen for the web page on {addr}: {error}")]
    WebBind {
        /// The address.
        addr: SocketAddr,
        /// The failure.
        error: std::io::Error,
    },
    /// A configuration value is invalid.
    #[error("configuration: {0}")]
    Config(String),
    /// The UDP socket could not be bound.
    #[error("cannot listen on {addr}: {error}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The failure.
        error: std::io::Error,
    },
}

/// A relay running in this process.
#[derive(Debug)]
pub struct RelayHandle {
    addr: SocketAddr,
    web_addr: Option<SocketAddr>,
    certs: Arc<CertResolver>,
    fingerprint: String,
    cert_pem: String,
    issuer: Option<TokenIssuer>,
    ctx: Arc<RelayContext>,
    task: tokio::task::JoinHandle<()>,
    /// The metrics listener: its address, its tasks and their stop signal
    /// (fired after the drain, so `/healthz` answers until the end).
    metrics_addr: Option<SocketAddr>,
    metrics_tasks: TaskTracker,
    metrics_stop: CancellationToken,
}

impl RelayHandle {
    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The address of the HTTP listener serving the browser page, if
    /// `web` was configured.
    pub fn web_addr(&self) -> Option<SocketAddr> {
        self.web_addr
    }

    /// The SHA-256 hashes (hex) browsers pass as `serverCertificateHashes`
    /// (empty with a real certificate).
    pub fn web_certificate_hashes(&self) -> Vec<String> {
        self.certs.certificate_hashes()
    }

    /// SHA-256 of its certificate at start, 64 hex digits.
    pub fn cert_fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// SHA-256 of the certificate it presents now (after reloads).
    pub fn current_cert_fingerprint(&self) -> String {
        self.certs.fingerprint()
    }

    /// Its certificate as PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Issues a token the relay accepts; `None` when the relay was started
    /// with an external verification key (`token_public_key`), whose
    /// signing half it does not have.
    pub fn issue_token(
        &self,
        user: &str,
        ttl: Duration,
        admin: bool,
        emergency: bool,
    ) -> Option<String> {
        self.issuer
            .as_ref()
            .map(|issuer| issuer.issue(user, ttl, admin, emergency))
    }

    /// The store, for tests that set up groups directly.
    pub fn store(&self) -> &Arc<dyn ClipStore> {
        &self.ctx.store
    }

    /// The address of the metrics listener, if one was configured.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// Connected sessions.
    pub fn session_count(&self) -> usize {
        self.ctx.hub.session_count()
    }

    /// The shared context (hub, log, floor), for tests that look inside.
    pub fn context(&self) -> &Arc<RelayContext> {
        &self.ctx
    }

    /// Drains and stops: new connections are refused, clips in flight
    /// finish within the grace period, every task the relay started ends,
    /// and the store is closed (its directory can be opened again) when
    /// this returns.
    pub async fn shutdown(self) {
        self.ctx.shutdown.cancel();
        let _ = self.task.await;
        self.metrics_stop.cancel();
        self.metrics_tasks.close();
        self.metrics_tasks.wait().await;
        let RelayHandle { ctx, .. } = self;
        if let Err(ctx) = Arc::try_unwrap(ctx) {
            tracing::warn!(
                holders = Arc::strong_count(&ctx),
                "relay context still shared after shutdown"
            );
        }
    }
}

/// Opens the store, loads keys and certificate, binds, and serves until
/// [`RelayHandle::shutdown`].
pub async fn start(mut config: RelayConfig) -> Result<RelayHandle, StartError> {
    if let Some(address) = &config.goaway_address
        && (address.len() > ptt_protocol::message::MAX_ADDRESS_LEN || !address.contains(':'))
    {
        return Err(StartError::Config(format!(
            "goaway_address {address:?} is not host:port of at most {} bytes",
            ptt_protocol::message::MAX_ADDRESS_LEN
        )));
    }
    let backend = Backend::open(&mut config).await?;
    let (identity, cert_files) = match (&config.cert, &config.key) {
        (Some(cert), Some(key)) => (
            Identity::from_pem_files(cert, key)?,
            Some(CertFiles::new(cert, key)),
        ),
        _ => {
            tracing::warn!(
                dir = %config.data_dir.display(),
                "NO CERTIFICATE CONFIGURED: using a self-signed DEVELOPMENT certificate for \
                 localhost; clients must pin its fingerprint. Set `cert` and `key` in production."
            );
            (Identity::load_or_create_dev(&config.data_dir)?, None)
        }
    };
    let (verifier, issuer, key_ring) = token_keys(&config)?;
    let fingerprint = identity.fingerprint();
    let cert_pem = identity.leaf_pem();
    let certs = Arc::new(CertResolver::new(
        &identity,
        cert_files.is_none(),
        SystemTime::now(),
    )?);
    let mut server_config = crate::tls::server_config(
        certs.clone(),
        &TransportTuning {
            idle_timeout: config.idle_timeout,
            max_uni_streams: config.max_streams_per_connection,
        },
    )?;
    server_config.migration(config.allow_migration);
    let bind_error = |error| StartError::Bind {
        addr: config.listen,
        error,
    };
    let socket = crate::net::udp_socket(config.listen).map_err(bind_error)?;
    let endpoint = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(server_config),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(bind_error)?;
    let addr = endpoint.local_addr().map_err(|error| StartError::Bind {
        addr: config.listen,
        error,
    })?;
    let web = match config.web {
        Some(web) => Some(
            crate::web::http::bind(web, addr.port(), certs.clone())
                .await
                .map_err(|error| StartError::WebBind { addr: web, error })?,
        ),
        None => None,
    };
    let web_addr = web.as_ref().map(|site| site.addr());
    let media = match config.media_addr() {
        Some(media) => Some(
            crate::media::MediaPlane::bind(media)
                .map_err(|error| StartError::Bind { addr: media, error })?,
        ),
        None => None,
    };
    let limits = Limits {
        max_clip_ms: config.max_clip.as_millis().min(u128::from(u32::MAX)) as u32,
        max_clip_bytes: config.max_clip_bytes,
        max_frame_bytes: config.max_frame_bytes,
        max_concurrent_clips: config.max_concurrent_clips,
        clips_per_minute: config.clips_per_minute,
        idle_timeout_ms: config.idle_timeout.as_millis().min(u128::from(u32::MAX)) as u32,
    };
    let (store, log) = (backend.store(), backend.log());
    let backend_ready = backend.readiness();
    let hub = Hub::new(log.clone(), store.clone());
    let shutdown = CancellationToken::new();
    let (floor, floor_driver): (Arc<dyn FloorArbiter>, FloorDriver) = match backend {
        Backend::Local { .. } => {
            let floor = Arc::new(LocalFloor::new(hub.clone()));
            (floor.clone(), Box::pin(floor.run(shutdown.clone())))
        }
        #[cfg(feature = "nats")]
        Backend::Nats { nats, .. } => {
            let floor = Arc::new(NatsFloor::new(nats, hub.clone()));
            (floor.clone(), Box::pin(floor.run(shutdown.clone())))
        }
    };
    let user_frames =
        crate::limits::FramesPerUser::new(config.user_frames_per_second, config.user_frames_burst);
    let ctx = Arc::new(RelayContext {
        hub,
        log,
        floor,
        store,
        verifier,
        config,
        limits,
        shutdown,
        user_clips: Default::default(),
        media,
        user_frames,
    });
    let metrics_tasks = TaskTracker::new();
    let metrics_stop = CancellationToken::new();
    let metrics_addr = match ctx.config.metrics {
        Some(addr) => {
            let draining = ctx.shutdown.clone();
            let ready: crate::metrics::Readiness =
                Arc::new(move || !draining.is_cancelled() && backend_ready());
            let bound =
                crate::metrics::serve(addr, ready, metrics_stop.clone(), &metrics_tasks).await?;
            tracing::info!(addr = %bound, "metrics, /healthz and /readyz over HTTP");
            Some(bound)
        }
        None => None,
    };
    let reload = Reload {
        certificate: certs.clone(),
        cert_files,
        key_ring,
    };
    let task = tokio::spawn(serve(
        endpoint,
        ctx.clone(),
        floor_driver,
        certs.clone(),
        web,
        reload,
    ));
    Ok(RelayHandle {
        metrics_addr,
        metrics_tasks,
        metrics_stop,
        addr,
        web_addr,
        certs,
        fingerprint,
        cert_pem,
        issuer,
        ctx,
        task,
    })
}

/// The token verifier (every accepted key), the issuer of the current key
/// (unless the relay verifies another issuer's tokens) and the data
/// directory's key ring.
fn token_keys(
    config: &RelayConfig,
) -> Result<(TokenVerifier, Option<TokenIssuer>, KeyRing), StartError> {
    let key_error = |e: crate::auth::KeyError| StartError::Key(e.to_string());
    let (verifier, mut issuer) = match &config.token_public_key {
        Some(key) => (
            TokenVerifier::from_base64(key).ok_or_else(|| {
                StartError::Key("token_public_key is not a base64 Ed25519 key".into())
            })?,
            None,
        ),
        None => {
            let issuer = TokenIssuer::load_or_create(&config.data_dir.join("token.key"))
                .map_err(key_error)?;
            (issuer.verifier(), Some(issuer))
        }
    };
    for entry in &config.token_keys {
        let key = entry
            .split_once('=')
            .and_then(|(kid, key)| Some((kid.trim(), parse_public_key(key)?)))
            .filter(|(kid, _)| !kid.is_empty());
        let Some((kid, key)) = key else {
            return Err(StartError::Key(format!(
                "token_keys entry {entry:?} is not KID=base64url-public-key"
            )));
        };
        verifier.add_key(kid, key);
    }
    let ring = KeyRing::new(&config.data_dir);
    verifier.set_ring(ring.public_keys().map_err(key_error)?);
    if issuer.is_some()
        && let Some(current) = ring.current_issuer().map_err(key_error)?
    {
        issuer = Some(current);
    }
    Ok((verifier, issuer, ring))
}

/// The floor arbiter's driver (its timer, or its watch), run by the
/// server's task tracker.
type FloorDriver = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

/// The seams' implementations: the embedded store, or NATS JetStream.
enum Backend {
    /// One node, the redb store in the data directory.
    Local {
        store: Arc<RedbStore>,
        log: Arc<LocalLog>,
    },
    /// One of several nodes on NATS (`[cluster]`).
    #[cfg(feature = "nats")]
    Nats {
        nats: Arc<Nats>,
        store: Arc<NatsStore>,
        log: Arc<NatsLog>,
    },
}

impl Backend {
    /// Opens the backend the configuration asks for. On NATS, clips are
    /// bounded to what one message carries: `max_clip_bytes` is lowered
    /// (with a warning) if the servers' `max_payload` is smaller.
    async fn open(config: &mut RelayConfig) -> Result<Backend, StartError> {
        if !config.cluster.enabled() {
            let cache = usize::try_from(config.store_cache_mib.saturating_mul(1 << 20))
                .unwrap_or(usize::MAX);
            let store = Arc::new(RedbStore::open_with_cache(&config.data_dir, cache)?);
            let log = Arc::new(LocalLog::new(store.clone()));
            return Ok(Backend::Local { store, log });
        }
        Backend::open_nats(config).await
    }

    /// A cluster node is asked for, but this relay was built without NATS.
    #[cfg(not(feature = "nats"))]
    async fn open_nats(_config: &mut RelayConfig) -> Result<Backend, StartError> {
        Err(crate::store::StoreError::Backend(
            "[cluster] asks for NATS, but this relay was built without the `nats` feature".into(),
        )
        .into())
    }

    /// Connects to NATS as one of several nodes.
    #[cfg(feature = "nats")]
    async fn open_nats(config: &mut RelayConfig) -> Result<Backend, StartError> {
        let nats = Nats::connect(&config.cluster, retention_policy(config)).await?;
        let max_frames = (config.max_clip.as_millis() as usize + 5_000) / 10;
        let fits = nats.max_clip_bytes(max_frames);
        if (config.max_clip_bytes as usize) > fits {
            tracing::warn!(
                configured = config.max_clip_bytes,
                fits,
                "max_clip_bytes lowered so a clip fits one NATS message \
                 (raise the servers' max_payload to keep it)"
            );
            config.max_clip_bytes = fits as u32;
        }
        let log = Arc::new(NatsLog::new(nats.clone()));
        let store = Arc::new(NatsStore::new(nats.clone(), (*log).clone()));
        tracing::info!(servers = ?config.cluster.nats, node = %format_args!("{:016x}", nats.node()), "cluster node on NATS JetStream");
        Ok(Backend::Nats { nats, store, log })
    }

    fn store(&self) -> Arc<dyn ClipStore> {
        match self {
            Backend::Local { store, .. } => store.clone(),
            #[cfg(feature = "nats")]
            Backend::Nats { store, .. } => store.clone(),
        }
    }

    fn log(&self) -> Arc<dyn GroupLog> {
        match self {
            Backend::Local { log, .. } => log.clone(),
            #[cfg(feature = "nats")]
            Backend::Nats { log, .. } => log.clone(),
        }
    }

    /// Whether the backend can serve now, for `/readyz`: the embedded
    /// store is open as long as the relay runs; a cluster node must be
    /// connected to NATS.
    fn readiness(&self) -> crate::metrics::Readiness {
        match self {
            Backend::Local { .. } => Arc::new(|| true),
            #[cfg(feature = "nats")]
            Backend::Nats { nats, .. } => {
                let nats = nats.clone();
                Arc::new(move || nats.reachable())
            }
        }
    }
}

/// The retention policy of the configuration.
fn retention_policy(config: &RelayConfig) -> RetentionPolicy {
    RetentionPolicy {
        max_age_ms: config.retention_max_age.as_millis() as u64,
        max_clips_per_group: config.retention_max_clips,
    }
}

/// Runs a relay until `shutdown` completes, then drains (mini-redis's
/// `server::run`).
pub async fn run(config: RelayConfig, shutdown: impl Future) -> Result<(), StartError> {
    let handle = start(config).await?;
    tracing::info!(addr = %handle.addr(), "relay listening");
    shutdown.await;
    tracing::info!("shutting down: draining clips in flight");
    handle.shutdown().await;
    Ok(())
}

/// The accept loop, then the drain: every task the relay started is
/// owned by `tracker` (sessions, the floor's timer, retention) or by the
/// hub (group feeds), and each is waited for before the log is closed.
async fn serve(
    endpoint: quinn::Endpoint,
    ctx: Arc<RelayContext>,
    floor_driver: FloorDriver,
    certs: Arc<CertResolver>,
    web: Option<crate::web::http::Site>,
    reload: Reload,
) {
    let tracker = TaskTracker::new();
    let next_id = AtomicU64::new(1);
    let per_ip = Arc::new(crate::limits::ConnectionsPerIp::default());
    let mut per_ip_handshakes =
        crate::limits::HandshakesPerIp::new(ctx.config.handshakes_per_ip_per_second);
    let mut handshakes = crate::limits::HandshakeRate::new(
        ctx.config.handshakes_per_second,
        std::time::Instant::now(),
    );
    tracker.spawn(retention_loop(ctx.clone()));
    tracker.spawn(reload_loop(ctx.clone(), reload));
    tracker.spawn(floor_driver);
    tracker.spawn(crate::web::cert::renew_loop(certs, ctx.shutdown.clone()));
    if let Some(site) = web {
        tracker.spawn(site.serve(ctx.shutdown.clone()));
    }
    if let Some(media) = &ctx.media {
        tracker.spawn(media.clone().run(ctx.shutdown.clone()));
    }
    loop {
        let incoming = tokio::select! {
            _ = ctx.shutdown.cancelled() => break,
            incoming = endpoint.accept() => match incoming {
                Some(incoming) => incoming,
                None => break,
            },
        };
        // Count connections still handshaking too: the tracker holds
        // every connection task.
        if tracker.len() > ctx.config.max_connections {
            tracing::warn!(addr = %incoming.remote_address(), "connection limit reached");
            metrics::counter!("ptt_connections_refused_total", "reason" => "max_connections")
                .increment(1);
            incoming.refuse();
            continue;
        }
        // One address's handshakes: past its rate it must validate, and
        // validated past its rate it is refused.
        let now = std::time::Instant::now();
        let validated = incoming.remote_address_validated();
        match per_ip_handshakes.check(incoming.remote_address().ip(), validated, now) {
            HandshakeVerdict::Admit => {}
            HandshakeVerdict::Retry if incoming.may_retry() => {
                metrics::counter!("ptt_handshake_retries_total").increment(1);
                if incoming.retry().is_err() {
                    tracing::debug!("retry impossible");
                }
                continue;
            }
            HandshakeVerdict::Retry | HandshakeVerdict::Refuse => {
                metrics::counter!("ptt_connections_refused_total", "reason" => "handshake_rate_per_ip")
                    .increment(1);
                incoming.refuse();
                continue;
            }
        }
        // Under a burst of new handshakes, an address that has not proved
        // it receives there (a spoofed flood cannot) gets a Retry first.
        if !incoming.remote_address_validated() && incoming.may_retry() && !handshakes.admit(now) {
            metrics::counter!("ptt_handshake_retries_total").increment(1);
            if incoming.retry().is_err() {
                tracing::debug!("retry impossible");
            }
            continue;
        }
        let slot = match ctx.config.max_connections_per_ip {
            0 => None,
            max => match per_ip.acquire(incoming.remote_address().ip(), max) {
                Some(slot) => Some(slot),
                None => {
                    tracing::info!(addr = %incoming.remote_address(), "per-address connection limit reached");
                    metrics::counter!("ptt_connections_refused_total", "reason" => "per_ip")
                        .increment(1);
                    incoming.refuse();
                    continue;
                }
            },
        };
        let id = next_id.fetch_add(1, Ordering::Relaxed);
        Metrics::get().connections_accepted.increment(1);
        let session = crate::session::run(incoming, ctx.clone(), id);
        tracker.spawn(async move {
            // The address's place is given back when the session ends.
            let _slot = slot;
            session.await
        });
    }
    // Drain: refuse new connections (CONNECTION_REFUSED) while the
    // sessions finish their clips in flight.
    tracker.close();
    let grace = ctx.config.shutdown_grace + Duration::from_secs(5);
    let drained = tokio::time::timeout(grace, async {
        let mut wait = std::pin::pin!(tracker.wait());
        loop {
            tokio::select! {
                _ = &mut wait => return,
                incoming = endpoint.accept() => match incoming {
                    Some(incoming) => {
                        Metrics::get().refused_shutdown.increment(1);
                        incoming.refuse();
                    }
                    None => {
                        wait.as_mut().await;
                        return;
                    }
                },
            }
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!("sessions did not finish within the grace period");
    }
    ctx.hub.close().await;
    if let Err(e) = ctx.log.close().await {
        tracing::error!(error = %e, "closing the group log failed");
    }
    if let Err(e) = ctx.store.flush().await {
        tracing::error!(error = %e, "final store flush failed");
    }
    endpoint.close(code(ErrorCode::ShuttingDown), b"relay shutting down");
    let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
    tracing::info!("relay stopped");
}

/// What [`reload_loop`] watches.
struct Reload {
    certificate: Arc<CertResolver>,
    /// The PEM files, when the relay was given some.
    cert_files: Option<CertFiles>,
    /// The token keys in the data directory.
    key_ring: KeyRing,
}

/// Checks the certificate files every `reload_interval` and presents a
/// changed, valid pair from the next handshake on; a bad pair is logged
/// and the old certificate kept. Reads the data directory's token keys
/// again, so that a key rotated in (or retired) takes effect.
async fn reload_loop(ctx: Arc<RelayContext>, mut reload: Reload) {
    let every = ctx.config.reload_interval;
    if every.is_zero() {
        return;
    }
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Some(files) = &mut reload.cert_files {
            match files.check(&reload.certificate) {
                Ok(false) => {}
                Ok(true) => tracing::info!(
                    fingerprint = %reload.certificate.fingerprint(),
                    "certificate reloaded; new connections get the new one"
                ),
                Err(e) => tracing::error!(
                    error = %e,
                    "the changed certificate files are not usable; keeping the old certificate"
                ),
            }
        }
        match reload.key_ring.public_keys() {
            Ok(keys) => {
                if ctx.verifier.set_ring(keys) {
                    tracing::info!(keys = ?ctx.verifier.key_ids(), "token keys reloaded");
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot read the token keys; keeping the old ones")
            }
        }
    }
}

/// Applies the retention policy at start and then every minute.
async fn retention_loop(ctx: Arc<RelayContext>) {
    let policy = retention_policy(&ctx.config);
    if policy.max_age_ms == 0 && policy.max_clips_per_group == 0 {
        return;
    }
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    loop {
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = crate::auth::unix_millis(SystemTime::now());
        match ctx.store.apply_retention(policy, now).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(deleted = n, "retention"),
            Err(e) => tracing::warn!(error = %e, "retention failed"),
        }
    }
}
