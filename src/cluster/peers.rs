//! Analytics queries and metrics streams between the nodes of a cluster, over core
//! NATS request/reply (see `crate::services::analytics::peers` for what is asked
//! and how answers are summed).
//!
//! - `<prefix>.analytics.query`: every node subscribes; a query goes to all of them
//!   at once with a fresh inbox as its reply subject, and the asking node collects
//!   answers until every live node other than itself answered or the timeout.
//! - `<prefix>.analytics.feed`: a metrics subscription with `all_nodes`, renewed
//!   every third of its lease (so nodes that join later start streaming at the next
//!   renewal) and withdrawn when the session's subscription ends; each node
//!   publishes its updates to the subscription's inbox.

use std::collections::HashSet;
use std::sync::{Arc, Weak};

use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use prost::Message;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::Cluster;
use crate::protocol::v1;
use crate::services::analytics::AnalyticsService;
use crate::services::analytics::peers::{
    FEED_LEASE, FeedRequest, PeerAnswer, PeerQuery, Peers, QUERY_TIMEOUT,
};

const ORIGIN: &str = "Tutti-Origin";
/// Updates from other nodes a relay holds for its session at most.
const FEED_BUFFER: usize = 256;

/// [`Peers`] over NATS. Cloning is cheap (the NATS client is shared).
#[derive(Debug, Clone)]
pub struct NatsPeers {
    client: async_nats::Client,
    prefix: String,
    node: String,
    cluster: Weak<Cluster>,
}

impl NatsPeers {
    /// This node's peers; the live nodes come from `cluster`'s node list.
    pub fn new(
        client: async_nats::Client,
        prefix: &str,
        node: &str,
        cluster: Weak<Cluster>,
    ) -> Self {
        Self {
            client,
            prefix: prefix.to_owned(),
            node: node.to_owned(),
            cluster,
        }
    }

    fn subject(&self, what: &str) -> String {
        format!("{}.analytics.{what}", self.prefix)
    }

    fn headers(&self) -> async_nats::HeaderMap {
        let mut h = async_nats::HeaderMap::new();
        h.insert(ORIGIN, self.node.as_str());
        h
    }

    /// Answers the other nodes' queries and runs their metrics streams until `stop`.
    pub async fn serve(self: Arc<Self>, analytics: Arc<AnalyticsService>, stop: CancellationToken) {
        let subscribed = tokio::try_join!(
            self.client.subscribe(self.subject("query")),
            self.client.subscribe(self.subject("feed")),
        );
        let (mut queries, mut feeds) = match subscribed {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "subscribing to the cluster's analytics queries");
                return;
            }
        };
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                Some(msg) = queries.next() => {
                    let (Some(reply), false) = (msg.reply.clone(), self.is_mine(&msg)) else {
                        continue;
                    };
                    let Ok(query) = PeerQuery::decode(msg.payload.as_ref()) else {
                        continue;
                    };
                    let (analytics, client) = (analytics.clone(), self.client.clone());
                    tokio::spawn(async move {
                        let answer = analytics.answer_peer(query).await;
                        let _ = client.publish(reply, answer.encode_to_vec().into()).await;
                    });
                }
                Some(msg) = feeds.next() => {
                    let (Some(reply), false) = (msg.reply.clone(), self.is_mine(&msg)) else {
                        continue;
                    };
                    let Ok(request) = FeedRequest::decode(msg.payload.as_ref()) else {
                        continue;
                    };
                    let client = self.client.clone();
                    analytics.serve_feed(request, move |update| {
                        let (client, reply) = (client.clone(), reply.clone());
                        tokio::spawn(async move {
                            let _ = client.publish(reply, update.encode_to_vec().into()).await;
                        });
                    });
                }
                else => return,
            }
        }
    }

    fn is_mine(&self, msg: &async_nats::Message) -> bool {
        msg.headers
            .as_ref()
            .and_then(|h| h.get(ORIGIN))
            .is_some_and(|v| v.as_str() == self.node)
    }

    async fn gather(&self, query: PeerQuery) -> (Vec<PeerAnswer>, Vec<String>) {
        let mut waiting: HashSet<String> = self
            .cluster
            .upgrade()
            .map(|c| c.nodes())
            .unwrap_or_default()
            .into_iter()
            .map(|n| n.id)
            .filter(|id| *id != self.node)
            .collect();
        if waiting.is_empty() {
            return (Vec::new(), Vec::new());
        }
        let inbox = self.client.new_inbox();
        let mut answers_sub = match self.client.subscribe(inbox.clone()).await {
            Ok(s) => s,
            Err(_) => return (Vec::new(), waiting.into_iter().collect()),
        };
        let sent = self
            .client
            .publish_with_reply_and_headers(
                self.subject("query"),
                inbox,
                self.headers(),
                query.encode_to_vec().into(),
            )
            .await;
        let mut answers = Vec::new();
        if sent.is_ok() {
            let _ = tokio::time::timeout(QUERY_TIMEOUT, async {
                while let Some(msg) = answers_sub.next().await {
                    if let Ok(a) = PeerAnswer::decode(msg.payload.as_ref()) {
                        waiting.remove(&a.node_id);
                        answers.push(a);
                        if waiting.is_empty() {
                            return;
                        }
                    }
                }
            })
            .await;
        }
        (answers, waiting.into_iter().collect())
    }

    async fn relay(
        self,
        request: v1::MetricsSubscribeRequest,
        tx: mpsc::Sender<v1::MetricsUpdate>,
    ) {
        let id = crate::util::random_hex(16);
        let inbox = self.client.new_inbox();
        let Ok(mut updates) = self.client.subscribe(inbox.clone()).await else {
            return;
        };
        let publish = |subscribe: Option<v1::MetricsSubscribeRequest>| {
            let req = FeedRequest {
                id: id.clone(),
                origin: self.node.clone(),
                subscribe,
            };
            self.client.publish_with_reply_and_headers(
                self.subject("feed"),
                inbox.clone(),
                self.headers(),
                req.encode_to_vec().into(),
            )
        };
        let mut renew = tokio::time::interval(FEED_LEASE / 3);
        renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tx.closed() => break,
                _ = renew.tick() => {
                    let _ = publish(Some(request.clone())).await;
                }
                Some(msg) = updates.next() => {
                    if let Ok(update) = v1::MetricsUpdate::decode(msg.payload.as_ref()) {
                        // A session that does not keep up loses updates (their
                        // sequence numbers show it), never memory.
                        let _ = tx.try_send(update);
                    }
                }
            }
        }
        let _ = publish(None).await;
    }
}

impl Peers for NatsPeers {
    fn node_id(&self) -> &str {
        &self.node
    }

    fn ask(&self, query: PeerQuery) -> BoxFuture<'_, (Vec<PeerAnswer>, Vec<String>)> {
        Box::pin(self.gather(query))
    }

    fn feed(&self, request: v1::MetricsSubscribeRequest) -> mpsc::Receiver<v1::MetricsUpdate> {
        let (tx, rx) = mpsc::channel(FEED_BUFFER);
        tokio::spawn(self.clone().relay(request, tx));
        rx
    }
}
