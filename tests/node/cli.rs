//! The CLI against a running node.

use crate::support::*;

#[tokio::test]
async fn health_prints_a_summary_using_the_token_from_the_data_dir() {
    let node = NodeProcess::start(&[]).await;
    let (status, stdout, stderr) = run_cli(&node, &["health"]).await;
    assert!(status.success(), "{stderr}");
    assert!(stdout.contains("healthy"), "{stdout}");
    assert!(stdout.contains("8/8 running"), "{stdout}");
    let (status, stdout, _) = run_cli(&node, &["health", "--json"]).await;
    assert!(status.success());
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["status"], "healthy");
}

#[tokio::test]
async fn events_prints_recent_events_and_filters_by_kind() {
    let node = NodeProcess::start(&[]).await;
    drop(node.events("kind=session.*", None).await);
    // The disconnect is published asynchronously: wait for it to be visible.
    let mut stream = node.events("kind=link.disconnected&tail=1", None).await;
    stream.next_of("link.disconnected").await;
    drop(stream);

    let (status, stdout, stderr) = run_cli(&node, &["events", "--kind", "link.*", "--json"]).await;
    assert!(status.success(), "{stderr}");
    let kinds: Vec<String> = stdout
        .lines()
        .map(|line| {
            serde_json::from_str::<serde_json::Value>(line).unwrap()["kind"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert!(kinds.len() >= 2, "{stdout}");
    assert!(
        kinds.iter().all(|kind| kind.starts_with("link.")),
        "{kinds:?}"
    );

    let (status, stdout, _) = run_cli(&node, &["events", "--kind", "actor.*"]).await;
    assert!(status.success());
    assert!(stdout.is_empty(), "no restarts happened: {stdout}");
}

#[tokio::test]
async fn a_wrong_token_or_an_absent_node_gives_a_clear_error() {
    let node = NodeProcess::start(&[]).await;
    let (status, _, stderr) = run_cli(
        &node,
        &[
            "health",
            "--token",
            "nope",
            "--node",
            &format!("http://{}", node.addr),
        ],
    )
    .await;
    // Health is open, so a wrong token still works there; events is not.
    assert!(status.success(), "{stderr}");
    let (status, _, stderr) = run_cli(&node, &["events", "--token", "nope"]).await;
    assert!(!status.success());
    assert!(stderr.contains("refused the token"), "{stderr}");

    let (status, _, stderr) = run_cli(&node, &["health", "--node", "http://127.0.0.1:9"]).await;
    assert!(!status.success());
    assert!(stderr.contains("cannot reach a node"), "{stderr}");
}

#[tokio::test]
async fn health_needs_no_token() {
    let node = NodeProcess::start(&[]).await;
    let empty = tempfile::tempdir().unwrap();
    let output = tokio::time::timeout(
        PATIENCE,
        tokio::process::Command::new(troupe_bin())
            .args(["health", "--node", &format!("http://{}", node.addr)])
            // A machine without the node's token file, and no token anywhere else.
            .env("TROUPE_DATA_DIR", empty.path())
            .env_remove("TROUPE_TOKEN")
            .env_remove("TROUPE_URL")
            .stdin(std::process::Stdio::null())
            .output(),
    )
    .await
    .expect("the command finishes")
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("healthy"), "{stdout}");
}

/// `troupe events --follow --json` of `kinds` against `node`, its stdout piped.
fn follow_events(node: &NodeProcess, kinds: &[&str]) -> tokio::process::Child {
    let mut args = vec!["events", "--follow", "--json"];
    for kind in kinds {
        args.extend(["--kind", kind]);
    }
    tokio::process::Command::new(troupe_bin())
        .args(args)
        .env("TROUPE_URL", format!("http://{}", node.addr))
        .env("TROUPE_DATA_DIR", &node.data_dir)
        .env_remove("TROUPE_TOKEN")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

/// `troupe events --follow` across a forced disconnect: a registry panic restarts every link
/// (rest_for_one at the root), the CLI reconnects with Last-Event-ID, and what it prints is
/// exactly the node's event sequence: no gap, no duplicate.
#[tokio::test]
async fn events_follow_resumes_across_a_forced_disconnect_without_gap_or_duplicate() {
    use tokio::io::AsyncBufReadExt;

    let node = NodeProcess::start(&["--fault-injection"]).await;
    let mut cli = follow_events(&node, &["link.*", "actor.*"]);
    let mut printed = tokio::io::BufReader::new(cli.stdout.take().unwrap()).lines();
    let mut next_printed = async || -> serde_json::Value {
        let line = tokio::time::timeout(PATIENCE, printed.next_line())
            .await
            .expect("the CLI prints an event within the patience")
            .unwrap()
            .expect("the CLI keeps running");
        serde_json::from_str(&line).expect("one JSON event per line")
    };

    // Its own link first: the stream is live.
    let first = next_printed().await;
    assert_eq!(first["kind"], "link.connected");
    let first_link = first["data"]["link"].as_str().unwrap().to_owned();
    let mut seen = vec![first];

    node.inject_panic("registry").await;

    // Everything up to the CLI's new link (opened after the disconnect) and its old link's
    // disconnect (published when the restarted registry catches up), in whatever order.
    let (mut reconnected, mut disconnected) = (false, false);
    while !(reconnected && disconnected) {
        let event = next_printed().await;
        reconnected |= event["kind"] == "link.connected" && event["data"]["link"] != first_link;
        disconnected |=
            event["kind"] == "link.disconnected" && event["data"]["link"] == first_link.as_str();
        seen.push(event);
    }
    drop(cli);

    // The node's own record of the same filter, from the ring, after the first event.
    let first_id = seen[0]["id"].as_str().unwrap();
    let replay = node
        .get(&format!(
            "/v1/events?follow=false&kind=link.*&kind=actor.*&after={first_id}"
        ))
        .await;
    assert_eq!(replay.status(), 200);
    let body = tokio::time::timeout(PATIENCE, replay.text())
        .await
        .expect("a finite replay")
        .unwrap();
    let expected: Vec<String> = body
        .lines()
        .filter_map(|line| line.strip_prefix("data:"))
        .map(|data| {
            let event: serde_json::Value = serde_json::from_str(data.trim()).unwrap();
            event["id"].as_str().unwrap().to_owned()
        })
        .collect();
    let printed_ids: Vec<String> = seen[1..]
        .iter()
        .map(|event| event["id"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        expected.len() >= printed_ids.len(),
        "the replay covers what was printed: {expected:?} vs {printed_ids:?}"
    );
    assert_eq!(
        printed_ids,
        expected[..printed_ids.len()],
        "the CLI printed exactly the node's sequence: no gap, no duplicate"
    );
    let kinds: Vec<&str> = seen.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert!(
        seen.iter()
            .any(|e| e["kind"] == "actor.restarted" && e["data"]["child"] == "links"),
        "the restarts published while it was disconnected were printed: {kinds:?}"
    );
}

/// The README's tour: `troupe events --follow --kind 'actor.*'` sees the restarts of a panic
/// that also cut its own stream, though no event had matched its filter before (the stream's
/// first frame names where it started, and the CLI resumes from there).
#[tokio::test]
async fn a_follower_whose_filter_matched_nothing_yet_still_resumes_where_it_started() {
    use tokio::io::AsyncBufReadExt;

    let node = NodeProcess::start(&["--fault-injection"]).await;
    let mut observer = node.events("kind=link.connected", None).await;
    let mut cli = follow_events(&node, &["actor.*"]);
    // The CLI's link is up: the second link.connected (the observer's own comes first).
    observer.next_of("link.connected").await;
    observer.next_of("link.connected").await;
    node.inject_panic("registry").await;
    let mut printed = tokio::io::BufReader::new(cli.stdout.take().unwrap()).lines();
    loop {
        let line = tokio::time::timeout(PATIENCE, printed.next_line())
            .await
            .expect("the restarts are printed within the patience")
            .unwrap()
            .expect("the CLI keeps running");
        let event: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert!(
            event["kind"].as_str().unwrap().starts_with("actor."),
            "{event}"
        );
        if event["kind"] == "actor.restarted" && event["data"]["child"] == "links" {
            break;
        }
    }
}

#[path = "../../examples/embed.rs"]
#[allow(dead_code)]
mod embed_example;

/// examples/embed.rs, run for real so that it cannot rot.
#[tokio::test]
async fn the_embed_example_runs_and_sees_the_restart() {
    let restart = embed_example::run().await.expect("the example runs");
    assert_eq!(restart.supervisor.as_str(), "node");
    assert_eq!(restart.child.as_str(), "health");
    assert!(
        restart.reason.contains("fault injected: panic in health"),
        "{}",
        restart.reason
    );
}

/// Runs the CLI against `node` with its stdout a pipe whose reader is already gone (as after
/// `| head -1`); returns its exit status and stderr.
async fn run_cli_into_a_closed_pipe(
    node: &NodeProcess,
    args: &[&str],
) -> (std::process::ExitStatus, String) {
    let mut child = tokio::process::Command::new(troupe_bin())
        .args(args)
        .env("TROUPE_URL", format!("http://{}", node.addr))
        .env("TROUPE_DATA_DIR", &node.data_dir)
        .env_remove("TROUPE_TOKEN")
        .env_remove("RUST_BACKTRACE")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let output = tokio::time::timeout(PATIENCE, child.wait_with_output())
        .await
        .expect("the command finishes")
        .unwrap();
    (
        output.status,
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// `troupe … | head -1`: a reader that goes away ends the command quietly with 141 (as SIGPIPE
/// would), not with a panic.
#[tokio::test]
async fn a_closed_stdout_ends_client_commands_quietly() {
    let node = NodeProcess::start(&[]).await;
    let record = node
        .spawn_session(serde_json::json!({"kind": "command", "program": "sh", "args": ["-c", "echo one; echo two"]}))
        .await;
    let id = record["id"].as_str().unwrap().to_owned();
    node.run_to_end(&id).await;
    for args in [
        vec!["health"],
        vec!["events", "--tail", "200"],
        vec!["session", "list"],
        vec!["session", "show", &id],
        vec!["session", "logs", &id],
        vec!["session", "spawn", "--", "sh", "-c", "echo out"],
        // Stops at its first line, before any node starts.
        vec!["demo", "--pause", "0"],
    ] {
        let (status, stderr) = run_cli_into_a_closed_pipe(&node, &args).await;
        assert_eq!(
            status.code(),
            Some(141),
            "{args:?}: {status:?}, stderr: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

/// A session id is checked before it goes into a URL: `../health` would read the health report
/// as if it were a session, `ID?junk` would cancel `ID`.
#[tokio::test]
async fn session_ids_that_would_reach_another_route_are_refused() {
    let node = NodeProcess::start(&[]).await;
    for args in [
        ["session", "show", "../health"],
        ["session", "cancel", "x?y"],
        ["session", "logs", "../../v1/admin/faults"],
    ] {
        let (status, stdout, stderr) = run_cli(&node, &args).await;
        assert_eq!(status.code(), Some(2), "{args:?}: {stdout} {stderr}");
        assert!(stderr.contains("invalid session id"), "{args:?}: {stderr}");
        assert!(stdout.is_empty(), "{args:?}: {stdout}");
    }
}

/// A discovery directory open to others is refused by `troupe nodes` and `troupe mcp`: an entry
/// planted there would receive the admin token, and an embedded node would register there.
#[tokio::test]
async fn a_discovery_directory_open_to_others_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let temp = tempfile::tempdir().unwrap();
    let open = temp.path().join("shared");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    for args in [
        vec!["nodes"],
        vec![
            "mcp",
            "--data-dir",
            temp.path().join("data").to_str().unwrap(),
        ],
    ] {
        let output = tokio::time::timeout(
            PATIENCE,
            tokio::process::Command::new(troupe_bin())
                .args(&args)
                .env("TROUPE_DISCOVERY_DIR", &open)
                .stdin(std::process::Stdio::null())
                .output(),
        )
        .await
        .expect("the command finishes")
        .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(
            stderr.contains("mode 0777") && stderr.contains("chmod 700"),
            "{args:?}: {stderr}"
        );
        assert_eq!(
            std::fs::read_dir(&open).unwrap().count(),
            0,
            "{args:?}: nothing registered there"
        );
    }
}

/// Runs the CLI with `args` and `env` (and no `TROUPE_URL` / `TROUPE_TOKEN` of the test's own);
/// returns its exit status and stderr.
async fn run_troupe(args: &[&str], env: &[(&str, &str)]) -> (std::process::ExitStatus, String) {
    let output = tokio::time::timeout(
        PATIENCE,
        tokio::process::Command::new(troupe_bin())
            .args(args)
            .env_remove("TROUPE_URL")
            .env_remove("TROUPE_TOKEN")
            .envs(env.iter().copied())
            .stdin(std::process::Stdio::null())
            .output(),
    )
    .await
    .expect("the command finishes")
    .unwrap();
    (
        output.status,
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// `export TROUPE_TOKEN=$TOKEN` with `$TOKEN` unset: said plainly, not blamed on the data dir.
#[tokio::test]
async fn an_empty_token_is_refused_saying_so() {
    let node = NodeProcess::start(&[]).await;
    let url = format!("http://{}", node.addr);
    let data_dir = node.data_dir.to_str().unwrap();
    let (status, stderr) = run_troupe(
        &["session", "list", "--node", &url, "--data-dir", data_dir],
        &[("TROUPE_TOKEN", "")],
    )
    .await;
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("TROUPE_TOKEN is empty") && stderr.contains("unset TROUPE_TOKEN"),
        "{stderr}"
    );
}

/// The cause of a failed connection is kept: TLS against the node's plain HTTP says so, and
/// a refused connection is named.
#[tokio::test]
async fn a_connection_failure_names_its_cause() {
    let node = NodeProcess::start(&[]).await;
    let (status, stderr) = run_troupe(
        &["health", "--node", &format!("https://{}", node.addr)],
        &[],
    )
    .await;
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("cannot reach a node")
            && stderr.contains("TLS handshake failed")
            && stderr.contains("try http://"),
        "{stderr}"
    );
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let (status, stderr) = run_troupe(
        &["health", "--node", &format!("http://127.0.0.1:{port}")],
        &[],
    )
    .await;
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.to_lowercase().contains("connection refused") && stderr.contains("is it running?"),
        "{stderr}"
    );
}

/// A node that accepts connections and never answers: commands give up after `--request-timeout`
/// instead of hanging.
#[tokio::test]
async fn a_node_that_never_answers_times_out() {
    // The kernel completes connections into the backlog; nobody ever reads or answers them.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", silent.local_addr().unwrap());
    let data = tempfile::tempdir().unwrap();
    for args in [
        vec!["health", "--node", &url, "--request-timeout", "1"],
        vec![
            "session",
            "list",
            "--node",
            &url,
            "--request-timeout",
            "1",
            "--token",
            "t",
        ],
        vec![
            "events",
            "--node",
            &url,
            "--request-timeout",
            "1",
            "--token",
            "t",
        ],
    ] {
        let (status, stderr) =
            run_troupe(&args, &[("TROUPE_DATA_DIR", data.path().to_str().unwrap())]).await;
        assert_eq!(status.code(), Some(1), "{args:?}: {stderr}");
        assert!(
            stderr.contains("did not answer within 1s"),
            "{args:?}: {stderr}"
        );
    }
}

/// `troupe events --follow` against a node that was never there fails at once; it retries only
/// a stream that was open and dropped.
#[tokio::test]
async fn events_follow_fails_at_once_when_no_node_is_there() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let (status, stderr) = run_troupe(&["events", "-f", "--node", &url, "--token", "t"], &[]).await;
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("cannot reach a node"), "{stderr}");
    assert!(!stderr.contains("reconnecting"), "{stderr}");
}

/// Logs written to a pipe or a file (`troupe node 2> node.log`, journald, an MCP client that
/// keeps `troupe mcp`'s stderr) carry no ANSI colour codes.
#[tokio::test]
async fn logs_on_a_pipe_have_no_colour_codes() {
    use tokio::io::AsyncBufReadExt;
    let temp = tempfile::tempdir().unwrap();
    let mut node = tokio::process::Command::new(troupe_bin())
        .args(["node", "--listen", "127.0.0.1:0", "--log-format", "pretty"])
        .arg("--data-dir")
        .arg(temp.path().join("data"))
        .env("TROUPE_DISCOVERY_DIR", temp.path().join("discovery"))
        .env_remove("NO_COLOR")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(node.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    tokio::time::timeout(PATIENCE, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            let started = line.contains("node started");
            seen.push(line);
            if started {
                return;
            }
        }
        panic!("the node exited: {seen:?}");
    })
    .await
    .expect("the node starts");
    assert!(seen.iter().all(|line| !line.contains('\x1b')), "{seen:?}");
}

/// A node started with the soft open-files limit of a shell's default raises it to the hard
/// limit (it serves at most half its limit of connections, and needs pipes for its sessions).
#[tokio::test]
async fn a_node_raises_its_open_files_limit_to_the_hard_one() {
    let Some(hard) = open_files_limit("self", "Max open files", 1) else {
        eprintln!("skipped: /proc/self/limits is not readable here");
        return;
    };
    if hard <= 256 {
        eprintln!("skipped: the hard open-files limit ({hard}) leaves nothing to raise");
        return;
    }
    let temp = tempfile::tempdir().unwrap();
    let data = temp.path().join("data");
    let script = format!(
        "ulimit -S -n 256 && exec {} node --data-dir {} --listen 127.0.0.1:0",
        crate::support::troupe_bin(),
        data.display()
    );
    let mut node = tokio::process::Command::new("sh")
        .args(["-c", &script])
        .env("TROUPE_DISCOVERY_DIR", temp.path().join("discovery"))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pid = node.id().unwrap().to_string();
    // The node has started once it logs; the limit was raised before anything else.
    use tokio::io::AsyncBufReadExt;
    let mut stderr = tokio::io::BufReader::new(node.stderr.take().unwrap()).lines();
    tokio::time::timeout(PATIENCE, async {
        while let Some(line) = stderr.next_line().await.unwrap() {
            if line.contains("node started") {
                return;
            }
        }
        panic!("the node ended before it listened");
    })
    .await
    .expect("the node listens");
    let soft = open_files_limit(&pid, "Max open files", 0).expect("the node's limits");
    assert_eq!(soft, hard.min(1 << 20), "raised from 256");
    node.kill().await.unwrap();
}

/// Field `column` (0: soft, 1: hard) of limit `name` in `/proc/PID/limits`.
fn open_files_limit(pid: &str, name: &str, column: usize) -> Option<u64> {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let line = limits.lines().find(|line| line.starts_with(name))?;
    line[name.len()..]
        .split_whitespace()
        .nth(column)?
        .parse()
        .ok()
}

/// A stand-in for a node that serves one session's output in pieces, as a node can: a first
/// stream with an `error` event between two lines (a failed read of its store, which it
/// retries) that then ends without `end` (its connection went away), a second with an `end`
/// whose state is not final (the node gave up on its store while the run went on), a third
/// with the real end. Answers the session's record as failed with code 3; returns the `offset`
/// of each output request it got.
fn serve_output_in_pieces(
    listener: tokio::net::TcpListener,
    id: String,
) -> std::sync::Arc<std::sync::Mutex<Vec<String>>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let offsets = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = offsets.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut socket, _)) = listener.accept().await else {
                return;
            };
            let (id, seen) = (id.clone(), seen.clone());
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if socket.read(&mut byte).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                let head = String::from_utf8_lossy(&head).into_owned();
                let target = head.split(' ').nth(1).unwrap_or("").to_owned();
                let line = |n: u32, text: &str| {
                    format!(
                        "id: {n}\ndata: {{\"line\": {n}, \"stream\": \"stdout\", \"text\": \"{text}\"}}\n\n"
                    )
                };
                let response = if let Some(query) =
                    target.strip_prefix(&format!("/v1/sessions/{id}/output?"))
                {
                    let offset = query
                        .split('&')
                        .find_map(|pair| pair.strip_prefix("offset="))
                        .unwrap_or("none")
                        .to_owned();
                    let body = match offset.as_str() {
                        "0" => format!(
                            "{}event: error\ndata: {{\"message\": \"cannot read the store\"}}\n\n{}",
                            line(1, "one"),
                            line(2, "two")
                        ),
                        "2" => format!(
                            "{}event: end\ndata: {{\"state\": \"running\"}}\n\n",
                            line(3, "three")
                        ),
                        _ => "event: end\ndata: {\"state\": \"failed\"}\n\n".to_owned(),
                    };
                    // The first reopen after line 3 finds the token over its request rate.
                    let limited = offset == "3" && !seen.lock().unwrap().iter().any(|o| o == "3");
                    seen.lock().unwrap().push(offset);
                    if limited {
                        let body = r#"{"error": {"code": "rate_limited", "message": "slow down", "details": {}}}"#;
                        format!(
                            "HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\n\
                             retry-after: 1\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                            body.len()
                        )
                    } else {
                        format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: \
                             close\r\n\r\n{body}"
                        )
                    }
                } else if target == format!("/v1/sessions/{id}") {
                    let body = format!(r#"{{"id": "{id}", "state": "failed", "exit_code": 3}}"#);
                    format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: \
                         {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    )
                } else {
                    "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                        .to_owned()
                };
                let _ = socket.write_all(response.as_bytes()).await;
                let _ = socket.shutdown().await;
            });
        }
    });
    offsets
}

/// Regression: `troupe session logs --follow` stopped at the first `error` event of the output
/// stream (exit 1, the rest of the output unprinted), and took a stream that ended without
/// the run's end for the end. It reads on past the error, reopens the stream after the last
/// line printed, and exits with the run's code.
#[tokio::test]
async fn logs_follow_reads_past_an_error_and_resumes_a_stream_that_ended_early() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let id = "s-01jq2k3m4n5p6q7r";
    let offsets = serve_output_in_pieces(listener, id.to_owned());
    let output = tokio::time::timeout(
        PATIENCE,
        tokio::process::Command::new(troupe_bin())
            .args(["session", "logs", id, "--follow", "--node", &url])
            .args(["--token", "t"])
            .env_remove("TROUPE_URL")
            .env_remove("TROUPE_TOKEN")
            .stdin(std::process::Stdio::null())
            .output(),
    )
    .await
    .expect("the command finishes")
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(3), "the run's code: {stderr}");
    assert_eq!(stdout, "one\ntwo\nthree\n", "each line once: {stderr}");
    // Past a 429 too: a busy token is worth another try.
    assert_eq!(*offsets.lock().unwrap(), ["0", "2", "3", "3"], "{stderr}");
    assert!(stderr.contains("cannot read the store"), "{stderr}");
    assert!(stderr.contains("resuming after line 2"), "{stderr}");
}
