//! The fake's own requests-per-minute and tokens-per-minute limits, one pair per model.
//!
//! Two token buckets that refill continuously over a minute, as OpenAI describes its limits.
//! Pure: the caller passes `now`; rendering the numbers into headers and bodies is the
//! provider modules' job.

use std::time::{Duration, Instant};

/// One model's pair of buckets.
#[derive(Debug, Clone)]
pub(super) struct RateLimiter {
    requests: Bucket,
    tokens: Bucket,
}

/// Where both buckets stand after a decision.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct LimitSnapshot {
    pub(super) limit_requests: u64,
    pub(super) remaining_requests: u64,
    /// Time until the request bucket is full again.
    pub(super) reset_requests: Duration,
    pub(super) limit_tokens: u64,
    pub(super) remaining_tokens: u64,
    /// Time until the token bucket is full again.
    pub(super) reset_tokens: Duration,
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Refusal {
    /// No request left this minute; one will be back after `retry_in`.
    Requests { retry_in: Duration },
    /// Not enough tokens left for `requested`; enough will be back after `retry_in`.
    Tokens { requested: u64, retry_in: Duration },
    /// `requested` is more than the whole per-minute token limit: waiting will not help.
    TooLarge { requested: u64 },
}

impl RateLimiter {
    /// Full buckets of `rpm` requests and `tpm` tokens per minute.
    pub(super) fn new(rpm: u64, tpm: u64, now: Instant) -> Self {
        Self {
            requests: Bucket::full(rpm, now),
            tokens: Bucket::full(tpm, now),
        }
    }

    /// Takes one request and `tokens` tokens if both buckets hold enough; otherwise takes
    /// nothing and says which limit refused.
    pub(super) fn admit(
        &mut self,
        now: Instant,
        tokens: u64,
    ) -> Result<LimitSnapshot, (Refusal, LimitSnapshot)> {
        self.requests.refill(now);
        self.tokens.refill(now);
        let refusal = if tokens as f64 > self.tokens.capacity {
            Some(Refusal::TooLarge { requested: tokens })
        } else if self.requests.level < 1.0 {
            Some(Refusal::Requests {
                retry_in: self.requests.time_until(1.0),
            })
        } else if self.tokens.level < tokens as f64 {
            Some(Refusal::Tokens {
                requested: tokens,
                retry_in: self.tokens.time_until(tokens as f64),
            })
        } else {
            None
        };
        match refusal {
            Some(refusal) => Err((refusal, self.snapshot())),
            None => {
                self.requests.level -= 1.0;
                self.tokens.level -= tokens as f64;
                Ok(self.snapshot())
            }
        }
    }

    fn snapshot(&self) -> LimitSnapshot {
        LimitSnapshot {
            limit_requests: self.requests.capacity as u64,
            remaining_requests: self.requests.level.floor() as u64,
            reset_requests: self.requests.time_until(self.requests.capacity),
            limit_tokens: self.tokens.capacity as u64,
            remaining_tokens: self.tokens.level.floor() as u64,
            reset_tokens: self.tokens.time_until(self.tokens.capacity),
        }
    }
}

/// A bucket of `capacity` that refills at `capacity` per minute.
#[derive(Debug, Clone)]
struct Bucket {
    capacity: f64,
    level: f64,
    updated: Instant,
}

impl Bucket {
    fn full(per_minute: u64, now: Instant) -> Self {
        let capacity = per_minute as f64;
        Self {
            capacity,
            level: capacity,
            updated: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.level = (self.level + elapsed * self.capacity / 60.0).min(self.capacity);
        self.updated = now;
    }

    /// Time until the bucket holds `level`, rounded up to the millisecond.
    fn time_until(&self, level: f64) -> Duration {
        let missing = level - self.level;
        if missing <= 0.0 || self.capacity <= 0.0 {
            return Duration::ZERO;
        }
        Duration::from_millis((missing * 60_000.0 / self.capacity).ceil() as u64)
    }
}

/// Formats a duration the way Go does and OpenAI's `x-ratelimit-reset-*` headers show it:
/// `0s`, `20ms`, `1s`, `7.66s`, `6m0s`, `1h2m3.5s`. Rounded up to the millisecond.
pub(super) fn go_duration(duration: Duration) -> String {
    let millis = duration.as_nanos().div_ceil(1_000_000);
    if millis == 0 {
        return "0s".to_owned();
    }
    if millis < 1000 {
        return format!("{millis}ms");
    }
    let (hours, rest) = (millis / 3_600_000, millis % 3_600_000);
    let (minutes, rest) = (rest / 60_000, rest % 60_000);
    let seconds = seconds_with_fraction(rest);
    match (hours, minutes) {
        (0, 0) => seconds,
        (0, _) => format!("{minutes}m{seconds}"),
        _ => format!("{hours}h{minutes}m{seconds}"),
    }
}

/// `millis` as seconds with a trimmed fraction: `1500` → `1.5s`, `2000` → `2s`.
pub(super) fn seconds_with_fraction(millis: u128) -> String {
    let (seconds, fraction) = (millis / 1000, millis % 1000);
    if fraction == 0 {
        format!("{seconds}s")
    } else {
        let fraction = format!("{fraction:03}");
        format!("{seconds}.{}s", fraction.trim_end_matches('0'))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_duration_matches_gos_format() {
        let cases = [
            (Duration::ZERO, "0s"),
            (Duration::from_micros(1), "1ms"),
            (Duration::from_millis(20), "20ms"),
            (Duration::from_secs(1), "1s"),
            (Duration::from_millis(7660), "7.66s"),
            (Duration::from_secs(360), "6m0s"),
            (Duration::from_millis(3_723_500), "1h2m3.5s"),
            (Duration::from_secs(3600), "1h0m0s"),
        ];
        for (duration, expected) in cases {
            assert_eq!(go_duration(duration), expected, "{duration:?}");
        }
    }

    #[test]
    fn requests_run_out_and_come_back_at_the_per_minute_rate() {
        let start = Instant::now();
        let mut limiter = RateLimiter::new(2, 1000, start);
        let first = limiter.admit(start, 10).expect("first request fits");
        assert_eq!((first.remaining_requests, first.remaining_tokens), (1, 990));
        assert_eq!(first.reset_requests, Duration::from_secs(30));
        assert_eq!(first.reset_tokens, Duration::from_millis(600));
        limiter.admit(start, 10).expect("second request fits");
        let (refusal, snapshot) = limiter.admit(start, 10).expect_err("third is refused");
        assert_eq!(
            refusal,
            Refusal::Requests {
                retry_in: Duration::from_secs(30)
            }
        );
        assert_eq!(snapshot.remaining_requests, 0);
        assert_eq!(
            snapshot.remaining_tokens, 980,
            "a refused request takes nothing"
        );
        let later = start + Duration::from_secs(30);
        let snapshot = limiter
            .admit(later, 10)
            .expect("one request is back after 30 s");
        assert_eq!(snapshot.remaining_requests, 0);
    }

    #[test]
    fn tokens_run_out_and_oversized_requests_are_too_large() {
        let start = Instant::now();
        let mut limiter = RateLimiter::new(100, 600, start);
        limiter.admit(start, 500).expect("fits");
        let (refusal, _) = limiter.admit(start, 200).expect_err("only 100 tokens left");
        assert_eq!(
            refusal,
            Refusal::Tokens {
                requested: 200,
                retry_in: Duration::from_secs(10)
            }
        );
        let (refusal, _) = limiter
            .admit(start, 601)
            .expect_err("larger than the limit");
        assert_eq!(refusal, Refusal::TooLarge { requested: 601 });
        let full = start + Duration::from_secs(600);
        let snapshot = limiter.admit(full, 0).expect("refilled");
        assert_eq!(snapshot.remaining_tokens, 600, "never above the limit");
    }
}
