//! Forwarding to another node: a session request as one `Call` frame on a new QUIC stream,
//! answered with `Answer` frames — one, or for a streamed response (`text/event-stream`) a head,
//! the body's chunks as they come, and a last frame with `more: false`. The owner runs the call
//! through its own router as its admin with the header `x-troupe-forwarded`. This module moves
//! requests and answers; where they go is decided in the parent module.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tower::ServiceExt;
use troupe_actors::event::EventData;
use troupe_actors::ids::NodeId;
use troupe_actors::registry::MemberEntry;

use crate::cluster::endpoint::ClusterEndpoint;
use crate::cluster::relay::{Frame, RelayError, read_frame, write_frame};
use crate::http::ApiError;
use crate::node::NodeCore;
use crate::session::SessionError;

/// The header on forwarded requests (its value: the forwarding node). Only a request that
/// [`serve_call`] made carries it: the router removes it from every other one
/// (`http::router`), so a client cannot pass for another node.
pub const FORWARDED: &str = "x-troupe-forwarded";

/// The mark [`serve_call`] puts in the extensions of a request another node forwarded here (a
/// client cannot set an extension). The router keeps [`FORWARDED`] only on such a request, and
/// the per-token rate limit does not charge it: the client was charged on the node it asked,
/// and the admin token it runs as here is this node's own (its CLI, its `troupe mcp` bridge).
#[derive(Debug, Clone, Copy)]
pub struct ForwardedCall;
/// Largest forwarded request body, and largest piece of an answer in one frame.
pub const MAX_FORWARD_BYTES: usize = 4 * 1024 * 1024 - 1024;
/// Largest whole (not streamed) answer: one larger than a frame goes in pieces and is put back
/// together by the caller, up to this (held in memory on both sides while it travels; a
/// cluster listing holds one per member). An output page ends early within a frame anyway;
/// this is for listings of sessions with large specs.
pub(super) const MAX_WHOLE_ANSWER_BYTES: usize = 16 * 1024 * 1024;
/// How long a forwarded request may take until its head (for a streamed answer, and for a
/// whole one that comes in pieces: their rest gets as long again).
const FORWARD_TIMEOUT: Duration = Duration::from_secs(30);
/// Streamed chunks held for a slow client before the owner is made to wait.
const STREAM_BUFFER: usize = 16;

/// A request forwarded to another node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteCall {
    /// HTTP method.
    pub method: String,
    /// Path and query.
    pub uri: String,
    /// JSON body (may be empty).
    pub body: Vec<u8>,
}

/// The owner's answer, or one piece of a streamed one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteAnswer {
    /// HTTP status.
    pub status: u16,
    /// JSON body, or for a streamed answer the next chunk of it.
    pub body: Vec<u8>,
    /// The body goes on in further `Answer` frames (a streamed answer); the last has `false`.
    pub more: bool,
    /// The owner's `Retry-After`, in seconds.
    pub retry_after: Option<u64>,
}

impl RemoteAnswer {
    fn whole(status: u16, body: Vec<u8>) -> Self {
        Self {
            status,
            body,
            more: false,
            retry_after: None,
        }
    }

    /// The body as JSON: `Ok` for a success, `Err` with the error envelope otherwise.
    pub fn json(&self) -> Result<Value, Value> {
        let body = serde_json::from_slice::<Value>(&self.body).unwrap_or_else(|error| {
            json!({"error": {
                "code": "invalid_answer",
                "message": format!("the owner's answer is not JSON: {error}"),
                "details": {},
            }})
        });
        if self.status < 400 && body.get("error").is_none() {
            Ok(body)
        } else {
            Err(body)
        }
    }

    /// The answer as an HTTP response from `node`.
    pub fn into_response(self, node: &NodeId) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::BAD_GATEWAY);
        let mut response = (status, self.body).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(after) = self.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(after));
        }
        if let Ok(value) = HeaderValue::from_str(node.as_str()) {
            headers.insert("x-troupe-node", value);
        }
        response
    }
}

fn member(core: &NodeCore, node: &NodeId) -> Option<MemberEntry> {
    core.tree
        .registry
        .tables()
        .members()
        .into_iter()
        .find(|member| member.node == *node)
}

pub(super) fn unreachable(node: &NodeId, why: &str) -> ApiError {
    ApiError::unavailable(
        "owner_unreachable",
        format!("node {node} is {why}; its sessions cannot be reached until it is back"),
    )
    .with_details(json!({ "node": node }))
    .retry_after(Duration::from_secs(5))
}

/// An answer still streaming: the rest of its frames come on `recv`.
pub(super) struct Exchange {
    pub(super) head: RemoteAnswer,
    rest: Option<(quinn::SendStream, quinn::RecvStream)>,
}

impl Exchange {
    /// The whole answer of `node`: the head, with the body of the pieces that follow it when
    /// the answer was too large for one frame (at most [`MAX_WHOLE_ANSWER_BYTES`]).
    pub(super) async fn whole(self, node: &NodeId) -> Result<RemoteAnswer, ApiError> {
        let Self { mut head, rest } = self;
        let Some((send, mut recv)) = rest else {
            return Ok(head);
        };
        let collect = async {
            loop {
                match read_frame(&mut recv).await {
                    Ok(Frame::Answer(piece)) => {
                        if head.body.len() + piece.body.len() > MAX_WHOLE_ANSWER_BYTES {
                            return Err(ApiError::new(
                                StatusCode::BAD_GATEWAY,
                                "answer_too_large",
                                format!(
                                    "node {node}'s answer is larger than \
                                     {MAX_WHOLE_ANSWER_BYTES} bytes; ask for a smaller page \
                                     (`limit`)"
                                ),
                            )
                            .with_details(json!({
                                "node": node,
                                "max_bytes": MAX_WHOLE_ANSWER_BYTES,
                            })));
                        }
                        head.body.extend_from_slice(&piece.body);
                        if !piece.more {
                            head.more = false;
                            return Ok(());
                        }
                    }
                    Ok(other) => {
                        return Err(unreachable(
                            node,
                            &format!("answering out of turn ({})", other.name()),
                        ));
                    }
                    Err(error) => {
                        return Err(unreachable(node, &format!("unreachable ({error})")));
                    }
                }
            }
        };
        match tokio::time::timeout(FORWARD_TIMEOUT, collect).await {
            Ok(Ok(())) => {
                let mut send = send;
                let _ = send.finish();
                Ok(head)
            }
            Ok(Err(error)) => Err(error),
            Err(_) => Err(unreachable(node, "not answering in time")),
        }
    }
}

/// Sends `call` to `node` and reads the head of its answer.
pub(super) async fn exchange(
    core: &NodeCore,
    node: &NodeId,
    call: RemoteCall,
) -> Result<Exchange, ApiError> {
    let Some(endpoint) = &core.cluster else {
        return Err(not_clustered(core, node));
    };
    let Some(entry) = member(core, node) else {
        return Err(ApiError::bad_request(
            "unknown_node",
            format!(
                "node {node} is not a member of this node's cluster; \
                 GET /v1/cluster/members lists them"
            ),
        )
        .with_details(json!({ "node": node })));
    };
    if !matches!(entry.state.as_str(), "alive" | "suspect") {
        return Err(unreachable(node, &entry.state));
    }
    let addr: SocketAddr = entry
        .addr
        .parse()
        .map_err(|_| unreachable(node, "at an unreadable address"))?;
    let exchange = dial_and_ask(endpoint, addr, node, call);
    match tokio::time::timeout(FORWARD_TIMEOUT, exchange).await {
        Ok(Ok(exchange)) => Ok(exchange),
        Ok(Err(error)) => {
            tracing::warn!(%node, %error, "forwarded request failed");
            Err(unreachable(node, &format!("unreachable ({error})")))
        }
        Err(_) => Err(unreachable(node, "not answering in time")),
    }
}

async fn dial_and_ask(
    endpoint: &ClusterEndpoint,
    addr: SocketAddr,
    node: &NodeId,
    call: RemoteCall,
) -> Result<Exchange, String> {
    let (_, connection) = endpoint
        .connect(addr, Some(node))
        .await
        .map_err(|error| error.to_string())?;
    let (mut send, mut recv) = connection
        .open_bi()
        .await
        .map_err(|error| error.to_string())?;
    write_frame(&mut send, &Frame::Call(call))
        .await
        .map_err(|error| error.to_string())?;
    match read_frame(&mut recv)
        .await
        .map_err(|error| error.to_string())?
    {
        Frame::Answer(head) if head.more => Ok(Exchange {
            head,
            rest: Some((send, recv)),
        }),
        Frame::Answer(head) => {
            let _ = send.finish();
            Ok(Exchange { head, rest: None })
        }
        other => Err(format!("expected an answer, got {other:?}")),
    }
}

/// Sends `call` to `node` and returns its whole answer.
pub(super) async fn call_node(
    core: &NodeCore,
    node: &NodeId,
    call: RemoteCall,
) -> Result<RemoteAnswer, ApiError> {
    exchange(core, node, call).await?.whole(node).await
}

pub(super) fn not_clustered(core: &NodeCore, node: &NodeId) -> ApiError {
    SessionError::UnknownNode(node.to_string(), core.node_id.clone()).into()
}

/// Answers a call forwarded by `from` (run by the relay server for a stream that starts with a
/// `Call` frame): through this node's router as its admin, whole, or streamed frame by frame
/// when the response is `text/event-stream`. `core` is `None` once the node is going away.
pub async fn serve_call(
    core: Option<(Arc<NodeCore>, String)>,
    from: &NodeId,
    call: RemoteCall,
    send: &mut quinn::SendStream,
) -> Result<(), RelayError> {
    let Some((core, admin_token)) = core else {
        let body = br#"{"error":{"code":"shutting_down","message":"the node is not serving","details":{}}}"#;
        return write_frame(
            send,
            &Frame::Answer(RemoteAnswer::whole(503, body.to_vec())),
        )
        .await;
    };
    let request = Request::builder()
        .method(call.method.as_str())
        .uri(call.uri.as_str())
        .header(header::AUTHORIZATION, format!("Bearer {admin_token}"))
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::HOST, "localhost")
        .header(FORWARDED, from.as_str())
        .extension(ForwardedCall)
        .body(Body::from(call.body));
    let request = match request {
        Ok(request) => request,
        Err(error) => {
            let body = json!({"error": {
                "code": "invalid_forward",
                "message": format!("the forwarded request is malformed: {error}"),
                "details": {},
            }});
            let answer = RemoteAnswer::whole(400, body.to_string().into_bytes());
            return write_frame(send, &Frame::Answer(answer)).await;
        }
    };
    // A forwarded call is one REST session request (no MCP stream that a stop token would have
    // to end), so a token of its own is enough.
    let stop = tokio_util::sync::CancellationToken::new();
    let response = match crate::http::router(core, stop).oneshot(request).await {
        Ok(response) => response,
        Err(never) => match never {},
    };
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get(header::RETRY_AFTER)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse().ok());
    let streamed = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("text/event-stream"));
    let piece = |body: Vec<u8>, more: bool| {
        Frame::Answer(RemoteAnswer {
            status,
            body,
            more,
            retry_after,
        })
    };
    if !streamed {
        let body = match axum::body::to_bytes(response.into_body(), MAX_WHOLE_ANSWER_BYTES).await {
            Ok(body) => body,
            Err(error) => {
                let body = json!({"error": {
                    "code": "answer_too_large",
                    "message": format!(
                        "the answer could not be read in full: {error}; ask for a smaller page \
                         (`limit`)"
                    ),
                    "details": {"max_bytes": MAX_WHOLE_ANSWER_BYTES},
                }});
                let answer = RemoteAnswer::whole(502, body.to_string().into_bytes());
                return write_frame(send, &Frame::Answer(answer)).await;
            }
        };
        if body.len() <= MAX_FORWARD_BYTES {
            return write_frame(send, &piece(body.to_vec(), false)).await;
        }
        // Too large for one frame: a head and pieces, as a streamed answer goes.
        write_frame(send, &piece(Vec::new(), true)).await?;
        for part in body.chunks(MAX_FORWARD_BYTES) {
            write_frame(send, &piece(part.to_vec(), true)).await?;
        }
        return write_frame(send, &piece(Vec::new(), false)).await;
    }
    write_frame(send, &piece(Vec::new(), true)).await?;
    let mut body = response.into_body().into_data_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|error| RelayError::Io(format!("the answer broke: {error}")))?;
        for part in chunk.chunks(MAX_FORWARD_BYTES) {
            write_frame(send, &piece(part.to_vec(), true)).await?;
        }
    }
    write_frame(send, &piece(Vec::new(), false)).await
}

/// The owner's answer to a follow, streamed through to the client.
pub struct RemoteFollow {
    node: NodeId,
    exchange: Exchange,
    downs: troupe_actors::event::Subscription,
}

impl RemoteFollow {
    pub(super) fn new(
        node: NodeId,
        exchange: Exchange,
        downs: troupe_actors::event::Subscription,
    ) -> Self {
        Self {
            node,
            exchange,
            downs,
        }
    }

    /// The response: the owner's status and its event stream, chunk by chunk as it comes. When
    /// the stream breaks, or this node sees the owner go down, it ends with an `error` event
    /// (`{"code": "owner_unreachable", "node", "message"}`) instead of an `end`.
    pub fn into_response(self) -> Response {
        let Self {
            node,
            exchange,
            mut downs,
        } = self;
        let Some((send, mut recv)) = exchange.rest else {
            return exchange.head.into_response(&node);
        };
        let status = StatusCode::from_u16(exchange.head.status).unwrap_or(StatusCode::BAD_GATEWAY);
        let (chunks, receiver) =
            tokio::sync::mpsc::channel::<Result<Bytes, Infallible>>(STREAM_BUFFER);
        let owner = node.clone();
        tokio::spawn(async move {
            // Holding the send side keeps the stream open; dropping both ends it on the owner.
            let _send = send;
            let broken = |why: String| {
                let data = json!({
                    "code": "owner_unreachable",
                    "node": owner,
                    "message": format!("the output stream from node {owner} broke: {why}"),
                });
                Bytes::from(format!("event: error\ndata: {data}\n\n"))
            };
            loop {
                tokio::select! {
                    () = chunks.closed() => return,
                    frame = read_frame(&mut recv) => match frame {
                        Ok(Frame::Answer(piece)) => {
                            if !piece.body.is_empty()
                                && chunks.send(Ok(Bytes::from(piece.body))).await.is_err()
                            {
                                return;
                            }
                            if !piece.more {
                                return;
                            }
                        }
                        Ok(other) => {
                            let _ = chunks.send(Ok(broken(format!("unexpected frame {other:?}")))).await;
                            return;
                        }
                        Err(error) => {
                            let _ = chunks.send(Ok(broken(error.to_string()))).await;
                            return;
                        }
                    },
                    down = downs.recv() => match down {
                        Some(troupe_actors::event::Delivery::Event(event)) => {
                            if let EventData::NodeDown(member) = &event.data
                                && member.node == owner
                            {
                                let _ = chunks.send(Ok(broken("the node is down".into()))).await;
                                return;
                            }
                        }
                        Some(troupe_actors::event::Delivery::Lagged(_)) => {}
                        // The bus stopped: this node is shutting down.
                        None => return,
                    },
                }
            }
        });
        let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(receiver));
        let mut response = (status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        if let Ok(value) = HeaderValue::from_str(node.as_str()) {
            headers.insert("x-troupe-node", value);
        }
        response
    }
}
