//! Network faults (issue #12), fast: the `netfaults` scenario, cut down to
//! 12 clients and a few seconds, with 15 % loss each way on top of its
//! delay, jitter, reordering and duplication; every stored clip must reach
//! every member whole and once (the long runs per loss level:
//! `scripts/net-faults.sh`).

use std::process::Command;
use std::time::{Duration, Instant};

#[test]
fn every_clip_arrives_whole_under_15_percent_loss_reordering_and_duplication() {
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("netfaults.json");
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_client-sim"))
        .args([
            "--embedded",
            "--scenario",
            "netfaults",
            "--loss",
            "0.15",
            "--clients",
            "12",
            "--duration",
            "5s",
            "--clip-min",
            "500ms",
            "--clip-max",
            "2s",
            "--settle",
            "40s",
            "--quiet",
            "--report",
        ])
        .arg(&report)
        .output()
        .expect("client-sim runs");
    let elapsed = started.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "client-sim failed ({:?})\n{stdout}\n{stderr}",
        out.status
    );
    assert!(elapsed < Duration::from_secs(90), "took {elapsed:?}");
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    let n = |k: &str| {
        json[k]
            .as_u64()
            .unwrap_or_else(|| panic!("{k} missing in {json}"))
    };
    assert!(n("deliveries_expected") >= 10, "{stdout}");
    assert_eq!(n("deliveries_ok"), n("deliveries_expected"), "{stdout}");
    for k in [
        "deliveries_missing",
        "deliveries_corrupt",
        "deliveries_duplicate",
        "misdelivered",
        "seq_inconsistent",
        "connect_failures",
    ] {
        assert_eq!(n(k), 0, "{k}\n{stdout}");
    }
    // The late member of each group caught up from the store.
    assert!(n("catch_up_deliveries") > 0, "{stdout}");
    // The faults did happen, each way.
    let net = &json["network"];
    let count = |k: &str| net[k].as_u64().unwrap_or_else(|| panic!("{k} in {net}"));
    let rate = |dropped: &str, total: &str| count(dropped) as f64 / count(total).max(1) as f64;
    let out_rate = rate("sent_dropped", "sent");
    let in_rate = rate("received_dropped", "received");
    assert!((0.10..0.20).contains(&out_rate), "{out_rate} out in {net}");
    assert!((0.10..0.20).contains(&in_rate), "{in_rate} in in {net}");
    assert!(count("reordered") > 0 && count("duplicated") > 0, "{net}");
    for p in ["p50", "p90", "p99"] {
        assert!(
            json["latency_ms"]["frame"][p].as_f64().unwrap() > 0.0,
            "frame latency {p}"
        );
    }
    assert_eq!(json["failed"], false);
}
