//! What went wrong with a provider call, as the ProviderActor acts on it: the [`ErrorKind`]
//! and the [`ErrorClass`] that says whether a retry can succeed and whether another provider or
//! model may be tried.
//!
//! Plain data. Reading a provider's answer into a class (status codes, error bodies, stream
//! events) is the provider client's job, in the node crate; this module only says what each
//! kind means for retries, fallback and the circuit breaker.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

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
    /// The provider's content rules refused the prompt (Gemini's `promptFeedback.blockReason`
    /// in a 200 answer). The caller's to change: the same prompt is refused again, and no other
    /// provider is tried behind the caller's back to get around the refusal.
    ContentFilter,
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
    /// context sizes, and a smaller-context model would fail the same way; nor for a prompt a
    /// content filter refused (see [`Self::ContentFilter`]).
    pub fn fallback(self) -> bool {
        !matches!(
            self,
            Self::BadRequest | Self::ContextOverflow | Self::ContentFilter
        )
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
            Self::ContentFilter => "content_filter",
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

    /// What went wrong, in one line for events, logs and error messages: the kind, the status
    /// and the provider's own code and message when known (`rate_limited (429
    /// rate_limit_exceeded): Rate limit reached …`).
    pub fn describe(&self) -> String {
        let mut text = self.kind.as_str().to_owned();
        match (self.status, &self.provider_code) {
            (Some(status), Some(code)) => text.push_str(&format!(" ({status} {code})")),
            (Some(status), None) => text.push_str(&format!(" ({status})")),
            (None, Some(code)) => text.push_str(&format!(" ({code})")),
            (None, None) => {}
        }
        if let Some(message) = &self.message {
            text.push_str(": ");
            text.push_str(message);
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_class_describes_itself_in_one_line() {
        let mut class = ErrorClass::of_kind(ErrorKind::RateLimited);
        assert_eq!(class.describe(), "rate_limited");
        class.status = Some(429);
        assert_eq!(class.describe(), "rate_limited (429)");
        class.provider_code = Some("rate_limit_exceeded".into());
        class.message = Some("slow down".into());
        assert_eq!(
            class.describe(),
            "rate_limited (429 rate_limit_exceeded): slow down"
        );
        let stream = ErrorClass {
            provider_code: Some("overloaded_error".into()),
            ..ErrorClass::of_kind(ErrorKind::Overloaded)
        };
        assert_eq!(stream.describe(), "overloaded (overloaded_error)");
    }

    #[test]
    fn only_provider_faults_count_against_the_breaker() {
        for kind in [
            ErrorKind::Overloaded,
            ErrorKind::ServerError,
            ErrorKind::Timeout,
            ErrorKind::Connection,
        ] {
            assert!(kind.is_provider_fault(), "{kind}");
            assert!(kind.retryable() && kind.fallback(), "{kind}");
        }
        for kind in [
            ErrorKind::RateLimited,
            ErrorKind::QuotaExhausted,
            ErrorKind::BadRequest,
            ErrorKind::ContextOverflow,
            ErrorKind::ContentFilter,
        ] {
            assert!(!kind.is_provider_fault(), "{kind}");
        }
        assert!(!ErrorKind::ContextOverflow.fallback());
        let blocked = ErrorKind::ContentFilter;
        assert!(!blocked.retryable() && !blocked.fallback(), "{blocked}");
        assert!(!ErrorKind::QuotaExhausted.retryable() && ErrorKind::QuotaExhausted.fallback());
    }
}
