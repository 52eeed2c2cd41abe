//! The read side of a provider: counters and a snapshot of its policy state, written by its
//! ProviderActor only and read by `/v1/providers`, `/metrics` and health without a message to
//! the actor.
//!
//! The snapshot holds copies of the budget and the breaker as the actor last left them; a reader
//! asks them about its own `now`, so a budget that refilled since is shown refilled.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use serde::Serialize;

use super::breaker::{BreakerState, BreakerView};
use super::budget::Budget;
use super::failure::ErrorKind;
use super::spec::ProviderSpec;
use crate::ids::Timestamp;

/// Upper bounds of the call latency histogram, in seconds (the last bucket is +Inf).
pub const LATENCY_BUCKETS_SECS: [f64; 11] =
    [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];

/// How many recent errors a provider remembers.
pub const RECENT_ERRORS: usize = 16;

/// Counters of one provider, written by its actor.
#[derive(Debug, Default)]
pub struct ProviderStats {
    /// Calls let through to the provider (attempts, retries included).
    pub admitted: AtomicU64,
    /// Calls the provider answered successfully.
    pub succeeded: AtomicU64,
    /// Calls that failed at the provider or on the way to it.
    pub failed: AtomicU64,
    /// Calls the caller gave up on before they finished.
    pub abandoned: AtomicU64,
    /// Retries decided.
    pub retries: AtomicU64,
    /// Rate-limit answers (429) from the provider.
    pub rate_limited: AtomicU64,
    /// Calls refused by troupe's own budget, concurrency limit or queue bound.
    pub throttled: AtomicU64,
    /// Calls refused because the breaker was open.
    pub breaker_rejections: AtomicU64,
    /// Times the breaker opened.
    pub breaker_opened: AtomicU64,
    /// Calls that moved on from this provider to a fallback.
    pub fallbacks: AtomicU64,
    /// Latency of finished calls: counts per bucket of [`LATENCY_BUCKETS_SECS`] (last is +Inf).
    pub latency_buckets: [AtomicU64; LATENCY_BUCKETS_SECS.len() + 1],
    /// Sum of those latencies, in microseconds.
    pub latency_micros_sum: AtomicU64,
}

impl ProviderStats {
    /// Records the latency of one finished call.
    pub fn record_latency(&self, latency: Duration) {
        let secs = latency.as_secs_f64();
        let bucket = LATENCY_BUCKETS_SECS
            .iter()
            .position(|bound| secs <= *bound)
            .unwrap_or(LATENCY_BUCKETS_SECS.len());
        self.latency_buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.latency_micros_sum.fetch_add(
            u64::try_from(latency.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// The counters as plain numbers.
    pub fn counters(&self) -> ProviderCounters {
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        ProviderCounters {
            admitted: get(&self.admitted),
            succeeded: get(&self.succeeded),
            failed: get(&self.failed),
            abandoned: get(&self.abandoned),
            retries: get(&self.retries),
            rate_limited: get(&self.rate_limited),
            throttled: get(&self.throttled),
            breaker_rejections: get(&self.breaker_rejections),
            breaker_opened: get(&self.breaker_opened),
            fallbacks: get(&self.fallbacks),
            latency_buckets: self.latency_buckets.iter().map(get).collect(),
            latency_seconds_sum: get(&self.latency_micros_sum) as f64 / 1e6,
        }
    }
}

pub(super) fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// [`ProviderStats`] read at one moment.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProviderCounters {
    /// Calls let through.
    pub admitted: u64,
    /// Successful answers.
    pub succeeded: u64,
    /// Failed calls.
    pub failed: u64,
    /// Calls given up by their caller.
    pub abandoned: u64,
    /// Retries.
    pub retries: u64,
    /// 429s from the provider.
    pub rate_limited: u64,
    /// Refusals by the local budget, concurrency limit or queue bound.
    pub throttled: u64,
    /// Refusals by the open breaker.
    pub breaker_rejections: u64,
    /// Breaker openings.
    pub breaker_opened: u64,
    /// Moves to a fallback.
    pub fallbacks: u64,
    /// Latency histogram counts, per bucket of [`LATENCY_BUCKETS_SECS`] then +Inf.
    pub latency_buckets: Vec<u64>,
    /// Sum of latencies, in seconds.
    pub latency_seconds_sum: f64,
}

/// One failure a provider remembers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ErrorRecord {
    /// When it was reported.
    pub at: Timestamp,
    /// The model called.
    pub model: String,
    /// What kind of failure.
    pub kind: ErrorKind,
    /// The HTTP status, when there was one.
    pub status: Option<u16>,
    /// What happened, in one line.
    pub message: String,
}

/// The policy state as the actor last left it.
#[derive(Debug, Clone)]
pub struct ProviderSnapshot {
    /// The budget.
    pub budget: Budget,
    /// The breaker's state.
    pub breaker: BreakerView,
    /// Calls in flight.
    pub in_flight: usize,
    /// Calls waiting.
    pub queued: usize,
    /// Recent failures, oldest first.
    pub recent_errors: Arc<[ErrorRecord]>,
}

/// What `/v1/providers` shows of one provider.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProviderStatus {
    /// The configured name.
    pub name: String,
    /// Models it serves (empty: any asked for by name).
    pub models: Vec<String>,
    /// Its fallback chain, as `provider/model`.
    pub fallback: Vec<String>,
    /// Its budget.
    pub budget: BudgetStatus,
    /// Its breaker.
    pub breaker: BreakerStatus,
    /// Calls in flight now.
    pub in_flight: usize,
    /// The concurrency limit.
    pub max_concurrency: usize,
    /// Calls waiting for budget or a slot.
    pub queued: usize,
    /// Counters since the node started.
    pub counters: ProviderCounters,
    /// Recent failures, newest last.
    pub recent_errors: Vec<ErrorRecord>,
}

/// Budget limits and what is left of them (`None`: unlimited).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct BudgetStatus {
    /// Requests per minute.
    pub rpm: Option<u32>,
    /// Tokens per minute.
    pub tpm: Option<u32>,
    /// Requests available now.
    pub requests_left: Option<u32>,
    /// Tokens available now.
    pub tokens_left: Option<u32>,
}

/// A breaker's state for display.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct BreakerStatus {
    /// `closed`, `open` or `half_open`.
    pub state: &'static str,
    /// While open: milliseconds until it lets a probe through.
    pub retry_in_ms: Option<u64>,
}

/// The parts of a provider that outlive one instance of its actor and that others read.
#[derive(Debug)]
pub struct ProviderShared {
    /// The provider's configuration.
    pub spec: Arc<ProviderSpec>,
    /// Counters.
    pub stats: ProviderStats,
    snapshot: ArcSwap<ProviderSnapshot>,
}

impl ProviderShared {
    /// A provider with a full budget and a closed breaker at `now`.
    pub fn new(spec: Arc<ProviderSpec>, now: Instant) -> Self {
        let policy = super::ProviderPolicy::new(spec.policy, now);
        let snapshot = ProviderSnapshot {
            budget: policy.budget,
            breaker: policy.breaker.view(),
            in_flight: 0,
            queued: 0,
            recent_errors: Arc::from(Vec::new()),
        };
        Self {
            spec,
            stats: ProviderStats::default(),
            snapshot: ArcSwap::from_pointee(snapshot),
        }
    }

    /// The last snapshot the actor left.
    pub fn snapshot(&self) -> Arc<ProviderSnapshot> {
        self.snapshot.load_full()
    }

    /// Replaces the snapshot (the provider's actor only).
    pub(super) fn store(&self, snapshot: ProviderSnapshot) {
        self.snapshot.store(Arc::new(snapshot));
    }

    /// The provider as `/v1/providers` shows it at `now`.
    pub fn status(&self, now: Instant) -> ProviderStatus {
        let snapshot = self.snapshot();
        let spec = &self.spec;
        let remaining = snapshot.budget.remaining(now);
        let breaker = snapshot.breaker.state(now);
        ProviderStatus {
            name: spec.name.clone(),
            models: spec.models.clone(),
            fallback: spec.fallback.iter().map(ToString::to_string).collect(),
            budget: BudgetStatus {
                rpm: spec.policy.budget.rpm,
                tpm: spec.policy.budget.tpm,
                requests_left: remaining.requests,
                tokens_left: remaining.tokens,
            },
            breaker: BreakerStatus {
                state: breaker.name(),
                retry_in_ms: match breaker {
                    BreakerState::Open { retry_in } => {
                        Some(u64::try_from(retry_in.as_millis()).unwrap_or(u64::MAX))
                    }
                    BreakerState::Closed | BreakerState::HalfOpen => None,
                },
            },
            in_flight: snapshot.in_flight,
            max_concurrency: spec.max_concurrency,
            queued: snapshot.queued,
            counters: self.stats.counters(),
            recent_errors: snapshot.recent_errors.to_vec(),
        }
    }
}

/// The last [`RECENT_ERRORS`] failures, oldest first.
#[derive(Debug, Default)]
pub(super) struct RecentErrors {
    errors: VecDeque<ErrorRecord>,
    shared: Option<Arc<[ErrorRecord]>>,
}

impl RecentErrors {
    pub(super) fn push(&mut self, record: ErrorRecord) {
        if self.errors.len() == RECENT_ERRORS {
            self.errors.pop_front();
        }
        self.errors.push_back(record);
        self.shared = None;
    }

    /// The errors as a shared slice, rebuilt only after a change.
    pub(super) fn shared(&mut self) -> Arc<[ErrorRecord]> {
        self.shared
            .get_or_insert_with(|| self.errors.iter().cloned().collect())
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latencies_land_in_their_buckets() {
        let stats = ProviderStats::default();
        stats.record_latency(Duration::from_millis(10));
        stats.record_latency(Duration::from_millis(100));
        stats.record_latency(Duration::from_secs(600));
        let counters = stats.counters();
        assert_eq!(counters.latency_buckets[0], 1);
        assert_eq!(
            counters.latency_buckets[1], 1,
            "0.1 s is inside the 0.1 bucket"
        );
        assert_eq!(counters.latency_buckets[LATENCY_BUCKETS_SECS.len()], 1);
        assert!((counters.latency_seconds_sum - 600.11).abs() < 1e-6);
    }

    #[test]
    fn recent_errors_keep_the_newest() {
        let mut recent = RecentErrors::default();
        for index in 0..RECENT_ERRORS + 3 {
            recent.push(ErrorRecord {
                at: Timestamp::now(),
                model: format!("m{index}"),
                kind: ErrorKind::ServerError,
                status: Some(500),
                message: String::new(),
            });
        }
        let shared = recent.shared();
        assert_eq!(shared.len(), RECENT_ERRORS);
        assert_eq!(shared[0].model, "m3");
        assert_eq!(
            shared[RECENT_ERRORS - 1].model,
            format!("m{}", RECENT_ERRORS + 2)
        );
    }
}
