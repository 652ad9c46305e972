//! Test harness: a relay started in-process on loopback port 0, clients
//! connected to it, and helpers to wait for events.
#![allow(dead_code)]

pub mod nats;
pub mod raw;

use std::time::Duration;

use bytes::Bytes;
use ptt_client::{Client, ClientConfig, ClipParams, Event, Events, GroupMode, Trust};
use ptt_relay::{RelayConfig, RelayHandle};

/// How long any wait in a test may take before it fails. Generous: the
/// tests assert on what arrives, not on how fast.
pub const WAIT: Duration = Duration::from_secs(15);

pub struct TestRelay {
    pub handle: RelayHandle,
    pub dir: tempfile::TempDir,
}

impl TestRelay {
    pub async fn start() -> TestRelay {
        TestRelay::start_with(|_| {}).await
    }

    pub async fn start_with(adjust: impl FnOnce(&mut RelayConfig)) -> TestRelay {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = RelayConfig::for_tests(dir.path());
        adjust(&mut config);
        let handle = ptt_relay::start(config).await.expect("relay starts");
        TestRelay { handle, dir }
    }

    pub async fn group(&self, group: &str, mode: GroupMode, members: &[&str]) {
        self.group_with_max(group, mode, members, 60_000).await;
    }

    pub async fn group_with_max(
        &self,
        group: &str,
        mode: GroupMode,
        members: &[&str],
        max_ms: u32,
    ) {
        let store = self.handle.store();
        ptt_relay::admin::create_group(&**store, group, mode, max_ms)
            .await
            .expect("group created");
        for m in members {
            ptt_relay::admin::add_member(&**store, group, m)
                .await
                .expect("member added");
        }
    }

    pub fn token(&self, user: &str) -> String {
        self.handle
            .issue_token(user, Duration::from_secs(3600), false, false)
            .expect("the test relay signs with its own key")
    }

    pub fn config(&self, token: String) -> ClientConfig {
        let trust =
            Trust::fingerprint_from_hex(self.handle.cert_fingerprint()).expect("fingerprint");
        ClientConfig::new(self.handle.addr(), "localhost", trust, token)
    }

    pub async fn client(&self, user: &str) -> (Client, Events) {
        self.connect(self.config(self.token(user))).await
    }

    pub async fn connect(&self, config: ClientConfig) -> (Client, Events) {
        tokio::time::timeout(WAIT, Client::connect(config))
            .await
            .expect("connect in time")
            .expect("connect")
    }

    /// A client that has joined `group`.
    pub async fn member(&self, user: &str, group: &str) -> (Client, Events) {
        let (client, events) = self.client(user).await;
        client.join(group).await.expect("join");
        (client, events)
    }
}

/// Waits for the first event that `pick` maps to `Some`.
pub async fn wait_for<T>(events: &mut Events, mut pick: impl FnMut(&Event) -> Option<T>) -> T {
    tokio::time::timeout(WAIT, async {
        loop {
            let event = events.next().await.expect("event stream open");
            if let Some(t) = pick(&event) {
                return t;
            }
        }
    })
    .await
    .expect("the expected event arrived in time")
}

/// Gathers a gap notice and the ends of `n` clips (they come on different
/// streams, which QUIC does not order): the gap and the sorted seqs.
pub async fn gap_and_ends(events: &mut Events, n: usize) -> (Option<(u64, u64)>, Vec<u64>) {
    let mut gap = None;
    let mut ended = Vec::new();
    tokio::time::timeout(WAIT, async {
        while gap.is_none() || ended.len() < n {
            match events.next().await.expect("event stream open") {
                Event::Gap {
                    from_seq, to_seq, ..
                } => gap = Some((from_seq, to_seq)),
                Event::ClipEnded { seq, .. } => ended.push(seq),
                _ => {}
            }
        }
    })
    .await
    .expect("gap and clips in time");
    ended.sort();
    (gap, ended)
}

/// A received clip: header fields and frames, gathered from events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub talker: String,
    pub seq: u64,
    pub history: bool,
    pub frames: Vec<Bytes>,
}

/// Collects `n` complete clips from the events (in arrival order of their
/// ends), ignoring other events.
pub async fn collect_clips(events: &mut Events, n: usize) -> Vec<Received> {
    let mut open: std::collections::HashMap<ptt_client::ClipId, Received> = Default::default();
    let mut done = Vec::new();
    tokio::time::timeout(WAIT, async {
        while done.len() < n {
            match events.next().await.expect("event stream open") {
                Event::ClipStarted {
                    clip_id,
                    talker,
                    seq,
                    history,
                    ..
                } => {
                    open.insert(
                        clip_id,
                        Received {
                            talker,
                            seq,
                            history,
                            frames: Vec::new(),
                        },
                    );
                }
                Event::Frame {
                    clip_id,
                    index,
                    data,
                    ..
                } => {
                    // Placed by index: media-path frames come as they
                    // arrive (PROTOCOL.md §14.4), the uplink's ahead of
                    // the stream's.
                    let frames = &mut open
                        .get_mut(&clip_id)
                        .expect("frame of a started clip")
                        .frames;
                    let index = index as usize;
                    if frames.len() <= index {
                        frames.resize(index + 1, Bytes::new());
                    }
                    frames[index] = data;
                }
                Event::ClipEnded { clip_id, seq, .. } => {
                    let mut clip = open.remove(&clip_id).expect("end of a started clip");
                    clip.seq = seq;
                    done.push(clip);
                }
                Event::ClipAborted { clip_id, .. } => {
                    open.remove(&clip_id);
                }
                _ => {}
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{n} clips arrived in time (got {})", done.len()));
    done
}

/// `n` distinct fake Opus frames (the relay forwards bytes; it does not
/// decode them).
pub fn frames(tag: u8, n: usize) -> Vec<Bytes> {
    (0..n)
        .map(|i| {
            Bytes::from(vec![
                tag,
                (i % 256) as u8,
                (i / 256) as u8,
                0xfc,
                0x01,
                0x02,
            ])
        })
        .collect()
}

pub fn params() -> ClipParams {
    ClipParams::default()
}
