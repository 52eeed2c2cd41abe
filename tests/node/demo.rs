//! `troupe demo`: the real binary runs its three child nodes on loopback; its output must show
//! every step (gossip, relay, a supervised restart, failure detection, a leave), and it must leave
//! no process and no scratch directory behind, also when interrupted.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

use crate::support::{troupe_bin, wait_all_dead};

/// The whole demo takes a few seconds with no pauses; the machine may be slow and shared.
const DEMO_PATIENCE: Duration = Duration::from_secs(240);

/// One printed event: `  | HH:MM:SS.mmm  NODE  KIND  details`.
struct Printed {
    node: String,
    kind: String,
    detail: String,
}

fn printed_events(out: &str) -> Vec<Printed> {
    out.lines()
        .filter_map(|line| line.strip_prefix("  | "))
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let _time = fields.next()?;
            let node = fields.next()?.to_owned();
            let kind = fields.next()?.to_owned();
            let detail = fields.collect::<Vec<_>>().join(" ");
            Some(Printed { node, kind, detail })
        })
        .collect()
}

/// The pids the demo printed for its nodes (`node a: pid 123, …`) and for sessions
/// (`session.started … {"pid":123,…}`).
fn printed_pids(out: &str) -> Vec<i32> {
    let mut pids = Vec::new();
    for line in out.lines() {
        let after = line
            .split_once(": pid ")
            .map(|(_, rest)| rest)
            .or_else(|| line.split_once("\"pid\":").map(|(_, rest)| rest));
        if let Some(rest) = after {
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            if let Ok(pid) = digits.parse() {
                pids.push(pid);
            }
        }
    }
    pids
}

async fn assert_nothing_left(tmp: &std::path::Path, pids: &[i32]) {
    for pid in pids {
        // Nodes and sessions each lead a process group of their own.
        wait_all_dead(*pid, &[*pid]).await;
    }
    let left: Vec<_> = std::fs::read_dir(tmp)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .collect();
    assert!(left.is_empty(), "left behind in TMPDIR: {left:?}");
}

#[tokio::test]
async fn the_demo_shows_gossip_relay_a_restart_and_failure_detection_and_cleans_up() {
    let tmp = tempfile::tempdir().unwrap();
    let output = tokio::time::timeout(
        DEMO_PATIENCE,
        Command::new(troupe_bin())
            .args(["demo", "--pause", "0"])
            .env("TMPDIR", tmp.path())
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the demo ends")
    .unwrap();
    let out = String::from_utf8_lossy(&output.stdout).into_owned();
    let err = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "{out}\n{err}");

    for step in 1..=8 {
        assert!(
            out.contains(&format!("\n[{step}/8] ")),
            "step {step}:\n{out}"
        );
    }
    let events = printed_events(&out);
    let seen = |node: &str, kind: &str, detail: &str| {
        events
            .iter()
            .any(|e| e.node == node && e.kind == kind && e.detail.starts_with(detail))
    };
    // Gossip: a learns of b and c.
    assert!(seen("a", "node.joined", "b "), "{out}");
    assert!(seen("a", "node.joined", "c "), "{out}");
    // Relay: the events of b and c reach a's stream, with their node.
    assert!(seen("b", "session.output", "s-"), "{out}");
    assert!(seen("c", "session.output", "s-"), "{out}");
    assert!(seen("b", "link.connected", ""), "{out}");
    // A supervised restart on b, relayed.
    assert!(seen("b", "actor.restarted", "sessions/s-"), "{out}");
    // Failure detection of the killed c, by a itself and by b (relayed).
    assert!(seen("a", "node.down", "c "), "{out}");
    assert!(seen("b", "node.down", "c "), "{out}");
    // c comes back (a second node.joined of c on a); b's clean stop is a leave.
    let c_joined = events
        .iter()
        .filter(|e| e.node == "a" && e.kind == "node.joined" && e.detail.starts_with("c "))
        .count();
    assert!(c_joined >= 2, "{out}");
    // The restarted c's own verdict on the run it had when killed reaches a over the relay.
    assert!(seen("c", "session.interrupted", "s-"), "{out}");
    assert!(seen("a", "node.left", "b "), "{out}");
    assert!(out.contains("unreachable"), "{out}");
    assert!(out.contains("\nDone."), "{out}");

    let pids = printed_pids(&out);
    assert!(pids.len() >= 4, "node and session pids: {pids:?}\n{out}");
    assert_nothing_left(tmp.path(), &pids).await;
}

#[tokio::test]
async fn an_interrupted_demo_stops_its_nodes_and_removes_its_scratch_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let mut demo = Command::new(troupe_bin())
        .args(["demo", "--pause", "60"])
        .env("TMPDIR", tmp.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(demo.stdout.take().unwrap()).lines();
    let mut out = String::new();
    // Wait until the three nodes run (the demo then pauses 60 s), then press Ctrl-C.
    let started = tokio::time::timeout(DEMO_PATIENCE, async {
        let mut nodes = 0;
        while let Some(line) = lines.next_line().await.unwrap() {
            out.push_str(&line);
            out.push('\n');
            if line.trim_start().starts_with("node ") && line.contains(": pid ") {
                nodes += 1;
            }
            if line.contains("this node: a at") && nodes == 3 {
                return;
            }
        }
        panic!("the demo ended early:\n{out}");
    })
    .await;
    assert!(started.is_ok(), "the nodes did not start:\n{out}");
    assert!(tmp.path().read_dir().unwrap().next().is_some());
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(demo.id().unwrap() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let rest = tokio::time::timeout(DEMO_PATIENCE, async {
        let mut rest = String::new();
        while let Some(line) = lines.next_line().await.unwrap() {
            rest.push_str(&line);
            rest.push('\n');
        }
        rest
    })
    .await
    .expect("the demo's output ends");
    let status = tokio::time::timeout(DEMO_PATIENCE, demo.wait())
        .await
        .expect("the demo exits")
        .unwrap();
    out.push_str(&rest);
    assert_eq!(status.code(), Some(130), "{out}");
    assert!(rest.contains("Interrupted."), "{out}");
    assert!(rest.contains("Removed "), "{out}");
    assert_nothing_left(tmp.path(), &printed_pids(&out)).await;
}
