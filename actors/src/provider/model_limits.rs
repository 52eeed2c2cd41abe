//! What a provider's rate-limit headers said about each model's limits.
//!
//! OpenAI reports its `x-ratelimit-*` figures per model, Anthropic its `anthropic-ratelimit-*`
//! per model class: what one model's answer says is left tells nothing about another model. So
//! the figures are kept per model, as windows: "N requests (tokens) left until the reset",
//! learned from that model's answers, counted down by the calls sent to it, and forgotten at
//! the reset. A call to a model waits while one of its figures is at zero; calls to other
//! models go on. troupe's own `rpm` / `tpm` ([`Budget`](super::budget::Budget)) is separate:
//! the user's limit for the whole provider.
//!
//! Like the budget, the local figure stays the stricter: a provider figure above it changes
//! nothing (it may predate calls still on their way), one below it replaces it. A figure
//! without a reset time says nothing about when it comes back and is ignored.
//!
//! Pure: every method takes `now`. At most [`MAX_MODELS`] models are remembered (models come
//! from configuration and from requests); past that, expired windows go first, then the model
//! learned longest ago.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::budget::{Wait, WaitReason};
use super::headers::RateLimitSnapshot;

/// How many models' windows a provider remembers at most.
pub const MAX_MODELS: usize = 256;

/// The longest provider reset followed; beyond it a header is more likely wrong.
const MAX_RESET: Duration = Duration::from_secs(7 * 24 * 3600);

/// The per-model windows of one provider. See the module documentation.
#[derive(Debug, Clone)]
pub struct ModelLimits {
    models: HashMap<String, ModelWindows>,
    capacity: usize,
    /// Stamps windows (so that a charge knows whether its window is still the same) and orders
    /// models by when they were last learned.
    clock: u64,
}

#[derive(Debug, Clone, Copy)]
struct ModelWindows {
    requests: Option<Window>,
    tokens: Option<Window>,
    /// The clock when a header last changed them.
    learned: u64,
}

/// Units the provider still accepts until `until`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Window {
    left: u64,
    until: Instant,
    stamp: u64,
}

/// What one call took from its model's windows. Give it back exactly once, through
/// [`ModelLimits::reconcile`] (the call reached the provider) or [`ModelLimits::release`] (it
/// never did). Empty when the model had no window.
#[must_use = "a charge must be reconciled or released"]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ModelCharge {
    /// The stamp of the request window one request was taken from.
    requests: Option<u64>,
    /// The stamp of the token window, and the tokens taken from it.
    tokens: Option<(u64, u64)>,
}

impl Default for ModelLimits {
    fn default() -> Self {
        Self::new()
    }
}

impl ModelLimits {
    /// No window, remembering at most [`MAX_MODELS`] models.
    pub fn new() -> Self {
        Self::with_capacity(MAX_MODELS)
    }

    /// No window, remembering at most `capacity` models (at least one).
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            models: HashMap::new(),
            capacity: capacity.max(1),
            clock: 0,
        }
    }

    /// Models with a window open (some may have expired since `now`).
    pub fn len(&self) -> usize {
        self.models.len()
    }

    /// True when no model has a window.
    pub fn is_empty(&self) -> bool {
        self.models.is_empty()
    }

    /// How long a call to `model` must wait for its reported limits: `None` when it may go now.
    /// When both figures are at zero, the later reset wins.
    pub fn wait(&mut self, model: &str, now: Instant) -> Option<Wait> {
        let windows = self.live(model, now)?;
        let blocked = |window: Option<Window>| {
            window
                .filter(|window| window.left == 0)
                .map(|window| window.until.saturating_duration_since(now))
        };
        match (blocked(windows.requests), blocked(windows.tokens)) {
            (None, None) => None,
            (requests, Some(tokens)) if requests.is_none_or(|requests| tokens > requests) => {
                Some(Wait {
                    retry_in: tokens,
                    reason: WaitReason::Tokens,
                })
            }
            (requests, _) => requests.map(|retry_in| Wait {
                retry_in,
                reason: WaitReason::Requests,
            }),
        }
    }

    /// Counts one call of `estimate_tokens` against `model`'s windows: one request, and the
    /// estimate (never below zero). Call after [`wait`](Self::wait) said it may go.
    pub fn take(&mut self, model: &str, estimate_tokens: u32, now: Instant) -> ModelCharge {
        let Some(windows) = self.live(model, now) else {
            return ModelCharge::default();
        };
        let mut charge = ModelCharge::default();
        if let Some(window) = &mut windows.requests {
            window.left = window.left.saturating_sub(1);
            charge.requests = Some(window.stamp);
        }
        if let Some(window) = &mut windows.tokens {
            let taken = window.left.min(u64::from(estimate_tokens));
            window.left -= taken;
            charge.tokens = Some((window.stamp, taken));
        }
        charge
    }

    /// The call reached the provider and used `actual_tokens`: the request stays spent; the
    /// tokens are corrected from the estimate to what was used (never below zero). A window
    /// replaced since the call was counted is left alone: the provider's newer figure stands.
    pub fn reconcile(
        &mut self,
        model: &str,
        charge: ModelCharge,
        actual_tokens: u32,
        now: Instant,
    ) {
        let Some((stamp, taken)) = charge.tokens else {
            return;
        };
        if let Some(windows) = self.live(model, now)
            && let Some(window) = &mut windows.tokens
            && window.stamp == stamp
        {
            let actual = u64::from(actual_tokens);
            window.left = if actual < taken {
                window.left.saturating_add(taken - actual)
            } else {
                window.left.saturating_sub(actual - taken)
            };
        }
    }

    /// The call never reached the provider: gives back what it took, unless its window was
    /// replaced since.
    pub fn release(&mut self, model: &str, charge: ModelCharge, now: Instant) {
        if charge == ModelCharge::default() {
            return;
        }
        let Some(windows) = self.live(model, now) else {
            return;
        };
        if let (Some(stamp), Some(window)) = (charge.requests, &mut windows.requests)
            && window.stamp == stamp
        {
            window.left = window.left.saturating_add(1);
        }
        if let (Some((stamp, taken)), Some(window)) = (charge.tokens, &mut windows.tokens)
            && window.stamp == stamp
        {
            window.left = window.left.saturating_add(taken);
        }
    }

    /// What `model`'s answer said is left: lowers its windows to the provider's figures until
    /// their resets.
    pub fn learn(&mut self, model: &str, snapshot: &RateLimitSnapshot, now: Instant) {
        let requests = figure(snapshot.requests_remaining, snapshot.requests_reset, now);
        let tokens = figure(snapshot.tokens_remaining, snapshot.tokens_reset, now);
        if requests.is_none() && tokens.is_none() {
            return;
        }
        if !self.models.contains_key(model) {
            self.make_room(now);
        }
        self.clock += 1;
        let stamp = self.clock;
        let windows = self.models.entry(model.to_owned()).or_insert(ModelWindows {
            requests: None,
            tokens: None,
            learned: stamp,
        });
        windows.expire(now);
        let lowered_requests = lower(&mut windows.requests, requests, stamp);
        let lowered_tokens = lower(&mut windows.tokens, tokens, stamp);
        if lowered_requests || lowered_tokens {
            windows.learned = stamp;
        }
        if windows.is_empty() {
            self.models.remove(model);
        }
    }

    /// `model`'s windows that have not expired by `now`; a model left with none is forgotten.
    fn live(&mut self, model: &str, now: Instant) -> Option<&mut ModelWindows> {
        let windows = self.models.get_mut(model)?;
        windows.expire(now);
        if windows.is_empty() {
            self.models.remove(model);
            return None;
        }
        self.models.get_mut(model)
    }

    /// Makes room for one more model: forgets expired windows, then, if still full, the model
    /// learned longest ago.
    fn make_room(&mut self, now: Instant) {
        if self.models.len() < self.capacity {
            return;
        }
        self.models.retain(|_, windows| {
            windows.expire(now);
            !windows.is_empty()
        });
        while self.models.len() >= self.capacity {
            let oldest = self
                .models
                .iter()
                .min_by_key(|(_, windows)| windows.learned)
                .map(|(model, _)| model.clone());
            match oldest {
                Some(model) => self.models.remove(&model),
                None => break,
            };
        }
    }
}

impl ModelWindows {
    fn expire(&mut self, now: Instant) {
        for window in [&mut self.requests, &mut self.tokens] {
            if window.is_some_and(|window| window.until <= now) {
                *window = None;
            }
        }
    }

    fn is_empty(&self) -> bool {
        self.requests.is_none() && self.tokens.is_none()
    }
}

/// A provider figure with its reset, as (left, until); `None` without a usable reset.
fn figure(remaining: Option<u64>, reset: Option<Duration>, now: Instant) -> Option<(u64, Instant)> {
    let reset = reset.filter(|reset| !reset.is_zero())?;
    Some((remaining?, now.checked_add(reset.min(MAX_RESET))?))
}

/// Replaces `window` with the figure when there is none or the figure is lower. True when it
/// changed.
fn lower(window: &mut Option<Window>, figure: Option<(u64, Instant)>, stamp: u64) -> bool {
    let Some((left, until)) = figure else {
        return false;
    };
    if window.is_some_and(|window| left >= window.left) {
        return false;
    }
    *window = Some(Window { left, until, stamp });
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: Duration = Duration::from_secs(1);

    fn snapshot(
        requests: Option<u64>,
        requests_reset: Option<Duration>,
        tokens: Option<u64>,
        tokens_reset: Option<Duration>,
    ) -> RateLimitSnapshot {
        RateLimitSnapshot {
            requests_remaining: requests,
            tokens_remaining: tokens,
            requests_reset,
            tokens_reset,
        }
    }

    fn requests_left(n: u64, reset: Duration) -> RateLimitSnapshot {
        snapshot(Some(n), Some(reset), None, None)
    }

    #[test]
    fn an_empty_figure_blocks_its_model_only_until_the_reset() {
        let t0 = Instant::now();
        let mut limits = ModelLimits::new();
        limits.learn("m1", &requests_left(0, 30 * SEC), t0);
        assert_eq!(
            limits.wait("m1", t0 + SEC),
            Some(Wait {
                retry_in: 29 * SEC,
                reason: WaitReason::Requests
            })
        );
        assert_eq!(limits.wait("m2", t0), None, "another model is not held up");
        let _free = limits.take("m2", 1000, t0);
        assert_eq!(limits.wait("m1", t0 + 30 * SEC), None, "the reset passed");
        assert!(limits.is_empty(), "an expired window is forgotten");
    }

    #[test]
    fn calls_count_the_figures_down_to_zero() {
        let t0 = Instant::now();
        let mut limits = ModelLimits::new();
        limits.learn(
            "m1",
            &snapshot(Some(2), Some(10 * SEC), Some(5000), Some(4 * SEC)),
            t0,
        );
        let _a = limits.take("m1", 100, t0);
        assert_eq!(limits.wait("m1", t0), None);
        let _b = limits.take("m1", 100, t0);
        assert_eq!(
            limits.wait("m1", t0),
            Some(Wait {
                retry_in: 10 * SEC,
                reason: WaitReason::Requests
            })
        );
        // Tokens run out first (a call takes what is left, never more): the later reset wins.
        let mut limits = ModelLimits::new();
        limits.learn(
            "m1",
            &snapshot(Some(5), Some(SEC), Some(150), Some(4 * SEC)),
            t0,
        );
        let _a = limits.take("m1", 100, t0);
        assert_eq!(limits.wait("m1", t0), None, "50 tokens are left");
        let _b = limits.take("m1", 100, t0);
        assert_eq!(
            limits.wait("m1", t0),
            Some(Wait {
                retry_in: 4 * SEC,
                reason: WaitReason::Tokens
            })
        );
    }

    #[test]
    fn the_stricter_figure_stands_and_a_figure_without_reset_is_ignored() {
        let t0 = Instant::now();
        let mut limits = ModelLimits::new();
        limits.learn("m1", &requests_left(1, 10 * SEC), t0);
        // Higher figures (answers to calls sent before) do not raise it.
        limits.learn("m1", &requests_left(50, SEC), t0);
        let _a = limits.take("m1", 0, t0);
        assert!(limits.wait("m1", t0).is_some());
        // A lower one replaces it, with its own reset.
        let mut limits = ModelLimits::new();
        limits.learn("m1", &requests_left(5, 10 * SEC), t0);
        limits.learn("m1", &requests_left(0, 2 * SEC), t0);
        assert_eq!(limits.wait("m1", t0).map(|w| w.retry_in), Some(2 * SEC));
        // No reset, or a zero one: nothing is known about when it comes back.
        let mut limits = ModelLimits::new();
        limits.learn(
            "m1",
            &snapshot(Some(0), None, Some(0), Some(Duration::ZERO)),
            t0,
        );
        assert_eq!(limits.wait("m1", t0), None);
        assert!(limits.is_empty());
    }

    #[test]
    fn a_call_that_never_reached_the_provider_gives_back_what_it_took() {
        let t0 = Instant::now();
        let mut limits = ModelLimits::new();
        limits.learn(
            "m1",
            &snapshot(Some(1), Some(10 * SEC), Some(100), Some(10 * SEC)),
            t0,
        );
        let charge = limits.take("m1", 300, t0);
        assert!(limits.wait("m1", t0).is_some());
        limits.release("m1", charge, t0);
        assert_eq!(limits.wait("m1", t0), None);
        // Stale: the request window was replaced since the call was counted; the provider's
        // figure stands. The token window is still the same: its tokens come back.
        let mut limits = ModelLimits::new();
        limits.learn(
            "m1",
            &snapshot(Some(2), Some(10 * SEC), Some(100), Some(10 * SEC)),
            t0,
        );
        let charge = limits.take("m1", 300, t0);
        limits.learn("m1", &requests_left(0, 5 * SEC), t0);
        limits.release("m1", charge, t0);
        assert_eq!(
            limits.wait("m1", t0),
            Some(Wait {
                retry_in: 5 * SEC,
                reason: WaitReason::Requests
            })
        );
    }

    #[test]
    fn reconcile_corrects_the_tokens_from_the_estimate_to_what_was_used() {
        let t0 = Instant::now();
        let mut limits = ModelLimits::new();
        limits.learn(
            "m1",
            &snapshot(Some(10), Some(10 * SEC), Some(1000), Some(10 * SEC)),
            t0,
        );
        let charge = limits.take("m1", 1000, t0);
        assert_eq!(
            limits.wait("m1", t0).map(|w| w.reason),
            Some(WaitReason::Tokens)
        );
        limits.reconcile("m1", charge, 200, t0);
        assert_eq!(limits.wait("m1", t0), None, "800 tokens are back");
        let charge = limits.take("m1", 100, t0);
        limits.reconcile("m1", charge, 5000, t0);
        assert_eq!(
            limits.wait("m1", t0).map(|w| w.reason),
            Some(WaitReason::Tokens),
            "an overrun empties it, never below zero"
        );
        // The request stays spent.
        let mut limits = ModelLimits::new();
        limits.learn("m1", &requests_left(2, 10 * SEC), t0);
        let charge = limits.take("m1", 0, t0);
        limits.reconcile("m1", charge, 0, t0);
        let _b = limits.take("m1", 0, t0);
        assert!(limits.wait("m1", t0).is_some());
    }

    #[test]
    fn at_most_capacity_models_are_remembered_the_oldest_going_first() {
        let t0 = Instant::now();
        let mut limits = ModelLimits::with_capacity(3);
        for (index, model) in ["a", "b", "c"].into_iter().enumerate() {
            let reset = if model == "b" { SEC } else { 60 * SEC };
            limits.learn(model, &requests_left(0, reset), t0 + index as u32 * ms(1));
        }
        // Full: the expired window ("b") goes first.
        limits.learn("d", &requests_left(0, 60 * SEC), t0 + 2 * SEC);
        assert_eq!(limits.len(), 3);
        assert!(limits.wait("a", t0 + 2 * SEC).is_some());
        // Full again, nothing expired: the one learned longest ago ("a") goes.
        limits.learn("e", &requests_left(0, 60 * SEC), t0 + 2 * SEC);
        assert_eq!(limits.len(), 3);
        assert_eq!(limits.wait("a", t0 + 2 * SEC), None);
        for model in ["c", "d", "e"] {
            assert!(limits.wait(model, t0 + 2 * SEC).is_some(), "{model}");
        }
        // Many models, one at a time: the map never grows past its capacity.
        let mut limits = ModelLimits::new();
        for index in 0..1000 {
            limits.learn(&format!("m{index}"), &requests_left(0, 60 * SEC), t0);
        }
        assert_eq!(limits.len(), MAX_MODELS);
    }

    #[test]
    fn huge_values_neither_overflow_nor_panic() {
        let t0 = Instant::now();
        let mut limits = ModelLimits::new();
        limits.learn(
            "m1",
            &snapshot(
                Some(u64::MAX),
                Some(Duration::MAX),
                Some(u64::MAX),
                Some(Duration::MAX),
            ),
            t0,
        );
        let charge = limits.take("m1", u32::MAX, t0);
        limits.reconcile("m1", charge, 0, t0);
        limits.learn(
            "m1",
            &snapshot(Some(0), Some(Duration::MAX), Some(0), Some(Duration::MAX)),
            t0,
        );
        assert_eq!(limits.wait("m1", t0).map(|w| w.retry_in), Some(MAX_RESET));
        let charge = limits.take("m1", u32::MAX, t0);
        limits.release("m1", charge, t0);
    }

    fn ms(millis: u64) -> Duration {
        Duration::from_millis(millis)
    }
}
