//! The MCP server (official SDK `rmcp`): one tool set over every MCP transport — Streamable HTTP
//! at `/mcp` and WebSocket at `/mcp/ws` ([`http`]), stdin/stdout ([`stdio`], `troupe mcp`).
//!
//! Tools: `spawn_session`, `get_session`, `list_sessions`, `cancel_session`, `session_output`,
//! `node_health`, `list_providers`, `cluster_members`. Roles apply as on REST: a viewer token reads, an operator
//! also spawns and cancels. Tool failures the caller can act on (unknown session, refused
//! request, missing role) are tool results with `isError: true` and the API's error envelope
//! as structured content; protocol misuse is a JSON-RPC error.
//!
//! Each MCP client is a link owned by a TransportActor (opened on its first request: a legacy
//! session, a WebSocket, or a single stateless request of the 2026-07-28 protocol). MCP
//! responses are never dropped: the transports queue them and make senders wait.

pub mod http;
mod idle;
mod logging;
pub mod stdio;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::tool::ToolCallContext;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, CancelTaskParams, CreateTaskResult,
    DetailedTask, GetTaskParams, GetTaskResult, Implementation, JsonObject,
    ListPromptsRequestMethod, ListPromptsResult, ListResourceTemplatesRequestMethod,
    ListResourceTemplatesResult, ListResourcesRequestMethod, ListResourcesResult, ListToolsResult,
    PaginatedRequestParams, ProgressNotificationParam, ServerCapabilities, ServerConfig,
    SetLevelRequestMethod, Task, TaskPayload, TaskStatus, Tool,
};
use rmcp::schemars::{self, JsonSchema};
use rmcp::service::RequestContext;
use rmcp::{ErrorData as McpError, RoleServer, ServerHandler, tool, tool_router};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::Mutex as AsyncMutex;
use troupe_actors::event::{
    Delivery, EventData, EventFilter, KindPattern, SessionKindTag, TransportKind,
};
use troupe_actors::ids::SessionId;
use troupe_actors::session::SessionState;

use crate::auth::{Principal, Role};
use crate::cluster::remote::{self, Hop, ListFilters, Routed};
use crate::http::ApiError;
use crate::json::SessionJson;
use crate::link::{LinkError, LinkGuard, open_link};
use crate::node::NodeCore;
use crate::session::request::SessionRequest;
use crate::session::{SessionError, SessionView};
use crate::store::{MAX_OUTPUT_PAGE, MAX_PAGE, SessionQuery};

/// The MCP server of one client.
#[derive(Clone)]
pub struct TroupeMcp {
    core: Arc<NodeCore>,
    tool_router: ToolRouter<TroupeMcp>,
    transport: TransportKind,
    /// Who calls when the transport carries no HTTP request (stdio: the local user).
    local_principal: Option<Principal>,
    /// The client's link, opened on its first request (or up front for a socket transport).
    link: Arc<AsyncMutex<LinkSlot>>,
    /// The level a legacy session set with `logging/setLevel`.
    log_level: logging::SessionLogLevel,
    /// Legacy Streamable HTTP sessions, which end when idle (`/mcp` only).
    idle_sessions: Option<Arc<idle::IdleSessions>>,
}

/// `spawn_session` arguments.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SpawnArgs {
    /// The session to run, as `POST /v1/sessions` takes it.
    pub session: SessionArgs,
    /// Wait until the session ends and return its final record. With a progress token the
    /// call sends `notifications/progress` as the session starts, prints and reports progress.
    /// Cancelling the call stops the waiting, not the session (use `cancel_session`).
    #[serde(default)]
    pub wait: bool,
}

/// A session request (the body of `POST /v1/sessions`).
#[derive(Debug, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SessionArgs {
    /// `command` (any allowed program), `aider` (the Aider coding agent) or `chat` (one LLM
    /// conversation through the node's providers).
    pub kind: String,
    /// command: the program (a name in PATH or a path; must be in `sessions.allowed_programs`
    /// when that list is set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub program: Option<String>,
    /// command, aider: arguments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<Vec<String>>,
    /// command: environment entries added for the run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<BTreeMap<String, String>>,
    /// command, aider: working directory (relative to the node's first workspace root, or an
    /// absolute path inside a workspace root).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    /// aider: the instruction.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// aider: files to edit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files: Option<Vec<String>>,
    /// aider, chat: the model (`provider/model`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// aider: let Aider use git.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub git: Option<bool>,
    /// chat: the conversation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages: Option<Vec<ChatMessageArgs>>,
    /// Seconds before the run is stopped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u64>,
    /// 0 (lowest) to 9; higher runs first when the node is busy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u8>,
    /// Labels to find the session by.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
    /// A retry with the same key returns the first session instead of a second one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// Cluster: run on this member (a node id as `cluster_members` lists them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Cluster: let the cluster choose the node, `"least_loaded"`, or with label constraints
    /// `{"strategy": "least_loaded", "labels": {"zone": "eu"}}` (only nodes carrying every
    /// label). Not together with `node`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<PlacementArgs>,
}

/// Where the cluster runs a session.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum PlacementArgs {
    /// `"least_loaded"`.
    Strategy(String),
    /// A strategy with label constraints.
    Constrained {
        /// `"least_loaded"`.
        strategy: String,
        /// Labels the chosen node must carry.
        #[serde(default)]
        labels: BTreeMap<String, String>,
    },
}

/// One chat message.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ChatMessageArgs {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

/// Arguments naming one session.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SessionIdArgs {
    /// The session id (`s-…`), as `spawn_session` or `list_sessions` returned it.
    pub id: String,
}

/// `list_sessions` arguments.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListArgs {
    /// Only sessions in these states (`queued`, `starting`, `running`, `succeeded`, `failed`,
    /// `cancelled`, `timed_out`, `interrupted`).
    #[serde(default)]
    pub state: Vec<String>,
    /// Only sessions of these kinds (`command`, `aider`, `chat`).
    #[serde(default)]
    pub kind: Vec<String>,
    /// Only sessions carrying all these labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Page size, 1 to 1000 (default 100).
    #[serde(default)]
    pub limit: Option<usize>,
    /// The `next_cursor` of the previous page.
    #[serde(default)]
    pub cursor: Option<String>,
    /// `local` (this node, the default) or `cluster`: every member's sessions too, with
    /// `nodes` saying which answered; sessions of an unreachable member are shown from their
    /// last known record as `unreachable`. `cursor` does not apply to `cluster`.
    #[serde(default)]
    pub scope: Option<String>,
}

/// `session_output` arguments.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OutputArgs {
    /// The session id.
    pub id: String,
    /// Return lines after this line number (0: from the start).
    #[serde(default)]
    pub offset: u64,
    /// Most lines to return, 1 to 10,000 (default 1,000).
    #[serde(default)]
    pub limit: Option<usize>,
}

/// A tool result with the API's error envelope (`details` is `{}` when there are none, as
/// over REST).
fn tool_error(error: ApiError) -> CallToolResult {
    CallToolResult::structured_error(json!({
        "error": {
            "code": error.code,
            "message": error.message,
            "details": error.details.unwrap_or_else(|| json!({})),
        }
    }))
}

/// A routed session answer as a tool result: the local value rendered by `here`, or the
/// owner's answer (its record or page, or its error envelope).
fn routed_result<T>(
    routed: Result<Routed<T>, ApiError>,
    here: impl FnOnce(T) -> Value,
) -> CallToolResult {
    match routed {
        Ok(Routed::Here(value)) => CallToolResult::structured(here(value)),
        Ok(Routed::There { answer, .. }) => match answer.json() {
            Ok(body) => CallToolResult::structured(body),
            Err(envelope) => CallToolResult::structured_error(envelope),
        },
        Err(error) => tool_error(error),
    }
}

/// Whether a session record (JSON) is in a final state.
fn record_ended(record: &Value) -> bool {
    record["state"]
        .as_str()
        .and_then(|state| state.parse::<SessionState>().ok())
        .is_some_and(SessionState::is_terminal)
}

fn page_json(page: &crate::store::OutputPage) -> Value {
    json!({
        "lines": page.lines.iter().map(|line| json!({
            "line": line.line,
            "stream": line.stream,
            "text": line.text,
        })).collect::<Vec<_>>(),
        "next_offset": page.next_offset,
        "total": page.total,
        "truncated": page.truncated,
    })
}

fn view_json(view: &SessionView) -> Value {
    serde_json::to_value(SessionJson(view)).unwrap_or_default()
}

fn session_id(raw: &str) -> Result<SessionId, CallToolResult> {
    SessionId::new(raw).map_err(|_| {
        tool_error(ApiError::not_found(
            "unknown_session",
            format!("no session {:?}", raw.chars().take(80).collect::<String>()),
        ))
    })
}

/// Whether a session event ends the session.
fn is_terminal(data: &EventData) -> bool {
    matches!(
        data,
        EventData::SessionSucceeded(_)
            | EventData::SessionFailed(_)
            | EventData::SessionCancelled(_)
            | EventData::SessionTimedOut(_)
            | EventData::SessionInterrupted(_)
    )
}

/// A client's link, and when a legacy session whose link could not be opened again tries next.
#[derive(Default)]
struct LinkSlot {
    guard: Option<LinkGuard>,
    retry_at: Option<tokio::time::Instant>,
}

/// How long a legacy MCP session whose link could not be opened again is served without one
/// before its next request tries again.
const LINK_RETRY: Duration = Duration::from_secs(5);

/// The JSON-RPC error of a request whose client's link could not be opened. Past a bound (the
/// token's `auth.max_links_per_token`, or the node's) it says `too_many_links` and the bound, as
/// REST's 429 / 503 do, in [`http::TOO_MANY_LINKS`] with `data` `{"code": "too_many_links",
/// "max": N}`: not an "internal error" the client could only retry.
fn link_refused(error: &LinkError) -> McpError {
    match error {
        LinkError::TooManyForToken { max, .. } | LinkError::TooMany { max } => McpError::new(
            rmcp::model::ErrorCode(http::TOO_MANY_LINKS),
            format!("too_many_links: {error}"),
            Some(json!({"code": "too_many_links", "max": max})),
        ),
        LinkError::Unavailable(_) => McpError::internal_error(
            error.to_string(),
            Some(json!({"code": "links_unavailable"})),
        ),
    }
}

impl TroupeMcp {
    /// A server for one client of `transport`. `local_principal` is who calls when requests
    /// carry no HTTP request (stdio).
    pub fn new(
        core: Arc<NodeCore>,
        transport: TransportKind,
        local_principal: Option<Principal>,
    ) -> Self {
        Self {
            core,
            tool_router: Self::tool_router(),
            transport,
            local_principal,
            link: Arc::default(),
            log_level: logging::SessionLogLevel::default(),
            idle_sessions: None,
        }
    }

    /// Counts this server's requests as the activity of their legacy session.
    pub(crate) fn with_idle_sessions(mut self, sessions: Arc<idle::IdleSessions>) -> Self {
        self.idle_sessions = Some(sessions);
        self
    }

    /// Marks the request's legacy session busy until the guard goes (nothing for transports
    /// and requests without one).
    fn busy(&self, extensions: &rmcp::model::Extensions) -> Option<idle::Busy> {
        let sessions = self.idle_sessions.as_ref()?;
        let id = extensions
            .get::<axum::http::request::Parts>()?
            .headers
            .get("mcp-session-id")?
            .to_str()
            .ok()?;
        Some(sessions.busy(id))
    }

    /// The caller, from the HTTP request the auth middleware let through, or the local one.
    fn principal(&self, ctx: &RequestContext<RoleServer>) -> Option<Principal> {
        ctx.extensions
            .get::<axum::http::request::Parts>()
            .and_then(|parts| parts.extensions.get::<Principal>().cloned())
            .or_else(|| self.local_principal.clone())
    }

    fn peer(ctx: &RequestContext<RoleServer>) -> Option<SocketAddr> {
        ctx.extensions
            .get::<axum::http::request::Parts>()
            .and_then(|parts| {
                parts
                    .extensions
                    .get::<axum::extract::ConnectInfo<SocketAddr>>()
            })
            .map(|info| info.0)
    }

    /// Opens this client's link on its first request. A legacy Streamable HTTP session outlives
    /// its TransportActor when the TransportSupervisor restarts (its links are temporary
    /// children): its next request opens a new link, so it is listed again; if that fails, the
    /// session is served without a link and tries again after [`LINK_RETRY`]. A socket
    /// transport ends with its link instead (its socket side watches the link's `closed`).
    async fn ensure_link(&self, ctx: &RequestContext<RoleServer>) -> Result<(), McpError> {
        let mut slot = self.link.lock().await;
        let reopening = match slot.guard.as_ref() {
            None => false,
            Some(open) if !open.closed.is_cancelled() => return Ok(()),
            Some(_) if self.transport != TransportKind::McpHttp => {
                return Err(McpError::internal_error(
                    "this client's link has ended; reconnect",
                    None,
                ));
            }
            Some(open) => {
                if slot
                    .retry_at
                    .is_some_and(|at| tokio::time::Instant::now() < at)
                {
                    return Ok(());
                }
                tracing::info!(link = %open.id, "the link of a legacy MCP session ended; opening another");
                true
            }
        };
        // In a task of its own: a request cancelled meanwhile leaves no link behind without its
        // guard (the task's unread guard is dropped, which ends that link).
        let opening = tokio::spawn({
            let core = self.core.clone();
            let transport = self.transport;
            let peer = Self::peer(ctx);
            let principal = self.principal(ctx);
            async move {
                open_link(
                    &core,
                    transport,
                    peer,
                    principal.as_ref(),
                    troupe_actors::event::FilterSet::none(),
                )
                .await
            }
        });
        let opened = match opening.await {
            Ok(opened) => opened,
            Err(error) => Err(LinkError::Unavailable(format!(
                "opening the link failed: {error}"
            ))),
        };
        match opened {
            Ok(opened) => {
                slot.guard = Some(opened);
                slot.retry_at = None;
                Ok(())
            }
            Err(error) if reopening => {
                tracing::warn!(%error, "cannot open another link for a legacy MCP session; serving it without one for now");
                slot.retry_at = Some(tokio::time::Instant::now() + LINK_RETRY);
                Ok(())
            }
            Err(error) => Err(link_refused(&error)),
        }
    }

    /// Opens this client's link now (socket transports, which know their client up front);
    /// returns its `closed` token, which ends the socket side.
    pub async fn attach_link(
        &self,
        peer: Option<SocketAddr>,
        principal: Option<&Principal>,
    ) -> Result<tokio_util::sync::CancellationToken, crate::link::LinkError> {
        let mut slot = self.link.lock().await;
        if let Some(open) = slot.guard.as_ref() {
            return Ok(open.closed.clone());
        }
        let opened = open_link(
            &self.core,
            self.transport,
            peer,
            principal,
            troupe_actors::event::FilterSet::none(),
        )
        .await?;
        let closed = opened.closed.clone();
        slot.guard = Some(opened);
        Ok(closed)
    }

    /// The caller if its role allows `needed`; otherwise the tool's error result.
    fn require(
        &self,
        ctx: &RequestContext<RoleServer>,
        tool: &str,
        needed: Role,
    ) -> Result<Principal, CallToolResult> {
        let principal = self.principal(ctx).ok_or_else(|| {
            tool_error(ApiError::unauthorized(
                "this MCP transport carries no credentials",
            ))
        })?;
        if !principal.role.allows(needed) {
            return Err(tool_error(
                ApiError::forbidden(format!(
                    "token {:?} has role {}; {tool} needs {}",
                    principal.name,
                    principal.role.as_str(),
                    needed.as_str()
                ))
                .with_details(json!({
                    "role": principal.role.as_str(),
                    "needed": needed.as_str(),
                })),
            ));
        }
        Ok(principal)
    }

    /// Session `id`'s record, here or from its owner.
    async fn record(&self, id: &SessionId) -> Result<Value, CallToolResult> {
        match remote::get(&self.core, id, Hop::Client).await {
            Ok(Routed::Here(view)) => Ok(view_json(&view)),
            Ok(Routed::There { answer, .. }) => {
                answer.json().map_err(CallToolResult::structured_error)
            }
            Err(error) => Err(tool_error(error)),
        }
    }

    /// Waits for session `id` to end, sending progress notifications when the caller gave a
    /// progress token and log notifications when it asked for a log level ([`logging`]). `None`
    /// when the client cancelled the call (the session keeps running).
    async fn wait_for_end(
        &self,
        id: &SessionId,
        mut events: troupe_actors::event::Subscription,
        ctx: &RequestContext<RoleServer>,
    ) -> Result<Option<Value>, CallToolResult> {
        let token = ctx.meta.get_progress_token();
        let log_level = logging::requested_level(ctx, &self.log_level);
        let mut steps = 0u32;
        let record = self.record(id).await?;
        if record_ended(&record) {
            return Ok(Some(record));
        }
        loop {
            let delivery = tokio::select! {
                biased;
                () = ctx.ct.cancelled() => return Ok(None),
                delivery = events.recv() => delivery,
            };
            match delivery {
                None => {
                    return Err(tool_error(ApiError::unavailable(
                        "shutting_down",
                        "the node's event bus stopped while waiting for the session",
                    )));
                }
                Some(Delivery::Lagged(_)) => {
                    let record = self.record(id).await?;
                    if record_ended(&record) {
                        return Ok(Some(record));
                    }
                }
                Some(Delivery::Event(event)) => {
                    if log_level.is_some() {
                        self.log_event(&event, log_level, ctx).await;
                    }
                    if is_terminal(&event.data) {
                        return Ok(Some(self.record(id).await?));
                    }
                    // Its node went down: the owner's answer (or the 503 naming it) decides.
                    if let EventData::SessionUnreachable(_) = &event.data {
                        let record = self.record(id).await?;
                        if record_ended(&record) {
                            return Ok(Some(record));
                        }
                    }
                    if let (Some(token), Some(message)) =
                        (&token, logging::progress_message(&event.data))
                    {
                        steps += 1;
                        let param = ProgressNotificationParam::new(token.clone(), steps.into())
                            .with_message(message);
                        // A client that went away is seen through `ctx.ct`.
                        let _ = ctx.peer.notify_progress(param).await;
                    }
                }
            }
        }
    }
}

impl TroupeMcp {
    /// Sends a session event as a log notification when it is at or above `asked`.
    #[allow(deprecated)] // rmcp's logging types: see `logging`.
    async fn log_event(
        &self,
        event: &Arc<troupe_actors::event::Event>,
        asked: Option<rmcp::model::LoggingLevel>,
        ctx: &RequestContext<RoleServer>,
    ) {
        let delivery = Delivery::Event(event.clone());
        let (_, text) = crate::json::delivery_to_json(&self.core.node_id, &delivery);
        let json = serde_json::from_str(&text).unwrap_or(Value::String(text));
        if let Some(message) = logging::log_message(event, json)
            && logging::wanted(message.level, asked)
        {
            // A client that went away is seen through `ctx.ct`.
            let _ = ctx.peer.notify_logging_message(message).await;
        }
    }
}

/// A session as an MCP task: the task id is the session id.
fn task_of(view: &SessionView) -> Task {
    let record = &view.record;
    let updated = record
        .ended_at
        .or(record.started_at)
        .unwrap_or(record.created_at);
    Task::new(
        record.id.as_str(),
        TaskStatus::Working,
        record.created_at.to_string(),
        updated.to_string(),
    )
    .with_status_message(record.state.as_str())
    .with_poll_interval_ms(1000)
}

/// A session's task with its payload: working until it ends; cancelled when cancelled; otherwise
/// completed, with the final record as the tool result, which is an error result (`isError:
/// true`) when the session failed, timed out or was interrupted. A tool that ran and failed is a
/// completed task whose result says so; `failed` is for a task the server could not run, and its
/// payload would have to be a JSON-RPC error object.
fn detailed_task(view: &SessionView) -> DetailedTask {
    let record = view_json(view);
    let as_object = |value: Value| -> JsonObject {
        match value {
            Value::Object(object) => object,
            other => JsonObject::from_iter([("value".to_owned(), other)]),
        }
    };
    let payload = match view.record.state {
        SessionState::Succeeded => TaskPayload::Completed {
            result: as_object(
                serde_json::to_value(CallToolResult::structured(record)).unwrap_or_default(),
            ),
        },
        SessionState::Cancelled => TaskPayload::Cancelled,
        state if state.is_terminal() => TaskPayload::Completed {
            result: as_object(
                serde_json::to_value(CallToolResult::structured_error(record)).unwrap_or_default(),
            ),
        },
        _ => TaskPayload::Working,
    };
    DetailedTask::new(task_of(view), payload)
}

impl TroupeMcp {
    /// A role check for protocol methods (not tools): a JSON-RPC error when it fails.
    fn require_protocol(
        &self,
        ctx: &RequestContext<RoleServer>,
        needed: Role,
    ) -> Result<Principal, McpError> {
        let principal = self
            .principal(ctx)
            .ok_or_else(|| McpError::invalid_request("no credentials", None))?;
        if !principal.role.allows(needed) {
            return Err(McpError::invalid_request(
                format!(
                    "token {:?} has role {}; this needs {}",
                    principal.name,
                    principal.role.as_str(),
                    needed.as_str()
                ),
                None,
            ));
        }
        Ok(principal)
    }

    /// `spawn_session` for a client of the tasks extension: the session starts and the call
    /// answers with its task.
    async fn spawn_task(
        &self,
        request: CallToolRequestParams,
        ctx: &RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, McpError> {
        if let Err(denied) = self.require(ctx, "spawn_session", Role::Operator) {
            return Ok(denied.into());
        }
        let args: SpawnArgs =
            serde_json::from_value(Value::Object(request.arguments.unwrap_or_default()))
                .map_err(|error| McpError::invalid_params(error.to_string(), None))?;
        let session: SessionRequest = serde_json::to_value(&args.session)
            .and_then(serde_json::from_value)
            .map_err(|error| McpError::invalid_params(error.to_string(), None))?;
        // A session placed on another node is answered with its record: tasks are this
        // node's sessions.
        match remote::spawn(&self.core, session, Hop::Client).await {
            Ok(Routed::Here(view)) => Ok(CallToolResponse::Task(CreateTaskResult::new(task_of(
                &view,
            )))),
            other => Ok(routed_result(other, |view| view_json(&view)).into()),
        }
    }
}

#[tool_router]
impl TroupeMcp {
    #[tool(
        description = "Start a session on this troupe node: a command, an Aider coding run or an \
                       LLM chat. Returns the session record (id, state, queue position). With \
                       wait=true, waits until the session ends and returns its final record, \
                       sending progress notifications when the request carries a progress token. \
                       In a cluster, session.node runs it on that member and session.placement \
                       (least_loaded, optionally with labels) lets the cluster choose. \
                       Needs the operator role."
    )]
    async fn spawn_session(
        &self,
        Parameters(args): Parameters<SpawnArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, McpError> {
        if let Err(denied) = self.require(&ctx, "spawn_session", Role::Operator) {
            return Ok(denied);
        }
        let request: SessionRequest =
            match serde_json::to_value(&args.session).and_then(serde_json::from_value) {
                Ok(request) => request,
                Err(error) => {
                    return Ok(tool_error(ApiError::bad_request(
                        "invalid_session",
                        error.to_string(),
                    )));
                }
            };
        // Subscribe before submitting, so no event of the new session is missed.
        let events = args.wait.then(|| {
            self.core.tree.events.subscribe(EventFilter {
                kinds: vec![KindPattern::Family("session".into())],
                ..EventFilter::all()
            })
        });
        let (id, record) = match remote::spawn(&self.core, request, Hop::Client).await {
            Ok(Routed::Here(view)) => (view.record.id.clone(), view_json(&view)),
            Ok(Routed::There { answer, .. }) => match answer.json() {
                Ok(record) => match record["id"].as_str().map(SessionId::new) {
                    Some(Ok(id)) => (id, record),
                    _ => return Ok(CallToolResult::structured_error(record)),
                },
                Err(envelope) => return Ok(CallToolResult::structured_error(envelope)),
            },
            Err(error) => return Ok(tool_error(error)),
        };
        let Some(mut events) = events else {
            return Ok(CallToolResult::structured(record));
        };
        events.set_filter(EventFilter {
            kinds: vec![KindPattern::Family("session".into())],
            sessions: vec![id.clone()],
            ..EventFilter::all()
        });
        match self.wait_for_end(&id, events, &ctx).await {
            Ok(Some(end)) => Ok(CallToolResult::structured(end)),
            // Cancelled: the protocol sends no response; the session runs on.
            Ok(None) => Err(McpError::internal_error(
                "the call was cancelled; the session keeps running",
                None,
            )),
            Err(error) => Ok(error),
        }
    }

    #[tool(
        description = "One session's record: state, exit code, timestamps, spec (environment \
                       values redacted), queue position while queued.",
        annotations(read_only_hint = true)
    )]
    async fn get_session(
        &self,
        Parameters(args): Parameters<SessionIdArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, McpError> {
        if let Err(denied) = self.require(&ctx, "get_session", Role::Viewer) {
            return Ok(denied);
        }
        let id = match session_id(&args.id) {
            Ok(id) => id,
            Err(error) => return Ok(error),
        };
        let routed = remote::get(&self.core, &id, Hop::Client).await;
        Ok(routed_result(routed, |view| view_json(&view)))
    }

    #[tool(
        description = "Sessions of this node (scope cluster: of every member too), newest first, \
                       filtered by state, kind and labels; \
                       pages with next_cursor (a page also ends once it holds 8 MiB of records; \
                       a cluster listing then says how many it omitted).",
        annotations(read_only_hint = true)
    )]
    async fn list_sessions(
        &self,
        Parameters(args): Parameters<ListArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, McpError> {
        if let Err(denied) = self.require(&ctx, "list_sessions", Role::Viewer) {
            return Ok(denied);
        }
        match self.list(args).await {
            Ok(value) => Ok(CallToolResult::structured(value)),
            Err(error) => Ok(tool_error(error)),
        }
    }

    #[tool(
        description = "Cancel a session: a queued one never runs, a running one is stopped \
                       (its process group gets SIGTERM, then SIGKILL). Idempotent. Needs the \
                       operator role.",
        annotations(destructive_hint = true, idempotent_hint = true)
    )]
    async fn cancel_session(
        &self,
        Parameters(args): Parameters<SessionIdArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, McpError> {
        if let Err(denied) = self.require(&ctx, "cancel_session", Role::Operator) {
            return Ok(denied);
        }
        let id = match session_id(&args.id) {
            Ok(id) => id,
            Err(error) => return Ok(error),
        };
        let routed = remote::cancel(&self.core, &id, Hop::Client).await;
        Ok(routed_result(routed, |view| view_json(&view)))
    }

    #[tool(
        description = "A page of a session's output lines (stdout, stderr or chat tokens) after \
                       line `offset`; pass next_offset back to continue.",
        annotations(read_only_hint = true)
    )]
    async fn session_output(
        &self,
        Parameters(args): Parameters<OutputArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, McpError> {
        if let Err(denied) = self.require(&ctx, "session_output", Role::Viewer) {
            return Ok(denied);
        }
        let id = match session_id(&args.id) {
            Ok(id) => id,
            Err(error) => return Ok(error),
        };
        let limit = args.limit.unwrap_or(1000);
        if !(1..=MAX_OUTPUT_PAGE).contains(&limit) {
            return Ok(tool_error(ApiError::bad_request(
                "invalid_parameter",
                format!("limit={limit}: use 1 to {MAX_OUTPUT_PAGE}"),
            )));
        }
        let routed = remote::output(&self.core, &id, args.offset, limit, Hop::Client).await;
        Ok(routed_result(routed, |page| page_json(&page)))
    }

    #[tool(
        description = "The node's health: status (healthy, degraded, unhealthy), actors running \
                       and restarting, recent restarts, reasons, live links.",
        annotations(read_only_hint = true)
    )]
    async fn node_health(
        &self,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, McpError> {
        if let Err(denied) = self.require(&ctx, "node_health", Role::Viewer) {
            return Ok(denied);
        }
        Ok(match self.core.tree.health.report().await {
            Ok(report) => {
                let mut value = serde_json::to_value(report).unwrap_or_default();
                value["node"] = json!(self.core.node_id.as_str());
                value["links"] = json!(self.core.tree.registry.tables().links().len());
                CallToolResult::structured(value)
            }
            Err(error) => tool_error(error.into()),
        })
    }

    #[tool(
        description = "The LLM providers of this node, live: per provider its models, fallback \
                       chain, budget (rpm/tpm and what is left), circuit breaker state, calls in \
                       flight and queued, counters and recent errors.",
        annotations(read_only_hint = true)
    )]
    async fn list_providers(
        &self,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, McpError> {
        if let Err(denied) = self.require(&ctx, "list_providers", Role::Viewer) {
            return Ok(denied);
        }
        let providers: Vec<_> = self
            .core
            .providers
            .providers()
            .map(|provider| provider.status())
            .collect();
        Ok(CallToolResult::structured(
            json!({ "providers": providers }),
        ))
    }

    #[tool(
        description = "The cluster as this node sees it: whether it is clustered, its own QUIC \
                       address, and every member with its state (alive, suspect, down, left), \
                       generation and gossiped metadata (load, labels, HTTP address).",
        annotations(read_only_hint = true)
    )]
    async fn cluster_members(
        &self,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, McpError> {
        if let Err(denied) = self.require(&ctx, "cluster_members", Role::Viewer) {
            return Ok(denied);
        }
        Ok(CallToolResult::structured(crate::http::ops::members_json(
            &self.core,
        )))
    }
}

impl TroupeMcp {
    async fn list(&self, args: ListArgs) -> Result<Value, ApiError> {
        let limit = args.limit.unwrap_or(100);
        if !(1..=MAX_PAGE).contains(&limit) {
            return Err(ApiError::bad_request(
                "invalid_limit",
                format!("limit={limit}: use 1 to {MAX_PAGE}"),
            ));
        }
        if args.state.len() + args.kind.len() + args.labels.len() > 64 {
            return Err(ApiError::bad_request(
                "invalid_filter",
                "at most 64 filter values",
            ));
        }
        let cluster = match args.scope.as_deref() {
            None | Some("local") => false,
            Some("cluster") if args.cursor.is_some() => {
                return Err(ApiError::bad_request(
                    "invalid_parameter",
                    "cursor does not apply to scope cluster (each node lists its newest `limit` \
                     sessions)",
                ));
            }
            Some("cluster") => true,
            Some(other) => {
                return Err(ApiError::bad_request(
                    "invalid_parameter",
                    format!("scope={other:?}: use local or cluster"),
                ));
            }
        };
        let kinds = args.kind.clone();
        let mut query = SessionQuery {
            limit,
            cursor: args.cursor,
            labels: args.labels,
            ..SessionQuery::default()
        };
        for state in &args.state {
            query.states.push(
                state
                    .parse::<SessionState>()
                    .map_err(|message| ApiError::bad_request("invalid_filter", message))?,
            );
        }
        for kind in &args.kind {
            query.kinds.push(
                kind.parse::<SessionKindTag>()
                    .map_err(|message| ApiError::bad_request("invalid_filter", message))?,
            );
        }
        let (query_states, query_labels) = (query.states.clone(), query.labels.clone());
        let page = self
            .core
            .sessions
            .list_views(query)
            .await
            .map_err(|error| match error {
                SessionError::Store(troupe_actors::session::StoreError::Invalid(message)) => {
                    ApiError::bad_request("invalid_cursor", message)
                }
                other => other.into(),
            })?;
        let mut sessions: Vec<Value> = page.sessions.iter().map(view_json).collect();
        if cluster {
            let filters = ListFilters {
                states: query_states,
                kinds,
                labels: query_labels,
                limit,
            };
            let mut answer =
                remote::list_cluster(&self.core, &filters, sessions, page.next_cursor).await;
            // Newest first: the oldest go. A cluster listing has no cursor to go on from; the
            // answer says how many it left out (ask again with a smaller `limit`).
            if let Some(merged) = answer["sessions"].as_array_mut() {
                let fit = fitting(merged);
                if fit < merged.len() {
                    let omitted = merged.len() - fit;
                    merged.truncate(fit);
                    answer["omitted"] = json!(omitted);
                    answer["complete"] = json!(false);
                }
            }
            return Ok(answer);
        }
        let mut next_cursor = page.next_cursor;
        let fit = fitting(&sessions);
        if fit < sessions.len() {
            sessions.truncate(fit);
            next_cursor = Some(crate::store::cursor_after(&page.sessions[fit - 1].record));
        }
        Ok(json!({"sessions": sessions, "next_cursor": next_cursor}))
    }
}

/// Most bytes of sessions (their records as JSON) a `list_sessions` answer carries: a page ends
/// early past it, with the `next_cursor` to go on from (and always holds one session). A page of
/// the store may hold 16 MiB of records (`MAX_SESSION_PAGE_BYTES`), a cluster listing one of
/// every member, and the answer carries its sessions twice (structured content, and the same
/// JSON as text, which escaping makes at most twice as long): without this bound an answer
/// passed what `troupe mcp`'s bridge takes from its node (`stdio::MAX_FROM_NODE`), which then
/// dropped the link and connected again, and again.
pub(crate) const MAX_LIST_ANSWER_BYTES: usize = 8 * 1024 * 1024;

// Three times the sessions, and the rest of the answer, within what the bridge takes.
const _: () = assert!(3 * MAX_LIST_ANSWER_BYTES + 1024 * 1024 <= stdio::MAX_FROM_NODE);

/// How many of `sessions` (newest first) an answer carries: those whose JSON fits in
/// [`MAX_LIST_ANSWER_BYTES`] together, and at least one.
fn fitting(sessions: &[Value]) -> usize {
    let mut bytes = 0usize;
    for (index, session) in sessions.iter().enumerate() {
        bytes = bytes.saturating_add(json_len(session));
        if bytes > MAX_LIST_ANSWER_BYTES && index > 0 {
            return index;
        }
    }
    sessions.len()
}

/// The length of `value` as compact JSON, without writing it out.
fn json_len(value: &Value) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0 += bytes.len();
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    // Writing into a counter cannot fail, and a `Value` always serializes.
    let _ = serde_json::to_writer(&mut count, value);
    count.0
}

impl ServerHandler for TroupeMcp {
    #[allow(deprecated)] // the logging capability: see `logging`.
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(
            ServerCapabilities::builder()
                .enable_tools()
                .enable_tasks()
                .enable_logging()
                .build(),
        )
        .with_server_info(Implementation::new("troupe", env!("CARGO_PKG_VERSION")))
        .with_instructions(
            "troupe runs agent sessions (commands, Aider, LLM chats) under supervision. \
                 spawn_session starts one (wait=true follows it to the end with progress), \
                 get_session / list_sessions / session_output read them, cancel_session stops \
                 one. node_health, list_providers and cluster_members describe the node and its cluster.",
        )
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, McpError> {
        let _busy = self.busy(&ctx.extensions);
        self.ensure_link(&ctx).await?;
        Ok(ListToolsResult::with_all_items(self.tool_router.list_all()))
    }

    fn get_tool(&self, name: &str) -> Option<Tool> {
        self.tool_router.get(name).cloned()
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, McpError> {
        let _busy = self.busy(&ctx.extensions);
        self.ensure_link(&ctx).await?;
        // Sessions are tasks for clients that declare the tasks extension: in the request's own
        // capabilities (2026-07-28), or at `initialize` (older sessions). spawn_session then
        // answers with a task at once.
        let client_tasks = ctx
            .client_capabilities()
            .is_some_and(|capabilities| capabilities.supports_tasks());
        if request.name == "spawn_session" && client_tasks {
            return self.spawn_task(request, &ctx).await;
        }
        self.tool_router
            .call(ToolCallContext::new(self, request, ctx))
            .await
    }

    async fn get_task(
        &self,
        request: GetTaskParams,
        ctx: RequestContext<RoleServer>,
    ) -> Result<GetTaskResult, McpError> {
        let _busy = self.busy(&ctx.extensions);
        self.require_protocol(&ctx, Role::Viewer)?;
        let id = SessionId::new(&request.task_id).map_err(|_| {
            McpError::invalid_params(format!("no task {:?}", request.task_id), None)
        })?;
        let view = self.core.sessions.get(&id).await.map_err(|error| {
            let error = ApiError::from(error);
            McpError::invalid_params(error.message, None)
        })?;
        Ok(GetTaskResult::new(detailed_task(&view)))
    }

    async fn cancel_task(
        &self,
        request: CancelTaskParams,
        ctx: RequestContext<RoleServer>,
    ) -> Result<(), McpError> {
        let _busy = self.busy(&ctx.extensions);
        self.require_protocol(&ctx, Role::Operator)?;
        let id = SessionId::new(&request.task_id).map_err(|_| {
            McpError::invalid_params(format!("no task {:?}", request.task_id), None)
        })?;
        self.core.sessions.cancel(&id).await.map_err(|error| {
            let error = ApiError::from(error);
            McpError::invalid_params(error.message, None)
        })?;
        Ok(())
    }

    /// `logging/setLevel` of a legacy session (2025-11-25 and older): later waiting calls of this
    /// client send log notifications at or above the level. 2026-07-28 has no such method (a
    /// request carries its own level): `-32601` there.
    #[allow(deprecated)] // rmcp's logging types: see `logging`.
    async fn set_level(
        &self,
        request: rmcp::model::SetLevelRequestParams,
        ctx: RequestContext<RoleServer>,
    ) -> Result<(), McpError> {
        let _busy = self.busy(&ctx.extensions);
        if logging::is_stateless(&ctx) {
            return Err(McpError::method_not_found::<SetLevelRequestMethod>());
        }
        self.log_level.set(request.level);
        Ok(())
    }

    async fn ping(&self, ctx: RequestContext<RoleServer>) -> Result<(), McpError> {
        let _busy = self.busy(&ctx.extensions);
        Ok(())
    }

    async fn on_initialized(&self, ctx: rmcp::service::NotificationContext<RoleServer>) {
        let _busy = self.busy(&ctx.extensions);
    }

    // troupe offers no prompts or resources: say so rather than answer empty lists.
    async fn list_prompts(
        &self,
        _request: Option<PaginatedRequestParams>,
        _ctx: RequestContext<RoleServer>,
    ) -> Result<ListPromptsResult, McpError> {
        Err(McpError::method_not_found::<ListPromptsRequestMethod>())
    }

    async fn list_resources(
        &self,
        _request: Option<PaginatedRequestParams>,
        _ctx: RequestContext<RoleServer>,
    ) -> Result<ListResourcesResult, McpError> {
        Err(McpError::method_not_found::<ListResourcesRequestMethod>())
    }

    async fn list_resource_templates(
        &self,
        _request: Option<PaginatedRequestParams>,
        _ctx: RequestContext<RoleServer>,
    ) -> Result<ListResourceTemplatesResult, McpError> {
        Err(McpError::method_not_found::<
            ListResourceTemplatesRequestMethod,
        >())
    }
}

#[cfg(test)]
mod tests {
    use troupe_actors::ids::Timestamp;
    use troupe_actors::session::{
        ChatMessage, ChatSession, SessionKind, SessionRecord, SessionSpec, SessionStore,
    };

    use super::*;

    /// A succeeded chat session with a label `note` of `note`, created at `created_micros`.
    fn chat_record(
        node: &troupe_actors::ids::NodeId,
        id: &str,
        created_micros: u64,
        note: &str,
    ) -> SessionRecord {
        SessionRecord {
            id: SessionId::new(id).unwrap(),
            node: node.clone(),
            spec: SessionSpec {
                kind: SessionKind::Chat(ChatSession {
                    model: "fake/m1".into(),
                    messages: vec![ChatMessage {
                        role: "user".into(),
                        content: "hi".into(),
                    }],
                }),
                timeout_secs: None,
                priority: 5,
                labels: BTreeMap::from([("note".to_owned(), note.to_owned())]),
                idempotency_key: None,
            },
            state: SessionState::Succeeded,
            created_at: Timestamp::from_micros(created_micros),
            started_at: None,
            ended_at: None,
            exit_code: None,
            signal: None,
            reason: None,
            process: None,
            output_lines: 0,
            stop_requested: None,
        }
    }

    /// Regression: a `list_sessions` page held up to 16 MiB of records, and the answer carries
    /// them twice (structured content, and the same JSON as text, where each `"` of a label
    /// takes four bytes): past the 32 MiB a `troupe mcp` bridge takes from its node, which then
    /// dropped the link and connected again, and again. A page of the tool ends at 8 MiB of
    /// records, with the cursor to go on from, and the pages still list every session once.
    #[tokio::test]
    async fn a_list_sessions_answer_stays_well_below_what_the_bridge_takes() {
        let dir = tempfile::tempdir().unwrap();
        let node = crate::node::test_node(dir.path()).await;
        let core = node.core().clone();
        // Each record: 2 MiB as JSON, 4 MiB more in the answer's text.
        let quotes = "\"".repeat(1024 * 1024);
        let base = Timestamp::now().as_micros();
        let mut created = Vec::new();
        for n in 0..9u64 {
            let id = format!("s-big{n}");
            let record = chat_record(&core.node_id, &id, base + n, &quotes);
            core.store.create(record).await.unwrap();
            created.push(id);
        }
        created.reverse();
        let server = TroupeMcp::new(core.clone(), TransportKind::McpStdio, None);
        let (mut listed, mut cursor, mut pages) = (Vec::new(), None, 0);
        loop {
            let args = ListArgs {
                cursor: cursor.take(),
                ..ListArgs::default()
            };
            let page = server.list(args).await.unwrap();
            pages += 1;
            let sessions = page["sessions"].as_array().unwrap();
            let answer = serde_json::to_string(&CallToolResult::structured(page.clone())).unwrap();
            assert!(
                answer.len() < stdio::MAX_FROM_NODE,
                "an answer of {} bytes, over the bridge's {}",
                answer.len(),
                stdio::MAX_FROM_NODE
            );
            let bytes: usize = sessions.iter().map(json_len).sum();
            assert!(
                bytes <= MAX_LIST_ANSWER_BYTES || sessions.len() == 1,
                "a page of {bytes} bytes of sessions"
            );
            listed.extend(
                sessions
                    .iter()
                    .map(|session| session["id"].as_str().unwrap().to_owned()),
            );
            match page["next_cursor"].as_str() {
                Some(next) => cursor = Some(next.to_owned()),
                None => break,
            }
        }
        assert_eq!(listed, created, "every session once, newest first");
        assert!(pages >= 3, "{pages} pages");
        node.shutdown().await;
    }

    /// An answer keeps the sessions (newest first) that fit the bound together, and always one.
    #[test]
    fn an_answer_keeps_at_least_one_session_and_what_fits() {
        let session = |bytes: usize| json!({"id": "s", "pad": "x".repeat(bytes)});
        let third = MAX_LIST_ANSWER_BYTES / 3;
        assert_eq!(
            fitting(&[session(third), session(third), session(third)]),
            2
        );
        assert_eq!(fitting(&[session(MAX_LIST_ANSWER_BYTES * 2)]), 1);
        assert_eq!(fitting(&[session(10), session(10)]), 2);
        assert_eq!(fitting(&[]), 0);
    }
}
