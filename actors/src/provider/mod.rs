//! The pure policy of a provider: its budget, circuit breaker and retry schedule, and the parsing
//! of the rate-limit headers that feed them.
//!
//! These are plain state machines driven with an explicit `now` (and a jitter sample where
//! randomness is needed); the ProviderActor feeds them and publishes what they decide. Nothing
//! here reads a clock, sleeps, draws random numbers or performs I/O.
//!
//! - [`budget`]: the dual requests-per-minute / tokens-per-minute budget.
//! - [`breaker`]: closed → open → half-open, on consecutive failures and on failure rate.
//! - [`retry`]: jittered exponential backoff honouring the provider's hint.
//! - [`headers`]: `x-ratelimit-*`, `anthropic-ratelimit-*`, `retry-after`, `retry-after-ms`.

pub mod breaker;
pub mod budget;
pub mod headers;

pub use breaker::{
    Admitted, Breaker, BreakerConfig, BreakerState, OpenReason, Permit, RejectReason, Rejected,
    Transition,
};
pub use budget::{
    Budget, BudgetConfig, BudgetError, BudgetRemaining, Reservation, Wait, WaitDecision, WaitReason,
};
pub use headers::{RateLimitSnapshot, retry_after};
