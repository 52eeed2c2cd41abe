//! `GET /v1/events/ws`: the event stream over a WebSocket.
//!
//! The query takes the same filters as `GET /v1/events` (`kind`, `session`, `node`, repeatable)
//! and where to start (`after=ID` resumes after an event id, from the persisted log when the
//! ring no longer holds it; `tail=N`; otherwise live). Every frame the node sends is one JSON
//! object with a `type`: `event` (`{"type":"event","event":{…}}`, the same event JSON as SSE;
//! `events.lagged` markers included), `subscribed`, `unsubscribed` or `error`. The client may
//! change what the link receives while it is open:
//!
//! - `{"type":"subscribe","name":"providers","filter":{"kind":["provider.*"]}}` adds (or
//!   replaces) a named subscription; an event is sent when any subscription matches. The URL's
//!   filter is the subscription named `default`.
//! - `{"type":"unsubscribe","name":"default"}` removes one.
//!
//! The answer to a change is sent once the change applies: events after it follow the new
//! subscriptions. Bad frames are answered with an `error` frame and the link stays open; a frame
//! over [`MAX_CLIENT_FRAME`] bytes closes it. Each subscribe or unsubscribe frame is charged to
//! the token's rate limit like an HTTP request; over it, the answer is an `error` frame with code
//! `rate_limited` and `retry_after_ms`, and nothing changes. Each socket is a link owned by a TransportActor.
//! Its outbound queue is the bus subscription (bounded, drop-oldest, then `events.lagged`). The
//! events ready at a wake-up go out as one batch of at most [`MAX_BATCH_EVENTS`] frames and
//! about [`MAX_BATCH_BYTES`], flushed once; a client that accepts nothing for [`SEND_TIMEOUT`]
//! (no frame, and on HTTP/1 no byte) is disconnected, one that reads slowly is not
//! ([`send_all_within`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Extension;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::{ConnectInfo, State};
use axum::http::{Extensions, HeaderMap, Uri};
use axum::response::Response;
use futures::{Sink, Stream, StreamExt};
use serde::Deserialize;
use serde_json::json;
use troupe_actors::event::{DEFAULT_SUBSCRIPTION, Delivery, EventFilter, FilterSet, TransportKind};
use troupe_actors::ids::NodeId;

use super::ApiError;
use super::events::{StreamQuery, link_error, push_filter_value};
use super::ws::{
    CLOSE_GOING_AWAY, CLOSE_NORMAL, CLOSE_POLICY, Incoming, Outgoing, SendProgress,
    check_host_and_origin, send_all_within, send_within, split,
};
use crate::auth::Principal;
use crate::json::ws_event_text;
use crate::link::{LinkGuard, open_link};
use crate::node::NodeCore;
use crate::replay::EventStream;

/// Largest frame a client may send, in bytes (subscription changes are small).
pub(crate) const MAX_CLIENT_FRAME: usize = 64 * 1024;
/// How long the client may accept nothing (no frame, and on HTTP/1 no byte) while frames wait
/// for it, before the link is closed.
pub(crate) const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes read from the socket at a time. The link polls its socket after every batch it sends,
/// and tungstenite zeroes this much buffer for each read attempt: its 128 KiB default cost more
/// than the events themselves. Client frames are small; bigger ones (up to
/// [`MAX_CLIENT_FRAME`]) are read in several steps.
const READ_BUFFER: usize = 4 * 1024;
/// Most event frames written with one flush.
pub(crate) const MAX_BATCH_EVENTS: usize = 256;
/// A batch takes no more events once it holds this many bytes, as an SSE chunk does
/// ([`super::events::MAX_CHUNK_BYTES`]): a few ready `session.output` events already make a
/// batch worth one flush, and 256 of them would be megabytes written at once.
pub(crate) const MAX_BATCH_BYTES: usize = super::events::MAX_CHUNK_BYTES;
/// How long a subscription change may wait for the link's TransportActor.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(5);

pub(super) async fn upgrade(
    State(core): State<Arc<NodeCore>>,
    Extension(principal): Extension<Principal>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    uri: Uri,
    extensions: Extensions,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    check_host_and_origin(&headers, &uri, &core.config.http.allowed_hosts)?;
    let ws = ws?;
    let query = StreamQuery::parse(uri.query())?;
    if !query.follow {
        return Err(ApiError::bad_request(
            "invalid_follow",
            "a WebSocket always follows; use GET /v1/events?follow=false for a one-shot replay",
        ));
    }
    let filters = FilterSet::single(query.filter.clone());
    // Subscribe first, so the link's own `link.connected` is part of its stream.
    let events = EventStream::open(
        &core.tree.events,
        &core.store,
        query.start(None),
        filters.clone(),
    )
    .await?;
    // A link that does not resume first says where it starts, for a client whose filter matches
    // nothing before the link breaks to resume from (`?after=`).
    let greeting = events
        .starts_after()
        .map(|head| serde_json::json!({"type": "start", "after": head}).to_string());
    let link = open_link(
        &core,
        TransportKind::WebSocket,
        Some(peer),
        Some(&principal),
        filters,
    )
    .await
    .map_err(link_error)?;
    let node = core.node_id.clone();
    let heartbeat = Duration::from_secs(core.config.events.heartbeat_secs);
    Ok(ws
        .max_message_size(MAX_CLIENT_FRAME)
        .max_frame_size(MAX_CLIENT_FRAME)
        .read_buffer_size(READ_BUFFER)
        .on_upgrade(move |socket| async move {
            let (sink, stream) = split(socket, None);
            run(
                Link {
                    node,
                    events,
                    link,
                    heartbeat,
                    limit: Some((core, principal)),
                    greeting,
                    progress: SendProgress::of_request(&extensions),
                },
                sink,
                stream,
            )
            .await;
        }))
}

/// One WebSocket event link.
pub(crate) struct Link {
    pub(crate) node: NodeId,
    pub(crate) events: EventStream,
    pub(crate) link: LinkGuard,
    pub(crate) heartbeat: Duration,
    /// The node whose per-token rate limit each client frame is charged to, and the token.
    pub(crate) limit: Option<(Arc<NodeCore>, Principal)>,
    /// A first frame (`start`: where a link that does not resume starts).
    pub(crate) greeting: Option<String>,
    /// What counts as the client's progress besides accepted frames.
    pub(crate) progress: SendProgress,
}

/// A client's request on the link.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
enum Command {
    Subscribe {
        #[serde(default)]
        name: Option<String>,
        #[serde(default)]
        filter: FilterJson,
    },
    Unsubscribe {
        #[serde(default)]
        name: Option<String>,
    },
}

/// A filter as a client writes it: the query parameters' names, each a list.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FilterJson {
    #[serde(default)]
    kind: Vec<String>,
    #[serde(default)]
    session: Vec<String>,
    #[serde(default)]
    node: Vec<String>,
}

impl FilterJson {
    fn parse(&self) -> Result<EventFilter, ApiError> {
        let mut filter = EventFilter::all();
        for (key, values) in [
            ("kind", &self.kind),
            ("session", &self.session),
            ("node", &self.node),
        ] {
            for value in values {
                push_filter_value(&mut filter, key, value)?;
            }
        }
        filter
            .validate()
            .map_err(|error| ApiError::bad_request("invalid_filter", error.to_string()))?;
        Ok(filter)
    }
}

fn error_frame(code: &str, message: impl std::fmt::Display) -> Outgoing {
    Outgoing::Text(
        json!({"type": "error", "code": code, "message": message.to_string()}).to_string(),
    )
}

/// Runs a link until its client or the node ends it.
pub(crate) async fn run<Si, St>(mut state: Link, mut sink: Si, mut stream: St)
where
    Si: Sink<Outgoing> + Unpin,
    Si::Error: std::fmt::Display,
    St: Stream<Item = Incoming> + Unpin,
{
    let mut ping = tokio::time::interval(state.heartbeat);
    ping.tick().await;
    let progress = state.progress.clone();
    if let Some(greeting) = state.greeting.take()
        && send_within(&mut sink, Outgoing::Text(greeting), SEND_TIMEOUT, &progress)
            .await
            .is_err()
    {
        state.link.set_reason("the client stopped reading");
        return;
    }
    let reason = loop {
        let outgoing = tokio::select! {
            biased;
            () = state.link.closed.cancelled() => {
                let _ = send_within(
                    &mut sink,
                    Outgoing::Close(CLOSE_GOING_AWAY, "closed by the node".into()),
                    SEND_TIMEOUT,
                    &progress,
                )
                .await;
                break "closed by the node".to_owned();
            }
            changed = state.link.filter.changed() => {
                if changed.is_err() {
                    break "the link's actor ended".to_owned();
                }
                let filters = state.link.filter.borrow_and_update().clone();
                state.events.set_filters(filters);
                continue;
            }
            incoming = stream.next() => match incoming {
                None | Some(Incoming::Close) => {
                    let _ = send_within(
                        &mut sink,
                        Outgoing::Close(CLOSE_NORMAL, String::new()),
                        SEND_TIMEOUT,
                        &progress,
                    )
                    .await;
                    break "client disconnected".to_owned();
                }
                Some(Incoming::Failed(error)) => {
                    let _ = send_within(
                        &mut sink,
                        Outgoing::Close(CLOSE_POLICY, truncate(&error)),
                        SEND_TIMEOUT,
                        &progress,
                    )
                    .await;
                    break format!("socket error: {error}");
                }
                Some(Incoming::Invalid(why)) => error_frame("invalid_message", why),
                Some(Incoming::Binary) => error_frame(
                    "binary_frame",
                    "this link takes JSON text frames only",
                ),
                Some(Incoming::Text(text)) => state.command(&text).await,
            },
            delivery = state.events.recv() => match delivery {
                Some(delivery) => {
                    let frames = take_ready(&state.node, delivery, &mut state.events);
                    let sent = send_all_within(&mut sink, frames, SEND_TIMEOUT, &progress).await;
                    if let Err(failure) = sent {
                        break failure.to_string();
                    }
                    continue;
                }
                None => break "the node's event bus ended".to_owned(),
            },
            _ = ping.tick() => Outgoing::Ping,
        };
        if let Err(failure) = send_within(&mut sink, outgoing, SEND_TIMEOUT, &progress).await {
            break failure.to_string();
        }
    };
    state.link.set_reason(reason);
}

/// `first` and the deliveries ready right after it, as text frames in order: at most
/// [`MAX_BATCH_EVENTS`] frames, and no more once they hold [`MAX_BATCH_BYTES`]. Written with one
/// flush.
fn take_ready(node: &NodeId, first: Delivery, events: &mut EventStream) -> Vec<Outgoing> {
    let first = ws_event_text(node, &first);
    let mut bytes = first.as_str().len();
    let mut frames = vec![Outgoing::SharedText(first)];
    while frames.len() < MAX_BATCH_EVENTS && bytes < MAX_BATCH_BYTES {
        let Some(delivery) = events.try_recv() else {
            break;
        };
        let text = ws_event_text(node, &delivery);
        bytes += text.as_str().len();
        frames.push(Outgoing::SharedText(text));
    }
    frames
}

/// Close reasons are at most 123 bytes.
fn truncate(text: &str) -> String {
    let mut end = text.len().min(120);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

impl Link {
    /// Applies one client frame and returns the answer.
    async fn command(&mut self, text: &str) -> Outgoing {
        if let Some((core, principal)) = &self.limit
            && let Err(wait) = core.limiter.check(principal)
        {
            let wait_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1);
            return Outgoing::Text(
                json!({
                    "type": "error",
                    "code": "rate_limited",
                    "message": format!(
                        "token {:?} exceeded auth.requests_per_second; retry after {wait_ms} ms",
                        principal.name
                    ),
                    "retry_after_ms": wait_ms,
                })
                .to_string(),
            );
        }
        let command: Command = match serde_json::from_str(text) {
            Ok(command) => command,
            Err(error) => {
                return error_frame(
                    "invalid_message",
                    format!(
                        "{error}; send {{\"type\":\"subscribe\",\"name\":…,\"filter\":{{\"kind\":[…],\
                         \"session\":[…],\"node\":[…]}}}} or {{\"type\":\"unsubscribe\",\"name\":…}}"
                    ),
                );
            }
        };
        let mut filters = self.events.filters().clone();
        let (answer, name) = match command {
            Command::Subscribe { name, filter } => {
                let name = name.unwrap_or_else(|| DEFAULT_SUBSCRIPTION.to_owned());
                let filter = match filter.parse() {
                    Ok(filter) => filter,
                    Err(error) => return error_frame(error.code, error.message),
                };
                if let Err(error) = filters.subscribe(&name, filter) {
                    return error_frame("invalid_subscription", error);
                }
                ("subscribed", name)
            }
            Command::Unsubscribe { name } => {
                let name = name.unwrap_or_else(|| DEFAULT_SUBSCRIPTION.to_owned());
                if !filters.unsubscribe(&name) {
                    return error_frame(
                        "not_subscribed",
                        format!("there is no subscription named {name:?}"),
                    );
                }
                ("unsubscribed", name)
            }
        };
        if let Err(message) = self.apply(filters).await {
            return error_frame("link_unavailable", message);
        }
        let names: Vec<&str> = self.events.filters().names().collect();
        Outgoing::Text(json!({"type": answer, "name": name, "subscriptions": names}).to_string())
    }

    /// Hands the new subscriptions to the TransportActor (which lists them) and applies them
    /// once it has.
    async fn apply(&mut self, filters: FilterSet) -> Result<(), String> {
        if !self.link.set_filter(filters.clone()) {
            return Err("the link is ending".into());
        }
        let applied = tokio::time::timeout(
            CHANGE_TIMEOUT,
            self.link.filter.wait_for(|current| *current == filters),
        )
        .await;
        match applied {
            Ok(Ok(_)) => {
                self.events.set_filters(filters);
                Ok(())
            }
            Ok(Err(_)) => Err("the link is ending".into()),
            Err(_) => Err(format!(
                "the link's actor did not apply the change within {CHANGE_TIMEOUT:?}"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use super::*;

    /// What the link did to its socket: a frame fed, or a flush.
    #[derive(Debug)]
    enum Written {
        Frame(Outgoing),
        Flush,
    }

    /// A sink that reports every frame and every flush that wrote something.
    struct Recorder {
        out: tokio::sync::mpsc::UnboundedSender<Written>,
        unflushed: bool,
    }

    impl Sink<Outgoing> for Recorder {
        type Error = String;
        fn poll_ready(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), String>> {
            Poll::Ready(Ok(()))
        }
        fn start_send(mut self: Pin<&mut Self>, frame: Outgoing) -> Result<(), String> {
            self.unflushed = true;
            self.out
                .send(Written::Frame(frame))
                .map_err(|e| e.to_string())
        }
        fn poll_flush(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), String>> {
            if std::mem::take(&mut self.unflushed) {
                let _ = self.out.send(Written::Flush);
            }
            Poll::Ready(Ok(()))
        }
        fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), String>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn ready_events_go_out_in_order_without_loss_with_one_flush_per_batch() {
        // The whole burst is on the bus before the link runs, so it is all ready at once.
        let burst = 2 * MAX_BATCH_EVENTS + 9;
        let crate::http::events::burst::ReadyBurst {
            node,
            events,
            link,
            published,
            ..
        } = crate::http::events::burst::ready_burst(TransportKind::WebSocket, burst, |index| {
            format!("line {index}")
        })
        .await;
        let core = node.core().clone();

        let (out, mut written) = tokio::sync::mpsc::unbounded_channel();
        let (_client, incoming) = futures::channel::mpsc::unbounded::<Incoming>();
        let state = Link {
            node: core.node_id.clone(),
            events,
            link,
            heartbeat: Duration::from_secs(3600),
            limit: None,
            greeting: None,
            progress: SendProgress::default(),
        };
        let running = tokio::spawn(run(
            state,
            Recorder {
                out,
                unflushed: false,
            },
            incoming,
        ));
        let mut ids = Vec::new();
        let mut in_batch = 0;
        let mut flushes = 0;
        while ids.len() < burst || in_batch > 0 {
            let written = tokio::time::timeout(Duration::from_secs(30), written.recv())
                .await
                .expect("a frame")
                .expect("the link runs");
            match written {
                Written::Frame(Outgoing::SharedText(text)) => {
                    let frame: serde_json::Value = serde_json::from_str(text.as_str()).unwrap();
                    assert_eq!(frame["type"], "event");
                    assert_eq!(frame["event"]["kind"], "session.progress", "no lag marker");
                    ids.push(frame["event"]["id"].as_str().unwrap().to_owned());
                    in_batch += 1;
                    assert!(in_batch <= MAX_BATCH_EVENTS, "a batch is bounded");
                }
                Written::Frame(other) => panic!("unexpected frame {other:?}"),
                Written::Flush => {
                    flushes += 1;
                    in_batch = 0;
                }
            }
        }
        assert_eq!(ids, published, "every event, in order");
        assert!(
            flushes < burst / 8,
            "{burst} ready events were flushed {flushes} times"
        );
        running.abort();
        node.shutdown().await;
    }

    /// A sink that accepts one frame every `every` (a client that reads steadily but slowly), or
    /// none at all (`every` = `None`: a client that stopped), and reports what it took.
    struct Slow {
        every: Option<Duration>,
        wait: Option<Pin<Box<tokio::time::Sleep>>>,
        out: tokio::sync::mpsc::UnboundedSender<Written>,
        unflushed: bool,
    }

    impl Slow {
        fn new(every: Option<Duration>) -> (Self, tokio::sync::mpsc::UnboundedReceiver<Written>) {
            let (out, written) = tokio::sync::mpsc::unbounded_channel();
            let sink = Self {
                every,
                wait: None,
                out,
                unflushed: false,
            };
            (sink, written)
        }
    }

    impl Sink<Outgoing> for Slow {
        type Error = String;
        fn poll_ready(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), String>> {
            let Some(every) = self.every else {
                return Poll::Pending;
            };
            let wait = self
                .wait
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(every)));
            if wait.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            self.wait = None;
            Poll::Ready(Ok(()))
        }
        fn start_send(mut self: Pin<&mut Self>, frame: Outgoing) -> Result<(), String> {
            self.unflushed = true;
            self.out
                .send(Written::Frame(frame))
                .map_err(|e| e.to_string())
        }
        fn poll_flush(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), String>> {
            if std::mem::take(&mut self.unflushed) {
                let _ = self.out.send(Written::Flush);
            }
            Poll::Ready(Ok(()))
        }
        fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), String>> {
            Poll::Ready(Ok(()))
        }
    }

    /// A WebSocket link over `sink`, its client, and the node it runs on.
    struct SlowLink {
        /// Keep: the node.
        node: crate::node::NodeHandle,
        /// The link's task.
        running: tokio::task::JoinHandle<()>,
        /// The burst's ids, in publishing order.
        published: Vec<String>,
        /// The node's `link.*` events since before the link ran.
        links: troupe_actors::event::Subscription,
        /// Keep: the client's side of the socket, which neither sends nor closes.
        _client: futures::channel::mpsc::UnboundedSender<Incoming>,
    }

    /// A WebSocket link over `sink` for a burst of `burst` ready events of about `bytes` each.
    /// Time is paused once the burst is on the bus.
    async fn slow_link(burst: usize, bytes: usize, sink: Slow) -> SlowLink {
        let crate::http::events::burst::ReadyBurst {
            node,
            events,
            link,
            published,
            ..
        } = crate::http::events::burst::ready_burst(TransportKind::WebSocket, burst, |index| {
            format!("{index:>8} {}", "x".repeat(bytes))
        })
        .await;
        let links = node.subscribe(EventFilter {
            kinds: vec![troupe_actors::event::KindPattern::Family("link".into())],
            ..EventFilter::all()
        });
        tokio::time::pause();
        let (client, incoming) = futures::channel::mpsc::unbounded::<Incoming>();
        let state = Link {
            node: node.core().node_id.clone(),
            events,
            link,
            heartbeat: Duration::from_secs(3600),
            limit: None,
            greeting: None,
            progress: SendProgress::default(),
        };
        let running = tokio::spawn(run(state, sink, incoming));
        SlowLink {
            node,
            running,
            published,
            links,
            _client: client,
        }
    }

    /// The reason of the first `link.disconnected` event on `links`.
    async fn disconnect_reason(links: &mut troupe_actors::event::Subscription) -> String {
        loop {
            match links.recv().await {
                Some(Delivery::Event(event)) => {
                    if let troupe_actors::event::EventData::LinkDisconnected(gone) = &event.data {
                        return gone.reason.clone();
                    }
                }
                Some(Delivery::Lagged(_)) => {}
                None => panic!("the bus ended"),
            }
        }
    }

    /// Drives a link whose client takes a frame every 100 ms through a ready burst of 150
    /// events of about `bytes` each: every event arrives, in order, in batches of about
    /// [`MAX_BATCH_BYTES`] at most, and the link is still up well after the last one.
    async fn read_slowly(bytes: usize) {
        let burst = 150;
        let (sink, mut written) = Slow::new(Some(Duration::from_millis(100)));
        let SlowLink {
            node,
            running,
            published,
            _client,
            ..
        } = slow_link(burst, bytes, sink).await;
        let started = tokio::time::Instant::now();
        let (mut ids, mut batch_bytes, mut largest) = (Vec::new(), 0, 0);
        // Up to the last batch's flush.
        while ids.len() < burst || batch_bytes > 0 {
            match written.recv().await {
                Some(Written::Frame(Outgoing::SharedText(text))) => {
                    let frame: serde_json::Value = serde_json::from_str(text.as_str()).unwrap();
                    assert_eq!(frame["event"]["kind"], "session.progress", "{frame}");
                    ids.push(frame["event"]["id"].as_str().unwrap().to_owned());
                    batch_bytes += text.as_str().len();
                    largest = largest.max(text.as_str().len());
                }
                Some(Written::Frame(other)) => panic!("unexpected frame {other:?}"),
                Some(Written::Flush) => {
                    assert!(
                        batch_bytes < MAX_BATCH_BYTES + largest,
                        "a batch of {batch_bytes} bytes"
                    );
                    batch_bytes = 0;
                }
                None => panic!(
                    "the link ended after {} of {burst} events, {:?} in",
                    ids.len(),
                    started.elapsed()
                ),
            }
        }
        assert_eq!(ids, published, "every event, in order");
        assert!(started.elapsed() > SEND_TIMEOUT, "the burst took its time");
        // Well after the last frame, the link is still there.
        tokio::time::sleep(SEND_TIMEOUT * 3).await;
        assert!(!running.is_finished(), "the link ended");
        running.abort();
        node.shutdown().await;
    }

    /// Regression: the ready events (up to 256) were written under one 10 s timeout for the
    /// whole batch, so a client that took a frame every 100 ms was cut as one that "stopped
    /// reading (nothing accepted for 10s)" after 100 frames of one batch.
    #[tokio::test]
    async fn a_client_that_reads_steadily_but_slowly_gets_every_event_and_keeps_its_link() {
        read_slowly(16).await;
    }

    /// Regression: a batch had no bound on its bytes (256 large `session.output` events are
    /// megabytes, flushed at once), as SSE chunks have.
    #[tokio::test]
    async fn batches_of_large_events_are_bounded_by_bytes() {
        read_slowly(4096).await;
    }

    /// A client that accepts nothing is still cut once the send timeout has passed without a
    /// frame taken, and its link says why.
    #[tokio::test]
    async fn a_client_that_accepts_nothing_is_cut_after_the_send_timeout() {
        let (sink, _written) = Slow::new(None);
        let SlowLink {
            node,
            running,
            mut links,
            _client,
            ..
        } = slow_link(3, 16, sink).await;
        let started = tokio::time::Instant::now();
        running.await.unwrap();
        let waited = started.elapsed();
        assert!(
            waited >= SEND_TIMEOUT && waited <= SEND_TIMEOUT + SEND_TIMEOUT / 5,
            "cut after {waited:?}"
        );
        let reason = disconnect_reason(&mut links).await;
        assert!(
            reason.contains("the client stopped reading (nothing accepted for 10s)"),
            "{reason}"
        );
        node.shutdown().await;
    }
}
