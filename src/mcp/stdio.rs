//! MCP over stdin/stdout (`troupe mcp`): one JSON-RPC message per line, both ways.
//!
//! Either served here by an embedded node ([`serve_embedded`]; the caller is the local user, with
//! the admin role), or bridged to a running node's `/mcp/ws?client=stdio` ([`Bridge`]) so every
//! stdio client shares that node's sessions and events. Lines that are not UTF-8 are answered with
//! a JSON-RPC parse error and skipped; a line over [`MAX_LINE`] bytes is answered with a JSON-RPC
//! error (`-32600`, id `null`) and ends the link, and `troupe mcp` exits with a failure. A bridge
//! does the same when its node refuses a line or the link to it breaks, and when stdin ends it
//! writes the answers still owed to the requests it passed on (for at most five seconds).

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
/// gives (a page of output, whose text is capped at about 1 MiB, carried twice), still bounded.
const MAX_FROM_NODE: usize = 32 * 1024 * 1024;

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

/// Serves MCP on stdin/stdout with this process's node, until stdin closes. Returns why stdin
/// failed (a line over [`MAX_LINE`]), if it did.
pub async fn serve_embedded(core: Arc<NodeCore>) -> Option<String> {
    let local = Principal {
        name: "stdio".into(),
        role: Role::Admin,
    };
    let server = TroupeMcp::new(core, TransportKind::McpStdio, Some(local));
    serve_frames(
        server,
        FramesClient::default(),
        line_sink(tokio::io::stdout()),
        line_frames(tokio::io::stdin()),
    )
    .await
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

impl Bridge {
    /// Opens the node's `/mcp/ws?client=stdio` with `token`. Reads nothing from stdin, so a
    /// caller may try another node when this fails.
    pub async fn connect(addr: std::net::SocketAddr, token: &str) -> Result<Self, BridgeError> {
        connect(addr, token).await.map(|socket| Self { socket })
    }

    /// Copies stdin lines to the node and its frames to stdout, until either side ends.
    pub async fn run(self) -> Result<(), BridgeError> {
        copy(self.socket, tokio::io::stdin(), tokio::io::stdout()).await
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
        .map_err(|error| connect_error(error.to_string()))?;
    Ok(socket)
}

async fn copy(
    socket: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    input: impl AsyncRead + Unpin + Send + 'static,
    output: impl AsyncWrite + Unpin + Send + 'static,
) -> Result<(), BridgeError> {
    let (mut to_node, mut from_node) = socket.split();
    let mut stdout = line_sink(output);
    let mut stdin = line_frames(input);
    let mut pending = Pending::default();
    // Set when stdin has ended: the answers still owed are awaited until then.
    let mut draining: Option<tokio::time::Instant> = None;
    let ended = loop {
        let drain_deadline = draining.unwrap_or_else(tokio::time::Instant::now);
        tokio::select! {
            frame = stdin.next(), if draining.is_none() => match frame {
                Some(Incoming::Text(text)) => {
                    pending.sent(&text);
                    if to_node.send(Message::Text(text.into())).await.is_err() {
                        break Ended::LinkFailed("the node's link is gone".into());
                    }
                }
                Some(Incoming::Invalid(why)) => {
                    stdout
                        .send(Outgoing::Text(parse_error(&why)))
                        .await
                        .map_err(BridgeError::Stdout)?;
                }
                Some(Incoming::Failed(why)) => {
                    tracing::warn!(reason = %why, "stdin failed; ending the bridge");
                    stdout
                        .send(Outgoing::Close(CLOSE_POLICY, why.clone()))
                        .await
                        .map_err(BridgeError::Stdout)?;
                    let _ = to_node.send(Message::Close(None)).await;
                    return Err(BridgeError::Stdin(why));
                }
                Some(Incoming::Binary | Incoming::Close) | None => {
                    if pending.is_empty() {
                        break Ended::Done;
                    }
                    draining = Some(tokio::time::Instant::now() + DRAIN);
                }
            },
            frame = from_node.next() => match frame {
                Some(Ok(Message::Text(text))) => {
                    pending.answered(text.as_str());
                    stdout
                        .send(Outgoing::Text(text.as_str().to_owned()))
                        .await
                        .map_err(BridgeError::Stdout)?;
                    if draining.is_some() && pending.is_empty() {
                        break Ended::Done;
                    }
                }
                Some(Ok(Message::Close(close))) => {
                    let normal = close.as_ref().is_none_or(|frame| {
                        matches!(frame.code, CloseCode::Normal | CloseCode::Away)
                    });
                    if normal {
                        tracing::info!(?close, "the node closed the MCP link");
                        break Ended::Done;
                    }
                    let reason = close.map_or_else(String::new, |frame| {
                        format!("{} ({})", frame.reason, u16::from(frame.code))
                    });
                    break Ended::Refused(reason);
                }
                Some(Ok(_)) => {}
                Some(Err(error)) => break Ended::LinkFailed(error.to_string()),
                None => break Ended::LinkFailed("the node closed the connection".into()),
            },
            () = tokio::time::sleep_until(drain_deadline), if draining.is_some() => {
                tracing::warn!(
                    unanswered = pending.len(),
                    "stdin closed and the node did not answer every request within {DRAIN:?}"
                );
                break Ended::Done;
            }
        }
    };
    let _ = to_node.send(Message::Close(None)).await;
    let why = match ended {
        Ended::Done => return Ok(()),
        Ended::Refused(reason) => format!("the node ended the link: {reason}"),
        Ended::LinkFailed(reason) => format!("the link to the node failed: {reason}"),
    };
    tracing::warn!(reason = %why, "the MCP bridge ends");
    // The client is told why in a JSON-RPC error line, as when stdin breaks a rule.
    stdout
        .send(Outgoing::Close(CLOSE_POLICY, why.clone()))
        .await
        .map_err(BridgeError::Stdout)?;
    Err(BridgeError::Node(why))
}

/// How long a bridge whose stdin ended waits for the answers its client is still owed.
const DRAIN: std::time::Duration = std::time::Duration::from_secs(5);

/// How a bridge's copying ended.
enum Ended {
    /// stdin ended (and the owed answers came), or the node closed the link normally.
    Done,
    /// The node closed the link for a broken rule (a message over its size limit).
    Refused(String),
    /// The connection to the node failed (or an answer exceeded [`MAX_FROM_NODE`]).
    LinkFailed(String),
}

/// The ids of the requests a bridge sent and has not seen answered (as JSON text).
#[derive(Debug, Default)]
struct Pending(std::collections::HashSet<String>);

/// The fields of a JSON-RPC message that tell a request from an answer.
#[derive(serde::Deserialize)]
struct Probe {
    id: Option<serde_json::Value>,
    method: Option<serde::de::IgnoredAny>,
}

impl Pending {
    fn probe(text: &str) -> Option<(String, bool)> {
        let probe: Probe = serde_json::from_str(text).ok()?;
        Some((probe.id?.to_string(), probe.method.is_some()))
    }

    /// A line the client sent: a request is owed an answer.
    fn sent(&mut self, text: &str) {
        if let Some((id, true)) = Self::probe(text) {
            self.0.insert(id);
        }
    }

    /// A message from the node: an answer settles its request.
    fn answered(&mut self, text: &str) {
        if let Some((id, false)) = Self::probe(text) {
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
