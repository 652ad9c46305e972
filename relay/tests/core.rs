//! The relay core over real QUIC: the regressions of issue #9 (each failed
//! before its fix), the points where the relay and PROTOCOL.md were made to
//! agree, and the bounds on the work a client can make the relay do.

mod common;

use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use common::raw::{Control, Raw, header, n, read_clip};
use common::*;
use ptt_client::{ClipParams, Event, GroupMode};
use ptt_protocol::coding::put_varint;
use ptt_protocol::message::kind;
use ptt_protocol::{ClipHeader, ClipMessage, ControlMessage, ErrorCode};
use ptt_relay::store::{ClipStore, RedbStore, RetentionPolicy};

fn params() -> ClipParams {
    ClipParams::default()
}

async fn say(stream: &mut quinn::SendStream, message: ControlMessage) {
    stream.write_all(&message.to_bytes()).await.unwrap();
}

/// Waits until `check` holds, polling (for state the relay writes in the
/// background, such as cursors).
async fn eventually(mut check: impl AsyncFnMut() -> bool) {
    tokio::time::timeout(WAIT, async {
        while !check().await {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the condition held in time");
}

// ---------------------------------------------------------------------------
// Bugs.

/// Bug 1: 8 clips, the relay restarts with retention keeping 5; a member
/// that never connected joins, gets Gap{1..3} and clips 4..8, acks them;
/// its next join reports cursor 8, no gap and no clip again.
#[tokio::test]
async fn the_cursor_moves_past_a_gap_and_stays_there_across_reconnects() {
    let dir = tempfile::tempdir().unwrap();
    let start = |dir: &std::path::Path| {
        let config = ptt_relay::RelayConfig::for_tests(dir);
        async move {
            TestRelay {
                handle: ptt_relay::start(config).await.unwrap(),
                dir: tempfile::tempdir().unwrap(),
            }
        }
    };
    let relay = start(dir.path()).await;
    relay
        .group("team", GroupMode::Notes, &["alice", "bob"])
        .await;
    let (alice, _ae) = relay.member("alice", "team").await;
    for i in 0..8u8 {
        alice
            .send_clip("team", params(), frames(i, 2), Bytes::new())
            .await
            .unwrap();
    }
    alice.close().await;
    relay.handle.shutdown().await;
    {
        let store = RedbStore::open(dir.path()).unwrap();
        let policy = RetentionPolicy {
            max_age_ms: 0,
            max_clips_per_group: 5,
        };
        assert_eq!(store.apply_retention(policy, 1).await.unwrap(), 3);
    }
    let relay = start(dir.path()).await;
    let (bob, mut events) = relay.client("bob").await;
    let info = bob.join("team").await.unwrap();
    assert_eq!((info.cursor, info.last_seq), (0, 8));
    let (gap, ended) = gap_and_ends(&mut events, 5).await;
    assert_eq!(gap, Some((1, 3)));
    assert_eq!(ended, vec![4, 5, 6, 7, 8]);
    let store = relay.handle.store().clone();
    eventually(async || store.cursor("team", "bob").await.unwrap() == 8).await;
    bob.close().await;

    let (bob, mut events) = relay.client("bob").await;
    let info = bob.join("team").await.unwrap();
    assert_eq!((info.cursor, info.last_seq), (8, 8));
    let later = tokio::time::timeout(Duration::from_millis(300), async {
        loop {
            match events.next().await {
                Some(Event::Gap { .. }) | Some(Event::ClipStarted { .. }) => return true,
                Some(_) => {}
                None => return false,
            }
        }
    })
    .await;
    assert!(later.is_err(), "no gap and no clip on the next join");
}

/// Bug 2: SIGTERM while a clip is spoken: a listener's live copy ends with
/// RESET_STREAM ShuttingDown, never a bare FIN, and its control stream
/// says why before the close.
#[tokio::test]
async fn shutdown_resets_live_deliveries_with_a_code() {
    let relay = TestRelay::start_with(|c| c.shutdown_grace = Duration::from_millis(300)).await;
    relay
        .group("team", GroupMode::Notes, &["alice", "bob"])
        .await;
    let (bob, _bob_send, mut bob_control) = Raw::member(&relay, "bob", "team").await;
    let (alice, _ae) = relay.client("alice").await;
    let mut talk = alice.talk("team", params()).await.unwrap();
    for frame in frames(1, 25) {
        talk.send_frame(frame).await.unwrap();
    }
    let stream = tokio::time::timeout(WAIT, bob.conn.accept_uni())
        .await
        .unwrap()
        .unwrap();
    let reading = tokio::spawn(read_clip(stream));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let TestRelay { handle, dir: _dir } = relay;
    let stopping = tokio::spawn(handle.shutdown());
    // The talker keeps talking past the grace period.
    for frame in frames(2, 40) {
        if talk.send_frame(frame).await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (messages, reset) = reading.await.unwrap();
    assert!(matches!(messages[0], ClipMessage::Header(_)));
    assert!(
        !messages
            .iter()
            .any(|m| matches!(m, ClipMessage::End { .. })),
        "the clip did not end"
    );
    assert_eq!(
        reset,
        Some(n(ErrorCode::ShuttingDown)),
        "RESET_STREAM, not FIN"
    );
    let error = bob_control.closing_error().await;
    assert_eq!(error, ErrorCode::ShuttingDown);
    assert_eq!(bob.closed_with().await, n(ErrorCode::ShuttingDown));
    stopping.await.unwrap();
}

/// Bug 4: a floor grant's timer does not outlive the relay: after one
/// FloorRequest, shutdown returns at once and the store can be opened.
#[tokio::test]
async fn after_a_floor_grant_shutdown_closes_the_store_at_once() {
    let relay = TestRelay::start().await;
    relay
        .group_with_max("team", GroupMode::Walkie, &["alice"], 20_000)
        .await;
    let (alice, _ae) = relay.member("alice", "team").await;
    alice.request_floor("team", false).await.unwrap();
    let TestRelay { handle, dir } = relay;
    let started = Instant::now();
    handle.shutdown().await;
    assert!(started.elapsed() < Duration::from_secs(5));
    RedbStore::open(dir.path()).expect("the store is closed when shutdown returns");
}

/// Bug 5: a session whose queue of control events overflows (its client
/// does not read them) is closed with SlowReceiver; the others carry on
/// and never miss a floor change.
#[tokio::test]
async fn a_session_that_cannot_keep_up_is_closed_with_a_code() {
    let relay = TestRelay::start_with(|c| {
        c.control_burst = 100_000;
        c.control_per_second = 100_000;
    })
    .await;
    relay
        .group("team", GroupMode::Walkie, &["alice", "bob", "mallory"])
        .await;
    // Mallory's control stream takes 1 KiB, then stops reading.
    let mallory = Raw::connect_with(&relay, |c| {
        let mut t = quinn::TransportConfig::default();
        t.stream_receive_window(1024u32.into());
        c.transport_config(std::sync::Arc::new(t));
    })
    .await;
    let (mut m_send, mut m_control) = mallory.hello_as(&relay, "mallory").await;
    say(
        &mut m_send,
        ControlMessage::Join {
            request_id: 1,
            group: "team".into(),
        },
    )
    .await;
    m_control
        .until(|m| matches!(m, ControlMessage::Joined { .. }).then_some(()))
        .await;
    let (_bob, mut bob_events) = relay.member("bob", "team").await;
    let (alice, _ae) = relay.member("alice", "team").await;
    let rounds = ptt_relay::command::COMMAND_QUEUE;
    for _ in 0..rounds {
        alice.request_floor("team", false).await.unwrap();
        alice.release_floor("team").await.unwrap();
    }
    assert_eq!(mallory.closed_with().await, n(ErrorCode::SlowReceiver));
    // Bob saw every change, in order.
    let mut seen = 0;
    tokio::time::timeout(WAIT, async {
        while seen < 2 * rounds {
            match bob_events.next().await.unwrap() {
                Event::FloorTaken { .. } if seen % 2 == 0 => seen += 1,
                Event::FloorIdle { .. } if seen % 2 == 1 => seen += 1,
                Event::FloorTaken { .. } | Event::FloorIdle { .. } => {
                    panic!("floor events out of order at {seen}")
                }
                _ => {}
            }
        }
    })
    .await
    .expect("bob gets every floor change");
}

/// A talker gets a Receipt per member per clip, so a clip in a group of a
/// thousand brings a thousand at once: more than the session's command
/// queue holds, even when the talker's control stream stalls only for a
/// moment. Receipts wait in a backlog of their own: the talker is not
/// closed for its group's size, and gets every receipt once it reads
/// again. (Found by the fan-out benchmark, whose talker in a group of
/// 1,000 was closed with SlowReceiver now and then.)
#[tokio::test]
async fn a_burst_of_receipts_larger_than_the_command_queue_reaches_the_talker() {
    const MEMBERS: usize = 16;
    const CLIPS: usize = 48;
    let relay = TestRelay::start_with(|c| {
        c.clips_per_minute = 10_000;
        c.max_concurrent_clips = 100;
    })
    .await;
    let names: Vec<String> = (0..MEMBERS).map(|i| format!("m{i}")).collect();
    let mut everyone: Vec<&str> = names.iter().map(String::as_str).collect();
    everyone.push("tina");
    relay.group("big", GroupMode::Notes, &everyone).await;
    // Members that acknowledge when told to, so that every receipt comes
    // in one burst.
    let mut members = Vec::new();
    for name in &names {
        let config = relay.config(relay.token(name)).with_auto_ack(false);
        let (client, events) = relay.connect(config).await;
        client.join("big").await.expect("join");
        members.push((client, events));
    }
    // The talker's control stream takes 1 KiB (about twenty receipts).
    let tina = Raw::connect_with(&relay, |c| {
        let mut t = quinn::TransportConfig::default();
        t.stream_receive_window(1024u32.into());
        c.transport_config(std::sync::Arc::new(t));
    })
    .await;
    let (_t_send, mut t_control) = tina.hello_as(&relay, "tina").await;
    for _ in 0..CLIPS {
        let mut stream = tina.conn.open_uni().await.unwrap();
        let mut bytes = BytesMut::new();
        ClipMessage::Header(header("big")).encode(&mut bytes);
        ClipMessage::Frame {
            index: 0,
            data: Bytes::from_static(b"voice"),
        }
        .encode(&mut bytes);
        ClipMessage::End {
            frame_count: 1,
            seq: 0,
            waveform: Bytes::new(),
        }
        .encode(&mut bytes);
        stream.write_all(&bytes).await.unwrap();
        stream.finish().unwrap();
        t_control
            .until(|m| matches!(m, ControlMessage::Stored { .. }).then_some(()))
            .await;
    }
    // The talker reads nothing more until every member has acknowledged
    // every clip: MEMBERS × CLIPS receipts at once.
    for (client, events) in &mut members {
        for _ in 0..CLIPS {
            let seq = wait_for(events, |e| match e {
                Event::ClipEnded { seq, .. } => Some(*seq),
                _ => None,
            })
            .await;
            client.ack("big", seq).await.unwrap();
        }
    }
    let want = MEMBERS * CLIPS;
    assert!(want > ptt_relay::command::COMMAND_QUEUE + 100);
    let mut receipts = std::collections::HashSet::new();
    tokio::time::timeout(WAIT, async {
        while receipts.len() < want {
            match t_control.0.next_control().await {
                Ok(Some(ControlMessage::Receipt { seq, user, .. })) => {
                    assert!(receipts.insert((seq, user)), "a receipt came twice");
                }
                Ok(Some(_)) => {}
                other => panic!(
                    "the talker's control stream ended after {} of {want} receipts: {other:?}",
                    receipts.len()
                ),
            }
        }
    })
    .await
    .expect("every receipt in time");
    assert!(
        tina.conn.close_reason().is_none(),
        "the talker is still connected"
    );
}

/// Bug 7: a relay that verifies with an external key cannot sign: it says
/// so instead of panicking.
#[tokio::test]
async fn issuing_a_token_without_the_signing_key_is_refused_not_a_panic() {
    let issuer = ptt_relay::auth::TokenIssuer::generate();
    let relay =
        TestRelay::start_with(|c| c.token_public_key = Some(issuer.public_key_base64())).await;
    assert_eq!(
        relay
            .handle
            .issue_token("alice", Duration::from_secs(60), false, false),
        None
    );
}

// ---------------------------------------------------------------------------
// The relay and PROTOCOL.md agree.

/// Before Hello the relay checks a frame's length (over 4096 bytes:
/// TooLarge), then its type (anything but Hello, unknown types too:
/// Protocol); either way Error{0, code} comes before the close, and so
/// for AuthTimeout once the control stream is open.
#[tokio::test]
async fn refusals_before_hello_say_why_on_the_control_stream() {
    let relay = TestRelay::start_with(|c| c.auth_timeout = Duration::from_millis(400)).await;
    let cases: Vec<(Bytes, ErrorCode)> = vec![
        (Bytes::from_static(&[0x3e, 0x00]), ErrorCode::Protocol),
        (
            ControlMessage::ListGroups { request_id: 1 }.to_bytes(),
            ErrorCode::Protocol,
        ),
        (
            {
                let mut b = BytesMut::new();
                put_varint(&mut b, kind::HELLO);
                put_varint(&mut b, 5000);
                b.put_bytes(0, 100);
                b.freeze()
            },
            ErrorCode::TooLarge,
        ),
        (Bytes::new(), ErrorCode::AuthTimeout),
    ];
    for (bytes, expected) in cases {
        let raw = Raw::connect(&relay).await;
        let (mut send, recv) = raw.conn.open_bi().await.unwrap();
        // A stream is opened at the peer by its first byte: an empty
        // write does not open it, so send a frame's first byte only.
        if bytes.is_empty() {
            send.write_all(&[kind::HELLO as u8]).await.unwrap();
        } else {
            send.write_all(&bytes).await.unwrap();
        }
        let mut control = Control(ptt_protocol::FramedReader::new(
            recv,
            ptt_protocol::message::MAX_PAYLOAD_LEN,
        ));
        match control.next().await {
            Some(ControlMessage::Error {
                request_id: 0,
                code,
                ..
            }) => assert_eq!(code, expected),
            other => panic!("expected Error{{0, {expected}}}, got {other:?}"),
        }
        assert_eq!(raw.closed_with().await, n(expected));
    }
}

/// After Welcome, an oversized control message: Error{0, TooLarge}, then
/// the close.
#[tokio::test]
async fn an_oversized_control_message_is_explained_before_the_close() {
    let relay = TestRelay::start().await;
    let (raw, mut send, mut control) = Raw::hello(&relay, "mallory").await;
    let mut buf = BytesMut::new();
    put_varint(&mut buf, kind::JOIN);
    put_varint(&mut buf, 1 << 20);
    buf.put_bytes(0, 100);
    send.write_all(&buf).await.unwrap();
    assert!(matches!(
        control.next().await,
        Some(ControlMessage::Error {
            request_id: 0,
            code: ErrorCode::TooLarge,
            ..
        })
    ));
    assert_eq!(raw.closed_with().await, n(ErrorCode::TooLarge));
}

/// §5: FIN before ClipEnd is `ClipRejected{OutOfOrder}` (no STOP_SENDING
/// on a finished stream), and nothing is stored.
#[tokio::test]
async fn fin_before_clip_end_is_out_of_order() {
    let relay = TestRelay::start().await;
    relay.group("team", GroupMode::Notes, &["alice"]).await;
    let (raw, _send, mut control) = Raw::hello(&relay, "alice").await;
    let mut stream = raw.conn.open_uni().await.unwrap();
    let h = header("team");
    let mut bytes = ClipMessage::Header(h.clone()).to_bytes().to_vec();
    bytes.extend_from_slice(
        &ClipMessage::Frame {
            index: 0,
            data: Bytes::from_static(b"x"),
        }
        .to_bytes(),
    );
    stream.write_all(&bytes).await.unwrap();
    stream.finish().unwrap();
    let (clip_id, code) = control
        .until(|m| match m {
            ControlMessage::ClipRejected { clip_id, code, .. } => Some((clip_id, code)),
            _ => None,
        })
        .await;
    assert_eq!((clip_id, code), (h.clip_id, ErrorCode::OutOfOrder));
    assert_eq!(
        relay.handle.store().seq_range("team").await.unwrap().last,
        0
    );
}

/// §2.3/§6: an unknown mode byte in CreateGroup is Error{request_id,
/// InvalidRequest}; the connection stays open.
#[tokio::test]
async fn a_bad_mode_byte_is_an_invalid_request_not_a_close() {
    let relay = TestRelay::start().await;
    let raw = Raw::connect(&relay).await;
    let (mut send, recv) = raw.conn.open_bi().await.unwrap();
    let token = relay
        .handle
        .issue_token("ops", Duration::from_secs(60), true, false)
        .unwrap();
    say(
        &mut send,
        ControlMessage::Hello {
            version: ptt_protocol::PROTOCOL_VERSION,
            token,
            client: "raw".into(),
        },
    )
    .await;
    let mut control = Control(ptt_protocol::FramedReader::new(
        recv,
        ptt_protocol::message::MAX_PAYLOAD_LEN,
    ));
    assert!(matches!(
        control.next().await,
        Some(ControlMessage::Welcome(_))
    ));
    let mut good = ControlMessage::CreateGroup {
        request_id: 5,
        group: "team".into(),
        mode: GroupMode::Walkie,
    }
    .to_bytes()
    .to_vec();
    // The mode is the last byte of the payload.
    *good.last_mut().unwrap() = 9;
    send.write_all(&good).await.unwrap();
    match control.next().await {
        Some(ControlMessage::Error {
            request_id: 5,
            code,
            ..
        }) => assert_eq!(code, ErrorCode::InvalidRequest),
        other => panic!("{other:?}"),
    }
    say(&mut send, ControlMessage::ListGroups { request_id: 6 }).await;
    assert!(matches!(
        control.next().await,
        Some(ControlMessage::GroupList { request_id: 6, .. })
    ));
}

/// §5/§9.6: a transcoded WAV is delivered like any live clip: header seq 0,
/// no HISTORY flag, Opus at 48 kHz, the seq in ClipEnd.
#[tokio::test]
async fn a_transcoded_wav_is_delivered_like_a_live_clip() {
    let relay = TestRelay::start().await;
    relay
        .group("team", GroupMode::Notes, &["alice", "bob"])
        .await;
    let (bob, _bob_send, _bob_control) = Raw::member(&relay, "bob", "team").await;
    let (alice, _ae) = relay.client("alice").await;
    let wav = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../codec/tests/fixtures/speech.wav"
    ))
    .unwrap();
    let stored = alice.upload_wav("team", wav).await.unwrap();
    let (messages, reset) = bob.next_clip().await;
    assert_eq!(reset, None);
    let ClipMessage::Header(h) = &messages[0] else {
        panic!("a header first");
    };
    assert_eq!(h.seq, 0);
    assert_eq!(h.flags & ClipHeader::FLAG_HISTORY, 0);
    assert_eq!(h.sample_rate, 48_000);
    match messages.last().unwrap() {
        ClipMessage::End { seq, .. } => assert_eq!(*seq, stored.seq),
        other => panic!("{other:?}"),
    }
}

/// Notes groups: FloorRequest is granted at once and nothing is
/// broadcast. Walkie groups: a request from the holder is granted again
/// without a second FloorTaken. A joiner learns who holds the floor.
#[tokio::test]
async fn floor_requests_in_notes_groups_and_from_the_holder() {
    let relay = TestRelay::start().await;
    relay
        .group("notes", GroupMode::Notes, &["alice", "bob"])
        .await;
    relay
        .group("walkie", GroupMode::Walkie, &["alice", "bob", "carol"])
        .await;
    let (alice, _ae) = relay.client("alice").await;
    let (bob, mut bob_events) = relay.client("bob").await;
    bob.join("notes").await.unwrap();
    bob.join("walkie").await.unwrap();
    alice.request_floor("notes", false).await.unwrap();
    alice.request_floor("walkie", false).await.unwrap();
    alice.request_floor("walkie", false).await.unwrap();
    alice.release_floor("walkie").await.unwrap();
    let mut taken = Vec::new();
    wait_for(&mut bob_events, |e| match e {
        Event::FloorTaken { group, .. } => {
            taken.push(group.clone());
            None
        }
        Event::FloorIdle { .. } => Some(()),
        _ => None,
    })
    .await;
    assert_eq!(taken, vec!["walkie".to_string()]);
    // A joiner while the floor is held is told who holds it.
    alice.request_floor("walkie", false).await.unwrap();
    let (carol, mut carol_events) = relay.client("carol").await;
    carol.join("walkie").await.unwrap();
    let user = wait_for(&mut carol_events, |e| match e {
        Event::FloorTaken { user, .. } => Some(user.clone()),
        _ => None,
    })
    .await;
    assert_eq!(user, "alice");
}

/// CaughtUp names Joined.last_seq, also when nothing was sent.
#[tokio::test]
async fn caught_up_names_the_snapshot_when_nothing_is_sent() {
    let relay = TestRelay::start().await;
    relay
        .group("team", GroupMode::Notes, &["alice", "bob"])
        .await;
    let (alice, _ae) = relay.client("alice").await;
    for i in 0..3u8 {
        alice
            .send_clip("team", params(), frames(i, 1), Bytes::new())
            .await
            .unwrap();
    }
    relay
        .handle
        .store()
        .advance_cursor("team", "bob", 3)
        .await
        .unwrap();
    let (_raw, mut send_, mut control) = Raw::hello(&relay, "bob").await;
    say(
        &mut send_,
        ControlMessage::Join {
            request_id: 1,
            group: "team".into(),
        },
    )
    .await;
    let joined = control.next().await;
    assert!(matches!(
        joined,
        Some(ControlMessage::Joined {
            cursor: 3,
            last_seq: 3,
            ..
        })
    ));
    assert!(matches!(
        control.next().await,
        Some(ControlMessage::CaughtUp { seq: 3, .. })
    ));
}

/// A wrong ALPN fails the TLS handshake with no_application_protocol
/// (transport error 0x0178).
#[tokio::test]
async fn a_wrong_alpn_is_refused_in_the_handshake() {
    let relay = TestRelay::start().await;
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(std::sync::Arc::new(AnyCert))
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"nope/1".to_vec()];
    let client = quinn::ClientConfig::new(std::sync::Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap(),
    ));
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let error = tokio::time::timeout(
        WAIT,
        endpoint
            .connect_with(client, relay.handle.addr(), "localhost")
            .unwrap(),
    )
    .await
    .expect("an answer in time")
    .expect_err("refused");
    match error {
        quinn::ConnectionError::ConnectionClosed(close) => {
            assert_eq!(u64::from(close.error_code), 0x178, "{close:?}");
        }
        other => panic!("{other}"),
    }
}

/// Accepts any certificate: the ALPN test needs the handshake to reach
/// the ALPN check.
#[derive(Debug)]
struct AnyCert;

impl rustls::client::danger::ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// During shutdown, new connections are refused (CONNECTION_REFUSED)
/// while the sessions drain.
#[tokio::test]
async fn connections_during_shutdown_are_refused() {
    let relay = TestRelay::start_with(|c| c.shutdown_grace = Duration::from_secs(3)).await;
    relay.group("team", GroupMode::Notes, &["alice"]).await;
    let (alice, _ae) = relay.member("alice", "team").await;
    // A clip in flight keeps the relay draining.
    let mut talk = alice.talk("team", params()).await.unwrap();
    talk.send_frame(frames(1, 1)[0].clone()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let config = relay.config(String::new());
    let addr = relay.handle.addr();
    let TestRelay { handle, dir: _dir } = relay;
    let stopping = tokio::spawn(handle.shutdown());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(ptt_client::quinn_config(&config).unwrap());
    let refused = tokio::time::timeout(WAIT, endpoint.connect(addr, "localhost").unwrap())
        .await
        .expect("an answer in time");
    match refused {
        Err(quinn::ConnectionError::ConnectionClosed(close)) => {
            assert_eq!(
                close.error_code,
                quinn::TransportErrorCode::CONNECTION_REFUSED
            );
        }
        other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
    }
    talk.finish(Bytes::new()).await.ok();
    stopping.await.unwrap();
}

// ---------------------------------------------------------------------------
// Work a client can make the relay do is bounded.

/// Acks and Played for clips never delivered on the connection spawn
/// nothing and write nothing; past the rate limit the connection is closed
/// with RateLimited, and only that connection.
#[tokio::test]
async fn claims_about_clips_never_delivered_cost_nothing_and_floods_are_cut() {
    let relay = TestRelay::start().await;
    relay
        .group("team", GroupMode::Notes, &["alice", "carol", "mallory"])
        .await;
    let (alice, _ae) = relay.member("alice", "team").await;
    let (_carol, mut carol_events) = relay.member("carol", "team").await;
    let (raw, mut send_, mut control) = Raw::member(&relay, "mallory", "team").await;
    let tasks = || {
        tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks()
    };
    let before = tasks();
    let writes_before = relay.handle.store().counters().cursor_writes;
    let mut halves = [BytesMut::new(), BytesMut::new()];
    for i in 0..200u64 {
        let seq = 1 + i * 7919 % 100_000;
        let burst = &mut halves[(i / 100) as usize];
        burst.extend_from_slice(
            &ControlMessage::DeliveryAck {
                group: "team".into(),
                seq,
            }
            .to_bytes(),
        );
        burst.extend_from_slice(
            &ControlMessage::Played {
                group: "team".into(),
                seq,
            }
            .to_bytes(),
        );
    }
    send_.write_all(&halves[0]).await.unwrap();
    say(&mut send_, ControlMessage::ListGroups { request_id: 9 }).await;
    control
        .until(|m| matches!(m, ControlMessage::GroupList { .. }).then_some(()))
        .await;
    assert!(tasks() <= before + 2, "tasks grew: {before} -> {}", tasks());
    assert_eq!(relay.handle.store().counters().cursor_writes, writes_before);
    assert_eq!(
        relay
            .handle
            .store()
            .cursor("team", "mallory")
            .await
            .unwrap(),
        0
    );
    // The rest of the flood passes the limit (256 at once).
    let _ = send_.write_all(&halves[1]).await;
    let error = control.closing_error().await;
    assert_eq!(error, ErrorCode::RateLimited);
    assert_eq!(raw.closed_with().await, n(ErrorCode::RateLimited));
    // Everyone else carries on.
    let stored = alice
        .send_clip("team", params(), frames(9, 3), Bytes::new())
        .await
        .unwrap();
    let clips = collect_clips(&mut carol_events, 1).await;
    assert_eq!(clips[0].seq, stored.seq);
}

/// Uploads refused for the client's own doing cost control-message
/// tokens: a client that opens clip stream after clip stream for a group
/// it is not in is closed with RateLimited (burst 256), and only it.
#[tokio::test]
async fn a_flood_of_refused_uploads_is_cut() {
    let relay = TestRelay::start().await;
    relay
        .group("team", GroupMode::Notes, &["alice", "carol", "mallory"])
        .await;
    relay.group("other", GroupMode::Notes, &["alice"]).await;
    let (alice, _ae) = relay.member("alice", "team").await;
    let (_carol, mut carol_events) = relay.member("carol", "team").await;
    let (raw, _send, _control) = Raw::member(&relay, "mallory", "team").await;
    let mut opened = 0u32;
    let flood = async {
        for _ in 0..2_000u32 {
            let Ok(mut stream) = raw.conn.open_uni().await else {
                break;
            };
            let bytes = ClipMessage::Header(header("other")).to_bytes();
            if stream.write_all(&bytes).await.is_err() || stream.finish().is_err() {
                break;
            }
            opened += 1;
        }
    };
    tokio::time::timeout(Duration::from_secs(20), flood)
        .await
        .expect("the flood ends within 20 s");
    assert_eq!(raw.closed_with().await, n(ErrorCode::RateLimited));
    assert!(
        (200..2_000).contains(&opened),
        "closed after {opened} refused uploads (burst 256)"
    );
    // Everyone else carries on.
    let stored = alice
        .send_clip("team", params(), frames(9, 3), Bytes::new())
        .await
        .unwrap();
    let clips = collect_clips(&mut carol_events, 1).await;
    assert_eq!(clips[0].seq, stored.seq);
}

/// Cursor writes coalesce per (member, group): 300 acks in one burst are
/// a handful of store writes, ending at the last.
#[tokio::test]
async fn cursor_writes_coalesce_to_the_last() {
    let relay = TestRelay::start_with(|c| c.clips_per_minute = 1000).await;
    relay
        .group("team", GroupMode::Notes, &["alice", "bob"])
        .await;
    let store = relay.handle.store().clone();
    let (alice, _ae) = relay.client("alice").await;
    for i in 0..300u32 {
        alice
            .send_clip("team", params(), frames(i as u8, 1), Bytes::new())
            .await
            .unwrap();
    }
    let (raw, mut send_, mut control) = Raw::hello(&relay, "bob").await;
    say(
        &mut send_,
        ControlMessage::Join {
            request_id: 1,
            group: "team".into(),
        },
    )
    .await;
    for _ in 0..300 {
        let (_, reset) = raw.next_clip().await;
        assert_eq!(reset, None);
    }
    control
        .until(|m| matches!(m, ControlMessage::CaughtUp { seq: 300, .. }).then_some(()))
        .await;
    let before = store.counters().cursor_writes;
    let mut acks = BytesMut::new();
    for seq in 1..=300u64 {
        acks.extend_from_slice(
            &ControlMessage::DeliveryAck {
                group: "team".into(),
                seq,
            }
            .to_bytes(),
        );
    }
    send_.write_all(&acks).await.unwrap();
    eventually(async || store.cursor("team", "bob").await.unwrap() == 300).await;
    let writes = store.counters().cursor_writes - before;
    assert!(writes <= 20, "{writes} cursor writes for 300 acks");
    // The acks were owed: the connection was not rate limited.
    say(&mut send_, ControlMessage::ListGroups { request_id: 2 }).await;
    control
        .until(|m| matches!(m, ControlMessage::GroupList { .. }).then_some(()))
        .await;
}

/// A member removed while joined stops receiving: GroupLeft, no more
/// clips; the others carry on.
#[tokio::test]
async fn a_removed_member_stops_receiving() {
    let relay = TestRelay::start().await;
    relay
        .group("team", GroupMode::Notes, &["alice", "bob", "carol"])
        .await;
    let (alice, _ae) = relay.member("alice", "team").await;
    let (_carol, mut carol_events) = relay.member("carol", "team").await;
    let (raw, _send, mut control) = Raw::member(&relay, "bob", "team").await;
    ptt_relay::admin::remove_member(&**relay.handle.store(), "team", "bob")
        .await
        .unwrap();
    let code = control
        .until(|m| match m {
            ControlMessage::GroupLeft { group, code } if group == "team" => Some(code),
            _ => None,
        })
        .await;
    assert_eq!(code, ErrorCode::NotMember);
    let stored = alice
        .send_clip("team", params(), frames(3, 3), Bytes::new())
        .await
        .unwrap();
    assert_eq!(collect_clips(&mut carol_events, 1).await[0].seq, stored.seq);
    let nothing = tokio::time::timeout(Duration::from_millis(300), raw.conn.accept_uni()).await;
    assert!(nothing.is_err(), "a removed member gets no clip");
}
