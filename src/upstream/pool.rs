//! Keep-alive HTTP/1.1 connections to the upstream, driven by the request that uses them.
//!
//! A connection is a socket with its read buffer, owned by one request at a time. The request's
//! task does the connection's I/O itself: it writes the request head and streams the body
//! ([`exchange`]), reads the response head, and then reads the response body as the client takes
//! it ([`ResponseBody`] carries the connection). The messages are encoded and parsed by
//! [`h1`]. When the body has been read to its end, and both sides allow it, the
//! connection goes back to its worker's idle list; a connection dropped mid-response, or whose
//! response was not framed to be followed by another, is closed.
//!
//! Nothing else holds a connection's waker: the only wake-ups are its socket's and its
//! response timer's, and both are for the task that is waiting on them.
//!
//! Each worker has its own [`Pool`], so the lock around the idle list is never contended; it is
//! held only to push or pop, never across an `.await`.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::body::RequestBody;
use super::error::{Error, ErrorKind};
use super::h1::{self, BodyDecoder, Decoded, ProtocolError, ResponseHead, ResponseTo};
use crate::http::drain_unread;

/// Read buffer space made available before each read, at first: a connection's reads grow to
/// [`MAX_READ_CHUNK`] while they keep filling all of it (a large response body), and the buffer
/// is made small again when the connection goes back to the pool.
const READ_CHUNK: usize = 8 * 1024;
const MAX_READ_CHUNK: usize = 128 * 1024;
/// Request body bytes taken from the client and queued before they are written.
const MAX_QUEUED: usize = 64 * 1024;

/// One upstream connection. Boxed: it moves through every request's futures and response; a
/// pointer moves for free.
pub struct Conn(Box<ConnState>);

struct ConnState {
    io: Stream,
    /// What has been read and not yet parsed or passed on.
    read: BytesMut,
    /// How much space is made available for the next read.
    read_size: usize,
    /// Where request heads are encoded (their bytes go out as shared slices of it).
    heads: BytesMut,
    /// Bytes to write, in order, and how many.
    out: VecDeque<Bytes>,
    queued: usize,
    /// The request body, while some of it is still to be sent.
    body: Option<RequestBody>,
    /// The body goes out in chunks (its length is unknown).
    chunked: bool,
    /// A frame of the body has been asked for: it can no longer be sent again.
    body_started: bool,
    /// The connection may carry another exchange once this one ends cleanly.
    reusable: bool,
    /// The response timeout, kept between exchanges ([`exchange`]).
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("reusable", &self.0.reusable)
            .finish_non_exhaustive()
    }
}

/// Why sending stopped.
enum SendError {
    Io(io::Error),
    Body(Error),
}

impl Conn {
    /// Whether an idle connection can take a request: the upstream has not closed it (or sent
    /// anything unasked) while it sat idle. A socket with nothing to read answers without a
    /// system call.
    fn ready(&mut self) -> bool {
        match &mut self.0.io {
            Stream::Plain(tcp) => {
                let mut probe = [0u8; 1];
                matches!(tcp.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
            // What arrived on an idle TLS connection goes through TLS: session tickets are
            // taken in and leave nothing to read; a close or stray data does.
            Stream::Tls(tls) => {
                let mut probe = [0u8; 1];
                let mut buf = ReadBuf::new(&mut probe);
                let mut cx = Context::from_waker(std::task::Waker::noop());
                Pin::new(tls.as_mut())
                    .poll_read(&mut cx, &mut buf)
                    .is_pending()
            }
        }
    }

    /// Encodes a request head for this connection: see [`h1::encode_request`].
    pub fn encode<K: Fn(&http::HeaderName) -> bool>(
        &mut self,
        head: &h1::RequestHead<'_, K>,
        framing: h1::RequestFraming,
    ) -> Bytes {
        let heads = &mut self.0.heads;
        heads.reserve(512);
        h1::encode_request(heads, head, framing);
        heads.split().freeze()
    }
}

impl ConnState {
    /// Whether some of the request is still to be written.
    fn sending(&self) -> bool {
        self.body.is_some() || !self.out.is_empty()
    }

    fn queue(&mut self, bytes: Bytes) {
        self.queued += bytes.len();
        self.out.push_back(bytes);
    }

    /// Writes the request: what is queued, then the body's frames as the client sends them.
    /// Ready once all of it is written.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), SendError>> {
        loop {
            // What the body has ready is queued first, so a small body goes out with its head
            // in one write.
            while self.queued < MAX_QUEUED
                && let Some(body) = self.body.as_mut()
            {
                self.body_started = true;
                match Pin::new(body).poll_frame(cx) {
                    Poll::Pending => break,
                    Poll::Ready(None) => {
                        self.body = None;
                        if self.chunked {
                            self.queue(h1::LAST_CHUNK);
                        }
                    }
                    Poll::Ready(Some(Ok(frame))) => {
                        // Trailers of a chunked request are not passed on.
                        if let Ok(data) = frame.into_data()
                            && !data.is_empty()
                        {
                            if self.chunked {
                                self.queue(h1::chunk_header(data.len()));
                                self.queue(data);
                                self.queue(h1::CHUNK_END);
                            } else {
                                self.queue(data);
                            }
                        }
                    }
                    Poll::Ready(Some(Err(e))) => {
                        self.body = None;
                        return Poll::Ready(Err(SendError::Body(e)));
                    }
                }
            }
            if self.out.is_empty() {
                return if self.body.is_none() {
                    Poll::Ready(Ok(()))
                } else {
                    Poll::Pending
                };
            }
            let mut slices = [IoSlice::new(&[]); 16];
            let mut count = 0;
            for (slice, bytes) in slices.iter_mut().zip(&self.out) {
                *slice = IoSlice::new(bytes);
                count += 1;
            }
            let written = ready!(Pin::new(&mut self.io).poll_write_vectored(cx, &slices[..count]))
                .map_err(SendError::Io)?;
            if written == 0 {
                return Poll::Ready(Err(SendError::Io(io::ErrorKind::WriteZero.into())));
            }
            self.queued -= written;
            let mut left = written;
            while left > 0 {
                let Some(front) = self.out.front_mut() else {
                    break;
                };
                if front.len() <= left {
                    left -= front.len();
                    self.out.pop_front();
                } else {
                    front.advance(left);
                    left = 0;
                }
            }
        }
    }

    /// Stops sending (the request can no longer be completed): the connection is not reused.
    /// What the client still sends of its body is read and dropped, so it gets the answer
    /// whole.
    fn abandon_send(&mut self) {
        if let Some(body) = self.body.take() {
            drain_unread(body);
        }
        self.out.clear();
        self.queued = 0;
        self.reusable = false;
    }

    /// Reads more from the socket into the read buffer; `Ok(0)` at the end of the stream.
    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.read.capacity() - self.read.len() < self.read_size / 2 {
            self.read.reserve(self.read_size);
        }
        let space = self.read.capacity() - self.read.len();
        let n = ready!(tokio_util::io::poll_read_buf(
            Pin::new(&mut self.io),
            cx,
            &mut self.read
        ))?;
        if n == space && self.read_size < MAX_READ_CHUNK {
            self.read_size *= 2;
        }
        Poll::Ready(Ok(n))
    }
}

/// An upstream connection's byte stream: plain TCP, or TLS over it (`https://` upstreams).
enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(tcp) => Pin::new(tcp).poll_read(cx, buf),
            Stream::Tls(tls) => Pin::new(tls.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(tcp) => Pin::new(tcp).poll_write(cx, buf),
            Stream::Tls(tls) => Pin::new(tls.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(tcp) => Pin::new(tcp).poll_write_vectored(cx, bufs),
            Stream::Tls(tls) => Pin::new(tls.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(tcp) => tcp.is_write_vectored(),
            Stream::Tls(tls) => tls.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(tcp) => Pin::new(tcp).poll_flush(cx),
            Stream::Tls(tls) => Pin::new(tls.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(tcp) => Pin::new(tcp).poll_shutdown(cx),
            Stream::Tls(tls) => Pin::new(tls.as_mut()).poll_shutdown(cx),
        }
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
    conn: Conn,
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

    /// The most recently used idle connection that can take a request, or `None`. Connections
    /// idle for longer than the timeout, or closed by the upstream, are dropped on the way.
    pub fn idle(&self) -> Option<Conn> {
        loop {
            let mut conn = self.pop_idle()?;
            if conn.ready() {
                return Some(conn);
            }
        }
    }

    fn pop_idle(&self) -> Option<Conn> {
        let now = Instant::now();
        let mut expired = Vec::new();
        let conn = {
            let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
            while idle
                .front()
                .is_some_and(|i| now.duration_since(i.since) >= self.idle_timeout)
            {
                expired.extend(idle.pop_front());
            }
            idle.pop_back().map(|i| i.conn)
        };
        drop(expired); // closing sockets is a syscall each: not under the lock
        conn
    }

    /// Opens a new connection. Nothing has been sent when this fails: the error says the
    /// request may be sent again.
    pub async fn connect(&self) -> Result<Conn, Error> {
        self.open()
            .await
            .map_err(|e| Error::new(ErrorKind::Connect, e).retryable())
    }

    async fn open(&self) -> Result<Conn, ConnectError> {
        let target = || format!("{}:{}", self.host, self.port);
        let io = tokio::time::timeout(self.connect_timeout, async {
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
                return Ok(Stream::Plain(stream));
            };
            let tls = tls
                .connector
                .connect(tls.server_name.clone(), stream)
                .await
                .map_err(|source| ConnectError::Tls {
                    target: target(),
                    source,
                })?;
            Ok(Stream::Tls(Box::new(tls)))
        })
        .await
        .map_err(|_| ConnectError::Timeout {
            target: target(),
            timeout: self.connect_timeout,
        })??;
        self.opened.increment(1);
        Ok(Conn(Box::new(ConnState {
            io,
            read: BytesMut::with_capacity(READ_CHUNK),
            read_size: READ_CHUNK,
            heads: BytesMut::new(),
            out: VecDeque::with_capacity(4),
            queued: 0,
            body: None,
            chunked: false,
            body_started: false,
            reusable: true,
            deadline: None,
        })))
    }

    /// Returns a connection whose last exchange ended cleanly to the idle list.
    fn put_back(&self, mut conn: Conn) {
        if !conn.0.reusable || self.max_idle == 0 {
            return;
        }
        if conn.0.read_size > READ_CHUNK {
            conn.0.read_size = READ_CHUNK;
            conn.0.read = BytesMut::with_capacity(READ_CHUNK);
        }
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < self.max_idle {
            idle.push_back(Idle {
                conn,
                since: Instant::now(),
            });
            return;
        }
        drop(idle);
        // Full: `conn` closes here, outside the lock.
    }

    /// Closes every idle connection (a worker does this before its runtime ends, so no socket
    /// outlives the reactor it is registered with).
    pub fn close_idle(&self) {
        let idle = std::mem::take(&mut *self.idle.lock().unwrap_or_else(PoisonError::into_inner));
        drop(idle);
    }
}

/// The upstream closed the connection before responding.
#[derive(Debug, thiserror::Error)]
#[error("the upstream closed the connection before responding")]
struct Closed;

/// No response head within the response timeout of the request's end.
#[derive(Debug, thiserror::Error)]
#[error("no response headers within {0:?} of the request's end")]
struct NoResponse(Duration);

/// A request on its way to the upstream: its encoded head and its body.
#[derive(Debug)]
pub struct Outgoing {
    /// The request head ([`Conn::encode`]).
    pub head: Bytes,
    /// The body, if there is one to send.
    pub body: Option<RequestBody>,
    /// The body goes in chunks.
    pub chunked: bool,
    /// What the request asks of the response (HEAD: no body; CONNECT: no tunnel).
    pub responds_to: ResponseTo,
    /// It may be sent again if a reused connection turns out closed before any response
    /// (RFC 9110 §9.2.2: an idempotent method, and no body sent yet).
    pub retryable: bool,
}

/// Sends `req` on `conn` and does the connection's I/O until the response head arrives, or until
/// `timeout` has passed since the request was written completely (a large upload may take as
/// long as it takes; an upstream that then stays silent may not). A response that comes before
/// the request's body has gone out whole is returned as it is; the rest of the body goes on
/// being sent while the response body is read and after it ([`ResponseBody`]), and the
/// connection is not reused: an upstream that answered early may not have read the body as part
/// of the request.
///
/// When a reused connection turns out closed before any response and the request may be sent
/// again ([`Outgoing::retryable`]), the error says so ([`Error::may_retry`]) and the body,
/// untouched, is back in `req`.
pub async fn exchange(
    conn: &mut Conn,
    req: &mut Outgoing,
    timeout: Duration,
) -> Result<ResponseHead, Error> {
    let state = &mut *conn.0;
    state.queue(req.head.clone());
    state.body = req.body.take();
    state.chunked = req.chunked;
    state.body_started = false;
    let mut sent = false;
    let mut write_error = None;
    let mut received = false;
    // The connection keeps its timer from one exchange to the next: moving a registered deadline
    // later is an atomic update, where a new timer per request would be an insertion into the
    // timer wheel and a removal from it.
    let mut deadline = state
        .deadline
        .take()
        .unwrap_or_else(|| Box::pin(tokio::time::sleep(timeout)));
    let result = poll_fn(|cx| {
        if !sent {
            match state.poll_send(cx) {
                Poll::Ready(Ok(())) => sent = true,
                Poll::Ready(Err(SendError::Body(e))) => {
                    state.abandon_send();
                    return Poll::Ready(Err(e));
                }
                Poll::Ready(Err(SendError::Io(e))) => {
                    // The upstream may still have answered (an early error, then a close):
                    // the response is read for as long as the response timeout allows.
                    state.abandon_send();
                    write_error = Some(e);
                    sent = true;
                }
                Poll::Pending => {}
            }
            if sent {
                deadline
                    .as_mut()
                    .reset(tokio::time::Instant::now() + timeout);
            }
        }
        loop {
            match h1::parse_response(&mut state.read, req.responds_to) {
                Ok(Some(head)) => return Poll::Ready(Ok(head)),
                Ok(None) => {}
                Err(e) => return Poll::Ready(Err(Error::new(ErrorKind::Protocol, e))),
            }
            match state.poll_read(cx) {
                Poll::Ready(Ok(n)) if n > 0 => received = true,
                Poll::Ready(result) => {
                    let error = match (result, write_error.take()) {
                        (Err(e), _) | (Ok(_), Some(e)) => Error::new(ErrorKind::Protocol, e),
                        (Ok(_), None) if received => {
                            Error::new(ErrorKind::Protocol, ProtocolError::IncompleteHead)
                        }
                        (Ok(_), None) => Error::new(ErrorKind::Protocol, Closed),
                    };
                    let error = if !received && req.retryable && !state.body_started {
                        req.body = state.body.take();
                        error.retryable()
                    } else {
                        error
                    };
                    state.abandon_send();
                    return Poll::Ready(Err(error));
                }
                Poll::Pending => break,
            }
        }
        if sent && deadline.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(Error::new(ErrorKind::Timeout, NoResponse(timeout))));
        }
        Poll::Pending
    })
    .await;
    state.deadline = Some(deadline);
    match &result {
        Ok(head) if head.keep_alive && !state.sending() => {}
        Ok(_) => state.reusable = false,
        Err(_) => state.abandon_send(),
    }
    result
}

/// The upstream's response body on its way to the client, with the connection it arrives on:
/// reading the body reads the connection (and sends what is left of the request, if the
/// response came early), and a body read to its end gives the connection back to the pool.
pub struct ResponseBody {
    conn: Option<Conn>,
    decoder: BodyDecoder,
    pool: Arc<Pool>,
}

impl std::fmt::Debug for ResponseBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseBody")
            .field("decoder", &self.decoder)
            .finish_non_exhaustive()
    }
}

impl ResponseBody {
    /// The body of the response `head` arriving on `conn`, from `pool`.
    pub fn new(head: &ResponseHead, conn: Conn, pool: Arc<Pool>) -> Self {
        Self {
            conn: Some(conn),
            decoder: BodyDecoder::new(head.body),
            pool,
        }
    }

    /// The body has ended: the connection goes back to the pool if nothing is left over. If
    /// the response came before the request's body was sent whole, the rest of the body is sent
    /// by a task of its own and the connection then closed: the client's body is taken whole, so
    /// its connection can carry its next request, and an upstream that answered early but still
    /// reads (as nginx's `return` does) gets what it reads.
    fn finish(&mut self) {
        let Some(mut conn) = self.conn.take() else {
            return;
        };
        if conn.0.sending() {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move {
                    if poll_fn(|cx| conn.0.poll_send(cx)).await.is_err() {
                        conn.0.abandon_send();
                    }
                });
            }
            return;
        }
        if conn.0.read.is_empty() {
            self.pool.put_back(conn);
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
        let Some(conn) = this.conn.as_mut() else {
            return Poll::Ready(None);
        };
        let state = &mut *conn.0;
        // A response that came before the request's body was sent whole: the rest of the body
        // goes on as the response is read, unless the upstream stopped taking it.
        if state.sending()
            && let Poll::Ready(Err(_)) = state.poll_send(cx)
        {
            state.abandon_send();
        }
        loop {
            match this.decoder.decode(&mut state.read) {
                Ok(Decoded::Data(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                Ok(Decoded::End) => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Ok(Decoded::NeedMore) => {}
                Err(e) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(Error::new(ErrorKind::Protocol, e))));
                }
            }
            match ready!(state.poll_read(cx)) {
                Ok(0) => {
                    if let Err(e) = this.decoder.eof() {
                        this.conn = None;
                        return Poll::Ready(Some(Err(Error::new(ErrorKind::Protocol, e))));
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(Error::new(ErrorKind::Protocol, e))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.decoder.is_done()
    }

    fn size_hint(&self) -> SizeHint {
        match self.decoder.remaining() {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        // A body with nothing in it (or read to its end but not yet past it) is complete.
        if self.decoder.is_done() {
            self.finish();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::task::{Wake, Waker};

    use http::{Request, Response};
    use hyper::body::Incoming;
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
    use tokio::net::TcpListener;

    use super::*;
    use crate::upstream::h1::RequestFraming;

    /// Counts wake-ups, and those that came while the task was being polled: those only make
    /// the task run once more for nothing.
    #[derive(Default)]
    struct Wakes {
        polling: AtomicBool,
        total: AtomicUsize,
        while_polled: AtomicUsize,
    }

    impl Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.wake_by_ref();
        }

        fn wake_by_ref(self: &Arc<Self>) {
            self.total.fetch_add(1, Ordering::SeqCst);
            if self.polling.load(Ordering::SeqCst) {
                self.while_polled.fetch_add(1, Ordering::SeqCst);
            }
        }
    }

    impl Wakes {
        /// Polls `poll` until it is ready, waiting for a wake-up between polls (as an executor
        /// would); fails if none comes.
        async fn run<T>(self: &Arc<Self>, mut poll: impl FnMut(&mut Context<'_>) -> Poll<T>) -> T {
            let waker = Waker::from(Arc::clone(self));
            let mut cx = Context::from_waker(&waker);
            loop {
                let before = self.total.load(Ordering::SeqCst);
                self.polling.store(true, Ordering::SeqCst);
                let polled = poll(&mut cx);
                self.polling.store(false, Ordering::SeqCst);
                if let Poll::Ready(v) = polled {
                    return v;
                }
                let woken = async {
                    while self.total.load(Ordering::SeqCst) == before {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                };
                tokio::time::timeout(Duration::from_secs(10), woken)
                    .await
                    .expect("a pending poll is followed by a wake-up");
            }
        }
    }

    /// An upstream that reads each request's head (and a chunked body, to its last chunk) and
    /// answers with what `respond` gives for it, closing the connection after it if told to.
    /// Every request head and body received is sent on the returned channel.
    async fn upstream(
        respond: impl Fn(&[u8]) -> (Vec<u8>, bool) + Send + Sync + 'static,
    ) -> (u16, tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let respond = Arc::new(respond);
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                let (respond, tx) = (Arc::clone(&respond), tx.clone());
                tokio::spawn(async move {
                    let mut buf = vec![0; 4096];
                    let mut seen = Vec::new();
                    loop {
                        let n = stream.read(&mut buf).await.unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        seen.extend_from_slice(&buf[..n]);
                        let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") else {
                            continue;
                        };
                        let chunked = seen[..end]
                            .windows(26)
                            .any(|w| w == b"transfer-encoding: chunked");
                        let end = if chunked {
                            match seen.windows(5).position(|w| w == b"0\r\n\r\n") {
                                Some(last) => last + 5,
                                None => continue,
                            }
                        } else {
                            end + 4
                        };
                        let request: Vec<u8> = seen.drain(..end).collect();
                        let (response, close) = respond(&request);
                        let _ = tx.send(request);
                        if stream.write_all(&response).await.is_err() || close {
                            return;
                        }
                    }
                });
            }
        });
        (port, rx)
    }

    fn pool(port: u16) -> Arc<Pool> {
        Arc::new(Pool::new(
            "127.0.0.1".into(),
            port,
            None,
            Duration::from_secs(5),
            4,
            Duration::from_secs(60),
            metrics::Counter::noop(),
        ))
    }

    /// A client's request as the gateway receives it (from a hyper server, here over an
    /// in-memory pipe), and the client's end of that pipe, for sending more of its body.
    async fn client_request(head: &str) -> (Request<Incoming>, DuplexStream) {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let (tx, rx) = tokio::sync::oneshot::channel();
        let tx = Mutex::new(Some(tx));
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                if let Some(tx) = tx.lock().unwrap().take() {
                    let _ = tx.send(req);
                }
                std::future::pending::<Result<Response<String>, Infallible>>()
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(server), service)
                .await;
        });
        client.write_all(head.as_bytes()).await.unwrap();
        (rx.await.unwrap(), client)
    }

    /// `req` made ready to go out on `conn`, as the proxy does.
    fn outgoing(conn: &mut Conn, req: Request<Incoming>, reused: bool) -> Outgoing {
        let (parts, body) = req.into_parts();
        let framing = if body.is_end_stream() {
            RequestFraming::for_body(&parts.method, Some(0))
        } else {
            RequestFraming::for_body(&parts.method, body.size_hint().exact())
        };
        let body =
            (!body.is_end_stream()).then(|| RequestBody::new(body, None, Duration::from_secs(60)));
        let head = h1::RequestHead {
            method: &parts.method,
            target: parts.uri.path(),
            host: None,
            headers: &parts.headers,
            keep: |_: &http::HeaderName| true,
            added: &[],
        };
        Outgoing {
            head: conn.encode(&head, framing),
            retryable: reused && body.is_none() && parts.method.is_idempotent(),
            body,
            chunked: framing == RequestFraming::Chunked,
            responds_to: ResponseTo::method(&parts.method),
        }
    }

    /// Reads `body` as hyper's server does: until it says it has ended, or, for a body of known
    /// length, until that many bytes have come (then it is dropped without a further poll).
    async fn read_body(body: &mut ResponseBody) -> Result<Vec<u8>, Error> {
        let mut data = Vec::new();
        let length = body.size_hint().exact();
        while !body.is_end_stream() && length.is_none_or(|n| (data.len() as u64) < n) {
            match poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx)).await {
                Some(frame) => data.extend_from_slice(&frame?.into_data().unwrap()),
                None => break,
            }
        }
        Ok(data)
    }

    /// One GET on `conn`: its response's status and body, and whether `conn` went back to the
    /// pool afterwards (it is then taken out again).
    async fn get(pool: &Arc<Pool>, conn: Conn, path: &str) -> (u16, Vec<u8>, Option<Conn>) {
        let mut conn = conn;
        let (req, _client) =
            client_request(&format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n")).await;
        let mut out = outgoing(&mut conn, req, false);
        let head = exchange(&mut conn, &mut out, Duration::from_secs(5))
            .await
            .unwrap();
        let mut body = ResponseBody::new(&head, conn, Arc::clone(pool));
        let data = read_body(&mut body).await.unwrap();
        drop(body);
        (head.status.as_u16(), data, pool.idle())
    }

    #[tokio::test]
    async fn an_exchange_wakes_its_task_only_for_what_it_waits_on_and_times_out_on_reuse() {
        let (port, _) = upstream(|req| {
            if req.starts_with(b"GET /silent ") {
                (Vec::new(), false)
            } else {
                (
                    b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello".to_vec(),
                    false,
                )
            }
        })
        .await;
        let pool = pool(port);
        let mut conn = pool.connect().await.unwrap();
        for round in 0..3 {
            let wakes = Arc::new(Wakes::default());
            let (req, _client) = client_request("GET /x HTTP/1.1\r\nhost: x\r\n\r\n").await;
            let mut out = outgoing(&mut conn, req, round > 0);
            let head = {
                let exchange = exchange(&mut conn, &mut out, Duration::from_secs(5));
                tokio::pin!(exchange);
                wakes.run(|cx| exchange.as_mut().poll(cx)).await.unwrap()
            };
            let mut body = ResponseBody::new(&head, conn, Arc::clone(&pool));
            let mut data = Vec::new();
            while let Some(frame) = wakes.run(|cx| Pin::new(&mut body).poll_frame(cx)).await {
                data.extend_from_slice(&frame.unwrap().into_data().unwrap());
            }
            assert_eq!(data, b"hello");
            assert_eq!(
                wakes.while_polled.load(Ordering::SeqCst),
                0,
                "round {round}: the task was woken while it ran ({} wake-ups in all)",
                wakes.total.load(Ordering::SeqCst)
            );
            drop(body);
            conn = pool
                .idle()
                .expect("the connection went back to the pool, reusable");
        }
        // The connection's timer, set for 5 s by the exchanges above, is moved to the new
        // exchange's (earlier) deadline.
        let (req, _client) = client_request("GET /silent HTTP/1.1\r\nhost: x\r\n\r\n").await;
        let mut out = outgoing(&mut conn, req, true);
        let started = Instant::now();
        let result = exchange(&mut conn, &mut out, Duration::from_millis(200)).await;
        assert!(
            matches!(&result, Err(e) if e.kind() == ErrorKind::Timeout),
            "{result:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(4));
    }

    #[tokio::test]
    async fn a_connection_is_reused_only_after_a_response_framed_to_be_followed() {
        let (port, _) = upstream(|req| {
            let path = req.split(|&b| b == b' ').nth(1).unwrap();
            let response: &[u8] = match path {
                b"/length" => b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello",
                b"/chunked" => {
                    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n\
                    3\r\nhel\r\n2;x=y\r\nlo\r\n0\r\ntrailer: t\r\n\r\n"
                }
                b"/empty" => b"HTTP/1.1 204 No Content\r\n\r\n",
                b"/interim" => {
                    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n\
                    content-length: 5\r\n\r\nhello"
                }
                b"/close" => {
                    b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 5\r\n\r\nhello"
                }
                b"/eof" => b"HTTP/1.1 200 OK\r\n\r\nhello",
                b"/extra" => {
                    b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhelloHTTP/1.1 200 OK\r\n\r\n"
                }
                b"/http10" => b"HTTP/1.0 200 OK\r\ncontent-length: 5\r\n\r\nhello",
                b"/both" => {
                    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n\
                    5\r\nhello\r\n0\r\n\r\n"
                }
                _ => unreachable!(),
            };
            let close = matches!(path, b"/eof");
            (response.to_vec(), close)
        })
        .await;
        let pool = pool(port);
        for (path, status, reused) in [
            ("/length", 200, true),
            ("/chunked", 200, true),
            ("/empty", 204, true),
            ("/interim", 200, true),
            ("/close", 200, false),
            ("/eof", 200, false),
            ("/extra", 200, false),
            ("/http10", 200, false),
            ("/both", 200, false),
        ] {
            let conn = pool.connect().await.unwrap();
            let (got, body, back) = get(&pool, conn, path).await;
            assert_eq!(got, status, "{path}");
            let expected: &[u8] = if status == 204 { b"" } else { b"hello" };
            assert_eq!(body, expected, "{path}");
            assert_eq!(back.is_some(), reused, "{path}");
        }
    }

    #[tokio::test]
    async fn malformed_responses_fail_the_exchange_or_the_body() {
        let (port, _) = upstream(|req| {
            let path = req.split(|&b| b == b' ').nth(1).unwrap();
            let response: &[u8] = match path {
                b"/head" => b"HTTP/1.1 200 OK\r\nbad header: x\r\n\r\n",
                b"/length" => b"HTTP/1.1 200 OK\r\ncontent-length: 5, 6\r\n\r\nhello",
                b"/short" => b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\nhello",
                b"/chunk" => b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhelloXX",
                b"/upgrade" => b"HTTP/1.1 101 Switching Protocols\r\nupgrade: x\r\n\r\n",
                _ => unreachable!(),
            };
            (response.to_vec(), true)
        })
        .await;
        let pool = pool(port);
        for path in ["/head", "/length", "/upgrade"] {
            let mut conn = pool.connect().await.unwrap();
            let (req, _c) =
                client_request(&format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n")).await;
            let mut out = outgoing(&mut conn, req, false);
            let result = exchange(&mut conn, &mut out, Duration::from_secs(5)).await;
            assert!(
                matches!(&result, Err(e) if e.kind() == ErrorKind::Protocol && !e.may_retry()),
                "{path}: {result:?}"
            );
        }
        for path in ["/short", "/chunk"] {
            let mut conn = pool.connect().await.unwrap();
            let (req, _c) =
                client_request(&format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n")).await;
            let mut out = outgoing(&mut conn, req, false);
            let head = exchange(&mut conn, &mut out, Duration::from_secs(5))
                .await
                .unwrap();
            let mut body = ResponseBody::new(&head, conn, Arc::clone(&pool));
            let result = read_body(&mut body).await;
            assert!(
                matches!(&result, Err(e) if e.kind() == ErrorKind::Protocol),
                "{path}: {result:?}"
            );
            drop(body);
            assert!(pool.idle().is_none(), "{path}");
        }
    }

    #[tokio::test]
    async fn a_closed_reused_connection_gives_back_only_a_request_that_may_be_repeated() {
        // Reads each request and closes without a word, as an upstream does whose keep-alive
        // timeout ran out just as the request was sent.
        let (port, mut seen) = upstream(|_| (Vec::new(), true)).await;
        let pool = pool(port);
        for (head, retryable) in [
            ("GET /a HTTP/1.1\r\nhost: x\r\n\r\n", true),
            ("DELETE /a HTTP/1.1\r\nhost: x\r\n\r\n", true),
            (
                "POST /a HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n",
                false,
            ),
        ] {
            let mut conn = pool.connect().await.unwrap();
            let (req, _c) = client_request(head).await;
            let mut out = outgoing(&mut conn, req, true);
            let result = exchange(&mut conn, &mut out, Duration::from_secs(5)).await;
            seen.recv().await.unwrap();
            match (result, retryable) {
                (Err(e), true) if e.may_retry() => {}
                (Err(e), false) if e.kind() == ErrorKind::Protocol && !e.may_retry() => {}
                (other, _) => panic!("{head:?}: {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn a_body_of_unknown_length_goes_in_chunks_and_an_early_response_ends_the_exchange() {
        let (port, mut seen) = upstream(|req| {
            if req.starts_with(b"POST /early ") {
                (
                    b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 3\r\n\r\nbig".to_vec(),
                    false,
                )
            } else {
                (
                    b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec(),
                    false,
                )
            }
        })
        .await;
        let pool = pool(port);
        let mut conn = pool.connect().await.unwrap();
        let (req, mut client) = client_request(
            "POST /up HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n",
        )
        .await;
        let mut out = outgoing(&mut conn, req, false);
        assert!(out.chunked);
        let sending = tokio::spawn(async move {
            let head = exchange(&mut conn, &mut out, Duration::from_secs(5))
                .await
                .unwrap();
            (head, conn)
        });
        client.write_all(b"6\r\n world\r\n0\r\n\r\n").await.unwrap();
        let (head, conn) = sending.await.unwrap();
        assert_eq!(head.status, 200);
        let request = String::from_utf8(seen.recv().await.unwrap()).unwrap();
        assert!(
            request.contains("transfer-encoding: chunked\r\n"),
            "{request}"
        );
        assert!(!request.contains("content-length"), "{request}");
        let body = &request[request.find("\r\n\r\n").unwrap() + 4..];
        let mut decoder = h1::BodyDecoder::new(h1::BodyFraming::Chunked);
        let mut wire = BytesMut::from(body);
        let mut decoded = Vec::new();
        while let Decoded::Data(d) = decoder.decode(&mut wire).unwrap() {
            decoded.extend_from_slice(&d);
        }
        assert_eq!(decoded, b"hello world");
        let mut body = ResponseBody::new(&head, conn, Arc::clone(&pool));
        assert_eq!(read_body(&mut body).await.unwrap(), b"ok");
        drop(body);
        let mut conn = pool.idle().expect("reused after a complete exchange");

        // The upstream answers before the body is complete: the response is returned, the rest
        // of the body still goes out (tests/gateway/upstream.rs checks the upstream gets it), and the
        // connection, whose upstream answered before reading the whole request, is not reused.
        let (req, mut client) =
            client_request("POST /early HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\nabc")
                .await;
        let mut out = outgoing(&mut conn, req, true);
        assert!(!out.chunked && !out.retryable);
        let head = exchange(&mut conn, &mut out, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(head.status, 413);
        let mut body = ResponseBody::new(&head, conn, Arc::clone(&pool));
        assert_eq!(read_body(&mut body).await.unwrap(), b"big");
        drop(body);
        client.write_all(&[b'x'; 97]).await.unwrap();
        assert!(pool.idle().is_none());
    }
}
