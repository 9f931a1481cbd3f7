//! Catch-up after a reconnect: a session that resumes a stream (a room, a user's
//! notifications) from an offset gets every entry after it exactly once and in
//! order, then the live ones, without holding the stream's lock while it waits for
//! the client.
//!
//! The stream's entries are published under its lock, in offset order. A catch-up
//! runs in rounds: under the lock it only reads the last offset, then streams the
//! range up to it in pages *outside* the lock, waiting for queue room as a bulk send
//! may. When what is left is at most one page, it takes the lock once more, pushes
//! that remainder without waiting (a full queue ends the round instead) and
//! subscribes the session before letting go: every later entry then reaches it
//! live, after the remainder. A client that resumes from offset 0 of a long stream
//! therefore holds the lock only for a few short, non-waiting steps.
//!
//! The rounds are bounded ([`MAX_ROUNDS`]): a client that cannot catch up with the
//! stream's traffic in that many rounds gets what is left without waiting, page by
//! page under the lock, and a queue that overflows marks it a slow consumer (the
//! gateway then closes the session).

use futures_util::FutureExt;
use futures_util::future::BoxFuture;

use crate::hub::Subscriber;
use crate::protocol::v1::{HistoryTruncated, Push, StreamKind, push};
use crate::store::StoreError;

/// Entries read and pushed per step.
pub const PAGE: u64 = 256;

/// Rounds of streaming outside the lock before the rest is pushed without waiting.
pub const MAX_ROUNDS: usize = 16;

/// A stream a session can catch up on.
pub(crate) trait CatchUpStream {
    /// The stream's lock, held while publishing and while subscribing.
    type Guard: Send;

    /// Takes the stream's lock and reads its last offset; `None` when the session
    /// may no longer read the stream (it left the room meanwhile).
    async fn lock(&self) -> Result<Option<(Self::Guard, u64)>, StoreError>;

    /// The pushes of the entries `from..=to`, in offset order.
    fn read(&self, from: u64, to: u64) -> BoxFuture<'_, Result<Vec<Push>, StoreError>>;

    /// Subscribes the session to the live stream; called under the lock.
    fn subscribe(&self, guard: &mut Self::Guard);

    /// The stream's name, as in `Push.stream` and `Hello.resume`.
    fn name(&self) -> String;
}

/// The pushes of `from..=to`, preceded by a [`HistoryTruncated`] marker when the
/// stream no longer keeps the first of them (retention removed them). A page with
/// nothing left in it yields nothing: the marker comes with the first page that
/// has entries (there is one: a stream's newest entry is never removed).
async fn read_marked<S: CatchUpStream>(
    stream: &S,
    from: u64,
    to: u64,
) -> Result<Vec<Push>, StoreError> {
    let mut pushes = stream.read(from, to).await?;
    if let Some(first) = pushes.first().map(|p| p.offset)
        && first > from
    {
        let name = stream.name();
        pushes.insert(
            0,
            Push {
                stream: name.clone(),
                offset: 0,
                event: Some(push::Event::HistoryTruncated(HistoryTruncated {
                    stream: name,
                    first_offset: first,
                })),
            },
        );
    }
    Ok(pushes)
}

/// How a catch-up ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CatchUp {
    /// Everything after the resume offset was queued and the session is subscribed.
    Live,
    /// The session may no longer read the stream: nothing more was sent.
    Gone,
    /// The session's queue overflowed (it is marked a slow consumer).
    Slow,
}

/// Catches `sub` up on `stream` from `from` (the last offset it has; `None`: it
/// resumes nothing and only subscribes), then subscribes it. A `from` at or beyond
/// the stream's end sends nothing.
pub(crate) async fn catch_up<S: CatchUpStream>(
    stream: &S,
    sub: &dyn Subscriber,
    kind: StreamKind,
    from: Option<u64>,
) -> Result<CatchUp, StoreError> {
    let Some(mut cursor) = from else {
        let Some((mut guard, _)) = stream.lock().await? else {
            return Ok(CatchUp::Gone);
        };
        stream.subscribe(&mut guard);
        return Ok(CatchUp::Live);
    };
    let mut rounds = 0;
    loop {
        let Some((mut guard, last)) = stream.lock().await? else {
            return Ok(CatchUp::Gone);
        };
        let last_round = rounds >= MAX_ROUNDS;
        if cursor < last && (last - cursor <= PAGE || last_round) {
            match push_now(stream, sub, kind, cursor, last, last_round).await? {
                Now::Done => cursor = last,
                Now::Full(at) => cursor = at,
                Now::Slow => return Ok(CatchUp::Slow),
            }
        }
        if cursor >= last {
            stream.subscribe(&mut guard);
            return Ok(CatchUp::Live);
        }
        drop(guard);
        // Outside the lock: the range up to `last`, waiting for queue room.
        while cursor < last {
            let end = cursor + PAGE.min(last - cursor);
            for push in read_marked(stream, cursor + 1, end).await? {
                if sub.push_wait(kind, push).await.is_err() {
                    return Ok(CatchUp::Slow);
                }
            }
            cursor = end;
        }
        rounds += 1;
    }
}

/// What a non-waiting push of a range did.
enum Now {
    /// All queued.
    Done,
    /// The queue is full; entries up to this offset were queued.
    Full(u64),
    /// The queue overflowed; the session is marked slow.
    Slow,
}

/// Pushes `(cursor, last]` without waiting: `force` pushes as live pushes do (a full
/// queue marks the session slow); otherwise a full queue stops the push.
async fn push_now<S: CatchUpStream>(
    stream: &S,
    sub: &dyn Subscriber,
    kind: StreamKind,
    mut cursor: u64,
    last: u64,
    force: bool,
) -> Result<Now, StoreError> {
    while cursor < last {
        let end = cursor + PAGE.min(last - cursor);
        for push in read_marked(stream, cursor + 1, end).await? {
            // A truncation marker has offset 0 and moves nothing.
            let offset = push.offset.max(cursor);
            if force {
                if sub.push(kind, push).is_err() {
                    return Ok(Now::Slow);
                }
            } else {
                // One poll: queued if there is room, otherwise dropped unsent (a
                // bounded channel's send is cancel-safe) without marking the session.
                match sub.push_wait(kind, push).now_or_never() {
                    Some(Ok(())) => {}
                    Some(Err(_)) => return Ok(Now::Slow),
                    None => return Ok(Now::Full(cursor)),
                }
            }
            cursor = offset;
        }
        cursor = end;
    }
    Ok(Now::Done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::services::fakes::FakeSession;
    use std::sync::{Arc, Mutex};

    /// A stream that grows by `growth` entries every time its lock is taken (a
    /// room whose traffic outpaces the reader), `offset` as each push's offset.
    struct Growing {
        lock: Arc<tokio::sync::Mutex<()>>,
        /// The oldest entry kept (older ones were removed).
        first: u64,
        last: Mutex<u64>,
        growth: u64,
        locks: Mutex<usize>,
        subscribed: Mutex<bool>,
    }

    impl Growing {
        fn new(last: u64, growth: u64) -> Self {
            Self {
                lock: Arc::default(),
                first: 1,
                last: Mutex::new(last),
                growth,
                locks: Mutex::new(0),
                subscribed: Mutex::new(false),
            }
        }
    }

    impl CatchUpStream for Growing {
        type Guard = tokio::sync::OwnedMutexGuard<()>;

        async fn lock(&self) -> Result<Option<(Self::Guard, u64)>, StoreError> {
            let guard = self.lock.clone().lock_owned().await;
            *self.locks.lock().unwrap() += 1;
            let mut last = self.last.lock().unwrap();
            *last += self.growth;
            Ok(Some((guard, *last)))
        }

        fn read(&self, from: u64, to: u64) -> BoxFuture<'_, Result<Vec<Push>, StoreError>> {
            let pushes = (from.max(self.first)..=to)
                .map(|offset| Push {
                    stream: "s".into(),
                    offset,
                    event: None,
                })
                .collect();
            Box::pin(std::future::ready(Ok(pushes)))
        }

        fn subscribe(&self, _: &mut Self::Guard) {
            *self.subscribed.lock().unwrap() = true;
        }

        fn name(&self) -> String {
            "s".into()
        }
    }

    fn drain(rx: &mut tokio::sync::mpsc::Receiver<(StreamKind, Push)>) -> Vec<u64> {
        std::iter::from_fn(|| rx.try_recv().ok().map(|(_, p)| p.offset)).collect()
    }

    #[tokio::test]
    async fn a_stream_that_keeps_growing_is_caught_up_in_bounded_rounds() {
        // Each round finds more than a page new: after MAX_ROUNDS the rest goes
        // without waiting, under the lock.
        let stream = Growing::new(1000, PAGE + 1);
        let (session, mut rx) = FakeSession::new("u", "s", 100_000);
        let end = catch_up(&stream, session.as_ref(), StreamKind::Chat, Some(0))
            .await
            .unwrap();
        assert_eq!(end, CatchUp::Live);
        assert!(*stream.subscribed.lock().unwrap());
        assert_eq!(*stream.locks.lock().unwrap(), MAX_ROUNDS + 1);
        let last = *stream.last.lock().unwrap();
        assert_eq!(drain(&mut rx), (1..=last).collect::<Vec<_>>());
        assert!(!session.was_slow());
    }

    #[tokio::test(start_paused = true)]
    async fn a_reader_that_stops_reading_holds_no_lock() {
        for growth in [0, 10, 10 * PAGE] {
            let stream = Growing::new(1000, growth);
            let (session, _unread) = FakeSession::new("u", "s", 10);
            let mut catching_up = std::pin::pin!(catch_up(
                &stream,
                session.as_ref(),
                StreamKind::Chat,
                Some(0)
            ));
            // Nobody reads: the catch-up waits for queue room, and meanwhile the
            // stream's lock is free for everyone else.
            let waited =
                tokio::time::timeout(std::time::Duration::from_millis(100), catching_up.as_mut())
                    .await;
            assert!(waited.is_err(), "it waits for the reader");
            assert!(stream.lock.try_lock().is_ok(), "not under the lock");
            assert!(!*stream.subscribed.lock().unwrap());
            assert!(!session.was_slow());
        }
    }

    /// Resuming from before the oldest kept entry, both through pages streamed
    /// outside the lock and through the last page under it: one marker with the
    /// first kept offset, then every kept entry once.
    #[tokio::test]
    async fn a_resume_before_the_oldest_kept_entry_is_told_once() {
        for (first, last) in [(600, 1000), (5, 10)] {
            let stream = Growing {
                first,
                ..Growing::new(last, 0)
            };
            let (session, mut rx) = FakeSession::new("u", "s", 100_000);
            let end = catch_up(&stream, session.as_ref(), StreamKind::Chat, Some(1))
                .await
                .unwrap();
            assert_eq!(end, CatchUp::Live);
            let got: Vec<Push> =
                std::iter::from_fn(|| rx.try_recv().ok().map(|(_, p)| p)).collect();
            match &got[0].event {
                Some(push::Event::HistoryTruncated(h)) => {
                    assert_eq!((h.stream.as_str(), h.first_offset), ("s", first));
                }
                other => panic!("{other:?}"),
            }
            let offsets: Vec<u64> = got[1..].iter().map(|p| p.offset).collect();
            assert_eq!(offsets, (first..=last).collect::<Vec<_>>());
        }
    }

    #[tokio::test]
    async fn resuming_at_or_past_the_end_sends_nothing_and_subscribes() {
        for from in [1000 + PAGE, u64::MAX] {
            let stream = Growing::new(1000, 0);
            let (session, mut rx) = FakeSession::new("u", "s", 16);
            let end = catch_up(&stream, session.as_ref(), StreamKind::Chat, Some(from))
                .await
                .unwrap();
            assert_eq!(end, CatchUp::Live);
            assert!(drain(&mut rx).is_empty());
            assert!(*stream.subscribed.lock().unwrap());
        }
    }
}
