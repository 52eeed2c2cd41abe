//! The node's store: sessions, their transitions and output logs, and the event log, in one redb
//! file (`<data_dir>/troupe.redb`). Implements the actors' ports
//! [`SessionStore`] and [`EventStore`], plus the read side the front ends need (listings with
//! filters and cursors, output pages, replay of events older than the bus's ring).
//!
//! One OS thread writes (see `writer.rs`): requests queue on a channel and are applied in group
//! commits, one durable transaction per batch, so a create or transition resolves only once it
//! is on disk, and event and output appends never block their caller. Reads run in redb read
//! transactions on tokio's blocking pool, beside the writer. Values are JSON; the cluster wire
//! codec is not used here. This module never interprets what a session does: it stores records
//! and checks transitions against the state machine, nothing more.

mod file;
mod query;
mod read;
mod schema;
mod writer;

#[cfg(test)]
mod id_tests;
#[cfg(test)]
mod tests;

use std::ops::RangeInclusive;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use futures::future::BoxFuture;
use redb::{Database, ReadableDatabase, ReadableTable};
use tokio::sync::oneshot;
use troupe_actors::event::{BusItem, EventFilter, EventId, EventStore, OutputStream, StoreResume};
use troupe_actors::ids::{NodeId, SessionId, Timestamp};
use troupe_actors::session::{LoggedLine, SessionRecord, SessionStore, StoreError, Transition};

pub use query::{
    DEFAULT_PAGE, EventsPage, MAX_EVENT_PAGE, MAX_EVENT_PAGE_BYTES, MAX_EVENT_SCAN,
    MAX_OUTPUT_PAGE, MAX_OUTPUT_PAGE_BYTES, MAX_PAGE, MAX_SESSION_PAGE_BYTES, MAX_SESSION_SCAN,
    OutputLine, OutputPage, PruneReport, SessionPage, SessionQuery, UnstoredCursor, cursor_after,
};

use schema::{META, META_SCHEMA, OrIo, SCHEMA_VERSION};
use writer::{Reply, Request, Reservation, Stats, Writer};

/// Name of the store's file in the data directory.
pub const FILE_NAME: &str = "troupe.redb";

/// Limits and schedules of the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreConfig {
    /// Output lines kept per session; later lines are counted as truncated.
    pub max_output_lines: u64,
    /// Output bytes kept per session; later lines are counted as truncated.
    pub max_output_bytes: u64,
    /// Events older than this are deleted.
    pub event_retention: Duration,
    /// Sessions in a terminal state that ended longer ago than this are deleted, with their
    /// transitions, output log and idempotency key; `None` keeps every session forever.
    /// Sessions that have not ended are never deleted.
    pub session_retention: Option<Duration>,
    /// Most sessions one automatic retention pass deletes (at least one), so that a first pass
    /// over a large store does not hold the writer for long; the next passes, which follow at
    /// once, go on where it stopped. [`Store::prune`] is not bounded.
    pub session_prune_chunk: usize,
    /// The event log is kept under about this many bytes (oldest events go first).
    pub event_retention_bytes: u64,
    /// The event log is kept under this many events (oldest events go first).
    pub event_retention_count: u64,
    /// How often age-based retention runs (budget-based retention runs with every batch).
    pub prune_interval: Duration,
    /// Most requests in one group commit.
    pub max_batch: usize,
    /// Output and event appends allowed to wait for the writer; past that they are dropped,
    /// counted and logged, so a stalled disk cannot exhaust memory.
    pub max_pending_appends: usize,
    /// Bytes of output and event appends allowed to wait for the writer (their lines and event
    /// texts, about what they hold in memory): an append that would take the waiting bytes past
    /// this is dropped, counted and logged like one past `max_pending_appends`. One output
    /// append may hold 256 lines of 16 KiB, so the count alone does not bound memory.
    pub max_pending_append_bytes: usize,
    /// Save the allocator state with every commit so reopening after a crash is instant instead
    /// of a walk over the whole file (costs a second fsync per commit).
    pub quick_repair: bool,
    /// A batch of appends only (events, output lines: nobody waits for them) is committed at
    /// most this soon after the previous commit, gathering what arrives meanwhile. Under a
    /// flood that bounds commits (each a durable write with its syncs) to about one per linger
    /// instead of one back to back after another; a sparse append, or any request someone
    /// waits for (a create, a transition, a flush, an id reservation), commits at once.
    pub append_linger: Duration,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            max_output_lines: 100_000,
            max_output_bytes: 16 * 1024 * 1024,
            event_retention: Duration::from_secs(7 * 24 * 3600),
            session_retention: Some(Duration::from_secs(30 * 24 * 3600)),
            session_prune_chunk: 100,
            event_retention_bytes: 256 * 1024 * 1024,
            event_retention_count: 1_000_000,
            prune_interval: Duration::from_secs(60),
            max_batch: 4096,
            max_pending_appends: 100_000,
            max_pending_append_bytes: 256 * 1024 * 1024,
            quick_repair: true,
            append_linger: Duration::from_millis(10),
        }
    }
}

/// What the store has done so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Transactions committed.
    pub commits: u64,
    /// Requests applied in them (so `requests / commits` is the mean batch).
    pub requests: u64,
    /// Time spent committing (writing and syncing the file), in total.
    pub commit_time: Duration,
    /// Batches rolled back after a storage failure.
    pub failed_batches: u64,
    /// Output and event appends dropped (too many pending, or too many bytes of them, or the
    /// store was closed).
    pub dropped_appends: u64,
    /// Events deleted by retention.
    pub pruned_events: u64,
    /// Ended sessions deleted by retention (with their transitions and output).
    pub pruned_sessions: u64,
}

/// The node's store. Cheap to clone; every clone talks to the same writer thread.
///
/// Close it with [`Store::close`] to flush what is queued. Dropping the last handle without
/// closing also commits what was queued, and waits (blocking) for the writer thread to finish.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    db: Arc<file::DbSlot>,
    node: NodeId,
    path: PathBuf,
    config: StoreConfig,
    stats: Arc<Stats>,
    reservation: Arc<Reservation>,
    /// Where the writer has got to with event appends ([`EventStore::written`]).
    written: tokio::sync::watch::Receiver<writer::Written>,
    /// See [`Store::write_failure`].
    failing: tokio::sync::watch::Receiver<Option<String>>,
    tx: Option<mpsc::Sender<Request>>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the channel lets the writer commit what is queued and stop; waiting for it
        // releases the file, so the store can be reopened at once.
        drop(self.tx.take());
        let Some(thread) = self.thread.take() else {
            return;
        };
        // A lingering writer notices the closed channel when it wakes.
        thread.thread().unpark();
        if thread.join().is_err() {
            tracing::error!("store: the writer thread panicked");
        }
    }
}

impl Store {
    /// Opens (or creates) `<data_dir>/troupe.redb` for node `node` and starts the writer thread.
    /// After a crash, opening repairs the file first.
    pub async fn open(
        data_dir: impl Into<PathBuf>,
        node: NodeId,
        config: StoreConfig,
    ) -> Result<Self, StoreError> {
        let data_dir = data_dir.into();
        tokio::task::spawn_blocking(move || {
            Self::open_blocking(&data_dir, node, config, file::file_opener())
        })
        .await
        .map_err(|error| StoreError::Io(format!("opening the store failed: {error}")))?
    }

    /// Opens the store with `opener` (tests give one whose writes can fail).
    fn open_blocking(
        data_dir: &Path,
        node: NodeId,
        config: StoreConfig,
        opener: file::Opener,
    ) -> Result<Self, StoreError> {
        // Records hold what sessions were given (environment values included): owner only.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(data_dir)
            .map_err(|error| {
                StoreError::Io(format!(
                    "cannot create the data directory {}: {error}",
                    data_dir.display()
                ))
            })?;
        let path = data_dir.join(FILE_NAME);
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(|error| {
                StoreError::Io(format!("cannot create {}: {error}", path.display()))
            })?;
        // The file's directory entry (and the directory's, if it was just made) must be on disk
        // before anything committed in the file is acknowledged: redb syncs the file only.
        for dir in [Some(data_dir), data_dir.parent()].into_iter().flatten() {
            if let Err(error) = std::fs::File::open(dir).and_then(|dir| dir.sync_all()) {
                tracing::debug!(dir = %dir.display(), %error, "store: cannot sync a directory");
            }
        }
        let db = opener(&path).map_err(|error| match error {
            redb::DatabaseError::DatabaseAlreadyOpen => StoreError::InUse(format!(
                "{} is already open; is another troupe node using the data directory {}?",
                path.display(),
                data_dir.display()
            )),
            redb::DatabaseError::Storage(redb::StorageError::Io(error))
                if error.kind() != std::io::ErrorKind::InvalidData =>
            {
                StoreError::Io(format!("cannot open {}: {error}", path.display()))
            }
            error => StoreError::Io(format!(
                "cannot open {}: {error}; if the file is damaged or not a troupe store, move \
                     it aside (the node then starts with an empty store) or restore it from a \
                     backup",
                path.display()
            )),
        })?;
        initialize(&db, &path)?;
        let reserved = read::reserved(&db, &node)?;
        let slot = file::DbSlot::new(path.clone(), opener, db);
        #[cfg(test)]
        let slot = slot.retry_at_once();
        let db = Arc::new(slot);
        let stats = Arc::new(Stats::default());
        let (reservation, durable) = Reservation::new(reserved);
        let reservation = Arc::new(reservation);
        let (tx, rx) = mpsc::channel();
        let (written_tx, written) = tokio::sync::watch::channel(writer::Written::default());
        let (failing_tx, failing) = tokio::sync::watch::channel(None);
        let writer = Writer {
            db: db.clone(),
            node: node.clone(),
            config: config.clone(),
            rx,
            stats: stats.clone(),
            reservation: reservation.clone(),
            durable,
            written: written_tx,
            failing: failing_tx,
        };
        let thread = std::thread::Builder::new()
            .name("troupe-store".into())
            .spawn(move || writer.run())
            .map_err(|error| StoreError::Io(format!("cannot start the store writer: {error}")))?;
        Ok(Self {
            inner: Arc::new(Inner {
                db,
                node,
                path,
                config,
                stats,
                reservation,
                written,
                failing,
                tx: Some(tx),
                thread: Some(thread),
            }),
        })
    }

    /// The store's file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The node whose events count for [`StoreResume::last_seq`].
    pub fn node(&self) -> &NodeId {
        &self.inner.node
    }

    /// The limits in force.
    pub fn config(&self) -> &StoreConfig {
        &self.inner.config
    }

    /// Counters of the writer.
    pub fn stats(&self) -> StoreStats {
        let stats = &self.inner.stats;
        StoreStats {
            commits: stats.commits.load(Ordering::Relaxed),
            requests: stats.requests.load(Ordering::Relaxed),
            commit_time: Duration::from_nanos(stats.commit_nanos.load(Ordering::Relaxed)),
            failed_batches: stats.failed_batches.load(Ordering::Relaxed),
            dropped_appends: stats.dropped_appends.load(Ordering::Relaxed),
            pruned_events: stats.pruned_events.load(Ordering::Relaxed),
            pruned_sessions: stats.pruned_sessions.load(Ordering::Relaxed),
        }
    }

    /// While write batches fail (a full disk, an I/O error), the error of the first of them;
    /// `None` again once one commits. Changes only at those two moments (the node reports it
    /// to its health).
    pub fn write_failure(&self) -> tokio::sync::watch::Receiver<Option<String>> {
        self.inner.failing.clone()
    }

    /// [`Store::open`] on a file whose writes fail with ENOSPC while `full` is set.
    #[cfg(test)]
    pub(crate) async fn open_faulty(
        data_dir: impl Into<PathBuf>,
        node: NodeId,
        config: StoreConfig,
        full: Arc<std::sync::atomic::AtomicBool>,
    ) -> Result<Self, StoreError> {
        let data_dir = data_dir.into();
        tokio::task::spawn_blocking(move || {
            Self::open_blocking(&data_dir, node, config, file::faulty::opener(full))
        })
        .await
        .map_err(|error| StoreError::Io(format!("opening the store failed: {error}")))?
    }

    /// Makes the next `batches` write batches that hold an event append fail as a storage
    /// failure would (rolled back, their waiters told).
    #[cfg(test)]
    pub(crate) fn fail_event_batches(&self, batches: u64) {
        self.inner
            .stats
            .fail_event_batches
            .store(batches, Ordering::Relaxed);
    }

    /// Waits (bounded) until the writer sleeps in a linger over queued appends.
    #[cfg(test)]
    pub(crate) async fn until_lingering(&self) {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !self.inner.stats.lingering.load(Ordering::Acquire) {
            assert!(
                std::time::Instant::now() < deadline,
                "the store's writer did not start lingering within 30 s"
            );
            tokio::task::yield_now().await;
        }
    }

    /// Resolves once everything queued before it (appends included) is durable.
    pub async fn flush(&self) -> Result<(), StoreError> {
        let (reply, answer) = oneshot::channel();
        self.send(Request::Flush(Reply::Async(reply)))?;
        answered(answer.await)
    }

    /// Commits everything queued, stops the writer and releases the file (the data directory
    /// can be opened again at once), even while other handles live on: they get "the store is
    /// closed" afterwards.
    pub async fn close(self) -> Result<(), StoreError> {
        let (reply, answer) = oneshot::channel();
        self.send(Request::Close(Reply::Async(reply)))?;
        answered(answer.await)
    }

    /// Applies retention as of `now` (the writer also does so on its own schedule, with the
    /// wall clock): deletes events older than `now - event_retention`, and the oldest ones while
    /// the log is over its budgets; and sessions in a terminal state that ended before
    /// `now - session_retention`, with their transitions, output and idempotency key. Unlike
    /// the automatic passes, this one finishes the job in one transaction.
    pub async fn prune(&self, now: Timestamp) -> Result<PruneReport, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.send(Request::Prune { now, reply })?;
        answer.await.map_err(|_| closed())?
    }

    /// A page of sessions, newest first (by `created_at`, then id), filtered. At most
    /// [`MAX_SESSION_SCAN`] sessions are examined: past that the page ends early (possibly
    /// empty) with a `next_cursor` where the scan stopped.
    pub async fn list(&self, query: SessionQuery) -> Result<SessionPage, StoreError> {
        self.read(move |db| read::list(db, &query, MAX_SESSION_SCAN))
            .await
    }

    /// Output lines after line `offset` (0 for the first line), at most `limit` (clamped to
    /// [`MAX_OUTPUT_PAGE`]).
    pub async fn output(
        &self,
        id: &SessionId,
        offset: u64,
        limit: usize,
    ) -> Result<OutputPage, StoreError> {
        let id = id.clone();
        self.read(move |db| read::output(db, &id, offset, limit))
            .await
    }

    /// A session's transitions, oldest first.
    pub async fn transitions(&self, id: &SessionId) -> Result<Vec<Transition>, StoreError> {
        let id = id.clone();
        self.read(move |db| read::transitions(db, &id)).await
    }

    /// Events after `after` (in arrival order) that match `filter`, at most `limit` (clamped to
    /// [`MAX_EVENT_PAGE`]) and [`MAX_EVENT_PAGE_BYTES`] of them (at least one), for a replay
    /// older than the bus's ring. The log lags the bus by at
    /// most one batch; the ring covers the difference.
    pub async fn events_after(
        &self,
        after: &EventId,
        filter: &EventFilter,
        limit: usize,
    ) -> Result<EventsPage, StoreError> {
        let (after, filter) = (after.clone(), filter.clone());
        self.read(move |db| read::events_after(db, &after, &filter, limit))
            .await
    }

    /// Where a resume after `cursor` can start when the log does not hold `cursor` itself
    /// ([`Store::events_after`] answered `found: false`): after the newest stored event of its
    /// node with a lower sequence number, else at the log's oldest event; see [`UnstoredCursor`].
    pub async fn unstored_cursor(&self, cursor: &EventId) -> Result<UnstoredCursor, StoreError> {
        let cursor = cursor.clone();
        self.read(move |db| read::unstored_cursor(db, &cursor))
            .await
    }

    /// Events of `node` with a sequence number above `after`, in sequence order, at most `limit`
    /// (clamped to [`MAX_EVENT_PAGE`]): the relay's backfill, which must not depend on the event
    /// `after` itself being stored (it may have been lost in a crash, or pruned).
    pub async fn node_events_after(
        &self,
        node: &NodeId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<BusItem>, StoreError> {
        let node = node.clone();
        self.read(move |db| read::node_events_after(db, &node, after, limit))
            .await
    }

    /// Reserves this node's event ids through `through`: resolves once the reservation is
    /// durable, so that [`EventStore::resume`] after any crash answers at least `through`.
    /// Reservations do not queue behind appends (see the writer).
    pub fn reserve_ids(
        &self,
        through: u64,
    ) -> impl Future<Output = Result<(), StoreError>> + Send + 'static {
        let reservation = self.inner.reservation.clone();
        reservation.wanted.fetch_max(through, Ordering::AcqRel);
        let sent = self.send(Request::Wake);
        let mut durable = reservation.durable.clone();
        async move {
            sent?;
            durable
                .wait_for(|durable| *durable >= through)
                .await
                .map_err(|_| closed())?;
            Ok(())
        }
    }

    /// This node's id reservation on disk now.
    pub fn reserved_ids(&self) -> u64 {
        *self.inner.reservation.durable.borrow()
    }

    /// Events at arrival positions after `after_pos` that match `filter`, bounded as
    /// [`Store::events_after`]'s: the next page of a replay, continuing from the previous page's
    /// `through_pos`.
    pub async fn events_after_pos(
        &self,
        after_pos: u64,
        filter: &EventFilter,
        limit: usize,
    ) -> Result<EventsPage, StoreError> {
        let filter = filter.clone();
        self.read(move |db| read::events_after_pos(db, after_pos, &filter, limit))
            .await
    }

    /// The arrival position of the oldest event the log holds; `None` when it holds none.
    /// Retention deletes from the oldest on, so a replay that continues after a position the
    /// log held lost events when this is past the next one.
    pub async fn oldest_event_pos(&self) -> Result<Option<u64>, StoreError> {
        self.read(|db| {
            let txn = db.begin_read().or_io("begin a read transaction")?;
            let events = txn.open_table(schema::EVENTS).or_io("open table events")?;
            Ok(events
                .first()
                .or_io("read events")?
                .map(|(pos, _)| pos.value()))
        })
        .await
    }

    fn send(&self, request: Request) -> Result<(), StoreError> {
        let tx = self.inner.tx.as_ref().ok_or_else(closed)?;
        let append = request.is_append();
        tx.send(request).map_err(|_| closed())?;
        // A writer gathering appends sleeps until its linger ends and is not woken by more
        // appends (one wake-up of another thread per event would cost the publisher more than
        // the append); anything else ends the linger at once.
        if !append && let Some(thread) = &self.inner.thread {
            thread.thread().unpark();
        }
        Ok(())
    }

    /// Queues an append unless too many, or too many bytes of them, are waiting already
    /// (`bounded`; an append whose queue is bounded elsewhere goes in regardless). The writer
    /// releases both counts when it takes the append.
    fn enqueue_append(&self, request: Request, bounded: bool) {
        let (stats, config) = (&self.inner.stats, &self.inner.config);
        let bytes = request.append_bytes();
        let dropped = |why| {
            stats.pending_appends.fetch_sub(1, Ordering::Relaxed);
            stats
                .pending_append_bytes
                .fetch_sub(bytes, Ordering::Relaxed);
            self.drop_append(why);
        };
        let pending = stats.pending_appends.fetch_add(1, Ordering::Relaxed);
        let pending_bytes = stats
            .pending_append_bytes
            .fetch_add(bytes, Ordering::Relaxed);
        if bounded && pending >= config.max_pending_appends {
            dropped("too many appends are waiting for the disk");
            return;
        }
        if bounded && pending_bytes.saturating_add(bytes) > config.max_pending_append_bytes {
            dropped("too many bytes of appends are waiting for the disk");
            return;
        }
        if self.send(request).is_err() {
            dropped("the store is closed");
        }
    }

    fn drop_append(&self, why: &str) {
        let dropped = self
            .inner
            .stats
            .dropped_appends
            .fetch_add(1, Ordering::Relaxed);
        // The first drop and then every 1000th, so a flood does not flood the log too.
        if dropped.is_multiple_of(1000) {
            tracing::warn!(dropped = dropped + 1, "store: append dropped: {why}");
        }
    }

    /// Runs a blocking read on tokio's blocking pool.
    fn read<T: Send + 'static>(
        &self,
        query: impl FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
    ) -> impl Future<Output = Result<T, StoreError>> + Send + 'static {
        let db = self.inner.db.clone();
        async move {
            tokio::task::spawn_blocking(move || query(&*db.get()?))
                .await
                .map_err(|error| StoreError::Io(format!("a store read failed: {error}")))?
        }
    }

    /// Waits (blocking) until everything queued is durable; for `resume`, which is synchronous.
    fn flush_blocking(&self) -> Result<(), StoreError> {
        let (reply, answer) = mpsc::sync_channel(1);
        self.send(Request::Flush(Reply::Blocking(reply)))?;
        answer.recv().map_err(|_| closed())?
    }
}

fn closed() -> StoreError {
    StoreError::Io("the store is closed".into())
}

fn answered(
    answer: Result<Result<(), StoreError>, oneshot::error::RecvError>,
) -> Result<(), StoreError> {
    answer.map_err(|_| closed())?
}

/// Creates every table and checks the schema version.
fn initialize(db: &Database, path: &Path) -> Result<(), StoreError> {
    let txn = db.begin_write().or_io("begin the first write")?;
    {
        txn.open_table(schema::SESSIONS).or_io("create tables")?;
        txn.open_table(schema::SESSION_ORDER)
            .or_io("create tables")?;
        txn.open_table(schema::UNFINISHED).or_io("create tables")?;
        txn.open_table(schema::TRANSITIONS).or_io("create tables")?;
        txn.open_table(schema::OUTPUT).or_io("create tables")?;
        txn.open_table(schema::OUTPUT_COUNTERS)
            .or_io("create tables")?;
        txn.open_table(schema::IDEMPOTENCY).or_io("create tables")?;
        txn.open_table(schema::EVENTS).or_io("create tables")?;
        txn.open_table(schema::EVENT_INDEX).or_io("create tables")?;
        let mut meta = txn.open_table(META).or_io("create tables")?;
        match schema::meta_get(&meta, META_SCHEMA).or_io("read meta")? {
            0 => {
                meta.insert(META_SCHEMA, SCHEMA_VERSION)
                    .or_io("write meta")?;
            }
            SCHEMA_VERSION => {}
            other => {
                return Err(StoreError::Io(format!(
                    "{} has store schema version {other}; this troupe reads version \
                     {SCHEMA_VERSION}. Use a matching troupe or another data directory.",
                    path.display()
                )));
            }
        }
    }
    txn.commit().or_io("commit the first write")
}

impl SessionStore for Store {
    fn create(&self, record: SessionRecord) -> BoxFuture<'static, Result<(), StoreError>> {
        let (reply, answer) = oneshot::channel();
        let sent = self.send(Request::Create {
            record: Box::new(record),
            reply: Reply::Async(reply),
        });
        Box::pin(async move {
            sent?;
            answered(answer.await)
        })
    }

    fn transition(
        &self,
        record: SessionRecord,
        transition: Transition,
    ) -> BoxFuture<'static, Result<(), StoreError>> {
        let (reply, answer) = oneshot::channel();
        let sent = self.send(Request::Transition {
            record: Box::new(record),
            transition,
            reply: Reply::Async(reply),
        });
        Box::pin(async move {
            sent?;
            answered(answer.await)
        })
    }

    fn update(&self, record: SessionRecord) -> BoxFuture<'static, Result<(), StoreError>> {
        let (reply, answer) = oneshot::channel();
        let sent = self.send(Request::Update {
            record: Box::new(record),
            reply: Reply::Async(reply),
        });
        Box::pin(async move {
            sent?;
            answered(answer.await)
        })
    }

    fn read_output(
        &self,
        id: &SessionId,
        after: u64,
        limit: usize,
    ) -> BoxFuture<'static, Result<Vec<LoggedLine>, StoreError>> {
        let (store, id) = (self.clone(), id.clone());
        Box::pin(async move {
            Ok(store
                .output(&id, after, limit)
                .await?
                .lines
                .into_iter()
                .map(|line| LoggedLine {
                    line: line.line,
                    stream: line.stream,
                    text: line.text,
                })
                .collect())
        })
    }

    fn append_output(
        &self,
        id: &SessionId,
        stream: OutputStream,
        first_line: u64,
        lines: &[String],
    ) {
        if lines.is_empty() {
            return;
        }
        self.enqueue_append(
            Request::Output {
                id: id.clone(),
                stream,
                first_line,
                lines: lines.to_vec(),
            },
            true,
        );
    }

    fn find_by_key(
        &self,
        key: &str,
    ) -> BoxFuture<'static, Result<Option<SessionRecord>, StoreError>> {
        let key = key.to_owned();
        Box::pin(self.read(move |db| read::find_by_key(db, &key)))
    }

    fn get(&self, id: &SessionId) -> BoxFuture<'static, Result<Option<SessionRecord>, StoreError>> {
        let id = id.clone();
        Box::pin(self.read(move |db| read::get(db, &id)))
    }

    fn output_lines(&self, id: &SessionId) -> BoxFuture<'static, Result<u64, StoreError>> {
        let store = self.clone();
        let id = id.clone();
        Box::pin(async move {
            store.flush().await?;
            store.read(move |db| read::output_lines(db, &id)).await
        })
    }

    fn unfinished(&self) -> BoxFuture<'static, Result<Vec<SessionRecord>, StoreError>> {
        Box::pin(self.read(read::unfinished))
    }
}

impl EventStore for Store {
    /// Events of other nodes are never dropped for a slow disk: the relay acknowledges them only
    /// once written ([`EventStore::written`]), so their queue is bounded by the relay's window.
    fn append(&self, item: &BusItem) {
        let relayed = item.event.id.node != self.inner.node;
        let request = Request::Event {
            item: item.clone(),
            arrival: item.pos,
        };
        self.enqueue_append(request, !relayed);
    }

    /// Never dropped for a slow disk, like every relayed event.
    fn append_again(&self, item: &BusItem, arrival: u64) {
        let request = Request::Event {
            item: item.clone(),
            arrival,
        };
        self.enqueue_append(request, false);
    }

    fn written(
        &self,
        positions: RangeInclusive<u64>,
    ) -> Option<BoxFuture<'static, Result<(), String>>> {
        let mut written = self.inner.written.clone();
        Some(Box::pin(async move {
            let end = *positions.end();
            let done = written
                .wait_for(|written| written.through >= end)
                .await
                .map_err(|_| "the store has closed".to_owned())?;
            if done.failed_within(&positions) {
                return Err("a write of the event log failed (the store logged why)".into());
            }
            Ok(())
        }))
    }

    /// Flushes queued appends first (blocking the caller for one commit, so a restarted bus
    /// sees every event it accepted), then reads the counters (this node's last sequence number
    /// is its reservation when that is higher: after a crash, ids handed out but never stored
    /// are not reused), each other node's last stored sequence number, and the newest events.
    /// The trait cannot report a failure: one is logged and the counters read so far are
    /// returned.
    fn resume(&self, ring_capacity: usize) -> StoreResume {
        if let Err(error) = self.flush_blocking() {
            tracing::warn!(%error, "store: could not flush before resuming the event bus");
        }
        let read = self
            .inner
            .db
            .get()
            .and_then(|db| read::resume(&db, &self.inner.node, ring_capacity));
        match read {
            Ok(resume) => resume,
            Err(error) => {
                tracing::error!(
                    %error,
                    "store: cannot read the event log; the bus starts from zero and event ids \
                     may repeat"
                );
                StoreResume {
                    last_seq: self.reserved_ids(),
                    ..StoreResume::default()
                }
            }
        }
    }

    fn reserve(&self, through: u64) -> Option<BoxFuture<'static, Result<(), String>>> {
        let reserving = self.reserve_ids(through);
        Some(Box::pin(async move {
            reserving.await.map_err(|error| error.to_string())
        }))
    }

    fn relay_floor(&self, node: &NodeId, seq: u64) {
        let request = Request::RelayFloor {
            node: node.clone(),
            seq,
        };
        if let Err(error) = self.send(request) {
            tracing::warn!(%error, %node, seq, "cannot keep where a relayed stream continues");
        }
    }

    fn relay_lost(&self, node: &NodeId, after: u64, through: u64) {
        let request = Request::RelayLost {
            node: node.clone(),
            after,
            through,
        };
        if let Err(error) = self.send(request) {
            tracing::warn!(%error, %node, after, through, "cannot record relayed events as lost");
        }
    }

    fn release(&self, last: u64) {
        if let Err(error) = self.send(Request::Release(last)) {
            tracing::warn!(
                %error,
                last,
                "store: the event id reservation was not released; the next start skips past it"
            );
        }
    }
}
