//! Resuming from the ring and the log, against a real node (bus + redb store) whose ring holds
//! only a few events.

use std::time::Duration;

use troupe_actors::event::{
    Delivery, EventData, EventFilter, EventId, FilterSet, KindPattern, ReplayFrom, SessionProgress,
};
use troupe_actors::ids::SessionId;

use super::EventStream;
use crate::config::Config;
use crate::node::{Node, NodeCore, NodeHandle};

const RING: usize = 4;
const PATIENCE: Duration = Duration::from_secs(10);

async fn node(dir: &std::path::Path) -> NodeHandle {
    node_tuned(dir, |_| {}).await
}

/// A node without HTTP whose ring holds [`RING`] events, with its data under `dir`, and its
/// configuration changed by `tune`.
async fn node_tuned(dir: &std::path::Path, tune: impl FnOnce(&mut Config)) -> NodeHandle {
    let mut config = Config::default();
    config.events.ring_capacity = RING;
    config.sessions.workspace_roots = vec![dir.to_owned()];
    tune(&mut config);
    Node::builder()
        .config(config)
        .data_dir(dir.join("data"))
        .without_http()
        .start()
        .await
        .unwrap()
}

fn progress(message: &str) -> EventData {
    EventData::SessionProgress(SessionProgress {
        message: message.into(),
        current: None,
        total: None,
    })
}

/// Publishes `count` progress events for `session` and returns their ids, once the bus has
/// taken them all (observed through a live subscription).
async fn publish(node: &NodeHandle, session: &str, count: usize) -> Vec<EventId> {
    let session = SessionId::new(session).unwrap();
    let mut watch = node.subscribe(EventFilter {
        sessions: vec![session.clone()],
        ..EventFilter::all()
    });
    for index in 0..count {
        node.events()
            .publish(Some(session.clone()), progress(&format!("step {index}")));
    }
    let mut ids = Vec::new();
    while ids.len() < count {
        match tokio::time::timeout(PATIENCE, watch.recv()).await.unwrap() {
            Some(Delivery::Event(event)) => ids.push(event.id.clone()),
            other => panic!("unexpected {other:?}"),
        }
    }
    ids
}

async fn next_id(stream: &mut EventStream) -> Delivery {
    tokio::time::timeout(PATIENCE, stream.recv())
        .await
        .expect("a delivery")
        .expect("the bus runs")
}

fn id_of(delivery: &Delivery) -> EventId {
    match delivery {
        Delivery::Event(event) => event.id.clone(),
        Delivery::Lagged(lagged) => panic!("unexpected lag marker {lagged:?}"),
    }
}

/// The events of session `session` after `after`, as a client resuming from there reads them.
async fn session_stream_after(core: &NodeCore, session: &str, after: &EventId) -> EventStream {
    let filter = EventFilter {
        sessions: vec![SessionId::new(session).unwrap()],
        ..EventFilter::all()
    };
    EventStream::open(
        &core.tree.events,
        &core.store,
        ReplayFrom::After(after.clone()),
        FilterSet::single(filter),
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn a_resume_older_than_the_ring_is_filled_from_the_log_without_gap_or_duplicate() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path()).await;
    let ids = publish(&node, "s-a", 3 * RING).await;
    let core = node.core();
    let mut stream = session_stream_after(core, "s-a", &ids[0]).await;
    let mut got = Vec::new();
    for _ in 1..ids.len() {
        got.push(id_of(&next_id(&mut stream).await));
    }
    assert_eq!(got, ids[1..], "exactly the events after the resume point");
    // Then live events, the first one next.
    let later = publish(&node, "s-a", 1).await;
    assert_eq!(id_of(&next_id(&mut stream).await), later[0]);
    node.shutdown().await;
}

#[tokio::test]
async fn a_filtered_resume_spanning_several_log_pages_keeps_only_matching_events() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path()).await;
    let first = publish(&node, "s-a", 1).await;
    let mut wanted = Vec::new();
    for _ in 0..3 {
        wanted.extend(publish(&node, "s-b", super::GAP_PAGE / 2 + 7).await);
        publish(&node, "s-a", 5).await;
    }
    let core = node.core();
    let filter = EventFilter {
        sessions: vec![SessionId::new("s-b").unwrap()],
        ..EventFilter::all()
    };
    let mut stream = EventStream::open(
        &core.tree.events,
        &core.store,
        ReplayFrom::After(first[0].clone()),
        FilterSet::single(filter),
    )
    .await
    .unwrap();
    let mut got = Vec::new();
    while let Some(delivery) = stream.next_replayed().await {
        got.push(id_of(&delivery));
    }
    assert_eq!(got.len(), wanted.len());
    assert_eq!(got, wanted);
    node.shutdown().await;
}

/// A gap of large events is read a page of about a megabyte at a time (not `GAP_PAGE` events
/// of up to 64 KiB each, held by every replaying link), and the short pages still follow each
/// other without gap or duplicate.
#[tokio::test]
async fn a_gap_of_large_events_is_held_a_megabyte_at_a_time_and_read_whole() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path()).await;
    let session = SessionId::new("s-a").unwrap();
    let mut watch = node.subscribe(EventFilter {
        sessions: vec![session.clone()],
        ..EventFilter::all()
    });
    let mut ids = Vec::new();
    for index in 0..40 {
        node.events().publish(
            Some(session.clone()),
            EventData::SessionOutput(troupe_actors::event::SessionOutput {
                stream: troupe_actors::event::OutputStream::Stdout,
                first_line: index as u64 + 1,
                lines: vec!["x".repeat(64 * 1024)],
                skipped: 0,
            }),
        );
        // One at a time: a large event reaches a subscriber only while the small ring holds it.
        match tokio::time::timeout(PATIENCE, watch.recv()).await.unwrap() {
            Some(Delivery::Event(event)) => ids.push(event.id.clone()),
            other => panic!("unexpected {other:?}"),
        }
    }
    let core = node.core();
    let mut stream = session_stream_after(core, "s-a", &ids[0]).await;
    let held = stream
        .gap
        .as_ref()
        .expect("a gap from the log")
        .buffer
        .len();
    assert!(
        held * 64 * 1024 <= crate::store::MAX_EVENT_PAGE_BYTES,
        "the first page holds {held} events of 64 KiB"
    );
    let mut got = Vec::new();
    while let Some(delivery) = stream.next_replayed().await {
        got.push(id_of(&delivery));
    }
    assert_eq!(got, ids[1..], "exactly the events after the resume point");
    node.shutdown().await;
}

#[tokio::test]
async fn an_id_the_log_does_not_know_starts_with_a_lag_marker_then_the_ring() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path()).await;
    let ids = publish(&node, "s-a", 2 * RING).await;
    let core = node.core();
    let unknown: EventId = "elsewhere:5".parse().unwrap();
    let mut stream = EventStream::open(
        &core.tree.events,
        &core.store,
        ReplayFrom::After(unknown.clone()),
        FilterSet::single(EventFilter {
            kinds: vec![KindPattern::Exact(
                troupe_actors::event::EventKind::SessionProgress,
            )],
            ..EventFilter::all()
        }),
    )
    .await
    .unwrap();
    match next_id(&mut stream).await {
        Delivery::Lagged(lagged) => assert_eq!(lagged.resume_after, Some(unknown)),
        other => panic!("expected a lag marker, got {other:?}"),
    }
    let mut got = Vec::new();
    while let Some(delivery) = stream.next_replayed().await {
        got.push(id_of(&delivery));
    }
    // The ring's part only: a non-empty suffix of what was published (the ring may also hold
    // other kinds of events, which the filter leaves out).
    assert!(!got.is_empty() && got.len() <= RING, "{got:?}");
    assert!(ids.ends_with(&got), "{got:?} is the newest part of {ids:?}");
    node.shutdown().await;
}

#[tokio::test]
async fn a_resume_inside_the_ring_does_not_touch_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path()).await;
    let ids = publish(&node, "s-a", RING).await;
    let core = node.core();
    let mut stream = EventStream::open(
        &core.tree.events,
        &core.store,
        ReplayFrom::After(ids[1].clone()),
        FilterSet::single(EventFilter::all()),
    )
    .await
    .unwrap();
    assert!(stream.gap.is_none() && stream.marker.is_none());
    let mut got = Vec::new();
    while let Some(delivery) = stream.next_replayed().await {
        got.push(id_of(&delivery));
    }
    assert_eq!(got, ids[2..]);
    node.shutdown().await;
}

/// Retention that deletes the rest of a gap while the client reads it (between two log pages)
/// is announced with a lag marker after the last event delivered, never skipped silently.
#[tokio::test]
async fn retention_between_two_log_pages_gives_a_lag_marker_not_a_silent_gap() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path()).await;
    let ids = publish(&node, "s-a", 2 * super::GAP_PAGE + 10).await;
    let core = node.core();
    let mut stream = session_stream_after(core, "s-a", &ids[0]).await;
    // The first page, all of it.
    for expected in &ids[1..=super::GAP_PAGE] {
        assert_eq!(&id_of(&next_id(&mut stream).await), expected);
    }
    // Retention deletes every event before the next page is read.
    let now = troupe_actors::ids::Timestamp::now().as_micros();
    let eight_days = 8 * 24 * 3600 * 1_000_000;
    let report = core
        .store
        .prune(troupe_actors::ids::Timestamp::from_micros(now + eight_days))
        .await
        .unwrap();
    assert_eq!(report.remaining, 0, "{report:?}");
    let lagged = match next_id(&mut stream).await {
        Delivery::Lagged(lagged) => lagged,
        other => panic!("expected a lag marker after retention, got {other:?}"),
    };
    assert_eq!(lagged.resume_after.as_ref(), Some(&ids[super::GAP_PAGE]));
    // Then the ring's part: the newest of what was published, right after the marker.
    let mut ring = Vec::new();
    while let Some(delivery) = stream.next_replayed().await {
        ring.push(id_of(&delivery));
    }
    assert!(ring.len() <= RING && ids.ends_with(&ring), "{ring:?}");
    let skipped = ids.len() - (super::GAP_PAGE + 1) - ring.len();
    assert!(
        lagged.missed >= skipped as u64,
        "{} missed, {skipped} events of the filter skipped",
        lagged.missed
    );
    node.shutdown().await;
}

/// Regression: events delivered from the log never passed through the live subscription, so
/// when it lagged while the gap was being read, its `events.lagged` marker said to resume after
/// the client's original cursor, and a client doing so read the whole gap again.
#[tokio::test]
async fn a_lag_after_a_gap_from_the_log_resumes_after_the_last_event_of_the_gap() {
    let dir = tempfile::tempdir().unwrap();
    let node = node_tuned(dir.path(), |config| config.events.subscriber_buffer = 8).await;
    let wanted = publish(&node, "s-a", 6).await;
    // The ring holds none of s-a's events now.
    publish(&node, "s-b", 2 * RING).await;
    let core = node.core();
    let mut stream = session_stream_after(core, "s-a", &wanted[0]).await;
    assert_eq!(id_of(&next_id(&mut stream).await), wanted[1]);
    // The live subscription falls behind while the client reads the gap (in runs the
    // publisher's own watch keeps up with).
    for _ in 0..3 {
        publish(&node, "s-b", 7).await;
    }
    for expected in &wanted[2..] {
        assert_eq!(id_of(&next_id(&mut stream).await), *expected);
    }
    match next_id(&mut stream).await {
        Delivery::Lagged(lagged) => assert_eq!(
            lagged.resume_after.as_ref(),
            wanted.last(),
            "resume after the last event delivered"
        ),
        other => panic!("expected a lag marker, got {other:?}"),
    }
    node.shutdown().await;
}

/// Regression: a resume id retention had deleted fell back to the ring alone, so the events
/// the log still held between the id and the ring were skipped (and resuming after the
/// marker's id again gave the same). They come from the log now, after the marker.
#[tokio::test]
async fn a_resume_id_retention_deleted_continues_from_the_oldest_event_the_log_holds() {
    let dir = tempfile::tempdir().unwrap();
    // Room for about a dozen progress events: the log keeps fewer than are published, more
    // than the ring holds.
    let node = node_tuned(dir.path(), |config| config.events.retention_bytes = 3_000).await;
    let ids = publish(&node, "s-a", 5 * RING).await;
    let core = node.core();
    core.store.flush().await.unwrap();
    let stored = core
        .store
        .node_events_after(node.node_id(), 0, 1_000)
        .await
        .unwrap();
    let first_stored = stored.first().expect("the log holds events").event.id.seq;
    assert!(first_stored > ids[2].seq, "retention deleted the resume id");
    let expected: Vec<EventId> = ids
        .iter()
        .filter(|id| id.seq >= first_stored)
        .cloned()
        .collect();
    assert!(expected.len() > RING, "the log holds more than the ring");
    let mut stream = session_stream_after(core, "s-a", &ids[2]).await;
    match next_id(&mut stream).await {
        Delivery::Lagged(lagged) => {
            assert_eq!(lagged.resume_after.as_ref(), Some(&ids[2]));
            assert_eq!(lagged.missed, first_stored - ids[2].seq - 1);
        }
        other => panic!("expected a lag marker, got {other:?}"),
    }
    let mut got = Vec::new();
    while let Some(delivery) = stream.next_replayed().await {
        got.push(id_of(&delivery));
    }
    assert_eq!(got, expected, "every event the log and the ring still hold");
    node.shutdown().await;
}

/// Regression: an id the client saw live but the log never stored (the node was killed within
/// the store's append linger, and skipped its reserved ids when it came back) started with a
/// lag marker and the whole ring, which the client had. It resumes after the newest stored
/// event of its node below it now: nothing again, no marker.
#[tokio::test]
async fn a_resume_id_seen_live_but_never_stored_resumes_after_the_last_stored_one() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path()).await;
    let ids = publish(&node, "s-a", 3 * RING).await;
    let core = node.core();
    let last = ids.last().unwrap();
    let never_stored = EventId::new(last.node.clone(), core.tree.events.last_seq() + 100);
    let mut stream = session_stream_after(core, "s-a", &never_stored).await;
    assert!(stream.marker.is_none(), "nothing was lost");
    let replayed = stream.next_replayed().await;
    assert!(replayed.is_none(), "the client has it all: {replayed:?}");
    let later = publish(&node, "s-a", 1).await;
    assert_eq!(id_of(&next_id(&mut stream).await), later[0]);
    node.shutdown().await;
}
