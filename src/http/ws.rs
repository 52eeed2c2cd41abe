//! What every WebSocket link shares: frames in our own terms (so link logic is generic over a
//! `Sink` and a `Stream` and tests drive it with channels), the adapter from axum's socket, and
//! the Host/Origin check of the upgrade request (browsers do not apply CORS to WebSockets, so a
//! page on another origin could otherwise open one; DNS rebinding is refused the same way).

use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use axum::http::{HeaderMap, Uri, header};
use futures::{Sink, SinkExt, Stream, StreamExt};

use super::ApiError;

/// A frame from the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Incoming {
    /// A text frame.
    Text(String),
    /// A binary frame (no link accepts them; each answers with an error).
    Binary,
    /// A frame that cannot be a message (e.g. a stdin line that is not UTF-8); answered with an
    /// error, the link stays.
    Invalid(String),
    /// The client closed the link.
    Close,
    /// The socket failed: a frame over the size limit, a protocol error, a reset.
    Failed(String),
}

/// A frame to the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outgoing {
    /// A text frame.
    Text(String),
    /// A text frame whose bytes are shared with other links (an event rendered once for all its
    /// subscribers), sent without a copy.
    SharedText(Utf8Bytes),
    /// A keep-alive ping.
    Ping,
    /// Close the link with a code and a reason.
    Close(u16, String),
}

/// Close code: the endpoint is going away (the node closed the link).
pub(crate) const CLOSE_GOING_AWAY: u16 = 1001;
/// Close code: policy violation (the client broke the link's rules).
pub(crate) const CLOSE_POLICY: u16 = 1008;
/// Close code: normal closure.
pub(crate) const CLOSE_NORMAL: u16 = 1000;

/// When a socket last heard from its client: any frame, pings and pongs included.
#[derive(Debug)]
pub(crate) struct Heard(std::sync::Mutex<tokio::time::Instant>);

impl Heard {
    /// Heard just now.
    pub(crate) fn new() -> std::sync::Arc<Self> {
        std::sync::Arc::new(Self(std::sync::Mutex::new(tokio::time::Instant::now())))
    }

    fn now(&self) {
        *self.0.lock().unwrap_or_else(|poison| poison.into_inner()) = tokio::time::Instant::now();
    }

    /// How long the client has been silent.
    pub(crate) fn silent_for(&self) -> Duration {
        self.0
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .elapsed()
    }
}

/// Splits an upgraded socket into our frame types; every frame from the client is noted in
/// `heard`, when given.
pub(crate) fn split(
    socket: WebSocket,
    heard: Option<std::sync::Arc<Heard>>,
) -> (
    impl Sink<Outgoing, Error = axum::Error> + Send + Unpin + 'static,
    impl Stream<Item = Incoming> + Send + Unpin + 'static,
) {
    let (sink, stream) = socket.split();
    let sink = sink.with(|frame: Outgoing| {
        futures::future::ready(Ok::<_, axum::Error>(match frame {
            Outgoing::Text(text) => Message::Text(text.into()),
            Outgoing::SharedText(text) => Message::Text(text),
            Outgoing::Ping => Message::Ping(Default::default()),
            Outgoing::Close(code, reason) => Message::Close(Some(CloseFrame {
                code,
                reason: reason.into(),
            })),
        }))
    });
    let stream = stream.filter_map(move |frame| {
        if let (Some(heard), Ok(_)) = (&heard, &frame) {
            heard.now();
        }
        futures::future::ready(match frame {
            Ok(Message::Text(text)) => Some(Incoming::Text(text.as_str().to_owned())),
            Ok(Message::Binary(_)) => Some(Incoming::Binary),
            Ok(Message::Close(_)) => Some(Incoming::Close),
            Ok(Message::Ping(_) | Message::Pong(_)) => None,
            Err(error) => Some(Incoming::Failed(error.to_string())),
        })
    });
    (Box::pin(sink), Box::pin(stream))
}

/// Sends `frames` in order and then flushes once (one socket write for the lot, as far as the
/// sink buffers), giving up after `timeout` for all of them (a client that stopped reading).
pub(crate) async fn send_all_within<S>(
    sink: &mut S,
    frames: impl IntoIterator<Item = Outgoing>,
    timeout: Duration,
) -> Result<(), SendFailure>
where
    S: Sink<Outgoing> + Unpin,
    S::Error: std::fmt::Display,
{
    let send = async {
        for frame in frames {
            sink.feed(frame).await?;
        }
        sink.flush().await
    };
    match tokio::time::timeout(timeout, send).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(error)) => Err(SendFailure::Socket(error.to_string())),
        Err(_) => Err(SendFailure::Stalled(timeout)),
    }
}

/// Sends one frame, giving up after `timeout` (a client that stopped reading).
pub(crate) async fn send_within<S>(
    sink: &mut S,
    frame: Outgoing,
    timeout: Duration,
) -> Result<(), SendFailure>
where
    S: Sink<Outgoing> + Unpin,
    S::Error: std::fmt::Display,
{
    match tokio::time::timeout(timeout, sink.send(frame)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(error)) => Err(SendFailure::Socket(error.to_string())),
        Err(_) => Err(SendFailure::Stalled(timeout)),
    }
}

/// Why a frame could not be sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum SendFailure {
    /// The socket failed.
    #[error("the socket failed: {0}")]
    Socket(String),
    /// The client did not read for this long.
    #[error("the client stopped reading (nothing accepted for {0:?})")]
    Stalled(Duration),
}

/// Checks `Host` and `Origin` of a request against `http.allowed_hosts`: the Host's name (or
/// `name:port`) must be listed, and an `Origin`, when sent, must be `http(s)://` a listed host.
/// The Host is the header, else the request target's authority (HTTP/2 sends `:authority`
/// and no `Host`). An empty list disables the check.
pub(crate) fn check_host_and_origin(
    headers: &HeaderMap,
    uri: &Uri,
    allowed_hosts: &[String],
) -> Result<(), ApiError> {
    if allowed_hosts.is_empty() {
        return Ok(());
    }
    let host = match headers.get(header::HOST) {
        Some(value) => value.to_str().ok(),
        None => uri.authority().map(|authority| authority.as_str()),
    }
    .ok_or_else(|| {
        ApiError::forbidden("the request has no readable Host header").with_code("host_not_allowed")
    })?;
    if !authority_allowed(host, allowed_hosts) {
        return Err(ApiError::forbidden(format!(
            "Host {host:?} is not in http.allowed_hosts (a DNS-rebinding guard); add it there \
             if this node is reached under that name"
        ))
        .with_code("host_not_allowed"));
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or("");
        let allowed = origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"))
            .is_some_and(|authority| authority_allowed(authority, allowed_hosts));
        if !allowed {
            return Err(ApiError::forbidden(format!(
                "Origin {origin:?} is not one of http.allowed_hosts; cross-origin pages may not \
                 use this endpoint"
            ))
            .with_code("origin_not_allowed"));
        }
    }
    Ok(())
}

/// True when `authority` (`host`, `host:port`, `[v6]:port`) names an allowed host: the entry
/// equals the whole authority, or its host part.
fn authority_allowed(authority: &str, allowed_hosts: &[String]) -> bool {
    let authority = authority.trim().to_ascii_lowercase();
    let host = split_host(&authority);
    allowed_hosts.iter().any(|entry| {
        let entry = entry.to_ascii_lowercase();
        entry == authority || entry == host
    })
}

/// The host part of an authority: `[::1]:80` → `[::1]`, `a:80` → `a`, `a` → `a`.
fn split_host(authority: &str) -> &str {
    if authority.starts_with('[') {
        return match authority.find(']') {
            Some(end) => &authority[..=end],
            None => authority,
        };
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|byte| byte.is_ascii_digit()) => host,
        _ => authority,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, value.parse().unwrap());
        }
        map
    }

    fn allowed() -> Vec<String> {
        vec!["localhost".into(), "127.0.0.1".into(), "[::1]".into()]
    }

    #[test]
    fn loopback_hosts_with_any_port_pass() {
        for host in [
            "localhost",
            "localhost:7070",
            "127.0.0.1:1",
            "[::1]:7070",
            "LOCALHOST",
        ] {
            assert!(
                check_host_and_origin(&headers(&[("host", host)]), &Uri::default(), &allowed())
                    .is_ok(),
                "{host}"
            );
        }
    }

    #[test]
    fn other_hosts_are_refused_as_dns_rebinding() {
        for host in [
            "evil.example",
            "evil.example:7070",
            "127.0.0.2",
            "localhost.evil",
        ] {
            let error =
                check_host_and_origin(&headers(&[("host", host)]), &Uri::default(), &allowed())
                    .unwrap_err();
            assert_eq!(error.status, 403, "{host}");
            assert_eq!(error.code, "host_not_allowed");
        }
        let error =
            check_host_and_origin(&HeaderMap::new(), &Uri::default(), &allowed()).unwrap_err();
        assert_eq!(error.code, "host_not_allowed");
    }

    /// Regression: HTTP/2 requests carry the authority in the request target and no `Host`
    /// header, and every one of them was refused.
    #[test]
    fn without_a_host_header_the_request_targets_authority_is_checked() {
        let none = HeaderMap::new();
        let uri = |target: &str| target.parse::<Uri>().unwrap();
        assert!(
            check_host_and_origin(&none, &uri("http://127.0.0.1:7070/mcp"), &allowed()).is_ok()
        );
        let error = check_host_and_origin(&none, &uri("http://evil.example:7070/mcp"), &allowed())
            .unwrap_err();
        assert_eq!(error.code, "host_not_allowed");
        // A Host header, when sent, is what counts.
        let host = headers(&[("host", "evil.example")]);
        assert!(check_host_and_origin(&host, &uri("http://127.0.0.1/mcp"), &allowed()).is_err());
    }

    #[test]
    fn origins_must_name_an_allowed_host() {
        let ok = headers(&[
            ("host", "127.0.0.1:7070"),
            ("origin", "http://localhost:3000"),
        ]);
        assert!(check_host_and_origin(&ok, &Uri::default(), &allowed()).is_ok());
        for origin in [
            "https://evil.example",
            "null",
            "file://",
            "http://127.0.0.1.evil:80",
        ] {
            let bad = headers(&[("host", "127.0.0.1:7070"), ("origin", origin)]);
            let error = check_host_and_origin(&bad, &Uri::default(), &allowed()).unwrap_err();
            assert_eq!(error.code, "origin_not_allowed", "{origin}");
        }
    }

    #[test]
    fn an_entry_with_a_port_allows_only_that_port_and_an_empty_list_allows_all() {
        let allowed = vec!["node.lan:7070".to_owned()];
        assert!(
            check_host_and_origin(
                &headers(&[("host", "node.lan:7070")]),
                &Uri::default(),
                &allowed
            )
            .is_ok()
        );
        assert!(
            check_host_and_origin(
                &headers(&[("host", "node.lan:8080")]),
                &Uri::default(),
                &allowed
            )
            .is_err()
        );
        assert!(
            check_host_and_origin(&headers(&[("host", "anything")]), &Uri::default(), &[]).is_ok()
        );
    }
}
