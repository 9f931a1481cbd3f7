//! A storage backend that fails on demand: the file backend, plus a switch that
//! makes writes, fsyncs and length changes fail as a full disk (`ENOSPC`) or a
//! failing disk (`EIO`) would. Tests drive storage faults through the real server
//! with it ([`super::Store::open_with_faults`]); production opens the plain file.
//!
//! redb latches the first failed write, fsync or length change: every later
//! operation on that `Database` returns `StorageError::PreviousIo` until it is
//! dropped and opened again. [`super::Store::reopen`] does that.

use crate::util::{Unpoisoned, UnpoisonedRw};
use std::fs::File;
use std::ops::Bound;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

use redb::backends::FileBackend;
use redb::{BackendError, StorageBackend};

/// What an armed [`FaultSwitch`] makes storage do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Writes and length changes fail with `ENOSPC` ("no space left on device");
    /// fsync still succeeds (nothing is left to flush).
    DiskFull,
    /// Writes, fsyncs and length changes fail with `EIO`.
    Io,
    /// Only fsync fails (`EIO`): the data may have reached the file, but it is not
    /// known to be durable.
    Fsync,
    /// The fsync that makes a commit durable flushes, then reports `EIO`, once
    /// (the switch disarms itself): the commit is durable though its writers are
    /// told it failed (their retries must find it). Other fsyncs succeed. (A
    /// two-phase redb commit, with quick repair, writes its header, at the start
    /// of the file, twice: once for the new slot and once to make it the primary;
    /// the fsync after the second makes the commit durable. For one-phase commits
    /// use [`FaultSwitch::arm_durable_failure`].)
    FsyncAfterSync,
}

const OFF: u8 = 0;

/// How much of the start of the file counts as redb's header, for
/// [`Fault::FsyncAfterSync`].
const HEADER_BYTES: u64 = 512;

impl Fault {
    fn code(self) -> u8 {
        match self {
            Fault::DiskFull => 1,
            Fault::Io => 2,
            Fault::Fsync => 3,
            Fault::FsyncAfterSync => 4,
        }
    }

    fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(Fault::DiskFull),
            2 => Some(Fault::Io),
            3 => Some(Fault::Fsync),
            4 => Some(Fault::FsyncAfterSync),
            _ => None,
        }
    }
}

/// Arms and disarms the faults of every backend opened with it (the database may
/// be reopened several times during one fault). Cloning shares the switch.
#[derive(Debug, Clone, Default)]
pub struct FaultSwitch(Arc<SwitchState>);

#[derive(Debug, Default)]
struct SwitchState {
    armed: AtomicU8,
    injected: AtomicU64,
    /// Header writes since the switch was armed or a commit was made durable.
    header_writes: AtomicU64,
    /// For [`FaultSwitch::arm_durable_failure`]: the bytes that mark the commit to
    /// fail, and the fsyncs since they were written (`u64::MAX`: not yet).
    needle: std::sync::Mutex<Option<Vec<u8>>>,
    syncs_since_needle: AtomicU64,
    /// Which fsync after the needle makes its commit durable (1 or 2).
    durable_sync: AtomicU64,
}

impl FaultSwitch {
    /// A disarmed switch.
    pub fn new() -> Self {
        Self::default()
    }

    /// From now on, storage fails with `fault`.
    pub fn arm(&self, fault: Fault) {
        self.0.header_writes.store(0, Ordering::SeqCst);
        self.0.armed.store(fault.code(), Ordering::SeqCst);
    }

    /// The commit that writes `needle` (say, a message's text) is made durable,
    /// and its final fsync then reports `EIO`, once: its writers are told it
    /// failed though it is on disk. Other fsyncs succeed. For Tutti's default
    /// one-phase commits (a commit writes its pages and header, then syncs once);
    /// see [`FaultSwitch::arm_durable_failure_two_phase`] for quick repair.
    pub fn arm_durable_failure(&self, needle: &[u8]) {
        self.arm_needle(needle, 1);
    }

    /// [`FaultSwitch::arm_durable_failure`] for two-phase commits (quick repair):
    /// a commit syncs its pages, then writes its header and syncs again; the
    /// second fsync makes it durable.
    pub fn arm_durable_failure_two_phase(&self, needle: &[u8]) {
        self.arm_needle(needle, 2);
    }

    fn arm_needle(&self, needle: &[u8], durable_sync: u64) {
        *self.0.needle.locked() = Some(needle.to_vec());
        self.0.syncs_since_needle.store(u64::MAX, Ordering::SeqCst);
        self.0.durable_sync.store(durable_sync, Ordering::SeqCst);
        self.arm(Fault::FsyncAfterSync);
    }

    /// Notes a write of `data` (for [`FaultSwitch::arm_durable_failure`]).
    fn wrote(&self, data: &[u8]) {
        let needle = self.0.needle.locked();
        if let Some(n) = needle.as_deref()
            && self.0.syncs_since_needle.load(Ordering::SeqCst) == u64::MAX
            && data.windows(n.len()).any(|w| w == n)
        {
            self.0.syncs_since_needle.store(0, Ordering::SeqCst);
        }
    }

    /// From now on, storage works again.
    pub fn disarm(&self) {
        *self.0.needle.locked() = None;
        self.0.armed.store(OFF, Ordering::SeqCst);
    }

    /// The armed fault, if any.
    pub fn armed(&self) -> Option<Fault> {
        Fault::from_code(self.0.armed.load(Ordering::SeqCst))
    }

    /// How many operations have failed because of the switch.
    pub fn injected(&self) -> u64 {
        self.0.injected.load(Ordering::SeqCst)
    }

    /// Whether the fsync now makes a commit durable: the header was written twice
    /// since the last such fsync (see [`Fault::FsyncAfterSync`]).
    fn commit_is_flushing(&self) -> bool {
        if self.0.needle.locked().is_some() {
            let syncs = &self.0.syncs_since_needle;
            let seen = syncs.load(Ordering::SeqCst);
            if seen == u64::MAX {
                return false;
            }
            syncs.store(seen + 1, Ordering::SeqCst);
            return seen + 1 == self.0.durable_sync.load(Ordering::SeqCst);
        }
        let writes = &self.0.header_writes;
        if writes.load(Ordering::SeqCst) >= 2 {
            writes.store(0, Ordering::SeqCst);
            true
        } else {
            false
        }
    }

    /// The error `op` gets now, if it is to fail.
    fn check(&self, op: Op) -> std::io::Result<()> {
        let error = match (self.armed(), op) {
            (None, _) | (Some(Fault::DiskFull), Op::Sync) => return Ok(()),
            (Some(Fault::Fsync | Fault::FsyncAfterSync), Op::Write | Op::SetLen) => return Ok(()),
            (Some(Fault::FsyncAfterSync), Op::Sync) if !self.commit_is_flushing() => {
                return Ok(());
            }
            // ENOSPC, as the kernel reports it (std's kind is `StorageFull`).
            (Some(Fault::DiskFull), _) => std::io::Error::from_raw_os_error(28),
            // EIO.
            (Some(Fault::Io | Fault::Fsync | Fault::FsyncAfterSync), _) => {
                std::io::Error::from_raw_os_error(5)
            }
        };
        self.0.injected.fetch_add(1, Ordering::SeqCst);
        Err(error)
    }
}

#[derive(Clone, Copy)]
enum Op {
    Write,
    Sync,
    SetLen,
}

/// The file backend with a [`FaultSwitch`] in front of its writes.
#[derive(Debug)]
pub struct FaultyBackend {
    file: FileBackend,
    switch: FaultSwitch,
}

impl FaultyBackend {
    /// Wraps `file`, failing as `switch` says.
    pub fn new(file: File, switch: FaultSwitch) -> Result<Self, redb::DatabaseError> {
        Ok(Self {
            file: FileBackend::new(file)?,
            switch,
        })
    }
}

impl StorageBackend for FaultyBackend {
    fn len(&self) -> Result<u64, std::io::Error> {
        self.file.len()
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), std::io::Error> {
        self.file.read(offset, out)
    }

    fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
        self.switch.check(Op::SetLen)?;
        self.file.set_len(len)
    }

    fn sync_data(&self) -> Result<(), std::io::Error> {
        if self.switch.armed() == Some(Fault::FsyncAfterSync) {
            self.file.sync_data()?;
            let reported = self.switch.check(Op::Sync);
            if reported.is_err() {
                self.switch.disarm();
            }
            return reported;
        }
        self.switch.check(Op::Sync)?;
        self.file.sync_data()
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
        self.switch.check(Op::Write)?;
        self.switch.wrote(data);
        // redb's header is the start of the file; a commit writes it last.
        if offset < HEADER_BYTES {
            self.switch.0.header_writes.fetch_add(1, Ordering::SeqCst);
        }
        self.file.write(offset, data)
    }

    fn close(&self) -> Result<(), std::io::Error> {
        self.file.close()
    }

    // The file's locks are the file backend's, unchanged: they keep a second
    // process (or a second open in this one) off the database.
    fn try_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.file.try_lock_range(start, end)
    }

    fn try_lock_shared_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> Result<bool, BackendError> {
        self.file.try_lock_shared_range(start, end)
    }

    fn lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.file.lock_range(start, end)
    }

    fn lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.file.lock_shared_range(start, end)
    }

    fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.file.unlock_range(start, end)
    }

    fn query_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.file.query_lock_range(start, end)
    }
}

/// Whether a redb error means the storage failed (a full or failing disk, or a
/// database closed to be reopened after such a failure), so the operation may
/// succeed if retried later.
pub fn is_storage_failure(e: &redb::Error) -> bool {
    matches!(
        e,
        redb::Error::Io(_) | redb::Error::PreviousIo | redb::Error::DatabaseClosed
    )
}

/// Memory that fails every operation once `dead` is set: the storage of the
/// stand-in database a store hands out while it reopens.
#[derive(Debug, Default)]
pub(super) struct DeadBackend {
    bytes: std::sync::RwLock<Vec<u8>>,
    pub(super) dead: Arc<std::sync::atomic::AtomicBool>,
}

impl DeadBackend {
    fn check(&self) -> std::io::Result<()> {
        if self.dead.load(Ordering::SeqCst) {
            Err(std::io::Error::other("storage unavailable"))
        } else {
            Ok(())
        }
    }
}

impl StorageBackend for DeadBackend {
    fn len(&self) -> Result<u64, std::io::Error> {
        self.check()?;
        Ok(self.bytes.reading().len() as u64)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), std::io::Error> {
        self.check()?;
        let bytes = self.bytes.reading();
        let start = usize::try_from(offset).map_err(std::io::Error::other)?;
        let src = bytes
            .get(start..start + out.len())
            .ok_or_else(|| std::io::Error::other("out of range"))?;
        out.copy_from_slice(src);
        Ok(())
    }

    fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
        self.check()?;
        let len = usize::try_from(len).map_err(std::io::Error::other)?;
        self.bytes.writing().resize(len, 0);
        Ok(())
    }

    fn sync_data(&self) -> Result<(), std::io::Error> {
        self.check()
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
        self.check()?;
        let mut bytes = self.bytes.writing();
        let start = usize::try_from(offset).map_err(std::io::Error::other)?;
        let dst = bytes
            .get_mut(start..start + data.len())
            .ok_or_else(|| std::io::Error::other("out of range"))?;
        dst.copy_from_slice(data);
        Ok(())
    }
}
