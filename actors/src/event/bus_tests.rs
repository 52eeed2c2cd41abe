//! The bus's id reservations and acknowledged relay batches, against a store double whose
//! durable part survives a "crash" and whose appends do not.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::Semaphore;

use super::*;
use crate::event::{SessionProgress, StoreResume};
use crate::ids::ActorPath;
use crate::kernel::{self, ActorHandle};

/// What survives a crash of the store double: the reservation only. Appends are lost (as if
/// the node was killed before they were committed, or the log dropped them).
#[derive(Default)]
struct Disk {
    reserved: u64,
    reservations: Vec<u64>,
    released: Option<u64>,
}

/// A store whose reservations wait for the test to let them through.
#[derive(Clone)]
struct GatedStore {
    disk: Arc<Mutex<Disk>>,
    gate: Arc<Semaphore>,
}

impl GatedStore {
    fn new() -> Self {
        Self {
            disk: Arc::default(),
            gate: Arc::new(Semaphore::new(0)),
        }
    }
}

impl EventStore for GatedStore {
    fn append(&self, _item: &BusItem) {}

    fn append_again(&self, _item: &BusItem, _arrival: u64) {}

    fn resume(&self, _ring_capacity: usize) -> StoreResume {
        StoreResume {
            last_seq: self.disk.lock().unwrap().reserved,
            ..StoreResume::default()
        }
    }

    fn reserve(&self, through: u64) -> Option<BoxFuture<'static, Result<(), String>>> {
        let (disk, gate) = (self.disk.clone(), self.gate.clone());
        Some(Box::pin(async move {
            gate.acquire().await.map_err(|e| e.to_string())?.forget();
            let mut disk = disk.lock().unwrap();
            disk.reserved = disk.reserved.max(through);
            disk.reservations.push(through);
            Ok(())
        }))
    }

    fn release(&self, last: u64) {
        let mut disk = self.disk.lock().unwrap();
        disk.reserved = last;
        disk.released = Some(last);
    }

    fn written(
        &self,
        _positions: std::ops::RangeInclusive<u64>,
    ) -> Option<BoxFuture<'static, Result<(), String>>> {
        None
    }

    fn relay_floor(&self, _node: &NodeId, _seq: u64) {}

    fn relay_lost(&self, _node: &NodeId, _after: u64, _through: u64) {}
}

fn progress(n: u64) -> EventData {
    EventData::SessionProgress(SessionProgress {
        message: format!("step {n}"),
        current: Some(n),
        total: None,
    })
}

/// Starts a bus for node `n1` on `store`, as a node (re)starting would.
async fn start(store: &GatedStore) -> (EventBus, ractor::ActorCell) {
    start_tuned(store, |_| {}).await
}

/// [`start`] with the bus's limits changed by `tune`.
async fn start_tuned(
    store: &GatedStore,
    tune: impl FnOnce(&mut BusShared),
) -> (EventBus, ractor::ActorCell) {
    let mut shared = BusShared::new(NodeId::new("n1").unwrap(), EventBusConfig::default());
    tune(Arc::get_mut(&mut shared).unwrap());
    let handle = ActorHandle::new(ActorPath::root().child("event_bus"));
    let store: Arc<dyn EventStore> = Arc::new(store.clone());
    let (cell, _) = kernel::spawn(
        EventBusActor,
        EventBusArgs {
            shared: shared.clone(),
            store: Some(store),
        },
        &handle,
    )
    .await
    .unwrap();
    (EventBus::new(handle, shared), cell)
}

async fn next_seq(subscription: &mut Subscription) -> u64 {
    match tokio::time::timeout(Duration::from_secs(60), subscription.recv()).await {
        Ok(Some(Delivery::Event(event))) => event.id.seq,
        other => panic!("expected an event, got {other:?}"),
    }
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn an_id_is_handed_out_only_once_reserved_and_a_crash_resumes_past_the_reservation() {
    let store = GatedStore::new();
    let (bus, cell) = start(&store).await;
    let mut events = bus.subscribe(EventFilter::all());
    for n in 1..=3 {
        bus.publish(None, progress(n));
    }
    // Nothing is reserved yet: the publishes wait, in order.
    assert!(
        tokio::time::timeout(Duration::from_secs(10), events.recv())
            .await
            .is_err(),
        "an event got an id before it was reserved"
    );
    store.gate.add_permits(1);
    assert_eq!(
        [
            next_seq(&mut events).await,
            next_seq(&mut events).await,
            next_seq(&mut events).await
        ],
        [1, 2, 3]
    );
    let reserved = store.disk.lock().unwrap().reserved;
    assert_eq!(reserved, RESERVE_BLOCK, "one block reserved ahead");

    // Killed: no clean stop, appends lost. The next start skips past the reservation, so no
    // id a client or peer saw is handed out again.
    cell.kill();
    let (bus, _) = start(&store).await;
    let mut events = bus.subscribe(EventFilter::all());
    store.gate.add_permits(1);
    bus.publish(None, progress(4));
    assert_eq!(next_seq(&mut events).await, reserved + 1);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn reservations_follow_the_ids_a_block_ahead_and_ids_stay_in_order() {
    let store = GatedStore::new();
    store.gate.add_permits(1_000);
    let (bus, _cell) = start(&store).await;
    let mut events = bus.subscribe(EventFilter::all());
    let total = RESERVE_BLOCK * 3;
    let mut expected = 1;
    for chunk in 0..total / 1024 {
        for n in 1..=1024 {
            bus.publish(None, progress(chunk * 1024 + n));
        }
        for _ in 0..1024 {
            assert_eq!(next_seq(&mut events).await, expected);
            expected += 1;
        }
    }
    let disk = store.disk.lock().unwrap();
    assert!(
        disk.reserved >= total && disk.reserved <= total + RESERVE_BLOCK,
        "reserved {} for {total} ids",
        disk.reserved
    );
    assert!(
        disk.reservations.windows(2).all(|pair| pair[0] < pair[1]),
        "{:?}",
        disk.reservations
    );
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_clean_stop_gives_the_unused_reservation_back_so_ids_stay_dense() {
    let store = GatedStore::new();
    store.gate.add_permits(100);
    let (bus, cell) = start(&store).await;
    let mut events = bus.subscribe(EventFilter::all());
    for n in 1..=5 {
        bus.publish(None, progress(n));
    }
    for expected in 1..=5 {
        assert_eq!(next_seq(&mut events).await, expected);
    }
    cell.stop_and_wait(None, Some(Duration::from_secs(5)))
        .await
        .unwrap();
    assert_eq!(store.disk.lock().unwrap().released, Some(5));
    let (bus, _) = start(&store).await;
    let mut events = bus.subscribe(EventFilter::all());
    bus.publish(None, progress(6));
    assert_eq!(next_seq(&mut events).await, 6);
}

fn remote(seq: u64) -> Event {
    Event {
        rendered: Default::default(),
        id: EventId::new(NodeId::new("peer").unwrap(), seq),
        at: Timestamp::now(),
        session: None,
        data: progress(seq),
    }
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_relayed_batch_is_answered_once_taken_with_the_highest_sequence_and_no_duplicate() {
    let store = GatedStore::new();
    let (bus, _cell) = start(&store).await;
    let peer = NodeId::new("peer").unwrap();
    let mut events = bus.subscribe(EventFilter::all());
    assert_eq!(bus.relayed_through(&peer), None);

    // The link said the stream starts after 10: nothing at or below it is taken.
    assert_eq!(
        bus.relay_batch(&peer, Some(10), Vec::new()).await.unwrap(),
        10
    );
    let batch = vec![remote(9), remote(11), remote(12), remote(12)];
    assert_eq!(bus.relay_batch(&peer, None, batch).await.unwrap(), 12);
    // A batch sent again (a relink racing an old link) changes nothing.
    let again = vec![remote(11), remote(12), remote(13)];
    assert_eq!(bus.relay_batch(&peer, None, again).await.unwrap(), 13);
    assert_eq!(bus.relayed_through(&peer), Some(13));
    for expected in [11, 12, 13] {
        assert_eq!(next_seq(&mut events).await, expected);
    }
    // Events of another node in a peer's batch, or this node's own, are not taken.
    let mut foreign = remote(14);
    foreign.id.node = NodeId::new("other").unwrap();
    let mut own = remote(15);
    own.id.node = NodeId::new("n1").unwrap();
    assert_eq!(
        bus.relay_batch(&peer, None, vec![foreign, own])
            .await
            .unwrap(),
        13
    );
    assert!(
        tokio::time::timeout(Duration::from_secs(1), events.recv())
            .await
            .is_err()
    );
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn node_after_replays_from_the_ring_and_says_whether_it_reaches_back() {
    let store = GatedStore::new();
    store.gate.add_permits(10);
    let (bus, _cell) = start(&store).await;
    let peer = NodeId::new("peer").unwrap();
    let mut events = bus.subscribe(EventFilter::all());
    bus.relay_batch(&peer, None, (5..=8).map(remote).collect())
        .await
        .unwrap();
    bus.publish(None, progress(1));
    next_seq(&mut events).await;
    let ask = |seq| ReplayFrom::NodeAfter(EventId::new(peer.clone(), seq));
    let seqs = |replay: &Replay| replay.events.iter().map(|e| e.id.seq).collect::<Vec<_>>();

    let from_6 = bus.replay(ask(6), EventFilter::all()).await.unwrap();
    assert!(from_6.found);
    assert_eq!(seqs(&from_6), [7, 8]);
    // 2 is older than the ring's oldest event of the peer (5): the log must fill 3 and 4.
    let from_2 = bus.replay(ask(2), EventFilter::all()).await.unwrap();
    assert!(!from_2.found);
    assert_eq!(seqs(&from_2), [5, 6, 7, 8]);
    // Past the newest: nothing to send, nothing missing.
    let from_20 = bus.replay(ask(20), EventFilter::all()).await.unwrap();
    assert!(from_20.found && from_20.events.is_empty());
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_narrower_filter_also_applies_to_the_replay_not_received_yet() {
    let store = GatedStore::new();
    store.gate.add_permits(10);
    let (bus, _cell) = start(&store).await;
    let (a, b) = (
        SessionId::new("s-a").unwrap(),
        SessionId::new("s-b").unwrap(),
    );
    let mut watch = bus.subscribe(EventFilter::all());
    for n in 1..=6 {
        let session = if n % 2 == 0 { &a } else { &b };
        bus.publish(Some(session.clone()), progress(n));
        next_seq(&mut watch).await;
    }
    let (mut subscription, _) = bus
        .subscribe_from(ReplayFrom::Tail(6), EventFilter::all())
        .await
        .unwrap();
    assert_eq!(next_seq(&mut subscription).await, 1);
    subscription.set_filter(EventFilter {
        sessions: vec![a.clone()],
        ..EventFilter::all()
    });
    // What the replay still held of session s-b is gone; live events follow the filter too.
    bus.publish(Some(b), progress(7));
    bus.publish(Some(a), progress(8));
    let mut rest = Vec::new();
    while rest.len() < 4 {
        rest.push(next_seq(&mut subscription).await);
    }
    assert_eq!(rest, [2, 4, 6, 8]);
}

/// A store whose `resume` blocks until a task of the runtime lets it go (or 5 s pass).
struct SlowResume {
    release: Mutex<std::sync::mpsc::Receiver<()>>,
    released_in_time: std::sync::atomic::AtomicBool,
}

impl EventStore for SlowResume {
    fn append(&self, _item: &BusItem) {}

    fn append_again(&self, _item: &BusItem, _arrival: u64) {}

    fn resume(&self, _ring_capacity: usize) -> StoreResume {
        let waited = self
            .release
            .lock()
            .unwrap()
            .recv_timeout(Duration::from_secs(5));
        self.released_in_time
            .store(waited.is_ok(), std::sync::atomic::Ordering::SeqCst);
        StoreResume::default()
    }

    fn reserve(&self, _through: u64) -> Option<BoxFuture<'static, Result<(), String>>> {
        None
    }

    fn release(&self, _last: u64) {}

    fn written(
        &self,
        _positions: std::ops::RangeInclusive<u64>,
    ) -> Option<BoxFuture<'static, Result<(), String>>> {
        None
    }

    fn relay_floor(&self, _node: &NodeId, _seq: u64) {}

    fn relay_lost(&self, _node: &NodeId, _after: u64, _through: u64) {}
}

/// The store's resume may block (a flush of queued appends, a read of the log): the bus runs it
/// off the runtime's threads, so a one-thread runtime keeps running other tasks meanwhile.
#[tokio::test(flavor = "current_thread")]
async fn a_slow_store_resume_does_not_hold_the_runtime_thread() {
    let (release, wait) = std::sync::mpsc::channel();
    let store = Arc::new(SlowResume {
        release: Mutex::new(wait),
        released_in_time: std::sync::atomic::AtomicBool::new(false),
    });
    let releaser = tokio::spawn(async move { release.send(()).unwrap() });
    let shared = BusShared::new(NodeId::new("n1").unwrap(), EventBusConfig::default());
    let handle = ActorHandle::new(ActorPath::root().child("event_bus"));
    kernel::spawn(
        EventBusActor,
        EventBusArgs {
            shared,
            store: Some(store.clone() as Arc<dyn EventStore>),
        },
        &handle,
    )
    .await
    .unwrap();
    releaser.await.unwrap();
    assert!(
        store
            .released_in_time
            .load(std::sync::atomic::Ordering::SeqCst),
        "resume blocked the only runtime thread until its 5 s timeout"
    );
}

fn output(first_line: u64, bytes: usize) -> EventData {
    EventData::SessionOutput(crate::event::SessionOutput {
        stream: crate::event::OutputStream::Stdout,
        first_line,
        lines: vec!["x".repeat(bytes)],
        skipped: 0,
    })
}

/// Starts a bus for node `n1` without a store, whose ring keeps at most `capacity` events and
/// `bytes` bytes of them.
async fn start_with_ring(capacity: usize, bytes: usize) -> EventBus {
    let config = EventBusConfig {
        ring_capacity: capacity,
        subscriber_buffer: 1024,
    };
    let mut shared = BusShared::new(NodeId::new("n1").unwrap(), config);
    Arc::get_mut(&mut shared).unwrap().ring_bytes = bytes;
    spawn_bus(shared).await
}

/// The ring lets events go by bytes as well as by count, and a replay from one it let go for
/// its bytes behaves as for one it let go for the count: a marker, then what the ring has.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn the_ring_keeps_at_most_its_bytes_and_a_replay_from_before_it_starts_with_a_marker() {
    let id = |seq| EventId::new(NodeId::new("n1").unwrap(), seq);
    let charge = ring_charge(&Event::new(
        id(1),
        Timestamp::now(),
        None,
        output(1, 10_000),
    ));
    let budget = 5 * charge as usize;
    // The count alone would keep all 20.
    let bus = start_with_ring(1_000, budget).await;
    let mut events = bus.subscribe(EventFilter::all());
    for n in 1..=20 {
        bus.publish(None, output(n, 10_000));
    }
    // Handled in order: once this is answered, every publish before it was.
    bus.replay(ReplayFrom::Now, EventFilter::all())
        .await
        .unwrap();
    // Events this large ride the fan-out weakly: the ones the ring let go before the subscriber
    // read them are gone for it too.
    match events.recv().await {
        Some(Delivery::Lagged(lagged)) => assert_eq!(lagged.missed, 15),
        other => panic!("expected a marker, got {other:?}"),
    }
    for expected in 16..=20 {
        assert_eq!(next_seq(&mut events).await, expected);
    }
    let seqs = |replay: &Replay| replay.events.iter().map(|e| e.id.seq).collect::<Vec<_>>();
    let ring = bus
        .replay(ReplayFrom::Tail(1_000), EventFilter::all())
        .await
        .unwrap();
    assert_eq!(seqs(&ring), [16, 17, 18, 19, 20], "the newest that fit");
    let held: usize = ring.events.iter().map(|e| ring_charge(e) as usize).sum();
    assert!(held <= budget, "{held} bytes held, {budget} allowed");
    assert_eq!(ring.oldest, Some(id(16)));

    // From an event the ring let go: a marker (the log fills the gap), then the ring.
    let (mut resumed, replay) = bus
        .subscribe_from(ReplayFrom::After(id(2)), EventFilter::all())
        .await
        .unwrap();
    assert!(!replay.found);
    assert_eq!(replay.oldest_pos, Some(16));
    match resumed.recv().await {
        Some(Delivery::Lagged(lagged)) => {
            assert_eq!(lagged.missed, 13, "events 3..=15 are no longer in the ring");
            assert_eq!(lagged.resume_after, Some(id(2)));
        }
        other => panic!("expected a marker, got {other:?}"),
    }
    for expected in 16..=20 {
        assert_eq!(next_seq(&mut resumed).await, expected);
    }
    // From one it still has: exactly what follows.
    let after = bus
        .replay(ReplayFrom::After(id(17)), EventFilter::all())
        .await
        .unwrap();
    assert!(after.found);
    assert_eq!(seqs(&after), [18, 19, 20]);

    // An event alone over the budget is kept, alone: the ring still names the newest event.
    bus.publish(None, output(21, 100_000));
    assert_eq!(next_seq(&mut events).await, 21);
    let now = bus
        .replay(ReplayFrom::Now, EventFilter::all())
        .await
        .unwrap();
    assert_eq!(now.newest, Some(id(21)));
    assert_eq!(now.oldest, Some(id(21)));
    // And the next one takes its place.
    bus.publish(None, output(22, 10));
    assert_eq!(next_seq(&mut events).await, 22);
    let ring = bus
        .replay(ReplayFrom::Tail(1_000), EventFilter::all())
        .await
        .unwrap();
    assert_eq!(seqs(&ring), [22]);
}

/// A stalled store: the publishes waiting for their ids are bounded by their bytes too; past
/// that they are dropped and counted, as past `MAX_UNRESERVED`, and the ones kept go out in
/// order once the ids are reserved.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn publishes_waiting_for_a_reservation_are_bounded_by_their_bytes() {
    let one = Unreserved {
        session: None,
        data: output(1, 10_000),
        at: Timestamp::now(),
    }
    .bytes();
    let store = GatedStore::new();
    let (bus, _cell) = start_tuned(&store, |shared| shared.max_unreserved_bytes = 10 * one).await;
    let mut events = bus.subscribe(EventFilter::all());
    for n in 1..=15 {
        bus.publish(None, output(n, 10_000));
    }
    // Handled in order: once this is answered, every publish before it was.
    bus.replay(ReplayFrom::Now, EventFilter::all())
        .await
        .unwrap();
    assert_eq!(bus.dropped(), 5, "the publishes past 10 of them");
    assert_eq!(bus.shared.waiting.lock().unwrap().bytes, 10 * one);

    store.gate.add_permits(1);
    for n in 1..=10 {
        match tokio::time::timeout(Duration::from_secs(60), events.recv()).await {
            Ok(Some(Delivery::Event(event))) => match &event.data {
                EventData::SessionOutput(output) => {
                    assert_eq!((event.id.seq, output.first_line), (n, n));
                }
                other => panic!("unexpected {other:?}"),
            },
            other => panic!("expected an event, got {other:?}"),
        }
    }
    assert_eq!(bus.shared.waiting.lock().unwrap().bytes, 0);
    bus.publish(None, output(16, 10_000));
    assert_eq!(next_seq(&mut events).await, 11);
    assert_eq!(bus.dropped(), 5);
}

fn in_session(session: &str) -> EventFilter {
    EventFilter {
        sessions: vec![SessionId::new(session).unwrap()],
        ..EventFilter::default()
    }
}

/// The fan-out channel keeps large events alive no longer than the ring: one the ring let go is
/// freed even while a subscriber has not read it yet (that subscriber gets one marker for the
/// run of them, with the id to re-read after), while small events stay in the channel for
/// subscribers that fell behind the ring. A subscriber whose filter the gone events did not
/// pass gets no marker.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn the_fanout_holds_large_events_no_longer_than_the_ring() {
    let id = |seq| EventId::new(NodeId::new("n1").unwrap(), seq);
    let large = || output(1, 2 * FANOUT_WHOLE_BYTES);
    let charge = ring_charge(&Event::new(id(1), Timestamp::now(), None, large()));
    // Three large events, or twenty small ones (the count bound).
    let bus = start_with_ring(20, 3 * charge as usize).await;
    let session = SessionId::new("s1").unwrap();
    let mut slow = bus.subscribe(EventFilter::all());
    let mut elsewhere = bus.subscribe(in_session("s2"));
    bus.publish(Some(session.clone()), progress(1));
    bus.publish(Some(session.clone()), large());
    let first_large = {
        let event = bus
            .replay(ReplayFrom::Tail(1), EventFilter::all())
            .await
            .unwrap()
            .events
            .pop()
            .unwrap();
        assert_eq!(event.id, id(2));
        Arc::downgrade(&event)
    };
    for _ in 0..5 {
        bus.publish(Some(session.clone()), large());
    }
    // Thirty small ones: more than the ring counts.
    for n in 0..30 {
        bus.publish(Some(session.clone()), progress(n));
    }
    bus.replay(ReplayFrom::Now, EventFilter::all())
        .await
        .unwrap();
    assert!(
        first_large.upgrade().is_none(),
        "a large event the ring let go is still held by the fan-out channel"
    );

    assert_eq!(next_seq(&mut slow).await, 1);
    match slow.recv().await {
        Some(Delivery::Lagged(lagged)) => {
            assert_eq!(lagged.missed, 6, "the six large events, once");
            assert_eq!(lagged.resume_after, Some(id(1)));
        }
        other => panic!("expected a marker, got {other:?}"),
    }
    for expected in 8..=37 {
        assert_eq!(
            next_seq(&mut slow).await,
            expected,
            "small events stay whole"
        );
    }
    assert!(slow.try_recv().is_none());
    assert!(
        elsewhere.try_recv().is_none(),
        "no marker for events the filter would not have passed"
    );

    // A large event the ring still holds arrives whole, and one gone as the last thing in the
    // channel is reported once nothing else is ready.
    bus.publish(Some(session.clone()), large());
    bus.replay(ReplayFrom::Now, EventFilter::all())
        .await
        .unwrap();
    assert_eq!(next_seq(&mut slow).await, 38);
    for _ in 0..4 {
        bus.publish(Some(session.clone()), large());
    }
    bus.replay(ReplayFrom::Now, EventFilter::all())
        .await
        .unwrap();
    match slow.try_recv() {
        Some(Delivery::Lagged(lagged)) => {
            assert_eq!(lagged.missed, 1);
            assert_eq!(lagged.resume_after, Some(id(38)));
        }
        other => panic!("expected a marker, got {other:?}"),
    }
    for expected in 40..=42 {
        assert_eq!(next_seq(&mut slow).await, expected);
    }
}

/// Starts a bus for node `n1` without a store whose subscribers fall at most
/// `subscriber_buffer` events behind.
async fn start_buffered(subscriber_buffer: usize) -> EventBus {
    let config = EventBusConfig {
        ring_capacity: 1_000,
        subscriber_buffer,
    };
    spawn_bus(BusShared::new(NodeId::new("n1").unwrap(), config)).await
}

/// A bus of node `n1` over `shared`, without a store.
async fn spawn_bus(shared: Arc<BusShared>) -> EventBus {
    let handle = ActorHandle::new(ActorPath::root().child("event_bus"));
    kernel::spawn(
        EventBusActor,
        EventBusArgs {
            shared: shared.clone(),
            store: None,
        },
        &handle,
    )
    .await
    .unwrap();
    EventBus::new(handle, shared)
}

/// Regression: a new subscription subscribes to the channel before its replay is answered, so
/// publishes queued ahead of the replay overflowed it, and it reported them with an
/// `events.lagged` marker although the replay covered them (they are at or below its
/// position): a false lag before anything was delivered.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_new_subscriber_is_not_told_it_lagged_on_events_its_replay_covers() {
    let bus = start_buffered(8).await;
    for n in 1..=20 {
        bus.publish(None, progress(n));
    }
    let (mut subscription, replay) = bus
        .subscribe_from(ReplayFrom::Now, EventFilter::all())
        .await
        .unwrap();
    assert_eq!(
        replay.through_pos, 20,
        "the publishes came before the replay"
    );
    bus.publish(None, progress(21));
    assert_eq!(next_seq(&mut subscription).await, 21, "no marker first");

    // A real loss after the replay is still reported, counted from the replay on.
    for n in 22..=40 {
        bus.publish(None, progress(n));
    }
    bus.replay(ReplayFrom::Now, EventFilter::all())
        .await
        .unwrap();
    match subscription.recv().await {
        Some(Delivery::Lagged(lagged)) => {
            assert_eq!(lagged.missed, 11, "22..=32 dropped, 33..=40 kept");
            assert_eq!(
                lagged.resume_after,
                Some(EventId::new(NodeId::new("n1").unwrap(), 21))
            );
        }
        other => panic!("expected a marker, got {other:?}"),
    }
    assert_eq!(next_seq(&mut subscription).await, 33);
}

/// Regression: a subscription opened with `Now` or `Tail` that lagged before any event passed
/// its filter sent a marker with `resume_after: null`, so a client had no point to re-read
/// from. It names the newest event when the subscription opened.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_lag_before_the_first_match_of_a_now_or_tail_subscription_names_where_it_started() {
    let id = |seq| EventId::new(NodeId::new("n1").unwrap(), seq);
    let bus = start_buffered(8).await;
    for n in 1..=5 {
        bus.publish(None, progress(n));
    }
    let (mut now, _) = bus
        .subscribe_from(ReplayFrom::Now, in_session("s2"))
        .await
        .unwrap();
    let (mut tail, _) = bus
        .subscribe_from(ReplayFrom::Tail(3), in_session("s2"))
        .await
        .unwrap();
    for n in 6..=30 {
        bus.publish(None, progress(n));
    }
    bus.replay(ReplayFrom::Now, EventFilter::all())
        .await
        .unwrap();
    for subscription in [&mut now, &mut tail] {
        match subscription.recv().await {
            Some(Delivery::Lagged(lagged)) => assert_eq!(lagged.resume_after, Some(id(5))),
            other => panic!("expected a marker, got {other:?}"),
        }
    }
}

/// Regression: `subscribe_from` copied every replayed event into the subscription as a strong
/// reference, so a subscriber slow to read a long replay kept alive, per link, the large events
/// the ring had let go (up to the ring's bytes each). They are held like the fan-out channel's
/// now: one gone when its turn comes is reported with a marker naming the last event delivered.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_replay_left_unread_holds_large_events_no_longer_than_the_ring() {
    let id = |seq| EventId::new(NodeId::new("n1").unwrap(), seq);
    let large = || output(1, 2 * FANOUT_WHOLE_BYTES);
    let bus = start_with_ring(4, usize::MAX).await;
    for _ in 0..4 {
        bus.publish(None, large());
    }
    let (mut slow, replay) = bus
        .subscribe_from(ReplayFrom::Tail(10), EventFilter::all())
        .await
        .unwrap();
    let replayed: Vec<_> = replay.events.iter().map(Arc::downgrade).collect();
    assert_eq!(replayed.len(), 4);
    drop(replay);
    // The ring turns over; the subscriber has read nothing yet.
    for _ in 0..4 {
        bus.publish(None, large());
    }
    bus.replay(ReplayFrom::Now, EventFilter::all())
        .await
        .unwrap();
    assert!(
        replayed[1..].iter().all(|event| event.upgrade().is_none()),
        "the large replayed events the ring let go are still held by the subscription"
    );
    assert_eq!(next_seq(&mut slow).await, 1, "the first is held whole");
    match slow.recv().await {
        Some(Delivery::Lagged(lagged)) => {
            assert_eq!(lagged.missed, 3);
            assert_eq!(lagged.resume_after, Some(id(1)));
        }
        other => panic!("expected a marker, got {other:?}"),
    }
    for expected in 5..=8 {
        assert_eq!(next_seq(&mut slow).await, expected);
    }
}
