//! keygate's own HTTP/1.1 server side, for the requests a gateway serves all day: HTTP/1.1, a
//! request target in origin form, a `Host`, and a body framed by `Content-Length` or none.
//!
//! hyper's server side parsed every client request and wrote every response through its general
//! dispatch machinery (a body channel between the connection and the request, a timer per request
//! head, a dispatcher that polls the service and the connection in turns): about 15,000
//! instructions per request, a third of what nginx spends on the whole exchange (docs/
//! benchmarks.md, sixth round). This module reads the head, hands the request to the pipeline in
//! the connection's own task, and writes the response, with nothing in between.
//!
//! It takes no risk hyper does not: anything else is handed to hyper, which serves that
//! connection from then on, starting with the bytes already read ([`Ended::HandOver`]). That is
//! `Transfer-Encoding` (chunked bodies and every smuggling shape built on it), more than one
//! `Content-Length`, one that is not plain digits, `Expect`, `Upgrade`, HTTP/1.0 and HTTP/2 (its
//! preface does not parse as HTTP/1.1), `CONNECT`, absolute or asterisk targets, a missing `Host`,
//! a head httparse refuses or larger than `server.max_header_bytes`, more than
//! `server.max_headers` fields. hyper answers those as it always did (400, 431, 100 Continue, h2c).
//!
//! A connection is closed after the response when the client asked for that, when the gateway is
//! shutting down, and when the request's body was not all read (a refused upload): its unread
//! bytes must never be read as a request. The response then says `Connection: close`, and the
//! connection is shut down gracefully: its write side first, then what the client still sends is
//! read and dropped for a moment, so that closing with unread bytes does not reset the connection
//! under the response.

use std::future::{Future, poll_fn};
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, ready};
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Body as _, Frame, SizeHint};
use http_body_util::Either;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::h1;
use crate::proxy::{ClientBody, GatewayBody};
use crate::server::StopWatch;

/// Header fields parsed into an array on the stack; a larger `server.max_headers` takes a
/// vector per request.
const STACK_HEADERS: usize = 128;
/// More header fields than a `HeaderMap` takes (it panics past 32,768): hyper's, whatever
/// `server.max_headers` allows.
const MAX_MAP_HEADERS: usize = 1 << 14;
/// Bytes read from the client at a time for a request head.
const READ_SIZE: usize = 8 * 1024;
/// At most this many bytes read at a time for a request body.
const BODY_READ_SIZE: usize = 64 * 1024;
/// Response frames up to this size are copied behind the head (one write); larger ones are
/// written from their own buffer.
const COPY_LIMIT: usize = 16 * 1024;
/// Copied frames are written once this many bytes wait (frames that are always ready, from a fast
/// upstream, must not pile up).
const WRITE_BATCH: usize = 64 * 1024;
/// At most this long, and this many bytes, are read and dropped from a client whose connection is
/// closed with a request body unread.
const LINGER: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 1024 * 1024;

/// What bounds a client's request head.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// From the moment the server waits for a request until its head is complete (an idle
    /// keep-alive connection included).
    pub header_read_timeout: Duration,
    pub max_headers: usize,
    pub max_head_bytes: usize,
}

/// How a connection served here ended.
pub(crate) enum Ended<I> {
    /// Closed.
    Closed,
    /// A request this module does not serve: hyper serves the connection from here on, starting
    /// with the bytes already read.
    HandOver(I, Bytes),
}

/// The connection's I/O and what has been read but not yet taken, shared by the connection loop
/// and the request body that reads from it. Only ever locked inside a poll, never across an
/// `.await`; the two run in the same task, so the lock is never contended.
struct ConnIo<I> {
    io: I,
    buf: BytesMut,
    /// Bytes of the current request's body not yet taken by it.
    body_left: u64,
    /// The connection's task, waiting for a body that outlived its response to be taken whole
    /// or dropped.
    waiter: Option<std::task::Waker>,
}

impl<I: AsyncRead + Unpin> ConnIo<I> {
    /// Reads into the buffer, with room for at least a quarter of `want` bytes.
    fn poll_fill(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<io::Result<usize>> {
        if self.buf.capacity() - self.buf.len() < want / 4 {
            self.buf.reserve(want);
        }
        tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.buf)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Where a request body that was not all read with its head comes from.
trait BodySource: Send + Sync {
    /// The next bytes of the body; an error if the client closes first.
    fn poll_body(&self, cx: &mut Context<'_>) -> Poll<io::Result<Bytes>>;
    /// The body is dropped before its end.
    fn dropped(&self);
}

impl<I: AsyncRead + Unpin + Send> BodySource for Mutex<ConnIo<I>> {
    fn poll_body(&self, cx: &mut Context<'_>) -> Poll<io::Result<Bytes>> {
        let mut c = lock(self);
        if c.buf.is_empty() {
            let want = usize::try_from(c.body_left)
                .map_or(BODY_READ_SIZE, |left| left.clamp(READ_SIZE, BODY_READ_SIZE));
            let n = ready!(c.poll_fill(cx, want))?;
            if n == 0 {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the client closed the connection in the middle of the request body",
                )));
            }
        }
        let n = c
            .buf
            .len()
            .min(usize::try_from(c.body_left).unwrap_or(usize::MAX));
        c.body_left -= n as u64;
        if c.body_left == 0
            && let Some(waiter) = c.waiter.take()
        {
            waiter.wake();
        }
        Poll::Ready(Ok(c.buf.split_to(n).freeze()))
    }

    fn dropped(&self) {
        if let Some(waiter) = lock(self).waiter.take() {
            waiter.wake();
        }
    }
}

/// A request body read by this module: all of it read with the head, or streamed from the
/// connection, exactly `Content-Length` bytes.
pub struct Body {
    /// The bytes read with the head, then (if more are to come) the connection.
    first: Option<Bytes>,
    source: Option<Arc<dyn BodySource>>,
    /// Bytes not yet returned, `first` included.
    left: u64,
}

impl std::fmt::Debug for Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Body").field("left", &self.left).finish()
    }
}

impl Drop for Body {
    fn drop(&mut self) {
        if self.left > 0
            && let Some(source) = &self.source
        {
            source.dropped();
        }
    }
}

impl Body {
    fn empty() -> Self {
        Self {
            first: None,
            source: None,
            left: 0,
        }
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = self.get_mut();
        if let Some(first) = this.first.take() {
            this.left -= first.len() as u64;
            return Poll::Ready(Some(Ok(Frame::data(first))));
        }
        if this.left == 0 {
            return Poll::Ready(None);
        }
        let Some(source) = &this.source else {
            return Poll::Ready(None);
        };
        let data = ready!(source.poll_body(cx))?;
        this.left -= data.len() as u64;
        Poll::Ready(Some(Ok(Frame::data(data))))
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.left)
    }
}

/// Where the request head's parts are in the buffer, as offsets, so the head can be split off
/// and its values shared rather than copied.
type Span = (usize, usize);

struct Head {
    len: usize,
    method: Span,
    target: Span,
    content_length: Option<u64>,
    close: bool,
    count: usize,
}

/// Parses the request head at the front of `buf` (taking it, and the body if it is all there,
/// when it is one to serve here); `None` while it is incomplete.
/// `spans` is the connection's, reused from request to request.
fn parse<I: AsyncRead + Unpin + Send + 'static>(
    shared: &Arc<Mutex<ConnIo<I>>>,
    c: &mut ConnIo<I>,
    limits: &Limits,
    spans: &mut Vec<(Span, Span)>,
) -> Option<Next> {
    spans.clear();
    let head = if limits.max_headers <= STACK_HEADERS {
        let mut headers = [const { MaybeUninit::uninit() }; STACK_HEADERS];
        parse_head(&c.buf, &mut headers[..limits.max_headers], spans)
    } else {
        let mut headers = Vec::with_capacity(limits.max_headers);
        headers.resize_with(limits.max_headers, MaybeUninit::uninit);
        parse_head(&c.buf, &mut headers, spans)
    };
    let head = match head {
        Ok(Some(head)) => head,
        Ok(None) if c.buf.len() <= limits.max_head_bytes => return None,
        _ => return Some(Next::HandOver),
    };
    if head.len > limits.max_head_bytes {
        return Some(Next::HandOver);
    }
    let Ok(method) = Method::from_bytes(&c.buf[range(head.method)]) else {
        return Some(Next::HandOver);
    };
    if method == Method::CONNECT {
        return Some(Next::HandOver);
    }
    let head_bytes = c.buf.split_to(head.len).freeze();
    // A head refused from here on is put back, whole, for hyper.
    let restore = |c: &mut ConnIo<I>| {
        let mut all = BytesMut::with_capacity(head_bytes.len() + c.buf.len());
        all.extend_from_slice(&head_bytes);
        all.extend_from_slice(&c.buf);
        c.buf = all;
        Some(Next::HandOver)
    };
    let Ok(uri) = Uri::from_maybe_shared(head_bytes.slice(range(head.target))) else {
        return restore(c);
    };
    // Room for the request id the gateway adds.
    let mut headers = HeaderMap::with_capacity(head.count + 1);
    for &(name, value) in spans.iter() {
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(&head_bytes[range(name)]),
            HeaderValue::from_maybe_shared(head_bytes.slice(range(value))),
        ) else {
            return restore(c);
        };
        headers.append(name, value);
    }
    let length = head.content_length.unwrap_or(0);
    let body = if length == 0 {
        Body::empty()
    } else if c.buf.len() as u64 >= length {
        // The whole body came with the head: nothing to read from the connection for it.
        Body {
            first: Some(c.buf.split_to(length as usize).freeze()),
            source: None,
            left: length,
        }
    } else {
        let first = (!c.buf.is_empty()).then(|| c.buf.split().freeze());
        let taken = first.as_ref().map_or(0, |f| f.len() as u64);
        c.body_left = length - taken;
        Body {
            first,
            source: Some(Arc::clone(shared) as Arc<dyn BodySource>),
            left: length,
        }
    };
    let mut req = Request::new(Either::Left(body));
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.version_mut() = Version::HTTP_11;
    *req.headers_mut() = headers;
    Some(Next::Request(req, head.close))
}

fn range((at, len): Span) -> std::ops::Range<usize> {
    at..at + len
}

/// The head at the front of `buf`: `Ok(None)` if incomplete, `Err(())` if it is not one this
/// module serves. `spans` receives each header's name and value.
fn parse_head<'b>(
    buf: &'b [u8],
    slots: &mut [MaybeUninit<httparse::Header<'b>>],
    spans: &mut Vec<(Span, Span)>,
) -> Result<Option<Head>, ()> {
    let mut req = httparse::Request::new(&mut []);
    let status = httparse::ParserConfig::default()
        .parse_request_with_uninit_headers(&mut req, buf, slots)
        .map_err(drop)?;
    let httparse::Status::Complete(len) = status else {
        return Ok(None);
    };
    if req.version != Some(1) {
        return Err(());
    }
    let (Some(method), Some(target)) = (req.method, req.path) else {
        return Err(());
    };
    if !target.starts_with('/') {
        return Err(());
    }
    let base = buf.as_ptr() as usize;
    let span = |s: &[u8]| {
        if s.is_empty() {
            (0, 0)
        } else {
            (s.as_ptr() as usize - base, s.len())
        }
    };
    let mut head = Head {
        len,
        method: span(method.as_bytes()),
        target: span(target.as_bytes()),
        content_length: None,
        close: false,
        count: req.headers.len(),
    };
    if req.headers.len() >= MAX_MAP_HEADERS {
        return Err(());
    }
    let mut host = false;
    spans.reserve(req.headers.len());
    for h in req.headers.iter() {
        let name = h.name.as_bytes();
        if name.eq_ignore_ascii_case(b"content-length") {
            if head.content_length.is_some() {
                return Err(());
            }
            head.content_length = Some(h1::parse_length(h.value).ok_or(())?);
        } else if name.eq_ignore_ascii_case(b"host") {
            host = true;
        } else if name.eq_ignore_ascii_case(b"connection") {
            for token in h.value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                if token.eq_ignore_ascii_case(b"close") {
                    head.close = true;
                } else if token.eq_ignore_ascii_case(b"upgrade") {
                    return Err(());
                }
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding")
            || name.eq_ignore_ascii_case(b"expect")
            || name.eq_ignore_ascii_case(b"upgrade")
        {
            return Err(());
        }
        spans.push((span(name), span(h.value)));
    }
    if !host {
        return Err(());
    }
    Ok(Some(head))
}

/// Serves `io` until it closes or a request is one for hyper. `handler` answers each request,
/// inline in this task.
pub(crate) async fn serve<I, F, Fut>(
    io: I,
    limits: Limits,
    stop: &mut StopWatch,
    mut handler: F,
) -> Ended<I>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: FnMut(Request<ClientBody>) -> Fut,
    Fut: Future<Output = Response<GatewayBody>>,
{
    let shared = Arc::new(Mutex::new(ConnIo {
        io,
        buf: BytesMut::with_capacity(READ_SIZE),
        body_left: 0,
        waiter: None,
    }));
    let mut out = BytesMut::with_capacity(READ_SIZE);
    let mut timer: Pin<Box<Sleep>> = Box::pin(tokio::time::sleep(limits.header_read_timeout));
    let mut spans = Vec::new();
    let unread = loop {
        let next = next_request(&shared, &limits, stop, timer.as_mut(), &mut spans).await;
        let (req, asked_close) = match next {
            Next::Request(req, close) => (req, close),
            Next::Closed => break false,
            Next::HandOver => {
                return match Arc::try_unwrap(shared) {
                    Ok(m) => {
                        let c = m.into_inner().unwrap_or_else(PoisonError::into_inner);
                        Ended::HandOver(c.io, c.buf.freeze())
                    }
                    // A body of an earlier request is still alive somewhere: not a connection
                    // to go on with.
                    Err(_) => Ended::Closed,
                };
            }
        };
        let head_request = req.method() == Method::HEAD;
        let resp = handler(req).await;
        let stopping = poll_fn(|cx| Poll::Ready(stop.poll_stopped(cx))).await;
        // A body still unread: if nothing holds it any more, its bytes are never taken and the
        // connection ends with this response; if something does (the upstream answered before
        // reading it all, and the rest is still being sent to it), the next request waits for it.
        let unread = lock(&shared).body_left > 0;
        let abandoned = unread && Arc::strong_count(&shared) == 1;
        let close = asked_close || stopping || abandoned;
        if write_response(&shared, &mut out, resp, head_request, close)
            .await
            .is_err()
        {
            return Ended::Closed;
        }
        let unread = unread && !body_taken(&shared, stop).await;
        if close || unread {
            break unread;
        }
    };
    let shut = tokio::time::timeout(
        LINGER,
        poll_fn(|cx| Pin::new(&mut lock(&shared).io).poll_shutdown(cx)),
    )
    .await;
    if unread && matches!(shut, Ok(Ok(()))) {
        linger(&shared).await;
    }
    Ended::Closed
}

/// What comes next on the connection.
// Not boxed: the request is moved once, and a box would be an allocation per request.
#[allow(clippy::large_enum_variant)]
enum Next {
    /// A request this module serves, its head taken from the buffer; whether the client asked
    /// for the connection to close after it.
    Request(Request<ClientBody>, bool),
    /// The client closed the connection, kept it waiting too long, or the gateway is stopping.
    Closed,
    /// Something for hyper.
    HandOver,
}

/// Waits for the next request head, up to `server.header_read_timeout` from when the wait
/// began; a shutdown ends the wait.
async fn next_request<I: AsyncRead + Unpin + Send + 'static>(
    shared: &Arc<Mutex<ConnIo<I>>>,
    limits: &Limits,
    stop: &mut StopWatch,
    mut timer: Pin<&mut Sleep>,
    spans: &mut Vec<(Span, Span)>,
) -> Next {
    let mut armed = false;
    // The buffer's length when it last held no whole head: a head can only be completed by a
    // line's end, so it is parsed again only once a newline has come after that (a client
    // trickling its head a byte at a time costs a parse per line, not per byte).
    let mut incomplete: Option<usize> = None;
    poll_fn(|cx| {
        if stop.poll_stopped(cx) {
            return Poll::Ready(Next::Closed);
        }
        let mut c = lock(shared);
        loop {
            let worth_parsing = match incomplete {
                None => !c.buf.is_empty(),
                Some(len) => c.buf.get(len..).is_some_and(|new| new.contains(&b'\n')),
            };
            if worth_parsing {
                if let Some(next) = parse(shared, &mut c, limits, spans) {
                    return Poll::Ready(next);
                }
                incomplete = Some(c.buf.len());
            } else if incomplete.is_some_and(|_| c.buf.len() > limits.max_head_bytes) {
                return Poll::Ready(Next::HandOver);
            }
            match c.poll_fill(cx, READ_SIZE) {
                Poll::Ready(Ok(0) | Err(_)) => return Poll::Ready(Next::Closed),
                Poll::Ready(Ok(_)) => {}
                Poll::Pending => {
                    // The timer is armed only once the client keeps the server waiting: a
                    // request already in the buffer or on the socket costs no timer at all.
                    if !armed {
                        timer
                            .as_mut()
                            .reset(Instant::now() + limits.header_read_timeout);
                        armed = true;
                    }
                    if timer.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Next::Closed);
                    }
                    return Poll::Pending;
                }
            }
        }
    })
    .await
}

/// Waits until the current request's body has been taken whole (true), or dropped before its end
/// or the gateway stops (false).
async fn body_taken<I>(shared: &Arc<Mutex<ConnIo<I>>>, stop: &mut StopWatch) -> bool {
    poll_fn(|cx| {
        let mut c = lock(shared);
        if c.body_left == 0 {
            return Poll::Ready(true);
        }
        if Arc::strong_count(shared) == 1 || stop.poll_stopped(cx) {
            return Poll::Ready(false);
        }
        c.waiter = Some(cx.waker().clone());
        Poll::Pending
    })
    .await
}

/// Writes `bytes` whole.
async fn write_all<I: AsyncWrite + Unpin>(
    shared: &Mutex<ConnIo<I>>,
    mut bytes: &[u8],
) -> io::Result<()> {
    while !bytes.is_empty() {
        let n = poll_fn(|cx| Pin::new(&mut lock(shared).io).poll_write(cx, bytes)).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        bytes = &bytes[n..];
    }
    Ok(())
}

/// Writes `out` whole and empties it.
async fn drain<I: AsyncWrite + Unpin>(
    shared: &Mutex<ConnIo<I>>,
    out: &mut BytesMut,
) -> io::Result<()> {
    write_all(shared, out).await?;
    out.clear();
    Ok(())
}

/// A response body that broke off, or said more or less than its length.
fn broken(what: &'static str) -> io::Error {
    io::Error::other(what)
}

/// Writes the response: its head (with `Date`, the framing header and, if `close`, `Connection:
/// close`), then its body, as a length or in chunks, ending with a flush. An error means the
/// connection cannot go on (the client is gone, or the body broke off before its end).
async fn write_response<I: AsyncWrite + Unpin>(
    shared: &Mutex<ConnIo<I>>,
    out: &mut BytesMut,
    resp: Response<GatewayBody>,
    head_request: bool,
    close: bool,
) -> io::Result<()> {
    let (parts, mut body) = resp.into_parts();
    let status = parts.status;
    let bodiless = head_request
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.extend_from_slice(b" ");
    match parts.extensions.get::<hyper::ext::ReasonPhrase>() {
        Some(reason) => out.extend_from_slice(reason.as_bytes()),
        None => out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes()),
    }
    out.extend_from_slice(b"\r\n");
    for (name, value) in &parts.headers {
        // The framing is this writer's to say. Only a response to HEAD and a 304 keep the
        // length they were given (the GET's), and a 204 or 1xx has none.
        if (*name == header::CONTENT_LENGTH
            && !(head_request || status == StatusCode::NOT_MODIFIED))
            || *name == header::TRANSFER_ENCODING
            || *name == header::CONNECTION
        {
            continue;
        }
        h1::header_line(out, name, value);
    }
    if !parts.headers.contains_key(header::DATE) {
        out.extend_from_slice(b"date: ");
        out.extend_from_slice(&http_date());
        out.extend_from_slice(b"\r\n");
    }
    let length = body.size_hint().exact();
    if !bodiless {
        match length {
            Some(n) => h1::content_length_line(out, n),
            None => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        }
    } else if head_request
        && !parts.headers.contains_key(header::CONTENT_LENGTH)
        && let Some(n) = length.filter(|&n| n > 0)
    {
        // A HEAD answered by the gateway itself (health) says how long the GET's body is, as
        // an upstream's does.
        h1::content_length_line(out, n);
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    drop(parts);
    if !bodiless {
        let mut sent = 0u64;
        loop {
            // A frame that is ready goes out with what is already buffered; before waiting for
            // one, what is buffered goes out.
            let now = poll_fn(|cx| Poll::Ready(Pin::new(&mut body).poll_frame(cx))).await;
            let frame = match now {
                Poll::Ready(frame) => frame,
                Poll::Pending => {
                    drain(shared, out).await?;
                    flush(shared).await?;
                    poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await
                }
            };
            let Some(frame) = frame else { break };
            let Ok(data) = frame
                .map_err(|_| broken("the response body broke off"))?
                .into_data()
            else {
                // Trailers are not relayed.
                continue;
            };
            if data.is_empty() {
                continue;
            }
            sent += data.len() as u64;
            if length.is_some_and(|n| sent > n) {
                return Err(broken("the response body is longer than its length"));
            }
            if length.is_none() {
                h1::chunk_size_line(out, data.len());
            }
            if data.len() <= COPY_LIMIT {
                out.extend_from_slice(&data);
                if out.len() >= WRITE_BATCH {
                    drain(shared, out).await?;
                }
            } else {
                drain(shared, out).await?;
                write_all(shared, &data).await?;
            }
            if length.is_none() {
                out.extend_from_slice(b"\r\n");
            }
        }
        match length {
            Some(n) if sent != n => {
                return Err(broken("the response body is shorter than its length"));
            }
            Some(_) => {}
            None => out.extend_from_slice(&h1::LAST_CHUNK),
        }
    }
    drop(body);
    drain(shared, out).await?;
    flush(shared).await
}

/// Sends what the I/O holds (a TLS stream keeps written bytes as records until flushed).
async fn flush<I: AsyncWrite + Unpin>(shared: &Mutex<ConnIo<I>>) -> io::Result<()> {
    poll_fn(|cx| Pin::new(&mut lock(shared).io).poll_flush(cx)).await
}

/// After a response with the request's body unread, once the write side is shut: what the
/// client still sends is read and dropped, for at most [`LINGER`] and [`LINGER_BYTES`], so the
/// close does not reset the connection before the client has read the response.
async fn linger<I: AsyncRead + Unpin>(shared: &Mutex<ConnIo<I>>) {
    let drop_input = async {
        let mut dropped = 0;
        let mut scratch = [0u8; 4096];
        while dropped < LINGER_BYTES {
            let n = poll_fn(|cx| {
                let mut buf = ReadBuf::new(&mut scratch);
                ready!(Pin::new(&mut lock(shared).io).poll_read(cx, &mut buf))?;
                Poll::Ready(io::Result::Ok(buf.filled().len()))
            })
            .await;
            match n {
                Ok(0) | Err(_) => return,
                Ok(n) => dropped += n,
            }
        }
    };
    let _ = tokio::time::timeout(LINGER, drop_input).await;
}

/// The current time as an HTTP date (IMF-fixdate, RFC 9110 §5.6.7), formatted once a second per
/// thread.
fn http_date() -> [u8; 29] {
    thread_local! {
        static CACHED: std::cell::Cell<(u64, [u8; 29])> =
            const { std::cell::Cell::new((u64::MAX, [0; 29])) };
    }
    let now = SystemTime::now();
    let secs = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (at, date) = CACHED.get();
    if at == secs {
        return date;
    }
    let mut date = *b"Thu, 01 Jan 1970 00:00:00 GMT";
    let text = httpdate::fmt_http_date(now);
    if text.len() == date.len() {
        date.copy_from_slice(text.as_bytes());
    }
    CACHED.set((secs, date));
    date
}

/// A connection's I/O with bytes already read from it put back in front: what hyper serves a
/// handed-over connection through.
pub(crate) struct Rewind<I> {
    prefix: Bytes,
    io: I,
}

impl<I> Rewind<I> {
    pub(crate) fn new(io: I, prefix: Bytes) -> Self {
        Self { prefix, io }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Rewind<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix.split_to(n));
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Rewind<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt as _;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _, DuplexStream};
    use tokio::task::JoinHandle;

    const LIMITS: Limits = Limits {
        header_read_timeout: Duration::from_secs(5),
        max_headers: 20,
        max_head_bytes: 8 * 1024,
    };

    /// Serves one end of an in-memory pipe with `handler` on a task of its own; the other end
    /// is the client's.
    fn spawn_serve<F, Fut>(
        limits: Limits,
        handler: F,
    ) -> (DuplexStream, JoinHandle<Ended<DuplexStream>>)
    where
        F: FnMut(Request<ClientBody>) -> Fut + Send + 'static,
        Fut: Future<Output = Response<GatewayBody>> + Send + 'static,
    {
        let (client, server) = tokio::io::duplex(1 << 20);
        let task = tokio::spawn(async move {
            let (_tx, rx) = tokio::sync::watch::channel(false);
            serve(server, limits, &mut StopWatch::new(rx), handler).await
        });
        (client, task)
    }

    /// Ends the client's side for writing and waits for the server: what the client received,
    /// and, if the connection was handed over, the bytes handed over with it.
    async fn finish(
        mut client: DuplexStream,
        task: JoinHandle<Ended<DuplexStream>>,
    ) -> (String, Option<Bytes>) {
        client.shutdown().await.unwrap();
        let handed = match task.await.unwrap() {
            Ended::Closed => None,
            Ended::HandOver(io, rest) => {
                drop(io);
                Some(rest)
            }
        };
        let mut out = Vec::new();
        client.read_to_end(&mut out).await.unwrap();
        (String::from_utf8(out).unwrap(), handed)
    }

    /// Answers `METHOD PATH BODY-LENGTH`, reading the body, except on `/ignore`.
    async fn echo(req: Request<ClientBody>) -> Response<GatewayBody> {
        let (parts, body) = req.into_parts();
        let len = if parts.uri.path() == "/ignore" {
            0
        } else {
            body.collect().await.unwrap().to_bytes().len()
        };
        Response::new(GatewayBody::full(Bytes::from(format!(
            "{} {} {len}",
            parts.method,
            parts.uri.path()
        ))))
    }

    /// How a connection fed `input`, then closed by the client, went ([`finish`]), answered by
    /// [`echo`].
    async fn run(input: &[u8], limits: Limits) -> (String, Option<Bytes>) {
        let (mut client, task) = spawn_serve(limits, echo);
        client.write_all(input).await.unwrap();
        finish(client, task).await
    }

    /// The bodies of the responses in `out`, in order.
    fn bodies(out: &str) -> Vec<&str> {
        out.split("HTTP/1.1 ")
            .skip(1)
            .map(|r| {
                let (head, body) = r.split_once("\r\n\r\n").unwrap();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .unwrap()
                    .parse()
                    .unwrap();
                &body[..len]
            })
            .collect()
    }

    const GET: &str = "GET /a HTTP/1.1\r\nhost: x\r\n\r\n";

    #[tokio::test]
    async fn pipelined_requests_are_answered_in_order_with_their_bodies() {
        let input = format!(
            "{GET}POST /b?q=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhelloDELETE /c HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n"
        );
        let (out, handed) = run(input.as_bytes(), LIMITS).await;
        assert!(handed.is_none());
        assert_eq!(
            bodies(&out),
            ["GET /a 0", "POST /b 5", "DELETE /c 0"],
            "{out}"
        );
        assert_eq!(out.matches("date: ").count(), 3, "{out}");
        assert!(!out.contains("connection: close"), "{out}");
    }

    #[tokio::test]
    async fn a_body_that_arrives_after_its_head_is_read_from_the_connection() {
        // The body comes back whole.
        let (mut client, task) = spawn_serve(LIMITS, |req: Request<ClientBody>| async move {
            let body = req.into_body().collect().await.unwrap().to_bytes();
            Response::new(GatewayBody::full(body))
        });
        client
            .write_all(b"PUT /a HTTP/1.1\r\nhost: x\r\ncontent-length: 100000\r\n\r\nxyz")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        for _ in 0..10 {
            client.write_all(&[b'y'; 9_999]).await.unwrap();
        }
        client.write_all(&[b'z'; 7]).await.unwrap();
        client.write_all(GET.as_bytes()).await.unwrap();
        let (out, handed) = finish(client, task).await;
        assert!(handed.is_none());
        let expected = format!("xyz{}{}", "y".repeat(99_990), "z".repeat(7));
        assert_eq!(bodies(&out), [expected.as_str(), ""], "{out:.200}");
    }

    #[tokio::test]
    async fn requests_it_does_not_serve_go_to_hyper_with_every_byte_unread() {
        let many: String = (0..30).map(|i| format!("x-{i}: v\r\n")).collect();
        let long = "v".repeat(9 * 1024);
        let shapes = [
            "POST /a HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n".to_string(),
            "POST /a HTTP/1.1\r\nhost: x\r\ncontent-length: 1\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n".into(),
            "POST /a HTTP/1.1\r\nhost: x\r\ncontent-length: 1\r\ncontent-length: 1\r\n\r\nab".into(),
            "POST /a HTTP/1.1\r\nhost: x\r\ncontent-length: +1\r\n\r\na".into(),
            "POST /a HTTP/1.1\r\nhost: x\r\ncontent-length: 1, 1\r\n\r\na".into(),
            "POST /a HTTP/1.1\r\nhost: x\r\nexpect: 100-continue\r\ncontent-length: 1\r\n\r\n".into(),
            "GET /a HTTP/1.1\r\nhost: x\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n".into(),
            "GET /a HTTP/1.1\r\nhost: x\r\nupgrade: h2c\r\n\r\n".into(),
            "GET /a HTTP/1.0\r\nhost: x\r\n\r\n".into(),
            "GET /a HTTP/1.1\r\n\r\n".into(),
            "GET http://x/a HTTP/1.1\r\nhost: x\r\n\r\n".into(),
            "OPTIONS * HTTP/1.1\r\nhost: x\r\n\r\n".into(),
            "CONNECT x:443 HTTP/1.1\r\nhost: x:443\r\n\r\n".into(),
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".into(),
            "GET /a HTTP/1.1\r\nhost: x\r\nx-folded: a\r\n b\r\n\r\n".into(),
            "GET /a HTTP/1.1\r\nhost: x\r\nbad name: a\r\n\r\n".into(),
            "GET /a\x01 HTTP/1.1\r\nhost: x\r\n\r\n".into(),
            format!("GET /a HTTP/1.1\r\nhost: x\r\n{many}\r\n"),
            format!("GET /a HTTP/1.1\r\nhost: x\r\nx-long: {long}\r\n\r\n"),
        ];
        for shape in &shapes {
            // After a request served here, on the same connection, with another behind it.
            let input = format!("{GET}{shape}{GET}");
            let (out, handed) = run(input.as_bytes(), LIMITS).await;
            assert_eq!(bodies(&out), ["GET /a 0"], "{shape:?}: {out}");
            let handed = handed.unwrap_or_else(|| panic!("{shape:?} was not handed over"));
            assert_eq!(
                &handed[..],
                format!("{shape}{GET}").as_bytes(),
                "{shape:?}: the bytes handed over"
            );
        }
    }

    #[tokio::test]
    async fn a_refused_body_is_never_read_as_a_request() {
        // All of it came with the head: it is skipped by its length, and the connection goes on.
        let smuggled = GET.replace("/a", "/smuggled");
        let input = format!(
            "POST /ignore HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n{smuggled}{GET}",
            smuggled.len()
        );
        let (out, handed) = run(input.as_bytes(), LIMITS).await;
        assert!(handed.is_none());
        assert_eq!(bodies(&out), ["POST /ignore 0", "GET /a 0"], "{out}");
        // Not all of it came: the connection ends with the response, which says so.
        answered_then_closed(
            &format!("POST /ignore HTTP/1.1\r\nhost: x\r\ncontent-length: 1000\r\n\r\n{smuggled}"),
            "POST /ignore 0",
        )
        .await;
    }

    /// `input`'s first request is answered with `body` and `Connection: close`, and nothing
    /// after it is served.
    async fn answered_then_closed(input: &str, body: &str) {
        let (out, handed) = run(input.as_bytes(), LIMITS).await;
        assert!(handed.is_none());
        assert_eq!(bodies(&out), [body], "{out}");
        assert!(out.contains("connection: close\r\n"), "{out}");
    }

    #[tokio::test]
    async fn connection_close_is_honoured_and_what_follows_is_not_served() {
        answered_then_closed(
            &format!("GET /a HTTP/1.1\r\nhost: x\r\nconnection: keep-alive, close\r\n\r\n{GET}"),
            "GET /a 0",
        )
        .await;
    }

    #[tokio::test]
    async fn a_head_trickled_a_byte_at_a_time_is_served() {
        let (mut client, task) = spawn_serve(LIMITS, echo);
        let input = format!("{GET}{}", GET.replace("/a", "/b"));
        for byte in input.as_bytes() {
            client.write_all(&[*byte]).await.unwrap();
            tokio::task::yield_now().await;
        }
        let (out, _) = finish(client, task).await;
        assert_eq!(bodies(&out), ["GET /a 0", "GET /b 0"], "{out}");
    }

    #[tokio::test]
    async fn a_partial_head_is_closed_at_the_header_read_timeout() {
        let limits = Limits {
            header_read_timeout: Duration::from_millis(100),
            ..LIMITS
        };
        let started = std::time::Instant::now();
        let (mut client, task) = spawn_serve(limits, echo);
        client.write_all(b"GET /a HTTP/1.1\r\nhost").await.unwrap();
        // The client never ends its head, nor closes: the server does.
        assert!(matches!(task.await.unwrap(), Ended::Closed));
        assert!(started.elapsed() >= Duration::from_millis(100));
        let mut out = Vec::new();
        client.read_to_end(&mut out).await.unwrap();
        assert!(out.is_empty());
    }

    #[tokio::test]
    async fn bodiless_responses_keep_their_length_header_and_send_no_body() {
        let (mut client, task) = spawn_serve(LIMITS, |req: Request<ClientBody>| async move {
            let mut resp = Response::new(GatewayBody::empty());
            if req.uri().path() == "/none" {
                *resp.status_mut() = StatusCode::NO_CONTENT;
            } else {
                resp.headers_mut()
                    .insert(header::CONTENT_LENGTH, HeaderValue::from_static("42"));
            }
            resp
        });
        client
            .write_all(b"HEAD /a HTTP/1.1\r\nhost: x\r\n\r\nGET /none HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let (out, _) = finish(client, task).await;
        let (head, rest) = out.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
        assert!(head.contains("content-length: 42"), "{out}");
        assert!(rest.starts_with("HTTP/1.1 204 No Content\r\n"), "{out}");
        assert!(
            !rest.contains("content-length") && !rest.contains("transfer-encoding"),
            "{out}"
        );
        assert!(rest.ends_with("\r\n\r\n"), "{out}");
    }
}
