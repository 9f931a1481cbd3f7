//! Group commit: one writer thread takes every write that has queued up, runs them in
//! one redb transaction, commits once (one fsync), then acknowledges each. Throughput
//! grows with load instead of stopping at one fsync per write.
//!
//! A write is a closure over the transaction (`Fn`, so it can run twice). If one
//! fails, the batch is rolled back and its writes are run again one by one, each in
//! its own transaction, so a bad write never takes good ones down with it.
//!
//! Storage failures: when a commit fails because the storage did (a full or
//! failing disk), its writes fail as unavailable, the store is marked so (the node
//! is not ready), and the writer reopens the database, retrying with backoff;
//! writes that arrive meanwhile fail at once as unavailable instead of waiting.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use redb::{Database, WriteTransaction};
use tokio::sync::{mpsc, oneshot};

use super::{Store, StoreError};
use crate::util::Unpoisoned;

/// Writes queued at most; past this, callers wait (backpressure).
const QUEUE: usize = 16 * 1024;
/// Writes in one transaction at most.
const MAX_BATCH: usize = 4096;

type WriteFn = Box<dyn Fn(&WriteTransaction) -> Result<(), StoreError> + Send>;

struct Job {
    write: WriteFn,
    done: oneshot::Sender<Result<(), WriteFailed>>,
}

/// Why a group-committed write failed; every write of a failed commit gets a copy.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
struct WriteFailed {
    message: Arc<str>,
    /// The storage failed (not the write): the database must be reopened.
    storage: bool,
}

impl WriteFailed {
    fn from(e: impl std::fmt::Display) -> Self {
        Self {
            message: e.to_string().into(),
            storage: false,
        }
    }

    fn from_redb(e: impl Into<redb::Error>) -> Self {
        let e: redb::Error = e.into();
        Self {
            storage: super::fault::is_storage_failure(&e),
            message: e.to_string().into(),
        }
    }

    fn from_store(e: StoreError) -> Self {
        Self {
            storage: e.is_unavailable(),
            message: e.to_string().into(),
        }
    }

    fn unavailable() -> Self {
        Self {
            message: "the database is being reopened after a storage failure".into(),
            storage: true,
        }
    }

    fn into_store(self) -> StoreError {
        if self.storage {
            StoreError::Unavailable(self.message.to_string())
        } else {
            StoreError::Write(self.message.to_string())
        }
    }
}

/// What the writer commits to: one database, or a [`Store`] (whose database it
/// reopens after a storage failure).
#[derive(Debug)]
pub enum Target {
    /// A database that is never reopened.
    Database(Arc<Database>),
    /// The store's current database.
    Store(Store),
}

impl From<Arc<Database>> for Target {
    fn from(db: Arc<Database>) -> Self {
        Target::Database(db)
    }
}

impl From<Store> for Target {
    fn from(store: Store) -> Self {
        Target::Store(store)
    }
}

impl Target {
    fn db(&self) -> Arc<Database> {
        match self {
            Target::Database(db) => db.clone(),
            Target::Store(s) => s.db(),
        }
    }
}

/// A handle to the writer thread. Cloning is cheap; the thread stops when every
/// handle is dropped.
#[derive(Clone, Debug)]
pub struct Writer {
    tx: mpsc::Sender<Job>,
    gate: Arc<Gate>,
}

/// Holds group commits while any [`Hold`] is alive (for maintenance and fault tests).
#[derive(Debug, Default)]
struct Gate {
    in_flight: AtomicUsize,
    holds: std::sync::Mutex<usize>,
    released: std::sync::Condvar,
}

impl Gate {
    /// Blocks the writer thread while a hold is alive.
    fn wait_open(&self) {
        let holds = self.holds.locked();
        drop(
            self.released
                .wait_while(holds, |holds| *holds > 0)
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
    }
}

/// While alive, the writer commits nothing: writes queue up (and their callers wait)
/// until every hold is dropped. See [`Writer::hold`].
#[derive(Debug)]
#[must_use = "writes resume when the hold is dropped"]
pub struct Hold(Arc<Gate>);

impl Drop for Hold {
    fn drop(&mut self) {
        let mut holds = self.0.holds.locked();
        *holds -= 1;
        if *holds == 0 {
            self.0.released.notify_all();
        }
    }
}

/// Called with each committed batch: its size and the time the commit took.
pub type CommitObserver = Arc<dyn Fn(usize, std::time::Duration) + Send + Sync>;

/// How the writer commits.
#[derive(Clone, Copy, Debug, Default)]
pub struct WriterOptions {
    /// The least time between the starts of two commits (see
    /// [`Writer::spawn_with`]).
    pub interval: Duration,
    /// Commit with redb's quick repair: each commit also records the allocator
    /// state (and commits in two phases), so opening after a crash does not walk
    /// the database to rebuild it. It costs CPU on every commit: 70 against 31 us
    /// for a one-row commit on tmpfs. Without it, the first open after a crash
    /// checks the whole database (160 ms for 1.2 million rows, 285 MB, on tmpfs).
    /// Either way a committed write survives the crash.
    pub quick_repair: bool,
}

impl Writer {
    /// Starts the writer thread for `db` (a database, or a [`Store`] to recover).
    pub fn spawn(
        db: impl Into<Target>,
        observer: Option<CommitObserver>,
    ) -> (Self, std::thread::JoinHandle<()>) {
        Self::spawn_with(db, observer, WriterOptions::default())
    }

    /// [`Writer::spawn`] with options.
    ///
    /// A commit costs about the same CPU however many writes it holds. With an
    /// `interval`, a commit starts no sooner than that after the previous
    /// one started: while writes come slower than one per interval, each commits at
    /// once; when they come faster, those that arrive meanwhile wait for the next
    /// commit and share it. Busy, the writer commits at most once per interval
    /// (its CPU no longer grows with the write rate) for at most `interval` more
    /// latency per write; idle, it adds nothing.
    pub fn spawn_with(
        db: impl Into<Target>,
        observer: Option<CommitObserver>,
        options: WriterOptions,
    ) -> (Self, std::thread::JoinHandle<()>) {
        let db = db.into();
        let (tx, rx) = mpsc::channel(QUEUE);
        let gate = Arc::new(Gate::default());
        let thread_gate = gate.clone();
        let thread = std::thread::Builder::new()
            .name("tutti-writer".into())
            .spawn(move || run(db, rx, observer, &thread_gate, options))
            .expect("spawning the writer thread");
        (Self { tx, gate }, thread)
    }

    /// Stops committing until the returned [`Hold`] is dropped: new writes wait in
    /// the queue. Lets a test put a request's commit "in flight" for as long as it
    /// needs, and an operator pause writes.
    pub fn hold(&self) -> Hold {
        *self.gate.holds.locked() += 1;
        Hold(self.gate.clone())
    }

    /// A probe of whether the writer thread is still running, which does not keep
    /// it running (for readiness checks).
    pub fn probe(&self) -> WriterProbe {
        WriterProbe(self.tx.downgrade())
    }

    /// Writes submitted and not yet committed or failed.
    pub fn in_flight(&self) -> usize {
        self.gate.in_flight.load(Ordering::Acquire)
    }

    /// Runs `write` in the next group commit and returns once it is durable.
    pub async fn write<F>(&self, write: F) -> Result<(), StoreError>
    where
        F: Fn(&WriteTransaction) -> Result<(), StoreError> + Send + 'static,
    {
        let (done, rx) = oneshot::channel();
        let _counted = InFlight::new(&self.gate.in_flight);
        self.tx
            .send(Job {
                write: Box::new(write),
                done,
            })
            .await
            .map_err(|_| StoreError::Write("the writer has stopped".into()))?;
        rx.await
            .map_err(|_| StoreError::Write("the writer has stopped".into()))?
            .map_err(WriteFailed::into_store)
    }
}

/// Tells whether the writer thread still takes writes. See [`Writer::probe`].
#[derive(Clone, Debug)]
pub struct WriterProbe(mpsc::WeakSender<Job>);

impl WriterProbe {
    /// False once the writer thread has stopped (or every [`Writer`] is gone).
    pub fn is_running(&self) -> bool {
        self.0.upgrade().is_some_and(|tx| !tx.is_closed())
    }
}

/// Counts a write from submission until its result arrives (or its caller gives up).
struct InFlight<'a>(&'a AtomicUsize);

impl<'a> InFlight<'a> {
    fn new(n: &'a AtomicUsize) -> Self {
        n.fetch_add(1, Ordering::AcqRel);
        Self(n)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn run(
    db: Target,
    mut rx: mpsc::Receiver<Job>,
    observer: Option<CommitObserver>,
    gate: &Gate,
    options: WriterOptions,
) {
    let mut batch = Vec::with_capacity(64);
    let mut last_start: Option<Instant> = None;
    loop {
        // The interval is waited out before the queue is looked at: what arrives
        // meanwhile shares the next commit, and a busy writer wakes once per commit
        // (its timer) rather than also for the first write of each, which its
        // sender would have to wake it for.
        if let Some(wait) = last_start
            .map(|last| (last + options.interval).saturating_duration_since(Instant::now()))
            .filter(|wait| !wait.is_zero())
        {
            std::thread::sleep(wait);
        }
        // Returns at once with a queued write; blocks only on an empty queue.
        let Some(first) = rx.blocking_recv() else {
            return;
        };
        gate.wait_open();
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let started = Instant::now();
        last_start = Some(started);
        let n = batch.len();
        let answers = commit_batch(&db.db(), std::mem::take(&mut batch), options.quick_repair);
        if let Some(observe) = &observer {
            observe(n, started.elapsed());
        }
        let storage_failed = answers
            .iter()
            .any(|(_, r)| r.as_ref().is_err_and(|e| e.storage));
        let store = match &db {
            Target::Store(store) if storage_failed => Some(store),
            _ => None,
        };
        // Before anyone hears of the failure: whoever saw a write fail this way
        // finds the node not ready, and every read failing until it recovers.
        if let Some(store) = store {
            store.retire();
        }
        for (done, result) in answers {
            let _ = done.send(result);
        }
        if let Some(store) = store {
            recover(store, &mut rx);
        }
    }
}

/// Longest wait between two attempts to reopen the database.
const MAX_BACKOFF: Duration = Duration::from_millis(500);

/// Reopens the store's database until that works,
/// failing every write that arrives meanwhile.
fn recover(store: &Store, rx: &mut mpsc::Receiver<Job>) {
    let mut backoff = Duration::from_millis(10);
    loop {
        match store.reopen() {
            Ok(()) => return,
            Err(e) => tracing::warn!(error = %e, retry_in = ?backoff, "reopening the database"),
        }
        let until = Instant::now() + backoff;
        while Instant::now() < until {
            match rx.try_recv() {
                Ok(job) => {
                    let _ = job.done.send(Err(WriteFailed::unavailable()));
                }
                Err(mpsc::error::TryRecvError::Empty) => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(mpsc::error::TryRecvError::Disconnected) => return,
            }
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

type Answer = (
    oneshot::Sender<Result<(), WriteFailed>>,
    Result<(), WriteFailed>,
);

/// Commits a batch; returns the answer for each of its writes.
fn commit_batch(db: &Database, batch: Vec<Job>, quick_repair: bool) -> Vec<Answer> {
    if batch.len() == 1 {
        let job = batch.into_iter().next().expect("one job");
        let result = commit_one(db, &job.write, quick_repair);
        return vec![(job.done, result)];
    }
    let txn = match db.begin_write() {
        Ok(mut t) => {
            t.set_quick_repair(quick_repair);
            t
        }
        Err(e) => {
            let failed = WriteFailed::from_redb(e);
            return batch
                .into_iter()
                .map(|job| (job.done, Err(failed.clone())))
                .collect();
        }
    };
    let mut ran = Ok(());
    for job in &batch {
        ran = run_write(&job.write, &txn);
        if ran.is_err() {
            break;
        }
    }
    if let Err(e) = ran {
        let _ = txn.abort();
        if e.storage {
            // The database itself failed: running the writes alone would too.
            return batch
                .into_iter()
                .map(|job| (job.done, Err(e.clone())))
                .collect();
        }
        let mut storage = false;
        let mut answers = Vec::with_capacity(batch.len());
        for job in batch {
            let result = if storage {
                Err(WriteFailed::unavailable())
            } else {
                commit_one(db, &job.write, quick_repair)
            };
            storage |= result.as_ref().is_err_and(|e| e.storage);
            answers.push((job.done, result));
        }
        return answers;
    }
    let result = txn.commit().map_err(WriteFailed::from_redb);
    batch
        .into_iter()
        .map(|job| (job.done, result.clone()))
        .collect()
}

fn commit_one(db: &Database, write: &WriteFn, quick_repair: bool) -> Result<(), WriteFailed> {
    let mut txn = db.begin_write().map_err(WriteFailed::from_redb)?;
    txn.set_quick_repair(quick_repair);
    run_write(write, &txn)?;
    txn.commit().map_err(WriteFailed::from_redb)
}

/// Runs one write; a write that panics fails alone instead of stopping the writer.
fn run_write(write: &WriteFn, txn: &WriteTransaction) -> Result<(), WriteFailed> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| write(txn))) {
        Ok(result) => result.map_err(WriteFailed::from_store),
        Err(_) => Err(WriteFailed::from("the write panicked")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redb::{ReadableDatabase, ReadableTableMetadata, TableDefinition};

    const T: TableDefinition<u64, u64> = TableDefinition::new("t");

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writes_are_all_durable_in_few_commits() {
        let dir = tempfile::tempdir().unwrap();
        let db = Arc::new(Database::create(dir.path().join("db")).unwrap());
        let commits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let c = commits.clone();
        let (writer, thread) = Writer::spawn(
            db.clone(),
            Some(Arc::new(move |_, _| {
                c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            })),
        );
        let writes = (0..200u64).map(|i| {
            let w = writer.clone();
            tokio::spawn(async move {
                w.write(move |txn| {
                    txn.open_table(T)?.insert(i, i * 2)?;
                    Ok(())
                })
                .await
            })
        });
        for w in futures_util::future::join_all(writes).await {
            w.unwrap().unwrap();
        }
        drop(writer);
        thread.join().unwrap();
        let n = commits.load(std::sync::atomic::Ordering::Relaxed);
        assert!(n < 200, "group commit should batch; {n} commits");
        let txn = db.begin_read().unwrap();
        assert_eq!(txn.open_table(T).unwrap().len().unwrap(), 200);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn with_an_interval_writes_arriving_meanwhile_share_the_next_commit() {
        let dir = tempfile::tempdir().unwrap();
        let db = Arc::new(Database::create(dir.path().join("db")).unwrap());
        let commits = Arc::new(std::sync::Mutex::new(Vec::new()));
        let c = commits.clone();
        let interval = Duration::from_millis(500);
        let options = WriterOptions {
            interval,
            ..Default::default()
        };
        let (writer, thread) = Writer::spawn_with(
            db.clone(),
            Some(Arc::new(move |n, took| {
                // The observer runs right after the commit: its start is `took` ago.
                c.lock().unwrap().push((n, Instant::now() - took));
            })),
            options,
        );
        let write = |w: &Writer, i: u64| {
            let w = w.clone();
            tokio::spawn(async move {
                w.write(move |txn| {
                    txn.open_table(T)?.insert(i, i)?;
                    Ok(())
                })
                .await
            })
        };
        // The first write finds no commit before it and commits at once.
        write(&writer, 0).await.unwrap().unwrap();
        // The next ones arrive within the interval: one commit takes them all.
        let writes: Vec<_> = (1..=20).map(|i| write(&writer, i)).collect();
        for w in futures_util::future::join_all(writes).await {
            w.unwrap().unwrap();
        }
        drop(writer);
        thread.join().unwrap();
        let commits = commits.lock().unwrap();
        let sizes: Vec<usize> = commits.iter().map(|(n, _)| *n).collect();
        assert_eq!(sizes, [1, 20]);
        // (Each start is known to within the observer's call, hence the margin.)
        assert!(commits[1].1 - commits[0].1 >= interval * 9 / 10);
        let read = db.begin_read().unwrap();
        assert_eq!(read.open_table(T).unwrap().len().unwrap(), 21);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_hold_keeps_writes_in_flight_until_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let db = Arc::new(Database::create(dir.path().join("db")).unwrap());
        let (writer, _thread) = Writer::spawn(db.clone(), None);
        let hold = writer.hold();
        let w = writer.clone();
        let write = tokio::spawn(async move {
            w.write(|txn| {
                txn.open_table(T)?.insert(1, 1)?;
                Ok(())
            })
            .await
        });
        while writer.in_flight() == 0 {
            tokio::task::yield_now().await;
        }
        assert!(!write.is_finished());
        assert!(
            db.begin_read().unwrap().open_table(T).is_err(),
            "nothing committed while held"
        );
        drop(hold);
        write.await.unwrap().unwrap();
        assert_eq!(writer.in_flight(), 0);
        let txn = db.begin_read().unwrap();
        assert_eq!(txn.open_table(T).unwrap().len().unwrap(), 1);
    }

    #[tokio::test]
    async fn a_panicking_write_fails_alone_and_the_writer_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let db = Arc::new(Database::create(dir.path().join("db")).unwrap());
        let (writer, _thread) = Writer::spawn(db.clone(), None);
        let probe = writer.probe();
        let bad = writer.write(|txn| {
            txn.open_table(T)?.insert(9, 9)?;
            panic!("a bug in a write");
        });
        let good = writer.write(|txn| {
            txn.open_table(T)?.insert(1, 1)?;
            Ok(())
        });
        let (bad, good) = tokio::join!(bad, good);
        assert!(bad.is_err());
        good.unwrap();
        assert!(probe.is_running());
        let txn = db.begin_read().unwrap();
        let t = txn.open_table(T).unwrap();
        assert_eq!(t.len().unwrap(), 1);
        assert!(
            t.get(9).unwrap().is_none(),
            "the panicking write left nothing"
        );
        drop(writer);
        assert!(!probe.is_running(), "no writer left");
    }

    #[tokio::test]
    async fn a_failing_write_fails_alone() {
        let dir = tempfile::tempdir().unwrap();
        let db = Arc::new(Database::create(dir.path().join("db")).unwrap());
        let (writer, _thread) = Writer::spawn(db.clone(), None);
        let bad = writer.write(|_| Err(StoreError::Corrupt("no".into())));
        let good = writer.write(|txn| {
            txn.open_table(T)?.insert(1, 1)?;
            Ok(())
        });
        let (bad, good) = tokio::join!(bad, good);
        assert!(bad.is_err());
        good.unwrap();
        let txn = db.begin_read().unwrap();
        assert_eq!(txn.open_table(T).unwrap().len().unwrap(), 1);
    }
}

#[cfg(test)]
mod recovery_tests {
    use super::*;
    use crate::store::fault::FaultSwitch;
    use redb::{ReadableDatabase, TableDefinition};

    const T: TableDefinition<&str, &str> = TableDefinition::new("t");

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_commit_reported_failed_but_durable_is_there_after_the_recovery() {
        // One-phase commits (the default) and two-phase ones (quick repair) alike.
        for quick_repair in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let switch = FaultSwitch::new();
            let store = Store::open_with_faults(dir.path(), switch.clone()).unwrap();
            let options = WriterOptions {
                quick_repair,
                ..Default::default()
            };
            let (writer, _thread) = Writer::spawn_with(store.clone(), None, options);
            writer
                .write(|txn| {
                    txn.open_table(T)?.insert("a", "first")?;
                    Ok(())
                })
                .await
                .unwrap();
            if quick_repair {
                switch.arm_durable_failure_two_phase(b"needle-value");
            } else {
                switch.arm_durable_failure(b"needle-value");
            }
            let e = writer
                .write(|txn| {
                    txn.open_table(T)?.insert("b", "needle-value")?;
                    Ok(())
                })
                .await
                .unwrap_err();
            assert!(e.is_unavailable(), "quick repair {quick_repair}: {e}");
            while !store.is_available() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let txn = store.db().begin_read().unwrap();
            let t = txn.open_table(T).unwrap();
            assert_eq!(t.get("b").unwrap().unwrap().value(), "needle-value");
        }
    }
}
