//! Analytics across the nodes of a cluster.
//!
//! Each node counts the events tracked on it. A query asks every other live node
//! for its part ([`PeerQuery`], over the cluster's messaging, see
//! `crate::cluster::peers`) while answering its own, then sums: series point by
//! point, top types by type (each node sends all of its types so the cluster's top
//! is exact), and distinct users by merging HyperLogLog sketches (a user seen on two
//! nodes counts once). Every answer also lists each node's own part, and the nodes
//! that did not answer in time, whose counts are then missing from the sums.
//!
//! A metrics subscription with `all_nodes` also runs on every other node (and on
//! nodes that join later): the subscribing node renews it while its session keeps
//! it, each node streams its own updates tagged with its id, and the subscribing
//! node relays them to the session.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::sync::mpsc;

use super::hll::Hll;
use super::{AnalyticsService, ServiceResult, SessionCtx};
use crate::hub::Subscriber;
use crate::protocol::v1::{self, Push, StreamKind, push};
use crate::util::Unpoisoned;

/// How long a node waits for the others' answers to a query.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a remote metrics stream runs without being renewed.
pub const FEED_LEASE: Duration = Duration::from_secs(15);

/// A query one node asks the others.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PeerQuery {
    /// What is asked.
    #[prost(oneof = "peer_query::Kind", tags = "1, 2, 3")]
    pub kind: Option<peer_query::Kind>,
}

/// The kinds of [`PeerQuery`].
pub mod peer_query {
    use crate::protocol::v1;

    /// What a [`super::PeerQuery`] asks.
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Kind {
        /// A series (`by_node` is ignored: the node's points are its answer).
        #[prost(message, tag = "1")]
        Series(v1::AnalyticsSeriesRequest),
        /// The node's event types and counts over a window (all of them).
        #[prost(uint64, tag = "2")]
        Top(u64),
        /// The node's sketch of distinct users over a window.
        #[prost(uint64, tag = "3")]
        Users(u64),
    }
}

/// One node's answer to a [`PeerQuery`].
#[derive(Clone, PartialEq, prost::Message)]
pub struct PeerAnswer {
    /// The answering node.
    #[prost(string, tag = "1")]
    pub node_id: String,
    /// What it answered.
    #[prost(oneof = "peer_answer::Kind", tags = "2, 3, 4, 5")]
    pub kind: Option<peer_answer::Kind>,
}

/// The kinds of [`PeerAnswer`].
pub mod peer_answer {
    use crate::protocol::v1;

    /// What a [`super::PeerAnswer`] holds.
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Kind {
        /// The node's series.
        #[prost(message, tag = "2")]
        Series(v1::AnalyticsSeriesResponse),
        /// The node's event types with their counts.
        #[prost(message, tag = "3")]
        Top(v1::AnalyticsTopResponse),
        /// The node's HyperLogLog registers of users.
        #[prost(bytes = "vec", tag = "4")]
        Users(Vec<u8>),
        /// The node could not answer.
        #[prost(string, tag = "5")]
        Error(String),
    }
}

/// A metrics stream asked of the other nodes.
#[derive(Clone, PartialEq, prost::Message)]
pub struct FeedRequest {
    /// Unique per subscription (renewals repeat it).
    #[prost(string, tag = "1")]
    pub id: String,
    /// The node that relays it to its session.
    #[prost(string, tag = "2")]
    pub origin: String,
    /// What to stream; empty when the subscription ended.
    #[prost(message, optional, tag = "3")]
    pub subscribe: Option<v1::MetricsSubscribeRequest>,
}

/// The other nodes of a cluster, as analytics reaches them.
pub trait Peers: Send + Sync + std::fmt::Debug {
    /// This node's id.
    fn node_id(&self) -> &str;

    /// Asks every other live node; returns the answers that came within
    /// [`QUERY_TIMEOUT`] and the live nodes that did not answer.
    fn ask(&self, query: PeerQuery) -> BoxFuture<'_, (Vec<PeerAnswer>, Vec<String>)>;

    /// Has every other node (and every node that joins later) stream metrics as
    /// `request` says, until the returned receiver is dropped.
    fn feed(&self, request: v1::MetricsSubscribeRequest) -> mpsc::Receiver<v1::MetricsUpdate>;
}

impl AnalyticsService {
    /// Makes queries and metrics subscriptions cluster-wide.
    pub fn set_peers(&self, peers: Arc<dyn Peers>) {
        let _ = self.peers.set(peers);
    }

    /// This node's id in a cluster; empty on a single node.
    pub(super) fn node_id(&self) -> &str {
        self.peers.get().map_or("", |p| p.node_id())
    }

    /// Answers another node's query with this node's own counts.
    pub async fn answer_peer(&self, query: PeerQuery) -> PeerAnswer {
        use peer_answer::Kind as A;
        use peer_query::Kind as Q;
        let kind = match query.kind {
            Some(Q::Series(r)) => self
                .series(&r.r#type, &r.dimension, r.duration_ms, r.resolution_ms)
                .await
                .map(|s| A::Series(series_wire(s.resolution_ms, s.points, s.total))),
            Some(Q::Top(window_ms)) => self.top(window_ms, usize::MAX).await.map(|types| {
                A::Top(v1::AnalyticsTopResponse {
                    types: type_counts(types),
                    ..Default::default()
                })
            }),
            Some(Q::Users(window_ms)) => self
                .users_sketch(window_ms)
                .await
                .map(|(sketch, _)| A::Users(sketch.as_bytes().to_vec())),
            None => Err(super::ServiceError::bad_request("empty query")),
        };
        PeerAnswer {
            node_id: self.node_id().to_owned(),
            kind: Some(kind.unwrap_or_else(|e| A::Error(e.message))),
        }
    }

    /// The series over the cluster (this node's alone on a single node).
    pub(super) async fn cluster_series(
        &self,
        r: v1::AnalyticsSeriesRequest,
    ) -> ServiceResult<v1::AnalyticsSeriesResponse> {
        let remote = self.ask_peers(peer_query::Kind::Series(r.clone()));
        let mine = self.series(&r.r#type, &r.dimension, r.duration_ms, r.resolution_ms);
        let (mine, (answers, missing_nodes)) = tokio::join!(mine, remote);
        let mine = mine?;
        let res = mine.resolution_ms;
        let first = mine.points.first().map_or(0, |p| p.0);
        let mut nodes = Vec::new();
        if self.peers.get().is_some() {
            nodes.push(node_series(
                self.node_id(),
                &mine.points,
                mine.total,
                r.by_node,
            ));
        }
        let mut sum = mine.points;
        for a in answers {
            let Some(peer_answer::Kind::Series(s)) = a.kind else {
                continue;
            };
            let points: Vec<(u64, u64)> = s.points.iter().map(|p| (p.start_ms, p.count)).collect();
            for (start, count) in &points {
                // Each node's grid is the same width; a node whose clock is a
                // little off lands in the bucket its start falls in.
                if *start >= first
                    && res > 0
                    && let Some(p) = sum.get_mut(((start - first) / res) as usize)
                {
                    p.1 += count;
                }
            }
            nodes.push(node_series(&a.node_id, &points, s.total, r.by_node));
        }
        let total = sum.iter().map(|p| p.1).sum();
        let mut out = series_wire(res, sum, total);
        out.nodes = nodes;
        out.missing_nodes = missing_nodes;
        Ok(out)
    }

    /// The top event types over the cluster.
    pub(super) async fn cluster_top(
        &self,
        window_ms: u64,
        limit: usize,
    ) -> ServiceResult<v1::AnalyticsTopResponse> {
        let remote = self.ask_peers(peer_query::Kind::Top(window_ms));
        let (mine, (answers, missing_nodes)) =
            tokio::join!(self.top(window_ms, usize::MAX), remote);
        let mine = mine?;
        let mut parts = Vec::new();
        if self.peers.get().is_some() {
            parts.push((self.node_id().to_owned(), mine.clone()));
        }
        let mut sum: HashMap<String, u64> = mine.into_iter().collect();
        for a in answers {
            let Some(peer_answer::Kind::Top(t)) = a.kind else {
                continue;
            };
            let types: Vec<(String, u64)> =
                t.types.into_iter().map(|c| (c.r#type, c.count)).collect();
            for (t, c) in &types {
                *sum.entry(t.clone()).or_default() += c;
            }
            parts.push((a.node_id, types));
        }
        let ranked = |v: Vec<(String, u64)>| type_counts(super::rank(v, limit));
        Ok(v1::AnalyticsTopResponse {
            types: ranked(sum.into_iter().collect()),
            nodes: parts
                .into_iter()
                .map(|(node_id, types)| v1::AnalyticsNodeTop {
                    node_id,
                    types: ranked(types),
                })
                .collect(),
            missing_nodes,
        })
    }

    /// Distinct users over the cluster: the nodes' sketches merged.
    pub(super) async fn cluster_users(
        &self,
        window_ms: u64,
    ) -> ServiceResult<v1::AnalyticsDistinctUsersResponse> {
        let remote = self.ask_peers(peer_query::Kind::Users(window_ms));
        let (mine, (answers, missing_nodes)) = tokio::join!(self.users_sketch(window_ms), remote);
        let (mut merged, covered) = mine?;
        let mut nodes = Vec::new();
        if self.peers.get().is_some() {
            nodes.push(v1::AnalyticsNodeEstimate {
                node_id: self.node_id().to_owned(),
                estimate: merged.estimate(),
            });
        }
        for a in answers {
            let Some(peer_answer::Kind::Users(bytes)) = a.kind else {
                continue;
            };
            let Some(sketch) = Hll::from_bytes(&bytes) else {
                continue;
            };
            merged.merge(&sketch);
            nodes.push(v1::AnalyticsNodeEstimate {
                node_id: a.node_id,
                estimate: sketch.estimate(),
            });
        }
        Ok(v1::AnalyticsDistinctUsersResponse {
            estimate: merged.estimate(),
            window_ms: covered,
            nodes,
            missing_nodes,
        })
    }

    /// The other nodes' answers (none on a single node). A node that answered
    /// with an error counts as missing.
    async fn ask_peers(&self, kind: peer_query::Kind) -> (Vec<PeerAnswer>, Vec<String>) {
        let Some(peers) = self.peers.get() else {
            return (Vec::new(), Vec::new());
        };
        let (answers, mut missing) = peers.ask(PeerQuery { kind: Some(kind) }).await;
        let mut ok = Vec::with_capacity(answers.len());
        for a in answers {
            match &a.kind {
                Some(peer_answer::Kind::Error(e)) => {
                    tracing::warn!(node = %a.node_id, error = %e, "a node could not answer an analytics query");
                    missing.push(a.node_id);
                }
                _ => ok.push(a),
            }
        }
        missing.sort();
        (ok, missing)
    }

    /// Relays the other nodes' metrics updates to the session until the session's
    /// subscription ends (in a cluster, with `all_nodes`); returns at once otherwise.
    pub(super) async fn relay_feed(
        &self,
        request: v1::MetricsSubscribeRequest,
        subscriber: Arc<dyn Subscriber>,
    ) {
        let Some(peers) = self.peers.get().filter(|_| request.all_nodes) else {
            return std::future::pending().await;
        };
        let mut updates = peers.feed(request);
        while let Some(update) = updates.recv().await {
            let push = Push {
                stream: String::new(),
                offset: 0,
                event: Some(push::Event::MetricsUpdate(update)),
            };
            if subscriber.push(StreamKind::Analytics, push).is_err() {
                return;
            }
        }
        std::future::pending().await
    }

    /// Runs (or renews) a metrics stream another node asked for: `send` gets each
    /// update until the request is withdrawn or not renewed within [`FEED_LEASE`].
    /// Past `max_metrics_subscribers` such streams, new ones are refused.
    pub fn serve_feed(
        self: &Arc<Self>,
        request: FeedRequest,
        send: impl Fn(v1::MetricsUpdate) + Send + 'static,
    ) {
        let now = self.clock.now_ms();
        let mut feeds = self.feeds.locked();
        // A stream notices its lease ran out only when it has an update to send:
        // end the expired ones here (every renewal of any stream comes here).
        feeds.retain(|_, f| {
            let live = !f.task.is_finished()
                && now <= f.lease_until.load(std::sync::atomic::Ordering::Acquire);
            if !live {
                f.task.abort();
            }
            live
        });
        let Some(subscribe) = request.subscribe else {
            if let Some(f) = feeds.remove(&request.id) {
                f.task.abort();
            }
            return;
        };
        let lease_until = now + FEED_LEASE.as_millis() as u64;
        if let Some(f) = feeds.get(&request.id) {
            f.lease_until
                .store(lease_until, std::sync::atomic::Ordering::Release);
            return;
        }
        if feeds.len() >= self.config.max_metrics_subscribers {
            tracing::warn!(origin = %request.origin, "too many remote metrics streams; refusing one");
            return;
        }
        let Ok((stream, _)) = super::stream::Stream::from_request(self.clone(), &subscribe) else {
            return;
        };
        let lease = Arc::new(std::sync::atomic::AtomicU64::new(lease_until));
        let held = lease.clone();
        let clock = self.clock.clone();
        let task = tokio::spawn(stream.run(move |update| {
            if clock.now_ms() > held.load(std::sync::atomic::Ordering::Acquire) {
                return false;
            }
            send(update);
            true
        }));
        feeds.insert(
            request.id,
            RemoteFeed {
                task,
                lease_until: lease,
            },
        );
    }

    /// Ends every remote metrics stream (the node is stopping).
    pub(super) fn end_feeds(&self) {
        for (_, f) in self.feeds.locked().drain() {
            f.task.abort();
        }
    }

    /// Starts the session's subscription task: its own node's stream and, with
    /// `all_nodes` in a cluster, the relay of the others'.
    pub(super) fn spawn_subscription(
        self: &Arc<Self>,
        ctx: &SessionCtx,
        stream: super::stream::Stream,
        request: v1::MetricsSubscribeRequest,
    ) -> tokio::task::AbortHandle {
        let subscriber = ctx.subscriber.clone();
        let svc = self.clone();
        let own = {
            let subscriber = subscriber.clone();
            stream.run(move |update| {
                let push = Push {
                    stream: String::new(),
                    offset: 0,
                    event: Some(push::Event::MetricsUpdate(update)),
                };
                subscriber.push(StreamKind::Analytics, push).is_ok()
            })
        };
        tokio::spawn(async move {
            tokio::select! {
                _ = own => {}
                _ = svc.relay_feed(request, subscriber) => {}
            }
        })
        .abort_handle()
    }
}

/// A metrics stream this node runs for another node's session.
#[derive(Debug)]
pub(super) struct RemoteFeed {
    task: tokio::task::JoinHandle<()>,
    /// Clock ms after which it stops unless renewed.
    lease_until: Arc<std::sync::atomic::AtomicU64>,
}

fn series_wire(
    resolution_ms: u64,
    points: Vec<(u64, u64)>,
    total: u64,
) -> v1::AnalyticsSeriesResponse {
    v1::AnalyticsSeriesResponse {
        resolution_ms,
        points: points
            .into_iter()
            .map(|(start_ms, count)| v1::AnalyticsPoint { start_ms, count })
            .collect(),
        total,
        ..Default::default()
    }
}

fn node_series(
    node: &str,
    points: &[(u64, u64)],
    total: u64,
    with_points: bool,
) -> v1::AnalyticsNodeSeries {
    v1::AnalyticsNodeSeries {
        node_id: node.to_owned(),
        total,
        points: if with_points {
            points
                .iter()
                .map(|(start_ms, count)| v1::AnalyticsPoint {
                    start_ms: *start_ms,
                    count: *count,
                })
                .collect()
        } else {
            Vec::new()
        },
    }
}

fn type_counts(types: Vec<(String, u64)>) -> Vec<v1::AnalyticsTypeCount> {
    types
        .into_iter()
        .map(|(r#type, count)| v1::AnalyticsTypeCount { r#type, count })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::services::fakes::Node;

    fn feed(id: &str) -> FeedRequest {
        FeedRequest {
            id: id.into(),
            origin: "n2".into(),
            subscribe: Some(v1::MetricsSubscribeRequest {
                metrics: vec!["connections".into()],
                interval_ms: 100,
                ..Default::default()
            }),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn remote_streams_end_when_withdrawn_or_not_renewed() {
        let node = Node::new();
        let (svc, _work) = AnalyticsService::open(node.deps.clone(), Default::default()).unwrap();
        let live = || svc.feeds.lock().unwrap().len();
        svc.serve_feed(feed("a"), |_| {});
        svc.serve_feed(feed("b"), |_| {});
        assert_eq!(live(), 2);
        // Withdrawn: ends at once.
        svc.serve_feed(
            FeedRequest {
                subscribe: None,
                ..feed("b")
            },
            |_| {},
        );
        assert_eq!(live(), 1);
        // Renewed within the lease: kept.
        node.clock.advance(FEED_LEASE.as_millis() as u64 - 1_000);
        svc.serve_feed(feed("a"), |_| {});
        assert_eq!(live(), 1);
        // Not renewed for longer than the lease (and with nothing to send, so it
        // never checked itself): the next request of any stream ends it.
        node.clock.advance(FEED_LEASE.as_millis() as u64 + 1);
        svc.serve_feed(feed("c"), |_| {});
        assert_eq!(live(), 1, "only c");
        assert!(svc.feeds.lock().unwrap().contains_key("c"));
    }
}
