//! Making a provider call: the providers of a node with their clients ([`ProviderSet`]), and the
//! loop one call goes through — admission by the provider's actor, an attempt through its
//! client, the actor's verdict on a failure (retry after a delay, or give up), and the fallback
//! chain — until the first byte of an answer is in hand.
//!
//! From then on the call is committed: no retry, no fallback, since the caller may already be
//! forwarding bytes. A streamed answer comes with a [`CallGuard`] through which its caller
//! reports the end (or a failure in the middle); dropping the guard reports the call abandoned.
//!
//! The loop runs in the caller's task; every decision is the actor's, and every outcome goes back
//! to it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use super::actor::{AdmitReply, ProviderActorRef, ProviderMsg};
use super::budget::WaitReason;
use super::failure::ErrorClass;
use super::headers::RateLimitSnapshot;
use super::port::{Failed, Progress, ProviderClient};
use super::retry::{GiveUpReason, RetryDecision, RetryPolicy};
use super::route::{Hop, InvalidRoutes, ModelEntry, Route, RouteError, Routes};
use super::spec::Target;
use super::state::{AdmitRequest, LocalLimit, NextStep, Outcome, Refusal, Report, TicketId};
use crate::ids::SessionId;
use crate::kernel::ActorHandle;

/// How long a caller waits for an answer from the actor about a failure.
const VERDICT_TIMEOUT: Duration = Duration::from_secs(5);

/// Added to a call's waiting allowance when it waits for admission: the actor answers within
/// the allowance, this covers its mailbox.
const ADMISSION_SLACK: Duration = Duration::from_secs(5);

/// The node's providers, each with its actor and its client, and the routing table. Cheap to
/// clone.
pub struct ProviderSet<C: ProviderClient> {
    inner: Arc<Inner<C>>,
}

struct Inner<C> {
    providers: Vec<(ProviderActorRef, Arc<C>)>,
    routes: Routes,
}

impl<C: ProviderClient> Clone for ProviderSet<C> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

/// What a call carries besides its request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CallMeta {
    /// Prompt estimate plus the completion allowance, in tokens.
    pub estimate_tokens: u32,
    /// The session the call is made for (events carry it).
    pub session: Option<SessionId>,
}

/// A call whose answer has begun.
#[derive(Debug)]
pub struct Committed<R> {
    /// The answer.
    pub reply: R,
    /// Who answered.
    pub target: Target,
    /// For an answer still streaming: where its end is reported.
    pub stream: Option<CallGuard>,
}

/// Why a call got no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// troupe's own limits for the provider, or the limits the provider reported for the
    /// model, would have kept the call waiting too long.
    #[error(
        "{target}: {} is spent; retry in {} ms",
        limit.describe(),
        retry_after.as_millis()
    )]
    Throttled {
        /// The provider and model.
        target: Target,
        /// When there would be room.
        retry_after: Duration,
        /// Which limit.
        limit: LocalLimit,
    },
    /// The provider's circuit breaker is open.
    #[error("{target}: the provider's circuit breaker is open; retry in {} ms", retry_in.as_millis())]
    BreakerOpen {
        /// The provider and model.
        target: Target,
        /// When it lets a call through again.
        retry_in: Duration,
    },
    /// The call needs more than the provider's whole per-minute budget.
    #[error(
        "{target}: the request needs {needed} {} but the provider's per-minute budget is {limit}; \
         shrink the request",
        match dimension { WaitReason::Requests => "requests", WaitReason::Tokens => "tokens" }
    )]
    TooLarge {
        /// The provider and model.
        target: Target,
        /// The dimension.
        dimension: WaitReason,
        /// What the call needs.
        needed: u32,
        /// The limit.
        limit: u32,
    },
    /// The provider failed and the retries gave up.
    #[error("{target}: {}; {gave_up}", class.describe())]
    Failed {
        /// The provider and model.
        target: Target,
        /// The last failure.
        class: ErrorClass,
        /// Why retrying stopped.
        gave_up: GiveUpReason,
        /// Whether the last attempt went to the provider (not refused by its client before
        /// sending: no API key, a request its API cannot carry).
        sent: bool,
    },
    /// The provider's actor did not answer (restarting, or stopped).
    #[error("{target}: the provider's actor is unavailable ({detail}); retry shortly")]
    Unavailable {
        /// The provider and model.
        target: Target,
        /// What the actor's handle said.
        detail: String,
    },
}

impl CallError {
    /// The provider and model the error is about.
    pub fn target(&self) -> &Target {
        match self {
            Self::Throttled { target, .. }
            | Self::BreakerOpen { target, .. }
            | Self::TooLarge { target, .. }
            | Self::Failed { target, .. }
            | Self::Unavailable { target, .. } => target,
        }
    }

    /// True when the provider's client refused the request before sending it.
    pub fn was_refused_before_sending(&self) -> bool {
        matches!(self, Self::Failed { sent: false, .. })
    }

    /// May the call move on to the next provider of its route?
    pub fn allows_fallback(&self) -> bool {
        match self {
            Self::Failed { class, .. } => class.fallback,
            Self::Throttled { .. }
            | Self::BreakerOpen { .. }
            | Self::TooLarge { .. }
            | Self::Unavailable { .. } => true,
        }
    }

    fn refused(target: Target, refusal: Refusal) -> Self {
        match refusal {
            Refusal::Throttled { retry_after, limit } => Self::Throttled {
                target,
                retry_after,
                limit,
            },
            Refusal::BreakerOpen { retry_in, .. } => Self::BreakerOpen { target, retry_in },
            Refusal::TooLarge {
                dimension,
                needed,
                limit,
            } => Self::TooLarge {
                target,
                dimension,
                needed,
                limit,
            },
        }
    }
}

impl<C: ProviderClient> ProviderSet<C> {
    /// The providers with their clients, in configuration order, and the gateway's aliases
    /// (`name → provider/model`).
    pub fn new(
        providers: Vec<(ProviderActorRef, Arc<C>)>,
        aliases: &BTreeMap<String, String>,
    ) -> Result<Self, InvalidRoutes> {
        let specs = providers
            .iter()
            .map(|(actor, _)| Arc::clone(actor.spec()))
            .collect();
        let routes = Routes::new(specs, aliases)?;
        Ok(Self {
            inner: Arc::new(Inner { providers, routes }),
        })
    }

    /// Where a model name leads.
    pub fn route(&self, model: &str) -> Result<Route, RouteError> {
        self.inner.routes.resolve(model)
    }

    /// Every model name that can be asked for.
    pub fn models(&self) -> Vec<ModelEntry> {
        self.inner.routes.models()
    }

    /// The providers' actors, in configuration order.
    pub fn providers(&self) -> impl Iterator<Item = &ProviderActorRef> {
        self.inner.providers.iter().map(|(actor, _)| actor)
    }

    /// True when no provider is configured.
    pub fn is_empty(&self) -> bool {
        self.inner.providers.is_empty()
    }

    /// Makes one call along `route` until an answer begins, or every provider of the route
    /// gave up. A failure that rules out fallback (a bad request, a context overflow) ends the
    /// call at once. The error returned is the last provider's.
    pub async fn call(
        &self,
        route: &Route,
        request: &C::Request,
        meta: &CallMeta,
    ) -> Result<Committed<C::Reply>, CallError> {
        let mut waited = Duration::ZERO;
        let mut last: Option<(&Hop, CallError)> = None;
        for hop in &route.hops {
            let (actor, client) = &self.inner.providers[hop.provider];
            if let Some((from, error)) = &last {
                let (from_actor, _) = &self.inner.providers[from.provider];
                let _ = from_actor.handle().cast(ProviderMsg::FellBack {
                    model: from.target.model.clone(),
                    to: hop.target.clone(),
                    reason: error.to_string(),
                    session: meta.session.clone(),
                });
            }
            match attempts(
                actor,
                client.as_ref(),
                &hop.target,
                request,
                meta,
                &mut waited,
            )
            .await
            {
                Ok(committed) => return Ok(committed),
                Err(error) if error.allows_fallback() => last = Some((hop, error)),
                // A fallback that cannot even carry the request (its API cannot express it, or
                // it has no key) is passed over: what the caller needs to hear is why the
                // provider before it failed, not a 400 about a request that was fine there.
                Err(error) if last.is_some() && error.was_refused_before_sending() => {}
                Err(error) => return Err(error),
            }
        }
        Err(last.expect("a route has at least one hop").1)
    }
}

/// Attempts at one provider: admitted, sent, and retried while its actor says so.
async fn attempts<C: ProviderClient>(
    actor: &ProviderActorRef,
    client: &C,
    target: &Target,
    request: &C::Request,
    meta: &CallMeta,
    waited: &mut Duration,
) -> Result<Committed<C::Reply>, CallError> {
    let retry = RetryPolicy::new(actor.spec().policy.retry);
    let mut attempt = 1;
    loop {
        let asked = tokio::time::Instant::now();
        let admit = AdmitRequest {
            model: target.model.clone(),
            estimate_tokens: meta.estimate_tokens,
            session: meta.session.clone(),
            attempt,
            waited: *waited,
        };
        let allowance = retry
            .max_wait()
            .saturating_sub(*waited)
            .saturating_add(ADMISSION_SLACK);
        let answer = actor
            .handle()
            .call(
                |reply| ProviderMsg::Admit {
                    request: admit,
                    reply,
                },
                allowance,
            )
            .await;
        *waited += asked.elapsed();
        let pass = match answer {
            Ok(AdmitReply::Admitted(pass)) => pass,
            Ok(AdmitReply::Refused(refusal)) => {
                return Err(CallError::refused(target.clone(), refusal));
            }
            Err(error) => {
                return Err(CallError::Unavailable {
                    target: target.clone(),
                    detail: error.to_string(),
                });
            }
        };
        let (handle, ticket) = pass.take();
        let mut guard = CallGuard {
            handle,
            ticket: ticket.id,
            target: target.clone(),
            session: meta.session.clone(),
            attempt,
            waited: *waited,
            started: tokio::time::Instant::now(),
            rate_limits: RateLimitSnapshot::default(),
            done: false,
        };
        match client.send(&target.model, request).await {
            Ok(answer) => {
                guard.rate_limits = answer.rate_limits;
                let stream = match answer.progress {
                    Progress::Complete { tokens } => {
                        guard.succeed(tokens);
                        None
                    }
                    Progress::Streaming => Some(guard),
                };
                return Ok(Committed {
                    reply: answer.reply,
                    target: target.clone(),
                    stream,
                });
            }
            Err(failed) => {
                let (class, sent) = (failed.class.clone(), failed.reached_provider);
                match guard.fail_and_ask(failed, retry).await {
                    NextStep::Retry { delay } => {
                        tokio::time::sleep(delay).await;
                        *waited += delay;
                        attempt += 1;
                    }
                    NextStep::GiveUp(gave_up) => {
                        return Err(CallError::Failed {
                            target: target.clone(),
                            class,
                            gave_up,
                            sent,
                        });
                    }
                }
            }
        }
    }
}

/// An admitted call whose end is still to be reported. Report it with [`succeed`]
/// (`CallGuard::succeed`) or [`fail`](CallGuard::fail); dropping it reports the call abandoned
/// by its caller.
///
/// [`succeed`]: CallGuard::succeed
#[derive(Debug)]
pub struct CallGuard {
    handle: ActorHandle<ProviderMsg>,
    ticket: TicketId,
    target: Target,
    session: Option<SessionId>,
    attempt: u32,
    waited: Duration,
    started: tokio::time::Instant,
    rate_limits: RateLimitSnapshot,
    done: bool,
}

impl CallGuard {
    /// Who is answering.
    pub fn target(&self) -> &Target {
        &self.target
    }

    /// The answer reached its end; the provider reported `tokens` used, if it said.
    pub fn succeed(mut self, tokens: Option<u32>) {
        let report = self.report(Outcome::Succeeded { tokens });
        let _ = self.handle.cast(ProviderMsg::Finish {
            report,
            reply: None,
        });
    }

    /// The answer broke off after it began (an error event, a cut connection, a stall). The
    /// provider charged what it did, so the call's estimate stays spent in the budget.
    pub fn fail(self, class: ErrorClass) {
        self.fail_with_usage(class, None);
    }

    /// As [`fail`](Self::fail), with the tokens the provider reported before it broke off
    /// (kept when more than the estimate).
    pub fn fail_with_usage(mut self, class: ErrorClass, tokens: Option<u32>) {
        let report = self.report(Outcome::BrokeOff { class, tokens });
        let _ = self.handle.cast(ProviderMsg::Finish {
            report,
            reply: None,
        });
    }

    /// A failed attempt: reports it and asks the actor whether to retry. When the actor cannot
    /// answer, the retry schedule decides here (without events).
    async fn fail_and_ask(mut self, failed: Failed, retry: RetryPolicy) -> NextStep {
        self.rate_limits = failed.rate_limits;
        let (attempt, waited) = (self.attempt, self.waited);
        let class = failed.class;
        let (retry_after, retryable) = (class.retry_after, class.retryable);
        let report = self.report(Outcome::Failed {
            class,
            reached_provider: failed.reached_provider,
        });
        let asked = self
            .handle
            .call(
                |reply| ProviderMsg::Finish {
                    report,
                    reply: Some(reply),
                },
                VERDICT_TIMEOUT,
            )
            .await;
        match asked {
            Ok(next) => next,
            Err(error) => {
                tracing::warn!(%error, "no verdict from the provider's actor; deciding locally");
                match retry.next(attempt, retry_after, retryable, fastrand::f64(), waited) {
                    RetryDecision::RetryAfter(delay) => NextStep::Retry { delay },
                    RetryDecision::GiveUp(reason) => NextStep::GiveUp(reason),
                }
            }
        }
    }

    fn report(&mut self, outcome: Outcome) -> Report {
        self.done = true;
        Report {
            ticket: self.ticket,
            model: self.target.model.clone(),
            session: self.session.clone(),
            outcome,
            rate_limits: std::mem::take(&mut self.rate_limits),
            latency: self.started.elapsed(),
            attempt: self.attempt,
            waited: self.waited,
        }
    }
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        if !self.done {
            let report = self.report(Outcome::Abandoned {
                reached_provider: true,
            });
            let _ = self.handle.cast(ProviderMsg::Finish {
                report,
                reply: None,
            });
        }
    }
}
