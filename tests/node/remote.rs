//! Remote work across real nodes on loopback (`fast` profile): sessions spawned on a named node
//! or by placement with label constraints, a remote session's output followed through another
//! node, the MCP tools and the CLI reaching other nodes, and a killed owner whose sessions turn
//! `unreachable` until it returns and the views converge.

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};

use crate::cluster::make_cluster;
use crate::support::{NodeProcess, PATIENCE, SseStream, run_cli, start_cluster_node};

/// How long a `kill -9` may take to be noticed: the `fast` profile declares a silent member
/// down within about 1.5 s (probe 300 ms, suspect-to-down 900 ms); 10 s leaves room for a
/// loaded machine.
const DETECTION_BOUND: Duration = Duration::from_secs(10);

/// Starts node `name` in `root/name` with the `fast` profile, `labels`, at most two sessions
/// running at once, joining `join` when given.
async fn node(
    root: &Path,
    name: &str,
    labels: &[(&str, &str)],
    join: Option<std::net::SocketAddr>,
) -> NodeProcess {
    let labels: Vec<String> = labels
        .iter()
        .map(|(key, value)| format!("{key} = \"{value}\""))
        .collect();
    let config = format!(
        "[cluster]\nprofile = \"fast\"\nlabels = {{ {} }}\n\n[sessions]\nmax_concurrent = 2\n",
        labels.join(", ")
    );
    start_cluster_node(root, name, &config, join, &[]).await
}

/// Waits until `node`'s member view has each of `names` alive with its gossiped metadata.
/// Metadata follows `node.joined` by a gossip round and no event announces it, so this reads the
/// view again every 50 ms, for at most [`PATIENCE`].
async fn wait_members(node: &NodeProcess, names: &[&str]) {
    tokio::time::timeout(PATIENCE, async {
        loop {
            let view: Value = node.get("/v1/cluster/members").await.json().await.unwrap();
            let members = view["members"].as_array().cloned().unwrap_or_default();
            let ready = |name: &str| {
                members.iter().any(|member| {
                    member["node"] == name
                        && member["state"] == "alive"
                        && member["meta"]["http"].is_string()
                })
            };
            if names.iter().all(|name| ready(name)) {
                return;
            }
            // The member view is written by the registry on its own task after membership
            // changes, and no event announces that write: poll the view (one cheap GET),
            // bounded by PATIENCE.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("every member is alive with its metadata");
}

/// Waits until `from`'s events reach `to` through the relay. A relay link starts a moment after
/// the membership and carries only events published after it is up, so this opens client links
/// on `from` (each publishes a `link.connected`) until one arrives on `to`, waiting up to 500 ms
/// for each, for at most [`PATIENCE`].
async fn wait_relay(from: &NodeProcess, from_name: &str, to: &NodeProcess) {
    let mut relayed = to
        .events(&format!("kind=link.connected&node={from_name}"), None)
        .await;
    let mut opened = Vec::new();
    tokio::time::timeout(PATIENCE, async {
        loop {
            opened.push(from.events("kind=health.*", None).await);
            if tokio::time::timeout(Duration::from_millis(500), relayed.next())
                .await
                .is_ok()
            {
                return;
            }
        }
    })
    .await
    .expect("the relay link comes up");
}

/// Reads `stream` until an event of `kind` concerns session `id`; returns it.
async fn session_event(stream: &mut SseStream, id: &str, kind: &str) -> Value {
    loop {
        let (_, event) = stream.next_of(kind).await;
        if event["session"] == id {
            return event;
        }
    }
}

/// Reads `stream` until a `node.*` event of `kind` names `name`.
async fn membership_event(stream: &mut SseStream, kind: &str, name: &str) -> Value {
    loop {
        let (_, event) = stream.next_of(kind).await;
        if event["data"]["node"] == name {
            return event;
        }
    }
}

/// kill -9 of node c; returns once `watcher` (node.* events of another node) has c's node.down,
/// which must come within the fast profile's bound.
async fn kill_and_detect(c: &mut NodeProcess, watcher: &mut SseStream) {
    c.child.start_kill().unwrap();
    let _ = c.wait_exit().await;
    tokio::time::timeout(DETECTION_BOUND, membership_event(watcher, "node.down", "c"))
        .await
        .expect("node.down for c within the fast profile's bound");
}

/// Opens a link on `b` (its `link.connected` marks the end of what b published so far) and
/// reads `b_events` up to it: no `session.unreachable` may come before, else `why`.
async fn no_more_unreachable(b: &NodeProcess, b_events: &mut SseStream, why: &str) {
    let _marker = b.events("kind=health.*", None).await;
    loop {
        let (_, event) = b_events.next().await;
        match event["kind"].as_str().unwrap() {
            "link.connected" if event["node"] == "b" => break,
            "session.unreachable" => panic!("{why}: {event}"),
            _ => {}
        }
    }
}

async fn spawn_through(node: &NodeProcess, body: Value) -> (u16, Value) {
    let response = node.post_json("/v1/sessions", body).await;
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

fn command(script: &str) -> Value {
    json!({"kind": "command", "program": "sh", "args": ["-c", script]})
}

fn with(mut body: Value, key: &str, value: Value) -> Value {
    body[key] = value;
    body
}

#[tokio::test]
async fn sessions_are_placed_on_a_named_node_or_the_least_loaded_one_carrying_the_labels() {
    let temp = tempfile::tempdir().unwrap();
    make_cluster(temp.path(), &["b", "c"]).await;
    let a = node(temp.path(), "a", &[("zone", "z1")], None).await;
    let b = node(temp.path(), "b", &[("zone", "z2")], a.cluster).await;
    let c = node(temp.path(), "c", &[("zone", "z2")], a.cluster).await;
    wait_members(&a, &["b", "c"]).await;
    wait_members(&b, &["a", "c"]).await;
    wait_members(&c, &["a", "b"]).await;

    // By name, through another node.
    let (status, placed) = spawn_through(&b, with(command("true"), "node", json!("c"))).await;
    assert_eq!(status, 202, "{placed}");
    assert_eq!(placed["node"], "c");

    // An invalid node is refused, not run here; an unknown one too.
    let (status, refused) =
        spawn_through(&b, with(command("true"), "node", json!("no such node!"))).await;
    assert_eq!(status, 400, "{refused}");
    assert_eq!(refused["error"]["details"]["field"], "node", "{refused}");
    let (status, refused) = spawn_through(&b, with(command("true"), "node", json!("zz"))).await;
    assert_eq!(status, 400, "{refused}");
    assert_eq!(refused["error"]["code"], "unknown_node", "{refused}");
    let (status, refused) = spawn_through(
        &b,
        with(
            with(command("true"), "node", json!("c")),
            "placement",
            json!("least_loaded"),
        ),
    )
    .await;
    assert_eq!(status, 400, "{refused}");
    assert_eq!(refused["error"]["details"]["field"], "placement");

    // Load b: both of its slots run.
    let mut on_b = b.events("kind=session.started&tail=100", None).await;
    for _ in 0..2 {
        let (status, busy) = spawn_through(&b, command("sleep 60")).await;
        assert_eq!(status, 202, "{busy}");
        assert_eq!(busy["node"], "b");
        session_event(&mut on_b, busy["id"].as_str().unwrap(), "session.started").await;
    }

    // least_loaded through the loaded node avoids it (its own load is exact).
    let (status, placed) = spawn_through(
        &b,
        with(command("true"), "placement", json!("least_loaded")),
    )
    .await;
    assert_eq!(status, 202, "{placed}");
    assert_ne!(
        placed["node"], "b",
        "placement avoids the loaded node: {placed}"
    );

    // A label constraint picks among the nodes carrying it: c, not the loaded b, nor a.
    let in_z2 = json!({"strategy": "least_loaded", "labels": {"zone": "z2"}});
    let (status, placed) = spawn_through(&b, with(command("true"), "placement", in_z2)).await;
    assert_eq!(status, 202, "{placed}");
    assert_eq!(placed["node"], "c", "{placed}");
    let in_z1 = json!({"strategy": "least_loaded", "labels": {"zone": "z1"}});
    let (status, placed) = spawn_through(&c, with(command("true"), "placement", in_z1)).await;
    assert_eq!(status, 202, "{placed}");
    assert_eq!(placed["node"], "a", "{placed}");

    // A constraint no node carries is a 409 naming it.
    let nowhere = json!({"strategy": "least_loaded", "labels": {"zone": "z9", "disk": "ssd"}});
    let (status, refused) = spawn_through(&a, with(command("true"), "placement", nowhere)).await;
    assert_eq!(status, 409, "{refused}");
    assert_eq!(refused["error"]["code"], "no_matching_node", "{refused}");
    assert_eq!(refused["error"]["details"]["unmatched"]["zone"], "z9");
    assert_eq!(refused["error"]["details"]["unmatched"]["disk"], "ssd");
    assert_eq!(refused["error"]["details"]["nodes"]["b"]["zone"], "z2");
    let message = refused["error"]["message"].as_str().unwrap();
    assert!(message.contains("disk=ssd, zone=z9"), "{message}");
    let (status, refused) =
        spawn_through(&a, with(command("true"), "placement", json!("most_loaded"))).await;
    assert_eq!(status, 400, "{refused}");
    assert_eq!(refused["error"]["details"]["field"], "placement");
}

/// A 2026-07-28 MCP `tools/call` on `node`; returns the tool result.
async fn mcp_tool(node: &NodeProcess, name: &str, arguments: Value) -> Value {
    let body = json!({
        "jsonrpc": "2.0",
        "id": 1,
        "method": "tools/call",
        "params": {
            "name": name,
            "arguments": arguments,
            "_meta": {
                "io.modelcontextprotocol/protocolVersion": "2026-07-28",
                "io.modelcontextprotocol/clientCapabilities": {},
                "io.modelcontextprotocol/clientInfo": {"name": "troupe-tests", "version": "0"},
            },
        },
    });
    let response = node
        .client()
        .post(node.url("/mcp"))
        .bearer_auth(&node.token)
        .header("accept", "application/json, text/event-stream")
        .header("mcp-protocol-version", "2026-07-28")
        .header("mcp-method", "tools/call")
        .header("mcp-name", name)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "{name}");
    let sse = response
        .headers()
        .get("content-type")
        .is_some_and(|value| value.to_str().unwrap().starts_with("text/event-stream"));
    let text = tokio::time::timeout(PATIENCE, response.text())
        .await
        .expect("the answer ends")
        .unwrap();
    let answer: Value = if sse {
        text.lines()
            .filter_map(|line| line.strip_prefix("data:"))
            .map(str::trim)
            .filter(|data| !data.is_empty())
            .map(|data| serde_json::from_str::<Value>(data).unwrap())
            .rfind(|message| message.get("id").is_some())
            .expect("an answer")
    } else {
        serde_json::from_str(&text).unwrap()
    };
    answer["result"].clone()
}

#[tokio::test]
async fn a_remote_session_is_followed_listed_and_reached_through_rest_mcp_and_the_cli() {
    let temp = tempfile::tempdir().unwrap();
    make_cluster(temp.path(), &["b", "c"]).await;
    let b = node(temp.path(), "b", &[("zone", "z1")], None).await;
    let c = node(temp.path(), "c", &[("zone", "z2")], b.cluster).await;
    wait_members(&b, &["c"]).await;
    wait_relay(&c, "c", &b).await;

    // A run on c that prints, then waits for the test before printing again: its first line
    // reaches a follower on b while it still runs, so the output is streamed, not buffered.
    let flag = temp.path().join("go-on");
    let script = format!(
        "echo first; while [ ! -f {} ]; do sleep 0.05; done; echo second",
        flag.display()
    );
    let (status, created) = spawn_through(&b, with(command(&script), "node", json!("c"))).await;
    assert_eq!(status, 202, "{created}");
    let id = created["id"].as_str().unwrap().to_owned();
    let response = b
        .get(&format!("/v1/sessions/{id}/output?follow=true"))
        .await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-troupe-node"], "c");
    let mut lines = eventsource_stream::Eventsource::eventsource(response.bytes_stream());
    let mut next = async || {
        let event = tokio::time::timeout(PATIENCE, futures::StreamExt::next(&mut lines))
            .await
            .expect("an output event")
            .expect("the stream is open")
            .expect("a well-formed event");
        let data: Value = serde_json::from_str(&event.data).unwrap();
        (event.event, data)
    };
    let (kind, first) = next().await;
    assert_eq!(
        (kind.as_str(), first["text"].as_str()),
        ("message", Some("first"))
    );
    std::fs::write(&flag, "").unwrap();
    let (_, second) = next().await;
    assert_eq!(second["text"], "second");
    let (kind, end) = next().await;
    assert_eq!(kind, "end");
    assert_eq!(end["state"], "succeeded");

    // The CLI through b: spawn on c and follow it to the end, logs, show, a cluster listing.
    let (status, stdout, stderr) = run_cli(
        &b,
        &[
            "session",
            "spawn",
            "--on",
            "c",
            "--",
            "sh",
            "-c",
            "echo via-cli",
        ],
    )
    .await;
    assert!(status.success(), "{stdout}{stderr}");
    assert_eq!(stdout.trim(), "via-cli");
    let (status, stdout, stderr) = run_cli(&b, &["session", "logs", &id]).await;
    assert!(status.success(), "{stderr}");
    assert_eq!(stdout, "first\nsecond\n");
    let (status, stdout, stderr) = run_cli(&b, &["session", "show", &id, "--json"]).await;
    assert!(status.success(), "{stderr}");
    let shown: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(
        (shown["node"].as_str(), shown["state"].as_str()),
        (Some("c"), Some("succeeded"))
    );
    let (status, stdout, stderr) = run_cli(
        &b,
        &[
            "session",
            "spawn",
            "--detach",
            "--placement",
            "least_loaded",
            "--constraint",
            "zone=z2",
            "--",
            "sleep",
            "60",
        ],
    )
    .await;
    assert!(status.success(), "{stderr}");
    let sleeper = stdout.trim().to_owned();
    let (status, stdout, stderr) = run_cli(&b, &["session", "list", "--scope", "cluster"]).await;
    assert!(status.success(), "{stderr}");
    let row = stdout
        .lines()
        .find(|line| line.starts_with(&sleeper))
        .unwrap_or_else(|| panic!("{sleeper} is listed: {stdout}"));
    assert!(
        row.split_whitespace().nth(1) == Some("c"),
        "NODE column: {row}"
    );
    let (status, stdout, _) = run_cli(&b, &["session", "list"]).await;
    assert!(status.success());
    assert!(!stdout.contains(&sleeper), "a local listing: {stdout}");
    let (status, stdout, stderr) = run_cli(&b, &["session", "cancel", &sleeper, "--json"]).await;
    assert!(status.success(), "{stderr}");
    let cancelled: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(cancelled["node"], "c");
    let (status, _, stderr) = run_cli(
        &b,
        &["session", "spawn", "--constraint", "zone=z2", "--", "true"],
    )
    .await;
    assert!(
        !status.success() && stderr.contains("--placement"),
        "{stderr}"
    );

    // MCP on b: spawn on c, read, list across the cluster, cancel; spawn by placement and wait.
    let spawned = mcp_tool(
        &b,
        "spawn_session",
        json!({"session": {"kind": "command", "program": "sh",
                           "args": ["-c", "echo from-mcp; sleep 60"], "node": "c"}}),
    )
    .await;
    assert_ne!(spawned["isError"], true, "{spawned}");
    let record = &spawned["structuredContent"];
    assert_eq!(record["node"], "c", "{spawned}");
    let mcp_id = record["id"].as_str().unwrap().to_owned();
    let mut on_b = b.events(&format!("session={mcp_id}&tail=100"), None).await;
    session_event(&mut on_b, &mcp_id, "session.output").await;
    let got = mcp_tool(&b, "get_session", json!({"id": mcp_id})).await;
    assert_eq!(got["structuredContent"]["node"], "c", "{got}");
    assert_eq!(got["structuredContent"]["state"], "running", "{got}");
    let output = mcp_tool(&b, "session_output", json!({"id": mcp_id})).await;
    assert_eq!(
        output["structuredContent"]["lines"][0]["text"], "from-mcp",
        "{output}"
    );
    let listed = mcp_tool(&b, "list_sessions", json!({"scope": "cluster"})).await;
    let listed = &listed["structuredContent"];
    assert_eq!(listed["nodes"]["c"], "ok", "{listed}");
    assert!(
        listed["sessions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|session| session["id"] == mcp_id.as_str() && session["node"] == "c"),
        "{listed}"
    );
    let local = mcp_tool(&b, "list_sessions", json!({})).await;
    assert!(
        !local["structuredContent"]["sessions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|session| session["id"] == mcp_id.as_str()),
        "{local}"
    );
    let cancelled = mcp_tool(&b, "cancel_session", json!({"id": mcp_id})).await;
    assert_eq!(cancelled["structuredContent"]["node"], "c", "{cancelled}");
    session_event(&mut on_b, &mcp_id, "session.cancelled").await;
    let waited = mcp_tool(
        &b,
        "spawn_session",
        json!({"wait": true, "session": {"kind": "command", "program": "sh",
               "args": ["-c", "echo placed"],
               "placement": {"strategy": "least_loaded", "labels": {"zone": "z2"}}}}),
    )
    .await;
    assert_eq!(waited["structuredContent"]["node"], "c", "{waited}");
    assert_eq!(
        waited["structuredContent"]["state"], "succeeded",
        "{waited}"
    );
    let nowhere = mcp_tool(
        &b,
        "spawn_session",
        json!({"session": {"kind": "command", "program": "true",
               "placement": {"strategy": "least_loaded", "labels": {"zone": "z9"}}}}),
    )
    .await;
    assert_eq!(nowhere["isError"], true, "{nowhere}");
    assert_eq!(
        nowhere["structuredContent"]["error"]["code"], "no_matching_node",
        "{nowhere}"
    );
    drop(c);
}

#[tokio::test]
async fn a_session_this_node_never_heard_of_is_found_and_read_through_it_or_its_possible_owner_named()
 {
    let temp = tempfile::tempdir().unwrap();
    make_cluster(temp.path(), &["b", "c"]).await;
    let mut b = node(temp.path(), "b", &[], None).await;
    let mut c = node(temp.path(), "c", &[], b.cluster).await;
    wait_members(&b, &["c"]).await;
    // b restarts: whatever it had heard of c's sessions is gone with its memory, and the relay
    // resumes after what b had stored, so c's session.queued never comes again.
    let (_, record) = spawn_through(&c, command("sleep 60")).await;
    let id = record["id"].as_str().unwrap().to_owned();
    b.terminate();
    let _ = b.wait_exit().await;
    let b = node(temp.path(), "b", &[], c.cluster).await;
    wait_members(&b, &["c"]).await;

    let response = b.get(&format!("/v1/sessions/{id}")).await;
    assert_eq!(response.status(), 200, "found on c");
    assert_eq!(response.headers()["x-troupe-node"], "c");
    let found: Value = response.json().await.unwrap();
    assert_eq!(found["node"], "c", "{found}");
    // Known now: the output is asked of c at once.
    let output = b.get(&format!("/v1/sessions/{id}/output")).await;
    assert_eq!(output.status(), 200);

    // A page of long lines, asked through b, fits one forwarded answer: it ends early, and
    // next_offset goes on.
    let mut c_events = c.events("kind=session.succeeded", None).await;
    let (_, record) = spawn_through(
        &c,
        command(r#"for i in $(seq 400); do head -c 12000 /dev/zero | tr '\0' x; echo; done"#),
    )
    .await;
    let long = record["id"].as_str().unwrap().to_owned();
    session_event(&mut c_events, &long, "session.succeeded").await;
    let mut offset = 0;
    let mut lines = 0;
    while lines < 400 {
        let response = b
            .get(&format!("/v1/sessions/{long}/output?offset={offset}"))
            .await;
        assert_eq!(response.status(), 200, "page after line {offset}");
        let page: Value = response.json().await.unwrap();
        let got = page["lines"].as_array().unwrap().len();
        assert!(got > 0 && got < 400, "a page of {got} lines");
        lines += got;
        offset = page["next_offset"].as_u64().unwrap();
    }
    assert_eq!(lines, 400);

    // A session nobody has is still a 404.
    let nowhere = b.get("/v1/sessions/s-nowhere").await;
    assert_eq!(nowhere.status(), 404);

    // With c down, an id b never heard of may be c's: a 503 naming c, not a 404.
    let mut b_events = b.events("kind=node.*", None).await;
    kill_and_detect(&mut c, &mut b_events).await;
    let response = b.get("/v1/sessions/s-nowhere").await;
    assert_eq!(response.status(), 503);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["code"], "owner_unreachable", "{error}");
    assert_eq!(error["error"]["details"]["node"], "c", "{error}");
}

/// Regression: every call another node forwarded ran as this node's admin and was charged to
/// that token's rate limit, so requests through one member used up another member's own admin
/// budget (its CLI's, its `troupe mcp` bridge's) and were refused with a 429 naming a token the
/// client never used; and a client could send the forwarding header itself to turn routing off.
#[tokio::test]
async fn forwarded_calls_are_not_charged_to_the_owners_admin_and_clients_cannot_pose_as_a_node() {
    let temp = tempfile::tempdir().unwrap();
    make_cluster(temp.path(), &["b", "c"]).await;
    let b = node(temp.path(), "b", &[], None).await;
    // c allows its tokens three requests at once, then one a second.
    let tight = "[cluster]\nprofile = \"fast\"\n\n[auth]\nrequests_per_second = 1\nburst = 3\n";
    let c = start_cluster_node(temp.path(), "c", tight, b.cluster, &[]).await;
    wait_members(&b, &["c"]).await;
    let (status, record) = spawn_through(&c, command("sleep 60")).await;
    assert_eq!(status, 202, "{record}");
    let id = record["id"].as_str().unwrap().to_owned();

    for round in 0..10 {
        let response = b.get(&format!("/v1/sessions/{id}")).await;
        assert_eq!(response.status(), 200, "lookup {round} through b");
        assert_eq!(response.headers()["x-troupe-node"], "c");
    }
    // c's own admin still has its budget.
    assert_eq!(c.get("/v1/links").await.status(), 200);

    // A client's forwarding header is dropped: b still asks c.
    let posed = b
        .client()
        .get(b.url(&format!("/v1/sessions/{id}")))
        .bearer_auth(&b.token)
        .header("x-troupe-forwarded", "c")
        .send()
        .await
        .unwrap();
    assert_eq!(posed.status(), 200, "answered by c, not refused by b");
    assert_eq!(posed.headers()["x-troupe-node"], "c");
    assert_eq!(c.delete(&format!("/v1/sessions/{id}")).await.status(), 202);
}

/// A member's part of a cluster listing larger than one frame (4 MiB) comes in pieces and is put
/// back together: six sessions on c whose specs hold about 900 KiB of arguments each.
#[tokio::test]
async fn a_cluster_listing_larger_than_a_frame_arrives_whole() {
    let temp = tempfile::tempdir().unwrap();
    make_cluster(temp.path(), &["b", "c"]).await;
    let b = node(temp.path(), "b", &[], None).await;
    let c = node(temp.path(), "c", &[], b.cluster).await;
    wait_members(&b, &["c"]).await;
    let bulk: Vec<String> = (0..110).map(|i| format!("{i:x>8000}")).collect();
    let mut mine = Vec::new();
    for _ in 0..6 {
        let mut args = vec![json!("-c"), json!("true")];
        args.extend(bulk.iter().map(|arg| json!(arg)));
        let body = json!({"kind": "command", "program": "sh", "args": args});
        let (status, record) = spawn_through(&c, body).await;
        assert!(
            matches!(status, 201 | 202),
            "spawn answered {status}: {}",
            record["error"]
        );
        mine.push(record["id"].as_str().unwrap().to_owned());
    }

    let response = b.get("/v1/sessions?scope=cluster&limit=100").await;
    assert_eq!(response.status(), 200);
    let body = response.bytes().await.unwrap();
    assert!(body.len() > 5 * 1024 * 1024, "{} bytes", body.len());
    let listing: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(listing["nodes"]["c"], "ok", "{}", listing["nodes"]);
    let listed: Vec<&str> = listing["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|record| record["id"].as_str())
        .collect();
    for id in &mine {
        assert!(listed.contains(&id.as_str()), "{id} listed");
    }
    assert_eq!(
        listing["complete"], true,
        "everything fit: {}",
        listing["next_cursors"]
    );

    // A page that ends before a node's listing does says so, with the cursor to go on from on
    // that node (it said `next_cursor: null` and nothing else, as if the listing were whole).
    let short: Value = b
        .get("/v1/sessions?scope=cluster&limit=2")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(short["next_cursor"], Value::Null);
    assert_eq!(short["complete"], false, "{short}");
    let cursor = short["next_cursors"]["c"]
        .as_str()
        .expect("c's listing goes on");
    assert!(
        short["next_cursors"].get("b").is_none(),
        "b has no session: {short}"
    );
    let rest: Value = c
        .get(&format!("/v1/sessions?limit=100&cursor={cursor}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        rest["sessions"].as_array().unwrap().len(),
        4,
        "the other four, on c"
    );
}

#[tokio::test]
async fn a_killed_owners_sessions_turn_unreachable_and_the_views_converge_when_it_returns() {
    let temp = tempfile::tempdir().unwrap();
    make_cluster(temp.path(), &["b", "c"]).await;
    let b = node(temp.path(), "b", &[], None).await;
    let mut c = node(temp.path(), "c", &[("zone", "z2")], b.cluster).await;
    wait_members(&b, &["c"]).await;
    wait_relay(&c, "c", &b).await;
    let mut b_events = b
        .events(
            "kind=node.*&kind=session.unreachable&kind=session.interrupted&kind=link.connected&tail=100",
            None,
        )
        .await;

    // One run on c that ended, and two that run (c's two slots); b has heard of all three.
    let mut on_b = b.events("kind=session.*&node=c&tail=100", None).await;
    let (_, done) = spawn_through(&b, with(command("true"), "node", json!("c"))).await;
    let done = done["id"].as_str().unwrap().to_owned();
    session_event(&mut on_b, &done, "session.succeeded").await;
    let mut open = Vec::new();
    for _ in 0..2 {
        let (status, record) = spawn_through(
            &b,
            json!({"kind": "command", "program": "sleep", "args": ["60"], "node": "c",
                   "labels": {"team": "web"}}),
        )
        .await;
        assert_eq!(status, 202, "{record}");
        let id = record["id"].as_str().unwrap().to_owned();
        session_event(&mut on_b, &id, "session.started").await;
        open.push(id);
    }

    // kill -9 of the owner: b declares it down within the fast profile's bound.
    kill_and_detect(&mut c, &mut b_events).await;

    // One session.unreachable per open session, published by b, naming c; none for the ended
    // one. A link opened afterwards marks the end: everything b published for that node.down
    // came before it.
    let mut unreachable = Vec::new();
    while unreachable.len() < 2 {
        let (id, event) = b_events.next_of("session.unreachable").await;
        assert!(id.starts_with("b:"), "published by b: {event}");
        assert_eq!(event["data"]["node"], "c", "{event}");
        unreachable.push(event["session"].as_str().unwrap().to_owned());
    }
    unreachable.sort();
    let mut expected = open.clone();
    expected.sort();
    assert_eq!(unreachable, expected);
    no_more_unreachable(&b, &mut b_events, "a second session.unreachable").await;

    // b's views: a 503 naming c with the last known record; listings show that record.
    let response = b.get(&format!("/v1/sessions/{}", open[0])).await;
    assert_eq!(response.status(), 503);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["code"], "owner_unreachable", "{error}");
    assert_eq!(error["error"]["details"]["node"], "c");
    let last = &error["error"]["details"]["session"];
    assert_eq!(last["id"], open[0].as_str(), "{error}");
    assert_eq!(last["state"], "unreachable");
    assert_eq!(last["last_state"], "running");
    assert_eq!(last["kind"], "command");
    assert_eq!(
        last["labels"]["team"], "web",
        "labels from c's answer to the spawn"
    );
    assert!(last["started_at"].is_string(), "{last}");
    let listed: Value = b
        .get("/v1/sessions?scope=cluster")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(listed["nodes"]["c"], "unreachable", "{listed}");
    assert_eq!(listed["complete"], false, "c could not be asked: {listed}");
    let sessions = listed["sessions"].as_array().unwrap();
    for id in &open {
        let shown = sessions
            .iter()
            .find(|session| session["id"] == id.as_str())
            .unwrap_or_else(|| panic!("{id} is listed: {listed}"));
        assert_eq!(shown["state"], "unreachable");
        assert_eq!(shown["node"], "c");
        assert!(shown["created_at"].is_string(), "{shown}");
    }
    assert!(
        !sessions
            .iter()
            .any(|session| session["id"] == done.as_str()),
        "an ended session is not shown unreachable: {listed}"
    );
    let filtered: Value = b
        .get("/v1/sessions?scope=cluster&label=team=ops")
        .await
        .json()
        .await
        .unwrap();
    assert!(
        filtered["sessions"].as_array().unwrap().is_empty(),
        "{filtered}"
    );
    let (status, stdout, stderr) = run_cli(&b, &["session", "list", "--scope", "cluster"]).await;
    assert!(status.success(), "{stderr}");
    assert!(stderr.contains("node c: unreachable"), "{stderr}");
    assert!(
        stdout
            .lines()
            .any(|line| line.starts_with(&open[0]) && line.contains("unreachable")),
        "{stdout}"
    );
    let (status, _, stderr) = run_cli(&b, &["session", "show", &open[0]]).await;
    assert!(!status.success() && stderr.contains("node c"), "{stderr}");
    let got = mcp_tool(&b, "get_session", json!({"id": open[0]})).await;
    assert_eq!(got["isError"], true, "{got}");
    assert_eq!(
        got["structuredContent"]["error"]["code"],
        "owner_unreachable"
    );

    // c comes back with its store, which is the truth: its restart interrupted both runs, and
    // b's views (a get, a cluster listing, MCP) show c's answer again.
    let mut c = node(temp.path(), "c", &[("zone", "z2")], b.cluster).await;
    membership_event(&mut b_events, "node.joined", "c").await;
    let got = b.session(&open[0]).await;
    assert_eq!(
        (got["node"].as_str(), got["state"].as_str()),
        (Some("c"), Some("interrupted")),
        "{got}"
    );
    let listed: Value = b
        .get("/v1/sessions?scope=cluster")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(listed["nodes"]["c"], "ok", "{listed}");
    for id in &open {
        let shown = listed["sessions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|session| session["id"] == id.as_str())
            .unwrap_or_else(|| panic!("{id} is listed: {listed}"));
        assert_eq!(shown["state"], "interrupted", "{shown}");
        assert!(shown.get("last_state").is_none(), "c's own record: {shown}");
    }
    let got = mcp_tool(&b, "get_session", json!({"id": open[1]})).await;
    assert_eq!(got["structuredContent"]["state"], "interrupted", "{got}");

    // b's own knowledge converged too: when c dies again, only the run started since is
    // unreachable, not the two c reported interrupted.
    wait_relay(&c, "c", &b).await;
    let (status, record) = spawn_through(
        &b,
        json!({"kind": "command", "program": "sleep", "args": ["60"], "node": "c"}),
    )
    .await;
    assert_eq!(status, 202, "{record}");
    let fresh = record["id"].as_str().unwrap().to_owned();
    session_event(&mut on_b, &fresh, "session.started").await;
    kill_and_detect(&mut c, &mut b_events).await;
    let (_, event) = b_events.next_of("session.unreachable").await;
    assert_eq!(event["session"], fresh.as_str(), "{event}");
    no_more_unreachable(&b, &mut b_events, "only the fresh run is unreachable").await;
}

/// Regression: what a node had heard of other nodes' sessions lived in memory only, so after a
/// restart it answered 404 for a session whose owner was down (and not in its member view),
/// instead of naming the owner.
#[tokio::test]
async fn a_restarted_node_names_the_down_owner_of_a_session_it_heard_of_before() {
    let temp = tempfile::tempdir().unwrap();
    make_cluster(temp.path(), &["b", "c"]).await;
    let a = node(temp.path(), "a", &[], None).await;
    let mut b = node(temp.path(), "b", &[], a.cluster).await;
    let mut c = node(temp.path(), "c", &[], a.cluster).await;
    wait_members(&b, &["a", "c"]).await;
    wait_relay(&c, "c", &b).await;
    let mut queued_on_b = b.events("kind=session.queued&node=c", None).await;
    let (_, record) = spawn_through(&c, command("sleep 60")).await;
    let id = record["id"].as_str().unwrap().to_owned();
    session_event(&mut queued_on_b, &id, "session.queued").await;
    // b stops cleanly (its log keeps c's events); c dies while b is away.
    b.terminate();
    assert!(b.wait_exit().await.success());
    let mut on_a = a.events("kind=node.*", None).await;
    kill_and_detect(&mut c, &mut on_a).await;

    let b = node(temp.path(), "b", &[], a.cluster).await;
    // Its member view has a's metadata, though a's did not change since b left.
    wait_members(&b, &["a"]).await;
    let response = b.get(&format!("/v1/sessions/{id}")).await;
    assert_eq!(response.status(), 503, "the owner is named, not a 404");
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["code"], "owner_unreachable", "{error}");
    assert_eq!(error["error"]["details"]["node"], "c", "{error}");
    let known = &error["error"]["details"]["session"];
    assert_eq!(
        known["state"], "unreachable",
        "the last known record: {error}"
    );
    assert!(
        matches!(known["last_state"].as_str(), Some("queued" | "running")),
        "{error}"
    );
    // The cluster listing shows it too (c is not in b's member view: it was down before b
    // started), and says c is unreachable.
    let listing: Value = b
        .get("/v1/sessions?scope=cluster")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(listing["nodes"]["c"], "unreachable", "{listing}");
    let shown = listing["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|session| session["id"] == id.as_str())
        .unwrap_or_else(|| panic!("{id} is left out: {listing}"));
    assert_eq!(shown["state"], "unreachable", "{listing}");
}

/// Waits until `node`'s member view shows `name` with at least `running + queued` sessions in
/// its gossiped load (polled like [`wait_members`]: no event announces a metadata round).
async fn wait_load(node: &NodeProcess, name: &str, busy: u64) {
    tokio::time::timeout(PATIENCE, async {
        loop {
            let view: Value = node.get("/v1/cluster/members").await.json().await.unwrap();
            let members = view["members"].as_array().cloned().unwrap_or_default();
            let seen = members.iter().any(|member| {
                let load = &member["meta"]["load"];
                member["node"] == name
                    && load["running"].as_u64().unwrap_or(0) + load["queued"].as_u64().unwrap_or(0)
                        >= busy
            });
            if seen {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{name}'s load of {busy} never reached the member view"));
}

/// Regression: idempotency keys are kept by the node that runs the session, and placement
/// chose again on every request, so a retry of a placed spawn could be placed on another node,
/// which had never seen the key, and run the command a second time (202 instead of 200
/// `existing`). A retry through the same node now goes where the key is: this node when its
/// store has it, else the node it forwarded the key to.
#[tokio::test]
async fn a_retried_placed_spawn_with_an_idempotency_key_runs_once() {
    let temp = tempfile::tempdir().unwrap();
    make_cluster(temp.path(), &["b"]).await;
    let a = node(temp.path(), "a", &[], None).await;
    let b = node(temp.path(), "b", &[], a.cluster).await;
    wait_members(&a, &["b"]).await;
    wait_members(&b, &["a"]).await;
    let placed = |key: &str| {
        let mut body = with(command("sleep 60"), "placement", json!("least_loaded"));
        body["idempotency_key"] = json!(key);
        body
    };

    // Both idle: a wins the tie and runs it. The retry would now be placed on b (a is busier).
    let (status, first) = spawn_through(&a, placed("job-1")).await;
    assert_eq!((status, &first["node"]), (202, &json!("a")), "{first}");
    let (status, again) = spawn_through(&a, placed("job-1")).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["existing"], true, "{again}");
    assert_eq!((&again["id"], &again["node"]), (&first["id"], &json!("a")));

    // Now b is the less loaded: the next key goes there. Then b gets busier than a, and the
    // retry, which placement would now keep on a, goes to b and finds the key.
    let (status, second) = spawn_through(&a, placed("job-2")).await;
    assert_eq!((status, &second["node"]), (202, &json!("b")), "{second}");
    for _ in 0..2 {
        let (status, busy) = spawn_through(&a, with(command("sleep 60"), "node", json!("b"))).await;
        assert_eq!(status, 202, "{busy}");
    }
    wait_load(&a, "b", 3).await;
    let (status, again) = spawn_through(&a, placed("job-2")).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["existing"], true, "{again}");
    assert_eq!((&again["id"], &again["node"]), (&second["id"], &json!("b")));
}
