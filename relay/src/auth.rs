//! Signed, expiring tokens that carry the user id and claims.
//!
//! Format: `ptt1.<claims>.<signature>`, where `claims` is the base64url
//! (no padding) of a JSON object `{"sub":"alice","exp":1763700000,
//! "adm":false,"emg":false}` and `signature` the base64url of the Ed25519
//! signature over the ASCII bytes `ptt1.<claims>`. The relay verifies a
//! token with the public key alone, without a store lookup, so any service
//! that holds the signing key can issue tokens.

use std::path::Path;
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
}

/// Checks tokens with the relay's Ed25519 public key.
#[derive(Debug, Clone)]
pub struct TokenVerifier {
    public_key: Vec<u8>,
}

impl TokenVerifier {
    /// A verifier for a raw 32-byte Ed25519 public key.
    pub fn new(public_key: [u8; 32]) -> TokenVerifier {
        TokenVerifier {
            public_key: public_key.to_vec(),
        }
    }

    /// A verifier for a public key written as base64url or standard base64.
    pub fn from_base64(text: &str) -> Option<TokenVerifier> {
        let text = text.trim();
        let bytes = B64
            .decode(text.trim_end_matches('='))
            .or_else(|_| base64::engine::general_purpose::STANDARD.decode(text))
            .ok()?;
        let key: [u8; 32] = bytes.try_into().ok()?;
        Some(TokenVerifier::new(key))
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
        let signed = &token[..PREFIX.len() + claims_b64.len()];
        UnparsedPublicKey::new(&ED25519, &self.public_key)
            .verify(signed.as_bytes(), &signature)
            .map_err(|_| TokenError::BadSignature)?;
        let json = B64
            .decode(claims_b64)
            .map_err(|_| TokenError::Malformed("claims are not base64url"))?;
        let claims: Claims = serde_json::from_slice(&json)
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
}

impl TokenIssuer {
    /// An issuer with a new random key (tests and the embedded simulator).
    pub fn generate() -> TokenIssuer {
        let pkcs8 = generate_pkcs8();
        TokenIssuer {
            key: Ed25519KeyPair::from_pkcs8(&pkcs8).expect("ring parses the key it just made"),
        }
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
        Ok(TokenIssuer { key })
    }

    /// The verifier for this issuer's tokens.
    pub fn verifier(&self) -> TokenVerifier {
        let mut key = [0u8; 32];
        key.copy_from_slice(self.key.public_key().as_ref());
        TokenVerifier::new(key)
    }

    /// The public key as base64url, for `token_public_key` in a relay's
    /// configuration.
    pub fn public_key_base64(&self) -> String {
        B64.encode(self.key.public_key().as_ref())
    }

    /// Signs `claims`.
    pub fn sign(&self, claims: &Claims) -> String {
        let json = serde_json::to_vec(claims).expect("claims serialize");
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
