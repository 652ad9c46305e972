//! The stored login: which relay, how its certificate is trusted, and the
//! token, in a TOML file only its owner can read.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

/// The name of the file in the configuration directory.
const FILE_NAME: &str = "config.toml";

/// The largest configuration file read (a token is at most 2 KiB, a CA
/// bundle a few KiB).
const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// What `ptt login` stores and every other command reads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredLogin {
    /// The relay, as `HOST:PORT` (resolved at each connection).
    pub relay: String,
    /// The TLS server name (SNI, and the name checked with `ca_pem`).
    pub server_name: String,
    /// The relay certificate's SHA-256 fingerprint, 64 hex digits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pin: Option<String>,
    /// PEM certificates to verify the relay's chain against.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_pem: Option<String>,
    /// The signed token (`ptt1.…`).
    pub token: String,
    /// The user id the relay welcomed this token as, when checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

/// The configuration file: `explicit` if given, else `config.toml` in the
/// `ptt` folder of the user's configuration directory
/// (`$XDG_CONFIG_HOME/ptt`, `~/.config/ptt` on Linux).
pub fn config_path(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(path) = explicit {
        return Ok(path.to_owned());
    }
    let dir = dirs::config_dir()
        .context("no configuration directory (set XDG_CONFIG_HOME or HOME, or pass --config)")?;
    Ok(dir.join("ptt").join(FILE_NAME))
}

/// A configuration file is missing or unreadable: the user must log in.
#[derive(Debug)]
pub struct NotLoggedIn(pub PathBuf);

impl std::fmt::Display for NotLoggedIn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "not logged in: {} does not exist (run `ptt login --relay HOST:PORT --pin HEX --token TOKEN` first)",
            self.0.display()
        )
    }
}

impl std::error::Error for NotLoggedIn {}

impl StoredLogin {
    /// Reads the login stored at `path`.
    pub fn load(path: &Path) -> Result<StoredLogin> {
        let file = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(NotLoggedIn(path.to_owned()).into());
            }
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::Read::take(file, MAX_CONFIG_BYTES), &mut text)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let login: StoredLogin =
            toml::from_str(&text).with_context(|| format!("{} is not valid", path.display()))?;
        if login.pin.is_none() == login.ca_pem.is_none() {
            bail!(
                "{}: exactly one of `pin` and `ca_pem` must be set",
                path.display()
            );
        }
        Ok(login)
    }

    /// Writes the login to `path` with mode 0600 (in a folder created with
    /// 0700), replacing the file at once so that a reader never sees half
    /// of it.
    pub fn save(&self, path: &Path) -> Result<()> {
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        create_private_dir(dir)?;
        let text = toml::to_string(self).context("cannot serialise the login")?;
        // A temporary file is created with mode 0600 on Unix.
        let mut tmp = tempfile::Builder::new()
            .prefix(".config.")
            .suffix(".tmp")
            .tempfile_in(dir)
            .with_context(|| format!("cannot write in {}", dir.display()))?;
        tmp.write_all(
            b"# Written by `ptt login`: the relay, how its certificate is trusted, and the token.\n",
        )?;
        tmp.write_all(text.as_bytes())?;
        tmp.as_file().sync_all()?;
        set_private(tmp.path())?;
        tmp.persist(path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        Ok(())
    }
}

#[cfg(unix)]
fn create_private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))
}

#[cfg(not(unix))]
fn create_private_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))
}

#[cfg(unix)]
fn set_private(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot restrict {}", path.display()))
}

#[cfg(not(unix))]
fn set_private(_path: &Path) -> Result<()> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn login() -> StoredLogin {
        StoredLogin {
            relay: "relay.example:4433".into(),
            server_name: "relay.example".into(),
            pin: Some("ab".repeat(32)),
            ca_pem: None,
            token: "ptt1.x.y".into(),
            user: Some("alice".into()),
        }
    }

    #[test]
    fn a_saved_login_reads_back_and_only_its_owner_can_read_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("config.toml");
        login().save(&path).unwrap();
        assert_eq!(StoredLogin::load(&path).unwrap(), login());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
            let mode = std::fs::metadata(path.parent().unwrap())
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o700);
        }
    }

    #[test]
    fn a_missing_file_says_to_log_in_and_a_bad_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        let err = StoredLogin::load(&path).unwrap_err();
        assert!(err.downcast_ref::<NotLoggedIn>().is_some(), "{err:#}");
        std::fs::write(&path, "relay = 1\n").unwrap();
        assert!(StoredLogin::load(&path).is_err());
        let mut both = login();
        both.ca_pem = Some("pem".into());
        std::fs::write(&path, toml::to_string(&both).unwrap()).unwrap();
        let err = StoredLogin::load(&path).unwrap_err();
        assert!(format!("{err:#}").contains("exactly one"), "{err:#}");
    }
}
