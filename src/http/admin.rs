//! `POST /v1/admin/faults`: fault injection, routed only when `debug.fault_injection = true`.
//! This is how tests, the demo and operators prove that recovery works.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use troupe_actors::ids::ActorPath;
use troupe_actors::kernel::{FaultError, FaultKind};

use super::{ApiError, ApiJson};
use crate::node::NodeCore;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FaultRequest {
    /// Actor path: `event_bus`, `registry`, `providers/openai`, `sessions/ID`, `links/ID`, ….
    actor: String,
    /// `panic` or `error`.
    kind: FaultKind,
}

pub(super) async fn inject_fault(
    State(core): State<Arc<NodeCore>>,
    ApiJson(request): ApiJson<FaultRequest>,
) -> Result<Response, ApiError> {
    let path = ActorPath::parse(&request.actor).ok_or_else(|| {
        ApiError::bad_request(
            "invalid_actor_path",
            format!(
                "{:?} is not an actor path (e.g. \"registry\" or \"providers/openai\")",
                request.actor
            ),
        )
    })?;
    match core.tree.inject_fault(&path, request.kind) {
        Ok(()) => {
            tracing::warn!(actor = %path, kind = ?request.kind, "fault injected on request");
            Ok((
                StatusCode::ACCEPTED,
                ApiJson(
                    serde_json::json!({ "actor": path, "kind": request.kind, "injected": true }),
                ),
            )
                .into_response())
        }
        Err(FaultError::UnknownActor(actor)) => {
            let known: Vec<String> = core
                .tree
                .directory
                .list()
                .into_iter()
                .map(|(path, _)| path.to_string())
                .collect();
            Err(
                ApiError::not_found("unknown_actor", format!("no actor at path {actor}"))
                    .with_details(serde_json::json!({ "known": known })),
            )
        }
        Err(FaultError::NotRunning(actor)) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "actor_not_running",
            format!("actor {actor} is restarting or stopped right now; retry shortly"),
        )
        .retry_after(std::time::Duration::from_secs(1))),
    }
}
