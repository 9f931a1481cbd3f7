//! Offset logs: append-only streams of entries numbered 1, 2, 3, ... per stream (a
//! room's messages, a user's notifications). A client's resume position in a stream
//! is an offset together with the stream's [`Epoch`], its identity: a stream that is
//! recreated (or restored from elsewhere) gets a new epoch, so an offset is never
//! taken for a position in another incarnation of the stream.
//!
//! [`OffsetLog`] is what services need from such a log; its signatures name no
//! storage engine, so a cluster can put a replicated log behind it. [`RedbLog`] is
//! the implementation on the node's embedded database.

use std::sync::{Arc, Mutex};

use redb::{ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};

use super::{Store, StoreError, Writer};
use crate::util::Unpoisoned;

/// The identity of one incarnation of a stream. A resume position is an offset and
/// the epoch it was read in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Epoch(pub u64);

/// Where a reader is in a stream: the last offset it has, in the stream's epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Position {
    /// The last offset the reader has (0: none).
    pub offset: u64,
    /// The stream's epoch that offset belongs to.
    pub epoch: Epoch,
}

/// One entry of a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Its offset (1, 2, ...).
    pub offset: u64,
    /// Its bytes, as the service encoded them.
    pub data: Vec<u8>,
}

/// A failed append.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AppendError {
    /// The stream's last offset is not the one the writer expected: someone else
    /// appended meanwhile. Nothing was appended.
    #[error("the stream moved: expected last offset {expected}, found {actual}")]
    Conflict {
        /// The last offset the writer expected.
        expected: u64,
        /// The stream's last offset.
        actual: u64,
    },
    /// The entries would take the stream past the largest offset.
    #[error("the stream is full")]
    Full,
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Append-only streams of entries numbered by offset.
pub trait OffsetLog: Send + Sync + std::fmt::Debug {
    /// Appends `entries` to `stream` if its last offset is `expected_last`, and
    /// returns the new last offset once they are durable. The first entry gets
    /// `expected_last + 1`.
    fn append(
        &self,
        stream: &str,
        expected_last: u64,
        entries: Vec<Vec<u8>>,
    ) -> impl Future<Output = Result<u64, AppendError>> + Send;

    /// The entries `from..=to` of `stream`, oldest first, at most `max` of them (a
    /// page: read the rest from the offset after the last one returned).
    fn read(
        &self,
        stream: &str,
        from: u64,
        to: u64,
        max: usize,
    ) -> impl Future<Output = Result<Vec<Entry>, StoreError>> + Send;

    /// The offset of the last entry of `stream` (0: empty).
    fn last_offset(&self, stream: &str) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// The epoch of `stream`, created with the stream and kept with it.
    fn epoch(&self, stream: &str) -> impl Future<Output = Result<Epoch, StoreError>> + Send;
}

type EntryTable = TableDefinition<'static, (&'static str, u64), &'static [u8]>;
type EpochTable = TableDefinition<'static, &'static str, u64>;

/// An [`OffsetLog`] in two redb tables: the entries keyed by (stream, offset), and
/// each stream's epoch.
#[derive(Clone)]
pub struct RedbLog {
    store: Store,
    writer: Writer,
    entries: EntryTable,
    epochs: EpochTable,
}

impl std::fmt::Debug for RedbLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbLog")
            .field("entries", &self.entries.to_string())
            .finish_non_exhaustive()
    }
}

fn new_epoch() -> u64 {
    u64::from_str_radix(&crate::util::random_hex(8), 16).expect("16 hex digits")
}

impl RedbLog {
    /// The log whose entries are in the table `entries` and epochs in `epochs`,
    /// creating both.
    pub fn open(
        store: &Store,
        writer: &Writer,
        entries: &'static str,
        epochs: &'static str,
    ) -> Result<Self, StoreError> {
        let log = Self {
            store: store.clone(),
            writer: writer.clone(),
            entries: TableDefinition::new(entries),
            epochs: TableDefinition::new(epochs),
        };
        let mut txn = store.db().begin_write()?;
        txn.set_quick_repair(true);
        txn.open_table(log.entries)?;
        txn.open_table(log.epochs)?;
        txn.commit()?;
        Ok(log)
    }

    /// The entries table, for a service that keeps per-entry state in it (in
    /// transactions of its own).
    pub fn entries_table(&self) -> TableDefinition<'static, (&'static str, u64), &'static [u8]> {
        self.entries
    }

    /// [`OffsetLog::append`] inside a write transaction the caller commits, so that
    /// a service can change its own tables atomically with the append.
    pub fn append_in(
        &self,
        txn: &WriteTransaction,
        stream: &str,
        expected_last: u64,
        entries: &[Vec<u8>],
    ) -> Result<u64, AppendError> {
        let mut table = txn.open_table(self.entries).map_err(StoreError::from)?;
        let actual = match table
            .range((stream, 0)..=(stream, u64::MAX))
            .map_err(StoreError::from)?
            .next_back()
        {
            Some(entry) => entry.map_err(StoreError::from)?.0.value().1,
            None => 0,
        };
        if actual != expected_last {
            return Err(AppendError::Conflict {
                expected: expected_last,
                actual,
            });
        }
        let last = u64::try_from(entries.len())
            .ok()
            .and_then(|n| expected_last.checked_add(n))
            .ok_or(AppendError::Full)?;
        for (offset, data) in (expected_last + 1..=last).zip(entries) {
            table
                .insert((stream, offset), data.as_slice())
                .map_err(StoreError::from)?;
        }
        drop(table);
        let mut epochs = txn.open_table(self.epochs).map_err(StoreError::from)?;
        if epochs.get(stream).map_err(StoreError::from)?.is_none() {
            epochs
                .insert(stream, new_epoch())
                .map_err(StoreError::from)?;
        }
        Ok(last)
    }

    /// Drops the entries of `stream` before `keep_from` (a stream that keeps only
    /// its recent history), inside the caller's write transaction. The last entry
    /// is always kept, so the stream's last offset never moves back.
    pub fn trim_in(
        &self,
        txn: &WriteTransaction,
        stream: &str,
        keep_from: u64,
    ) -> Result<(), StoreError> {
        let mut table = txn.open_table(self.entries)?;
        let last = match table.range((stream, 0)..=(stream, u64::MAX))?.next_back() {
            Some(entry) => entry?.0.value().1,
            None => return Ok(()),
        };
        let end = keep_from.min(last);
        table.retain_in((stream, 0)..(stream, end), |_, _| false)?;
        Ok(())
    }

    fn read_now(
        &self,
        stream: &str,
        from: u64,
        to: u64,
        max: usize,
    ) -> Result<Vec<Entry>, StoreError> {
        let mut out = Vec::new();
        if from > to || max == 0 {
            return Ok(out);
        }
        let txn = self.store.db().begin_read()?;
        let table = txn.open_table(self.entries)?;
        for entry in table.range((stream, from)..=(stream, to))?.take(max) {
            let (key, value) = entry?;
            out.push(Entry {
                offset: key.value().1,
                data: value.value().to_vec(),
            });
        }
        Ok(out)
    }

    /// The offset of the oldest entry `stream` still keeps (0: empty). Entries
    /// before it were trimmed; offsets are never reused.
    pub fn first_offset(&self, stream: &str) -> Result<u64, StoreError> {
        let txn = self.store.db().begin_read()?;
        let table = txn.open_table(self.entries)?;
        Ok(
            match table.range((stream, 0)..=(stream, u64::MAX))?.next() {
                Some(entry) => entry?.0.value().1,
                None => 0,
            },
        )
    }

    /// The last offset of `stream` as the caller's write transaction sees it (0:
    /// no entry).
    pub fn last_offset_in(&self, txn: &WriteTransaction, stream: &str) -> Result<u64, StoreError> {
        let table = txn.open_table(self.entries)?;
        let last = match table.range((stream, 0)..=(stream, u64::MAX))?.next_back() {
            Some(entry) => entry?.0.value().1,
            None => 0,
        };
        Ok(last)
    }

    /// The last offset of `stream` as the caller's read transaction sees it (0: no
    /// entry).
    pub fn last_offset_in_read(
        &self,
        txn: &redb::ReadTransaction,
        stream: &str,
    ) -> Result<u64, StoreError> {
        let table = txn.open_table(self.entries)?;
        let last = match table.range((stream, 0)..=(stream, u64::MAX))?.next_back() {
            Some(entry) => entry?.0.value().1,
            None => 0,
        };
        Ok(last)
    }

    /// Removes every entry of `stream` before `end`, at most `max` of them, inside
    /// the caller's write transaction, and returns how many it removed. Unlike
    /// [`trim_in`](Self::trim_in) it may remove the last entry: for a stream that
    /// is going away.
    pub fn remove_in(
        &self,
        txn: &WriteTransaction,
        stream: &str,
        end: u64,
        max: usize,
    ) -> Result<usize, StoreError> {
        let mut table = txn.open_table(self.entries)?;
        let mut offsets = Vec::new();
        for entry in table.range((stream, 0)..(stream, end))?.take(max) {
            offsets.push(entry?.0.value().1);
        }
        for offset in &offsets {
            table.remove((stream, *offset))?;
        }
        Ok(offsets.len())
    }

    fn last_now(&self, stream: &str) -> Result<u64, StoreError> {
        let txn = self.store.db().begin_read()?;
        let table = txn.open_table(self.entries)?;
        Ok(
            match table.range((stream, 0)..=(stream, u64::MAX))?.next_back() {
                Some(entry) => entry?.0.value().1,
                None => 0,
            },
        )
    }

    async fn epoch_now(&self, stream: &str) -> Result<Epoch, StoreError> {
        {
            let txn = self.store.db().begin_read()?;
            if let Some(e) = txn.open_table(self.epochs)?.get(stream)? {
                return Ok(Epoch(e.value()));
            }
        }
        // A stream from before epochs were kept: give it one now.
        let found = Arc::new(Mutex::new(0));
        let (epochs, name, out) = (self.epochs, stream.to_owned(), found.clone());
        self.writer
            .write(move |txn| {
                let mut table = txn.open_table(epochs)?;
                let existing = table.get(name.as_str())?.map(|v| v.value());
                let epoch = match existing {
                    Some(e) => e,
                    None => {
                        let e = new_epoch();
                        table.insert(name.as_str(), e)?;
                        e
                    }
                };
                *out.locked() = epoch;
                Ok(())
            })
            .await?;
        let epoch = *found.locked();
        Ok(Epoch(epoch))
    }
}

impl OffsetLog for RedbLog {
    fn append(
        &self,
        stream: &str,
        expected_last: u64,
        entries: Vec<Vec<u8>>,
    ) -> impl Future<Output = Result<u64, AppendError>> + Send {
        let (log, name) = (self.clone(), stream.to_owned());
        async move {
            let outcome = Arc::new(Mutex::new(None));
            let out = outcome.clone();
            let writer = log.writer.clone();
            writer
                .write(move |txn| {
                    // A refused append writes nothing; its transaction may hold
                    // others' writes, so only a storage failure fails it.
                    let r = log.append_in(txn, &name, expected_last, &entries);
                    if let Err(AppendError::Store(e)) = r {
                        return Err(e);
                    }
                    *out.locked() = Some(r);
                    Ok(())
                })
                .await?;
            let r = outcome.locked().take();
            r.unwrap_or_else(|| {
                Err(AppendError::Store(StoreError::Write(
                    "the append did not run".into(),
                )))
            })
        }
    }

    fn read(
        &self,
        stream: &str,
        from: u64,
        to: u64,
        max: usize,
    ) -> impl Future<Output = Result<Vec<Entry>, StoreError>> + Send {
        std::future::ready(self.read_now(stream, from, to, max))
    }

    fn last_offset(&self, stream: &str) -> impl Future<Output = Result<u64, StoreError>> + Send {
        std::future::ready(self.last_now(stream))
    }

    fn epoch(&self, stream: &str) -> impl Future<Output = Result<Epoch, StoreError>> + Send {
        let (log, stream) = (self.clone(), stream.to_owned());
        async move { log.epoch_now(&stream).await }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log() -> (tempfile::TempDir, RedbLog) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (writer, _thread) = Writer::spawn(store.db().clone(), None);
        let log = RedbLog::open(&store, &writer, "t_entries", "t_epochs").unwrap();
        (dir, log)
    }

    #[tokio::test]
    async fn appends_at_the_expected_offset_only() {
        let (_dir, log) = log();
        assert_eq!(log.last_offset("s").await.unwrap(), 0);
        assert_eq!(
            log.append("s", 0, vec![b"a".to_vec(), b"b".to_vec()])
                .await
                .unwrap(),
            2
        );
        match log.append("s", 1, vec![b"x".to_vec()]).await {
            Err(AppendError::Conflict {
                expected: 1,
                actual: 2,
            }) => {}
            other => panic!("{other:?}"),
        }
        assert_eq!(log.append("s", 2, vec![b"c".to_vec()]).await.unwrap(), 3);
        assert_eq!(
            log.append("other", 0, vec![b"z".to_vec()]).await.unwrap(),
            1
        );
        assert_eq!(log.last_offset("s").await.unwrap(), 3);
        let all = log.read("s", 1, u64::MAX, 100).await.unwrap();
        let data: Vec<&[u8]> = all.iter().map(|e| e.data.as_slice()).collect();
        assert_eq!(data, [b"a", b"b", b"c"]);
        assert_eq!(all[2].offset, 3);
    }

    #[tokio::test]
    async fn reads_are_paged_and_clamped() {
        let (_dir, log) = log();
        let entries = (1..=10u8).map(|i| vec![i]).collect();
        log.append("s", 0, entries).await.unwrap();
        let page = log.read("s", 3, 9, 4).await.unwrap();
        assert_eq!(
            page.iter().map(|e| e.offset).collect::<Vec<_>>(),
            [3, 4, 5, 6]
        );
        assert!(log.read("s", 11, u64::MAX, 10).await.unwrap().is_empty());
        assert!(log.read("s", 5, 4, 10).await.unwrap().is_empty());
        assert!(log.read("s", 1, 10, 0).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn an_epoch_is_kept_per_stream() {
        let (_dir, log) = log();
        log.append("a", 0, vec![vec![1]]).await.unwrap();
        let a = log.epoch("a").await.unwrap();
        assert_eq!(log.epoch("a").await.unwrap(), a, "stable");
        // A stream that has none yet gets one, kept from then on.
        let b = log.epoch("b").await.unwrap();
        assert_eq!(log.epoch("b").await.unwrap(), b);
        assert_ne!(a, b);
    }

    #[tokio::test]
    async fn trimming_keeps_the_recent_entries_and_the_last_offset() {
        let (_dir, log) = log();
        log.append("s", 0, (1..=5u8).map(|i| vec![i]).collect())
            .await
            .unwrap();
        let trim = |keep_from| {
            let txn = log.store.db().begin_write().unwrap();
            log.trim_in(&txn, "s", keep_from).unwrap();
            txn.commit().unwrap();
        };
        trim(4);
        let left = log.read("s", 1, u64::MAX, 100).await.unwrap();
        assert_eq!(left.iter().map(|e| e.offset).collect::<Vec<_>>(), [4, 5]);
        trim(u64::MAX);
        assert_eq!(log.last_offset("s").await.unwrap(), 5, "the last one stays");
        assert_eq!(log.append("s", 5, vec![vec![6]]).await.unwrap(), 6);
    }

    #[tokio::test]
    async fn a_full_stream_refuses_more() {
        let (_dir, log) = log();
        let store = log.store.clone();
        let txn = store.db().begin_write().unwrap();
        txn.open_table(log.entries)
            .unwrap()
            .insert(("s", u64::MAX), &b"last"[..])
            .unwrap();
        txn.commit().unwrap();
        assert!(matches!(
            log.append("s", u64::MAX, vec![vec![1]]).await,
            Err(AppendError::Full)
        ));
    }
}
