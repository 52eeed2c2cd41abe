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
        Self::start_with(Vec::new()).await
    }

    /// With extra environment variables for the node (`TROUPE_<SECTION>__<KEY>` settings).
    async fn start_with(vars: Vec<(String, String)>) -> Self {
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
            vars,
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
    // Without details, `{}` as over REST.
    assert_eq!(
        unknown["result"]["structuredContent"]["error"]["details"],
        json!({}),
        "{unknown}"
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
    // rmcp's own tool error: a text message, no envelope.
    assert!(
        bad_args["result"]["structuredContent"].is_null(),
        "{bad_args}"
    );
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

/// A legacy (2025-06-18) session: `initialize` (its answer checked), then
/// `notifications/initialized`. Returns the session's id.
async fn legacy_session(node: &NodeProcess) -> String {
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
    let initialized = legacy_post(
        node,
        &session,
        json!({"jsonrpc": "2.0", "method": "notifications/initialized"}),
    )
    .await;
    assert_eq!(initialized.status(), 202);
    session
}

/// One message of legacy session `session`, ready to send.
fn legacy_request(node: &NodeProcess, session: &str, body: Value) -> reqwest::RequestBuilder {
    node.client()
        .post(node.url("/mcp"))
        .bearer_auth(&node.token)
        .header("accept", "application/json, text/event-stream")
        .header("mcp-protocol-version", "2025-06-18")
        .header("mcp-session-id", session)
        .json(&body)
}

/// One message of legacy session `session`.
async fn legacy_post(node: &NodeProcess, session: &str, body: Value) -> reqwest::Response {
    legacy_request(node, session, body).send().await.unwrap()
}

/// Regression: legacy sessions live on with no connection open until they have been quiet for
/// `http.mcp_session_idle_secs`, and a token could open them without bound (each one a task and
/// its queues), faster than they expire. A token now holds at most 256; past that an
/// `initialize` is refused with HTTP 429, and one session ended makes room again.
#[tokio::test]
async fn a_token_holds_a_bounded_number_of_legacy_sessions() {
    let fixture = Fixture::start_with(vec![
        ("TROUPE_AUTH__REQUESTS_PER_SECOND".into(), "100000".into()),
        ("TROUPE_AUTH__BURST".into(), "100000".into()),
    ])
    .await;
    let node = &fixture.node;
    let sessions: Vec<String> = futures::stream::iter(0..256)
        .map(|_| legacy_session(node))
        .buffer_unordered(16)
        .collect()
        .await;
    let init = json!({"jsonrpc": "2.0", "id": 9, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18",
        "capabilities": {},
        "clientInfo": {"name": "one-too-many", "version": "0"},
    }});
    let refused = post(node, &node.token, &init, "2025-06-18").await;
    assert_eq!(refused.status(), 429);
    assert!(refused.headers().get("mcp-session-id").is_none());
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["id"], 9, "{body}");
    assert_eq!(body["error"]["data"]["code"], "too_many_sessions", "{body}");
    assert_eq!(body["error"]["data"]["max"], 256, "{body}");
    // Sessions already open still work.
    let listed = legacy_post(
        node,
        &sessions[0],
        json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}),
    )
    .await;
    assert_eq!(listed.status(), 200);
    // One ended by its client makes room at once.
    let ended = node
        .client()
        .delete(node.url("/mcp"))
        .bearer_auth(&node.token)
        .header("mcp-protocol-version", "2025-06-18")
        .header("mcp-session-id", &sessions[1])
        .send()
        .await
        .unwrap();
    assert!(ended.status().is_success(), "{}", ended.status());
    legacy_session(node).await;
}

/// How many legacy MCP sessions are links now.
/// Regression: `/mcp/ws` opened its link after the upgrade, so a token at its most links
/// (`auth.max_links_per_token`) got a 101 and then a close 1001 ("going away"), which the
/// `troupe mcp` bridge reads as its node going away, and connects again, in a loop; and on
/// `/mcp` the link's refusal was a JSON-RPC "internal error" in an HTTP 200. Now `/mcp/ws` and
/// a stateless `/mcp` request are refused as `/v1/events/ws` is (429 `too_many_links`,
/// `details.max`), and a legacy session's request gets a JSON-RPC error that says so.
#[tokio::test]
async fn a_token_at_its_most_links_is_refused_with_too_many_links_on_every_mcp_door() {
    let fixture = Fixture::start_with(vec![(
        "TROUPE_AUTH__MAX_LINKS_PER_TOKEN".into(),
        "1".into(),
    )])
    .await;
    let node = &fixture.node;
    // The admin token's one link: an event stream.
    let _held = node.events("kind=session.*", None).await;
    let refused = |status: u16, body: &Value| {
        assert_eq!(status, 429, "{body}");
        assert_eq!(body["error"]["code"], "too_many_links", "{body}");
        assert_eq!(body["error"]["details"]["max"], 1, "{body}");
    };

    let upgrade = tokio_tungstenite::connect_async(mcp_ws_request(node, &node.token)).await;
    match upgrade {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            let body: Value = serde_json::from_slice(response.body().as_deref().unwrap()).unwrap();
            refused(response.status().as_u16(), &body);
        }
        Err(other) => panic!("the upgrade failed otherwise: {other}"),
        Ok(_) => panic!("the WebSocket was accepted past the token's links"),
    }

    let list = request(1, "tools/list", json!({}));
    let response = post(node, &node.token, &list, V2026).await;
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    refused(
        status,
        &serde_json::from_str(&text).unwrap_or(Value::String(text)),
    );

    let session = legacy_session(node).await;
    let response = legacy_post(
        node,
        &session,
        json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}),
    )
    .await;
    let answer = messages(response).await.pop().expect("an answer");
    assert_eq!(answer["error"]["code"], -32026, "{answer}");
    assert_eq!(
        answer["error"]["data"]["code"], "too_many_links",
        "{answer}"
    );
    assert_eq!(answer["error"]["data"]["max"], 1, "{answer}");
    let message = answer["error"]["message"].as_str().unwrap();
    assert!(message.contains("maximum of 1 links"), "{message}");
}

async fn mcp_http_links(node: &NodeProcess) -> usize {
    mcp_http_link_ids(node).await.len()
}

#[tokio::test]
async fn a_legacy_2025_06_18_client_initializes_a_session_and_calls_tools() {
    let fixture = Fixture::start().await;
    let node = &fixture.node;
    let session = legacy_session(node).await;
    let listed = legacy_post(
        node,
        &session,
        json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}),
    )
    .await;
    let listed = messages(listed).await.pop().unwrap();
    assert_eq!(listed["result"]["tools"].as_array().unwrap().len(), 8);
    // The legacy session is a link.
    assert_eq!(mcp_http_links(node).await, 1);
}

/// The ids of the node's legacy MCP session links.
async fn mcp_http_link_ids(node: &NodeProcess) -> Vec<String> {
    let links: Value = node.get("/v1/links").await.json().await.unwrap();
    links["links"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|link| link["transport"] == "mcp_http")
        .map(|link| link["id"].as_str().unwrap().to_owned())
        .collect()
}

/// A legacy session whose TransportActor failed (links are temporary: not restarted) opens a
/// new link on its next request, so `/v1/links` lists it again.
#[tokio::test]
async fn a_legacy_session_whose_link_actor_failed_is_listed_again_on_its_next_request() {
    let fixture = Fixture::start_with(vec![(
        "TROUPE_DEBUG__FAULT_INJECTION".into(),
        "true".into(),
    )])
    .await;
    let node = &fixture.node;
    let session = legacy_session(node).await;
    let list = |id: u64| json!({"jsonrpc": "2.0", "id": id, "method": "tools/list"});
    assert_eq!(legacy_post(node, &session, list(2)).await.status(), 200);
    let before = mcp_http_link_ids(node).await;
    assert_eq!(before.len(), 1);

    let mut gone = node.events("kind=link.disconnected", None).await;
    let fault = node
        .post_json(
            "/v1/admin/faults",
            json!({"actor": format!("links/{}", before[0]), "kind": "panic"}),
        )
        .await;
    assert_eq!(fault.status(), 202);
    // The link's end is announced once its actor is gone and the registry forgot it.
    tokio::time::timeout(PATIENCE, async {
        while gone.next_of("link.disconnected").await.1["data"]["link"] != before[0].as_str() {}
    })
    .await
    .expect("the failed link ends");
    assert!(mcp_http_link_ids(node).await.is_empty(), "no longer listed");

    let listed = messages(legacy_post(node, &session, list(3)).await)
        .await
        .pop()
        .unwrap();
    assert_eq!(listed["result"]["tools"].as_array().unwrap().len(), 8);
    let after = mcp_http_link_ids(node).await;
    assert_eq!(after.len(), 1, "listed again");
    assert_ne!(after, before, "under a new link");
}

#[tokio::test]
async fn a_legacy_session_lives_while_a_call_waits_and_closes_once_idle() {
    let fixture = Fixture::start_with(vec![(
        "TROUPE_HTTP__MCP_SESSION_IDLE_SECS".into(),
        "1".into(),
    )])
    .await;
    let node = &fixture.node;
    let mut links = node.events("kind=link.*", None).await;
    let waiting = legacy_session(node).await;
    let idle = legacy_session(node).await;
    let listed = legacy_post(
        node,
        &idle,
        json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}),
    )
    .await;
    assert_eq!(listed.status(), 200);
    let _ = messages(listed).await;
    // A session's link opens with its first call: the first MCP HTTP link is the idle one's.
    let idle_link = loop {
        let (_, connected) = links.next_of("link.connected").await;
        if connected["data"]["transport"] == "mcp_http" {
            break connected["data"]["link"].as_str().unwrap().to_owned();
        }
    };
    // A run far longer than the idle allowance, with no progress token: nothing passes on the
    // session while the call waits.
    let call = legacy_request(
        node,
        &waiting,
        json!({"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {
            "name": "spawn_session",
            "arguments": {"session": sh("sleep 4"), "wait": true},
        }}),
    )
    .send();
    let call = tokio::spawn(async move { messages(call.await.unwrap()).await });
    // The idle session goes while the other waits.
    loop {
        let (_, disconnected) = links.next_of("link.disconnected").await;
        if disconnected["data"]["link"] == idle_link.as_str() {
            break;
        }
        assert_ne!(
            disconnected["data"]["transport"], "mcp_http",
            "only the idle session's link goes"
        );
    }
    assert_eq!(
        mcp_http_links(node).await,
        1,
        "the waiting session's link stays"
    );
    let answer = tokio::time::timeout(PATIENCE, call)
        .await
        .expect("the waiting call is answered")
        .unwrap()
        .pop()
        .expect("an answer, not a stream cut with the session");
    assert_eq!(answer["id"], 3, "{answer}");
    assert_eq!(
        content(&answer)["state"],
        "succeeded",
        "the final record: {answer}"
    );
    // The idle session is gone for good: its client is told to start a new one.
    let gone = legacy_post(
        node,
        &idle,
        json!({"jsonrpc": "2.0", "id": 4, "method": "tools/list"}),
    )
    .await;
    assert_eq!(gone.status(), 404);
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

type WsStream =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A client of `/mcp/ws` (subprotocol `mcp`).
struct McpWs {
    socket: WsStream,
}

fn mcp_ws_request(
    node: &NodeProcess,
    token: &str,
) -> tokio_tungstenite::tungstenite::handshake::client::Request {
    let mut request = format!("ws://{}/mcp/ws", node.addr)
        .into_client_request()
        .unwrap();
    request.headers_mut().insert(
        "authorization",
        HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
    );
    request
        .headers_mut()
        .insert("sec-websocket-protocol", HeaderValue::from_static("mcp"));
    request
}

impl McpWs {
    async fn open(node: &NodeProcess, token: &str) -> Self {
        let (socket, _) = tokio_tungstenite::connect_async(mcp_ws_request(node, token))
            .await
            .unwrap();
        Self { socket }
    }

    async fn send(&mut self, message: Value) {
        self.socket
            .send(Message::Text(message.to_string().into()))
            .await
            .unwrap();
    }

    async fn send_text(&mut self, text: &str) {
        self.socket
            .send(Message::Text(text.to_owned().into()))
            .await
            .unwrap();
    }

    async fn next(&mut self) -> Value {
        loop {
            let frame = tokio::time::timeout(PATIENCE, self.socket.next())
                .await
                .expect("a frame")
                .expect("open")
                .expect("well-formed");
            if let Message::Text(text) = frame {
                return serde_json::from_str(&text).unwrap();
            }
        }
    }

    /// Messages until the answer to `id`: the others, and the answer.
    async fn answer(&mut self, id: u64) -> (Vec<Value>, Value) {
        let mut others = Vec::new();
        loop {
            let message = self.next().await;
            if message["id"] == id && message.get("method").is_none() {
                return (others, message);
            }
            others.push(message);
        }
    }

    /// The 2025-11-25 handshake with `capabilities`; returns the initialize result.
    async fn initialize(&mut self, capabilities: Value) -> Value {
        self.send(
            json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
                "protocolVersion": "2025-11-25",
                "capabilities": capabilities,
                "clientInfo": {"name": "ws-test", "version": "0"},
            }}),
        )
        .await;
        let (_, answer) = self.answer(0).await;
        self.send(json!({"jsonrpc": "2.0", "method": "notifications/initialized"}))
            .await;
        answer["result"].clone()
    }
}

fn legacy_call(id: u64, name: &str, arguments: Value) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
           "params": {"name": name, "arguments": arguments}})
}

fn log_messages(messages: &[Value]) -> Vec<(String, String)> {
    messages
        .iter()
        .filter(|message| message["method"] == "notifications/message")
        .map(|message| {
            assert_eq!(message["params"]["logger"], "troupe.session", "{message}");
            (
                message["params"]["level"].as_str().unwrap().to_owned(),
                message["params"]["data"]["kind"]
                    .as_str()
                    .unwrap()
                    .to_owned(),
            )
        })
        .collect()
}

#[tokio::test]
async fn log_notifications_go_out_only_at_or_above_the_level_the_client_asked_for() {
    let fixture = Fixture::start().await;
    let node = &fixture.node;
    let failing = || json!({"session": sh("echo one; exit 3"), "wait": true});

    // 2026-07-28: the level is per request, in _meta.
    let (quiet, _) = call(node, &node.token, tool_call(1, "spawn_session", failing())).await;
    assert!(
        log_messages(&quiet).is_empty(),
        "no level, no log: {quiet:?}"
    );
    let mut body = tool_call(2, "spawn_session", failing());
    body["params"]["_meta"]["io.modelcontextprotocol/logLevel"] = json!("info");
    let (notifications, answer) = call(node, &node.token, body).await;
    assert_eq!(content(&answer)["state"], "failed");
    let logged = log_messages(&notifications);
    assert!(
        logged.contains(&("info".into(), "session.started".into())),
        "{logged:?}"
    );
    assert!(
        logged.contains(&("error".into(), "session.failed".into())),
        "{logged:?}"
    );
    assert!(
        logged.iter().all(|(level, _)| level != "debug"),
        "nothing below info: {logged:?}"
    );
    let mut body = tool_call(3, "spawn_session", failing());
    body["params"]["_meta"]["io.modelcontextprotocol/logLevel"] = json!("debug");
    let (notifications, _) = call(node, &node.token, body).await;
    assert!(
        log_messages(&notifications).contains(&("debug".into(), "session.output".into())),
        "{notifications:?}"
    );

    // A legacy session sets its level once with logging/setLevel (over /mcp/ws here).
    let mut ws = McpWs::open(node, &node.token).await;
    let init = ws.initialize(json!({})).await;
    assert!(init["capabilities"]["logging"].is_object(), "{init}");
    ws.send(legacy_call(1, "spawn_session", failing())).await;
    let (before, _) = ws.answer(1).await;
    assert!(log_messages(&before).is_empty(), "{before:?}");
    ws.send(
        json!({"jsonrpc": "2.0", "id": 2, "method": "logging/setLevel",
                   "params": {"level": "warning"}}),
    )
    .await;
    let (_, set) = ws.answer(2).await;
    assert!(set["error"].is_null(), "{set}");
    ws.send(legacy_call(3, "spawn_session", failing())).await;
    let (after, _) = ws.answer(3).await;
    assert_eq!(
        log_messages(&after),
        vec![("error".to_owned(), "session.failed".to_owned())],
        "only what is at or above warning: {after:?}"
    );

    // 2026-07-28 has no logging/setLevel.
    let response = post(
        node,
        &node.token,
        &request(4, "logging/setLevel", json!({"level": "debug"})),
        V2026,
    )
    .await;
    assert_eq!(response.status(), 404);
}

#[tokio::test]
async fn a_failed_session_is_a_completed_task_whose_result_is_an_error() {
    let fixture = Fixture::start().await;
    let node = &fixture.node;
    let mut events = node.events("kind=session.*", None).await;
    let (_, created) = call(
        node,
        &node.token,
        with_tasks(tool_call(
            1,
            "spawn_session",
            json!({"session": sh("echo bad; exit 3")}),
        )),
    )
    .await;
    let task = created["result"]["taskId"].as_str().unwrap().to_owned();
    events.next_of("session.failed").await;
    let (_, got) = call(
        node,
        &node.token,
        with_tasks(request(2, "tasks/get", json!({"taskId": task}))),
    )
    .await;
    let result = &got["result"];
    assert_eq!(result["status"], "completed", "{got}");
    assert_eq!(result["statusMessage"], "failed", "{got}");
    assert_eq!(result["result"]["isError"], true, "{got}");
    assert_eq!(result["result"]["structuredContent"]["state"], "failed");
    assert_eq!(result["result"]["structuredContent"]["exit_code"], 3);
    assert!(
        result.get("error").is_none(),
        "no string-coded error: {got}"
    );

    // A legacy client that declared the extension at initialize gets tasks too.
    let mut ws = McpWs::open(node, &node.token).await;
    ws.initialize(json!({"extensions": {"io.modelcontextprotocol/tasks": {}}}))
        .await;
    ws.send(legacy_call(
        1,
        "spawn_session",
        json!({"session": sh("true")}),
    ))
    .await;
    let (_, answer) = ws.answer(1).await;
    let task = answer["result"]["taskId"].as_str().unwrap_or_default();
    assert!(task.starts_with("s-"), "a task: {answer}");
}

#[tokio::test]
async fn malformed_json_rpc_and_unknown_methods_get_json_rpc_errors_on_every_mcp_door() {
    let fixture = Fixture::start().await;
    let node = &fixture.node;
    let raw = |body: &'static str, method: &'static str| {
        node.client()
            .post(node.url("/mcp"))
            .bearer_auth(&node.token)
            .header("accept", "application/json, text/event-stream")
            .header("content-type", "application/json")
            .header("mcp-protocol-version", V2026)
            .header("mcp-method", method)
            .body(body)
            .send()
    };
    for (body, code, id) in [
        ("{not json", -32700, Value::Null),
        (r#"{"id": 5, "method": "tools/list"}"#, -32600, json!(5)),
        (
            r#"{"jsonrpc": "2.0", "id": "x", "method": 7}"#,
            -32600,
            json!("x"),
        ),
        (
            r#"[{"jsonrpc": "2.0", "id": 1, "method": "tools/list"}]"#,
            -32600,
            Value::Null,
        ),
        (
            r#"{"jsonrpc": "2.0", "id": 6, "method": "tools/call", "params": {"nome": 1}}"#,
            -32602,
            json!(6),
        ),
    ] {
        let response = raw(body, "tools/list").await.unwrap();
        assert_eq!(response.status(), 400, "{body}");
        let answer: Value = response.json().await.unwrap();
        assert_eq!(answer["error"]["code"], code, "{body}: {answer}");
        assert_eq!(answer["id"], id, "{body}: {answer}");
    }
    // A method no revision defines.
    let response = post(node, &node.token, &request(7, "foo/bar", json!({})), V2026).await;
    assert_eq!(response.status(), 404);
    let answer = messages(response).await.pop().unwrap();
    assert_eq!(answer["error"]["code"], -32601, "{answer}");
    assert_eq!(answer["id"], 7);

    // The same over /mcp/ws, and the link stays.
    let mut ws = McpWs::open(node, &node.token).await;
    ws.initialize(json!({})).await;
    ws.send_text(r#"{"id": 9, "method": "tools/list"}"#).await;
    let answer = ws.next().await;
    assert_eq!(answer["error"]["code"], -32600, "{answer}");
    assert_eq!(answer["id"], 9);
    ws.send(json!({"jsonrpc": "2.0", "id": 10, "method": "tools/call", "params": {"nome": 1}}))
        .await;
    let (_, answer) = ws.answer(10).await;
    assert_eq!(answer["error"]["code"], -32602, "{answer}");
    ws.send(json!({"jsonrpc": "2.0", "id": 11, "method": "foo/bar"}))
        .await;
    let (_, answer) = ws.answer(11).await;
    assert_eq!(answer["error"]["code"], -32601, "{answer}");
    ws.send(legacy_call(12, "node_health", json!({}))).await;
    let (_, health) = ws.answer(12).await;
    assert_eq!(health["result"]["structuredContent"]["status"], "healthy");

    // A frame over http.max_body_bytes closes that link only.
    let mut other = McpWs::open(node, &node.token).await;
    other.initialize(json!({})).await;
    let _ = ws
        .socket
        .send(Message::Text("x".repeat(2 * 1024 * 1024).into()))
        .await;
    let closed = tokio::time::timeout(PATIENCE, async {
        while let Some(frame) = ws.socket.next().await {
            match frame {
                Ok(Message::Close(close)) => return close.map(|close| u16::from(close.code)),
                Ok(_) => continue,
                Err(_) => return None,
            }
        }
        None
    })
    .await
    .expect("the oversize frame ends the link");
    assert!(matches!(closed, Some(1008) | None), "{closed:?}");
    other.send(legacy_call(1, "node_health", json!({}))).await;
    let (_, health) = other.answer(1).await;
    assert_eq!(health["result"]["structuredContent"]["status"], "healthy");
}

#[tokio::test]
async fn cancelling_a_waiting_spawn_stops_its_progress_and_leaves_the_session_running() {
    let fixture = Fixture::start().await;
    let node = &fixture.node;
    let mut observer = node.events("kind=session.*", None).await;
    let marker = fixture._temp.path().join("release-cancel");
    let script = format!(
        "echo started; while [ ! -e {} ]; do sleep 0.05; done; echo released",
        marker.display()
    );
    let mut ws = McpWs::open(node, &node.token).await;
    ws.initialize(json!({})).await;
    let mut spawn = legacy_call(
        2,
        "spawn_session",
        json!({"session": sh(&script), "wait": true}),
    );
    spawn["params"]["_meta"] = json!({"progressToken": "c"});
    ws.send(spawn).await;
    let (_, output) = observer.next_of("session.output").await;
    let id = output["session"].as_str().unwrap().to_owned();
    // Progress arrives for the token…
    loop {
        let message = ws.next().await;
        assert_ne!(message["id"], 2, "no answer yet: {message}");
        if message["method"] == "notifications/progress"
            && message["params"]["message"]
                .as_str()
                .is_some_and(|text| text.contains("started"))
        {
            break;
        }
    }
    // …until the client cancels the call.
    ws.send(
        json!({"jsonrpc": "2.0", "method": "notifications/cancelled",
                   "params": {"requestId": 2, "reason": "test"}}),
    )
    .await;
    assert_eq!(node.session(&id).await["state"], "running");
    std::fs::write(&marker, "").unwrap();
    let (_, ended) = observer.next_of("session.succeeded").await;
    assert_eq!(ended["session"], id.as_str());
    // Nothing more for the cancelled call: no answer, no progress about the release.
    ws.send(legacy_call(3, "get_session", json!({"id": id})))
        .await;
    let (between, answer) = ws.answer(3).await;
    assert_eq!(answer["result"]["structuredContent"]["state"], "succeeded");
    for message in &between {
        assert_ne!(
            message["id"], 2,
            "the cancelled call was answered: {message}"
        );
        assert!(
            !message.to_string().contains("released"),
            "progress went on after the cancel: {message}"
        );
    }
}

/// Regression: a request whose id was that of one still waiting was admitted without counting
/// (so the bound of 64 waiting requests could be passed at will), and its answer was lost. It is
/// now refused at once, and the first request is still answered.
#[tokio::test]
async fn a_request_reusing_the_id_of_one_still_waiting_is_refused() {
    let fixture = Fixture::start().await;
    let node = &fixture.node;
    let mut observer = node.events("kind=session.*", None).await;
    let marker = fixture._temp.path().join("release-duplicate");
    let script = format!(
        "echo started; while [ ! -e {} ]; do sleep 0.05; done",
        marker.display()
    );
    let mut ws = McpWs::open(node, &node.token).await;
    ws.initialize(json!({})).await;
    ws.send(legacy_call(
        2,
        "spawn_session",
        json!({"session": sh(&script), "wait": true}),
    ))
    .await;
    observer.next_of("session.output").await;
    ws.send(legacy_call(2, "list_sessions", json!({}))).await;
    let refused = ws.next().await;
    assert_eq!(refused["id"], 2, "{refused}");
    assert_eq!(refused["error"]["code"], -32600, "{refused}");
    assert_eq!(
        refused["error"]["data"]["code"], "duplicate_request_id",
        "{refused}"
    );
    std::fs::write(&marker, "").unwrap();
    let (between, answer) = ws.answer(2).await;
    assert_eq!(
        answer["result"]["structuredContent"]["state"], "succeeded",
        "the waiting call is answered: {answer}"
    );
    assert!(
        between.iter().all(|message| message["id"] != 2),
        "{between:?}"
    );
}

/// A node with tight per-token rate limits (3 at once, 1 per second).
async fn rate_limited_node(temp: &tempfile::TempDir) -> NodeProcess {
    let config = temp.path().join("troupe.toml");
    std::fs::write(
        &config,
        format!(
            "[auth]\nrequests_per_second = 1\nburst = 3\n\
             tokens = [{{ name = \"dash\", role = \"viewer\", sha256 = \"{}\" }}]\n",
            hex::encode(Sha256::digest(VIEWER.as_bytes()))
        ),
    )
    .unwrap();
    NodeProcess::start_with(
        &temp.path().join("data"),
        &["--config", config.to_str().unwrap()],
        &NodeEnv::default(),
    )
    .await
}

#[tokio::test]
async fn the_rate_limit_charges_each_request_on_http_websockets_and_subscribe_frames() {
    let temp = tempfile::tempdir().unwrap();
    let node = rate_limited_node(&temp).await;

    // /mcp/ws: the upgrade and then each JSON-RPC request pay.
    let mut ws = McpWs::open(&node, &node.token).await;
    ws.send(
        json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
            "protocolVersion": "2025-11-25", "capabilities": {},
            "clientInfo": {"name": "limited", "version": "0"},
        }}),
    )
    .await;
    let mut refused = Vec::new();
    for id in 1..=4u64 {
        ws.send(json!({"jsonrpc": "2.0", "id": id, "method": "ping"}))
            .await;
    }
    for _ in 0..5 {
        let message = ws.next().await;
        if message["error"]["code"] == troupe::mcp::http::RATE_LIMITED {
            assert!(
                message["id"].is_u64(),
                "the refusal carries the id: {message}"
            );
            assert_eq!(message["error"]["data"]["code"], "rate_limited");
            assert!(message["error"]["data"]["retry_after_ms"].as_u64().unwrap() > 0);
            refused.push(message["id"].clone());
        }
    }
    assert!(
        refused.len() >= 2,
        "five requests past a burst of three: {refused:?}"
    );

    // Events WebSocket: each subscribe frame pays (the viewer token has its own bucket).
    let mut request = format!("ws://{}/v1/events/ws?kind=link.*", node.addr)
        .into_client_request()
        .unwrap();
    request.headers_mut().insert(
        "authorization",
        HeaderValue::from_str(&format!("Bearer {VIEWER}")).unwrap(),
    );
    let (mut events, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    let mut limited = 0;
    for n in 0..4 {
        let frame = json!({"type": "subscribe", "name": format!("s{n}"),
                           "filter": {"kind": ["session.*"]}});
        events
            .send(Message::Text(frame.to_string().into()))
            .await
            .unwrap();
        let answer = loop {
            let frame = tokio::time::timeout(PATIENCE, events.next())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            let Message::Text(text) = frame else { continue };
            let value: Value = serde_json::from_str(&text).unwrap();
            if value["type"] != "event" {
                break value;
            }
        };
        if answer["code"] == "rate_limited" {
            assert!(answer["retry_after_ms"].as_u64().unwrap() > 0, "{answer}");
            limited += 1;
        }
    }
    assert!(limited >= 1, "four frames after the upgrade, burst three");

    // HTTP: 429 with Retry-After (whole seconds, at least 1).
    let mut answered = None;
    for _ in 0..6 {
        let response = node
            .client()
            .get(node.url("/v1/links"))
            .bearer_auth(VIEWER)
            .send()
            .await
            .unwrap();
        if response.status() == 429 {
            answered = Some(response);
            break;
        }
    }
    let response = answered.expect("a 429 within six requests past the burst");
    let retry: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry >= 1, "{retry}");
    let envelope: Value = response.json().await.unwrap();
    assert_eq!(envelope["error"]["code"], "rate_limited");
}

/// A WebSocket to `path` whose client never reads: a tiny receive buffer, and nobody polls it.
async fn never_reading_socket(
    node: &NodeProcess,
    request: tokio_tungstenite::tungstenite::handshake::client::Request,
) -> WsStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(node.addr).await.unwrap();
    let (socket, _) =
        tokio_tungstenite::client_async(request, tokio_tungstenite::MaybeTlsStream::Plain(stream))
            .await
            .unwrap();
    socket
}

#[tokio::test]
async fn an_mcp_websocket_client_that_never_reads_is_dropped_and_others_are_unaffected() {
    let temp = tempfile::tempdir().unwrap();
    let config = temp.path().join("troupe.toml");
    std::fs::write(
        &config,
        "[auth]\nrequests_per_second = 100000\nburst = 100000\n",
    )
    .unwrap();
    let node = NodeProcess::start_with(
        &temp.path().join("data"),
        &["--config", config.to_str().unwrap()],
        &NodeEnv::default(),
    )
    .await;
    let mut observer = node.events("kind=link.*", None).await;
    let mut stalled = never_reading_socket(&node, mcp_ws_request(&node, &node.token)).await;
    let link = loop {
        let (_, connected) = observer.next_of("link.connected").await;
        if connected["data"]["transport"] == "mcp_web_socket" {
            break connected["data"]["link"].as_str().unwrap().to_owned();
        }
    };
    // Thousands of requests whose answers (tools/list, a few KB each) nobody reads. The sends
    // run in a task: once the node stops reading too, they block until the link is dropped.
    let flood = tokio::spawn(async move {
        let init = json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
            "protocolVersion": "2025-11-25", "capabilities": {},
            "clientInfo": {"name": "stalled", "version": "0"}}});
        let _ = stalled.send(Message::Text(init.to_string().into())).await;
        let initialized = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
        let _ = stalled
            .send(Message::Text(initialized.to_string().into()))
            .await;
        for id in 1..=4000u64 {
            let list = json!({"jsonrpc": "2.0", "id": id, "method": "tools/list"});
            if stalled
                .send(Message::Text(list.to_string().into()))
                .await
                .is_err()
            {
                break;
            }
        }
        stalled
    });
    // The node gives up on it (its writer waited 10 s) …
    loop {
        let (_, event) = observer.next_of("link.disconnected").await;
        if event["data"]["link"] == link.as_str() {
            break;
        }
    }
    // … and everyone else is served.
    let mut other = McpWs::open(&node, &node.token).await;
    other.initialize(json!({})).await;
    other.send(legacy_call(1, "node_health", json!({}))).await;
    let (_, health) = other.answer(1).await;
    assert_eq!(health["result"]["structuredContent"]["status"], "healthy");
    let links: Value = node.get("/v1/links").await.json().await.unwrap();
    assert!(!links.to_string().contains(&link), "{links}");
    flood.abort();
}

#[tokio::test]
async fn an_mcp_websocket_client_that_answers_no_ping_is_dropped_and_a_live_one_stays() {
    // Pings every second: a client that answers none for three is taken for gone.
    let fixture =
        Fixture::start_with(vec![("TROUPE_EVENTS__HEARTBEAT_SECS".into(), "1".into())]).await;
    let node = &fixture.node;
    let mut observer = node.events("kind=link.*", None).await;
    // A client that vanished without closing its connection: it initialized, then never reads
    // again, so it never answers a ping.
    let mut vanished = never_reading_socket(node, mcp_ws_request(node, &node.token)).await;
    let link = loop {
        let (_, connected) = observer.next_of("link.connected").await;
        if connected["data"]["transport"] == "mcp_web_socket" {
            break connected["data"]["link"].as_str().unwrap().to_owned();
        }
    };
    for message in [
        json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
            "protocolVersion": "2025-11-25", "capabilities": {},
            "clientInfo": {"name": "vanished", "version": "0"}}}),
        json!({"jsonrpc": "2.0", "method": "notifications/initialized"}),
    ] {
        vanished
            .send(Message::Text(message.to_string().into()))
            .await
            .unwrap();
    }
    // A live client waits on a run longer than three pings, reading its socket all along.
    let mut live = McpWs::open(node, &node.token).await;
    live.initialize(json!({})).await;
    live.send(legacy_call(
        1,
        "spawn_session",
        json!({"session": sh("sleep 4"), "wait": true}),
    ))
    .await;
    let waiting = tokio::spawn(async move { live.answer(1).await.1 });

    loop {
        let (_, event) = observer.next_of("link.disconnected").await;
        if event["data"]["link"] == link.as_str() {
            break;
        }
        assert_ne!(
            event["data"]["transport"], "mcp_web_socket",
            "only the silent client goes: {event}"
        );
    }
    let answer = tokio::time::timeout(PATIENCE, waiting)
        .await
        .expect("the live client is answered")
        .unwrap();
    assert_eq!(
        answer["result"]["structuredContent"]["state"], "succeeded",
        "{answer}"
    );
    drop(vanished);
}

/// Regression: a client that stopped reading the streamed answer of a waiting call (rmcp owns
/// that stream, so no link of ours watched its writes) kept its connection, its link and the
/// call for as long as the session ran. The node now closes a connection that accepts nothing
/// for `http.send_timeout_secs` (1 s here): the call ends, its link goes, the session runs on.
#[tokio::test]
async fn a_client_that_stops_reading_a_waiting_calls_answer_is_disconnected() {
    let fixture = Fixture::start_with(vec![
        ("TROUPE_HTTP__SEND_TIMEOUT_SECS".into(), "1".into()),
        (
            "TROUPE_SESSIONS__OUTPUT_EVENTS_PER_SEC".into(),
            "1000000".into(),
        ),
    ])
    .await;
    let node = &fixture.node;
    let mut observer = node.events("kind=link.*", None).await;
    let mut started = node.events("kind=session.started", None).await;
    // A waiting spawn of a session whose output never stops: a progress notification per
    // output event, sent to a client with a tiny receive buffer that never reads.
    let flood = "line=$(head -c 1000 /dev/zero | tr '\\0' x); \
                 while :; do i=0; while [ $i -lt 100 ]; do echo \"$line\"; i=$((i+1)); done; \
                 sleep 0.01; done";
    let mut body = tool_call(
        1,
        "spawn_session",
        json!({"session": sh(flood), "wait": true}),
    );
    body["params"]["_meta"]["progressToken"] = json!("stalled");
    // Every output event as a log notification, lines and all: megabytes a second.
    body["params"]["_meta"]["io.modelcontextprotocol/logLevel"] = json!("debug");
    let body = body.to_string();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stalled = socket.connect(node.addr).await.unwrap();
    let request = format!(
        "POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {}\r\n\
         Accept: application/json, text/event-stream\r\nContent-Type: application/json\r\n\
         Mcp-Protocol-Version: {V2026}\r\nMcp-Method: tools/call\r\nMcp-Name: spawn_session\r\n\
         Content-Length: {}\r\n\r\n{body}",
        node.token,
        body.len()
    );
    {
        use tokio::io::AsyncWriteExt;
        stalled.write_all(request.as_bytes()).await.unwrap();
    }
    let link = loop {
        let (_, connected) = observer.next_of("link.connected").await;
        if connected["data"]["transport"] == "mcp_http" {
            break connected["data"]["link"].as_str().unwrap().to_owned();
        }
    };
    let (_, output) = started.next_of("session.started").await;
    let session = output["session"].as_str().unwrap().to_owned();

    loop {
        let (_, event) = observer.next_of("link.disconnected").await;
        if event["data"]["link"] == link.as_str() {
            break;
        }
    }
    // What the client had not read is all it gets (an end or a reset): the connection is closed.
    let mut rest = Vec::new();
    tokio::time::timeout(PATIENCE, async {
        use tokio::io::AsyncReadExt;
        let _end_or_reset = stalled.read_to_end(&mut rest).await;
    })
    .await
    .expect("the node closed the connection");
    assert_eq!(node.session(&session).await["state"], "running");
    assert!(
        node.delete(&format!("/v1/sessions/{session}"))
            .await
            .status()
            .is_success()
    );
}
