//! The store's open database, and opening it again after an I/O error.
//!
//! redb remembers a failed write, resize or sync of its file (a full disk, an I/O error) and
//! refuses every write transaction after it ("Previous I/O error occurred. Please close and
//! re-open the database") until that `Database` is dropped. So the writer, when a batch fails and
//! the database refuses to begin another, takes the database out of the [`DbSlot`] (readers
//! are told to try again meanwhile), waits for the reads still holding it, drops it (which
//! releases the file) and opens the file again (redb repairs it if it must). What the failed batch
//! held was rolled back and its waiters told; once the disk has room again, the node stores
//! again, without a restart.

use std::path::{Path, PathBuf};
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
    /// [`REOPEN_EVERY`]; tests make it zero.
    reopen_every: Duration,
}

impl DbSlot {
    pub(super) fn new(path: PathBuf, opener: Opener, db: Database) -> Self {
        Self {
            path,
            opener,
            current: RwLock::new(Some(Arc::new(db))),
            reopen_every: REOPEN_EVERY,
        }
    }

    /// Tests: reopen attempts as often as batches come.
    #[cfg(test)]
    pub(super) fn retry_at_once(mut self) -> Self {
        self.reopen_every = Duration::ZERO;
        self
    }

    /// The database, unless a reopen is under way (or failed: the writer tries again).
    pub(super) fn get(&self) -> Result<Arc<Database>, StoreError> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .ok_or_else(|| {
                StoreError::Io(
                    "the store is reopening its file after an I/O error (a full disk?); try again"
                        .into(),
                )
            })
    }

    /// Whether the database refuses new writes for an earlier I/O error: it must be reopened.
    pub(super) fn poisoned(db: &Database) -> bool {
        match db.begin_write() {
            Err(redb::TransactionError::Storage(redb::StorageError::PreviousIo)) => true,
            Ok(txn) => {
                let _ = txn.abort();
                false
            }
            Err(_) => false,
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
            "store: the database refuses writes after an I/O error; reopening it"
        );
        if let Some(old) = taken {
            let deadline = Instant::now() + READS_PATIENCE;
            let mut old = old;
            loop {
                match Arc::try_unwrap(old) {
                    Ok(db) => {
                        drop(db);
                        break;
                    }
                    Err(shared) if Instant::now() < deadline => {
                        old = shared;
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    Err(shared) => {
                        *self.current.write().unwrap_or_else(PoisonError::into_inner) =
                            Some(shared);
                        return Err(StoreError::Io(format!(
                            "cannot reopen {}: reads held the database for {READS_PATIENCE:?}",
                            self.path.display()
                        )));
                    }
                }
            }
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

    /// Writes fail with ENOSPC while `full` is set.
    #[derive(Debug)]
    pub(crate) struct FaultyFile {
        inner: FileBackend,
        full: Arc<AtomicBool>,
    }

    /// An opener over [`FaultyFile`]s that fail while `full` is set.
    pub(crate) fn opener(full: Arc<AtomicBool>) -> Opener {
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
