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
