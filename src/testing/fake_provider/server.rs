//! The fake's own accept loop: hyper over an already-bound listener, one task per connection.
//!
//! axum's `serve` cannot drop a connection from inside a handler, so each connection is served
//! by hyper directly and carries a [`ConnectionControl`] in its requests' extensions. A handler
//! that calls [`ConnectionControl::reset`] makes the connection task drop the connection with
//! `SO_LINGER` 0: the kernel sends a TCP reset and the client never sees a response.
//!
//! Supervision: the accept task owns every connection task (a `JoinSet`); on shutdown it stops
//! accepting, asks each connection to finish gracefully, waits up to the grace period, then
//! aborts the rest.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// Lets a handler drop the connection its request came on.
#[derive(Debug, Clone)]
pub(super) struct ConnectionControl {
    reset: CancellationToken,
}

impl ConnectionControl {
    /// Drops the connection with a TCP reset as soon as the connection task sees it. Whatever
    /// the connection was doing (other HTTP/2 streams included) is lost.
    pub(super) fn reset(&self) {
        self.reset.cancel();
    }
}

/// Serves `app` on `listener` until `shutdown` is cancelled, then drains connections for up to
/// `grace`.
pub(super) async fn run(
    listener: TcpListener,
    app: Router,
    shutdown: CancellationToken,
    grace: Duration,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    connections.spawn(serve_connection(stream, app.clone(), shutdown.clone()));
                }
                Err(error) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(%error, "fake provider: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    let drained = tokio::time::timeout(grace, async {
        while connections.join_next().await.is_some() {}
    });
    if drained.await.is_err() {
        tracing::debug!(
            left = connections.len(),
            "fake provider: aborting connections after grace"
        );
    }
    connections.shutdown().await;
}

async fn serve_connection(stream: TcpStream, app: Router, shutdown: CancellationToken) {
    // Small SSE pieces must leave at once, not wait for Nagle.
    let _ = stream.set_nodelay(true);
    let reset = CancellationToken::new();
    let io = TokioIo::new(ResettableStream {
        inner: stream,
        reset: reset.clone(),
    });
    let control = ConnectionControl {
        reset: reset.clone(),
    };
    let service = hyper::service::service_fn(move |mut request: Request<hyper::body::Incoming>| {
        request.extensions_mut().insert(control.clone());
        app.clone().oneshot(request)
    });
    let builder = auto::Builder::new(TokioExecutor::new());
    let connection = builder.serve_connection(io, service);
    tokio::pin!(connection);
    let mut draining = false;
    loop {
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(error) = result {
                    tracing::debug!(%error, "fake provider: connection ended with an error");
                }
                return;
            }
            // Dropping the connection drops the stream, which resets it.
            () = reset.cancelled() => return,
            () = shutdown.cancelled(), if !draining => {
                connection.as_mut().graceful_shutdown();
                draining = true;
            }
        }
    }
}

/// A TCP stream that, once its connection is reset, closes with a TCP reset instead of a FIN.
struct ResettableStream {
    inner: TcpStream,
    reset: CancellationToken,
}

impl Drop for ResettableStream {
    fn drop(&mut self) {
        if self.reset.is_cancelled()
            && let Err(error) = self.inner.set_zero_linger()
        {
            tracing::debug!(%error, "fake provider: could not set SO_LINGER 0; closing with FIN");
        }
    }
}

impl AsyncRead for ResettableStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for ResettableStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
