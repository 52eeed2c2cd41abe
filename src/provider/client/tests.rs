//! The clients against the fake provider: each API shape, streamed and not, and the failures
//! that must reach the caller classified (before the first chunk) or as a stream error.

use futures::StreamExt;
use serde_json::{Value, json};
use troupe_actors::provider::{ErrorKind, Progress, ProviderClient};

use super::{ChatReply, ChatRequest, ClientError, HttpProvider};
use crate::config::{ProviderConfig, ProviderTimeouts};
use crate::provider::ProviderKind;
use crate::testing::fake_provider::{FakeConfig, FakeProvider, FakeProviderHandle};

fn client(fake: &FakeProviderHandle, kind: ProviderKind) -> HttpProvider {
    client_with(fake, kind, ProviderTimeouts::default())
}

fn client_with(
    fake: &FakeProviderHandle,
    kind: ProviderKind,
    timeouts: ProviderTimeouts,
) -> HttpProvider {
    crate::tls::install_default_provider();
    let base_url = match kind {
        ProviderKind::OpenAi | ProviderKind::Anthropic => format!("{}/v1", fake.base_url()),
        ProviderKind::Gemini => format!("{}/v1beta", fake.base_url()),
    };
    let mut config = ProviderConfig::new("fake", kind, base_url);
    config.max_concurrency = 4;
    config.timeouts = timeouts;
    HttpProvider::new(&config).expect("client")
}

fn request(stream: bool) -> ChatRequest {
    ChatRequest::new(json!({
        "model": "ignored",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hello"}
        ],
        "stream": stream,
        "max_tokens": 50,
        "x_unknown_field": {"kept": true}
    }))
}

async fn collect(reply: ChatReply) -> (String, Option<ErrorKind>) {
    let ChatReply::Stream(mut stream) = reply else {
        panic!("expected a stream");
    };
    let mut text = String::new();
    while let Some(item) = stream.next().await {
        match item {
            Ok(chunk) => {
                let chunk: Value = serde_json::from_slice(&chunk).expect("chunks are JSON");
                assert_eq!(chunk["object"], "chat.completion.chunk");
                if let Some(piece) = chunk
                    .pointer("/choices/0/delta/content")
                    .and_then(Value::as_str)
                {
                    text.push_str(piece);
                }
            }
            Err(class) => return (text, Some(class.kind)),
        }
    }
    (text, None)
}

#[tokio::test]
async fn every_api_shape_answers_as_an_openai_completion_streamed_and_not() {
    let fake = FakeProvider::start(FakeConfig {
        reply: "Grüße, world".into(),
        ..FakeConfig::default()
    })
    .await
    .unwrap();
    for kind in [
        ProviderKind::OpenAi,
        ProviderKind::Anthropic,
        ProviderKind::Gemini,
    ] {
        let client = client(&fake, kind);
        let answer = client.send("m1", &request(false)).await.expect("answer");
        let ChatReply::Complete(body) = answer.reply else {
            panic!("{kind}: expected a whole answer");
        };
        let body: Value = serde_json::from_slice(&body).expect("JSON");
        assert_eq!(
            body["choices"][0]["message"]["content"], "Grüße, world",
            "{kind}"
        );
        let Progress::Complete { tokens } = answer.progress else {
            panic!("{kind}: complete");
        };
        assert!(
            tokens.is_some_and(|tokens| tokens > 0),
            "{kind}: {tokens:?}"
        );

        let answer = client.send("m1", &request(true)).await.expect("stream");
        assert_eq!(answer.progress, Progress::Streaming);
        let (text, error) = collect(answer.reply).await;
        assert_eq!((text.as_str(), error), ("Grüße, world", None), "{kind}");
    }
    fake.shutdown().await;
}

#[tokio::test]
async fn timeouts_past_the_clocks_range_are_no_panic() {
    // The configuration refuses more than a day; an embedder's client did `now + u64::MAX s`
    // for the first byte.
    let fake = FakeProvider::start(FakeConfig::default()).await.unwrap();
    let timeouts = ProviderTimeouts {
        connect_ms: u64::MAX,
        first_byte_secs: Some(u64::MAX),
        first_byte_ms: None,
        between_chunks_secs: Some(u64::MAX),
        between_chunks_ms: None,
    };
    let client = client_with(&fake, ProviderKind::OpenAi, timeouts);
    client.send("m1", &request(false)).await.expect("answer");
    let answer = client.send("m1", &request(true)).await.expect("stream");
    assert_eq!(collect(answer.reply).await.1, None);
    fake.shutdown().await;
}

#[tokio::test]
async fn chunks_cut_inside_json_and_characters_are_reassembled() {
    let fake = FakeProvider::start(FakeConfig {
        reply: "añb€c😀d".repeat(5),
        ..FakeConfig::default()
    })
    .await
    .unwrap();
    for kind in [
        ProviderKind::OpenAi,
        ProviderKind::Anthropic,
        ProviderKind::Gemini,
    ] {
        let answer = client(&fake, kind)
            .send("fake-split-chunks", &request(true))
            .await
            .expect("stream");
        let (text, error) = collect(answer.reply).await;
        assert_eq!(error, None, "{kind}");
        assert_eq!(text, "añb€c😀d".repeat(5), "{kind}");
    }
    fake.shutdown().await;
}

#[tokio::test]
async fn failures_before_the_first_chunk_are_classified_with_their_hints() {
    let fake = FakeProvider::start(FakeConfig::default()).await.unwrap();
    let cases = [
        (
            ProviderKind::OpenAi,
            "fake-429-retry-after-2",
            ErrorKind::RateLimited,
            Some(2000u64),
        ),
        (
            ProviderKind::OpenAi,
            "fake-insufficient-quota",
            ErrorKind::QuotaExhausted,
            None,
        ),
        (
            ProviderKind::OpenAi,
            "fake-context-length-exceeded",
            ErrorKind::ContextOverflow,
            None,
        ),
        (
            ProviderKind::Anthropic,
            "fake-529",
            ErrorKind::Overloaded,
            None,
        ),
        (
            ProviderKind::Gemini,
            "fake-429-retry-after-3",
            ErrorKind::RateLimited,
            Some(3000),
        ),
        (
            ProviderKind::OpenAi,
            "fake-502",
            ErrorKind::ServerError,
            None,
        ),
    ];
    for (kind, model, expected, retry_ms) in cases {
        for stream in [false, true] {
            let failed = client(&fake, kind)
                .send(model, &request(stream))
                .await
                .expect_err("a failure");
            assert_eq!(
                failed.class.kind, expected,
                "{kind} {model} stream={stream}"
            );
            assert_eq!(
                failed.class.retry_after.map(|d| d.as_millis()),
                retry_ms.map(|ms: u64| u128::from(ms)),
                "{kind} {model}"
            );
            assert!(failed.reached_provider);
        }
    }
    fake.shutdown().await;
}

#[tokio::test]
async fn a_stream_that_breaks_after_it_began_ends_with_an_error_not_a_silent_success() {
    let fake = FakeProvider::start(FakeConfig::default()).await.unwrap();
    for kind in [
        ProviderKind::OpenAi,
        ProviderKind::Anthropic,
        ProviderKind::Gemini,
    ] {
        for model in ["fake-close-mid-stream", "fake-stream-error"] {
            let answer = client(&fake, kind)
                .send(model, &request(true))
                .await
                .expect("the stream begins");
            let (_, error) = collect(answer.reply).await;
            assert!(error.is_some(), "{kind} {model}: no error at the end");
        }
    }
    fake.shutdown().await;
}

#[tokio::test]
async fn a_missing_key_fails_without_sending_and_names_the_variable() {
    let fake = FakeProvider::start(FakeConfig::default()).await.unwrap();
    let mut config =
        ProviderConfig::new("p", ProviderKind::OpenAi, format!("{}/v1", fake.base_url()));
    config.api_key_env = Some("TROUPE_TEST_SURELY_UNSET_KEY".into());
    config.max_concurrency = 1;
    let failed = HttpProvider::new(&config)
        .unwrap()
        .send("m", &request(false))
        .await
        .expect_err("no key");
    assert_eq!(failed.class.kind, ErrorKind::Auth);
    assert!(!failed.reached_provider);
    assert!(
        failed
            .class
            .message
            .unwrap()
            .contains("TROUPE_TEST_SURELY_UNSET_KEY")
    );
    assert!(fake.arrivals().is_empty());
    config.api_key_env = None;
    fake.shutdown().await;
}

#[test]
fn the_estimate_counts_the_prompt_and_the_completion_allowance() {
    assert_eq!(request(false).estimate_tokens(), (8 + 5) / 4 + 50);
    let bare = ChatRequest::new(json!({"messages": []}));
    assert_eq!(bare.estimate_tokens(), super::DEFAULT_COMPLETION_ESTIMATE);
}

#[test]
fn an_openai_request_goes_as_sent_with_only_the_model_replaced() {
    let body = super::openai::request("m9", &request(true)).unwrap();
    let body: Value = serde_json::from_slice(&body).unwrap();
    let mut expected = request(true).body;
    expected["model"] = json!("m9");
    assert_eq!(body, expected);
    assert_eq!(body["x_unknown_field"], json!({"kept": true}));
}

/// Timeouts far below the fake's delays: first byte 150 ms, between chunks 150 ms.
fn short_timeouts() -> ProviderTimeouts {
    ProviderTimeouts {
        first_byte_ms: Some(150),
        between_chunks_ms: Some(150),
        ..ProviderTimeouts::default()
    }
}

#[tokio::test]
async fn slow_headers_and_a_slow_first_token_pass_the_first_byte_timeout() {
    let fake = FakeProvider::start(FakeConfig::default()).await.unwrap();
    for kind in [
        ProviderKind::OpenAi,
        ProviderKind::Anthropic,
        ProviderKind::Gemini,
    ] {
        let provider = client_with(&fake, kind, short_timeouts());
        // No headers within the deadline, streamed or not.
        for stream in [false, true] {
            let failed = provider
                .send("fake-slow-headers-5000", &request(stream))
                .await
                .expect_err("past the first-byte deadline");
            assert_eq!(failed.class.kind, ErrorKind::Timeout, "{kind} {stream}");
            assert!(failed.class.retryable, "{kind}: a timeout may be retried");
            assert!(failed.reached_provider);
            let message = failed.class.message.unwrap_or_default();
            assert!(message.contains("within 150 ms"), "{kind}: {message}");
        }
        // Headers at once, but the stream's first event too late: still before the first
        // byte went anywhere, so it is a failure the caller can retry.
        let failed = provider
            .send("fake-slow-first-token-5000", &request(true))
            .await
            .expect_err("no first event before the deadline");
        assert_eq!(failed.class.kind, ErrorKind::Timeout, "{kind}");
        let message = failed.class.message.unwrap_or_default();
        assert!(message.contains("first_byte"), "{kind}: {message}");
        // Within the deadline, the same behaviours succeed.
        let patient = client_with(
            &fake,
            kind,
            ProviderTimeouts {
                first_byte_ms: Some(30_000),
                ..ProviderTimeouts::default()
            },
        );
        let answer = patient
            .send("fake-slow-first-token-200", &request(true))
            .await
            .expect("the first event within 30 s");
        let (text, error) = collect(answer.reply).await;
        assert_eq!(error, None, "{kind}");
        assert!(!text.is_empty(), "{kind}");
    }
    fake.shutdown().await;
}

#[tokio::test]
async fn a_trickle_slower_than_the_gap_fails_the_body_or_ends_the_stream_with_a_timeout() {
    let fake = FakeProvider::start(FakeConfig::default()).await.unwrap();
    for kind in [
        ProviderKind::OpenAi,
        ProviderKind::Anthropic,
        ProviderKind::Gemini,
    ] {
        let provider = client_with(
            &fake,
            kind,
            ProviderTimeouts {
                first_byte_ms: Some(30_000),
                between_chunks_ms: Some(150),
                ..ProviderTimeouts::default()
            },
        );
        // A whole answer whose pieces come 2 s apart: the body read gives up.
        let failed = provider
            .send("fake-trickle-2000", &request(false))
            .await
            .expect_err("a gap past between_chunks");
        assert_eq!(failed.class.kind, ErrorKind::Timeout, "{kind}");
        assert!(failed.reached_provider);
        // A stream whose events come 400 ms apart: its first text comes within the first-byte
        // timeout (the events before it, a role or Anthropic's `message_start`, wait under that
        // one, not the gap) and the call is committed with it; the next event is too late: the
        // stream ends with a timeout instead of hanging or ending as if complete.
        let answer = provider
            .send("fake-trickle-400", &request(true))
            .await
            .expect("the first text in time");
        let (text, error) = collect(answer.reply).await;
        assert_eq!(error, Some(ErrorKind::Timeout), "{kind}");
        assert!(
            !text.is_empty(),
            "{kind}: the first text came with the commit"
        );
        // A trickle inside the gap is a complete answer.
        let answer = provider
            .send("fake-trickle-20", &request(true))
            .await
            .expect("a quick trickle");
        let (text, error) = collect(answer.reply).await;
        assert_eq!(error, None, "{kind}");
        assert_eq!(text, FakeConfig::default().reply, "{kind}");
    }
    fake.shutdown().await;
}

#[tokio::test]
async fn a_connection_that_is_never_accepted_hits_the_connect_timeout() {
    // A listener with a backlog of 0 whose queue is already full: the kernel drops further
    // SYNs, so connecting hangs until the client's connect timeout.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(0).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut fillers = Vec::new();
    let mut config =
        ProviderConfig::new("stuck", ProviderKind::OpenAi, format!("http://{addr}/v1"));
    config.timeouts.connect_ms = 200;
    crate::tls::install_default_provider();
    let provider = HttpProvider::new(&config).unwrap();
    // Fill the accept queue (the kernel keeps backlog + 1): a filler whose connect does not
    // complete within a moment means the queue is full.
    let filled = loop {
        assert!(fillers.len() < 16, "the accept queue never filled");
        match tokio::time::timeout(
            std::time::Duration::from_millis(500),
            tokio::net::TcpStream::connect(addr),
        )
        .await
        {
            Ok(stream) => fillers.push(stream.unwrap()),
            Err(_) => break true,
        }
    };
    assert!(filled);
    let failed = provider
        .send("m", &request(false))
        .await
        .expect_err("no connection");
    assert_eq!(
        failed.class.kind,
        ErrorKind::Connection,
        "{:?}",
        failed.class
    );
    assert!(!failed.reached_provider, "the request was never sent");
    assert!(failed.class.retryable);
    let message = failed.class.message.unwrap_or_default();
    assert!(
        message.contains("within 200 ms (timeouts.connect_ms)"),
        "{message}"
    );
    drop(listener);
}

#[test]
fn usage_is_read_from_a_whole_answer_without_rewriting_it() {
    use super::openai::usage_of;
    let answer = br#"{"id":"x","usage":{"prompt_tokens":3,"total_tokens":12},"choices":[]}"#;
    assert_eq!(usage_of(answer).unwrap(), Some(12));
    assert_eq!(usage_of(br#"{"id":"x","usage":null}"#).unwrap(), None);
    assert_eq!(usage_of(br#"{"usage":"odd"}"#).unwrap(), None);
    assert_eq!(usage_of(b"[1, 2]").unwrap(), None, "JSON, but no usage");
    assert!(usage_of(b"<html>").is_err());
    assert!(
        usage_of(br#"{"usage": {"total_tokens": 1}"#).is_err(),
        "cut short"
    );
}

#[test]
fn a_base_url_that_makes_no_valid_url_is_refused_when_the_client_is_built() {
    for kind in [
        ProviderKind::OpenAi,
        ProviderKind::Anthropic,
        ProviderKind::Gemini,
    ] {
        let config = ProviderConfig::new("p", kind, "http://exa mple/v1");
        let Err(error) = HttpProvider::new(&config) else {
            panic!("{kind:?}: a host with a space was accepted");
        };
        assert!(
            matches!(&error, ClientError::BadUrl { provider, .. } if provider == "p"),
            "{kind:?}: {error}"
        );
        assert!(error.to_string().contains("base_url"), "{error}");
    }
    // Named without the credentials it carries.
    let config = ProviderConfig::new("p", ProviderKind::OpenAi, "http://me:s3cr3t@exa mple/v1");
    let Err(error) = HttpProvider::new(&config) else {
        panic!("a host with a space was accepted");
    };
    let message = error.to_string();
    assert!(
        !message.contains("s3cr3t") && message.contains("http://***@exa mple/v1"),
        "{message}"
    );
}

#[tokio::test]
async fn a_redirect_is_not_followed_and_says_where_it_pointed() {
    crate::tls::install_default_provider();
    // A server that redirects every call elsewhere and counts what reaches the target.
    let followed = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = followed.clone();
    let app = axum::Router::new()
        .route(
            "/v1/chat/completions",
            axum::routing::post(|| async {
                (
                    axum::http::StatusCode::TEMPORARY_REDIRECT,
                    [(axum::http::header::LOCATION, "/elsewhere/chat/completions")],
                )
            }),
        )
        .route(
            "/elsewhere/chat/completions",
            axum::routing::post(move || {
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                async { "{}" }
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let config = ProviderConfig::new("p", ProviderKind::OpenAi, format!("http://{addr}/v1"));
    let failed = HttpProvider::new(&config)
        .unwrap()
        .send("m", &request(false))
        .await
        .expect_err("a redirect is a failure");
    assert_eq!(failed.class.kind, ErrorKind::Unexpected);
    assert_eq!(failed.class.status, Some(307));
    assert!(failed.reached_provider);
    let message = failed.class.message.unwrap();
    assert!(
        message.contains("/elsewhere/chat/completions") && message.contains("base_url"),
        "{message}"
    );
    assert_eq!(followed.load(std::sync::atomic::Ordering::SeqCst), 0);
    server.abort();
}

#[tokio::test]
async fn a_prompt_gemini_blocks_is_a_content_filter_error_not_a_server_error() {
    let fake = FakeProvider::start(FakeConfig::default()).await.unwrap();
    let client = client(&fake, ProviderKind::Gemini);
    for stream in [false, true] {
        let failed = client
            .send("fake-prompt-blocked", &request(stream))
            .await
            .expect_err("a blocked prompt fails the call");
        let class = &failed.class;
        assert_eq!(class.kind, ErrorKind::ContentFilter, "stream={stream}");
        assert!(
            !class.retryable && !class.kind.is_provider_fault(),
            "{class:?}"
        );
        assert_eq!(class.provider_code.as_deref(), Some("SAFETY"));
        assert!(failed.reached_provider);
    }
    // The fake answered 200 both times: what made them failures is the body.
    assert_eq!(fake.arrivals().len(), 2);
    fake.shutdown().await;
}

/// A chunk in OpenAI's shape with `delta` and `finish_reason`.
fn chunk(delta: Value, finish_reason: Value) -> bytes::Bytes {
    bytes::Bytes::from(
        json!({"object": "chat.completion.chunk",
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]})
        .to_string(),
    )
}

#[tokio::test]
async fn chunks_without_content_are_held_back_until_the_first_with_content() {
    use super::{BeforeContent, MAX_HELD_CHUNKS, hold_back};
    use troupe_actors::provider::ErrorClass;

    let role = chunk(
        json!({"role": "assistant", "content": "", "refusal": null}),
        Value::Null,
    );
    let empty = chunk(json!({}), Value::Null);
    let text = chunk(json!({"content": "Hi"}), Value::Null);
    let finish = chunk(json!({}), json!("stop"));
    let overloaded = ErrorClass::of_kind(ErrorKind::Overloaded);
    let deadline = || tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    let stream = |items: Vec<Result<bytes::Bytes, ErrorClass>>| futures::stream::iter(items);

    // Held until the text, then all in order; what follows stays in the stream.
    let mut events = stream(vec![
        Ok(role.clone()),
        Ok(empty.clone()),
        Ok(text.clone()),
        Ok(finish.clone()),
    ]);
    let held = hold_back(&mut events, deadline()).await.expect("begun");
    assert_eq!(held, [role.clone(), empty.clone(), text.clone()]);
    assert_eq!(events.next().await, Some(Ok(finish.clone())));

    // A failure after only empty chunks is a failure before the first byte.
    let mut events = stream(vec![Ok(role.clone()), Err(overloaded.clone())]);
    assert!(matches!(
        hold_back(&mut events, deadline()).await,
        Err(BeforeContent::Failed(class)) if class.kind == ErrorKind::Overloaded
    ));

    // A finish counts as content; an end after empty chunks hands them over.
    let mut events = stream(vec![Ok(role.clone()), Ok(finish.clone())]);
    let held = hold_back(&mut events, deadline()).await.expect("begun");
    assert_eq!(held, [role.clone(), finish]);
    let mut events = stream(vec![Ok(role.clone())]);
    let held = hold_back(&mut events, deadline()).await.expect("ended");
    assert_eq!(held, vec![role.clone()]);
    let mut events = stream(Vec::new());
    assert!(matches!(
        hold_back(&mut events, deadline()).await,
        Err(BeforeContent::Failed(class)) if class.kind == ErrorKind::Connection
    ));

    // At most a handful are held: past them the stream counts as begun.
    let mut events = stream(vec![Ok(empty.clone()); MAX_HELD_CHUNKS + 5]);
    let held = hold_back(&mut events, deadline()).await.expect("begun");
    assert_eq!(held.len(), MAX_HELD_CHUNKS);

    // Nothing with content before the deadline: a first-byte timeout.
    let mut events = stream(vec![Ok(role)]).chain(futures::stream::pending());
    let soon = tokio::time::Instant::now() + std::time::Duration::from_millis(50);
    assert!(matches!(
        hold_back(&mut events, soon).await,
        Err(BeforeContent::Timeout)
    ));
}

#[test]
fn content_is_text_another_delta_field_a_finish_or_usage() {
    use super::carries_content;
    let no = [
        chunk(json!({"role": "assistant", "content": ""}), Value::Null),
        chunk(
            json!({"role": "assistant", "content": null, "tool_calls": []}),
            Value::Null,
        ),
        chunk(json!({}), Value::Null),
        bytes::Bytes::from(r#"{"choices": [], "prompt_filter_results": []}"#),
    ];
    for chunk in &no {
        assert!(!carries_content(chunk), "{chunk:?}");
    }
    let yes = [
        chunk(json!({"content": " "}), Value::Null),
        chunk(json!({"tool_calls": [{"index": 0}]}), Value::Null),
        chunk(json!({"reasoning_content": "hm"}), Value::Null),
        chunk(json!({}), json!("stop")),
        bytes::Bytes::from(r#"{"choices": [], "usage": {"total_tokens": 3}}"#),
        bytes::Bytes::from("not json"),
    ];
    for chunk in &yes {
        assert!(carries_content(chunk), "{chunk:?}");
    }
}

#[tokio::test]
async fn a_failure_after_the_message_start_but_before_any_text_is_a_failure_before_the_first_byte()
{
    let fake = FakeProvider::start(FakeConfig::default()).await.unwrap();
    for kind in [
        ProviderKind::OpenAi,
        ProviderKind::Anthropic,
        ProviderKind::Gemini,
    ] {
        let failed = client(&fake, kind)
            .send("fake-error-after-start", &request(true))
            .await
            .expect_err("no text came: the call was not committed");
        assert!(failed.class.retryable, "{kind}: {:?}", failed.class);
        assert!(failed.class.fallback, "{kind}: {:?}", failed.class);
        assert!(failed.reached_provider, "{kind}");
    }
    fake.shutdown().await;
}

/// A server that answers every `POST /v1/chat/completions` with 200 and `body` (as JSON); the
/// base URL of an OpenAI-compatible provider there, and the server's task.
async fn answering_200(body: &'static str) -> (String, tokio::task::JoinHandle<()>) {
    let app = axum::Router::new().route(
        "/v1/chat/completions",
        axum::routing::post(move || async move {
            (
                [(axum::http::header::CONTENT_TYPE, "application/json")],
                body,
            )
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    (format!("http://{addr}/v1"), server)
}

#[tokio::test]
async fn a_200_whose_body_is_an_error_without_choices_is_a_failure_not_an_answer() {
    crate::tls::install_default_provider();
    let cases = [
        // OpenRouter's shape once the model failed after the headers went out.
        (
            r#"{"error":{"code":502,"message":"Provider returned error","metadata":{"raw":"x"}}}"#,
            ErrorKind::ServerError,
        ),
        (
            r#"{"error":{"message":"Rate limit exceeded","type":"requests","code":"rate_limit_exceeded"}}"#,
            ErrorKind::RateLimited,
        ),
    ];
    for (body, expected) in cases {
        let (base_url, server) = answering_200(body).await;
        let config = ProviderConfig::new("p", ProviderKind::OpenAi, base_url);
        let failed = HttpProvider::new(&config)
            .unwrap()
            .send("m", &request(false))
            .await
            .expect_err("an error body is a failure");
        assert_eq!(failed.class.kind, expected, "{body}");
        assert!(
            failed.class.retryable && failed.class.fallback,
            "{:?}",
            failed.class
        );
        assert!(failed.reached_provider);
        let message = failed.class.message.unwrap_or_default();
        assert!(message.contains("answered 200"), "{message}");
        server.abort();
    }
    // A completion that carries `"error": null` (or an error beside its choices) is an answer.
    for body in [
        r#"{"id":"x","choices":[{"index":0,"message":{"role":"assistant","content":"hi"}}],"error":null}"#,
        r#"{"id":"x","error":{"message":"partial"},"choices":[{"index":0,"message":{"role":"assistant","content":"hi"}}]}"#,
    ] {
        let (base_url, server) = answering_200(body).await;
        let config = ProviderConfig::new("p", ProviderKind::OpenAi, base_url);
        let answer = HttpProvider::new(&config)
            .unwrap()
            .send("m", &request(false))
            .await
            .expect("an answer");
        let ChatReply::Complete(reply) = answer.reply else {
            panic!("a whole answer");
        };
        assert_eq!(reply, body.as_bytes(), "passed on as it came");
        server.abort();
    }
}

#[tokio::test]
async fn credentials_in_the_base_url_stay_out_of_failure_messages() {
    crate::tls::install_default_provider();
    // Refused: a port that was just free.
    let refused = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    // Interrupted: a server that reads the request and closes without answering.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let closing = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        loop {
            let Ok((mut socket, _)) = listener.accept().await else {
                return;
            };
            let mut buffer = [0u8; 4096];
            let _ = tokio::io::AsyncReadExt::read(&mut socket, &mut buffer).await;
            drop(socket);
        }
    });
    for (addr, expected) in [
        (refused, ErrorKind::Connection),
        (closing, ErrorKind::Connection),
    ] {
        let base_url = format!("http://troupe:s3cr3t-pw@{addr}/v1");
        let config = ProviderConfig::new("p", ProviderKind::OpenAi, base_url);
        let failed = HttpProvider::new(&config)
            .unwrap()
            .send("m", &request(false))
            .await
            .expect_err("no answer");
        assert_eq!(failed.class.kind, expected, "{:?}", failed.class);
        let message = failed.class.message.unwrap_or_default();
        assert!(
            !message.contains("s3cr3t") && !message.contains("troupe:"),
            "{message}"
        );
        assert!(message.contains(&addr.to_string()), "{message}");
    }
    server.abort();
}

#[tokio::test]
async fn a_whole_json_answer_to_a_stream_request_is_classified_or_passed_on_as_one_chunk() {
    // Before, it was read as SSE, held no event and counted as a broken connection: retried,
    // counted toward the breaker, then 502.
    crate::tls::install_default_provider();
    let send = |base_url: String| async move {
        let config = ProviderConfig::new("p", ProviderKind::OpenAi, base_url);
        HttpProvider::new(&config)
            .unwrap()
            .send("m", &request(true))
            .await
    };
    // An error in place of a completion: classified as in a whole answer.
    let (base_url, server) = answering_200(
        r#"{"error":{"message":"Rate limit exceeded","type":"requests","code":"rate_limit_exceeded"}}"#,
    )
    .await;
    let failed = send(base_url)
        .await
        .expect_err("an error body is a failure");
    assert_eq!(
        failed.class.kind,
        ErrorKind::RateLimited,
        "{:?}",
        failed.class
    );
    let message = failed.class.message.unwrap_or_default();
    assert!(message.contains("answered 200"), "{message}");
    server.abort();
    // A completion: the one chunk of a stream, its usage counted.
    let (base_url, server) = answering_200(
        r#"{"id":"c1","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"hi","tool_calls":[{"id":"t","type":"function","function":{"name":"f","arguments":"{}"}}]},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}"#,
    )
    .await;
    let answer = send(base_url).await.expect("an answer");
    assert_eq!(answer.progress, Progress::Streaming);
    let ChatReply::Stream(mut stream) = answer.reply else {
        panic!("a stream, as the caller asked");
    };
    let chunk = stream.next().await.expect("a chunk").expect("no failure");
    let chunk: Value = serde_json::from_slice(&chunk).expect("JSON");
    assert_eq!(chunk["object"], "chat.completion.chunk");
    assert_eq!(chunk["id"], "c1");
    let choice = &chunk["choices"][0];
    assert_eq!(choice["delta"]["role"], "assistant");
    assert_eq!(choice["delta"]["content"], "hi");
    assert_eq!(choice["delta"]["tool_calls"][0]["index"], 0);
    assert_eq!(choice["finish_reason"], "stop");
    assert_eq!(chunk["usage"]["total_tokens"], 5);
    assert!(stream.next().await.is_none(), "then the end");
    assert_eq!(stream.tokens(), Some(5));
    server.abort();
    // JSON that is neither: the provider's fault, said so.
    let (base_url, server) = answering_200(r#"{"hello": 1}"#).await;
    let failed = send(base_url).await.expect_err("not a completion");
    assert_eq!(failed.class.kind, ErrorKind::ServerError);
    let message = failed.class.message.unwrap_or_default();
    assert!(message.contains("neither a chat completion"), "{message}");
    server.abort();
}

#[test]
fn json_content_types_are_told_from_event_streams() {
    let headers = |value: &'static str| {
        let mut headers = http::HeaderMap::new();
        headers.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static(value),
        );
        headers
    };
    for json in [
        "application/json",
        "Application/JSON; charset=utf-8",
        "application/problem+json",
    ] {
        assert!(super::is_json(&headers(json)), "{json}");
    }
    for other in [
        "text/event-stream",
        "text/event-stream; charset=utf-8",
        "text/plain",
    ] {
        assert!(!super::is_json(&headers(other)), "{other}");
    }
    assert!(!super::is_json(&http::HeaderMap::new()));
}
