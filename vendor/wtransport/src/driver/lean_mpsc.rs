//! A bounded channel with the part of tokio's `mpsc` interface the driver uses
//! (`send`, `try_send`, `reserve`, `reserve_owned`, `capacity`, `recv`), small
//! while it is idle.
//!
//! The driver makes eight channels per connection (incoming streams, sessions,
//! settings, datagrams), and they are empty nearly all the time. A tokio channel
//! costs about 800 bytes before the first value, whatever its capacity: its shared
//! state pads three fields to 128 bytes each (against false sharing), and its
//! first block of 32 slots is allocated when the channel is made. This one is a
//! queue under a mutex, a semaphore for the room left and a `Notify` for the
//! receiver: about 150 bytes, and the queue allocates on first use. Values are
//! boxed in the queue so that it keeps one pointer per slot once grown, whatever
//! the size of the value.
//!
//! Room is counted by the semaphore: a send takes a permit and keeps it (the
//! permit is forgotten), a receive gives one back. Closing the receiver closes the
//! semaphore, so waiting senders fail. The receiver is woken by `Notify`, whose
//! stored permit covers a value sent (or the last sender dropped) between the
//! receiver's check and its wait; `recv` is cancel-safe (a value is taken from the
//! queue only in the poll that returns it).

use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering;
use tokio::sync::Notify;
use tokio::sync::Semaphore;
use tokio::sync::TryAcquireError;

/// Errors, as in `tokio::sync::mpsc::error`.
pub mod error {
    /// The receiver is gone; the value comes back.
    pub struct SendError<T>(pub T);

    impl<T> std::fmt::Debug for SendError<T> {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("SendError(..)")
        }
    }

    /// Why a `try_send` failed; the value comes back.
    pub enum TrySendError<T> {
        /// No room.
        Full(T),
        /// The receiver is gone.
        Closed(T),
    }
}

struct Shared<T> {
    queue: Mutex<VecDeque<Box<T>>>,
    /// Free slots; closed when the receiver is dropped.
    room: Semaphore,
    /// Wakes the receiver: a value was queued or the last sender went away.
    ready: Notify,
    senders: AtomicUsize,
}

impl<T> Shared<T> {
    /// Queues a value whose slot was taken from `room`.
    fn push(&self, value: T) {
        self.queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back(Box::new(value));
        self.ready.notify_one();
    }

    fn pop(&self) -> Option<T> {
        let value = self
            .queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop_front()?;
        self.room.add_permits(1);
        Some(*value)
    }
}

/// A new channel of `capacity` values.
pub fn channel<T>(capacity: usize) -> (Sender<T>, Receiver<T>) {
    assert!(capacity > 0, "a channel needs room for one value");
    let shared = Arc::new(Shared {
        queue: Mutex::new(VecDeque::new()),
        room: Semaphore::new(capacity),
        ready: Notify::new(),
        senders: AtomicUsize::new(1),
    });
    (Sender(shared.clone()), Receiver(shared))
}

/// The sending half.
pub struct Sender<T>(Arc<Shared<T>>);

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        self.0.senders.fetch_add(1, Ordering::Relaxed);
        Self(self.0.clone())
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        if self.0.senders.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.ready.notify_one();
        }
    }
}

impl<T> fmt::Debug for Sender<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sender")
            .field("capacity", &self.capacity())
            .finish()
    }
}

impl<T> Sender<T> {
    /// Sends `value`, waiting for room.
    pub async fn send(&self, value: T) -> Result<(), error::SendError<T>> {
        match self.0.room.acquire().await {
            Ok(permit) => {
                permit.forget();
                self.0.push(value);
                Ok(())
            }
            Err(_closed) => Err(error::SendError(value)),
        }
    }

    /// Sends `value` if there is room.
    pub fn try_send(&self, value: T) -> Result<(), error::TrySendError<T>> {
        match self.0.room.try_acquire() {
            Ok(permit) => {
                permit.forget();
                self.0.push(value);
                Ok(())
            }
            Err(TryAcquireError::NoPermits) => Err(error::TrySendError::Full(value)),
            Err(TryAcquireError::Closed) => Err(error::TrySendError::Closed(value)),
        }
    }

    /// Waits for room for one value.
    pub async fn reserve(&self) -> Result<Permit<'_, T>, error::SendError<()>> {
        match self.0.room.acquire().await {
            Ok(permit) => {
                permit.forget();
                Ok(Permit(Some(self)))
            }
            Err(_closed) => Err(error::SendError(())),
        }
    }

    /// Waits for room for one value, holding a sender of its own.
    pub async fn reserve_owned(self) -> Result<OwnedPermit<T>, error::SendError<()>> {
        let taken = self.0.room.acquire().await.map(|permit| permit.forget());
        match taken {
            Ok(()) => Ok(OwnedPermit(Some(self))),
            Err(_closed) => Err(error::SendError(())),
        }
    }

    /// Room left.
    pub fn capacity(&self) -> usize {
        self.0.room.available_permits()
    }
}

/// Room for one value, from [`Sender::reserve`]; given back if dropped unused.
pub struct Permit<'a, T>(Option<&'a Sender<T>>);

impl<T> Permit<'_, T> {
    /// Sends `value` in the room held.
    pub fn send(mut self, value: T) {
        if let Some(sender) = self.0.take() {
            sender.0.push(value);
        }
    }
}

impl<T> Drop for Permit<'_, T> {
    fn drop(&mut self) {
        if let Some(sender) = self.0 {
            sender.0.room.add_permits(1);
        }
    }
}

/// Room for one value, from [`Sender::reserve_owned`]; given back if dropped
/// unused.
pub struct OwnedPermit<T>(Option<Sender<T>>);

impl<T> OwnedPermit<T> {
    /// Sends `value` in the room held.
    pub fn send(mut self, value: T) {
        if let Some(sender) = self.0.take() {
            sender.0.push(value);
        }
    }
}

impl<T> Drop for OwnedPermit<T> {
    fn drop(&mut self) {
        if let Some(sender) = &self.0 {
            sender.0.room.add_permits(1);
        }
    }
}

/// The receiving half.
pub struct Receiver<T>(Arc<Shared<T>>);

impl<T> fmt::Debug for Receiver<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Receiver").finish_non_exhaustive()
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        // Senders waiting for room fail, later sends fail; what is queued is
        // dropped with the last handle.
        self.0.room.close();
    }
}

impl<T> Receiver<T> {
    /// The next value, or `None` once every sender is gone and the channel is empty.
    pub async fn recv(&mut self) -> Option<T> {
        loop {
            if let Some(value) = self.0.pop() {
                return Some(value);
            }
            if self.0.senders.load(Ordering::Acquire) == 0 {
                // A value queued before the last sender went away is still taken.
                return self.0.pop();
            }
            self.0.ready.notified().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn values_arrive_in_order_and_room_comes_back() {
        let (tx, mut rx) = channel::<u32>(2);
        tx.send(1).await.unwrap();
        tx.try_send(2).ok().unwrap();
        assert!(matches!(tx.try_send(3), Err(error::TrySendError::Full(3))));
        assert_eq!(tx.capacity(), 0);
        assert_eq!(rx.recv().await, Some(1));
        assert_eq!(tx.capacity(), 1);
        tx.try_send(3).ok().unwrap();
        assert_eq!(rx.recv().await, Some(2));
        assert_eq!(rx.recv().await, Some(3));
        drop(tx);
        assert_eq!(rx.recv().await, None);
    }

    #[tokio::test]
    async fn permits_hold_room_and_give_it_back_unused() {
        let (tx, mut rx) = channel::<u32>(1);
        let permit = tx.reserve().await.unwrap();
        assert_eq!(tx.capacity(), 0);
        drop(permit);
        assert_eq!(tx.capacity(), 1);
        let owned = tx.clone().reserve_owned().await.unwrap();
        assert!(matches!(tx.try_send(9), Err(error::TrySendError::Full(9))));
        owned.send(7);
        assert_eq!(rx.recv().await, Some(7));
        tx.reserve().await.unwrap().send(8);
        assert_eq!(rx.recv().await, Some(8));
    }

    #[tokio::test]
    async fn a_waiting_receiver_wakes_for_a_value_and_for_the_last_sender() {
        let (tx, mut rx) = channel::<u32>(1);
        let tx2 = tx.clone();
        let waiter = tokio::spawn(async move { (rx.recv().await, rx.recv().await, rx) });
        tokio::task::yield_now().await;
        tx.send(5).await.unwrap();
        drop(tx);
        drop(tx2);
        let (first, second, _rx) = waiter.await.unwrap();
        assert_eq!((first, second), (Some(5), None));
    }

    #[tokio::test]
    async fn senders_fail_once_the_receiver_is_gone() {
        let (tx, rx) = channel::<u32>(1);
        tx.send(1).await.unwrap();
        let blocked = {
            let tx = tx.clone();
            tokio::spawn(async move { tx.send(2).await.map_err(|e| e.0) })
        };
        tokio::task::yield_now().await;
        drop(rx);
        assert_eq!(blocked.await.unwrap(), Err(2));
        assert!(matches!(tx.try_send(3), Err(error::TrySendError::Closed(3))));
        assert!(tx.reserve().await.is_err());
    }

    #[tokio::test]
    async fn a_cancelled_receive_loses_nothing() {
        let (tx, mut rx) = channel::<u32>(4);
        // Cancelled while waiting: the next send still wakes the next receive.
        assert!(
            tokio::time::timeout(std::time::Duration::ZERO, rx.recv())
                .await
                .is_err()
        );
        tx.send(4).await.unwrap();
        assert_eq!(rx.recv().await, Some(4));
    }
}
