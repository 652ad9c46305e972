//! Running the relay for real: certificates reloaded from their files,
//! token keys that rotate, the drain on SIGTERM with `GoAway`, and the
//! limits that keep hostile clients bounded.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use ptt_client::{Client, ClientConfig, ClipParams, Event, Events, Trust};
use ptt_relay::auth::TokenIssuer;

/// A `relay serve` process on a loopback port.
struct RelayProcess {
    child: Child,
    addr: std::net::SocketAddr,
    fingerprint: String,
}

impl RelayProcess {
    fn spawn(data_dir: &Path, extra: &[&str]) -> RelayProcess {
        let mut child = Command::new(env!("CARGO_BIN_EXE_relay"))
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--worker-threads",
                "1",
                "--data-dir",
            ])
            .arg(data_dir)
            .args(extra)
            .env("RUST_LOG", "warn")
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("relay binary starts");
        let stderr = child.stderr.take().expect("piped stderr");
        let mut lines = BufReader::new(stderr).lines();
        let (mut addr, mut fingerprint) = (None, None);
        while addr.is_none() || fingerprint.is_none() {
            let line = lines
                .next()
                .expect("relay prints its address")
                .expect("utf-8");
            if let Some(rest) = line.strip_prefix("relay listening on ") {
                addr = rest.split_whitespace().next().map(|a| a.parse().unwrap());
            }
            if let Some(rest) = line.trim().strip_prefix("certificate sha-256:") {
                fingerprint = Some(rest.trim().to_owned());
            }
        }
        // Keep draining stderr so the relay never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        RelayProcess {
            child,
            addr: addr.expect("address"),
            fingerprint: fingerprint.expect("fingerprint"),
        }
    }

    fn config(&self, token: String) -> ClientConfig {
        let trust = Trust::fingerprint_from_hex(&self.fingerprint).unwrap();
        ClientConfig::new(self.addr, "localhost", trust, token)
    }

    async fn client(&self, token: String) -> (Client, Events) {
        tokio::time::timeout(WAIT, Client::connect(self.config(token)))
            .await
            .expect("connect in time")
            .expect("connect")
    }

    fn sigterm(&self) {
        // The shell's own kill: no procps needed.
        let status = Command::new("sh")
            .args(["-c", &format!("kill -TERM {}", self.child.id())])
            .status()
            .expect("sh runs");
        assert!(status.success());
    }

    /// Waits (polling, bounded by `limit`) for the process to exit.
    async fn exit_within(&mut self, limit: Duration) -> std::process::ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                start.elapsed() < limit,
                "the relay did not exit within {limit:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A data directory with group `team` (alice, bob) made offline, and a
/// token issuer with its key.
fn data_dir() -> (tempfile::TempDir, TokenIssuer) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let run = |args: &[&str]| {
        let status = Command::new(env!("CARGO_BIN_EXE_relay"))
            .args(args)
            .args(["--data-dir", data])
            .status()
            .unwrap();
        assert!(status.success(), "relay {args:?}");
    };
    run(&["group", "create", "team", "--mode", "notes"]);
    run(&["group", "add", "team", "alice", "bob"]);
    let issuer = TokenIssuer::load_or_create(&dir.path().join("token.key")).unwrap();
    (dir, issuer)
}

fn token(issuer: &TokenIssuer, user: &str) -> String {
    issuer.issue(user, Duration::from_secs(600), false, false)
}

/// SIGTERM to a real `relay serve`: connected clients get `GoAway` with
/// the configured hint at once, a clip in flight still finishes and is
/// stored, and the process exits 0 with its store closed.
#[tokio::test]
async fn sigterm_sends_go_away_lets_the_clip_in_flight_finish_and_exits_0() {
    let (dir, issuer) = data_dir();
    let mut relay = RelayProcess::spawn(
        dir.path(),
        &[
            "--shutdown-grace",
            "10s",
            "--goaway-reconnect-after",
            "750ms",
        ],
    );
    let (alice, mut alice_events) = relay.client(token(&issuer, "alice")).await;
    let (bob, mut bob_events) = relay.client(token(&issuer, "bob")).await;
    bob.join("team").await.unwrap();
    let mut talk = alice.talk("team", ClipParams::default()).await.unwrap();
    for frame in frames(7, 5) {
        talk.send_frame(frame).await.unwrap();
    }
    // Bob hears it: the relay has the upload.
    wait_for(&mut bob_events, |e| {
        matches!(e, Event::ClipStarted { .. }).then_some(())
    })
    .await;
    relay.sigterm();
    let (after, address) = wait_for(&mut alice_events, |e| match e {
        Event::GoAway {
            reconnect_after,
            address,
        } => Some((*reconnect_after, address.clone())),
        _ => None,
    })
    .await;
    assert_eq!(after, Duration::from_millis(750));
    assert_eq!(address, None);
    for frame in frames(8, 5) {
        talk.send_frame(frame).await.unwrap();
    }
    let stored = tokio::time::timeout(WAIT, talk.finish(Bytes::new()))
        .await
        .expect("stored in time")
        .expect("the clip in flight is stored during the drain");
    assert_eq!(stored.seq, 1);
    let status = relay.exit_within(WAIT).await;
    assert!(status.success(), "exit status {status:?}");
    drop(bob);

    // The store was closed cleanly and holds the clip.
    let relay = RelayProcess::spawn(dir.path(), &[]);
    let (bob, mut bob_events) = relay.client(token(&issuer, "bob")).await;
    assert_eq!(bob.join("team").await.unwrap().last_seq, 1);
    // Bob heard it live (his cursor is past it): fetch it again.
    assert_eq!(bob.fetch_recent("team", 5).await.unwrap(), 1);
    let clips = collect_clips(&mut bob_events, 1).await;
    assert_eq!(clips[0].frames.len(), 10);
}

/// A second SIGTERM during the drain exits at once, long before the grace
/// period, and every clip acknowledged with `Stored` survives.
#[tokio::test]
async fn a_second_sigterm_exits_at_once_keeping_acknowledged_clips() {
    let (dir, issuer) = data_dir();
    let mut relay = RelayProcess::spawn(dir.path(), &["--shutdown-grace", "60s"]);
    let (alice, mut alice_events) = relay.client(token(&issuer, "alice")).await;
    let stored = alice
        .send_clip("team", ClipParams::default(), frames(3, 6), Bytes::new())
        .await
        .unwrap();
    // A clip in flight holds the drain open for the whole grace period.
    let (bob, mut bob_events) = relay.client(token(&issuer, "bob")).await;
    bob.join("team").await.unwrap();
    let mut talk = alice.talk("team", ClipParams::default()).await.unwrap();
    talk.send_frame(frames(4, 1)[0].clone()).await.unwrap();
    wait_for(&mut bob_events, |e| match e {
        Event::ClipStarted { seq, .. } if *seq != stored.seq => Some(()),
        _ => None,
    })
    .await;
    relay.sigterm();
    wait_for(&mut alice_events, |e| {
        matches!(e, Event::GoAway { .. }).then_some(())
    })
    .await;
    let second = Instant::now();
    relay.sigterm();
    let status = relay.exit_within(Duration::from_secs(10)).await;
    assert!(
        second.elapsed() < Duration::from_secs(5),
        "exited at once, not after the grace period"
    );
    assert!(!status.success(), "a forced exit says so: {status:?}");
    drop((talk, bob));

    let relay = RelayProcess::spawn(dir.path(), &[]);
    let (bob, mut bob_events) = relay.client(token(&issuer, "bob")).await;
    assert_eq!(bob.join("team").await.unwrap().last_seq, stored.seq);
    assert_eq!(bob.fetch_recent("team", 5).await.unwrap(), 1);
    let clips = collect_clips(&mut bob_events, 1).await;
    assert_eq!(clips[0].frames, frames(3, 6));
}

/// A client told to go away waits for the hint and reconnects to the
/// address the GoAway names: another relay with the same certificate and
/// token key.
#[tokio::test]
async fn a_client_told_to_go_away_reconnects_to_the_address_given() {
    let other = TestRelay::start().await;
    let issuer = TokenIssuer::load_or_create(&other.dir.path().join("token.key")).unwrap();
    let hint = Duration::from_millis(600);
    let draining = TestRelay::start_with(|c| {
        c.cert = Some(other.dir.path().join("dev-cert.pem"));
        c.key = Some(other.dir.path().join("dev-key.pem"));
        c.token_public_key = Some(issuer.public_key_base64());
        c.goaway_address = Some(other.handle.addr().to_string());
        c.goaway_reconnect_after = hint;
    })
    .await;
    let config = draining
        .config(token(&issuer, "alice"))
        .with_reconnect(Default::default());
    let (alice, mut events) = draining.connect(config).await;
    assert_eq!(other.handle.session_count(), 0);
    let TestRelay { handle, dir: _dir } = draining;
    let stopping = tokio::spawn(handle.shutdown());
    let address = wait_for(&mut events, |e| match e {
        Event::GoAway { address, .. } => Some(address.clone()),
        _ => None,
    })
    .await;
    let told = Instant::now();
    assert_eq!(address, Some(other.handle.addr().to_string()));
    wait_for(&mut events, |e| {
        matches!(e, Event::Reconnected { .. }).then_some(())
    })
    .await;
    assert!(told.elapsed() >= hint, "waited for the hint");
    assert_eq!(
        other.handle.session_count(),
        1,
        "now connected to the other relay"
    );
    assert!(alice.is_connected());
    stopping.await.unwrap();
}

/// Writes a new self-signed pair for `localhost` to `cert` and `key`;
/// returns its fingerprint.
fn write_pair(cert: &Path, key: &Path) -> String {
    let pair = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    std::fs::write(key, pair.signing_key.serialize_pem()).unwrap();
    std::fs::write(cert, pair.cert.pem()).unwrap();
    ptt_relay::tls::fingerprint_hex(pair.cert.der())
}

fn with_trust(config: ClientConfig, fingerprint: &str) -> ClientConfig {
    ClientConfig {
        trust: Trust::fingerprint_from_hex(fingerprint).unwrap(),
        ..config
    }
}

/// Waits (bounded) until `done` holds.
async fn until(mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < WAIT, "condition not reached in time");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Certificate files replaced under a running relay: new connections get
/// the new certificate, the open one carries on, and damaged files keep
/// the certificate presented.
#[tokio::test]
async fn a_renewed_certificate_reaches_new_connections_and_open_ones_continue() {
    let pem = tempfile::tempdir().unwrap();
    let (cert, key) = (pem.path().join("cert.pem"), pem.path().join("key.pem"));
    let old = write_pair(&cert, &key);
    let relay = TestRelay::start_with(|c| {
        c.cert = Some(cert.clone());
        c.key = Some(key.clone());
        c.reload_interval = Duration::from_millis(50);
    })
    .await;
    relay
        .group("team", ptt_client::GroupMode::Notes, &["alice", "bob"])
        .await;
    assert_eq!(relay.handle.cert_fingerprint(), old);
    let (alice, _alice_events) = relay.client("alice").await;

    let new = write_pair(&cert, &key);
    until(|| relay.handle.current_cert_fingerprint() == new).await;
    let config = with_trust(relay.config(relay.token("bob")), &new);
    let (bob, _bob_events) = relay.connect(config).await;
    bob.join("team").await.unwrap();
    let pinned_old = with_trust(relay.config(relay.token("bob")), &old);
    assert!(
        Client::connect(pinned_old).await.is_err(),
        "a new connection sees the new certificate"
    );
    // The connection made with the old certificate carries on.
    alice.join("team").await.unwrap();
    assert!(alice.is_connected());

    // A damaged renewal: logged, and the certificate stays.
    std::fs::write(&cert, "-----BEGIN CERTIFICATE-----\ngarbage\n").unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(relay.handle.current_cert_fingerprint(), new);
    let config = with_trust(relay.config(relay.token("bob")), &new);
    relay.connect(config).await;
}

/// `relay key rotate` under a running relay: tokens of the new key (with
/// its `kid`) are accepted within the reload interval, tokens without a
/// kid keep working, a retired key's tokens are refused, and a key given
/// in `token_keys` is accepted for its kid.
#[tokio::test]
async fn rotated_token_keys_are_accepted_while_running_and_retired_ones_refused() {
    let other = TokenIssuer::generate().with_kid("issuer-b");
    let relay = TestRelay::start_with(|c| {
        c.reload_interval = Duration::from_millis(50);
        c.token_keys = vec![format!("issuer-b={}", other.public_key_base64())];
    })
    .await;
    let data = relay.dir.path().to_str().unwrap().to_owned();
    let cli = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_relay"))
            .args(args)
            .args(["--data-dir", &data])
            .output()
            .unwrap();
        assert!(out.status.success(), "relay {args:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let unnamed = relay.token("alice");
    let first = cli(&["key", "rotate"]);
    let first = first.split_whitespace().next().unwrap().to_owned();
    let by_first = cli(&["token", "--user", "alice"]).trim().to_owned();
    let verifier = relay.handle.context().verifier.clone();
    until(|| verifier.key_ids().contains(&first)).await;
    for token in [unnamed.clone(), by_first.clone()] {
        let (client, _events) = relay.connect(relay.config(token)).await;
        assert_eq!(client.user(), "alice");
    }
    let by_other = other.issue("carol", Duration::from_secs(60), false, false);
    relay.connect(relay.config(by_other)).await;

    // A second rotation; then the first key is retired.
    cli(&["key", "rotate"]);
    assert!(cli(&["key", "list"]).contains(&first));
    cli(&["key", "retire", &first]);
    until(|| !verifier.key_ids().contains(&first)).await;
    let err = Client::connect(relay.config(by_first))
        .await
        .expect_err("a retired key's token is refused");
    assert_eq!(
        err.code(),
        Some(ptt_client::ErrorCode::InvalidToken),
        "{err}"
    );
    relay.connect(relay.config(unnamed)).await;
    let by_second = cli(&["token", "--user", "bob"]).trim().to_owned();
    relay.connect(relay.config(by_second)).await;
}

/// Counters recorded by the relay (through the `metrics` facade), for
/// tests on a current-thread runtime, where every relay task runs on the
/// test's thread.
#[derive(Default)]
struct Counters(
    std::sync::Mutex<
        std::collections::HashMap<String, std::sync::Arc<std::sync::atomic::AtomicU64>>,
    >,
);

impl Counters {
    /// The counter `name` with labels rendered as `name{k=v}`.
    fn get(&self, name: &str) -> u64 {
        self.0
            .lock()
            .unwrap()
            .get(name)
            .map(|c| c.load(std::sync::atomic::Ordering::Relaxed))
            .unwrap_or(0)
    }
}

impl metrics::Recorder for Counters {
    fn describe_counter(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_gauge(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_histogram(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn register_counter(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Counter {
        let labels: Vec<String> = key
            .labels()
            .map(|l| format!("{}={}", l.key(), l.value()))
            .collect();
        let name = if labels.is_empty() {
            key.name().to_owned()
        } else {
            format!("{}{{{}}}", key.name(), labels.join(","))
        };
        let counter = self.0.lock().unwrap().entry(name).or_default().clone();
        metrics::Counter::from_arc(counter)
    }
    fn register_gauge(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
        metrics::Gauge::noop()
    }
    fn register_histogram(
        &self,
        _: &metrics::Key,
        _: &metrics::Metadata<'_>,
    ) -> metrics::Histogram {
        metrics::Histogram::noop()
    }
}

/// More connections from one address than `max_connections_per_ip` are
/// refused (and counted) while others from it are open; a closed one
/// gives its place back.
#[tokio::test]
async fn connections_per_address_are_limited() {
    let counters = Counters::default();
    let _recorder = metrics::set_default_local_recorder(&counters);
    let relay = TestRelay::start_with(|c| c.max_connections_per_ip = 2).await;
    let (a, _ae) = relay.client("alice").await;
    let (_b, _be) = relay.client("bob").await;
    let err = Client::connect(relay.config(relay.token("carol")))
        .await
        .expect_err("a third connection from 127.0.0.1 is refused");
    assert!(
        matches!(
            err,
            ptt_client::ClientError::Connection(quinn::ConnectionError::ConnectionClosed(_))
        ),
        "refused by the transport (CONNECTION_REFUSED): {err:?}"
    );
    assert_eq!(
        counters.get("ptt_connections_refused_total{reason=per_ip}"),
        1
    );
    a.close().await;
    let start = Instant::now();
    loop {
        if Client::connect(relay.config(relay.token("carol")))
            .await
            .is_ok()
        {
            break;
        }
        assert!(
            start.elapsed() < WAIT,
            "the closed connection's place came back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Above `handshakes_per_second`, new clients are asked for a QUIC Retry
/// (address validation) and still get in; below it, none is.
#[tokio::test]
async fn a_burst_of_handshakes_gets_retries_and_still_connects() {
    let counters = Counters::default();
    let _recorder = metrics::set_default_local_recorder(&counters);
    // One a second: even on a loaded machine, where a connect takes a
    // few hundred ms, most of the burst finds the bucket empty.
    let relay = TestRelay::start_with(|c| c.handshakes_per_second = 1).await;
    let mut clients = vec![relay.client("early").await];
    assert_eq!(counters.get("ptt_handshake_retries_total"), 0);
    for i in 0..6 {
        let (client, events) = relay.client(&format!("burst{i}")).await;
        assert!(client.is_connected());
        clients.push((client, events));
    }
    let retries = counters.get("ptt_handshake_retries_total");
    assert!(retries >= 3, "{retries} retries for 7 handshakes at 1/s");
    assert_eq!(relay.handle.session_count(), 7);
}

/// `user_clips_per_minute` counts a user's clips over all their
/// connections: two connections cannot double the rate.
#[tokio::test]
async fn clips_per_minute_are_limited_per_user_across_connections() {
    let counters = Counters::default();
    let _recorder = metrics::set_default_local_recorder(&counters);
    let relay = TestRelay::start_with(|c| c.user_clips_per_minute = 3).await;
    relay
        .group("team", ptt_client::GroupMode::Notes, &["alice", "bob"])
        .await;
    let (phone, _pe) = relay.client("alice").await;
    let (laptop, _le) = relay.client("alice").await;
    let (bob, _be) = relay.client("bob").await;
    let send = |client: &Client, tag: u8| {
        let client = client.clone();
        async move {
            client
                .send_clip("team", ClipParams::default(), frames(tag, 3), Bytes::new())
                .await
        }
    };
    send(&phone, 1).await.unwrap();
    send(&laptop, 2).await.unwrap();
    send(&phone, 3).await.unwrap();
    let err = send(&laptop, 4).await.expect_err("the user's fourth clip");
    assert_eq!(
        err.code(),
        Some(ptt_client::ErrorCode::RateLimited),
        "{err}"
    );
    assert_eq!(
        counters.get("ptt_clips_rejected_total{reason=user_rate}"),
        1
    );
    send(&bob, 5).await.expect("another user is not limited");
}

/// A connection that goes silent (no keep-alive) is closed by the relay's
/// `idle_timeout`, and the relay forgets its session.
#[tokio::test]
async fn a_silent_connection_is_closed_after_the_idle_timeout() {
    let relay = TestRelay::start_with(|c| c.idle_timeout = Duration::from_millis(500)).await;
    let raw = raw::Raw::connect_with(&relay, |client| {
        // No keep-alive; the relay's shorter timeout governs.
        client.transport_config(std::sync::Arc::new(quinn::TransportConfig::default()));
    })
    .await;
    let (_send, _control) = raw.hello_as(&relay, "mallory").await;
    assert_eq!(relay.handle.session_count(), 1);
    let silent = Instant::now();
    let reason = tokio::time::timeout(WAIT, raw.conn.closed())
        .await
        .expect("closed in time");
    assert!(
        matches!(reason, quinn::ConnectionError::TimedOut),
        "{reason:?}"
    );
    assert!(silent.elapsed() >= Duration::from_millis(300));
    until(|| relay.handle.session_count() == 0).await;
}

/// `max_streams_per_connection` is QUIC stream credit: a client cannot
/// open more clip streams than that at once, whatever it sends.
#[tokio::test]
async fn a_client_cannot_open_more_streams_than_its_credit() {
    let relay = TestRelay::start_with(|c| c.max_streams_per_connection = 2).await;
    let (raw, _send, _control) = raw::Raw::hello(&relay, "mallory").await;
    let _a = raw.conn.open_uni().await.unwrap();
    let _b = raw.conn.open_uni().await.unwrap();
    let third = tokio::time::timeout(Duration::from_millis(300), raw.conn.open_uni()).await;
    assert!(third.is_err(), "no credit for a third stream");
}

/// One address opening handshakes faster than `handshakes_per_ip_per_second`
/// is made to validate, then refused; another address is not affected.
#[tokio::test]
async fn a_flooding_address_is_refused_and_others_get_in() {
    let counters = Counters::default();
    let _recorder = metrics::set_default_local_recorder(&counters);
    let relay = TestRelay::start_with(|c| c.handshakes_per_ip_per_second = 1).await;
    let client = ptt_client::quinn_config(&relay.config(String::new())).unwrap();
    let endpoint_on = |ip: &str| {
        let mut endpoint = quinn::Endpoint::client(format!("{ip}:0").parse().unwrap()).unwrap();
        endpoint.set_default_client_config(client.clone());
        endpoint
    };
    let flooder = endpoint_on("127.0.0.1");
    let mut completed = 0;
    for _ in 0..20 {
        let connecting = flooder.connect(relay.handle.addr(), "localhost").unwrap();
        if let Ok(Ok(conn)) = tokio::time::timeout(WAIT, connecting).await {
            completed += 1;
            conn.close(0u32.into(), b"");
        }
    }
    // 1 a second and 1 more validated (plus what refills while a loaded
    // machine runs the loop).
    assert!(completed < 15, "{completed} of 20 handshakes completed");
    assert!(counters.get("ptt_connections_refused_total{reason=handshake_rate_per_ip}") >= 5);
    assert!(counters.get("ptt_handshake_retries_total") >= 1);
    let neighbour = endpoint_on("127.0.0.2");
    let conn = neighbour
        .connect(relay.handle.addr(), "localhost")
        .unwrap()
        .await
        .expect("another address gets in");
    conn.close(0u32.into(), b"");
}

/// `user_frames_per_second` counts a user's uploaded frames over all their
/// connections: past the burst the upload is refused `RateLimited` and
/// its live copy cut, while other talkers and the members are unaffected.
#[tokio::test]
async fn frames_per_second_are_limited_per_user_across_connections() {
    let counters = Counters::default();
    let _recorder = metrics::set_default_local_recorder(&counters);
    // One frame a second after a burst of 100: nothing refills while the
    // test runs, however slow the machine.
    let relay = TestRelay::start_with(|c| {
        c.user_frames_per_second = 1;
        c.user_frames_burst = 100;
    })
    .await;
    relay
        .group(
            "team",
            ptt_client::GroupMode::Notes,
            &["alice", "bob", "carol"],
        )
        .await;
    let (phone, _pe) = relay.client("alice").await;
    let (laptop, _le) = relay.client("alice").await;
    let (bob, _be) = relay.client("bob").await;
    let (_carol, mut carol_events) = relay.member("carol", "team").await;
    let send = |client: &Client, tag: u8, n: usize| {
        let client = client.clone();
        async move {
            client
                .send_clip("team", ClipParams::default(), frames(tag, n), Bytes::new())
                .await
        }
    };
    send(&phone, 1, 60).await.expect("within the burst");
    let err = send(&laptop, 2, 60)
        .await
        .expect_err("the user's burst is spent, on another connection too");
    assert_eq!(
        err.code(),
        Some(ptt_client::ErrorCode::RateLimited),
        "{err}"
    );
    assert_eq!(
        counters.get("ptt_clips_rejected_total{reason=user_frame_rate}"),
        1
    );
    send(&bob, 3, 60)
        .await
        .expect("another user is not limited");
    let clips = collect_clips(&mut carol_events, 2).await;
    let tags: Vec<u8> = clips.iter().map(|c| c.frames[0][0]).collect();
    assert_eq!(tags, [1, 3], "the refused clip is not delivered");
    assert!(clips.iter().all(|c| c.frames.len() == 60));
}
