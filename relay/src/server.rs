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

use crate::auth::{TokenIssuer, TokenVerifier};
use crate::config::RelayConfig;
use crate::context::RelayContext;
use crate::delivery::code;
use crate::floor::LocalFloor;
use crate::hub::Hub;
use crate::log::{GroupLog, LocalLog};
use crate::metrics::Metrics;
use crate::store::{ClipStore, RedbStore, RetentionPolicy};
use crate::tls::{Identity, TransportTuning};
use crate::web::cert::CertResolver;

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
    fingerprint: String,
    cert_pem: String,
    issuer: Option<TokenIssuer>,
    ctx: Arc<RelayContext>,
    floor: Arc<LocalFloor>,
    certs: Arc<CertResolver>,
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

    /// SHA-256 of its certificate, 64 hex digits.
    pub fn cert_fingerprint(&self) -> &str {
        &self.fingerprint
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
        let RelayHandle { ctx, floor, .. } = self;
        drop(floor);
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
pub async fn start(config: RelayConfig) -> Result<RelayHandle, StartError> {
    let redb = Arc::new(RedbStore::open(&config.data_dir)?);
    let store: Arc<dyn ClipStore> = redb.clone();
    let (identity, dev) = match (&config.cert, &config.key) {
        (Some(cert), Some(key)) => (Identity::from_pem_files(cert, key)?, false),
        _ => (Identity::load_or_create_dev(&config.data_dir)?, true),
    };
    let certs = Arc::new(CertResolver::new(&identity, dev, SystemTime::now())?);
    let (verifier, issuer) = match &config.token_public_key {
        Some(key) => (
            TokenVerifier::from_base64(key).ok_or_else(|| {
                StartError::Key("token_public_key is not a base64 Ed25519 key".into())
            })?,
            None,
        ),
        None => {
            let issuer = TokenIssuer::load_or_create(&config.data_dir.join("token.key"))
                .map_err(|e| StartError::Key(e.to_string()))?;
            (issuer.verifier(), Some(issuer))
        }
    };
    let fingerprint = identity.fingerprint();
    let cert_pem = identity.leaf_pem();
    let server_config = crate::tls::server_config(
        certs.clone(),
        &TransportTuning {
            idle_timeout: config.idle_timeout,
            max_uni_streams: config.max_streams_per_connection,
        },
    )?;
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
    let limits = Limits {
        max_clip_ms: config.max_clip.as_millis().min(u128::from(u32::MAX)) as u32,
        max_clip_bytes: config.max_clip_bytes,
        max_frame_bytes: config.max_frame_bytes,
        max_concurrent_clips: config.max_concurrent_clips,
        clips_per_minute: config.clips_per_minute,
        idle_timeout_ms: config.idle_timeout.as_millis().min(u128::from(u32::MAX)) as u32,
    };
    let log: Arc<dyn GroupLog> = Arc::new(LocalLog::new(redb));
    let hub = Hub::new(log.clone(), store.clone());
    let floor = Arc::new(LocalFloor::new(hub.clone()));
    let ctx = Arc::new(RelayContext {
        hub,
        log,
        floor: floor.clone(),
        store,
        verifier,
        config,
        limits,
        shutdown: CancellationToken::new(),
    });
    let metrics_tasks = TaskTracker::new();
    let metrics_stop = CancellationToken::new();
    let metrics_addr = match ctx.config.metrics {
        Some(addr) => {
            let draining = ctx.shutdown.clone();
            let ready: crate::metrics::Readiness = Arc::new(move || !draining.is_cancelled());
            let bound =
                crate::metrics::serve(addr, ready, metrics_stop.clone(), &metrics_tasks).await?;
            tracing::info!(addr = %bound, "metrics, /healthz and /readyz over HTTP");
            Some(bound)
        }
        None => None,
    };
    let task = tokio::spawn(serve(
        endpoint,
        ctx.clone(),
        floor.clone(),
        certs.clone(),
        web,
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
        floor,
        task,
    })
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
    floor: Arc<LocalFloor>,
    certs: Arc<CertResolver>,
    web: Option<crate::web::http::Site>,
) {
    let tracker = TaskTracker::new();
    let next_id = AtomicU64::new(1);
    tracker.spawn(retention_loop(ctx.clone()));
    tracker.spawn(floor.run(ctx.shutdown.clone()));
    tracker.spawn(crate::web::cert::renew_loop(certs, ctx.shutdown.clone()));
    if let Some(site) = web {
        tracker.spawn(site.serve(ctx.shutdown.clone()));
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
            Metrics::get().refused_limit.increment(1);
            incoming.refuse();
            continue;
        }
        let id = next_id.fetch_add(1, Ordering::Relaxed);
        Metrics::get().connections_accepted.increment(1);
        tracker.spawn(crate::session::run(incoming, ctx.clone(), id));
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

/// Applies the retention policy at start and then every minute.
async fn retention_loop(ctx: Arc<RelayContext>) {
    let policy = RetentionPolicy {
        max_age_ms: ctx.config.retention_max_age.as_millis() as u64,
        max_clips_per_group: ctx.config.retention_max_clips,
    };
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
