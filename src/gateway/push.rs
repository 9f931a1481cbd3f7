//! Bounded push queues: one unidirectional stream per kind, opened on first use, each
//! written by its own task so that a stalled kind never blocks another.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::limits::ByteBudget;
use crate::metrics::Metrics;
use crate::protocol::v1::{Push, PushStreamHeader, StreamKind};
use crate::protocol::{encode_frame, encoded_frame};
use crate::transport::Session;

pub use crate::hub::SlowConsumer;

/// A push, already encoded as a frame, and when it was queued (for the fan-out
/// latency). Encoded once per publication and shared by every subscriber's queue.
type Queued = (Bytes, Instant);

/// The queue of one kind and the task that writes it.
type KindQueue = (mpsc::Sender<Queued>, JoinHandle<()>);

/// A session's push queues.
#[derive(Debug)]
pub struct PushQueues {
    session: Session,
    capacity: usize,
    /// Bytes queued on all kinds together.
    bytes: Arc<ByteBudget>,
    /// Indexed by `StreamKind` (a handful of small values); `None` once aborted.
    kinds: Mutex<Option<Vec<Option<KindQueue>>>>,
    slow: CancellationToken,
    metrics: Arc<Metrics>,
}

impl PushQueues {
    /// Queues of `capacity` frames per kind and `bytes` bytes over all kinds for
    /// `session`.
    pub fn new(session: Session, capacity: usize, bytes: usize, metrics: Arc<Metrics>) -> Self {
        Self {
            session,
            capacity,
            bytes: Arc::new(ByteBudget::new(bytes)),
            kinds: Mutex::new(Some(Vec::new())),
            slow: CancellationToken::new(),
            metrics,
        }
    }

    /// Queues `push` on the stream of `kind`. Never waits: when the queue is full the
    /// session is marked slow (see [`slow`](Self::slow)) and the push is refused.
    pub fn push(&self, kind: StreamKind, push: Push) -> Result<(), SlowConsumer> {
        self.push_frame(kind, encoded_frame(&push))
    }

    /// Queues a push already encoded with [`encoded_frame`], as [`push`](Self::push) does.
    pub fn push_frame(&self, kind: StreamKind, frame: Bytes) -> Result<(), SlowConsumer> {
        let len = frame.len();
        if !self.bytes.try_take(len) {
            self.slow.cancel();
            return Err(SlowConsumer);
        }
        // `try_send` never waits, so it runs under the lock: no sender clone (two
        // atomic operations) per push on the fan-out path.
        match self.with_sender(kind, |tx| tx.try_send((frame, Instant::now())).is_ok()) {
            Some(true) => Ok(()),
            Some(false) => {
                self.bytes.release(len);
                self.slow.cancel();
                Err(SlowConsumer)
            }
            // The session has ended: nothing to deliver to.
            None => {
                self.bytes.release(len);
                Err(SlowConsumer)
            }
        }
    }

    /// Bytes queued now, all kinds together.
    pub fn queued_bytes(&self) -> usize {
        self.bytes.used()
    }

    /// Queues `push`, waiting up to `patience` for room in the queue (for bulk
    /// sends such as a catch-up after a reconnect). A queue still full then marks
    /// the session slow.
    pub async fn push_wait(
        &self,
        kind: StreamKind,
        push: Push,
        patience: std::time::Duration,
    ) -> Result<(), SlowConsumer> {
        let Some(tx) = self.sender(kind) else {
            return Err(SlowConsumer);
        };
        let frame = encoded_frame(&push);
        let len = frame.len();
        if !self.bytes.take(len, patience).await {
            self.slow.cancel();
            return Err(SlowConsumer);
        }
        match tokio::time::timeout(patience, tx.send((frame, Instant::now()))).await {
            Ok(Ok(())) => Ok(()),
            _ => {
                self.bytes.release(len);
                self.slow.cancel();
                Err(SlowConsumer)
            }
        }
    }

    fn sender(&self, kind: StreamKind) -> Option<mpsc::Sender<Queued>> {
        self.with_sender(kind, |tx| tx.clone())
    }

    /// Runs `f` with the queue of `kind`, opening it (and its writer) on first use.
    /// `None` once the queues are aborted.
    fn with_sender<T>(
        &self,
        kind: StreamKind,
        f: impl FnOnce(&mpsc::Sender<Queued>) -> T,
    ) -> Option<T> {
        let mut kinds = self.kinds.lock().unwrap_or_else(|e| e.into_inner());
        let kinds = kinds.as_mut()?;
        let i = kind as usize;
        if kinds.len() <= i {
            kinds.resize_with(i + 1, || None);
        }
        let (tx, _) = kinds[i].get_or_insert_with(|| {
            let (tx, rx) = mpsc::channel(self.capacity);
            let task = tokio::spawn(write_pushes(
                self.session.clone(),
                kind,
                rx,
                self.bytes.clone(),
                self.metrics.clone(),
            ));
            (tx, task)
        });
        Some(f(tx))
    }

    /// Completes when a queue overflowed.
    pub async fn slow(&self) {
        self.slow.cancelled().await
    }

    /// Stops every writer; later pushes are refused.
    pub fn abort(&self) {
        let kinds = self
            .kinds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .unwrap_or_default();
        for (_, task) in kinds.iter().flatten() {
            task.abort();
        }
    }
}

async fn write_pushes(
    session: Session,
    kind: StreamKind,
    mut rx: mpsc::Receiver<Queued>,
    bytes: Arc<ByteBudget>,
    metrics: Arc<Metrics>,
) {
    let Ok(mut stream) = session.open_uni().await else {
        return;
    };
    metrics
        .streams_opened
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut buf = BytesMut::new();
    encode_frame(&PushStreamHeader { kind: kind as i32 }, &mut buf);
    // The header is in the first write but was never taken from the budget.
    let mut header = buf.len();
    let mut queued_at = Vec::new();
    while let Some((first, at)) = rx.recv().await {
        buf.extend_from_slice(&first);
        queued_at.push(at);
        // Coalesce what queued up meanwhile into one write.
        while buf.len() < 64 * 1024 {
            match rx.try_recv() {
                Ok((p, at)) => {
                    buf.extend_from_slice(&p);
                    queued_at.push(at);
                }
                Err(_) => break,
            }
        }
        let written = buf.len() - header;
        header = 0;
        if stream.write_all(&buf).await.is_err() {
            return;
        }
        // Written to QUIC: bounded from here by the connection's send window.
        bytes.release(written);
        let now = Instant::now();
        for at in queued_at.drain(..) {
            metrics.fanout.record(now - at);
        }
        buf.clear();
    }
    let _ = stream.shutdown().await;
}
