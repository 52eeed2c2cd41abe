//! Starting and stopping: configuration errors, the admin token, signals.

use std::os::unix::fs::PermissionsExt;
use std::process::Stdio;

use crate::support::*;

async fn run_to_exit(args: &[&str], env: &[(&str, &str)]) -> (std::process::ExitStatus, String) {
    let dir = tempfile::tempdir().unwrap();
    let mut command = tokio::process::Command::new(troupe_bin());
    command
        .args(["node", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (key, value) in env {
        command.env(key, value);
    }
    let output = tokio::time::timeout(PATIENCE, command.output())
        .await
        .expect("a bad config stops the node at once")
        .unwrap();
    (
        output.status,
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test]
async fn an_unknown_config_key_stops_the_node_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("troupe.toml");
    std::fs::write(&config, "[sessions]\nmax_concurent = 4\n").unwrap();
    let (status, stderr) = run_to_exit(&["--config", config.to_str().unwrap()], &[]).await;
    assert!(!status.success());
    assert!(stderr.contains("max_concurent"), "{stderr}");
    assert!(
        stderr.contains("max_concurrent"),
        "the error lists the valid keys: {stderr}"
    );

    let (status, stderr) = run_to_exit(&[], &[("TROUPE_HTTP__LISEN", "127.0.0.1:1")]).await;
    assert!(!status.success());
    assert!(stderr.contains("TROUPE_HTTP__LISEN"), "{stderr}");
}

#[tokio::test]
async fn a_bad_value_stops_the_node_naming_the_key() {
    let (status, stderr) = run_to_exit(&[], &[("TROUPE_SESSIONS__MAX_CONCURRENT", "many")]).await;
    assert!(!status.success());
    assert!(stderr.contains("max_concurrent"), "{stderr}");

    let (status, stderr) = run_to_exit(&["--node-id", "bad id!"], &[]).await;
    assert!(!status.success());
    assert!(stderr.contains("node_id"), "{stderr}");
}

#[tokio::test]
async fn the_admin_token_is_written_once_with_mode_0600() {
    let mut node = NodeProcess::start(&[]).await;
    let path = node.data_dir.join("admin.token");
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    node.logs
        .wait_for("where the token is", |line| {
            line["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("wrote a new admin token"))
        })
        .await;
    let token = node.token.clone();
    node.terminate();
    assert!(node.wait_exit().await.success());

    let again = NodeProcess::start_in(&node.data_dir, &[]).await;
    assert_eq!(again.token, token, "the token survives restarts");
}

/// Sends `signal` to a node with an open event stream and checks the documented shutdown: it
/// stops accepting connections, stops the tree in reverse start order (a supervisor's children
/// before the supervisor), closes the stream, and exits 0 without an error line.
async fn a_signal_stops_the_tree_in_reverse_order(signal: nix::sys::signal::Signal) {
    // The supervisors' "child stopped" lines are at debug level.
    let mut node =
        NodeProcess::start(&["--log-level", "info,troupe_actors::supervisor=debug"]).await;
    let mut stream = node.events("kind=link.*", None).await;
    let (_, connected) = stream.next_of("link.connected").await;
    let link = format!("links/{}", connected["data"]["link"].as_str().unwrap());
    let addr = node.addr;

    let pid = nix::unistd::Pid::from_raw(node.child.id().expect("running") as i32);
    nix::sys::signal::kill(pid, signal).unwrap();
    // The link closes while the tree stops, which begins after the listener stopped accepting.
    stream.closed().await;
    let refused = node
        .client()
        .get(format!("http://{addr}/v1/health"))
        .send()
        .await;
    assert!(
        refused.is_err(),
        "a new connection after {signal} must not be served: {refused:?}"
    );
    let status = node.wait_exit().await;
    assert!(status.success(), "{signal}: {status:?}");
    // The last line: once it is read, every earlier one is too.
    node.logs
        .wait_for("\"node stopped\"", |line| line["message"] == "node stopped")
        .await;

    let logs = node.logs.json();
    let messages: Vec<&str> = logs.iter().filter_map(|l| l["message"].as_str()).collect();
    let shutting = messages
        .iter()
        .position(|m| *m == "node shutting down")
        .unwrap();
    let stopped = messages.iter().position(|m| *m == "node stopped").unwrap();
    assert!(shutting < stopped);
    let stops: Vec<(String, String)> = logs
        .iter()
        .filter(|line| line["message"] == "child stopped")
        .map(|line| {
            (
                line["supervisor"].as_str().unwrap().to_owned(),
                line["child"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let root: Vec<&str> = stops
        .iter()
        .filter(|(supervisor, _)| supervisor == "node")
        .map(|(_, child)| child.as_str())
        .collect();
    assert_eq!(
        root,
        [
            "links",
            "sessions",
            "providers",
            "health",
            "registry",
            "event_bus"
        ],
        "{signal}: the root's children stop in reverse start order"
    );
    let position = |child: &str| {
        stops
            .iter()
            .position(|(_, stopped)| stopped == child)
            .unwrap_or_else(|| panic!("{child} stopped: {stops:?}"))
    };
    assert!(position(&link) < position("links"), "{stops:?}");
    assert!(
        position("sessions/manager") < position("sessions"),
        "{stops:?}"
    );
    assert!(
        logs.iter().all(|line| line["level"] != "ERROR"),
        "a clean shutdown logs no error: {messages:?}"
    );
}

#[tokio::test]
async fn sigterm_stops_accepting_then_stops_the_tree_in_reverse_order_and_exits_zero() {
    a_signal_stops_the_tree_in_reverse_order(nix::sys::signal::Signal::SIGTERM).await;
}

#[tokio::test]
async fn sigint_stops_accepting_then_stops_the_tree_in_reverse_order_and_exits_zero() {
    a_signal_stops_the_tree_in_reverse_order(nix::sys::signal::Signal::SIGINT).await;
}
