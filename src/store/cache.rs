//! moka caches for hot reads. A cache is never the only copy of anything that must
//! survive a restart: services fill it from redb and update both on writes.

use std::hash::Hash;
use std::time::Duration;

pub use moka::future::Cache;

/// How a service sizes one of its caches.
#[derive(Debug, Clone, Copy)]
pub struct CacheSpec {
    /// Entries kept at most.
    pub capacity: u64,
    /// An entry not read for this long is dropped.
    pub time_to_idle: Duration,
}

impl CacheSpec {
    /// A cache of `capacity` entries that forgets entries idle for `time_to_idle`.
    pub const fn new(capacity: u64, time_to_idle: Duration) -> Self {
        Self {
            capacity,
            time_to_idle,
        }
    }

    /// Builds the cache. `name` shows in moka's debug output.
    pub fn build<K, V>(self, name: &str) -> Cache<K, V>
    where
        K: Hash + Eq + Send + Sync + 'static,
        V: Clone + Send + Sync + 'static,
    {
        Cache::builder()
            .name(name)
            .max_capacity(self.capacity)
            .time_to_idle(self.time_to_idle)
            .build()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reads_through_and_is_bounded() {
        let cache: Cache<u32, u64> = CacheSpec::new(10, Duration::from_secs(60)).build("t");
        let v = cache.get_with(1, async { 41 + 1 }).await;
        assert_eq!(v, 42);
        assert_eq!(cache.get(&1).await, Some(42));
        for i in 0..100 {
            cache.insert(i, 0).await;
        }
        cache.run_pending_tasks().await;
        assert!(cache.entry_count() <= 10);
    }
}
