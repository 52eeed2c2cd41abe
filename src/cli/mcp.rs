//! `troupe mcp` (MCP on stdin/stdout) and `troupe nodes` (what local discovery sees).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;

use super::out::outln;
use crate::config::{Config, LogFormat, Overrides};
use crate::discovery;
use crate::mcp::stdio::BridgeEnd;
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

    // From here on, SIGINT and SIGTERM stop `troupe mcp` cleanly, whatever it is doing.
    let signal = super::node::shutdown_signal()?;
    let mut signal = std::pin::pin!(signal);
    let mut client = crate::mcp::stdio::StdioClient::stdio();
    let node = if args.standalone {
        // `--standalone` keeps the node private: no HTTP, no discovery entry.
        Node::builder()
            .config(config)
            .without_http()
            .start()
            .await
            .context("cannot start the embedded node")?
    } else {
        let dir = discovery::directory();
        let mut moves = Moves::default();
        // How long a node must be missing from discovery before one is started here.
        let mut patience = Duration::ZERO;
        loop {
            match find_or_start(&dir, &config, patience, signal.as_mut()).await? {
                Found::Node(node) => break node,
                Found::Stopped => return Ok(ExitCode::SUCCESS),
                Found::Bridge { bridge, embedded } => match tokio::select! {
                    ended = bridge.run(&mut client) => ended?,
                    () = signal.as_mut() => BridgeEnd::Done,
                } {
                    BridgeEnd::Done => return Ok(ExitCode::SUCCESS),
                    BridgeEnd::NodeGone(why) => {
                        moves.note(&why)?;
                        // A `troupe node` that went away may be restarting (on a data directory
                        // a node started here could take from it): it gets a while to return.
                        // A `troupe mcp`'s node is not coming back.
                        patience = if embedded {
                            Duration::ZERO
                        } else {
                            NODE_RETURN_PATIENCE
                        };
                        tracing::warn!(
                            reason = %why,
                            "the node this stdio client was bridged to went away; moving the \
                             client to another node (one running, or one started here)"
                        );
                    }
                },
            }
        }
    };
    serve_here(node, client, !args.standalone, signal).await
}

/// What [`find_or_start`] found: a running node to bridge to, or a node started here.
enum Found {
    Bridge {
        bridge: Box<crate::mcp::stdio::Bridge>,
        /// The node is a `troupe mcp`'s (see [`discovery::Entry::embedded`]).
        embedded: bool,
    },
    Node(crate::node::NodeHandle),
    /// SIGINT or SIGTERM came while it waited.
    Stopped,
}

/// How long a bridge whose `troupe node` went away waits for a node to appear in discovery (the
/// same one restarted, or another) before it starts one itself.
const NODE_RETURN_PATIENCE: Duration = Duration::from_secs(10);

/// How long `troupe mcp` waits for a data directory that another process holds (a node that
/// is starting, and will register, or stopping) before it gives up.
const IN_USE_PATIENCE: Duration = Duration::from_secs(15);

/// A bridge to a running node when discovery finds one (within `patience`, looking again every
/// quarter of a second); otherwise an embedded node started here, which serves HTTP on an
/// ephemeral loopback port so the next `troupe mcp` bridges to it. When the data directory is in
/// use (several `troupe mcp` starting at once, or the node of another one stopping), waits for
/// whoever holds it to register or to leave.
async fn find_or_start(
    dir: &std::path::Path,
    config: &Config,
    patience: Duration,
    mut signal: std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
) -> anyhow::Result<Found> {
    let started = tokio::time::Instant::now();
    let mut looked = false;
    while let Some(left) = patience
        .checked_sub(started.elapsed())
        .filter(|left| !left.is_zero())
    {
        // Entries that cannot be used are reported on the first look only.
        if let Some(bridge) = attach(dir, !looked).await? {
            return Ok(bridge);
        }
        if !looked {
            tracing::info!(
                dir = %dir.display(),
                "no running node in discovery; waiting up to {left:?} for one to come back \
                 before starting one here"
            );
            looked = true;
        }
        if !pause(Duration::from_millis(250).min(left), signal.as_mut()).await {
            return Ok(Found::Stopped);
        }
    }
    let deadline = tokio::time::Instant::now() + IN_USE_PATIENCE;
    let mut told = false;
    loop {
        if let Some(bridge) = attach(dir, !told && !looked).await? {
            return Ok(bridge);
        }
        if !told {
            tracing::info!(dir = %dir.display(), "no reachable running node; starting an embedded one");
        }
        let listener = std::net::TcpListener::bind("127.0.0.1:0")
            .context("cannot bind a loopback port for the embedded node")?;
        let started = Node::builder()
            .config(config.clone())
            .listener(listener)
            .start()
            .await;
        match started {
            Ok(node) => return Ok(Found::Node(node)),
            Err(error) if error.data_dir_in_use() && tokio::time::Instant::now() < deadline => {
                if !told {
                    tracing::info!(
                        data_dir = %config.resolved_data_dir().display(),
                        "the data directory is in use by another process (a node starting or \
                         stopping); waiting up to {IN_USE_PATIENCE:?} for it to register or leave"
                    );
                    told = true;
                }
                // Apart, so that several waiting clients do not retry in step.
                let apart = Duration::from_millis(fastrand::u64(50..250));
                if !pause(apart, signal.as_mut()).await {
                    return Ok(Found::Stopped);
                }
            }
            Err(error) => return Err(error).context("cannot start the embedded node"),
        }
    }
}

/// Waits `pause`; `false` when SIGINT or SIGTERM came first.
async fn pause(
    pause: Duration,
    signal: std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
) -> bool {
    tokio::select! {
        () = tokio::time::sleep(pause) => true,
        () = signal => false,
    }
}

/// The moves of one stdio client from node to node: a client whose nodes keep going away is
/// stopped rather than moved forever.
#[derive(Default)]
struct Moves(Vec<tokio::time::Instant>);

impl Moves {
    /// At most this many moves …
    const MAX: usize = 5;
    /// … within this long.
    const WINDOW: Duration = Duration::from_secs(60);

    fn note(&mut self, why: &str) -> anyhow::Result<()> {
        let now = tokio::time::Instant::now();
        self.0.retain(|at| now.duration_since(*at) < Self::WINDOW);
        self.0.push(now);
        if self.0.len() > Self::MAX {
            anyhow::bail!(
                "the node went away {} times within {:?} (last: {why}); giving up",
                self.0.len(),
                Self::WINDOW
            );
        }
        Ok(())
    }
}

/// Serves `client` with `node`, a node of this process, until the client leaves; a registered
/// node (`discoverable`) then stays until the stdio clients bridged to it leave too.
async fn serve_here(
    node: crate::node::NodeHandle,
    client: crate::mcp::stdio::StdioClient,
    discoverable: bool,
    mut signal: std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
) -> anyhow::Result<ExitCode> {
    let registration = if discoverable {
        super::node::register(&node, true)
    } else {
        None
    };
    tracing::info!(node = %node.node_id(), http = ?node.http_addr(), "serving MCP on stdio with an embedded node");
    let mut stopping = false;
    let failure = tokio::select! {
        failure = crate::mcp::stdio::serve_embedded(node.core().clone(), client) => failure,
        () = signal.as_mut() => {
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
                () = signal.as_mut() => {}
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
/// each when `report`), so a node that hangs or lost its token does not block `troupe mcp`.
/// A discovery directory that is not private to this user is an error: its entries could send
/// the admin token anywhere, and an embedded node would register there.
async fn attach(dir: &std::path::Path, report: bool) -> anyhow::Result<Option<Found>> {
    for entry in discovery::live(dir, discovery::now_secs())? {
        let token_dir = entry.token_file.parent().unwrap_or(&entry.token_file);
        let token = match crate::auth::read_admin_token(token_dir) {
            Ok(Some(token)) => token,
            Ok(None) | Err(_) if !report => continue,
            Ok(None) => {
                tracing::warn!(
                    node = %entry.node_id,
                    file = %entry.token_file.display(),
                    "a running node's token file is missing or empty; trying the next node"
                );
                continue;
            }
            Err(error) => {
                tracing::warn!(
                    node = %entry.node_id,
                    %error,
                    "a running node's token file cannot be read; trying the next node"
                );
                continue;
            }
        };
        match crate::mcp::stdio::Bridge::connect(entry.http, &token).await {
            Ok(bridge) => {
                tracing::info!(node = %entry.node_id, http = %entry.http, "bridging stdio to a running node");
                return Ok(Some(Found::Bridge {
                    bridge: Box::new(bridge),
                    embedded: entry.embedded,
                }));
            }
            Err(error @ crate::mcp::stdio::BridgeError::Refused { .. }) => {
                // The node is there and said no to this client: trying another, or starting a
                // node on a data directory it holds, would not help.
                return Err(anyhow::anyhow!(
                    "node {} refused this stdio client: {error}",
                    entry.node_id
                ));
            }
            Err(error) if report => {
                tracing::warn!(node = %entry.node_id, %error, "a running node cannot be reached; trying the next node");
            }
            Err(_) => {}
        }
    }
    Ok(None)
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
    let entries = discovery::live(&dir, discovery::now_secs())?;
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&entries)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    if entries.is_empty() {
        outln!("no running node found in {}", dir.display())?;
        return Ok(ExitCode::SUCCESS);
    }
    outln!(
        "{:<24} {:>8}  {:<10} {:<22} {:<28} TOKEN FILE",
        "NODE",
        "PID",
        "RUN BY",
        "HTTP",
        "STARTED"
    )?;
    for entry in entries {
        outln!(
            "{:<24} {:>8}  {:<10} {:<22} {:<28} {}",
            entry.node_id,
            entry.pid,
            if entry.embedded { "mcp" } else { "node" },
            entry.http,
            entry.started_at,
            entry.token_file.display()
        )?;
    }
    Ok(ExitCode::SUCCESS)
}
