//! `troupe health`: a node's health summary.

use std::process::ExitCode;

use super::client::{ClientArgs, NodeClient};
use super::out::{out, outln};

/// `troupe health` options.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Exit status: 0 when the node is healthy or degraded, 1 when it is \
                        unhealthy or cannot be reached."
)]
pub(super) struct HealthArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// Print the JSON report.
    #[arg(long)]
    json: bool,
}

/// How long `troupe health` waits for the answer unless `--request-timeout` says otherwise: probes and
/// scripts call it, and a node that cannot answer its health in seconds is not healthy.
const HEALTH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Exit codes: 0 healthy or degraded, 1 unhealthy or unreachable. `/v1/health` is open, so
/// no token is needed (and none is sent).
pub(super) async fn run(args: HealthArgs) -> anyhow::Result<ExitCode> {
    let client = NodeClient::anonymous(&args.client)?.default_timeout(HEALTH_TIMEOUT);
    let response = client.fetch(client.get("/v1/health")).await?;
    let unhealthy = response.status() == reqwest::StatusCode::SERVICE_UNAVAILABLE;
    let report: serde_json::Value = if unhealthy {
        response.json().await?
    } else {
        super::client::check(response).await?.json().await?
    };
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&report)?)?;
    } else {
        out!("{}", summary(&report))?;
    }
    Ok(if unhealthy || report["status"] == "unhealthy" {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn summary(report: &serde_json::Value) -> String {
    if report.get("status").is_none() {
        return format!("{report}\n");
    }
    let actors = &report["actors"];
    let mut text = format!(
        "node {}: {} (up {}s)\n  actors: {}/{} running\n  restarts: {} in the last {}s\n  links: {}\n",
        report["node"].as_str().unwrap_or("?"),
        report["status"].as_str().unwrap_or("?"),
        report["uptime_secs"],
        actors["running"],
        actors["total"],
        report["restarts_in_window"],
        report["window_secs"],
        report["links"],
    );
    if let Some(reasons) = report["reasons"].as_array() {
        for reason in reasons {
            text.push_str(&format!("  - {}\n", reason.as_str().unwrap_or("?")));
        }
    }
    text
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_summary_names_status_actors_and_reasons() {
        let report = serde_json::json!({
            "status": "degraded", "node": "a", "uptime_secs": 5,
            "actors": {"running": 6, "total": 7}, "restarts_in_window": 4,
            "window_secs": 60, "links": 2, "reasons": ["restarting: registry"]
        });
        let text = super::summary(&report);
        assert!(text.contains("node a: degraded"));
        assert!(text.contains("6/7 running"));
        assert!(text.contains("- restarting: registry"));
    }
}
