//! Keep-alive HTTP/1.1 connections to the upstream, spoken by hyper's client.
//!
//! A connection is hyper's client connection: its task (spawned on the worker's runtime) does
//! the I/O, and the pool keeps its sending half. A request takes the warmest idle connection
//! ([`Pool::idle`]) or opens one ([`Pool::connect`]); when the response body has been read to
//! its end and the request was sent whole, the connection goes back to its worker's idle list
//! ([`ResponseBody`]). A connection whose response was not read to its end, or that the upstream
//! closes, is dropped.
//!
//! Each worker has its own [`Pool`], so the lock around the idle list is never contended; it is
//! held only to push or pop, never across an `.await`.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_util::either::Either;

use super::body::{Outbound, Sent};
use super::error::{Error, ErrorKind};

/// The sending half of one upstream connection.
pub type Sender = http1::SendRequest<Outbound>;

/// An upstream connection's byte stream: plain TCP, or TLS over it (`https://` upstreams).
type Stream = Either<TcpStream, Box<TlsStream<TcpStream>>>;

/// At most this many bytes of a request are taken and dropped once the upstream has stopped
/// reading ([`Io`]).
const UNREAD_BYTES: usize = 4 * 1024 * 1024;

/// A connection's byte stream as hyper's client uses it. It makes up for two ways hyper's
/// client (1.12) ends an exchange where the upstream answered before the request was written
/// whole:
///
/// - An upstream may answer before reading the body and close the connection (a 403 or 413 to
///   an upload); the next write of the body then fails, and hyper would end the exchange with
///   that error without reading the answer. So after a broken pipe or a reset on write, up to
///   [`UNREAD_BYTES`] more are taken as written and dropped, while hyper reads the answer; past
///   them, the error is reported.
/// - If the response is read whole while the request's last bytes wait in hyper's write buffer
///   (the socket being full), hyper's connection turns idle with them still to write. It writes
///   them later, but then does not look for the next request until something wakes its task,
///   and nothing does: the next request given to it waits for ever, and dropping its sender
///   does not close it. So a flush that ends a write the socket held up wakes the task once
///   more, and it finds itself idle.
struct Io {
    stream: Stream,
    /// The write error, and how many bytes may still be dropped before it is reported.
    stopped: Option<(io::ErrorKind, usize)>,
    /// Since the last flush, a write found the socket full.
    held: bool,
}

impl Io {
    /// What to report for a write of `len` bytes after a failure, or for a failed write.
    fn write_result(&mut self, len: usize, written: io::Result<usize>) -> io::Result<usize> {
        match written {
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
                ) =>
            {
                self.stopped = Some((e.kind(), UNREAD_BYTES));
                self.drop_written(len)
            }
            other => other,
        }
    }

    /// Notes whether a write of `len` bytes found the socket full.
    fn note_held(&mut self, len: usize, written: &Poll<io::Result<usize>>) {
        match written {
            Poll::Pending => self.held = true,
            Poll::Ready(Ok(n)) if *n < len => self.held = true,
            Poll::Ready(_) => {}
        }
    }

    fn drop_written(&mut self, len: usize) -> io::Result<usize> {
        match &mut self.stopped {
            Some((kind, 0)) => Err((*kind).into()),
            Some((_, left)) => {
                let n = len.min(*left);
                *left -= n;
                Ok(n)
            }
            None => Ok(len),
        }
    }
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.stopped.is_some() {
            return Poll::Ready(this.drop_written(buf.len()));
        }
        let written = Pin::new(&mut this.stream).poll_write(cx, buf);
        this.note_held(buf.len(), &written);
        Poll::Ready(this.write_result(buf.len(), ready!(written)))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let len = bufs.iter().map(|b| b.len()).sum();
        if this.stopped.is_some() {
            return Poll::Ready(this.drop_written(len));
        }
        let written = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        this.note_held(len, &written);
        Poll::Ready(this.write_result(len, ready!(written)))
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.stopped.is_none() {
            ready!(Pin::new(&mut this.stream).poll_flush(cx))?;
        }
        // hyper flushes its stream once its write buffer is empty.
        if std::mem::take(&mut this.held) {
            cx.waker().wake_by_ref();
        }
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.stopped.is_some() {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.stream).poll_shutdown(cx)
    }
}

/// TLS to the upstream: the client configuration and the name its certificate must carry (the
/// URL's host, also sent as SNI).
#[derive(Clone)]
pub struct Tls {
    pub connector: TlsConnector,
    pub server_name: ServerName<'static>,
}

/// Why no connection could be had.
#[derive(Debug, thiserror::Error)]
enum ConnectError {
    /// The TCP connect failed.
    #[error("connect to {target}")]
    Io {
        /// `host:port`.
        target: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The TLS handshake failed: most often a certificate that does not verify.
    #[error("TLS handshake with {target}")]
    Tls {
        /// `host:port`.
        target: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The connect (and TLS handshake) took longer than `upstream.connect_timeout`.
    #[error("connect to {target}: no answer within {timeout:?}")]
    Timeout {
        /// `host:port`.
        target: String,
        /// The timeout.
        timeout: Duration,
    },
}

struct Idle {
    sender: Sender,
    since: Instant,
}

/// A worker's keep-alive connections to the upstream.
pub struct Pool {
    host: String,
    port: u16,
    tls: Option<Tls>,
    connect_timeout: Duration,
    max_idle: usize,
    idle_timeout: Duration,
    /// Most recently used at the back: requests take the warmest connection, and the coldest
    /// ones at the front expire.
    idle: Mutex<VecDeque<Idle>>,
    /// `keygate_upstream_connections_opened_total`.
    opened: metrics::Counter,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("target", &format_args!("{}:{}", self.host, self.port))
            .field("tls", &self.tls.is_some())
            .field("max_idle", &self.max_idle)
            .field("idle_timeout", &self.idle_timeout)
            .finish_non_exhaustive()
    }
}

impl Pool {
    /// A pool for `host:port` (over TLS when `tls` is given), keeping up to `max_idle`
    /// connections for up to `idle_timeout`, counting the connections it opens in `opened`.
    pub fn new(
        host: String,
        port: u16,
        tls: Option<Tls>,
        connect_timeout: Duration,
        max_idle: usize,
        idle_timeout: Duration,
        opened: metrics::Counter,
    ) -> Self {
        Self {
            host,
            port,
            tls,
            connect_timeout,
            max_idle,
            idle_timeout,
            idle: Mutex::new(VecDeque::new()),
            opened,
        }
    }

    /// The host and port connections go to.
    pub fn address(&self) -> (&str, u16) {
        (&self.host, self.port)
    }

    /// The most recently used idle connection the upstream has not closed, or `None`.
    /// Connections idle for longer than the timeout, or closed, are dropped on the way.
    pub fn idle(&self) -> Option<Sender> {
        let now = Instant::now();
        let mut dropped = Vec::new();
        let sender = {
            let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
            while idle
                .front()
                .is_some_and(|i| now.duration_since(i.since) >= self.idle_timeout)
            {
                dropped.extend(idle.pop_front());
            }
            loop {
                match idle.pop_back() {
                    Some(i) if i.sender.is_closed() => dropped.push(i),
                    other => break other.map(|i| i.sender),
                }
            }
        };
        drop(dropped); // closing connections is a syscall each: not under the lock
        sender
    }

    /// Opens a new connection. Nothing has been sent when this fails: the error says the
    /// request may be sent again.
    pub async fn connect(&self) -> Result<Sender, Error> {
        let io = self
            .open()
            .await
            .map_err(|e| Error::new(ErrorKind::Connect, e).retryable())?;
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(Io {
                stream: io,
                stopped: None,
                held: false,
            }))
            .await
            .map_err(|e| Error::new(ErrorKind::Connect, e).retryable())?;
        // The connection's I/O runs on the worker's runtime; it ends when the upstream closes
        // the connection, or when the pool and the last response let go of it.
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream connection ended");
            }
        });
        self.opened.increment(1);
        Ok(sender)
    }

    async fn open(&self) -> Result<Stream, ConnectError> {
        let target = || format!("{}:{}", self.host, self.port);
        tokio::time::timeout(self.connect_timeout, async {
            let stream = TcpStream::connect((self.host.as_str(), self.port))
                .await
                .map_err(|source| ConnectError::Io {
                    target: target(),
                    source,
                })?;
            // Requests are written whole; don't let Nagle hold their last segment back.
            let _ = stream.set_nodelay(true);
            let keepalive = socket2::TcpKeepalive::new().with_time(Duration::from_secs(60));
            let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive);
            let Some(tls) = &self.tls else {
                return Ok(Either::Left(stream));
            };
            let tls = tls
                .connector
                .connect(tls.server_name.clone(), stream)
                .await
                .map_err(|source| ConnectError::Tls {
                    target: target(),
                    source,
                })?;
            Ok(Either::Right(Box::new(tls)))
        })
        .await
        .map_err(|_| ConnectError::Timeout {
            target: target(),
            timeout: self.connect_timeout,
        })?
    }

    /// Returns a connection whose last exchange ended cleanly to the idle list.
    fn put_back(&self, sender: Sender) {
        if self.max_idle == 0 || sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < self.max_idle {
            idle.push_back(Idle {
                sender,
                since: Instant::now(),
            });
            return;
        }
        drop(idle);
        // Full: `sender` closes its connection here, outside the lock.
    }

    /// Closes every idle connection (a worker does this before its runtime ends, so no socket
    /// outlives the reactor it is registered with).
    pub fn close_idle(&self) {
        let idle = std::mem::take(&mut *self.idle.lock().unwrap_or_else(PoisonError::into_inner));
        drop(idle);
    }
}

/// The upstream's response body on its way to the client. Read to its end, after a request that
/// was sent whole, it gives its connection back to the pool.
pub struct ResponseBody {
    inner: Incoming,
    /// The connection, its pool, and whether the request's body was taken whole.
    conn: Option<(Sender, Arc<Pool>, Sent)>,
}

impl std::fmt::Debug for ResponseBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseBody")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl ResponseBody {
    /// `inner`, the body of a response on the connection of `sender`, from `pool`; `sent`
    /// hears when the request's body was taken whole.
    pub fn new(inner: Incoming, sender: Sender, pool: Arc<Pool>, sent: Sent) -> Self {
        Self {
            inner,
            conn: Some((sender, pool, sent)),
        }
    }

    /// The body has ended: the connection goes back to the pool. If the response came before
    /// the request was sent whole, hyper's connection goes on sending the rest (held open
    /// until then by a task of its own), and is then closed: the client's body is taken whole,
    /// so its connection can carry its next request, and an upstream that answered early but
    /// still reads (as nginx's `return` does) gets what it reads.
    fn finish(&mut self) {
        let Some((sender, pool, mut sent)) = self.conn.take() else {
            return;
        };
        if sent.done() {
            pool.put_back(sender);
        } else if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                sent.wait().await;
                drop(sender);
            });
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let this = self.get_mut();
        match std::task::ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
            None => {
                this.finish();
                Poll::Ready(None)
            }
            Some(Ok(frame)) => Poll::Ready(Some(Ok(frame))),
            Some(Err(e)) => {
                this.conn = None;
                Poll::Ready(Some(Err(Error::new(ErrorKind::Protocol, e))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        // A body with nothing in it (or read to its end but not yet past it) is complete.
        if self.inner.is_end_stream() {
            self.finish();
        }
    }
}
