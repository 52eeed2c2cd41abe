//! The event relay between real nodes on loopback (fast profile): exactly once and in order
//! across three nodes, through a cut link, across a kill -9 of the sender and a restart of the
//! receiver; a sender never more than a window of batches ahead of its receiver's
//! acknowledgements; event ids never reused after a kill -9; a rogue peer breaking the wire
//! protocol only closes its own stream or connection; providers' breakers in the member view.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use troupe::cluster::ClusterEndpoint;
use troupe::cluster::certs::{self, NodeFiles};
use troupe::cluster::endpoint::PROTOCOL_VIOLATION;
use troupe::cluster::relay::{Frame, RELAY_VERSION, WINDOW, read_frame, write_frame};
use troupe::testing::fake_provider::{FakeConfig, FakeProvider};
use troupe_actors::ids::NodeId;

use crate::cluster::make_cluster;
use crate::support::{
    NodeEnv, NodeProcess, PATIENCE, SseStream, relay_up, relay_up_after, sequence_number,
    start_cluster_node,
};

/// Raises the per-session output event rate far above what a test prints, so that every line is
/// one event and the streams these tests read are dense.
const UNCOALESCED: &str = "output_events_per_sec = 1000000";

/// Starts node `name` in `root/name` with the fast profile and `extra` config, joining `join`.
async fn node(
    root: &Path,
    name: &str,
    join: Option<std::net::SocketAddr>,
    extra: &str,
    flags: &[&str],
) -> NodeProcess {
    // Every output line is its own event (no flood coalescing): these tests need dense streams.
    let config = format!("[sessions]\n{UNCOALESCED}\n[cluster]\nprofile = \"fast\"\n{extra}");
    start_cluster_node(root, name, &config, join, flags).await
}

/// Reads `stream` until the event with id `last`; returns the ids read (`last` included).
async fn ids_through(stream: &mut SseStream, last: &str) -> Vec<String> {
    let mut ids = Vec::new();
    loop {
        let (id, event) = stream.next().await;
        assert_ne!(
            event["kind"], "events.lagged",
            "the watcher lagged: {event}"
        );
        ids.push(id.clone());
        if id == last {
            return ids;
        }
    }
}

/// Starts `count` sessions on `on`, each printing `lines` lines as fast as it can.
async fn dense_output(on: &NodeProcess, count: usize, lines: u64) -> BTreeSet<String> {
    let mut ids = BTreeSet::new();
    for _ in 0..count {
        let record = on
            .spawn_session(json!({"kind": "command", "program": "sh",
                "args": ["-c", format!("seq 1 {lines}")]}))
            .await;
        ids.insert(record["id"].as_str().unwrap().to_owned());
    }
    ids
}

/// Reads `stream` until every session of `sessions` succeeded; returns the ids read.
async fn until_succeeded(stream: &mut SseStream, sessions: &BTreeSet<String>) -> Vec<String> {
    let mut left = sessions.clone();
    let mut ids = Vec::new();
    while !left.is_empty() {
        let (id, event) = stream.next().await;
        assert_ne!(
            event["kind"], "events.lagged",
            "the watcher lagged: {event}"
        );
        if event["kind"] == "session.succeeded" {
            left.remove(event["session"].as_str().unwrap());
        }
        assert_ne!(event["kind"], "session.failed", "{event}");
        ids.push(id);
    }
    ids
}

/// Opens a link on `on` (one more event of `on`) and reads `stream` (a watcher on `on`) up to
/// its `link.connected`; returns the ids read, that one last.
async fn until_marker(on: &NodeProcess, stream: &mut SseStream) -> (Vec<String>, SseStream) {
    let marker = on.events("kind=provider.retry", None).await;
    let mut ids = Vec::new();
    loop {
        let (id, event) = stream.next().await;
        assert_ne!(
            event["kind"], "events.lagged",
            "the watcher lagged: {event}"
        );
        ids.push(id);
        if event["kind"] == "link.connected" {
            return (ids, marker);
        }
    }
}

fn assert_dense(ids: &[String], what: &str) {
    for pair in ids.windows(2) {
        assert_eq!(
            sequence_number(&pair[1]),
            sequence_number(&pair[0]) + 1,
            "{what}: {} follows {}: a gap or a duplicate",
            pair[1],
            pair[0]
        );
    }
}

#[tokio::test]
async fn an_event_stream_on_a_reaches_a_watcher_on_c_exactly_once_and_in_order() {
    let temp = tempfile::tempdir().unwrap();
    make_cluster(temp.path(), &["b", "c"]).await;
    let a = node(temp.path(), "a", None, "", &[]).await;
    let b = node(temp.path(), "b", a.cluster, "", &[]).await;
    let c = node(temp.path(), "c", b.cluster, "", &[]).await;
    let mut on_a = a.events("node=a", None).await;
    let mut on_c = c.events("node=a", None).await;
    let (probe, _links) = relay_up(&a, &mut on_c).await;
    ids_through(&mut on_a, &probe).await;

    // Four sessions print 40,000 lines each: hundreds of output events, back to back.
    let sessions = dense_output(&a, 4, 40_000).await;
    let mut seen_on_a = until_succeeded(&mut on_a, &sessions).await;
    // A last event after the load, to read both streams up to.
    let (tail, _marker) = until_marker(&a, &mut on_a).await;
    seen_on_a.extend(tail);
    let marker = seen_on_a.last().unwrap().clone();
    let seen_on_c = ids_through(&mut on_c, &marker).await;

    assert!(
        seen_on_a.len() > 600,
        "a dense run: {} events",
        seen_on_a.len()
    );
    assert_dense(&seen_on_a, "a's own stream");
    assert_eq!(
        seen_on_c, seen_on_a,
        "c sees exactly a's events, once each, in a's order"
    );
    drop(b);
}

#[tokio::test]
async fn a_relay_link_cut_repeatedly_while_events_flow_loses_and_duplicates_nothing() {
    let temp = tempfile::tempdir().unwrap();
    make_cluster(temp.path(), &["c"]).await;
    let a = node(temp.path(), "a", None, "", &[]).await;
    let c = node(temp.path(), "c", a.cluster, "", &["--fault-injection"]).await;
    let mut on_a = a.events("node=a", None).await;
    let mut on_c = c.events("node=a", None).await;
    let mut restarts = c.events("kind=actor.restarted", None).await;
    let (probe, _links) = relay_up(&a, &mut on_c).await;
    ids_through(&mut on_a, &probe).await;

    // Two sessions print a line every few milliseconds for a few seconds: a steady stream of
    // output events.
    let mut sessions = BTreeSet::new();
    for _ in 0..2 {
        let record = a
            .spawn_session(json!({"kind": "command", "program": "sh", "args": ["-c",
                "i=0; while [ $i -lt 1500 ]; do echo $i; i=$((i+1)); sleep 0.002; done"]}))
            .await;
        sessions.insert(record["id"].as_str().unwrap().to_owned());
    }
    // Cut c's relay link to a three times while the output flows (after c got some of it each
    // time): c's PeerActor crashes, which drops the stream; its new instance links again from
    // c's cursor. Neither node restarts.
    let mut seen_on_c = Vec::new();
    for _ in 0..3 {
        for _ in 0..20 {
            let (id, event) = on_c.next().await;
            assert_ne!(event["kind"], "events.lagged", "{event}");
            seen_on_c.push(id);
        }
        let response = c
            .post_json(
                "/v1/admin/faults",
                json!({"actor": "cluster/peer-a", "kind": "panic"}),
            )
            .await;
        assert_eq!(response.status(), 202);
        loop {
            let (_, event) = restarts.next().await;
            if event["data"]["child"] == "cluster/peer-a" {
                break;
            }
        }
    }
    let mut seen_on_a = until_succeeded(&mut on_a, &sessions).await;
    let (tail, _marker) = until_marker(&a, &mut on_a).await;
    seen_on_a.extend(tail);
    let marker = seen_on_a.last().unwrap().clone();
    seen_on_c.extend(ids_through(&mut on_c, &marker).await);
    assert!(seen_on_a.len() > 100, "{} events", seen_on_a.len());
    assert_dense(&seen_on_a, "a's own stream");
    assert_eq!(seen_on_c, seen_on_a, "nothing lost, nothing twice");
}

/// The ids a watcher read, and which sessions it saw start and end.
#[derive(Default)]
struct Watch {
    seen: Vec<String>,
    started: BTreeSet<String>,
    ended: BTreeSet<String>,
}

impl Watch {
    async fn read(&mut self, stream: &mut SseStream) {
        let (id, event) = stream.next().await;
        if event["kind"] != "session.output" {
            eprintln!("DEBUG {id} {event}");
        }
        assert_ne!(event["kind"], "events.lagged", "{event}");
        let session = || event["session"].as_str().unwrap().to_owned();
        match event["kind"].as_str().unwrap() {
            "session.started" => {
                self.started.insert(session());
            }
            "session.interrupted" | "session.succeeded" | "session.failed" => {
                self.ended.insert(session());
            }
            _ => {}
        }
        self.seen.push(id);
    }
}

#[tokio::test]
async fn a_sender_killed_mid_stream_restarts_and_a_watcher_elsewhere_sees_no_gap_and_no_duplicate()
{
    let temp = tempfile::tempdir().unwrap();
    make_cluster(temp.path(), &["b"]).await;
    let mut a = node(temp.path(), "a", None, "", &[]).await;
    let b = node(temp.path(), "b", a.cluster, "", &[]).await;
    let mut on_b = b.events("node=a", None).await;
    let (probe, links) = relay_up(&a, &mut on_b).await;

    // Two sessions flood their output; a is killed in the middle, once both run (a session
    // still queued would run again after the restart) and b has seen some of it. The event log
    // lags the bus under such a flood, so a loses the newest events b has already seen.
    let sessions = dense_output(&a, 2, 300_000).await;
    let mut watch = Watch {
        seen: vec![probe.clone()],
        ..Watch::default()
    };
    while watch.started.len() < sessions.len() || watch.seen.len() < 200 {
        watch.read(&mut on_b).await;
    }
    a.child.start_kill().unwrap();
    let _ = a.wait_exit().await;
    drop(links);

    // a comes back on its data directory (and another port), joining through b.
    let a = node(temp.path(), "a", b.cluster, "", &[]).await;
    // Its recovery ends the sessions that were running (interrupted; one may have succeeded
    // before the kill): read b's watcher until both ended, then up to one more event.
    let ended = tokio::time::timeout(Duration::from_secs(15), async {
        while watch.ended.len() < sessions.len() {
            watch.read(&mut on_b).await;
        }
    })
    .await;
    if ended.is_err() {
        // What both nodes logged says why; print it before failing.
        for line in a.logs.all() {
            eprintln!("a: {}", &line[..line.len().min(400)]);
        }
        for line in b.logs.all() {
            eprintln!("b: {}", &line[..line.len().min(400)]);
        }
        panic!("b did not see both sessions of the restarted a end within 15 s");
    }
    let mut seen = watch.seen;
    let (tail, _marker) = until_marker(&a, &mut on_b).await;
    seen.extend(tail);
    let marker = seen.last().unwrap().clone();
    // No duplicate, in order: strictly growing ids.
    for pair in seen.windows(2) {
        assert!(
            sequence_number(&pair[1]) > sequence_number(&pair[0]),
            "{} after {}",
            pair[1],
            pair[0]
        );
    }
    // The restarted a's events reached b at all: had it reused ids b had seen, b would have
    // dropped them as duplicates. No gap: everything a still has (its log, read back from it)
    // reached b. (b may hold a few more: the tail a lost in the kill, whose ids a skipped.)
    let mut from_a = a.events("node=a", Some(&probe)).await;
    let kept = ids_through(&mut from_a, &marker).await;
    let seen_set: BTreeSet<&String> = seen.iter().collect();
    let missing: Vec<&String> = kept.iter().filter(|id| !seen_set.contains(id)).collect();
    assert!(missing.is_empty(), "a has events b never got: {missing:?}");
}

#[tokio::test]
async fn a_restarted_receiver_resumes_each_peers_stream_after_the_last_event_it_has() {
    let temp = tempfile::tempdir().unwrap();
    make_cluster(temp.path(), &["b"]).await;
    let a = node(temp.path(), "a", None, "", &[]).await;
    let mut b = node(temp.path(), "b", a.cluster, "", &[]).await;
    let mut on_b = b.events("node=a", None).await;
    let (last_seen, _links) = relay_up(&a, &mut on_b).await;
    drop(on_b);

    // b stops; a publishes while b is away (a session with output, and its end).
    b.terminate();
    let _ = b.wait_exit().await;
    let mut on_a = a.events("node=a", None).await;
    let sessions = dense_output(&a, 1, 5_000).await;
    let published = until_succeeded(&mut on_a, &sessions).await;
    let newest = published.last().map_or(0, |id| sequence_number(id));

    // b comes back; a watcher resuming after the last event it saw gets every one of a's
    // events since, without a gap, then live ones. (b's relay is still catching up on what a
    // published meanwhile, a `link.connected` among it: the marker is a newer one.)
    let b = node(temp.path(), "b", a.cluster, "", &[]).await;
    let mut resumed = b.events("node=a", Some(&last_seen)).await;
    let (marker, _links_again) =
        relay_up_after(&a, &mut b.events("node=a", None).await, newest).await;
    let ids = ids_through(&mut resumed, &marker).await;
    let mut all = vec![last_seen.clone()];
    all.extend(ids);
    assert_dense(&all, "b's view of a across b's restart");
    assert!(all.len() > 10, "{all:?}");
}

#[tokio::test]
async fn event_ids_seen_before_a_kill_are_never_handed_out_again() {
    let temp = tempfile::tempdir().unwrap();
    let data = temp.path().join("solo");
    let dense = NodeEnv {
        vars: vec![(
            "TROUPE_SESSIONS__OUTPUT_EVENTS_PER_SEC".into(),
            "1000000".into(),
        )],
        cwd: None,
    };
    let mut solo = NodeProcess::start_with(&data, &[], &dense).await;
    let mut watcher = solo.events("", None).await;
    // Output as fast as a process prints: the event log lags the bus by a commit or more.
    dense_output(&solo, 2, 1_000_000).await;
    let mut highest = 0;
    // Far enough into the flood that the log is behind what the watcher saw.
    for _ in 0..5_000 {
        let (id, _) = watcher.next().await;
        highest = highest.max(sequence_number(&id));
    }
    solo.child.start_kill().unwrap();
    let _ = solo.wait_exit().await;

    let solo = NodeProcess::start_with(&data, &[], &dense).await;
    let mut watcher = solo.events("", None).await;
    // Recovery (sessions interrupted) and this watcher's own link publish new events.
    let _link = solo.events("kind=provider.retry", None).await;
    let (id, event) = watcher.next().await;
    assert!(
        sequence_number(&id) > highest,
        "{event} reuses an id up to {highest}, seen before the kill"
    );
}

/// A node that holds a certificate of the cluster but speaks garbage.
async fn rogue(root: &Path) -> ClusterEndpoint {
    troupe::tls::install_default_provider();
    let credentials = certs::load(&NodeFiles::in_dir(&root.join("rogue/cluster"))).unwrap();
    ClusterEndpoint::bind(
        &credentials,
        "127.0.0.1:0".parse().unwrap(),
        Default::default(),
    )
    .unwrap()
}

/// Opens a relay stream from the rogue to node `a` asking for its events after `after`, as a
/// peer would; returns the rogue (keep it), the stream's halves, once `a` welcomed it.
async fn rogue_relay(
    root: &Path,
    a: &NodeProcess,
    after: Option<u64>,
) -> (ClusterEndpoint, quinn::SendStream, quinn::RecvStream) {
    let receiver = rogue(root).await;
    let a_id = NodeId::new("a").unwrap();
    let (_, connection) = receiver
        .connect(a.cluster.unwrap(), Some(&a_id))
        .await
        .unwrap();
    let (mut send, mut recv) = connection.open_bi().await.unwrap();
    write_frame(
        &mut send,
        &Frame::Hello {
            version: RELAY_VERSION,
            after,
        },
    )
    .await
    .unwrap();
    match read_frame(&mut recv).await.unwrap() {
        Frame::Welcome { after: start, .. } => {
            if let Some(after) = after {
                assert_eq!(start, after, "the stream starts where it was asked to");
            }
        }
        other => panic!("expected a welcome, got {}", other.name()),
    }
    (receiver, send, recv)
}

/// Waits for a WARN line of `node` about the rogue breaking the protocol with `reason`.
async fn warned(node: &NodeProcess, reason: &str) {
    let line = node
        .logs
        .wait_for(reason, |line| {
            line["message"] == "cluster peer broke the wire protocol"
                && line["reason"] == reason
                && line["peer"] == "rogue"
        })
        .await;
    assert_eq!(line["level"], "WARN");
}

/// Waits until `stream`'s reads end (the peer reset or finished it).
async fn stream_closed(recv: &mut quinn::RecvStream) {
    let mut buffer = [0u8; 1024];
    tokio::time::timeout(PATIENCE, async {
        loop {
            match recv.read(&mut buffer).await {
                Ok(Some(_)) => continue,
                Ok(None) | Err(_) => return,
            }
        }
    })
    .await
    .expect("the node closes the stream");
}

#[tokio::test]
async fn a_rogue_peer_breaking_the_wire_protocol_closes_only_its_stream_or_connection() {
    let temp = tempfile::tempdir().unwrap();
    make_cluster(temp.path(), &["b", "rogue"]).await;
    let a = node(temp.path(), "a", None, "", &[]).await;
    let b = node(temp.path(), "b", a.cluster, "", &[]).await;
    let mut on_b = b.events("node=a", None).await;
    let (_, _links) = relay_up(&a, &mut on_b).await;
    let a_as_b_sees_it = || async {
        let view: Value = b.get("/v1/cluster/members").await.json().await.unwrap();
        let a = view["members"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["node"] == "a")
            .cloned()
            .unwrap();
        (
            a["state"].as_str().unwrap().to_owned(),
            a["generation"].as_u64().unwrap(),
        )
    };
    let before = a_as_b_sees_it().await;
    assert_eq!(before.0, "alive");
    let rogue = rogue(temp.path()).await;
    let a_id = NodeId::new("a").unwrap();
    let (_, connection) = rogue
        .connect(a.cluster.unwrap(), Some(&a_id))
        .await
        .unwrap();

    // Garbage on a stream: a frame of noise.
    let (mut send, mut recv) = connection.open_bi().await.unwrap();
    let mut noise = 60u32.to_be_bytes().to_vec();
    noise.extend((0..60u8).map(|n| n.wrapping_mul(37)));
    send.write_all(&noise).await.unwrap();
    stream_closed(&mut recv).await;
    warned(&a, "malformed_frame").await;

    // A handshake in a version nobody speaks: refused, then the stream ends.
    let (mut send, mut recv) = connection.open_bi().await.unwrap();
    write_frame(
        &mut send,
        &Frame::Hello {
            version: 99,
            after: None,
        },
    )
    .await
    .unwrap();
    match read_frame(&mut recv).await.unwrap() {
        Frame::Refused { reason } => {
            assert!(reason.contains("99") && reason.contains(&RELAY_VERSION.to_string()))
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    stream_closed(&mut recv).await;
    warned(&a, "unknown_version").await;

    // A length prefix over the frame cap.
    let (mut send, mut recv) = connection.open_bi().await.unwrap();
    send.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
    stream_closed(&mut recv).await;
    warned(&a, "oversized_frame").await;

    // A frame cut short: the stream finishes inside it.
    let (mut send, mut recv) = connection.open_bi().await.unwrap();
    send.write_all(&100u32.to_be_bytes()).await.unwrap();
    send.write_all(&[7u8; 10]).await.unwrap();
    send.finish().unwrap();
    stream_closed(&mut recv).await;
    warned(&a, "truncated_frame").await;

    // A frame out of turn.
    let (mut send, mut recv) = connection.open_bi().await.unwrap();
    write_frame(&mut send, &Frame::Ack(5)).await.unwrap();
    stream_closed(&mut recv).await;
    warned(&a, "unexpected_frame").await;

    // All of that on one connection, still open: stream faults close their stream only.
    assert!(
        connection.close_reason().is_none(),
        "{:?}",
        connection.close_reason()
    );

    // A datagram over the membership's packet cap closes the connection.
    let size = connection.max_datagram_size().unwrap();
    assert!(size > 1150, "the path carries {size}-byte datagrams");
    connection.send_datagram(vec![0u8; size].into()).unwrap();
    let closed = tokio::time::timeout(PATIENCE, connection.closed())
        .await
        .unwrap();
    match closed {
        quinn::ConnectionError::ApplicationClosed(close) => {
            assert_eq!(close.error_code, PROTOCOL_VIOLATION.into());
            assert_eq!(&close.reason[..], b"oversized_datagram");
        }
        other => panic!("{other}"),
    }
    warned(&a, "oversized_datagram").await;

    // The rogue may dial again; a datagram that is no membership packet closes that one too.
    let (_, connection) = rogue
        .connect(a.cluster.unwrap(), Some(&a_id))
        .await
        .unwrap();
    connection
        .send_datagram(b"not a membership packet".to_vec().into())
        .unwrap();
    let closed = tokio::time::timeout(PATIENCE, connection.closed())
        .await
        .unwrap();
    assert!(
        matches!(&closed, quinn::ConnectionError::ApplicationClosed(close)
            if &close.reason[..] == b"malformed_datagram"),
        "{closed}"
    );
    warned(&a, "malformed_datagram").await;

    // Every fault is counted by reason.
    let metrics = a.get("/metrics").await.text().await.unwrap();
    for reason in [
        "malformed_frame",
        "unknown_version",
        "oversized_frame",
        "truncated_frame",
        "unexpected_frame",
        "oversized_datagram",
        "malformed_datagram",
    ] {
        assert!(
            metrics.contains(&format!(
                "troupe_cluster_wire_errors_total{{reason=\"{reason}\"}} 1"
            )),
            "{reason}: {metrics}"
        );
    }
    // a is up, its events still reach b, and b never lost it (a member declared down comes
    // back as a new generation), nothing panicked.
    assert_eq!(a.get("/v1/health").await.status(), 200);
    let _after = a.events("kind=provider.retry", None).await;
    on_b.next_of("link.connected").await;
    assert_eq!(a_as_b_sees_it().await, before);
    assert!(
        !a.logs.all().iter().any(|line| line.contains("panicked")),
        "a panicked"
    );
    rogue.close(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn a_providers_breaker_opening_on_one_node_shows_in_another_nodes_member_view() {
    let temp = tempfile::tempdir().unwrap();
    make_cluster(temp.path(), &["b"]).await;
    let fake = FakeProvider::start(FakeConfig::default()).await.unwrap();
    let provider = format!(
        "[[providers]]\nname = \"primary\"\nkind = \"openai\"\nbase_url = \"{}/v1\"\n\
         breaker = {{ failure_threshold = 2, open_secs = 600, max_open_secs = 600 }}\nretry = {{ max_attempts = 1 }}\n",
        fake.base_url()
    );
    let a = node(temp.path(), "a", None, &provider, &[]).await;
    let b = node(temp.path(), "b", a.cluster, "", &[]).await;
    let breaker_seen_by_b = |view: &Value| {
        view["members"]
            .as_array()
            .and_then(|members| members.iter().find(|m| m["node"] == "a"))
            .and_then(|a| a["meta"]["providers"].as_array())
            .and_then(|providers| providers.iter().find(|p| p["name"] == "primary"))
            .and_then(|primary| primary["breaker"].as_str())
            .map(str::to_owned)
    };
    // Metadata changes publish no event: the member view is read until it shows the change.
    let wait_breaker = |state: &'static str| {
        let b = &b;
        async move {
            tokio::time::timeout(PATIENCE, async {
                loop {
                    let view: Value = b.get("/v1/cluster/members").await.json().await.unwrap();
                    if breaker_seen_by_b(&view).as_deref() == Some(state) {
                        return view;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
            .await
            .unwrap_or_else(|_| panic!("b never saw a's breaker {state}"))
        }
    };
    wait_breaker("closed").await;

    let mut events = a.events("kind=provider.breaker_opened", None).await;
    fake.set_behaviour("m1", "500".parse().unwrap());
    for _ in 0..2 {
        let response = a
            .post_json(
                "/v1/chat/completions",
                json!({"model": "primary/m1", "messages": [{"role": "user", "content": "hi"}]}),
            )
            .await;
        assert!(response.status().is_server_error(), "{}", response.status());
    }
    events.next_of("provider.breaker_opened").await;
    let view = wait_breaker("open").await;
    let a_meta = &view["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["node"] == "a")
        .unwrap()["meta"];
    assert_eq!(a_meta["truncated"], false, "{a_meta}");
    fake.shutdown().await;
}

#[tokio::test]
async fn a_sender_keeps_at_most_a_window_of_unacknowledged_batches() {
    let temp = tempfile::tempdir().unwrap();
    make_cluster(temp.path(), &["rogue"]).await;
    let a = node(temp.path(), "a", None, "", &[]).await;
    let (receiver, mut send, mut recv) = rogue_relay(temp.path(), &a, None).await;

    // Events at a steady pace, each line its own event (4 × 1,500 of them), so that batches stay
    // small (the sender takes what is ready when it wakes) and far more batches than a window
    // come; this receiver acknowledges nothing.
    for _ in 0..4 {
        a.spawn_session(json!({"kind": "command", "program": "sh", "args": ["-c",
            "i=0; while [ $i -lt 1500 ]; do echo $i; i=$((i+1)); sleep 0.001; done"]}))
            .await;
    }
    let batch = |frame: Frame| match frame {
        Frame::Batch(events) => events,
        other => panic!("expected a batch, got {}", other.name()),
    };
    for _ in 0..WINDOW {
        let frame = tokio::time::timeout(PATIENCE, read_frame(&mut recv))
            .await
            .expect("a batch within the window")
            .unwrap();
        assert!(!batch(frame).is_empty());
    }
    // The window is full: nothing more comes until a batch is acknowledged. (This wait can only
    // let a broken sender pass, never fail a correct one.)
    let more = tokio::time::timeout(Duration::from_secs(2), read_frame(&mut recv)).await;
    assert!(more.is_err(), "a batch beyond the window arrived");
    write_frame(&mut send, &Frame::Ack(0)).await.unwrap();
    let frame = tokio::time::timeout(PATIENCE, read_frame(&mut recv))
        .await
        .expect("one more batch after an acknowledgement")
        .unwrap();
    assert!(!batch(frame).is_empty());
    let more = tokio::time::timeout(Duration::from_secs(2), read_frame(&mut recv)).await;
    assert!(more.is_err(), "two batches for one acknowledgement");
    receiver.close(Duration::from_secs(1)).await;
}

/// An event can leave the ring before the log commits it (here: a ring of 8, and appends that
/// would wait a minute for the log, since nothing awaited is written meanwhile). A peer resuming
/// from before the ring still gets every event: the backfill commits what is queued before it
/// reads the log.
#[tokio::test]
async fn a_backfill_reads_events_that_left_the_ring_before_the_log_committed_them() {
    let temp = tempfile::tempdir().unwrap();
    make_cluster(temp.path(), &["rogue"]).await;
    let a = node(
        temp.path(),
        "a",
        None,
        "[events]\nring_capacity = 8\nlog_linger_ms = 60000\n",
        &[],
    )
    .await;
    // The watcher's own link.connected, then one per link below: far more than the ring holds.
    let mut watch = a.events("", None).await;
    let mut links = Vec::new();
    for _ in 0..20 {
        links.push(a.events("kind=provider.retry", None).await);
    }
    let (mut connected, mut newest) = (0, 0);
    while connected < 21 {
        let (id, event) = watch.next().await;
        newest = newest.max(sequence_number(&id));
        if event["kind"] == "link.connected" {
            connected += 1;
        }
    }

    // A peer resumes a's stream from its very start.
    // The sending half stays open (dropping it would end the stream).
    let (receiver, _send, mut recv) = rogue_relay(temp.path(), &a, Some(0)).await;
    let mut got = Vec::new();
    while got.last().is_none_or(|last| *last < newest) {
        let frame = tokio::time::timeout(PATIENCE, read_frame(&mut recv))
            .await
            .expect("a batch")
            .unwrap();
        match frame {
            Frame::Batch(events) => got.extend(events.iter().map(|event| event.id.seq)),
            other => panic!("expected a batch, got {}", other.name()),
        }
    }
    let expected: Vec<u64> = (1..=newest).collect();
    assert_eq!(
        got[..expected.len().min(got.len())],
        expected[..],
        "every event of a from its first, none skipped"
    );
    receiver.close(Duration::from_secs(1)).await;
}

/// Regression: the PeerActors' handles outlived a restart of the cluster branch (a failure of
/// any earlier sibling restarts it: the root is rest_for_one), stopped for good, and the new
/// membership sent its `up`s to them: no member's events reached this node until it restarted.
#[tokio::test]
async fn after_its_cluster_branch_restarts_a_node_relays_its_peers_events_again() {
    let temp = tempfile::tempdir().unwrap();
    make_cluster(temp.path(), &["c"]).await;
    let a = node(temp.path(), "a", None, "", &[]).await;
    let c = node(temp.path(), "c", a.cluster, "", &["--fault-injection"]).await;
    let mut on_c = c.events("node=a", None).await;
    relay_up(&a, &mut on_c).await;

    // The registry fails: it and every later sibling restart, the cluster branch included.
    let response = c
        .post_json(
            "/v1/admin/faults",
            json!({"actor": "registry", "kind": "panic"}),
        )
        .await;
    assert_eq!(response.status(), 202);
    c.logs
        .wait_for("the cluster branch restarted", |line| {
            line["message"] == "actor restarted" && line["child"] == "cluster"
        })
        .await;
    let mut on_c = c.events("node=a", None).await;
    relay_up(&a, &mut on_c).await;
}
