//! Counting what sessions hold: sessions per key (user, source address) and bytes
//! waiting in a queue. Pure bookkeeping, no I/O.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::Notify;

use crate::util::Unpoisoned;

/// How many sessions each key (a user, an IP address) has open.
#[derive(Debug)]
pub struct Tally<K> {
    counts: Mutex<HashMap<K, usize>>,
}

impl<K> Default for Tally<K> {
    fn default() -> Self {
        Self {
            counts: Mutex::new(HashMap::new()),
        }
    }
}

impl<K: Hash + Eq + Clone> Tally<K> {
    /// Counts one more session of `key` if it has fewer than `max`; the session
    /// counts until the guard is dropped. `None` when `key` is at `max` already.
    pub fn enter(&self, key: K, max: usize) -> Option<TallyGuard<'_, K>> {
        let mut counts = self.counts.locked();
        let n = counts.get(&key).copied().unwrap_or(0);
        if n >= max {
            return None;
        }
        counts.insert(key.clone(), n + 1);
        Some(TallyGuard { tally: self, key })
    }

    /// Sessions of `key` now.
    pub fn count(&self, key: &K) -> usize {
        let counts = self.counts.locked();
        counts.get(key).copied().unwrap_or(0)
    }

    /// Keys with at least one session (entries are removed at zero, so the map
    /// never holds more keys than there are sessions).
    pub fn keys(&self) -> usize {
        self.counts.locked().len()
    }
}

/// One session counted in a [`Tally`].
#[derive(Debug)]
pub struct TallyGuard<'a, K: Hash + Eq> {
    tally: &'a Tally<K>,
    key: K,
}

impl<K: Hash + Eq> Drop for TallyGuard<'_, K> {
    fn drop(&mut self) {
        let mut counts = self.tally.counts.locked();
        if let Some(n) = counts.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.key);
            }
        }
    }
}

/// Bytes waiting in a queue, bounded by a capacity. An empty budget always takes
/// one item whatever its size, so an item larger than the capacity (up to the
/// frame limit) still goes through, alone.
#[derive(Debug)]
pub struct ByteBudget {
    used: AtomicUsize,
    capacity: usize,
    freed: Notify,
}

impl ByteBudget {
    /// A budget of `capacity` bytes.
    pub fn new(capacity: usize) -> Self {
        Self {
            used: AtomicUsize::new(0),
            capacity,
            freed: Notify::new(),
        }
    }

    /// Takes `n` bytes if they fit now.
    pub fn try_take(&self, n: usize) -> bool {
        let mut used = self.used.load(Ordering::Relaxed);
        loop {
            if used != 0 && used.saturating_add(n) > self.capacity {
                return false;
            }
            match self.used.compare_exchange_weak(
                used,
                used + n,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => return true,
                Err(now) => used = now,
            }
        }
    }

    /// Takes `n` bytes, waiting up to `patience` for them to be released.
    pub async fn take(&self, n: usize, patience: Duration) -> bool {
        tokio::time::timeout(patience, async {
            loop {
                // Registered before the check, so a release in between wakes it.
                let freed = self.freed.notified();
                tokio::pin!(freed);
                freed.as_mut().enable();
                if self.try_take(n) {
                    return;
                }
                freed.await;
            }
        })
        .await
        .is_ok()
    }

    /// Gives back `n` bytes taken before.
    pub fn release(&self, n: usize) {
        if n == 0 {
            return;
        }
        self.used.fetch_sub(n, Ordering::AcqRel);
        self.freed.notify_waiters();
    }

    /// Bytes taken now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }
}
