//! `troupe cluster`: make the cluster CA and node certificates (local files, no node needed).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use time::OffsetDateTime;
use troupe_actors::ids::NodeId;

use super::out::{out, outln};
use crate::cluster::certs;
use crate::config::{Config, Overrides};

/// `troupe cluster` subcommands.
#[derive(Debug, clap::Subcommand)]
pub(super) enum ClusterCommand {
    /// Make a new cluster CA and this node's certificate in <data_dir>/cluster/.
    Init(InitArgs),
    /// Issue a certificate for node NAME from the CA in this node's data dir: writes ca.pem
    /// (the CA certificate only), node.pem and node.key into --out.
    Issue(IssueArgs),
    /// Show the cluster members a node knows (GET /v1/cluster/members).
    Members(MembersArgs),
}

/// `troupe cluster members` options.
#[derive(Debug, clap::Args)]
pub(super) struct MembersArgs {
    #[command(flatten)]
    client: super::client::ClientArgs,
    /// Print the JSON answer.
    #[arg(long)]
    json: bool,
}

/// Which node's configuration to read (for its data dir and node id).
#[derive(Debug, clap::Args)]
pub(super) struct LocalArgs {
    /// TOML configuration file.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Data directory (data_dir).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Node id (node_id).
    #[arg(long)]
    node_id: Option<String>,
}

impl LocalArgs {
    fn load(&self) -> anyhow::Result<Config> {
        let overrides = Overrides {
            data_dir: self.data_dir.clone(),
            node_id: self.node_id.clone(),
            ..Overrides::default()
        };
        Ok(Config::load(self.config.as_deref(), &overrides)?)
    }
}

/// `troupe cluster init` options.
#[derive(Debug, clap::Args)]
pub(super) struct InitArgs {
    #[command(flatten)]
    local: LocalArgs,
}

/// `troupe cluster issue` options.
#[derive(Debug, clap::Args)]
pub(super) struct IssueArgs {
    /// The node id the certificate is for.
    name: String,
    /// Where to write ca.pem, node.pem and node.key (default: ./NAME). Give the new node's
    /// <data_dir>/cluster to need no cluster paths in its configuration.
    #[arg(long)]
    out: Option<PathBuf>,
    #[command(flatten)]
    local: LocalArgs,
}

pub(super) async fn run(command: ClusterCommand) -> anyhow::Result<ExitCode> {
    match command {
        ClusterCommand::Init(args) => {
            let config = args.local.load()?;
            let node = config.resolved_node_id();
            let dir = config.resolved_data_dir().join("cluster");
            let files = certs::init(&dir, &node, OffsetDateTime::now_utc())
                .context("cannot make the cluster CA")?;
            outln!(
                "cluster CA and a certificate for node {node} written to {}\n  \
                 CA:   {} (key {}; keep it private)\n  node: {}, {}\n\
                 issue other nodes' certificates with: troupe cluster issue NAME --out DIR \
                 --data-dir {}",
                dir.display(),
                files.ca.display(),
                dir.join(certs::CA_KEY_FILE).display(),
                files.cert.display(),
                files.key.display(),
                config.resolved_data_dir().display(),
            )?;
        }
        ClusterCommand::Issue(args) => {
            let config = args.local.load()?;
            let node = NodeId::new(&args.name)
                .map_err(|error| anyhow::anyhow!("NAME {:?}: {error}", args.name))?;
            let out = args.out.unwrap_or_else(|| PathBuf::from(&args.name));
            let ca_dir = config.resolved_data_dir().join("cluster");
            let files = certs::issue(&ca_dir, &node, &out, OffsetDateTime::now_utc())
                .with_context(|| format!("cannot issue a certificate for node {node}"))?;
            outln!(
                "certificate for node {node} written to {}: {}, {}, {}\n\
                 copy the directory to the node's <data_dir>/cluster/",
                out.display(),
                files.ca.display(),
                files.cert.display(),
                files.key.display(),
            )?;
        }
        ClusterCommand::Members(args) => {
            let client = super::client::NodeClient::new(&args.client)?;
            let response = client.fetch(client.get("/v1/cluster/members")).await?;
            let view: serde_json::Value = super::client::check(response).await?.json().await?;
            if args.json {
                outln!("{}", serde_json::to_string_pretty(&view)?)?;
            } else {
                out!("{}", members_table(&view))?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The member view as a table (also shown by `troupe demo`).
pub(super) fn members_table(view: &serde_json::Value) -> String {
    if view["enabled"] != true {
        return "the cluster is off on this node (see cluster.enabled, --cluster-listen)\n".into();
    }
    let text = |value: &serde_json::Value| match value {
        serde_json::Value::String(text) => text.clone(),
        serde_json::Value::Null => "-".into(),
        other => other.to_string(),
    };
    let mut out = format!(
        "this node: {} at {}\n{:<20} {:<8} {:<22} {:<22} {}\n",
        text(&view["self"]["node"]),
        text(&view["self"]["addr"]),
        "NODE",
        "STATE",
        "CLUSTER ADDR",
        "HTTP",
        "LOAD (running/queued/max)"
    );
    for member in view["members"].as_array().into_iter().flatten() {
        let meta = &member["meta"];
        let load = &meta["load"];
        let load = if load.is_null() {
            "-".to_owned()
        } else {
            format!(
                "{}/{}/{}",
                load["running"], load["queued"], load["max_concurrent"]
            )
        };
        out.push_str(&format!(
            "{:<20} {:<8} {:<22} {:<22} {}\n",
            text(&member["node"]),
            text(&member["state"]),
            text(&member["addr"]),
            text(&meta["http"]),
            load
        ));
    }
    out
}
