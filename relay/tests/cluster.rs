//! Several relay nodes on NATS JetStream (issue #10): two relays in this
//! process, each with its own QUIC endpoint and data directory, sharing one
//! real `nats-server` (JetStream in a temporary directory) on loopback.
//! Clients connect to one node or the other and cannot tell.
//!
//! Needs `nats-server` (`./dev.sh setup` installs it); without it every test
//! here fails saying so.
#![cfg(feature = "nats")]

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::nats::NatsServer;
use common::raw::{self, Raw, header};
use common::*;
use ptt_client::{ClientError, Event, Events, GroupMode};
use ptt_protocol::ErrorCode;
use ptt_protocol::{ClipHeader, ClipMessage, ControlMessage};
use ptt_relay::RelayConfig;

/// Starts a relay node on `nats`; with `keys_of`, it accepts the tokens of
/// that node (the same signing key, as the nodes of one deployment share).
async fn node(nats: &NatsServer, keys_of: Option<&TestRelay>) -> TestRelay {
    node_with(nats, keys_of, |_| {}).await
}

/// [`node`] with its configuration adjusted.
async fn node_with(
    nats: &NatsServer,
    keys_of: Option<&TestRelay>,
    adjust: impl FnOnce(&mut RelayConfig),
) -> TestRelay {
    let dir = tempfile::tempdir().expect("temp dir");
    if let Some(other) = keys_of {
        std::fs::copy(
            other.dir.path().join("token.key"),
            dir.path().join("token.key"),
        )
        .expect("copy the token key");
    }
    let mut config = RelayConfig::for_tests(dir.path());
    config.cluster.nats = vec![nats.url()];
    config.cluster.request_timeout = Duration::from_secs(2);
    adjust(&mut config);
    let handle = ptt_relay::start(config).await.expect("node starts");
    TestRelay { handle, dir }
}

/// One NATS server and two nodes, A and B.
async fn cluster() -> (NatsServer, TestRelay, TestRelay) {
    let nats = NatsServer::start();
    let a = node(&nats, None).await;
    let b = node(&nats, Some(&a)).await;
    (nats, a, b)
}

/// Frames of a clip, as `Frame` events carry them, in order.
async fn live_frames(events: &mut Events, n: usize) -> Vec<Bytes> {
    let mut out = Vec::new();
    while out.len() < n {
        let data = wait_for(events, |e| match e {
            Event::Frame { data, .. } => Some(data.clone()),
            _ => None,
        })
        .await;
        out.push(data);
    }
    out
}

/// A talker on A; listeners on A and on B hear each clip while it is
/// spoken (its first frames arrive before the talker has finished), with
/// byte-identical frames, and every clip ends with the same sequence
/// numbers in order.
#[tokio::test]
async fn live_clips_reach_both_nodes_byte_identical_and_in_order() {
    let (_nats, a, b) = cluster().await;
    a.group("team", GroupMode::Notes, &["alice", "bob", "carol"])
        .await;
    let (_bob, mut bob_events) = a.member("bob", "team").await;
    let (_carol, mut carol_events) = b.member("carol", "team").await;
    let (alice, _alice_events) = a.member("alice", "team").await;
    for clip in 0..3u8 {
        let frames = frames(clip, 20);
        let mut talk = alice.talk("team", params()).await.unwrap();
        for f in &frames[..10] {
            talk.send_frame(f.clone()).await.unwrap();
        }
        // Heard on both nodes before the clip is finished.
        assert_eq!(live_frames(&mut bob_events, 10).await, frames[..10]);
        assert_eq!(live_frames(&mut carol_events, 10).await, frames[..10]);
        for f in &frames[10..] {
            talk.send_frame(f.clone()).await.unwrap();
        }
        let stored = talk.finish(Bytes::new()).await.unwrap();
        assert_eq!(stored.seq, u64::from(clip) + 1);
        for events in [&mut bob_events, &mut carol_events] {
            assert_eq!(live_frames(events, 10).await, frames[10..]);
            let end = wait_for(events, |e| match e {
                Event::ClipEnded { seq, .. } => Some(*seq),
                _ => None,
            })
            .await;
            assert_eq!(end, stored.seq);
        }
    }
}

/// A member offline while three clips are stored on A reconnects to B: it
/// catches up from its cursor there, each clip once, and its cursor (moved
/// by its acks on B) holds on A too.
#[tokio::test]
async fn an_offline_member_catches_up_on_the_other_node_once() {
    let (_nats, a, b) = cluster().await;
    a.group("team", GroupMode::Notes, &["alice", "bob"]).await;
    let (alice, _ae) = a.member("alice", "team").await;
    alice
        .send_clip("team", params(), frames(0, 3), Bytes::new())
        .await
        .unwrap();
    let (bob, mut bob_events) = a.member("bob", "team").await;
    let first = collect_clips(&mut bob_events, 1).await;
    assert_eq!(first[0].seq, 1);
    bob.close().await;
    for i in 1..4u8 {
        alice
            .send_clip("team", params(), frames(i, 3), Bytes::new())
            .await
            .unwrap();
    }
    let (bob, mut bob_events) = b.client("bob").await;
    let info = bob.join("team").await.unwrap();
    assert_eq!((info.cursor, info.last_seq), (1, 4));
    let clips = collect_clips(&mut bob_events, 3).await;
    let mut seqs: Vec<u64> = clips.iter().map(|c| c.seq).collect();
    seqs.sort();
    assert_eq!(seqs, [2, 3, 4]);
    for clip in &clips {
        assert_eq!(clip.frames, frames(clip.seq as u8 - 1, 3));
    }
    // Nothing comes again, and the cursor reached 4 in the shared store.
    tokio::time::timeout(WAIT, async {
        while a.handle.store().cursor("team", "bob").await.unwrap() < 4 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("bob's cursor reaches 4");
    let again = tokio::time::timeout(Duration::from_millis(500), async {
        loop {
            if let Some(Event::ClipStarted { seq, .. }) = bob_events.next().await {
                return seq;
            }
        }
    })
    .await;
    assert!(again.is_err(), "a clip came twice: {again:?}");
    bob.close().await;
    let (bob, _events) = a.client("bob").await;
    let info = bob.join("team").await.unwrap();
    assert_eq!((info.cursor, info.last_seq), (4, 4));
}

/// The floor held on A is denied on B and announced there; released on A,
/// B's members see it free and B grants it.
#[tokio::test]
async fn the_floor_held_on_one_node_is_denied_on_the_other() {
    let (_nats, a, b) = cluster().await;
    a.group("radio", GroupMode::Walkie, &["alice", "bob", "carol"])
        .await;
    let (alice, _ae) = a.member("alice", "radio").await;
    let (bob, mut bob_events) = b.member("bob", "radio").await;
    alice.request_floor("radio", false).await.unwrap();
    let taken = wait_for(&mut bob_events, |e| match e {
        Event::FloorTaken { user, .. } => Some(user.clone()),
        _ => None,
    })
    .await;
    assert_eq!(taken, "alice");
    match bob.request_floor("radio", false).await {
        Err(ClientError::FloorDenied { holder }) => assert_eq!(holder, "alice"),
        other => panic!("expected a denial, got {other:?}"),
    }
    // A clip from B is refused too: its header asks for the floor.
    let refused = bob
        .send_clip("radio", params(), frames(1, 2), Bytes::new())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Some(ErrorCode::FloorTaken));
    alice.release_floor("radio").await.unwrap();
    wait_for(&mut bob_events, |e| {
        matches!(e, Event::FloorIdle { .. }).then_some(())
    })
    .await;
    bob.request_floor("radio", false).await.unwrap();
    match alice.request_floor("radio", false).await {
        Err(ClientError::FloorDenied { holder }) => assert_eq!(holder, "bob"),
        other => panic!("expected a denial, got {other:?}"),
    }
}

/// A floor whose holder's node is gone (a crash: nothing releases it)
/// frees at the end of its lease: the surviving node announces it idle and
/// grants it. The dead node's hold is written to the floor bucket as a
/// node would write it.
#[tokio::test]
async fn a_floor_left_by_a_dead_node_frees_within_its_lease() {
    let (nats, a, b) = cluster().await;
    a.group("radio", GroupMode::Walkie, &["ghost", "bob"]).await;
    let (bob, mut bob_events) = b.member("bob", "radio").await;
    let client = async_nats::connect(nats.url()).await.unwrap();
    let bucket = async_nats::jetstream::new(client)
        .get_key_value("ptt_floor")
        .await
        .unwrap();
    let now = ptt_relay::auth::unix_millis(std::time::SystemTime::now());
    let lease = 1_500;
    let hold = format!(
        r#"{{"group":"radio","holder":{{"node":1,"session":1,"user":"ghost","emergency":false,"granted_ms":{now},"expires_ms":{}}},"expired":false}}"#,
        now + lease
    );
    bucket.put("radio", hold.into()).await.unwrap();
    let taken = wait_for(&mut bob_events, |e| match e {
        Event::FloorTaken { user, .. } => Some(user.clone()),
        _ => None,
    })
    .await;
    assert_eq!(taken, "ghost");
    match bob.request_floor("radio", false).await {
        Err(ClientError::FloorDenied { holder }) => assert_eq!(holder, "ghost"),
        other => panic!("expected a denial, got {other:?}"),
    }
    wait_for(&mut bob_events, |e| {
        matches!(e, Event::FloorIdle { .. }).then_some(())
    })
    .await;
    let freed = ptt_relay::auth::unix_millis(std::time::SystemTime::now());
    assert!(freed >= now + lease, "freed before the lease ended");
    assert!(
        freed < now + lease + 3_000,
        "freed {} ms late",
        freed - now - lease
    );
    bob.request_floor("radio", false).await.unwrap();
}

/// Talkers on A and B append to one notes group at once: the sequence
/// numbers they get back are 1..=2n, without gaps or repeats, and both
/// nodes' members get every clip in that order.
#[tokio::test]
async fn talkers_on_two_nodes_get_sequence_numbers_without_gaps() {
    let (_nats, a, b) = cluster().await;
    a.group("notes", GroupMode::Notes, &["alice", "bob", "carol"])
        .await;
    let (_carol, mut carol_events) = b.member("carol", "notes").await;
    let (alice, _ae) = a.member("alice", "notes").await;
    let (bob, _be) = b.member("bob", "notes").await;
    const N: u8 = 12;
    let talker = |client: ptt_client::Client, tag: u8| async move {
        let mut seqs = Vec::new();
        for i in 0..N {
            let stored = client
                .send_clip("notes", params(), frames(tag + i, 2), Bytes::new())
                .await
                .unwrap();
            seqs.push(stored.seq);
        }
        seqs
    };
    let (from_a, from_b) = tokio::join!(talker(alice, 0), talker(bob, 100));
    let mut all: Vec<u64> = from_a.iter().chain(&from_b).copied().collect();
    all.sort();
    assert_eq!(all, (1..=2 * u64::from(N)).collect::<Vec<_>>());
    assert!(from_a.windows(2).all(|w| w[0] < w[1]));
    assert!(from_b.windows(2).all(|w| w[0] < w[1]));
    let mut ends = Vec::new();
    while ends.len() < 2 * N as usize {
        ends.push(
            wait_for(&mut carol_events, |e| match e {
                Event::ClipEnded { seq, .. } => Some(*seq),
                _ => None,
            })
            .await,
        );
    }
    // Live ends come in publication order, which is the log's.
    assert_eq!(ends, all);
    let stored = b.handle.context().log.read("notes", 0, 100).await.unwrap();
    assert_eq!(stored.len(), 2 * N as usize);
}

/// Node A stops in the middle of a clip; the talker sends the clip again,
/// whole, under the same id to B: stored once, as 1. Sent once more (to A's
/// replacement or B, as a client that missed `Stored` would), it is
/// acknowledged with the same number and not stored again.
#[tokio::test]
async fn a_clip_cut_by_a_node_stopping_is_stored_once_when_resent_to_the_other() {
    let (_nats, a, b) = cluster().await;
    a.group("team", GroupMode::Notes, &["alice", "bob"]).await;
    let clip = header("team");
    let messages = |clip: &ClipHeader, end: bool| {
        let mut bytes = ClipMessage::Header(clip.clone()).to_bytes().to_vec();
        for (i, data) in frames(7, 5).into_iter().enumerate() {
            bytes.extend_from_slice(
                &ClipMessage::Frame {
                    index: i as u32,
                    data,
                }
                .to_bytes(),
            );
        }
        if end {
            bytes.extend_from_slice(
                &ClipMessage::End {
                    frame_count: 5,
                    seq: 0,
                    waveform: Bytes::new(),
                }
                .to_bytes(),
            );
        }
        bytes
    };
    let (raw_a, _send_a, _control_a) = Raw::hello(&a, "alice").await;
    let mut stream = raw_a.conn.open_uni().await.unwrap();
    stream.write_all(&messages(&clip, false)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    a.handle.shutdown().await;
    for _ in 0..2 {
        let (raw_b, _send_b, mut control_b) = Raw::hello(&b, "alice").await;
        let mut stream = raw_b.conn.open_uni().await.unwrap();
        stream.write_all(&messages(&clip, true)).await.unwrap();
        let _ = stream.finish();
        assert_eq!(stored_seq(&mut control_b, clip.clip_id).await, 1);
    }
    let log = &b.handle.context().log;
    assert_eq!(log.range("team").await.unwrap().last, 1);
    let stored = log.read("team", 0, 10).await.unwrap();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].frames, frames(7, 5));
}

/// JetStream forgets a message id after its duplicate window; the relay's
/// clip index does not: a clip re-sent after the window (here 1 s) to the
/// other node is acknowledged with its first number and stored once.
#[tokio::test]
async fn a_clip_resent_after_the_duplicate_window_is_stored_once() {
    let nats = NatsServer::start();
    let window = |c: &mut RelayConfig| c.cluster.duplicate_window = Duration::from_secs(1);
    let a = node_with(&nats, None, window).await;
    let b = node_with(&nats, Some(&a), window).await;
    a.group("team", GroupMode::Notes, &["alice"]).await;
    let clip = header("team");
    let mut bytes = ClipMessage::Header(clip.clone()).to_bytes().to_vec();
    for (index, data) in frames(3, 4).into_iter().enumerate() {
        let frame = ClipMessage::Frame {
            index: index as u32,
            data,
        };
        bytes.extend_from_slice(&frame.to_bytes());
    }
    let end = ClipMessage::End {
        frame_count: 4,
        seq: 0,
        waveform: Bytes::new(),
    };
    bytes.extend_from_slice(&end.to_bytes());
    for (relay, pause) in [(&a, Duration::ZERO), (&b, Duration::from_millis(1_500))] {
        tokio::time::sleep(pause).await;
        let (raw, _send, mut control) = Raw::hello(relay, "alice").await;
        let mut stream = raw.conn.open_uni().await.unwrap();
        stream.write_all(&bytes).await.unwrap();
        let _ = stream.finish();
        assert_eq!(stored_seq(&mut control, clip.clip_id).await, 1);
    }
    let stored = b.handle.context().log.read("team", 0, 10).await.unwrap();
    assert_eq!(stored.len(), 1);
}

/// The number of the `Stored` for `id` (a rejection fails the test).
async fn stored_seq(control: &mut raw::Control, id: ptt_protocol::ClipId) -> u64 {
    control
        .until(|m| match m {
            ControlMessage::Stored { clip_id, seq, .. } if clip_id == id => Some(seq),
            ControlMessage::ClipRejected { code, .. } => panic!("rejected: {code}"),
            _ => None,
        })
        .await
}

/// NATS stops under a running node: uploads are refused with `Internal`
/// (not hung, not acknowledged); NATS comes back and the node resumes by
/// itself, numbering on from the clip acknowledged before the outage.
#[tokio::test]
async fn nats_stopping_refuses_clips_with_a_code_and_the_node_recovers() {
    let (mut nats, a, _b) = cluster().await;
    a.group("team", GroupMode::Notes, &["alice", "bob"]).await;
    let (alice, _ae) = a.member("alice", "team").await;
    let first = alice
        .send_clip("team", params(), frames(1, 3), Bytes::new())
        .await
        .unwrap();
    assert_eq!(first.seq, 1);
    nats.stop();
    let refused = alice
        .send_clip("team", params(), frames(2, 3), Bytes::new())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Some(ErrorCode::Internal), "{refused}");
    nats.restart();
    let resumed = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match alice
                .send_clip("team", params(), frames(3, 3), Bytes::new())
                .await
            {
                Ok(stored) => return stored,
                Err(e) => {
                    assert_eq!(e.code(), Some(ErrorCode::Internal), "{e}");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
        }
    })
    .await
    .expect("the node resumes after NATS returns");
    assert_eq!(resumed.seq, 2);
    let stored = a.handle.context().log.read("team", 0, 10).await.unwrap();
    let seqs: Vec<u64> = stored.iter().map(|c| c.seq).collect();
    assert_eq!(seqs, [1, 2]);
    assert_eq!(stored[0].frames, frames(1, 3));
    // A member joining on the recovered node gets both.
    let (_bob, mut bob_events) = a.member("bob", "team").await;
    assert_eq!(collect_clips(&mut bob_events, 2).await.len(), 2);
}

/// `/readyz` of a cluster node follows its NATS connection: 200 while
/// connected, 503 once NATS is gone (a load balancer stops sending it new
/// clients), 200 again by itself when NATS is back. `/healthz` stays 200.
#[tokio::test]
async fn readyz_is_503_while_nats_is_unreachable() {
    let mut nats = NatsServer::start();
    let a = node_with(&nats, None, |c| {
        c.metrics = Some("127.0.0.1:0".parse().expect("address"))
    })
    .await;
    let addr = a.handle.metrics_addr().expect("a metrics listener");
    assert_eq!(http_status(addr, "/readyz").await, 200);
    nats.stop();
    readyz_becomes(addr, 503, Duration::from_secs(10)).await;
    assert_eq!(http_status(addr, "/healthz").await, 200);
    nats.restart();
    // The client's reconnect delay grows while the server is away.
    readyz_becomes(addr, 200, Duration::from_secs(30)).await;
}

/// Polls `/readyz` until it answers `status`, failing after `within`.
async fn readyz_becomes(addr: std::net::SocketAddr, status: u16, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let now = http_status(addr, "/readyz").await;
        if now == status {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "/readyz still {now}, not {status}, after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// GET `path` over HTTP/1.1: the status code.
async fn http_status(addr: std::net::SocketAddr, path: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tokio::time::timeout(WAIT, async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let request = format!("GET {path} HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut response = String::new();
        stream.read_to_string(&mut response).await.expect("read");
        response
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("a status line")
    })
    .await
    .expect("an HTTP answer in time")
}

/// The `ClipDeleted` events `events` carries until `n` have come: their
/// sequence numbers.
async fn deleted(events: &mut Events, n: usize) -> Vec<u64> {
    let mut out = Vec::new();
    while out.len() < n {
        out.push(
            wait_for(events, |e| match e {
                Event::ClipDeleted { seq, .. } => Some(*seq),
                _ => None,
            })
            .await,
        );
    }
    out
}

/// A clip deleted on node A: a member connected to B gets `ClipDeleted`
/// at once, a member away (seen before) gets it when it joins on B, the
/// clip is gone from the shared log, and deleting the newest clip does not
/// free its number.
#[tokio::test]
async fn a_clip_deleted_on_one_node_reaches_members_on_the_other() {
    let (_nats, a, b) = cluster().await;
    a.group("team", GroupMode::Notes, &["alice", "bob", "carol"])
        .await;
    let (alice, _ae) = a.member("alice", "team").await;
    for i in 0..3u8 {
        alice
            .send_clip("team", params(), frames(i, 3), Bytes::new())
            .await
            .unwrap();
    }
    let (_bob, mut bob_events) = b.member("bob", "team").await;
    assert_eq!(collect_clips(&mut bob_events, 3).await.len(), 3);
    let (carol, mut carol_events) = b.member("carol", "team").await;
    assert_eq!(collect_clips(&mut carol_events, 3).await.len(), 3);
    carol.close().await;

    ptt_relay::admin::delete_clip(a.handle.context(), "team", 2)
        .await
        .expect("deleted");
    assert_eq!(deleted(&mut bob_events, 1).await, [2]);
    let (_carol, mut carol_events) = b.member("carol", "team").await;
    assert_eq!(deleted(&mut carol_events, 1).await, [2]);
    assert_eq!(
        ptt_relay::admin::delete_clip(b.handle.context(), "team", 2).await,
        Err(ErrorCode::NoSuchClip)
    );

    // The newest clip deleted: the next clip is 4, not 3 again.
    ptt_relay::admin::delete_clip(b.handle.context(), "team", 3)
        .await
        .expect("deleted");
    assert_eq!(deleted(&mut bob_events, 1).await, [3]);
    let next = alice
        .send_clip("team", params(), frames(9, 3), Bytes::new())
        .await
        .unwrap();
    assert_eq!(next.seq, 4);
    let log = &b.handle.context().log;
    let seqs: Vec<u64> = log
        .read("team", 0, 10)
        .await
        .unwrap()
        .iter()
        .map(|c| c.seq)
        .collect();
    assert_eq!(seqs, [1, 4]);
}

/// `relay group --nats …` administers the groups of running cluster nodes
/// in NATS: a group created, a member added and listed, clips listed, a
/// clip deleted (its member on node B hears of it at once), members with
/// their cursors.
#[tokio::test]
async fn relay_group_administers_a_running_cluster_through_nats() {
    let (nats, a, b) = cluster().await;
    let relay_group = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_relay"))
            .arg("group")
            .args(["--nats", &nats.url()])
            .args(args)
            .output()
            .expect("run relay group");
        assert!(
            out.status.success(),
            "relay group {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    relay_group(&["create", "crew", "--mode", "notes"]);
    relay_group(&["add", "crew", "alice", "bob"]);
    let list = relay_group(&["list"]);
    assert!(list.contains("crew") && list.contains("alice") && list.contains("bob"));
    let (alice, _ae) = a.member("alice", "crew").await;
    let (_bob, mut bob_events) = b.member("bob", "crew").await;
    for i in 0..2u8 {
        alice
            .send_clip("crew", params(), frames(i, 5), Bytes::new())
            .await
            .unwrap();
    }
    assert_eq!(collect_clips(&mut bob_events, 2).await.len(), 2);
    let clips = relay_group(&["clips", "crew"]);
    assert_eq!(clips.lines().count(), 2, "{clips}");
    relay_group(&["delete", "crew", "1"]);
    assert_eq!(deleted(&mut bob_events, 1).await, [1]);
    let clips = relay_group(&["clips", "crew"]);
    assert_eq!(clips.lines().count(), 1, "{clips}");
    let members = relay_group(&["members", "crew"]);
    assert!(members.contains("bob"), "{members}");
}
