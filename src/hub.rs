//! Fan-out: topics (`doc/<id>`, `room/<id>`, `user/<id>`) to the sessions
//! subscribed to them. Services publish protocol events; the gateway implements
//! [`Subscriber`] for each session, so services never see a transport type.
//!
//! The hub delivers to this node's sessions; a [`Broker`] carries publications to
//! the other nodes of a cluster (in the manner of centrifuge's broker interface).
//! The hub tells its broker when a topic gets its first local subscriber and loses
//! its last one, so a node receives only the topics its sessions need; the broker
//! hands what other nodes publish to [`Hub::deliver`]. On one node the broker is
//! [`LocalBroker`], which carries nothing.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use futures_util::future::BoxFuture;

use crate::protocol::v1::{Push, StreamKind};
use crate::util::UnpoisonedRw;

/// The client does not read its pushes fast enough: its queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("push queue full")]
pub struct SlowConsumer;

/// One session, as services see it.
pub trait Subscriber: Send + Sync + std::fmt::Debug {
    /// The session's id (unique on this node).
    fn session_id(&self) -> &str;
    /// The authenticated user.
    fn user_id(&self) -> &str;
    /// Queues a push on the stream of `kind`. Never waits; a full queue marks the
    /// session as a slow consumer, which the gateway then disconnects.
    fn push(&self, kind: StreamKind, push: Push) -> Result<(), SlowConsumer>;
    /// Queues a push already encoded as a length-prefixed frame (as the hub does
    /// once per publication, so fan-out shares one encoding). Never waits, like
    /// [`push`](Self::push).
    fn push_frame(&self, kind: StreamKind, frame: Bytes) -> Result<(), SlowConsumer>;
    /// Queues a push, waiting (a bounded time) for room: for bulk sends such as
    /// a catch-up after a reconnect.
    fn push_wait(&self, kind: StreamKind, push: Push) -> BoxFuture<'_, Result<(), SlowConsumer>>;
    /// Sends a datagram (may be lost).
    fn datagram(&self, data: Bytes);
    /// A session of another node of the cluster, seen while applying its node's
    /// writes: the hub never subscribes it (its own node delivers to it).
    fn is_remote(&self) -> bool {
        false
    }
}

/// Carries publications between the nodes of a cluster. Calls never wait: an
/// implementation queues what it sends and reports failures through its own
/// channels (metrics, readiness), never to the publishing request.
pub trait Broker: Send + Sync + std::fmt::Debug + 'static {
    /// This node has its first local subscriber of `topic`: start receiving it.
    fn subscribe(&self, topic: &str);
    /// This node's last local subscriber of `topic` left: stop receiving it.
    fn unsubscribe(&self, topic: &str);
    /// Carries a publication, already delivered to this node's sessions, to the
    /// other nodes. `frame` is the push encoded once as a length-prefixed frame.
    fn publish(&self, topic: &str, kind: StreamKind, frame: &Bytes);
    /// Carries a datagram, already sent to this node's sessions but `except`, to the
    /// other nodes.
    fn datagram(&self, topic: &str, except: &str, data: &Bytes);
    /// Whether publications go anywhere (false for a single node, which lets the
    /// hub skip encoding a push that no local session wants).
    fn carries(&self) -> bool {
        true
    }
}

/// The broker of a single node: there is nobody else to carry anything to.
#[derive(Debug, Default, Clone, Copy)]
pub struct LocalBroker;

impl Broker for LocalBroker {
    fn subscribe(&self, _topic: &str) {}
    fn unsubscribe(&self, _topic: &str) {}
    fn publish(&self, _topic: &str, _kind: StreamKind, _frame: &Bytes) {}
    fn datagram(&self, _topic: &str, _except: &str, _data: &Bytes) {}
    fn carries(&self) -> bool {
        false
    }
}

type Subscribers = HashMap<String, Arc<dyn Subscriber>>;

/// Topic → subscribed sessions, and the broker to the other nodes.
#[derive(Debug)]
pub struct Hub {
    topics: RwLock<HashMap<String, Subscribers>>,
    broker: Arc<dyn Broker>,
}

impl Default for Hub {
    fn default() -> Self {
        Self::new(Arc::new(LocalBroker))
    }
}

impl Hub {
    /// A hub whose publications `broker` carries to other nodes.
    pub fn new(broker: Arc<dyn Broker>) -> Self {
        Self {
            topics: RwLock::new(HashMap::new()),
            broker,
        }
    }

    /// Adds `sub` to `topic` (idempotent).
    pub fn subscribe(&self, topic: &str, sub: Arc<dyn Subscriber>) {
        if sub.is_remote() {
            return;
        }
        let mut topics = self.topics.writing();
        let first = !topics.contains_key(topic);
        topics
            .entry(topic.to_owned())
            .or_default()
            .insert(sub.session_id().to_owned(), sub);
        if first {
            // Under the lock, so subscribe and unsubscribe reach the broker in order.
            self.broker.subscribe(topic);
        }
    }

    /// Removes a session from `topic`.
    pub fn unsubscribe(&self, topic: &str, session_id: &str) {
        let mut topics = self.topics.writing();
        if let Some(subs) = topics.get_mut(topic) {
            subs.remove(session_id);
            if subs.is_empty() {
                topics.remove(topic);
                self.broker.unsubscribe(topic);
            }
        }
    }

    /// The sessions subscribed to `topic`.
    pub fn subscribers(&self, topic: &str) -> Vec<Arc<dyn Subscriber>> {
        let topics = self.topics.reading();
        topics
            .get(topic)
            .map(|s| s.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Pushes `push` to every session of `topic`, here and (through the broker) on
    /// the other nodes. Returns how many local sessions were reached. The push is
    /// encoded once and the frame shared by every subscriber.
    pub fn publish(&self, topic: &str, kind: StreamKind, push: &Push) -> usize {
        let subs = self.subscribers(topic);
        if subs.is_empty() && !self.broker.carries() {
            return 0;
        }
        let frame = crate::protocol::encoded_frame(push);
        let reached = push_to(&subs, kind, &frame);
        self.broker.publish(topic, kind, &frame);
        reached
    }

    /// Pushes an encoded frame to this node's sessions of `topic` only: what the
    /// broker calls with another node's publication. Returns how many were reached.
    pub fn deliver(&self, topic: &str, kind: StreamKind, frame: &Bytes) -> usize {
        push_to(&self.subscribers(topic), kind, frame)
    }

    /// Sends a datagram to every session of `topic` but `except`, here and on the
    /// other nodes.
    pub fn datagram(&self, topic: &str, except: &str, data: &Bytes) {
        self.deliver_datagram(topic, except, data);
        self.broker.datagram(topic, except, data);
    }

    /// Sends a datagram to this node's sessions of `topic` but `except` only (what
    /// the broker calls with another node's datagram).
    pub fn deliver_datagram(&self, topic: &str, except: &str, data: &Bytes) {
        for s in self.subscribers(topic) {
            if s.session_id() != except {
                s.datagram(data.clone());
            }
        }
    }
}

/// Queues one shared frame on each of `subs`; returns how many took it.
fn push_to(subs: &[Arc<dyn Subscriber>], kind: StreamKind, frame: &Bytes) -> usize {
    subs.iter()
        .filter(|s| s.push_frame(kind, frame.clone()).is_ok())
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Debug, Default)]
    struct Rec {
        id: String,
        got: Mutex<Vec<Push>>,
        dgrams: Mutex<usize>,
    }

    impl Subscriber for Rec {
        fn session_id(&self) -> &str {
            &self.id
        }
        fn user_id(&self) -> &str {
            "u"
        }
        fn push(&self, _: StreamKind, push: Push) -> Result<(), SlowConsumer> {
            self.got.lock().unwrap().push(push);
            Ok(())
        }
        fn push_frame(&self, kind: StreamKind, frame: Bytes) -> Result<(), SlowConsumer> {
            let mut frame = bytes::BytesMut::from(&frame[..]);
            let push = crate::protocol::decode_frame(&mut frame, usize::MAX)
                .unwrap()
                .unwrap();
            self.push(kind, push)
        }
        fn push_wait(
            &self,
            kind: StreamKind,
            push: Push,
        ) -> BoxFuture<'_, Result<(), SlowConsumer>> {
            Box::pin(std::future::ready(self.push(kind, push)))
        }
        fn datagram(&self, _: Bytes) {
            *self.dgrams.lock().unwrap() += 1;
        }
    }

    #[test]
    fn publish_reaches_subscribers_only() {
        let hub = Hub::default();
        let a = Arc::new(Rec {
            id: "a".into(),
            ..Default::default()
        });
        let b = Arc::new(Rec {
            id: "b".into(),
            ..Default::default()
        });
        hub.subscribe("t", a.clone());
        hub.subscribe("t", b.clone());
        hub.subscribe("other", b.clone());
        assert_eq!(hub.publish("t", StreamKind::System, &Push::default()), 2);
        hub.unsubscribe("t", "a");
        assert_eq!(hub.publish("t", StreamKind::System, &Push::default()), 1);
        hub.datagram("t", "b", &Bytes::new());
        assert_eq!(a.got.lock().unwrap().len(), 1);
        assert_eq!(b.got.lock().unwrap().len(), 2);
        assert_eq!(*b.dgrams.lock().unwrap(), 0, "the sender is skipped");
        hub.unsubscribe("t", "b");
        assert!(hub.subscribers("t").is_empty());
    }

    /// What a broker was asked to do.
    #[derive(Debug, Default)]
    struct Calls(Mutex<Vec<String>>);

    impl Broker for Calls {
        fn subscribe(&self, topic: &str) {
            self.0.lock().unwrap().push(format!("sub {topic}"));
        }
        fn unsubscribe(&self, topic: &str) {
            self.0.lock().unwrap().push(format!("unsub {topic}"));
        }
        fn publish(&self, topic: &str, _: StreamKind, _: &Bytes) {
            self.0.lock().unwrap().push(format!("pub {topic}"));
        }
        fn datagram(&self, topic: &str, except: &str, _: &Bytes) {
            self.0
                .lock()
                .unwrap()
                .push(format!("dgram {topic} {except}"));
        }
    }

    #[test]
    fn the_broker_hears_first_and_last_subscribers_and_every_publication() {
        let calls = Arc::new(Calls::default());
        let hub = Hub::new(calls.clone());
        let a = Arc::new(Rec {
            id: "a".into(),
            ..Default::default()
        });
        let b = Arc::new(Rec {
            id: "b".into(),
            ..Default::default()
        });
        hub.subscribe("t", a.clone());
        hub.subscribe("t", b.clone());
        hub.publish("t", StreamKind::System, &Push::default());
        hub.publish("nobody", StreamKind::System, &Push::default());
        hub.datagram("t", "a", &Bytes::new());
        // Another node's publication reaches local sessions and goes nowhere else.
        let frame = crate::protocol::encoded_frame(&Push::default());
        assert_eq!(hub.deliver("t", StreamKind::System, &frame), 2);
        hub.unsubscribe("t", "a");
        hub.unsubscribe("t", "b");
        assert_eq!(
            *calls.0.lock().unwrap(),
            ["sub t", "pub t", "pub nobody", "dgram t a", "unsub t"]
        );
        assert_eq!(a.got.lock().unwrap().len(), 2);
        assert_eq!(*b.dgrams.lock().unwrap(), 1);
    }
}
