//! `troupe node`: run a node until SIGINT or SIGTERM, then shut it down gracefully.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use crate::config::{Config, LogFormat, Overrides};
use crate::discovery::{self, Entry, Registration};
use crate::node::Node;

/// `troupe node` options (each also a config key; flags win).
#[derive(Debug, clap::Args)]
pub(super) struct NodeArgs {
    /// TOML configuration file.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// HTTP listen address, IP:PORT (http.listen).
    #[arg(long, value_parser = ip_and_port)]
    listen: Option<SocketAddr>,
    /// Data directory (data_dir).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Node id (node_id).
    #[arg(long)]
    node_id: Option<String>,
    /// Log format (log.format).
    #[arg(long, value_enum)]
    log_format: Option<LogFormat>,
    /// Log filter, e.g. `info` or `info,troupe=debug` (log.level).
    #[arg(long)]
    log_level: Option<String>,
    /// Cluster (QUIC) listen address, IP:PORT; turns the cluster on (cluster.listen).
    #[arg(long, value_parser = ip_and_port)]
    cluster_listen: Option<SocketAddr>,
    /// A node to join, IP:PORT of its cluster address (repeatable; added to cluster.seeds);
    /// turns the cluster on.
    #[arg(long, value_name = "ADDR", value_parser = ip_and_port)]
    join: Vec<SocketAddr>,
    /// Enable POST /v1/admin/faults (debug.fault_injection).
    #[arg(long)]
    fault_injection: bool,
}

pub(super) async fn run(args: NodeArgs) -> anyhow::Result<ExitCode> {
    let overrides = Overrides {
        listen: args.listen,
        data_dir: args.data_dir,
        node_id: args.node_id,
        log_format: args.log_format,
        log_level: args.log_level,
        fault_injection: args.fault_injection.then_some(true),
        cluster_listen: args.cluster_listen,
        join: args.join,
    };
    let config = Config::load(args.config.as_deref(), &overrides)?;
    crate::telemetry::init(config.log.format, &config.log.level);
    crate::tls::install_default_provider();

    // Listen for signals before the node exists, so one that arrives during start-up still
    // leads to a graceful shutdown rather than the default action.
    let signal = shutdown_signal()?;
    let node = Node::builder().config(config).start().await?;
    let registration = register(&node, false);
    let failed = tokio::select! {
        () = signal => false,
        () = node.wait() => true,
    };
    if failed {
        tracing::error!("the node's root supervisor gave up; shutting down");
    }
    if let Some(registration) = registration {
        registration.remove();
    }
    node.shutdown().await;
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// Writes the node's discovery entry (when it serves HTTP); a failure is logged, not fatal.
/// `embedded`: the node is a `troupe mcp`'s.
pub(super) fn register(node: &crate::node::NodeHandle, embedded: bool) -> Option<Registration> {
    // What `troupe mcp` connects to: a node listening on every address is reached on loopback.
    let http = crate::node::reachable_locally(node.http_addr()?);
    let entry = Entry {
        node_id: node.node_id().to_string(),
        pid: std::process::id(),
        http,
        token_file: node.admin_token_path().to_owned(),
        started_at: troupe_actors::ids::Timestamp::now().to_string(),
        updated_at: 0,
        embedded,
    };
    let dir = discovery::directory();
    match Registration::start(dir.clone(), entry) {
        Ok(registration) => {
            tracing::info!(file = %registration.path().display(), "discovery entry written");
            Some(registration)
        }
        Err(error) => {
            tracing::warn!(%error, dir = %dir.display(), "cannot write the discovery entry; `troupe mcp` will not find this node");
            None
        }
    }
}

/// Registers SIGINT and SIGTERM handlers now; the future resolves on the first of them.
pub(super) fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => tracing::info!("SIGINT received"),
            _ = terminate.recv() => tracing::info!("SIGTERM received"),
        }
    })
}

/// An `IP:PORT` flag value; a host name is refused saying so (addresses are not resolved).
fn ip_and_port(value: &str) -> Result<SocketAddr, String> {
    value.parse().map_err(|_| {
        format!(
            "{value:?} is not IP:PORT; use an IP address and a port, e.g. 127.0.0.1:7070 or \
             [::1]:7070 (host names are not resolved)"
        )
    })
}
