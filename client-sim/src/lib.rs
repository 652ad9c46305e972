//! `client-sim`: plays thousands of push-to-talk clients against a relay,
//! proves that every clip reached every member exactly once and intact,
//! and measures what users feel (latencies) and what operators pay (relay
//! CPU per frame, memory per client).
//!
//! - [`scenario`]: what the simulated users do (TOML, named scenarios).
//! - [`sim`]: the clients, talkers and receivers.
//! - [`verify`]: the pure delivery verifier.
//! - [`stats`]: histograms and `/proc` sampling.
//! - [`lossy`]: an in-process lossy, slow UDP socket for quinn.
//! - [`audio`]: the WAV encoded once and replayed.
//! - [`kill`]: the process-kill driver (`kill-soak`).
//! - [`broadcast`]: the broadcast-channel scenario (issue #14).
//! - [`report`], [`plot`]: the JSON report, the table, the SVG.
//!
//! [`run`] is what the binary does.

pub mod audio;
pub mod broadcast;
pub mod flood;
pub mod kill;
pub mod lossy;
pub mod plot;
pub mod report;
pub mod scenario;
pub mod sim;
pub mod stats;
pub mod verify;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use ptt_relay::auth::TokenIssuer;

use crate::audio::Audio;
use crate::report::{CapacityReport, CapacityStep, Report};
use crate::scenario::Scenario;
use crate::sim::{Node, Progress, Target};

/// Checks a separate relay's address (loopback only) and loads the token
/// key of its data directory, which must exist: `load_or_create` would
/// make a new key the relay does not know.
pub(crate) fn external_issuer(
    addr: &SocketAddr,
    token_key: &std::path::Path,
) -> anyhow::Result<TokenIssuer> {
    anyhow::ensure!(
        addr.ip().is_loopback(),
        "the simulator only drives relays on this machine (loopback), not {addr}"
    );
    anyhow::ensure!(
        token_key.is_file(),
        "{} does not exist: pass the token.key of the relay's data directory",
        token_key.display()
    );
    TokenIssuer::load_or_create(token_key)
        .with_context(|| format!("loading {}", token_key.display()))
}

/// The target of a [`RelayChoice::Cluster`]: set-up and the flood go to
/// the first node, the clients to all of them.
fn cluster_target(nodes: &[ExternalNode], token_key: &std::path::Path) -> anyhow::Result<Target> {
    let first = nodes.first().context("a cluster needs at least one node")?;
    let issuer = external_issuer(&first.addr, token_key)?;
    let mut parsed = Vec::with_capacity(nodes.len());
    for n in nodes {
        anyhow::ensure!(
            n.addr.ip().is_loopback(),
            "the simulator only drives relays on this machine (loopback), not {}",
            n.addr
        );
        parsed.push(Node {
            addr: n.addr,
            fingerprint: ptt_client::parse_fingerprint(&n.fingerprint)
                .with_context(|| format!("the fingerprint of {}", n.addr))?,
            pid: n.pid,
        });
    }
    Ok(Target {
        addr: parsed[0].addr,
        fingerprint: parsed[0].fingerprint,
        issuer: Arc::new(issuer),
        store: None,
        // Measured per node (the report's `nodes`), not as one relay.
        pid: None,
        embedded: false,
        nodes: parsed,
    })
}

/// Which relay to drive.
#[derive(Debug, Clone)]
pub enum RelayChoice {
    /// Start one in this process on a temporary data directory.
    Embedded,
    /// A relay started separately.
    External {
        /// Its address.
        addr: SocketAddr,
        /// SHA-256 of its certificate, hex.
        fingerprint: String,
        /// The token signing key in its data directory (`token.key`).
        token_key: PathBuf,
        /// Its process id, to measure CPU and memory.
        pid: Option<u32>,
    },
    /// Several relay nodes of one cluster (issue #10: they share a NATS
    /// backbone and a token signing key), started separately. Clients are
    /// spread over them round-robin (member k of group j on node
    /// (j + k) mod n); a client whose connection attempt fails tries the
    /// next node.
    Cluster {
        /// The nodes, in order.
        nodes: Vec<ExternalNode>,
        /// The token signing key every node accepts (`token.key` of one
        /// node's data directory, copied to the others).
        token_key: PathBuf,
    },
}

/// One node of [`RelayChoice::Cluster`].
#[derive(Debug, Clone)]
pub struct ExternalNode {
    /// Its address (loopback only).
    pub addr: SocketAddr,
    /// SHA-256 of its certificate, hex.
    pub fingerprint: String,
    /// Its process id, to measure CPU and memory.
    pub pid: Option<u32>,
}

/// Everything a run needs.
#[derive(Debug, Clone)]
pub struct Options {
    /// The scenario, with command-line overrides applied.
    pub scenario: Scenario,
    /// The relay.
    pub relay: RelayChoice,
    /// The WAV to replay (default: the repository's speech fixture).
    pub wav: Option<PathBuf>,
    /// A flooding client beside the normal load (single runs only), and
    /// its rate per second.
    pub flood: Option<(flood::FloodKind, u32)>,
    /// The embedded relay's `handshakes_per_second` (default: 0, none).
    pub handshakes_per_second: Option<u32>,
    /// The embedded relay's `handshakes_per_ip_per_second` (default: 0,
    /// none).
    pub handshakes_per_ip_per_second: Option<u32>,
    /// The embedded relay's `user_frames_per_second` and
    /// `user_frames_burst` (default: 0, none).
    pub user_frames: Option<(u32, u32)>,
}

/// The result of [`run`].
#[derive(Debug, Clone)]
pub enum Outcome {
    /// One run.
    Single(Box<Report>),
    /// A capacity search.
    Capacity(Box<CapacityReport>),
}

impl Outcome {
    /// Whether it failed: a delivery failed (or, for a capacity search,
    /// not even the first step held).
    pub fn failed(&self) -> bool {
        match self {
            Outcome::Single(r) => r.failed,
            Outcome::Capacity(c) => c.largest_load_held.is_none(),
        }
    }

    /// The table to print.
    pub fn table(&self) -> String {
        match self {
            Outcome::Single(r) => r.table(),
            Outcome::Capacity(c) => {
                let mut t = String::new();
                if let Some(last) = c.runs.last() {
                    t.push_str(&last.table());
                }
                t.push_str(&c.table());
                t
            }
        }
    }

    /// The JSON report.
    pub fn to_json(&self) -> serde_json::Result<String> {
        match self {
            Outcome::Single(r) => serde_json::to_string_pretty(r),
            Outcome::Capacity(c) => serde_json::to_string_pretty(c),
        }
    }

    /// The run to plot: the only one, or the last step that held.
    pub fn plotted(&self) -> Option<&Report> {
        match self {
            Outcome::Single(r) => Some(r),
            Outcome::Capacity(c) => c
                .largest_load_held
                .and_then(|n| c.runs.iter().find(|r| r.clients == n))
                .or(c.runs.last()),
        }
    }
}

/// Runs the scenario: starts the embedded relay if asked, then one run
/// or a capacity search.
pub async fn run(options: &Options, progress: &dyn Progress) -> anyhow::Result<Outcome> {
    let audio = Audio::load(options.wav.as_deref())?;
    let mut embedded = None;
    let target = match &options.relay {
        RelayChoice::Embedded => {
            let dir = tempfile::Builder::new()
                .prefix("client-sim-relay-")
                .tempdir()
                .context("creating the relay's temporary data directory")?;
            let mut config = ptt_relay::RelayConfig::for_tests(dir.path());
            let most = options
                .scenario
                .capacity
                .as_ref()
                .map_or(options.scenario.clients, |c| c.max);
            config.max_connections = config.max_connections.max(most * 2 + 100);
            if let Some(rate) = options.handshakes_per_second {
                config.handshakes_per_second = rate;
            }
            if let Some(rate) = options.handshakes_per_ip_per_second {
                config.handshakes_per_ip_per_second = rate;
            }
            if let Some((rate, burst)) = options.user_frames {
                config.user_frames_per_second = rate;
                config.user_frames_burst = burst;
            }
            let handle = ptt_relay::start(config)
                .await
                .context("starting the embedded relay")?;
            let issuer = TokenIssuer::load_or_create(&dir.path().join("token.key"))
                .context("loading the embedded relay's token key")?;
            let fingerprint = ptt_client::parse_fingerprint(handle.cert_fingerprint())?;
            let target = Target {
                addr: handle.addr(),
                fingerprint,
                issuer: Arc::new(issuer),
                store: Some(handle.store().clone()),
                pid: None,
                embedded: true,
                nodes: vec![Node {
                    addr: handle.addr(),
                    fingerprint,
                    pid: None,
                }],
            };
            embedded = Some((handle, dir));
            target
        }
        RelayChoice::External {
            addr,
            fingerprint,
            token_key,
            pid,
        } => {
            let issuer = external_issuer(addr, token_key)?;
            let fingerprint = ptt_client::parse_fingerprint(fingerprint)?;
            Target {
                addr: *addr,
                fingerprint,
                issuer: Arc::new(issuer),
                store: None,
                pid: *pid,
                embedded: false,
                nodes: vec![Node {
                    addr: *addr,
                    fingerprint,
                    pid: *pid,
                }],
            }
        }
        RelayChoice::Cluster { nodes, token_key } => cluster_target(nodes, token_key)?,
    };

    let result = match &options.scenario.capacity {
        None => {
            let (stop, stopped) = tokio::sync::watch::channel(false);
            let (group, group_rx) = tokio::sync::watch::channel(None);
            let intruder = sim::Intruder {
                user: format!("flood-{:06x}", rand::random::<u32>() & 0xff_ffff),
                group,
            };
            let flood = options.flood.map(|(kind, rate)| {
                let target = flood::FloodTarget {
                    addr: target.addr,
                    fingerprint: target.fingerprint,
                    issuer: target.issuer.clone(),
                    user: intruder.user.clone(),
                    group: group_rx,
                };
                (kind, tokio::spawn(flood::run(kind, target, rate, stopped)))
            });
            let report = sim::run_once_with(
                &options.scenario,
                &target,
                &audio,
                progress,
                flood.is_some().then_some(&intruder),
            )
            .await;
            let _ = stop.send(true);
            if let Some((kind, flood)) = flood {
                let stats = flood.await.context("the flood task")??;
                eprintln!("{}", stats.summary(kind));
            }
            report.map(|r| Outcome::Single(Box::new(r)))
        }
        Some(cap) => {
            let mut steps = Vec::new();
            let mut runs = Vec::new();
            let mut largest = None;
            let mut clients = cap.start;
            let limit_ms = cap.p99_limit.as_secs_f64() * 1000.0;
            while clients <= cap.max {
                let scenario = Scenario {
                    clients,
                    name: format!("{} ({clients} clients)", options.scenario.name),
                    ..options.scenario.clone()
                };
                let report = sim::run_once(&scenario, &target, &audio, progress).await?;
                let frame = report.latency_ms.get("frame").copied().unwrap_or_default();
                let failures = report.verdict.deliveries_expected - report.verdict.deliveries_ok
                    + report.verdict.deliveries_duplicate
                    + report.verdict.misdelivered
                    + report.connect_failures;
                let held = !report.failed && frame.p99 <= limit_ms;
                steps.push(CapacityStep {
                    clients,
                    held,
                    frames_per_s: report.frames_per_s,
                    frame_p50_ms: frame.p50,
                    frame_p99_ms: frame.p99,
                    failures,
                    cpu_us_per_frame: report.relay.cpu_us_per_frame,
                });
                eprintln!(
                    "capacity: {clients} clients: {} (p99 {:.2} ms, {failures} failures)",
                    if held { "held" } else { "NOT held" },
                    frame.p99
                );
                runs.push(report);
                if !held {
                    break;
                }
                largest = Some(clients);
                clients += cap.step;
                // Let the previous step's connections close at the relay.
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            Ok(Outcome::Capacity(Box::new(CapacityReport {
                scenario: options.scenario.name.clone(),
                largest_load_held: largest,
                p99_limit_ms: limit_ms,
                steps,
                runs,
            })))
        }
    };
    if let Some((handle, dir)) = embedded {
        handle.shutdown().await;
        drop(dir);
    }
    result
}
