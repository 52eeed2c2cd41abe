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

    /// Waits (up to [`PATIENCE`]) until the lines so far contain `needle`; returns them all,
    /// joined, either way (the caller's assertion says what was missing).
    pub async fn wait_text(&self, needle: &str) -> String {
        let found = tokio::time::timeout(PATIENCE, async {
            loop {
                let notified = self.changed.notified();
                let text = self.all().join("\n");
                if text.contains(needle) {
                    return text;
                }
                notified.await;
            }
        })
        .await;
        found.unwrap_or_else(|_| self.all().join("\n"))
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
        Self::start_with(data_dir, extra, &NodeEnv::default()).await
    }

    /// Starts a node with the given data directory, environment and working directory.
    pub async fn start_with(data_dir: &Path, extra: &[&str], env: &NodeEnv) -> Self {
        troupe::tls::install_default_provider();
        let (mut child, logs) = spawn_node_with(data_dir, extra, env);
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

    /// Makes actor `actor` panic through `/v1/admin/faults` (the node runs with
    /// `--fault-injection`); the fault is accepted.
    pub async fn inject_panic(&self, actor: &str) {
        let response = self
            .post_json(
                "/v1/admin/faults",
                serde_json::json!({"actor": actor, "kind": "panic"}),
            )
            .await;
        assert_eq!(response.status(), 202, "the fault into {actor} is accepted");
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

/// What a node process gets besides its arguments.
#[derive(Debug, Default, Clone)]
pub struct NodeEnv {
    /// Extra environment variables.
    pub vars: Vec<(String, String)>,
    /// The node's working directory (its default workspace root); the test's when `None`.
    pub cwd: Option<PathBuf>,
}

/// Starts the binary; returns it and its log lines.
pub fn spawn_node(data_dir: &Path, extra: &[&str]) -> (Child, Logs) {
    spawn_node_with(data_dir, extra, &NodeEnv::default())
}

/// Starts the binary with `env`; returns it and its log lines.
pub fn spawn_node_with(data_dir: &Path, extra: &[&str], env: &NodeEnv) -> (Child, Logs) {
    let mut command = Command::new(troupe_bin());
    if let Some(cwd) = &env.cwd {
        command.current_dir(cwd);
    }
    command
        .args(["node", "--listen", "127.0.0.1:0", "--log-format", "json"])
        .arg("--data-dir")
        .arg(data_dir)
        .args(extra)
        // Keep test nodes out of the user's discovery directory (a test may override this).
        .env("TROUPE_DISCOVERY_DIR", data_dir.join("discovery"))
        .envs(env.vars.iter().cloned())
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

    /// The next raw item, `None` when the stream ended.
    pub async fn next_raw(&mut self) -> Option<SseItem> {
        self.inner.next().await
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

impl NodeProcess {
    pub async fn delete(&self, path: &str) -> reqwest::Response {
        self.client()
            .delete(self.url(path))
            .bearer_auth(&self.token)
            .send()
            .await
            .unwrap()
    }

    /// `POST /v1/sessions` that must be accepted (202); returns the record.
    pub async fn spawn_session(&self, body: Value) -> Value {
        let response = self.post_json("/v1/sessions", body.clone()).await;
        let status = response.status();
        let record: Value = response.json().await.unwrap();
        assert_eq!(status, 202, "spawning {body} was refused: {record}");
        record
    }

    /// `GET /v1/sessions/{id}`.
    pub async fn session(&self, id: &str) -> Value {
        let response = self.get(&format!("/v1/sessions/{id}")).await;
        assert_eq!(response.status(), 200, "session {id}");
        response.json().await.unwrap()
    }

    /// Follows a session's output (`?follow=true`) from line `offset` until the stream's `end`
    /// event; returns the lines seen and the final state. Stops early, without the state, once a
    /// line satisfies `until`.
    pub async fn follow_output(
        &self,
        id: &str,
        until: impl Fn(&Value) -> bool,
    ) -> (Vec<Value>, Option<String>) {
        let response = self
            .get(&format!("/v1/sessions/{id}/output?follow=true"))
            .await;
        assert_eq!(response.status(), 200, "following {id}");
        let mut events = response.bytes_stream().eventsource();
        let mut lines = Vec::new();
        let outcome = tokio::time::timeout(PATIENCE, async {
            while let Some(event) = events.next().await {
                let event = event.expect("a well-formed SSE event");
                let data: Value = serde_json::from_str(&event.data).expect("JSON data");
                match event.event.as_str() {
                    "end" => return Some(data["state"].as_str().unwrap().to_owned()),
                    "error" => panic!("the output stream of {id} failed: {data}"),
                    _ => {
                        let done = until(&data);
                        lines.push(data);
                        if done {
                            return None;
                        }
                    }
                }
            }
            panic!("the output stream of {id} ended without an `end` event");
        })
        .await
        .unwrap_or_else(|_| panic!("session {id} did not finish within {PATIENCE:?}"));
        (lines, outcome)
    }

    /// Follows a session's output to the end; returns the texts of its lines and its state.
    pub async fn run_to_end(&self, id: &str) -> (Vec<String>, String) {
        let (lines, state) = self.follow_output(id, |_| false).await;
        let texts = lines
            .iter()
            .map(|line| line["text"].as_str().unwrap().to_owned())
            .collect();
        (texts, state.expect("an end state"))
    }
}

/// Live (not zombie) processes whose process group is `pgid`, from `/proc`.
pub fn live_group_members(pgid: i32) -> Vec<i32> {
    let mut members = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid pgrp …; comm may hold spaces and parentheses.
        let Some(rest) = stat.rfind(')').map(|end| &stat[end + 1..]) else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.len() > 2 && fields[0] != "Z" && fields[2].parse() == Ok(pgid) {
            members.push(pid);
        }
    }
    members
}

/// Whether `pid` is a live (not zombie) process.
pub fn is_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rfind(')')
            .and_then(|end| stat[end + 1..].split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// Waits (bounded) until none of `pids` and no member of group `pgid` is alive; panics naming
/// the survivors otherwise. Killing is asynchronous: a signalled process exits a moment later.
pub async fn wait_all_dead(pgid: i32, pids: &[i32]) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let mut alive: Vec<i32> = pids.iter().copied().filter(|pid| is_alive(*pid)).collect();
        alive.extend(live_group_members(pgid));
        if alive.is_empty() {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "processes still alive after {PATIENCE:?}: {alive:?} (group {pgid})"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs the `troupe` CLI against `node` (address from `TROUPE_URL`, token from its data dir);
/// returns its exit status, stdout and stderr.
pub async fn run_cli(
    node: &NodeProcess,
    args: &[&str],
) -> (std::process::ExitStatus, String, String) {
    let output = tokio::time::timeout(
        PATIENCE,
        Command::new(troupe_bin())
            .args(args)
            .env("TROUPE_URL", format!("http://{}", node.addr))
            .env("TROUPE_DATA_DIR", &node.data_dir)
            .env_remove("TROUPE_TOKEN")
            .stdin(Stdio::null())
            .output(),
    )
    .await
    .expect("the command finishes")
    .unwrap();
    (
        output.status,
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// A test that needs a real client (a Python package) which is not installed: prints why and
/// lets the test return early, unless `TROUPE_REQUIRE_CLIENTS=1` (set by `.ci/run`, which
/// installs them), where a missing client is a failure rather than a silent skip.
pub fn skip_without_python_client(why: &str) {
    if std::env::var("TROUPE_REQUIRE_CLIENTS").as_deref() == Ok("1") {
        panic!("TROUPE_REQUIRE_CLIENTS=1 but {why}");
    }
    println!("SKIPPED: {why}");
}

/// Opens links on `from` (each publishes a `link.connected` of `from`) until one of them is
/// relayed to `to` (its watcher `relayed` filters `node=<from>`): the relay link is up. Returns
/// that event's id and the links, which must stay open.
pub async fn relay_up(from: &NodeProcess, relayed: &mut SseStream) -> (String, Vec<SseStream>) {
    relay_up_after(from, relayed, 0).await
}

/// [`relay_up`] for a receiver that may still be catching up on older events of `from` (a
/// `link.connected` among them): only one numbered after `after` (a sequence number of
/// `from`'s) counts.
pub async fn relay_up_after(
    from: &NodeProcess,
    relayed: &mut SseStream,
    after: u64,
) -> (String, Vec<SseStream>) {
    let mut opened = Vec::new();
    let id = tokio::time::timeout(PATIENCE, async {
        loop {
            opened.push(from.events("kind=provider.retry", None).await);
            let newer = async {
                loop {
                    let (id, _) = relayed.next_of("link.connected").await;
                    if sequence_number(&id) > after {
                        return id;
                    }
                }
            };
            if let Ok(id) = tokio::time::timeout(Duration::from_millis(500), newer).await {
                return id;
            }
        }
    })
    .await
    .expect("the relay link comes up");
    (id, opened)
}

/// The sequence number of event id `NODE:SEQ`.
pub fn sequence_number(id: &str) -> u64 {
    id.rsplit_once(':')
        .and_then(|(_, seq)| seq.parse().ok())
        .unwrap_or_else(|| panic!("{id:?} is not an event id"))
}

/// Starts cluster node `name` in `root/name` with the configuration `config` (written to
/// `root/name.toml`), listening for the cluster on `127.0.0.1:0` and joining `join` when given;
/// `flags` go after. Panics when the node has no cluster address.
pub async fn start_cluster_node(
    root: &Path,
    name: &str,
    config: &str,
    join: Option<SocketAddr>,
    flags: &[&str],
) -> NodeProcess {
    let file = root.join(format!("{name}.toml"));
    std::fs::write(&file, config).unwrap();
    let join = join.map(|addr| addr.to_string());
    let mut args = vec![
        "--config",
        file.to_str().unwrap(),
        "--node-id",
        name,
        "--cluster-listen",
        "127.0.0.1:0",
    ];
    if let Some(join) = &join {
        args.extend(["--join", join.as_str()]);
    }
    args.extend(flags);
    let node = NodeProcess::start_in(&root.join(name), &args).await;
    assert!(node.cluster.is_some(), "node {name} has no cluster address");
    node
}
