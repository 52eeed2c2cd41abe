//! What the fake remembers between requests: arrivals, status counts, `fail-…-then-ok`
//! counters, behaviours set at run time, and one rate limiter per model.
//!
//! One `std` mutex guards it all: every critical section is a few map operations and none is
//! held across an `.await`. This is a test double read by the test that owns it, not an actor.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use super::behaviour::Behaviour;
use super::bucket::{LimitSnapshot, RateLimiter, Refusal};
use super::{Arrival, FakeConfig};

/// State shared by the handlers and the [`FakeProviderHandle`](super::FakeProviderHandle).
#[derive(Debug)]
pub(super) struct Shared {
    pub(super) config: FakeConfig,
    records: Mutex<Records>,
    next_id: AtomicU64,
}

#[derive(Debug, Default)]
struct Records {
    arrivals: Vec<Arrival>,
    counts: BTreeMap<u16, u64>,
    /// Failures served so far per `x-fake-key` (or model), for `fail-…-then-ok`.
    failures_served: HashMap<String, u32>,
    /// Behaviours set with `set_behaviour`, per model.
    overrides: HashMap<String, Behaviour>,
    limiters: HashMap<String, RateLimiter>,
}

impl Shared {
    pub(super) fn new(config: FakeConfig) -> Self {
        Self {
            config,
            records: Mutex::default(),
            next_id: AtomicU64::new(1),
        }
    }

    fn records(&self) -> MutexGuard<'_, Records> {
        // A panicking test thread cannot leave these maps half-updated in a way that matters.
        self.records.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A fresh id for a completion.
    pub(super) fn next_id(&self) -> String {
        format!("fake{:06}", self.next_id.fetch_add(1, Ordering::Relaxed))
    }

    pub(super) fn record_arrival(&self, arrival: Arrival) {
        self.records().arrivals.push(arrival);
    }

    pub(super) fn count_status(&self, status: u16) {
        *self.records().counts.entry(status).or_default() += 1;
    }

    pub(super) fn arrivals(&self) -> Vec<Arrival> {
        self.records().arrivals.clone()
    }

    pub(super) fn counts(&self) -> BTreeMap<u16, u64> {
        self.records().counts.clone()
    }

    /// Back to the state just after start: no arrivals, counts, counters or overrides, and
    /// full rate limits.
    pub(super) fn reset(&self) {
        *self.records() = Records::default();
    }

    pub(super) fn set_behaviour(&self, model: String, behaviour: Behaviour) {
        self.records().overrides.insert(model, behaviour);
    }

    pub(super) fn clear_behaviour(&self, model: &str) {
        self.records().overrides.remove(model);
    }

    pub(super) fn override_for(&self, model: &str) -> Option<Behaviour> {
        self.records().overrides.get(model).cloned()
    }

    /// Resolves `fail-…-then-ok` for a request with `key`: its failure while fewer than `times`
    /// were served for the key, then success.
    pub(super) fn settle(&self, behaviour: Behaviour, key: &str) -> Behaviour {
        let mut behaviour = behaviour;
        while let Behaviour::FailThenOk { first, times } = behaviour {
            let mut records = self.records();
            let served = records.failures_served.entry(key.to_owned()).or_default();
            behaviour = if *served < times {
                *served += 1;
                *first
            } else {
                Behaviour::Success
            };
        }
        behaviour
    }

    /// Takes one request and `tokens` tokens from `model`'s limits.
    pub(super) fn admit(
        &self,
        model: &str,
        tokens: u64,
        now: Instant,
    ) -> Result<LimitSnapshot, (Refusal, LimitSnapshot)> {
        let (rpm, tpm) = (self.config.rpm, self.config.tpm);
        self.records()
            .limiters
            .entry(model.to_owned())
            .or_insert_with(|| RateLimiter::new(rpm, tpm, now))
            .admit(now, tokens)
    }
}
