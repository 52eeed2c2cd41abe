//! Remote work: session requests routed to the node that owns (or should run) the session.
//!
//! The HTTP session routes pass through [`route_sessions`] after authentication:
//! - `POST /v1/sessions` with `node` naming another member, or `placement: "least_loaded"`
//!   choosing another member (the one with room and the lowest load ratio from its gossiped
//!   metadata, this node winning ties), is forwarded to that member;
//! - `GET /v1/sessions/{id}`, `GET …/output` and `DELETE /v1/sessions/{id}` of a session this
//!   node does not have but knows the owner of (from the owner's relayed `session.queued`
//!   event) are forwarded to the owner;
//! - `GET /v1/sessions?scope=cluster` merges the listings of every member that is up.
//!
//! A forwarded request travels as one `Call` frame on a new QUIC stream; the owner runs it
//! through its own router as its admin (the caller's role was checked here) with the header
//! `x-troupe-forwarded`, which stops it from being forwarded again, and answers with the status
//! and body. An owner that is down or unreachable is a 503 `owner_unreachable` naming the node.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use tower::ServiceExt;
use troupe_actors::event::{EventFilter, EventKind, KindPattern};
use troupe_actors::ids::{NodeId, SessionId};
use troupe_actors::registry::MemberEntry;

use super::endpoint::ClusterEndpoint;
use super::relay::{Frame, read_frame, write_frame};
use crate::http::ApiError;
use crate::node::NodeCore;

/// The header on forwarded requests (its value: the forwarding node).
pub const FORWARDED: &str = "x-troupe-forwarded";
/// Largest forwarded request or answer body.
pub const MAX_FORWARD_BYTES: usize = 4 * 1024 * 1024 - 1024;
/// How long a forwarded request may take.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(30);
/// Sessions of other nodes remembered with their owner.
const MAX_KNOWN_SESSIONS: usize = 100_000;

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

/// The owner's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteAnswer {
    /// HTTP status.
    pub status: u16,
    /// JSON body.
    pub body: Vec<u8>,
}

/// What this node knows of another node's session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnownSession {
    /// The owner.
    pub node: NodeId,
    /// True once its end was relayed.
    pub ended: bool,
}

#[derive(Default)]
struct OwnersTable {
    known: HashMap<SessionId, KnownSession>,
    order: VecDeque<SessionId>,
}

/// Which node owns which session of other nodes (and whether it ended), learned from relayed
/// `session.queued` and end events. Written by one task only; at most 100,000 sessions (the
/// oldest are forgotten first).
#[derive(Clone, Default)]
pub struct SessionOwners {
    inner: Arc<Mutex<OwnersTable>>,
}

impl SessionOwners {
    fn table(&self) -> std::sync::MutexGuard<'_, OwnersTable> {
        self.inner
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// The owner of `id`, when another node announced it.
    pub fn owner(&self, id: &SessionId) -> Option<NodeId> {
        self.table().known.get(id).map(|known| known.node.clone())
    }

    /// Sessions of `node` that had not ended when last heard of, oldest first.
    pub fn open_sessions_of(&self, node: &NodeId) -> Vec<SessionId> {
        let table = self.table();
        table
            .order
            .iter()
            .filter(|id| {
                table
                    .known
                    .get(*id)
                    .is_some_and(|known| known.node == *node && !known.ended)
            })
            .cloned()
            .collect()
    }

    fn queued(&self, id: SessionId, node: NodeId) {
        let mut table = self.table();
        let known = KnownSession { node, ended: false };
        if table.known.insert(id.clone(), known).is_none() {
            table.order.push_back(id);
            if table.order.len() > MAX_KNOWN_SESSIONS
                && let Some(oldest) = table.order.pop_front()
            {
                table.known.remove(&oldest);
            }
        }
    }

    fn ended(&self, id: &SessionId) {
        if let Some(known) = self.table().known.get_mut(id) {
            known.ended = true;
        }
    }

    /// Follows the bus: `session.queued` of another node records its owner, its end events
    /// mark it ended.
    pub fn follow(&self, core: &NodeCore) {
        let filter = EventFilter {
            kinds: [
                EventKind::SessionQueued,
                EventKind::SessionSucceeded,
                EventKind::SessionFailed,
                EventKind::SessionCancelled,
                EventKind::SessionTimedOut,
                EventKind::SessionInterrupted,
            ]
            .into_iter()
            .map(KindPattern::Exact)
            .collect(),
            ..EventFilter::default()
        };
        let mut events = core.tree.events.subscribe(filter);
        let this = core.node_id.clone();
        let owners = self.clone();
        tokio::spawn(async move {
            while let Some(delivery) = events.recv().await {
                if let troupe_actors::event::Delivery::Event(event) = delivery
                    && *event.node() != this
                    && let Some(session) = &event.session
                {
                    if event.data.kind() == EventKind::SessionQueued {
                        owners.queued(session.clone(), event.node().clone());
                    } else {
                        owners.ended(session);
                    }
                }
            }
        });
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

fn unreachable(node: &NodeId, why: &str) -> ApiError {
    ApiError::unavailable(
        "owner_unreachable",
        format!("node {node} is {why}; its sessions cannot be reached until it is back"),
    )
    .with_details(serde_json::json!({ "node": node }))
    .retry_after(Duration::from_secs(5))
}

/// Forwards `call` to `node` and returns its answer as a response.
async fn forward(
    core: &NodeCore,
    endpoint: &ClusterEndpoint,
    node: &NodeId,
    call: RemoteCall,
) -> Result<Response, ApiError> {
    let answer = call_node(core, endpoint, node, call).await?;
    let mut response = (
        StatusCode::from_u16(answer.status).unwrap_or(StatusCode::BAD_GATEWAY),
        answer.body,
    )
        .into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Ok(value) = HeaderValue::from_str(node.as_str()) {
        response.headers_mut().insert("x-troupe-node", value);
    }
    Ok(response)
}

async fn call_node(
    core: &NodeCore,
    endpoint: &ClusterEndpoint,
    node: &NodeId,
    call: RemoteCall,
) -> Result<RemoteAnswer, ApiError> {
    let Some(entry) = member(core, node) else {
        return Err(ApiError::bad_request(
            "unknown_node",
            format!("node {node} is not a member of this node's cluster"),
        )
        .with_details(serde_json::json!({ "node": node })));
    };
    if !matches!(entry.state.as_str(), "alive" | "suspect") {
        return Err(unreachable(node, &entry.state));
    }
    let addr: SocketAddr = entry
        .addr
        .parse()
        .map_err(|_| unreachable(node, "at an unreadable address"))?;
    let exchange = async {
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
        let _ = send.finish();
        match read_frame(&mut recv)
            .await
            .map_err(|error| error.to_string())?
        {
            Frame::Answer(answer) => Ok(answer),
            other => Err(format!("expected an answer, got {other:?}")),
        }
    };
    match tokio::time::timeout(FORWARD_TIMEOUT, exchange).await {
        Ok(Ok(answer)) => Ok(answer),
        Ok(Err(error)) => {
            tracing::warn!(%node, %error, "forwarded request failed");
            Err(unreachable(node, &format!("unreachable ({error})")))
        }
        Err(_) => Err(unreachable(node, "not answering in time")),
    }
}

/// Runs a forwarded call through this node's router, as its admin.
pub async fn answer(
    core: Arc<NodeCore>,
    admin_token: &str,
    from: &NodeId,
    call: RemoteCall,
) -> RemoteAnswer {
    let request = Request::builder()
        .method(call.method.as_str())
        .uri(call.uri.as_str())
        .header(header::AUTHORIZATION, format!("Bearer {admin_token}"))
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::HOST, "localhost")
        .header(FORWARDED, from.as_str())
        .body(Body::from(call.body));
    let request = match request {
        Ok(request) => request,
        Err(error) => {
            return RemoteAnswer {
                status: 400,
                body: format!(
                    r#"{{"error":{{"code":"invalid_forward","message":"{}","details":{{}}}}}}"#,
                    error.to_string().replace('"', "'")
                )
                .into_bytes(),
            };
        }
    };
    // A forwarded call is one REST session request answered in full (no MCP stream that a stop
    // token would have to end), so a token of its own is enough.
    let stop = tokio_util::sync::CancellationToken::new();
    let response = match crate::http::router(core, stop).oneshot(request).await {
        Ok(response) => response,
        Err(never) => match never {},
    };
    let status = response.status().as_u16();
    let body = axum::body::to_bytes(response.into_body(), MAX_FORWARD_BYTES)
        .await
        .map(|bytes| bytes.to_vec())
        .unwrap_or_else(|error| {
            format!(
                r#"{{"error":{{"code":"answer_too_large","message":"{}","details":{{}}}}}}"#,
                error.to_string().replace('"', "'")
            )
            .into_bytes()
        });
    RemoteAnswer { status, body }
}

/// Chooses where a `least_loaded` session runs: this node or a member that is alive and has
/// room, lowest `(running + queued) / max_concurrent` first; this node wins ties.
fn least_loaded(core: &NodeCore) -> NodeId {
    let own = core
        .tree
        .session_manager
        .as_ref()
        .map(|sessions| {
            let load = |c: &std::sync::atomic::AtomicU64| {
                c.load(std::sync::atomic::Ordering::Relaxed) as f64
            };
            (load(&sessions.stats.running) + load(&sessions.stats.queued))
                / (core.config.sessions.max_concurrent.max(1) as f64)
        })
        .unwrap_or(f64::MAX);
    let mut best = (own, core.node_id.clone());
    for member in core.tree.registry.tables().members() {
        let Some(meta) = &member.meta else { continue };
        if member.state != "alive" || !meta.load.has_room() {
            continue;
        }
        if meta.load.ratio() < best.0 {
            best = (meta.load.ratio(), member.node.clone());
        }
    }
    best.1
}

fn session_path(path: &str) -> Option<(&str, bool)> {
    let rest = path.strip_prefix("/v1/sessions/")?;
    match rest.split_once('/') {
        None => Some((rest, false)),
        Some((id, "output")) => Some((id, true)),
        Some(_) => None,
    }
}

/// The routing middleware of the session routes (see the module documentation).
pub async fn route_sessions(
    State(core): State<Arc<NodeCore>>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let Some(endpoint) = core.cluster.clone() else {
        return Ok(next.run(request).await);
    };
    if request.headers().contains_key(FORWARDED) {
        return Ok(next.run(request).await);
    }
    let path = request.uri().path().to_owned();
    let query = request.uri().query().map(str::to_owned);
    let method = request.method().clone();
    if path == "/v1/sessions" && method == Method::POST {
        return spawn(&core, &endpoint, request, next).await;
    }
    if path == "/v1/sessions" && method == Method::GET {
        let scope_cluster = form_urlencoded::parse(query.as_deref().unwrap_or("").as_bytes())
            .any(|(key, value)| key == "scope" && value == "cluster");
        if scope_cluster {
            return list_cluster(&core, &endpoint, request, next).await;
        }
        return Ok(next.run(request).await);
    }
    let Some((id, output)) = session_path(&path) else {
        return Ok(next.run(request).await);
    };
    let Ok(id) = SessionId::new(id) else {
        return Ok(next.run(request).await);
    };
    let local = next.run(request).await;
    if local.status() != StatusCode::NOT_FOUND {
        return Ok(local);
    }
    let Some(owner) = core
        .sessions_owners
        .as_ref()
        .and_then(|owners| owners.owner(&id))
    else {
        return Ok(local);
    };
    let follow = form_urlencoded::parse(query.as_deref().unwrap_or("").as_bytes())
        .any(|(key, value)| key == "follow" && value == "true");
    if output && follow {
        return Err(ApiError::bad_request(
            "remote_follow",
            format!(
                "session {id} runs on node {owner}; follow its output with \
                 GET /v1/events?session={id} (events are relayed) or on node {owner}"
            ),
        )
        .with_details(serde_json::json!({ "node": owner })));
    }
    let uri = match &query {
        Some(query) => format!("{path}?{query}"),
        None => path,
    };
    forward(
        &core,
        &endpoint,
        &owner,
        RemoteCall {
            method: method.to_string(),
            uri,
            body: Vec::new(),
        },
    )
    .await
}

async fn spawn(
    core: &NodeCore,
    endpoint: &ClusterEndpoint,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let (parts, body) = request.into_parts();
    let bytes = axum::body::to_bytes(body, core.config.http.max_body_bytes)
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!(
                    "the body is larger than {} bytes (http.max_body_bytes)",
                    core.config.http.max_body_bytes
                ),
            )
        })?;
    let parsed: Option<serde_json::Map<String, serde_json::Value>> =
        serde_json::from_slice(&bytes).ok();
    let target = parsed
        .as_ref()
        .and_then(|body| match (body.get("node"), body.get("placement")) {
            (Some(serde_json::Value::String(node)), _) => NodeId::new(node).ok(),
            (_, Some(serde_json::Value::String(placement))) if placement == "least_loaded" => {
                Some(least_loaded(core))
            }
            _ => None,
        });
    match (target, parsed) {
        (Some(target), Some(mut body)) if target != core.node_id => {
            body.insert("node".into(), serde_json::Value::String(target.to_string()));
            body.remove("placement");
            let body = serde_json::to_vec(&body).unwrap_or_default();
            forward(
                core,
                endpoint,
                &target,
                RemoteCall {
                    method: "POST".into(),
                    uri: "/v1/sessions".into(),
                    body,
                },
            )
            .await
        }
        _ => Ok(next
            .run(Request::from_parts(parts, Body::from(bytes)))
            .await),
    }
}

async fn list_cluster(
    core: &NodeCore,
    endpoint: &ClusterEndpoint,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let (mut parts, body) = request.into_parts();
    let query: Vec<(String, String)> =
        form_urlencoded::parse(parts.uri.query().unwrap_or("").as_bytes())
            .filter(|(key, _)| key != "scope" && key != "cursor")
            .map(|(key, value)| (key.into_owned(), value.into_owned()))
            .collect();
    let query = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(&query)
        .finish();
    let uri = format!("/v1/sessions?{query}");
    parts.uri = uri
        .parse()
        .map_err(|_| ApiError::bad_request("invalid_filter", "the query cannot be rebuilt"))?;
    let local = next.run(Request::from_parts(parts, body)).await;
    if local.status() != StatusCode::OK {
        return Ok(local);
    }
    let local = axum::body::to_bytes(local.into_body(), MAX_FORWARD_BYTES)
        .await
        .ok()
        .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
        .unwrap_or_default();
    let mut sessions: Vec<serde_json::Value> =
        local["sessions"].as_array().cloned().unwrap_or_default();
    let mut nodes = serde_json::Map::new();
    nodes.insert(core.node_id.to_string(), "ok".into());
    let members = core.tree.registry.tables().members();
    let calls = members.iter().map(|member| {
        let uri = uri.clone();
        async move {
            let answer = call_node(
                core,
                endpoint,
                &member.node,
                RemoteCall {
                    method: "GET".into(),
                    uri,
                    body: Vec::new(),
                },
            )
            .await;
            (member, answer)
        }
    });
    for (member, answer) in futures::future::join_all(calls).await {
        match answer {
            Ok(answer) if answer.status == 200 => {
                let body: serde_json::Value =
                    serde_json::from_slice(&answer.body).unwrap_or_default();
                sessions.extend(body["sessions"].as_array().cloned().unwrap_or_default());
                nodes.insert(member.node.to_string(), "ok".into());
            }
            Ok(answer) => {
                nodes.insert(
                    member.node.to_string(),
                    format!("answered {}", answer.status).into(),
                );
            }
            Err(_) => {
                nodes.insert(member.node.to_string(), "unreachable".into());
                // What this node last heard of the member's open sessions.
                if let Some(owners) = &core.sessions_owners {
                    for id in owners.open_sessions_of(&member.node) {
                        sessions.push(serde_json::json!({
                            "id": id,
                            "node": member.node,
                            "state": "unreachable",
                        }));
                    }
                }
            }
        }
    }
    sessions.sort_by(|a, b| {
        b["created_at"]
            .as_str()
            .unwrap_or("")
            .cmp(a["created_at"].as_str().unwrap_or(""))
    });
    Ok(crate::http::ApiJson(serde_json::json!({
        "sessions": sessions,
        "next_cursor": null,
        "nodes": nodes,
    }))
    .into_response())
}
