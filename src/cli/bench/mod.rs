//! `troupe bench …`: scenarios that measure a node end to end against a baseline run in the same
//! process on the same machine, so the figures compare like with like. Each scenario starts its
//! own embedded node(s) on loopback in a temporary data directory and cleans up after itself.

mod cluster;
mod detection;
mod events;
mod gateway;
mod sessions;

use std::process::ExitCode;
use std::time::Duration;

/// `troupe bench` scenarios.
#[derive(Debug, clap::Subcommand)]
pub(super) enum BenchCommand {
    /// Sessions per second end to end with `true`, a deep queue accepted and drained, and the
    /// memory a queued session costs.
    Sessions(sessions::SessionsArgs),
    /// The gateway's added latency against calling the (fake) provider directly, whole answers
    /// and streams, at fixed request rates.
    Gateway(gateway::GatewayArgs),
    /// Event delivery over SSE and WebSocket against the in-process bus.
    Events(events::EventsArgs),
    /// Clusters of two and five nodes on loopback: relay latency and throughput, failure
    /// detection over repeated kill -9, false node.down events in a steady run.
    Cluster(cluster::ClusterArgs),
}

/// Runs one scenario.
pub(super) async fn run(command: BenchCommand) -> anyhow::Result<ExitCode> {
    crate::tls::install_default_provider();
    match command {
        BenchCommand::Sessions(args) => sessions::run(args).await,
        BenchCommand::Gateway(args) => gateway::run(args).await,
        BenchCommand::Events(args) => events::run(args).await,
        BenchCommand::Cluster(args) => cluster::run(args).await,
    }
}

/// Resident set size of this process, in bytes (Linux `/proc/self/status`).
fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// `count` per `elapsed`, per second.
fn rate(count: u64, elapsed: Duration) -> f64 {
    count as f64 / elapsed.as_secs_f64().max(f64::EPSILON)
}

/// A progress line on stderr: a bar on a terminal, a line per update otherwise.
struct Progress {
    bar: indicatif::ProgressBar,
}

impl Progress {
    fn new(what: &str, total: u64) -> Self {
        let bar = if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            indicatif::ProgressBar::new(total)
        } else {
            indicatif::ProgressBar::hidden()
        };
        bar.set_style(
            indicatif::ProgressStyle::with_template("{msg:>12} [{bar:30}] {pos}/{len} {elapsed}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar.set_message(what.to_owned());
        if bar.is_hidden() {
            eprintln!("{what}: 0/{total}");
        }
        Self { bar }
    }

    fn set(&self, position: u64) {
        self.bar.set_position(position);
    }

    fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
