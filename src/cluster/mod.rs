//! A cluster of Tutti nodes on NATS JetStream (docs/CLUSTER.md).
//!
//! - **Writes**: every change of shared state is a command in one JetStream stream
//!   ([`log`]); every node applies every command in stream order through the same
//!   services (`crate::services::replica`), so all nodes hold the same state and a
//!   node's redb is a view rebuilt from the stream when the node starts.
//! - **Datagrams** (typing, cursors) go over core NATS ([`broker`]).
//! - **Nodes** publish their address, certificate pin and load in a KV bucket
//!   every heartbeat ([`Cluster::nodes`], `GET /cluster`); a node not heard from
//!   within `node_ttl` is gone, and its sessions leave presence everywhere.

pub mod broker;
pub mod log;
pub mod peers;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::services::Services;
use crate::services::replica::{Op, Replicator};
use crate::util::Unpoisoned;

/// How long a starting node waits for the cluster log to become available.
const JOIN_PATIENCE: Duration = Duration::from_secs(30);

/// The `[cluster]` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// The NATS server(s), comma-separated (`nats://host:port`). Empty: a single
    /// node with no cluster (the default).
    pub url: String,
    /// Copies JetStream keeps of the command log (3 in production; 1 on a single
    /// NATS server).
    pub replicas: usize,
    /// The stream's name; every node of one cluster uses the same.
    pub stream: String,
    /// Prefix of every subject and bucket name of this cluster.
    pub prefix: String,
    /// The address clients should use for this node's QUIC and WebTransport port
    /// (default: the listen address).
    pub public_addr: Option<SocketAddr>,
    /// How often the node publishes itself in the node list.
    #[serde(with = "crate::clock::duration_str")]
    pub heartbeat: Duration,
    /// A node not heard from for this long is gone: its sessions go offline.
    #[serde(with = "crate::clock::duration_str")]
    pub node_ttl: Duration,
    /// How long a write waits for the log before it fails as `UNAVAILABLE`.
    #[serde(with = "crate::clock::duration_str")]
    pub write_timeout: Duration,
    /// A node with more than this multiple of the cluster's average sessions
    /// redirects new sessions to a less loaded node.
    pub max_share: f64,
    /// ... but only once it has at least this many sessions.
    pub redirect_min_sessions: u64,
    /// A draining node's sessions reconnect at random within this time, so that
    /// the other nodes are not hit all at once.
    #[serde(with = "crate::clock::duration_str")]
    pub drain_spread: Duration,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            replicas: 1,
            stream: "TUTTI".into(),
            prefix: "tutti".into(),
            public_addr: None,
            heartbeat: Duration::from_secs(1),
            node_ttl: Duration::from_secs(5),
            write_timeout: Duration::from_secs(5),
            max_share: 1.5,
            redirect_min_sessions: 100,
            drain_spread: Duration::from_secs(5),
        }
    }
}

impl ClusterConfig {
    /// Whether the node joins a cluster.
    pub fn enabled(&self) -> bool {
        !self.url.trim().is_empty()
    }

    /// Rejects values that cannot work.
    pub fn validate(&self) -> Result<(), String> {
        if !self.enabled() {
            return Ok(());
        }
        if !(1..=5).contains(&self.replicas) {
            return Err("cluster.replicas must be 1-5".into());
        }
        let token_ok = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        };
        if !token_ok(&self.stream) || !token_ok(&self.prefix) {
            return Err("cluster.stream and cluster.prefix must be [A-Za-z0-9_-]+".into());
        }
        if self.heartbeat.is_zero() || self.node_ttl < self.heartbeat * 2 {
            return Err("cluster.node_ttl must be at least twice cluster.heartbeat".into());
        }
        if self.max_share.is_nan() || self.max_share < 1.0 {
            return Err("cluster.max_share must be at least 1".into());
        }
        if self.write_timeout.is_zero() {
            return Err("cluster.write_timeout must be positive".into());
        }
        Ok(())
    }
}

/// One node as the node list shows it (`GET /cluster`, public: no secrets).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Its id.
    pub id: String,
    /// QUIC address (raw QUIC and WebTransport).
    pub quic: String,
    /// WebTransport URL.
    pub webtransport_url: String,
    /// SHA-256 of its certificate, hex (for pinning).
    pub cert_hash: String,
    /// Its HTTP side port.
    pub http: String,
    /// Sessions open on it now.
    pub sessions: u64,
    /// Draining: takes no new sessions.
    pub draining: bool,
    /// When it last published itself (milliseconds since the Unix epoch).
    pub updated_ms: u64,
}

/// What the node publishes about itself, besides its load.
#[derive(Clone)]
pub struct SelfInfo {
    /// QUIC address clients use.
    pub quic: SocketAddr,
    /// HTTP side port.
    pub http: SocketAddr,
    /// Current certificate pin (it rotates).
    pub cert_hash: Arc<dyn Fn() -> String + Send + Sync>,
    /// Sessions open now.
    pub sessions: Arc<dyn Fn() -> u64 + Send + Sync>,
}

impl std::fmt::Debug for SelfInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SelfInfo")
            .field("quic", &self.quic)
            .field("http", &self.http)
            .finish_non_exhaustive()
    }
}

/// The connection to the cluster, before the services are open: what they need
/// from it (the broker for the hub).
#[derive(Debug)]
pub struct Connection {
    client: async_nats::Client,
    config: ClusterConfig,
    node: String,
    /// Datagrams between nodes; give it to the hub.
    pub broker: Arc<broker::NatsBroker>,
}

impl Connection {
    /// Connects to NATS as node `node`.
    pub async fn connect(config: &ClusterConfig, node: &str) -> anyhow::Result<Self> {
        let servers = config
            .url
            .split(',')
            .map(|u| u.trim().parse::<async_nats::ServerAddr>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| anyhow::anyhow!("cluster.url {:?}: {e}", config.url))?;
        let client = async_nats::ConnectOptions::new()
            .name(format!("tutti {node}"))
            .connect(servers)
            .await
            .map_err(|e| anyhow::anyhow!("connecting to NATS at {}: {e}", config.url))?;
        let broker = Arc::new(broker::NatsBroker::new(
            client.clone(),
            &config.prefix,
            node,
        ));
        Ok(Self {
            client,
            config: config.clone(),
            node: node.to_owned(),
            broker,
        })
    }
}

/// A node's membership of the cluster.
#[derive(Debug)]
pub struct Cluster {
    client: async_nats::Client,
    config: ClusterConfig,
    node: String,
    log: Arc<log::CommandLog>,
    nodes: Mutex<HashMap<String, (NodeInfo, Instant)>>,
    draining: AtomicBool,
    heartbeats: AtomicU64,
    publish_now: tokio::sync::Notify,
}

impl Cluster {
    /// Joins: opens the command log, applies it from the start into the (empty)
    /// database behind `services`, makes the services write through it, and
    /// starts the heartbeats. Returns once this node has caught up with the log.
    pub async fn join(
        conn: Connection,
        services: Arc<Services>,
        me: SelfInfo,
        tasks: &tokio_util::task::TaskTracker,
        stop: CancellationToken,
    ) -> anyhow::Result<Arc<Self>> {
        let Connection {
            client,
            config,
            node,
            broker: _,
        } = conn;
        let js = jetstream::new(client.clone());
        let subject = format!("{}.cmd", config.prefix);
        // NATS may be starting too (a JetStream cluster elects its leaders first):
        // keep trying for a while before giving up.
        let deadline = Instant::now() + JOIN_PATIENCE;
        let log = loop {
            match log::CommandLog::open(
                js.clone(),
                &config.stream,
                &subject,
                config.replicas,
                &node,
                config.write_timeout,
            )
            .await
            {
                Ok(log) => break log,
                Err(e) if Instant::now() < deadline => {
                    tracing::info!(error = %e, "the cluster log is not ready yet; retrying");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(e) => return Err(e),
            }
        };
        let last = log.last_sequence(&config.stream).await?;
        tasks.spawn(
            log.clone()
                .run_applier(config.stream.clone(), services.clone(), stop.clone()),
        );
        let started = Instant::now();
        log.applied_through(last).await;
        tracing::info!(commands = last, took = ?started.elapsed(), "caught up with the cluster log");
        services.set_replicator(log.clone());
        // Sessions this node id had before a restart are gone.
        if let Err(e) = log.propose(Op::NodeGone(node.clone()), None).await {
            tracing::warn!(error = %e.message, "clearing this node's earlier sessions");
        }
        let kv = js
            .create_or_update_key_value(jetstream::kv::Config {
                bucket: format!("{}_nodes", config.prefix),
                history: 1,
                max_age: config.node_ttl * 4,
                num_replicas: config.replicas,
                ..Default::default()
            })
            .await
            .map_err(|e| anyhow::anyhow!("creating the node list bucket: {e}"))?;
        let cluster = Arc::new(Self {
            client,
            config,
            node,
            log,
            nodes: Mutex::new(HashMap::new()),
            draining: AtomicBool::new(false),
            heartbeats: AtomicU64::new(0),
            publish_now: tokio::sync::Notify::new(),
        });
        let peers = Arc::new(peers::NatsPeers::new(
            cluster.client.clone(),
            &cluster.config.prefix,
            &cluster.node,
            Arc::downgrade(&cluster),
        ));
        services.analytics.set_peers(peers.clone());
        tasks.spawn(peers.serve(services.analytics.clone(), stop.clone()));
        tasks.spawn(cluster.clone().heartbeat(kv.clone(), me, stop.clone()));
        tasks.spawn(cluster.clone().watch_nodes(kv, stop));
        Ok(cluster)
    }

    /// This node's id.
    pub fn node_id(&self) -> &str {
        &self.node
    }

    /// Whether the node can take writes: connected to NATS.
    pub fn is_ready(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// The last log sequence this node applied.
    pub fn applied(&self) -> u64 {
        self.log.applied()
    }

    /// Marks this node draining in the node list (it takes no new sessions) and
    /// publishes that at once.
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Release);
        self.publish_now.notify_one();
    }

    /// Waits (a bounded time) until the node list has this node's next heartbeat.
    pub async fn wait_published(&self) {
        let before = self.heartbeats.load(Ordering::Acquire);
        let _ = tokio::time::timeout(self.config.heartbeat * 2, async {
            while self.heartbeats.load(Ordering::Acquire) == before {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
    }

    /// Whether this node is draining.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// The live nodes, this one included, ordered by id.
    pub fn nodes(&self) -> Vec<NodeInfo> {
        let ttl = self.config.node_ttl;
        let nodes = self.nodes.locked();
        let mut out: Vec<NodeInfo> = nodes
            .values()
            .filter(|(_, seen)| seen.elapsed() < ttl)
            .map(|(n, _)| n.clone())
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    async fn heartbeat(
        self: Arc<Self>,
        kv: jetstream::kv::Store,
        me: SelfInfo,
        stop: CancellationToken,
    ) {
        let mut every = tokio::time::interval(self.config.heartbeat);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = every.tick() => {}
                _ = self.publish_now.notified() => {}
            }
            let info = NodeInfo {
                id: self.node.clone(),
                quic: me.quic.to_string(),
                webtransport_url: crate::server::webtransport_url(me.quic),
                cert_hash: (me.cert_hash)(),
                http: me.http.to_string(),
                sessions: (me.sessions)(),
                draining: self.draining.load(Ordering::Acquire),
                updated_ms: crate::util::unix_millis(),
            };
            let value = serde_json::to_vec(&info).expect("plain data");
            match kv.put(&self.node, value.into()).await {
                Ok(_) => {
                    self.heartbeats.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => tracing::debug!(error = %e, "publishing this node"),
            }
        }
        // Leaving: the others need not wait for the entry to age out.
        let _ = kv.delete(&self.node).await;
    }

    /// Follows the node list; proposes that a node is gone once it has not been
    /// heard from within `node_ttl`.
    async fn watch_nodes(self: Arc<Self>, kv: jetstream::kv::Store, stop: CancellationToken) {
        let mut check = tokio::time::interval(self.config.heartbeat);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        'watch: loop {
            let mut watch = match kv.watch_with_history(">").await {
                Ok(w) => w,
                Err(e) => {
                    tracing::debug!(error = %e, "watching the node list");
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(self.config.heartbeat) => continue 'watch,
                    }
                }
            };
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    entry = watch.next() => match entry {
                        Some(Ok(entry)) => self.saw(entry),
                        _ => continue 'watch,
                    },
                    _ = check.tick() => self.expire().await,
                }
            }
        }
    }

    fn saw(&self, entry: jetstream::kv::Entry) {
        let mut nodes = self.nodes.locked();
        match entry.operation {
            jetstream::kv::Operation::Put => {
                if let Ok(info) = serde_json::from_slice::<NodeInfo>(&entry.value) {
                    // History replayed at start may be old: judge it by its stamp.
                    let age = crate::util::unix_millis().saturating_sub(info.updated_ms);
                    let seen = Instant::now()
                        .checked_sub(Duration::from_millis(age))
                        .unwrap_or_else(Instant::now);
                    nodes.insert(info.id.clone(), (info, seen));
                }
            }
            _ => {
                // Deleted: it left cleanly; expire it now.
                if let Some((_, seen)) = nodes.get_mut(&entry.key) {
                    *seen = Instant::now()
                        .checked_sub(self.config.node_ttl)
                        .unwrap_or(*seen);
                }
            }
        }
    }

    async fn expire(&self) {
        let gone: Vec<String> = {
            let mut nodes = self.nodes.locked();
            let ttl = self.config.node_ttl;
            let gone: Vec<String> = nodes
                .iter()
                .filter(|(id, (_, seen))| **id != self.node && seen.elapsed() >= ttl)
                .map(|(id, _)| id.clone())
                .collect();
            for id in &gone {
                nodes.remove(id);
            }
            gone
        };
        for node in gone {
            tracing::info!(node, "node gone; its sessions leave presence");
            if let Err(e) = self.log.propose(Op::NodeGone(node.clone()), None).await {
                tracing::warn!(error = %e.message, node, "announcing a node gone");
            }
        }
    }
}

fn wire(n: &NodeInfo) -> crate::protocol::v1::Node {
    crate::protocol::v1::Node {
        node_id: n.id.clone(),
        address: n.quic.clone(),
        webtransport_url: n.webtransport_url.clone(),
        cert_hash: n.cert_hash.clone(),
        sessions: n.sessions,
        draining: n.draining,
    }
}

impl crate::gateway::Directory for Cluster {
    fn nodes(&self) -> Vec<crate::protocol::v1::Node> {
        self.nodes().iter().map(wire).collect()
    }

    fn redirect(&self, sessions_here: usize) -> Option<Vec<crate::protocol::v1::Node>> {
        let nodes = self.nodes();
        let mut others: Vec<&NodeInfo> = nodes
            .iter()
            .filter(|n| n.id != self.node && !n.draining)
            .collect();
        if others.is_empty() {
            return None;
        }
        others.sort_by_key(|n| n.sessions);
        let best = || Some(others.iter().map(|n| wire(n)).collect());
        if self.is_draining() {
            return best();
        }
        let here = sessions_here as u64;
        if here < self.config.redirect_min_sessions {
            return None;
        }
        let total: u64 = others.iter().map(|n| n.sessions).sum::<u64>() + here;
        let average = total as f64 / (others.len() + 1) as f64;
        let over = here as f64 > self.config.max_share * average;
        let room_elsewhere = (others[0].sessions as f64) + 1.0 < average;
        if over && room_elsewhere { best() } else { None }
    }

    fn reconnect_spread(&self) -> Duration {
        self.config.drain_spread
    }
}
