//! Connections whose client takes nothing of what the node sends are closed.
//!
//! Each accepted connection's IO gives up a write that makes no progress for
//! `http.send_timeout_secs`: the write fails, hyper closes the connection, and the response it
//! was sending is dropped, with whatever fed it (an MCP answer's stream, an event link, a
//! gateway call). The clock starts when a write cannot go on (the socket's buffers are full)
//! and stops at the next byte the client accepts, so a slow client that keeps reading is never
//! cut, only one that stopped. Routes with a tighter rule of their own (event streams and MCP
//! WebSockets end a link whose client accepts nothing for 10 s) apply it first; this is the
//! floor under every route, rmcp's Streamable HTTP answers among them.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Sleep;

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
}

impl<S> SendDeadline<S> {
    pub(crate) fn new(io: S, limit: Duration) -> Self {
        Self {
            io,
            limit,
            stalled: None,
        }
    }

    /// The IO inside.
    pub(crate) fn get_ref(&self) -> &S {
        &self.io
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
        self.check(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
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

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A pipe whose far end reads only when told: a write waits once its buffer is full.
    fn pipe() -> (
        SendDeadline<tokio::io::DuplexStream>,
        tokio::io::DuplexStream,
    ) {
        let (near, far) = tokio::io::duplex(64);
        (SendDeadline::new(near, Duration::from_secs(60)), far)
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
