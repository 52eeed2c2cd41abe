//! Remote work: the one routing API every front end (REST, MCP, and the CLI through REST) uses
//! for sessions, so a session request reaches the node that owns (or should run) the session.
//!
//! - [`spawn`]: a request with `node` naming another member, or a `placement` that chooses one
//!   ([`placement`]: least loaded with room among the nodes carrying the placement labels, this
//!   node winning ties), is forwarded there; otherwise it runs here.
//! - [`get`], [`cancel`], [`output`], [`follow`]: a session this node does not have, whose owner
//!   it knows ([`SessionOwners`]: from the owner's relayed events and answers), is asked of it;
//!   one whose owner it does not know is looked for on every member that is up first;
//!   `follow` streams the owner's Server-Sent Events through.
//! - [`list_cluster`]: this node's listing merged with every member's; the open sessions of a
//!   member that cannot be reached are shown from their last known record as `unreachable`.
//!
//! A forwarded request (module `forward`) runs on the owner through its own router as its admin
//! (the caller's role was checked here), marked so it is never forwarded again
//! ([`Hop::Forwarded`]).
//! An owner that is down or does not answer is a 503 `owner_unreachable` naming the node, with
//! the last known record of the session in `details.session` when there is one; nothing is
//! guessed. Nothing here parses a request twice: the front ends parse it once, at their edge.

mod forward;
mod keys;
mod owners;
pub mod placement;

use std::collections::BTreeMap;
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode};
use serde_json::{Value, json};
use troupe_actors::event::{EventFilter, EventKind, KindPattern};
use troupe_actors::ids::{NodeId, SessionId};
use troupe_actors::session::{CancelError, SessionState};

use forward::{Exchange, call_node, exchange, not_clustered};
pub use forward::{
    FORWARDED, ForwardedCall, MAX_FORWARD_BYTES, RemoteAnswer, RemoteCall, RemoteFollow, serve_call,
};
pub use keys::{KeyRoutes, MAX_KEY_ROUTES};
pub use owners::{KnownSession, MAX_KNOWN_SESSIONS, OwnersTable, RecordSnapshot, SessionOwners};
use placement::{Candidate, PlacementError};

use crate::http::ApiError;
use crate::node::NodeCore;
use crate::session::request::{Placement, SessionRequest};
use crate::session::{SessionError, SessionView};
use crate::store::OutputPage;

/// Whether a request may be forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hop {
    /// It came from a client: it goes where the session is.
    Client,
    /// Another node forwarded it here: it is answered here, never forwarded again.
    Forwarded,
}

impl Hop {
    /// From a request's headers.
    pub fn of(headers: &HeaderMap) -> Self {
        if headers.contains_key(FORWARDED) {
            Self::Forwarded
        } else {
            Self::Client
        }
    }
}

/// Where a session operation was answered.
#[derive(Debug)]
pub enum Routed<T> {
    /// Here: the local result.
    Here(T),
    /// By the owner (or the chosen node).
    There {
        /// That node.
        node: NodeId,
        /// Its answer.
        answer: RemoteAnswer,
    },
}

/// Adds what this node last knew of session `id` to an `owner_unreachable` error.
fn with_last_known(core: &NodeCore, id: &SessionId, mut error: ApiError) -> ApiError {
    if error.code == "owner_unreachable"
        && let Some(known) = core
            .sessions_owners
            .as_ref()
            .and_then(|owners| owners.known(id))
        && let Some(Value::Object(details)) = &mut error.details
    {
        details.insert("session".into(), known.to_json());
    }
    error
}

/// This node's own load (exact, from its session counters) as a placement candidate.
fn own_candidate(core: &NodeCore) -> Candidate {
    let stats = core.sessions.stats();
    let count = |counter: &std::sync::atomic::AtomicU64| {
        u32::try_from(counter.load(std::sync::atomic::Ordering::Relaxed)).unwrap_or(u32::MAX)
    };
    let limit = |value: usize| u32::try_from(value).unwrap_or(u32::MAX);
    Candidate {
        node: core.node_id.clone(),
        load: troupe_actors::cluster::NodeLoad {
            running: count(&stats.running),
            queued: count(&stats.queued),
            max_concurrent: limit(core.config.sessions.max_concurrent),
            queue_capacity: limit(core.config.sessions.queue_capacity),
        },
        labels: core.config.cluster.labels.clone(),
    }
}

/// Members that are alive and gossiped their metadata.
fn member_candidates(core: &NodeCore) -> Vec<Candidate> {
    if core.cluster.is_none() {
        return Vec::new();
    }
    core.tree
        .registry
        .tables()
        .members()
        .into_iter()
        .filter(|member| member.state == "alive")
        .filter_map(|member| {
            let meta = member.meta.as_ref()?;
            (!meta.leaving).then(|| Candidate {
                node: member.node.clone(),
                load: meta.load,
                labels: meta.labels.clone(),
            })
        })
        .collect()
}

/// Where a placement puts a new session.
fn place(core: &NodeCore, placement: &Placement) -> Result<NodeId, ApiError> {
    placement::choose(
        &own_candidate(core),
        &member_candidates(core),
        &placement.labels,
    )
    .map_err(|error| {
        let message = error.to_string();
        match error {
            PlacementError::NoMatch {
                unmatched,
                constraints,
                nodes,
            } => ApiError::new(StatusCode::CONFLICT, "no_matching_node", message).with_details(
                json!({
                    "unmatched": unmatched,
                    "constraints": constraints,
                    "nodes": nodes.into_iter().map(|(node, labels)| (node.to_string(), labels))
                        .collect::<BTreeMap<_, _>>(),
                }),
            ),
            PlacementError::NoRoom { matching } => ApiError::unavailable("no_capacity", message)
                .with_details(json!({
                    "constraints": placement.labels,
                    "nodes": matching.into_iter().map(|(node, load)| (node.to_string(), json!({
                        "running": load.running,
                        "queued": load.queued,
                        "max_concurrent": load.max_concurrent,
                        "queue_capacity": load.queue_capacity,
                    }))).collect::<BTreeMap<_, _>>(),
                }))
                .retry_after(Duration::from_secs(1)),
        }
    })
}

/// Spawns a session where the request says: on `node`, where `placement` chooses, or here.
pub async fn spawn(
    core: &NodeCore,
    mut request: SessionRequest,
    hop: Hop,
) -> Result<Routed<SessionView>, ApiError> {
    request.check_target().map_err(SessionError::from)?;
    let target = match (&request.node, &request.placement) {
        (Some(node), _) => {
            let node = NodeId::new(node).map_err(|_| {
                ApiError::bad_request("invalid_session", format!("invalid node {node:?}"))
            })?;
            Some(node)
        }
        (None, Some(placement)) if hop == Hop::Client => {
            match keyed_target(core, &request).await? {
                Some(node) => Some(node),
                None => Some(place(core, placement)?),
            }
        }
        (None, _) => None,
    };
    let node = match target {
        Some(node) if node != core.node_id => node,
        _ => return Ok(Routed::Here(core.sessions.spawn(request).await?)),
    };
    if hop == Hop::Forwarded {
        return Err(ApiError::bad_request(
            "unknown_node",
            format!(
                "a request forwarded to node {} names node {node}; it is not forwarded twice",
                core.node_id
            ),
        ));
    }
    if core.cluster.is_none() {
        return Err(not_clustered(core, &node));
    }
    if let Some(key) = &request.idempotency_key {
        core.key_routes.remember(key, &node);
    }
    request.node = Some(node.to_string());
    request.placement = None;
    let body = serde_json::to_vec(&request).map_err(|error| {
        ApiError::bad_request(
            "invalid_session",
            format!("the request cannot be forwarded: {error}"),
        )
    })?;
    let answer = call_node(
        core,
        &node,
        RemoteCall {
            method: "POST".into(),
            uri: "/v1/sessions".into(),
            body,
        },
    )
    .await?;
    observe(core, &answer);
    Ok(Routed::There { node, answer })
}

/// Where a placed spawn with an idempotency key must go whatever the loads say now: the node
/// this node forwarded that key to before, or this node when its store holds the key. `None`:
/// the key is new here (or there is none), so placement chooses.
async fn keyed_target(
    core: &NodeCore,
    request: &SessionRequest,
) -> Result<Option<NodeId>, ApiError> {
    let Some(key) = &request.idempotency_key else {
        return Ok(None);
    };
    if let Some(node) = core.key_routes.get(key) {
        return Ok(Some(node));
    }
    if core.sessions.holds_key(key).await? {
        return Ok(Some(core.node_id.clone()));
    }
    Ok(None)
}

/// Learns the owner (and record) of a session from an answer that carries one.
fn observe(core: &NodeCore, answer: &RemoteAnswer) {
    if let (Some(owners), Ok(record)) = (&core.sessions_owners, answer.json()) {
        owners.observe_json(&core.node_id, &record);
    }
}

/// Asks the owner of `id` (a session this node does not have) with `call`; `missing` is the
/// local error to return when no other node is known to own it.
async fn ask_owner(
    core: &NodeCore,
    id: &SessionId,
    hop: Hop,
    missing: SessionError,
    call: RemoteCall,
) -> Result<(NodeId, Exchange), ApiError> {
    let owner = match hop {
        Hop::Client => match core
            .sessions_owners
            .as_ref()
            .and_then(|owners| owners.owner(id))
        {
            Some(owner) => Some(owner),
            None => search_owner(core, id).await?,
        },
        Hop::Forwarded => None,
    };
    let Some(owner) = owner else {
        return Err(missing.into());
    };
    match exchange(core, &owner, call).await {
        Ok(exchange) => Ok((owner, exchange)),
        // Its owner is known (from the event log) but not seen since this node started: it
        // is down, or has not rejoined yet.
        Err(error) if error.code == "unknown_node" => Err(with_last_known(
            core,
            id,
            forward::unreachable(&owner, "not seen since this node started"),
        )),
        Err(error) => Err(with_last_known(core, id, error)),
    }
}

/// Finds the owner of session `id`, which this node has not heard of (it was spawned before
/// this node last started, or its events were pushed out of the owners table): asks every
/// member that is up. `None` when none has it and none is down; a 503 `owner_unreachable`
/// naming the members that could not be asked when none of the others has it, since one of
/// them may be its owner.
async fn search_owner(core: &NodeCore, id: &SessionId) -> Result<Option<NodeId>, ApiError> {
    if core.cluster.is_none() {
        return Ok(None);
    }
    let members: Vec<_> = core
        .tree
        .registry
        .tables()
        .members()
        .into_iter()
        .filter(|member| member.node != core.node_id && member.state != "left")
        .collect();
    let asks = members.iter().map(|member| async move {
        let call = RemoteCall {
            method: "GET".into(),
            uri: format!("/v1/sessions/{id}"),
            body: Vec::new(),
        };
        (&member.node, call_node(core, &member.node, call).await)
    });
    let mut unreachable = Vec::new();
    for (node, answer) in futures::future::join_all(asks).await {
        match answer {
            Ok(answer) if answer.status == 200 => {
                observe(core, &answer);
                return Ok(Some(node.clone()));
            }
            Ok(answer) if answer.status == 404 => {}
            // Busy, stopping, failing: it did not say it has no such session.
            Ok(answer) => {
                tracing::info!(%node, status = answer.status, %id, "a member did not answer whether it has a session");
                unreachable.push(node.clone());
            }
            Err(error) if error.code == "owner_unreachable" => unreachable.push(node.clone()),
            Err(error) => return Err(error),
        }
    }
    match unreachable.as_slice() {
        [] => Ok(None),
        [first, ..] => Err(ApiError::unavailable(
            "owner_unreachable",
            format!(
                "session {id} is not on this node nor on the members that answered; {} cannot \
                 be reached (or did not answer) and may own it: retry once it is back",
                unreachable
                    .iter()
                    .map(NodeId::as_str)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )
        .with_details(json!({"node": first, "nodes": unreachable}))
        .retry_after(Duration::from_secs(5))),
    }
}

async fn ask_owner_whole<T>(
    core: &NodeCore,
    id: &SessionId,
    hop: Hop,
    missing: SessionError,
    method: &str,
    uri: String,
) -> Result<Routed<T>, ApiError> {
    let call = RemoteCall {
        method: method.into(),
        uri,
        body: Vec::new(),
    };
    let (node, exchange) = ask_owner(core, id, hop, missing, call).await?;
    let answer = exchange
        .whole(&node)
        .await
        .map_err(|error| with_last_known(core, id, error))?;
    Ok(Routed::There { node, answer })
}

/// One session: here, or asked of its owner.
pub async fn get(
    core: &NodeCore,
    id: &SessionId,
    hop: Hop,
) -> Result<Routed<SessionView>, ApiError> {
    match core.sessions.get(id).await {
        Err(missing @ SessionError::NotFound(_)) => {
            let routed =
                ask_owner_whole(core, id, hop, missing, "GET", format!("/v1/sessions/{id}"))
                    .await?;
            if let Routed::There { answer, .. } = &routed {
                observe(core, answer);
            }
            Ok(routed)
        }
        other => Ok(Routed::Here(other?)),
    }
}

/// Cancels a session: here, or through its owner.
pub async fn cancel(
    core: &NodeCore,
    id: &SessionId,
    hop: Hop,
) -> Result<Routed<SessionView>, ApiError> {
    match core.sessions.cancel(id).await {
        Err(missing @ SessionError::Cancel(CancelError::NotFound(_))) => {
            ask_owner_whole(
                core,
                id,
                hop,
                missing,
                "DELETE",
                format!("/v1/sessions/{id}"),
            )
            .await
        }
        other => Ok(Routed::Here(other?)),
    }
}

/// A page of a session's output: here, or from its owner.
pub async fn output(
    core: &NodeCore,
    id: &SessionId,
    offset: u64,
    limit: usize,
    hop: Hop,
) -> Result<Routed<OutputPage>, ApiError> {
    match core.sessions.output(id, offset, limit).await {
        Err(missing @ SessionError::NotFound(_)) => {
            let uri = format!("/v1/sessions/{id}/output?offset={offset}&limit={limit}");
            ask_owner_whole(core, id, hop, missing, "GET", uri).await
        }
        other => Ok(Routed::Here(other?)),
    }
}

/// A session's output followed live: here, or streamed from its owner.
pub enum Followed<S> {
    /// The local lines.
    Here(S),
    /// The owner's Server-Sent Events.
    There(Box<RemoteFollow>),
}

/// Follows a session's output from line `offset`: here, or streamed from its owner.
pub async fn follow(
    core: &NodeCore,
    id: &SessionId,
    offset: u64,
    hop: Hop,
) -> Result<
    Followed<
        impl futures::Stream<Item = Result<crate::store::OutputLine, SessionError>> + Send + 'static,
    >,
    ApiError,
> {
    match core.sessions.follow(id, offset).await {
        Err(missing @ SessionError::NotFound(_)) => {
            // Subscribe before asking, so the owner's node.down cannot slip between the two.
            let downs = core.tree.events.subscribe(EventFilter {
                kinds: vec![KindPattern::Exact(EventKind::NodeDown)],
                nodes: vec![core.node_id.clone()],
                ..EventFilter::default()
            });
            let call = RemoteCall {
                method: "GET".into(),
                uri: format!("/v1/sessions/{id}/output?follow=true&offset={offset}"),
                body: Vec::new(),
            };
            let (node, exchange) = ask_owner(core, id, hop, missing, call).await?;
            Ok(Followed::There(Box::new(RemoteFollow::new(
                node, exchange, downs,
            ))))
        }
        other => Ok(Followed::Here(other?)),
    }
}

/// The filters of a cluster listing, as `GET /v1/sessions` takes them (`state`, `kind`,
/// `label=KEY=VALUE`, `limit`), already validated by the caller.
#[derive(Debug, Clone, Default)]
pub struct ListFilters {
    /// `state` values.
    pub states: Vec<SessionState>,
    /// `kind` values.
    pub kinds: Vec<String>,
    /// `label` values.
    pub labels: BTreeMap<String, String>,
    /// Page size per node.
    pub limit: usize,
}

impl ListFilters {
    fn query(&self) -> String {
        let mut query = form_urlencoded::Serializer::new(String::new());
        for state in &self.states {
            query.append_pair("state", state.as_str());
        }
        for kind in &self.kinds {
            query.append_pair("kind", kind);
        }
        for (key, value) in &self.labels {
            query.append_pair("label", &format!("{key}={value}"));
        }
        query.append_pair("limit", &self.limit.to_string());
        query.finish()
    }

    /// Whether a last known record matches (its last state for `state`; unknown labels match
    /// no label filter).
    fn matches(&self, known: &KnownSession) -> bool {
        let kind = serde_json::to_value(known.kind).unwrap_or_default();
        (self.states.is_empty() || self.states.contains(&known.state))
            && (self.kinds.is_empty() || self.kinds.iter().any(|k| kind == k.as_str()))
            && (self.labels.is_empty()
                || known.labels.as_ref().is_some_and(|labels| {
                    self.labels
                        .iter()
                        .all(|(key, value)| labels.get(key) == Some(value))
                }))
    }
}

/// Merges this node's listing (`local`, records in the API's JSON, and the cursor its page
/// ended with) with every member's, newest first: `{"sessions", "next_cursor": null, "nodes":
/// {ID: "ok" | "unreachable" | "answered STATUS"}, "next_cursors": {ID: C}, "complete"}`. A
/// node whose own listing went on past its page (its newest `limit`, or the sessions one page
/// examines) is in `next_cursors` with the cursor to go on from on that node; `complete` is
/// true only when no node is there and every node answered. The open sessions of a member that
/// cannot be reached are listed from their last known record.
pub async fn list_cluster(
    core: &NodeCore,
    filters: &ListFilters,
    local: Vec<Value>,
    local_cursor: Option<String>,
) -> Value {
    let mut sessions = local;
    let mut nodes = serde_json::Map::new();
    nodes.insert(core.node_id.to_string(), "ok".into());
    let mut next_cursors = serde_json::Map::new();
    if let Some(cursor) = local_cursor {
        next_cursors.insert(core.node_id.to_string(), cursor.into());
    }
    let members = if core.cluster.is_some() {
        core.tree.registry.tables().members()
    } else {
        Vec::new()
    };
    let uri = format!("/v1/sessions?{}", filters.query());
    let calls = members.iter().map(|member| {
        let call = RemoteCall {
            method: "GET".into(),
            uri: uri.clone(),
            body: Vec::new(),
        };
        async move { (member, call_node(core, &member.node, call).await) }
    });
    for (member, answer) in futures::future::join_all(calls).await {
        match answer.as_ref().map(RemoteAnswer::json) {
            Ok(Ok(body)) => {
                let listed = body["sessions"].as_array().cloned().unwrap_or_default();
                if let Some(owners) = &core.sessions_owners {
                    for record in &listed {
                        owners.observe_json(&core.node_id, record);
                    }
                }
                sessions.extend(listed);
                nodes.insert(member.node.to_string(), "ok".into());
                if let Some(cursor) = body["next_cursor"].as_str() {
                    next_cursors.insert(member.node.to_string(), cursor.into());
                }
            }
            Ok(Err(_)) => {
                let status = answer.map(|answer| answer.status).unwrap_or_default();
                nodes.insert(member.node.to_string(), format!("answered {status}").into());
            }
            Err(_) => {
                nodes.insert(member.node.to_string(), "unreachable".into());
                if let Some(owners) = &core.sessions_owners {
                    sessions.extend(
                        owners
                            .open_sessions_of(&member.node)
                            .iter()
                            .filter(|known| filters.matches(known))
                            .map(KnownSession::to_json),
                    );
                }
            }
        }
    }
    // Owners this node heard of that are not members now (down before this node started, so
    // its member view never had them): their open sessions are shown as unreachable too, not
    // left out.
    if let Some(owners) = &core.sessions_owners {
        for owner in owners.open_owners() {
            if owner == core.node_id || nodes.contains_key(owner.as_str()) {
                continue;
            }
            nodes.insert(owner.to_string(), "unreachable".into());
            sessions.extend(
                owners
                    .open_sessions_of(&owner)
                    .iter()
                    .filter(|known| filters.matches(known))
                    .map(KnownSession::to_json),
            );
        }
    }
    sessions.sort_by(|a, b| {
        b["created_at"]
            .as_str()
            .unwrap_or("")
            .cmp(a["created_at"].as_str().unwrap_or(""))
    });
    let complete = next_cursors.is_empty() && nodes.values().all(|status| status == "ok");
    json!({
        "sessions": sessions,
        "next_cursor": null,
        "nodes": nodes,
        "next_cursors": next_cursors,
        "complete": complete,
    })
}
