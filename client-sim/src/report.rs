//! The results of a run: the JSON report and the table printed at the end.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::verify::Verdict;

use crate::scenario::Faults;
use crate::stats::{ProcSample, Summary, Tick, clock_ticks};

/// CPU and memory of the relay process (or, embedded, of the simulator
/// and relay together).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RelayStats {
    /// The process measured (`None`: this process, with the embedded relay,
    /// or nothing when a separate relay's pid was not given).
    pub pid: Option<u32>,
    /// Whether the figures include the simulator itself (embedded relay).
    pub includes_simulator: bool,
    /// Clock ticks per second used to read `/proc/PID/stat`.
    pub clock_ticks_per_s: u64,
    /// CPU time (user + system) spent while the clients talked and the
    /// deliveries settled, seconds.
    pub cpu_s: Option<f64>,
    /// `cpu_s` per frame delivered, µs.
    pub cpu_us_per_frame: Option<f64>,
    /// Resident memory at the end, MiB.
    pub rss_mib: Option<f64>,
    /// Resident memory before the clients connected, MiB.
    pub rss_before_mib: Option<f64>,
    /// Resident memory with every client connected and joined, MiB.
    pub rss_connected_mib: Option<f64>,
    /// (connected − before) / connected clients, KiB.
    pub rss_kib_per_client: Option<f64>,
}

impl RelayStats {
    /// Figures from samples taken before connecting, once connected (the
    /// start of talking), and at the end.
    pub fn from_samples(
        pid: Option<u32>,
        embedded: bool,
        before: Option<ProcSample>,
        connected: Option<ProcSample>,
        after: Option<ProcSample>,
        clients: u64,
        frames: u64,
    ) -> RelayStats {
        let measured = embedded || pid.is_some();
        let (before, connected, after) = if measured {
            (before, connected, after)
        } else {
            (None, None, None)
        };
        let mib = |s: Option<ProcSample>| s.map(|s| s.rss_kib as f64 / 1024.0);
        let cpu_s = connected
            .zip(after)
            .map(|(c, a)| (a.cpu_s - c.cpu_s).max(0.0));
        RelayStats {
            pid,
            includes_simulator: embedded,
            clock_ticks_per_s: clock_ticks(),
            cpu_s,
            cpu_us_per_frame: cpu_s
                .filter(|_| frames > 0)
                .map(|c| c * 1e6 / frames as f64),
            rss_mib: mib(after),
            rss_before_mib: mib(before),
            rss_connected_mib: mib(connected),
            rss_kib_per_client: before
                .zip(connected)
                .filter(|_| clients > 0)
                .map(|(b, c)| (c.rss_kib as f64 - b.rss_kib as f64) / clients as f64),
        }
    }
}

/// One node of a cluster run (`--relay A,B`): the clients connected to
/// it, the frames it delivered to them, and its process's CPU and memory.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct NodeReport {
    /// The node's address.
    pub addr: String,
    /// Clients whose connection went to this node.
    pub clients_connected: u64,
    /// Frames those clients received (live and from the store).
    pub frames_delivered: u64,
    /// The node's CPU and memory (from `--relay-pid`), per frame it
    /// delivered.
    pub relay: RelayStats,
}

/// What else ran on the machine during the measured window: other
/// processes (builds, other tests) compete for the same cores and inflate
/// latencies.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct HostStats {
    /// Cores.
    pub cores: usize,
    /// 1-minute load average at the start and at the end of the window.
    pub loadavg: (f64, f64),
    /// Average busy cores over the window (all processes).
    pub busy_cores: f64,
    /// Busy cores used by neither the relay nor the simulator (only known
    /// when the relay's CPU is measured, or embedded).
    pub other_cores: Option<f64>,
}

/// What the lossy sockets did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct NetworkCounters {
    /// Datagrams the clients sent.
    pub sent: u64,
    /// Of those, dropped.
    pub sent_dropped: u64,
    /// Datagrams the clients received.
    pub received: u64,
    /// Of those, dropped.
    pub received_dropped: u64,
    /// Datagrams held back out of order, both ways.
    pub reordered: u64,
    /// Extra copies delivered, both ways.
    pub duplicated: u64,
}

/// Counters from the client library and the simulated users.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ClientCounters {
    /// Reconnections (client library counter).
    pub reconnects: u64,
    /// `Reconnected` events seen.
    pub reconnect_events: u64,
    /// `Disconnected` events seen.
    pub disconnects: u64,
    /// Connections the simulator dropped on purpose (churn).
    pub churn_drops: u64,
    /// Client sockets switched to a new port (their connections migrate).
    pub rebinds: u64,
    /// Clips re-sent whole after a reconnect (client library counter).
    pub clips_resent: u64,
    /// Re-deliveries the client library recognised and dropped.
    pub duplicates_dropped: u64,
    /// Clips the client library saw aborted (cut live streams, lost
    /// connections).
    pub clips_aborted: u64,
    /// Floor requests denied (someone else was talking).
    pub floor_denied: u64,
    /// `Gap` events (clips expired before delivery).
    pub gaps: u64,
    /// Groups that could not be joined again after a reconnect.
    pub rejoin_failed: u64,
    /// Frames of clips whose start was never seen.
    pub orphan_frames: u64,
    /// A clip started again while a stream of it was still open (a
    /// talker's retry overlapping the old stream's abort).
    pub overlapping_streams: u64,
    /// Errors the simulated users ran into (see `errors`).
    pub errors: u64,
    /// Live frames received on the UDP media path (`--media udp`).
    pub media_frames: u64,
    /// Live clips on the media path that lost frames and were fetched
    /// whole (counted in `partial_deliveries` too).
    pub media_clips_fetched: u64,
    /// Frames of the users' uploads also sent by the UDP uplink.
    pub media_uplinked: u64,
    /// Live clips started from a `HeadedFrame`, before their header.
    pub media_announced: u64,
}

impl ClientCounters {
    /// Adds one client's library counters.
    pub fn add(&mut self, s: &ptt_client::ClientStats) {
        self.reconnects += s.reconnects;
        self.clips_resent += s.clips_resent;
        self.duplicates_dropped += s.duplicates_dropped;
        self.clips_aborted += s.clips_aborted;
        self.media_frames += s.media_frames_received;
        self.media_clips_fetched += s.media_clips_fetched;
        self.media_uplinked += s.media_frames_uplinked;
        self.media_announced += s.media_clips_announced;
    }
}

/// The JSON report of one run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Scenario name.
    pub scenario: String,
    /// `embedded` or `external`.
    pub relay_mode: String,
    /// The relay's address (the nodes', comma-separated, for a cluster).
    pub relay_addr: String,
    /// Per node, for a cluster (`--relay A,B`); empty for one relay.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<NodeReport>,
    /// Simulated clients.
    pub clients: usize,
    /// Clients that connected.
    pub clients_connected: u64,
    /// Clients that never connected (after 3 attempts).
    pub connect_failures: u64,
    /// Connection attempts that failed and were retried.
    pub connect_retries: u64,
    /// Groups.
    pub groups: usize,
    /// Nominal group size.
    pub group_size: usize,
    /// walkie, notes or mixed.
    pub mode: String,
    /// Talkers per group.
    pub talkers_per_group: usize,
    /// UDP sockets the clients shared.
    pub endpoints: usize,
    /// Length of the talking phase (until the last clip was confirmed), s.
    pub duration_s: f64,
    /// Time spent waiting for the last deliveries afterwards, s.
    pub settle_s: f64,
    /// The whole run, s.
    pub elapsed_s: f64,
    /// What the verifier found: clips sent and stored, deliveries ok,
    /// missing, corrupt, duplicate, misdelivered (flattened into the
    /// report's top level).
    #[serde(flatten)]
    pub verdict: Verdict,
    /// Clip streams cut or aborted before their end (then recovered).
    pub partial_deliveries: u64,
    /// Frames the talkers sent.
    pub frames_sent: u64,
    /// Frames the clients received (live and from the store, including
    /// talkers' own clips sent back).
    pub frames_delivered: u64,
    /// `frames_delivered` / `duration_s`.
    pub frames_per_s: f64,
    /// Latency percentiles, ms.
    pub latency_ms: BTreeMap<String, Summary>,
    /// Relay process CPU and memory.
    pub relay: RelayStats,
    /// CPU time of this process (the simulator, plus the relay when
    /// embedded) over the same window as `relay.cpu_s`, seconds.
    pub simulator_cpu_s: Option<f64>,
    /// The machine during the measured window.
    pub host: Option<HostStats>,
    /// The faults applied.
    pub faults: Faults,
    /// What the lossy sockets did, when used.
    pub network: Option<NetworkCounters>,
    /// Client-side counters.
    pub client: ClientCounters,
    /// Frame latency and throughput, second by second.
    pub timeline: Vec<Tick>,
    /// Frame latency distribution: (upper bound ms, count) buckets.
    pub frame_histogram: Vec<(f64, u64)>,
    /// Examples of failed deliveries.
    pub failure_examples: Vec<String>,
    /// The first errors the simulated users ran into.
    pub errors: Vec<String>,
    /// Whether any delivery failed or a client could not connect.
    pub failed: bool,
}

/// Linear buckets of a microsecond histogram up to its 99.9th percentile
/// (at most ~100), as (upper bound ms, count); the last bucket takes the
/// rest.
pub fn histogram_buckets(h: &Histogram<u64>) -> Vec<(f64, u64)> {
    if h.is_empty() {
        return Vec::new();
    }
    let top = h.value_at_quantile(0.999).max(1);
    let step = (top / 100).max(50);
    let mut out: Vec<(f64, u64)> = h
        .iter_linear(step)
        .take_while(|v| v.value_iterated_to() <= top + step)
        .map(|v| {
            (
                v.value_iterated_to() as f64 / 1000.0,
                v.count_since_last_iteration(),
            )
        })
        .collect();
    let counted: u64 = out.iter().map(|b| b.1).sum();
    if counted < h.len() {
        out.push((h.max() as f64 / 1000.0, h.len() - counted));
    }
    out
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "n/a".into(), |v| format!("{v:.digits$}"))
}

impl Report {
    /// The table printed at the end of a run.
    pub fn table(&self) -> String {
        let mut t = String::new();
        let _ = writeln!(
            t,
            "\n== client-sim: scenario {} against {} relay {} ==",
            self.scenario, self.relay_mode, self.relay_addr
        );
        let _ = writeln!(
            t,
            "clients {} ({} connected, {} failed, {} retried) in {} groups of {} ({}, {} talker(s) each), {} sockets",
            self.clients,
            self.clients_connected,
            self.connect_failures,
            self.connect_retries,
            self.groups,
            self.group_size,
            self.mode,
            self.talkers_per_group,
            self.endpoints
        );
        let _ = writeln!(
            t,
            "talking {:.1} s, settling {:.1} s, total {:.1} s",
            self.duration_s, self.settle_s, self.elapsed_s
        );
        let _ = writeln!(
            t,
            "clips: {} sent, {} stored, {} refused/abandoned, {} unknown",
            self.verdict.clips_sent,
            self.verdict.clips_stored,
            self.verdict.clips_failed,
            self.verdict.clips_unknown
        );
        let _ = writeln!(t, "\n{:<28} {:>12}", "deliveries", "count");
        for (name, v) in [
            ("expected", self.verdict.deliveries_expected),
            ("ok (whole, intact, once)", self.verdict.deliveries_ok),
            ("MISSING", self.verdict.deliveries_missing),
            ("CORRUPT", self.verdict.deliveries_corrupt),
            ("DUPLICATE", self.verdict.deliveries_duplicate),
            ("MISDELIVERED", self.verdict.misdelivered),
            ("SEQ INCONSISTENT", self.verdict.seq_inconsistent),
            ("caught up from the store", self.verdict.catch_up_deliveries),
            ("cut/aborted, then resent", self.partial_deliveries),
            ("of them: media, fetched", self.client.media_clips_fetched),
            ("frames by UDP media", self.client.media_frames),
            ("frames sent by UDP uplink", self.client.media_uplinked),
            ("clips started before header", self.client.media_announced),
            ("reordered arrivals", self.verdict.reordered),
            ("own clip echoed to talker", self.verdict.self_deliveries),
        ] {
            let _ = writeln!(t, "{name:<28} {v:>12}");
        }
        let _ = writeln!(
            t,
            "\nframes: {} sent, {} delivered, {:.0} delivered/s",
            self.frames_sent, self.frames_delivered, self.frames_per_s
        );
        let _ = writeln!(
            t,
            "\n{:<16} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "latency (ms)", "count", "p50", "p90", "p95", "p99", "max"
        );
        for key in [
            "connect",
            "floor_grant",
            "first_frame",
            "frame",
            "late_entry",
            "clip_complete",
            "stored_ack",
            "sim_pacing_lag",
            "slow_frame",
        ] {
            if let Some(s) = self.latency_ms.get(key)
                && (s.count > 0 || key != "slow_frame")
            {
                let _ = writeln!(
                    t,
                    "{key:<16} {:>9} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2}",
                    s.count, s.p50, s.p90, s.p95, s.p99, s.max
                );
            }
        }
        for (k, n) in self.nodes.iter().enumerate() {
            let r = &n.relay;
            let _ = writeln!(
                t,
                "{}node {k} {} (pid {}): {} clients, {} frames delivered; CPU {} s = {} µs per \
                 delivered frame; RSS {} MiB",
                if k == 0 { "\n" } else { "" },
                n.addr,
                r.pid
                    .map_or_else(|| "not given".to_owned(), |p| p.to_string()),
                n.clients_connected,
                n.frames_delivered,
                opt(r.cpu_s, 2),
                opt(r.cpu_us_per_frame, 2),
                opt(r.rss_mib, 1),
            );
        }
        let r = &self.relay;
        let who = if r.includes_simulator {
            "simulator + embedded relay (one process)".to_owned()
        } else if let Some(pid) = r.pid {
            format!("relay pid {pid}")
        } else {
            "relay (pass --relay-pid to measure)".to_owned()
        };
        if self.nodes.is_empty() {
            let _ = writeln!(
                t,
                "\n{who}: CPU {} s = {} µs per delivered frame; RSS {} MiB \
             (before {} MiB, connected {} MiB) = {} KiB per client",
                opt(r.cpu_s, 2),
                opt(r.cpu_us_per_frame, 2),
                opt(r.rss_mib, 1),
                opt(r.rss_before_mib, 1),
                opt(r.rss_connected_mib, 1),
                opt(r.rss_kib_per_client, 1),
            );
        }
        if !r.includes_simulator {
            let _ = writeln!(
                t,
                "simulator process: CPU {} s",
                opt(self.simulator_cpu_s, 2)
            );
        }
        if let Some(h) = &self.host {
            let _ = writeln!(
                t,
                "machine: {} cores, {:.2} busy on average, {} of them other processes; load {:.2} → {:.2}",
                h.cores,
                h.busy_cores,
                opt(h.other_cores, 2),
                h.loadavg.0,
                h.loadavg.1
            );
        }
        let c = &self.client;
        let _ = writeln!(
            t,
            "clients: {} disconnects, {} reconnects, {} churn drops, {} socket switches, \
             {} clips re-sent, {} re-deliveries dropped by the client, {} floor denials, \
             {} gaps, {} errors",
            c.disconnects,
            c.reconnects,
            c.churn_drops,
            c.rebinds,
            c.clips_resent,
            c.duplicates_dropped,
            c.floor_denied,
            c.gaps,
            c.errors
        );
        if let Some(n) = &self.network {
            let pct = |a: u64, b: u64| {
                if b == 0 {
                    0.0
                } else {
                    100.0 * a as f64 / b as f64
                }
            };
            let _ = writeln!(
                t,
                "network: {} of {} datagrams out dropped ({:.1}%), {} of {} in ({:.1}%); \
                 delay {:?} + jitter {:?} each way; {} reordered (held {:?}), {} duplicated",
                n.sent_dropped,
                n.sent,
                pct(n.sent_dropped, n.sent),
                n.received_dropped,
                n.received,
                pct(n.received_dropped, n.received),
                self.faults.delay,
                self.faults.jitter,
                n.reordered,
                self.faults.reorder_delay,
                n.duplicated
            );
        }
        for e in self.failure_examples.iter().take(10) {
            let _ = writeln!(t, "  failure: {e}");
        }
        for e in self.errors.iter().take(10) {
            let _ = writeln!(t, "  error: {e}");
        }
        let _ = writeln!(
            t,
            "\nRESULT: {}",
            if self.failed {
                "FAILED (deliveries missing, damaged, duplicated or misdelivered, or clients could not connect)"
            } else {
                "every stored clip reached every member exactly once, intact"
            }
        );
        t
    }
}

/// One step of a capacity search.
#[derive(Debug, Clone, Serialize)]
pub struct CapacityStep {
    /// Clients in this step.
    pub clients: usize,
    /// Whether the step held (no failure, p99 within the limit).
    pub held: bool,
    /// Frames delivered per second.
    pub frames_per_s: f64,
    /// p50 frame latency, ms.
    pub frame_p50_ms: f64,
    /// p99 frame latency, ms.
    pub frame_p99_ms: f64,
    /// Failed deliveries.
    pub failures: u64,
    /// CPU per delivered frame, µs.
    pub cpu_us_per_frame: Option<f64>,
}

/// The result of a capacity search.
#[derive(Debug, Clone, Serialize)]
pub struct CapacityReport {
    /// Scenario name.
    pub scenario: String,
    /// The largest client count that held.
    pub largest_load_held: Option<usize>,
    /// The p99 limit, ms.
    pub p99_limit_ms: f64,
    /// Every step, in order.
    pub steps: Vec<CapacityStep>,
    /// The full report of each step.
    pub runs: Vec<Report>,
}

impl CapacityReport {
    /// The summary table.
    pub fn table(&self) -> String {
        let mut t = String::new();
        let _ = writeln!(
            t,
            "\n== capacity search (p99 frame latency limit {} ms, no failed delivery) ==",
            self.p99_limit_ms
        );
        let _ = writeln!(
            t,
            "{:>8} {:>6} {:>12} {:>9} {:>9} {:>9} {:>12}",
            "clients", "held", "frames/s", "p50 ms", "p99 ms", "failures", "CPU µs/frame"
        );
        for s in &self.steps {
            let _ = writeln!(
                t,
                "{:>8} {:>6} {:>12.0} {:>9.2} {:>9.2} {:>9} {:>12}",
                s.clients,
                if s.held { "yes" } else { "NO" },
                s.frames_per_s,
                s.frame_p50_ms,
                s.frame_p99_ms,
                s.failures,
                opt(s.cpu_us_per_frame, 2)
            );
        }
        let _ = writeln!(
            t,
            "largest load held: {}",
            self.largest_load_held
                .map_or_else(|| "none".into(), |n| format!("{n} clients"))
        );
        t
    }
}
