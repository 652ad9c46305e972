//! The relay's configuration: one struct read from an optional TOML file
//! with command-line flags on top. `relay.example.toml` in the crate
//! documents every field.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The relay-wide live latency budget of notes groups and channels, ms
/// (`live_budget_ms`): three 20 ms frames per packet.
pub const DEFAULT_LIVE_BUDGET_MS: u32 = 60;

/// The largest live latency budget a relay or a group may set, ms.
pub const MAX_LIVE_BUDGET_MS: u32 = 250;

/// Everything `relay serve` can be told. Field names are the TOML keys and
/// the `--flag-names` (with `-` for `_`).
#[derive(Debug, Clone, PartialEq, Eq, clap::Args, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RelayConfig {
    /// UDP address to listen on.
    #[arg(long, default_value = "127.0.0.1:4433")]
    pub listen: SocketAddr,
    /// Directory of the embedded store, keys and the development certificate.
    #[arg(long, default_value = "./data")]
    pub data_dir: PathBuf,
    /// PEM certificate chain (default: a self-signed development certificate
    /// kept in the data directory).
    #[arg(long, requires = "key")]
    pub cert: Option<PathBuf>,
    /// PEM private key for `cert`.
    #[arg(long, requires = "cert")]
    pub key: Option<PathBuf>,
    /// Ed25519 public key (base64url) that signs tokens; default: the key in
    /// the data directory, which `relay token` uses to issue tokens.
    #[arg(long)]
    pub token_public_key: Option<String>,
    /// More token verification keys, of other issuers: `KID=KEY` with the
    /// Ed25519 public key in base64url; tokens naming `KID` in their `kid`
    /// claim are checked with it. Keys rotated into the data directory
    /// (`relay key rotate`) are accepted without being listed here.
    #[arg(long, value_name = "KID=KEY")]
    pub token_keys: Vec<String>,
    /// Most connections at once.
    #[arg(long, default_value_t = 20_000)]
    pub max_connections: usize,
    /// Most connections open at once from one IP address (0: no limit).
    /// Clients behind one NAT share an address: leave room for them.
    #[arg(long, default_value_t = 256)]
    pub max_connections_per_ip: u32,
    /// New handshakes per second (and the same again as a burst) before
    /// the relay asks new clients to validate their address with a QUIC
    /// Retry (one more round trip) before it spends a handshake on them;
    /// 0: never.
    #[arg(long, default_value_t = 200)]
    pub handshakes_per_second: u32,
    /// New handshakes per second from one IP address (0: no limit). Past
    /// it the address must validate (QUIC Retry); validated, it gets as
    /// many again, then is refused until its rate allows.
    #[arg(long, default_value_t = 20)]
    pub handshakes_per_ip_per_second: u32,
    /// Clips one user may start per minute over all their connections
    /// (0: no limit); `clips_per_minute` is per connection.
    #[arg(long, default_value_t = 120)]
    pub user_clips_per_minute: u32,
    /// Clip frames one user may upload per second, sustained, over all
    /// their connections (0: no limit); past it (and the burst) the upload
    /// is refused with `RateLimited`. Talking in real time takes 50 a
    /// second with 20 ms frames, 100 with 10 ms.
    #[arg(long, default_value_t = 100)]
    pub user_frames_per_second: u32,
    /// The burst above `user_frames_per_second`: enough for a client to
    /// re-send a whole clip at once after a reconnect (60 s of 20 ms
    /// frames).
    #[arg(long, default_value_t = 3000)]
    pub user_frames_burst: u32,
    /// Most clip streams one connection may have open at once. A client
    /// uploads at most `max_concurrent_clips` clips at a time, so a few
    /// more than that is enough (a client wanting more waits for stream
    /// credit); quinn reserves state for each, about 50 bytes a stream in
    /// every connection.
    #[arg(long, default_value_t = 4)]
    pub max_streams_per_connection: u32,
    /// Close connections silent for this long.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Time from connect to a valid hello.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    #[serde(with = "humantime_serde")]
    pub auth_timeout: Duration,
    /// Longest clip and floor hold in new groups.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "60s")]
    #[serde(with = "humantime_serde")]
    pub max_clip: Duration,
    /// Largest Opus clip, in bytes of frames.
    #[arg(long, default_value_t = 1 << 20)]
    pub max_clip_bytes: u32,
    /// Largest WAV upload (transcoded at the relay), in bytes.
    #[arg(long, default_value_t = 16 << 20)]
    pub max_wav_bytes: u32,
    /// Largest single frame, in bytes.
    #[arg(long, default_value_t = 8 * 1024)]
    pub max_frame_bytes: u32,
    /// Clips one connection may upload at the same time.
    #[arg(long, default_value_t = 2)]
    pub max_concurrent_clips: u32,
    /// Clips one connection may start per minute.
    #[arg(long, default_value_t = 60)]
    pub clips_per_minute: u32,
    /// Control messages one connection may send in a burst (a token
    /// bucket; acknowledgements of clips the relay delivered are free).
    #[arg(long, default_value_t = ptt_protocol::session::DEFAULT_CONTROL_BURST)]
    pub control_burst: u32,
    /// Control messages one connection may send per second, sustained.
    #[arg(long, default_value_t = ptt_protocol::session::DEFAULT_CONTROL_PER_SECOND)]
    pub control_per_second: u32,
    /// Delete clips older than this (0s keeps them forever).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30days")]
    #[serde(with = "humantime_serde")]
    pub retention_max_age: Duration,
    /// Keep at most this many clips per group (0: no cap).
    #[arg(long, default_value_t = 10_000)]
    pub retention_max_clips: u64,
    /// How far (in frames) a member's live stream may fall behind the
    /// talker before it is cut and the member catches up from the store.
    #[arg(long, default_value_t = 100)]
    pub live_lag_frames: usize,
    /// Live latency budget of notes groups and channels, ms: a member's
    /// live frames may wait this long to be written together (fewer
    /// packets); walkie groups get each frame at once. 0, or a budget no
    /// longer than a clip's frame, writes each frame at once. A group's
    /// own budget (`relay group budget`) overrides it. At most
    /// `MAX_LIVE_BUDGET_MS` (250).
    #[arg(long, default_value_t = DEFAULT_LIVE_BUDGET_MS,
          value_parser = clap::value_parser!(u32).range(0..=i64::from(MAX_LIVE_BUDGET_MS)))]
    pub live_budget_ms: u32,
    /// On shutdown, how long clips in flight may take to finish.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// On shutdown, the reconnect hint sent to clients in `GoAway`.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1s")]
    #[serde(with = "humantime_serde")]
    pub goaway_reconnect_after: Duration,
    /// On shutdown, another relay (`host:port`) clients are told to
    /// reconnect to in `GoAway` (default: none, the same address).
    #[arg(long)]
    pub goaway_address: Option<String>,
    /// How often the certificate files (`cert`, `key`) and the token keys
    /// in the data directory are checked for changes (0s: never).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
    #[serde(with = "humantime_serde")]
    pub reload_interval: Duration,
    /// Tokio worker threads (0: a current-thread runtime). By default one
    /// per CPU this process may run on, so `taskset -c 0 relay serve` (or a
    /// container's CPU set) gets one: more workers than cores only trade
    /// the core back and forth (on one pinned core, one worker spent 1–6 %
    /// less CPU per live frame than two, README issue #15).
    #[arg(long, default_value_t = default_worker_threads())]
    pub worker_threads: usize,
    /// The most clips a channel may publish in 24 hours, whatever its
    /// owner sets (issue #14).
    #[arg(long, default_value_t = 100)]
    pub channel_max_clips_per_day: u32,
    /// The most clips a new follower receives from a channel's history,
    /// whatever its owner sets; new channels start at the lower of this
    /// and 10.
    #[arg(long, default_value_t = 50)]
    pub channel_max_backlog_clips: u32,
    /// TCP address of the HTTP listener serving the browser page (for
    /// example 127.0.0.1:8080); none by default. The page talks to the
    /// relay over WebTransport on `listen`.
    #[arg(long)]
    pub web: Option<SocketAddr>,
    /// TCP address of the HTTP listener serving Prometheus `/metrics`,
    /// `/healthz` and `/readyz` (e.g. 127.0.0.1:9464); none by default.
    #[arg(long)]
    pub metrics: Option<SocketAddr>,
    /// Log lines as human-readable text or as one JSON object per line.
    #[arg(long, value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Offer native clients the UDP media path (PROTOCOL.md §14): live
    /// frames sealed in UDP datagrams beside the QUIC connection, instead
    /// of on streams, for clients that ask with `MediaOpen`.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub media: bool,
    /// UDP address of the media socket; default: the `listen` address with
    /// the next port (with port 0, any free port).
    #[arg(long)]
    pub media_listen: Option<SocketAddr>,
    /// Let clients move to a new address on the same connection (QUIC
    /// connection migration: a phone switching from Wi-Fi to cellular
    /// carries on without reconnecting). Off, packets from a client's new
    /// address are dropped: the client notices at its idle timeout and
    /// reconnects (its clip in flight is re-sent or caught up from the
    /// store). Off only where a NAT or load balancer in front of the relay
    /// cannot follow a migrated connection.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub allow_migration: bool,
    /// Memory for the embedded store's page cache (redb), MiB. redb's own
    /// default is 1 GiB, and its cache keeps the pages the relay writes, so
    /// the process grew with the store until then (a 30-minute soak: RSS
    /// 37 → 63 MiB, at the rate the store file grew). Recent clips and the
    /// indexes fit in the default; catch-up of older clips reads the file.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=65_536))]
    pub store_cache_mib: u64,
    /// Several relay nodes on NATS JetStream (`[cluster]` in the file);
    /// without NATS URLs the relay runs alone on its embedded store.
    #[command(flatten)]
    pub cluster: ClusterConfig,
}

/// How the relay writes its log lines (to stderr).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, with the span fields (session id,
    /// address, user, group).
    Json,
}

/// The `[cluster]` section: where the NATS JetStream backbone of several
/// relay nodes is, and the names the relay uses in it (see the README's
/// Cluster section).
#[derive(Debug, Clone, PartialEq, Eq, clap::Args, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// NATS server URLs (`nats://host:4222`, comma-separated on the command
    /// line); empty: no cluster, the embedded store.
    #[arg(long = "nats", value_delimiter = ',')]
    pub nats: Vec<String>,
    /// A NATS credentials file (JWT and NKey seed), if the servers require
    /// one.
    #[arg(skip)]
    pub credentials: Option<PathBuf>,
    /// The JetStream stream of clips (subjects `<prefix>.clips.<group>`).
    #[arg(skip = String::from("PTT_CLIPS"))]
    pub stream: String,
    /// Prefix of every subject and key-value bucket the relay uses, so
    /// several relay deployments can share one NATS system.
    #[arg(skip = String::from("ptt"))]
    pub prefix: String,
    /// Copies JetStream keeps of the stream and buckets: 3 on a cluster of
    /// three NATS servers, 1 on a single server.
    #[arg(skip = 1usize)]
    pub replicas: usize,
    /// How long a NATS request (a publish acknowledgement, a read) may take
    /// before the operation fails (a clip then is refused with `Internal`).
    #[arg(skip = Duration::from_secs(5))]
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// JetStream's duplicate window for clip ids (dedup beyond it is by the
    /// relay's clip index bucket).
    #[arg(skip = Duration::from_secs(120))]
    #[serde(with = "humantime_serde")]
    pub duplicate_window: Duration,
}

impl Default for ClusterConfig {
    fn default() -> ClusterConfig {
        RelayConfig::default().cluster
    }
}

impl ClusterConfig {
    /// Whether the relay runs as one node of several, on NATS.
    pub fn enabled(&self) -> bool {
        !self.nats.is_empty()
    }
}

/// The CPUs this process may run on (its affinity mask), at least one.
pub fn default_worker_threads() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
}

impl Default for RelayConfig {
    fn default() -> RelayConfig {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Defaults {
            #[command(flatten)]
            config: RelayConfig,
        }
        Defaults::parse_from(["relay"]).config
    }
}

/// Why the configuration could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {error}")]
    Io {
        /// The file.
        path: String,
        /// The failure.
        error: std::io::Error,
    },
    /// The file is not valid TOML for this struct.
    #[error("{path}: {error}")]
    Toml {
        /// The file.
        path: String,
        /// The parse failure, with line and column.
        error: toml::de::Error,
    },
}

impl RelayConfig {
    /// Where the media socket binds, if the media path is on.
    pub fn media_addr(&self) -> Option<SocketAddr> {
        if !self.media {
            return None;
        }
        Some(self.media_listen.unwrap_or_else(|| {
            let mut addr = self.listen;
            if addr.port() != 0 {
                addr.set_port(addr.port().wrapping_add(1));
            }
            addr
        }))
    }

    /// A configuration for tests: port 0 on loopback, the given data
    /// directory, short timeouts, and no per-address or per-user limits
    /// (every test and simulated client connects from 127.0.0.1; tests
    /// that push a limit set it).
    pub fn for_tests(data_dir: &Path) -> RelayConfig {
        RelayConfig {
            listen: "127.0.0.1:0".parse().expect("valid address"),
            data_dir: data_dir.to_owned(),
            shutdown_grace: Duration::from_secs(1),
            max_connections_per_ip: 0,
            handshakes_per_second: 0,
            handshakes_per_ip_per_second: 0,
            user_clips_per_minute: 0,
            user_frames_per_second: 0,
            ..RelayConfig::default()
        }
    }

    /// Reads `file` (if any) and lays the flags the user actually typed on
    /// top: a flag beats the file, the file beats the default.
    pub fn load(
        file: Option<&Path>,
        flags: &RelayConfig,
        matches: &clap::ArgMatches,
    ) -> Result<RelayConfig, ConfigError> {
        let Some(path) = file else {
            return Ok(flags.clone());
        };
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Io {
            path: path.display().to_string(),
            error,
        })?;
        let toml_err = |error| ConfigError::Toml {
            path: path.display().to_string(),
            error,
        };
        let mut merged: toml::Table = toml::from_str(&text).map_err(toml_err)?;
        // Check the file alone first so its errors name its own keys.
        let _: RelayConfig = toml::from_str(&text).map_err(toml_err)?;
        let flag_table = toml::Table::try_from(flags).expect("the config serializes");
        let flag_cluster = flag_table.get("cluster").and_then(toml::Value::as_table);
        for id in matches.ids() {
            let typed = matches!(
                matches.value_source(id.as_str()),
                Some(
                    clap::parser::ValueSource::CommandLine | clap::parser::ValueSource::EnvVariable
                )
            );
            if let (true, Some(value)) = (typed, flag_table.get(id.as_str())) {
                merged.insert(id.to_string(), value.clone());
            } else if let (true, Some(value)) =
                (typed, flag_cluster.and_then(|t| t.get(id.as_str())))
            {
                // A `[cluster]` key given as a flag (`--nats`).
                let cluster = merged
                    .entry("cluster")
                    .or_insert_with(|| toml::Value::Table(toml::Table::new()));
                if let Some(table) = cluster.as_table_mut() {
                    table.insert(id.to_string(), value.clone());
                }
            }
        }
        Ok(RelayConfig::deserialize(merged).expect("file and flags were each valid"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, FromArgMatches, Parser};

    #[derive(Parser)]
    struct Cli {
        #[arg(long)]
        config: Option<PathBuf>,
        #[command(flatten)]
        relay: RelayConfig,
    }

    fn load(args: &[&str], file: &str) -> Result<RelayConfig, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("relay.toml");
        std::fs::write(&path, file).unwrap();
        let matches = Cli::command().get_matches_from(args);
        let cli = Cli::from_arg_matches(&matches).unwrap();
        RelayConfig::load(Some(&path), &cli.relay, &matches)
    }

    #[test]
    fn flags_beat_the_file_and_the_file_beats_defaults() {
        let c = load(
            &["relay", "--max-connections", "7"],
            "max_connections = 5\nidle_timeout = \"12s\"\n",
        )
        .unwrap();
        assert_eq!(c.max_connections, 7);
        assert_eq!(c.idle_timeout, Duration::from_secs(12));
        assert_eq!(c.listen, RelayConfig::default().listen);
    }

    #[test]
    fn the_nats_flag_lands_in_the_cluster_section() {
        let c = load(
            &[
                "relay",
                "--nats",
                "nats://127.0.0.1:4222,nats://127.0.0.1:4223",
            ],
            "[cluster]\nreplicas = 3\nrequest_timeout = \"2s\"\n",
        )
        .unwrap();
        assert_eq!(
            c.cluster.nats,
            ["nats://127.0.0.1:4222", "nats://127.0.0.1:4223"]
        );
        assert_eq!(c.cluster.replicas, 3);
        assert_eq!(c.cluster.request_timeout, Duration::from_secs(2));
        assert_eq!(c.cluster.stream, "PTT_CLIPS");
        assert!(!RelayConfig::default().cluster.enabled());
    }

    #[test]
    fn unknown_keys_and_bad_values_are_errors() {
        let e = load(&["relay"], "max_conections = 5\n").unwrap_err();
        assert!(e.to_string().contains("max_conections"), "{e}");
        assert!(load(&["relay"], "idle_timeout = \"soon\"\n").is_err());
    }

    #[test]
    fn the_production_example_parses() {
        let text = include_str!("../deploy/relay.toml");
        let c: RelayConfig = toml::from_str(text).unwrap();
        assert_eq!(c.listen.port(), 4433);
        assert!(c.cert.is_some() && c.key.is_some());
    }

    #[test]
    fn the_example_file_parses_and_matches_the_defaults() {
        let text = include_str!("../relay.example.toml");
        let c: RelayConfig = toml::from_str(text).unwrap();
        assert_eq!(c, RelayConfig::default());
    }
}
