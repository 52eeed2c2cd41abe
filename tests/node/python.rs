//! Real clients, not only our own, driven through the scripts under `scripts/` (the same command
//! lines a person runs by hand and docs/API.md shows):
//!
//! - the official Python MCP SDK over Streamable HTTP (current and legacy protocol), over stdio
//!   through `troupe mcp` bridged to the node, and through `troupe mcp --standalone`
//!   (`scripts/mcp-real-clients.sh python`);
//! - the MCP Inspector CLI (`scripts/mcp-real-clients.sh inspector`);
//! - the MCP conformance suite's server scenarios (`scripts/mcp-conformance.sh`).
//!
//! Each test is skipped, with a message, where its client is not installed: Python's `mcp`
//! package (`TROUPE_TEST_PYTHON` picks the interpreter), or the Node tools `.ci/run` installs
//! into `target/ci-node` from `scripts/node/package.json` (`TROUPE_CI_NODE` picks the prefix).
//! `TROUPE_REQUIRE_CLIENTS=1` turns a skip into a failure.

use std::path::PathBuf;

use crate::support::*;

/// The interpreter to use, when it can import `mcp`.
async fn python_with_mcp() -> Option<String> {
    let python = std::env::var("TROUPE_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let probe = tokio::process::Command::new(&python)
        .args(["-c", "import mcp, httpx2"])
        .output()
        .await;
    match probe {
        Ok(output) if output.status.success() => Some(python),
        _ => {
            skip_without_python_client(&format!(
                "{python} cannot import the Python MCP SDK; install it with \
                 `python3 -m pip install mcp` (or set TROUPE_TEST_PYTHON)"
            ));
            None
        }
    }
}

/// The npm prefix holding Node >= 22 and `tool` (a name in `node_modules/.bin`), when it does.
async fn node_tools_with(tool: &str) -> Option<PathBuf> {
    let prefix = std::env::var_os("TROUPE_CI_NODE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/ci-node"));
    let bin = prefix.join("node_modules/.bin");
    let version = tokio::process::Command::new(bin.join("node"))
        .arg("--version")
        .output()
        .await
        .ok()
        .filter(|output| output.status.success())
        .map(|output| String::from_utf8_lossy(&output.stdout).trim().to_owned());
    let major: Option<u32> = version
        .as_deref()
        .and_then(|version| version.strip_prefix('v')?.split('.').next()?.parse().ok());
    if major.is_some_and(|major| major >= 22) && bin.join(tool).exists() {
        return Some(prefix);
    }
    skip_without_python_client(&format!(
        "{} has no Node >= 22 (found {}) with {tool}; install the Node tools with \
         `mkdir -p target/ci-node && cp scripts/node/package*.json target/ci-node && \
         npm ci --prefix target/ci-node` (or set TROUPE_CI_NODE)",
        prefix.display(),
        version.as_deref().unwrap_or("none")
    ));
    None
}

fn script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("scripts")
        .join(name)
}

/// A node with a workspace, whose discovery entry is written (so `troupe mcp` finds it).
async fn discoverable_node(temp: &tempfile::TempDir) -> NodeProcess {
    let workspace = temp.path().join("ws");
    std::fs::create_dir_all(&workspace).unwrap();
    let env = NodeEnv {
        vars: Vec::new(),
        cwd: Some(workspace),
    };
    let node = NodeProcess::start_with(&temp.path().join("data"), &[], &env).await;
    node.logs
        .wait_for("discovery entry written", |line| {
            line["message"] == "discovery entry written"
        })
        .await;
    node
}

/// Runs a script to its end (bounded); returns its stdout, failing with its output otherwise.
async fn run_script(mut command: tokio::process::Command) -> String {
    let output = tokio::time::timeout(PATIENCE * 8, command.kill_on_drop(true).output())
        .await
        .expect("the script finishes")
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "the script failed ({}):\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

#[tokio::test]
async fn the_python_sdk_drives_streamable_http_the_stdio_bridge_and_an_embedded_node() {
    let Some(python) = python_with_mcp().await else {
        return;
    };
    let temp = tempfile::tempdir().unwrap();
    let node = discoverable_node(&temp).await;
    let mut command = tokio::process::Command::new(script("mcp-real-clients.sh"));
    command
        .args(["python", &node.url("/mcp"), &node.token])
        .env("PYTHON", &python)
        .env("TROUPE_BIN", troupe_bin())
        .env("TROUPE_DISCOVERY_DIR", node.data_dir.join("discovery"))
        .current_dir(temp.path());
    let out = run_script(command).await;
    for line in [
        "OK http-current protocol=2026-07-28",
        "OK http-legacy protocol=2025-11-25",
        "OK bridge-current protocol=2026-07-28",
        "OK bridge-current-same-node",
        "OK bridge-legacy protocol=2025-11-25",
        "OK bridge-legacy-same-node",
        "OK stdio-current protocol=2026-07-28",
        "OK stdio-legacy protocol=2025-11-25",
    ] {
        assert!(out.contains(line), "{line:?} in\n{out}");
    }
    // The bridged clients reached this node over /mcp/ws?client=stdio.
    assert!(
        node.logs.json().iter().any(|line| {
            line["message"] == "finished processing request" && line["span"]["path"] == "/mcp/ws"
        }),
        "the bridge's links are the node's"
    );
}

#[tokio::test]
async fn the_mcp_inspector_cli_lists_tools_and_calls_node_health_over_http_and_stdio() {
    let Some(prefix) = node_tools_with("mcp-inspector").await else {
        return;
    };
    let Some(python) = python_with_mcp().await else {
        return;
    };
    let temp = tempfile::tempdir().unwrap();
    let node = discoverable_node(&temp).await;
    let mut command = tokio::process::Command::new(script("mcp-real-clients.sh"));
    command
        .args(["inspector", &node.url("/mcp"), &node.token])
        .env("PYTHON", &python)
        .env("TROUPE_BIN", troupe_bin())
        .env("TROUPE_CI_NODE", &prefix)
        .env("TROUPE_DISCOVERY_DIR", node.data_dir.join("discovery"))
        .current_dir(temp.path());
    let out = run_script(command).await;
    for line in [
        "OK inspector-http tools/list",
        "OK inspector-http tools/call node_health",
        "OK inspector-stdio tools/call node_health",
    ] {
        assert!(out.contains(line), "{line:?} in\n{out}");
    }
}

#[tokio::test]
async fn the_mcp_conformance_suite_passes_its_server_scenarios() {
    let Some(prefix) = node_tools_with("conformance").await else {
        return;
    };
    let temp = tempfile::tempdir().unwrap();
    let node = discoverable_node(&temp).await;
    let results = temp.path().join("results");
    let mut command = tokio::process::Command::new(script("mcp-conformance.sh"));
    command
        .arg(node.url("/mcp"))
        .arg(&node.token)
        .arg(&results)
        .env("TROUPE_CI_NODE", &prefix)
        .current_dir(temp.path());
    let out = run_script(command).await;
    for scenario in [
        "server-initialize",
        "tools-list",
        "http-header-validation",
        "dns-rebinding-protection",
        "server-stateless",
    ] {
        assert!(
            out.contains(&format!("PASS {scenario}: Passed:")),
            "{scenario} in\n{out}"
        );
    }
    // Through the proxy, the suite's own Host/Origin reached the node: the rebinding attempt was
    // refused by the node itself.
    assert!(
        node.logs.json().iter().any(|line| {
            line["message"] == "finished processing request"
                && line["status"] == 403
                && line["span"]["path"] == "/mcp"
        }),
        "the node itself refused the suite's rebinding request"
    );
}
