//! Three embedded nodes on loopback joined into a cluster: a subscriber on node a sees the
//! membership and the events of b and c, a session asked of a runs on c, and c's clean stop is
//! seen by the others as `node.left`.
//!
//! Run with: cargo run --example three_nodes
//!
//! `troupe demo` shows the same with three processes, a supervised restart and a kill -9.

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::time::Duration;

use troupe::actors::event::{Delivery, Event, EventData, EventFilter, Subscription};
use troupe::actors::ids::NodeId;
use troupe::config::{ClusterProfile, Config};
use troupe::{Node, NodeHandle};

type Error = Box<dyn std::error::Error>;

/// Node `name`: data in `root/name`, the cluster on a free loopback port with the fast
/// failure-detection profile, joining `seeds`.
fn config(root: &Path, name: &str, seeds: Vec<SocketAddr>) -> Result<Config, Error> {
    let mut config = Config {
        node_id: Some(NodeId::new(name)?),
        data_dir: Some(root.join(name)),
        ..Config::default()
    };
    config.cluster.enabled = true;
    config.cluster.listen = "127.0.0.1:0".parse()?;
    config.cluster.profile = ClusterProfile::Fast;
    config.cluster.seeds = seeds;
    config.sessions.workspace_roots = vec![root.to_owned()];
    Ok(config)
}

async fn start(config: Config) -> Result<NodeHandle, Error> {
    // HTTP on a free loopback port: the remote spawn below goes through a's API.
    let listener = TcpListener::bind("127.0.0.1:0")?;
    Ok(Node::builder()
        .config(config)
        .listener(listener)
        .start()
        .await?)
}

/// Prints the events of `events` until one matches `done` (at most 30 s).
async fn print_until(
    events: &mut Subscription,
    what: &str,
    mut done: impl FnMut(&Event) -> bool,
) -> Result<(), Error> {
    let wait = async {
        while let Some(delivery) = events.recv().await {
            let Delivery::Event(event) = delivery else {
                continue;
            };
            let detail = match &event.data {
                EventData::NodeJoined(member)
                | EventData::NodeSuspected(member)
                | EventData::NodeDown(member)
                | EventData::NodeLeft(member) => member.node.to_string(),
                EventData::SessionOutput(output) => output.lines.join(" / "),
                _ => String::new(),
            };
            println!(
                "  on a: {:<8} from {}  {} {detail}",
                event.id.to_string(),
                event.node(),
                event.kind().as_str()
            );
            if done(&event) {
                return Ok(());
            }
        }
        Err::<(), Error>("node a stopped".into())
    };
    tokio::time::timeout(Duration::from_secs(30), wait)
        .await
        .map_err(|_| format!("{what} did not arrive on a within 30 s"))?
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    troupe::tls::install_default_provider();
    let root = tempfile::tempdir()?;
    let root = root.path();

    // One cluster CA (in a's data dir) and a certificate per node, as `troupe cluster init` and
    // `troupe cluster issue NAME --out <its data dir>/cluster` make them.
    let now = time::OffsetDateTime::now_utc();
    let ca = root.join("a/cluster");
    troupe::cluster::certs::init(&ca, &NodeId::new("a")?, now)?;
    for name in ["b", "c"] {
        let out = root.join(name).join("cluster");
        troupe::cluster::certs::issue(&ca, &NodeId::new(name)?, &out, now)?;
    }

    let a = start(config(root, "a", Vec::new())?).await?;
    let seed = a.cluster_addr().ok_or("a has no cluster address")?;
    let http = a.http_addr().ok_or("a serves no HTTP")?;
    println!("node a: HTTP {http}, cluster {seed}");
    // Subscribe before the others join: membership events, and everything b and c publish.
    let mut events = a.subscribe(EventFilter {
        kinds: vec!["node.*".parse()?, "session.*".parse()?],
        ..EventFilter::all()
    });
    let b = start(config(root, "b", vec![seed])?).await?;
    let c = start(config(root, "c", vec![seed])?).await?;
    println!("nodes b and c started, joining a at {seed}");

    let mut joined = Vec::new();
    print_until(&mut events, "node.joined of b and c", |event| {
        if let EventData::NodeJoined(member) = &event.data
            && event.node().as_str() == "a"
        {
            joined.push(member.node.to_string());
        }
        joined.iter().any(|n| n == "b") && joined.iter().any(|n| n == "c")
    })
    .await?;

    // A session on b, through b's own handle; a's subscriber sees its output over the relay.
    // (The relay link comes up a moment after the membership: the first lines may predate it.)
    let on_b = b
        .spawn_request(serde_json::from_value(serde_json::json!({
            "kind": "command", "program": "sh",
            "args": ["-c", "for i in 1 2 3 4 5 6 7 8 9 10; do echo \"b says $i\"; sleep 0.3; done"]
        }))?)
        .await?;
    println!("session {} runs on b", on_b.record.id);
    print_until(&mut events, "b's session output", |event| {
        event.node().as_str() == "b" && matches!(event.data, EventData::SessionOutput(_))
    })
    .await?;

    // A remote spawn: asked of a over its HTTP API with "node": "c", forwarded to c over QUIC.
    let token = std::fs::read_to_string(a.admin_token_path())?;
    let created: serde_json::Value = reqwest::Client::new()
        .post(format!("http://{http}/v1/sessions"))
        .bearer_auth(token.trim())
        .json(&serde_json::json!({"kind": "command", "program": "sh",
            "args": ["-c", "echo hello from c"], "node": "c"}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let remote = created["id"].as_str().ok_or("no session id")?.to_owned();
    println!(
        "asked a for a session on c: {remote} runs on node {}",
        created["node"].as_str().unwrap_or("?")
    );
    print_until(&mut events, "the end of the session on c", |event| {
        event.node().as_str() == "c"
            && event
                .session
                .as_ref()
                .is_some_and(|id| id.as_str() == remote)
            && matches!(event.data, EventData::SessionSucceeded(_))
    })
    .await?;

    // c stops cleanly: it leaves, and a records node.left (a kill would be node.down).
    c.shutdown().await;
    println!("node c stopped");
    print_until(&mut events, "node.left of c", |event| {
        matches!(&event.data, EventData::NodeLeft(member) if member.node.as_str() == "c")
            && event.node().as_str() == "a"
    })
    .await?;

    b.shutdown().await;
    a.shutdown().await;
    println!("done");
    Ok(())
}
