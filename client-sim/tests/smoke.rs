//! Runs the `smoke` scenario against an in-process relay through the real
//! binary and checks its JSON report: deliveries happened, none failed.

use std::process::Command;
use std::time::{Duration, Instant};

#[test]
fn the_smoke_scenario_delivers_every_clip_exactly_once() {
    let json = smoke(&[]);
    assert_eq!(json["client"]["media_frames"], 0, "streams by default");
}

/// The same with live frames on the UDP media path (PROTOCOL.md §14).
#[test]
fn the_smoke_scenario_delivers_every_clip_exactly_once_on_the_media_path() {
    let json = smoke(&["--media", "udp"]);
    let media = json["client"]["media_frames"].as_u64().unwrap();
    assert!(
        media > json["frames_delivered"].as_u64().unwrap() / 2,
        "most frames by UDP: {json}"
    );
}

/// Runs the smoke scenario with `extra` arguments, checks its report, and
/// returns it.
fn smoke(extra: &[&str]) -> serde_json::Value {
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("smoke.json");
    let plot = dir.path().join("smoke.svg");
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_client-sim"))
        .args(["--embedded", "--scenario", "smoke", "--quiet", "--report"])
        .arg(&report)
        .arg("--plot")
        .arg(&plot)
        .args(extra)
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
    assert!(elapsed < Duration::from_secs(60), "took {elapsed:?}");
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    let n = |k: &str| {
        json[k]
            .as_u64()
            .unwrap_or_else(|| panic!("{k} missing in {json}"))
    };
    assert!(n("deliveries_expected") > 0, "{stdout}");
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
    assert!(n("frames_delivered") > 0);
    assert_eq!(json["failed"], false);
    for k in [
        "connect",
        "floor_grant",
        "first_frame",
        "frame",
        "late_entry",
        "clip_complete",
        "stored_ack",
    ] {
        let s = &json["latency_ms"][k];
        for p in ["p50", "p95", "p99", "max"] {
            assert!(s[p].is_number(), "latency_ms.{k}.{p} in {json}");
        }
    }
    for k in [
        "connect",
        "frame",
        "first_frame",
        "clip_complete",
        "stored_ack",
    ] {
        assert!(json["latency_ms"][k]["count"].as_u64().unwrap() > 0, "{k}");
    }
    assert!(json["relay"]["cpu_s"].is_number());
    assert!(json["relay"]["rss_mib"].is_number());
    assert_eq!(json["relay"]["includes_simulator"], true);
    let svg = std::fs::read_to_string(&plot).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("frame latency"));
    assert!(stdout.contains("RESULT: every stored clip reached every member"));
    json
}
