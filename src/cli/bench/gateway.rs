//! `troupe bench gateway`: the latency the gateway adds to a provider call.
//!
//! A fake provider and a node run in this process (the node's and the fake's tasks share the
//! main runtime); the load generator runs on a thread of its own with its own single-threaded
//! runtime and HTTP client, so its work is not queued behind theirs. It sends an open-loop load
//! of *pairs*: at each tick one request straight to the fake and the same request through the
//! node's `/v1/chat/completions`, sent together. Both halves of a pair meet the same machine at
//! the same moment, so the difference of the pair is the latency the gateway added to that
//! request; its percentiles are printed next to the absolute percentiles of both paths, for
//! whole answers and, for streams, for the time to the first byte and to the end.
//!
//! The node logs as a node started by `troupe node` does (its default level, `info`, one line
//! per request), into a file in the bench's scratch directory, so its logging is part of the
//! figures.
//!
//! Each row also gives the CPU time the run cost per pair: this process less the generator's
//! thread (the fake provider and the node), and the generator's thread. It depends less on the
//! neighbours than the tail latencies do, but still moves with the machine's load (idle workers
//! park and wake more on a quiet machine): compare builds in alternating runs.
//!
//! Everything runs on loopback; nothing leaves the machine. The load average and the core count
//! are printed first, since on a busy machine the tail says more about the neighbours than about
//! the gateway.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use futures::StreamExt;
use serde_json::json;

use crate::cli::out::outln;
use crate::config::{Config, ProviderConfig};
use crate::provider::ProviderKind;
use crate::testing::fake_provider::{FakeConfig, FakeProvider};

/// `troupe bench gateway`
#[derive(Debug, Args)]
pub(crate) struct GatewayArgs {
    /// Request rates to run, gateway requests per second (the fake also gets as many direct
    /// ones).
    #[arg(long, value_delimiter = ',', default_value = "500,2000")]
    rps: Vec<u32>,
    /// Seconds of load per rate and mode.
    #[arg(long, default_value_t = 5)]
    secs: u64,
    /// Which answers to ask for: `whole`, `stream` or both.
    #[arg(long, value_delimiter = ',', default_value = "whole,stream")]
    modes: Vec<Mode>,
    /// After each rate and mode, a control run of the same load in which the twin goes straight
    /// to the fake too (A/A): its "added" columns are what the method reads as added when
    /// nothing is, the floor under the gateway's figures on this machine.
    #[arg(long)]
    control: bool,
}

/// Whole answers or streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Mode {
    /// `stream: false`.
    Whole,
    /// `stream: true`.
    Stream,
}

/// Which duration of a sample a row shows.
type Pick = fn(&Sample) -> Duration;

/// One request's timings.
#[derive(Debug, Clone, Copy)]
struct Sample {
    ttfb: Duration,
    total: Duration,
}

/// A direct request and its twin through the gateway, sent at the same tick.
#[derive(Debug, Clone, Copy)]
struct Pair {
    direct: Sample,
    gateway: Sample,
}

/// Where the generator sends its requests.
#[derive(Debug, Clone)]
struct Targets {
    direct_url: String,
    gateway_url: String,
    token: String,
}

/// Where the second half of each pair goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Twin {
    /// Through the gateway: the measurement.
    Gateway,
    /// Straight to the fake like the first half: the control (A/A).
    Direct,
}

/// Runs the scenario.
pub(super) async fn run(args: GatewayArgs) -> anyhow::Result<std::process::ExitCode> {
    if args.rps.iter().any(|&rps| rps == 0 || rps > 20_000) || args.secs == 0 || args.secs > 60 {
        bail!("--rps must be 1..=20000 and --secs 1..=60");
    }
    crate::tls::install_default_provider();
    let data_dir = std::env::temp_dir().join(format!("troupe-bench-{}", std::process::id()));
    // Made as the node would make it (mode 0700): the node's admin token goes there too.
    crate::auth::ensure_data_dir(&data_dir)
        .context("cannot create the bench's scratch directory")?;
    // The node logs as `troupe node` would, at its default level; into a file, not the terminal.
    let log_path = data_dir.join("node.log");
    let log_file = std::fs::File::create(&log_path).context("cannot create the node's log file")?;
    let defaults = Config::default();
    crate::telemetry::init_with_writer(
        defaults.log.format,
        &defaults.log.level,
        std::sync::Arc::new(log_file),
    );
    let fake = FakeProvider::start(FakeConfig {
        reply: "The quick brown fox jumps over the lazy dog.".into(),
        rpm: u64::MAX / 4,
        tpm: u64::MAX / 4,
        ..FakeConfig::default()
    })
    .await
    .context("cannot start the fake provider")?;
    let mut config = Config::default();
    config.auth.requests_per_second = 1_000_000;
    config.auth.burst = 1_000_000;
    let mut provider = ProviderConfig::new(
        "fake",
        ProviderKind::OpenAi,
        format!("{}/v1", fake.base_url()),
    );
    provider.max_concurrency = 100_000;
    provider.max_queue = 1_000_000;
    config.providers.push(provider);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("cannot bind loopback")?;
    let node = crate::Node::builder()
        .config(config)
        .data_dir(&data_dir)
        .listener(listener)
        .start()
        .await
        .context("cannot start the node")?;
    let token = std::fs::read_to_string(node.admin_token_path())
        .context("cannot read the node's admin token")?;
    let targets = Targets {
        direct_url: format!("{}/v1/chat/completions", fake.base_url()),
        gateway_url: format!(
            "http://{}/v1/chat/completions",
            node.http_addr().context("the node has no HTTP address")?
        ),
        token: token.trim().to_owned(),
    };

    outln!(
        "gateway added latency: {} s per rate and mode after a 0.5 s warm-up; open loop of pairs \
         (one request direct, its twin through the gateway, sent together); load generator on \
         its own thread; fake provider on loopback; the node logs at info to {}",
        args.secs,
        log_path.display()
    )?;
    outln!(
        "machine: {} cores, load average {}",
        std::thread::available_parallelism().map_or(0, usize::from),
        load_average()
    )?;
    outln!(
        "{:>6} {:>6} {:>6} | {:>9} {:>9} {:>9} | {:>9} {:>9} {:>9} | {:>9} {:>9} {:>9} | {:>8} {:>8}",
        "rps",
        "mode",
        "metric",
        "direct50",
        "direct99",
        "direct999",
        "gw50",
        "gw99",
        "gw999",
        "added50",
        "added99",
        "added999",
        "cpu/pair",
        "gen/pair"
    )?;
    let twins: &[Twin] = if args.control {
        &[Twin::Gateway, Twin::Direct]
    } else {
        &[Twin::Gateway]
    };
    for &rps in &args.rps {
        for (&mode, &twin) in args
            .modes
            .iter()
            .flat_map(|mode| twins.iter().map(move |twin| (mode, twin)))
        {
            let stream = mode == Mode::Stream;
            let secs = args.secs;
            let generator_targets = targets.clone();
            // The generator's own thread and runtime; its answer comes back when it is done.
            let run = tokio::task::spawn_blocking(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                runtime.block_on(async move {
                    let http = reqwest::Client::builder()
                        .pool_max_idle_per_host(4096)
                        .tcp_nodelay(true)
                        .build()?;
                    let warmup = Duration::from_millis(500);
                    load(&http, &generator_targets, rps, warmup, stream, twin).await?;
                    let before = CpuTimes::now();
                    let mut run = load(
                        &http,
                        &generator_targets,
                        rps,
                        Duration::from_secs(secs),
                        stream,
                        twin,
                    )
                    .await?;
                    run.cpu = CpuTimes::now().since(before);
                    Ok::<_, anyhow::Error>(run)
                })
            })
            .await
            .context("the load generator's thread failed")??;
            let mode = match (stream, twin) {
                (false, Twin::Gateway) => "whole",
                (true, Twin::Gateway) => "stream",
                (false, Twin::Direct) => "whole*",
                (true, Twin::Direct) => "strm*",
            };
            if run.failed > 0 {
                outln!(
                    "{rps:>6} {mode:>6}: {} of {} pairs failed (left out below), e.g. {:?}",
                    run.failed,
                    run.failed + run.pairs.len(),
                    run.examples
                )?;
            }
            let sent = (run.pairs.len() + run.failed).max(1) as f64;
            let cpu = run.cpu.map_or_else(
                || format!("{:>8} {:>8}", "?", "?"),
                |cpu| {
                    let per_pair = |secs: f64| format!("{:>6.0}us", secs * 1e6 / sent);
                    format!(
                        "{:>8} {:>8}",
                        per_pair(cpu.process - cpu.generator),
                        per_pair(cpu.generator)
                    )
                },
            );
            let pairs = run.pairs;
            if pairs.is_empty() {
                continue;
            }
            let metrics: &[(&str, Pick)] = if stream {
                &[("ttfb", |s| s.ttfb), ("total", |s| s.total)]
            } else {
                &[("total", |s| s.total)]
            };
            for (metric, pick) in metrics {
                let direct = percentiles(pairs.iter().map(|pair| secs_of(pick(&pair.direct))));
                let through = percentiles(pairs.iter().map(|pair| secs_of(pick(&pair.gateway))));
                let added = percentiles(
                    pairs
                        .iter()
                        .map(|pair| secs_of(pick(&pair.gateway)) - secs_of(pick(&pair.direct))),
                );
                outln!(
                    "{rps:>6} {mode:>6} {metric:>6} | {} {} {} | {} {} {} | {} {} {} | {cpu}",
                    ms(direct[0]),
                    ms(direct[1]),
                    ms(direct[2]),
                    ms(through[0]),
                    ms(through[1]),
                    ms(through[2]),
                    signed_ms(added[0]),
                    signed_ms(added[1]),
                    signed_ms(added[2]),
                )?;
            }
        }
    }
    if args.control {
        outln!(
            "rows marked * are control runs: both halves of each pair straight to the fake, so \
             their 'gw' columns are a second direct request and their 'added' columns what the \
             method reads as added when nothing is (the load is lighter: no node work)"
        )?;
    }
    outln!("load average after the runs: {}", load_average())?;
    node.shutdown().await;
    fake.shutdown().await;
    let _ = std::fs::remove_dir_all(&data_dir);
    Ok(std::process::ExitCode::SUCCESS)
}

/// What a run gave: the pairs whose halves both succeeded, the failures (the first few kept as
/// examples), and the CPU time it cost (when `/proc` could tell).
#[derive(Debug, Default)]
struct Run {
    pairs: Vec<Pair>,
    failed: usize,
    examples: Vec<String>,
    cpu: Option<CpuSpent>,
}

/// CPU time (user + system) used so far by this process and by the calling thread, in seconds.
#[derive(Debug, Clone, Copy)]
struct CpuTimes {
    process: Option<f64>,
    thread: Option<f64>,
}

/// CPU time spent between two [`CpuTimes`], in seconds.
#[derive(Debug, Clone, Copy)]
struct CpuSpent {
    process: f64,
    generator: f64,
}

impl CpuTimes {
    fn now() -> Self {
        Self {
            process: cpu_seconds("/proc/self/stat"),
            thread: cpu_seconds("/proc/thread-self/stat"),
        }
    }

    fn since(self, earlier: Self) -> Option<CpuSpent> {
        Some(CpuSpent {
            process: self.process? - earlier.process?,
            generator: self.thread? - earlier.thread?,
        })
    }
}

/// utime + stime of a `/proc/…/stat` file, in seconds.
fn cpu_seconds(path: &str) -> Option<f64> {
    cpu_seconds_of(&std::fs::read_to_string(path).ok()?)
}

/// utime + stime of the text of a `/proc/…/stat` file, in seconds.
fn cpu_seconds_of(stat: &str) -> Option<f64> {
    // The command name (field 2) is in parentheses and may hold spaces: count after it.
    let fields: Vec<&str> = stat
        .get(stat.rfind(')')? + 2..)?
        .split_whitespace()
        .collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / USER_HZ)
}

/// Clock ticks per second of `/proc`'s times: Linux's USER_HZ, 100 on every architecture it
/// exports to user space.
const USER_HZ: f64 = 100.0;

/// Sends `rps` pairs per second for `duration`, each pair on its own task; the second half of
/// each pair goes where `twin` says.
async fn load(
    http: &reqwest::Client,
    targets: &Targets,
    rps: u32,
    duration: Duration,
    stream: bool,
    twin: Twin,
) -> anyhow::Result<Run> {
    let body = |model: &str| {
        json!({
            "model": model,
            "messages": [{"role": "user", "content": "hello"}],
            "stream": stream,
        })
    };
    // Both bodies written and both URLs parsed once: the generator's work per request is the
    // same for both halves of a pair, and small.
    let direct_body = bytes::Bytes::from(serde_json::to_vec(&body("m1"))?);
    let gateway_body = bytes::Bytes::from(serde_json::to_vec(&body("fake/m1"))?);
    let direct_url = reqwest::Url::parse(&targets.direct_url)?;
    let gateway_url = reqwest::Url::parse(&targets.gateway_url)?;
    let bearer = reqwest::header::HeaderValue::from_str(&format!("Bearer {}", targets.token))?;
    let count = (u128::from(rps) * duration.as_millis() / 1000).max(1);
    let count = u32::try_from(count).context("too many requests")?;
    let interval = Duration::from_secs(1) / rps;
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::with_capacity(count as usize);
    for index in 0..count {
        tokio::time::sleep_until(start + interval * index).await;
        let direct = http
            .post(direct_url.clone())
            .header(reqwest::header::CONTENT_TYPE, JSON)
            .body(direct_body.clone());
        let gateway = match twin {
            Twin::Gateway => http
                .post(gateway_url.clone())
                .header(reqwest::header::CONTENT_TYPE, JSON)
                .header(reqwest::header::AUTHORIZATION, bearer.clone())
                .body(gateway_body.clone()),
            Twin::Direct => http
                .post(direct_url.clone())
                .header(reqwest::header::CONTENT_TYPE, JSON)
                .body(direct_body.clone()),
        };
        tasks.push(tokio::spawn(async move {
            let (direct, gateway) = tokio::join!(timed(direct), timed(gateway));
            Ok::<_, anyhow::Error>(Pair {
                direct: direct.context("direct")?,
                gateway: gateway.context("through the gateway")?,
            })
        }));
    }
    let mut run = Run {
        pairs: Vec::with_capacity(tasks.len()),
        ..Run::default()
    };
    for task in tasks {
        match task.await.context("a request task failed")? {
            Ok(pair) => run.pairs.push(pair),
            Err(error) => {
                run.failed += 1;
                if run.examples.len() < 3 {
                    run.examples.push(format!("{error:#}"));
                }
            }
        }
    }
    Ok(run)
}

/// The requests' content type.
const JSON: reqwest::header::HeaderValue =
    reqwest::header::HeaderValue::from_static("application/json");

/// Sends one request and reads its answer to the end.
async fn timed(request: reqwest::RequestBuilder) -> anyhow::Result<Sample> {
    let sent = Instant::now();
    let response = request.send().await?;
    if !response.status().is_success() {
        bail!("status {}", response.status());
    }
    let mut body = response.bytes_stream();
    let mut ttfb = None;
    while let Some(piece) = body.next().await {
        piece?;
        ttfb.get_or_insert_with(|| sent.elapsed());
    }
    let total = sent.elapsed();
    Ok(Sample {
        ttfb: ttfb.unwrap_or(total),
        total,
    })
}

fn secs_of(duration: Duration) -> f64 {
    duration.as_secs_f64()
}

/// p50, p99 and p99.9 (nearest rank) of `values`, in seconds.
fn percentiles(values: impl Iterator<Item = f64>) -> [f64; 3] {
    let mut values: Vec<f64> = values.collect();
    values.sort_unstable_by(f64::total_cmp);
    let at = |q: f64| values[((values.len() - 1) as f64 * q).round() as usize];
    [at(0.5), at(0.99), at(0.999)]
}

fn ms(secs: f64) -> String {
    format!("{:>7.3}ms", secs * 1000.0)
}

fn signed_ms(secs: f64) -> String {
    format!("{:>+7.3}ms", secs * 1000.0)
}

/// `/proc/loadavg`'s first three fields, or `unknown`.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|text| {
            text.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_else(|| "unknown".to_owned())
}

#[cfg(test)]
mod tests {
    use super::cpu_seconds_of;

    #[test]
    fn cpu_time_is_read_after_a_command_name_with_spaces_and_parentheses() {
        // pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt
        // utime stime …: utime 250 ticks, stime 50 ticks.
        let stat = "4242 (tokio rt (x)) S 1 4242 4242 0 -1 4194560 900 0 0 0 250 50 0 0 20 0";
        assert_eq!(cpu_seconds_of(stat), Some(3.0));
        assert_eq!(cpu_seconds_of("4242 (cut short) S 1"), None);
        assert!(
            super::cpu_seconds("/proc/self/stat").is_some_and(|secs| secs >= 0.0),
            "this process's own stat file reads"
        );
    }
}
