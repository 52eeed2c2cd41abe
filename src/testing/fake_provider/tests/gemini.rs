//! The Gemini shape: the colon-in-the-path routes, both stream framings, and the Google RPC
//! errors with their `QuotaFailure` and `RetryInfo` details.

use serde_json::json;

use super::*;

fn request() -> Value {
    json!({
        "systemInstruction": {"parts": [{"text": "Be brief."}]},
        "contents": [{"role": "user", "parts": [{"text": "Say hello."}]}]
    })
}

fn path(model: &str, method: &str) -> String {
    format!("/v1beta/models/{model}:{method}")
}

fn detail<'a>(body: &'a Value, type_suffix: &str) -> Option<&'a Value> {
    body["error"]["details"].as_array()?.iter().find(|detail| {
        detail["@type"]
            .as_str()
            .is_some_and(|t| t.ends_with(type_suffix))
    })
}

#[tokio::test]
async fn generate_content_has_the_reply_and_usage() {
    let fake = start().await;
    let response = post(
        &fake,
        &path("gemini-2.0-flash", "generateContent"),
        &request(),
        &[],
    )
    .await;
    assert_eq!(response.status(), 200);
    let body = json_of(response).await;
    let candidate = &body["candidates"][0];
    assert_eq!(candidate["content"]["role"], "model");
    assert_eq!(
        candidate["content"]["parts"][0]["text"],
        FakeConfig::default().reply
    );
    assert_eq!(candidate["finishReason"], "STOP");
    let usage = &body["usageMetadata"];
    assert_eq!(
        usage["totalTokenCount"].as_u64(),
        Some(
            usage["promptTokenCount"].as_u64().unwrap_or(0)
                + usage["candidatesTokenCount"].as_u64().unwrap_or(0)
        )
    );
    assert_eq!(
        fake.arrivals()[0].model.as_deref(),
        Some("gemini-2.0-flash")
    );
}

#[tokio::test]
async fn stream_with_alt_sse_sends_data_events() {
    let fake = start().await;
    let url = format!("{}?alt=sse", path("fake-echo", "streamGenerateContent"));
    let response = post(&fake, &url, &request(), &[]).await;
    assert_eq!(header(&response, "content-type"), Some("text/event-stream"));
    let raw = response.text().await.expect("whole stream");
    assert!(
        raw.contains("\r\n\r\n"),
        "Gemini separates events with CRLF CRLF"
    );
    let chunks: Vec<Value> = sse_events(&raw)
        .iter()
        .map(|e| parse_json(&e.data))
        .collect();
    let text: String = chunks
        .iter()
        .filter_map(|c| c["candidates"][0]["content"]["parts"][0]["text"].as_str())
        .collect();
    assert_eq!(text, "Say hello.");
    let last = chunks.last().expect("chunks");
    assert_eq!(last["candidates"][0]["finishReason"], "STOP");
    assert!(
        last["usageMetadata"]["candidatesTokenCount"]
            .as_u64()
            .is_some()
    );
}

#[tokio::test]
async fn stream_without_alt_is_one_json_array() {
    let fake = start().await;
    let response = post(
        &fake,
        &path("gemini-x", "streamGenerateContent"),
        &request(),
        &[],
    )
    .await;
    assert_eq!(header(&response, "content-type"), Some("application/json"));
    let body = json_of(response).await;
    let elements = body.as_array().expect("an array");
    assert!(elements.len() > 1, "{body}");
    let text: String = elements
        .iter()
        .filter_map(|c| c["candidates"][0]["content"]["parts"][0]["text"].as_str())
        .collect();
    assert_eq!(text, FakeConfig::default().reply);
}

#[tokio::test]
async fn per_minute_exhaustion_has_quota_failure_and_retry_info() {
    let fake = start().await;
    let response = post(
        &fake,
        &path("fake-429-retry-after-2", "generateContent"),
        &request(),
        &[],
    )
    .await;
    assert_eq!(response.status(), 429);
    assert!(
        header(&response, "retry-after").is_none(),
        "Gemini puts the delay in the body"
    );
    let body = json_of(response).await;
    assert_eq!(body["error"]["status"], "RESOURCE_EXHAUSTED");
    assert_eq!(body["error"]["code"], 429);
    let quota = detail(&body, "google.rpc.QuotaFailure").expect("QuotaFailure");
    let quota_id = quota["violations"][0]["quotaId"]
        .as_str()
        .unwrap_or_default();
    assert!(quota_id.contains("PerMinute"), "{quota_id}");
    let retry = detail(&body, "google.rpc.RetryInfo").expect("RetryInfo");
    assert_eq!(retry["retryDelay"], "2s");

    let millis = post(
        &fake,
        &path("gemini-x", "generateContent"),
        &request(),
        &[(BEHAVIOUR_HEADER, "429-retry-after-ms-1500")],
    )
    .await;
    let body = json_of(millis).await;
    assert_eq!(
        detail(&body, "RetryInfo").expect("RetryInfo")["retryDelay"],
        "1.500s"
    );
}

#[tokio::test]
async fn per_day_exhaustion_and_the_array_wrapped_variant() {
    let fake = start().await;
    let response = post(
        &fake,
        &path("fake-per-day", "generateContent"),
        &request(),
        &[],
    )
    .await;
    assert_eq!(response.status(), 429);
    let body = json_of(response).await;
    let quota = detail(&body, "QuotaFailure").expect("QuotaFailure");
    assert!(
        quota["violations"][0]["quotaId"]
            .as_str()
            .unwrap_or_default()
            .contains("PerDay")
    );

    let wrapped = post(
        &fake,
        &path("gemini-x", "generateContent"),
        &request(),
        &[(BEHAVIOUR_HEADER, "429-retry-after-2-array")],
    )
    .await;
    assert_eq!(wrapped.status(), 429);
    let body = json_of(wrapped).await;
    let elements = body.as_array().expect("wrapped in an array");
    assert_eq!(elements.len(), 1);
    assert_eq!(elements[0]["error"]["status"], "RESOURCE_EXHAUSTED");
    assert_eq!(
        detail(&elements[0], "RetryInfo").expect("RetryInfo")["retryDelay"],
        "2s"
    );
}

#[tokio::test]
async fn other_failures_have_google_statuses() {
    let fake = start().await;
    for (behaviour, status, grpc) in [
        ("context-length-exceeded", 400, "INVALID_ARGUMENT"),
        ("request-too-large", 400, "INVALID_ARGUMENT"),
        ("overloaded", 503, "UNAVAILABLE"),
        ("500", 500, "INTERNAL"),
        ("504", 504, "DEADLINE_EXCEEDED"),
    ] {
        let response = post(
            &fake,
            &path("gemini-x", "generateContent"),
            &request(),
            &[(BEHAVIOUR_HEADER, behaviour)],
        )
        .await;
        assert_eq!(response.status(), status, "{behaviour}");
        assert_eq!(
            json_of(response).await["error"]["status"],
            grpc,
            "{behaviour}"
        );
    }
}

#[tokio::test]
async fn stream_error_ends_the_sse_stream_with_an_error_element() {
    let fake = start().await;
    let url = format!(
        "{}?alt=sse",
        path("fake-stream-error", "streamGenerateContent")
    );
    let events = sse_events(
        &post(&fake, &url, &request(), &[])
            .await
            .text()
            .await
            .expect("stream"),
    );
    let last = parse_json(&events.last().expect("events").data);
    assert_eq!(last["error"]["status"], "UNAVAILABLE");
    assert!(events.len() >= 2, "some chunks come first: {events:?}");

    let array = post(
        &fake,
        &path("fake-stream-error", "streamGenerateContent"),
        &request(),
        &[],
    )
    .await;
    let body = json_of(array).await;
    let elements = body.as_array().expect("still a well-formed array");
    assert_eq!(elements.last().expect("elements")["error"]["code"], 503);
}

#[tokio::test]
async fn unknown_methods_and_empty_models_are_404() {
    let fake = start().await;
    for bad in [
        "/v1beta/models/gemini-x:countTokens",
        "/v1beta/models/:generateContent",
        "/v1beta/models/gemini-x",
    ] {
        let response = post(&fake, bad, &request(), &[]).await;
        assert_eq!(response.status(), 404, "{bad}");
        assert_eq!(
            json_of(response).await["error"]["status"],
            "NOT_FOUND",
            "{bad}"
        );
    }
}
