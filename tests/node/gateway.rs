//! The gateway through the real binary and the fake provider: pass-through, retries as told
//! (also of a stream that failed before any text), no retry where it cannot help, the breaker
//! with fallback, errors after a stream began, the local budget shielding the provider, one
//! model's reported rate limits holding up that model only, and `/v1/models` and
//! `/v1/providers`.

use std::time::Duration;

use futures::StreamExt;
use serde_json::{Value, json};
use troupe::testing::fake_provider::{FakeConfig, FakeProvider, FakeProviderHandle};

use crate::support::{NodeProcess, PATIENCE, skip_without_python_client};

/// A node whose providers are fake ones.
struct Gateway {
    node: NodeProcess,
    _dir: tempfile::TempDir,
}

impl Gateway {
    async fn start(providers_toml: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("troupe.toml");
        std::fs::write(&config, providers_toml).unwrap();
        let node = NodeProcess::start(&["--config", config.to_str().unwrap()]).await;
        Self { node, _dir: dir }
    }

    async fn chat(&self, key: &str, body: Value) -> reqwest::Response {
        self.node
            .client()
            .post(self.node.url("/v1/chat/completions"))
            .bearer_auth(key)
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    async fn ask(&self, model: &str, stream: bool) -> reqwest::Response {
        let body = json!({
            "model": model,
            "messages": [{"role": "user", "content": "hello"}],
            "stream": stream,
            "x_vendor_extension": {"kept": true},
        });
        self.chat(&self.node.token, body).await
    }
}

fn provider(name: &str, fake: &FakeProviderHandle, extra: &str) -> String {
    format!(
        "[[providers]]\nname = \"{name}\"\nkind = \"openai\"\nbase_url = \"{}/v1\"\n{extra}\n",
        fake.base_url()
    )
}

/// The data events of an SSE body.
async fn sse_data(response: reqwest::Response) -> Vec<String> {
    use eventsource_stream::Eventsource;
    let mut events = response.bytes_stream().eventsource();
    let mut data = Vec::new();
    while let Some(event) = tokio::time::timeout(PATIENCE, events.next())
        .await
        .expect("an event within the patience")
    {
        data.push(event.expect("well-formed SSE").data);
    }
    data
}

/// The text of a streamed answer's data events, which must end with `[DONE]`.
fn streamed_text(events: &[String]) -> String {
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:?}"
    );
    events[..events.len() - 1]
        .iter()
        .map(|data| serde_json::from_str::<Value>(data).unwrap())
        .filter_map(|chunk| {
            chunk["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect()
}

/// A fake provider whose every answer is `reply`.
async fn fake_replying(reply: &str) -> FakeProviderHandle {
    FakeProvider::start(FakeConfig {
        reply: reply.into(),
        ..FakeConfig::default()
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn chat_completions_pass_through_streamed_and_not() {
    let fake = fake_replying("Grüße").await;
    let config = format!(
        "{}[gateway]\naliases = {{ fast = \"fake/m1\" }}\n",
        provider("fake", &fake, "models = [\"m1\"]")
    );
    let gateway = Gateway::start(&config).await;

    let response = gateway.ask("fast", false).await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["choices"][0]["message"]["content"], "Grüße");

    let response = gateway.ask("fake/m1", true).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let events = sse_data(response).await;
    assert_eq!(streamed_text(&events), "Grüße");

    // Each went to the provider with the provider's model name, and with the fields the
    // gateway does not know.
    let arrivals = fake.arrivals();
    assert_eq!(arrivals.len(), 2);
    for arrival in &arrivals {
        assert_eq!(arrival.model.as_deref(), Some("m1"));
        let body = arrival.json().expect("a JSON body");
        assert_eq!(body["model"], "m1");
        assert_eq!(body["x_vendor_extension"], json!({"kept": true}), "{body}");
        assert_eq!(body["messages"][0]["content"], "hello");
    }

    let models: Value = gateway.node.get("/v1/models").await.json().await.unwrap();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|model| model["id"].as_str().unwrap())
        .collect();
    assert!(ids.contains(&"fake/m1") && ids.contains(&"fast"), "{ids:?}");

    let unknown = gateway.ask("nobody/x", false).await;
    assert_eq!(unknown.status(), 404);
    let body: Value = unknown.json().await.unwrap();
    assert_eq!(body["error"]["code"], "model_not_found");

    let providers: Value = gateway
        .node
        .get("/v1/providers")
        .await
        .json()
        .await
        .unwrap();
    let fake_status = &providers["providers"][0];
    assert_eq!(fake_status["name"], "fake");
    assert_eq!(fake_status["breaker"]["state"], "closed");
    assert_eq!(fake_status["counters"]["succeeded"], 2);
    let metrics = gateway.node.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains("troupe_provider_calls_total{provider=\"fake\",outcome=\"succeeded\"} 2"),
        "{metrics}"
    );
    fake.shutdown().await;
}

/// The value of the metric line that starts with `series ` (name and labels as rendered).
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
        .parse()
        .unwrap()
}

#[tokio::test]
async fn providers_and_metrics_show_the_budget_left_recent_errors_and_the_latency_histogram() {
    // Every call costs 100 tokens (reported in the fake's usage).
    let fake = FakeProvider::start(FakeConfig {
        prompt_tokens: Some(40),
        completion_tokens: Some(60),
        ..FakeConfig::default()
    })
    .await
    .unwrap();
    // 6 requests and 600 tokens a minute: one request back every 10 s, 10 tokens a second.
    let config = provider(
        "fake",
        &fake,
        "rpm = 6\ntpm = 600\nretry = { max_attempts = 1 }",
    );
    let gateway = Gateway::start(&config).await;
    let ask = |model: &'static str| {
        gateway.chat(
            &gateway.node.token,
            json!({"model": model, "messages": [{"role": "user", "content": "hello"}],
                   "max_tokens": 100}),
        )
    };
    assert_eq!(ask("fake/m1").await.status(), 200);
    assert_eq!(ask("fake/m1").await.status(), 200);
    assert_eq!(ask("fake/fake-500").await.status(), 502);

    let providers: Value = gateway
        .node
        .get("/v1/providers")
        .await
        .json()
        .await
        .unwrap();
    let status = &providers["providers"][0];
    let budget = &status["budget"];
    assert_eq!(budget["rpm"], 6);
    assert_eq!(budget["tpm"], 600);
    // Three requests taken, at most one back (that would take 10 s).
    let requests_left = budget["requests_left"].as_u64().unwrap();
    assert!((3..=4).contains(&requests_left), "{status}");
    // Two answers used 100 tokens each; the failure was refunded; 10 a second come back.
    let tokens_left = budget["tokens_left"].as_u64().unwrap();
    assert!((400..600).contains(&tokens_left), "{status}");
    let errors = status["recent_errors"].as_array().unwrap();
    assert_eq!(errors.len(), 1, "{status}");
    assert_eq!(errors[0]["model"], "fake-500");
    assert_eq!(errors[0]["kind"], "server_error");
    assert_eq!(errors[0]["status"], 500);
    assert!(errors[0]["at"].is_string(), "{status}");
    assert_eq!(status["counters"]["succeeded"], 2);
    assert_eq!(status["counters"]["failed"], 1);
    let buckets: u64 = status["counters"]["latency_buckets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|count| count.as_u64().unwrap())
        .sum();
    assert_eq!(buckets, 3);

    let text = gateway.node.get("/metrics").await.text().await.unwrap();
    let labels = r#"{provider="fake"}"#;
    assert_eq!(
        metric(
            &text,
            &format!("troupe_provider_latency_seconds_count{labels}")
        ),
        3.0
    );
    assert_eq!(
        metric(
            &text,
            r#"troupe_provider_latency_seconds_bucket{le="+Inf",provider="fake"}"#
        ),
        3.0
    );
    // Loopback answers in well under 5 s.
    assert_eq!(
        metric(
            &text,
            r#"troupe_provider_latency_seconds_bucket{le="5.0",provider="fake"}"#
        ),
        3.0
    );
    assert!(
        metric(
            &text,
            &format!("troupe_provider_latency_seconds_sum{labels}")
        ) > 0.0
    );
    let requests = metric(
        &text,
        r#"troupe_provider_budget_left{provider="fake",dimension="requests"}"#,
    );
    assert!((3.0..=4.0).contains(&requests), "{requests}");
    let tokens = metric(
        &text,
        r#"troupe_provider_budget_left{provider="fake",dimension="tokens"}"#,
    );
    assert!((400.0..600.0).contains(&tokens), "{tokens}");
    assert_eq!(
        metric(
            &text,
            r#"troupe_provider_budget_limit{provider="fake",dimension="tokens"}"#
        ),
        600.0
    );
    assert_eq!(
        metric(&text, &format!("troupe_provider_queued{labels}")),
        0.0
    );
    fake.shutdown().await;
}

#[tokio::test]
async fn a_429_with_retry_after_is_retried_after_the_delay_and_announced() {
    let fake = FakeProvider::start(FakeConfig::default()).await.unwrap();
    let gateway = Gateway::start(&provider("fake", &fake, "")).await;
    let mut events = gateway.node.events("kind=provider.*", None).await;

    let response = gateway
        .ask("fake/fake-fail-429-retry-after-2-then-ok:1", false)
        .await;
    assert_eq!(response.status(), 200, "{:?}", response.text().await);

    let arrivals = fake.arrivals();
    assert_eq!(arrivals.len(), 2);
    let gap = arrivals[1].at - arrivals[0].at;
    assert!(gap >= Duration::from_secs(2), "retried after {gap:?}");

    let (_, limited) = events.next_of("provider.rate_limited").await;
    assert_eq!(limited["data"]["provider"], "fake");
    assert_eq!(limited["data"]["retry_after_ms"], 2000);
    assert_eq!(limited["data"]["source"], "provider");
    let (_, retry) = events.next_of("provider.retry").await;
    assert_eq!(retry["data"]["attempt"], 2);
    assert!(retry["data"]["delay_ms"].as_u64().unwrap() >= 2000);
    fake.shutdown().await;
}

#[tokio::test]
async fn bad_bodies_get_the_envelope_and_never_reach_the_provider() {
    let fake = FakeProvider::start(FakeConfig::default()).await.unwrap();
    let gateway = Gateway::start(&format!(
        "[http]\nmax_body_bytes = 65536\n{}",
        provider("fake", &fake, "")
    ))
    .await;

    // A body over http.max_body_bytes (an image inlined as base64, say).
    let huge = gateway
        .chat(
            &gateway.node.token,
            json!({
                "model": "fake/m1",
                "messages": [{"role": "user", "content": "x".repeat(100_000)}],
            }),
        )
        .await;
    assert_eq!(huge.status(), 413);
    let body: Value = huge.json().await.expect("the JSON envelope");
    assert_eq!(body["error"]["code"], "payload_too_large", "{body}");

    for (model, status, code) in [
        (json!(""), 400, "invalid_request"),
        (json!("m".repeat(1_000)), 400, "invalid_request"),
        (json!(7), 400, "invalid_request"),
        (json!("nobody/m1"), 404, "model_not_found"),
    ] {
        let response = gateway
            .chat(
                &gateway.node.token,
                json!({"model": model, "messages": [{"role": "user", "content": "hi"}]}),
            )
            .await;
        assert_eq!(response.status(), status, "model {model}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], code, "model {model}: {body}");
    }
    assert!(fake.arrivals().is_empty(), "nothing reached the provider");

    // The WebSocket routes asked without an upgrade answer with the envelope too.
    for path in ["/v1/events/ws", "/mcp/ws"] {
        let response = gateway.node.get(path).await;
        assert_eq!(response.status(), 400, "{path}");
        let body: Value = response.json().await.expect("the JSON envelope");
        assert_eq!(
            body["error"]["code"], "websocket_required",
            "{path}: {body}"
        );
    }
    fake.shutdown().await;
}

#[tokio::test]
async fn failures_that_retrying_cannot_fix_are_answered_at_once() {
    let fake = FakeProvider::start(FakeConfig::default()).await.unwrap();
    let gateway = Gateway::start(&provider("fake", &fake, "")).await;

    let quota = gateway.ask("fake/fake-insufficient-quota", false).await;
    assert_eq!(quota.status(), 429);
    assert!(quota.headers().get("retry-after").is_none());
    let body: Value = quota.json().await.unwrap();
    assert_eq!(body["error"]["code"], "insufficient_quota");

    let overflow = gateway
        .ask("fake/fake-context-length-exceeded", false)
        .await;
    assert_eq!(overflow.status(), 400);
    let body: Value = overflow.json().await.unwrap();
    assert_eq!(body["error"]["code"], "context_length_exceeded");

    // OpenAI's "Request too large" (a 429 that no wait can fix) is a 413.
    let too_large = gateway.ask("fake/fake-request-too-large", false).await;
    assert_eq!(too_large.status(), 413);
    assert!(too_large.headers().get("retry-after").is_none());
    let body: Value = too_large.json().await.unwrap();
    assert_eq!(body["error"]["code"], "request_too_large", "{body}");
    assert_eq!(body["error"]["details"]["provider_status"], 429, "{body}");

    // One request each reached the fake: none was retried.
    assert_eq!(fake.arrivals().len(), 3);
    fake.shutdown().await;
}

#[tokio::test]
async fn a_prompt_gemini_blocks_is_a_400_content_filter_not_retried_nor_held_against_the_breaker() {
    let fake = FakeProvider::start(FakeConfig::default()).await.unwrap();
    let config = format!(
        "[[providers]]\nname = \"gem\"\nkind = \"gemini\"\nbase_url = \"{}/v1beta\"\n\
         breaker = {{ failure_threshold = 2, open_secs = 30 }}\n",
        fake.base_url()
    );
    let gateway = Gateway::start(&config).await;

    // Gemini answers 200 with `promptFeedback.blockReason` and no candidates; streamed, the
    // block is the first element, so the caller still gets the 400 rather than a stream.
    for (round, stream) in [false, true, false, true].into_iter().enumerate() {
        let response = gateway.ask("gem/fake-prompt-blocked", stream).await;
        assert_eq!(response.status(), 400, "stream={stream}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "content_filter", "{body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("blocked the prompt") && message.contains("SAFETY"),
            "{message}"
        );
        assert_eq!(
            body["error"]["details"]["provider_code"], "SAFETY",
            "{body}"
        );
        // One arrival per call: not retried.
        assert_eq!(fake.arrivals().len(), round + 1);
    }

    // Four blocked prompts against a threshold of two: the breaker stays closed and the
    // provider keeps serving.
    let providers: Value = gateway
        .node
        .get("/v1/providers")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        providers["providers"][0]["breaker"]["state"], "closed",
        "{providers}"
    );
    assert_eq!(gateway.ask("gem/m1", false).await.status(), 200);
    fake.shutdown().await;
}

#[tokio::test]
async fn a_provider_that_keeps_answering_429_is_given_up_on_with_429_and_retry_after() {
    let fake = FakeProvider::start(FakeConfig::default()).await.unwrap();
    let config = provider(
        "fake",
        &fake,
        "retry = { max_attempts = 3, base_ms = 10, max_delay_ms = 10, max_wait_secs = 3 }",
    );
    let gateway = Gateway::start(&config).await;

    // 429 with `retry-after-ms: 100`, every time: three attempts, 100 ms apart, then 429.
    let response = gateway.ask("fake/fake-429-retry-after-ms-100", false).await;
    assert_eq!(response.status(), 429);
    assert_eq!(response.headers()["retry-after"], "1", "100 ms, rounded up");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limit_exceeded", "{body}");
    assert_eq!(body["error"]["details"]["kind"], "rate_limited", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("gave up after 3 attempts"), "{message}");
    let arrivals = fake.arrivals();
    assert_eq!(arrivals.len(), 3);
    for pair in arrivals.windows(2) {
        let gap = pair[1].at - pair[0].at;
        assert!(gap >= Duration::from_millis(100), "retried after {gap:?}");
    }

    // A provider asking for longer than the call may wait: given up at once, and its hint is
    // the caller's Retry-After.
    fake.reset();
    let response = gateway.ask("fake/fake-429-retry-after-5", false).await;
    assert_eq!(response.status(), 429);
    assert_eq!(response.headers()["retry-after"], "5");
    assert_eq!(fake.arrivals().len(), 1);
    fake.shutdown().await;
}

#[tokio::test]
async fn consecutive_server_errors_open_the_breaker_calls_fall_back_and_a_probe_closes_it() {
    let primary = FakeProvider::start(FakeConfig::default()).await.unwrap();
    let backup = FakeProvider::start(FakeConfig::default()).await.unwrap();
    let config = format!(
        "{}{}",
        provider(
            "primary",
            &primary,
            "fallback = [\"backup/m2\"]\nbreaker = { failure_threshold = 5, open_secs = 1 }\n\
             retry = { max_attempts = 1 }"
        ),
        provider("backup", &backup, "")
    );
    let gateway = Gateway::start(&config).await;
    let mut events = gateway.node.events("kind=provider.*", None).await;
    primary.set_behaviour("m1", "500".parse().unwrap());

    for _ in 0..5 {
        let response = gateway.ask("primary/m1", false).await;
        assert_eq!(response.status(), 200, "the fallback answers");
    }
    let (_, fallback) = events.next_of("provider.fallback").await;
    assert_eq!(fallback["data"]["from"], "primary/m1");
    assert_eq!(fallback["data"]["to"], "backup/m2");
    let (_, opened) = events.next_of("provider.breaker_opened").await;
    assert_eq!(opened["data"]["provider"], "primary");

    // Open: the next call goes straight to the fallback.
    let response = gateway.ask("primary/m1", false).await;
    assert_eq!(response.status(), 200);
    assert_eq!(primary.arrivals().len(), 5);
    assert_eq!(backup.arrivals().len(), 6);

    // The provider recovers; after the cool-down a probe goes through and closes the breaker.
    primary.clear_behaviour("m1");
    // The cool-down (open_secs = 1) runs on the node's wall clock in another process, and the
    // breaker half-opens on the first call after it (no event before): wait it out. The
    // breaker's timing itself is unit-tested with an explicit `now`.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let response = gateway.ask("primary/m1", false).await;
    assert_eq!(response.status(), 200);
    assert_eq!(primary.arrivals().len(), 6);
    events.next_of("provider.breaker_half_open").await;
    events.next_of("provider.breaker_closed").await;
    events.next_of("provider.recovered").await;
    primary.shutdown().await;
    backup.shutdown().await;
}

#[tokio::test]
async fn an_open_breaker_without_fallback_is_a_503_with_retry_after() {
    let fake = FakeProvider::start(FakeConfig::default()).await.unwrap();
    let config = provider(
        "fake",
        &fake,
        "breaker = { failure_threshold = 2, open_secs = 30 }\nretry = { max_attempts = 1 }",
    );
    let gateway = Gateway::start(&config).await;
    let mut health_events = gateway.node.events("kind=health.*", None).await;
    for _ in 0..2 {
        assert_eq!(gateway.ask("fake/fake-502", false).await.status(), 502);
    }
    let refused = gateway.ask("fake/fake-502", false).await;
    assert_eq!(refused.status(), 503);
    let retry_after: u64 = refused.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=30).contains(&retry_after), "{retry_after}");
    assert_eq!(fake.arrivals().len(), 2);
    let providers: Value = gateway
        .node
        .get("/v1/providers")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(providers["providers"][0]["breaker"]["state"], "open");
    // The HealthActor hears of it and announces the node degraded.
    let (_, degraded) = health_events.next_of("health.degraded").await;
    assert!(
        degraded.to_string().contains("providers/fake"),
        "{degraded}"
    );
    let health: Value = gateway.node.get("/v1/health").await.json().await.unwrap();
    assert_eq!(health["components"]["providers/fake"]["status"], "degraded");
    assert_eq!(health["status"], "degraded", "{health}");
    fake.shutdown().await;
}

#[tokio::test]
async fn a_stream_cut_after_it_began_ends_with_an_error_chunk() {
    let fake = FakeProvider::start(FakeConfig::default()).await.unwrap();
    let gateway = Gateway::start(&provider("fake", &fake, "")).await;
    let response = gateway.ask("fake/fake-close-mid-stream", true).await;
    assert_eq!(response.status(), 200);
    let events = sse_data(response).await;
    let last: Value = serde_json::from_str(events.last().unwrap()).unwrap();
    assert!(last["error"]["message"].is_string(), "{last}");
    assert!(!events.iter().any(|data| data == "[DONE]"));
    fake.shutdown().await;
}

#[tokio::test]
async fn provider_timeouts_are_retried_then_answered_504_or_as_the_streams_error_chunk() {
    let fake = FakeProvider::start(FakeConfig::default()).await.unwrap();
    let config = provider(
        "fake",
        &fake,
        "timeouts = { first_byte_ms = 600, between_chunks_ms = 200 }\n\
         retry = { max_attempts = 2, base_ms = 10, max_delay_ms = 10 }\n\
         breaker = { failure_threshold = 100 }",
    );
    let gateway = Gateway::start(&config).await;
    let mut events = gateway.node.events("kind=provider.*", None).await;

    // Headers later than the first-byte timeout, every time: one retry, then 504.
    let response = gateway.ask("fake/fake-slow-headers-3000", false).await;
    assert_eq!(response.status(), 504);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "provider_timeout", "{body}");
    assert_eq!(body["error"]["details"]["kind"], "timeout", "{body}");
    assert_eq!(fake.arrivals().len(), 2, "the first attempt and one retry");
    let (_, retry) = events.next_of("provider.retry").await;
    assert_eq!(retry["data"]["attempt"], 2);
    assert!(
        retry["data"]["reason"]
            .as_str()
            .unwrap()
            .contains("first_byte"),
        "{retry}"
    );

    // The same for a stream whose first token is late (headers come at once).
    fake.reset();
    let response = gateway.ask("fake/fake-slow-first-token-3000", true).await;
    assert_eq!(response.status(), 504);
    assert_eq!(fake.arrivals().len(), 2);

    // Late once, then in time: the retry answers.
    fake.reset();
    let response = gateway
        .ask("fake/fake-fail-slow-headers-3000-then-ok:1", false)
        .await;
    assert_eq!(response.status(), 200);
    assert_eq!(fake.arrivals().len(), 2);

    // A stream whose role chunk comes at once but its first text only after the first-byte
    // timeout has not begun: retried, then 504.
    fake.reset();
    let response = gateway.ask("fake/fake-trickle-2000", true).await;
    assert_eq!(response.status(), 504);
    assert_eq!(fake.arrivals().len(), 2);

    // A stream that stalls after it began (its first text in time, the next one later than
    // the gap): no retry (bytes went out), an error chunk instead of a silent end.
    fake.reset();
    let response = gateway.ask("fake/fake-trickle-350", true).await;
    assert_eq!(response.status(), 200);
    let events = sse_data(response).await;
    let last: Value = serde_json::from_str(events.last().unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "timeout", "{last}");
    assert!(!events.iter().any(|data| data == "[DONE]"));
    assert_eq!(fake.arrivals().len(), 1);
    fake.shutdown().await;
}

#[tokio::test]
async fn the_local_budget_keeps_429s_from_reaching_the_provider() {
    let fake = FakeProvider::start(FakeConfig {
        rpm: 12,
        ..FakeConfig::default()
    })
    .await
    .unwrap();
    let config = provider("fake", &fake, "rpm = 10\nretry = { max_wait_secs = 1 }");
    let gateway = Gateway::start(&config).await;
    let calls = (0..20).map(|_| gateway.ask("fake/m1", false));
    let responses = futures::future::join_all(calls).await;
    let statuses: Vec<u16> = responses
        .iter()
        .map(|response| response.status().as_u16())
        .collect();
    let refused: Vec<_> = responses
        .iter()
        .filter(|response| response.status() == 429)
        .collect();
    assert!(!refused.is_empty(), "{statuses:?}");
    assert!(
        statuses
            .iter()
            .all(|&status| status == 200 || status == 429)
    );
    // Each refusal says when to come back: a request's worth of a 10-per-minute budget is
    // back within 6 s.
    for response in refused {
        let retry_after: u64 = response.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((1..=6).contains(&retry_after), "{retry_after}");
    }
    assert_eq!(fake.counts().get(&429), None, "{:?}", fake.counts());
    fake.shutdown().await;
}

#[tokio::test]
async fn a_sustained_load_stays_inside_the_providers_rpm_and_tpm_when_the_budget_is_below_them() {
    // Every call costs 100 tokens at the fake (40 prompt + 60 completion, reported in its
    // usage), and the fake allows 24 calls and 2,400 tokens a minute. troupe's budget is below
    // both (20 calls, 1,500 tokens): tokens are the tighter limit.
    let fake = FakeProvider::start(FakeConfig {
        rpm: 24,
        tpm: 2_400,
        prompt_tokens: Some(40),
        completion_tokens: Some(60),
        ..FakeConfig::default()
    })
    .await
    .unwrap();
    let config = provider(
        "fake",
        &fake,
        "rpm = 20\ntpm = 1500\nretry = { max_wait_secs = 1 }",
    );
    let gateway = Gateway::start(&config).await;
    let mut events = gateway
        .node
        .events("kind=provider.rate_limited", None)
        .await;
    // 10 calls a second for 3 seconds, each on its own task (open loop).
    let client = gateway.node.client();
    let url = gateway.node.url("/v1/chat/completions");
    let start = tokio::time::Instant::now();
    let mut calls = Vec::new();
    for index in 0..30u32 {
        tokio::time::sleep_until(start + Duration::from_millis(100) * index).await;
        let request = client
            .post(&url)
            .bearer_auth(&gateway.node.token)
            .json(&json!({
                "model": "fake/m1",
                "messages": [{"role": "user", "content": "hello"}],
                "max_tokens": 100,
            }));
        calls.push(tokio::spawn(async move {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            let retry_after = response
                .headers()
                .get("retry-after")
                .map(|value| value.to_str().unwrap().to_owned());
            let body: Value = response.json().await.unwrap();
            (status, retry_after, body)
        }));
    }
    let mut answered = 0;
    let mut refused = Vec::new();
    for call in calls {
        let (status, retry_after, body) = call.await.unwrap();
        match status {
            200 => answered += 1,
            429 => refused.push((retry_after, body)),
            other => panic!("status {other}: {body}"),
        }
    }
    // The budget let through what it had (about 15 calls' worth of tokens), refused the rest
    // with a Retry-After, and the provider never had to refuse anything.
    assert!(answered >= 10, "{answered} answered");
    assert!(
        !refused.is_empty(),
        "30 calls in 3 s must exceed 1,500 tokens"
    );
    for (retry_after, body) in &refused {
        assert!(retry_after.is_some(), "{body}");
        assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    }
    assert!(
        refused.iter().any(|(_, body)| body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("tokens limit")),
        "the tokens budget was the one that ran out: {refused:?}"
    );
    assert_eq!(fake.counts().get(&429), None, "{:?}", fake.counts());
    assert_eq!(fake.counts().get(&200), Some(&answered));
    let (_, limited) = events.next_of("provider.rate_limited").await;
    assert_eq!(limited["data"]["source"], "budget");
    fake.shutdown().await;
}

#[tokio::test]
async fn one_models_exhausted_rate_limit_headers_do_not_hold_up_the_providers_other_models() {
    // The fake limits each model to 2 requests a minute and reports it in its
    // `x-ratelimit-*` headers, as OpenAI does; troupe has no `rpm` of its own.
    let fake = FakeProvider::start(FakeConfig {
        rpm: 2,
        ..FakeConfig::default()
    })
    .await
    .unwrap();
    let config = provider("fake", &fake, "retry = { max_wait_secs = 1 }");
    let gateway = Gateway::start(&config).await;
    for _ in 0..2 {
        let response = gateway.ask("fake/m1", false).await;
        assert_eq!(response.status(), 200, "{:?}", response.text().await);
    }
    // m1's answer said "0 left, full in a minute": that is m1's limit, not m2's.
    let response = gateway.ask("fake/m2", false).await;
    assert_eq!(response.status(), 200, "{:?}", response.text().await);
    let models: Vec<Option<String>> = fake.arrivals().into_iter().map(|a| a.model).collect();
    assert_eq!(
        models,
        [Some("m1".into()), Some("m1".into()), Some("m2".into())]
    );
    // m1 itself is held back by troupe (a 429 past `max_wait_secs`), never sent to be refused.
    let response = gateway.ask("fake/m1", false).await;
    assert_eq!(response.status(), 429);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limit_exceeded", "{body}");
    assert_eq!(fake.arrivals().len(), 3);
    assert_eq!(fake.counts().get(&429), None, "{:?}", fake.counts());
    fake.shutdown().await;
}

#[tokio::test]
async fn a_stream_that_fails_after_its_start_but_before_any_text_is_retried_not_committed() {
    let fake = fake_replying("añb€c").await;
    // The first attempt gets Anthropic's `message_start` (a role chunk, no text), then an
    // `overloaded_error` event; the retry gets the whole answer.
    let config = format!(
        "[[providers]]\nname = \"claude\"\nkind = \"anthropic\"\nbase_url = \"{}/v1\"\n\
         retry = {{ max_attempts = 2, base_ms = 10, max_delay_ms = 10 }}\n",
        fake.base_url()
    );
    let gateway = Gateway::start(&config).await;
    let response = gateway
        .ask("claude/fake-fail-error-after-start-then-ok:1", true)
        .await;
    assert_eq!(response.status(), 200);
    let events = sse_data(response).await;
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:?}"
    );
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|data| serde_json::from_str(data).unwrap())
        .collect();
    assert!(
        chunks.iter().all(|chunk| chunk.get("error").is_none()),
        "{chunks:?}"
    );
    // One answer, as a successful stream looks: the role first, then the text.
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks
        .iter()
        .filter_map(|chunk| chunk["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, "añb€c");
    assert_eq!(
        chunks
            .iter()
            .filter(|chunk| chunk["choices"][0]["delta"]["role"] == "assistant")
            .count(),
        1,
        "{chunks:?}"
    );
    assert_eq!(fake.arrivals().len(), 2);
    fake.shutdown().await;
}

/// A node with one fake provider whose `aider` is `program`: a symlink named `aider` in a
/// directory first on the node's `PATH`. The node's `HOME` is a fresh directory, so a real Aider
/// writes its settings there.
struct AiderNode {
    node: NodeProcess,
    temp: tempfile::TempDir,
}

impl AiderNode {
    async fn start(
        program: &std::path::Path,
        fake: &FakeProviderHandle,
        vars: &[(&str, &str)],
    ) -> Self {
        let temp = tempfile::tempdir().unwrap();
        let bin = temp.path().join("bin");
        let home = temp.path().join("home");
        let workspace = temp.path().join("ws");
        for dir in [&bin, &home, &workspace] {
            std::fs::create_dir_all(dir).unwrap();
        }
        std::os::unix::fs::symlink(program, bin.join("aider")).unwrap();
        let config = temp.path().join("troupe.toml");
        std::fs::write(&config, provider("fake", fake, "")).unwrap();
        let path = format!(
            "{}:{}",
            bin.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let mut env_vars = vec![
            ("PATH".to_owned(), path),
            ("HOME".to_owned(), home.display().to_string()),
        ];
        env_vars.extend(
            vars.iter()
                .map(|(name, value)| ((*name).to_owned(), (*value).to_owned())),
        );
        let env = crate::support::NodeEnv {
            vars: env_vars,
            cwd: Some(workspace),
        };
        let node = NodeProcess::start_with(
            &temp.path().join("data"),
            &["--config", config.to_str().unwrap()],
            &env,
        )
        .await;
        Self { node, temp }
    }

    fn workspace(&self) -> std::path::PathBuf {
        self.temp.path().join("ws")
    }
}

fn fake_aider() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fake-aider.sh")
}

/// Follows a session's output until its end, for up to `patience`; returns the output's texts
/// and the end state.
async fn output_to_end(node: &NodeProcess, id: &str, patience: Duration) -> (Vec<String>, String) {
    use eventsource_stream::Eventsource;
    let response = node
        .get(&format!("/v1/sessions/{id}/output?follow=true"))
        .await;
    assert_eq!(response.status(), 200);
    let mut events = response.bytes_stream().eventsource();
    let mut texts = Vec::new();
    let state = tokio::time::timeout(patience, async {
        while let Some(event) = events.next().await {
            let event = event.expect("a well-formed SSE event");
            let data: Value = serde_json::from_str(&event.data).unwrap();
            if event.event == "end" {
                return data["state"].as_str().unwrap().to_owned();
            }
            texts.push(data["text"].as_str().unwrap_or_default().to_owned());
        }
        panic!("the output of {id} ended without an `end` event");
    })
    .await
    .unwrap_or_else(|_| panic!("session {id} did not end within {patience:?}: {texts:?}"));
    (texts, state)
}

/// The model call of an Aider session (through the node's gateway, with its session key):
/// what reached the fake, and the `provider.*` events its retry caused, with the session.
async fn assert_the_call_went_through_the_gateway_for(
    fake: &FakeProviderHandle,
    events: &mut crate::support::SseStream,
    id: &str,
    message: &str,
) {
    let calls: Vec<_> = fake
        .arrivals()
        .into_iter()
        .filter(|arrival| arrival.path == "/v1/chat/completions")
        .collect();
    assert!(calls.len() >= 2, "a 429, then the retry: {calls:?}");
    for call in &calls {
        assert_eq!(
            call.model.as_deref(),
            Some("m1"),
            "the gateway routed fake/m1"
        );
    }
    assert!(
        calls.iter().any(|call| {
            let body = call.json().expect("a JSON body");
            body["messages"].to_string().contains(message)
        }),
        "the session's message reached the provider: {calls:?}"
    );
    let (_, limited) = events.next_of("provider.rate_limited").await;
    assert_eq!(limited["session"], id, "{limited}");
    assert_eq!(limited["data"]["source"], "provider");
    let (_, retry) = events.next_of("provider.retry").await;
    assert_eq!(retry["session"], id, "{retry}");
}

#[tokio::test]
async fn an_aider_session_gets_a_scoped_gateway_key_and_its_calls_carry_the_session() {
    let fake = FakeProvider::start(FakeConfig::default()).await.unwrap();
    let release_dir = tempfile::tempdir().unwrap();
    let release = release_dir.path().join("release");
    let release_path = release.display().to_string();
    let aider = AiderNode::start(
        &fake_aider(),
        &fake,
        &[
            ("FAKE_AIDER_SCENARIO", "hold"),
            ("FAKE_AIDER_RELEASE", &release_path),
        ],
    )
    .await;
    let node = &aider.node;
    let mut events = node.events("kind=session.*&kind=provider.*", None).await;
    let record: Value = node
        .post_json(
            "/v1/sessions",
            json!({"kind": "aider", "message": "hi", "model": "fake/m1"}),
        )
        .await
        .json()
        .await
        .unwrap();
    let id = record["id"].as_str().unwrap().to_owned();
    let (_, started) = events.next_of("session.started").await;
    assert_eq!(started["session"], id.as_str());
    let pid = started["data"]["pid"].as_u64().expect("a pid");

    // What the session's process was given.
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    let vars: std::collections::HashMap<String, String> = environ
        .split(|&byte| byte == 0)
        .filter_map(|entry| {
            let entry = String::from_utf8_lossy(entry);
            let (name, value) = entry.split_once('=')?;
            Some((name.to_owned(), value.to_owned()))
        })
        .collect();
    assert_eq!(vars["OPENAI_API_BASE"], node.url("/v1"));
    let key = vars["OPENAI_API_KEY"].clone();
    assert!(key.starts_with("tsk_"), "a session key");
    assert_ne!(key, node.token);

    // A call with the session's key: its provider events carry the session.
    let response = node
        .client()
        .post(format!("{}/chat/completions", vars["OPENAI_API_BASE"]))
        .bearer_auth(&key)
        .json(&json!({
            "model": "fake/fake-fail-429-retry-after-ms-100-then-ok:1",
            "messages": [{"role": "user", "content": "hi"}]
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let (_, limited) = events.next_of("provider.rate_limited").await;
    assert_eq!(limited["session"], id.as_str());
    let (_, retry) = events.next_of("provider.retry").await;
    assert_eq!(retry["session"], id.as_str());

    // The session ends; its key is refused from then on.
    std::fs::write(&release, "").unwrap();
    let (_, ended) = events.next_of("session.succeeded").await;
    assert_eq!(ended["session"], id.as_str());
    let refused = node
        .client()
        .get(node.url("/v1/models"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    fake.shutdown().await;
}

#[tokio::test]
async fn a_fake_aider_calls_the_gateway_with_its_session_key_and_the_events_carry_the_session() {
    let fake = FakeProvider::start(FakeConfig::default()).await.unwrap();
    fake.set_behaviour(
        "m1",
        "fail-429-retry-after-ms-100-then-ok:1".parse().unwrap(),
    );
    let aider = AiderNode::start(&fake_aider(), &fake, &[("FAKE_AIDER_SCENARIO", "call")]).await;
    let node = &aider.node;
    let mut events = node.events("kind=provider.*", None).await;
    let message = "add a \"greet\" function";
    let record = node
        .spawn_session(json!({
            "kind": "aider", "message": message, "model": "fake/m1", "files": ["greet.py"]
        }))
        .await;
    let id = record["id"].as_str().unwrap().to_owned();
    let (texts, state) = node.run_to_end(&id).await;
    assert_eq!(state, "succeeded", "{texts:#?}");
    assert!(
        texts
            .iter()
            .any(|text| text == &FakeConfig::default().reply),
        "the fake's reply, through the gateway, in the output: {texts:#?}"
    );
    assert_the_call_went_through_the_gateway_for(&fake, &mut events, &id, "greet").await;

    // A call the gateway gives up on reaches the script as an error, and fails the session.
    fake.set_behaviour("m1", "insufficient-quota".parse().unwrap());
    let record = node
        .spawn_session(json!({"kind": "aider", "message": "again", "model": "fake/m1"}))
        .await;
    let id = record["id"].as_str().unwrap().to_owned();
    let (texts, state) = node.run_to_end(&id).await;
    assert_eq!(state, "failed", "{texts:#?}");
    let record = node.session(&id).await;
    assert!(
        record.to_string().contains("insufficient_quota"),
        "{record}"
    );
    fake.shutdown().await;
}

/// The real `aider` (the `aider-chat` package) run by an Aider session. It is found as
/// `TROUPE_TEST_AIDER`, else as `aider` on the `PATH`; the test is skipped without it (unless
/// `TROUPE_REQUIRE_CLIENTS=1`). `.ci/run` installs it in its own virtualenv (`target/ci-aider`).
#[tokio::test]
async fn the_real_aider_runs_through_the_gateway_and_its_provider_events_carry_the_session() {
    let program = std::env::var("TROUPE_TEST_AIDER").unwrap_or_else(|_| "aider".into());
    let probe = tokio::process::Command::new(&program)
        .arg("--version")
        .output()
        .await;
    let version = match probe {
        Ok(output) if output.status.success() => {
            String::from_utf8_lossy(&output.stdout).into_owned()
        }
        _ => {
            skip_without_python_client(&format!(
                "{program} --version does not run; install Aider with \
                 `python3 -m pip install aider-chat` (or set TROUPE_TEST_AIDER to its path)"
            ));
            return;
        }
    };
    let program = which(&program);
    let fake = fake_replying("Die Antwort kam über das Gateway.").await;
    fake.set_behaviour(
        "m1",
        "fail-429-retry-after-ms-100-then-ok:1".parse().unwrap(),
    );
    // No fetch of litellm's model list from the network.
    let aider =
        AiderNode::start(&program, &fake, &[("LITELLM_LOCAL_MODEL_COST_MAP", "True")]).await;
    std::fs::write(
        aider.workspace().join("greet.py"),
        "def greet(name):\n    pass\n",
    )
    .unwrap();
    let node = &aider.node;
    let mut events = node.events("kind=provider.*", None).await;
    let record = node
        .spawn_session(json!({
            "kind": "aider",
            "message": "explain greet in one sentence",
            "model": "fake/m1",
            "files": ["greet.py"]
        }))
        .await;
    let id = record["id"].as_str().unwrap().to_owned();
    let (texts, state) = output_to_end(node, &id, PATIENCE * 6).await;
    assert_eq!(state, "succeeded", "{version}: {texts:#?}");
    assert!(
        texts
            .iter()
            .any(|text| text.contains("Die Antwort kam über das Gateway.")),
        "Aider printed the fake's reply: {texts:#?}"
    );
    assert_the_call_went_through_the_gateway_for(&fake, &mut events, &id, "explain greet").await;
    fake.shutdown().await;
}

/// `program` as an absolute path (looked up in `PATH` when it has no `/`).
fn which(program: &str) -> std::path::PathBuf {
    if program.contains('/') {
        return std::fs::canonicalize(program).unwrap();
    }
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|dir| dir.join(program))
        .find(|path| path.is_file())
        .unwrap_or_else(|| panic!("{program} is not on the PATH"))
}

#[tokio::test]
async fn a_command_session_reaches_the_gateway_with_its_own_key_and_its_events_carry_it() {
    let fake = fake_replying("any agent").await;
    fake.set_behaviour(
        "m1",
        "fail-429-retry-after-ms-100-then-ok:1".parse().unwrap(),
    );
    let gateway = Gateway::start(&provider("fake", &fake, "")).await;
    let node = &gateway.node;
    let mut events = node.events("kind=provider.*", None).await;
    // Any CLI agent that speaks OpenAI's API: here curl, with what the session was given.
    let script = r#"
        curl -sS -H "Authorization: Bearer $OPENAI_API_KEY" -H 'Content-Type: application/json' \
          -d '{"model":"fake/m1","messages":[{"role":"user","content":"hi"}]}' \
          "$OPENAI_BASE_URL/chat/completions"
        echo
        echo "gateway=$TROUPE_GATEWAY_URL api_base=$OPENAI_API_BASE"
        [ "$TROUPE_GATEWAY_KEY" = "$OPENAI_API_KEY" ] && echo "one key"
        case "$OPENAI_API_KEY" in tsk_*) echo "a session key" ;; esac
    "#;
    let record = node
        .spawn_session(json!({"kind": "command", "program": "sh", "args": ["-c", script]}))
        .await;
    let id = record["id"].as_str().unwrap().to_owned();
    let (texts, state) = node.run_to_end(&id).await;
    assert_eq!(state, "succeeded", "{texts:#?}");
    let reply: Value = serde_json::from_str(&texts[0]).expect("the gateway's JSON answer");
    assert_eq!(reply["choices"][0]["message"]["content"], "any agent");
    let url = node.url("/v1");
    assert!(
        texts.contains(&format!("gateway={url} api_base={url}")),
        "{texts:#?}"
    );
    assert!(texts.iter().any(|text| text == "one key"), "{texts:#?}");
    assert!(
        texts.iter().any(|text| text == "a session key"),
        "{texts:#?}"
    );
    let (_, limited) = events.next_of("provider.rate_limited").await;
    assert_eq!(limited["session"], id.as_str());
    let (_, retry) = events.next_of("provider.retry").await;
    assert_eq!(retry["session"], id.as_str());
    assert_eq!(fake.arrivals().len(), 2);
    fake.shutdown().await;
}

#[tokio::test]
async fn a_chat_session_streams_its_reply_as_output_and_stores_it() {
    let fake = fake_replying("Hallo, Grüße aus dem Test").await;
    let gateway = Gateway::start(&provider("fake", &fake, "retry = { max_attempts = 1 }")).await;
    let node = &gateway.node;
    let mut events = node.events("kind=session.*&kind=provider.*", None).await;
    let record = node
        .spawn_session(json!({
            "kind": "chat",
            "model": "fake/m1",
            "messages": [{"role": "user", "content": "hi"}]
        }))
        .await;
    assert_eq!(record["kind"], "chat");
    let id = record["id"].as_str().unwrap().to_owned();
    let (texts, state) = node.run_to_end(&id).await;
    assert_eq!(state, "succeeded");
    assert!(texts.len() > 1, "the reply streamed in pieces: {texts:?}");
    assert_eq!(texts.concat(), "Hallo, Grüße aus dem Test");
    let (_, output) = events.next_of("session.output").await;
    assert_eq!(output["session"], id.as_str());

    // A provider failure fails the session with the provider's reason, and the provider's
    // events carry the session.
    let failing = node
        .spawn_session(json!({
            "kind": "chat",
            "model": "fake/fake-429",
            "messages": [{"role": "user", "content": "hi"}]
        }))
        .await;
    let failing_id = failing["id"].as_str().unwrap().to_owned();
    let (_, state) = node.run_to_end(&failing_id).await;
    assert_eq!(state, "failed");
    let (_, limited) = events.next_of("provider.rate_limited").await;
    assert_eq!(limited["session"], failing_id.as_str());
    let record = node.session(&failing_id).await;
    let reason = record.to_string();
    assert!(reason.contains("rate_limited"), "{reason}");
    fake.shutdown().await;
}

#[tokio::test]
async fn anthropic_and_gemini_providers_answer_in_openai_shapes_through_the_gateway() {
    let fake = fake_replying("añb€c").await;
    let config = format!(
        "[[providers]]\nname = \"claude\"\nkind = \"anthropic\"\nbase_url = \"{base}/v1\"\n\n\
         [[providers]]\nname = \"gem\"\nkind = \"gemini\"\nbase_url = \"{base}/v1beta\"\n",
        base = fake.base_url()
    );
    let gateway = Gateway::start(&config).await;
    for model in ["claude/m1", "gem/m1"] {
        let body: Value = gateway.ask(model, false).await.json().await.unwrap();
        assert_eq!(body["choices"][0]["message"]["content"], "añb€c", "{model}");
        assert!(
            body["usage"]["total_tokens"].as_u64().unwrap() > 0,
            "{model}"
        );
        let events = sse_data(gateway.ask(model, true).await).await;
        assert_eq!(streamed_text(&events), "añb€c", "{model}");
    }
    let paths: Vec<String> = fake.arrivals().into_iter().map(|a| a.path).collect();
    assert_eq!(
        paths,
        [
            "/v1/messages",
            "/v1/messages",
            "/v1beta/models/m1:generateContent",
            "/v1beta/models/m1:streamGenerateContent"
        ]
    );
    fake.shutdown().await;
}

/// Needs Python 3 with the `openai` package (`pip install openai`).
#[tokio::test]
async fn the_official_openai_python_client_talks_to_the_gateway_unchanged() {
    let probe = tokio::process::Command::new("python3")
        .args(["-c", "import openai"])
        .output()
        .await;
    if !probe.is_ok_and(|output| output.status.success()) {
        skip_without_python_client(
            "python3 cannot import the official `openai` client; install it with \
             `python3 -m pip install openai`",
        );
        return;
    }
    let fake = fake_replying("Grüße vom Gateway").await;
    let gateway = Gateway::start(&provider("fake", &fake, "models = [\"m1\"]")).await;
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/openai_client.py");
    let output = tokio::process::Command::new("python3")
        .arg(&script)
        .arg(gateway.node.url("/v1"))
        .arg(&gateway.node.token)
        .arg("fake/m1")
        .output()
        .await
        .expect("python3 runs (this test needs Python 3 with `pip install openai`)");
    assert!(
        output.status.success(),
        "the openai client failed (this test needs `pip install openai`): {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let result: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(result["whole"], "Grüße vom Gateway");
    assert_eq!(result["streamed"], "Grüße vom Gateway");
    assert!(
        result["models"]
            .as_array()
            .unwrap()
            .contains(&json!("fake/m1"))
    );
    fake.shutdown().await;
}

/// Regression: a streaming caller that stopped reading with its socket open (a suspended
/// process) kept its call, and with it the provider's concurrency slot and budget, for good.
#[tokio::test]
async fn a_streaming_caller_that_stops_reading_gives_its_providers_slot_back() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // Far more than the sockets between the node and the caller hold: the node must wait for
    // the caller to read.
    let fake = fake_replying(&format!("{} ", "y".repeat(16_000)).repeat(1_000)).await;
    let config = format!(
        "{}[gateway]\nstalled_reader_secs = 1\n",
        provider(
            "fake",
            &fake,
            "max_concurrency = 1\nretry = { max_wait_secs = 10 }"
        )
    );
    let gateway = Gateway::start(&config).await;
    let node = &gateway.node;

    // A caller that asks for a stream, reads the head of the answer, then nothing more.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stalled = socket.connect(node.addr).await.unwrap();
    let body = json!({"model": "fake/m1", "stream": true,
                      "messages": [{"role": "user", "content": "hello"}]})
    .to_string();
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: {}\r\nauthorization: Bearer {}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        node.addr,
        node.token,
        body.len()
    );
    stalled.write_all(request.as_bytes()).await.unwrap();
    let mut head = [0u8; 256];
    let read = tokio::time::timeout(PATIENCE, stalled.read(&mut head))
        .await
        .expect("the answer's head")
        .unwrap();
    let head = String::from_utf8_lossy(&head[..read]).into_owned();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");

    // The provider's only slot comes back once the stalled caller is given up (after a second
    // of taking nothing), so the next call gets it instead of a 429 after waiting 10 s.
    let response = gateway.ask("fake/fake-echo", false).await;
    assert_eq!(response.status(), 200, "{:?}", response.text().await);
    node.logs
        .wait_for("the stalled caller given up", |line| {
            line["message"]
                .as_str()
                .is_some_and(|message| message.starts_with("a streaming caller took nothing"))
        })
        .await;
    drop(stalled);
    fake.shutdown().await;
}

/// The other side of the stalled-reader rule: a caller that reads while the provider pauses
/// longer than `gateway.stalled_reader_secs` between chunks is not given up.
#[tokio::test]
async fn a_caller_waiting_for_a_slow_provider_is_not_taken_for_a_stalled_reader() {
    let fake = fake_replying("ab").await;
    let config = format!(
        "{}[gateway]\nstalled_reader_secs = 1\n",
        provider("fake", &fake, "")
    );
    let gateway = Gateway::start(&config).await;
    // Every event 1.3 s after the previous one.
    let response = gateway.ask("fake/fake-trickle-1300", true).await;
    assert_eq!(response.status(), 200);
    assert_eq!(streamed_text(&sse_data(response).await), "ab");
    // A call given up still streams what comes: only the log says whether it was.
    let given_up = gateway
        .node
        .logs
        .all()
        .into_iter()
        .filter(|line| line.contains("a streaming caller took nothing"))
        .count();
    assert_eq!(
        given_up, 0,
        "the reading caller was taken for a stalled one"
    );
    fake.shutdown().await;
}
