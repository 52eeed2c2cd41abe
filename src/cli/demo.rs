//! `troupe demo`: a three-node cluster on loopback, narrated, in about a minute. The nodes are
//! child processes of this program (see [`super::loopback`]) with certificates made in a scratch
//! directory, the `fast` membership profile and fault injection on. The demo spawns sessions
//! across them through node a, makes a session actor on b panic, kills c with SIGKILL, brings
//! it back and stops b cleanly, printing node a's event stream as it goes: gossip
//! (`node.joined`), relay (the events of b and c), a supervised restart (`actor.restarted`) and
//! failure detection (`node.suspected`, `node.down`). It removes its scratch directory and
//! stops its nodes when it ends, fails, or gets Ctrl-C.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, bail};
use futures::StreamExt as _;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::time::Instant;
use troupe_actors::ids::Timestamp;

use super::client::{ClientArgs, NodeClient, check, sse_events};
use super::loopback::{NodeChild, Scratch, make_certificates, node_config};
use super::out::outln;
use crate::config::{ClusterProfile, Config};

/// `troupe demo` options.
#[derive(Debug, clap::Args)]
pub(super) struct DemoArgs {
    /// Seconds to wait after each step while the events print (0 to 60; 0 runs straight
    /// through).
    #[arg(long, default_value = "8", value_parser = parse_pause)]
    pause: Duration,
}

fn parse_pause(text: &str) -> Result<Duration, String> {
    let secs: f64 = text
        .parse()
        .map_err(|_| format!("{text:?} is not a number of seconds"))?;
    if !(0.0..=60.0).contains(&secs) {
        return Err(format!("{secs} is not between 0 and 60 seconds"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// How many steps the demo has.
const STEPS: usize = 8;
/// Bound of every wait for an event or an answer.
const WAIT: Duration = Duration::from_secs(30);
/// A session's program: a line every 2 s, for at most 3 minutes.
const TICKS: &str = "i=0; while [ $i -lt 90 ]; do i=$((i+1)); echo \"tick $i\"; sleep 2; done";

pub(super) async fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    crate::tls::install_default_provider();
    let signal = super::node::shutdown_signal()?;
    let scratch = Scratch::create("troupe-demo")?;
    outln!(
        "troupe demo: three nodes on loopback, as child processes of this program.\n\
         Scratch directory: {} (removed at the end). Ctrl-C stops the demo and cleans up.",
        scratch.path().display()
    )?;
    let mut demo = Demo {
        config: DemoConfig {
            root: scratch.path().to_owned(),
        },
        pause: args.pause,
        nodes: BTreeMap::new(),
        watch: None,
        step: 0,
    };
    let outcome = tokio::select! {
        outcome = demo.script() => Some(outcome),
        () = signal => None,
    };
    let result = match outcome {
        Some(Ok(())) => Ok(ExitCode::SUCCESS),
        Some(Err(error)) => {
            let _ = outln!(
                "\nThe demo stopped at step {}/{STEPS}: {error:#}",
                demo.step
            );
            for node in demo.nodes.values() {
                let log = node.child.log_tail();
                if !log.is_empty() {
                    let _ = outln!(
                        "--- the last log lines of node {} ---\n{log}",
                        node.child.name()
                    );
                }
            }
            Err(error.context("the demo failed"))
        }
        None => {
            let _ = outln!("\nInterrupted.");
            Ok(ExitCode::from(130))
        }
    };
    // Cleaning up goes on whatever became of stdout.
    let _ = outln!("Stopping the nodes (a second Ctrl-C kills them at once).");
    demo.stop_all().await;
    if let Some(watch) = demo.watch.take() {
        watch.task.abort();
    }
    let root = scratch.path().to_owned();
    drop(scratch);
    let _ = outln!("Removed {}.", root.display());
    result
}

struct DemoConfig {
    root: std::path::PathBuf,
}

impl DemoConfig {
    /// Node `name`'s configuration: fast profile, fault injection on.
    fn node(&self, name: &str, seeds: Vec<std::net::SocketAddr>) -> anyhow::Result<Config> {
        let mut config = node_config(&self.root, name, seeds, ClusterProfile::Fast)?;
        config.debug.fault_injection = true;
        Ok(config)
    }
}

/// A node of the demo and a client of its HTTP API.
struct DemoNode {
    child: NodeChild,
    client: NodeClient,
}

impl DemoNode {
    async fn start(config: Config) -> anyhow::Result<Self> {
        let child = NodeChild::start(config, true).await?;
        let http = child.http().context("the node serves no HTTP")?;
        let client = NodeClient::new(&ClientArgs {
            url: format!("http://{http}"),
            token: None,
            data_dir: Some(child.data_dir().to_owned()),
            request_timeout: None,
        })?;
        Ok(Self { child, client })
    }

    fn describe(&self) -> String {
        format!(
            "node {}: pid {}, HTTP {}, cluster (QUIC) {}",
            self.child.name(),
            self.child.pid(),
            self.client.base(),
            self.child.cluster()
        )
    }

    /// Sends a request and returns the JSON answer of a successful one.
    async fn call(&self, request: reqwest::RequestBuilder) -> anyhow::Result<Value> {
        let answer = async {
            let response = check(self.client.send(request).await?).await?;
            Ok::<Value, anyhow::Error>(response.json().await?)
        };
        tokio::time::timeout(WAIT, answer).await.with_context(|| {
            format!(
                "node {} did not answer within {}s",
                self.child.name(),
                WAIT.as_secs()
            )
        })?
    }

    async fn get(&self, path: &str) -> anyhow::Result<Value> {
        self.call(self.client.get(path)).await
    }

    async fn post(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        self.call(self.client.method(reqwest::Method::POST, path).json(body))
            .await
    }

    /// Opens an event stream on this node and keeps it open (dropping it closes it).
    async fn open_stream(&self) -> anyhow::Result<reqwest::Response> {
        let request = self.client.get("/v1/events?kind=node.*&follow=true");
        let response = tokio::time::timeout(WAIT, self.client.send(request))
            .await
            .context("no answer")??;
        check(response).await
    }
}

/// Node a's event stream: printed as it arrives, and kept to wait on.
struct Watch {
    events: mpsc::UnboundedReceiver<Value>,
    seen: Vec<Value>,
    task: tokio::task::JoinHandle<()>,
}

impl Watch {
    async fn start(node: &DemoNode) -> anyhow::Result<Self> {
        let request = node.client.get("/v1/events?follow=true&tail=1000");
        let response = tokio::time::timeout(WAIT, node.client.send(request))
            .await
            .context("node a's event stream did not open")??;
        let response = check(response).await?;
        let watcher = node.child.name().to_owned();
        let (sender, events) = mpsc::unbounded_channel();
        let mut stream = sse_events(&node.client, response);
        let task = tokio::spawn(async move {
            while let Some(message) = stream.next().await {
                let message = match message {
                    Ok(message) => message,
                    Err(error) => {
                        // A closed stdout ends the demo through its own next line.
                        let _ = outln!("  (node {watcher}'s event stream broke: {error})");
                        return;
                    }
                };
                let Ok(event) = serde_json::from_str::<Value>(&message.data) else {
                    continue;
                };
                if let Some(line) = render(&event, &watcher)
                    && outln!("{line}").is_err()
                {
                    return;
                }
                if sender.send(event).is_err() {
                    return;
                }
            }
        });
        Ok(Self {
            events,
            seen: Vec::new(),
            task,
        })
    }

    /// Where the next event will be: waits from here see only later events.
    fn mark(&mut self) -> usize {
        while let Ok(event) = self.events.try_recv() {
            self.seen.push(event);
        }
        self.seen.len()
    }

    /// The first event from index `since` on that matches, waiting up to `timeout` for it;
    /// `None` when none came in time.
    async fn wait_for(
        &mut self,
        since: usize,
        timeout: Duration,
        matches: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<Option<Value>> {
        let deadline = Instant::now() + timeout;
        let mut index = since;
        loop {
            while index < self.seen.len() {
                if matches(&self.seen[index]) {
                    return Ok(Some(self.seen[index].clone()));
                }
                index += 1;
            }
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(event)) => self.seen.push(event),
                Ok(None) => bail!("node a's event stream ended"),
                Err(_) => return Ok(None),
            }
        }
    }

    /// Like [`Watch::wait_for`], but not seeing it within [`WAIT`] is an error naming `what`.
    async fn expect(
        &mut self,
        since: usize,
        what: &str,
        matches: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<Value> {
        self.wait_for(since, WAIT, matches).await?.with_context(|| {
            format!(
                "{what} did not reach node a's event stream within {}s",
                WAIT.as_secs()
            )
        })
    }
}

/// True when `event` was published by `node` and is of `kind`.
fn is(event: &Value, node: &str, kind: &str) -> bool {
    event["node"] == node && event["kind"] == kind
}

/// Microseconds since the epoch of an event's `at`.
fn at_micros(event: &Value) -> Option<u64> {
    serde_json::from_value::<Timestamp>(event["at"].clone())
        .ok()
        .map(Timestamp::as_micros)
}

fn text(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// One event as a line: `  | HH:MM:SS.mmm  NODE  KIND  details`. The watcher's own link events
/// (the demo's connections) are left out.
fn render(event: &Value, watcher: &str) -> Option<String> {
    let node = event["node"].as_str().unwrap_or("?");
    let kind = event["kind"].as_str().unwrap_or("?");
    if node == watcher && kind.starts_with("link.") {
        return None;
    }
    let at = event["at"]
        .as_str()
        .and_then(|at| at.get(11..23))
        .unwrap_or("");
    let data = &event["data"];
    let session = text(&event["session"]);
    let detail = match kind {
        "node.joined" | "node.suspected" | "node.down" | "node.left" => format!(
            "{} (generation {}, {})",
            text(&data["node"]),
            text(&data["generation"]),
            text(&data["addr"])
        ),
        "session.output" => {
            let lines: Vec<String> = data["lines"]
                .as_array()
                .into_iter()
                .flatten()
                .map(text)
                .collect();
            format!("{session} {}", lines.join(" / "))
        }
        "actor.restarted" => format!(
            "{} restarted by {} (restart {}): {}",
            text(&data["child"]),
            text(&data["supervisor"]),
            text(&data["restart_count"]),
            text(&data["reason"])
        ),
        "link.connected" | "link.disconnected" => format!(
            "{} {} {}",
            text(&data["transport"]),
            text(&data["link"]),
            text(
                data.get("peer")
                    .or(data.get("reason"))
                    .unwrap_or(&Value::Null)
            )
        ),
        _ => {
            let mut compact = data.to_string();
            if compact.len() > 120 {
                let cut = (0..=117).rev().find(|&i| compact.is_char_boundary(i));
                compact.truncate(cut.unwrap_or(0));
                compact.push_str("...");
            }
            if event["session"].is_null() {
                compact
            } else {
                format!("{session} {compact}")
            }
        }
    };
    Some(format!("  | {at}  {node}  {kind:<18} {detail}"))
}

struct Demo {
    config: DemoConfig,
    pause: Duration,
    nodes: BTreeMap<String, DemoNode>,
    watch: Option<Watch>,
    step: usize,
}

impl Demo {
    fn heading(&mut self, title: &str) -> anyhow::Result<()> {
        self.step += 1;
        outln!("\n[{}/{STEPS}] {title}", self.step)
    }

    fn say(&self, text: &str) -> anyhow::Result<()> {
        for line in text.lines() {
            outln!("      {line}")?;
        }
        Ok(())
    }

    /// Lets the events of a step print before the next one.
    async fn pause(&self) {
        if !self.pause.is_zero() {
            tokio::time::sleep(self.pause).await;
        }
    }

    fn node(&self, name: &str) -> anyhow::Result<&DemoNode> {
        self.nodes
            .get(name)
            .with_context(|| format!("node {name} is not running"))
    }

    fn watch(&mut self) -> anyhow::Result<&mut Watch> {
        self.watch
            .as_mut()
            .context("node a's events are not watched")
    }

    async fn script(&mut self) -> anyhow::Result<()> {
        self.certificates()?;
        self.start_nodes().await?;
        self.pause().await;
        self.relay().await?;
        self.pause().await;
        let sessions = self.sessions().await?;
        self.pause().await;
        self.fault(&sessions.on_b).await?;
        self.pause().await;
        self.kill_c().await?;
        self.pause().await;
        self.listing().await?;
        self.pause().await;
        self.rejoin_and_leave(&sessions.on_c).await?;
        outln!(
            "\nDone. Node a saw gossip (node.joined), the events of b and c over the relay, b's \
             supervisor restart a session actor (actor.restarted), and c's failure detected \
             (node.down) after a kill -9."
        )?;
        Ok(())
    }

    fn certificates(&mut self) -> anyhow::Result<()> {
        self.heading("Certificates: one cluster CA, one certificate per node")?;
        make_certificates(&self.config.root, &["a", "b", "c"])?;
        self.say(
            "a/cluster holds the CA and a's certificate; b/cluster and c/cluster were issued from \
             it\n(as `troupe cluster init` and `troupe cluster issue b --out …` do). Nodes talk \
             QUIC with mutual TLS:\na peer without a certificate from this CA is refused.",
        )?;
        Ok(())
    }

    async fn start_nodes(&mut self) -> anyhow::Result<()> {
        self.heading(
            "Three nodes on loopback: a first, then b and c join it (fast failure detection, \
             fault injection on)",
        )?;
        let a = DemoNode::start(self.config.node("a", Vec::new())?).await?;
        self.say(&a.describe())?;
        let seed = a.child.cluster();
        self.say(
            "node a's event stream (GET /v1/events on a) from here on, one event per line:\n\
             time (UTC), the node that published it, kind, details. Events of b and c reach a \
             over the relay.",
        )?;
        self.watch = Some(Watch::start(&a).await?);
        self.nodes.insert("a".into(), a);
        self.say(&format!(
            "starting b and c, each given a's cluster address {seed} to join:"
        ))?;
        let (b, c) = tokio::join!(
            DemoNode::start(self.config.node("b", vec![seed])?),
            DemoNode::start(self.config.node("c", vec![seed])?),
        );
        for node in [b?, c?] {
            self.say(&node.describe())?;
            self.nodes.insert(node.child.name().to_owned(), node);
        }
        let watch = self.watch()?;
        for name in ["b", "c"] {
            watch
                .expect(0, &format!("node.joined of {name} on a"), |event| {
                    is(event, "a", "node.joined") && event["data"]["node"] == name
                })
                .await?;
        }
        // Metadata (HTTP address, load) follows membership by a gossip round: give it up to
        // 5 s so the table shows it.
        let a = self.node("a")?;
        let deadline = Instant::now() + Duration::from_secs(5);
        let members = loop {
            let members = a.get("/v1/cluster/members").await?;
            let described = members["members"]
                .as_array()
                .is_some_and(|all| all.iter().all(|member| member["meta"]["http"].is_string()));
            if described || Instant::now() >= deadline {
                break members;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        self.say(&format!(
            "gossip: a knows b and c. Its member view (troupe cluster members):\n{}",
            super::cluster::members_table(&members)
        ))?;
        Ok(())
    }

    async fn relay(&mut self) -> anyhow::Result<()> {
        self.heading("Relay: every node streams its own events to the others over QUIC")?;
        self.say(
            "opening an event stream on b and on c; the link.connected events they publish \
             reach a:",
        )?;
        let mut streams = Vec::new();
        for name in ["b", "c"] {
            // A relay link comes up a moment after the membership; until then a new event of
            // the node is not relayed. Open streams until one's event arrives.
            let deadline = Instant::now() + WAIT;
            loop {
                let since = self.watch()?.mark();
                streams.push(self.node(name)?.open_stream().await?);
                let seen = self
                    .watch()?
                    .wait_for(since, Duration::from_millis(500), |event| {
                        is(event, name, "link.connected")
                    })
                    .await?;
                if seen.is_some() {
                    break;
                }
                if Instant::now() >= deadline {
                    bail!(
                        "events of node {name} did not reach node a within {}s",
                        WAIT.as_secs()
                    );
                }
            }
        }
        Ok(())
    }

    async fn sessions(&mut self) -> anyhow::Result<Sessions> {
        self.heading("Sessions across the cluster, all asked of node a (POST /v1/sessions on a)")?;
        let a = self.node("a")?;
        let command =
            |script: &str| json!({"kind": "command", "program": "sh", "args": ["-c", script]});
        let mut on_b = command(TICKS);
        on_b["node"] = json!("b");
        let mut on_c = command(TICKS);
        on_c["node"] = json!("c");
        let mut placed = command("echo 'placed by least_loaded'");
        placed["placement"] = json!("least_loaded");
        let mut ids = Vec::new();
        for (body, asked) in [
            (&on_b, "\"node\": \"b\""),
            (&on_c, "\"node\": \"c\""),
            (&placed, "\"placement\": \"least_loaded\""),
        ] {
            let record = a.post("/v1/sessions", body).await?;
            let id = record["id"]
                .as_str()
                .with_context(|| format!("no session id in {record}"))?
                .to_owned();
            let node = text(&record["node"]);
            self.say(&format!(
                "{{{asked}, ...}}  ->  session {id} on node {node}"
            ))?;
            ids.push((id, node));
        }
        let [(on_b, b), (on_c, c), (placed, placed_on)] = <[(String, String); 3]>::try_from(ids)
            .map_err(|_| anyhow::anyhow!("three sessions"))?;
        if b != "b" || c != "c" {
            bail!("the sessions asked for b and c run on {b} and {c}");
        }
        let watch = self.watch()?;
        for (id, node) in [(&on_b, "b"), (&on_c, "c")] {
            watch
                .expect(
                    0,
                    &format!("session.output of {id} from node {node}"),
                    |event| is(event, node, "session.output") && event["session"] == id.as_str(),
                )
                .await?;
        }
        watch
            .expect(
                0,
                &format!("session.succeeded of {placed} from node {placed_on}"),
                |event| {
                    is(event, &placed_on, "session.succeeded")
                        && event["session"] == placed.as_str()
                },
            )
            .await?;
        Ok(Sessions { on_b, on_c })
    }

    async fn fault(&mut self, session: &str) -> anyhow::Result<()> {
        let actor = format!("sessions/{session}");
        self.heading(&format!(
            "A fault on node b: its session actor {actor} panics (POST /v1/admin/faults on b)"
        ))?;
        self.say(
            "b's session supervisor restarts it (actor.restarted, relayed to a); the new \
             instance\nre-attaches to the running process, whose output keeps coming:",
        )?;
        let since = self.watch()?.mark();
        self.node("b")?
            .post(
                "/v1/admin/faults",
                &json!({"actor": actor, "kind": "panic"}),
            )
            .await?;
        let watch = self.watch()?;
        watch
            .expect(
                since,
                &format!("actor.restarted of {actor} from b"),
                |event| {
                    is(event, "b", "actor.restarted") && event["data"]["child"] == actor.as_str()
                },
            )
            .await?;
        let after = watch.mark();
        watch
            .expect(
                after,
                &format!("session.output of {session} from b after the restart"),
                |event| is(event, "b", "session.output") && event["session"] == session,
            )
            .await?;
        Ok(())
    }

    async fn kill_c(&mut self) -> anyhow::Result<()> {
        let pid = self.node("c")?.child.pid();
        self.heading(&format!(
            "Failure detection: kill -9 of node c (pid {pid}): no leave, no goodbye"
        ))?;
        let since = self.watch()?.mark();
        let killed_at = Timestamp::now().as_micros();
        let c = self.nodes.get_mut("c").context("node c is not running")?;
        c.child.kill()?;
        let status = c.child.wait_exit().await?;
        self.say(&format!(
            "c is gone ({status}); a and b stop hearing from it, suspect it, then declare it \
             down:"
        ))?;
        let watch = self.watch()?;
        let mut reports = Vec::new();
        for observer in ["a", "b"] {
            let down = watch
                .expect(since, &format!("node.down of c from {observer}"), |event| {
                    is(event, observer, "node.down") && event["data"]["node"] == "c"
                })
                .await?;
            let suspected = watch
                .wait_for(since, Duration::ZERO, |event| {
                    is(event, observer, "node.suspected") && event["data"]["node"] == "c"
                })
                .await?;
            let after = |event: &Value| {
                at_micros(event).map_or_else(
                    || "?".to_owned(),
                    |at| format!("{:.2} s", at.saturating_sub(killed_at) as f64 / 1e6),
                )
            };
            reports.push(format!(
                "{observer}: {}down after {}{}",
                suspected
                    .as_ref()
                    .map(|event| format!("suspected after {}, ", after(event)))
                    .unwrap_or_default(),
                after(&down),
                if observer == "a" {
                    " (a's own detection)"
                } else {
                    " (b's detection, relayed to a)"
                }
            ));
        }
        self.say(&format!("time from the kill: {}", reports.join("; ")))?;
        Ok(())
    }

    async fn listing(&mut self) -> anyhow::Result<()> {
        self.heading("What node a shows now")?;
        let a = self.node("a")?;
        let listed = a.get("/v1/sessions?scope=cluster").await?;
        let mut table = format!("{:<32} {:<6} {}\n", "SESSION", "NODE", "STATE");
        for session in listed["sessions"].as_array().into_iter().flatten() {
            table.push_str(&format!(
                "{:<32} {:<6} {}\n",
                text(&session["id"]),
                text(&session["node"]),
                text(&session["state"])
            ));
        }
        self.say(&format!(
            "sessions cluster-wide (GET /v1/sessions?scope=cluster); c's cannot be reached:\n{table}"
        ))?;
        let members = a.get("/v1/cluster/members").await?;
        self.say(&format!(
            "members (troupe cluster members):\n{}",
            super::cluster::members_table(&members)
        ))?;
        Ok(())
    }

    async fn rejoin_and_leave(&mut self, on_c: &str) -> anyhow::Result<()> {
        self.heading("c comes back with a new generation; then b stops cleanly and leaves")?;
        let seed = self.node("a")?.child.cluster();
        let since = self.watch()?.mark();
        let c = DemoNode::start(self.config.node("c", vec![seed])?).await?;
        self.say(&format!("{}, joining a again", c.describe()))?;
        self.nodes.insert("c".into(), c);
        let watch = self.watch()?;
        watch
            .expect(since, "node.joined of the restarted c on a", |event| {
                is(event, "a", "node.joined") && event["data"]["node"] == "c"
            })
            .await?;
        // c's own store is the truth: the session that ran when it was killed is interrupted,
        // and its leftover process killed. c publishes that before its relay link to a is up; a
        // resumes c's stream from the last event it has, so the event reaches a from c's log.
        watch
            .expect(since, "c's session.interrupted on a", |event| {
                is(event, "c", "session.interrupted") && event["session"] == on_c
            })
            .await?;
        self.say(
            "stopping b gracefully: it tells the others it leaves (node.left, not node.down):",
        )?;
        let since = self.watch()?.mark();
        if let Some(b) = self.nodes.get_mut("b") {
            b.child.stop().await;
        }
        self.watch()?
            .expect(since, "node.left of b on a", |event| {
                is(event, "a", "node.left") && event["data"]["node"] == "b"
            })
            .await?;
        self.nodes.remove("b");
        Ok(())
    }

    /// Stops every node still running, all at once; a Ctrl-C meanwhile kills them.
    async fn stop_all(&mut self) {
        let stops = self.nodes.values_mut().map(|node| node.child.stop());
        let interrupted = tokio::select! {
            _ = futures::future::join_all(stops) => false,
            _ = tokio::signal::ctrl_c() => true,
        };
        if interrupted {
            for node in self.nodes.values_mut() {
                if node.child.is_running() {
                    let _ = node.child.kill();
                    let _ = node.child.wait_exit().await;
                }
            }
        }
        self.nodes.clear();
    }
}

/// The sessions the later steps use.
struct Sessions {
    on_b: String,
    on_c: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_are_checked() {
        assert_eq!(parse_pause("0"), Ok(Duration::ZERO));
        assert_eq!(parse_pause("2.5"), Ok(Duration::from_millis(2500)));
        assert!(parse_pause("-1").unwrap_err().contains("between 0 and 60"));
        assert!(parse_pause("61").is_err());
        assert!(parse_pause("soon").unwrap_err().contains("not a number"));
    }

    #[test]
    fn events_render_with_their_node_and_the_watchers_links_are_left_out() {
        let joined = json!({"id": "a:3", "at": "2026-01-01T10:11:12.345678Z", "node": "a",
            "session": null, "kind": "node.joined",
            "data": {"node": "b", "addr": "127.0.0.1:5000", "generation": 7}});
        assert_eq!(
            render(&joined, "a").unwrap(),
            "  | 10:11:12.345  a  node.joined        b (generation 7, 127.0.0.1:5000)"
        );
        let output = json!({"id": "b:9", "at": "2026-01-01T10:11:12.345678Z", "node": "b",
            "session": "s-1", "kind": "session.output",
            "data": {"stream": "stdout", "first_line": 1, "lines": ["tick 1", "tick 2"]}});
        assert!(
            render(&output, "a")
                .unwrap()
                .ends_with("b  session.output     s-1 tick 1 / tick 2")
        );
        let own_link = json!({"node": "a", "kind": "link.connected", "data": {}});
        assert_eq!(render(&own_link, "a"), None);
        let other_link = json!({"node": "b", "kind": "link.connected", "data": {}});
        assert!(render(&other_link, "a").is_some());
        let long = json!({"node": "a", "kind": "health.degraded", "session": null,
            "data": {"reasons": ["é".repeat(100)]}});
        assert!(render(&long, "a").unwrap().ends_with("..."));
    }
}
