//! The `troupe` command line: `troupe node` runs a node; the other commands talk to one over
//! its HTTP API. This is the only place that uses `anyhow`: commands report errors to people.

mod bench;
mod client;
mod cluster;
mod demo;
mod events;
mod health;
mod loopback;
mod mcp;
mod node;
mod out;
mod session;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

pub use client::{ClientArgs, NodeClient};

/// troupe: supervised AI agent runs, a provider gateway, and live events.
#[derive(Debug, Parser)]
#[command(name = "troupe", version, about, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a node (loopback HTTP on 127.0.0.1:7070 by default).
    Node(node::NodeArgs),
    /// Show a node's health.
    Health(health::HealthArgs),
    /// Print a node's events (the recent ones, or follow them live).
    Events(events::EventsArgs),
    /// Serve MCP on stdin/stdout: bridged to the running node discovery finds, or an embedded
    /// node when there is none.
    Mcp(mcp::McpArgs),
    /// List the running nodes discovery finds on this machine.
    Nodes(mcp::NodesArgs),
    /// Spawn, list, show, cancel sessions and read their output.
    #[command(subcommand)]
    Session(session::SessionCommand),
    /// Cluster certificates and members.
    #[command(subcommand)]
    Cluster(cluster::ClusterCommand),
    /// Measure a node end to end against a baseline in the same run.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Three nodes on loopback in about a minute: gossip, event relay, a supervised restart,
    /// failure detection after a kill -9.
    Demo(demo::DemoArgs),
    /// A node run by `troupe demo` or `troupe bench cluster` (configuration on stdin).
    #[command(name = "loopback-node", hide = true)]
    LoopbackNode(loopback::ChildArgs),
}

/// Raises this process's soft limit on open files to its hard limit, as a server holding a
/// socket per client and pipes per session should (Go's runtime does the same): the soft limit
/// of 1,024 common in shells would let a node serve about 500 connections (it serves half its
/// limit at most). Best effort: the node adapts to whatever limit it has.
fn raise_open_files_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        // Some systems report a hard limit setrlimit will not take (unlimited): a million is
        // plenty.
        let wanted = hard.min(1 << 20);
        if wanted > soft {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, wanted, hard);
        }
    }
}

/// Runs the command line and returns the process exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if matches!(
        cli.command,
        Command::Node(_) | Command::Mcp(_) | Command::LoopbackNode(_) | Command::Demo(_)
    ) {
        raise_open_files_limit();
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("troupe: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(async move {
        match cli.command {
            Command::Node(args) => node::run(args).await,
            Command::Health(args) => health::run(args).await,
            Command::Events(args) => events::run(args).await,
            Command::Session(command) => session::run(command).await,
            Command::Mcp(args) => mcp::run(args).await,
            Command::Bench(command) => bench::run(command).await,
            Command::Nodes(args) => mcp::nodes(args),
            Command::Cluster(command) => cluster::run(command).await,
            Command::Demo(args) => demo::run(args).await,
            Command::LoopbackNode(args) => loopback::run_child(args).await,
        }
    });
    // Dropping the runtime would wait for every blocking task, and a read of stdin (`troupe
    // mcp` whose link ended while its client keeps stdin open) never ends by itself: give the
    // blocking tasks a moment, then leave.
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    match outcome {
        Ok(code) => code,
        Err(error) => match out::closed_exit_code(&error) {
            // The reader of stdout went away (`| head`): a quiet end.
            Some(code) => code,
            None => {
                eprintln!("troupe: {}", error_chain(&error));
                ExitCode::FAILURE
            }
        },
    }
}

/// An error and its causes on one line, `a: b: c`, leaving out a cause whose text the message
/// already holds (error types that name their cause in their own message).
fn error_chain(error: &anyhow::Error) -> String {
    let mut line = error.to_string();
    for cause in error.chain().skip(1) {
        let cause = cause.to_string();
        if !line.contains(&cause) {
            line.push_str(": ");
            line.push_str(&cause);
        }
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        // Clap checks this only when a command is parsed, in debug builds: a flag of
        // `ClientArgs` clashing with one of a command panics at run time.
        <Cli as clap::CommandFactory>::command().debug_assert();
    }

    #[test]
    fn a_cause_already_in_the_message_is_not_printed_twice() {
        let io = std::io::Error::from(std::io::ErrorKind::AddrInUse);
        let bind = crate::node::NodeError::Bind {
            addr: "127.0.0.1:7070".parse().unwrap(),
            source: io,
        };
        let error = anyhow::Error::new(bind).context("cannot start the node");
        let line = error_chain(&error);
        assert_eq!(line.matches("address in use").count(), 1, "{line}");
        assert!(
            line.starts_with("cannot start the node: cannot listen on"),
            "{line}"
        );
    }
}
