//! `client-sim`: plays many push-to-talk clients against a relay and
//! verifies that every clip reached every member exactly once.
//!
//! Without arguments it starts a relay in-process and runs the `smoke`
//! scenario. See `client-sim --help` and client-sim/README.md.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use client_sim::scenario::{Mode, NAMED, Scenario};
use client_sim::sim::Progress;
use client_sim::{Options, RelayChoice};
use indicatif::{ProgressBar, ProgressStyle};

/// Plays thousands of push-to-talk clients against a relay, verifies that
/// every clip reached every member exactly once and intact, and measures
/// latencies, relay CPU per frame and memory per client.
///
/// With no arguments: `--embedded --scenario smoke`.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Cli {
    /// Start a relay in this process on a temporary data directory (the
    /// default unless --relay is given). CPU and memory are then the
    /// simulator's and the relay's together.
    #[arg(long, conflicts_with = "relay")]
    embedded: bool,
    /// Drive a separately started relay at this address (loopback only);
    /// several, comma-separated (`--relay A,B`), are the nodes of one
    /// cluster: clients are spread over them round-robin (member k of
    /// group j on node (j + k) mod n), and a client whose connection
    /// attempt fails tries the next node.
    #[arg(long, value_delimiter = ',', requires_all = ["fingerprint", "token_key"])]
    relay: Vec<SocketAddr>,
    /// The relay's certificate SHA-256 fingerprint (printed at its start);
    /// for several nodes, one per node in the order of --relay (or one
    /// that all share).
    #[arg(long, value_delimiter = ',')]
    fingerprint: Vec<String>,
    /// The relay's token signing key: DATA_DIR/token.key (the nodes of a
    /// cluster share it).
    #[arg(long)]
    token_key: Option<PathBuf>,
    /// The separate relay's process id, to measure its CPU time and memory
    /// from /proc; for several nodes, one per node in the order of --relay.
    #[arg(long, value_delimiter = ',')]
    relay_pid: Vec<u32>,
    /// A named scenario (see --list-scenarios) or a TOML file.
    #[arg(long, default_value = "smoke")]
    scenario: String,
    /// List the named scenarios and exit.
    #[arg(long)]
    list_scenarios: bool,
    /// Simulated clients (in a capacity search: the largest step).
    #[arg(long)]
    clients: Option<usize>,
    /// Members per group.
    #[arg(long)]
    group_size: Option<usize>,
    /// How long talkers start new clips (e.g. 30s, 2m).
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// walkie, notes or mixed.
    #[arg(long, value_enum)]
    mode: Option<Mode>,
    /// Talkers per group (0: idle clients).
    #[arg(long)]
    talkers: Option<usize>,
    /// Members per group that connect late and catch up.
    #[arg(long)]
    offline: Option<usize>,
    /// Shortest clip.
    #[arg(long, value_parser = humantime::parse_duration)]
    clip_min: Option<Duration>,
    /// Longest clip.
    #[arg(long, value_parser = humantime::parse_duration)]
    clip_max: Option<Duration>,
    /// Fraction of datagrams dropped each way (0.05 = 5%).
    #[arg(long)]
    loss: Option<f64>,
    /// Delay added each way (RTT grows by twice this).
    #[arg(long, value_parser = humantime::parse_duration)]
    delay: Option<Duration>,
    /// Random extra delay each way, 0 to this.
    #[arg(long, value_parser = humantime::parse_duration)]
    jitter: Option<Duration>,
    /// Fraction of datagrams held back out of order, each way.
    #[arg(long)]
    reorder: Option<f64>,
    /// How long a reordered datagram is held back.
    #[arg(long, value_parser = humantime::parse_duration)]
    reorder_delay: Option<Duration>,
    /// Fraction of datagrams delivered twice, each way.
    #[arg(long)]
    duplicate: Option<f64>,
    /// Live frames on `streams` (default) or on the UDP media path (`udp`,
    /// with --loss/--delay/--jitter applied to the media socket too).
    #[arg(long, value_enum)]
    media: Option<client_sim::scenario::MediaMode>,
    /// Connection drops per client per minute.
    #[arg(long)]
    churn: Option<f64>,
    /// Network switches (endpoint rebinds: connection migration) per
    /// client socket per minute.
    #[arg(long)]
    rebinds: Option<f64>,
    /// Fraction of listeners that read slowly.
    #[arg(long)]
    slow_receivers: Option<f64>,
    /// Members per group that never read their events.
    #[arg(long)]
    stalled_per_group: Option<usize>,
    /// Members per group that read each event --slow-delay late.
    #[arg(long)]
    slow_per_group: Option<usize>,
    /// How late a slow member reads each event.
    #[arg(long, value_parser = humantime::parse_duration)]
    slow_delay: Option<Duration>,
    /// Seed of the fault randomness.
    #[arg(long)]
    seed: Option<u64>,
    /// Longest wait for the last deliveries after the talking.
    #[arg(long, value_parser = humantime::parse_duration)]
    settle: Option<Duration>,
    /// New connections per second.
    #[arg(long)]
    connect_rate: Option<u32>,
    /// Clients per UDP socket.
    #[arg(long)]
    clients_per_endpoint: Option<usize>,
    /// WAV file to replay (default: the repository's speech fixture).
    #[arg(long)]
    wav: Option<PathBuf>,
    /// Write the JSON report here.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Write an SVG of latency over time and its distribution here.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Tokio worker threads (0: a current-thread runtime). By default one
    /// per CPU this process may run on, as the relay's: pinned to one core
    /// (`taskset -c 1`), one worker.
    #[arg(long, default_value_t = ptt_relay::config::default_worker_threads())]
    workers: usize,
    /// Run a flooding client beside the normal clients (single runs).
    #[arg(long, value_enum)]
    flood: Option<client_sim::flood::FloodKind>,
    /// The flood's rate per second.
    #[arg(long, default_value_t = 500)]
    flood_rate: u32,
    /// The embedded relay's handshakes_per_second (QUIC Retry above it;
    /// default 0: never, as every simulated client shares one address).
    #[arg(long)]
    handshakes_per_second: Option<u32>,
    /// The embedded relay's handshakes_per_ip_per_second (default 0: none).
    #[arg(long)]
    handshakes_per_ip_per_second: Option<u32>,
    /// The embedded relay's user_frames_per_second (default 0: none).
    #[arg(long)]
    user_frames_per_second: Option<u32>,
    /// The embedded relay's user_frames_burst (with
    /// --user-frames-per-second).
    #[arg(long, default_value_t = 3000)]
    user_frames_burst: u32,
    /// Clients do not ask the relay for fewer ACKs of their uploads (QUIC
    /// ACK frequency): to measure what asking saves.
    #[arg(long)]
    no_upload_ack_frequency: bool,
    /// Each client's UDP media path on a socket of its own (as phones
    /// have), not one socket per endpoint read in batches.
    #[arg(long)]
    per_client_media_sockets: bool,
    /// Each member's task reads its client's event channel, instead of an
    /// event sink taking the events where they happen.
    #[arg(long)]
    event_channel: bool,
    /// Print only the result table.
    #[arg(short, long)]
    quiet: bool,
}

impl Cli {
    fn scenario(&self) -> anyhow::Result<Scenario> {
        let mut s = Scenario::load(&self.scenario)?;
        macro_rules! set {
            ($($flag:ident => $($field:ident).+),* $(,)?) => {
                $(if let Some(v) = self.$flag { s.$($field).+ = v; })*
            };
        }
        set!(
            group_size => group_size,
            duration => duration,
            mode => mode,
            talkers => talkers_per_group,
            offline => offline_per_group,
            clip_min => clip_min,
            clip_max => clip_max,
            loss => faults.loss,
            delay => faults.delay,
            jitter => faults.jitter,
            reorder => faults.reorder,
            reorder_delay => faults.reorder_delay,
            duplicate => faults.duplicate,
            churn => faults.churn,
            rebinds => faults.rebinds,
            slow_receivers => faults.slow_receivers,
            stalled_per_group => faults.stalled_per_group,
            slow_per_group => faults.slow_per_group,
            slow_delay => faults.slow_delay,
            seed => faults.seed,
            settle => settle,
            connect_rate => connect_rate,
            clients_per_endpoint => clients_per_endpoint,
            media => media,
        );
        if self.no_upload_ack_frequency {
            s.upload_ack_frequency = false;
        }
        if self.per_client_media_sockets {
            s.shared_media_socket = false;
        }
        if self.event_channel {
            s.event_sink = false;
        }
        if let Some(n) = self.clients {
            match &mut s.capacity {
                Some(c) => c.max = n,
                None => s.clients = n,
            }
        }
        s.validate()?;
        Ok(s)
    }
}

/// A progress bar on a terminal; one line per phase otherwise.
struct Bar {
    bar: Option<ProgressBar>,
    quiet: bool,
}

impl Progress for Bar {
    fn phase(&self, name: &str, len: u64) {
        match &self.bar {
            Some(bar) => {
                bar.set_prefix(name.to_owned());
                bar.set_length(len);
                bar.set_position(0);
                bar.set_message("");
            }
            None if !self.quiet => eprintln!("client-sim: {name}…"),
            None => {}
        }
    }

    fn update(&self, pos: u64, msg: String) {
        if let Some(bar) = &self.bar {
            bar.set_position(pos);
            bar.set_message(msg);
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,quinn=error".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    if cli.list_scenarios {
        for (name, _) in NAMED {
            let s = Scenario::load(name)?;
            println!("{name:<14} {}", s.description);
        }
        return Ok(());
    }
    if cli.scenario == "broadcast" {
        return broadcast(&cli);
    }
    let scenario = cli.scenario()?;
    let relay = cli.relay_choice()?;
    let options = Options {
        scenario,
        relay,
        wav: cli.wav.clone(),
        flood: cli.flood.map(|kind| (kind, cli.flood_rate)),
        handshakes_per_second: cli.handshakes_per_second,
        handshakes_per_ip_per_second: cli.handshakes_per_ip_per_second,
        user_frames: cli
            .user_frames_per_second
            .map(|rate| (rate, cli.user_frames_burst)),
    };
    if !cli.quiet {
        let s = &options.scenario;
        eprintln!(
            "client-sim: scenario {} — {}\n  {} clients, groups of {}, {:?} mode, {} talker(s)/group, \
             talking {:?}, clips {:?}–{:?}, relay {}",
            s.name,
            s.description,
            s.clients,
            s.group_size,
            s.mode,
            s.talkers_per_group,
            s.duration,
            s.clip_min,
            s.clip_max,
            match &options.relay {
                RelayChoice::Embedded => "embedded (in this process)".to_owned(),
                RelayChoice::External { addr, .. } => format!("at {addr}"),
                RelayChoice::Cluster { nodes, .. } => format!(
                    "{} cluster nodes at {}",
                    nodes.len(),
                    nodes
                        .iter()
                        .map(|n| n.addr.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            }
        );
    }
    let bar = (!cli.quiet && std::io::stderr().is_terminal()).then(|| {
        let bar = ProgressBar::new(1);
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix:>11} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}",
            )
            .expect("valid template"),
        );
        bar
    });
    let progress = Bar {
        bar,
        quiet: cli.quiet,
    };
    let runtime = if cli.workers == 0 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(cli.workers)
            .enable_all()
            .build()?
    };
    let outcome = runtime.block_on(client_sim::run(&options, &progress))?;
    println!("{}", outcome.table());
    if let Some(path) = &cli.report {
        std::fs::write(path, outcome.to_json()?)
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("report written to {}", path.display());
    }
    if let Some(path) = &cli.plot
        && let Some(report) = outcome.plotted()
    {
        client_sim::plot::plot(report, path)?;
        eprintln!("plot written to {}", path.display());
    }
    // Connections still closing must not hold the exit.
    runtime.shutdown_timeout(Duration::from_secs(2));
    if outcome.failed() {
        std::process::exit(1);
    }
    Ok(())
}

impl Cli {
    /// A separate relay (`--relay` with its `--fingerprint` and
    /// `--token-key`), the nodes of a cluster (`--relay A,B`), or one in
    /// this process.
    fn relay_choice(&self) -> anyhow::Result<RelayChoice> {
        let n = self.relay.len();
        if n == 0 {
            return Ok(RelayChoice::Embedded);
        }
        let token_key = self.token_key.clone().context("--token-key is required")?;
        anyhow::ensure!(
            self.fingerprint.len() == 1 || self.fingerprint.len() == n,
            "--fingerprint: give one per --relay address ({n}), or one they all share"
        );
        anyhow::ensure!(
            self.relay_pid.is_empty() || self.relay_pid.len() == n,
            "--relay-pid: give one per --relay address ({n})"
        );
        let fingerprint = |k: usize| self.fingerprint[k.min(self.fingerprint.len() - 1)].clone();
        if n == 1 {
            return Ok(RelayChoice::External {
                addr: self.relay[0],
                fingerprint: fingerprint(0),
                token_key,
                pid: self.relay_pid.first().copied(),
            });
        }
        let nodes = self
            .relay
            .iter()
            .enumerate()
            .map(|(k, &addr)| client_sim::ExternalNode {
                addr,
                fingerprint: fingerprint(k),
                pid: self.relay_pid.get(k).copied(),
            })
            .collect();
        Ok(RelayChoice::Cluster { nodes, token_key })
    }
}

/// `--scenario broadcast` (issue #14): one publisher and `--clients`
/// followers of a channel (default 10,000), on an embedded relay or a
/// separate one (`--relay`, `--fingerprint`, `--token-key`,
/// `--relay-pid`).
fn broadcast(cli: &Cli) -> anyhow::Result<()> {
    let relay = cli.relay_choice()?;
    let mut opts = client_sim::broadcast::BroadcastOptions::full();
    if let Some(n) = cli.clients {
        opts.followers = n;
        opts.churn = opts.churn.min(n / 10);
    }
    if let Some(d) = cli.duration {
        opts.clips = (d.as_secs_f64() / opts.clip_interval.as_secs_f64()).ceil() as usize;
    }
    if let Some(n) = cli.clients_per_endpoint {
        opts.clients_per_endpoint = n;
    }
    if let Some(d) = cli.settle {
        opts.settle = d;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cli.workers.max(1))
        .enable_all()
        .build()?;
    let report = runtime.block_on(client_sim::broadcast::run(&opts, &relay))?;
    println!("{}", report.table());
    if let Some(path) = &cli.report {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    runtime.shutdown_timeout(Duration::from_secs(2));
    if report.failed {
        std::process::exit(1);
    }
    Ok(())
}
