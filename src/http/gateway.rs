//! The OpenAI-compatible gateway: `POST /v1/chat/completions`, `GET /v1/models`, and
//! `GET /v1/providers`.
//!
//! A chat request's body passes through as a JSON value (unknown fields survive); only `model`
//! and `stream` are read. The model routes to a provider by configuration; the call goes
//! through that provider's actor (budget, breaker, retries, fallback) and its HTTP client. The
//! caller sees a 429 with `Retry-After` only when the gateway gave up waiting; a failure after
//! a stream began is sent as a last `data: {"error": …}` event, never as a silent end.
//!
//! The gateway accepts the node's operator (or admin) tokens and session-scoped keys; calls
//! made with a session key carry the session on their `provider.*` events.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde_json::{Value, json};
use troupe_actors::ids::SessionId;
use troupe_actors::provider::{CallError, CallMeta, ErrorClass, ErrorKind, RouteError};

use super::ApiError;
use crate::auth::Role;
use crate::node::NodeCore;
use crate::provider::client::{ChatReply, ChatRequest};
use crate::provider::keys::SessionKeys;

/// Who is calling the gateway.
#[derive(Debug, Clone)]
pub(super) enum GatewayCaller {
    /// A node token (operator or admin).
    Token,
    /// A session-scoped key.
    Session(SessionId),
}

/// A session key's caller, if the key is right and its session has not ended.
async fn session_caller(core: &NodeCore, key: String) -> Result<GatewayCaller, ApiError> {
    let session = core.session_keys.verify(&key).ok_or_else(|| {
        ApiError::unauthorized("unknown session key (keys die with their node's restart)")
    })?;
    if core.session_keys.known_running(&session) {
        return Ok(GatewayCaller::Session(session));
    }
    let view = core.sessions.get(&session).await.map_err(|_| {
        ApiError::unauthorized(format!("the session {session} of this key is not known"))
    })?;
    if view.record.state.is_terminal() {
        return Err(ApiError::unauthorized(format!(
            "the session {session} of this key has ended ({})",
            view.record.state.as_str()
        )));
    }
    Ok(GatewayCaller::Session(session))
}

/// Middleware: accepts an operator token or a live session's key; the caller goes into the
/// request's extensions.
pub(super) async fn require_gateway(
    State(core): State<Arc<NodeCore>>,
    mut request: Request,
    next: axum::middleware::Next,
) -> Response {
    let session_key = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(super::bearer_token)
        .filter(|key| SessionKeys::is_session_key(key))
        .map(str::to_owned);
    let caller = match session_key {
        Some(key) => session_caller(&core, key).await,
        None => super::authorize(&core, &request, Role::Operator).map(|_| GatewayCaller::Token),
    };
    match caller {
        Ok(caller) => {
            request.extensions_mut().insert(caller);
            next.run(request).await
        }
        Err(error) => error.into_response(),
    }
}

/// `POST /v1/chat/completions`.
pub(super) async fn chat_completions(
    State(core): State<Arc<NodeCore>>,
    axum::Extension(caller): axum::Extension<GatewayCaller>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body: Value = serde_json::from_slice(&body?).map_err(|error| {
        ApiError::bad_request(
            "invalid_json",
            format!("the body is not valid JSON: {error}"),
        )
    })?;
    if !body.is_object() {
        return Err(ApiError::bad_request(
            "invalid_request",
            "the body must be a JSON object",
        ));
    }
    let model = body
        .get("model")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::bad_request("invalid_request", "`model` (a string) is required"))?
        .to_owned();
    if !body.get("messages").is_some_and(Value::is_array) {
        return Err(ApiError::bad_request(
            "invalid_request",
            "`messages` (an array) is required",
        ));
    }
    let route = core.providers.route(&model).map_err(route_error)?;
    let request = ChatRequest::new(body);
    let meta = CallMeta {
        estimate_tokens: request.estimate_tokens(),
        session: match caller {
            GatewayCaller::Session(session) => Some(session),
            GatewayCaller::Token => None,
        },
    };
    let committed = core
        .providers
        .call(&route, &request, &meta)
        .await
        .map_err(call_error)?;
    match committed.reply {
        ChatReply::Complete(body) => Ok(Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body))
            .expect("a valid response")),
        ChatReply::Stream(chunks) => {
            // Polled by the response body: when the caller goes away the body is dropped, and
            // with it the guard, which reports the call abandoned. A caller that stops reading
            // with its socket open is given up by a watchdog (see `Reader`).
            let guard = Arc::new(std::sync::Mutex::new(committed.stream));
            let reader = Reader::new(&guard);
            let stall = Duration::from_secs(core.config.gateway.stalled_reader_secs);
            tokio::spawn(reader.clone().watch(stall));
            let state = (chunks, guard, false);
            let events = futures::stream::unfold(state, |(mut chunks, guard, done)| async move {
                if done {
                    return None;
                }
                let taken = || {
                    guard
                        .lock()
                        .unwrap_or_else(|poison| poison.into_inner())
                        .take()
                };
                let event = match chunks.next().await {
                    Some(Ok(chunk)) => {
                        return Some((sse_data(&chunk), (chunks, guard, false)));
                    }
                    Some(Err(class)) => {
                        let error = stream_error(&class);
                        if let Some(guard) = taken() {
                            guard.fail_with_usage(class, chunks.tokens());
                        }
                        sse_data(error.to_string().as_bytes())
                    }
                    None => {
                        if let Some(guard) = taken() {
                            guard.succeed(chunks.tokens());
                        }
                        Bytes::from_static(b"data: [DONE]\n\n")
                    }
                };
                Some((event, (chunks, guard, true)))
            });
            // Events that are ready together (one read from the provider often holds several)
            // go out in one write.
            let events = events.ready_chunks(64).map(|batch| {
                if let [single] = batch.as_slice() {
                    return Ok::<_, Infallible>(single.clone());
                }
                let mut joined = Vec::with_capacity(batch.iter().map(Bytes::len).sum());
                for event in &batch {
                    joined.extend_from_slice(event);
                }
                Ok(Bytes::from(joined))
            });
            Ok(Response::builder()
                .status(StatusCode::OK)
                .header(header::CONTENT_TYPE, "text/event-stream")
                .header(header::CACHE_CONTROL, "no-cache")
                .header("x-accel-buffering", "no")
                .body(Body::from_stream(reader.observe(events)))
                .expect("a valid response"))
        }
    }
}

/// What the watchdog of a streamed answer knows of its caller: whether the response body handed
/// out a piece and was not polled since, and when it handed it out. Such a body is waiting for
/// its caller to take the piece (the connection writes nothing more while the socket is full);
/// one that was polled again and is waiting for the provider is not. Timers inside the body
/// (the provider's between-chunks timeout) wake it, so a caller that reads is polled again
/// within that time whatever the provider does.
#[derive(Clone)]
struct Reader {
    /// The call's guard, held by the body: when the body is dropped (the caller went away), the
    /// guard goes with it at once.
    guard: std::sync::Weak<std::sync::Mutex<Option<troupe_actors::provider::CallGuard>>>,
    seen: Arc<ReaderSeen>,
}

/// The body's side of [`Reader`]: set by each poll, read by the watchdog. A flag, not a
/// comparison of timestamps: a poll right after a piece went out, within the same clock tick,
/// must still count as the caller having taken it.
struct ReaderSeen {
    since: tokio::time::Instant,
    /// A piece was handed out and the body has not been polled since.
    awaiting: std::sync::atomic::AtomicBool,
    /// Microseconds since `since` when that piece was handed out.
    handed: std::sync::atomic::AtomicU64,
}

impl ReaderSeen {
    fn new() -> Self {
        Self {
            since: tokio::time::Instant::now(),
            awaiting: false.into(),
            handed: 0.into(),
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.since.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    /// `body`, noting its polls and the pieces it hands out.
    fn observe<S>(
        self: &Arc<Self>,
        body: S,
    ) -> impl futures::Stream<Item = S::Item> + Send + 'static
    where
        S: futures::Stream + Send + 'static,
    {
        use std::sync::atomic::Ordering::{Relaxed, Release};
        let seen = Arc::clone(self);
        let mut body = Box::pin(body);
        futures::stream::poll_fn(move |cx| {
            // Polled again: whatever was handed out before was taken.
            seen.awaiting.store(false, Release);
            let polled = body.as_mut().poll_next(cx);
            if let std::task::Poll::Ready(Some(_)) = &polled {
                seen.handed.store(seen.now(), Relaxed);
                seen.awaiting.store(true, Release);
            }
            polled
        })
    }

    /// True when a piece has waited for the caller for `stall` or more.
    fn stalled(&self, stall: Duration) -> bool {
        use std::sync::atomic::Ordering::{Acquire, Relaxed};
        let stall_us = u64::try_from(stall.as_micros()).unwrap_or(u64::MAX);
        // The flag first: a hand-out seen set had its time stored before it.
        self.awaiting.load(Acquire)
            && self.now().saturating_sub(self.handed.load(Relaxed)) >= stall_us
    }
}

impl Reader {
    fn new(guard: &Arc<std::sync::Mutex<Option<troupe_actors::provider::CallGuard>>>) -> Self {
        Self {
            guard: Arc::downgrade(guard),
            seen: Arc::new(ReaderSeen::new()),
        }
    }

    /// `body`, noting its polls and the pieces it hands out.
    fn observe<S>(&self, body: S) -> impl futures::Stream<Item = S::Item> + Send + 'static
    where
        S: futures::Stream + Send + 'static,
    {
        self.seen.observe(body)
    }

    /// Gives the call up (its guard reports it abandoned: the provider's slot and budget come
    /// back) once the caller has taken nothing for `stall` while a piece waited for it. Ends
    /// when the call ends (its guard was taken) or the body is dropped.
    async fn watch(self, stall: Duration) {
        loop {
            tokio::time::sleep(stall / 4).await;
            // Gone: the body was dropped (and the guard with it).
            let Some(guard) = self.guard.upgrade() else {
                return;
            };
            let mut guard = guard.lock().unwrap_or_else(|poison| poison.into_inner());
            let Some(call) = guard.as_ref() else {
                // The call ended.
                return;
            };
            if self.seen.stalled(stall) {
                tracing::info!(
                    target_provider = %call.target(),
                    stalled_secs = stall.as_secs(),
                    "a streaming caller took nothing of its answer for gateway.stalled_reader_secs; \
                     its call is given up (the provider's slot and budget come back)"
                );
                drop(guard.take());
                return;
            }
        }
    }
}

/// One SSE event carrying `json`: a `data: ` line for each of its lines (`\n`, `\r\n` or `\r`
/// end one, as in SSE), so that a chunk spread over several lines reaches the caller whole.
fn sse_data(json: &[u8]) -> Bytes {
    let mut event = Vec::with_capacity(json.len() + 8);
    let mut rest = json;
    loop {
        let end = rest
            .iter()
            .position(|&byte| byte == b'\n' || byte == b'\r')
            .unwrap_or(rest.len());
        event.extend_from_slice(b"data: ");
        event.extend_from_slice(&rest[..end]);
        event.push(b'\n');
        let ending = match rest[end..] {
            [] => break,
            [b'\r', b'\n', ..] => 2,
            _ => 1,
        };
        rest = &rest[end + ending..];
    }
    event.push(b'\n');
    Bytes::from(event)
}

/// The OpenAI-style error object sent as the last event of a broken stream (or of one whose
/// provider blocked the prompt after it began).
fn stream_error(class: &ErrorClass) -> Value {
    let what = match class.kind {
        ErrorKind::ContentFilter => "the provider stopped the stream",
        _ => "the provider's stream broke off",
    };
    json!({"error": {
        "message": format!("{what}: {}", class.describe()),
        "type": "provider_error",
        "code": class.kind.as_str(),
    }})
}

fn route_error(error: RouteError) -> ApiError {
    match error {
        RouteError::BadName => ApiError::bad_request("invalid_request", error.to_string()),
        RouteError::UnknownModel { .. } | RouteError::NotServed { .. } => {
            ApiError::not_found("model_not_found", error.to_string())
        }
    }
}

/// What the caller sees when the gateway gave up.
fn call_error(error: CallError) -> ApiError {
    let message = error.to_string();
    let target = json!({"provider": error.target().provider, "model": error.target().model});
    match error {
        CallError::Throttled { retry_after, .. } => ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_exceeded",
            message,
        )
        .retry_after(retry_after),
        CallError::BreakerOpen { retry_in, .. } => {
            ApiError::unavailable("provider_unavailable", message).retry_after(retry_in)
        }
        CallError::TooLarge { .. } => {
            ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "request_too_large", message)
        }
        CallError::Unavailable { .. } => ApiError::unavailable("provider_unavailable", message)
            .retry_after(Duration::from_secs(1)),
        CallError::Failed { class, .. } => {
            let (status, code) = match class.kind {
                ErrorKind::ContextOverflow => (StatusCode::BAD_REQUEST, "context_length_exceeded"),
                ErrorKind::RateLimited => (StatusCode::TOO_MANY_REQUESTS, "rate_limit_exceeded"),
                ErrorKind::QuotaExhausted => (StatusCode::TOO_MANY_REQUESTS, "insufficient_quota"),
                ErrorKind::RequestTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "request_too_large"),
                ErrorKind::BadRequest => (StatusCode::BAD_REQUEST, "invalid_request"),
                ErrorKind::ContentFilter => (StatusCode::BAD_REQUEST, "content_filter"),
                ErrorKind::NotFound => (StatusCode::NOT_FOUND, "model_not_found"),
                ErrorKind::Auth | ErrorKind::PermissionDenied => {
                    (StatusCode::BAD_GATEWAY, "provider_auth_failed")
                }
                ErrorKind::Timeout => (StatusCode::GATEWAY_TIMEOUT, "provider_timeout"),
                ErrorKind::Overloaded
                | ErrorKind::ServerError
                | ErrorKind::Connection
                | ErrorKind::Conflict
                | ErrorKind::Unexpected => (StatusCode::BAD_GATEWAY, "provider_error"),
            };
            let mut error = ApiError::new(status, code, message).with_details(json!({
                "target": target,
                "kind": class.kind.as_str(),
                "provider_status": class.status,
                "provider_code": class.provider_code,
            }));
            if class.kind == ErrorKind::RateLimited {
                error = error.retry_after(class.retry_after.unwrap_or(Duration::from_secs(1)));
            }
            error
        }
    }
}

/// `GET /v1/models`: every name that routes, OpenAI's list shape.
pub(super) async fn models(State(core): State<Arc<NodeCore>>) -> Json<Value> {
    let data: Vec<Value> = core
        .providers
        .models()
        .into_iter()
        .map(|entry| {
            json!({"id": entry.id, "object": "model", "created": 0, "owned_by": entry.provider})
        })
        .collect();
    Json(json!({"object": "list", "data": data}))
}

/// `GET /v1/providers`: state, budget, breaker, counters and recent errors of each provider.
pub(super) async fn providers(State(core): State<Arc<NodeCore>>) -> Json<Value> {
    let providers: Vec<_> = core.providers.providers().map(|p| p.status()).collect();
    Json(json!({"providers": providers}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_of_several_lines_gets_a_data_prefix_on_each() {
        assert_eq!(sse_data(b"{\"a\":1}"), "data: {\"a\":1}\n\n");
        assert_eq!(
            sse_data(b"{\"id\":\"a\",\n\"object\":\r\n\"chunk\"\r}"),
            "data: {\"id\":\"a\",\ndata: \"object\":\ndata: \"chunk\"\ndata: }\n\n"
        );
        assert_eq!(sse_data(b""), "data: \n\n");
    }

    #[tokio::test(start_paused = true)]
    async fn a_caller_that_takes_each_piece_and_polls_again_at_once_is_not_stalled() {
        let stall = Duration::from_secs(60);
        let seen = Arc::new(ReaderSeen::new());
        let (pieces, rx) = futures::channel::mpsc::unbounded::<u32>();
        let mut body = Box::pin(seen.observe(rx));
        pieces.unbounded_send(1).unwrap();
        assert_eq!(body.next().await, Some(1));
        // Polled again in the same instant, and waiting for the provider.
        assert!(futures::poll!(body.next()).is_pending());
        tokio::time::advance(2 * stall).await;
        assert!(!seen.stalled(stall), "the caller took the piece");
        // A piece nobody takes for the stall is stalled.
        pieces.unbounded_send(2).unwrap();
        assert_eq!(body.next().await, Some(2));
        tokio::time::advance(stall - Duration::from_secs(1)).await;
        assert!(!seen.stalled(stall), "not yet");
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(seen.stalled(stall));
        // Taken at last.
        assert!(futures::poll!(body.next()).is_pending());
        assert!(!seen.stalled(stall));
    }
}
