//! `troupe cluster`: make the cluster CA and node certificates (local files, no node needed).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use time::OffsetDateTime;
use troupe_actors::ids::NodeId;

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
            println!(
                "cluster CA and a certificate for node {node} written to {}\n  \
                 CA:   {} (key {}; keep it private)\n  node: {}, {}\n\
                 issue other nodes' certificates with: troupe cluster issue NAME --out DIR",
                dir.display(),
                files.ca.display(),
                dir.join(certs::CA_KEY_FILE).display(),
                files.cert.display(),
                files.key.display(),
            );
        }
        ClusterCommand::Issue(args) => {
            let config = args.local.load()?;
            let node = NodeId::new(&args.name)
                .map_err(|error| anyhow::anyhow!("NAME {:?}: {error}", args.name))?;
            let out = args.out.unwrap_or_else(|| PathBuf::from(&args.name));
            let ca_dir = config.resolved_data_dir().join("cluster");
            let files = certs::issue(&ca_dir, &node, &out, OffsetDateTime::now_utc())
                .with_context(|| format!("cannot issue a certificate for node {node}"))?;
            println!(
                "certificate for node {node} written to {}: {}, {}, {}\n\
                 copy the directory to the node's <data_dir>/cluster/",
                out.display(),
                files.ca.display(),
                files.cert.display(),
                files.key.display(),
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
