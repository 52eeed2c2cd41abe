//! Operations routes: health, readiness, metrics, live links.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use troupe_actors::health::HealthStatus;

use super::ApiError;
use crate::node::NodeCore;

/// `GET /v1/health`: the HealthActor's summary. 200 while healthy or degraded, 503 when
/// unhealthy or when the HealthActor cannot answer.
pub(super) async fn health(State(core): State<Arc<NodeCore>>) -> Result<Response, ApiError> {
    let mut report = serde_json::to_value(core.tree.health.report().await?).map_err(|error| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            error.to_string(),
        )
    })?;
    let status = match report["status"].as_str() {
        Some("unhealthy") => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::OK,
    };
    report["links"] = serde_json::json!(core.tree.registry.tables().links().len());
    Ok((status, Json(report)).into_response())
}

/// `GET /v1/ready`: 200 once the tree runs and until shutdown begins.
pub(super) async fn ready(State(core): State<Arc<NodeCore>>) -> Result<Response, ApiError> {
    if core.is_shutting_down() {
        return Err(ApiError::unavailable(
            "shutting_down",
            "the node is shutting down",
        ));
    }
    let report = core.tree.health.report().await?;
    if report.status == HealthStatus::Unhealthy {
        return Err(ApiError::unavailable(
            "not_ready",
            format!("the node is unhealthy: {}", report.reasons.join("; ")),
        )
        .with_details(serde_json::json!({ "reasons": report.reasons })));
    }
    Ok(Json(serde_json::json!({ "ready": true, "node": core.node_id })).into_response())
}

/// `GET /metrics`: Prometheus text.
pub(super) async fn metrics(State(core): State<Arc<NodeCore>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        core.metrics.render(),
    )
        .into_response()
}

/// `GET /v1/links`: the live client links.
pub(super) async fn links(State(core): State<Arc<NodeCore>>) -> Json<serde_json::Value> {
    Json(serde_json::json!({ "links": core.tree.registry.tables().links() }))
}

/// `GET /v1/cluster/members`: this node and the members it knows, with their metadata.
pub(super) async fn members(State(core): State<Arc<NodeCore>>) -> Json<serde_json::Value> {
    Json(members_json(&core))
}

/// The member view as every front end shows it (REST and the MCP `cluster_members` tool).
pub(crate) fn members_json(core: &NodeCore) -> serde_json::Value {
    let this = core.cluster.as_ref().map(|endpoint| {
        serde_json::json!({
            "node": core.node_id,
            "addr": endpoint.local_addr().ok().map(|addr| addr.to_string()),
            "connected": endpoint.connected(),
        })
    });
    serde_json::json!({
        "enabled": core.cluster.is_some(),
        "self": this,
        "members": core.tree.registry.tables().members(),
    })
}
