//! The JSON shapes users see for events: `{id, at, node, session, kind, data}`.
//!
//! The core's event type is shaped for the wire (an externally tagged payload enum); this module
//! renders it the way DESIGN.md documents, for every front end (SSE, WebSocket, MCP, CLI).
//!
//! An event that goes to many subscribers is rendered once: [`RenderedEvent`] (its JSON text,
//! its SSE frame and its WebSocket text frame) is kept in the event's own
//! [`RenderCache`](troupe_actors::event::RenderCache) by the first subscriber that needs it, and
//! every other subscriber shares those bytes (reference-counted, never copied per subscriber).

use axum::extract::ws::Utf8Bytes;
use bytes::{BufMut, Bytes, BytesMut};
use serde::ser::{Serialize, SerializeMap, Serializer};
use troupe_actors::event::{Delivery, Event, EventKind, EventsLagged};
use troupe_actors::ids::{NodeId, Timestamp};

/// Serializes an [`Event`] as `{id, at, node, session, kind, data}`.
pub struct EventJson<'a>(pub &'a Event);

impl Serialize for EventJson<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let event = self.0;
        let mut map = serializer.serialize_map(Some(6))?;
        map.serialize_entry("id", &event.id)?;
        map.serialize_entry("at", &event.at)?;
        map.serialize_entry("node", event.node())?;
        map.serialize_entry("session", &event.session)?;
        map.serialize_entry("kind", event.kind().as_str())?;
        map.serialize_entry("data", &event.data.data())?;
        map.end()
    }
}

/// Serializes an `events.lagged` marker in the same shape, with `id: null` (it is not an event
/// of the bus, and must not move a client's resume position).
pub struct LaggedJson<'a> {
    /// The node the subscriber is attached to.
    pub node: &'a NodeId,
    /// The marker.
    pub lagged: &'a EventsLagged,
    /// When it is sent.
    pub at: Timestamp,
}

impl Serialize for LaggedJson<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(6))?;
        map.serialize_entry("id", &None::<()>)?;
        map.serialize_entry("at", &self.at)?;
        map.serialize_entry("node", self.node)?;
        map.serialize_entry("session", &None::<()>)?;
        map.serialize_entry("kind", EventKind::EventsLagged.as_str())?;
        map.serialize_entry("data", self.lagged)?;
        map.end()
    }
}

/// A delivery as one JSON text, and the SSE id it carries (none for lag markers).
pub fn delivery_to_json(node: &NodeId, delivery: &Delivery) -> (Option<String>, String) {
    match delivery {
        Delivery::Event(event) => (Some(event.id.to_string()), event_json(event)),
        Delivery::Lagged(lagged) => (None, lagged_json(node, lagged, Timestamp::now())),
    }
}

/// One event rendered for every front end, once. The three texts share one JSON rendering.
#[derive(Debug, Clone)]
pub struct RenderedEvent {
    /// `data: JSON\nid: ID\n\n`: the event as one Server-Sent Events frame.
    pub sse: Bytes,
    /// `{"type":"event","event":JSON}`: the event as one WebSocket text frame.
    pub ws: Utf8Bytes,
    /// The event's JSON text (a slice of `sse`).
    pub json: Bytes,
}

impl RenderedEvent {
    /// Renders `event` (without the cache).
    pub fn render(event: &Event) -> Self {
        let json = event_json(event);
        let id = event.id.to_string();
        let mut sse = BytesMut::with_capacity(json.len() + id.len() + 12);
        sse.put_slice(b"data: ");
        sse.put_slice(json.as_bytes());
        sse.put_slice(b"\nid: ");
        sse.put_slice(id.as_bytes());
        sse.put_slice(b"\n\n");
        let sse = sse.freeze();
        let json_bytes = sse.slice(6..6 + json.len());
        Self {
            sse,
            ws: Utf8Bytes::from(ws_event_frame(&json)),
            json: json_bytes,
        }
    }

    /// The rendering of `event`, made once and then shared through the event's render cache.
    pub fn of(event: &Event) -> std::borrow::Cow<'_, Self> {
        match event.rendered.get_or_init(|| Self::render(event)) {
            Some(rendered) => std::borrow::Cow::Borrowed(rendered),
            None => std::borrow::Cow::Owned(Self::render(event)),
        }
    }
}

/// A delivery as one SSE frame: an event's shared frame, or a lag marker's (no `id:` line, so
/// it does not move the client's resume position).
pub fn sse_frame(node: &NodeId, delivery: &Delivery) -> Bytes {
    match delivery {
        Delivery::Event(event) => RenderedEvent::of(event).sse.clone(),
        Delivery::Lagged(lagged) => lagged_sse_frame(node, lagged, Timestamp::now()),
    }
}

/// Appends a delivery's SSE frame to `chunk` (copying the shared bytes once, into the chunk).
pub fn append_sse_frame(node: &NodeId, delivery: &Delivery, chunk: &mut BytesMut) {
    match delivery {
        Delivery::Event(event) => chunk.extend_from_slice(&RenderedEvent::of(event).sse),
        Delivery::Lagged(lagged) => {
            chunk.extend_from_slice(&lagged_sse_frame(node, lagged, Timestamp::now()))
        }
    }
}

/// A delivery as one WebSocket text frame `{"type":"event","event":…}`.
pub fn ws_event_text(node: &NodeId, delivery: &Delivery) -> Utf8Bytes {
    match delivery {
        Delivery::Event(event) => RenderedEvent::of(event).ws.clone(),
        Delivery::Lagged(lagged) => {
            Utf8Bytes::from(ws_event_frame(&lagged_json(node, lagged, Timestamp::now())))
        }
    }
}

/// The SSE comment a stream sends when it has been idle (`: heartbeat`).
pub const SSE_HEARTBEAT: &[u8] = b": heartbeat\n\n";

fn event_json(event: &Event) -> String {
    serde_json::to_string(&EventJson(event)).unwrap_or_else(|error| {
        tracing::error!(%error, "an event could not be rendered as JSON");
        "{}".into()
    })
}

fn lagged_json(node: &NodeId, lagged: &EventsLagged, at: Timestamp) -> String {
    serde_json::to_string(&LaggedJson { node, lagged, at }).unwrap_or_else(|_| "{}".into())
}

fn lagged_sse_frame(node: &NodeId, lagged: &EventsLagged, at: Timestamp) -> Bytes {
    let json = lagged_json(node, lagged, at);
    let mut frame = BytesMut::with_capacity(json.len() + 8);
    frame.put_slice(b"data: ");
    frame.put_slice(json.as_bytes());
    frame.put_slice(b"\n\n");
    frame.freeze()
}

fn ws_event_frame(json: &str) -> String {
    format!(r#"{{"type":"event","event":{json}}}"#)
}

/// Serializes a session as the API shows it: `{id, node, kind, state, created_at, started_at,
/// ended_at, exit_code, signal, reason, labels, priority, timeout_secs, queue_position, pid,
/// spec}`. Environment values in the spec are redacted: a viewer token can read sessions.
pub struct SessionJson<'a>(pub &'a crate::session::SessionView);

impl Serialize for SessionJson<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use troupe_actors::session::SessionKind;
        let view = self.0;
        let record = &view.record;
        let spec = &record.spec;
        let spec_json = match &spec.kind {
            SessionKind::Command(command) => serde_json::json!({
                "program": command.program,
                "args": command.args,
                "env": command.env.keys().map(|key| (key.clone(), "(redacted)")).collect::<std::collections::BTreeMap<_, _>>(),
                "workdir": command.workdir,
            }),
            SessionKind::Aider(aider) => serde_json::json!({
                "message": aider.message,
                "files": aider.files,
                "model": aider.model,
                "args": aider.args,
                "workdir": aider.workdir,
                "git": aider.git,
            }),
            SessionKind::Chat(chat) => serde_json::json!({
                "model": chat.model,
                "message_count": chat.messages.len(),
            }),
        };
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("id", &record.id)?;
        map.serialize_entry("node", &record.node)?;
        map.serialize_entry("kind", &spec.kind.tag())?;
        map.serialize_entry("state", &record.state)?;
        map.serialize_entry("created_at", &record.created_at)?;
        map.serialize_entry("started_at", &record.started_at)?;
        map.serialize_entry("ended_at", &record.ended_at)?;
        map.serialize_entry("exit_code", &record.exit_code)?;
        map.serialize_entry("signal", &record.signal)?;
        map.serialize_entry("reason", &record.reason)?;
        map.serialize_entry("labels", &spec.labels)?;
        map.serialize_entry("priority", &spec.priority)?;
        map.serialize_entry("timeout_secs", &spec.timeout_secs)?;
        map.serialize_entry("idempotency_key", &spec.idempotency_key)?;
        map.serialize_entry("queue_position", &view.queue_position)?;
        map.serialize_entry("pid", &record.process.map(|process| process.pid))?;
        if view.existing {
            map.serialize_entry("existing", &true)?;
        }
        map.serialize_entry("spec", &spec_json)?;
        map.end()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use troupe_actors::event::{EventData, EventId, SessionProgress};
    use troupe_actors::ids::SessionId;

    #[test]
    fn events_render_in_the_documented_shape() {
        let event = Event {
            rendered: Default::default(),
            id: EventId::new(NodeId::new("a").unwrap(), 7),
            at: Timestamp::from_micros(1_700_000_000_000_000),
            session: Some(SessionId::new("s-1").unwrap()),
            data: EventData::SessionProgress(SessionProgress {
                message: "half".into(),
                current: Some(1),
                total: Some(2),
            }),
        };
        let json: serde_json::Value = serde_json::to_value(EventJson(&event)).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "id": "a:7",
                "at": "2023-11-14T22:13:20.000000Z",
                "node": "a",
                "session": "s-1",
                "kind": "session.progress",
                "data": {"message": "half", "current": 1, "total": 2}
            })
        );
    }

    /// The old path: each delivery as axum's `sse::Event`, `data` then `id`, through `Sse`.
    async fn axum_sse_bytes(frames: Vec<axum::response::sse::Event>) -> Vec<u8> {
        use axum::response::IntoResponse;
        let stream =
            futures::stream::iter(frames.into_iter().map(Ok::<_, std::convert::Infallible>));
        let response = axum::response::sse::Sse::new(stream).into_response();
        axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap()
            .to_vec()
    }

    fn tricky_events() -> Vec<Event> {
        let node = NodeId::new("node-a").unwrap();
        let messages = [
            "plain",
            "two\nlines\r\nand a \"quote\"",
            "unicode: é ✓ 🎭, a tab\t, a NUL \u{0}",
            "",
        ];
        messages
            .iter()
            .enumerate()
            .map(|(index, message)| Event {
                rendered: Default::default(),
                id: EventId::new(node.clone(), 40 + index as u64),
                at: Timestamp::from_micros(1_700_000_000_000_000 + index as u64),
                session: (index % 2 == 0).then(|| SessionId::new("s-1").unwrap()),
                data: EventData::SessionProgress(SessionProgress {
                    message: (*message).into(),
                    current: Some(index as u64),
                    total: None,
                }),
            })
            .collect()
    }

    #[tokio::test]
    async fn shared_sse_frames_are_byte_for_byte_what_axum_sse_wrote() {
        let node = NodeId::new("node-a").unwrap();
        let events = tricky_events();
        let at = Timestamp::from_micros(1_700_000_000_000_000);
        let lagged = EventsLagged {
            missed: 12,
            resume_after: Some(events[1].id.clone()),
        };
        let mut old = Vec::new();
        let mut new = Vec::new();
        for event in &events {
            let (id, json) = delivery_to_json(&node, &Delivery::Event(Arc::new(event.clone())));
            old.push(
                axum::response::sse::Event::default()
                    .data(json)
                    .id(id.unwrap()),
            );
            new.extend_from_slice(&sse_frame(&node, &Delivery::Event(Arc::new(event.clone()))));
        }
        old.push(axum::response::sse::Event::default().data(lagged_json(&node, &lagged, at)));
        new.extend_from_slice(&lagged_sse_frame(&node, &lagged, at));
        let old = axum_sse_bytes(old).await;
        assert_eq!(
            String::from_utf8_lossy(&new),
            String::from_utf8_lossy(&old),
            "the same frames, ids and lag marker included"
        );
        assert_eq!(new, old);
    }

    #[test]
    fn websocket_frames_and_json_are_the_old_texts() {
        let node = NodeId::new("node-a").unwrap();
        for event in tricky_events() {
            let delivery = Delivery::Event(Arc::new(event));
            let (_, json) = delivery_to_json(&node, &delivery);
            assert_eq!(
                ws_event_text(&node, &delivery).as_str(),
                format!(r#"{{"type":"event","event":{json}}}"#)
            );
            let Delivery::Event(event) = &delivery else {
                unreachable!()
            };
            assert_eq!(&RenderedEvent::of(event).json[..], json.as_bytes());
        }
        let lagged = Delivery::Lagged(EventsLagged {
            missed: 3,
            resume_after: None,
        });
        let text = ws_event_text(&node, &lagged);
        let frame: serde_json::Value = serde_json::from_str(text.as_str()).unwrap();
        assert_eq!(frame["type"], "event");
        assert_eq!(frame["event"]["kind"], "events.lagged");
        assert_eq!(frame["event"]["id"], serde_json::Value::Null);
        assert_eq!(frame["event"]["data"]["missed"], 3);
    }

    #[test]
    fn an_event_is_rendered_once_and_its_bytes_shared_but_a_clone_renders_afresh() {
        let node = NodeId::new("node-a").unwrap();
        let event = Arc::new(tricky_events().remove(1));
        let delivery = Delivery::Event(event.clone());
        let first = sse_frame(&node, &delivery);
        let second = sse_frame(&node, &delivery);
        assert_eq!(first.as_ptr(), second.as_ptr(), "one rendering, shared");
        assert_eq!(
            ws_event_text(&node, &delivery).as_str().as_ptr(),
            ws_event_text(&node, &delivery).as_str().as_ptr()
        );
        let mut changed = (*event).clone();
        changed.data = EventData::SessionProgress(SessionProgress {
            message: "changed".into(),
            current: None,
            total: None,
        });
        let rendered = sse_frame(&node, &Delivery::Event(Arc::new(changed)));
        assert!(
            String::from_utf8_lossy(&rendered).contains(r#""message":"changed""#),
            "a changed clone does not keep the original's rendering"
        );
    }

    #[test]
    fn lag_markers_have_no_id() {
        let node = NodeId::new("a").unwrap();
        let lagged = EventsLagged {
            missed: 4,
            resume_after: Some(EventId::new(node.clone(), 3)),
        };
        let (id, text) = delivery_to_json(&node, &Delivery::Lagged(lagged));
        assert_eq!(id, None);
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(json["kind"], "events.lagged");
        assert_eq!(json["id"], serde_json::Value::Null);
        assert_eq!(
            json["data"],
            serde_json::json!({"missed": 4, "resume_after": "a:3"})
        );
    }
}
