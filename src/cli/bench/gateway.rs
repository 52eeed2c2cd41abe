//! `troupe bench gateway`: the gateway's added latency. Starts a fake provider and a node in
//! this process, then sends the same open-loop load (requests at a fixed rate, each on its own
//! task) first straight to the fake and then through the node's `/v1/chat/completions`, and
//! prints p50/p99/p99.9 of both and their difference, for whole answers and for the time to the
//! first byte of a stream. Everything runs on loopback; nothing leaves the machine.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use serde_json::json;

use crate::config::{Config, ProviderConfig};
use crate::provider::ProviderKind;
use crate::testing::fake_provider::{FakeConfig, FakeProvider};

/// `troupe bench gateway`
#[derive(Debug, Args)]
pub(crate) struct GatewayArgs {
    /// Request rates to run, requests per second.
    #[arg(long, value_delimiter = ',', default_value = "500,2000")]
    rps: Vec<u32>,
    /// Seconds of load per rate, mode and path.
    #[arg(long, default_value_t = 5)]
    secs: u64,
}

/// Which duration of a sample a row shows.
type Pick = fn(&Sample) -> Duration;

struct Sample {
    ttfb: Duration,
    total: Duration,
}

/// Runs the scenario.
pub(super) async fn run(args: GatewayArgs) -> anyhow::Result<std::process::ExitCode> {
    if args.rps.iter().any(|&rps| rps == 0 || rps > 20_000) || args.secs == 0 || args.secs > 60 {
        bail!("--rps must be 1..=20000 and --secs 1..=60");
    }
    crate::tls::install_default_provider();
    let fake = FakeProvider::start(FakeConfig {
        reply: "The quick brown fox jumps over the lazy dog.".into(),
        rpm: u64::MAX / 4,
        tpm: u64::MAX / 4,
        ..FakeConfig::default()
    })
    .await
    .context("cannot start the fake provider")?;
    let data_dir = std::env::temp_dir().join(format!("troupe-bench-{}", std::process::id()));
    let mut config = Config::default();
    config.auth.requests_per_second = 1_000_000;
    config.auth.burst = 1_000_000;
    let mut provider = ProviderConfig::new(
        "fake",
        ProviderKind::OpenAi,
        format!("{}/v1", fake.base_url()),
    );
    provider.max_concurrency = 100_000;
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
    let gateway_url = format!(
        "http://{}/v1/chat/completions",
        node.http_addr().context("the node has no HTTP address")?
    );
    let direct_url = format!("{}/v1/chat/completions", fake.base_url());
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(4096)
        .tcp_nodelay(true)
        .build()?;

    println!(
        "gateway added latency: {} s per rate/mode/path, open loop, fake provider on loopback",
        args.secs
    );
    println!(
        "{:>6} {:>9} {:>8} | {:>9} {:>9} {:>9} | {:>9} {:>9} {:>9} | {:>9} {:>9} {:>9}",
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
        "added999"
    );
    for &rps in &args.rps {
        for stream in [false, true] {
            let warmup = Duration::from_millis(500);
            load(&http, &direct_url, None, rps, warmup, stream).await?;
            load(&http, &gateway_url, Some(token.trim()), rps, warmup, stream).await?;
            let duration = Duration::from_secs(args.secs);
            let direct = load(&http, &direct_url, None, rps, duration, stream).await?;
            let through = load(
                &http,
                &gateway_url,
                Some(token.trim()),
                rps,
                duration,
                stream,
            )
            .await?;
            let mode = if stream { "stream" } else { "whole" };
            let metrics: &[(&str, Pick)] = if stream {
                &[("ttfb", |s| s.ttfb), ("total", |s| s.total)]
            } else {
                &[("total", |s| s.total)]
            };
            for (metric, pick) in metrics {
                let d = percentiles(&direct, *pick);
                let g = percentiles(&through, *pick);
                println!(
                    "{rps:>6} {mode:>9} {metric:>8} | {} {} {} | {} {} {} | {} {} {}",
                    ms(d[0]),
                    ms(d[1]),
                    ms(d[2]),
                    ms(g[0]),
                    ms(g[1]),
                    ms(g[2]),
                    added(g[0], d[0]),
                    added(g[1], d[1]),
                    added(g[2], d[2]),
                );
            }
        }
    }
    node.shutdown().await;
    fake.shutdown().await;
    let _ = std::fs::remove_dir_all(&data_dir);
    Ok(std::process::ExitCode::SUCCESS)
}

/// Sends `rps` requests per second for `duration`, each on its own task; every request must
/// succeed.
async fn load(
    http: &reqwest::Client,
    url: &str,
    token: Option<&str>,
    rps: u32,
    duration: Duration,
    stream: bool,
) -> anyhow::Result<Vec<Sample>> {
    let body = json!({
        "model": if token.is_some() { "fake/m1" } else { "m1" },
        "messages": [{"role": "user", "content": "hello"}],
        "stream": stream,
    });
    let count = (u64::from(rps) * duration.as_millis() as u64 / 1000).max(1);
    let interval = Duration::from_secs(1) / rps;
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::with_capacity(count as usize);
    for index in 0..count {
        tokio::time::sleep_until(start + interval * index as u32).await;
        let mut request = http.post(url).json(&body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        tasks.push(tokio::spawn(async move {
            let sent = Instant::now();
            let response = request.send().await?;
            if !response.status().is_success() {
                anyhow::bail!("status {}", response.status());
            }
            let mut body = response.bytes_stream();
            use futures::StreamExt;
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
        }));
    }
    let mut samples = Vec::with_capacity(tasks.len());
    for task in tasks {
        samples.push(task.await.context("a request task failed")??);
    }
    Ok(samples)
}

fn percentiles(samples: &[Sample], pick: fn(&Sample) -> Duration) -> [Duration; 3] {
    let mut values: Vec<Duration> = samples.iter().map(pick).collect();
    values.sort_unstable();
    let at = |q: f64| values[((values.len() - 1) as f64 * q).round() as usize];
    [at(0.5), at(0.99), at(0.999)]
}

fn ms(duration: Duration) -> String {
    format!("{:>7.3}ms", duration.as_secs_f64() * 1000.0)
}

fn added(through: Duration, direct: Duration) -> String {
    let delta = through.as_secs_f64() - direct.as_secs_f64();
    format!("{:>+7.3}ms", delta * 1000.0)
}
