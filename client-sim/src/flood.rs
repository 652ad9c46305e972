//! Hostile clients beside the normal load, to measure what each costs the
//! others and how the relay treats it (issue #11). Every kind connects from
//! its own UDP socket on 127.0.0.2, as a hostile client elsewhere would
//! (per-address limits tell it apart from the normal clients on
//! 127.0.0.1), and is bounded in rate, in connections and in time: it
//! stops when the normal run ends.
//!
//! - `handshakes`: QUIC handshakes at the rate, each completed and dropped
//!   without a Hello.
//! - `never-auth`: connections that never authenticate, held until the
//!   relay closes them; every other one sends the first bytes of a Hello
//!   and stalls (slowloris).
//! - `control`: an authenticated connection sending control messages
//!   (`ListGroups`, which reads the store) at the rate; when the relay
//!   closes it, another.
//! - `oversized`: an upload with a frame over `max_frame_bytes`, then a
//!   control message announcing 1 MiB; again on a new connection.
//! - `streams`: clip streams opened as fast as the rate and the stream
//!   credit allow, each a header for a group that does not exist.
//! - `never-read`: members of the busiest group that join and then never
//!   read anything (no stream accepted, control stream unread).
//! - `frames`: a member of the busiest group uploading clips faster than
//!   real time, at the rate in frames a second over two uploads at once.
//!
//! The flood's user is a member of one group of the run (the first notes
//! group; see [`crate::sim::Intruder`]) for the kinds that need one; the
//! receivers leave its clips out of the verdict.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use ptt_client::{ClientConfig, Trust};
use ptt_protocol::message::MAX_PAYLOAD_LEN;
use ptt_protocol::{
    ClipFormat, ClipHeader, ClipMessage, ControlMessage, ErrorCode, FramedReader, PROTOCOL_VERSION,
};
use ptt_relay::auth::TokenIssuer;
use tokio::sync::watch;
use tokio::task::JoinSet;

/// The kinds of flooding client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FloodKind {
    /// New QUIC handshakes that never authenticate.
    Handshakes,
    /// Connections held without a Hello (half of them with a partial one).
    NeverAuth,
    /// Control messages at the rate on an authenticated connection.
    Control,
    /// Frames and control messages over the limits.
    Oversized,
    /// Clip streams opened as fast as allowed.
    Streams,
    /// Members of a busy group that never read.
    NeverRead,
    /// Uploads faster than real time, at the rate in frames a second.
    Frames,
}

/// Where and as whom the flood connects.
#[derive(Debug, Clone)]
pub struct FloodTarget {
    /// The relay.
    pub addr: SocketAddr,
    /// Its certificate's SHA-256.
    pub fingerprint: [u8; 32],
    /// Signs the flood user's tokens.
    pub issuer: Arc<TokenIssuer>,
    /// The flood's user id.
    pub user: String,
    /// The group the flood's user is a member of, once the run created it.
    pub group: watch::Receiver<Option<String>>,
}

/// How the relay ended the flood's connections (or that they were still
/// open when the run ended).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Endings {
    /// Connections that ended so.
    pub count: u64,
    /// Their mean lifetime from the end of the handshake.
    pub mean: Duration,
    /// The longest.
    pub max: Duration,
}

/// What the flood did and how the relay answered.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FloodStats {
    /// Connections attempted.
    pub attempted: u64,
    /// Handshakes the relay completed.
    pub completed: u64,
    /// What the kind sends, counted: control messages, streams, frames,
    /// uploads (see [`FloodStats::summary`]).
    pub sent: u64,
    /// How connections ended, by reason (`closed RateLimited (11)`,
    /// `still open`, …).
    pub endings: BTreeMap<String, Endings>,
    /// Uploads and streams refused (STOP_SENDING or ClipRejected), by code.
    pub refusals: BTreeMap<String, u64>,
    /// Uploads the relay stored.
    pub stored: u64,
}

impl FloodStats {
    /// One line per fact, for the run's output.
    pub fn summary(&self, kind: FloodKind) -> String {
        let what = match kind {
            FloodKind::Handshakes | FloodKind::NeverAuth => "",
            FloodKind::Control => "control messages",
            FloodKind::Oversized => "oversized uploads",
            FloodKind::Streams => "clip streams",
            FloodKind::NeverRead => "",
            FloodKind::Frames => "frames",
        };
        let mut out = format!(
            "flood {kind:?}: {} connections attempted, {} handshakes completed",
            self.attempted, self.completed
        );
        if !what.is_empty() {
            out.push_str(&format!(", {} {what} sent", self.sent));
        }
        if kind == FloodKind::Frames {
            out.push_str(&format!(", {} uploads stored", self.stored));
        }
        for (reason, e) in &self.endings {
            out.push_str(&format!(
                "\n  {} connections {reason} after {:.2} s on average (longest {:.2} s)",
                e.count,
                e.mean.as_secs_f64(),
                e.max.as_secs_f64()
            ));
        }
        for (code, n) in &self.refusals {
            out.push_str(&format!("\n  {n} refused {code}"));
        }
        out
    }

    fn ended(&mut self, reason: String, lifetime: Duration) {
        let e = self.endings.entry(reason).or_default();
        let total = e.mean * e.count as u32 + lifetime;
        e.count += 1;
        e.mean = total / e.count as u32;
        e.max = e.max.max(lifetime);
    }
}

/// Runs a flood of `kind` at `rate` until `stop` turns true.
pub async fn run(
    kind: FloodKind,
    target: FloodTarget,
    rate: u32,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<FloodStats> {
    let config = ClientConfig::new(
        target.addr,
        "localhost",
        Trust::Fingerprint(target.fingerprint),
        "",
    );
    // Another loopback address than the normal clients' (127.0.0.1).
    let mut endpoint = quinn::Endpoint::client("127.0.0.2:0".parse()?)?;
    endpoint.set_default_client_config(ptt_client::quinn_config(&config)?);
    let flood = Flood {
        endpoint: endpoint.clone(),
        target,
        rate: rate.max(1),
        stats: Arc::new(Mutex::new(FloodStats::default())),
        stop,
    };
    match kind {
        FloodKind::Handshakes => flood.handshakes().await,
        FloodKind::NeverAuth => flood.never_auth().await,
        FloodKind::Control | FloodKind::Oversized | FloodKind::Streams | FloodKind::Frames => {
            flood.sessions(kind).await
        }
        FloodKind::NeverRead => flood.never_read().await,
    }
    endpoint.close(0u32.into(), b"");
    let stats = flood
        .stats
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    Ok(stats)
}

/// Most handshakes in flight, and most connections held, at once.
const IN_FLIGHT: usize = 64;
/// Most never-authenticating connections held at once.
const HELD: usize = 1000;
/// Most never-reading members.
const NEVER_READ: usize = 50;
/// Authenticated hostile connections at once (control, oversized, …).
const SESSIONS: usize = 4;
/// Longest wait for a handshake or an answer.
const WAIT: Duration = Duration::from_secs(5);
/// Frames of one `frames` upload: 60 s of 20 ms audio, the default
/// `max_clip`.
const UPLOAD_FRAMES: u32 = 3000;

#[derive(Clone)]
struct Flood {
    endpoint: quinn::Endpoint,
    target: FloodTarget,
    rate: u32,
    stats: Arc<Mutex<FloodStats>>,
    stop: watch::Receiver<bool>,
}

impl Flood {
    fn stats(&self) -> std::sync::MutexGuard<'_, FloodStats> {
        self.stats.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn stopped(&self) {
        let mut stop = self.stop.clone();
        // An error: the run is gone, which is a stop too.
        let _ = stop.wait_for(|s| *s).await;
    }

    async fn connect(&self) -> Option<quinn::Connection> {
        self.stats().attempted += 1;
        let connecting = self.endpoint.connect(self.target.addr, "localhost").ok()?;
        let conn = tokio::time::timeout(WAIT, connecting).await.ok()?.ok()?;
        self.stats().completed += 1;
        Some(conn)
    }

    /// Connects and says Hello as the flood's user: the control stream.
    async fn hello(
        &self,
    ) -> Option<(
        quinn::Connection,
        quinn::SendStream,
        FramedReader<quinn::RecvStream>,
    )> {
        let conn = self.connect().await?;
        let (mut send, recv) = conn.open_bi().await.ok()?;
        let hello = ControlMessage::Hello {
            version: PROTOCOL_VERSION,
            token: self.target.issuer.issue(
                &self.target.user,
                Duration::from_secs(3600),
                false,
                false,
            ),
            client: "client-sim flood".into(),
        };
        send.write_all(&hello.to_bytes()).await.ok()?;
        let mut control = FramedReader::new(recv, MAX_PAYLOAD_LEN);
        match tokio::time::timeout(WAIT, control.next_control()).await {
            Ok(Ok(Some(ControlMessage::Welcome(_)))) => Some((conn, send, control)),
            _ => None,
        }
    }

    /// The flood user's group, once the run has created it.
    async fn group(&self) -> Option<String> {
        let mut group = self.target.group.clone();
        tokio::select! {
            g = group.wait_for(Option::is_some) => g.ok().and_then(|g| g.clone()),
            _ = self.stopped() => None,
        }
    }

    /// Waits for the relay to close `conn` (or the run to end) and records
    /// how it ended.
    async fn until_closed(&self, conn: &quinn::Connection, since: Instant) {
        let reason = tokio::select! {
            e = conn.closed() => ending(&e),
            _ = self.stopped() => "still open at the end".to_owned(),
        };
        self.stats().ended(reason, since.elapsed());
    }

    async fn handshakes(&self) {
        let mut tick = tokio::time::interval(Duration::from_secs(1) / self.rate);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut in_flight = JoinSet::new();
        loop {
            tokio::select! {
                _ = self.stopped() => break,
                Some(_) = in_flight.join_next() => {}
                _ = tick.tick(), if in_flight.len() < IN_FLIGHT => {
                    let flood = self.clone();
                    in_flight.spawn(async move {
                        if let Some(conn) = flood.connect().await {
                            conn.close(0u32.into(), b"");
                        }
                    });
                }
            }
        }
        in_flight.abort_all();
        while in_flight.join_next().await.is_some() {}
    }

    async fn never_auth(&self) {
        let mut tick = tokio::time::interval(Duration::from_secs(1) / self.rate);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut held = JoinSet::new();
        let mut n = 0u64;
        loop {
            tokio::select! {
                _ = self.stopped() => break,
                Some(_) = held.join_next() => {}
                _ = tick.tick(), if held.len() < HELD => {
                    n += 1;
                    let partial = n.is_multiple_of(2);
                    let flood = self.clone();
                    held.spawn(async move {
                        let Some(conn) = flood.connect().await else { return };
                        let since = Instant::now();
                        // Kept open until the connection ends.
                        let mut _stream = None;
                        if partial && let Ok((mut send, recv)) = conn.open_bi().await {
                            // A Hello frame announcing 255 bytes, none sent.
                            let _ = send.write_all(&[0x01, 0x40, 0xff]).await;
                            _stream = Some((send, recv));
                        }
                        flood.until_closed(&conn, since).await;
                    });
                }
            }
        }
        // Each task records its connection as still open and returns.
        while held.join_next().await.is_some() {}
    }

    async fn never_read(&self) {
        let Some(group) = self.group().await else {
            return;
        };
        let mut members = JoinSet::new();
        for _ in 0..NEVER_READ.min(self.rate as usize) {
            let flood = self.clone();
            let group = group.clone();
            members.spawn(async move {
                let Some((conn, mut send, _control)) = flood.hello().await else {
                    return;
                };
                let since = Instant::now();
                let join = ControlMessage::Join {
                    request_id: 1,
                    group,
                };
                if send.write_all(&join.to_bytes()).await.is_ok() {
                    // Never read: no stream accepted, `_control` unread.
                    flood.until_closed(&conn, since).await;
                }
            });
        }
        while members.join_next().await.is_some() {}
    }

    /// `SESSIONS` authenticated connections at once doing `kind`; each
    /// that the relay closes is replaced, at most `rate` a second.
    async fn sessions(&self, kind: FloodKind) {
        let group = match kind {
            FloodKind::Oversized | FloodKind::Frames => match self.group().await {
                Some(g) => g,
                None => return,
            },
            _ => String::new(),
        };
        // Uploads of the frames kind share the user's frames; one session
        // is enough (the user's limits span its connections).
        let sessions = if kind == FloodKind::Frames {
            1
        } else {
            SESSIONS
        };
        let mut reconnect = tokio::time::interval(Duration::from_secs(1) / self.rate.min(50));
        reconnect.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut running = JoinSet::new();
        loop {
            tokio::select! {
                _ = self.stopped() => break,
                Some(_) = running.join_next() => {}
                _ = reconnect.tick(), if running.len() < sessions => {
                    let flood = self.clone();
                    let group = group.clone();
                    running.spawn(async move { flood.session(kind, group).await });
                }
            }
        }
        while running.join_next().await.is_some() {}
    }

    async fn session(&self, kind: FloodKind, group: String) {
        let Some((conn, send, control)) = self.hello().await else {
            return;
        };
        let since = Instant::now();
        let mut tasks = JoinSet::new();
        // Read the control stream (a flood that does not read is closed
        // for that first), counting refusals.
        let stats = self.stats.clone();
        tasks.spawn(drain_control(control, stats));
        let flood = self.clone();
        let conn2 = conn.clone();
        tasks.spawn(async move {
            match kind {
                FloodKind::Control => flood.control(send).await,
                FloodKind::Oversized => flood.oversized(&conn2, send, &group).await,
                FloodKind::Streams => flood.streams(&conn2, send).await,
                FloodKind::Frames => flood.frames(&conn2, send, &group).await,
                _ => {}
            }
        });
        self.until_closed(&conn, since).await;
        conn.close(0u32.into(), b"");
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }

    /// `ListGroups` at the rate, in batches every 10 ms.
    async fn control(&self, mut send: quinn::SendStream) {
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        let per_tick = self.rate.div_ceil(100);
        let mut id = 0u64;
        loop {
            tick.tick().await;
            let mut batch = BytesMut::new();
            for _ in 0..per_tick {
                id += 1;
                ControlMessage::ListGroups { request_id: id }.encode(&mut batch);
            }
            if send.write_all(&batch).await.is_err() {
                return;
            }
            self.stats().sent += u64::from(per_tick);
        }
    }

    /// One upload with a frame over `max_frame_bytes`, then a control
    /// message announcing 1 MiB (over the 64 KiB limit).
    async fn oversized(&self, conn: &quinn::Connection, mut send: quinn::SendStream, group: &str) {
        if let Ok(mut upload) = conn.open_uni().await {
            let mut bytes = BytesMut::new();
            ClipMessage::Header(header(group)).encode(&mut bytes);
            ClipMessage::Frame {
                index: 0,
                data: Bytes::from(vec![0xfc; 16 * 1024]),
            }
            .encode(&mut bytes);
            self.stats().sent += 1;
            if upload.write_all(&bytes).await.is_ok() {
                let code = tokio::time::timeout(WAIT, upload.stopped()).await;
                self.refused(match code {
                    Ok(Ok(Some(code))) => ErrorCode::from_code(code.into_inner()).to_string(),
                    _ => "not at all".to_owned(),
                });
            }
        }
        // ListGroups (0x13) announcing 1 MiB (a 4-byte varint), then a
        // little of it.
        let _ = send
            .write_all(&[0x13, 0x80, 0x10, 0x00, 0x00, 0, 0, 0, 0])
            .await;
    }

    /// Clip streams as fast as the stream credit and the rate allow, each
    /// a header for a group that does not exist.
    async fn streams(&self, conn: &quinn::Connection, _send: quinn::SendStream) {
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        let per_tick = self.rate.div_ceil(100);
        let bytes = ClipMessage::Header(header("flood-no-such-group")).to_bytes();
        loop {
            tick.tick().await;
            for _ in 0..per_tick {
                let Ok(mut upload) = conn.open_uni().await else {
                    return;
                };
                self.stats().sent += 1;
                if upload.write_all(&bytes).await.is_err() || upload.finish().is_err() {
                    return;
                }
            }
        }
    }

    /// Uploads of `UPLOAD_FRAMES` frames, two at once, at the rate in
    /// frames a second between them; a refused one is replaced.
    async fn frames(&self, conn: &quinn::Connection, _send: quinn::SendStream, group: &str) {
        let mut uploads = JoinSet::new();
        loop {
            while uploads.len() < 2 {
                let flood = self.clone();
                let conn = conn.clone();
                let group = group.to_owned();
                uploads.spawn(async move { flood.upload(&conn, &group).await });
            }
            if uploads.join_next().await.is_none() {
                return;
            }
            if conn.close_reason().is_some() {
                return;
            }
        }
    }

    async fn upload(&self, conn: &quinn::Connection, group: &str) {
        let Ok(mut upload) = conn.open_uni().await else {
            return;
        };
        let mut bytes = BytesMut::new();
        ClipMessage::Header(header(group)).encode(&mut bytes);
        if upload.write_all(&bytes).await.is_err() {
            return;
        }
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        // Two uploads share the rate.
        let per_tick = self.rate.div_ceil(200);
        let mut index = 0;
        while index < UPLOAD_FRAMES {
            tick.tick().await;
            let mut batch = BytesMut::new();
            let n = per_tick.min(UPLOAD_FRAMES - index);
            for _ in 0..n {
                ClipMessage::Frame {
                    index,
                    data: Bytes::from_static(&[0xfc; 80]),
                }
                .encode(&mut batch);
                index += 1;
            }
            if upload.write_all(&batch).await.is_err() {
                // Stopped: the answer (ClipRejected) is counted from the
                // control stream.
                return;
            }
            self.stats().sent += u64::from(n);
        }
        let end = ClipMessage::End {
            frame_count: UPLOAD_FRAMES,
            seq: 0,
            waveform: Bytes::new(),
        };
        if upload.write_all(&end.to_bytes()).await.is_ok() {
            let _ = upload.finish();
        }
    }

    fn refused(&self, code: String) {
        *self.stats().refusals.entry(code).or_default() += 1;
    }
}

/// Reads the control stream to its end, counting `ClipRejected` codes and
/// `Stored`.
async fn drain_control(
    mut control: FramedReader<quinn::RecvStream>,
    stats: Arc<Mutex<FloodStats>>,
) {
    while let Ok(Some(message)) = control.next_control().await {
        let mut stats = stats.lock().unwrap_or_else(|p| p.into_inner());
        match message {
            ControlMessage::ClipRejected { code, .. } => {
                *stats
                    .refusals
                    .entry(format!("{code} (ClipRejected)"))
                    .or_default() += 1;
            }
            ControlMessage::Stored { .. } => stats.stored += 1,
            _ => {}
        }
    }
}

/// How a connection ended, in words.
fn ending(error: &quinn::ConnectionError) -> String {
    match error {
        quinn::ConnectionError::ApplicationClosed(close) => format!(
            "closed {}",
            ErrorCode::from_code(close.error_code.into_inner())
        ),
        quinn::ConnectionError::ConnectionClosed(close) => {
            format!("closed by QUIC ({})", close.error_code)
        }
        quinn::ConnectionError::TimedOut => "timed out (idle)".to_owned(),
        quinn::ConnectionError::LocallyClosed => "closed by the flood".to_owned(),
        other => other.to_string(),
    }
}

/// An Opus upload header for `group`.
fn header(group: &str) -> ClipHeader {
    ClipHeader {
        group: group.into(),
        clip_id: ptt_client::random_clip_id(),
        talker: String::new(),
        seq: 0,
        format: ClipFormat::Opus,
        sample_rate: 48_000,
        channels: 1,
        frame_ms: 20,
        created_ms: 0,
        flags: 0,
    }
}
