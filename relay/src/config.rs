//! The relay's configuration: one struct read from an optional TOML file
//! with command-line flags on top. `relay.example.toml` in the crate
//! documents every field.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

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
    /// Most connections at once.
    #[arg(long, default_value_t = 20_000)]
    pub max_connections: usize,
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
    /// On shutdown, how long clips in flight may take to finish.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Tokio worker threads (0: a current-thread runtime).
    #[arg(long, default_value_t = 2)]
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
    /// A configuration for tests: port 0 on loopback, the given data
    /// directory, short timeouts.
    pub fn for_tests(data_dir: &Path) -> RelayConfig {
        RelayConfig {
            listen: "127.0.0.1:0".parse().expect("valid address"),
            data_dir: data_dir.to_owned(),
            shutdown_grace: Duration::from_secs(1),
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
        for id in matches.ids() {
            let typed = matches!(
                matches.value_source(id.as_str()),
                Some(
                    clap::parser::ValueSource::CommandLine | clap::parser::ValueSource::EnvVariable
                )
            );
            if let (true, Some(value)) = (typed, flag_table.get(id.as_str())) {
                merged.insert(id.to_string(), value.clone());
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
    fn unknown_keys_and_bad_values_are_errors() {
        let e = load(&["relay"], "max_conections = 5\n").unwrap_err();
        assert!(e.to_string().contains("max_conections"), "{e}");
        assert!(load(&["relay"], "idle_timeout = \"soon\"\n").is_err());
    }

    #[test]
    fn the_example_file_parses_and_matches_the_defaults() {
        let text = include_str!("../relay.example.toml");
        let c: RelayConfig = toml::from_str(text).unwrap();
        assert_eq!(c, RelayConfig::default());
    }
}
