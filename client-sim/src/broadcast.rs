//! The `broadcast` scenario (issue #14): one publisher, many followers of
//! a public channel, some online, some joining and leaving during the run.
//!
//! It runs against a relay started in this process (CPU and memory are
//! then the relay's and the simulated clients' together; offline
//! followers are follower records written straight into its store, what
//! Follow writes), or against a separate `relay serve` process (`--relay`,
//! `--relay-pid`: CPU and memory are read from that process in /proc;
//! offline followers connect, Follow and close). Online followers
//! connect, Follow over QUIC and Join. The publisher
//! speaks a clip every `clip_interval`, frame by frame in real time. During
//! the run `churn` online followers leave (close) and as many offline
//! followers connect, Join and catch up from their cursor.
//!
//! Verified: every follower joined until the end received every clip after
//! the cursor its Joined reported, once (no clip missing, none twice).
//! Measured: the time from the end of each clip (the publisher wrote its
//! last frame) to its last live follower having it whole, the CPU time per
//! delivered clip, and resident memory per online and per offline
//! follower.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use ptt_client::{ChannelLimits, Client, ClientConfig, ClipParams, Event, Events, Trust};
use ptt_relay::store::FollowChange;
use serde::Serialize;

use crate::RelayChoice;
use crate::stats::{Summary, new_histogram, sample_process};

/// The channel's id.
const CHANNEL: &str = "broadcast";

/// What to run.
#[derive(Debug, Clone)]
pub struct BroadcastOptions {
    /// Followers in all.
    pub followers: usize,
    /// The fraction of them online from the start.
    pub online_fraction: f64,
    /// Clips the publisher speaks.
    pub clips: usize,
    /// Time from one clip's start to the next.
    pub clip_interval: Duration,
    /// Frames (20 ms each) per clip.
    pub clip_frames: usize,
    /// Online followers that leave, and offline ones that come online,
    /// during the run (each).
    pub churn: usize,
    /// Clients per UDP socket.
    pub clients_per_endpoint: usize,
    /// Longest wait for the last deliveries after the last clip.
    pub settle: Duration,
}

impl BroadcastOptions {
    /// The issue's figure: 10,000 followers, 30 % online, a 1 s clip every
    /// 3 s for a minute, 300 leaving and 300 joining.
    pub fn full() -> BroadcastOptions {
        BroadcastOptions {
            followers: 10_000,
            online_fraction: 0.3,
            clips: 20,
            clip_interval: Duration::from_secs(3),
            clip_frames: 50,
            churn: 300,
            clients_per_endpoint: 200,
            settle: Duration::from_secs(30),
        }
    }
}

/// What a run found.
#[derive(Debug, Clone, Serialize)]
pub struct BroadcastReport {
    /// Followers in all.
    pub followers: usize,
    /// Online from the start.
    pub online: usize,
    /// Clips published.
    pub clips: usize,
    /// Deliveries the verifier expected (followers joined until the end).
    pub deliveries_expected: u64,
    /// Clips missing at the end.
    pub deliveries_missing: u64,
    /// Clips received twice.
    pub deliveries_duplicate: u64,
    /// Clips delivered in all (leavers included).
    pub deliveries_total: u64,
    /// End of a clip to its last live follower, per clip, ms.
    pub end_to_last_follower_ms: Summary,
    /// End of a clip to each live follower, per delivery, ms.
    pub end_to_follower_ms: Summary,
    /// CPU time per delivered clip, µs (of [`BroadcastReport::measured`]).
    pub cpu_us_per_delivered_clip: f64,
    /// Resident memory added per online follower, KiB.
    pub rss_kib_per_online_follower: f64,
    /// Resident memory added per offline follower record, bytes.
    pub rss_bytes_per_offline_follower: f64,
    /// Whose CPU time and memory the figures are.
    pub measured: String,
    /// Whether a delivery failed.
    pub failed: bool,
}

impl BroadcastReport {
    /// A text table.
    pub fn table(&self) -> String {
        let l = &self.end_to_last_follower_ms;
        let d = &self.end_to_follower_ms;
        format!(
            "broadcast: {} followers, {} online, {} clips\n\
             deliveries           {} expected, {} missing, {} duplicate ({} in all)\n\
             end → last follower  p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms (per clip)\n\
             end → follower       p50 {:.1} ms, p99 {:.1} ms (per delivery)\n\
             cpu                  {:.1} µs per delivered clip ({})\n\
             memory               {:.1} KiB per online follower, {:.0} B per offline follower ({})\n",
            self.followers,
            self.online,
            self.clips,
            self.deliveries_expected,
            self.deliveries_missing,
            self.deliveries_duplicate,
            self.deliveries_total,
            l.p50,
            l.p99,
            l.max,
            d.p50,
            d.p99,
            self.cpu_us_per_delivered_clip,
            self.measured,
            self.rss_kib_per_online_follower,
            self.rss_bytes_per_offline_follower,
            self.measured,
        )
    }
}

/// What one follower received: seq → arrival times.
#[derive(Default)]
struct Inbox {
    /// The cursor its Joined reported.
    cursor: u64,
    /// Each seq's arrival times (more than one: a duplicate).
    got: BTreeMap<u64, Vec<(Instant, bool)>>,
    /// Left during the run (not verified).
    left: bool,
}

type Inboxes = Arc<Mutex<HashMap<usize, Inbox>>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs the scenario against an embedded relay, or a separate one
/// ([`RelayChoice::External`]: its CPU and memory are then read from its
/// process alone, and offline followers Follow over QUIC instead of being
/// written into the store). A separate relay must allow the followers'
/// connections (`max_connections`) and the clips (`channel_max_clips_per_day`).
pub async fn run(opts: &BroadcastOptions, relay: &RelayChoice) -> anyhow::Result<BroadcastReport> {
    match relay {
        RelayChoice::Embedded => {
            let dir = tempfile::Builder::new()
                .prefix("client-sim-broadcast-")
                .tempdir()
                .context("creating the relay's data directory")?;
            let mut config = ptt_relay::RelayConfig::for_tests(dir.path());
            config.max_connections = opts.followers + 100;
            config.channel_max_clips_per_day = u32::MAX;
            let relay = ptt_relay::start(config)
                .await
                .context("starting the relay")?;
            let issuer =
                ptt_relay::auth::TokenIssuer::load_or_create(&dir.path().join("token.key"))
                    .context("loading the embedded relay's token key")?;
            let target = Relay {
                addr: relay.addr(),
                trust: Trust::fingerprint_from_hex(relay.cert_fingerprint())?,
                issuer,
                store: Some(relay.store().clone()),
                pid: None,
            };
            let result = drive(opts, &target).await;
            relay.shutdown().await;
            result
        }
        RelayChoice::External {
            addr,
            fingerprint,
            token_key,
            pid,
        } => {
            let issuer = crate::external_issuer(addr, token_key)?;
            let target = Relay {
                addr: *addr,
                trust: Trust::fingerprint_from_hex(fingerprint)?,
                issuer,
                store: None,
                pid: *pid,
            };
            drive(opts, &target).await
        }
        RelayChoice::Cluster { .. } => {
            anyhow::bail!("the broadcast scenario drives one relay: give --relay a single address")
        }
    }
}

/// The relay a run drives.
struct Relay {
    addr: std::net::SocketAddr,
    trust: Trust,
    issuer: ptt_relay::auth::TokenIssuer,
    /// Its store when it runs in this process (offline followers are
    /// written there); `None`: they Follow over QUIC.
    store: Option<Arc<dyn ptt_relay::store::ClipStore>>,
    /// The process measured: `None` for this one (embedded relay).
    pid: Option<u32>,
}

/// Follows over QUIC at most this many at once (a separate relay).
const CONCURRENT_FOLLOWS: usize = 64;

async fn drive(opts: &BroadcastOptions, relay: &Relay) -> anyhow::Result<BroadcastReport> {
    let online = ((opts.followers as f64) * opts.online_fraction).round() as usize;
    let offline = opts.followers - online;
    let config = |user: &str| -> anyhow::Result<ClientConfig> {
        let token = relay
            .issuer
            .issue(user, Duration::from_secs(3600), false, false);
        Ok(ClientConfig::new(
            relay.addr,
            "localhost",
            relay.trust.clone(),
            token,
        ))
    };
    let endpoints = (0..opts.followers.div_ceil(opts.clients_per_endpoint.max(1)) + 1)
        .map(|_| {
            let socket = ptt_relay::net::udp_socket(([127, 0, 0, 1], 0).into())?;
            Ok(quinn::Endpoint::new(
                quinn::EndpointConfig::default(),
                None,
                socket,
                Arc::new(quinn::TokioRuntime),
            )?)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let endpoint = |i: usize| endpoints[i / opts.clients_per_endpoint.max(1)].clone();
    let sample = || sample_process(relay.pid);

    let (publisher, _publisher_events) =
        Client::connect_with_endpoint(endpoints[endpoints.len() - 1].clone(), config("owner")?)
            .await?;
    publisher.create_channel(CHANNEL, true).await?;
    publisher
        .set_channel_limits(
            CHANNEL,
            ChannelLimits {
                backlog_clips: 0,
                ..ChannelLimits::default()
            },
        )
        .await?;

    // Offline followers: records only (embedded), or a Follow each over
    // QUIC (a separate relay). Users online..followers.
    let rss0 = sample().map_or(0, |s| s.rss_kib);
    let mut set = tokio::task::JoinSet::new();
    for i in online..opts.followers {
        if set.len() >= CONCURRENT_FOLLOWS
            && let Some(done) = set.join_next().await
        {
            done??;
        }
        let user = format!("f{i}");
        match &relay.store {
            Some(store) => {
                let store = store.clone();
                set.spawn(async move {
                    store
                        .change_follower(CHANNEL, &user, FollowChange::Follow { start: 0 })
                        .await
                        .map(|_| ())
                        .map_err(anyhow::Error::from)
                });
            }
            None => {
                let (endpoint, config) = (endpoint(i), config(&user)?);
                set.spawn(async move {
                    let (client, _events) = Client::connect_with_endpoint(endpoint, config).await?;
                    client.follow(CHANNEL, "").await?;
                    client.close().await;
                    anyhow::Ok(())
                });
            }
        }
    }
    while let Some(done) = set.join_next().await {
        done??;
    }
    let rss1 = sample().map_or(0, |s| s.rss_kib);

    // Online followers: connect, Follow, Join.
    let inboxes: Inboxes = Arc::default();
    let mut readers = tokio::task::JoinSet::new();
    let mut clients: HashMap<usize, Client> = HashMap::new();
    for i in 0..online {
        let (client, events) =
            Client::connect_with_endpoint(endpoint(i), config(&format!("f{i}"))?).await?;
        client.follow(CHANNEL, "").await?;
        let joined = client.join(CHANNEL).await?;
        lock(&inboxes).entry(i).or_default().cursor = joined.cursor;
        readers.spawn(read(i, events, inboxes.clone()));
        clients.insert(i, client);
    }
    let rss2 = sample().map_or(0, |s| s.rss_kib);

    // Publish, with churn spread over the run.
    let cpu0 = sample().map_or(0.0, |s| s.cpu_s);
    let mut ends: BTreeMap<u64, Instant> = BTreeMap::new();
    let churn_every = opts.clips.max(1) as f64 / opts.churn.max(1) as f64;
    let mut churned = 0usize;
    let params = ClipParams::default();
    for c in 0..opts.clips {
        let started = Instant::now();
        let mut talk = publisher.talk(CHANNEL, params.clone()).await?;
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        for f in 0..opts.clip_frames {
            tick.tick().await;
            talk.send_frame(Bytes::from(vec![c as u8, f as u8, 0xfc, 1, 2, 3]))
                .await?;
        }
        let end = Instant::now();
        let stored = talk.finish(Bytes::new()).await?;
        ends.insert(stored.seq, end);
        // Churn: this clip's share of leavers and joiners.
        let due = (((c + 1) as f64 / churn_every) as usize).min(opts.churn);
        while churned < due {
            let leaver = churned;
            if let Some(client) = clients.remove(&leaver) {
                lock(&inboxes).entry(leaver).or_default().left = true;
                client.close().await;
            }
            let joiner = online + churned;
            if joiner < opts.followers {
                let (client, events) =
                    Client::connect_with_endpoint(endpoint(joiner), config(&format!("f{joiner}"))?)
                        .await?;
                let joined = client.join(CHANNEL).await?;
                lock(&inboxes).entry(joiner).or_default().cursor = joined.cursor;
                readers.spawn(read(joiner, events, inboxes.clone()));
                clients.insert(joiner, client);
            }
            churned += 1;
        }
        let next = started + opts.clip_interval;
        tokio::time::sleep_until(next.into()).await;
    }
    let last = ends.keys().next_back().copied().unwrap_or(0);

    // Settle: until every follower still joined has the last clip.
    let deadline = Instant::now() + opts.settle;
    while Instant::now() < deadline {
        let done = lock(&inboxes)
            .iter()
            .filter(|(_, b)| !b.left)
            .all(|(_, b)| b.got.contains_key(&last));
        if done {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let cpu1 = sample().map_or(0.0, |s| s.cpu_s);

    for client in clients.values() {
        client.close().await;
    }
    publisher.close().await;
    readers.shutdown().await;

    // Verify and measure.
    let inboxes = std::mem::take(&mut *lock(&inboxes));
    let (mut expected, mut missing, mut duplicate, mut total) = (0u64, 0u64, 0u64, 0u64);
    let mut per_clip_last: BTreeMap<u64, Duration> = BTreeMap::new();
    let mut per_delivery = new_histogram();
    for inbox in inboxes.values() {
        for (seq, arrivals) in &inbox.got {
            total += arrivals.len() as u64;
            if arrivals.len() > 1 {
                duplicate += arrivals.len() as u64 - 1;
            }
            if let (Some(&end), Some(&(at, live))) = (ends.get(seq), arrivals.first())
                && live
            {
                let d = at.saturating_duration_since(end);
                let _ = per_delivery.record(d.as_micros().max(1) as u64);
                let slot = per_clip_last.entry(*seq).or_default();
                *slot = (*slot).max(d);
            }
        }
        if inbox.left {
            continue;
        }
        for seq in inbox.cursor + 1..=last {
            expected += 1;
            if !inbox.got.contains_key(&seq) {
                missing += 1;
            }
        }
    }
    let mut per_clip = new_histogram();
    for d in per_clip_last.values() {
        let _ = per_clip.record(d.as_micros().max(1) as u64);
    }
    Ok(BroadcastReport {
        followers: opts.followers,
        online,
        clips: opts.clips,
        deliveries_expected: expected,
        deliveries_missing: missing,
        deliveries_duplicate: duplicate,
        deliveries_total: total,
        end_to_last_follower_ms: Summary::of(&per_clip),
        end_to_follower_ms: Summary::of(&per_delivery),
        cpu_us_per_delivered_clip: (cpu1 - cpu0) * 1e6 / total.max(1) as f64,
        rss_kib_per_online_follower: rss2.saturating_sub(rss1) as f64 / online.max(1) as f64,
        rss_bytes_per_offline_follower: rss1.saturating_sub(rss0) as f64 * 1024.0
            / offline.max(1) as f64,
        measured: match (relay.pid, relay.store.is_some()) {
            (Some(pid), _) => format!("relay process {pid}"),
            (None, true) => "relay and clients, one process".to_owned(),
            (None, false) => "the simulator alone: no --relay-pid".to_owned(),
        },
        failed: missing > 0 || duplicate > 0,
    })
}

/// Records every clip a follower receives whole, with whether it came
/// live.
async fn read(i: usize, mut events: Events, inboxes: Inboxes) {
    let mut live: HashMap<ptt_client::ClipId, bool> = HashMap::new();
    while let Some(event) = events.next().await {
        match event {
            Event::ClipStarted {
                clip_id, history, ..
            } => {
                live.insert(clip_id, !history);
            }
            Event::ClipEnded { clip_id, seq, .. } => {
                let was_live = live.remove(&clip_id).unwrap_or(false);
                lock(&inboxes)
                    .entry(i)
                    .or_default()
                    .got
                    .entry(seq)
                    .or_default()
                    .push((Instant::now(), was_live));
            }
            _ => {}
        }
    }
}
