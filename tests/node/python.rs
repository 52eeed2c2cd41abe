//! Real clients, not only our own: the official Python MCP SDK drives `/mcp` (current and legacy
//! protocol) and `troupe mcp` over stdio. Skipped, with a message, where Python's `mcp` package
//! is not installed (`python3 -m pip install mcp`); `TROUPE_TEST_PYTHON` picks the interpreter.

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

async fn run_script(python: &str, args: &[&str]) -> String {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/mcp_python_client.py");
    let output = tokio::time::timeout(
        PATIENCE * 4,
        tokio::process::Command::new(python)
            .arg(script)
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the Python client finishes")
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "the Python MCP client failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

#[tokio::test]
async fn the_python_sdk_lists_and_calls_tools_over_streamable_http_and_stdio() {
    let Some(python) = python_with_mcp().await else {
        return;
    };
    let temp = tempfile::tempdir().unwrap();
    let workspace = temp.path().join("ws");
    std::fs::create_dir_all(&workspace).unwrap();
    let env = NodeEnv {
        vars: Vec::new(),
        cwd: Some(workspace.clone()),
    };
    let node = NodeProcess::start_with(&temp.path().join("data"), &[], &env).await;
    let http = run_script(&python, &["http", &node.url("/mcp"), &node.token]).await;
    assert!(
        http.contains("OK http-current protocol=2026-07-28"),
        "{http}"
    );
    assert!(
        http.contains("OK http-legacy protocol=2025-11-25"),
        "{http}"
    );

    let stdio_data = temp.path().join("stdio-data");
    let stdio = run_script(
        &python,
        &[
            "stdio",
            troupe_bin(),
            stdio_data.to_str().unwrap(),
            workspace.to_str().unwrap(),
        ],
    )
    .await;
    assert!(
        stdio.contains("OK stdio-current protocol=2026-07-28"),
        "{stdio}"
    );
    assert!(
        stdio.contains("OK stdio-legacy protocol=2025-11-25"),
        "{stdio}"
    );
}
