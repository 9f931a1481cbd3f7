//! Token verification (JWT, HS256) and the development secret.
//!
//! A token's `sub` is the user id and `exp` is required. `roles` carries permissions
//! such as `metrics`. With no configured secret the server is in development mode: a
//! random secret is created once in the data directory, `tutti token` signs with it,
//! and the HTTP port may mint tokens for a typed name.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, errors::ErrorKind};
use serde::{Deserialize, Serialize};

use crate::ids::UserId;
use crate::protocol::CloseCode;

/// The file, in the data directory, that holds the development secret.
pub const DEV_SECRET_FILE: &str = "dev-secret";

/// The file, in the data directory, that holds the development API key.
pub const DEV_API_KEY_FILE: &str = "dev-api-key";

/// The key backends present to the server API (`Authorization: Bearer KEY`).
#[derive(Clone)]
pub struct ApiKey {
    digest: [u8; 32],
    source: SecretSource,
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiKey")
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl ApiKey {
    /// The configured key, or the development key of `data_dir` (created on first use).
    pub fn from_config(configured: Option<&str>, data_dir: &Path) -> std::io::Result<Self> {
        let (key, source) = match configured {
            Some(k) => (k.to_owned(), SecretSource::Configured),
            None => (
                load_or_create_secret(&data_dir.join(DEV_API_KEY_FILE))?,
                SecretSource::Development,
            ),
        };
        Ok(Self {
            digest: crate::crypto::sha256(key.as_bytes()),
            source,
        })
    }

    /// Whether `presented` is the key. Compares digests in constant time, so the
    /// time taken says nothing about the key or how much of it matched.
    pub fn verify(&self, presented: &str) -> bool {
        let digest = crate::crypto::sha256(presented.as_bytes());
        digest
            .iter()
            .zip(self.digest.iter())
            .fold(0u8, |diff, (a, b)| diff | (a ^ b))
            == 0
    }
}

/// The longest user id accepted.
pub const MAX_USER_ID_LEN: usize = crate::ids::MAX_ID_LEN;

/// The claims Tutti reads from a token.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Claims {
    /// The user id.
    pub sub: String,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// Issued at, seconds since the Unix epoch.
    #[serde(default)]
    pub iat: u64,
    /// Permissions, such as `metrics`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub roles: Vec<String>,
}

/// Why a token was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum AuthError {
    /// No token was given.
    #[error("no token")]
    Missing,
    /// The token has expired.
    #[error("token expired")]
    Expired,
    /// The token is malformed, forged, or lacks a valid `sub`.
    #[error("invalid token: {0}")]
    Invalid(String),
}

impl AuthError {
    /// The close code a session refused with this error gets.
    pub fn close_code(&self) -> CloseCode {
        match self {
            AuthError::Missing => CloseCode::TokenMissing,
            AuthError::Expired => CloseCode::TokenExpired,
            AuthError::Invalid(_) => CloseCode::Unauthorized,
        }
    }
}

/// Where the secret came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretSource {
    /// Configured (`auth.jwt_secret` or `TUTTI_JWT_SECRET`): production mode.
    Configured,
    /// Generated in the data directory: development mode.
    Development,
}

/// Verifies and mints tokens.
#[derive(Clone)]
pub struct Auth {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    source: SecretSource,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl Auth {
    /// An authenticator for `secret`.
    pub fn new(secret: &[u8], source: SecretSource, leeway: Duration) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = leeway.as_secs();
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.validate_exp = true;
        Self {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
            source,
        }
    }

    /// The configured secret if there is one, else the development secret of
    /// `data_dir` (created on first use).
    pub fn from_config(
        configured: Option<&str>,
        data_dir: &Path,
        leeway: Duration,
    ) -> std::io::Result<Self> {
        Ok(match configured {
            Some(secret) => Self::new(secret.as_bytes(), SecretSource::Configured, leeway),
            None => {
                let secret = load_or_create_secret(&data_dir.join(DEV_SECRET_FILE))?;
                Self::new(secret.as_bytes(), SecretSource::Development, leeway)
            }
        })
    }

    /// Whether the secret was generated (development mode).
    pub fn is_development(&self) -> bool {
        self.source == SecretSource::Development
    }

    /// Checks a token and returns its claims.
    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                _ => AuthError::Invalid(e.to_string()),
            })?;
        UserId::parse(data.claims.sub.as_str()).map_err(|e| AuthError::Invalid(e.to_string()))?;
        Ok(data.claims)
    }

    /// Signs a token for `user` valid for `ttl`, with `roles`.
    pub fn mint(&self, user: &str, ttl: Duration, roles: &[String]) -> Result<String, AuthError> {
        UserId::parse(user).map_err(|e| AuthError::Invalid(e.to_string()))?;
        let now = unix_now();
        let claims = Claims {
            sub: user.to_owned(),
            iat: now,
            exp: now + ttl.as_secs().max(1),
            roles: roles.to_vec(),
        };
        self.sign(&claims)
    }

    /// Signs arbitrary claims (tests use it for expired tokens).
    pub fn sign(&self, claims: &Claims) -> Result<String, AuthError> {
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &self.encoding)
            .map_err(|e| AuthError::Invalid(e.to_string()))
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Reads the secret at `path`, or writes a new random one there (mode 0600).
pub(crate) fn load_or_create_secret(path: &Path) -> std::io::Result<String> {
    match std::fs::read_to_string(path) {
        Ok(s) if s.trim().len() >= 32 => return Ok(s.trim().to_owned()),
        Ok(_) => {
            return Err(std::io::Error::other(format!(
                "{} is shorter than 32 characters; delete it to generate a new one",
                path.display()
            )));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let secret = crate::util::random_hex(32);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    match options.open(path) {
        Ok(mut file) => {
            std::io::Write::write_all(&mut file, secret.as_bytes())?;
            file.sync_all()?;
            Ok(secret)
        }
        // Another process (`tutti token` beside `tutti serve`) won the race: use its secret.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            Ok(std::fs::read_to_string(path)?.trim().to_owned())
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_api_key_matches_only_itself() {
        let dir = tempfile::tempdir().unwrap();
        let key = "k".repeat(40);
        let api = ApiKey::from_config(Some(&key), dir.path()).unwrap();
        assert!(api.verify(&key));
        assert!(!api.verify(&key[..39]), "a prefix");
        assert!(!api.verify(&format!("{key}k")), "longer");
        assert!(!api.verify(""));
    }

    fn auth() -> Auth {
        Auth::new(&[7; 32], SecretSource::Configured, Duration::ZERO)
    }

    #[test]
    fn minted_tokens_verify() {
        let a = auth();
        let t = a
            .mint("alice", Duration::from_secs(60), &["metrics".into()])
            .unwrap();
        let c = a.verify(&t).unwrap();
        assert_eq!(c.sub, "alice");
        assert_eq!(c.roles, vec!["metrics".to_string()]);
    }

    #[test]
    fn refusals_have_their_kinds() {
        let a = auth();
        assert_eq!(a.verify(""), Err(AuthError::Missing));
        assert!(matches!(
            a.verify("not-a-token"),
            Err(AuthError::Invalid(_))
        ));
        let other = Auth::new(&[8; 32], SecretSource::Configured, Duration::ZERO);
        let forged = other.mint("alice", Duration::from_secs(60), &[]).unwrap();
        assert!(matches!(a.verify(&forged), Err(AuthError::Invalid(_))));
        let expired = a
            .sign(&Claims {
                sub: "alice".into(),
                exp: unix_now() - 10,
                iat: 0,
                roles: vec![],
            })
            .unwrap();
        assert_eq!(a.verify(&expired), Err(AuthError::Expired));
        assert_eq!(AuthError::Expired.close_code(), CloseCode::TokenExpired);
    }

    #[test]
    fn bad_user_ids_are_refused() {
        let a = auth();
        assert!(a.mint("", Duration::from_secs(1), &[]).is_err());
        assert!(a.mint("a b", Duration::from_secs(1), &[]).is_err());
        assert!(
            a.mint(&"x".repeat(129), Duration::from_secs(1), &[])
                .is_err()
        );
    }

    #[test]
    fn dev_secret_is_created_once() {
        let dir = tempfile::tempdir().unwrap();
        let a = Auth::from_config(None, dir.path(), Duration::ZERO).unwrap();
        assert!(a.is_development());
        let t = a.mint("bob", Duration::from_secs(60), &[]).unwrap();
        let b = Auth::from_config(None, dir.path(), Duration::ZERO).unwrap();
        assert_eq!(b.verify(&t).unwrap().sub, "bob");
    }
}
