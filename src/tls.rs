//! Server certificates: the generated development certificate (ECDSA P-256, valid
//! under 14 days so browsers accept it by pin), its rotation without a restart, and
//! certificates given by the operator.
//!
//! The endpoint's rustls config resolves its certificate through [`CertStore`], so a
//! rotation swaps the certificate for every new handshake; open connections keep the
//! one they started with.

pub mod tickets;

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use serde::Deserialize;
use time::OffsetDateTime;

use crate::clock::duration_str;
pub use crate::crypto::{crypto_provider, sha256};
use crate::util::UnpoisonedRw;

/// Certificate settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// A PEM certificate chain. With `key`, replaces the generated development certificate.
    pub cert: Option<PathBuf>,
    /// The PEM private key of `cert`.
    pub key: Option<PathBuf>,
    /// Where generated certificates are kept.
    pub cert_dir: PathBuf,
    /// Validity of a generated certificate. Browsers accept pinned certificates valid
    /// for at most 14 days.
    #[serde(with = "duration_str")]
    pub validity: Duration,
    /// A generated certificate is replaced when less than this is left of it.
    #[serde(with = "duration_str")]
    pub rotate_before: Duration,
    /// How often the generated certificate's age is checked.
    #[serde(with = "duration_str")]
    pub check_interval: Duration,
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            cert: None,
            key: None,
            cert_dir: PathBuf::from("certs"),
            validity: Duration::from_secs(13 * 24 * 3600),
            rotate_before: Duration::from_secs(3 * 24 * 3600),
            check_interval: Duration::from_secs(3600),
        }
    }
}

/// A certificate in use and what clients need to pin it.
#[derive(Clone)]
struct Current {
    key: Arc<CertifiedKey>,
    sha256: [u8; 32],
    not_after: Option<OffsetDateTime>,
}

/// Certificate errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A PEM file holds no usable certificate or key.
    #[error("{0}")]
    Pem(String),
    /// Certificate generation failed.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// rustls refused the key.
    #[error("unusable key: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The server's certificate, swappable at run time.
pub struct CertStore {
    current: RwLock<Current>,
    generated: Option<Generated>,
}

/// Settings of a generated certificate.
struct Generated {
    dir: PathBuf,
    validity: Duration,
    rotate_before: Duration,
}

impl std::fmt::Debug for CertStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertStore")
            .field("pin", &self.pin_hex())
            .finish_non_exhaustive()
    }
}

const CERT_FILE: &str = "cert.pem";
const KEY_FILE: &str = "key.pem";
/// Holds the generated certificate's `notAfter` (Unix seconds), so that a restart
/// knows when to rotate without parsing X.509.
const EXPIRES_FILE: &str = "cert.expires";

impl CertStore {
    /// Loads the configured certificate, or the generated one from `cert_dir`
    /// (creating or replacing it when missing or due for rotation).
    pub fn from_config(config: &TlsConfig) -> Result<Self, TlsError> {
        match (&config.cert, &config.key) {
            (Some(cert), Some(key)) => {
                let current = load_pem(cert, key)?;
                Ok(Self {
                    current: RwLock::new(current),
                    generated: None,
                })
            }
            _ => {
                let generated = Generated {
                    dir: config.cert_dir.clone(),
                    validity: config.validity,
                    rotate_before: config.rotate_before,
                };
                let now = OffsetDateTime::now_utc();
                let current = match generated.load() {
                    Some(c) if !generated.due(&c, now) => c,
                    _ => generated.create(now)?,
                };
                Ok(Self {
                    current: RwLock::new(current),
                    generated: Some(generated),
                })
            }
        }
    }

    /// SHA-256 of the current certificate's DER, the value browsers pin.
    pub fn pin(&self) -> [u8; 32] {
        self.read().sha256
    }

    /// [`pin`](Self::pin) as lowercase hex.
    pub fn pin_hex(&self) -> String {
        crate::util::hex(&self.pin())
    }

    /// When the current certificate expires, if known.
    pub fn not_after(&self) -> Option<OffsetDateTime> {
        self.read().not_after
    }

    /// Whether the certificate is generated (and so rotated) by the server.
    pub fn is_generated(&self) -> bool {
        self.generated.is_some()
    }

    /// Where generated certificates are kept.
    pub fn dir(&self) -> Option<&Path> {
        self.generated.as_ref().map(|g| g.dir.as_path())
    }

    /// Replaces a generated certificate that is due at `now`. Returns whether it did.
    pub fn rotate_if_due(&self, now: OffsetDateTime) -> Result<bool, TlsError> {
        let Some(generated) = &self.generated else {
            return Ok(false);
        };
        if !generated.due(&self.read(), now) {
            return Ok(false);
        }
        self.rotate_at(now).map(|()| true)
    }

    /// Replaces a generated certificate now, whatever its age.
    pub fn rotate_now(&self) -> Result<(), TlsError> {
        self.rotate_at(OffsetDateTime::now_utc())
    }

    fn rotate_at(&self, now: OffsetDateTime) -> Result<(), TlsError> {
        let Some(generated) = &self.generated else {
            return Ok(());
        };
        let next = generated.create(now)?;
        *self.current.writing() = next;
        tracing::info!(pin = %self.pin_hex(), "certificate rotated");
        Ok(())
    }

    /// The check interval task: rotates when due, until `stop` fires.
    pub async fn rotation_task(
        self: Arc<Self>,
        every: Duration,
        stop: tokio_util::sync::CancellationToken,
    ) {
        if self.generated.is_none() {
            return;
        }
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {
                    if let Err(e) = self.rotate_if_due(OffsetDateTime::now_utc()) {
                        tracing::error!(error = %e, "certificate rotation failed; will retry");
                    }
                }
            }
        }
    }

    /// A rustls server config (TLS 1.3, ring) that serves this store's certificate
    /// with the given ALPNs.
    pub fn server_config(self: &Arc<Self>, alpns: &[&[u8]]) -> rustls::ServerConfig {
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(crypto_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("ring supports TLS 1.3")
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = alpns.iter().map(|a| a.to_vec()).collect();
        config
    }

    fn read(&self) -> Current {
        self.current.reading().clone()
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.read().key)
    }
}

impl Generated {
    fn due(&self, c: &Current, now: OffsetDateTime) -> bool {
        match c.not_after {
            Some(end) => end - now < self.rotate_before,
            None => true,
        }
    }

    /// The certificate kept in `dir`, with its expiry from the sidecar file.
    fn load(&self) -> Option<Current> {
        let mut c = load_pem(&self.dir.join(CERT_FILE), &self.dir.join(KEY_FILE)).ok()?;
        let expires = std::fs::read_to_string(self.dir.join(EXPIRES_FILE)).ok()?;
        let secs: i64 = expires.trim().parse().ok()?;
        c.not_after = OffsetDateTime::from_unix_timestamp(secs).ok();
        Some(c)
    }

    /// Makes a new certificate valid from a little before `now` and writes it to disk.
    fn create(&self, now: OffsetDateTime) -> Result<Current, TlsError> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = rcgen::CertificateParams::new(vec![
            "localhost".to_owned(),
            "127.0.0.1".to_owned(),
            "::1".to_owned(),
        ])?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "tutti development certificate");
        // Browsers count the whole validity period (not_before to not_after) against
        // their 14-day limit for pinned certificates, backdating included.
        let backdate = Duration::from_secs(300);
        params.not_before = now - backdate;
        params.not_after = now + self.validity.saturating_sub(backdate);
        let cert = params.self_signed(&key)?;
        let cert_pem = cert.pem();
        let key_pem = key.serialize_pem();
        std::fs::create_dir_all(&self.dir).map_err(|source| TlsError::Io {
            path: self.dir.clone(),
            source,
        })?;
        write_private(&self.dir.join(KEY_FILE), key_pem.as_bytes())?;
        write_private(&self.dir.join(CERT_FILE), cert_pem.as_bytes())?;
        write_private(
            &self.dir.join(EXPIRES_FILE),
            params.not_after.unix_timestamp().to_string().as_bytes(),
        )?;
        let mut current = current_from_der(
            vec![cert.der().clone()],
            PrivateKeyDer::try_from(key.serialize_der()).map_err(|e| TlsError::Pem(e.into()))?,
        )?;
        current.not_after = Some(params.not_after);
        Ok(current)
    }
}

/// Writes a file atomically (temp file + rename), readable by the owner only.
fn write_private(path: &Path, data: &[u8]) -> Result<(), TlsError> {
    let io = |source| TlsError::Io {
        path: path.to_owned(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut f = options.open(&tmp).map_err(io)?;
    std::io::Write::write_all(&mut f, data).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

fn load_pem(cert: &Path, key: &Path) -> Result<Current, TlsError> {
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|e| TlsError::Pem(format!("{}: {e}", cert.display())))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem(format!("{}: {e}", cert.display())))?;
    if chain.is_empty() {
        return Err(TlsError::Pem(format!("{}: no certificate", cert.display())));
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| TlsError::Pem(format!("{}: {e}", key.display())))?;
    current_from_der(chain, key)
}

fn current_from_der(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Current, TlsError> {
    let provider = rustls::crypto::ring::default_provider();
    let signing = provider.key_provider.load_private_key(key)?;
    let sha256 = sha256(&chain[0]);
    Ok(Current {
        key: Arc::new(CertifiedKey::new(chain, signing)),
        sha256,
        not_after: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path) -> TlsConfig {
        TlsConfig {
            cert_dir: dir.to_owned(),
            ..TlsConfig::default()
        }
    }

    #[test]
    fn generated_certificate_is_reused_then_rotated_when_due() {
        let dir = tempfile::tempdir().unwrap();
        let c = config(dir.path());
        let store = CertStore::from_config(&c).unwrap();
        let pin = store.pin();
        let end = store.not_after().unwrap();
        let now = OffsetDateTime::now_utc();
        assert!(end - now <= time::Duration::days(14));
        assert!(end - now > time::Duration::days(12));

        // A restart keeps the certificate (and so the pin) while it is not due.
        let again = CertStore::from_config(&c).unwrap();
        assert_eq!(again.pin(), pin);

        // Not due yet; due once less than `rotate_before` is left.
        assert!(!store.rotate_if_due(now).unwrap());
        let later = end - time::Duration::days(2);
        assert!(store.rotate_if_due(later).unwrap());
        assert_ne!(store.pin(), pin);
        // The rotated one is on disk for the next start.
        assert_eq!(CertStore::from_config(&c).unwrap().pin(), store.pin());
    }

    #[test]
    fn configured_certificates_are_never_rotated() {
        let dir = tempfile::tempdir().unwrap();
        let generated = CertStore::from_config(&config(dir.path())).unwrap();
        let c = TlsConfig {
            cert: Some(dir.path().join(CERT_FILE)),
            key: Some(dir.path().join(KEY_FILE)),
            ..TlsConfig::default()
        };
        let store = CertStore::from_config(&c).unwrap();
        assert_eq!(store.pin(), generated.pin());
        assert!(!store.is_generated());
        let far = OffsetDateTime::now_utc() + time::Duration::days(365);
        assert!(!store.rotate_if_due(far).unwrap());
    }

    #[test]
    fn unreadable_pem_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("bad.pem");
        std::fs::write(&bad, "not pem").unwrap();
        let c = TlsConfig {
            cert: Some(bad.clone()),
            key: Some(bad),
            ..TlsConfig::default()
        };
        assert!(matches!(CertStore::from_config(&c), Err(TlsError::Pem(_))));
    }
}
