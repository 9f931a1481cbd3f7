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
        put(
            &mut txn.open_table(self.keys)?,
            &mut txn.open_table(self.ages)?,
            key,
            now_ms,
            answer,
        )
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

/// Records `answer` for `key` at `at` in open tables: a record it replaces takes
/// its age entry along, so that each key has exactly one.
fn put(
    keys: &mut redb::Table<&'static str, (u64, &'static [u8])>,
    ages: &mut redb::Table<(u64, &'static str), ()>,
    key: &str,
    at: u64,
    answer: &[u8],
) -> Result<(), StoreError> {
    let old = keys.insert(key, (at, answer))?.map(|v| v.value().0);
    if let Some(old) = old {
        ages.remove((old, key))?;
    }
    ages.insert((at, key), ())?;
    Ok(())
}

/// An unambiguous record key from parts (each may hold any character).
///
/// Records are kept in key order, and a record whose key falls next to the last
/// one written shares its B-tree leaf: put a part that grows with time (such as
/// a client message id that starts with its creation time) first, and the
/// records of one commit go to one leaf instead of one each.
pub fn key(parts: &[&str]) -> String {
    let mut k = String::new();
    for p in parts {
        k.push_str(&p.len().to_string());
        k.push(':');
        k.push_str(p);
    }
    k
}

/// The parts of a [`key`]; `None` for a string that is not one.
pub fn parts(key: &str) -> Option<Vec<&str>> {
    let mut out = Vec::new();
    let mut rest = key;
    while !rest.is_empty() {
        let (len, tail) = rest.split_once(':')?;
        if len.is_empty() || !len.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let len: usize = len.parse().ok()?;
        out.push(tail.get(..len)?);
        rest = &tail[len..];
    }
    Some(out)
}

/// Copies every record of the tables `from` (keys, ages) into the tables `to`
/// under the key `rekey` makes of its key's parts, then deletes `from`; inside the
/// caller's write transaction (a change of key layout). Returns how many records were
/// copied. A key that is not a [`key`], or that `rekey` leaves alone (`None`), is
/// copied as it is. The records stream from one table to the other: nothing is
/// gathered in memory on the way.
pub fn rekey_in(
    txn: &WriteTransaction,
    from: (&'static str, &'static str),
    to: (&'static str, &'static str),
    rekey: impl Fn(&[&str]) -> Option<String>,
) -> Result<usize, StoreError> {
    let from: (KeyTable, AgeTable) = (TableDefinition::new(from.0), TableDefinition::new(from.1));
    let to: (KeyTable, AgeTable) = (TableDefinition::new(to.0), TableDefinition::new(to.1));
    let mut copied = 0;
    {
        let old = txn.open_table(from.0)?;
        let mut keys = txn.open_table(to.0)?;
        let mut ages = txn.open_table(to.1)?;
        for entry in old.iter()? {
            let (k, v) = entry?;
            let key = parts(k.value())
                .and_then(|p| rekey(&p))
                .unwrap_or_else(|| k.value().to_owned());
            let (at, answer) = v.value();
            put(&mut keys, &mut ages, &key, at, answer)?;
            copied += 1;
        }
    }
    txn.delete_table(from.0)?;
    txn.delete_table(from.1)?;
    Ok(copied)
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

    #[test]
    fn keys_parse_back_into_their_parts() {
        for p in [
            vec!["room", "user", "id"],
            vec!["a:b", "", "12:x"],
            vec!["é😀", "3:"],
            vec![],
        ] {
            assert_eq!(parts(&key(&p)).unwrap(), p);
        }
        for bad in ["x", "3:ab", "a:b", ":", "2:abc", "-1:a", "1"] {
            assert_eq!(parts(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_rekeyed_record_that_replaces_one_leaves_one_age_entry() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (old, new) = (
            Dedup::open(&store, "r_keys", "r_ages").unwrap(),
            Dedup::open(&store, "n_keys", "n_ages").unwrap(),
        );
        let db = store.db();
        let txn = db.begin_write().unwrap();
        old.put_in(&txn, &key(&["room", "ann", "id1"]), 5, b"old")
            .unwrap();
        new.put_in(&txn, &key(&["id1", "room", "ann"]), 100, b"new")
            .unwrap();
        txn.commit().unwrap();
        let txn = db.begin_write().unwrap();
        rekey_id_first(&txn).unwrap();
        txn.commit().unwrap();
        use redb::{ReadableDatabase, ReadableTableMetadata};
        let r = db.begin_read().unwrap();
        let ages: AgeTable = TableDefinition::new("n_ages");
        assert_eq!(r.open_table(ages).unwrap().len().unwrap(), 1);
        assert_eq!(new.len(&store).unwrap(), 1);
    }

    /// Copies `r_keys`/`r_ages`, keyed (room, user, id), to `n_keys`/`n_ages`,
    /// keyed (id, room, user), as the chat store's copy does.
    fn rekey_id_first(txn: &WriteTransaction) -> Result<usize, StoreError> {
        rekey_in(
            txn,
            ("r_keys", "r_ages"),
            ("n_keys", "n_ages"),
            |p| match p {
                [room, user, id] => Some(key(&[id, room, user])),
                _ => None,
            },
        )
    }

    #[test]
    fn rekeying_copies_records_and_their_ages_to_new_tables() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let old = Dedup::open(&store, "r_keys", "r_ages").unwrap();
        let db = store.db();
        let txn = db.begin_write().unwrap();
        old.put_in(&txn, &key(&["room", "ann", "id1"]), 5, b"one")
            .unwrap();
        old.put_in(&txn, &key(&["room", "bob", "id2"]), 7, b"two")
            .unwrap();
        old.put_in(&txn, "not a key", 9, b"odd").unwrap();
        txn.commit().unwrap();

        let txn = db.begin_write().unwrap();
        let copied = rekey_id_first(&txn).unwrap();
        assert_eq!(copied, 3);
        txn.commit().unwrap();
        let new = Dedup::open(&store, "n_keys", "n_ages").unwrap();
        assert_eq!(
            new.get(&store, &key(&["id1", "room", "ann"]))
                .unwrap()
                .unwrap(),
            b"one"
        );
        assert_eq!(
            new.get(&store, &key(&["id2", "room", "bob"]))
                .unwrap()
                .unwrap(),
            b"two"
        );
        assert!(
            new.get(&store, &key(&["room", "ann", "id1"]))
                .unwrap()
                .is_none()
        );
        assert_eq!(new.get(&store, "not a key").unwrap().unwrap(), b"odd");
        assert_eq!(new.len(&store).unwrap(), 3);
        // The old tables are gone (opening them again makes them anew, empty).
        assert_eq!(
            Dedup::open(&store, "r_keys", "r_ages")
                .unwrap()
                .len(&store)
                .unwrap(),
            0
        );
        // Each key has one age entry.
        {
            use redb::{ReadableDatabase, ReadableTableMetadata};
            let r = db.begin_read().unwrap();
            let ages: AgeTable = TableDefinition::new("n_ages");
            assert_eq!(r.open_table(ages).unwrap().len().unwrap(), 3);
        }
        // The ages came along: pruning by age removes the two older records.
        let txn = db.begin_write().unwrap();
        let keep = Retention {
            window: Duration::from_millis(1),
            max_keys: 100,
        };
        assert_eq!(new.prune_in(&txn, 9, keep).unwrap(), 2);
        txn.commit().unwrap();
        assert!(
            new.get(&store, &key(&["id2", "room", "bob"]))
                .unwrap()
                .is_none()
        );
        assert_eq!(new.len(&store).unwrap(), 1);
    }
}
