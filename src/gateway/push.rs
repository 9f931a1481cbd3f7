//! Bounded push queues: one unidirectional stream per kind, opened on first use.
//!
//! A push is written straight into its stream by the task that publishes it when
//! nothing of its kind is waiting and QUIC takes it at once (the common case: no
//! task wake-up between a publication and the connection's driver). Otherwise it is
//! queued, and a drain task, spawned for the backlog and gone when it is written,
//! writes the queue in order. A stalled kind never blocks another.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::limits::ByteBudget;
use crate::metrics::Metrics;
use crate::protocol::v1::{Push, PushStreamHeader, StreamKind};
use crate::protocol::{encode_frame, encoded_frame};
use crate::transport::{SendStream, Session};
use crate::util::Unpoisoned;

pub use crate::hub::SlowConsumer;

/// A push, already encoded as a frame, and when it was queued (for the fan-out
/// latency). Encoded once per publication and shared by every subscriber's queue.
type Queued = (Bytes, Instant);

/// The most one write of a drain task carries.
const DRAIN_WRITE: usize = 64 * 1024;

/// One kind's stream and what waits for it.
#[derive(Default)]
struct Kind {
    /// The stream, here while no drain task holds it; `None` before it is opened.
    stream: Option<SendStream>,
    /// Frames not yet written, in order.
    queue: VecDeque<Queued>,
    /// The drain task, while one runs (it holds the stream).
    drain: Option<JoinHandle<()>>,
    /// The stream failed (the session is ending): nothing more is taken.
    failed: bool,
}

impl Kind {
    fn draining(&self) -> bool {
        self.drain.is_some()
    }
}

/// What the drain tasks share with the queues.
struct Shared {
    session: Session,
    capacity: usize,
    /// Bytes queued on all kinds together.
    bytes: ByteBudget,
    /// Indexed by `StreamKind` (a handful of small values); `None` once aborted.
    kinds: Mutex<Option<Vec<Kind>>>,
    /// Signalled when a drain task took frames from a queue.
    room: Notify,
    slow: CancellationToken,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PushQueues")
            .field("capacity", &self.capacity)
            .field("queued_bytes", &self.bytes.used())
            .finish_non_exhaustive()
    }
}

/// A session's push queues.
#[derive(Debug)]
pub struct PushQueues(Arc<Shared>);

/// Why a frame was not taken.
enum Refused {
    /// The kind's queue holds `capacity` frames.
    Full,
    /// The session has ended (or its stream failed).
    Gone,
}

impl PushQueues {
    /// Queues of `capacity` frames per kind and `bytes` bytes over all kinds for
    /// `session`.
    pub fn new(session: Session, capacity: usize, bytes: usize, metrics: Arc<Metrics>) -> Self {
        Self(Arc::new(Shared {
            session,
            capacity,
            bytes: ByteBudget::new(bytes),
            kinds: Mutex::new(Some(Vec::new())),
            room: Notify::new(),
            slow: CancellationToken::new(),
            metrics,
        }))
    }

    /// Queues `push` on the stream of `kind`. Never waits: when the queue is full the
    /// session is marked slow (see [`slow`](Self::slow)) and the push is refused.
    pub fn push(&self, kind: StreamKind, push: Push) -> Result<(), SlowConsumer> {
        self.push_frame(kind, encoded_frame(&push))
    }

    /// Queues a push already encoded with [`encoded_frame`], as [`push`](Self::push) does.
    pub fn push_frame(&self, kind: StreamKind, frame: Bytes) -> Result<(), SlowConsumer> {
        let len = frame.len();
        if !self.0.bytes.try_take(len) {
            self.0.slow.cancel();
            return Err(SlowConsumer);
        }
        self.offer(kind, frame)
            .map_err(|refused| self.refuse(len, refused))
    }

    /// Gives back the `len` bytes of a refused push; a full queue marks the
    /// session slow (one that has ended is not).
    fn refuse(&self, len: usize, refused: Refused) -> SlowConsumer {
        self.0.bytes.release(len);
        if let Refused::Full = refused {
            self.0.slow.cancel();
        }
        SlowConsumer
    }

    /// Bytes queued now, all kinds together.
    pub fn queued_bytes(&self) -> usize {
        self.0.bytes.used()
    }

    /// Queues `push`, waiting up to `patience` for room in the queue (for bulk
    /// sends such as a catch-up after a reconnect). A queue still full then marks
    /// the session slow.
    pub async fn push_wait(
        &self,
        kind: StreamKind,
        push: Push,
        patience: Duration,
    ) -> Result<(), SlowConsumer> {
        let frame = encoded_frame(&push);
        let len = frame.len();
        let deadline = tokio::time::Instant::now() + patience;
        if !self.0.bytes.take(len, patience).await {
            self.0.slow.cancel();
            return Err(SlowConsumer);
        }
        loop {
            // Registered before the attempt, so a drain in between wakes it.
            let room = self.0.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            match self.offer(kind, frame.clone()) {
                Ok(()) => return Ok(()),
                Err(Refused::Full) => {
                    if tokio::time::timeout_at(deadline, room).await.is_err() {
                        return Err(self.refuse(len, Refused::Full));
                    }
                }
                Err(gone) => return Err(self.refuse(len, gone)),
            }
        }
    }

    /// Writes `frame` (its bytes already taken from the budget) now, or queues it.
    fn offer(&self, kind: StreamKind, frame: Bytes) -> Result<(), Refused> {
        let shared = &self.0;
        let mut kinds = shared.kinds.locked();
        let kinds = kinds.as_mut().ok_or(Refused::Gone)?;
        let i = kind as usize;
        if kinds.len() <= i {
            kinds.resize_with(i + 1, Kind::default);
        }
        let k = &mut kinds[i];
        if k.failed {
            return Err(Refused::Gone);
        }
        if k.queue.len() >= shared.capacity {
            return Err(Refused::Full);
        }
        let mut rest = frame;
        // The stream is here only while no drain task runs, and so while nothing
        // of this kind waits: writing now keeps the order.
        if let Some(stream) = k.stream.as_mut() {
            match stream.try_write_chunk(&rest) {
                Poll::Ready(Ok(n)) if n == rest.len() => {
                    shared.bytes.release(n);
                    // Written as it was offered: it waited for nothing, and the
                    // clock need not be read to say so.
                    shared.metrics.fanout.record(Duration::ZERO);
                    return Ok(());
                }
                Poll::Ready(Ok(n)) => {
                    shared.bytes.release(n);
                    rest = rest.slice(n..);
                }
                Poll::Pending => {}
                Poll::Ready(Err(_)) => {
                    k.failed = true;
                    k.stream = None;
                    return Err(Refused::Gone);
                }
            }
        }
        k.queue.push_back((rest, Instant::now()));
        if !k.draining() {
            k.drain = Some(tokio::spawn(drain(self.0.clone(), kind, k.stream.take())));
        }
        Ok(())
    }

    /// Completes when a queue overflowed.
    pub async fn slow(&self) {
        self.0.slow.cancelled().await
    }

    /// Stops every drain task; later pushes are refused.
    pub fn abort(&self) {
        let kinds = self.0.kinds.locked().take().unwrap_or_default();
        for task in kinds.iter().filter_map(|k| k.drain.as_ref()) {
            task.abort();
        }
    }
}

/// Writes the queue of `kind` until it is empty, then gives the stream back and
/// ends. Opens the stream first when `stream` is `None`.
async fn drain(shared: Arc<Shared>, kind: StreamKind, stream: Option<SendStream>) {
    let mut buf = BytesMut::new();
    let mut stream = match stream {
        Some(s) => s,
        None => match shared.session.open_uni().await {
            Ok(s) => {
                shared
                    .metrics
                    .streams_opened
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                // The header goes with the first write; it is not in the budget.
                encode_frame(&PushStreamHeader { kind: kind as i32 }, &mut buf);
                s
            }
            Err(_) => return fail(&shared, kind),
        },
    };
    let mut header = buf.len();
    let mut queued_at = Vec::new();
    loop {
        {
            let mut kinds = shared.kinds.locked();
            let Some(k) = kinds.as_mut().and_then(|k| k.get_mut(kind as usize)) else {
                return;
            };
            if k.queue.is_empty() && header == 0 {
                // Written: the stream goes back for direct writes.
                k.stream = Some(stream);
                k.drain = None;
                return;
            }
            while buf.len() < DRAIN_WRITE {
                let Some((frame, at)) = k.queue.pop_front() else {
                    break;
                };
                buf.extend_from_slice(&frame);
                queued_at.push(at);
            }
        }
        shared.room.notify_waiters();
        let written = buf.len() - header;
        header = 0;
        if stream.write_all(&buf).await.is_err() {
            shared.bytes.release(written);
            return fail(&shared, kind);
        }
        // Written to QUIC: bounded from here by the connection's send window.
        shared.bytes.release(written);
        let now = Instant::now();
        for at in queued_at.drain(..) {
            shared.metrics.fanout.record(now - at);
        }
        buf.clear();
    }
}

/// The stream of `kind` failed: what waits is dropped and later pushes refused.
fn fail(shared: &Shared, kind: StreamKind) {
    let mut kinds = shared.kinds.locked();
    if let Some(k) = kinds.as_mut().and_then(|k| k.get_mut(kind as usize)) {
        let dropped: usize = k.queue.drain(..).map(|(f, _)| f.len()).sum();
        shared.bytes.release(dropped);
        k.failed = true;
        k.drain = None;
    }
    drop(kinds);
    shared.room.notify_waiters();
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt;

    use super::*;
    use crate::protocol::FrameDecoder;
    use crate::protocol::v1;
    use crate::transport::memory::{PairConfig, pair};

    fn echo(n: u32) -> Push {
        Push {
            stream: String::new(),
            offset: u64::from(n),
            event: Some(v1::push::Event::Echo(v1::EchoEvent {
                payload: vec![7; 100].into(),
            })),
        }
    }

    /// A session pair whose streams take 1 KiB before the writer waits.
    fn narrow_pair() -> (Session, Session) {
        pair(PairConfig {
            window: 1024,
            ..PairConfig::default()
        })
    }

    fn queues(server: Session, capacity: usize, bytes: usize) -> PushQueues {
        PushQueues::new(server, capacity, bytes, Arc::new(Metrics::default()))
    }

    fn draining(q: &PushQueues, kind: StreamKind) -> bool {
        let kinds = q.0.kinds.lock().unwrap();
        kinds
            .as_ref()
            .and_then(|k| k.get(kind as usize))
            .is_some_and(Kind::draining)
    }

    /// Reads `n` pushes from the next push stream of `client`, checking its header.
    async fn read_pushes(client: &Session, n: usize) -> Vec<u64> {
        let mut stream = client.accept_uni().await.unwrap();
        let mut decoder = FrameDecoder::new(64 * 1024);
        let mut header = None;
        let mut offsets = Vec::new();
        let mut buf = [0; 512];
        while offsets.len() < n {
            if header.is_none() {
                header = decoder.decode::<PushStreamHeader>().unwrap();
                if header.is_some() {
                    continue;
                }
            } else if let Some(p) = decoder.decode::<Push>().unwrap() {
                offsets.push(p.offset);
                continue;
            }
            let read = stream.read(&mut buf).await.unwrap();
            assert!(read > 0, "the push stream ended after {offsets:?}");
            decoder.extend(&buf[..read]);
        }
        assert_eq!(header.unwrap().kind, StreamKind::Chat as i32);
        offsets
    }

    #[tokio::test(start_paused = true)]
    async fn pushes_arrive_in_order_whether_written_at_once_or_queued() {
        // A window of 1 KiB: most of the 300 pushes (about 110 bytes each) wait
        // in the queue, the rest are written by the publisher.
        let (server, client) = narrow_pair();
        let q = queues(server, 4096, 1 << 20);
        for n in 0..300 {
            q.push(StreamKind::Chat, echo(n)).unwrap();
            if n % 7 == 0 {
                tokio::task::yield_now().await;
            }
        }
        let offsets = read_pushes(&client, 300).await;
        assert_eq!(offsets, (0..300).collect::<Vec<_>>());
        // Once the backlog is written the drain task is gone and the budget free.
        while draining(&q, StreamKind::Chat) {
            tokio::task::yield_now().await;
        }
        assert_eq!(q.queued_bytes(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_push_to_an_idle_stream_is_written_without_a_drain_task() {
        let (server, client) = pair(PairConfig::default());
        let q = queues(server, 16, 1 << 20);
        // The first push opens the stream (a drain task does that).
        q.push(StreamKind::Chat, echo(0)).unwrap();
        assert!(draining(&q, StreamKind::Chat));
        while draining(&q, StreamKind::Chat) {
            tokio::task::yield_now().await;
        }
        q.push(StreamKind::Chat, echo(1)).unwrap();
        assert!(!draining(&q, StreamKind::Chat), "written by the publisher");
        assert_eq!(q.queued_bytes(), 0);
        assert_eq!(read_pushes(&client, 2).await, [0, 1]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_queue_refuses_and_marks_the_session_slow() {
        // Nobody reads: the window fills, then the queue of 8 frames.
        let (server, _client) = narrow_pair();
        let q = queues(server, 8, 1 << 20);
        let mut refused = None;
        for n in 0..100 {
            if q.push(StreamKind::Chat, echo(n)).is_err() {
                refused = Some(n);
                break;
            }
            tokio::task::yield_now().await;
        }
        assert!(
            refused.is_some(),
            "a queue of 8 frames took 100 unread pushes"
        );
        tokio::time::timeout(Duration::from_secs(1), q.slow())
            .await
            .expect("marked slow");
    }

    #[tokio::test(start_paused = true)]
    async fn push_wait_waits_for_room_then_gives_up() {
        let (server, client) = narrow_pair();
        let q = queues(server, 4, 1 << 20);
        // Fill the window and the queue.
        let mut n = 0;
        while q.push(StreamKind::Chat, echo(n)).is_ok() {
            n += 1;
            tokio::task::yield_now().await;
        }
        let taken = n;
        // Unread: a waiting push gives up after its patience and marks the session
        // slow.
        let (server2, _client2) = narrow_pair();
        let stuck = queues(server2, 4, 1 << 20);
        while stuck.push(StreamKind::Chat, echo(0)).is_ok() {
            tokio::task::yield_now().await;
        }
        let started = tokio::time::Instant::now();
        assert!(
            stuck
                .push_wait(StreamKind::Chat, echo(1), Duration::from_secs(5))
                .await
                .is_err()
        );
        assert!(started.elapsed() >= Duration::from_secs(5));
        // Read: the waiting push goes in once the reader makes room.
        let reader = tokio::spawn(async move { read_pushes(&client, taken as usize + 1).await });
        q.push_wait(StreamKind::Chat, echo(taken), Duration::from_secs(5))
            .await
            .expect("room once the client reads");
        let offsets = reader.await.unwrap();
        assert_eq!(offsets, (0..=u64::from(taken)).collect::<Vec<_>>());
    }
}
