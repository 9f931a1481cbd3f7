//! Fakes for service unit tests: the node's dependencies on a temporary database,
//! and sessions that record what they are sent. No sockets; tests run on tokio's
//! paused clock.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::{Bytes, BytesMut};
use futures_util::future::BoxFuture;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{ServiceDeps, SessionCtx};
use crate::clock::Clock;
use crate::hub::{Hub, SlowConsumer, Subscriber};
use crate::metrics::Metrics;
use crate::protocol::v1::{Push, StreamKind};
use crate::store::{Store, Writer};

/// Service dependencies on a temporary database, with a manual clock.
pub(crate) struct Node {
    pub(crate) deps: ServiceDeps,
    pub(crate) clock: Clock,
    _dir: tempfile::TempDir,
}

impl Node {
    pub(crate) fn new() -> Self {
        Self::new_in(&std::env::temp_dir())
    }

    /// A node whose database lives in a new folder under `parent` (a RAM disk
    /// makes commits, which sync, much faster).
    pub(crate) fn new_in(parent: &std::path::Path) -> Self {
        let dir = tempfile::tempdir_in(parent).unwrap();
        let store = Store::open(dir.path()).unwrap();
        let metrics = Arc::new(Metrics::default());
        let observed = metrics.clone();
        let (writer, _thread) = Writer::spawn(
            store.db().clone(),
            Some(Arc::new(move |writes, took| {
                observed.committed(writes, took)
            })),
        );
        let clock = Clock::manual(1_800_000_000_000);
        Self {
            deps: ServiceDeps {
                store,
                writer,
                hub: Arc::new(Hub::default()),
                metrics,
                rates: Arc::new(super::rate::RateLimits::new(
                    &Default::default(),
                    clock.clone(),
                )),
                clock: clock.clone(),
                shutdown: CancellationToken::new(),
            },
            clock,
            _dir: dir,
        }
    }
}

impl Node {
    /// Polls `work` until a write it made is queued at the (held) writer.
    pub(crate) async fn until_committing<F: std::future::Future + Unpin>(&self, work: &mut F) {
        use futures_util::FutureExt;
        while self.deps.writer.in_flight() == 0 {
            assert!((&mut *work).now_or_never().is_none(), "held");
            tokio::task::yield_now().await;
        }
    }
}

/// A session whose pushes go to a bounded queue, as the gateway's do: `push` never
/// waits (a full queue marks it slow), `push_wait` waits for room.
#[derive(Debug)]
pub(crate) struct FakeSession {
    session: String,
    user: String,
    queue: mpsc::Sender<(StreamKind, Push)>,
    slow: AtomicBool,
}

impl FakeSession {
    /// A session of `user` with a queue of `capacity` pushes, and the queue's
    /// receiving end.
    pub(crate) fn new(
        user: &str,
        session: &str,
        capacity: usize,
    ) -> (Arc<Self>, mpsc::Receiver<(StreamKind, Push)>) {
        let (queue, rx) = mpsc::channel(capacity);
        let s = Arc::new(Self {
            session: session.into(),
            user: user.into(),
            queue,
            slow: AtomicBool::new(false),
        });
        (s, rx)
    }

    /// Free places in the queue.
    pub(crate) fn room(&self) -> usize {
        self.queue.capacity()
    }

    /// Whether a push found the queue full.
    pub(crate) fn was_slow(&self) -> bool {
        self.slow.load(Ordering::Acquire)
    }

    /// The session as a request context.
    pub(crate) fn ctx(self: &Arc<Self>) -> SessionCtx {
        SessionCtx {
            subscriber: self.clone(),
            roles: Arc::from(Vec::<String>::new()),
        }
    }
}

impl Subscriber for FakeSession {
    fn session_id(&self) -> &str {
        &self.session
    }

    fn user_id(&self) -> &str {
        &self.user
    }

    fn push(&self, kind: StreamKind, push: Push) -> Result<(), SlowConsumer> {
        self.queue.try_send((kind, push)).map_err(|_| {
            self.slow.store(true, Ordering::Release);
            SlowConsumer
        })
    }

    fn push_frame(&self, kind: StreamKind, frame: Bytes) -> Result<(), SlowConsumer> {
        let mut frame = BytesMut::from(&frame[..]);
        let push = crate::protocol::decode_frame(&mut frame, usize::MAX)
            .expect("a push frame")
            .expect("a whole frame");
        self.push(kind, push)
    }

    fn push_wait(&self, kind: StreamKind, push: Push) -> BoxFuture<'_, Result<(), SlowConsumer>> {
        Box::pin(async move {
            self.queue
                .send((kind, push))
                .await
                .map_err(|_| SlowConsumer)
        })
    }

    fn datagram(&self, _: Bytes) {}
}
