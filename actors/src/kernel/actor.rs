//! The actor trait every troupe actor implements, and the adapter that runs it on ractor.
//!
//! The trait mirrors `ractor::Actor` with one difference: an actor gets a [`Context`] instead of
//! a bare `ActorRef`. The context knows the actor's path and its restart-surviving
//! [`ActorHandle`], and its self-sends go to this incarnation only (a timer armed by one
//! incarnation never fires into the next). The adapter, [`Hosted`], wraps every message in an
//! [`Envelope`](super::handle::Envelope) so queued messages survive a crash, counts messages and
//! handler time, and implements fault injection for every actor at once.
//!
//! Restart in place: when the supervisor allows it ([`InPlaceRestarts`]), a failed handler does
//! not end the ractor actor. The host drops the failed incarnation's state and timers, builds a
//! new incarnation (`pre_start`, `post_start`) in the same task, and goes on with the same
//! mailbox. That skips the three cross-task hand-offs of a respawn (the supervision event, the
//! spawn, the redelivery of queued messages); the supervisor only logs and publishes the restart
//! afterwards, off the critical path.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures::FutureExt;
use ractor::{ActorCell, ActorRef, SpawnErr, SupervisionEvent};
use tokio_util::sync::CancellationToken;

use super::handle::{ActorHandle, Envelope, FaultKind, Payload};
use super::stats::ActorStats;
use crate::ids::ActorPath;

/// The error type of actor callbacks; any error is a failure the supervisor sees.
pub type ActorError = ractor::ActorProcessingErr;

/// A troupe actor: one message enum, state owned by the actor and changed only in its handler.
pub trait Actor: Sized + Send + Sync + 'static {
    /// The one message enum of this actor, one variant per intent.
    type Msg: Send + 'static;
    /// State owned by one instance; rebuilt by `pre_start` on every restart.
    type State: Send + 'static;
    /// What `pre_start` needs; the supervisor builds a fresh value for every instance.
    type Arguments: Send + 'static;

    /// Builds the instance's state. A failure here is a failed start (or failed restart).
    fn pre_start(
        &self,
        ctx: &Context<Self::Msg>,
        args: Self::Arguments,
    ) -> impl Future<Output = Result<Self::State, ActorError>> + Send;

    /// Runs after the instance is linked to its supervisor, before the first message.
    fn post_start(
        &self,
        ctx: &Context<Self::Msg>,
        state: &mut Self::State,
    ) -> impl Future<Output = Result<(), ActorError>> + Send {
        let _ = (ctx, state);
        async { Ok(()) }
    }

    /// Handles one message. An error or a panic fails the instance.
    fn handle(
        &self,
        ctx: &Context<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> impl Future<Output = Result<(), ActorError>> + Send;

    /// Receives ractor supervision events about actors linked to this one (supervisors only).
    fn on_child_event(
        &self,
        ctx: &Context<Self::Msg>,
        event: SupervisionEvent,
        state: &mut Self::State,
    ) -> impl Future<Output = Result<(), ActorError>> + Send {
        let _ = (ctx, event, state);
        async { Ok(()) }
    }

    /// Runs when the instance stops gracefully (not after a panic or a kill).
    fn post_stop(
        &self,
        ctx: &Context<Self::Msg>,
        state: &mut Self::State,
    ) -> impl Future<Output = Result<(), ActorError>> + Send {
        let _ = (ctx, state);
        async { Ok(()) }
    }
}

/// What an actor instance knows about itself.
pub struct Context<M: Send + 'static> {
    myself: ActorRef<Envelope<M>>,
    handle: ActorHandle<M>,
    /// Counts the incarnations hosted by this ractor actor (1 for the first).
    incarnation: u64,
    /// Cancelled when this incarnation ends: its timers stop with it.
    timers: CancellationToken,
}

impl<M: Send + 'static> Context<M> {
    fn new(myself: ActorRef<Envelope<M>>, handle: ActorHandle<M>, incarnation: u64) -> Self {
        Self {
            myself,
            handle,
            incarnation,
            timers: CancellationToken::new(),
        }
    }

    /// This actor's path in the tree.
    pub fn path(&self) -> &ActorPath {
        self.handle.path()
    }

    /// The restart-surviving handle; give this out to others.
    pub fn handle(&self) -> &ActorHandle<M> {
        &self.handle
    }

    /// The ractor cell of this instance (to link children to it).
    pub fn cell(&self) -> ActorCell {
        self.myself.get_cell()
    }

    fn envelope(&self, message: M) -> Envelope<M> {
        Envelope::for_incarnation(self.incarnation, message, self.handle.stats().clone())
    }

    /// Sends a message to this incarnation. Returns it if the instance is stopping.
    pub fn send_self(&self, message: M) -> Result<(), M> {
        match self.myself.send_message(self.envelope(message)) {
            Ok(()) => {
                self.handle.stats().enqueued.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(ractor::MessagingErr::SendErr(envelope)) => match envelope.open() {
                Payload::Message(message) => Err(message),
                Payload::Fault(_) => unreachable!("self-sends carry messages"),
            },
            Err(_) => unreachable!("a typed ActorRef only fails with SendErr"),
        }
    }

    /// Sends `message` to this incarnation after `delay`, without blocking the mailbox meanwhile.
    /// The timer dies with the incarnation: it never fires into a restarted one.
    pub fn send_after(&self, delay: Duration, message: M) -> tokio::task::JoinHandle<()> {
        let myself = self.myself.clone();
        let stats = self.handle.stats().clone();
        let incarnation = self.incarnation;
        let ended = self.timers.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = ended.cancelled() => {}
                () = tokio::time::sleep(delay) => {
                    let envelope = Envelope::for_incarnation(incarnation, message, stats.clone());
                    match myself.send_message(envelope) {
                        Ok(()) => {
                            stats.enqueued.fetch_add(1, Ordering::Relaxed);
                        }
                        // Never enqueued, so not counted as discarded either.
                        Err(error) => forget_unsent(error),
                    }
                }
            }
        })
    }

    /// Sends `make()` to this incarnation every `period` until it ends.
    pub fn send_interval<F>(&self, period: Duration, make: F) -> tokio::task::JoinHandle<()>
    where
        F: Fn() -> M + Send + 'static,
    {
        let myself = self.myself.clone();
        let stats = self.handle.stats().clone();
        let incarnation = self.incarnation;
        let ended = self.timers.clone();
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(period);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticks.tick().await;
            loop {
                tokio::select! {
                    () = ended.cancelled() => return,
                    _ = ticks.tick() => {}
                }
                let envelope = Envelope::for_incarnation(incarnation, make(), stats.clone());
                if let Err(error) = myself.send_message(envelope) {
                    forget_unsent(error);
                    return;
                }
                stats.enqueued.fetch_add(1, Ordering::Relaxed);
            }
        })
    }

    /// Stops this instance after the current message (graceful: `post_stop` runs).
    pub fn stop(&self, reason: Option<String>) {
        self.myself.stop(reason);
    }
}

/// Drops a self-send that its mailbox refused without counting it as discarded.
fn forget_unsent<M: Send + 'static>(error: ractor::MessagingErr<Envelope<M>>) {
    if let ractor::MessagingErr::SendErr(envelope) = error {
        drop(envelope.open());
    }
}

/// What a restart in place was granted: the numbers the restart is reported with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Admission {
    /// Restarts inside the supervisor's window, this one included.
    pub(crate) restarts_in_window: u32,
}

/// The supervisor's side of a restart in place; implemented by the supervisor module.
pub(crate) trait InPlaceRestarts: Send + Sync {
    /// The instance at `path` failed. Returns an admission when it may replace the failed
    /// incarnation in place right now (the failure is then recorded); `None` sends the failure
    /// to the supervisor the ordinary way (the actor exits and the supervisor decides).
    fn admit(&self, path: &ActorPath) -> Option<Admission>;

    /// The new incarnation started: counts the restart (returns the child's restart total).
    fn record(&self, path: &ActorPath) -> u64;

    /// The new incarnation runs: the supervisor logs and publishes the restart.
    fn report(&self, path: &ActorPath, admission: Admission, restart_count: u64, reason: String);
}

/// How a host rebuilds its actor in place.
pub(crate) struct InPlace<A: Actor> {
    pub(crate) factory: Arc<dyn Fn() -> (A, A::Arguments) + Send + Sync>,
    pub(crate) restarts: Arc<dyn InPlaceRestarts>,
}

/// Runs a troupe [`Actor`] as a ractor actor whose mailbox carries envelopes.
pub(crate) struct Hosted<A: Actor> {
    handle: ActorHandle<A::Msg>,
    in_place: Option<InPlace<A>>,
}

/// One incarnation: the actor value and its state.
struct Incarnation<A: Actor> {
    actor: A,
    state: A::State,
}

/// The state ractor keeps for a hosted actor.
pub(crate) struct HostedState<A: Actor> {
    ctx: Context<A::Msg>,
    /// `None` only between a failed incarnation and its replacement.
    current: Option<Incarnation<A>>,
}

impl<A: Actor> Drop for HostedState<A> {
    fn drop(&mut self) {
        self.ctx.timers.cancel();
    }
}

/// Counts a message as handled when dropped: after the handler returns, panics, or is cancelled
/// by a kill, so a failed handler never leaves the mailbox depth one too high.
struct Handled<'a> {
    stats: &'a ActorStats,
    started: Instant,
}

impl Drop for Handled<'_> {
    fn drop(&mut self) {
        self.stats.record_handled(self.started.elapsed());
    }
}

fn panic_reason(payload: Box<dyn std::any::Any + Send>) -> String {
    match payload.downcast::<String>() {
        Ok(message) => *message,
        Err(payload) => match payload.downcast::<&str>() {
            Ok(message) => (*message).to_owned(),
            Err(_) => "a panic whose payload is not a string".to_owned(),
        },
    }
}

impl<A: Actor> Hosted<A> {
    /// Handles one message of the current incarnation; a panic becomes an error.
    async fn deliver(&self, hosted: &mut HostedState<A>, message: A::Msg) -> Result<(), String> {
        let _handled = Handled {
            stats: self.handle.stats(),
            started: Instant::now(),
        };
        let Some(current) = hosted.current.as_mut() else {
            return Err("no incarnation is running".to_owned());
        };
        let outcome = AssertUnwindSafe(current.actor.handle(
            &hosted.ctx,
            message,
            &mut current.state,
        ))
        .catch_unwind()
        .await;
        match outcome {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(error.to_string()),
            Err(payload) => Err(panic_reason(payload)),
        }
    }

    /// The current incarnation failed with `reason`: replace it in place when the supervisor
    /// admits that, or fail the ractor actor so the supervisor handles it.
    async fn failed(&self, hosted: &mut HostedState<A>, reason: String) -> Result<(), ActorError> {
        let Some(in_place) = &self.in_place else {
            return Err(reason.into());
        };
        let path = self.handle.path();
        let Some(admission) = in_place.restarts.admit(path) else {
            return Err(reason.into());
        };
        // The failed incarnation ends here: its timers stop and its state is dropped before
        // the next one starts, as if its task had ended.
        hosted.ctx.timers.cancel();
        hosted.current = None;
        let ctx = Context::new(
            hosted.ctx.myself.clone(),
            self.handle.clone(),
            hosted.ctx.incarnation + 1,
        );
        hosted.ctx = ctx;
        let (actor, args) = (in_place.factory)();
        let started = AssertUnwindSafe(async {
            let mut state = actor.pre_start(&hosted.ctx, args).await?;
            actor.post_start(&hosted.ctx, &mut state).await?;
            Ok::<_, ActorError>(state)
        })
        .catch_unwind()
        .await;
        let state = match started {
            Ok(Ok(state)) => state,
            Ok(Err(error)) => return Err(format!("restart failed in pre_start: {error}").into()),
            Err(payload) => {
                return Err(
                    format!("restart failed in pre_start: {}", panic_reason(payload)).into(),
                );
            }
        };
        hosted.current = Some(Incarnation { actor, state });
        self.handle.stats().restarts.fetch_add(1, Ordering::Relaxed);
        let restart_count = in_place.restarts.record(path);
        self.handle.rebind_in_place();
        in_place
            .restarts
            .report(path, admission, restart_count, reason);
        Ok(())
    }
}

impl<A: Actor> ractor::Actor for Hosted<A> {
    type Msg = Envelope<A::Msg>;
    type State = HostedState<A>;
    type Arguments = (A, A::Arguments);

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        (actor, args): Self::Arguments,
    ) -> Result<Self::State, ActorError> {
        let ctx = Context::new(myself, self.handle.clone(), 1);
        let state = actor.pre_start(&ctx, args).await?;
        Ok(HostedState {
            ctx,
            current: Some(Incarnation { actor, state }),
        })
    }

    async fn post_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        hosted: &mut Self::State,
    ) -> Result<(), ActorError> {
        match hosted.current.as_mut() {
            Some(current) => {
                current
                    .actor
                    .post_start(&hosted.ctx, &mut current.state)
                    .await
            }
            None => Ok(()),
        }
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        envelope: Self::Msg,
        hosted: &mut Self::State,
    ) -> Result<(), ActorError> {
        if envelope
            .incarnation()
            .is_some_and(|incarnation| incarnation != hosted.ctx.incarnation)
        {
            // A self-send or timer of a failed incarnation: it dies with that incarnation.
            drop(envelope.open());
            self.handle
                .stats()
                .discarded
                .fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        let reason = match envelope.open() {
            Payload::Message(message) => match self.deliver(hosted, message).await {
                Ok(()) => return Ok(()),
                Err(reason) => reason,
            },
            Payload::Fault(FaultKind::Panic) => {
                let path = self.handle.path().clone();
                // A real panic (hook, unwinding and all), caught like a handler's own.
                let panicked: std::thread::Result<()> =
                    std::panic::catch_unwind(move || panic!("fault injected: panic in {path}"));
                match panicked {
                    Ok(()) => unreachable!("the injected fault panics"),
                    Err(payload) => panic_reason(payload),
                }
            }
            Payload::Fault(FaultKind::Error) => {
                format!("fault injected: error in {}", self.handle.path())
            }
        };
        self.failed(hosted, reason).await
    }

    async fn handle_supervisor_evt(
        &self,
        _myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        hosted: &mut Self::State,
    ) -> Result<(), ActorError> {
        match hosted.current.as_mut() {
            Some(current) => {
                current
                    .actor
                    .on_child_event(&hosted.ctx, event, &mut current.state)
                    .await
            }
            None => Ok(()),
        }
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        hosted: &mut Self::State,
    ) -> Result<(), ActorError> {
        match hosted.current.as_mut() {
            Some(current) => {
                current
                    .actor
                    .post_stop(&hosted.ctx, &mut current.state)
                    .await
            }
            None => Ok(()),
        }
    }
}

/// Starts one instance of `actor` linked to `supervisor` and binds it to `handle`. With
/// `in_place`, a failure may be repaired inside the instance (see the module docs).
pub(crate) async fn spawn_linked<A: Actor>(
    actor: A,
    args: A::Arguments,
    handle: &ActorHandle<A::Msg>,
    supervisor: ActorCell,
    in_place: Option<InPlace<A>>,
) -> Result<ActorCell, SpawnErr> {
    let hosted = Hosted {
        handle: handle.clone(),
        in_place,
    };
    let (instance, _join) =
        ractor::Actor::spawn_linked(None, hosted, (actor, args), supervisor).await?;
    let cell = instance.get_cell();
    handle.bind(instance);
    Ok(cell)
}

/// Starts an unsupervised actor (the root of a tree, or a standalone actor in a host program).
/// The returned join handle finishes when the instance exits.
pub async fn spawn<A: Actor>(
    actor: A,
    args: A::Arguments,
    handle: &ActorHandle<A::Msg>,
) -> Result<(ActorCell, tokio::task::JoinHandle<()>), SpawnErr> {
    let hosted = Hosted {
        handle: handle.clone(),
        in_place: None,
    };
    let (instance, join) = ractor::Actor::spawn(None, hosted, (actor, args)).await?;
    let cell = instance.get_cell();
    handle.bind(instance);
    Ok((cell, join))
}
