//! `troupe mcp` (MCP on stdin/stdout) and `troupe nodes` (what local discovery sees).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

use crate::config::{Config, LogFormat, Overrides};
use crate::discovery;
use crate::node::Node;

/// `troupe mcp` options.
#[derive(Debug, clap::Args)]
pub(super) struct McpArgs {
    /// Run a private embedded node (no HTTP, not discoverable) even when discovery finds a
    /// running one.
    #[arg(long)]
    standalone: bool,
    /// TOML configuration file of the embedded node.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Data directory of the embedded node (data_dir).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Log filter (log.level); logs go to stderr.
    #[arg(long)]
    log_level: Option<String>,
    /// Log format (log.format).
    #[arg(long, value_enum)]
    log_format: Option<LogFormat>,
}

/// `troupe nodes` options.
#[derive(Debug, clap::Args)]
pub(super) struct NodesArgs {
    /// Print the entries as JSON.
    #[arg(long)]
    json: bool,
}

pub(super) async fn run(args: McpArgs) -> anyhow::Result<ExitCode> {
    let overrides = Overrides {
        data_dir: args.data_dir.clone(),
        log_format: args.log_format,
        log_level: args.log_level.clone(),
        ..Overrides::default()
    };
    let config = Config::load(args.config.as_deref(), &overrides)?;
    crate::telemetry::init(config.log.format, &config.log.level);
    crate::tls::install_default_provider();

    if !args.standalone {
        let dir = discovery::directory();
        if let Some(bridge) = attach(&dir).await {
            bridge.run().await?;
            return Ok(ExitCode::SUCCESS);
        }
        tracing::info!(dir = %dir.display(), "no reachable running node; starting an embedded one");
    }

    let signal = super::node::shutdown_signal()?;
    // Found by discovery's fallback, the embedded node serves HTTP on an ephemeral loopback port
    // and registers, so the next `troupe mcp` bridges to it instead of starting a second node.
    // `--standalone` keeps it private: no HTTP, no discovery entry.
    let builder = Node::builder().config(config);
    let builder = if args.standalone {
        builder.without_http()
    } else {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")
            .context("cannot bind a loopback port for the embedded node")?;
        builder.listener(listener)
    };
    let node = builder
        .start()
        .await
        .context("cannot start the embedded node")?;
    let registration = if args.standalone {
        None
    } else {
        super::node::register(&node)
    };
    tracing::info!(node = %node.node_id(), http = ?node.http_addr(), "serving MCP on stdio with an embedded node");
    let mut signal = std::pin::pin!(signal);
    let mut stopping = false;
    let failure = tokio::select! {
        failure = crate::mcp::stdio::serve_embedded(node.core().clone()) => failure,
        () = &mut signal => {
            stopping = true;
            None
        }
        () = node.wait() => {
            stopping = true;
            Some("the embedded node's root supervisor gave up".to_owned())
        }
    };
    if let Some(registration) = registration {
        // Other stdio clients may have bridged to this node: it stays until they are gone.
        if !stopping {
            tokio::select! {
                () = bridged_clients_gone(&node) => {}
                () = &mut signal => {}
                () = node.wait() => {}
            }
        }
        registration.remove();
    }
    node.shutdown().await;
    match failure {
        None => Ok(ExitCode::SUCCESS),
        Some(reason) => {
            tracing::error!(%reason, "the stdio link ended badly");
            Ok(ExitCode::FAILURE)
        }
    }
}

/// A bridge to the first live node in discovery that answers, most recently started first.
/// Entries whose token cannot be read or whose node cannot be reached are skipped (a warning
/// each), so a node that hangs or lost its token does not block `troupe mcp`.
async fn attach(dir: &std::path::Path) -> Option<crate::mcp::stdio::Bridge> {
    for entry in discovery::live(dir, discovery::now_secs()) {
        let token_dir = entry.token_file.parent().unwrap_or(&entry.token_file);
        let Some(token) = crate::auth::read_admin_token(token_dir) else {
            tracing::warn!(
                node = %entry.node_id,
                file = %entry.token_file.display(),
                "a running node's token file cannot be read; trying the next node"
            );
            continue;
        };
        match crate::mcp::stdio::Bridge::connect(entry.http, &token).await {
            Ok(bridge) => {
                tracing::info!(node = %entry.node_id, http = %entry.http, "bridging stdio to a running node");
                return Some(bridge);
            }
            Err(error) => {
                tracing::warn!(node = %entry.node_id, %error, "a running node cannot be reached; trying the next node");
            }
        }
    }
    None
}

/// Resolves once no stdio client bridged to this node (an `mcp_stdio` link from a socket) is left.
async fn bridged_clients_gone(node: &crate::node::NodeHandle) {
    use troupe_actors::event::{EventFilter, KindPattern, TransportKind};
    let mut changes = node.subscribe(EventFilter {
        kinds: vec![KindPattern::Family("link".into())],
        ..EventFilter::all()
    });
    loop {
        let bridged = node
            .core()
            .tree
            .registry
            .tables()
            .links()
            .into_iter()
            .filter(|link| link.transport == TransportKind::McpStdio && link.peer.is_some())
            .count();
        if bridged == 0 {
            return;
        }
        tracing::info!(
            bridged,
            "stdin closed; the embedded node stays until its bridged stdio clients leave"
        );
        if changes.recv().await.is_none() {
            return;
        }
    }
}

pub(super) fn nodes(args: NodesArgs) -> anyhow::Result<ExitCode> {
    let dir = discovery::directory();
    let entries = discovery::live(&dir, discovery::now_secs());
    if args.json {
        println!("{}", serde_json::to_string_pretty(&entries)?);
        return Ok(ExitCode::SUCCESS);
    }
    if entries.is_empty() {
        println!("no running node found in {}", dir.display());
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<24} {:>8}  {:<22} {:<28} TOKEN FILE",
        "NODE", "PID", "HTTP", "STARTED"
    );
    for entry in entries {
        println!(
            "{:<24} {:>8}  {:<22} {:<28} {}",
            entry.node_id,
            entry.pid,
            entry.http,
            entry.started_at,
            entry.token_file.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}
