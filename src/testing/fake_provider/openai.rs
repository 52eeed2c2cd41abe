//! OpenAI's wire format: `POST /v1/chat/completions` (JSON and `chat.completion.chunk`
//! events ending in `data: [DONE]`), `GET /v1/models`, error bodies and `x-ratelimit-*`
//! headers as the real API sends them.

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use serde::Deserialize;
use serde_json::{Value, json};

use super::behaviour::{FailureKind, RetryAfter};
use super::bucket::{LimitSnapshot, Refusal, go_duration};
use super::dialect::{
    ChatRequest, Completion, ErrorReply, MessageContent, Script, StreamFormat, bad_gateway,
    data_event, insert_header,
};

const RATE_LIMITS_DOCS: &str =
    "Visit https://platform.openai.com/account/rate-limits to learn more.";

#[derive(Debug, Deserialize)]
struct Request {
    model: String,
    messages: Vec<Message>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
}

#[derive(Debug, Deserialize)]
struct Message {
    role: String,
    #[serde(default)]
    content: Option<MessageContent>,
}

#[derive(Debug, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

pub(super) fn parse(body: &[u8]) -> Result<ChatRequest, String> {
    let request: Request = serde_json::from_slice(body)
        .map_err(|e| format!("We could not parse the JSON body of your request: {e}"))?;
    let stream = if request.stream.unwrap_or(false) {
        StreamFormat::Sse
    } else {
        StreamFormat::Off
    };
    let include_usage = request
        .stream_options
        .and_then(|options| options.include_usage)
        .unwrap_or(false);
    let messages = request.messages.iter().map(|message| {
        let text = message
            .content
            .as_ref()
            .map(MessageContent::text)
            .unwrap_or_default();
        (message.role.as_str(), text)
    });
    Ok(ChatRequest::from_messages(
        request.model,
        stream,
        include_usage,
        messages,
        "user",
    ))
}

fn usage(completion: &Completion) -> Value {
    json!({
        "prompt_tokens": completion.prompt_tokens,
        "completion_tokens": completion.completion_tokens,
        "total_tokens": completion.prompt_tokens + completion.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0
        }
    })
}

fn completion_id(completion: &Completion) -> String {
    format!("chatcmpl-{}", completion.id)
}

pub(super) fn completion(completion: &Completion) -> Value {
    json!({
        "id": completion_id(completion),
        "object": "chat.completion",
        "created": completion.created,
        "model": completion.model,
        "choices": [{
            "index": 0,
            "message": {
                "role": "assistant",
                "content": completion.text,
                "refusal": null,
                "annotations": []
            },
            "logprobs": null,
            "finish_reason": "stop"
        }],
        "usage": usage(completion),
        "service_tier": "default",
        "system_fingerprint": "fp_fake"
    })
}

pub(super) fn script(completion: &Completion, include_usage: bool) -> Script {
    let chunk = |choices: Value, usage: Option<Value>| {
        let mut chunk = json!({
            "id": completion_id(completion),
            "object": "chat.completion.chunk",
            "created": completion.created,
            "model": completion.model,
            "service_tier": "default",
            "system_fingerprint": "fp_fake",
            "choices": choices
        });
        if include_usage {
            chunk["usage"] = usage.unwrap_or(Value::Null);
        }
        data_event(&chunk)
    };
    let choice = |delta: Value, finish_reason: Value| json!([{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish_reason}]);
    let head = vec![chunk(
        choice(
            json!({"role": "assistant", "content": "", "refusal": null}),
            Value::Null,
        ),
        None,
    )];
    let deltas = completion
        .text_pieces()
        .into_iter()
        .map(|piece| chunk(choice(json!({"content": piece}), Value::Null), None))
        .collect();
    let mut tail = vec![chunk(choice(json!({}), json!("stop")), None)];
    if include_usage {
        tail.push(chunk(json!([]), Some(usage(completion))));
    }
    tail.push(Bytes::from_static(b"data: [DONE]\n\n"));
    Script { head, deltas, tail }
}

pub(super) fn stream_error() -> Bytes {
    data_event(&error_body(
        "The server had an error while processing your request. Sorry about that!",
        "server_error",
        Value::Null,
        Value::Null,
    ))
}

fn error_body(message: &str, kind: &str, param: Value, code: Value) -> Value {
    json!({"error": {"message": message, "type": kind, "param": param, "code": code}})
}

fn error(status: StatusCode, message: &str, kind: &str, code: Value) -> ErrorReply {
    ErrorReply::json(status, error_body(message, kind, Value::Null, code))
}

pub(super) fn failure(kind: FailureKind, model: &str) -> ErrorReply {
    match kind {
        FailureKind::RateLimited(hint) => {
            let again = match hint {
                Some(hint) => format!(" Please try again in {}.", go_duration(hint.as_duration())),
                None => String::new(),
            };
            let message = format!(
                "Rate limit reached for {model} in organization org-fake on requests per min \
                 (RPM): Limit 3, Used 3, Requested 1.{again} {RATE_LIMITS_DOCS}"
            );
            let reply = error(
                StatusCode::TOO_MANY_REQUESTS,
                &message,
                "requests",
                json!("rate_limit_exceeded"),
            );
            match hint {
                Some(RetryAfter::Seconds(s)) => reply.with_header("retry-after", s.to_string()),
                Some(RetryAfter::Millis(ms)) => reply.with_header("retry-after-ms", ms.to_string()),
                None => reply,
            }
        }
        FailureKind::InsufficientQuota => error(
            StatusCode::TOO_MANY_REQUESTS,
            "You exceeded your current quota, please check your plan and billing details. For \
             more information on this error, read the docs: \
             https://platform.openai.com/docs/guides/error-codes/api-errors.",
            "insufficient_quota",
            json!("insufficient_quota"),
        ),
        FailureKind::RequestTooLarge => error(
            StatusCode::TOO_MANY_REQUESTS,
            &too_large_message(model, 30_000, 45_000),
            "tokens",
            json!("rate_limit_exceeded"),
        ),
        FailureKind::ContextLengthExceeded => ErrorReply::json(
            StatusCode::BAD_REQUEST,
            error_body(
                "This model's maximum context length is 128000 tokens. However, your messages \
                 resulted in 130532 tokens. Please reduce the length of the messages.",
                "invalid_request_error",
                json!("messages"),
                json!("context_length_exceeded"),
            ),
        ),
        FailureKind::Overloaded => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "The server is overloaded or not ready yet.",
            "server_error",
            Value::Null,
        ),
        FailureKind::InternalError => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "The server had an error while processing your request. Sorry about that!",
            "server_error",
            Value::Null,
        ),
        FailureKind::BadGateway => bad_gateway(),
        FailureKind::Unavailable => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "Service Unavailable.",
            "server_error",
            json!("service_unavailable"),
        ),
        FailureKind::GatewayTimeout => error(
            StatusCode::GATEWAY_TIMEOUT,
            "Gateway timeout. The request took too long; please try again.",
            "server_error",
            json!("gateway_timeout"),
        ),
    }
}

fn too_large_message(model: &str, limit: u64, requested: u64) -> String {
    format!(
        "Request too large for {model} in organization org-fake on tokens per min (TPM): Limit \
         {limit}, Requested {requested}. The input or output tokens must be reduced in order to \
         run successfully. {RATE_LIMITS_DOCS}"
    )
}

pub(super) fn refusal(refusal: Refusal, limits: &LimitSnapshot, model: &str) -> ErrorReply {
    let (message, kind, retry_in) = match refusal {
        Refusal::Requests { retry_in } => (
            format!(
                "Rate limit reached for {model} in organization org-fake on requests per min \
                 (RPM): Limit {}, Used {}, Requested 1. Please try again in {}. \
                 {RATE_LIMITS_DOCS}",
                limits.limit_requests,
                limits.limit_requests - limits.remaining_requests,
                go_duration(retry_in),
            ),
            "requests",
            Some(retry_in),
        ),
        Refusal::Tokens {
            requested,
            retry_in,
        } => (
            format!(
                "Rate limit reached for {model} in organization org-fake on tokens per min \
                 (TPM): Limit {}, Used {}, Requested {requested}. Please try again in {}. \
                 {RATE_LIMITS_DOCS}",
                limits.limit_tokens,
                limits.limit_tokens - limits.remaining_tokens,
                go_duration(retry_in),
            ),
            "tokens",
            Some(retry_in),
        ),
        Refusal::TooLarge { requested } => (
            too_large_message(model, limits.limit_tokens, requested),
            "tokens",
            None,
        ),
    };
    let reply = error(
        StatusCode::TOO_MANY_REQUESTS,
        &message,
        kind,
        json!("rate_limit_exceeded"),
    );
    match retry_in {
        Some(retry_in) => reply.with_header(
            "retry-after",
            retry_in.as_millis().div_ceil(1000).to_string(),
        ),
        None => reply,
    }
}

pub(super) fn bad_request(message: &str, param: &str) -> ErrorReply {
    let param = if param.is_empty() {
        Value::Null
    } else {
        json!(param)
    };
    ErrorReply::json(
        StatusCode::BAD_REQUEST,
        error_body(message, "invalid_request_error", param, Value::Null),
    )
}

pub(super) fn limit_headers(limits: &LimitSnapshot) -> HeaderMap {
    let mut headers = HeaderMap::new();
    let values = [
        (
            "x-ratelimit-limit-requests",
            limits.limit_requests.to_string(),
        ),
        ("x-ratelimit-limit-tokens", limits.limit_tokens.to_string()),
        (
            "x-ratelimit-remaining-requests",
            limits.remaining_requests.to_string(),
        ),
        (
            "x-ratelimit-remaining-tokens",
            limits.remaining_tokens.to_string(),
        ),
        (
            "x-ratelimit-reset-requests",
            go_duration(limits.reset_requests),
        ),
        ("x-ratelimit-reset-tokens", go_duration(limits.reset_tokens)),
    ];
    for (name, value) in values {
        insert_header(&mut headers, name, value);
    }
    headers
}

/// The `GET /v1/models` list.
pub(super) fn models(models: &[String], created: u64) -> Value {
    let data: Vec<Value> = models
        .iter()
        .map(|id| json!({"id": id, "object": "model", "created": created, "owned_by": "troupe-fake"}))
        .collect();
    json!({"object": "list", "data": data})
}
