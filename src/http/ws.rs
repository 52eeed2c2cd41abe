//! What every WebSocket link shares: frames in our own terms (so link logic is generic over a
//! `Sink` and a `Stream` and tests drive it with channels), the adapter from axum's socket, and
//! the Host/Origin check of the upgrade request (browsers do not apply CORS to WebSockets, so a
//! page on another origin could otherwise open one; DNS rebinding is refused the same way).

use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use axum::http::{HeaderMap, Uri, header};
use futures::{Sink, SinkExt, Stream, StreamExt};

use super::ApiError;
use super::deadline::BytesWritten;

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

/// What a link counts as its client's progress besides each frame the sink accepts: the bytes
/// its connection has written, when the connection is the link's own (an HTTP/1 connection,
/// upgraded; the accept loop hands its count to HTTP/1 requests only). A large frame (an MCP
/// answer of megabytes) goes out in many socket writes, and a client that takes them slowly
/// makes progress the sink shows only once the whole frame is through. Over HTTP/2 the
/// connection is shared with other streams, whose bytes say nothing of this one: there, and in
/// tests, only accepted frames count.
#[derive(Debug, Clone, Default)]
pub(crate) struct SendProgress(Option<BytesWritten>);

impl SendProgress {
    /// Progress read from the connection of the upgrade request with these extensions, when
    /// it is the link's own.
    pub(crate) fn of_request(extensions: &axum::http::Extensions) -> Self {
        Self(extensions.get::<BytesWritten>().cloned())
    }

    /// The connection's bytes written so far (`None` when not known).
    fn written(&self) -> Option<u64> {
        self.0.as_ref().map(BytesWritten::get)
    }
}

/// How often a waiting send looks at its connection's byte count: a client that stopped is cut
/// between `timeout` and 1.2 × `timeout` after its last progress.
const PROGRESS_LOOKS: u32 = 5;

/// Sends `frames` in order and then flushes once (one socket write for the lot, as far as the
/// sink buffers). The deadline is about progress, not about the whole batch: it starts again
/// with each frame the sink accepts and with each byte the connection writes (`progress`), so
/// only a client that accepts nothing for `timeout` is cut ([`SendFailure::Stalled`]), however
/// slowly a steady one reads.
pub(crate) async fn send_all_within<S>(
    sink: &mut S,
    frames: impl IntoIterator<Item = Outgoing>,
    timeout: Duration,
    progress: &SendProgress,
) -> Result<(), SendFailure>
where
    S: Sink<Outgoing> + Unpin,
    S::Error: std::fmt::Display,
{
    for frame in frames {
        step_within(sink.feed(frame), timeout, progress).await?;
    }
    step_within(sink.flush(), timeout, progress).await
}

/// Sends one frame (see [`send_all_within`] for the deadline).
pub(crate) async fn send_within<S>(
    sink: &mut S,
    frame: Outgoing,
    timeout: Duration,
    progress: &SendProgress,
) -> Result<(), SendFailure>
where
    S: Sink<Outgoing> + Unpin,
    S::Error: std::fmt::Display,
{
    send_all_within(sink, [frame], timeout, progress).await
}

/// Runs one step of a send (a frame fed, a flush) to its end, or until the client has made no
/// progress for `timeout`: the step did not finish, and the connection (when known) wrote
/// nothing meanwhile.
async fn step_within<F, E>(
    step: F,
    timeout: Duration,
    progress: &SendProgress,
) -> Result<(), SendFailure>
where
    F: std::future::Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let mut step = std::pin::pin!(step);
    let look = timeout / PROGRESS_LOOKS;
    let mut seen = progress.written();
    let mut progressed_at = tokio::time::Instant::now();
    loop {
        match tokio::time::timeout(look, step.as_mut()).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(error)) => return Err(SendFailure::Socket(error.to_string())),
            Err(_) => {
                let written = progress.written();
                if written != seen {
                    seen = written;
                    progressed_at = tokio::time::Instant::now();
                } else if progressed_at.elapsed() >= timeout {
                    return Err(SendFailure::Stalled(timeout));
                }
            }
        }
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

    /// A sink that takes a frame at once and then needs `flush_for` to write it out (one large
    /// frame going out to a client that reads slowly), or never writes it (`None`).
    struct LongFlush {
        flush_for: Option<Duration>,
        flushing: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    }

    impl Sink<Outgoing> for LongFlush {
        type Error = String;
        fn poll_ready(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), String>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn start_send(self: std::pin::Pin<&mut Self>, _: Outgoing) -> Result<(), String> {
            Ok(())
        }
        fn poll_flush(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), String>> {
            let Some(flush_for) = self.flush_for else {
                return std::task::Poll::Pending;
            };
            let flushing = self
                .flushing
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(flush_for)));
            flushing.as_mut().poll(cx).map(Ok)
        }
        fn poll_close(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), String>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    /// Regression: a frame had to go out whole within the send timeout, so an MCP answer of
    /// megabytes was cut on a client reading it steadily at less than its size per 10 s. Bytes
    /// its connection writes count as progress: 25 s of writing a KiB a second is not a stall;
    /// a connection that writes nothing is cut after the timeout.
    #[tokio::test(start_paused = true)]
    async fn a_frame_that_goes_out_slowly_is_not_cut_while_its_connection_writes() {
        let timeout = Duration::from_secs(10);
        let written = BytesWritten::default();
        let writing = tokio::spawn({
            let written = written.clone();
            async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    written.add(1024);
                }
            }
        });
        let progress = SendProgress(Some(written));
        let mut slow = LongFlush {
            flush_for: Some(timeout * 5 / 2),
            flushing: None,
        };
        let sent = send_within(&mut slow, Outgoing::Ping, timeout, &progress).await;
        assert_eq!(sent, Ok(()));
        writing.abort();

        let started = tokio::time::Instant::now();
        let mut stuck = LongFlush {
            flush_for: None,
            flushing: None,
        };
        let sent = send_within(&mut stuck, Outgoing::Ping, timeout, &progress).await;
        assert_eq!(sent, Err(SendFailure::Stalled(timeout)));
        let waited = started.elapsed();
        assert!(
            waited >= timeout && waited <= timeout + timeout / PROGRESS_LOOKS,
            "{waited:?}"
        );
    }
}
