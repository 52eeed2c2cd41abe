//! The event model: `{id, at, node, session?, kind, data}`.
//!
//! Kinds are one Rust enum ([`EventKind`]) rendered as dotted names (`session.output`), and every
//! kind has a typed payload ([`EventData`]). The payload enum is externally tagged so it travels
//! through the binary cluster codec; front ends render the `{kind, data}` JSON shape with
//! [`EventData::data`], which serializes just the payload.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::health::HealthStatus;
use crate::ids::{ActorPath, LinkId, NodeId, SessionId, Timestamp};

/// An event's identity: the node that published it and that node's sequence number, which only
/// grows. `(node, seq)` orders a node's events and deduplicates relayed copies.
///
/// Written as `node:seq` (an SSE `id:`, a `Last-Event-ID`, an `after=` parameter).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EventId {
    /// The publishing node.
    pub node: NodeId,
    /// Its sequence number on that node, from 1.
    pub seq: u64,
}

impl EventId {
    /// Builds an id.
    pub fn new(node: NodeId, seq: u64) -> Self {
        Self { node, seq }
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.node, self.seq)
    }
}

impl fmt::Debug for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EventId({self})")
    }
}

/// Why a string is not an event id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid event id {0:?}: expected NODE:SEQ, e.g. \"node-a:42\"")]
pub struct InvalidEventId(pub String);

impl FromStr for EventId {
    type Err = InvalidEventId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let refuse = || InvalidEventId(s.chars().take(80).collect());
        let (node, seq) = s.rsplit_once(':').ok_or_else(refuse)?;
        let node = NodeId::new(node).map_err(|_| refuse())?;
        let seq = seq.parse::<u64>().map_err(|_| refuse())?;
        Ok(Self { node, seq })
    }
}

impl Serialize for EventId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            serializer.collect_str(self)
        } else {
            (&self.node, self.seq).serialize(serializer)
        }
    }
}

impl<'de> Deserialize<'de> for EventId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        if deserializer.is_human_readable() {
            let text = String::deserialize(deserializer)?;
            text.parse().map_err(serde::de::Error::custom)
        } else {
            let (node, seq) = <(NodeId, u64)>::deserialize(deserializer)?;
            Ok(Self { node, seq })
        }
    }
}

/// One thing that happened on some node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Node and sequence number.
    pub id: EventId,
    /// When the publishing node accepted it.
    pub at: Timestamp,
    /// The session it concerns, if any.
    pub session: Option<SessionId>,
    /// Kind and payload.
    pub data: EventData,
    /// The front ends' rendering of this event, made once and shared by every subscriber (not
    /// part of the event's value: see [`RenderCache`]).
    #[serde(skip)]
    pub rendered: RenderCache,
}

impl Event {
    /// An event with an empty [`RenderCache`].
    pub fn new(id: EventId, at: Timestamp, session: Option<SessionId>, data: EventData) -> Self {
        Self {
            id,
            at,
            session,
            data,
            rendered: RenderCache::default(),
        }
    }

    /// The node that published it.
    pub fn node(&self) -> &NodeId {
        &self.id.node
    }

    /// Its kind.
    pub fn kind(&self) -> EventKind {
        self.data.kind()
    }

    /// About the memory this event holds, in bytes: itself, [`EVENT_OVERHEAD_BYTES`] and its
    /// payload's texts ([`EventData::text_bytes`]); not a rendering kept in its
    /// [`RenderCache`]. Cheap: lengths only, nothing is encoded.
    pub fn approx_bytes(&self) -> usize {
        size_of::<Self>() + EVENT_OVERHEAD_BYTES + self.data.text_bytes()
    }
}

/// What an event holds besides its struct and its payload's texts, about: the `Arc` it is shared
/// in, its node and session ids when it has its own copies (a relayed event decoded them: up to
/// 64 bytes each, with their `Arc`s), and the allocator's rounding.
pub const EVENT_OVERHEAD_BYTES: usize = 256;

impl EventData {
    /// The bytes of the texts this payload holds, each with its `String`: the part of an event's
    /// size that varies (output lines, messages, reasons). Ids are not counted (at most 64
    /// bytes, in [`EVENT_OVERHEAD_BYTES`]). Cheap: lengths only.
    pub fn text_bytes(&self) -> usize {
        fn text(text: &str) -> usize {
            size_of::<String>() + text.len()
        }
        fn maybe(value: &Option<String>) -> usize {
            value.as_deref().map_or(0, text)
        }
        fn texts(values: &[String]) -> usize {
            values.iter().map(|value| text(value)).sum()
        }
        match self {
            Self::SessionOutput(output) => texts(&output.lines),
            Self::SessionStarted(started) => text(&started.program),
            Self::SessionProgress(progress) => text(&progress.message),
            Self::SessionRateLimited(limited) => maybe(&limited.provider) + text(&limited.line),
            Self::SessionSucceeded(ended)
            | Self::SessionFailed(ended)
            | Self::SessionCancelled(ended)
            | Self::SessionTimedOut(ended)
            | Self::SessionInterrupted(ended) => maybe(&ended.reason),
            Self::ProviderRateLimited(limited) => text(&limited.provider) + text(&limited.model),
            Self::ProviderRetry(retry) => {
                text(&retry.provider) + text(&retry.model) + text(&retry.reason)
            }
            Self::ProviderBreakerOpened(breaker)
            | Self::ProviderBreakerHalfOpen(breaker)
            | Self::ProviderBreakerClosed(breaker) => {
                text(&breaker.provider) + maybe(&breaker.reason)
            }
            Self::ProviderFallback(fallback) => {
                text(&fallback.from) + text(&fallback.to) + text(&fallback.reason)
            }
            Self::ProviderRecovered(recovered) => text(&recovered.provider),
            Self::ActorRestarted(restarted) => {
                text(restarted.supervisor.as_str())
                    + text(restarted.child.as_str())
                    + text(&restarted.reason)
            }
            Self::ActorEscalated(escalated) => {
                text(escalated.supervisor.as_str())
                    + text(escalated.child.as_str())
                    + text(&escalated.reason)
            }
            Self::HealthDegraded(changed) | Self::HealthRecovered(changed) => {
                texts(&changed.reasons)
            }
            Self::LinkConnected(connected) => maybe(&connected.peer),
            Self::LinkDisconnected(disconnected) => text(&disconnected.reason),
            Self::NodeJoined(member)
            | Self::NodeSuspected(member)
            | Self::NodeDown(member)
            | Self::NodeLeft(member) => maybe(&member.addr),
            Self::SessionQueued(_)
            | Self::SessionLongRunning(_)
            | Self::EventsLagged(_)
            | Self::SessionUnreachable(_) => 0,
        }
    }
}

/// An opaque slot in which the front ends keep their rendering of one event (its JSON text and
/// ready-made frames), filled by the first subscriber that needs it and shared by all the others
/// through the `Arc<Event>` the bus fans out: an event delivered to a thousand subscribers is
/// rendered once. The core never fills or reads it (it knows no JSON): it holds any value of one
/// type, which the front end chooses.
///
/// It is not part of the event's value: it is neither serialized nor compared, and a clone starts
/// empty (a cloned event may be changed, and must not keep a rendering of the original).
#[derive(Default)]
pub struct RenderCache(std::sync::OnceLock<Box<dyn std::any::Any + Send + Sync>>);

impl RenderCache {
    /// The rendering, made by `render` if there is none yet. `None` when the slot holds a value
    /// of another type than `T` (the caller then renders without the cache).
    pub fn get_or_init<T: std::any::Any + Send + Sync>(
        &self,
        render: impl FnOnce() -> T,
    ) -> Option<&T> {
        self.0
            .get_or_init(|| Box::new(render()))
            .downcast_ref::<T>()
    }
}

impl Clone for RenderCache {
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl PartialEq for RenderCache {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl fmt::Debug for RenderCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.get().is_some() {
            "RenderCache(filled)"
        } else {
            "RenderCache(empty)"
        })
    }
}

macro_rules! event_kinds {
    ($( $(#[$doc:meta])* $variant:ident($payload:ty) => $name:literal, )*) => {
        /// Every kind of event, rendered as a dotted name.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        pub enum EventKind {
            $( $(#[$doc])* #[serde(rename = $name)] $variant, )*
        }

        impl EventKind {
            /// All kinds, in declaration order.
            pub const ALL: &'static [EventKind] = &[$(EventKind::$variant),*];

            /// The dotted name, e.g. `session.output`.
            pub const fn as_str(self) -> &'static str {
                match self { $(EventKind::$variant => $name,)* }
            }

            /// Index in [`EventKind::ALL`], for per-kind counters.
            pub const fn index(self) -> usize {
                self as usize
            }
        }

        /// The typed payload of an event; the variant is the event's kind.
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
        pub enum EventData {
            $( $(#[$doc])* $variant($payload), )*
        }

        impl EventData {
            /// The kind of this payload.
            pub const fn kind(&self) -> EventKind {
                match self { $(EventData::$variant(_) => EventKind::$variant,)* }
            }

            /// The payload alone, for rendering `data` next to `kind`.
            pub fn data(&self) -> EventDataRef<'_> {
                EventDataRef(self)
            }
        }

        /// Serializes only the payload of an [`EventData`] (without the variant tag).
        pub struct EventDataRef<'a>(&'a EventData);

        impl Serialize for EventDataRef<'_> {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                match self.0 { $(EventData::$variant(payload) => payload.serialize(serializer),)* }
            }
        }
    };
}

event_kinds! {
    /// A session was accepted and waits for a slot.
    SessionQueued(SessionQueued) => "session.queued",
    /// A session's process started.
    SessionStarted(SessionStarted) => "session.started",
    /// Lines a session printed.
    SessionOutput(SessionOutput) => "session.output",
    /// Progress a session reported.
    SessionProgress(SessionProgress) => "session.progress",
    /// A session passed the long-running threshold (and again at each multiple).
    SessionLongRunning(SessionLongRunning) => "session.long_running",
    /// A session's agent hit a provider rate limit.
    SessionRateLimited(SessionRateLimited) => "session.rate_limited",
    /// A session ended successfully.
    SessionSucceeded(SessionEnded) => "session.succeeded",
    /// A session ended in failure.
    SessionFailed(SessionEnded) => "session.failed",
    /// A session was cancelled.
    SessionCancelled(SessionEnded) => "session.cancelled",
    /// A session ran past its timeout and was stopped.
    SessionTimedOut(SessionEnded) => "session.timed_out",
    /// A session was running when its node stopped or crashed.
    SessionInterrupted(SessionEnded) => "session.interrupted",
    /// A provider said "slow down".
    ProviderRateLimited(ProviderRateLimited) => "provider.rate_limited",
    /// A provider call is retried.
    ProviderRetry(ProviderRetry) => "provider.retry",
    /// A provider's circuit breaker opened.
    ProviderBreakerOpened(ProviderBreaker) => "provider.breaker_opened",
    /// A provider's circuit breaker lets probes through.
    ProviderBreakerHalfOpen(ProviderBreaker) => "provider.breaker_half_open",
    /// A provider's circuit breaker closed again.
    ProviderBreakerClosed(ProviderBreaker) => "provider.breaker_closed",
    /// A call moved to the next provider or model in the fallback chain.
    ProviderFallback(ProviderFallback) => "provider.fallback",
    /// A provider answers normally again.
    ProviderRecovered(ProviderRecovered) => "provider.recovered",
    /// A supervisor restarted a child.
    ActorRestarted(ActorRestarted) => "actor.restarted",
    /// A supervisor gave up and failed to its parent.
    ActorEscalated(ActorEscalated) => "actor.escalated",
    /// The node's health got worse.
    HealthDegraded(HealthChanged) => "health.degraded",
    /// The node's health is back to healthy.
    HealthRecovered(HealthChanged) => "health.recovered",
    /// A client link connected.
    LinkConnected(LinkConnected) => "link.connected",
    /// A client link went away.
    LinkDisconnected(LinkDisconnected) => "link.disconnected",
    /// A node joined the cluster.
    NodeJoined(NodeMembership) => "node.joined",
    /// A node stopped answering probes.
    NodeSuspected(NodeMembership) => "node.suspected",
    /// A node was declared down.
    NodeDown(NodeMembership) => "node.down",
    /// A node left the cluster cleanly.
    NodeLeft(NodeMembership) => "node.left",
    /// A subscriber fell behind and lost events (delivered to that subscriber only).
    EventsLagged(EventsLagged) => "events.lagged",
    /// A session of another node was open when that node went down: this node can no longer
    /// reach it (published by every node that saw the `node.down`, once per open session).
    /// Appended last so the wire index of every older kind stays the same.
    SessionUnreachable(SessionUnreachable) => "session.unreachable",
}

/// Why a string is not an event kind.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown event kind {0:?}; kinds look like \"session.output\" or a family like \"session.*\""
)]
pub struct UnknownKind(pub String);

impl FromStr for EventKind {
    type Err = UnknownKind;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        EventKind::ALL
            .iter()
            .copied()
            .find(|kind| kind.as_str() == s)
            .ok_or_else(|| UnknownKind(s.chars().take(80).collect()))
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The kind of agent run a session is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionKindTag {
    /// Any command-line program.
    Command,
    /// The Aider preset.
    Aider,
    /// A built-in chat run through a provider.
    Chat,
}

impl FromStr for SessionKindTag {
    type Err = String;

    /// Parses a kind as the API spells it (`command`, `aider`, `chat`); the error says which
    /// spellings exist.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "command" => Ok(Self::Command),
            "aider" => Ok(Self::Aider),
            "chat" => Ok(Self::Chat),
            other => Err(format!("kind={other:?}: use command, aider or chat")),
        }
    }
}

/// Which stream a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputStream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
    /// Tokens of a chat run.
    Tokens,
}

/// Payload of `session.queued`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionQueued {
    /// The session's kind.
    pub kind: SessionKindTag,
    /// Its priority, 0 (lowest) to 9.
    pub priority: u8,
    /// Its place in the queue, 1 for next.
    pub position: u64,
}

/// Payload of `session.started`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionStarted {
    /// The program that runs (no arguments: they may hold secrets).
    pub program: String,
    /// Its process id, when it is a process.
    pub pid: Option<u32>,
}

/// Payload of `session.output`: one line, or several coalesced when output floods.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionOutput {
    /// Where the lines came from.
    pub stream: OutputStream,
    /// Line number (from 1, per session) of the first line here.
    pub first_line: u64,
    /// The lines, without their line endings.
    pub lines: Vec<String>,
    /// Lines skipped in the event stream because of a flood; they are in the session's log.
    pub skipped: u64,
}

/// Payload of `session.progress`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionProgress {
    /// What the run is doing.
    pub message: String,
    /// Work done, when known.
    pub current: Option<u64>,
    /// Work in total, when known.
    pub total: Option<u64>,
}

/// Payload of `session.long_running`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionLongRunning {
    /// How long it has run.
    pub elapsed_secs: u64,
    /// The configured threshold.
    pub threshold_secs: u64,
}

/// Payload of `session.rate_limited`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRateLimited {
    /// The provider named in the output, when it names one.
    pub provider: Option<String>,
    /// When the agent says it retries, in milliseconds.
    pub retry_in_ms: Option<u64>,
    /// The line that said so.
    pub line: String,
}

/// Payload of the terminal session events.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionEnded {
    /// Process exit code, when it exited.
    pub exit_code: Option<i32>,
    /// Signal that ended it, when one did.
    pub signal: Option<i32>,
    /// Why, in words.
    pub reason: Option<String>,
    /// Run time (from start, or from queueing when it never started).
    pub duration_ms: u64,
}

/// Payload of `session.unreachable`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionUnreachable {
    /// The node that owns the session and went down.
    pub node: NodeId,
}

/// Where a rate limit was learnt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RateLimitSource {
    /// A 429/529 answer from the provider.
    Provider,
    /// troupe's own budget for the provider.
    Budget,
    /// The provider's rate-limit headers said the budget is spent.
    Headers,
}

/// Payload of `provider.rate_limited`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProviderRateLimited {
    /// Provider name from the configuration.
    pub provider: String,
    /// Model of the call.
    pub model: String,
    /// How long to wait, when known.
    pub retry_after_ms: Option<u64>,
    /// Who said so.
    pub source: RateLimitSource,
}

/// Payload of `provider.retry`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProviderRetry {
    /// Provider name.
    pub provider: String,
    /// Model of the call.
    pub model: String,
    /// Attempt about to be made (2 for the first retry).
    pub attempt: u32,
    /// Wait before it.
    pub delay_ms: u64,
    /// What failed.
    pub reason: String,
}

/// Payload of the `provider.breaker_*` events.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProviderBreaker {
    /// Provider name.
    pub provider: String,
    /// Why it changed.
    pub reason: Option<String>,
    /// For `breaker_opened`: how long it stays open.
    pub open_for_ms: Option<u64>,
}

/// Payload of `provider.fallback`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProviderFallback {
    /// `provider/model` that failed.
    pub from: String,
    /// `provider/model` tried next.
    pub to: String,
    /// Why.
    pub reason: String,
}

/// Payload of `provider.recovered`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProviderRecovered {
    /// Provider name.
    pub provider: String,
}

/// Payload of `actor.restarted`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActorRestarted {
    /// The supervisor that restarted it.
    pub supervisor: ActorPath,
    /// The restarted child.
    pub child: ActorPath,
    /// Why: the panic message or error of the failed instance.
    pub reason: String,
    /// Restarts of this child since the node started.
    pub restart_count: u64,
    /// Restarts by this supervisor inside its window.
    pub restarts_in_window: u32,
    /// The supervisor's allowance inside the window.
    pub max_restarts: u32,
    /// The window, in seconds.
    pub window_secs: u64,
    /// Backoff waited before the restart.
    pub delay_ms: u64,
}

/// Payload of `actor.escalated`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActorEscalated {
    /// The supervisor that gave up.
    pub supervisor: ActorPath,
    /// The child whose failure tipped it over.
    pub child: ActorPath,
    /// That failure.
    pub reason: String,
    /// Restarts inside the window.
    pub restarts_in_window: u32,
    /// The window, in seconds.
    pub window_secs: u64,
}

/// Payload of `health.degraded` and `health.recovered`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthChanged {
    /// The status before.
    pub from: HealthStatus,
    /// The status now.
    pub to: HealthStatus,
    /// What makes it so.
    pub reasons: Vec<String>,
}

/// What kind of link a client uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TransportKind {
    /// Server-Sent Events stream.
    Sse,
    /// WebSocket event stream.
    WebSocket,
    /// MCP over Streamable HTTP.
    McpHttp,
    /// MCP over WebSocket.
    McpWebSocket,
    /// MCP over stdio.
    McpStdio,
}

/// Payload of `link.connected`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkConnected {
    /// The link.
    pub link: LinkId,
    /// Its transport.
    pub transport: TransportKind,
    /// The client's address, when known.
    pub peer: Option<String>,
}

/// Payload of `link.disconnected`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkDisconnected {
    /// The link.
    pub link: LinkId,
    /// Its transport.
    pub transport: TransportKind,
    /// Why it ended.
    pub reason: String,
}

/// Payload of the `node.*` membership events.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeMembership {
    /// The node.
    pub node: NodeId,
    /// Its cluster address.
    pub addr: Option<String>,
    /// Its incarnation (grows when it restarts).
    pub generation: Option<u64>,
}

/// Payload of `events.lagged`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventsLagged {
    /// Events this subscriber did not receive (0 when unknown).
    pub missed: u64,
    /// The last event it did receive; re-read from there.
    pub resume_after: Option<EventId>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_render_as_dotted_names_and_parse_back() {
        for kind in EventKind::ALL {
            let json = serde_json::to_string(kind).unwrap();
            assert_eq!(json, format!("\"{}\"", kind.as_str()));
            assert_eq!(kind.as_str().parse::<EventKind>().unwrap(), *kind);
            assert_eq!(EventKind::ALL[kind.index()], *kind);
        }
        assert_eq!(
            EventKind::ALL.len(),
            30,
            "DESIGN.md lists 29 kinds; the cluster adds session.unreachable"
        );
        assert!("session.nope".parse::<EventKind>().is_err());
    }

    #[test]
    fn session_kinds_parse_as_they_serialize() {
        for kind in [
            SessionKindTag::Command,
            SessionKindTag::Aider,
            SessionKindTag::Chat,
        ] {
            let name = serde_json::to_value(kind).unwrap();
            assert_eq!(name.as_str().unwrap().parse::<SessionKindTag>(), Ok(kind));
        }
        let refused = "shell".parse::<SessionKindTag>().unwrap_err();
        assert!(refused.contains("command, aider or chat"), "{refused}");
    }

    #[test]
    fn event_ids_print_and_parse_as_node_colon_seq() {
        let id: EventId = "node-a:42".parse().unwrap();
        assert_eq!(id, EventId::new(NodeId::new("node-a").unwrap(), 42));
        assert_eq!(id.to_string(), "node-a:42");
        for bad in ["", "a", "a:", ":1", "a:-1", "a:x", "a b:1"] {
            assert!(bad.parse::<EventId>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn an_events_size_counts_its_texts() {
        let output = |lines: Vec<String>| {
            Event::new(
                EventId::new(NodeId::new("n").unwrap(), 1),
                Timestamp::now(),
                None,
                EventData::SessionOutput(SessionOutput {
                    stream: OutputStream::Stdout,
                    first_line: 1,
                    lines,
                    skipped: 0,
                }),
            )
        };
        let empty = output(Vec::new()).approx_bytes();
        assert_eq!(empty, size_of::<Event>() + EVENT_OVERHEAD_BYTES);
        let two = output(vec!["x".repeat(1000), "y".repeat(24)]).approx_bytes();
        assert_eq!(two - empty, 1024 + 2 * size_of::<String>());
    }

    #[test]
    fn data_renders_without_the_variant_tag() {
        let data = EventData::EventsLagged(EventsLagged {
            missed: 3,
            resume_after: None,
        });
        let json = serde_json::to_value(data.data()).unwrap();
        assert_eq!(json, serde_json::json!({"missed": 3, "resume_after": null}));
        assert_eq!(data.kind(), EventKind::EventsLagged);
    }
}
