//! The pure policy of a provider: its budget, circuit breaker and retry schedule, and the parsing
//! of the rate-limit headers that feed them.
//!
//! The policies are plain state machines driven with an explicit `now` (and a jitter sample
//! where randomness is needed); the ProviderActor feeds them and publishes what they decide.
//! None of them reads a clock, sleeps, draws random numbers or performs I/O. Calls reach the
//! network only through the [`ProviderClient`] port the node implements.
//!
//! - [`budget`]: the dual requests-per-minute / tokens-per-minute budget (the user's own, for the
//!   whole provider).
//! - [`model_limits`]: what the provider's rate-limit headers said is left, per model.
//! - [`breaker`]: closed → open → half-open, on consecutive failures and on failure rate.
//! - [`retry`]: jittered exponential backoff honouring the provider's hint.
//! - [`headers`]: `x-ratelimit-*`, `anthropic-ratelimit-*`, `retry-after`, `retry-after-ms`.
//! - [`failure`]: what a failed call was, and what that means for retries and fallback.
//! - [`state`]: one provider's state — policies, calls in flight, calls waiting — as a pure
//!   machine.
//! - [`actor`]: the ProviderActor that owns that state.
//! - [`route`]: model names to providers, and fallback chains.
//! - [`call`]: the loop one call goes through (admission, attempt, retry, fallback).
//! - [`port`]: the [`ProviderClient`] port.
//! - [`stats`]: counters and the read-side snapshot.

pub mod actor;
pub mod breaker;
pub mod budget;
pub mod call;
pub mod failure;
pub mod headers;
pub mod model_limits;
pub mod port;
pub mod retry;
pub mod route;
pub mod spec;
pub mod state;
pub mod stats;

pub use actor::{AdmitReply, Pass, ProviderActor, ProviderActorRef, ProviderArgs, ProviderMsg};
pub use call::{CallError, CallGuard, CallMeta, Committed, ProviderSet};
pub use failure::{ErrorClass, ErrorKind};
pub use port::{Answer, Failed, Progress, ProviderClient};
pub use route::{Hop, InvalidRoutes, ModelEntry, Route, RouteError, Routes};
pub use spec::{InvalidTarget, ProviderSpec, Target};
pub use state::{
    Admission, AdmitRequest, LocalLimit, NextStep, Outcome, Refusal, Report, Ticket, TicketId,
};
pub use stats::{
    BreakerStatus, BudgetStatus, ErrorRecord, ProviderCounters, ProviderShared, ProviderStats,
    ProviderStatus,
};

pub use breaker::{
    Admitted, Breaker, BreakerConfig, BreakerState, BreakerView, OpenReason, Permit, RejectReason,
    Rejected, Transition,
};
pub use budget::{
    Budget, BudgetConfig, BudgetError, BudgetRemaining, Reservation, Wait, WaitDecision, WaitReason,
};
pub use headers::{RateLimitSnapshot, retry_after};
pub use model_limits::{ModelCharge, ModelLimits};
pub use retry::{GiveUpReason, RetryConfig, RetryDecision, RetryPolicy};

use std::time::Instant;

/// The policy settings of one provider, as its `[[providers]]` table holds them.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProviderPolicyConfig {
    /// `rpm` and `tpm`.
    pub budget: BudgetConfig,
    /// `breaker = { … }`.
    pub breaker: BreakerConfig,
    /// `retry = { … }`.
    pub retry: RetryConfig,
}

/// The policy state of one provider, built from its settings: what the ProviderActor owns.
#[derive(Debug, Clone)]
pub struct ProviderPolicy {
    /// The dual budget.
    pub budget: Budget,
    /// The circuit breaker.
    pub breaker: Breaker,
    /// The retry schedule.
    pub retry: RetryPolicy,
}

impl ProviderPolicy {
    /// A full budget, a closed breaker, at `now`.
    pub fn new(config: ProviderPolicyConfig, now: Instant) -> Self {
        Self {
            budget: Budget::new(config.budget, now),
            breaker: Breaker::new(config.breaker),
            retry: RetryPolicy::new(config.retry),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_policy_starts_full_and_closed() {
        let now = Instant::now();
        let config = ProviderPolicyConfig {
            budget: BudgetConfig {
                rpm: Some(500),
                tpm: Some(200_000),
            },
            ..ProviderPolicyConfig::default()
        };
        let policy = ProviderPolicy::new(config, now);
        assert_eq!(
            policy.budget.remaining(now),
            BudgetRemaining {
                requests: Some(500),
                tokens: Some(200_000)
            }
        );
        assert_eq!(policy.breaker.state(now), BreakerState::Closed);
        assert_eq!(policy.retry.config(), RetryConfig::default());
    }
}
