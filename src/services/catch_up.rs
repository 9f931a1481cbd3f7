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
use crate::protocol::v1::{Push, StreamKind};
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
            for push in stream.read(cursor + 1, end).await? {
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
        for push in stream.read(cursor + 1, end).await? {
            let offset = push.offset;
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
