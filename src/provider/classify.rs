//! Classification of provider failures: an HTTP error answer (status, headers, body), an error
//! event in the middle of a stream, or a transport failure, into one typed [`ErrorClass`] that
//! says whether a retry can succeed and whether another provider or model may be tried.
//!
//! Each provider's error shapes are read (OpenAI codes, Anthropic error types, Gemini statuses
//! and `google.rpc` details); anything unreadable (an HTML page from a proxy, an empty body)
//! falls back to the status code. It never panics on what a provider sends and does no I/O.

use std::time::SystemTime;

pub use troupe_actors::provider::failure::{ErrorClass, ErrorKind};
use troupe_actors::provider::headers::{MAX_RETRY_HINT, retry_after};

use super::ProviderKind;
use super::error_body::{ErrorBody, delay_in_message};

/// A failure below HTTP, as the provider client saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TransportFailure {
    /// No connection (refused, DNS, TLS handshake).
    Connect,
    /// The client's deadline passed.
    Timeout,
    /// The connection broke while the answer was being read.
    Interrupted,
}

/// Classifies an HTTP answer whose status is not a success. `headers` are (name, value) pairs
/// (see [`header_pairs`](super::header_pairs) for an `http::HeaderMap`); `now_wall` anchors an
/// HTTP-date `retry-after`.
pub fn classify_http<I, K, V>(
    provider: ProviderKind,
    status: u16,
    headers: I,
    body: &[u8],
    now_wall: SystemTime,
) -> ErrorClass
where
    I: IntoIterator<Item = (K, V)>,
    K: AsRef<str>,
    V: AsRef<str>,
{
    let parsed = ErrorBody::parse(body);
    let kind = parsed
        .as_ref()
        .and_then(|body| kind_from_body(provider, Some(status), body))
        .unwrap_or_else(|| ErrorKind::from_status(status));
    let mut class = class_with_body(kind, parsed.as_ref());
    class.status = Some(status);
    if let Some(hint) = retry_after(headers, now_wall) {
        class.retry_after = Some(hint);
    }
    class
}

/// Classifies an error that arrived inside a stream: Anthropic's `event: error` with
/// `{"type": "error", "error": {"type": "overloaded_error", …}}`, or an OpenAI-style
/// `data: {"error": {…}}`. Takes the event's data or the whole event text. An error event that
/// cannot be read is a server error: the stream broke on the provider's side.
///
/// `retryable` says whether the request could succeed again; whether it may be retried at all
/// (no byte sent to the caller yet) is the gateway's decision.
pub fn classify_stream_error(provider: ProviderKind, event: &[u8]) -> ErrorClass {
    let parsed = ErrorBody::parse_event(event);
    let kind = parsed
        .as_ref()
        .and_then(|body| kind_from_body(provider, None, body))
        .unwrap_or(ErrorKind::ServerError);
    class_with_body(kind, parsed.as_ref())
}

/// Classifies a transport failure: all of them are worth a retry and a fallback.
pub fn classify_transport(failure: TransportFailure) -> ErrorClass {
    ErrorClass::of_kind(match failure {
        TransportFailure::Connect | TransportFailure::Interrupted => ErrorKind::Connection,
        TransportFailure::Timeout => ErrorKind::Timeout,
    })
}

/// The class of `kind`, with what the body adds: the provider's code, message and delay.
fn class_with_body(kind: ErrorKind, body: Option<&ErrorBody>) -> ErrorClass {
    let mut class = ErrorClass::of_kind(kind);
    if let Some(body) = body {
        class.provider_code = body
            .status
            .clone()
            .or_else(|| {
                body.code
                    .clone()
                    .filter(|code| code.parse::<u16>().is_err())
            })
            .or_else(|| body.error_type.clone());
        class.message = body.message.clone();
        class.retry_after = body
            .retry_delay
            .or_else(|| body.message.as_deref().and_then(delay_in_message))
            .map(|delay| delay.min(MAX_RETRY_HINT));
    }
    class
}

/// The kind the body decides, if it decides one; `status` is `None` inside a stream.
fn kind_from_body(
    provider: ProviderKind,
    status: Option<u16>,
    body: &ErrorBody,
) -> Option<ErrorKind> {
    match provider {
        ProviderKind::OpenAi => openai_kind(status, body),
        ProviderKind::Anthropic => anthropic_kind(body),
        ProviderKind::Gemini => gemini_kind(body),
    }
}

/// OpenAI and OpenAI-compatible servers: `error.code` and `error.type`, and a few messages
/// that carry the meaning (compatible servers often send only a message).
fn openai_kind(status: Option<u16>, body: &ErrorBody) -> Option<ErrorKind> {
    let code = body.code.as_deref();
    let error_type = body.error_type.as_deref();
    let is = |name: &str| code == Some(name) || error_type == Some(name);
    let message = body.message_lowercase();
    let client_error = status.is_none_or(|status| (400..500).contains(&status));
    if is("insufficient_quota") {
        return Some(ErrorKind::QuotaExhausted);
    }
    if client_error && message.trim_start().starts_with("request too large") {
        return Some(ErrorKind::RequestTooLarge);
    }
    if is("context_length_exceeded") || (client_error && message.contains("maximum context length"))
    {
        return Some(ErrorKind::ContextOverflow);
    }
    if is("invalid_api_key") {
        return Some(ErrorKind::Auth);
    }
    if is("model_not_found") {
        return Some(ErrorKind::NotFound);
    }
    if is("rate_limit_exceeded") {
        return Some(ErrorKind::RateLimited);
    }
    // Inside a stream there is no status: the type is all there is.
    if status.is_none() && is("server_error") {
        return Some(ErrorKind::ServerError);
    }
    None
}

/// Anthropic: `error.type`, one per documented status. A context overflow comes in two
/// messages: "prompt is too long: …" (the input alone) and "input length and `max_tokens`
/// exceed context limit: …" (the input plus the output allowance).
fn anthropic_kind(body: &ErrorBody) -> Option<ErrorKind> {
    let message = body.message_lowercase();
    Some(match body.error_type.as_deref()? {
        "invalid_request_error"
            if message.contains("prompt is too long")
                || message.contains("exceed context limit") =>
        {
            ErrorKind::ContextOverflow
        }
        "invalid_request_error" if message.contains("credit balance is too low") => {
            ErrorKind::QuotaExhausted
        }
        "invalid_request_error" => ErrorKind::BadRequest,
        "authentication_error" => ErrorKind::Auth,
        "billing_error" => ErrorKind::QuotaExhausted,
        "permission_error" => ErrorKind::PermissionDenied,
        "not_found_error" => ErrorKind::NotFound,
        "request_too_large" => ErrorKind::RequestTooLarge,
        "rate_limit_error" => ErrorKind::RateLimited,
        "api_error" => ErrorKind::ServerError,
        "timeout_error" => ErrorKind::Timeout,
        "overloaded_error" => ErrorKind::Overloaded,
        _ => return None,
    })
}

/// Gemini: `error.status` (a `google.rpc.Code` name) and the `google.rpc` details.
fn gemini_kind(body: &ErrorBody) -> Option<ErrorKind> {
    let message = body.message_lowercase();
    if body
        .reasons
        .iter()
        .any(|reason| reason == "API_KEY_INVALID")
    {
        return Some(ErrorKind::Auth);
    }
    Some(match body.status.as_deref()? {
        // A per-day quota is not worth waiting for, even when RetryInfo names a delay.
        "RESOURCE_EXHAUSTED" if body.quota.long => ErrorKind::QuotaExhausted,
        "RESOURCE_EXHAUSTED" => ErrorKind::RateLimited,
        "INVALID_ARGUMENT" if message.contains("exceeds the maximum number of tokens") => {
            ErrorKind::ContextOverflow
        }
        "INVALID_ARGUMENT" | "OUT_OF_RANGE" => ErrorKind::BadRequest,
        // "User location is not supported", "enable billing": this provider will not do it.
        "FAILED_PRECONDITION" | "PERMISSION_DENIED" => ErrorKind::PermissionDenied,
        "UNAUTHENTICATED" => ErrorKind::Auth,
        "NOT_FOUND" => ErrorKind::NotFound,
        "ABORTED" => ErrorKind::Conflict,
        "INTERNAL" | "UNKNOWN" | "DATA_LOSS" => ErrorKind::ServerError,
        "UNAVAILABLE" => ErrorKind::Overloaded,
        "DEADLINE_EXCEEDED" => ErrorKind::Timeout,
        _ => return None,
    })
}

#[cfg(test)]
mod tests;
