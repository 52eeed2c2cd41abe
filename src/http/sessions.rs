//! The session API: `POST /v1/sessions` (202 + `Location`), `GET /v1/sessions` (filters and a
//! cursor, or `scope=cluster`), `GET /v1/sessions/{id}`, `GET /v1/sessions/{id}/output` (pages,
//! or `follow=true` as Server-Sent Events until the run ends), `DELETE /v1/sessions/{id}`
//! (cancel, idempotent). In a cluster each goes through the routing of `cluster::remote`, which
//! answers here or asks the node that owns (or should run) the session.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Extension;
use axum::extract::{FromRequestParts, Path, RawQuery, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use troupe_actors::event::SessionKindTag;
use troupe_actors::ids::SessionId;
use troupe_actors::session::{CancelError, StoreError, SubmitError};

use super::{ApiError, ApiJson};
use crate::auth::Principal;
use crate::cluster::remote::{self, Followed, Hop, ListFilters, Routed};
use crate::json::SessionJson;
use crate::node::NodeCore;
use crate::session::request::{RequestError, SessionRequest};
use crate::session::{SessionError, SessionView};
use crate::store::{MAX_OUTPUT_PAGE, MAX_PAGE, SessionQuery};

impl From<SessionError> for ApiError {
    fn from(error: SessionError) -> Self {
        let message = error.to_string();
        match error {
            SessionError::Request(request) => {
                let code = match &request {
                    RequestError::UnknownKind(_) => "unknown_kind",
                    RequestError::ProgramNotAllowed { .. } => "program_not_allowed",
                    RequestError::Workdir(_) => "invalid_workdir",
                    _ => "invalid_session",
                };
                ApiError::bad_request(code, message)
                    .with_details(serde_json::json!({ "field": request.field() }))
            }
            SessionError::Submit(SubmitError::Invalid(spec)) => {
                ApiError::bad_request("invalid_session", message)
                    .with_details(serde_json::json!({ "field": spec.field }))
            }
            SessionError::Submit(SubmitError::QueueFull {
                running,
                queued,
                capacity,
                retry_after,
            }) => ApiError::new(StatusCode::TOO_MANY_REQUESTS, "queue_full", message)
                .with_details(serde_json::json!({
                    "running": running,
                    "queued": queued,
                    "queue_capacity": capacity,
                }))
                .retry_after(retry_after),
            SessionError::Submit(SubmitError::ShuttingDown) => {
                ApiError::unavailable("shutting_down", message)
            }
            SessionError::Submit(SubmitError::Store(_))
            | SessionError::Store(_)
            | SessionError::Cancel(CancelError::Store(_)) => {
                ApiError::unavailable("storage_unavailable", message)
                    .retry_after(Duration::from_secs(1))
            }
            SessionError::NotFound(_) | SessionError::Cancel(CancelError::NotFound(_)) => {
                ApiError::not_found("unknown_session", message)
            }
            SessionError::Cancel(CancelError::Unavailable(_)) => {
                ApiError::unavailable("session_unavailable", message)
                    .retry_after(Duration::from_secs(1))
            }
            SessionError::Unavailable(call) => call.into(),
            SessionError::UnknownNode(..) => ApiError::bad_request("unknown_node", message),
        }
    }
}

/// The session id of a `/v1/sessions/{id}` path: a path that cannot be read (not UTF-8 once
/// decoded) or an id that cannot be one gets the envelope (404 `unknown_session`), as any
/// unknown id does, not axum's plain-text rejection.
pub(super) struct SessionPath(SessionId);

impl<S: Send + Sync> FromRequestParts<S> for SessionPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Path::<String>::from_request_parts(parts, state).await {
            Ok(Path(raw)) => session_id(&raw).map(Self),
            Err(rejection) => Err(ApiError::not_found(
                "unknown_session",
                format!("no such session: {}", rejection.body_text()),
            )),
        }
    }
}

fn session_id(raw: &str) -> Result<SessionId, ApiError> {
    SessionId::new(raw).map_err(|_| {
        ApiError::not_found(
            "unknown_session",
            format!("no session {:?}", raw.chars().take(80).collect::<String>()),
        )
    })
}

fn view_response(status: StatusCode, view: &SessionView) -> Response {
    (
        status,
        ApiJson(serde_json::to_value(SessionJson(view)).unwrap_or_default()),
    )
        .into_response()
}

/// `POST /v1/sessions`
pub(super) async fn create(
    State(core): State<Arc<NodeCore>>,
    headers: HeaderMap,
    ApiJson(request): ApiJson<SessionRequest>,
) -> Result<Response, ApiError> {
    let (status, mut response, id) = match remote::spawn(&core, request, Hop::of(&headers)).await? {
        Routed::Here(view) => {
            let status = if view.existing {
                StatusCode::OK
            } else {
                StatusCode::ACCEPTED
            };
            let id = view.record.id.to_string();
            (status, view_response(status, &view), Some(id))
        }
        Routed::There { node, answer } => {
            let id = answer
                .json()
                .ok()
                .and_then(|record| record["id"].as_str().map(str::to_owned));
            let status = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::BAD_GATEWAY);
            (status, answer.into_response(&node), id)
        }
    };
    if status.is_success()
        && let Some(id) = id
        && let Ok(location) = HeaderValue::from_str(&format!("/v1/sessions/{id}"))
    {
        response.headers_mut().insert(header::LOCATION, location);
    }
    Ok(response)
}

fn routed_view(routed: Routed<SessionView>, status: StatusCode) -> Response {
    match routed {
        Routed::Here(view) => view_response(status, &view),
        Routed::There { node, answer } => answer.into_response(&node),
    }
}

/// `GET /v1/sessions/{id}`
pub(super) async fn get(
    State(core): State<Arc<NodeCore>>,
    headers: HeaderMap,
    SessionPath(id): SessionPath,
) -> Result<Response, ApiError> {
    let routed = remote::get(&core, &id, Hop::of(&headers)).await?;
    Ok(routed_view(routed, StatusCode::OK))
}

/// `DELETE /v1/sessions/{id}`
pub(super) async fn cancel(
    State(core): State<Arc<NodeCore>>,
    headers: HeaderMap,
    SessionPath(id): SessionPath,
) -> Result<Response, ApiError> {
    let routed = remote::cancel(&core, &id, Hop::of(&headers)).await?;
    Ok(routed_view(routed, StatusCode::ACCEPTED))
}

/// `GET /v1/sessions?state=…&label=k=v&kind=…&limit=…&cursor=…&scope=local|cluster`
pub(super) async fn list(
    State(core): State<Arc<NodeCore>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let mut filter = SessionQuery {
        limit: 100,
        ..SessionQuery::default()
    };
    let mut kinds = Vec::new();
    let mut cluster = false;
    for (key, value) in form_urlencoded::parse(query.as_deref().unwrap_or("").as_bytes()) {
        match key.as_ref() {
            "state" => filter.states.push(
                value
                    .parse()
                    .map_err(|message: String| ApiError::bad_request("invalid_filter", message))?,
            ),
            "kind" => {
                filter.kinds.push(
                    value
                        .parse::<SessionKindTag>()
                        .map_err(|message| ApiError::bad_request("invalid_filter", message))?,
                );
                kinds.push(value.into_owned());
            }
            "label" => {
                let (label, expected) = value.split_once('=').ok_or_else(|| {
                    ApiError::bad_request(
                        "invalid_filter",
                        format!("label={value:?}: use label=KEY=VALUE"),
                    )
                })?;
                if let Some(first) = filter.labels.insert(label.to_owned(), expected.to_owned()) {
                    // A session has one value per label: the filter could match nothing.
                    return Err(ApiError::bad_request(
                        "invalid_filter",
                        format!(
                            "label {label:?} is given twice ({first:?} and {expected:?}); a \
                             session has one value per label"
                        ),
                    ));
                }
            }
            "limit" => {
                filter.limit = value
                    .parse::<usize>()
                    .ok()
                    .filter(|limit| (1..=MAX_PAGE).contains(limit))
                    .ok_or_else(|| {
                        ApiError::bad_request(
                            "invalid_limit",
                            format!("limit={value:?}: use 1 to {MAX_PAGE}"),
                        )
                    })?
            }
            "cursor" => filter.cursor = Some(value.into_owned()),
            "scope" => {
                cluster = match value.as_ref() {
                    "local" => false,
                    "cluster" => true,
                    other => {
                        return Err(ApiError::bad_request(
                            "invalid_parameter",
                            format!("scope={other:?}: use local or cluster"),
                        ));
                    }
                }
            }
            other => {
                return Err(ApiError::bad_request(
                    "unknown_parameter",
                    format!(
                        "unknown query parameter {other:?}; use state, label, kind, limit, \
                         cursor, scope"
                    ),
                ));
            }
        }
    }
    if cluster && filter.cursor.is_some() {
        return Err(ApiError::bad_request(
            "invalid_parameter",
            "cursor does not apply to scope=cluster (each node lists its newest `limit` sessions)",
        ));
    }
    // A forwarded listing is this node's part of another node's cluster listing.
    let cluster = (cluster && Hop::of(&headers) == Hop::Client).then(|| ListFilters {
        states: filter.states.clone(),
        kinds,
        labels: filter.labels.clone(),
        limit: filter.limit,
    });
    if filter.states.len() + filter.kinds.len() + filter.labels.len() > 64 {
        return Err(ApiError::bad_request(
            "invalid_filter",
            "at most 64 filter values",
        ));
    }
    let page = core
        .sessions
        .list_views(filter)
        .await
        .map_err(|error| match error {
            SessionError::Store(StoreError::Invalid(message)) => {
                ApiError::bad_request("invalid_cursor", message)
            }
            other => other.into(),
        })?;
    let sessions: Vec<serde_json::Value> = page
        .sessions
        .iter()
        .map(|view| serde_json::to_value(SessionJson(view)).unwrap_or_default())
        .collect();
    if let Some(filters) = cluster {
        let answer = remote::list_cluster(&core, &filters, sessions, page.next_cursor).await;
        return Ok(ApiJson(answer).into_response());
    }
    Ok(ApiJson(serde_json::json!({
        "sessions": sessions,
        "next_cursor": page.next_cursor,
    }))
    .into_response())
}

/// `response` with `held` kept until its body is done (or dropped with the connection).
fn holding(response: Response, held: impl Send + Sync + 'static) -> Response {
    let (parts, body) = response.into_parts();
    let body = body.into_data_stream().map(move |chunk| {
        let _held = &held;
        chunk
    });
    Response::from_parts(parts, axum::body::Body::from_stream(body))
}

/// `GET /v1/sessions/{id}/output?offset=…&limit=…&follow=…`
pub(super) async fn output(
    State(core): State<Arc<NodeCore>>,
    principal: Option<Extension<Principal>>,
    headers: HeaderMap,
    SessionPath(id): SessionPath,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let hop = Hop::of(&headers);
    let mut offset = 0u64;
    let mut limit = 1000usize;
    let mut follow = false;
    for (key, value) in form_urlencoded::parse(query.as_deref().unwrap_or("").as_bytes()) {
        let bad = |what: &str| {
            ApiError::bad_request("invalid_parameter", format!("{key}={value:?}: {what}"))
        };
        match key.as_ref() {
            "offset" => offset = value.parse().map_err(|_| bad("a line number"))?,
            "limit" => {
                limit = value
                    .parse::<usize>()
                    .ok()
                    .filter(|limit| (1..=MAX_OUTPUT_PAGE).contains(limit))
                    .ok_or_else(|| {
                        ApiError::bad_request(
                            "invalid_limit",
                            format!("limit={value:?}: 1 to {MAX_OUTPUT_PAGE}"),
                        )
                    })?
            }
            "follow" => {
                follow = match value.as_ref() {
                    "true" | "1" => true,
                    "false" | "0" => false,
                    _ => return Err(bad("true or false")),
                }
            }
            other => {
                return Err(ApiError::bad_request(
                    "unknown_parameter",
                    format!("unknown query parameter {other:?}; use offset, limit, follow"),
                ));
            }
        }
    }
    if !follow {
        let page = match remote::output(&core, &id, offset, limit, hop).await? {
            Routed::Here(page) => page,
            Routed::There { node, answer } => return Ok(answer.into_response(&node)),
        };
        let lines: Vec<_> = page
            .lines
            .iter()
            .map(|line| serde_json::json!({"line": line.line, "stream": line.stream, "text": line.text}))
            .collect();
        return Ok(ApiJson(serde_json::json!({
            "lines": lines,
            "next_offset": page.next_offset,
            "total": page.total,
            "truncated": page.truncated,
        }))
        .into_response());
    }
    // A client reconnecting to a followed stream (an EventSource) names the last line it got:
    // the stream goes on after it, whatever `offset` says.
    if let Some(last) = headers.get("last-event-id") {
        offset = last
            .to_str()
            .ok()
            .and_then(|last| last.trim().parse().ok())
            .ok_or_else(|| {
                ApiError::bad_request(
                    "invalid_parameter",
                    "Last-Event-ID: the number of the last line received",
                )
            })?;
    }
    // A follow holds its client's stream open for as long as the run lasts: it counts as one of
    // the token's links (a forwarded one was counted on the node its client asked).
    let slot = match (hop, principal) {
        (Hop::Client, Some(Extension(principal))) => Some(
            crate::link::take_stream_slot(&core, &principal).map_err(super::events::link_error)?,
        ),
        _ => None,
    };
    let lines = match remote::follow(&core, &id, offset, hop).await? {
        Followed::Here(lines) => lines,
        Followed::There(remote) => return Ok(holding(remote.into_response(), slot)),
    };
    let sessions = core.sessions.clone();
    let end_id = id.clone();
    let lines = lines.map(move |line| {
        let _held = &slot;
        Ok::<_, Infallible>(match line {
            Ok(line) => SseEvent::default().id(line.line.to_string()).data(
                serde_json::json!({"line": line.line, "stream": line.stream, "text": line.text})
                    .to_string(),
            ),
            Err(error) => SseEvent::default()
                .event("error")
                .data(serde_json::json!({"message": error.to_string()}).to_string()),
        })
    });
    // After the last line: one `end` event with the session's final state, or an `error` event
    // when the state cannot be read (nothing is made up).
    let end = futures::stream::once(async move {
        Ok::<_, Infallible>(match sessions.get(&end_id).await {
            Ok(view) => SseEvent::default()
                .event("end")
                .data(serde_json::json!({"state": view.record.state}).to_string()),
            Err(error) => SseEvent::default().event("error").data(
                serde_json::json!({"message": format!("the session's end cannot be read: {error}")})
                    .to_string(),
            ),
        })
    });
    Ok(Sse::new(lines.chain(end))
        .keep_alive(
            KeepAlive::new()
                .interval(Duration::from_secs(15))
                .text("heartbeat"),
        )
        .into_response())
}
