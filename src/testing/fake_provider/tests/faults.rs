//! Faults and timing: slow answers, trickles, resets, streams cut off, bodies split where
//! clients break. Timing is asserted as lower bounds the fake's own pauses guarantee, and as
//! orderings, never as tight windows.

use std::time::{Duration, Instant};

use axum::body::Bytes;
use futures::StreamExt;
use serde_json::json;

use super::*;

/// Reads a body piece by piece as the client received it, until it ends or fails.
async fn pieces_of(response: Response) -> (Vec<Bytes>, Option<reqwest::Error>) {
    let mut stream = response.bytes_stream();
    let mut pieces = Vec::new();
    while let Some(piece) = stream.next().await {
        match piece {
            Ok(piece) => pieces.push(piece),
            Err(error) => return (pieces, Some(error)),
        }
    }
    (pieces, None)
}

#[tokio::test]
async fn slow_headers_hold_back_the_whole_answer() {
    let fake = start().await;
    let started = Instant::now();
    let response = post(
        &fake,
        "/v1/chat/completions",
        &openai_request("fake-slow-headers-200", false),
        &[],
    )
    .await;
    assert!(started.elapsed() >= Duration::from_millis(200));
    assert_eq!(response.status(), 200);
    let arrived = fake.arrivals()[0].at;
    assert!(arrived >= started && arrived.duration_since(started) < Duration::from_millis(200));
}

#[tokio::test]
async fn slow_first_token_sends_headers_first() {
    let fake = start().await;
    let started = Instant::now();
    let response = post(
        &fake,
        "/v1/chat/completions",
        &openai_request("fake-slow-first-token-400", true),
        &[],
    )
    .await;
    let headers_at = started.elapsed();
    let mut stream = response.bytes_stream();
    let first = stream
        .next()
        .await
        .expect("a first piece")
        .expect("readable");
    let first_at = started.elapsed();
    assert!(!first.is_empty());
    assert!(first_at >= Duration::from_millis(400), "{first_at:?}");
    assert!(
        first_at - headers_at >= Duration::from_millis(200),
        "headers at {headers_at:?} came well before the first token at {first_at:?}"
    );
}

#[tokio::test]
async fn trickle_spaces_out_events_and_body_pieces() {
    let fake = start().await;
    let started = Instant::now();
    let response = post(
        &fake,
        "/v1/chat/completions",
        &openai_request("fake-trickle-30", true),
        &[],
    )
    .await;
    let (pieces, error) = pieces_of(response).await;
    assert!(error.is_none());
    let events = sse_events(&String::from_utf8(pieces.concat()).expect("UTF-8"));
    assert_eq!(events.last().map(|e| e.data.as_str()), Some("[DONE]"));
    let gaps = u32::try_from(events.len() - 1).unwrap_or(u32::MAX);
    assert!(started.elapsed() >= Duration::from_millis(30) * gaps);
    assert!(pieces.len() > 1, "the events came apart");

    let started = Instant::now();
    let whole = post(
        &fake,
        "/v1/chat/completions",
        &openai_request("fake-trickle-30", false),
        &[],
    )
    .await;
    assert_eq!(json_of(whole).await["object"], "chat.completion");
    assert!(
        started.elapsed() >= Duration::from_millis(90),
        "four pieces, three gaps"
    );
}

#[tokio::test]
async fn reset_before_headers_is_a_client_error_not_a_response() {
    let fake = start().await;
    let result = client()
        .post(format!("{}/v1/chat/completions", fake.base_url()))
        .json(&openai_request("fake-reset", false))
        .send()
        .await;
    let error = result.expect_err("no response");
    assert!(error.status().is_none() && error.is_request(), "{error:?}");
    assert_eq!(
        fake.arrivals().len(),
        1,
        "the request was read, and not retried"
    );
    assert_eq!(
        fake.arrivals()[0].behaviour,
        Some(Behaviour::ResetBeforeHeaders)
    );
    assert!(fake.counts().is_empty(), "no status went out");
}

#[tokio::test]
async fn fail_reset_then_ok_lets_a_retry_through() {
    let fake = start().await;
    let client = client();
    let send = || {
        client
            .post(format!("{}/v1/messages", fake.base_url()))
            .json(&json!({"model": "claude-x", "max_tokens": 8, "messages": []}))
            .header(BEHAVIOUR_HEADER, "fail-reset-then-ok:1")
            .send()
    };
    assert!(send().await.is_err());
    assert_eq!(send().await.expect("the retry is answered").status(), 200);
}

#[tokio::test]
async fn close_mid_stream_cuts_the_stream_before_done() {
    let fake = start().await;
    let response = post(
        &fake,
        "/v1/chat/completions",
        &openai_request("fake-close-mid-stream", true),
        &[],
    )
    .await;
    assert_eq!(response.status(), 200);
    let (pieces, error) = pieces_of(response).await;
    assert!(
        error.is_some(),
        "the body ends in an error, not a clean end"
    );
    let received = String::from_utf8(pieces.concat()).expect("whole events before the cut");
    let events = sse_events(&received);
    assert!(
        events.len() >= 2,
        "the role chunk and a delta arrived: {received}"
    );
    assert!(!received.contains("[DONE]") && !received.contains("\"finish_reason\":\"stop\""));

    let whole = post(
        &fake,
        "/v1/messages",
        &json!({"model": "fake-close-mid-stream", "max_tokens": 8,
            "messages": []}),
        &[],
    )
    .await;
    assert_eq!(whole.status(), 200);
    assert!(
        whole.text().await.is_err(),
        "half a JSON body, then the cut"
    );
}

#[tokio::test]
async fn split_chunks_cut_json_and_characters_yet_reassemble() {
    let fake = start_with(FakeConfig {
        split_gap: Duration::from_millis(15),
        ..FakeConfig::default()
    })
    .await;
    let reply = FakeConfig::default().reply;
    let mut openai = openai_request("fake-split-chunks", true);
    openai["stream_options"] = json!({"include_usage": true});
    let anthropic = json!({"model": "fake-split-chunks", "max_tokens": 8, "stream": true,
        "messages": [{"role": "user", "content": "hi"}]});
    for (path, request) in [
        ("/v1/chat/completions", openai),
        ("/v1/messages", anthropic),
    ] {
        let (pieces, error) = pieces_of(post(&fake, path, &request, &[]).await).await;
        assert!(error.is_none(), "{path}");
        assert!(
            pieces
                .iter()
                .any(|piece| std::str::from_utf8(piece).is_err()),
            "{path}: some piece ends inside a character"
        );
        let whole = String::from_utf8(pieces.concat()).expect("the pieces put together are UTF-8");
        let events = sse_events(&whole);
        let mut text = String::new();
        for event in events.iter().filter(|event| event.data != "[DONE]") {
            let data = parse_json(&event.data);
            let delta = data["choices"][0]["delta"]["content"].as_str();
            text.push_str(delta.or(data["delta"]["text"].as_str()).unwrap_or_default());
        }
        assert_eq!(text, reply, "{path}");
    }

    let gemini = post(
        &fake,
        "/v1beta/models/fake-split-chunks:generateContent",
        &json!({"contents": [{"parts": [{"text": "hi"}]}]}),
        &[],
    )
    .await;
    let (pieces, _) = pieces_of(gemini).await;
    assert!(pieces.len() > 1);
    let body: Value = serde_json::from_slice(&pieces.concat()).expect("one JSON body again");
    assert_eq!(body["candidates"][0]["content"]["parts"][0]["text"], reply);
}

#[tokio::test]
async fn arrival_times_show_that_a_retry_waited_as_told() {
    let fake = start().await;
    let request = openai_request("fake-fail-429-retry-after-ms-150-then-ok:1", false);
    let first = post(&fake, "/v1/chat/completions", &request, &[]).await;
    assert_eq!(first.status(), 429);
    let wait: u64 = header(&first, "retry-after-ms")
        .and_then(|v| v.parse().ok())
        .expect("a hint");
    tokio::time::sleep(Duration::from_millis(wait)).await;
    let second = post(&fake, "/v1/chat/completions", &request, &[]).await;
    assert_eq!(second.status(), 200);
    let arrivals = fake.arrivals();
    assert!(arrivals[1].at.duration_since(arrivals[0].at) >= Duration::from_millis(150));
}
