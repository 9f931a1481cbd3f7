//! Token verification (JWT, HS256), key rotation, and the development secret.
//!
//! A token's `sub` is the user id and `exp` is required. `roles` carries permissions
//! such as `metrics`. Keys: a token whose header names a `kid` is checked with that
//! key only (an unknown `kid` is refused); one without a `kid` with the legacy
//! secret. Optional `iss` and `aud` checks, `nbf`, a bounded leeway and a maximum
//! lifetime come from [`AuthPolicy`]. Without any configured secret the server
//! starts only in development mode, with a random secret created once in the data
//! directory.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
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
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Claims {
    /// The user id.
    pub sub: String,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// Issued at, seconds since the Unix epoch (0: absent).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub iat: u64,
    /// Not before, seconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    /// Issuer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    /// Permissions, such as `metrics`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub roles: Vec<String>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// What is signed: the claims and, when the policy names one, the audience. (`aud`
/// may be a string or an array in tokens from other issuers, so [`Claims`] does
/// not read it; the validation checks it.)
#[derive(Serialize)]
struct Signed<'a> {
    #[serde(flatten)]
    claims: &'a Claims,
    #[serde(skip_serializing_if = "Option::is_none")]
    aud: Option<&'a str>,
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
    /// The token is malformed, forged, not for this server, not yet valid, too
    /// long-lived, or lacks a valid `sub`.
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
    /// Configured (`auth.jwt_secret`, `auth.keys` or `TUTTI_JWT_SECRET`).
    Configured,
    /// Generated in the data directory: development mode.
    Development,
}

/// The claim checks beyond the signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthPolicy {
    /// Required `iss`, when set.
    pub issuer: Option<String>,
    /// Required `aud`, when set; when unset, a token with an `aud` is refused.
    pub audience: Option<String>,
    /// Clock skew tolerated on `exp`, `nbf` and `iat`.
    pub leeway: Duration,
    /// The longest lifetime accepted (`exp - iat`, and `exp` ahead of now).
    pub max_lifetime: Duration,
}

/// The default clock-skew leeway (`auth.leeway`).
pub const DEFAULT_LEEWAY: Duration = Duration::from_secs(30);
/// The largest leeway accepted.
pub const MAX_LEEWAY: Duration = Duration::from_secs(300);
/// The default longest token lifetime (`auth.max_lifetime`).
pub const DEFAULT_MAX_LIFETIME: Duration = Duration::from_secs(24 * 3600);

impl Default for AuthPolicy {
    fn default() -> Self {
        Self {
            issuer: None,
            audience: None,
            leeway: DEFAULT_LEEWAY,
            max_lifetime: DEFAULT_MAX_LIFETIME,
        }
    }
}

impl AuthPolicy {
    /// The policy of an `[auth]` section.
    #[cfg(feature = "server")]
    pub fn from_config(c: &crate::config::AuthConfig) -> Self {
        Self {
            issuer: c.issuer.clone(),
            audience: c.audience.clone(),
            leeway: c.leeway.min(MAX_LEEWAY),
            max_lifetime: c.max_lifetime,
        }
    }
}

/// Verifies and mints tokens.
#[derive(Clone)]
pub struct Auth {
    /// Keys by `kid`.
    keys: Arc<HashMap<String, DecodingKey>>,
    /// The key of tokens without a `kid`.
    legacy: Option<DecodingKey>,
    /// What this server signs with, and the `kid` it names.
    encoding: EncodingKey,
    encoding_kid: Option<String>,
    validation: Validation,
    policy: AuthPolicy,
    source: SecretSource,
    dev: bool,
    /// The signing secret, from which TLS session ticket keys are derived.
    ticket_secret: Arc<[u8]>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("source", &self.source)
            .field("dev", &self.dev)
            .field("kids", &self.keys.keys().collect::<Vec<_>>())
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl Auth {
    /// An authenticator for one secret (tokens without a `kid`), with the default
    /// policy and `leeway`.
    pub fn new(secret: &[u8], source: SecretSource, leeway: Duration) -> Self {
        Self::with_keys(
            Some(secret),
            &[],
            source,
            AuthPolicy {
                leeway,
                ..AuthPolicy::default()
            },
        )
    }

    /// An authenticator for a legacy secret and/or keys by `kid`. The first key
    /// signs; without keys, the legacy secret does.
    ///
    /// # Panics
    ///
    /// With neither a legacy secret nor a key (a validated configuration has one).
    pub fn with_keys(
        legacy: Option<&[u8]>,
        keys: &[(String, Vec<u8>)],
        source: SecretSource,
        policy: AuthPolicy,
    ) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = policy.leeway.as_secs();
        validation.validate_exp = true;
        validation.validate_nbf = true;
        // `iss` and `aud` are checked by jsonwebtoken only when the token carries
        // them: requiring them makes a configured issuer or audience mandatory.
        let mut required = vec!["exp", "sub"];
        if let Some(iss) = &policy.issuer {
            validation.set_issuer(&[iss]);
            required.push("iss");
        }
        if let Some(aud) = &policy.audience {
            validation.set_audience(&[aud]);
            required.push("aud");
        }
        // With no audience configured, jsonwebtoken refuses any token that carries
        // one (RFC 7519 4.1.3): it was meant for another service.
        validation.set_required_spec_claims(&required);
        let (encoding, encoding_kid, signing) = match (keys.first(), legacy) {
            (Some((kid, secret)), _) => (
                EncodingKey::from_secret(secret),
                Some(kid.clone()),
                secret.as_slice(),
            ),
            (None, Some(secret)) => (EncodingKey::from_secret(secret), None, secret),
            (None, None) => panic!("Auth::with_keys needs a legacy secret or a key"),
        };
        let ticket_secret: Arc<[u8]> = signing.into();
        Self {
            keys: Arc::new(
                keys.iter()
                    .map(|(kid, secret)| (kid.clone(), DecodingKey::from_secret(secret)))
                    .collect(),
            ),
            legacy: legacy.map(DecodingKey::from_secret),
            encoding,
            encoding_kid,
            validation,
            policy,
            source,
            dev: source == SecretSource::Development,
            ticket_secret,
        }
    }

    /// Key material for TLS session tickets: the signing secret, which every node
    /// of a cluster shares, so that each opens the others' tickets
    /// ([`crate::tls::tickets`] derives the keys from it with HKDF).
    pub fn ticket_secret(&self) -> &[u8] {
        &self.ticket_secret
    }

    /// The authenticator of a configuration: its keys and legacy secret, or in
    /// development mode (`dev`) with neither, the development secret of `data_dir`
    /// (created on first use). Without any secret outside development mode this is
    /// an error: a server must not run with a secret nobody chose.
    #[cfg(feature = "server")]
    pub fn from_config(
        config: &crate::config::AuthConfig,
        dev: bool,
        data_dir: &Path,
    ) -> std::io::Result<Self> {
        let policy = AuthPolicy::from_config(config);
        let keys: Vec<(String, Vec<u8>)> = config
            .keys
            .iter()
            .map(|k| (k.kid.clone(), k.secret.as_bytes().to_vec()))
            .collect();
        let mut auth = match (&config.jwt_secret, keys.is_empty()) {
            (None, true) if dev => {
                let secret = load_or_create_secret(&data_dir.join(DEV_SECRET_FILE))?;
                Self::with_keys(
                    Some(secret.as_bytes()),
                    &[],
                    SecretSource::Development,
                    policy,
                )
            }
            (None, true) => {
                return Err(std::io::Error::other(
                    "no token secret is configured: set auth.jwt_secret (or TUTTI_JWT_SECRET) \
                     or auth.keys, or run in development mode (--dev, loopback addresses only)",
                ));
            }
            (legacy, _) => Self::with_keys(
                legacy.as_deref().map(str::as_bytes),
                &keys,
                SecretSource::Configured,
                policy,
            ),
        };
        auth.dev = dev;
        Ok(auth)
    }

    /// Whether the node runs in development mode (`POST /api/dev/token` exists).
    pub fn is_development(&self) -> bool {
        self.dev
    }

    /// The claim checks in force.
    pub fn policy(&self) -> &AuthPolicy {
        &self.policy
    }

    /// Checks a token and returns its claims.
    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        let invalid = |e: jsonwebtoken::errors::Error| match e.kind() {
            ErrorKind::ExpiredSignature => AuthError::Expired,
            _ => AuthError::Invalid(e.to_string()),
        };
        let header = jsonwebtoken::decode_header(token).map_err(invalid)?;
        let key = match &header.kid {
            Some(kid) => self
                .keys
                .get(kid)
                .ok_or_else(|| AuthError::Invalid("unknown key id (kid)".into()))?,
            None => self
                .legacy
                .as_ref()
                .ok_or_else(|| AuthError::Invalid("the token names no key id (kid)".into()))?,
        };
        let data = jsonwebtoken::decode::<Claims>(token, key, &self.validation).map_err(invalid)?;
        let claims = data.claims;
        UserId::parse(claims.sub.as_str()).map_err(|e| AuthError::Invalid(e.to_string()))?;
        check_lifetime(&claims, &self.policy, unix_now())?;
        Ok(claims)
    }

    /// Signs a token for `user` valid for `ttl`, with `roles` (and this server's
    /// issuer and audience, when configured).
    pub fn mint(&self, user: &str, ttl: Duration, roles: &[String]) -> Result<String, AuthError> {
        UserId::parse(user).map_err(|e| AuthError::Invalid(e.to_string()))?;
        let now = unix_now();
        let claims = Claims {
            sub: user.to_owned(),
            iat: now,
            exp: now + ttl.as_secs().max(1),
            iss: self.policy.issuer.clone(),
            roles: roles.to_vec(),
            ..Claims::default()
        };
        self.sign(&claims)
    }

    /// Signs arbitrary claims (tests use it for expired tokens), adding the
    /// configured audience.
    pub fn sign(&self, claims: &Claims) -> Result<String, AuthError> {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = self.encoding_kid.clone();
        let signed = Signed {
            claims,
            aud: self.policy.audience.as_deref(),
        };
        jsonwebtoken::encode(&header, &signed, &self.encoding)
            .map_err(|e| AuthError::Invalid(e.to_string()))
    }
}

/// The lifetime checks jsonwebtoken does not make: `exp - iat` at most
/// `max_lifetime`, `exp` no further ahead of `now` than that, and `iat` not in the
/// future (each with the leeway).
fn check_lifetime(claims: &Claims, policy: &AuthPolicy, now: u64) -> Result<(), AuthError> {
    let max = policy.max_lifetime.as_secs();
    let leeway = policy.leeway.as_secs();
    if claims.iat > now + leeway {
        return Err(AuthError::Invalid("issued in the future (iat)".into()));
    }
    if claims.iat != 0 && claims.exp.saturating_sub(claims.iat) > max {
        return Err(AuthError::Invalid(format!(
            "lifetime (exp - iat) over the maximum of {max} s"
        )));
    }
    if claims.exp > now + max + leeway {
        return Err(AuthError::Invalid(format!(
            "expires more than {max} s from now"
        )));
    }
    Ok(())
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
                ..Claims::default()
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
    fn dev_secret_is_created_once_and_only_in_development_mode() {
        let dir = tempfile::tempdir().unwrap();
        let config = crate::config::AuthConfig::default();
        let err = Auth::from_config(&config, false, dir.path()).unwrap_err();
        assert!(err.to_string().contains("--dev"), "{err}");
        assert!(!dir.path().join(DEV_SECRET_FILE).exists());
        let a = Auth::from_config(&config, true, dir.path()).unwrap();
        assert!(a.is_development());
        let t = a.mint("bob", Duration::from_secs(60), &[]).unwrap();
        let b = Auth::from_config(&config, true, dir.path()).unwrap();
        assert_eq!(b.verify(&t).unwrap().sub, "bob");
    }

    const OLD: &[u8] = b"the old key of at least thirty-two bytes";
    const NEW: &[u8] = b"the new key of at least thirty-two bytes";

    fn keyed(keys: &[(&str, &[u8])], legacy: Option<&[u8]>, policy: AuthPolicy) -> Auth {
        let keys: Vec<_> = keys
            .iter()
            .map(|(k, s)| ((*k).to_owned(), s.to_vec()))
            .collect();
        Auth::with_keys(legacy, &keys, SecretSource::Configured, policy)
    }

    fn policy() -> AuthPolicy {
        AuthPolicy {
            leeway: Duration::ZERO,
            ..AuthPolicy::default()
        }
    }

    #[test]
    fn during_a_rotation_both_keys_verify_and_unknown_kids_are_refused() {
        let server = keyed(&[("new", NEW), ("old", OLD)], Some(&[7; 32]), policy());
        let by_old = keyed(&[("old", OLD)], None, policy());
        let by_new = keyed(&[("new", NEW)], None, policy());
        let ttl = Duration::from_secs(60);
        for issuer in [&by_old, &by_new, &auth(), &server] {
            let t = issuer.mint("ann", ttl, &[]).unwrap();
            assert_eq!(server.verify(&t).unwrap().sub, "ann");
        }
        // The new key signs what the server mints.
        let minted = server.mint("ann", ttl, &[]).unwrap();
        assert_eq!(
            jsonwebtoken::decode_header(&minted).unwrap().kid.as_deref(),
            Some("new")
        );
        // A kid the server does not know, even with a key it knows.
        let unknown = keyed(&[("gone", NEW)], None, policy())
            .mint("ann", ttl, &[])
            .unwrap();
        assert!(matches!(server.verify(&unknown), Err(AuthError::Invalid(m)) if m.contains("kid")));
        // A known kid with the other key's signature.
        let swapped = keyed(&[("new", OLD)], None, policy())
            .mint("ann", ttl, &[])
            .unwrap();
        assert!(matches!(
            server.verify(&swapped),
            Err(AuthError::Invalid(_))
        ));
        // Without a legacy secret, a token without kid has nothing to check it.
        let keys_only = keyed(&[("new", NEW)], None, policy());
        let bare = auth().mint("ann", ttl, &[]).unwrap();
        assert!(matches!(keys_only.verify(&bare), Err(AuthError::Invalid(m)) if m.contains("kid")));
    }

    #[test]
    fn issuer_and_audience_are_checked_when_configured() {
        let strict = AuthPolicy {
            issuer: Some("https://id.example".into()),
            audience: Some("tutti".into()),
            ..policy()
        };
        let server = keyed(&[], Some(OLD), strict.clone());
        let ttl = Duration::from_secs(60);
        let good = server.mint("ann", ttl, &[]).unwrap();
        assert_eq!(
            server.verify(&good).unwrap().iss.as_deref(),
            Some("https://id.example")
        );
        let plain = keyed(&[], Some(OLD), policy());
        let neither = plain.mint("ann", ttl, &[]).unwrap();
        assert!(
            matches!(server.verify(&neither), Err(AuthError::Invalid(_))),
            "missing iss/aud"
        );
        let other_aud = keyed(
            &[],
            Some(OLD),
            AuthPolicy {
                audience: Some("other".into()),
                ..strict.clone()
            },
        );
        let wrong_aud = other_aud.mint("ann", ttl, &[]).unwrap();
        assert!(matches!(
            server.verify(&wrong_aud),
            Err(AuthError::Invalid(_))
        ));
        // A server without an audience refuses tokens meant for one.
        assert!(matches!(
            plain.verify(&wrong_aud),
            Err(AuthError::Invalid(_))
        ));
        let other_iss = keyed(
            &[],
            Some(OLD),
            AuthPolicy {
                issuer: Some("https://evil.example".into()),
                ..strict
            },
        );
        let wrong_iss = other_iss.mint("ann", ttl, &[]).unwrap();
        assert!(matches!(
            server.verify(&wrong_iss),
            Err(AuthError::Invalid(_))
        ));
    }

    #[test]
    fn not_before_lifetime_and_leeway() {
        let now = unix_now();
        let a = keyed(
            &[],
            Some(OLD),
            AuthPolicy {
                leeway: Duration::from_secs(30),
                max_lifetime: Duration::from_secs(3600),
                ..AuthPolicy::default()
            },
        );
        let token = |c: Claims| {
            a.sign(&Claims {
                sub: "ann".into(),
                ..c
            })
            .unwrap()
        };
        let ok = |c: Claims| a.verify(&token(c));
        ok(Claims {
            exp: now + 3600,
            iat: now,
            ..Claims::default()
        })
        .unwrap();
        // nbf ahead of now by more than the leeway, and within it.
        assert!(
            ok(Claims {
                exp: now + 600,
                nbf: Some(now + 120),
                ..Claims::default()
            })
            .is_err()
        );
        ok(Claims {
            exp: now + 600,
            nbf: Some(now + 20),
            ..Claims::default()
        })
        .unwrap();
        // Expired within the leeway is still accepted; past it, refused as expired.
        ok(Claims {
            exp: now - 20,
            ..Claims::default()
        })
        .unwrap();
        assert_eq!(
            ok(Claims {
                exp: now - 40,
                ..Claims::default()
            }),
            Err(AuthError::Expired)
        );
        // Lifetime: exp - iat over the maximum, exp too far ahead without iat, iat
        // in the future.
        assert!(
            ok(Claims {
                exp: now + 600,
                iat: now - 3600,
                ..Claims::default()
            })
            .is_err()
        );
        assert!(
            ok(Claims {
                exp: now + 7200,
                ..Claims::default()
            })
            .is_err()
        );
        assert!(
            ok(Claims {
                exp: now + 1200,
                iat: now + 600,
                ..Claims::default()
            })
            .is_err()
        );
        // No exp at all.
        let no_exp = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &serde_json::json!({ "sub": "ann" }),
            &EncodingKey::from_secret(OLD),
        )
        .unwrap();
        assert!(a.verify(&no_exp).is_err());
    }
}
