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
use axum::body::Body;
use axum::extract::{ConnectInfo, RawQuery, State};
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use futures::Stream;
use troupe_actors::event::{
    Delivery, EventFilter, EventId, FilterSet, KindPattern, ReplayFrom, TransportKind,
};
use troupe_actors::ids::{NodeId, SessionId};

use super::ApiError;
use crate::auth::Principal;
use crate::json::{SSE_HEARTBEAT, append_sse_frame, sse_frame};
use crate::link::{LinkError, LinkGuard, open_link};
use crate::node::NodeCore;
use crate::replay::EventStream;

/// Most events a `tail` may ask for.
pub(crate) const MAX_TAIL: usize = 10_000;
/// Replay length of `follow=false` without `after` or `tail`.
const DEFAULT_REPLAY: usize = 100;
/// Chunks (each one or more events) queued between a followed stream's link and its response
/// body.
const BODY_QUEUE: usize = 16;
/// How long a chunk may wait for room in the body queue before the link is ended.
pub(crate) const SEND_TIMEOUT: Duration = super::events_ws::SEND_TIMEOUT;
/// Most events written as one body chunk.
pub(crate) const MAX_CHUNK_EVENTS: usize = 256;
/// A chunk takes no more events once it holds this many bytes.
pub(crate) const MAX_CHUNK_BYTES: usize = 64 * 1024;

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

/// A response streaming `body` as Server-Sent Events (the bytes are complete SSE frames).
fn sse_response<S>(body: S) -> Response
where
    S: Stream<Item = Result<Bytes, Infallible>> + Send + 'static,
{
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(body),
    )
        .into_response()
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
                Some((Ok::<_, Infallible>(sse_frame(&node, &delivery)), replay))
            }
        });
        return Ok(sse_response(events));
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
    let heartbeat = Duration::from_secs(core.config.events.heartbeat_secs);
    // A stream that does not resume first names the newest event as its `id` (a frame without
    // data, which clients do not dispatch but remember): a client whose filter matched nothing
    // before the link broke still resumes from where it started, not from whenever it returns.
    let start_id = events
        .starts_after()
        .map(|head| Bytes::from(format!("id: {head}\n\n")));
    let body = link_stream(node, events, link, heartbeat);
    Ok(sse_response(futures::StreamExt::chain(
        futures::stream::iter(start_id.map(Ok::<_, Infallible>)),
        body,
    )))
}

/// The answer when a link cannot be opened.
pub(crate) fn link_error(error: LinkError) -> ApiError {
    match error {
        LinkError::TooMany { .. } => ApiError::unavailable("too_many_links", error.to_string())
            .retry_after(Duration::from_secs(5)),
        LinkError::TooManyForToken { max, .. } => ApiError::new(
            axum::http::StatusCode::TOO_MANY_REQUESTS,
            "too_many_links",
            error.to_string(),
        )
        .with_details(serde_json::json!({"max": max}))
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
    heartbeat: Duration,
) -> impl Stream<Item = Result<Bytes, Infallible>> + Send + 'static {
    let (_feed, body) = spawn_feed(node, events, link, heartbeat);
    futures::stream::unfold(body, |mut body| async move {
        let chunk = body.recv().await?;
        Some((Ok(chunk), body))
    })
}

/// Starts the task that feeds a link's chunks into a bounded queue; returns it and the queue's
/// receiving end (the response body reads it).
fn spawn_feed(
    node: NodeId,
    events: EventStream,
    link: LinkGuard,
    heartbeat: Duration,
) -> (
    tokio::task::JoinHandle<()>,
    tokio::sync::mpsc::Receiver<Bytes>,
) {
    let (queue, body) = tokio::sync::mpsc::channel(BODY_QUEUE);
    let feed = tokio::spawn(feed_link(
        node,
        events,
        link,
        queue,
        Pacing {
            send_timeout: SEND_TIMEOUT,
            heartbeat,
        },
    ));
    (feed, body)
}

/// The timing of a followed stream.
#[derive(Debug, Clone, Copy)]
struct Pacing {
    /// How long a chunk may wait for room in the body queue before the link is ended.
    send_timeout: Duration,
    /// After this long without a frame, a `: heartbeat` comment is sent.
    heartbeat: Duration,
}

/// Feeds a link's deliveries into `queue` (the response body) until the body is dropped (the
/// client went away), a chunk waits for room longer than the send timeout (the client stopped
/// reading), or the link is closed. Each wake-up sends what is ready as one chunk
/// ([`take_ready`]), so the socket writes follow the wake-ups, not the events. Dropping `link`
/// and `events` on return ends the link and its subscription.
async fn feed_link(
    node: NodeId,
    mut events: EventStream,
    mut link: LinkGuard,
    queue: tokio::sync::mpsc::Sender<Bytes>,
    pacing: Pacing,
) {
    let closed = link.closed.clone().cancelled_owned();
    let gone = queue.closed();
    let idle = tokio::time::sleep(pacing.heartbeat);
    tokio::pin!(closed, gone, idle);
    let mut last_sent = tokio::time::Instant::now();
    loop {
        let chunk = tokio::select! {
            biased;
            () = &mut closed => {
                link.set_reason("closed by the node");
                return;
            }
            () = &mut gone => return,
            changed = link.filter.changed() => {
                if changed.is_err() {
                    return;
                }
                let filters = link.filter.borrow_and_update().clone();
                events.set_filters(filters);
                continue;
            }
            delivery = events.recv() => match delivery {
                Some(delivery) => take_ready(&node, delivery, &mut events),
                None => {
                    link.set_reason("the node's event bus ended");
                    return;
                }
            },
            () = &mut idle => {
                let due = last_sent + pacing.heartbeat;
                if tokio::time::Instant::now() < due {
                    idle.as_mut().reset(due);
                    continue;
                }
                Bytes::from_static(SSE_HEARTBEAT)
            }
        };
        match tokio::time::timeout(pacing.send_timeout, queue.send(chunk)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return,
            Err(_) => {
                tracing::info!(link = %link.id, "an SSE client stopped reading; ending its link");
                link.set_reason(format!(
                    "the client stopped reading (nothing accepted for {:?})",
                    pacing.send_timeout
                ));
                return;
            }
        }
        last_sent = tokio::time::Instant::now();
        if idle.is_elapsed() {
            idle.as_mut().reset(last_sent + pacing.heartbeat);
        }
    }
}

/// `first` and the deliveries ready right after it, as one body chunk of SSE frames: at most
/// [`MAX_CHUNK_EVENTS`] events or about [`MAX_CHUNK_BYTES`] bytes, in order. A lone event is
/// its shared frame as is, without a copy.
fn take_ready(node: &NodeId, first: Delivery, events: &mut EventStream) -> Bytes {
    let first = sse_frame(node, &first);
    let Some(second) = events.try_recv() else {
        return first;
    };
    let mut chunk = BytesMut::with_capacity(MAX_CHUNK_BYTES.min(first.len() * 32));
    chunk.extend_from_slice(&first);
    append_sse_frame(node, &second, &mut chunk);
    let mut taken = 2;
    while taken < MAX_CHUNK_EVENTS && chunk.len() < MAX_CHUNK_BYTES {
        let Some(delivery) = events.try_recv() else {
            break;
        };
        append_sse_frame(node, &delivery, &mut chunk);
        taken += 1;
    }
    chunk.freeze()
}

#[cfg(test)]
pub(super) mod burst {
    //! A node with one link of a transport, and a burst of events for it already on the bus:
    //! the fixture of the tests that check how a link writes what is ready at once.

    use std::time::Duration;

    use troupe_actors::event::{
        Delivery, EventData, EventFilter, FilterSet, ReplayFrom, SessionProgress, TransportKind,
    };
    use troupe_actors::ids::SessionId;

    use crate::link::{LinkGuard, open_link};
    use crate::replay::EventStream;

    /// The node (keep it alive), the link's event stream and its link, and the ids of the
    /// burst in publishing order.
    pub(crate) struct ReadyBurst {
        pub(crate) node: crate::node::NodeHandle,
        pub(crate) events: EventStream,
        pub(crate) link: LinkGuard,
        pub(crate) published: Vec<String>,
        _dir: tempfile::TempDir,
    }

    /// Starts a node, opens a `transport` link for one session's events, then publishes
    /// `burst` progress events (message `message(index)`) and waits until the bus took them all.
    pub(crate) async fn ready_burst(
        transport: TransportKind,
        burst: usize,
        message: impl Fn(usize) -> String,
    ) -> ReadyBurst {
        let dir = tempfile::tempdir().unwrap();
        let node = crate::node::test_node(dir.path()).await;
        let core = node.core().clone();
        let session = SessionId::new("s-burst").unwrap();
        let filter = EventFilter {
            sessions: vec![session.clone()],
            ..EventFilter::all()
        };
        let events = EventStream::open(
            &core.tree.events,
            &core.store,
            ReplayFrom::Now,
            FilterSet::single(filter.clone()),
        )
        .await
        .unwrap();
        let link = open_link(
            &core,
            transport,
            None,
            None,
            FilterSet::single(filter.clone()),
        )
        .await
        .unwrap();
        let mut watch = node.subscribe(filter);
        for index in 0..burst {
            node.events().publish(
                Some(session.clone()),
                EventData::SessionProgress(SessionProgress {
                    message: message(index),
                    current: Some(index as u64),
                    total: None,
                }),
            );
        }
        let mut published = Vec::new();
        while published.len() < burst {
            match tokio::time::timeout(Duration::from_secs(30), watch.recv()).await {
                Ok(Some(Delivery::Event(event))) => published.push(event.id.to_string()),
                other => panic!("the bus did not take the burst: {other:?}"),
            }
        }
        ReadyBurst {
            node,
            events,
            link,
            published,
            _dir: dir,
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

    /// The `id:` of each event frame and the number of lag markers in a stream of SSE bytes.
    fn frame_ids(bytes: &[u8]) -> (Vec<String>, usize) {
        let text = std::str::from_utf8(bytes).unwrap();
        let mut ids = Vec::new();
        let mut markers = 0;
        for frame in text.split_terminator("\n\n") {
            if frame.starts_with(':') {
                continue;
            }
            match frame.split_once("\nid: ") {
                Some((_, id)) => ids.push(id.to_owned()),
                None if frame.contains(r#""kind":"events.lagged""#) => markers += 1,
                None => panic!("a frame without an id: {frame:?}"),
            }
        }
        (ids, markers)
    }

    #[tokio::test]
    async fn a_burst_goes_out_in_few_chunks_in_order_without_loss_then_heartbeats() {
        // The whole burst is on the bus before the feed starts, so it is all ready at once.
        let burst = 3 * MAX_CHUNK_EVENTS + 17;
        let super::burst::ReadyBurst {
            node,
            events,
            link,
            published,
            ..
        } = super::burst::ready_burst(TransportKind::Sse, burst, |index| {
            format!("line {index} with some text to make the frame longer")
        })
        .await;

        let (feed, mut body) = spawn_feed(
            node.core().node_id.clone(),
            events,
            link,
            Duration::from_millis(200),
        );
        let mut received = Vec::new();
        let mut chunks = 0;
        while frame_ids(&received).0.len() < burst {
            let chunk = tokio::time::timeout(Duration::from_secs(30), body.recv())
                .await
                .expect("a chunk")
                .expect("the feed runs");
            let (ids, markers) = frame_ids(&chunk);
            assert_eq!(markers, 0, "nothing was lost");
            assert!(
                ids.len() <= MAX_CHUNK_EVENTS,
                "{} events in one chunk",
                ids.len()
            );
            assert!(
                chunk.len() <= MAX_CHUNK_BYTES + 1024,
                "{} bytes in one chunk",
                chunk.len()
            );
            received.extend_from_slice(&chunk);
            chunks += 1;
        }
        assert_eq!(frame_ids(&received).0, published, "every event, in order");
        assert!(
            chunks < burst / 8,
            "{burst} ready events went out in {chunks} chunks"
        );
        // Then, idle: a heartbeat comment, exactly as before.
        let idle = tokio::time::timeout(Duration::from_secs(30), body.recv())
            .await
            .expect("a heartbeat")
            .expect("the feed runs");
        assert_eq!(&idle[..], b": heartbeat\n\n");
        // The client goes away: the feed ends and releases the link.
        drop(body);
        tokio::time::timeout(Duration::from_secs(30), feed)
            .await
            .expect("the feed ends")
            .unwrap();
        node.shutdown().await;
    }

    #[test]
    fn without_a_start_a_follow_stream_is_live_only() {
        let query = StreamQuery::parse(None).unwrap();
        assert!(query.follow);
        assert_eq!(query.start(None), ReplayFrom::Now);
    }
}
