//! MCP over stdin/stdout (`troupe mcp`): one JSON-RPC message per line, both ways.
//!
//! Either served here by an embedded node ([`serve_embedded`]; the caller is the local user, with
//! the admin role), or bridged to a running node's `/mcp/ws?client=stdio` ([`Bridge`]) so every
//! stdio client shares that node's sessions and events. Lines that are not UTF-8 are answered with
//! a JSON-RPC parse error and skipped; a line over [`MAX_LINE`] bytes is answered with a JSON-RPC
//! error (`-32600`, id `null`) and ends the link, and `troupe mcp` exits with a failure. A bridge
//! does the same when its node refuses a line, and when stdin ends it writes the answers still
//! owed to the requests it passed on (for at most five seconds).
//!
//! The client's side of the link is a [`StdioClient`], which outlives the node it is served by:
//! when a bridge's node goes away (it stopped, or the link to it broke), each request still
//! waiting is answered with an error saying so, and the caller moves the client to another node
//! (one that discovery finds, or one it starts), replaying the client's `initialize`,
//! `notifications/initialized` and last `logging/setLevel` there so the client need not know.

use std::pin::Pin;
use std::sync::Arc;

use futures::{Sink, SinkExt, Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_util::codec::{AnyDelimiterCodec, FramedRead};
use troupe_actors::event::TransportKind;

use super::TroupeMcp;
use super::http::{FramesClient, parse_error, serve_frames};
use crate::auth::{Principal, Role};
use crate::http::ws::{CLOSE_POLICY, Incoming, Outgoing};
use crate::node::NodeCore;

/// Longest line accepted on stdin, in bytes.
pub const MAX_LINE: usize = 4 * 1024 * 1024;
/// Largest message a bridge takes from its node. The node's own answers: larger than any a tool
/// gives (a page of output, whose text is capped at about 1 MiB, carried twice; a page of
/// `list_sessions`, whose sessions the tool keeps to `MAX_LIST_ANSWER_BYTES`, carried twice),
/// still bounded.
pub(crate) const MAX_FROM_NODE: usize = 32 * 1024 * 1024;

/// Lines of `input` as frames.
pub(crate) fn line_frames(
    input: impl AsyncRead + Unpin + Send + 'static,
) -> impl Stream<Item = Incoming> + Unpin + Send + 'static {
    let lines = FramedRead::new(
        input,
        AnyDelimiterCodec::new_with_max_length(b"\n".to_vec(), Vec::new(), MAX_LINE),
    );
    Box::pin(lines.filter_map(|line| {
        futures::future::ready(match line {
            Ok(bytes) => {
                let bytes = bytes.strip_suffix(b"\r").unwrap_or(&bytes);
                if bytes.iter().all(u8::is_ascii_whitespace) {
                    None
                } else {
                    Some(match std::str::from_utf8(bytes) {
                        Ok(text) => Incoming::Text(text.to_owned()),
                        Err(error) => Incoming::Invalid(format!("the line is not UTF-8: {error}")),
                    })
                }
            }
            Err(error) => Some(Incoming::Failed(format!(
                "{error} (lines are at most {MAX_LINE} bytes)"
            ))),
        })
    }))
}

/// The JSON-RPC error line that tells a stdio client why its link ends.
fn closing_line(reason: &str) -> String {
    serde_json::json!({
        "jsonrpc": "2.0",
        "id": null,
        "error": {"code": -32600, "message": format!("the link ends: {reason}")},
    })
    .to_string()
}

/// A sink writing each text frame as one line on `output`; a close for a broken rule is written
/// as a JSON-RPC error line saying why.
pub(crate) fn line_sink(
    output: impl AsyncWrite + Unpin + Send + 'static,
) -> impl Sink<Outgoing, Error = std::io::Error> + Unpin + Send + 'static {
    Box::pin(futures::sink::unfold(
        output,
        |mut output, frame: Outgoing| async move {
            let line = match frame {
                Outgoing::Text(text) => Some(text),
                Outgoing::SharedText(text) => Some(text.as_str().to_owned()),
                Outgoing::Close(CLOSE_POLICY, reason) => Some(closing_line(&reason)),
                Outgoing::Close(..) | Outgoing::Ping => None,
            };
            if let Some(line) = line {
                output.write_all(line.as_bytes()).await?;
                output.write_all(b"\n").await?;
                output.flush().await?;
            }
            Ok::<_, std::io::Error>(output)
        },
    ))
}

/// The stdio client of `troupe mcp`: its lines in and out, the answers it is owed, and how it set
/// up its MCP session. It outlives the node serving it (see the module's doc).
pub struct StdioClient {
    input: Pin<Box<dyn Stream<Item = Incoming> + Send>>,
    output: Pin<Box<dyn Sink<Outgoing, Error = std::io::Error> + Send>>,
    owed: Pending,
    setup: Setup,
}

impl StdioClient {
    /// The process's own stdin and stdout.
    pub fn stdio() -> Self {
        Self::new(tokio::io::stdin(), tokio::io::stdout())
    }

    /// A client whose lines come from `input` and go to `output`.
    pub fn new(
        input: impl AsyncRead + Unpin + Send + 'static,
        output: impl AsyncWrite + Unpin + Send + 'static,
    ) -> Self {
        Self {
            input: Box::pin(line_frames(input)),
            output: Box::pin(line_sink(output)),
            owed: Pending::default(),
            setup: Setup::default(),
        }
    }

    /// A line the client sent, on its way to a node.
    fn sent(&mut self, text: &str) {
        if let Some(probe) = Probe::of(text) {
            self.owed.sent(&probe);
            if probe.method.as_deref() == Some("notifications/cancelled") {
                // The client gave the request up: no answer is owed (the server sends none).
                self.owed.cancelled(text);
            }
            self.setup.sent(&probe, text);
        }
    }

    /// A message from the node: `false` when it answers a replayed request (not the client's).
    fn received(&mut self, text: &str) -> bool {
        let Some(probe) = Probe::of(text) else {
            return true;
        };
        if Setup::is_replayed(&probe) {
            if probe.error.is_some() {
                tracing::warn!(answer = %text, "the node refused a replayed setup request");
            }
            return false;
        }
        self.owed.answered(&probe);
        self.setup.answered(&probe);
        true
    }

    /// Answers every request still owed with an error saying the node went away (`why`).
    async fn fail_owed(&mut self, why: &str) -> Result<(), BridgeError> {
        for id in std::mem::take(&mut self.owed.0) {
            self.setup.answered_with_error(&id);
            let id: serde_json::Value = serde_json::from_str(&id).unwrap_or_default();
            let message = format!(
                "the node went away before answering ({why}); the request may or may not have \
                 taken effect"
            );
            self.output
                .send(Outgoing::Text(super::http::error_reply(
                    id, -32603, &message, None,
                )))
                .await
                .map_err(BridgeError::Stdout)?;
        }
        Ok(())
    }
}

/// Serves MCP to `client` with this process's node, until its input closes. The client's session
/// setup, if it was served elsewhere before, is replayed first. Returns why the input failed (a
/// line over [`MAX_LINE`]), if it did.
pub async fn serve_embedded(core: Arc<NodeCore>, client: StdioClient) -> Option<String> {
    let local = Principal {
        name: crate::auth::STDIO_PRINCIPAL.into(),
        role: Role::Admin,
    };
    let server = TroupeMcp::new(core, TransportKind::McpStdio, Some(local));
    let StdioClient {
        input,
        output,
        setup,
        ..
    } = client;
    let replay = futures::stream::iter(setup.replay().into_iter().map(Incoming::Text));
    let output = output.with_flat_map(|frame: Outgoing| {
        let replayed = match &frame {
            // Most frames are tool results: only one that names a replayed id is parsed.
            Outgoing::Text(text) => {
                text.contains(REPLAYED_ID)
                    && Probe::of(text).is_some_and(|probe| Setup::is_replayed(&probe))
            }
            _ => false,
        };
        futures::stream::iter((!replayed).then_some(Ok(frame)))
    });
    serve_frames(server, FramesClient::default(), output, replay.chain(input)).await
}

/// Why a bridge could not start or ended badly.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    /// The node refused or could not be reached.
    #[error("cannot open {url}: {reason}")]
    Connect {
        /// The WebSocket URL.
        url: String,
        /// What happened.
        reason: String,
    },
    /// The node answered, and refused this client (its token holds its most links, or is not
    /// accepted): another node would not do better, nor would starting one on its data.
    #[error("{url} refused this client ({status}): {reason}")]
    Refused {
        /// The WebSocket URL.
        url: String,
        /// The HTTP status of the refusal.
        status: u16,
        /// What the node said.
        reason: String,
    },
    /// Writing to stdout failed.
    #[error("stdout: {0}")]
    Stdout(std::io::Error),
    /// Reading stdin failed (a line over [`MAX_LINE`] bytes); the client was told.
    #[error("stdin: {0}")]
    Stdin(String),
    /// The node refused a message (one over its `http.max_body_bytes`) or the link to it
    /// failed; the client was told.
    #[error("{0}")]
    Node(String),
}

/// A bridge connected to a node's `/mcp/ws`, not yet copying.
pub struct Bridge {
    socket: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
}

/// How a bridge ended without an error.
#[derive(Debug)]
pub enum BridgeEnd {
    /// The client's input ended (and the answers it was owed were written).
    Done,
    /// The node went away (why): the client's owed answers were failed, and it may go on with
    /// another node.
    NodeGone(String),
}

impl Bridge {
    /// Opens the node's `/mcp/ws?client=stdio` with `token`. Reads nothing from stdin, so a
    /// caller may try another node when this fails.
    pub async fn connect(addr: std::net::SocketAddr, token: &str) -> Result<Self, BridgeError> {
        connect(addr, token).await.map(|socket| Self { socket })
    }

    /// Replays the client's session setup (when it was served elsewhere before), then copies its
    /// lines to the node and the node's messages to it, until either side ends.
    pub async fn run(self, client: &mut StdioClient) -> Result<BridgeEnd, BridgeError> {
        copy(self.socket, client).await
    }
}

/// How long connecting to a node may take before the bridge gives up on it.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

async fn connect(
    addr: std::net::SocketAddr,
    token: &str,
) -> Result<
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    BridgeError,
> {
    let url = format!("ws://{addr}/mcp/ws?client=stdio");
    let connect_error = |reason: String| BridgeError::Connect {
        url: url.clone(),
        reason,
    };
    let mut request = url
        .as_str()
        .into_client_request()
        .map_err(|error| connect_error(error.to_string()))?;
    let bearer = HeaderValue::from_str(&format!("Bearer {token}"))
        .map_err(|_| connect_error("the token is not a valid header value".into()))?;
    request.headers_mut().insert("authorization", bearer);
    request
        .headers_mut()
        .insert("sec-websocket-protocol", HeaderValue::from_static("mcp"));
    let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .max_message_size(Some(MAX_FROM_NODE))
        .max_frame_size(Some(MAX_FROM_NODE));
    let connecting = tokio_tungstenite::connect_async_with_config(request, Some(config), true);
    let (socket, _) = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
        .await
        .map_err(|_| connect_error(format!("no answer within {CONNECT_TIMEOUT:?}")))?
        .map_err(|error| match error {
            tokio_tungstenite::tungstenite::Error::Http(response)
                if matches!(response.status().as_u16(), 401 | 403 | 429) =>
            {
                BridgeError::Refused {
                    url: url.clone(),
                    status: response.status().as_u16(),
                    reason: refusal_reason(response.body().as_deref()),
                }
            }
            other => connect_error(other.to_string()),
        })?;
    Ok(socket)
}

/// The message of the node's error envelope (`{"error": {"code", "message"}}`), with its code;
/// the body itself (cut) when it is not one.
fn refusal_reason(body: Option<&[u8]>) -> String {
    let body = body.unwrap_or_default();
    let envelope: Option<serde_json::Value> = serde_json::from_slice(body).ok();
    match envelope.as_ref().map(|value| &value["error"]) {
        Some(error) if error["message"].is_string() => format!(
            "{} ({})",
            error["message"].as_str().unwrap_or_default(),
            error["code"].as_str().unwrap_or("no code")
        ),
        _ => String::from_utf8_lossy(&body[..body.len().min(500)]).into_owned(),
    }
}

async fn copy(
    socket: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    client: &mut StdioClient,
) -> Result<BridgeEnd, BridgeError> {
    let (mut to_node, mut from_node) = socket.split();
    // Set when stdin has ended: the answers still owed are awaited until then.
    let mut draining: Option<tokio::time::Instant> = None;
    let mut replay = client.setup.replay().into_iter();
    let ended = loop {
        // The client's setup goes first, in order, before any of its new lines.
        if let Some(text) = replay.next() {
            if to_node.send(Message::Text(text.into())).await.is_err() {
                break Ended::LinkFailed("the node's link is gone".into());
            }
            continue;
        }
        let drain_deadline = draining.unwrap_or_else(tokio::time::Instant::now);
        tokio::select! {
            frame = client.input.next(), if draining.is_none() => match frame {
                Some(Incoming::Text(text)) => {
                    client.sent(&text);
                    if to_node.send(Message::Text(text.into())).await.is_err() {
                        break Ended::LinkFailed("the node's link is gone".into());
                    }
                }
                Some(Incoming::Invalid(why)) => {
                    client
                        .output
                        .send(Outgoing::Text(parse_error(&why)))
                        .await
                        .map_err(BridgeError::Stdout)?;
                }
                Some(Incoming::Failed(why)) => {
                    tracing::warn!(reason = %why, "stdin failed; ending the bridge");
                    client
                        .output
                        .send(Outgoing::Close(CLOSE_POLICY, why.clone()))
                        .await
                        .map_err(BridgeError::Stdout)?;
                    let _ = to_node.send(Message::Close(None)).await;
                    return Err(BridgeError::Stdin(why));
                }
                Some(Incoming::Binary | Incoming::Close) | None => {
                    if client.owed.is_empty() {
                        break Ended::Done;
                    }
                    draining = Some(tokio::time::Instant::now() + DRAIN);
                }
            },
            frame = from_node.next() => match frame {
                Some(Ok(Message::Text(text))) => {
                    if client.received(text.as_str()) {
                        client
                            .output
                            .send(Outgoing::Text(text.as_str().to_owned()))
                            .await
                            .map_err(BridgeError::Stdout)?;
                    }
                    if draining.is_some() && client.owed.is_empty() {
                        break Ended::Done;
                    }
                }
                Some(Ok(Message::Close(close))) => {
                    let normal = close.as_ref().is_none_or(|frame| {
                        matches!(frame.code, CloseCode::Normal | CloseCode::Away)
                    });
                    let reason = close.map_or_else(
                        || "closed without a reason".to_owned(),
                        |frame| format!("{} ({})", frame.reason, u16::from(frame.code)),
                    );
                    if normal {
                        tracing::info!(%reason, "the node closed the MCP link");
                        break Ended::LinkFailed(format!("the node closed the link: {reason}"));
                    }
                    break Ended::Refused(reason);
                }
                Some(Ok(_)) => {}
                Some(Err(error)) => break Ended::LinkFailed(error.to_string()),
                None => break Ended::LinkFailed("the node closed the connection".into()),
            },
            () = tokio::time::sleep_until(drain_deadline), if draining.is_some() => {
                tracing::warn!(
                    unanswered = client.owed.len(),
                    "stdin closed and the node did not answer every request within {DRAIN:?}"
                );
                break Ended::Done;
            }
        }
    };
    let _ = to_node.send(Message::Close(None)).await;
    match ended {
        Ended::Done => Ok(BridgeEnd::Done),
        Ended::Refused(reason) => {
            let why = format!("the node ended the link: {reason}");
            tracing::warn!(reason = %why, "the MCP bridge ends");
            // The client is told why in a JSON-RPC error line, as when stdin breaks a rule.
            client
                .output
                .send(Outgoing::Close(CLOSE_POLICY, why.clone()))
                .await
                .map_err(BridgeError::Stdout)?;
            Err(BridgeError::Node(why))
        }
        Ended::LinkFailed(why) => {
            client.fail_owed(&why).await?;
            if draining.is_some() {
                // The client has nothing more to say: nothing to move elsewhere.
                return Ok(BridgeEnd::Done);
            }
            Ok(BridgeEnd::NodeGone(why))
        }
    }
}

/// How long a bridge whose stdin ended waits for the answers its client is still owed.
const DRAIN: std::time::Duration = std::time::Duration::from_secs(5);

/// How a bridge's copying ended.
enum Ended {
    /// stdin ended, and the owed answers came (or stopped being awaited).
    Done,
    /// The node closed the link for a broken rule (a message over its size limit).
    Refused(String),
    /// The node went away: it closed the link (stopping), the connection failed, or an answer
    /// exceeded [`MAX_FROM_NODE`].
    LinkFailed(String),
}

/// The fields of a JSON-RPC message that tell a request from an answer, and how it went.
#[derive(serde::Deserialize)]
struct Probe {
    id: Option<serde_json::Value>,
    method: Option<String>,
    error: Option<serde::de::IgnoredAny>,
}

impl Probe {
    fn of(text: &str) -> Option<Self> {
        serde_json::from_str(text).ok()
    }

    /// The id as JSON text (how requests are matched to answers).
    fn id(&self) -> Option<String> {
        self.id.as_ref().map(serde_json::Value::to_string)
    }
}

/// The ids of the requests a bridge sent and has not seen answered (as JSON text).
#[derive(Debug, Default)]
struct Pending(std::collections::HashSet<String>);

impl Pending {
    /// A message the client sent: a request is owed an answer.
    fn sent(&mut self, probe: &Probe) {
        if probe.method.is_some()
            && let Some(id) = probe.id()
        {
            self.0.insert(id);
        }
    }

    /// The client's `notifications/cancelled` (its text): the request it names is owed no
    /// answer any more.
    fn cancelled(&mut self, text: &str) {
        #[derive(serde::Deserialize)]
        struct Cancelled {
            params: CancelledParams,
        }
        #[derive(serde::Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct CancelledParams {
            request_id: serde_json::Value,
        }
        if let Ok(cancelled) = serde_json::from_str::<Cancelled>(text) {
            self.0.remove(&cancelled.params.request_id.to_string());
        }
    }

    /// A message from the node: an answer settles its request.
    fn answered(&mut self, probe: &Probe) {
        if probe.method.is_none()
            && let Some(id) = probe.id()
        {
            self.0.remove(&id);
        }
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn len(&self) -> usize {
        self.0.len()
    }
}

/// The start of the ids a bridge gives the setup requests it replays to a new node, so their
/// answers are told from the client's.
const REPLAYED_ID: &str = "troupe-mcp/replayed/";

/// How the client set up its MCP session (protocols before 2026-07-28 have a handshake and a
/// session log level), so that another node can be brought to the same point.
#[derive(Debug, Default)]
struct Setup {
    /// Its `initialize` request, once answered with a result.
    initialize: Option<serde_json::Value>,
    /// Its `initialize` request while the answer is owed (the id as JSON text).
    initializing: Option<(String, serde_json::Value)>,
    /// Whether it sent `notifications/initialized` since.
    initialized: bool,
    /// Its last `logging/setLevel` request.
    log_level: Option<serde_json::Value>,
}

impl Setup {
    fn sent(&mut self, probe: &Probe, text: &str) {
        match probe.method.as_deref() {
            Some("initialize") => {
                // A new handshake starts the session over.
                *self = Self::default();
                if let (Some(id), Ok(request)) = (probe.id(), serde_json::from_str(text)) {
                    self.initializing = Some((id, request));
                }
            }
            Some("notifications/initialized") => self.initialized = true,
            Some("logging/setLevel") => self.log_level = serde_json::from_str(text).ok(),
            _ => {}
        }
    }

    fn answered(&mut self, probe: &Probe) {
        let answers_initialize = self
            .initializing
            .as_ref()
            .is_some_and(|(id, _)| probe.id().as_deref() == Some(id.as_str()));
        if probe.method.is_none() && answers_initialize {
            let (_, request) = self.initializing.take().expect("checked above");
            if probe.error.is_none() {
                self.initialize = Some(request);
            }
        }
    }

    /// The request `id` (JSON text) was answered with an error by the bridge.
    fn answered_with_error(&mut self, id: &str) {
        if self
            .initializing
            .as_ref()
            .is_some_and(|(pending, _)| pending == id)
        {
            self.initializing = None;
        }
    }

    /// The messages that bring a new node to this client's setup, in order, requests with ids of
    /// their own ([`REPLAYED_ID`]).
    fn replay(&self) -> Vec<String> {
        let Some(initialize) = &self.initialize else {
            return Vec::new();
        };
        let with_id = |request: &serde_json::Value, name: &str| {
            let mut request = request.clone();
            request["id"] = serde_json::Value::String(format!("{REPLAYED_ID}{name}"));
            request.to_string()
        };
        let mut lines = vec![with_id(initialize, "initialize")];
        if self.initialized {
            lines.push(
                serde_json::json!({"jsonrpc": "2.0", "method": "notifications/initialized"})
                    .to_string(),
            );
        }
        if let Some(level) = &self.log_level {
            lines.push(with_id(level, "logging/setLevel"));
        }
        lines
    }

    /// Whether `probe` answers a replayed request.
    fn is_replayed(probe: &Probe) -> bool {
        probe.method.is_none()
            && matches!(&probe.id, Some(serde_json::Value::String(id)) if id.starts_with(REPLAYED_ID))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sent(setup: &mut Setup, message: serde_json::Value) {
        let text = message.to_string();
        setup.sent(&Probe::of(&text).unwrap(), &text);
    }

    fn answered(setup: &mut Setup, message: serde_json::Value) {
        setup.answered(&Probe::of(&message.to_string()).unwrap());
    }

    fn initialize(id: u64) -> serde_json::Value {
        serde_json::json!({"jsonrpc": "2.0", "id": id, "method": "initialize",
                           "params": {"protocolVersion": "2025-11-25", "capabilities": {},
                                      "clientInfo": {"name": "t", "version": "0"}}})
    }

    #[test]
    fn a_completed_setup_is_replayed_in_order_under_ids_of_its_own() {
        let mut setup = Setup::default();
        assert!(
            setup.replay().is_empty(),
            "no handshake (2026-07-28), nothing to replay"
        );
        sent(&mut setup, initialize(7));
        assert!(setup.replay().is_empty(), "not answered yet");
        answered(
            &mut setup,
            serde_json::json!({"jsonrpc": "2.0", "id": 7, "result": {}}),
        );
        sent(
            &mut setup,
            serde_json::json!({"jsonrpc": "2.0", "method": "notifications/initialized"}),
        );
        sent(
            &mut setup,
            serde_json::json!({"jsonrpc": "2.0", "id": 8, "method": "logging/setLevel",
                               "params": {"level": "info"}}),
        );
        sent(
            &mut setup,
            serde_json::json!({"jsonrpc": "2.0", "id": 9, "method": "logging/setLevel",
                               "params": {"level": "debug"}}),
        );
        let replay: Vec<serde_json::Value> = setup
            .replay()
            .iter()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect();
        assert_eq!(replay.len(), 3, "{replay:?}");
        assert_eq!(replay[0]["method"], "initialize");
        assert_eq!(replay[0]["id"], "troupe-mcp/replayed/initialize");
        assert_eq!(
            replay[0]["params"],
            initialize(7)["params"],
            "the client's own"
        );
        assert_eq!(replay[1]["method"], "notifications/initialized");
        assert!(replay[1].get("id").is_none());
        assert_eq!(replay[2]["params"]["level"], "debug", "the last level set");
        assert_eq!(replay[2]["id"], "troupe-mcp/replayed/logging/setLevel");
        let answer = format!(
            r#"{{"jsonrpc":"2.0","id":{},"result":{{}}}}"#,
            replay[0]["id"]
        );
        assert!(Setup::is_replayed(&Probe::of(&answer).unwrap()));
        let own = r#"{"jsonrpc":"2.0","id":7,"result":{}}"#;
        assert!(!Setup::is_replayed(&Probe::of(own).unwrap()));
    }

    #[test]
    fn a_request_the_client_cancelled_is_owed_no_answer() {
        let (input, _) = tokio::io::duplex(64);
        let (output, _) = tokio::io::duplex(64);
        let mut client = StdioClient::new(input, output);
        for id in [1, 2] {
            client.sent(
                &serde_json::json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
                                    "params": {"name": "node_health", "arguments": {}}})
                .to_string(),
            );
        }
        client.sent(
            &serde_json::json!({"jsonrpc": "2.0", "method": "notifications/cancelled",
                                "params": {"requestId": 1, "reason": "user"}})
            .to_string(),
        );
        assert_eq!(
            client.owed.0,
            ["2".to_owned()].into(),
            "only the one not cancelled"
        );
    }

    #[test]
    fn a_handshake_that_failed_or_was_cut_off_is_not_replayed() {
        let mut setup = Setup::default();
        sent(&mut setup, initialize(1));
        answered(
            &mut setup,
            serde_json::json!({"jsonrpc": "2.0", "id": 1,
                               "error": {"code": -32602, "message": "no"}}),
        );
        assert!(setup.replay().is_empty(), "refused");

        sent(&mut setup, initialize(2));
        setup.answered_with_error("2");
        answered(
            &mut setup,
            serde_json::json!({"jsonrpc": "2.0", "id": 2, "result": {}}),
        );
        assert!(
            setup.replay().is_empty(),
            "cut off: its node went away first"
        );

        // A second handshake starts the session over.
        sent(&mut setup, initialize(3));
        answered(
            &mut setup,
            serde_json::json!({"jsonrpc": "2.0", "id": 3, "result": {}}),
        );
        sent(
            &mut setup,
            serde_json::json!({"jsonrpc": "2.0", "method": "notifications/initialized"}),
        );
        sent(&mut setup, initialize(4));
        answered(
            &mut setup,
            serde_json::json!({"jsonrpc": "2.0", "id": 4, "result": {}}),
        );
        assert_eq!(
            setup.replay().len(),
            1,
            "initialized belongs to the first handshake"
        );
    }
}

#[cfg(test)]
mod refusal_tests {
    use super::*;

    /// Regression: a node that refused the bridge's upgrade (its token held its most links) was
    /// taken for one that could not be reached: `troupe mcp` tried the next node, then to start
    /// one on the data directory the running node held, and gave up some 15 s later with a
    /// message about the data directory. A refusal is now an error of its own that says why.
    #[tokio::test]
    async fn a_node_that_refuses_the_bridge_says_why() {
        crate::tls::install_default_provider();
        let dir = tempfile::tempdir().unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut config = crate::config::Config::default();
        config.auth.max_links_per_token = 1;
        let node = crate::node::Node::builder()
            .config(config)
            .data_dir(dir.path().join("data"))
            .listener(listener)
            .start()
            .await
            .unwrap();
        let token = std::fs::read_to_string(node.admin_token_path()).unwrap();
        let token = token.trim();
        let addr = node.http_addr().unwrap();
        // The token's one link: an event stream, held open.
        let held = reqwest::Client::new()
            .get(format!("http://{addr}/v1/events"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_eq!(held.status(), 200);

        match Bridge::connect(addr, token).await {
            Err(BridgeError::Refused { status, reason, .. }) => {
                assert_eq!(status, 429);
                assert!(reason.contains("too_many_links"), "{reason}");
            }
            Err(other) => panic!("expected a refusal, got {other}"),
            Ok(_) => panic!("the bridge was let in past the token's links"),
        }
        drop(held);
        node.shutdown().await;
    }
}
