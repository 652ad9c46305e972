//! Operating a relay: `relay group` against a stopped data directory and
//! against a running relay (a real `relay` process), member status, clip
//! listing, deletion with tombstones, export as Ogg Opus (opened by
//! opusinfo and ffprobe).

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use ptt_client::{Client, ClientConfig, ErrorCode, Event, GroupMode, Trust};

const RELAY: &str = env!("CARGO_BIN_EXE_relay");

/// Runs `relay args…`: (success, stdout, stderr).
fn relay(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(RELAY)
        .args(args)
        .env_remove("PTT_ADMIN_TOKEN")
        .output()
        .expect("run relay");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `relay group args… --data-dir dir [--relay addr]` and expects it
/// to succeed; its stdout.
fn group(dir: &Path, addr: Option<&str>, args: &[&str]) -> String {
    let mut all = vec!["group"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--data-dir", dir.to_str().unwrap()]);
    if let Some(addr) = addr {
        all.extend_from_slice(&["--relay", addr]);
    }
    let (ok, out, err) = relay(&all);
    assert!(ok, "relay {all:?} failed: {err}");
    out
}

/// A `relay serve` process on a free loopback port, killed when dropped.
struct Served {
    child: Child,
    addr: String,
    /// Its log lines so far (stderr).
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Served {
    fn start(dir: &Path) -> Served {
        let port = std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let mut child = Command::new(RELAY)
            .args(["serve", "--listen", &addr, "--data-dir"])
            .arg(dir)
            .args(["--worker-threads", "1", "--shutdown-grace", "1s"])
            .args(["--log-format", "json"])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start relay serve");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let kept = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("relay listening on") {
                    let _ = tx.send(());
                }
                kept.lock().unwrap().push(line);
            }
        });
        rx.recv_timeout(WAIT).expect("relay serve started");
        Served { child, addr, lines }
    }

    /// SIGTERM, and the exit status.
    fn stop(mut self) -> bool {
        let id = self.child.id().to_string();
        // The shell's own `kill` (no procps needed).
        Command::new("sh")
            .args(["-c", &format!("kill -TERM {id}")])
            .status()
            .unwrap();
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.success();
            }
            assert!(Instant::now() < deadline, "relay did not stop");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One second of a 440 Hz tone as a 48 kHz mono WAV.
fn tone_wav() -> Bytes {
    let mut out = std::io::Cursor::new(Vec::new());
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: 48_000,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut w = hound::WavWriter::new(&mut out, spec).unwrap();
    for i in 0..48_000 {
        let t = i as f32 / 48_000.0;
        w.write_sample((f32::sin(t * 440.0 * std::f32::consts::TAU) * 8000.0) as i16)
            .unwrap();
    }
    w.finalize().unwrap();
    Bytes::from(out.into_inner())
}

/// A client of a relay process, trusting the data directory's certificate.
async fn connect_to(dir: &Path, addr: &str, user: &str) -> (Client, ptt_client::Events) {
    let (ok, token, err) = relay(&["token", "--user", user, "--data-dir", dir.to_str().unwrap()]);
    assert!(ok, "{err}");
    let pem = std::fs::read_to_string(dir.join("dev-cert.pem")).unwrap();
    let trust = Trust::CertificatePem(pem.into_bytes());
    let config = ClientConfig::new(addr.parse().unwrap(), "localhost", trust, token.trim());
    tokio::time::timeout(WAIT, Client::connect(config))
        .await
        .expect("connect in time")
        .expect("connect")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_commands_work_offline_and_against_a_running_relay() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Offline, on a data directory no relay runs on.
    group(d, None, &["create", "team", "--mode", "notes"]);
    group(d, None, &["add", "team", "alice", "bob"]);
    assert!(group(d, None, &["list"]).contains("team\tnotes\tmax 60 s\talice,bob"));

    let served = Served::start(d);
    let addr = Some(served.addr.as_str());
    // The same commands while it runs: through the relay.
    group(d, addr, &["create", "ops", "--mode", "walkie"]);
    group(d, addr, &["add", "ops", "carol"]);
    group(d, addr, &["mode", "ops", "notes"]);
    group(d, addr, &["remove", "team", "bob"]);
    let listed = group(d, addr, &["list"]);
    assert!(listed.contains("ops\tnotes\tcarol"), "{listed}");
    assert!(listed.contains("team\tnotes\talice\n"), "{listed}");
    // Refusals come back as errors, not successes.
    let (ok, _, err) = relay(&[
        "group",
        "create",
        "ops",
        "--data-dir",
        d.to_str().unwrap(),
        "--relay",
        &served.addr,
    ]);
    assert!(!ok && err.contains("GroupExists"), "{err}");

    // A clip, listed, exported and deleted while the relay runs.
    let (alice, _events) = connect_to(d, &served.addr, "alice").await;
    alice.join("team").await.unwrap();
    let stored = alice.upload_wav("team", tone_wav()).await.unwrap();
    assert_eq!(stored.seq, 1);
    alice.close().await;
    let clips = group(d, addr, &["clips", "team"]);
    let line = clips.lines().next().expect("one clip listed");
    let fields: Vec<&str> = line.split('\t').collect();
    // 51 frames of 20 ms: the second of audio and the encoder's delay.
    assert_eq!(&fields[..3], &["1", "alice", "1.020 s"], "{clips}");
    let members = group(d, addr, &["members", "team"]);
    assert!(
        members.starts_with("alice\tcursor 1\tlast seen 20"),
        "{members}"
    );

    let ogg = d.join("clip-1.ogg");
    group(
        d,
        addr,
        &["export", "team", "1", "-o", ogg.to_str().unwrap()],
    );
    check_ogg(&ogg, 1.0);

    group(d, addr, &["delete", "team", "1"]);
    assert_eq!(group(d, addr, &["clips", "team"]), "");
    let (ok, _, err) = relay(&[
        "group",
        "delete",
        "team",
        "1",
        "--data-dir",
        d.to_str().unwrap(),
        "--relay",
        &served.addr,
    ]);
    assert!(!ok && err.contains("NoSuchClip"), "{err}");
    // `--log-format json`: one object per line, with the session's span.
    let lines = served.lines.lock().unwrap().clone();
    let connected = lines
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["fields"]["message"] == "connected" && v["span"]["user"] == "alice")
        .unwrap_or_else(|| panic!("a JSON line for alice's connection in {lines:#?}"));
    assert_eq!(connected["level"], "INFO");
    assert_eq!(connected["span"]["name"], "session");
    // Tokens need only the key: issued while it runs, as shown above.
    assert!(served.stop(), "relay exits 0 on SIGTERM");

    // Offline again: what the running relay did is in the store.
    let members = group(d, None, &["members", "team"]);
    assert!(
        members.starts_with("alice\tcursor 1\tlast seen 20"),
        "{members}"
    );
    assert_eq!(group(d, None, &["clips", "team"]), "");
    assert!(group(d, None, &["list"]).contains("ops\tnotes\tmax 60 s\tcarol"));
    let (ok, _, _) = relay(&[
        "group",
        "export",
        "team",
        "1",
        "-o",
        ogg.to_str().unwrap(),
        "--data-dir",
        d.to_str().unwrap(),
    ]);
    assert!(!ok, "a deleted clip cannot be exported");
}

/// Opens `path` with opusinfo and ffprobe: a valid Ogg Opus stream of
/// about `seconds`.
fn check_ogg(path: &Path, seconds: f64) {
    let info = Command::new("opusinfo")
        .arg(path)
        .output()
        .expect("opusinfo installed");
    let text = String::from_utf8_lossy(&info.stdout);
    assert!(info.status.success(), "opusinfo: {text}");
    assert!(
        !text.contains("WARNING") && !text.contains("ERROR"),
        "{text}"
    );
    let probe = Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-show_entries",
            "format=duration",
            "-of",
            "csv=p=0",
        ])
        .arg(path)
        .output()
        .expect("ffprobe installed");
    assert!(
        probe.status.success(),
        "{}",
        String::from_utf8_lossy(&probe.stderr)
    );
    let duration: f64 = String::from_utf8_lossy(&probe.stdout)
        .trim()
        .parse()
        .unwrap();
    assert!((duration - seconds).abs() < 0.05, "duration {duration}");
}

#[tokio::test]
async fn export_offline_writes_a_file_players_open() {
    let relay_ = TestRelay::start().await;
    relay_.group("team", GroupMode::Notes, &["alice"]).await;
    let (alice, _e) = relay_.client("alice").await;
    alice.upload_wav("team", tone_wav()).await.unwrap();
    alice.close().await;
    let dir = relay_.dir.path().to_owned();
    relay_.handle.shutdown().await;
    let ogg = dir.join("offline.ogg");
    group(
        &dir,
        None,
        &["export", "team", "1", "--out", ogg.to_str().unwrap()],
    );
    check_ogg(&ogg, 1.0);
}

/// Waits until `check` passes on the admin's member status.
async fn cursor_of(admin: &Client, user: &str) -> u64 {
    admin
        .member_status("team")
        .await
        .unwrap()
        .into_iter()
        .find(|m| m.user == user)
        .expect("a member")
        .cursor
}

#[tokio::test]
async fn a_deleted_clip_is_tombstoned_live_and_on_the_next_join() {
    let relay_ = TestRelay::start().await;
    relay_
        .group("team", GroupMode::Notes, &["alice", "bob", "carol"])
        .await;
    let admin_token = relay_
        .handle
        .issue_token("root", Duration::from_secs(60), true, false)
        .unwrap();
    let (admin, _) = relay_.connect(relay_.config(admin_token)).await;
    let (alice, _a) = relay_.client("alice").await;
    let (_bob, mut bob_events) = relay_.member("bob", "team").await;
    let (carol, mut carol_events) = relay_.member("carol", "team").await;
    let mut ids = Vec::new();
    for tag in 1..=2 {
        let stored = alice
            .send_clip("team", params(), frames(tag, 5), Bytes::new())
            .await
            .unwrap();
        ids.push(stored.clip_id);
    }
    assert_eq!(collect_clips(&mut carol_events, 2).await.len(), 2);
    assert_eq!(collect_clips(&mut bob_events, 2).await.len(), 2);
    // Carol's acks are written, then she goes away.
    let deadline = Instant::now() + WAIT;
    while cursor_of(&admin, "carol").await < 2 {
        assert!(Instant::now() < deadline, "carol's cursor reached 2");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    carol.close().await;
    let stored = alice
        .send_clip("team", params(), frames(3, 5), Bytes::new())
        .await
        .unwrap();
    ids.push(stored.clip_id);

    // Only admins delete.
    let error = alice.delete_clip("team", 2).await.unwrap_err();
    assert_eq!(error.code(), Some(ErrorCode::Forbidden));
    admin.delete_clip("team", 2).await.unwrap();
    admin.delete_clip("team", 3).await.unwrap();
    let error = admin.delete_clip("team", 3).await.unwrap_err();
    assert_eq!(error.code(), Some(ErrorCode::NoSuchClip));
    let listed: Vec<u64> = admin
        .list_clips("team", 0, 100)
        .await
        .unwrap()
        .iter()
        .map(|c| c.seq)
        .collect();
    assert_eq!(listed, [1]);

    // Bob, online: told at once, for each.
    let mut deleted = Vec::new();
    while deleted.len() < 2 {
        deleted.push(
            wait_for(&mut bob_events, |e| match e {
                Event::ClipDeleted { seq, clip_id, .. } => Some((*seq, *clip_id)),
                _ => None,
            })
            .await,
        );
    }
    deleted.sort();
    assert_eq!(deleted, [(2, ids[1]), (3, ids[2])]);

    // Carol, away: told when she joins again; clip 3 never comes, and her
    // cursor moves past it.
    let (carol, mut carol_events) = relay_.member("carol", "team").await;
    let mut told = Vec::new();
    let caught_up = tokio::time::timeout(WAIT, async {
        loop {
            match carol_events.next().await.expect("events") {
                Event::ClipDeleted { seq, .. } => told.push(seq),
                Event::ClipStarted { seq, .. } => panic!("clip {seq} was deleted"),
                Event::CaughtUp { seq, .. } => return seq,
                _ => {}
            }
        }
    })
    .await
    .expect("caught up");
    assert_eq!(caught_up, 3);
    told.sort();
    assert_eq!(told, [2, 3]);
    let deadline = Instant::now() + WAIT;
    while cursor_of(&admin, "carol").await < 3 {
        assert!(
            Instant::now() < deadline,
            "carol's cursor moved past the deleted clip"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // And the next clip flows as usual.
    alice
        .send_clip("team", params(), frames(4, 5), Bytes::new())
        .await
        .unwrap();
    let got = collect_clips(&mut carol_events, 1).await;
    assert_eq!(got[0].seq, 4);
    drop(carol);
    // A member never seen before gets no tombstones.
    let status = admin.member_status("team").await.unwrap();
    assert!(status.iter().all(|m| m.last_seen_ms > 0), "{status:?}");
}

#[tokio::test]
async fn fetch_clip_sends_one_clip_or_no_such_clip() {
    let relay_ = TestRelay::start().await;
    relay_.group("team", GroupMode::Notes, &["alice"]).await;
    let (alice, mut events) = relay_.client("alice").await;
    let sent = frames(7, 4);
    alice
        .send_clip("team", params(), sent.clone(), Bytes::new())
        .await
        .unwrap();
    assert_eq!(alice.fetch_clip("team", 1).await.unwrap(), 1);
    let got = collect_clips(&mut events, 1).await;
    assert_eq!((got[0].seq, &got[0].frames), (1, &sent));
    let error = alice.fetch_clip("team", 9).await.unwrap_err();
    assert_eq!(error.code(), Some(ErrorCode::NoSuchClip));
    let (bob, _) = relay_.client("bob").await;
    let error = bob.fetch_clip("team", 1).await.unwrap_err();
    assert_eq!(error.code(), Some(ErrorCode::NotMember));
}
