//! The queue of events the endpoint driver sends one connection (received
//! datagrams, close, rebind): unbounded, one sender, one receiver.
//!
//! It was tokio's unbounded `mpsc` channel, which costs about 640 bytes per
//! connection before the first event: its shared state pads three fields to 128
//! bytes each, and its first block of 32 slots is allocated when the channel is
//! made. Every connection has one and it is empty nearly all the time, so this is
//! a queue and the receiver's waker under one mutex, about 100 bytes; the queue
//! allocates on first use and lets a burst's capacity go once drained.

use std::collections::VecDeque;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use crate::mutex::Mutex;

/// A grown queue keeps at most this many slots once drained.
const KEPT_SLOTS: usize = 8;

struct State<T> {
    queue: VecDeque<T>,
    /// The receiver's waker, while it waits.
    waker: Option<Waker>,
    sender_gone: bool,
    receiver_gone: bool,
}

/// A new queue.
pub(crate) fn channel<T>() -> (Sender<T>, Receiver<T>) {
    let shared = Arc::new(Mutex::new(State {
        queue: VecDeque::new(),
        waker: None,
        sender_gone: false,
        receiver_gone: false,
    }));
    (Sender(shared.clone()), Receiver(shared))
}

/// The sending half (the endpoint driver's).
pub(crate) struct Sender<T>(Arc<Mutex<State<T>>>);

impl<T> Sender<T> {
    /// Queues `value`, or gives it back if the receiver is gone.
    pub(crate) fn send(&self, value: T) -> Result<(), T> {
        let mut state = self.0.lock("event_queue send");
        if state.receiver_gone {
            return Err(value);
        }
        state.queue.push_back(value);
        let waker = state.waker.take();
        drop(state);
        if let Some(waker) = waker {
            waker.wake();
        }
        Ok(())
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        let mut state = self.0.lock("event_queue sender drop");
        state.sender_gone = true;
        let waker = state.waker.take();
        drop(state);
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

impl<T> std::fmt::Debug for Sender<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sender").finish_non_exhaustive()
    }
}

/// The receiving half (the connection's).
pub(crate) struct Receiver<T>(Arc<Mutex<State<T>>>);

impl<T> Receiver<T> {
    /// The next event; `None` once the sender is gone and everything it sent is
    /// taken.
    pub(crate) fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<T>> {
        let mut state = self.0.lock("event_queue poll_recv");
        if let Some(value) = state.queue.pop_front() {
            if state.queue.is_empty() && state.queue.capacity() > KEPT_SLOTS {
                state.queue = VecDeque::new();
            }
            return Poll::Ready(Some(value));
        }
        if state.sender_gone {
            return Poll::Ready(None);
        }
        match &mut state.waker {
            Some(waker) if waker.will_wake(cx.waker()) => {}
            waker => *waker = Some(cx.waker().clone()),
        }
        Poll::Pending
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        let mut state = self.0.lock("event_queue receiver drop");
        state.receiver_gone = true;
        state.waker = None;
        let queued = std::mem::take(&mut state.queue);
        drop(state);
        drop(queued);
    }
}

impl<T> std::fmt::Debug for Receiver<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receiver").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;

    #[tokio::test]
    async fn events_arrive_in_order_then_the_end() {
        let (tx, mut rx) = channel::<u32>();
        tx.send(1).unwrap();
        tx.send(2).unwrap();
        assert_eq!(poll_fn(|cx| rx.poll_recv(cx)).await, Some(1));
        assert_eq!(poll_fn(|cx| rx.poll_recv(cx)).await, Some(2));
        let waiting = tokio::spawn(async move {
            let first = poll_fn(|cx| rx.poll_recv(cx)).await;
            let end = poll_fn(|cx| rx.poll_recv(cx)).await;
            (first, end)
        });
        tokio::task::yield_now().await;
        tx.send(3).unwrap();
        drop(tx);
        assert_eq!(waiting.await.unwrap(), (Some(3), None));
    }

    #[tokio::test]
    async fn a_burst_is_let_go_once_drained() {
        let (tx, mut rx) = channel::<u32>();
        for i in 0..100 {
            tx.send(i).unwrap();
        }
        for i in 0..100 {
            assert_eq!(poll_fn(|cx| rx.poll_recv(cx)).await, Some(i));
        }
        assert_eq!(rx.0.lock("test").queue.capacity(), 0);
    }

    #[test]
    fn sending_to_a_gone_receiver_gives_the_value_back() {
        let (tx, rx) = channel::<u32>();
        drop(rx);
        assert_eq!(tx.send(7), Err(7));
    }
}
