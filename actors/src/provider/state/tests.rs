//! The provider state machine driven with explicit instants: admission, waiting, refusals,
//! retries, the breaker's cycle and the events each step announces.

use std::sync::atomic::{AtomicBool, Ordering};

use super::*;
use crate::provider::{BreakerConfig, BudgetConfig, ProviderPolicyConfig, RetryConfig};

#[derive(Debug, Clone)]
struct TestWaiter {
    id: u32,
    gone: Arc<AtomicBool>,
}

impl TestWaiter {
    fn new(id: u32) -> Self {
        Self {
            id,
            gone: Arc::new(AtomicBool::new(false)),
        }
    }
}

impl Waiter for TestWaiter {
    fn is_gone(&self) -> bool {
        self.gone.load(Ordering::Relaxed)
    }
}

fn spec(configure: impl FnOnce(&mut ProviderSpec)) -> Arc<ProviderShared> {
    let mut spec = ProviderSpec::new("openai");
    spec.policy = ProviderPolicyConfig {
        budget: BudgetConfig::default(),
        breaker: BreakerConfig {
            failure_threshold: 5,
            open_secs: 30,
            failure_rate: 0.0,
            ..BreakerConfig::default()
        },
        retry: RetryConfig::default(),
    };
    configure(&mut spec);
    Arc::new(ProviderShared::new(Arc::new(spec), Instant::now()))
}

fn request(attempt: u32, estimate: u32) -> AdmitRequest {
    AdmitRequest {
        model: "gpt-4o".into(),
        estimate_tokens: estimate,
        session: Some(SessionId::new("s-1").unwrap()),
        attempt,
        waited: Duration::ZERO,
    }
}

fn secs(secs: u64) -> Duration {
    Duration::from_secs(secs)
}

/// The answers in `effects`, by waiter id.
fn replies(effects: &[Effect<TestWaiter>]) -> Vec<(u32, Admission)> {
    effects
        .iter()
        .filter_map(|effect| match effect {
            Effect::Reply(waiter, admission) => Some((waiter.id, admission.clone())),
            _ => None,
        })
        .collect()
}

fn events(effects: &[Effect<TestWaiter>]) -> Vec<EventData> {
    effects
        .iter()
        .filter_map(|effect| match effect {
            Effect::Publish(session, data) => {
                assert_eq!(session.as_ref().map(SessionId::as_str), Some("s-1"));
                Some(data.clone())
            }
            _ => None,
        })
        .collect()
}

fn kinds(effects: &[Effect<TestWaiter>]) -> Vec<&'static str> {
    events(effects).iter().map(|e| e.kind().as_str()).collect()
}

fn admitted(effects: &[Effect<TestWaiter>]) -> Ticket {
    match replies(effects).as_slice() {
        [(_, Admission::Admitted(ticket))] => *ticket,
        other => panic!("expected one admission, got {other:?}"),
    }
}

fn report(ticket: Ticket, outcome: Outcome) -> Report {
    Report {
        ticket: ticket.id,
        model: "gpt-4o".into(),
        session: Some(SessionId::new("s-1").unwrap()),
        outcome,
        rate_limits: RateLimitSnapshot::default(),
        latency: Duration::from_millis(100),
        attempt: 1,
        waited: Duration::ZERO,
    }
}

fn failed(kind: ErrorKind, status: u16) -> Outcome {
    Outcome::Failed {
        class: ErrorClass {
            status: Some(status),
            ..ErrorClass::of_kind(kind)
        },
        reached_provider: true,
    }
}

fn finish(
    state: &mut ProviderState<TestWaiter>,
    report: Report,
    now: Instant,
) -> (Option<NextStep>, Vec<Effect<TestWaiter>>) {
    state.finish(report, true, now, Timestamp::now(), 0.5)
}

#[test]
fn a_call_within_the_limits_is_admitted_at_once() {
    let now = Instant::now();
    let shared = spec(|spec| spec.policy.budget.rpm = Some(10));
    let mut state = ProviderState::new(shared.clone(), 1, now);
    let ticket = admitted(&state.admit(request(1, 100), TestWaiter::new(1), now));
    assert!(!ticket.probe);
    assert_eq!((state.in_flight(), state.queued()), (1, 0));
    let (next, effects) = finish(
        &mut state,
        report(ticket, Outcome::Succeeded { tokens: Some(40) }),
        now,
    );
    assert_eq!(next, None, "successes need no next step");
    assert!(effects.is_empty(), "{effects:?}");
    assert_eq!(state.in_flight(), 0);
    let counters = shared.stats.counters();
    assert_eq!((counters.admitted, counters.succeeded), (1, 1));
    assert_eq!(
        state.snapshot().budget.remaining(now).requests,
        Some(9),
        "the request stays spent"
    );
}

#[test]
fn a_full_concurrency_limit_makes_calls_wait_for_a_slot() {
    let now = Instant::now();
    let mut state = ProviderState::new(spec(|spec| spec.max_concurrency = 1), 1, now);
    let first = admitted(&state.admit(request(1, 10), TestWaiter::new(1), now));
    let waiting = state.admit(request(1, 10), TestWaiter::new(2), now);
    assert!(replies(&waiting).is_empty(), "the second call waits");
    assert_eq!(state.queued(), 1);
    let later = now + secs(1);
    let (_, effects) = finish(
        &mut state,
        report(first, Outcome::Succeeded { tokens: None }),
        later,
    );
    assert!(matches!(
        replies(&effects).as_slice(),
        [(2, Admission::Admitted(_))]
    ));
}

#[test]
fn a_call_waits_for_budget_and_is_admitted_when_it_refills() {
    let now = Instant::now();
    // One request per minute.
    let mut state = ProviderState::new(spec(|spec| spec.policy.budget.rpm = Some(1)), 1, now);
    admitted(&state.admit(request(1, 10), TestWaiter::new(1), now));
    let effects = state.admit(request(1, 10), TestWaiter::new(2), now);
    assert!(replies(&effects).is_empty());
    let announced = events(&effects);
    assert!(
        matches!(
            announced.as_slice(),
            [EventData::ProviderRateLimited(ProviderRateLimited {
                source: RateLimitSource::Budget,
                retry_after_ms: Some(60_000),
                ..
            })]
        ),
        "{announced:?}"
    );
    let wake = state.next_wake().expect("a wake-up is due");
    assert_eq!(wake, now + secs(60));
    assert!(
        replies(&state.wake(now + secs(59))).is_empty(),
        "not yet refilled"
    );
    let effects = state.wake(wake);
    assert!(matches!(
        replies(&effects).as_slice(),
        [(2, Admission::Admitted(_))]
    ));
    assert!(kinds(&effects).is_empty(), "the wait is announced once");
}

#[test]
fn a_wait_longer_than_the_allowance_is_refused_with_a_hint() {
    let now = Instant::now();
    let mut state = ProviderState::new(
        spec(|spec| {
            spec.policy.budget.rpm = Some(1);
            spec.policy.retry.max_wait_secs = 10;
        }),
        1,
        now,
    );
    admitted(&state.admit(request(1, 10), TestWaiter::new(1), now));
    let effects = state.admit(request(1, 10), TestWaiter::new(2), now);
    assert_eq!(
        replies(&effects),
        [(
            2,
            Admission::Refused(Refusal::Throttled {
                retry_after: secs(60),
                limit: LocalLimit::Requests
            })
        )]
    );
    assert_eq!(kinds(&effects), ["provider.rate_limited"]);
}

#[test]
fn a_call_larger_than_the_whole_budget_is_refused_at_once() {
    let now = Instant::now();
    let mut state = ProviderState::new(spec(|spec| spec.policy.budget.tpm = Some(100)), 1, now);
    let effects = state.admit(request(1, 101), TestWaiter::new(1), now);
    assert_eq!(
        replies(&effects),
        [(
            1,
            Admission::Refused(Refusal::TooLarge {
                dimension: WaitReason::Tokens,
                needed: 101,
                limit: 100
            })
        )]
    );
}

#[test]
fn the_queue_is_bounded() {
    let now = Instant::now();
    let mut state = ProviderState::new(
        spec(|spec| {
            spec.max_concurrency = 1;
            spec.max_queue = 1;
        }),
        1,
        now,
    );
    admitted(&state.admit(request(1, 10), TestWaiter::new(1), now));
    assert!(replies(&state.admit(request(1, 10), TestWaiter::new(2), now)).is_empty());
    let effects = state.admit(request(1, 10), TestWaiter::new(3), now);
    assert_eq!(
        replies(&effects),
        [(
            3,
            Admission::Refused(Refusal::Throttled {
                retry_after: secs(1),
                limit: LocalLimit::Queue
            })
        )]
    );
}

#[test]
fn callers_that_went_away_do_not_hold_places_in_a_full_queue() {
    let now = Instant::now();
    let mut state = ProviderState::new(
        spec(|spec| {
            spec.max_concurrency = 1;
            spec.max_queue = 2;
        }),
        1,
        now,
    );
    admitted(&state.admit(request(1, 10), TestWaiter::new(1), now));
    let (second, third) = (TestWaiter::new(2), TestWaiter::new(3));
    assert!(replies(&state.admit(request(1, 10), second.clone(), now)).is_empty());
    assert!(replies(&state.admit(request(1, 10), third.clone(), now)).is_empty());
    second.gone.store(true, Ordering::Relaxed);
    third.gone.store(true, Ordering::Relaxed);
    let effects = state.admit(request(1, 10), TestWaiter::new(4), now);
    assert!(replies(&effects).is_empty(), "queued, not refused");
    assert_eq!(state.queued(), 1);
    // A full queue of living callers still refuses.
    state.admit(request(1, 10), TestWaiter::new(5), now);
    assert!(matches!(
        replies(&state.admit(request(1, 10), TestWaiter::new(6), now)).as_slice(),
        [(
            6,
            Admission::Refused(Refusal::Throttled {
                limit: LocalLimit::Queue,
                ..
            })
        )]
    ));
}

#[test]
fn a_call_waiting_for_a_slot_past_its_allowance_is_refused() {
    let now = Instant::now();
    let mut state = ProviderState::new(
        spec(|spec| {
            spec.max_concurrency = 1;
            spec.policy.retry.max_wait_secs = 5;
        }),
        1,
        now,
    );
    admitted(&state.admit(request(1, 10), TestWaiter::new(1), now));
    let mut late = request(1, 10);
    late.waited = secs(2);
    state.admit(late, TestWaiter::new(2), now);
    assert_eq!(
        state.next_wake(),
        Some(now + secs(3)),
        "5 s allowed, 2 s used"
    );
    let effects = state.wake(now + secs(3));
    assert_eq!(
        replies(&effects),
        [(
            2,
            Admission::Refused(Refusal::Throttled {
                retry_after: secs(1),
                limit: LocalLimit::Concurrency
            })
        )]
    );
    assert_eq!(state.queued(), 0);
}

#[test]
fn a_caller_that_went_away_is_skipped() {
    let now = Instant::now();
    let mut state = ProviderState::new(spec(|spec| spec.max_concurrency = 1), 1, now);
    let first = admitted(&state.admit(request(1, 10), TestWaiter::new(1), now));
    let gone = TestWaiter::new(2);
    state.admit(request(1, 10), gone.clone(), now);
    state.admit(request(1, 10), TestWaiter::new(3), now);
    gone.gone.store(true, Ordering::Relaxed);
    let (_, effects) = finish(
        &mut state,
        report(first, Outcome::Succeeded { tokens: None }),
        now,
    );
    assert!(matches!(
        replies(&effects).as_slice(),
        [(3, Admission::Admitted(_))]
    ));
}

#[test]
fn a_429_with_retry_after_is_retried_after_at_least_that_long() {
    let now = Instant::now();
    let shared = spec(|_| {});
    let mut state = ProviderState::new(shared.clone(), 1, now);
    let ticket = admitted(&state.admit(request(1, 10), TestWaiter::new(1), now));
    let outcome = Outcome::Failed {
        class: ErrorClass {
            retry_after: Some(secs(2)),
            status: Some(429),
            ..ErrorClass::of_kind(ErrorKind::RateLimited)
        },
        reached_provider: true,
    };
    let (next, effects) = finish(&mut state, report(ticket, outcome), now);
    let Some(NextStep::Retry { delay }) = next else {
        panic!("a rate limit is retried: {next:?}");
    };
    assert!(delay >= secs(2), "{delay:?}");
    let announced = events(&effects);
    assert!(matches!(
        &announced[0],
        EventData::ProviderRateLimited(ProviderRateLimited {
            source: RateLimitSource::Provider,
            retry_after_ms: Some(2000),
            ..
        })
    ));
    assert!(matches!(
        &announced[1],
        EventData::ProviderRetry(ProviderRetry { attempt: 2, delay_ms, .. }) if *delay_ms == delay.as_millis() as u64
    ));
    let counters = shared.stats.counters();
    assert_eq!((counters.rate_limited, counters.retries), (1, 1));
    assert_eq!(
        state.snapshot().breaker.state(now),
        crate::provider::BreakerState::Closed,
        "rate limits do not count against the breaker"
    );
}

#[test]
fn exhausted_quota_is_never_retried() {
    let now = Instant::now();
    let mut state = ProviderState::new(spec(|_| {}), 1, now);
    let ticket = admitted(&state.admit(request(1, 10), TestWaiter::new(1), now));
    let (next, effects) = finish(
        &mut state,
        report(ticket, failed(ErrorKind::QuotaExhausted, 429)),
        now,
    );
    assert_eq!(next, Some(NextStep::GiveUp(GiveUpReason::NotRetryable)));
    assert!(!kinds(&effects).contains(&"provider.retry"));
}

#[test]
fn a_failure_nobody_asks_about_is_not_retried() {
    let now = Instant::now();
    let shared = spec(|_| {});
    let mut state = ProviderState::new(shared.clone(), 1, now);
    let ticket = admitted(&state.admit(request(1, 10), TestWaiter::new(1), now));
    let (next, effects) = state.finish(
        report(ticket, failed(ErrorKind::Connection, 200)),
        false,
        now,
        Timestamp::now(),
        0.5,
    );
    assert_eq!(next, None);
    assert!(!kinds(&effects).contains(&"provider.retry"));
    let counters = shared.stats.counters();
    assert_eq!((counters.failed, counters.retries), (1, 0));
}

#[test]
fn consecutive_server_errors_open_the_breaker_and_a_probe_closes_it() {
    let now = Instant::now();
    let shared = spec(|_| {});
    let mut state = ProviderState::new(shared.clone(), 1, now);
    let mut health = Vec::new();
    for attempt in 1..=5 {
        let ticket = admitted(&state.admit(request(1, 10), TestWaiter::new(attempt), now));
        let (_, effects) = finish(
            &mut state,
            report(ticket, failed(ErrorKind::ServerError, 500)),
            now,
        );
        health.extend(effects.iter().filter_map(|e| match e {
            Effect::Health(status, _) => Some(*status),
            _ => None,
        }));
        if attempt == 5 {
            assert!(kinds(&effects).contains(&"provider.breaker_opened"));
        } else {
            assert!(!kinds(&effects).contains(&"provider.breaker_opened"));
        }
    }
    assert_eq!(
        health,
        [HealthStatus::Degraded],
        "degraded once, at the first failure"
    );
    let effects = state.admit(request(1, 10), TestWaiter::new(9), now + secs(1));
    assert_eq!(
        replies(&effects),
        [(
            9,
            Admission::Refused(Refusal::BreakerOpen {
                retry_in: secs(29),
                reason: RejectReason::Open
            })
        )]
    );

    let after = now + secs(30);
    let effects = state.admit(request(1, 10), TestWaiter::new(10), after);
    let probe = admitted(&effects);
    assert!(probe.probe);
    assert_eq!(kinds(&effects), ["provider.breaker_half_open"]);
    let (_, effects) = finish(
        &mut state,
        report(probe, Outcome::Succeeded { tokens: None }),
        after,
    );
    assert_eq!(
        kinds(&effects),
        ["provider.breaker_closed", "provider.recovered"]
    );
    assert!(
        effects
            .iter()
            .any(|e| matches!(e, Effect::Health(HealthStatus::Healthy, _)))
    );
    let counters = shared.stats.counters();
    assert_eq!(
        (
            counters.failed,
            counters.breaker_opened,
            counters.breaker_rejections
        ),
        (5, 1, 1)
    );
    assert_eq!(state.snapshot().recent_errors.len(), 5);
}

#[test]
fn a_client_error_is_an_answer_for_the_breaker() {
    let now = Instant::now();
    let mut state = ProviderState::new(
        spec(|spec| spec.policy.breaker.failure_threshold = 2),
        1,
        now,
    );
    for kind in [
        ErrorKind::ServerError,
        ErrorKind::BadRequest,
        ErrorKind::ServerError,
    ] {
        let ticket = admitted(&state.admit(request(1, 10), TestWaiter::new(1), now));
        let (next, effects) = finish(&mut state, report(ticket, failed(kind, 500)), now);
        assert!(!kinds(&effects).contains(&"provider.breaker_opened"));
        if kind == ErrorKind::BadRequest {
            assert_eq!(next, Some(NextStep::GiveUp(GiveUpReason::NotRetryable)));
        }
    }
}

/// Open the breaker (five server errors), then let its cool-down pass: the next call is the
/// half-open probe.
fn open_then_probe(state: &mut ProviderState<TestWaiter>, now: Instant) -> (Ticket, Instant) {
    for attempt in 1..=5 {
        let ticket = admitted(&state.admit(request(1, 10), TestWaiter::new(attempt), now));
        finish(
            state,
            report(ticket, failed(ErrorKind::ServerError, 500)),
            now,
        );
    }
    let after = now + secs(30);
    let probe = admitted(&state.admit(request(1, 10), TestWaiter::new(10), after));
    assert!(probe.probe);
    (probe, after)
}

#[test]
fn a_call_refused_before_it_was_sent_says_nothing_to_the_breaker() {
    let before_sending = || Outcome::Failed {
        class: ErrorClass::of_kind(ErrorKind::BadRequest),
        reached_provider: false,
    };
    // Half-open: the probe never reached the provider, so the breaker stays half-open and the
    // next call is the probe.
    let now = Instant::now();
    let mut state = ProviderState::new(spec(|_| {}), 1, now);
    let (probe, after) = open_then_probe(&mut state, now);
    let (_, effects) = finish(&mut state, report(probe, before_sending()), after);
    assert!(kinds(&effects).is_empty(), "{:?}", kinds(&effects));
    let next = admitted(&state.admit(request(1, 10), TestWaiter::new(11), after));
    assert!(next.probe, "the probe's place was given back");
    let (_, effects) = finish(
        &mut state,
        report(next, failed(ErrorKind::ServerError, 500)),
        after,
    );
    assert!(kinds(&effects).contains(&"provider.breaker_opened"));

    // Closed: such calls between server errors do not reset the count of consecutive failures.
    let mut state = ProviderState::new(
        spec(|spec| spec.policy.breaker.failure_threshold = 2),
        1,
        now,
    );
    let mut opened = false;
    for outcome in [
        failed(ErrorKind::ServerError, 500),
        before_sending(),
        failed(ErrorKind::ServerError, 500),
    ] {
        let ticket = admitted(&state.admit(request(1, 10), TestWaiter::new(1), now));
        let (_, effects) = finish(&mut state, report(ticket, outcome), now);
        opened |= kinds(&effects).contains(&"provider.breaker_opened");
    }
    assert!(opened, "two server errors in a row open it");
}

#[test]
fn a_ticket_of_an_earlier_instance_changes_nothing_but_still_gets_an_answer() {
    let now = Instant::now();
    let shared = spec(|spec| spec.policy.budget.rpm = Some(10));
    let mut old = ProviderState::<TestWaiter>::new(shared.clone(), 1, now);
    let ticket = admitted(&old.admit(request(1, 10), TestWaiter::new(1), now));
    let mut new = ProviderState::new(shared, 2, now);
    let (next, _) = finish(
        &mut new,
        report(ticket, failed(ErrorKind::Timeout, 504)),
        now,
    );
    assert!(matches!(next, Some(NextStep::Retry { .. })));
    assert_eq!(new.snapshot().budget.remaining(now).requests, Some(10));
    assert_eq!(new.in_flight(), 0);
}

#[test]
fn headers_saying_nothing_is_left_are_announced_and_followed() {
    let now = Instant::now();
    let mut state = ProviderState::new(spec(|spec| spec.policy.budget.rpm = Some(100)), 1, now);
    let ticket = admitted(&state.admit(request(1, 10), TestWaiter::new(1), now));
    let mut done = report(ticket, Outcome::Succeeded { tokens: Some(5) });
    done.rate_limits = RateLimitSnapshot {
        requests_remaining: Some(0),
        requests_reset: Some(secs(6)),
        ..RateLimitSnapshot::default()
    };
    let (_, effects) = finish(&mut state, done, now);
    assert!(matches!(
        events(&effects).as_slice(),
        [EventData::ProviderRateLimited(ProviderRateLimited {
            source: RateLimitSource::Headers,
            retry_after_ms: Some(6000),
            ..
        })]
    ));
    let effects = state.admit(request(1, 10), TestWaiter::new(2), now);
    assert!(
        replies(&effects).is_empty(),
        "the next call waits for the provider's reset"
    );
}

#[test]
fn an_abandoned_call_that_never_reached_the_provider_gives_its_budget_back() {
    let now = Instant::now();
    let mut state = ProviderState::new(
        spec(|spec| {
            spec.policy.budget.rpm = Some(10);
            spec.policy.budget.tpm = Some(1000);
        }),
        1,
        now,
    );
    let ticket = admitted(&state.admit(request(1, 300), TestWaiter::new(1), now));
    let remaining = state.snapshot().budget.remaining(now);
    assert_eq!((remaining.requests, remaining.tokens), (Some(9), Some(700)));
    finish(
        &mut state,
        report(
            ticket,
            Outcome::Abandoned {
                reached_provider: false,
            },
        ),
        now,
    );
    let remaining = state.snapshot().budget.remaining(now);
    assert_eq!(
        (remaining.requests, remaining.tokens),
        (Some(10), Some(1000))
    );
}

#[test]
fn a_fallback_is_announced_by_the_provider_it_leaves() {
    let now = Instant::now();
    let shared = spec(|_| {});
    let mut state = ProviderState::<TestWaiter>::new(shared.clone(), 1, now);
    let effects = state.fell_back(
        "gpt-4o",
        &Target::new("anthropic", "claude"),
        "breaker open".into(),
        Some(SessionId::new("s-1").unwrap()),
    );
    assert!(matches!(
        events(&effects).as_slice(),
        [EventData::ProviderFallback(ProviderFallback { from, to, .. })]
            if from == "openai/gpt-4o" && to == "anthropic/claude"
    ));
    assert_eq!(shared.stats.counters().fallbacks, 1);
}

fn request_for(model: &str) -> AdmitRequest {
    AdmitRequest {
        model: model.into(),
        ..request(1, 10)
    }
}

/// A call to `model` admitted and reported back with "0 requests left, full in `reset`".
fn exhaust(state: &mut ProviderState<TestWaiter>, model: &str, reset: Duration, now: Instant) {
    let ticket = admitted(&state.admit(request_for(model), TestWaiter::new(0), now));
    let mut done = report(ticket, Outcome::Succeeded { tokens: Some(10) });
    done.model = model.into();
    done.rate_limits = RateLimitSnapshot {
        requests_remaining: Some(0),
        requests_reset: Some(reset),
        ..RateLimitSnapshot::default()
    };
    finish(state, done, now);
}

#[test]
fn headers_limit_the_model_they_came_with_not_the_whole_provider() {
    let now = Instant::now();
    let mut state = ProviderState::new(spec(|spec| spec.policy.budget.rpm = Some(100)), 1, now);
    exhaust(&mut state, "m1", secs(30), now);
    // m1 waits for its reset (announced as the headers' limit)…
    let effects = state.admit(request_for("m1"), TestWaiter::new(1), now);
    assert!(replies(&effects).is_empty(), "m1 waits");
    assert!(matches!(
        events(&effects).as_slice(),
        [EventData::ProviderRateLimited(ProviderRateLimited {
            source: RateLimitSource::Headers,
            retry_after_ms: Some(30_000),
            model,
            ..
        })] if model == "m1"
    ));
    // …while m2, queued behind it, goes at once, and so does a call to any other model.
    let effects = state.admit(request_for("m2"), TestWaiter::new(2), now);
    assert!(matches!(
        replies(&effects).as_slice(),
        [(2, Admission::Admitted(_))]
    ));
    let effects = state.admit(request_for("m3"), TestWaiter::new(3), now);
    assert!(matches!(
        replies(&effects).as_slice(),
        [(3, Admission::Admitted(_))]
    ));
    // A second call to m1 waits behind the first (FIFO per model).
    assert!(
        replies(&state.admit(request_for("m1"), TestWaiter::new(4), now)).is_empty(),
        "m1 still waits"
    );
    // The provider-wide budget took the four admitted calls and nothing from the headers.
    assert_eq!(state.snapshot().budget.remaining(now).requests, Some(97));
    // At m1's reset both its calls go, in order.
    assert_eq!(state.next_wake(), Some(now + secs(30)));
    let effects = state.wake(now + secs(30));
    let order: Vec<u32> = replies(&effects).iter().map(|(id, _)| *id).collect();
    assert_eq!(order, [1, 4]);
}

#[test]
fn a_models_reported_limit_past_the_allowance_is_refused_as_that_models() {
    let now = Instant::now();
    let mut state = ProviderState::new(spec(|spec| spec.policy.retry.max_wait_secs = 10), 1, now);
    exhaust(&mut state, "m1", secs(30), now);
    let effects = state.admit(request_for("m1"), TestWaiter::new(1), now);
    assert_eq!(
        replies(&effects),
        [(
            1,
            Admission::Refused(Refusal::Throttled {
                retry_after: secs(30),
                limit: LocalLimit::ModelRequests
            })
        )]
    );
    assert!(matches!(
        events(&effects).as_slice(),
        [EventData::ProviderRateLimited(ProviderRateLimited {
            source: RateLimitSource::Headers,
            ..
        })]
    ));
    admitted(&state.admit(request_for("m2"), TestWaiter::new(2), now));
}

#[test]
fn a_call_short_of_the_provider_wide_budget_still_holds_up_the_calls_behind_it() {
    let now = Instant::now();
    let mut state = ProviderState::new(spec(|spec| spec.policy.budget.rpm = Some(1)), 1, now);
    admitted(&state.admit(request_for("m1"), TestWaiter::new(1), now));
    assert!(replies(&state.admit(request_for("m1"), TestWaiter::new(2), now)).is_empty());
    assert!(
        replies(&state.admit(request_for("m2"), TestWaiter::new(3), now)).is_empty(),
        "the budget is the whole provider's: m2 waits its turn"
    );
}

#[test]
fn a_pass_dropped_unused_gives_its_models_reported_limit_back() {
    let now = Instant::now();
    let mut state = ProviderState::new(spec(|spec| spec.policy.budget.rpm = Some(100)), 1, now);
    // The provider reports one request left for m1 until a reset a minute away.
    let ticket = admitted(&state.admit(request_for("m1"), TestWaiter::new(0), now));
    let mut done = report(ticket, Outcome::Succeeded { tokens: Some(10) });
    done.model = "m1".into();
    done.rate_limits = RateLimitSnapshot {
        requests_remaining: Some(1),
        requests_reset: Some(secs(60)),
        ..RateLimitSnapshot::default()
    };
    finish(&mut state, done, now);
    // The next call takes it; its pass is dropped before it is used, and reports as a dropped
    // `Pass` does: abandoned before sending, naming no model.
    let ticket = admitted(&state.admit(request_for("m1"), TestWaiter::new(1), now));
    let mut dropped = report(
        ticket,
        Outcome::Abandoned {
            reached_provider: false,
        },
    );
    dropped.model = String::new();
    dropped.session = None;
    finish(&mut state, dropped, now);
    // Nothing was sent: m1's request is there again.
    admitted(&state.admit(request_for("m1"), TestWaiter::new(2), now));
}

#[test]
fn a_stream_that_broke_off_keeps_its_tokens_spent_as_an_abandoned_one_does() {
    let now = Instant::now();
    let mut state = ProviderState::new(
        spec(|spec| {
            spec.policy.budget.rpm = Some(10);
            spec.policy.budget.tpm = Some(1000);
        }),
        1,
        now,
    );
    let tokens_left =
        |state: &mut ProviderState<TestWaiter>| state.snapshot().budget.remaining(now).tokens;
    let overloaded = || ErrorClass {
        status: Some(529),
        ..ErrorClass::of_kind(ErrorKind::Overloaded)
    };
    // Broke off after it began: the provider charged the prompt and what it generated.
    let ticket = admitted(&state.admit(request(1, 300), TestWaiter::new(1), now));
    let broke = Outcome::BrokeOff {
        class: overloaded(),
        tokens: None,
    };
    let (next, _) = finish(&mut state, report(ticket, broke), now);
    assert_eq!(next, None, "never retried");
    assert_eq!(tokens_left(&mut state), Some(700));
    // Reported usage above the estimate counts in full.
    let ticket = admitted(&state.admit(request(1, 300), TestWaiter::new(2), now));
    let broke = Outcome::BrokeOff {
        class: overloaded(),
        tokens: Some(450),
    };
    finish(&mut state, report(ticket, broke), now);
    assert_eq!(tokens_left(&mut state), Some(250));
    // A failure before the first byte (the provider charges nothing) gives its tokens back…
    let ticket = admitted(&state.admit(request(1, 200), TestWaiter::new(3), now));
    finish(
        &mut state,
        report(ticket, failed(ErrorKind::Overloaded, 529)),
        now,
    );
    assert_eq!(tokens_left(&mut state), Some(250));
    // …unless it timed out after it was sent: the provider may be generating still.
    let ticket = admitted(&state.admit(request(1, 200), TestWaiter::new(4), now));
    let timed_out = Outcome::Failed {
        class: ErrorClass::of_kind(ErrorKind::Timeout),
        reached_provider: true,
    };
    finish(&mut state, report(ticket, timed_out), now);
    assert_eq!(tokens_left(&mut state), Some(50));
    let counters = state.shared.stats.counters();
    assert_eq!((counters.failed, counters.retries), (4, 2));
}

#[test]
fn a_call_expiring_behind_a_budget_short_call_is_refused_with_the_budgets_wait() {
    let now = Instant::now();
    let mut state = ProviderState::new(
        spec(|spec| {
            spec.policy.budget.tpm = Some(6000);
            spec.policy.retry.max_wait_secs = 60;
        }),
        1,
        now,
    );
    admitted(&state.admit(request(1, 4000), TestWaiter::new(1), now));
    // 2000 tokens left, refilled at 100 a second: the next 4000 wait 20 s.
    assert!(replies(&state.admit(request(1, 4000), TestWaiter::new(2), now)).is_empty());
    // A small call behind it, with 5 s of its allowance left, waits its turn and runs out.
    let mut late = request(1, 100);
    late.waited = secs(55);
    assert!(replies(&state.admit(late, TestWaiter::new(3), now)).is_empty());
    let effects = state.wake(now + secs(5));
    assert_eq!(
        replies(&effects),
        [(
            3,
            Admission::Refused(Refusal::Throttled {
                retry_after: secs(15),
                limit: LocalLimit::Tokens
            })
        )],
        "held up by the tokens the call ahead waits for, 15 s more"
    );
    assert!(matches!(
        events(&effects).as_slice(),
        [EventData::ProviderRateLimited(ProviderRateLimited {
            source: RateLimitSource::Budget,
            retry_after_ms: Some(15_000),
            ..
        })]
    ));
}

#[test]
fn a_call_expiring_behind_its_models_held_call_is_refused_with_the_models_reset() {
    let now = Instant::now();
    let mut state = ProviderState::new(spec(|spec| spec.policy.retry.max_wait_secs = 60), 1, now);
    exhaust(&mut state, "m1", secs(30), now);
    assert!(replies(&state.admit(request_for("m1"), TestWaiter::new(1), now)).is_empty());
    let mut late = request_for("m1");
    late.waited = secs(55);
    assert!(replies(&state.admit(late, TestWaiter::new(2), now)).is_empty());
    let effects = state.wake(now + secs(5));
    assert_eq!(
        replies(&effects),
        [(
            2,
            Admission::Refused(Refusal::Throttled {
                retry_after: secs(25),
                limit: LocalLimit::ModelRequests
            })
        )]
    );
    assert!(matches!(
        events(&effects).as_slice(),
        [EventData::ProviderRateLimited(ProviderRateLimited {
            source: RateLimitSource::Headers,
            retry_after_ms: Some(25_000),
            ..
        })]
    ));
}
