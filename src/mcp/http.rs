//! MCP over HTTP: Streamable HTTP at `/mcp` (rmcp's transport) and WebSocket at `/mcp/ws`.
//!
//! Both doors first check `Host` and `Origin` against `http.allowed_hosts` (DNS rebinding; a
//! page on another origin), then the bearer token like every `/v1` route (any role; each tool
//! checks the role it needs, and the per-token rate limit applies). rmcp's own Host check is
//! switched off because this one covers both doors with one list.
//!
//! `/mcp/ws` is not a standard MCP transport: subprotocol `mcp`, one JSON-RPC message per
//! text frame, the same messages and lifecycle as stdio. Frames that are not JSON-RPC are
//! answered with a JSON-RPC parse error (id `null`) and the link stays; a frame over
//! `http.max_body_bytes` closes it. Outbound messages go through a bounded queue whose
//! senders wait (responses are never dropped); a client that accepts nothing for 10 s is
//! disconnected.

use std::sync::Arc;

use axum::Router;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Request, State};
use axum::http::HeaderMap;
use axum::http::request::Parts;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures::{SinkExt, StreamExt};
use rmcp::ServiceExt;
use rmcp::model::{ClientJsonRpcMessage, GetExtensions, ServerJsonRpcMessage};
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use tokio::sync::mpsc;
use tokio_util::sync::{CancellationToken, PollSender};
use troupe_actors::event::TransportKind;

use super::TroupeMcp;
use crate::auth::Role;
use crate::http::ApiError;
use crate::http::ws::{
    CLOSE_GOING_AWAY, CLOSE_POLICY, Incoming, Outgoing, check_host_and_origin, send_within, split,
};
use crate::node::NodeCore;

/// Outbound MCP messages queued per WebSocket before senders wait.
const OUTBOUND_QUEUE: usize = 64;
/// How long a frame may wait for the client to accept it.
const SEND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The `/mcp` and `/mcp/ws` routes. `stop` ends open MCP streams at shutdown.
pub fn routes(core: Arc<NodeCore>, stop: CancellationToken) -> Router<Arc<NodeCore>> {
    let factory_core = core.clone();
    let service = StreamableHttpService::new(
        move || {
            Ok(TroupeMcp::new(
                factory_core.clone(),
                TransportKind::McpHttp,
                None,
            ))
        },
        Arc::new(LocalSessionManager::default()),
        StreamableHttpServerConfig::default()
            .disable_allowed_hosts()
            .disable_allowed_origins()
            .with_max_request_body_bytes(core.config.http.max_body_bytes)
            .with_cancellation_token(stop),
    );
    Router::new()
        .route("/mcp/ws", get(websocket))
        .route_service("/mcp", service)
        .route_layer(middleware::from_fn_with_state(core, guard))
}

/// Host/Origin, then the bearer token (any role) and the rate limit.
async fn guard(State(core): State<Arc<NodeCore>>, mut request: Request, next: Next) -> Response {
    if let Err(error) = check_host_and_origin(request.headers(), &core.config.http.allowed_hosts) {
        return error.into_response();
    }
    match crate::http::authorize(&core, &request, Role::Viewer) {
        Ok(principal) => {
            request.extensions_mut().insert(principal);
            next.run(request).await
        }
        Err(error) => error.into_response(),
    }
}

async fn websocket(
    State(core): State<Arc<NodeCore>>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
    request: Request,
) -> Result<Response, ApiError> {
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
    let limit = core.config.http.max_body_bytes;
    Ok(ws
        .protocols(["mcp"])
        .max_message_size(limit)
        .max_frame_size(limit)
        .on_upgrade(move |socket| async move {
            let (sink, stream) = split(socket);
            serve_websocket(core, parts, sink, stream).await;
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

/// Serves one MCP client over a WebSocket until it or the node ends the link.
async fn serve_websocket<Si, St>(core: Arc<NodeCore>, parts: Parts, sink: Si, stream: St)
where
    Si: futures::Sink<Outgoing> + Unpin + Send + 'static,
    Si::Error: std::fmt::Display,
    St: futures::Stream<Item = Incoming> + Unpin + Send + 'static,
{
    let via_stdio = parts
        .uri
        .query()
        .is_some_and(|query| query.split('&').any(|pair| pair == "client=stdio"));
    let transport = if via_stdio {
        TransportKind::McpStdio
    } else {
        TransportKind::McpWebSocket
    };
    let server = TroupeMcp::new(core, transport, None);
    let peer = parts
        .extensions
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|info| info.0);
    let principal = parts.extensions.get::<crate::auth::Principal>().cloned();
    serve_frames(server, Some(parts), peer, principal, sink, stream).await;
}

/// Serves one MCP client whose messages come one per frame (a WebSocket, or stdin lines): a
/// bounded outbound queue whose senders wait, parse errors answered, the link opened up front.
pub(crate) async fn serve_frames<Si, St>(
    server: TroupeMcp,
    parts: Option<Parts>,
    peer: Option<std::net::SocketAddr>,
    principal: Option<crate::auth::Principal>,
    mut sink: Si,
    stream: St,
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
        tokio::spawn(async move {
            while let Some(frame) = out_rx.recv().await {
                let closing = matches!(frame, Outgoing::Close(..));
                if let Err(failure) = send_within(&mut sink, frame, SEND_TIMEOUT).await {
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
    let principal = principal.or_else(|| server.local_principal.clone());
    let link_closed = match server.attach_link(peer, principal.as_ref()).await {
        Ok(link) => link.closed.clone(),
        Err(error) => {
            let reason: String = error.to_string().chars().take(100).collect();
            let _ = out_tx.send(Outgoing::Close(CLOSE_GOING_AWAY, reason)).await;
            drop(out_tx);
            let _ = writer.await;
            return;
        }
    };
    let to_client = PollSender::new(out_tx.clone()).with(|message: ServerJsonRpcMessage| {
        futures::future::ready(Ok::<_, tokio_util::sync::PollSendError<Outgoing>>(
            Outgoing::Text(serde_json::to_string(&message).unwrap_or_else(|error| {
                tracing::error!(%error, "an MCP message could not be serialized");
                parse_error("internal: unserializable message")
            })),
        ))
    });
    let errors = out_tx.clone();
    let from_client = stream
        .take_until(ended.clone().cancelled_owned())
        .map(move |frame| (frame, errors.clone(), parts.clone()))
        .then(|(frame, errors, parts)| async move {
            match frame {
                Incoming::Text(text) => match serde_json::from_str::<ClientJsonRpcMessage>(&text) {
                    Ok(mut message) => {
                        if let (ClientJsonRpcMessage::Request(request), Some(parts)) =
                            (&mut message, parts)
                        {
                            request.request.extensions_mut().insert(parts);
                        }
                        Some(Some(message))
                    }
                    Err(error) => {
                        let reply = parse_error(&format!("not a JSON-RPC message: {error}"));
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
                    let _ = errors.send(Outgoing::Close(CLOSE_POLICY, reason)).await;
                    None
                }
            }
        })
        .take_while(|item| futures::future::ready(item.is_some()))
        .filter_map(|item| futures::future::ready(item.flatten()));
    let running = match server
        .clone()
        .serve((Box::pin(to_client), Box::pin(from_client)))
        .await
    {
        Ok(running) => running,
        Err(error) => {
            tracing::info!(%error, "an MCP WebSocket client did not initialize");
            let _ = out_tx
                .send(Outgoing::Close(
                    CLOSE_POLICY,
                    "initialization failed".into(),
                ))
                .await;
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
    }
    drop(out_tx);
    let _ = writer.await;
}
