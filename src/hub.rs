//! Local fan-out: topics ("doc/<id>", "room/<id>", "user/<id>") to the sessions
//! subscribed to them. Services publish protocol events; the gateway implements
//! [`Subscriber`] for each session, so services never see a transport type.
//!
//! A cluster puts a broker (NATS) behind the same publish/subscribe calls; on one
//! node the hub is the whole fan-out.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use futures_util::future::BoxFuture;

use crate::protocol::v1::{Push, StreamKind};

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
}

type Subscribers = HashMap<String, Arc<dyn Subscriber>>;

/// Topic → subscribed sessions.
#[derive(Debug, Default)]
pub struct Hub {
    topics: RwLock<HashMap<String, Subscribers>>,
}

impl Hub {
    /// Adds `sub` to `topic` (idempotent).
    pub fn subscribe(&self, topic: &str, sub: Arc<dyn Subscriber>) {
        let mut topics = self.topics.write().unwrap_or_else(|e| e.into_inner());
        topics
            .entry(topic.to_owned())
            .or_default()
            .insert(sub.session_id().to_owned(), sub);
    }

    /// Removes a session from `topic`.
    pub fn unsubscribe(&self, topic: &str, session_id: &str) {
        let mut topics = self.topics.write().unwrap_or_else(|e| e.into_inner());
        if let Some(subs) = topics.get_mut(topic) {
            subs.remove(session_id);
            if subs.is_empty() {
                topics.remove(topic);
            }
        }
    }

    /// The sessions subscribed to `topic`.
    pub fn subscribers(&self, topic: &str) -> Vec<Arc<dyn Subscriber>> {
        let topics = self.topics.read().unwrap_or_else(|e| e.into_inner());
        topics
            .get(topic)
            .map(|s| s.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Pushes `push` to every session of `topic`. Returns how many were reached.
    /// The push is encoded once and the frame shared by every subscriber.
    pub fn publish(&self, topic: &str, kind: StreamKind, push: &Push) -> usize {
        let subs = self.subscribers(topic);
        if subs.is_empty() {
            return 0;
        }
        let frame = crate::protocol::encoded_frame(push);
        subs.iter()
            .filter(|s| s.push_frame(kind, frame.clone()).is_ok())
            .count()
    }

    /// Sends a datagram to every session of `topic` but `except`.
    pub fn datagram(&self, topic: &str, except: &str, data: &Bytes) {
        for s in self.subscribers(topic) {
            if s.session_id() != except {
                s.datagram(data.clone());
            }
        }
    }
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
}
