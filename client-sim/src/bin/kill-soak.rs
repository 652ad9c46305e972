//! `kill-soak`: kills a relay with SIGKILL at random moments while
//! simulated clients talk and listen, restarts it on the same data
//! directory, and checks that nothing acknowledged was lost, duplicated or
//! delivered partial (see `client_sim::kill`).
//!
//! ```sh
//! cargo build -p ptt-relay -p client-sim
//! target/debug/kill-soak --kills 200 -- target/debug/relay serve --worker-threads 1
//! ```

use std::ffi::OsString;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use client_sim::kill::{KillPlan, run};

/// Kills a relay process at random moments under load and checks that
/// every acknowledged clip reaches every member exactly once and whole.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Cli {
    /// How many times the relay is killed and restarted.
    #[arg(long, default_value_t = 5)]
    kills: u32,
    /// Seed of the kill moments and clips (random when absent; printed).
    #[arg(long)]
    seed: Option<u64>,
    /// The relay's data directory (a temporary one when absent).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Talking members.
    #[arg(long, default_value_t = 3)]
    talkers: usize,
    /// Listening members.
    #[arg(long, default_value_t = 3)]
    listeners: usize,
    /// Shortest life of the relay before a kill (e.g. 300ms).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "300ms")]
    up_min: std::time::Duration,
    /// Longest life of the relay before a kill.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1500ms")]
    up_max: std::time::Duration,
    /// Write the report as JSON to this file.
    #[arg(long)]
    report: Option<PathBuf>,
    /// The relay's command line; `--listen ADDR --data-dir DIR` are added.
    #[arg(last = true, required = true)]
    relay: Vec<OsString>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let seed = cli.seed.unwrap_or_else(rand::random);
    println!("kill-soak: seed {seed} (rerun with --seed {seed})");
    let temp = tempfile::tempdir().context("creating a temporary directory")?;
    let data_dir = cli.data_dir.unwrap_or_else(|| temp.path().join("data"));
    let mut plan = KillPlan::new(cli.relay, data_dir, cli.kills, seed);
    plan.talkers = cli.talkers;
    plan.listeners = cli.listeners;
    plan.up_min = cli.up_min;
    plan.up_max = cli.up_max.max(cli.up_min);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let report = runtime.block_on(run(&plan, |line| println!("{line}")))?;
    let json = serde_json::to_string_pretty(&report)?;
    println!("{json}");
    if let Some(path) = cli.report {
        std::fs::write(&path, &json).with_context(|| format!("writing {}", path.display()))?;
    }
    if report.passed() {
        // The result cell of the README's reliability table.
        println!(
            "| **{} kills, nothing lost**: {} clips acknowledged, {} deliveries checked \
             (whole, once, right seq), 0 missing / duplicate as new / corrupt / seq errors; \
             {} clips re-sent on a new connection landed once; {} re-deliveries dropped by \
             the client library and {} to a restarted app, {} streams cut and recovered; {:.0} s |",
            report.kills,
            report.clips_acknowledged,
            report.deliveries_expected,
            report.clips_resent,
            report.duplicates_dropped,
            report.redelivered_to_new_instance,
            report.partial_aborted,
            report.elapsed_s
        );
        println!(
            "PASSED: {} kills, {} clips acknowledged, {} deliveries checked, nothing lost",
            report.kills, report.clips_acknowledged, report.deliveries_expected
        );
        Ok(())
    } else {
        anyhow::bail!("FAILED: {:?}", report.failures)
    }
}
