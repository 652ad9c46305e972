//! The client on the UDP media path (PROTOCOL.md §14) against the real
//! relay in-process, over real QUIC and UDP on loopback: a live clip's
//! frames arrive by UDP byte-identical; with every third media datagram
//! lost, the client reports the clip incomplete, fetches it whole, and
//! acknowledges it only then. With the talker's QUIC path held back (a
//! gated UDP proxy), its frames still reach the member by the uplink; with
//! the member's QUIC path held back, the clip starts and plays from the
//! `HeadedFrame`s before its stream's header arrives. Clients sharing
//! one `MediaSocket` each get their own frames.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use ptt_client::{
    Client, ClientConfig, ClipHeader, ClipParams, Event, Events, GroupMode, MediaLink, ReceiptKind,
    ReconnectPolicy, Trust,
};
use ptt_relay::{RelayConfig, RelayHandle};

const WAIT: Duration = Duration::from_secs(10);

/// Loses every third datagram the client receives on its media socket.
#[derive(Debug, Default)]
struct DropEveryThird {
    received: AtomicU64,
}

impl MediaLink for DropEveryThird {
    fn pass(&self, outgoing: bool) -> Option<Duration> {
        if outgoing {
            return Some(Duration::ZERO);
        }
        let n = self.received.fetch_add(1, Ordering::Relaxed);
        (n % 3 != 2).then_some(Duration::ZERO)
    }
}

/// Delays every datagram the client receives on its media socket.
#[derive(Debug)]
struct DelayReceived(Duration);

impl MediaLink for DelayReceived {
    fn pass(&self, outgoing: bool) -> Option<Duration> {
        Some(if outgoing { Duration::ZERO } else { self.0 })
    }
}

/// A UDP proxy in front of the relay's QUIC port whose two directions can
/// be held: datagrams wait (in order) until released. The media path goes
/// around it (to the relay's media port directly).
struct GatedProxy {
    addr: SocketAddr,
    /// Holds client → relay datagrams.
    hold_up: Arc<AtomicBool>,
    /// Holds relay → client datagrams.
    hold_down: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for GatedProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl GatedProxy {
    async fn start(relay: SocketAddr) -> GatedProxy {
        let front = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let back = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = front.local_addr().unwrap();
        let hold_up = Arc::new(AtomicBool::new(false));
        let hold_down = Arc::new(AtomicBool::new(false));
        let (up, down) = (hold_up.clone(), hold_down.clone());
        let task = tokio::spawn(async move {
            let mut client = None;
            let (mut to_relay, mut to_client) = (VecDeque::new(), VecDeque::new());
            let (mut a, mut b) = (vec![0u8; 2048], vec![0u8; 2048]);
            loop {
                tokio::select! {
                    Ok((n, from)) = front.recv_from(&mut a) => {
                        client = Some(from);
                        to_relay.push_back(a[..n].to_vec());
                    }
                    Ok((n, _)) = back.recv_from(&mut b) => to_client.push_back(b[..n].to_vec()),
                    () = tokio::time::sleep(Duration::from_millis(2)) => {}
                }
                if !up.load(Ordering::Acquire) {
                    for d in to_relay.drain(..) {
                        let _ = back.send_to(&d, relay).await;
                    }
                }
                if let (false, Some(client)) = (down.load(Ordering::Acquire), client) {
                    for d in to_client.drain(..) {
                        let _ = front.send_to(&d, client).await;
                    }
                }
            }
        });
        GatedProxy {
            addr,
            hold_up,
            hold_down,
            task,
        }
    }
}

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
    }

    /// A team of alice (talking, media off) and bob (`bob`'s config),
    /// both joined, bob's media path bound.
    async fn team(&self, bob: ClientConfig) -> (Client, Events, Client, Events) {
        self.team_with(self.config("alice", false).with_media(false), bob)
            .await
    }

    /// A team of alice and bob with their configs, both joined, the media
    /// paths of those that have one bound.
    async fn team_with(
        &self,
        alice: ClientConfig,
        bob: ClientConfig,
    ) -> (Client, Events, Client, Events) {
        let (admin, _events) = Client::connect(self.config("root", true)).await.unwrap();
        admin.create_group("team", GroupMode::Notes).await.unwrap();
        for m in ["alice", "bob"] {
            admin.add_member("team", m).await.unwrap();
        }
        admin.close().await;
        let alice_media = alice.media;
        let (alice, alice_events) = Client::connect(alice).await.unwrap();
        alice.join("team").await.unwrap();
        let (bob, bob_events) = Client::connect(bob).await.unwrap();
        bob.join("team").await.unwrap();
        tokio::time::timeout(WAIT, async {
            while bob.stats().media_binds_acked == 0
                || (alice_media && alice.stats().media_binds_acked == 0)
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the media paths bind");
        (alice, alice_events, bob, bob_events)
    }
}

fn frames(n: usize) -> Vec<Bytes> {
    (0..n)
        .map(|i| Bytes::from(vec![0xf8, i as u8, 0xaa, 0x55, (i * 7) as u8]))
        .collect()
}

/// Talks a clip of `frames`, paced so they are live: 5 ms apart.
async fn talk(alice: &Client, frames: &[Bytes]) -> u64 {
    let mut talk = alice.talk("team", ClipParams::default()).await.unwrap();
    for f in frames {
        talk.send_frame(f.clone()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    talk.finish(Vec::new()).await.unwrap().seq
}

/// Bob's events until `done` says stop, with a deadline.
async fn collect(events: &mut Events, mut done: impl FnMut(&Event) -> bool) -> Vec<Event> {
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, async {
        loop {
            let event = events.next().await.expect("events ended");
            let stop = done(&event);
            out.push(event);
            if stop {
                return;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out; events so far: {out:#?}"));
    out
}

#[tokio::test]
async fn live_frames_arrive_by_udp_byte_identical() {
    let h = Harness::start().await;
    let (alice, _alice_events, bob, mut bob_events) = h.team(h.config("bob", false)).await;
    let sent = frames(30);
    let seq = talk(&alice, &sent).await;
    let events = collect(&mut bob_events, |e| matches!(e, Event::ClipEnded { .. })).await;
    let Some(Event::ClipStarted { header, .. }) = events
        .iter()
        .find(|e| matches!(e, Event::ClipStarted { .. }))
    else {
        panic!("no start: {events:#?}");
    };
    assert_ne!(header.flags & ClipHeader::FLAG_MEDIA, 0, "a MEDIA delivery");
    let got: Vec<(u32, Bytes)> = events
        .iter()
        .filter_map(|e| match e {
            Event::Frame { index, data, .. } => Some((*index, data.clone())),
            _ => None,
        })
        .collect();
    let want: Vec<(u32, Bytes)> = sent
        .iter()
        .cloned()
        .enumerate()
        .map(|(i, f)| (i as u32, f))
        .collect();
    assert_eq!(got, want, "every frame once, byte-identical");
    assert!(
        matches!(events.last(), Some(Event::ClipEnded { seq: s, frame_count: 30, .. }) if *s == seq)
    );
    let stats = bob.stats();
    assert_eq!(stats.media_frames_received, 30, "{stats:?}");
    assert_eq!(stats.media_clips_fetched, 0);
    h.relay.shutdown().await;
}

#[tokio::test]
async fn with_every_third_datagram_lost_the_clip_is_fetched_whole_then_acknowledged() {
    every_third_datagram_lost(false).await;
}

/// The same on a shared `MediaSocket`: its reader applies bob's link.
#[tokio::test]
async fn on_a_shared_socket_the_clients_link_still_loses_every_third_datagram() {
    every_third_datagram_lost(true).await;
}

async fn every_third_datagram_lost(shared: bool) {
    let h = Harness::start().await;
    let mut config = h.config("bob", false);
    config.media_link = Some(Arc::new(DropEveryThird::default()));
    if shared {
        let socket = ptt_client::MediaSocket::bind("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        config.media_socket = Some(socket);
    }
    let (alice, mut alice_events, bob, mut bob_events) = h.team(config).await;
    let sent = frames(30);
    let seq = talk(&alice, &sent).await;

    // The live copy: the frames that got through, then ClipIncomplete; then
    // the fetched copy, whole, and its end.
    let mut ends = 0;
    let events = collect(&mut bob_events, |e| {
        ends += matches!(e, Event::ClipEnded { .. } | Event::ClipIncomplete { .. }) as u32;
        ends == 2
    })
    .await;
    let incomplete = events
        .iter()
        .position(|e| matches!(e, Event::ClipIncomplete { .. }));
    let Some(at) = incomplete else {
        panic!("the live copy is incomplete: {events:#?}");
    };
    let Event::ClipIncomplete {
        seq: s,
        frame_count,
        missing,
        ..
    } = &events[at]
    else {
        unreachable!()
    };
    assert_eq!((*s, *frame_count), (seq, 30));
    let live: Vec<u32> = events[..at]
        .iter()
        .filter_map(|e| match e {
            Event::Frame { index, .. } => Some(*index),
            _ => None,
        })
        .collect();
    assert!(
        *missing > 0 && live.len() as u32 + missing == 30,
        "{live:?}, {missing} missing"
    );
    let fetched: Vec<Bytes> = events[at..]
        .iter()
        .filter_map(|e| match e {
            Event::Frame { data, .. } => Some(data.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(fetched, sent, "the fetched copy has every frame");
    assert!(
        events[at..]
            .iter()
            .any(|e| matches!(e, Event::ClipStarted { history: true, .. })),
        "the fetched copy comes from the store"
    );
    assert!(matches!(events.last(), Some(Event::ClipEnded { seq: s, .. }) if *s == seq));

    // Acknowledged after the fetch: alice gets bob's delivery receipt.
    tokio::time::timeout(WAIT, async {
        loop {
            match alice_events.next().await.expect("events") {
                Event::Receipt {
                    seq: s,
                    user,
                    kind: ReceiptKind::Delivered,
                    ..
                } if s == seq && user == "bob" => return,
                _ => {}
            }
        }
    })
    .await
    .expect("bob acknowledged the clip");
    let stats = bob.stats();
    assert_eq!(stats.media_clips_fetched, 1, "{stats:?}");
    assert_eq!(stats.clips_received, 1, "{stats:?}");
    h.relay.shutdown().await;
}

#[tokio::test]
async fn after_a_reconnect_the_client_binds_a_new_path() {
    let h = Harness::start().await;
    let policy = ReconnectPolicy {
        initial_delay: Duration::from_millis(50),
        max_delay: Duration::from_millis(200),
        ..ReconnectPolicy::default()
    };
    let config = h.config("bob", false).with_reconnect(policy);
    let (alice, _alice_events, bob, mut bob_events) = h.team(config).await;
    bob.connection()
        .unwrap()
        .close(0u32.into(), b"network switch");
    collect(&mut bob_events, |e| matches!(e, Event::Reconnected { .. })).await;
    tokio::time::timeout(WAIT, async {
        while bob.stats().media_binds_acked < 2 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("a Bind on the new connection's path");
    let sent = frames(10);
    talk(&alice, &sent).await;
    let events = collect(&mut bob_events, |e| matches!(e, Event::ClipEnded { .. })).await;
    let got: Vec<Bytes> = events
        .iter()
        .filter_map(|e| match e {
            Event::Frame { data, .. } => Some(data.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(got, sent);
    assert_eq!(
        bob.stats().media_frames_received,
        10,
        "by UDP on the new path"
    );
    h.relay.shutdown().await;
}

/// The indices and bytes of the frame events in `events`.
fn frame_events(events: &[Event]) -> Vec<(u32, Bytes)> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Frame { index, data, .. } => Some((*index, data.clone())),
            _ => None,
        })
        .collect()
}

fn indexed(frames: &[Bytes], range: std::ops::Range<usize>) -> Vec<(u32, Bytes)> {
    range.map(|i| (i as u32, frames[i].clone())).collect()
}

#[tokio::test]
async fn with_the_talkers_quic_path_held_its_frames_arrive_by_the_uplink() {
    let h = Harness::start().await;
    let proxy = GatedProxy::start(h.relay.addr()).await;
    let mut alice = h.config("alice", false);
    alice.addr = proxy.addr;
    let (alice, _alice_events, _bob, mut bob_events) =
        h.team_with(alice, h.config("bob", false)).await;
    let sent = frames(20);
    let mut talk = alice.talk("team", ClipParams::default()).await.unwrap();
    for f in &sent[..3] {
        talk.send_frame(f.clone()).await.unwrap();
    }
    let mut seen = 0;
    let mut events = collect(&mut bob_events, |e| {
        seen += matches!(e, Event::Frame { .. }) as u32;
        seen == 3
    })
    .await;

    // Alice's QUIC datagrams are held: frames 3-9 can only come by UDP.
    proxy.hold_up.store(true, Ordering::Release);
    for f in &sent[3..10] {
        talk.send_frame(f.clone()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut seen = 0;
    events.extend(
        collect(&mut bob_events, |e| {
            seen += matches!(e, Event::Frame { .. }) as u32;
            seen == 7
        })
        .await,
    );
    assert_eq!(frame_events(&events), indexed(&sent, 0..10));
    assert!(proxy.hold_up.load(Ordering::Acquire), "still held");

    // Released: the stream brings the clip whole, no frame comes twice,
    // nothing is missing, the stored copy is complete.
    proxy.hold_up.store(false, Ordering::Release);
    for f in &sent[10..] {
        talk.send_frame(f.clone()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let seq = talk.finish(Vec::new()).await.unwrap().seq;
    events.extend(collect(&mut bob_events, |e| matches!(e, Event::ClipEnded { .. })).await);
    assert_eq!(frame_events(&events), indexed(&sent, 0..20));
    assert!(
        matches!(events.last(), Some(Event::ClipEnded { seq: s, frame_count: 20, .. }) if *s == seq)
    );
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, Event::ClipIncomplete { .. }))
    );
    assert_eq!(alice.stats().media_frames_uplinked, 20);
    h.relay.shutdown().await;
}

#[tokio::test]
async fn with_the_members_quic_path_held_the_clip_starts_from_headed_frames() {
    let h = Harness::start().await;
    let proxy = GatedProxy::start(h.relay.addr()).await;
    let mut bob = h.config("bob", false);
    bob.addr = proxy.addr;
    let (alice, _alice_events, bob, mut bob_events) = h.team(bob).await;
    // Bob's QUIC datagrams are held: the clip's header cannot come.
    proxy.hold_down.store(true, Ordering::Release);
    let sent = frames(20);
    let mut talk = alice.talk("team", ClipParams::default()).await.unwrap();
    for f in &sent[..10] {
        talk.send_frame(f.clone()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut seen = 0;
    let mut events = collect(&mut bob_events, |e| {
        seen += matches!(e, Event::Frame { .. }) as u32;
        seen == 10
    })
    .await;
    let clip_events: Vec<&Event> = events
        .iter()
        .filter(|e| !matches!(e, Event::CaughtUp { .. }))
        .collect();
    let Some(Event::ClipStarted {
        header, history, ..
    }) = clip_events.first()
    else {
        panic!("the clip starts first: {events:#?}");
    };
    assert_eq!(
        (
            header.flags & ClipHeader::FLAG_MEDIA,
            *history,
            header.clip_id
        ),
        (ClipHeader::FLAG_MEDIA, false, talk.clip_id())
    );
    assert_eq!(frame_events(&events), indexed(&sent, 0..10));
    assert_eq!(bob.stats().media_clips_announced, 1);
    assert!(proxy.hold_down.load(Ordering::Acquire), "still held");

    // Released: the header and end come on the stream, the clip is not
    // started twice, every frame comes once, the clip ends complete.
    proxy.hold_down.store(false, Ordering::Release);
    for f in &sent[10..] {
        talk.send_frame(f.clone()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let seq = talk.finish(Vec::new()).await.unwrap().seq;
    events.extend(collect(&mut bob_events, |e| matches!(e, Event::ClipEnded { .. })).await);
    let starts = events
        .iter()
        .filter(|e| matches!(e, Event::ClipStarted { .. }))
        .count();
    assert_eq!(starts, 1, "{events:#?}");
    assert_eq!(frame_events(&events), indexed(&sent, 0..20));
    assert!(
        matches!(events.last(), Some(Event::ClipEnded { seq: s, frame_count: 20, .. }) if *s == seq)
    );
    assert_eq!(bob.stats().media_clips_fetched, 0);
    h.relay.shutdown().await;
}

#[tokio::test]
async fn clients_sharing_one_media_socket_each_get_their_own_frames() {
    let h = Harness::start().await;
    let socket = ptt_client::MediaSocket::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let shared = |user: &str| {
        let mut c = h.config(user, false);
        c.media_socket = Some(socket.clone());
        c
    };
    let (admin, _events) = Client::connect(h.config("root", true)).await.unwrap();
    admin.create_group("team", GroupMode::Notes).await.unwrap();
    for m in ["alice", "bob", "carol"] {
        admin.add_member("team", m).await.unwrap();
    }
    admin.close().await;
    let mut members = Vec::new();
    for user in ["alice", "bob", "carol"] {
        let (client, events) = Client::connect(shared(user)).await.unwrap();
        client.join("team").await.unwrap();
        members.push((client, events));
    }
    tokio::time::timeout(WAIT, async {
        while members
            .iter()
            .any(|(c, _)| c.stats().media_binds_acked == 0)
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the three paths bind through one socket");
    assert_eq!(socket.paths(), 3);

    // Alice talks (her uplink leaves from the shared socket too); bob and
    // carol each get every frame once, by UDP, from the one reader.
    let sent = frames(30);
    let want = indexed(&sent, 0..30);
    let seq = talk(&members[0].0, &sent).await;
    for (client, events) in &mut members[1..] {
        let got = collect(events, |e| matches!(e, Event::ClipEnded { .. })).await;
        assert_eq!(frame_events(&got), want, "every frame once, byte-identical");
        assert!(
            matches!(got.last(), Some(Event::ClipEnded { seq: s, frame_count: 30, .. }) if *s == seq)
        );
        let stats = client.stats();
        assert_eq!(stats.media_frames_received, 30, "{stats:?}");
        assert_eq!(stats.media_clips_fetched, 0, "{stats:?}");
    }
    assert!(members[0].0.stats().media_frames_uplinked > 0);

    // A closed client's path leaves the socket; the others stay.
    let (alice, _) = members.remove(0);
    alice.close().await;
    tokio::time::timeout(WAIT, async {
        while socket.paths() != 2 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("alice's path leaves the socket");
    for (client, _) in members {
        client.close().await;
    }
    h.relay.shutdown().await;
}

#[tokio::test]
async fn on_a_shared_socket_a_delayed_clients_frames_come_late_and_in_order() {
    const DELAY: Duration = Duration::from_millis(60);
    let h = Harness::start().await;
    let socket = ptt_client::MediaSocket::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let mut bob = h.config("bob", false);
    bob.media_link = Some(Arc::new(DelayReceived(DELAY)));
    bob.media_socket = Some(socket.clone());
    let mut alice = h.config("alice", false);
    alice.media_socket = Some(socket.clone());
    let (alice, _alice_events, bob, mut bob_events) = h.team_with(alice, bob).await;
    let sent = frames(30);
    let started = std::time::Instant::now();
    talk(&alice, &sent).await;
    let events = collect(&mut bob_events, |e| matches!(e, Event::ClipEnded { .. })).await;
    assert_eq!(
        frame_events(&events),
        indexed(&sent, 0..30),
        "every frame once, in order"
    );
    let first = events.iter().find_map(|e| match e {
        Event::Frame { received_at, .. } => Some(*received_at),
        _ => None,
    });
    assert!(
        first.expect("frames") >= started + DELAY,
        "the first frame waited for the link's delay"
    );
    let stats = bob.stats();
    assert_eq!(stats.media_frames_received, 30, "{stats:?}");
    assert_eq!(stats.media_clips_fetched, 0, "{stats:?}");
    h.relay.shutdown().await;
}

/// Keeps every event it is given.
#[derive(Debug, Default)]
struct Keep(std::sync::Mutex<Vec<Event>>);

impl ptt_client::EventSink for Keep {
    fn event(&self, event: Event) {
        self.0.lock().unwrap().push(event);
    }
}

impl Keep {
    /// The events so far once one says the clip ended, with a deadline.
    async fn until_ended(&self) -> Vec<Event> {
        tokio::time::timeout(WAIT, async {
            loop {
                {
                    let events = self.0.lock().unwrap();
                    if events.iter().any(|e| matches!(e, Event::ClipEnded { .. })) {
                        return events.clone();
                    }
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("timed out; events so far: {:#?}", self.0.lock().unwrap()))
    }
}

#[tokio::test]
async fn an_event_sink_takes_the_events_of_both_live_planes_in_order() {
    // Bob on the media path (a shared socket, whose reader calls his sink),
    // carol on streams: each sink gets the clip's start, every frame once
    // in order, and its end, and neither `Events` channel gets anything.
    let h = Harness::start().await;
    let socket = ptt_client::MediaSocket::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let (admin, _events) = Client::connect(h.config("root", true)).await.unwrap();
    admin.create_group("team", GroupMode::Notes).await.unwrap();
    for m in ["alice", "bob", "carol"] {
        admin.add_member("team", m).await.unwrap();
    }
    admin.close().await;
    let (alice, _alice_events) = Client::connect(h.config("alice", false).with_media(false))
        .await
        .unwrap();
    alice.join("team").await.unwrap();
    let mut members = Vec::new();
    for (user, media) in [("bob", true), ("carol", false)] {
        let sink = Arc::new(Keep::default());
        let mut config = h.config(user, false).with_media(media);
        config.media_socket = Some(socket.clone());
        config.event_sink = Some(sink.clone());
        let (client, mut events) = Client::connect(config).await.unwrap();
        assert!(events.next().await.is_none(), "the channel ends at once");
        client.join("team").await.unwrap();
        members.push((client, sink, media));
    }
    tokio::time::timeout(WAIT, async {
        while members[0].0.stats().media_binds_acked == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("bob's path binds");
    let sent = frames(30);
    let seq = talk(&alice, &sent).await;
    for (client, sink, media) in &members {
        let got = sink.until_ended().await;
        let Some(Event::ClipStarted { header, .. }) =
            got.iter().find(|e| matches!(e, Event::ClipStarted { .. }))
        else {
            panic!("no start: {got:#?}");
        };
        assert_eq!(header.flags & ClipHeader::FLAG_MEDIA != 0, *media);
        assert_eq!(
            frame_events(&got),
            indexed(&sent, 0..30),
            "every frame once, in order"
        );
        assert!(
            matches!(got.last(), Some(Event::ClipEnded { seq: s, frame_count: 30, .. }) if *s == seq),
            "{got:#?}"
        );
        let stats = client.stats();
        assert_eq!(
            stats.media_frames_received,
            if *media { 30 } else { 0 },
            "{stats:?}"
        );
    }
    for (client, _, _) in members {
        client.close().await;
    }
    alice.close().await;
    h.relay.shutdown().await;
}
