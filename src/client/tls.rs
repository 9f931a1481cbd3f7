//! TLS for the native client: trust a server by certificate pin (as browsers do with
//! `serverCertificateHashes`) or by root certificates.

use std::sync::Arc;

use rustls::DigitallySignedStruct;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};

use crate::util::Unpoisoned;

/// How the client decides to trust the server's certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust {
    /// Accept a certificate whose DER has one of these SHA-256 hashes (see
    /// `GET /cert-hash` and `tutti cert`).
    Pinned(Vec<[u8; 32]>),
    /// Verify the chain against these roots and the server name.
    Roots(Vec<CertificateDer<'static>>),
}

/// What a client keeps across its connects to resume TLS sessions: the session
/// tickets, and the rustls configs they were made with. rustls resumes a session
/// only under the very config (certificate verifier) that made it, so the config of
/// each trust is built once and reused. Shared by the clones of a
/// [`super::ClientConfig`].
#[derive(Debug)]
pub struct TlsSessions {
    store: Arc<dyn rustls::client::ClientSessionStore>,
    configs: std::sync::Mutex<Vec<TrustConfig>>,
}

/// A trust, an ALPN, and the rustls config made for them.
type TrustConfig = (Trust, Vec<u8>, Arc<rustls::ClientConfig>);

impl Default for TlsSessions {
    fn default() -> Self {
        Self {
            // A few tickets per server: each resumption uses one and brings another.
            store: Arc::new(rustls::client::ClientSessionMemoryCache::new(16)),
            configs: std::sync::Mutex::new(Vec::new()),
        }
    }
}

impl TlsSessions {
    /// The rustls config for `trust` and `alpn`, the same one every time.
    pub(crate) fn config(&self, trust: &Trust, alpn: &[u8]) -> Arc<rustls::ClientConfig> {
        let mut configs = self.configs.locked();
        if let Some((_, _, c)) = configs.iter().find(|(t, a, _)| t == trust && a == alpn) {
            return c.clone();
        }
        let mut config = client_config(trust, alpn);
        config.resumption = rustls::client::Resumption::store(self.store.clone());
        let config = Arc::new(config);
        // Bounded: a client meets few trusts (a node's pin, a cluster's nodes).
        if configs.len() >= 64 {
            configs.remove(0);
        }
        configs.push((trust.clone(), alpn.to_vec(), config.clone()));
        config
    }
}

/// Parses a pin written as 64 hex digits (colons allowed).
pub fn parse_pin(text: &str) -> Result<[u8; 32], String> {
    let hex: String = text.chars().filter(|c| *c != ':').collect();
    if hex.len() != 64 {
        return Err(format!("a SHA-256 pin is 64 hex digits, got {}", hex.len()));
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)
            .map_err(|_| format!("not hex: {text:?}"))?;
    }
    Ok(out)
}

#[derive(Debug)]
struct PinVerifier {
    pins: Vec<[u8; 32]>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let hash = crate::crypto::sha256(end_entity);
        if self.pins.contains(&hash) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
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

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A TLS 1.3 client config (ring) trusting `trust`, offering `alpn`.
pub(crate) fn client_config(trust: &Trust, alpn: &[u8]) -> rustls::ClientConfig {
    let provider = Arc::new(crate::crypto::crypto_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("ring supports TLS 1.3");
    let mut config = match trust {
        Trust::Pinned(pins) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinVerifier {
                pins: pins.clone(),
                provider,
            }))
            .with_no_client_auth(),
        Trust::Roots(roots) => {
            let mut store = rustls::RootCertStore::empty();
            for root in roots {
                let _ = store.add(root.clone());
            }
            builder.with_root_certificates(store).with_no_client_auth()
        }
    };
    config.alpn_protocols = vec![alpn.to_vec()];
    config
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_parse_with_or_without_colons() {
        let hex = "ab".repeat(32);
        assert_eq!(parse_pin(&hex).unwrap(), [0xab; 32]);
        let colons = vec!["ab"; 32].join(":");
        assert_eq!(parse_pin(&colons).unwrap(), [0xab; 32]);
        assert!(parse_pin("abc").is_err());
        assert!(parse_pin(&"zz".repeat(32)).is_err());
    }
}
