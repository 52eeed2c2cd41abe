//! The HTTP API's contract: tokens and roles, the error envelope, request ids, health,
//! readiness, metrics, links.

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::support::*;

fn sha256(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

#[tokio::test]
async fn routes_need_a_token_and_say_so_in_the_envelope() {
    let node = NodeProcess::start(&[]).await;
    let client = node.client();
    for path in ["/v1/ready", "/v1/events", "/v1/links", "/metrics"] {
        let response = client.get(node.url(path)).send().await.unwrap();
        assert_eq!(response.status(), 401, "{path}");
        assert_eq!(
            response.headers()["www-authenticate"],
            "Bearer realm=\"troupe\""
        );
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "unauthorized", "{path}");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("bearer token")
        );
    }
    let wrong = client
        .get(node.url("/v1/ready"))
        .bearer_auth("not-a-token")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    // Health is open: it is the liveness probe.
    assert_eq!(
        client
            .get(node.url("/v1/health"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

#[tokio::test]
async fn a_viewer_can_read_but_not_inject_faults() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("troupe.toml");
    std::fs::write(
        &config,
        format!(
            "[auth]\ntokens = [{{ name = \"dash\", role = \"viewer\", sha256 = \"{}\" }}]\n",
            sha256("viewer-secret")
        ),
    )
    .unwrap();
    let node =
        NodeProcess::start(&["--fault-injection", "--config", config.to_str().unwrap()]).await;
    let client = node.client();
    let ready = client
        .get(node.url("/v1/ready"))
        .bearer_auth("viewer-secret")
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    let fault = client
        .post(node.url("/v1/admin/faults"))
        .bearer_auth("viewer-secret")
        .json(&json!({"actor": "registry", "kind": "panic"}))
        .send()
        .await
        .unwrap();
    assert_eq!(fault.status(), 403);
    let body: Value = fault.json().await.unwrap();
    assert_eq!(body["error"]["code"], "forbidden");
    assert_eq!(body["error"]["details"]["needed"], "admin");
}

#[tokio::test]
async fn the_fault_route_exists_only_with_fault_injection_and_checks_its_input() {
    let node = NodeProcess::start(&[]).await;
    let off = node
        .post_json(
            "/v1/admin/faults",
            json!({"actor": "registry", "kind": "panic"}),
        )
        .await;
    assert_eq!(
        off.status(),
        404,
        "no route when debug.fault_injection is off"
    );

    let node = NodeProcess::start(&["--fault-injection"]).await;
    let unknown = node
        .post_json(
            "/v1/admin/faults",
            json!({"actor": "providers/nope", "kind": "panic"}),
        )
        .await;
    assert_eq!(unknown.status(), 404);
    let body: Value = unknown.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unknown_actor");
    assert!(
        body["error"]["details"]["known"]
            .as_array()
            .unwrap()
            .contains(&json!("event_bus"))
    );

    let bad_kind = node
        .post_json(
            "/v1/admin/faults",
            json!({"actor": "registry", "kind": "explode"}),
        )
        .await;
    assert_eq!(bad_kind.status(), 400);
    assert_eq!(
        bad_kind.json::<Value>().await.unwrap()["error"]["code"],
        "invalid_body"
    );

    let not_json = node
        .client()
        .post(node.url("/v1/admin/faults"))
        .bearer_auth(&node.token)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(not_json.status(), 400);
    assert_eq!(
        not_json.json::<Value>().await.unwrap()["error"]["code"],
        "malformed_json"
    );

    let huge = node
        .client()
        .post(node.url("/v1/admin/faults"))
        .bearer_auth(&node.token)
        .header("content-type", "application/json")
        .body(format!(
            "{{\"actor\": \"{}\", \"kind\": \"panic\"}}",
            "x".repeat(2 * 1024 * 1024)
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(huge.status(), 413);
    assert_eq!(
        huge.json::<Value>().await.unwrap()["error"]["code"],
        "payload_too_large"
    );

    assert_eq!(
        node.get("/v1/health").await.status(),
        200,
        "bad input changed nothing"
    );
}

#[tokio::test]
async fn request_ids_are_echoed_or_generated_and_appear_on_log_lines() {
    let node = NodeProcess::start(&[]).await;
    let response = node
        .client()
        .get(node.url("/v1/health"))
        .header("x-request-id", "trace-me-42")
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["x-request-id"], "trace-me-42");
    node.logs
        .wait_for("a request line carrying the id", |line| {
            line["span"]["request_id"] == "trace-me-42" && line["span"]["path"] == "/v1/health"
        })
        .await;

    let generated = node.get("/v1/nowhere").await;
    assert_eq!(generated.status(), 404);
    let id = generated.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(id.len(), 36, "a generated UUID: {id}");
    let body: Value = generated.json().await.unwrap();
    assert_eq!(body["error"]["code"], "not_found");
}

#[tokio::test]
async fn health_ready_links_and_metrics_describe_the_node() {
    let node = NodeProcess::start(&[]).await;
    let health: Value = node.get("/v1/health").await.json().await.unwrap();
    assert_eq!(health["status"], "healthy");
    assert_eq!(
        health["actors"]["total"], 8,
        "the tree plus sessions/manager"
    );
    assert_eq!(health["actors"]["running"], 8);

    let ready = node.get("/v1/ready").await;
    assert_eq!(ready.status(), 200);
    assert_eq!(ready.json::<Value>().await.unwrap()["ready"], true);

    let mut stream = node.events("kind=link.*", None).await;
    stream.next_of("link.connected").await;
    let links: Value = node.get("/v1/links").await.json().await.unwrap();
    let links = links["links"].as_array().unwrap();
    assert_eq!(links.len(), 1);
    assert_eq!(links[0]["transport"], "sse");
    assert_eq!(links[0]["principal"], "admin");
    assert_eq!(links[0]["filter"], "kind=link.*");

    let metrics = node.get("/metrics").await.text().await.unwrap();
    for family in [
        "troupe_actor_restarts_total{actor=\"registry\"} 0",
        "troupe_actor_up{actor=\"event_bus\"} 1",
        "troupe_actor_mailbox_depth{actor=\"health\"}",
        "troupe_actor_messages_total{actor=\"registry\"}",
        "troupe_events_published_total{kind=\"link.connected\"} 1",
        "troupe_event_subscribers",
        "troupe_links 1",
    ] {
        assert!(metrics.contains(family), "missing {family} in:\n{metrics}");
    }
}

#[tokio::test]
async fn a_wrong_method_on_a_known_route_gets_the_envelope_and_allow() {
    let node = NodeProcess::start(&[]).await;
    let response = node
        .client()
        .put(node.url("/v1/health"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 405);
    let allow = response.headers()["allow"].to_str().unwrap().to_owned();
    assert!(allow.contains("GET"), "{allow}");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "method_not_allowed");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("/v1/health does not accept PUT"),
        "{body}"
    );
    // An unknown route is still a 404 in the same envelope.
    let response = node
        .client()
        .put(node.url("/v1/nope"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "not_found");
}
