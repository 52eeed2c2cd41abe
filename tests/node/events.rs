//! Recovery seen from outside: a fault injected over HTTP shows up as a restart in the node's
//! log and as `actor.restarted` on the event stream; streams resume exactly with Last-Event-ID.

use std::collections::BTreeSet;

use serde_json::json;

use crate::support::*;

#[tokio::test]
async fn an_injected_panic_is_restarted_logged_and_streamed_while_health_stays_up() {
    let node = NodeProcess::start(&["--fault-injection"]).await;
    let mut stream = node.events("kind=actor.*&kind=link.*", None).await;
    let (first_id, connected) = stream.next_of("link.connected").await;
    assert_eq!(connected["data"]["transport"], "sse");

    // Health is asked again and again while the restart happens (bounded: it stops once the
    // restart is logged, or after 2,000 requests).
    let restart_seen = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let prober = tokio::spawn({
        let client = node.client();
        let url = node.url("/v1/health");
        let restart_seen = restart_seen.clone();
        async move {
            let mut statuses = Vec::new();
            while !restart_seen.load(std::sync::atomic::Ordering::Relaxed) && statuses.len() < 2_000
            {
                let response = client.get(&url).send().await.unwrap();
                statuses.push(response.status().as_u16());
            }
            statuses
        }
    });

    node.inject_panic("registry").await;

    // The node's log: one WARN "actor restarted" line for the registry, with the reason.
    let restart = node
        .logs
        .wait_for("actor restarted (registry)", |line| {
            line["message"] == "actor restarted" && line["child"] == "registry"
        })
        .await;
    assert_eq!(restart["level"], "WARN");
    assert_eq!(restart["supervisor"], "node");
    assert!(
        restart["reason"]
            .as_str()
            .unwrap()
            .contains("fault injected: panic in registry")
    );
    assert_eq!(restart["restart_count"], 1);
    node.logs
        .wait_for("actor restarted (links)", |line| {
            line["message"] == "actor restarted" && line["child"] == "links"
        })
        .await;
    restart_seen.store(true, std::sync::atomic::Ordering::Relaxed);
    let statuses = prober.await.unwrap();
    assert!(!statuses.is_empty());
    assert!(
        statuses.iter().all(|status| *status == 200),
        "/v1/health answered 200 throughout the restart: {statuses:?}"
    );

    // rest_for_one at the root restarts the TransportSupervisor too, which closes this link;
    // the client resumes after the last id it saw and gets exactly what it missed.
    stream.closed().await;
    let mut resumed = node.events("kind=actor.*", Some(&first_id)).await;
    let (_, event) = resumed.next_of("actor.restarted").await;
    assert_eq!(event["data"]["child"], "registry");
    assert!(
        event["data"]["reason"]
            .as_str()
            .unwrap()
            .contains("fault injected")
    );

    let health = node.get("/v1/health").await;
    assert_eq!(
        health.status(),
        200,
        "the node stays up through the restart"
    );
    let health: serde_json::Value = health.json().await.unwrap();
    assert!(health["restarts_in_window"].as_u64().unwrap() >= 1);
    assert_eq!(health["actors"]["running"], health["actors"]["total"]);
}

#[tokio::test]
async fn a_reconnect_with_last_event_id_gets_exactly_the_missed_events_in_order() {
    let node = NodeProcess::start(&[]).await;
    // A reference subscriber stays connected throughout and sees every link event.
    let mut reference = node.events("kind=link.*", None).await;
    let mut client = node.events("kind=link.*", None).await;
    let (last_seen, _) = client.next_of("link.connected").await;
    drop(client);

    // Events the client misses: its own disconnect, and two more links coming and going.
    for _ in 0..2 {
        let other = node.events("kind=session.*", None).await;
        drop(other);
    }
    let mut expected = Vec::new();
    loop {
        let (id, event) = reference.next().await;
        if id == last_seen {
            expected.clear();
            continue;
        }
        expected.push(id);
        if expected.len() == 5 && event["kind"] == "link.disconnected" {
            break;
        }
    }
    // expected = [client disconnected, other1 connected, other1 disconnected, other2 connected,
    //             other2 disconnected]

    let mut resumed = node.events("kind=link.*", Some(&last_seen)).await;
    let mut got = Vec::new();
    while got.len() < expected.len() {
        let (id, _) = resumed.next().await;
        got.push(id);
    }
    assert_eq!(got, expected, "exactly the missed events, in order");
    let unique: BTreeSet<_> = got.iter().collect();
    assert_eq!(unique.len(), got.len(), "no duplicates");
    // And then it continues live: its own connection event comes next, once.
    let (id, event) = resumed.next().await;
    assert_eq!(event["kind"], "link.connected");
    assert!(!got.contains(&id));
}

/// The first frame of a followed stream that does not resume.
async fn first_frame(node: &NodeProcess, last_event_id: Option<&str>) -> String {
    use futures::StreamExt;
    let mut request = node
        .client()
        .get(node.url("/v1/events?kind=actor.restarted"))
        .bearer_auth(&node.token);
    if let Some(id) = last_event_id {
        request = request.header("last-event-id", id);
    }
    let response = request.send().await.unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.bytes_stream();
    let mut text = String::new();
    while !text.contains("\n\n") {
        let chunk = tokio::time::timeout(PATIENCE, body.next())
            .await
            .expect("a frame within the patience")
            .expect("the stream stays open")
            .unwrap();
        text.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    text.split("\n\n").next().unwrap().to_owned()
}

#[tokio::test]
async fn a_followed_stream_names_where_it_starts_unless_it_resumes() {
    // Heartbeats each second: the resumed stream's first frame is one, when nothing else comes.
    let temp = tempfile::tempdir().unwrap();
    let env = NodeEnv {
        vars: vec![("TROUPE_EVENTS__HEARTBEAT_SECS".into(), "1".into())],
        cwd: None,
    };
    let node = NodeProcess::start_with(&temp.path().join("data"), &[], &env).await;
    // Something happened (this stream's own link.connected), but nothing matches the filter
    // below: that stream still says where it starts, as an id without data (EventSource clients
    // remember it and send it back as Last-Event-ID).
    let mut links = node.events("kind=link.connected", None).await;
    links.next_of("link.connected").await;
    let frame = first_frame(&node, None).await;
    let id = frame.strip_prefix("id: ").expect("an id frame first");
    assert!(id.contains(':') && !id.contains('\n'), "{frame:?}");
    // Resuming from it: no such frame, the stream goes on from the id given.
    let resumed = first_frame(&node, Some(id)).await;
    assert!(!resumed.starts_with("id: "), "{resumed:?}");
}

#[tokio::test]
async fn a_replay_without_follow_returns_the_tail_and_ends() {
    let node = NodeProcess::start(&[]).await;
    for _ in 0..3 {
        drop(node.events("kind=session.*", None).await);
    }
    let response = node.get("/v1/events?follow=false&tail=4&kind=link.*").await;
    assert_eq!(response.status(), 200);
    let body = tokio::time::timeout(PATIENCE, response.text())
        .await
        .expect("a finite body")
        .unwrap();
    let ids: Vec<&str> = body
        .lines()
        .filter_map(|line| {
            line.strip_prefix("id: ")
                .or_else(|| line.strip_prefix("id:"))
        })
        .collect();
    assert_eq!(ids.len(), 4, "{body}");
}

/// A link is a temporary child: a panic in one ends that stream only. It is not restarted, its
/// registry entry goes, `link.disconnected` follows, and every other stream keeps flowing.
#[tokio::test]
async fn a_panicking_link_ends_only_its_own_stream_and_is_not_restarted() {
    let node = NodeProcess::start(&["--fault-injection"]).await;
    let mut observer = node.events("kind=link.*&kind=actor.*", None).await;
    let (_, own) = observer.next_of("link.connected").await;
    let observer_link = own["data"]["link"].as_str().unwrap().to_owned();

    let mut victim = node.events("kind=link.*", None).await;
    let (_, connected) = victim.next_of("link.connected").await;
    let victim_link = connected["data"]["link"].as_str().unwrap().to_owned();
    assert_ne!(victim_link, observer_link);
    // The observer sees the victim arrive (so both are registered before the fault).
    loop {
        let (_, event) = observer.next_of("link.connected").await;
        if event["data"]["link"] == victim_link.as_str() {
            break;
        }
    }

    let response = node
        .post_json(
            "/v1/admin/faults",
            json!({"actor": format!("links/{victim_link}"), "kind": "panic"}),
        )
        .await;
    assert_eq!(response.status(), 202);
    victim.closed().await;

    // The observer's stream goes on: it sees the victim's disconnect, and nothing about the
    // victim being restarted.
    loop {
        let (_, event) = observer.next().await;
        assert_ne!(
            event["kind"], "actor.restarted",
            "no actor restarts after a link panic: {event}"
        );
        if event["kind"] == "link.disconnected" {
            assert_eq!(event["data"]["link"], victim_link.as_str());
            break;
        }
    }
    // The supervisor's decision, in the node's log: failed, and not restarted (temporary).
    let decision = node
        .logs
        .wait_for("the link's failure is not restarted", |line| {
            line["message"] == "child failed and is not restarted (its policy)"
                && line["child"] == format!("links/{victim_link}")
        })
        .await;
    assert_eq!(decision["supervisor"], "links");
    assert!(
        decision["reason"]
            .as_str()
            .unwrap()
            .contains("fault injected: panic in links/"),
        "{decision}"
    );
    assert!(
        !node
            .logs
            .json()
            .iter()
            .any(|line| line["message"] == "actor restarted"),
        "no restart was logged"
    );

    let links: serde_json::Value = node.get("/v1/links").await.json().await.unwrap();
    let ids: Vec<&str> = links["links"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|link| link["id"].as_str())
        .collect();
    assert!(!ids.contains(&victim_link.as_str()), "{links}");
    assert!(ids.contains(&observer_link.as_str()), "{links}");

    // And it still receives live events.
    let newcomer = node.events("kind=session.*", None).await;
    let (_, event) = observer.next_of("link.connected").await;
    assert_ne!(event["data"]["link"], victim_link.as_str());
    assert_ne!(event["data"]["link"], observer_link.as_str());
    drop(newcomer);
}
