//! `troupe events`: print a node's recent events, or follow them live. A followed stream that
//! drops is reopened with `Last-Event-ID`, so nothing is missed and nothing printed twice.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use futures::StreamExt;

use super::client::{ClientArgs, NodeClient, check, sse_events};
use super::out::outln;

/// `troupe events` options.
#[derive(Debug, clap::Args)]
pub(super) struct EventsArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// Keep printing new events (reconnects and resumes after a disconnect).
    #[arg(long, short)]
    follow: bool,
    /// Only this kind (repeatable; `session.*` for a family).
    #[arg(long = "kind", short = 'k')]
    kinds: Vec<String>,
    /// Only events of this session (repeatable).
    #[arg(long = "session")]
    sessions: Vec<String>,
    /// Only events published by this node (repeatable).
    #[arg(long = "from-node")]
    nodes: Vec<String>,
    /// Start with the last N events (default: 20 without --follow, 0 with it).
    #[arg(long)]
    tail: Option<usize>,
    /// Start after this event id (NODE:SEQ).
    #[arg(long)]
    after: Option<String>,
    /// Print each event as a JSON line.
    #[arg(long)]
    json: bool,
}

impl EventsArgs {
    fn query(&self) -> String {
        let mut query = form_urlencoded::Serializer::new(String::new());
        for kind in &self.kinds {
            query.append_pair("kind", kind);
        }
        for session in &self.sessions {
            query.append_pair("session", session);
        }
        for node in &self.nodes {
            query.append_pair("node", node);
        }
        query.append_pair("follow", if self.follow { "true" } else { "false" });
        let tail = self.tail.unwrap_or(if self.follow { 0 } else { 20 });
        if self.after.is_none() && tail > 0 {
            query.append_pair("tail", &tail.to_string());
        }
        if let Some(after) = &self.after {
            query.append_pair("after", after);
        }
        query.finish()
    }
}

pub(super) async fn run(args: EventsArgs) -> anyhow::Result<ExitCode> {
    let client = NodeClient::new(&args.client)?;
    let path = format!("/v1/events?{}", args.query());
    let mut last_id: Option<String> = None;
    // Where a followed stream starts, when it does not resume from an id: the node's newest
    // event (of any kind). A reconnect resumes after it even when no event had matched the
    // filter yet (a restart that cuts the stream comes before its own `actor.restarted`).
    let mut start_id = None;
    if args.follow && args.after.is_none() {
        start_id = newest_event_id(&client).await;
        if args.tail.unwrap_or(0) == 0 {
            last_id = start_id.clone();
        }
    }
    let mut delay = Duration::from_millis(500);
    // Whether a stream was ever opened: a node that was never there is an error at once, not
    // something to wait for.
    let mut opened = false;
    loop {
        let mut request = client.get(&path);
        if let Some(id) = &last_id {
            request = request.header("Last-Event-ID", id);
        }
        let outcome = tokio::select! {
            outcome = stream_once(&client, request, &args, &mut last_id, &mut opened) => outcome,
            _ = tokio::signal::ctrl_c() => return Ok(ExitCode::SUCCESS),
        };
        if last_id.is_none() {
            last_id = start_id.clone();
        }
        match outcome {
            Ok(()) if !args.follow => return Ok(ExitCode::SUCCESS),
            Ok(()) => eprintln!("troupe: the stream ended; reconnecting"),
            Err(StreamError::Fatal(error)) => return Err(error),
            Err(StreamError::Transient(error)) if args.follow && opened => {
                eprintln!(
                    "troupe: {error:#}; reconnecting in {}s",
                    delay.as_secs_f32()
                );
            }
            Err(StreamError::Transient(error)) => return Err(error),
        }
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            _ = tokio::signal::ctrl_c() => return Ok(ExitCode::SUCCESS),
        }
        delay = (delay * 2).min(Duration::from_secs(10));
    }
}

/// The id of the node's newest event, if the node says (a one-shot replay of the last one).
async fn newest_event_id(client: &NodeClient) -> Option<String> {
    let response = client
        .fetch(client.get("/v1/events?follow=false&tail=1"))
        .await
        .ok()?;
    let body = check(response).await.ok()?.text().await.ok()?;
    body.lines()
        .filter_map(|line| line.strip_prefix("id:"))
        .map(|id| id.trim().to_owned())
        .next_back()
}

enum StreamError {
    /// Reconnecting will not help (bad token, bad filter).
    Fatal(anyhow::Error),
    /// The connection failed or dropped.
    Transient(anyhow::Error),
}

async fn stream_once(
    client: &NodeClient,
    request: reqwest::RequestBuilder,
    args: &EventsArgs,
    last_id: &mut Option<String>,
    opened: &mut bool,
) -> Result<(), StreamError> {
    let response = client.send(request).await.map_err(StreamError::Transient)?;
    let transient = response.status().is_server_error();
    let response = check(response).await.map_err(|error| {
        if transient {
            StreamError::Transient(error)
        } else {
            StreamError::Fatal(error)
        }
    })?;
    *opened = true;
    let mut events = sse_events(client, response);
    while let Some(event) = events.next().await {
        let event = event
            .context("the event stream broke")
            .map_err(StreamError::Transient)?;
        if !event.id.is_empty() {
            *last_id = Some(event.id.clone());
        }
        let printed = if args.json {
            outln!("{}", event.data)
        } else {
            outln!("{}", render(&event.data))
        };
        printed.map_err(StreamError::Fatal)?;
    }
    Ok(())
}

/// One event as a line: time, id, kind, session, data.
fn render(data: &str) -> String {
    let Ok(event) = serde_json::from_str::<serde_json::Value>(data) else {
        return data.to_owned();
    };
    let at = event["at"].as_str().unwrap_or("");
    let id = event["id"].as_str().unwrap_or("-");
    let kind = event["kind"].as_str().unwrap_or("?");
    let session = event["session"]
        .as_str()
        .map(|session| format!(" [{session}]"))
        .unwrap_or_default();
    format!("{at} {id:<14} {kind:<26}{session} {}", event["data"])
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Wrapper {
        #[command(flatten)]
        args: EventsArgs,
    }

    #[test]
    fn the_query_carries_filters_and_defaults() {
        let wrapper = Wrapper::parse_from(["x", "--kind", "actor.*", "--session", "s-1"]);
        assert_eq!(
            wrapper.args.query(),
            "kind=actor.*&session=s-1&follow=false&tail=20"
        );
        let wrapper = Wrapper::parse_from(["x", "--follow"]);
        assert_eq!(wrapper.args.query(), "follow=true");
        let wrapper = Wrapper::parse_from(["x", "-f", "--after", "a:3"]);
        assert_eq!(wrapper.args.query(), "follow=true&after=a%3A3");
    }

    #[test]
    fn events_render_as_one_line() {
        let line = render(
            r#"{"id":"a:3","at":"2026-01-01T00:00:00.000000Z","node":"a","session":"s-1","kind":"session.output","data":{"lines":["hi"]}}"#,
        );
        assert!(line.starts_with("2026-01-01T00:00:00.000000Z a:3"));
        assert!(line.contains("session.output"));
        assert!(line.contains("[s-1]"));
        assert!(line.ends_with(r#"{"lines":["hi"]}"#));
    }
}
