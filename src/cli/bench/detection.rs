//! Failure detection for `troupe bench cluster` (see [`super::cluster`]):
//!
//! - `detection`: N−1 nodes run in this process; the N-th runs as a child process of this
//!   program and is killed with SIGKILL (a real abrupt stop: no leave, nothing sent, its sockets
//!   closed by the kernel), then started again with the same id, `--kills` times. Each kill is
//!   timed from just before the signal to the `node.down` event each in-process node publishes
//!   (its own detection; the event's `at` is the moment it was published, so reading it later
//!   adds nothing).
//! - `steady`: every node publishes `--steady-rate` events/s, relayed to every other node, for
//!   `--steady-secs`; no node stops, so every `node.down` (and `node.suspected`) is false.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use troupe_actors::event::{
    Delivery, EventData, EventFilter, EventKind, KindPattern, Subscription,
};
use troupe_actors::ids::{NodeId, Timestamp};

use super::Progress;
use super::cluster::{
    ClusterArgs, JOIN_WAIT, NAMES, Profile, micros, output, own_membership, percentile,
    start_cluster,
};
use crate::cli::loopback::{NodeChild, make_certificates, node_config};
use crate::cli::out::outln;
use crate::config::ClusterProfile;
use crate::node::NodeHandle;

/// Failure detection over repeated kills of a child-process node.
pub(super) async fn detection(
    args: &ClusterArgs,
    size: usize,
    profile: Profile,
    root: &Path,
) -> anyhow::Result<()> {
    let names = &NAMES[..size];
    let (observer_names, victim) = names.split_at(size - 1);
    make_certificates(root, names)?;
    let observers = start_cluster(root, observer_names, profile.config()).await?;
    let outcome = kills(args, profile, root, &observers, victim[0]).await;
    for node in observers.iter().rev() {
        node.shutdown().await;
    }
    outcome
}

/// What the kills measured, µs from the kill.
#[derive(Default)]
struct Detections {
    /// Every observer's `node.down`.
    downs: Vec<u64>,
    /// Per kill, the last observer's `node.down`.
    last_downs: Vec<u64>,
    /// Per kill, the first observer's `node.suspected` (when one was published).
    first_suspects: Vec<u64>,
    /// Observers that did not declare the node down in time.
    missed: u64,
}

async fn kills(
    args: &ClusterArgs,
    profile: Profile,
    root: &Path,
    observers: &[NodeHandle],
    victim: &str,
) -> anyhow::Result<()> {
    outln!(
        "failure detection, {} nodes, {} profile: node {victim} runs as a child process and is \
         killed with SIGKILL (no leave, nothing sent; the kernel closes its sockets) {} times, \
         then started again; the nodes in this process ({}) time the kill → their node.down",
        observers.len() + 1,
        profile.name(),
        args.kills,
        observers
            .iter()
            .map(|node| node.node_id().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )?;
    let seeds: Vec<_> = observers
        .iter()
        .filter_map(NodeHandle::cluster_addr)
        .collect();
    let mut watches: Vec<Subscription> = observers
        .iter()
        .map(|node| node.subscribe(own_membership(node)))
        .collect();
    let victim_id = NodeId::new(victim)?;
    // Let the membership settle after a join (every observer probes the new member) before the
    // kill, so the figure is steady-state detection; then wait a random part of a few probe
    // periods more, so the kills fall at every phase of the probe cycle, not always at the same
    // distance from the join.
    let (settle, jitter, down_wait) = match profile {
        Profile::Fast => (Duration::from_secs(1), 1_000, Duration::from_secs(60)),
        Profile::Lan => (Duration::from_secs(3), 3_000, Duration::from_secs(120)),
    };
    let mut found = Detections::default();
    let progress = Progress::new("kills", u64::from(args.kills));
    for kill in 1..=args.kills {
        let config = node_config(root, victim, seeds.clone(), profile.config())?;
        let mut child = NodeChild::start(config, false).await?;
        for (watch, observer) in watches.iter_mut().zip(observers) {
            let joined = next_about(watch, &victim_id, JOIN_WAIT, |kind| {
                kind == EventKind::NodeJoined
            })
            .await?;
            if joined.is_none() {
                bail!(
                    "kill {kill}: node {} did not see {victim} join within {}s; {victim}'s log:\n{}",
                    observer.node_id(),
                    JOIN_WAIT.as_secs(),
                    child.log_tail()
                );
            }
        }
        tokio::time::sleep(settle + Duration::from_millis(fastrand::u64(0..jitter))).await;
        for watch in &mut watches {
            while watch.try_recv().is_some() {}
        }
        let killed = Timestamp::now().as_micros();
        child.kill()?;
        let mut last = 0;
        let mut first_suspect: Option<u64> = None;
        for (watch, observer) in watches.iter_mut().zip(observers) {
            let deadline = Instant::now() + down_wait;
            loop {
                let seen = next_about(
                    watch,
                    &victim_id,
                    deadline.saturating_duration_since(Instant::now()),
                    |kind| matches!(kind, EventKind::NodeSuspected | EventKind::NodeDown),
                )
                .await?;
                let Some((kind, at)) = seen else {
                    found.missed += 1;
                    eprintln!(
                        "kill {kill}: node {} did not declare {victim} down within {}s",
                        observer.node_id(),
                        down_wait.as_secs()
                    );
                    break;
                };
                let took = at.saturating_sub(killed);
                if kind == EventKind::NodeSuspected {
                    first_suspect = Some(first_suspect.map_or(took, |first| first.min(took)));
                    continue;
                }
                found.downs.push(took);
                last = last.max(took);
                break;
            }
        }
        found.last_downs.push(last);
        found.first_suspects.extend(first_suspect);
        child.wait_exit().await?;
        progress.set(u64::from(kill));
    }
    progress.finish();
    report_detection(profile, observers.len(), &mut found)
}

/// The next `node.*` event about `node` whose kind `wanted` accepts, as (kind, at in µs);
/// `None` when none came within `timeout`.
async fn next_about(
    watch: &mut Subscription,
    node: &NodeId,
    timeout: Duration,
    wanted: impl Fn(EventKind) -> bool,
) -> anyhow::Result<Option<(EventKind, u64)>> {
    let deadline = Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, watch.recv()).await {
            Ok(Some(Delivery::Event(event))) => {
                let about = match &event.data {
                    EventData::NodeJoined(member)
                    | EventData::NodeSuspected(member)
                    | EventData::NodeDown(member)
                    | EventData::NodeLeft(member) => &member.node == node,
                    _ => false,
                };
                if about && wanted(event.kind()) {
                    return Ok(Some((event.kind(), event.at.as_micros())));
                }
            }
            Ok(Some(Delivery::Lagged(_))) => {}
            Ok(None) => bail!("an observing node stopped"),
            Err(_) => return Ok(None),
        }
    }
}

fn report_detection(
    profile: Profile,
    observers: usize,
    found: &mut Detections,
) -> anyhow::Result<()> {
    found.downs.sort_unstable();
    found.last_downs.sort_unstable();
    found.first_suspects.sort_unstable();
    let stats = |values: &[u64]| {
        format!(
            "p50 {}, max {}",
            micros(percentile(values, 0.5)),
            micros(values.last().copied().unwrap_or(0))
        )
    };
    outln!(
        "  kill → node.down on each observer: {} over {} observations ({} kills × {observers} \
         observers){}\n  kill → node.down on the last observer of each kill: {}\n  \
         kill → first node.suspected: {} ({} kills had one)",
        stats(&found.downs),
        found.downs.len(),
        found.last_downs.len(),
        if found.missed > 0 {
            format!("; {} observations timed out", found.missed)
        } else {
            String::new()
        },
        stats(&found.last_downs),
        stats(&found.first_suspects),
        found.first_suspects.len(),
    )?;
    match profile {
        Profile::Fast => {
            let met = found.missed == 0
                && percentile(&found.downs, 0.5) < 1_500_000
                && found.downs.last().is_some_and(|max| *max < 3_000_000);
            outln!(
                "  target (fast profile): p50 < 1.5 s, max < 3 s: {}",
                if met { "met" } else { "not met" }
            )?;
        }
        Profile::Lan => outln!("  no target for the lan profile (foca's LAN defaults)")?,
    }
    outln!("  for comparison: Akka ~5.5 s, memberlist 5–7 s with their default settings")
}

/// False `node.down` events while every node runs and relays events.
pub(super) async fn steady(args: &ClusterArgs, size: usize, root: &Path) -> anyhow::Result<()> {
    let names = &NAMES[..size];
    make_certificates(root, names)?;
    let nodes = start_cluster(root, names, ClusterProfile::Fast).await?;
    let outcome = run_steady(args, &nodes).await;
    for node in nodes.iter().rev() {
        node.shutdown().await;
    }
    outcome
}

/// Membership events a node published during the steady run.
#[derive(Default)]
struct MembershipCounts {
    down: AtomicU64,
    suspected: AtomicU64,
    joined: AtomicU64,
    left: AtomicU64,
}

async fn run_steady(args: &ClusterArgs, nodes: &[NodeHandle]) -> anyhow::Result<()> {
    outln!(
        "false failure detection, {} nodes in this process, fast profile: for {} s every node \
         publishes {} events/s, relayed to every other node; no node stops",
        nodes.len(),
        args.steady_secs,
        args.steady_rate
    )?;
    let stop = CancellationToken::new();
    let counts = Arc::new(MembershipCounts::default());
    let watchers: Vec<_> = nodes
        .iter()
        .map(|node| {
            let mut watch = node.subscribe(own_membership(node));
            let counts = counts.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                loop {
                    let delivery = tokio::select! {
                        delivery = watch.recv() => delivery,
                        () = stop.cancelled() => return,
                    };
                    let Some(Delivery::Event(event)) = delivery else {
                        if delivery.is_none() {
                            return;
                        }
                        continue;
                    };
                    let counter = match event.kind() {
                        EventKind::NodeDown => &counts.down,
                        EventKind::NodeSuspected => &counts.suspected,
                        EventKind::NodeJoined => &counts.joined,
                        EventKind::NodeLeft => &counts.left,
                        _ => continue,
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                    eprintln!(
                        "node {}: {} {}",
                        event.node(),
                        event.kind().as_str(),
                        match &event.data {
                            EventData::NodeDown(member)
                            | EventData::NodeSuspected(member)
                            | EventData::NodeJoined(member)
                            | EventData::NodeLeft(member) => member.node.to_string(),
                            _ => String::new(),
                        }
                    );
                }
            })
        })
        .collect();
    // Each node counts the events it receives from the others.
    let receivers: Vec<_> = nodes
        .iter()
        .map(|node| {
            let mut events = node.subscribe(EventFilter {
                kinds: vec![KindPattern::Exact(EventKind::SessionOutput)],
                ..EventFilter::default()
            });
            let own = node.node_id().clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let (mut arrived, mut lagged) = (0u64, 0u64);
                loop {
                    // After the stop, drain what is still on its way (until 2 s of quiet).
                    let delivery = if stop.is_cancelled() {
                        match tokio::time::timeout(Duration::from_secs(2), events.recv()).await {
                            Ok(delivery) => delivery,
                            Err(_) => break,
                        }
                    } else {
                        tokio::select! {
                            delivery = events.recv() => delivery,
                            () = stop.cancelled() => continue,
                        }
                    };
                    match delivery {
                        Some(Delivery::Event(event)) if event.node() != &own => arrived += 1,
                        Some(Delivery::Event(_)) => {}
                        Some(Delivery::Lagged(missed)) => lagged += missed.missed,
                        None => break,
                    }
                }
                (arrived, lagged)
            })
        })
        .collect();
    let publishers: Vec<_> = nodes
        .iter()
        .map(|node| {
            let node = node.clone();
            let stop = stop.clone();
            let rate = u64::from(args.steady_rate);
            tokio::spawn(async move {
                let per_tick = (rate / 1000).max(1);
                let period = Duration::from_micros((1_000_000 * per_tick / rate).max(1));
                let mut ticks = tokio::time::interval(period);
                ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                let mut sent = 0u64;
                loop {
                    tokio::select! {
                        _ = ticks.tick() => {}
                        () = stop.cancelled() => return sent,
                    }
                    for _ in 0..per_tick {
                        sent += 1;
                        node.events().publish(None, output(sent));
                    }
                }
            })
        })
        .collect();

    let progress = Progress::new("seconds", args.steady_secs);
    let started = Instant::now();
    let mut seconds = tokio::time::interval(Duration::from_secs(1));
    let end = started + Duration::from_secs(args.steady_secs);
    while Instant::now() < end {
        seconds.tick().await;
        progress.set(started.elapsed().as_secs().min(args.steady_secs));
    }
    progress.finish();
    stop.cancel();
    let mut sent = 0;
    for publisher in publishers {
        sent += publisher.await.context("a publisher failed")?;
    }
    let (mut arrived, mut lagged) = (0, 0);
    for receiver in receivers {
        let (got, lost) = receiver.await.context("a receiver failed")?;
        arrived += got;
        lagged += lost;
    }
    for watcher in watchers {
        let _ = watcher.await;
    }
    let expected = sent * (nodes.len() as u64 - 1);
    let down = counts.down.load(Ordering::Relaxed);
    outln!(
        "  false node.down: {down} (target 0: {}); node.suspected: {}; node.joined / node.left \
         after the start: {} / {}\n  load: {sent} events published, {arrived} of {expected} \
         relayed deliveries arrived{}",
        if down == 0 { "met" } else { "not met" },
        counts.suspected.load(Ordering::Relaxed),
        counts.joined.load(Ordering::Relaxed),
        counts.left.load(Ordering::Relaxed),
        if lagged > 0 {
            format!(" ({lagged} dropped by the bench's subscribers falling behind)")
        } else {
            String::new()
        }
    )?;
    Ok(())
}
