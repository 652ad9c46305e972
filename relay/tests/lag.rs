//! A member that stops reading a live clip is cut within about
//! `live_lag_frames` of the talker, whatever flow-control window it chose,
//! and then gets the clip whole from the store; a member that keeps reading
//! is never cut (issue #9, bug 3).
//!
//! Members here are bare QUIC connections speaking the protocol by hand, so
//! each can pick its stream window, stop reading one stream while its QUIC
//! stack carries on, and send (or not) `LiveRead` reports: a datagram
//! `3b len stream frames` after the header and every 50 frames read.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use common::*;
use ptt_client::{ClipParams, ErrorCode, GroupMode};
use ptt_protocol::coding::put_varint;
use ptt_protocol::message::MAX_PAYLOAD_LEN;
use ptt_protocol::message::kind::LIVE_READ;
use ptt_protocol::{ClipHeader, ClipMessage, ControlMessage, FrameDecoder, PROTOCOL_VERSION};

/// The relay's lag limit in these tests: 1 s of 20 ms frames.
const LAG: usize = 50;
/// Frames a reporting member reads between reports (500 ms), which the
/// relay allows on top of `LAG`.
const REPORT_EVERY: usize = 50;
/// The talker speaks 6 s.
const CLIP_FRAMES: usize = 300;
/// Members that stall do so after reading 1 s, for 4 s.
const STALL_AT: usize = 50;
const STALL: Duration = Duration::from_secs(4);
/// Scheduling slack when comparing the talker's progress with the moment a
/// member sees its stream reset: 300 ms.
const SLACK: usize = 15;

/// What a member does with its live stream.
#[derive(Debug, Clone, Copy)]
struct Behaviour {
    /// Its per-stream receive window, bytes.
    window: u32,
    /// Whether it sends `LiveRead` reports.
    reports: bool,
    /// Whether it stops reading at `STALL_AT` for `STALL`.
    stalls: bool,
}

/// How a member's live stream ended, and what came after.
#[derive(Debug)]
enum Outcome {
    /// ClipEnd and FIN on the live stream; nothing else arrived after.
    Complete { frames: Vec<Bytes>, seq: u64 },
    /// Reset while the talker was `lag` frames ahead of what the member had
    /// read; then the history copy arrived.
    Cut {
        code: u64,
        lag: usize,
        history: (ClipHeader, Vec<Bytes>, u64),
    },
}

/// Notes members, frames held up to a 60 ms budget.
#[tokio::test]
async fn a_member_that_stops_reading_is_cut_whatever_its_window() {
    stops_reading(60).await;
}

/// Each frame at once: the members' streams are written by the talker's
/// task while they have room, and handed back to their delivery's task
/// (a write cut short included) once they do not.
#[tokio::test]
async fn a_member_that_stops_reading_is_cut_whatever_its_window_frame_by_frame() {
    stops_reading(0).await;
}

async fn stops_reading(budget_ms: u32) {
    let run = scenario(
        budget_ms,
        &[
            Behaviour {
                window: 64 * 1024,
                reports: true,
                stalls: true,
            },
            Behaviour {
                window: 4 * 1024,
                reports: true,
                stalls: true,
            },
            // The control: reads throughout, with the large window.
            Behaviour {
                window: 64 * 1024,
                reports: true,
                stalls: false,
            },
            // Reads throughout, through a window smaller than a frame
            // (`FRAME_WIRE_LEN`): every write takes part of a frame and waits
            // for the member's credit, and whoever wrote the first part (the
            // talker's task, frame by frame) leaves the rest to the delivery's
            // task.
            Behaviour {
                window: 40,
                reports: true,
                stalls: false,
            },
        ],
    )
    .await;
    // The limit: LAG, plus one report interval, plus the round trip (a
    // frame on loopback).
    let limit = LAG + REPORT_EVERY + 1;
    for (i, outcome) in run.outcomes.iter().take(2).enumerate() {
        let Outcome::Cut { code, lag, history } = outcome else {
            panic!("stalled member {i} was not cut: {outcome:?}");
        };
        assert_eq!(*code, u64::from(ErrorCode::SlowReceiver.code()));
        assert!(
            (limit..=limit + SLACK).contains(lag),
            "member {i} cut {lag} frames behind, expected about {limit}"
        );
        assert_recovered(history, &run);
    }
    for outcome in &run.outcomes[2..] {
        let Outcome::Complete { frames, seq } = outcome else {
            panic!("a reading member was cut: {outcome:?}");
        };
        assert_eq!(*frames, run.sent);
        assert_eq!(*seq, run.seq);
    }
}

#[tokio::test]
async fn a_member_that_does_not_report_is_cut_when_its_window_fills() {
    does_not_report(60).await;
}

/// As above, each frame at once (written by the talker's task until the
/// window fills).
#[tokio::test]
async fn a_member_that_does_not_report_is_cut_when_its_window_fills_frame_by_frame() {
    does_not_report(0).await;
}

async fn does_not_report(budget_ms: u32) {
    // Without reports the relay sees only its writes blocking: a 4 KiB
    // window (about 60 frames) fills, then the write waits `LAG` frames.
    let run = scenario(
        budget_ms,
        &[
            Behaviour {
                window: 4 * 1024,
                reports: false,
                stalls: true,
            },
            Behaviour {
                window: 64 * 1024,
                reports: false,
                stalls: false,
            },
        ],
    )
    .await;
    let Outcome::Cut { code, lag, history } = &run.outcomes[0] else {
        panic!("stalled member was not cut: {:?}", run.outcomes[0]);
    };
    assert_eq!(*code, u64::from(ErrorCode::SlowReceiver.code()));
    // The window counts from the last credit the member's stack sent,
    // which quinn raises in steps of an eighth of the window (8 frames).
    let window_frames = 4 * 1024 / FRAME_WIRE_LEN;
    assert!(
        (window_frames - 8 + LAG..=window_frames + LAG + SLACK).contains(lag),
        "cut {lag} frames behind, expected about {}",
        window_frames + LAG
    );
    assert_recovered(history, &run);
    assert!(matches!(run.outcomes[1], Outcome::Complete { .. }));
}

/// Issue #15 item 3: a notes group with a 100 ms live latency budget gets
/// the talker's 20 ms frames in bursts of about five (one write each), a
/// walkie group (whose budget is 0 whatever the relay's) each frame on its
/// own; `Joined` announces each budget.
#[tokio::test]
async fn notes_members_get_bursts_of_the_budget_walkie_members_each_frame() {
    const FRAMES: usize = 50;
    let relay = TestRelay::start_with(|c| c.live_budget_ms = 100).await;
    relay
        .group("notes", GroupMode::Notes, &["alice", "bob"])
        .await;
    relay
        .group("walkie", GroupMode::Walkie, &["alice", "carol"])
        .await;
    let (bob, notes_budget) = Member::join_group(&relay, "bob", "notes", 64 * 1024).await;
    let (carol, walkie_budget) = Member::join_group(&relay, "carol", "walkie", 64 * 1024).await;
    assert_eq!((notes_budget, walkie_budget), (100, 0));
    let bob = tokio::spawn(bob.arrivals());
    let carol = tokio::spawn(carol.arrivals());
    let (alice, _alice_events) = relay.member("alice", "notes").await;
    let mut notes = alice.talk("notes", ClipParams::default()).await.unwrap();
    let mut walkie = alice.talk("walkie", ClipParams::default()).await.unwrap();
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    let sent = frames(7, FRAMES);
    for frame in &sent {
        tick.tick().await;
        notes.send_frame(frame.clone()).await.unwrap();
        walkie.send_frame(frame.clone()).await.unwrap();
    }
    notes.finish(Bytes::new()).await.unwrap();
    walkie.finish(Bytes::new()).await.unwrap();
    let notes = tokio::time::timeout(WAIT, bob).await.unwrap().unwrap();
    let walkie = tokio::time::timeout(WAIT, carol).await.unwrap().unwrap();
    for got in [&notes, &walkie] {
        let data: Vec<&Bytes> = got.iter().map(|(data, _)| data).collect();
        assert_eq!(
            data,
            sent.iter().collect::<Vec<_>>(),
            "every frame, in order"
        );
    }
    let (notes, walkie) = (bursts(&notes), bursts(&walkie));
    // 50 frames in bursts of 5 are 10 bursts (one more where the timer and
    // the talker's ticks straddle, and the last at ClipEnd).
    assert!(
        (8..=14).contains(&notes.len()),
        "notes bursts {notes:?}, expected about {}",
        FRAMES / 5
    );
    // Each frame alone but where the loaded machine bunched the talker's
    // ticks.
    assert!(
        walkie.len() >= FRAMES * 7 / 10,
        "walkie bursts {walkie:?}, expected about {FRAMES} of one frame"
    );
}

/// The sizes of the bursts frames arrived in: a frame read within 8 ms of
/// the one before is in the same burst (the talker sends every 20 ms).
fn bursts(arrivals: &[(Bytes, std::time::Instant)]) -> Vec<usize> {
    let mut sizes: Vec<usize> = Vec::new();
    let mut last: Option<std::time::Instant> = None;
    for (_, at) in arrivals {
        match last {
            Some(prev) if at.duration_since(prev) < Duration::from_millis(8) => {
                *sizes.last_mut().expect("a burst is open") += 1;
            }
            _ => sizes.push(1),
        }
        last = Some(*at);
    }
    sizes
}

fn assert_recovered((header, frames, seq): &(ClipHeader, Vec<Bytes>, u64), run: &Run) {
    assert_ne!(header.flags & ClipHeader::FLAG_HISTORY, 0);
    assert_eq!(header.seq, run.seq);
    assert_eq!(*seq, run.seq);
    assert_eq!(*frames, run.sent);
}

/// Opus-sized frames: 60 bytes, 63 on the wire.
const FRAME_LEN: usize = 60;
const FRAME_WIRE_LEN: usize = FRAME_LEN + 3;

struct Run {
    sent: Vec<Bytes>,
    seq: u64,
    outcomes: Vec<Outcome>,
}

/// A notes group where alice talks `CLIP_FRAMES` frames, one every 20 ms,
/// to one bare member per behaviour, under a live latency budget of
/// `budget_ms`.
async fn scenario(budget_ms: u32, members: &[Behaviour]) -> Run {
    // Notes groups coalesce (issue #15): the lag rule must hold with the
    // frames a budget holds back (3 at 60 ms), and without a budget, where
    // the talker's task writes into the members' streams.
    let relay = TestRelay::start_with(|c| {
        c.live_lag_frames = LAG;
        c.live_budget_ms = budget_ms;
    })
    .await;
    let names: Vec<String> = (0..members.len()).map(|i| format!("m{i}")).collect();
    let mut all: Vec<&str> = names.iter().map(String::as_str).collect();
    all.push("alice");
    relay.group("team", GroupMode::Notes, &all).await;
    let (alice, _alice_events) = relay.member("alice", "team").await;
    let talked = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for (name, behaviour) in names.iter().zip(members) {
        let member = Member::join(&relay, name, behaviour.window).await;
        let talked = talked.clone();
        let behaviour = *behaviour;
        tasks.push(tokio::spawn(async move {
            member.receive(behaviour, &talked).await
        }));
    }
    let sent: Vec<Bytes> = (0..CLIP_FRAMES)
        .map(|i| {
            let mut f = vec![(i % 251) as u8; FRAME_LEN];
            f[1] = (i / 251) as u8;
            Bytes::from(f)
        })
        .collect();
    let mut talk = alice.talk("team", ClipParams::default()).await.unwrap();
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    for frame in &sent {
        tick.tick().await;
        talk.send_frame(frame.clone()).await.unwrap();
        talked.fetch_add(1, Ordering::Relaxed);
    }
    let seq = talk.finish(Bytes::new()).await.unwrap().seq;
    let mut outcomes = Vec::new();
    for task in tasks {
        outcomes.push(
            tokio::time::timeout(WAIT, task)
                .await
                .expect("member done in time")
                .unwrap(),
        );
    }
    Run {
        sent,
        seq,
        outcomes,
    }
}

/// A bare QUIC connection that has joined the group.
struct Member {
    _endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    _control: (quinn::SendStream, quinn::RecvStream),
}

impl Member {
    async fn join(relay: &TestRelay, user: &str, window: u32) -> Member {
        Member::join_group(relay, user, "team", window).await.0
    }

    /// Joins `group`; also returns the budget its `Joined` announced.
    async fn join_group(relay: &TestRelay, user: &str, group: &str, window: u32) -> (Member, u32) {
        let mut config = relay.config(relay.token(user));
        config.transport.stream_receive_window = window;
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        endpoint.set_default_client_config(ptt_client::quinn_config(&config).unwrap());
        let conn = endpoint
            .connect(relay.handle.addr(), "localhost")
            .unwrap()
            .await
            .unwrap();
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        let hello = ControlMessage::Hello {
            version: PROTOCOL_VERSION,
            token: relay.token(user),
            client: "lag-test".into(),
        };
        send.write_all(&hello.to_bytes()).await.unwrap();
        let join = ControlMessage::Join {
            request_id: 1,
            group: group.into(),
        };
        send.write_all(&join.to_bytes()).await.unwrap();
        let mut decoder = FrameDecoder::new(MAX_PAYLOAD_LEN);
        let budget = tokio::time::timeout(WAIT, async {
            loop {
                while let Some(f) = decoder.next_frame().unwrap() {
                    if let ControlMessage::Joined { live_budget_ms, .. } =
                        ControlMessage::decode(f.kind, f.payload).unwrap()
                    {
                        return live_budget_ms;
                    }
                }
                let chunk = recv.read_chunk(65536, true).await.unwrap().unwrap();
                decoder.push(chunk.bytes);
            }
        })
        .await
        .expect("joined in time");
        let member = Member {
            _endpoint: endpoint,
            conn,
            _control: (send, recv),
        };
        (member, budget)
    }

    /// Reads one live clip whole; returns its frames with when each was
    /// read.
    async fn arrivals(self) -> Vec<(Bytes, std::time::Instant)> {
        let mut live = Clip::accept(&self.conn).await;
        live.header().await.expect("live header");
        let mut frames = Vec::new();
        loop {
            match live.next().await {
                Ok(Some(ClipMessage::Frame { data, .. })) => {
                    frames.push((data, std::time::Instant::now()));
                }
                Ok(Some(ClipMessage::End { .. })) => return frames,
                other => panic!("live stream broke: {other:?}"),
            }
        }
    }

    async fn receive(self, behaviour: Behaviour, talked: &AtomicUsize) -> Outcome {
        let mut live = Clip::accept(&self.conn).await;
        let header = live.header().await.expect("live header");
        assert_eq!(header.flags & ClipHeader::FLAG_HISTORY, 0);
        let stream = live.stream;
        let conn = &self.conn;
        let report = |frames: usize| {
            if behaviour.reports {
                let mut payload = BytesMut::new();
                put_varint(&mut payload, stream);
                put_varint(&mut payload, frames as u64);
                let mut datagram = BytesMut::new();
                put_varint(&mut datagram, LIVE_READ);
                put_varint(&mut datagram, payload.len() as u64);
                datagram.extend_from_slice(&payload);
                conn.send_datagram(datagram.freeze()).unwrap();
            }
        };
        report(0);
        let mut frames = Vec::new();
        loop {
            if behaviour.stalls && frames.len() == STALL_AT {
                // The application stops reading; the QUIC stack carries on
                // (it ACKs, and buffers up to the window).
                let reset = tokio::time::timeout(STALL, live.recv.received_reset()).await;
                let lag = talked.load(Ordering::Relaxed) - frames.len();
                let Ok(Ok(Some(code))) = reset else {
                    panic!("not reset during the stall: {reset:?}");
                };
                let mut history = Clip::accept(&self.conn).await;
                let header = history.header().await.expect("history header");
                let (frames, seq) = history.rest().await.expect("history whole");
                return Outcome::Cut {
                    code: code.into_inner(),
                    lag,
                    history: (header, frames, seq),
                };
            }
            match live.next().await {
                Ok(Some(ClipMessage::Frame { data, .. })) => {
                    frames.push(data);
                    if frames.len() % REPORT_EVERY == 0 {
                        report(frames.len());
                    }
                }
                Ok(Some(ClipMessage::End { seq, .. })) => {
                    assert!(live.next().await.unwrap().is_none(), "FIN after ClipEnd");
                    let more = tokio::time::timeout(Duration::from_millis(500), async {
                        self.conn.accept_uni().await
                    })
                    .await;
                    assert!(more.is_err(), "no second copy of a clip received whole");
                    return Outcome::Complete { frames, seq };
                }
                other => panic!("live stream broke: {other:?}"),
            }
        }
    }
}

/// A clip stream from the relay.
struct Clip {
    recv: quinn::RecvStream,
    stream: u64,
    decoder: FrameDecoder,
}

impl Clip {
    async fn accept(conn: &quinn::Connection) -> Clip {
        let recv = tokio::time::timeout(WAIT, conn.accept_uni())
            .await
            .expect("a clip stream in time")
            .unwrap();
        Clip {
            stream: recv.id().into(),
            recv,
            decoder: FrameDecoder::new(MAX_PAYLOAD_LEN),
        }
    }

    /// The next message, `None` at FIN, or the reset code.
    async fn next(&mut self) -> Result<Option<ClipMessage>, String> {
        loop {
            if let Some(f) = self.decoder.next_frame().map_err(|e| e.to_string())? {
                return ClipMessage::decode(f.kind, f.payload)
                    .map(Some)
                    .map_err(|e| e.to_string());
            }
            match tokio::time::timeout(WAIT, self.recv.read_chunk(4096, true)).await {
                Ok(Ok(Some(chunk))) => self.decoder.push(chunk.bytes),
                Ok(Ok(None)) => return Ok(None),
                Ok(Err(e)) => return Err(e.to_string()),
                Err(_) => return Err("nothing in time".into()),
            }
        }
    }

    async fn header(&mut self) -> Result<ClipHeader, String> {
        match self.next().await? {
            Some(ClipMessage::Header(h)) => Ok(h),
            other => Err(format!("not a header: {other:?}")),
        }
    }

    /// The frames and the end's seq, through FIN.
    async fn rest(&mut self) -> Result<(Vec<Bytes>, u64), String> {
        let mut frames = Vec::new();
        loop {
            match self.next().await? {
                Some(ClipMessage::Frame { data, .. }) => frames.push(data),
                Some(ClipMessage::End { seq, .. }) => {
                    return match self.next().await? {
                        None => Ok((frames, seq)),
                        Some(m) => Err(format!("after the end: {m:?}")),
                    };
                }
                other => return Err(format!("unexpected {other:?}")),
            }
        }
    }
}
