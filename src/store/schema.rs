//! The store's tables, their key layout, and the JSON codec of their values. Every decode names
//! the table and the key, so bad or foreign data becomes a [`StoreError::Io`] that says where it
//! is, never a panic.

use std::fmt;

use redb::{ReadableTable, TableDefinition};
use serde::Serialize;
use serde::de::DeserializeOwned;
use troupe_actors::session::StoreError;

/// Version of the layout below; a file with another version is refused at open.
pub(super) const SCHEMA_VERSION: u64 = 1;

/// Session id → session record (JSON).
pub(super) const SESSIONS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("sessions");
/// (created_at µs, session id) → (): the listing order, newest last.
pub(super) const SESSION_ORDER: TableDefinition<'_, (u64, &str), ()> =
    TableDefinition::new("session_order");
/// (created_at µs, session id) → (): sessions not in a terminal state, oldest first.
pub(super) const UNFINISHED: TableDefinition<'_, (u64, &str), ()> =
    TableDefinition::new("unfinished");
/// (session id, n from 0) → transition (JSON).
pub(super) const TRANSITIONS: TableDefinition<'_, (&str, u64), &[u8]> =
    TableDefinition::new("transitions");
/// (session id, line number from 1) → `[stream, text]` (JSON).
pub(super) const OUTPUT: TableDefinition<'_, (&str, u64), &[u8]> = TableDefinition::new("output");
/// Session id → [`OutputCounters`] (JSON).
pub(super) const OUTPUT_COUNTERS: TableDefinition<'_, &str, &[u8]> =
    TableDefinition::new("output_counters");
/// Idempotency key → session id.
pub(super) const IDEMPOTENCY: TableDefinition<'_, &str, &str> = TableDefinition::new("idempotency");
/// Arrival position → event (JSON).
pub(super) const EVENTS: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("events");
/// (publishing node, sequence number) → arrival position.
pub(super) const EVENT_INDEX: TableDefinition<'_, (&str, u64), u64> =
    TableDefinition::new("event_index");
/// Counters: see the `META_*` keys.
pub(super) const META: TableDefinition<'_, &str, u64> = TableDefinition::new("meta");

/// [`SCHEMA_VERSION`] of the file.
pub(super) const META_SCHEMA: &str = "schema_version";
/// Approximate bytes of the event log (values plus per-entry overhead).
pub(super) const META_EVENT_BYTES: &str = "events.bytes";
/// Events in the log.
pub(super) const META_EVENT_COUNT: &str = "events.count";
/// Highest arrival position ever stored (survives retention).
pub(super) const META_LAST_POS: &str = "events.last_pos";
/// Prefix of the highest sequence number ever stored per publishing node (survives retention).
pub(super) const META_LAST_SEQ_PREFIX: &str = "events.last_seq/";

/// Prefix of the lowest sequence number of another node that may be missing from the log below
/// its highest one stored: a relayed batch whose write failed and has not come again yet (the
/// relay asks for it again from there after a restart). Absent when nothing is missing.
pub(super) const META_RELAY_GAP_PREFIX: &str = "events.relay_gap/";

/// Prefix of the sequence number through which a node's ids are reserved (this node only: it
/// may have handed out ids up to there that never reached the log).
pub(super) const META_RESERVED_PREFIX: &str = "events.reserved/";

/// The meta key holding `node`'s highest stored sequence number (kept for every node whose
/// events are stored, this one and the peers it relays, so a restarted node knows where each
/// relayed stream continues even after retention deleted the events).
pub(super) fn last_seq_key(node: &str) -> String {
    format!("{META_LAST_SEQ_PREFIX}{node}")
}

/// The meta key holding the lowest sequence number of `node` that may be missing from the log
/// ([`META_RELAY_GAP_PREFIX`]).
pub(super) fn relay_gap_key(node: &str) -> String {
    format!("{META_RELAY_GAP_PREFIX}{node}")
}

/// The meta key holding the sequence number through which `node`'s ids are reserved.
pub(super) fn reserved_key(node: &str) -> String {
    format!("{META_RESERVED_PREFIX}{node}")
}

/// Bytes an event costs in the log's budget besides its JSON value: the position key, the index
/// entry (node + seq + pos) and B-tree overhead, roughly.
pub(super) fn event_overhead(node: &str) -> u64 {
    48 + node.len() as u64
}

/// Per-session output bookkeeping.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub(super) struct OutputCounters {
    /// Highest line number seen (stored or not): the session's total.
    pub(super) last_line: u64,
    /// Lines stored.
    pub(super) stored_lines: u64,
    /// Bytes of text stored.
    pub(super) stored_bytes: u64,
    /// Lines seen past a cap and not stored.
    pub(super) truncated: u64,
    /// A cap was reached: every later line is counted, not stored.
    pub(super) capped: bool,
}

/// Encodes a value as JSON (the store's value format; the cluster wire codec stays in
/// `src/cluster`).
pub(super) fn encode<T: Serialize + ?Sized>(
    table: &str,
    key: impl fmt::Display,
    value: &T,
) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value)
        .map_err(|error| StoreError::Io(format!("cannot encode {table}[{key}]: {error}")))
}

/// Decodes a JSON value, naming the table and key when it is not what it should be.
pub(super) fn decode<T: DeserializeOwned>(
    table: &str,
    key: impl fmt::Display,
    bytes: &[u8],
) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|error| corrupt(table, key, error))
}

/// The error for a value that is not what its table holds.
pub(super) fn corrupt(table: &str, key: impl fmt::Display, why: impl fmt::Display) -> StoreError {
    StoreError::Io(format!(
        "corrupt value in table {table} at key {key}: {why}"
    ))
}

/// Turns redb's errors into [`StoreError::Io`] with a word on what was being done.
pub(super) trait OrIo<T> {
    /// Maps the error.
    fn or_io(self, doing: &str) -> Result<T, StoreError>;
}

impl<T, E: Into<redb::Error>> OrIo<T> for Result<T, E> {
    fn or_io(self, doing: &str) -> Result<T, StoreError> {
        self.map_err(|error| StoreError::Io(format!("{doing}: {}", error.into())))
    }
}

/// Reads a counter from the meta table (0 when absent).
pub(super) fn meta_get(
    meta: &impl ReadableTable<&'static str, u64>,
    key: &str,
) -> Result<u64, redb::StorageError> {
    Ok(meta.get(key)?.map_or(0, |value| value.value()))
}
