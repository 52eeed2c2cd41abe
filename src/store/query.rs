//! The read side's questions and answers: session listings with filters and cursors, output
//! pages, event pages for replay past the in-memory ring, and what a prune removed.

use std::collections::BTreeMap;

use troupe_actors::event::{BusItem, EventId, OutputStream, SessionKindTag};
use troupe_actors::ids::{SessionId, Timestamp};
use troupe_actors::session::{SessionRecord, SessionState, StoreError};

/// Most sessions one listing page holds.
pub const MAX_PAGE: usize = 1000;
/// Most sessions one listing page examines (matching or not), so a narrow filter over a large
/// store answers in bounded time: past it the page ends early, possibly empty, with a
/// `next_cursor` where the scan stopped.
pub const MAX_SESSION_SCAN: usize = 10_000;
/// Most bytes of stored records one listing page holds (a chat session's record carries its
/// messages, up to `http.max_body_bytes` each): past it the page ends early with a
/// `next_cursor`, so a page of 1,000 large records does not hold a gigabyte. A page always holds
/// at least one session.
pub const MAX_SESSION_PAGE_BYTES: usize = 16 * 1024 * 1024;
/// Sessions per page when the query does not say.
pub const DEFAULT_PAGE: usize = 100;
/// Most output lines one page holds.
pub const MAX_OUTPUT_PAGE: usize = 10_000;
/// Most text one output page holds, counted as its lines' JSON strings (escapes included): a
/// page of long or control-heavy lines ends early (its `next_offset` says where to go on), so
/// that any page fits one forwarded cluster answer and one MCP message. A page always holds at
/// least one line.
pub const MAX_OUTPUT_PAGE_BYTES: usize = 1024 * 1024;
/// Most events one [`Store::events_after`](super::Store::events_after) page holds.
pub const MAX_EVENT_PAGE: usize = 10_000;
/// Most bytes of stored events one [`Store::events_after`](super::Store::events_after) page
/// holds (their encoded values): an event may carry 64 KiB of output, so a page of 10,000 of
/// them would hold over half a gigabyte, and every replaying link its own. Past it the page ends
/// early with `more` set, its `through_pos` at the last event it holds. A page always holds at
/// least one event.
pub const MAX_EVENT_PAGE_BYTES: usize = 1024 * 1024;
/// Most events one [`Store::events_after`](super::Store::events_after) call examines (matching or
/// not), so a narrow filter over a large log answers in bounded time; `more` says to go on.
pub const MAX_EVENT_SCAN: usize = 100_000;

/// Which sessions to list. Within a dimension values are alternatives; across dimensions all must
/// match; an empty dimension matches everything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionQuery {
    /// States (any of them).
    pub states: Vec<SessionState>,
    /// Labels that must all be present with these values.
    pub labels: BTreeMap<String, String>,
    /// Kinds (any of them).
    pub kinds: Vec<SessionKindTag>,
    /// Page size, 1 to [`MAX_PAGE`] (larger values are clamped, 0 is taken as 1).
    pub limit: usize,
    /// Where to continue: the `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

impl Default for SessionQuery {
    fn default() -> Self {
        Self {
            states: Vec::new(),
            labels: BTreeMap::new(),
            kinds: Vec::new(),
            limit: DEFAULT_PAGE,
            cursor: None,
        }
    }
}

impl SessionQuery {
    /// True when `record` passes every filter.
    pub fn matches(&self, record: &SessionRecord) -> bool {
        (self.states.is_empty() || self.states.contains(&record.state))
            && (self.kinds.is_empty() || self.kinds.contains(&record.spec.kind.tag()))
            && self
                .labels
                .iter()
                .all(|(key, value)| record.spec.labels.get(key) == Some(value))
    }
}

/// One page of sessions, newest first (by `created_at`, then id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionPage {
    /// The sessions.
    pub sessions: Vec<SessionRecord>,
    /// Pass as `cursor` for the next page; `None` on the last page. A page that stopped at
    /// [`MAX_SESSION_SCAN`] has one even when it holds fewer than `limit` sessions (or none).
    pub next_cursor: Option<String>,
}

/// The cursor that goes on after `record` in the listing order: what a page that ends with it
/// hands out, for a front end that ends a page earlier than the store did (an MCP answer kept
/// small enough for its transport).
pub fn cursor_after(record: &SessionRecord) -> String {
    Cursor::of(record).encode()
}

/// A position in the listing order: the last session of a page, or the last one a page examined
/// when it stopped at its scan bound. Rendered as an opaque string;
/// sessions inserted while a client pages through do not shift it, so pages never repeat or skip
/// a session that existed when the listing started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Cursor {
    pub(super) created_micros: u64,
    pub(super) id: SessionId,
}

const CURSOR_PREFIX: &str = "c1.";

impl Cursor {
    pub(super) fn at(created_micros: u64, id: &str) -> Result<Self, StoreError> {
        Ok(Self {
            created_micros,
            id: SessionId::new(id)
                .map_err(|error| super::schema::corrupt("session_order", id, error))?,
        })
    }

    pub(super) fn of(record: &SessionRecord) -> Self {
        Self {
            created_micros: record.created_at.as_micros(),
            id: record.id.clone(),
        }
    }

    pub(super) fn encode(&self) -> String {
        format!("{CURSOR_PREFIX}{}.{}", self.created_micros, self.id)
    }

    pub(super) fn decode(text: &str) -> Result<Self, StoreError> {
        let refuse = || {
            StoreError::Invalid(format!(
                "cursor {:?} is not one this node handed out; start again without a cursor",
                text.chars().take(80).collect::<String>()
            ))
        };
        let rest = text.strip_prefix(CURSOR_PREFIX).ok_or_else(refuse)?;
        let (micros, id) = rest.split_once('.').ok_or_else(refuse)?;
        Ok(Self {
            created_micros: micros.parse().map_err(|_| refuse())?,
            id: SessionId::new(id).map_err(|_| refuse())?,
        })
    }
}

/// One line of a session's output log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputLine {
    /// Line number, from 1, per session.
    pub line: u64,
    /// Where it came from.
    pub stream: OutputStream,
    /// The text, without its line ending.
    pub text: String,
}

/// A page of a session's output log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputPage {
    /// Lines after the requested offset, in order.
    pub lines: Vec<OutputLine>,
    /// Pass as `offset` for the next page (the last line number returned, or the requested
    /// offset when there was none).
    pub next_offset: u64,
    /// Lines the session printed so far, stored or not.
    pub total: u64,
    /// Lines printed past the log's cap and not stored.
    pub truncated: u64,
}

/// Events read back from the log, for a `Last-Event-ID` replay older than the bus's ring.
#[derive(Debug, Clone, Default)]
pub struct EventsPage {
    /// Matching events after the requested id, in arrival order.
    pub events: Vec<BusItem>,
    /// False when the id is unknown or retention already deleted it (nothing is returned then:
    /// [`Store::unstored_cursor`](super::Store::unstored_cursor) tells where to start instead).
    pub found: bool,
    /// Arrival position of the last event examined (matching or not): a caller continues from
    /// here, and live or ring events at or below it are duplicates.
    pub through_pos: u64,
    /// More events follow `through_pos` (the limit, the byte bound or the scan bound was
    /// reached).
    pub more: bool,
}

/// Where the log can take up a resume whose id it does not hold ([`Store::unstored_cursor`](super::Store::unstored_cursor)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UnstoredCursor {
    /// The log holds an earlier event of the cursor's node: the client saw that one, so the
    /// log holds everything it can have missed from right after it (the cursor was seen live
    /// but never stored: the node was killed within the store's append linger, or the append
    /// was dropped). Resume after this id.
    After(EventId),
    /// The log holds no earlier event of the cursor's node (retention deleted them): what
    /// follows the cursor starts at the latest at the log's oldest position, `oldest_pos`.
    /// `missed` counts the cursor node's sequence numbers between the cursor and its first
    /// event still stored (a lower bound of what was lost; 0 when none of its events is left).
    Oldest {
        /// The log's oldest arrival position.
        oldest_pos: u64,
        /// Events known to be lost (of the cursor's node only).
        missed: u64,
    },
    /// The log never stored an event of the cursor's node, or it holds no event at all.
    Unknown,
}

/// What one retention pass removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PruneReport {
    /// Events deleted.
    pub removed: u64,
    /// Sessions deleted (ended before `session_cutoff`), with their transitions and output.
    pub sessions_removed: u64,
    /// The cutoff used for sessions: terminal sessions that ended before this were removed
    /// (zero when session retention is off).
    pub session_cutoff: Timestamp,
    /// Events left.
    pub remaining: u64,
    /// Approximate bytes of the log left.
    pub remaining_bytes: u64,
    /// The cutoff used for age: events older than this were removed.
    pub cutoff: Timestamp,
}
