//! `troupe bench …`: scenarios that measure nodes started in this process on loopback, in a
//! temporary data directory they clean up after themselves.

mod cluster;

use std::process::ExitCode;

/// `troupe bench` scenarios.
#[derive(Debug, clap::Subcommand)]
pub(super) enum BenchCommand {
    /// Event relay between two nodes on loopback: latency at a steady rate, and throughput.
    Cluster(cluster::ClusterArgs),
}

/// Runs one scenario.
pub(super) async fn run(command: BenchCommand) -> anyhow::Result<ExitCode> {
    crate::tls::install_default_provider();
    match command {
        BenchCommand::Cluster(args) => cluster::run(args).await,
    }
}
