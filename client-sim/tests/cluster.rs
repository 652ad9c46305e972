//! `client-sim --relay A,B --scenario cluster` (issue #10) through the real
//! binary, against two relay nodes started in this test process on one
//! real `nats-server` (JetStream in a temporary directory, loopback): every
//! clip reaches every member once, members sit on both nodes and both
//! deliver, and the late members catch up from the shared store.
//!
//! Needs `nats-server` (`./dev.sh setup` installs it; `$NATS_SERVER`
//! names another); without it the test fails saying so.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ptt_relay::RelayConfig;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_scenario_spreads_clients_over_two_nodes_and_delivers_every_clip_once() {
    let nats = Nats::start();
    let dir_a = tempfile::tempdir().unwrap();
    let dir_b = tempfile::tempdir().unwrap();
    let a = node(dir_a.path(), &nats.url()).await;
    // The nodes of one deployment accept the same tokens.
    std::fs::copy(
        dir_a.path().join("token.key"),
        dir_b.path().join("token.key"),
    )
    .unwrap();
    let b = node(dir_b.path(), &nats.url()).await;

    let report = dir_a.path().join("cluster.json");
    let relays = format!("{},{}", a.addr(), b.addr());
    let fingerprints = format!("{},{}", a.cert_fingerprint(), b.cert_fingerprint());
    // Both nodes run in this process: their CPU figures are this process's
    // (checked for presence, as the plumbing of `--relay-pid A,B`).
    let pid = std::process::id().to_string();
    let args: Vec<String> = [
        "--relay",
        &relays,
        "--fingerprint",
        &fingerprints,
        "--token-key",
        &dir_a.path().join("token.key").display().to_string(),
        "--relay-pid",
        &format!("{pid},{pid}"),
        "--scenario",
        "cluster",
        "--clients",
        "40",
        "--duration",
        "4s",
        "--quiet",
        "--report",
        &report.display().to_string(),
    ]
    .map(str::to_owned)
    .into();
    let started = Instant::now();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_client-sim"))
            .args(&args)
            .output()
            .expect("client-sim runs")
    })
    .await
    .unwrap();
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
    let n = |v: &serde_json::Value| v.as_u64().unwrap_or_else(|| panic!("not a count: {v}"));
    assert!(n(&json["deliveries_expected"]) > 0, "{stdout}");
    assert_eq!(
        n(&json["deliveries_ok"]),
        n(&json["deliveries_expected"]),
        "{stdout}"
    );
    for k in [
        "deliveries_missing",
        "deliveries_corrupt",
        "deliveries_duplicate",
        "misdelivered",
        "connect_failures",
    ] {
        assert_eq!(n(&json[k]), 0, "{k}: {stdout}");
    }
    assert!(
        n(&json["catch_up_deliveries"]) > 0,
        "late members: {stdout}"
    );
    let nodes = json["nodes"].as_array().expect("per-node figures");
    assert_eq!(nodes.len(), 2, "{stdout}");
    for (node, addr) in nodes.iter().zip([a.addr(), b.addr()]) {
        assert_eq!(node["addr"], addr.to_string());
        assert_eq!(n(&node["clients_connected"]), 20, "half on each: {stdout}");
        assert!(n(&node["frames_delivered"]) > 0, "both deliver: {stdout}");
        assert!(
            node["relay"]["cpu_us_per_frame"].as_f64().is_some(),
            "CPU measured per node: {stdout}"
        );
    }
    assert_eq!(
        n(&nodes[0]["frames_delivered"]) + n(&nodes[1]["frames_delivered"]),
        n(&json["frames_delivered"])
    );

    a.shutdown().await;
    b.shutdown().await;
}

/// A relay node on NATS, in this process.
async fn node(dir: &std::path::Path, nats: &str) -> ptt_relay::RelayHandle {
    let mut config = RelayConfig::for_tests(dir);
    config.cluster.nats = vec![nats.to_owned()];
    config.cluster.request_timeout = Duration::from_secs(2);
    ptt_relay::start(config).await.expect("node starts")
}

/// A `nats-server` with JetStream on a free loopback port, its store in a
/// temporary directory; stopped when dropped.
struct Nats {
    child: Child,
    port: u16,
    _store: tempfile::TempDir,
}

impl Nats {
    fn start() -> Nats {
        let binary = nats_binary();
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let store = tempfile::tempdir().unwrap();
        let child = Command::new(&binary)
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(store.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", binary.display()));
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "nats-server did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        Nats {
            child,
            port,
            _store: store,
        }
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `$NATS_SERVER`, or `nats-server` on the PATH (Debian puts it in
/// /usr/sbin).
fn nats_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("NATS_SERVER") {
        return PathBuf::from(path);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/bin")])
        .map(|dir| dir.join("nats-server"))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| {
            panic!("no nats-server binary (PATH, /usr/sbin or $NATS_SERVER): run ./dev.sh setup")
        })
}
