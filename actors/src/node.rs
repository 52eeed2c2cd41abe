//! A node's supervision tree, assembled and started in one call.
//!
//! ```text
//! NodeSupervisor (rest_for_one)                          path: node
//! ├── EventBus                                           event_bus
//! ├── RegistryActor                                      registry
//! ├── HealthActor                                        health
//! ├── ProviderSupervisor (one_for_one)                   providers
//! │   └── ProviderActor ×N (permanent)                   providers/<name>
//! ├── SessionSupervisor (dynamic one_for_one)            sessions
//! │   ├── SessionManager                                 sessions/manager
//! │   └── SessionActor ×N (transient)                    sessions/<id>
//! ├── TransportSupervisor (dynamic, temporary)           links       └── links/<id>
//! └── ClusterSupervisor (one_for_one, when clustered)     cluster
//!     ├── MembershipActor                                cluster/membership
//!     └── PeerActor ×N (one per member, event relay)     cluster/peer-<node>
//! ```
//!
//! I/O arrives through ports ([`NodePorts`]): this module never touches a socket or a file.

use std::sync::Arc;
use std::time::Duration;

use ractor::ActorCell;
use tokio::sync::watch;

use crate::cluster::{
    DatagramTransport, LocalMeta, MembershipActor, MembershipArgs, MembershipCodec, MembershipMsg,
    MembershipProfile, RelayPorts, RelaySource,
};
use crate::event::{BusShared, EventBus, EventBusActor, EventBusArgs, EventBusConfig, EventStore};
use crate::health::{Health, HealthActor, HealthArgs, HealthConfig, HealthShared};
use crate::ids::{ActorPath, NodeId};
use crate::kernel::{
    self, ActorDirectory, ActorHandle, ChildKind, DirectoryEntry, FaultError, FaultKind,
};
use crate::provider::ProviderActorRef;
use crate::registry::{Registry, RegistryActor, RegistryArgs, RegistryTables};
use crate::session::{
    ChatRunner, CommandBuilder, ManagerArgs, ManagerMsg, ManagerShared, ProcessRunner,
    SessionContext, SessionManager, SessionSettings, SessionStats, SessionStore, SpecLimits,
};
use crate::supervisor::{
    self, ChildPolicy, ChildSpec, RestartIntensity, Strategy, Supervisor, SupervisorArgs,
    SupervisorConfig, SupervisorHandle,
};

/// How a node's tree is shaped.
#[derive(Debug, Clone)]
pub struct NodeTreeConfig {
    /// The node's id.
    pub node: NodeId,
    /// Restart intensity and backoff of every supervisor in the tree (strategies are fixed).
    pub supervision: SupervisorConfig,
    /// Sizes of the event bus.
    pub events: EventBusConfig,
    /// Tuning of the HealthActor.
    pub health: HealthConfig,
    /// Sessions: admission and timing.
    pub sessions: SessionSettings,
    /// Limits of session specs.
    pub spec_limits: SpecLimits,
    /// Bound on client links.
    pub max_links: Option<usize>,
}

impl NodeTreeConfig {
    /// Defaults for node `node`.
    pub fn new(node: NodeId) -> Self {
        Self {
            node,
            supervision: SupervisorConfig {
                intensity: RestartIntensity::default(),
                ..SupervisorConfig::default()
            },
            events: EventBusConfig::default(),
            health: HealthConfig::default(),
            sessions: SessionSettings::default(),
            spec_limits: SpecLimits::default(),
            max_links: Some(10_000),
        }
    }
}

/// The I/O the tree needs, implemented by the node (or by a host application or a test).
#[derive(Clone, Default)]
pub struct NodePorts {
    /// Where events are persisted.
    pub event_store: Option<Arc<dyn EventStore>>,
    /// What sessions need; without it the node runs no sessions.
    pub sessions: Option<SessionPorts>,
    /// The providers, one ProviderActor each under the ProviderSupervisor. Their handles exist
    /// before the tree starts, so that ports built from them (a chat runner) can be passed in
    /// too.
    pub providers: Vec<ProviderActorRef>,
    /// What the cluster needs; without it the node is not clustered.
    pub cluster: Option<ClusterPorts>,
}

/// The ports and settings of the cluster branch.
#[derive(Clone)]
pub struct ClusterPorts {
    /// This node's cluster address.
    pub addr: std::net::SocketAddr,
    /// Addresses to join through.
    pub seeds: Vec<std::net::SocketAddr>,
    /// Failure-detection timing.
    pub profile: MembershipProfile,
    /// Labels gossiped in the node's metadata.
    pub labels: std::collections::BTreeMap<String, String>,
    /// The wire format.
    pub codec: Arc<dyn MembershipCodec>,
    /// Datagrams out.
    pub transport: Arc<dyn DatagramTransport>,
    /// Opens event relay links; without it events are not relayed.
    pub relay: Option<Arc<dyn RelaySource>>,
    /// Seed of the membership's random choices (`None`: random); tests fix it.
    pub rng_seed: Option<u64>,
    /// The highest generation this node's membership has used: each incarnation takes a higher
    /// one (its start time in microseconds, or one more than this, whichever is higher) and
    /// records it here. A host that keeps it across restarts makes a restarted node rejoin with
    /// a higher generation even after the clock stepped back.
    pub generation: crate::cluster::GenerationFloor,
}

/// The ports of sessions.
#[derive(Clone)]
pub struct SessionPorts {
    /// Starts and stops processes.
    pub runner: Arc<dyn ProcessRunner>,
    /// Persists sessions.
    pub store: Arc<dyn SessionStore>,
    /// Turns specs into commands.
    pub commands: Arc<dyn CommandBuilder>,
    /// Runs chat sessions; `None` on a node without providers.
    pub chats: Option<Arc<dyn ChatRunner>>,
}

/// Handles to the session machinery of a tree.
#[derive(Clone)]
pub struct Sessions {
    /// The SessionManager.
    pub manager: ActorHandle<ManagerMsg>,
    /// Live session actors.
    pub shared: ManagerShared,
    /// Counters.
    pub stats: Arc<SessionStats>,
}

/// Why a tree did not start.
#[derive(Debug, thiserror::Error)]
#[error("the node's supervision tree failed to start: {0}")]
pub struct NodeTreeError(String);

/// A running tree: handles to every top-level actor.
pub struct NodeTree {
    /// This node.
    pub node: NodeId,
    /// The event bus.
    pub events: EventBus,
    /// The registry.
    pub registry: Registry,
    /// The HealthActor.
    pub health: Health,
    /// The ProviderSupervisor.
    pub providers: SupervisorHandle,
    /// Its ProviderActors, in configuration order.
    pub provider_actors: Vec<ProviderActorRef>,
    /// The SessionSupervisor.
    pub sessions: SupervisorHandle,
    /// The session machinery, when the node runs sessions.
    pub session_manager: Option<Sessions>,
    /// The TransportSupervisor.
    pub links: SupervisorHandle,
    /// The ClusterSupervisor and MembershipActor, when clustered.
    pub cluster: Option<(SupervisorHandle, ActorHandle<MembershipMsg>)>,
    /// Every supervised actor by path.
    pub directory: ActorDirectory,
    root: SupervisorHandle,
    root_cell: ActorCell,
    exited: watch::Receiver<bool>,
}

impl NodeTree {
    /// Builds and starts the tree; children start in order.
    pub async fn start(config: NodeTreeConfig, ports: NodePorts) -> Result<Self, NodeTreeError> {
        let root_path = ActorPath::root();
        let directory = ActorDirectory::new();
        let supervision = SupervisorConfig {
            max_children: None,
            ..config.supervision
        };

        let bus_shared = BusShared::new(config.node.clone(), config.events);
        let bus_handle = ActorHandle::new(root_path.child("event_bus"));
        let events = EventBus::new(bus_handle.clone(), bus_shared.clone());

        let tables = RegistryTables::default();
        let registry_handle = ActorHandle::new(root_path.child("registry"));
        let registry = Registry::new(registry_handle.clone(), tables.clone());

        let health_handle = ActorHandle::new(root_path.child("health"));
        let health = Health::new(health_handle.clone());
        let health_shared = HealthShared::new(config.node.clone());

        let providers: SupervisorHandle = ActorHandle::new(root_path.child("providers"));
        let sessions: SupervisorHandle = ActorHandle::new(root_path.child("sessions"));
        let links: SupervisorHandle = ActorHandle::new(root_path.child("links"));

        let session_manager = ports.sessions.as_ref().map(|_| Sessions {
            manager: ActorHandle::new(root_path.child("sessions").child("manager")),
            shared: ManagerShared::default(),
            stats: Arc::new(SessionStats::default()),
        });
        let manager_spec = match (&ports.sessions, &session_manager) {
            (Some(session_ports), Some(machinery)) => {
                let args = ManagerArgs {
                    context: SessionContext {
                        node: config.node.clone(),
                        runner: session_ports.runner.clone(),
                        chats: session_ports.chats.clone(),
                        store: session_ports.store.clone(),
                        commands: session_ports.commands.clone(),
                        events: events.clone(),
                        health: health.clone(),
                        registry: registry.clone(),
                        settings: config.sessions.clone(),
                        stats: machinery.stats.clone(),
                    },
                    supervisor: sessions.clone(),
                    shared: machinery.shared.clone(),
                    limits: config.spec_limits,
                };
                Some(ChildSpec::worker(&machinery.manager, move || {
                    (SessionManager, args.clone())
                }))
            }
            _ => None,
        };

        let cluster = ports.cluster.as_ref().map(|_| {
            let supervisor: SupervisorHandle = ActorHandle::new(root_path.child("cluster"));
            let membership = ActorHandle::new(root_path.child("cluster").child("membership"));
            (supervisor, membership)
        });
        let membership_spec = match (&ports.cluster, &cluster) {
            (Some(cluster_ports), Some((supervisor, membership))) => {
                let args = MembershipArgs {
                    node: config.node.clone(),
                    addr: cluster_ports.addr,
                    seeds: cluster_ports.seeds.clone(),
                    profile: cluster_ports.profile,
                    codec: cluster_ports.codec.clone(),
                    transport: cluster_ports.transport.clone(),
                    events: events.clone(),
                    registry: registry.clone(),
                    local: LocalMeta {
                        labels: cluster_ports.labels.clone(),
                        max_concurrent: u32::try_from(config.sessions.max_concurrent)
                            .unwrap_or(u32::MAX),
                        queue_capacity: u32::try_from(config.sessions.queue_capacity)
                            .unwrap_or(u32::MAX),
                        stats: session_manager.as_ref().map(|s| s.stats.clone()),
                        providers: ports.providers.clone(),
                    },
                    relay: cluster_ports.relay.clone().map(|source| RelayPorts {
                        supervisor: supervisor.clone(),
                        source,
                        peers: Arc::default(),
                    }),
                    rng_seed: cluster_ports.rng_seed,
                    generation: cluster_ports.generation.clone(),
                };
                Some(ChildSpec::worker(membership, move || {
                    (MembershipActor, args.clone())
                }))
            }
            _ => None,
        };

        let supervisor_args = |config: SupervisorConfig| SupervisorArgs {
            config,
            children: Vec::new(),
            events: Some(events.clone()),
            directory: Some(directory.clone()),
        };

        let children = vec![
            ChildSpec::worker(&bus_handle, {
                let store = ports.event_store.clone();
                move || {
                    let args = EventBusArgs {
                        shared: bus_shared.clone(),
                        store: store.clone(),
                    };
                    (EventBusActor, args)
                }
            }),
            ChildSpec::worker(&registry_handle, {
                let args = RegistryArgs {
                    tables,
                    events: events.clone(),
                };
                move || (RegistryActor, args.clone())
            }),
            ChildSpec::worker(&health_handle, {
                let args = HealthArgs {
                    config: config.health.clone(),
                    shared: health_shared,
                    directory: directory.clone(),
                    events: events.clone(),
                };
                move || (HealthActor, args.clone())
            }),
            ChildSpec::supervisor(&providers, {
                let mut args = supervisor_args(SupervisorConfig {
                    strategy: Strategy::OneForOne,
                    ..supervision
                });
                args.children.extend(ports.providers.iter().map(|provider| {
                    provider.child_spec(events.clone(), health.clone(), registry.clone())
                }));
                move || (Supervisor, args.clone())
            }),
            ChildSpec::supervisor(&sessions, {
                let mut args = supervisor_args(SupervisorConfig {
                    strategy: Strategy::OneForOne,
                    ..supervision
                });
                args.children.extend(manager_spec);
                move || (Supervisor, args.clone())
            }),
            ChildSpec::supervisor(&links, {
                let args = supervisor_args(SupervisorConfig {
                    strategy: Strategy::OneForOne,
                    max_children: config.max_links,
                    ..supervision
                });
                move || (Supervisor, args.clone())
            })
            .policy(ChildPolicy::Permanent),
        ];
        let mut children = children;
        if let (Some((supervisor, _)), Some(spec)) = (&cluster, membership_spec) {
            children.push(ChildSpec::supervisor(supervisor, {
                let mut args = supervisor_args(SupervisorConfig {
                    strategy: Strategy::OneForOne,
                    ..supervision
                });
                args.children.push(spec);
                move || (Supervisor, args.clone())
            }));
        }

        let root: SupervisorHandle = ActorHandle::new(root_path.clone());
        directory.insert(
            root_path,
            DirectoryEntry {
                kind: ChildKind::Supervisor,
                control: Arc::new(root.clone()),
            },
        );
        let root_args = SupervisorArgs {
            config: SupervisorConfig {
                strategy: Strategy::RestForOne,
                ..supervision
            },
            children,
            events: Some(events.clone()),
            directory: Some(directory.clone()),
        };
        let (root_cell, join) = kernel::spawn(Supervisor, root_args, &root)
            .await
            .map_err(|error| NodeTreeError(error.to_string()))?;
        let (exited_tx, exited) = watch::channel(false);
        tokio::spawn(async move {
            let _ = join.await;
            let _ = exited_tx.send(true);
        });

        Ok(Self {
            node: config.node,
            events,
            registry,
            health,
            providers,
            provider_actors: ports.providers,
            sessions,
            session_manager,
            links,
            cluster,
            directory,
            root,
            root_cell,
            exited,
        })
    }

    /// Makes the actor at `path` suffer `kind` inside its handler.
    pub fn inject_fault(&self, path: &ActorPath, kind: FaultKind) -> Result<(), FaultError> {
        self.directory.inject_fault(path, kind)
    }

    /// True once the root supervisor has exited (after a shutdown, or when it gave up).
    pub fn has_exited(&self) -> bool {
        *self.exited.borrow()
    }

    /// Waits until the root supervisor exits.
    pub async fn wait_exit(&self) {
        let mut exited = self.exited.clone();
        let _ = exited.wait_for(|exited| *exited).await;
    }

    /// Stops the tree: every supervisor stops its children in reverse start order, each
    /// gracefully within its timeout, then killed. The root stops within `timeout` in all (after
    /// the sessions' drain, which may take up to `timeout` too): its children share it, each
    /// getting at most what is left minus a reserve for those stopped after it, so the event
    /// bus, stopped last, keeps its reserve. Afterwards every handle reports `Stopped`.
    pub async fn shutdown(&self, timeout: Duration) {
        if let Some((_, membership)) = &self.cluster
            && !self.has_exited()
        {
            // Tell the cluster first, so peers record a leave rather than a failure.
            let left = membership
                .call(
                    |reply| MembershipMsg::Leave { reply },
                    Duration::from_secs(1),
                )
                .await;
            if let Err(error) = left {
                tracing::warn!(%error, "the cluster was not told that this node leaves");
            }
        }
        if let Some(sessions) = &self.session_manager
            && !self.has_exited()
        {
            // Running sessions end first, recorded as interrupted; queued ones wait for the
            // next start.
            let drained = sessions
                .manager
                .call(|reply| ManagerMsg::Drain { reply }, timeout)
                .await;
            if let Err(error) = drained {
                tracing::warn!(%error, "sessions did not all end before the shutdown timeout");
            }
        }
        if !self.has_exited() {
            // The root's children share `timeout` (see `supervisor::stop_within`): the branches
            // stopped first cannot take the time of the event bus, stopped last, which writes
            // what is queued and releases its id block in `post_stop`.
            let stopped =
                supervisor::stop_within(&self.root_cell, Some("shutdown".to_owned()), timeout)
                    .await;
            if !stopped {
                tracing::warn!(
                    timeout_ms = timeout.as_millis() as u64,
                    "the tree did not stop in time; it was killed"
                );
            }
        }
        for (_, entry) in self.directory.list() {
            entry.control.stop_for_good();
        }
        self.root.stop_for_good();
    }
}
