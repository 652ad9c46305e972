//! Connecting to the relay with the stored login, and the terminal's live
//! status (indicatif on a terminal, plain lines otherwise).

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use ptt_client::{Client, ClientConfig, Events, ReconnectPolicy, Trust};

use crate::config::StoredLogin;
use crate::exit::{UNREACHABLE, status};

/// How the command should connect.
#[derive(Debug, Clone, Copy)]
pub struct ConnectOptions {
    /// Acknowledge each whole clip as soon as it arrives (off when the
    /// command acknowledges after saving, or must not move the cursor).
    pub auto_ack: bool,
    /// Reconnect after a lost connection (long-running commands).
    pub reconnect: bool,
}

/// Resolves `HOST:PORT` to the first address it names.
pub async fn resolve(relay: &str) -> Result<SocketAddr> {
    tokio::net::lookup_host(relay)
        .await
        .with_context(|| format!("cannot resolve {relay:?} (expected HOST:PORT)"))?
        .next()
        .ok_or_else(|| status(UNREACHABLE, format!("{relay:?} resolves to no address")))
}

/// The TLS server name for `relay` when none is given: its host part if it
/// is a name, else `localhost` (the name in the relay's own certificate).
pub fn default_server_name(relay: &str) -> String {
    let host = relay
        .rsplit_once(':')
        .map_or(relay, |(h, _)| h)
        .trim_start_matches('[')
        .trim_end_matches(']');
    if host.is_empty() || host.parse::<std::net::IpAddr>().is_ok() {
        "localhost".to_owned()
    } else {
        host.to_owned()
    }
}

/// The client configuration for a stored login.
pub async fn client_config(login: &StoredLogin, options: ConnectOptions) -> Result<ClientConfig> {
    let addr = resolve(&login.relay).await?;
    let trust = match (&login.pin, &login.ca_pem) {
        (Some(pin), _) => Trust::fingerprint_from_hex(pin)?,
        (None, Some(pem)) => Trust::CertificatePem(pem.clone().into_bytes()),
        (None, None) => anyhow::bail!("the stored login has neither a pin nor a CA"),
    };
    let mut config = ClientConfig::new(addr, login.server_name.clone(), trust, login.token.clone())
        .with_client_name(concat!("ptt-cli/", env!("CARGO_PKG_VERSION")))
        .with_auto_ack(options.auto_ack);
    if options.reconnect {
        config = config.with_reconnect(ReconnectPolicy::default());
    }
    config.connect_timeout = Duration::from_secs(10);
    Ok(config)
}

/// Connects with the stored login.
pub async fn connect(login: &StoredLogin, options: ConnectOptions) -> Result<(Client, Events)> {
    let config = client_config(login, options).await?;
    let (client, events) = Client::connect(config)
        .await
        .with_context(|| format!("cannot connect to {}", login.relay))?;
    Ok((client, events))
}

/// The mode's name as the relay's `group create --mode` spells it.
pub fn mode_name(mode: ptt_client::GroupMode) -> &'static str {
    match mode {
        ptt_client::GroupMode::Walkie => "walkie",
        ptt_client::GroupMode::Notes => "notes",
    }
}

/// Where status and results go: progress bars and spinners on stderr when
/// both stdout and stderr are terminals; otherwise plain lines, results on
/// stdout and status on stderr.
#[derive(Debug, Clone)]
pub struct Ui {
    multi: Option<MultiProgress>,
}

impl Ui {
    /// Decides from the terminals we run on.
    pub fn detect() -> Ui {
        let interactive = std::io::stdout().is_terminal() && std::io::stderr().is_terminal();
        Ui {
            multi: interactive
                .then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr())),
        }
    }

    /// Whether progress bars are drawn.
    pub fn interactive(&self) -> bool {
        self.multi.is_some()
    }

    /// Prints a result line on stdout (above any progress bar).
    pub fn result(&self, line: &str) {
        match &self.multi {
            Some(m) => m.suspend(|| println!("{line}")),
            None => println!("{line}"),
        }
    }

    /// Prints a status line on stderr (above any progress bar).
    pub fn status(&self, line: &str) {
        match &self.multi {
            Some(m) => m.suspend(|| eprintln!("{line}")),
            None => eprintln!("ptt: {line}"),
        }
    }

    /// A spinner with a message, or a hidden bar when not interactive.
    pub fn spinner(&self, message: impl Into<String>) -> ProgressBar {
        match &self.multi {
            Some(m) => {
                let bar = m.add(ProgressBar::new_spinner());
                bar.set_style(
                    ProgressStyle::with_template("{spinner} {msg} [{elapsed}]")
                        .expect("a valid template"),
                );
                bar.set_message(message.into());
                bar.enable_steady_tick(Duration::from_millis(120));
                bar
            }
            None => ProgressBar::hidden(),
        }
    }

    /// A bar of `len` units with `template`, or a hidden bar.
    pub fn bar(&self, len: u64, template: &str) -> ProgressBar {
        match &self.multi {
            Some(m) => {
                let bar = m.add(ProgressBar::new(len));
                bar.set_style(
                    ProgressStyle::with_template(template)
                        .expect("a valid template")
                        .progress_chars("█▉▊▋▌▍▎▏ "),
                );
                bar
            }
            None => ProgressBar::hidden(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_server_name_is_the_host_unless_it_is_an_address() {
        assert_eq!(
            default_server_name("relay.example.org:4433"),
            "relay.example.org"
        );
        assert_eq!(default_server_name("127.0.0.1:4433"), "localhost");
        assert_eq!(default_server_name("[::1]:4433"), "localhost");
        assert_eq!(default_server_name("localhost:1"), "localhost");
    }
}
