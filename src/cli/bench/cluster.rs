//! `troupe bench cluster`: two nodes in this process on loopback (fast profile, certificates made
//! in a scratch directory); events published on node a, received by a subscriber on node b
//! through the relay. Reports relay latency (publish on a → delivery on b) at a steady rate, and
//! the largest relayed rate when a publishes as fast as it can.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use time::OffsetDateTime;
use troupe_actors::event::{
    Delivery, EventData, EventFilter, EventKind, KindPattern, OutputStream, SessionOutput,
};
use troupe_actors::ids::{NodeId, Timestamp};

use crate::cluster::certs;
use crate::config::{ClusterProfile, Config};
use crate::node::{Node, NodeHandle};

/// `troupe bench cluster` options.
#[derive(Debug, clap::Args)]
pub(crate) struct ClusterArgs {
    /// Events per second of the latency run.
    #[arg(long, default_value_t = 10_000)]
    rate: u32,
    /// Seconds of the latency run.
    #[arg(long, default_value_t = 5)]
    secs: u32,
    /// Events of the throughput run.
    #[arg(long, default_value_t = 100_000)]
    burst: u32,
}

/// A scratch directory removed on drop.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn node_config(
    root: &Path,
    name: &str,
    seeds: Vec<std::net::SocketAddr>,
) -> anyhow::Result<Config> {
    let mut config = Config {
        node_id: Some(NodeId::new(name)?),
        data_dir: Some(root.join(name)),
        ..Config::default()
    };
    config.cluster.enabled = true;
    config.cluster.listen = "127.0.0.1:0".parse()?;
    config.cluster.profile = ClusterProfile::Fast;
    config.cluster.seeds = seeds;
    config.events.subscriber_buffer = 1 << 20;
    config.events.ring_capacity = 200_000;
    config.log.level = "warn".into();
    Ok(config)
}

fn output(line: u64) -> EventData {
    EventData::SessionOutput(SessionOutput {
        stream: OutputStream::Stdout,
        first_line: line,
        lines: vec![format!("bench line {line}")],
        skipped: 0,
    })
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

pub(super) async fn run(args: ClusterArgs) -> anyhow::Result<ExitCode> {
    let root = std::env::temp_dir().join(format!(
        "troupe-bench-{}-{}",
        std::process::id(),
        fastrand::u32(..)
    ));
    let scratch = Scratch(root.clone());
    let now = OffsetDateTime::now_utc();
    certs::init(&root.join("a/cluster"), &NodeId::new("a")?, now).context("certificates")?;
    certs::issue(
        &root.join("a/cluster"),
        &NodeId::new("b")?,
        &root.join("b/cluster"),
        now,
    )
    .context("certificates")?;
    let a = Node::builder()
        .config(node_config(&root, "a", Vec::new())?)
        .without_http()
        .start()
        .await?;
    let a_addr = a.cluster_addr().context("node a has no cluster address")?;
    let b = Node::builder()
        .config(node_config(&root, "b", vec![a_addr])?)
        .without_http()
        .start()
        .await?;
    let outcome = measure(&a, &b, &args).await;
    b.shutdown().await;
    a.shutdown().await;
    drop(scratch);
    outcome?;
    Ok(ExitCode::SUCCESS)
}

async fn measure(a: &NodeHandle, b: &NodeHandle, args: &ClusterArgs) -> anyhow::Result<()> {
    let filter = EventFilter {
        kinds: vec![KindPattern::Exact(EventKind::SessionOutput)],
        nodes: vec![a.node_id().clone()],
        ..EventFilter::default()
    };
    let mut received = b.subscribe(filter);
    // Warm up: until a's events arrive on b (membership and relay link up).
    let mut line = 0u64;
    let ready = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            line += 1;
            a.events().publish(None, output(line));
            if let Ok(Some(_)) =
                tokio::time::timeout(Duration::from_millis(200), received.recv()).await
            {
                return;
            }
        }
    })
    .await;
    ready.map_err(|_| anyhow::anyhow!("node a's events did not reach node b within 30 s"))?;
    while received.try_recv().is_some() {}

    // Latency at a steady rate: publish in 1 ms ticks.
    let total = u64::from(args.rate) * u64::from(args.secs);
    let per_tick = (u64::from(args.rate) / 1000).max(1);
    let first = line + 1;
    let publisher = {
        let a = a.clone();
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(Duration::from_millis(1));
            let mut sent = 0u64;
            while sent < total {
                ticks.tick().await;
                for _ in 0..per_tick.min(total - sent) {
                    sent += 1;
                    a.events().publish(None, output(first + sent));
                }
            }
        })
    };
    let mut latencies = Vec::with_capacity(total as usize);
    let mut lagged = 0u64;
    while (latencies.len() as u64) < total {
        match tokio::time::timeout(Duration::from_secs(10), received.recv()).await {
            Ok(Some(Delivery::Event(event))) => {
                let now = Timestamp::now().as_micros();
                latencies.push(now.saturating_sub(event.at.as_micros()));
            }
            Ok(Some(Delivery::Lagged(missed))) => lagged += missed.missed,
            _ => break,
        }
    }
    publisher.await?;
    latencies.sort_unstable();
    println!(
        "relay latency a → b at {} events/s for {} s: {} received, p50 {} µs, p99 {} µs, max {} µs{}",
        args.rate,
        args.secs,
        latencies.len(),
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.99),
        latencies.last().copied().unwrap_or(0),
        if lagged > 0 {
            format!(" ({lagged} lost by the bench subscriber)")
        } else {
            String::new()
        }
    );

    // Throughput: publish a burst as fast as possible, time until the last arrives on b.
    while received.try_recv().is_some() {}
    let burst = u64::from(args.burst);
    let start = Instant::now();
    let base = first + total + 1;
    for offset in 0..burst {
        a.events().publish(None, output(base + offset));
        if offset % 1024 == 0 {
            tokio::task::yield_now().await;
        }
    }
    let published = start.elapsed();
    let mut got = 0u64;
    while got < burst {
        match tokio::time::timeout(Duration::from_secs(20), received.recv()).await {
            Ok(Some(Delivery::Event(_))) => got += 1,
            Ok(Some(Delivery::Lagged(missed))) => got += missed.missed,
            _ => break,
        }
    }
    let elapsed = start.elapsed();
    println!(
        "relay throughput a → b: {got} of {burst} events in {:.3} s ({:.0} events/s; publishing took {:.3} s)",
        elapsed.as_secs_f64(),
        got as f64 / elapsed.as_secs_f64(),
        published.as_secs_f64()
    );
    Ok(())
}
