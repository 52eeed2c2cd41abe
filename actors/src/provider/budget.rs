//! The dual requests-per-minute / tokens-per-minute budget of one provider.
//!
//! Two token buckets refilling continuously, in exact integer arithmetic: reserve an estimate
//! before a call, reconcile it from the reported usage. It never reads a clock and never
//! sleeps: every method takes `now`, and a caller that must wait is told for how long.
//!
//! This is the user's own limit for the whole provider. What the provider's rate-limit headers
//! say is left is per model (OpenAI's and Anthropic's limits are), and is followed per model
//! by [`ModelLimits`](super::model_limits::ModelLimits), never here.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Limits of a [`Budget`]; `None` is unlimited.
///
/// Field names are the ones of a `[[providers]]` table (`rpm = 500`, `tpm = 200000`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetConfig {
    /// Requests per minute. `Some(0)` refuses every request as [`BudgetError::TooLarge`].
    pub rpm: Option<u32>,
    /// Tokens per minute. A request estimated above it is [`BudgetError::TooLarge`].
    pub tpm: Option<u32>,
}

/// Which dimension of the budget is short.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WaitReason {
    /// Requests per minute.
    Requests,
    /// Tokens per minute.
    Tokens,
}

/// "Not now": the budget will have room after `retry_in`, if nothing else takes it first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wait {
    /// How long until the reservation would succeed.
    pub retry_in: Duration,
    /// The dimension that is short (the one with the longer wait when both are).
    pub reason: WaitReason,
}

/// What a caller does with a [`Wait`], given how long it may wait in total.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitDecision {
    /// Wait this long, then try to reserve again.
    WaitFor(Duration),
    /// Waiting would exceed the allowance: answer the caller now (a 429 with this Retry-After).
    GiveUp {
        /// When the budget would have had room.
        retry_after: Duration,
    },
}

impl Wait {
    /// Waits if the wait still fits in `max_wait` after `waited_so_far`, else gives up.
    pub fn decide(&self, max_wait: Duration, waited_so_far: Duration) -> WaitDecision {
        match waited_so_far.checked_add(self.retry_in) {
            Some(total) if total <= max_wait => WaitDecision::WaitFor(self.retry_in),
            _ => WaitDecision::GiveUp {
                retry_after: self.retry_in,
            },
        }
    }
}

/// Why a reservation was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BudgetError {
    /// Not enough budget now; there will be after the wait.
    #[error("provider budget short of {:?}; retry in {:?}", .0.reason, .0.retry_in)]
    Wait(Wait),
    /// The request needs more than the whole per-minute budget: it can never be admitted, so the
    /// caller must neither wait nor retry (try a fallback, or shrink the request).
    #[error(
        "the request needs {needed} {dimension:?} but the whole per-minute budget is {limit}; \
         shrink the request or raise the provider's limit"
    )]
    TooLarge {
        /// The dimension that is too small.
        dimension: WaitReason,
        /// What the request needs.
        needed: u32,
        /// The per-minute limit.
        limit: u32,
    },
}

/// Budget taken by one call: one request and an estimate of its tokens.
///
/// Give it back exactly once, through [`Budget::reconcile`] (the call reached the provider) or
/// [`Budget::release`] (it never did). Dropping it keeps the estimate charged.
#[must_use = "a reservation must be reconciled or released"]
#[derive(Debug, PartialEq, Eq)]
pub struct Reservation {
    tokens: u32,
}

impl Reservation {
    /// The estimated tokens this reservation holds.
    pub fn tokens(&self) -> u32 {
        self.tokens
    }
}

/// What is left, for display; `None` is unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BudgetRemaining {
    /// Whole requests available now.
    pub requests: Option<u32>,
    /// Whole tokens available now.
    pub tokens: Option<u32>,
}

/// A provider's dual budget. See the module documentation.
#[derive(Debug, Clone)]
pub struct Budget {
    config: BudgetConfig,
    requests: Dimension,
    tokens: Dimension,
}

impl Budget {
    /// A full budget at `now`.
    pub fn new(config: BudgetConfig, now: Instant) -> Self {
        Self {
            config,
            requests: Dimension::new(config.rpm, now),
            tokens: Dimension::new(config.tpm, now),
        }
    }

    /// The limits.
    pub fn config(&self) -> BudgetConfig {
        self.config
    }

    /// Reserves one request and `estimate_tokens`, or says how long to wait, or that the request
    /// can never fit. Nothing is taken unless both dimensions have room.
    pub fn try_reserve(
        &mut self,
        estimate_tokens: u32,
        now: Instant,
    ) -> Result<Reservation, BudgetError> {
        if let Some(limit) = self.config.rpm
            && limit == 0
        {
            return Err(BudgetError::TooLarge {
                dimension: WaitReason::Requests,
                needed: 1,
                limit,
            });
        }
        if let Some(limit) = self.config.tpm
            && estimate_tokens > limit
        {
            return Err(BudgetError::TooLarge {
                dimension: WaitReason::Tokens,
                needed: estimate_tokens,
                limit,
            });
        }
        self.requests.refill(now);
        self.tokens.refill(now);
        let request_wait = self.requests.wait_for(1);
        let token_wait = self.tokens.wait_for(estimate_tokens);
        if request_wait.is_zero() && token_wait.is_zero() {
            self.requests.take(1);
            self.tokens.take(estimate_tokens);
            return Ok(Reservation {
                tokens: estimate_tokens,
            });
        }
        let wait = if token_wait > request_wait {
            Wait {
                retry_in: token_wait,
                reason: WaitReason::Tokens,
            }
        } else {
            Wait {
                retry_in: request_wait,
                reason: WaitReason::Requests,
            }
        };
        Err(BudgetError::Wait(wait))
    }

    /// The call reached the provider and used `actual_tokens`: refund what the estimate had over
    /// that, or charge what it had under (never below zero). The request stays spent.
    pub fn reconcile(&mut self, reservation: Reservation, actual_tokens: u32, now: Instant) {
        self.tokens.refill(now);
        if actual_tokens > reservation.tokens {
            self.tokens.take(actual_tokens - reservation.tokens);
        } else {
            self.tokens.give_back(reservation.tokens - actual_tokens);
        }
    }

    /// The call never reached the provider: give the request and the tokens back.
    pub fn release(&mut self, reservation: Reservation, now: Instant) {
        self.requests.refill(now);
        self.tokens.refill(now);
        self.requests.give_back(1);
        self.tokens.give_back(reservation.tokens);
    }

    /// What is left at `now`, in whole units.
    pub fn remaining(&self, now: Instant) -> BudgetRemaining {
        BudgetRemaining {
            requests: self.requests.remaining(now),
            tokens: self.tokens.remaining(now),
        }
    }
}

/// A bucket holds `capacity × NANOS_PER_MINUTE` at most, so refilling `capacity` per minute adds
/// exactly `capacity` per elapsed nanosecond: no rounding, no drift.
const NANOS_PER_MINUTE: u128 = 60_000_000_000;

/// One dimension of the budget.
#[derive(Debug, Clone, Copy)]
enum Dimension {
    /// No limit.
    Unlimited,
    /// A token bucket.
    Limited(Bucket),
}

impl Dimension {
    fn new(limit: Option<u32>, now: Instant) -> Self {
        match limit {
            None => Self::Unlimited,
            Some(capacity) => Self::Limited(Bucket::new_full(capacity, now)),
        }
    }

    fn refill(&mut self, now: Instant) {
        if let Self::Limited(bucket) = self {
            bucket.refill(now);
        }
    }

    /// Wait until `units` are available; zero when they are now. Call after `refill(now)`.
    fn wait_for(&self, units: u32) -> Duration {
        match self {
            Self::Unlimited => Duration::ZERO,
            Self::Limited(bucket) => bucket.wait_for(scaled(units)),
        }
    }

    fn take(&mut self, units: u32) {
        if let Self::Limited(bucket) = self {
            bucket.level = bucket.level.saturating_sub(scaled(units));
        }
    }

    fn give_back(&mut self, units: u32) {
        if let Self::Limited(bucket) = self {
            bucket.level = bucket
                .level
                .saturating_add(scaled(units))
                .min(bucket.full_level());
        }
    }

    fn remaining(&self, now: Instant) -> Option<u32> {
        match self {
            Self::Unlimited => None,
            Self::Limited(bucket) => {
                let mut bucket = *bucket;
                bucket.refill(now);
                Some(u32::try_from(bucket.level / NANOS_PER_MINUTE).unwrap_or(u32::MAX))
            }
        }
    }
}

/// A token bucket refilling `capacity` units per minute, continuously.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    capacity: u32,
    /// Units × `NANOS_PER_MINUTE`.
    level: u128,
    /// When `level` was last brought up to date.
    updated: Instant,
}

impl Bucket {
    fn new_full(capacity: u32, now: Instant) -> Self {
        Self {
            capacity,
            level: scaled(capacity),
            updated: now,
        }
    }

    fn full_level(&self) -> u128 {
        scaled(self.capacity)
    }

    /// Brings the level up to `now`. A `now` earlier than the last update changes nothing.
    fn refill(&mut self, now: Instant) {
        let now = now.max(self.updated);
        let elapsed = now.saturating_duration_since(self.updated).as_nanos();
        let added = elapsed.saturating_mul(u128::from(self.capacity));
        self.level = self.level.saturating_add(added).min(self.full_level());
        self.updated = now;
    }

    /// How long until `need` scaled units are in the bucket; call after `refill(now)`.
    /// `need` is at most a full bucket (the caller refuses larger requests).
    fn wait_for(&self, need: u128) -> Duration {
        if self.level >= need {
            return Duration::ZERO;
        }
        if self.capacity == 0 {
            return Duration::MAX;
        }
        let deficit = need - self.level;
        duration_from_nanos(deficit.div_ceil(u128::from(self.capacity)))
    }
}

fn scaled(units: u32) -> u128 {
    u128::from(units) * NANOS_PER_MINUTE
}

fn duration_from_nanos(nanos: u128) -> Duration {
    const NANOS_PER_SEC: u128 = 1_000_000_000;
    match u64::try_from(nanos / NANOS_PER_SEC) {
        // The remainder is below 10^9, so it fits.
        Ok(secs) => Duration::new(secs, (nanos % NANOS_PER_SEC) as u32),
        Err(_) => Duration::MAX,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: Duration = Duration::from_secs(1);

    fn ms(millis: u64) -> Duration {
        Duration::from_millis(millis)
    }

    fn budget(rpm: Option<u32>, tpm: Option<u32>) -> (Budget, Instant) {
        let t0 = Instant::now();
        (Budget::new(BudgetConfig { rpm, tpm }, t0), t0)
    }

    fn wait(result: Result<Reservation, BudgetError>) -> Wait {
        match result {
            Err(BudgetError::Wait(wait)) => wait,
            other => panic!("expected a wait, got {other:?}"),
        }
    }

    #[test]
    fn a_new_budget_is_full() {
        let (budget, t0) = budget(Some(500), Some(200_000));
        assert_eq!(
            budget.remaining(t0),
            BudgetRemaining {
                requests: Some(500),
                tokens: Some(200_000)
            }
        );
    }

    #[test]
    fn none_is_unlimited() {
        let (mut budget, t0) = budget(None, None);
        for _ in 0..10_000 {
            let reservation = budget.try_reserve(u32::MAX, t0).expect("unlimited");
            budget.reconcile(reservation, u32::MAX, t0);
        }
        assert_eq!(
            budget.remaining(t0),
            BudgetRemaining {
                requests: None,
                tokens: None
            }
        );
    }

    #[test]
    fn requests_run_out_and_refill_one_every_60_over_rpm_seconds() {
        let (mut budget, t0) = budget(Some(3), None);
        for _ in 0..3 {
            let _kept = budget.try_reserve(0, t0).expect("room");
        }
        let refused = wait(budget.try_reserve(0, t0));
        assert_eq!(refused.reason, WaitReason::Requests);
        assert_eq!(refused.retry_in, 20 * SEC);
        // Exact: one nanosecond early is still too early, on time is enough.
        let early = wait(budget.try_reserve(0, t0 + 20 * SEC - Duration::from_nanos(1)));
        assert_eq!(early.retry_in, Duration::from_nanos(1));
        assert!(budget.try_reserve(0, t0 + 20 * SEC).is_ok());
        assert_eq!(budget.remaining(t0 + 20 * SEC).requests, Some(0));
    }

    #[test]
    fn tokens_refill_continuously_and_stop_at_full() {
        let (mut budget, t0) = budget(None, Some(60_000)); // 1000 tokens per second
        let _all = budget.try_reserve(60_000, t0).expect("room");
        assert_eq!(budget.remaining(t0).tokens, Some(0));
        assert_eq!(budget.remaining(t0 + ms(250)).tokens, Some(250));
        assert_eq!(budget.remaining(t0 + ms(1500)).tokens, Some(1500));
        assert_eq!(budget.remaining(t0 + 59 * SEC).tokens, Some(59_000));
        assert_eq!(budget.remaining(t0 + 60 * SEC).tokens, Some(60_000));
        assert_eq!(budget.remaining(t0 + 3600 * SEC).tokens, Some(60_000));
        let refused = wait(budget.try_reserve(10, t0));
        assert_eq!(refused.reason, WaitReason::Tokens);
        assert_eq!(refused.retry_in, ms(10));
    }

    #[test]
    fn the_longer_wait_wins_and_a_refusal_takes_nothing() {
        let (mut budget, t0) = budget(Some(60), Some(600)); // 1 request/s, 10 tokens/s
        let _big = budget.try_reserve(600, t0).expect("room");
        for _ in 0..59 {
            let _small = budget.try_reserve(0, t0).expect("room");
        }
        // Short of both: a request in 1 s, 50 tokens in 5 s.
        let refused = wait(budget.try_reserve(50, t0));
        assert_eq!(
            (refused.reason, refused.retry_in),
            (WaitReason::Tokens, 5 * SEC)
        );
        // Short of requests only.
        let refused = wait(budget.try_reserve(0, t0 + ms(500)));
        assert_eq!(
            (refused.reason, refused.retry_in),
            (WaitReason::Requests, ms(500))
        );
        // Short of tokens only.
        let refused = wait(budget.try_reserve(50, t0 + 2 * SEC));
        assert_eq!(
            (refused.reason, refused.retry_in),
            (WaitReason::Tokens, 3 * SEC)
        );
        assert_eq!(
            budget.remaining(t0 + 2 * SEC),
            BudgetRemaining {
                requests: Some(2),
                tokens: Some(20)
            },
            "refusals took nothing"
        );
        assert!(budget.try_reserve(50, t0 + 5 * SEC).is_ok());
        assert_eq!(
            budget.remaining(t0 + 5 * SEC),
            BudgetRemaining {
                requests: Some(4),
                tokens: Some(0)
            }
        );
    }

    #[test]
    fn a_request_larger_than_the_whole_budget_is_too_large_even_when_full() {
        let (mut budget, t0) = budget(Some(10), Some(1000));
        assert_eq!(
            budget.try_reserve(1001, t0),
            Err(BudgetError::TooLarge {
                dimension: WaitReason::Tokens,
                needed: 1001,
                limit: 1000
            })
        );
        assert_eq!(budget.remaining(t0).tokens, Some(1000), "nothing taken");
        assert!(
            budget.try_reserve(1000, t0).is_ok(),
            "exactly the budget fits"
        );
        let (mut zero, t0) = self::budget(Some(0), None);
        assert!(matches!(
            zero.try_reserve(0, t0),
            Err(BudgetError::TooLarge {
                dimension: WaitReason::Requests,
                ..
            })
        ));
        let message = budget
            .try_reserve(5000, t0)
            .expect_err("too large")
            .to_string();
        assert!(
            message.contains("5000") && message.contains("1000"),
            "{message}"
        );
    }

    #[test]
    fn zero_token_requests_pass_a_zero_token_budget() {
        let (mut budget, t0) = budget(None, Some(0));
        assert!(budget.try_reserve(0, t0).is_ok());
        assert!(matches!(
            budget.try_reserve(1, t0),
            Err(BudgetError::TooLarge { .. })
        ));
    }

    #[test]
    fn reconcile_refunds_an_overestimate_and_charges_an_underestimate() {
        let (mut budget, t0) = budget(Some(100), Some(1000));
        let reservation = budget.try_reserve(500, t0).expect("room");
        assert_eq!(reservation.tokens(), 500);
        budget.reconcile(reservation, 200, t0);
        assert_eq!(budget.remaining(t0).tokens, Some(800));
        assert_eq!(
            budget.remaining(t0).requests,
            Some(99),
            "the request stays spent"
        );

        let reservation = budget.try_reserve(100, t0).expect("room");
        budget.reconcile(reservation, 400, t0);
        assert_eq!(budget.remaining(t0).tokens, Some(400));

        // An overrun past what is left empties the bucket; it never goes negative.
        let reservation = budget.try_reserve(0, t0).expect("room");
        budget.reconcile(reservation, 5000, t0);
        assert_eq!(budget.remaining(t0).tokens, Some(0));
        assert_eq!(budget.remaining(t0 + 6 * SEC).tokens, Some(100));
    }

    #[test]
    fn a_refund_never_overfills_the_bucket() {
        let (mut budget, t0) = budget(None, Some(600));
        let reservation = budget.try_reserve(300, t0).expect("room");
        // 30 s later the bucket refilled to full; the refund must not push it over.
        budget.reconcile(reservation, 0, t0 + 30 * SEC);
        assert_eq!(budget.remaining(t0 + 30 * SEC).tokens, Some(600));
    }

    #[test]
    fn release_gives_the_request_and_the_tokens_back() {
        let (mut budget, t0) = budget(Some(1), Some(100));
        let reservation = budget.try_reserve(70, t0).expect("room");
        assert!(budget.try_reserve(0, t0).is_err());
        budget.release(reservation, t0);
        assert_eq!(
            budget.remaining(t0),
            BudgetRemaining {
                requests: Some(1),
                tokens: Some(100)
            }
        );
    }

    #[test]
    fn huge_values_neither_overflow_nor_panic() {
        let (mut budget, t0) = budget(Some(u32::MAX), Some(u32::MAX));
        let all = budget.try_reserve(u32::MAX, t0).expect("fits exactly");
        let refused = wait(budget.try_reserve(1, t0));
        assert_eq!(
            refused.retry_in,
            Duration::from_nanos(60_000_000_000u64.div_ceil(u64::from(u32::MAX)))
        );
        budget.reconcile(all, 0, t0);
        assert_eq!(budget.remaining(t0).tokens, Some(u32::MAX));
        let far = t0 + Duration::from_secs(100 * 365 * 24 * 3600);
        assert_eq!(budget.remaining(far).tokens, Some(u32::MAX));
        let all = budget.try_reserve(u32::MAX, far).expect("full again");
        budget.reconcile(all, u32::MAX, far);
        assert_eq!(budget.remaining(far).tokens, Some(0));
        assert_eq!(budget.remaining(far + 60 * SEC).tokens, Some(u32::MAX));
    }

    #[test]
    fn time_going_backwards_changes_nothing() {
        let (mut budget, t0) = budget(Some(60), None);
        let later = t0 + 10 * SEC;
        let _r = budget.try_reserve(0, later).expect("room");
        assert_eq!(budget.remaining(t0).requests, Some(59));
        let _r = budget.try_reserve(0, t0).expect("room");
        assert_eq!(budget.remaining(later).requests, Some(58));
    }

    #[test]
    fn wait_decides_between_waiting_and_giving_up() {
        let wait = Wait {
            retry_in: 10 * SEC,
            reason: WaitReason::Tokens,
        };
        assert_eq!(
            wait.decide(60 * SEC, Duration::ZERO),
            WaitDecision::WaitFor(10 * SEC)
        );
        assert_eq!(
            wait.decide(60 * SEC, 50 * SEC),
            WaitDecision::WaitFor(10 * SEC)
        );
        assert_eq!(
            wait.decide(60 * SEC, 51 * SEC),
            WaitDecision::GiveUp {
                retry_after: 10 * SEC
            }
        );
        assert_eq!(
            wait.decide(5 * SEC, Duration::ZERO),
            WaitDecision::GiveUp {
                retry_after: 10 * SEC
            }
        );
        assert_eq!(
            wait.decide(Duration::MAX, Duration::MAX),
            WaitDecision::GiveUp {
                retry_after: 10 * SEC
            },
            "no overflow"
        );
    }

    #[test]
    fn config_reads_the_providers_table_keys() {
        let config: BudgetConfig =
            serde_json::from_str(r#"{"rpm": 500, "tpm": 200000}"#).expect("valid");
        assert_eq!(
            config,
            BudgetConfig {
                rpm: Some(500),
                tpm: Some(200_000)
            }
        );
        let config: BudgetConfig = serde_json::from_str("{}").expect("valid");
        assert_eq!(config, BudgetConfig::default());
        assert!(serde_json::from_str::<BudgetConfig>(r#"{"rpn": 5}"#).is_err());
    }
}
