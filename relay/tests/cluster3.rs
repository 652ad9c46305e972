//! Two relay nodes on a three-server NATS cluster (issues #10 and #12):
//! three `nats-server` processes clustered by routes on loopback, the clip
//! stream and every bucket with three replicas in file storage. One NATS
//! server is killed with `kill -9` while a talker speaks: every clip
//! acknowledged as stored reaches every member exactly once and in order,
//! and uploads go on after at most a short refusal with a code.
//!
//! Its own test binary (its own process), so the three servers do not
//! compete with `cluster.rs`'s for the two cores while it runs.
#![cfg(feature = "nats")]

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::nats::NatsCluster;
use common::*;
use ptt_client::{ClientError, ErrorCode, Event, Events, GroupMode};
use ptt_relay::RelayConfig;

/// Starts a relay node on every server of `nats` with replicas 3; with
/// `keys_of`, it accepts that node's tokens. JetStream elects its leaders
/// after the servers start, so creating the stream may fail at first: the
/// start is tried again for up to 20 s.
async fn node(nats: &NatsCluster, keys_of: Option<&TestRelay>) -> TestRelay {
    let dir = tempfile::tempdir().expect("temp dir");
    if let Some(other) = keys_of {
        std::fs::copy(
            other.dir.path().join("token.key"),
            dir.path().join("token.key"),
        )
        .expect("copy the token key");
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut config = RelayConfig::for_tests(dir.path());
        config.cluster.nats = nats.urls();
        config.cluster.replicas = 3;
        config.cluster.request_timeout = Duration::from_secs(2);
        match ptt_relay::start(config).await {
            Ok(handle) => return TestRelay { handle, dir },
            Err(e) if Instant::now() < deadline => {
                eprintln!("node start: {e} (JetStream not ready yet?), again");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => panic!("node did not start on the NATS cluster: {e}"),
        }
    }
}

/// The name of the server leading the clip stream's replicas.
async fn clip_stream_leader(nats: &NatsCluster) -> String {
    let client = async_nats::connect(nats.urls().as_slice())
        .await
        .expect("connect to NATS");
    let js = async_nats::jetstream::new(client);
    let mut stream = js.get_stream("PTT_CLIPS").await.expect("the clip stream");
    let info = stream.info().await.expect("stream info");
    let cluster = info.cluster.clone().expect("a replicated stream");
    assert_eq!(
        cluster.replicas.len() + 1,
        3,
        "the clip stream has three replicas"
    );
    cluster.leader.expect("the stream has a leader")
}

/// Every clip that ended for a member, in arrival order: (seq, frames).
/// Runs until every seq in `expect` has ended and nothing more came for
/// `quiet` (a duplicate would come in that time).
async fn ended_clips(
    events: &mut Events,
    expect: &[u64],
    quiet: Duration,
) -> Vec<(u64, Vec<Bytes>)> {
    // Frames by index: on the UDP media path a frame comes from whichever
    // of the talker's two copies (uplink datagram, upload stream) reaches
    // the relay first, so they may arrive out of order (PROTOCOL.md §14.4:
    // clients place them by index). A frame that came twice stays twice
    // and fails the comparison.
    let mut open: HashMap<ptt_client::ClipId, Vec<(u32, Bytes)>> = HashMap::new();
    let mut done = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let complete = expect.iter().all(|s| done.iter().any(|(d, _)| d == s));
        let wait = if complete {
            quiet
        } else {
            deadline.saturating_duration_since(tokio::time::Instant::now())
        };
        let event = match tokio::time::timeout(wait, events.next()).await {
            Ok(Some(event)) => event,
            Ok(None) => panic!("event stream closed"),
            Err(_) if complete => return done,
            Err(_) => panic!("not every acknowledged clip arrived: {done:?}, expected {expect:?}"),
        };
        match event {
            Event::ClipStarted { clip_id, .. } => {
                open.insert(clip_id, Vec::new());
            }
            Event::Frame {
                clip_id,
                index,
                data,
                ..
            } => {
                open.entry(clip_id).or_default().push((index, data));
            }
            Event::ClipEnded { clip_id, seq, .. } => {
                let mut frames = open.remove(&clip_id).unwrap_or_default();
                frames.sort_by_key(|(index, _)| *index);
                done.push((seq, frames.into_iter().map(|(_, data)| data).collect()));
            }
            Event::ClipAborted { clip_id, .. } => {
                open.remove(&clip_id);
            }
            _ => {}
        }
    }
}

/// Checks what one member received: each clip once (ordered by `seq`, as
/// PROTOCOL.md tells clients to: clips come on streams that arrive in any
/// order), every acknowledged clip among them with the frames its talker
/// sent, in order. Returns the sorted numbers.
fn check_member(who: &str, got: &[(u64, Vec<Bytes>)], acked: &[(u64, Vec<Bytes>)]) -> Vec<u64> {
    let mut seqs: Vec<u64> = got.iter().map(|(s, _)| *s).collect();
    seqs.sort();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "{who}: a clip came twice: {seqs:?}"
    );
    for (seq, frames) in acked {
        let (_, received) = got
            .iter()
            .find(|(s, _)| s == seq)
            .unwrap_or_else(|| panic!("{who}: acknowledged clip {seq} missing: {seqs:?}"));
        assert_eq!(received, frames, "{who}: clip {seq}'s frames");
    }
    seqs
}

/// The test itself: A's talker speaks clip after clip; in the middle of a
/// clip the clip stream's leader server is killed with `kill -9`. Uploads
/// refused meanwhile carry `Internal` (none hangs, none is acknowledged
/// and lost), and the refusals end within 15 s. Afterwards listeners on A
/// and B, and a member who joins on B only at the end, have every
/// acknowledged clip exactly once, byte-identical, under the number its
/// talker was told (numbers rise in the order the clips were spoken), and
/// the log numbers without gaps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_server_killed_mid_clip_loses_no_acknowledged_clip() {
    let mut nats = NatsCluster::start(3);
    let a = node(&nats, None).await;
    let b = node(&nats, Some(&a)).await;
    a.group("team", GroupMode::Notes, &["alice", "bob", "carol", "dave"])
        .await;
    let (_bob, mut bob_events) = a.member("bob", "team").await;
    let (_carol, mut carol_events) = b.member("carol", "team").await;
    let (alice, _alice_events) = a.member("alice", "team").await;

    const BEFORE: u8 = 4;
    const AFTER: u8 = 8;
    let mut acked: Vec<(u64, Vec<Bytes>)> = Vec::new();
    let mut refused = 0u32;
    let mut first_refusal: Option<Instant> = None;
    let mut last_refusal: Option<Instant> = None;
    let mut killed = None;
    let started = Instant::now();
    let mut tag = 0u8;
    while acked.len() < usize::from(BEFORE + AFTER) {
        assert!(
            started.elapsed() < Duration::from_secs(45),
            "uploads did not resume: {} acknowledged, {refused} refused",
            acked.len()
        );
        tag += 1;
        let frames = frames(tag, 12);
        let outcome: Result<ptt_client::StoredClip, ClientError> = async {
            let mut talk = alice.talk("team", params()).await?;
            for (i, f) in frames.iter().enumerate() {
                if i == 6 && killed.is_none() && acked.len() == usize::from(BEFORE) {
                    let leader = clip_stream_leader(&nats).await;
                    nats.by_name(&leader).expect("the leader is ours").kill();
                    eprintln!("killed {leader} (the clip stream's leader) mid-clip");
                    killed = Some(Instant::now());
                }
                talk.send_frame(f.clone()).await?;
            }
            talk.finish(Bytes::new()).await
        }
        .await;
        match outcome {
            Ok(stored) => {
                if let Some((last, _)) = acked.last() {
                    assert!(
                        stored.seq > *last,
                        "numbers go back: {} after {last}",
                        stored.seq
                    );
                }
                acked.push((stored.seq, frames));
            }
            Err(e) => {
                assert_eq!(e.code(), Some(ErrorCode::Internal), "refused with {e}");
                refused += 1;
                first_refusal.get_or_insert_with(Instant::now);
                last_refusal = Some(Instant::now());
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    let killed = killed.expect("the server was killed");
    let outage = last_refusal.map_or(Duration::ZERO, |last| last - killed);
    eprintln!(
        "{} clips acknowledged, {refused} refused; uploads refused for {:?} after the kill",
        acked.len(),
        outage
    );
    assert!(outage < Duration::from_secs(15), "refused for {outage:?}");

    let seqs: Vec<u64> = acked.iter().map(|(s, _)| *s).collect();
    let bob_got = ended_clips(&mut bob_events, &seqs, Duration::from_millis(500)).await;
    let carol_got = ended_clips(&mut carol_events, &seqs, Duration::from_millis(500)).await;
    let bob_seqs = check_member("bob on A", &bob_got, &acked);
    let carol_seqs = check_member("carol on B", &carol_got, &acked);

    // The log: numbers 1..=last without gaps, the acknowledged clips as sent.
    let log = &b.handle.context().log;
    let last = log.range("team").await.expect("range").last;
    let stored = log.read("team", 0, 1000).await.expect("read");
    let stored_seqs: Vec<u64> = stored.iter().map(|c| c.seq).collect();
    assert_eq!(stored_seqs, (1..=last).collect::<Vec<_>>());
    for (seq, frames) in &acked {
        assert_eq!(
            &stored[*seq as usize - 1].frames,
            frames,
            "stored clip {seq}"
        );
    }
    // Live listeners got exactly the log.
    assert_eq!(bob_seqs, stored_seqs);
    assert_eq!(carol_seqs, stored_seqs);

    // Dave was never online: he catches up on B, each clip once, in order.
    let (_dave, mut dave_events) = b.member("dave", "team").await;
    let dave_got = ended_clips(&mut dave_events, &stored_seqs, Duration::from_millis(500)).await;
    assert_eq!(check_member("dave on B", &dave_got, &acked), stored_seqs);
}
