//! The retry schedule of provider calls: jittered exponential backoff that honours the
//! provider's own hint (`retry-after`, `retry-after-ms`, Gemini's `RetryInfo`).
//!
//! Pure: given the failed attempt, the hint, whether the error can succeed on a retry, a jitter
//! sample and the time already spent, it answers "retry after this delay" or "give up, because".
//! It never sleeps and never retries what the classification says cannot succeed.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Retry settings; the keys of a provider's `retry = { … }` table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryConfig {
    /// Attempts in all, the first call included (4 = one call and up to three retries).
    pub max_attempts: u32,
    /// Backoff step of the first retry, in milliseconds; it doubles for each further one.
    pub base_ms: u64,
    /// Cap of the backoff step, in milliseconds (a provider's hint may exceed it).
    pub max_delay_ms: u64,
    /// Time a call may spend waiting between its attempts in all, in seconds; a provider asking
    /// for longer is given up on at once.
    pub max_wait_secs: u64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            max_attempts: 4,
            base_ms: 250,
            max_delay_ms: 8000,
            max_wait_secs: 60,
        }
    }
}

/// What to do after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryDecision {
    /// Wait this long, then make the next attempt.
    RetryAfter(Duration),
    /// Stop; the error goes to the caller (or the fallback chain).
    GiveUp(GiveUpReason),
}

/// Why retrying stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GiveUpReason {
    /// The error cannot succeed on a retry (exhausted quota, a request too large, context
    /// overflow, other 4xx).
    NotRetryable,
    /// This many attempts were made, the configured maximum.
    AttemptsExhausted {
        /// Attempts made.
        attempts: u32,
    },
    /// The provider asks to wait longer than a call may wait in all.
    HintTooLong {
        /// What the provider asked for.
        hint: Duration,
        /// The allowance.
        max_wait: Duration,
    },
    /// The next wait would take the call past its waiting allowance.
    OutOfTime {
        /// Waited so far.
        waited: Duration,
        /// The next wait.
        next_delay: Duration,
        /// The allowance.
        max_wait: Duration,
    },
}

impl fmt::Display for GiveUpReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotRetryable => f.write_str("the error cannot succeed on a retry"),
            Self::AttemptsExhausted { attempts } => write!(f, "gave up after {attempts} attempts"),
            Self::HintTooLong { hint, max_wait } => {
                write!(
                    f,
                    "the provider asks to wait {hint:?}, more than the allowed {max_wait:?}"
                )
            }
            Self::OutOfTime {
                waited,
                next_delay,
                max_wait,
            } => write!(
                f,
                "waited {waited:?} already; another {next_delay:?} would pass the allowed {max_wait:?}"
            ),
        }
    }
}

/// The retry schedule. See the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RetryPolicy {
    config: RetryConfig,
}

impl RetryPolicy {
    /// A schedule with these settings.
    pub fn new(config: RetryConfig) -> Self {
        Self { config }
    }

    /// The settings.
    pub fn config(&self) -> RetryConfig {
        self.config
    }

    /// The waiting allowance of one call.
    pub fn max_wait(&self) -> Duration {
        Duration::from_secs(self.config.max_wait_secs)
    }

    /// The backoff before retrying after failed attempt number `attempt` (1 for the first
    /// call), with `jitter` in `[0, 1)`: "equal jitter", a delay in the upper half of the step
    /// `base × 2^(attempt-1)` capped at `max_delay`.
    pub fn backoff(&self, attempt: u32, jitter: f64) -> Duration {
        let base = Duration::from_millis(self.config.base_ms);
        let cap = Duration::from_millis(self.config.max_delay_ms);
        let doublings = attempt.saturating_sub(1).min(31);
        let step = base.saturating_mul(1u32 << doublings).min(cap);
        let jitter = if jitter.is_finite() {
            jitter.clamp(0.0, 1.0)
        } else {
            0.0
        };
        let half = step / 2;
        (half + (step - half).mul_f64(jitter)).min(step)
    }

    /// After failed attempt number `attempt` (1 for the first call): retry, and after how long,
    /// or give up. `hint` is the provider's own "retry after"; the wait is at least that long.
    /// `elapsed_so_far` is the time this call has already spent waiting between attempts.
    pub fn next(
        &self,
        attempt: u32,
        hint: Option<Duration>,
        retryable: bool,
        jitter: f64,
        elapsed_so_far: Duration,
    ) -> RetryDecision {
        if !retryable {
            return RetryDecision::GiveUp(GiveUpReason::NotRetryable);
        }
        let max_attempts = self.config.max_attempts.max(1);
        if attempt >= max_attempts {
            return RetryDecision::GiveUp(GiveUpReason::AttemptsExhausted { attempts: attempt });
        }
        let max_wait = self.max_wait();
        if let Some(hint) = hint
            && hint > max_wait
        {
            return RetryDecision::GiveUp(GiveUpReason::HintTooLong { hint, max_wait });
        }
        let delay = self
            .backoff(attempt, jitter)
            .max(hint.unwrap_or(Duration::ZERO));
        match elapsed_so_far.checked_add(delay) {
            Some(total) if total <= max_wait => RetryDecision::RetryAfter(delay),
            _ => RetryDecision::GiveUp(GiveUpReason::OutOfTime {
                waited: elapsed_so_far,
                next_delay: delay,
                max_wait,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(millis: u64) -> Duration {
        Duration::from_millis(millis)
    }

    fn policy() -> RetryPolicy {
        RetryPolicy::new(RetryConfig::default())
    }

    #[test]
    fn what_is_not_retryable_is_never_retried() {
        for hint in [None, Some(ms(1))] {
            assert_eq!(
                policy().next(1, hint, false, 0.5, Duration::ZERO),
                RetryDecision::GiveUp(GiveUpReason::NotRetryable)
            );
        }
    }

    #[test]
    fn max_attempts_counts_the_first_call() {
        let policy = policy();
        for attempt in 1..4 {
            assert!(matches!(
                policy.next(attempt, None, true, 0.0, Duration::ZERO),
                RetryDecision::RetryAfter(_)
            ));
        }
        assert_eq!(
            policy.next(4, None, true, 0.0, Duration::ZERO),
            RetryDecision::GiveUp(GiveUpReason::AttemptsExhausted { attempts: 4 })
        );
        for max_attempts in [0, 1] {
            let once = RetryPolicy::new(RetryConfig {
                max_attempts,
                ..RetryConfig::default()
            });
            assert_eq!(
                once.next(1, None, true, 0.0, Duration::ZERO),
                RetryDecision::GiveUp(GiveUpReason::AttemptsExhausted { attempts: 1 }),
                "max_attempts = {max_attempts} means no retries"
            );
        }
    }

    #[test]
    fn backoff_doubles_with_equal_jitter_up_to_the_cap() {
        let policy = policy();
        let table = [
            (1, 250),
            (2, 500),
            (3, 1000),
            (4, 2000),
            (5, 4000),
            (6, 8000),
            (7, 8000),
            (40, 8000),
        ];
        for (attempt, step) in table {
            assert_eq!(
                policy.backoff(attempt, 0.0),
                ms(step / 2),
                "attempt {attempt}, no jitter"
            );
            let three_quarters = Duration::from_micros(step * 750);
            assert_eq!(
                policy.backoff(attempt, 0.5),
                three_quarters,
                "attempt {attempt}, half"
            );
            let top = policy.backoff(attempt, 0.999_999);
            assert!(
                top < ms(step) && top > ms(step * 99 / 100),
                "attempt {attempt}: {top:?}"
            );
        }
        assert_eq!(policy.backoff(u32::MAX, 0.0), ms(4000), "no overflow");
    }

    #[test]
    fn jitter_outside_the_unit_interval_is_clamped() {
        let policy = policy();
        assert_eq!(policy.backoff(1, -3.0), ms(125));
        assert_eq!(policy.backoff(1, f64::NAN), ms(125));
        assert_eq!(policy.backoff(1, f64::INFINITY), ms(125));
        assert_eq!(policy.backoff(1, 7.0), ms(250));
    }

    #[test]
    fn the_providers_hint_is_a_minimum() {
        let policy = policy();
        assert_eq!(
            policy.next(1, Some(Duration::from_secs(5)), true, 0.0, Duration::ZERO),
            RetryDecision::RetryAfter(Duration::from_secs(5))
        );
        assert_eq!(
            policy.next(1, Some(ms(10)), true, 0.0, Duration::ZERO),
            RetryDecision::RetryAfter(ms(125)),
            "a shorter hint does not shorten the backoff"
        );
        assert_eq!(
            policy.next(2, Some(Duration::from_secs(20)), true, 0.0, Duration::ZERO),
            RetryDecision::RetryAfter(Duration::from_secs(20)),
            "a hint above max_delay is honoured"
        );
    }

    #[test]
    fn a_hint_past_max_wait_gives_up_at_once() {
        let hint = Duration::from_secs(61);
        assert_eq!(
            policy().next(1, Some(hint), true, 0.0, Duration::ZERO),
            RetryDecision::GiveUp(GiveUpReason::HintTooLong {
                hint,
                max_wait: Duration::from_secs(60)
            })
        );
        assert_eq!(
            policy().next(1, Some(Duration::from_secs(60)), true, 0.0, Duration::ZERO),
            RetryDecision::RetryAfter(Duration::from_secs(60))
        );
    }

    #[test]
    fn the_total_wait_stays_within_max_wait() {
        let policy = policy();
        assert_eq!(
            policy.next(
                2,
                Some(Duration::from_secs(30)),
                true,
                0.0,
                Duration::from_secs(30)
            ),
            RetryDecision::RetryAfter(Duration::from_secs(30)),
            "exactly the allowance"
        );
        assert_eq!(
            policy.next(
                2,
                Some(Duration::from_secs(30)),
                true,
                0.0,
                Duration::from_secs(31)
            ),
            RetryDecision::GiveUp(GiveUpReason::OutOfTime {
                waited: Duration::from_secs(31),
                next_delay: Duration::from_secs(30),
                max_wait: Duration::from_secs(60)
            })
        );
        assert!(matches!(
            policy.next(2, None, true, 0.0, Duration::MAX),
            RetryDecision::GiveUp(GiveUpReason::OutOfTime { .. })
        ));
    }

    #[test]
    fn give_up_reasons_read_well() {
        assert_eq!(
            GiveUpReason::NotRetryable.to_string(),
            "the error cannot succeed on a retry"
        );
        assert_eq!(
            GiveUpReason::AttemptsExhausted { attempts: 4 }.to_string(),
            "gave up after 4 attempts"
        );
        let too_long = GiveUpReason::HintTooLong {
            hint: Duration::from_secs(90),
            max_wait: Duration::from_secs(60),
        };
        assert_eq!(
            too_long.to_string(),
            "the provider asks to wait 90s, more than the allowed 60s"
        );
        let out_of_time = GiveUpReason::OutOfTime {
            waited: Duration::from_secs(50),
            next_delay: Duration::from_secs(20),
            max_wait: Duration::from_secs(60),
        };
        assert!(out_of_time.to_string().contains("50s"), "{out_of_time}");
    }

    #[test]
    fn config_reads_the_design_table_and_defaults_the_rest() {
        let config: RetryConfig = serde_json::from_str(
            r#"{"max_attempts": 4, "base_ms": 250, "max_delay_ms": 8000, "max_wait_secs": 60}"#,
        )
        .expect("valid");
        assert_eq!(config, RetryConfig::default());
        let config: RetryConfig = serde_json::from_str(r#"{"max_attempts": 2}"#).expect("valid");
        assert_eq!(config.base_ms, 250);
        assert_eq!(RetryPolicy::new(config).config(), config);
        assert!(serde_json::from_str::<RetryConfig>(r#"{"attempts": 2}"#).is_err());
    }
}
