//! The store's single writer: one OS thread owns every write transaction.
//!
//! Group commit: the thread takes every request queued at the moment (up to
//! `StoreConfig::max_batch`), applies them in order in ONE write transaction, commits once with
//! `Durability::Immediate`, and only then answers the waiters. Creates and transitions are
//! awaited, so a caller learns of success only once its write is on disk; output and event appends
//! ride along in the same batches unanswered. One fsync is shared by everything in a batch, which
//! is what makes hundreds of durable transitions per second possible.
//!
//! A batch of appends only waits up to `StoreConfig::append_linger` after the previous commit
//! before it commits, gathering more: under a flood of events and output that bounds the commits
//! (and their syncs, the writer's main cost) instead of running them back to back; a request
//! someone waits for ends that wait at once.
//!
//! A request the store refuses (a conflict, a duplicate, a corrupt stored value) is answered with
//! its error and writes nothing; the rest of the batch goes ahead. A storage failure aborts the
//! whole transaction: every waiter of the batch gets the error, and the appends of that batch are
//! lost (and logged); [`Written`] keeps which positions they held, so that the relay fetches
//! another node's events again rather than acknowledging them. An event already stored (by
//! `(node, seq)`) is not stored twice. Retention (of the event log and of ended sessions) runs
//! here too, inside the batches' transactions.
//!
//! Id reservations (see [`Reservation`]) ride along too: every batch writes the reservation
//! wanted at its start, and once the batch is committed the reservation is published as durable.
//! They do not queue behind appends, so a backlog of appends cannot stall publishing.
//!
//! This thread never blocks on anything but the channel, its linger's sleep (see [`linger`]) and
//! the disk, and never calls back into async code: replies go through oneshot channels.

use std::collections::{HashMap, VecDeque};
use std::ops::RangeInclusive;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TryRecvError};
use std::time::{Duration, Instant};

use redb::{Database, Durability, ReadableTable, ReadableTableMetadata, Table, WriteTransaction};
use serde::Deserialize;
use tokio::sync::oneshot;
use troupe_actors::event::{BusItem, Event, EventData, EventId, OutputStream};
use troupe_actors::ids::{NodeId, SessionId, Timestamp};
use troupe_actors::session::{SessionRecord, StoreError, Transition};

use super::StoreConfig;
use super::file::DbSlot;
use super::query::PruneReport;
use super::schema::{
    EVENT_INDEX, EVENTS, IDEMPOTENCY, META, META_EVENT_BYTES, META_EVENT_COUNT, META_LAST_POS,
    OUTPUT, OUTPUT_COUNTERS, OutputCounters, SESSION_ORDER, SESSIONS, TRANSITIONS, UNFINISHED,
    corrupt, decode, encode, event_overhead, last_seq_key, meta_get, relay_gap_key, reserved_key,
};

/// Most events one automatic retention pass deletes, so a commit stays short; the rest goes in
/// the next passes, which follow at once.
const PRUNE_CHUNK: u64 = 10_000;

/// How far ahead of this node's clock an event may be dated and still be aged by its own date.
/// One dated further (a peer whose clock is ahead) is aged by arrival instead: it goes with the
/// first event that arrived after it and is dated sanely (see [`Tables::prune`]).
const CLOCK_SKEW: Duration = Duration::from_secs(60);

/// How many events dated ahead (see [`CLOCK_SKEW`]) age retention looks past, from the oldest,
/// for one that decides their age; past that many in a row, they hold age retention back until
/// they expire by their own date (the count and byte budgets still apply).
const FUTURE_LOOKAHEAD: usize = 10_000;

/// Most sessions one automatic retention pass examines (deleted or kept: a session that has not
/// ended, or ended recently, is read and kept), so a pass stays short however many are kept.
const SESSION_PRUNE_SCAN: usize = 4_096;

/// Rows (output lines and records) after which an automatic retention pass deletes no further
/// session: one session may hold 100,000 lines. The session that crosses it is deleted whole.
const SESSION_PRUNE_ROWS: u64 = 100_000;

/// Keys of the listing order a session retention pass reads at a time.
const SESSION_SWEEP_BATCH: usize = 512;

/// What the writer is asked to do.
pub(super) enum Request {
    /// Store a new session; answered after the commit.
    Create {
        record: Box<SessionRecord>,
        reply: Reply,
    },
    /// Store a transition and the record after it; answered after the commit.
    Transition {
        record: Box<SessionRecord>,
        transition: Transition,
        reply: Reply,
    },
    /// Replace a session's record in the same (non-terminal) state; answered after the commit.
    Update {
        record: Box<SessionRecord>,
        reply: Reply,
    },
    /// Append output lines (not answered).
    Output {
        id: SessionId,
        stream: OutputStream,
        first_line: u64,
        lines: Vec<String>,
    },
    /// Append an event (not answered) at its position, `item.pos`. `arrival` is where it was
    /// queued in the bus's arrival order, which is what [`Written`] tracks: the same as
    /// `item.pos`, except for a relayed event stored again after a failed write, which goes back
    /// to the position it first had.
    Event { item: BusItem, arrival: u64 },
    /// Answered once everything queued before it is committed.
    Flush(Reply),
    /// Apply retention as of `now`, whatever the schedule.
    Prune {
        now: Timestamp,
        reply: oneshot::Sender<Result<PruneReport, StoreError>>,
    },
    /// Commit what is queued, stop the thread, then answer.
    Close(Reply),
    /// Wake up: a reservation is wanted (see [`Reservation`]).
    Wake,
    /// The bus stopped cleanly after handing out ids up to this one: lower the reservation to
    /// it (so the next start continues right after it).
    Release(u64),
    /// Another node's relayed stream continues after `seq`: keep at least that as its highest
    /// sequence number (see `EventStore::relay_floor`).
    RelayFloor { node: NodeId, seq: u64 },
    /// Another node's events after `after` and through `through` will not come again: stop
    /// keeping a gap among them (see `EventStore::relay_lost`).
    RelayLost {
        node: NodeId,
        after: u64,
        through: u64,
    },
}

/// This node's id reservation, shared by the handles and the writer. A handle raises `wanted`
/// and wakes the writer; the writer writes it in its next batch and, once that batch is
/// committed, raises `durable`, which the handle awaits.
#[derive(Debug)]
pub(super) struct Reservation {
    /// The highest reservation asked for.
    pub(super) wanted: AtomicU64,
    /// The reservation on disk. The writer holds the only sender ([`Writer::durable`]), so a
    /// wait ends when the writer stops, whatever handles of the store live on.
    pub(super) durable: tokio::sync::watch::Receiver<u64>,
}

impl Reservation {
    /// The reservation `durable` on disk, and the sender for the writer.
    pub(super) fn new(durable: u64) -> (Self, tokio::sync::watch::Sender<u64>) {
        let (sender, receiver) = tokio::sync::watch::channel(durable);
        let reservation = Self {
            wanted: AtomicU64::new(durable),
            durable: receiver,
        };
        (reservation, sender)
    }
}

impl Request {
    pub(super) fn is_append(&self) -> bool {
        matches!(self, Self::Output { .. } | Self::Event { .. })
    }

    /// About the memory an append holds while it waits for the writer, for
    /// [`StoreConfig::max_pending_append_bytes`]: its lines (or its event's text), each with
    /// its `String`, and the request itself. Cheap: lengths only, nothing is encoded. 0 for
    /// anything that is not an append.
    pub(super) fn append_bytes(&self) -> usize {
        let text = |text: &String| size_of::<String>() + text.len();
        size_of::<Self>()
            + match self {
                Self::Output { lines, .. } => lines.iter().map(text).sum(),
                Self::Event { item, .. } => {
                    // An event held here may be the last reference to it. Its larger texts are
                    // output lines and lines quoted from output; the other payloads are small
                    // and fixed in size.
                    size_of::<Event>()
                        + match &item.event.data {
                            EventData::SessionOutput(output) => output.lines.iter().map(text).sum(),
                            EventData::SessionProgress(progress) => text(&progress.message),
                            EventData::SessionRateLimited(limited) => text(&limited.line),
                            _ => 0,
                        }
                }
                _ => return 0,
            }
    }
}

/// How many appends `requests` hold, and their [`Request::append_bytes`].
pub(super) fn appends_in<'a>(requests: impl IntoIterator<Item = &'a Request>) -> (usize, usize) {
    requests
        .into_iter()
        .filter(|request| request.is_append())
        .fold((0, 0), |(count, bytes), request| {
            (count + 1, bytes + request.append_bytes())
        })
}

/// Where an answer goes: an async caller or a blocking one (the bus's `resume`).
pub(super) enum Reply {
    Async(oneshot::Sender<Result<(), StoreError>>),
    Blocking(SyncSender<Result<(), StoreError>>),
}

impl Reply {
    fn send(self, result: Result<(), StoreError>) {
        // A caller that stopped waiting is not an error.
        match self {
            Self::Async(sender) => {
                let _ = sender.send(result);
            }
            Self::Blocking(sender) => {
                let _ = sender.send(result);
            }
        }
    }
}

/// Counters shared between the handles and the writer.
#[derive(Debug, Default)]
pub(super) struct Stats {
    /// Appends queued and not yet taken by the writer.
    pub(super) pending_appends: AtomicUsize,
    /// Their [`Request::append_bytes`], in total.
    pub(super) pending_append_bytes: AtomicUsize,
    /// Appends refused because too many were pending, or because the writer had stopped.
    pub(super) dropped_appends: AtomicU64,
    /// Transactions committed.
    pub(super) commits: AtomicU64,
    /// Requests applied in them.
    pub(super) requests: AtomicU64,
    /// Time spent in `commit` (writing and syncing), in nanoseconds.
    pub(super) commit_nanos: AtomicU64,
    /// Batches lost to a storage failure.
    pub(super) failed_batches: AtomicU64,
    /// The writer sleeps in a linger, gathering appends (read by tests, to act while it does).
    pub(super) lingering: AtomicBool,
    /// Events deleted by retention.
    pub(super) pruned_events: AtomicU64,
    /// Sessions deleted by retention.
    pub(super) pruned_sessions: AtomicU64,
    /// Tests: this many of the next batches holding an event append fail as a storage failure
    /// would.
    #[cfg(test)]
    pub(super) fail_event_batches: AtomicU64,
}

/// Failed batches of event appends remembered by position range; an older failure is only
/// remembered as "something at or below this position failed".
const FAILED_KEPT: usize = 64;

/// Where the writer has got to with event appends ([`EventStore::written`]).
///
/// [`EventStore::written`]: troupe_actors::event::EventStore::written
#[derive(Debug, Clone, Default)]
pub(super) struct Written {
    /// The highest arrival position of an event append whose batch is done: committed, or
    /// failed. The writer takes appends in queue order, so every event queued at or below it has
    /// been through a commit.
    pub(super) through: u64,
    /// The positions of the event appends of the most recent failed batches, oldest first.
    failed: VecDeque<RangeInclusive<u64>>,
    /// A failed batch no longer in `failed` held positions at or below this one.
    forgotten: u64,
}

impl Written {
    /// Whether the append at any of `positions` may have failed.
    pub(super) fn failed_within(&self, positions: &RangeInclusive<u64>) -> bool {
        self.forgotten >= *positions.start()
            || self.failed.iter().any(|failed| {
                failed.start() <= positions.end() && positions.start() <= failed.end()
            })
    }

    fn fail(&mut self, positions: RangeInclusive<u64>) {
        if self.failed.len() == FAILED_KEPT
            && let Some(oldest) = self.failed.pop_front()
        {
            self.forgotten = self.forgotten.max(*oldest.end());
        }
        self.failed.push_back(positions);
    }
}

/// Lowers `node`'s entry in `lowest` to `seq` (adds it when absent). A few nodes at most: a
/// list is enough.
fn merge_lowest(lowest: &mut Vec<(String, u64)>, node: &str, seq: u64) {
    match lowest.iter_mut().find(|(known, _)| known == node) {
        Some((_, low)) => *low = (*low).min(seq),
        None => lowest.push((node.to_owned(), seq)),
    }
}

/// Raises `node`'s entry in `highest` to `seq` (adds it when absent).
fn merge_highest(highest: &mut Vec<(String, u64)>, node: &str, seq: u64) {
    match highest.iter_mut().find(|(known, _)| known == node) {
        Some((_, high)) => *high = (*high).max(seq),
        None => highest.push((node.to_owned(), seq)),
    }
}

/// The writer thread's state.
pub(super) struct Writer {
    pub(super) db: Arc<DbSlot>,
    pub(super) node: NodeId,
    pub(super) config: StoreConfig,
    pub(super) rx: Receiver<Request>,
    pub(super) stats: Arc<Stats>,
    pub(super) reservation: Arc<Reservation>,
    /// Raises [`Reservation::durable`]. Dropped with the writer, which ends every wait on it.
    pub(super) durable: tokio::sync::watch::Sender<u64>,
    /// Where the writer has got to with event appends, and which of them failed (also counted
    /// in `failed_batches`, logged). Dropped with the writer, which ends every wait on it.
    pub(super) written: tokio::sync::watch::Sender<Written>,
    /// The error of the first failed batch while batches fail; `None` once one commits.
    pub(super) failing: tokio::sync::watch::Sender<Option<String>>,
}

impl Writer {
    /// Runs until every handle is gone or a `Close` arrives; everything queued before either is
    /// committed first.
    pub(super) fn run(self) {
        let Writer {
            db,
            node,
            config,
            rx,
            stats,
            reservation,
            durable,
            written,
            failing,
        } = self;
        let mut state = WriterState {
            node,
            config,
            stats,
            reservation,
            durable,
            written,
            failing,
            probe: false,
            next_age_prune: Instant::now(),
            prune_backlog: false,
            session_sweep: None,
            failed_gaps: Vec::new(),
            failed_floors: Vec::new(),
            unlogged_failures: 0,
            failure_logged_at: None,
        };
        let mut closers = Vec::new();
        let mut closed = Ok(());
        let mut last_commit = Instant::now();
        // When the writer last tried to reopen the database, and why it must still be reopened
        // when it refuses writes but a reopen was not due yet (see `file.rs`).
        let mut last_reopen = None;
        let mut poisoned: Option<StoreError> = None;
        loop {
            let mut wait = if state.prune_backlog {
                Duration::ZERO
            } else {
                state
                    .next_age_prune
                    .saturating_duration_since(Instant::now())
            };
            let failing = state.failing.borrow().is_some();
            if failing {
                // Batches fail: look again soon even when nothing comes, so that the store finds
                // out (and the node's health says) once the disk takes writes again.
                wait = wait.min(db.retry_every());
            }
            let mut batch = Vec::new();
            match rx.recv_timeout(wait) {
                Ok(request) => batch.push(request),
                Err(RecvTimeoutError::Timeout) => {
                    // Idle while batches fail: an empty batch commits (a probe) once a small
                    // scratch write beside the file succeeds, not before (a failing commit
                    // would leave the database refusing writes again, and reopening it costs).
                    state.probe = failing && db.disk_takes_writes();
                }
                Err(RecvTimeoutError::Disconnected) => break,
            }
            let max_batch = state.config.max_batch.max(1);
            while batch.len() < max_batch {
                match rx.try_recv() {
                    Ok(request) => batch.push(request),
                    Err(_) => break,
                }
            }
            linger(
                &rx,
                &mut batch,
                max_batch,
                last_commit + state.config.append_linger,
                &state.stats.lingering,
            );
            let (appends, bytes) = appends_in(&batch);
            state
                .stats
                .pending_appends
                .fetch_sub(appends, Ordering::Relaxed);
            state
                .stats
                .pending_append_bytes
                .fetch_sub(bytes, Ordering::Relaxed);
            if poisoned.is_some() && db.reopen_due(last_reopen) {
                let why = poisoned.take().expect("checked");
                reopen(&db, &mut last_reopen, &why);
            }
            let outcome = match db.for_writer(&mut last_reopen) {
                Ok(current) => {
                    let outcome = state.commit(Ok(&current), batch, &mut closers);
                    if let Err(error) = &outcome
                        && DbSlot::poisoned(&current)
                    {
                        drop(current);
                        if db.reopen_due(last_reopen) {
                            reopen(&db, &mut last_reopen, error);
                        } else {
                            poisoned = Some(error.clone());
                        }
                    }
                    outcome
                }
                Err(error) => state.commit(Err(error), batch, &mut closers),
            };
            last_commit = Instant::now();
            if !closers.is_empty() {
                closed = outcome;
                break;
            }
        }
        // Refuse what came after the close: queued appends are counted as dropped, waiters hear
        // that the store is closed (by their reply being dropped). Then release the file before
        // saying the store is closed, even while other handles of the store live on (their
        // reads answer that it is closed; reads under way are waited for).
        let late = appends_in(&rx.try_iter().collect::<Vec<_>>());
        drop(rx);
        stats_after_close(&state.stats, late);
        db.close();
        for closer in closers {
            closer.send(closed.clone());
        }
    }
}

/// Reopens the database after `why` (see `file.rs`), noting when.
fn reopen(db: &DbSlot, last_reopen: &mut Option<Instant>, why: &StoreError) {
    *last_reopen = Some(Instant::now());
    if let Err(error) = db.reopen(why) {
        tracing::error!(%error, "store: reopening the database failed; retrying");
    }
}

/// While `batch` holds appends only, keeps gathering requests until `until` (see
/// [`StoreConfig::append_linger`](super::StoreConfig::append_linger)); a request someone waits
/// for ends the wait at once, with whatever is queued behind it.
///
/// The thread sleeps (`park_timeout`) rather than blocking on the channel: appends arriving
/// meanwhile do not wake it (each wake-up would be a system call on the publisher's path, once
/// per event); a request someone waits for, and the store's drop, unpark it
/// ([`Store`](super::Store)'s `send`). A stray unpark only makes it look at the channel early.
fn linger(
    rx: &Receiver<Request>,
    batch: &mut Vec<Request>,
    max_batch: usize,
    until: Instant,
    lingering: &AtomicBool,
) {
    if batch.is_empty() || !batch.iter().all(Request::is_append) {
        return;
    }
    while batch.len() < max_batch {
        match rx.try_recv() {
            Ok(request) => {
                let waited_for = !request.is_append();
                batch.push(request);
                if waited_for {
                    while batch.len() < max_batch {
                        match rx.try_recv() {
                            Ok(request) => batch.push(request),
                            Err(_) => break,
                        }
                    }
                    return;
                }
            }
            // Disconnected: the next receive in the loop sees it and ends the writer.
            Err(TryRecvError::Disconnected) => return,
            Err(TryRecvError::Empty) => {
                let Some(left) = until
                    .checked_duration_since(Instant::now())
                    .filter(|left| !left.is_zero())
                else {
                    return;
                };
                lingering.store(true, Ordering::Release);
                std::thread::park_timeout(left);
                lingering.store(false, Ordering::Release);
            }
        }
    }
}

fn stats_after_close(stats: &Stats, (late_appends, late_bytes): (usize, usize)) {
    stats
        .pending_appends
        .fetch_sub(late_appends, Ordering::Relaxed);
    stats
        .pending_append_bytes
        .fetch_sub(late_bytes, Ordering::Relaxed);
    stats
        .dropped_appends
        .fetch_add(late_appends as u64, Ordering::Relaxed);
}

struct WriterState {
    node: NodeId,
    config: StoreConfig,
    stats: Arc<Stats>,
    reservation: Arc<Reservation>,
    durable: tokio::sync::watch::Sender<u64>,
    written: tokio::sync::watch::Sender<Written>,
    failing: tokio::sync::watch::Sender<Option<String>>,
    /// The next batch is a probe (see `run`): it commits even with nothing to write.
    probe: bool,
    next_age_prune: Instant,
    prune_backlog: bool,
    /// The automatic session retention sweep under way, if one stopped at its bounds.
    session_sweep: Option<SessionSweep>,
    /// Per other node, the lowest sequence number in a failed batch not yet kept as a gap in
    /// the log's meta (the next commit keeps it, with whatever it stores after the failure).
    failed_gaps: Vec<(String, u64)>,
    /// Per other node, the highest relay floor (`EventStore::relay_floor`) in a failed batch:
    /// the next commit keeps it, as it keeps `failed_gaps` (a floor is sent once, when a link
    /// starts, and a restart before it is kept would ask for new events only again).
    failed_floors: Vec<(String, u64)>,
    /// Failed batches not yet logged, and when one last was: on a failing disk every batch
    /// fails (up to a hundred a second), and one line every [`FAILURE_LOG_EVERY`] says as much.
    unlogged_failures: u64,
    failure_logged_at: Option<Instant>,
}

/// At most one ERROR line this often while write batches keep failing.
const FAILURE_LOG_EVERY: Duration = Duration::from_secs(10);

/// An automatic session retention sweep that stopped at a pass's bounds: the next pass goes on
/// after the last session it examined.
struct SessionSweep {
    /// Terminal sessions that ended before this are deleted.
    cutoff: Timestamp,
    /// The last key of the listing order examined.
    after: Option<(u64, String)>,
}

/// How much one session retention pass may do.
#[derive(Debug, Clone, Copy)]
struct SweepBudget {
    /// Sessions deleted.
    sessions: u64,
    /// Sessions examined.
    examined: usize,
    /// Rows deleted (see [`SESSION_PRUNE_ROWS`]).
    rows: u64,
}

impl SweepBudget {
    const UNBOUNDED: Self = Self {
        sessions: u64::MAX,
        examined: usize::MAX,
        rows: u64::MAX,
    };
}

/// What one session retention pass did.
struct Swept {
    removed: u64,
    /// The pass reached its bounds before the end of what it had to examine: the next one goes
    /// on after `after`.
    stopped: bool,
    after: Option<(u64, String)>,
}

/// Why one request was not applied.
enum OpError {
    /// The store refuses it; the rest of the batch goes ahead.
    Rejected(StoreError),
    /// The storage failed; the whole batch is aborted.
    Storage(redb::Error),
}

impl From<StoreError> for OpError {
    fn from(error: StoreError) -> Self {
        Self::Rejected(error)
    }
}

impl From<redb::StorageError> for OpError {
    fn from(error: redb::StorageError) -> Self {
        Self::Storage(error.into())
    }
}

/// A waiter and its answer, sent after the commit.
enum Answer {
    Done(Reply, Result<(), StoreError>),
    Pruned(oneshot::Sender<Result<PruneReport, StoreError>>),
}

impl WriterState {
    /// Applies one batch in one transaction and answers its waiters; says how it went.
    fn commit(
        &mut self,
        db: Result<&Database, StoreError>,
        batch: Vec<Request>,
        closers: &mut Vec<Reply>,
    ) -> Result<(), StoreError> {
        let now = Instant::now();
        let age_due = now >= self.next_age_prune;
        let reserve_due = self.reservation.wanted.load(Ordering::Acquire) > *self.durable.borrow();
        // A probe commits though it holds nothing (see `apply`).
        if batch.is_empty() && !age_due && !self.prune_backlog && !reserve_due && !self.probe {
            return Ok(());
        }
        let requests = batch.len() as u64;
        let event_positions = batch
            .iter()
            .filter_map(|request| match request {
                Request::Event { arrival, .. } => Some(*arrival),
                _ => None,
            })
            .fold(None, |range: Option<(u64, u64)>, pos| match range {
                None => Some((pos, pos)),
                Some((low, high)) => Some((low.min(pos), high.max(pos))),
            });
        // Other nodes' events in this batch, by node, from the lowest: missing should it fail.
        let mut relayed_from: Vec<(String, u64)> = Vec::new();
        for request in &batch {
            if let Request::Event { item, .. } = request
                && item.event.id.node != self.node
            {
                merge_lowest(
                    &mut relayed_from,
                    item.event.id.node.as_str(),
                    item.event.id.seq,
                );
            }
        }
        // Relay floors in this batch, by node, the highest: carried should it fail.
        let mut floors: Vec<(String, u64)> = Vec::new();
        for request in &batch {
            if let Request::RelayFloor { node, seq } = request {
                merge_highest(&mut floors, node.as_str(), *seq);
            }
        }
        let mut answers = Vec::with_capacity(batch.len());
        let mut report = None;
        let mut reserved = None;
        let outcome = self.apply(
            db,
            batch,
            age_due,
            &mut answers,
            closers,
            &mut report,
            &mut reserved,
        );
        if outcome.is_err() {
            // Counted before the failure is told to those waiting on the write.
            self.stats.failed_batches.fetch_add(1, Ordering::Relaxed);
        }
        if let Some((first, last)) = event_positions {
            let failed = outcome.is_err();
            self.written.send_if_modified(|written| {
                if failed {
                    written.fail(first..=last);
                }
                let moved = last > written.through;
                written.through = written.through.max(last);
                moved || failed
            });
        }
        match &outcome {
            // Kept in the meta by this commit (`apply` wrote them).
            Ok(_) => {
                self.failed_gaps.clear();
                self.failed_floors.clear();
            }
            Err(_) => {
                for (node, seq) in relayed_from {
                    merge_lowest(&mut self.failed_gaps, &node, seq);
                }
                for (node, seq) in floors {
                    merge_highest(&mut self.failed_floors, &node, seq);
                }
            }
        }
        match outcome {
            Ok(committed) => {
                self.failing
                    .send_if_modified(|failing| failing.take().is_some());
                if self.failure_logged_at.take().is_some() {
                    tracing::info!(
                        unlogged_failures = std::mem::take(&mut self.unlogged_failures),
                        "store: write batches commit again"
                    );
                }
                if let Some(reserved) = reserved {
                    // On disk now (or already was): whoever waits for it may go on.
                    self.durable.send_replace(reserved);
                }
                self.stats
                    .commits
                    .fetch_add(u64::from(committed), Ordering::Relaxed);
                self.stats.requests.fetch_add(requests, Ordering::Relaxed);
                if age_due {
                    self.next_age_prune = Instant::now() + self.prune_interval();
                }
                let report = report.unwrap_or_default();
                self.stats
                    .pruned_events
                    .fetch_add(report.removed, Ordering::Relaxed);
                self.stats
                    .pruned_sessions
                    .fetch_add(report.sessions_removed, Ordering::Relaxed);
                for answer in answers {
                    match answer {
                        Answer::Done(reply, result) => reply.send(result),
                        Answer::Pruned(reply) => {
                            let _ = reply.send(Ok(report));
                        }
                    }
                }
                Ok(())
            }
            Err(error) => {
                // Try retention again later rather than in a tight loop on a failing disk (a
                // session sweep starts over: what it deleted in this batch was rolled back).
                self.prune_backlog = false;
                self.session_sweep = None;
                self.next_age_prune = Instant::now() + self.prune_interval();
                self.failing.send_if_modified(|failing| {
                    let first = failing.is_none();
                    if first {
                        *failing = Some(error.to_string());
                    }
                    first
                });
                self.unlogged_failures += 1;
                if self
                    .failure_logged_at
                    .is_none_or(|at| at.elapsed() >= FAILURE_LOG_EVERY)
                {
                    tracing::error!(
                        %error,
                        requests,
                        failed_batches = self.unlogged_failures,
                        "store: a write batch failed and was rolled back; its waiters get the \
                         error and its output and event appends are lost (failed_batches: how \
                         many since the last such line)"
                    );
                    self.failure_logged_at = Some(Instant::now());
                    self.unlogged_failures = 0;
                }
                for answer in answers {
                    match answer {
                        Answer::Done(reply, _) => reply.send(Err(error.clone())),
                        Answer::Pruned(reply) => {
                            let _ = reply.send(Err(error.clone()));
                        }
                    }
                }
                Err(error)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn apply(
        &mut self,
        db: Result<&Database, StoreError>,
        batch: Vec<Request>,
        age_due: bool,
        answers: &mut Vec<Answer>,
        closers: &mut Vec<Reply>,
        report: &mut Option<PruneReport>,
        reserved: &mut Option<u64>,
    ) -> Result<bool, StoreError> {
        let io = |error: redb::Error| StoreError::Io(format!("write transaction: {error}"));
        // Whether anything was written: a batch of flushes, refusals and empty retention passes
        // is not worth a commit (everything before it is committed already).
        // A probe commits with nothing to write (its totals are written again): its success says
        // that the disk takes writes again.
        let mut dirty = std::mem::take(&mut self.probe);
        let mut failure: Option<StoreError> = None;
        // No database: reopening it after an I/O error failed (the writer tries again).
        let mut txn = match db.map(Database::begin_write) {
            Ok(Ok(txn)) => Some(txn),
            Ok(Err(error)) => {
                failure = Some(io(error.into()));
                None
            }
            Err(error) => {
                failure = Some(error);
                None
            }
        };
        if let Some(txn) = &mut txn
            && let Err(error) = self.prepare(txn)
        {
            failure = Some(io(error));
        }
        {
            let mut tables = match &txn {
                Some(txn) if failure.is_none() => match Tables::open(txn, &self.node) {
                    Ok(tables) => Some(tables),
                    Err(error) => {
                        failure = Some(io(error));
                        None
                    }
                },
                _ => None,
            };
            // Gaps left by failed batches go into this commit, before anything it stores after
            // them: the log never holds a node's later events without the gap below them.
            if let Some(tables) = tables.as_mut().filter(|_| failure.is_none()) {
                for (node, seq) in &self.failed_gaps {
                    if let Err(error) = tables.note_gap(node, *seq) {
                        failure = Some(io(error.into()));
                        break;
                    }
                    dirty = true;
                }
            }
            if let Some(tables) = tables.as_mut().filter(|_| failure.is_none()) {
                for (node, seq) in &self.failed_floors {
                    if let Err(error) = tables.note_seq(node, *seq) {
                        failure = Some(io(error.into()));
                        break;
                    }
                    dirty = true;
                }
            }
            let mut explicit_prune = None;
            #[cfg(test)]
            let has_events = batch
                .iter()
                .any(|request| matches!(request, Request::Event { .. }));
            for request in batch {
                // After a storage failure nothing more is applied; waiters are still collected so
                // that every one of them hears of the failure.
                let (tables, failure) = (&mut tables, &mut failure);
                match request {
                    Request::Create { record, reply } => {
                        let result = run_op(tables, failure, |tables| tables.create(&record));
                        dirty |= result.is_ok();
                        answers.push(Answer::Done(reply, result));
                    }
                    Request::Transition {
                        record,
                        transition,
                        reply,
                    } => {
                        let result = run_op(tables, failure, |tables| {
                            tables.transition(&record, &transition)
                        });
                        dirty |= result.is_ok();
                        answers.push(Answer::Done(reply, result));
                    }
                    Request::Update { record, reply } => {
                        let result = run_op(tables, failure, |tables| tables.update(&record));
                        dirty |= result.is_ok();
                        answers.push(Answer::Done(reply, result));
                    }
                    Request::Output {
                        id,
                        stream,
                        first_line,
                        lines,
                    } => {
                        let config = &self.config;
                        let result = run_op(tables, failure, |tables| {
                            tables.output(config, &id, stream, first_line, &lines)
                        });
                        dirty |= result.is_ok();
                        if let Err(error) = result
                            && failure.is_none()
                        {
                            tracing::warn!(session = %id, %error, "store: output lines not stored");
                        }
                    }
                    Request::Event { item, .. } => {
                        let result = run_op(tables, failure, |tables| tables.event(&item));
                        dirty |= result.is_ok();
                        if let Err(error) = result
                            && failure.is_none()
                        {
                            tracing::warn!(event = %item.event.id, %error, "store: event not stored");
                        }
                    }
                    Request::Flush(reply) => answers.push(Answer::Done(reply, Ok(()))),
                    Request::Prune { now, reply } => {
                        explicit_prune =
                            Some(explicit_prune.map_or(now, |earlier: Timestamp| earlier.max(now)));
                        answers.push(Answer::Pruned(reply));
                    }
                    Request::Close(reply) => closers.push(reply),
                    Request::Wake => {}
                    Request::RelayFloor { node, seq } => {
                        let result = run_op(tables, failure, |tables| {
                            Ok(tables.note_seq(node.as_str(), seq)?)
                        });
                        dirty |= result.is_ok();
                    }
                    Request::RelayLost {
                        node,
                        after,
                        through,
                    } => {
                        let result = run_op(tables, failure, |tables| {
                            Ok(tables.relay_lost(node.as_str(), after, through)?)
                        });
                        dirty |= result.is_ok();
                    }
                    Request::Release(last) => {
                        if let Some(tables) = tables.as_mut() {
                            tables.reserved = last;
                            self.reservation.wanted.store(last, Ordering::Release);
                            dirty = true;
                        }
                    }
                }
            }
            #[cfg(test)]
            if failure.is_none()
                && has_events
                && self
                    .stats
                    .fail_event_batches
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                    .is_ok()
            {
                failure = Some(StoreError::Io("injected storage failure".into()));
            }
            if let Some(tables) = tables.as_mut().filter(|_| failure.is_none()) {
                let wanted = self.reservation.wanted.load(Ordering::Acquire);
                if wanted > tables.reserved {
                    tables.reserved = wanted;
                    dirty = true;
                }
                *reserved = Some(tables.reserved);
            }
            if let Some(tables) = tables.as_mut().filter(|_| failure.is_none()) {
                match self.retention(tables, age_due, explicit_prune) {
                    Ok(done) => {
                        dirty |= done.removed > 0 || done.sessions_removed > 0;
                        *report = Some(done);
                    }
                    Err(error) => failure = Some(io(error)),
                }
                if failure.is_none()
                    && let Err(error) = tables.save_totals()
                {
                    failure = Some(io(error.into()));
                }
            }
        }
        let txn = match (txn, failure) {
            (Some(txn), None) => txn,
            // Dropping the transaction aborts it.
            (_, Some(error)) => return Err(error),
            (None, None) => return Err(StoreError::Io("write transaction: not started".into())),
        };
        if !dirty {
            txn.abort().map_err(|error| io(error.into()))?;
            return Ok(false);
        }
        let started = Instant::now();
        txn.commit().map_err(|error| io(error.into()))?;
        let took = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.stats.commit_nanos.fetch_add(took, Ordering::Relaxed);
        Ok(true)
    }

    /// At least a second: an age pass costs a transaction even when it finds nothing.
    fn prune_interval(&self) -> Duration {
        self.config.prune_interval.max(Duration::from_secs(1))
    }

    fn prepare(&self, txn: &mut WriteTransaction) -> Result<(), redb::Error> {
        txn.set_durability(Durability::Immediate)?;
        txn.set_quick_repair(self.config.quick_repair);
        Ok(())
    }

    /// Deletes the oldest events while the log is over its count or byte budget, or (when due,
    /// or asked explicitly) while they are older than the retention; and, likewise, terminal
    /// sessions that ended before the session retention (see [`Tables::prune_sessions`]).
    fn retention(
        &mut self,
        tables: &mut Tables<'_>,
        age_due: bool,
        explicit: Option<Timestamp>,
    ) -> Result<PruneReport, redb::Error> {
        let now = explicit.or(age_due.then(Timestamp::now));
        let before = |now: Timestamp, keep: Duration| {
            let keep = u64::try_from(keep.as_micros()).unwrap_or(u64::MAX);
            Timestamp::from_micros(now.as_micros().saturating_sub(keep))
        };
        let age = now.map(|now| Age {
            cutoff: before(now, self.config.event_retention),
            ahead: Timestamp::from_micros(
                now.as_micros()
                    .saturating_add(CLOCK_SKEW.as_micros() as u64),
            ),
        });
        let cutoff = age.map(|age| age.cutoff);
        // An explicit prune finishes the job; automatic ones work in chunks.
        let chunk = if explicit.is_some() {
            u64::MAX
        } else {
            PRUNE_CHUNK
        };
        let removed = tables.prune(&self.config, age, chunk)?;
        let session_cutoff = now
            .zip(self.config.session_retention)
            .map(|(now, keep)| before(now, keep));
        let mut sessions = (0, Timestamp::default());
        if explicit.is_some() {
            if let Some(cutoff) = session_cutoff {
                let swept = tables.prune_sessions(cutoff, None, SweepBudget::UNBOUNDED)?;
                sessions = (swept.removed, cutoff);
            }
        } else {
            if age_due {
                // A new sweep from the oldest session, or the one under way with the new cutoff.
                self.session_sweep = match (session_cutoff, self.session_sweep.take()) {
                    (Some(cutoff), Some(sweep)) => Some(SessionSweep { cutoff, ..sweep }),
                    (Some(cutoff), None) => Some(SessionSweep {
                        cutoff,
                        after: None,
                    }),
                    (None, _) => None,
                };
            }
            if let Some(sweep) = self.session_sweep.take() {
                let budget = SweepBudget {
                    sessions: self.config.session_prune_chunk.max(1) as u64,
                    examined: SESSION_PRUNE_SCAN,
                    rows: SESSION_PRUNE_ROWS,
                };
                let swept = tables.prune_sessions(sweep.cutoff, sweep.after.as_ref(), budget)?;
                sessions = (swept.removed, sweep.cutoff);
                if swept.stopped {
                    self.session_sweep = Some(SessionSweep {
                        cutoff: sweep.cutoff,
                        after: swept.after,
                    });
                }
            }
        }
        self.prune_backlog = removed == chunk || self.session_sweep.is_some();
        Ok(PruneReport {
            removed,
            sessions_removed: sessions.0,
            session_cutoff: sessions.1,
            remaining: tables.totals.count,
            remaining_bytes: tables.totals.bytes,
            cutoff: cutoff.unwrap_or_default(),
        })
    }
}

/// Applies one request unless the batch already failed; a storage failure fails the batch.
fn run_op(
    tables: &mut Option<Tables<'_>>,
    failure: &mut Option<StoreError>,
    op: impl FnOnce(&mut Tables<'_>) -> Result<(), OpError>,
) -> Result<(), StoreError> {
    let Some(tables) = tables.as_mut().filter(|_| failure.is_none()) else {
        return Err(StoreError::Io("the batch was aborted".into()));
    };
    match op(tables) {
        Ok(()) => Ok(()),
        Err(OpError::Rejected(error)) => Err(error),
        Err(OpError::Storage(error)) => {
            let error = StoreError::Io(format!("write transaction: {error}"));
            *failure = Some(error.clone());
            Err(error)
        }
    }
}

/// The event log's counters, read at the start of a batch and written back at its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Totals {
    bytes: u64,
    count: u64,
    last_pos: u64,
}

/// What age retention deletes: events dated before `cutoff`, and those dated after `ahead` (this
/// node's clock plus [`CLOCK_SKEW`]) that arrived before one of them.
#[derive(Debug, Clone, Copy)]
struct Age {
    cutoff: Timestamp,
    ahead: Timestamp,
}

/// The fields of a stored event that retention needs.
#[derive(Deserialize)]
struct EventHead {
    id: EventId,
    at: Timestamp,
}

/// Every table, open in one write transaction.
struct Tables<'txn> {
    sessions: Table<'txn, &'static str, &'static [u8]>,
    order: Table<'txn, (u64, &'static str), ()>,
    unfinished: Table<'txn, (u64, &'static str), ()>,
    transitions: Table<'txn, (&'static str, u64), &'static [u8]>,
    output: Table<'txn, (&'static str, u64), &'static [u8]>,
    output_counters: Table<'txn, &'static str, &'static [u8]>,
    keys: Table<'txn, &'static str, &'static str>,
    events: Table<'txn, u64, &'static [u8]>,
    event_index: Table<'txn, (&'static str, u64), u64>,
    meta: Table<'txn, &'static str, u64>,
    node: String,
    totals: Totals,
    loaded: Totals,
    /// Highest sequence number stored per publishing node: (as loaded, as now).
    last_seqs: HashMap<String, (u64, u64)>,
    /// The lowest sequence number of another node that may be missing from the log (a relayed
    /// batch whose write failed), per node looked at: (as loaded, as now).
    gaps: HashMap<String, (Option<u64>, Option<u64>)>,
    /// This node's id reservation, and as loaded.
    reserved: u64,
    reserved_loaded: u64,
}

impl<'txn> Tables<'txn> {
    fn open(txn: &'txn WriteTransaction, node: &NodeId) -> Result<Self, redb::Error> {
        let meta = txn.open_table(META)?;
        let totals = Totals {
            bytes: meta_get(&meta, META_EVENT_BYTES)?,
            count: meta_get(&meta, META_EVENT_COUNT)?,
            last_pos: meta_get(&meta, META_LAST_POS)?,
        };
        let reserved = meta_get(&meta, &reserved_key(node.as_str()))?;
        Ok(Self {
            sessions: txn.open_table(SESSIONS)?,
            order: txn.open_table(SESSION_ORDER)?,
            unfinished: txn.open_table(UNFINISHED)?,
            transitions: txn.open_table(TRANSITIONS)?,
            output: txn.open_table(OUTPUT)?,
            output_counters: txn.open_table(OUTPUT_COUNTERS)?,
            keys: txn.open_table(IDEMPOTENCY)?,
            events: txn.open_table(EVENTS)?,
            event_index: txn.open_table(EVENT_INDEX)?,
            meta,
            node: node.as_str().to_owned(),
            totals,
            loaded: totals,
            last_seqs: HashMap::new(),
            gaps: HashMap::new(),
            reserved,
            reserved_loaded: reserved,
        })
    }

    fn save_totals(&mut self) -> Result<(), redb::StorageError> {
        if self.totals != self.loaded {
            self.meta.insert(META_EVENT_BYTES, self.totals.bytes)?;
            self.meta.insert(META_EVENT_COUNT, self.totals.count)?;
            self.meta.insert(META_LAST_POS, self.totals.last_pos)?;
            self.loaded = self.totals;
        }
        for (node, (loaded, now)) in &mut self.last_seqs {
            if *now > *loaded {
                self.meta.insert(last_seq_key(node).as_str(), *now)?;
                *loaded = *now;
            }
        }
        let changed: Vec<(String, Option<u64>)> = self
            .gaps
            .iter()
            .filter(|(_, (loaded, now))| loaded != now)
            .map(|(node, (_, now))| (node.clone(), *now))
            .collect();
        for (node, gap) in changed {
            self.note_seq(&node, 0)?;
            let highest = self.last_seqs.get(&node).map_or(0, |(_, now)| *now);
            // A gap above everything stored is no gap: the stream continues below it anyway.
            let gap = gap.filter(|gap| *gap <= highest);
            match gap {
                Some(gap) => {
                    self.meta.insert(relay_gap_key(&node).as_str(), gap)?;
                }
                None => {
                    self.meta.remove(relay_gap_key(&node).as_str())?;
                }
            }
            self.gaps.insert(node, (gap, gap));
        }
        if self.reserved != self.reserved_loaded {
            self.meta
                .insert(reserved_key(&self.node).as_str(), self.reserved)?;
            self.reserved_loaded = self.reserved;
        }
        Ok(())
    }

    /// Notes that `node`'s event `seq` is stored.
    fn note_seq(&mut self, node: &str, seq: u64) -> Result<(), redb::StorageError> {
        if !self.last_seqs.contains_key(node) {
            let stored = meta_get(&self.meta, &last_seq_key(node))?;
            self.last_seqs.insert(node.to_owned(), (stored, stored));
        }
        if let Some((_, now)) = self.last_seqs.get_mut(node) {
            *now = (*now).max(seq);
        }
        Ok(())
    }

    /// Changes `node`'s gap as this transaction has it (loaded from the meta the first time).
    fn update_gap(
        &mut self,
        node: &str,
        change: impl FnOnce(&mut Option<u64>),
    ) -> Result<(), redb::StorageError> {
        if let Some((_, now)) = self.gaps.get_mut(node) {
            change(now);
            return Ok(());
        }
        let stored = self
            .meta
            .get(relay_gap_key(node).as_str())?
            .map(|gap| gap.value());
        let mut now = stored;
        change(&mut now);
        self.gaps.insert(node.to_owned(), (stored, now));
        Ok(())
    }

    /// `node`'s events from `seq` on may be missing (their batch failed).
    fn note_gap(&mut self, node: &str, seq: u64) -> Result<(), redb::StorageError> {
        self.update_gap(node, |gap| *gap = Some(gap.map_or(seq, |gap| gap.min(seq))))
    }

    /// `node`'s event `seq` is in the log (stored now or already): a gap that starts there
    /// moves past it. The relay fetches a rewound stretch again in order, so the gap closes
    /// event by event.
    fn note_present(&mut self, node: &str, seq: u64) -> Result<(), redb::StorageError> {
        if node == self.node {
            return Ok(());
        }
        self.update_gap(node, |gap| {
            if *gap == Some(seq) {
                *gap = Some(seq + 1);
            }
        })
    }

    /// `node`'s events after `after` through `through` will not come again.
    fn relay_lost(
        &mut self,
        node: &str,
        after: u64,
        through: u64,
    ) -> Result<(), redb::StorageError> {
        self.update_gap(node, |gap| {
            if let Some(missing) = gap
                && *missing > after
                && *missing <= through
            {
                *missing = through + 1;
            }
        })
    }

    fn stored_record(&self, id: &str) -> Result<Option<SessionRecord>, OpError> {
        let Some(bytes) = self.sessions.get(id)? else {
            return Ok(None);
        };
        Ok(Some(decode("sessions", id, bytes.value())?))
    }

    fn create(&mut self, record: &SessionRecord) -> Result<(), OpError> {
        let id = record.id.as_str();
        if self.sessions.get(id)?.is_some() {
            return Err(StoreError::Exists(record.id.clone()).into());
        }
        let key = record.spec.idempotency_key.as_deref();
        if let Some(key) = key
            && let Some(owner) = self.keys.get(key)?
        {
            let owner = owner.value();
            let owner =
                SessionId::new(owner).map_err(|error| corrupt("idempotency", key, error))?;
            return Err(StoreError::Exists(owner).into());
        }
        let bytes = encode("sessions", id, record)?;
        let created = record.created_at.as_micros();
        self.sessions.insert(id, bytes.as_slice())?;
        self.order.insert((created, id), ())?;
        if !record.state.is_terminal() {
            self.unfinished.insert((created, id), ())?;
        }
        if let Some(key) = key {
            self.keys.insert(key, id)?;
        }
        Ok(())
    }

    fn transition(
        &mut self,
        record: &SessionRecord,
        transition: &Transition,
    ) -> Result<(), OpError> {
        let id = record.id.as_str();
        let stored = self
            .stored_record(id)?
            .ok_or_else(|| StoreError::NotFound(record.id.clone()))?;
        if stored.state != transition.from {
            return Err(StoreError::Conflict {
                id: record.id.clone(),
                expected: transition.from,
                actual: stored.state,
            }
            .into());
        }
        if !transition.from.can_become(transition.to) {
            return Err(StoreError::Invalid(format!(
                "session {id}: a session cannot go from {} to {}",
                transition.from, transition.to
            ))
            .into());
        }
        if record.state != transition.to {
            return Err(StoreError::Invalid(format!(
                "session {id}: the record says {} but the transition goes to {}",
                record.state, transition.to
            ))
            .into());
        }
        if record.created_at != stored.created_at {
            return Err(StoreError::Invalid(format!(
                "session {id}: created_at cannot change (stored {}, given {})",
                stored.created_at, record.created_at
            ))
            .into());
        }
        let next = match self
            .transitions
            .range((id, 0)..=(id, u64::MAX))?
            .next_back()
        {
            Some(entry) => entry?.0.value().1 + 1,
            None => 0,
        };
        let transition_bytes = encode("transitions", format_args!("{id}/{next}"), transition)?;
        let record_bytes = encode("sessions", id, record)?;
        self.transitions
            .insert((id, next), transition_bytes.as_slice())?;
        self.sessions.insert(id, record_bytes.as_slice())?;
        if transition.to.is_terminal() {
            self.unfinished
                .remove((stored.created_at.as_micros(), id))?;
        }
        Ok(())
    }

    /// Replaces the record of a session that is (still) in `record.state`, not terminal.
    fn update(&mut self, record: &SessionRecord) -> Result<(), OpError> {
        let id = record.id.as_str();
        let stored = self
            .stored_record(id)?
            .ok_or_else(|| StoreError::NotFound(record.id.clone()))?;
        if stored.state != record.state || stored.state.is_terminal() {
            return Err(StoreError::Conflict {
                id: record.id.clone(),
                expected: record.state,
                actual: stored.state,
            }
            .into());
        }
        if record.created_at != stored.created_at {
            return Err(StoreError::Invalid(format!(
                "session {id}: created_at cannot change (stored {}, given {})",
                stored.created_at, record.created_at
            ))
            .into());
        }
        let bytes = encode("sessions", id, record)?;
        self.sessions.insert(id, bytes.as_slice())?;
        Ok(())
    }

    fn output(
        &mut self,
        config: &StoreConfig,
        id: &SessionId,
        stream: OutputStream,
        first_line: u64,
        lines: &[String],
    ) -> Result<(), OpError> {
        let key = id.as_str();
        if self.sessions.get(key)?.is_none() {
            return Err(StoreError::NotFound(id.clone()).into());
        }
        let mut counters: OutputCounters = match self.output_counters.get(key)? {
            Some(bytes) => decode("output_counters", key, bytes.value())?,
            None => OutputCounters::default(),
        };
        let before = counters;
        for (line, text) in (first_line..).zip(lines) {
            // A line number seen before is a redelivery (a restarted session actor): skip it.
            if line <= counters.last_line {
                continue;
            }
            counters.last_line = line;
            let bytes = text.len() as u64;
            if counters.capped
                || counters.stored_lines >= config.max_output_lines
                || counters.stored_bytes + bytes > config.max_output_bytes
            {
                counters.capped = true;
                counters.truncated += 1;
                continue;
            }
            let value = encode("output", format_args!("{key}/{line}"), &(stream, text))?;
            self.output.insert((key, line), value.as_slice())?;
            counters.stored_lines += 1;
            counters.stored_bytes += bytes;
        }
        if counters != before {
            let value = encode("output_counters", key, &counters)?;
            self.output_counters.insert(key, value.as_slice())?;
        }
        Ok(())
    }

    fn event(&mut self, item: &BusItem) -> Result<(), OpError> {
        let id = &item.event.id;
        let node = id.node.as_str();
        let value = encode("events", item.pos, &*item.event)?;
        let overhead = event_overhead(node);
        let stored = self
            .event_index
            .insert((node, id.seq), item.pos)?
            .map(|first| first.value());
        if let Some(first) = stored {
            // Stored already (a relayed stretch fetched again after a failed write, which
            // included what had been written): keep the first copy.
            self.event_index.insert((node, id.seq), first)?;
            self.note_present(node, id.seq)?;
            return Ok(());
        }
        if let Some(old) = self.events.insert(item.pos, value.as_slice())? {
            // The same position twice (it should not happen): replace, keep the totals right.
            let old_bytes = old.value().len() as u64 + overhead;
            self.totals.bytes = self.totals.bytes.saturating_sub(old_bytes);
            self.totals.count = self.totals.count.saturating_sub(1);
        }
        self.totals.bytes += value.len() as u64 + overhead;
        self.totals.count += 1;
        self.totals.last_pos = self.totals.last_pos.max(item.pos);
        self.note_seq(node, id.seq)?;
        self.note_present(node, id.seq)?;
        Ok(())
    }

    /// Deletes events from the oldest on while the log is over budget or they are older than
    /// the age's cutoff; at most `max` of them.
    ///
    /// Events are kept in arrival order but dated by their publisher, whose clock may be ahead
    /// of this node's: an oldest event dated after `age.ahead` would hold back every expired
    /// event behind it. Such an event is aged by arrival: it goes when the first event after it
    /// that is dated sanely has expired (looking at most [`FUTURE_LOOKAHEAD`] events ahead), so
    /// retention still deletes from the oldest on, never leaving a hole.
    fn prune(
        &mut self,
        config: &StoreConfig,
        age: Option<Age>,
        max: u64,
    ) -> Result<u64, redb::Error> {
        let cutoff = age.map(|age| age.cutoff);
        let mut removed = 0;
        // Events up to this position arrived before an expired one (see above).
        let mut expired_through = None;
        while removed < max {
            let over_budget = self.totals.bytes > config.event_retention_bytes
                || self.totals.count > config.event_retention_count;
            if !over_budget && cutoff.is_none() {
                break;
            }
            let (pos, bytes, head) = {
                let Some((pos, value)) = self.events.first()? else {
                    break;
                };
                let value = value.value();
                (
                    pos.value(),
                    value.len() as u64,
                    serde_json::from_slice::<EventHead>(value),
                )
            };
            let expired = match (&head, age) {
                _ if expired_through.is_some_and(|through| pos <= through) => true,
                (Ok(head), Some(age)) if head.at > age.ahead => {
                    match self.expired_after(pos, age)? {
                        Some(through) => {
                            expired_through = Some(through);
                            true
                        }
                        None => false,
                    }
                }
                (Ok(head), Some(age)) => head.at < age.cutoff,
                (Ok(_), None) => false,
                // Unreadable: it cannot be served anyway, and it is the oldest.
                (Err(_), _) => true,
            };
            if !(over_budget || expired) {
                break;
            }
            let head = match head {
                Ok(head) => Some(head),
                Err(error) => {
                    tracing::warn!(pos, %error, "store: deleting an unreadable event");
                    None
                }
            };
            self.events.remove(pos)?;
            let mut overhead = event_overhead("");
            if let Some(head) = head {
                let key = (head.id.node.as_str(), head.id.seq);
                overhead = event_overhead(key.0);
                // Only when the index still points here (a later copy may own the id now).
                let points_here = self
                    .event_index
                    .get(key)?
                    .is_some_and(|indexed| indexed.value() == pos);
                if points_here {
                    self.event_index.remove(key)?;
                }
            }
            self.totals.bytes = self.totals.bytes.saturating_sub(bytes + overhead);
            self.totals.count = self.totals.count.saturating_sub(1);
            removed += 1;
        }
        if self.events.is_empty()? {
            // Approximations must not drift forever.
            self.totals.bytes = 0;
            self.totals.count = 0;
        }
        Ok(removed)
    }

    /// For an event at `pos` dated ahead of the clock: the position of the first event after
    /// it dated sanely (skipping those dated ahead, and unreadable ones) when that one has
    /// expired; `None` when it has not, or none is found within [`FUTURE_LOOKAHEAD`] events.
    fn expired_after(&self, pos: u64, age: Age) -> Result<Option<u64>, redb::Error> {
        for entry in self.events.range(pos + 1..)?.take(FUTURE_LOOKAHEAD) {
            let (later, value) = entry?;
            let Ok(head) = serde_json::from_slice::<EventHead>(value.value()) else {
                continue;
            };
            if head.at > age.ahead {
                continue;
            }
            return Ok((head.at < age.cutoff).then(|| later.value()));
        }
        Ok(None)
    }

    /// Deletes sessions in a terminal state that ended before `cutoff`, with their transitions,
    /// output lines and counters, and their idempotency key (when it still names them), walking
    /// the listing order from the oldest session (or after `after`). Sessions that have not
    /// ended, or ended since, are kept. Only sessions created before `cutoff` can have ended
    /// before it, so the walk ends there. Stops early once `budget` is spent.
    fn prune_sessions(
        &mut self,
        cutoff: Timestamp,
        after: Option<&(u64, String)>,
        budget: SweepBudget,
    ) -> Result<Swept, redb::Error> {
        let mut swept = Swept {
            removed: 0,
            stopped: false,
            after: after.cloned(),
        };
        let (mut examined, mut rows) = (0usize, 0u64);
        loop {
            let want = SESSION_SWEEP_BATCH.min(budget.examined - examined);
            if want == 0 {
                swept.stopped = true;
                return Ok(swept);
            }
            let keys = self.sessions_before(cutoff, swept.after.as_ref(), want)?;
            let last_batch = keys.len() < want;
            for key in keys {
                if swept.removed >= budget.sessions || rows >= budget.rows {
                    swept.stopped = true;
                    return Ok(swept);
                }
                examined += 1;
                if let Some(deleted) = self.prune_session(key.0, &key.1, cutoff)? {
                    swept.removed += 1;
                    rows = rows.saturating_add(deleted);
                }
                swept.after = Some(key);
            }
            if last_batch {
                return Ok(swept);
            }
        }
    }

    /// Up to `max` keys of the listing order after `after` (from the oldest when `None`) of
    /// sessions created before `cutoff`, oldest first.
    fn sessions_before(
        &self,
        cutoff: Timestamp,
        after: Option<&(u64, String)>,
        max: usize,
    ) -> Result<Vec<(u64, String)>, redb::Error> {
        use std::ops::Bound;
        let lower = match after {
            Some((created, id)) => Bound::Excluded((*created, id.as_str())),
            None => Bound::Unbounded,
        };
        // No id is empty: this bound is every session created before the cutoff.
        let upper = Bound::Excluded((cutoff.as_micros(), ""));
        let mut keys = Vec::with_capacity(max.min(SESSION_SWEEP_BATCH));
        for entry in self.order.range::<(u64, &str)>((lower, upper))?.take(max) {
            let (key, _) = entry?;
            let (created, id) = key.value();
            keys.push((created, id.to_owned()));
        }
        Ok(keys)
    }

    /// Deletes session `id` (created at `created` µs) if it is terminal and ended before
    /// `cutoff`; says how many rows that removed, about (`None`: kept).
    fn prune_session(
        &mut self,
        created: u64,
        id: &str,
        cutoff: Timestamp,
    ) -> Result<Option<u64>, redb::Error> {
        let record: SessionRecord = {
            let Some(bytes) = self.sessions.get(id)? else {
                return Ok(None);
            };
            match decode("sessions", id, bytes.value()) {
                Ok(record) => record,
                Err(error) => {
                    // Whether it ended cannot be told: kept, and the reads report it.
                    tracing::debug!(%error, "store: retention keeps an unreadable session");
                    return Ok(None);
                }
            }
        };
        if !record.state.is_terminal() {
            return Ok(None);
        }
        // Every terminal record says when it ended; one that does not goes by its last
        // transition, or else by its creation.
        let ended = match record.ended_at {
            Some(at) => at,
            None => self
                .transitions
                .range((id, 0)..=(id, u64::MAX))?
                .next_back()
                .transpose()?
                .and_then(|(_, value)| serde_json::from_slice::<Transition>(value.value()).ok())
                .map_or(record.created_at, |transition| transition.at),
        };
        if ended >= cutoff {
            return Ok(None);
        }
        let lines = self
            .output_counters
            .get(id)?
            .and_then(|bytes| serde_json::from_slice::<OutputCounters>(bytes.value()).ok())
            .map_or(0, |counters| counters.stored_lines);
        self.sessions.remove(id)?;
        self.order.remove((created, id))?;
        // Not there for a terminal session; removed in case an older file left it.
        self.unfinished.remove((created, id))?;
        self.transitions
            .retain_in((id, 0)..=(id, u64::MAX), |_, _| false)?;
        self.output
            .retain_in((id, 0)..=(id, u64::MAX), |_, _| false)?;
        self.output_counters.remove(id)?;
        if let Some(key) = record.spec.idempotency_key.as_deref() {
            // Only while the key still names this session.
            let owned = self.keys.get(key)?.is_some_and(|owner| owner.value() == id);
            if owned {
                self.keys.remove(key)?;
            }
        }
        Ok(Some(lines + 1))
    }
}
