//! Supervisors with Erlang/OTP semantics, on ractor primitives.
//!
//! ractor links actors and reports their exits but has no restart strategies; this module adds
//! them. A [`Supervisor`] is itself an [`Actor`]: it starts its children in order, watches their
//! exits, and on a failure consults its pure [`RestartTracker`] to restart (after a jittered
//! backoff, scheduled as a message to itself so its mailbox stays free) or to give up. Giving up
//! means stopping every child in reverse order and failing, so that the parent supervisor sees
//! the failure ("escalation").
//!
//! - Strategies: one_for_one, one_for_all, rest_for_one. Dynamic children (added with
//!   [`SupervisorMsg::StartChild`], bounded by `max_children`) make a dynamic one_for_one
//!   supervisor. A `StartChild` whose caller gave up (its reply port is closed: the call's
//!   deadline passed while the request waited) starts nothing, and a child whose caller gave up
//!   while it started is stopped for good and forgotten: nobody would track it.
//! - Policies: permanent, transient (restarted only after an abnormal exit), temporary.
//! - A child whose `pre_start` fails during a restart counts as a failed restart (ractor reports
//!   that as a `SpawnErr` from the spawn call, never as a supervision event).
//! - Every restart is one WARN log line (`supervisor`, `child`, `reason`, `restart_count`,
//!   `restarts_in_window`, `window_secs`, …) and one `actor.restarted` event; giving up is an
//!   ERROR line and one `actor.escalated` event.
//! - Children are addressed through [`ActorHandle`]s that survive restarts.
//! - Restart in place: under one_for_one with no backoff, a worker child that fails is replaced
//!   inside its own ractor actor, keeping its mailbox, when the restart book admits it (it runs,
//!   it is not being stopped, and the restart stays within the intensity). The failure is
//!   recorded in the same book the supervisor uses, so intensity and escalation are unchanged;
//!   the supervisor then logs and publishes the restart like any other, asked once the child's
//!   worker idles (see `kernel::idle`), in the order restarts happened, and before it handles any
//!   later exit of a child. Otherwise (a group
//!   strategy, a backoff, a supervisor child, a temporary child, or one restart too many) the
//!   child exits and the supervisor handles it here.
//! - In one_for_all and rest_for_one, a temporary sibling stopped because another child failed is
//!   not restarted: it is removed, as in OTP.
//! - Stopping: children stop in reverse start order, each gracefully within its [`Shutdown`]
//!   timeout, then killed. A supervisor stopped with a deadline (by its parent, which kills it
//!   after its own shutdown timeout, or by [`stop_within`]) fits its children's stops into it:
//!   each may take at most what is left minus a reserve for those stopped after it, so the last
//!   ones still stop gracefully when the first ones hang (see `stop::StopBudget`).

mod book;
mod restart;
mod spec;
mod stop;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use ractor::{ActorId, RpcReplyPort, SupervisionEvent};

pub use restart::{Backoff, ChildRestarts, RestartDecision, RestartIntensity, RestartTracker};
pub use spec::{ChildPolicy, ChildSpec, Shutdown, Strategy};
pub use stop::stop_within;

use crate::event::{ActorEscalated, ActorRestarted, EventBus, EventData};
use crate::ids::ActorPath;
use crate::kernel::{
    Actor, ActorDirectory, ActorError, ActorHandle, CallError, ChildKind, Context, DirectoryEntry,
    HandleStatus, InPlaceRestarts, Instance,
};
use book::{ChildRestartHook, RestartBook, Unannounced};
use stop::{StopBudget, StopBy};

/// How long callers wait for a supervisor to start a dynamic child.
pub const START_CHILD_TIMEOUT: Duration = Duration::from_secs(30);

/// Restart behaviour of one supervisor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SupervisorConfig {
    /// Which children restart together.
    pub strategy: Strategy,
    /// How many restarts are tolerated within the window.
    pub intensity: RestartIntensity,
    /// Delay between a failure and the restart.
    pub backoff: Backoff,
    /// Bound on dynamic children; `None` for no bound.
    pub max_children: Option<usize>,
    /// Seed of the jitter generator (fixed in tests for reproducible delays).
    pub jitter_seed: Option<u64>,
}

/// What each supervisor instance starts with.
#[derive(Clone, Default)]
pub struct SupervisorArgs {
    /// Restart behaviour.
    pub config: SupervisorConfig,
    /// Static children, started in this order and stopped in reverse.
    pub children: Vec<ChildSpec>,
    /// Where `actor.restarted` / `actor.escalated` go.
    pub events: Option<EventBus>,
    /// The node's actor directory, kept up to date with this supervisor's children.
    pub directory: Option<ActorDirectory>,
}

/// Messages of a supervisor.
pub enum SupervisorMsg {
    /// Add and start a dynamic child.
    StartChild {
        /// The child.
        spec: ChildSpec,
        /// The outcome.
        reply: RpcReplyPort<Result<(), StartChildError>>,
    },
    /// Stop a child gracefully and forget it (not restarted).
    TerminateChild {
        /// The child's name (last path segment).
        name: String,
        /// True if it existed.
        reply: RpcReplyPort<bool>,
    },
    /// List the children.
    Children {
        /// The list, in start order.
        reply: RpcReplyPort<Vec<ChildInfo>>,
    },
    /// A scheduled restart is due (sent by the supervisor to itself).
    RestartDue {
        /// Which scheduled restart.
        token: u64,
    },
    /// Children restarted in place (their hosts queued them): announce them, oldest first.
    AnnounceInPlace,
}

/// Why a dynamic child was not started.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StartChildError {
    /// The name is taken.
    #[error("a child named {0} already runs under this supervisor")]
    AlreadyExists(String),
    /// The supervisor is full.
    #[error("this supervisor already runs its maximum of {max} children; retry when one ends")]
    MaxChildren {
        /// The bound.
        max: usize,
    },
    /// The child's `pre_start` failed.
    #[error("child {path} failed to start: {reason}")]
    StartFailed {
        /// The child.
        path: ActorPath,
        /// Its error.
        reason: String,
    },
    /// The supervisor did not answer.
    #[error(transparent)]
    Unavailable(#[from] CallError),
}

/// One child as a supervisor reports it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ChildInfo {
    /// The child's path.
    pub path: ActorPath,
    /// Worker or supervisor.
    pub kind: ChildKind,
    /// Restart policy.
    pub policy: ChildPolicy,
    /// Lifecycle status.
    pub status: HandleStatus,
    /// Restarts so far.
    pub restarts: u64,
}

/// The supervisor actor.
pub struct Supervisor;

struct Child {
    spec: ChildSpec,
    /// The running instance, if any.
    instance: Option<Instance>,
    dynamic: bool,
}

struct PendingRestart {
    /// Children to start, with the reason each restarts.
    entries: Vec<(ActorPath, String)>,
    delay: Duration,
    restarts_in_window: u32,
}

/// State of one supervisor instance.
pub struct SupervisorState {
    path: ActorPath,
    config: SupervisorConfig,
    book: Arc<RestartBook>,
    /// What children that may restart in place get (`None` when this supervisor's strategy or
    /// backoff does not allow it).
    in_place: Option<Arc<dyn InPlaceRestarts>>,
    /// Restarts in place its children's hosts queued and this supervisor has not announced yet.
    unannounced: Arc<Unannounced>,
    children: Vec<Child>,
    exiting: HashSet<ActorId>,
    pending: HashMap<u64, PendingRestart>,
    next_token: u64,
    events: Option<EventBus>,
    directory: Option<ActorDirectory>,
}

enum Exit {
    Normal(String),
    Abnormal(String),
}

impl Exit {
    fn reason(&self) -> &str {
        match self {
            Self::Normal(reason) | Self::Abnormal(reason) => reason,
        }
    }
}

pub(crate) fn now() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
}

impl Actor for Supervisor {
    const SUPERVISES: bool = true;

    type Msg = SupervisorMsg;
    type State = SupervisorState;
    type Arguments = SupervisorArgs;

    async fn pre_start(
        &self,
        ctx: &Context<Self::Msg>,
        args: Self::Arguments,
    ) -> Result<Self::State, ActorError> {
        let rng = match args.config.jitter_seed {
            Some(seed) => fastrand::Rng::with_seed(seed),
            None => fastrand::Rng::new(),
        };
        let tracker = RestartTracker::new(args.config.intensity, args.config.backoff);
        let book = RestartBook::new(tracker, rng, args.directory.clone());
        let unannounced = Arc::new(Unannounced::default());
        let in_place = (args.config.strategy == Strategy::OneForOne
            && args.config.backoff.max.is_zero())
        .then(|| {
            Arc::new(ChildRestartHook {
                book: book.clone(),
                supervisor: ctx.handle().clone(),
                events: args.events.clone(),
                unannounced: unannounced.clone(),
            }) as Arc<dyn InPlaceRestarts>
        });
        let mut state = SupervisorState {
            path: ctx.path().clone(),
            config: args.config,
            book,
            in_place,
            unannounced,
            children: Vec::with_capacity(args.children.len()),
            exiting: HashSet::new(),
            pending: HashMap::new(),
            next_token: 1,
            events: args.events,
            directory: args.directory,
        };
        for spec in args.children {
            state.add_child(spec, false);
            let index = state.children.len() - 1;
            if let Err(reason) = state.start_one(ctx, index).await {
                let path = state.children[index].spec.path.clone();
                state.stop_all(None).await;
                return Err(format!("child {path} failed to start: {reason}").into());
            }
        }
        Ok(state)
    }

    async fn handle(
        &self,
        ctx: &Context<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorError> {
        match message {
            SupervisorMsg::StartChild { spec, reply } => {
                // A call does not take its request back when its deadline passes: the request
                // waits here (or in this supervisor's handle while it restarts) and runs later.
                // Its caller was told the start failed and tracks no child, so none is started.
                if reply.is_closed() {
                    tracing::warn!(
                        supervisor = %state.path,
                        child = %spec.path,
                        "not starting a dynamic child: its caller gave up waiting"
                    );
                    return Ok(());
                }
                let path = spec.path.clone();
                let outcome = state.start_dynamic(ctx, spec).await;
                let started = outcome.is_ok();
                if reply.send(outcome).is_err() && started {
                    // The caller gave up while the child started: undo the start, as for a
                    // temporary child that nobody asked for.
                    tracing::warn!(
                        supervisor = %state.path,
                        child = %path,
                        "stopping a dynamic child: its caller gave up waiting while it started"
                    );
                    state.abandon(&path).await;
                }
                Ok(())
            }
            SupervisorMsg::TerminateChild { name, reply } => {
                let path = state.path.child(&name);
                let existed = state.abandon(&path).await;
                let _ = reply.send(existed);
                Ok(())
            }
            SupervisorMsg::Children { reply } => {
                let _ = reply.send(state.child_infos());
                Ok(())
            }
            SupervisorMsg::RestartDue { token } => state.restart_due(ctx, token).await,
            SupervisorMsg::AnnounceInPlace => {
                state.announce_in_place();
                Ok(())
            }
        }
    }

    async fn on_child_event(
        &self,
        ctx: &Context<Self::Msg>,
        event: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorError> {
        let (id, exit) = match event {
            SupervisionEvent::ActorFailed(cell, error) => {
                (cell.get_id(), Exit::Abnormal(error.to_string()))
            }
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                let exit = match reason.as_deref() {
                    Some(killed @ ("killed" | "actor_task_cancelled")) => {
                        Exit::Abnormal(killed.to_owned())
                    }
                    Some(reason) => Exit::Normal(reason.to_owned()),
                    None => Exit::Normal("stopped".to_owned()),
                };
                (cell.get_id(), exit)
            }
            _ => return Ok(()),
        };
        // Restarts in place come first: they happened before this exit.
        state.announce_in_place();
        if state.exiting.remove(&id) {
            return Ok(());
        }
        let Some(index) = state.children.iter().position(|child| {
            child
                .instance
                .as_ref()
                .is_some_and(|instance| instance.cell.get_id() == id)
        }) else {
            return Ok(());
        };
        state.child_exited(ctx, index, exit).await
    }

    async fn post_stop(
        &self,
        ctx: &Context<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorError> {
        state.announce_in_place();
        state.pending.clear();
        state.stop_all(stop::deadline_of(&ctx.cell())).await;
        // Children restarted in place while they were being stopped.
        state.announce_in_place();
        Ok(())
    }
}

impl SupervisorState {
    fn add_child(&mut self, spec: ChildSpec, dynamic: bool) {
        if let Some(directory) = &self.directory {
            directory.insert(
                spec.path.clone(),
                DirectoryEntry {
                    kind: spec.kind,
                    control: spec.starter.control(),
                },
            );
        }
        self.book.add(&spec.path);
        self.children.push(Child {
            spec,
            instance: None,
            dynamic,
        });
    }

    /// Removes a child for good (its handle must already be stopped or unbound).
    fn forget(&mut self, index: usize) {
        let child = self.children.remove(index);
        self.book.remove(&child.spec.path);
        if let Some(directory) = &self.directory {
            directory.remove(&child.spec.path, &*child.spec.starter.control());
        }
        for pending in self.pending.values_mut() {
            pending.entries.retain(|(path, _)| *path != child.spec.path);
        }
    }

    /// Stops the child at `path` gracefully, for good, and forgets it. Returns false when
    /// there is no such child.
    async fn abandon(&mut self, path: &ActorPath) -> bool {
        let Some(index) = self.index_of(path) else {
            return false;
        };
        self.children[index].spec.starter.stop_for_good();
        self.stop_child(index, None).await;
        self.forget(index);
        true
    }

    fn index_of(&self, path: &ActorPath) -> Option<usize> {
        self.children
            .iter()
            .position(|child| child.spec.path == *path)
    }

    async fn start_one(
        &mut self,
        ctx: &Context<SupervisorMsg>,
        index: usize,
    ) -> Result<(), String> {
        let child = &mut self.children[index];
        // Only workers that are restarted after a failure may restart in place: a supervisor
        // child owns linked children that a restart in place would leave running.
        let in_place = self.in_place.clone().filter(|_| {
            child.spec.kind == ChildKind::Worker && child.spec.policy != ChildPolicy::Temporary
        });
        // Allowed before the start, so that an instance that fails right after it is bound
        // already restarts in place.
        self.book
            .allow_in_place(&child.spec.path, in_place.is_some());
        let instance = child
            .spec
            .starter
            .start(ctx.cell(), in_place)
            .await
            .map_err(|error| match error {
                ractor::SpawnErr::StartupFailed(inner) => inner.to_string(),
                other => other.to_string(),
            })?;
        child.instance = Some(instance);
        Ok(())
    }

    async fn start_dynamic(
        &mut self,
        ctx: &Context<SupervisorMsg>,
        spec: ChildSpec,
    ) -> Result<(), StartChildError> {
        if self.index_of(&spec.path).is_some() {
            return Err(StartChildError::AlreadyExists(spec.path.name().to_owned()));
        }
        if let Some(max) = self.config.max_children
            && self.children.len() >= max
        {
            return Err(StartChildError::MaxChildren { max });
        }
        let path = spec.path.clone();
        self.add_child(spec, true);
        let index = self.children.len() - 1;
        if let Err(reason) = self.start_one(ctx, index).await {
            self.children[index].spec.starter.stop_for_good();
            self.forget(index);
            return Err(StartChildError::StartFailed { path, reason });
        }
        Ok(())
    }

    async fn child_exited(
        &mut self,
        ctx: &Context<SupervisorMsg>,
        index: usize,
        exit: Exit,
    ) -> Result<(), ActorError> {
        let child = &mut self.children[index];
        child.instance = None;
        let restart = matches!(
            (child.spec.policy, &exit),
            (ChildPolicy::Permanent, _) | (ChildPolicy::Transient, Exit::Abnormal(_))
        );
        let path = child.spec.path.clone();
        if !restart {
            match &exit {
                Exit::Abnormal(reason) => tracing::warn!(
                    supervisor = %self.path,
                    child = %path,
                    reason = %reason,
                    policy = ?child.spec.policy,
                    "child failed and is not restarted (its policy)"
                ),
                Exit::Normal(reason) => tracing::debug!(
                    supervisor = %self.path,
                    child = %path,
                    reason = %reason,
                    policy = ?child.spec.policy,
                    "child exited and is not restarted"
                ),
            }
            child.spec.starter.stop_for_good();
            self.forget(index);
            return Ok(());
        }
        child.spec.starter.unbind();
        let reason = exit.reason().to_owned();
        match self.book.on_failure(&path, now()) {
            RestartDecision::Escalate { restarts_in_window } => {
                Err(self.escalate(&path, &reason, restarts_in_window).await)
            }
            RestartDecision::Restart {
                delay,
                restarts_in_window,
            } => {
                let group: Vec<usize> = match self.config.strategy {
                    Strategy::OneForOne => vec![index],
                    Strategy::OneForAll => (0..self.children.len()).collect(),
                    Strategy::RestForOne => (index..self.children.len()).collect(),
                };
                for &sibling in group.iter().rev() {
                    if sibling != index && self.children[sibling].instance.is_some() {
                        if self.children[sibling].spec.policy == ChildPolicy::Temporary {
                            self.children[sibling].spec.starter.stop_for_good();
                        } else {
                            self.children[sibling].spec.starter.unbind();
                        }
                        self.stop_child(sibling, None).await;
                    }
                }
                // OTP: a temporary sibling stopped for this restart is not restarted; it goes.
                let temporary: Vec<ActorPath> = group
                    .iter()
                    .filter(|&&member| {
                        member != index
                            && self.children[member].spec.policy == ChildPolicy::Temporary
                    })
                    .map(|&member| self.children[member].spec.path.clone())
                    .collect();
                let entries = group
                    .iter()
                    .filter(|&&member| {
                        member == index
                            || self.children[member].spec.policy != ChildPolicy::Temporary
                    })
                    .map(|&member| {
                        let member_path = self.children[member].spec.path.clone();
                        let why = if member == index {
                            reason.clone()
                        } else {
                            format!(
                                "restarted with {path} ({:?}), which failed: {reason}",
                                self.config.strategy
                            )
                        };
                        (member_path, why)
                    })
                    .collect();
                for gone in &temporary {
                    tracing::debug!(
                        supervisor = %self.path,
                        child = %gone,
                        failed = %path,
                        "temporary child stopped with its group and not restarted"
                    );
                    if let Some(index) = self.index_of(gone) {
                        self.forget(index);
                    }
                }
                let token = self.schedule(entries, delay, restarts_in_window);
                if delay.is_zero() {
                    self.restart_due(ctx, token).await
                } else {
                    tracing::debug!(
                        supervisor = %self.path,
                        child = %path,
                        reason = %reason,
                        delay_ms = delay.as_millis() as u64,
                        "child failed; restart scheduled"
                    );
                    ctx.send_after(delay, SupervisorMsg::RestartDue { token });
                    Ok(())
                }
            }
        }
    }

    /// Records a restart group; a child waits in at most one group.
    fn schedule(
        &mut self,
        entries: Vec<(ActorPath, String)>,
        delay: Duration,
        restarts_in_window: u32,
    ) -> u64 {
        for pending in self.pending.values_mut() {
            pending
                .entries
                .retain(|(path, _)| !entries.iter().any(|(new, _)| new == path));
        }
        self.pending
            .retain(|_, pending| !pending.entries.is_empty());
        let token = self.next_token;
        self.next_token += 1;
        self.pending.insert(
            token,
            PendingRestart {
                entries,
                delay,
                restarts_in_window,
            },
        );
        token
    }

    async fn restart_due(
        &mut self,
        ctx: &Context<SupervisorMsg>,
        token: u64,
    ) -> Result<(), ActorError> {
        let Some(mut pending) = self.pending.remove(&token) else {
            return Ok(());
        };
        pending
            .entries
            .sort_by_key(|(path, _)| self.index_of(path).unwrap_or(usize::MAX));
        for position in 0..pending.entries.len() {
            let (path, reason) = pending.entries[position].clone();
            let Some(index) = self.index_of(&path) else {
                continue;
            };
            if self.children[index].instance.is_some() {
                continue;
            }
            match self.start_one(ctx, index).await {
                Ok(()) => self.report_restart(index, &reason, &pending),
                Err(error) => {
                    let failure = format!("restart failed in pre_start: {error}");
                    match self.book.on_failure(&path, now()) {
                        RestartDecision::Escalate { restarts_in_window } => {
                            return Err(self.escalate(&path, &failure, restarts_in_window).await);
                        }
                        RestartDecision::Restart {
                            delay,
                            restarts_in_window,
                        } => {
                            tracing::warn!(
                                supervisor = %self.path,
                                child = %path,
                                reason = %failure,
                                restarts_in_window,
                                delay_ms = delay.as_millis() as u64,
                                "restart attempt failed; retrying"
                            );
                            let mut rest = pending.entries.split_off(position);
                            rest[0].1 = failure;
                            let token = self.schedule(rest, delay, restarts_in_window);
                            let message = SupervisorMsg::RestartDue { token };
                            if delay.is_zero() {
                                let _ = ctx.send_self(message);
                            } else {
                                ctx.send_after(delay, message);
                            }
                            return Ok(());
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn report_restart(&mut self, index: usize, reason: &str, pending: &PendingRestart) {
        // Restarts in place that completed while this one was under way came first.
        self.announce_in_place();
        let child = &self.children[index];
        child
            .spec
            .starter
            .control()
            .stats()
            .restarts
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = child.spec.path.clone();
        let restart_count = self.book.record_restart(&path);
        self.announce_restart(
            path,
            reason.to_owned(),
            restart_count,
            pending.restarts_in_window,
            pending.delay.as_millis() as u64,
        );
    }

    /// The one WARN line and the one `actor.restarted` event of a restart.
    /// Announces the restarts in place queued by this supervisor's children, oldest first.
    fn announce_in_place(&self) {
        self.unannounced
            .announce(&self.path, self.book.intensity(), self.events.as_ref());
    }

    fn announce_restart(
        &self,
        child: ActorPath,
        reason: String,
        restart_count: u64,
        restarts_in_window: u32,
        delay_ms: u64,
    ) {
        announce_restart(
            &self.path,
            self.book.intensity(),
            self.events.as_ref(),
            ActorRestartedFacts {
                child,
                reason,
                restart_count,
                restarts_in_window,
                delay_ms,
            },
        );
    }

    /// Stops every child and returns the error this supervisor fails with.
    async fn escalate(
        &mut self,
        child: &ActorPath,
        reason: &str,
        restarts_in_window: u32,
    ) -> ActorError {
        self.announce_in_place();
        let window = self.book.intensity().window;
        tracing::error!(
            supervisor = %self.path,
            child = %child,
            reason = %reason,
            restarts_in_window,
            window_secs = window.as_secs(),
            "supervisor gives up after too many restarts; escalating to its parent"
        );
        if let Some(events) = &self.events {
            events.publish(
                None,
                EventData::ActorEscalated(ActorEscalated {
                    supervisor: self.path.clone(),
                    child: child.clone(),
                    reason: reason.to_owned(),
                    restarts_in_window,
                    window_secs: window.as_secs(),
                }),
            );
        }
        self.pending.clear();
        self.stop_all(None).await;
        // Children restarted in place while they were being stopped: this instance ends with an
        // error, without `post_stop`.
        self.announce_in_place();
        format!(
            "{} escalated: {restarts_in_window} restarts within {}s; last, {child} failed: {reason}",
            self.path,
            window.as_secs()
        )
        .into()
    }

    /// Stops every child in reverse start order. Static children's handles wait for the next
    /// instance of this supervisor; dynamic children are forgotten (their handles stop).
    ///
    /// With a `deadline` (the one this supervisor's own stop must keep), each child's timeout
    /// is cut to what [`StopBudget`] allows it, so that the children stopped last still get
    /// their reserve however long the first ones take; without, each child gets its own.
    async fn stop_all(&mut self, deadline: Option<tokio::time::Instant>) {
        let order: Vec<usize> = (0..self.children.len()).rev().collect();
        let budget = deadline.map(|deadline| {
            let timeouts: Vec<Duration> = order
                .iter()
                .map(|&index| self.stop_timeout(index))
                .collect();
            StopBudget::new(deadline, tokio::time::Instant::now(), &timeouts)
        });
        for (position, &index) in order.iter().enumerate() {
            if self.children[index].dynamic {
                self.children[index].spec.starter.stop_for_good();
            } else {
                self.children[index].spec.starter.unbind();
            }
            let allowed = budget
                .as_ref()
                .map(|budget| budget.allowed(position, tokio::time::Instant::now()));
            self.stop_child(index, allowed).await;
        }
        let dynamic: Vec<usize> = (0..self.children.len())
            .rev()
            .filter(|&index| self.children[index].dynamic)
            .collect();
        for index in dynamic {
            self.forget(index);
        }
    }

    /// How long the child at `index` may take to stop on its own: zero when it does not run
    /// or is killed at once.
    fn stop_timeout(&self, index: usize) -> Duration {
        let child = &self.children[index];
        match (&child.instance, child.spec.shutdown) {
            (Some(_), Shutdown::Graceful(timeout)) => timeout,
            _ => Duration::ZERO,
        }
    }

    /// Stops one child gracefully within its shutdown timeout (or within `allowed`, when that
    /// is shorter), then kills it. A supervisor child is told the deadline, to fit its own
    /// children's stops into it.
    async fn stop_child(&mut self, index: usize, allowed: Option<Duration>) {
        let child = &mut self.children[index];
        let Some(instance) = child.instance.take() else {
            return;
        };
        let cell = &instance.cell;
        // From here a failure of the child is part of its stop, not something to repair.
        self.book.allow_in_place(&child.spec.path, false);
        self.exiting.insert(cell.get_id());
        match child.spec.shutdown {
            Shutdown::Graceful(own) => {
                let timeout = allowed.map_or(own, |allowed| allowed.min(own));
                let deadline =
                    crate::time::tokio_instant_after(tokio::time::Instant::now(), timeout);
                let _stop_by = StopBy::new(cell, deadline);
                instance.request_drain();
                match cell.drain_and_wait(Some(timeout)).await {
                    Ok(()) => {}
                    Err(ractor::RactorErr::Timeout) => {
                        tracing::warn!(
                            supervisor = %self.path,
                            child = %child.spec.path,
                            timeout_ms = timeout.as_millis() as u64,
                            shutdown_ms = own.as_millis() as u64,
                            "child did not stop in time; killing it"
                        );
                        let _ = cell.kill_and_wait(None).await;
                    }
                    Err(_) => {
                        let _ = cell.kill_and_wait(None).await;
                    }
                }
            }
            Shutdown::Kill => {
                let _ = cell.kill_and_wait(None).await;
            }
        }
        tracing::debug!(
            supervisor = %self.path,
            child = %self.children[index].spec.path,
            "child stopped"
        );
    }

    fn child_infos(&self) -> Vec<ChildInfo> {
        self.children
            .iter()
            .map(|child| {
                let control = child.spec.starter.control();
                ChildInfo {
                    path: child.spec.path.clone(),
                    kind: child.spec.kind,
                    policy: child.spec.policy,
                    status: control.status(),
                    restarts: self.book.total(&child.spec.path),
                }
            })
            .collect()
    }
}

impl Drop for SupervisorState {
    /// A supervisor that dies abruptly (a panic, a kill) never runs `post_stop`; its dynamic
    /// children die with it and nobody will restart them, so their handles stop here, and the
    /// restarts in place it had not announced yet are announced (the next instance has a queue
    /// of its own).
    fn drop(&mut self) {
        self.announce_in_place();
        for child in &self.children {
            if child.dynamic {
                child.spec.starter.stop_for_good();
                if let Some(directory) = &self.directory {
                    directory.remove(&child.spec.path, &*child.spec.starter.control());
                }
            }
        }
    }
}

/// The WARN line of a restart, with the fields of its `actor.restarted` event.
/// What a restart is announced with, beyond its supervisor's identity and intensity.
pub(crate) struct ActorRestartedFacts {
    pub(crate) child: ActorPath,
    pub(crate) reason: String,
    pub(crate) restart_count: u64,
    pub(crate) restarts_in_window: u32,
    pub(crate) delay_ms: u64,
}

/// Announces a restart: its WARN line, then its `actor.restarted` event.
pub(crate) fn announce_restart(
    supervisor: &ActorPath,
    intensity: RestartIntensity,
    events: Option<&EventBus>,
    facts: ActorRestartedFacts,
) {
    let restart = ActorRestarted {
        supervisor: supervisor.clone(),
        child: facts.child,
        reason: facts.reason,
        restart_count: facts.restart_count,
        restarts_in_window: facts.restarts_in_window,
        max_restarts: intensity.max_restarts,
        window_secs: intensity.window.as_secs(),
        delay_ms: facts.delay_ms,
    };
    log_restart(&restart);
    if let Some(events) = events {
        events.publish(None, EventData::ActorRestarted(restart));
    }
}

fn log_restart(restart: &ActorRestarted) {
    tracing::warn!(
        supervisor = %restart.supervisor,
        child = %restart.child,
        reason = %restart.reason,
        restart_count = restart.restart_count,
        restarts_in_window = restart.restarts_in_window,
        max_restarts = restart.max_restarts,
        window_secs = restart.window_secs,
        delay_ms = restart.delay_ms,
        "actor restarted"
    );
}

/// A supervisor's handle.
pub type SupervisorHandle = ActorHandle<SupervisorMsg>;

impl ActorHandle<SupervisorMsg> {
    /// Adds and starts a dynamic child. When this gives up after [`START_CHILD_TIMEOUT`]
    /// (`Unavailable(Timeout)`), the supervisor does not start the child later, and stops it
    /// for good if it was starting meanwhile.
    pub async fn start_child(&self, spec: ChildSpec) -> Result<(), StartChildError> {
        self.call(
            |reply| SupervisorMsg::StartChild { spec, reply },
            START_CHILD_TIMEOUT,
        )
        .await?
    }

    /// Stops a child gracefully and forgets it.
    pub async fn terminate_child(&self, name: &str) -> Result<bool, CallError> {
        let name = name.to_owned();
        self.call(
            |reply| SupervisorMsg::TerminateChild { name, reply },
            START_CHILD_TIMEOUT,
        )
        .await
    }

    /// Lists the children.
    pub async fn children(&self) -> Result<Vec<ChildInfo>, CallError> {
        self.call(
            |reply| SupervisorMsg::Children { reply },
            Duration::from_secs(5),
        )
        .await
    }
}
