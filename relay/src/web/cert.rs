//! The certificates the relay presents: the native one (pinned by its
//! fingerprint, or a real one) to `ptt/1` clients, and to browsers (ALPN
//! `h3`) either the same real certificate or, in development, a short-lived
//! one that Chromium accepts through WebTransport's
//! `serverCertificateHashes`: ECDSA P-256, valid at most 14 days
//! ([`WEB_CERT_VALIDITY`]), made in memory at start and renewed by the relay
//! ([`renew_loop`]) long before it expires. The page reads the hashes from
//! the relay's HTTP listener before each connect.
//!
//! Choosing by ALPN keeps the native fingerprint stable: rotating the
//! development certificate every few days would otherwise break every
//! native client's pin.

use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_util::sync::CancellationToken;

use crate::tls::{Identity, TlsError, fingerprint_hex};
use crate::transport::WEB_ALPN;

/// How long a development certificate for browsers is valid, from its
/// `not_before` (an hour before it was made, for clock skew) to its
/// `not_after`: under Chromium's limit of 14 days.
pub const WEB_CERT_VALIDITY: Duration = Duration::from_secs(13 * 24 * 3600);

/// A development certificate for browsers is replaced this long after it
/// was made, a week before it expires: a page that fetched the old hash
/// keeps its connection, and its next connect fetches the new one.
pub const WEB_CERT_RENEW_AFTER: Duration = Duration::from_secs(6 * 24 * 3600);

const SKEW: Duration = Duration::from_secs(3600);

/// A short-lived development certificate for browsers.
#[derive(Debug)]
pub struct WebCert {
    key: Arc<CertifiedKey>,
    /// SHA-256 of its DER, the value of `serverCertificateHashes`.
    pub sha256: String,
    /// Its `not_before`.
    pub not_before: SystemTime,
    /// Its `not_after`.
    pub not_after: SystemTime,
}

impl WebCert {
    /// Makes one for `localhost` and `127.0.0.1`, valid from an hour
    /// before `now` for [`WEB_CERT_VALIDITY`].
    pub fn generate(now: SystemTime) -> Result<WebCert, TlsError> {
        let setup = |e: rcgen::Error| TlsError::Setup(e.to_string());
        let not_before = now.checked_sub(SKEW).unwrap_or(now);
        let not_after = not_before + WEB_CERT_VALIDITY;
        let mut params =
            rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
                .map_err(setup)?;
        params.not_before = offset_time(not_before)?;
        params.not_after = offset_time(not_after)?;
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(setup)?;
        let cert = params.self_signed(&key).map_err(setup)?;
        let der: CertificateDer<'static> = cert.der().clone();
        let sha256 = fingerprint_hex(&der);
        let private = PrivateKeyDer::Pkcs8(key.serialize_der().into());
        Ok(WebCert {
            key: Arc::new(certified(vec![der], &private)?),
            sha256,
            not_before,
            not_after,
        })
    }

    /// When the relay replaces it.
    pub fn renew_at(&self) -> SystemTime {
        self.not_before + SKEW + WEB_CERT_RENEW_AFTER
    }
}

/// Picks the certificate for each TLS handshake by the client's ALPN.
#[derive(Debug)]
pub struct CertResolver {
    native: Arc<CertifiedKey>,
    web: RwLock<WebCerts>,
}

#[derive(Debug)]
enum WebCerts {
    /// Browsers get the native (real) certificate.
    Same,
    /// Development: the current short-lived certificate and the hash of
    /// the one before it (a page may have fetched it just before renewal).
    Dev {
        current: WebCert,
        previous: Option<String>,
    },
}

impl CertResolver {
    /// A resolver presenting `identity` to native clients, and to browsers
    /// either the same (`dev` false: a real certificate) or a development
    /// certificate made at `now`.
    pub fn new(identity: &Identity, dev: bool, now: SystemTime) -> Result<CertResolver, TlsError> {
        let native = Arc::new(certified(identity.chain.clone(), &identity.key)?);
        let web = if dev {
            WebCerts::Dev {
                current: WebCert::generate(now)?,
                previous: None,
            }
        } else {
            WebCerts::Same
        };
        Ok(CertResolver {
            native,
            web: RwLock::new(web),
        })
    }

    /// The SHA-256 hashes (hex) a page passes as `serverCertificateHashes`:
    /// empty when browsers get a real certificate.
    pub fn certificate_hashes(&self) -> Vec<String> {
        match &*self.web.read().unwrap_or_else(PoisonError::into_inner) {
            WebCerts::Same => Vec::new(),
            WebCerts::Dev { current, previous } => std::iter::once(current.sha256.clone())
                .chain(previous.clone())
                .collect(),
        }
    }

    /// When the development certificate must be replaced; `None` with a
    /// real certificate.
    pub fn renew_at(&self) -> Option<SystemTime> {
        match &*self.web.read().unwrap_or_else(PoisonError::into_inner) {
            WebCerts::Same => None,
            WebCerts::Dev { current, .. } => Some(current.renew_at()),
        }
    }

    /// Replaces the development certificate with one made at `now` if it
    /// is due; true if it did.
    pub fn renew_if_due(&self, now: SystemTime) -> Result<bool, TlsError> {
        match self.renew_at() {
            Some(at) if at <= now => {}
            _ => return Ok(false),
        }
        let fresh = WebCert::generate(now)?;
        let mut web = self.web.write().unwrap_or_else(PoisonError::into_inner);
        if let WebCerts::Dev { current, previous } = &mut *web {
            let old = std::mem::replace(current, fresh);
            *previous = Some(old.sha256);
        }
        Ok(true)
    }

    fn web_key(&self) -> Arc<CertifiedKey> {
        match &*self.web.read().unwrap_or_else(PoisonError::into_inner) {
            WebCerts::Same => self.native.clone(),
            WebCerts::Dev { current, .. } => current.key.clone(),
        }
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let offers = |alpn: &[u8]| hello.alpn().into_iter().flatten().any(|p| p == alpn);
        // A browser offers `h3` alone; a native client `ptt/1`.
        if offers(WEB_ALPN) && !offers(ptt_protocol::ALPN) {
            Some(self.web_key())
        } else {
            Some(self.native.clone())
        }
    }
}

/// Renews the development certificate when due, until `shutdown`.
pub async fn renew_loop(resolver: Arc<CertResolver>, shutdown: CancellationToken) {
    while let Some(at) = resolver.renew_at() {
        let wait = at
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO)
            // Wake at least hourly: a suspended machine's clock jumps.
            .min(Duration::from_secs(3600));
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        match resolver.renew_if_due(SystemTime::now()) {
            Ok(true) => tracing::info!("renewed the browsers' development certificate"),
            Ok(false) => {}
            Err(e) => {
                tracing::error!(error = %e, "renewing the browsers' certificate failed");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(60)) => {}
                }
            }
        }
    }
}

fn certified(
    chain: Vec<CertificateDer<'static>>,
    key: &PrivateKeyDer<'_>,
) -> Result<CertifiedKey, TlsError> {
    let signing = rustls::crypto::ring::sign::any_supported_type(key)
        .map_err(|e| TlsError::Setup(e.to_string()))?;
    Ok(CertifiedKey::new(chain, signing))
}

fn offset_time(t: SystemTime) -> Result<time::OffsetDateTime, TlsError> {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_err(|e| TlsError::Setup(e.to_string()))?
        .as_secs();
    time::OffsetDateTime::from_unix_timestamp(secs as i64)
        .map_err(|e| TlsError::Setup(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn development_certificates_are_short_lived_and_renewed_before_expiry() {
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_767_225_600);
        let identity = Identity::self_signed().unwrap();
        let resolver = CertResolver::new(&identity, true, start).unwrap();
        let first = resolver.certificate_hashes();
        assert_eq!(first.len(), 1);
        assert_ne!(first[0], identity.fingerprint());
        let renew_at = resolver.renew_at().unwrap();
        assert!(renew_at > start);
        // Not due a second early; due at the time; the old hash is kept.
        assert!(
            !resolver
                .renew_if_due(renew_at - Duration::from_secs(1))
                .unwrap()
        );
        assert!(resolver.renew_if_due(renew_at).unwrap());
        let second = resolver.certificate_hashes();
        assert_eq!(second.len(), 2);
        assert_ne!(second[0], first[0]);
        assert_eq!(second[1], first[0]);
        assert!(resolver.renew_at().unwrap() > renew_at);
    }

    #[test]
    fn a_development_certificate_meets_chromiums_rules() {
        let now = SystemTime::now();
        let cert = WebCert::generate(now).unwrap();
        let validity = cert.not_after.duration_since(cert.not_before).unwrap();
        assert!(validity <= Duration::from_secs(14 * 24 * 3600));
        assert!(cert.not_before <= now && cert.not_after > now);
        // Renewed while well within its validity.
        assert!(cert.renew_at() < cert.not_after - Duration::from_secs(24 * 3600));
        // ECDSA P-256 with SHA-256.
        assert_eq!(cert.key.key.algorithm(), rustls::SignatureAlgorithm::ECDSA);
    }

    #[test]
    fn a_real_certificate_is_shown_to_browsers_without_hashes() {
        let identity = Identity::self_signed().unwrap();
        let resolver = CertResolver::new(&identity, false, SystemTime::now()).unwrap();
        assert!(resolver.certificate_hashes().is_empty());
        assert!(resolver.renew_at().is_none());
        assert!(Arc::ptr_eq(&resolver.web_key(), &resolver.native));
    }
}
