//! The node's tree as a whole: its shape, rest_for_one at the root, health changes, shutdown.

use std::time::Duration;

use troupe_actors::event::{EventData, EventFilter};
use troupe_actors::health::{HealthConfig, HealthStatus};
use troupe_actors::ids::{ActorPath, NodeId};
use troupe_actors::kernel::{FaultError, FaultKind, HandleStatus};
use troupe_actors::node::{NodePorts, NodeTree, NodeTreeConfig};
use troupe_actors::supervisor::Backoff;

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
