//! `GET /v1/events`: the event stream as Server-Sent Events.
//!
//! Query parameters (repeatable): `kind` (`session.output`, or a family `session.*`), `session`,
//! `node`; `after=ID` or the `Last-Event-ID` header to resume; `tail=N` to start with the last N
//! events; `follow=false` to get the replay only and end. Each event's SSE `id:` is its event id,
//! so a reconnecting client resumes with exactly the events it missed, from the persisted event
//! log when the id is older than the in-memory ring ([`crate::replay`]). A comment heartbeat
//! keeps idle connections alive. Each followed stream is a link: a TransportActor owns it.
//!
//! A followed stream's events go through a small queue to the response body. A client that
//! stops reading fills its socket and then that queue; once an event has waited
//! [`SEND_TIMEOUT`] for room, the link ends (`link.disconnected`, reason "the client stopped
//! reading"), its bus subscription is released and the response ends.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Extension;
use axum::extract::{ConnectInfo, RawQuery, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::Stream;
use troupe_actors::event::{
    Delivery, EventFilter, EventId, FilterSet, KindPattern, ReplayFrom, TransportKind,
};
use troupe_actors::ids::{NodeId, SessionId};

use super::ApiError;
use crate::auth::Principal;
use crate::json::delivery_to_json;
use crate::link::{LinkError, LinkGuard, open_link};
use crate::node::NodeCore;
use crate::replay::EventStream;

/// Most events a `tail` may ask for.
pub(crate) const MAX_TAIL: usize = 10_000;
/// Replay length of `follow=false` without `after` or `tail`.
const DEFAULT_REPLAY: usize = 100;
/// Events queued between a followed stream's link and its response body.
const BODY_QUEUE: usize = 16;
/// How long an event may wait for room in the body queue before the link is ended.
pub(crate) const SEND_TIMEOUT: Duration = super::events_ws::SEND_TIMEOUT;

/// The parsed query of an event-stream request.
#[derive(Debug, Default)]
pub(crate) struct StreamQuery {
    pub(crate) filter: EventFilter,
    pub(crate) after: Option<EventId>,
    pub(crate) tail: Option<usize>,
    pub(crate) follow: bool,
}

impl StreamQuery {
    /// Parses `kind`, `session`, `node`, `after`, `tail`, `follow`.
    pub(crate) fn parse(query: Option<&str>) -> Result<Self, ApiError> {
        let mut parsed = StreamQuery {
            follow: true,
            ..StreamQuery::default()
        };
        for (key, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
            if push_filter_value(&mut parsed.filter, &key, &value)? {
                continue;
            }
            match key.as_ref() {
                "after" => {
                    parsed.after = Some(value.parse().map_err(
                        |error: troupe_actors::event::InvalidEventId| {
                            ApiError::bad_request("invalid_event_id", error.to_string())
                        },
                    )?)
                }
                "tail" => {
                    let tail: usize = value.parse().map_err(|_| {
                        ApiError::bad_request(
                            "invalid_tail",
                            format!("tail={value:?} is not a number"),
                        )
                    })?;
                    if tail > MAX_TAIL {
                        return Err(ApiError::bad_request(
                            "invalid_tail",
                            format!("tail={tail} is more than the {MAX_TAIL} allowed"),
                        ));
                    }
                    parsed.tail = Some(tail);
                }
                "follow" => {
                    parsed.follow = match value.as_ref() {
                        "true" | "1" => true,
                        "false" | "0" => false,
                        other => {
                            return Err(ApiError::bad_request(
                                "invalid_follow",
                                format!("follow={other:?}: use true or false"),
                            ));
                        }
                    }
                }
                other => {
                    return Err(ApiError::bad_request(
                        "unknown_parameter",
                        format!(
                            "unknown query parameter {other:?}; use kind, session, node, after, tail, follow"
                        ),
                    ));
                }
            }
        }
        parsed
            .filter
            .validate()
            .map_err(|error| ApiError::bad_request("invalid_filter", error.to_string()))?;
        Ok(parsed)
    }

    /// Where the stream starts: `Last-Event-ID` (or `after`), else `tail`, else now.
    pub(crate) fn start(&self, last_event_id: Option<EventId>) -> ReplayFrom {
        match (last_event_id.or_else(|| self.after.clone()), self.tail) {
            (Some(id), _) => ReplayFrom::After(id),
            (None, Some(tail)) => ReplayFrom::Tail(tail),
            (None, None) if self.follow => ReplayFrom::Now,
            (None, None) => ReplayFrom::Tail(DEFAULT_REPLAY),
        }
    }
}

/// Adds `value` to the filter dimension `key` (`kind`, `session` or `node`); false when `key`
/// is not a filter dimension.
pub(super) fn push_filter_value(
    filter: &mut EventFilter,
    key: &str,
    value: &str,
) -> Result<bool, ApiError> {
    match key {
        "kind" => filter
            .kinds
            .push(value.parse::<KindPattern>().map_err(|error| {
                ApiError::bad_request("invalid_filter", error.to_string()).with_details(
                    serde_json::json!({
                        "kinds": troupe_actors::event::EventKind::ALL
                            .iter()
                            .map(|kind| kind.as_str())
                            .collect::<Vec<_>>()
                    }),
                )
            })?),
        "session" => filter.sessions.push(
            SessionId::new(value)
                .map_err(|error| ApiError::bad_request("invalid_filter", error.to_string()))?,
        ),
        "node" => filter.nodes.push(
            NodeId::new(value)
                .map_err(|error| ApiError::bad_request("invalid_filter", error.to_string()))?,
        ),
        _ => return Ok(false),
    }
    Ok(true)
}

fn last_event_id(headers: &HeaderMap) -> Result<Option<EventId>, ApiError> {
    let Some(value) = headers.get("last-event-id") else {
        return Ok(None);
    };
    let text = value.to_str().map_err(|_| {
        ApiError::bad_request("invalid_event_id", "Last-Event-ID is not valid text")
    })?;
    if text.is_empty() {
        return Ok(None);
    }
    text.parse()
        .map(Some)
        .map_err(|error: troupe_actors::event::InvalidEventId| {
            ApiError::bad_request("invalid_event_id", error.to_string())
        })
}

fn sse_event(node: &NodeId, delivery: &Delivery) -> SseEvent {
    let (id, json) = delivery_to_json(node, delivery);
    let event = SseEvent::default().data(json);
    match id {
        Some(id) => event.id(id),
        None => event,
    }
}

pub(super) async fn stream(
    State(core): State<Arc<NodeCore>>,
    Extension(principal): Extension<Principal>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let query = StreamQuery::parse(query.as_deref())?;
    let start = query.start(last_event_id(&headers)?);
    let node = core.node_id.clone();

    if !query.follow {
        let replay = EventStream::open(
            &core.tree.events,
            &core.store,
            start,
            FilterSet::single(query.filter.clone()),
        )
        .await?;
        let events = futures::stream::unfold(replay, move |mut replay| {
            let node = node.clone();
            async move {
                let delivery = replay.next_replayed().await?;
                Some((Ok::<_, Infallible>(sse_event(&node, &delivery)), replay))
            }
        });
        return Ok(Sse::new(events).into_response());
    }

    // Subscribe first, so the link's own `link.connected` is part of its stream.
    let events = EventStream::open(
        &core.tree.events,
        &core.store,
        start,
        FilterSet::single(query.filter.clone()),
    )
    .await?;
    let link = open_link(
        &core,
        TransportKind::Sse,
        Some(peer),
        Some(&principal),
        FilterSet::single(query.filter.clone()),
    )
    .await
    .map_err(link_error)?;
    let heartbeat = Duration::from_secs(core.config.events.heartbeat_secs.max(1));
    Ok(Sse::new(link_stream(node, events, link))
        .keep_alive(KeepAlive::new().interval(heartbeat).text("heartbeat"))
        .into_response())
}

/// The answer when a link cannot be opened.
pub(super) fn link_error(error: LinkError) -> ApiError {
    match error {
        LinkError::TooMany { .. } => ApiError::unavailable("too_many_links", error.to_string())
            .retry_after(Duration::from_secs(5)),
        LinkError::Unavailable(_) => ApiError::unavailable("links_unavailable", error.to_string())
            .retry_after(Duration::from_secs(1)),
    }
}

/// The deliveries of a link as a response body: a task feeds them through a bounded queue until
/// the client goes away, stops reading ([`SEND_TIMEOUT`]), or the link is closed.
fn link_stream(
    node: NodeId,
    events: EventStream,
    link: LinkGuard,
) -> impl Stream<Item = Result<SseEvent, Infallible>> + Send + 'static {
    let (queue, body) = tokio::sync::mpsc::channel(BODY_QUEUE);
    tokio::spawn(feed_link(node, events, link, queue, SEND_TIMEOUT));
    futures::stream::unfold(body, |mut body| async move {
        let event = body.recv().await?;
        Some((Ok(event), body))
    })
}

/// Feeds a link's deliveries into `queue` (the response body) until the body is dropped (the
/// client went away), an event waits `timeout` for room (the client stopped reading), or the
/// link is closed. Dropping `link` and `events` on return ends the link and its subscription.
async fn feed_link(
    node: NodeId,
    mut events: EventStream,
    mut link: LinkGuard,
    queue: tokio::sync::mpsc::Sender<SseEvent>,
    timeout: Duration,
) {
    loop {
        let delivery = tokio::select! {
            biased;
            () = link.closed.cancelled() => {
                link.set_reason("closed by the node");
                return;
            }
            () = queue.closed() => return,
            changed = link.filter.changed() => {
                if changed.is_err() {
                    return;
                }
                let filters = link.filter.borrow_and_update().clone();
                events.set_filters(filters);
                continue;
            }
            delivery = events.recv() => match delivery {
                Some(delivery) => delivery,
                None => {
                    link.set_reason("the node's event bus ended");
                    return;
                }
            },
        };
        match tokio::time::timeout(timeout, queue.send(sse_event(&node, &delivery))).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return,
            Err(_) => {
                tracing::info!(link = %link.id, "an SSE client stopped reading; ending its link");
                link.set_reason(format!(
                    "the client stopped reading (nothing accepted for {timeout:?})"
                ));
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_parse_repeatable_filters() {
        let query = StreamQuery::parse(Some(
            "kind=session.output&kind=provider.*&session=s-1&node=a&tail=5&follow=false",
        ))
        .unwrap();
        assert_eq!(query.filter.kinds.len(), 2);
        assert_eq!(query.filter.sessions[0].as_str(), "s-1");
        assert_eq!(query.filter.nodes[0].as_str(), "a");
        assert_eq!(query.tail, Some(5));
        assert!(!query.follow);
        assert_eq!(query.start(None), ReplayFrom::Tail(5));
        let id: EventId = "a:3".parse().unwrap();
        assert_eq!(query.start(Some(id.clone())), ReplayFrom::After(id));
    }

    #[test]
    fn bad_queries_are_refused_with_a_code() {
        for (query, code) in [
            ("kind=nope", "invalid_filter"),
            ("session=../x", "invalid_filter"),
            ("after=abc", "invalid_event_id"),
            ("tail=x", "invalid_tail"),
            ("tail=100000", "invalid_tail"),
            ("follow=maybe", "invalid_follow"),
            ("colour=red", "unknown_parameter"),
        ] {
            let error = StreamQuery::parse(Some(query)).unwrap_err();
            assert_eq!(error.code, code, "{query}");
        }
    }

    #[test]
    fn without_a_start_a_follow_stream_is_live_only() {
        let query = StreamQuery::parse(None).unwrap();
        assert!(query.follow);
        assert_eq!(query.start(None), ReplayFrom::Now);
    }
}
