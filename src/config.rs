//! Typed configuration: defaults < TOML file < environment < command-line flags.
//!
//! The file is optional; every key has a safe default. The environment and the flags
//! are applied by the command line (`clap` reads `TUTTI_*` variables for each flag), so
//! this module only knows defaults, the file, and a set of overrides.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// The whole server configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Development mode (`--dev`, `TUTTI_DEV`): without a configured secret one is
    /// generated in the data directory, and `POST /api/dev/token` mints role-less
    /// tokens for any name. Refused unless every listen address is loopback.
    pub dev: bool,
    /// The UDP address serving WebTransport and raw QUIC.
    pub listen: SocketAddr,
    /// The TCP address of the HTTP side port (health, metrics, server API, web page).
    pub http: SocketAddr,
    /// Where the database and the development secret live.
    pub data_dir: PathBuf,
    /// The static files served at `/` (the built web client).
    pub web_dir: PathBuf,
    /// This node's id; defaults to a random one persisted in the data directory.
    pub node_id: Option<String>,
    /// Threads running the connections and services (the database writer has a
    /// thread of its own). 0: half the CPUs, at least one. Fewer threads hand work
    /// between each other less: on a 2-core host one thread used 11% less CPU per
    /// delivery and reached a 22% higher knee than two (docs/BENCHMARKS.md).
    pub worker_threads: usize,
    /// The least time between the starts of two database commits (0: none). While
    /// writes come slower than one per interval each commits at once; faster, the
    /// writes that arrive meanwhile share the next commit, so a busy node commits
    /// at most once per interval for at most this much more latency per write
    /// (docs/BENCHMARKS.md).
    #[serde(with = "crate::clock::duration_str")]
    pub commit_interval: std::time::Duration,
    /// Commit with redb's quick repair, so that the first start after a crash
    /// does not check the whole database. Costs about 40 us of CPU per commit
    /// (docs/OPERATIONS.md, "Crash recovery").
    pub quick_repair: bool,
    /// Certificates.
    pub tls: TlsConfig,
    /// Token verification.
    pub auth: AuthConfig,
    /// Per-connection limits.
    pub limits: LimitsConfig,
    /// Timeouts.
    pub timeouts: TimeoutsConfig,
    /// Collaborative documents.
    pub collab: crate::services::collab::CollabConfig,
    /// Chat limits.
    pub chat: crate::services::chat::ChatConfig,
    /// Room membership: who joins directly and who is invited.
    pub rooms: crate::services::chat::RoomsConfig,
    /// Notifications.
    pub notify: crate::services::notify::NotifyConfig,
    /// Presence.
    pub presence: crate::services::presence::PresenceConfig,
    /// The server API for backends.
    pub api: ApiConfig,
    /// Analytics and metrics streaming.
    pub analytics: crate::services::analytics::AnalyticsConfig,
    /// What is kept how long (`[retention]`).
    pub retention: crate::services::retention::RetentionConfig,
    /// The cluster this node joins (`[cluster]`; none by default).
    pub cluster: crate::cluster::ClusterConfig,
}

/// The server API (HTTP, for backends).
#[derive(Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    /// The API key backends send as `Authorization: Bearer KEY`. Without it, a key
    /// is generated in the data directory (`dev-api-key`), as the development secret
    /// is. `TUTTI_API_KEY` sets it too.
    pub key: Option<String>,
}

impl Config {
    /// The worker threads to run: `worker_threads`, or half the CPUs (at least one).
    pub fn worker_threads(&self) -> usize {
        match self.worker_threads {
            0 => std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1)),
            n => n,
        }
    }
}

/// `commit_interval` by default: for at most 5 ms more latency per write, a
/// busy node commits at most 200 times a second. At 10,000 and 40,000 chat
/// deliveries a second that took 22% and 17% off the server's CPU per delivery,
/// and a server on one core kept up with 85,000 a second, where it fell behind
/// without it (docs/BENCHMARKS.md, "What each change bought").
const DEFAULT_COMMIT_INTERVAL: Duration = Duration::from_millis(5);

/// The longest `commit_interval`: every write may wait this long, and the update
/// latency target (p99) is 100 ms.
const MAX_COMMIT_INTERVAL: Duration = Duration::from_millis(100);

impl Default for Config {
    fn default() -> Self {
        Self {
            dev: false,
            listen: "127.0.0.1:4433".parse().expect("valid literal"),
            http: "127.0.0.1:8080".parse().expect("valid literal"),
            data_dir: PathBuf::from("data"),
            web_dir: PathBuf::from("web/dist"),
            node_id: None,
            worker_threads: 0,
            commit_interval: DEFAULT_COMMIT_INTERVAL,
            quick_repair: false,
            tls: TlsConfig::default(),
            auth: AuthConfig::default(),
            limits: LimitsConfig::default(),
            timeouts: TimeoutsConfig::default(),
            collab: Default::default(),
            chat: Default::default(),
            rooms: Default::default(),
            notify: Default::default(),
            presence: Default::default(),
            api: Default::default(),
            analytics: Default::default(),
            retention: Default::default(),
            cluster: Default::default(),
        }
    }
}

/// Token settings.
#[derive(Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// The HS256 secret of tokens without a key id (`kid`). Without it and without
    /// `keys` the server starts only in development mode (`dev`).
    pub jwt_secret: Option<String>,
    /// HS256 secrets by key id: a token whose header names a `kid` is checked with
    /// that key only, and an unknown `kid` is refused. During a rotation both the
    /// old and the new key are listed. The first key signs what this server mints
    /// (`tutti token`).
    pub keys: Vec<KeyConfig>,
    /// When set, tokens must carry this `iss`.
    pub issuer: Option<String>,
    /// When set, tokens must carry this `aud`. When unset, tokens that carry an
    /// `aud` are refused (they are meant for another service).
    pub audience: Option<String>,
    /// Clock skew tolerated on `exp`, `nbf` and `iat` (at most 5 minutes).
    #[serde(with = "duration_str")]
    pub leeway: Duration,
    /// The longest token lifetime accepted: `exp - iat`, and `exp` ahead of now.
    #[serde(with = "duration_str")]
    pub max_lifetime: Duration,
}

/// The longest `auth.leeway` accepted.
pub const MAX_LEEWAY: Duration = crate::auth::MAX_LEEWAY;

/// One token key of a rotation (`[[auth.keys]]`).
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    /// The key id tokens name in their header.
    pub kid: String,
    /// The HS256 secret, at least 32 bytes.
    pub secret: String,
}

impl std::fmt::Debug for KeyConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyConfig")
            .field("kid", &self.kid)
            .field("secret", &format_args!("<redacted>"))
            .finish()
    }
}

/// Shows whether a secret is set, never the secret (configurations are logged).
fn redacted(secret: &Option<String>) -> &'static str {
    match secret {
        Some(_) => "Some(<redacted>)",
        None => "None",
    }
}

impl std::fmt::Debug for ApiConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiConfig")
            .field("key", &format_args!("{}", redacted(&self.key)))
            .finish()
    }
}

impl std::fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthConfig")
            .field(
                "jwt_secret",
                &format_args!("{}", redacted(&self.jwt_secret)),
            )
            .field("keys", &self.keys)
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("leeway", &self.leeway)
            .field("max_lifetime", &self.max_lifetime)
            .finish()
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            jwt_secret: None,
            keys: Vec::new(),
            issuer: None,
            audience: None,
            leeway: crate::auth::DEFAULT_LEEWAY,
            max_lifetime: crate::auth::DEFAULT_MAX_LIFETIME,
        }
    }
}

/// Values that override the file: from the environment or from flags.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--dev` / `TUTTI_DEV`: sets development mode when true.
    pub dev: bool,
    /// `--listen` / `TUTTI_LISTEN`.
    pub listen: Option<SocketAddr>,
    /// `--http` / `TUTTI_HTTP`.
    pub http: Option<SocketAddr>,
    /// `--data-dir` / `TUTTI_DATA_DIR`.
    pub data_dir: Option<PathBuf>,
    /// `--web-dir` / `TUTTI_WEB_DIR`.
    pub web_dir: Option<PathBuf>,
    /// `--cert` / `TUTTI_CERT`.
    pub cert: Option<PathBuf>,
    /// `--key` / `TUTTI_KEY`.
    pub key: Option<PathBuf>,
    /// `--cert-dir` / `TUTTI_CERT_DIR`.
    pub cert_dir: Option<PathBuf>,
    /// `TUTTI_JWT_SECRET`.
    pub jwt_secret: Option<String>,
    /// `--node-id` / `TUTTI_NODE_ID`.
    pub node_id: Option<String>,
    /// `TUTTI_API_KEY`.
    pub api_key: Option<String>,
    /// `--cluster` / `TUTTI_CLUSTER_URL`: the NATS server(s) of the cluster.
    pub cluster_url: Option<String>,
}

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("invalid configuration in {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        source: Box<toml::de::Error>,
    },
    /// A value is out of range.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl Config {
    /// Parses a TOML document over the defaults.
    pub fn from_toml(text: &str, path: &Path) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            source: Box::new(e),
        })
    }

    /// Defaults, then `file` if given, then `overrides`; validated.
    pub fn load(file: Option<&Path>, overrides: Overrides) -> Result<Self, ConfigError> {
        let mut config = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_owned(),
                    source,
                })?;
                Self::from_toml(&text, path)?
            }
            None => Self::default(),
        };
        config.apply(overrides);
        config.validate()?;
        Ok(config)
    }

    /// Applies overrides over the current values.
    pub fn apply(&mut self, o: Overrides) {
        if o.dev {
            self.dev = true;
        }
        if let Some(v) = o.listen {
            self.listen = v;
        }
        if let Some(v) = o.http {
            self.http = v;
        }
        if let Some(v) = o.data_dir {
            self.data_dir = v;
        }
        if let Some(v) = o.web_dir {
            self.web_dir = v;
        }
        if let Some(v) = o.cert {
            self.tls.cert = Some(v);
        }
        if let Some(v) = o.key {
            self.tls.key = Some(v);
        }
        if let Some(v) = o.cert_dir {
            self.tls.cert_dir = v;
        }
        if let Some(v) = o.jwt_secret {
            self.auth.jwt_secret = Some(v);
        }
        if let Some(v) = o.node_id {
            self.node_id = Some(v);
        }
        if let Some(v) = o.api_key {
            self.api.key = Some(v);
        }
        if let Some(v) = o.cluster_url {
            self.cluster.url = v;
        }
    }

    /// Development mode is refused unless every listen address (QUIC and
    /// WebTransport, HTTP) is loopback: its tokens are minted for any name by an
    /// unauthenticated endpoint, so only this machine may reach the node.
    pub fn check_dev_mode(&self) -> Result<(), ConfigError> {
        if !self.dev {
            return Ok(());
        }
        for (name, addr) in [
            ("listen (QUIC and WebTransport)", self.listen),
            ("http", self.http),
        ] {
            if !addr.ip().is_loopback() {
                return Err(ConfigError::Invalid(format!(
                    "development mode (--dev) needs loopback addresses: {name} is {addr}"
                )));
            }
        }
        Ok(())
    }

    /// Checks values that would make the server misbehave.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: &str| Err(ConfigError::Invalid(m.to_owned()));
        if self.tls.cert.is_some() != self.tls.key.is_some() {
            return bad("tls.cert and tls.key go together");
        }
        if self.tls.validity > Duration::from_secs(14 * 24 * 3600) {
            return bad("tls.validity over 14 days: browsers refuse pinned certificates that long");
        }
        if self.tls.rotate_before >= self.tls.validity {
            return bad("tls.rotate_before must be shorter than tls.validity");
        }
        if self.commit_interval > MAX_COMMIT_INTERVAL {
            return bad("commit_interval must be at most 100ms (the latency target)");
        }
        if self.timeouts.ack_delay > TimeoutsConfig::MAX_ACK_DELAY {
            return bad("timeouts.ack_delay must be at most 1s");
        }
        if self.timeouts.heartbeat >= self.timeouts.idle {
            return bad(
                "timeouts.heartbeat must be shorter than timeouts.idle: its keep-alives keep idle connections open",
            );
        }
        if self.limits.max_frame_size < 1024 || self.limits.max_frame_size > 16 << 20 {
            return bad("limits.max_frame_size must be between 1 KiB and 16 MiB");
        }
        if self.limits.max_inflight_requests == 0
            || self.limits.push_queue_frames == 0
            || self.limits.control_queue_frames == 0
            || self.limits.max_connections == 0
        {
            return bad("limits must be positive");
        }
        self.limits.validate().map_err(ConfigError::Invalid)?;
        if let Some(secret) = &self.auth.jwt_secret
            && secret.len() < 32
        {
            return bad("auth.jwt_secret must be at least 32 bytes");
        }
        let mut kids = std::collections::HashSet::new();
        for key in &self.auth.keys {
            if key.kid.is_empty() || key.kid.len() > 64 {
                return bad("auth.keys: a kid is 1 to 64 characters");
            }
            if !kids.insert(key.kid.as_str()) {
                return bad("auth.keys: each kid once");
            }
            if key.secret.len() < 32 {
                return bad("auth.keys: each secret must be at least 32 bytes");
            }
        }
        if self.auth.leeway > MAX_LEEWAY {
            return bad("auth.leeway must be at most 5 minutes");
        }
        if self.auth.max_lifetime < Duration::from_secs(60)
            || self.auth.max_lifetime > Duration::from_secs(366 * 24 * 3600)
        {
            return bad("auth.max_lifetime must be between 1 minute and 366 days");
        }
        self.check_dev_mode()?;
        // Each service checks its own section.
        let services = [
            self.chat.validate(),
            self.notify.validate(),
            self.presence.validate(),
            self.collab.validate(),
            self.analytics.validate(),
            self.limits.rate.validate(),
            self.retention.validate(),
        ];
        for checked in services {
            checked.map_err(|e| ConfigError::Invalid(e.to_string()))?;
        }
        self.cluster.validate().map_err(ConfigError::Invalid)?;
        Ok(())
    }
}

impl From<&Config> for crate::services::ServicesConfig {
    /// The services' sections of the node's configuration.
    fn from(c: &Config) -> Self {
        Self {
            rooms: c.rooms.clone(),
            notify: c.notify.clone(),
            presence: c.presence.clone(),
            // Responses are frames: a service sizes its pages to fit one.
            collab: crate::services::collab::CollabConfig {
                max_response_bytes: c.limits.max_frame_size,
                ..c.collab.clone()
            },
            chat: crate::services::chat::ChatConfig {
                max_response_bytes: c.limits.max_frame_size,
                ..c.chat.clone()
            },
            analytics: c.analytics.clone(),
            retention: c.retention.clone(),
            clustered: c.cluster.enabled(),
        }
    }
}

/// Durations written the human way in TOML (kept beside the clock, so that the
/// services' own configuration types need nothing from here).
pub(crate) use crate::clock::duration_str;
pub use crate::gateway::{LimitsConfig, TimeoutsConfig};
pub use crate::tls::TlsConfig;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().unwrap();
    }

    #[test]
    fn a_heartbeat_as_long_as_the_idle_timeout_is_refused() {
        let mut c = Config::default();
        c.timeouts.heartbeat = c.timeouts.idle;
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("timeouts.heartbeat"), "{err}");
        c.timeouts.heartbeat = c.timeouts.idle - Duration::from_millis(1);
        c.validate().unwrap();
    }

    #[test]
    fn debug_output_never_shows_secrets() {
        let mut c = Config::default();
        c.auth.jwt_secret = Some("jwt-secret-0123456789abcdef0123456789".into());
        c.api.key = Some("api-key-0123456789abcdef0123456789abcd".into());
        let shown = format!("{c:?}");
        assert!(!shown.contains("jwt-secret-"), "{shown}");
        assert!(!shown.contains("api-key-"), "{shown}");
        assert!(shown.contains("<redacted>"));
    }

    #[test]
    fn file_then_overrides() {
        let mut c = Config::from_toml(
            "listen = \"127.0.0.1:5000\"\nhttp = \"127.0.0.1:5001\"\n[timeouts]\nhandshake = \"250ms\"\n",
            Path::new("t.toml"),
        )
        .unwrap();
        assert_eq!(c.listen.port(), 5000);
        assert_eq!(c.timeouts.handshake, Duration::from_millis(250));
        assert_eq!(
            c.timeouts.idle,
            Duration::from_secs(30),
            "unset keys keep defaults"
        );
        c.apply(Overrides {
            listen: Some("127.0.0.1:6000".parse().unwrap()),
            ..Default::default()
        });
        assert_eq!(c.listen.port(), 6000);
        assert_eq!(c.http.port(), 5001);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_errors() {
        assert!(matches!(
            Config::from_toml("lisen = \"x\"", Path::new("t.toml")),
            Err(ConfigError::Parse { .. })
        ));
        assert!(matches!(
            Config::from_toml(
                "[limits]\ncongestion_control = \"reno\"",
                Path::new("t.toml")
            ),
            Err(ConfigError::Parse { .. })
        ));
        let bbr = Config::from_toml(
            "[limits]\ncongestion_control = \"bbr\"",
            Path::new("t.toml"),
        );
        assert_eq!(
            bbr.unwrap().limits.congestion_control,
            crate::transport::CongestionControl::Bbr
        );
        let mut c = Config::default();
        c.tls.validity = Duration::from_secs(15 * 24 * 3600);
        assert!(matches!(c.validate(), Err(ConfigError::Invalid(_))));
        let mut c = Config::default();
        c.auth.jwt_secret = Some("short".into());
        assert!(c.validate().is_err());
        let mut c = Config::default();
        c.limits.connection_receive_window = c.limits.stream_receive_window - 1;
        assert!(
            c.validate().is_err(),
            "the connection window holds a stream's"
        );
        let mut c = Config::default();
        c.limits.push_queue_bytes = c.limits.max_frame_size - 1;
        assert!(c.validate().is_err(), "a queue holds a frame");
        let mut c = Config::default();
        c.limits.max_sessions_per_user = 0;
        assert!(c.validate().is_err());
        let c = Config::from_toml("commit_interval = \"101ms\"", Path::new("t.toml")).unwrap();
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("commit_interval"), "{err}");
        let c = Config::from_toml("commit_interval = \"0s\"", Path::new("t.toml")).unwrap();
        c.validate().unwrap();
        let c =
            Config::from_toml("[timeouts]\nack_delay = \"1001ms\"", Path::new("t.toml")).unwrap();
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("timeouts.ack_delay"), "{err}");
        let c = Config::from_toml("[timeouts]\nack_delay = \"0s\"", Path::new("t.toml")).unwrap();
        c.validate().unwrap();
        assert!(c.timeouts.ack_delay.is_zero());
    }

    #[test]
    fn development_mode_needs_loopback_addresses() {
        let mut c = Config {
            dev: true,
            ..Config::default()
        };
        c.validate().unwrap();
        c.listen = "[::1]:0".parse().unwrap();
        c.validate().unwrap();
        c.http = "0.0.0.0:8080".parse().unwrap();
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("http is 0.0.0.0:8080"), "{err}");
        c.http = "127.0.0.1:8080".parse().unwrap();
        c.listen = "192.0.2.1:4433".parse().unwrap();
        assert!(c.validate().is_err());
        c.dev = false;
        c.validate().unwrap();
    }

    #[test]
    fn token_settings_are_bounded() {
        let key = |kid: &str, secret: &str| KeyConfig {
            kid: kid.into(),
            secret: secret.into(),
        };
        let long = "s".repeat(32);
        let check = |tweak: &dyn Fn(&mut AuthConfig)| {
            let mut c = Config::default();
            tweak(&mut c.auth);
            c.validate()
        };
        check(&|a| a.keys = vec![key("a", &long), key("b", &long)]).unwrap();
        assert!(check(&|a| a.keys = vec![key("a", &long), key("a", &long)]).is_err());
        assert!(check(&|a| a.keys = vec![key("", &long)]).is_err());
        assert!(check(&|a| a.keys = vec![key("a", "short")]).is_err());
        assert!(check(&|a| a.leeway = Duration::from_secs(301)).is_err());
        assert!(check(&|a| a.max_lifetime = Duration::ZERO).is_err());
        let parsed = Config::from_toml(
            "[auth]\nissuer = \"https://id.example\"\nleeway = \"10s\"\nmax_lifetime = \"2h\"\n[[auth.keys]]\nkid = \"2026-12\"\nsecret = \"0123456789abcdef0123456789abcdef\"\n",
            Path::new("t.toml"),
        )
        .unwrap();
        parsed.validate().unwrap();
        assert_eq!(parsed.auth.keys[0].kid, "2026-12");
        assert_eq!(parsed.auth.max_lifetime, Duration::from_secs(7200));
        let shown = format!("{parsed:?}");
        assert!(!shown.contains("0123456789abcdef"), "{shown}");
    }
}
