//! The HTTP front end: one axum router for the REST API, the event stream and operations.
//!
//! Every response carries `X-Request-Id` (the client's, or a generated one) and every log line
//! of a request is inside a span that carries it. Every `/v1` route but `/v1/health` needs a
//! bearer token; the route group decides the role it needs. Errors use the envelope in
//! [`error`], also for an unknown route (404) and a wrong method on a known one (405). This
//! module knows JSON; the core does not.

mod admin;
mod deadline;
pub mod error;
mod events;
mod events_ws;
mod gateway;
#[cfg(test)]
mod http2_tests;
pub(crate) mod ops;
mod sessions;
pub(crate) mod ws;

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tower::ServiceBuilder;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::{DefaultOnResponse, TraceLayer};
use tracing::Level;

use crate::auth::{Principal, Role};
use crate::node::NodeCore;
pub use error::{ApiError, ApiJson};
pub(crate) use events::link_error;

/// Builds the node's router. `stop` ends long-lived MCP streams at shutdown.
pub fn router(core: Arc<NodeCore>, stop: tokio_util::sync::CancellationToken) -> Router {
    let viewer = Router::new()
        .route("/v1/ready", get(ops::ready))
        .route("/v1/links", get(ops::links))
        .route("/v1/cluster/members", get(ops::members))
        .route("/v1/events", get(events::stream))
        .route("/v1/events/ws", get(events_ws::upgrade))
        .route("/metrics", get(ops::metrics))
        .route("/v1/sessions", get(sessions::list))
        .route("/v1/sessions/{id}", get(sessions::get))
        .route("/v1/sessions/{id}/output", get(sessions::output))
        .route("/v1/providers", get(gateway::providers))
        .route_layer(middleware::from_fn_with_state(core.clone(), require_viewer));

    let operator = Router::new()
        .route("/v1/sessions", post(sessions::create))
        .route("/v1/sessions/{id}", axum::routing::delete(sessions::cancel))
        .route_layer(middleware::from_fn_with_state(
            core.clone(),
            require_operator,
        ));

    let gateway = Router::new()
        .route("/v1/chat/completions", post(gateway::chat_completions))
        .route("/v1/models", get(gateway::models))
        .route_layer(middleware::from_fn_with_state(
            core.clone(),
            gateway::require_gateway,
        ));

    let mut router = Router::new()
        .route("/v1/health", get(ops::health))
        .merge(viewer)
        .merge(operator)
        .merge(gateway)
        .merge(crate::mcp::http::routes(core.clone(), stop));
    if core.config.debug.fault_injection {
        router = router.merge(
            Router::new()
                .route("/v1/admin/faults", post(admin::inject_fault))
                .route_layer(middleware::from_fn_with_state(core.clone(), require_admin)),
        );
    }

    router
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(core.config.http.max_body_bytes))
        .layer(
            ServiceBuilder::new()
                .map_request(drop_client_forwarded)
                .map_request(drop_unusable_request_id)
                .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
                .layer(
                    TraceLayer::new_for_http()
                        .make_span_with(|request: &Request<Body>| {
                            let id = request
                                .headers()
                                .get("x-request-id")
                                .and_then(|value| value.to_str().ok())
                                .unwrap_or("");
                            tracing::info_span!(
                                "request",
                                request_id = %id,
                                method = %request.method(),
                                path = %request.uri().path(),
                            )
                        })
                        .on_response(DefaultOnResponse::new().level(Level::INFO)),
                )
                .layer(PropagateRequestIdLayer::x_request_id()),
        )
        .with_state(core)
}

/// How long a client may take to send a request's head (its line and headers), and how long a
/// connection may wait for its next request: an HTTP/1 one kept alive, an HTTP/2 one with no
/// stream open; past it the connection is closed. A head is small: a client that needs longer
/// is holding the connection, not sending.
pub(crate) const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// The most HTTP connections the node serves at once, whatever the file descriptor limit: the
/// half of it (sessions' pipes, the store, the cluster need the rest), between 64 and 65,536.
fn connection_cap() -> usize {
    let soft = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_or(1024, |(soft, _)| soft);
    usize::try_from(soft / 2)
        .unwrap_or(usize::MAX)
        .clamp(64, 65_536)
}

/// The bounds [`serve_with`] applies to connections.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ServeLimits {
    /// A connection whose client accepts nothing for this long is closed, and an HTTP/2 stream
    /// whose client gives it no window for this long is reset (see `deadline`).
    pub(crate) send_timeout: std::time::Duration,
    /// A request's head, a connection's first request, and the next request on a connection
    /// with none in progress must come within this.
    pub(crate) header_timeout: std::time::Duration,
    /// Connections served at once; past it, new ones wait in the listener's backlog.
    pub(crate) max_connections: usize,
}

/// Serves `router` on `listener` until `shutdown` resolves, then lets the open connections
/// finish what they are answering. A connection whose client accepts nothing of what it is
/// sent for `send_timeout` is closed, and an HTTP/2 stream whose client gives it no window for
/// as long is reset (see `deadline`); a connection that does not send a request's head within
/// [`HEADER_READ_TIMEOUT`] is closed, and so is one that waits as long with no request in
/// progress; at most [`connection_cap`] connections are served at once (the next ones wait to
/// be accepted).
///
/// This is `axum::serve` (HTTP/1 and h2c on one port, upgrades for WebSockets, the peer's
/// address as `ConnectInfo`) with hyper's header timer on: `axum::serve` runs hyper without a
/// timer, which turns hyper's header read timeout off, so a client could hold any number of
/// connections by sending half a request, or nothing.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    send_timeout: std::time::Duration,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let limits = ServeLimits {
        send_timeout,
        header_timeout: HEADER_READ_TIMEOUT,
        max_connections: connection_cap(),
    };
    serve_with(listener, router, limits, shutdown).await
}

pub(crate) async fn serve_with(
    listener: tokio::net::TcpListener,
    router: Router,
    limits: ServeLimits,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::extract::ConnectInfo;
    use axum::serve::{Listener, ListenerExt};
    use hyper_util::rt::TokioIo;
    use hyper_util::service::TowerToHyperService;
    use tower::ServiceExt;

    let ServeLimits {
        send_timeout,
        header_timeout,
        max_connections,
    } = limits;
    // Without TCP_NODELAY, the small writes of a stream (SSE events, gateway chunks) wait for
    // the peer's delayed ACK: tens of milliseconds each.
    let mut listener = deadline::DeadlineListener::new(listener, send_timeout).tap_io(|stream| {
        if let Err(error) = stream.get_ref().set_nodelay(true) {
            tracing::debug!(%error, "cannot set TCP_NODELAY");
        }
    });
    // Closed when shutdown begins (connections then finish what they answer and close); every
    // connection holds a receiver of `open` until it is done.
    let (stopping_tx, stopping) = tokio::sync::watch::channel(());
    let (open_tx, open) = tokio::sync::watch::channel(());
    tokio::spawn(async move {
        shutdown.await;
        drop(stopping_tx);
    });
    let mut stop_accepting = stopping.clone();
    let slots = Arc::new(tokio::sync::Semaphore::new(max_connections));
    let mut last_warned: Option<tokio::time::Instant> = None;
    loop {
        // A place for the next connection first: when every one is taken, connections wait
        // in the listener's backlog (and the node's file descriptors stay for its sessions).
        let slot = match slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                // Once a minute at most, however long the node stays at its bound.
                if last_warned.is_none_or(|at| at.elapsed() >= std::time::Duration::from_secs(60)) {
                    last_warned = Some(tokio::time::Instant::now());
                    tracing::warn!(
                        max_connections,
                        "serving the most HTTP connections at once (half the open-files limit); \
                         new ones wait until one closes"
                    );
                }
                tokio::select! {
                    slot = slots.clone().acquire_owned() => match slot {
                        Ok(slot) => slot,
                        Err(_) => break,
                    },
                    _ = stop_accepting.changed() => break,
                }
            }
        };
        let (io, peer) = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop_accepting.changed() => break,
        };
        // Set by the connection's first request: its head came in time.
        let first_request = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let written = io.bytes_written();
        let service = router
            .clone()
            .map_request({
                let first_request = first_request.clone();
                let written = written.clone();
                move |mut request: Request<hyper::body::Incoming>| {
                    first_request.store(true, std::sync::atomic::Ordering::Relaxed);
                    request.extensions_mut().insert(ConnectInfo(peer));
                    // An HTTP/1 request that upgrades (a WebSocket) has the connection to
                    // itself: its bytes written are the link's progress (`ws::SendProgress`).
                    // An HTTP/2 connection's are shared by its streams, so those go without.
                    if request.version() <= axum::http::Version::HTTP_11 {
                        request.extensions_mut().insert(written.clone());
                    }
                    request.map(Body::new)
                }
            })
            .map_response(deadline::clock_stream_body);
        let hyper_service = TowerToHyperService::new(service);
        let streams = deadline::OpenStreams::new();
        let builder = connection_builder(
            deadline::StreamExecutor::new(peer, send_timeout, streams.clone()),
            header_timeout,
        );
        let mut stopping = stopping.clone();
        let open = open.clone();
        tokio::spawn(async move {
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), hyper_service);
            let mut conn = std::pin::pin!(conn);
            // hyper's timer covers the heads of HTTP/1 requests, not the bytes before the
            // first one (read to tell HTTP/1 from HTTP/2) nor an HTTP/2 preface: the first
            // request must come within the same time.
            let first_deadline = tokio::time::sleep(header_timeout);
            let mut first_deadline = std::pin::pin!(first_deadline);
            // hyper has no idle timeout for HTTP/2: an HTTP/2 connection with no stream open
            // for the header timeout is asked to close (GOAWAY); see `Closing` for the rest.
            let idle = streams.idle_for(header_timeout);
            let mut idle = std::pin::pin!(idle);
            let (mut closing, mut waiting_first) = (None::<Closing>, true);
            loop {
                tokio::select! {
                    served = conn.as_mut() => {
                        if let Err(error) = served {
                            tracing::debug!(%peer, %error, "an HTTP connection ended with an error");
                        }
                        break;
                    }
                    _ = stopping.changed(), if closing.is_none() => {
                        conn.as_mut().graceful_shutdown();
                        closing = Some(Closing::asked(&written));
                        idle.set(streams.idle_for(header_timeout));
                    }
                    () = idle.as_mut() => {
                        if closing.is_none() {
                            tracing::debug!(
                                %peer,
                                "an HTTP/2 connection had no request in progress for {} s; \
                                 asking it to close",
                                header_timeout.as_secs()
                            );
                            conn.as_mut().graceful_shutdown();
                            closing = Some(Closing::asked(&written));
                        } else if closing
                            .as_mut()
                            .is_some_and(|asked| !asked.still_sending(&written))
                        {
                            tracing::debug!(%peer, "an HTTP/2 client ignored a GOAWAY; closed");
                            break;
                        }
                        idle.set(streams.idle_for(header_timeout));
                    }
                    () = first_deadline.as_mut(), if waiting_first => {
                        waiting_first = false;
                        if !first_request.load(std::sync::atomic::Ordering::Relaxed) {
                            tracing::debug!(%peer, "an HTTP client sent no request in time; closed");
                            break;
                        }
                    }
                }
            }
            drop((open, slot));
        });
    }
    drop(open);
    drop(listener);
    open_tx.closed().await;
    Ok(())
}

/// hyper's builder for one connection: HTTP/1 with its header timer; HTTP/2 with extended
/// CONNECT (WebSockets over HTTP/2) and its streams run by `streams`.
///
/// No HTTP/2 keep-alive PINGs: the answer to one waits behind whatever the node has queued for
/// the client (h2's buffer, the socket's), so a slow reader the send deadline lets go on
/// would be cut by its timeout. A vanished peer is found as over HTTP/1: a long-lived stream
/// writes (event streams their heartbeats), and writes nobody acknowledges fail once TCP gives
/// up retransmitting them; a stream whose window never opens again is reset by its send
/// deadline; a connection with no stream open is closed as idle.
fn connection_builder(
    streams: deadline::StreamExecutor,
    header_timeout: std::time::Duration,
) -> hyper_util::server::conn::auto::Builder<deadline::StreamExecutor> {
    let mut builder = hyper_util::server::conn::auto::Builder::new(streams);
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(header_timeout);
    builder.http2().enable_connect_protocol();
    builder
}

/// A connection the node has asked to close (HTTP/2: a GOAWAY, then h2 waits for the client's
/// answer to a PING and for the open streams to end). One that, after that, has no stream open
/// for the header timeout and has written nothing meanwhile is closed outright: its client does
/// not answer the PING. One still sending (the tail of a response to a slow reader) is not.
/// The GOAWAY and PING themselves are written after the first look, so the outright close comes
/// one to two header timeouts after the GOAWAY.
#[derive(Debug)]
struct Closing {
    /// The connection's bytes written when last looked at.
    written: u64,
}

impl Closing {
    fn asked(written: &deadline::BytesWritten) -> Self {
        Self {
            written: written.get(),
        }
    }

    /// Whether the connection wrote anything since it was last looked at.
    fn still_sending(&mut self, written: &deadline::BytesWritten) -> bool {
        let now = written.get();
        std::mem::replace(&mut self.written, now) != now
    }
}

/// The token of an `Authorization` value `Bearer TOKEN` (the scheme in any case, RFC 9110
/// §11.1); `None` for another scheme or an empty token.
pub(crate) fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// The longest `X-Request-Id` taken from a client.
const MAX_REQUEST_ID: usize = 128;

/// Whether a client's `X-Request-Id` may be kept: short, and made of letters, digits and
/// `-_.:/+=` (a UUID, a trace id, a base64 id). Any other is replaced by a generated one, so
/// that a client cannot put what it likes, of any size, into every log line of its request
/// and into the answer (before its token is even looked at).
fn usable_request_id(value: &axum::http::HeaderValue) -> bool {
    let bytes = value.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= MAX_REQUEST_ID
        && bytes
            .iter()
            .all(|byte| byte.is_ascii_alphanumeric() || b"-_.:/+=".contains(byte))
}

/// Removes the forwarding header from a request another node did not forward here (see
/// [`crate::cluster::remote::ForwardedCall`]): a client cannot turn off routing and placement.
fn drop_client_forwarded(mut request: Request<Body>) -> Request<Body> {
    if request
        .extensions()
        .get::<crate::cluster::remote::ForwardedCall>()
        .is_none()
    {
        request
            .headers_mut()
            .remove(crate::cluster::remote::FORWARDED);
    }
    request
}

/// Removes a client's `X-Request-Id` that is not [`usable_request_id`] (a generated one takes
/// its place).
fn drop_unusable_request_id(mut request: Request<Body>) -> Request<Body> {
    if request
        .headers()
        .get_all("x-request-id")
        .iter()
        .any(|value| !usable_request_id(value))
    {
        request.headers_mut().remove("x-request-id");
    }
    request
}

async fn not_found(request: Request) -> ApiError {
    ApiError::not_found(
        "not_found",
        format!(
            "no route for {} {}; see docs/API.md",
            request.method(),
            request.uri().path()
        ),
    )
}

/// A route that exists, called with a method it does not have: the envelope, not a bare 405.
async fn method_not_allowed(request: Request) -> ApiError {
    ApiError::method_not_allowed(request.method(), request.uri().path())
}

/// Authenticates the request and checks its role and rate.
pub(crate) fn authorize(
    core: &NodeCore,
    request: &Request,
    needed: Role,
) -> Result<Principal, ApiError> {
    let header = request
        .headers()
        .get(header::AUTHORIZATION)
        .ok_or_else(|| {
            ApiError::unauthorized(
                "this route needs a bearer token: send Authorization: Bearer TOKEN (the node's \
                 admin token is in its data directory, file admin.token)",
            )
        })?;
    let token =
        header.to_str().ok().and_then(bearer_token).ok_or_else(|| {
            ApiError::unauthorized("the Authorization header must be `Bearer TOKEN`")
        })?;
    let principal = core
        .tokens
        .authenticate(token)
        .ok_or_else(|| ApiError::unauthorized("unknown token"))?;
    if !principal.role.allows(needed) {
        return Err(ApiError::forbidden(format!(
            "token {:?} has role {}; this route needs {}",
            principal.name,
            principal.role.as_str(),
            needed.as_str()
        ))
        .with_details(serde_json::json!({
            "role": principal.role.as_str(),
            "needed": needed.as_str(),
        })));
    }
    // A call another node forwarded was charged there, to the client that made it.
    let forwarded = request
        .extensions()
        .get::<crate::cluster::remote::ForwardedCall>()
        .is_some();
    if !forwarded && let Err(wait) = core.limiter.check(&principal) {
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            format!(
                "token {:?} exceeded auth.requests_per_second; retry after the delay",
                principal.name
            ),
        )
        .retry_after(wait));
    }
    Ok(principal)
}

async fn require(core: Arc<NodeCore>, mut request: Request, next: Next, role: Role) -> Response {
    match authorize(&core, &request, role) {
        Ok(principal) => {
            request.extensions_mut().insert(principal);
            next.run(request).await
        }
        Err(error) => error.into_response(),
    }
}

async fn require_viewer(
    State(core): State<Arc<NodeCore>>,
    request: Request,
    next: Next,
) -> Response {
    require(core, request, next, Role::Viewer).await
}

async fn require_operator(
    State(core): State<Arc<NodeCore>>,
    request: Request,
    next: Next,
) -> Response {
    require(core, request, next, Role::Operator).await
}

async fn require_admin(
    State(core): State<Arc<NodeCore>>,
    request: Request,
    next: Next,
) -> Response {
    require(core, request, next, Role::Admin).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Reads until the server closes the connection; what it sent.
    async fn read_to_close(stream: &mut tokio::net::TcpStream) -> String {
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await.unwrap();
        String::from_utf8_lossy(&answer).into_owned()
    }

    /// Regression: the node served HTTP without hyper's timer, which turns the header read
    /// timeout off: a client that sent half a request's head, or nothing, held its connection
    /// (a task, a file descriptor) forever. A handler that takes longer than the timeout is not
    /// cut: the timeout is for the head only.
    #[tokio::test(start_paused = true)]
    async fn a_connection_that_does_not_send_a_whole_head_in_time_is_closed() {
        let router = Router::new().route("/", get(|| async { "ok" })).route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(5)).await;
                "slow"
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = tokio_util::sync::CancellationToken::new();
        let limits = ServeLimits {
            send_timeout: Duration::from_secs(60),
            header_timeout: Duration::from_secs(1),
            max_connections: 64,
        };
        let server = tokio::spawn(serve_with(
            listener,
            router,
            limits,
            stop.clone().cancelled_owned(),
        ));

        let mut half = tokio::net::TcpStream::connect(addr).await.unwrap();
        half.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n")
            .await
            .unwrap();
        let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
        let before = tokio::time::Instant::now();
        assert!(!read_to_close(&mut half).await.contains("200 OK"));
        assert!(read_to_close(&mut silent).await.is_empty());
        assert!(
            before.elapsed() >= Duration::from_secs(1),
            "closed by the timeout"
        );

        let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let answer = read_to_close(&mut slow).await;
        assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
        assert!(answer.ends_with("slow"), "{answer}");

        stop.cancel();
        server.await.unwrap().unwrap();
    }

    /// Past the most connections at once, the next one waits (in the listener's backlog) until
    /// one closes, and is served then.
    #[tokio::test(start_paused = true)]
    async fn past_the_most_connections_the_next_one_waits_for_one_to_close() {
        let router = Router::new().route("/", get(|| async { "ok" }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = tokio_util::sync::CancellationToken::new();
        let limits = ServeLimits {
            send_timeout: Duration::from_secs(60),
            header_timeout: Duration::from_secs(600),
            max_connections: 1,
        };
        let server = tokio::spawn(serve_with(
            listener,
            router,
            limits,
            stop.clone().cancelled_owned(),
        ));
        let request = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        let mut first = tokio::net::TcpStream::connect(addr).await.unwrap();
        first.write_all(request).await.unwrap();
        let mut answer = [0u8; 256];
        let read = first.read(&mut answer).await.unwrap();
        assert!(answer[..read].starts_with(b"HTTP/1.1 200 OK"));

        // The first stays open (kept alive): the second is connected by the kernel but not
        // served.
        let mut second = tokio::net::TcpStream::connect(addr).await.unwrap();
        second.write_all(request).await.unwrap();
        let waited = tokio::time::timeout(Duration::from_secs(60), second.read(&mut answer)).await;
        assert!(waited.is_err(), "served past the bound");

        drop(first);
        let read = second.read(&mut answer).await.unwrap();
        assert!(answer[..read].starts_with(b"HTTP/1.1 200 OK"));
        drop(second);
        stop.cancel();
        server.await.unwrap().unwrap();
    }

    #[test]
    fn the_bearer_scheme_is_read_in_any_case() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer abc "), Some("abc"));
        assert_eq!(bearer_token("BEARER  abc"), Some("abc"));
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearer "), None);
        assert_eq!(bearer_token("Bearerabc"), None);
    }

    /// Regression: a client's `X-Request-Id` of any size and content was kept, echoed and put
    /// on every log line of its request, before its token was looked at.
    #[test]
    fn only_a_short_plain_request_id_from_a_client_is_kept() {
        let id = |value: &str| HeaderValue::from_str(value).unwrap();
        assert!(usable_request_id(&id(
            "3f2b8c9e-1d4a-4f5b-9c6d-7e8f9a0b1c2d"
        )));
        assert!(usable_request_id(&id("trace:abc/def+g=")));
        assert!(!usable_request_id(&id("")));
        assert!(!usable_request_id(&id(&"a".repeat(MAX_REQUEST_ID + 1))));
        assert!(!usable_request_id(&id("a b")));
        assert!(!usable_request_id(&id("a\"b")));

        let request = |value: &str| {
            Request::builder()
                .header("x-request-id", value)
                .body(Body::empty())
                .unwrap()
        };
        let kept = drop_unusable_request_id(request("abc-123"));
        assert_eq!(kept.headers()["x-request-id"], "abc-123");
        let dropped = drop_unusable_request_id(request(&"A".repeat(200_000)));
        assert!(dropped.headers().get("x-request-id").is_none());
    }
}
