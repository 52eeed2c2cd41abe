//! `troupe session …`: spawn a session and watch it, spawn Aider, list, show, cancel, read logs.
//!
//! `spawn` without `--detach` streams the run's output as it comes, shows its state with a
//! spinner on a terminal, and exits with the run's exit code (124 when it timed out, 130 when
//! it was cancelled, 1 for any other failure without a code).
//!
//! In a cluster, `spawn --on NODE` or `--placement least_loaded [--constraint KEY=VALUE]…`
//! chooses where the session runs, `list --scope cluster` lists every member's sessions, and
//! `show`, `cancel` and `logs` reach a session on any member: the node asked routes them.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use eventsource_stream::Eventsource;
use futures::StreamExt;
use serde_json::{Value, json};

use super::client::{ClientArgs, NodeClient, check};

/// `troupe session` commands.
#[derive(Debug, clap::Subcommand)]
pub(super) enum SessionCommand {
    /// Run a program as a session: `troupe session spawn -- PROGRAM ARGS…`.
    Spawn(SpawnArgs),
    /// Run Aider non-interactively as a session.
    Aider(AiderArgs),
    /// List sessions, newest first.
    List(ListArgs),
    /// Show one session.
    Show(IdArgs),
    /// Cancel a session (SIGTERM to its process group, SIGKILL after the grace period).
    Cancel(IdArgs),
    /// Print a session's output.
    Logs(LogsArgs),
}

/// Options common to spawning.
#[derive(Debug, clap::Args)]
struct SpawnOptions {
    /// Return at once with the session id instead of following the run.
    #[arg(long, short)]
    detach: bool,
    /// Timeout in seconds (default: the node's sessions.default_timeout_secs).
    #[arg(long)]
    timeout: Option<u64>,
    /// A label `KEY=VALUE` (repeatable).
    #[arg(long = "label", value_parser = parse_pair)]
    labels: Vec<(String, String)>,
    /// Priority, 0 (lowest) to 9.
    #[arg(long, value_parser = clap::value_parser!(u8).range(0..=9))]
    priority: Option<u8>,
    /// Working directory (inside the node's workspace roots).
    #[arg(long)]
    workdir: Option<String>,
    /// Idempotency key: spawning again with the same key returns the same session.
    #[arg(long)]
    idempotency_key: Option<String>,
    /// Cluster: run the session on this member (a node id, as `troupe cluster members` shows).
    #[arg(long = "on", value_name = "NODE", conflicts_with = "placement")]
    on: Option<String>,
    /// Cluster: let the cluster choose the node (`least_loaded`: the member with room and the
    /// lowest load).
    #[arg(long, value_name = "STRATEGY", value_parser = ["least_loaded"])]
    placement: Option<String>,
    /// With --placement: only nodes carrying this label `KEY=VALUE` (repeatable; every one
    /// must match the node's cluster.labels).
    #[arg(long = "constraint", value_name = "KEY=VALUE", value_parser = parse_pair, requires = "placement")]
    constraints: Vec<(String, String)>,
    /// Print the session record as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
pub(super) struct SpawnArgs {
    #[command(flatten)]
    client: ClientArgs,
    #[command(flatten)]
    options: SpawnOptions,
    /// An environment entry `KEY=VALUE` for the program (repeatable).
    #[arg(long = "env", value_parser = parse_pair)]
    env: Vec<(String, String)>,
    /// The program and its arguments, after `--`.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

#[derive(Debug, clap::Args)]
pub(super) struct AiderArgs {
    #[command(flatten)]
    client: ClientArgs,
    #[command(flatten)]
    options: SpawnOptions,
    /// What Aider should do.
    #[arg(long, short)]
    message: String,
    /// The model (through the node's gateway when it has providers).
    #[arg(long)]
    model: Option<String>,
    /// Let Aider use git.
    #[arg(long)]
    git: bool,
    /// Files to edit, relative to the working directory.
    files: Vec<String>,
}

#[derive(Debug, clap::Args)]
pub(super) struct ListArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// Only sessions in this state (repeatable).
    #[arg(long = "state")]
    states: Vec<String>,
    /// Only sessions with this label `KEY=VALUE` (repeatable).
    #[arg(long = "label", value_parser = parse_pair)]
    labels: Vec<(String, String)>,
    /// Only sessions of this kind (repeatable).
    #[arg(long = "kind")]
    kinds: Vec<String>,
    /// `local` (this node) or `cluster` (every member: a NODE column, and a line on stderr for
    /// each member that did not answer; its open sessions show as `unreachable`).
    #[arg(long, default_value = "local", value_parser = ["local", "cluster"])]
    scope: String,
    /// At most this many (per node with --scope cluster).
    #[arg(long, default_value_t = 50)]
    limit: usize,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
pub(super) struct IdArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// The session id.
    id: String,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
pub(super) struct LogsArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// The session id.
    id: String,
    /// Keep printing until the run ends.
    #[arg(long, short)]
    follow: bool,
}

fn parse_pair(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(key, value)| (key.to_owned(), value.to_owned()))
        .filter(|(key, _)| !key.is_empty())
        .ok_or_else(|| format!("{text:?}: expected KEY=VALUE"))
}

pub(super) async fn run(command: SessionCommand) -> anyhow::Result<ExitCode> {
    match command {
        SessionCommand::Spawn(args) => {
            let (program, rest) = args
                .command
                .split_first()
                .context("nothing to run: give the program after `--`")?;
            let mut body = json!({
                "kind": "command",
                "program": program,
                "args": rest,
                "env": args.env.into_iter().collect::<BTreeMap<_, _>>(),
            });
            spawn(&args.client, &args.options, &mut body).await
        }
        SessionCommand::Aider(args) => {
            let mut body = json!({
                "kind": "aider",
                "message": args.message,
                "files": args.files,
                "model": args.model,
                "git": args.git,
            });
            spawn(&args.client, &args.options, &mut body).await
        }
        SessionCommand::List(args) => list(args).await,
        SessionCommand::Show(args) => {
            let client = NodeClient::new(&args.client)?;
            let record = get_json(&client, &format!("/v1/sessions/{}", args.id)).await?;
            print_record(&record, args.json);
            Ok(ExitCode::SUCCESS)
        }
        SessionCommand::Cancel(args) => {
            let client = NodeClient::new(&args.client)?;
            let path = format!("/v1/sessions/{}", args.id);
            let response = client
                .send(client.method(reqwest::Method::DELETE, &path))
                .await?;
            let record: Value = check(response).await?.json().await?;
            print_record(&record, args.json);
            Ok(ExitCode::SUCCESS)
        }
        SessionCommand::Logs(args) => {
            let client = NodeClient::new(&args.client)?;
            let state = print_output(&client, &args.id, args.follow, None).await?;
            Ok(match state {
                Some(state) if args.follow => exit_code_for(&state, None),
                _ => ExitCode::SUCCESS,
            })
        }
    }
}

async fn spawn(
    client_args: &ClientArgs,
    options: &SpawnOptions,
    body: &mut Value,
) -> anyhow::Result<ExitCode> {
    let client = NodeClient::new(client_args)?;
    if let Some(timeout) = options.timeout {
        body["timeout_secs"] = json!(timeout);
    }
    if let Some(priority) = options.priority {
        body["priority"] = json!(priority);
    }
    if let Some(workdir) = &options.workdir {
        body["workdir"] = json!(workdir);
    }
    if !options.labels.is_empty() {
        body["labels"] = json!(options.labels.iter().cloned().collect::<BTreeMap<_, _>>());
    }
    if let Some(key) = &options.idempotency_key {
        body["idempotency_key"] = json!(key);
    }
    if let Some(node) = &options.on {
        body["node"] = json!(node);
    }
    if let Some(strategy) = &options.placement {
        body["placement"] = if options.constraints.is_empty() {
            json!(strategy)
        } else {
            json!({
                "strategy": strategy,
                "labels": options.constraints.iter().cloned().collect::<BTreeMap<_, _>>(),
            })
        };
    }
    let response = client
        .send(
            client
                .method(reqwest::Method::POST, "/v1/sessions")
                .json(body),
        )
        .await?;
    let record: Value = check(response).await?.json().await?;
    let id = record["id"]
        .as_str()
        .context("the node answered without a session id")?
        .to_owned();
    if options.detach {
        if options.json {
            println!("{}", serde_json::to_string_pretty(&record)?);
        } else {
            println!("{id}");
        }
        return Ok(ExitCode::SUCCESS);
    }
    let spinner = (std::io::stderr().is_terminal() && !options.json).then(|| {
        let spinner = indicatif::ProgressBar::new_spinner();
        spinner.set_message(format!("{id}: {}", describe_state(&record)));
        spinner.enable_steady_tick(Duration::from_millis(120));
        spinner
    });
    let state = print_output(&client, &id, true, spinner.as_ref()).await?;
    let final_record = get_json(&client, &format!("/v1/sessions/{id}")).await?;
    if let Some(spinner) = spinner {
        spinner.finish_and_clear();
    }
    let state = state.unwrap_or_else(|| {
        final_record["state"]
            .as_str()
            .unwrap_or("unknown")
            .to_owned()
    });
    if options.json {
        println!("{}", serde_json::to_string_pretty(&final_record)?);
    } else if state != "succeeded" {
        eprintln!(
            "troupe: session {id} {state}{}",
            final_record["reason"]
                .as_str()
                .map(|reason| format!(": {reason}"))
                .unwrap_or_default()
        );
    }
    Ok(exit_code_for(&state, final_record["exit_code"].as_i64()))
}

fn describe_state(record: &Value) -> String {
    match (record["state"].as_str(), record["queue_position"].as_u64()) {
        (Some("queued"), Some(position)) => format!("queued (position {position})"),
        (Some(state), _) => state.to_owned(),
        _ => "unknown".into(),
    }
}

/// The process exit code for a session that ended in `state`.
fn exit_code_for(state: &str, code: Option<i64>) -> ExitCode {
    match (state, code) {
        ("succeeded", _) => ExitCode::SUCCESS,
        ("timed_out", _) => ExitCode::from(124),
        ("cancelled", _) => ExitCode::from(130),
        (_, Some(code)) => ExitCode::from(u8::try_from(code).unwrap_or(1).max(1)),
        _ => ExitCode::FAILURE,
    }
}

/// Prints output lines (following until the end when `follow`); returns the final state when
/// the stream said.
async fn print_output(
    client: &NodeClient,
    id: &str,
    follow: bool,
    spinner: Option<&indicatif::ProgressBar>,
) -> anyhow::Result<Option<String>> {
    if !follow {
        let mut offset = 0u64;
        loop {
            let page = get_json(
                client,
                &format!("/v1/sessions/{id}/output?offset={offset}&limit=1000"),
            )
            .await?;
            let lines = page["lines"].as_array().cloned().unwrap_or_default();
            for line in &lines {
                print_line(line, spinner);
            }
            if lines.is_empty() {
                return Ok(None);
            }
            offset = page["next_offset"].as_u64().unwrap_or(offset);
        }
    }
    let response = client
        .send(client.get(&format!("/v1/sessions/{id}/output?follow=true")))
        .await?;
    let mut events = check(response).await?.bytes_stream().eventsource();
    while let Some(event) = events.next().await {
        let event = event.context("the output stream broke")?;
        let data: Value = serde_json::from_str(&event.data).unwrap_or(Value::Null);
        match event.event.as_str() {
            "end" => return Ok(data["state"].as_str().map(str::to_owned)),
            "error" => bail!(
                "{}",
                data["message"]
                    .as_str()
                    .unwrap_or("the output stream failed")
            ),
            _ => print_line(&data, spinner),
        }
    }
    Ok(None)
}

fn print_line(line: &Value, spinner: Option<&indicatif::ProgressBar>) {
    let text = line["text"].as_str().unwrap_or_default();
    let on_stderr = line["stream"] == "stderr";
    let print = || {
        if on_stderr {
            eprintln!("{text}");
        } else {
            println!("{text}");
        }
    };
    match spinner {
        Some(spinner) => spinner.suspend(print),
        None => print(),
    }
}

async fn get_json(client: &NodeClient, path: &str) -> anyhow::Result<Value> {
    let response = client.send(client.get(path)).await?;
    Ok(check(response).await?.json().await?)
}

async fn list(args: ListArgs) -> anyhow::Result<ExitCode> {
    let client = NodeClient::new(&args.client)?;
    let mut query = form_urlencoded::Serializer::new(String::new());
    for state in &args.states {
        query.append_pair("state", state);
    }
    for (key, value) in &args.labels {
        query.append_pair("label", &format!("{key}={value}"));
    }
    for kind in &args.kinds {
        query.append_pair("kind", kind);
    }
    query.append_pair("limit", &args.limit.clamp(1, 1000).to_string());
    let cluster = args.scope == "cluster";
    if cluster {
        query.append_pair("scope", "cluster");
    }
    let page = get_json(&client, &format!("/v1/sessions?{}", query.finish())).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&page)?);
        return Ok(ExitCode::SUCCESS);
    }
    if let Some(nodes) = page["nodes"].as_object() {
        for (node, status) in nodes {
            if status != "ok" {
                eprintln!(
                    "troupe: node {node}: {}",
                    status.as_str().unwrap_or("no answer")
                );
            }
        }
    }
    for record in page["sessions"].as_array().into_iter().flatten() {
        let command = match record["kind"].as_str() {
            Some("command") => {
                let mut words = vec![record["spec"]["program"].as_str().unwrap_or("").to_owned()];
                words.extend(
                    record["spec"]["args"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|arg| arg.as_str().map(str::to_owned)),
                );
                words.join(" ")
            }
            Some("aider") => format!(
                "aider: {}",
                record["spec"]["message"].as_str().unwrap_or("")
            ),
            Some(other) => other.to_owned(),
            None => String::new(),
        };
        let command: String = command.chars().take(60).collect();
        let node = if cluster {
            format!("{:<12} ", record["node"].as_str().unwrap_or("?"))
        } else {
            String::new()
        };
        println!(
            "{:<20} {node}{:<11} {:<28} {}",
            record["id"].as_str().unwrap_or("?"),
            record["state"].as_str().unwrap_or("?"),
            record["created_at"].as_str().unwrap_or(""),
            command
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn print_record(record: &Value, json: bool) {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(record).unwrap_or_default()
        );
        return;
    }
    let field = |name: &str| match &record[name] {
        Value::Null => "-".to_owned(),
        Value::String(text) => text.clone(),
        other => other.to_string(),
    };
    println!("{}", field("id"));
    for name in [
        "state",
        "kind",
        "node",
        "created_at",
        "started_at",
        "ended_at",
        "exit_code",
        "signal",
        "reason",
        "queue_position",
        "pid",
        "labels",
    ] {
        println!("  {name:<15} {}", field(name));
    }
    println!("  {:<15} {}", "spec", record["spec"]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_the_final_state() {
        assert_eq!(exit_code_for("succeeded", Some(0)), ExitCode::SUCCESS);
        assert_eq!(exit_code_for("failed", Some(3)), ExitCode::from(3));
        assert_eq!(exit_code_for("failed", None), ExitCode::FAILURE);
        assert_eq!(exit_code_for("failed", Some(300)), ExitCode::FAILURE);
        assert_eq!(exit_code_for("timed_out", None), ExitCode::from(124));
        assert_eq!(exit_code_for("cancelled", None), ExitCode::from(130));
    }

    #[test]
    fn pairs_need_a_key_and_an_equals_sign() {
        assert_eq!(parse_pair("team=web"), Ok(("team".into(), "web".into())));
        assert_eq!(parse_pair("k=a=b"), Ok(("k".into(), "a=b".into())));
        assert!(parse_pair("nope").is_err());
        assert!(parse_pair("=v").is_err());
    }
}
