//! The simulation: sets up groups, connects the clients over a few shared
//! quinn endpoints, lets talkers replay real Opus audio paced in real time,
//! records what every member receives, and hands it all to the verifier.
//!
//! Phases of one run:
//! 1. set-up: groups and members (through the store of an embedded relay,
//!    or admin control messages to a separate one);
//! 2. connect: the online clients connect at `connect_rate` per second and
//!    join their group;
//! 3. talk: for `duration`, talkers take turns; offline members connect
//!    after `offline_for`; faults (churn, loss, delay) apply;
//! 4. drain and settle: talkers finish their clip, then the run waits
//!    (at most `settle`) until every stored clip reached every member;
//! 5. stop: clients close; the verifier counts.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use ptt_client::{
    Client, ClientConfig, ClientError, ClipId, ClipParams, Event, Events, ReconnectPolicy, Trust,
    random_clip_id,
};
use ptt_protocol::GroupMode;
use ptt_relay::auth::TokenIssuer;
use ptt_relay::store::ClipStore;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::sync::watch;
use tokio::time::MissedTickBehavior;

use crate::audio::Audio;
use crate::lossy::{LossCounters, LossyMediaLink, LossySocket};
use crate::report::{ClientCounters, HostStats, NetworkCounters, NodeReport, RelayStats, Report};
use crate::scenario::MediaMode;
use crate::scenario::{Mode, Scenario};
use crate::stats::{FrameBatch, Metric, Recorder, Tick, sample_host, sample_process};
use crate::verify::{self, Digest, GroupIdx, Outcome, Received, SentClip, UNKNOWN_GROUP, UserIdx};

/// Where the relay is and how to get in.
pub struct Target {
    /// Its UDP address.
    pub addr: SocketAddr,
    /// SHA-256 of its certificate.
    pub fingerprint: [u8; 32],
    /// Signs tokens the relay accepts.
    pub issuer: Arc<TokenIssuer>,
    /// Its store, when it runs in this process (groups are created there
    /// directly); otherwise groups are created with admin messages.
    pub store: Option<Arc<dyn ClipStore>>,
    /// The process whose CPU and memory are measured: `Some(pid)` for a
    /// separate relay, `None` for this process (embedded relay).
    pub pid: Option<u32>,
    /// Whether the relay runs in this process.
    pub embedded: bool,
    /// Every node clients connect to (the first is `addr`): one for a
    /// single relay, several for a cluster (`--relay A,B`).
    pub nodes: Vec<Node>,
}

/// One relay node clients connect to.
#[derive(Debug, Clone, Copy)]
pub struct Node {
    /// Its UDP address.
    pub addr: SocketAddr,
    /// SHA-256 of its certificate.
    pub fingerprint: [u8; 32],
    /// Its process, to measure (a separate relay's).
    pub pid: Option<u32>,
}

impl Target {
    /// The nodes clients connect to: [`Target::nodes`], or the one at
    /// `addr` if that list is empty.
    fn client_nodes(&self) -> Vec<Node> {
        if self.nodes.is_empty() {
            vec![Node {
                addr: self.addr,
                fingerprint: self.fingerprint,
                pid: self.pid,
            }]
        } else {
            self.nodes.clone()
        }
    }
}

/// What the clients of one node did.
#[derive(Debug, Default)]
struct NodeCounters {
    /// Clients whose (last) connection went to this node.
    connected: AtomicU64,
    /// Frames those clients received.
    frames: AtomicU64,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("addr", &self.addr)
            .field("embedded", &self.embedded)
            .field("pid", &self.pid)
            .field("nodes", &self.nodes.len())
            .finish_non_exhaustive()
    }
}

/// Hooks for showing progress.
pub trait Progress: Send + Sync {
    /// A new phase began.
    fn phase(&self, name: &str, len: u64);
    /// Progress within the phase, with a status line.
    fn update(&self, pos: u64, msg: String);
    /// The run is over.
    fn finish(&self);
}

/// Progress that shows nothing.
#[derive(Debug)]
pub struct Silent;

impl Progress for Silent {
    fn phase(&self, _: &str, _: u64) {}
    fn update(&self, _: u64, _: String) {}
    fn finish(&self) {}
}

/// One group of the run.
#[derive(Debug, Clone)]
struct GroupDef {
    name: String,
    mode: GroupMode,
    members: Vec<UserIdx>,
}

/// What a receiver must know about a clip it receives: when each frame
/// was sent (ns since the run's base instant, 0 = not yet).
#[derive(Debug)]
struct ClipRecord {
    talker: UserIdx,
    started: Instant,
    sent_ns: Box<[AtomicU64]>,
    finished_ns: AtomicU64,
}

#[derive(Debug, Default)]
struct Counters {
    connected: AtomicU64,
    connect_failures: AtomicU64,
    connect_retries: AtomicU64,
    online_now: AtomicU64,
    clips_started: AtomicU64,
    frames_sent: AtomicU64,
    frames_received: AtomicU64,
    /// Distinct (member, clip) completions at members other than the talker.
    completions: AtomicU64,
    /// Deliveries the stored clips so far call for.
    expected: AtomicU64,
    floor_denied: AtomicU64,
    partial: AtomicU64,
    disconnects: AtomicU64,
    reconnects: AtomicU64,
    churn_drops: AtomicU64,
    rebinds: AtomicU64,
    gaps: AtomicU64,
    rejoin_failed: AtomicU64,
    orphan_frames: AtomicU64,
    overlapping_streams: AtomicU64,
    errors: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

fn get(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

/// Everything the client tasks share.
struct Sim {
    scenario: Scenario,
    audio: Audio,
    base: Instant,
    /// The relay nodes; user `u` connects first to node `u % len`.
    nodes: Vec<Node>,
    by_node: Vec<NodeCounters>,
    issuer: Arc<TokenIssuer>,
    users: Vec<String>,
    user_group: Vec<GroupIdx>,
    groups: Vec<GroupDef>,
    group_index: HashMap<String, GroupIdx>,
    registry: Mutex<HashMap<ClipId, Arc<ClipRecord>>>,
    sent: Mutex<Vec<SentClip>>,
    recorder: Recorder,
    counters: Counters,
    errors: Mutex<Vec<String>>,
    /// When talking starts (set once, before `go` fires).
    talk_start: Mutex<Option<Instant>>,
    talkers_busy: AtomicUsize,
    /// A hostile member's user id, whose clips are not verified.
    intruder: Option<String>,
    /// The media sockets shared by the clients of each endpoint (none:
    /// one per client).
    media_sockets: Vec<Arc<ptt_client::MediaSocket>>,
}

impl Sim {
    fn error(&self, text: String) {
        bump(&self.counters.errors);
        let mut e = self.errors.lock().unwrap_or_else(|p| p.into_inner());
        if e.len() < 30 {
            tracing::debug!("{text}");
            e.push(text);
        }
    }

    fn ns(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.base).as_nanos().max(1) as u64
    }

    fn record(&self, clip: ClipId) -> Option<Arc<ClipRecord>> {
        self.registry
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&clip)
            .cloned()
    }

    fn talk_deadline(&self) -> Instant {
        self.talk_start
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map(|t| t + self.scenario.duration)
            .unwrap_or_else(Instant::now)
    }

    fn is_talker(&self, user: UserIdx) -> bool {
        let g = &self.groups[self.user_group[user as usize] as usize];
        let pos = g.members.iter().position(|&m| m == user).unwrap_or(0);
        pos < self.talkers_in(g)
    }

    fn talkers_in(&self, g: &GroupDef) -> usize {
        self.scenario.talkers_per_group.min(g.members.len())
    }

    fn is_offline(&self, user: UserIdx) -> bool {
        let g = &self.groups[self.user_group[user as usize] as usize];
        let pos = g.members.iter().position(|&m| m == user).unwrap_or(0);
        let offline = self
            .scenario
            .offline_per_group
            .min(g.members.len() - self.talkers_in(g));
        pos >= g.members.len() - offline
    }

    /// How a member reads: the members right after the talkers are the
    /// stalled ones, then the slow ones (`stalled_per_group`,
    /// `slow_per_group`); never an offline member.
    fn reading(&self, user: UserIdx) -> Reading {
        if self.is_offline(user) {
            return Reading::Normal;
        }
        let g = &self.groups[self.user_group[user as usize] as usize];
        let pos = g.members.iter().position(|&m| m == user).unwrap_or(0);
        let talkers = self.talkers_in(g);
        let f = &self.scenario.faults;
        match pos.checked_sub(talkers) {
            Some(k) if k < f.stalled_per_group => Reading::Stalled,
            Some(k) if k < f.stalled_per_group + f.slow_per_group => Reading::Slow,
            _ => Reading::Normal,
        }
    }

    /// Members of group `g` whose deliveries are checked (all but the
    /// stalled).
    fn checked_members(&self, g: &GroupDef) -> Vec<UserIdx> {
        g.members
            .iter()
            .copied()
            .filter(|&m| self.reading(m) != Reading::Stalled)
            .collect()
    }

    /// The node user `user` connects to at its `attempt`th try (1, 2, …):
    /// round-robin over the members of a group, starting one node further
    /// with each group (member `k` of group `j` on node `(j + k) mod n`, so
    /// that talkers, the first members, are spread too), and the next node
    /// after a failed attempt.
    fn node_for(&self, user: UserIdx, attempt: u64) -> usize {
        let j = self.user_group[user as usize];
        let k = self.groups[j as usize]
            .members
            .iter()
            .position(|&m| m == user)
            .unwrap_or(0);
        (j as usize + k + attempt.saturating_sub(1) as usize) % self.nodes.len()
    }

    fn client_config(&self, user: UserIdx, node: usize) -> ClientConfig {
        let token = self.issuer.issue(
            &self.users[user as usize],
            Duration::from_secs(24 * 3600),
            false,
            false,
        );
        let node = self.nodes[node];
        let mut c = ClientConfig::new(
            node.addr,
            "localhost",
            Trust::Fingerprint(node.fingerprint),
            token,
        )
        .with_client_name("client-sim")
        .with_reconnect(ReconnectPolicy {
            initial_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(2),
            multiplier: 2.0,
            jitter: true,
            max_attempts: Some(60),
        });
        c.connect_timeout = Duration::from_secs(15);
        c.request_timeout = Duration::from_secs(15);
        c.transport.ask_fewer_acks = self.scenario.upload_ack_frequency;
        c.media = self.scenario.media == MediaMode::Udp;
        c.media_socket = self
            .media_sockets
            .get(user as usize / self.scenario.clients_per_endpoint)
            .cloned();
        let f = &self.scenario.faults;
        if c.media && f.needs_lossy_socket() {
            c.media_link = Some(Arc::new(LossyMediaLink::new(
                f.seed.wrapping_mul(7_000_003).wrapping_add(u64::from(user)),
                f.loss,
                f.delay,
                f.jitter,
            )));
        }
        c
    }
}

/// How a simulated member reads its events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reading {
    /// As they come.
    Normal,
    /// Each `slow_delay` late (`slow_per_group`).
    Slow,
    /// Never (`stalled_per_group`).
    Stalled,
}

/// What one client task hands back.
#[derive(Debug, Default)]
struct ClientResult {
    received: Vec<Received>,
    stats: Option<ptt_client::ClientStats>,
}

/// Makes the client endpoints: one UDP socket per `clients_per_endpoint`
/// clients, wrapped in the lossy socket when the scenario has network
/// faults.
fn endpoints(
    scenario: &Scenario,
    count: usize,
) -> anyhow::Result<(Vec<quinn::Endpoint>, Vec<Arc<LossCounters>>)> {
    let n = count.div_ceil(scenario.clients_per_endpoint).max(1);
    let mut out = Vec::with_capacity(n);
    let mut counters = Vec::new();
    for k in 0..n {
        // Hundreds of connections share the socket: give it room for the
        // bursts of a fan-out, as the relay does for its own.
        let socket = ptt_relay::net::udp_socket(([127, 0, 0, 1], 0).into())
            .context("binding a client socket")?;
        let runtime = Arc::new(quinn::TokioRuntime);
        let endpoint = if scenario.faults.needs_lossy_socket() {
            let f = &scenario.faults;
            let lossy = LossySocket::wrap_with(
                socket,
                f.seed.wrapping_mul(1_000_003).wrapping_add(k as u64),
                f.network(),
            )?;
            counters.push(lossy.counters());
            quinn::Endpoint::new_with_abstract_socket(
                quinn::EndpointConfig::default(),
                None,
                lossy,
                runtime,
            )?
        } else {
            quinn::Endpoint::new(quinn::EndpointConfig::default(), None, socket, runtime)?
        };
        out.push(endpoint);
    }
    Ok((out, counters))
}

/// The media sockets shared by the clients of each endpoint, when they
/// take the UDP media path (each client's `LossyMediaLink`, if the
/// scenario has network faults, still applies to its own datagrams).
fn media_sockets(
    scenario: &Scenario,
    count: usize,
) -> anyhow::Result<Vec<Arc<ptt_client::MediaSocket>>> {
    if scenario.media != MediaMode::Udp || !scenario.shared_media_socket {
        return Ok(Vec::new());
    }
    (0..count.div_ceil(scenario.clients_per_endpoint).max(1))
        .map(|_| {
            // A fan-out's burst for hundreds of clients lands on it at
            // once: as much buffer as the endpoints get.
            let socket = ptt_relay::net::udp_socket(([127, 0, 0, 1], 0).into())
                .context("binding a media socket")?;
            ptt_client::MediaSocket::new(socket).context("sharing a media socket")
        })
        .collect()
}

/// Switches the client sockets to new ports at random while the clients
/// talk (`faults.rebinds` per socket per minute): each switch rebinds one
/// endpoint, and every connection on it migrates. Returns the lossy
/// sockets' counters of the new sockets.
async fn rebind_loop(sim: Arc<Sim>, endpoints: Vec<quinn::Endpoint>) -> Vec<Arc<LossCounters>> {
    let f = &sim.scenario.faults;
    let mut added = Vec::new();
    if f.rebinds <= 0.0 || endpoints.is_empty() {
        return added;
    }
    let mut rng = SmallRng::seed_from_u64(f.seed ^ 0x4eb1_d5c0_ffee);
    let per_s = f.rebinds * endpoints.len() as f64 / 60.0;
    let deadline = sim.talk_deadline();
    loop {
        let gap = -(1.0 - rng.random::<f64>()).ln() / per_s;
        let at = Instant::now() + Duration::from_secs_f64(gap.min(3600.0));
        if at >= deadline {
            return added;
        }
        tokio::time::sleep_until(at.into()).await;
        let k = rng.random_range(0..endpoints.len());
        match rebind(&sim.scenario, &endpoints[k], rng.random()) {
            Ok(counters) => {
                added.extend(counters);
                bump(&sim.counters.rebinds);
            }
            Err(e) => sim.error(format!("rebinding client socket {k}: {e:#}")),
        }
    }
}

/// Moves `endpoint` to a new UDP socket on a new port (wrapped like the
/// first one); its connections migrate.
fn rebind(
    scenario: &Scenario,
    endpoint: &quinn::Endpoint,
    seed: u64,
) -> anyhow::Result<Option<Arc<LossCounters>>> {
    let socket = ptt_relay::net::udp_socket(([127, 0, 0, 1], 0).into())
        .context("binding a new client socket")?;
    if scenario.faults.needs_lossy_socket() {
        let lossy = LossySocket::wrap_with(socket, seed, scenario.faults.network())?;
        let counters = lossy.counters();
        endpoint.rebind_abstract(lossy)?;
        Ok(Some(counters))
    } else {
        endpoint.rebind(socket)?;
        Ok(None)
    }
}

/// Creates the groups: directly in an in-process store, or with admin
/// control messages over a few parallel admin connections.
async fn create_groups(target: &Target, sim: &Sim) -> anyhow::Result<()> {
    let max_clip_ms = 60_000;
    if let Some(store) = &target.store {
        for g in &sim.groups {
            ptt_relay::admin::create_group(&**store, &g.name, g.mode, max_clip_ms)
                .await
                .with_context(|| format!("creating group {}", g.name))?;
            for &m in &g.members {
                ptt_relay::admin::add_member(&**store, &g.name, &sim.users[m as usize])
                    .await
                    .with_context(|| format!("adding a member to {}", g.name))?;
            }
        }
        return Ok(());
    }
    const ADMINS: usize = 8;
    let token = target
        .issuer
        .issue("client-sim-admin", Duration::from_secs(3600), true, false);
    let config = ClientConfig::new(
        target.addr,
        "localhost",
        Trust::Fingerprint(target.fingerprint),
        token,
    );
    let mut tasks = tokio::task::JoinSet::new();
    for a in 0..ADMINS.min(sim.groups.len()) {
        let groups: Vec<(GroupDef, Vec<String>)> = sim
            .groups
            .iter()
            .skip(a)
            .step_by(ADMINS)
            .map(|g| {
                let names = g
                    .members
                    .iter()
                    .map(|&m| sim.users[m as usize].clone())
                    .collect();
                (g.clone(), names)
            })
            .collect();
        let config = config.clone();
        tasks.spawn(async move {
            let (client, _events) = Client::connect(config)
                .await
                .context("connecting the admin client")?;
            for (g, members) in groups {
                client
                    .create_group(&g.name, g.mode)
                    .await
                    .with_context(|| format!("creating group {}", g.name))?;
                for m in members {
                    client
                        .add_member(&g.name, &m)
                        .await
                        .with_context(|| format!("adding {m} to {}", g.name))?;
                }
            }
            client.close().await;
            anyhow::Ok(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    Ok(())
}

/// Makes the intruder a member of its group and announces the group.
async fn add_intruder(target: &Target, sim: &Sim, intruder: &Intruder) -> anyhow::Result<()> {
    let Some(group) = sim
        .groups
        .iter()
        .find(|g| g.mode == GroupMode::Notes)
        .or(sim.groups.first())
    else {
        return Ok(());
    };
    if let Some(store) = &target.store {
        ptt_relay::admin::add_member(&**store, &group.name, &intruder.user)
            .await
            .context("adding the intruder")?;
    } else {
        let token = target
            .issuer
            .issue("client-sim-admin", Duration::from_secs(3600), true, false);
        let config = ClientConfig::new(
            target.addr,
            "localhost",
            Trust::Fingerprint(target.fingerprint),
            token,
        );
        let (client, _events) = Client::connect(config)
            .await
            .context("connecting the admin client")?;
        client
            .add_member(&group.name, &intruder.user)
            .await
            .context("adding the intruder")?;
        client.close().await;
    }
    intruder.group.send_replace(Some(group.name.clone()));
    Ok(())
}

/// A random duration, log-uniform between `min` and `max`.
fn log_uniform(rng: &mut SmallRng, min: Duration, max: Duration) -> Duration {
    if max <= min {
        return min;
    }
    let (a, b) = (min.as_secs_f64().ln(), max.as_secs_f64().ln());
    Duration::from_secs_f64(rng.random_range(a..b).exp())
}

fn uniform(rng: &mut SmallRng, min: Duration, max: Duration) -> Duration {
    if max <= min {
        return min;
    }
    Duration::from_secs_f64(rng.random_range(min.as_secs_f64()..max.as_secs_f64()))
}

/// A hostile user (a flood, [`crate::flood`]) made a member of one group
/// of the run: the first notes group (walkie floors would hold the
/// normal talkers back), else the first. The receivers leave its clips
/// out of the verdict.
#[derive(Debug)]
pub struct Intruder {
    /// Its user id.
    pub user: String,
    /// Set to the group's name once it exists.
    pub group: watch::Sender<Option<String>>,
}

/// Runs the scenario once against `target`.
pub async fn run_once(
    scenario: &Scenario,
    target: &Target,
    audio: &Audio,
    progress: &dyn Progress,
) -> anyhow::Result<Report> {
    run_once_with(scenario, target, audio, progress, None).await
}

/// [`run_once`] with a hostile member in one group.
pub async fn run_once_with(
    scenario: &Scenario,
    target: &Target,
    audio: &Audio,
    progress: &dyn Progress,
    intruder: Option<&Intruder>,
) -> anyhow::Result<Report> {
    let wall = Instant::now();
    let prefix = format!("s{:06x}", rand::random::<u32>() & 0xff_ffff);
    let sizes = scenario.group_sizes();
    let mut users = Vec::with_capacity(scenario.clients);
    let mut user_group = Vec::with_capacity(scenario.clients);
    let mut groups = Vec::with_capacity(sizes.len());
    for (j, &size) in sizes.iter().enumerate() {
        let mode = match scenario.mode {
            Mode::Walkie => GroupMode::Walkie,
            Mode::Notes => GroupMode::Notes,
            Mode::Mixed if j % 2 == 0 => GroupMode::Walkie,
            Mode::Mixed => GroupMode::Notes,
        };
        let mut members = Vec::with_capacity(size);
        for _ in 0..size {
            let i = users.len() as UserIdx;
            users.push(format!("{prefix}-u{i}"));
            user_group.push(j as GroupIdx);
            members.push(i);
        }
        groups.push(GroupDef {
            name: format!("{prefix}-g{j}"),
            mode,
            members,
        });
    }
    let group_index = groups
        .iter()
        .enumerate()
        .map(|(j, g)| (g.name.clone(), j as GroupIdx))
        .collect();
    let nodes = target.client_nodes();
    let sim = Arc::new(Sim {
        scenario: scenario.clone(),
        audio: audio.clone(),
        base: Instant::now(),
        by_node: nodes.iter().map(|_| NodeCounters::default()).collect(),
        nodes,
        issuer: target.issuer.clone(),
        users,
        user_group,
        groups,
        group_index,
        registry: Mutex::new(HashMap::new()),
        sent: Mutex::new(Vec::new()),
        recorder: Recorder::new(),
        counters: Counters::default(),
        errors: Mutex::new(Vec::new()),
        talk_start: Mutex::new(None),
        talkers_busy: AtomicUsize::new(0),
        intruder: intruder.map(|i| i.user.clone()),
        media_sockets: media_sockets(scenario, scenario.clients)?,
    });

    progress.phase("set-up", sim.groups.len() as u64);
    create_groups(target, &sim).await?;
    if let Some(intruder) = intruder {
        add_intruder(target, &sim, intruder).await?;
    }

    let before = sample_process(target.pid);
    let nodes_before: Vec<_> = sim.nodes.iter().map(|n| sample_process(n.pid)).collect();
    let (endpoints, mut loss_counters) = endpoints(scenario, scenario.clients)?;
    let (go_tx, go_rx) = watch::channel(false);
    let (stop_tx, stop_rx) = watch::channel(false);

    // Connect the online clients.
    let n = sim.users.len();
    let online: Vec<UserIdx> = (0..n as UserIdx).filter(|&u| !sim.is_offline(u)).collect();
    let offline: Vec<UserIdx> = (0..n as UserIdx).filter(|&u| sim.is_offline(u)).collect();
    progress.phase("connecting", online.len() as u64);
    let mut tasks = tokio::task::JoinSet::new();
    let mut pace = tokio::time::interval(Duration::from_secs_f64(
        1.0 / f64::from(scenario.connect_rate),
    ));
    pace.set_missed_tick_behavior(MissedTickBehavior::Burst);
    let connect_bound =
        Duration::from_secs_f64(online.len() as f64 / f64::from(scenario.connect_rate))
            + Duration::from_secs(30);
    let connect_deadline = Instant::now() + connect_bound;
    for &u in &online {
        pace.tick().await;
        let endpoint = endpoints[u as usize / scenario.clients_per_endpoint].clone();
        tasks.spawn(client_task(
            sim.clone(),
            u,
            endpoint,
            Duration::ZERO,
            go_rx.clone(),
            stop_rx.clone(),
        ));
        let done = get(&sim.counters.connected) + get(&sim.counters.connect_failures);
        progress.update(done, format!("{done}/{} connected", online.len()));
    }
    loop {
        let done = get(&sim.counters.connected) + get(&sim.counters.connect_failures);
        progress.update(done, format!("{done}/{} connected", online.len()));
        if done >= online.len() as u64 || Instant::now() > connect_deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Let the joins settle before measuring the relay's memory.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let connected = sample_process(target.pid);
    let nodes_connected: Vec<_> = sim.nodes.iter().map(|n| sample_process(n.pid)).collect();
    let sim_cpu_start = sample_process(None);
    let host_start = sample_host();
    let connected_clients = get(&sim.counters.connected);

    // Talk.
    let talk_start = Instant::now();
    *sim.talk_start.lock().unwrap_or_else(|p| p.into_inner()) = Some(talk_start);
    let _ = go_tx.send(true);
    let rebinder = tokio::spawn(rebind_loop(sim.clone(), endpoints.clone()));
    for &u in &offline {
        let endpoint = endpoints[u as usize / scenario.clients_per_endpoint].clone();
        tasks.spawn(client_task(
            sim.clone(),
            u,
            endpoint,
            scenario.offline_for,
            go_rx.clone(),
            stop_rx.clone(),
        ));
    }
    let mut timeline: Vec<Tick> = Vec::new();
    let mut tick = tokio::time::interval_at(
        tokio::time::Instant::now() + Duration::from_secs(1),
        Duration::from_secs(1),
    );
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let secs = scenario.duration.as_secs().max(1);
    progress.phase("talking", secs);
    let status = |sim: &Sim, t: &Tick| {
        format!(
            "{} online, {} clips, {} frames/s, p99 {:.1} ms, {} failed conn.",
            get(&sim.counters.online_now),
            get(&sim.counters.clips_started),
            t.frames,
            t.p99,
            get(&sim.counters.connect_failures),
        )
    };
    // Talkers stop starting clips at the deadline, then finish the clip
    // they are in (at most clip_max plus the store confirmation).
    let drain_bound = scenario.duration + scenario.clip_max + Duration::from_secs(30);
    let mut talk_end = None;
    loop {
        tick.tick().await;
        let t = talk_start.elapsed();
        let tk = sim.recorder.take_tick(t.as_secs_f64().round());
        progress.update(t.as_secs().min(secs), status(&sim, &tk));
        timeline.push(tk);
        let offline_joined = offline.is_empty() || t >= scenario.offline_for;
        if t >= scenario.duration && offline_joined && sim.talkers_busy.load(Ordering::Relaxed) == 0
        {
            talk_end = Some(Instant::now());
            break;
        }
        if t >= drain_bound {
            sim.error(format!(
                "{} talkers still busy {:?} after the end of talking",
                sim.talkers_busy.load(Ordering::Relaxed),
                t - scenario.duration
            ));
            break;
        }
    }
    let talk_end = talk_end.unwrap_or_else(Instant::now);
    // It stops by itself at the end of the talking.
    match rebinder.await {
        Ok(counters) => loss_counters.extend(counters),
        Err(e) => sim.error(format!("the rebinding task failed: {e}")),
    }

    // Settle: wait until every stored clip reached every member.
    progress.phase("settling", scenario.settle.as_secs().max(1));
    let settle_start = Instant::now();
    loop {
        let expected = get(&sim.counters.expected);
        let done = get(&sim.counters.completions);
        if done >= expected || settle_start.elapsed() >= scenario.settle {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        progress.update(
            settle_start.elapsed().as_secs(),
            format!("{done}/{expected} deliveries complete"),
        );
    }
    // A moment for late duplicates to show up.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let settled = Instant::now();
    let tk = sim
        .recorder
        .take_tick(talk_start.elapsed().as_secs_f64().round());
    timeline.push(tk);
    let after = sample_process(target.pid);
    let nodes_after: Vec<_> = sim.nodes.iter().map(|n| sample_process(n.pid)).collect();
    let sim_cpu = sim_cpu_start
        .zip(sample_process(None))
        .map(|(a, b)| b.cpu_s - a.cpu_s);
    let host = host_start.zip(sample_host()).map(|(a, b)| {
        let wall = settled
            .saturating_duration_since(talk_start)
            .as_secs_f64()
            .max(1e-3);
        let busy = (b.busy_s - a.busy_s) / wall;
        let ours = if target.embedded {
            sim_cpu
        } else if sim.nodes.len() > 1 {
            // A cluster: every node's CPU and the simulator's.
            let mut total = sim_cpu;
            for (c, a) in nodes_connected.iter().zip(&nodes_after) {
                total = total
                    .zip(c.zip(*a))
                    .map(|(t, (c, a))| t + a.cpu_s - c.cpu_s);
            }
            total
        } else {
            connected
                .zip(after)
                .zip(sim_cpu)
                .map(|((c, a), s)| a.cpu_s - c.cpu_s + s)
        };
        HostStats {
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            loadavg: (a.loadavg, b.loadavg),
            busy_cores: busy,
            other_cores: ours.map(|o| (busy - o / wall).max(0.0)),
        }
    });

    // Stop.
    progress.phase("closing", 1);
    let _ = stop_tx.send(true);
    let mut received = Vec::new();
    let mut client_stats = ClientCounters::default();
    let close_deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match tokio::time::timeout_at(close_deadline, tasks.join_next()).await {
            Ok(Some(Ok(r))) => {
                received.extend(r.received);
                if let Some(s) = r.stats {
                    client_stats.add(&s);
                }
            }
            Ok(Some(Err(e))) => sim.error(format!("a client task failed: {e}")),
            Ok(None) => break,
            Err(_) => {
                sim.error("clients did not close within 30 s".into());
                tasks.abort_all();
                break;
            }
        }
    }
    progress.finish();
    for e in &endpoints {
        e.close(0u32.into(), b"done");
    }

    // Verify.
    // Stalled members never read: their deliveries are not checked.
    let members: Vec<Vec<UserIdx>> = sim.groups.iter().map(|g| sim.checked_members(g)).collect();
    let sent = std::mem::take(&mut *sim.sent.lock().unwrap_or_else(|p| p.into_inner()));
    let verdict = verify::verify(&members, &sent, &received);

    let c = &sim.counters;
    client_stats.floor_denied = get(&c.floor_denied);
    client_stats.disconnects = get(&c.disconnects);
    client_stats.reconnect_events = get(&c.reconnects);
    client_stats.churn_drops = get(&c.churn_drops);
    client_stats.rebinds = get(&c.rebinds);
    client_stats.gaps = get(&c.gaps);
    client_stats.rejoin_failed = get(&c.rejoin_failed);
    client_stats.orphan_frames = get(&c.orphan_frames);
    client_stats.overlapping_streams = get(&c.overlapping_streams);
    client_stats.errors = get(&c.errors);

    let frames_delivered = get(&c.frames_received);
    let active = talk_end
        .saturating_duration_since(talk_start)
        .max(Duration::from_millis(1));
    let relay = RelayStats::from_samples(
        target.pid,
        target.embedded,
        before,
        connected,
        after,
        connected_clients,
        frames_delivered,
    );
    // Per node, for a cluster: the clients it held, the frames it
    // delivered to them, its CPU per delivered frame.
    let nodes = if sim.nodes.len() > 1 {
        sim.nodes
            .iter()
            .zip(&sim.by_node)
            .enumerate()
            .map(|(k, (node, counters))| {
                let clients = get(&counters.connected);
                let frames = get(&counters.frames);
                NodeReport {
                    addr: node.addr.to_string(),
                    clients_connected: clients,
                    frames_delivered: frames,
                    relay: RelayStats::from_samples(
                        node.pid,
                        false,
                        nodes_before[k],
                        nodes_connected[k],
                        nodes_after[k],
                        clients,
                        frames,
                    ),
                }
            })
            .collect()
    } else {
        Vec::new()
    };
    let network = (!loss_counters.is_empty()).then(|| {
        let mut n = NetworkCounters::default();
        for c in &loss_counters {
            let (s, sd, r, rd) = c.snapshot();
            n.sent += s;
            n.sent_dropped += sd;
            n.received += r;
            n.received_dropped += rd;
            let (reordered, duplicated) = c.reordered_duplicated();
            n.reordered += reordered;
            n.duplicated += duplicated;
        }
        n
    });
    let errors = sim.errors.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let latency = sim
        .recorder
        .summaries()
        .into_iter()
        .map(|(m, s)| (m.key().to_owned(), s))
        .collect();
    let frame_hist = sim.recorder.histogram(Metric::Frame);
    Ok(Report {
        scenario: scenario.name.clone(),
        relay_mode: if target.embedded {
            "embedded"
        } else {
            "external"
        }
        .into(),
        relay_addr: sim
            .nodes
            .iter()
            .map(|n| n.addr.to_string())
            .collect::<Vec<_>>()
            .join(","),
        nodes,
        clients: scenario.clients,
        clients_connected: get(&c.connected),
        connect_failures: get(&c.connect_failures),
        connect_retries: get(&c.connect_retries),
        groups: sim.groups.len(),
        group_size: scenario.group_size,
        mode: format!("{:?}", scenario.mode).to_lowercase(),
        talkers_per_group: scenario.talkers_per_group,
        endpoints: endpoints.len(),
        duration_s: active.as_secs_f64(),
        settle_s: settled.saturating_duration_since(talk_end).as_secs_f64(),
        elapsed_s: wall.elapsed().as_secs_f64(),
        verdict: verdict.clone(),
        partial_deliveries: get(&c.partial),
        frames_sent: get(&c.frames_sent),
        frames_delivered,
        frames_per_s: frames_delivered as f64 / active.as_secs_f64(),
        latency_ms: latency,
        relay,
        simulator_cpu_s: sim_cpu,
        host,
        faults: scenario.faults.clone(),
        network,
        client: client_stats,
        timeline,
        failure_examples: verdict.examples.clone(),
        errors,
        failed: verdict.failures() > 0 || get(&c.connect_failures) > 0,
        frame_histogram: crate::report::histogram_buckets(&frame_hist),
    })
}

/// Waits until the flag is raised (or its sender is gone).
async fn set(flag: &mut watch::Receiver<bool>) {
    let _ = flag.wait_for(|v| *v).await;
}

/// One simulated user: connect (after `delay` for offline members), join,
/// receive; talk if a talker; close when told to stop.
async fn client_task(
    sim: Arc<Sim>,
    user: UserIdx,
    endpoint: quinn::Endpoint,
    delay: Duration,
    mut go: watch::Receiver<bool>,
    mut stop: watch::Receiver<bool>,
) -> ClientResult {
    if !delay.is_zero() {
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = set(&mut stop) => return ClientResult::default(),
        }
    }
    let group_idx = sim.user_group[user as usize];
    let group_name = sim.groups[group_idx as usize].name.clone();
    let reading = ReadingPlan::of(&sim, user);
    let receiving = Arc::new(Receiving {
        state: Mutex::new(None),
        stop: stop.clone(),
    });
    let sink = (sim.scenario.event_sink && !reading.slow && !reading.stalled)
        .then(|| receiving.clone() as Arc<dyn ptt_client::EventSink>);
    let mut attempt = 0;
    let (client, events, node) = loop {
        attempt += 1;
        let t0 = Instant::now();
        let node = sim.node_for(user, attempt);
        let mut config = sim.client_config(user, node);
        config.event_sink = sink.clone();
        match Client::connect_with_endpoint(endpoint.clone(), config).await {
            Ok((client, events)) => {
                sim.recorder.record(Metric::Connect, t0.elapsed());
                bump(&sim.counters.connected);
                bump(&sim.by_node[node].connected);
                break (client, events, node);
            }
            Err(e) if attempt < 3 => {
                bump(&sim.counters.connect_retries);
                sim.error(format!(
                    "user {user}: connect attempt {attempt} failed: {e}"
                ));
                tokio::time::sleep(Duration::from_millis(500 * attempt)).await;
            }
            Err(e) => {
                sim.error(format!("user {user}: giving up connecting: {e}"));
                bump(&sim.counters.connect_failures);
                return ClientResult::default();
            }
        }
    };
    sim.counters.online_now.fetch_add(1, Ordering::Relaxed);
    let joined_at = Instant::now();
    *lock_rx(&receiving.state) = Some(Receiver::new(sim.clone(), user, group_idx, joined_at, node));
    let events = sink.is_none().then_some(events);
    let rx_task = tokio::spawn(receiving.run(reading, client.clone(), events, stop.clone()));
    if let Err(e) = client.join(&group_name).await {
        sim.error(format!("user {user}: join {group_name} failed: {e}"));
    }
    let talker = sim.is_talker(user) && !sim.scenario.clip_max.is_zero();
    if talker {
        sim.talkers_busy.fetch_add(1, Ordering::Relaxed);
        set(&mut go).await;
        talk_loop(&sim, &client, user, group_idx).await;
        sim.talkers_busy.fetch_sub(1, Ordering::Relaxed);
    }
    set(&mut stop).await;
    let stats = client.stats();
    let _ = tokio::time::timeout(Duration::from_secs(5), client.close()).await;
    let received = match rx_task.await {
        Ok(r) => r,
        Err(e) => {
            sim.error(format!("user {user}: receiver task failed: {e}"));
            Vec::new()
        }
    };
    sim.counters.online_now.fetch_sub(1, Ordering::Relaxed);
    ClientResult {
        received,
        stats: Some(stats),
    }
}

/// A talker: clips separated by think time until the talking ends.
async fn talk_loop(sim: &Sim, client: &Client, user: UserIdx, group_idx: GroupIdx) {
    let s = &sim.scenario;
    let group = &sim.groups[group_idx as usize];
    let mut rng = SmallRng::seed_from_u64(s.faults.seed ^ (u64::from(user) << 20) ^ 0x7a1c);
    let deadline = sim.talk_deadline();
    let recipients = sim.checked_members(group).len() as u64 - 1;
    let frame = Duration::from_millis(u64::from(sim.audio.frame_ms));
    // Start at a random point of the first think time so talkers do not
    // all press at once.
    tokio::time::sleep(uniform(&mut rng, Duration::ZERO, s.think_max)).await;
    while Instant::now() < deadline {
        let length = log_uniform(&mut rng, s.clip_min, s.clip_max);
        let frames = (length.as_millis() as u32 / sim.audio.frame_ms).max(1);
        if group.mode == GroupMode::Walkie {
            let press = Instant::now();
            match client.request_floor(&group.name, false).await {
                Ok(_) => sim.recorder.record(Metric::FloorGrant, press.elapsed()),
                Err(ClientError::FloorDenied { .. }) => {
                    bump(&sim.counters.floor_denied);
                    tokio::time::sleep(uniform(
                        &mut rng,
                        Duration::from_millis(200),
                        Duration::from_millis(800),
                    ))
                    .await;
                    continue;
                }
                Err(e) => {
                    sim.error(format!("user {user}: floor request failed: {e}"));
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            }
        }
        let clip_id = random_clip_id();
        let start = rng.random_range(0..sim.audio.packets.len());
        let record = Arc::new(ClipRecord {
            talker: user,
            started: Instant::now(),
            sent_ns: (0..frames).map(|_| AtomicU64::new(0)).collect(),
            finished_ns: AtomicU64::new(0),
        });
        sim.registry
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(clip_id, record.clone());
        bump(&sim.counters.clips_started);
        let digest = sim.audio.digest(start, frames);
        let outcome = talk_one(
            sim, client, user, group, clip_id, start, frames, &record, &mut rng, frame,
        )
        .await;
        if let Outcome::Stored(_) = outcome {
            sim.counters
                .expected
                .fetch_add(recipients, Ordering::Relaxed);
        } else if group.mode == GroupMode::Walkie {
            let _ = client.release_floor(&group.name).await;
        }
        sim.sent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(SentClip {
                group: group_idx,
                talker: user,
                clip_id,
                frame_count: frames,
                digest,
                outcome,
            });
        tokio::time::sleep(uniform(&mut rng, s.think_min, s.think_max)).await;
    }
}

/// Speaks one clip: frames paced in real time, then waits for `Stored`.
#[allow(clippy::too_many_arguments)]
async fn talk_one(
    sim: &Sim,
    client: &Client,
    user: UserIdx,
    group: &GroupDef,
    clip_id: ClipId,
    start: usize,
    frames: u32,
    record: &ClipRecord,
    rng: &mut SmallRng,
    frame: Duration,
) -> Outcome {
    let params = ClipParams {
        clip_id: Some(clip_id),
        ..ClipParams::opus(48_000, sim.audio.channels, sim.audio.frame_ms as u8)
    };
    let mut talk = match client.talk(&group.name, params).await {
        Ok(t) => t,
        Err(e) => {
            sim.error(format!("user {user}: talk in {} refused: {e}", group.name));
            return Outcome::Failed;
        }
    };
    // Churn: the chance this clip sees a connection drop, at a random frame.
    let churn = sim.scenario.faults.churn;
    let clip_s = f64::from(frames) * frame.as_secs_f64();
    let drop_at = (churn > 0.0 && rng.random::<f64>() < 1.0 - (-churn * clip_s / 60.0).exp())
        .then(|| rng.random_range(0..frames));
    // Burst: if this task is late (scheduler hiccup), the frames it owes
    // go out back to back, as a phone's encoder that kept recording would
    // send its buffered packets; the clip keeps its real-time length and
    // frame count. (Delay would stretch the clip and silently lower the
    // offered load.) Latency is measured from the actual send instant, and
    // the timer's own lateness is reported separately as sim_pacing_lag.
    let mut pace = tokio::time::interval(frame);
    pace.set_missed_tick_behavior(MissedTickBehavior::Burst);
    let mut worst_lag = Duration::ZERO;
    let mut sent = 0u64;
    for i in 0..frames {
        let due = pace.tick().await;
        worst_lag = worst_lag.max(tokio::time::Instant::now().saturating_duration_since(due));
        if Some(i) == drop_at
            && let Some(conn) = client.connection()
        {
            conn.close(0u32.into(), b"client-sim churn");
            bump(&sim.counters.churn_drops);
        }
        let (data, _) = sim.audio.frame(start, i);
        record.sent_ns[i as usize].store(sim.ns(Instant::now()), Ordering::Release);
        if let Err(e) = talk.send_frame(data.clone()).await {
            sim.error(format!("user {user}: frame {i} of {clip_id} failed: {e}"));
            sim.counters.frames_sent.fetch_add(sent, Ordering::Relaxed);
            return match e {
                ClientError::ClipRejected { .. } | ClientError::FloorDenied { .. } => {
                    Outcome::Failed
                }
                _ => Outcome::Unknown,
            };
        }
        sent += 1;
    }
    sim.counters.frames_sent.fetch_add(sent, Ordering::Relaxed);
    sim.recorder.record(Metric::PacingLag, worst_lag);
    let finished = Instant::now();
    record
        .finished_ns
        .store(sim.ns(finished), Ordering::Release);
    match tokio::time::timeout(
        Duration::from_secs(60),
        talk.finish(sim.audio.waveform.clone()),
    )
    .await
    {
        Ok(Ok(stored)) => {
            sim.recorder.record(Metric::StoredAck, finished.elapsed());
            Outcome::Stored(stored.seq)
        }
        Ok(Err(e @ ClientError::ClipRejected { .. })) => {
            sim.error(format!("user {user}: clip {clip_id} rejected: {e}"));
            Outcome::Failed
        }
        Ok(Err(e)) => {
            sim.error(format!("user {user}: clip {clip_id} not confirmed: {e}"));
            Outcome::Unknown
        }
        Err(_) => {
            sim.error(format!(
                "user {user}: clip {clip_id} not confirmed within 60 s"
            ));
            Outcome::Unknown
        }
    }
}

/// How a member reads: slow readers pause after each event, stalled
/// ones never read (both need the event channel's push-back).
struct ReadingPlan {
    rng: SmallRng,
    slow: bool,
    stalled: bool,
}

impl ReadingPlan {
    fn of(sim: &Sim, user: UserIdx) -> ReadingPlan {
        let f = &sim.scenario.faults;
        let mut rng = SmallRng::seed_from_u64(f.seed ^ u64::from(user).wrapping_mul(0x9e37));
        let slow = f.slow_receivers > 0.0
            && !sim.is_talker(user)
            && rng.random::<f64>() < f.slow_receivers;
        let reading = sim.reading(user);
        ReadingPlan {
            rng,
            slow: slow || reading == Reading::Slow,
            stalled: reading == Reading::Stalled,
        }
    }
}

/// A member's receiving side, fed by its client's event sink (on the
/// client library's tasks: the media socket's reader, the clip streams'
/// readers) or by its own task reading the event channel.
struct Receiving {
    /// Set once the client is connected; taken when the run ends (events
    /// after that are left out, as a channel's would be).
    state: Mutex<Option<Receiver>>,
    stop: watch::Receiver<bool>,
}

impl std::fmt::Debug for Receiving {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receiving").finish_non_exhaustive()
    }
}

impl ptt_client::EventSink for Receiving {
    fn event(&self, event: Event) {
        self.handle(event);
    }
}

fn lock_rx(state: &Mutex<Option<Receiver>>) -> std::sync::MutexGuard<'_, Option<Receiver>> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

impl Receiving {
    fn handle(&self, event: Event) {
        if let Some(rx) = lock_rx(&self.state).as_mut() {
            // Our own close may be seen before the stop branch.
            rx.stopping |= *self.stop.borrow();
            rx.handle(event);
        }
    }

    /// Until the run stops: reads `events` (when the client has no sink),
    /// and drops the connection now and then under churn.
    async fn run(
        self: Arc<Self>,
        plan: ReadingPlan,
        client: Client,
        mut events: Option<Events>,
        mut stop: watch::Receiver<bool>,
    ) -> Vec<Received> {
        let Some((sim, user)) = lock_rx(&self.state)
            .as_ref()
            .map(|rx| (rx.sim.clone(), rx.user))
        else {
            return Vec::new();
        };
        let f = sim.scenario.faults.clone();
        let ReadingPlan {
            mut rng,
            slow,
            stalled,
        } = plan;
        if stalled {
            // Holds `events` without reading it until the run ends.
            set(&mut stop).await;
            drop(events);
            return Vec::new();
        }
        // Listeners drop their connection at random (exponential gaps)
        // until the talking ends; talkers drop mid-clip (see talk_one).
        let churn = (f.churn > 0.0 && !sim.is_talker(user)).then_some(f.churn);
        let next_drop = |rng: &mut SmallRng| {
            churn.map(|rate| {
                let gap = -(1.0 - rng.random::<f64>()).ln() * 60.0 / rate;
                tokio::time::Instant::now() + Duration::from_secs_f64(gap.min(3600.0))
            })
        };
        let mut drop_at = next_drop(&mut rng);
        // One wait for the stop flag for the whole run: a `watch` wait made
        // anew for every event registers and drops a `Notified` each time
        // (5 % of the simulator's CPU at 45 k frames/s).
        let mut stop_wait = stop.clone();
        let stopped = set(&mut stop_wait);
        tokio::pin!(stopped);
        loop {
            let sleep_drop = async {
                match drop_at {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            };
            let next_event = async {
                match events.as_mut() {
                    Some(events) => events.next().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                ev = next_event => match ev {
                    Some(ev) => {
                        self.handle(ev);
                        if slow {
                            tokio::time::sleep(f.slow_delay).await;
                        }
                    }
                    None => break,
                },
                () = sleep_drop => {
                    let talking = sim.talk_start.lock().unwrap_or_else(|p| p.into_inner()).is_some();
                    if talking && Instant::now() < sim.talk_deadline() {
                        if let Some(conn) = client.connection() {
                            conn.close(0u32.into(), b"client-sim churn");
                            bump(&sim.counters.churn_drops);
                        }
                        drop_at = next_drop(&mut rng);
                    } else if talking {
                        drop_at = None;
                    } else {
                        drop_at = next_drop(&mut rng);
                    }
                }
                () = &mut stopped => break,
            }
        }
        let Some(mut rx) = lock_rx(&self.state).take() else {
            return Vec::new();
        };
        rx.stopping = true;
        while let Some(ev) = events.as_mut().and_then(Events::try_next) {
            rx.handle(ev);
        }
        rx.flush();
        rx.received
    }
}

/// A clip being received.
struct RxClip {
    /// Streams of this clip open at once (a talker's retry after a
    /// reconnect starts a new stream before the old one's abort arrives;
    /// the client library's events carry only the clip id).
    streams: u32,
    group: GroupIdx,
    record: Option<Arc<ClipRecord>>,
    digest: Digest,
    next: u32,
    frames: u32,
    in_order: bool,
    history: bool,
    /// A live clip on the UDP media path (flag MEDIA): its frames may
    /// arrive in any order (UDP reorders, and the relay forwards whichever
    /// of a talker's two copies comes first), to be placed by index
    /// (PROTOCOL.md §14.4). Each frame's hash by index, folded into the
    /// digest in index order at the end; an index that comes twice makes
    /// the copy out of order.
    by_index: Option<Vec<Option<u64>>>,
}

/// One member's receiving side.
struct Receiver {
    sim: Arc<Sim>,
    user: UserIdx,
    group: GroupIdx,
    clips: HashMap<ClipId, RxClip>,
    completed: HashSet<ClipId>,
    received: Vec<Received>,
    batch: FrameBatch,
    last_flush: Instant,
    joined_at: Instant,
    late_pending: bool,
    /// The run is over: our own close's events are not faults.
    stopping: bool,
    /// Clips of the intruder under way, left out.
    intruded: HashSet<ClipId>,
    /// The relay node this member is connected to.
    node: usize,
}

impl Receiver {
    fn new(
        sim: Arc<Sim>,
        user: UserIdx,
        group: GroupIdx,
        joined_at: Instant,
        node: usize,
    ) -> Receiver {
        Receiver {
            sim,
            user,
            group,
            clips: HashMap::new(),
            completed: HashSet::new(),
            intruded: HashSet::new(),
            received: Vec::new(),
            batch: FrameBatch::new(),
            last_flush: Instant::now(),
            joined_at,
            late_pending: true,
            stopping: false,
            node,
        }
    }

    fn flush(&mut self) {
        self.sim
            .counters
            .frames_received
            .fetch_add(self.batch.received, Ordering::Relaxed);
        self.sim.by_node[self.node]
            .frames
            .fetch_add(self.batch.received, Ordering::Relaxed);
        let metric = match self.sim.reading(self.user) {
            Reading::Slow => Metric::SlowFrame,
            _ => Metric::Frame,
        };
        self.sim.recorder.record_frames_as(metric, &mut self.batch);
        self.last_flush = Instant::now();
    }

    /// One frame: verified against what its talker sent, its latency
    /// recorded. The hot path (tens of thousands a second): no clone of
    /// the shared `Sim` handle.
    fn frame(&mut self, clip_id: ClipId, index: u32, data: &[u8], received_at: Instant) {
        if !self.intruded.is_empty() && self.intruded.contains(&clip_id) {
            return;
        }
        let Some(c) = self.clips.get_mut(&clip_id) else {
            bump(&self.sim.counters.orphan_frames);
            return;
        };
        let hash = verify::frame_hash(data);
        match &mut c.by_index {
            Some(by_index) => {
                let i = index as usize;
                if by_index.len() <= i {
                    // Bounded by the clip's length (the sender's
                    // frames), as the client library bounds indexes.
                    by_index.resize(i + 1, None);
                }
                if by_index[i].replace(hash).is_some() {
                    c.in_order = false;
                }
            }
            None => {
                c.digest = c.digest.push(index, hash);
                if index != c.next {
                    c.in_order = false;
                }
            }
        }
        c.next = index.wrapping_add(1);
        c.frames += 1;
        self.batch.received += 1;
        let mut latency = None;
        let mut started = None;
        if let (false, Some(rec)) = (c.history, &c.record) {
            let sent = rec
                .sent_ns
                .get(index as usize)
                .map_or(0, |s| s.load(Ordering::Acquire));
            // A clip already in flight when we (re)joined replays
            // its backlog: that is late entry, not frame latency.
            if sent > 0 && rec.started >= self.joined_at {
                let at = self.sim.base + Duration::from_nanos(sent);
                latency = Some(received_at.saturating_duration_since(at));
            }
            started = Some(rec.started);
        }
        if let Some(latency) = latency {
            if index == 0 {
                self.sim.recorder.record(Metric::FirstFrame, latency);
            }
            if self.batch.push(latency) {
                self.flush();
            }
        }
        if let Some(started) = started
            && self.late_pending
        {
            self.late_pending = false;
            if started < self.joined_at {
                self.sim.recorder.record(
                    Metric::LateEntry,
                    received_at.saturating_duration_since(self.joined_at),
                );
            }
        }
        if received_at.saturating_duration_since(self.last_flush) > Duration::from_millis(250) {
            self.flush();
        }
    }

    fn handle(&mut self, ev: Event) {
        if let Event::Frame {
            clip_id,
            index,
            data,
            received_at,
            ..
        } = ev
        {
            return self.frame(clip_id, index, &data, received_at);
        }
        let sim = self.sim.clone();
        match ev {
            Event::ClipStarted {
                group,
                clip_id,
                history,
                talker,
                header,
                ..
            } => {
                let media = !history && header.flags & ptt_protocol::ClipHeader::FLAG_MEDIA != 0;
                if sim.intruder.as_ref() == Some(&talker) {
                    self.intruded.insert(clip_id);
                    return;
                }
                let group = sim
                    .group_index
                    .get(&group)
                    .copied()
                    .unwrap_or(UNKNOWN_GROUP);
                let streams = match self.clips.get(&clip_id) {
                    Some(old) => {
                        bump(&sim.counters.overlapping_streams);
                        old.streams + 1
                    }
                    None => 1,
                };
                self.clips.insert(
                    clip_id,
                    RxClip {
                        streams,
                        group,
                        record: sim.record(clip_id),
                        digest: Digest::EMPTY,
                        next: 0,
                        frames: 0,
                        in_order: true,
                        history,
                        by_index: media.then(Vec::new),
                    },
                );
            }
            Event::ClipEnded {
                clip_id,
                seq,
                frame_count,
                ..
            } => {
                if self.intruded.remove(&clip_id) {
                    return;
                }
                let Some(mut c) = self.clips.remove(&clip_id) else {
                    sim.error(format!(
                        "user {}: end of clip {clip_id} never started",
                        self.user
                    ));
                    return;
                };
                if let Some(by_index) = c.by_index.take() {
                    // Placed by index: a hole leaves its frame out of the
                    // digest (and `frames` short), so the copy is damaged.
                    c.digest = (0u32..)
                        .zip(by_index)
                        .filter_map(|(i, h)| Some((i, h?)))
                        .fold(Digest::EMPTY, |d, (i, h)| d.push(i, h));
                }
                if let (false, Some(rec)) = (c.history, &c.record) {
                    let fin = rec.finished_ns.load(Ordering::Acquire);
                    if fin > 0 && rec.started >= self.joined_at {
                        let at = sim.base + Duration::from_nanos(fin);
                        sim.recorder.record(Metric::ClipComplete, at.elapsed());
                    }
                }
                self.received.push(Received {
                    member: self.user,
                    group: c.group,
                    clip_id,
                    seq,
                    frame_count,
                    frames_seen: c.frames,
                    digest: c.digest,
                    in_order: c.in_order,
                    history: c.history,
                });
                let own = c.record.as_ref().is_some_and(|r| r.talker == self.user);
                if c.group == self.group && !own && self.completed.insert(clip_id) {
                    bump(&sim.counters.completions);
                }
                self.flush();
            }
            // A live copy on the media path lost frames: the client
            // fetches the clip whole, which ends as a history copy.
            Event::ClipIncomplete { clip_id, .. } | Event::ClipAborted { clip_id, .. } => {
                if self.intruded.remove(&clip_id) {
                    return;
                }
                if let Some(c) = self.clips.get_mut(&clip_id) {
                    bump(&sim.counters.partial);
                    c.streams -= 1;
                    if c.streams == 0 {
                        self.clips.remove(&clip_id);
                    }
                }
            }
            Event::Gap { .. } => bump(&sim.counters.gaps),
            Event::Disconnected { .. } if !self.stopping => bump(&sim.counters.disconnects),
            Event::Reconnected { .. } => {
                bump(&sim.counters.reconnects);
                self.joined_at = Instant::now();
                self.late_pending = true;
            }
            Event::RejoinFailed { group, message, .. } => {
                bump(&sim.counters.rejoin_failed);
                sim.error(format!(
                    "user {}: rejoin {group} failed: {message}",
                    self.user
                ));
            }
            // Receipts, floor and catch-up notices, our own uploads'
            // confirmations: nothing to verify on the receiving side.
            _ => {}
        }
    }
}
