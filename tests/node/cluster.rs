//! The cluster: certificates made by the CLI, nodes with mutual TLS on loopback.

use std::path::Path;
use std::process::Stdio;

use tokio::process::Command;

use crate::support::{NodeProcess, PATIENCE, spawn_node, troupe_bin};

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
    let text = logs.all().join("\n");
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
    let text = logs.all().join("\n");
    assert!(
        text.contains("issued to node \\\"b\\\"") || text.contains("issued to node \"b\""),
        "{text}"
    );
}
