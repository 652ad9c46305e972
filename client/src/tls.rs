//! TLS and QUIC configuration: certificate pinning by fingerprint or trust
//! in PEM certificates, TLS 1.3 only, ALPN `ptt/1`, the ring provider.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

use crate::config::{ClientConfig, TransportTuning, Trust};
use crate::error::ClientError;

/// Bytes of received QUIC datagrams quinn keeps until the driver reads
/// them (the oldest dropped first): `LiveFrames` from the measurement
/// harness; the relay sends no datagrams.
const LIVE_FRAMES_BUFFER: usize = 64 * 1024;

/// Accepts the one server certificate whose SHA-256 digest (of its DER
/// encoding) is pinned, and still checks that the server holds its private
/// key by verifying the TLS 1.3 handshake signature.
///
/// Names, dates and issuers are not checked: the pin says everything about
/// which certificate is the relay's (this is how the relay's self-signed
/// default certificate is trusted).
#[derive(Debug)]
pub struct FingerprintVerifier {
    fingerprint: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl FingerprintVerifier {
    /// A verifier pinning `fingerprint`, using ring's signature algorithms.
    pub fn new(fingerprint: [u8; 32]) -> FingerprintVerifier {
        FingerprintVerifier {
            fingerprint,
            provider: Arc::new(rustls::crypto::ring::default_provider()),
        }
    }

    /// Whether `cert`'s SHA-256 digest is the pinned one.
    pub fn matches(&self, cert: &[u8]) -> bool {
        sha256(cert) == self.fingerprint
    }
}

/// The SHA-256 digest of `der`, as the relay prints it (hex) at start-up.
pub fn sha256(der: &[u8]) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, der);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

impl ServerCertVerifier for FingerprintVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if self.matches(end_entity.as_ref()) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // QUIC is TLS 1.3 only; a 1.2 handshake never reaches this.
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls13RequiredForQuic,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Builds the rustls configuration for `trust`: TLS 1.3, ring, ALPN `ptt/1`.
pub fn rustls_config(trust: &Trust) -> Result<rustls::ClientConfig, ClientError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ClientError::InvalidConfig(e.to_string()))?;
    let mut config = match trust {
        Trust::Fingerprint(fp) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(FingerprintVerifier::new(*fp)))
            .with_no_client_auth(),
        Trust::CertificatePem(pem) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(pem) {
                let cert = cert.map_err(|e| ClientError::InvalidConfig(format!("bad PEM: {e}")))?;
                roots
                    .add(cert)
                    .map_err(|e| ClientError::InvalidConfig(format!("bad certificate: {e}")))?;
            }
            if roots.is_empty() {
                return Err(ClientError::InvalidConfig(
                    "the PEM holds no certificate".into(),
                ));
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
    };
    config.alpn_protocols = vec![ptt_protocol::ALPN.to_vec()];
    Ok(config)
}

/// Builds the QUIC transport settings.
pub fn transport_config(t: &TransportTuning) -> Result<quinn::TransportConfig, ClientError> {
    let mut transport = quinn::TransportConfig::default();
    transport
        .stream_receive_window(quinn::VarInt::from_u32(t.stream_receive_window))
        .receive_window(quinn::VarInt::from_u32(t.receive_window))
        .send_window(t.send_window)
        .keep_alive_interval(Some(t.keep_alive))
        .max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(t.idle_timeout)
                .map_err(|e| ClientError::InvalidConfig(format!("idle timeout: {e}")))?,
        ))
        .max_concurrent_uni_streams(quinn::VarInt::from_u32(t.max_concurrent_uni_streams))
        // The relay never opens bidirectional streams.
        .max_concurrent_bidi_streams(quinn::VarInt::from_u32(0))
        // Datagrams carry our `LiveRead` reports (PROTOCOL.md, section
        // 4.3). quinn sends datagrams only with reception enabled; the
        // relay sends none, the measurement harness's DATAGRAM live plane
        // (`quinn-floor --live datagram`) sends live frames, so a few
        // hundred of them may wait to be read. A few KiB of reports wait
        // to be sent, the oldest dropped first (only the newest matter).
        .datagram_receive_buffer_size(Some(LIVE_FRAMES_BUFFER))
        .datagram_send_buffer_size(4 * ptt_protocol::LIVE_READ_BUFFER);
    // The relay ACKs a talker's frames a few at a time, as it asks of us:
    // fewer packets for the phone's radio to receive.
    if t.ask_fewer_acks {
        let mut ack = quinn::AckFrequencyConfig::default();
        ack.ack_eliciting_threshold(quinn::VarInt::from_u32(
            ptt_protocol::ACK_ELICITING_THRESHOLD,
        ))
        .max_ack_delay(Some(std::time::Duration::from_millis(
            ptt_protocol::ACK_MAX_DELAY_MS,
        )));
        transport.ack_frequency_config(Some(ack));
    }
    Ok(transport)
}

/// Builds the quinn client configuration for `config`.
pub fn quinn_config(config: &ClientConfig) -> Result<quinn::ClientConfig, ClientError> {
    let tls = rustls_config(&config.trust)?;
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| ClientError::InvalidConfig(format!("TLS: {e}")))?;
    let mut client = quinn::ClientConfig::new(Arc::new(quic));
    client.transport_config(Arc::new(transport_config(&config.transport)?));
    Ok(client)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn self_signed() -> rcgen::CertifiedKey<rcgen::KeyPair> {
        rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap()
    }

    #[test]
    fn the_pinned_certificate_and_only_it_is_accepted() {
        let cert = self_signed();
        let der = cert.cert.der().clone();
        let verifier = FingerprintVerifier::new(sha256(&der));
        let name = ServerName::try_from("anything.example").unwrap();
        assert!(
            verifier
                .verify_server_cert(&der, &[], &name, &[], UnixTime::now())
                .is_ok()
        );
        let other = self_signed().cert.der().clone();
        assert!(
            verifier
                .verify_server_cert(&other, &[], &name, &[], UnixTime::now())
                .is_err()
        );
        assert!(!verifier.supported_verify_schemes().is_empty());
    }

    #[test]
    fn configs_build_for_both_kinds_of_trust() {
        let cert = self_signed();
        let pem = cert.cert.pem();
        let tls = rustls_config(&Trust::CertificatePem(pem.into_bytes())).unwrap();
        assert_eq!(tls.alpn_protocols, vec![b"ptt/1".to_vec()]);
        rustls_config(&Trust::Fingerprint([0; 32])).unwrap();
        assert!(matches!(
            rustls_config(&Trust::CertificatePem(b"not pem".to_vec())),
            Err(ClientError::InvalidConfig(_))
        ));
    }
}
