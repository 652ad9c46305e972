//! Reliability under process kills (issue #12): a real `relay serve`
//! process is killed with SIGKILL at random moments while talkers upload
//! and listeners receive, and restarted on the same data directory. The
//! driver is `client_sim::kill` (the long run: `scripts/kill-soak.sh`).

use std::ffi::OsString;
use std::time::Duration;

use client_sim::kill::{KillPlan, run};

/// A few kills (< 60 s): nothing acknowledged is lost, nothing is
/// delivered twice as new or partial as complete, and clips cut mid-upload
/// are re-sent and land once with one seq.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_clips_survive_repeated_kills() {
    let dir = tempfile::tempdir().unwrap();
    let relay: Vec<OsString> = [
        env!("CARGO_BIN_EXE_relay"),
        "serve",
        "--worker-threads",
        "1",
    ]
    .into_iter()
    .map(OsString::from)
    .collect();
    // A fixed seed: the same kill moments on every run.
    let mut plan = KillPlan::new(relay, dir.path().join("data"), 4, 0x12_0004);
    plan.settle = Duration::from_secs(15);
    let report = tokio::time::timeout(Duration::from_secs(120), run(&plan, |l| eprintln!("{l}")))
        .await
        .expect("the kill run ends in time")
        .expect("the kill run works");
    eprintln!("{report:#?}");
    assert!(report.passed(), "failures: {:#?}", report.failures);
    assert_eq!(report.kills, 4);
    assert!(report.clips_acknowledged >= 10, "{report:?}");
    // The kills did cut clips mid-upload, and those were re-sent.
    assert!(report.clips_resent > 0, "{report:?}");
    assert_eq!(report.deliveries_ok, report.deliveries_expected);
}
