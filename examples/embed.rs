//! Embed a troupe node in your own program: start it, watch its events, make an actor fail, and
//! see the supervisor bring it back.
//!
//! Run with: cargo run --example embed

use std::time::Duration;

use troupe::Node;
use troupe::actors::event::{ActorRestarted, Delivery, EventData, EventFilter};
use troupe::actors::ids::ActorPath;
use troupe::actors::kernel::FaultKind;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The panic below is the point of this example: report it in one line.
    std::panic::set_hook(Box::new(|info| {
        eprintln!("(a supervised actor panicked: {info})")
    }));
    run().await?;
    Ok(())
}

/// The example itself; returns the restart it saw. (A test in tests/node runs it, so it cannot
/// rot.)
pub async fn run() -> Result<ActorRestarted, Box<dyn std::error::Error>> {
    let data_dir = tempfile::tempdir()?;
    // No HTTP: the host program talks to the node through its handle.
    let node = Node::builder()
        .data_dir(data_dir.path())
        .without_http()
        .start()
        .await?;
    println!("node {} started", node.node_id());

    let mut restarts = node.subscribe(EventFilter {
        kinds: vec!["actor.restarted".parse()?],
        ..EventFilter::all()
    });

    let target = ActorPath::parse("health").expect("a valid path");
    node.inject_fault(&target, FaultKind::Panic)?;
    println!("injected a panic into {target}");

    let delivery = tokio::time::timeout(Duration::from_secs(10), restarts.recv())
        .await?
        .ok_or("the node stopped")?;
    let restart = match delivery {
        Delivery::Event(event) => match &event.data {
            EventData::ActorRestarted(restart) => restart.clone(),
            other => return Err(format!("expected actor.restarted, got {other:?}").into()),
        },
        other => return Err(format!("expected an event, got {other:?}").into()),
    };
    println!(
        "{} restarted {} after {} ms: {}",
        restart.supervisor, restart.child, restart.delay_ms, restart.reason
    );

    let health = node.health().await?;
    println!(
        "health: {:?}, {} restart(s) in the last {}s",
        health.status, health.restarts_in_window, health.window_secs
    );
    node.shutdown().await;
    Ok(restart)
}
