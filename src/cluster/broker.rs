//! Datagrams (typing indicators, cursors) between the nodes of a cluster, over
//! core NATS: at most once, like the datagrams themselves. Writes never travel
//! this way: every node applies them from the log and delivers them to its own
//! sessions.
//!
//! A node subscribes to a topic's subject when the hub gets its first local
//! subscriber of the topic and unsubscribes after the last, so it receives only
//! what its sessions need.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock, Weak};

use bytes::Bytes;
use futures_util::StreamExt;

use crate::hub::{Broker, Hub};
use crate::protocol::v1::StreamKind;
use crate::util::Unpoisoned;

const ORIGIN: &str = "Tutti-Origin";
const EXCEPT: &str = "Tutti-Except";

/// The NATS subject of a hub topic. Topics hold ids with any URL-safe character,
/// which NATS subjects do not all allow, so the topic is hex-encoded.
fn subject(prefix: &str, topic: &str) -> String {
    format!("{prefix}.dg.{}", crate::util::hex(topic.as_bytes()))
}

/// Datagrams waiting for the publishing task at most; past this they are dropped,
/// as the network would.
const OUTBOX: usize = 4096;

/// A [`Broker`] over core NATS.
#[derive(Debug)]
pub struct NatsBroker {
    client: async_nats::Client,
    prefix: String,
    node: String,
    hub: OnceLock<Weak<Hub>>,
    subscriptions: Mutex<HashMap<String, tokio::task::JoinHandle<()>>>,
    /// To the one task that publishes this node's datagrams: (subject, except, data).
    outbox: tokio::sync::mpsc::Sender<(String, String, Bytes)>,
}

impl NatsBroker {
    /// A broker of node `node` on `client`, with subjects under `prefix`. Call
    /// inside a Tokio runtime: it starts the task that publishes datagrams.
    pub fn new(client: async_nats::Client, prefix: &str, node: &str) -> Self {
        let (outbox, mut rx) = tokio::sync::mpsc::channel::<(String, String, Bytes)>(OUTBOX);
        let (publisher, origin) = (client.clone(), node.to_owned());
        tokio::spawn(async move {
            while let Some((subject, except, data)) = rx.recv().await {
                let mut headers = async_nats::HeaderMap::new();
                headers.insert(ORIGIN, origin.as_str());
                headers.insert(EXCEPT, except.as_str());
                let _ = publisher.publish_with_headers(subject, headers, data).await;
            }
        });
        Self {
            client,
            prefix: prefix.to_owned(),
            node: node.to_owned(),
            hub: OnceLock::new(),
            subscriptions: Mutex::new(HashMap::new()),
            outbox,
        }
    }

    /// The hub datagrams from other nodes are delivered to.
    pub fn attach(&self, hub: Weak<Hub>) {
        let _ = self.hub.set(hub);
    }
}

impl Broker for NatsBroker {
    fn subscribe(&self, topic: &str) {
        let Some(hub) = self.hub.get().cloned() else {
            return;
        };
        let (client, node, topic_owned) =
            (self.client.clone(), self.node.clone(), topic.to_owned());
        let subject = subject(&self.prefix, topic);
        let task = tokio::spawn(async move {
            let mut sub = match client.subscribe(subject).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, topic = %topic_owned, "subscribing to datagrams");
                    return;
                }
            };
            while let Some(msg) = sub.next().await {
                let header = |name: &str| {
                    msg.headers
                        .as_ref()
                        .and_then(|h| h.get(name))
                        .map(|v| v.as_str().to_owned())
                        .unwrap_or_default()
                };
                if header(ORIGIN) == node {
                    continue;
                }
                let Some(hub) = hub.upgrade() else { return };
                hub.deliver_datagram(&topic_owned, &header(EXCEPT), &msg.payload);
            }
        });
        let mut subs = self.subscriptions.locked();
        if let Some(old) = subs.insert(topic.to_owned(), task) {
            old.abort();
        }
    }

    fn unsubscribe(&self, topic: &str) {
        let mut subs = self.subscriptions.locked();
        if let Some(task) = subs.remove(topic) {
            // Dropping the NATS subscription unsubscribes.
            task.abort();
        }
    }

    fn publish(&self, _topic: &str, _kind: StreamKind, _frame: &Bytes) {
        // Writes reach the other nodes through the log, not through the broker.
    }

    fn datagram(&self, topic: &str, except: &str, data: &Bytes) {
        // Never waits: a datagram that cannot go now is dropped, as on the wire.
        let _ = self.outbox.try_send((
            subject(&self.prefix, topic),
            except.to_owned(),
            data.clone(),
        ));
    }

    fn carries(&self) -> bool {
        false
    }
}
