//! The event bus: ordering, filters, lag markers, replay, and surviving its own restarts.

use futures::future::BoxFuture;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use troupe_actors::event::{
    BusItem, BusShared, Delivery, EventBus, EventBusActor, EventBusArgs, EventBusConfig, EventData,
    EventFilter, EventId, EventStore, ProviderRecovered, ReplayFrom, SessionProgress, StoreResume,
};
use troupe_actors::ids::{ActorPath, NodeId, SessionId};
use troupe_actors::kernel::{ActorHandle, FaultKind};
use troupe_actors::supervisor::{Backoff, ChildSpec, Supervisor, SupervisorArgs, SupervisorConfig};

use crate::support::*;

fn progress(n: u64) -> EventData {
    EventData::SessionProgress(SessionProgress {
        message: format!("step {n}"),
        current: Some(n),
        total: None,
    })
}

fn step_of(delivery: &Delivery) -> u64 {
    match delivery {
        Delivery::Event(event) => match &event.data {
            EventData::SessionProgress(progress) => progress.current.unwrap(),
            other => panic!("unexpected {other:?}"),
        },
        Delivery::Lagged(lagged) => panic!("unexpected lag marker {lagged:?}"),
    }
}

async fn recv(subscription: &mut troupe_actors::event::Subscription) -> Delivery {
    tokio::time::timeout(Duration::from_secs(30), subscription.recv())
        .await
        .expect("a delivery within 30 s")
        .expect("bus open")
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn events_arrive_in_order_with_growing_ids_and_filters_apply() {
    let bus = start_bus(EventBusConfig::default()).await;
    let session = SessionId::new("s-1").unwrap();
    let mut everything = bus.subscribe(EventFilter::all());
    let mut only_session = bus.subscribe(EventFilter {
        sessions: vec![session.clone()],
        ..EventFilter::all()
    });
    let mut only_providers = bus.subscribe(EventFilter {
        kinds: vec!["provider.*".parse().unwrap()],
        ..EventFilter::all()
    });

    for n in 1..=5 {
        bus.publish(Some(session.clone()), progress(n));
    }
    bus.publish(
        None,
        EventData::ProviderRecovered(ProviderRecovered {
            provider: "p".into(),
        }),
    );

    let mut last_seq = 0;
    for n in 1..=5 {
        let delivery = recv(&mut everything).await;
        assert_eq!(step_of(&delivery), n);
        let Delivery::Event(event) = delivery else {
            unreachable!()
        };
        assert!(event.id.seq > last_seq, "ids only grow");
        assert_eq!(event.id.node.as_str(), "test");
        last_seq = event.id.seq;
        assert_eq!(step_of(&recv(&mut only_session).await), n);
    }
    let Delivery::Event(provider_event) = recv(&mut only_providers).await else {
        panic!("expected an event")
    };
    assert!(matches!(
        provider_event.data,
        EventData::ProviderRecovered(_)
    ));
    assert!(only_session.try_recv().is_none());
    assert!(only_providers.try_recv().is_none());
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_subscriber_that_falls_behind_loses_the_oldest_and_gets_one_marker() {
    let bus = start_bus(EventBusConfig {
        ring_capacity: 100,
        subscriber_buffer: 8,
    })
    .await;
    let mut slow = bus.subscribe(EventFilter::all());
    let mut fast = bus.subscribe(EventFilter::all());
    for n in 1..=20 {
        bus.publish(None, progress(n));
        // The fast subscriber keeps up.
        assert_eq!(step_of(&recv(&mut fast).await), n);
    }
    match recv(&mut slow).await {
        Delivery::Lagged(lagged) => {
            assert_eq!(lagged.missed, 12);
            assert_eq!(lagged.resume_after, None);
        }
        other => panic!("expected a lag marker, got {other:?}"),
    }
    for n in 13..=20 {
        assert_eq!(step_of(&recv(&mut slow).await), n, "the newest 8 remain");
    }
    assert!(slow.try_recv().is_none(), "exactly one marker");
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn resuming_after_an_id_gives_exactly_the_missed_events_then_live_ones() {
    let bus = start_bus(EventBusConfig::default()).await;
    let mut first = bus.subscribe(EventFilter::all());
    for n in 1..=10 {
        bus.publish(None, progress(n));
    }
    let mut seen = Vec::new();
    for _ in 0..4 {
        let Delivery::Event(event) = recv(&mut first).await else {
            panic!()
        };
        seen.push(event.id.clone());
    }
    drop(first); // the client disconnects after event 4

    let (mut resumed, replay) = bus
        .subscribe_from(ReplayFrom::After(seen[3].clone()), EventFilter::all())
        .await
        .unwrap();
    assert!(replay.found);
    bus.publish(None, progress(11));
    let steps: Vec<u64> = futures_steps(&mut resumed, 7).await;
    assert_eq!(steps, [5, 6, 7, 8, 9, 10, 11], "no gap, no duplicate");
    assert!(resumed.try_recv().is_none());
}

async fn futures_steps(
    subscription: &mut troupe_actors::event::Subscription,
    count: usize,
) -> Vec<u64> {
    let mut steps = Vec::new();
    for _ in 0..count {
        steps.push(step_of(&recv(subscription).await));
    }
    steps
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn resuming_from_an_id_older_than_the_ring_starts_with_a_marker() {
    let bus = start_bus(EventBusConfig {
        ring_capacity: 5,
        subscriber_buffer: 64,
    })
    .await;
    for n in 1..=12 {
        bus.publish(None, progress(n));
    }
    let cursor = EventId::new(bus.node().clone(), 2);
    let (mut resumed, replay) = bus
        .subscribe_from(ReplayFrom::After(cursor.clone()), EventFilter::all())
        .await
        .unwrap();
    assert!(!replay.found);
    match recv(&mut resumed).await {
        Delivery::Lagged(lagged) => {
            assert_eq!(lagged.missed, 5, "events 3..=7 are no longer in the ring");
            assert_eq!(lagged.resume_after, Some(cursor));
        }
        other => panic!("expected a marker, got {other:?}"),
    }
    assert_eq!(futures_steps(&mut resumed, 5).await, [8, 9, 10, 11, 12]);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn tail_returns_the_last_matching_events() {
    let bus = start_bus(EventBusConfig::default()).await;
    for n in 1..=10 {
        bus.publish(None, progress(n));
    }
    let (mut tail, _) = bus
        .subscribe_from(ReplayFrom::Tail(3), EventFilter::all())
        .await
        .unwrap();
    assert_eq!(futures_steps(&mut tail, 3).await, [8, 9, 10]);
}

/// A store that remembers what it was given, to check the persistence hook.
#[derive(Default)]
struct MemoryStore(Mutex<Vec<BusItem>>);

impl EventStore for MemoryStore {
    fn append(&self, item: &BusItem) {
        self.0.lock().unwrap().push(item.clone());
    }

    fn append_again(&self, item: &BusItem, _arrival: u64) {
        self.0.lock().unwrap().push(item.clone());
    }

    fn resume(&self, ring_capacity: usize) -> StoreResume {
        let items = self.0.lock().unwrap();
        let recent = items
            .iter()
            .rev()
            .take(ring_capacity)
            .rev()
            .cloned()
            .collect();
        StoreResume {
            last_seq: items.last().map_or(0, |item| item.event.id.seq),
            last_pos: items.last().map_or(0, |item| item.pos),
            recent,
            ..StoreResume::default()
        }
    }

    /// Ids live in memory only: nothing to reserve or give back.
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

    /// This node is never clustered here.
    fn relay_floor(&self, _node: &NodeId, _seq: u64) {}

    fn relay_lost(&self, _node: &NodeId, _after: u64, _through: u64) {}
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_bus_restart_keeps_subscribers_ids_and_queued_publishes() {
    quiet_intended_panics();
    let store = Arc::new(MemoryStore::default());
    let shared = BusShared::new(NodeId::new("n1").unwrap(), EventBusConfig::default());
    let path = ActorPath::root().child("sup");
    let handle = ActorHandle::new(path.child("event_bus"));
    let spec = ChildSpec::worker(&handle, {
        let shared = shared.clone();
        let store: Arc<dyn EventStore> = store.clone();
        move || {
            (
                EventBusActor,
                EventBusArgs {
                    shared: shared.clone(),
                    store: Some(store.clone()),
                },
            )
        }
    });
    troupe_actors::kernel::spawn(
        Supervisor,
        SupervisorArgs {
            config: SupervisorConfig {
                backoff: Backoff {
                    min: Duration::from_millis(50),
                    max: Duration::from_millis(50),
                },
                ..SupervisorConfig::default()
            },
            children: vec![spec],
            ..SupervisorArgs::default()
        },
        &ActorHandle::new(path),
    )
    .await
    .unwrap();
    let bus = EventBus::new(handle.clone(), shared);
    let mut subscriber = bus.subscribe(EventFilter::all());

    bus.publish(None, progress(1));
    assert!(handle.inject_fault(FaultKind::Panic));
    // Published while the bus crashes and waits out its backoff.
    for n in 2..=4 {
        bus.publish(None, progress(n));
    }
    let mut seqs = Vec::new();
    for n in 1..=4 {
        let delivery = recv(&mut subscriber).await;
        assert_eq!(step_of(&delivery), n);
        let Delivery::Event(event) = delivery else {
            unreachable!()
        };
        seqs.push(event.id.seq);
    }
    assert_eq!(seqs, [1, 2, 3, 4], "ids continue across the restart");
    assert_eq!(handle.stats().snapshot().restarts, 1);
    assert_eq!(
        store.0.lock().unwrap().len(),
        4,
        "every event reached the store"
    );

    // The ring was reseeded from the store: replay after event 1 still works.
    let (mut resumed, replay) = bus
        .subscribe_from(
            ReplayFrom::After(EventId::new(NodeId::new("n1").unwrap(), 1)),
            EventFilter::all(),
        )
        .await
        .unwrap();
    assert!(replay.found);
    assert_eq!(futures_steps(&mut resumed, 3).await, [2, 3, 4]);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn relayed_events_keep_their_ids_and_duplicates_are_dropped() {
    let bus = start_bus(EventBusConfig::default()).await;
    let mut subscriber = bus.subscribe(EventFilter::all());
    let remote = NodeId::new("remote").unwrap();
    let event = |seq| troupe_actors::event::Event {
        rendered: Default::default(),
        id: EventId::new(remote.clone(), seq),
        at: troupe_actors::ids::Timestamp::now(),
        session: None,
        data: progress(seq),
    };
    for seq in [1, 2, 2, 1, 3] {
        bus.relay_batch(&remote, None, vec![event(seq)])
            .await
            .unwrap();
    }
    let mut ids = Vec::new();
    for _ in 0..3 {
        let Delivery::Event(event) = recv(&mut subscriber).await else {
            panic!()
        };
        ids.push(event.id.to_string());
    }
    assert_eq!(ids, ["remote:1", "remote:2", "remote:3"]);
    bus.publish(None, progress(9));
    let Delivery::Event(own) = recv(&mut subscriber).await else {
        panic!()
    };
    assert_eq!(
        own.id.to_string(),
        "test:1",
        "local sequence is independent"
    );
}
