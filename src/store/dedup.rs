//! Idempotency records: "the write with this key was already done, and this was
//! its answer". A service checks and records a key in the same transaction as
//! the write it guards, so a retried write (after a lost acknowledgement, a
//! reconnect or a restart) finds the record exactly when the first one committed.
//!
//! Records are bounded: [`Dedup::prune_in`] drops those older than a window and
//! the oldest beyond a count. Two tables: key → (time, answer), and (time, key)
//! → () to find the oldest.

use std::time::Duration;

use redb::{
    ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition, WriteTransaction,
};

use super::{Store, StoreError};

type KeyTable = TableDefinition<'static, &'static str, (u64, &'static [u8])>;
type AgeTable = TableDefinition<'static, (u64, &'static str), ()>;

/// Records removed by one prune at most, so that a prune is one short write.
pub const PRUNE_BATCH: usize = 10_000;

/// One service's idempotency records.
#[derive(Clone)]
pub struct Dedup {
    keys: KeyTable,
    ages: AgeTable,
}

impl std::fmt::Debug for Dedup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dedup")
            .field("keys", &self.keys.to_string())
            .finish_non_exhaustive()
    }
}

/// How long and how many idempotency records are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Records older than this are dropped: a retry after it is a new write.
    pub window: Duration,
    /// At most this many records; the oldest go first.
    pub max_keys: u64,
}

impl Dedup {
    /// The records in tables `name` and `name_age`, creating both.
    pub fn open(store: &Store, keys: &'static str, ages: &'static str) -> Result<Self, StoreError> {
        let d = Self {
            keys: TableDefinition::new(keys),
            ages: TableDefinition::new(ages),
        };
        let mut txn = store.db().begin_write()?;
        txn.set_quick_repair(true);
        txn.open_table(d.keys)?;
        txn.open_table(d.ages)?;
        txn.commit()?;
        Ok(d)
    }

    /// The answer recorded for `key`, inside the caller's write transaction.
    pub fn get_in(&self, txn: &WriteTransaction, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(txn
            .open_table(self.keys)?
            .get(key)?
            .map(|v| v.value().1.to_vec()))
    }

    /// The answer recorded for `key` (outside any write).
    pub fn get(&self, store: &Store, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let txn = store.db().begin_read()?;
        Ok(txn
            .open_table(self.keys)?
            .get(key)?
            .map(|v| v.value().1.to_vec()))
    }

    /// Records `answer` for `key` at `now_ms`, inside the caller's write
    /// transaction (the one that does what the key guards).
    pub fn put_in(
        &self,
        txn: &WriteTransaction,
        key: &str,
        now_ms: u64,
        answer: &[u8],
    ) -> Result<(), StoreError> {
        let old = txn
            .open_table(self.keys)?
            .insert(key, (now_ms, answer))?
            .map(|v| v.value().0);
        let mut ages = txn.open_table(self.ages)?;
        if let Some(at) = old {
            ages.remove((at, key))?;
        }
        ages.insert((now_ms, key), ())?;
        Ok(())
    }

    /// Drops the records older than `keep.window` and the oldest beyond
    /// `keep.max_keys`, at most [`PRUNE_BATCH`] of them; returns how many.
    pub fn prune_in(
        &self,
        txn: &WriteTransaction,
        now_ms: u64,
        keep: Retention,
    ) -> Result<usize, StoreError> {
        let cutoff =
            now_ms.saturating_sub(u64::try_from(keep.window.as_millis()).unwrap_or(u64::MAX));
        let mut ages = txn.open_table(self.ages)?;
        let excess = ages.len()?.saturating_sub(keep.max_keys);
        let mut doomed: Vec<(u64, String)> = Vec::new();
        for entry in ages.iter()? {
            let (k, _) = entry?;
            let (at, key) = k.value();
            let too_many = (doomed.len() as u64) < excess;
            if !(at < cutoff || too_many) || doomed.len() >= PRUNE_BATCH {
                break;
            }
            doomed.push((at, key.to_owned()));
        }
        let mut keys = txn.open_table(self.keys)?;
        for (at, key) in &doomed {
            ages.remove((*at, key.as_str()))?;
            keys.remove(key.as_str())?;
        }
        Ok(doomed.len())
    }

    /// How many records are kept.
    pub fn len(&self, store: &Store) -> Result<u64, StoreError> {
        let txn = store.db().begin_read()?;
        Ok(txn.open_table(self.keys)?.len()?)
    }
}

/// An unambiguous record key from parts (each may hold any character).
pub fn key(parts: &[&str]) -> String {
    let mut k = String::new();
    for p in parts {
        k.push_str(&p.len().to_string());
        k.push(':');
        k.push_str(p);
    }
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_found_replaced_and_pruned_by_age_and_count() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let d = Dedup::open(&store, "t_keys", "t_ages").unwrap();
        let db = store.db();
        let txn = db.begin_write().unwrap();
        for i in 0..10u64 {
            d.put_in(
                &txn,
                &key(&["a", &i.to_string()]),
                1000 + i,
                &i.to_le_bytes(),
            )
            .unwrap();
        }
        assert_eq!(
            d.get_in(&txn, &key(&["a", "3"])).unwrap(),
            Some(3u64.to_le_bytes().to_vec())
        );
        txn.commit().unwrap();
        assert_eq!(d.len(&store).unwrap(), 10);
        assert_eq!(d.get(&store, &key(&["a", "9"])).unwrap().unwrap().len(), 8);
        assert!(d.get(&store, &key(&["a:", "9"])).unwrap().is_none());

        let txn = db.begin_write().unwrap();
        let keep = Retention {
            window: Duration::from_millis(5),
            max_keys: 100,
        };
        // Now 1010: records stamped before 1005 go.
        assert_eq!(d.prune_in(&txn, 1010, keep).unwrap(), 5);
        let keep = Retention {
            window: Duration::from_secs(60),
            max_keys: 2,
        };
        assert_eq!(d.prune_in(&txn, 1010, keep).unwrap(), 3);
        txn.commit().unwrap();
        assert_eq!(d.len(&store).unwrap(), 2);
        assert!(d.get(&store, &key(&["a", "7"])).unwrap().is_none());
        assert!(d.get(&store, &key(&["a", "8"])).unwrap().is_some());
    }

    #[test]
    fn keys_do_not_collide() {
        assert_ne!(key(&["a:b", "c"]), key(&["a", "b:c"]));
        assert_ne!(key(&["ab", ""]), key(&["a", "b"]));
    }
}
