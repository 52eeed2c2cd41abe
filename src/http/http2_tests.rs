//! Tests of [`super::serve_with`] over HTTP/2 (h2c, prior knowledge): the idle connection and
//! the stream without window. A real h2c client (hyper's) talks to the accept loop on
//! `127.0.0.1:0`, in paused time: what takes "seconds" below is the runtime's clock.

use std::pin::Pin;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::{Request, Response, StatusCode};
use axum::routing::get;
use hyper::body::{Body as _, Frame, Incoming};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{ServeLimits, serve_with};

/// The node's clock for a client that accepts nothing (`http.send_timeout_secs`).
const SEND_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a connection may wait for a request (`HEADER_READ_TIMEOUT`).
const HEADER_TIMEOUT: Duration = Duration::from_secs(2);
/// Longer than anything under test takes: a wait past it is a failure, not a slow machine
/// (the clock is paused: it costs nothing).
const NEVER: Duration = Duration::from_secs(600);

/// A node's accept loop serving `/` (a short answer), `/empty` (no body), `/endless` (a body
/// that never ends: a few bytes every 100 ms, like a busy event stream's) and `/sparse` (the
/// same, a piece every twice the send timeout, like a quiet event stream's).
struct Node {
    addr: std::net::SocketAddr,
    stop: CancellationToken,
    server: JoinHandle<std::io::Result<()>>,
}

impl Node {
    async fn start(limits: ServeLimits) -> Self {
        let router = Router::new()
            .route("/", get(|| async { "ok" }))
            .route("/empty", get(|| async { StatusCode::NO_CONTENT }))
            .route(
                "/endless",
                get(|| async { Body::from_stream(ticks(Duration::from_millis(100))) }),
            )
            .route(
                "/sparse",
                get(|| async { Body::from_stream(ticks(SEND_TIMEOUT * 2)) }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let server = tokio::spawn(serve_with(
            listener,
            router,
            limits,
            stop.clone().cancelled_owned(),
        ));
        Self { addr, stop, server }
    }

    async fn stop(self) {
        self.stop.cancel();
        self.server.await.unwrap().unwrap();
    }
}

fn limits() -> ServeLimits {
    ServeLimits {
        send_timeout: SEND_TIMEOUT,
        header_timeout: HEADER_TIMEOUT,
        max_connections: 64,
    }
}

/// Five bytes every `pace`, forever.
fn ticks(pace: Duration) -> impl futures::Stream<Item = Result<Bytes, std::convert::Infallible>> {
    futures::stream::unfold((), move |()| async move {
        tokio::time::sleep(pace).await;
        Some((Ok(Bytes::from_static(b"tick\n")), ()))
    })
}

/// An h2c client connected to `node`; `stream_window` is the flow-control window it gives each
/// stream (`None`: hyper's default). Returns the sender and its connection's task, which ends
/// when the connection does.
async fn connect(
    node: &Node,
    stream_window: Option<u32>,
) -> (SendRequest<Body>, JoinHandle<hyper::Result<()>>) {
    let tcp = TcpStream::connect(node.addr).await.unwrap();
    let mut builder = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
    builder.timer(TokioTimer::new());
    if let Some(window) = stream_window {
        builder.initial_stream_window_size(window);
    }
    let (sender, connection) = builder.handshake(TokioIo::new(tcp)).await.unwrap();
    (sender, tokio::spawn(connection))
}

async fn request(sender: &mut SendRequest<Body>, path: &str) -> Response<Incoming> {
    sender.ready().await.unwrap();
    let request = Request::get(format!("http://localhost{path}"))
        .body(Body::empty())
        .unwrap();
    sender.send_request(request).await.unwrap()
}

async fn next_frame(body: &mut Incoming) -> Option<hyper::Result<Frame<Bytes>>> {
    std::future::poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx)).await
}

/// Reads `body` for `time`, each frame a piece of data.
async fn read_for(body: &mut Incoming, time: Duration) {
    let reading = Instant::now();
    while reading.elapsed() < time {
        let frame = next_frame(body).await.expect("an endless body").unwrap();
        assert!(frame.is_data());
    }
}

/// Waits for the client's connection to end; how long it took.
async fn closed(connection: JoinHandle<hyper::Result<()>>) -> Duration {
    let waiting = Instant::now();
    tokio::time::timeout(NEVER, connection)
        .await
        .expect("the node closes the connection")
        .unwrap()
        .expect("closed cleanly (GOAWAY)");
    waiting.elapsed()
}

/// Regression: an HTTP/2 connection with no stream open stayed open forever (HTTP/1's wait for
/// the next request is bounded by hyper's header timer; HTTP/2's was by nothing), each one a
/// connection slot and a file descriptor.
#[tokio::test(start_paused = true)]
async fn an_http2_connection_with_no_request_in_progress_is_closed() {
    let node = Node::start(limits()).await;
    let (mut sender, connection) = connect(&node, None).await;
    let mut body = request(&mut sender, "/").await.into_body();
    let frame = next_frame(&mut body).await.unwrap().unwrap();
    assert_eq!(frame.into_data().unwrap(), "ok");
    assert!(next_frame(&mut body).await.is_none());

    assert!(closed(connection).await >= HEADER_TIMEOUT);
    assert!(sender.is_closed());
    node.stop().await;
}

/// A response still being sent is a request in progress, long after its handler returned: its
/// connection is not idle, and once it ends the connection is.
#[tokio::test(start_paused = true)]
async fn an_http2_connection_is_not_idle_while_a_response_streams() {
    let node = Node::start(limits()).await;
    let (mut sender, connection) = connect(&node, None).await;
    let mut body = request(&mut sender, "/endless").await.into_body();
    read_for(&mut body, HEADER_TIMEOUT * 3).await;
    // Not asked to close (a GOAWAY refuses new streams): a second request is served.
    assert_eq!(request(&mut sender, "/empty").await.status(), 204);
    assert!(!connection.is_finished());

    drop(body);
    assert!(closed(connection).await >= HEADER_TIMEOUT);
    node.stop().await;
}

/// Regression: the send deadline works on the socket, which an HTTP/2 client can keep reading
/// while it gives one stream no window: that response (an event stream holding a link) never
/// went on and never ended. Now that stream is reset after the send timeout, and only it: the
/// connection goes on serving.
#[tokio::test(start_paused = true)]
async fn an_http2_stream_without_window_is_reset_after_the_send_timeout() {
    let node = Node::start(ServeLimits {
        header_timeout: NEVER,
        ..limits()
    })
    .await;
    let (mut sender, connection) = connect(&node, Some(0)).await;
    let response = request(&mut sender, "/endless").await;
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let waiting = Instant::now();
    let frame = tokio::time::timeout(NEVER, next_frame(&mut body))
        .await
        .expect("the node gives the stream up");
    let error = frame.expect("an error, not the end").unwrap_err();
    assert!(waiting.elapsed() >= SEND_TIMEOUT, "{error}");

    assert_eq!(request(&mut sender, "/empty").await.status(), 204);
    assert!(!connection.is_finished());
    node.stop().await;
}

/// A client that gives the same endless body a window and reads it is never cut.
#[tokio::test(start_paused = true)]
async fn an_http2_stream_whose_client_reads_is_not_reset() {
    let node = Node::start(ServeLimits {
        header_timeout: NEVER,
        ..limits()
    })
    .await;
    let (mut sender, connection) = connect(&node, None).await;
    let mut body = request(&mut sender, "/endless").await.into_body();
    read_for(&mut body, SEND_TIMEOUT * 3).await;
    assert!(!connection.is_finished());
    drop(body);
    node.stop().await;
}

/// A body with nothing to give waits on the node, not on the client: the clock does not run
/// between its pieces, however far apart.
#[tokio::test(start_paused = true)]
async fn an_http2_response_waiting_for_its_next_piece_is_not_reset() {
    let node = Node::start(ServeLimits {
        header_timeout: NEVER,
        ..limits()
    })
    .await;
    let (mut sender, connection) = connect(&node, None).await;
    let mut body = request(&mut sender, "/sparse").await.into_body();
    read_for(&mut body, SEND_TIMEOUT * 5).await;
    assert!(!connection.is_finished());
    // A shutdown lets a response finish: this one ends when its client goes.
    drop(body);
    node.stop().await;
}

/// The header of an HTTP/2 frame (RFC 9113 §4.1).
fn frame_header(length: usize, kind: u8, flags: u8, stream: u32) -> Vec<u8> {
    let mut header = u32::try_from(length).unwrap().to_be_bytes()[1..].to_vec();
    header.extend([kind, flags]);
    header.extend(stream.to_be_bytes());
    header
}

const GOAWAY: u8 = 0x7;

/// The kind of the next frame the node sends; `None` once it closed the connection.
async fn read_frame_kind(stream: &mut TcpStream) -> Option<u8> {
    let mut header = [0; 9];
    stream.read_exact(&mut header).await.ok()?;
    let length = u32::from_be_bytes([0, header[0], header[1], header[2]]);
    let mut payload = vec![0; length as usize];
    stream.read_exact(&mut payload).await.ok()?;
    Some(header[3])
}

/// A client that does not answer the GOAWAY's PING (h2 waits for its answer before it closes
/// the connection) is not let hold its connection: with no stream open and nothing written for
/// another header timeout, the connection is closed.
#[tokio::test(start_paused = true)]
async fn an_http2_client_that_does_not_answer_the_goaway_is_closed() {
    let node = Node::start(limits()).await;
    // The preface, empty settings, and `GET /` (HPACK: :method GET, :scheme http, :path / from
    // the static table, :authority "localhost" literal); after that, the client answers
    // nothing: no SETTINGS ack, no PING ack.
    let mut stream = TcpStream::connect(node.addr).await.unwrap();
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    hello.extend(frame_header(0, 0x4, 0, 0));
    let mut block = vec![0x82, 0x86, 0x84, 0x01, 9];
    block.extend(b"localhost");
    hello.extend(frame_header(block.len(), 0x1, 0x4 | 0x1, 1));
    hello.extend(block);
    stream.write_all(&hello).await.unwrap();

    let outcome = tokio::time::timeout(NEVER, async {
        let mut asked_to_close = None;
        while let Some(kind) = read_frame_kind(&mut stream).await {
            if kind == GOAWAY && asked_to_close.is_none() {
                asked_to_close = Some(Instant::now());
            }
        }
        asked_to_close.expect("a GOAWAY before the close").elapsed()
    })
    .await;
    let after_goaway = outcome.expect("the node closes the connection");
    assert!(after_goaway >= HEADER_TIMEOUT, "{after_goaway:?}");
    node.stop().await;
}
