//! Scenarios: what the simulated users do, as TOML.
//!
//! The named scenarios live in `client-sim/scenarios/*.toml` and are built
//! into the binary, so `--scenario smoke` works from any directory; any
//! other `--scenario` value is read as a file path.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};

/// How the groups share the air.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Floor control: request the floor, talk, release.
    Walkie,
    /// Voice notes: anyone records at any time.
    Notes,
    /// Alternate groups: even groups walkie, odd groups notes.
    Mixed,
}

/// How live frames reach the simulated clients.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum MediaMode {
    /// On the clips' QUIC streams (the client's media path off).
    #[default]
    Streams,
    /// On the UDP media path (PROTOCOL.md §14), with the scenario's loss
    /// and delay applied to the media socket too.
    Udp,
}

/// Network faults and misbehaving clients.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Faults {
    /// Fraction of datagrams dropped, each way, at each client socket
    /// (0.05 = 5%).
    pub loss: f64,
    /// Delay added to each datagram, each way (so the round trip grows by
    /// twice this).
    #[serde(with = "humantime_serde")]
    pub delay: Duration,
    /// Uniform random extra delay, 0 to this, per datagram (datagrams stay
    /// in order).
    #[serde(with = "humantime_serde")]
    pub jitter: Duration,
    /// Fraction of datagrams, each way, held back `reorder_delay` out of
    /// order, so that the next ones overtake them.
    pub reorder: f64,
    /// How long a reordered datagram is held back.
    #[serde(with = "humantime_serde")]
    pub reorder_delay: Duration,
    /// Fraction of datagrams, each way, delivered twice.
    pub duplicate: f64,
    /// Connection drops per client per minute. A listener drops at random
    /// times; a talker drops in the middle of a clip with the probability
    /// that this rate gives over the clip's length.
    pub churn: f64,
    /// Network switches per client socket per minute while talking: the
    /// socket's quinn endpoint is rebound to a new UDP socket on a new
    /// port (Wi-Fi to cellular), and every connection on it migrates
    /// (QUIC connection migration) without reconnecting.
    pub rebinds: f64,
    /// Fraction of listeners that read their events slowly.
    pub slow_receivers: f64,
    /// Members of each group (right after the talkers) that join and then
    /// never read their events: a phone whose app hangs. They are left
    /// out of the delivery check and of the frame latency.
    pub stalled_per_group: usize,
    /// Members of each group (after the stalled ones) that read every
    /// event `slow_delay` late; their frame latency is reported apart
    /// (`slow_frame`), the others' stays `frame`.
    pub slow_per_group: usize,
    /// How long a slow receiver takes per event.
    #[serde(with = "humantime_serde")]
    pub slow_delay: Duration,
    /// Seed of the fault randomness (loss, delay, churn).
    pub seed: u64,
}

impl Default for Faults {
    fn default() -> Faults {
        Faults {
            loss: 0.0,
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            reorder: 0.0,
            reorder_delay: Duration::from_millis(10),
            duplicate: 0.0,
            churn: 0.0,
            rebinds: 0.0,
            slow_receivers: 0.0,
            stalled_per_group: 0,
            slow_per_group: 0,
            slow_delay: Duration::from_millis(30),
            seed: 1,
        }
    }
}

impl Faults {
    /// Whether the client sockets need the lossy wrapper.
    pub fn needs_lossy_socket(&self) -> bool {
        self.loss > 0.0
            || !self.delay.is_zero()
            || !self.jitter.is_zero()
            || self.reorder > 0.0
            || self.duplicate > 0.0
    }

    /// What the lossy socket does to each direction.
    pub fn network(&self) -> crate::lossy::NetworkFaults {
        crate::lossy::NetworkFaults {
            loss: self.loss,
            delay: self.delay,
            jitter: self.jitter,
            reorder: self.reorder,
            reorder_delay: self.reorder_delay,
            duplicate: self.duplicate,
        }
    }
}

/// A capacity search: runs the scenario again with more clients each step
/// until a limit is passed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Capacity {
    /// Clients in the first step.
    pub start: usize,
    /// Clients added each step.
    pub step: usize,
    /// Most clients tried.
    pub max: usize,
    /// The load is held while p99 frame latency stays at or below this.
    #[serde(with = "humantime_serde")]
    pub p99_limit: Duration,
}

impl Default for Capacity {
    fn default() -> Capacity {
        Capacity {
            start: 200,
            step: 200,
            max: 4000,
            p99_limit: Duration::from_millis(50),
        }
    }
}

/// Everything a run does.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Scenario {
    /// Its name, for reports.
    pub name: String,
    /// One line saying what it shows.
    pub description: String,
    /// Simulated users, one connection each.
    pub clients: usize,
    /// Members per group (the last group takes the remainder).
    pub group_size: usize,
    /// Walkie, notes, or mixed.
    pub mode: Mode,
    /// Members of each group that talk (0: everyone only listens).
    pub talkers_per_group: usize,
    /// How long talkers start new clips.
    #[serde(with = "humantime_serde")]
    pub duration: Duration,
    /// Shortest clip.
    #[serde(with = "humantime_serde")]
    pub clip_min: Duration,
    /// Longest clip (lengths are log-uniform in between: voice notes are
    /// mostly short).
    #[serde(with = "humantime_serde")]
    pub clip_max: Duration,
    /// Shortest pause between a talker's clips.
    #[serde(with = "humantime_serde")]
    pub think_min: Duration,
    /// Longest pause between a talker's clips.
    #[serde(with = "humantime_serde")]
    pub think_max: Duration,
    /// Members of each group that are offline at first (the last members,
    /// never talkers) and connect after `offline_for`, then catch up.
    pub offline_per_group: usize,
    /// How long the offline members stay away.
    #[serde(with = "humantime_serde")]
    pub offline_for: Duration,
    /// After the talking, how long to wait at most for deliveries to
    /// complete before counting what is missing.
    #[serde(with = "humantime_serde")]
    pub settle: Duration,
    /// New connections per second while connecting.
    pub connect_rate: u32,
    /// Clients sharing one UDP socket (quinn endpoint).
    pub clients_per_endpoint: usize,
    /// Faults.
    pub faults: Faults,
    /// A capacity search instead of one run.
    pub capacity: Option<Capacity>,
    /// Clients ask the relay for fewer ACKs of their uploads (the client
    /// library's default); off to measure what that saves (issue #15).
    pub upload_ack_frequency: bool,
    /// Live frames on streams or on the UDP media path.
    pub media: MediaMode,
    /// With the UDP media path, the clients of one endpoint share one
    /// media socket read in batches (`ptt_client::MediaSocket`), so that
    /// the simulator costs less per frame than the relay it drives; off:
    /// a socket and a task per client, as phones have.
    pub shared_media_socket: bool,
    /// Members take their client's events in an event sink
    /// (`ptt_client::EventSink`) on the client library's tasks, so that a
    /// received frame costs no task wake of its own; off: each member's
    /// task reads its `Events` channel. Slow and stalled readers always
    /// read the channel (they need its push-back).
    pub event_sink: bool,
}

impl Default for Scenario {
    fn default() -> Scenario {
        Scenario {
            name: "custom".into(),
            description: String::new(),
            clients: 20,
            group_size: 5,
            mode: Mode::Notes,
            talkers_per_group: 1,
            duration: Duration::from_secs(10),
            clip_min: Duration::from_secs(1),
            clip_max: Duration::from_secs(15),
            think_min: Duration::from_secs(1),
            think_max: Duration::from_secs(5),
            offline_per_group: 0,
            offline_for: Duration::from_secs(5),
            settle: Duration::from_secs(20),
            connect_rate: 1000,
            clients_per_endpoint: 500,
            faults: Faults::default(),
            capacity: None,
            upload_ack_frequency: true,
            media: MediaMode::Streams,
            shared_media_socket: true,
            event_sink: true,
        }
    }
}

/// The scenarios built into the binary: (name, TOML).
pub const NAMED: &[(&str, &str)] = &[
    ("smoke", include_str!("../scenarios/smoke.toml")),
    ("office", include_str!("../scenarios/office.toml")),
    ("channel", include_str!("../scenarios/channel.toml")),
    (
        "lossy-mobile",
        include_str!("../scenarios/lossy-mobile.toml"),
    ),
    ("capacity", include_str!("../scenarios/capacity.toml")),
    (
        "capacity-notes",
        include_str!("../scenarios/capacity-notes.toml"),
    ),
    ("load", include_str!("../scenarios/load.toml")),
    ("idle", include_str!("../scenarios/idle.toml")),
    ("live", include_str!("../scenarios/live.toml")),
    ("cluster", include_str!("../scenarios/cluster.toml")),
    ("netfaults", include_str!("../scenarios/netfaults.toml")),
    ("churn", include_str!("../scenarios/churn.toml")),
    ("soak", include_str!("../scenarios/soak.toml")),
    (
        "slow-consumers",
        include_str!("../scenarios/slow-consumers.toml"),
    ),
];

impl Scenario {
    /// Parses a scenario from TOML text.
    pub fn from_toml(text: &str) -> anyhow::Result<Scenario> {
        let s: Scenario = toml::from_str(text)?;
        s.validate()?;
        Ok(s)
    }

    /// A named scenario, or else the file at that path.
    pub fn load(name_or_path: &str) -> anyhow::Result<Scenario> {
        if let Some((_, text)) = NAMED.iter().find(|(n, _)| *n == name_or_path) {
            return Scenario::from_toml(text)
                .with_context(|| format!("built-in scenario {name_or_path}"));
        }
        let path = Path::new(name_or_path);
        let text = std::fs::read_to_string(path).with_context(|| {
            let names: Vec<_> = NAMED.iter().map(|(n, _)| *n).collect();
            format!(
                "{name_or_path} is neither a named scenario ({}) nor a readable file",
                names.join(", ")
            )
        })?;
        let mut s = Scenario::from_toml(&text).with_context(|| path.display().to_string())?;
        if s.name == "custom"
            && let Some(stem) = path.file_stem()
        {
            s.name = stem.to_string_lossy().into_owned();
        }
        Ok(s)
    }

    /// Checks the numbers make sense.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.clients >= 2, "clients must be at least 2");
        anyhow::ensure!(self.group_size >= 2, "group_size must be at least 2");
        anyhow::ensure!(
            self.talkers_per_group
                + self.offline_per_group
                + self.faults.stalled_per_group
                + self.faults.slow_per_group
                <= self.group_size,
            "talkers_per_group + offline_per_group + stalled_per_group + slow_per_group \
             exceed group_size"
        );
        anyhow::ensure!(
            self.clip_min >= Duration::from_millis(20) && self.clip_min <= self.clip_max,
            "need 20ms <= clip_min <= clip_max"
        );
        anyhow::ensure!(
            self.think_min <= self.think_max,
            "need think_min <= think_max"
        );
        anyhow::ensure!(
            (0.0..1.0).contains(&self.faults.loss),
            "loss must be in [0, 1)"
        );
        anyhow::ensure!(
            (0.0..=1.0).contains(&self.faults.reorder),
            "reorder must be in [0, 1]"
        );
        anyhow::ensure!(
            (0.0..=1.0).contains(&self.faults.duplicate),
            "duplicate must be in [0, 1]"
        );
        anyhow::ensure!(self.faults.churn >= 0.0, "churn must be >= 0");
        anyhow::ensure!(self.faults.rebinds >= 0.0, "rebinds must be >= 0");
        anyhow::ensure!(
            (0.0..=1.0).contains(&self.faults.slow_receivers),
            "slow_receivers must be in [0, 1]"
        );
        anyhow::ensure!(self.connect_rate > 0, "connect_rate must be > 0");
        anyhow::ensure!(
            self.clients_per_endpoint > 0,
            "clients_per_endpoint must be > 0"
        );
        if let Some(c) = &self.capacity {
            anyhow::ensure!(
                c.start >= 2 && c.step > 0 && c.max >= c.start,
                "bad capacity steps"
            );
        }
        Ok(())
    }

    /// The groups' member counts: `group_size` each, the remainder joins
    /// the last group (or forms one if it has two members or more).
    pub fn group_sizes(&self) -> Vec<usize> {
        let full = self.clients / self.group_size;
        let rest = self.clients % self.group_size;
        let mut sizes = vec![self.group_size; full];
        if rest >= 2 || sizes.is_empty() {
            sizes.push(rest.max(2).min(self.clients));
        } else if rest == 1 {
            *sizes.last_mut().expect("at least one group") += 1;
        }
        sizes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_named_scenario_parses() {
        for (name, _) in NAMED {
            let s = Scenario::load(name).unwrap_or_else(|e| panic!("{name}: {e:#}"));
            assert_eq!(&s.name, name);
            assert!(!s.description.is_empty(), "{name} has no description");
            let total: usize = s.group_sizes().iter().sum();
            assert_eq!(total, s.clients, "{name}");
        }
        let smoke = Scenario::load("smoke").unwrap();
        assert!(smoke.clients <= 30 && smoke.offline_per_group >= 1);
        let lossy = Scenario::load("lossy-mobile").unwrap();
        assert!((lossy.faults.loss - 0.05).abs() < 1e-9);
        assert_eq!(lossy.faults.delay, Duration::from_millis(40));
        assert!(lossy.faults.churn > 0.0);
        assert!(Scenario::load("capacity").unwrap().capacity.is_some());
        assert_eq!(Scenario::load("channel").unwrap().group_sizes().len(), 1);
    }

    #[test]
    fn unknown_fields_and_bad_values_are_refused() {
        assert!(Scenario::from_toml("clients = 10\nclinets = 3\n").is_err());
        assert!(Scenario::from_toml("[faults]\nlos = 0.1\n").is_err());
        assert!(Scenario::from_toml("duration = \"soon\"\n").is_err());
        assert!(Scenario::from_toml("clients = 1\n").is_err());
        assert!(Scenario::from_toml("mode = \"shout\"\n").is_err());
        let s = Scenario::from_toml("clients = 12\ngroup_size = 5\nduration = \"3s\"\n").unwrap();
        assert_eq!(s.duration, Duration::from_secs(3));
        assert_eq!(s.group_sizes(), vec![5, 5, 2]);
        let s = Scenario::from_toml("clients = 11\ngroup_size = 5\n").unwrap();
        assert_eq!(s.group_sizes(), vec![5, 6]);
        assert!(Scenario::load("/nonexistent/scenario.toml").is_err());
    }

    #[test]
    fn group_sizes_cover_every_client() {
        for clients in 2..40 {
            for group_size in 2..12 {
                let s = Scenario {
                    clients,
                    group_size,
                    talkers_per_group: 0,
                    ..Scenario::default()
                };
                let sizes = s.group_sizes();
                assert_eq!(sizes.iter().sum::<usize>(), clients);
                assert!(
                    sizes.iter().all(|&n| n >= 2),
                    "{clients}/{group_size}: {sizes:?}"
                );
            }
        }
    }
}
