//! Tests of the store against a real redb file in a temporary directory. Time is explicit: event
//! timestamps are built relative to `now`, and retention by age is driven with
//! [`Store::prune`]'s `now`, never by sleeping.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata};
use troupe_actors::event::{
    BusItem, Event, EventData, EventFilter, EventId, EventKind, EventStore, KindPattern,
    OutputStream, SessionKindTag, SessionOutput, SessionProgress,
};
use troupe_actors::ids::{NodeId, SessionId, Timestamp};
use troupe_actors::session::{
    ChatMessage, ChatSession, CommandSession, SessionKind, SessionRecord, SessionSpec,
    SessionState, SessionStore, StopRequest, StoreError, Transition,
};

use super::schema::{
    EVENT_INDEX, EVENTS, OUTPUT, OUTPUT_COUNTERS, SESSION_ORDER, SESSIONS, TRANSITIONS, UNFINISHED,
    event_overhead,
};
use super::*;

const DAY: u64 = 24 * 3600 * 1_000_000;

fn node() -> NodeId {
    NodeId::new("node-a").unwrap()
}

fn other_node() -> NodeId {
    NodeId::new("node-b").unwrap()
}

fn sid(id: &str) -> SessionId {
    SessionId::new(id).unwrap()
}

fn command() -> SessionKind {
    SessionKind::Command(CommandSession {
        program: "sh".into(),
        args: vec!["-c".into(), "true".into()],
        env: BTreeMap::new(),
        workdir: None,
    })
}

fn chat() -> SessionKind {
    SessionKind::Chat(ChatSession {
        model: "fake/m1".into(),
        messages: vec![ChatMessage {
            role: "user".into(),
            content: "hi".into(),
        }],
    })
}

fn record(id: &str, created_micros: u64) -> SessionRecord {
    SessionRecord {
        id: sid(id),
        node: node(),
        spec: SessionSpec {
            kind: command(),
            timeout_secs: None,
            priority: 5,
            labels: BTreeMap::new(),
            idempotency_key: None,
        },
        state: SessionState::Queued,
        created_at: Timestamp::from_micros(created_micros),
        started_at: None,
        ended_at: None,
        exit_code: None,
        signal: None,
        reason: None,
        process: None,
        output_lines: 0,
        stop_requested: None,
    }
}

/// The record after `to`, and the transition that leads there.
fn step(current: &SessionRecord, to: SessionState) -> (SessionRecord, Transition) {
    let mut next = current.clone();
    next.state = to;
    let transition = Transition {
        from: current.state,
        to,
        at: Timestamp::from_micros(current.created_at.as_micros() + 1),
        reason: None,
    };
    (next, transition)
}

async fn advance(store: &Store, current: &SessionRecord, to: SessionState) -> SessionRecord {
    let (next, transition) = step(current, to);
    store.transition(next.clone(), transition).await.unwrap();
    next
}

async fn open(dir: &Path) -> Store {
    open_with(dir, StoreConfig::default()).await
}

async fn open_with(dir: &Path, config: StoreConfig) -> Store {
    Store::open(dir, node(), config).await.unwrap()
}

fn now_micros() -> u64 {
    Timestamp::now().as_micros()
}

fn event(node: NodeId, seq: u64, at_micros: u64) -> Event {
    Event {
        rendered: Default::default(),
        id: EventId::new(node, seq),
        at: Timestamp::from_micros(at_micros),
        session: None,
        data: EventData::SessionProgress(SessionProgress {
            message: format!("step {seq:04}"),
            current: Some(seq),
            total: None,
        }),
    }
}

fn item(pos: u64, event: Event) -> BusItem {
    BusItem {
        pos,
        event: Arc::new(event),
    }
}

fn positions(items: &[BusItem]) -> Vec<u64> {
    items.iter().map(|item| item.pos).collect()
}

fn io_message(error: StoreError) -> String {
    match error {
        StoreError::Io(message) => message,
        other => panic!("expected a storage error, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Sessions

#[tokio::test]
async fn create_get_and_transition_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path()).await;
    let created = record("s-1", now_micros());
    store.create(created.clone()).await.unwrap();
    assert_eq!(store.get(&sid("s-1")).await.unwrap(), Some(created.clone()));
    assert_eq!(store.get(&sid("s-2")).await.unwrap(), None);

    let (mut starting, transition) = step(&created, SessionState::Starting);
    starting.reason = Some("slot free".into());
    store
        .transition(starting.clone(), transition.clone())
        .await
        .unwrap();
    assert_eq!(store.get(&sid("s-1")).await.unwrap(), Some(starting));
    assert_eq!(
        store.transitions(&sid("s-1")).await.unwrap(),
        vec![transition]
    );
}

#[tokio::test]
async fn a_transition_from_another_state_is_a_conflict_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path()).await;
    let queued = record("s-1", now_micros());
    store.create(queued.clone()).await.unwrap();
    let running = SessionRecord {
        state: SessionState::Running,
        ..queued.clone()
    };
    let (succeeded, transition) = step(&running, SessionState::Succeeded);
    assert_eq!(
        store.transition(succeeded, transition).await,
        Err(StoreError::Conflict {
            id: sid("s-1"),
            expected: SessionState::Running,
            actual: SessionState::Queued,
        })
    );
    assert_eq!(store.get(&sid("s-1")).await.unwrap(), Some(queued));
    assert!(store.transitions(&sid("s-1")).await.unwrap().is_empty());

    let (missing, transition) = step(&record("s-9", 1), SessionState::Starting);
    assert_eq!(
        store.transition(missing, transition).await,
        Err(StoreError::NotFound(sid("s-9")))
    );
}

#[tokio::test]
async fn a_transition_the_state_machine_refuses_is_invalid() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path()).await;
    let queued = record("s-1", now_micros());
    store.create(queued.clone()).await.unwrap();

    // The stored state matches `from`, but queued cannot jump to succeeded.
    let (succeeded, transition) = step(&queued, SessionState::Succeeded);
    let refused = store.transition(succeeded, transition).await.unwrap_err();
    assert!(
        matches!(&refused, StoreError::Invalid(message) if message.contains("from queued to succeeded")),
        "{refused:?}"
    );
    // A record that does not say what the transition says.
    let (mut starting, transition) = step(&queued, SessionState::Starting);
    starting.state = SessionState::Running;
    assert!(matches!(
        store.transition(starting, transition).await,
        Err(StoreError::Invalid(_))
    ));
    assert_eq!(store.get(&sid("s-1")).await.unwrap(), Some(queued));
}

#[tokio::test]
async fn the_full_path_is_recorded_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path()).await;
    let mut current = record("s-1", now_micros());
    store.create(current.clone()).await.unwrap();
    let path = [
        SessionState::Starting,
        SessionState::Running,
        SessionState::Succeeded,
    ];
    for to in path {
        assert_eq!(
            store.unfinished().await.unwrap(),
            vec![current.clone()],
            "unfinished while {}",
            current.state
        );
        current = advance(&store, &current, to).await;
    }
    let recorded: Vec<_> = store
        .transitions(&sid("s-1"))
        .await
        .unwrap()
        .iter()
        .map(|transition| (transition.from, transition.to))
        .collect();
    assert_eq!(
        recorded,
        [
            (SessionState::Queued, SessionState::Starting),
            (SessionState::Starting, SessionState::Running),
            (SessionState::Running, SessionState::Succeeded),
        ]
    );
    assert!(store.unfinished().await.unwrap().is_empty());
    assert_eq!(
        store.transitions(&sid("s-2")).await,
        Err(StoreError::NotFound(sid("s-2")))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_transitions_from_one_state_record_exactly_one() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path()).await;
    for round in 0..20 {
        let id = format!("s-{round}");
        let mut current = record(&id, now_micros());
        store.create(current.clone()).await.unwrap();
        current = advance(&store, &current, SessionState::Starting).await;
        current = advance(&store, &current, SessionState::Running).await;
        let endings = [
            SessionState::Succeeded,
            SessionState::Failed,
            SessionState::Cancelled,
            SessionState::TimedOut,
            SessionState::Interrupted,
        ];
        let attempts: Vec<_> = endings
            .iter()
            .map(|to| {
                let (next, transition) = step(&current, *to);
                let store = store.clone();
                tokio::spawn(async move { store.transition(next, transition).await })
            })
            .collect();
        let mut won = Vec::new();
        for (attempt, to) in attempts.into_iter().zip(endings) {
            match attempt.await.unwrap() {
                Ok(()) => won.push(to),
                Err(StoreError::Conflict { actual, .. }) => assert!(actual.is_terminal()),
                Err(other) => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(won.len(), 1, "round {round}: {won:?}");
        let stored = store.get(&sid(&id)).await.unwrap().unwrap();
        assert_eq!(stored.state, won[0]);
        assert_eq!(store.transitions(&sid(&id)).await.unwrap().len(), 3);
    }
}

#[tokio::test]
async fn duplicate_ids_and_idempotency_keys_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path()).await;
    let mut first = record("s-1", now_micros());
    first.spec.idempotency_key = Some("build-42".into());
    store.create(first.clone()).await.unwrap();

    assert_eq!(
        store.create(record("s-1", 5)).await,
        Err(StoreError::Exists(sid("s-1")))
    );
    let mut second = record("s-2", now_micros());
    second.spec.idempotency_key = Some("build-42".into());
    assert_eq!(
        store.create(second).await,
        Err(StoreError::Exists(sid("s-1")))
    );
    assert_eq!(store.get(&sid("s-2")).await.unwrap(), None);
    assert_eq!(
        store.find_by_key("build-42").await.unwrap(),
        Some(first.clone())
    );
    assert_eq!(store.find_by_key("build-43").await.unwrap(), None);
    // The key keeps pointing at the session as it changes.
    let starting = advance(&store, &first, SessionState::Starting).await;
    assert_eq!(store.find_by_key("build-42").await.unwrap(), Some(starting));
}

#[tokio::test]
async fn unfinished_sessions_come_oldest_first() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path()).await;
    let base = now_micros();
    let queued = record("s-c", base + 3);
    let starting = record("s-a", base + 1);
    let running = record("s-b", base + 2);
    let done = record("s-d", base);
    for created in [&queued, &starting, &running, &done] {
        store.create(created.clone()).await.unwrap();
    }
    let starting = advance(&store, &starting, SessionState::Starting).await;
    let running = advance(&store, &running, SessionState::Starting).await;
    let running = advance(&store, &running, SessionState::Running).await;
    let done = advance(&store, &done, SessionState::Cancelled).await;
    assert_eq!(
        store.unfinished().await.unwrap(),
        vec![starting, running, queued]
    );
    assert_eq!(done.state, SessionState::Cancelled);
}

// ---------------------------------------------------------------------------------------------
// Listing

#[tokio::test]
async fn listings_filter_by_state_label_and_kind() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path()).await;
    let base = now_micros();
    // (id, team, kind, final state)
    let sessions = [
        ("s-1", "web", command(), SessionState::Queued),
        ("s-2", "web", chat(), SessionState::Running),
        ("s-3", "api", command(), SessionState::Running),
        ("s-4", "web", command(), SessionState::Succeeded),
        ("s-5", "api", chat(), SessionState::Succeeded),
    ];
    for (n, (id, team, kind, state)) in sessions.into_iter().enumerate() {
        let mut current = record(id, base + n as u64);
        current.spec.kind = kind;
        current.spec.labels.insert("team".into(), team.into());
        current.spec.labels.insert("tier".into(), "gold".into());
        store.create(current.clone()).await.unwrap();
        let path: &[SessionState] = match state {
            SessionState::Queued => &[],
            SessionState::Running => &[SessionState::Starting, SessionState::Running],
            _ => &[
                SessionState::Starting,
                SessionState::Running,
                SessionState::Succeeded,
            ],
        };
        for to in path {
            current = advance(&store, &current, *to).await;
        }
    }
    let ids = |page: SessionPage| -> Vec<String> {
        assert_eq!(page.next_cursor, None);
        page.sessions
            .iter()
            .map(|record| record.id.to_string())
            .collect()
    };
    let list = |query: SessionQuery| {
        let store = store.clone();
        async move { ids(store.list(query).await.unwrap()) }
    };
    assert_eq!(
        list(SessionQuery::default()).await,
        ["s-5", "s-4", "s-3", "s-2", "s-1"]
    );
    assert_eq!(
        list(SessionQuery {
            states: vec![SessionState::Running, SessionState::Queued],
            ..SessionQuery::default()
        })
        .await,
        ["s-3", "s-2", "s-1"]
    );
    let labels = |pairs: &[(&str, &str)]| {
        pairs
            .iter()
            .map(|(key, value)| (key.to_string(), value.to_string()))
            .collect()
    };
    assert_eq!(
        list(SessionQuery {
            labels: labels(&[("team", "web"), ("tier", "gold")]),
            ..SessionQuery::default()
        })
        .await,
        ["s-4", "s-2", "s-1"]
    );
    assert!(
        list(SessionQuery {
            labels: labels(&[("team", "web"), ("tier", "silver")]),
            ..SessionQuery::default()
        })
        .await
        .is_empty()
    );
    assert_eq!(
        list(SessionQuery {
            kinds: vec![SessionKindTag::Chat],
            ..SessionQuery::default()
        })
        .await,
        ["s-5", "s-2"]
    );
    assert_eq!(
        list(SessionQuery {
            states: vec![SessionState::Succeeded],
            labels: labels(&[("team", "api")]),
            kinds: vec![SessionKindTag::Chat, SessionKindTag::Aider],
            ..SessionQuery::default()
        })
        .await,
        ["s-5"]
    );
}

#[tokio::test]
async fn pages_neither_repeat_nor_skip_while_sessions_are_inserted() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path()).await;
    let base = now_micros();
    let mut initial = BTreeSet::new();
    // Pairs share a created_at, so the id decides between them.
    for n in 0..120u64 {
        let id = format!("s-{n:03}");
        store
            .create(record(&id, base + (n / 2) * 10))
            .await
            .unwrap();
        initial.insert(id);
    }
    let mut seen = Vec::new();
    let mut order = Vec::new();
    let mut cursor = None;
    let mut inserted = 0u64;
    loop {
        let page = store
            .list(SessionQuery {
                limit: 17,
                cursor: cursor.clone(),
                ..SessionQuery::default()
            })
            .await
            .unwrap();
        assert!(page.sessions.len() <= 17);
        for record in &page.sessions {
            seen.push(record.id.to_string());
            order.push((record.created_at, record.id.clone()));
        }
        // Between pages, sessions arrive: newer ones, older ones, and one tied with the cursor.
        inserted += 1;
        store
            .create(record(
                &format!("new-{inserted}"),
                base + 1_000_000 + inserted,
            ))
            .await
            .unwrap();
        store
            .create(record(&format!("old-{inserted}"), base - inserted))
            .await
            .unwrap();
        if let Some(last) = page.sessions.last() {
            store
                .create(record(
                    &format!("tie-{inserted}"),
                    last.created_at.as_micros(),
                ))
                .await
                .unwrap();
        }
        match page.next_cursor {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    let unique: BTreeSet<_> = seen.iter().cloned().collect();
    assert_eq!(unique.len(), seen.len(), "a session was listed twice");
    assert!(
        initial.is_subset(&unique),
        "missed: {:?}",
        initial.difference(&unique).collect::<Vec<_>>()
    );
    assert!(
        seen.iter().all(|id| !id.starts_with("new-")),
        "sessions newer than the first page are not in this listing"
    );
    assert!(
        order.windows(2).all(|pair| pair[0] > pair[1]),
        "newest first, then by id"
    );
}

#[tokio::test]
async fn a_foreign_cursor_is_refused_and_limits_are_clamped() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path()).await;
    for cursor in ["", "abc", "c1.x.s-1", "c1.5.../etc", "c1.5"] {
        let refused = store
            .list(SessionQuery {
                cursor: Some(cursor.into()),
                ..SessionQuery::default()
            })
            .await;
        assert!(
            matches!(&refused, Err(StoreError::Invalid(message)) if message.contains("cursor")),
            "{cursor:?}: {refused:?}"
        );
    }
    for n in 0..3 {
        store
            .create(record(&format!("s-{n}"), now_micros()))
            .await
            .unwrap();
    }
    let page = store
        .list(SessionQuery {
            limit: 0,
            ..SessionQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(page.sessions.len(), 1, "a zero limit is taken as one");
    assert!(page.next_cursor.is_some());
    let page = store
        .list(SessionQuery {
            limit: 1_000_000,
            ..SessionQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(page.sessions.len(), 3);
}

#[tokio::test]
async fn a_listing_stops_at_its_scan_bound_and_its_cursors_lead_to_the_match() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path()).await;
    let base = now_micros();
    // The one running session is the oldest; ten queued ones follow it.
    let running = record("s-running", base);
    store.create(running.clone()).await.unwrap();
    let running = advance(&store, &running, SessionState::Starting).await;
    let running = advance(&store, &running, SessionState::Running).await;
    for n in 1..=10u64 {
        store
            .create(record(&format!("s-queued-{n:02}"), base + n))
            .await
            .unwrap();
    }
    let query = |cursor: Option<String>| SessionQuery {
        states: vec![SessionState::Running],
        cursor,
        ..SessionQuery::default()
    };
    // Three rows examined per page: three pages of queued sessions say only "go on".
    let mut cursor = None;
    let mut pages = Vec::new();
    loop {
        let page = read::list(&store.inner.db.get().unwrap(), &query(cursor.clone()), 3).unwrap();
        pages.push(page.sessions.clone());
        match page.next_cursor {
            Some(next) => cursor = Some(next),
            None => break,
        }
        assert!(pages.len() < 20, "the cursors do not lead on");
    }
    assert_eq!(
        pages,
        [vec![], vec![], vec![], vec![running.clone()]],
        "empty pages with a cursor until the scan reaches the running session"
    );
    // Within the store's own bound one page finds it, and says it is the last.
    let page = store.list(query(None)).await.unwrap();
    assert_eq!((page.sessions, page.next_cursor), (vec![running], None));
}

// ---------------------------------------------------------------------------------------------
// Output

fn texts(page: &OutputPage) -> Vec<(u64, OutputStream, &str)> {
    page.lines
        .iter()
        .map(|line| (line.line, line.stream, line.text.as_str()))
        .collect()
}

fn strings(lines: &[&str]) -> Vec<String> {
    lines.iter().map(|line| line.to_string()).collect()
}

#[tokio::test]
async fn output_pages_follow_offsets_and_skip_redelivered_lines() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path()).await;
    let id = sid("s-1");
    store.create(record("s-1", now_micros())).await.unwrap();
    store.append_output(&id, OutputStream::Stdout, 1, &strings(&["a", "b", "c"]));
    store.append_output(&id, OutputStream::Stderr, 4, &strings(&["d", "e"]));
    store.flush().await.unwrap();

    let page = store.output(&id, 0, 2).await.unwrap();
    assert_eq!(
        texts(&page),
        [
            (1, OutputStream::Stdout, "a"),
            (2, OutputStream::Stdout, "b")
        ]
    );
    assert_eq!((page.next_offset, page.total, page.truncated), (2, 5, 0));
    let page = store.output(&id, page.next_offset, 10).await.unwrap();
    assert_eq!(
        texts(&page),
        [
            (3, OutputStream::Stdout, "c"),
            (4, OutputStream::Stderr, "d"),
            (5, OutputStream::Stderr, "e")
        ]
    );
    let end = store.output(&id, page.next_offset, 10).await.unwrap();
    assert!(end.lines.is_empty());
    assert_eq!(end.next_offset, 5);

    // A restarted session actor delivers lines 4 and 5 again, then a new one.
    store.append_output(&id, OutputStream::Stderr, 4, &strings(&["d", "e", "f"]));
    store.flush().await.unwrap();
    let page = store.output(&id, 3, 10).await.unwrap();
    assert_eq!(
        texts(&page),
        [
            (4, OutputStream::Stderr, "d"),
            (5, OutputStream::Stderr, "e"),
            (6, OutputStream::Stderr, "f")
        ]
    );
    assert_eq!(page.total, 6);

    assert_eq!(
        store.output(&sid("s-9"), 0, 10).await,
        Err(StoreError::NotFound(sid("s-9")))
    );
}

#[tokio::test]
async fn an_output_page_of_long_lines_ends_at_its_byte_budget_and_the_next_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path()).await;
    let id = sid("s-1");
    store.create(record("s-1", now_micros())).await.unwrap();
    // 200 long lines of plain text, then 200 of terminal escapes (each byte six in JSON).
    let plain: Vec<String> = (0..200)
        .map(|n| format!("{n:05}{}", "x".repeat(12_000)))
        .collect();
    let escapes: Vec<String> = (0..200).map(|_| "\u{1b}".repeat(12_000)).collect();
    store.append_output(&id, OutputStream::Stdout, 1, &plain);
    store.append_output(&id, OutputStream::Stdout, 201, &escapes);
    store.flush().await.unwrap();

    let mut offset = 0;
    let mut seen = 0;
    loop {
        let page = store.output(&id, offset, MAX_OUTPUT_PAGE).await.unwrap();
        if page.lines.is_empty() {
            break;
        }
        let json =
            serde_json::to_vec(&page.lines.iter().map(|line| &line.text).collect::<Vec<_>>())
                .unwrap();
        assert!(
            json.len() <= MAX_OUTPUT_PAGE_BYTES + 3 * page.lines.len() + 2,
            "a page of {} lines is {} bytes as JSON",
            page.lines.len(),
            json.len()
        );
        assert_eq!(page.lines[0].line, offset + 1, "no line skipped");
        seen += page.lines.len();
        offset = page.next_offset;
    }
    assert_eq!(seen, 400);

    // A single line over the budget still comes, alone.
    let big = sid("s-2");
    store.create(record("s-2", now_micros())).await.unwrap();
    let huge = "\u{1b}".repeat(MAX_OUTPUT_PAGE_BYTES / 4);
    store.append_output(&big, OutputStream::Stdout, 1, &[huge.clone(), huge]);
    store.flush().await.unwrap();
    let page = store.output(&big, 0, 10).await.unwrap();
    assert_eq!((page.lines.len(), page.next_offset), (1, 1));
}

#[tokio::test]
async fn output_past_a_cap_is_counted_not_stored() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_with(
        dir.path(),
        StoreConfig {
            max_output_lines: 3,
            max_output_bytes: 10,
            ..StoreConfig::default()
        },
    )
    .await;
    let (lines_capped, bytes_capped) = (sid("s-lines"), sid("s-bytes"));
    store.create(record("s-lines", 1)).await.unwrap();
    store.create(record("s-bytes", 2)).await.unwrap();
    store.append_output(
        &lines_capped,
        OutputStream::Stdout,
        1,
        &strings(&["1", "2", "3", "4", "5"]),
    );
    // 4 + 4 bytes fit, "cccc" would make 12, and "d" comes after the cap was hit.
    store.append_output(
        &bytes_capped,
        OutputStream::Stdout,
        1,
        &strings(&["aaaa", "bbbb", "cccc", "d"]),
    );
    store.flush().await.unwrap();

    let page = store.output(&lines_capped, 0, 100).await.unwrap();
    assert_eq!(page.lines.len(), 3);
    assert_eq!((page.total, page.truncated), (5, 2));
    let page = store.output(&bytes_capped, 0, 100).await.unwrap();
    assert_eq!(
        texts(&page),
        [
            (1, OutputStream::Stdout, "aaaa"),
            (2, OutputStream::Stdout, "bbbb")
        ]
    );
    assert_eq!((page.total, page.truncated), (4, 2));
}

/// A store whose writer lingers for an hour over appends, with events 1..=`appends` of this
/// node queued and the writer asleep in its linger (stats taken before the appends).
async fn lingering_store(dir: &Path, appends: u64) -> (Store, StoreStats) {
    let store = open_with(dir, lingering(StoreConfig::default())).await;
    linger_over(store, appends).await
}

/// `config` with an hour's linger over appends.
fn lingering(config: StoreConfig) -> StoreConfig {
    StoreConfig {
        append_linger: Duration::from_secs(3600),
        ..config
    }
}

/// Queues events 1..=`appends` of this node in a store opened with [`lingering`] and waits until
/// its writer sleeps in the linger (stats taken before the appends).
async fn linger_over(store: Store, appends: u64) -> (Store, StoreStats) {
    store.flush().await.unwrap();
    let before = store.stats();
    for seq in 1..=appends {
        EventStore::append(&store, &item(seq, event(node(), seq, now_micros())));
    }
    store.until_lingering().await;
    (store, before)
}

/// Appends alone wait for the linger, gathering into one commit; a request someone waits for
/// commits at once with everything queued before it (with an hour's linger, a waiter that
/// waited for it would hang this test).
#[tokio::test]
async fn appends_linger_into_one_commit_and_a_waiter_ends_the_wait() {
    let dir = tempfile::tempdir().unwrap();
    let (store, before) = lingering_store(dir.path(), 200).await;
    store.create(record("s-1", 1)).await.unwrap();
    let after = store.stats();
    assert_eq!(after.requests - before.requests, 201);
    assert_eq!(after.commits - before.commits, 1, "{after:?}");
    let stored = store.node_events_after(&node(), 0, 1000).await.unwrap();
    assert_eq!(stored.len(), 200);
}

/// Appends do not wake a lingering writer, but dropping the last handle does: the queued appends
/// are committed and the drop returns (with an hour's linger, a writer left asleep would hang
/// this test).
#[tokio::test]
async fn dropping_the_store_while_it_lingers_commits_the_appends_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = lingering_store(dir.path(), 50).await;
    drop(store);
    let store = open_with(dir.path(), StoreConfig::default()).await;
    let stored = store.node_events_after(&node(), 0, 1000).await.unwrap();
    assert_eq!(stored.len(), 50);
}

/// An id reservation asked for while the writer lingers over appends is made durable at once
/// (publishing waits for it), not after the linger.
#[tokio::test]
async fn a_reservation_asked_for_while_the_writer_lingers_is_not_held_back() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = lingering_store(dir.path(), 20).await;
    let through = store.reserved_ids() + 1_000;
    store.reserve_ids(through).await.unwrap();
    assert!(store.reserved_ids() >= through);
}

#[tokio::test]
async fn appends_past_the_pending_bound_are_dropped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_with(
        dir.path(),
        StoreConfig {
            max_pending_appends: 0,
            ..StoreConfig::default()
        },
    )
    .await;
    store.create(record("s-1", 1)).await.unwrap();
    store.append_output(&sid("s-1"), OutputStream::Stdout, 1, &strings(&["x"]));
    EventStore::append(&store, &item(1, event(node(), 1, now_micros())));
    store.flush().await.unwrap();
    assert_eq!(store.stats().dropped_appends, 2);
    assert_eq!(store.output(&sid("s-1"), 0, 10).await.unwrap().total, 0);
}

/// An event of `node` carrying `lines` of output.
fn output_event(node: NodeId, seq: u64, lines: &[String]) -> Event {
    Event {
        data: EventData::SessionOutput(SessionOutput {
            stream: OutputStream::Stdout,
            first_line: 1,
            lines: lines.to_vec(),
            skipped: 0,
        }),
        ..event(node, seq, now_micros())
    }
}

/// The bytes of appends waiting for the writer are bounded too (one append may hold megabytes
/// of lines): past the bound, this node's appends are dropped and counted, other nodes' events
/// are not (the relay bounds them), what was accepted is written, and the writer gives the
/// bytes back when it takes the appends.
#[tokio::test]
async fn appends_past_the_pending_byte_bound_are_dropped_and_counted() {
    const APPEND: usize = 16 * 1024;
    let dir = tempfile::tempdir().unwrap();
    let lines: Vec<String> = (0..4).map(|_| "x".repeat(APPEND / 4)).collect();
    // Room for three appends of 16 KiB (and their overhead), not four.
    let config = lingering(StoreConfig {
        max_pending_append_bytes: 3 * APPEND + APPEND / 2,
        ..StoreConfig::default()
    });
    let store = open_with(dir.path(), config).await;
    store.create(record("s-1", 1)).await.unwrap();
    // One small event queued, the writer asleep in its linger: nothing is taken meanwhile.
    let (store, before) = linger_over(store, 1).await;
    for first_line in (1..=40).step_by(4) {
        store.append_output(&sid("s-1"), OutputStream::Stdout, first_line, &lines);
    }
    EventStore::append(&store, &item(2, output_event(node(), 2, &lines)));
    EventStore::append(&store, &item(3, output_event(other_node(), 7, &lines)));
    assert_eq!(
        store.stats().dropped_appends - before.dropped_appends,
        7 + 1
    );
    store.flush().await.unwrap();
    let page = store.output(&sid("s-1"), 0, 100).await.unwrap();
    assert_eq!(page.total, 12, "the first three appends");
    assert_eq!(
        store.node_events_after(&node(), 0, 10).await.unwrap().len(),
        1
    );
    assert_eq!(
        store
            .node_events_after(&other_node(), 0, 10)
            .await
            .unwrap()
            .len(),
        1,
        "another node's event is never dropped"
    );
    // Taken by the writer, the bytes are free again.
    for first_line in [13, 17, 21] {
        store.append_output(&sid("s-1"), OutputStream::Stdout, first_line, &lines);
    }
    store.flush().await.unwrap();
    assert_eq!(store.output(&sid("s-1"), 0, 100).await.unwrap().total, 24);
    assert_eq!(store.stats().dropped_appends - before.dropped_appends, 8);
}

// ---------------------------------------------------------------------------------------------
// Events

/// Appends `own` events of this node and, between them, events relayed from another node.
fn append_mixed(store: &Store, own: u64, at: u64) -> u64 {
    let mut pos = 0;
    for seq in 1..=own {
        pos += 1;
        store.append(&item(pos, event(node(), seq, at)));
        if seq % 3 == 0 {
            pos += 1;
            store.append(&item(pos, event(other_node(), 100 + seq, at)));
        }
    }
    pos
}

#[tokio::test]
async fn resume_gives_this_nodes_counters_and_the_newest_events() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path()).await;
    let empty = store.resume(10);
    assert_eq!((empty.last_seq, empty.last_pos), (0, 0));
    assert!(empty.recent.is_empty());

    let last_pos = append_mixed(&store, 10, now_micros());
    // No flush: resume must see what was queued.
    let resume = store.resume(4);
    assert_eq!(
        resume.last_seq, 10,
        "the other node's higher seqs do not count"
    );
    assert_eq!(resume.last_pos, last_pos);
    assert_eq!(positions(&resume.recent), [10, 11, 12, 13]);
    assert_eq!(resume.recent[3].event.id, EventId::new(node(), 10));

    store.close().await.unwrap();
    let store = open(dir.path()).await;
    let resume = store.resume(100);
    assert_eq!((resume.last_seq, resume.last_pos), (10, 13));
    assert_eq!(resume.recent.len(), 13);
}

#[tokio::test]
async fn events_after_returns_the_following_matching_events() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path()).await;
    append_mixed(&store, 10, now_micros());
    store.flush().await.unwrap();

    let page = store
        .events_after(&EventId::new(node(), 4), &EventFilter::all(), 100)
        .await
        .unwrap();
    assert!(page.found);
    assert!(!page.more);
    // node-a:4 is at pos 5 (node-b:103 was at pos 4).
    assert_eq!(positions(&page.events), [6, 7, 8, 9, 10, 11, 12, 13]);
    assert_eq!(page.through_pos, 13);

    let only_b = EventFilter {
        nodes: vec![other_node()],
        ..EventFilter::all()
    };
    let page = store
        .events_after(&EventId::new(node(), 1), &only_b, 2)
        .await
        .unwrap();
    let ids: Vec<_> = page.events.iter().map(|item| item.event.id.seq).collect();
    assert_eq!(ids, [103, 106]);
    assert!(page.more, "node-b:109 follows");
    let page = store
        .events_after(&EventId::new(other_node(), 106), &only_b, 2)
        .await
        .unwrap();
    assert_eq!(positions(&page.events), [12]);
    assert!(!page.more);

    let kinds = EventFilter {
        kinds: vec![KindPattern::Exact(EventKind::SessionOutput)],
        ..EventFilter::all()
    };
    let page = store
        .events_after(&EventId::new(node(), 1), &kinds, 10)
        .await
        .unwrap();
    assert!(page.found && page.events.is_empty());
    assert_eq!(page.through_pos, 13);

    let unknown = store
        .events_after(&EventId::new(node(), 99), &EventFilter::all(), 10)
        .await
        .unwrap();
    assert!(!unknown.found);
    assert!(unknown.events.is_empty());
}

#[tokio::test]
async fn events_after_pos_continues_a_replay_where_the_last_page_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path()).await;
    append_mixed(&store, 10, now_micros());
    store.flush().await.unwrap();
    let only_b = EventFilter {
        nodes: vec![other_node()],
        ..EventFilter::all()
    };
    // The first page stops after node-b:106 (pos 8); the next one starts right after it,
    // whether or not the last examined event matched.
    let first = store
        .events_after(&EventId::new(node(), 1), &only_b, 2)
        .await
        .unwrap();
    assert_eq!(first.through_pos, 8);
    let next = store
        .events_after_pos(first.through_pos, &only_b, 2)
        .await
        .unwrap();
    assert_eq!(positions(&next.events), [12]);
    assert_eq!(next.through_pos, 13);
    assert!(!next.more);
    let past_the_end = store
        .events_after_pos(13, &EventFilter::all(), 10)
        .await
        .unwrap();
    assert!(past_the_end.events.is_empty() && !past_the_end.more);
    assert_eq!(past_the_end.through_pos, 13);
}

/// A replay page holds about [`MAX_EVENT_PAGE_BYTES`] of events, not [`MAX_EVENT_PAGE`] of up
/// to 64 KiB each (which was over half a gigabyte per replaying link): it stops early with
/// `more`, and the next page goes on from its `through_pos` without gap or duplicate.
#[tokio::test]
async fn an_event_page_of_large_events_ends_at_its_byte_budget_and_the_next_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path()).await;
    // 40 output events of 64 KiB (2.5 MiB): a page of them is 15 or 16 events.
    let lines = vec!["x".repeat(64 * 1024)];
    for seq in 1..=40 {
        store.append(&item(seq, output_event(node(), seq, &lines)));
    }
    store.flush().await.unwrap();

    let mut page = store
        .events_after(
            &EventId::new(node(), 1),
            &EventFilter::all(),
            MAX_EVENT_PAGE,
        )
        .await
        .unwrap();
    let mut seen = Vec::new();
    let mut pages = 0;
    loop {
        pages += 1;
        assert!(
            !page.events.is_empty(),
            "every page holds at least one event"
        );
        assert!(
            page.events.len() * 64 * 1024 <= MAX_EVENT_PAGE_BYTES,
            "a page of {} events of 64 KiB",
            page.events.len()
        );
        assert_eq!(page.through_pos, page.events.last().unwrap().pos);
        seen.extend(positions(&page.events));
        if !page.more {
            break;
        }
        page = store
            .events_after_pos(page.through_pos, &EventFilter::all(), MAX_EVENT_PAGE)
            .await
            .unwrap();
    }
    assert_eq!(seen, (2..=40).collect::<Vec<_>>(), "no gap, no duplicate");
    assert!(pages >= 3, "{pages} pages");

    // A single event over the budget still comes, alone.
    let huge = vec!["y".repeat(MAX_EVENT_PAGE_BYTES)];
    store.append(&item(41, output_event(node(), 41, &huge)));
    store.append(&item(42, output_event(node(), 42, &huge)));
    store.flush().await.unwrap();
    let page = store
        .events_after_pos(40, &EventFilter::all(), 10)
        .await
        .unwrap();
    assert_eq!(positions(&page.events), [41]);
    assert!(page.more);
    assert_eq!(page.through_pos, 41);
}

#[tokio::test]
async fn retention_by_count_deletes_the_oldest_events_and_their_index() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_with(
        dir.path(),
        StoreConfig {
            event_retention_count: 5,
            ..StoreConfig::default()
        },
    )
    .await;
    let at = now_micros();
    for seq in 1..=12 {
        store.append(&item(seq, event(node(), seq, at)));
    }
    store.flush().await.unwrap();

    let gone = store
        .events_after(&EventId::new(node(), 7), &EventFilter::all(), 10)
        .await
        .unwrap();
    assert!(!gone.found, "node-a:7 was deleted by retention");
    let kept = store
        .events_after(&EventId::new(node(), 8), &EventFilter::all(), 10)
        .await
        .unwrap();
    assert!(kept.found);
    assert_eq!(positions(&kept.events), [9, 10, 11, 12]);
    let resume = store.resume(100);
    assert_eq!(positions(&resume.recent), [8, 9, 10, 11, 12]);
    assert_eq!((resume.last_seq, resume.last_pos), (12, 12));
    assert_eq!(store.stats().pruned_events, 7);
}

#[tokio::test]
async fn retention_by_bytes_keeps_the_log_under_its_budget() {
    let dir = tempfile::tempdir().unwrap();
    let at = now_micros();
    let size = serde_json::to_vec(&event(node(), 1, at)).unwrap().len() as u64
        + event_overhead(node().as_str());
    let store = open_with(
        dir.path(),
        StoreConfig {
            event_retention_bytes: 3 * size,
            ..StoreConfig::default()
        },
    )
    .await;
    for seq in 1..=9 {
        store.append(&item(seq, event(node(), seq, at)));
    }
    store.flush().await.unwrap();
    let report = store.prune(Timestamp::from_micros(at)).await.unwrap();
    assert_eq!(report.removed, 0, "already pruned in the appends' batches");
    assert_eq!(report.remaining, 3);
    assert_eq!(report.remaining_bytes, 3 * size);
    assert_eq!(positions(&store.resume(100).recent), [7, 8, 9]);
}

/// Regression: events are kept in arrival order but aged by their publisher's clock, and age
/// retention stopped at the oldest event that had not expired: one event of a peer whose clock
/// is two days ahead held back every expired event behind it. Now an event dated ahead of the
/// clock is aged by arrival: it goes with the first sanely dated event after it once that one
/// has expired (still from the oldest on, so a replay sees no hole), and stays while that one
/// has not.
#[tokio::test]
async fn an_event_dated_ahead_of_the_clock_does_not_hold_back_age_retention() {
    let dir = tempfile::tempdir().unwrap();
    let now = now_micros();
    // The automatic age pass (due as the store opens, then hourly here) runs on the empty
    // store, by the flush, before anything is appended: only the explicit prune below deletes
    // (it could otherwise take the expired events first, and the prune find nothing to do).
    let config = StoreConfig {
        prune_interval: Duration::from_secs(3600),
        ..StoreConfig::default()
    };
    let store = open_with(dir.path(), config).await;
    store.flush().await.unwrap();
    store.append(&item(1, event(other_node(), 1, now + 2 * DAY)));
    for pos in 2..=10 {
        store.append(&item(pos, event(node(), pos, now - 8 * DAY)));
    }
    store.append(&item(11, event(other_node(), 2, now + 3 * DAY)));
    for pos in 12..=13 {
        store.append(&item(pos, event(node(), pos, now)));
    }
    store.flush().await.unwrap();

    let report = store.prune(Timestamp::from_micros(now)).await.unwrap();
    assert_eq!(report.removed, 10, "{report:?}");
    assert_eq!(
        positions(&store.resume(100).recent),
        [11, 12, 13],
        "the one dated ahead before recent events stays"
    );
    assert_eq!(store.oldest_event_pos().await.unwrap(), Some(11));
}

#[tokio::test]
async fn retention_by_age_uses_the_given_clock() {
    let dir = tempfile::tempdir().unwrap();
    let now = now_micros();
    let store = open(dir.path()).await;
    // One event a day, from 6 days ago to today (all within the default 7 days).
    for day in 0..7u64 {
        store.append(&item(
            day + 1,
            event(node(), day + 1, now - (6 - day) * DAY),
        ));
    }
    store.flush().await.unwrap();
    // Three days later the cutoff is 4 days before `now`: the events 6 and 5 days old go, the
    // one exactly 4 days old stays.
    let later = Timestamp::from_micros(now + 3 * DAY);
    let report = store.prune(later).await.unwrap();
    assert_eq!(report.cutoff.as_micros(), now - 4 * DAY);
    assert_eq!(
        report.removed, 2,
        "6 and 5 days old are older than the cutoff"
    );
    assert_eq!(report.remaining, 5);
    assert_eq!(positions(&store.resume(100).recent), [3, 4, 5, 6, 7]);
    assert_eq!(store.stats().pruned_events, 2);
}

#[tokio::test]
async fn old_events_are_pruned_when_the_store_opens() {
    let dir = tempfile::tempdir().unwrap();
    let now = now_micros();
    let keep_all = StoreConfig {
        event_retention: Duration::from_secs(365 * 24 * 3600),
        ..StoreConfig::default()
    };
    let store = open_with(dir.path(), keep_all).await;
    store.append(&item(1, event(node(), 1, now - 30 * DAY)));
    store.append(&item(2, event(node(), 2, now - DAY)));
    store.close().await.unwrap();

    // The default 7 days apply from the first batch on, without waiting for the schedule.
    let store = open(dir.path()).await;
    store.flush().await.unwrap();
    assert_eq!(positions(&store.resume(10).recent), [2]);
}

#[tokio::test]
async fn counters_survive_when_retention_deleted_every_event() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path()).await;
    let long_ago = now_micros() - 10 * DAY;
    append_mixed(&store, 6, long_ago);
    let report = store.prune(Timestamp::now()).await.unwrap();
    assert_eq!((report.remaining, report.remaining_bytes), (0, 0));
    store.close().await.unwrap();

    let store = open(dir.path()).await;
    let resume = store.resume(10);
    assert!(resume.recent.is_empty());
    assert_eq!(
        (resume.last_seq, resume.last_pos),
        (6, 8),
        "ids never repeat, even with an empty log"
    );
}

/// Stores a session that ran and ended in `end` at `ended` µs, with `lines` output lines.
async fn ended_session(
    store: &Store,
    id: &str,
    (created, ended): (u64, u64),
    end: SessionState,
    key: Option<&str>,
    lines: u64,
) -> SessionRecord {
    let mut current = record(id, created);
    current.spec.idempotency_key = key.map(str::to_owned);
    store.create(current.clone()).await.unwrap();
    let current = advance(store, &current, SessionState::Starting).await;
    let current = advance(store, &current, SessionState::Running).await;
    let texts: Vec<String> = (1..=lines).map(|n| format!("line {n}")).collect();
    store.append_output(&current.id, OutputStream::Stdout, 1, &texts);
    let (mut next, mut transition) = step(&current, end);
    next.ended_at = Some(Timestamp::from_micros(ended));
    transition.at = Timestamp::from_micros(ended);
    store.transition(next.clone(), transition).await.unwrap();
    next
}

/// How many rows session `id` has in each table keyed by it: sessions, session_order,
/// transitions, output, output_counters.
fn rows_of(store: &Store, id: &str) -> [usize; 5] {
    let txn = store.inner.db.get().unwrap().begin_read().unwrap();
    let sessions = txn.open_table(SESSIONS).unwrap();
    let order = txn.open_table(SESSION_ORDER).unwrap();
    let transitions = txn.open_table(TRANSITIONS).unwrap();
    let output = txn.open_table(OUTPUT).unwrap();
    let counters = txn.open_table(OUTPUT_COUNTERS).unwrap();
    [
        usize::from(sessions.get(id).unwrap().is_some()),
        order
            .iter()
            .unwrap()
            .filter(|entry| entry.as_ref().unwrap().0.value().1 == id)
            .count(),
        transitions.range((id, 0)..=(id, u64::MAX)).unwrap().count(),
        output.range((id, 0)..=(id, u64::MAX)).unwrap().count(),
        usize::from(counters.get(id).unwrap().is_some()),
    ]
}

#[tokio::test]
async fn sessions_that_ended_before_the_retention_are_deleted_with_their_output_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let now = now_micros();
    let store = open(dir.path()).await;
    let old = (now - 40 * DAY, now - 39 * DAY);
    ended_session(
        &store,
        "s-old",
        old,
        SessionState::Succeeded,
        Some("build-1"),
        3,
    )
    .await;
    let interrupted = (now - 35 * DAY, now - 31 * DAY);
    ended_session(
        &store,
        "s-old-2",
        interrupted,
        SessionState::Interrupted,
        None,
        1,
    )
    .await;
    // Created long ago, but ended yesterday: what counts is when it ended.
    let long = (now - 40 * DAY + 1, now - DAY);
    ended_session(
        &store,
        "s-long",
        long,
        SessionState::Failed,
        Some("build-2"),
        2,
    )
    .await;
    let recent = (now - 2 * DAY, now - 2 * DAY + 1);
    ended_session(&store, "s-new", recent, SessionState::Cancelled, None, 1).await;
    // Old but not ended: never deleted.
    let stuck = record("s-stuck", now - 40 * DAY + 2);
    store.create(stuck.clone()).await.unwrap();
    let stuck = advance(&store, &stuck, SessionState::Starting).await;
    let stuck = advance(&store, &stuck, SessionState::Running).await;
    let mut queued = record("s-queued", now - 45 * DAY);
    queued.spec.idempotency_key = Some("build-3".into());
    store.create(queued.clone()).await.unwrap();
    assert_eq!(rows_of(&store, "s-old"), [1, 1, 3, 3, 1]);

    let report = store.prune(Timestamp::from_micros(now)).await.unwrap();
    assert_eq!(report.session_cutoff.as_micros(), now - 30 * DAY);
    assert_eq!(report.sessions_removed, 2, "s-old and s-old-2");
    assert_eq!(store.stats().pruned_sessions, 2);

    for id in ["s-old", "s-old-2"] {
        assert_eq!(store.get(&sid(id)).await.unwrap(), None, "{id}");
        assert_eq!(rows_of(&store, id), [0; 5], "{id}: every row is gone");
        assert_eq!(
            store.read_output(&sid(id), 0, 100).await,
            Err(StoreError::NotFound(sid(id)))
        );
    }
    // The key is free again: the same key makes a new session.
    assert_eq!(store.find_by_key("build-1").await.unwrap(), None);
    let mut again = record("s-again", now);
    again.spec.idempotency_key = Some("build-1".into());
    store.create(again.clone()).await.unwrap();
    assert_eq!(store.find_by_key("build-1").await.unwrap(), Some(again));

    // The others are all there, with their output, transitions and keys.
    assert_eq!(store.get(&sid("s-stuck")).await.unwrap(), Some(stuck));
    assert_eq!(store.get(&sid("s-queued")).await.unwrap(), Some(queued));
    assert_eq!(rows_of(&store, "s-long"), [1, 1, 3, 2, 1]);
    assert_eq!(rows_of(&store, "s-new"), [1, 1, 3, 1, 1]);
    assert_eq!(
        store.find_by_key("build-2").await.unwrap().map(|r| r.id),
        Some(sid("s-long"))
    );
    assert_eq!(
        store.find_by_key("build-3").await.unwrap().map(|r| r.id),
        Some(sid("s-queued"))
    );
    let listed: BTreeSet<String> = store
        .list(SessionQuery::default())
        .await
        .unwrap()
        .sessions
        .iter()
        .map(|record| record.id.to_string())
        .collect();
    let expected = ["s-again", "s-long", "s-new", "s-queued", "s-stuck"];
    assert_eq!(listed, expected.map(String::from).into());
    assert_eq!(
        store
            .prune(Timestamp::from_micros(now))
            .await
            .unwrap()
            .sessions_removed,
        0
    );
}

#[tokio::test]
async fn without_session_retention_ended_sessions_are_kept() {
    let dir = tempfile::tempdir().unwrap();
    let now = now_micros();
    let store = open_with(
        dir.path(),
        StoreConfig {
            session_retention: None,
            ..StoreConfig::default()
        },
    )
    .await;
    let old = (now - 400 * DAY, now - 399 * DAY);
    ended_session(&store, "s-old", old, SessionState::Succeeded, None, 1).await;
    let report = store.prune(Timestamp::from_micros(now)).await.unwrap();
    assert_eq!(report.sessions_removed, 0);
    assert_eq!(rows_of(&store, "s-old"), [1, 1, 3, 1, 1]);
}

#[tokio::test]
async fn automatic_session_retention_deletes_a_chunk_per_pass_and_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let now = now_micros();
    let config = StoreConfig {
        session_prune_chunk: 2,
        prune_interval: Duration::from_secs(3600),
        ..StoreConfig::default()
    };
    let store = open_with(dir.path(), config.clone()).await;
    for n in 0..5u64 {
        let at = (now - 40 * DAY + n, now - 39 * DAY);
        let id = format!("s-old-{n}");
        ended_session(&store, &id, at, SessionState::Succeeded, None, 2).await;
    }
    let running = record("s-running", now - 50 * DAY);
    store.create(running.clone()).await.unwrap();
    store.close().await.unwrap();

    // The first pass runs as the store opens (with the wall clock), deletes two, and the
    // passes after it follow at once: 2 + 2 + 1, one commit each, and nothing else is written.
    let store = open_with(dir.path(), config).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while store.stats().pruned_sessions < 5 {
        assert!(
            Instant::now() < deadline,
            "retention did not go on: {:?}",
            store.stats()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    store.flush().await.unwrap();
    let stats = store.stats();
    assert_eq!((stats.pruned_sessions, stats.commits), (5, 3));
    for n in 0..5 {
        assert_eq!(rows_of(&store, &format!("s-old-{n}")), [0; 5]);
    }
    assert_eq!(store.get(&sid("s-running")).await.unwrap(), Some(running));
}

// ---------------------------------------------------------------------------------------------
// Lifecycle and crash safety

#[tokio::test]
async fn dropping_the_store_without_closing_keeps_what_was_queued() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path()).await;
    store.create(record("s-1", now_micros())).await.unwrap();
    store.append_output(&sid("s-1"), OutputStream::Stdout, 1, &strings(&["bye"]));
    store.append(&item(1, event(node(), 1, now_micros())));
    drop(store);

    let store = open(dir.path()).await;
    assert_eq!(store.output(&sid("s-1"), 0, 10).await.unwrap().total, 1);
    assert_eq!(store.resume(10).last_seq, 1);
}

#[tokio::test]
async fn close_commits_and_later_calls_fail_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path()).await;
    let other = store.clone();
    store.append(&item(1, event(node(), 1, now_micros())));
    store.close().await.unwrap();
    let refused = other.create(record("s-1", 1)).await.unwrap_err();
    assert!(io_message(refused).contains("closed"));
    other.append(&item(2, event(node(), 2, now_micros())));
    assert_eq!(other.stats().dropped_appends, 1);
    drop(other);

    let store = open(dir.path()).await;
    assert_eq!(store.resume(10).last_pos, 1);
}

/// Regression: `close` stopped the writer but the database stayed open while another handle of
/// the store lived (the node's components keep clones), so the data directory stayed locked
/// after `NodeHandle::shutdown` until every handle was dropped. Now the file is released at the
/// close; the handles left answer that the store is closed.
#[tokio::test]
async fn close_releases_the_file_while_other_handles_live() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path()).await;
    let other = store.clone();
    store.create(record("s-1", 1)).await.unwrap();
    store.close().await.unwrap();

    let reopened = open(dir.path()).await;
    assert!(reopened.get(&sid("s-1")).await.unwrap().is_some());
    let refused = other.get(&sid("s-1")).await.unwrap_err();
    assert!(io_message(refused).contains("closed"));
    assert!(other.flush().await.is_err());
    drop(other);
    reopened.close().await.unwrap();
}

#[tokio::test]
async fn the_file_is_readable_by_its_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let store = open(&data_dir).await;
    let mode = |path: &Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(store.path()), 0o600);
    assert_eq!(mode(&data_dir), 0o700);
}

#[tokio::test]
async fn a_second_open_of_the_same_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let _store = open(dir.path()).await;
    let refused = Store::open(dir.path(), node(), StoreConfig::default())
        .await
        .err()
        .unwrap();
    assert!(
        matches!(&refused, StoreError::InUse(message) if message.contains("already open")),
        "{refused}"
    );
}

/// The child process of [`acknowledged_writes_survive_a_kill`] reads its directory here.
const CRASH_DIR: &str = "TROUPE_STORE_CRASH_DIR";

/// Runs in a child process (see [`acknowledged_writes_survive_a_kill`]): sessions through their
/// whole path from 32 tasks, with output and events alongside, printing each acknowledged write,
/// until the parent kills it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the child of acknowledged_writes_survive_a_kill"]
async fn crash_child_writes_until_killed() {
    let Some(dir) = std::env::var_os(CRASH_DIR) else {
        return;
    };
    let store = Store::open(dir, node(), StoreConfig::default())
        .await
        .unwrap();
    let positions = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..32 {
        let store = store.clone();
        let positions = positions.clone();
        tasks.spawn(async move {
            // Bounded, so a child whose parent died finishes on its own.
            for n in 0..1000 {
                let id = format!("s-{worker}-{n}");
                let mut current = record(&id, now_micros());
                store.create(current.clone()).await.unwrap();
                println!("ACK {id} queued");
                for to in [
                    SessionState::Starting,
                    SessionState::Running,
                    SessionState::Succeeded,
                ] {
                    let pos = positions.fetch_add(1, Ordering::Relaxed) + 1;
                    store.append(&item(pos, event(node(), pos, now_micros())));
                    store.append_output(
                        &current.id,
                        OutputStream::Stdout,
                        u64::from(to as u8),
                        &strings(&["line"]),
                    );
                    current = advance(&store, &current, to).await;
                    println!("ACK {id} {to}");
                }
            }
        });
    }
    while let Some(task) = tasks.join_next().await {
        task.unwrap();
    }
}

/// Kills a process in the middle of a stream of writes (SIGKILL: nothing is flushed, nothing is
/// closed) and checks that every write it acknowledged is in the reopened store, and that the
/// event log and its index agree.
#[test]
fn acknowledged_writes_survive_a_kill() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "store::tests::crash_child_writes_until_killed",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CRASH_DIR, dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let mut acked: HashMap<String, SessionState> = HashMap::new();
    let mut acks = 0;
    let mut killed = false;
    // Every line read was printed after its write was acknowledged, including lines still in
    // the pipe when the child dies.
    for line in stdout.lines() {
        let line = line.unwrap();
        let Some((id, state)) = line
            .strip_prefix("ACK ")
            .and_then(|ack| ack.split_once(' '))
        else {
            continue;
        };
        let Ok(state) = state.parse::<SessionState>() else {
            continue;
        };
        let entry = acked.entry(id.to_owned()).or_insert(state);
        *entry = (*entry).max(state);
        acks += 1;
        if acks == 600 && !killed {
            child.kill().unwrap();
            killed = true;
        }
    }
    child.wait().unwrap();
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(killed, "the child stopped before it was killed: {stderr}");

    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let store = open(dir.path()).await;
        for (id, state) in &acked {
            let stored = store.get(&sid(id)).await.unwrap();
            let stored = stored.unwrap_or_else(|| panic!("{id} was acknowledged, then lost"));
            // Later (unacknowledged) transitions may have landed too; nothing earlier may.
            assert!(stored.state >= *state, "{id}: {} < {state}", stored.state);
            let transitions = store.transitions(&sid(id)).await.unwrap();
            assert_eq!(transitions.len(), stored.state as usize, "{id}");
        }
        // Every index entry points at its event, and counters cover the log.
        let resume = store.resume(usize::MAX);
        assert!(resume.recent.windows(2).all(|w| w[0].pos < w[1].pos));
        assert!(resume.last_pos >= resume.recent.last().map_or(0, |item| item.pos));
        assert!(
            resume.last_seq
                >= resume
                    .recent
                    .iter()
                    .map(|i| i.event.id.seq)
                    .max()
                    .unwrap_or(0)
        );
        let db = store.inner.db.get().unwrap();
        let txn = db.begin_read().unwrap();
        let index = txn.open_table(EVENT_INDEX).unwrap();
        let events = txn.open_table(EVENTS).unwrap();
        assert_eq!(index.len().unwrap(), events.len().unwrap());
        for entry in index.iter().unwrap() {
            let (key, pos) = entry.unwrap();
            let (node, seq) = key.value();
            let stored = events.get(pos.value()).unwrap().expect("indexed event");
            let event: Event = serde_json::from_slice(stored.value()).unwrap();
            assert_eq!((event.id.node.as_str(), event.id.seq), (node, seq));
        }
        // Creating new sessions works right away.
        store.create(record("s-after", now_micros())).await.unwrap();
    });
}

#[tokio::test]
async fn corrupt_values_are_errors_that_name_their_key() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path()).await;
    store.create(record("s-good", now_micros())).await.unwrap();
    store.append(&item(1, event(node(), 1, now_micros())));
    store.close().await.unwrap();
    {
        // Foreign bytes written straight into the file.
        let db = Database::create(dir.path().join(FILE_NAME)).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let created = now_micros();
            let mut sessions = txn.open_table(SESSIONS).unwrap();
            sessions.insert("s-bad", b"{not json".as_slice()).unwrap();
            let mut order = txn.open_table(SESSION_ORDER).unwrap();
            order.insert((created, "s-bad"), ()).unwrap();
            let mut unfinished = txn.open_table(UNFINISHED).unwrap();
            unfinished.insert((created, "s-bad"), ()).unwrap();
            let mut events = txn.open_table(EVENTS).unwrap();
            events.insert(2, b"\xff\xfe".as_slice()).unwrap();
            let mut index = txn.open_table(EVENT_INDEX).unwrap();
            index.insert(("node-a", 2), 2).unwrap();
        }
        txn.commit().unwrap();
    }
    let store = open(dir.path()).await;
    let names_the_key = |error: StoreError| {
        let message = io_message(error);
        assert!(
            message.contains("sessions") && message.contains("s-bad"),
            "{message}"
        );
    };
    names_the_key(store.get(&sid("s-bad")).await.unwrap_err());
    names_the_key(store.list(SessionQuery::default()).await.unwrap_err());
    names_the_key(store.unfinished().await.unwrap_err());
    let (next, transition) = step(&record("s-bad", 1), SessionState::Starting);
    names_the_key(store.transition(next, transition).await.unwrap_err());
    // The good session is untouched and the writer still works.
    let good = store.get(&sid("s-good")).await.unwrap().unwrap();
    advance(&store, &good, SessionState::Starting).await;

    let message = io_message(
        store
            .events_after(&EventId::new(node(), 1), &EventFilter::all(), 10)
            .await
            .unwrap_err(),
    );
    assert!(
        message.contains("events") && message.contains('2'),
        "{message}"
    );
    let resume = store.resume(10);
    assert_eq!(positions(&resume.recent), [1], "the bad event is left out");
    assert_eq!((resume.last_seq, resume.last_pos), (2, 2));
}

// ---------------------------------------------------------------------------------------------
// The bus on top of the store

#[tokio::test]
async fn a_restarted_node_continues_its_event_ids_and_replays_from_the_store() {
    use troupe_actors::event::{Delivery, ReplayFrom, Subscription};
    use troupe_actors::node::{NodePorts, NodeTree, NodeTreeConfig};

    let dir = tempfile::tempdir().unwrap();
    let progress = EventFilter {
        kinds: vec![KindPattern::Exact(EventKind::SessionProgress)],
        ..EventFilter::all()
    };
    let publish_three = |tree: &NodeTree, from: u64| {
        for n in from..from + 3 {
            tree.events.publish(
                None,
                EventData::SessionProgress(SessionProgress {
                    message: format!("step {n}"),
                    current: Some(n),
                    total: None,
                }),
            );
        }
    };
    let start = |store: Store| async move {
        let ports = NodePorts {
            event_store: Some(Arc::new(store)),
            sessions: None,
            providers: Vec::new(),
            cluster: None,
        };
        NodeTree::start(NodeTreeConfig::new(node()), ports)
            .await
            .unwrap()
    };

    let three_ids = |mut subscription: Subscription| async move {
        let mut ids = Vec::new();
        while ids.len() < 3 {
            let delivery = tokio::time::timeout(Duration::from_secs(10), subscription.recv())
                .await
                .expect("the bus delivers what was published")
                .unwrap();
            if let Delivery::Event(event) = delivery {
                ids.push(event.id.clone());
            }
        }
        ids
    };

    let store = open(dir.path()).await;
    let tree = start(store.clone()).await;
    let subscription = tree.events.subscribe(progress.clone());
    publish_three(&tree, 1);
    let first_ids = three_ids(subscription).await;
    tree.shutdown(Duration::from_secs(5)).await;
    drop(tree);
    store.close().await.unwrap();

    let store = open(dir.path()).await;
    let tree = start(store.clone()).await;
    let subscription = tree.events.subscribe(progress.clone());
    publish_three(&tree, 4);
    let second_ids = three_ids(subscription).await;
    assert!(
        second_ids[0].seq > first_ids[2].seq,
        "ids continue after a restart: {second_ids:?} after {first_ids:?}"
    );
    // The ring was seeded from the store: the first run's events replay after a restart.
    let replay = tree
        .events
        .replay(ReplayFrom::After(first_ids[0].clone()), progress.clone())
        .await
        .unwrap();
    assert!(replay.found);
    assert_eq!(replay.events[0].id, first_ids[1]);
    // And the log answers for them too.
    store.flush().await.unwrap();
    let page = store
        .events_after(&first_ids[0], &progress, 10)
        .await
        .unwrap();
    let ids: Vec<_> = page
        .events
        .iter()
        .map(|item| item.event.id.clone())
        .collect();
    let expected: Vec<_> = first_ids[1..].iter().chain(&second_ids).cloned().collect();
    assert_eq!(ids, expected);
    tree.shutdown(Duration::from_secs(5)).await;
}

// ---------------------------------------------------------------------------------------------
// Measurement

/// Group-commit throughput: sessions through create + 3 transitions (each durable, one event
/// appended per transition) from 1, 8 and 64 concurrent submitters, with and without quick
/// repair. A measurement, not a check: run with
/// `cargo test --release -p troupe --lib store::tests::group_commit_throughput -- --ignored
/// --nocapture` (set `TROUPE_BENCH_DIR` to measure another disk than the temp dir's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement; run explicitly with --ignored --nocapture"]
async fn group_commit_throughput() {
    let root = match std::env::var_os("TROUPE_BENCH_DIR") {
        Some(dir) => tempfile::tempdir_in(dir).unwrap(),
        None => tempfile::tempdir().unwrap(),
    };
    let run_for = Duration::from_secs(3);
    for quick_repair in [true, false] {
        for submitters in [1usize, 8, 64] {
            let dir = root.path().join(format!("run-{quick_repair}-{submitters}"));
            let store = open_with(
                &dir,
                StoreConfig {
                    quick_repair,
                    ..StoreConfig::default()
                },
            )
            .await;
            let positions = Arc::new(AtomicU64::new(0));
            let started = Instant::now();
            let mut tasks = tokio::task::JoinSet::new();
            for worker in 0..submitters {
                let store = store.clone();
                let positions = positions.clone();
                tasks.spawn(async move {
                    let (mut sessions, mut transitions) = (0u64, 0u64);
                    let mut n = 0;
                    while started.elapsed() < run_for {
                        n += 1;
                        let mut current = record(&format!("s-{worker}-{n}"), now_micros());
                        store.create(current.clone()).await.unwrap();
                        for to in [
                            SessionState::Starting,
                            SessionState::Running,
                            SessionState::Succeeded,
                        ] {
                            let pos = positions.fetch_add(1, Ordering::Relaxed) + 1;
                            store.append(&item(pos, event(node(), pos, now_micros())));
                            current = advance(&store, &current, to).await;
                            transitions += 1;
                        }
                        sessions += 1;
                    }
                    (sessions, transitions)
                });
            }
            let (mut sessions, mut transitions) = (0, 0);
            while let Some(done) = tasks.join_next().await {
                let (s, t) = done.unwrap();
                sessions += s;
                transitions += t;
            }
            let elapsed = started.elapsed().as_secs_f64();
            let stats = store.stats();
            println!(
                "quick_repair={quick_repair:<5} submitters={submitters:>2}: \
                 {:>7.0} transitions/s, {:>6.0} sessions/s (create + 3 transitions), \
                 {:>6.0} commits/s, {:>5.1} requests and {:>4.2} ms of commit per batch",
                transitions as f64 / elapsed,
                sessions as f64 / elapsed,
                stats.commits as f64 / elapsed,
                stats.requests as f64 / stats.commits.max(1) as f64,
                stats.commit_time.as_secs_f64() * 1e3 / stats.commits.max(1) as f64,
            );
            store.close().await.unwrap();
        }
    }
}

/// A stop request is recorded on a running session without a transition, and survives a
/// reopen; a finished session (or one in another state) refuses it and keeps its record.
#[tokio::test]
async fn an_update_replaces_the_record_of_a_session_still_in_its_state() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path()).await;
    let queued = record("s-1", now_micros());
    store.create(queued.clone()).await.unwrap();
    let starting = advance(&store, &queued, SessionState::Starting).await;
    let running = advance(&store, &starting, SessionState::Running).await;
    let stopping = SessionRecord {
        stop_requested: Some(StopRequest::Cancel),
        ..running.clone()
    };
    store.update(stopping.clone()).await.unwrap();
    assert_eq!(store.transitions(&sid("s-1")).await.unwrap().len(), 2);

    let stale = SessionRecord {
        state: SessionState::Starting,
        ..stopping.clone()
    };
    assert_eq!(
        store.update(stale).await,
        Err(StoreError::Conflict {
            id: sid("s-1"),
            expected: SessionState::Starting,
            actual: SessionState::Running,
        })
    );
    let ended = advance(&store, &stopping, SessionState::Cancelled).await;
    assert_eq!(
        store.update(ended.clone()).await,
        Err(StoreError::Conflict {
            id: sid("s-1"),
            expected: SessionState::Cancelled,
            actual: SessionState::Cancelled,
        }),
        "a finished record is final"
    );
    assert!(matches!(
        store.update(record("s-unknown", 1)).await,
        Err(StoreError::NotFound(_))
    ));
    store.close().await.unwrap();

    let store = open(dir.path()).await;
    let stored = store.get(&sid("s-1")).await.unwrap().unwrap();
    assert_eq!(stored, ended);
    assert_eq!(stored.stop_requested, Some(StopRequest::Cancel));
}

/// redb refuses every write after one that failed for a full disk until the database is opened
/// again: the writer reopens it, so the store writes again once there is room, without a restart
/// (before, every later write failed with "Previous I/O error occurred" until the node
/// restarted). What the failed batch held was rolled back; what was committed before stays.
#[tokio::test]
async fn after_a_write_fails_for_a_full_disk_the_store_writes_again_once_there_is_room() {
    let dir = tempfile::tempdir().unwrap();
    let full = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let store = Store::open_faulty(dir.path(), node(), StoreConfig::default(), full.clone())
        .await
        .unwrap();
    let first = record("s-1", now_micros());
    store.create(first.clone()).await.unwrap();

    full.store(true, Ordering::Relaxed);
    let error = store.create(record("s-2", now_micros())).await.unwrap_err();
    assert!(error.to_string().contains("No space left"), "{error}");
    // At least this one (while batches fail, the writer also tries an empty one now and then).
    assert!(store.stats().failed_batches >= 1);
    let failure = store.write_failure().borrow().clone();
    assert!(
        failure
            .as_deref()
            .is_some_and(|error| error.contains("No space left")),
        "{failure:?}"
    );

    full.store(false, Ordering::Relaxed);
    store.create(record("s-3", now_micros())).await.unwrap();
    advance(&store, &first, SessionState::Starting).await;
    store.append_output(&sid("s-3"), OutputStream::Stdout, 1, &["after".to_owned()]);
    store.flush().await.unwrap();
    assert_eq!(store.output_lines(&sid("s-3")).await.unwrap(), 1);
    assert_eq!(
        store.get(&sid("s-1")).await.unwrap().unwrap().state,
        SessionState::Starting
    );
    assert!(
        store.get(&sid("s-2")).await.unwrap().is_none(),
        "rolled back"
    );
    assert_eq!(*store.write_failure().borrow(), None, "writes commit again");

    // Reopened on the same file: what it holds is what a restart finds.
    store.close().await.unwrap();
    let store = open(dir.path()).await;
    for (id, there) in [("s-1", true), ("s-2", false), ("s-3", true)] {
        assert_eq!(store.get(&sid(id)).await.unwrap().is_some(), there, "{id}");
    }
}

#[tokio::test]
async fn a_file_that_is_no_store_is_refused_saying_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(FILE_NAME), vec![0x5a; 8192]).unwrap();
    let error = Store::open(dir.path(), node(), StoreConfig::default())
        .await
        .err()
        .expect("a file of noise is no store");
    let message = error.to_string();
    assert!(
        message.contains(FILE_NAME) && message.contains("move it aside"),
        "{message}"
    );
}

/// A page of large records (chat sessions carry their messages) ends once it holds
/// `MAX_SESSION_PAGE_BYTES` of them, with a cursor, and the pages still cover every session.
#[tokio::test]
async fn a_listing_page_of_large_records_ends_at_its_byte_bound_and_goes_on_from_there() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path()).await;
    let big = "x".repeat(MAX_SESSION_PAGE_BYTES * 2 / 5);
    let base = now_micros();
    for n in 0..5u64 {
        let mut record = record(&format!("s-{n}"), base + n);
        record.spec.kind = chat();
        if let SessionKind::Chat(chat) = &mut record.spec.kind {
            chat.messages[0].content = big.clone();
        }
        store.create(record).await.unwrap();
    }
    let mut pages = Vec::new();
    let mut cursor = None;
    loop {
        let page = store
            .list(SessionQuery {
                limit: 100,
                cursor: cursor.clone(),
                ..SessionQuery::default()
            })
            .await
            .unwrap();
        pages.push(
            page.sessions
                .iter()
                .map(|record| record.id.to_string())
                .collect::<Vec<_>>(),
        );
        match page.next_cursor {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    assert_eq!(
        pages,
        [vec!["s-4", "s-3"], vec!["s-2", "s-1"], vec!["s-0"]],
        "two records of two fifths of the bound each fit a page, a third does not"
    );
}

/// A restart reads no more recent events than the ring keeps by its bytes: a log of large
/// events does not come into memory whole only to be trimmed by the bus.
#[tokio::test]
async fn resume_reads_recent_events_up_to_the_rings_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path()).await;
    let last_pos = append_mixed(&store, 10, now_micros());
    store.flush().await.unwrap();
    let db = store.inner.db.get().unwrap();
    let all = read::resume_within(&db, &node(), 100, usize::MAX).unwrap();
    assert_eq!(all.recent.len() as u64, last_pos);
    let charge = troupe_actors::event::ring_charge(&all.recent[0].event) as usize;
    // Room for three events of this size, not four.
    let three = read::resume_within(&db, &node(), 100, charge * 3 + charge / 2).unwrap();
    assert_eq!(
        positions(&three.recent),
        [last_pos - 2, last_pos - 1, last_pos]
    );
    assert_eq!(
        (three.last_seq, three.last_pos),
        (all.last_seq, all.last_pos)
    );
    // The newest is kept, whatever its size.
    let one = read::resume_within(&db, &node(), 100, 1).unwrap();
    assert_eq!(positions(&one.recent), [last_pos]);
}

/// Once the disk takes writes again, an idle store finds out by itself (and says so through
/// `write_failure`, which the node's health shows): the writer tries an empty batch now and then
/// while batches fail, instead of waiting for the next write to fail once more.
#[tokio::test]
async fn an_idle_store_finds_out_by_itself_that_the_disk_takes_writes_again() {
    let dir = tempfile::tempdir().unwrap();
    let full = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let store = Store::open_faulty(dir.path(), node(), StoreConfig::default(), full.clone())
        .await
        .unwrap();
    let mut failure = store.write_failure();
    full.store(true, Ordering::Relaxed);
    store.create(record("s-1", now_micros())).await.unwrap_err();
    assert!(failure.borrow_and_update().is_some());
    full.store(false, Ordering::Relaxed);
    // Nothing more is asked of the store.
    tokio::time::timeout(Duration::from_secs(30), async {
        while failure.borrow_and_update().is_some() {
            failure.changed().await.unwrap();
        }
    })
    .await
    .expect("the store found out that writes work again");
    store.create(record("s-2", now_micros())).await.unwrap();
}
