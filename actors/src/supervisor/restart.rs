//! Restart accounting: the pure core of a supervisor.
//!
//! Given a failure at an explicit `now` (and a jitter sample), it answers: restart after this
//! delay, or give up and escalate. It holds no clock and no randomness of its own, so tests
//! drive it directly.
//!
//! - Intensity (OTP's `intensity`/`period`): more than `max_restarts` failures inside the sliding
//!   `window` means the supervisor gives up. Counted per supervisor, over all its children. A
//!   zero window forgets nothing: every failure counts for good, so the supervisor gives up after
//!   `max_restarts` restarts in all (a zero window never turns the intensity off).
//! - Backoff: per child, exponential from `min` doubling to `max`, with "equal jitter" (a delay
//!   drawn from the upper half of the current step, never below `min`). A child that ran a whole
//!   window without failing (counted from its restart, not from its failure: waiting out a
//!   delay is not running) starts again from `min` (never, with a zero window). A zero `min`
//!   with a `max` above zero doubles from 1 ms, so the delay still grows.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// How many restarts a supervisor tolerates within a sliding window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestartIntensity {
    /// Restarts allowed inside `window`; one more makes the supervisor give up.
    pub max_restarts: u32,
    /// The sliding window. Zero means failures are never forgotten (see the module docs).
    pub window: Duration,
}

impl Default for RestartIntensity {
    fn default() -> Self {
        Self {
            max_restarts: 10,
            window: Duration::from_secs(60),
        }
    }
}

/// Delay between a failure and the restart of the failed child.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// Delay before the first restart after a quiet period. Zero with a `max` above zero: the
    /// steps double from 1 ms.
    pub min: Duration,
    /// Upper bound of the delay.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            min: Duration::from_millis(10),
            max: Duration::from_secs(5),
        }
    }
}

impl Backoff {
    /// No delay at all: restart inline (benchmarks, tests).
    pub const NONE: Self = Self {
        min: Duration::ZERO,
        max: Duration::ZERO,
    };

    /// The base of the doubling when `min` is zero.
    const SMALLEST_STEP: Duration = Duration::from_millis(1);

    /// The delay before restart number `consecutive` (1 for the first) of a child, with
    /// `jitter` in `[0, 1)`.
    pub fn delay(&self, consecutive: u32, jitter: f64) -> Duration {
        if self.max.is_zero() {
            return Duration::ZERO;
        }
        let doublings = consecutive.saturating_sub(1).min(30);
        // A zero base would keep every step at zero: restarts with no delay at all.
        let base = self.min.max(Self::SMALLEST_STEP);
        let step = base
            .saturating_mul(1u32 << doublings)
            .min(self.max)
            .max(self.min);
        let jitter = jitter.clamp(0.0, 1.0);
        let half = step / 2;
        let delay = half + half.mul_f64(jitter);
        delay.clamp(self.min, self.max.max(self.min))
    }
}

/// Restart history of one child.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChildRestarts {
    /// Failures in a row without a quiet window in between.
    pub consecutive: u32,
    /// When it last failed.
    pub last_failure: Option<Instant>,
    /// When the instance after its last failure was due to start: the failure plus the
    /// backoff's delay. A quiet window is counted from here, so waiting out a delay is not
    /// running without failing.
    pub restarted_at: Option<Instant>,
    /// Restarts over the child's whole life.
    pub total: u64,
}

/// What to do about a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartDecision {
    /// Restart after `delay`.
    Restart {
        /// How long to wait before starting the new instance.
        delay: Duration,
        /// Restarts inside the window, this one included.
        restarts_in_window: u32,
    },
    /// Too many restarts: stop the children and fail to the parent.
    Escalate {
        /// Restarts inside the window, this one included.
        restarts_in_window: u32,
    },
}

/// The restart book of one supervisor.
#[derive(Debug, Clone)]
pub struct RestartTracker {
    intensity: RestartIntensity,
    backoff: Backoff,
    recent: VecDeque<Instant>,
}

impl RestartTracker {
    /// A tracker with no history.
    pub fn new(intensity: RestartIntensity, backoff: Backoff) -> Self {
        Self {
            intensity,
            backoff,
            recent: VecDeque::new(),
        }
    }

    /// The configured intensity.
    pub fn intensity(&self) -> RestartIntensity {
        self.intensity
    }

    /// Records a failure of `child` at `now` and decides. `jitter` is a sample in `[0, 1)`.
    pub fn on_failure(
        &mut self,
        child: &mut ChildRestarts,
        now: Instant,
        jitter: f64,
    ) -> RestartDecision {
        self.forget_before(now);
        self.recent.push_back(now);
        let restarts_in_window = self.recent.len() as u32;
        if restarts_in_window > self.intensity.max_restarts {
            return RestartDecision::Escalate { restarts_in_window };
        }
        let quiet = child.restarted_at.is_none_or(|started| {
            self.forgets() && now.saturating_duration_since(started) >= self.intensity.window
        });
        child.consecutive = if quiet { 1 } else { child.consecutive + 1 };
        child.last_failure = Some(now);
        let delay = self.backoff.delay(child.consecutive, jitter);
        child.restarted_at = Some(now.checked_add(delay).unwrap_or(now));
        RestartDecision::Restart {
            delay,
            restarts_in_window,
        }
    }

    /// Whether one more failure at `now` would exceed the intensity (records nothing).
    pub fn would_escalate(&mut self, now: Instant) -> bool {
        self.forget_before(now);
        self.recent.len() as u32 >= self.intensity.max_restarts
    }

    /// Whether every restart this tracker decides is immediate (no backoff): then a child may
    /// restart in place.
    pub fn restarts_immediately(&self) -> bool {
        self.backoff.max.is_zero()
    }

    /// Restarts recorded inside the window ending at `now`.
    pub fn restarts_in_window(&mut self, now: Instant) -> u32 {
        self.forget_before(now);
        self.recent.len() as u32
    }

    /// Whether failures ever leave the window: not with a zero window, which would otherwise
    /// forget each failure at once and so never escalate.
    fn forgets(&self) -> bool {
        !self.intensity.window.is_zero()
    }

    fn forget_before(&mut self, now: Instant) {
        if !self.forgets() {
            return;
        }
        while let Some(&oldest) = self.recent.front() {
            if now.saturating_duration_since(oldest) >= self.intensity.window {
                self.recent.pop_front();
            } else {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn tracker(max_restarts: u32, window_ms: u64, min_ms: u64, max_ms: u64) -> RestartTracker {
        RestartTracker::new(
            RestartIntensity {
                max_restarts,
                window: MS * window_ms as u32,
            },
            Backoff {
                min: MS * min_ms as u32,
                max: MS * max_ms as u32,
            },
        )
    }

    fn delay_of(decision: RestartDecision) -> Duration {
        match decision {
            RestartDecision::Restart { delay, .. } => delay,
            other => panic!("expected a restart, got {other:?}"),
        }
    }

    #[test]
    fn backoff_doubles_from_min_and_caps_at_max() {
        let backoff = Backoff {
            min: MS * 10,
            max: MS * 100,
        };
        // jitter 1.0 → the top of each step
        let steps: Vec<_> = (1..=6).map(|n| backoff.delay(n, 1.0)).collect();
        assert_eq!(
            steps,
            [MS * 10, MS * 20, MS * 40, MS * 80, MS * 100, MS * 100]
        );
    }

    #[test]
    fn jitter_stays_in_the_upper_half_and_never_below_min() {
        let backoff = Backoff {
            min: MS * 10,
            max: MS * 1000,
        };
        assert_eq!(
            backoff.delay(1, 0.0),
            MS * 10,
            "first restart is exactly min"
        );
        assert_eq!(backoff.delay(3, 0.0), MS * 20, "low jitter: half the step");
        assert_eq!(backoff.delay(3, 0.5), MS * 30);
        for sample in [0.0, 0.25, 0.999, 5.0, -1.0] {
            let delay = backoff.delay(4, sample);
            assert!((MS * 40..=MS * 80).contains(&delay), "{delay:?}");
        }
    }

    #[test]
    fn huge_attempt_counts_do_not_overflow() {
        let backoff = Backoff {
            min: Duration::from_secs(1),
            max: Duration::from_secs(30),
        };
        assert_eq!(backoff.delay(u32::MAX, 1.0), Duration::from_secs(30));
    }

    #[test]
    fn a_zero_min_with_a_max_still_backs_off() {
        let backoff = Backoff {
            min: Duration::ZERO,
            max: MS * 100,
        };
        let steps: Vec<_> = (1..=9).map(|n| backoff.delay(n, 1.0)).collect();
        assert_eq!(
            steps,
            [
                MS,
                MS * 2,
                MS * 4,
                MS * 8,
                MS * 16,
                MS * 32,
                MS * 64,
                MS * 100,
                MS * 100
            ]
        );
        assert!(backoff.delay(1, 0.0) > Duration::ZERO);
    }

    #[test]
    fn no_backoff_means_immediate_restarts() {
        assert_eq!(Backoff::NONE.delay(1, 0.7), Duration::ZERO);
        assert_eq!(Backoff::NONE.delay(50, 0.7), Duration::ZERO);
    }

    #[test]
    fn more_than_max_restarts_in_the_window_escalates() {
        let mut book = tracker(3, 1000, 0, 0);
        let mut child = ChildRestarts::default();
        let t0 = Instant::now();
        for n in 1..=3 {
            assert_eq!(
                book.on_failure(&mut child, t0 + MS * n, 0.0),
                RestartDecision::Restart {
                    delay: Duration::ZERO,
                    restarts_in_window: n
                }
            );
        }
        assert_eq!(
            book.on_failure(&mut child, t0 + MS * 4, 0.0),
            RestartDecision::Escalate {
                restarts_in_window: 4
            }
        );
    }

    #[test]
    fn the_window_slides() {
        let mut book = tracker(2, 100, 0, 0);
        let mut child = ChildRestarts::default();
        let t0 = Instant::now();
        book.on_failure(&mut child, t0, 0.0);
        book.on_failure(&mut child, t0 + MS * 50, 0.0);
        // the first failure leaves the window at t0 + 100
        assert!(matches!(
            book.on_failure(&mut child, t0 + MS * 100, 0.0),
            RestartDecision::Restart {
                restarts_in_window: 2,
                ..
            }
        ));
        assert_eq!(book.restarts_in_window(t0 + MS * 149), 2);
        assert_eq!(book.restarts_in_window(t0 + MS * 150), 1);
        assert_eq!(book.restarts_in_window(t0 + MS * 1000), 0);
    }

    #[test]
    fn a_zero_window_forgets_no_failure_instead_of_turning_the_intensity_off() {
        let mut book = tracker(3, 0, 0, 0);
        let mut child = ChildRestarts::default();
        let t0 = Instant::now();
        for n in 1..=3 {
            assert_eq!(
                book.on_failure(&mut child, t0 + Duration::from_secs(n * 3_600), 0.0),
                RestartDecision::Restart {
                    delay: Duration::ZERO,
                    restarts_in_window: n as u32
                },
                "failures hours apart all count"
            );
        }
        assert!(book.would_escalate(t0 + Duration::from_secs(86_400)));
        assert_eq!(book.restarts_in_window(t0 + Duration::from_secs(86_400)), 3);
        assert_eq!(
            book.on_failure(&mut child, t0 + Duration::from_secs(86_400), 0.0),
            RestartDecision::Escalate {
                restarts_in_window: 4
            }
        );
        // Nor does the backoff restart from min after a "quiet window" of zero.
        let mut book = tracker(100, 0, 10, 10_000);
        let mut child = ChildRestarts::default();
        let delays: Vec<_> = (1..=3)
            .map(|n| delay_of(book.on_failure(&mut child, t0 + Duration::from_secs(n), 1.0)))
            .collect();
        assert_eq!(delays, [MS * 10, MS * 20, MS * 40]);
    }

    #[test]
    fn intensity_zero_escalates_on_the_first_failure() {
        let mut book = tracker(0, 1000, 10, 100);
        let mut child = ChildRestarts::default();
        assert!(matches!(
            book.on_failure(&mut child, Instant::now(), 0.5),
            RestartDecision::Escalate {
                restarts_in_window: 1
            }
        ));
    }

    #[test]
    fn backoff_grows_per_child_and_resets_after_a_quiet_window() {
        let mut book = tracker(100, 1000, 10, 10_000);
        let mut flaky = ChildRestarts::default();
        let mut other = ChildRestarts::default();
        let t0 = Instant::now();
        assert_eq!(delay_of(book.on_failure(&mut flaky, t0, 1.0)), MS * 10);
        assert_eq!(
            delay_of(book.on_failure(&mut flaky, t0 + MS * 20, 1.0)),
            MS * 20
        );
        assert_eq!(
            delay_of(book.on_failure(&mut flaky, t0 + MS * 50, 1.0)),
            MS * 40
        );
        // another child has its own backoff
        assert_eq!(
            delay_of(book.on_failure(&mut other, t0 + MS * 60, 1.0)),
            MS * 10
        );
        // a window after its last restart (at t0 + 90 ms) the flaky child starts from min
        // again; a moment before, it had not run that long
        let mut early = flaky.clone();
        assert_eq!(
            delay_of(book.clone().on_failure(&mut early, t0 + MS * 1089, 1.0)),
            MS * 80
        );
        assert_eq!(
            delay_of(book.on_failure(&mut flaky, t0 + MS * 1090, 1.0)),
            MS * 10
        );
        assert_eq!(flaky.consecutive, 1);
    }

    #[test]
    fn waiting_out_a_delay_as_long_as_the_window_is_not_a_quiet_window() {
        // A child that fails as soon as it starts, with a window shorter than the largest
        // delay: once the delay reached the window, the wait alone counted as a quiet window
        // and the delay fell back to min (10, 20, … 640, 10, 20, …), in bursts that never
        // reached max nor the intensity.
        let mut book = tracker(1_000, 1_000, 10, 5_000);
        let mut child = ChildRestarts::default();
        let mut now = Instant::now();
        let mut delays = Vec::new();
        for _ in 0..12 {
            let delay = delay_of(book.on_failure(&mut child, now, 1.0));
            delays.push(delay.as_millis());
            now += delay;
        }
        assert_eq!(
            delays,
            [10, 20, 40, 80, 160, 320, 640, 1280, 2560, 5000, 5000, 5000]
        );
    }

    #[test]
    fn escalation_counts_all_children_of_the_supervisor() {
        let mut book = tracker(2, 1000, 0, 0);
        let (mut a, mut b, mut c) = Default::default();
        let t0 = Instant::now();
        book.on_failure(&mut a, t0, 0.0);
        book.on_failure(&mut b, t0 + MS, 0.0);
        assert!(matches!(
            book.on_failure(&mut c, t0 + MS * 2, 0.0),
            RestartDecision::Escalate { .. }
        ));
    }

    #[test]
    fn would_escalate_predicts_the_next_decision_without_recording() {
        let mut book = tracker(2, 1_000, 0, 0);
        let mut child = ChildRestarts::default();
        let t0 = Instant::now();
        assert!(!book.would_escalate(t0));
        book.on_failure(&mut child, t0, 0.0);
        assert!(!book.would_escalate(t0 + MS));
        assert!(
            !book.would_escalate(t0 + MS),
            "asking twice records nothing"
        );
        book.on_failure(&mut child, t0 + MS, 0.0);
        assert!(book.would_escalate(t0 + MS * 2));
        assert!(matches!(
            book.on_failure(&mut child, t0 + MS * 2, 0.0),
            RestartDecision::Escalate { .. }
        ));
        // Once the first two failures left the window, one more is fine again.
        assert!(!book.would_escalate(t0 + MS * 1_002));
        assert!(book.restarts_immediately());
        assert!(!tracker(2, 1_000, 10, 100).restarts_immediately());
    }
}
