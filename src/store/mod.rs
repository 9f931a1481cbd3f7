//! The embedded database (redb) and the caches in front of it.
//!
//! redb is the source of truth on a single node. Each service owns its tables; this
//! module opens the file, checks the schema version and hands out the database.

pub mod cache;
pub mod dedup;
pub mod fault;
pub mod offset_log;
pub mod registry;
mod writer;

pub use offset_log::{AppendError, Entry, Epoch, OffsetLog, Position, RedbLog};
pub use writer::{CommitObserver, Hold, Target, Writer, WriterOptions, WriterProbe};

use crate::util::{Unpoisoned, UnpoisonedRw};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use fault::FaultSwitch;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

/// The file name of the database inside the data directory.
pub const DB_FILE: &str = "tutti.redb";

/// The schema version this build writes. Bump it with a migration in [`Store::open`].
pub const SCHEMA_VERSION: u64 = 1;

/// Key/value metadata of the database itself (`schema_version`, `node_id`).
const META: TableDefinition<&str, &str> = TableDefinition::new("meta");

/// Storage errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The data directory could not be created.
    #[error("data directory {path}: {source}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The database was written by a newer Tutti.
    #[error("database schema version {found} is newer than this build's {supported}")]
    TooNew {
        /// The version on disk.
        found: u64,
        /// The version this build knows.
        supported: u64,
    },
    /// Stored data does not decode.
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// A group-committed write failed (the message says why).
    #[error("write failed: {0}")]
    Write(String),
    /// Storage failed (a full or failing disk) or is being reopened after such a
    /// failure; nothing was written. Retrying later may succeed.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    /// redb failed.
    #[error(transparent)]
    Db(#[from] redb::Error),
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self { StoreError::Db(e.into()) }
        }
    )*};
}
from_redb!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

impl StoreError {
    /// Whether the storage failed (disk full, I/O error, a database being
    /// reopened): the operation changed nothing and may be retried later.
    pub fn is_unavailable(&self) -> bool {
        match self {
            StoreError::Unavailable(_) => true,
            StoreError::Db(e) => fault::is_storage_failure(e),
            _ => false,
        }
    }
}

/// The open database. Cloning shares it.
///
/// After a storage failure redb refuses every operation on the `Database` it
/// happened in (`StorageError::PreviousIo`) until it is dropped and opened again;
/// [`Store::reopen`] does that in place, so the handles services keep stay valid.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    /// The database; a stand-in that fails every operation while it is reopened.
    db: RwLock<Arc<Database>>,
    path: PathBuf,
    node_id: String,
    /// Set in tests that inject storage faults.
    faults: Option<FaultSwitch>,
    /// A storage failure has not been recovered from yet.
    unavailable: AtomicBool,
    /// Successful reopens so far.
    reopens: AtomicU64,
    /// One reopen at a time.
    reopening: Mutex<()>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.inner.path)
            .finish_non_exhaustive()
    }
}

/// How long [`Store::reopen`] waits for the failed database's last handles (held
/// only for the length of one read) before it tries anyway.
const RELEASE_WAIT: Duration = Duration::from_secs(2);

/// Creates `dir` (and missing parents) with mode 0700; warns when an existing one
/// is readable by others.
fn private_dir(dir: &Path) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)?;
    warn_if_open(dir)
}

/// Creates `file` empty with mode 0600 if it does not exist; warns when an existing
/// one is readable by others.
fn private_file(file: &Path) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    match options.open(file) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => warn_if_open(file),
        Err(e) => Err(e),
    }
}

/// Logs a warning when group or others may read `path`.
fn warn_if_open(path: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path)?.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                mode = format!("{mode:o}"),
                "readable by other users; chmod it to 0700 (directory) or 0600 (file)"
            );
        }
    }
    Ok(())
}

impl Store {
    /// Opens (or creates) the database in `data_dir` and checks its schema version.
    ///
    /// The directory is created readable by its owner only (0700) and the database
    /// file likewise (0600): it holds every message. Existing ones with looser
    /// permissions are left as they are, with a warning.
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        Self::open_inner(data_dir, None)
    }

    /// [`Store::open`] on a file backend that fails as `switch` says (storage
    /// fault tests).
    #[doc(hidden)]
    pub fn open_with_faults(data_dir: &Path, switch: FaultSwitch) -> Result<Self, StoreError> {
        Self::open_inner(data_dir, Some(switch))
    }

    fn open_inner(data_dir: &Path, faults: Option<FaultSwitch>) -> Result<Self, StoreError> {
        let dir_error = |source| StoreError::Dir {
            path: data_dir.to_owned(),
            source,
        };
        private_dir(data_dir).map_err(dir_error)?;
        let path = data_dir.join(DB_FILE);
        private_file(&path).map_err(dir_error)?;
        let db = open_file(&path, faults.as_ref())?;
        let node_id = Self::init_meta(&db)?;
        Ok(Self {
            inner: Arc::new(Inner {
                db: RwLock::new(Arc::new(db)),
                path,
                node_id,
                faults,
                unavailable: AtomicBool::new(false),
                reopens: AtomicU64::new(0),
                reopening: Mutex::new(()),
            }),
        })
    }

    /// Records a storage failure: the node is not ready until [`Store::reopen`]
    /// succeeds.
    pub fn mark_unavailable(&self) {
        if !self.inner.unavailable.swap(true, Ordering::AcqRel) {
            tracing::error!(path = %self.inner.path.display(), "storage failed; reopening the database");
        }
    }

    /// False from a storage failure until the database is reopened.
    pub fn is_available(&self) -> bool {
        !self.inner.unavailable.load(Ordering::Acquire)
    }

    /// How many times the database was reopened after a storage failure.
    pub fn reopens(&self) -> u64 {
        self.inner.reopens.load(Ordering::Acquire)
    }

    /// Closes the database and opens it again (after a storage failure). What
    /// was committed before is there again: redb recovers the last committed
    /// transaction when it opens. Meanwhile every operation fails as unavailable;
    /// if the open fails (the disk is still full), it stays so and this can be
    /// called again.
    pub fn reopen(&self) -> Result<(), StoreError> {
        let _one = self.inner.reopening.locked();
        self.retire_now();
        let db = open_file(&self.inner.path, self.inner.faults.as_ref())?;
        Self::init_meta(&db)?;
        *self.inner.db.writing() = Arc::new(db);
        self.inner.reopens.fetch_add(1, Ordering::AcqRel);
        self.inner.unavailable.store(false, Ordering::Release);
        tracing::info!(path = %self.inner.path.display(), "database reopened");
        Ok(())
    }

    /// Marks the store unavailable and closes the failed database: from then on
    /// every operation fails as unavailable (none is answered from the failed
    /// database's cache) until [`Store::reopen`] succeeds.
    pub fn retire(&self) {
        self.mark_unavailable();
        let _one = self.inner.reopening.locked();
        self.retire_now();
    }

    /// Puts the stand-in in place of the database and drops the database.
    fn retire_now(&self) {
        let failed = std::mem::replace(&mut *self.inner.db.writing(), stand_in());
        // The failed database keeps the file locked until its last handle is
        // dropped; handles are taken for one read at a time.
        let deadline = Instant::now() + RELEASE_WAIT;
        let mut failed = Some(failed);
        while let Some(db) = failed.take() {
            if Arc::ptr_eq(&db, &stand_in()) {
                break;
            }
            match Arc::try_unwrap(db) {
                Ok(db) => drop(db),
                Err(db) if Instant::now() < deadline => {
                    failed = Some(db);
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(_) => break,
            }
        }
    }

    /// Writes the schema version on first open; refuses a newer one. Returns the
    /// node id stored in the database (created on first open).
    fn init_meta(db: &Database) -> Result<String, StoreError> {
        let mut txn = db.begin_write()?;
        // Quick repair (a per-transaction setting in redb 4) records the allocator
        // state on commit so that opening after a crash does not rebuild it.
        txn.set_quick_repair(true);
        let node_id;
        {
            let mut meta = txn.open_table(META)?;
            let found = meta.get("schema_version")?.map(|v| v.value().to_owned());
            match found {
                None => {
                    meta.insert("schema_version", SCHEMA_VERSION.to_string().as_str())?;
                }
                Some(v) => {
                    let found: u64 = v
                        .parse()
                        .map_err(|_| StoreError::Corrupt(format!("schema_version {v:?}")))?;
                    if found > SCHEMA_VERSION {
                        return Err(StoreError::TooNew {
                            found,
                            supported: SCHEMA_VERSION,
                        });
                    }
                    // Migrations from older versions go here, in order.
                    if found < SCHEMA_VERSION {
                        meta.insert("schema_version", SCHEMA_VERSION.to_string().as_str())?;
                    }
                }
            }
            // Not a schema version: a build from before still opens the database
            // (it sees none of the records moved here, and its own go to the old
            // tables, which the next start of this build moves again).
            let moved = rekey_chat_sent(&txn)?;
            if moved > 0 {
                tracing::info!(records = moved, "chat idempotency records re-keyed");
            }
            let existing = meta.get("node_id")?.map(|v| v.value().to_owned());
            node_id = match existing {
                Some(id) => id,
                None => {
                    let id = format!("node-{}", crate::util::random_hex(4));
                    meta.insert("node_id", id.as_str())?;
                    id
                }
            };
        }
        txn.commit()?;
        Ok(node_id)
    }

    /// The database, for services that own tables in it. Take it for one
    /// transaction at a time: after a storage failure it is replaced.
    pub fn db(&self) -> Arc<Database> {
        self.inner.db.reading().clone()
    }

    /// The schema version on disk.
    pub fn schema_version(&self) -> Result<u64, StoreError> {
        let txn = self.db().begin_read()?;
        let meta = txn.open_table(META)?;
        let v = meta
            .get("schema_version")?
            .ok_or_else(|| StoreError::Corrupt("no schema_version".into()))?;
        v.value()
            .parse()
            .map_err(|_| StoreError::Corrupt("schema_version".into()))
    }

    /// The node id kept in the database.
    pub fn node_id(&self) -> &str {
        &self.inner.node_id
    }

    /// Whether the database answers a read and no storage failure is pending.
    pub fn is_healthy(&self) -> bool {
        self.is_available() && self.schema_version().is_ok()
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }
}

/// Opens (or creates) the database file, on the fault-injecting backend if
/// `faults` is given.
fn open_file(path: &Path, faults: Option<&FaultSwitch>) -> Result<Database, StoreError> {
    let Some(switch) = faults else {
        return Ok(Database::create(path)?);
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| StoreError::Unavailable(e.to_string()))?;
    let backend = fault::FaultyBackend::new(file, switch.clone())?;
    Ok(redb::Builder::new().create_with_backend(backend)?)
}

/// Chat idempotency records kept by older builds, keyed (room, user, client
/// message id) in the tables `chat_sent` and `chat_sent_age`, are copied into the
/// tables the chat service now keeps them in, `chat_sent_ids` and
/// `chat_sent_ids_age`, keyed (client message id, room, user), and the old tables
/// deleted: a retry of a send made before an upgrade still finds its record.
/// Nothing to do (and nothing written) when the old tables are not there. The
/// layouts are spelled out here, not taken from the chat service, so that a later
/// change there does not change what this step does.
fn rekey_chat_sent(txn: &redb::WriteTransaction) -> Result<usize, StoreError> {
    use redb::TableHandle;
    let old_there = txn
        .list_tables()?
        .any(|t| t.name() == "chat_sent" || t.name() == "chat_sent_age");
    if !old_there {
        return Ok(0);
    }
    dedup::rekey_in(
        txn,
        ("chat_sent", "chat_sent_age"),
        ("chat_sent_ids", "chat_sent_ids_age"),
        |parts| match parts {
            [room, user, id] => Some(dedup::key(&[id, room, user])),
            _ => None,
        },
    )
}

/// The database a [`Store`] hands out while it reopens: every operation on it
/// fails as a storage failure (`PreviousIo`), never with stale or empty data.
fn stand_in() -> Arc<Database> {
    static STAND_IN: OnceLock<Arc<Database>> = OnceLock::new();
    STAND_IN
        .get_or_init(|| {
            let backend = fault::DeadBackend::default();
            let dead = backend.dead.clone();
            let db = redb::Builder::new()
                .set_cache_size(0)
                .create_with_backend(backend)
                .expect("an in-memory database opens");
            // A table, so that finding any table reads a page (and fails).
            if let Ok(txn) = db.begin_write() {
                if let Ok(mut t) = txn.open_table(META) {
                    let _ = t.insert("stand-in", "");
                }
                let _ = txn.commit();
            }
            // Fail its storage, then have redb notice: from then on it refuses
            // everything with `PreviousIo`.
            dead.store(true, Ordering::SeqCst);
            if let Ok(txn) = db.begin_write() {
                if let Ok(mut t) = txn.open_table(META) {
                    let _ = t.insert("x", "x");
                }
                let _ = txn.commit();
            }
            Arc::new(db)
        })
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_version_and_node_id_persist() {
        let dir = tempfile::tempdir().unwrap();
        let node = {
            let s = Store::open(dir.path()).unwrap();
            assert_eq!(s.schema_version().unwrap(), SCHEMA_VERSION);
            s.node_id().to_owned()
        };
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.node_id(), node);
        assert!(s.is_healthy());
    }

    #[cfg(unix)]
    #[test]
    fn the_data_directory_and_database_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("a").join("data");
        Store::open(&data).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&data), 0o700);
        assert_eq!(mode(&data.join(DB_FILE)), 0o600);
        // Opening again keeps working (and only warns about looser permissions).
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
        Store::open(&data).unwrap();
    }

    #[test]
    fn the_stand_in_refuses_reads_and_writes_as_a_storage_failure() {
        let db = stand_in();
        for table in [META, TableDefinition::new("chat_rooms")] {
            let read = db
                .begin_read()
                .map_err(StoreError::from)
                .and_then(|t| t.open_table(table).map(|_| ()).map_err(StoreError::from));
            assert!(
                read.as_ref().is_err_and(StoreError::is_unavailable),
                "{read:?}"
            );
        }
        let write = db.begin_write().map_err(StoreError::from).and_then(|t| {
            t.open_table(META)?.insert("a", "b")?;
            t.commit()?;
            Ok(())
        });
        assert!(
            write.as_ref().is_err_and(StoreError::is_unavailable),
            "{write:?}"
        );
    }

    #[test]
    fn a_failed_commit_is_recovered_by_reopening_with_what_was_committed() {
        use fault::{Fault, FaultSwitch};
        const T: TableDefinition<u64, u64> = TableDefinition::new("t");
        let dir = tempfile::tempdir().unwrap();
        let switch = FaultSwitch::new();
        let store = Store::open_with_faults(dir.path(), switch.clone()).unwrap();
        let put = |k: u64| -> Result<(), StoreError> {
            let t = store.db().begin_write()?;
            t.open_table(T)?.insert(k, k)?;
            t.commit()?;
            Ok(())
        };
        put(1).unwrap();
        for fault in [Fault::DiskFull, Fault::Io, Fault::Fsync] {
            switch.arm(fault);
            let e = put(2).unwrap_err();
            assert!(e.is_unavailable(), "{fault:?}: {e}");
            assert!(put(3).unwrap_err().is_unavailable(), "latched");
            assert!(
                store.reopen().unwrap_err().is_unavailable(),
                "still failing"
            );
            assert!(store.db().begin_read().map(|_| ()).is_ok() || !store.is_healthy());
            switch.disarm();
            store.reopen().unwrap();
            let t = store.db().begin_read().unwrap();
            assert_eq!(t.open_table(T).unwrap().get(1).unwrap().unwrap().value(), 1);
        }
        assert!(switch.injected() >= 3);
        put(4).unwrap();
        assert_eq!(store.reopens(), 3);

        // A commit whose fsync reached the disk, reported as failed, is there
        // after the reopen. (Tutti's commits use quick repair: two-phase.)
        switch.arm(Fault::FsyncAfterSync);
        let quick = store
            .db()
            .begin_write()
            .map_err(StoreError::from)
            .and_then(|mut t| {
                t.set_quick_repair(true);
                t.open_table(T)?.insert(6, 6)?;
                t.commit()?;
                Ok(())
            });
        assert!(quick.unwrap_err().is_unavailable());
        assert_eq!(switch.armed(), None, "once");
        store.reopen().unwrap();
        let t = store.db().begin_read().unwrap();
        assert!(t.open_table(T).unwrap().get(6).unwrap().is_some());
    }

    #[test]
    fn older_chat_idempotency_records_are_rekeyed_on_open() {
        use crate::services::chat::{SENT_AGES, SENT_KEYS, sent_key};
        let dir = tempfile::tempdir().unwrap();
        let old = dedup::key(&["room-1", "ann", "id-1"]);
        {
            let s = Store::open(dir.path()).unwrap();
            let sent = dedup::Dedup::open(&s, "chat_sent", "chat_sent_age").unwrap();
            let txn = s.db().begin_write().unwrap();
            // As older builds kept them: room, user, client message id.
            sent.put_in(&txn, &old, 1_000, &7u64.to_le_bytes()).unwrap();
            txn.commit().unwrap();
        }
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.schema_version().unwrap(), SCHEMA_VERSION);
        let sent = dedup::Dedup::open(&s, SENT_KEYS, SENT_AGES).unwrap();
        let new = sent_key("id-1", "room-1", "ann");
        assert_eq!(
            sent.get(&s, &new).unwrap(),
            Some(7u64.to_le_bytes().to_vec())
        );
        assert_eq!(sent.get(&s, &old).unwrap(), None);
        assert_eq!(sent.len(&s).unwrap(), 1);
        {
            use redb::{ReadableDatabase, TableHandle};
            let r = s.db().begin_read().unwrap();
            let names: Vec<String> = r
                .list_tables()
                .unwrap()
                .map(|t| t.name().to_owned())
                .collect();
            assert!(
                !names
                    .iter()
                    .any(|n| n == "chat_sent_age" || n == "chat_sent"),
                "{names:?}"
            );
        }
        // Opening again moves nothing twice, and a database without the old
        // tables opens without creating them.
        drop((sent, s));
        let s = Store::open(dir.path()).unwrap();
        let sent = dedup::Dedup::open(&s, SENT_KEYS, SENT_AGES).unwrap();
        assert!(sent.get(&s, &new).unwrap().is_some());
        assert_eq!(sent.len(&s).unwrap(), 1);
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path()).unwrap();
            let txn = s.db().begin_write().unwrap();
            txn.open_table(META)
                .unwrap()
                .insert("schema_version", "999")
                .unwrap();
            txn.commit().unwrap();
        }
        assert!(matches!(
            Store::open(dir.path()),
            Err(StoreError::TooNew { found: 999, .. })
        ));
    }
}
