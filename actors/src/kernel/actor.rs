//! The actor trait every troupe actor implements, and the adapter that runs it on ractor.
//!
//! The trait mirrors `ractor::Actor` with one difference: an actor gets a [`Context`] instead of
//! a bare `ActorRef`. The context knows the actor's path and its restart-surviving
//! [`ActorHandle`], and its self-sends go to this incarnation only (a timer armed by one
//! incarnation never fires into the next). The adapter, [`Hosted`], wraps every message in an
//! [`Envelope`](super::handle::Envelope) so queued messages survive a crash, counts messages and
//! handler time, and implements fault injection for every actor at once.
//!
//! Mailboxes: a supervised worker reads the kernel's own channel in one long-running handler
//! (the "pump"), which skips ractor's per-message work; ractor's ports still carry kill, stop,
//! drain and supervision events. Actors that supervise ([`Actor::SUPERVISES`]) and unsupervised
//! actors ([`spawn`]) read ractor's mailbox. See [`Mailbox`] and docs/ARCHITECTURE.md.
//!
//! Restart in place: when the supervisor allows it ([`InPlaceRestarts`]), a failed handler does
//! not end the ractor actor. The host drops the failed incarnation's state and timers, builds a
//! new incarnation (`pre_start`, `post_start`) in the same task, and goes on with the same
//! mailbox. That skips the three cross-task hand-offs of a respawn (the supervision event, the
//! spawn, the redelivery of queued messages); the supervisor only logs and publishes the restart
//! afterwards, off the critical path: [`InPlaceRestarts::report`] hands the announcement to the
//! worker's deferred wake-ups (`kernel::idle`).

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::FutureExt;
use ractor::{ActorCell, ActorRef, SpawnErr, SupervisionEvent};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::handle::{ActorHandle, Envelope, FaultKind, HostMsg, Mailbox, Payload};
use super::stats::ActorStats;
use crate::ids::ActorPath;

/// The error type of actor callbacks; any error is a failure the supervisor sees.
pub type ActorError = ractor::ActorProcessingErr;

/// A troupe actor: one message enum, state owned by the actor and changed only in its handler.
pub trait Actor: Sized + Send + Sync + 'static {
    /// Whether this actor supervises linked children ([`Actor::on_child_event`]). Such an actor
    /// takes its messages through ractor's mailbox, which ractor reads together with
    /// supervision events; a supervised worker (the default) reads the kernel's own mailbox.
    const SUPERVISES: bool = false;

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

    /// Receives ractor supervision events about actors linked to this one. Only an actor with
    /// [`Actor::SUPERVISES`] set receives them: a worker reads the kernel's mailbox in one
    /// handler that runs until the worker stops, and ractor delivers supervision events only
    /// between handlers.
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
    myself: ActorRef<HostMsg<M>>,
    /// This instance's mailbox, for self-sends and timers.
    mailbox: Arc<Mailbox<M>>,
    handle: ActorHandle<M>,
    /// Counts the incarnations hosted by this ractor actor (1 for the first).
    incarnation: u64,
    /// Cancelled when this incarnation ends: its timers stop with it.
    timers: CancellationToken,
    /// Set by [`Context::stop`]: the kernel's mailbox loop ends after the current message, so
    /// that ractor's stop (sent to its own port) is seen.
    stopping: Arc<AtomicBool>,
}

impl<M: Send + 'static> Context<M> {
    fn new(
        myself: ActorRef<HostMsg<M>>,
        mailbox: Arc<Mailbox<M>>,
        handle: ActorHandle<M>,
        incarnation: u64,
        stopping: Arc<AtomicBool>,
    ) -> Self {
        Self {
            myself,
            mailbox,
            handle,
            incarnation,
            timers: CancellationToken::new(),
            stopping,
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

    /// The ractor cell of this instance (to link children to it: only an actor with
    /// [`Actor::SUPERVISES`] set hears from linked children).
    pub fn cell(&self) -> ActorCell {
        self.myself.get_cell()
    }

    fn envelope(&self, message: M) -> Envelope<M> {
        Envelope::for_incarnation(self.incarnation, message, self.handle.stats().clone())
    }

    /// Sends a message to this incarnation. Returns it if the instance is stopping.
    pub fn send_self(&self, message: M) -> Result<(), M> {
        match self.mailbox.send(self.envelope(message)) {
            Ok(()) => {
                self.handle.stats().enqueued.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(Some(envelope)) => match envelope.open() {
                Payload::Message(message) => Err(message),
                Payload::Fault(_) | Payload::Drain => unreachable!("self-sends carry messages"),
            },
            Err(None) => unreachable!("a typed ActorRef only fails with SendErr"),
        }
    }

    /// Sends `message` to this incarnation after `delay`, without blocking the mailbox meanwhile.
    /// The timer dies with the incarnation: it never fires into a restarted one.
    pub fn send_after(&self, delay: Duration, message: M) -> tokio::task::JoinHandle<()> {
        let mailbox = self.mailbox.clone();
        let stats = self.handle.stats().clone();
        let incarnation = self.incarnation;
        let ended = self.timers.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = ended.cancelled() => {}
                () = tokio::time::sleep(delay) => {
                    let envelope = Envelope::for_incarnation(incarnation, message, stats.clone());
                    match mailbox.send(envelope) {
                        Ok(()) => {
                            stats.enqueued.fetch_add(1, Ordering::Relaxed);
                        }
                        // Never enqueued, so not counted as discarded either.
                        Err(refused) => forget_unsent(refused),
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
        let mailbox = self.mailbox.clone();
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
                if let Err(refused) = mailbox.send(envelope) {
                    forget_unsent(refused);
                    return;
                }
                stats.enqueued.fetch_add(1, Ordering::Relaxed);
            }
        })
    }

    /// Stops this instance after the current message (graceful: `post_stop` runs).
    pub fn stop(&self, reason: Option<String>) {
        self.stopping.store(true, Ordering::Relaxed);
        self.myself.stop(reason);
    }
}

/// Drops a self-send that its mailbox refused without counting it as discarded.
fn forget_unsent<M: Send + 'static>(refused: Option<Envelope<M>>) {
    if let Some(envelope) = refused {
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

    /// The new incarnation runs: the restart is announced (its WARN line and event), without
    /// delaying the new incarnation's next message.
    fn report(&self, path: &ActorPath, admission: Admission, restart_count: u64, reason: String);
}

/// How a host rebuilds its actor in place.
pub(crate) struct InPlace<A: Actor> {
    pub(crate) factory: Arc<dyn Fn() -> (A, A::Arguments) + Send + Sync>,
    pub(crate) restarts: Arc<dyn InPlaceRestarts>,
}

/// Runs a troupe [`Actor`] as a ractor actor whose messages arrive in envelopes: through the
/// kernel's own mailbox (supervised workers) or ractor's (see [`Mailbox`]).
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

/// What a hosted actor is started with: the actor, its arguments, and the kernel's mailbox
/// when it reads one.
pub(crate) struct HostedArgs<A: Actor> {
    actor: A,
    args: A::Arguments,
    pump: Option<Pump<A::Msg>>,
}

/// Both ends of the kernel's mailbox of one instance.
struct Pump<M: Send + 'static> {
    tx: mpsc::UnboundedSender<Envelope<M>>,
    rx: mpsc::UnboundedReceiver<Envelope<M>>,
}

/// What one envelope did to the mailbox loop.
enum Flow {
    Continue,
    /// A drain request: stop reading the kernel's mailbox.
    Drained,
}

/// Counts a message as handled when dropped: after the handler returns, panics, or is cancelled
/// by a kill, so a failed handler never leaves the mailbox depth one too high.
struct Handled<'a> {
    stats: &'a ActorStats,
}

impl Drop for Handled<'_> {
    fn drop(&mut self) {
        self.stats.processed.fetch_add(1, Ordering::Relaxed);
    }
}

/// Measures the actor's busy time, read from the TSC (`quanta`, calibrated once per process):
/// the OS clock read twice per message cost a quarter of a burst's time on a VM. Messages
/// handled back to back share their clock reads: each message's time runs from the end of the
/// previous one (or the start of the run) to its own end, one read per message.
struct Busy<'a> {
    stats: &'a ActorStats,
    since: quanta::Instant,
}

impl<'a> Busy<'a> {
    fn start(stats: &'a ActorStats) -> Self {
        Self {
            stats,
            since: quanta::Instant::now(),
        }
    }

    /// Adds the time since the start or the last lap; the next lap starts now.
    fn lap(&mut self) {
        let now = quanta::Instant::now();
        self.stats
            .record_busy(now.saturating_duration_since(self.since));
        self.since = now;
    }
}

/// Calibrates the TSC clock busy time is read from (`quanta` does it on first use, for up to
/// 200 ms) on the blocking pool, once per process, before the first actor starts: not inside
/// an actor's first message, on a runtime worker.
async fn calibrated_clock() {
    static CALIBRATED: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    CALIBRATED
        .get_or_init(|| async {
            // A failed calibration task leaves it to the first use, which calibrates inline.
            let _ = tokio::task::spawn_blocking(quanta::Instant::now).await;
        })
        .await;
}

/// Messages a mailbox loop handles back to back (while the task's cooperative budget lasts)
/// before it awaits its mailbox again.
const RUN: usize = 64;

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

    /// Opens one envelope and acts on it: a message for the current incarnation, a fault to
    /// suffer, or a drain request. A failure is repaired in place or returned (see `failed`).
    async fn process(
        &self,
        hosted: &mut HostedState<A>,
        envelope: Envelope<A::Msg>,
    ) -> Result<Flow, ActorError> {
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
            return Ok(Flow::Continue);
        }
        let reason = match envelope.open() {
            Payload::Message(message) => match self.deliver(hosted, message).await {
                Ok(()) => return Ok(Flow::Continue),
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
            Payload::Drain => return Ok(Flow::Drained),
        };
        self.failed(hosted, reason).await?;
        Ok(Flow::Continue)
    }

    /// Reads the kernel's mailbox until a drain request, a [`Context::stop`], or a failure that
    /// is not repaired in place (a kill interrupts it). Returning hands the actor back to
    /// ractor's loop, which then sees the drain or stop on its own ports; until then ractor's
    /// stop and drain sent by others wait.
    async fn pump(
        &self,
        hosted: &mut HostedState<A>,
        mut inbox: mpsc::UnboundedReceiver<Envelope<A::Msg>>,
    ) -> Result<(), ActorError> {
        let ended = 'pump: loop {
            let Some(mut envelope) = inbox.recv().await else {
                // Every sender is gone. This instance's own context holds one, so this does not
                // happen while it runs; should it, nothing could arrive any more.
                break Ok(());
            };
            let mut busy = Busy::start(self.handle.stats());
            let mut handled = 0;
            loop {
                let processed = self.process(hosted, envelope).await;
                busy.lap();
                match processed {
                    Ok(Flow::Continue) if !hosted.ctx.stopping.load(Ordering::Relaxed) => {}
                    Ok(_) => break 'pump Ok(()),
                    Err(error) => break 'pump Err(error),
                }
                handled += 1;
                // `try_recv` uses none of the runtime's cooperative budget, which `recv` would:
                // without spending it here, a flooded actor would hold its worker for up to
                // RUN times the budget's messages, starving every other task on that worker.
                if handled == RUN || !tokio::task::coop::has_budget_remaining() {
                    break;
                }
                tokio::task::consume_budget().await;
                // Taken only when it will be handled: an envelope dropped here would go back
                // to the handle and arrive out of order.
                match inbox.try_recv() {
                    Ok(queued) => envelope = queued,
                    Err(_) => break,
                }
            }
        };
        // The kernel's mailbox closes with the loop: what is still queued goes back to the
        // handle now, and later sends fail and wait in the handle for the next instance (sorted
        // by send order there). Kept open until the state is dropped, it would hand its messages
        // back only after the supervisor handled the exit, possibly after the next instance got
        // messages sent later.
        drop(inbox);
        ended
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
            hosted.ctx.mailbox.clone(),
            self.handle.clone(),
            hosted.ctx.incarnation + 1,
            hosted.ctx.stopping.clone(),
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
    type Msg = HostMsg<A::Msg>;
    type State = HostedState<A>;
    type Arguments = HostedArgs<A>;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        HostedArgs { actor, args, pump }: Self::Arguments,
    ) -> Result<Self::State, ActorError> {
        let (tx, inbox) = match pump {
            Some(Pump { tx, rx }) => (Some(tx), Some(rx)),
            None => (None, None),
        };
        let mailbox = Arc::new(Mailbox::new(myself.clone(), tx));
        let ctx = Context::new(
            myself,
            mailbox,
            self.handle.clone(),
            1,
            Arc::new(AtomicBool::new(false)),
        );
        let state = actor.pre_start(&ctx, args).await?;
        if let Some(inbox) = inbox {
            // Queued now, before the spawn returns to the supervisor: ahead of any drain the
            // supervisor may send right after (a sibling failing to start), so the loop always
            // runs first and hands the actor to ractor's drain with `post_stop`.
            //
            // The kernel's mailbox travels in this message. If the instance ends before its
            // loop takes it (its `post_start` fails or panics, a kill, a stop), ractor drops
            // the message with its ports, which it does before it tells the supervisor; what
            // is queued then goes back to the handle first, as when the loop ends (see `pump`).
            // Kept in the state instead, it would go back only when ractor drops the state,
            // after the supervisor heard of the exit and possibly started the next instance.
            ctx.myself.send_message(HostMsg::Pump(inbox))?;
        }
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
        message: Self::Msg,
        hosted: &mut Self::State,
    ) -> Result<(), ActorError> {
        match message {
            HostMsg::Deliver(envelope) => {
                let mut busy = Busy::start(self.handle.stats());
                let processed = self.process(hosted, envelope).await;
                busy.lap();
                processed.map(|_| ())
            }
            HostMsg::Pump(inbox) => self.pump(hosted, inbox).await,
        }
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
        // Stopped before its loop ran: its mailbox closes with ractor's ports, right after this
        // (see `pre_start`).
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

/// A started supervised instance, as its supervisor keeps it.
pub(crate) struct Instance {
    pub(crate) cell: ActorCell,
    /// Asks the kernel's mailbox loop to end after what is queued (`None`: the instance reads
    /// ractor's mailbox, which ractor's drain reaches directly).
    drain: Option<Box<dyn Fn() + Send + Sync>>,
}

impl Instance {
    /// Lets the instance finish what is queued and hand itself back to ractor's loop, where
    /// ractor's drain (which the supervisor sends next) stops it.
    pub(crate) fn request_drain(&self) {
        if let Some(drain) = &self.drain {
            drain();
        }
    }
}

/// Starts one instance of `actor` linked to `supervisor` and binds it to `handle`. With
/// `in_place`, a failure may be repaired inside the instance (see the module docs). Workers read
/// the kernel's mailbox; actors that supervise read ractor's ([`Actor::SUPERVISES`]).
pub(crate) async fn spawn_linked<A: Actor>(
    actor: A,
    args: A::Arguments,
    handle: &ActorHandle<A::Msg>,
    supervisor: ActorCell,
    in_place: Option<InPlace<A>>,
) -> Result<Instance, SpawnErr> {
    calibrated_clock().await;
    let hosted = Hosted {
        handle: handle.clone(),
        in_place,
    };
    let pump = (!A::SUPERVISES).then(|| {
        let (tx, rx) = mpsc::unbounded_channel();
        Pump { tx, rx }
    });
    let tx = pump.as_ref().map(|pump| pump.tx.clone());
    let (instance, _join) =
        ractor::Actor::spawn_linked(None, hosted, HostedArgs { actor, args, pump }, supervisor)
            .await?;
    let cell = instance.get_cell();
    let drain = tx.clone().map(|tx| {
        Box::new(move || {
            // A closed mailbox means the instance is already gone: nothing to drain.
            let _ = tx.send(Envelope::drain());
        }) as Box<dyn Fn() + Send + Sync>
    });
    handle.bind(Mailbox::new(instance, tx));
    Ok(Instance { cell, drain })
}

/// Starts an unsupervised actor (the root of a tree, or a standalone actor in a host program).
/// The returned join handle finishes when the instance exits. It reads ractor's mailbox, so
/// ractor's `ActorCell::stop` and `drain` work on it as on any ractor actor.
pub async fn spawn<A: Actor>(
    actor: A,
    args: A::Arguments,
    handle: &ActorHandle<A::Msg>,
) -> Result<(ActorCell, tokio::task::JoinHandle<()>), SpawnErr> {
    calibrated_clock().await;
    let hosted = Hosted {
        handle: handle.clone(),
        in_place: None,
    };
    let (instance, join) = ractor::Actor::spawn(
        None,
        hosted,
        HostedArgs {
            actor,
            args,
            pump: None,
        },
    )
    .await?;
    let cell = instance.get_cell();
    handle.bind(Mailbox::new(instance, None));
    Ok((cell, join))
}
