//! The relay's live fan-out path: one talker, N receivers, real QUIC on
//! loopback, relay and clients in one process.
//!
//! Frames go out on one long clip, so the figures are the per-frame path
//! (the per-clip work, streams and acks, is the simulator's to measure).
//! Reports delivered frames per second (criterion's element throughput,
//! one element = one frame delivered to one receiver) and prints the
//! process CPU time per delivered frame, which includes the receiving
//! clients' work as well as the relay's (the simulator measures the relay
//! alone, in its own process).
//!
//! Also compares runtime layouts: the same load on a current-thread
//! runtime and on a 2-worker runtime, in one run.
//!
//! Frames go on QUIC streams, each written as it comes: the UDP media path
//! (PROTOCOL.md §14) drops what a full socket cannot take, which a talker
//! sending as fast as the relay takes frames would turn into losses, and
//! coalescing would change what is measured. Both are measured paced, by
//! the simulator (`scripts/relay-ab.sh`, issue #15).
//!
//! `cargo bench -p ptt-benches --bench fanout`

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use ptt_client::{Client, ClientConfig, ClipParams, Event, GroupMode, Talk, Trust};
use ptt_relay::{RelayConfig, RelayHandle};

/// A relay with one talker and `n` receivers joined to one group, and one
/// long clip open: the bench measures frames, not clip set-up.
struct Setup {
    _dir: tempfile::TempDir,
    relay: RelayHandle,
    talker: Client,
    talk: tokio::sync::Mutex<Option<Talk>>,
    receivers: Vec<Client>,
    delivered: Arc<AtomicU64>,
    /// Live deliveries that ended early (`ClipAborted`: a lag cut) and
    /// clips that came again from the store (`ClipStarted` with the
    /// history flag): a run that has any measures recovery, not fan-out.
    recovered: Arc<(AtomicU64, AtomicU64)>,
    /// What happened to the talker's connection and clips: a run that
    /// loses frames says why (the talker closed, a clip refused).
    talker_news: Arc<std::sync::Mutex<Vec<String>>>,
    _endpoints: Vec<quinn::Endpoint>,
}

/// Sets a group's members up with live frames on QUIC streams, each
/// written as it comes (no UDP media path, `live_budget_ms` 0), so the
/// figures compare with builds from before either existed (issue #9's
/// before/after).
async fn setup(n: usize) -> Setup {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = RelayConfig {
        max_clip: Duration::from_secs(24 * 3600),
        clips_per_minute: 100_000,
        max_concurrent_clips: 1000,
        live_lag_frames: 10_000,
        live_budget_ms: 0,
        media: false,
        ..RelayConfig::for_tests(dir.path())
    };
    let relay = ptt_relay::start(config).await.expect("relay starts");
    let store = relay.store().clone();
    ptt_relay::admin::create_group(&*store, "bench", GroupMode::Notes, 24 * 3_600_000)
        .await
        .expect("group");
    ptt_relay::admin::add_member(&*store, "bench", "talker")
        .await
        .expect("member");
    for i in 0..n {
        ptt_relay::admin::add_member(&*store, "bench", &format!("r{i}"))
            .await
            .expect("member");
    }
    let trust = Trust::fingerprint_from_hex(relay.cert_fingerprint()).expect("fingerprint");
    let config_for = |user: &str| {
        let mut c = ClientConfig::new(
            relay.addr(),
            "localhost",
            trust.clone(),
            relay
                .issue_token(user, Duration::from_secs(3600), false, false)
                .expect("the relay signs with its own key"),
        );
        c.media = false;
        c
    };
    // A hundred receivers per socket, each socket with room for bursts
    // (as the simulator does; phones would each have their own).
    let endpoints: Vec<quinn::Endpoint> = (0..n.div_ceil(100).max(1))
        .map(|_| {
            let socket =
                ptt_relay::net::udp_socket("127.0.0.1:0".parse().expect("addr")).expect("socket");
            let runtime = Arc::new(quinn::TokioRuntime);
            quinn::Endpoint::new(quinn::EndpointConfig::default(), None, socket, runtime)
                .expect("endpoint")
        })
        .collect();
    let endpoint = endpoints[0].clone();
    let delivered = Arc::new(AtomicU64::new(0));
    let recovered = Arc::new((AtomicU64::new(0), AtomicU64::new(0)));
    let mut receivers = Vec::with_capacity(n);
    for i in 0..n {
        let (client, mut events) =
            Client::connect_with_endpoint(endpoints[i / 100].clone(), config_for(&format!("r{i}")))
                .await
                .expect("receiver connects");
        client.join("bench").await.expect("join");
        let (delivered, recovered) = (delivered.clone(), recovered.clone());
        tokio::spawn(async move {
            while let Some(event) = events.next().await {
                match event {
                    Event::Frame { .. } => {
                        delivered.fetch_add(1, Ordering::Relaxed);
                    }
                    Event::ClipAborted { .. } => {
                        recovered.0.fetch_add(1, Ordering::Relaxed);
                    }
                    Event::ClipStarted { history: true, .. } => {
                        recovered.1.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {}
                }
            }
        });
        receivers.push(client);
    }
    let (talker, mut talker_events) =
        Client::connect_with_endpoint(endpoint.clone(), config_for("talker"))
            .await
            .expect("talker connects");
    let talker_news = Arc::new(std::sync::Mutex::new(Vec::new()));
    let news = talker_news.clone();
    tokio::spawn(async move {
        while let Some(event) = talker_events.next().await {
            if matches!(
                event,
                Event::Disconnected { .. } | Event::ClipRejected { .. }
            ) {
                news.lock().expect("news").push(format!("{event:?}"));
            }
        }
    });
    let talk = talker
        .talk("bench", ClipParams::default())
        .await
        .expect("talk");
    Setup {
        _dir: dir,
        relay,
        talker,
        talk: tokio::sync::Mutex::new(Some(talk)),
        receivers,
        delivered,
        recovered,
        talker_news,
        _endpoints: endpoints,
    }
}

/// Sends `frames` frames in clips of at most 1,000 and waits until every
/// receiver has each; returns the wall time.
async fn run(s: &Setup, frames: u64) -> Duration {
    let frame = Bytes::from_static(&[0xfc; 60]);
    let expected = s.delivered.load(Ordering::Relaxed) + frames * s.receivers.len() as u64;
    let start = Instant::now();
    let mut left = frames;
    while left > 0 {
        let n = left.min(1000);
        let mut talk = s
            .talker
            .talk("bench", ClipParams::default())
            .await
            .expect("talk");
        for _ in 0..n {
            talk.send_frame(frame.clone()).await.expect("frame");
        }
        // Do not wait for `Stored`: that is the store's fsync, not fan-out.
        tokio::spawn(talk.finish(Bytes::new()));
        left -= n;
    }
    while s.delivered.load(Ordering::Relaxed) < expected {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "frames were lost: {} of {expected} delivered; the talker saw {:?}",
            s.delivered.load(Ordering::Relaxed),
            s.talker_news.lock().expect("news")
        );
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    start.elapsed()
}

/// CPU time (user + system) of this process so far.
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15 (1-based), 12 and 13 after the
    // command name; Linux reports them in 100 Hz clock ticks.
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

/// Datagrams the kernel dropped because a UDP socket's receive buffer was
/// full (`RcvbufErrors` in /proc/net/snmp, machine-wide). A run that
/// overflows its buffers spends its time in QUIC loss recovery instead of
/// fan-out, and measures that: the figures of such a run are not
/// comparable with a run without drops, so each is printed with its count.
fn udp_receive_drops() -> u64 {
    let snmp = std::fs::read_to_string("/proc/net/snmp").unwrap_or_default();
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let (Some(names), Some(values)) = (udp.next(), udp.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(name, _)| *name == "RcvbufErrors")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

/// UDP datagrams the receivers have received so far. Frames per datagram
/// tell the two regimes of this benchmark apart: a run where each member's
/// writes carry several frames per packet, and one where the talker, the
/// relay and the members fall into lockstep and every frame costs a
/// packet per member.
fn received_datagrams(s: &Setup) -> u64 {
    s.receivers
        .iter()
        .filter_map(Client::connection)
        .map(|c| c.stats().udp_rx.datagrams)
        .sum()
}

fn runtime(workers: usize) -> tokio::runtime::Runtime {
    let mut builder = if workers == 0 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(workers);
        b
    };
    builder.enable_all().build().expect("runtime")
}

fn fanout(c: &mut Criterion) {
    let mut group = c.benchmark_group("fanout");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(5));
    group.warm_up_time(Duration::from_secs(1));
    for (label, workers) in [("current_thread", 0), ("2_workers", 2)] {
        let rt = runtime(workers);
        for n in [10usize, 100, 1000] {
            let s = rt.block_on(setup(n));
            group.throughput(Throughput::Elements(n as u64));
            let (mut cpu, mut delivered) = (Duration::ZERO, 0u64);
            let drops_before = udp_receive_drops();
            let datagrams_before = received_datagrams(&s);
            group.bench_with_input(BenchmarkId::new(label, n), &n, |b, _| {
                b.iter_custom(|iters| {
                    let before = cpu_time();
                    let wall = rt.block_on(run(&s, iters));
                    cpu += cpu_time().saturating_sub(before);
                    delivered += iters * n as u64;
                    wall
                });
            });
            if delivered > 0 {
                let datagrams = received_datagrams(&s).saturating_sub(datagrams_before);
                eprintln!(
                    "fanout/{label}/{n}: {:.2} delivered frames per datagram received",
                    delivered as f64 / datagrams.max(1) as f64
                );
                eprintln!(
                    "fanout/{label}/{n}: {:.2} µs CPU per delivered frame (relay + receivers, {delivered} frames); {} UDP datagrams dropped by full receive buffers; {} live deliveries cut, {} clips delivered again from the store",
                    cpu.as_secs_f64() * 1e6 / delivered as f64,
                    udp_receive_drops().saturating_sub(drops_before),
                    s.recovered.0.load(Ordering::Relaxed),
                    s.recovered.1.load(Ordering::Relaxed),
                );
            }
            rt.block_on(async {
                if let Some(talk) = s.talk.lock().await.take() {
                    talk.abort();
                }
                for r in &s.receivers {
                    r.close().await;
                }
                s.talker.close().await;
            });
            let Setup { relay, .. } = s;
            rt.block_on(relay.shutdown());
        }
    }
    group.finish();
}

criterion_group!(benches, fanout);
criterion_main!(benches);
