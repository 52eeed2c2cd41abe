//! A troupe node: the supervision tree plus its I/O edges (HTTP front end, token file, …),
//! started with [`Node::builder`] and driven through a [`NodeHandle`]. The `troupe node`
//! command is a thin wrapper around this, and host applications embed it the same way.
//!
//! Start: validate the configuration, prepare the data directory and the admin token, start the
//! tree (children in order), bind the listener, serve. Shutdown: stop accepting connections,
//! stop the tree (children in reverse order, each gracefully within its timeout, then killed;
//! open event streams end as their links stop), then wait for the server to finish.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use troupe_actors::cluster::{MembershipMsg, MembershipProfile};
use troupe_actors::event::{
    EventBus, EventBusConfig, EventFilter, Replay, ReplayFrom, Subscription,
};
use troupe_actors::health::{HealthConfig, HealthReport};
use troupe_actors::ids::{ActorPath, NodeId, SessionId};
use troupe_actors::kernel::{CallError, FaultError, FaultKind};
use troupe_actors::node::{
    ClusterPorts, NodePorts, NodeTree, NodeTreeConfig, NodeTreeError, SessionPorts,
};
use troupe_actors::provider::ProviderSet;
use troupe_actors::registry::Registry;
use troupe_actors::session::{ChatRunner, OutputLimits, SessionSettings, SessionSpec};
use troupe_actors::supervisor::{Backoff, RestartIntensity, SupervisorConfig};

use crate::auth::{self, RequestLimiter, TokenBook, TokenFileError};
use crate::cluster::ClusterEndpoint;
use crate::cluster::certs::{self, NodeFiles};
use crate::cluster::membership::{QuicDatagrams, WireCodec};
use crate::cluster::relay::{self, QuicRelaySource, RelayServer};
use crate::cluster::remote::SessionOwners;
use crate::config::{ClusterProfile, Config, ConfigError};
use crate::metrics::NodeMetrics;
use crate::process::LocalRunner;
use crate::provider::client::HttpProvider;
use crate::provider::keys::SessionKeys;
use crate::session::chat::NodeChats;
use crate::session::commands::{GatewayKeys, NoGateway, NodeCommands};
use crate::session::request::RequestPolicy;
use crate::session::request::SessionRequest;
use crate::session::{SessionError, SessionService, SessionView};
use crate::store::{OutputPage, SessionPage, SessionQuery};
use crate::store::{Store, StoreConfig};

/// Why a node did not start.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The configuration is not usable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The data directory or the admin token could not be set up.
    #[error(transparent)]
    DataDir(#[from] TokenFileError),
    /// The supervision tree did not start.
    #[error(transparent)]
    Tree(#[from] NodeTreeError),
    /// The store in the data directory could not be opened.
    #[error("cannot open the store in {dir}: {source}")]
    Store {
        /// The data directory.
        dir: PathBuf,
        /// Why.
        source: troupe_actors::session::StoreError,
    },
    /// The cluster endpoint could not start (credentials, node id, socket).
    #[error("cluster: {0}")]
    Cluster(String),
    /// The HTTP listener could not be bound.
    #[error(
        "cannot listen on {addr}: {source}; choose another address with --listen or http.listen"
    )]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

impl NodeError {
    /// Whether the node did not start because another process holds its data directory (a
    /// node running there, or one still starting or stopping).
    pub fn data_dir_in_use(&self) -> bool {
        matches!(
            self,
            Self::Store {
                source: troupe_actors::session::StoreError::InUse(_),
                ..
            }
        )
    }
}

/// Entry point of the library API.
pub struct Node;

impl Node {
    /// A builder with the default configuration.
    pub fn builder() -> NodeBuilder {
        NodeBuilder::default()
    }
}

/// Configures and starts a node.
#[derive(Default)]
pub struct NodeBuilder {
    config: Config,
    listener: Option<std::net::TcpListener>,
    without_http: bool,
}

impl NodeBuilder {
    /// Replaces the whole configuration (e.g. one loaded with [`Config::load`]).
    pub fn config(mut self, config: Config) -> Self {
        self.config = config;
        self
    }

    /// Sets the node id.
    pub fn node_id(mut self, node_id: NodeId) -> Self {
        self.config.node_id = Some(node_id);
        self
    }

    /// Sets the data directory.
    pub fn data_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.config.data_dir = Some(dir.into());
        self
    }

    /// Enables or disables `POST /v1/admin/faults`.
    pub fn fault_injection(mut self, enabled: bool) -> Self {
        self.config.debug.fault_injection = enabled;
        self
    }

    /// Serves HTTP on an already-bound listener (tests bind `127.0.0.1:0`).
    pub fn listener(mut self, listener: std::net::TcpListener) -> Self {
        self.listener = Some(listener);
        self
    }

    /// Runs the actor system only, without the HTTP front end.
    pub fn without_http(mut self) -> Self {
        self.without_http = true;
        self
    }

    /// Starts the node.
    pub async fn start(self) -> Result<NodeHandle, NodeError> {
        let config = self.config;
        config.validate()?;
        if let Some(listener) = &self.listener {
            let local = listener.local_addr().map_err(|source| NodeError::Bind {
                addr: config.http.listen,
                source,
            })?;
            check_listener(&config, local)?;
        }
        let node_id = config.resolved_node_id();
        let data_dir = config.resolved_data_dir();
        auth::ensure_data_dir(&data_dir)?;
        let (admin_token, admin_token_path, created) = auth::ensure_admin_token(&data_dir)?;
        if created {
            tracing::info!(
                path = %admin_token_path.display(),
                "wrote a new admin token (mode 0600); the CLI reads it from there"
            );
        }

        let policy = request_policy(&config)?;
        let store = Store::open(
            &data_dir,
            node_id.clone(),
            StoreConfig {
                event_retention: Duration::from_secs(config.events.retention_secs),
                // 0: sessions are kept forever.
                session_retention: (config.sessions.retention_secs > 0)
                    .then(|| Duration::from_secs(config.sessions.retention_secs)),
                event_retention_bytes: config.events.retention_bytes,
                append_linger: Duration::from_millis(config.events.log_linger_ms),
                ..StoreConfig::default()
            },
        )
        .await
        .map_err(|source| NodeError::Store {
            dir: data_dir.clone(),
            source,
        })?;
        let providers = crate::provider::node_providers(&config)?;
        let session_keys = Arc::new(SessionKeys::new().map_err(|error| ConfigError::Semantic {
            key: "gateway".into(),
            message: format!("cannot draw the session-key secret: {error}"),
        })?);
        let gateway: Box<dyn GatewayKeys> = if providers.set.is_empty() {
            Box::new(NoGateway)
        } else {
            Box::new(session_keys.clone())
        };
        let commands = NodeCommands::new(
            gateway,
            config
                .providers
                .iter()
                .filter_map(|provider| provider.api_key_env.clone())
                .collect(),
            policy.workspace_roots[0].clone(),
        );
        let chats: Option<Arc<dyn ChatRunner>> = if providers.set.is_empty() {
            None
        } else {
            Some(Arc::new(NodeChats::new(providers.set.clone())))
        };
        let cluster = if config.cluster.is_enabled() {
            match start_cluster(&config, &data_dir, &node_id) {
                Ok(endpoint) => Some(endpoint),
                Err(error) => {
                    let _ = store.clone().close().await;
                    return Err(error);
                }
            }
        } else {
            None
        };
        let generation_dir = data_dir.join("cluster");
        let generation = troupe_actors::cluster::GenerationFloor::new(
            crate::cluster::read_generation(&generation_dir),
            Some(crate::cluster::generation_keeper(generation_dir.clone())),
        );
        let cluster_ports = match &cluster {
            Some(endpoint) => {
                let addr = endpoint.local_addr().map_err(|error| {
                    NodeError::Cluster(format!("the cluster socket has no address: {error}"))
                })?;
                Some(ClusterPorts {
                    addr,
                    seeds: config.cluster.seeds.clone(),
                    profile: match config.cluster.profile {
                        ClusterProfile::Lan => MembershipProfile::Lan,
                        ClusterProfile::Fast => MembershipProfile::Fast,
                    },
                    labels: config.cluster.labels.clone(),
                    codec: Arc::new(WireCodec),
                    transport: Arc::new(QuicDatagrams(endpoint.clone())),
                    relay: Some(Arc::new(QuicRelaySource(endpoint.clone()))),
                    rng_seed: None,
                    generation: generation.clone(),
                })
            }
            None => None,
        };
        let ports = NodePorts {
            cluster: cluster_ports,
            event_store: Some(Arc::new(crate::provider::keys::SessionWatch::new(
                store.clone(),
                session_keys.clone(),
                node_id.clone(),
            ))),
            sessions: Some(SessionPorts {
                runner: Arc::new(LocalRunner::new(OutputLimits::default())),
                store: Arc::new(store.clone()),
                commands: Arc::new(commands),
                chats,
            }),
            providers: providers.actors,
        };
        let tree = match NodeTree::start(tree_config(&config, node_id.clone()), ports).await {
            Ok(tree) => tree,
            Err(error) => {
                if let Some(endpoint) = &cluster {
                    endpoint.close(Duration::from_secs(1)).await;
                }
                return Err(error.into());
            }
        };
        let sessions = SessionService::new(
            tree.session_manager
                .clone()
                .expect("the node always runs sessions"),
            store.clone(),
            policy,
            node_id.clone(),
            tree.events.clone(),
        );
        report_store_failures(&store, &tree.health);
        let mut metrics = NodeMetrics::new(
            tree.directory.clone(),
            tree.events.clone(),
            tree.registry.tables().clone(),
            tree.session_manager
                .as_ref()
                .map(|sessions| sessions.stats.clone()),
        );
        metrics.add_providers(tree.provider_actors.clone());
        let mut metrics = metrics.with_store(store.clone());
        let calls: Arc<std::sync::OnceLock<(std::sync::Weak<NodeCore>, String)>> = Arc::default();
        if let Some(endpoint) = &cluster {
            metrics = metrics.with_cluster(endpoint.stats().clone());
            if let Some((_, membership)) = &tree.cluster {
                crate::cluster::membership::attach(endpoint, membership.clone());
            }
            endpoint.set_stream_handler(relay::serve_streams(RelayServer {
                node: node_id.clone(),
                events: tree.events.clone(),
                store: store.clone(),
                calls: calls.clone(),
                stats: endpoint.stats().clone(),
                inbound: Arc::new(relay::InboundPeers::new(Default::default())),
            }));
        }
        let core = Arc::new(NodeCore {
            tokens: TokenBook::new(&config.auth, Some(&admin_token)),
            limiter: RequestLimiter::new(&config.auth),
            node_id: node_id.clone(),
            data_dir,
            admin_token_path,
            metrics,
            tree,
            sessions,
            store,
            providers: providers.set,
            session_keys,
            shutting_down: AtomicBool::new(false),
            sessions_owners: cluster.as_ref().map(|_| SessionOwners::default()),
            token_links: Arc::default(),
            key_routes: Default::default(),
            cluster,
            config,
        });
        if let Some(owners) = &core.sessions_owners {
            owners.follow(&core);
            let _ = calls.set((Arc::downgrade(&core), admin_token.clone()));
        }

        let (http_addr, server) = if self.without_http {
            (None, None)
        } else {
            match start_http(&core, self.listener).await {
                Ok(started) => started,
                Err(error) => {
                    core.tree.shutdown(Duration::from_secs(10)).await;
                    if let Some(cluster) = &core.cluster {
                        cluster.close(Duration::from_secs(1)).await;
                    }
                    let _ = core.store.clone().close().await;
                    return Err(error);
                }
            }
        };
        if let (Some(http), Some((_, membership))) = (http_addr, &core.tree.cluster) {
            let _ = membership.cast(MembershipMsg::SetHttp(http.to_string()));
        }
        tracing::info!(
            node = %node_id,
            http = %http_addr.map_or_else(|| "off".to_owned(), |addr| addr.to_string()),
            cluster = %core
                .cluster
                .as_ref()
                .and_then(|cluster| cluster.local_addr().ok())
                .map_or_else(|| "off".to_owned(), |addr| addr.to_string()),
            data_dir = %core.data_dir.display(),
            fault_injection = core.config.debug.fault_injection,
            "node started"
        );
        Ok(NodeHandle {
            inner: Arc::new(HandleInner {
                core,
                http_addr,
                server: tokio::sync::Mutex::new(server),
            }),
        })
    }
}

/// The non-loopback rule of [`Config::validate`] applied to the address a listener handed to
/// [`NodeBuilder::listener`] is really bound to (`http.listen` is not used then, so checking the
/// configuration alone would let such a node serve every interface without tokens or an
/// allow-list).
fn check_listener(config: &Config, bound: SocketAddr) -> Result<(), NodeError> {
    if bound.ip().is_loopback() {
        return Ok(());
    }
    let mut exposed = config.clone();
    exposed.http.listen = bound;
    exposed.validate()?;
    Ok(())
}

/// Loads this node's cluster credentials, checks they name this node, binds the endpoint.
fn start_cluster(
    config: &Config,
    data_dir: &Path,
    node_id: &NodeId,
) -> Result<ClusterEndpoint, NodeError> {
    let cluster = &config.cluster;
    let files = NodeFiles {
        ca: cluster.resolve(data_dir, &cluster.ca),
        cert: cluster.resolve(data_dir, &cluster.cert),
        key: cluster.resolve(data_dir, &cluster.key),
    };
    let credentials = certs::load(&files).map_err(|error| {
        if let certs::CertError::Unusable { .. } = error {
            // The files are there; the message says what to do with them.
            return NodeError::Cluster(error.to_string());
        }
        NodeError::Cluster(format!(
            "{error}; create this node's files with `troupe cluster init --data-dir {} \
             --node-id {node_id}` (first node) or `troupe cluster issue {node_id} --out {}` on a \
             node holding the CA (with that node's --data-dir), or set cluster.ca, cluster.cert \
             and cluster.key",
            data_dir.display(),
            data_dir.join("cluster").display()
        ))
    })?;
    if credentials.node != *node_id {
        return Err(NodeError::Cluster(format!(
            "the certificate {} was issued to node {:?} but this node is {:?}; set node_id to \
             match, or issue a certificate for {:?}",
            files.cert.display(),
            credentials.node.as_str(),
            node_id.as_str(),
            node_id.as_str()
        )));
    }
    if let Some(warning) = certs::expiry_warning(&files, &credentials, std::time::SystemTime::now())
    {
        tracing::warn!("{warning}");
    }
    let endpoint = ClusterEndpoint::bind(&credentials, cluster.listen, Arc::default())
        .map_err(|error| NodeError::Cluster(error.to_string()))?;
    Ok(endpoint)
}

struct Server {
    stop_accepting: CancellationToken,
    task: JoinHandle<std::io::Result<()>>,
}

async fn start_http(
    core: &Arc<NodeCore>,
    listener: Option<std::net::TcpListener>,
) -> Result<(Option<SocketAddr>, Option<Server>), NodeError> {
    let addr = core.config.http.listen;
    let listener = match listener {
        Some(listener) => listener
            .set_nonblocking(true)
            .and_then(|()| tokio::net::TcpListener::from_std(listener)),
        None => tokio::net::TcpListener::bind(addr).await,
    }
    .map_err(|source| NodeError::Bind { addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| NodeError::Bind { addr, source })?;
    core.session_keys
        .set_base_url(format!("http://{}/v1", reachable_locally(local)));
    let stop_accepting = CancellationToken::new();
    let router = crate::http::router(core.clone(), stop_accepting.clone());
    let task = tokio::spawn(crate::http::serve(
        listener,
        router,
        Duration::from_secs(core.config.http.send_timeout_secs),
        stop_accepting.clone().cancelled_owned(),
    ));
    Ok((
        Some(local),
        Some(Server {
            stop_accepting,
            task,
        }),
    ))
}

/// How a process on this machine reaches a node listening on `listen`: an unspecified address
/// (`0.0.0.0`, `[::]`) is reached on loopback of the same family, which the node's default
/// allowed hosts accept.
pub(crate) fn reachable_locally(listen: SocketAddr) -> SocketAddr {
    match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), listen.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), listen.port())
        }
        _ => listen,
    }
}

fn tree_config(config: &Config, node: NodeId) -> NodeTreeConfig {
    let mut tree = NodeTreeConfig::new(node);
    tree.supervision = SupervisorConfig {
        intensity: RestartIntensity {
            max_restarts: config.supervision.max_restarts,
            window: Duration::from_secs(config.supervision.window_secs),
        },
        backoff: Backoff {
            min: Duration::from_millis(config.supervision.backoff_min_ms),
            max: Duration::from_millis(config.supervision.backoff_max_ms),
        },
        ..SupervisorConfig::default()
    };
    tree.events = EventBusConfig {
        ring_capacity: config.events.ring_capacity,
        subscriber_buffer: config.events.subscriber_buffer,
    };
    tree.health = HealthConfig {
        tick: Duration::from_millis(config.health.tick_ms),
        window: Duration::from_secs(config.health.window_secs),
        degraded_after_restarts: config.health.degraded_after_restarts,
        ..HealthConfig::default()
    };
    tree.sessions = SessionSettings {
        max_concurrent: config.sessions.max_concurrent,
        queue_capacity: config.sessions.queue_capacity,
        long_running_after: Duration::from_secs(config.sessions.long_running_after_secs),
        default_timeout: Duration::from_secs(config.sessions.default_timeout_secs),
        kill_grace: Duration::from_secs(config.sessions.kill_grace_secs),
        output_events_per_sec: config.sessions.output_events_per_sec,
        ..SessionSettings::default()
    };
    tree
}

/// Workspace roots (canonical; the current directory when none are configured) and the program
/// allow-list.
fn request_policy(config: &Config) -> Result<RequestPolicy, NodeError> {
    let configured =
        if config.sessions.workspace_roots.is_empty() {
            vec![std::env::current_dir().map_err(|error| ConfigError::Semantic {
            key: "sessions.workspace_roots".into(),
            message: format!(
                "none is configured and the current directory cannot be read ({error}); set one"
            ),
        })?]
        } else {
            config.sessions.workspace_roots.clone()
        };
    let mut workspace_roots = Vec::with_capacity(configured.len());
    for (index, root) in configured.iter().enumerate() {
        let canonical = std::fs::canonicalize(root).map_err(|error| ConfigError::Semantic {
            key: format!("sessions.workspace_roots[{index}]"),
            message: format!(
                "{} cannot be used ({error}); create it or fix the path",
                root.display()
            ),
        })?;
        workspace_roots.push(canonical);
    }
    Ok(RequestPolicy {
        workspace_roots,
        allowed_programs: config.sessions.allowed_programs.clone(),
    })
}

/// What the front ends share: the tree, the configuration, tokens, metrics.
pub struct NodeCore {
    /// The configuration the node runs with.
    pub config: Config,
    /// This node's id.
    pub node_id: NodeId,
    /// The data directory.
    pub data_dir: PathBuf,
    /// Where the admin token is.
    pub admin_token_path: PathBuf,
    /// The supervision tree.
    pub tree: NodeTree,
    /// Known bearer tokens.
    pub tokens: TokenBook,
    /// Requests per token.
    pub limiter: RequestLimiter,
    /// `/metrics`.
    pub metrics: NodeMetrics,
    /// Sessions.
    pub sessions: SessionService,
    /// The store.
    pub store: Store,
    /// The LLM providers and their routes.
    pub providers: ProviderSet<HttpProvider>,
    /// Session-scoped gateway keys.
    pub session_keys: Arc<SessionKeys>,
    shutting_down: AtomicBool,
    /// The cluster endpoint, when the cluster is enabled.
    pub cluster: Option<ClusterEndpoint>,
    /// Owners of other nodes' sessions, when the cluster is enabled.
    pub sessions_owners: Option<SessionOwners>,
    /// How many links each token holds (at most `auth.max_links_per_token`).
    pub token_links: Arc<crate::link::TokenLinks>,
    /// Where this node forwarded spawns with an idempotency key (a retry goes there too).
    pub key_routes: crate::cluster::remote::KeyRoutes,
}

impl NodeCore {
    /// True once shutdown has begun.
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Relaxed)
    }
}

struct HandleInner {
    core: Arc<NodeCore>,
    http_addr: Option<SocketAddr>,
    server: tokio::sync::Mutex<Option<Server>>,
}

/// A node for the crate's unit tests: default configuration, data in `dir/data`, no HTTP
/// listener.
#[cfg(test)]
pub(crate) async fn test_node(dir: &std::path::Path) -> NodeHandle {
    Node::builder()
        .config(crate::config::Config::default())
        .data_dir(dir.join("data"))
        .without_http()
        .start()
        .await
        .expect("a test node starts")
}

/// A running node. Cheap to clone.
#[derive(Clone)]
pub struct NodeHandle {
    inner: Arc<HandleInner>,
}

impl NodeHandle {
    /// This node's id.
    pub fn node_id(&self) -> &NodeId {
        &self.inner.core.node_id
    }

    /// The bound HTTP address, when HTTP runs.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.inner.http_addr
    }

    /// The bound cluster (QUIC) address, when the cluster is enabled.
    pub fn cluster_addr(&self) -> Option<SocketAddr> {
        self.inner
            .core
            .cluster
            .as_ref()
            .and_then(|cluster| cluster.local_addr().ok())
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.inner.core.data_dir
    }

    /// Where the admin token is.
    pub fn admin_token_path(&self) -> &Path {
        &self.inner.core.admin_token_path
    }

    /// The shared core (front ends use it).
    pub fn core(&self) -> &Arc<NodeCore> {
        &self.inner.core
    }

    /// The event bus.
    pub fn events(&self) -> &EventBus {
        &self.inner.core.tree.events
    }

    /// The registry.
    pub fn registry(&self) -> &Registry {
        &self.inner.core.tree.registry
    }

    /// Subscribes to live events.
    pub fn subscribe(&self, filter: EventFilter) -> Subscription {
        self.events().subscribe(filter)
    }

    /// Subscribes with a replay first (`ReplayFrom::After(id)` resumes exactly after `id`).
    pub async fn subscribe_from(
        &self,
        from: ReplayFrom,
        filter: EventFilter,
    ) -> Result<(Subscription, Replay), CallError> {
        self.events().subscribe_from(from, filter).await
    }

    /// The node's health.
    pub async fn health(&self) -> Result<HealthReport, CallError> {
        self.inner.core.tree.health.report().await
    }

    /// Submits a session (the node's workspace and program policy is not applied: the host
    /// builds the spec). Use [`NodeHandle::spawn_request`] for requests as users type them.
    pub async fn spawn_session(&self, spec: SessionSpec) -> Result<SessionView, SessionError> {
        self.inner.core.sessions.submit(spec).await
    }

    /// Parses and submits a request as users type it, under the node's policy.
    pub async fn spawn_request(
        &self,
        request: SessionRequest,
    ) -> Result<SessionView, SessionError> {
        self.inner.core.sessions.spawn(request).await
    }

    /// One session.
    pub async fn get_session(&self, id: &SessionId) -> Result<SessionView, SessionError> {
        self.inner.core.sessions.get(id).await
    }

    /// A page of sessions, newest first.
    pub async fn list_sessions(&self, query: SessionQuery) -> Result<SessionPage, SessionError> {
        self.inner.core.sessions.list(query).await
    }

    /// Cancels a session (idempotent).
    pub async fn cancel_session(&self, id: &SessionId) -> Result<SessionView, SessionError> {
        self.inner.core.sessions.cancel(id).await
    }

    /// A page of a session's output.
    pub async fn session_output(
        &self,
        id: &SessionId,
        offset: u64,
        limit: usize,
    ) -> Result<OutputPage, SessionError> {
        self.inner.core.sessions.output(id, offset, limit).await
    }

    /// Makes the actor at `path` panic (or fail) inside its handler. Works whether or not
    /// `debug.fault_injection` is on: that flag only guards the HTTP route.
    pub fn inject_fault(&self, path: &ActorPath, kind: FaultKind) -> Result<(), FaultError> {
        self.inner.core.tree.inject_fault(path, kind)
    }

    /// Waits until the node stops: after [`NodeHandle::shutdown`], or when its root supervisor
    /// gave up (then the node is unusable and should be shut down).
    pub async fn wait(&self) {
        self.inner.core.tree.wait_exit().await;
    }

    /// True when the root supervisor gave up (escalation reached the top).
    pub fn has_failed(&self) -> bool {
        self.inner.core.tree.has_exited() && !self.inner.core.is_shutting_down()
    }

    /// Stops the node: no new connections, the tree stopped in reverse order, the server
    /// finished. Safe to call more than once.
    pub async fn shutdown(&self) {
        let core = &self.inner.core;
        let first = !core.shutting_down.swap(true, Ordering::SeqCst);
        let mut server = self.inner.server.lock().await;
        if let Some(server) = server.as_ref() {
            server.stop_accepting.cancel();
        }
        if first {
            tracing::info!(node = %core.node_id, "node shutting down");
        }
        let timeout = Duration::from_secs(core.config.supervision.shutdown_timeout_secs);
        core.tree.shutdown(timeout).await;
        if first && let Some(cluster) = &core.cluster {
            cluster.close(Duration::from_secs(1)).await;
        }
        if first && let Err(error) = core.store.clone().close().await {
            tracing::warn!(%error, "the store did not close cleanly");
        }
        if let Some(server) = server.take() {
            let mut task = server.task;
            if tokio::time::timeout(Duration::from_secs(5), &mut task)
                .await
                .is_err()
            {
                tracing::warn!("HTTP connections did not close within 5 s; aborting them");
                task.abort();
            }
        }
        if first {
            tracing::info!(node = %core.node_id, "node stopped");
        }
    }
}

/// Keeps the node's health told whether the store can write: the `store` component is degraded
/// while its write batches fail (a full disk, an I/O error; the store reopens its file and tries
/// again with each batch), and leaves the report once one commits again. Ends with the store.
fn report_store_failures(store: &Store, health: &troupe_actors::health::Health) {
    let mut failure = store.write_failure();
    let health = health.clone();
    tokio::spawn(async move {
        while failure.changed().await.is_ok() {
            let error = failure.borrow_and_update().clone();
            match error {
                Some(error) => health.report_component(
                    "store",
                    troupe_actors::health::HealthStatus::Degraded,
                    format!(
                        "writes fail ({error}); sessions, output and events are not stored until \
                         one commits again (see troupe_store_failed_batches_total)"
                    ),
                ),
                None => health.forget_component("store"),
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `troupe mcp` and sessions dial for a node on every address is loopback, which the
    /// default allowed hosts accept (the raw `0.0.0.0` they would refuse).
    #[test]
    fn a_node_on_every_address_is_reached_on_loopback_its_hosts_accept() {
        let allowed = Config::default().http.allowed_hosts;
        let host_ok = |addr: SocketAddr| {
            let mut headers = axum::http::HeaderMap::new();
            headers.insert("host", addr.to_string().parse().unwrap());
            crate::http::ws::check_host_and_origin(&headers, &Default::default(), &allowed).is_ok()
        };
        for (listen, reached) in [
            ("0.0.0.0:7070", "127.0.0.1:7070"),
            ("[::]:7070", "[::1]:7070"),
            ("127.0.0.1:7070", "127.0.0.1:7070"),
            ("10.1.2.3:7070", "10.1.2.3:7070"),
        ] {
            let reachable = reachable_locally(listen.parse().unwrap());
            assert_eq!(reachable.to_string(), reached, "{listen}");
        }
        assert!(!host_ok("0.0.0.0:7070".parse().unwrap()));
        assert!(host_ok(reachable_locally("0.0.0.0:7070".parse().unwrap())));
        assert!(host_ok(reachable_locally("[::]:7070".parse().unwrap())));
    }

    /// The rule is checked on the address alone: nothing is bound to a public interface.
    #[test]
    fn a_listener_on_a_non_loopback_address_needs_tokens_and_an_allow_list() {
        let config = Config::default();
        let loopback: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        assert!(check_listener(&config, loopback).is_ok());
        assert!(check_listener(&config, "[::1]:40000".parse().unwrap()).is_ok());
        for exposed in ["0.0.0.0:40000", "10.1.2.3:7070", "[::]:7070"] {
            let error = check_listener(&config, exposed.parse().unwrap())
                .unwrap_err()
                .to_string();
            assert!(error.contains("auth.tokens"), "{exposed}: {error}");
            assert!(error.contains("not a loopback address"), "{error}");
        }

        let mut with_tokens = Config::default();
        with_tokens.auth.tokens = vec![crate::config::TokenConfig {
            name: "ci".into(),
            role: crate::auth::Role::Operator,
            sha256: "0".repeat(64),
        }];
        let error = check_listener(&with_tokens, "0.0.0.0:40000".parse().unwrap())
            .unwrap_err()
            .to_string();
        assert!(error.contains("sessions.allowed_programs"), "{error}");
        with_tokens.sessions.allowed_programs = vec!["sh".into()];
        assert!(check_listener(&with_tokens, "0.0.0.0:40000".parse().unwrap()).is_ok());
    }
}
