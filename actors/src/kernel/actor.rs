//! The actor trait every troupe actor implements, and the adapter that runs it on ractor.
//!
//! The trait mirrors `ractor::Actor` with one difference: an actor gets a [`Context`] instead of
//! a bare `ActorRef`. The context knows the actor's path and its restart-surviving
//! [`ActorHandle`], and its self-sends go to this instance only (a timer armed by one instance
//! never fires into the next). The adapter, [`Hosted`], wraps every message in an
//! [`Envelope`](super::handle::Envelope) so queued messages survive a crash, counts messages and
//! handler time, and implements fault injection for every actor at once.

use std::future::Future;
use std::time::{Duration, Instant};

use ractor::{ActorCell, ActorRef, SpawnErr, SupervisionEvent};

use super::handle::{ActorHandle, Envelope, FaultKind, Payload};
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
}

impl<M: Send + 'static> Context<M> {
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

    /// Sends a message to this instance. Returns it if the instance is stopping.
    pub fn send_self(&self, message: M) -> Result<(), M> {
        self.handle
            .stats()
            .enqueued
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.myself
            .send_message(Envelope::untracked(message))
            .map_err(|error| match error {
                ractor::MessagingErr::SendErr(envelope) => match envelope.open() {
                    Payload::Message(message) => message,
                    Payload::Fault(_) => unreachable!("self-sends carry messages"),
                },
                _ => unreachable!("a typed ActorRef only fails with SendErr"),
            })
    }

    /// Sends `message` to this instance after `delay`, without blocking the mailbox meanwhile.
    /// The timer dies with the instance: it never fires into a restarted one.
    pub fn send_after(&self, delay: Duration, message: M) -> tokio::task::JoinHandle<()> {
        let myself = self.myself.clone();
        let stats = self.handle.stats().clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            if myself.send_message(Envelope::untracked(message)).is_ok() {
                stats
                    .enqueued
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        })
    }

    /// Sends `make()` to this instance every `period` until the instance stops.
    pub fn send_interval<F>(&self, period: Duration, make: F) -> tokio::task::JoinHandle<()>
    where
        F: Fn() -> M + Send + 'static,
    {
        let myself = self.myself.clone();
        let stats = self.handle.stats().clone();
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(period);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticks.tick().await;
            loop {
                ticks.tick().await;
                if myself.send_message(Envelope::untracked(make())).is_err() {
                    return;
                }
                stats
                    .enqueued
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        })
    }

    /// Stops this instance after the current message (graceful: `post_stop` runs).
    pub fn stop(&self, reason: Option<String>) {
        self.myself.stop(reason);
    }
}

/// Runs a troupe [`Actor`] as a ractor actor whose mailbox carries envelopes.
pub(crate) struct Hosted<A: Actor> {
    actor: A,
    handle: ActorHandle<A::Msg>,
}

/// The state ractor keeps for a hosted actor.
pub(crate) struct HostedState<A: Actor> {
    ctx: Context<A::Msg>,
    state: A::State,
}

impl<A: Actor> ractor::Actor for Hosted<A> {
    type Msg = Envelope<A::Msg>;
    type State = HostedState<A>;
    type Arguments = A::Arguments;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: Self::Arguments,
    ) -> Result<Self::State, ActorError> {
        let ctx = Context {
            myself,
            handle: self.handle.clone(),
        };
        let state = self.actor.pre_start(&ctx, args).await?;
        Ok(HostedState { ctx, state })
    }

    async fn post_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        hosted: &mut Self::State,
    ) -> Result<(), ActorError> {
        self.actor.post_start(&hosted.ctx, &mut hosted.state).await
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        envelope: Self::Msg,
        hosted: &mut Self::State,
    ) -> Result<(), ActorError> {
        match envelope.open() {
            Payload::Message(message) => {
                let started = Instant::now();
                let result = self
                    .actor
                    .handle(&hosted.ctx, message, &mut hosted.state)
                    .await;
                self.handle.stats().record_handled(started.elapsed());
                result
            }
            Payload::Fault(FaultKind::Panic) => {
                panic!("fault injected: panic in {}", self.handle.path())
            }
            Payload::Fault(FaultKind::Error) => {
                Err(format!("fault injected: error in {}", self.handle.path()).into())
            }
        }
    }

    async fn handle_supervisor_evt(
        &self,
        _myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        hosted: &mut Self::State,
    ) -> Result<(), ActorError> {
        self.actor
            .on_child_event(&hosted.ctx, event, &mut hosted.state)
            .await
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        hosted: &mut Self::State,
    ) -> Result<(), ActorError> {
        self.actor.post_stop(&hosted.ctx, &mut hosted.state).await
    }
}

/// Starts one instance of `actor` linked to `supervisor` and binds it to `handle`.
pub(crate) async fn spawn_linked<A: Actor>(
    actor: A,
    args: A::Arguments,
    handle: &ActorHandle<A::Msg>,
    supervisor: ActorCell,
) -> Result<ActorCell, SpawnErr> {
    let hosted = Hosted {
        actor,
        handle: handle.clone(),
    };
    let (instance, _join) = ractor::Actor::spawn_linked(None, hosted, args, supervisor).await?;
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
        actor,
        handle: handle.clone(),
    };
    let (instance, join) = ractor::Actor::spawn(None, hosted, args).await?;
    let cell = instance.get_cell();
    handle.bind(instance);
    Ok((cell, join))
}
