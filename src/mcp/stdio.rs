//! MCP over stdin/stdout (`troupe mcp`): one JSON-RPC message per line, both ways.
//!
//! Either served here by an embedded node ([`serve_embedded`]; the caller is the local user, with
//! the admin role), or bridged to a running node's `/mcp/ws?client=stdio` ([`Bridge`]) so every
//! stdio client shares that node's sessions and events. Lines that are not UTF-8 are answered with
//! a JSON-RPC parse error and skipped; a line over [`MAX_LINE`] bytes is answered with a JSON-RPC
//! error (`-32600`, id `null`) and ends the link, and `troupe mcp` exits with a failure.

use std::sync::Arc;

use futures::{Sink, SinkExt, Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_util::codec::{AnyDelimiterCodec, FramedRead};
use troupe_actors::event::TransportKind;

use super::TroupeMcp;
use super::http::{parse_error, serve_frames};
use crate::auth::{Principal, Role};
use crate::http::ws::{CLOSE_POLICY, Incoming, Outgoing};
use crate::node::NodeCore;

/// Longest line accepted on stdin, in bytes.
pub const MAX_LINE: usize = 4 * 1024 * 1024;

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
        None,
        None,
        None,
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
        .max_message_size(Some(MAX_LINE))
        .max_frame_size(Some(MAX_LINE));
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
    loop {
        tokio::select! {
            frame = stdin.next() => match frame {
                Some(Incoming::Text(text)) => {
                    if to_node.send(Message::Text(text.into())).await.is_err() {
                        break;
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
                Some(Incoming::Binary | Incoming::Close) | None => break,
            },
            frame = from_node.next() => match frame {
                Some(Ok(Message::Text(text))) => {
                    stdout
                        .send(Outgoing::Text(text.as_str().to_owned()))
                        .await
                        .map_err(BridgeError::Stdout)?;
                }
                Some(Ok(Message::Close(close))) => {
                    tracing::info!(?close, "the node closed the MCP link");
                    break;
                }
                Some(Ok(_)) => {}
                Some(Err(error)) => {
                    tracing::warn!(%error, "the MCP link to the node failed");
                    break;
                }
                None => break,
            },
        }
    }
    let _ = to_node.send(Message::Close(None)).await;
    Ok(())
}
