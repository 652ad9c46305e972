//! Signed, expiring tokens that carry the user id and claims.
//!
//! Format: `ptt1.<claims>.<signature>`, where `claims` is the base64url
//! (no padding) of a JSON object `{"sub":"alice","exp":1763700000,
//! "adm":false,"emg":false,"kid":"k2026-12-01-1a2b"}` and `signature` the
//! base64url of the Ed25519 signature over the ASCII bytes `ptt1.<claims>`.
//! The relay verifies a token with a public key alone, without a store
//! lookup, so any service that holds a signing key can issue tokens.
//!
//! # Keys and their rotation
//! `kid` names the key that signed the token. The relay accepts several
//! keys at once ([`TokenVerifier`]): the data directory's `token.key` (and
//! `token_public_key`) for tokens without a `kid`, as before key ids
//! existed; every key in the data directory's `keys/` ([`KeyRing`]), whose
//! `current` file names the one `relay token` signs with; and public keys
//! given in the configuration (`token_keys`, for other issuers). `relay key
//! rotate` adds a key and makes it current; tokens signed with older keys
//! stay valid until those keys are retired (`relay key retire`). A running
//! relay reads `keys/` again every `reload_interval`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use ptt_protocol::{ErrorCode, is_valid_id};
use ring::rand::SystemRandom;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use serde::{Deserialize, Serialize};

const PREFIX: &str = "ptt1.";

/// What a valid token says about its bearer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The user id.
    pub sub: String,
    /// Expiry, Unix seconds.
    pub exp: u64,
    /// May administer groups.
    #[serde(default)]
    pub adm: bool,
    /// May take the floor with emergency priority.
    #[serde(default)]
    pub emg: bool,
}

/// The signed JSON: the claims and the id of the key that signed them.
#[derive(Serialize, Deserialize)]
struct Signed<C> {
    #[serde(flatten)]
    claims: C,
    /// The signing key's id; absent in tokens of the data directory's
    /// original key (or `token_public_key`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kid: Option<String>,
}

/// Only the key id, read before the signature is checked.
#[derive(Deserialize)]
struct KeyIdOnly {
    #[serde(default)]
    kid: Option<String>,
}

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not of the form `ptt1.<claims>.<signature>`, or the claims do not
    /// parse.
    #[error("malformed token: {0}")]
    Malformed(&'static str),
    /// The signature does not verify with the relay's key.
    #[error("token signature is invalid")]
    BadSignature,
    /// The token expired.
    #[error("token expired")]
    Expired,
    /// The token names a key the relay does not accept (never known, or
    /// retired).
    #[error("token signed with an unknown key {0:?}")]
    UnknownKey(String),
}

impl TokenError {
    /// The wire code sent to the client.
    pub fn code(&self) -> ErrorCode {
        match self {
            TokenError::Expired => ErrorCode::TokenExpired,
            _ => ErrorCode::InvalidToken,
        }
    }
}

/// Why a key could not be loaded or made.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Reading or writing the key file failed.
    #[error("key file {path}: {error}")]
    Io {
        /// The file.
        path: String,
        /// The failure.
        error: std::io::Error,
    },
    /// The file does not hold a valid key.
    #[error("key file {path} does not hold a valid Ed25519 key")]
    Invalid {
        /// The file.
        path: String,
    },
    /// The key is current (rotate first), or its id is not a key id.
    #[error("key {0:?} is current or not a key id; it cannot be retired")]
    Current(String),
}

/// The public keys a verifier accepts.
#[derive(Debug, Default)]
struct KeySet {
    /// For tokens without a key id.
    unnamed: Option<[u8; 32]>,
    /// Given in the configuration; never reloaded.
    configured: HashMap<String, [u8; 32]>,
    /// Read from the data directory's `keys/`; replaced on reload.
    ring: HashMap<String, [u8; 32]>,
}

/// Checks tokens against the public keys the relay accepts (see the
/// module documentation). Clones share the key set, so a reload reaches
/// every connection task.
#[derive(Debug, Clone)]
pub struct TokenVerifier {
    keys: Arc<RwLock<KeySet>>,
}

impl TokenVerifier {
    /// A verifier for a raw 32-byte Ed25519 public key, for tokens without
    /// a key id.
    pub fn new(public_key: [u8; 32]) -> TokenVerifier {
        TokenVerifier {
            keys: Arc::new(RwLock::new(KeySet {
                unnamed: Some(public_key),
                ..KeySet::default()
            })),
        }
    }

    /// A verifier that accepts no token until keys are added.
    pub fn empty() -> TokenVerifier {
        TokenVerifier {
            keys: Arc::default(),
        }
    }

    /// A verifier for a public key written as base64url or standard base64.
    pub fn from_base64(text: &str) -> Option<TokenVerifier> {
        parse_public_key(text).map(TokenVerifier::new)
    }

    /// Also accepts tokens whose `kid` is `kid`, signed by `public_key`
    /// (configured keys of other issuers).
    pub fn add_key(&self, kid: &str, public_key: [u8; 32]) {
        self.write().configured.insert(kid.to_owned(), public_key);
    }

    /// Replaces the keys read from the data directory's key ring; returns
    /// whether they changed.
    pub fn set_ring(&self, ring: HashMap<String, [u8; 32]>) -> bool {
        let mut keys = self.write();
        let changed = keys.ring != ring;
        keys.ring = ring;
        changed
    }

    /// The ids of the named keys accepted now, sorted.
    pub fn key_ids(&self) -> Vec<String> {
        let keys = self.keys.read().unwrap_or_else(|p| p.into_inner());
        let mut ids: Vec<String> = keys
            .configured
            .keys()
            .chain(keys.ring.keys())
            .cloned()
            .collect();
        ids.sort();
        ids.dedup();
        ids
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, KeySet> {
        self.keys.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The key for tokens naming `kid` (or none).
    fn key_for(&self, kid: Option<&str>) -> Result<[u8; 32], TokenError> {
        let keys = self.keys.read().unwrap_or_else(|p| p.into_inner());
        match kid {
            None => keys.unnamed.ok_or(TokenError::UnknownKey(String::new())),
            Some(kid) => keys
                .configured
                .get(kid)
                .or_else(|| keys.ring.get(kid))
                .copied()
                .ok_or_else(|| TokenError::UnknownKey(kid.to_owned())),
        }
    }

    /// Verifies `token` at `now` and returns its claims.
    pub fn verify(&self, token: &str, now: SystemTime) -> Result<Claims, TokenError> {
        let rest = token
            .strip_prefix(PREFIX)
            .ok_or(TokenError::Malformed("missing ptt1. prefix"))?;
        let (claims_b64, sig_b64) = rest
            .split_once('.')
            .ok_or(TokenError::Malformed("missing signature"))?;
        let signature = B64
            .decode(sig_b64)
            .map_err(|_| TokenError::Malformed("signature is not base64url"))?;
        let json = B64
            .decode(claims_b64)
            .map_err(|_| TokenError::Malformed("claims are not base64url"))?;
        // The key id picks the key; nothing else is believed before the
        // signature is checked with it.
        let KeyIdOnly { kid } = serde_json::from_slice(&json)
            .map_err(|_| TokenError::Malformed("claims are not JSON"))?;
        let public_key = self.key_for(kid.as_deref())?;
        let signed = &token[..PREFIX.len() + claims_b64.len()];
        UnparsedPublicKey::new(&ED25519, &public_key)
            .verify(signed.as_bytes(), &signature)
            .map_err(|_| TokenError::BadSignature)?;
        let Signed { claims, .. }: Signed<Claims> = serde_json::from_slice(&json)
            .map_err(|_| TokenError::Malformed("claims are not JSON"))?;
        if !is_valid_id(&claims.sub) {
            return Err(TokenError::Malformed("invalid user id"));
        }
        if unix_seconds(now) >= claims.exp {
            return Err(TokenError::Expired);
        }
        Ok(claims)
    }
}

/// Issues tokens with an Ed25519 private key.
#[derive(Debug)]
pub struct TokenIssuer {
    key: Ed25519KeyPair,
    /// The key's id, written into every token; `None` for the data
    /// directory's original `token.key`.
    kid: Option<String>,
}

impl TokenIssuer {
    /// An issuer with a new random key (tests and the embedded simulator).
    pub fn generate() -> TokenIssuer {
        let pkcs8 = generate_pkcs8();
        TokenIssuer {
            key: Ed25519KeyPair::from_pkcs8(&pkcs8).expect("ring parses the key it just made"),
            kid: None,
        }
    }

    /// This issuer with key id `kid` written into its tokens.
    pub fn with_kid(mut self, kid: impl Into<String>) -> TokenIssuer {
        self.kid = Some(kid.into());
        self
    }

    /// The key id written into its tokens, if any.
    pub fn kid(&self) -> Option<&str> {
        self.kid.as_deref()
    }

    /// Loads the PKCS#8 key at `path`, which must exist.
    pub fn load(path: &Path) -> Result<TokenIssuer, KeyError> {
        let pkcs8 = std::fs::read(path).map_err(|error| KeyError::Io {
            path: path.display().to_string(),
            error,
        })?;
        let key = Ed25519KeyPair::from_pkcs8(&pkcs8).map_err(|_| KeyError::Invalid {
            path: path.display().to_string(),
        })?;
        Ok(TokenIssuer { key, kid: None })
    }

    /// The raw public key.
    pub fn public_key(&self) -> [u8; 32] {
        let mut key = [0u8; 32];
        key.copy_from_slice(self.key.public_key().as_ref());
        key
    }

    /// Loads the PKCS#8 key at `path`, creating it (mode 0600) if missing.
    pub fn load_or_create(path: &Path) -> Result<TokenIssuer, KeyError> {
        let io = |error| KeyError::Io {
            path: path.display().to_string(),
            error,
        };
        let pkcs8 = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let bytes = generate_pkcs8();
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir).map_err(io)?;
                }
                write_private(path, &bytes).map_err(io)?;
                bytes
            }
            Err(e) => return Err(io(e)),
        };
        let key = Ed25519KeyPair::from_pkcs8(&pkcs8).map_err(|_| KeyError::Invalid {
            path: path.display().to_string(),
        })?;
        Ok(TokenIssuer { key, kid: None })
    }

    /// The verifier for this issuer's tokens.
    pub fn verifier(&self) -> TokenVerifier {
        match &self.kid {
            None => TokenVerifier::new(self.public_key()),
            Some(kid) => {
                let verifier = TokenVerifier::empty();
                verifier.add_key(kid, self.public_key());
                verifier
            }
        }
    }

    /// The public key as base64url, for `token_public_key` in a relay's
    /// configuration.
    pub fn public_key_base64(&self) -> String {
        B64.encode(self.key.public_key().as_ref())
    }

    /// Signs `claims`.
    pub fn sign(&self, claims: &Claims) -> String {
        let json = serde_json::to_vec(&Signed {
            claims,
            kid: self.kid.clone(),
        })
        .expect("claims serialize");
        let mut token = format!("{PREFIX}{}", B64.encode(json));
        let sig = self.key.sign(token.as_bytes());
        token.push('.');
        token.push_str(&B64.encode(sig.as_ref()));
        token
    }

    /// A token for `user` valid for `ttl` from now.
    pub fn issue(&self, user: &str, ttl: Duration, admin: bool, emergency: bool) -> String {
        self.sign(&Claims {
            sub: user.to_owned(),
            exp: unix_seconds(SystemTime::now()) + ttl.as_secs().max(1),
            adm: admin,
            emg: emergency,
        })
    }
}

/// Parses an Ed25519 public key written as base64url or standard base64.
pub fn parse_public_key(text: &str) -> Option<[u8; 32]> {
    let text = text.trim();
    let bytes = B64
        .decode(text.trim_end_matches('='))
        .or_else(|_| base64::engine::general_purpose::STANDARD.decode(text))
        .ok()?;
    bytes.try_into().ok()
}

/// The signing keys in a data directory's `keys/`: `<kid>.key` files
/// (PKCS#8, mode 0600) and `current`, the id of the key new tokens are
/// signed with.
#[derive(Debug, Clone)]
pub struct KeyRing {
    dir: PathBuf,
}

impl KeyRing {
    /// The key ring of `data_dir`.
    pub fn new(data_dir: &Path) -> KeyRing {
        KeyRing {
            dir: data_dir.join("keys"),
        }
    }

    fn io(&self, error: std::io::Error) -> KeyError {
        KeyError::Io {
            path: self.dir.display().to_string(),
            error,
        }
    }

    /// Makes a new key and makes it current; returns its id. Tokens signed
    /// with the keys before it stay valid until those are retired.
    pub fn rotate(&self) -> Result<String, KeyError> {
        std::fs::create_dir_all(&self.dir).map_err(|e| self.io(e))?;
        let now = SystemTime::now();
        let mut suffix = [0u8; 2];
        ring::rand::SecureRandom::fill(&SystemRandom::new(), &mut suffix)
            .map_err(|_| self.io(std::io::Error::other("no random source")))?;
        let kid = format!("k{}-{:04x}", unix_seconds(now), u16::from_be_bytes(suffix));
        write_private(&self.dir.join(format!("{kid}.key")), &generate_pkcs8())
            .map_err(|e| self.io(e))?;
        // Written aside and renamed: a reader sees the old id or the new.
        let tmp = self.dir.join("current.tmp");
        std::fs::write(&tmp, format!("{kid}\n")).map_err(|e| self.io(e))?;
        std::fs::rename(&tmp, self.dir.join("current")).map_err(|e| self.io(e))?;
        Ok(kid)
    }

    /// The id of the current key, if a key was ever rotated in.
    pub fn current(&self) -> Result<Option<String>, KeyError> {
        match std::fs::read_to_string(self.dir.join("current")) {
            Ok(text) => Ok(Some(text.trim().to_owned())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.io(e)),
        }
    }

    /// The issuer of the current key, if a key was ever rotated in.
    pub fn current_issuer(&self) -> Result<Option<TokenIssuer>, KeyError> {
        let Some(kid) = self.current()? else {
            return Ok(None);
        };
        let issuer = TokenIssuer::load(&self.dir.join(format!("{kid}.key")))?;
        Ok(Some(issuer.with_kid(kid)))
    }

    /// Every key's id and public key (none if there is no `keys/`).
    pub fn public_keys(&self) -> Result<HashMap<String, [u8; 32]>, KeyError> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(HashMap::new()),
            Err(e) => return Err(self.io(e)),
        };
        let mut keys = HashMap::new();
        for entry in entries {
            let path = entry.map_err(|e| self.io(e))?.path();
            let Some(kid) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".key"))
            else {
                continue;
            };
            keys.insert(kid.to_owned(), TokenIssuer::load(&path)?.public_key());
        }
        Ok(keys)
    }

    /// Deletes key `kid`: tokens it signed are refused from the next
    /// reload on. The current key cannot be retired (rotate first).
    pub fn retire(&self, kid: &str) -> Result<(), KeyError> {
        if self.current()?.as_deref() == Some(kid) {
            return Err(KeyError::Current(kid.to_owned()));
        }
        let valid = !kid.is_empty()
            && kid
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !valid {
            return Err(KeyError::Current(kid.to_owned()));
        }
        std::fs::remove_file(self.dir.join(format!("{kid}.key"))).map_err(|e| self.io(e))
    }
}

fn generate_pkcs8() -> Vec<u8> {
    Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
        .expect("the system random source works")
        .as_ref()
        .to_vec()
}

/// Writes a file readable by its owner only.
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// Seconds since the Unix epoch.
pub fn unix_seconds(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
}

/// Milliseconds since the Unix epoch.
pub fn unix_millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_tokens_verify_and_carry_claims() {
        let issuer = TokenIssuer::generate();
        let token = issuer.issue("alice", Duration::from_secs(60), true, false);
        let claims = issuer.verifier().verify(&token, SystemTime::now()).unwrap();
        assert_eq!(claims.sub, "alice");
        assert!(claims.adm && !claims.emg);
        let again = TokenVerifier::from_base64(&issuer.public_key_base64()).unwrap();
        assert_eq!(again.verify(&token, SystemTime::now()).unwrap(), claims);
    }

    #[test]
    fn expired_forged_and_garbage_tokens_are_refused() {
        let issuer = TokenIssuer::generate();
        let v = issuer.verifier();
        let token = issuer.issue("alice", Duration::from_secs(60), false, false);
        let later = SystemTime::now() + Duration::from_secs(61);
        assert_eq!(v.verify(&token, later), Err(TokenError::Expired));
        assert_eq!(TokenError::Expired.code(), ErrorCode::TokenExpired);

        let other = TokenIssuer::generate().issue("alice", Duration::from_secs(60), true, true);
        assert_eq!(
            v.verify(&other, SystemTime::now()),
            Err(TokenError::BadSignature)
        );

        // Claims swapped under a valid signature.
        let admin = issuer.issue("mallory", Duration::from_secs(60), true, false);
        let (_, sig) = token.rsplit_once('.').unwrap();
        let (head, _) = admin.rsplit_once('.').unwrap();
        let spliced = format!("{head}.{sig}");
        assert_eq!(
            v.verify(&spliced, SystemTime::now()),
            Err(TokenError::BadSignature)
        );

        for junk in ["", "ptt1.", "ptt1.abc", "xyz.a.b", "ptt1.!!.??"] {
            assert_eq!(
                v.verify(junk, SystemTime::now()).unwrap_err().code(),
                ErrorCode::InvalidToken,
                "{junk:?}"
            );
        }
    }

    #[test]
    fn rotated_keys_sign_with_their_id_and_old_tokens_stay_valid_until_retired() {
        let dir = tempfile::tempdir().unwrap();
        let original = TokenIssuer::load_or_create(&dir.path().join("token.key")).unwrap();
        let ring = KeyRing::new(dir.path());
        assert!(ring.current_issuer().unwrap().is_none());
        let verifier = original.verifier();
        let old = original.issue("alice", Duration::from_secs(60), false, false);

        let first = ring.rotate().unwrap();
        let second = ring.rotate().unwrap();
        assert_ne!(first, second);
        let issuer = ring.current_issuer().unwrap().unwrap();
        assert_eq!(issuer.kid(), Some(second.as_str()));
        let new = issuer.issue("bob", Duration::from_secs(60), false, false);
        // Not accepted before the ring is loaded.
        assert_eq!(
            verifier.verify(&new, SystemTime::now()),
            Err(TokenError::UnknownKey(second.clone()))
        );
        assert!(verifier.set_ring(ring.public_keys().unwrap()));
        assert!(!verifier.set_ring(ring.public_keys().unwrap()), "unchanged");
        assert_eq!(verifier.verify(&new, SystemTime::now()).unwrap().sub, "bob");
        assert_eq!(
            verifier.verify(&old, SystemTime::now()).unwrap().sub,
            "alice"
        );
        let mut both = vec![first.clone(), second.clone()];
        both.sort();
        assert_eq!(verifier.key_ids(), both);

        // A token naming one key but signed by another is refused.
        let forged = TokenIssuer::generate().with_kid(second.clone()).issue(
            "mallory",
            Duration::from_secs(60),
            true,
            false,
        );
        assert_eq!(
            verifier.verify(&forged, SystemTime::now()),
            Err(TokenError::BadSignature)
        );

        assert!(matches!(ring.retire(&second), Err(KeyError::Current(_))));
        assert!(matches!(ring.retire("../token"), Err(KeyError::Current(_))));
        let by_first = TokenIssuer::load(&dir.path().join("keys").join(format!("{first}.key")))
            .unwrap()
            .with_kid(first.clone())
            .issue("carol", Duration::from_secs(60), false, false);
        assert!(verifier.verify(&by_first, SystemTime::now()).is_ok());
        ring.retire(&first).unwrap();
        verifier.set_ring(ring.public_keys().unwrap());
        assert_eq!(
            verifier
                .verify(&by_first, SystemTime::now())
                .unwrap_err()
                .code(),
            ErrorCode::InvalidToken
        );
        assert!(verifier.verify(&new, SystemTime::now()).is_ok());
    }

    #[test]
    fn the_key_file_is_created_once_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token.key");
        let a = TokenIssuer::load_or_create(&path).unwrap();
        let b = TokenIssuer::load_or_create(&path).unwrap();
        assert_eq!(a.public_key_base64(), b.public_key_base64());
        std::fs::write(&path, b"junk").unwrap();
        assert!(matches!(
            TokenIssuer::load_or_create(&path),
            Err(KeyError::Invalid { .. })
        ));
    }
}
