//! moka caches for hot reads. A cache is never the only copy of anything that must
//! survive a restart: services fill it from redb and update both on writes.

use std::hash::Hash;
use std::time::Duration;

pub use moka::future::Cache;

/// What moka keeps per entry besides the key and value (its node, the access-order
/// queue entries, the hash table slot): about this many bytes, counted in every
/// weighed entry so that many small entries are not underestimated.
pub const ENTRY_OVERHEAD: usize = 128;

/// How a service sizes one of its caches.
#[derive(Debug, Clone, Copy)]
pub struct CacheSpec {
    /// Entries kept at most, or bytes with [`build_weighed`](Self::build_weighed).
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

    /// Builds a cache bounded in bytes: `capacity` is the total of `weigh` over
    /// the entries (each plus [`ENTRY_OVERHEAD`]); the least recently used go
    /// first when it is exceeded.
    pub fn build_weighed<K, V>(
        self,
        name: &str,
        weigh: impl Fn(&K, &V) -> usize + Send + Sync + 'static,
    ) -> Cache<K, V>
    where
        K: Hash + Eq + Send + Sync + 'static,
        V: Clone + Send + Sync + 'static,
    {
        Cache::builder()
            .name(name)
            .max_capacity(self.capacity)
            // moka weighs in u32; an entry over 4 GiB counts as 4 GiB.
            .weigher(move |k, v| {
                u32::try_from(weigh(k, v).saturating_add(ENTRY_OVERHEAD)).unwrap_or(u32::MAX)
            })
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

    #[tokio::test]
    async fn a_weighed_cache_is_bounded_in_bytes() {
        // 64 KiB of 1 KiB values (plus the per-entry overhead): about 56 entries.
        let cache: Cache<u32, Vec<u8>> = CacheSpec::new(64 * 1024, Duration::from_secs(60))
            .build_weighed("t", |_, v: &Vec<u8>| v.len());
        for i in 0..1000 {
            cache.insert(i, vec![0; 1024]).await;
        }
        cache.run_pending_tasks().await;
        assert!(
            cache.weighted_size() <= 64 * 1024,
            "{}",
            cache.weighted_size()
        );
        assert!(cache.entry_count() <= 64, "{}", cache.entry_count());
    }
}
