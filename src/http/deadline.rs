//! Deadlines on what a client makes a connection hold: what the node sends it, and on HTTP/2
//! the streams it keeps open.
//!
//! Each accepted connection's IO gives up a write that makes no progress for
//! `http.send_timeout_secs`: the write fails, hyper closes the connection, and the response it
//! was sending is dropped, with whatever fed it (an MCP answer's stream, an event link, a
//! gateway call). The clock starts when a write cannot go on and starts again at the next write
//! that does. The socket may hold only a little unsent ([`NOT_SENT_LOW_WATER`]), so a client that
//! keeps reading, even slowly, lets writes go on every so often and is not cut; one that
//! stopped is. Routes with a tighter rule of their own (event streams and MCP WebSockets end a
//! link whose client accepts nothing for 10 s) apply it first; this is the floor under every
//! route, rmcp's Streamable HTTP answers among them.
//!
//! Over HTTP/2 (h2c) a client can keep reading the socket, so that no write stalls, and yet
//! give one stream no flow-control window: that response would never progress nor end. So each
//! HTTP/2 stream runs under the same deadline on its own ([`StreamExecutor`],
//! [`clock_stream_body`]): a response body that has handed hyper data which hyper could not
//! send for `http.send_timeout_secs` has its stream reset. The same executor counts a
//! connection's open streams ([`OpenStreams`]), so that the accept loop can close an HTTP/2
//! connection that has nothing in progress.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::response::Response;
use hyper::body::{Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, Sleep};

/// What a connection's socket may hold unsent (`TCP_NOTSENT_LOWAT`). The kernel then wakes a
/// waiting writer once this little is left unsent, not once a third of a buffer of megabytes
/// is free (it wakes the writer below half of this), so a client that takes bytes, however
/// slowly, lets a write go on (and the clock start again) every so often: with the default
/// 60 s, only a client taking less than about 1 KB/s is cut.
pub(crate) const NOT_SENT_LOW_WATER: u32 = 128 * 1024;

/// How long what the node sent may stay unacknowledged before the kernel drops the connection
/// (`TCP_USER_TIMEOUT`): five times the send deadline, and at least a minute. A client that
/// vanished without a word (its machine or network gone) is found then, rather than after TCP's
/// own retransmission give-up (about 15 minutes), even while all the node writes is an event
/// stream's heartbeat, too little to ever stall a write. It must come well after the send
/// deadline: the kernel's drop is silent (no FIN, no reset reaches the client), and it also
/// counts a live client whose receive window stays shut, which the send deadline closes first
/// with an orderly end the client can read.
pub(crate) fn unacknowledged_limit(send_timeout: Duration) -> Duration {
    (send_timeout * 5).max(Duration::from_secs(60))
}

/// Readies an accepted connection for the deadline (see [`NOT_SENT_LOW_WATER`]) and for a
/// client that vanishes ([`unacknowledged_limit`]).
pub(crate) fn prepare(stream: &TcpStream, send_timeout: Duration) {
    #[cfg(target_os = "linux")]
    {
        let socket = socket2::SockRef::from(stream);
        if let Err(error) = socket.set_tcp_notsent_lowat(NOT_SENT_LOW_WATER) {
            tracing::debug!(%error, "cannot set TCP_NOTSENT_LOWAT");
        }
        if let Err(error) = socket.set_tcp_user_timeout(Some(unacknowledged_limit(send_timeout))) {
            tracing::debug!(%error, "cannot set TCP_USER_TIMEOUT");
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (stream, send_timeout);
}

/// A listener whose connections give up writes that make no progress for `limit`.
pub(crate) struct DeadlineListener {
    inner: TcpListener,
    limit: Duration,
}

impl DeadlineListener {
    pub(crate) fn new(inner: TcpListener, limit: Duration) -> Self {
        Self { inner, limit }
    }
}

impl axum::serve::Listener for DeadlineListener {
    type Io = SendDeadline<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        // axum's accept for a TCP listener, with its handling of accept errors.
        let (stream, addr) = axum::serve::Listener::accept(&mut self.inner).await;
        prepare(&stream, self.limit);
        (SendDeadline::new(stream, self.limit), addr)
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// IO whose writes fail with `TimedOut` once they have made no progress for `limit`.
pub(crate) struct SendDeadline<S> {
    io: S,
    limit: Duration,
    /// Armed when a write could not go on; cleared by the next one that does.
    stalled: Option<Pin<Box<Sleep>>>,
    /// Every byte written so far.
    written: BytesWritten,
}

/// A count of the bytes a [`SendDeadline`] has written, readable while hyper owns the IO.
#[derive(Debug, Clone, Default)]
pub(crate) struct BytesWritten(Arc<AtomicU64>);

impl BytesWritten {
    /// The bytes written so far.
    pub(crate) fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    /// Counts `bytes` as written (tests stand in for a connection with it).
    #[cfg(test)]
    pub(crate) fn add(&self, bytes: u64) {
        self.0.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Counts what a write returned.
    fn count(&self, polled: &Poll<io::Result<usize>>) {
        if let Poll::Ready(Ok(written)) = polled {
            self.0.fetch_add(*written as u64, Ordering::Relaxed);
        }
    }
}

impl<S> SendDeadline<S> {
    pub(crate) fn new(io: S, limit: Duration) -> Self {
        Self {
            io,
            limit,
            stalled: None,
            written: BytesWritten::default(),
        }
    }

    /// The IO inside.
    pub(crate) fn get_ref(&self) -> &S {
        &self.io
    }

    /// The count of the bytes written through this IO, now and later.
    pub(crate) fn bytes_written(&self) -> BytesWritten {
        self.written.clone()
    }

    fn check<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if polled.is_ready() {
            self.stalled = None;
            return polled;
        }
        let limit = self.limit;
        let stalled = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        if stalled.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "the client accepted nothing for {} s (http.send_timeout_secs); the \
                     connection is closed",
                    limit.as_secs()
                ),
            )));
        }
        Poll::Pending
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for SendDeadline<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for SendDeadline<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        self.written.count(&polled);
        self.check(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.written.count(&polled);
        self.check(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.io).poll_flush(cx);
        self.check(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.io).poll_shutdown(cx);
        self.check(cx, polled)
    }
}

tokio::task_local! {
    /// The send clock of the HTTP/2 stream whose task is running (set by [`StreamExecutor`]).
    static STREAM_SEND_CLOCK: Arc<SendClock>;
}

/// Runs hyper's HTTP/2 stream tasks for one connection, each under the send deadline and
/// counted among the connection's [`OpenStreams`] while it lives.
///
/// hyper spawns one task per stream (`H2Stream` in hyper's `proto/h2/server.rs`): it runs the
/// handler, then pipes the response's body into the stream until the body is finished, or the
/// stream is reset and the body dropped; for a WebSocket over HTTP/2 (extended CONNECT) it
/// spawns one more that lives as long as the tunnel. So a live task is exactly a request in
/// progress, an event stream's body being sent among them, and ending a task resets its
/// stream only (h2 sends `RST_STREAM` for a stream whose handles are dropped before it ended).
#[derive(Debug, Clone)]
pub(crate) struct StreamExecutor {
    peer: SocketAddr,
    send_timeout: Duration,
    open: OpenStreams,
}

impl StreamExecutor {
    /// An executor for the streams of the connection from `peer`, which counts them in `open`.
    pub(crate) fn new(peer: SocketAddr, send_timeout: Duration, open: OpenStreams) -> Self {
        Self {
            peer,
            send_timeout,
            open,
        }
    }
}

impl<F> hyper::rt::Executor<F> for StreamExecutor
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, stream: F) {
        let clock = Arc::new(SendClock::default());
        let open = self.open.open();
        let (peer, limit) = (self.peer, self.send_timeout);
        tokio::spawn(STREAM_SEND_CLOCK.scope(clock.clone(), async move {
            if until_stalled(stream, &clock, limit).await.is_err() {
                tracing::debug!(
                    %peer,
                    "an HTTP/2 client accepted nothing of a response for {} s \
                     (http.send_timeout_secs); its stream is reset",
                    limit.as_secs()
                );
            }
            drop(open);
        }));
    }
}

/// Puts `response`'s body under its stream's send deadline when it answers an HTTP/2 request.
/// hyper polls the service's future in the stream's task, so this runs there and finds the
/// stream's clock; any other response (HTTP/1's, whose connection sends one at a time, so that
/// the [`SendDeadline`] covers it) is returned as it is.
pub(crate) fn clock_stream_body(response: Response) -> Response {
    match STREAM_SEND_CLOCK.try_with(Arc::clone) {
        Ok(clock) => response.map(|body| Body::new(ClockedBody { body, clock })),
        Err(_) => response,
    }
}

/// A stream's response was stalled for the send deadline.
#[derive(Debug)]
struct Stalled;

/// Runs a stream's task until it ends, or until its body has waited `limit` for the client
/// (see [`SendClock`]); in that case the task is dropped, and its stream reset.
///
/// hyper polls a response body over HTTP/2 only when it can take a frame (hyper's
/// `PipeToSendStream` in `proto/h2/mod.rs`): it asks for the next frame as soon as it has put
/// the last one into h2's send buffer, and that needs the stream's flow-control window, of
/// which h2 buffers at most `max_send_buf_size` (400 KB) ahead of the socket. A body that
/// handed over a frame and is not asked again therefore waits on the client: for a window it
/// does not open, or for it to take what is buffered. hyper does not poll the body then, so the
/// clock is read here, by the task, each time hyper's part of it has gone to sleep.
async fn until_stalled<F: Future<Output = ()>>(
    stream: F,
    clock: &SendClock,
    limit: Duration,
) -> Result<(), Stalled> {
    let mut stream = std::pin::pin!(stream);
    let mut expiry: Option<Pin<Box<Sleep>>> = None;
    std::future::poll_fn(|cx| {
        if stream.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Ok(()));
        }
        let Some(since) = clock.waiting_since() else {
            expiry = None;
            return Poll::Pending;
        };
        let deadline = since + limit;
        let expiry = expiry.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if expiry.deadline() != deadline {
            expiry.as_mut().reset(deadline);
        }
        expiry.as_mut().poll(cx).map(|()| Err(Stalled))
    })
    .await
}

/// Since when a stream's response body has waited for the client: it handed hyper a data frame
/// and hyper has not come back for the next one.
#[derive(Debug, Default)]
struct SendClock(Mutex<Option<Instant>>);

impl SendClock {
    /// The body handed hyper a data frame: the clock runs until hyper asks for the next.
    fn handed_over(&self) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Some(Instant::now());
    }

    /// hyper asks for the next frame: what the body gave went out (into h2's buffer).
    fn asked_again(&self) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = None;
    }

    /// Since when the body waits for the client, if it does.
    fn waiting_since(&self) -> Option<Instant> {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A response body that runs its stream's [`SendClock`] from each data frame it hands over to
/// the next time it is asked for one. A body that has nothing to give (an event stream between
/// events) is waiting on the node, not on the client: the clock does not run.
struct ClockedBody {
    body: Body,
    clock: Arc<SendClock>,
}

impl hyper::body::Body for ClockedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        self.clock.asked_again();
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && frame.is_data()
        {
            self.clock.handed_over();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The HTTP/2 streams of one connection in progress (the [`StreamExecutor`]'s tasks alive):
/// `None` until its first one, which an HTTP/1 connection never has.
#[derive(Debug, Clone)]
pub(crate) struct OpenStreams(Arc<tokio::sync::watch::Sender<Option<Streams>>>);

/// What [`OpenStreams`] counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Streams {
    /// Open now.
    open: usize,
    /// Ever opened: a stream that opened and closed between two looks of `idle_for` still moves
    /// it, so a quick request does not go unseen.
    opened: u64,
}

impl OpenStreams {
    pub(crate) fn new() -> Self {
        Self(Arc::new(tokio::sync::watch::Sender::new(None)))
    }

    /// Counts a stream as open until the guard is dropped. Every opening is announced; a
    /// closing only when none is left open.
    fn open(&self) -> OpenStream {
        self.0.send_modify(|streams| {
            let streams = streams.get_or_insert(Streams { open: 0, opened: 0 });
            streams.open += 1;
            streams.opened += 1;
        });
        OpenStream(self.clone())
    }

    /// Resolves once the connection, an HTTP/2 one, has had no stream open for `time` in a
    /// row; never on HTTP/1.
    pub(crate) async fn idle_for(&self, time: Duration) {
        let mut streams = self.0.subscribe();
        loop {
            // The sender lives in `self`: the channel cannot close.
            let none_open = |streams: &Option<Streams>| streams.is_some_and(|s| s.open == 0);
            if streams.wait_for(none_open).await.is_err() {
                return std::future::pending().await;
            }
            // Any change since (a stream opened, even one already closed again) starts over.
            streams.borrow_and_update();
            tokio::select! {
                () = tokio::time::sleep(time) => return,
                _ = streams.changed() => {}
            }
        }
    }
}

/// An open stream of [`OpenStreams`].
#[derive(Debug)]
struct OpenStream(OpenStreams);

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.0.send_if_modified(|streams| match streams {
            Some(streams) => {
                streams.open = streams.open.saturating_sub(1);
                streams.open == 0
            }
            None => false,
        });
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// Regression: a stream that opened and closed again between two looks of `idle_for` went
    /// unseen (only "none open" to "some open" was announced), so a client sending a quick
    /// request every so often had its connection closed as idle.
    #[tokio::test(start_paused = true)]
    async fn a_quick_stream_between_two_looks_restarts_the_idle_time() {
        let streams = OpenStreams::new();
        drop(streams.open());
        let idle = streams.idle_for(Duration::from_secs(30));
        let mut idle = std::pin::pin!(idle);
        // 20 s idle, then a stream opens and closes before `idle_for` looks again.
        assert!(
            tokio::time::timeout(Duration::from_secs(20), idle.as_mut())
                .await
                .is_err()
        );
        drop(streams.open());
        // Not idle for 30 s yet: 20 s more are 20 s since that stream.
        assert!(
            tokio::time::timeout(Duration::from_secs(20), idle.as_mut())
                .await
                .is_err(),
            "closed 10 s after a request"
        );
        tokio::time::timeout(Duration::from_secs(11), idle.as_mut())
            .await
            .expect("idle 30 s after the last stream");
    }

    /// A pipe whose far end reads only when told: a write waits once its buffer is full.
    fn pipe() -> (
        SendDeadline<tokio::io::DuplexStream>,
        tokio::io::DuplexStream,
    ) {
        let (near, far) = tokio::io::duplex(64);
        (SendDeadline::new(near, Duration::from_secs(60)), far)
    }

    /// A loopback connection, as the listener prepares it, to a client with a small receive
    /// buffer; the node's side gives up after 2 s without progress.
    async fn connected() -> (SendDeadline<TcpStream>, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let (client, accepted) = tokio::join!(
            socket.connect(listener.local_addr().unwrap()),
            listener.accept()
        );
        let (server, _) = accepted.unwrap();
        prepare(&server, Duration::from_secs(2));
        (
            SendDeadline::new(server, Duration::from_secs(2)),
            client.unwrap(),
        )
    }

    /// Writes until a write fails; returns its error.
    async fn write_until_it_fails(mut near: SendDeadline<TcpStream>) -> io::Error {
        let chunk = vec![7; 16 * 1024];
        loop {
            if let Err(error) = near.write_all(&chunk).await {
                return error;
            }
        }
    }

    /// Regression: the kernel wakes a waiting writer only once a third of the socket's buffer
    /// (megabytes on loopback) is free, so a client reading steadily but slowly let no write go
    /// on for longer than the limit, and was cut. With little left unsent, it is not.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn over_tcp_a_slow_reader_is_never_cut_and_one_that_stops_is() {
        let (near, mut far) = connected().await;
        let writer = tokio::spawn(write_until_it_fails(near));
        // 16 KiB every 50 ms (about 320 KB/s, far below loopback's pace) for two and a half
        // times the limit. The sleeps are the reader's pace, the behaviour under test.
        let mut piece = vec![0; 16 * 1024];
        let reading = std::time::Instant::now();
        let mut taken = 0;
        while reading.elapsed() < Duration::from_secs(5) {
            tokio::time::sleep(Duration::from_millis(50)).await;
            far.read_exact(&mut piece).await.unwrap();
            taken += piece.len();
            assert!(
                !writer.is_finished(),
                "cut while its client was reading ({taken} bytes taken)"
            );
        }
        // Then the client stops reading: its connection is given up.
        let error = tokio::time::timeout(Duration::from_secs(60), writer)
            .await
            .expect("the write gives up")
            .unwrap();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut, "{error}");
        drop(far);
    }

    /// A client that vanishes without a word is found by the kernel once the node's bytes stay
    /// unacknowledged for five send deadlines (loopback cannot lose packets; the option is what
    /// tells).
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn an_accepted_connection_is_ended_by_the_kernel_when_its_bytes_stay_unacknowledged() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut listener = DeadlineListener::new(listener, Duration::from_secs(30));
        let (client, (accepted, _)) = tokio::join!(
            TcpStream::connect(addr),
            axum::serve::Listener::accept(&mut listener)
        );
        let _client = client.unwrap();
        let socket = socket2::SockRef::from(accepted.get_ref());
        assert_eq!(
            socket.tcp_user_timeout().unwrap(),
            Some(Duration::from_secs(150))
        );
        // Never near the send deadline, whose orderly close must come first.
        assert_eq!(
            unacknowledged_limit(Duration::from_secs(1)),
            Duration::from_secs(60)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_that_makes_no_progress_for_the_limit_fails() {
        let (mut near, _far) = pipe();
        near.write_all(&[1; 64]).await.unwrap();
        let started = tokio::time::Instant::now();
        let error = near.write_all(&[2; 10]).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert!(
            error.to_string().contains("http.send_timeout_secs"),
            "{error}"
        );
        assert_eq!(started.elapsed(), Duration::from_secs(60));
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_reader_that_keeps_taking_bytes_is_never_cut() {
        let (mut near, mut far) = pipe();
        let reader = tokio::spawn(async move {
            let mut taken = 0;
            let mut buf = [0; 16];
            while taken < 64 * 20 {
                // Less than the limit between reads, far more than it in all.
                tokio::time::sleep(Duration::from_secs(50)).await;
                taken += far.read(&mut buf).await.unwrap();
            }
            taken
        });
        for _ in 0..20 {
            near.write_all(&[3; 64]).await.unwrap();
        }
        drop(near);
        assert_eq!(reader.await.unwrap(), 64 * 20);
    }

    #[tokio::test(start_paused = true)]
    async fn the_clock_starts_again_after_each_byte_taken() {
        let (mut near, mut far) = pipe();
        near.write_all(&[4; 64]).await.unwrap();
        let writer = tokio::spawn(async move {
            let outcome = near.write_all(&[5; 64]).await;
            (outcome, near)
        });
        // 59 s stalled, one byte taken, 59 s stalled again: never 60 s in a row.
        tokio::time::sleep(Duration::from_secs(59)).await;
        let mut one = [0; 1];
        far.read_exact(&mut one).await.unwrap();
        tokio::time::sleep(Duration::from_secs(59)).await;
        let mut rest = vec![0; 127];
        far.read_exact(&mut rest).await.unwrap();
        let (outcome, _near) = writer.await.unwrap();
        outcome.unwrap();
    }
}
