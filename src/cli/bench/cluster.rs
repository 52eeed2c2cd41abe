//! `troupe bench cluster`: clusters of two and five nodes on loopback (mutual TLS, certificates
//! made in a scratch directory). Four scenarios, `--only` picks some:
//!
//! - `latency`: node a publishes at a steady rate; a subscriber on every other node receives
//!   through the relay; publish → delivery latency (in-process nodes, `fast` profile).
//! - `throughput`: a burst published on a as fast as it goes; relayed events per second until the
//!   last one arrives on every other node. Only events that arrived count; the rest is reported
//!   as lost.
//! - `detection`: one node runs as a child process and is killed with SIGKILL (no leave, nothing
//!   sent: the kernel closes its sockets), `--kills` times per profile; time from the kill to
//!   `node.down` on each other node (in-process). See [`super::detection`].
//! - `steady`: every node publishes at a steady rate for `--steady-secs`; every `node.down` is a
//!   false one, since no node stops.
//!
//! Each prints its figures next to the design's targets.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use troupe_actors::event::{
    Delivery, EventData, EventFilter, EventKind, KindPattern, OutputStream, ReplayFrom,
    SessionOutput, Subscription,
};
use troupe_actors::ids::Timestamp;

use super::detection;
use crate::cli::loopback::{Scratch, make_certificates, node_config};
use crate::cli::out::outln;
use crate::config::ClusterProfile;
use crate::node::{Node, NodeHandle};

/// Node names, in start order (the first is the seed).
pub(super) const NAMES: [&str; 8] = ["a", "b", "c", "d", "e", "f", "g", "h"];
/// Bound of waits for membership (joins) in every scenario.
pub(super) const JOIN_WAIT: Duration = Duration::from_secs(60);

/// `troupe bench cluster` options.
#[derive(Debug, clap::Args)]
pub(crate) struct ClusterArgs {
    /// Cluster sizes, comma-separated (2 to 8 nodes each).
    #[arg(long, value_delimiter = ',', default_value = "2,5", value_parser = parse_size)]
    nodes: Vec<usize>,
    /// Run only these scenarios (comma-separated; default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Scenario>,
    /// Events per second of the latency run.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    rate: u32,
    /// Seconds of the latency run.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=3600))]
    secs: u32,
    /// How the latency run spaces its events: `ticks` publishes the events of each millisecond
    /// together (the runtime's timer resolution); `even` publishes each at its own instant (one
    /// every 100 µs at 10,000 events/s), from a thread of its own.
    #[arg(long, value_enum, default_value = "ticks")]
    pacing: Pacing,
    /// Events of the throughput run.
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    burst: u32,
    /// Kills per profile in the detection run.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub(super) kills: u32,
    /// Membership profiles of the detection run (comma-separated).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "fast,lan")]
    profiles: Vec<Profile>,
    /// Seconds of the steady run (false `node.down` events).
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub(super) steady_secs: u64,
    /// Events per second each node publishes during the steady run.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub(super) steady_rate: u32,
}

/// How the latency run spaces its events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Pacing {
    /// The events of each millisecond together.
    Ticks,
    /// Each event at its own instant.
    Even,
}

/// A scenario of `troupe bench cluster`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Scenario {
    /// Relay latency at a steady rate.
    Latency,
    /// Largest relayed rate.
    Throughput,
    /// Failure detection over repeated kills.
    Detection,
    /// False `node.down` events during a steady run.
    Steady,
}

/// A membership profile (cluster.profile).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(super) enum Profile {
    /// probe 300 ms, suspect to down 900 ms.
    Fast,
    /// foca's LAN defaults.
    Lan,
}

impl Profile {
    pub(super) fn config(self) -> ClusterProfile {
        match self {
            Profile::Fast => ClusterProfile::Fast,
            Profile::Lan => ClusterProfile::Lan,
        }
    }

    pub(super) fn name(self) -> &'static str {
        match self {
            Profile::Fast => "fast",
            Profile::Lan => "lan",
        }
    }
}

fn parse_size(text: &str) -> Result<usize, String> {
    let size: usize = text
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a number of nodes"))?;
    if !(2..=NAMES.len()).contains(&size) {
        return Err(format!("{size} nodes: use 2 to {}", NAMES.len()));
    }
    Ok(size)
}

pub(super) async fn run(args: ClusterArgs) -> anyhow::Result<ExitCode> {
    let scratch = Scratch::create("troupe-bench-cluster")?;
    let signal = crate::cli::node::shutdown_signal()?;
    // On Ctrl-C the scenario is dropped: its in-process nodes stop, its child node is killed,
    // and the scratch directory is removed.
    tokio::select! {
        outcome = scenarios(&args, &scratch) => outcome,
        () = signal => {
            eprintln!("interrupted; removing {}", scratch.path().display());
            Ok(ExitCode::from(130))
        }
    }
}

async fn scenarios(args: &ClusterArgs, scratch: &Scratch) -> anyhow::Result<ExitCode> {
    let wants = |scenario| args.only.is_empty() || args.only.contains(&scenario);
    for &size in &args.nodes {
        if wants(Scenario::Latency) || wants(Scenario::Throughput) {
            let root = scratch.path().join(format!("relay-{size}"));
            relay(
                args,
                size,
                &root,
                wants(Scenario::Latency),
                wants(Scenario::Throughput),
            )
            .await
            .with_context(|| format!("relay, {size} nodes"))?;
        }
        if wants(Scenario::Detection) {
            for &profile in &args.profiles {
                let root = scratch
                    .path()
                    .join(format!("detection-{size}-{}", profile.name()));
                detection::detection(args, size, profile, &root)
                    .await
                    .with_context(|| format!("detection, {size} nodes, {}", profile.name()))?;
            }
        }
        if wants(Scenario::Steady) {
            let root = scratch.path().join(format!("steady-{size}"));
            detection::steady(args, size, &root)
                .await
                .with_context(|| format!("steady run, {size} nodes"))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Starts `names` in this process (the first is the seed; the others join it) with `profile`,
/// and waits until each has seen every other join.
pub(super) async fn start_cluster(
    root: &Path,
    names: &[&str],
    profile: ClusterProfile,
) -> anyhow::Result<Vec<NodeHandle>> {
    let mut nodes: Vec<NodeHandle> = Vec::new();
    for name in names {
        let seeds = nodes.first().and_then(NodeHandle::cluster_addr);
        let mut config = node_config(root, name, seeds.into_iter().collect(), profile)?;
        config.events.subscriber_buffer = 1 << 18;
        config.events.ring_capacity = 200_000;
        let node = Node::builder()
            .config(config)
            .without_http()
            .start()
            .await
            .with_context(|| format!("node {name} did not start"))?;
        nodes.push(node);
    }
    for node in &nodes {
        let others: Vec<&str> = names
            .iter()
            .copied()
            .filter(|name| *name != node.node_id().as_str())
            .collect();
        wait_joined(node, &others).await?;
    }
    Ok(nodes)
}

/// A filter for `node.*` events that `node` published itself (its own view, not relayed ones).
pub(super) fn own_membership(node: &NodeHandle) -> EventFilter {
    EventFilter {
        kinds: vec![KindPattern::Family("node".into())],
        nodes: vec![node.node_id().clone()],
        ..EventFilter::default()
    }
}

/// Waits until `node` has seen `node.joined` of each of `others` (from its ring, then live).
async fn wait_joined(node: &NodeHandle, others: &[&str]) -> anyhow::Result<()> {
    let (mut live, replay) = node
        .subscribe_from(ReplayFrom::Tail(10_000), own_membership(node))
        .await
        .map_err(|error| anyhow::anyhow!("cannot subscribe to node {}: {error}", node.node_id()))?;
    let mut missing: BTreeSet<&str> = others.iter().copied().collect();
    let note = |missing: &mut BTreeSet<&str>, data: &EventData| {
        if let EventData::NodeJoined(member) = data {
            missing.remove(member.node.as_str());
        }
    };
    for event in &replay.events {
        note(&mut missing, &event.data);
    }
    let deadline = tokio::time::Instant::now() + JOIN_WAIT;
    while !missing.is_empty() {
        match tokio::time::timeout_at(deadline, live.recv()).await {
            Ok(Some(Delivery::Event(event))) => note(&mut missing, &event.data),
            Ok(Some(Delivery::Lagged(_))) => {}
            Ok(None) => anyhow::bail!("node {} stopped", node.node_id()),
            Err(_) => anyhow::bail!(
                "node {} did not see {missing:?} join within {}s",
                node.node_id(),
                JOIN_WAIT.as_secs()
            ),
        }
    }
    Ok(())
}

/// A `session.output` event carrying line number `line` (the bench's marker).
pub(super) fn output(line: u64) -> EventData {
    EventData::SessionOutput(SessionOutput {
        stream: OutputStream::Stdout,
        first_line: line,
        lines: vec![format!("bench line {line}")],
        skipped: 0,
    })
}

/// The value at quantile `p` of sorted values.
pub(super) fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

/// Microseconds as text with a fitting unit.
pub(super) fn micros(value: u64) -> String {
    if value < 1_000 {
        format!("{value} µs")
    } else if value < 1_000_000 {
        format!("{:.2} ms", value as f64 / 1e3)
    } else {
        format!("{:.2} s", value as f64 / 1e6)
    }
}

/// What one receiver got of a run.
#[derive(Default)]
struct Received {
    /// Latency of each arrived event, µs.
    latencies: Vec<u64>,
    /// Events that arrived.
    arrived: u64,
    /// Events the subscription reported lost (its buffer overflowed).
    lagged: u64,
    /// When the last one arrived.
    last: Option<Instant>,
}

/// Receives `expected` marker events with line numbers from `first` on (earlier ones, left from
/// the warm-up, are ignored), or until nothing came for `idle`.
async fn receive(
    mut events: Subscription,
    first: u64,
    expected: u64,
    idle: Duration,
    keep_latencies: bool,
) -> (Subscription, Received) {
    let mut got = Received::default();
    while got.arrived < expected {
        match tokio::time::timeout(idle, events.recv()).await {
            Ok(Some(Delivery::Event(event))) => {
                let EventData::SessionOutput(output) = &event.data else {
                    continue;
                };
                if output.first_line < first {
                    continue;
                }
                let now = Timestamp::now().as_micros();
                got.arrived += 1;
                got.last = Some(Instant::now());
                if keep_latencies {
                    got.latencies.push(now.saturating_sub(event.at.as_micros()));
                }
            }
            Ok(Some(Delivery::Lagged(missed))) => got.lagged += missed.missed,
            Ok(None) | Err(_) => break,
        }
    }
    (events, got)
}

/// Relay latency and throughput with `size` in-process nodes: a publishes, the others receive.
async fn relay(
    args: &ClusterArgs,
    size: usize,
    root: &Path,
    latency: bool,
    throughput: bool,
) -> anyhow::Result<()> {
    let names = &NAMES[..size];
    make_certificates(root, names)?;
    let nodes = start_cluster(root, names, ClusterProfile::Fast).await?;
    let outcome = measure_relay(args, &nodes, latency, throughput).await;
    for node in nodes.iter().rev() {
        node.shutdown().await;
    }
    outcome
}

async fn measure_relay(
    args: &ClusterArgs,
    nodes: &[NodeHandle],
    latency: bool,
    throughput: bool,
) -> anyhow::Result<()> {
    let a = &nodes[0];
    let receivers = &nodes[1..];
    let receiver_names: Vec<String> = receivers.iter().map(|n| n.node_id().to_string()).collect();
    outln!(
        "cluster relay, {} nodes in this process (fast profile, mutual TLS on loopback): a \
         publishes, {} {} through the relay",
        nodes.len(),
        receiver_names.join(", "),
        if receivers.len() == 1 {
            "receives"
        } else {
            "receive"
        }
    )?;
    let filter = EventFilter {
        kinds: vec![KindPattern::Exact(EventKind::SessionOutput)],
        nodes: vec![a.node_id().clone()],
        ..EventFilter::default()
    };
    let mut subscriptions: Vec<Subscription> = receivers
        .iter()
        .map(|node| node.subscribe(filter.clone()))
        .collect();

    // Warm-up: until a's events arrive on every receiver (membership and relay links up).
    let mut line = 0u64;
    for (events, name) in subscriptions.iter_mut().zip(&receiver_names) {
        let ready = tokio::time::timeout(JOIN_WAIT, async {
            loop {
                line += 1;
                a.events().publish(None, output(line));
                if let Ok(Some(_)) =
                    tokio::time::timeout(Duration::from_millis(200), events.recv()).await
                {
                    return;
                }
            }
        })
        .await;
        ready.map_err(|_| {
            anyhow::anyhow!(
                "node a's events did not reach node {name} within {}s",
                JOIN_WAIT.as_secs()
            )
        })?;
    }

    if latency {
        let total = u64::from(args.rate) * u64::from(args.secs);
        let first = line + 1;
        line += total;
        let collectors: Vec<_> = subscriptions
            .drain(..)
            .map(|events| {
                tokio::spawn(receive(events, first, total, Duration::from_secs(10), true))
            })
            .collect();
        match args.pacing {
            Pacing::Ticks => {
                let per_tick = (u64::from(args.rate) / 1000).max(1);
                let period =
                    Duration::from_micros((1_000_000 * per_tick / u64::from(args.rate)).max(1));
                let mut ticks = tokio::time::interval(period);
                ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                let mut sent = 0u64;
                while sent < total {
                    ticks.tick().await;
                    for _ in 0..per_tick.min(total - sent) {
                        a.events().publish(None, output(first + sent));
                        sent += 1;
                    }
                }
            }
            Pacing::Even => {
                // The runtime's timer ticks in milliseconds: a thread sleeps until each instant.
                let (events, rate) = (a.events().clone(), u64::from(args.rate));
                tokio::task::spawn_blocking(move || {
                    let start = Instant::now();
                    for n in 0..total {
                        let due = start + Duration::from_nanos(n * 1_000_000_000 / rate);
                        let now = Instant::now();
                        if due > now {
                            std::thread::sleep(due - now);
                        }
                        events.publish(None, output(first + n));
                    }
                })
                .await?;
            }
        }
        let mut all = Vec::new();
        let mut worst_p99 = 0;
        let mut arrived = 0;
        let mut lagged = 0;
        for collector in collectors {
            let (events, mut got) = collector.await?;
            subscriptions.push(events);
            got.latencies.sort_unstable();
            worst_p99 = worst_p99.max(percentile(&got.latencies, 0.99));
            arrived += got.arrived;
            lagged += got.lagged;
            all.extend(got.latencies);
        }
        all.sort_unstable();
        let expected = total * receivers.len() as u64;
        let (p50, p99) = (percentile(&all, 0.50), percentile(&all, 0.99));
        let verdict = if args.rate == 10_000 {
            if p50 < 150 && p99 < 1_000 && arrived == expected {
                "met"
            } else {
                "not met"
            }
        } else {
            "(the target is set at 10,000 events/s)"
        };
        outln!(
            "  latency at {} events/s for {} s ({}): {arrived} of {expected} deliveries \
             arrived{}; p50 {}, p99 {}, max {}; worst receiver's p99 {}\n  \
             target p50 < 150 µs, p99 < 1 ms at 10,000 events/s: {verdict}",
            args.rate,
            args.secs,
            match args.pacing {
                Pacing::Ticks => "the events of each millisecond together",
                Pacing::Even => "evenly spaced",
            },
            loss(expected, arrived, lagged),
            micros(p50),
            micros(p99),
            micros(all.last().copied().unwrap_or(0)),
            micros(worst_p99),
        )?;
    }

    if throughput {
        let burst = u64::from(args.burst);
        let first = line + 1;
        let collectors: Vec<_> = subscriptions
            .drain(..)
            .map(|events| {
                tokio::spawn(receive(
                    events,
                    first,
                    burst,
                    Duration::from_secs(20),
                    false,
                ))
            })
            .collect();
        let start = Instant::now();
        for offset in 0..burst {
            a.events().publish(None, output(first + offset));
            if offset % 1024 == 0 {
                tokio::task::yield_now().await;
            }
        }
        let published = start.elapsed();
        let mut slowest = Duration::ZERO;
        let mut arrived = 0;
        let mut lagged = 0;
        let mut least = u64::MAX;
        for collector in collectors {
            let (_, got) = collector.await?;
            arrived += got.arrived;
            lagged += got.lagged;
            least = least.min(got.arrived);
            if let Some(last) = got.last {
                slowest = slowest.max(last - start);
            }
        }
        let expected = burst * receivers.len() as u64;
        let secs = slowest.as_secs_f64().max(f64::EPSILON);
        outln!(
            "  throughput, a burst of {burst} published in {:.3} s: {arrived} of {expected} \
             deliveries arrived{}; the last after {:.3} s: {:.0} events/s relayed to each \
             receiver (the one that got fewest: {least}), {:.0} deliveries/s in all",
            published.as_secs_f64(),
            loss(expected, arrived, lagged),
            secs,
            least as f64 / secs,
            arrived as f64 / secs,
        )?;
    }
    Ok(())
}

/// `" (N lost: …)"` when not everything arrived.
fn loss(expected: u64, arrived: u64, lagged: u64) -> String {
    if arrived >= expected {
        return String::new();
    }
    let lost = expected - arrived;
    format!(
        " ({lost} lost: {} dropped by the bench's subscribers falling behind, {} never arrived)",
        lagged.min(lost),
        lost - lagged.min(lost)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Wrapper {
        #[command(flatten)]
        args: ClusterArgs,
    }

    #[test]
    fn sizes_scenarios_and_limits_are_checked() {
        let args = Wrapper::parse_from(["x"]).args;
        assert_eq!(args.nodes, vec![2, 5]);
        assert!(args.only.is_empty());
        assert_eq!(args.profiles, vec![Profile::Fast, Profile::Lan]);
        assert_eq!((args.kills, args.steady_secs), (20, 300));
        let args = Wrapper::parse_from(["x", "--nodes", "3", "--only", "detection,steady"]).args;
        assert_eq!(args.nodes, vec![3]);
        assert_eq!(args.only, vec![Scenario::Detection, Scenario::Steady]);
        for bad in [
            ["x", "--nodes", "1"],
            ["x", "--nodes", "9"],
            ["x", "--only", "speed"],
            ["x", "--kills", "0"],
            ["x", "--rate", "0"],
        ] {
            assert!(Wrapper::try_parse_from(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn percentiles_units_and_losses() {
        let values: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&values, 0.5), 51);
        assert_eq!(percentile(&values, 0.99), 99);
        assert_eq!(percentile(&[], 0.5), 0);
        assert_eq!(micros(999), "999 µs");
        assert_eq!(micros(1_500), "1.50 ms");
        assert_eq!(micros(2_500_000), "2.50 s");
        assert_eq!(loss(10, 10, 0), "");
        assert_eq!(
            loss(10, 6, 3),
            " (4 lost: 3 dropped by the bench's subscribers falling behind, 1 never arrived)"
        );
    }
}
