//! The MCP server through the real binary: Streamable HTTP (2026-07-28 stateless requests and
//! a legacy 2025-06-18 session), WebSocket, roles, DNS-rebinding checks, progress, and a client
//! that vanishes mid-call.

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

use crate::support::*;

const VIEWER: &str = "viewer-secret";
const V2026: &str = "2026-07-28";

/// A node with a viewer token and a workspace to run commands in.
struct Fixture {
    node: NodeProcess,
    _temp: tempfile::TempDir,
}

impl Fixture {
    async fn start() -> Self {
        let temp = tempfile::tempdir().unwrap();
        let workspace = temp.path().join("ws");
        std::fs::create_dir_all(&workspace).unwrap();
        let config = temp.path().join("troupe.toml");
        std::fs::write(
            &config,
            format!(
                "[auth]\ntokens = [{{ name = \"dash\", role = \"viewer\", sha256 = \"{}\" }}]\n",
                hex::encode(Sha256::digest(VIEWER.as_bytes()))
            ),
        )
        .unwrap();
        let env = NodeEnv {
            vars: Vec::new(),
            cwd: Some(workspace),
        };
        let node = NodeProcess::start_with(
            &temp.path().join("data"),
            &["--config", config.to_str().unwrap()],
            &env,
        )
        .await;
        Self { node, _temp: temp }
    }
}

/// A 2026-07-28 request: per-request protocol version and client capabilities in `_meta`.
fn request(id: u64, method: &str, mut params: Value) -> Value {
    params["_meta"]["io.modelcontextprotocol/protocolVersion"] = json!(V2026);
    params["_meta"]["io.modelcontextprotocol/clientCapabilities"] = json!({});
    params["_meta"]["io.modelcontextprotocol/clientInfo"] =
        json!({"name": "troupe-tests", "version": "0"});
    json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params})
}

fn tool_call(id: u64, name: &str, arguments: Value) -> Value {
    request(
        id,
        "tools/call",
        json!({"name": name, "arguments": arguments}),
    )
}

/// The JSON-RPC messages of a Streamable HTTP answer (a JSON body or an SSE stream).
async fn messages(response: reqwest::Response) -> Vec<Value> {
    let is_sse = response
        .headers()
        .get("content-type")
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("text/event-stream"));
    let body = tokio::time::timeout(PATIENCE, response.text())
        .await
        .expect("the answer ends")
        .unwrap();
    if !is_sse {
        return vec![serde_json::from_str(&body).expect("a JSON body")];
    }
    body.lines()
        .filter_map(|line| line.strip_prefix("data:"))
        .map(str::trim)
        .filter(|data| !data.is_empty())
        .map(|data| serde_json::from_str(data).expect("JSON data"))
        .collect()
}

/// Posts one message with the headers of its protocol version (2026-07-28 repeats the method,
/// and a tool's name, in `Mcp-Method` / `Mcp-Name`).
async fn post(node: &NodeProcess, token: &str, body: &Value, version: &str) -> reqwest::Response {
    let mut request = node
        .client()
        .post(node.url("/mcp"))
        .bearer_auth(token)
        .header("accept", "application/json, text/event-stream")
        .header("mcp-protocol-version", version);
    if version == V2026 {
        request = request.header("mcp-method", body["method"].as_str().unwrap());
        let name = body["params"]["name"]
            .as_str()
            .or(body["params"]["taskId"].as_str());
        if let Some(name) = name {
            request = request.header("mcp-name", name);
        }
    }
    request.json(body).send().await.unwrap()
}

/// Posts one 2026-07-28 request; returns the notifications before the answer, and the answer.
async fn call(node: &NodeProcess, token: &str, body: Value) -> (Vec<Value>, Value) {
    let response = post(node, token, &body, V2026).await;
    assert_eq!(response.status(), 200, "{body}");
    let mut all = messages(response).await;
    let answer = all.pop().expect("an answer");
    assert_eq!(answer["id"], body["id"], "{answer}");
    (all, answer)
}

/// `structuredContent` of a successful tool result.
fn content(answer: &Value) -> &Value {
    let result = &answer["result"];
    assert_eq!(result["isError"], false, "{answer}");
    &result["structuredContent"]
}

fn sh(script: &str) -> Value {
    json!({"kind": "command", "program": "sh", "args": ["-c", script]})
}

#[tokio::test]
async fn tools_are_listed_with_schemas_and_called_over_streamable_http() {
    let fixture = Fixture::start().await;
    let node = &fixture.node;
    let (_, listed) = call(node, &node.token, request(1, "tools/list", json!({}))).await;
    let tools = listed["result"]["tools"].as_array().unwrap();
    let names: Vec<&str> = tools.iter().map(|t| t["name"].as_str().unwrap()).collect();
    for name in [
        "spawn_session",
        "get_session",
        "list_sessions",
        "cancel_session",
        "session_output",
        "node_health",
        "list_providers",
        "cluster_members",
    ] {
        assert!(names.contains(&name), "{name} in {names:?}");
    }
    let spawn = tools.iter().find(|t| t["name"] == "spawn_session").unwrap();
    assert!(spawn["description"].as_str().unwrap().contains("operator"));
    assert_eq!(spawn["inputSchema"]["type"], "object");
    assert!(
        spawn["inputSchema"]["properties"]["session"].is_object(),
        "{spawn}"
    );

    let (_, health) = call(node, &node.token, tool_call(2, "node_health", json!({}))).await;
    assert_eq!(content(&health)["status"], "healthy", "{health}");

    // Spawn, read, list, output through the tools; the session is the REST API's too.
    let (_, spawned) = call(
        node,
        &node.token,
        tool_call(
            3,
            "spawn_session",
            json!({"session": sh("echo from-mcp"), "wait": true}),
        ),
    )
    .await;
    let record = content(&spawned);
    assert_eq!(record["state"], "succeeded", "{record}");
    let id = record["id"].as_str().unwrap();
    assert_eq!(node.session(id).await["state"], "succeeded");
    let (_, got) = call(
        node,
        &node.token,
        tool_call(4, "get_session", json!({"id": id})),
    )
    .await;
    assert_eq!(content(&got)["id"], id);
    let (_, listed) = call(
        node,
        &node.token,
        tool_call(5, "list_sessions", json!({"state": ["succeeded"]})),
    )
    .await;
    assert_eq!(content(&listed)["sessions"][0]["id"], id);
    let (_, output) = call(
        node,
        &node.token,
        tool_call(6, "session_output", json!({"id": id})),
    )
    .await;
    assert_eq!(content(&output)["lines"][0]["text"], "from-mcp");
    let (_, providers) = call(node, &node.token, tool_call(7, "list_providers", json!({}))).await;
    assert_eq!(
        content(&providers)["providers"],
        json!([]),
        "live provider state (none configured here)"
    );
    let (_, members) = call(
        node,
        &node.token,
        tool_call(70, "cluster_members", json!({})),
    )
    .await;
    assert_eq!(content(&members)["enabled"], false, "{members}");

    // Errors the caller can act on are tool errors with the API's envelope.
    let (_, unknown) = call(
        node,
        &node.token,
        tool_call(8, "get_session", json!({"id": "s-nope"})),
    )
    .await;
    assert_eq!(unknown["result"]["isError"], true);
    assert_eq!(
        unknown["result"]["structuredContent"]["error"]["code"],
        "unknown_session"
    );
    let (_, refused) = call(
        node,
        &node.token,
        tool_call(9, "spawn_session", json!({"session": {"kind": "nope"}})),
    )
    .await;
    assert_eq!(
        refused["result"]["structuredContent"]["error"]["code"],
        "unknown_kind"
    );
    // Arguments that do not fit the schema are refused (rmcp answers a tool error).
    let (_, bad_args) = call(
        node,
        &node.token,
        tool_call(10, "get_session", json!({"nope": 1})),
    )
    .await;
    assert_eq!(bad_args["result"]["isError"], true, "{bad_args}");
    assert!(bad_args.to_string().contains("unknown field"), "{bad_args}");
    // Unknown methods are JSON-RPC errors (rmcp answers them with HTTP 404 on 2026-07-28).
    let response = post(
        node,
        &node.token,
        &request(11, "prompts/list", json!({})),
        V2026,
    )
    .await;
    assert_eq!(response.status(), 404);
    let no_method = messages(response).await.pop().unwrap();
    assert_eq!(no_method["error"]["code"], -32601, "{no_method}");
}

#[tokio::test]
async fn roles_tokens_and_hosts_apply_to_mcp() {
    let fixture = Fixture::start().await;
    let node = &fixture.node;
    // A viewer reads but cannot spawn or cancel.
    let (_, health) = call(node, VIEWER, tool_call(1, "node_health", json!({}))).await;
    assert_eq!(content(&health)["status"], "healthy");
    let (_, denied) = call(
        node,
        VIEWER,
        tool_call(2, "spawn_session", json!({"session": sh("true")})),
    )
    .await;
    assert_eq!(denied["result"]["isError"], true, "{denied}");
    assert_eq!(
        denied["result"]["structuredContent"]["error"]["code"],
        "forbidden"
    );
    let sessions: Value = node.get("/v1/sessions").await.json().await.unwrap();
    assert_eq!(sessions["sessions"], json!([]), "nothing was spawned");

    // No token, a wrong one: 401 with the envelope, before any MCP processing.
    let body = tool_call(3, "node_health", json!({}));
    let response = node
        .client()
        .post(node.url("/mcp"))
        .header("accept", "application/json, text/event-stream")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    assert_eq!(post(node, "wrong", &body, V2026).await.status(), 401);

    // DNS rebinding and foreign pages: 403.
    for (header, value, code) in [
        ("host", "evil.example", "host_not_allowed"),
        ("origin", "https://evil.example", "origin_not_allowed"),
    ] {
        let response = node
            .client()
            .post(node.url("/mcp"))
            .bearer_auth(&node.token)
            .header("accept", "application/json, text/event-stream")
            .header(header, value)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 403, "{header}: {value}");
        let envelope: Value = response.json().await.unwrap();
        assert_eq!(envelope["error"]["code"], code);
    }
    let same_origin = node
        .client()
        .post(node.url("/mcp"))
        .bearer_auth(&node.token)
        .header("accept", "application/json, text/event-stream")
        .header("mcp-protocol-version", V2026)
        .header("mcp-method", "tools/call")
        .header("mcp-name", "node_health")
        .header("origin", format!("http://localhost:{}", node.addr.port()))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(same_origin.status(), 200);

    // A body over http.max_body_bytes (1 MiB by default) is refused; the node stays up.
    let mut huge = tool_call(4, "node_health", json!({}));
    huge["params"]["arguments"]["padding"] = json!("x".repeat(2 * 1024 * 1024));
    let response = post(node, &node.token, &huge, V2026).await;
    assert_eq!(response.status(), 413);
    let (_, health) = call(node, &node.token, tool_call(5, "node_health", json!({}))).await;
    assert_eq!(content(&health)["status"], "healthy");
}

#[tokio::test]
async fn a_waiting_spawn_sends_progress_for_the_given_token() {
    let fixture = Fixture::start().await;
    let node = &fixture.node;
    let mut body = tool_call(
        1,
        "spawn_session",
        json!({"session": sh("echo one; echo two; echo three"), "wait": true}),
    );
    body["params"]["_meta"]["progressToken"] = json!("p-1");
    let (notifications, answer) = call(node, &node.token, body).await;
    assert_eq!(content(&answer)["state"], "succeeded");
    let progress: Vec<&Value> = notifications
        .iter()
        .filter(|message| message["method"] == "notifications/progress")
        .collect();
    assert!(
        !progress.is_empty(),
        "progress notifications: {notifications:?}"
    );
    let mut last = 0.0;
    for notification in &progress {
        assert_eq!(notification["params"]["progressToken"], "p-1");
        let value = notification["params"]["progress"].as_f64().unwrap();
        assert!(value > last, "progress increases: {progress:?}");
        last = value;
    }
    // Without a token: no notifications.
    let (quiet, _) = call(
        node,
        &node.token,
        tool_call(
            2,
            "spawn_session",
            json!({"session": sh("echo x"), "wait": true}),
        ),
    )
    .await;
    assert!(quiet.is_empty(), "{quiet:?}");
}

#[tokio::test]
async fn a_legacy_2025_06_18_client_initializes_a_session_and_calls_tools() {
    let fixture = Fixture::start().await;
    let node = &fixture.node;
    let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18",
        "capabilities": {},
        "clientInfo": {"name": "legacy", "version": "0"},
    }});
    let response = post(node, &node.token, &init, "2025-06-18").await;
    assert_eq!(response.status(), 200);
    let session = response.headers()["mcp-session-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let answer = messages(response).await.pop().unwrap();
    assert_eq!(
        answer["result"]["protocolVersion"], "2025-06-18",
        "{answer}"
    );
    assert_eq!(answer["result"]["serverInfo"]["name"], "troupe");
    let with_session = |body: Value| {
        node.client()
            .post(node.url("/mcp"))
            .bearer_auth(&node.token)
            .header("accept", "application/json, text/event-stream")
            .header("mcp-protocol-version", "2025-06-18")
            .header("mcp-session-id", session.clone())
            .json(&body)
            .send()
    };
    let initialized =
        with_session(json!({"jsonrpc": "2.0", "method": "notifications/initialized"}))
            .await
            .unwrap();
    assert_eq!(initialized.status(), 202);
    let listed = with_session(json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}))
        .await
        .unwrap();
    let listed = messages(listed).await.pop().unwrap();
    assert_eq!(listed["result"]["tools"].as_array().unwrap().len(), 8);
    // The legacy session is a link.
    let links: Value = node.get("/v1/links").await.json().await.unwrap();
    assert!(links.to_string().contains("\"mcp_http\""), "{links}");
}

#[tokio::test]
async fn mcp_over_websocket_answers_each_frame_and_survives_bad_ones() {
    let fixture = Fixture::start().await;
    let node = &fixture.node;
    let mut request_ws = format!("ws://{}/mcp/ws", node.addr)
        .into_client_request()
        .unwrap();
    request_ws.headers_mut().insert(
        "authorization",
        HeaderValue::from_str(&format!("Bearer {}", node.token)).unwrap(),
    );
    // Without the subprotocol: refused.
    match tokio_tungstenite::connect_async(request_ws.clone()).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 400)
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    request_ws
        .headers_mut()
        .insert("sec-websocket-protocol", HeaderValue::from_static("mcp"));
    let (mut socket, response) = tokio_tungstenite::connect_async(request_ws).await.unwrap();
    assert_eq!(response.headers()["sec-websocket-protocol"], "mcp");
    let next = async move |socket: &mut tokio_tungstenite::WebSocketStream<_>| -> Value {
        loop {
            let frame = tokio::time::timeout(PATIENCE, socket.next())
                .await
                .expect("a frame")
                .expect("open")
                .expect("well-formed");
            if let Message::Text(text) = frame {
                return serde_json::from_str(&text).unwrap();
            }
        }
    };
    socket
        .send(Message::Text("{not json".into()))
        .await
        .unwrap();
    let error = next(&mut socket).await;
    assert_eq!(error["error"]["code"], -32700, "{error}");
    assert_eq!(error["id"], Value::Null);

    let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25",
        "capabilities": {},
        "clientInfo": {"name": "ws", "version": "0"},
    }});
    socket
        .send(Message::Text(init.to_string().into()))
        .await
        .unwrap();
    let answer = next(&mut socket).await;
    assert_eq!(answer["id"], 1, "{answer}");
    socket
        .send(Message::Text(
            json!({"jsonrpc": "2.0", "method": "notifications/initialized"})
                .to_string()
                .into(),
        ))
        .await
        .unwrap();
    socket
        .send(Message::Text(
            json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call",
                   "params": {"name": "node_health", "arguments": {}}})
            .to_string()
            .into(),
        ))
        .await
        .unwrap();
    let health = next(&mut socket).await;
    assert_eq!(health["id"], 2, "{health}");
    assert_eq!(health["result"]["structuredContent"]["status"], "healthy");
    let links: Value = node.get("/v1/links").await.json().await.unwrap();
    assert!(links.to_string().contains("\"mcp_web_socket\""), "{links}");
}

#[tokio::test]
async fn a_client_that_vanishes_mid_call_leaves_its_session_running_and_visible() {
    let fixture = Fixture::start().await;
    let node = &fixture.node;
    let mut observer = node.events("kind=session.*", None).await;
    // A waiting spawn of a session that runs until told to stop.
    let marker = fixture._temp.path().join("release");
    let script = format!(
        "echo started; while [ ! -e {} ]; do sleep 0.05; done; echo released",
        marker.display()
    );
    let mut body = tool_call(
        1,
        "spawn_session",
        json!({"session": sh(&script), "wait": true}),
    );
    body["params"]["_meta"]["progressToken"] = json!(7);
    let response = post(node, &node.token, &body, V2026).await;
    assert_eq!(response.status(), 200);
    let mut stream = response.bytes_stream();
    // The session prints; the client sees progress, then vanishes.
    let (_, started) = observer.next_of("session.output").await;
    let id = started["session"].as_str().unwrap().to_owned();
    let first = tokio::time::timeout(PATIENCE, stream.next()).await.unwrap();
    assert!(first.is_some(), "the call's stream opened");
    drop(stream);

    // The session keeps running and others still see its events.
    assert_eq!(node.session(&id).await["state"], "running");
    std::fs::write(&marker, "").unwrap();
    let (_, released) = observer.next_of("session.output").await;
    assert_eq!(released["session"], id.as_str());
    let (_, ended) = observer.next_of("session.succeeded").await;
    assert_eq!(ended["session"], id.as_str());
    assert_eq!(node.session(&id).await["state"], "succeeded");
}

/// A 2026-07-28 request from a client that declares the tasks extension.
fn with_tasks(mut body: Value) -> Value {
    body["params"]["_meta"]["io.modelcontextprotocol/clientCapabilities"] =
        json!({"extensions": {"io.modelcontextprotocol/tasks": {}}});
    body
}

#[tokio::test]
async fn sessions_are_tasks_for_clients_of_the_tasks_extension() {
    let fixture = Fixture::start().await;
    let node = &fixture.node;
    let mut events = node.events("kind=session.*", None).await;

    // A short session: the call answers with a task at once; tasks/get follows the session.
    let (_, created) = call(
        node,
        &node.token,
        with_tasks(tool_call(
            1,
            "spawn_session",
            json!({"session": sh("echo done")}),
        )),
    )
    .await;
    let result = &created["result"];
    assert_eq!(result["resultType"], "task", "{created}");
    let task = result["taskId"].as_str().unwrap().to_owned();
    assert_eq!(result["status"], "working");
    assert!(task.starts_with("s-"), "the task is the session: {task}");
    events.next_of("session.succeeded").await;
    let (_, got) = call(
        node,
        &node.token,
        with_tasks(request(2, "tasks/get", json!({"taskId": task}))),
    )
    .await;
    assert_eq!(got["result"]["status"], "completed", "{got}");
    assert_eq!(
        got["result"]["result"]["structuredContent"]["state"], "succeeded",
        "{got}"
    );

    // A long one, cancelled through tasks/cancel (a viewer may not).
    let (_, created) = call(
        node,
        &node.token,
        with_tasks(tool_call(
            3,
            "spawn_session",
            json!({"session": sh("sleep 30")}),
        )),
    )
    .await;
    let task = created["result"]["taskId"].as_str().unwrap().to_owned();
    events.next_of("session.started").await;
    let (_, refused) = call(
        node,
        VIEWER,
        with_tasks(request(4, "tasks/cancel", json!({"taskId": task}))),
    )
    .await;
    assert!(refused["error"].is_object(), "{refused}");
    let (_, cancelled) = call(
        node,
        &node.token,
        with_tasks(request(5, "tasks/cancel", json!({"taskId": task}))),
    )
    .await;
    assert!(cancelled["error"].is_null(), "{cancelled}");
    events.next_of("session.cancelled").await;
    let (_, got) = call(
        node,
        VIEWER,
        with_tasks(request(6, "tasks/get", json!({"taskId": task}))),
    )
    .await;
    assert_eq!(got["result"]["status"], "cancelled", "{got}");
}
