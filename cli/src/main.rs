//! `ptt`: a command-line client of the push-to-talk relay, for people and
//! scripts.
//!
//! ```text
//! ptt login --relay HOST:PORT (--pin HEX | --ca FILE) --token TOKEN [--user ID]
//! ptt groups
//! ptt talk GROUP FILE.wav [--fast]
//! ptt talk GROUP - [--rate 48000] [--channels 1]      # s16le PCM on stdin
//! ptt listen GROUP [--save DIR] [--played] [--count N] [--timeout 30s]
//! ptt history GROUP [--count 10] [--save DIR]
//! ```
//!
//! Results go to stdout, one line each; status and progress to stderr
//! (progress bars only when both are terminals). The exit status says what
//! went wrong (see [`exit`]); the error message names the protocol's error
//! code.

mod clip;
mod config;
mod exit;
mod listen;
mod session;
mod talk;
mod waveform;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use crate::config::{StoredLogin, config_path};
use crate::exit::{AUTH, BAD_INPUT, status};
use crate::session::{ConnectOptions, Ui, client_config, default_server_name};

#[derive(Parser)]
#[command(
    name = "ptt",
    version,
    about = "Talk and listen on a push-to-talk relay",
    after_help = "Exit status: 0 ok, 1 other failure, 2 usage, 3 not logged in, \
                  4 relay unreachable or connection lost, 5 token refused, \
                  6 request refused by the relay, 7 timed out before --count clips, \
                  8 unusable audio input."
)]
struct Cli {
    /// The configuration file [default: $XDG_CONFIG_HOME/ptt/config.toml].
    #[arg(long, global = true, env = "PTT_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check a token against a relay and store the relay address, how its
    /// certificate is trusted, and the token (file mode 0600).
    Login(LoginArgs),
    /// List your groups and their modes.
    Groups,
    /// Send a WAV file, or raw s16le PCM from stdin (`-`), live to a group.
    Talk(TalkCli),
    /// Print (and save) each clip of a group as it arrives: first the ones
    /// you missed, then live.
    Listen(ListenCli),
    /// Print (and save) a group's most recent clips.
    History(HistoryCli),
}

#[derive(Args)]
#[group(id = "trust", required = true, multiple = false)]
struct TrustArgs {
    /// The relay certificate's SHA-256 fingerprint (64 hex digits, as the
    /// relay prints it).
    #[arg(long, group = "trust")]
    pin: Option<String>,
    /// A PEM file of certificates (a CA, or the relay's own certificate) to
    /// verify the relay against.
    #[arg(long, group = "trust")]
    ca: Option<PathBuf>,
}

#[derive(Args)]
struct LoginArgs {
    /// The relay's UDP address.
    #[arg(long, value_name = "HOST:PORT")]
    relay: String,
    #[command(flatten)]
    trust: TrustArgs,
    /// The token (`ptt1.…`) from `relay token` or your app's backend.
    #[arg(long, env = "PTT_TOKEN", hide_env_values = true)]
    token: String,
    /// Fail unless the relay welcomes the token as this user.
    #[arg(long)]
    user: Option<String>,
    /// The TLS server name [default: the relay's host name, or `localhost`
    /// for an IP address].
    #[arg(long)]
    server_name: Option<String>,
    /// Store without connecting to check the token.
    #[arg(long)]
    no_check: bool,
}

#[derive(Args)]
struct TalkCli {
    /// The group.
    group: String,
    /// A WAV file, or `-` for raw PCM (signed 16-bit little-endian,
    /// interleaved) on stdin.
    input: PathBuf,
    /// Stdin's sample rate in Hz.
    #[arg(long, default_value_t = 48_000)]
    rate: u32,
    /// Stdin's channel count.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=8))]
    channels: u16,
    /// Send the file as fast as the connection allows instead of in real time.
    #[arg(long)]
    fast: bool,
    /// Talk with emergency priority (the token needs the emergency claim).
    #[arg(long)]
    emergency: bool,
}

#[derive(Args)]
struct ListenCli {
    /// The group.
    group: String,
    /// Save each clip as GROUP-SEQ.opus (Ogg Opus) in this folder.
    #[arg(long, value_name = "DIR")]
    save: Option<PathBuf>,
    /// Tell the talker each clip was played once it is printed.
    #[arg(long)]
    played: bool,
    /// Stop after this many clips.
    #[arg(long, value_name = "N")]
    count: Option<u64>,
    /// Stop after this long (`30s`, `5m`); with --count, not having them
    /// all by then is an error (status 7).
    #[arg(long, value_parser = humantime::parse_duration)]
    timeout: Option<Duration>,
}

#[derive(Args)]
struct HistoryCli {
    /// The group.
    group: String,
    /// How many of the most recent clips.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=100))]
    count: u32,
    /// Save each clip as GROUP-SEQ.opus (Ogg Opus) in this folder.
    #[arg(long, value_name = "DIR")]
    save: Option<PathBuf>,
    /// Give up after this long.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return exit::report(&anyhow::Error::new(e).context("cannot start")),
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::from(exit::OK),
        Err(e) => exit::report(&e),
    }
}

async fn run(cli: Cli) -> Result<()> {
    let path = config_path(cli.config.as_deref())?;
    let ui = Ui::detect();
    match cli.command {
        Command::Login(args) => login(&ui, &path, args).await,
        Command::Groups => groups(&ui, &StoredLogin::load(&path)?).await,
        Command::Talk(a) => {
            let login = StoredLogin::load(&path)?;
            let args = talk::TalkArgs {
                group: a.group,
                input: a.input,
                rate: a.rate,
                channels: a.channels,
                fast: a.fast,
                emergency: a.emergency,
            };
            talk::run(&ui, &login, &args).await
        }
        Command::Listen(a) => {
            let login = StoredLogin::load(&path)?;
            let args = listen::ListenArgs {
                group: a.group,
                save: a.save,
                played: a.played,
                count: a.count,
                timeout: a.timeout,
            };
            listen::listen(&ui, &login, &args).await
        }
        Command::History(a) => {
            let login = StoredLogin::load(&path)?;
            let args = listen::HistoryArgs {
                group: a.group,
                count: a.count,
                save: a.save,
                timeout: a.timeout,
            };
            listen::history(&ui, &login, &args).await
        }
    }
}

async fn login(ui: &Ui, path: &std::path::Path, args: LoginArgs) -> Result<()> {
    let (pin, ca_pem) = match (&args.trust.pin, &args.trust.ca) {
        (Some(pin), _) => {
            let fp = ptt_client::parse_fingerprint(pin)
                .map_err(|e| status(exit::USAGE, format!("--pin: {e}")))?;
            (Some(fp.iter().map(|b| format!("{b:02x}")).collect()), None)
        }
        (None, Some(ca)) => {
            let pem = std::fs::read_to_string(ca)
                .with_context(|| format!("cannot read {}", ca.display()))
                .map_err(|e| status(BAD_INPUT, format!("{e:#}")))?;
            (None, Some(pem))
        }
        (None, None) => unreachable!("clap requires --pin or --ca"),
    };
    let mut stored = StoredLogin {
        server_name: args
            .server_name
            .clone()
            .unwrap_or_else(|| default_server_name(&args.relay)),
        relay: args.relay,
        pin,
        ca_pem,
        token: args.token.trim().to_owned(),
        user: None,
    };
    if !args.no_check {
        let config = client_config(
            &stored,
            ConnectOptions {
                auto_ack: true,
                reconnect: false,
            },
        )
        .await?;
        let (client, _events) = ptt_client::Client::connect(config)
            .await
            .with_context(|| format!("cannot log in to {}", stored.relay))?;
        let user = client.user();
        client.close().await;
        if let Some(expected) = &args.user
            && *expected != user
        {
            return Err(status(
                AUTH,
                format!("the token is for {user:?}, not {expected:?}"),
            ));
        }
        stored.user = Some(user);
    } else {
        stored.user = args.user;
    }
    stored.save(path)?;
    let who = stored.user.as_deref().unwrap_or("(not checked)");
    ui.result(&format!(
        "logged in to {} as {who}; saved in {}",
        stored.relay,
        path.display()
    ));
    Ok(())
}

async fn groups(ui: &Ui, login: &StoredLogin) -> Result<()> {
    let (client, _events) = session::connect(
        login,
        ConnectOptions {
            auto_ack: true,
            reconnect: false,
        },
    )
    .await?;
    let groups = client.list_groups().await;
    client.close().await;
    let mut groups = groups.context("cannot list the groups")?;
    groups.sort_by(|a, b| a.group.cmp(&b.group));
    for g in groups {
        ui.result(&format!("{} {}", g.group, session::mode_name(g.mode)));
    }
    Ok(())
}
