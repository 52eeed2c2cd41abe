//! The state of one provider as its ProviderActor owns it: the budget, the breaker and the retry
//! schedule, the calls in flight, and the calls waiting for their turn.
//!
//! A plain state machine driven with an explicit `now` (and a jitter sample for retries): every
//! operation returns [`Effect`]s — answers to waiting callers, events to publish, a health report
//! — for the actor to carry out. It never reads a clock, sleeps or performs I/O, so tests drive it
//! without an actor or a runtime.
//!
//! A call is admitted when its model's reported limits are not spent, the breaker lets it
//! through, a concurrency slot is free and the budget has room for one request and its token
//! estimate. Calls that cannot go yet wait in one FIFO queue (bounded by
//! [`ProviderSpec::max_queue`]) for at most the retry schedule's `max_wait` minus what they
//! already waited; past that they are refused with a hint when to come back. A call waiting
//! for its model's reported limits holds up later calls to that model only; one waiting for
//! the budget or a slot holds up the calls behind it.
//! Every admitted call holds a [`Ticket`] and is reported back exactly once with a [`Report`]:
//! the reservation is reconciled from the reported usage, the provider's rate-limit headers
//! update the limits of the model called (they are per model: [`ModelLimits`]), the breaker is
//! told what the answer says about the provider.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::breaker::{Permit, RejectReason, Transition};
use super::budget::{BudgetError, Reservation, Wait, WaitDecision, WaitReason};
use super::failure::{ErrorClass, ErrorKind};
use super::headers::RateLimitSnapshot;
use super::model_limits::{ModelCharge, ModelLimits};
use super::retry::{GiveUpReason, RetryDecision};
use super::spec::{ProviderSpec, Target};
use super::stats::{ErrorRecord, ProviderShared, ProviderSnapshot, RecentErrors, bump};
use super::{ProviderPolicy, RetryPolicy};
use crate::event::{
    EventData, ProviderBreaker, ProviderFallback, ProviderRateLimited, ProviderRecovered,
    ProviderRetry, RateLimitSource,
};
use crate::health::HealthStatus;
use crate::ids::{SessionId, Timestamp};

/// What a caller asks before one attempt at a provider.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdmitRequest {
    /// The model, as the provider names it.
    pub model: String,
    /// Prompt estimate plus the completion allowance, in tokens.
    pub estimate_tokens: u32,
    /// The session the call is made for, if any (events carry it).
    pub session: Option<SessionId>,
    /// 1 for the first attempt at this provider, 2 for the first retry, ….
    pub attempt: u32,
    /// Time the call already spent waiting (earlier turns, retry delays).
    pub waited: Duration,
}

/// Identifies an admitted call. Tickets of an earlier instance of the actor are recognised as
/// such and change nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TicketId {
    instance: u64,
    seq: u64,
}

/// Leave to make one call; report it back exactly once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    /// The call's identity.
    pub id: TicketId,
    /// True when the call is the half-open breaker's probe.
    pub probe: bool,
}

/// The answer to an [`AdmitRequest`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Go ahead.
    Admitted(Ticket),
    /// Not at this provider, now.
    Refused(Refusal),
}

/// Why a call was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// troupe's own limits would keep the call waiting past its allowance.
    Throttled {
        /// When there would have been room.
        retry_after: Duration,
        /// Which limit.
        limit: LocalLimit,
    },
    /// The circuit breaker is open (or its probe slots are taken).
    BreakerOpen {
        /// When it lets a call through again, at the earliest.
        retry_in: Duration,
        /// Open, or probes busy.
        reason: RejectReason,
    },
    /// The call needs more than the whole per-minute budget: it can never be admitted here.
    TooLarge {
        /// The dimension that is too small.
        dimension: WaitReason,
        /// What the call needs.
        needed: u32,
        /// The per-minute limit.
        limit: u32,
    },
}

/// Which limit kept a call from being sent: troupe's own, or what the provider's rate-limit
/// headers reported for the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalLimit {
    /// Requests per minute.
    Requests,
    /// Tokens per minute.
    Tokens,
    /// Calls in flight at once: no slot freed up in time.
    Concurrency,
    /// Too many calls were already waiting.
    Queue,
    /// The requests the provider reported left for the model, until its reset.
    ModelRequests,
    /// The tokens the provider reported left for the model, until its reset.
    ModelTokens,
}

impl LocalLimit {
    /// `requests`, `tokens`, `concurrency`, `queue`, `model_requests` or `model_tokens`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Requests => "requests",
            Self::Tokens => "tokens",
            Self::Concurrency => "concurrency",
            Self::Queue => "queue",
            Self::ModelRequests => "model_requests",
            Self::ModelTokens => "model_tokens",
        }
    }

    /// The limit in words, for messages: "troupe's requests limit for this provider", "the
    /// provider's requests limit for this model".
    pub fn describe(self) -> &'static str {
        match self {
            Self::Requests => "troupe's requests limit for this provider",
            Self::Tokens => "troupe's tokens limit for this provider",
            Self::Concurrency => "troupe's concurrency limit for this provider",
            Self::Queue => "troupe's queue limit for this provider",
            Self::ModelRequests => {
                "the provider's requests limit for this model (as its rate-limit headers report it)"
            }
            Self::ModelTokens => {
                "the provider's tokens limit for this model (as its rate-limit headers report it)"
            }
        }
    }

    fn of_model(reason: WaitReason) -> Self {
        match reason {
            WaitReason::Requests => Self::ModelRequests,
            WaitReason::Tokens => Self::ModelTokens,
        }
    }
}

/// How an admitted call ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The provider answered and the answer reached its end.
    Succeeded {
        /// Tokens the provider reports the call used, when it says.
        tokens: Option<u32>,
    },
    /// The call failed.
    Failed {
        /// What went wrong.
        class: ErrorClass,
        /// Whether the request reached the provider (a refused connection did not).
        reached_provider: bool,
    },
    /// The answer broke off after it began (an error event, a cut connection, a stall once
    /// chunks were passed on). The provider has charged the prompt and what it generated, so
    /// the call keeps its estimate (or the usage reported, if more), as an abandoned one does.
    BrokeOff {
        /// What went wrong.
        class: ErrorClass,
        /// Tokens the provider reported before it broke off, if it did.
        tokens: Option<u32>,
    },
    /// The caller went away before the call ended.
    Abandoned {
        /// Whether the request may have reached the provider.
        reached_provider: bool,
    },
}

/// The end of one admitted call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// The ticket it was admitted with.
    pub ticket: TicketId,
    /// The model called.
    pub model: String,
    /// The session it was made for.
    pub session: Option<SessionId>,
    /// How it ended.
    pub outcome: Outcome,
    /// What the provider's rate-limit headers said (empty when nothing).
    pub rate_limits: RateLimitSnapshot,
    /// From sending the request to the end of the answer (or the failure).
    pub latency: Duration,
    /// Which attempt it was (1 for the first).
    pub attempt: u32,
    /// Time the call had spent waiting before this attempt.
    pub waited: Duration,
}

/// What to do after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NextStep {
    /// Wait this long, then ask for admission again.
    Retry {
        /// The delay.
        delay: Duration,
    },
    /// Stop trying this provider.
    GiveUp(GiveUpReason),
}

/// A caller waiting for an answer.
pub trait Waiter: Send + 'static {
    /// True when nobody listens for the answer any more (its caller went away).
    fn is_gone(&self) -> bool;
}

/// Something the actor must do on the state's behalf.
#[derive(Debug)]
pub enum Effect<W> {
    /// Answer a waiting caller.
    Reply(W, Admission),
    /// Publish an event, for the session when there is one.
    Publish(Option<SessionId>, EventData),
    /// Report the provider's health (its component is `providers/<name>`).
    Health(HealthStatus, String),
}

struct InFlight {
    /// The model it was admitted for: its reported limits were charged, and they get the charge
    /// back whatever the report names (a pass dropped unused names none).
    model: String,
    reservation: Reservation,
    /// What the call took from its model's reported limits.
    charge: ModelCharge,
    permit: Permit,
}

struct Queued<W> {
    request: AdmitRequest,
    reply: W,
    enqueued: Instant,
    deadline: Instant,
    /// A `provider.rate_limited {source: budget}` was published for this call.
    announced: bool,
}

/// The state of one provider. See the module documentation.
pub struct ProviderState<W> {
    shared: Arc<ProviderShared>,
    policy: ProviderPolicy,
    instance: u64,
    next_seq: u64,
    in_flight: HashMap<u64, InFlight>,
    queue: VecDeque<Queued<W>>,
    /// What the provider's rate-limit headers said is left, per model.
    model_limits: ModelLimits,
    /// When the budget or a model's reported limits have room for a waiting call.
    room_wake: Option<Instant>,
    /// The earliest deadline in the queue, when it may have passed (`None` when unknown).
    earliest_deadline: Option<Instant>,
    /// Why the provider is failing, since its last success.
    trouble: Option<String>,
    health: HealthStatus,
    errors: RecentErrors,
    effects: Vec<Effect<W>>,
}

impl<W: Waiter> ProviderState<W> {
    /// A full budget and a closed breaker at `now`. `instance` tells this state's tickets apart
    /// from those of earlier instances (any value that differs between them).
    pub fn new(shared: Arc<ProviderShared>, instance: u64, now: Instant) -> Self {
        Self {
            policy: ProviderPolicy::new(shared.spec.policy, now),
            shared,
            instance,
            next_seq: 0,
            in_flight: HashMap::new(),
            queue: VecDeque::new(),
            model_limits: ModelLimits::new(),
            room_wake: None,
            earliest_deadline: None,
            trouble: None,
            health: HealthStatus::Healthy,
            errors: RecentErrors::default(),
            effects: Vec::new(),
        }
    }

    fn spec(&self) -> &ProviderSpec {
        &self.shared.spec
    }

    /// Calls in flight.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Calls waiting.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// A caller asks to make one call; its answer is a [`Effect::Reply`] to `reply`, now or
    /// later.
    pub fn admit(&mut self, request: AdmitRequest, reply: W, now: Instant) -> Vec<Effect<W>> {
        let max_queue = self.spec().max_queue.max(1);
        if self.queue.len() >= max_queue {
            // Callers that went away leave the queue only when they reach its head; a full
            // queue first lets them go, so they do not turn the living away.
            self.queue.retain(|waiter| !waiter.reply.is_gone());
        }
        if self.queue.len() >= max_queue {
            bump(&self.shared.stats.throttled);
            let refusal = Refusal::Throttled {
                retry_after: Duration::from_secs(1),
                limit: LocalLimit::Queue,
            };
            self.effects
                .push(Effect::Reply(reply, Admission::Refused(refusal)));
            return self.take_effects();
        }
        let allowance = self.policy.retry.max_wait().saturating_sub(request.waited);
        let deadline = crate::time::instant_after(now, allowance);
        self.earliest_deadline = Some(self.earliest_deadline.map_or(deadline, |d| d.min(deadline)));
        self.queue.push_back(Queued {
            request,
            reply,
            enqueued: now,
            deadline,
            announced: false,
        });
        self.pump(now);
        self.take_effects()
    }

    /// An admitted call ended. For a failure whose caller `asks` (one before the first byte
    /// reached anyone), also says whether to retry it.
    pub fn finish(
        &mut self,
        report: Report,
        asks: bool,
        now: Instant,
        wall: Timestamp,
        jitter: f64,
    ) -> (Option<NextStep>, Vec<Effect<W>>) {
        let entry = if report.ticket.instance == self.instance {
            self.in_flight.remove(&report.ticket.seq)
        } else {
            None
        };
        let session = report.session.clone();
        let shared = Arc::clone(&self.shared);
        let stats = &shared.stats;
        let mut transition = None;
        match (&report.outcome, entry) {
            (
                Outcome::Succeeded { tokens },
                Some(InFlight {
                    model,
                    reservation,
                    charge,
                    permit,
                }),
            ) => {
                let used = tokens.unwrap_or_else(|| reservation.tokens());
                self.policy.budget.reconcile(reservation, used, now);
                self.model_limits.reconcile(&model, charge, used, now);
                transition = self.policy.breaker.on_success(permit, now);
            }
            (
                Outcome::Failed {
                    class,
                    reached_provider,
                },
                Some(InFlight {
                    model,
                    reservation,
                    charge,
                    permit,
                }),
            ) => {
                if *reached_provider {
                    // An error answer is not charged; a request that timed out after it was
                    // sent may still be running there, so its estimate stays spent.
                    let used = if class.kind == ErrorKind::Timeout {
                        reservation.tokens()
                    } else {
                        0
                    };
                    self.policy.budget.reconcile(reservation, used, now);
                    self.model_limits.reconcile(&model, charge, used, now);
                } else {
                    self.policy.budget.release(reservation, now);
                    self.model_limits.release(&model, charge, now);
                }
                transition = self.failure_verdict(class, *reached_provider, permit, now);
            }
            (
                Outcome::BrokeOff { class, tokens },
                Some(InFlight {
                    model,
                    reservation,
                    charge,
                    permit,
                }),
            ) => {
                let estimate = reservation.tokens();
                let used = tokens.map_or(estimate, |tokens| tokens.max(estimate));
                self.policy.budget.reconcile(reservation, used, now);
                self.model_limits.reconcile(&model, charge, used, now);
                transition = self.failure_verdict(class, true, permit, now);
            }
            (
                Outcome::Abandoned { reached_provider },
                Some(InFlight {
                    model,
                    reservation,
                    charge,
                    permit,
                }),
            ) => {
                if *reached_provider {
                    let estimate = reservation.tokens();
                    self.policy.budget.reconcile(reservation, estimate, now);
                    self.model_limits.reconcile(&model, charge, estimate, now);
                } else {
                    self.policy.budget.release(reservation, now);
                    self.model_limits.release(&model, charge, now);
                }
                self.policy.breaker.release(permit);
            }
            // A ticket of an earlier instance: its budget and breaker are gone.
            (_, None) => {}
        }
        if !report.rate_limits.is_empty() {
            // The provider's figures are the model's, not the whole provider's.
            self.model_limits
                .learn(&report.model, &report.rate_limits, now);
            self.announce_exhausted_headers(&report, session.clone());
        }
        if let Some(transition) = transition {
            self.breaker_event(transition, session.clone());
        }

        let mut next = None;
        let broke_off = matches!(report.outcome, Outcome::BrokeOff { .. });
        match report.outcome {
            Outcome::Succeeded { .. } => {
                bump(&stats.succeeded);
                stats.record_latency(report.latency);
                if self.trouble.take().is_some() {
                    let data = EventData::ProviderRecovered(ProviderRecovered {
                        provider: self.spec().name.clone(),
                    });
                    self.effects.push(Effect::Publish(session, data));
                }
            }
            Outcome::Failed { class, .. } | Outcome::BrokeOff { class, .. } => {
                bump(&stats.failed);
                stats.record_latency(report.latency);
                self.errors.push(ErrorRecord {
                    at: wall,
                    model: report.model.clone(),
                    kind: class.kind,
                    status: class.status,
                    message: class.describe(),
                });
                if class.kind == ErrorKind::RateLimited {
                    bump(&stats.rate_limited);
                    self.rate_limited(
                        &report.model,
                        class.retry_after,
                        RateLimitSource::Provider,
                        session.clone(),
                    );
                }
                if !matches!(
                    class.kind,
                    ErrorKind::BadRequest
                        | ErrorKind::ContextOverflow
                        | ErrorKind::ContentFilter
                        | ErrorKind::RequestTooLarge
                        | ErrorKind::NotFound
                ) {
                    self.trouble = Some(class.describe());
                }
                // One that broke off after it began is never retried: its caller has content.
                if !asks || broke_off {
                    self.pump(now);
                    self.check_health(now);
                    return (None, self.take_effects());
                }
                let decision = self.policy.retry.next(
                    report.attempt,
                    class.retry_after,
                    class.retryable,
                    jitter,
                    report.waited,
                );
                next = Some(match decision {
                    RetryDecision::RetryAfter(delay) => {
                        bump(&stats.retries);
                        let data = EventData::ProviderRetry(ProviderRetry {
                            provider: self.spec().name.clone(),
                            model: report.model.clone(),
                            attempt: report.attempt.saturating_add(1),
                            delay_ms: millis(delay),
                            reason: class.describe(),
                        });
                        self.effects.push(Effect::Publish(session, data));
                        NextStep::Retry { delay }
                    }
                    RetryDecision::GiveUp(reason) => NextStep::GiveUp(reason),
                });
            }
            Outcome::Abandoned { .. } => bump(&stats.abandoned),
        }
        self.pump(now);
        self.check_health(now);
        (next, self.take_effects())
    }

    /// What a failure says to the breaker, which `permit` is given back to.
    fn failure_verdict(
        &mut self,
        class: &ErrorClass,
        reached_provider: bool,
        permit: Permit,
        now: Instant,
    ) -> Option<Transition> {
        if class.kind.is_provider_fault() {
            self.policy.breaker.on_failure(permit, now)
        } else if matches!(
            class.kind,
            ErrorKind::RateLimited | ErrorKind::QuotaExhausted
        ) {
            // Busy or out of quota says nothing about the provider's health.
            self.policy.breaker.release(permit);
            None
        } else if reached_provider {
            // It answered, sensibly: the request was at fault.
            self.policy.breaker.on_success(permit, now)
        } else {
            // Refused before it was sent (no key, a request this API cannot carry): the
            // provider was never asked, so its health is as unknown as before.
            self.policy.breaker.release(permit);
            None
        }
    }

    /// A call that could not be served here moves on to `to` (published as
    /// `provider.fallback`).
    pub fn fell_back(
        &mut self,
        model: &str,
        to: &Target,
        reason: String,
        session: Option<SessionId>,
    ) -> Vec<Effect<W>> {
        bump(&self.shared.stats.fallbacks);
        let data = EventData::ProviderFallback(ProviderFallback {
            from: Target::new(self.spec().name.clone(), model).to_string(),
            to: to.to_string(),
            reason,
        });
        self.effects.push(Effect::Publish(session, data));
        self.take_effects()
    }

    /// Time passed: admit what can go now, refuse what waited too long.
    pub fn wake(&mut self, now: Instant) -> Vec<Effect<W>> {
        self.pump(now);
        self.check_health(now);
        self.take_effects()
    }

    /// When [`wake`](Self::wake) has something to do, if calls are waiting.
    pub fn next_wake(&self) -> Option<Instant> {
        if self.queue.is_empty() {
            return None;
        }
        match (self.room_wake, self.earliest_deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The read-side copy of the state.
    pub fn snapshot(&mut self) -> ProviderSnapshot {
        ProviderSnapshot {
            budget: self.policy.budget.clone(),
            breaker: self.policy.breaker.view(),
            in_flight: self.in_flight.len(),
            queued: self.queue.len(),
            recent_errors: self.errors.shared(),
        }
    }

    /// The retry schedule (also used by callers that cannot reach the actor).
    pub fn retry_policy(&self) -> RetryPolicy {
        self.policy.retry
    }

    fn take_effects(&mut self) -> Vec<Effect<W>> {
        std::mem::take(&mut self.effects)
    }

    /// Admits calls from the head of the queue while they can go, then refuses those still
    /// waiting whose allowance has run out.
    fn pump(&mut self, now: Instant) {
        self.room_wake = None;
        let budget_block = self.admit_waiting(now);
        if self
            .earliest_deadline
            .is_some_and(|deadline| deadline <= now)
        {
            self.expire(budget_block, now);
        }
    }

    /// Admits waiting calls in order while they can go. A call whose model's reported limits are
    /// spent stays, with the later calls to that model; the calls behind it to other models go
    /// on. A call short of budget or of a slot stops the round: they are the whole provider's.
    /// Returns the budget's limit and wait when a call short of it stopped the round.
    fn admit_waiting(&mut self, now: Instant) -> Option<(LocalLimit, Duration)> {
        let max_concurrency = self.spec().max_concurrency.max(1);
        // Models whose first waiting call waits for their reported limits (few: a Vec).
        let mut held: Vec<String> = Vec::new();
        let mut index = 0;
        while let Some(waiter) = self.queue.get(index) {
            if waiter.reply.is_gone() {
                self.queue.remove(index);
                continue;
            }
            if self.in_flight.len() >= max_concurrency {
                break;
            }
            if held.contains(&waiter.request.model) {
                index += 1;
                continue;
            }
            if let Some(wait) = self.model_limits.wait(&waiter.request.model, now) {
                let limit = LocalLimit::of_model(wait.reason);
                if self.wait_or_give_up(index, wait, limit, RateLimitSource::Headers, now) {
                    held.push(self.queue[index].request.model.clone());
                    index += 1;
                }
                continue;
            }
            let session = waiter.request.session.clone();
            let admitted = match self.policy.breaker.allow(now) {
                Ok(admitted) => admitted,
                Err(rejected) => {
                    let waiter = self.queue.remove(index).expect("the waiter exists");
                    bump(&self.shared.stats.breaker_rejections);
                    let refusal = Refusal::BreakerOpen {
                        retry_in: rejected.retry_in,
                        reason: rejected.reason,
                    };
                    self.effects
                        .push(Effect::Reply(waiter.reply, Admission::Refused(refusal)));
                    continue;
                }
            };
            if let Some(transition) = admitted.transition {
                self.breaker_event(transition, session);
            }
            let estimate = self.queue[index].request.estimate_tokens;
            match self.policy.budget.try_reserve(estimate, now) {
                Ok(reservation) => {
                    let waiter = self.queue.remove(index).expect("the waiter exists");
                    let charge = self.model_limits.take(&waiter.request.model, estimate, now);
                    let seq = self.next_seq;
                    self.next_seq += 1;
                    let probe = admitted.permit.is_probe();
                    self.in_flight.insert(
                        seq,
                        InFlight {
                            model: waiter.request.model.clone(),
                            reservation,
                            charge,
                            permit: admitted.permit,
                        },
                    );
                    bump(&self.shared.stats.admitted);
                    let ticket = Ticket {
                        id: TicketId {
                            instance: self.instance,
                            seq,
                        },
                        probe,
                    };
                    self.effects
                        .push(Effect::Reply(waiter.reply, Admission::Admitted(ticket)));
                }
                Err(BudgetError::TooLarge {
                    dimension,
                    needed,
                    limit,
                }) => {
                    self.policy.breaker.release(admitted.permit);
                    let waiter = self.queue.remove(index).expect("the waiter exists");
                    bump(&self.shared.stats.throttled);
                    let refusal = Refusal::TooLarge {
                        dimension,
                        needed,
                        limit,
                    };
                    self.effects
                        .push(Effect::Reply(waiter.reply, Admission::Refused(refusal)));
                }
                Err(BudgetError::Wait(wait)) => {
                    self.policy.breaker.release(admitted.permit);
                    let limit = match wait.reason {
                        WaitReason::Requests => LocalLimit::Requests,
                        WaitReason::Tokens => LocalLimit::Tokens,
                    };
                    if self.wait_or_give_up(index, wait, limit, RateLimitSource::Budget, now) {
                        return Some((limit, wait.retry_in));
                    }
                }
            }
        }
        None
    }

    /// The waiting call at `index` must wait `wait` for `limit`: it keeps waiting (announced
    /// once, a wake-up set; true) if that fits its allowance, else it is refused (false).
    fn wait_or_give_up(
        &mut self,
        index: usize,
        wait: Wait,
        limit: LocalLimit,
        source: RateLimitSource,
        now: Instant,
    ) -> bool {
        let waiter = &mut self.queue[index];
        let session = waiter.request.session.clone();
        let waited = waiter
            .request
            .waited
            .saturating_add(now.saturating_duration_since(waiter.enqueued));
        match wait.decide(self.policy.retry.max_wait(), waited) {
            WaitDecision::GiveUp { retry_after } => {
                let waiter = self.queue.remove(index).expect("the waiter exists");
                bump(&self.shared.stats.throttled);
                self.rate_limited(&waiter.request.model, Some(retry_after), source, session);
                let refusal = Refusal::Throttled { retry_after, limit };
                self.effects
                    .push(Effect::Reply(waiter.reply, Admission::Refused(refusal)));
                false
            }
            WaitDecision::WaitFor(delay) => {
                if !waiter.announced {
                    waiter.announced = true;
                    let model = waiter.request.model.clone();
                    self.rate_limited(&model, Some(delay), source, session);
                }
                let at = crate::time::instant_after(now, delay);
                self.room_wake = Some(self.room_wake.map_or(at, |wake| wake.min(at)));
                true
            }
        }
    }

    /// Refuses every waiting call whose allowance has run out, with what held it up and when
    /// that clears (see [`blocker`](Self::blocker)). `budget_block`: the budget's limit and wait
    /// when a call short of it stopped this round, holding up the calls behind it.
    fn expire(&mut self, budget_block: Option<(LocalLimit, Duration)>, now: Instant) {
        let mut earliest: Option<Instant> = None;
        let mut kept = VecDeque::with_capacity(self.queue.len());
        let queue = std::mem::take(&mut self.queue);
        for waiter in queue {
            if waiter.deadline <= now {
                bump(&self.shared.stats.throttled);
                let (limit, retry_after) = self.blocker(&waiter.request, budget_block, now);
                let source = match limit {
                    LocalLimit::ModelRequests | LocalLimit::ModelTokens => {
                        Some(RateLimitSource::Headers)
                    }
                    LocalLimit::Requests | LocalLimit::Tokens => Some(RateLimitSource::Budget),
                    LocalLimit::Concurrency | LocalLimit::Queue => None,
                };
                if let Some(source) = source {
                    let session = waiter.request.session.clone();
                    self.rate_limited(&waiter.request.model, Some(retry_after), source, session);
                }
                let refusal = Refusal::Throttled { retry_after, limit };
                self.effects
                    .push(Effect::Reply(waiter.reply, Admission::Refused(refusal)));
            } else {
                earliest = Some(earliest.map_or(waiter.deadline, |e| e.min(waiter.deadline)));
                kept.push_back(waiter);
            }
        }
        self.queue = kept;
        self.earliest_deadline = earliest;
    }

    /// What holds up a waiting call, and for how long: its model's reported limits; else the
    /// budget, short of its own estimate or of the call ahead that stopped the round
    /// (`budget_block`), whichever clears later; else a concurrency slot, in about a second.
    fn blocker(
        &mut self,
        request: &AdmitRequest,
        budget_block: Option<(LocalLimit, Duration)>,
        now: Instant,
    ) -> (LocalLimit, Duration) {
        if let Some(wait) = self.model_limits.wait(&request.model, now) {
            return (LocalLimit::of_model(wait.reason), wait.retry_in);
        }
        // Asked of a copy: nothing is reserved.
        let own = match self
            .policy
            .budget
            .clone()
            .try_reserve(request.estimate_tokens, now)
        {
            Err(BudgetError::Wait(wait)) => Some((
                match wait.reason {
                    WaitReason::Requests => LocalLimit::Requests,
                    WaitReason::Tokens => LocalLimit::Tokens,
                },
                wait.retry_in,
            )),
            Ok(_) | Err(BudgetError::TooLarge { .. }) => None,
        };
        match (own, budget_block) {
            (Some(own), Some(ahead)) => {
                if ahead.1 > own.1 {
                    ahead
                } else {
                    own
                }
            }
            (own, ahead) => own
                .or(ahead)
                .unwrap_or((LocalLimit::Concurrency, Duration::from_secs(1))),
        }
    }

    fn rate_limited(
        &mut self,
        model: &str,
        retry_after: Option<Duration>,
        source: RateLimitSource,
        session: Option<SessionId>,
    ) {
        let data = EventData::ProviderRateLimited(ProviderRateLimited {
            provider: self.spec().name.clone(),
            model: model.to_owned(),
            retry_after_ms: retry_after.map(millis),
            source,
        });
        self.effects.push(Effect::Publish(session, data));
    }

    /// Headers saying that nothing is left are a rate limit worth announcing.
    fn announce_exhausted_headers(&mut self, report: &Report, session: Option<SessionId>) {
        let limits = &report.rate_limits;
        let reset = if limits.requests_remaining == Some(0) {
            Some(limits.requests_reset)
        } else if limits.tokens_remaining == Some(0) {
            Some(limits.tokens_reset)
        } else {
            None
        };
        if let Some(reset) = reset {
            self.rate_limited(&report.model, reset, RateLimitSource::Headers, session);
        }
    }

    fn breaker_event(&mut self, transition: Transition, session: Option<SessionId>) {
        let provider = self.spec().name.clone();
        let data = match transition {
            Transition::Opened { reason, open_for } => {
                bump(&self.shared.stats.breaker_opened);
                tracing::warn!(provider, %reason, open_for_ms = millis(open_for), "circuit breaker opened");
                EventData::ProviderBreakerOpened(ProviderBreaker {
                    provider,
                    reason: Some(reason.to_string()),
                    open_for_ms: Some(millis(open_for)),
                })
            }
            Transition::HalfOpened => {
                tracing::info!(provider, "circuit breaker half-open: probing");
                EventData::ProviderBreakerHalfOpen(ProviderBreaker {
                    provider,
                    reason: Some("the cool-down ended; a probe call goes through".into()),
                    open_for_ms: None,
                })
            }
            Transition::Closed => {
                tracing::info!(provider, "circuit breaker closed");
                EventData::ProviderBreakerClosed(ProviderBreaker {
                    provider,
                    reason: Some("the probe call succeeded".into()),
                    open_for_ms: None,
                })
            }
        };
        self.effects.push(Effect::Publish(session, data));
    }

    fn check_health(&mut self, now: Instant) {
        use super::breaker::BreakerState;
        let (status, detail) = match (self.policy.breaker.state(now), &self.trouble) {
            (BreakerState::Open { retry_in }, _) => (
                HealthStatus::Degraded,
                format!("circuit breaker open for {} ms more", millis(retry_in)),
            ),
            (BreakerState::HalfOpen, _) => (
                HealthStatus::Degraded,
                "circuit breaker half-open: probing".to_owned(),
            ),
            (BreakerState::Closed, Some(why)) => {
                (HealthStatus::Degraded, format!("failing: {why}"))
            }
            (BreakerState::Closed, None) => (HealthStatus::Healthy, "serving".to_owned()),
        };
        if status != self.health {
            self.health = status;
            self.effects.push(Effect::Health(status, detail));
        }
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests;
