//! The store's read side: blocking queries in redb read transactions (MVCC snapshots that run
//! beside the writer without waiting for it). [`Store`](super::Store) runs them on tokio's
//! blocking pool.

use std::collections::BTreeMap;
use std::sync::Arc;

use redb::{Database, ReadOnlyTable, ReadTransaction, ReadableDatabase, ReadableTable};
use troupe_actors::event::{
    BusItem, Event, EventFilter, EventId, OutputStream, RING_BYTES, StoreResume, ring_charge,
};
use troupe_actors::ids::{NodeId, SessionId};
use troupe_actors::session::{SessionRecord, StoreError, Transition};

use super::query::{
    Cursor, EventsPage, MAX_EVENT_PAGE, MAX_EVENT_PAGE_BYTES, MAX_EVENT_SCAN, MAX_OUTPUT_PAGE,
    MAX_OUTPUT_PAGE_BYTES, MAX_PAGE, MAX_SESSION_PAGE_BYTES, OutputLine, OutputPage, SessionPage,
    SessionQuery, UnstoredCursor,
};
use super::schema::{
    EVENT_INDEX, EVENTS, IDEMPOTENCY, META, META_LAST_POS, META_LAST_SEQ_PREFIX,
    META_RELAY_GAP_PREFIX, OUTPUT, OUTPUT_COUNTERS, OrIo, OutputCounters, SESSION_ORDER, SESSIONS,
    TRANSITIONS, UNFINISHED, corrupt, decode, last_seq_key, meta_get, reserved_key,
};

type SessionsTable = ReadOnlyTable<&'static str, &'static [u8]>;

fn begin(db: &Database) -> Result<ReadTransaction, StoreError> {
    db.begin_read().or_io("begin a read transaction")
}

fn sessions_table(txn: &ReadTransaction) -> Result<SessionsTable, StoreError> {
    txn.open_table(SESSIONS).or_io("open table sessions")
}

fn record(sessions: &SessionsTable, id: &str) -> Result<Option<SessionRecord>, StoreError> {
    Ok(sized_record(sessions, id)?.map(|(record, _)| record))
}

/// [`record`], with the size of what is stored.
fn sized_record(
    sessions: &SessionsTable,
    id: &str,
) -> Result<Option<(SessionRecord, usize)>, StoreError> {
    match sessions.get(id).or_io("read sessions")? {
        Some(bytes) => {
            let record: SessionRecord = decode("sessions", id, bytes.value())?;
            if record.id.as_str() != id {
                return Err(corrupt("sessions", id, format!("it holds {}", record.id)));
            }
            Ok(Some((record, bytes.value().len())))
        }
        None => Ok(None),
    }
}

/// A record an index names, which must exist.
fn indexed_record(
    sessions: &SessionsTable,
    index: &str,
    id: &str,
) -> Result<SessionRecord, StoreError> {
    record(sessions, id)?.ok_or_else(|| corrupt(index, id, "it names a session that is not stored"))
}

/// One session.
pub(super) fn get(db: &Database, id: &SessionId) -> Result<Option<SessionRecord>, StoreError> {
    let txn = begin(db)?;
    record(&sessions_table(&txn)?, id.as_str())
}

/// The highest output line number a session has appended (stored or counted past the cap).
pub(super) fn output_lines(db: &Database, id: &SessionId) -> Result<u64, StoreError> {
    let txn = begin(db)?;
    Ok(output_counters(&txn, id.as_str())?.last_line)
}

/// A session's output counters (all zero before its first line).
fn output_counters(txn: &ReadTransaction, key: &str) -> Result<OutputCounters, StoreError> {
    let table = txn
        .open_table(OUTPUT_COUNTERS)
        .or_io("open table output_counters")?;
    match table.get(key).or_io("read output_counters")? {
        Some(bytes) => decode("output_counters", key, bytes.value()),
        None => Ok(OutputCounters::default()),
    }
}

/// The session holding an idempotency key.
pub(super) fn find_by_key(db: &Database, key: &str) -> Result<Option<SessionRecord>, StoreError> {
    let txn = begin(db)?;
    let keys = txn
        .open_table(IDEMPOTENCY)
        .or_io("open table idempotency")?;
    let Some(owner) = keys.get(key).or_io("read idempotency")? else {
        return Ok(None);
    };
    indexed_record(&sessions_table(&txn)?, "idempotency", owner.value()).map(Some)
}

/// Sessions in queued, starting or running, oldest first.
pub(super) fn unfinished(db: &Database) -> Result<Vec<SessionRecord>, StoreError> {
    let txn = begin(db)?;
    let sessions = sessions_table(&txn)?;
    let unfinished = txn.open_table(UNFINISHED).or_io("open table unfinished")?;
    let mut records = Vec::new();
    for entry in unfinished.iter().or_io("read unfinished")? {
        let (key, _) = entry.or_io("read unfinished")?;
        let (_, id) = key.value();
        let record = indexed_record(&sessions, "unfinished", id)?;
        if !record.state.is_terminal() {
            records.push(record);
        }
    }
    Ok(records)
}

/// A page of sessions, newest first, examining at most `max_scan` of them (matching or not):
/// past that the page ends with a cursor where the scan stopped, whatever it holds.
pub(super) fn list(
    db: &Database,
    query: &SessionQuery,
    max_scan: usize,
) -> Result<SessionPage, StoreError> {
    let limit = query.limit.clamp(1, MAX_PAGE);
    let max_scan = max_scan.max(1);
    let cursor = query.cursor.as_deref().map(Cursor::decode).transpose()?;
    let txn = begin(db)?;
    let sessions = sessions_table(&txn)?;
    let order = txn
        .open_table(SESSION_ORDER)
        .or_io("open table session_order")?;
    let range = match &cursor {
        Some(cursor) => order.range::<(u64, &str)>(..(cursor.created_micros, cursor.id.as_str())),
        None => order.range::<(u64, &str)>(..),
    }
    .or_io("read session_order")?;
    let mut page = SessionPage {
        sessions: Vec::with_capacity(limit.min(64)),
        next_cursor: None,
    };
    // The last key examined, where a page cut short by the scan bound continues.
    let mut examined_last = (0u64, String::new());
    // The stored size of the records matched so far.
    let mut bytes = 0usize;
    for (examined, entry) in range.rev().enumerate() {
        let (key, _) = entry.or_io("read session_order")?;
        let (created, id) = key.value();
        if examined == max_scan {
            // More rows follow, unexamined: the next page goes on after the last one examined.
            let (created, id) = &examined_last;
            page.next_cursor = Some(Cursor::at(*created, id)?.encode());
            break;
        }
        examined_last.0 = created;
        examined_last.1.clear();
        examined_last.1.push_str(id);
        let (record, size) = sized_record(&sessions, id)?
            .ok_or_else(|| corrupt("session_order", id, "it names a session that is not stored"))?;
        if !query.matches(&record) {
            continue;
        }
        bytes += size;
        if page.sessions.len() == limit
            || (bytes > MAX_SESSION_PAGE_BYTES && !page.sessions.is_empty())
        {
            // One more matches: there is a next page, which starts after our last one.
            page.next_cursor = page.sessions.last().map(|last| Cursor::of(last).encode());
            break;
        }
        page.sessions.push(record);
    }
    Ok(page)
}

/// A page of a session's output log.
pub(super) fn output(
    db: &Database,
    id: &SessionId,
    offset: u64,
    limit: usize,
) -> Result<OutputPage, StoreError> {
    let key = id.as_str();
    let txn = begin(db)?;
    if record(&sessions_table(&txn)?, key)?.is_none() {
        return Err(StoreError::NotFound(id.clone()));
    }
    let counters = output_counters(&txn, key)?;
    let output = txn.open_table(OUTPUT).or_io("open table output")?;
    let limit = limit.clamp(1, MAX_OUTPUT_PAGE);
    let mut lines = Vec::with_capacity(limit.min(1024));
    let mut bytes = 0usize;
    let start = offset.saturating_add(1);
    for entry in output
        .range((key, start)..=(key, u64::MAX))
        .or_io("read output")?
        .take(limit)
    {
        let (entry_key, value) = entry.or_io("read output")?;
        let line = entry_key.value().1;
        let (stream, text): (OutputStream, String) =
            decode("output", format_args!("{key}/{line}"), value.value())?;
        bytes += json_string_len(&text);
        if bytes > MAX_OUTPUT_PAGE_BYTES && !lines.is_empty() {
            break;
        }
        lines.push(OutputLine { line, stream, text });
    }
    let next_offset = lines.last().map_or(offset, |line| line.line);
    Ok(OutputPage {
        lines,
        next_offset,
        total: counters.last_line,
        truncated: counters.truncated,
    })
}

/// The length of `text` as a JSON string's contents: what escaping makes of each byte.
fn json_string_len(text: &str) -> usize {
    text.bytes()
        .map(|byte| match byte {
            b'"' | b'\\' | b'\n' | b'\r' | b'\t' | 0x08 | 0x0c => 2,
            0..0x20 => 6,
            _ => 1,
        })
        .sum()
}

/// A session's transitions, in order.
pub(super) fn transitions(db: &Database, id: &SessionId) -> Result<Vec<Transition>, StoreError> {
    let key = id.as_str();
    let txn = begin(db)?;
    if record(&sessions_table(&txn)?, key)?.is_none() {
        return Err(StoreError::NotFound(id.clone()));
    }
    let table = txn
        .open_table(TRANSITIONS)
        .or_io("open table transitions")?;
    let mut transitions = Vec::new();
    for entry in table
        .range((key, 0)..=(key, u64::MAX))
        .or_io("read transitions")?
    {
        let (entry_key, value) = entry.or_io("read transitions")?;
        let n = entry_key.value().1;
        transitions.push(decode(
            "transitions",
            format_args!("{key}/{n}"),
            value.value(),
        )?);
    }
    Ok(transitions)
}

fn event(pos: u64, bytes: &[u8]) -> Result<BusItem, StoreError> {
    let event: Event = decode("events", pos, bytes)?;
    Ok(BusItem {
        pos,
        event: Arc::new(event),
    })
}

/// Events after `after` that match `filter`, in arrival order.
pub(super) fn events_after(
    db: &Database,
    after: &EventId,
    filter: &EventFilter,
    limit: usize,
) -> Result<EventsPage, StoreError> {
    let txn = begin(db)?;
    let index = txn
        .open_table(EVENT_INDEX)
        .or_io("open table event_index")?;
    let Some(start) = index
        .get((after.node.as_str(), after.seq))
        .or_io("read event_index")?
        .map(|pos| pos.value())
    else {
        return Ok(EventsPage::default());
    };
    scan_events(&txn, start, filter, limit)
}

/// Where a resume after `cursor`, which the log does not hold, can start (see
/// [`UnstoredCursor`]).
pub(super) fn unstored_cursor(
    db: &Database,
    cursor: &EventId,
) -> Result<UnstoredCursor, StoreError> {
    let txn = begin(db)?;
    let index = txn
        .open_table(EVENT_INDEX)
        .or_io("open table event_index")?;
    let node = cursor.node.as_str();
    // The index and the events it points to are deleted in one transaction, so an entry read
    // in this snapshot names a stored event.
    if let Some(entry) = index
        .range((node, 0)..(node, cursor.seq))
        .or_io("read event_index")?
        .next_back()
    {
        let (key, _) = entry.or_io("read event_index")?;
        let (_, seq) = key.value();
        return Ok(UnstoredCursor::After(EventId::new(
            cursor.node.clone(),
            seq,
        )));
    }
    let meta = txn.open_table(META).or_io("open table meta")?;
    if meta_get(&meta, &last_seq_key(node)).or_io("read meta")? == 0 {
        return Ok(UnstoredCursor::Unknown);
    }
    let events = txn.open_table(EVENTS).or_io("open table events")?;
    let Some((oldest_pos, _)) = events.first().or_io("read events")? else {
        return Ok(UnstoredCursor::Unknown);
    };
    let next_seq = index
        .range((node, cursor.seq.saturating_add(1))..=(node, u64::MAX))
        .or_io("read event_index")?
        .next()
        .transpose()
        .or_io("read event_index")?
        .map(|(key, _)| key.value().1);
    Ok(UnstoredCursor::Oldest {
        oldest_pos: oldest_pos.value(),
        missed: next_seq.map_or(0, |seq| seq - cursor.seq - 1),
    })
}

/// Events at arrival positions after `after_pos` that match `filter`, in arrival order (to
/// continue a replay from the `through_pos` of the previous page).
pub(super) fn events_after_pos(
    db: &Database,
    after_pos: u64,
    filter: &EventFilter,
    limit: usize,
) -> Result<EventsPage, StoreError> {
    let txn = begin(db)?;
    scan_events(&txn, after_pos, filter, limit)
}

fn scan_events(
    txn: &ReadTransaction,
    after_pos: u64,
    filter: &EventFilter,
    limit: usize,
) -> Result<EventsPage, StoreError> {
    let limit = limit.clamp(1, MAX_EVENT_PAGE);
    let events = txn.open_table(EVENTS).or_io("open table events")?;
    let mut page = EventsPage {
        found: true,
        through_pos: after_pos,
        ..EventsPage::default()
    };
    // The stored bytes of the events the page holds.
    let mut bytes = 0usize;
    for (examined, entry) in events
        .range(after_pos + 1..)
        .or_io("read events")?
        .enumerate()
    {
        if page.events.len() == limit || examined == MAX_EVENT_SCAN {
            page.more = true;
            break;
        }
        let (pos, value) = entry.or_io("read events")?;
        let item = event(pos.value(), value.value())?;
        if filter.matches(&item.event) {
            bytes += value.value().len();
            if bytes > MAX_EVENT_PAGE_BYTES && !page.events.is_empty() {
                // Full: this event starts the next page (`through_pos` stays before it).
                page.more = true;
                break;
            }
            page.events.push(item);
        }
        page.through_pos = pos.value();
    }
    Ok(page)
}

/// Counters and the most recent events, for the bus at start.
pub(super) fn resume(
    db: &Database,
    node: &NodeId,
    ring_capacity: usize,
) -> Result<StoreResume, StoreError> {
    resume_within(db, node, ring_capacity, RING_BYTES)
}

/// [`resume`], reading recent events up to `ring_bytes` of ring charge (tests make it small).
pub(super) fn resume_within(
    db: &Database,
    node: &NodeId,
    ring_capacity: usize,
    ring_bytes: usize,
) -> Result<StoreResume, StoreError> {
    let txn = begin(db)?;
    let meta = txn.open_table(META).or_io("open table meta")?;
    let events = txn.open_table(EVENTS).or_io("open table events")?;
    let index = txn
        .open_table(EVENT_INDEX)
        .or_io("open table event_index")?;
    let mut last_pos = meta_get(&meta, META_LAST_POS).or_io("read meta")?;
    if let Some((pos, _)) = events.last().or_io("read events")? {
        last_pos = last_pos.max(pos.value());
    }
    let mut last_seq = meta_get(&meta, &last_seq_key(node.as_str())).or_io("read meta")?;
    last_seq = last_seq.max(meta_get(&meta, &reserved_key(node.as_str())).or_io("read meta")?);
    // Every node's newest stored sequence number: the meta keys (they survive retention), then
    // the index (for logs written before those keys were kept for relayed nodes).
    let mut newest: BTreeMap<String, u64> = BTreeMap::new();
    for entry in meta.range(META_LAST_SEQ_PREFIX..).or_io("read meta")? {
        let (key, value) = entry.or_io("read meta")?;
        let Some(publisher) = key.value().strip_prefix(META_LAST_SEQ_PREFIX) else {
            break;
        };
        newest.insert(publisher.to_owned(), value.value());
    }
    let mut next = index
        .first()
        .or_io("read event_index")?
        .map(|(key, _)| key.value().0.to_owned());
    while let Some(publisher) = next.take() {
        let key = publisher.as_str();
        if let Some(entry) = index
            .range((key, 0)..=(key, u64::MAX))
            .or_io("read event_index")?
            .next_back()
        {
            let (found, _) = entry.or_io("read event_index")?;
            let seq = newest.entry(publisher.clone()).or_insert(0);
            *seq = (*seq).max(found.value().1);
        }
        // The first key of the next publisher: just past this one's last possible key.
        for entry in index.range((key, u64::MAX)..).or_io("read event_index")? {
            let (found, _) = entry.or_io("read event_index")?;
            if found.value().0 != key {
                next = Some(found.value().0.to_owned());
                break;
            }
        }
    }
    if let Some(own) = newest.remove(node.as_str()) {
        last_seq = last_seq.max(own);
    }
    // Where relayed events whose write failed are missing below what came after them.
    let mut gaps = BTreeMap::new();
    for entry in meta.range(META_RELAY_GAP_PREFIX..).or_io("read meta")? {
        let (key, value) = entry.or_io("read meta")?;
        let Some(publisher) = key.value().strip_prefix(META_RELAY_GAP_PREFIX) else {
            break;
        };
        if newest
            .get(publisher)
            .is_some_and(|high| value.value() <= *high)
        {
            gaps.insert(publisher.to_owned(), value.value());
        }
    }
    let relayed = node_ids(newest);
    let gaps = node_ids(gaps);
    // The counters matter most (ids must never repeat); the ring is best effort: an unreadable
    // event is left out, and a failure part way keeps what was read.
    // No more than the ring keeps (its count and its bytes): a log of large events does not
    // come into memory whole only to be trimmed by the ring.
    let mut recent = Vec::with_capacity(ring_capacity.min(65_536));
    let read_recent = |recent: &mut Vec<BusItem>| -> Result<(), StoreError> {
        let mut bytes = 0usize;
        for entry in events
            .iter()
            .or_io("read events")?
            .rev()
            .take(ring_capacity)
        {
            let (pos, value) = entry.or_io("read events")?;
            match event(pos.value(), value.value()) {
                Ok(item) => {
                    bytes += ring_charge(&item.event) as usize;
                    if bytes > ring_bytes && !recent.is_empty() {
                        break;
                    }
                    recent.push(item);
                }
                Err(error) => tracing::warn!(%error, "store: skipping an unreadable event"),
            }
        }
        Ok(())
    };
    if let Err(error) = read_recent(&mut recent) {
        tracing::error!(%error, "store: cannot read the newest events; the replay ring starts short");
    }
    recent.reverse();
    Ok(StoreResume {
        last_seq,
        last_pos,
        recent,
        relayed,
        gaps,
    })
}

/// Sequence numbers by node, the node ids checked (an unreadable one is left out, logged).
fn node_ids(seqs: BTreeMap<String, u64>) -> Vec<(NodeId, u64)> {
    seqs.into_iter()
        .filter_map(|(publisher, seq)| match NodeId::new(&publisher) {
            Ok(publisher) => Some((publisher, seq)),
            Err(error) => {
                tracing::warn!(%publisher, %error, "store: skipping an unreadable node id");
                None
            }
        })
        .collect()
}

/// This node's id reservation on disk (0 when none was ever made).
pub(super) fn reserved(db: &Database, node: &NodeId) -> Result<u64, StoreError> {
    let txn = begin(db)?;
    let meta = txn.open_table(META).or_io("open table meta")?;
    meta_get(&meta, &reserved_key(node.as_str())).or_io("read meta")
}

/// Events of `node` with a sequence number above `after`, in sequence order.
pub(super) fn node_events_after(
    db: &Database,
    node: &NodeId,
    after: u64,
    limit: usize,
) -> Result<Vec<BusItem>, StoreError> {
    let limit = limit.clamp(1, MAX_EVENT_PAGE);
    let txn = begin(db)?;
    let index = txn
        .open_table(EVENT_INDEX)
        .or_io("open table event_index")?;
    let events = txn.open_table(EVENTS).or_io("open table events")?;
    let key = node.as_str();
    let mut found = Vec::new();
    for entry in index
        .range((key, after.saturating_add(1))..=(key, u64::MAX))
        .or_io("read event_index")?
        .take(limit)
    {
        let (_, pos) = entry.or_io("read event_index")?;
        let pos = pos.value();
        // The index may outlive an event for a moment of retention; skip what is gone.
        if let Some(value) = events.get(pos).or_io("read events")? {
            found.push(event(pos, value.value())?);
        }
    }
    Ok(found)
}
