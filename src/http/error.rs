//! The one error shape of the API: `{"error": {"code", "message", "details"}}`, with the right
//! status, and `Retry-After` / `WWW-Authenticate` where they apply.

use std::time::Duration;

use axum::Json;
use axum::extract::rejection::{BytesRejection, JsonRejection};
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use troupe_actors::kernel::CallError;

/// An API error as clients see it.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// A stable machine-readable code.
    pub code: &'static str,
    /// What went wrong and what to do, for people.
    pub message: String,
    /// Structured details.
    pub details: Option<serde_json::Value>,
    /// When retrying makes sense.
    pub retry_after: Option<Duration>,
}

impl ApiError {
    /// Builds an error.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            details: None,
            retry_after: None,
        }
    }

    /// Adds details.
    pub fn with_details(mut self, details: serde_json::Value) -> Self {
        self.details = Some(details);
        self
    }

    /// Replaces the code (e.g. a more precise `forbidden`).
    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = code;
        self
    }

    /// Adds a `Retry-After`.
    pub fn retry_after(mut self, after: Duration) -> Self {
        self.retry_after = Some(after);
        self
    }

    /// 400 with a code.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// 401: no or unknown token.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    /// 403: the token's role is not enough.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    /// 404 with a code.
    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, code, message)
    }

    /// 405: the route exists, the method does not. axum adds the `Allow` header.
    pub fn method_not_allowed(method: &axum::http::Method, path: &str) -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!(
                "{path} does not accept {method}; the Allow header lists the methods it does \
                 (see docs/API.md)"
            ),
        )
    }

    /// 503 with a code.
    pub fn unavailable(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, code, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({
            "error": {
                "code": self.code,
                "message": self.message,
                "details": self.details.unwrap_or_else(|| serde_json::json!({})),
            }
        });
        let mut response = (self.status, Json(body)).into_response();
        let headers = response.headers_mut();
        if let Some(after) = self.retry_after {
            let seconds = after
                .as_secs()
                .saturating_add(u64::from(after.subsec_nanos() > 0));
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds.max(1)));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            headers.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"troupe\""),
            );
        }
        response
    }
}

impl From<CallError> for ApiError {
    fn from(error: CallError) -> Self {
        let retry = matches!(
            error,
            CallError::Backlogged { .. } | CallError::NoReply { .. } | CallError::Timeout { .. }
        );
        let api = ApiError::unavailable(
            "actor_unavailable",
            format!("{error}; the node is recovering or shutting down, retry shortly"),
        );
        if retry {
            api.retry_after(Duration::from_secs(1))
        } else {
            api
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        match rejection {
            JsonRejection::JsonDataError(error) => ApiError::bad_request(
                "invalid_body",
                format!(
                    "the body does not have the expected shape: {}",
                    error.body_text()
                ),
            ),
            JsonRejection::JsonSyntaxError(error) => ApiError::bad_request(
                "malformed_json",
                format!("the body is not valid JSON: {}", error.body_text()),
            ),
            JsonRejection::MissingJsonContentType(_) => ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "send the body as JSON with Content-Type: application/json",
            ),
            other if other.status() == StatusCode::PAYLOAD_TOO_LARGE => payload_too_large(),
            other => ApiError::new(other.status(), "invalid_body", other.body_text()),
        }
    }
}

impl From<BytesRejection> for ApiError {
    fn from(rejection: BytesRejection) -> Self {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            payload_too_large()
        } else {
            ApiError::new(rejection.status(), "invalid_body", rejection.body_text())
        }
    }
}

impl From<WebSocketUpgradeRejection> for ApiError {
    fn from(rejection: WebSocketUpgradeRejection) -> Self {
        ApiError::new(
            rejection.status(),
            "websocket_required",
            format!(
                "this route speaks WebSocket only: open it with a WebSocket client ({})",
                rejection.body_text()
            ),
        )
    }
}

fn payload_too_large() -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        "the body is larger than http.max_body_bytes allows; raise it in the node's configuration",
    )
}

/// `Json<T>` whose rejections use the error envelope.
#[derive(Debug, Clone, Copy, Default, axum::extract::FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct ApiJson<T>(pub T);

impl<T: serde::Serialize> IntoResponse for ApiJson<T> {
    fn into_response(self) -> Response {
        Json(self.0).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_rounds_up_to_whole_seconds_without_overflowing() {
        let header = |after: Duration| {
            ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_exceeded", "slow")
                .retry_after(after)
                .into_response()
                .headers()
                .get(header::RETRY_AFTER)
                .map(|value| value.to_str().unwrap().to_owned())
        };
        assert_eq!(header(Duration::from_millis(1500)).as_deref(), Some("2"));
        assert_eq!(header(Duration::ZERO).as_deref(), Some("1"));
        let longest = Duration::new(u64::MAX, 500_000_000);
        assert_eq!(header(longest), Some(u64::MAX.to_string()));
    }
}
