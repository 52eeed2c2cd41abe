//! The SessionManager: admission control and the queue. It is the first, static child of the
//! SessionSupervisor; SessionActors are that supervisor's dynamic children.
//!
//! - Admission: at most `max_concurrent` sessions run and `queue_capacity` wait, ordered by
//!   priority, then age. Past that a submission is refused (the API answers 429), and nothing is
//!   stored or dropped silently.
//! - Submissions are stored durably before they are accepted. The store write runs outside the
//!   manager's mailbox, so many submissions share one commit.
//! - Recovery: on the node's first start the manager marks sessions that were running
//!   `interrupted` (or what a recorded stop request says) and terminates what is left of their
//!   processes, and requeues queued ones. After a restart of the manager alone it adopts the
//!   session actors that still run (also those it had just taken off the queue, whose records
//!   still say `queued`) and restarts the ones that are gone, which reattach to their processes;
//!   submissions whose store write was in flight are answered by the new instance.
//! - Every path that frees a slot (an end, a failed store write of a submission, a session
//!   actor that could not start) starts what waits and answers a drain that waited for it.
//!   A session whose actor could not start is recorded `failed`, retried until the store takes
//!   it.
//! - The RegistryActor learns of every session accepted here (`SessionUp`) and of its end
//!   (`SessionDown`).

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use dashmap::DashMap;
use ractor::RpcReplyPort;

use super::actor::{SessionActor, SessionArgs, SessionMsg};
use super::context::SessionContext;
use super::ports::{Leftover, LeftoverGroup, StoreError};
use super::spec::{SessionRecord, SessionSpec, SpecError, SpecLimits, Transition};
use super::state::SessionState;
use crate::event::{EventData, SessionEnded, SessionQueued};
use crate::health::{ComponentFigures, HealthStatus, LongestRunning, SessionsHealth};
use crate::ids::{SessionId, Timestamp, fresh_id};
use crate::kernel::{Actor, ActorError, ActorHandle, Context, HandleStatus};
use crate::registry::{RegistryMsg, SessionEntry};
use crate::supervisor::{ChildPolicy, ChildSpec, Shutdown, StartChildError, SupervisorHandle};

/// How long callers wait for the manager.
pub const MANAGER_TIMEOUT: Duration = Duration::from_secs(30);

/// The pause before the record of a session that could not be started is written again after
/// a failed write; it doubles with each failure up to [`START_FAILURE_RETRY_MAX`].
const START_FAILURE_RETRY_MIN: Duration = Duration::from_secs(1);

/// The longest pause between two attempts to record a session that could not be started: a
/// store whose disk is full reopens at most once a second, so trying more often buys nothing.
const START_FAILURE_RETRY_MAX: Duration = Duration::from_secs(30);

/// A submission the manager accepted (or found already there).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admitted {
    /// The session.
    pub record: SessionRecord,
    /// Its place in the queue (1 = next); `None` when it starts right away.
    pub position: Option<u64>,
    /// True when an earlier submission with the same idempotency key was returned.
    pub existing: bool,
}

/// Why a submission was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// The spec breaks a limit.
    #[error("invalid session: {0}")]
    Invalid(#[from] SpecError),
    /// Every slot is busy and the queue is full.
    #[error(
        "the node runs {running} sessions and {queued} wait (the queue holds {capacity}); retry later"
    )]
    QueueFull {
        /// Sessions running.
        running: usize,
        /// Sessions queued.
        queued: usize,
        /// Queue capacity.
        capacity: usize,
        /// Suggested wait.
        retry_after: Duration,
    },
    /// The session could not be stored.
    #[error("the session could not be stored: {0}")]
    Store(StoreError),
    /// The node is shutting down.
    #[error("the node is shutting down and accepts no new sessions")]
    ShuttingDown,
}

/// Why a cancellation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CancelError {
    /// No such session.
    #[error("no session {0}")]
    NotFound(SessionId),
    /// The store failed.
    #[error("the cancellation could not be stored: {0}")]
    Store(StoreError),
    /// The session could not take the cancel now (its actor did not answer or failed on it,
    /// or its submission is still being stored): retry.
    #[error("session {0} did not answer; retry")]
    Unavailable(SessionId),
}

/// Counts for health and the API.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SessionsSummary {
    /// Running (or starting).
    pub running: usize,
    /// Waiting.
    pub queued: usize,
    /// Slots.
    pub max_concurrent: usize,
    /// Queue capacity.
    pub queue_capacity: usize,
    /// The session running longest, and since when.
    pub longest_running: Option<(SessionId, Timestamp)>,
}

/// Messages of the manager.
pub enum ManagerMsg {
    /// Accept a new session.
    Submit {
        /// What to run.
        spec: SessionSpec,
        /// The outcome.
        reply: RpcReplyPort<Result<Admitted, SubmitError>>,
    },
    /// Cancel a session (queued or running; idempotent once it ended).
    Cancel {
        /// The session.
        id: SessionId,
        /// The record as it stands.
        reply: RpcReplyPort<Result<SessionRecord, CancelError>>,
    },
    /// The places in the queue of some sessions (one pass over the queue for all of them).
    Positions {
        /// The sessions.
        ids: Vec<SessionId>,
        /// In the order of `ids`: 1 for next; `None` for a session that is not queued.
        reply: RpcReplyPort<Vec<Option<u64>>>,
    },
    /// Counts.
    Summary(RpcReplyPort<SessionsSummary>),
    /// A session ended (sent by its actor); its slot is free.
    Finished {
        /// The session.
        id: SessionId,
    },
    /// A submission's record is stored (or not).
    Created {
        /// The session.
        id: SessionId,
        /// The store's answer.
        result: Result<(), StoreError>,
    },
    /// A queued session's cancellation could not be stored: it waits in the queue again, in
    /// its place.
    Requeue {
        /// The session as it was queued.
        record: SessionRecord,
        /// Its place among sessions of its priority (the queue's sequence number).
        seq: u64,
    },
    /// A session actor could not be started.
    StartFailed {
        /// The session.
        id: SessionId,
        /// Why.
        error: StartChildError,
    },
    /// Try again to record that a session could not be started (an earlier write failed; sent
    /// after a pause by the task that tried).
    RecordStartFailure {
        /// The session.
        id: SessionId,
        /// Why it could not be started.
        reason: String,
        /// Attempts that failed so far.
        attempt: u32,
    },
    /// Report counts to the HealthActor (timer).
    ReportHealth,
    /// The node is shutting down: refuse new sessions, interrupt the running ones, and answer
    /// when they have all ended (queued ones stay queued for the next start).
    Drain {
        /// Answered once no session runs.
        reply: RpcReplyPort<()>,
    },
}

/// What survives restarts of the manager (written only by the current instance): whether the
/// node's first start was handled, the live session actors' handles, the submissions whose
/// store write is in flight, with their callers' reply ports (so a submission accepted by one
/// instance is answered, and run, by the next), and whether the node is shutting down, with the
/// drain requests waiting for the running sessions to end (so a drain is finished by the next
/// instance, which starts nothing meanwhile).
#[derive(Clone, Default)]
pub struct ManagerShared {
    recovered: Arc<AtomicBool>,
    handles: Arc<DashMap<SessionId, ActorHandle<SessionMsg>>>,
    pending: Arc<DashMap<SessionId, Pending>>,
    draining: Arc<AtomicBool>,
    drains: Arc<DashMap<u64, RpcReplyPort<()>>>,
    next_drain: Arc<AtomicU64>,
}

impl ManagerShared {
    /// The handle of a live session actor.
    pub fn handle(&self, id: &SessionId) -> Option<ActorHandle<SessionMsg>> {
        self.handles.get(id).map(|entry| entry.value().clone())
    }
}

/// Arguments of the manager.
#[derive(Clone)]
pub struct ManagerArgs {
    /// Ports and settings shared with session actors.
    pub context: SessionContext,
    /// The SessionSupervisor (the manager's parent), which runs the session actors.
    pub supervisor: SupervisorHandle,
    /// What survives restarts.
    pub shared: ManagerShared,
    /// Limits of specs.
    pub limits: SpecLimits,
}

/// The manager actor.
pub struct SessionManager;

type QueueKey = (Reverse<u8>, u64);

struct Pending {
    record: SessionRecord,
    reply: RpcReplyPort<Result<Admitted, SubmitError>>,
    start: bool,
}

/// State of one manager instance.
pub struct ManagerState {
    args: ManagerArgs,
    queue: BTreeMap<QueueKey, SessionRecord>,
    queued: HashMap<SessionId, QueueKey>,
    running: HashMap<SessionId, Timestamp>,
    /// Submissions an earlier instance was storing and recovery found stored: accepted in
    /// `post_start`.
    stored_pending: Vec<(SessionId, Pending)>,
    /// Idempotency keys of the sessions this instance holds (being stored, queued, running):
    /// a fast answer for a repeated submission. An ended session's key is dropped (the store
    /// answers for it), so the map stays as small as the sessions held.
    keys: HashMap<String, SessionId>,
    next_seq: u64,
}

impl Actor for SessionManager {
    type Msg = ManagerMsg;
    type State = ManagerState;
    type Arguments = ManagerArgs;

    async fn pre_start(
        &self,
        _ctx: &Context<Self::Msg>,
        args: Self::Arguments,
    ) -> Result<Self::State, ActorError> {
        let mut state = ManagerState {
            args,
            queue: BTreeMap::new(),
            queued: HashMap::new(),
            running: HashMap::new(),
            stored_pending: Vec::new(),
            keys: HashMap::new(),
            next_seq: 0,
        };
        state.recover().await?;
        Ok(state)
    }

    async fn post_start(
        &self,
        ctx: &Context<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorError> {
        // Running sessions whose actors are gone (the SessionSupervisor restarted) get a new
        // actor that reattaches to the process.
        let orphans: Vec<SessionId> = state
            .running
            .keys()
            .filter(|id| {
                state
                    .args
                    .shared
                    .handle(id)
                    .is_none_or(|handle| handle.status() == HandleStatus::Stopped)
            })
            .cloned()
            .collect();
        for id in orphans {
            state.spawn_session(ctx, id);
        }
        for (id, pending) in std::mem::take(&mut state.stored_pending) {
            state.accept(ctx, id, pending);
        }
        if state.draining() {
            // The node shuts down: what runs was told to stop, but maybe not what an actor
            // started just now runs again (asking twice changes nothing).
            state.interrupt_running();
            state.answer_drain();
        }
        state.drain_queue(ctx);
        ctx.send_interval(Duration::from_secs(1), || ManagerMsg::ReportHealth);
        state.update_gauges();
        Ok(())
    }

    async fn handle(
        &self,
        ctx: &Context<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorError> {
        match message {
            ManagerMsg::Submit { spec, reply } => state.submit(ctx, spec, reply).await,
            ManagerMsg::Created { id, result } => state.created(ctx, id, result),
            ManagerMsg::Cancel { id, reply } => state.cancel(ctx, id, reply),
            ManagerMsg::Requeue { record, seq } => state.requeue(ctx, record, seq),
            ManagerMsg::Positions { ids, reply } => {
                let _ = reply.send(state.positions(&ids));
            }
            ManagerMsg::Summary(reply) => {
                let _ = reply.send(state.summary());
            }
            ManagerMsg::Finished { id } => {
                state.running.remove(&id);
                state.forget_key(&id);
                state.args.shared.handles.remove(&id);
                state.registry(RegistryMsg::SessionDown(id));
                state.drain_queue(ctx);
                state.update_gauges();
                state.answer_drain();
            }
            ManagerMsg::Drain { reply } => {
                let shared = &state.args.shared;
                shared.draining.store(true, Ordering::SeqCst);
                let key = shared.next_drain.fetch_add(1, Ordering::Relaxed);
                shared.drains.insert(key, reply);
                state.interrupt_running();
                state.answer_drain();
            }
            ManagerMsg::StartFailed { id, error } => state.start_failed(ctx, id, error),
            ManagerMsg::RecordStartFailure {
                id,
                reason,
                attempt,
            } => {
                if !state.holds(&id) {
                    state.record_start_failure(ctx, id, reason, attempt);
                }
            }
            ManagerMsg::ReportHealth => state.report_health(),
        }
        Ok(())
    }
}

impl ManagerState {
    async fn recover(&mut self) -> Result<(), StoreError> {
        let context = self.args.context.clone();
        let unfinished = context.store.unfinished().await?;
        // Until a recovery succeeds, the runs recorded as started are the last process's: a
        // manager restarted after a failed first recovery kills and interrupts them again.
        let first_start = !self.args.shared.recovered.load(Ordering::SeqCst);
        let mut leftovers = Vec::new();
        let mut interrupted = Vec::new();
        for record in unfinished {
            match record.state {
                SessionState::Queued => {
                    if let Some((id, pending)) = self.args.shared.pending.remove(&record.id) {
                        // Its store write landed, but the instance that made it is gone: this
                        // one answers the caller and runs it.
                        self.stored_pending.push((id, pending));
                    } else if self.has_live_actor(&record.id) {
                        // Taken off the queue a moment ago; its actor has not recorded
                        // `starting` yet. It runs: never queue it again.
                        self.adopt(&record, Timestamp::now());
                    } else {
                        self.registry(RegistryMsg::SessionUp(SessionEntry {
                            id: record.id.clone(),
                            node: record.node.clone(),
                        }));
                        self.enqueue(record);
                    }
                }
                SessionState::Starting | SessionState::Running if first_start => {
                    leftovers.push(Leftover {
                        session: record.id.clone(),
                        group: record.process.map(|process| LeftoverGroup {
                            pgid: process.pgid,
                            start_ticks: process.start_ticks,
                        }),
                    });
                    interrupted.push(record);
                }
                SessionState::Starting | SessionState::Running => {
                    let since = record.started_at.unwrap_or(record.created_at);
                    self.adopt(&record, since);
                }
                _ => {}
            }
        }
        // Submissions still being stored: their callers wait, and their keys are taken.
        for entry in self.args.shared.pending.iter() {
            if let Some(key) = &entry.value().record.spec.idempotency_key {
                self.keys.insert(key.clone(), entry.key().clone());
            }
        }
        // Killed before any of them is recorded as ended: a session recorded first and then
        // left behind by a failure (a store error, a crash) part way through would never be
        // looked at again, its process running on.
        if !leftovers.is_empty() {
            let killed = context
                .runner
                .kill_leftovers(&leftovers, context.settings.kill_grace);
            tracing::warn!(
                sessions = leftovers.len(),
                groups = ?killed,
                "terminated what was left of sessions that ran before the node restarted"
            );
        }
        for record in interrupted {
            self.interrupt(record).await?;
        }
        self.args.shared.recovered.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// Counts a session whose actor runs (or is about to) as running.
    fn adopt(&mut self, record: &SessionRecord, since: Timestamp) {
        self.running.insert(record.id.clone(), since);
        if let Some(key) = &record.spec.idempotency_key {
            self.keys.insert(key.clone(), record.id.clone());
        }
        self.registry(RegistryMsg::SessionUp(SessionEntry {
            id: record.id.clone(),
            node: record.node.clone(),
        }));
    }

    /// Whether the session has an actor that runs, is starting or restarting.
    fn has_live_actor(&self, id: &SessionId) -> bool {
        self.args
            .shared
            .handle(id)
            .is_some_and(|handle| handle.status() != HandleStatus::Stopped)
    }

    fn registry(&self, message: RegistryMsg) {
        self.args.context.registry.update(message);
    }

    /// Records the end of a session that was running when the node stopped: `interrupted`, or
    /// what a stop request recorded before the stop says (`cancelled`, `timed_out`).
    async fn interrupt(&self, record: SessionRecord) -> Result<(), StoreError> {
        let end = record
            .stop_requested
            .map_or(SessionState::Interrupted, |stop| stop.end_state());
        let reason = match end {
            SessionState::Interrupted => "the node stopped while the session was running",
            SessionState::Cancelled => "cancelled on request (the node stopped before it ended)",
            _ => "ran past its timeout (the node stopped before it ended)",
        }
        .to_owned();
        let at = Timestamp::now();
        let transition = Transition {
            from: record.state,
            to: end,
            at,
            reason: Some(reason.clone()),
        };
        let mut next = record.clone();
        next.state = end;
        next.ended_at = Some(at);
        next.reason = Some(reason.clone());
        match self.args.context.store.transition(next, transition).await {
            Ok(()) => {}
            Err(StoreError::Conflict { actual, .. }) if actual.is_terminal() => return Ok(()),
            Err(error) => return Err(error),
        }
        let started = record.started_at.unwrap_or(record.created_at);
        let duration = Duration::from_micros(at.as_micros().saturating_sub(started.as_micros()));
        self.args.context.stats.record_end(end, duration);
        let ended = SessionEnded {
            exit_code: None,
            signal: None,
            reason: Some(reason),
            duration_ms: duration.as_millis() as u64,
        };
        let data = match end {
            SessionState::Cancelled => EventData::SessionCancelled(ended),
            SessionState::TimedOut => EventData::SessionTimedOut(ended),
            _ => EventData::SessionInterrupted(ended),
        };
        self.args.context.events.publish(Some(record.id), data);
        Ok(())
    }

    fn enqueue(&mut self, record: SessionRecord) -> u64 {
        let key = (Reverse(record.spec.priority), self.next_seq);
        self.next_seq += 1;
        if let Some(idempotency) = &record.spec.idempotency_key {
            self.keys.insert(idempotency.clone(), record.id.clone());
        }
        self.queued.insert(record.id.clone(), key);
        self.queue.insert(key, record);
        self.queue.range(..=key).count() as u64
    }

    fn position(&self, id: &SessionId) -> Option<u64> {
        let key = self.queued.get(id)?;
        Some(self.queue.range(..=*key).count() as u64)
    }

    /// The positions of `ids`: one walk of the queue up to the last of them, not one per id.
    fn positions(&self, ids: &[SessionId]) -> Vec<Option<u64>> {
        let keys: Vec<Option<QueueKey>> =
            ids.iter().map(|id| self.queued.get(id).copied()).collect();
        let Some(last) = keys.iter().flatten().max().copied() else {
            return vec![None; ids.len()];
        };
        let places: HashMap<QueueKey, u64> = self
            .queue
            .range(..=last)
            .zip(1..)
            .map(|((key, _), place)| (*key, place))
            .collect();
        keys.iter()
            .map(|key| key.and_then(|key| places.get(&key).copied()))
            .collect()
    }

    fn starts_pending(&self) -> usize {
        self.args
            .shared
            .pending
            .iter()
            .filter(|pending| pending.start)
            .count()
    }

    fn busy(&self) -> usize {
        self.running.len() + self.starts_pending()
    }

    fn waiting(&self) -> usize {
        self.queue.len() + self.args.shared.pending.len() - self.starts_pending()
    }

    async fn submit(
        &mut self,
        ctx: &Context<ManagerMsg>,
        spec: SessionSpec,
        reply: RpcReplyPort<Result<Admitted, SubmitError>>,
    ) {
        if self.draining() {
            let _ = reply.send(Err(SubmitError::ShuttingDown));
            return;
        }
        if let Err(error) = spec.validate(&self.args.limits) {
            let _ = reply.send(Err(error.into()));
            return;
        }
        if let Some(key) = &spec.idempotency_key
            && let Some(existing) = self.existing_by_key(key).await
        {
            let _ = reply.send(existing.map_err(SubmitError::Store));
            return;
        }
        let settings = &self.args.context.settings;
        let start = self.busy() < settings.max_concurrent && self.queue.is_empty();
        if !start && self.waiting() >= settings.queue_capacity {
            self.args
                .context
                .stats
                .refused
                .fetch_add(1, Ordering::Relaxed);
            let _ = reply.send(Err(SubmitError::QueueFull {
                running: self.busy(),
                queued: self.waiting(),
                capacity: settings.queue_capacity,
                retry_after: settings.retry_after_when_full,
            }));
            return;
        }
        let id = SessionId::new(fresh_id("s-")).expect("generated ids are valid");
        let record = SessionRecord {
            id: id.clone(),
            node: self.args.context.node.clone(),
            spec,
            state: SessionState::Queued,
            created_at: Timestamp::now(),
            started_at: None,
            ended_at: None,
            exit_code: None,
            signal: None,
            reason: None,
            process: None,
            output_lines: 0,
            stop_requested: None,
        };
        if let Some(key) = &record.spec.idempotency_key {
            self.keys.insert(key.clone(), id.clone());
        }
        let store = self.args.context.store.clone();
        let me = ctx.handle().clone();
        let create = store.create(record.clone());
        tokio::spawn({
            let (id, record) = (id.clone(), record.clone());
            async move {
                let mut result = create.await;
                if let Err(StoreError::Io(_) | StoreError::InUse(_)) = &result {
                    // A write reported failed may have landed (the store's commit can fail after
                    // it reached the disk): a record stored under this new id is this one, and
                    // the caller is told it was accepted, not to submit it again.
                    if let Ok(Some(stored)) = store.get(&id).await
                        && stored == record
                    {
                        result = Ok(());
                    }
                }
                let _ = me.cast(ManagerMsg::Created { id, result });
            }
        });
        self.args.shared.pending.insert(
            id,
            Pending {
                record,
                reply,
                start,
            },
        );
    }

    /// Drops the idempotency key of session `id`, which this instance no longer holds.
    fn forget_key(&mut self, id: &SessionId) {
        self.keys.retain(|_, held| held != id);
    }

    /// The session already submitted with `key`, if any.
    async fn existing_by_key(&self, key: &str) -> Option<Result<Admitted, StoreError>> {
        if let Some(id) = self.keys.get(key) {
            if let Some(pending) = self.args.shared.pending.get(id) {
                return Some(Ok(Admitted {
                    record: pending.record.clone(),
                    position: None,
                    existing: true,
                }));
            }
            if let Some(key) = self.queued.get(id) {
                return Some(Ok(Admitted {
                    record: self.queue[key].clone(),
                    position: self.position(id),
                    existing: true,
                }));
            }
        }
        match self.args.context.store.find_by_key(key).await {
            Ok(Some(record)) => Some(Ok(Admitted {
                position: self.position(&record.id),
                record,
                existing: true,
            })),
            Ok(None) => None,
            Err(error) => Some(Err(error)),
        }
    }

    fn created(
        &mut self,
        ctx: &Context<ManagerMsg>,
        id: SessionId,
        result: Result<(), StoreError>,
    ) {
        let Some((_, pending)) = self.args.shared.pending.remove(&id) else {
            // Accepted already: a restarted instance found the record in the store.
            return;
        };
        if let Err(error) = result {
            if let Some(key) = &pending.record.spec.idempotency_key {
                self.keys.remove(key);
            }
            let _ = pending.reply.send(Err(SubmitError::Store(error)));
            // A submission that was to start held a slot: what waits behind it runs now, and a
            // drain waiting for it may be done. Nothing else would tell the manager on an idle
            // node.
            self.drain_queue(ctx);
            self.update_gauges();
            self.answer_drain();
            return;
        }
        self.accept(ctx, id, pending);
    }

    /// A submission is stored: count it, run or queue it, announce it, answer the caller.
    fn accept(&mut self, ctx: &Context<ManagerMsg>, id: SessionId, pending: Pending) {
        self.args
            .context
            .stats
            .submitted
            .fetch_add(1, Ordering::Relaxed);
        let record = pending.record;
        let kind = record.spec.kind.tag();
        let priority = record.spec.priority;
        self.registry(RegistryMsg::SessionUp(SessionEntry {
            id: id.clone(),
            node: record.node.clone(),
        }));
        // While the node shuts down, a submission stored meanwhile waits for the next start,
        // like the queue: the running sessions were told to stop, and this one would not be.
        let position = if pending.start
            && !self.draining()
            && self.busy() < self.args.context.settings.max_concurrent
        {
            self.running.insert(id.clone(), Timestamp::now());
            self.spawn_session(ctx, id.clone());
            None
        } else {
            Some(self.enqueue(record.clone()))
        };
        self.args.context.events.publish(
            Some(id),
            EventData::SessionQueued(SessionQueued {
                kind,
                priority,
                position: position.unwrap_or(0),
            }),
        );
        let _ = pending.reply.send(Ok(Admitted {
            record,
            position,
            existing: false,
        }));
        self.drain_queue(ctx);
        self.update_gauges();
        self.answer_drain();
    }

    /// Whether the node is shutting down (asked by a drain, to this instance or an earlier one).
    fn draining(&self) -> bool {
        self.args.shared.draining.load(Ordering::SeqCst)
    }

    /// Tells every running session to stop: the node shuts down.
    fn interrupt_running(&self) {
        for id in self.running.keys() {
            if let Some(handle) = self.args.shared.handle(id) {
                let _ = handle.cast(SessionMsg::Interrupt);
            }
        }
    }

    /// Answers drain requests once nothing runs.
    fn answer_drain(&mut self) {
        if self.busy() > 0 || !self.draining() {
            return;
        }
        let drains = &self.args.shared.drains;
        let keys: Vec<u64> = drains.iter().map(|entry| *entry.key()).collect();
        for key in keys {
            if let Some((_, reply)) = drains.remove(&key) {
                let _ = reply.send(());
            }
        }
    }

    /// Starts queued sessions while there are free slots (not while draining).
    fn drain_queue(&mut self, ctx: &Context<ManagerMsg>) {
        while !self.draining() && self.busy() < self.args.context.settings.max_concurrent {
            let Some((_, record)) = self.queue.pop_first() else {
                break;
            };
            self.queued.remove(&record.id);
            self.running.insert(record.id.clone(), Timestamp::now());
            self.spawn_session(ctx, record.id);
        }
    }

    fn spawn_session(&mut self, ctx: &Context<ManagerMsg>, id: SessionId) {
        if self.has_live_actor(&id) {
            // Its actor runs already; a second one would be refused, and a new handle would
            // not reach the running one.
            tracing::warn!(session = %id, "not starting a second actor for a session");
            return;
        }
        let handle = ActorHandle::new(self.args.supervisor.path().child(id.as_str()));
        self.args.shared.handles.insert(id.clone(), handle.clone());
        let args = SessionArgs {
            id: id.clone(),
            context: self.args.context.clone(),
            manager: ctx.handle().clone(),
        };
        let spec = ChildSpec::worker(&handle, move || (SessionActor, args.clone()))
            .policy(ChildPolicy::Transient)
            .shutdown(Shutdown::Graceful(Duration::from_secs(10)));
        let supervisor = self.args.supervisor.clone();
        let me = ctx.handle().clone();
        tokio::spawn(async move {
            if let Err(error) = supervisor.start_child(spec).await {
                let _ = me.cast(ManagerMsg::StartFailed { id, error });
            }
        });
    }

    fn start_failed(&mut self, ctx: &Context<ManagerMsg>, id: SessionId, error: StartChildError) {
        if let StartChildError::AlreadyExists(_) = error {
            // The session has an actor already (it runs, and ends with a `Finished`): never
            // mark a live run failed.
            tracing::warn!(session = %id, "a session's actor was started twice; the first one runs it");
            return;
        }
        let reason = error.to_string();
        tracing::error!(session = %id, reason = %reason, "a session actor could not be started");
        self.running.remove(&id);
        self.forget_key(&id);
        self.args.shared.handles.remove(&id);
        self.registry(RegistryMsg::SessionDown(id.clone()));
        self.record_start_failure(ctx, id, reason, 0);
        self.drain_queue(ctx);
        self.update_gauges();
        self.answer_drain();
    }

    /// Whether this instance holds session `id`: being stored, queued, running, or with an actor.
    fn holds(&self, id: &SessionId) -> bool {
        self.args.shared.pending.contains_key(id)
            || self.queued.contains_key(id)
            || self.running.contains_key(id)
            || self.has_live_actor(id)
    }

    /// Records, off the mailbox, that session `id` could not be started: `failed` (after
    /// `starting`, when it is still `queued`), and its `session.failed` event.
    ///
    /// A write that fails is tried again, after 1 s and then twice as long each time up to 30 s,
    /// until it lands: the session has left the queue and has no actor, so nothing else would
    /// ever write it, and it would stay `queued` or `starting` in the store (listed as waiting,
    /// its caller following a run that never comes) until the node restarted. Each retry goes
    /// through the manager (`RecordStartFailure`), which drops it when the session is its own
    /// again: a restarted instance recovered it from the store, queued again or adopted as
    /// starting, and there it runs or ends as any session does. Each attempt reads the record
    /// afresh, so an attempt after a partial success goes on from where the last one stopped,
    /// and a record found ended (or changed by someone else: a conflict) ends the retries.
    fn record_start_failure(
        &self,
        ctx: &Context<ManagerMsg>,
        id: SessionId,
        reason: String,
        attempt: u32,
    ) {
        let context = self.args.context.clone();
        let me = ctx.handle().clone();
        tokio::spawn(async move {
            let Err(error) = write_start_failure(&context, &id, &reason).await else {
                return;
            };
            if matches!(error, StoreError::Conflict { .. } | StoreError::NotFound(_)) {
                tracing::warn!(session = %id, %error, "a session that could not be started was changed meanwhile; not recording its failure");
                return;
            }
            let pause = START_FAILURE_RETRY_MIN
                .saturating_mul(1 << attempt.min(16))
                .min(START_FAILURE_RETRY_MAX);
            tracing::error!(session = %id, %error, retry_in = ?pause, "cannot record a session that could not be started; trying again");
            tokio::time::sleep(pause).await;
            let _ = me.cast(ManagerMsg::RecordStartFailure {
                id,
                reason,
                attempt: attempt.saturating_add(1),
            });
        });
    }

    fn cancel(
        &mut self,
        ctx: &Context<ManagerMsg>,
        id: SessionId,
        reply: RpcReplyPort<Result<SessionRecord, CancelError>>,
    ) {
        let context = self.args.context.clone();
        if let Some(key) = self.queued.remove(&id) {
            let me = ctx.handle().clone();
            let record = self
                .queue
                .remove(&key)
                .expect("queued sessions are in the queue");
            // Taken back with the record should the cancel not be stored (`requeue`).
            self.forget_key(&id);
            self.update_gauges();
            self.registry(RegistryMsg::SessionDown(id.clone()));
            tokio::spawn(async move {
                let at = Timestamp::now();
                let reason = "cancelled on request".to_owned();
                let mut next = record.clone();
                next.state = SessionState::Cancelled;
                next.ended_at = Some(at);
                next.reason = Some(reason.clone());
                let transition = Transition {
                    from: SessionState::Queued,
                    to: SessionState::Cancelled,
                    at,
                    reason: Some(reason.clone()),
                };
                match context.store.transition(next.clone(), transition).await {
                    Ok(()) => {
                        context
                            .stats
                            .record_end(SessionState::Cancelled, Duration::ZERO);
                        context.events.publish(
                            Some(id),
                            EventData::SessionCancelled(SessionEnded {
                                exit_code: None,
                                signal: None,
                                reason: Some(reason),
                                duration_ms: 0,
                            }),
                        );
                        let _ = reply.send(Ok(next));
                    }
                    Err(error) => {
                        // Not cancelled: it waits again (before the caller hears of it, so a
                        // retry finds it queued).
                        let _ = me.cast(ManagerMsg::Requeue { record, seq: key.1 });
                        let _ = reply.send(Err(CancelError::Store(error)));
                    }
                }
            });
            return;
        }
        if self.args.shared.pending.contains_key(&id) {
            // Its store write is in flight (its id is known through its idempotency key): not
            // queued yet, not to be found in the store yet. The caller retries.
            let _ = reply.send(Err(CancelError::Unavailable(id)));
            return;
        }
        if let Some(handle) = self.args.shared.handle(&id) {
            tokio::spawn(async move {
                let answer = handle
                    .call(|reply| SessionMsg::Cancel { reply }, MANAGER_TIMEOUT)
                    .await;
                let outcome = match answer {
                    Ok(record) => Ok(record),
                    // The actor ended meanwhile: the stored record is the answer. One that has
                    // not ended did not take the cancel (its actor failed on it, say, or is
                    // busy): the caller is told to retry, never that it was taken.
                    Err(_) => match context.store.get(&id).await {
                        Ok(Some(record)) if record.state.is_terminal() => Ok(record),
                        Ok(Some(_)) => Err(CancelError::Unavailable(id)),
                        Ok(None) => Err(CancelError::NotFound(id)),
                        Err(error) => Err(CancelError::Store(error)),
                    },
                };
                let _ = reply.send(outcome);
            });
            return;
        }
        tokio::spawn(async move {
            let outcome = match context.store.get(&id).await {
                Ok(Some(record)) => Ok(record),
                Ok(None) => Err(CancelError::NotFound(id)),
                Err(error) => Err(CancelError::Store(error)),
            };
            let _ = reply.send(outcome);
        });
    }

    /// Puts back a queued session whose cancellation failed, in its place when that is free,
    /// unless it is queued or runs already (a restarted manager found it in the store).
    fn requeue(&mut self, ctx: &Context<ManagerMsg>, record: SessionRecord, seq: u64) {
        if self.queued.contains_key(&record.id)
            || self.running.contains_key(&record.id)
            || self.has_live_actor(&record.id)
        {
            return;
        }
        self.registry(RegistryMsg::SessionUp(SessionEntry {
            id: record.id.clone(),
            node: record.node.clone(),
        }));
        if let Some(idempotency) = &record.spec.idempotency_key {
            self.keys.insert(idempotency.clone(), record.id.clone());
        }
        let key = (Reverse(record.spec.priority), seq);
        if self.queue.contains_key(&key) {
            self.enqueue(record);
        } else {
            // Never handed out again (an earlier instance may have numbered past this one).
            self.next_seq = self.next_seq.max(seq + 1);
            self.queued.insert(record.id.clone(), key);
            self.queue.insert(key, record);
        }
        self.drain_queue(ctx);
        self.update_gauges();
    }

    fn summary(&self) -> SessionsSummary {
        let settings = &self.args.context.settings;
        SessionsSummary {
            running: self.busy(),
            queued: self.waiting(),
            max_concurrent: settings.max_concurrent,
            queue_capacity: settings.queue_capacity,
            longest_running: self
                .running
                .iter()
                .min_by_key(|(_, since)| **since)
                .map(|(id, since)| (id.clone(), *since)),
        }
    }

    fn update_gauges(&self) {
        let stats = &self.args.context.stats;
        stats.running.store(self.busy() as u64, Ordering::Relaxed);
        stats.queued.store(self.waiting() as u64, Ordering::Relaxed);
    }

    fn report_health(&self) {
        let summary = self.summary();
        let full = summary.queued >= summary.queue_capacity;
        let mut detail = format!(
            "{}/{} running, {}/{} queued",
            summary.running, summary.max_concurrent, summary.queued, summary.queue_capacity
        );
        if let Some((id, since)) = &summary.longest_running {
            detail.push_str(&format!("; longest running: {id} since {since}"));
        }
        if full {
            detail.push_str("; the queue is full");
        }
        let status = if full {
            HealthStatus::Degraded
        } else {
            HealthStatus::Healthy
        };
        let now = Timestamp::now();
        let figures = SessionsHealth {
            running: summary.running,
            queued: summary.queued,
            max_concurrent: summary.max_concurrent,
            queue_capacity: summary.queue_capacity,
            longest_running: summary.longest_running.map(|(id, since)| LongestRunning {
                id,
                since,
                elapsed_secs: now.as_micros().saturating_sub(since.as_micros()) / 1_000_000,
            }),
        };
        self.args.context.health.report_figures(
            "sessions",
            status,
            detail,
            Some(ComponentFigures::Sessions(figures)),
        );
    }
}

/// Writes the end of session `id`, whose actor could not be started because of `reason`:
/// `queued → starting` first if it is still queued (a queued run cannot fail, nor stay queued
/// with no queue), then `→ failed`, and publishes `session.failed`. Nothing for a record that is
/// gone or has ended.
async fn write_start_failure(
    context: &SessionContext,
    id: &SessionId,
    reason: &str,
) -> Result<(), StoreError> {
    let Some(mut record) = context.store.get(id).await? else {
        return Ok(());
    };
    if record.state.is_terminal() {
        return Ok(());
    }
    let why = format!("the session could not be started: {reason}");
    if record.state == SessionState::Queued {
        let mut starting = record.clone();
        starting.state = SessionState::Starting;
        let transition = Transition {
            from: SessionState::Queued,
            to: SessionState::Starting,
            at: Timestamp::now(),
            reason: None,
        };
        context
            .store
            .transition(starting.clone(), transition)
            .await?;
        record = starting;
    }
    let at = Timestamp::now();
    let mut next = record.clone();
    next.state = SessionState::Failed;
    next.reason = Some(why.clone());
    next.ended_at = Some(at);
    let transition = Transition {
        from: record.state,
        to: SessionState::Failed,
        at,
        reason: Some(why.clone()),
    };
    context.store.transition(next, transition).await?;
    context.events.publish(
        Some(id.clone()),
        EventData::SessionFailed(SessionEnded {
            exit_code: None,
            signal: None,
            reason: Some(why),
            duration_ms: 0,
        }),
    );
    Ok(())
}
