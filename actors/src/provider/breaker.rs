//! The circuit breaker of one provider: closed → open → half-open → closed.
//!
//! A plain state machine driven with an explicit `now`; every state change is returned to the
//! caller as a [`Transition`] so the actor can publish it. It never reads a clock, never sleeps
//! and never decides anything about a call it was not told about.
//!
//! - Closed: every call is allowed. It opens on `failure_threshold` consecutive failures, or when
//!   at least `min_calls` calls ended in the last `window_secs` and `failure_rate` of them failed.
//! - Open: every call is rejected for the cool-down (`open_secs`, doubling for each failed probe
//!   in a row, capped at `max_open_secs`).
//! - Half-open: at most `half_open_probes` probe calls at once. A probe success closes it, a probe
//!   failure opens it again. A probe never reported back frees its slot after `probe_timeout_secs`.
//!
//! Every permit belongs to the state it was issued in: a result reported after the breaker moved
//! on (a call from before an open failing late, a second probe finishing after the first closed
//! it) is ignored, so nothing counts twice.

use std::collections::VecDeque;
use std::fmt;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Breaker settings; the keys of a provider's `breaker = { … }` table.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BreakerConfig {
    /// Consecutive failures that open the breaker; 0 turns this rule off.
    pub failure_threshold: u32,
    /// Cool-down after the first opening, in seconds.
    pub open_secs: u64,
    /// Cap of the cool-down, which doubles for each failed probe in a row.
    pub max_open_secs: u64,
    /// Probe calls let through at once while half-open (at least 1).
    pub half_open_probes: u32,
    /// A probe not reported back within this many seconds frees its slot.
    pub probe_timeout_secs: u64,
    /// Fraction of failed calls in the window that opens the breaker; 0 turns this rule off.
    pub failure_rate: f64,
    /// Calls the window must hold before the failure rate counts.
    pub min_calls: u32,
    /// The failure-rate window, in seconds (counted in tenths of it).
    pub window_secs: u64,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failure_threshold: 5,
            open_secs: 30,
            max_open_secs: 300,
            half_open_probes: 1,
            probe_timeout_secs: 60,
            failure_rate: 0.5,
            min_calls: 20,
            window_secs: 60,
        }
    }
}

/// The breaker's state as seen at some `now`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls flow.
    Closed,
    /// Calls are rejected for `retry_in` more.
    Open {
        /// Until the cool-down ends.
        retry_in: Duration,
    },
    /// Probe calls decide.
    HalfOpen,
}

impl BreakerState {
    /// `closed`, `open` or `half_open`, for display and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open { .. } => "open",
            Self::HalfOpen => "half_open",
        }
    }
}

/// Why the breaker opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenReason {
    /// This many failures in a row.
    ConsecutiveFailures {
        /// The count that reached the threshold.
        failures: u32,
    },
    /// Too many of the calls in the window failed.
    FailureRate {
        /// Failed calls in the window.
        failures: u32,
        /// All calls in the window.
        calls: u32,
    },
    /// A half-open probe failed.
    ProbeFailed,
}

impl fmt::Display for OpenReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ConsecutiveFailures { failures } => write!(f, "{failures} consecutive failures"),
            Self::FailureRate { failures, calls } => {
                write!(f, "{failures} of the last {calls} calls failed")
            }
            Self::ProbeFailed => f.write_str("the half-open probe failed"),
        }
    }
}

/// A state change, for the caller to publish (`provider.breaker_*` events).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// Closed or half-open → open.
    Opened {
        /// Why.
        reason: OpenReason,
        /// The cool-down.
        open_for: Duration,
    },
    /// Open → half-open: the cool-down ended and a probe goes through.
    HalfOpened,
    /// Half-open → closed: a probe succeeded.
    Closed,
}

/// What a breaker's state reads as, without its counters and probes: a copy for readers (the
/// read-side snapshot behind `/v1/providers`), taken without allocating.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerView {
    /// `Some` while open: until when.
    open_until: Option<Instant>,
    half_open: bool,
}

impl BreakerView {
    /// The state at `now`, as [`Breaker::state`] would answer it.
    pub fn state(&self, now: Instant) -> BreakerState {
        match (self.open_until, self.half_open) {
            (Some(until), _) if now < until => BreakerState::Open {
                retry_in: until - now,
            },
            (Some(_), _) | (None, true) => BreakerState::HalfOpen,
            (None, false) => BreakerState::Closed,
        }
    }
}

/// Leave to make one call. Report it back exactly once: [`Breaker::on_success`],
/// [`Breaker::on_failure`] or [`Breaker::release`].
#[must_use = "a permit must be reported back to the breaker"]
#[derive(Debug, PartialEq, Eq)]
pub struct Permit {
    epoch: u64,
    probe: Option<u64>,
}

impl Permit {
    /// True for a half-open probe.
    pub fn is_probe(&self) -> bool {
        self.probe.is_some()
    }
}

/// An allowed call, and the transition allowing it caused (open → half-open), if any.
#[derive(Debug, PartialEq, Eq)]
pub struct Admitted {
    /// The permit to report back.
    pub permit: Permit,
    /// A state change to publish.
    pub transition: Option<Transition>,
}

/// Why a call was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectReason {
    /// The breaker is open.
    Open,
    /// Half-open, and every probe slot is taken.
    ProbesBusy,
}

/// A call the breaker does not let through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the provider's circuit breaker rejects calls ({reason:?}); retry in {retry_in:?}")]
pub struct Rejected {
    /// When to ask again: the end of the cool-down, or (probes busy) the latest moment a probe
    /// slot frees up.
    pub retry_in: Duration,
    /// Why.
    pub reason: RejectReason,
}

/// A provider's circuit breaker. See the module documentation.
#[derive(Debug, Clone)]
pub struct Breaker {
    config: BreakerConfig,
    state: State,
    /// Bumped on every state change; permits carry the epoch they were issued in.
    epoch: u64,
    consecutive_failures: u32,
    window: OutcomeWindow,
    /// Failed probes since the breaker last closed (the cool-down doubles for each).
    failed_probes: u32,
    next_probe_id: u64,
}

#[derive(Debug, Clone)]
enum State {
    Closed,
    Open { until: Instant },
    HalfOpen { probes: Vec<Probe> },
}

#[derive(Debug, Clone, Copy)]
struct Probe {
    id: u64,
    expires: Instant,
}

impl Breaker {
    /// A closed breaker.
    pub fn new(config: BreakerConfig) -> Self {
        Self {
            config,
            state: State::Closed,
            epoch: 0,
            consecutive_failures: 0,
            window: OutcomeWindow::new(Duration::from_secs(config.window_secs)),
            failed_probes: 0,
            next_probe_id: 0,
        }
    }

    /// The settings.
    pub fn config(&self) -> &BreakerConfig {
        &self.config
    }

    /// The state at `now`, without changing anything: an open breaker whose cool-down has ended
    /// reads as half-open (the next [`allow`](Self::allow) makes it so and reports it).
    pub fn state(&self, now: Instant) -> BreakerState {
        match &self.state {
            State::Closed => BreakerState::Closed,
            State::Open { until } if now < *until => BreakerState::Open {
                retry_in: *until - now,
            },
            State::Open { .. } | State::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// A copy of the state for readers.
    pub fn view(&self) -> BreakerView {
        match &self.state {
            State::Closed => BreakerView {
                open_until: None,
                half_open: false,
            },
            State::Open { until } => BreakerView {
                open_until: Some(*until),
                half_open: false,
            },
            State::HalfOpen { .. } => BreakerView {
                open_until: None,
                half_open: true,
            },
        }
    }

    /// May a call go now?
    pub fn allow(&mut self, now: Instant) -> Result<Admitted, Rejected> {
        let mut transition = None;
        if let State::Open { until } = self.state {
            if now < until {
                return Err(Rejected {
                    retry_in: until - now,
                    reason: RejectReason::Open,
                });
            }
            self.enter(State::HalfOpen { probes: Vec::new() });
            transition = Some(Transition::HalfOpened);
        }
        let epoch = self.epoch;
        let probe_limit = self.config.half_open_probes.max(1) as usize;
        let probe_timeout = Duration::from_secs(self.config.probe_timeout_secs);
        let mut probe = None;
        if let State::HalfOpen { probes } = &mut self.state {
            probes.retain(|probe| probe.expires > now);
            if probes.len() >= probe_limit {
                let first_free = probes
                    .iter()
                    .map(|probe| probe.expires)
                    .min()
                    .unwrap_or(now);
                return Err(Rejected {
                    retry_in: first_free.saturating_duration_since(now),
                    reason: RejectReason::ProbesBusy,
                });
            }
            let id = self.next_probe_id;
            self.next_probe_id += 1;
            let expires = crate::time::instant_after(now, probe_timeout);
            probes.push(Probe { id, expires });
            probe = Some(id);
        }
        Ok(Admitted {
            permit: Permit { epoch, probe },
            transition,
        })
    }

    /// The call succeeded (the provider answered; what counts as an answer is the caller's
    /// policy). A probe success closes the breaker, even one reported after its probe timeout:
    /// it is still news that the provider answers.
    pub fn on_success(&mut self, permit: Permit, now: Instant) -> Option<Transition> {
        if permit.epoch != self.epoch {
            return None;
        }
        match self.state {
            State::Closed => {
                self.consecutive_failures = 0;
                self.window.record(now, false);
                None
            }
            State::HalfOpen { .. } => {
                self.failed_probes = 0;
                self.enter(State::Closed);
                Some(Transition::Closed)
            }
            // Opening bumps the epoch, so no current permit exists while open.
            State::Open { .. } => None,
        }
    }

    /// The call failed in a way that says the provider is unwell. May open the breaker.
    pub fn on_failure(&mut self, permit: Permit, now: Instant) -> Option<Transition> {
        if permit.epoch != self.epoch {
            return None;
        }
        match self.state {
            State::Closed => {
                self.consecutive_failures = self.consecutive_failures.saturating_add(1);
                self.window.record(now, true);
                let threshold = self.config.failure_threshold;
                if threshold > 0 && self.consecutive_failures >= threshold {
                    let failures = self.consecutive_failures;
                    return Some(self.open(OpenReason::ConsecutiveFailures { failures }, now));
                }
                let (calls, failures) = self.window.totals(now);
                let rate = self.config.failure_rate;
                if rate > 0.0
                    && calls > 0
                    && calls >= self.config.min_calls
                    && f64::from(failures) >= rate * f64::from(calls)
                {
                    return Some(self.open(OpenReason::FailureRate { failures, calls }, now));
                }
                None
            }
            State::HalfOpen { .. } => {
                self.failed_probes = self.failed_probes.saturating_add(1);
                Some(self.open(OpenReason::ProbeFailed, now))
            }
            State::Open { .. } => None,
        }
    }

    /// The call ended without saying anything about the provider (cancelled by the caller, or
    /// refused before it was sent): nothing is counted, and a probe's slot is freed.
    pub fn release(&mut self, permit: Permit) {
        if permit.epoch != self.epoch {
            return;
        }
        if let (State::HalfOpen { probes }, Some(id)) = (&mut self.state, permit.probe) {
            probes.retain(|probe| probe.id != id);
        }
    }

    fn open(&mut self, reason: OpenReason, now: Instant) -> Transition {
        let base = Duration::from_secs(self.config.open_secs);
        let cap = Duration::from_secs(self.config.max_open_secs).max(base);
        let open_for = base
            .saturating_mul(1u32 << self.failed_probes.min(31))
            .min(cap);
        let until = crate::time::instant_after(now, open_for);
        self.enter(State::Open { until });
        Transition::Opened { reason, open_for }
    }

    fn enter(&mut self, state: State) {
        self.state = state;
        self.epoch += 1;
        self.consecutive_failures = 0;
        self.window.clear();
    }
}

/// Outcomes of the last `window`, counted in ten slots so memory stays constant at any rate.
#[derive(Debug, Clone)]
struct OutcomeWindow {
    slot_len: Duration,
    origin: Option<Instant>,
    slots: VecDeque<Slot>,
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    index: u64,
    calls: u32,
    failures: u32,
}

const WINDOW_SLOTS: u64 = 10;

impl OutcomeWindow {
    fn new(window: Duration) -> Self {
        Self {
            slot_len: window / WINDOW_SLOTS as u32,
            origin: None,
            slots: VecDeque::new(),
        }
    }

    fn slot_index(&mut self, now: Instant) -> u64 {
        let origin = *self.origin.get_or_insert(now);
        let nanos = now.saturating_duration_since(origin).as_nanos();
        let slot = self.slot_len.as_nanos().max(1);
        u64::try_from(nanos / slot).unwrap_or(u64::MAX)
    }

    fn evict(&mut self, current: u64) {
        while self
            .slots
            .front()
            .is_some_and(|slot| slot.index.saturating_add(WINDOW_SLOTS) <= current)
        {
            self.slots.pop_front();
        }
    }

    fn record(&mut self, now: Instant, failed: bool) {
        if self.slot_len.is_zero() {
            return;
        }
        // A `now` older than the newest slot is counted in the newest slot.
        let index = self
            .slot_index(now)
            .max(self.slots.back().map_or(0, |slot| slot.index));
        self.evict(index);
        match self.slots.back_mut() {
            Some(slot) if slot.index == index => {
                slot.calls = slot.calls.saturating_add(1);
                slot.failures = slot.failures.saturating_add(u32::from(failed));
            }
            _ => self.slots.push_back(Slot {
                index,
                calls: 1,
                failures: u32::from(failed),
            }),
        }
    }

    /// (calls, failures) in the window at `now`.
    fn totals(&mut self, now: Instant) -> (u32, u32) {
        let current = self.slot_index(now);
        self.evict(current);
        self.slots
            .iter()
            .fold((0u32, 0u32), |(calls, failures), slot| {
                (
                    calls.saturating_add(slot.calls),
                    failures.saturating_add(slot.failures),
                )
            })
    }

    fn clear(&mut self) {
        self.slots.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: Duration = Duration::from_secs(1);

    fn config() -> BreakerConfig {
        BreakerConfig {
            failure_rate: 0.0,
            ..BreakerConfig::default()
        }
    }

    fn permit(breaker: &mut Breaker, now: Instant) -> Permit {
        breaker.allow(now).expect("allowed").permit
    }

    fn fail(breaker: &mut Breaker, now: Instant) -> Option<Transition> {
        let permit = permit(breaker, now);
        breaker.on_failure(permit, now)
    }

    fn succeed(breaker: &mut Breaker, now: Instant) -> Option<Transition> {
        let permit = permit(breaker, now);
        breaker.on_success(permit, now)
    }

    /// A breaker opened by consecutive failures at `t0`.
    fn opened(config: BreakerConfig) -> (Breaker, Instant) {
        let t0 = Instant::now();
        let mut breaker = Breaker::new(config);
        for _ in 1..config.failure_threshold {
            assert_eq!(fail(&mut breaker, t0), None);
        }
        assert!(matches!(
            fail(&mut breaker, t0),
            Some(Transition::Opened { .. })
        ));
        (breaker, t0)
    }

    #[test]
    fn a_view_reads_as_the_breaker_does_at_any_later_moment() {
        let (mut breaker, t0) = opened(config());
        let view = breaker.view();
        for later in [t0, t0 + SEC, t0 + 29 * SEC, t0 + 30 * SEC, t0 + 60 * SEC] {
            assert_eq!(view.state(later), breaker.state(later), "{later:?}");
        }
        // Half-open once a probe went through; closed after it succeeded.
        let probe = permit(&mut breaker, t0 + 30 * SEC);
        assert_eq!(breaker.view().state(t0 + 31 * SEC), BreakerState::HalfOpen);
        assert_eq!(
            breaker.on_success(probe, t0 + 31 * SEC),
            Some(Transition::Closed)
        );
        assert_eq!(breaker.view().state(t0 + 31 * SEC), BreakerState::Closed);
    }

    #[test]
    fn consecutive_failures_open_it() {
        let t0 = Instant::now();
        let mut breaker = Breaker::new(config());
        assert_eq!(breaker.state(t0), BreakerState::Closed);
        for _ in 0..4 {
            assert_eq!(fail(&mut breaker, t0), None);
            assert_eq!(breaker.state(t0), BreakerState::Closed);
        }
        assert_eq!(
            fail(&mut breaker, t0),
            Some(Transition::Opened {
                reason: OpenReason::ConsecutiveFailures { failures: 5 },
                open_for: 30 * SEC
            })
        );
        assert_eq!(breaker.state(t0), BreakerState::Open { retry_in: 30 * SEC });
    }

    #[test]
    fn a_success_resets_the_consecutive_count() {
        let t0 = Instant::now();
        let mut breaker = Breaker::new(config());
        for _ in 0..4 {
            assert_eq!(fail(&mut breaker, t0), None);
        }
        assert_eq!(succeed(&mut breaker, t0), None);
        for _ in 0..4 {
            assert_eq!(fail(&mut breaker, t0), None);
        }
        assert_eq!(breaker.state(t0), BreakerState::Closed);
    }

    #[test]
    fn open_rejects_until_the_cool_down_ends_then_half_opens_with_a_probe() {
        let (mut breaker, t0) = opened(config());
        assert_eq!(
            breaker.allow(t0 + 10 * SEC),
            Err(Rejected {
                retry_in: 20 * SEC,
                reason: RejectReason::Open
            })
        );
        assert_eq!(
            breaker.state(t0 + 30 * SEC),
            BreakerState::HalfOpen,
            "state() only looks"
        );
        let admitted = breaker.allow(t0 + 30 * SEC).expect("probe");
        assert_eq!(admitted.transition, Some(Transition::HalfOpened));
        assert!(admitted.permit.is_probe());
        assert_eq!(breaker.state(t0 + 30 * SEC), BreakerState::HalfOpen);
        // One probe at a time: the next call waits at most for the probe timeout.
        assert_eq!(
            breaker.allow(t0 + 31 * SEC),
            Err(Rejected {
                retry_in: 59 * SEC,
                reason: RejectReason::ProbesBusy
            })
        );
        let _ = breaker.on_success(admitted.permit, t0 + 32 * SEC);
    }

    #[test]
    fn a_probe_success_closes_it_and_starts_afresh() {
        let (mut breaker, t0) = opened(config());
        let probe = permit(&mut breaker, t0 + 30 * SEC);
        assert_eq!(
            breaker.on_success(probe, t0 + 31 * SEC),
            Some(Transition::Closed)
        );
        assert_eq!(breaker.state(t0 + 31 * SEC), BreakerState::Closed);
        let admitted = breaker.allow(t0 + 31 * SEC).expect("closed");
        assert!(!admitted.permit.is_probe());
        assert_eq!(admitted.transition, None);
        breaker.release(admitted.permit);
        for _ in 0..4 {
            assert_eq!(
                fail(&mut breaker, t0 + 32 * SEC),
                None,
                "the count started over"
            );
        }
    }

    #[test]
    fn a_probe_failure_reopens_with_a_growing_capped_cool_down() {
        let (mut breaker, t0) = opened(config());
        let mut now = t0;
        let mut cool_down = 30 * SEC;
        for expected in [60, 120, 240, 300, 300] {
            now += cool_down;
            let probe = breaker.allow(now).expect("probe");
            assert_eq!(probe.transition, Some(Transition::HalfOpened));
            cool_down = expected * SEC;
            assert_eq!(
                breaker.on_failure(probe.permit, now),
                Some(Transition::Opened {
                    reason: OpenReason::ProbeFailed,
                    open_for: cool_down
                })
            );
            assert!(breaker.allow(now + cool_down - SEC).is_err());
        }
        // Closing resets the growth.
        now += cool_down;
        assert_eq!(succeed(&mut breaker, now), Some(Transition::Closed));
        for _ in 0..4 {
            assert_eq!(fail(&mut breaker, now), None);
        }
        assert_eq!(
            fail(&mut breaker, now),
            Some(Transition::Opened {
                reason: OpenReason::ConsecutiveFailures { failures: 5 },
                open_for: 30 * SEC
            })
        );
    }

    #[test]
    fn several_probes_when_configured_and_the_first_result_decides() {
        let config = BreakerConfig {
            half_open_probes: 2,
            ..config()
        };
        let (mut breaker, t0) = opened(config);
        let now = t0 + 30 * SEC;
        let first = breaker.allow(now).expect("probe 1");
        assert_eq!(first.transition, Some(Transition::HalfOpened));
        let second = breaker.allow(now).expect("probe 2");
        assert_eq!(second.transition, None);
        assert_eq!(
            breaker.allow(now).map(|_| ()).unwrap_err().reason,
            RejectReason::ProbesBusy
        );
        assert_eq!(
            breaker.on_failure(first.permit, now),
            Some(Transition::Opened {
                reason: OpenReason::ProbeFailed,
                open_for: 60 * SEC
            })
        );
        // The second probe's late success belongs to the half-open state that ended.
        assert_eq!(breaker.on_success(second.permit, now), None);
        assert_eq!(
            breaker.state(now),
            BreakerState::Open { retry_in: 60 * SEC }
        );
    }

    #[test]
    fn permits_from_before_an_open_do_not_count_twice() {
        let t0 = Instant::now();
        let mut breaker = Breaker::new(config());
        let in_flight: Vec<Permit> = (0..10).map(|_| permit(&mut breaker, t0)).collect();
        let mut transitions = Vec::new();
        for permit in in_flight {
            transitions.extend(breaker.on_failure(permit, t0 + SEC));
        }
        assert_eq!(
            transitions.len(),
            1,
            "one opening for ten failures: {transitions:?}"
        );
        assert_eq!(
            breaker.state(t0 + SEC),
            BreakerState::Open { retry_in: 30 * SEC }
        );

        // A closed-state permit reported during half-open neither closes nor reopens it.
        let mut breaker = Breaker::new(config());
        let stale_ok = permit(&mut breaker, t0);
        let stale_err = permit(&mut breaker, t0);
        for _ in 0..5 {
            let _ = fail(&mut breaker, t0);
        }
        let probe = permit(&mut breaker, t0 + 30 * SEC);
        assert_eq!(breaker.on_success(stale_ok, t0 + 30 * SEC), None);
        assert_eq!(breaker.on_failure(stale_err, t0 + 30 * SEC), None);
        assert_eq!(breaker.state(t0 + 30 * SEC), BreakerState::HalfOpen);
        assert_eq!(
            breaker.on_success(probe, t0 + 31 * SEC),
            Some(Transition::Closed)
        );
    }

    #[test]
    fn a_permit_from_before_a_close_does_not_count_after_it() {
        let t0 = Instant::now();
        let mut breaker = Breaker::new(config());
        let stale: Vec<Permit> = (0..5).map(|_| permit(&mut breaker, t0)).collect();
        for _ in 0..5 {
            let _ = fail(&mut breaker, t0);
        }
        assert_eq!(
            succeed(&mut breaker, t0 + 30 * SEC),
            Some(Transition::Closed)
        );
        // Five late failures from before the open, then four fresh ones: still closed, as only
        // the fresh ones count.
        for permit in stale {
            assert_eq!(breaker.on_failure(permit, t0 + 31 * SEC), None);
        }
        for _ in 0..4 {
            assert_eq!(fail(&mut breaker, t0 + 31 * SEC), None);
        }
        assert_eq!(breaker.state(t0 + 31 * SEC), BreakerState::Closed);
    }

    #[test]
    fn a_released_probe_frees_its_slot_and_counts_nothing() {
        let (mut breaker, t0) = opened(config());
        let now = t0 + 30 * SEC;
        let probe = permit(&mut breaker, now);
        assert!(breaker.allow(now).is_err());
        breaker.release(probe);
        assert_eq!(breaker.state(now), BreakerState::HalfOpen);
        let probe = breaker.allow(now).expect("slot free again");
        assert_eq!(probe.transition, None, "still the same half-open state");
        assert_eq!(
            breaker.on_success(probe.permit, now),
            Some(Transition::Closed)
        );
    }

    #[test]
    fn a_lost_probe_frees_its_slot_after_the_probe_timeout() {
        let (mut breaker, t0) = opened(config());
        let now = t0 + 30 * SEC;
        let _lost = permit(&mut breaker, now);
        let rejected = breaker.allow(now + 59 * SEC).expect_err("busy");
        assert_eq!(rejected.retry_in, SEC);
        let probe = breaker
            .allow(now + 60 * SEC)
            .expect("the lost probe expired");
        assert_eq!(
            breaker
                .on_failure(probe.permit, now + 61 * SEC)
                .map(|t| matches!(t, Transition::Opened { .. })),
            Some(true)
        );
    }

    #[test]
    fn a_probe_timeout_past_the_clocks_range_keeps_the_probe_not_frees_it_at_once() {
        // Before, `now + probe_timeout` that did not fit the clock fell back to `now`: every
        // probe expired as it was let through, and the next call was let through as another.
        let (mut breaker, t0) = opened(BreakerConfig {
            probe_timeout_secs: u64::MAX,
            ..config()
        });
        let now = t0 + 30 * SEC;
        let _probe = permit(&mut breaker, now);
        let rejected = breaker
            .allow(now + SEC)
            .expect_err("the probe holds its slot");
        assert_eq!(rejected.reason, RejectReason::ProbesBusy);
    }

    #[test]
    fn a_probe_reported_after_its_timeout_still_closes_it() {
        let (mut breaker, t0) = opened(config());
        let slow = permit(&mut breaker, t0 + 30 * SEC);
        let other = breaker
            .allow(t0 + 95 * SEC)
            .expect("the slow probe's slot expired");
        assert_eq!(
            breaker.on_success(slow, t0 + 96 * SEC),
            Some(Transition::Closed)
        );
        assert_eq!(
            breaker.on_failure(other.permit, t0 + 97 * SEC),
            None,
            "decided already"
        );
        assert_eq!(breaker.state(t0 + 97 * SEC), BreakerState::Closed);
    }

    #[test]
    fn the_failure_rate_opens_it_once_the_window_holds_enough_calls() {
        let t0 = Instant::now();
        let config = BreakerConfig {
            failure_threshold: 0,
            failure_rate: 0.5,
            min_calls: 10,
            window_secs: 60,
            ..BreakerConfig::default()
        };
        let mut breaker = Breaker::new(config);
        // 4 of 9 failed: under the minimum number of calls and under the rate.
        for i in 0..9 {
            let outcome = if i % 2 == 0 {
                succeed(&mut breaker, t0)
            } else {
                fail(&mut breaker, t0)
            };
            assert_eq!(outcome, None);
        }
        assert_eq!(
            fail(&mut breaker, t0 + SEC),
            Some(Transition::Opened {
                reason: OpenReason::FailureRate {
                    failures: 5,
                    calls: 10
                },
                open_for: 30 * SEC
            })
        );
    }

    #[test]
    fn old_outcomes_leave_the_failure_rate_window() {
        let t0 = Instant::now();
        let config = BreakerConfig {
            failure_threshold: 0,
            failure_rate: 0.5,
            min_calls: 4,
            window_secs: 60,
            ..BreakerConfig::default()
        };
        let mut breaker = Breaker::new(config);
        for _ in 0..3 {
            assert_eq!(fail(&mut breaker, t0), None);
        }
        // A minute later those failures are gone: 1 failure in 4 calls is under the rate.
        let later = t0 + 61 * SEC;
        for _ in 0..3 {
            assert_eq!(succeed(&mut breaker, later), None);
        }
        assert_eq!(fail(&mut breaker, later), None);
        assert_eq!(breaker.state(later), BreakerState::Closed);
        // Inside the window they count: 3 failures of 4 calls.
        let mut breaker = Breaker::new(config);
        for _ in 0..2 {
            assert_eq!(fail(&mut breaker, t0), None);
        }
        assert_eq!(succeed(&mut breaker, t0 + 30 * SEC), None);
        assert!(matches!(
            fail(&mut breaker, t0 + 50 * SEC),
            Some(Transition::Opened {
                reason: OpenReason::FailureRate {
                    failures: 3,
                    calls: 4
                },
                ..
            })
        ));
    }

    #[test]
    fn the_failure_rate_rule_is_off_at_zero() {
        let t0 = Instant::now();
        let mut breaker = Breaker::new(BreakerConfig {
            failure_threshold: 0,
            failure_rate: 0.0,
            ..BreakerConfig::default()
        });
        for _ in 0..1000 {
            assert_eq!(fail(&mut breaker, t0), None);
        }
        let mut breaker = Breaker::new(BreakerConfig {
            failure_threshold: 0,
            window_secs: 0,
            min_calls: 1,
            ..BreakerConfig::default()
        });
        for _ in 0..100 {
            assert_eq!(fail(&mut breaker, t0), None, "a zero window counts nothing");
        }
    }

    #[test]
    fn absurd_settings_do_not_panic() {
        let t0 = Instant::now();
        let mut breaker = Breaker::new(BreakerConfig {
            failure_threshold: 1,
            open_secs: u64::MAX,
            max_open_secs: u64::MAX,
            half_open_probes: 0,
            probe_timeout_secs: u64::MAX,
            ..BreakerConfig::default()
        });
        assert!(matches!(
            fail(&mut breaker, t0),
            Some(Transition::Opened { .. })
        ));
        assert!(breaker.allow(t0 + 1000 * SEC).is_err());
        assert!(matches!(breaker.state(t0), BreakerState::Open { .. }));
    }

    #[test]
    fn names_and_reasons_read_well() {
        assert_eq!(BreakerState::Closed.name(), "closed");
        assert_eq!(BreakerState::Open { retry_in: SEC }.name(), "open");
        assert_eq!(BreakerState::HalfOpen.name(), "half_open");
        assert_eq!(
            OpenReason::ConsecutiveFailures { failures: 5 }.to_string(),
            "5 consecutive failures"
        );
        assert_eq!(
            OpenReason::FailureRate {
                failures: 6,
                calls: 10
            }
            .to_string(),
            "6 of the last 10 calls failed"
        );
        assert_eq!(
            OpenReason::ProbeFailed.to_string(),
            "the half-open probe failed"
        );
        let rejected = Rejected {
            retry_in: SEC,
            reason: RejectReason::Open,
        };
        assert!(rejected.to_string().contains("retry in 1s"), "{rejected}");
    }

    #[test]
    fn config_reads_the_design_table_and_defaults_the_rest() {
        let config: BreakerConfig = serde_json::from_str(
            r#"{"failure_threshold": 3, "open_secs": 10, "half_open_probes": 2}"#,
        )
        .expect("valid");
        assert_eq!(
            config,
            BreakerConfig {
                failure_threshold: 3,
                open_secs: 10,
                half_open_probes: 2,
                ..BreakerConfig::default()
            }
        );
        assert!(serde_json::from_str::<BreakerConfig>(r#"{"open_sec": 10}"#).is_err());
    }
}
