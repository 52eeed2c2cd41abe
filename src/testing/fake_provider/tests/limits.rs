//! The fake's own per-model RPM and TPM limits and the headers that report them.

use serde_json::json;

use super::*;

fn limited(rpm: u64, tpm: u64) -> FakeConfig {
    FakeConfig {
        rpm,
        tpm,
        prompt_tokens: Some(30),
        completion_tokens: Some(30),
        ..FakeConfig::default()
    }
}

/// Reads the Go durations the fake writes: `20ms`, `7.66s`, `6m0s`, `1h2m3.5s`.
fn go_seconds(text: &str) -> f64 {
    if let Some(millis) = text.strip_suffix("ms") {
        return millis.parse::<f64>().expect("milliseconds") / 1000.0;
    }
    let (mut seconds, mut number) = (0.0, String::new());
    for c in text.chars() {
        let unit = match c {
            'h' => 3600.0,
            'm' => 60.0,
            's' => 1.0,
            _ => {
                number.push(c);
                continue;
            }
        };
        seconds += number
            .parse::<f64>()
            .unwrap_or_else(|_| panic!("a Go duration: {text}"))
            * unit;
        number.clear();
    }
    seconds
}

#[test]
fn go_seconds_reads_what_go_duration_writes() {
    assert_eq!(go_seconds("20ms"), 0.02);
    assert_eq!(go_seconds("7.5s"), 7.5);
    assert_eq!(go_seconds("6m0s"), 360.0);
    assert_eq!(go_seconds("1h2m3.5s"), 3723.5);
}

async fn chat(fake: &FakeProviderHandle, model: &str) -> Response {
    post(
        fake,
        "/v1/chat/completions",
        &openai_request(model, false),
        &[],
    )
    .await
}

#[tokio::test]
async fn requests_past_the_rpm_get_openais_429_with_ratelimit_headers() {
    let fake = start_with(limited(2, 1_000_000)).await;
    let first = chat(&fake, "gpt-4o").await;
    assert_eq!(first.status(), 200);
    assert_eq!(header(&first, "x-ratelimit-limit-requests"), Some("2"));
    assert_eq!(header(&first, "x-ratelimit-remaining-requests"), Some("1"));
    assert_eq!(
        header(&first, "x-ratelimit-remaining-tokens"),
        Some("999940")
    );
    // Real time passes between requests and refills a little, so resets are a bit under
    // the whole 30 s or minute.
    let reset = go_seconds(header(&first, "x-ratelimit-reset-requests").expect("a reset"));
    assert!(
        (29.0..=30.0).contains(&reset),
        "one request back in 30 s: {reset}"
    );
    let second = chat(&fake, "gpt-4o").await;
    assert_eq!(header(&second, "x-ratelimit-remaining-requests"), Some("0"));
    let reset = go_seconds(header(&second, "x-ratelimit-reset-requests").expect("a reset"));
    assert!(
        (59.0..=60.0).contains(&reset),
        "both back in a minute: {reset}"
    );

    let third = chat(&fake, "gpt-4o").await;
    assert_eq!(third.status(), 429);
    assert_eq!(header(&third, "x-ratelimit-remaining-requests"), Some("0"));
    assert_eq!(header(&third, "retry-after"), Some("30"));
    let body = json_of(third).await;
    assert_eq!(body["error"]["type"], "requests");
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("(RPM): Limit 2, Used 2, Requested 1"),
        "{message}"
    );

    assert_eq!(
        chat(&fake, "gpt-4o-mini").await.status(),
        200,
        "each model has its own limits"
    );
    fake.reset();
    assert_eq!(chat(&fake, "gpt-4o").await.status(), 200, "reset refills");
}

#[tokio::test]
async fn tokens_past_the_tpm_get_a_tokens_429_and_oversized_requests_are_too_large() {
    let fake = start_with(limited(100, 100)).await;
    assert_eq!(
        chat(&fake, "gpt-4o").await.status(),
        200,
        "60 of 100 tokens"
    );
    let second = chat(&fake, "gpt-4o").await;
    assert_eq!(second.status(), 429);
    assert_eq!(
        header(&second, "retry-after"),
        Some("12"),
        "20 tokens at 100 per minute"
    );
    let body = json_of(second).await;
    assert_eq!(body["error"]["type"], "tokens");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("(TPM): Limit 100, Used 60, Requested 60"),
        "{message}"
    );

    let small = start_with(limited(100, 50)).await;
    let too_large = chat(&small, "gpt-4o").await;
    assert_eq!(too_large.status(), 429);
    assert!(
        header(&too_large, "retry-after").is_none(),
        "waiting will not help"
    );
    let message = json_of(too_large).await["error"]["message"].to_string();
    assert!(
        message.contains("Request too large for gpt-4o"),
        "{message}"
    );
    assert!(message.contains("Limit 50, Requested 60"), "{message}");
}

#[tokio::test]
async fn refusals_follow_the_endpoints_shape() {
    let fake = start_with(limited(1, 1_000_000)).await;
    let anthropic = json!({"model": "claude-x", "max_tokens": 8, "messages": []});
    assert_eq!(
        post(&fake, "/v1/messages", &anthropic, &[]).await.status(),
        200
    );
    let refused = post(&fake, "/v1/messages", &anthropic, &[]).await;
    assert_eq!(refused.status(), 429);
    assert_eq!(
        header(&refused, "anthropic-ratelimit-requests-remaining"),
        Some("0")
    );
    assert_eq!(header(&refused, "retry-after"), Some("60"));
    assert_eq!(json_of(refused).await["error"]["type"], "rate_limit_error");

    let gemini = json!({"contents": [{"parts": [{"text": "hi"}]}]});
    let path = "/v1beta/models/gemini-x:generateContent";
    assert_eq!(post(&fake, path, &gemini, &[]).await.status(), 200);
    let refused = post(&fake, path, &gemini, &[]).await;
    assert_eq!(refused.status(), 429);
    let body = json_of(refused).await;
    assert_eq!(body["error"]["status"], "RESOURCE_EXHAUSTED");
    let details = body["error"]["details"].to_string();
    assert!(
        details.contains("PerMinute") && details.contains("\"retryDelay\":\"60s\""),
        "{details}"
    );
}

#[tokio::test]
async fn limit_headers_come_with_failures_too() {
    let fake = start().await;
    let failed = chat(&fake, "fake-500").await;
    assert_eq!(failed.status(), 500);
    assert_eq!(header(&failed, "x-ratelimit-limit-requests"), Some("10000"));
    assert_eq!(
        header(&failed, "x-ratelimit-remaining-requests"),
        Some("9999")
    );
    assert!(header(&failed, "x-ratelimit-reset-tokens").is_some());
}
