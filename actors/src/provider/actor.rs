//! The ProviderActor: one per configured provider, a permanent child of the ProviderSupervisor
//! (one_for_one).
//!
//! ```text
//! ProviderSupervisor (one_for_one)     providers
//! └── ProviderActor ×N (permanent)     providers/<name>
//! ```
//!
//! It owns its provider's [`ProviderState`] — budget, breaker, retry schedule, concurrency and
//! the calls waiting for their turn — and carries out what the state decides: answers to
//! callers, `provider.*` events (with the session of the call), health reports, a read-side
//! snapshot for `/v1/providers` and metrics. It never calls the provider itself: callers do,
//! through the provider's [`ProviderClient`](super::ProviderClient), between an admission and a
//! report.
//!
//! A restart starts from a full budget and a closed breaker. Calls waiting in the old instance's
//! queue get [`CallError::NoReply`](crate::kernel::CallError::NoReply) and tickets it issued are
//! ignored when reported; counters and the recent errors live on in [`ProviderShared`].

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ractor::RpcReplyPort;

use super::headers::RateLimitSnapshot;
use super::spec::{ProviderSpec, Target};
use super::state::{
    Admission, AdmitRequest, Effect, NextStep, Outcome, ProviderState, Refusal, Report, Ticket,
    Waiter,
};
use super::stats::{ProviderShared, ProviderStatus};
use crate::event::EventBus;
use crate::health::{Health, HealthStatus};
use crate::ids::{ActorPath, SessionId, Timestamp};
use crate::kernel::{Actor, ActorError, ActorHandle, Context};
use crate::registry::{ProviderEntry, Registry, RegistryMsg};
use crate::supervisor::ChildSpec;

/// Messages of a ProviderActor.
pub enum ProviderMsg {
    /// May a call go now? Answered at once, or when it can go, or when waiting would take too
    /// long.
    Admit {
        /// The call.
        request: AdmitRequest,
        /// Where the answer goes.
        reply: RpcReplyPort<AdmitReply>,
    },
    /// An admitted call ended; with a reply port for a failure whose caller wants to know
    /// whether to retry.
    Finish {
        /// How it ended.
        report: Report,
        /// Where the next step goes, when asked for.
        reply: Option<RpcReplyPort<NextStep>>,
    },
    /// A call this provider could not serve moved on to a fallback.
    FellBack {
        /// The model it was asked for here.
        model: String,
        /// Where it went.
        to: Target,
        /// Why, in words.
        reason: String,
        /// Its session.
        session: Option<SessionId>,
    },
    /// A timer: budget may have refilled, or a waiting call's allowance ran out.
    Wake,
}

impl Waiter for RpcReplyPort<AdmitReply> {
    fn is_gone(&self) -> bool {
        self.is_closed()
    }
}

/// The actor's answer to [`ProviderMsg::Admit`].
#[derive(Debug)]
pub enum AdmitReply {
    /// Go ahead: the pass must be turned into a report.
    Admitted(Pass),
    /// Not at this provider, now.
    Refused(Refusal),
}

/// An admitted call not started yet. If it is dropped unused — its caller went away before or
/// right after the answer arrived — it tells the actor, so the call's slot and budget come back.
#[derive(Debug)]
pub struct Pass {
    handle: ActorHandle<ProviderMsg>,
    ticket: Option<Ticket>,
}

impl Pass {
    /// The ticket, taken out: from now on the caller reports the call.
    pub(super) fn take(mut self) -> (ActorHandle<ProviderMsg>, Ticket) {
        let ticket = self
            .ticket
            .take()
            .expect("a pass holds its ticket until taken");
        (self.handle.clone(), ticket)
    }

    /// True when the call is the half-open breaker's probe.
    pub fn is_probe(&self) -> bool {
        self.ticket.is_some_and(|ticket| ticket.probe)
    }
}

impl Drop for Pass {
    fn drop(&mut self) {
        if let Some(ticket) = self.ticket.take() {
            let report = Report {
                ticket: ticket.id,
                model: String::new(),
                session: None,
                outcome: Outcome::Abandoned {
                    reached_provider: false,
                },
                rate_limits: RateLimitSnapshot::default(),
                latency: Duration::ZERO,
                attempt: 1,
                waited: Duration::ZERO,
            };
            let _ = self.handle.cast(ProviderMsg::Finish {
                report,
                reply: None,
            });
        }
    }
}

/// Arguments of each ProviderActor instance.
#[derive(Clone)]
pub struct ProviderArgs {
    /// Configuration and the read side (outlive instances).
    pub shared: Arc<ProviderShared>,
    /// Where `provider.*` events go.
    pub events: EventBus,
    /// Where the provider's health goes.
    pub health: Health,
    /// Where the provider is registered.
    pub registry: Registry,
}

/// The ProviderActor.
pub struct ProviderActor;

/// State of one instance.
pub struct ProviderActorState {
    args: ProviderArgs,
    state: ProviderState<RpcReplyPort<AdmitReply>>,
    /// The earliest wake-up a timer is armed for.
    armed: Option<Instant>,
}

/// Tells instances apart, so that tickets of an earlier one are recognised.
static INSTANCES: AtomicU64 = AtomicU64::new(1);

fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

impl Actor for ProviderActor {
    type Msg = ProviderMsg;
    type State = ProviderActorState;
    type Arguments = ProviderArgs;

    async fn pre_start(
        &self,
        _ctx: &Context<Self::Msg>,
        args: Self::Arguments,
    ) -> Result<Self::State, ActorError> {
        let instance = INSTANCES.fetch_add(1, Ordering::Relaxed);
        let state = ProviderState::new(args.shared.clone(), instance, now());
        let spec = &args.shared.spec;
        args.registry.update(RegistryMsg::ProviderUp(ProviderEntry {
            name: spec.name.clone(),
            models: spec.models.clone(),
        }));
        args.health
            .report_component(component(&spec.name), HealthStatus::Healthy, "serving");
        let mut actor_state = ProviderActorState {
            args,
            state,
            armed: None,
        };
        actor_state.publish_snapshot();
        Ok(actor_state)
    }

    async fn handle(
        &self,
        ctx: &Context<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorError> {
        let now = now();
        // A fallback changes nothing readers see (its counter is an atomic).
        let changes_snapshot = !matches!(message, ProviderMsg::FellBack { .. });
        let effects = match message {
            ProviderMsg::Admit { request, reply } => state.state.admit(request, reply, now),
            ProviderMsg::Finish { report, reply } => {
                let asks = reply.is_some();
                let (next, effects) =
                    state
                        .state
                        .finish(report, asks, now, Timestamp::now(), fastrand::f64());
                if let (Some(reply), Some(next)) = (reply, next) {
                    let _ = reply.send(next);
                }
                effects
            }
            ProviderMsg::FellBack {
                model,
                to,
                reason,
                session,
            } => state.state.fell_back(&model, &to, reason, session),
            ProviderMsg::Wake => {
                state.armed = None;
                state.state.wake(now)
            }
        };
        state.apply(ctx, effects);
        if changes_snapshot {
            state.publish_snapshot();
        }
        state.arm(ctx, now);
        Ok(())
    }
}

impl ProviderActorState {
    fn apply(&self, ctx: &Context<ProviderMsg>, effects: Vec<Effect<RpcReplyPort<AdmitReply>>>) {
        for effect in effects {
            match effect {
                Effect::Reply(reply, admission) => {
                    let answer = match admission {
                        Admission::Admitted(ticket) => AdmitReply::Admitted(Pass {
                            handle: ctx.handle().clone(),
                            ticket: Some(ticket),
                        }),
                        Admission::Refused(refusal) => AdmitReply::Refused(refusal),
                    };
                    // A caller that went away gets nothing; an unreceived pass reports itself.
                    let _ = reply.send(answer);
                }
                Effect::Publish(session, data) => self.args.events.publish(session, data),
                Effect::Health(status, detail) => {
                    self.args.health.report_component(
                        component(&self.args.shared.spec.name),
                        status,
                        detail,
                    );
                }
            }
        }
    }

    fn publish_snapshot(&mut self) {
        let snapshot = self.state.snapshot();
        self.args.shared.store(snapshot);
    }

    fn arm(&mut self, ctx: &Context<ProviderMsg>, now: Instant) {
        let Some(at) = self.state.next_wake() else {
            return;
        };
        if self.armed.is_some_and(|armed| armed <= at) {
            return;
        }
        self.armed = Some(at);
        ctx.send_after(at.saturating_duration_since(now), ProviderMsg::Wake);
    }
}

fn component(name: &str) -> String {
    format!("providers/{name}")
}

/// A ProviderActor as callers and the node's tree hold it: its restart-surviving handle and
/// the parts that outlive its instances. Cheap to clone.
#[derive(Clone)]
pub struct ProviderActorRef {
    handle: ActorHandle<ProviderMsg>,
    shared: Arc<ProviderShared>,
}

impl ProviderActorRef {
    /// A handle for the provider `spec` describes, at `providers/<name>` in the node's tree.
    /// Messages sent before the actor starts wait for it.
    pub fn new(spec: ProviderSpec) -> Self {
        let path = ActorPath::root().child("providers").child(&spec.name);
        Self {
            handle: ActorHandle::new(path),
            shared: Arc::new(ProviderShared::new(Arc::new(spec), now())),
        }
    }

    /// The provider's configured name.
    pub fn name(&self) -> &str {
        &self.shared.spec.name
    }

    /// The provider's configuration.
    pub fn spec(&self) -> &Arc<ProviderSpec> {
        &self.shared.spec
    }

    /// The actor's handle.
    pub fn handle(&self) -> &ActorHandle<ProviderMsg> {
        &self.handle
    }

    /// Counters and the last snapshot.
    pub fn shared(&self) -> &Arc<ProviderShared> {
        &self.shared
    }

    /// The provider as `/v1/providers` shows it now.
    pub fn status(&self) -> ProviderStatus {
        self.shared.status(now())
    }

    /// The supervisor's spec of this provider's actor.
    pub fn child_spec(&self, events: EventBus, health: Health, registry: Registry) -> ChildSpec {
        let args = ProviderArgs {
            shared: self.shared.clone(),
            events,
            health,
            registry,
        };
        ChildSpec::worker(&self.handle, move || (ProviderActor, args.clone()))
    }
}
