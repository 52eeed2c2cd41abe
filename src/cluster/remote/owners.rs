//! What this node knows of other nodes' sessions: their owner and the last record it heard of,
//! built from the owner's relayed session events and refreshed by the owner's own answers
//! (forwarded spawns, gets and cluster listings). It routes a session request to its owner, and
//! it is the "last known record" shown while the owner is down.
//!
//! When this node sees a member go down (`node.down`), it publishes one `session.unreachable`
//! event per session of that member that had not ended, and marks them unreachable until the
//! member is back (`node.joined`). The owner's store stays the truth: nothing here is ever
//! presented as the owner's answer, and once the owner answers again its answers are shown.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use serde::Deserialize;
use serde_json::{Value, json};
use troupe_actors::event::{
    Delivery, Event, EventData, EventFilter, EventKind, KindPattern, SessionKindTag,
    SessionUnreachable,
};
use troupe_actors::ids::{NodeId, SessionId, Timestamp};
use troupe_actors::session::SessionState;

use crate::node::NodeCore;

/// Sessions of other nodes remembered (the oldest are forgotten first).
pub const MAX_KNOWN_SESSIONS: usize = 100_000;
/// Longest `reason` kept for a known session.
const MAX_REASON_CHARS: usize = 200;

/// The last record this node has of another node's session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnownSession {
    /// The session.
    pub id: SessionId,
    /// Its owner.
    pub node: NodeId,
    /// Its kind.
    pub kind: SessionKindTag,
    /// Its last known state.
    pub state: SessionState,
    /// Its priority.
    pub priority: u8,
    /// When it was accepted (the time of its `session.queued`, or the owner's record).
    pub created_at: Timestamp,
    /// When its process started.
    pub started_at: Option<Timestamp>,
    /// When it ended.
    pub ended_at: Option<Timestamp>,
    /// Its exit code.
    pub exit_code: Option<i32>,
    /// The signal that ended it.
    pub signal: Option<i32>,
    /// Why it ended.
    pub reason: Option<String>,
    /// Its process id.
    pub pid: Option<u32>,
    /// Its labels, once a record of the owner's passed through this node (events do not carry
    /// them).
    pub labels: Option<BTreeMap<String, String>>,
    /// True from the owner's `node.down` until it joins again.
    pub unreachable: bool,
}

impl KnownSession {
    /// True when it had not ended when last heard of.
    pub fn is_open(&self) -> bool {
        !self.state.is_terminal()
    }

    /// The record as the API shows a session it cannot reach: the fields of a session record
    /// that are known, `state` `"unreachable"` for a session that had not ended (its
    /// `last_state` says where it was) or its final state, `labels` `null` when unknown.
    pub fn to_json(&self) -> Value {
        let shown = if self.is_open() {
            "unreachable"
        } else {
            self.state.as_str()
        };
        json!({
            "id": self.id,
            "node": self.node,
            "kind": self.kind,
            "state": shown,
            "last_state": self.state,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "exit_code": self.exit_code,
            "signal": self.signal,
            "reason": self.reason,
            "labels": self.labels,
            "priority": self.priority,
            "pid": self.pid,
            "queue_position": null,
        })
    }

    /// Moves to `state` unless that would go back (an ended session stays ended; a running one
    /// never becomes queued again from an older report).
    fn advance(&mut self, state: SessionState) -> bool {
        let rank = |state: SessionState| match state {
            SessionState::Queued => 0,
            SessionState::Starting => 1,
            SessionState::Running => 2,
            _ => 3,
        };
        if rank(state) > rank(self.state) || (rank(state) < 3 && rank(state) == rank(self.state)) {
            self.state = state;
            return true;
        }
        false
    }
}

/// A session record in the API's JSON shape (the fields this table keeps).
#[derive(Debug, Deserialize)]
pub struct RecordSnapshot {
    id: SessionId,
    node: NodeId,
    kind: SessionKindTag,
    state: SessionState,
    created_at: Timestamp,
    #[serde(default)]
    started_at: Option<Timestamp>,
    #[serde(default)]
    ended_at: Option<Timestamp>,
    #[serde(default)]
    exit_code: Option<i32>,
    #[serde(default)]
    signal: Option<i32>,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    priority: u8,
    #[serde(default)]
    pid: Option<u32>,
}

/// The table itself: pure, fed events and records by [`SessionOwners`].
#[derive(Debug, Default)]
pub struct OwnersTable {
    known: HashMap<SessionId, KnownSession>,
    order: VecDeque<SessionId>,
}

fn clip(reason: &Option<String>) -> Option<String> {
    reason
        .as_ref()
        .map(|reason| reason.chars().take(MAX_REASON_CHARS).collect())
}

impl OwnersTable {
    /// What is known of `id`.
    pub fn get(&self, id: &SessionId) -> Option<&KnownSession> {
        self.known.get(id)
    }

    /// Sessions of `node` that had not ended when last heard of, oldest first.
    pub fn open_sessions_of(&self, node: &NodeId) -> Vec<KnownSession> {
        self.order
            .iter()
            .filter_map(|id| self.known.get(id))
            .filter(|known| known.node == *node && known.is_open())
            .cloned()
            .collect()
    }

    /// The nodes that own a session that had not ended when last heard of.
    pub fn open_owners(&self) -> std::collections::BTreeSet<NodeId> {
        self.known
            .values()
            .filter(|known| known.is_open())
            .map(|known| known.node.clone())
            .collect()
    }

    fn insert(&mut self, known: KnownSession) {
        let id = known.id.clone();
        if self.known.insert(id.clone(), known).is_none() {
            self.order.push_back(id);
            if self.order.len() > MAX_KNOWN_SESSIONS
                && let Some(oldest) = self.order.pop_front()
            {
                self.known.remove(&oldest);
            }
        }
    }

    /// Takes in one event seen on this node's bus (`this` is this node). Session events of
    /// other nodes update their sessions; this node's own `node.down` marks the open sessions of
    /// that node unreachable and returns them (to publish `session.unreachable` for each); its
    /// `node.joined` clears the mark.
    pub fn apply(&mut self, this: &NodeId, event: &Event) -> Vec<KnownSession> {
        match &event.data {
            EventData::NodeDown(member) if event.node() == this => {
                let mut newly = Vec::new();
                for known in self.known.values_mut() {
                    if known.node == member.node && known.is_open() && !known.unreachable {
                        known.unreachable = true;
                        newly.push(known.clone());
                    }
                }
                newly.sort_by_key(|known| known.created_at);
                return newly;
            }
            EventData::NodeJoined(member) if event.node() == this => {
                for known in self.known.values_mut() {
                    if known.node == member.node {
                        known.unreachable = false;
                    }
                }
                return Vec::new();
            }
            _ => {}
        }
        let Some(id) = &event.session else {
            return Vec::new();
        };
        if event.node() == this {
            return Vec::new();
        }
        if let EventData::SessionQueued(queued) = &event.data {
            match self.known.get_mut(id) {
                Some(known) => {
                    known.kind = queued.kind;
                    known.priority = queued.priority;
                }
                None => self.insert(KnownSession {
                    id: id.clone(),
                    node: event.node().clone(),
                    kind: queued.kind,
                    state: SessionState::Queued,
                    priority: queued.priority,
                    created_at: event.at,
                    started_at: None,
                    ended_at: None,
                    exit_code: None,
                    signal: None,
                    reason: None,
                    pid: None,
                    labels: None,
                    unreachable: false,
                }),
            }
            return Vec::new();
        }
        let Some(known) = self.known.get_mut(id) else {
            return Vec::new();
        };
        match &event.data {
            EventData::SessionStarted(started) if known.advance(SessionState::Running) => {
                known.started_at = Some(event.at);
                known.pid = started.pid;
            }
            EventData::SessionSucceeded(ended)
            | EventData::SessionFailed(ended)
            | EventData::SessionCancelled(ended)
            | EventData::SessionTimedOut(ended)
            | EventData::SessionInterrupted(ended) => {
                let state = match event.kind() {
                    EventKind::SessionSucceeded => SessionState::Succeeded,
                    EventKind::SessionFailed => SessionState::Failed,
                    EventKind::SessionCancelled => SessionState::Cancelled,
                    EventKind::SessionTimedOut => SessionState::TimedOut,
                    _ => SessionState::Interrupted,
                };
                if known.advance(state) {
                    known.ended_at = Some(event.at);
                    known.exit_code = ended.exit_code;
                    known.signal = ended.signal;
                    known.reason = clip(&ended.reason);
                }
            }
            _ => {}
        }
        Vec::new()
    }

    /// Takes in a record of another node's session as its owner answered it.
    pub fn observe(&mut self, this: &NodeId, record: &RecordSnapshot) {
        if record.node == *this {
            return;
        }
        let fresh = KnownSession {
            id: record.id.clone(),
            node: record.node.clone(),
            kind: record.kind,
            state: record.state,
            priority: record.priority,
            created_at: record.created_at,
            started_at: record.started_at,
            ended_at: record.ended_at,
            exit_code: record.exit_code,
            signal: record.signal,
            reason: clip(&record.reason),
            pid: record.pid,
            labels: Some(record.labels.clone()),
            unreachable: false,
        };
        match self.known.get_mut(&record.id) {
            None => self.insert(fresh),
            Some(known) => {
                // The owner answered: it is reachable, and its record is the truth unless it
                // is older than what the events already said.
                known.unreachable = false;
                known.labels = fresh.labels;
                known.created_at = fresh.created_at;
                if known.advance(record.state) {
                    known.started_at = fresh.started_at.or(known.started_at);
                    known.ended_at = fresh.ended_at;
                    known.exit_code = fresh.exit_code;
                    known.signal = fresh.signal;
                    known.reason = fresh.reason;
                    known.pid = fresh.pid.or(known.pid);
                }
            }
        }
    }
}

/// The table shared by the node's front ends, fed by one task that follows the bus and by the
/// owner's answers that pass through this node. The lock is held only to read or update a few
/// entries, never across an await.
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
        self.table().get(id).map(|known| known.node.clone())
    }

    /// What is known of `id`.
    pub fn known(&self, id: &SessionId) -> Option<KnownSession> {
        self.table().get(id).cloned()
    }

    /// Sessions of `node` that had not ended when last heard of, oldest first.
    pub fn open_sessions_of(&self, node: &NodeId) -> Vec<KnownSession> {
        self.table().open_sessions_of(node)
    }

    /// The nodes that own a session that had not ended when last heard of.
    pub fn open_owners(&self) -> std::collections::BTreeSet<NodeId> {
        self.table().open_owners()
    }

    /// Takes in a session record (the API's JSON) another node answered with.
    pub fn observe_json(&self, this: &NodeId, record: &Value) {
        if let Ok(record) = RecordSnapshot::deserialize(record) {
            self.table().observe(this, &record);
        }
    }

    /// Follows this node's bus: session events of other nodes, and this node's `node.down` /
    /// `node.joined`, after which it publishes `session.unreachable` for each session that
    /// turned unreachable.
    pub fn follow(&self, core: &NodeCore) {
        let kinds = SESSION_LIFE
            .into_iter()
            .chain([EventKind::NodeDown, EventKind::NodeJoined]);
        let filter = EventFilter {
            kinds: kinds.map(KindPattern::Exact).collect(),
            ..EventFilter::default()
        };
        let mut events = core.tree.events.subscribe(filter);
        let bus = core.tree.events.clone();
        let this = core.node_id.clone();
        let owners = self.clone();
        let store = core.store.clone();
        tokio::spawn(async move {
            // Subscribed first, so nothing falls between what the log holds and what comes.
            owners.seed(&this, &store).await;
            while let Some(delivery) = events.recv().await {
                match delivery {
                    Delivery::Event(event) => {
                        let unreachable = owners.table().apply(&this, &event);
                        for known in unreachable {
                            bus.publish(
                                Some(known.id),
                                EventData::SessionUnreachable(SessionUnreachable {
                                    node: known.node,
                                }),
                            );
                        }
                    }
                    Delivery::Lagged(lagged) => {
                        tracing::warn!(
                            missed = lagged.missed,
                            "the table of other nodes' sessions fell behind the event bus; \
                             some owners or states may be missing until they are seen again"
                        );
                    }
                }
            }
        });
    }
}

impl SessionOwners {
    /// Takes in what this node's event log holds of other nodes' sessions (relayed before it
    /// last stopped), so that after a restart it still knows their owners: a session whose
    /// owner is down is then answered as unreachable, naming the owner, not as unknown. Only
    /// session events: past `node.down` / `node.joined` say nothing of now. Read page by page;
    /// events also delivered live later are taken in twice, which changes nothing (a session's
    /// state only moves forward).
    async fn seed(&self, this: &NodeId, store: &crate::store::Store) {
        let filter = EventFilter {
            kinds: SESSION_LIFE.into_iter().map(KindPattern::Exact).collect(),
            ..EventFilter::default()
        };
        let (mut after, mut taken) = (0, 0usize);
        loop {
            let page = match store.events_after_pos(after, &filter, SEED_PAGE).await {
                Ok(page) => page,
                Err(error) => {
                    tracing::warn!(
                        %error,
                        "cannot read other nodes' sessions from the event log; their owners \
                         are learned again as their events arrive"
                    );
                    return;
                }
            };
            {
                let mut table = self.table();
                for item in &page.events {
                    if item.event.node() != this {
                        table.apply(this, &item.event);
                        taken += 1;
                    }
                }
            }
            if !page.more || page.through_pos <= after {
                break;
            }
            after = page.through_pos;
        }
        if taken > 0 {
            tracing::debug!(
                events = taken,
                "other nodes' sessions read from the event log"
            );
        }
    }
}

/// Events read from the log per page when the table is seeded.
const SEED_PAGE: usize = 1_000;

/// The events of a session's life, which tell its owner and its state.
const SESSION_LIFE: [EventKind; 7] = [
    EventKind::SessionQueued,
    EventKind::SessionStarted,
    EventKind::SessionSucceeded,
    EventKind::SessionFailed,
    EventKind::SessionCancelled,
    EventKind::SessionTimedOut,
    EventKind::SessionInterrupted,
];

#[cfg(test)]
mod tests {
    use super::*;
    use troupe_actors::event::{
        EventId, NodeMembership, SessionEnded, SessionQueued, SessionStarted,
    };

    fn node(name: &str) -> NodeId {
        NodeId::new(name).unwrap()
    }

    fn session(name: &str) -> SessionId {
        SessionId::new(name).unwrap()
    }

    fn event(from: &str, seq: u64, session: Option<&str>, data: EventData) -> Event {
        Event {
            rendered: Default::default(),
            id: EventId::new(node(from), seq),
            at: Timestamp::from_micros(1_700_000_000_000_000 + seq),
            session: session.map(self::session),
            data,
        }
    }

    fn queued() -> EventData {
        EventData::SessionQueued(SessionQueued {
            kind: SessionKindTag::Command,
            priority: 5,
            position: 1,
        })
    }

    fn ended() -> SessionEnded {
        SessionEnded {
            exit_code: Some(0),
            signal: None,
            reason: None,
            duration_ms: 10,
        }
    }

    fn membership(name: &str) -> NodeMembership {
        NodeMembership {
            node: node(name),
            addr: None,
            generation: Some(1),
        }
    }

    #[test]
    fn relayed_events_build_the_last_known_record_and_a_down_owner_makes_open_ones_unreachable() {
        let this = node("b");
        let mut table = OwnersTable::default();
        table.apply(&this, &event("c", 1, Some("s-run"), queued()));
        table.apply(
            &this,
            &event(
                "c",
                2,
                Some("s-run"),
                EventData::SessionStarted(SessionStarted {
                    program: "sh".into(),
                    pid: Some(42),
                }),
            ),
        );
        table.apply(&this, &event("c", 3, Some("s-done"), queued()));
        table.apply(
            &this,
            &event("c", 4, Some("s-done"), EventData::SessionSucceeded(ended())),
        );
        // This node's own sessions are not tracked here.
        table.apply(&this, &event("b", 1, Some("s-mine"), queued()));
        assert!(table.get(&session("s-mine")).is_none());

        let running = table.get(&session("s-run")).unwrap();
        assert_eq!(running.state, SessionState::Running);
        assert_eq!(running.pid, Some(42));
        assert_eq!(running.node, node("c"));
        assert_eq!(
            table.get(&session("s-done")).unwrap().state,
            SessionState::Succeeded
        );

        // Another node's view of a node.down changes nothing; this node's own does, once.
        let relayed_down = event("a", 9, None, EventData::NodeDown(membership("c")));
        assert!(table.apply(&this, &relayed_down).is_empty());
        let down = event("b", 2, None, EventData::NodeDown(membership("c")));
        let unreachable = table.apply(&this, &down);
        assert_eq!(
            unreachable
                .iter()
                .map(|k| k.id.as_str())
                .collect::<Vec<_>>(),
            ["s-run"]
        );
        assert!(table.apply(&this, &down).is_empty(), "once per session");
        let shown = table.get(&session("s-run")).unwrap().to_json();
        assert_eq!(shown["state"], "unreachable");
        assert_eq!(shown["last_state"], "running");
        assert_eq!(shown["kind"], "command");
        assert_eq!(shown["pid"], 42);
        assert!(shown["labels"].is_null());
        assert_eq!(
            table.get(&session("s-done")).unwrap().to_json()["state"],
            "succeeded"
        );

        // The owner is back and its restart interrupted the run: the relayed event ends it.
        table.apply(
            &this,
            &event("b", 3, None, EventData::NodeJoined(membership("c"))),
        );
        assert!(!table.get(&session("s-run")).unwrap().unreachable);
        table.apply(
            &this,
            &event(
                "c",
                5,
                Some("s-run"),
                EventData::SessionInterrupted(SessionEnded {
                    exit_code: None,
                    signal: Some(9),
                    reason: Some("the node stopped".into()),
                    duration_ms: 5,
                }),
            ),
        );
        assert_eq!(
            table.get(&session("s-run")).unwrap().state,
            SessionState::Interrupted
        );
        assert!(table.open_sessions_of(&node("c")).is_empty());
    }

    #[test]
    fn owner_records_add_labels_and_never_move_a_session_back() {
        let this = node("b");
        let mut table = OwnersTable::default();
        let record = |state: &str| {
            json!({"id": "s-1", "node": "c", "kind": "command", "state": state,
                   "created_at": "2023-11-14T22:13:20.000000Z", "labels": {"team": "web"},
                   "priority": 3, "pid": null, "spec": {"program": "sh"}})
        };
        let snapshot = |state: &str| RecordSnapshot::deserialize(record(state)).unwrap();
        table.observe(&this, &snapshot("queued"));
        let known = table.get(&session("s-1")).unwrap();
        assert_eq!(known.labels.as_ref().unwrap()["team"], "web");
        assert_eq!(known.priority, 3);
        table.apply(
            &this,
            &event("c", 7, Some("s-1"), EventData::SessionCancelled(ended())),
        );
        // An older answer (still queued) arriving after the end does not reopen it.
        table.observe(&this, &snapshot("running"));
        assert_eq!(
            table.get(&session("s-1")).unwrap().state,
            SessionState::Cancelled
        );
        // A record of this node's own session is not kept.
        let mut own = record("running");
        own["node"] = json!("b");
        own["id"] = json!("s-own");
        table.observe(&this, &RecordSnapshot::deserialize(own).unwrap());
        assert!(table.get(&session("s-own")).is_none());
    }

    #[test]
    fn the_table_is_bounded() {
        let this = node("b");
        let mut table = OwnersTable::default();
        for i in 0..(MAX_KNOWN_SESSIONS + 10) {
            table.apply(
                &this,
                &event("c", i as u64 + 1, Some(&format!("s-{i}")), queued()),
            );
        }
        assert_eq!(table.known.len(), MAX_KNOWN_SESSIONS);
        assert!(table.get(&session("s-0")).is_none());
        assert!(
            table
                .get(&session(&format!("s-{MAX_KNOWN_SESSIONS}")))
                .is_some()
        );
    }
}
