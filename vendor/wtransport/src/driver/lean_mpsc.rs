//! tokio's bounded `mpsc` channel, with every value boxed in the channel.
//!
//! tokio allocates a channel's first block of 32 slots when the channel is made,
//! whatever its capacity. The driver makes eight channels per connection, for
//! streams, sessions, settings and datagrams of 30 to 100 bytes each: about 14 KiB
//! per connection for queues that are empty nearly all the time. Boxed, a slot is
//! one pointer. The driver uses this module under the name `mpsc`, with the part of
//! tokio's interface it needs.

use std::fmt;
use tokio::sync::mpsc as tokio_mpsc;

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

/// A new channel of `capacity` values.
pub fn channel<T>(capacity: usize) -> (Sender<T>, Receiver<T>) {
    let (sender, receiver) = tokio_mpsc::channel(capacity);
    (Sender(sender), Receiver(receiver))
}

/// The sending half.
pub struct Sender<T>(tokio_mpsc::Sender<Box<T>>);

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<T> fmt::Debug for Sender<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl<T> Sender<T> {
    /// Sends `value`, waiting for room.
    pub async fn send(&self, value: T) -> Result<(), error::SendError<T>> {
        self.0
            .send(Box::new(value))
            .await
            .map_err(|e| error::SendError(*e.0))
    }

    /// Sends `value` if there is room.
    pub fn try_send(&self, value: T) -> Result<(), error::TrySendError<T>> {
        self.0.try_send(Box::new(value)).map_err(|e| match e {
            tokio_mpsc::error::TrySendError::Full(value) => error::TrySendError::Full(*value),
            tokio_mpsc::error::TrySendError::Closed(value) => error::TrySendError::Closed(*value),
        })
    }

    /// Waits for room for one value.
    pub async fn reserve(&self) -> Result<Permit<'_, T>, error::SendError<()>> {
        self.0
            .reserve()
            .await
            .map(Permit)
            .map_err(|_| error::SendError(()))
    }

    /// Waits for room for one value, holding a sender of its own.
    pub async fn reserve_owned(self) -> Result<OwnedPermit<T>, error::SendError<()>> {
        self.0
            .reserve_owned()
            .await
            .map(OwnedPermit)
            .map_err(|_| error::SendError(()))
    }

    /// Room left.
    pub fn capacity(&self) -> usize {
        self.0.capacity()
    }
}

/// Room for one value, from [`Sender::reserve`].
pub struct Permit<'a, T>(tokio_mpsc::Permit<'a, Box<T>>);

impl<T> Permit<'_, T> {
    /// Sends `value` in the room held.
    pub fn send(self, value: T) {
        self.0.send(Box::new(value));
    }
}

/// Room for one value, from [`Sender::reserve_owned`].
pub struct OwnedPermit<T>(tokio_mpsc::OwnedPermit<Box<T>>);

impl<T> OwnedPermit<T> {
    /// Sends `value` in the room held.
    pub fn send(self, value: T) {
        self.0.send(Box::new(value));
    }
}

/// The receiving half.
pub struct Receiver<T>(tokio_mpsc::Receiver<Box<T>>);

impl<T> fmt::Debug for Receiver<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl<T> Receiver<T> {
    /// The next value, or `None` once every sender is gone and the channel is empty.
    pub async fn recv(&mut self) -> Option<T> {
        self.0.recv().await.map(|value| *value)
    }
}
