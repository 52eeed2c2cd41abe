//! Gemini's wire format: `generateContent`, `streamGenerateContent` as server-sent events
//! (`alt=sse`) or as one JSON array, and Google RPC error bodies (`RESOURCE_EXHAUSTED` with
//! `QuotaFailure` and `RetryInfo` details). Gemini sends no rate-limit headers.

use std::time::Duration;

use axum::body::Bytes;
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};

use super::behaviour::{FailureKind, RetryAfter};
use super::bucket::{LimitSnapshot, Refusal};
use super::dialect::{
    ChatRequest, Completion, ContentPart, ErrorReply, Script, StreamFormat, bad_gateway,
};

const PER_MINUTE_REQUESTS: &str = "GenerateRequestsPerMinutePerProjectPerModel-FreeTier";
const PER_MINUTE_TOKENS: &str = "GenerateContentInputTokensPerModelPerMinute-FreeTier";
const PER_DAY_REQUESTS: &str = "GenerateRequestsPerDayPerProjectPerModel-FreeTier";
const REQUESTS_METRIC: &str =
    "generativelanguage.googleapis.com/generate_content_free_tier_requests";
const TOKENS_METRIC: &str =
    "generativelanguage.googleapis.com/generate_content_free_tier_input_token_count";

#[derive(Debug, Deserialize)]
struct Request {
    contents: Vec<Content>,
    #[serde(default, rename = "systemInstruction", alias = "system_instruction")]
    system_instruction: Option<Content>,
}

#[derive(Debug, Deserialize)]
struct Content {
    #[serde(default)]
    role: Option<String>,
    #[serde(default)]
    parts: Vec<ContentPart>,
}

impl Content {
    fn text(&self) -> String {
        self.parts
            .iter()
            .filter_map(|part| part.text.as_deref())
            .collect()
    }
}

pub(super) fn parse(body: &[u8], model: &str, stream: StreamFormat) -> Result<ChatRequest, String> {
    let request: Request =
        serde_json::from_slice(body).map_err(|e| format!("Invalid JSON payload received. {e}"))?;
    let system = request
        .system_instruction
        .as_ref()
        .map(|system| ("system", system.text()));
    let contents = request
        .contents
        .iter()
        .map(|content| (content.role.as_deref().unwrap_or("user"), content.text()));
    Ok(ChatRequest::from_messages(
        model.to_owned(),
        stream,
        false,
        system.into_iter().chain(contents),
        "user",
    ))
}

fn usage(completion: &Completion) -> Value {
    json!({
        "promptTokenCount": completion.prompt_tokens,
        "candidatesTokenCount": completion.completion_tokens,
        "totalTokenCount": completion.prompt_tokens + completion.completion_tokens,
        "promptTokensDetails": [{"modality": "TEXT", "tokenCount": completion.prompt_tokens}]
    })
}

fn response(completion: &Completion, text: &str, last: bool) -> Value {
    let mut candidate =
        json!({"content": {"parts": [{"text": text}], "role": "model"}, "index": 0});
    let usage = if last {
        candidate["finishReason"] = json!("STOP");
        usage(completion)
    } else {
        json!({"promptTokenCount": completion.prompt_tokens, "totalTokenCount": completion.prompt_tokens})
    };
    json!({
        "candidates": [candidate],
        "usageMetadata": usage,
        "modelVersion": completion.model,
        "responseId": completion.id
    })
}

pub(super) fn completion(completion: &Completion) -> Value {
    response(completion, &completion.text, true)
}

/// Frames one element of a stream: an SSE event (Gemini ends them with `\r\n\r\n`), or an
/// element of the JSON array, opened by `[` or separated by `,`.
fn frame(stream: StreamFormat, value: &Value, first: bool) -> Bytes {
    match stream {
        StreamFormat::JsonArray if first => Bytes::from(format!("[{value}")),
        StreamFormat::JsonArray => Bytes::from(format!(",\r\n{value}")),
        StreamFormat::Sse | StreamFormat::Off => Bytes::from(format!("data: {value}\r\n\r\n")),
    }
}

pub(super) fn script(completion: &Completion, stream: StreamFormat) -> Script {
    let pieces = completion.text_pieces();
    let last = pieces.len() - 1;
    let deltas = pieces
        .iter()
        .enumerate()
        .map(|(index, piece)| {
            frame(
                stream,
                &response(completion, piece, index == last),
                index == 0,
            )
        })
        .collect();
    let tail = match stream {
        StreamFormat::JsonArray => vec![Bytes::from_static(b"]")],
        StreamFormat::Sse | StreamFormat::Off => Vec::new(),
    };
    Script {
        head: Vec::new(),
        deltas,
        tail,
    }
}

/// A prompt the safety filter blocked: `promptFeedback` with its reason and ratings, usage, no
/// `candidates` (answered with 200). A stream is this one element.
pub(super) fn prompt_blocked(completion: &Completion, stream: StreamFormat) -> Bytes {
    let rating = |category: &str, probability: &str| json!({"category": category, "probability": probability});
    let mut harassment = rating("HARM_CATEGORY_HARASSMENT", "HIGH");
    harassment["blocked"] = json!(true);
    let value = json!({
        "promptFeedback": {
            "blockReason": "SAFETY",
            "safetyRatings": [
                rating("HARM_CATEGORY_SEXUALLY_EXPLICIT", "NEGLIGIBLE"),
                rating("HARM_CATEGORY_HATE_SPEECH", "NEGLIGIBLE"),
                harassment,
                rating("HARM_CATEGORY_DANGEROUS_CONTENT", "NEGLIGIBLE"),
            ]
        },
        "usageMetadata": {
            "promptTokenCount": completion.prompt_tokens,
            "totalTokenCount": completion.prompt_tokens
        },
        "modelVersion": completion.model,
        "responseId": completion.id
    });
    match stream {
        StreamFormat::Off => Bytes::from(value.to_string()),
        StreamFormat::Sse => frame(stream, &value, true),
        StreamFormat::JsonArray => [frame(stream, &value, true), Bytes::from_static(b"]")]
            .concat()
            .into(),
    }
}

/// Ends a stream with an error element; a JSON array is closed after it.
/// The error element ending a stream; `first` when nothing was sent before it.
pub(super) fn stream_error(stream: StreamFormat, first: bool) -> Bytes {
    let error = error_body(
        503,
        "The model is overloaded. Please try again later.",
        "UNAVAILABLE",
        None,
    );
    let framed = frame(stream, &error, first);
    match stream {
        StreamFormat::JsonArray => [framed, Bytes::from_static(b"]")].concat().into(),
        StreamFormat::Sse | StreamFormat::Off => framed,
    }
}

fn error_body(code: u16, message: &str, status: &str, details: Option<Vec<Value>>) -> Value {
    let mut error = json!({"code": code, "message": message, "status": status});
    if let Some(details) = details {
        error["details"] = Value::Array(details);
    }
    json!({"error": error})
}

fn error(status: StatusCode, message: &str, grpc_status: &str) -> ErrorReply {
    ErrorReply::json(
        status,
        error_body(status.as_u16(), message, grpc_status, None),
    )
}

/// A Google `Duration` in JSON: `2s`, `1.500s`.
fn proto_duration(duration: Duration) -> String {
    let millis = duration.as_millis();
    match millis % 1000 {
        0 => format!("{}s", millis / 1000),
        fraction => format!("{}.{fraction:03}s", millis / 1000),
    }
}

/// A 429 `RESOURCE_EXHAUSTED` naming the quota that ran out, with a `RetryInfo` when given.
fn exhausted(
    model: &str,
    quota_id: &str,
    metric: &str,
    limit: u64,
    retry: Option<Duration>,
) -> ErrorReply {
    let retry_sentence = match retry {
        Some(retry) => format!("\nPlease retry in {}.", proto_duration(retry)),
        None => String::new(),
    };
    let message = format!(
        "You exceeded your current quota, please check your plan and billing details. For more \
         information on this error, head to: https://ai.google.dev/gemini-api/docs/rate-limits.\n\
         * Quota exceeded for metric: {metric}, limit: {limit}, model: {model}{retry_sentence}"
    );
    let mut details = vec![
        json!({
            "@type": "type.googleapis.com/google.rpc.QuotaFailure",
            "violations": [{
                "quotaMetric": metric,
                "quotaId": quota_id,
                "quotaDimensions": {"location": "global", "model": model},
                "quotaValue": limit.to_string()
            }]
        }),
        json!({
            "@type": "type.googleapis.com/google.rpc.Help",
            "links": [{
                "description": "Learn more about Gemini API quotas",
                "url": "https://ai.google.dev/gemini-api/docs/rate-limits"
            }]
        }),
    ];
    if let Some(retry) = retry {
        details.push(json!({
            "@type": "type.googleapis.com/google.rpc.RetryInfo",
            "retryDelay": proto_duration(retry)
        }));
    }
    ErrorReply::json(
        StatusCode::TOO_MANY_REQUESTS,
        error_body(429, &message, "RESOURCE_EXHAUSTED", Some(details)),
    )
}

pub(super) fn failure(kind: FailureKind, model: &str) -> ErrorReply {
    match kind {
        FailureKind::RateLimited(hint) => exhausted(
            model,
            PER_MINUTE_REQUESTS,
            REQUESTS_METRIC,
            10,
            hint.map(RetryAfter::as_duration),
        ),
        // The real per-day answer carries a RetryInfo too, of a few seconds: a client must
        // read the quota id, not the delay, to know that retrying is pointless today.
        FailureKind::InsufficientQuota => exhausted(
            model,
            PER_DAY_REQUESTS,
            REQUESTS_METRIC,
            250,
            Some(Duration::from_secs(43)),
        ),
        FailureKind::RequestTooLarge => error(
            StatusCode::BAD_REQUEST,
            "Request payload size exceeds the limit: 20971520 bytes.",
            "INVALID_ARGUMENT",
        ),
        FailureKind::ContextLengthExceeded => error(
            StatusCode::BAD_REQUEST,
            "The input token count (1200000) exceeds the maximum number of tokens allowed \
             (1048576).",
            "INVALID_ARGUMENT",
        ),
        FailureKind::Overloaded => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "The model is overloaded. Please try again later.",
            "UNAVAILABLE",
        ),
        FailureKind::InternalError => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "An internal error has occurred. Please retry or report in \
             https://developers.generativeai.google/guide/troubleshooting",
            "INTERNAL",
        ),
        FailureKind::BadGateway => bad_gateway(),
        FailureKind::Unavailable => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "The service is currently unavailable.",
            "UNAVAILABLE",
        ),
        FailureKind::GatewayTimeout => error(
            StatusCode::GATEWAY_TIMEOUT,
            "Deadline expired before operation could complete.",
            "DEADLINE_EXCEEDED",
        ),
    }
}

pub(super) fn refusal(refusal: Refusal, limits: &LimitSnapshot, model: &str) -> ErrorReply {
    // Gemini states its own delays in whole seconds.
    let whole_seconds = |wait: Duration| {
        let seconds = u64::try_from(wait.as_millis().div_ceil(1000)).unwrap_or(u64::MAX);
        Some(Duration::from_secs(seconds))
    };
    match refusal {
        Refusal::Requests { retry_in } => exhausted(
            model,
            PER_MINUTE_REQUESTS,
            REQUESTS_METRIC,
            limits.limit_requests,
            whole_seconds(retry_in),
        ),
        Refusal::Tokens { retry_in, .. } => exhausted(
            model,
            PER_MINUTE_TOKENS,
            TOKENS_METRIC,
            limits.limit_tokens,
            whole_seconds(retry_in),
        ),
        Refusal::TooLarge { .. } => exhausted(
            model,
            PER_MINUTE_TOKENS,
            TOKENS_METRIC,
            limits.limit_tokens,
            None,
        ),
    }
}

pub(super) fn bad_request(message: &str) -> ErrorReply {
    error(StatusCode::BAD_REQUEST, message, "INVALID_ARGUMENT")
}

/// 404 for a path under `/v1beta/models/` that names no method the fake knows.
pub(super) fn not_found(path: &str) -> ErrorReply {
    error(
        StatusCode::NOT_FOUND,
        &format!(
            "{path} is not found for API version v1beta, or is not supported; the fake serves \
             models/{{model}}:generateContent and models/{{model}}:streamGenerateContent."
        ),
        "NOT_FOUND",
    )
}
