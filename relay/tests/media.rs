//! The UDP media path (PROTOCOL.md §14) over real QUIC and UDP on
//! loopback: a talker's frames reach a bound member byte-identical in
//! sealed datagrams while the clip's header and end come on its stream; a
//! member that lost frames gets the clip whole through FetchClip; spoofed,
//! replayed and garbled Binds move nothing and get no answer; a member
//! whose path never binds gets its frames on streams. The talker's uplink:
//! frames it sends by UDP reach media members while its upload stream is
//! held back, each once whichever copy comes first, the store keeps the
//! stream's copy, and forged, replayed, unknown or far-ahead uplink
//! packets do nothing.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::raw::{Raw, header};
use common::{TestRelay, WAIT};
use ptt_protocol::media::{
    EXPORTER_LABEL, FEATURE_FRAMES, FramePayload, FramesPayload, HEADED_FRAMES, HeadedFramePayload,
    KEY_MATERIAL_LEN, MediaCrypto, MediaKeys, PacketType, Side, UPLINK_AHEAD, UplinkPayload,
};
use ptt_protocol::{ClipHeader, ClipMessage, ControlMessage, ErrorCode, GroupMode, MediaMessage};
use tokio::net::UdpSocket;

/// A member's end of the media path, as a client implements it from the
/// document: the keys from its own TLS session, a UDP socket.
struct MediaClient {
    crypto: MediaCrypto,
    socket: UdpSocket,
    relay: std::net::SocketAddr,
}

impl MediaClient {
    /// MediaOpen as section 14's first version sends it (no features),
    /// then the offer; keys exported from `raw`'s connection.
    async fn open(
        raw: &Raw,
        send: &mut quinn::SendStream,
        control: &mut common::raw::Control,
    ) -> MediaClient {
        // type 40 60, length 1, request id 40: without the features field.
        send.write_all(&[0x40, 0x60, 0x01, 40]).await.unwrap();
        let (client, features) = Self::offered(raw, control).await;
        assert_eq!(
            features, 0,
            "nothing offered to a client that asked for nothing"
        );
        client
    }

    /// MediaOpen with `features`; the client and the offer's features.
    async fn open_with(
        raw: &Raw,
        send: &mut quinn::SendStream,
        control: &mut common::raw::Control,
        features: u64,
    ) -> (MediaClient, u64) {
        let open = ControlMessage::Media(MediaMessage::Open {
            request_id: 40,
            features,
        });
        send.write_all(&open.to_bytes()).await.unwrap();
        Self::offered(raw, control).await
    }

    /// The answer to MediaOpen 40.
    async fn offered(raw: &Raw, control: &mut common::raw::Control) -> (MediaClient, u64) {
        let (port, conn_id, epoch, features) = control
            .until(|m| match m {
                ControlMessage::Media(MediaMessage::Offer {
                    request_id: 40,
                    port,
                    conn_id,
                    epoch,
                    features,
                }) => Some((port, conn_id, epoch, features)),
                ControlMessage::Error {
                    request_id: 40,
                    code,
                    ..
                } => panic!("no offer: {code}"),
                _ => None,
            })
            .await;
        let client = MediaClient {
            crypto: MediaCrypto::new(Side::Client, conn_id, epoch, &export(&raw.conn, epoch)),
            socket: UdpSocket::bind("127.0.0.1:0").await.unwrap(),
            relay: std::net::SocketAddr::new(raw.conn.remote_address().ip(), port),
        };
        (client, features)
    }

    /// A sealed Bind carrying `clock`.
    fn bind_packet(&mut self, clock: u64) -> Vec<u8> {
        let mut packet = Vec::new();
        self.crypto
            .seal(PacketType::Bind, &clock.to_be_bytes(), &mut packet)
            .unwrap();
        packet
    }

    /// Binds and waits for the BindAck echoing the clock.
    async fn bind(&mut self) {
        let packet = self.bind_packet(1234);
        self.socket.send_to(&packet, self.relay).await.unwrap();
        let (kind, plain) = self.next_packet(WAIT).await.expect("a BindAck");
        assert_eq!(kind, PacketType::BindAck);
        assert_eq!(plain, 1234u64.to_be_bytes());
    }

    /// The next packet that opens: its type and plaintext.
    async fn next_packet(&mut self, wait: Duration) -> Option<(PacketType, Vec<u8>)> {
        let mut buf = vec![0u8; 2048];
        loop {
            let (len, _) = tokio::time::timeout(wait, self.socket.recv_from(&mut buf))
                .await
                .ok()?
                .unwrap();
            if let Ok((header, plain)) = self.crypto.open(&mut buf[..len]) {
                return Some((header.kind, plain.to_vec()));
            }
        }
    }

    /// `n` Frame packets: (stream, index, data) each.
    async fn frames(&mut self, n: usize) -> Vec<(u64, u32, Bytes)> {
        self.frames_headed(n)
            .await
            .into_iter()
            .map(|(s, i, d, _)| (s, i, d))
            .collect()
    }

    /// `n` Frame or HeadedFrame packets: (stream, index, data, the header
    /// of a HeadedFrame) each.
    async fn frames_headed(&mut self, n: usize) -> Vec<(u64, u32, Bytes, Option<ClipHeader>)> {
        let mut out = Vec::new();
        for (kind, stream, header, frames) in self.packets(n).await {
            assert_ne!(kind, PacketType::Frames, "one frame a packet");
            for (index, data) in frames {
                out.push((stream, index, data, header.clone()));
            }
        }
        out
    }

    /// Frame packets of any type until `n` frames came: per packet its
    /// type, stream, header (if it carried one) and `(index, data)`s.
    #[allow(clippy::type_complexity)]
    async fn packets(
        &mut self,
        n: usize,
    ) -> Vec<(PacketType, u64, Option<ClipHeader>, Vec<(u32, Bytes)>)> {
        let mut out = Vec::new();
        let mut frames = 0;
        while frames < n {
            let (kind, plain) = self.next_packet(WAIT).await.expect("a frame in time");
            let packet = match kind {
                PacketType::Frame => {
                    let f = FramePayload::decode(&plain).unwrap();
                    (
                        f.stream,
                        None,
                        vec![(f.index, Bytes::copy_from_slice(f.data))],
                    )
                }
                PacketType::HeadedFrame => {
                    let f = HeadedFramePayload::decode(&plain).unwrap();
                    let data = Bytes::copy_from_slice(f.data);
                    (f.stream, Some(f.header), vec![(f.index, data)])
                }
                PacketType::Frames => {
                    let f = FramesPayload::decode(&plain).unwrap();
                    let frames = f
                        .frames
                        .iter()
                        .map(|(i, d)| (*i, Bytes::copy_from_slice(d)))
                        .collect();
                    (f.stream, f.header, frames)
                }
                other => panic!("a frame, not {other:?}"),
            };
            frames += packet.2.len();
            out.push((kind, packet.0, packet.1, packet.2));
        }
        out
    }

    /// Whether any packet opens within `wait`.
    async fn quiet(&mut self, wait: Duration) -> bool {
        self.next_packet(wait).await.is_none()
    }

    /// A sealed Uplink packet for frame `index` of upload stream `stream`.
    fn uplink_packet(&mut self, stream: u64, index: u32, data: &[u8]) -> Vec<u8> {
        let mut plain = Vec::new();
        UplinkPayload {
            stream,
            frames: vec![(index, data)],
        }
        .encode(&mut plain);
        let mut packet = Vec::new();
        self.crypto
            .seal(PacketType::Uplink, &plain, &mut packet)
            .unwrap();
        packet
    }

    async fn send(&self, packet: &[u8]) {
        self.socket.send_to(packet, self.relay).await.unwrap();
    }
}

fn export(conn: &quinn::Connection, epoch: u32) -> [u8; KEY_MATERIAL_LEN] {
    let mut material = [0u8; KEY_MATERIAL_LEN];
    conn.export_keying_material(&mut material, EXPORTER_LABEL, &MediaKeys::context(epoch))
        .unwrap();
    material
}

/// Uploads a clip of `frames` from `talker`, `first` frames, a pause (so
/// they are live, not backlog, for members already on the clip), then the
/// rest and the end.
async fn talk(talker: &Raw, group: &str, frames: &[Bytes], first: usize) {
    talk_paused(talker, group, frames, &[first]).await
}

/// As [`talk`], with a 200 ms pause before each frame in `pauses`.
async fn talk_paused(talker: &Raw, group: &str, frames: &[Bytes], pauses: &[usize]) {
    let mut up = talker.conn.open_uni().await.unwrap();
    up.write_all(&ClipMessage::Header(header(group)).to_bytes())
        .await
        .unwrap();
    for (i, data) in frames.iter().enumerate() {
        if pauses.contains(&i) {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let frame = ClipMessage::Frame {
            index: i as u32,
            data: data.clone(),
        };
        up.write_all(&frame.to_bytes()).await.unwrap();
    }
    let end = ClipMessage::End {
        frame_count: frames.len() as u32,
        seq: 0,
        waveform: Bytes::new(),
    };
    up.write_all(&end.to_bytes()).await.unwrap();
    up.finish().unwrap();
}

/// The next clip stream: its id and messages (FIN expected).
async fn next_stream(raw: &Raw) -> (u64, Vec<ClipMessage>) {
    let recv = tokio::time::timeout(WAIT, raw.conn.accept_uni())
        .await
        .expect("a clip stream in time")
        .unwrap();
    let id = u64::from(recv.id());
    let (messages, reset) = common::raw::read_clip(recv).await;
    assert_eq!(reset, None, "the stream ends with FIN");
    (id, messages)
}

#[tokio::test]
async fn frames_go_by_udp_byte_identical_and_a_lossy_member_fetches_the_clip_whole() {
    let relay = TestRelay::start().await;
    relay
        .group("team", GroupMode::Notes, &["alice", "bob"])
        .await;
    let (bob, mut bob_send, mut bob_control) = Raw::member(&relay, "bob", "team").await;
    let mut media = MediaClient::open(&bob, &mut bob_send, &mut bob_control).await;
    media.bind().await;
    let (alice, _alice_send, _alice_control) = Raw::hello(&relay, "alice").await;

    let frames = common::frames(7, 30);
    let talking = talk(&alice, "team", &frames, 10);
    let (_, (stream, messages), received) =
        tokio::join!(talking, next_stream(&bob), media.frames_headed(30));
    // The stream: the header (flag MEDIA) and the end, no frame.
    let [
        ClipMessage::Header(h),
        ClipMessage::End {
            frame_count, seq, ..
        },
    ] = &messages[..]
    else {
        panic!("header and end only: {messages:?}");
    };
    assert_eq!(h.flags & ClipHeader::FLAG_MEDIA, ClipHeader::FLAG_MEDIA);
    assert_eq!((*frame_count, *seq), (30, 1));
    // The datagrams: every frame, byte for byte, naming the stream; the
    // first HEADED_FRAMES with the stream's header, the rest without.
    for (i, (s, index, data, headed)) in received.iter().enumerate() {
        assert_eq!((*s, *index as usize), (stream, i));
        assert_eq!(data, &frames[i], "frame {i}");
        if i < HEADED_FRAMES as usize {
            assert_eq!(headed.as_ref(), Some(h), "frame {i} names its clip");
        } else {
            assert_eq!(headed, &None, "frame {i} is a plain Frame");
        }
    }

    // Say bob's phone lost frames 3 and 17: it fetches the clip whole.
    let fetch = ControlMessage::FetchClip {
        request_id: 9,
        group: "team".into(),
        seq: 1,
    };
    bob_send.write_all(&fetch.to_bytes()).await.unwrap();
    let (_, fetched) = next_stream(&bob).await;
    let fetched: Vec<Bytes> = fetched
        .into_iter()
        .filter_map(|m| match m {
            ClipMessage::Frame { data, .. } => Some(data),
            _ => None,
        })
        .collect();
    assert_eq!(fetched, frames, "the fetched clip has every frame");
    relay.handle.shutdown().await;
}

#[tokio::test]
async fn spoofed_replayed_and_garbled_binds_move_nothing_and_get_no_answer() {
    let relay = TestRelay::start().await;
    relay
        .group("team", GroupMode::Notes, &["alice", "bob"])
        .await;
    let (bob, mut bob_send, mut bob_control) = Raw::member(&relay, "bob", "team").await;
    let mut media = MediaClient::open(&bob, &mut bob_send, &mut bob_control).await;
    let captured = media.bind_packet(1);
    media.socket.send_to(&captured, media.relay).await.unwrap();
    assert!(media.next_packet(WAIT).await.is_some(), "a BindAck");

    // An attacker on another address: the captured Bind replayed, a fresh
    // Bind with one bit flipped, a Bind sealed with other keys, and junk.
    let attacker = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut garbled = media.bind_packet(2);
    garbled[30] ^= 0x40;
    let mut forged = Vec::new();
    MediaCrypto::new(
        Side::Client,
        media.crypto.conn_id(),
        0,
        &[7; KEY_MATERIAL_LEN],
    )
    .seal(PacketType::Bind, &[0; 8], &mut forged)
    .unwrap();
    for packet in [
        captured.clone(),
        garbled,
        forged,
        vec![0x01; 40],
        vec![0x01; 1500],
    ] {
        attacker.send_to(&packet, media.relay).await.unwrap();
    }
    let mut buf = [0u8; 2048];
    let answer =
        tokio::time::timeout(Duration::from_millis(500), attacker.recv_from(&mut buf)).await;
    assert!(answer.is_err(), "the attacker gets no answer");

    // The frames still go to bob's address, and only there.
    let (alice, _s, _c) = Raw::hello(&relay, "alice").await;
    let frames = common::frames(1, 5);
    let (_, (_, messages), received) = tokio::join!(
        talk(&alice, "team", &frames, 5),
        next_stream(&bob),
        media.frames(5)
    );
    assert_eq!(messages.len(), 2, "header and end");
    assert_eq!(
        received.into_iter().map(|f| f.2).collect::<Vec<_>>(),
        frames
    );
    let leaked =
        tokio::time::timeout(Duration::from_millis(200), attacker.recv_from(&mut buf)).await;
    assert!(leaked.is_err(), "nothing reaches the attacker");
    relay.handle.shutdown().await;
}

#[tokio::test]
async fn without_a_bind_or_a_media_socket_frames_stay_on_streams() {
    // Offered but never bound: the clip comes whole on the stream.
    let relay = TestRelay::start().await;
    relay
        .group("team", GroupMode::Notes, &["alice", "bob"])
        .await;
    let (bob, mut bob_send, mut bob_control) = Raw::member(&relay, "bob", "team").await;
    let _unbound = MediaClient::open(&bob, &mut bob_send, &mut bob_control).await;
    let (alice, _s, _c) = Raw::hello(&relay, "alice").await;
    let frames = common::frames(2, 6);
    let (_, (_, messages)) = tokio::join!(talk(&alice, "team", &frames, 3), next_stream(&bob));
    let ClipMessage::Header(h) = &messages[0] else {
        panic!("a header first");
    };
    assert_eq!(h.flags & ClipHeader::FLAG_MEDIA, 0);
    assert_eq!(messages.len(), 2 + frames.len(), "frames on the stream");
    relay.handle.shutdown().await;

    // A relay with the media path off answers MediaUnavailable.
    let relay = TestRelay::start_with(|c| c.media = false).await;
    let (_raw, mut send, mut control) = Raw::hello(&relay, "bob").await;
    let open = ControlMessage::Media(MediaMessage::Open {
        request_id: 3,
        features: FEATURE_FRAMES,
    });
    send.write_all(&open.to_bytes()).await.unwrap();
    let code = control
        .until(|m| match m {
            ControlMessage::Error {
                request_id: 3,
                code,
                ..
            } => Some(code),
            _ => None,
        })
        .await;
    assert_eq!(code, ErrorCode::MediaUnavailable);
    relay.handle.shutdown().await;
}

#[tokio::test]
async fn uplink_frames_beat_a_held_upload_stream_once_each_and_the_store_keeps_the_stream_copy() {
    let relay = TestRelay::start().await;
    relay
        .group("team", GroupMode::Notes, &["alice", "bob"])
        .await;
    let (bob, mut bob_send, mut bob_control) = Raw::member(&relay, "bob", "team").await;
    let mut bob_media = MediaClient::open(&bob, &mut bob_send, &mut bob_control).await;
    bob_media.bind().await;
    let (alice, mut alice_send, mut alice_control) = Raw::hello(&relay, "alice").await;
    let mut alice_media = MediaClient::open(&alice, &mut alice_send, &mut alice_control).await;
    alice_media.bind().await;

    // Frames 0-2 on the upload stream: bob's delivery is under way.
    let frames = common::frames(9, 20);
    let mut up = alice.conn.open_uni().await.unwrap();
    let upload = u64::from(up.id());
    up.write_all(&ClipMessage::Header(header("team")).to_bytes())
        .await
        .unwrap();
    let on_stream = |i: usize, data: &Bytes| {
        ClipMessage::Frame {
            index: i as u32,
            data: data.clone(),
        }
        .to_bytes()
    };
    for (i, data) in frames.iter().enumerate().take(3) {
        up.write_all(&on_stream(i, data)).await.unwrap();
    }
    let first = bob_media.frames(3).await;
    let bob_stream = first[0].0;

    // Frames 3-9 by the uplink alone, the stream held back: they reach bob
    // at once (a different copy of frame 8 than the stream will carry).
    let mut live8 = frames[8].to_vec();
    live8.push(0xee);
    let mut captured = Vec::new();
    for i in 3..10u32 {
        let data = if i == 8 {
            &live8[..]
        } else {
            &frames[i as usize][..]
        };
        let packet = alice_media.uplink_packet(upload, i, data);
        alice_media.send(&packet).await;
        captured.push(packet);
    }
    let early = bob_media.frames(7).await;
    let indices: Vec<u32> = early.iter().map(|f| f.1).collect();
    assert_eq!(indices, (3..10).collect::<Vec<_>>());
    assert!(early.iter().all(|f| f.0 == bob_stream));
    assert_eq!(early[5].2, Bytes::from(live8.clone()), "the uplink's copy");

    // Nothing moves bob's frames now: the same packets replayed, a frame
    // of the uplink again under a new counter, one sealed with other keys,
    // an unknown upload stream, an index UPLINK_AHEAD past the stream.
    for packet in &captured {
        alice_media.send(packet).await;
    }
    let again = alice_media.uplink_packet(upload, 5, &frames[5]);
    alice_media.send(&again).await;
    let mut forged = Vec::new();
    let mut plain = Vec::new();
    UplinkPayload {
        stream: upload,
        frames: vec![(10, &frames[10][..])],
    }
    .encode(&mut plain);
    MediaCrypto::new(
        Side::Client,
        alice_media.crypto.conn_id(),
        0,
        &[7; KEY_MATERIAL_LEN],
    )
    .seal(PacketType::Uplink, &plain, &mut forged)
    .unwrap();
    alice_media.send(&forged).await;
    let unknown = alice_media.uplink_packet(upload + 4, 10, &frames[10]);
    alice_media.send(&unknown).await;
    let ahead = alice_media.uplink_packet(upload, 3 + UPLINK_AHEAD, &frames[10]);
    alice_media.send(&ahead).await;
    assert!(
        bob_media.quiet(Duration::from_millis(300)).await,
        "replayed, repeated, forged, unknown and far-ahead uplink packets send nothing"
    );

    // The stream catches up (frames 3-19 and the end), the uplink brings
    // frame 10 again: bob gets 10-19 once each, nothing twice.
    for (i, data) in frames.iter().enumerate().skip(3) {
        up.write_all(&on_stream(i, data)).await.unwrap();
        if i == 9 {
            let late = alice_media.uplink_packet(upload, 10, &frames[10]);
            alice_media.send(&late).await;
        }
    }
    let end = ClipMessage::End {
        frame_count: frames.len() as u32,
        seq: 0,
        waveform: Bytes::new(),
    };
    up.write_all(&end.to_bytes()).await.unwrap();
    up.finish().unwrap();
    let rest = bob_media.frames(10).await;
    let indices: Vec<u32> = rest.iter().map(|f| f.1).collect();
    assert_eq!(indices, (10..20).collect::<Vec<_>>());
    for f in &rest {
        assert_eq!(f.2, frames[f.1 as usize], "frame {}", f.1);
    }
    assert!(
        bob_media.quiet(Duration::from_millis(300)).await,
        "no frame twice"
    );

    // The stored clip is the stream's, byte for byte (frame 8 included).
    let (_, messages) = next_stream(&bob).await;
    assert!(matches!(
        messages.last(),
        Some(ClipMessage::End {
            frame_count: 20,
            ..
        })
    ));
    let fetch = ControlMessage::FetchClip {
        request_id: 9,
        group: "team".into(),
        seq: 1,
    };
    bob_send.write_all(&fetch.to_bytes()).await.unwrap();
    let (_, fetched) = next_stream(&bob).await;
    let fetched: Vec<Bytes> = fetched
        .into_iter()
        .filter_map(|m| match m {
            ClipMessage::Frame { data, .. } => Some(data),
            _ => None,
        })
        .collect();
    assert_eq!(fetched, frames, "the stored clip is the upload stream's");
    relay.handle.shutdown().await;
}

#[tokio::test]
async fn uplink_frames_count_once_against_the_users_frame_limit() {
    // A budget of 10 frames (and 1 a second after): 3 by the stream and 7
    // by the uplink spend it; the stream copies of those 7 cost nothing,
    // so the clip of 10 frames is stored, and an 11th uplink frame over
    // the budget is dropped.
    let relay = TestRelay::start_with(|c| {
        c.user_frames_per_second = 1;
        c.user_frames_burst = 10;
    })
    .await;
    relay
        .group("team", GroupMode::Notes, &["alice", "bob"])
        .await;
    let (bob, mut bob_send, mut bob_control) = Raw::member(&relay, "bob", "team").await;
    let mut bob_media = MediaClient::open(&bob, &mut bob_send, &mut bob_control).await;
    bob_media.bind().await;
    let (alice, mut alice_send, mut alice_control) = Raw::hello(&relay, "alice").await;
    let mut alice_media = MediaClient::open(&alice, &mut alice_send, &mut alice_control).await;
    alice_media.bind().await;

    let frames = common::frames(4, 11);
    let mut up = alice.conn.open_uni().await.unwrap();
    let upload = u64::from(up.id());
    up.write_all(&ClipMessage::Header(header("team")).to_bytes())
        .await
        .unwrap();
    let on_stream = |i: usize| {
        ClipMessage::Frame {
            index: i as u32,
            data: frames[i].clone(),
        }
        .to_bytes()
    };
    for i in 0..3 {
        up.write_all(&on_stream(i)).await.unwrap();
    }
    assert_eq!(bob_media.frames(3).await.len(), 3);
    for i in 3..11u32 {
        let packet = alice_media.uplink_packet(upload, i, &frames[i as usize]);
        alice_media.send(&packet).await;
    }
    let by_uplink: Vec<u32> = bob_media.frames(7).await.iter().map(|f| f.1).collect();
    assert_eq!(by_uplink, (3..10).collect::<Vec<_>>());
    assert!(
        bob_media.quiet(Duration::from_millis(300)).await,
        "the frame over the budget is dropped"
    );
    for i in 3..10 {
        up.write_all(&on_stream(i)).await.unwrap();
    }
    let end = ClipMessage::End {
        frame_count: 10,
        seq: 0,
        waveform: Bytes::new(),
    };
    up.write_all(&end.to_bytes()).await.unwrap();
    up.finish().unwrap();
    let (_, messages) = next_stream(&bob).await;
    assert!(
        matches!(
            messages.last(),
            Some(ClipMessage::End {
                frame_count: 10,
                seq: 1,
                ..
            })
        ),
        "stored, not refused: {messages:?}"
    );
    relay.handle.shutdown().await;
}

/// Issue #15 item 3 on the media path (PROTOCOL.md §14.3, Frames): a
/// client that announced FRAMES gets a notes group's live frames three to a
/// packet (the default 60 ms budget, 20 ms frames), in order, each once,
/// the first packets carrying the header, the last ones before the
/// stream's ClipEnd. In a walkie group each frame comes alone.
#[tokio::test]
async fn frames_clients_get_a_notes_groups_frames_three_to_a_packet_and_walkie_ones_alone() {
    let relay = TestRelay::start().await;
    relay
        .group("team", GroupMode::Notes, &["alice", "bob"])
        .await;
    relay
        .group("radio", GroupMode::Walkie, &["alice", "bob"])
        .await;
    let (bob, mut bob_send, mut bob_control) = Raw::member(&relay, "bob", "team").await;
    let (mut media, features) =
        MediaClient::open_with(&bob, &mut bob_send, &mut bob_control, FEATURE_FRAMES | 0x80).await;
    assert_eq!(
        features, FEATURE_FRAMES,
        "the known feature offered back, no other"
    );
    media.bind().await;
    let (alice, _alice_send, _alice_control) = Raw::hello(&relay, "alice").await;

    let frames = common::frames(7, 30);
    // The pause before frame 0 lets bob's delivery start first: every
    // frame is live for him (a backlog would come packed as many as fit).
    let talking = talk(&alice, "team", &frames, 0);
    let (_, (stream, messages), packets) =
        tokio::join!(talking, next_stream(&bob), media.packets(30));
    let Some(ClipMessage::Header(h)) = messages.first() else {
        panic!("a header first: {messages:?}");
    };
    assert!(matches!(
        messages[..],
        [
            _,
            ClipMessage::End {
                frame_count: 30,
                ..
            }
        ]
    ));
    let mut got = Vec::new();
    for (i, (kind, s, header, packet)) in packets.iter().enumerate() {
        assert_eq!(*s, stream);
        assert!(packet.len() <= 3, "packet {i}: {} frames", packet.len());
        if packet.len() > 1 {
            assert_eq!(*kind, PacketType::Frames);
        }
        if i < HEADED_FRAMES as usize {
            assert_eq!(header.as_ref(), Some(h), "packet {i} names its clip");
        }
        got.extend(packet.iter().cloned());
    }
    let expected: Vec<(u32, Bytes)> = (0..).zip(frames.iter().cloned()).collect();
    assert_eq!(got, expected, "every frame once, in order");
    let full = packets.iter().filter(|p| p.3.len() == 3).count();
    assert!(
        full >= 8,
        "most packets carry three frames: {full} of {}",
        packets.len()
    );
    assert!(
        packets.len() <= 12,
        "{} packets for 30 frames",
        packets.len()
    );

    // The talker pauses after frame 3 (held alone): it goes when its
    // budget is spent, not with frame 4 after the pause.
    let talking = talk_paused(&alice, "team", &frames[..7], &[0, 4]);
    let (_, _, packets) = tokio::join!(talking, next_stream(&bob), media.packets(7));
    let indexes: Vec<Vec<u32>> = packets
        .iter()
        .map(|p| p.3.iter().map(|(i, _)| *i).collect())
        .collect();
    assert_eq!(indexes, [vec![0, 1, 2], vec![3], vec![4, 5, 6]]);

    // A walkie group: each frame alone, at once.
    bob_send
        .write_all(
            &ControlMessage::Join {
                request_id: 5,
                group: "radio".into(),
            }
            .to_bytes(),
        )
        .await
        .unwrap();
    bob_control
        .until(|m| matches!(m, ControlMessage::CaughtUp { .. }).then_some(()))
        .await;
    let talking = talk(&alice, "radio", &frames[..8], 0);
    let (_, _, packets) = tokio::join!(talking, next_stream(&bob), media.packets(8));
    assert!(
        packets
            .iter()
            .all(|p| p.3.len() == 1 && p.0 != PacketType::Frames),
        "one frame a packet in a walkie group"
    );
    relay.handle.shutdown().await;
}
