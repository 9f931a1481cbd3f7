//! Requests gathered behind a lock, so that whoever holds it serves them all.
//!
//! A room's sends (a document's operations) are committed under the room's
//! lock, and with commit pacing a commit may wait up to `commit_interval`. Taken
//! one at a time, each waits for a commit of its own and a room takes at most
//! one send per interval. Here
//! a request first [`join`](Gather::join)s its key's queue, then waits for
//! either its answer or the lock. Whoever gets the lock [`take`](Gather::take)s
//! every request queued, serves them together (one write, one commit) and
//! answers each; the requests it served find their answer and never need the lock.
//!
//! A request dropped before it was taken (its caller gave up) is skipped, never
//! served. One dropped after it was taken is served all the same, as a write
//! whose caller went away is. If a server of taken requests is dropped before
//! answering, their waiters see [`Answer::Dropped`].

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::ops::DerefMut;
use std::pin::Pin;
use std::sync::Mutex;

use tokio::sync::oneshot;

use super::{ServiceError, ServiceResult};
use crate::protocol::ErrorCode;
use crate::util::Unpoisoned;

/// A queued request and where its answer goes.
type Entry<T, R> = (T, oneshot::Sender<R>);

/// A batch being served: resolves to how many requests it took.
pub(crate) type Serving<'g> = Pin<Box<dyn Future<Output = usize> + Send + 'g>>;

/// Each key's queue.
type Queues<T, R> = HashMap<String, VecDeque<Entry<T, R>>>;

/// Queues of requests `T` answered with `R`, one per key.
#[derive(Debug)]
pub(crate) struct Gather<T, R> {
    queues: Mutex<Queues<T, R>>,
}

impl<T, R> Default for Gather<T, R> {
    fn default() -> Self {
        Self {
            queues: Mutex::new(HashMap::new()),
        }
    }
}

/// What a waiting request finds.
#[derive(Debug, PartialEq)]
pub(crate) enum Answer<R> {
    /// Served and answered.
    Ready(R),
    /// Still queued: nobody took it yet.
    Queued,
    /// Taken, but whoever took it was dropped before answering (it may or may
    /// not have been carried out).
    Dropped,
}

impl<V> Answer<ServiceResult<V>> {
    /// The service's answer. A request whose server went away gets
    /// `UNAVAILABLE` with `interrupted` (which tells the client how to retry
    /// safely); one never served is an internal error.
    pub(crate) fn into_result(self, interrupted: &str) -> ServiceResult<V> {
        match self {
            Answer::Ready(r) => r,
            Answer::Dropped => Err(ServiceError::new(ErrorCode::Unavailable, interrupted)),
            Answer::Queued => Err(ServiceError::internal("a queued request was not served")),
        }
    }
}

/// A request's place in its queue. Dropping it unanswered takes the request out
/// of the queue, unless it was already taken.
#[derive(Debug)]
pub(crate) struct Ticket<'a, T, R> {
    gather: &'a Gather<T, R>,
    key: &'a str,
    rx: oneshot::Receiver<R>,
    answered: bool,
}

impl<T, R> Gather<T, R> {
    /// Queues `request` under `key`.
    pub(crate) fn join<'a>(&'a self, key: &'a str, request: T) -> Ticket<'a, T, R> {
        let (tx, rx) = oneshot::channel();
        let mut queues = self.queues.locked();
        // The key is copied only for a queue that starts here.
        match queues.get_mut(key) {
            Some(queue) => queue.push_back((request, tx)),
            None => {
                queues.insert(key.to_owned(), VecDeque::from([(request, tx)]));
            }
        }
        drop(queues);
        Ticket {
            gather: self,
            key,
            rx,
            answered: false,
        }
    }

    /// Queues `request` under `key`, then waits for its answer or for `lock`,
    /// whichever comes first. Holding the lock, calls `serve(with, guarded)`
    /// (which [`take`](Self::take)s what is queued under `key`, answers it and
    /// returns how many it took) until `request` is answered. A `lock` that
    /// fails gives up the request. [`Answer::Queued`] means `serve` took nothing
    /// while the request was still queued.
    ///
    /// `serve` returns a boxed future (one allocation per batch served), which
    /// may borrow `with` and the guarded state: an async closure capturing them
    /// is not `Send` for every lifetime (rust-lang/rust#110338), and requests
    /// run on spawned tasks.
    pub(crate) async fn wait_or_serve<C, G, S, E>(
        &self,
        key: &str,
        request: T,
        lock: impl Future<Output = Result<G, E>>,
        with: &C,
        serve: impl for<'g> Fn(&'g C, &'g mut S) -> Serving<'g>,
    ) -> Result<Answer<R>, E>
    where
        G: DerefMut<Target = S>,
        S: ?Sized,
    {
        let mut ticket = self.join(key, request);
        let mut guard = tokio::select! {
            biased;
            answer = ticket.answered() => return Ok(answer),
            guard = lock => guard?,
        };
        loop {
            match ticket.try_answer() {
                Answer::Queued => {}
                answer => return Ok(answer),
            }
            if serve(with, &mut guard).await == 0 {
                return Ok(Answer::Queued);
            }
        }
    }

    /// Takes up to `max` requests queued under `key`, oldest first, skipping
    /// those whose caller gave up. Answer each through its sender.
    pub(crate) fn take(&self, key: &str, max: usize) -> Vec<Entry<T, R>> {
        let mut queues = self.queues.locked();
        let Some(queue) = queues.get_mut(key) else {
            return Vec::new();
        };
        let mut taken = Vec::with_capacity(queue.len().min(max));
        while taken.len() < max {
            match queue.pop_front() {
                Some((_, tx)) if tx.is_closed() => {}
                Some(entry) => taken.push(entry),
                None => break,
            }
        }
        if queue.is_empty() {
            queues.remove(key);
        }
        taken
    }

    /// Requests queued under `key` (for tests).
    #[cfg(test)]
    pub(crate) fn queued(&self, key: &str) -> usize {
        self.queues.locked().get(key).map_or(0, VecDeque::len)
    }
}

impl<T, R> Ticket<'_, T, R> {
    /// Waits until the request is answered or its server is dropped.
    pub(crate) async fn answered(&mut self) -> Answer<R> {
        let answer = match (&mut self.rx).await {
            Ok(r) => Answer::Ready(r),
            Err(_) => Answer::Dropped,
        };
        self.answered = true;
        answer
    }

    /// The answer if there is one now.
    pub(crate) fn try_answer(&mut self) -> Answer<R> {
        let answer = match self.rx.try_recv() {
            Ok(r) => Answer::Ready(r),
            Err(oneshot::error::TryRecvError::Empty) => return Answer::Queued,
            Err(oneshot::error::TryRecvError::Closed) => Answer::Dropped,
        };
        self.answered = true;
        answer
    }
}

impl<T, R> Drop for Ticket<'_, T, R> {
    fn drop(&mut self) {
        if self.answered {
            return;
        }
        // Closed first, so `take` and the sweep below both see it as given up.
        self.rx.close();
        let mut queues = self.gather.queues.locked();
        if let Some(queue) = queues.get_mut(self.key) {
            queue.retain(|(_, tx)| !tx.is_closed());
            if queue.is_empty() {
                queues.remove(self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whoever_takes_serves_everyone_queued_in_order() {
        let g = Gather::<u32, u32>::default();
        let mut tickets: Vec<_> = (1..=3).map(|i| g.join("k", i)).collect();
        let mut other = g.join("other", 9);
        let taken = g.take("k", 10);
        assert_eq!(taken.iter().map(|(t, _)| *t).collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(tickets[0].try_answer(), Answer::Queued);
        for (t, tx) in taken {
            tx.send(t * 10).unwrap();
        }
        let answers: Vec<_> = tickets.iter_mut().map(|t| t.try_answer()).collect();
        assert_eq!(answers, [10, 20, 30].map(Answer::Ready));
        assert_eq!((g.queued("k"), g.queued("other")), (0, 1));
        assert_eq!(other.try_answer(), Answer::Queued);
    }

    #[test]
    fn take_stops_at_max_and_leaves_the_rest_queued() {
        let g = Gather::<u32, u32>::default();
        let _tickets: Vec<_> = (1..=5).map(|i| g.join("k", i)).collect();
        assert_eq!(g.take("k", 2).len(), 2);
        assert_eq!(g.queued("k"), 3);
        assert_eq!(g.take("k", 10).len(), 3);
        assert!(g.queues.locked().is_empty(), "an empty queue is removed");
    }

    #[test]
    fn a_request_given_up_is_not_taken_and_leaves_nothing_behind() {
        let g = Gather::<u32, u32>::default();
        let first = g.join("k", 1);
        let mut second = g.join("k", 2);
        drop(first);
        assert_eq!(g.queued("k"), 1);
        let taken = g.take("k", 10);
        assert_eq!(taken.iter().map(|(t, _)| *t).collect::<Vec<_>>(), [2]);
        drop(taken);
        assert_eq!(second.try_answer(), Answer::Dropped, "its server went away");
        drop(g.join("k", 3));
        assert!(g.queues.locked().is_empty());
    }

    #[tokio::test]
    async fn a_waiter_wakes_when_answered() {
        let g = Gather::<u32, u32>::default();
        let mut ticket = g.join("k", 7);
        let (t, tx) = g.take("k", 1).pop().unwrap();
        let answer = tokio::spawn(async move { tx.send(t + 1) });
        assert_eq!(ticket.answered().await, Answer::Ready(8));
        answer.await.unwrap().unwrap();
    }
}
