//! Scenario files: TOML describing one workload, its parameters and its SLOs.
//!
//! Every table has defaults, so a file names only what differs; unknown keys are
//! errors (a typo must not silently run the default). Durations are written the human
//! way: `"10s"`, `"500ms"`.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::slo::SloSpec;

/// What a scenario exercises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Clients in rooms sending chat messages at a fixed rate.
    ChatFanout,
    /// Chat fan-out stepping the rate up until an SLO breaks.
    Knee,
    /// Many connections held open doing nothing.
    Idle,
    /// Notifications created through the HTTP server API, delivered to sessions.
    NotifyBurst,
    /// Connect/disconnect storms with status changes, watched by room mates.
    PresenceChurn,
    /// Editors typing into shared documents; every copy must converge.
    Collab,
    /// Chat, collaboration, notifications and presence churn at once.
    Mixed,
    /// Chat on a cluster while one node is killed (`--cluster`): every
    /// acknowledged message delivered once, every room identical on every node.
    Failover,
}

impl Kind {
    /// The name used in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::ChatFanout => "chat_fanout",
            Kind::Knee => "knee",
            Kind::Idle => "idle",
            Kind::NotifyBurst => "notify_burst",
            Kind::PresenceChurn => "presence_churn",
            Kind::Collab => "collab",
            Kind::Mixed => "mixed",
            Kind::Failover => "failover",
        }
    }
}

/// A whole scenario file.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// A short name, used in reports.
    pub name: String,
    /// The workload.
    pub kind: Kind,
    /// `quic` or `webtransport` (the command line overrides it).
    #[serde(default)]
    pub transport: Option<String>,
    /// Chat fan-out parameters (chat_fanout, knee, mixed).
    #[serde(default)]
    pub chat: ChatParams,
    /// Knee-search parameters.
    #[serde(default)]
    pub knee: KneeParams,
    /// Idle-connection parameters.
    #[serde(default)]
    pub idle: IdleParams,
    /// Failover parameters.
    #[serde(default)]
    pub failover: FailoverParams,
    /// Notification-burst parameters (notify_burst, mixed).
    #[serde(default)]
    pub notify: NotifyParams,
    /// Presence-churn parameters (presence_churn, mixed).
    #[serde(default)]
    pub presence: PresenceParams,
    /// Collaboration parameters (collab, mixed).
    #[serde(default)]
    pub collab: CollabParams,
    /// Verdict thresholds.
    #[serde(default)]
    pub slo: SloSpec,
}

impl Scenario {
    /// Reads and checks a scenario file.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading scenario {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("in scenario {}", path.display()))
    }

    /// Parses and checks scenario text.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let s: Scenario = toml::from_str(text)?;
        s.validate()?;
        Ok(s)
    }

    /// The parameters that matter for this kind, for the report.
    pub fn params(&self) -> serde_json::Value {
        let mut m = serde_json::Map::new();
        let mut put = |k: &str, v: serde_json::Value| {
            m.insert(k.to_owned(), v);
        };
        fn j<T: Serialize>(v: &T) -> serde_json::Value {
            serde_json::to_value(v).unwrap_or(serde_json::Value::Null)
        }
        match self.kind {
            Kind::ChatFanout => put("chat", j(&self.chat)),
            Kind::Knee => {
                put("chat", j(&self.chat));
                put("knee", j(&self.knee));
            }
            Kind::Idle => put("idle", j(&self.idle)),
            Kind::Failover => put("failover", j(&self.failover)),
            Kind::NotifyBurst => put("notify", j(&self.notify)),
            Kind::PresenceChurn => put("presence", j(&self.presence)),
            Kind::Collab => put("collab", j(&self.collab)),
            Kind::Mixed => {
                put("chat", j(&self.chat));
                put("notify", j(&self.notify));
                put("presence", j(&self.presence));
                put("collab", j(&self.collab));
            }
        }
        put("slo", j(&self.slo));
        serde_json::Value::Object(m)
    }

    fn validate(&self) -> anyhow::Result<()> {
        let c = &self.chat;
        anyhow::ensure!(c.clients > 0, "chat.clients must be positive");
        anyhow::ensure!(
            c.room_size > 0 && c.room_size <= c.clients,
            "chat.room_size must be between 1 and chat.clients"
        );
        anyhow::ensure!(
            c.rate_per_client > 0.0 && c.rate_per_client.is_finite(),
            "chat.rate_per_client must be positive"
        );
        anyhow::ensure!(
            c.payload_bytes >= 48 && c.payload_bytes <= 4096,
            "chat.payload_bytes must be 48..=4096 (the header takes up to 48 bytes)"
        );
        anyhow::ensure!(
            !c.measure.is_zero(),
            "chat.measure must be longer than zero"
        );
        anyhow::ensure!(
            (0.0..=100.0).contains(&c.typing_per_client),
            "chat.typing_per_client must be 0..=100"
        );
        anyhow::ensure!(
            c.history_every.is_zero() || c.history_every >= Duration::from_millis(10),
            "chat.history_every must be 0 (off) or at least 10ms"
        );
        anyhow::ensure!(
            c.prefill_messages <= 10_000,
            "chat.prefill_messages must be at most 10,000"
        );
        anyhow::ensure!(
            c.rebind_at < c.measure,
            "chat.rebind_at must fall inside the measured window (chat.measure)"
        );
        let k = &self.knee;
        anyhow::ensure!(k.factor > 1.0, "knee.factor must be above 1");
        anyhow::ensure!(k.max_steps > 0, "knee.max_steps must be positive");
        anyhow::ensure!(k.bisections <= 8, "knee.bisections must be at most 8");
        anyhow::ensure!(
            k.start_deliveries_per_sec > 0.0,
            "knee.start_deliveries_per_sec must be positive"
        );
        anyhow::ensure!(
            self.idle.connections > 0,
            "idle.connections must be positive"
        );
        anyhow::ensure!(self.notify.users > 0, "notify.users must be positive");
        anyhow::ensure!(
            self.notify.http_connections > 0,
            "notify.http_connections must be positive"
        );
        let p = &self.presence;
        anyhow::ensure!(
            p.watchers_per_group > 0 && p.churners_per_group > 0,
            "presence.watchers_per_group and presence.churners_per_group must be positive"
        );
        anyhow::ensure!(p.groups > 0, "presence.groups must be positive");
        let co = &self.collab;
        anyhow::ensure!(
            co.documents > 0 && co.editors_per_document > 0,
            "collab.documents and collab.editors_per_document must be positive"
        );
        anyhow::ensure!(
            co.keystrokes_per_sec > 0.0,
            "collab.keystrokes_per_sec must be positive"
        );
        if let Some(t) = &self.transport {
            t.parse::<tutti::transport::TransportKind>()
                .map_err(anyhow::Error::msg)?;
        }
        Ok(())
    }
}

/// `[chat]`: clients in rooms sending at a rate.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ChatParams {
    /// Connected clients (one user each).
    pub clients: usize,
    /// Participants per room, the sender included: one send is this many deliveries.
    pub room_size: usize,
    /// Messages per second each client sends.
    pub rate_per_client: f64,
    /// The chat message text length in bytes (sequence number and timestamp included).
    pub payload_bytes: usize,
    /// Connections start spread evenly over this.
    #[serde(with = "dur")]
    pub ramp_up: Duration,
    /// Sending before the measured window (not counted).
    #[serde(with = "dur")]
    pub warm_up: Duration,
    /// The measured window: only messages sent in it count.
    #[serde(with = "dur")]
    pub measure: Duration,
    /// After the window, how long to wait at most for its messages to arrive.
    #[serde(with = "dur")]
    pub drain: Duration,
    /// Connections being set up at once at most.
    pub connect_concurrency: usize,
    /// Requests one client may have waiting for their response.
    pub max_inflight_per_client: usize,
    /// Typing indicators each client sends per second (0: none), alternating on
    /// and off. Tutti sends them as datagrams; their latency is reported apart.
    pub typing_per_client: f64,
    /// How often each client fetches its room's latest history page (0: never),
    /// beside the live traffic: the head-of-line case.
    #[serde(with = "dur")]
    pub history_every: Duration,
    /// Messages of `payload_bytes` each room gets before the run (not measured),
    /// so that a history page is full.
    pub prefill_messages: usize,
    /// When, into the measured window, every shared client endpoint moves to a
    /// new local port (0: never), as a device changing networks: QUIC migrates
    /// the connections.
    #[serde(with = "dur")]
    pub rebind_at: Duration,
    /// Each send carries a new client message id, as Tutti's client libraries
    /// send them, so that the server keeps an idempotency record with the message
    /// (off: the plain send, as Socket.IO's emit).
    pub client_message_ids: bool,
}

impl Default for ChatParams {
    fn default() -> Self {
        Self {
            clients: 100,
            room_size: 10,
            rate_per_client: 1.0,
            payload_bytes: 100,
            ramp_up: Duration::from_secs(2),
            warm_up: Duration::from_secs(2),
            measure: Duration::from_secs(10),
            drain: Duration::from_secs(5),
            connect_concurrency: 64,
            max_inflight_per_client: 32,
            typing_per_client: 0.0,
            history_every: Duration::ZERO,
            prefill_messages: 0,
            rebind_at: Duration::ZERO,
            client_message_ids: false,
        }
    }
}

impl ChatParams {
    /// Deliveries per second this configuration aims at.
    pub fn deliveries_per_sec(&self) -> f64 {
        self.clients as f64 * self.rate_per_client * self.room_size as f64
    }
}

/// `[knee]`: the rate ladder of a knee search.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct KneeParams {
    /// The first step's total deliveries per second.
    pub start_deliveries_per_sec: f64,
    /// Each step multiplies the rate by this.
    pub factor: f64,
    /// Steps at most before the bisections.
    pub max_steps: usize,
    /// Geometric bisections between the last passing and the first failing step
    /// (each takes the square root of the ratio between them: with `factor` 1.5,
    /// one leaves the knee within 22%, three within 5%).
    pub bisections: usize,
    /// Warm-up of each step.
    #[serde(with = "dur")]
    pub step_warm_up: Duration,
    /// Measured window of each step.
    #[serde(with = "dur")]
    pub step_measure: Duration,
}

impl Default for KneeParams {
    fn default() -> Self {
        Self {
            start_deliveries_per_sec: 5_000.0,
            factor: 1.5,
            max_steps: 8,
            bisections: 1,
            step_warm_up: Duration::from_secs(3),
            step_measure: Duration::from_secs(10),
        }
    }
}

/// `[failover]`: chat through a cluster while the last node is SIGKILLed.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct FailoverParams {
    /// Users, one session each, spread over the nodes round-robin.
    pub users: usize,
    /// Participants per room.
    pub room_size: usize,
    /// Messages each user sends (each retried with its id until acknowledged).
    pub messages: usize,
    /// Messages per second per user.
    pub rate_per_user: f64,
    /// When the last node is killed, from the first send.
    #[serde(with = "dur")]
    pub kill_after: Duration,
    /// A request (or a connect) not answered within this fails, and the client
    /// moves to another node.
    #[serde(with = "dur")]
    pub request_timeout: Duration,
}

impl Default for FailoverParams {
    fn default() -> Self {
        Self {
            users: 60,
            room_size: 6,
            messages: 60,
            rate_per_user: 10.0,
            kill_after: Duration::from_secs(2),
            request_timeout: Duration::from_secs(2),
        }
    }
}

/// `[idle]`: connections held open.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct IdleParams {
    /// Connections to open and hold.
    pub connections: usize,
    /// Connections start spread evenly over this.
    #[serde(with = "dur")]
    pub ramp_up: Duration,
    /// How long to hold them all once open.
    #[serde(with = "dur")]
    pub hold: Duration,
    /// Connections being set up at once at most.
    pub connect_concurrency: usize,
    /// After the hold: close every connection and reconnect them all at once
    /// (a mass disconnect), first with the TLS sessions of the first connects
    /// (resumed handshakes), then again without (full handshakes); reports both
    /// rates and the CPU per connect of the server and of the generator for each.
    pub reconnect: bool,
}

impl Default for IdleParams {
    fn default() -> Self {
        Self {
            connections: 1_000,
            ramp_up: Duration::from_secs(10),
            hold: Duration::from_secs(10),
            connect_concurrency: 256,
            reconnect: false,
        }
    }
}

/// `[notify]`: notifications through the HTTP server API.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct NotifyParams {
    /// Connected users, one session each.
    pub users: usize,
    /// Notifications created for each user.
    pub per_user: usize,
    /// Notifications created per second in total; 0: as fast as the HTTP connections go.
    pub rate: f64,
    /// Keep-alive HTTP connections posting in parallel.
    pub http_connections: usize,
    /// Extra bytes in each notification's body.
    pub payload_bytes: usize,
    /// Connections start spread evenly over this.
    #[serde(with = "dur")]
    pub ramp_up: Duration,
    /// After the burst, how long to wait at most for its notifications to arrive.
    #[serde(with = "dur")]
    pub drain: Duration,
}

impl Default for NotifyParams {
    fn default() -> Self {
        Self {
            users: 100,
            per_user: 10,
            rate: 0.0,
            http_connections: 8,
            payload_bytes: 64,
            ramp_up: Duration::from_secs(2),
            drain: Duration::from_secs(5),
        }
    }
}

/// `[presence]`: connect/disconnect storms watched by room mates.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct PresenceParams {
    /// Groups of users; each group shares one room, so they watch each other.
    pub groups: usize,
    /// Users per group that stay connected and watch.
    pub watchers_per_group: usize,
    /// Users per group that connect, change status and disconnect in a loop.
    pub churners_per_group: usize,
    /// How long the storm lasts.
    #[serde(with = "dur")]
    pub duration: Duration,
    /// A churner's session lasts this long.
    #[serde(with = "dur")]
    pub session: Duration,
    /// A churner waits this long between sessions.
    #[serde(with = "dur")]
    pub pause: Duration,
    /// Status changes per churner session.
    pub status_changes: usize,
}

impl Default for PresenceParams {
    fn default() -> Self {
        Self {
            groups: 20,
            watchers_per_group: 3,
            churners_per_group: 3,
            duration: Duration::from_secs(10),
            session: Duration::from_millis(1500),
            pause: Duration::from_millis(200),
            status_changes: 2,
        }
    }
}

/// `[collab]`: editors typing into shared documents.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct CollabParams {
    /// Documents.
    pub documents: usize,
    /// Editors per document, one session each.
    pub editors_per_document: usize,
    /// Keystrokes (one-character edits) per second per editor.
    pub keystrokes_per_sec: f64,
    /// How long everyone types.
    #[serde(with = "dur")]
    pub measure: Duration,
    /// After typing stops, how long to wait at most for every copy to settle.
    #[serde(with = "dur")]
    pub settle: Duration,
    /// Connections start spread evenly over this.
    #[serde(with = "dur")]
    pub ramp_up: Duration,
}

impl Default for CollabParams {
    fn default() -> Self {
        Self {
            documents: 10,
            editors_per_document: 4,
            keystrokes_per_sec: 5.0,
            measure: Duration::from_secs(10),
            settle: Duration::from_secs(10),
            ramp_up: Duration::from_secs(2),
        }
    }
}

/// Durations as humantime strings in TOML and JSON.
pub(crate) mod dur {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(serde::de::Error::custom)
    }

    pub(crate) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_minimal_file_takes_defaults() {
        let s = Scenario::parse("name = \"x\"\nkind = \"chat_fanout\"\n").unwrap();
        assert_eq!(s.kind, Kind::ChatFanout);
        assert_eq!(s.chat.room_size, 10);
        assert_eq!(s.slo.latency_p99_ms, 100.0);
    }

    #[test]
    fn durations_and_tables_parse() {
        let s = Scenario::parse(
            "name = \"f\"\nkind = \"knee\"\ntransport = \"webtransport\"\n\
             [chat]\nclients = 50\nroom_size = 5\nmeasure = \"1500ms\"\n\
             [knee]\nfactor = 2.0\nbisections = 3\n[slo]\nlatency_p99_ms = 50\n",
        )
        .unwrap();
        assert_eq!(s.knee.bisections, 3);
        assert_eq!(s.chat.measure, Duration::from_millis(1500));
        assert_eq!(s.knee.factor, 2.0);
        assert_eq!(s.slo.latency_p99_ms, 50.0);
        assert_eq!(s.chat.deliveries_per_sec(), 250.0);
        let p = s.params();
        assert_eq!(p["chat"]["measure"], "1s 500ms");
        assert!(p.get("idle").is_none());
    }

    #[test]
    fn typos_and_bad_values_are_errors() {
        assert!(Scenario::parse("name = \"x\"\nkind = \"chat_fanout\"\nclinets = 3\n").is_err());
        assert!(Scenario::parse("name = \"x\"\nkind = \"nope\"\n").is_err());
        assert!(
            Scenario::parse("name = \"x\"\nkind = \"chat_fanout\"\n[chat]\nroom_size = 0\n")
                .is_err()
        );
        assert!(
            Scenario::parse("name = \"x\"\nkind = \"chat_fanout\"\ntransport = \"tcp\"\n").is_err()
        );
        assert!(
            Scenario::parse("name = \"x\"\nkind = \"knee\"\n[knee]\nbisections = 9\n").is_err()
        );
    }

    #[test]
    fn shipped_scenarios_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
        let mut n = 0;
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "toml") {
                Scenario::load(&p).unwrap();
                n += 1;
            }
        }
        assert!(n >= 7, "{n} scenarios");
    }
}
