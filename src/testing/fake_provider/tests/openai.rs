//! The OpenAI shape: completions, chunks, the model list and the error bodies.

use serde_json::json;

use super::*;

#[tokio::test]
async fn completion_has_the_reply_and_usage() {
    let fake = start_with(FakeConfig {
        reply: "Hi.".to_owned(),
        prompt_tokens: Some(12),
        completion_tokens: Some(3),
        ..FakeConfig::default()
    })
    .await;
    let response = post(
        &fake,
        "/v1/chat/completions",
        &openai_request("gpt-4o", false),
        &[],
    )
    .await;
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "content-type"), Some("application/json"));
    let body = json_of(response).await;
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], "gpt-4o");
    assert!(
        body["id"]
            .as_str()
            .is_some_and(|id| id.starts_with("chatcmpl-")),
        "{body}"
    );
    assert_eq!(
        body["choices"][0]["message"],
        json!({
            "role": "assistant", "content": "Hi.", "refusal": null, "annotations": []
        })
    );
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert_eq!(body["usage"]["prompt_tokens"], 12);
    assert_eq!(body["usage"]["completion_tokens"], 3);
    assert_eq!(body["usage"]["total_tokens"], 15);
}

#[tokio::test]
async fn echo_replies_with_the_last_user_message() {
    let fake = start().await;
    let request = json!({
        "model": "fake-echo",
        "messages": [
            {"role": "user", "content": "first"},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": [{"type": "text", "text": "second "}, {"type": "text", "text": "part"}]}
        ]
    });
    let body = json_of(post(&fake, "/v1/chat/completions", &request, &[]).await).await;
    assert_eq!(body["choices"][0]["message"]["content"], "second part");
    assert_eq!(
        body["usage"]["completion_tokens"], 3,
        "11 characters, one token per four"
    );
}

#[tokio::test]
async fn stream_sends_chunks_a_usage_chunk_and_done() {
    let fake = start().await;
    let mut request = openai_request("gpt-4o", true);
    request["stream_options"] = json!({"include_usage": true});
    let response = post(&fake, "/v1/chat/completions", &request, &[]).await;
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "content-type"), Some("text/event-stream"));
    assert_eq!(
        header(&response, "transfer-encoding"),
        Some("chunked"),
        "streamed, no length"
    );
    let events = sse_events(&response.text().await.expect("whole stream"));
    let (done, chunks) = events.split_last().expect("events");
    assert_eq!(done.data, "[DONE]");
    let chunks: Vec<Value> = chunks.iter().map(|event| parse_json(&event.data)).collect();
    assert!(
        chunks
            .iter()
            .all(|chunk| chunk["object"] == "chat.completion.chunk")
    );
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks
        .iter()
        .filter_map(|chunk| chunk["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, FakeConfig::default().reply);
    let (usage_chunk, rest) = chunks.split_last().expect("a usage chunk");
    assert_eq!(usage_chunk["choices"], json!([]));
    assert!(
        usage_chunk["usage"]["total_tokens"]
            .as_u64()
            .is_some_and(|n| n > 0)
    );
    assert_eq!(
        rest.last().expect("a finish chunk")["choices"][0]["finish_reason"],
        "stop"
    );
    assert!(rest.iter().all(|chunk| chunk["usage"].is_null()));
}

#[tokio::test]
async fn stream_without_include_usage_has_no_usage_chunk() {
    let fake = start().await;
    let response = post(
        &fake,
        "/v1/chat/completions",
        &openai_request("gpt-4o", true),
        &[],
    )
    .await;
    let events = sse_events(&response.text().await.expect("whole stream"));
    assert_eq!(
        events.last().map(|event| event.data.as_str()),
        Some("[DONE]")
    );
    for event in &events[..events.len() - 1] {
        let chunk = parse_json(&event.data);
        assert!(chunk.get("usage").is_none(), "{chunk}");
        assert_eq!(chunk["choices"].as_array().map(Vec::len), Some(1));
    }
}

#[tokio::test]
async fn models_lists_the_configured_ids() {
    let fake = start_with(FakeConfig {
        models: vec!["fake-ok".to_owned(), "gpt-4o".to_owned()],
        ..FakeConfig::default()
    })
    .await;
    let response = client()
        .get(format!("{}/v1/models", fake.base_url()))
        .send()
        .await;
    let body = json_of(response.expect("answer")).await;
    assert_eq!(body["object"], "list");
    let ids: Vec<&str> = body["data"]
        .as_array()
        .expect("data")
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    assert_eq!(ids, ["fake-ok", "gpt-4o"]);
    assert_eq!(body["data"][0]["object"], "model");
}

#[tokio::test]
async fn rate_limits_carry_the_retry_hint_asked_for() {
    let fake = start().await;
    for (model, header_name, value) in [
        ("fake-429-retry-after-2", "retry-after", Some("2")),
        ("fake-429-retry-after-ms-250", "retry-after-ms", Some("250")),
        ("fake-429", "retry-after", None),
    ] {
        let response = post(
            &fake,
            "/v1/chat/completions",
            &openai_request(model, false),
            &[],
        )
        .await;
        assert_eq!(response.status(), 429, "{model}");
        assert_eq!(header(&response, header_name), value, "{model}");
        let body = json_of(response).await;
        assert_eq!(body["error"]["type"], "requests", "{model}");
        assert_eq!(body["error"]["code"], "rate_limit_exceeded", "{model}");
        assert_eq!(body["error"]["param"], Value::Null, "{model}");
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(message.starts_with("Rate limit reached for"), "{message}");
    }
}

#[tokio::test]
async fn quota_size_and_context_errors_have_openais_bodies() {
    let fake = start().await;
    let cases = [
        (
            "insufficient-quota",
            429,
            "insufficient_quota",
            json!("insufficient_quota"),
        ),
        (
            "request-too-large",
            429,
            "tokens",
            json!("rate_limit_exceeded"),
        ),
        (
            "context-length-exceeded",
            400,
            "invalid_request_error",
            json!("context_length_exceeded"),
        ),
        ("overloaded", 503, "server_error", Value::Null),
        ("500", 500, "server_error", Value::Null),
        ("503", 503, "server_error", json!("service_unavailable")),
        ("504", 504, "server_error", json!("gateway_timeout")),
    ];
    for (behaviour, status, kind, code) in cases {
        let response = post(
            &fake,
            "/v1/chat/completions",
            &openai_request("gpt-4o", false),
            &[(BEHAVIOUR_HEADER, behaviour)],
        )
        .await;
        assert_eq!(response.status(), status, "{behaviour}");
        let body = json_of(response).await;
        assert_eq!(body["error"]["type"], kind, "{behaviour}");
        assert_eq!(body["error"]["code"], code, "{behaviour}");
    }
    let too_large = post(
        &fake,
        "/v1/chat/completions",
        &openai_request("gpt-4o", false),
        &[(BEHAVIOUR_HEADER, "request-too-large")],
    )
    .await;
    let message = json_of(too_large).await["error"]["message"].to_string();
    assert!(
        message.contains("Request too large for gpt-4o"),
        "{message}"
    );
}

#[tokio::test]
async fn bad_gateway_is_an_html_page() {
    let fake = start().await;
    let response = post(
        &fake,
        "/v1/chat/completions",
        &openai_request("fake-502", false),
        &[],
    )
    .await;
    assert_eq!(response.status(), 502);
    assert_eq!(header(&response, "content-type"), Some("text/html"));
    let body = response.text().await.expect("body");
    assert!(
        body.starts_with("<html>") && body.contains("502 Bad Gateway"),
        "{body}"
    );
}

#[tokio::test]
async fn stream_error_ends_without_done() {
    let fake = start().await;
    let response = post(
        &fake,
        "/v1/chat/completions",
        &openai_request("fake-stream-error", true),
        &[],
    )
    .await;
    assert_eq!(response.status(), 200);
    let events = sse_events(&response.text().await.expect("whole stream"));
    let last = parse_json(&events.last().expect("events").data);
    assert_eq!(last["error"]["type"], "server_error");
    assert!(events.iter().all(|event| event.data != "[DONE]"));
    assert!(
        events.len() >= 3,
        "the role chunk and some deltas come first: {events:?}"
    );

    let not_streaming = post(
        &fake,
        "/v1/chat/completions",
        &openai_request("fake-stream-error", false),
        &[],
    )
    .await;
    assert_eq!(
        not_streaming.status(),
        503,
        "without a stream it is the overloaded answer"
    );
}
