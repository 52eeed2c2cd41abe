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
    /// Run an embedded node even when discovery finds a running one.
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
        if let Some(entry) = discovery::live(&dir, discovery::now_secs())
            .into_iter()
            .next()
        {
            let token = crate::auth::read_admin_token(
                entry.token_file.parent().unwrap_or(&entry.token_file),
            )
            .with_context(|| {
                format!(
                    "node {} is running, but its token file {} cannot be read",
                    entry.node_id,
                    entry.token_file.display()
                )
            })?;
            tracing::info!(node = %entry.node_id, http = %entry.http, "bridging stdio to a running node");
            crate::mcp::stdio::bridge(entry.http, &token).await?;
            return Ok(ExitCode::SUCCESS);
        }
        tracing::info!(dir = %dir.display(), "no running node found; starting an embedded one");
    }

    let signal = super::node::shutdown_signal()?;
    let node = Node::builder()
        .config(config)
        .without_http()
        .start()
        .await
        .context("cannot start the embedded node")?;
    tracing::info!(node = %node.node_id(), "serving MCP on stdio with an embedded node");
    tokio::select! {
        () = crate::mcp::stdio::serve_embedded(node.core().clone()) => {}
        () = signal => {}
        () = node.wait() => tracing::error!("the embedded node's root supervisor gave up"),
    }
    node.shutdown().await;
    Ok(ExitCode::SUCCESS)
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
