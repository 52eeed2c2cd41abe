//! The node's tree as a whole: its shape, rest_for_one at the root, health changes, shutdown.

use std::time::Duration;

use troupe_actors::event::{EventBus, EventBusConfig, EventData, EventFilter};
use troupe_actors::health::{
    Health, HealthActor, HealthArgs, HealthConfig, HealthShared, HealthStatus,
};
use troupe_actors::ids::{ActorPath, NodeId};
use troupe_actors::kernel::{
    self, ActorDirectory, ActorHandle, FaultError, FaultKind, HandleStatus,
};
use troupe_actors::node::{NodePorts, NodeTree, NodeTreeConfig};
use troupe_actors::supervisor::{
    Backoff, ChildPolicy, ChildSpec, Supervisor, SupervisorArgs, SupervisorConfig, SupervisorHandle,
};

use crate::support::*;

async fn tree() -> NodeTree {
    quiet_intended_panics();
    let mut config = NodeTreeConfig::new(NodeId::new("n1").unwrap());
    config.supervision.backoff = Backoff {
        min: Duration::from_millis(10),
        max: Duration::from_millis(100),
    };
    config.supervision.jitter_seed = Some(1);
    config.health = HealthConfig {
        tick: Duration::from_secs(1),
        window: Duration::from_secs(10),
        degraded_after_restarts: 3,
        ..HealthConfig::default()
    };
    NodeTree::start(config, NodePorts::default()).await.unwrap()
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn the_tree_has_the_documented_shape() {
    let tree = tree().await;
    let paths: Vec<String> = tree
        .directory
        .list()
        .into_iter()
        .map(|(path, _)| path.to_string())
        .collect();
    assert_eq!(
        paths,
        [
            "node",
            "event_bus",
            "health",
            "links",
            "providers",
            "registry",
            "sessions"
        ]
    );
    let report = tree.health.report().await.unwrap();
    assert_eq!(report.status, HealthStatus::Healthy);
    assert_eq!(report.actors.total, 7);
    assert_eq!(report.actors.running, 7);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_registry_panic_restarts_it_and_everything_after_it_then_health_recovers() {
    let tree = tree().await;
    let mut events = tree.events.subscribe(EventFilter {
        kinds: vec!["actor.*".parse().unwrap(), "health.*".parse().unwrap()],
        ..EventFilter::all()
    });
    tree.inject_fault(&ActorPath::parse("registry").unwrap(), FaultKind::Panic)
        .unwrap();

    let mut restarted = Vec::new();
    let mut degraded = None;
    while restarted.len() < 5 || degraded.is_none() {
        let event = next_event(&mut events).await;
        match &event.data {
            EventData::ActorRestarted(restart) => restarted.push(restart.child.to_string()),
            EventData::HealthDegraded(change) => degraded = Some(change.clone()),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(
        restarted,
        ["registry", "health", "providers", "sessions", "links"],
        "rest_for_one: the failed child and every child after it, in start order"
    );
    let degraded = degraded.unwrap();
    assert_eq!(degraded.to, HealthStatus::Degraded);
    assert!(
        degraded
            .reasons
            .iter()
            .any(|r| r.contains("restarts in the last 10s")),
        "{:?}",
        degraded.reasons
    );
    assert_eq!(
        tree.directory
            .get(&ActorPath::parse("event_bus").unwrap())
            .unwrap()
            .control
            .status(),
        HandleStatus::Running { generation: 1 },
        "the bus was started before the registry: untouched"
    );

    // Once the window has passed without restarts, health recovers.
    let recovered = next_event(&mut events).await;
    match &recovered.data {
        EventData::HealthRecovered(change) => {
            assert_eq!(change.from, HealthStatus::Degraded);
            assert_eq!(change.to, HealthStatus::Healthy);
        }
        other => panic!("expected health.recovered, got {other:?}"),
    }
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn faults_name_real_actors_only() {
    let tree = tree().await;
    let unknown = ActorPath::parse("providers/nope").unwrap();
    assert_eq!(
        tree.inject_fault(&unknown, FaultKind::Panic),
        Err(FaultError::UnknownActor("providers/nope".into()))
    );
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn shutdown_stops_every_actor_and_marks_every_handle_stopped() {
    let tree = tree().await;
    tree.shutdown(Duration::from_secs(10)).await;
    assert!(tree.has_exited());
    for (path, entry) in tree.directory.list() {
        assert_eq!(entry.control.status(), HandleStatus::Stopped, "{path}");
    }
    assert!(tree.health.report().await.is_err());
}

/// Regression: a shutdown timeout too large for the clock (`supervision.shutdown_timeout_secs =
/// u64::MAX`, which an embedder can still pass) panicked in `stop_within` ("overflow when adding
/// duration to instant") instead of stopping the tree.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_shutdown_timeout_past_the_clock_stops_the_tree_instead_of_panicking() {
    let tree = tree().await;
    tree.shutdown(Duration::MAX).await;
    assert!(tree.has_exited());
    for (path, entry) in tree.directory.list() {
        assert_eq!(entry.control.status(), HandleStatus::Stopped, "{path}");
    }
}

/// A dynamic supervisor `dyn` with a directory, a bus, and a HealthActor watching the directory
/// (with `dyn/core` as its one core actor).
struct Watched {
    supervisor: SupervisorHandle,
    directory: ActorDirectory,
    bus: EventBus,
    health: Health,
    log: Log,
}

async fn watched(backoff: Backoff) -> Watched {
    let bus = start_bus(EventBusConfig::default()).await;
    let directory = ActorDirectory::new();
    let path = ActorPath::root().child("dyn");
    let supervisor: SupervisorHandle = ActorHandle::new(path.clone());
    kernel::spawn(
        Supervisor,
        SupervisorArgs {
            config: SupervisorConfig {
                backoff,
                jitter_seed: Some(3),
                ..SupervisorConfig::default()
            },
            children: Vec::new(),
            events: Some(bus.clone()),
            directory: Some(directory.clone()),
        },
        &supervisor,
    )
    .await
    .unwrap();
    let health = ActorHandle::new(ActorPath::root().child("health"));
    kernel::spawn(
        HealthActor,
        HealthArgs {
            config: HealthConfig {
                tick: Duration::from_secs(1),
                window: Duration::from_secs(60),
                degraded_after_restarts: 3,
                core_actors: vec![path.child("core")],
            },
            shared: HealthShared::new(NodeId::new("n1").unwrap()),
            directory: directory.clone(),
            events: bus.clone(),
        },
        &health,
    )
    .await
    .unwrap();
    Watched {
        supervisor,
        directory,
        bus,
        health: Health::new(health),
        log: Log::default(),
    }
}

impl Watched {
    async fn start_probe(&self, name: &'static str, policy: ChildPolicy) -> ActorHandle<ProbeMsg> {
        let handle = ActorHandle::new(ActorPath::root().child("dyn").child(name));
        let args = ProbeArgs::new(name, &self.log);
        let spec = ChildSpec::worker(&handle, move || (Probe, args.clone())).policy(policy);
        self.supervisor.start_child(spec).await.unwrap();
        handle
    }
}

/// Regression: health summed the restart counters of the actors currently in the directory, so
/// removing a child that had restarted made the node's restart count go down.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn restarts_stay_counted_after_the_restarted_child_is_removed() {
    let node = watched(Backoff::NONE).await;
    let _core = node.start_probe("core", ChildPolicy::Permanent).await;
    let x = node.start_probe("x", ChildPolicy::Transient).await;
    let mut events = node.bus.subscribe(EventFilter {
        kinds: vec!["actor.restarted".parse().unwrap()],
        ..EventFilter::all()
    });
    x.cast(ProbeMsg::Panic).unwrap();
    next_event(&mut events).await;
    assert_eq!(node.directory.restarts_total(), 1);
    assert_eq!(node.health.report().await.unwrap().restarts_in_window, 1);

    assert!(node.supervisor.terminate_child("x").await.unwrap());
    assert!(node.directory.get(x.path()).is_none(), "x is gone");
    assert_eq!(node.directory.restarts_total(), 1, "the count only grows");
    assert_eq!(
        node.health.report().await.unwrap().restarts_in_window,
        1,
        "the restart stays inside the window after its actor is gone"
    );
}

/// A restarting core actor is the tree healing itself: degraded, so that `/v1/health` (a
/// liveness probe) stays 200 through a restart.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_restarting_core_actor_makes_the_node_degraded_not_unhealthy() {
    let node = watched(Backoff {
        min: Duration::from_secs(10),
        max: Duration::from_secs(10),
    })
    .await;
    let core = node.start_probe("core", ChildPolicy::Permanent).await;
    let mut events = node.bus.subscribe(EventFilter {
        kinds: vec!["health.*".parse().unwrap()],
        ..EventFilter::all()
    });
    let mut status = core.watch_status();
    core.cast(ProbeMsg::Panic).unwrap();
    status
        .wait_for(|status| *status == HandleStatus::Restarting)
        .await
        .unwrap();
    let report = node.health.report().await.unwrap();
    assert_eq!(
        report.status,
        HealthStatus::Degraded,
        "{:?}",
        report.reasons
    );
    assert_eq!(report.reasons, ["restarting: dyn/core"]);
    match &next_event(&mut events).await.data {
        EventData::HealthDegraded(change) => assert_eq!(change.to, HealthStatus::Degraded),
        other => panic!("expected health.degraded, got {other:?}"),
    }
    assert_eq!(ping(&core).await, 2, "it runs again after its backoff");
    assert_eq!(
        node.health.report().await.unwrap().status,
        HealthStatus::Healthy
    );
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_core_actor_that_is_gone_makes_the_node_unhealthy_until_it_runs_again() {
    let node = watched(Backoff::NONE).await;
    let core = node.start_probe("core", ChildPolicy::Transient).await;
    let mut events = node.bus.subscribe(EventFilter {
        kinds: vec!["health.*".parse().unwrap()],
        ..EventFilter::all()
    });
    assert_eq!(
        node.health.report().await.unwrap().status,
        HealthStatus::Healthy
    );

    // A transient child that exits normally is not restarted: the core actor is gone.
    let mut status = core.watch_status();
    core.cast(ProbeMsg::StopNormally).unwrap();
    status
        .wait_for(|status| *status == HandleStatus::Stopped)
        .await
        .unwrap();
    let report = node.health.report().await.unwrap();
    assert_eq!(report.status, HealthStatus::Unhealthy);
    assert_eq!(report.reasons, ["dyn/core is not running"]);
    match &next_event(&mut events).await.data {
        EventData::HealthDegraded(change) => {
            assert_eq!(change.from, HealthStatus::Healthy);
            assert_eq!(change.to, HealthStatus::Unhealthy);
        }
        other => panic!("expected health.degraded, got {other:?}"),
    }

    // Started again, it runs and the node recovers.
    let core = node.start_probe("core", ChildPolicy::Transient).await;
    assert_eq!(ping(&core).await, 1);
    let report = node.health.report().await.unwrap();
    assert_eq!(report.status, HealthStatus::Healthy, "{:?}", report.reasons);
    match &next_event(&mut events).await.data {
        EventData::HealthRecovered(change) => {
            assert_eq!(change.from, HealthStatus::Unhealthy);
            assert_eq!(change.to, HealthStatus::Healthy);
        }
        other => panic!("expected health.recovered, got {other:?}"),
    }
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_link_up_that_arrives_after_its_link_down_does_not_list_a_gone_link() {
    use troupe_actors::event::TransportKind;
    use troupe_actors::ids::{LinkId, Timestamp};
    use troupe_actors::registry::{LinkInfo, RegistryMsg};

    let tree = tree().await;
    let mut events = tree.events.subscribe(EventFilter {
        kinds: vec!["link.*".parse().unwrap()],
        ..EventFilter::all()
    });
    let info = |id: &str| LinkInfo {
        id: LinkId::new(id).unwrap(),
        transport: TransportKind::Sse,
        peer: None,
        principal: None,
        filter: String::new(),
        connected_at: Timestamp::now(),
    };
    // The order a registry restart can leave them in: the redelivered `LinkUp` of a link
    // that ended meanwhile comes after its `LinkDown`.
    assert!(tree.registry.update(RegistryMsg::LinkDown {
        link: LinkId::new("l-gone").unwrap(),
        reason: "client disconnected".into(),
    }));
    assert!(tree.registry.update(RegistryMsg::LinkUp(info("l-gone"))));
    assert!(tree.registry.update(RegistryMsg::LinkUp(info("l-live"))));

    let event = next_event(&mut events).await;
    match &event.data {
        EventData::LinkConnected(connected) => assert_eq!(connected.link.as_str(), "l-live"),
        other => panic!("expected l-live's link.connected first, got {other:?}"),
    }
    let listed: Vec<String> = tree
        .registry
        .tables()
        .links()
        .iter()
        .map(|link| link.id.to_string())
        .collect();
    assert_eq!(listed, ["l-live"], "the gone link is not listed");
}
