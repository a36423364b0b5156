//! One client connection, served by hyper: HTTP/1.1, or HTTP/2 when TLS negotiated `h2` (and
//! h2c with prior knowledge on the plain listener in `serve` mode), closed with a lingering close;
//! and the accept loop that hands each connection to a task on its worker's runtime.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::config;
use crate::metrics::Metrics;
use crate::pipeline::GatewayBody;

const LINGER_TIME: Duration = Duration::from_secs(2);
/// How much it reads at most.
const LINGER_BYTES: usize = 1024 * 1024;

/// A client's TCP connection that closes the way nginx's lingering close does. Its shutdown (hyper
/// shuts a connection down after its last response, TLS after its close_notify) closes the write
/// side, then reads and drops whatever the client still sends (the rest of a body the gateway
/// answered without reading, a pipelined request) until the client closes too, for up to
/// [`LINGER_TIME`] and [`LINGER_BYTES`]. Closing a socket with unread bytes in it makes the kernel
/// send a reset, which can destroy the response before the client has read it (RFC 9112 §9.6).
#[derive(Debug)]
pub(super) struct Lingering {
    io: TcpStream,
    /// Set once the write side is closed: until when to read, and how much was read.
    linger: Option<(Pin<Box<tokio::time::Sleep>>, usize)>,
}

impl Lingering {
    fn new(io: TcpStream) -> Self {
        Self { io, linger: None }
    }
}

impl AsyncRead for Lingering {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Lingering {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let (deadline, read) = match &mut this.linger {
            Some(linger) => linger,
            None => {
                // A peer that reset the connection cannot be waited for: nothing to linger on.
                if ready!(Pin::new(&mut this.io).poll_shutdown(cx)).is_err() {
                    return Poll::Ready(Ok(()));
                }
                this.linger
                    .insert((Box::pin(tokio::time::sleep(LINGER_TIME)), 0))
            }
        };
        let mut scratch = [0u8; 8 * 1024];
        while *read < LINGER_BYTES {
            let mut buf = ReadBuf::new(&mut scratch);
            match Pin::new(&mut this.io).poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) if !buf.filled().is_empty() => *read += buf.filled().len(),
                // The client closed (or reset) its side: done.
                Poll::Ready(_) => return Poll::Ready(Ok(())),
                Poll::Pending if deadline.as_mut().poll(cx).is_ready() => break,
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    }
}

/// How a connection's requests are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Protocol {
    /// HTTP/1.1 (TLS with ALPN `http/1.1` or none, the redirect and admin listeners). An
    /// HTTP/2 preface on such a connection is a malformed HTTP/1.1 request.
    Http1,
    /// HTTP/2, negotiated by ALPN.
    Http2,
    /// Plain TCP in `serve` mode: HTTP/1.1, or HTTP/2 with prior knowledge (h2c), told apart
    /// by hyper from the connection's first bytes.
    Either,
}

/// hyper's server for each [`Protocol`], configured once.
#[derive(Clone)]
pub(super) struct Builders {
    http1: auto::Builder<TokioExecutor>,
    http2: auto::Builder<TokioExecutor>,
    either: auto::Builder<TokioExecutor>,
}

impl Builders {
    pub(super) fn new(cfg: &config::Server) -> Self {
        let mut either = auto::Builder::new(TokioExecutor::new());
        // The header read timeout also bounds how long an idle keep-alive connection is kept.
        either
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(cfg.header_read_timeout)
            .keep_alive(true)
            .max_buf_size(cfg.max_header_bytes);
        if cfg.max_headers != HYPER_MAX_HEADERS {
            // hyper parses up to its default number of headers on the stack, any other
            // number on the heap.
            either.http1().max_headers(cfg.max_headers);
        }
        either
            .http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(cfg.h2_max_concurrent_streams)
            .initial_stream_window_size(cfg.h2_stream_window_bytes)
            .initial_connection_window_size(cfg.h2_connection_window_bytes)
            .max_header_list_size(u32::try_from(cfg.max_header_bytes).unwrap_or(u32::MAX))
            // Rapid-reset protection: a client resetting streams faster than this loses the
            // connection.
            .max_pending_accept_reset_streams(Some(50))
            .max_local_error_reset_streams(Some(256))
            .keep_alive_interval(Some(Duration::from_secs(30)))
            .keep_alive_timeout(cfg.header_read_timeout);
        Self {
            http1: either.clone().http1_only(),
            http2: either.clone().http2_only(),
            either,
        }
    }

    fn get(&self, protocol: Protocol) -> &auto::Builder<TokioExecutor> {
        match protocol {
            Protocol::Http1 => &self.http1,
            Protocol::Http2 => &self.http2,
            Protocol::Either => &self.either,
        }
    }
}

/// hyper's default for the most header fields in an HTTP/1.1 request.
const HYPER_MAX_HEADERS: usize = 100;

/// Per-connection settings shared by the accept loops.
#[derive(Clone)]
pub(super) struct Accepting {
    /// Cancelled when the gateway starts draining: accepting stops, and each connection
    /// finishes the requests it has and closes.
    pub(super) draining: CancellationToken,
    pub(super) limit: Arc<Semaphore>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) builders: Builders,
}

impl Accepting {
    /// Accepts until draining starts, handing each connection to `serve` on the current
    /// runtime.
    pub(super) async fn run<F, Fut>(&self, listener: TcpListener, what: &'static str, serve: F)
    where
        F: Fn(Lingering, SocketAddr, Connection) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        loop {
            let (stream, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(listener = what, error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = self.draining.cancelled() => return,
            };
            let Ok(permit) = Arc::clone(&self.limit).try_acquire_owned() else {
                self.metrics.connections_refused.increment(1);
                drop(stream);
                continue;
            };
            let _ = stream.set_nodelay(true);
            let conn = Connection {
                _permit: permit,
                metrics: Arc::clone(&self.metrics),
                draining: self.draining.clone(),
                builders: self.builders.clone(),
            };
            conn.metrics.connections_open.increment(1.0);
            // On the runtime of the calling thread: a worker's own, for the pipeline.
            tokio::spawn(serve(Lingering::new(stream), peer, conn));
        }
    }
}

/// What a spawned connection task owns.
pub(super) struct Connection {
    /// Held for the connection's lifetime: `server.max_connections` counts it, and shutdown
    /// waits until every permit is back.
    pub(super) _permit: OwnedSemaphorePermit,
    pub(super) metrics: Arc<Metrics>,
    pub(super) draining: CancellationToken,
    pub(super) builders: Builders,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.metrics.connections_open.decrement(1.0);
    }
}

impl Connection {
    /// Serves HTTP on `io` with hyper until the peer closes; once draining starts, finishes
    /// the requests in flight and closes the connection.
    pub(super) async fn serve<I, F, Fut>(self, io: I, protocol: Protocol, handler: F)
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
        F: Fn(hyper::Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = hyper::Response<GatewayBody>> + Send + 'static,
    {
        let service =
            service_fn(move |req| futures_util::FutureExt::map(handler(req), Ok::<_, Infallible>));
        let conn = self
            .builders
            .get(protocol)
            .serve_connection(TokioIo::new(io), service);
        tokio::pin!(conn);
        let result = tokio::select! {
            biased;
            result = conn.as_mut() => result,
            () = self.draining.cancelled() => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        };
        if let Err(e) = result {
            tracing::debug!(error = %e, "connection ended with an error");
        }
    }
}
