//! Table-driven tests of the classification, on fixtures in the providers' real shapes
//! (`tests/fixtures/providers/`).

use std::time::Duration;

use super::*;
use ErrorKind::*;
use ProviderKind::{Anthropic, Gemini, OpenAi};

/// 2024-06-07T12:00:00Z.
fn now_wall() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_717_761_600)
}

fn ms(millis: u64) -> Option<Duration> {
    Some(Duration::from_millis(millis))
}

fn secs(secs: u64) -> Option<Duration> {
    Some(Duration::from_secs(secs))
}

/// One row: what the provider sent, and the expected
/// (kind, retryable, fallback, retry_after).
struct Case {
    provider: ProviderKind,
    status: u16,
    headers: &'static [(&'static str, &'static str)],
    body: &'static [u8],
    expected: (ErrorKind, bool, bool, Option<Duration>),
}

const fn case(
    provider: ProviderKind,
    status: u16,
    headers: &'static [(&'static str, &'static str)],
    body: &'static [u8],
    expected: (ErrorKind, bool, bool, Option<Duration>),
) -> Case {
    Case {
        provider,
        status,
        headers,
        body,
        expected,
    }
}

fn check(cases: &[Case]) {
    for (row, case) in cases.iter().enumerate() {
        let class = classify_http(
            case.provider,
            case.status,
            case.headers.iter().copied(),
            case.body,
            now_wall(),
        );
        assert_eq!(
            (
                class.kind,
                class.retryable,
                class.fallback,
                class.retry_after
            ),
            case.expected,
            "row {row}: {:?} {} {}",
            case.provider,
            case.status,
            String::from_utf8_lossy(case.body)
        );
        assert_eq!(class.status, Some(case.status));
    }
}

#[test]
fn openai_http_errors() {
    let too_large_400: &[u8] = br#"{"error": {"message": "Request too large for gpt-4o-mini in organization org-Xq3Lm2 on tokens per min (TPM): Limit 200000, Requested 212000.", "type": "invalid_request_error", "param": null, "code": null}}"#;
    let forbidden: &[u8] = br#"{"error": {"code": "unsupported_country_region_territory", "message": "Country, region, or territory not supported", "param": null, "type": "request_forbidden"}}"#;
    let vllm_context: &[u8] = br#"{"object": "error", "message": "This model's maximum context length is 4096 tokens. However, you requested 5000 tokens (4000 in the messages, 1000 in the completion).", "type": "BadRequestError", "param": null, "code": 400}"#;
    check(&[
        case(
            OpenAi,
            429,
            &[],
            fixture!("openai_429_rate_limit.json"),
            (RateLimited, true, true, ms(210)),
        ),
        case(
            OpenAi,
            429,
            &[("retry-after", "2"), ("retry-after-ms", "1500")],
            fixture!("openai_429_rate_limit.json"),
            (RateLimited, true, true, ms(1500)),
        ),
        case(
            OpenAi,
            429,
            &[("Retry-After", "3")],
            fixture!("openai_429_rate_limit.json"),
            (RateLimited, true, true, secs(3)),
        ),
        case(
            OpenAi,
            429,
            &[],
            fixture!("openai_429_insufficient_quota.json"),
            (QuotaExhausted, false, true, None),
        ),
        case(
            OpenAi,
            429,
            &[],
            fixture!("openai_429_request_too_large.json"),
            (RequestTooLarge, false, true, None),
        ),
        case(
            OpenAi,
            400,
            &[],
            too_large_400,
            (RequestTooLarge, false, true, None),
        ),
        case(
            OpenAi,
            400,
            &[],
            fixture!("openai_400_context_length_exceeded.json"),
            (ContextOverflow, false, false, None),
        ),
        case(
            OpenAi,
            400,
            &[],
            vllm_context,
            (ContextOverflow, false, false, None),
        ),
        case(
            OpenAi,
            400,
            &[],
            fixture!("openai_400_invalid_request.json"),
            (BadRequest, false, false, None),
        ),
        case(
            OpenAi,
            401,
            &[],
            fixture!("openai_401_invalid_api_key.json"),
            (Auth, false, true, None),
        ),
        case(
            OpenAi,
            403,
            &[],
            forbidden,
            (PermissionDenied, false, true, None),
        ),
        case(
            OpenAi,
            404,
            &[],
            fixture!("openai_404_model_not_found.json"),
            (NotFound, false, true, None),
        ),
        case(OpenAi, 422, &[], b"", (BadRequest, false, false, None)),
        case(OpenAi, 408, &[], b"", (Timeout, true, true, None)),
        case(OpenAi, 409, &[], b"", (Conflict, true, true, None)),
        case(
            OpenAi,
            500,
            &[],
            fixture!("openai_500_server_error.json"),
            (ServerError, true, true, None),
        ),
        case(
            OpenAi,
            503,
            &[],
            fixture!("openai_503_overloaded.json"),
            (Overloaded, true, true, None),
        ),
        case(OpenAi, 504, &[], b"", (Timeout, true, true, None)),
        // OpenAI-compatible servers and proxies.
        case(
            OpenAi,
            429,
            &[("retry-after", "4")],
            br#"{"error": "rate limited"}"#,
            (RateLimited, true, true, secs(4)),
        ),
        case(
            OpenAi,
            429,
            &[("retry-after", "Fri, 07 Jun 2024 12:00:30 GMT")],
            b"Too Many Requests",
            (RateLimited, true, true, secs(30)),
        ),
        case(
            OpenAi,
            502,
            &[],
            fixture!("proxy_502.html"),
            (ServerError, true, true, None),
        ),
    ]);
}

#[test]
fn anthropic_http_errors() {
    check(&[
        case(
            Anthropic,
            429,
            &[
                ("retry-after", "15"),
                ("anthropic-ratelimit-requests-remaining", "0"),
            ],
            fixture!("anthropic_429_rate_limit.json"),
            (RateLimited, true, true, secs(15)),
        ),
        case(
            Anthropic,
            529,
            &[],
            fixture!("anthropic_529_overloaded.json"),
            (Overloaded, true, true, None),
        ),
        case(
            Anthropic,
            400,
            &[],
            fixture!("anthropic_400_prompt_too_long.json"),
            (ContextOverflow, false, false, None),
        ),
        case(
            Anthropic,
            400,
            &[],
            fixture!("anthropic_400_exceed_context_limit.json"),
            (ContextOverflow, false, false, None),
        ),
        case(
            Anthropic,
            400,
            &[],
            fixture!("anthropic_400_credit_balance.json"),
            (QuotaExhausted, false, true, None),
        ),
        case(
            Anthropic,
            400,
            &[],
            fixture!("anthropic_400_invalid_request.json"),
            (BadRequest, false, false, None),
        ),
        case(
            Anthropic,
            401,
            &[],
            fixture!("anthropic_401_authentication.json"),
            (Auth, false, true, None),
        ),
        case(
            Anthropic,
            413,
            &[],
            fixture!("anthropic_413_request_too_large.json"),
            (RequestTooLarge, false, true, None),
        ),
        case(
            Anthropic,
            500,
            &[],
            fixture!("anthropic_500_api_error.json"),
            (ServerError, true, true, None),
        ),
        case(
            Anthropic,
            402,
            &[],
            br#"{"type":"error","error":{"type":"billing_error","message":"Billing issue"}}"#,
            (QuotaExhausted, false, true, None),
        ),
        case(
            Anthropic,
            403,
            &[],
            br#"{"type":"error","error":{"type":"permission_error","message":"no"}}"#,
            (PermissionDenied, false, true, None),
        ),
        case(
            Anthropic,
            404,
            &[],
            br#"{"type":"error","error":{"type":"not_found_error","message":"model: claude-9"}}"#,
            (NotFound, false, true, None),
        ),
        case(
            Anthropic,
            504,
            &[],
            br#"{"type":"error","error":{"type":"timeout_error","message":"Request timed out"}}"#,
            (Timeout, true, true, None),
        ),
        // An error type this code does not know: the status decides.
        case(
            Anthropic,
            418,
            &[],
            br#"{"type":"error","error":{"type":"teapot_error","message":"?"}}"#,
            (BadRequest, false, false, None),
        ),
        case(Anthropic, 529, &[], b"", (Overloaded, true, true, None)),
    ]);
}

#[test]
fn gemini_http_errors() {
    check(&[
        case(Gemini, 429, &[], fixture!("gemini_429_per_minute.json"), (RateLimited, true, true, secs(13))),
        case(Gemini, 429, &[], fixture!("gemini_429_per_minute_array.json"), (RateLimited, true, true, ms(500))),
        // Per day: no retry even though RetryInfo names a delay (kept as information).
        case(Gemini, 429, &[], fixture!("gemini_429_per_day.json"), (QuotaExhausted, false, true, secs(43))),
        case(
            Gemini,
            429,
            &[],
            br#"{"error": {"code": 429, "message": "Resource has been exhausted (e.g. check quota).", "status": "RESOURCE_EXHAUSTED"}}"#,
            (RateLimited, true, true, None),
        ),
        case(Gemini, 503, &[], fixture!("gemini_503_unavailable.json"), (Overloaded, true, true, None)),
        case(Gemini, 500, &[], fixture!("gemini_500_internal.json"), (ServerError, true, true, None)),
        case(Gemini, 400, &[], fixture!("gemini_400_api_key_invalid.json"), (Auth, false, true, None)),
        case(Gemini, 400, &[], fixture!("gemini_400_token_count.json"), (ContextOverflow, false, false, None)),
        case(Gemini, 404, &[], fixture!("gemini_404_not_found.json"), (NotFound, false, true, None)),
        case(
            Gemini,
            400,
            &[],
            br#"{"error": {"code": 400, "message": "User location is not supported for the API use.", "status": "FAILED_PRECONDITION"}}"#,
            (PermissionDenied, false, true, None),
        ),
        case(
            Gemini,
            504,
            &[],
            br#"[{"error": {"code": 504, "message": "Deadline expired before operation could complete.", "status": "DEADLINE_EXCEEDED"}}]"#,
            (Timeout, true, true, None),
        ),
        case(Gemini, 503, &[], b"", (Overloaded, true, true, None)),
    ]);
}

#[test]
fn the_class_carries_the_providers_code_and_message() {
    let class = classify_http(
        OpenAi,
        429,
        [("x", "y")],
        fixture!("openai_429_rate_limit.json"),
        now_wall(),
    );
    assert_eq!(class.provider_code.as_deref(), Some("rate_limit_exceeded"));
    assert!(
        class
            .message
            .as_deref()
            .is_some_and(|m| m.starts_with("Rate limit reached"))
    );
    let class = classify_http(
        OpenAi,
        500,
        [("x", "y")],
        fixture!("openai_500_server_error.json"),
        now_wall(),
    );
    assert_eq!(
        class.provider_code.as_deref(),
        Some("server_error"),
        "type when code is null"
    );
    let class = classify_http(
        Anthropic,
        529,
        [("x", "y")],
        fixture!("anthropic_529_overloaded.json"),
        now_wall(),
    );
    assert_eq!(class.provider_code.as_deref(), Some("overloaded_error"));
    let class = classify_http(
        Gemini,
        429,
        [("x", "y")],
        fixture!("gemini_429_per_minute.json"),
        now_wall(),
    );
    assert_eq!(class.provider_code.as_deref(), Some("RESOURCE_EXHAUSTED"));
    let class = classify_http(
        OpenAi,
        502,
        [("x", "y")],
        fixture!("proxy_502.html"),
        now_wall(),
    );
    assert_eq!((class.provider_code, class.message), (None, None));
}

#[test]
fn a_provider_code_of_any_length_is_kept_to_100_characters() {
    // Before, `type` went whole into the provider code: events, /v1/providers, error details.
    let body = format!(
        r#"{{"error": {{"message": "slow down", "type": "{}", "code": null}}}}"#,
        "x".repeat(60_000)
    );
    let class = classify_http(OpenAi, 429, [("x", "y")], body.as_bytes(), now_wall());
    assert_eq!(class.kind, RateLimited);
    let code = class.provider_code.expect("the type is the code");
    assert!(code.len() <= 100, "{} bytes", code.len());
    assert!(code.starts_with("xxx"));
    // Inside a stream too.
    let class = classify_stream_error(OpenAi, body.as_bytes());
    assert!(class.provider_code.is_some_and(|code| code.len() <= 100));
}

#[test]
fn any_status_and_body_classifies_without_panicking() {
    let bodies: &[&[u8]] = &[
        b"",
        b"\x00\xff garbage",
        b"<html><body>oops</body></html>",
        b"{",
        b"null",
        b"[{\"error\": []}]",
        b"{\"error\": {\"status\": \"RESOURCE_EXHAUSTED\", \"details\": [{\"@type\": 5}]}}",
        b"{\"error\": {\"message\": \"Request too large\"}}",
    ];
    for provider in [OpenAi, Anthropic, Gemini] {
        for status in (0..=1000).step_by(7).chain([429, 529, 503]) {
            for body in bodies {
                let class = classify_http(
                    provider,
                    status,
                    [("retry-after", "junk")],
                    body,
                    now_wall(),
                );
                assert_eq!(class.retryable, class.kind.retryable());
                assert_eq!(class.fallback, class.kind.fallback());
                assert_eq!(class.retry_after, None);
            }
            let class = classify_http(provider, status, [("a", "b")], b"", now_wall());
            assert_eq!(
                class.kind,
                ErrorKind::from_status(status),
                "an empty body goes by status"
            );
        }
    }
}

#[test]
fn mid_stream_error_events() {
    let cases: &[(ProviderKind, &[u8], ErrorKind)] = &[
        (Anthropic, fixture!("anthropic_stream_overloaded.sse"), Overloaded),
        (
            Anthropic,
            br#"{"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}"#,
            Overloaded,
        ),
        (
            Anthropic,
            br#"{"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}}"#,
            RateLimited,
        ),
        (Anthropic, br#"{"type": "error", "error": {"type": "api_error", "message": "x"}}"#, ServerError),
        (OpenAi, fixture!("openai_stream_server_error.sse"), ServerError),
        (
            OpenAi,
            br#"{"error": {"message": "You exceeded your current quota", "type": "insufficient_quota", "code": "insufficient_quota"}}"#,
            QuotaExhausted,
        ),
        (
            Gemini,
            br#"[{"error": {"code": 503, "message": "The model is overloaded.", "status": "UNAVAILABLE"}}]"#,
            Overloaded,
        ),
        (Anthropic, b"event: error\ndata: not json\n\n", ServerError),
        (OpenAi, b"", ServerError),
    ];
    for (provider, event, kind) in cases {
        let class = classify_stream_error(*provider, event);
        assert_eq!(
            class.kind,
            *kind,
            "{provider:?} {}",
            String::from_utf8_lossy(event)
        );
        assert_eq!(
            (class.retryable, class.fallback),
            (kind.retryable(), kind.fallback())
        );
        assert_eq!(class.status, None);
    }
    let class = classify_stream_error(Anthropic, fixture!("anthropic_stream_overloaded.sse"));
    assert_eq!(class.provider_code.as_deref(), Some("overloaded_error"));
    assert_eq!(class.message.as_deref(), Some("Overloaded"));
}

#[test]
fn transport_failures_are_retried_and_may_fall_back() {
    for (failure, kind) in [
        (TransportFailure::Connect, Connection),
        (TransportFailure::Interrupted, Connection),
        (TransportFailure::Timeout, Timeout),
    ] {
        let class = classify_transport(failure);
        assert_eq!(class, ErrorClass::of_kind(kind));
        assert!(class.retryable && class.fallback && class.kind.is_provider_fault());
    }
}

#[test]
fn status_table() {
    let cases = [
        (400, BadRequest),
        (401, Auth),
        (402, QuotaExhausted),
        (403, PermissionDenied),
        (404, NotFound),
        (405, BadRequest),
        (408, Timeout),
        (409, Conflict),
        (413, RequestTooLarge),
        (422, BadRequest),
        (429, RateLimited),
        (499, BadRequest),
        (500, ServerError),
        (502, ServerError),
        (503, Overloaded),
        (504, Timeout),
        (529, Overloaded),
        (599, ServerError),
        (200, Unexpected),
        (302, Unexpected),
        (600, Unexpected),
        (0, Unexpected),
    ];
    for (status, kind) in cases {
        assert_eq!(ErrorKind::from_status(status), kind, "{status}");
    }
}

#[test]
fn kind_rules_and_names() {
    let all = [
        RateLimited,
        QuotaExhausted,
        RequestTooLarge,
        ContextOverflow,
        Overloaded,
        ServerError,
        Timeout,
        Connection,
        BadRequest,
        Auth,
        PermissionDenied,
        NotFound,
        Conflict,
        Unexpected,
    ];
    let retryable: Vec<_> = all.into_iter().filter(|kind| kind.retryable()).collect();
    assert_eq!(
        retryable,
        [
            RateLimited,
            Overloaded,
            ServerError,
            Timeout,
            Connection,
            Conflict
        ]
    );
    let no_fallback: Vec<_> = all.into_iter().filter(|kind| !kind.fallback()).collect();
    assert_eq!(no_fallback, [ContextOverflow, BadRequest]);
    let faults: Vec<_> = all
        .into_iter()
        .filter(|kind| kind.is_provider_fault())
        .collect();
    assert_eq!(faults, [Overloaded, ServerError, Timeout, Connection]);
    for kind in all {
        let json = serde_json::to_string(&kind).expect("serializes");
        assert_eq!(json, format!("\"{}\"", kind.as_str()));
        assert_eq!(kind.to_string(), kind.as_str());
    }
}

#[test]
fn delays_in_a_body_longer_than_a_day_are_read_as_a_day() {
    let day = Some(troupe_actors::provider::headers::MAX_RETRY_HINT);
    let in_message: &[u8] = br#"{"error": {"message": "Rate limit reached. Please try again in 99999999999999h.", "type": "requests", "code": "rate_limit_exceeded"}}"#;
    let retry_info: &[u8] = br#"{"error": {"code": 429, "message": "Quota exceeded.", "status": "RESOURCE_EXHAUSTED", "details": [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "18446744073709551615s"}]}}"#;
    let header = [("retry-after", "18446744073709551615.5")];
    for (provider, headers, body) in [
        (OpenAi, &[][..], in_message),
        (Gemini, &[][..], retry_info),
        (OpenAi, &header[..], b"".as_slice()),
    ] {
        let class = classify_http(provider, 429, headers.iter().copied(), body, now_wall());
        assert_eq!(class.kind, RateLimited, "{}", String::from_utf8_lossy(body));
        assert_eq!(class.retry_after, day, "{}", String::from_utf8_lossy(body));
    }
}
