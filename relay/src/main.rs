//! The `relay` command line: serve, issue tokens, administer groups.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use ptt_protocol::GroupMode;
use ptt_relay::RelayConfig;
use ptt_relay::auth::{KeyRing, TokenIssuer};
use ptt_relay::config::LogFormat;
use ptt_relay::store::{ClipStore, RedbStore, StoreError};

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
    /// Administer groups: in the data directory when no relay runs on it,
    /// otherwise through the running relay (over QUIC, with an admin token
    /// signed by the data directory's key).
    Group {
        #[command(subcommand)]
        action: GroupAction,
        #[command(flatten)]
        target: AdminTarget,
    },
}

/// Where `relay group` applies its changes.
#[derive(clap::Args, Debug, Clone)]
struct AdminTarget {
    /// The data directory (its store when no relay runs on it; its token
    /// key and certificate otherwise).
    #[arg(long, global = true, default_value = "./data")]
    data_dir: PathBuf,
    /// The running relay's address (used when the store is locked by it).
    #[arg(long, global = true, default_value = "127.0.0.1:4433")]
    relay: SocketAddr,
    /// The relay's certificate SHA-256 (64 hex digits); default: the
    /// development certificate in the data directory.
    #[arg(long, global = true)]
    fingerprint: Option<String>,
    /// The TLS server name.
    #[arg(long, global = true, default_value = "localhost")]
    server_name: String,
    /// An admin token (`PTT_ADMIN_TOKEN`); default: one signed now with
    /// the data directory's key, valid five minutes.
    #[arg(long, global = true, env = "PTT_ADMIN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// A cluster's NATS servers (comma-separated): administer the groups
    /// the nodes share, in NATS directly, while they run (they see every
    /// change at once). With `--config`, its `[cluster]` section is used.
    #[arg(long, global = true, value_delimiter = ',')]
    nats: Vec<String>,
    /// The relay's configuration file, for its `[cluster]` section (the
    /// cluster's stream, prefix, replicas, credentials).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
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
    /// Set a group's live latency budget: live frames of notes groups and
    /// channels may wait this long to be sent together (fewer packets).
    Budget {
        /// The group id.
        group: String,
        /// Milliseconds (0: each frame at once; at most 250), or `default`
        /// for the relay's `live_budget_ms`.
        budget: String,
    },
    /// List groups and their members.
    List,
    /// List a group's members with their cursor and last-seen time.
    Members {
        /// The group id.
        group: String,
    },
    /// List a group's stored clips (seq, talker, duration, size, created).
    Clips {
        /// The group id.
        group: String,
        /// Start after this sequence number.
        #[arg(long, default_value_t = 0)]
        after: u64,
        /// How many at most.
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Delete a stored clip; members drop it from their apps.
    Delete {
        /// The group id.
        group: String,
        /// The clip's sequence number.
        seq: u64,
    },
    /// Export a stored clip as an Ogg Opus file.
    Export {
        /// The group id.
        group: String,
        /// The clip's sequence number.
        seq: u64,
        /// The file to write (`.ogg` or `.opus`).
        #[arg(long, short)]
        out: PathBuf,
    },
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
        Command::Group { action, target } => runtime(0)?.block_on(group(action, &target)),
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
    init_logs(config.log_format);
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
             create a group:      relay group create team --mode walkie --data-dir {dir} (works while it runs)\n  \
             stop:                Ctrl-C or SIGTERM (drains clips in flight)\n",
            addr = handle.addr(),
            fp = handle.cert_fingerprint(),
            dir = data_dir.display(),
        );
        if let Some(web) = handle.web_addr() {
            eprintln!("  browser page:        http://{web}/ (WebTransport on {})\n", handle.addr());
        }
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

/// Runs a group command on the data directory's store, or, when a
/// running relay holds it, through that relay.
async fn group(action: GroupAction, target: &AdminTarget) -> anyhow::Result<()> {
    if !target.nats.is_empty() || target.config.is_some() {
        return cluster(action, target).await;
    }
    let data_dir = &target.data_dir;
    match RedbStore::open(data_dir) {
        Ok(store) => {
            let store: Arc<dyn ClipStore> = Arc::new(store);
            let result = offline(action, &*store).await;
            store.flush().await?;
            result
        }
        Err(StoreError::Locked { .. }) => online(action, target).await,
        Err(e) => Err(e).with_context(|| format!("opening {}", data_dir.display())),
    }
}

/// A group command against the store (no relay running on it).
async fn offline(action: GroupAction, store: &dyn ClipStore) -> anyhow::Result<()> {
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
        GroupAction::Budget { group, budget } => {
            let budget_ms = parse_budget(&budget)?;
            admin::set_live_budget(store, &group, budget_ms).await?;
            print_budget(&group, budget_ms);
        }
        GroupAction::List => {
            for g in store.groups().await? {
                let members: Vec<_> = g.members.iter().map(String::as_str).collect();
                print_group(&g.id, g.mode, Some(g.max_clip_ms), &members);
            }
        }
        GroupAction::Members { group } => {
            for m in store.member_status(&group).await? {
                print_member(&m);
            }
        }
        GroupAction::Clips {
            group,
            after,
            limit,
        } => {
            for c in store.clip_summaries(&group, after, limit as usize).await? {
                print_clip(&c);
            }
        }
        GroupAction::Delete { group, seq } => {
            let now = ptt_relay::auth::unix_millis(std::time::SystemTime::now());
            store
                .delete_clip(&group, seq, now)
                .await?
                .with_context(|| format!("no clip {seq} stored in {group}"))?;
            println!("deleted {group}/{seq}");
        }
        GroupAction::Export { group, seq, out } => {
            let clip = store
                .clips_after(&group, seq.saturating_sub(1), 1)
                .await?
                .into_iter()
                .find(|c| c.seq == seq)
                .with_context(|| format!("no clip {seq} stored in {group}"))?;
            write_export(&out, &clip.meta, &clip.frames)?;
        }
    }
    Ok(())
}

/// A group command against a cluster's NATS JetStream, where the nodes
/// keep their groups and clips (the same as on a stopped data directory:
/// every node watches the groups and hears of deleted clips).
#[cfg(feature = "nats")]
async fn cluster(action: GroupAction, target: &AdminTarget) -> anyhow::Result<()> {
    use ptt_relay::log::GroupLog;
    use ptt_relay::nats::{Nats, NatsLog, NatsStore};
    let mut config = match &target.config {
        Some(path) => RelayConfig::load(Some(path), &RelayConfig::default(), &Default::default())?,
        None => RelayConfig::default(),
    };
    if !target.nats.is_empty() {
        config.cluster.nats = target.nats.clone();
    }
    anyhow::ensure!(
        config.cluster.enabled(),
        "no NATS servers: give --nats or a configuration with a [cluster] section"
    );
    let retention = ptt_relay::store::RetentionPolicy {
        max_age_ms: config.retention_max_age.as_millis() as u64,
        max_clips_per_group: config.retention_max_clips,
    };
    let nats = Nats::connect(&config.cluster, retention)
        .await
        .with_context(|| format!("connecting to NATS at {:?}", config.cluster.nats))?;
    let log = NatsLog::new(nats.clone());
    let store = NatsStore::new(nats, log.clone());
    let result = offline(action, &store).await;
    // Sends what is queued (a deleted clip's notice to the nodes).
    log.close().await?;
    result
}

/// `--nats` on a relay built without NATS.
#[cfg(not(feature = "nats"))]
async fn cluster(_action: GroupAction, _target: &AdminTarget) -> anyhow::Result<()> {
    anyhow::bail!("this relay was built without the `nats` feature (no cluster support)")
}

/// A group command through the running relay, as an admin client.
async fn online(action: GroupAction, target: &AdminTarget) -> anyhow::Result<()> {
    use ptt_client::{Client, ClientConfig, Event, Trust};
    let token = match &target.token {
        Some(token) => token.clone(),
        None => TokenIssuer::load_or_create(&target.data_dir.join("token.key"))
            .context("reading the data directory's token key")?
            .issue("admin", Duration::from_secs(300), true, false),
    };
    let fingerprint = match &target.fingerprint {
        Some(fp) => fp.clone(),
        None => {
            let cert = target.data_dir.join("dev-cert.pem");
            let pem = std::fs::read(&cert).with_context(|| {
                format!(
                    "reading {} (give --fingerprint for a relay with its own certificate)",
                    cert.display()
                )
            })?;
            use rustls::pki_types::{CertificateDer, pem::PemObject};
            let der = CertificateDer::pem_slice_iter(&pem)
                .next()
                .context("no certificate in dev-cert.pem")?
                .context("reading dev-cert.pem")?;
            ptt_relay::tls::fingerprint_hex(&der)
        }
    };
    let trust = Trust::fingerprint_from_hex(&fingerprint).context("invalid fingerprint")?;
    let mut config = ClientConfig::new(target.relay, &target.server_name, trust, token);
    config.reconnect = None;
    let (client, mut events) = Client::connect(config).await.with_context(|| {
        format!(
            "the store is in use; connecting to the relay at {}",
            target.relay
        )
    })?;
    let result = async {
        match action {
            GroupAction::Create { group, mode, .. } => {
                // The relay gives new groups its own max_clip.
                client.create_group(&group, mode).await?;
                println!("created {group} ({mode})");
            }
            GroupAction::Add { group, users } => {
                for user in users {
                    client.add_member(&group, &user).await?;
                    println!("added {user} to {group}");
                }
            }
            GroupAction::Remove { group, users } => {
                for user in users {
                    client.remove_member(&group, &user).await?;
                    println!("removed {user} from {group}");
                }
            }
            GroupAction::Mode { group, mode } => {
                client.set_mode(&group, mode).await?;
                println!("{group} is now {mode}");
            }
            GroupAction::Budget { group, budget } => {
                let budget_ms = parse_budget(&budget)?;
                client.set_live_budget(&group, budget_ms).await?;
                print_budget(&group, budget_ms);
            }
            GroupAction::List => {
                for g in client.list_groups().await? {
                    let members = client.list_members(&g.group).await?;
                    let members: Vec<_> = members.iter().map(String::as_str).collect();
                    print_group(&g.group, g.mode, None, &members);
                }
            }
            GroupAction::Members { group } => {
                for m in client.member_status(&group).await? {
                    print_member(&m);
                }
            }
            GroupAction::Clips {
                group,
                after,
                limit,
            } => {
                for c in client.list_clips(&group, after, limit).await? {
                    print_clip(&c);
                }
            }
            GroupAction::Delete { group, seq } => {
                client.delete_clip(&group, seq).await?;
                println!("deleted {group}/{seq}");
            }
            GroupAction::Export { group, seq, out } => {
                client.fetch_clip(&group, seq).await?;
                let mut header: Option<ptt_protocol::ClipHeader> = None;
                let mut frames = Vec::new();
                let ours = |h: &Option<ptt_protocol::ClipHeader>, id| {
                    h.as_ref().is_some_and(|h| h.clip_id == id)
                };
                tokio::time::timeout(Duration::from_secs(60), async {
                    while let Some(event) = events.next().await {
                        match event {
                            Event::ClipStarted {
                                header: h, seq: s, ..
                            } if s == seq && h.group == group => header = Some(h),
                            Event::Frame { clip_id, data, .. } if ours(&header, clip_id) => {
                                frames.push(data)
                            }
                            Event::ClipEnded { clip_id, .. } if ours(&header, clip_id) => {
                                return Ok(());
                            }
                            Event::ClipAborted { clip_id, code, .. } if ours(&header, clip_id) => {
                                anyhow::bail!("the clip stopped: {code}");
                            }
                            _ => {}
                        }
                    }
                    anyhow::bail!("the connection ended before the clip arrived")
                })
                .await
                .context("waiting for the clip")??;
                let header = header.context("no clip header")?;
                let meta = ptt_relay::store::ClipMeta {
                    group: header.group,
                    clip_id: header.clip_id,
                    talker: header.talker,
                    format: header.format,
                    sample_rate: header.sample_rate,
                    channels: header.channels,
                    frame_ms: header.frame_ms,
                    created_ms: header.created_ms,
                    flags: header.flags,
                };
                write_export(&out, &meta, &frames)?;
            }
        }
        anyhow::Ok(())
    }
    .await;
    client.close().await;
    result
}

/// `default` or a number of milliseconds.
fn parse_budget(text: &str) -> anyhow::Result<Option<u32>> {
    if text == "default" {
        return Ok(None);
    }
    let ms = text
        .trim_end_matches("ms")
        .parse()
        .with_context(|| format!("live budget {text:?}: milliseconds or `default`"))?;
    Ok(Some(ms))
}

fn print_budget(group: &str, budget_ms: Option<u32>) {
    match budget_ms {
        Some(ms) => println!("{group}: live budget {ms} ms (from members' next join)"),
        None => println!("{group}: live budget of the relay (from members' next join)"),
    }
}

fn print_group(id: &str, mode: GroupMode, max_clip_ms: Option<u32>, members: &[&str]) {
    let max = max_clip_ms.map_or_else(String::new, |ms| format!("\tmax {} s", ms / 1000));
    println!("{id}\t{mode}{max}\t{}", members.join(","));
}

fn print_member(m: &ptt_protocol::MemberState) {
    let seen = match m.last_seen_ms {
        0 => "never".to_owned(),
        ms => humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_millis(ms))
            .to_string(),
    };
    println!("{}\tcursor {}\tlast seen {seen}", m.user, m.cursor);
}

fn print_clip(c: &ptt_protocol::ClipSummary) {
    let created = humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH + Duration::from_millis(c.created_ms),
    );
    println!(
        "{}\t{}\t{}.{:03} s\t{} B\t{created}\t{}",
        c.seq,
        c.talker,
        c.duration_ms / 1000,
        c.duration_ms % 1000,
        c.bytes,
        c.clip_id
    );
}

/// Writes a clip's Opus packets as an Ogg Opus file and says so.
fn write_export(
    out: &Path,
    meta: &ptt_relay::store::ClipMeta,
    frames: &[bytes::Bytes],
) -> anyhow::Result<()> {
    let file = std::fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let mut writer = std::io::BufWriter::new(file);
    ptt_relay::admin::write_ogg_opus(&mut writer, meta, frames)?;
    std::io::Write::flush(&mut writer)?;
    println!(
        "wrote {} ({} frames of {} ms)",
        out.display(),
        frames.len(),
        meta.frame_ms
    );
    Ok(())
}

/// Log lines to stderr, filtered by `RUST_LOG`, as text or JSON (one
/// object per line, with the fields of the current span and its parents:
/// the session's id, address and user; the clip's group and id).
fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,quinn=warn".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .init(),
    }
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
