//! `quinn-floor`, the minimal fan-out the relay's live path is measured
//! against (issue #15), run as a real process: each of its live planes
//! (frames in the streams, or in QUIC datagrams, each frame alone or three
//! at a time) brings a clip to every other member whole, in order and
//! byte for byte, through the client library, as `client-sim` relies on
//! when it drives the floor.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use ptt_client::{Client, ClientConfig, ClipParams, Event, Events, Trust, parse_fingerprint};
use ptt_relay::auth::TokenIssuer;
use ptt_relay::tls::Identity;

/// The floor's process, killed when dropped.
struct Floor {
    child: Child,
    addr: SocketAddr,
    fingerprint: [u8; 32],
    issuer: TokenIssuer,
    _dir: tempfile::TempDir,
}

impl Drop for Floor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(args: &[&str]) -> Floor {
    let dir = tempfile::tempdir().unwrap();
    // The floor loads what exists: the test knows its keys.
    let identity = Identity::load_or_create_dev(dir.path()).unwrap();
    let issuer = TokenIssuer::load_or_create(&dir.path().join("token.key")).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_quinn-floor"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .args(["--worker-threads", "1"])
        .args(args)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = loop {
        let line = lines
            .next()
            .expect("quinn-floor printed its address")
            .unwrap();
        if let Some(rest) = line.strip_prefix("relay listening on ") {
            break rest.split(' ').next().unwrap().parse().unwrap();
        }
    };
    // Keep draining its stderr so that it never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    Floor {
        child,
        addr,
        fingerprint: parse_fingerprint(&identity.fingerprint()).unwrap(),
        issuer,
        _dir: dir,
    }
}

async fn connect(floor: &Floor, user: &str) -> (Client, Events) {
    let token = floor
        .issuer
        .issue(user, Duration::from_secs(600), false, false);
    let config = ClientConfig::new(
        floor.addr,
        "localhost",
        Trust::Fingerprint(floor.fingerprint),
        token,
    )
    // The floor has no UDP media path.
    .with_media(false);
    Client::connect(config).await.unwrap()
}

/// The frames of one clip as a member received them, and its flags.
async fn receive(events: &mut Events, frames: usize) -> (u8, Vec<Bytes>) {
    let mut flags = None;
    let mut got = Vec::new();
    loop {
        let event = tokio::time::timeout(Duration::from_secs(10), events.next())
            .await
            .expect("the clip arrives")
            .expect("the client is open");
        match event {
            Event::ClipStarted { header, .. } => flags = Some(header.flags),
            Event::Frame { index, data, .. } => {
                assert_eq!(index as usize, got.len(), "frames in order");
                got.push(data);
            }
            Event::ClipEnded { frame_count, .. } => {
                assert_eq!(frame_count as usize, frames);
                return (flags.expect("started before it ended"), got);
            }
            Event::ClipIncomplete { .. } | Event::ClipAborted { .. } => {
                panic!("the clip did not arrive whole: {event:?}")
            }
            _ => {}
        }
    }
}

async fn a_clip_reaches_every_other_member(args: &[&str], media_flag: bool) {
    let floor = start(args);
    let (alice, _alice_events) = connect(&floor, "alice").await;
    let mut listeners = Vec::new();
    for user in ["bob", "carol"] {
        let (client, events) = connect(&floor, user).await;
        client.join("ops").await.unwrap();
        listeners.push((client, events));
    }
    alice.join("ops").await.unwrap();
    let frames: Vec<Bytes> = (0..10u8)
        .map(|i| Bytes::from(vec![i; 40 + usize::from(i)]))
        .collect();
    let mut talk = alice.talk("ops", ClipParams::default()).await.unwrap();
    for frame in &frames {
        talk.send_frame(frame.clone()).await.unwrap();
    }
    talk.finish(Bytes::new()).await.unwrap();
    for (_, events) in &mut listeners {
        let (flags, got) = receive(events, frames.len()).await;
        assert_eq!(
            flags & ptt_protocol::ClipHeader::FLAG_MEDIA != 0,
            media_flag
        );
        assert_eq!(got, frames);
    }
}

#[tokio::test]
async fn frames_in_the_streams() {
    a_clip_reaches_every_other_member(&[], false).await;
}

#[tokio::test]
async fn frames_in_the_streams_three_at_a_time() {
    a_clip_reaches_every_other_member(&["--coalesce", "3"], false).await;
}

#[tokio::test]
async fn frames_in_quic_datagrams() {
    a_clip_reaches_every_other_member(&["--live", "datagram"], true).await;
}

#[tokio::test]
async fn frames_in_quic_datagrams_three_at_a_time() {
    a_clip_reaches_every_other_member(&["--live", "datagram", "--coalesce", "3"], true).await;
}
