//! The cluster: certificates made by the CLI, nodes with mutual TLS on loopback.

use std::path::Path;
use std::process::Stdio;

use tokio::process::Command;

use crate::support::{NodeProcess, PATIENCE, relay_up, spawn_node, start_cluster_node, troupe_bin};

/// Runs `troupe ARGS` and returns (success, stdout, stderr).
async fn troupe(args: &[&str]) -> (bool, String, String) {
    let output = tokio::time::timeout(
        PATIENCE,
        Command::new(troupe_bin())
            .args(args)
            .stdin(Stdio::null())
            .output(),
    )
    .await
    .expect("the command ends")
    .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn path(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// `troupe cluster init` in `root/a` (node a), then `issue` for each of `others` into
/// `root/<name>/cluster`, the place their config defaults expect.
pub async fn make_cluster(root: &Path, others: &[&str]) {
    let a = root.join("a");
    let (ok, out, err) =
        troupe(&["cluster", "init", "--data-dir", path(&a), "--node-id", "a"]).await;
    assert!(ok, "init failed: {out}{err}");
    assert!(out.contains("node a"), "{out}");
    for name in others {
        let target = root.join(name).join("cluster");
        let (ok, out, err) = troupe(&[
            "cluster",
            "issue",
            name,
            "--out",
            path(&target),
            "--data-dir",
            path(&a),
            "--node-id",
            "a",
        ])
        .await;
        assert!(ok, "issue failed: {out}{err}");
        for file in ["ca.pem", "node.pem", "node.key"] {
            assert!(target.join(file).exists(), "{file} missing");
        }
        assert!(
            !target.join("ca.key").exists(),
            "the CA key stays with the CA"
        );
    }
}

#[tokio::test]
async fn nodes_start_with_certificates_made_by_the_cli() {
    let temp = tempfile::tempdir().unwrap();
    make_cluster(temp.path(), &["b"]).await;
    let a = NodeProcess::start_in(
        &temp.path().join("a"),
        &["--node-id", "a", "--cluster-listen", "127.0.0.1:0"],
    )
    .await;
    let b = NodeProcess::start_in(
        &temp.path().join("b"),
        &["--node-id", "b", "--cluster-listen", "127.0.0.1:0"],
    )
    .await;
    assert!(a.cluster.is_some() && b.cluster.is_some());
    let metrics = a.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains("troupe_cluster_refused_total{reason=\"unknown_ca\"} 0"),
        "{metrics}"
    );

    // Issuing twice into the same place is refused, naming the file.
    let (ok, _, err) = troupe(&[
        "cluster",
        "issue",
        "b",
        "--out",
        path(&temp.path().join("b/cluster")),
        "--data-dir",
        path(&temp.path().join("a")),
        "--node-id",
        "a",
    ])
    .await;
    assert!(!ok && err.contains("already exists"), "{err}");
}

#[tokio::test]
async fn a_node_without_cluster_files_or_with_another_nodes_says_what_to_do() {
    let temp = tempfile::tempdir().unwrap();
    let (mut child, logs) = spawn_node(
        &temp.path().join("lonely"),
        &["--node-id", "lonely", "--cluster-listen", "127.0.0.1:0"],
    );
    let status = tokio::time::timeout(PATIENCE, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(!status.success());
    let text = logs.wait_text("troupe cluster init").await;
    assert!(text.contains("troupe cluster init"), "{text}");

    make_cluster(temp.path(), &["b"]).await;
    let (mut child, logs) = spawn_node(
        &temp.path().join("b"),
        &["--node-id", "c", "--cluster-listen", "127.0.0.1:0"],
    );
    let status = tokio::time::timeout(PATIENCE, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(!status.success());
    let text = logs.wait_text("issued to node").await;
    assert!(
        text.contains("issued to node \\\"b\\\"") || text.contains("issued to node \"b\""),
        "{text}"
    );
}

/// Writes a config selecting the `fast` profile and returns its path.
/// Starts node `name` in `root/name` with the fast profile, joining `join` when given.
async fn cluster_node(root: &Path, name: &str, join: Option<std::net::SocketAddr>) -> NodeProcess {
    let config = "[cluster]\nprofile = \"fast\"\nlabels = { zone = \"z1\" }\n";
    start_cluster_node(root, name, config, join, &[]).await
}

/// Reads `kind` events from `stream` until one for each of `nodes` arrived.
async fn wait_membership(stream: &mut crate::support::SseStream, kind: &str, nodes: &[&str]) {
    let mut missing: Vec<&str> = nodes.to_vec();
    while !missing.is_empty() {
        let (_, event) = stream.next_of(kind).await;
        let node = event["data"]["node"].as_str().unwrap().to_owned();
        missing.retain(|name| *name != node);
    }
}

#[tokio::test]
async fn three_nodes_join_through_one_seed_and_detect_a_killed_one_and_a_leaving_one() {
    let temp = tempfile::tempdir().unwrap();
    make_cluster(temp.path(), &["b", "c"]).await;
    let a = cluster_node(temp.path(), "a", None).await;
    let mut a_events = a.events("kind=node.*&tail=100", None).await;
    let b = cluster_node(temp.path(), "b", a.cluster).await;
    let mut b_events = b.events("kind=node.*&tail=100", None).await;
    let mut c = cluster_node(temp.path(), "c", a.cluster).await;

    wait_membership(&mut a_events, "node.joined", &["b", "c"]).await;
    wait_membership(&mut b_events, "node.joined", &["a", "c"]).await;

    // The member view has every other node with its metadata (HTTP address, load, labels).
    let view: serde_json::Value = tokio::time::timeout(PATIENCE, async {
        loop {
            let view: serde_json::Value = b.get("/v1/cluster/members").await.json().await.unwrap();
            let complete = view["members"]
                .as_array()
                .unwrap()
                .iter()
                .all(|member| member["state"] == "alive" && member["meta"]["http"].is_string());
            if complete && view["members"].as_array().unwrap().len() == 2 {
                break view;
            }
            // Metadata follows membership by a gossip round and no event announces it: poll the
            // view (each poll is one cheap GET), bounded by PATIENCE.
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("every member's metadata arrives");
    let members = view["members"].as_array().unwrap();
    let a_member = members.iter().find(|m| m["node"] == "a").unwrap();
    assert_eq!(a_member["meta"]["http"], a.addr.to_string());
    assert_eq!(a_member["meta"]["labels"]["zone"], "z1");
    assert_eq!(a_member["meta"]["load"]["max_concurrent"], 8);
    assert_eq!(a_member["addr"], a.cluster.unwrap().to_string());

    // The CLI shows the same view.
    let (ok, out, err) = troupe(&[
        "cluster",
        "members",
        "--node",
        &format!("http://{}", b.addr),
        "--data-dir",
        path(&b.data_dir),
    ])
    .await;
    assert!(ok, "{err}");
    assert!(
        out.contains("alive") && out.contains(&a.addr.to_string()),
        "{out}"
    );

    // kill -9: the others declare it down.
    c.child.start_kill().unwrap();
    let _ = c.wait_exit().await;
    wait_membership(&mut a_events, "node.down", &["c"]).await;
    wait_membership(&mut b_events, "node.down", &["c"]).await;

    // A clean shutdown is a leave, not a failure.
    b.terminate();
    wait_membership(&mut a_events, "node.left", &["b"]).await;
}

#[tokio::test]
async fn a_watcher_on_one_node_sees_another_nodes_events_once_and_in_order() {
    let temp = tempfile::tempdir().unwrap();
    make_cluster(temp.path(), &["b"]).await;
    let a = cluster_node(temp.path(), "a", None).await;
    let b = cluster_node(temp.path(), "b", a.cluster).await;
    let mut b_members = b.events("kind=node.*&tail=100", None).await;
    wait_membership(&mut b_members, "node.joined", &["a"]).await;

    // Events published on a (links opening) reach a watcher on b, with a's ids, in order.
    let mut relayed = b.events("kind=link.connected&node=a", None).await;
    let mut opened = Vec::new();
    let mut ids = Vec::new();
    // The relay link may come up a moment after the membership: keep opening links on a until
    // the first one arrives on b, then open three more and expect exactly those, in order.
    let first = tokio::time::timeout(PATIENCE, async {
        loop {
            opened.push(a.events("kind=session.*", None).await);
            if let Ok(event) =
                tokio::time::timeout(std::time::Duration::from_millis(500), relayed.next()).await
            {
                return event;
            }
        }
    })
    .await
    .expect("a's events reach b");
    assert_eq!(first.1["node"], "a");
    let first_seq: u64 = first.0.rsplit_once(':').unwrap().1.parse().unwrap();
    for _ in 0..3 {
        opened.push(a.events("kind=session.*", None).await);
        let (id, event) = relayed.next().await;
        assert_eq!(event["node"], "a");
        assert_eq!(event["kind"], "link.connected");
        ids.push(id.rsplit_once(':').unwrap().1.parse::<u64>().unwrap());
    }
    assert!(
        ids[0] > first_seq && ids.windows(2).all(|pair| pair[0] < pair[1]),
        "{ids:?}"
    );
}

#[tokio::test]
async fn a_restarted_node_rejoins_with_a_higher_generation_and_its_events_resume_without_gap() {
    let temp = tempfile::tempdir().unwrap();
    make_cluster(temp.path(), &["b"]).await;
    let mut a = cluster_node(temp.path(), "a", None).await;
    let b = cluster_node(temp.path(), "b", a.cluster).await;
    let mut b_members = b.events("kind=node.*&tail=100", None).await;
    wait_membership(&mut b_members, "node.joined", &["a"]).await;
    let mut relayed = b.events("node=a", None).await;

    // Some of a's events reach b: a's first events may precede the relay link (a first contact
    // starts from the sender's present), so links are opened until one is relayed.
    let (first_id, links) = relay_up(&a, &mut relayed).await;
    let first: u64 = first_id.rsplit_once(':').unwrap().1.parse().unwrap();
    let generation = |event: &serde_json::Value| event["data"]["generation"].as_u64().unwrap();
    let before = {
        let view: serde_json::Value = b.get("/v1/cluster/members").await.json().await.unwrap();
        view["members"][0]["generation"].as_u64().unwrap()
    };

    // a stops cleanly and comes back on another port, joining through b.
    drop(links);
    a.terminate();
    let _ = a.wait_exit().await;
    wait_membership(&mut b_members, "node.left", &["a"]).await;
    let a = cluster_node(temp.path(), "a", b.cluster).await;
    let (_, joined) = loop {
        let (id, event) = b_members.next_of("node.joined").await;
        if event["data"]["node"] == "a" {
            break (id, event);
        }
    };
    assert!(
        generation(&joined) > before,
        "a higher generation: {joined}"
    );
    let _link = a.events("kind=session.*", None).await;

    // b's watcher sees a's events after the first one with no gap and no duplicate, up to a
    // link.connected published by the new process.
    let mut last = first;
    loop {
        let (id, event) = relayed.next().await;
        let seq: u64 = id.rsplit_once(':').unwrap().1.parse().unwrap();
        assert_eq!(seq, last + 1, "no gap, no duplicate: {event}");
        last = seq;
        if event["kind"] == "link.connected" {
            break;
        }
    }
}

/// Waits until `node`'s member view (the registry, updated next to the `node.*` events) has
/// every one of `nodes` alive. The view is the registry's table, which its actor writes on its
/// own task, so it can trail the event a reader saw: polled, bounded by PATIENCE.
async fn wait_alive(node: &NodeProcess, nodes: &[&str]) {
    tokio::time::timeout(PATIENCE, async {
        loop {
            let view: serde_json::Value =
                node.get("/v1/cluster/members").await.json().await.unwrap();
            let members = view["members"].as_array().cloned().unwrap_or_default();
            let alive = |name: &str| {
                members
                    .iter()
                    .any(|m| m["node"] == name && m["state"] == "alive")
            };
            if nodes.iter().all(|name| alive(name)) {
                return;
            }
            // The member view is written by the registry on its own task after membership
            // changes, and no event announces that write: poll the view (one cheap GET),
            // bounded by PATIENCE.
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the member view catches up with the membership events");
}

/// Reads events from `stream` until one concerns session `id` with kind `kind`.
async fn wait_session_event(stream: &mut crate::support::SseStream, id: &str, kind: &str) {
    loop {
        let (_, event) = stream.next_of(kind).await;
        if event["session"] == id {
            return;
        }
    }
}

#[tokio::test]
async fn sessions_spawned_through_one_node_run_on_another_and_are_reached_through_it() {
    let temp = tempfile::tempdir().unwrap();
    make_cluster(temp.path(), &["b", "c"]).await;
    let a = cluster_node(temp.path(), "a", None).await;
    let b = cluster_node(temp.path(), "b", a.cluster).await;
    let mut b_members = b.events("kind=node.*&tail=100", None).await;
    let mut c = cluster_node(temp.path(), "c", a.cluster).await;
    wait_membership(&mut b_members, "node.joined", &["a", "c"]).await;
    wait_alive(&b, &["a", "c"]).await;
    // c's first relay link to b carries new events only: it must be up before the session's
    // events are published, or b never hears of them.
    let mut relayed = b.events("kind=link.connected&node=c", None).await;
    let (_, _links) = crate::support::relay_up(&c, &mut relayed).await;

    // Spawn through b on c.
    let response = b
        .post_json(
            "/v1/sessions",
            serde_json::json!({"kind": "command", "program": "sh",
                "args": ["-c", "echo hi-from-c; sleep 60"], "node": "c"}),
        )
        .await;
    assert_eq!(response.status(), 202);
    let created: serde_json::Value = response.json().await.unwrap();
    assert_eq!(created["node"], "c", "{created}");
    let id = created["id"].as_str().unwrap().to_owned();

    // b learns the owner from c's relayed events, then reaches the session through c.
    let mut on_b = b.events(&format!("session={id}&tail=100"), None).await;
    wait_session_event(&mut on_b, &id, "session.output").await;
    let got = b.get(&format!("/v1/sessions/{id}")).await;
    assert_eq!(got.status(), 200);
    let got: serde_json::Value = got.json().await.unwrap();
    assert_eq!(got["node"], "c");
    // The event may come before c's store has committed the line it announces (appends are
    // batched): the output is followed through b until the line is there.
    let (lines, _) = b
        .follow_output(&id, |line| line["text"] == "hi-from-c")
        .await;
    assert_eq!(lines.last().unwrap()["text"], "hi-from-c");

    // A cluster-wide listing has it; a local one does not.
    let listed: serde_json::Value = b
        .get("/v1/sessions?scope=cluster")
        .await
        .json()
        .await
        .unwrap();
    assert!(
        listed["sessions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["id"] == id),
        "{listed}"
    );
    assert_eq!(listed["nodes"]["c"], "ok", "{listed}");
    let local: serde_json::Value = b.get("/v1/sessions").await.json().await.unwrap();
    assert!(
        !local["sessions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["id"] == id)
    );

    // Cancel through b.
    let cancelled = b
        .client()
        .delete(b.url(&format!("/v1/sessions/{id}")))
        .bearer_auth(&b.token)
        .send()
        .await
        .unwrap();
    assert_eq!(cancelled.status(), 202);
    wait_session_event(&mut on_b, &id, "session.cancelled").await;

    // least_loaded places somewhere in the cluster.
    let placed: serde_json::Value = a
        .post_json(
            "/v1/sessions",
            serde_json::json!({"kind": "command", "program": "sh", "args": ["-c", "true"],
                "placement": "least_loaded"}),
        )
        .await
        .json()
        .await
        .unwrap();
    assert!(
        ["a", "b", "c"].contains(&placed["node"].as_str().unwrap()),
        "{placed}"
    );

    // A session still running on c when c dies is shown unreachable in cluster listings.
    let running: serde_json::Value = b
        .post_json(
            "/v1/sessions",
            serde_json::json!({"kind": "command", "program": "sh", "args": ["-c", "sleep 20"],
                "node": "c"}),
        )
        .await
        .json()
        .await
        .unwrap();
    let running = running["id"].as_str().unwrap().to_owned();
    let mut running_on_b = b.events(&format!("session={running}&tail=100"), None).await;
    wait_session_event(&mut running_on_b, &running, "session.started").await;

    // The owner goes down: the answer says so and names it.
    c.child.start_kill().unwrap();
    let _ = c.wait_exit().await;
    wait_membership(&mut b_members, "node.down", &["c"]).await;
    let down = b.get(&format!("/v1/sessions/{id}")).await;
    assert_eq!(down.status(), 503);
    let down: serde_json::Value = down.json().await.unwrap();
    assert_eq!(down["error"]["code"], "owner_unreachable", "{down}");
    assert_eq!(down["error"]["details"]["node"], "c");

    let listed: serde_json::Value = b
        .get("/v1/sessions?scope=cluster")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(listed["nodes"]["c"], "unreachable", "{listed}");
    let shown = listed["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == running)
        .unwrap_or_else(|| panic!("{listed}"));
    assert_eq!(shown["state"], "unreachable");
    assert!(
        !listed["sessions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["id"] == id),
        "an ended session is not shown unreachable"
    );
}
