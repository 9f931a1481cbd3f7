//! The embedded database (redb) and the caches in front of it.
//!
//! redb is the source of truth on a single node. Each service owns its tables; this
//! module opens the file, checks the schema version and hands out the database.

pub mod cache;
pub mod offset_log;
pub mod registry;
mod writer;

pub use offset_log::{AppendError, Entry, Epoch, OffsetLog, Position, RedbLog};
pub use writer::{CommitObserver, Hold, Writer, WriterProbe};

use std::path::{Path, PathBuf};
use std::sync::Arc;

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

/// The open database.
#[derive(Clone)]
pub struct Store {
    db: Arc<Database>,
    path: PathBuf,
    node_id: String,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

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
        let dir_error = |source| StoreError::Dir {
            path: data_dir.to_owned(),
            source,
        };
        private_dir(data_dir).map_err(dir_error)?;
        let path = data_dir.join(DB_FILE);
        private_file(&path).map_err(dir_error)?;
        let db = Database::create(&path)?;
        let node_id = Self::init_meta(&db)?;
        Ok(Self {
            db: Arc::new(db),
            path,
            node_id,
        })
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

    /// The database, for services that own tables in it.
    pub fn db(&self) -> &Arc<Database> {
        &self.db
    }

    /// The schema version on disk.
    pub fn schema_version(&self) -> Result<u64, StoreError> {
        let txn = self.db.begin_read()?;
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
        &self.node_id
    }

    /// Whether the database answers a read.
    pub fn is_healthy(&self) -> bool {
        self.schema_version().is_ok()
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }
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
