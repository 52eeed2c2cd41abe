//! Events over WebSocket and resumes from the persisted event log, through the real binary.

use std::collections::BTreeSet;

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

use crate::support::*;

/// A node with a tiny ring (so resumes go to the log) and a workspace to run commands in.
struct Fixture {
    node: NodeProcess,
    _temp: tempfile::TempDir,
}

impl Fixture {
    async fn start(ring: usize) -> Self {
        Self::start_with(ring, &[]).await
    }

    async fn start_with(ring: usize, vars: &[(&str, &str)]) -> Self {
        let temp = tempfile::tempdir().unwrap();
        let workspace = temp.path().join("ws");
        std::fs::create_dir_all(&workspace).unwrap();
        let mut env_vars = vec![("TROUPE_EVENTS__RING_CAPACITY".into(), ring.to_string())];
        env_vars.extend(vars.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
        let env = NodeEnv {
            vars: env_vars,
            cwd: Some(workspace),
        };
        let node = NodeProcess::start_with(&temp.path().join("data"), &[], &env).await;
        Self { node, _temp: temp }
    }
}

/// Runs a command printing `lines` lines; returns its session id.
async fn spawn_lines(node: &NodeProcess, lines: usize) -> String {
    let record = node
        .spawn_session(json!({
            "kind": "command",
            "program": "sh",
            "args": ["-c", format!("for i in $(seq 1 {lines}); do echo line $i; done")],
        }))
        .await;
    record["id"].as_str().unwrap().to_owned()
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A WebSocket client of `/v1/events/ws`.
struct WsEvents {
    socket: Socket,
    /// Where the link said it starts (its `start` frame), when it did not resume.
    start: Option<String>,
    /// A frame read ahead while looking for the `start` frame.
    ahead: Option<Value>,
}

impl WsEvents {
    async fn open(node: &NodeProcess, query: &str) -> Self {
        let request = ws_request(node, &format!("/v1/events/ws?{query}"), &node.token);
        let (socket, response) =
            tokio::time::timeout(PATIENCE, tokio_tungstenite::connect_async(request))
                .await
                .expect("the upgrade answers")
                .expect("the upgrade succeeds");
        assert_eq!(response.status(), 101);
        let mut link = Self {
            socket,
            start: None,
            ahead: None,
        };
        // A link that does not resume starts with `start` (when the node has published
        // anything yet); one that resumes never does.
        let first = link.next().await;
        if first["type"] == "start" {
            assert!(
                !query.contains("after="),
                "a resumed link says no start: {first}"
            );
            link.start = Some(first["after"].as_str().unwrap().to_owned());
        } else {
            link.ahead = Some(first);
        }
        link
    }

    /// The next JSON frame (pings are skipped); panics after [`PATIENCE`].
    async fn next(&mut self) -> Value {
        if let Some(frame) = self.ahead.take() {
            return frame;
        }
        loop {
            let frame = tokio::time::timeout(PATIENCE, self.socket.next())
                .await
                .expect("a frame within the patience")
                .expect("the socket is open")
                .expect("a well-formed frame");
            match frame {
                Message::Text(text) => return serde_json::from_str(&text).expect("JSON"),
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("unexpected frame {other:?}"),
            }
        }
    }

    /// The next event frame's event.
    async fn next_event(&mut self) -> Value {
        let frame = self.next().await;
        assert_eq!(frame["type"], "event", "{frame}");
        frame["event"].clone()
    }

    async fn send(&mut self, value: Value) {
        self.socket
            .send(Message::Text(value.to_string().into()))
            .await
            .unwrap();
    }

    /// Waits until the node closes the socket; returns the close code.
    async fn closed(&mut self) -> Option<u16> {
        tokio::time::timeout(PATIENCE, async {
            while let Some(frame) = self.socket.next().await {
                match frame {
                    Ok(Message::Close(close)) => return close.map(|close| u16::from(close.code)),
                    Ok(_) => continue,
                    Err(_) => return None,
                }
            }
            None
        })
        .await
        .expect("the node closes the socket")
    }
}

fn ws_request(
    node: &NodeProcess,
    path: &str,
    token: &str,
) -> tokio_tungstenite::tungstenite::handshake::client::Request {
    let mut request = format!("ws://{}{path}", node.addr)
        .into_client_request()
        .unwrap();
    request.headers_mut().insert(
        "authorization",
        HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
    );
    request
}

/// Session events seen on an SSE stream through the `sessions`-th `session.succeeded`:
/// `(id, kind)`.
async fn session_events_sse(stream: &mut SseStream, sessions: usize) -> Vec<(String, String)> {
    let mut seen = Vec::new();
    let mut succeeded = 0;
    loop {
        let (id, event) = stream.next().await;
        let kind = event["kind"].as_str().unwrap().to_owned();
        assert_ne!(kind, "events.lagged", "no gap expected: {event}");
        succeeded += usize::from(kind == "session.succeeded");
        seen.push((id, kind));
        if succeeded == sessions {
            return seen;
        }
    }
}

async fn session_events_ws(ws: &mut WsEvents, sessions: usize) -> Vec<(String, String)> {
    let mut seen = Vec::new();
    let mut succeeded = 0;
    loop {
        let event = ws.next_event().await;
        let kind = event["kind"].as_str().unwrap().to_owned();
        assert_ne!(kind, "events.lagged", "no gap expected: {event}");
        succeeded += usize::from(kind == "session.succeeded");
        seen.push((event["id"].as_str().unwrap().to_owned(), kind));
        if succeeded == sessions {
            return seen;
        }
    }
}

#[tokio::test]
async fn a_resume_older_than_the_ring_is_served_from_the_event_log_on_sse_and_websocket() {
    let fixture = Fixture::start(4).await;
    let node = &fixture.node;
    let mut reference = node.events("kind=session.*", None).await;
    // Each session has at least queued, started, output and succeeded events.
    const SESSIONS: usize = 4;
    for _ in 0..SESSIONS {
        spawn_lines(node, 3).await;
    }
    let all = session_events_sse(&mut reference, SESSIONS).await;
    assert!(all.len() > 8, "more events than the ring holds: {all:?}");
    assert_eq!(all[0].1, "session.queued");
    let first = all[0].0.clone();
    let expected: Vec<String> = all[1..].iter().map(|(id, _)| id.clone()).collect();

    // SSE, Last-Event-ID, replay only.
    let response = node
        .client()
        .get(node.url("/v1/events?kind=session.*&follow=false"))
        .bearer_auth(&node.token)
        .header("Last-Event-ID", &first)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body = tokio::time::timeout(PATIENCE, response.text())
        .await
        .unwrap()
        .unwrap();
    assert!(!body.contains("events.lagged"), "{body}");
    let ids: Vec<String> = body
        .lines()
        .filter_map(|line| line.strip_prefix("id:").map(|id| id.trim().to_owned()))
        .collect();
    assert_eq!(ids, expected, "exactly the events after the id, in order");

    // SSE, followed: the same, then live.
    let mut resumed = node.events("kind=session.*", Some(&first)).await;
    let got: Vec<String> = session_events_sse(&mut resumed, SESSIONS)
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(got, expected);

    // WebSocket, ?after=.
    let mut ws = WsEvents::open(node, &format!("kind=session.*&after={first}")).await;
    let got: Vec<String> = session_events_ws(&mut ws, SESSIONS)
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(got, expected);

    // An id the log never held: a gap marker, then live events.
    let mut unknown = WsEvents::open(node, "kind=session.*&after=nowhere:1").await;
    let marker = unknown.next_event().await;
    assert_eq!(marker["kind"], "events.lagged", "{marker}");
}

#[tokio::test]
async fn a_websocket_and_an_sse_subscriber_see_the_same_session_events_in_order() {
    let fixture = Fixture::start(10_000).await;
    let node = &fixture.node;
    let mut sse = node.events("kind=session.*", None).await;
    let mut ws = WsEvents::open(node, "kind=session.*").await;
    let id = spawn_lines(node, 5).await;
    let over_sse = session_events_sse(&mut sse, 1).await;
    let over_ws = session_events_ws(&mut ws, 1).await;
    assert_eq!(over_ws, over_sse);
    let unique: BTreeSet<_> = over_ws.iter().collect();
    assert_eq!(unique.len(), over_ws.len(), "no duplicates");
    assert_eq!(over_ws.first().unwrap().1, "session.queued");
    assert!(over_ws.iter().any(|(_, kind)| kind == "session.output"));

    // The link is listed with its transport.
    let links: Value = node.get("/v1/links").await.json().await.unwrap();
    assert!(
        links.to_string().contains("\"web_socket\""),
        "the WebSocket link is listed: {links}"
    );
    let _ = id;
}

#[tokio::test]
async fn a_websocket_link_says_where_it_starts_and_resuming_from_there_misses_nothing() {
    let fixture = Fixture::start(10_000).await;
    let node = &fixture.node;
    // The node has published something (this stream's link.connected).
    let mut sse = node.events("kind=link.connected", None).await;
    sse.next_of("link.connected").await;
    // A link whose filter matches nothing yet still knows where it started…
    let ws = WsEvents::open(node, "kind=session.queued").await;
    let start = ws.start.clone().expect("a start frame");
    drop(ws);
    // … so what happened while it was away is there when it comes back.
    let id = spawn_lines(node, 1).await;
    let mut back = WsEvents::open(node, &format!("kind=session.queued&after={start}")).await;
    assert!(back.start.is_none(), "a resumed link says no start");
    let event = back.next_event().await;
    assert_eq!(
        (event["kind"].as_str(), event["session"].as_str()),
        (Some("session.queued"), Some(id.as_str()))
    );
}

#[tokio::test]
async fn subscribe_and_unsubscribe_change_a_live_websocket_link() {
    let fixture = Fixture::start(10_000).await;
    let node = &fixture.node;
    // Starts with link events only.
    let mut ws = WsEvents::open(node, "kind=link.*").await;
    let connected = ws.next_event().await;
    assert_eq!(connected["kind"], "link.connected");

    ws.send(json!({"type": "subscribe", "name": "sessions", "filter": {"kind": ["session.*"]}}))
        .await;
    let answer = ws.next().await;
    assert_eq!(answer["type"], "subscribed", "{answer}");
    assert_eq!(answer["subscriptions"], json!(["default", "sessions"]));
    ws.send(json!({"type": "unsubscribe", "name": "default"}))
        .await;
    let answer = ws.next().await;
    assert_eq!(answer["type"], "unsubscribed", "{answer}");
    assert_eq!(answer["subscriptions"], json!(["sessions"]));

    // Another link comes and goes (link events, no longer subscribed), then a session runs.
    drop(node.events("kind=session.*", None).await);
    let id = spawn_lines(node, 2).await;
    let event = ws.next_event().await;
    assert_eq!(
        event["kind"], "session.queued",
        "link events are gone: {event}"
    );
    assert_eq!(event["session"], id.as_str());

    // Bad frames are answered and the link stays.
    for (frame, code) in [
        (
            json!({"type": "subscribe", "filter": {"kind": ["nope"]}}),
            "invalid_filter",
        ),
        (
            json!({"type": "unsubscribe", "name": "never"}),
            "not_subscribed",
        ),
        (json!({"type": "dance"}), "invalid_message"),
        (
            json!({"type": "subscribe", "name": "has space"}),
            "invalid_subscription",
        ),
    ] {
        ws.send(frame.clone()).await;
        let answer = loop {
            let frame = ws.next().await;
            if frame["type"] != "event" {
                break frame;
            }
        };
        assert_eq!(answer["type"], "error", "{frame}: {answer}");
        assert_eq!(answer["code"], code, "{frame}: {answer}");
    }
    ws.socket
        .send(Message::Binary(vec![1, 2, 3].into()))
        .await
        .unwrap();
    let answer = loop {
        let frame = ws.next().await;
        if frame["type"] != "event" {
            break frame;
        }
    };
    assert_eq!(answer["code"], "binary_frame");

    // A frame far larger than the link's 4 KiB socket reads, yet within the limit, is read whole.
    let padded = format!(
        "{}{}",
        json!({"type": "subscribe", "name": "big", "filter": {"kind": ["provider.*"]}}),
        " ".repeat(40 * 1024)
    );
    ws.socket.send(Message::Text(padded.into())).await.unwrap();
    let answer = loop {
        let frame = ws.next().await;
        if frame["type"] != "event" {
            break frame;
        }
    };
    assert_eq!(answer["type"], "subscribed", "{answer}");
    assert_eq!(answer["name"], "big");

    // An oversize frame closes this link only.
    let mut other = WsEvents::open(node, "kind=link.*").await;
    assert_eq!(other.next_event().await["kind"], "link.connected");
    let _ = ws
        .socket
        .send(Message::Text("x".repeat(200 * 1024).into()))
        .await;
    ws.closed().await;
    let disconnected = other.next_event().await;
    assert_eq!(disconnected["kind"], "link.disconnected", "{disconnected}");
    let health = node.get("/v1/health").await;
    assert_eq!(health.status(), 200);
}

#[tokio::test]
async fn websocket_upgrades_check_token_role_host_and_origin() {
    let fixture = Fixture::start(10_000).await;
    let node = &fixture.node;
    let refused = |request| async move {
        match tokio_tungstenite::connect_async(request).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                response.status().as_u16()
            }
            other => panic!("expected an HTTP refusal, got {other:?}"),
        }
    };
    assert_eq!(
        refused(ws_request(node, "/v1/events/ws", "wrong")).await,
        401
    );
    let mut rebinding = ws_request(node, "/v1/events/ws", &node.token);
    rebinding
        .headers_mut()
        .insert("host", HeaderValue::from_static("evil.example"));
    assert_eq!(refused(rebinding).await, 403);
    let mut cross_origin = ws_request(node, "/v1/events/ws", &node.token);
    cross_origin
        .headers_mut()
        .insert("origin", HeaderValue::from_static("https://evil.example"));
    assert_eq!(refused(cross_origin).await, 403);
    assert_eq!(
        refused(ws_request(node, "/v1/events/ws?kind=nope", &node.token)).await,
        400
    );
}

/// A `troupe mcp` process driven over its stdin and stdout.
struct StdioMcp {
    child: tokio::process::Child,
    stdin: Option<tokio::process::ChildStdin>,
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
    /// Its log lines, when started with [`StdioMcp::start_logged`].
    logs: Option<tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStderr>>>,
}

impl StdioMcp {
    fn start(args: &[&str], discovery: &std::path::Path, cwd: &std::path::Path) -> Self {
        Self::spawn(args, discovery, cwd, false)
    }

    /// [`StdioMcp::start`], its log kept for [`StdioMcp::wait_for_log`].
    fn start_logged(args: &[&str], discovery: &std::path::Path, cwd: &std::path::Path) -> Self {
        Self::spawn(args, discovery, cwd, true)
    }

    fn spawn(
        args: &[&str],
        discovery: &std::path::Path,
        cwd: &std::path::Path,
        logged: bool,
    ) -> Self {
        use std::process::Stdio;
        use tokio::io::AsyncBufReadExt;
        let mut child = tokio::process::Command::new(troupe_bin())
            .arg("mcp")
            .args(args)
            .env("TROUPE_DISCOVERY_DIR", discovery)
            .env_remove("RUST_BACKTRACE")
            .env("NO_COLOR", "1")
            .current_dir(cwd)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(if logged {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let stdin = child.stdin.take();
        let lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let logs = child
            .stderr
            .take()
            .map(|stderr| tokio::io::BufReader::new(stderr).lines());
        Self {
            child,
            stdin,
            lines,
            logs,
        }
    }

    /// Reads its log until a line contains `text`.
    async fn wait_for_log(&mut self, text: &str) {
        let logs = self.logs.as_mut().expect("started with start_logged");
        let found = async {
            while let Some(line) = logs.next_line().await.unwrap() {
                if line.contains(text) {
                    return;
                }
            }
            panic!("the log ended without {text:?}");
        };
        tokio::time::timeout(PATIENCE, found)
            .await
            .unwrap_or_else(|_| panic!("no log line with {text:?} within the patience"));
    }

    fn terminate(&self) {
        let pid = self.child.id().expect("running") as i32;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
    }

    async fn send_raw(&mut self, bytes: &[u8]) {
        use tokio::io::AsyncWriteExt;
        let stdin = self.stdin.as_mut().unwrap();
        stdin.write_all(bytes).await.unwrap();
        stdin.flush().await.unwrap();
    }

    async fn send(&mut self, message: Value) {
        self.send_raw(format!("{message}\n").as_bytes()).await;
    }

    async fn next(&mut self) -> Value {
        let line = tokio::time::timeout(PATIENCE, self.lines.next_line())
            .await
            .expect("a line within the patience")
            .unwrap()
            .expect("stdout open");
        serde_json::from_str(&line).unwrap_or_else(|_| panic!("a JSON line: {line}"))
    }

    /// Lines until the answer to `id`; returns the notifications before it and the answer.
    async fn answer(&mut self, id: u64) -> (Vec<Value>, Value) {
        let mut notifications = Vec::new();
        loop {
            let message = self.next().await;
            if message["id"] == id {
                return (notifications, message);
            }
            notifications.push(message);
        }
    }

    async fn initialize(&mut self) {
        self.send(
            json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
                "protocolVersion": "2025-11-25",
                "capabilities": {},
                "clientInfo": {"name": "stdio-test", "version": "0"},
            }}),
        )
        .await;
        let (_, answer) = self.answer(0).await;
        assert_eq!(answer["result"]["serverInfo"]["name"], "troupe", "{answer}");
        self.send(json!({"jsonrpc": "2.0", "method": "notifications/initialized"}))
            .await;
    }

    /// Closes stdin and waits for a clean exit.
    async fn finish(mut self) {
        drop(self.stdin.take());
        let status = tokio::time::timeout(PATIENCE, self.child.wait())
            .await
            .expect("troupe mcp exits when stdin closes")
            .unwrap();
        assert!(status.success(), "{status:?}");
    }
}

/// A `troupe mcp` bridged to `fixture`'s node, once the node's discovery entry is written.
async fn bridged_stdio(fixture: &Fixture) -> StdioMcp {
    let node = &fixture.node;
    node.logs
        .wait_for("discovery entry written", |line| {
            line["message"] == "discovery entry written"
        })
        .await;
    let discovery = node.data_dir.join("discovery");
    let mut stdio = StdioMcp::start(&[], &discovery, fixture._temp.path());
    stdio.initialize().await;
    stdio
}

#[tokio::test]
async fn a_bridge_whose_stdin_ends_still_writes_the_answers_it_owes() {
    let fixture = Fixture::start(10_000).await;
    let mut stdio = bridged_stdio(&fixture).await;
    // A call that takes a moment, and stdin closed right behind it (a one-shot script).
    stdio
        .send(tools_call(
            1,
            "spawn_session",
            json!({"session": {"kind": "command", "program": "sh",
                               "args": ["-c", "sleep 1; echo done"]}, "wait": true}),
        ))
        .await;
    stdio.send(tools_call(2, "node_health", json!({}))).await;
    drop(stdio.stdin.take());
    let (_, health) = stdio.answer(2).await;
    assert_eq!(health["result"]["isError"], false, "{health}");
    let (_, spawned) = stdio.answer(1).await;
    assert_eq!(
        spawned["result"]["structuredContent"]["state"], "succeeded",
        "{spawned}"
    );
    let status = tokio::time::timeout(PATIENCE, stdio.child.wait())
        .await
        .expect("it exits once the answers are out")
        .unwrap();
    assert!(status.success(), "{status:?}");
}

#[tokio::test]
async fn a_line_the_node_refuses_ends_the_bridge_with_an_error_line_and_a_failing_exit() {
    let fixture = Fixture::start(10_000).await;
    let mut stdio = bridged_stdio(&fixture).await;
    // Under the bridge's own limit, over the node's http.max_body_bytes (1 MiB).
    let padding = "x".repeat(2 * 1024 * 1024);
    stdio
        .send(tools_call(1, "node_health", json!({"padding": padding})))
        .await;
    let line = stdio.next().await;
    assert_eq!(line["error"]["code"], -32600, "{line}");
    let status = tokio::time::timeout(PATIENCE, stdio.child.wait())
        .await
        .expect("the bridge ends")
        .unwrap();
    assert!(!status.success(), "{status:?}");
}

fn tools_call(id: u64, name: &str, arguments: Value) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
           "params": {"name": name, "arguments": arguments}})
}

/// Makes `dir` private to this user, as a node makes its discovery directory (discovery refuses
/// one open to others).
fn private_dir(dir: &std::path::Path) {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .unwrap();
}

/// A discovery entry of a process that does not exist (a node killed without cleaning up).
fn stale_entry(dir: &std::path::Path) -> std::path::PathBuf {
    private_dir(dir);
    let path = dir.join("ghost-999999999.json");
    std::fs::write(
        &path,
        json!({"node_id": "ghost", "pid": 999_999_999u32, "http": "127.0.0.1:9",
               "token_file": "/nonexistent/admin.token", "started_at": "2099-01-01T00:00:00Z",
               "updated_at": 4_000_000_000u64})
        .to_string(),
    )
    .unwrap();
    path
}

#[tokio::test]
async fn a_session_spawned_over_stdio_reaches_sse_and_websocket_subscribers_in_order() {
    let fixture = Fixture::start(10_000).await;
    let node = &fixture.node;
    let discovery = node.data_dir.join("discovery");
    node.logs
        .wait_for("discovery entry written", |line| {
            line["message"] == "discovery entry written"
        })
        .await;
    // A stale entry beside the node's (sorted first) is ignored and cleaned.
    let ghost = stale_entry(&discovery);
    let mut sse = node.events("kind=session.*", None).await;
    let mut ws = WsEvents::open(node, "kind=session.*").await;

    let mut stdio = StdioMcp::start(&[], &discovery, fixture._temp.path());
    stdio.initialize().await;
    let mut call = tools_call(
        1,
        "spawn_session",
        json!({"session": {"kind": "command", "program": "sh",
                           "args": ["-c", "echo one; echo two"]}, "wait": true}),
    );
    call["params"]["_meta"] = json!({"progressToken": "t"});
    stdio.send(call).await;
    let (notifications, answer) = stdio.answer(1).await;
    let record = &answer["result"]["structuredContent"];
    assert_eq!(record["state"], "succeeded", "{answer}");
    assert!(
        notifications
            .iter()
            .any(|message| message["method"] == "notifications/progress"
                && message["params"]["progressToken"] == "t"),
        "the stdio client sees progress: {notifications:?}"
    );
    assert!(!ghost.exists(), "the stale entry was cleaned");

    // The same session, the same events, in the same order, on SSE and WebSocket.
    let over_sse = session_events_sse(&mut sse, 1).await;
    let over_ws = session_events_ws(&mut ws, 1).await;
    assert_eq!(over_sse, over_ws);
    let kinds: Vec<&str> = over_sse.iter().map(|(_, kind)| kind.as_str()).collect();
    assert_eq!(kinds.first(), Some(&"session.queued"));
    assert!(kinds.contains(&"session.started") && kinds.contains(&"session.output"));
    assert_eq!(kinds.last(), Some(&"session.succeeded"));
    let unique: BTreeSet<_> = over_sse.iter().collect();
    assert_eq!(unique.len(), over_sse.len(), "no duplicates");
    // The stdio client is a link of the node it attached to.
    let links: Value = node.get("/v1/links").await.json().await.unwrap();
    assert!(links.to_string().contains("\"mcp_stdio\""), "{links}");
    stdio.finish().await;
}

#[tokio::test]
async fn troupe_nodes_lists_live_nodes_and_the_entry_goes_with_a_clean_stop() {
    let fixture = Fixture::start(10_000).await;
    let mut node = fixture.node;
    let discovery = node.data_dir.join("discovery");
    node.logs
        .wait_for("discovery entry written", |line| {
            line["message"] == "discovery entry written"
        })
        .await;
    let ghost = stale_entry(&discovery);
    let output = tokio::process::Command::new(troupe_bin())
        .args(["nodes", "--json"])
        .env("TROUPE_DISCOVERY_DIR", &discovery)
        .output()
        .await
        .unwrap();
    assert!(output.status.success());
    let listed: Value = serde_json::from_slice(&output.stdout).unwrap();
    let listed = listed.as_array().unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["http"], node.addr.to_string());
    assert_eq!(listed[0]["pid"], node.child.id().unwrap());
    assert!(
        listed[0]["token_file"]
            .as_str()
            .unwrap()
            .ends_with("admin.token")
    );
    assert!(!ghost.exists(), "stale entries are cleaned");
    node.terminate();
    assert!(node.wait_exit().await.success());
    let left: Vec<_> = std::fs::read_dir(&discovery)
        .unwrap()
        .flatten()
        .map(|entry| entry.file_name())
        .collect();
    assert!(
        left.is_empty(),
        "the entry is removed on a clean stop: {left:?}"
    );
}

#[tokio::test]
async fn troupe_mcp_runs_an_embedded_node_when_none_is_running_and_answers_bad_lines() {
    let temp = tempfile::tempdir().unwrap();
    let discovery = temp.path().join("discovery");
    stale_entry(&discovery);
    let data = temp.path().join("data");
    let mut stdio = StdioMcp::start(
        &["--data-dir", data.to_str().unwrap()],
        &discovery,
        temp.path(),
    );
    stdio.initialize().await;
    stdio.send(tools_call(1, "node_health", json!({}))).await;
    let (_, health) = stdio.answer(1).await;
    assert_eq!(
        health["result"]["structuredContent"]["status"], "healthy",
        "{health}"
    );
    // Not UTF-8, not JSON: a parse error each, and the link stays.
    stdio.send_raw(b"\xff\xfe not utf-8\n").await;
    let error = stdio.next().await;
    assert_eq!(error["error"]["code"], -32700, "{error}");
    stdio.send_raw(b"{oops\n").await;
    let error = stdio.next().await;
    assert_eq!(error["error"]["code"], -32700, "{error}");
    stdio
        .send(json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}))
        .await;
    let (_, listed) = stdio.answer(2).await;
    assert_eq!(listed["result"]["tools"].as_array().unwrap().len(), 8);
    stdio.finish().await;
}

/// Spawns a session printing about 20 MB of output (long lines), for links that must fill up.
/// Every output batch of a session is an event, so a flood fills a reader's socket quickly.
const UNCOALESCED: &[(&str, &str)] = &[("TROUPE_SESSIONS__OUTPUT_EVENTS_PER_SEC", "1000000")];

async fn spawn_script(node: &NodeProcess, script: &str) -> String {
    let record = node
        .spawn_session(json!({"kind": "command", "program": "sh", "args": ["-c", script]}))
        .await;
    record["id"].as_str().unwrap().to_owned()
}

/// A TCP connection to the node with a tiny receive buffer, for a client that will not read.
async fn tiny_buffer_stream(node: &NodeProcess) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(node.addr).await.unwrap()
}

/// Waits for the `link.disconnected` of a `transport` link; returns its reason.
async fn disconnected(observer: &mut SseStream, transport: &str) -> String {
    loop {
        let (_, event) = observer.next_of("link.disconnected").await;
        if event["data"]["transport"] == transport {
            return event["data"]["reason"].as_str().unwrap().to_owned();
        }
    }
}

/// Output that keeps coming (about 10 MB/s) until the session is cancelled. A finite flood is
/// not enough here: the stalled link is detected by a write that waits too long, and what
/// reaches it of a finite flood (after its subscription lags) can fit in the socket buffers,
/// which grow to megabytes on loopback; then no write ever waits.
async fn endless_flood(node: &NodeProcess) -> String {
    spawn_script(
        node,
        "line=$(head -c 1000 /dev/zero | tr '\\0' x); \
         while :; do i=0; while [ $i -lt 100 ]; do echo \"$line\"; i=$((i+1)); done; \
         sleep 0.01; done",
    )
    .await
}

#[tokio::test]
async fn an_sse_client_that_stops_reading_is_cleaned_up_and_others_keep_their_stream() {
    let fixture = Fixture::start_with(10_000, UNCOALESCED).await;
    let node = &fixture.node;
    let mut observer = node.events("kind=link.*", None).await;
    let mut healthy = node.events("kind=session.cancelled", None).await;
    // A follower of session output that sends its request and never reads a byte.
    let mut stalled = tiny_buffer_stream(node).await;
    {
        use tokio::io::AsyncWriteExt;
        let request = format!(
            "GET /v1/events?kind=session.output HTTP/1.1\r\nHost: 127.0.0.1\r\n\
             Authorization: Bearer {}\r\n\r\n",
            node.token
        );
        stalled.write_all(request.as_bytes()).await.unwrap();
    }
    let peer = stalled.local_addr().unwrap().to_string();
    let link = loop {
        let (_, event) = observer.next_of("link.connected").await;
        if event["data"]["peer"] == peer.as_str() {
            break event["data"]["link"].as_str().unwrap().to_owned();
        }
    };
    let id = endless_flood(node).await;
    let reason = loop {
        let (_, event) = observer.next_of("link.disconnected").await;
        if event["data"]["link"] == link.as_str() {
            break event["data"]["reason"].as_str().unwrap().to_owned();
        }
    };
    assert!(reason.contains("stopped reading"), "{reason}");
    let links: Value = node.get("/v1/links").await.json().await.unwrap();
    assert!(
        !links.to_string().contains(&link),
        "the stalled link is gone: {links}"
    );
    assert!(
        node.delete(&format!("/v1/sessions/{id}"))
            .await
            .status()
            .is_success()
    );
    let (_, done) = healthy.next().await;
    assert_eq!(done["session"], id.as_str(), "the other stream went on");
    drop(stalled);
}

#[tokio::test]
async fn an_event_websocket_that_never_reads_is_dropped_and_others_are_unaffected() {
    let fixture = Fixture::start_with(10_000, UNCOALESCED).await;
    let node = &fixture.node;
    let mut observer = node.events("kind=link.*", None).await;
    let stream = tiny_buffer_stream(node).await;
    let request = ws_request(node, "/v1/events/ws?kind=session.output", &node.token);
    let (stalled, _) =
        tokio_tungstenite::client_async(request, tokio_tungstenite::MaybeTlsStream::Plain(stream))
            .await
            .unwrap();
    let mut other = WsEvents::open(node, "kind=session.cancelled").await;
    let id = endless_flood(node).await;
    let reason = disconnected(&mut observer, "web_socket").await;
    assert!(reason.contains("stopped reading"), "{reason}");
    assert!(
        node.delete(&format!("/v1/sessions/{id}"))
            .await
            .status()
            .is_success()
    );
    let done = other.next_event().await;
    assert_eq!(done["session"], id.as_str());
    assert_eq!(node.get("/v1/health").await.status(), 200);
    drop(stalled);
}

/// Reads stdout lines until the exit of `troupe mcp`; returns them and its status.
async fn rest_and_exit(mut stdio: StdioMcp) -> (Vec<Value>, std::process::ExitStatus) {
    let mut rest = Vec::new();
    let lines = tokio::time::timeout(PATIENCE, async {
        while let Ok(Some(line)) = stdio.lines.next_line().await {
            rest.push(serde_json::from_str(&line).unwrap_or(Value::String(line)));
        }
    });
    lines.await.expect("stdout closes");
    drop(stdio.stdin.take());
    let status = tokio::time::timeout(PATIENCE, stdio.child.wait())
        .await
        .expect("troupe mcp exits")
        .unwrap();
    (rest, status)
}

/// Sends an over-long line (past the 4 MiB cap): answered with an error, then the link ends.
async fn oversize_line_ends_the_link(mut stdio: StdioMcp) {
    let mut line = vec![b'x'; 5 * 1024 * 1024];
    line.push(b'\n');
    // troupe mcp stops reading at the cap, so the rest of the write may fail.
    {
        use tokio::io::AsyncWriteExt;
        let stdin = stdio.stdin.as_mut().unwrap();
        let _ = stdin.write_all(&line).await;
        let _ = stdin.flush().await;
    }
    let (rest, status) = rest_and_exit(stdio).await;
    assert!(
        rest.iter().any(|message| message["error"]["code"] == -32600
            && message["error"]["message"]
                .as_str()
                .is_some_and(|text| text.contains("4194304"))),
        "the client is told why: {rest:?}"
    );
    assert!(!status.success(), "{status:?}");
}

#[tokio::test]
async fn bad_lines_through_the_stdio_bridge_are_answered_and_an_oversize_one_ends_it() {
    let fixture = Fixture::start(10_000).await;
    let node = &fixture.node;
    let mut stdio = bridged_stdio(&fixture).await;
    stdio.send_raw(b"\xff\xfe not utf-8\n").await;
    let error = stdio.next().await;
    assert_eq!(error["error"]["code"], -32700, "{error}");
    stdio.send_raw(b"{\"id\": 4, \"method\": 5}\n").await;
    let error = stdio.next().await;
    assert_eq!(error["error"]["code"], -32600, "{error}");
    assert_eq!(error["id"], 4);
    stdio
        .send(json!({"jsonrpc": "2.0", "id": 5, "method": "foo/bar"}))
        .await;
    let (_, unknown) = stdio.answer(5).await;
    assert_eq!(unknown["error"]["code"], -32601, "{unknown}");
    stdio.send(tools_call(6, "node_health", json!({}))).await;
    let (_, health) = stdio.answer(6).await;
    assert_eq!(health["result"]["structuredContent"]["status"], "healthy");
    oversize_line_ends_the_link(stdio).await;
    assert_eq!(
        node.get("/v1/health").await.status(),
        200,
        "the node is fine"
    );
}

#[tokio::test]
async fn an_oversize_line_ends_an_embedded_troupe_mcp_with_an_error() {
    let temp = tempfile::tempdir().unwrap();
    let data = temp.path().join("data");
    let mut stdio = StdioMcp::start(
        &["--standalone", "--data-dir", data.to_str().unwrap()],
        &temp.path().join("discovery"),
        temp.path(),
    );
    stdio.initialize().await;
    stdio.send_raw(b"{\"id\": \"q\", \"params\": []}\n").await;
    let error = stdio.next().await;
    assert_eq!(error["error"]["code"], -32600, "{error}");
    assert_eq!(error["id"], "q");
    oversize_line_ends_the_link(stdio).await;
}

/// `troupe nodes --json` with `discovery`.
async fn nodes_json(discovery: &std::path::Path) -> Vec<Value> {
    let output = tokio::process::Command::new(troupe_bin())
        .args(["nodes", "--json"])
        .env("TROUPE_DISCOVERY_DIR", discovery)
        .output()
        .await
        .unwrap();
    assert!(output.status.success());
    serde_json::from_slice::<Value>(&output.stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

/// The health report a `troupe mcp` with `discovery` gets (so: which node it attached to).
async fn health_through_troupe_mcp(
    discovery: &std::path::Path,
    cwd: &std::path::Path,
) -> (StdioMcp, Value) {
    let mut stdio = StdioMcp::start(&[], discovery, cwd);
    stdio.initialize().await;
    stdio.send(tools_call(1, "node_health", json!({}))).await;
    let (_, health) = stdio.answer(1).await;
    let report = health["result"]["structuredContent"].clone();
    assert_eq!(report["status"], "healthy", "{health}");
    (stdio, report)
}

/// A node registered in `discovery` under `id`.
async fn registered_node(
    temp: &std::path::Path,
    id: &str,
    discovery: &std::path::Path,
) -> NodeProcess {
    let env = NodeEnv {
        vars: vec![(
            "TROUPE_DISCOVERY_DIR".into(),
            discovery.to_str().unwrap().to_owned(),
        )],
        cwd: Some(temp.to_owned()),
    };
    let node = NodeProcess::start_with(&temp.join(id), &["--node-id", id], &env).await;
    node.logs
        .wait_for("discovery entry written", |line| {
            line["message"] == "discovery entry written"
        })
        .await;
    node
}

#[tokio::test]
async fn two_nodes_on_one_machine_troupe_mcp_attaches_to_the_newest_and_a_killed_one_is_cleaned() {
    let temp = tempfile::tempdir().unwrap();
    let discovery = temp.path().join("discovery");
    let a = registered_node(temp.path(), "a", &discovery).await;
    let mut b = registered_node(temp.path(), "b", &discovery).await;
    let listed = nodes_json(&discovery).await;
    let ids: BTreeSet<&str> = listed
        .iter()
        .map(|entry| entry["node_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, BTreeSet::from(["a", "b"]), "{listed:?}");
    assert_eq!(listed[0]["node_id"], "b", "the most recently started first");
    let (stdio, report) = health_through_troupe_mcp(&discovery, temp.path()).await;
    assert_eq!(report["node"], "b");
    stdio.finish().await;

    // SIGKILL: b cannot remove its entry; readers see its pid gone and delete it.
    let b_pid = b.child.id().unwrap();
    b.child.kill().await.unwrap();
    let stale = discovery.join(format!("b-{b_pid}.json"));
    assert!(stale.exists(), "a killed node leaves its entry behind");
    let listed = nodes_json(&discovery).await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["node_id"], "a");
    assert!(!stale.exists(), "the stale entry was cleaned");
    let (stdio, report) = health_through_troupe_mcp(&discovery, temp.path()).await;
    assert_eq!(report["node"], "a");
    stdio.finish().await;
    drop(a);
}

#[tokio::test]
async fn troupe_mcp_skips_an_unreachable_node_then_runs_an_embedded_node_that_others_share() {
    let temp = tempfile::tempdir().unwrap();
    let discovery = temp.path().join("discovery");
    // An entry of a live process (this test) at an address nobody serves, sorted first.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_addr = closed.local_addr().unwrap();
    drop(closed);
    let token_dir = temp.path().join("ghost");
    std::fs::create_dir_all(&token_dir).unwrap();
    std::fs::write(token_dir.join("admin.token"), "trp_ghost\n").unwrap();
    private_dir(&discovery);
    let me = std::process::id();
    std::fs::write(
        discovery.join(format!("ghost-{me}.json")),
        json!({"node_id": "ghost", "pid": me, "http": dead_addr.to_string(),
               "token_file": token_dir.join("admin.token"),
               "started_at": "2099-01-01T00:00:00Z",
               "updated_at": troupe::discovery::now_secs()})
        .to_string(),
    )
    .unwrap();
    let mut a = registered_node(temp.path(), "a", &discovery).await;
    let (stdio, report) = health_through_troupe_mcp(&discovery, temp.path()).await;
    assert_eq!(report["node"], "a", "the unreachable entry was skipped");
    stdio.finish().await;
    a.terminate();
    assert!(a.wait_exit().await.success());

    // Only the unreachable entry is left: an embedded node, which registers itself …
    let data = temp.path().join("embedded");
    let mut first = StdioMcp::start(
        &["--data-dir", data.to_str().unwrap()],
        &discovery,
        temp.path(),
    );
    first.initialize().await;
    first.send(tools_call(1, "node_health", json!({}))).await;
    let (_, health) = first.answer(1).await;
    let started = health["result"]["structuredContent"]["started_at"].clone();
    assert!(started.is_string(), "{health}");
    let listed = nodes_json(&discovery).await;
    assert_eq!(
        listed.len(),
        2,
        "the embedded node is discoverable: {listed:?}"
    );
    // … so a second stdio client shares it.
    let (mut second, report) = health_through_troupe_mcp(&discovery, temp.path()).await;
    assert_eq!(report["started_at"], started, "the same node");
    // The first client leaves; the node stays for the second, then goes with it.
    drop(first.stdin.take());
    second.send(tools_call(2, "node_health", json!({}))).await;
    let (_, again) = second.answer(2).await;
    assert_eq!(again["result"]["structuredContent"]["started_at"], started);
    second.finish().await;
    let status = tokio::time::timeout(PATIENCE, first.child.wait())
        .await
        .expect("the embedded node stops once its last client is gone")
        .unwrap();
    assert!(status.success(), "{status:?}");
    assert_eq!(
        nodes_json(&discovery).await.len(),
        1,
        "its entry is removed"
    );
}

#[tokio::test]
async fn troupe_mcp_waits_for_its_data_directory_while_another_process_holds_it() {
    // Several `troupe mcp` started at once (a client launching its servers) race for the same
    // data directory: the one that loses waits for the other to register or leave.
    let temp = tempfile::tempdir().unwrap();
    let discovery = temp.path().join("discovery");
    let data = temp.path().join("data");
    let held = troupe::store::Store::open(
        &data,
        troupe::actors::ids::NodeId::new("holder").unwrap(),
        troupe::store::StoreConfig::default(),
    )
    .await
    .unwrap();
    let mut stdio = StdioMcp::start_logged(
        &["--data-dir", data.to_str().unwrap()],
        &discovery,
        temp.path(),
    );
    stdio
        .wait_for_log("the data directory is in use by another process")
        .await;
    held.close().await.unwrap();
    stdio.initialize().await;
    stdio.send(tools_call(1, "node_health", json!({}))).await;
    let (_, health) = stdio.answer(1).await;
    assert_eq!(
        health["result"]["structuredContent"]["status"], "healthy",
        "{health}"
    );
    stdio.finish().await;
}

#[tokio::test]
async fn a_bridged_stdio_client_moves_to_a_new_node_when_its_node_goes_away() {
    let temp = tempfile::tempdir().unwrap();
    let discovery = temp.path().join("discovery");
    let data = temp.path().join("data");
    let args = ["--data-dir", data.to_str().unwrap()];
    let started_at = |health: &Value| health["result"]["structuredContent"]["started_at"].clone();
    // The first `troupe mcp` runs the node, the second bridges to it.
    let mut host = StdioMcp::start(&args, &discovery, temp.path());
    host.initialize().await;
    host.send(tools_call(1, "node_health", json!({}))).await;
    let first_node = started_at(&host.answer(1).await.1);
    let mut bridged = StdioMcp::start(&args, &discovery, temp.path());
    bridged.initialize().await;
    bridged.send(tools_call(1, "node_health", json!({}))).await;
    assert_eq!(
        started_at(&bridged.answer(1).await.1),
        first_node,
        "bridged"
    );
    // A call in flight when the node goes: the node has it once a later call is answered.
    bridged
        .send(tools_call(
            2,
            "spawn_session",
            json!({"session": {"kind": "command", "program": "sleep", "args": ["30"]},
                   "wait": true}),
        ))
        .await;
    bridged.send(tools_call(3, "node_health", json!({}))).await;
    bridged.answer(3).await;

    // The host's client leaves and stops it (stdin closed, then SIGTERM, as clients do).
    drop(host.stdin.take());
    host.terminate();
    let status = tokio::time::timeout(PATIENCE, host.child.wait())
        .await
        .expect("the host stops on SIGTERM")
        .unwrap();
    assert!(status.success(), "{status:?}");

    // The call in flight is answered (by the node as it stopped, or by the bridge saying the
    // node went away), never left hanging …
    let (_, owed) = bridged.answer(2).await;
    assert!(
        owed.get("result").is_some()
            || owed["error"]["message"]
                .as_str()
                .is_some_and(|message| message.contains("went away")),
        "{owed}"
    );
    // … and the client goes on, without a new handshake, with a node its bridge started.
    bridged.send(tools_call(4, "node_health", json!({}))).await;
    let (_, health) = bridged.answer(4).await;
    assert_eq!(health["result"]["isError"], false, "{health}");
    let second_node = started_at(&health);
    assert!(second_node.is_string(), "{health}");
    assert_ne!(second_node, first_node, "a new node: {health}");
    let listed = nodes_json(&discovery).await;
    assert_eq!(listed.len(), 1, "the new node is discoverable: {listed:?}");
    assert_eq!(listed[0]["embedded"], true, "a troupe mcp's: {listed:?}");
    bridged.finish().await;
    assert_eq!(
        nodes_json(&discovery).await.len(),
        0,
        "and gone with its client"
    );
}

#[tokio::test]
async fn a_bridge_whose_troupe_node_restarts_waits_for_it_instead_of_taking_its_data_directory() {
    let temp = tempfile::tempdir().unwrap();
    let discovery = temp.path().join("discovery");
    let node = registered_node(temp.path(), "a", &discovery).await;
    // The bridge is given the node's data directory: a node started by the bridge would take
    // it, and the restarted `troupe node` would not start.
    let data = temp.path().join("a");
    let mut bridged = StdioMcp::start_logged(
        &["--data-dir", data.to_str().unwrap()],
        &discovery,
        temp.path(),
    );
    bridged.initialize().await;
    bridged.send(tools_call(1, "node_health", json!({}))).await;
    let (_, before) = bridged.answer(1).await;
    let first = before["result"]["structuredContent"]["started_at"].clone();
    assert!(first.is_string(), "{before}");

    node.terminate();
    let mut node = node;
    assert!(node.wait_exit().await.success());
    // The bridge waits for a node to come back (a node of its own would have taken the
    // directory by now) …
    bridged
        .wait_for_log("no running node in discovery; waiting up to")
        .await;
    // … and the restarted node starts and is found.
    let _restarted = registered_node(temp.path(), "a", &discovery).await;

    bridged.send(tools_call(2, "node_health", json!({}))).await;
    let (_, after) = bridged.answer(2).await;
    let report = &after["result"]["structuredContent"];
    assert_eq!(report["node"], "a", "{after}");
    assert_ne!(report["started_at"], first, "the restarted node: {after}");
    let listed = nodes_json(&discovery).await;
    assert_eq!(listed.len(), 1, "no node of the bridge's own: {listed:?}");
    assert_eq!(listed[0]["embedded"], false, "{listed:?}");
    bridged.finish().await;
}

/// Regression: every request a client sent was taken in and answered by a task of its own that
/// held the answer until the client read it, so a client that sends and does not read made the
/// node hold any number of answers. Past 64 unanswered requests a link now refuses the next one
/// at once, and still answers every request once.
#[tokio::test]
async fn a_client_that_sends_without_reading_is_refused_past_64_requests_waiting_for_answers() {
    let temp = tempfile::tempdir().unwrap();
    let data = temp.path().join("data");
    let mut stdio = StdioMcp::start(
        &["--standalone", "--data-dir", data.to_str().unwrap()],
        &temp.path().join("discovery"),
        temp.path(),
    );
    stdio.initialize().await;
    // Large answers (the tool list), so that the pipe and the link's queue fill soon.
    let count = 300u64;
    let mut requests = String::new();
    for id in 1..=count {
        requests.push_str(&json!({"jsonrpc": "2.0", "id": id, "method": "tools/list"}).to_string());
        requests.push('\n');
    }
    stdio.send_raw(requests.as_bytes()).await;
    let (mut answered, mut refused) = (BTreeSet::new(), 0);
    while answered.len() < count as usize {
        let answer = stdio.next().await;
        let id = answer["id"].as_u64().expect("an answer to a request");
        assert!(answered.insert(id), "answered twice: {answer}");
        if answer["error"]["code"] == -32028 {
            assert_eq!(
                answer["error"]["data"]["code"], "too_many_in_flight",
                "{answer}"
            );
            refused += 1;
        } else {
            assert!(answer["result"]["tools"].is_array(), "{answer}");
        }
    }
    assert!(refused > 0, "some requests past the bound were refused");
    stdio.finish().await;
}

/// A `troupe mcp` waiting for its data directory stops at once on SIGTERM, cleanly (before, it
/// waited out its 15 s and then failed on the directory still held).
#[tokio::test]
async fn troupe_mcp_waiting_for_its_data_directory_stops_cleanly_on_sigterm() {
    let temp = tempfile::tempdir().unwrap();
    let data = temp.path().join("data");
    let held = troupe::store::Store::open(
        &data,
        troupe::actors::ids::NodeId::new("holder").unwrap(),
        troupe::store::StoreConfig::default(),
    )
    .await
    .unwrap();
    let mut stdio = StdioMcp::start_logged(
        &["--data-dir", data.to_str().unwrap()],
        &temp.path().join("discovery"),
        temp.path(),
    );
    stdio
        .wait_for_log("the data directory is in use by another process")
        .await;
    stdio.terminate();
    let status = tokio::time::timeout(PATIENCE, stdio.child.wait())
        .await
        .expect("it stops")
        .unwrap();
    assert!(status.success(), "{status:?}");
    held.close().await.unwrap();
}
