//! The process-kill driver: starts a relay as a child process on a data
//! directory, drives it with clients that talk and listen, `kill -9`s it at
//! random moments (a seeded RNG) and restarts it on the same directory and
//! port, many times, then checks from the clients' own records that nothing
//! acknowledged was lost, nothing was delivered twice as new and nothing
//! partial was delivered as complete.
//!
//! The relay is any command line that accepts `--listen ADDR --data-dir
//! DIR` after its own arguments (`relay serve --worker-threads 1`), so a
//! cluster node can be driven the same way. Groups are created with admin
//! control messages and tokens minted with the key the relay keeps in its
//! data directory (`token.key`).
//!
//! Who takes part, all members of one notes group:
//!
//! - talkers: reconnecting clients that upload clips of random length, one
//!   frame every `frame_interval`, and wait for `Stored` across restarts
//!   (the client library re-sends a clip cut mid-upload under the same clip
//!   id); they also receive each other's clips;
//! - listeners: reconnecting clients that stay joined;
//! - a probe: an app restarted with every relay restart (a new client
//!   instance of the same member), which must receive from the store what
//!   it missed;
//! - late members: connect only after the last restart and must receive
//!   every clip from the store.
//!
//! After each restart the driver waits (at most `settle`) until every
//! receiver has every clip acknowledged before the kill; at the end it
//! checks every copy of every clip.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use ptt_client::{
    Client, ClientConfig, ClipId, ClipParams, Event, Events, GroupMode, ReconnectPolicy, Trust,
};
use ptt_relay::auth::TokenIssuer;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tokio::task::JoinSet;

use crate::verify::{Digest, frame_hash};

/// The group every participant belongs to.
const GROUP: &str = "killgrp";

/// What a kill run does.
#[derive(Debug, Clone)]
pub struct KillPlan {
    /// The relay's command line (program, then arguments) before `--listen
    /// ADDR --data-dir DIR`, e.g. `relay serve --worker-threads 1`.
    pub relay: Vec<OsString>,
    /// The relay's data directory (kept across restarts).
    pub data_dir: PathBuf,
    /// How many times the relay is killed.
    pub kills: u32,
    /// Seed of the kill moments, clip lengths and frame bytes.
    pub seed: u64,
    /// Talking members.
    pub talkers: usize,
    /// Listening members that stay connected (and reconnect).
    pub listeners: usize,
    /// Members that connect only after the last restart.
    pub late: usize,
    /// The shortest time the relay lives before it is killed.
    pub up_min: Duration,
    /// The longest.
    pub up_max: Duration,
    /// Frames per clip, smallest and largest.
    pub frames: (u32, u32),
    /// Time between two frames of a clip.
    pub frame_interval: Duration,
    /// How long receivers may take to get what was acknowledged.
    pub settle: Duration,
}

impl KillPlan {
    /// A plan with the defaults of `kill-soak`: 3 talkers, 3 listeners, 2
    /// late members, the relay killed after 0.3 to 1.5 s, clips of 3 to 40
    /// frames at 20 ms.
    pub fn new(relay: Vec<OsString>, data_dir: PathBuf, kills: u32, seed: u64) -> KillPlan {
        KillPlan {
            relay,
            data_dir,
            kills,
            seed,
            talkers: 3,
            listeners: 3,
            late: 2,
            up_min: Duration::from_millis(300),
            up_max: Duration::from_millis(1500),
            frames: (3, 40),
            frame_interval: Duration::from_millis(20),
            settle: Duration::from_secs(20),
        }
    }
}

/// What a kill run found; [`KillReport::passed`] says whether it held.
#[derive(Debug, Clone, Default, Serialize)]
pub struct KillReport {
    /// The seed (rerun with it to replay the same kill moments).
    pub seed: u64,
    /// Kills done (each followed by a restart on the same directory).
    pub kills: u32,
    /// Clips confirmed `Stored` to their talker.
    pub clips_acknowledged: u64,
    /// Clips re-sent on a new connection (cut mid-upload or before
    /// `Stored`), by the client library under the same clip id.
    pub clips_resent: u64,
    /// Received copies checked: (member instance, clip) pairs that must
    /// arrive.
    pub deliveries_expected: u64,
    /// Of those, received whole (each copy is checked for corruption and
    /// counted under `corrupt` if it differs).
    pub deliveries_ok: u64,
    /// Acknowledged clips a member never received (failure).
    pub missing: u64,
    /// A client instance completed the same clip twice (failure).
    pub duplicates_as_new: u64,
    /// Completed clips delivered again and dropped by the client library
    /// (allowed: cursors are written without fsync).
    pub duplicates_dropped: u64,
    /// The same member got a clip again on a new client instance (an app
    /// restart; allowed, for the same reason).
    pub redelivered_to_new_instance: u64,
    /// A clip delivered as complete whose frames, count or order differ
    /// from what the talker sent (failure).
    pub corrupt: u64,
    /// A clip delivered under another seq than its `Stored`, two clips
    /// sharing a seq, a seq with no clip, or a clip nobody sent (failure).
    pub seq_errors: u64,
    /// Clip streams cut before their end (and received again later).
    pub partial_aborted: u64,
    /// Clips the relay refused for the talker's clip rate (never
    /// acknowledged, so allowed).
    pub refused_rate_limited: u64,
    /// Talkers' uploads that failed otherwise (`Stored` never came within
    /// `settle`, a rejection): failures.
    pub talker_errors: u64,
    /// Reconnections of the reconnecting clients.
    pub reconnects: u64,
    /// Checks after a restart that timed out (failure).
    pub restart_checks_failed: u64,
    /// The first few failures, described.
    pub failures: Vec<String>,
    /// Wall time of the run in seconds.
    pub elapsed_s: f64,
}

impl KillReport {
    /// Whether nothing acknowledged was lost, duplicated, corrupted or
    /// misnumbered.
    pub fn passed(&self) -> bool {
        self.missing == 0
            && self.duplicates_as_new == 0
            && self.corrupt == 0
            && self.seq_errors == 0
            && self.restart_checks_failed == 0
            && self.talker_errors == 0
            && self.clips_acknowledged > 0
    }

    fn fail(&mut self, what: String) {
        if self.failures.len() < 20 {
            self.failures.push(what);
        }
    }
}

/// Runs the plan; `progress` gets one line per kill.
pub async fn run(plan: &KillPlan, progress: impl Fn(&str)) -> anyhow::Result<KillReport> {
    let started = Instant::now();
    let mut rng = SmallRng::seed_from_u64(plan.seed);
    let mut report = KillReport {
        seed: plan.seed,
        ..KillReport::default()
    };
    std::fs::create_dir_all(&plan.data_dir)
        .with_context(|| format!("creating {}", plan.data_dir.display()))?;
    let mut relay = RelayProcess::spawn(&plan.relay, "127.0.0.1:0".parse()?, &plan.data_dir)?;
    let addr = relay.addr;
    let trust = Trust::fingerprint_from_hex(&relay.fingerprint)?;
    let issuer = TokenIssuer::load_or_create(&plan.data_dir.join("token.key"))
        .context("loading the relay's token key")?;
    let token =
        |user: &str, admin: bool| issuer.issue(user, Duration::from_secs(86_400), admin, false);
    let config = |user: &str, admin: bool| {
        let mut c = ClientConfig::new(addr, "localhost", trust.clone(), token(user, admin))
            .with_reconnect(ReconnectPolicy {
                initial_delay: Duration::from_millis(50),
                max_delay: Duration::from_millis(400),
                multiplier: 2.0,
                jitter: true,
                max_attempts: None,
            });
        // A killed relay sends nothing more: find out within a second.
        c.transport.idle_timeout = Duration::from_secs(1);
        c.transport.keep_alive = Duration::from_millis(250);
        c.connect_timeout = Duration::from_secs(5);
        c
    };

    let talkers: Vec<String> = (0..plan.talkers).map(|i| format!("talker{i}")).collect();
    let listeners: Vec<String> = (0..plan.listeners)
        .map(|i| format!("listener{i}"))
        .collect();
    let late: Vec<String> = (0..plan.late).map(|i| format!("late{i}")).collect();
    {
        let mut c = config("killadmin", true);
        c.reconnect = None;
        let (admin, _events) = Client::connect(c).await.context("admin connect")?;
        admin.create_group(GROUP, GroupMode::Notes).await?;
        for user in talkers
            .iter()
            .chain(&listeners)
            .chain(&late)
            .chain(std::iter::once(&"probe".to_owned()))
        {
            admin.add_member(GROUP, user).await?;
        }
        admin.close().await;
    }

    let books = Arc::new(Books::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = JoinSet::new();
    let mut clients = Vec::new();
    for user in talkers.iter().chain(&listeners) {
        let (client, events) = Client::connect(config(user, false))
            .await
            .with_context(|| format!("{user} connects"))?;
        client.join(GROUP).await?;
        let instance = books.new_instance(user);
        tasks.spawn(receive(events, books.clone(), instance));
        clients.push(client);
    }
    for (i, client) in clients.iter().take(plan.talkers).enumerate() {
        let talker = Talker {
            client: client.clone(),
            name: talkers[i].clone(),
            rng: SmallRng::seed_from_u64(plan.seed ^ (0x5151_0000 + i as u64)),
            frames: plan.frames,
            interval: plan.frame_interval,
            settle: plan.settle,
        };
        tasks.spawn(talker.run(books.clone(), stop.clone()));
    }
    let receivers: Vec<String> = talkers.iter().chain(&listeners).cloned().collect();
    let mut probe: Option<Client> = None;

    for kill in 1..=plan.kills {
        let up = rng.random_range(plan.up_min..=plan.up_max);
        tokio::time::sleep(up).await;
        relay.kill()?;
        let acknowledged = books.acknowledged();
        report.kills = kill;
        // Down for a moment, as a supervisor would restart it.
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..200))).await;
        relay = RelayProcess::spawn(&plan.relay, addr, &plan.data_dir)?;
        if let Some(old) = probe.take() {
            old.close().await;
        }
        let mut c = config("probe", false);
        c.reconnect = None;
        let (p, events) = connect(c, plan.settle).await.context("probe connects")?;
        let instance = books.new_instance("probe");
        tasks.spawn(receive(events, books.clone(), instance));
        p.join(GROUP).await?;
        probe = Some(p);
        let mut waiting: Vec<&str> = receivers.iter().map(String::as_str).collect();
        waiting.push("probe");
        let outcome = books.wait_for(&waiting, &acknowledged, plan.settle).await;
        let line = format!(
            "kill {kill}/{}: after {} ms up; {} clips acknowledged before it; {}",
            plan.kills,
            up.as_millis(),
            acknowledged.len(),
            match &outcome {
                Ok(took) => format!("all received {} ms after the restart", took.as_millis()),
                Err(e) => format!("FAILED: {e}"),
            }
        );
        progress(&line);
        if let Err(e) = outcome {
            report.restart_checks_failed += 1;
            report.fail(format!("kill {kill}: {e}"));
        }
    }

    // The end: talkers finish their clip, late members catch up.
    stop.store(true, Ordering::Relaxed);
    if let Some(p) = probe.take() {
        p.close().await;
    }
    let mut late_clients = Vec::new();
    for user in &late {
        let mut c = config(user, false);
        c.reconnect = None;
        let (client, events) = connect(c, plan.settle).await?;
        let instance = books.new_instance(user);
        tasks.spawn(receive(events, books.clone(), instance));
        client.join(GROUP).await?;
        late_clients.push(client);
    }
    // Talkers end their last clip, then everything acknowledged must be
    // everywhere.
    let mut active = ActiveTime::new();
    while books.lock().talking > 0 && active.tick() < plan.settle {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let everything = books.acknowledged();
    let mut waiting: Vec<&str> = receivers.iter().map(String::as_str).collect();
    waiting.extend(late.iter().map(String::as_str));
    if let Err(e) = books.wait_for(&waiting, &everything, plan.settle).await {
        report.fail(format!("at the end: {e}"));
    }
    // Late duplicates have a moment to show.
    tokio::time::sleep(Duration::from_millis(500)).await;

    for client in clients.iter().chain(&late_clients) {
        let stats = client.stats();
        report.clips_resent += stats.clips_resent;
        report.duplicates_dropped += stats.duplicates_dropped;
        report.reconnects += stats.reconnects;
    }
    for client in clients.into_iter().chain(late_clients) {
        client.close().await;
    }
    relay.kill()?;
    // Every receive task ends with its client's events; talkers saw `stop`.
    while let Some(joined) = tokio::time::timeout(plan.settle, tasks.join_next())
        .await
        .context("client tasks did not end")?
    {
        joined.context("a client task panicked")?;
    }
    books.verify(&mut report);
    report.elapsed_s = started.elapsed().as_secs_f64();
    Ok(report)
}

/// Connects, trying again for up to `limit` (a relay just restarted on a
/// busy machine may not answer the first attempt in time).
async fn connect(config: ClientConfig, limit: Duration) -> anyhow::Result<(Client, Events)> {
    let mut active = ActiveTime::new();
    loop {
        match Client::connect(config.clone()).await {
            Ok(connected) => return Ok(connected),
            Err(e) if active.tick() < limit => {
                tracing::debug!("connect failed, trying again: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Time that counts against a limit, measured in steps: a step longer
/// than a second counts as one second, so that a run whose processes were
/// all stopped for a while (`SIGSTOP`, e.g. by a benchmark that wants a
/// quiet machine) does not fail for the time it did not run.
struct ActiveTime {
    last: Instant,
    total: Duration,
}

impl ActiveTime {
    fn new() -> ActiveTime {
        ActiveTime {
            last: Instant::now(),
            total: Duration::ZERO,
        }
    }

    /// Adds the step since the last call; the total so far.
    fn tick(&mut self) -> Duration {
        let now = Instant::now();
        self.total += (now - self.last).min(Duration::from_secs(1));
        self.last = now;
        self.total
    }
}

/// A relay child process.
struct RelayProcess {
    child: Child,
    addr: SocketAddr,
    fingerprint: String,
}

impl RelayProcess {
    /// Starts the relay and waits (at most 30 s) until it prints its
    /// address and certificate fingerprint.
    fn spawn(cmd: &[OsString], listen: SocketAddr, data_dir: &Path) -> anyhow::Result<Self> {
        let (program, args) = cmd.split_first().context("empty relay command")?;
        let mut child = Command::new(program)
            .args(args)
            .arg("--listen")
            .arg(listen.to_string())
            .arg("--data-dir")
            .arg(data_dir)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "error".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", program.to_string_lossy()))?;
        let stderr = child.stderr.take().context("relay stderr")?;
        let (tx, rx) = std::sync::mpsc::channel();
        // Reads the relay's stderr to its end (so the relay never blocks on
        // a full pipe); ends when the process dies.
        std::thread::spawn(move || {
            let (mut addr, mut fingerprint) = (None, None);
            let mut tail = Vec::new();
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if addr.is_none() || fingerprint.is_none() {
                    if let Some(rest) = line.strip_prefix("relay listening on ") {
                        addr = rest.split_whitespace().next().and_then(|a| a.parse().ok());
                    }
                    if let Some(rest) = line.trim().strip_prefix("certificate sha-256:") {
                        fingerprint = Some(rest.trim().to_owned());
                    }
                    if let (Some(a), Some(f)) = (addr, &fingerprint) {
                        let _ = tx.send(Ok((a, f.clone())));
                    } else if tail.len() < 20 {
                        tail.push(line);
                    }
                } else if line.contains("ERROR") || line.contains("panicked") {
                    eprintln!("relay: {line}");
                }
            }
            let _ = tx.send(Err(tail.join("\n")));
        });
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(Ok((addr, fingerprint))) => Ok(RelayProcess {
                child,
                addr,
                fingerprint,
            }),
            Ok(Err(output)) => {
                let _ = child.kill();
                let _ = child.wait();
                bail!("the relay exited before listening:\n{output}")
            }
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                bail!("the relay did not print its address within 30 s")
            }
        }
    }

    /// SIGKILL: no drain, no flush.
    fn kill(&mut self) -> anyhow::Result<()> {
        self.child.kill().context("killing the relay")?;
        self.child.wait().context("reaping the relay")?;
        Ok(())
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A clip a talker sent.
#[derive(Debug, Clone)]
struct Sent {
    talker: String,
    digest: Digest,
    frame_count: u32,
    /// Its seq once `Stored`.
    seq: Option<u64>,
}

/// A clip one client instance received whole.
#[derive(Debug, Clone)]
struct Got {
    seq: u64,
    frame_count: u32,
    frames_received: u32,
    digest: Digest,
    in_order: bool,
}

/// One client instance of a member, and what it received.
#[derive(Debug, Default)]
struct Instance {
    user: String,
    complete: HashMap<ClipId, Vec<Got>>,
    /// `Gap` notices (nothing expires in this run: a failure).
    gaps: u64,
    aborted: u64,
}

/// The clients' own records.
#[derive(Debug, Default)]
struct Books {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    sent: HashMap<ClipId, Sent>,
    instances: Vec<Instance>,
    talking: usize,
    talker_errors: Vec<String>,
    refused: u64,
}

impl Books {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn new_instance(&self, user: &str) -> usize {
        let mut s = self.lock();
        s.instances.push(Instance {
            user: user.to_owned(),
            ..Instance::default()
        });
        s.instances.len() - 1
    }

    /// The clips acknowledged so far, with their talker.
    fn acknowledged(&self) -> Vec<(ClipId, String)> {
        self.lock()
            .sent
            .iter()
            .filter(|(_, s)| s.seq.is_some())
            .map(|(id, s)| (*id, s.talker.clone()))
            .collect()
    }

    /// Waits until every member in `users` (over all its instances) has
    /// each clip of `clips` it did not talk.
    async fn wait_for(
        &self,
        users: &[&str],
        clips: &[(ClipId, String)],
        limit: Duration,
    ) -> Result<Duration, String> {
        let started = Instant::now();
        let mut active = ActiveTime::new();
        loop {
            let missing = {
                let s = self.lock();
                let mut missing = Vec::new();
                for user in users {
                    for (id, talker) in clips {
                        if talker == *user {
                            continue;
                        }
                        let has = s
                            .instances
                            .iter()
                            .any(|i| i.user == *user && i.complete.contains_key(id));
                        if !has {
                            missing.push(format!("{user} lacks {id}"));
                        }
                    }
                }
                missing
            };
            if missing.is_empty() {
                return Ok(started.elapsed());
            }
            if active.tick() > limit {
                let n = missing.len();
                let some: Vec<String> = missing.into_iter().take(5).collect();
                return Err(format!(
                    "{n} deliveries missing after {} s: {}",
                    limit.as_secs(),
                    some.join(", ")
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The final check of every copy of every clip.
    fn verify(&self, report: &mut KillReport) {
        let s = self.lock();
        for e in &s.talker_errors {
            report.fail(e.clone());
        }
        report.talker_errors = s.talker_errors.len() as u64;
        report.refused_rate_limited = s.refused;
        report.clips_acknowledged = s.sent.values().filter(|c| c.seq.is_some()).count() as u64;
        // Seqs: one clip each, none missing from 1 to the highest.
        let mut by_seq: BTreeMap<u64, ClipId> = BTreeMap::new();
        for (id, sent) in &s.sent {
            let Some(seq) = sent.seq else { continue };
            if let Some(other) = by_seq.insert(seq, *id) {
                report.seq_errors += 1;
                report.fail(format!("clips {other} and {id} were both stored as #{seq}"));
            }
        }
        let highest = by_seq.keys().next_back().copied().unwrap_or(0);
        let mut seen_seqs: BTreeMap<u64, ClipId> = BTreeMap::new();
        for instance in &s.instances {
            for (id, copies) in &instance.complete {
                for got in copies {
                    if let Some(prev) = seen_seqs.insert(got.seq, *id)
                        && prev != *id
                    {
                        report.seq_errors += 1;
                        report.fail(format!("#{} delivered as {prev} and as {id}", got.seq));
                    }
                }
            }
        }
        for seq in 1..=highest {
            if !by_seq.contains_key(&seq) && !seen_seqs.contains_key(&seq) {
                report.seq_errors += 1;
                report.fail(format!("#{seq} has no clip (a gap in the group's log)"));
            }
        }
        // Every copy at every client instance: checked against what was
        // sent; the first copy per member counts as its delivery.
        let mut first_copy: HashMap<(&str, ClipId), usize> = HashMap::new();
        for (n, instance) in s.instances.iter().enumerate() {
            report.partial_aborted += instance.aborted;
            if instance.gaps > 0 {
                report.seq_errors += instance.gaps;
                report.fail(format!(
                    "{} got {} Gap notices",
                    instance.user, instance.gaps
                ));
            }
            for (id, copies) in &instance.complete {
                let Some(sent) = s.sent.get(id) else {
                    report.seq_errors += 1;
                    report.fail(format!(
                        "{} received {id}, which nobody sent",
                        instance.user
                    ));
                    continue;
                };
                if copies.len() > 1 {
                    report.duplicates_as_new += copies.len() as u64 - 1;
                    report.fail(format!(
                        "{} (instance {n}) completed {id} {} times",
                        instance.user,
                        copies.len()
                    ));
                }
                for got in copies {
                    if got.digest != sent.digest
                        || got.frame_count != sent.frame_count
                        || got.frames_received != sent.frame_count
                        || !got.in_order
                    {
                        report.corrupt += 1;
                        report.fail(format!(
                            "{} received {id} with {}/{} frames (sent {}), digest {}",
                            instance.user,
                            got.frames_received,
                            got.frame_count,
                            sent.frame_count,
                            if got.digest == sent.digest {
                                "equal"
                            } else {
                                "different"
                            }
                        ));
                    }
                    if sent.seq.is_some_and(|seq| seq != got.seq) {
                        report.seq_errors += 1;
                        report.fail(format!(
                            "{} received {id} as #{}, its talker was told #{}",
                            instance.user,
                            got.seq,
                            sent.seq.unwrap_or(0)
                        ));
                    }
                }
                if first_copy.insert((&instance.user, *id), n).is_some() {
                    report.redelivered_to_new_instance += 1;
                }
            }
        }
        // Every acknowledged clip at every member but its talker and the
        // probe (whose instances were checked after each restart).
        let users: Vec<&str> = {
            let mut u: Vec<&str> = s.instances.iter().map(|i| i.user.as_str()).collect();
            u.sort_unstable();
            u.dedup();
            u
        };
        for (id, sent) in &s.sent {
            if sent.seq.is_none() {
                continue;
            }
            for user in &users {
                if *user == sent.talker || *user == "probe" {
                    continue;
                }
                report.deliveries_expected += 1;
                match first_copy.get(&(*user, *id)) {
                    Some(_) => report.deliveries_ok += 1,
                    None => {
                        report.missing += 1;
                        report.fail(format!("{user} never received {id} (#{:?})", sent.seq));
                    }
                }
            }
        }
    }
}

/// Records what one client instance receives, until its events end.
async fn receive(mut events: Events, books: Arc<Books>, instance: usize) {
    // Clips arriving: (digest so far, frames, next index, in order).
    let mut open: HashMap<ClipId, (Digest, u32, bool)> = HashMap::new();
    while let Some(event) = events.next().await {
        match event {
            Event::ClipStarted { clip_id, .. } => {
                open.insert(clip_id, (Digest::EMPTY, 0, true));
            }
            Event::Frame {
                clip_id,
                index,
                data,
                ..
            } => {
                let entry = open.entry(clip_id).or_insert((Digest::EMPTY, 0, false));
                if index != entry.1 {
                    entry.2 = false;
                }
                entry.0 = entry.0.push(index, frame_hash(&data));
                entry.1 += 1;
            }
            Event::ClipEnded {
                clip_id,
                seq,
                frame_count,
                ..
            } => {
                let (digest, frames_received, in_order) =
                    open.remove(&clip_id).unwrap_or((Digest::EMPTY, 0, false));
                let mut s = books.lock();
                s.instances[instance]
                    .complete
                    .entry(clip_id)
                    .or_default()
                    .push(Got {
                        seq,
                        frame_count,
                        frames_received,
                        digest,
                        in_order,
                    });
            }
            Event::ClipAborted { clip_id, .. } => {
                open.remove(&clip_id);
                books.lock().instances[instance].aborted += 1;
            }
            Event::Gap { .. } => books.lock().instances[instance].gaps += 1,
            _ => {}
        }
    }
}

/// A talking member.
struct Talker {
    client: Client,
    name: String,
    rng: SmallRng,
    frames: (u32, u32),
    interval: Duration,
    settle: Duration,
}

impl Talker {
    /// Talks clip after clip until `stop`, each one waited for until
    /// `Stored` (across relay restarts), with a pause between clips that
    /// keeps the talker under the relay's 60 clips a minute.
    async fn run(mut self, books: Arc<Books>, stop: Arc<AtomicBool>) {
        books.lock().talking += 1;
        while !stop.load(Ordering::Relaxed) {
            match self.one_clip(&books).await {
                Ok(()) => {}
                Err(e) if rate_limited(&e) => books.lock().refused += 1,
                Err(e) => {
                    let what = format!("{}: {e:#}", self.name);
                    eprintln!("kill-soak: talker error: {what}");
                    books.lock().talker_errors.push(what);
                }
            }
            let pause = self.rng.random_range(300..1500);
            tokio::time::sleep(Duration::from_millis(pause)).await;
        }
        books.lock().talking -= 1;
    }

    async fn one_clip(&mut self, books: &Books) -> anyhow::Result<()> {
        let count = self.rng.random_range(self.frames.0..=self.frames.1);
        let frames: Vec<Bytes> = (0..count)
            .map(|_| {
                let len = self.rng.random_range(8..=120);
                let bytes: Vec<u8> = (0..len).map(|_| self.rng.random()).collect();
                Bytes::from(bytes)
            })
            .collect();
        let digest = frames
            .iter()
            .enumerate()
            .fold(Digest::EMPTY, |d, (i, f)| d.push(i as u32, frame_hash(f)));
        let mut talk = self.client.talk(GROUP, ClipParams::default()).await?;
        let clip_id = talk.clip_id();
        books.lock().sent.insert(
            clip_id,
            Sent {
                talker: self.name.clone(),
                digest,
                frame_count: count,
                seq: None,
            },
        );
        let mut tick = tokio::time::interval(self.interval);
        for frame in frames {
            tick.tick().await;
            talk.send_frame(frame).await?;
        }
        let mut finish = std::pin::pin!(talk.finish(Bytes::new()));
        let mut active = ActiveTime::new();
        let stored = loop {
            tokio::select! {
                stored = &mut finish => break stored?,
                () = tokio::time::sleep(Duration::from_millis(250)) => {
                    if active.tick() > self.settle {
                        bail!("{clip_id} not stored within {:?}", self.settle);
                    }
                }
            }
        };
        books
            .lock()
            .sent
            .get_mut(&clip_id)
            .context("recorded above")?
            .seq = Some(stored.seq);
        Ok(())
    }
}

/// Whether the relay refused a clip for the talker's clip rate (allowed:
/// the clip was never acknowledged).
fn rate_limited(e: &anyhow::Error) -> bool {
    matches!(
        e.downcast_ref::<ptt_client::ClientError>(),
        Some(ptt_client::ClientError::ClipRejected {
            code: ptt_client::ErrorCode::RateLimited,
            ..
        })
    )
}
