//! `troupe bench events`: event delivery over SSE and WebSocket against the in-process bus, in
//! one run. Starts an embedded node on loopback, opens the subscribers, publishes at a fixed
//! rate, and reports per transport: events delivered and lost, delivery latency (publish to
//! receipt, measured in this one process) p50/p99/max, and the node's resident memory.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use eventsource_stream::Eventsource;
use futures::StreamExt;
use tokio::sync::Mutex;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use troupe_actors::event::{Delivery, EventData, EventFilter, SessionProgress};
use troupe_actors::ids::SessionId;

use crate::config::Config;
use crate::node::Node;

/// `troupe bench events` options.
#[derive(Debug, clap::Args)]
pub(crate) struct EventsArgs {
    /// SSE subscribers.
    #[arg(long, default_value_t = 100)]
    sse: usize,
    /// WebSocket subscribers.
    #[arg(long, default_value_t = 20)]
    ws: usize,
    /// Events published per second.
    #[arg(long, default_value_t = 2_000)]
    rate: u64,
    /// Seconds of publishing (at most 120).
    #[arg(long, default_value_t = 5)]
    seconds: u64,
}

/// Microseconds since the Unix epoch.
fn now_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_micros() as u64)
        .unwrap_or(0)
}

/// What one subscriber saw.
#[derive(Debug, Default, Clone)]
struct Tally {
    delivered: u64,
    lost: u64,
    latencies_us: Vec<u64>,
}

impl Tally {
    /// Counts one event JSON (or a lag marker).
    fn record_json(&mut self, data: &str) {
        let Ok(value) = serde_json::from_str::<serde_json::Value>(data) else {
            return;
        };
        let event = if value["type"] == "event" {
            &value["event"]
        } else {
            &value
        };
        match event["kind"].as_str() {
            Some("session.progress") => {
                if let Some(sent) = event["data"]["message"]
                    .as_str()
                    .and_then(|message| message.parse::<u64>().ok())
                {
                    self.delivered += 1;
                    self.latencies_us.push(now_micros().saturating_sub(sent));
                }
            }
            Some("events.lagged") => self.lost += event["data"]["missed"].as_u64().unwrap_or(0),
            _ => {}
        }
    }
}

pub(super) async fn run(args: EventsArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(
        (1..=120).contains(&args.seconds),
        "--seconds must be 1 to 120"
    );
    anyhow::ensure!(
        args.sse + args.ws <= 5_000,
        "at most 5,000 subscribers in all"
    );
    crate::tls::install_default_provider();
    let data_dir = std::env::temp_dir().join(format!("troupe-bench-{}", std::process::id()));
    let mut config = Config::default();
    config.log.level = "warn".into();
    config.auth.requests_per_second = 1_000_000;
    config.auth.burst = 1_000_000;
    config.events.subscriber_buffer = 65_536;
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let node = Node::builder()
        .config(config)
        .data_dir(&data_dir)
        .listener(listener)
        .start()
        .await?;
    let addr = node.http_addr().context("the node has no HTTP address")?;
    let token = std::fs::read_to_string(node.admin_token_path())?
        .trim()
        .to_owned();
    let session = SessionId::new("s-bench").expect("a valid id");
    let total = args.rate * args.seconds;

    let sse: Arc<Mutex<Vec<Tally>>> = Arc::default();
    let ws: Arc<Mutex<Vec<Tally>>> = Arc::default();
    let deadline = Duration::from_secs(args.seconds + 30);
    let mut tasks = Vec::new();
    let http = reqwest::Client::new();
    let mut ready = Vec::new();
    for _ in 0..args.sse {
        let response = http
            .get(format!("http://{addr}/v1/events?session=s-bench"))
            .bearer_auth(&token)
            .send()
            .await?
            .error_for_status()?;
        let sink = sse.clone();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<()>();
        ready.push(ready_rx);
        tasks.push(tokio::spawn(async move {
            let mut events = response.bytes_stream().eventsource();
            let mut tally = Tally::default();
            let _ = ready_tx.send(());
            let _ = tokio::time::timeout(deadline, async {
                while tally.delivered + tally.lost < total {
                    match events.next().await {
                        Some(Ok(event)) => tally.record_json(&event.data),
                        _ => break,
                    }
                }
            })
            .await;
            sink.lock().await.push(tally);
        }));
    }
    for _ in 0..args.ws {
        let mut request =
            format!("ws://{addr}/v1/events/ws?session=s-bench").into_client_request()?;
        request.headers_mut().insert(
            "authorization",
            HeaderValue::from_str(&format!("Bearer {token}"))?,
        );
        let (mut socket, _) = tokio_tungstenite::connect_async(request).await?;
        let sink = ws.clone();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<()>();
        ready.push(ready_rx);
        tasks.push(tokio::spawn(async move {
            let mut tally = Tally::default();
            let _ = ready_tx.send(());
            let _ = tokio::time::timeout(deadline, async {
                while tally.delivered + tally.lost < total {
                    match socket.next().await {
                        Some(Ok(Message::Text(text))) => tally.record_json(&text),
                        Some(Ok(_)) => {}
                        _ => break,
                    }
                }
            })
            .await;
            sink.lock().await.push(tally);
        }));
    }
    let mut bus = node.subscribe(EventFilter {
        sessions: vec![session.clone()],
        ..EventFilter::all()
    });
    let in_process = tokio::spawn(async move {
        let mut tally = Tally::default();
        let _ = tokio::time::timeout(deadline, async {
            while tally.delivered + tally.lost < total {
                match bus.recv().await {
                    Some(Delivery::Event(event)) => {
                        if let EventData::SessionProgress(progress) = &event.data
                            && let Ok(sent) = progress.message.parse::<u64>()
                        {
                            tally.delivered += 1;
                            tally.latencies_us.push(now_micros().saturating_sub(sent));
                        }
                    }
                    Some(Delivery::Lagged(lagged)) => tally.lost += lagged.missed,
                    None => break,
                }
            }
        })
        .await;
        tally
    });
    for ready in ready {
        let _ = ready.await;
    }
    // Let the streams' first frames (link.connected is filtered out) settle.
    tokio::time::sleep(Duration::from_millis(200)).await;

    eprintln!(
        "publishing {total} events at {}/s to {} SSE, {} WebSocket and 1 in-process subscribers…",
        args.rate, args.sse, args.ws
    );
    let started = Instant::now();
    let per_tick = (args.rate / 1000).max(1);
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 * per_tick / args.rate));
    let mut published = 0;
    while published < total {
        tick.tick().await;
        for _ in 0..per_tick.min(total - published) {
            node.events().publish(
                Some(session.clone()),
                EventData::SessionProgress(SessionProgress {
                    message: now_micros().to_string(),
                    current: Some(published),
                    total: Some(total),
                }),
            );
            published += 1;
        }
    }
    let publish_secs = started.elapsed().as_secs_f64();
    let bus_tally = in_process.await?;
    for task in tasks {
        let _ = task.await;
    }
    let memory = resident_kib();
    println!(
        "troupe bench events: {total} events at {}/s for {}s (published in {publish_secs:.1}s); node RSS {} MiB",
        args.rate,
        args.seconds,
        memory.map_or("?".into(), |kib| format!("{:.1}", kib as f64 / 1024.0))
    );
    println!(
        "{:<12} {:>5} {:>12} {:>10} {:>10} {:>10} {:>10}",
        "transport", "subs", "delivered", "lost", "p50 ms", "p99 ms", "max ms"
    );
    report("in-process", &[bus_tally]);
    report("sse", &sse.lock().await);
    report("websocket", &ws.lock().await);
    node.shutdown().await;
    let _ = std::fs::remove_dir_all(&data_dir);
    Ok(ExitCode::SUCCESS)
}

fn report(name: &str, tallies: &[Tally]) {
    let delivered: u64 = tallies.iter().map(|tally| tally.delivered).sum();
    let lost: u64 = tallies.iter().map(|tally| tally.lost).sum();
    let mut latencies: Vec<u64> = tallies
        .iter()
        .flat_map(|tally| tally.latencies_us.iter().copied())
        .collect();
    latencies.sort_unstable();
    let at = |quantile: f64| -> String {
        if latencies.is_empty() {
            return "-".into();
        }
        let index = ((latencies.len() - 1) as f64 * quantile).round() as usize;
        format!("{:.2}", latencies[index] as f64 / 1000.0)
    };
    println!(
        "{:<12} {:>5} {:>12} {:>10} {:>10} {:>10} {:>10}",
        name,
        tallies.len(),
        delivered,
        lost,
        at(0.5),
        at(0.99),
        at(1.0)
    );
}

/// This process's resident memory, from `/proc/self/status`.
fn resident_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tallies_count_progress_events_and_lag_markers_of_sse_and_websocket_frames() {
        let mut tally = Tally::default();
        let sent = now_micros();
        tally.record_json(&format!(
            r#"{{"kind":"session.progress","data":{{"message":"{sent}"}}}}"#
        ));
        tally.record_json(&format!(
            r#"{{"type":"event","event":{{"kind":"session.progress","data":{{"message":"{sent}"}}}}}}"#
        ));
        tally.record_json(
            r#"{"type":"event","event":{"kind":"events.lagged","data":{"missed":7}}}"#,
        );
        tally.record_json(r#"{"kind":"link.connected","data":{}}"#);
        tally.record_json("not json");
        assert_eq!(tally.delivered, 2);
        assert_eq!(tally.lost, 7);
        assert_eq!(tally.latencies_us.len(), 2);
    }
}
