//! Bad input closes only the offending stream or connection; a relay
//! killed without a clean shutdown keeps every clip it acknowledged.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use common::raw::{Raw, header};
use common::*;
use ptt_client::{ClipParams, ErrorCode, GroupMode};
use ptt_protocol::coding::put_varint;
use ptt_protocol::message::kind;
use ptt_protocol::{ClipMessage, ControlMessage};

/// A group where carol listens, to show that others carry on.
async fn bystanders(
    relay: &TestRelay,
) -> (ptt_client::Client, ptt_client::Events, ptt_client::Client) {
    relay
        .group("team", GroupMode::Notes, &["mallory", "alice", "carol"])
        .await;
    let (alice, _) = relay.member("alice", "team").await;
    let (carol, carol_events) = relay.member("carol", "team").await;
    (alice, carol_events, carol)
}

async fn others_carry_on(alice: &ptt_client::Client, carol_events: &mut ptt_client::Events) {
    let stored = alice
        .send_clip("team", ClipParams::default(), frames(9, 4), Bytes::new())
        .await
        .unwrap();
    let clips = collect_clips(carol_events, 1).await;
    assert_eq!(clips[0].seq, stored.seq);
}

#[tokio::test]
async fn a_malformed_control_message_closes_only_its_connection() {
    let relay = TestRelay::start().await;
    let (alice, mut carol_events, _carol) = bystanders(&relay).await;
    let (raw, mut send, _control) = Raw::hello(&relay, "mallory").await;
    // A join whose group string claims 9 bytes in a 3-byte payload.
    send.write_all(&[kind::JOIN as u8, 0x03, 0x01, 0x09, b'g'])
        .await
        .unwrap();
    assert_eq!(
        raw.closed_with().await,
        u64::from(ErrorCode::Protocol.code())
    );
    others_carry_on(&alice, &mut carol_events).await;
}

#[tokio::test]
async fn an_oversized_control_message_closes_only_its_connection() {
    let relay = TestRelay::start().await;
    let (alice, mut carol_events, _carol) = bystanders(&relay).await;
    let (raw, mut send, _control) = Raw::hello(&relay, "mallory").await;
    let mut buf = BytesMut::new();
    put_varint(&mut buf, kind::JOIN);
    put_varint(&mut buf, 1 << 20);
    buf.put_bytes(0, 1000);
    let _ = send.write_all(&buf).await;
    assert_eq!(
        raw.closed_with().await,
        u64::from(ErrorCode::TooLarge.code())
    );
    others_carry_on(&alice, &mut carol_events).await;
}

#[tokio::test]
async fn a_bad_clip_stream_is_stopped_and_the_connection_lives_on() {
    let relay = TestRelay::start().await;
    let (alice, mut carol_events, _carol) = bystanders(&relay).await;
    let (raw, mut send, mut control) = Raw::hello(&relay, "mallory").await;

    let cases: Vec<(Bytes, ErrorCode)> = vec![
        // A frame before the header.
        (
            ClipMessage::Frame {
                index: 0,
                data: Bytes::from_static(b"x"),
            }
            .to_bytes(),
            ErrorCode::OutOfOrder,
        ),
        // Frames numbered wrong.
        (
            [
                ClipMessage::Header(header("team")).to_bytes(),
                ClipMessage::Frame {
                    index: 5,
                    data: Bytes::from_static(b"x"),
                }
                .to_bytes(),
            ]
            .concat()
            .into(),
            ErrorCode::OutOfOrder,
        ),
        // A frame over the relay's 8 KiB limit.
        (
            [
                ClipMessage::Header(header("team")).to_bytes(),
                ClipMessage::Frame {
                    index: 0,
                    data: Bytes::from(vec![0u8; 9000]),
                }
                .to_bytes(),
            ]
            .concat()
            .into(),
            ErrorCode::TooLarge,
        ),
        // Garbage bytes: an unknown message type on a clip stream.
        (Bytes::from_static(&[0x3f, 0x01, 0x00]), ErrorCode::Protocol),
    ];
    for (bytes, expected) in cases {
        let mut stream = raw.conn.open_uni().await.unwrap();
        let _ = stream.write_all(&bytes).await;
        let stopped = tokio::time::timeout(WAIT, stream.stopped())
            .await
            .expect("stopped in time");
        assert_eq!(
            stopped.unwrap().map(|c| c.into_inner()),
            Some(u64::from(expected.code()))
        );
        match control.next().await {
            Some(ControlMessage::ClipRejected { code, .. }) => assert_eq!(code, expected),
            other => panic!("expected a rejection, got {other:?}"),
        }
    }
    // The connection still works.
    let join = ControlMessage::Join {
        request_id: 7,
        group: "team".into(),
    };
    send.write_all(&join.to_bytes()).await.unwrap();
    assert!(matches!(
        control.next().await,
        Some(ControlMessage::Joined { request_id: 7, .. })
    ));
    others_carry_on(&alice, &mut carol_events).await;
}

#[tokio::test]
async fn no_hello_in_time_or_a_clip_before_hello_closes_the_connection() {
    let relay = TestRelay::start_with(|c| c.auth_timeout = Duration::from_millis(300)).await;
    let silent = Raw::connect(&relay).await;
    assert_eq!(
        silent.closed_with().await,
        u64::from(ErrorCode::AuthTimeout.code())
    );

    let eager = Raw::connect(&relay).await;
    let mut stream = eager.conn.open_uni().await.unwrap();
    stream
        .write_all(&ClipMessage::Header(header("team")).to_bytes())
        .await
        .unwrap();
    assert_eq!(
        eager.closed_with().await,
        u64::from(ErrorCode::Protocol.code())
    );

    let wrong_version = Raw::connect(&relay).await;
    let (mut send, _recv) = wrong_version.conn.open_bi().await.unwrap();
    let hello = ControlMessage::Hello {
        version: 99,
        token: relay.token("a"),
        client: String::new(),
    };
    send.write_all(&hello.to_bytes()).await.unwrap();
    assert_eq!(
        wrong_version.closed_with().await,
        u64::from(ErrorCode::UnsupportedVersion.code())
    );
}

/// A relay process, for the crash test.
struct RelayProcess {
    child: Child,
    addr: std::net::SocketAddr,
    fingerprint: String,
}

impl RelayProcess {
    fn spawn(data_dir: &std::path::Path) -> RelayProcess {
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
            .env("RUST_LOG", "warn")
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("relay binary starts");
        let stderr = child.stderr.take().unwrap();
        let mut lines = BufReader::new(stderr).lines();
        let (mut addr, mut fingerprint) = (None, None);
        while addr.is_none() || fingerprint.is_none() {
            let line = lines.next().expect("relay prints its address").unwrap();
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
            addr: addr.unwrap(),
            fingerprint: fingerprint.unwrap(),
        }
    }

    fn kill(mut self) {
        // SIGKILL: no drain, no flush.
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    async fn client(&self, token: String) -> (ptt_client::Client, ptt_client::Events) {
        let trust = ptt_client::Trust::fingerprint_from_hex(&self.fingerprint).unwrap();
        let config = ptt_client::ClientConfig::new(self.addr, "localhost", trust, token);
        tokio::time::timeout(WAIT, ptt_client::Client::connect(config))
            .await
            .unwrap()
            .unwrap()
    }
}

#[tokio::test]
async fn clips_acknowledged_as_stored_survive_a_killed_relay() {
    let dir = tempfile::tempdir().unwrap();
    let relay_bin = env!("CARGO_BIN_EXE_relay");
    let data = dir.path().to_str().unwrap();
    let run = |args: &[&str]| {
        let status = Command::new(relay_bin)
            .args(args)
            .args(["--data-dir", data])
            .status()
            .unwrap();
        assert!(status.success(), "relay {args:?}");
    };
    run(&["group", "create", "team", "--mode", "notes"]);
    run(&["group", "add", "team", "alice", "bob"]);
    let issuer =
        ptt_relay::auth::TokenIssuer::load_or_create(&dir.path().join("token.key")).unwrap();
    let token = |u: &str| issuer.issue(u, Duration::from_secs(600), false, false);

    let relay = RelayProcess::spawn(dir.path());
    let (alice, _ae) = relay.client(token("alice")).await;
    let mut acknowledged = Vec::new();
    for i in 0..6u8 {
        let stored = alice
            .send_clip(
                "team",
                ClipParams::default(),
                frames(20 + i, 10),
                Bytes::new(),
            )
            .await
            .unwrap();
        acknowledged.push((stored.seq, frames(20 + i, 10)));
    }
    // A clip in flight when the relay dies was never acknowledged.
    let mut talk = alice.talk("team", ClipParams::default()).await.unwrap();
    talk.send_frame(frames(99, 1)[0].clone()).await.unwrap();
    relay.kill();
    drop(talk);

    let relay = RelayProcess::spawn(dir.path());
    let (bob, mut bob_events) = relay.client(token("bob")).await;
    let info = bob.join("team").await.unwrap();
    assert_eq!(info.last_seq, 6);
    let mut clips = collect_clips(&mut bob_events, 6).await;
    clips.sort_by_key(|c| c.seq);
    let got: Vec<(u64, Vec<Bytes>)> = clips.into_iter().map(|c| (c.seq, c.frames)).collect();
    assert_eq!(got, acknowledged);
    relay.kill();
}
