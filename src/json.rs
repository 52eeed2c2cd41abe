//! The JSON shapes users see for events: `{id, at, node, session, kind, data}`.
//!
//! The core's event type is shaped for the wire (an externally tagged payload enum); this module
//! renders it the way DESIGN.md documents, for every front end (SSE, WebSocket, MCP, CLI).

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
}

impl Serialize for LaggedJson<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(6))?;
        map.serialize_entry("id", &None::<()>)?;
        map.serialize_entry("at", &Timestamp::now())?;
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
        Delivery::Event(event) => (
            Some(event.id.to_string()),
            serde_json::to_string(&EventJson(event)).unwrap_or_else(|error| {
                tracing::error!(%error, "an event could not be rendered as JSON");
                "{}".into()
            }),
        ),
        Delivery::Lagged(lagged) => (
            None,
            serde_json::to_string(&LaggedJson { node, lagged }).unwrap_or_else(|_| "{}".into()),
        ),
    }
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
    use super::*;
    use troupe_actors::event::{EventData, EventId, SessionProgress};
    use troupe_actors::ids::SessionId;

    #[test]
    fn events_render_in_the_documented_shape() {
        let event = Event {
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
