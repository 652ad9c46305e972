//! `quinn-floor`: the least a QUIC server must do to fan voice clips out
//! to a group, speaking just enough of PROTOCOL.md for `client-sim` to
//! drive it exactly as it drives the relay. It is the floor against which
//! the relay's live path is measured (issue #15: "every later figure of
//! the live path is quoted as this ratio").
//!
//! What it does, and nothing more: the relay's TLS and transport settings
//! ([`ptt_relay::tls::server_config`]), token verification once per
//! connection, `Welcome`, `Ok` to every admin request, `Joined`/`CaughtUp`
//! with nothing stored, and for each uploaded clip: the talker's receive
//! loop opens one stream per joined member and writes each frame straight
//! into every member's stream as it arrives (the frame bytes as received,
//! shared), then `ClipEnd` with the group's next sequence number, and
//! `Stored` to the talker. No store, no floor, no membership checks, no
//! lag rule, no acknowledgement bookkeeping: what the relay adds on top is
//! the product.
//!
//! It takes the relay's `serve` command line (`--listen`, `--data-dir`) and
//! prints the same start-up lines, so `scripts/relay-ab.sh` runs it as a
//! drop-in (`A_BIN=quinn-floor`).
//!
//! Two options give the live-plane variants of issue #15 item 5 (a), on
//! the same workload:
//! - `--live datagram`: each member's clip stream carries the ClipHeader
//!   (flag MEDIA) and ClipEnd, and the frames go in QUIC DATAGRAM frames
//!   (`LiveFrames` messages, `ptt_protocol::datagram::encode_live_frames`),
//!   which the client library routes as it routes the UDP media path's
//!   `Frames` packets. `--live streams` (the default) writes them into the
//!   streams.
//! - `--coalesce N` (1 to 16, default 1): the talker's receive loop holds
//!   N frames and then sends them together to every member (one write of N
//!   chunks, or one datagram of N frames): the floor of a coalescing
//!   group's live latency budget (3 frames = 60 ms of 20 ms frames).
//!
//! ```text
//! cargo build --release -p ptt-benches --bin quinn-floor
//! quinn-floor serve --listen 127.0.0.1:4433 --data-dir /tmp/floor [--live datagram] [--coalesce 3]
//! ```

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use bytes::Bytes;
use ptt_protocol::{ClipMessage, ControlMessage, FramedReader, Limits, PROTOCOL_VERSION, Welcome};
use ptt_relay::auth::TokenIssuer;
use ptt_relay::live::end_message;
use ptt_relay::tls::{Identity, TransportTuning};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

/// Largest control or clip message accepted.
const MAX_PAYLOAD: usize = 64 * 1024;

/// One group: its joined connections and its next sequence number.
#[derive(Default)]
struct Group {
    members: Mutex<Vec<(u64, quinn::Connection)>>,
    seq: AtomicU64,
}

#[derive(Default)]
struct Groups(Mutex<HashMap<String, Arc<Group>>>);

impl Groups {
    fn get(&self, name: &str) -> Arc<Group> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(name.to_owned())
            .or_default()
            .clone()
    }
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    if args.next().as_deref() != Some("serve") {
        bail!(
            "usage: quinn-floor serve [--listen ADDR] [--data-dir DIR] [--worker-threads N] \
             [--live streams|datagram] [--coalesce N]"
        );
    }
    let mut live = Live::default();
    let mut listen: SocketAddr = "127.0.0.1:4433".parse()?;
    let mut data_dir = PathBuf::from("./data-floor");
    // The relay's default: one worker per CPU this process may run on.
    let mut workers = ptt_relay::config::default_worker_threads();
    while let Some(arg) = args.next() {
        let value = args
            .next()
            .with_context(|| format!("{arg} needs a value"))?;
        match arg.as_str() {
            "--listen" => listen = value.parse()?,
            "--data-dir" => data_dir = value.into(),
            "--worker-threads" => workers = value.parse()?,
            "--live" => {
                live.datagrams = match value.as_str() {
                    "streams" => false,
                    "datagram" => true,
                    other => bail!("--live is streams or datagram, not {other}"),
                }
            }
            "--coalesce" => {
                live.coalesce = value.parse()?;
                if !(1..=ptt_protocol::media::MAX_FRAMES_PER_PACKET).contains(&live.coalesce) {
                    bail!(
                        "--coalesce is 1 to {}",
                        ptt_protocol::media::MAX_FRAMES_PER_PACKET
                    );
                }
            }
            other => bail!("unknown option {other}"),
        }
    }
    let mut builder = if workers == 0 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(workers);
        b
    };
    let runtime = builder.enable_all().build()?;
    runtime.block_on(serve(listen, data_dir, live))
}

async fn serve(listen: SocketAddr, data_dir: PathBuf, live: Live) -> anyhow::Result<()> {
    std::fs::create_dir_all(&data_dir)?;
    let identity = Identity::load_or_create_dev(&data_dir)?;
    let issuer = TokenIssuer::load_or_create(&data_dir.join("token.key"))?;
    let verifier = Arc::new(issuer.verifier());
    let fingerprint = identity.fingerprint();
    let certs = ptt_relay::tls::CertResolver::new(&identity, false, SystemTime::now())?;
    let config = ptt_relay::tls::server_config(
        Arc::new(certs),
        &TransportTuning {
            idle_timeout: Duration::from_secs(30),
            max_uni_streams: 16,
        },
    )?;
    let socket = ptt_relay::net::udp_socket(listen)?;
    let endpoint = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(config),
        socket,
        Arc::new(quinn::TokioRuntime),
    )?;
    eprintln!(
        "\nrelay listening on {} (quinn-floor: the minimal fan-out)\n  certificate sha-256: {fingerprint}\n",
        endpoint.local_addr()?
    );
    let groups = Arc::new(Groups::default());
    let next_id = AtomicU64::new(1);
    let mut connections = JoinSet::new();
    let stop = shutdown_signal();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                let id = next_id.fetch_add(1, Ordering::Relaxed);
                let (groups, verifier) = (groups.clone(), verifier.clone());
                connections.spawn(async move {
                    if let Ok(conn) = incoming.await {
                        let _ = connection(id, conn, groups, verifier, live).await;
                    }
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            _ = &mut stop => break,
        }
    }
    endpoint.close(0u32.into(), b"bye");
    connections.shutdown().await;
    endpoint.wait_idle().await;
    Ok(())
}

/// One client: its control stream, and a task per clip it uploads.
async fn connection(
    id: u64,
    conn: quinn::Connection,
    groups: Arc<Groups>,
    verifier: Arc<ptt_relay::auth::TokenVerifier>,
    live: Live,
) -> anyhow::Result<()> {
    let (mut send, recv) = conn.accept_bi().await?;
    let mut control = FramedReader::new(recv, MAX_PAYLOAD);
    let Some(ControlMessage::Hello { token, .. }) = control.next_control().await? else {
        bail!("no hello");
    };
    let claims = verifier.verify(&token, SystemTime::now())?;
    let welcome = ControlMessage::Welcome(Welcome {
        version: PROTOCOL_VERSION,
        user: claims.sub.clone(),
        server_time_ms: ptt_relay::auth::unix_millis(SystemTime::now()),
        limits: Limits {
            max_clip_ms: 3_600_000,
            max_clip_bytes: 16 << 20,
            max_frame_bytes: 8 * 1024,
            max_concurrent_clips: 64,
            clips_per_minute: 100_000,
            idle_timeout_ms: 30_000,
        },
    });
    send.write_all(&welcome.to_bytes()).await?;
    // Replies from clip tasks (`Stored`) and from this loop go through one
    // writer.
    let (reply_tx, mut reply_rx) = mpsc::channel::<Bytes>(256);
    let writer = tokio::spawn(async move {
        while let Some(bytes) = reply_rx.recv().await {
            if send.write_all(&bytes).await.is_err() {
                break;
            }
        }
    });
    let mut clips = JoinSet::new();
    let mut joined: Vec<Arc<Group>> = Vec::new();
    let result = loop {
        tokio::select! {
            message = control.next_control() => {
                let message = match message {
                    Ok(Some(m)) => m,
                    Ok(None) => break Ok(()),
                    Err(e) => break Err(anyhow::anyhow!("control stream: {e:?}")),
                };
                if let Some(reply) = answer(message, id, &conn, &groups, &mut joined) {
                    for r in reply {
                        if reply_tx.send(r.to_bytes()).await.is_err() {
                            break;
                        }
                    }
                }
            }
            uni = conn.accept_uni() => {
                let Ok(recv) = uni else { break Ok(()) };
                clips.spawn(clip(id, recv, groups.clone(), reply_tx.clone(), live));
            }
            Some(_) = clips.join_next(), if !clips.is_empty() => {}
        }
    };
    for group in joined {
        group
            .members
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|(member, _)| *member != id);
    }
    clips.shutdown().await;
    drop(reply_tx);
    let _ = writer.await;
    result
}

/// The replies to one control message.
fn answer(
    message: ControlMessage,
    id: u64,
    conn: &quinn::Connection,
    groups: &Groups,
    joined: &mut Vec<Arc<Group>>,
) -> Option<Vec<ControlMessage>> {
    use ControlMessage as M;
    match message {
        M::CreateGroup { request_id, .. }
        | M::AddMember { request_id, .. }
        | M::RemoveMember { request_id, .. }
        | M::SetMode { request_id, .. }
        | M::Leave { request_id, .. } => Some(vec![M::Ok { request_id }]),
        M::Join { request_id, group } => {
            let g = groups.get(&group);
            g.members
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push((id, conn.clone()));
            joined.push(g);
            Some(vec![
                M::Joined {
                    request_id,
                    group: group.clone(),
                    mode: ptt_protocol::GroupMode::Notes,
                    cursor: 0,
                    last_seq: 0,
                    live_budget_ms: 0,
                },
                M::CaughtUp { group, seq: 0 },
            ])
        }
        _ => None,
    }
}

/// How live frames reach members.
#[derive(Debug, Clone, Copy)]
struct Live {
    /// Frames in QUIC datagrams (`LiveFrames`) instead of the streams.
    datagrams: bool,
    /// Frames held and sent together.
    coalesce: usize,
}

impl Default for Live {
    fn default() -> Live {
        Live {
            datagrams: false,
            coalesce: 1,
        }
    }
}

/// One member's delivery of a clip: its stream, and the connection and
/// stream id its datagrams name.
struct Delivery {
    conn: quinn::Connection,
    stream: quinn::SendStream,
    id: u64,
}

/// One uploaded clip, sent from this receive loop to every other member:
/// written straight into each member's stream, or in datagrams.
async fn clip(
    talker: u64,
    recv: quinn::RecvStream,
    groups: Arc<Groups>,
    reply: mpsc::Sender<Bytes>,
    live: Live,
) -> anyhow::Result<()> {
    let mut reader = FramedReader::new(recv, MAX_PAYLOAD);
    let Some((ClipMessage::Header(mut header), _)) = reader.next_clip().await? else {
        bail!("no clip header");
    };
    let group = groups.get(&header.group);
    let members: Vec<quinn::Connection> = group
        .members
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .iter()
        .filter(|(member, _)| *member != talker)
        .map(|(_, conn)| conn.clone())
        .collect();
    header.seq = 0;
    header.flags &= ptt_protocol::ClipHeader::FLAG_EMERGENCY;
    if live.datagrams {
        header.flags |= ptt_protocol::ClipHeader::FLAG_MEDIA;
    }
    let first = ClipMessage::Header(header.clone()).to_bytes();
    let mut deliveries = Vec::with_capacity(members.len());
    for conn in members {
        if let Ok(mut stream) = conn.open_uni().await
            && stream.write_chunk(first.clone()).await.is_ok()
        {
            let id = u64::from(stream.id());
            deliveries.push(Delivery { conn, stream, id });
        }
    }
    let mut frames = 0u32;
    // Frames held for the next send: (index, Opus packet, framed message).
    let mut held: Vec<(u32, Bytes, Bytes)> = Vec::with_capacity(live.coalesce);
    loop {
        match reader.next_clip().await? {
            Some((ClipMessage::Frame { data, .. }, frame)) => {
                held.push((frames, data, frame.raw));
                frames += 1;
                if held.len() >= live.coalesce {
                    send(&mut deliveries, &mut held, live).await;
                }
            }
            Some((ClipMessage::End { waveform, .. }, _)) => {
                send(&mut deliveries, &mut held, live).await;
                let seq = group.seq.fetch_add(1, Ordering::Relaxed) + 1;
                let end = end_message(frames, seq, waveform);
                for d in &mut deliveries {
                    let _ = d.stream.write_chunk(end.clone()).await;
                    let _ = d.stream.finish();
                }
                let stored = ControlMessage::Stored {
                    group: header.group.clone(),
                    clip_id: header.clip_id,
                    seq,
                };
                let _ = reply.send(stored.to_bytes()).await;
                return Ok(());
            }
            _ => bail!("clip stream out of order"),
        }
    }
}

/// Sends the held frames to every member and empties `held`.
async fn send(deliveries: &mut [Delivery], held: &mut Vec<(u32, Bytes, Bytes)>, live: Live) {
    if held.is_empty() {
        return;
    }
    if live.datagrams {
        for d in deliveries.iter() {
            let mut datagram =
                Vec::with_capacity(64 + held.iter().map(|h| h.1.len()).sum::<usize>());
            let frames = held.iter().map(|(index, data, _)| (*index, &data[..]));
            ptt_protocol::datagram::encode_live_frames(d.id, None, frames, &mut datagram);
            // A datagram quinn cannot send is lost, as on the network.
            let _ = d.conn.send_datagram(datagram.into());
        }
    } else if let [(_, _, raw)] = &held[..] {
        for d in deliveries.iter_mut() {
            let _ = d.stream.write_chunk(raw.clone()).await;
        }
    } else {
        for d in deliveries.iter_mut() {
            let mut chunks: Vec<Bytes> = held.iter().map(|h| h.2.clone()).collect();
            let _ = d.stream.write_all_chunks(&mut chunks).await;
        }
    }
    held.clear();
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
