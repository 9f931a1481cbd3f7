//! One copy of each loaded entity (a room, a document): every caller gets the same
//! `Arc<Mutex<T>>` while anyone holds it, so all changes to an entity go through
//! one lock.
//! Recently used entities stay loaded (a moka cache holds them); the weak index
//! makes sure an entity evicted from the cache but still in use is never loaded twice.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use super::cache::{Cache, CacheSpec};
use crate::util::Unpoisoned;

/// A loaded entity behind its lock.
pub type Loaded<T> = Arc<tokio::sync::Mutex<T>>;

/// Loaded entities by id.
pub struct Registry<T> {
    loaded: Mutex<HashMap<String, Weak<tokio::sync::Mutex<T>>>>,
    /// Entities kept loaded, with their size in bytes when loaded.
    hot: Cache<String, (Loaded<T>, usize)>,
    weigh: fn(&T) -> usize,
}

impl<T> std::fmt::Debug for Registry<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").finish_non_exhaustive()
    }
}

impl<T: Send + Sync + 'static> Registry<T> {
    /// A registry keeping unused entities loaded for `idle`, up to `bytes` bytes
    /// of them as `weigh` measures each when it is loaded (an entity that grows
    /// afterwards keeps its first weight until it is loaded again).
    pub fn new(name: &str, bytes: u64, idle: Duration, weigh: fn(&T) -> usize) -> Self {
        Self {
            loaded: Mutex::new(HashMap::new()),
            hot: CacheSpec::new(bytes, idle)
                .build_weighed(name, |id: &String, v: &(Loaded<T>, usize)| id.len() + v.1),
            weigh,
        }
    }

    /// The loaded entity, or `load()`'s (`None`: no such entity).
    pub async fn get_or_load<E>(
        &self,
        id: &str,
        load: impl FnOnce() -> Result<Option<T>, E>,
    ) -> Result<Option<Loaded<T>>, E> {
        let weight;
        let handle = {
            let mut loaded = self.loaded.locked();
            if let Some(h) = loaded.get(id).and_then(Weak::upgrade) {
                return Ok(Some(h));
            }
            let Some(value) = load()? else {
                return Ok(None);
            };
            weight = (self.weigh)(&value);
            let handle = Arc::new(tokio::sync::Mutex::new(value));
            loaded.retain(|_, w| w.strong_count() > 0);
            loaded.insert(id.to_owned(), Arc::downgrade(&handle));
            handle
        };
        // Kept loaded while recently used; the weak index already makes this the
        // one copy.
        self.hot
            .insert(id.to_owned(), (handle.clone(), weight))
            .await;
        Ok(Some(handle))
    }

    /// Drops an entity (its in-memory copy is stale): the next caller loads it anew.
    pub async fn forget(&self, id: &str) {
        self.loaded.locked().remove(id);
        self.hot.invalidate(id).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_copy_while_in_use() {
        let r: Registry<u32> = Registry::new("t", 1 << 20, Duration::from_secs(60), |_| 4);
        let a = r
            .get_or_load::<()>("x", || Ok(Some(1)))
            .await
            .unwrap()
            .unwrap();
        let b = r
            .get_or_load::<()>("x", || panic!("loaded twice"))
            .await
            .unwrap()
            .unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        assert!(
            r.get_or_load::<()>("y", || Ok(None))
                .await
                .unwrap()
                .is_none()
        );
        r.forget("x").await;
        drop((a, b));
        let c = r
            .get_or_load::<()>("x", || Ok(Some(2)))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(*c.lock().await, 2);
    }
}
