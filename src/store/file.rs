//! The store's open database, and opening it again after a failed commit.
//!
//! redb remembers a failed write, resize or sync of its file (a full disk, an I/O error) and
//! refuses every write transaction after it ("Previous I/O error occurred. Please close and
//! re-open the database") until that `Database` is dropped; after a commit that failed otherwise
//! it refuses them too, saying "Corrupted: … reopen the database to repair it" (see
//! [`needs_reopen`]). So the writer, when a batch fails and
//! the database refuses to begin another, takes the database out of the [`DbSlot`] (readers
//! are told to try again meanwhile), waits for the reads still holding it, drops it (which
//! releases the file) and opens the file again (redb repairs it if it must). What the failed batch
//! held was rolled back and its waiters told; once the disk has room again, the node stores
//! again, without a restart.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use redb::Database;
use troupe_actors::session::StoreError;

/// Opens (or creates) the database file at a path; the same at start and on a reopen.
pub(super) type Opener = Arc<dyn Fn(&Path) -> Result<Database, redb::DatabaseError> + Send + Sync>;

/// The opener of a node: redb's file backend.
pub(super) fn file_opener() -> Opener {
    Arc::new(|path: &Path| Database::builder().create(path))
}

/// How long a reopen waits for reads that still hold the old database (each is one short read
/// transaction on the blocking pool).
const READS_PATIENCE: Duration = Duration::from_secs(30);

/// At most one reopen attempt this often while the file cannot be opened (opening may repair
/// it, which reads all of it).
const REOPEN_EVERY: Duration = Duration::from_secs(1);

/// The open database, shared by the writer thread and the readers.
pub(super) struct DbSlot {
    path: PathBuf,
    opener: Opener,
    current: RwLock<Option<Arc<Database>>>,
    /// The store was closed: the database is gone for good (see [`DbSlot::close`]).
    closed: AtomicBool,
    /// [`REOPEN_EVERY`]; tests make it zero.
    reopen_every: Duration,
}

impl DbSlot {
    pub(super) fn new(path: PathBuf, opener: Opener, db: Database) -> Self {
        Self {
            path,
            opener,
            current: RwLock::new(Some(Arc::new(db))),
            closed: AtomicBool::new(false),
            reopen_every: REOPEN_EVERY,
        }
    }

    /// Tests: reopen attempts as often as batches come.
    #[cfg(test)]
    pub(super) fn retry_at_once(mut self) -> Self {
        self.reopen_every = Duration::ZERO;
        self
    }

    /// The database, unless a reopen is under way (or failed: the writer tries again) or the
    /// store was closed.
    pub(super) fn get(&self) -> Result<Arc<Database>, StoreError> {
        let current = self
            .current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        current.ok_or_else(|| {
            if self.closed.load(Ordering::Acquire) {
                StoreError::Io("the store is closed".into())
            } else {
                StoreError::Io(
                    "the store is reopening its file after an I/O error (a full disk?); try again"
                        .into(),
                )
            }
        })
    }

    /// Releases the file for good, once the writer has stopped: reads from now on answer that
    /// the store is closed, and those still holding the database are waited for (at most
    /// [`READS_PATIENCE`]; past it the last of them closes it). Other handles of the store may
    /// live on; the data directory can be opened again at once.
    pub(super) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        let taken = self
            .current
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(old) = taken
            && let Err(shared) = release(old)
        {
            tracing::warn!(
                file = %self.path.display(),
                "store: reads held the database for {READS_PATIENCE:?} after the close; the \
                 last of them releases the file"
            );
            drop(shared);
        }
    }

    /// Whether the database refuses new writes after a failed batch: it must be reopened.
    pub(super) fn poisoned(db: &Database) -> bool {
        match db.begin_write() {
            Ok(txn) => {
                let _ = txn.abort();
                false
            }
            Err(error) => needs_reopen(&error),
        }
    }

    /// Drops the database and opens the file again. Blocks the writer thread until the reads
    /// holding the old one are done (at most [`READS_PATIENCE`]; past it the old one is put back
    /// and the next failure tries again).
    pub(super) fn reopen(&self, why: &StoreError) -> Result<(), StoreError> {
        let taken = self
            .current
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        tracing::warn!(
            error = %why,
            file = %self.path.display(),
            "store: the database refuses writes after a failed commit; reopening it"
        );
        if let Some(old) = taken
            && let Err(shared) = release(old)
        {
            *self.current.write().unwrap_or_else(PoisonError::into_inner) = Some(shared);
            return Err(StoreError::Io(format!(
                "cannot reopen {}: reads held the database for {READS_PATIENCE:?}",
                self.path.display()
            )));
        }
        self.open_again()
    }

    /// Opens the file into an empty slot (after a reopen that could not open it).
    fn open_again(&self) -> Result<(), StoreError> {
        match (self.opener)(&self.path) {
            Ok(db) => {
                *self.current.write().unwrap_or_else(PoisonError::into_inner) = Some(Arc::new(db));
                tracing::info!(file = %self.path.display(), "store: database reopened");
                Ok(())
            }
            Err(error) => Err(StoreError::Io(format!(
                "cannot reopen {}: {error}",
                self.path.display()
            ))),
        }
    }

    /// Whether a reopen may be tried now, the last one having been at `last`: at most one every
    /// [`REOPEN_EVERY`] (a reopen may repair the file, which reads all of it; while the disk is
    /// full every batch fails, up to a hundred a second).
    pub(super) fn reopen_due(&self, last: Option<Instant>) -> bool {
        last.is_none_or(|at| at.elapsed() >= self.reopen_every)
    }

    /// Whether the file system takes a small write beside the database (64 KiB, synced, then
    /// removed): checked, while batches fail, before an empty batch tests the database itself.
    pub(super) fn disk_takes_writes(&self) -> bool {
        let Some(dir) = self.path.parent() else {
            return true;
        };
        let scratch = dir.join(".troupe-write-probe");
        let written = (|| -> std::io::Result<()> {
            use std::io::Write;
            let mut file = std::fs::File::create(&scratch)?;
            file.write_all(&[0u8; 64 * 1024])?;
            file.sync_all()
        })();
        let _ = std::fs::remove_file(&scratch);
        written.is_ok()
    }

    /// How soon the writer looks again while batches fail and nothing else comes.
    pub(super) fn retry_every(&self) -> Duration {
        self.reopen_every.max(Duration::from_millis(10))
    }

    /// For the writer, before a batch: the database, opening the file again first when an
    /// earlier reopen could not (at most every [`REOPEN_EVERY`]).
    pub(super) fn for_writer(
        &self,
        last_attempt: &mut Option<Instant>,
    ) -> Result<Arc<Database>, StoreError> {
        if let Ok(db) = self.get() {
            return Ok(db);
        }
        if !self.reopen_due(*last_attempt) {
            return self.get();
        }
        *last_attempt = Some(Instant::now());
        self.open_again()?;
        self.get()
    }
}

/// Drops the database (which releases the file) once the reads holding it are done; gives it
/// back when they hold it longer than [`READS_PATIENCE`].
fn release(old: Arc<Database>) -> Result<(), Arc<Database>> {
    let deadline = Instant::now() + READS_PATIENCE;
    let mut old = old;
    loop {
        match Arc::try_unwrap(old) {
            Ok(db) => {
                drop(db);
                return Ok(());
            }
            Err(shared) if Instant::now() < deadline => {
                old = shared;
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(shared) => return Err(shared),
        }
    }
}

/// Whether `error`, from beginning a write after a failed batch, says that only a new `Database`
/// writes again. redb answers `PreviousIo` after an I/O error (which it latches); `Corrupted`
/// ("allocator state was discarded by a failed integrity check or commit; reopen the database
/// to repair it") after a commit that failed otherwise, the allocator state it discarded being
/// rebuilt only by an open (a file truly damaged is repaired by the open, or refused by it, and
/// the writer tries again); `Io` when beginning itself failed to read the file (the error is
/// latched, and the next answer would be `PreviousIo`); `LockPoisoned` when a panic inside redb
/// left a lock poisoned, which only a new `Database` clears. None of these goes away by itself.
pub(super) fn needs_reopen(error: &redb::TransactionError) -> bool {
    use redb::StorageError;
    matches!(
        error,
        redb::TransactionError::Storage(
            StorageError::PreviousIo
                | StorageError::Corrupted(_)
                | StorageError::Io(_)
                | StorageError::LockPoisoned(_)
        )
    )
}

/// A file backend whose writes can be made to fail as on a full disk (tests).
#[cfg(test)]
pub(super) mod faulty {
    use std::fs::OpenOptions;
    use std::io;
    use std::ops::Bound;
    use std::path::Path;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use redb::backends::FileBackend;
    use redb::{BackendError, Database, StorageBackend};

    use super::Opener;

    /// Writes fail with ENOSPC while `full` is set; a sync panics while `panic_on_sync` is
    /// set (a commit that fails without an I/O error: redb then discards its allocator state
    /// and answers the next write with "Corrupted … reopen the database").
    #[derive(Debug)]
    pub(crate) struct FaultyFile {
        inner: FileBackend,
        full: Arc<AtomicBool>,
        panic_on_sync: Arc<AtomicBool>,
    }

    /// An opener over [`FaultyFile`]s that fail while `full` is set.
    pub(crate) fn opener(full: Arc<AtomicBool>) -> Opener {
        opener_with(full, Arc::default())
    }

    /// [`opener`], whose files also panic on sync while `panic_on_sync` is set.
    pub(crate) fn opener_with(full: Arc<AtomicBool>, panic_on_sync: Arc<AtomicBool>) -> Opener {
        Arc::new(move |path: &Path| {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(path)?;
            Database::builder().create_with_backend(FaultyFile {
                inner: FileBackend::new(file)?,
                full: full.clone(),
                panic_on_sync: panic_on_sync.clone(),
            })
        })
    }

    impl FaultyFile {
        fn check(&self) -> io::Result<()> {
            if self.full.load(Ordering::Relaxed) {
                Err(io::Error::from_raw_os_error(nix::libc::ENOSPC))
            } else {
                Ok(())
            }
        }
    }

    impl StorageBackend for FaultyFile {
        fn len(&self) -> io::Result<u64> {
            self.inner.len()
        }
        fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
            self.inner.read(offset, out)
        }
        fn set_len(&self, len: u64) -> io::Result<()> {
            self.check()?;
            self.inner.set_len(len)
        }
        fn sync_data(&self) -> io::Result<()> {
            self.check()?;
            assert!(
                !self.panic_on_sync.load(Ordering::Relaxed),
                "the sync panics (a test fault)"
            );
            self.inner.sync_data()
        }
        fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
            self.check()?;
            self.inner.write(offset, data)
        }
        fn close(&self) -> io::Result<()> {
            self.inner.close()
        }
        fn try_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
            self.inner.try_lock_range(start, end)
        }
        fn try_lock_shared_range(
            &self,
            start: Bound<u64>,
            end: Bound<u64>,
        ) -> Result<bool, BackendError> {
            self.inner.try_lock_shared_range(start, end)
        }
        fn lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
            self.inner.lock_range(start, end)
        }
        fn lock_shared_range(
            &self,
            start: Bound<u64>,
            end: Bound<u64>,
        ) -> Result<(), BackendError> {
            self.inner.lock_shared_range(start, end)
        }
        fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
            self.inner.unlock_range(start, end)
        }
        fn query_lock_range(
            &self,
            start: Bound<u64>,
            end: Bound<u64>,
        ) -> Result<bool, BackendError> {
            self.inner.query_lock_range(start, end)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use redb::{ReadableDatabase, TableDefinition, TransactionError};
    use troupe_actors::session::StoreError;

    use super::{DbSlot, faulty, needs_reopen};

    const TABLE: TableDefinition<'static, u64, u64> = TableDefinition::new("t");

    /// Regression: after a commit that failed without an I/O error, redb answers every write
    /// with `Corrupted("… reopen the database to repair it")`, and the writer took only
    /// `PreviousIo` for a database to reopen: every batch failed until the node restarted.
    #[test]
    fn a_database_that_says_reopen_to_repair_is_poisoned_and_a_reopen_repairs_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let panic_on_sync = Arc::new(AtomicBool::new(false));
        let opener = faulty::opener_with(Arc::default(), panic_on_sync.clone());
        let db = opener(&path).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(TABLE).unwrap().insert(1, 1).unwrap();
        txn.commit().unwrap();
        assert!(!DbSlot::poisoned(&db), "a healthy database");

        // A commit that fails by a panic in the backend, not an I/O error.
        panic_on_sync.store(true, Ordering::Relaxed);
        let txn = db.begin_write().unwrap();
        txn.open_table(TABLE).unwrap().insert(2, 2).unwrap();
        let failed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| txn.commit()));
        assert!(failed.is_err());
        panic_on_sync.store(false, Ordering::Relaxed);
        let refused = db.begin_write().err().expect("writes are refused");
        assert!(
            matches!(
                &refused,
                TransactionError::Storage(redb::StorageError::Corrupted(message))
                    if message.contains("reopen")
            ),
            "{refused:?}"
        );
        assert!(DbSlot::poisoned(&db));

        let slot = DbSlot::new(path, opener, db);
        slot.reopen(&StoreError::Io("the commit failed".into()))
            .unwrap();
        let db = slot.get().unwrap();
        assert!(!DbSlot::poisoned(&db), "writes again after the reopen");
        let txn = db.begin_write().unwrap();
        txn.open_table(TABLE).unwrap().insert(3, 3).unwrap();
        txn.commit().unwrap();
        let read = db.begin_read().unwrap();
        let table = read.open_table(TABLE).unwrap();
        assert_eq!(table.get(1).unwrap().unwrap().value(), 1, "kept");
        assert_eq!(table.get(3).unwrap().unwrap().value(), 3);
    }

    #[test]
    fn only_errors_a_new_database_mends_call_for_a_reopen() {
        use redb::StorageError;
        let storage = |error| TransactionError::Storage(error);
        assert!(needs_reopen(&storage(StorageError::PreviousIo)));
        assert!(needs_reopen(&storage(StorageError::Corrupted("x".into()))));
        assert!(needs_reopen(&storage(StorageError::Io(
            std::io::Error::other("x")
        ))));
        assert!(!needs_reopen(&storage(StorageError::ValueTooLarge(1))));
        assert!(!needs_reopen(&storage(StorageError::Unsupported)));
        assert!(!needs_reopen(&storage(StorageError::DatabaseClosed)));
        assert!(!needs_reopen(&TransactionError::WouldBlock));
    }
}
