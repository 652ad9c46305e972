//! The client against the real relay, started in-process on loopback.

use std::time::Duration;

use bytes::Bytes;
use ptt_client::{
    Client, ClientConfig, ClientError, ClipParams, ErrorCode, Event, Events, GroupMode,
    ReceiptKind, ReconnectPolicy, Trust,
};
use ptt_relay::{RelayConfig, RelayHandle};

const WAIT: Duration = Duration::from_secs(10);

struct Harness {
    relay: RelayHandle,
    _dir: tempfile::TempDir,
}

impl Harness {
    async fn start() -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let relay = ptt_relay::start(RelayConfig::for_tests(dir.path()))
            .await
            .unwrap();
        Harness { relay, _dir: dir }
    }

    fn config(&self, user: &str, admin: bool) -> ClientConfig {
        let token = self
            .relay
            .issue_token(user, Duration::from_secs(3600), admin, false)
            .expect("own key");
        let trust = Trust::fingerprint_from_hex(self.relay.cert_fingerprint()).unwrap();
        ClientConfig::new(self.relay.addr(), "localhost", trust, token)
            .with_client_name(format!("test-{user}"))
    }

    async fn connect(&self, user: &str) -> (Client, Events) {
        Client::connect(self.config(user, false)).await.unwrap()
    }

    /// Creates `group` with `members` through an admin client.
    async fn group(&self, group: &str, mode: GroupMode, members: &[&str]) {
        let (admin, _events) = Client::connect(self.config("root", true)).await.unwrap();
        admin.create_group(group, mode).await.unwrap();
        for m in members {
            admin.add_member(group, m).await.unwrap();
        }
        admin.close().await;
    }
}

/// The next event that `pick` accepts, skipping the others.
async fn wait_for<T>(events: &mut Events, mut pick: impl FnMut(&Event) -> Option<T>) -> T {
    tokio::time::timeout(WAIT, async {
        loop {
            let event = events.next().await.expect("events ended");
            if let Some(t) = pick(&event) {
                return t;
            }
        }
    })
    .await
    .expect("timed out waiting for an event")
}

fn frames(n: usize) -> Vec<Bytes> {
    (0..n)
        .map(|i| Bytes::from(vec![0xf8, i as u8, 0xaa, 0x55]))
        .collect()
}

/// Collects one whole clip's frames from the events, returning (seq,
/// frames).
async fn receive_clip(events: &mut Events, group: &str) -> (ptt_client::ClipId, u64, Vec<Bytes>) {
    let clip_id = wait_for(events, |e| match e {
        Event::ClipStarted {
            group: g, clip_id, ..
        } if g == group => Some(*clip_id),
        _ => None,
    })
    .await;
    let mut got = Vec::new();
    let seq = wait_for(events, |e| match e {
        Event::Frame {
            clip_id: c,
            data,
            index,
            ..
        } if *c == clip_id => {
            assert_eq!(*index as usize, got.len());
            got.push(data.clone());
            None
        }
        Event::ClipEnded {
            clip_id: c,
            seq,
            frame_count,
            ..
        } if *c == clip_id => {
            assert_eq!(*frame_count as usize, got.len());
            Some(*seq)
        }
        Event::ClipAborted {
            clip_id: c, code, ..
        } if *c == clip_id => {
            panic!("clip aborted with {code}")
        }
        _ => None,
    })
    .await;
    (clip_id, seq, got)
}

#[tokio::test]
async fn a_clip_goes_live_to_a_member_and_the_talker_gets_receipts() {
    let h = Harness::start().await;
    h.group("team", GroupMode::Notes, &["alice", "bob"]).await;
    let (alice, mut alice_events) = h.connect("alice").await;
    let (bob, mut bob_events) = h.connect("bob").await;
    assert_eq!(alice.user(), "alice");
    let info = bob.join("team").await.unwrap();
    assert_eq!(
        (info.mode, info.cursor, info.last_seq),
        (GroupMode::Notes, 0, 0)
    );
    alice.join("team").await.unwrap();

    let sent = frames(25);
    let mut talk = alice.talk("team", ClipParams::default()).await.unwrap();
    let clip_id = talk.clip_id();
    for f in &sent {
        talk.send_frame(f.clone()).await.unwrap();
    }
    let stored = talk.finish(vec![1, 2, 3]).await.unwrap();
    assert_eq!(stored.seq, 1);
    assert_eq!(stored.clip_id, clip_id);

    let (got_id, seq, got) = receive_clip(&mut bob_events, "team").await;
    assert_eq!((got_id, seq), (clip_id, 1));
    assert_eq!(got, sent);

    // Bob auto-acknowledged: Alice hears it was delivered; then played.
    bob.played("team", 1).await.unwrap();
    let mut kinds = Vec::new();
    while kinds.len() < 2 {
        let kind = wait_for(&mut alice_events, |e| match e {
            Event::Receipt {
                user, seq: 1, kind, ..
            } if user == "bob" => Some(*kind),
            _ => None,
        })
        .await;
        kinds.push(kind);
    }
    assert!(kinds.contains(&ReceiptKind::Delivered) && kinds.contains(&ReceiptKind::Played));
    assert_eq!(bob.stats().clips_received, 1);
    alice.close().await;
    bob.close().await;
    h.relay.shutdown().await;
}

#[tokio::test]
async fn a_late_joiner_catches_up_from_the_store_then_fetches_again() {
    let h = Harness::start().await;
    h.group("ops", GroupMode::Notes, &["alice", "carol"]).await;
    let (alice, _ae) = h.connect("alice").await;
    for n in 0..3 {
        let stored = alice
            .send_clip("ops", ClipParams::default(), frames(5 + n), Bytes::new())
            .await
            .unwrap();
        assert_eq!(stored.seq, n as u64 + 1);
    }
    let (carol, mut events) = h.connect("carol").await;
    let info = carol.join("ops").await.unwrap();
    assert_eq!((info.cursor, info.last_seq), (0, 3));
    let mut seqs = Vec::new();
    let mut caught_up = false;
    while seqs.len() < 3 || !caught_up {
        match tokio::time::timeout(WAIT, events.next())
            .await
            .unwrap()
            .unwrap()
        {
            Event::ClipStarted { history, seq, .. } => {
                assert!(history);
                assert_ne!(seq, 0);
            }
            Event::ClipEnded { seq, .. } => seqs.push(seq),
            Event::CaughtUp { seq, .. } => {
                assert_eq!(seq, 3);
                caught_up = true;
            }
            _ => {}
        }
    }
    seqs.sort();
    assert_eq!(seqs, [1, 2, 3]);

    // Fetched clips are surfaced again although received before.
    assert_eq!(carol.fetch_recent("ops", 2).await.unwrap(), 2);
    let mut fetched = Vec::new();
    while fetched.len() < 2 {
        if let Event::ClipEnded { seq, .. } = tokio::time::timeout(WAIT, events.next())
            .await
            .unwrap()
            .unwrap()
        {
            fetched.push(seq);
        }
    }
    fetched.sort();
    assert_eq!(fetched, [2, 3]);
    assert_eq!(carol.stats().duplicates_dropped, 0);
    h.relay.shutdown().await;
}

#[tokio::test]
async fn the_walkie_floor_is_one_talker_at_a_time() {
    let h = Harness::start().await;
    h.group("radio", GroupMode::Walkie, &["alice", "bob"]).await;
    let (alice, _ae) = h.connect("alice").await;
    let (bob, mut bob_events) = h.connect("bob").await;
    bob.join("radio").await.unwrap();
    let grant = alice.request_floor("radio", false).await.unwrap();
    assert!(grant.max_ms > 0);
    wait_for(&mut bob_events, |e| match e {
        Event::FloorTaken { user, .. } if user == "alice" => Some(()),
        _ => None,
    })
    .await;
    match bob.request_floor("radio", false).await {
        Err(ClientError::FloorDenied { holder }) => assert_eq!(holder, "alice"),
        other => panic!("{other:?}"),
    }
    // A clip while someone else holds the floor is rejected.
    let rejected = tokio::time::timeout(
        WAIT,
        bob.send_clip("radio", ClipParams::default(), frames(3), Bytes::new()),
    )
    .await
    .expect("the clip is refused in time");
    assert_eq!(
        rejected.unwrap_err().code(),
        Some(ErrorCode::FloorTaken),
        "clip during another talker's floor"
    );
    alice.release_floor("radio").await.unwrap();
    wait_for(&mut bob_events, |e| match e {
        Event::FloorIdle { .. } => Some(()),
        _ => None,
    })
    .await;
    bob.request_floor("radio", false).await.unwrap();
    h.relay.shutdown().await;
}

#[tokio::test]
async fn trust_and_tokens_are_checked() {
    let h = Harness::start().await;
    // The certificate itself as PEM trust.
    let mut config = h.config("alice", false);
    config.trust = Trust::CertificatePem(h.relay.cert_pem().as_bytes().to_vec());
    let (client, _e) = Client::connect(config).await.unwrap();
    client.close().await;

    // A wrong pin fails the handshake.
    let mut config = h.config("alice", false);
    config.trust = Trust::Fingerprint([7; 32]);
    assert!(matches!(
        Client::connect(config).await,
        Err(ClientError::Connection(_))
    ));

    // A forged token is refused with its code.
    let mut config = h.config("alice", false);
    config.token = "ptt1.e30.AAAA".into();
    let err = Client::connect(config).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::InvalidToken), "{err}");
    assert!(err.is_fatal());

    // Admin operations need the admin claim.
    let (plain, _e) = h.connect("alice").await;
    let err = plain
        .create_group("nope", GroupMode::Notes)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Forbidden));
    h.relay.shutdown().await;
}

#[tokio::test]
async fn admin_operations_and_lists() {
    let h = Harness::start().await;
    let (admin, _e) = Client::connect(h.config("root", true)).await.unwrap();
    admin.create_group("a", GroupMode::Walkie).await.unwrap();
    let err = admin
        .create_group("a", GroupMode::Walkie)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::GroupExists));
    admin.add_member("a", "bob").await.unwrap();
    admin.add_member("a", "eve").await.unwrap();
    admin.remove_member("a", "eve").await.unwrap();
    admin.set_mode("a", GroupMode::Notes).await.unwrap();
    let groups = admin.list_groups().await.unwrap();
    assert!(
        groups
            .iter()
            .any(|g| g.group == "a" && g.mode == GroupMode::Notes)
    );
    let (bob, _be) = h.connect("bob").await;
    assert_eq!(bob.list_members("a").await.unwrap(), ["bob"]);
    let err = bob.join("missing").await.unwrap_err();
    assert!(
        matches!(
            err.code(),
            Some(ErrorCode::NoSuchGroup | ErrorCode::NotMember)
        ),
        "{err}"
    );
    h.relay.shutdown().await;
}

#[tokio::test]
async fn after_a_reconnect_unconfirmed_clips_are_resent_and_redeliveries_dropped() {
    let h = Harness::start().await;
    h.group("crew", GroupMode::Notes, &["alice", "bob"]).await;
    let policy = ReconnectPolicy {
        initial_delay: Duration::from_millis(50),
        max_delay: Duration::from_millis(200),
        ..ReconnectPolicy::default()
    };
    // Bob acknowledges nothing by himself, so the relay sends his clips
    // again after the reconnect: the client drops them (and acks them).
    let (bob, mut bob_events) = Client::connect(
        h.config("bob", false)
            .with_reconnect(policy.clone())
            .with_auto_ack(false),
    )
    .await
    .unwrap();
    bob.join("crew").await.unwrap();
    let (alice, mut alice_events) =
        Client::connect(h.config("alice", false).with_reconnect(policy))
            .await
            .unwrap();

    let first = alice
        .send_clip("crew", ClipParams::default(), frames(4), Bytes::new())
        .await
        .unwrap();
    let (id, seq, _) = receive_clip(&mut bob_events, "crew").await;
    assert_eq!((id, seq), (first.clip_id, 1));

    // Alice starts a clip, loses her connection mid-way, and finishes it
    // offline or on the new connection: it is sent again whole, same id.
    let sent = frames(10);
    let mut talk = alice.talk("crew", ClipParams::default()).await.unwrap();
    let clip_id = talk.clip_id();
    for f in &sent[..5] {
        talk.send_frame(f.clone()).await.unwrap();
    }
    alice
        .connection()
        .unwrap()
        .close(0u32.into(), b"network switch");
    for f in &sent[5..] {
        talk.send_frame(f.clone()).await.unwrap();
    }
    let stored = talk.finish(Bytes::new()).await.unwrap();
    assert_eq!(stored.clip_id, clip_id);
    assert_eq!(
        alice.stats().clips_resent,
        1,
        "sent again once, on the new connection"
    );
    wait_for(&mut alice_events, |e| match e {
        Event::Reconnected { .. } => Some(()),
        _ => None,
    })
    .await;

    // Bob gets the complete second clip (after an aborted first attempt).
    let (id, seq, got) = loop {
        let (id, seq, got) = tokio::time::timeout(WAIT, async {
            loop {
                match receive_clip_or_abort(&mut bob_events).await {
                    Some(done) => return done,
                    None => continue,
                }
            }
        })
        .await
        .unwrap();
        if id == clip_id {
            break (id, seq, got);
        }
    };
    assert_eq!(id, clip_id);
    assert_eq!(seq, stored.seq);
    assert_eq!(got, sent);

    // Bob's connection drops; he never acknowledged clip 1, so the relay
    // sends it again, and the client drops the copy.
    bob.connection().unwrap().close(0u32.into(), b"tunnel");
    wait_for(&mut bob_events, |e| match e {
        Event::Reconnected { .. } => Some(()),
        _ => None,
    })
    .await;
    tokio::time::timeout(WAIT, async {
        while bob.stats().duplicates_dropped < 2 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("both clips were delivered again and dropped");
    assert_eq!(bob.stats().clips_received, 2);
    h.relay.shutdown().await;
}

/// The next clip's (id, seq, frames), or `None` if it was aborted.
async fn receive_clip_or_abort(
    events: &mut Events,
) -> Option<(ptt_client::ClipId, u64, Vec<Bytes>)> {
    let clip_id = wait_for(events, |e| match e {
        Event::ClipStarted { clip_id, .. } => Some(*clip_id),
        _ => None,
    })
    .await;
    let mut got = Vec::new();
    wait_for(events, |e| match e {
        Event::Frame {
            clip_id: c, data, ..
        } if *c == clip_id => {
            got.push(data.clone());
            None
        }
        Event::ClipEnded {
            clip_id: c, seq, ..
        } if *c == clip_id => Some(Some(*seq)),
        Event::ClipAborted { clip_id: c, .. } if *c == clip_id => Some(None),
        _ => None,
    })
    .await
    .map(|seq| (clip_id, seq, got))
}

#[tokio::test]
async fn a_retry_under_the_same_clip_id_is_stored_once() {
    let h = Harness::start().await;
    h.group("dup", GroupMode::Notes, &["alice"]).await;
    let (alice, _e) = h.connect("alice").await;
    let first = alice
        .send_clip("dup", ClipParams::default(), frames(3), Bytes::new())
        .await
        .unwrap();
    // Another client instance (after an app restart) retries the clip.
    let (again, _e2) = h.connect("alice").await;
    let params = ClipParams {
        clip_id: Some(first.clip_id),
        ..ClipParams::default()
    };
    let second = tokio::time::timeout(
        WAIT,
        again.send_clip("dup", params, frames(3), Bytes::new()),
    )
    .await
    .expect("the retry is answered")
    .unwrap();
    assert_eq!(second, first);
    let third = alice
        .send_clip("dup", ClipParams::default(), frames(1), Bytes::new())
        .await
        .unwrap();
    assert_eq!(third.seq, 2);
    h.relay.shutdown().await;
}

#[tokio::test]
async fn pcm_is_encoded_and_sent_as_it_comes() {
    let h = Harness::start().await;
    h.group("pcm", GroupMode::Notes, &["alice", "bob"]).await;
    let (alice, _ae) = h.connect("alice").await;
    let (bob, mut bob_events) = h.connect("bob").await;
    bob.join("pcm").await.unwrap();
    let mut talk = alice
        .talk_pcm(
            "pcm",
            16_000,
            1,
            &ptt_client::EncoderConfig::default(),
            false,
        )
        .await
        .unwrap();
    // One second of a 440 Hz tone in 10 ms callbacks.
    let tone: Vec<i16> = (0..16_000)
        .map(|i| ((i as f32 / 16_000.0 * 440.0 * std::f32::consts::TAU).sin() * 8000.0) as i16)
        .collect();
    for chunk in tone.chunks(160) {
        talk.push_i16(chunk).await.unwrap();
    }
    let stored = talk.finish().await.unwrap();
    let header = wait_for(&mut bob_events, |e| match e {
        Event::ClipStarted { header, .. } => Some(header.clone()),
        _ => None,
    })
    .await;
    assert_eq!(
        (header.sample_rate, header.channels, header.frame_ms),
        (16_000, 1, 20)
    );
    let (count, waveform) = wait_for(&mut bob_events, |e| match e {
        Event::ClipEnded {
            frame_count,
            waveform,
            seq,
            ..
        } if *seq == stored.seq => Some((*frame_count, waveform.clone())),
        _ => None,
    })
    .await;
    // 1 s of 20 ms packets, plus the encoder's delay.
    assert!((50..=52).contains(&count), "{count} packets");
    assert!(!waveform.is_empty() && waveform.iter().any(|&b| b > 0));
    h.relay.shutdown().await;
}

/// A 16-bit mono PCM WAV file of `samples`.
fn wav_file(rate: u32, samples: &[i16]) -> Vec<u8> {
    let data_len = (samples.len() * 2) as u32;
    let mut v = b"RIFF".to_vec();
    v.extend_from_slice(&(36 + data_len).to_le_bytes());
    v.extend_from_slice(b"WAVEfmt ");
    v.extend_from_slice(&16u32.to_le_bytes());
    v.extend_from_slice(&1u16.to_le_bytes()); // PCM
    v.extend_from_slice(&1u16.to_le_bytes()); // mono
    v.extend_from_slice(&rate.to_le_bytes());
    v.extend_from_slice(&(rate * 2).to_le_bytes());
    v.extend_from_slice(&2u16.to_le_bytes());
    v.extend_from_slice(&16u16.to_le_bytes());
    v.extend_from_slice(b"data");
    v.extend_from_slice(&data_len.to_le_bytes());
    for s in samples {
        v.extend_from_slice(&s.to_le_bytes());
    }
    v
}

#[tokio::test]
async fn a_wav_upload_is_transcoded_and_delivered_as_opus() {
    let h = Harness::start().await;
    h.group("wav", GroupMode::Notes, &["alice", "bob"]).await;
    let (alice, _ae) = h.connect("alice").await;
    let (bob, mut bob_events) = h.connect("bob").await;
    bob.join("wav").await.unwrap();
    let tone: Vec<i16> = (0..16_000)
        .map(|i| ((i as f32 / 16_000.0 * 300.0 * std::f32::consts::TAU).sin() * 9000.0) as i16)
        .collect();
    // 32 KB: several pieces of at most max_frame_bytes.
    let stored = alice
        .upload_wav("wav", wav_file(16_000, &tone))
        .await
        .unwrap();
    let header = wait_for(&mut bob_events, |e| match e {
        Event::ClipStarted { header, .. } => Some(header.clone()),
        _ => None,
    })
    .await;
    assert_eq!(header.format, ptt_client::ClipFormat::Opus);
    let count = wait_for(&mut bob_events, |e| match e {
        Event::ClipEnded {
            seq, frame_count, ..
        } if *seq == stored.seq => Some(*frame_count),
        _ => None,
    })
    .await;
    assert!(count >= 50, "{count} Opus packets for one second");
    h.relay.shutdown().await;
}

/// Live clips are reported as read (`LiveRead` datagrams, PROTOCOL.md
/// section 9.7), so the relay measures a member's lag against what its
/// application took: a member that keeps reading is never cut, and one
/// whose application stops taking events stops reporting and is cut with
/// `SlowReceiver` (then gets the clip whole from the store), although its
/// 64 KiB stream window could hold the whole clip.
#[tokio::test]
async fn live_clips_are_reported_as_read_so_only_a_member_that_stops_is_cut() {
    // The relay's default `live_lag_frames` is 100, and it allows 25 more
    // for a report's age: carol, who reports 0 frames read, is cut before
    // alice's 150th frame; a 3 s clip keeps the test short.
    const CLIP_FRAMES: usize = 250;
    let h = Harness::start().await;
    h.group("live", GroupMode::Notes, &["alice", "bob", "carol"])
        .await;
    // Frames on streams (the media path has no lag cut: a lost frame is
    // fetched with its clip; client/tests/media.rs).
    let (bob, mut bob_events) = Client::connect(h.config("bob", false).with_media(false))
        .await
        .unwrap();
    bob.join("live").await.unwrap();
    // Carol's application takes no events while alice talks; with room
    // for 16, her client reads a few frames and then stops.
    let mut carol_config = h.config("carol", false).with_media(false);
    carol_config.event_capacity = 16;
    let (carol, mut carol_events) = Client::connect(carol_config).await.unwrap();
    carol.join("live").await.unwrap();
    let (alice, _alice_events) = h.connect("alice").await;

    // Bob reads everything as it comes.
    let bob_reads = tokio::spawn(async move {
        let (history, clip_id) = wait_for(&mut bob_events, |e| match e {
            Event::ClipStarted {
                history, clip_id, ..
            } => Some((*history, *clip_id)),
            _ => None,
        })
        .await;
        assert!(!history, "bob's copy is live");
        let mut got = Vec::new();
        wait_for(&mut bob_events, |e| match e {
            Event::Frame { data, .. } => {
                got.push(data.clone());
                None
            }
            Event::ClipEnded { .. } => Some(()),
            Event::ClipAborted { code, .. } => panic!("bob, reading, was cut: {code}"),
            _ => None,
        })
        .await;
        (clip_id, got)
    });

    let sent = frames(CLIP_FRAMES);
    let mut talk = alice.talk("live", ClipParams::default()).await.unwrap();
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for f in &sent {
        tick.tick().await;
        talk.send_frame(f.clone()).await.unwrap();
    }
    let stored = talk.finish(Bytes::new()).await.unwrap();

    let (clip_id, got) = tokio::time::timeout(WAIT, bob_reads)
        .await
        .expect("bob done in time")
        .unwrap();
    assert_eq!((clip_id, &got), (stored.clip_id, &sent));
    // A report after the header, then one every 25 frames (500 ms).
    assert_eq!(bob.stats().live_reads_sent, 1 + CLIP_FRAMES as u64 / 50);
    let datagrams = bob.connection().unwrap().stats().frame_tx.datagram;
    assert!(datagrams > 0, "reports are QUIC datagrams");

    // Carol takes her events now: the live copy was cut, and the stored
    // clip came again whole.
    let code = wait_for(&mut carol_events, |e| match e {
        Event::ClipAborted { clip_id, code, .. } if *clip_id == stored.clip_id => Some(*code),
        _ => None,
    })
    .await;
    assert_eq!(code, ErrorCode::SlowReceiver);
    assert_eq!(carol.stats().live_reads_sent, 1, "the header only");
    let (history, seq) = wait_for(&mut carol_events, |e| match e {
        Event::ClipStarted { history, seq, .. } => Some((*history, *seq)),
        _ => None,
    })
    .await;
    assert!(history);
    assert_eq!(seq, stored.seq);
    let mut recovered = Vec::new();
    wait_for(&mut carol_events, |e| match e {
        Event::Frame { data, .. } => {
            recovered.push(data.clone());
            None
        }
        Event::ClipEnded { .. } => Some(()),
        _ => None,
    })
    .await;
    assert_eq!(recovered, sent);
    h.relay.shutdown().await;
}
