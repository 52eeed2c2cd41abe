//! Deadlines from configured durations: `now + wait` that never panics.
//!
//! A duration taken from a setting may not fit the clock (`u64::MAX` seconds), and
//! `Instant + Duration` then panics ("overflow when adding duration to instant"). The node's
//! configuration caps its time settings, but an embedder may pass anything: a deadline that does
//! not fit is a far one, [`FAR`] away, never the present and never a panic.

use std::time::{Duration, Instant};

/// How far away a deadline that does not fit the clock is put: a year.
pub const FAR: Duration = Duration::from_secs(365 * 24 * 3600);

/// `now + wait`, or `now + FAR` when that does not fit the clock.
pub fn instant_after(now: Instant, wait: Duration) -> Instant {
    now.checked_add(wait)
        .or_else(|| now.checked_add(FAR))
        .unwrap_or(now)
}

/// [`instant_after`] on tokio's clock (which test time may pause and advance).
pub fn tokio_instant_after(now: tokio::time::Instant, wait: Duration) -> tokio::time::Instant {
    tokio::time::Instant::from_std(instant_after(now.into_std(), wait))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wait_that_does_not_fit_the_clock_is_a_far_deadline_not_a_panic() {
        let now = Instant::now();
        assert_eq!(
            instant_after(now, Duration::from_secs(5)),
            now + Duration::from_secs(5)
        );
        assert_eq!(instant_after(now, Duration::MAX), now + FAR);
        assert_eq!(instant_after(now, Duration::from_secs(u64::MAX)), now + FAR);
        let now = tokio::time::Instant::now();
        assert_eq!(tokio_instant_after(now, Duration::MAX), now + FAR);
        assert_eq!(tokio_instant_after(now, Duration::ZERO), now);
    }
}
