//! Anthropic's wire format: `POST /v1/messages` (a `message` object, or the
//! `message_start` … `message_stop` event stream), its error bodies, the in-stream
//! `event: error`, and the `anthropic-ratelimit-*` headers with RFC 3339 reset times.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use serde::Deserialize;
use serde_json::{Value, json};

use super::behaviour::{FailureKind, RetryAfter};
use super::bucket::{LimitSnapshot, Refusal};
use super::dialect::{
    ChatRequest, Completion, ErrorReply, MessageContent, Script, StreamFormat, bad_gateway,
    insert_header,
};

#[derive(Debug, Deserialize)]
struct Request {
    model: String,
    // Required by the real API; read so that a request without it is refused the same way.
    #[expect(dead_code, reason = "only its presence is checked")]
    max_tokens: u64,
    messages: Vec<Message>,
    #[serde(default)]
    system: Option<MessageContent>,
    #[serde(default)]
    stream: Option<bool>,
}

#[derive(Debug, Deserialize)]
struct Message {
    role: String,
    content: MessageContent,
}

pub(super) fn parse(body: &[u8]) -> Result<ChatRequest, String> {
    let request: Request =
        serde_json::from_slice(body).map_err(|e| format!("invalid request body: {e}"))?;
    let stream = if request.stream.unwrap_or(false) {
        StreamFormat::Sse
    } else {
        StreamFormat::Off
    };
    let system = request
        .system
        .as_ref()
        .map(|system| ("system", system.text()));
    let messages = request
        .messages
        .iter()
        .map(|message| (message.role.as_str(), message.content.text()));
    Ok(ChatRequest::from_messages(
        request.model,
        stream,
        false,
        system.into_iter().chain(messages),
        "user",
    ))
}

fn message_id(completion: &Completion) -> String {
    format!("msg_{}", completion.id)
}

pub(super) fn completion(completion: &Completion) -> Value {
    json!({
        "id": message_id(completion),
        "type": "message",
        "role": "assistant",
        "model": completion.model,
        "content": [{"type": "text", "text": completion.text}],
        "stop_reason": "end_turn",
        "stop_sequence": null,
        "usage": {
            "input_tokens": completion.prompt_tokens,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "output_tokens": completion.completion_tokens
        }
    })
}

fn event(name: &str, data: &Value) -> Bytes {
    Bytes::from(format!("event: {name}\ndata: {data}\n\n"))
}

pub(super) fn script(completion: &Completion) -> Script {
    let head = vec![
        event(
            "message_start",
            &json!({"type": "message_start", "message": {
                "id": message_id(completion),
                "type": "message",
                "role": "assistant",
                "model": completion.model,
                "content": [],
                "stop_reason": null,
                "stop_sequence": null,
                "usage": {
                    "input_tokens": completion.prompt_tokens,
                    "cache_creation_input_tokens": 0,
                    "cache_read_input_tokens": 0,
                    "output_tokens": 1
                }
            }}),
        ),
        event(
            "content_block_start",
            &json!({"type": "content_block_start", "index": 0,
                    "content_block": {"type": "text", "text": ""}}),
        ),
        event("ping", &json!({"type": "ping"})),
    ];
    let deltas = completion
        .text_pieces()
        .into_iter()
        .map(|piece| {
            event(
                "content_block_delta",
                &json!({"type": "content_block_delta", "index": 0,
                        "delta": {"type": "text_delta", "text": piece}}),
            )
        })
        .collect();
    let tail = vec![
        event(
            "content_block_stop",
            &json!({"type": "content_block_stop", "index": 0}),
        ),
        event(
            "message_delta",
            &json!({"type": "message_delta",
                    "delta": {"stop_reason": "end_turn", "stop_sequence": null},
                    "usage": {"output_tokens": completion.completion_tokens}}),
        ),
        event("message_stop", &json!({"type": "message_stop"})),
    ];
    Script { head, deltas, tail }
}

pub(super) fn stream_error() -> Bytes {
    event(
        "error",
        &json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
    )
}

fn error(status: StatusCode, kind: &str, message: &str) -> ErrorReply {
    ErrorReply::json(
        status,
        json!({"type": "error", "error": {"type": kind, "message": message},
               "request_id": "req_fake"}),
    )
}

fn rate_limit_message(limit: &str) -> String {
    format!(
        "This request would exceed the rate limit for your organization (org-fake) of {limit} \
         per minute. For details, refer to: https://docs.claude.com/en/api/rate-limits. You can \
         see the response headers for current usage. Please reduce the prompt length or the \
         maximum tokens requested, or try again later."
    )
}

pub(super) fn failure(kind: FailureKind, _model: &str) -> ErrorReply {
    match kind {
        FailureKind::RateLimited(hint) => {
            let reply = error(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                &rate_limit_message("50 requests"),
            );
            match hint {
                Some(RetryAfter::Seconds(s)) => reply.with_header("retry-after", s.to_string()),
                Some(RetryAfter::Millis(ms)) => reply.with_header("retry-after-ms", ms.to_string()),
                None => reply,
            }
        }
        FailureKind::InsufficientQuota => error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "Your credit balance is too low to access the Anthropic API. Please go to Plans & \
             Billing to upgrade or purchase credits.",
        ),
        FailureKind::RequestTooLarge => error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "request_too_large",
            "Request exceeds the maximum allowed number of bytes.",
        ),
        FailureKind::ContextLengthExceeded => error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "prompt is too long: 215000 tokens > 200000 maximum",
        ),
        FailureKind::Overloaded => overloaded(),
        FailureKind::InternalError => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "api_error",
            "Internal server error",
        ),
        FailureKind::BadGateway => bad_gateway(),
        FailureKind::Unavailable => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "api_error",
            "Service unavailable",
        ),
        FailureKind::GatewayTimeout => error(
            StatusCode::GATEWAY_TIMEOUT,
            "timeout_error",
            "Request timed out",
        ),
    }
}

fn overloaded() -> ErrorReply {
    let status = StatusCode::from_u16(529).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    error(status, "overloaded_error", "Overloaded")
}

pub(super) fn refusal(refusal: Refusal, limits: &LimitSnapshot, _model: &str) -> ErrorReply {
    let (limit, retry_in) = match refusal {
        Refusal::Requests { retry_in } => (
            format!("{} requests", limits.limit_requests),
            Some(retry_in),
        ),
        Refusal::Tokens { retry_in, .. } => {
            (format!("{} tokens", limits.limit_tokens), Some(retry_in))
        }
        Refusal::TooLarge { .. } => (format!("{} tokens", limits.limit_tokens), None),
    };
    let reply = error(
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limit_error",
        &rate_limit_message(&limit),
    );
    match retry_in {
        Some(retry_in) => reply.with_header(
            "retry-after",
            retry_in.as_millis().div_ceil(1000).to_string(),
        ),
        None => reply,
    }
}

pub(super) fn bad_request(message: &str) -> ErrorReply {
    error(StatusCode::BAD_REQUEST, "invalid_request_error", message)
}

pub(super) fn limit_headers(limits: &LimitSnapshot, now: SystemTime) -> HeaderMap {
    let mut headers = HeaderMap::new();
    let values = [
        (
            "anthropic-ratelimit-requests-limit",
            limits.limit_requests.to_string(),
        ),
        (
            "anthropic-ratelimit-requests-remaining",
            limits.remaining_requests.to_string(),
        ),
        (
            "anthropic-ratelimit-requests-reset",
            rfc3339_after(now, limits.reset_requests),
        ),
        (
            "anthropic-ratelimit-tokens-limit",
            limits.limit_tokens.to_string(),
        ),
        (
            "anthropic-ratelimit-tokens-remaining",
            limits.remaining_tokens.to_string(),
        ),
        (
            "anthropic-ratelimit-tokens-reset",
            rfc3339_after(now, limits.reset_tokens),
        ),
    ];
    for (name, value) in values {
        insert_header(&mut headers, name, value);
    }
    headers
}

/// `now + wait` in RFC 3339, rounded up to the whole second so it is never early.
fn rfc3339_after(now: SystemTime, wait: Duration) -> String {
    let at = now.checked_add(wait).unwrap_or(now);
    let since_epoch = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    let rounded_up = u64::try_from(since_epoch.as_millis().div_ceil(1000))
        .ok()
        .and_then(|seconds| UNIX_EPOCH.checked_add(Duration::from_secs(seconds)))
        .unwrap_or(at);
    humantime::format_rfc3339_seconds(rounded_up).to_string()
}
