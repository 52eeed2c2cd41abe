//! `troupe session …`: spawn a session and watch it, spawn Aider, list, show, cancel, read logs.
//!
//! `spawn` without `--detach` streams the run's output as it comes and exits with the run's
//! exit code (124 when it timed out, 130 when it was cancelled, 1 for any other failure without
//! a code). Meanwhile it shows the session's state on stderr as it changes — queued (with its
//! position), starting, running, then the end — as a spinner on a terminal and as plain lines
//! otherwise. The state comes from the node's event stream (`GET /v1/events`) and the record it
//! prompts a re-read of, never from polling. `logs --follow` ends with the run too, with the same
//! exit code. Both read on past the `error` events of the output stream and reopen it after the
//! last line printed when it ends before the run did (up to 5 times in a row without a new line).
//!
//! In a cluster, `spawn --on NODE` or `--placement least_loaded [--constraint KEY=VALUE]…`
//! chooses where the session runs, `list --scope cluster` lists every member's sessions, and
//! `show`, `cancel` and `logs` reach a session on any member: the node asked routes them.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use futures::{FutureExt, StreamExt};
use serde_json::{Value, json};

use troupe_actors::session::SessionState;

use super::client::{ClientArgs, NodeClient, check, sse_events};
use super::out::outln;

/// `troupe session` commands.
#[derive(Debug, clap::Subcommand)]
pub(super) enum SessionCommand {
    /// Run a program as a session: `troupe session spawn -- PROGRAM ARGS…`.
    ///
    /// Without --detach it follows the run and exits with the run's exit code: 124 when it
    /// timed out, 130 when it was cancelled, 1 for any other failure without a code.
    Spawn(SpawnArgs),
    /// Run Aider non-interactively as a session.
    ///
    /// Without --detach it follows the run and exits as `spawn` does.
    Aider(AiderArgs),
    /// List sessions, newest first.
    List(ListArgs),
    /// Show one session.
    Show(IdArgs),
    /// Cancel a session (SIGTERM to its process group, SIGKILL after the grace period).
    Cancel(IdArgs),
    /// Print a session's output.
    ///
    /// With --follow it exits with the run's exit code, as `spawn` does: 124 when it timed out,
    /// 130 when it was cancelled, 1 for any other failure without a code.
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
    /// Working directory, on the node: relative to its first workspace root (by default the
    /// directory the node was started in, not this command's), or absolute; inside the node's
    /// workspace roots either way.
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
    /// Files to edit, relative to the session's working directory (`--workdir`, on the node).
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
    /// At most this many, 1 to 1000 (per node with --scope cluster).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u16).range(1..=1000))]
    limit: u16,
    /// Go on from where a previous listing stopped (the cursor it printed on stderr).
    #[arg(long)]
    cursor: Option<String>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
pub(super) struct IdArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// The session id.
    #[arg(value_parser = session_id)]
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
    #[arg(value_parser = session_id)]
    id: String,
    /// Keep printing until the run ends, then exit with the run's exit code (as `spawn` does).
    /// A stream that ends before the run is reopened after the last line printed.
    #[arg(long, short)]
    follow: bool,
}

/// A session id as the node writes them; anything else is refused before it is put into a URL
/// path (`../health` or `ID?x` would reach another route, or another session).
fn session_id(text: &str) -> Result<String, String> {
    troupe_actors::ids::SessionId::new(text)
        .map(|id| id.as_str().to_owned())
        .map_err(|error| format!("{error} (`troupe session list` shows the ids)"))
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
            print_record(&record, args.json)?;
            Ok(ExitCode::SUCCESS)
        }
        SessionCommand::Cancel(args) => {
            let client = NodeClient::new(&args.client)?;
            let path = format!("/v1/sessions/{}", args.id);
            let response = client
                .fetch(client.method(reqwest::Method::DELETE, &path))
                .await?;
            let record: Value = check(response).await?.json().await?;
            print_record(&record, args.json)?;
            if !args.json && matches!(record["state"].as_str(), Some("starting" | "running")) {
                // The record is from before the process went: the group was signalled.
                eprintln!(
                    "cancel requested: SIGTERM sent to its process group (SIGKILL after the \
                     grace period); `troupe session show {}` shows the end",
                    args.id
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        SessionCommand::Logs(args) => {
            let client = NodeClient::new(&args.client)?;
            let state = print_output(&client, &args.id, args.follow, None).await?;
            if !args.follow {
                return Ok(ExitCode::SUCCESS);
            }
            let record = get_json(&client, &format!("/v1/sessions/{}", args.id)).await?;
            let state = state.unwrap_or_else(|| record["state"].as_str().unwrap_or("").to_owned());
            Ok(exit_code_for(&state, record["exit_code"].as_i64()))
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
        .fetch(
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
            outln!("{}", serde_json::to_string_pretty(&record)?)?;
        } else {
            outln!("{id}")?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    let display = if options.json {
        StateDisplay::Off
    } else if std::io::stderr().is_terminal() {
        let spinner = indicatif::ProgressBar::new_spinner();
        spinner.set_message(id.clone());
        spinner.enable_steady_tick(Duration::from_millis(120));
        StateDisplay::Spinner(spinner)
    } else {
        StateDisplay::Lines
    };
    let spinner = match &display {
        StateDisplay::Spinner(spinner) => Some(spinner.clone()),
        _ => None,
    };
    let mut shown = ShownState::new(id.clone(), display);
    // The answer to the spawn: a session sent to run at once is still `queued` in it, but has
    // no queue position.
    shown.show(describe_state(&record));
    let mut watching = !matches!(shown.display, StateDisplay::Off);
    let state = {
        let output = print_output(&client, &id, true, spinner.as_ref());
        let node = record["node"].as_str().map(str::to_owned);
        let watch = async {
            if let Err(error) = watch_state(&client, &id, node.as_deref(), &mut shown).await {
                shown.note(&format!("its state is not followed any more: {error:#}"));
            }
        };
        tokio::pin!(output, watch);
        loop {
            tokio::select! {
                state = &mut output => break state?,
                () = &mut watch, if watching => watching = false,
            }
        }
    };
    let final_record = get_json(&client, &format!("/v1/sessions/{id}")).await?;
    let state = state.unwrap_or_else(|| {
        final_record["state"]
            .as_str()
            .unwrap_or("unknown")
            .to_owned()
    });
    let reason = final_record["reason"]
        .as_str()
        .map(|reason| format!(": {reason}"))
        .unwrap_or_default();
    shown.finish(&format!("{state}{reason}"));
    if options.json {
        outln!("{}", serde_json::to_string_pretty(&final_record)?)?;
    }
    Ok(exit_code_for(&state, final_record["exit_code"].as_i64()))
}

/// The event kinds that move a session along: into the queue, out of it, to its end.
const STATE_KINDS: [&str; 7] = [
    "session.queued",
    "session.started",
    "session.succeeded",
    "session.failed",
    "session.cancelled",
    "session.timed_out",
    "session.interrupted",
];

/// How many times in a row the state watch reopens a broken event stream before it gives up
/// (the output stream still ends the command).
const WATCH_RECONNECTS: u32 = 5;

/// Follows a session's state on `shown` until it runs or ends: the end itself comes with the
/// output stream. Subscribes to the state events of the session's node first and reads the
/// record afterwards, so no change falls between the two. While the session is queued, a state
/// event of another session of its node (a start, an end, a newcomer of higher priority) may
/// move its position, and prompts one re-read of the record; events that arrived meanwhile are
/// taken together. A broken stream is reopened (the record is read again), a refused one ends
/// the watch.
async fn watch_state(
    client: &NodeClient,
    id: &str,
    node: Option<&str>,
    shown: &mut ShownState,
) -> anyhow::Result<()> {
    let mut query = form_urlencoded::Serializer::new(String::new());
    for kind in STATE_KINDS {
        query.append_pair("kind", kind);
    }
    if let Some(node) = node {
        query.append_pair("node", node);
    }
    let path = format!("/v1/events?{}", query.finish());
    let record_path = format!("/v1/sessions/{id}");
    let mut failures = 0;
    loop {
        let response = check(client.send(client.get(&path)).await?).await?;
        let mut events = sse_events(client, response);
        if shown.show(describe_state(&get_json(client, &record_path).await?)) {
            return Ok(());
        }
        loop {
            let Some(Ok(first)) = events.next().await else {
                break;
            };
            failures = 0;
            // Whatever else has already arrived is handled with it.
            let mut batch = vec![first];
            while let Some(Some(Ok(event))) = events.next().now_or_never() {
                batch.push(event);
            }
            let mut others = false;
            for event in batch {
                let event: Value = serde_json::from_str(&event.data).unwrap_or(Value::Null);
                if event["session"] != id {
                    others |= event["kind"].is_string();
                    continue;
                }
                let (kind, position) = (event["kind"].as_str(), event["data"]["position"].as_u64());
                let done = match (kind, position) {
                    (Some("session.queued"), Some(position)) if position > 0 => {
                        shown.show(queued_at(position))
                    }
                    (Some("session.queued"), _) => shown.show(StateText::starting()),
                    (Some("session.started"), _) => shown.show(StateText::running()),
                    // Ended: the output stream says how.
                    _ => true,
                };
                if done {
                    return Ok(());
                }
            }
            if others
                && shown.queued()
                && shown.show(describe_state(&get_json(client, &record_path).await?))
            {
                return Ok(());
            }
        }
        failures += 1;
        if failures > WATCH_RECONNECTS {
            bail!("the event stream broke {failures} times in a row");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Where a session is, as shown: a rank that only grows (queued, starting, running, ended) and
/// its words.
#[derive(Debug, Clone, PartialEq, Eq)]
struct StateText {
    rank: u8,
    text: String,
}

impl StateText {
    const QUEUED: u8 = 0;
    const STARTING: u8 = 1;
    const RUNNING: u8 = 2;
    const ENDED: u8 = 3;

    fn starting() -> Self {
        Self {
            rank: Self::STARTING,
            text: "starting".into(),
        }
    }

    fn running() -> Self {
        Self {
            rank: Self::RUNNING,
            text: "running".into(),
        }
    }
}

fn queued_at(position: u64) -> StateText {
    StateText {
        rank: StateText::QUEUED,
        text: format!("queued (position {position})"),
    }
}

/// The state of a session record. A `queued` record without a queue position has left the
/// queue: the node is starting it.
fn describe_state(record: &Value) -> StateText {
    let text = |rank: u8, text: &str| StateText {
        rank,
        text: text.to_owned(),
    };
    match (record["state"].as_str(), record["queue_position"].as_u64()) {
        (Some("queued"), Some(position)) => queued_at(position),
        (Some("queued" | "starting"), None) => StateText::starting(),
        (Some("running"), _) => StateText::running(),
        (Some(state @ ("succeeded" | "failed" | "cancelled" | "timed_out" | "interrupted")), _) => {
            text(StateText::ENDED, state)
        }
        // `unreachable` (its node is down, in a cluster) or a state this CLI does not know.
        (Some(state), _) => text(StateText::RUNNING, state),
        (None, _) => text(StateText::QUEUED, "unknown"),
    }
}

/// Where the state of a followed session goes (stderr): a spinner on a terminal, plain lines
/// otherwise, or nowhere (`--json`).
enum StateDisplay {
    Spinner(indicatif::ProgressBar),
    Lines,
    Off,
}

/// The state shown so far. It never goes back: a record read late cannot undo a newer event.
struct ShownState {
    id: String,
    display: StateDisplay,
    current: Option<StateText>,
}

impl ShownState {
    fn new(id: String, display: StateDisplay) -> Self {
        Self {
            id,
            display,
            current: None,
        }
    }

    fn queued(&self) -> bool {
        self.current
            .as_ref()
            .is_some_and(|current| current.rank == StateText::QUEUED)
    }

    /// Shows `state` if it is news; returns whether the session has left the queue for good
    /// (running or ended), after which only its end remains to be shown.
    fn show(&mut self, state: StateText) -> bool {
        let news = match &self.current {
            None => true,
            Some(current) => {
                state.rank > current.rank
                    || (state.rank == current.rank && state.text != current.text)
            }
        };
        if news {
            match &self.display {
                StateDisplay::Spinner(spinner) => {
                    spinner.set_message(format!("{}: {}", self.id, state.text));
                }
                StateDisplay::Lines => eprintln!("troupe: session {} {}", self.id, state.text),
                StateDisplay::Off => {}
            }
            self.current = Some(state);
        }
        self.current
            .as_ref()
            .is_some_and(|current| current.rank >= StateText::RUNNING)
    }

    /// Prints a remark about the session.
    fn note(&self, text: &str) {
        let line = || eprintln!("troupe: session {}: {text}", self.id);
        match &self.display {
            StateDisplay::Spinner(spinner) => spinner.suspend(line),
            StateDisplay::Lines => line(),
            StateDisplay::Off => {}
        }
    }

    /// Clears the spinner and prints the final state.
    fn finish(self, end: &str) {
        match self.display {
            StateDisplay::Spinner(spinner) => {
                spinner.finish_and_clear();
                eprintln!("troupe: session {} {end}", self.id);
            }
            StateDisplay::Lines => eprintln!("troupe: session {} {end}", self.id),
            StateDisplay::Off => {}
        }
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
                print_line(line, spinner)?;
            }
            if lines.is_empty() {
                return Ok(None);
            }
            offset = page["next_offset"].as_u64().unwrap_or(offset);
        }
    }
    let follower = OutputFollower {
        client,
        id,
        spinner,
        offset: 0,
        reconnects: Reconnects::default(),
        opened: false,
    };
    follower.run().await.map(Some)
}

/// How many times in a row an output stream that ends before the run did is reopened without
/// a new line in between, before the follower gives up.
const OUTPUT_RECONNECTS: u32 = 5;

/// When a followed output stream is reopened: after 0.5, 1, 2, 4 and 8 s, then never; a new
/// line starts the count again.
#[derive(Debug, Default)]
struct Reconnects {
    failures: u32,
}

impl Reconnects {
    /// The stream ended early: how long to wait before reopening it, or `None` to give up.
    fn failed(&mut self) -> Option<Duration> {
        self.failures += 1;
        (self.failures <= OUTPUT_RECONNECTS)
            .then(|| Duration::from_millis(500) * (1 << (self.failures - 1)))
    }

    /// A line came through.
    fn progressed(&mut self) {
        self.failures = 0;
    }
}

/// Why a followed output stream stopped before saying the run ended.
enum StreamCut {
    /// Reopening will not help (the node refused the request, stdout is closed).
    Fatal(anyhow::Error),
    /// The stream could not be opened (a server error, no connection), broke or ended.
    Transient(anyhow::Error),
}

/// Follows a session's output live (`logs --follow`, `spawn`), reopening its stream when it
/// ends before the run did.
struct OutputFollower<'a> {
    client: &'a NodeClient,
    id: &'a str,
    spinner: Option<&'a indicatif::ProgressBar>,
    /// The last line printed: a reopened stream starts after it.
    offset: u64,
    reconnects: Reconnects,
    /// Whether a stream was ever opened: one that never was (no node, no such session) is an
    /// error at once, not something to wait for.
    opened: bool,
}

impl OutputFollower<'_> {
    /// Prints the output until the run ends; returns its final state.
    async fn run(mut self) -> anyhow::Result<String> {
        loop {
            let cut = match self.follow_once().await {
                Ok(state) => return Ok(state),
                Err(StreamCut::Fatal(error)) => return Err(error),
                Err(StreamCut::Transient(error)) if !self.opened => return Err(error),
                Err(StreamCut::Transient(error)) => error,
            };
            let Some(pause) = self.reconnects.failed() else {
                bail!(
                    "the output stream ended early {} times in a row without a new line; \
                     stopped following (last: {cut:#})",
                    self.reconnects.failures
                );
            };
            self.note(&format!(
                "{cut:#}; resuming after line {} in {}s",
                self.offset,
                pause.as_secs_f32()
            ));
            tokio::time::sleep(pause).await;
        }
    }

    /// A remark on stderr (above the spinner, if there is one).
    fn note(&self, text: &str) {
        let line = || eprintln!("troupe: session {}: {text}", self.id);
        match self.spinner {
            Some(spinner) => spinner.suspend(line),
            None => line(),
        }
    }

    /// Follows the output once, after line `offset` (moved along as lines are printed), until
    /// its `end` event says the run ended: returns the final state. The node's `error` events
    /// are shown and the stream read on: the node retries a failed read of its store, and an
    /// `error` that is the last event (the session's owner went away, the node gave up on its
    /// store) is followed by the end of the stream. An `end` whose state is not final (the node
    /// gave up reading its store while the run went on) ends this stream only.
    async fn follow_once(&mut self) -> Result<String, StreamCut> {
        let client = self.client;
        let path = format!(
            "/v1/sessions/{}/output?follow=true&offset={}",
            self.id, self.offset
        );
        let response = client
            .send(client.get(&path))
            .await
            .map_err(StreamCut::Transient)?;
        // Worth another try: the node is busy or its store failing (5xx), or this token's
        // request rate was passed (429; the reopen waits anyway) or the request timed out (408).
        let status = response.status();
        let transient = status.is_server_error()
            || status == reqwest::StatusCode::TOO_MANY_REQUESTS
            || status == reqwest::StatusCode::REQUEST_TIMEOUT;
        let response = check(response).await.map_err(|error| {
            if transient {
                StreamCut::Transient(error)
            } else {
                StreamCut::Fatal(error)
            }
        })?;
        self.opened = true;
        let mut events = sse_events(client, response);
        while let Some(event) = events.next().await {
            let event = event
                .context("the output stream broke")
                .map_err(StreamCut::Transient)?;
            let data: Value = serde_json::from_str(&event.data).unwrap_or(Value::Null);
            match event.event.as_str() {
                "end" => {
                    let state = data["state"].as_str().unwrap_or("unknown");
                    if state
                        .parse::<SessionState>()
                        .is_ok_and(SessionState::is_terminal)
                    {
                        return Ok(state.to_owned());
                    }
                    return Err(StreamCut::Transient(anyhow::anyhow!(
                        "the output stream ended while the session was {state}"
                    )));
                }
                "error" => self.note(&format!(
                    "the output stream reported: {}",
                    data["message"].as_str().unwrap_or("an error")
                )),
                _ => {
                    let line = data["line"].as_u64();
                    if line.is_some_and(|line| line <= self.offset) {
                        continue;
                    }
                    print_line(&data, self.spinner).map_err(StreamCut::Fatal)?;
                    if let Some(line) = line {
                        self.offset = line;
                    }
                    self.reconnects.progressed();
                }
            }
        }
        Err(StreamCut::Transient(anyhow::anyhow!(
            "the output stream ended before the run did"
        )))
    }
}

fn print_line(line: &Value, spinner: Option<&indicatif::ProgressBar>) -> anyhow::Result<()> {
    let text = line["text"].as_str().unwrap_or_default();
    let on_stderr = line["stream"] == "stderr";
    let print = || {
        if on_stderr {
            eprintln!("{text}");
            Ok(())
        } else {
            outln!("{text}")
        }
    };
    match spinner {
        Some(spinner) => spinner.suspend(print),
        None => print(),
    }
}

async fn get_json(client: &NodeClient, path: &str) -> anyhow::Result<Value> {
    let response = client.fetch(client.get(path)).await?;
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
    query.append_pair("limit", &args.limit.to_string());
    if let Some(cursor) = &args.cursor {
        query.append_pair("cursor", cursor);
    }
    let cluster = args.scope == "cluster";
    if cluster {
        query.append_pair("scope", "cluster");
    }
    let page = get_json(&client, &format!("/v1/sessions?{}", query.finish())).await?;
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&page)?)?;
        note_next_page(&page);
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
        outln!(
            "{:<20} {node}{:<11} {:<28} {}",
            record["id"].as_str().unwrap_or("?"),
            record["state"].as_str().unwrap_or("?"),
            record["created_at"].as_str().unwrap_or(""),
            command
        )?;
    }
    note_next_page(&page);
    Ok(ExitCode::SUCCESS)
}

/// Says on stderr, when a listing page has a `next_cursor`, that the listing goes on and how
/// to get the rest: a page holds at most `limit` sessions, and examines at most 10,000 (a page
/// of a narrow filter may hold fewer, or none, though more match further on).
fn note_next_page(page: &Value) {
    if let Some(cursor) = page["next_cursor"].as_str() {
        eprintln!(
            "troupe: the listing goes on: run the same command with --cursor {cursor} for the \
             next page"
        );
    }
    // A cluster listing has no cursor of its own: each node's listing that went on says where.
    for (node, cursor) in page["next_cursors"].as_object().into_iter().flatten() {
        if let Some(cursor) = cursor.as_str() {
            eprintln!(
                "troupe: node {node} has more sessions: list them on that node with --scope local \
                 --cursor {cursor}"
            );
        }
    }
}

fn print_record(record: &Value, json: bool) -> anyhow::Result<()> {
    if json {
        return outln!("{}", serde_json::to_string_pretty(record)?);
    }
    let field = |name: &str| match &record[name] {
        Value::Null => "-".to_owned(),
        Value::String(text) => text.clone(),
        other => other.to_string(),
    };
    outln!("{}", field("id"))?;
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
        outln!("  {name:<15} {}", field(name))?;
    }
    outln!("  {:<15} {}", "spec", record["spec"])
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
    fn records_read_as_the_states_a_follower_shows() {
        let shown = |record: Value| describe_state(&record).text;
        assert_eq!(
            shown(json!({"state": "queued", "queue_position": 2})),
            "queued (position 2)"
        );
        // Off the queue (or sent to run at once by the spawn's answer): being started.
        assert_eq!(
            shown(json!({"state": "queued", "queue_position": null})),
            "starting"
        );
        assert_eq!(shown(json!({"state": "starting"})), "starting");
        assert_eq!(shown(json!({"state": "running"})), "running");
        assert_eq!(shown(json!({"state": "timed_out"})), "timed_out");
        assert_eq!(shown(json!({"state": "unreachable"})), "unreachable");
    }

    #[test]
    fn the_shown_state_only_moves_forward() {
        let mut shown = ShownState::new("s-1".into(), StateDisplay::Off);
        assert!(!shown.show(queued_at(3)));
        assert!(shown.queued());
        // The position moves up while queued.
        assert!(!shown.show(queued_at(1)));
        assert_eq!(shown.current.as_ref().unwrap().text, "queued (position 1)");
        assert!(!shown.show(StateText::starting()));
        assert!(!shown.queued());
        // A record read before the start cannot put it back in the queue.
        assert!(!shown.show(queued_at(1)));
        assert_eq!(shown.current.as_ref().unwrap().text, "starting");
        assert!(
            shown.show(StateText::running()),
            "running: nothing more to watch"
        );
        assert!(shown.show(StateText::starting()));
        assert_eq!(shown.current.as_ref().unwrap().text, "running");
    }

    #[test]
    fn session_ids_that_would_change_the_url_are_refused() {
        assert_eq!(
            session_id("s-01jq2k3m4n5p6q7r").unwrap(),
            "s-01jq2k3m4n5p6q7r"
        );
        for bad in [
            "../health",
            "x?y",
            "a/b",
            "x#y",
            "%2e%2e",
            "",
            "../../v1/admin/faults",
        ] {
            let error = session_id(bad).unwrap_err();
            assert!(error.contains("invalid session id"), "{bad}: {error}");
        }
    }

    #[test]
    fn an_output_stream_is_reopened_after_growing_pauses_until_a_line_comes() {
        let mut reconnects = Reconnects::default();
        let pauses: Vec<_> = std::iter::from_fn(|| reconnects.failed()).collect();
        assert_eq!(
            pauses,
            [500, 1000, 2000, 4000, 8000].map(Duration::from_millis),
            "then it gives up"
        );
        reconnects.progressed();
        assert_eq!(reconnects.failed(), Some(Duration::from_millis(500)));
    }

    #[test]
    fn pairs_need_a_key_and_an_equals_sign() {
        assert_eq!(parse_pair("team=web"), Ok(("team".into(), "web".into())));
        assert_eq!(parse_pair("k=a=b"), Ok(("k".into(), "a=b".into())));
        assert!(parse_pair("nope").is_err());
        assert!(parse_pair("=v").is_err());
    }
}
