//! Keep-alive HTTP/1.1 connections to the upstream, driven by the request that uses them.
//!
//! hyper's high-level client runs every upstream connection as a task of its own and reaches it
//! through channels, so each forwarded request costs extra task wake-ups and a pool lookup under
//! a lock shared by all requests. Here a connection is its request sender and its connection
//! future together, owned by one request at a time. The request's task polls the connection
//! future itself: while the request goes out and the response head comes back, and then while
//! the response body streams to the client ([`UpstreamBody`] carries the connection). When the
//! body has been read to its end, the connection goes back to its worker's idle list; a
//! connection dropped mid-response is closed, as HTTP/1.1 requires.
//!
//! Each worker has its own [`Pool`], so the lock around the idle list is never contended; it is
//! held only to push or pop, never across an `.await`.

use std::collections::VecDeque;
use std::future::{Future, poll_fn};
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::proxy::RequestBody;
use crate::server::TaskGate;

type Driver = http1::Connection<TokioIo<TcpStream>, RequestBody>;

/// One upstream connection: the sender of requests and the future that does its I/O. Boxed:
/// hyper's connection state is large, and a pooled connection moves through every request's
/// futures and response; a pointer moves for free.
pub struct Conn(Box<ConnState>);

struct ConnState {
    sender: http1::SendRequest<RequestBody>,
    driver: Driver,
    /// The driver has completed: the connection is closed and must not be polled again.
    closed: bool,
    /// The response timeout, kept between exchanges ([`exchange`]).
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("closed", &self.0.closed)
            .finish()
    }
}

impl Conn {
    /// Does the connection's pending I/O; false once it is closed. Errors end the connection and
    /// reach the request through its response future or body, which is where they are reported.
    fn drive(&mut self, cx: &mut Context<'_>) -> bool {
        let state = &mut *self.0;
        if !state.closed && Pin::new(&mut state.driver).poll(cx).is_ready() {
            state.closed = true;
        }
        !state.closed
    }

    /// Whether an idle connection can take a request now: it is open (the upstream has not
    /// closed it while it sat idle) and its previous exchange is complete.
    ///
    /// Checked with a waker that does nothing ([`quiet`]): a connection's wakers are the task
    /// that last drove it, and the request about to be sent would otherwise wake its own task
    /// (the connection's request channel holds that task's waker), which then runs once more
    /// for nothing. The exchange drives the connection with the real waker right after.
    fn ready(&mut self) -> bool {
        let mut quiet = quiet();
        self.drive(&mut quiet)
            && matches!(self.0.sender.poll_ready(&mut quiet), Poll::Ready(Ok(())))
    }
}

/// A context whose waker does nothing, for polling what only the request's own [`Conn::drive`]
/// can complete: the response head and the end of the request body (hyper's connection reports
/// them through channels, whose wake-up would run the request's task once more for nothing), and
/// the response body's next frame. Every wake-up that matters (the socket, a timer) is
/// registered by the drive, with the task's own waker.
fn quiet() -> Context<'static> {
    Context::from_waker(Waker::noop())
}

/// Why no connection could be had.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The TCP connect failed.
    #[error("connect to {target}: {source}")]
    Io {
        /// `host:port`.
        target: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The TCP connect took longer than `upstream.connect_timeout`.
    #[error("connect to {target}: no answer within {timeout:?}")]
    Timeout {
        /// `host:port`.
        target: String,
        /// The timeout.
        timeout: Duration,
    },
    /// hyper refused the connection (never expected for a plain TCP stream).
    #[error("HTTP/1.1 handshake with {target}: {source}")]
    Handshake {
        /// `host:port`.
        target: String,
        /// Why.
        #[source]
        source: hyper::Error,
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
            .field("max_idle", &self.max_idle)
            .field("idle_timeout", &self.idle_timeout)
            .finish_non_exhaustive()
    }
}

impl Pool {
    /// A pool for `host:port`, keeping up to `max_idle` connections for up to `idle_timeout`,
    /// counting the connections it opens in `opened`.
    pub fn new(
        host: String,
        port: u16,
        connect_timeout: Duration,
        max_idle: usize,
        idle_timeout: Duration,
        opened: metrics::Counter,
    ) -> Self {
        Self {
            host,
            port,
            connect_timeout,
            max_idle,
            idle_timeout,
            idle: Mutex::new(VecDeque::new()),
            opened,
        }
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

    /// Opens a new connection.
    pub async fn connect(&self) -> Result<Conn, ConnectError> {
        let target = || format!("{}:{}", self.host, self.port);
        let stream = tokio::time::timeout(
            self.connect_timeout,
            TcpStream::connect((self.host.as_str(), self.port)),
        )
        .await
        .map_err(|_| ConnectError::Timeout {
            target: target(),
            timeout: self.connect_timeout,
        })?
        .map_err(|source| ConnectError::Io {
            target: target(),
            source,
        })?;
        // Requests are written whole; don't let Nagle hold their last segment back.
        let _ = stream.set_nodelay(true);
        let keepalive = socket2::TcpKeepalive::new().with_time(Duration::from_secs(60));
        let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive);
        let (sender, driver) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|source| ConnectError::Handshake {
                target: target(),
                source,
            })?;
        self.opened.increment(1);
        Ok(Conn(Box::new(ConnState {
            sender,
            driver,
            closed: false,
            deadline: None,
        })))
    }

    /// Returns a connection whose last exchange ended cleanly to the idle list.
    fn put_back(&self, conn: Conn) {
        if conn.0.closed || self.max_idle == 0 {
            return;
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

/// How one exchange on a connection failed.
#[derive(Debug)]
pub enum ExchangeError {
    /// The request never left: the connection was no longer usable (it may be retried).
    NotSent(Box<Request<RequestBody>>, hyper::Error),
    /// The exchange failed after the request started to go out.
    Failed(hyper::Error),
    /// No response head within the timeout after the request's body was sent.
    TimedOut,
}

/// Sends `req` on `conn` and drives the connection until the response head arrives, or until
/// `timeout` has passed since the request body was sent completely. `body_sent` resolves then;
/// `None` means the body is already complete (or absent), so the clock starts now. It is left in
/// place when the request never left, for a retry on another connection.
pub async fn exchange(
    conn: &mut Conn,
    req: Request<RequestBody>,
    body_sent: &mut Option<tokio::sync::oneshot::Receiver<()>>,
    timeout: Duration,
) -> Result<Response<Incoming>, ExchangeError> {
    let response = conn.0.sender.try_send_request(req);
    tokio::pin!(response);
    let mut clock = body_sent.is_none();
    // The connection keeps its timer from one exchange to the next: moving a registered deadline
    // later is an atomic update, where a new timer per request would be an insertion into the
    // timer wheel and a removal from it.
    let mut deadline = match conn.0.deadline.take() {
        Some(mut deadline) => {
            if clock {
                deadline
                    .as_mut()
                    .reset(tokio::time::Instant::now() + timeout);
            }
            deadline
        }
        None => Box::pin(tokio::time::sleep(timeout)),
    };
    let result = poll_fn(|cx| {
        conn.drive(cx);
        if let Poll::Ready(result) = response.as_mut().poll(&mut quiet()) {
            return Poll::Ready(result.map_err(|mut e| match e.take_message() {
                Some(req) => ExchangeError::NotSent(Box::new(req), e.into_error()),
                None => ExchangeError::Failed(e.into_error()),
            }));
        }
        if let Some(sent) = body_sent.as_mut()
            && let Poll::Ready(result) = Pin::new(sent).poll(&mut quiet())
        {
            *body_sent = None;
            // Err: the body was dropped unfinished, so the exchange fails by itself; no clock.
            if result.is_ok() {
                clock = true;
                deadline
                    .as_mut()
                    .reset(tokio::time::Instant::now() + timeout);
            }
        }
        if clock && deadline.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(ExchangeError::TimedOut));
        }
        Poll::Pending
    })
    .await;
    conn.0.deadline = Some(deadline);
    result
}

/// The upstream's response body on its way to the client, with the connection it arrives on:
/// reading the body drives the connection, and a body read to its end gives the connection back
/// to the pool.
pub struct UpstreamBody {
    incoming: Incoming,
    conn: Option<Conn>,
    pool: Arc<Pool>,
    /// The client connection's task gate: taking a frame wakes the upstream connection (room for
    /// the next), which the task running this drives itself whenever it needs the next frame.
    gate: Arc<TaskGate>,
    done: bool,
}

impl std::fmt::Debug for UpstreamBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamBody")
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

impl UpstreamBody {
    /// `incoming`, arriving on `conn` from `pool`, for a client connection whose task polls its
    /// connection through `gate`.
    pub(crate) fn new(
        incoming: Incoming,
        conn: Conn,
        pool: Arc<Pool>,
        gate: Arc<TaskGate>,
    ) -> Self {
        Self {
            incoming,
            conn: Some(conn),
            pool,
            gate,
            done: false,
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let frame = match this.conn.as_mut() {
            // What the connection has already read is taken first; only then is it driven for
            // more (which registers the task's waker with the socket).
            Some(conn) => {
                let incoming = &mut this.incoming;
                let mut take = || {
                    // The wake-up this drops is never needed: see the field's comment.
                    this.gate
                        .muted(|| Pin::new(&mut *incoming).poll_frame(&mut quiet()))
                        .0
                };
                match take() {
                    Poll::Pending => {
                        conn.drive(cx);
                        take()
                    }
                    ready => ready,
                }
            }
            None => Pin::new(&mut this.incoming).poll_frame(cx),
        };
        match &frame {
            Poll::Ready(None) => this.done = true,
            Poll::Ready(Some(Err(_))) => this.conn = None, // broken: close it now
            _ => {}
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.incoming.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.incoming.size_hint()
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take()
            && (self.done || self.incoming.is_end_stream())
        {
            self.pool.put_back(conn);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::task::Wake;

    use hyper::service::service_fn;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

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
        /// Polls `poll` until it is ready, as a client connection's task polls through `gate`,
        /// waiting for a wake-up between polls (as an executor would); fails if none comes.
        async fn run<T>(
            self: &Arc<Self>,
            gate: &Arc<TaskGate>,
            mut poll: impl FnMut(&mut Context<'_>) -> Poll<T>,
        ) -> T {
            let waker = Waker::from(Arc::clone(self));
            let cx = Context::from_waker(&waker);
            let gate_waker = Waker::from(Arc::clone(gate));
            loop {
                let before = self.total.load(Ordering::SeqCst);
                self.polling.store(true, Ordering::SeqCst);
                let polled = gate.polled(&cx, &gate_waker, &mut poll);
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

    /// An upstream that answers every request on a connection with `hello`, but `/silent`.
    async fn upstream() -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut buf = vec![0; 4096];
            let mut seen = Vec::new();
            loop {
                let n = stream.read(&mut buf).await.unwrap();
                if n == 0 {
                    return;
                }
                seen.extend_from_slice(&buf[..n]);
                while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                    if seen
                        .drain(..end + 4)
                        .as_slice()
                        .starts_with(b"GET /silent ")
                    {
                        continue;
                    }
                    stream
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello")
                        .await
                        .unwrap();
                }
            }
        });
        port
    }

    /// A request as the gateway forwards it: received by a hyper server (here over an
    /// in-memory pipe), its body wrapped in a [`RequestBody`].
    async fn client_request(path: &str) -> Request<RequestBody> {
        let (client, server) = tokio::io::duplex(4096);
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
        let mut client = client;
        client
            .write_all(format!("GET {path} HTTP/1.1\r\nhost: upstream\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let (parts, body) = rx.await.unwrap().into_parts();
        tokio::spawn(async move {
            // Keeps the client end open for as long as the test runs.
            let _client = client;
            std::future::pending::<()>().await;
        });
        Request::from_parts(parts, RequestBody::new(body, None, None).0)
    }

    #[tokio::test]
    async fn an_exchange_wakes_its_task_only_for_what_it_waits_on_and_times_out_on_reuse() {
        let port = upstream().await;
        let pool = Arc::new(Pool::new(
            "127.0.0.1".into(),
            port,
            Duration::from_secs(5),
            4,
            Duration::from_secs(60),
            metrics::Counter::noop(),
        ));
        let mut conn = pool.connect().await.unwrap();
        let gate: Arc<TaskGate> = Arc::default();
        for round in 0..3 {
            let wakes = Arc::new(Wakes::default());
            let req = client_request("/x").await;
            let mut sent = None;
            let response = {
                let exchange = exchange(&mut conn, req, &mut sent, Duration::from_secs(5));
                tokio::pin!(exchange);
                wakes
                    .run(&gate, |cx| exchange.as_mut().poll(cx))
                    .await
                    .unwrap()
            };
            let mut body =
                response.map(|b| UpstreamBody::new(b, conn, Arc::clone(&pool), Arc::clone(&gate)));
            let mut data = Vec::new();
            while let Some(frame) = wakes
                .run(&gate, |cx| Pin::new(body.body_mut()).poll_frame(cx))
                .await
            {
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
        let req = client_request("/silent").await;
        let started = Instant::now();
        let result = exchange(&mut conn, req, &mut None, Duration::from_millis(200)).await;
        assert!(matches!(result, Err(ExchangeError::TimedOut)), "{result:?}");
        assert!(started.elapsed() < Duration::from_secs(4));
    }
}
