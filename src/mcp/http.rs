//! MCP over HTTP: Streamable HTTP at `/mcp` (rmcp's transport) and WebSocket at `/mcp/ws`.
//!
//! Both doors first check `Host` and `Origin` against `http.allowed_hosts` (DNS rebinding; a
//! page on another origin), then the bearer token like every `/v1` route (any role; each tool
//! checks the role it needs, and the per-token rate limit applies). rmcp's own Host check is
//! switched off because this one covers both doors with one list.
//!
//! `/mcp/ws` is not a standard MCP transport: subprotocol `mcp`, one JSON-RPC message per
//! text frame, the same messages and lifecycle as stdio. A message that is not JSON is answered
//! with a JSON-RPC parse error (`-32700`, id `null`), JSON that is not a valid JSON-RPC message
//! with `-32600` (with the request's id when it has one), a known method whose params do not fit
//! with `-32602`, and the link stays; a frame over `http.max_body_bytes` closes it. The same
//! checks answer a bad `POST /mcp` body (HTTP 400). Each JSON-RPC request on a WebSocket is
//! charged to its token's rate limit, like each HTTP request. Outbound messages go through a
//! bounded queue whose senders wait (responses are never dropped); a client that accepts
//! nothing for 10 s is disconnected. A Streamable HTTP client that stops reading a streamed
//! answer loses its connection after `http.send_timeout_secs` (`crate::http::deadline`).

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::{Request, State};
use axum::http::HeaderMap;
use axum::http::request::Parts;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures::{SinkExt, StreamExt};
use rmcp::ServiceExt;
use rmcp::model::{
    ClientJsonRpcMessage, ClientNotification, ClientRequest, GetExtensions, RequestId,
    ServerJsonRpcMessage,
};
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use tokio::sync::mpsc;
use tokio_util::sync::{CancellationToken, PollSender};
use troupe_actors::event::TransportKind;

use super::TroupeMcp;
use super::idle::{IdleSessions, MAX_SESSIONS_PER_TOKEN};
use crate::auth::{Principal, Role};
use crate::http::ApiError;
use crate::http::ws::{
    CLOSE_GOING_AWAY, CLOSE_POLICY, Heard, Incoming, Outgoing, SendProgress, check_host_and_origin,
    send_within, split,
};
use crate::node::NodeCore;

/// Outbound MCP messages queued per WebSocket before senders wait.
const OUTBOUND_QUEUE: usize = 64;
/// How long the client may accept nothing (no frame, and on HTTP/1 no byte) while a frame
/// waits for it: a frame of a large answer read slowly is not cut, one nobody reads is.
const SEND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The `/mcp` and `/mcp/ws` routes. `stop` ends open MCP streams at shutdown.
pub fn routes(core: Arc<NodeCore>, stop: CancellationToken) -> Router<Arc<NodeCore>> {
    routes_with(core, stop, MAX_SESSIONS_PER_TOKEN)
}

/// [`routes`], a token holding at most `max_sessions_per_token` legacy sessions.
fn routes_with(
    core: Arc<NodeCore>,
    stop: CancellationToken,
    max_sessions_per_token: usize,
) -> Router<Arc<NodeCore>> {
    let factory_core = core.clone();
    // Legacy sessions end when idle by troupe's rule (`idle`), not by rmcp's message timer.
    let mut sessions = LocalSessionManager::default();
    sessions.session_config.keep_alive = None;
    let sessions = Arc::new(sessions);
    let idle = IdleSessions::start(
        sessions.clone(),
        Duration::from_secs(core.config.http.mcp_session_idle_secs),
        max_sessions_per_token,
        stop.clone(),
    );
    let guarded = idle.clone();
    let service = StreamableHttpService::new(
        move || {
            Ok(
                TroupeMcp::new(factory_core.clone(), TransportKind::McpHttp, None)
                    .with_idle_sessions(idle.clone()),
            )
        },
        sessions,
        StreamableHttpServerConfig::default()
            .disable_allowed_hosts()
            .disable_allowed_origins()
            .with_max_request_body_bytes(core.config.http.max_body_bytes)
            .with_cancellation_token(stop),
    );
    Router::new()
        .route("/mcp/ws", get(websocket))
        .route_service("/mcp", service)
        .route_layer(middleware::from_fn_with_state((core, guarded), guard))
}

/// Host/Origin, then the bearer token (any role) and the rate limit, then (a JSON `POST`) the
/// body's shape as a JSON-RPC message, and for an `initialize` (a legacy session's start) the
/// token's bound on sessions.
async fn guard(
    State((core, sessions)): State<(Arc<NodeCore>, Arc<IdleSessions>)>,
    mut request: Request,
    next: Next,
) -> Response {
    let allowed = &core.config.http.allowed_hosts;
    if let Err(error) = check_host_and_origin(request.headers(), request.uri(), allowed) {
        return error.into_response();
    }
    let principal = match crate::http::authorize(&core, &request, Role::Viewer) {
        Ok(principal) => principal,
        Err(error) => return error.into_response(),
    };
    request.extensions_mut().insert(principal.clone());
    let is_json_post = request.method() == axum::http::Method::POST
        && request
            .headers()
            .get(axum::http::header::CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .is_some_and(is_json_media_type);
    if !is_json_post {
        // A legacy session ended by its client no longer counts against its token.
        let ended = (request.method() == axum::http::Method::DELETE)
            .then(|| request.headers().get("mcp-session-id").cloned())
            .flatten();
        let response = next.run(request).await;
        if let Some(id) = ended
            && response.status().is_success()
            && let Ok(id) = id.to_str()
        {
            sessions.forget(id);
        }
        return response;
    }
    let (parts, body) = request.into_parts();
    let limit = core.config.http.max_body_bytes;
    let bytes = match read_body(body, limit).await {
        Ok(bytes) => bytes,
        Err(error) => return error.into_response(),
    };
    let checked = match std::str::from_utf8(&bytes) {
        Ok(text) => check_message(text),
        Err(error) => Err(parse_error(&format!("the body is not UTF-8: {error}"))),
    };
    let message = match checked {
        Ok(message) => message,
        Err(reply) => {
            return (
                axum::http::StatusCode::BAD_REQUEST,
                [(axum::http::header::CONTENT_TYPE, "application/json")],
                reply,
            )
                .into_response();
        }
    };
    // A request without a session that lists or calls tools (2026-07-28: each request is a
    // client) opens a link of its own (`TroupeMcp::ensure_link`). When its token holds its most
    // links already it is answered as REST answers it, 429 `too_many_links`, not with a
    // JSON-RPC error in a 200. (A request that loses a race for the last place, and a legacy
    // session's first such request, get that JSON-RPC error: `TOO_MANY_LINKS`.)
    let opens_link = !parts.headers.contains_key("mcp-session-id")
        && matches!(
            &message,
            ClientJsonRpcMessage::Request(request) if matches!(
                request.request,
                ClientRequest::ListToolsRequest(_) | ClientRequest::CallToolRequest(_)
            )
        );
    let max_links = core.config.auth.max_links_per_token;
    if opens_link && core.token_links.held(&principal.name) >= max_links {
        return crate::http::link_error(crate::link::LinkError::TooManyForToken {
            token: principal.name.clone(),
            max: max_links,
        })
        .into_response();
    }
    // A legacy session's start: its request id.
    let session_start = match &message {
        ClientJsonRpcMessage::Request(request)
            if matches!(request.request, ClientRequest::InitializeRequest(_))
                && !parts.headers.contains_key("mcp-session-id") =>
        {
            Some(serde_json::to_value(&request.id).unwrap_or_default())
        }
        _ => None,
    };
    let request = Request::from_parts(parts, axum::body::Body::from(bytes));
    let Some(id) = session_start else {
        return next.run(request).await;
    };
    // The session's place is taken before the `initialize` runs (concurrent ones cannot all
    // pass a check made before any session is recorded) and given back unless the answer
    // carries a session.
    let Some(place) = sessions.reserve(&principal.name) else {
        let max = sessions.max_per_token();
        let reply = error_reply(
            id,
            TOO_MANY_SESSIONS,
            &format!(
                "token {:?} holds {max} MCP sessions already (or is opening them), its most; end \
                 some (HTTP DELETE /mcp with their Mcp-Session-Id) or let them expire, then retry",
                principal.name
            ),
            Some(serde_json::json!({"code": "too_many_sessions", "max": max})),
        );
        return (
            axum::http::StatusCode::TOO_MANY_REQUESTS,
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            reply,
        )
            .into_response();
    };
    // Run to its end even when the client goes away meanwhile: rmcp may have created the
    // session by then, and only the answer says which, so that it is counted.
    let running = tokio::spawn(tracing::Instrument::instrument(
        next.run(request),
        tracing::Span::current(),
    ));
    let response = match running.await {
        Ok(response) => response,
        Err(error) => {
            return ApiError::new(
                axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                format!("the initialize request failed: {error}"),
            )
            .into_response();
        }
    };
    match response
        .headers()
        .get("mcp-session-id")
        .and_then(|id| id.to_str().ok())
    {
        Some(session) => place.opened(session),
        None => drop(place),
    }
    response
}

/// Why a request body could not be read whole.
#[derive(Debug, thiserror::Error)]
enum BodyError {
    /// It is longer than `http.max_body_bytes`.
    #[error("the body is over http.max_body_bytes ({0} bytes)")]
    TooLarge(usize),
    /// Reading it failed: malformed chunked encoding, a connection reset mid-body.
    #[error(
        "the body could not be read ({0}); send the whole JSON-RPC message as the body, with a \
         Content-Length or well-formed chunked encoding"
    )]
    Unreadable(String),
}

impl IntoResponse for BodyError {
    fn into_response(self) -> Response {
        let error = match &self {
            Self::TooLarge(_) => ApiError::new(
                axum::http::StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                self.to_string(),
            ),
            Self::Unreadable(_) => ApiError::bad_request("invalid_body", self.to_string()),
        };
        error.into_response()
    }
}

/// Reads `body` whole, at most `limit` bytes. Only a body over the limit is
/// [`BodyError::TooLarge`] (413); any other failure to read it is [`BodyError::Unreadable`]
/// (400): the client sent a broken body or went away, it did not send too much.
async fn read_body(body: axum::body::Body, limit: usize) -> Result<axum::body::Bytes, BodyError> {
    let mut chunks = body.into_data_stream();
    let mut bytes = Vec::new();
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.map_err(|error| BodyError::Unreadable(error.to_string()))?;
        if bytes.len() + chunk.len() > limit {
            return Err(BodyError::TooLarge(limit));
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(bytes.into())
}

/// JSON-RPC error code of an `initialize` refused because its token holds
/// [`MAX_SESSIONS_PER_TOKEN`] legacy sessions already (a server error code).
pub const TOO_MANY_SESSIONS: i32 = -32027;

/// JSON-RPC error code of an answer larger than the client's link takes (`troupe mcp`'s bridge
/// takes at most `stdio::MAX_FROM_NODE` from its node): sent in its place, `data`
/// `{"code": "answer_too_large", "bytes": N, "max_bytes": M}`.
pub const ANSWER_TOO_LARGE: i32 = -32025;

/// The message sent in place of one of `bytes` bytes, over the `max` the client's link takes:
/// an error for the request `id` it answered (`null` for a message that answered none).
fn too_large_reply(id: Option<&RequestId>, bytes: usize, max: usize) -> String {
    tracing::warn!(
        bytes,
        max,
        "an MCP answer is larger than its client's link takes; sending an error instead"
    );
    error_reply(
        id.map(|id| serde_json::to_value(id).unwrap_or_default())
            .unwrap_or_default(),
        ANSWER_TOO_LARGE,
        &format!(
            "the answer is {bytes} bytes, more than the {max} this link takes (troupe mcp's \
             bridge); ask for less (a smaller limit, a narrower filter), or use the HTTP API"
        ),
        Some(serde_json::json!({"code": "answer_too_large", "bytes": bytes, "max_bytes": max})),
    )
}

/// JSON-RPC error code of a request whose client's link could not be opened because its token
/// (`auth.max_links_per_token`) or the node holds its most links (a server error code; `data`
/// `{"code": "too_many_links", "max": N}`).
pub const TOO_MANY_LINKS: i32 = -32026;

/// Methods a client may call in 2026-07-28 (and before). rmcp reads a known method whose params
/// do not parse as a "custom" request and answers it as an unknown method; [`check_message`]
/// answers `-32602` (invalid params) instead. Methods that 2026-07-28 removed (`initialize`,
/// `ping`, `logging/setLevel`, `resources/subscribe`, `resources/unsubscribe`) are left to rmcp,
/// which answers them `-32601` (HTTP 404) there, as that revision requires.
const CLIENT_METHODS: &[&str] = &[
    "server/discover",
    "completion/complete",
    "prompts/list",
    "prompts/get",
    "resources/list",
    "resources/templates/list",
    "resources/read",
    "resources/directory/read",
    "subscriptions/listen",
    "tools/list",
    "tools/call",
    "tasks/get",
    "tasks/update",
    "tasks/cancel",
    "skills/list",
    "skills/get",
];

/// A JSON-RPC error answer.
pub(crate) fn error_reply(
    id: serde_json::Value,
    code: i32,
    message: &str,
    data: Option<serde_json::Value>,
) -> String {
    let mut error = serde_json::json!({"code": code, "message": message});
    if let Some(data) = data {
        error["data"] = data;
    }
    serde_json::json!({"jsonrpc": "2.0", "id": id, "error": error}).to_string()
}

/// Parses one incoming message, or returns the JSON-RPC error that answers it: `-32700` (id
/// `null`) when it is not JSON; `-32600` when it is JSON but not a JSON-RPC 2.0 message (a
/// batch, a missing or wrong `jsonrpc`, a non-string method…), with the request's id when it
/// has a string or number one; `-32602` with the id when a known method's params do not fit.
pub(crate) fn check_message(text: &str) -> Result<ClientJsonRpcMessage, String> {
    match serde_json::from_str::<ClientJsonRpcMessage>(text) {
        Ok(message) => {
            if let ClientJsonRpcMessage::Request(request) = &message
                && let ClientRequest::CustomRequest(custom) = &request.request
                && CLIENT_METHODS.contains(&custom.method.as_str())
            {
                let id = serde_json::to_value(&request.id).unwrap_or_default();
                return Err(error_reply(
                    id,
                    -32602,
                    &format!(
                        "the params of {} do not match the method's schema",
                        custom.method
                    ),
                    None,
                ));
            }
            Ok(message)
        }
        Err(error) => {
            let value: serde_json::Value = match serde_json::from_str(text) {
                Ok(value) => value,
                Err(_) => return Err(parse_error(&format!("not JSON: {error}"))),
            };
            let id = value
                .get("id")
                .filter(|id| id.is_string() || id.is_number())
                .cloned()
                .unwrap_or_default();
            let message = if value.is_array() {
                "JSON-RPC batches are not accepted: send one message at a time".to_owned()
            } else {
                format!(
                    "not a valid JSON-RPC 2.0 message ({error}); send {{\"jsonrpc\": \"2.0\", \
                     \"id\": …, \"method\": …, \"params\": {{…}}}}"
                )
            };
            Err(error_reply(id, -32600, &message, None))
        }
    }
}

/// The answer to a request over the token's rate limit: a JSON-RPC error whose `data` says how
/// long to wait (`retry_after_ms`).
fn rate_limited_reply(
    id: serde_json::Value,
    principal: &Principal,
    wait: std::time::Duration,
) -> String {
    let wait_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1);
    error_reply(
        id,
        RATE_LIMITED,
        &format!(
            "token {:?} exceeded auth.requests_per_second; retry after {wait_ms} ms",
            principal.name
        ),
        Some(serde_json::json!({"code": "rate_limited", "retry_after_ms": wait_ms})),
    )
}

/// JSON-RPC error code of a request refused by the rate limit (a server error code; MCP defines
/// none for this).
pub const RATE_LIMITED: i32 = -32029;

/// JSON-RPC error code of a request refused because [`MAX_IN_FLIGHT`] of the client's requests
/// wait for their answers already (a server error code).
pub const TOO_MANY_IN_FLIGHT: i32 = -32028;

/// The answer to a request past [`MAX_IN_FLIGHT`] (it is not handled): read the answers owed,
/// then ask again.
fn too_many_in_flight_reply(id: serde_json::Value) -> String {
    error_reply(
        id,
        TOO_MANY_IN_FLIGHT,
        &format!(
            "{MAX_IN_FLIGHT} requests of this link wait for their answers already; read them (or \
             cancel some), then send this again"
        ),
        Some(serde_json::json!({"code": "too_many_in_flight", "max": MAX_IN_FLIGHT})),
    )
}

/// The answer to a request whose id is that of one still waiting for its answer (it is not
/// handled).
fn duplicate_id_reply(id: serde_json::Value) -> String {
    error_reply(
        id.clone(),
        -32600,
        &format!(
            "request id {id} is already waiting for its answer on this link; give each request \
             an id of its own"
        ),
        Some(serde_json::json!({"code": "duplicate_request_id"})),
    )
}

async fn websocket(
    State(core): State<Arc<NodeCore>>,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
    request: Request,
) -> Result<Response, ApiError> {
    let ws = ws?;
    let offers_mcp = headers
        .get_all(axum::http::header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|protocol| protocol.trim() == "mcp");
    if !offers_mcp {
        return Err(ApiError::bad_request(
            "subprotocol_required",
            "open /mcp/ws with the WebSocket subprotocol `mcp` (Sec-WebSocket-Protocol: mcp)",
        ));
    }
    let (parts, _) = request.into_parts();
    let via_stdio = parts
        .uri
        .query()
        .is_some_and(|query| query.split('&').any(|pair| pair == "client=stdio"));
    let transport = if via_stdio {
        TransportKind::McpStdio
    } else {
        TransportKind::McpWebSocket
    };
    let server = TroupeMcp::new(core.clone(), transport, None);
    let peer = parts
        .extensions
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|info| info.0);
    let principal = parts.extensions.get::<crate::auth::Principal>().cloned();
    // The link is opened before the upgrade, as `/v1/events/ws` opens its own: a token that
    // holds its most links is answered 429 `too_many_links`, not a 101 and then a close 1001,
    // which `troupe mcp` reads as its node going away (and connects again, and again).
    server
        .attach_link(peer, principal.as_ref())
        .await
        .map_err(crate::http::link_error)?;
    let limit = core.config.http.max_body_bytes;
    Ok(ws
        .protocols(["mcp"])
        .max_message_size(limit)
        .max_frame_size(limit)
        .on_upgrade(move |socket| async move {
            let heard = Heard::new();
            let (sink, stream) = split(socket, Some(heard.clone()));
            serve_websocket(server, parts, peer, principal, heard, sink, stream).await;
        }))
}

/// A JSON-RPC parse error with id `null`.
pub(crate) fn parse_error(message: &str) -> String {
    serde_json::json!({
        "jsonrpc": "2.0",
        "id": null,
        "error": {"code": -32700, "message": message},
    })
    .to_string()
}

/// Serves one MCP client over a WebSocket until it or the node ends the link. `server` holds
/// the client's link already.
async fn serve_websocket<Si, St>(
    server: TroupeMcp,
    parts: Parts,
    peer: Option<std::net::SocketAddr>,
    principal: Option<crate::auth::Principal>,
    heard: Arc<Heard>,
    sink: Si,
    stream: St,
) where
    Si: futures::Sink<Outgoing> + Unpin + Send + 'static,
    Si::Error: std::fmt::Display,
    St: futures::Stream<Item = Incoming> + Unpin + Send + 'static,
{
    let liveness = Liveness {
        heard,
        every: Duration::from_secs(server.core.config.events.heartbeat_secs),
    };
    let progress = SendProgress::of_request(&parts.extensions);
    // `troupe mcp`'s bridge drops a link whose message is over what it takes, and connects
    // again: it is told instead that this answer is too large.
    let max_message =
        (server.transport == TransportKind::McpStdio).then_some(super::stdio::MAX_FROM_NODE);
    let client = FramesClient {
        parts: Some(parts),
        peer,
        principal,
        liveness: Some(liveness),
        progress,
        max_message,
    };
    serve_frames(server, client, sink, stream).await;
}

/// How a socket client shows it is still there: it answers the pings sent `every` so often
/// (WebSocket clients answer pings by themselves) or sends anything else. One silent for
/// [`SILENT_PINGS`] pings, or that has not initialized within [`INIT_TIMEOUT`], is
/// disconnected, so a client that vanished without closing its connection does not hold a link.
pub(crate) struct Liveness {
    heard: Arc<Heard>,
    every: Duration,
}

/// Pings a socket client may leave unanswered before it is disconnected.
const SILENT_PINGS: u32 = 3;
/// How long a socket client has to initialize.
const INIT_TIMEOUT: Duration = Duration::from_secs(60);

impl Liveness {
    /// Pings the client through `out` until `done`; cancels `silent` (and stops) once the client
    /// has been silent for [`SILENT_PINGS`] pings.
    fn watch(
        self,
        out: mpsc::Sender<Outgoing>,
        done: CancellationToken,
        silent: CancellationToken,
    ) {
        tokio::spawn(async move {
            let mut ping =
                tokio::time::interval_at(tokio::time::Instant::now() + self.every, self.every);
            loop {
                tokio::select! {
                    () = done.cancelled() => return,
                    _ = ping.tick() => {}
                }
                if self.heard.silent_for() >= self.every * SILENT_PINGS {
                    silent.cancel();
                    return;
                }
                // A full queue already waits on the client; its send timeout deals with that.
                let _ = out.try_send(Outgoing::Ping);
            }
        });
    }
}

/// Why a frame-served client ended, when it ended badly.
pub(crate) type FramesFailure = Arc<OnceLock<String>>;

/// Serves one MCP client whose messages come one per frame (a WebSocket, or stdin lines): a
/// bounded outbound queue whose senders wait, bad messages answered, each request of a token
/// charged to its rate limit (clients that came with an HTTP request; the local stdio user has
/// none), the link opened up front. Returns why the client's stream failed (an oversize frame,
/// a socket error), if it did.
pub(crate) async fn serve_frames<Si, St>(
    server: TroupeMcp,
    client: FramesClient,
    sink: Si,
    stream: St,
) -> Option<String>
where
    Si: futures::Sink<Outgoing> + Unpin + Send + 'static,
    Si::Error: std::fmt::Display,
    St: futures::Stream<Item = Incoming> + Unpin + Send + 'static,
{
    let failure = FramesFailure::default();
    serve_frames_until(server, client, sink, stream, failure.clone()).await;
    failure.get().cloned()
}

/// Requests of one frame-served client that may wait for their answers at once; past it a
/// request is answered at once with [`TOO_MANY_IN_FLIGHT`] (and the client's cancellations
/// still get through). rmcp answers each request from a task of its own, which holds the answer
/// until the client's socket takes it: without a bound, a client that sends and does not read
/// made the node hold any number of answers.
const MAX_IN_FLIGHT: usize = 64;

/// The requests of one frame-served client still waiting for their answers, at most
/// [`MAX_IN_FLIGHT`], each until its answer (or its cancellation) passes.
#[derive(Clone, Default)]
struct InFlight {
    held: Arc<std::sync::Mutex<std::collections::HashSet<RequestId>>>,
}

impl InFlight {
    fn new() -> Self {
        Self::default()
    }

    fn held(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<RequestId>> {
        self.held
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// Counts request `id` as waiting, unless [`MAX_IN_FLIGHT`] already are or one with the
    /// same id is (JSON-RPC ids must be unique among a client's pending requests; a duplicate
    /// would not count, and its answer would be lost).
    fn admit(&self, id: RequestId) -> Admission {
        let mut held = self.held();
        if held.contains(&id) {
            Admission::Duplicate
        } else if held.len() >= MAX_IN_FLIGHT {
            Admission::Full
        } else {
            held.insert(id);
            Admission::Admitted
        }
    }

    /// Request `id` was answered (or cancelled).
    fn settle(&self, id: &RequestId) {
        self.held().remove(id);
    }
}

/// Whether a `Content-Type` value is `application/json` (parameters aside, in any case, as
/// media types are matched and as rmcp matches it).
fn is_json_media_type(value: &str) -> bool {
    value
        .split(';')
        .next()
        .is_some_and(|essence| essence.trim().eq_ignore_ascii_case("application/json"))
}

/// Why a frame-served client's link ended before it initialized.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
enum StartFailure {
    /// It sent no `initialize` in time.
    #[error("no initialize within {0:?}")]
    NoInitialize(Duration),
    /// It answered no ping.
    #[error("the client answered no ping")]
    Silent,
    /// Its first messages broke the protocol.
    #[error("{0}")]
    Refused(String),
}

impl StartFailure {
    /// The close frame: "going away" (1001) for a client that took too long or went quiet, so
    /// that a bridge connects again; a policy violation (1008) only for a broken protocol.
    fn close(&self) -> (u16, String) {
        match self {
            Self::NoInitialize(_) | Self::Silent => (CLOSE_GOING_AWAY, self.to_string()),
            Self::Refused(_) => (CLOSE_POLICY, "initialization failed".into()),
        }
    }
}

/// What [`InFlight::admit`] made of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Admission {
    Admitted,
    /// [`MAX_IN_FLIGHT`] wait already.
    Full,
    /// A request with the same id waits already.
    Duplicate,
}

/// Who a frame-served client is.
#[derive(Default)]
pub(crate) struct FramesClient {
    /// The HTTP request that opened the link (none for stdin).
    pub(crate) parts: Option<Parts>,
    /// Its address.
    pub(crate) peer: Option<std::net::SocketAddr>,
    /// Its token's principal (none: the server's local one).
    pub(crate) principal: Option<crate::auth::Principal>,
    /// How it shows it is still there (a socket; stdin ends by itself).
    pub(crate) liveness: Option<Liveness>,
    /// What counts as its progress in taking frames besides accepted frames (a socket's
    /// connection, when the socket has it to itself).
    pub(crate) progress: SendProgress,
    /// The largest message it takes, when the node knows (`troupe mcp`'s bridge:
    /// `stdio::MAX_FROM_NODE`): a larger answer is replaced by [`too_large_reply`].
    pub(crate) max_message: Option<usize>,
}

async fn serve_frames_until<Si, St>(
    server: TroupeMcp,
    client: FramesClient,
    mut sink: Si,
    stream: St,
    failure: FramesFailure,
) where
    Si: futures::Sink<Outgoing> + Unpin + Send + 'static,
    Si::Error: std::fmt::Display,
    St: futures::Stream<Item = Incoming> + Unpin + Send + 'static,
{
    let (out_tx, mut out_rx) = mpsc::channel::<Outgoing>(OUTBOUND_QUEUE);
    let ended = CancellationToken::new();
    // The writer: the only user of the socket's sending half.
    let writer = {
        let ended = ended.clone();
        let progress = client.progress.clone();
        tokio::spawn(async move {
            while let Some(frame) = out_rx.recv().await {
                let closing = matches!(frame, Outgoing::Close(..));
                if let Err(failure) = send_within(&mut sink, frame, SEND_TIMEOUT, &progress).await {
                    tracing::info!(%failure, "MCP WebSocket client stopped reading");
                    break;
                }
                if closing {
                    break;
                }
            }
            ended.cancel();
        })
    };
    let FramesClient {
        parts,
        peer,
        principal,
        liveness,
        progress: _,
        max_message,
    } = client;
    let principal = principal.or_else(|| server.local_principal.clone());
    let link_closed = match server.attach_link(peer, principal.as_ref()).await {
        Ok(closed) => closed,
        Err(error) => {
            let reason: String = error.to_string().chars().take(100).collect();
            let _ = out_tx.send(Outgoing::Close(CLOSE_GOING_AWAY, reason)).await;
            drop(out_tx);
            let _ = writer.await;
            return;
        }
    };
    // Cancelled when this link ends (stops the pings), and when its client went silent.
    let (done, silent) = (CancellationToken::new(), CancellationToken::new());
    let init_timeout = match liveness {
        Some(liveness) => {
            liveness.watch(out_tx.clone(), done.clone(), silent.clone());
            INIT_TIMEOUT
        }
        None => Duration::MAX,
    };
    let stop_pings = done.drop_guard();
    let in_flight = InFlight::new();
    let answered = in_flight.clone();
    let to_client = PollSender::new(out_tx.clone()).with(move |message: ServerJsonRpcMessage| {
        let id = match &message {
            ServerJsonRpcMessage::Response(response) => {
                answered.settle(&response.id);
                Some(&response.id)
            }
            ServerJsonRpcMessage::Error(error) => {
                if let Some(id) = &error.id {
                    answered.settle(id);
                }
                error.id.as_ref()
            }
            _ => None,
        };
        let mut text = serde_json::to_string(&message).unwrap_or_else(|error| {
            tracing::error!(%error, "an MCP message could not be serialized");
            parse_error("internal: unserializable message")
        });
        if let Some(max) = max_message
            && text.len() > max
        {
            text = too_large_reply(id, text.len(), max);
        }
        futures::future::ready(Ok::<_, tokio_util::sync::PollSendError<Outgoing>>(
            Outgoing::Text(text),
        ))
    });
    let errors = out_tx.clone();
    // Clients with a token pay for each request; the local stdio user has none.
    let charged = if parts.is_some() {
        principal.clone()
    } else {
        None
    };
    let core = server.core.clone();
    let from_client = stream
        .take_until(ended.clone().cancelled_owned())
        .map(move |frame| {
            (
                frame,
                errors.clone(),
                parts.clone(),
                charged.clone(),
                core.clone(),
                (failure.clone(), in_flight.clone()),
            )
        })
        .then(
            |(frame, errors, parts, charged, core, (failure, in_flight))| async move {
                match frame {
                    Incoming::Text(text) => match check_message(&text) {
                        Ok(mut message) => {
                            if let (ClientJsonRpcMessage::Request(request), Some(principal)) =
                                (&message, &charged)
                                && let Err(wait) = core.limiter.check(principal)
                            {
                                let id = serde_json::to_value(&request.id).unwrap_or_default();
                                let reply = rate_limited_reply(id, principal, wait);
                                let _ = errors.send(Outgoing::Text(reply)).await;
                                return Some(None);
                            }
                            if let (ClientJsonRpcMessage::Request(request), Some(parts)) =
                                (&mut message, parts)
                            {
                                request.request.extensions_mut().insert(parts);
                            }
                            match &message {
                                ClientJsonRpcMessage::Request(request) => {
                                    let admission = in_flight.admit(request.id.clone());
                                    if admission != Admission::Admitted {
                                        let id =
                                            serde_json::to_value(&request.id).unwrap_or_default();
                                        let reply = match admission {
                                            Admission::Duplicate => duplicate_id_reply(id),
                                            _ => too_many_in_flight_reply(id),
                                        };
                                        let _ = errors.send(Outgoing::Text(reply)).await;
                                        return Some(None);
                                    }
                                }
                                ClientJsonRpcMessage::Notification(notification) => {
                                    if let ClientNotification::CancelledNotification(cancelled) =
                                        &notification.notification
                                        && let Some(id) = &cancelled.params.request_id
                                    {
                                        // rmcp sends no answer to a cancelled request.
                                        in_flight.settle(id);
                                    }
                                }
                                _ => {}
                            }
                            Some(Some(message))
                        }
                        Err(reply) => {
                            let _ = errors.send(Outgoing::Text(reply)).await;
                            Some(None)
                        }
                    },
                    Incoming::Invalid(why) => {
                        let _ = errors.send(Outgoing::Text(parse_error(&why))).await;
                        Some(None)
                    }
                    Incoming::Binary => {
                        let reply = parse_error("binary frames are not accepted; send JSON text");
                        let _ = errors.send(Outgoing::Text(reply)).await;
                        Some(None)
                    }
                    Incoming::Close => None,
                    Incoming::Failed(error) => {
                        let reason: String = error.chars().take(100).collect();
                        let _ = failure.set(error);
                        let _ = errors.send(Outgoing::Close(CLOSE_POLICY, reason)).await;
                        None
                    }
                }
            },
        )
        .take_while(|item| futures::future::ready(item.is_some()))
        .filter_map(|item| futures::future::ready(item.flatten()));
    let serving = server
        .clone()
        .serve((Box::pin(to_client), Box::pin(from_client)));
    let started = tokio::select! {
        started = tokio::time::timeout(init_timeout, serving) => match started {
            Ok(started) => started.map_err(|error| StartFailure::Refused(error.to_string())),
            Err(_) => Err(StartFailure::NoInitialize(init_timeout)),
        },
        () = silent.cancelled() => Err(StartFailure::Silent),
    };
    let running = match started {
        Ok(running) => running,
        Err(failure) => {
            tracing::info!(error = %failure, "an MCP WebSocket client did not initialize");
            let (code, reason) = failure.close();
            let _ = out_tx.send(Outgoing::Close(code, reason)).await;
            drop(stop_pings);
            drop(out_tx);
            let _ = writer.await;
            return;
        }
    };
    let cancel = running.cancellation_token();
    tokio::select! {
        _ = running.waiting() => {}
        () = link_closed.cancelled() => {
            cancel.cancel();
            let _ = out_tx
                .send(Outgoing::Close(CLOSE_GOING_AWAY, "closed by the node".into()))
                .await;
        }
        () = silent.cancelled() => {
            tracing::info!("an MCP WebSocket client answered no ping; disconnecting it");
            cancel.cancel();
            let _ = out_tx
                .send(Outgoing::Close(CLOSE_GOING_AWAY, "no answer to pings".into()))
                .await;
        }
    }
    // The pinger holds a sender: stopped first, or the writer would wait for it.
    drop(stop_pings);
    drop(out_tx);
    let _ = writer.await;
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A node serving HTTP on a loopback port, and its admin token.
    async fn http_node() -> (crate::node::NodeHandle, String, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let node = crate::node::Node::builder()
            .config(crate::config::Config::default())
            .data_dir(dir.path().join("data"))
            .listener(listener)
            .start()
            .await
            .unwrap();
        let token = std::fs::read_to_string(node.admin_token_path()).unwrap();
        (node, token.trim().to_owned(), dir)
    }

    /// Sends `head` and `body` as they are on a new connection to `node`; returns the status of
    /// the answer and its body.
    async fn raw_post(node: &crate::node::NodeHandle, head: &str, body: &[u8]) -> (u16, String) {
        let mut socket = tokio::net::TcpStream::connect(node.http_addr().unwrap())
            .await
            .unwrap();
        socket.write_all(head.as_bytes()).await.unwrap();
        socket.write_all(body).await.unwrap();
        let mut answer = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(30), async {
            let mut buffer = [0u8; 4096];
            loop {
                let text = String::from_utf8_lossy(&answer);
                if let Some((head, body)) = text.split_once("\r\n\r\n")
                    && body.contains('}')
                {
                    return (head.to_owned(), body.to_owned());
                }
                match socket.read(&mut buffer).await {
                    Ok(0) | Err(_) => return (text.into_owned(), String::new()),
                    Ok(read) => answer.extend_from_slice(&buffer[..read]),
                }
            }
        })
        .await
        .expect("an answer");
        let status = read
            .0
            .split(' ')
            .nth(1)
            .and_then(|status| status.parse().ok())
            .unwrap_or(0);
        (status, read.1)
    }

    /// Regression: the bound on a token's legacy sessions was checked before an `initialize`
    /// ran and the session recorded only after its answer, so concurrent `initialize`s all
    /// passed the check and the token held more than its bound. A place is now taken before
    /// each runs: with a bound of 2, eight at once open two sessions and the others are 429s.
    #[tokio::test]
    async fn concurrent_initializes_open_no_more_sessions_than_the_tokens_bound() {
        use tower::ServiceExt;
        let dir = tempfile::tempdir().unwrap();
        let node = crate::node::test_node(dir.path()).await;
        let token = std::fs::read_to_string(node.admin_token_path()).unwrap();
        let core = node.core().clone();
        let stop = CancellationToken::new();
        let app = routes_with(core.clone(), stop.clone(), 2).with_state(core);
        let initialize = |id: u64| {
            let body = serde_json::json!({"jsonrpc": "2.0", "id": id, "method": "initialize",
                "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                           "clientInfo": {"name": "burst", "version": "0"}}});
            Request::post("/mcp")
                .header("host", "127.0.0.1")
                .header("authorization", format!("Bearer {}", token.trim()))
                .header("content-type", "application/json")
                .header("accept", "application/json, text/event-stream")
                .body(axum::body::Body::from(body.to_string()))
                .unwrap()
        };
        let answers =
            futures::future::join_all((0..8).map(|id| app.clone().oneshot(initialize(id)))).await;
        let (mut opened, mut refused) = (0, 0);
        for answer in answers {
            let answer = answer.unwrap();
            match answer.status().as_u16() {
                200 => {
                    assert!(answer.headers().contains_key("mcp-session-id"));
                    opened += 1;
                }
                429 => {
                    let body = axum::body::to_bytes(answer.into_body(), 1 << 20)
                        .await
                        .unwrap();
                    let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
                    assert_eq!(body["error"]["data"]["code"], "too_many_sessions", "{body}");
                    assert_eq!(body["error"]["data"]["max"], 2, "{body}");
                    refused += 1;
                }
                other => panic!("an initialize answered {other}"),
            }
        }
        assert_eq!((opened, refused), (2, 6));
        stop.cancel();
        node.shutdown().await;
    }

    /// Regression: an answer larger than `troupe mcp`'s bridge takes from its node (a record
    /// with large labels and files, as any tool returns it) made the bridge drop its link and
    /// connect again, and again. On a link that says how much it takes, such an answer is
    /// replaced by an error for its request that says why; smaller ones pass as they are.
    #[tokio::test]
    async fn an_answer_over_what_the_link_takes_is_an_error_for_its_request() {
        let dir = tempfile::tempdir().unwrap();
        let node = crate::node::test_node(dir.path()).await;
        let local = crate::auth::Principal {
            name: crate::auth::STDIO_PRINCIPAL.into(),
            role: Role::Admin,
        };
        let server = TroupeMcp::new(node.core().clone(), TransportKind::McpStdio, Some(local));
        let max = 4096;
        let client = FramesClient {
            max_message: Some(max),
            ..FramesClient::default()
        };
        let (sink, mut written) = futures::channel::mpsc::unbounded::<Outgoing>();
        let (lines, stream) = futures::channel::mpsc::unbounded::<Incoming>();
        let serving = tokio::spawn(serve_frames(server, client, sink, stream));
        let send = |message: serde_json::Value| {
            lines
                .unbounded_send(Incoming::Text(message.to_string()))
                .unwrap();
        };
        let answer = async |written: &mut futures::channel::mpsc::UnboundedReceiver<Outgoing>,
                            id: u64| loop {
            let frame = tokio::time::timeout(Duration::from_secs(30), written.next())
                .await
                .expect("an answer")
                .expect("the link runs");
            if let Outgoing::Text(text) = frame {
                let message: serde_json::Value = serde_json::from_str(&text).unwrap();
                if message["id"] == id {
                    return (text.len(), message);
                }
            }
        };
        send(
            serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-11-25", "capabilities": {},
            "clientInfo": {"name": "small", "version": "0"}}}),
        );
        let (bytes, initialized) = answer(&mut written, 1).await;
        assert!(bytes <= max, "{bytes}");
        assert_eq!(initialized["result"]["serverInfo"]["name"], "troupe");
        send(serde_json::json!({"jsonrpc": "2.0", "method": "notifications/initialized"}));
        // The tool list with its schemas: several times what this link takes.
        send(serde_json::json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}));
        let (bytes, refused) = answer(&mut written, 2).await;
        assert!(bytes <= max, "{bytes}");
        assert_eq!(refused["error"]["code"], ANSWER_TOO_LARGE, "{refused}");
        assert_eq!(refused["error"]["data"]["code"], "answer_too_large");
        assert_eq!(refused["error"]["data"]["max_bytes"], max);
        assert!(refused["error"]["data"]["bytes"].as_u64().unwrap() > max as u64);
        // The link goes on.
        send(serde_json::json!({"jsonrpc": "2.0", "id": 3, "method": "ping"}));
        let (_, pong) = answer(&mut written, 3).await;
        assert!(pong.get("result").is_some(), "{pong}");
        drop(lines);
        let _ = tokio::time::timeout(Duration::from_secs(30), serving).await;
        node.shutdown().await;
    }

    /// Regression: any failure to read a `POST /mcp` body was answered 413
    /// `payload_too_large`, a broken chunked encoding or a reset mid-body too. Only a body over
    /// `http.max_body_bytes` is a 413; a broken one is a 400 `invalid_body` that says so.
    #[tokio::test]
    async fn a_broken_body_is_a_bad_request_and_only_a_long_one_is_too_large() {
        let (node, token, _dir) = http_node().await;
        let head = |framing: &str| {
            format!(
                "POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n\
                 Content-Type: application/json\r\nAccept: application/json, \
                 text/event-stream\r\n{framing}\r\n"
            )
        };
        // A chunk size that is not hexadecimal.
        let (status, body) = raw_post(
            &node,
            &head("Transfer-Encoding: chunked\r\n"),
            b"5\r\n{\"jso\r\nzz\r\n",
        )
        .await;
        assert_eq!(status, 400, "{body}");
        let body: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body["error"]["code"], "invalid_body", "{body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("could not be read"),
            "{body}"
        );

        let limit = node.core().config.http.max_body_bytes;
        let long = vec![b' '; limit + 1];
        let (status, body) = raw_post(
            &node,
            &head(&format!("Content-Length: {}\r\n", long.len())),
            &long,
        )
        .await;
        assert_eq!(status, 413, "{body}");
        let body: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body["error"]["code"], "payload_too_large", "{body}");
        node.shutdown().await;
    }

    /// Regression: a client that had not sent `initialize` within 60 s was closed with 1008
    /// (policy), which the `troupe mcp` bridge takes as a refusal and exits on, where the docs
    /// say 1001 (going away), on which it connects again.
    /// Regression: `Application/JSON` skipped the node's message checks (rmcp took it all the
    /// same, and answered a batch with a bare 415).
    #[test]
    fn json_bodies_are_recognised_whatever_the_case_of_their_media_type() {
        for value in [
            "application/json",
            "Application/JSON",
            "application/json; charset=utf-8",
            " APPLICATION/JSON ;charset=UTF-8",
        ] {
            assert!(is_json_media_type(value), "{value}");
        }
        for value in [
            "text/plain",
            "application/jsonl",
            "application/json-seq",
            "",
        ] {
            assert!(!is_json_media_type(value), "{value}");
        }
    }

    #[test]
    fn a_client_too_slow_to_initialize_is_closed_as_going_away_and_a_broken_one_as_policy() {
        let slow = StartFailure::NoInitialize(INIT_TIMEOUT);
        assert_eq!(slow.close().0, CLOSE_GOING_AWAY);
        assert!(slow.close().1.contains("no initialize within"), "{slow:?}");
        assert_eq!(StartFailure::Silent.close().0, CLOSE_GOING_AWAY);
        let broken = StartFailure::Refused("expected initialize".into());
        assert_eq!(
            broken.close(),
            (CLOSE_POLICY, "initialization failed".into())
        );
    }
}
