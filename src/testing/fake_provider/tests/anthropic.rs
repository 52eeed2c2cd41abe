//! The Anthropic shape: messages, the event stream, its errors and rate-limit headers.

use std::time::{Duration, SystemTime};

use serde_json::json;

use super::*;

fn request(model: &str, stream: bool) -> Value {
    json!({
        "model": model,
        "max_tokens": 256,
        "system": "Be brief.",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Say hello."}]}],
        "stream": stream
    })
}

#[tokio::test]
async fn message_has_the_reply_and_usage() {
    let fake = start_with(FakeConfig {
        prompt_tokens: Some(7),
        ..FakeConfig::default()
    })
    .await;
    let response = post(&fake, "/v1/messages", &request("claude-x", false), &[]).await;
    assert_eq!(response.status(), 200);
    let body = json_of(response).await;
    assert_eq!(body["type"], "message");
    assert_eq!(body["role"], "assistant");
    assert_eq!(body["model"], "claude-x");
    assert_eq!(
        body["content"],
        json!([{"type": "text", "text": FakeConfig::default().reply}])
    );
    assert_eq!(body["stop_reason"], "end_turn");
    assert_eq!(body["usage"]["input_tokens"], 7);
    assert!(
        body["usage"]["output_tokens"]
            .as_u64()
            .is_some_and(|n| n > 0)
    );
}

#[tokio::test]
async fn echo_reads_content_blocks() {
    let fake = start().await;
    let body = json_of(post(&fake, "/v1/messages", &request("fake-echo", false), &[]).await).await;
    assert_eq!(body["content"][0]["text"], "Say hello.");
}

#[tokio::test]
async fn stream_sends_the_events_in_order() {
    let fake = start().await;
    let response = post(&fake, "/v1/messages", &request("claude-x", true), &[]).await;
    assert_eq!(header(&response, "content-type"), Some("text/event-stream"));
    let events = sse_events(&response.text().await.expect("whole stream"));
    let mut names: Vec<&str> = events.iter().filter_map(|e| e.name.as_deref()).collect();
    names.dedup();
    assert_eq!(
        names,
        [
            "message_start",
            "content_block_start",
            "ping",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop"
        ]
    );
    for event in &events {
        let data = parse_json(&event.data);
        assert_eq!(
            Some(data["type"].as_str().unwrap_or_default()),
            event.name.as_deref()
        );
    }
    let text: String = events
        .iter()
        .map(|event| parse_json(&event.data))
        .filter_map(|data| data["delta"]["text"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(text, FakeConfig::default().reply);
    let message_delta = events
        .iter()
        .find(|e| e.name.as_deref() == Some("message_delta"));
    let usage = parse_json(&message_delta.expect("message_delta").data)["usage"].clone();
    assert!(usage["output_tokens"].as_u64().is_some_and(|n| n > 0));
}

#[tokio::test]
async fn rate_limit_error_and_overloaded_have_anthropics_bodies() {
    let fake = start().await;
    let limited = post(
        &fake,
        "/v1/messages",
        &request("fake-429-retry-after-3", false),
        &[],
    )
    .await;
    assert_eq!(limited.status(), 429);
    assert_eq!(header(&limited, "retry-after"), Some("3"));
    let body = json_of(limited).await;
    assert_eq!(body["type"], "error");
    assert_eq!(body["error"]["type"], "rate_limit_error");

    let overloaded = post(
        &fake,
        "/v1/messages",
        &request("fake-overloaded", false),
        &[],
    )
    .await;
    assert_eq!(overloaded.status(), 529);
    assert_eq!(
        json_of(overloaded).await["error"]["type"],
        "overloaded_error"
    );

    for (behaviour, status, kind) in [
        ("insufficient-quota", 400, "invalid_request_error"),
        ("request-too-large", 413, "request_too_large"),
        ("context-length-exceeded", 400, "invalid_request_error"),
        ("500", 500, "api_error"),
        ("504", 504, "timeout_error"),
    ] {
        let response = post(
            &fake,
            "/v1/messages",
            &request("claude-x", false),
            &[(BEHAVIOUR_HEADER, behaviour)],
        )
        .await;
        assert_eq!(response.status(), status, "{behaviour}");
        assert_eq!(
            json_of(response).await["error"]["type"],
            kind,
            "{behaviour}"
        );
    }
}

#[tokio::test]
async fn stream_error_sends_deltas_then_an_overloaded_error_event() {
    let fake = start().await;
    let response = post(
        &fake,
        "/v1/messages",
        &request("fake-stream-error", true),
        &[],
    )
    .await;
    assert_eq!(response.status(), 200);
    let events = sse_events(&response.text().await.expect("whole stream"));
    let deltas = events
        .iter()
        .filter(|e| e.name.as_deref() == Some("content_block_delta"))
        .count();
    assert!(deltas >= 1, "{events:?}");
    let last = events.last().expect("events");
    assert_eq!(last.name.as_deref(), Some("error"));
    assert_eq!(parse_json(&last.data)["error"]["type"], "overloaded_error");
    assert!(
        events
            .iter()
            .all(|e| e.name.as_deref() != Some("message_stop"))
    );
}

#[tokio::test]
async fn error_after_start_sends_the_message_start_then_an_overloaded_error_event_and_no_text() {
    let fake = start().await;
    let response = post(
        &fake,
        "/v1/messages",
        &request("fake-error-after-start", true),
        &[],
    )
    .await;
    assert_eq!(response.status(), 200);
    let events = sse_events(&response.text().await.expect("whole stream"));
    let names: Vec<&str> = events.iter().filter_map(|e| e.name.as_deref()).collect();
    assert_eq!(
        names,
        ["message_start", "content_block_start", "ping", "error"],
        "{events:?}"
    );
    let last = events.last().expect("events");
    assert_eq!(parse_json(&last.data)["error"]["type"], "overloaded_error");
    // Not streamed: the overloaded answer.
    let response = post(
        &fake,
        "/v1/messages",
        &request("fake-error-after-start", false),
        &[],
    )
    .await;
    assert_eq!(response.status().as_u16(), 529);
}

#[tokio::test]
async fn every_answer_carries_anthropic_ratelimit_headers() {
    let fake = start_with(FakeConfig {
        rpm: 50,
        tpm: 40_000,
        ..FakeConfig::default()
    })
    .await;
    let response = post(&fake, "/v1/messages", &request("claude-x", false), &[]).await;
    assert_eq!(
        header(&response, "anthropic-ratelimit-requests-limit"),
        Some("50")
    );
    assert_eq!(
        header(&response, "anthropic-ratelimit-requests-remaining"),
        Some("49")
    );
    assert_eq!(
        header(&response, "anthropic-ratelimit-tokens-limit"),
        Some("40000")
    );
    let reset = header(&response, "anthropic-ratelimit-requests-reset").expect("a reset time");
    let reset = humantime::parse_rfc3339(reset).expect("RFC 3339");
    let ahead = reset.duration_since(SystemTime::now()).unwrap_or_default();
    assert!(
        ahead > Duration::ZERO && ahead <= Duration::from_secs(3),
        "one request back in 1.2 s: {ahead:?}"
    );
    assert!(
        header(&response, "x-ratelimit-remaining-requests").is_none(),
        "not OpenAI's"
    );
}
