//! Sessions through the real binary: every terminal state, admission past capacity, the Aider
//! preset's rate-limit detection, bad input refused without a trace, and the CLI.

use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::support::*;

/// A node whose working directory (its default workspace root) is a fresh `ws/` directory.
struct Fixture {
    node: NodeProcess,
    temp: tempfile::TempDir,
}

impl Fixture {
    async fn start(config: &str, vars: &[(&str, &str)]) -> Self {
        let temp = tempfile::tempdir().unwrap();
        let node = Self::node_in(temp.path(), config, vars).await;
        Self { node, temp }
    }

    async fn node_in(root: &Path, config: &str, vars: &[(&str, &str)]) -> NodeProcess {
        let workspace = root.join("ws");
        std::fs::create_dir_all(&workspace).unwrap();
        let config_file = root.join("troupe.toml");
        std::fs::write(&config_file, config).unwrap();
        let env = NodeEnv {
            vars: vars
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            cwd: Some(workspace),
        };
        NodeProcess::start_with(
            &root.join("data"),
            &["--config", config_file.to_str().unwrap()],
            &env,
        )
        .await
    }

    fn workspace(&self) -> PathBuf {
        self.temp.path().join("ws")
    }
}

fn id_of(record: &Value) -> String {
    record["id"].as_str().unwrap().to_owned()
}

fn sh(script: &str) -> Value {
    json!({"kind": "command", "program": "sh", "args": ["-c", script]})
}

#[tokio::test]
async fn a_succeeding_and_a_failing_command_end_with_their_exit_codes_and_output() {
    let fixture = Fixture::start("", &[]).await;
    let node = &fixture.node;

    let ok = node
        .spawn_session(sh(
            "echo hello; echo to-stderr >&2; pwd; printf 'bad \\377\\376 bytes\\n'; head -c 40000 /dev/zero | tr '\\0' x; echo",
        ))
        .await;
    assert_eq!(ok["kind"], "command");
    let (lines, state) = node.run_to_end(&id_of(&ok)).await;
    assert_eq!(state, "succeeded");
    // stdout in order; stderr read separately (see docs/API.md on interleaving).
    let stdout: Vec<&str> = lines
        .iter()
        .filter(|line| line.as_str() != "to-stderr")
        .map(|line| line.as_str())
        .collect();
    assert_eq!(stdout.len(), 4, "{} lines", lines.len());
    assert!(lines.contains(&"to-stderr".to_owned()));
    assert_eq!(stdout[0], "hello");
    let workspace = fixture.workspace().canonicalize().unwrap();
    assert_eq!(
        stdout[1],
        workspace.display().to_string(),
        "runs in the workspace root by default"
    );
    assert_eq!(
        stdout[2], "bad \u{fffd}\u{fffd} bytes",
        "invalid UTF-8 is replaced, never a crash"
    );
    let kept = 16 * 1024;
    assert_eq!(
        stdout[3],
        format!("{} …[cut {} bytes]", "x".repeat(kept), 40_000 - kept),
        "an overlong line is capped at sessions' 16 KiB and says how much was cut"
    );
    let record = node.session(&id_of(&ok)).await;
    assert_eq!(record["state"], "succeeded");
    assert_eq!(record["exit_code"], 0);
    assert!(record["started_at"].is_string() && record["ended_at"].is_string());

    // Paged output, with stdout and stderr told apart.
    let page: Value = node
        .get(&format!("/v1/sessions/{}/output?limit=2", id_of(&ok)))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(page["lines"].as_array().unwrap().len(), 2);
    assert_eq!(page["total"], 5);
    assert_eq!(page["next_offset"], 2);
    let streams: Vec<&str> = page["lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|line| line["stream"].as_str().unwrap())
        .collect();
    assert!(streams.contains(&"stdout") || streams.contains(&"stderr"));

    let failing = node.spawn_session(sh("echo about-to-fail; exit 3")).await;
    let (lines, state) = node.run_to_end(&id_of(&failing)).await;
    assert_eq!(state, "failed");
    assert_eq!(lines, ["about-to-fail"]);
    let record = node.session(&id_of(&failing)).await;
    assert_eq!(record["exit_code"], 3);

    // Filters and the listing.
    let failed: Value = node
        .get("/v1/sessions?state=failed")
        .await
        .json()
        .await
        .unwrap();
    let ids: Vec<&str> = failed["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [id_of(&failing)]);
}

#[tokio::test]
async fn a_cancelled_session_leaves_no_process_of_its_group_behind_grandchildren_included() {
    let fixture = Fixture::start("[sessions]\nkill_grace_secs = 2\n", &[]).await;
    let node = &fixture.node;
    let record = node
        .spawn_session(sh(
            "sleep 300 & echo child $!; (sleep 300 & echo grandchild $!; wait) & echo ready; wait",
        ))
        .await;
    let id = id_of(&record);
    let (lines, state) = node
        .follow_output(&id, |line| {
            line["text"].as_str().unwrap().starts_with("grandchild")
        })
        .await;
    assert_eq!(state, None, "still running: {lines:?}");
    let mut pids: Vec<i32> = lines
        .iter()
        .filter_map(|line| line["text"].as_str().unwrap().split_once(' '))
        .filter_map(|(_, pid)| pid.parse().ok())
        .collect();
    let running = node.session(&id).await;
    assert_eq!(running["state"], "running");
    let leader = running["pid"].as_i64().unwrap() as i32;
    pids.push(leader);
    assert_eq!(pids.len(), 3, "{lines:?}");
    assert!(pids.iter().all(|pid| is_alive(*pid)));

    let response = node.delete(&format!("/v1/sessions/{id}")).await;
    assert_eq!(response.status(), 202);
    let (_, state) = node.run_to_end(&id).await;
    assert_eq!(state, "cancelled");
    wait_all_dead(leader, &pids).await;

    // Cancelling again is harmless and changes nothing.
    let again = node.delete(&format!("/v1/sessions/{id}")).await;
    assert_eq!(again.status(), 202);
    let again: Value = again.json().await.unwrap();
    assert_eq!(again["state"], "cancelled");
}

#[tokio::test]
async fn a_session_past_its_timeout_is_terminated_as_timed_out() {
    let fixture = Fixture::start("[sessions]\nkill_grace_secs = 1\n", &[]).await;
    let node = &fixture.node;
    let record = node
        .spawn_session(json!({
            "kind": "command", "program": "sh",
            "args": ["-c", "echo waiting; sleep 300 & wait"],
            "timeout_secs": 1,
        }))
        .await;
    assert_eq!(record["timeout_secs"], 1);
    let id = id_of(&record);
    let (lines, state) = node.run_to_end(&id).await;
    assert_eq!(state, "timed_out");
    assert_eq!(lines, ["waiting"]);
    let record = node.session(&id).await;
    wait_all_dead(record["pid"].as_i64().unwrap() as i32, &[]).await;
}

#[tokio::test]
async fn after_kill_9_of_the_node_a_running_session_is_interrupted_with_its_output_and_its_processes_are_killed()
 {
    let temp = tempfile::tempdir().unwrap();
    let mut node = Fixture::node_in(temp.path(), "", &[]).await;
    let record = node
        .spawn_session(sh("echo before-the-crash; sleep 300 & echo child $!; wait"))
        .await;
    let id = id_of(&record);
    let (lines, _) = node
        .follow_output(&id, |line| {
            line["text"].as_str().unwrap().starts_with("child")
        })
        .await;
    let child: i32 = lines[1]["text"]
        .as_str()
        .unwrap()
        .strip_prefix("child ")
        .unwrap()
        .parse()
        .unwrap();
    let leader = node.session(&id).await["pid"].as_i64().unwrap() as i32;

    node.child.start_kill().unwrap();
    node.child.wait().await.unwrap();
    assert!(
        is_alive(leader) && is_alive(child),
        "the session's processes outlive a kill -9 of the node (their own process group)"
    );

    let node = Fixture::node_in(temp.path(), "", &[]).await;
    let mut events = node.events("kind=session.interrupted&tail=10", None).await;
    let (_, event) = events.next_of("session.interrupted").await;
    assert_eq!(event["session"], id.as_str());
    let record = node.session(&id).await;
    assert_eq!(record["state"], "interrupted");
    wait_all_dead(leader, &[leader, child]).await;
    let (lines, state) = node.run_to_end(&id).await;
    assert_eq!(state, "interrupted");
    assert_eq!(lines[0], "before-the-crash", "the output so far is kept");
}

#[tokio::test]
async fn past_capacity_the_api_answers_429_and_a_higher_priority_session_overtakes() {
    let fixture = Fixture::start("[sessions]\nmax_concurrent = 1\nqueue_capacity = 2\n", &[]).await;
    let node = &fixture.node;
    let mut events = node.events("kind=session.started", None).await;
    let mut degraded = node.events("kind=health.degraded", None).await;
    let blocker = node.spawn_session(sh("echo blocking; sleep 300")).await;
    let (_, started) = events.next_of("session.started").await;
    assert_eq!(started["session"], id_of(&blocker).as_str());

    let low = node
        .spawn_session(json!({"kind": "command", "program": "true", "priority": 1}))
        .await;
    assert_eq!(low["state"], "queued");
    assert_eq!(low["queue_position"], 1);
    let high = node
        .spawn_session(json!({"kind": "command", "program": "true", "priority": 8}))
        .await;
    assert_eq!(high["queue_position"], 1, "priority before age");
    assert_eq!(node.session(&id_of(&low)).await["queue_position"], 2);
    // The listing shows the same positions (and none for the running one).
    let listed: Value = node.get("/v1/sessions").await.json().await.unwrap();
    let position_of = |id: &str| {
        listed["sessions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|record| record["id"] == id)
            .unwrap_or_else(|| panic!("{id} is listed: {listed}"))["queue_position"]
            .clone()
    };
    assert_eq!(position_of(&id_of(&high)), 1, "{listed}");
    assert_eq!(position_of(&id_of(&low)), 2, "{listed}");
    assert_eq!(position_of(&id_of(&blocker)), Value::Null, "{listed}");

    let refused = node
        .post_json(
            "/v1/sessions",
            json!({"kind": "command", "program": "true", "labels": {"refused": "yes"}}),
        )
        .await;
    assert_eq!(refused.status(), 429);
    // The SessionManager reports to health every second; the report of the full queue turns
    // the node degraded (one `health.degraded`), and health then shows that report.
    let expected = format!(
        "1/1 running, 2/2 queued; longest running: {}",
        id_of(&blocker)
    );
    degraded.next_of("health.degraded").await;
    let health: Value = node.get("/v1/health").await.json().await.unwrap();
    let detail = health["components"]["sessions"].to_string();
    assert!(
        detail.contains(&expected) && detail.contains("the queue is full"),
        "{health}"
    );
    // The same figures as fields.
    let sessions = &health["components"]["sessions"];
    assert_eq!(sessions["status"], "degraded", "{sessions}");
    assert_eq!(sessions["running"], 1, "{sessions}");
    assert_eq!(sessions["queued"], 2, "{sessions}");
    assert_eq!(sessions["max_concurrent"], 1, "{sessions}");
    assert_eq!(sessions["queue_capacity"], 2, "{sessions}");
    assert_eq!(
        sessions["longest_running"]["id"],
        id_of(&blocker).as_str(),
        "{sessions}"
    );
    assert!(
        sessions["longest_running"]["since"].is_string(),
        "{sessions}"
    );
    assert!(
        sessions["longest_running"]["elapsed_secs"].is_u64(),
        "{sessions}"
    );
    let retry_after: u64 = refused.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry_after >= 1);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "queue_full");
    assert_eq!(body["error"]["details"]["queue_capacity"], 2);
    let metrics = node.get("/metrics").await.text().await.unwrap();
    for line in [
        "troupe_sessions{state=\"running\"} 1",
        "troupe_sessions{state=\"queued\"} 2",
        "troupe_sessions_refused_total 1",
        "troupe_session_queue_depth 2",
    ] {
        assert!(metrics.contains(line), "{line} missing from /metrics");
    }
    let listed: Value = node
        .get("/v1/sessions?label=refused=yes")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        listed["sessions"],
        json!([]),
        "nothing stored for a refusal"
    );

    assert_eq!(
        node.delete(&format!("/v1/sessions/{}", id_of(&blocker)))
            .await
            .status(),
        202
    );
    let (_, first) = events.next_of("session.started").await;
    let (_, second) = events.next_of("session.started").await;
    assert_eq!(first["session"], id_of(&high).as_str());
    assert_eq!(second["session"], id_of(&low).as_str());
    assert_eq!(node.run_to_end(&id_of(&low)).await.1, "succeeded");
    assert_eq!(node.run_to_end(&id_of(&high)).await.1, "succeeded");
}

#[tokio::test]
async fn the_same_idempotency_key_returns_the_existing_session() {
    let fixture = Fixture::start("", &[]).await;
    let node = &fixture.node;
    let body = json!({"kind": "command", "program": "true", "idempotency_key": "build-42"});
    let first = node.spawn_session(body.clone()).await;
    let again = node.post_json("/v1/sessions", body).await;
    assert_eq!(again.status(), 200);
    assert_eq!(
        again.headers()["location"],
        format!("/v1/sessions/{}", id_of(&first)).as_str()
    );
    let again: Value = again.json().await.unwrap();
    assert_eq!(again["id"], first["id"]);
    assert_eq!(again["existing"], true);
    let all: Value = node.get("/v1/sessions").await.json().await.unwrap();
    assert_eq!(all["sessions"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn a_fake_aider_that_is_rate_limited_and_exits_0_fails_with_rate_limit_events() {
    let temp = tempfile::tempdir().unwrap();
    let bin = temp.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fake-aider.sh");
    std::os::unix::fs::symlink(&script, bin.join("aider")).unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let node = Fixture::node_in(
        temp.path(),
        "",
        &[
            ("PATH", path.as_str()),
            ("FAKE_AIDER_SCENARIO", "rate-limited"),
        ],
    )
    .await;
    let mut events = node.events("kind=session.*", None).await;
    let record = node
        .spawn_session(json!({"kind": "aider", "message": "add a greet function"}))
        .await;
    assert_eq!(record["kind"], "aider");
    let id = id_of(&record);

    let mut rate_limited = Vec::new();
    let ended = loop {
        let (_, event) = events.next().await;
        if event["session"] != id.as_str() {
            continue;
        }
        match event["kind"].as_str().unwrap() {
            "session.rate_limited" => rate_limited.push(event["data"].clone()),
            "session.succeeded" | "session.failed" => break event,
            _ => {}
        }
    };
    assert_eq!(ended["kind"], "session.failed", "{ended}");
    let retries: Vec<u64> = rate_limited
        .iter()
        .filter_map(|data| data["retry_in_ms"].as_u64())
        .collect();
    assert_eq!(
        retries,
        [200, 500, 1000],
        "one session.rate_limited per `Retrying in N seconds...`: {rate_limited:?}"
    );
    assert!(rate_limited.iter().all(|data| data["provider"] == "openai"));

    let record = node.session(&id).await;
    assert_eq!(record["state"], "failed");
    assert_eq!(record["exit_code"], 0, "Aider exited 0 and still failed");
    let (lines, _) = node.run_to_end(&id).await;
    let argv = lines
        .iter()
        .find(|line| line.starts_with("fake-aider: argv:"))
        .unwrap();
    for flag in [
        "--message=add a greet function",
        "--yes-always",
        "--no-check-update",
        "--no-pretty",
        "--no-git",
    ] {
        assert!(argv.contains(flag), "{flag} missing from {argv}");
    }

    // The same through the CLI: the output streams and the failure is the exit code.
    let (status, stdout, stderr) = run_cli(&node, &["session", "aider", "--message", "hi"]).await;
    assert_eq!(status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("The API provider has rate limited you"),
        "{stdout}"
    );
}

#[tokio::test]
async fn a_session_actor_that_panics_is_restarted_and_its_run_is_reported_once() {
    let temp = tempfile::tempdir().unwrap();
    let node = Fixture::node_in(temp.path(), "[debug]\nfault_injection = true\n", &[]).await;
    let mut events = node.events("kind=session.*&kind=actor.*", None).await;
    let record = node
        .spawn_session(sh(
            "echo waiting; while [ ! -e go ]; do sleep 0.02; done; echo went",
        ))
        .await;
    let id = id_of(&record);
    node.follow_output(&id, |line| line["text"] == "waiting")
        .await;

    let fault = node
        .post_json(
            "/v1/admin/faults",
            json!({"actor": format!("sessions/{id}"), "kind": "panic"}),
        )
        .await;
    assert_eq!(fault.status(), 202);
    let (_, restarted) = events.next_of("actor.restarted").await;
    assert_eq!(
        restarted["data"]["child"],
        format!("sessions/{id}").as_str()
    );
    // Counted before it was announced: the actor's restarts, the node's total, and the
    // actor's discarded self-sends (a family of its own, whatever the count).
    let metrics = node.get("/metrics").await.text().await.unwrap();
    for line in [
        format!("troupe_actor_restarts_total{{actor=\"sessions/{id}\"}} 1"),
        "troupe_restarts_total 1".to_owned(),
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "{line} missing:\n{metrics}"
        );
    }
    let discarded = format!("troupe_actor_discarded_total{{actor=\"sessions/{id}\"}} ");
    assert!(
        metrics.lines().any(|l| l.starts_with(&discarded)),
        "{discarded} missing:\n{metrics}"
    );

    // The restarted actor re-attached to the same process, which now finishes.
    assert_eq!(node.session(&id).await["state"], "running");
    std::fs::write(temp.path().join("ws/go"), "").unwrap();
    let (lines, state) = node.run_to_end(&id).await;
    assert_eq!(state, "succeeded");
    assert_eq!(lines, ["waiting", "went"]);
    // The node-wide total keeps the restart once the session (and its actor) is gone.
    let metrics = node.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.lines().any(|l| l == "troupe_restarts_total 1"),
        "{metrics}"
    );

    // Exactly one end, then nothing more about this session.
    let mut ends = 0;
    loop {
        let (_, event) = events.next().await;
        if event["session"] == id.as_str() && event["kind"] == "session.succeeded" {
            ends += 1;
            break;
        }
    }
    drop(events);
    let mut replay = node
        .events(&format!("session={id}&follow=false&tail=1000"), None)
        .await;
    let mut kinds = Vec::new();
    while let Ok(Some(Ok((_, data)))) = tokio::time::timeout(PATIENCE, replay.next_raw()).await {
        kinds.push(serde_json::from_str::<Value>(&data).unwrap()["kind"].clone());
    }
    let terminal_kinds = [
        "session.succeeded",
        "session.failed",
        "session.cancelled",
        "session.timed_out",
        "session.interrupted",
    ];
    let terminal = kinds
        .iter()
        .filter(|kind| terminal_kinds.iter().any(|terminal| *kind == terminal))
        .count();
    assert_eq!((ends, terminal), (1, 1), "reported once: {kinds:?}");
    assert_eq!(
        kinds
            .iter()
            .filter(|kind| *kind == "session.started")
            .count(),
        1,
        "started once: {kinds:?}"
    );
}

#[tokio::test]
async fn bad_input_is_refused_with_a_clear_4xx_and_leaves_no_trace() {
    let temp = tempfile::tempdir().unwrap();
    let outside = temp.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    let workspace = temp.path().join("ws");
    std::fs::create_dir_all(workspace.join("project")).unwrap();
    std::os::unix::fs::symlink(&outside, workspace.join("escape")).unwrap();
    let config = format!(
        "[sessions]\nworkspace_roots = [{:?}]\nallowed_programs = [\"sh\", \"true\"]\n\
         [http]\nmax_body_bytes = 65536\n",
        workspace.display().to_string()
    );
    let node = Fixture::node_in(temp.path(), &config, &[]).await;
    let mut events = node.events("kind=session.*", None).await;

    let huge = "x".repeat(10_000);
    let cases: Vec<(Value, u16, &str)> = vec![
        (
            json!({"kind": "command", "program": "true", "workdir": "../outside"}),
            400,
            "invalid_workdir",
        ),
        (
            json!({"kind": "command", "program": "true", "workdir": outside.display().to_string()}),
            400,
            "invalid_workdir",
        ),
        (
            json!({"kind": "command", "program": "true", "workdir": "escape"}),
            400,
            "invalid_workdir",
        ),
        (
            json!({"kind": "command", "program": "true", "workdir": "missing"}),
            400,
            "invalid_workdir",
        ),
        (
            json!({"kind": "command", "program": "true", "args": [huge]}),
            400,
            "invalid_session",
        ),
        (
            json!({"kind": "command", "program": "true", "env": {"A": "1", "B=C": "2"}}),
            400,
            "invalid_session",
        ),
        (
            json!({"kind": "command", "program": "true", "priority": 10}),
            400,
            "invalid_session",
        ),
        // The environment cannot load code the allow-list never admitted.
        (
            json!({"kind": "command", "program": "true", "env": {"LD_PRELOAD": "/tmp/evil.so"}}),
            400,
            "invalid_session",
        ),
        (
            json!({"kind": "command", "program": "true", "env": {"LD_LIBRARY_PATH": "/tmp/evil"}}),
            400,
            "invalid_session",
        ),
        (
            json!({"kind": "command", "program": "true", "env": {"GCONV_PATH": "/tmp/evil"}}),
            400,
            "invalid_session",
        ),
        (
            json!({"kind": "command", "program": "true", "env": {"TROUPE_SESSION_ID": "s-other"}}),
            400,
            "invalid_session",
        ),
        (
            json!({"kind": "telepathy", "program": "true"}),
            400,
            "unknown_kind",
        ),
        (
            json!({"kind": "command", "program": "curl", "args": ["http://example.com"]}),
            400,
            "program_not_allowed",
        ),
        (
            json!({"kind": "command", "program": "/usr/bin/env", "args": ["sh"]}),
            400,
            "program_not_allowed",
        ),
        (
            json!({"kind": "command", "program": "true", "surprise": 1}),
            400,
            "",
        ),
    ];
    for (body, status, code) in cases {
        let response = node.post_json("/v1/sessions", body.clone()).await;
        assert_eq!(response.status().as_u16(), status, "{body}");
        let envelope: Value = response.json().await.unwrap();
        let message = envelope["error"]["message"].as_str().unwrap();
        assert!(!message.is_empty(), "{body}: {envelope}");
        if !code.is_empty() {
            assert_eq!(envelope["error"]["code"], code, "{body}: {envelope}");
        }
    }

    // A body over http.max_body_bytes is 413 with the envelope.
    let oversize = node
        .post_json(
            "/v1/sessions",
            json!({"kind": "command", "program": "true", "args": vec!["y".repeat(4096); 20]}),
        )
        .await;
    assert_eq!(oversize.status(), 413);
    let envelope: Value = oversize.json().await.unwrap();
    assert!(envelope["error"]["message"].is_string());

    // Inside the workspace, through the allow-list: accepted, and the only session there is.
    let ok = node
        .spawn_session(json!({"kind": "command", "program": "sh", "args": ["-c", "pwd"], "workdir": "project"}))
        .await;
    let (lines, state) = node.run_to_end(&id_of(&ok)).await;
    assert_eq!(state, "succeeded");
    assert_eq!(
        lines,
        [workspace
            .join("project")
            .canonicalize()
            .unwrap()
            .display()
            .to_string()]
    );
    let all: Value = node.get("/v1/sessions").await.json().await.unwrap();
    assert_eq!(all["sessions"].as_array().unwrap().len(), 1, "{all}");
    let (_, first) = events.next().await;
    assert_eq!(
        first["session"],
        id_of(&ok).as_str(),
        "no event for a refused session"
    );

    // A session's own PATH cannot swap an allowed program for another one: the node's `sh`
    // runs, and the session's PATH reaches only what it runs itself.
    let impostors = temp.path().join("impostors");
    std::fs::create_dir_all(&impostors).unwrap();
    let pwned = temp.path().join("pwned");
    let fake = impostors.join("sh");
    std::fs::write(
        &fake,
        format!("#!/bin/sh\necho hijacked\ntouch {}\n", pwned.display()),
    )
    .unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let path = format!("{}:/usr/bin:/bin", impostors.display());
    let own_path = node
        .spawn_session(json!({
            "kind": "command", "program": "sh", "args": ["-c", "echo \"real sh, PATH=$PATH\""],
            "env": {"PATH": path},
        }))
        .await;
    let (lines, state) = node.run_to_end(&id_of(&own_path)).await;
    assert_eq!(state, "succeeded");
    assert_eq!(lines, [format!("real sh, PATH={path}")]);
    assert!(!pwned.exists(), "the impostor never ran");
}

/// Regression: a session path that is not UTF-8 once decoded got axum's plain-text 400, not
/// the envelope every other unknown id gets; a label filter given twice kept the last value.
#[tokio::test]
async fn a_session_path_that_cannot_be_read_or_a_label_given_twice_is_refused_with_the_envelope() {
    let temp = tempfile::tempdir().unwrap();
    let node = Fixture::node_in(temp.path(), "", &[]).await;
    let client = node.client();
    for (method, path) in [
        (reqwest::Method::GET, "/v1/sessions/%FF"),
        (reqwest::Method::GET, "/v1/sessions/%FF/output"),
        (reqwest::Method::DELETE, "/v1/sessions/%FF"),
        (reqwest::Method::GET, "/v1/sessions/not%20an%20id"),
    ] {
        let response = client
            .request(method.clone(), format!("http://{}{path}", node.addr))
            .bearer_auth(&node.token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 404, "{method} {path}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(
            body["error"]["code"], "unknown_session",
            "{method} {path}: {body}"
        );
    }
    // One label asked for twice (a session has one value per label) is refused, not narrowed to
    // the last value given.
    let response = node.get("/v1/sessions?label=team=a&label=team=b").await;
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_filter", "{body}");
}

#[tokio::test]
async fn the_cli_spawns_follows_lists_shows_and_cancels_sessions() {
    let fixture = Fixture::start("", &[]).await;
    let node = &fixture.node;

    // Followed: the output streams to stdout and the exit code is the run's.
    let (status, stdout, stderr) = run_cli(
        node,
        &[
            "session",
            "spawn",
            "--label",
            "team=cli",
            "--",
            "sh",
            "-c",
            "echo from-cli; exit 7",
        ],
    )
    .await;
    assert_eq!(status.code(), Some(7), "{stderr}");
    assert!(stdout.contains("from-cli"), "{stdout}");

    // Detached: prints the id and returns at once.
    let (status, stdout, stderr) = run_cli(
        node,
        &["session", "spawn", "--detach", "--", "sleep", "300"],
    )
    .await;
    assert_eq!(status.code(), Some(0), "{stderr}");
    let id = stdout.trim().to_owned();
    assert!(id.len() > 4 && !id.contains(' '), "an id: {stdout:?}");
    assert_eq!(node.session(&id).await["kind"], "command");

    let (status, stdout, _) = run_cli(node, &["session", "list", "--json"]).await;
    assert_eq!(status.code(), Some(0));
    let page: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(page["sessions"].as_array().unwrap().len(), 2, "{stdout}");
    // A page that does not end the listing says so on stderr, with the cursor that goes on
    // (stdout stays the listing); --cursor goes on from there.
    let (status, stdout, stderr) = run_cli(node, &["session", "list", "--limit", "1"]).await;
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    assert!(stdout.starts_with(&id), "newest first: {stdout}");
    let cursor = stderr
        .split_whitespace()
        .skip_while(|word| *word != "--cursor")
        .nth(1)
        .unwrap_or_else(|| panic!("a cursor on stderr: {stderr}"));
    let (status, stdout, stderr) = run_cli(
        node,
        &["session", "list", "--limit", "1", "--cursor", cursor],
    )
    .await;
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    assert!(!stdout.contains(&id), "the next page: {stdout}");
    let (status, stdout, stderr) =
        run_cli(node, &["session", "list", "--limit", "1", "--json"]).await;
    assert_eq!(status.code(), Some(0), "{stderr}");
    let page: Value = serde_json::from_str(&stdout).expect("stdout is the JSON page");
    assert_eq!(page["next_cursor"], cursor);
    // A limit the node would not take is refused, not changed.
    let (status, _, stderr) = run_cli(node, &["session", "list", "--limit", "5000"]).await;
    assert_eq!(status.code(), Some(2), "{stderr}");
    let (status, stdout, _) = run_cli(node, &["session", "show", &id]).await;
    assert_eq!(status.code(), Some(0));
    assert!(stdout.contains(&id), "{stdout}");

    let (status, _, stderr) = run_cli(node, &["session", "cancel", &id]).await;
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert_eq!(node.run_to_end(&id).await.1, "cancelled");

    let listed: Value = node
        .get("/v1/sessions?label=team=cli")
        .await
        .json()
        .await
        .unwrap();
    let first = id_of(&listed["sessions"][0]);
    let (status, stdout, _) = run_cli(node, &["session", "logs", &first]).await;
    assert_eq!(status.code(), Some(0));
    assert_eq!(stdout.trim(), "from-cli");

    let (status, _, stderr) = run_cli(node, &["session", "show", "no-such-session"]).await;
    assert_ne!(status.code(), Some(0));
    assert!(stderr.contains("no session"), "{stderr}");
}

/// A `troupe` CLI command running against a node, its output read line by line as it comes.
struct LiveCli {
    child: tokio::process::Child,
    stdout: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
    stderr: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStderr>>,
    /// Every stderr line read so far.
    stderr_seen: Vec<String>,
}

impl LiveCli {
    fn spawn(node: &NodeProcess, args: &[&str]) -> Self {
        use std::process::Stdio;
        use tokio::io::{AsyncBufReadExt, BufReader};
        let mut child = tokio::process::Command::new(troupe_bin())
            .args(args)
            .env("TROUPE_URL", format!("http://{}", node.addr))
            .env("TROUPE_DATA_DIR", &node.data_dir)
            .env_remove("TROUPE_TOKEN")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        Self {
            stdout: BufReader::new(child.stdout.take().unwrap()).lines(),
            stderr: BufReader::new(child.stderr.take().unwrap()).lines(),
            child,
            stderr_seen: Vec::new(),
        }
    }

    async fn stdout_line(&mut self) -> String {
        tokio::time::timeout(PATIENCE, self.stdout.next_line())
            .await
            .expect("a line on stdout within the patience")
            .unwrap()
            .expect("the command is still printing")
    }

    /// The next stderr line that contains `text` (the lines before it are kept too).
    async fn stderr_line_with(&mut self, text: &str) -> String {
        loop {
            let line = tokio::time::timeout(PATIENCE, self.stderr.next_line())
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "no {text:?} on stderr within the patience: {:?}",
                        self.stderr_seen
                    )
                })
                .unwrap()
                .unwrap_or_else(|| panic!("stderr closed before {text:?}: {:?}", self.stderr_seen));
            self.stderr_seen.push(line.clone());
            if line.contains(text) {
                return line;
            }
        }
    }

    /// Waits for the command to end; returns its status, what is left on stdout, and every
    /// stderr line.
    async fn finish(mut self) -> (std::process::ExitStatus, String, Vec<String>) {
        let status = tokio::time::timeout(PATIENCE, self.child.wait())
            .await
            .expect("the command ends within the patience")
            .unwrap();
        let mut rest = String::new();
        while let Some(line) = self.stdout.next_line().await.unwrap() {
            rest.push_str(&line);
            rest.push('\n');
        }
        while let Some(line) = self.stderr.next_line().await.unwrap() {
            self.stderr_seen.push(line);
        }
        (status, rest, self.stderr_seen)
    }
}

/// A shell script that prints `first-line`, waits until the file `gate` exists, prints
/// `last-line` and exits with `code`.
fn gated(gate: &Path, code: u8) -> Value {
    sh(&format!(
        "echo first-line; while [ ! -e {} ]; do sleep 0.02; done; echo last-line; exit {code}",
        gate.display()
    ))
}

#[tokio::test]
async fn the_cli_shows_a_queued_session_move_to_running_and_exits_with_the_run_code() {
    let fixture = Fixture::start("[sessions]\nmax_concurrent = 1\n", &[]).await;
    let node = &fixture.node;
    let mut started = node.events("kind=session.started", None).await;
    let blocker = node.spawn_session(sh("sleep 300")).await;
    started.next_of("session.started").await;

    let gate = fixture.workspace().join("gate");
    let script = gated(&gate, 3);
    let mut cli = LiveCli::spawn(
        node,
        &[
            "session",
            "spawn",
            "--",
            "sh",
            "-c",
            script["args"][1].as_str().unwrap(),
        ],
    );
    // No terminal here: the state comes as plain lines on stderr.
    let queued = cli.stderr_line_with(" queued").await;
    assert!(queued.ends_with("queued (position 1)"), "{queued}");
    let id = queued
        .strip_prefix("troupe: session ")
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("a session id in {queued:?}"))
        .to_owned();
    assert_eq!(node.session(&id).await["state"], "queued");

    // The slot frees: the CLI follows the session out of the queue without being asked again.
    assert_eq!(
        node.delete(&format!("/v1/sessions/{}", id_of(&blocker)))
            .await
            .status(),
        202
    );
    let running = cli.stderr_line_with(" running").await;
    assert_eq!(running, format!("troupe: session {id} running"));
    // Output streams while the run goes on (it waits for the gate).
    assert_eq!(cli.stdout_line().await, "first-line");
    std::fs::write(&gate, "").unwrap();
    assert_eq!(cli.stdout_line().await, "last-line");

    let (status, rest, stderr) = cli.finish().await;
    assert_eq!(status.code(), Some(3), "{stderr:?}");
    assert_eq!(rest, "", "only the run's output on stdout");
    let states: Vec<&str> = stderr
        .iter()
        .filter_map(|line| line.strip_prefix(&format!("troupe: session {id} ")))
        .collect();
    let at = |state: &str| {
        states
            .iter()
            .position(|shown| shown.starts_with(state))
            .unwrap_or_else(|| panic!("{state} is shown: {states:?}"))
    };
    assert!(at("queued") < at("running"), "{states:?}");
    assert!(at("running") < at("failed"), "{states:?}");
    assert!(
        states
            .iter()
            .all(|state| ["queued", "starting", "running", "failed"]
                .iter()
                .any(|known| state.starts_with(known))),
        "{states:?}"
    );
    assert_eq!(
        *states.last().unwrap(),
        "failed: exit code 3",
        "the end comes last: {states:?}"
    );
}

#[tokio::test]
async fn the_cli_follows_logs_while_the_run_goes_on_and_exits_with_the_run_code() {
    let fixture = Fixture::start("", &[]).await;
    let node = &fixture.node;
    let gate = fixture.workspace().join("gate");
    let id = id_of(&node.spawn_session(gated(&gate, 4)).await);

    let mut cli = LiveCli::spawn(node, &["session", "logs", &id, "--follow"]);
    assert_eq!(cli.stdout_line().await, "first-line");
    // The run waits for the gate, so the command cannot have ended.
    assert!(cli.child.try_wait().unwrap().is_none(), "it follows");
    assert_eq!(node.session(&id).await["state"], "running");
    std::fs::write(&gate, "").unwrap();
    assert_eq!(cli.stdout_line().await, "last-line");
    let (status, rest, stderr) = cli.finish().await;
    assert_eq!(status.code(), Some(4), "{stderr:?}");
    assert_eq!(rest, "", "nothing after the run's last line");

    // Following a session that has already ended prints its log and ends at once, with the
    // same status.
    let (status, stdout, stderr) = run_cli(node, &["session", "logs", &id, "--follow"]).await;
    assert_eq!(status.code(), Some(4), "{stderr}");
    assert_eq!(stdout, "first-line\nlast-line\n");
}

#[tokio::test]
async fn an_embedded_node_spawns_reads_lists_and_cancels_sessions_through_its_handle() {
    use troupe::actors::event::{Delivery, EventFilter};
    use troupe::actors::session::SessionState;
    use troupe::session::request::SessionRequest;
    use troupe::store::SessionQuery;

    troupe::tls::install_default_provider();
    let temp = tempfile::tempdir().unwrap();
    let workspace = temp.path().join("ws");
    std::fs::create_dir_all(&workspace).unwrap();
    let mut config = troupe::config::Config::default();
    config.sessions.workspace_roots = vec![workspace];
    let node = troupe::Node::builder()
        .config(config)
        .data_dir(temp.path().join("data"))
        .without_http()
        .start()
        .await
        .unwrap();
    let request = |value: Value| serde_json::from_value::<SessionRequest>(value).unwrap();

    let ended = EventFilter {
        kinds: vec!["session.succeeded".parse().unwrap()],
        ..EventFilter::default()
    };
    let mut events = node.subscribe(ended);
    let view = node
        .spawn_request(request(sh("echo embedded; echo twice")))
        .await
        .unwrap();
    let id = view.record.id.clone();
    let event = tokio::time::timeout(PATIENCE, events.recv())
        .await
        .expect("the session ends")
        .expect("the subscription is open");
    let Delivery::Event(event) = event else {
        panic!("lagged: {event:?}")
    };
    assert_eq!(event.session.as_ref(), Some(&id));
    assert_eq!(
        node.get_session(&id).await.unwrap().record.state,
        SessionState::Succeeded
    );
    let output = node.session_output(&id, 0, 10).await.unwrap();
    let texts: Vec<&str> = output.lines.iter().map(|line| line.text.as_str()).collect();
    assert_eq!(texts, ["embedded", "twice"]);

    let sleeper = node
        .spawn_request(request(
            json!({"kind": "command", "program": "sleep", "args": ["300"]}),
        ))
        .await
        .unwrap()
        .record
        .id;
    node.cancel_session(&sleeper).await.unwrap();
    let cancelled = EventFilter {
        kinds: vec!["session.cancelled".parse().unwrap()],
        sessions: vec![sleeper.clone()],
        ..EventFilter::default()
    };
    let mut events = node.subscribe(cancelled);
    // It may have ended before the subscription: the store has the final word.
    if !node
        .get_session(&sleeper)
        .await
        .unwrap()
        .record
        .state
        .is_terminal()
    {
        tokio::time::timeout(PATIENCE, events.recv())
            .await
            .expect("the cancel completes");
    }
    assert_eq!(
        node.get_session(&sleeper).await.unwrap().record.state,
        SessionState::Cancelled
    );
    let page = node
        .list_sessions(SessionQuery {
            states: vec![SessionState::Succeeded],
            ..SessionQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(page.sessions.len(), 1);
    assert_eq!(page.sessions[0].id, id);
    assert!(matches!(
        node.get_session(&troupe::actors::ids::SessionId::new("s-missing").unwrap())
            .await,
        Err(troupe::session::SessionError::NotFound(_))
    ));
    node.shutdown().await;
}

/// Regression: a followed output stream was not a link, so one token could hold any number of
/// them open, each reading the store every second; they now count toward the token's links
/// (`auth.max_links_per_token`), and one past the bound is a 429 that says so.
#[tokio::test]
async fn followed_output_streams_count_toward_the_tokens_links() {
    let fixture = Fixture::start("[auth]\nmax_links_per_token = 2\n", &[]).await;
    let node = &fixture.node;
    let id = id_of(&node.spawn_session(sh("echo started; exec sleep 600")).await);
    let path = format!("/v1/sessions/{id}/output?follow=true");
    let follow = || node.get(&path);
    let first = follow().await;
    assert_eq!(first.status(), 200);
    let second = follow().await;
    assert_eq!(second.status(), 200);
    let third = follow().await;
    assert_eq!(third.status(), 429);
    assert!(third.headers().contains_key("retry-after"));
    let body: Value = third.json().await.unwrap();
    assert_eq!(body["error"]["code"], "too_many_links", "{body}");
    assert_eq!(body["error"]["details"]["max"], 2, "{body}");
    // A page of output is not a stream: it is not held back.
    let page = node.get(&format!("/v1/sessions/{id}/output")).await;
    assert_eq!(page.status(), 200);
    let cancelled = node.delete(&format!("/v1/sessions/{id}")).await;
    assert_eq!(cancelled.status(), 202);
}

/// Regression: a followed output stream gave every line its number as SSE id but ignored the
/// `Last-Event-ID` a reconnecting EventSource sends, so the client got the whole log again.
/// Also: a bad `limit` on the output route had another code than on the listing.
#[tokio::test]
async fn a_followed_output_stream_goes_on_after_the_last_event_id() {
    use eventsource_stream::Eventsource;
    use futures::StreamExt;

    let fixture = Fixture::start("", &[]).await;
    let node = &fixture.node;
    let id = id_of(
        &node
            .spawn_session(sh("for i in 1 2 3 4 5; do echo line$i; done"))
            .await,
    );
    let (texts, state) = node.run_to_end(&id).await;
    assert_eq!((texts.len(), state.as_str()), (5, "succeeded"));

    let follow = |last: &'static str| {
        node.client()
            .get(node.url(&format!("/v1/sessions/{id}/output?follow=true&offset=1")))
            .bearer_auth(&node.token)
            .header("Last-Event-ID", last)
            .send()
    };
    let response = follow("3").await.unwrap();
    assert_eq!(response.status(), 200);
    let events: Vec<_> = response
        .bytes_stream()
        .eventsource()
        .map(|event| event.unwrap())
        .collect()
        .await;
    let seen: Vec<(String, String)> = events
        .iter()
        .map(|event| (event.event.clone(), event.id.clone()))
        .collect();
    assert_eq!(
        seen,
        [
            ("message".to_owned(), "4".to_owned()),
            ("message".to_owned(), "5".to_owned()),
            ("end".to_owned(), "5".to_owned()),
        ],
        "the lines after 3, whatever offset says, then the end"
    );

    let bad = follow("three").await.unwrap();
    assert_eq!(bad.status(), 400);
    let body: Value = bad.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_parameter", "{body}");

    let bad_limit = node.get(&format!("/v1/sessions/{id}/output?limit=0")).await;
    assert_eq!(bad_limit.status(), 400);
    let body: Value = bad_limit.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_limit", "{body}");
}
