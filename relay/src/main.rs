//! The `relay` command line: serve, issue tokens, administer groups.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use ptt_protocol::GroupMode;
use ptt_relay::RelayConfig;
use ptt_relay::auth::{KeyRing, TokenIssuer};
use ptt_relay::store::{ClipStore, RedbStore};

/// Push-to-talk relay: live fan-out, floor control and store-and-forward
/// of voice clips over QUIC.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the relay (defaults: 127.0.0.1:4433, store in ./data).
    Serve {
        /// TOML configuration file; flags given here win over it.
        #[arg(long)]
        config: Option<PathBuf>,
        #[command(flatten)]
        relay: Box<RelayConfig>,
    },
    /// Print a token signed with the data directory's key.
    Token {
        /// The user id.
        #[arg(long)]
        user: String,
        /// How long it is valid (e.g. 24h, 30m, 7days).
        #[arg(long, value_parser = humantime::parse_duration, default_value = "24h")]
        ttl: Duration,
        /// May administer groups.
        #[arg(long)]
        admin: bool,
        /// May take the floor with emergency priority.
        #[arg(long)]
        emergency: bool,
        /// The data directory.
        #[arg(long, default_value = "./data")]
        data_dir: PathBuf,
    },
    /// Manage the token signing keys in the data directory (works while the
    /// relay runs: it reads the keys again within `reload_interval`).
    Key {
        #[command(subcommand)]
        action: KeyAction,
        /// The data directory.
        #[arg(long, global = true, default_value = "./data")]
        data_dir: PathBuf,
    },
    /// Administer groups in the data directory (while the relay is
    /// stopped; a running relay takes admin messages from admin tokens).
    Group {
        #[command(subcommand)]
        action: GroupAction,
        /// The data directory.
        #[arg(long, global = true, default_value = "./data")]
        data_dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum KeyAction {
    /// Make a new signing key and sign new tokens with it; tokens of the
    /// older keys stay valid until they are retired.
    Rotate,
    /// List the keys: id, public key (for `token_keys` elsewhere), current.
    List,
    /// Stop accepting tokens signed with a key (not the current one).
    Retire {
        /// The key id.
        kid: String,
    },
}

#[derive(Subcommand)]
enum GroupAction {
    /// Create a group.
    Create {
        /// The group id.
        group: String,
        /// walkie (one talker at a time) or notes (voice messages).
        #[arg(long, default_value = "notes")]
        mode: GroupMode,
        /// Longest clip and floor hold.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "60s")]
        max_clip: Duration,
    },
    /// Add members.
    Add {
        /// The group id.
        group: String,
        /// User ids.
        #[arg(required = true)]
        users: Vec<String>,
    },
    /// Remove members.
    Remove {
        /// The group id.
        group: String,
        /// User ids.
        #[arg(required = true)]
        users: Vec<String>,
    },
    /// Change a group's mode.
    Mode {
        /// The group id.
        group: String,
        /// walkie or notes.
        mode: GroupMode,
    },
    /// List groups and their members.
    List,
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("relay: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches)?;
    match cli.command {
        Command::Serve { config, relay } => {
            let serve_matches = matches
                .subcommand_matches("serve")
                .context("serve arguments")?;
            let config = RelayConfig::load(config.as_deref(), &relay, serve_matches)?;
            serve(config)
        }
        Command::Token {
            user,
            ttl,
            admin,
            emergency,
            data_dir,
        } => {
            anyhow::ensure!(ptt_protocol::is_valid_id(&user), "invalid user id {user:?}");
            // The current rotated key, else the original one.
            let issuer = match KeyRing::new(&data_dir).current_issuer()? {
                Some(issuer) => issuer,
                None => TokenIssuer::load_or_create(&data_dir.join("token.key"))?,
            };
            println!("{}", issuer.issue(&user, ttl, admin, emergency));
            Ok(())
        }
        Command::Key { action, data_dir } => key(action, &data_dir),
        Command::Group { action, data_dir } => runtime(0)?.block_on(group(action, &data_dir)),
    }
}

fn runtime(workers: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut builder = if workers == 0 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(workers);
        b
    };
    builder
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn serve(config: RelayConfig) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,quinn=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    runtime(config.worker_threads)?.block_on(async move {
        let data_dir = config.data_dir.clone();
        let mut signals = StopSignals::new()?;
        let handle = ptt_relay::start(config)
            .await
            .context("starting the relay")?;
        eprintln!(
            "\nrelay listening on {addr} (QUIC, ALPN ptt/1)\n  \
             certificate sha-256: {fp}\n  \
             store:               {dir}\n  \
             get a token:         relay token --user alice --data-dir {dir}\n  \
             create a group:      (stop the relay) relay group create team --mode walkie --data-dir {dir}\n  \
             stop:                Ctrl-C or SIGTERM (drains clips in flight)\n",
            addr = handle.addr(),
            fp = handle.cert_fingerprint(),
            dir = data_dir.display(),
        );
        signals.recv().await?;
        tracing::info!("draining (a second Ctrl-C or SIGTERM exits at once)");
        tokio::select! {
            () = handle.shutdown() => Ok(()),
            second = signals.recv() => {
                second?;
                // Every clip answered with Stored was committed durably
                // (fsync) before the answer; what is lost is clips still
                // in flight, which their talkers send again, and cursor
                // moves since the last commit (those clips come again).
                tracing::warn!("second signal: exiting without finishing the drain");
                std::process::exit(1);
            }
        }
    })
}

fn key(action: KeyAction, data_dir: &Path) -> anyhow::Result<()> {
    use base64::Engine;
    let ring = KeyRing::new(data_dir);
    match action {
        KeyAction::Rotate => {
            let kid = ring.rotate()?;
            println!("{kid} is the current key; `relay token` signs with it from now on");
        }
        KeyAction::List => {
            let current = ring.current()?;
            let original = data_dir.join("token.key");
            if original.exists() {
                let key = TokenIssuer::load(&original)?;
                let mark = if current.is_none() { "\tcurrent" } else { "" };
                println!("(no kid)\t{}{mark}", key.public_key_base64());
            }
            let mut keys: Vec<_> = ring.public_keys()?.into_iter().collect();
            keys.sort();
            for (kid, public) in keys {
                let mark = if current.as_deref() == Some(kid.as_str()) {
                    "\tcurrent"
                } else {
                    ""
                };
                let public = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(public);
                println!("{kid}\t{public}{mark}");
            }
        }
        KeyAction::Retire { kid } => {
            ring.retire(&kid)?;
            println!("retired {kid}; a running relay refuses its tokens within reload_interval");
        }
    }
    Ok(())
}

async fn group(action: GroupAction, data_dir: &Path) -> anyhow::Result<()> {
    let store: Arc<dyn ClipStore> = Arc::new(
        RedbStore::open(data_dir).with_context(|| format!("opening {}", data_dir.display()))?,
    );
    let store = &*store;
    use ptt_relay::admin;
    match action {
        GroupAction::Create {
            group,
            mode,
            max_clip,
        } => {
            let ms = u32::try_from(max_clip.as_millis()).context("max-clip too long")?;
            admin::create_group(store, &group, mode, ms).await?;
            println!("created {group} ({mode})");
        }
        GroupAction::Add { group, users } => {
            for user in users {
                admin::add_member(store, &group, &user).await?;
                println!("added {user} to {group}");
            }
        }
        GroupAction::Remove { group, users } => {
            for user in users {
                admin::remove_member(store, &group, &user).await?;
                println!("removed {user} from {group}");
            }
        }
        GroupAction::Mode { group, mode } => {
            admin::set_mode(store, &group, mode).await?;
            println!("{group} is now {mode}");
        }
        GroupAction::List => {
            for g in store.groups().await? {
                let members: Vec<_> = g.members.iter().map(String::as_str).collect();
                println!(
                    "{}\t{}\tmax {} s\t{}",
                    g.id,
                    g.mode,
                    g.max_clip_ms / 1000,
                    members.join(",")
                );
            }
        }
    }
    store.flush().await?;
    Ok(())
}

/// Ctrl-C and SIGTERM (what service managers send). Made before the
/// relay starts and kept, so that no signal between the first and the
/// second is missed.
struct StopSignals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn new() -> anyhow::Result<StopSignals> {
        Ok(StopSignals {
            #[cfg(unix)]
            term: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .context("installing the SIGTERM handler")?,
        })
    }

    /// Waits for the next Ctrl-C or SIGTERM.
    async fn recv(&mut self) -> anyhow::Result<()> {
        #[cfg(unix)]
        {
            tokio::select! {
                r = tokio::signal::ctrl_c() => r.context("waiting for Ctrl-C"),
                _ = self.term.recv() => Ok(()),
            }
        }
        #[cfg(not(unix))]
        {
            tokio::signal::ctrl_c().await.context("waiting for Ctrl-C")
        }
    }
}
