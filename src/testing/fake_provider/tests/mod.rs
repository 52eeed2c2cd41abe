//! Tests of the fake provider over real loopback sockets, driven with reqwest: one submodule
//! per provider shape, one for faults and timing, one for the rate limits, and here the
//! behaviour selection and the handle.

mod anthropic;
mod faults;
mod gemini;
mod limits;
mod openai;

use std::time::Duration;

use reqwest::{Client, Response};
use serde_json::{Value, json};

use super::*;

/// A generous bound for anything that should happen at once: a test waits on the event itself
/// and fails only if it never comes.
pub(super) const PATIENCE: Duration = Duration::from_secs(5);

pub(super) async fn start() -> FakeProviderHandle {
    start_with(FakeConfig::default()).await
}

pub(super) async fn start_with(config: FakeConfig) -> FakeProviderHandle {
    FakeProvider::start(config).await.expect("bind 127.0.0.1:0")
}

pub(super) fn client() -> Client {
    // reqwest is built without a TLS provider; plain HTTP does not use it, but the builder
    // asks for one.
    let _ = rustls::crypto::ring::default_provider().install_default();
    Client::builder()
        .no_proxy()
        .timeout(PATIENCE)
        .build()
        .expect("build reqwest client")
}

/// An OpenAI chat request body.
pub(super) fn openai_request(model: &str, stream: bool) -> Value {
    json!({
        "model": model,
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Say hello."}
        ],
        "stream": stream
    })
}

pub(super) async fn post(
    fake: &FakeProviderHandle,
    path: &str,
    body: &Value,
    headers: &[(&str, &str)],
) -> Response {
    let mut request = client()
        .post(format!("{}{path}", fake.base_url()))
        .json(body);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.send().await.expect("the fake answers")
}

pub(super) async fn json_of(response: Response) -> Value {
    let text = response.text().await.expect("a whole body");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

pub(super) fn header<'a>(response: &'a Response, name: &str) -> Option<&'a str> {
    response
        .headers()
        .get(name)
        .and_then(|value| value.to_str().ok())
}

/// One server-sent event: its `event:` name, if any, and its `data:`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Event {
    pub(super) name: Option<String>,
    pub(super) data: String,
}

/// Splits a whole SSE body into events (`\n\n` or `\r\n\r\n` separated).
pub(super) fn sse_events(body: &str) -> Vec<Event> {
    body.replace("\r\n", "\n")
        .split("\n\n")
        .filter(|block| !block.trim().is_empty())
        .map(|block| {
            let mut event = Event {
                name: None,
                data: String::new(),
            };
            for line in block.lines() {
                if let Some(name) = line.strip_prefix("event: ") {
                    event.name = Some(name.to_owned());
                } else if let Some(data) = line.strip_prefix("data: ") {
                    event.data.push_str(data);
                }
            }
            event
        })
        .collect()
}

pub(super) fn parse_json(data: &str) -> Value {
    serde_json::from_str(data).unwrap_or_else(|e| panic!("event data is not JSON ({e}): {data}"))
}

#[tokio::test]
async fn header_wins_over_model_and_model_names_pick_behaviours() {
    let fake = start().await;
    let by_model = post(
        &fake,
        "/v1/chat/completions",
        &openai_request("fake-503", false),
        &[],
    )
    .await;
    assert_eq!(by_model.status(), 503);
    let by_header = post(
        &fake,
        "/v1/chat/completions",
        &openai_request("fake-503", false),
        &[(BEHAVIOUR_HEADER, "ok")],
    )
    .await;
    assert_eq!(by_header.status(), 200);
    let plain = post(
        &fake,
        "/v1/chat/completions",
        &openai_request("gpt-4o", false),
        &[],
    )
    .await;
    assert_eq!(plain.status(), 200, "a model not named fake-… succeeds");
}

#[tokio::test]
async fn unknown_behaviours_are_400_naming_the_bad_part() {
    let fake = start().await;
    let response = post(
        &fake,
        "/v1/chat/completions",
        &openai_request("gpt-4o", false),
        &[(BEHAVIOUR_HEADER, "explode")],
    )
    .await;
    assert_eq!(response.status(), 400);
    let body = json_of(response).await;
    assert_eq!(body["error"]["param"], BEHAVIOUR_HEADER);
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("unknown fake behaviour 'explode'"),
        "{message}"
    );
    assert!(
        message.contains("429-retry-after-S"),
        "lists the known names: {message}"
    );

    let response = post(
        &fake,
        "/v1/chat/completions",
        &openai_request("fake-429-retry-after-x", false),
        &[],
    )
    .await;
    assert_eq!(response.status(), 400);
    assert_eq!(json_of(response).await["error"]["param"], "model");
    assert_eq!(fake.arrivals().len(), 2);
    assert!(
        fake.arrivals()
            .iter()
            .all(|arrival| arrival.behaviour.is_none())
    );
}

#[tokio::test]
async fn unreadable_requests_are_400_in_each_shape() {
    let fake = start().await;
    let client = client();
    let send = |path: &str, body: &'static str| {
        client
            .post(format!("{}{path}", fake.base_url()))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let openai = send("/v1/chat/completions", "{not json")
        .await
        .expect("answer");
    assert_eq!(openai.status(), 400);
    assert_eq!(
        json_of(openai).await["error"]["type"],
        "invalid_request_error"
    );
    let no_messages = send("/v1/chat/completions", r#"{"model":"m"}"#)
        .await
        .expect("answer");
    assert_eq!(no_messages.status(), 400);
    let message = json_of(no_messages).await["error"]["message"].to_string();
    assert!(message.contains("messages"), "{message}");
    let anthropic = send("/v1/messages", r#"{"model":"m","messages":[]}"#)
        .await
        .expect("answer");
    assert_eq!(anthropic.status(), 400, "max_tokens is required");
    let body = json_of(anthropic).await;
    assert_eq!(body["type"], "error");
    assert_eq!(body["error"]["type"], "invalid_request_error");
    let gemini = send("/v1beta/models/gemini-x:generateContent", "[]")
        .await
        .expect("answer");
    assert_eq!(gemini.status(), 400);
    assert_eq!(json_of(gemini).await["error"]["status"], "INVALID_ARGUMENT");
    let arrivals = fake.arrivals();
    assert_eq!(arrivals.len(), 4);
    assert_eq!(
        arrivals[3].model.as_deref(),
        Some("gemini-x"),
        "the path names the model"
    );
}

#[tokio::test]
async fn arrivals_and_counts_record_every_request() {
    let fake = start().await;
    let body = openai_request("fake-500", false);
    post(&fake, "/v1/chat/completions", &body, &[]).await;
    post(
        &fake,
        "/v1/chat/completions",
        &openai_request("gpt-4o", false),
        &[],
    )
    .await;
    let missing = client()
        .get(format!("{}/v2/nothing", fake.base_url()))
        .send()
        .await;
    assert_eq!(missing.expect("answer").status(), 404);

    let arrivals = fake.arrivals();
    assert_eq!(arrivals.len(), 3);
    assert_eq!(arrivals[0].path, "/v1/chat/completions");
    assert_eq!(arrivals[0].model.as_deref(), Some("fake-500"));
    assert_eq!(
        arrivals[0].behaviour,
        Some("500".parse().expect("valid name"))
    );
    assert_eq!(arrivals[0].body, body.to_string());
    assert_eq!(arrivals[1].behaviour, Some(Behaviour::Success));
    assert_eq!(arrivals[2].path, "/v2/nothing");
    assert!(arrivals[0].at <= arrivals[1].at && arrivals[1].at <= arrivals[2].at);
    assert_eq!(
        fake.counts(),
        BTreeMap::from([(200, 1), (404, 1), (500, 1)])
    );
}

#[tokio::test]
async fn set_behaviour_switches_a_model_at_run_time() {
    let fake = start().await;
    let request = openai_request("gpt-4o", false);
    fake.set_behaviour("gpt-4o", "overloaded".parse().expect("valid name"));
    assert_eq!(
        post(&fake, "/v1/chat/completions", &request, &[])
            .await
            .status(),
        503
    );
    let header_still_wins = post(
        &fake,
        "/v1/chat/completions",
        &request,
        &[(BEHAVIOUR_HEADER, "ok")],
    )
    .await;
    assert_eq!(header_still_wins.status(), 200);
    fake.clear_behaviour("gpt-4o");
    assert_eq!(
        post(&fake, "/v1/chat/completions", &request, &[])
            .await
            .status(),
        200
    );
}

#[tokio::test]
async fn fail_then_ok_counts_per_key_and_reset_forgets() {
    let fake = start().await;
    let request = openai_request("gpt-4o", false);
    let send = |key: &'static str| {
        let fake = &fake;
        let request = &request;
        async move {
            let headers = [(BEHAVIOUR_HEADER, "fail-429-then-ok:2"), (KEY_HEADER, key)];
            post(fake, "/v1/chat/completions", request, &headers)
                .await
                .status()
                .as_u16()
        }
    };
    assert_eq!(
        [send("a").await, send("a").await, send("a").await],
        [429, 429, 200]
    );
    assert_eq!(send("b").await, 429, "another key has its own count");
    assert_eq!(send("a").await, 200);

    fake.set_behaviour("gpt-4o", Behaviour::Echo);
    fake.reset();
    assert!(fake.arrivals().is_empty() && fake.counts().is_empty());
    assert_eq!(send("a").await, 429, "the counter starts again");
    let plain = post(&fake, "/v1/chat/completions", &request, &[]).await;
    let body = json_of(plain).await;
    assert_eq!(
        body["choices"][0]["message"]["content"],
        FakeConfig::default().reply,
        "the override is gone"
    );
}

#[tokio::test]
async fn fail_then_ok_without_a_key_counts_per_model() {
    let fake = start().await;
    let statuses = async |model: &str| {
        let mut statuses = Vec::new();
        for _ in 0..3 {
            let request = openai_request(model, false);
            statuses.push(
                post(&fake, "/v1/chat/completions", &request, &[])
                    .await
                    .status(),
            );
        }
        statuses
    };
    assert_eq!(statuses("fake-fail-503-then-ok:1").await, [503, 200, 200]);
    assert_eq!(statuses("fake-fail-502-then-ok:2").await, [502, 502, 200]);
}

#[tokio::test]
async fn shutdown_stops_listening() {
    let fake = start().await;
    let url = format!("{}/v1/models", fake.base_url());
    assert_eq!(
        client().get(&url).send().await.expect("answer").status(),
        200
    );
    fake.shutdown().await;
    let after = client().get(&url).send().await;
    assert!(after.expect_err("nothing listens").is_connect());
}
