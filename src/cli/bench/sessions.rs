//! `troupe bench sessions`.
//!
//! 1. **Baseline**: `true` spawned and reaped directly with `tokio::process`, `--concurrency` at
//!    a time: the most this machine can start.
//! 2. **Throughput**: `--sessions` sessions running `true`, submitted over the HTTP API by
//!    `--concurrency` clients to a node allowed `--max-concurrent` runs; measured from the first
//!    request to the last session ended (every transition durable in redb, every event
//!    published). Reported as sessions/s and as a share of the baseline.
//! 3. **Queue**: a second node with every run slot held by a `sleep`, `--queue` sessions
//!    submitted (accept rate, resident memory per queued session), then the slots released and
//!    the queue drained (drain rate).

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::StreamExt;
use serde_json::json;
use troupe_actors::session::{SessionState, SessionStats};

use super::{Progress, rate, rss_bytes};
use crate::cli::out::outln;
use crate::config::Config;
use crate::node::{Node, NodeHandle};

/// Options of `troupe bench sessions`.
#[derive(Debug, clap::Args)]
pub(crate) struct SessionsArgs {
    /// Sessions in the throughput run.
    #[arg(long, default_value_t = 2000)]
    sessions: u64,
    /// Concurrent HTTP clients (and concurrent spawns in the baseline).
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// `sessions.max_concurrent` of the nodes.
    #[arg(long, default_value_t = 32)]
    max_concurrent: usize,
    /// Sessions queued in the queue run (0 skips it).
    #[arg(long, default_value_t = 10_000)]
    queue: u64,
}

pub(super) async fn run(args: SessionsArgs) -> anyhow::Result<ExitCode> {
    if args.sessions == 0 || args.concurrency == 0 || args.max_concurrent == 0 {
        bail!("--sessions, --concurrency and --max-concurrent must be at least 1");
    }
    if args.sessions > 1_000_000 || args.queue > 1_000_000 {
        bail!("--sessions and --queue are limited to 1,000,000");
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    outln!(
        "troupe bench sessions: {} sessions, {} clients, max_concurrent {}, queue {} ({cores} cores)",
        args.sessions,
        args.concurrency,
        args.max_concurrent,
        args.queue
    )?;

    let baseline = baseline(args.sessions, args.concurrency).await?;
    outln!(
        "baseline   spawn+wait `true` directly      {:>9.0} /s  ({} in {:.2?})",
        rate(args.sessions, baseline),
        args.sessions,
        baseline
    )?;

    let bench = BenchNode::start(args.max_concurrent, args.sessions + args.queue).await?;
    let elapsed = bench.throughput(args.sessions, args.concurrency).await?;
    let per_second = rate(args.sessions, elapsed);
    outln!(
        "sessions   POST /v1/sessions → ended      {per_second:>9.0} /s  ({} in {elapsed:.2?}, {:.0} % of baseline)",
        args.sessions,
        100.0 * per_second / rate(args.sessions, baseline)
    )?;
    bench.node.shutdown().await;

    if args.queue > 0 {
        let bench = BenchNode::start(args.max_concurrent, args.queue).await?;
        bench
            .queue(args.queue, args.concurrency, args.max_concurrent)
            .await?;
        bench.node.shutdown().await;
    }
    Ok(ExitCode::SUCCESS)
}

/// Spawns and reaps `true` `count` times, `concurrency` at a time.
async fn baseline(count: u64, concurrency: usize) -> anyhow::Result<Duration> {
    let progress = Progress::new("baseline", count);
    let started = Instant::now();
    let mut done = 0;
    let mut runs = futures::stream::iter(0..count)
        .map(|_| async {
            tokio::process::Command::new("true")
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .output()
                .await
        })
        .buffer_unordered(concurrency);
    while let Some(result) = runs.next().await {
        let output = result.context("cannot run `true`")?;
        if !output.status.success() {
            bail!("`true` exited with {}", output.status);
        }
        done += 1;
        progress.set(done);
    }
    progress.finish();
    Ok(started.elapsed())
}

/// An embedded node on loopback with a temporary data directory and workspace.
struct BenchNode {
    node: NodeHandle,
    client: reqwest::Client,
    base: String,
    token: String,
    stats: Arc<SessionStats>,
    _temp: tempfile::TempDir,
}

impl BenchNode {
    async fn start(max_concurrent: usize, queue_capacity: u64) -> anyhow::Result<Self> {
        let temp = tempfile::tempdir().context("cannot create a temporary directory")?;
        let workspace = temp.path().join("ws");
        std::fs::create_dir_all(&workspace)?;
        let mut config = Config::default();
        config.sessions.max_concurrent = max_concurrent;
        config.sessions.queue_capacity = usize::try_from(queue_capacity)?;
        config.sessions.workspace_roots = vec![workspace];
        // The bench is one client hammering its own node: the per-token limit would measure
        // itself.
        config.auth.requests_per_second = 1_000_000;
        config.auth.burst = 1_000_000;
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let node = Node::builder()
            .config(config)
            .data_dir(temp.path().join("data"))
            .listener(listener)
            .start()
            .await
            .context("cannot start the bench node")?;
        let addr = node.http_addr().context("the bench node serves no HTTP")?;
        let token = std::fs::read_to_string(node.admin_token_path())?
            .trim()
            .to_owned();
        let stats = node.core().sessions.stats().clone();
        Ok(Self {
            node,
            client: reqwest::Client::builder()
                .pool_max_idle_per_host(256)
                .build()?,
            base: format!("http://{addr}"),
            token,
            stats,
            _temp: temp,
        })
    }

    /// Submits `count` sessions of `body`, `concurrency` at a time; returns when all were
    /// accepted.
    async fn submit(
        &self,
        what: &str,
        count: u64,
        concurrency: usize,
        body: serde_json::Value,
    ) -> anyhow::Result<()> {
        let progress = Progress::new(what, count);
        let url = format!("{}/v1/sessions", self.base);
        let mut accepted = 0;
        let mut requests = futures::stream::iter(0..count)
            .map(|_| {
                self.client
                    .post(&url)
                    .bearer_auth(&self.token)
                    .json(&body)
                    .send()
            })
            .buffer_unordered(concurrency);
        while let Some(response) = requests.next().await {
            let response = response.context("POST /v1/sessions failed")?;
            let status = response.status();
            if status != reqwest::StatusCode::ACCEPTED {
                let text = response.text().await.unwrap_or_default();
                bail!("POST /v1/sessions answered {status}: {text}");
            }
            accepted += 1;
            progress.set(accepted);
        }
        progress.finish();
        Ok(())
    }

    fn ended(&self) -> u64 {
        self.stats
            .ended
            .iter()
            .map(|count| count.load(Ordering::Relaxed))
            .sum()
    }

    fn ended_in(&self, state: SessionState) -> u64 {
        SessionState::ALL
            .iter()
            .position(|s| *s == state)
            .map_or(0, |index| self.stats.ended[index].load(Ordering::Relaxed))
    }

    /// Waits until `target` sessions ended, showing progress; fails if nothing ends for 60 s.
    async fn wait_ended(&self, what: &str, target: u64) -> anyhow::Result<()> {
        let progress = Progress::new(what, target);
        let mut last = (self.ended(), Instant::now());
        loop {
            let ended = self.ended();
            progress.set(ended);
            if ended >= target {
                progress.finish();
                return Ok(());
            }
            if ended != last.0 {
                last = (ended, Instant::now());
            } else if last.1.elapsed() > Duration::from_secs(60) {
                bail!("stalled: {ended}/{target} sessions ended and none for 60 s");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn throughput(&self, count: u64, concurrency: usize) -> anyhow::Result<Duration> {
        let started = Instant::now();
        let body = json!({"kind": "command", "program": "true"});
        let (submitted, ended) = tokio::join!(
            self.submit("submit", count, concurrency, body),
            self.wait_ended("run", count)
        );
        submitted?;
        ended?;
        let elapsed = started.elapsed();
        let succeeded = self.ended_in(SessionState::Succeeded);
        if succeeded != count {
            bail!("only {succeeded} of {count} sessions succeeded");
        }
        Ok(elapsed)
    }

    async fn queue(&self, count: u64, concurrency: usize, slots: usize) -> anyhow::Result<()> {
        // Hold every run slot.
        let mut blockers = Vec::with_capacity(slots);
        for _ in 0..slots {
            let view = self
                .node
                .spawn_request(serde_json::from_value(
                    json!({"kind": "command", "program": "sleep", "args": ["3600"], "priority": 9}),
                )?)
                .await
                .map_err(|error| anyhow::anyhow!("cannot start a blocker: {error}"))?;
            blockers.push(view.record.id);
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.stats.running.load(Ordering::Relaxed) < slots as u64 {
            if Instant::now() > deadline {
                bail!("the blockers did not all start within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }

        let rss_before = rss_bytes();
        let started = Instant::now();
        self.submit(
            "queue",
            count,
            concurrency,
            json!({"kind": "command", "program": "true"}),
        )
        .await?;
        let accepted_in = started.elapsed();
        let queued = self.stats.queued.load(Ordering::Relaxed);
        let rss_after = rss_bytes();
        outln!(
            "queue      {count} accepted while every slot is busy {:>7.0} /s  ({accepted_in:.2?}; {queued} queued)",
            rate(count, accepted_in)
        )?;
        if let (Some(before), Some(after)) = (rss_before, rss_after) {
            outln!(
                "memory     resident growth per queued session  {:>7.0} B  ({:.1} MiB for {count}; includes the HTTP client's side)",
                after.saturating_sub(before) as f64 / count as f64,
                after.saturating_sub(before) as f64 / (1024.0 * 1024.0)
            )?;
        }

        let ended_before = self.ended();
        let drain_started = Instant::now();
        for id in &blockers {
            self.node
                .cancel_session(id)
                .await
                .map_err(|error| anyhow::anyhow!("cannot cancel a blocker: {error}"))?;
        }
        self.wait_ended("drain", ended_before + count + slots as u64)
            .await?;
        let drained_in = drain_started.elapsed();
        let succeeded = self.ended_in(SessionState::Succeeded);
        if succeeded != count {
            bail!("only {succeeded} of {count} queued sessions succeeded");
        }
        outln!(
            "drain      {count} queued sessions run to the end {:>7.0} /s  ({drained_in:.2?})",
            rate(count, drained_in)
        )?;
        Ok(())
    }
}
