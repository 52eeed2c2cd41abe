//! `troupe bench events`: event delivery over SSE and WebSocket against the in-process bus, in
//! one run, with the clients in a separate process so they do not compete with the node inside
//! it. This process hosts the node (its own configuration, by default the node's default
//! subscriber buffer), the publisher and the baseline subscriber on the bus; a second `troupe`
//! process (`--clients-of`, started by this one) opens the SSE and WebSocket subscribers. Reports
//! per transport: events expected, delivered, lost (expected minus delivered, so a stream that
//! broke or fell behind counts), lag markers, delivery latency (publish to receipt, wall clock of
//! one machine) p50/p99/max, and this process's resident memory (the node's; the clients are
//! elsewhere), peak and at the end.

use std::process::{ExitCode, Stdio};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::StreamExt;
use memchr::memmem::Finder;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncBufReadExt;
use tokio::sync::Mutex;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use troupe_actors::event::{Delivery, EventData, EventFilter, SessionProgress};
use troupe_actors::ids::SessionId;

use crate::cli::out::outln;
use crate::config::Config;
use crate::node::Node;

/// `troupe bench events` options. The defaults are the design's target scenario.
#[derive(Debug, clap::Args)]
pub(crate) struct EventsArgs {
    /// SSE subscribers.
    #[arg(long, default_value_t = 1_000)]
    sse: usize,
    /// WebSocket subscribers.
    #[arg(long, default_value_t = 100)]
    ws: usize,
    /// Events published per second.
    #[arg(long, default_value_t = 10_000)]
    rate: u64,
    /// Seconds of publishing (at most 120).
    #[arg(long, default_value_t = 30)]
    seconds: u64,
    /// The node's `events.subscriber_buffer` (default: the node's own default).
    #[arg(long)]
    subscriber_buffer: Option<usize>,
    /// Internal: run only the subscribers, against the node at this URL (the token comes in
    /// TROUPE_BENCH_TOKEN); `troupe bench events` starts this itself.
    #[arg(long, hide = true)]
    clients_of: Option<String>,
}

/// The session every published event is about.
const SESSION: &str = "s-bench";
/// Environment variable carrying the token to the clients process (not argv: others can read it).
const TOKEN_ENV: &str = "TROUPE_BENCH_TOKEN";

/// Microseconds since the Unix epoch.
fn now_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_micros() as u64)
        .unwrap_or(0)
}

/// A latency histogram in microseconds: exact below 1,024 µs, then 64 buckets per power of two
/// (within 1.6 %), so a million deliveries cost no more memory than ten.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Histogram {
    counts: Vec<u64>,
    max: u64,
}

const LINEAR: u64 = 1024;
const SUB_BUCKETS: u64 = 64;

impl Default for Histogram {
    fn default() -> Self {
        Self {
            counts: vec![0; (LINEAR + (64 - 10) * SUB_BUCKETS) as usize],
            max: 0,
        }
    }
}

impl Histogram {
    fn index(value: u64) -> usize {
        if value < LINEAR {
            return value as usize;
        }
        let exponent = 63 - u64::from(value.leading_zeros());
        let sub = (value >> (exponent - 6)) & (SUB_BUCKETS - 1);
        (LINEAR + (exponent - 10) * SUB_BUCKETS + sub) as usize
    }

    /// The smallest value of bucket `index`.
    fn value(index: usize) -> u64 {
        let index = index as u64;
        if index < LINEAR {
            return index;
        }
        let exponent = (index - LINEAR) / SUB_BUCKETS + 10;
        let sub = (index - LINEAR) % SUB_BUCKETS;
        (1 << exponent) | (sub << (exponent - 6))
    }

    fn record(&mut self, value: u64) {
        self.counts[Self::index(value)] += 1;
        self.max = self.max.max(value);
    }

    fn merge(&mut self, other: &Histogram) {
        for (mine, theirs) in self.counts.iter_mut().zip(&other.counts) {
            *mine += theirs;
        }
        self.max = self.max.max(other.max);
    }

    fn total(&self) -> u64 {
        self.counts.iter().sum()
    }

    fn quantile(&self, quantile: f64) -> Option<u64> {
        let total = self.total();
        if total == 0 {
            return None;
        }
        let rank = ((total - 1) as f64 * quantile).round() as u64;
        let mut seen = 0;
        for (index, count) in self.counts.iter().enumerate() {
            seen += count;
            if seen > rank {
                return Some(Self::value(index).min(self.max));
            }
        }
        Some(self.max)
    }
}

/// What the subscribers of one transport saw, together.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct Tally {
    transport: String,
    subscribers: u64,
    delivered: u64,
    lag_markers: u64,
    missed_in_markers: u64,
    /// Subscribers whose stream broke or hit the deadline before their last event.
    cut_short: u64,
    /// CPU seconds (user + system) the process of these subscribers used while they ran (the
    /// clients process reports its own; 0 for the in-process subscriber).
    #[serde(default)]
    cpu_secs: f64,
    latency_us: Histogram,
}

impl Tally {
    /// Counts one frame (SSE data or a WebSocket text frame) received at `now` (µs since the
    /// epoch) without a full JSON parse: the clients must keep up with every delivery of the
    /// run, on the node's machine.
    fn record_frame(&mut self, data: &[u8], now: u64) {
        static PROGRESS: LazyLock<Finder<'static>> =
            LazyLock::new(|| Finder::new(br#""kind":"session.progress""#));
        static LAGGED: LazyLock<Finder<'static>> =
            LazyLock::new(|| Finder::new(br#""kind":"events.lagged""#));
        static MESSAGE: LazyLock<Finder<'static>> =
            LazyLock::new(|| Finder::new(br#""message":""#));
        static MISSED: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(br#""missed":"#));
        if PROGRESS.find(data).is_some() {
            if let Some(sent) = field(data, &MESSAGE) {
                self.delivered += 1;
                self.latency_us.record(now.saturating_sub(sent));
            }
        } else if LAGGED.find(data).is_some() {
            self.lag_markers += 1;
            self.missed_in_markers += field(data, &MISSED).unwrap_or(0);
        }
    }

    fn merge(&mut self, other: &Tally) {
        self.subscribers += other.subscribers;
        self.delivered += other.delivered;
        self.lag_markers += other.lag_markers;
        self.missed_in_markers += other.missed_in_markers;
        self.cut_short += other.cut_short;
        self.latency_us.merge(&other.latency_us);
    }
}

/// The number written right after `key` in `data`.
fn field(data: &[u8], key: &Finder<'_>) -> Option<u64> {
    let start = key.find(data)? + key.needle().len();
    let digits = data[start..]
        .iter()
        .take_while(|byte| byte.is_ascii_digit())
        .take(19);
    let mut value = None;
    for digit in digits {
        value = Some(value.unwrap_or(0u64) * 10 + u64::from(digit - b'0'));
    }
    value
}

/// The `data:` lines of a Server-Sent Events byte stream, frame by frame, read straight from the
/// received chunks (only a frame split across chunks is copied).
#[derive(Default)]
struct SseFrames {
    partial: Vec<u8>,
}

impl SseFrames {
    /// Hands each complete frame's data in `chunk` (after what an earlier chunk left) to `each`.
    fn push(&mut self, chunk: &[u8], mut each: impl FnMut(&[u8])) {
        static END: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\n\n"));
        let mut rest = chunk;
        if !self.partial.is_empty() {
            // Finish the split frame: its end is in this chunk (a "\n\n" possibly split too).
            let before = self.partial.len();
            self.partial.extend_from_slice(chunk);
            let seam = before - 1;
            let Some(end) = END.find(&self.partial[seam..]).map(|at| seam + at) else {
                return;
            };
            Self::frame(&self.partial[..end], &mut each);
            rest = &chunk[end + 2 - before..];
            self.partial.clear();
        }
        while let Some(end) = END.find(rest) {
            Self::frame(&rest[..end], &mut each);
            rest = &rest[end + 2..];
        }
        self.partial.extend_from_slice(rest);
    }

    fn frame(mut frame: &[u8], each: &mut impl FnMut(&[u8])) {
        loop {
            let end = memchr::memchr(b'\n', frame).unwrap_or(frame.len());
            if let Some(data) = frame[..end].strip_prefix(b"data: ") {
                each(data);
            }
            if end == frame.len() {
                return;
            }
            frame = &frame[end + 1..];
        }
    }
}

pub(super) async fn run(args: EventsArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(
        (1..=120).contains(&args.seconds),
        "--seconds must be 1 to 120"
    );
    anyhow::ensure!(
        (1..=100_000).contains(&args.rate),
        "--rate must be 1 to 100,000 events per second"
    );
    anyhow::ensure!(
        args.sse + args.ws <= 5_000,
        "at most 5,000 subscribers in all"
    );
    if let Some(url) = &args.clients_of {
        return clients(url, &args).await;
    }
    // The node serves at most half its open-files limit of connections at once.
    let needed = 2 * (args.sse + args.ws) as u64 + 256;
    if let Some(limit) = open_files_limit()
        && limit < needed
    {
        anyhow::bail!(
            "{} subscribers need about {needed} open files per process (the node serves half \
             its limit of connections at most), but the limit is {limit}; \
             raise it (e.g. `ulimit -n {needed}`) or use fewer subscribers (--sse, --ws)",
            args.sse + args.ws
        );
    }
    crate::tls::install_default_provider();
    let data_dir = std::env::temp_dir().join(format!("troupe-bench-{}", std::process::id()));
    let mut config = Config::default();
    config.log.level = "warn".into();
    // 1,100 subscribers connect with one token at once: the request limit is not under test.
    config.auth.requests_per_second = 1_000_000;
    config.auth.burst = 1_000_000;
    // … and hold every link: the per-token share is not under test either.
    config.auth.max_links_per_token = 10_000;
    if let Some(buffer) = args.subscriber_buffer {
        config.events.subscriber_buffer = buffer;
    }
    let subscriber_buffer = config.events.subscriber_buffer;
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let node = Node::builder()
        .config(config)
        .data_dir(&data_dir)
        .listener(listener)
        .start()
        .await?;
    let outcome = drive(&args, &node, subscriber_buffer).await;
    node.shutdown().await;
    let _ = std::fs::remove_dir_all(&data_dir);
    outcome
}

async fn drive(
    args: &EventsArgs,
    node: &crate::node::NodeHandle,
    subscriber_buffer: usize,
) -> anyhow::Result<ExitCode> {
    let addr = node.http_addr().context("the node has no HTTP address")?;
    let token = std::fs::read_to_string(node.admin_token_path())?
        .trim()
        .to_owned();
    let session = SessionId::new(SESSION).expect("a valid id");
    let total = args.rate * args.seconds;

    eprintln!(
        "starting {} SSE and {} WebSocket subscribers in a second process…",
        args.sse, args.ws
    );
    let mut child = tokio::process::Command::new(std::env::current_exe()?)
        .args(["bench", "events", "--clients-of", &format!("http://{addr}")])
        .args(["--sse", &args.sse.to_string(), "--ws", &args.ws.to_string()])
        .args(["--rate", &args.rate.to_string()])
        .args(["--seconds", &args.seconds.to_string()])
        .env(TOKEN_ENV, &token)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("cannot start the clients process")?;
    let mut lines = tokio::io::BufReader::new(child.stdout.take().context("no stdout")?).lines();
    let ready = tokio::time::timeout(Duration::from_secs(300), lines.next_line())
        .await
        .context("the clients process did not connect its subscribers within 300 s")??;
    anyhow::ensure!(
        ready.as_deref() == Some("ready"),
        "the clients process failed to start: {ready:?}"
    );

    let cpu_at_start = cpu_secs();
    let mut bus = node.subscribe(EventFilter {
        sessions: vec![session.clone()],
        ..EventFilter::all()
    });
    let deadline = Duration::from_secs(args.seconds + 30);
    let in_process = tokio::spawn(async move {
        let mut tally = Tally {
            transport: "in-process".into(),
            subscribers: 1,
            ..Tally::default()
        };
        let finished = tokio::time::timeout(deadline, async {
            while tally.delivered + tally.missed_in_markers < total {
                match bus.recv().await {
                    Some(Delivery::Event(event)) => {
                        if let EventData::SessionProgress(progress) = &event.data
                            && let Ok(sent) = progress.message.parse::<u64>()
                        {
                            tally.delivered += 1;
                            tally.latency_us.record(now_micros().saturating_sub(sent));
                        }
                    }
                    Some(Delivery::Lagged(lagged)) => {
                        tally.lag_markers += 1;
                        tally.missed_in_markers += lagged.missed;
                    }
                    None => break,
                }
            }
        })
        .await;
        if finished.is_err() || tally.delivered + tally.missed_in_markers < total {
            tally.cut_short = 1;
        }
        tally
    });

    eprintln!(
        "publishing {total} events at {}/s for {} s (subscriber buffer {subscriber_buffer})…",
        args.rate, args.seconds
    );
    let started = Instant::now();
    let per_tick = (args.rate / 1000).max(1);
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 * per_tick / args.rate));
    let mut published = 0;
    let mut peak_kib = resident_kib().unwrap_or(0);
    let mut last_sample = Instant::now();
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
        if last_sample.elapsed() >= Duration::from_millis(500) {
            peak_kib = peak_kib.max(resident_kib().unwrap_or(0));
            last_sample = Instant::now();
        }
    }
    let publish_secs = started.elapsed().as_secs_f64();
    let bus_tally = in_process.await?;
    let mut tallies = vec![bus_tally];
    while let Some(line) = tokio::time::timeout(deadline, lines.next_line())
        .await
        .context("the clients process did not report within the deadline")??
    {
        tallies.push(serde_json::from_str(&line).context("a tally line from the clients")?);
    }
    let node_cpu = cpu_secs() - cpu_at_start;
    let status = child.wait().await?;
    anyhow::ensure!(status.success(), "the clients process failed: {status}");
    let clients_cpu: f64 = tallies.iter().map(|tally| tally.cpu_secs).sum();
    let end_kib = resident_kib().unwrap_or(0);
    peak_kib = peak_kib.max(end_kib);

    outln!(
        "troupe bench events: {total} events at {}/s for {}s (published in {publish_secs:.1}s), \
         subscriber buffer {subscriber_buffer}; node process RSS peak {:.1} MiB, end {:.1} MiB",
        args.rate,
        args.seconds,
        peak_kib as f64 / 1024.0,
        end_kib as f64 / 1024.0,
    )?;
    outln!(
        "{:<11} {:>5} {:>12} {:>12} {:>10} {:>7} {:>6} {:>9} {:>9} {:>9}",
        "transport",
        "subs",
        "expected",
        "delivered",
        "lost",
        "markers",
        "short",
        "p50 ms",
        "p99 ms",
        "max ms"
    )?;
    for tally in &tallies {
        report(tally, total)?;
    }
    let deliveries: u64 = tallies.iter().map(|tally| tally.delivered).sum();
    let per_delivery = |secs: f64| secs * 1e9 / deliveries.max(1) as f64;
    outln!(
        "CPU while publishing and delivering: node process {node_cpu:.1} s ({:.0} ns per \
         delivery), clients process {clients_cpu:.1} s ({:.0} ns per delivery); load average \
         {}",
        per_delivery(node_cpu),
        per_delivery(clients_cpu),
        load_average().unwrap_or_else(|| "unknown".into()),
    )?;
    Ok(ExitCode::SUCCESS)
}

fn report(tally: &Tally, total: u64) -> anyhow::Result<()> {
    let expected = total * tally.subscribers;
    let ms = |value: Option<u64>| {
        value.map_or("-".to_owned(), |us| format!("{:.2}", us as f64 / 1000.0))
    };
    outln!(
        "{:<11} {:>5} {:>12} {:>12} {:>10} {:>7} {:>6} {:>9} {:>9} {:>9}",
        tally.transport,
        tally.subscribers,
        expected,
        tally.delivered,
        expected.saturating_sub(tally.delivered),
        tally.lag_markers,
        tally.cut_short,
        ms(tally.latency_us.quantile(0.5)),
        ms(tally.latency_us.quantile(0.99)),
        ms((tally.latency_us.total() > 0).then_some(tally.latency_us.max)),
    )
}

/// The clients process: opens the subscribers, says `ready`, counts until each has seen every
/// event (or the deadline), and prints one JSON tally per transport.
async fn clients(base: &str, args: &EventsArgs) -> anyhow::Result<ExitCode> {
    let token = std::env::var(TOKEN_ENV).with_context(|| format!("{TOKEN_ENV} is not set"))?;
    let total = args.rate * args.seconds;
    let deadline = Duration::from_secs(args.seconds + 30);
    let sse = Arc::new(Mutex::new(Tally {
        transport: "sse".into(),
        ..Tally::default()
    }));
    let ws = Arc::new(Mutex::new(Tally {
        transport: "websocket".into(),
        ..Tally::default()
    }));
    let http = reqwest::Client::new();
    let mut tasks = Vec::new();
    for _ in 0..args.sse {
        let response = http
            .get(format!("{base}/v1/events?session={SESSION}"))
            .bearer_auth(&token)
            .send()
            .await?
            .error_for_status()?;
        let sink = sse.clone();
        tasks.push(tokio::spawn(async move {
            let mut chunks = response.bytes_stream();
            let mut frames = SseFrames::default();
            let mut tally = Tally {
                subscribers: 1,
                ..Tally::default()
            };
            let _ = tokio::time::timeout(deadline, async {
                while tally.delivered + tally.missed_in_markers < total {
                    match chunks.next().await {
                        Some(Ok(chunk)) => {
                            let now = now_micros();
                            frames.push(&chunk, |data| tally.record_frame(data, now));
                        }
                        _ => break,
                    }
                }
            })
            .await;
            tally.cut_short = u64::from(tally.delivered + tally.missed_in_markers < total);
            sink.lock().await.merge(&tally);
        }));
    }
    let ws_base = base.replacen("http://", "ws://", 1);
    for _ in 0..args.ws {
        let mut request =
            format!("{ws_base}/v1/events/ws?session={SESSION}").into_client_request()?;
        request.headers_mut().insert(
            "authorization",
            HeaderValue::from_str(&format!("Bearer {token}"))?,
        );
        let (mut socket, _) = tokio_tungstenite::connect_async(request).await?;
        let sink = ws.clone();
        tasks.push(tokio::spawn(async move {
            let mut tally = Tally {
                subscribers: 1,
                ..Tally::default()
            };
            let _ = tokio::time::timeout(deadline, async {
                while tally.delivered + tally.missed_in_markers < total {
                    match socket.next().await {
                        Some(Ok(Message::Text(text))) => {
                            tally.record_frame(text.as_bytes(), now_micros());
                        }
                        Some(Ok(_)) => {}
                        _ => break,
                    }
                }
            })
            .await;
            tally.cut_short = u64::from(tally.delivered + tally.missed_in_markers < total);
            sink.lock().await.merge(&tally);
        }));
    }
    outln!("ready")?;
    let cpu_at_start = cpu_secs();
    for task in tasks {
        let _ = task.await;
    }
    // The process's CPU goes to the transport of most subscribers (the two share it).
    let cpu = cpu_secs() - cpu_at_start;
    let (mut sse, mut ws) = (sse.lock().await.clone(), ws.lock().await.clone());
    if sse.subscribers >= ws.subscribers {
        sse.cpu_secs = cpu;
    } else {
        ws.cpu_secs = cpu;
    }
    for tally in [sse, ws] {
        outln!("{}", serde_json::to_string(&tally)?)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// CPU seconds (user + system) this process has used.
fn cpu_secs() -> f64 {
    use nix::sys::resource::{UsageWho, getrusage};
    getrusage(UsageWho::RUSAGE_SELF).map_or(0.0, |usage| {
        let seconds =
            |time: nix::sys::time::TimeVal| time.tv_sec() as f64 + time.tv_usec() as f64 / 1e6;
        seconds(usage.user_time()) + seconds(usage.system_time())
    })
}

/// The machine's load averages (1, 5, 15 minutes), from `/proc/loadavg`.
fn load_average() -> Option<String> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    Some(
        text.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
    )
}

/// This process's resident memory, from `/proc/self/status`.
fn resident_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
}

/// The soft limit of open files, from `/proc/self/limits`.
fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tallies_count_progress_events_and_lag_markers_of_sse_and_websocket_frames() {
        let mut tally = Tally::default();
        let sent = now_micros();
        let now = now_micros();
        tally.record_frame(format!(
            r#"{{"id":"a:1","kind":"session.progress","data":{{"message":"{sent}","current":0}}}}"#
        ).as_bytes(), now);
        tally.record_frame(format!(
            r#"{{"type":"event","event":{{"kind":"session.progress","data":{{"message":"{sent}"}}}}}}"#
        ).as_bytes(), now);
        tally.record_frame(
            br#"{"type":"event","event":{"id":null,"kind":"events.lagged","data":{"missed":7,"resume_after":"a:3"}}}"#,
            now,
        );
        tally.record_frame(br#"{"kind":"link.connected","data":{}}"#, now);
        tally.record_frame(b"not json", now);
        assert_eq!(tally.delivered, 2);
        assert_eq!(tally.lag_markers, 1);
        assert_eq!(tally.missed_in_markers, 7);
        assert_eq!(tally.latency_us.total(), 2);
    }

    #[test]
    fn sse_frames_are_found_whatever_the_chunk_boundaries() {
        let stream: &[u8] = b"data: {\"n\":1}\nid: a:1\n\n: heartbeat\n\ndata: {\"n\":2}\n\n\
                               data: {\"n\":3}\nid: a:3\n\n";
        let expected: Vec<&[u8]> = vec![b"{\"n\":1}", b"{\"n\":2}", b"{\"n\":3}"];
        for size in 1..=stream.len() {
            let mut frames = SseFrames::default();
            let mut seen = Vec::new();
            for chunk in stream.chunks(size) {
                frames.push(chunk, |data| seen.push(data.to_vec()));
            }
            assert_eq!(seen, expected, "chunks of {size} bytes");
            assert!(frames.partial.is_empty(), "chunks of {size} bytes");
        }
    }

    #[test]
    fn the_histogram_keeps_quantiles_within_its_precision() {
        let mut histogram = Histogram::default();
        for value in 1..=100_000u64 {
            histogram.record(value);
        }
        let p50 = histogram.quantile(0.5).unwrap() as f64;
        let p99 = histogram.quantile(0.99).unwrap() as f64;
        assert!((p50 - 50_000.0).abs() / 50_000.0 < 0.02, "{p50}");
        assert!((p99 - 99_000.0).abs() / 99_000.0 < 0.02, "{p99}");
        assert_eq!(histogram.max, 100_000);
        for value in [0, 1, 1023, 1024, 5000, 1 << 40] {
            let bucket = Histogram::value(Histogram::index(value));
            assert!(
                bucket <= value && value - bucket <= value / 60,
                "{value}: {bucket}"
            );
        }
        let mut other = Histogram::default();
        other.record(7);
        histogram.merge(&other);
        assert_eq!(histogram.total(), 100_001);
    }
}
