//! The relay over real QUIC on loopback, started in-process, driven by the
//! client library.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use ptt_client::{ClientError, ClipParams, ErrorCode, Event, GroupMode, ReceiptKind};

#[tokio::test]
async fn live_frames_reach_every_member_before_the_talker_finishes() {
    let relay = TestRelay::start().await;
    relay
        .group("team", GroupMode::Notes, &["alice", "bob", "carol", "dave"])
        .await;
    let (alice, _alice_events) = relay.member("alice", "team").await;
    let mut members = Vec::new();
    for user in ["bob", "carol", "dave"] {
        members.push(relay.member(user, "team").await);
    }
    let sent = frames(1, 20);
    let mut talk = alice.talk("team", params()).await.unwrap();
    for frame in &sent[..10] {
        talk.send_frame(frame.clone()).await.unwrap();
    }
    // Before the clip ends, each member has its first ten frames.
    for (_, events) in &mut members {
        let mut got = Vec::new();
        while got.len() < 10 {
            if let Some(frame) = wait_for(events, |e| match e {
                Event::Frame { data, .. } => Some(Some(data.clone())),
                Event::ClipStarted { seq, history, .. } => {
                    assert_eq!((*seq, *history), (0, false), "a live clip has no seq yet");
                    Some(None)
                }
                _ => None,
            })
            .await
            {
                got.push(frame);
            }
        }
        assert_eq!(got, sent[..10]);
    }
    for frame in &sent[10..] {
        talk.send_frame(frame.clone()).await.unwrap();
    }
    let stored = talk.finish(Bytes::from_static(&[1, 2, 3])).await.unwrap();
    assert_eq!(stored.seq, 1);
    for (_, events) in &mut members {
        let rest: Vec<Bytes> = {
            let mut v = Vec::new();
            loop {
                match wait_for(events, |e| match e {
                    Event::Frame { data, .. } => Some(Ok(data.clone())),
                    Event::ClipEnded {
                        seq, frame_count, ..
                    } => Some(Err((*seq, *frame_count))),
                    _ => None,
                })
                .await
                {
                    Ok(frame) => v.push(frame),
                    Err((seq, count)) => {
                        assert_eq!((seq, count), (1, 20));
                        break v;
                    }
                }
            }
        };
        assert_eq!(rest, sent[10..], "byte-exact and in order");
    }
    relay.handle.shutdown().await;
}

#[tokio::test]
async fn a_member_who_joins_mid_clip_gets_it_from_the_first_frame() {
    let relay = TestRelay::start().await;
    relay
        .group("team", GroupMode::Notes, &["alice", "bob"])
        .await;
    let (alice, _ae) = relay.member("alice", "team").await;
    let sent = frames(2, 30);
    let mut talk = alice.talk("team", params()).await.unwrap();
    for frame in &sent[..15] {
        talk.send_frame(frame.clone()).await.unwrap();
    }
    // Give the relay the frames before bob arrives.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (_bob, mut bob_events) = relay.member("bob", "team").await;
    let collector = tokio::spawn(async move { collect_clips(&mut bob_events, 1).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    for frame in &sent[15..] {
        talk.send_frame(frame.clone()).await.unwrap();
    }
    talk.finish(Bytes::new()).await.unwrap();
    let clips = collector.await.unwrap();
    assert_eq!(clips[0].frames, sent);
    assert_eq!(clips[0].seq, 1);
    assert!(!clips[0].history);
}

#[tokio::test]
async fn an_offline_member_gets_every_missed_clip_once_in_order() {
    let relay = TestRelay::start().await;
    relay
        .group("team", GroupMode::Notes, &["alice", "bob"])
        .await;
    let (alice, _ae) = relay.member("alice", "team").await;
    for i in 0..5u8 {
        let stored = alice
            .send_clip(
                "team",
                params(),
                frames(10 + i, 5 + i as usize),
                Bytes::new(),
            )
            .await
            .unwrap();
        assert_eq!(stored.seq, u64::from(i) + 1);
    }
    let (bob, mut bob_events) = relay.client("bob").await;
    let info = bob.join("team").await.unwrap();
    assert_eq!((info.cursor, info.last_seq), (0, 5));
    let mut clips = collect_clips(&mut bob_events, 5).await;
    clips.sort_by_key(|c| c.seq);
    for (i, clip) in clips.iter().enumerate() {
        assert_eq!(clip.seq, i as u64 + 1);
        assert!(clip.history);
        assert_eq!(clip.talker, "alice");
        assert_eq!(clip.frames, frames(10 + i as u8, 5 + i));
    }
    wait_for(&mut bob_events, |e| {
        matches!(e, Event::CaughtUp { seq: 5, .. }).then_some(())
    })
    .await;
    // The acks moved bob's cursor: on a new connection nothing comes again.
    let deadline = Instant::now() + WAIT;
    loop {
        let cursor = relay.handle.store().cursor("team", "bob").await.unwrap();
        if cursor == 5 {
            break;
        }
        assert!(Instant::now() < deadline, "cursor reached 5 (is {cursor})");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bob.close().await;
    let (bob, mut bob_events) = relay.client("bob").await;
    let info = bob.join("team").await.unwrap();
    assert_eq!((info.cursor, info.last_seq), (5, 5));
    let caught_up = wait_for(&mut bob_events, |e| match e {
        Event::CaughtUp { seq, .. } => Some(Ok(*seq)),
        Event::ClipStarted { .. } => Some(Err(())),
        _ => None,
    })
    .await;
    assert_eq!(caught_up, Ok(5), "nothing is delivered twice");
}

#[tokio::test]
async fn a_retried_clip_id_is_stored_and_delivered_once() {
    let relay = TestRelay::start().await;
    relay
        .group("team", GroupMode::Notes, &["alice", "bob"])
        .await;
    let (alice, _ae) = relay.member("alice", "team").await;
    let (_bob, mut bob_events) = relay.member("bob", "team").await;
    let id = ptt_client::random_clip_id();
    let p = ClipParams {
        clip_id: Some(id),
        ..params()
    };
    let first = alice
        .send_clip("team", p.clone(), frames(3, 8), Bytes::new())
        .await
        .unwrap();
    let again = alice
        .send_clip("team", p, frames(3, 8), Bytes::new())
        .await
        .unwrap();
    assert_eq!(first.seq, again.seq);
    let other = alice
        .send_clip("team", params(), frames(4, 8), Bytes::new())
        .await
        .unwrap();
    assert_eq!(other.seq, first.seq + 1);
    let clips = collect_clips(&mut bob_events, 2).await;
    let seqs: Vec<u64> = clips.iter().map(|c| c.seq).collect();
    assert_eq!(seqs, vec![1, 2], "the retry was not delivered again");
    let range = relay.handle.store().seq_range("team").await.unwrap();
    assert_eq!(range.last, 2);
}

#[tokio::test]
async fn a_non_member_can_neither_send_nor_receive() {
    let relay = TestRelay::start().await;
    relay
        .group("team", GroupMode::Notes, &["alice", "bob"])
        .await;
    let (alice, _ae) = relay.member("alice", "team").await;
    let (eve, mut eve_events) = relay.client("eve").await;
    let err = eve.join("team").await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotMember));
    let err = eve
        .send_clip("team", params(), frames(5, 3), Bytes::new())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotMember), "{err}");
    assert_eq!(
        eve.join("nowhere").await.unwrap_err().code(),
        Some(ErrorCode::NoSuchGroup)
    );
    alice
        .send_clip("team", params(), frames(6, 3), Bytes::new())
        .await
        .unwrap();
    let leaked = tokio::time::timeout(Duration::from_millis(500), async {
        loop {
            if let Some(Event::ClipStarted { .. }) = eve_events.next().await {
                return;
            }
        }
    })
    .await;
    assert!(
        leaked.is_err(),
        "eve received a clip of a group she is not in"
    );
    assert_eq!(
        relay.handle.store().seq_range("team").await.unwrap().last,
        1
    );
}

#[tokio::test]
async fn expired_forged_and_missing_tokens_are_refused_with_their_codes() {
    let relay = TestRelay::start().await;
    let expired = {
        let issuer =
            ptt_relay::auth::TokenIssuer::load_or_create(&relay.dir.path().join("token.key"))
                .unwrap();
        issuer.sign(&ptt_relay::auth::Claims {
            sub: "alice".into(),
            exp: 1,
            adm: false,
            emg: false,
        })
    };
    let forged = ptt_relay::auth::TokenIssuer::generate().issue(
        "alice",
        Duration::from_secs(60),
        true,
        false,
    );
    for (token, code) in [
        (expired, ErrorCode::TokenExpired),
        (forged, ErrorCode::InvalidToken),
        (String::new(), ErrorCode::InvalidToken),
    ] {
        let result = ptt_client::Client::connect(relay.config(token)).await;
        let err = result.expect_err("refused");
        assert_eq!(err.code(), Some(code), "{err}");
    }
}

#[tokio::test]
async fn walkie_floor_is_denied_while_another_talks_and_granted_after() {
    let relay = TestRelay::start().await;
    relay
        .group("ch", GroupMode::Walkie, &["alice", "bob", "carol"])
        .await;
    let (alice, _ae) = relay.member("alice", "ch").await;
    let (bob, _be) = relay.member("bob", "ch").await;
    let (_carol, mut carol_events) = relay.member("carol", "ch").await;
    alice.request_floor("ch", false).await.unwrap();
    wait_for(&mut carol_events, |e| match e {
        Event::FloorTaken { user, .. } if user == "alice" => Some(()),
        _ => None,
    })
    .await;
    match bob.request_floor("ch", false).await {
        Err(ClientError::FloorDenied { holder }) => assert_eq!(holder, "alice"),
        other => panic!("expected a denial, got {other:?}"),
    }
    // Talking without the floor is refused too.
    let err = bob
        .send_clip("ch", params(), frames(7, 2), Bytes::new())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::FloorTaken));
    // Alice's clip end releases the floor.
    alice
        .send_clip("ch", params(), frames(8, 5), Bytes::new())
        .await
        .unwrap();
    wait_for(&mut carol_events, |e| {
        matches!(e, Event::FloorIdle { .. }).then_some(())
    })
    .await;
    bob.request_floor("ch", false).await.unwrap();
    bob.send_clip("ch", params(), frames(9, 5), Bytes::new())
        .await
        .unwrap();
}

#[tokio::test]
async fn an_emergency_talker_preempts_the_floor() {
    let relay = TestRelay::start().await;
    relay
        .group("ch", GroupMode::Walkie, &["alice", "chief", "carol"])
        .await;
    let (alice, mut alice_events) = relay.member("alice", "ch").await;
    let chief_token = relay
        .handle
        .issue_token("chief", Duration::from_secs(60), false, true)
        .expect("own key");
    let (chief, _ce) = relay.connect(relay.config(chief_token)).await;
    chief.join("ch").await.unwrap();
    let (_carol, mut carol_events) = relay.member("carol", "ch").await;
    alice.request_floor("ch", false).await.unwrap();
    let mut talk = alice.talk("ch", params()).await.unwrap();
    talk.send_frame(frames(1, 1)[0].clone()).await.unwrap();
    // A plain request is denied, an emergency one wins.
    assert!(matches!(
        chief.request_floor("ch", false).await,
        Err(ClientError::FloorDenied { .. })
    ));
    chief.request_floor("ch", true).await.unwrap();
    let revoked = wait_for(&mut alice_events, |e| match e {
        Event::FloorRevoked { code, .. } => Some(*code),
        _ => None,
    })
    .await;
    assert_eq!(revoked, ErrorCode::Preempted);
    // Carol saw alice's clip cut and the chief take over.
    wait_for(&mut carol_events, |e| match e {
        Event::FloorTaken {
            user,
            emergency: true,
            ..
        } if user == "chief" => Some(()),
        _ => None,
    })
    .await;
    chief
        .send_clip(
            "ch",
            ClipParams {
                emergency: true,
                ..params()
            },
            frames(2, 3),
            Bytes::new(),
        )
        .await
        .unwrap();
    // A token without the emergency claim cannot ask for priority.
    let err = alice.request_floor("ch", true).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Forbidden));
}

#[tokio::test]
async fn a_stalled_member_does_not_delay_the_talker_or_the_others() {
    let relay = TestRelay::start_with(|c| c.live_lag_frames = 25).await;
    relay
        .group("team", GroupMode::Notes, &["alice", "bob", "carol"])
        .await;
    let (alice, _ae) = relay.member("alice", "team").await;
    // Bob's application never reads its events: his client stops reading
    // streams once its small event queue is full.
    let mut stalled = relay.config(relay.token("bob"));
    stalled.event_capacity = 4;
    let (bob, mut bob_events) = relay.connect(stalled).await;
    bob.join("team").await.unwrap();
    let (_carol, mut carol_events) = relay.member("carol", "team").await;
    // Big frames fill bob's flow-control windows quickly.
    let big: Vec<Bytes> = (0..200u32)
        .map(|i| Bytes::from(vec![(i % 251) as u8; 1000]))
        .collect();
    let started = Instant::now();
    let stored = alice
        .send_clip("team", params(), big.clone(), Bytes::new())
        .await
        .unwrap();
    let clips = collect_clips(&mut carol_events, 1).await;
    assert_eq!(clips[0].frames, big);
    assert_eq!(clips[0].seq, stored.seq);
    assert!(
        started.elapsed() < WAIT,
        "the talker and carol were not held up by bob"
    );
    // When bob reads again he gets the whole clip (cut live and sent again
    // from the store), exactly once.
    let clips = collect_clips(&mut bob_events, 1).await;
    assert_eq!(clips[0].frames, big);
    assert_eq!(clips[0].seq, stored.seq);
    assert_eq!(bob.stats().duplicates_dropped, 0);
}

#[tokio::test]
async fn a_wav_upload_is_transcoded_and_delivered_as_opus() {
    let relay = TestRelay::start().await;
    relay
        .group("team", GroupMode::Notes, &["alice", "bob"])
        .await;
    let (alice, _ae) = relay.member("alice", "team").await;
    let (_bob, mut bob_events) = relay.member("bob", "team").await;
    let wav = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../codec/tests/fixtures/speech.wav"
    ))
    .unwrap();
    let stored = alice.upload_wav("team", wav).await.unwrap();
    let clips = collect_clips(&mut bob_events, 1).await;
    assert_eq!(clips[0].seq, stored.seq);
    // Decode the packets: real Opus, about as long as the WAV.
    let mut decoder = ptt_codec::PacketDecoder::new(48_000, 1).unwrap();
    let mut samples = 0;
    for frame in &clips[0].frames {
        samples += decoder.decode(Some(frame), None).unwrap().len();
    }
    assert!(
        samples > 48_000,
        "more than a second of audio decoded ({samples} samples)"
    );
}

#[tokio::test]
async fn receipts_reach_the_talker() {
    let relay = TestRelay::start().await;
    relay
        .group("team", GroupMode::Notes, &["alice", "bob"])
        .await;
    let (alice, mut alice_events) = relay.member("alice", "team").await;
    let (bob, mut bob_events) = relay.member("bob", "team").await;
    let stored = alice
        .send_clip("team", params(), frames(1, 3), Bytes::new())
        .await
        .unwrap();
    collect_clips(&mut bob_events, 1).await;
    let delivered = wait_for(&mut alice_events, |e| match e {
        Event::Receipt {
            kind: ReceiptKind::Delivered,
            user,
            seq,
            ..
        } => Some((user.clone(), *seq)),
        _ => None,
    })
    .await;
    assert_eq!(delivered, ("bob".to_owned(), stored.seq));
    bob.played("team", stored.seq).await.unwrap();
    let played = wait_for(&mut alice_events, |e| match e {
        Event::Receipt {
            kind: ReceiptKind::Played,
            user,
            ..
        } => Some(user.clone()),
        _ => None,
    })
    .await;
    assert_eq!(played, "bob");
}

#[tokio::test]
async fn a_member_behind_retention_gets_a_gap_notice_then_the_rest() {
    let relay = TestRelay::start().await;
    relay
        .group("team", GroupMode::Notes, &["alice", "bob"])
        .await;
    let (alice, _ae) = relay.member("alice", "team").await;
    for i in 0..5u8 {
        alice
            .send_clip("team", params(), frames(i, 2), Bytes::new())
            .await
            .unwrap();
    }
    let policy = ptt_relay::store::RetentionPolicy {
        max_age_ms: 0,
        max_clips_per_group: 2,
    };
    let deleted = relay
        .handle
        .store()
        .apply_retention(policy, u64::MAX / 2)
        .await
        .unwrap();
    assert_eq!(deleted, 3);
    let (bob, mut bob_events) = relay.client("bob").await;
    bob.join("team").await.unwrap();
    // The gap notice comes on the control stream, the clips on their own
    // streams: QUIC does not order the two, so gather both.
    let (gap, ended) = gap_and_ends(&mut bob_events, 2).await;
    assert_eq!(gap, Some((1, 3)));
    assert_eq!(ended, vec![4, 5]);
}

#[tokio::test]
async fn shutdown_lets_a_clip_in_flight_finish_and_keeps_it() {
    let relay = TestRelay::start_with(|c| c.shutdown_grace = Duration::from_secs(5)).await;
    relay.group("team", GroupMode::Notes, &["alice"]).await;
    let (alice, _ae) = relay.member("alice", "team").await;
    let mut talk = alice.talk("team", params()).await.unwrap();
    for frame in frames(1, 5) {
        talk.send_frame(frame).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let TestRelay { handle, dir } = relay;
    let stopping = tokio::spawn(handle.shutdown());
    tokio::time::sleep(Duration::from_millis(200)).await;
    for frame in frames(1, 5) {
        talk.send_frame(frame).await.unwrap();
    }
    let stored = talk.finish(Bytes::new()).await.unwrap();
    assert_eq!(stored.seq, 1);
    tokio::time::timeout(WAIT, stopping).await.unwrap().unwrap();
    let store = ptt_relay::store::RedbStore::open(dir.path()).unwrap();
    use ptt_relay::store::ClipStore;
    let clips = store.clips_after("team", 0, 10).await.unwrap();
    assert_eq!(clips.len(), 1);
    assert_eq!(clips[0].frames.len(), 10);
}

#[tokio::test]
async fn each_side_asks_the_other_to_ack_voice_frames_in_batches() {
    let relay = TestRelay::start().await;
    relay.group("team", GroupMode::Notes, &["alice"]).await;
    let (alice, _events) = relay.member("alice", "team").await;
    let conn = alice.connection().expect("connected");
    // The ACK_FREQUENCY frames go out with the first 1-RTT packets; allow
    // for them to be counted.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let stats = conn.stats();
        if stats.frame_rx.ack_frequency >= 1 && stats.frame_tx.ack_frequency >= 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no ACK_FREQUENCY exchanged: received {}, sent {}",
            stats.frame_rx.ack_frequency,
            stats.frame_tx.ack_frequency
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    relay.handle.shutdown().await;
}
