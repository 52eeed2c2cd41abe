//! Provider calls through the node tree with a scripted client, under paused time: waiting as
//! told, retries, the breaker's cycle with fallback, concurrency, budgets, streamed answers, and
//! a restart of the provider's actor while a call is in flight.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::Notify;
use tokio::time::Instant;

use troupe_actors::event::{EventData, EventFilter, Subscription};
use troupe_actors::ids::{ActorPath, NodeId, SessionId};
use troupe_actors::kernel::FaultKind;
use troupe_actors::node::{NodePorts, NodeTree, NodeTreeConfig};
use troupe_actors::provider::*;
use troupe_actors::supervisor::Backoff;

use crate::support::*;

/// What the scripted provider does with one call.
#[derive(Clone)]
enum Scripted {
    /// A complete answer.
    Answer(&'static str),
    /// An answer that streams on.
    Stream(&'static str),
    /// A failure.
    Fail(ErrorClass),
    /// A request the client refuses before sending (no key, one its API cannot carry).
    Refuse(ErrorClass),
    /// Waits for the gate, then answers.
    Gated(Arc<Notify>, &'static str),
}

#[derive(Default)]
struct ScriptedClient {
    /// Per model: the next calls, then the default.
    queued: Mutex<HashMap<String, VecDeque<Scripted>>>,
    defaults: Mutex<HashMap<String, Scripted>>,
    calls: Mutex<Vec<(String, Instant)>>,
    entered: Notify,
}

impl ScriptedClient {
    fn script(&self, model: &str, steps: impl IntoIterator<Item = Scripted>) {
        self.queued
            .lock()
            .unwrap()
            .entry(model.into())
            .or_default()
            .extend(steps);
    }

    fn always(&self, model: &str, step: Scripted) {
        self.defaults.lock().unwrap().insert(model.into(), step);
    }

    fn calls(&self, model: &str) -> Vec<Instant> {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .filter(|(m, _)| m == model)
            .map(|(_, at)| *at)
            .collect()
    }
}

/// The scripted provider's request: ignored, a label.
type Request = &'static str;

impl ProviderClient for ScriptedClient {
    type Request = Request;
    type Reply = String;

    fn send<'a>(
        &'a self,
        model: &'a str,
        _request: &'a Request,
    ) -> BoxFuture<'a, Result<Answer<String>, Failed>> {
        Box::pin(async move {
            self.calls
                .lock()
                .unwrap()
                .push((model.to_owned(), Instant::now()));
            self.entered.notify_one();
            let step = self
                .queued
                .lock()
                .unwrap()
                .get_mut(model)
                .and_then(VecDeque::pop_front)
                .or_else(|| self.defaults.lock().unwrap().get(model).cloned())
                .unwrap_or(Scripted::Answer("default"));
            let answer = |text: &str, progress| Answer {
                reply: text.to_owned(),
                rate_limits: Default::default(),
                progress,
            };
            match step {
                Scripted::Answer(text) => Ok(answer(text, Progress::Complete { tokens: Some(7) })),
                Scripted::Stream(text) => Ok(answer(text, Progress::Streaming)),
                Scripted::Fail(class) => Err(Failed {
                    class,
                    rate_limits: Default::default(),
                    reached_provider: true,
                }),
                Scripted::Refuse(class) => Err(Failed::before_sending(class)),
                Scripted::Gated(gate, text) => {
                    gate.notified().await;
                    Ok(answer(text, Progress::Complete { tokens: None }))
                }
            }
        })
    }
}

fn class(kind: ErrorKind, status: u16, retry_after: Option<Duration>) -> ErrorClass {
    ErrorClass {
        status: Some(status),
        retry_after,
        ..ErrorClass::of_kind(kind)
    }
}

fn provider(name: &str, configure: impl FnOnce(&mut ProviderSpec)) -> ProviderSpec {
    let mut spec = ProviderSpec::new(name);
    spec.policy.breaker.failure_rate = 0.0;
    configure(&mut spec);
    spec
}

struct Harness {
    tree: NodeTree,
    set: ProviderSet<ScriptedClient>,
    client: Arc<ScriptedClient>,
    events: Subscription,
}

impl Harness {
    async fn start(specs: Vec<ProviderSpec>) -> Self {
        quiet_intended_panics();
        let mut config = NodeTreeConfig::new(NodeId::new("n1").unwrap());
        config.supervision.backoff = Backoff {
            min: Duration::from_millis(10),
            max: Duration::from_millis(10),
        };
        let client = Arc::new(ScriptedClient::default());
        let actors: Vec<ProviderActorRef> = specs.into_iter().map(ProviderActorRef::new).collect();
        let set = ProviderSet::new(
            actors.iter().map(|a| (a.clone(), client.clone())).collect(),
            &BTreeMap::new(),
        )
        .unwrap();
        let tree = NodeTree::start(
            config,
            NodePorts {
                providers: actors,
                ..NodePorts::default()
            },
        )
        .await
        .unwrap();
        let events = tree.events.subscribe(EventFilter {
            kinds: vec!["provider.*".parse().unwrap()],
            ..EventFilter::all()
        });
        Self {
            tree,
            set,
            client,
            events,
        }
    }

    async fn call(&self, model: &str) -> Result<Committed<String>, CallError> {
        let route = self.set.route(model).unwrap();
        let meta = CallMeta {
            estimate_tokens: 100,
            session: Some(session()),
        };
        self.set.call(&route, &"request", &meta).await
    }

    /// The next provider event; it must carry the test's session.
    async fn next(&mut self) -> EventData {
        let event = next_event(&mut self.events).await;
        assert_eq!(
            event.session.as_ref(),
            Some(&session()),
            "{:?} without its session",
            event.kind()
        );
        event.data.clone()
    }

    async fn expect(&mut self, kind: &str) -> EventData {
        let data = self.next().await;
        assert_eq!(data.kind().as_str(), kind, "{data:?}");
        data
    }

    fn status(&self, name: &str) -> ProviderStatus {
        self.set
            .providers()
            .find(|p| p.name() == name)
            .unwrap()
            .status()
    }

    /// Lets every task run until all are idle (paused time: no real wait).
    async fn settle(&self) {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

fn session() -> SessionId {
    SessionId::new("s-chat").unwrap()
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_rate_limited_call_waits_as_told_then_succeeds() {
    let mut h = Harness::start(vec![provider("p", |_| {})]).await;
    h.client.script(
        "m",
        [
            Scripted::Fail(class(
                ErrorKind::RateLimited,
                429,
                Some(Duration::from_secs(2)),
            )),
            Scripted::Answer("hello"),
        ],
    );
    let committed = h.call("p/m").await.unwrap();
    assert_eq!(committed.reply, "hello");
    assert!(
        committed.stream.is_none(),
        "a complete answer needs no guard"
    );
    let calls = h.client.calls("m");
    assert_eq!(calls.len(), 2);
    assert!(
        calls[1] - calls[0] >= Duration::from_secs(2),
        "retried after {:?}",
        calls[1] - calls[0]
    );
    match h.expect("provider.rate_limited").await {
        EventData::ProviderRateLimited(limited) => {
            assert_eq!(limited.retry_after_ms, Some(2000));
            assert_eq!(
                (limited.provider.as_str(), limited.model.as_str()),
                ("p", "m")
            );
        }
        other => panic!("{other:?}"),
    }
    match h.expect("provider.retry").await {
        EventData::ProviderRetry(retry) => {
            assert_eq!(retry.attempt, 2);
            assert!(retry.delay_ms >= 2000);
        }
        other => panic!("{other:?}"),
    }
    h.settle().await;
    let counters = h.status("p").counters;
    assert_eq!(
        (counters.admitted, counters.succeeded, counters.retries),
        (2, 1, 1)
    );
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn exhausted_quota_is_not_retried_but_falls_back() {
    let mut h = Harness::start(vec![
        provider("p", |spec| spec.fallback = vec!["q/m".parse().unwrap()]),
        provider("q", |_| {}),
    ])
    .await;
    h.client.always(
        "m",
        Scripted::Fail(class(ErrorKind::QuotaExhausted, 429, None)),
    );
    let error = h.call("p/m").await.unwrap_err();
    assert!(
        matches!(&error, CallError::Failed { class, .. } if class.kind == ErrorKind::QuotaExhausted)
    );
    assert_eq!(
        h.client.calls("m").len(),
        2,
        "one attempt at p, one at its fallback q, no retries"
    );
    h.expect("provider.fallback").await;
    assert_eq!(h.status("p").counters.retries, 0);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_fallback_that_cannot_carry_the_request_is_passed_over() {
    let h = Harness::start(vec![
        provider("p", |spec| {
            spec.policy.retry.max_attempts = 1;
            spec.fallback = vec!["q/other".parse().unwrap(), "r/third".parse().unwrap()];
        }),
        provider("q", |_| {}),
        provider("r", |_| {}),
    ])
    .await;
    h.client.always(
        "m",
        Scripted::Fail(class(ErrorKind::ServerError, 503, None)),
    );
    h.client.always(
        "other",
        Scripted::Refuse(class(ErrorKind::BadRequest, 400, None)),
    );
    h.client.always(
        "third",
        Scripted::Fail(class(ErrorKind::ServerError, 502, None)),
    );
    // Every provider failed: the caller hears the last one that was asked, not q's refusal.
    let error = h.call("p/m").await.unwrap_err();
    assert!(
        matches!(&error, CallError::Failed { class, target, .. }
            if class.kind == ErrorKind::ServerError && target.provider == "r"),
        "{error}"
    );
    // With r answering, the call succeeds past q.
    h.client.always("third", Scripted::Answer("from r"));
    let answered = h.call("p/m").await.unwrap();
    assert_eq!(answered.reply, "from r");
    // A refusal by the first provider is still the answer: nothing before it failed.
    let error = h.call("q/other").await.unwrap_err();
    assert!(error.was_refused_before_sending(), "{error}");
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_context_overflow_neither_retries_nor_falls_back() {
    let h = Harness::start(vec![
        provider("p", |spec| spec.fallback = vec!["q/other".parse().unwrap()]),
        provider("q", |_| {}),
    ])
    .await;
    h.client.always(
        "m",
        Scripted::Fail(class(ErrorKind::ContextOverflow, 400, None)),
    );
    let error = h.call("p/m").await.unwrap_err();
    assert!(!error.allows_fallback(), "{error}");
    assert_eq!(h.client.calls("m").len(), 1);
    assert!(h.client.calls("other").is_empty());
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn server_errors_open_the_breaker_calls_fall_back_and_a_probe_closes_it() {
    let mut h = Harness::start(vec![
        provider("primary", |spec| {
            spec.fallback = vec!["backup/m".parse().unwrap()];
            spec.policy.retry.max_attempts = 1;
            spec.policy.breaker.failure_threshold = 5;
            spec.policy.breaker.open_secs = 30;
        }),
        provider("backup", |_| {}),
    ])
    .await;
    for call in 1..=5 {
        // Both serve the model `m`: the primary takes the first step (a 500), the backup the
        // second.
        h.client.script(
            "m",
            [
                Scripted::Fail(class(ErrorKind::ServerError, 500, None)),
                Scripted::Answer("backup"),
            ],
        );
        let committed = h.call("primary/m").await.unwrap();
        assert_eq!(committed.reply, "backup");
        assert_eq!(committed.target.provider, "backup");
        if call == 5 {
            let opened = h.expect("provider.breaker_opened").await;
            assert!(
                matches!(&opened, EventData::ProviderBreakerOpened(b) if b.open_for_ms == Some(30_000)),
                "{opened:?}"
            );
        }
        match h.expect("provider.fallback").await {
            EventData::ProviderFallback(fallback) => {
                assert_eq!(
                    (fallback.from.as_str(), fallback.to.as_str()),
                    ("primary/m", "backup/m")
                );
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(h.status("primary").breaker.state, "open");

    // While open, the primary is not even tried.
    let before = h.client.calls("m").len();
    h.client.script("m", [Scripted::Answer("backup")]);
    assert_eq!(h.call("primary/m").await.unwrap().target.provider, "backup");
    assert_eq!(
        h.client.calls("m").len(),
        before + 1,
        "only the backup was called"
    );
    h.expect("provider.fallback").await;

    // After the cool-down a probe goes through and succeeds.
    tokio::time::advance(Duration::from_secs(30)).await;
    h.client.script("m", [Scripted::Answer("primary")]);
    let committed = h.call("primary/m").await.unwrap();
    assert_eq!(
        (committed.reply.as_str(), committed.target.provider.as_str()),
        ("primary", "primary")
    );
    h.expect("provider.breaker_half_open").await;
    h.expect("provider.breaker_closed").await;
    h.expect("provider.recovered").await;
    h.settle().await;
    assert_eq!(h.status("primary").breaker.state, "closed");
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn the_concurrency_limit_makes_calls_take_turns() {
    let h = Arc::new(Harness::start(vec![provider("p", |spec| spec.max_concurrency = 1)]).await);
    let gate = Arc::new(Notify::new());
    h.client.always("m", Scripted::Gated(gate.clone(), "done"));
    let first = tokio::spawn({
        let h = h.clone();
        async move { h.call("p/m").await.map(|c| c.reply) }
    });
    let second = tokio::spawn({
        let h = h.clone();
        async move { h.call("p/m").await.map(|c| c.reply) }
    });
    h.settle().await;
    assert_eq!(
        h.client.calls("m").len(),
        1,
        "the second call waits for a slot"
    );
    let status = h.status("p");
    assert_eq!((status.in_flight, status.queued), (1, 1));
    gate.notify_one();
    h.client.entered.notified().await;
    gate.notify_one();
    assert_eq!(first.await.unwrap().unwrap(), "done");
    assert_eq!(second.await.unwrap().unwrap(), "done");
    assert_eq!(h.client.calls("m").len(), 2);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_call_waits_for_budget_instead_of_being_refused() {
    let mut h = Harness::start(vec![provider("p", |spec| spec.policy.budget.rpm = Some(1))]).await;
    let started = Instant::now();
    h.call("p/m").await.unwrap();
    h.call("p/m").await.unwrap();
    assert!(
        started.elapsed() >= Duration::from_secs(60),
        "one request per minute: the second waited {:?}",
        started.elapsed()
    );
    match h.expect("provider.rate_limited").await {
        EventData::ProviderRateLimited(limited) => {
            assert_eq!(
                limited.source,
                troupe_actors::event::RateLimitSource::Budget
            );
            assert_eq!(limited.retry_after_ms, Some(60_000));
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_max_wait_past_the_clocks_range_waits_for_budget_without_a_panic() {
    // Before, the call loop panicked adding its slack to `u64::MAX` seconds, and the actor's
    // deadline for a waiting call, which did not fit the clock, fell back to the present.
    let h = Harness::start(vec![provider("p", |spec| {
        spec.policy.budget.rpm = Some(1);
        spec.policy.retry.max_wait_secs = u64::MAX;
    })])
    .await;
    let started = Instant::now();
    h.call("p/m").await.unwrap();
    h.call("p/m")
        .await
        .expect("the second call waits for the budget");
    assert!(
        started.elapsed() >= Duration::from_secs(60),
        "one request per minute: the second waited {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_streamed_answer_is_reported_through_its_guard() {
    let h = Harness::start(vec![provider("p", |spec| spec.max_concurrency = 1)]).await;
    h.client.always("m", Scripted::Stream("chunk"));
    let committed = h.call("p/m").await.unwrap();
    let guard = committed.stream.expect("a streaming answer has a guard");
    assert_eq!(guard.target().to_string(), "p/m");
    h.settle().await;
    assert_eq!(
        h.status("p").in_flight,
        1,
        "in flight until its end is reported"
    );
    guard.succeed(Some(12));
    h.settle().await;
    let status = h.status("p");
    assert_eq!((status.in_flight, status.counters.succeeded), (0, 1));

    // A caller that drops the stream abandons the call, and its slot comes back.
    drop(h.call("p/m").await.unwrap().stream);
    h.settle().await;
    let status = h.status("p");
    assert_eq!((status.in_flight, status.counters.abandoned), (0, 1));

    // A failure after the first byte counts against the provider but is not retried.
    let guard = h.call("p/m").await.unwrap().stream.unwrap();
    guard.fail(class(ErrorKind::Connection, 200, None));
    h.settle().await;
    let status = h.status("p");
    assert_eq!((status.counters.failed, status.counters.retries), (1, 0));
    assert_eq!(status.recent_errors.len(), 1);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_restart_of_the_provider_actor_does_not_lose_a_call_in_flight() {
    let h = Arc::new(Harness::start(vec![provider("p", |spec| spec.max_concurrency = 1)]).await);
    let gate = Arc::new(Notify::new());
    h.client
        .script("m", [Scripted::Gated(gate.clone(), "survived")]);
    let call = tokio::spawn({
        let h = h.clone();
        async move { h.call("p/m").await.map(|c| c.reply) }
    });
    h.client.entered.notified().await;
    let path = ActorPath::root().child("providers").child("p");
    h.tree.inject_fault(&path, FaultKind::Panic).unwrap();
    h.settle().await;
    gate.notify_one();
    assert_eq!(call.await.unwrap().unwrap(), "survived");
    // The new instance has a free slot: the old ticket is not counted against it.
    h.client.always("m", Scripted::Answer("after"));
    assert_eq!(h.call("p/m").await.unwrap().reply, "after");
    assert!(
        h.tree
            .directory
            .get(&path)
            .unwrap()
            .control
            .stats()
            .snapshot()
            .restarts
            >= 1
    );
}
