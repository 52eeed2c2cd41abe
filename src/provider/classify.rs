//! Classification of provider failures: an HTTP error answer (status, headers, body), an error
//! event in the middle of a stream, or a transport failure, into one typed [`ErrorClass`] that
//! says whether a retry can succeed and whether another provider or model may be tried.
//!
//! Each provider's error shapes are read (OpenAI codes, Anthropic error types, Gemini statuses
//! and `google.rpc` details); anything unreadable (an HTML page from a proxy, an empty body)
//! falls back to the status code. It never panics on what a provider sends and does no I/O.

use std::fmt;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use troupe_actors::provider::headers::retry_after;

use super::ProviderKind;
use super::error_body::{ErrorBody, delay_in_message};

/// What kind of failure it was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// Too many requests or tokens for now (HTTP 429, Gemini per-minute quota).
    RateLimited,
    /// A quota or balance that waiting will not restore soon (OpenAI `insufficient_quota`,
    /// Gemini per-day quota, Anthropic low credit).
    QuotaExhausted,
    /// The request is larger than the provider accepts at all (OpenAI "Request too large" for
    /// the whole per-minute budget, Anthropic 413).
    RequestTooLarge,
    /// The prompt does not fit the model's context window.
    ContextOverflow,
    /// The provider is overloaded (Anthropic 529, HTTP 503, Gemini `UNAVAILABLE`).
    Overloaded,
    /// The provider failed (other 5xx).
    ServerError,
    /// No answer in time (HTTP 408, 504, or the client's timeout).
    Timeout,
    /// The connection could not be made or broke.
    Connection,
    /// The request is wrong (400, 422, other 4xx).
    BadRequest,
    /// The credentials are missing or wrong (401, Gemini `API_KEY_INVALID`).
    Auth,
    /// The credentials may not do this (403).
    PermissionDenied,
    /// The model or endpoint does not exist here (404).
    NotFound,
    /// A conflicting concurrent operation (409); transient.
    Conflict,
    /// A status that is not an error at all (below 400 or above 599).
    Unexpected,
}

impl ErrorKind {
    /// Can the same request succeed if sent again later?
    pub fn retryable(self) -> bool {
        matches!(
            self,
            Self::RateLimited
                | Self::Overloaded
                | Self::ServerError
                | Self::Timeout
                | Self::Connection
                | Self::Conflict
        )
    }

    /// May the fallback chain try another provider or model? Not for a request that is wrong
    /// everywhere (bad request), nor for a context overflow: the fallback chain does not know
    /// context sizes, and a smaller-context model would fail the same way.
    pub fn fallback(self) -> bool {
        !matches!(self, Self::BadRequest | Self::ContextOverflow)
    }

    /// Does it say the provider is unwell (what the circuit breaker counts)? Rate limits and
    /// client errors do not.
    pub fn is_provider_fault(self) -> bool {
        matches!(
            self,
            Self::Overloaded | Self::ServerError | Self::Timeout | Self::Connection
        )
    }

    /// The snake_case name, for events and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RateLimited => "rate_limited",
            Self::QuotaExhausted => "quota_exhausted",
            Self::RequestTooLarge => "request_too_large",
            Self::ContextOverflow => "context_overflow",
            Self::Overloaded => "overloaded",
            Self::ServerError => "server_error",
            Self::Timeout => "timeout",
            Self::Connection => "connection",
            Self::BadRequest => "bad_request",
            Self::Auth => "auth",
            Self::PermissionDenied => "permission_denied",
            Self::NotFound => "not_found",
            Self::Conflict => "conflict",
            Self::Unexpected => "unexpected",
        }
    }

    /// The kind an HTTP status means when the body says nothing more.
    pub fn from_status(status: u16) -> Self {
        match status {
            400 | 422 => Self::BadRequest,
            401 => Self::Auth,
            402 => Self::QuotaExhausted,
            403 => Self::PermissionDenied,
            404 => Self::NotFound,
            408 => Self::Timeout,
            409 => Self::Conflict,
            413 => Self::RequestTooLarge,
            429 => Self::RateLimited,
            503 | 529 => Self::Overloaded,
            504 => Self::Timeout,
            400..=499 => Self::BadRequest,
            500..=599 => Self::ServerError,
            _ => Self::Unexpected,
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A classified provider failure.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorClass {
    /// What happened.
    pub kind: ErrorKind,
    /// Can the same request succeed if sent again (after `retry_after`, or a backoff)?
    pub retryable: bool,
    /// May another provider or model be tried? (Only before the first byte reached the caller;
    /// that is the gateway's to know.)
    pub fallback: bool,
    /// How long the provider asks to wait: `retry-after-ms` / `retry-after` headers, else the
    /// body (Gemini `RetryInfo`, "Please try again in 210ms.").
    pub retry_after: Option<Duration>,
    /// The HTTP status, when there was an answer.
    pub status: Option<u16>,
    /// The provider's own name for the error: OpenAI `code` (else `type`), Anthropic
    /// `error.type`, Gemini `status`.
    pub provider_code: Option<String>,
    /// The provider's message, cut to 500 characters.
    pub message: Option<String>,
}

impl ErrorClass {
    /// A class with the retry and fallback rules of `kind` and nothing else known.
    pub fn of_kind(kind: ErrorKind) -> Self {
        Self {
            kind,
            retryable: kind.retryable(),
            fallback: kind.fallback(),
            retry_after: None,
            status: None,
            provider_code: None,
            message: None,
        }
    }
}

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
            .or_else(|| body.message.as_deref().and_then(delay_in_message));
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

/// Anthropic: `error.type`, one per documented status.
fn anthropic_kind(body: &ErrorBody) -> Option<ErrorKind> {
    let message = body.message_lowercase();
    Some(match body.error_type.as_deref()? {
        "invalid_request_error" if message.contains("prompt is too long") => {
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
