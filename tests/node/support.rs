//! Starting the real `troupe` binary and talking to it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use eventsource_stream::Eventsource;
use futures::{Stream, StreamExt};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::Notify;

/// Generous bound for things that normally take milliseconds (shared, loaded CI machines).
pub const PATIENCE: Duration = Duration::from_secs(30);

pub fn troupe_bin() -> &'static str {
    env!("CARGO_BIN_EXE_troupe")
}

/// Log lines of a node (its stderr, JSON), shared with a reader task.
#[derive(Clone, Default)]
pub struct Logs {
    lines: Arc<Mutex<Vec<String>>>,
    changed: Arc<Notify>,
}

impl Logs {
    pub fn all(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    pub fn json(&self) -> Vec<Value> {
        self.all()
            .iter()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect()
    }

    /// Waits for a JSON log line matching `predicate` and returns it.
    pub async fn wait_for(&self, what: &str, predicate: impl Fn(&Value) -> bool) -> Value {
        let found = tokio::time::timeout(PATIENCE, async {
            loop {
                let notified = self.changed.notified();
                if let Some(line) = self.json().into_iter().find(|line| predicate(line)) {
                    return line;
                }
                notified.await;
            }
        })
        .await;
        found.unwrap_or_else(|_| {
            panic!(
                "no log line {what} within {PATIENCE:?}; logs:\n{}",
                self.all().join("\n")
            )
        })
    }

    fn push(&self, line: String) {
        self.lines.lock().unwrap().push(line);
        self.changed.notify_waiters();
    }
}

/// A running `troupe node`.
pub struct NodeProcess {
    pub child: Child,
    pub addr: SocketAddr,
    pub token: String,
    pub logs: Logs,
    pub data_dir: PathBuf,
    /// The cluster (QUIC) address, when the cluster is on.
    pub cluster: Option<SocketAddr>,
    _temp: Option<tempfile::TempDir>,
}

impl NodeProcess {
    /// Starts a node on `127.0.0.1:0` with a fresh data directory and JSON logs.
    pub async fn start(extra: &[&str]) -> Self {
        let temp = tempfile::tempdir().unwrap();
        let data_dir = temp.path().join("data");
        let mut node = Self::start_in(&data_dir, extra).await;
        node._temp = Some(temp);
        node
    }

    /// Starts a node with the given data directory.
    pub async fn start_in(data_dir: &Path, extra: &[&str]) -> Self {
        troupe::tls::install_default_provider();
        let (mut child, logs) = spawn_node(data_dir, extra);
        let started = tokio::select! {
            started = logs.wait_for("\"node started\"", |line| line["message"] == "node started") => started,
            status = child.wait() => panic!(
                "the node exited at start-up with {status:?}; logs:\n{}",
                logs.all().join("\n")
            ),
        };
        let addr: SocketAddr = started["http"].as_str().unwrap().parse().unwrap();
        let cluster = started["cluster"]
            .as_str()
            .and_then(|addr| addr.parse::<SocketAddr>().ok());
        let token = std::fs::read_to_string(data_dir.join("admin.token"))
            .unwrap()
            .trim()
            .to_owned();
        Self {
            child,
            addr,
            token,
            logs,
            data_dir: data_dir.to_owned(),
            cluster,
            _temp: None,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn client(&self) -> reqwest::Client {
        reqwest::Client::builder().build().unwrap()
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client()
            .get(self.url(path))
            .bearer_auth(&self.token)
            .send()
            .await
            .unwrap()
    }

    pub async fn post_json(&self, path: &str, body: Value) -> reqwest::Response {
        self.client()
            .post(self.url(path))
            .bearer_auth(&self.token)
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    /// Opens `/v1/events` with `query` and optional `Last-Event-ID`.
    pub async fn events(&self, query: &str, last_event_id: Option<&str>) -> SseStream {
        let mut request = self
            .client()
            .get(self.url(&format!("/v1/events?{query}")))
            .bearer_auth(&self.token);
        if let Some(id) = last_event_id {
            request = request.header("Last-Event-ID", id);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 200, "events stream refused");
        SseStream {
            inner: Box::pin(response.bytes_stream().eventsource().map(|event| {
                event
                    .map(|event| (event.id, event.data))
                    .map_err(|e| e.to_string())
            })),
        }
    }

    pub fn terminate(&self) {
        let pid = self.child.id().expect("running") as i32;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
    }

    pub async fn wait_exit(&mut self) -> std::process::ExitStatus {
        tokio::time::timeout(PATIENCE, self.child.wait())
            .await
            .expect("the node exits")
            .unwrap()
    }
}

/// Starts the binary; returns it and its log lines.
pub fn spawn_node(data_dir: &Path, extra: &[&str]) -> (Child, Logs) {
    let mut command = Command::new(troupe_bin());
    command
        .args(["node", "--listen", "127.0.0.1:0", "--log-format", "json"])
        .arg("--data-dir")
        .arg(data_dir)
        .args(extra)
        .env_remove("RUST_BACKTRACE")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = command.spawn().expect("the troupe binary runs");
    let logs = Logs::default();
    let stderr = child.stderr.take().unwrap();
    tokio::spawn({
        let logs = logs.clone();
        async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                logs.push(line);
            }
        }
    });
    (child, logs)
}

/// `(id, data)` of one SSE event, or why the stream broke.
type SseItem = Result<(String, String), String>;

/// An SSE stream of `(id, data)` pairs.
pub struct SseStream {
    inner: std::pin::Pin<Box<dyn Stream<Item = SseItem> + Send>>,
}

impl SseStream {
    /// The next event as `(id, json)`; panics after [`PATIENCE`].
    pub async fn next(&mut self) -> (String, Value) {
        let (id, data) = tokio::time::timeout(PATIENCE, self.inner.next())
            .await
            .expect("an event within the patience")
            .expect("the stream is open")
            .expect("a well-formed event");
        (id, serde_json::from_str(&data).expect("JSON data"))
    }

    /// The next event whose kind is `kind`.
    pub async fn next_of(&mut self, kind: &str) -> (String, Value) {
        loop {
            let (id, event) = self.next().await;
            if event["kind"] == kind {
                return (id, event);
            }
        }
    }

    /// Waits until the server ends the stream (or it errors); panics if it stays open.
    pub async fn closed(&mut self) {
        tokio::time::timeout(PATIENCE, async {
            while let Some(Ok(_)) = self.inner.next().await {}
        })
        .await
        .expect("the stream ends");
    }
}
