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
        let temp = tempfile::tempdir().unwrap();
        let workspace = temp.path().join("ws");
        std::fs::create_dir_all(&workspace).unwrap();
        let env = NodeEnv {
            vars: vec![("TROUPE_EVENTS__RING_CAPACITY".into(), ring.to_string())],
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
        Self { socket }
    }

    /// The next JSON frame (pings are skipped); panics after [`PATIENCE`].
    async fn next(&mut self) -> Value {
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
}

impl StdioMcp {
    fn start(args: &[&str], discovery: &std::path::Path, cwd: &std::path::Path) -> Self {
        use std::process::Stdio;
        use tokio::io::AsyncBufReadExt;
        let mut child = tokio::process::Command::new(troupe_bin())
            .arg("mcp")
            .args(args)
            .env("TROUPE_DISCOVERY_DIR", discovery)
            .env_remove("RUST_BACKTRACE")
            .current_dir(cwd)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let stdin = child.stdin.take();
        let lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        Self {
            child,
            stdin,
            lines,
        }
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

fn tools_call(id: u64, name: &str, arguments: Value) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
           "params": {"name": name, "arguments": arguments}})
}

/// A discovery entry of a process that does not exist (a node killed without cleaning up).
fn stale_entry(dir: &std::path::Path) -> std::path::PathBuf {
    std::fs::create_dir_all(dir).unwrap();
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
