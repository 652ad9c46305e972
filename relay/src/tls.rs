//! The relay's TLS certificate and QUIC transport settings.
//!
//! Deployments pass PEM files, which the relay reads again when they change
//! ([`CertResolver`], [`CertFiles`]): a renewed certificate is presented to
//! new connections without a restart, while connections already open keep
//! theirs. Out of the box the relay makes a self-signed certificate for
//! `localhost` and `127.0.0.1` on first start, keeps it in the data
//! directory, and prints its SHA-256 fingerprint for clients to pin.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::QuicServerConfig;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use rustls::sign::CertifiedKey;

pub use crate::web::cert::CertResolver;

/// A certificate chain and its key.
#[derive(Debug)]
pub struct Identity {
    /// The chain, leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's private key.
    pub key: PrivateKeyDer<'static>,
}

/// Why the certificate could not be loaded or made.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or written.
    #[error("{path}: {error}")]
    Io {
        /// The file.
        path: String,
        /// The failure.
        error: std::io::Error,
    },
    /// A PEM file holds no certificate or key, or a damaged one.
    #[error("{path}: {detail}")]
    Pem {
        /// The file.
        path: String,
        /// What is wrong.
        detail: String,
    },
    /// rustls or rcgen refused the material.
    #[error("TLS setup failed: {0}")]
    Setup(String),
}

impl Identity {
    /// Loads a PEM certificate chain and private key.
    pub fn from_pem_files(cert: &Path, key: &Path) -> Result<Identity, TlsError> {
        let read = |path: &Path| {
            std::fs::read(path).map_err(|error| TlsError::Io {
                path: path.display().to_string(),
                error,
            })
        };
        Identity::from_pem(cert, &read(cert)?, key, &read(key)?)
    }

    /// Parses a PEM certificate chain and private key read from the files
    /// named (for the errors).
    fn from_pem(
        cert_path: &Path,
        cert: &[u8],
        key_path: &Path,
        key: &[u8],
    ) -> Result<Identity, TlsError> {
        let pem_err = |path: &Path, detail: String| TlsError::Pem {
            path: path.display().to_string(),
            detail,
        };
        let chain = CertificateDer::pem_slice_iter(cert)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| pem_err(cert_path, e.to_string()))?;
        if chain.is_empty() {
            return Err(pem_err(cert_path, "no certificate found".into()));
        }
        let key =
            PrivateKeyDer::from_pem_slice(key).map_err(|e| pem_err(key_path, e.to_string()))?;
        Ok(Identity { chain, key })
    }

    /// Loads `cert.pem`/`key.pem` from `dir`, creating a self-signed pair
    /// for `localhost` and `127.0.0.1` if they do not exist.
    pub fn load_or_create_dev(dir: &Path) -> Result<Identity, TlsError> {
        let cert_path = dir.join("dev-cert.pem");
        let key_path = dir.join("dev-key.pem");
        if !cert_path.exists() {
            let io = |error| TlsError::Io {
                path: dir.display().to_string(),
                error,
            };
            std::fs::create_dir_all(dir).map_err(io)?;
            let (cert_pem, key_pem) = self_signed_pem()?;
            crate::auth::write_private(&key_path, key_pem.as_bytes()).map_err(io)?;
            std::fs::write(&cert_path, cert_pem).map_err(io)?;
        }
        Identity::from_pem_files(&cert_path, &key_path)
    }

    /// A new self-signed identity held in memory (tests).
    pub fn self_signed() -> Result<Identity, TlsError> {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
            .map_err(|e| TlsError::Setup(e.to_string()))?;
        Ok(Identity {
            chain: vec![cert.cert.der().clone()],
            key: PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into()),
        })
    }

    /// The SHA-256 fingerprint of the leaf certificate, 64 hex digits.
    pub fn fingerprint(&self) -> String {
        fingerprint_hex(&self.chain[0])
    }

    /// The leaf certificate as PEM, for clients that trust it directly.
    pub fn leaf_pem(&self) -> String {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD.encode(self.chain[0].as_ref());
        let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
        for line in b64.as_bytes().chunks(64) {
            pem.push_str(std::str::from_utf8(line).unwrap_or_default());
            pem.push('\n');
        }
        pem.push_str("-----END CERTIFICATE-----\n");
        pem
    }
}

/// The SHA-256 of a DER certificate, as lowercase hex.
pub fn fingerprint_hex(cert: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, cert);
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

fn self_signed_pem() -> Result<(String, String), TlsError> {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
        .map_err(|e| TlsError::Setup(e.to_string()))?;
    Ok((cert.cert.pem(), cert.signing_key.serialize_pem()))
}

/// A certified key from `identity`, refused if the key does not match the
/// certificate.
pub(crate) fn certified_key(identity: Identity) -> Result<CertifiedKey, TlsError> {
    let provider = rustls::crypto::ring::default_provider();
    CertifiedKey::from_der(identity.chain, identity.key, &provider)
        .map_err(|e| TlsError::Setup(e.to_string()))
}

/// The certificate and key files of a deployment, and what was last read
/// from them: [`CertFiles::check`] reloads them into a [`CertResolver`]
/// when their contents change (a renewal writes new files, or replaces
/// them by a rename).
#[derive(Debug)]
pub struct CertFiles {
    cert: PathBuf,
    key: PathBuf,
    /// The bytes of the pair last tried, good or bad: a bad pair is
    /// reported once, not at every check.
    last: (Vec<u8>, Vec<u8>),
}

impl CertFiles {
    /// Watches `cert` and `key`, whose current contents the resolver
    /// already presents.
    pub fn new(cert: &Path, key: &Path) -> CertFiles {
        CertFiles {
            cert: cert.to_owned(),
            key: key.to_owned(),
            last: (
                std::fs::read(cert).unwrap_or_default(),
                std::fs::read(key).unwrap_or_default(),
            ),
        }
    }

    /// Reads the files; if they changed since the last check, loads them
    /// into `resolver`. `Ok(true)`: a new certificate is presented;
    /// `Ok(false)`: nothing changed; `Err`: the new files are not a valid
    /// pair (or cannot be read) and the old certificate stays.
    pub fn check(&mut self, resolver: &CertResolver) -> Result<bool, TlsError> {
        let read = |path: &Path| {
            std::fs::read(path).map_err(|error| TlsError::Io {
                path: path.display().to_string(),
                error,
            })
        };
        let cert = read(&self.cert)?;
        let key = read(&self.key)?;
        if (&cert, &key) == (&self.last.0, &self.last.1) {
            return Ok(false);
        }
        let identity = Identity::from_pem(&self.cert, &cert, &self.key, &key);
        self.last = (cert, key);
        resolver.replace(identity?)?;
        Ok(true)
    }
}

/// Transport settings for many connections carrying small voice frames.
#[derive(Debug, Clone)]
pub struct TransportTuning {
    /// Close a connection after this long without any packet.
    pub idle_timeout: Duration,
    /// Streams a client may open at once (its clip uploads).
    pub max_uni_streams: u32,
}

/// A quinn server configuration presenting the certificates `resolver`
/// picks (by ALPN: native clients `ptt/1`, browsers `h3`,
/// [`crate::web::cert`]); the native one is swapped in place when its
/// files change ([`CertFiles`]).
///
/// Windows are sized for voice, not bulk transfer: an Opus clip is tens of
/// KB, so a 64 KiB stream window and 512 KiB connection window let a member
/// receive several clips at once without letting one connection pin
/// megabytes of relay memory; keep-alive is the client's job (it sits behind
/// the NAT), the relay only enforces the idle timeout. Datagrams are
/// accepted, a few at a time, for members' `LiveRead` reports
/// ([`crate::delivery::LiveReads`]).
pub fn server_config(
    resolver: Arc<CertResolver>,
    tuning: &TransportTuning,
) -> Result<quinn::ServerConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Setup(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    tls.alpn_protocols = vec![
        ptt_protocol::ALPN.to_vec(),
        crate::transport::WEB_ALPN.to_vec(),
    ];
    tls.max_early_data_size = 0;
    let crypto = QuicServerConfig::try_from(tls).map_err(|e| TlsError::Setup(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(tuning.idle_timeout)
                .map_err(|e| TlsError::Setup(e.to_string()))?,
        ))
        .max_concurrent_bidi_streams(1u32.into())
        .max_concurrent_uni_streams(tuning.max_uni_streams.into())
        .stream_receive_window((64u32 * 1024).into())
        .receive_window((512u32 * 1024).into())
        .send_window(512 * 1024)
        .datagram_receive_buffer_size(Some(ptt_protocol::LIVE_READ_BUFFER));
    // Members ACK a few voice frames at once (see
    // `ptt_protocol::ACK_ELICITING_THRESHOLD`): at 80 ms RTT this cut relay
    // CPU per delivered frame by 14 %. quinn caps the delay asked at the
    // RTT (`ptt_protocol::ACK_MAX_DELAY_MS`), so the constant is above the
    // RTTs of phones and the RTT is the cap.
    let mut ack = quinn::AckFrequencyConfig::default();
    ack.ack_eliciting_threshold(ptt_protocol::ACK_ELICITING_THRESHOLD.into())
        .max_ack_delay(Some(Duration::from_millis(ptt_protocol::ACK_MAX_DELAY_MS)));
    transport.ack_frequency_config(Some(ack));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_identity_is_created_once_and_fingerprint_is_stable() {
        let dir = tempfile::tempdir().unwrap();
        let a = Identity::load_or_create_dev(dir.path()).unwrap();
        let b = Identity::load_or_create_dev(dir.path()).unwrap();
        assert_eq!(a.fingerprint(), b.fingerprint());
        assert_eq!(a.fingerprint().len(), 64);
        assert!(a.leaf_pem().starts_with("-----BEGIN CERTIFICATE-----"));
    }

    #[test]
    fn bad_pem_files_are_typed_errors() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("c.pem");
        let key = dir.path().join("k.pem");
        std::fs::write(&cert, "not pem").unwrap();
        std::fs::write(&key, "not pem").unwrap();
        assert!(matches!(
            Identity::from_pem_files(&cert, &key),
            Err(TlsError::Pem { .. })
        ));
        assert!(Identity::from_pem_files(&dir.path().join("missing"), &key).is_err());
    }

    #[test]
    fn changed_files_are_reloaded_and_bad_ones_keep_the_old_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("cert.pem");
        let key = dir.path().join("key.pem");
        let write = |(c, k): &(String, String)| {
            std::fs::write(&cert, c).unwrap();
            std::fs::write(&key, k).unwrap();
        };
        let first = self_signed_pem().unwrap();
        write(&first);
        let resolver = CertResolver::new(
            &Identity::from_pem_files(&cert, &key).unwrap(),
            false,
            std::time::SystemTime::now(),
        )
        .unwrap();
        let old = resolver.fingerprint();
        let mut files = CertFiles::new(&cert, &key);
        assert!(!files.check(&resolver).unwrap(), "nothing changed");

        // A certificate with another certificate's key: refused, kept.
        let second = self_signed_pem().unwrap();
        std::fs::write(&cert, &second.0).unwrap();
        assert!(files.check(&resolver).is_err());
        assert_eq!(resolver.fingerprint(), old);
        // Reported once, not at every check.
        assert!(!files.check(&resolver).unwrap());
        // The key follows: the pair is presented.
        std::fs::write(&key, &second.1).unwrap();
        assert!(files.check(&resolver).unwrap());
        let new = resolver.fingerprint();
        assert_ne!(new, old);
        assert_eq!(
            new,
            Identity::from_pem_files(&cert, &key).unwrap().fingerprint()
        );

        std::fs::write(&cert, "garbage").unwrap();
        assert!(matches!(files.check(&resolver), Err(TlsError::Pem { .. })));
        std::fs::remove_file(&key).unwrap();
        assert!(matches!(files.check(&resolver), Err(TlsError::Io { .. })));
        assert_eq!(resolver.fingerprint(), new);
    }
}
