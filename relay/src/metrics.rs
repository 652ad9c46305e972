//! Prometheus metrics, `/healthz` and `/readyz` on one HTTP listener
//! (`--metrics 127.0.0.1:9464`; off by default).
//!
//! The relay counts through the [`metrics`] crate; the Prometheus exporter
//! (`metrics-exporter-prometheus`) is installed as the process's global
//! recorder the first time a relay starts with a metrics listener, so
//! `metrics::counter!` anywhere in the process lands in the same page.
//! Without a listener nothing is installed and every handle is a no-op.
//!
//! Cost on the hot paths: the handles are registered once
//! ([`Metrics::get`], a `OnceLock`), so counting is an atomic add on a
//! pre-registered handle, no string formatting and no map lookup. Frames
//! and bytes are counted locally per clip (ingest) and per delivery, and
//! added once when the clip or delivery ends: a frame costs no shared
//! atomic at all. The frame relay latency is sampled: one frame in
//! [`LATENCY_SAMPLE`] per live delivery.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use metrics::{Counter, Gauge, Histogram, counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// One live frame in this many has its relay latency recorded.
pub const LATENCY_SAMPLE: usize = 16;

/// Why the metrics listener could not start.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The TCP address could not be bound.
    #[error("cannot listen on {addr}: {error}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The failure.
        error: std::io::Error,
    },
    /// The exporter could not be set up.
    #[error("metrics exporter: {0}")]
    Exporter(String),
}

/// Pre-registered handles of every metric the relay keeps.
#[derive(Debug)]
pub struct Metrics {
    /// Connection tasks alive (handshaking included).
    pub connections: Gauge,
    /// Connections accepted for a handshake.
    pub connections_accepted: Counter,
    /// Connections refused at the connection limit.
    pub refused_limit: Counter,
    /// Connections refused while draining.
    pub refused_shutdown: Counter,
    /// Clip uploads whose header was accepted.
    pub clips_started: Counter,
    /// Clips stored.
    pub clips_stored: Counter,
    /// Opus frames received from talkers.
    pub frames_in: Counter,
    /// Bytes of `ClipFrame` messages (framing included) received from
    /// talkers.
    pub bytes_in: Counter,
    /// Frames written to members (live, catch-up, fetch).
    pub frames_out: Counter,
    /// Bytes of `ClipFrame` messages (framing included) written to
    /// members.
    pub bytes_out: Counter,
    /// Of `frames_out`, live frames the talker's task wrote straight into
    /// a caught-up member's stream (no task wake of the member's own).
    pub live_frames_direct: Counter,
    /// Live deliveries cut because the member fell behind.
    pub live_cuts: Counter,
    /// Clips delivered from the store on catch-up or recovery.
    pub catchup_deliveries: Counter,
    /// Time to make a clip durable (`GroupLog::append`).
    pub store_commit_seconds: Histogram,
    /// Time from a frame reaching the relay to its write to a member
    /// (sampled, see [`LATENCY_SAMPLE`]).
    pub frame_relay_seconds: Histogram,
    /// Floor requests granted.
    pub floor_grants: Counter,
    /// Floor requests denied.
    pub floor_denials: Counter,
    /// Connections closed for exceeding the control-message rate.
    pub control_rate_limited: Counter,
    /// Sessions closed because their control-event queue overflowed.
    pub overflow_closed: Counter,
    /// Tasks alive in the relay's async runtime, read at each scrape (a
    /// leak shows as growth under steady load: `scripts/soak.sh`).
    pub runtime_tasks: Gauge,
}

static METRICS: OnceLock<Metrics> = OnceLock::new();
static EXPORTER: OnceLock<PrometheusHandle> = OnceLock::new();

impl Metrics {
    /// The handles, registered with the global recorder on first use.
    pub fn get() -> &'static Metrics {
        METRICS.get_or_init(Metrics::register)
    }

    fn register() -> Metrics {
        Metrics {
            connections: gauge!("ptt_connections"),
            connections_accepted: counter!("ptt_connections_accepted_total"),
            refused_limit: counter!("ptt_connections_refused_total", "reason" => "limit"),
            refused_shutdown: counter!("ptt_connections_refused_total", "reason" => "shutting_down"),
            clips_started: counter!("ptt_clips_started_total"),
            clips_stored: counter!("ptt_clips_stored_total"),
            frames_in: counter!("ptt_frames_in_total"),
            bytes_in: counter!("ptt_bytes_in_total"),
            frames_out: counter!("ptt_frames_out_total"),
            bytes_out: counter!("ptt_bytes_out_total"),
            live_frames_direct: counter!("ptt_live_frames_direct_total"),
            live_cuts: counter!("ptt_live_cuts_total"),
            catchup_deliveries: counter!("ptt_catchup_deliveries_total"),
            store_commit_seconds: histogram!("ptt_store_commit_seconds"),
            frame_relay_seconds: histogram!("ptt_frame_relay_seconds"),
            floor_grants: counter!("ptt_floor_grants_total"),
            floor_denials: counter!("ptt_floor_denials_total"),
            control_rate_limited: counter!("ptt_control_rate_limited_total"),
            overflow_closed: counter!("ptt_sessions_overflow_closed_total"),
            runtime_tasks: gauge!("ptt_runtime_alive_tasks"),
        }
    }
}

/// Counts a refused hello by its code (not a hot path: the label is
/// looked up per refusal).
pub fn auth_failure(code: ptt_protocol::ErrorCode) {
    counter!("ptt_auth_failures_total", "reason" => code_label(code)).increment(1);
}

/// Counts a refused upload by its code.
pub fn clip_rejected(code: ptt_protocol::ErrorCode) {
    counter!("ptt_clips_rejected_total", "reason" => code_label(code)).increment(1);
}

/// A code's name as a label value.
fn code_label(code: ptt_protocol::ErrorCode) -> &'static str {
    use ptt_protocol::ErrorCode as C;
    match code {
        C::None => "none",
        C::Protocol => "protocol",
        C::UnsupportedVersion => "unsupported_version",
        C::InvalidToken => "invalid_token",
        C::TokenExpired => "token_expired",
        C::AuthTimeout => "auth_timeout",
        C::NotMember => "not_member",
        C::NoSuchGroup => "no_such_group",
        C::Forbidden => "forbidden",
        C::FloorTaken => "floor_taken",
        C::TooLarge => "too_large",
        C::RateLimited => "rate_limited",
        C::TooManyClips => "too_many_clips",
        C::ClipTooLong => "clip_too_long",
        C::OutOfOrder => "out_of_order",
        C::SlowReceiver => "slow_receiver",
        C::ClipAborted => "clip_aborted",
        C::Duplicate => "duplicate",
        C::Internal => "internal",
        C::ShuttingDown => "shutting_down",
        C::GroupExists => "group_exists",
        C::TranscodeFailed => "transcode_failed",
        C::Preempted => "preempted",
        C::TooManyConnections => "too_many_connections",
        C::InvalidRequest => "invalid_request",
        C::NoSuchClip => "no_such_clip",
        _ => "other",
    }
}

/// Installs the Prometheus recorder as the process's global recorder (once
/// per process; later calls return the same handle).
pub fn install() -> Result<PrometheusHandle, MetricsError> {
    if let Some(handle) = EXPORTER.get() {
        return Ok(handle.clone());
    }
    let recorder = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full("ptt_store_commit_seconds".into()),
            &[
                0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0,
            ],
        )
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full("ptt_frame_relay_seconds".into()),
                &[
                    0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5,
                ],
            )
        })
        .map_err(|e| MetricsError::Exporter(e.to_string()))?
        .build_recorder();
    let handle = recorder.handle();
    if metrics::set_global_recorder(recorder).is_err() {
        return Err(MetricsError::Exporter(
            "another metrics recorder is installed in this process".into(),
        ));
    }
    if METRICS.get().is_some() {
        tracing::warn!("metrics were used before the exporter was installed; some stay at 0");
    }
    let handle = EXPORTER.get_or_init(|| handle).clone();
    Ok(handle)
}

/// What `/readyz` asks: whether the relay accepts connections and its
/// store is open.
pub type Readiness = Arc<dyn Fn() -> bool + Send + Sync>;

/// Binds `addr` and serves `/metrics`, `/healthz` and `/readyz` until
/// `shutdown`; the listener's tasks (and the exporter's upkeep) live in
/// `tracker`. Returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    ready: Readiness,
    shutdown: CancellationToken,
    tracker: &TaskTracker,
) -> Result<SocketAddr, MetricsError> {
    let handle = install()?;
    // Registered now, so a scrape lists every metric from the start.
    let _ = Metrics::get();
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|error| MetricsError::Bind { addr, error })?;
    let bound = listener
        .local_addr()
        .map_err(|error| MetricsError::Bind { addr, error })?;
    let upkeep = handle.clone();
    let stop = shutdown.clone();
    // Histograms buffer samples until drained: drain them every few
    // seconds even if nobody scrapes.
    tracker.spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => upkeep.run_upkeep(),
            }
        }
    });
    let connections = tracker.clone();
    tracker.spawn(async move {
        loop {
            let (stream, _) = tokio::select! {
                _ = shutdown.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        tracing::debug!(error = %e, "metrics accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            // A small fixed number of scrapers is expected; each request
            // is answered at once and the connection bounded in time.
            if connections.len() > 64 {
                continue;
            }
            let handle = handle.clone();
            let ready = ready.clone();
            let stop = shutdown.clone();
            connections.spawn(async move {
                let service = hyper::service::service_fn(move |request: Request<_>| {
                    let response = route(&request, &handle, &ready);
                    async move { Ok::<_, std::convert::Infallible>(response) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = tokio::time::timeout(Duration::from_secs(30), conn) => {}
                }
            });
        }
    });
    Ok(bound)
}

fn route(
    request: &Request<hyper::body::Incoming>,
    handle: &PrometheusHandle,
    ready: &Readiness,
) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match request.uri().path() {
        "/metrics" => {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                Metrics::get()
                    .runtime_tasks
                    .set(runtime.metrics().num_alive_tasks() as f64);
            }
            (StatusCode::OK, "text/plain; version=0.0.4", handle.render())
        }
        "/healthz" => (StatusCode::OK, "text/plain", "ok\n".to_owned()),
        "/readyz" if ready() => (StatusCode::OK, "text/plain", "ready\n".to_owned()),
        "/readyz" => (
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "not ready\n".to_owned(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found\n".to_owned(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    response
}
