//! Listeners, connections and the gateway's lifetime.
//!
//! [`run`] takes already-bound listeners and a shutdown future, so tests start the real gateway on
//! `127.0.0.1:0`. On shutdown it stops accepting, lets in-flight requests finish for up to
//! `server.shutdown_grace`, flushes usage to the store, and returns.
//!
//! # Runtime model
//!
//! The pipeline runs on `server.workers` threads (one per CPU by default), each with its own
//! single-threaded tokio runtime, its own listening sockets (`SO_REUSEPORT` on one port: the kernel
//! spreads connections across workers) and its own upstream connection pool. A request is
//! accepted, authenticated, forwarded and answered on one core without a cross-thread wake-up.
//! Only what must be shared is: the key cache (lock-free reads), the rate limiters, metrics
//! (atomics) and the connection limit. The runtime that calls [`run`] keeps the admin listener
//! and the background jobs (change-feed poller, usage flusher, certificate reload). The load
//! benchmark (`benches/load/`, docs/benchmarks.md) is what chose this over one shared
//! multi-threaded runtime.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use http_body_util::Either;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio_rustls::TlsAcceptor;

use crate::admin::Admin;
use crate::cache::KeyCache;
use crate::config::{self, Config};
use crate::front;
use crate::gateway::{ConnInfo, Gateway};
use crate::metrics::Metrics;
use crate::redirect::Redirect;
use crate::store::SharedStore;
use crate::tls;

/// The gateway's bound listening sockets.
#[derive(Debug)]
pub struct Listeners {
    /// HTTPS (the pipeline): one socket per worker, all on one port.
    pub https: Vec<std::net::TcpListener>,
    /// Plain HTTP (redirects to HTTPS, or serves the pipeline: `server.http_mode`): one socket
    /// per worker, or none.
    pub http: Vec<std::net::TcpListener>,
    /// Admin (metrics, health, readiness).
    pub admin: Option<std::net::TcpListener>,
}

/// Start-up failures of the server.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A listener could not be bound.
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// Another process listens on the address.
    #[error(
        "cannot listen on {addr} ({what}): another process listens there, and only one may own \
         the port (stop it, or change server.{what}_listen)"
    )]
    Taken {
        what: &'static str,
        addr: SocketAddr,
    },
    /// TLS could not be set up.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// A worker thread or its runtime could not be started.
    #[error("cannot start a worker: {0}")]
    Worker(std::io::Error),
}

/// One listening socket; with `SO_REUSEPORT` so several can share a port.
fn listen(addr: SocketAddr, reuse_port: bool) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    #[cfg(unix)]
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    #[cfg(not(unix))]
    let _ = reuse_port;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// A socket bound to `addr` without `SO_REUSEPORT`, never listening: the bind fails while any
/// other socket listens on `addr`, a group sharing it through `SO_REUSEPORT` included.
fn probe(addr: SocketAddr) -> std::io::Result<socket2::Socket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.bind(&addr.into())?;
    Ok(socket)
}

fn bind_error(what: &'static str, addr: SocketAddr, source: std::io::Error) -> ServeError {
    if source.kind() == std::io::ErrorKind::AddrInUse {
        ServeError::Taken { what, addr }
    } else {
        ServeError::Bind { what, addr, source }
    }
}

/// Held while a process checks that a port is free and binds its group there, so that two
/// gateways starting at once cannot both find it free. An abstract Unix socket named after the
/// address: per network namespace like the port itself, and gone with the process.
#[cfg(target_os = "linux")]
struct PortLock {
    _socket: std::os::unix::net::UnixDatagram,
}

#[cfg(target_os = "linux")]
impl PortLock {
    fn take(what: &'static str, addr: SocketAddr) -> Result<Self, ServeError> {
        use std::os::linux::net::SocketAddrExt as _;
        let name = format!("keygate/listen/{addr}");
        std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
            .and_then(|lock| std::os::unix::net::UnixDatagram::bind_addr(&lock))
            .map(|socket| Self { _socket: socket })
            .map_err(|e| bind_error(what, addr, e))
    }
}

/// Elsewhere the probe alone guards the port.
#[cfg(not(target_os = "linux"))]
struct PortLock;

#[cfg(not(target_os = "linux"))]
impl PortLock {
    fn take(_what: &'static str, _addr: SocketAddr) -> Result<Self, ServeError> {
        Ok(Self)
    }
}

/// `n` sockets on `addr` (one port, also when `addr` asks for port 0), on a port no other
/// process listens on.
///
/// The workers share the port through `SO_REUSEPORT`, which would also let another process of
/// the same user join in and take a share of the connections (a second gateway started by
/// mistake answers some requests, or 502s them). So the group is bound only after a plain bind
/// of the address (the [`probe`]) succeeded, under a [`PortLock`] that keeps another gateway
/// from probing between this probe and this group's binds. Once the group listens, every later
/// probe fails. One socket on its own needs no `SO_REUSEPORT`, and its bind alone is exclusive.
fn listen_group(
    what: &'static str,
    addr: SocketAddr,
    n: usize,
) -> Result<Vec<std::net::TcpListener>, ServeError> {
    if n <= 1 {
        return Ok(vec![
            listen(addr, false).map_err(|e| bind_error(what, addr, e))?,
        ]);
    }
    let bound_by = |probe: &socket2::Socket| {
        probe
            .local_addr()
            .and_then(|a| {
                a.as_socket()
                    .ok_or_else(|| std::io::Error::other("not an IP socket"))
            })
            .map_err(|e| bind_error(what, addr, e))
    };
    // For port 0 the probe picks the port; the lock is then taken for it.
    let (probe, _lock) = if addr.port() == 0 {
        let probe = probe(addr).map_err(|e| bind_error(what, addr, e))?;
        let lock = PortLock::take(what, bound_by(&probe)?)?;
        (probe, lock)
    } else {
        let lock = PortLock::take(what, addr)?;
        (probe(addr).map_err(|e| bind_error(what, addr, e))?, lock)
    };
    let bound = bound_by(&probe)?;
    drop(probe);
    (0..n)
        .map(|_| listen(bound, true).map_err(|e| bind_error(what, bound, e)))
        .collect()
}

impl Listeners {
    /// Binds the listeners `[server]` names: `server.workers` sockets each for HTTPS and HTTP.
    pub fn bind(cfg: &config::Server) -> Result<Self, ServeError> {
        let workers = cfg.workers.max(1);
        Ok(Self {
            https: listen_group("https", cfg.https_listen, workers)?,
            http: match cfg.http_listen {
                Some(a) => listen_group("http", a, workers)?,
                None => Vec::new(),
            },
            admin: match cfg.admin_listen {
                Some(a) => Some(listen_group("admin", a, 1)?.remove(0)),
                None => None,
            },
        })
    }

    /// The HTTPS listener's address.
    pub fn https_addr(&self) -> Option<SocketAddr> {
        self.https.first().and_then(|l| l.local_addr().ok())
    }

    /// The HTTP listener's address, if there is one.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http.first().and_then(|l| l.local_addr().ok())
    }

    /// The admin listener's address, if there is one.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|l| l.local_addr().ok())
    }
}

/// Resolves once `flag` is (or was already) set, or its sender is gone.
async fn stopped(flag: &mut watch::Receiver<bool>) {
    let _ = flag.wait_for(|set| *set).await;
}

/// Runs `conn` to its end, or until `stop` fires first (`None`).
///
/// `conn` is polled with `gate`'s waker ([`TaskGate`]).
async fn until_stopped<C: Future>(
    mut conn: Pin<&mut C>,
    stop: &mut StopWatch,
    gate: &Arc<TaskGate>,
) -> Option<C::Output> {
    let gate_waker = Waker::from(Arc::clone(gate));
    std::future::poll_fn(|cx| {
        if let Poll::Ready(r) = gate.polled(cx, &gate_waker, |gated| conn.as_mut().poll(gated)) {
            return Poll::Ready(Some(r));
        }
        if stop.poll_stopped(cx) {
            return Poll::Ready(None);
        }
        Poll::Pending
    })
    .await
}

/// A connection's view of the shutdown signal. A connection's future is polled several times per
/// request and the signal almost never fires, so the signal is polled only on the first check and
/// when it woke the task itself (polling a watch receiver takes its lock; `tokio::select!` would
/// poll it on every wake-up).
pub(crate) struct StopWatch {
    stop: Pin<Box<dyn Future<Output = ()> + Send>>,
    signal: Arc<StopSignal>,
    waker: Waker,
    stopped: bool,
}

impl StopWatch {
    pub(crate) fn new(mut flag: watch::Receiver<bool>) -> Self {
        let signal = Arc::new(StopSignal {
            woken: AtomicBool::new(true),
            task: AtomicWaker::new(),
        });
        Self {
            stop: Box::pin(async move { stopped(&mut flag).await }),
            waker: Waker::from(Arc::clone(&signal)),
            signal,
            stopped: false,
        }
    }

    /// Whether the gateway is shutting down; if not, the task of `cx` is woken when it does.
    pub(crate) fn poll_stopped(&mut self, cx: &Context<'_>) -> bool {
        if !self.stopped {
            self.signal.task.register(cx.waker());
            if self.signal.woken.swap(false, Ordering::AcqRel)
                && self
                    .stop
                    .as_mut()
                    .poll(&mut Context::from_waker(&self.waker))
                    .is_ready()
            {
                self.stopped = true;
            }
        }
        self.stopped
    }
}

/// The waker a connection's task polls its connection with. It passes every wake-up on to the task,
/// except those that the task's own code causes inside [`TaskGate::muted`]: taking a frame of a
/// request body from hyper wakes the side of the connection that feeds it (there is room for the
/// next frame), and when the body is forwarded upstream by the request itself, that is the very
/// task doing the taking, so it would run once more for nothing. `muted` drops wake-ups only when
/// it runs inside the poll of the connection's task (not, say, in an HTTP/2 stream's own task), and
/// only those from the thread polling it (a wake-up from another thread, such as the shutdown
/// signal, always passes); the caller delivers a dropped wake-up when it turns out to be needed.
#[derive(Debug, Default)]
pub(crate) struct TaskGate {
    /// While the connection's task is being polled ([`TaskGate::polled`]): a token of the
    /// thread polling it; 0 otherwise.
    polling: AtomicUsize,
    /// While `muted` runs: a token of the thread running it; 0 otherwise.
    shut_on: AtomicUsize,
    /// `muted` dropped a wake-up.
    dropped: AtomicBool,
    task: AtomicWaker,
}

/// A token for the current thread: the address of a thread-local.
fn thread_token() -> usize {
    thread_local! {
        static TOKEN: u8 = const { 0 };
    }
    TOKEN.with(|t| std::ptr::from_ref(t) as usize)
}

impl TaskGate {
    /// Runs `f`, the poll of the connection's task (`cx` is the task's), with the gate as the
    /// waker: `gate_waker`, made from this gate once per connection.
    pub(crate) fn polled<T>(
        &self,
        cx: &Context<'_>,
        gate_waker: &Waker,
        f: impl FnOnce(&mut Context<'_>) -> T,
    ) -> T {
        self.task.register(cx.waker());
        self.polling.store(thread_token(), Ordering::Relaxed);
        let r = f(&mut Context::from_waker(gate_waker));
        self.polling.store(0, Ordering::Relaxed);
        r
    }

    /// Runs `f`, dropping the wake-ups it causes for the connection's task when that task is the
    /// one running it; says whether any was dropped.
    pub(crate) fn muted<R>(&self, f: impl FnOnce() -> R) -> (R, bool) {
        let thread = thread_token();
        if self.polling.load(Ordering::Relaxed) != thread {
            return (f(), false);
        }
        self.shut_on.store(thread, Ordering::Relaxed);
        let r = f();
        self.shut_on.store(0, Ordering::Relaxed);
        (r, self.dropped.swap(false, Ordering::Relaxed))
    }

    /// Delivers a wake-up that [`TaskGate::muted`] dropped.
    pub(crate) fn wake(&self) {
        self.task.wake();
    }
}

impl Wake for TaskGate {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        let shut_on = self.shut_on.load(Ordering::Relaxed);
        if shut_on != 0 && shut_on == thread_token() {
            self.dropped.store(true, Ordering::Relaxed);
            return;
        }
        self.task.wake();
    }
}

/// The waker a connection's stop signal is polled with: it notes that the signal woke, then wakes
/// the connection's task.
struct StopSignal {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl Wake for StopSignal {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

/// Per-connection settings shared by the accept loops.
#[derive(Clone)]
struct Accepting {
    stop: watch::Receiver<bool>,
    limit: Arc<Semaphore>,
    metrics: Arc<Metrics>,
    builder: auto::Builder<TokioExecutor>,
    /// keygate's own HTTP/1.1 server and its limits; `None`: hyper reads every request
    /// (`server.http1_server = "hyper"`).
    own_http1: Option<front::Limits>,
}

impl Accepting {
    /// Accepts until `stop` fires, handing each connection to `serve` on the current runtime.
    async fn run<F, Fut>(&self, listener: TcpListener, what: &'static str, serve: F)
    where
        F: Fn(TcpStream, SocketAddr, Connection) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let mut stop = self.stop.clone();
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
                _ = stopped(&mut stop) => return,
            };
            let Ok(permit) = Arc::clone(&self.limit).try_acquire_owned() else {
                self.metrics.connections_refused.increment(1);
                drop(stream);
                continue;
            };
            let _ = stream.set_nodelay(true);
            let conn = Connection {
                _permit: permit,
                gate: Arc::default(),
                metrics: Arc::clone(&self.metrics),
                stop: self.stop.clone(),
                builder: self.builder.clone(),
                own_http1: self.own_http1,
            };
            conn.metrics.connections_open.increment(1.0);
            // On the runtime of the calling thread: a worker's own, for the pipeline.
            tokio::spawn(serve(stream, peer, conn));
        }
    }
}

/// What a spawned connection task owns.
struct Connection {
    /// Held for the connection's lifetime: `server.max_connections` counts it, and shutdown
    /// waits until every permit is back.
    _permit: OwnedSemaphorePermit,
    /// What the connection is polled with; the pipeline's requests carry it ([`ConnInfo`]).
    gate: Arc<TaskGate>,
    metrics: Arc<Metrics>,
    stop: watch::Receiver<bool>,
    builder: auto::Builder<TokioExecutor>,
    own_http1: Option<front::Limits>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.metrics.connections_open.decrement(1.0);
    }
}

impl Connection {
    /// Serves HTTP on `io` with hyper until the peer closes; on shutdown, finishes the requests
    /// in flight and closes the connection.
    async fn serve<I, F, Fut>(self, io: I, handler: F)
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
        F: Fn(hyper::Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = hyper::Response<crate::proxy::GatewayBody>> + Send + 'static,
    {
        let mut stop = StopWatch::new(self.stop.clone());
        self.serve_hyper(io, handler, &mut stop).await;
    }

    async fn serve_hyper<I, F, Fut>(&self, io: I, handler: F, stop: &mut StopWatch)
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
        F: Fn(hyper::Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = hyper::Response<crate::proxy::GatewayBody>> + Send + 'static,
    {
        // `map`, not an `async move` block around the handler's future: hyper moves the future
        // into place for every request, and such a block would be twice the handler's size
        // (the captured future and the awaited one side by side).
        let service =
            service_fn(move |req| futures_util::FutureExt::map(handler(req), Ok::<_, Infallible>));
        let conn = self.builder.serve_connection(TokioIo::new(io), service);
        tokio::pin!(conn);
        let result = match until_stopped(conn.as_mut(), stop, &self.gate).await {
            Some(r) => r,
            None => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        };
        if let Err(e) = result {
            tracing::debug!(error = %e, "connection ended with an error");
        }
    }

    /// Serves the pipeline on `io`: HTTP/1.1 with keygate's own server ([`front`]) while the
    /// requests are ones it serves, then (from the first that is not, or for HTTP/2 negotiated
    /// by ALPN, `h2`) with hyper.
    async fn serve_gateway<I>(self, io: I, h2: bool, gateway: Arc<Gateway>, info: ConnInfo)
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let mut stop = StopWatch::new(self.stop.clone());
        let (io, read) = match self.own_http1 {
            Some(limits) if !h2 => {
                let ended = front::serve(io, limits, &mut stop, |req| {
                    Arc::clone(&gateway).handle(req, info.clone())
                })
                .await;
                match ended {
                    front::Ended::Closed => return,
                    front::Ended::HandOver(io, read) => {
                        self.metrics.http1_handovers.increment(1);
                        (io, read)
                    }
                }
            }
            _ => (io, Bytes::new()),
        };
        let handler = move |req: hyper::Request<Incoming>| {
            Arc::clone(&gateway).handle(req.map(Either::Right), info.clone())
        };
        self.serve_hyper(front::Rewind::new(io, read), handler, &mut stop)
            .await;
    }
}

fn builder(cfg: &config::Server, http1_only: bool) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    // The header read timeout also bounds how long an idle keep-alive connection is kept.
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(cfg.header_read_timeout)
        .keep_alive(true)
        .max_headers(cfg.max_headers)
        .max_buf_size(cfg.max_header_bytes);
    b.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(cfg.h2_max_concurrent_streams)
        .max_header_list_size(u32::try_from(cfg.max_header_bytes).unwrap_or(u32::MAX))
        // Rapid-reset protection: a client resetting streams faster than this loses the connection.
        .max_pending_accept_reset_streams(Some(50))
        .max_local_error_reset_streams(Some(256))
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(cfg.header_read_timeout);
    if http1_only { b.http1_only() } else { b }
}

/// What one worker serves, and with what.
struct Worker {
    index: usize,
    https: std::net::TcpListener,
    http: Option<std::net::TcpListener>,
    http_mode: config::HttpMode,
    acceptor: TlsAcceptor,
    handshake_timeout: Duration,
    gateway: Arc<Gateway>,
    redirect: Arc<Redirect>,
    pipeline: Accepting,
    plain: Accepting,
    /// Fires when the main runtime has finished draining: the worker's runtime may end.
    exit: watch::Receiver<bool>,
}

impl Worker {
    /// Runs the worker on the calling thread until told to exit.
    fn run(self) -> std::io::Result<()> {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(self.serve())
    }

    async fn serve(self) -> std::io::Result<()> {
        // Access lines gather per worker and go to the log writer in batches.
        crate::logging::batch_access_log();
        let flusher = tokio::spawn(async {
            let mut tick = tokio::time::interval(crate::logging::ACCESS_FLUSH_INTERVAL);
            loop {
                tick.tick().await;
                crate::logging::flush_access_log();
            }
        });
        // The worker thread's copy of the key cache lets go of what it can no longer serve.
        let cache = Arc::clone(self.gateway.cache());
        let sweeper = tokio::spawn(async move {
            let mut tick = tokio::time::interval(crate::cache::LOCAL_SWEEP_INTERVAL);
            loop {
                tick.tick().await;
                cache.sweep_local(std::time::Instant::now());
            }
        });
        let https = TcpListener::from_std(self.https)?;
        let http = self.http.map(TcpListener::from_std).transpose()?;
        let index = self.index;
        let handshake_timeout = self.handshake_timeout;
        let acceptor = self.acceptor;
        let gateway = &self.gateway;
        let tls_loop = self.pipeline.run(https, "https", |stream, peer, conn| {
            let acceptor = acceptor.clone();
            let gateway = Arc::clone(gateway);
            async move {
                let mut stop = conn.stop.clone();
                let handshake = tokio::time::timeout(handshake_timeout, acceptor.accept(stream));
                let tls = tokio::select! {
                    r = handshake => r,
                    _ = stopped(&mut stop) => return,
                };
                let tls = match tls {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        conn.metrics.tls_handshake_failures.increment(1);
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        conn.metrics.tls_handshake_failures.increment(1);
                        tracing::debug!(%peer, "TLS handshake timed out");
                        return;
                    }
                };
                let info = ConnInfo::new(peer, true, index, Arc::clone(&conn.gate));
                let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
                conn.serve_gateway(tls, h2, gateway, info).await;
            }
        });
        let plain_loop = async {
            let Some(listener) = http else {
                return;
            };
            match self.http_mode {
                config::HttpMode::Redirect => {
                    self.plain
                        .run(listener, "http", |stream, _peer, conn| {
                            let redirect = Arc::clone(&self.redirect);
                            let metrics = Arc::clone(&conn.metrics);
                            conn.serve(stream, move |req| {
                                metrics.redirects.increment(1);
                                let resp = redirect.respond(&req);
                                async move { resp }
                            })
                        })
                        .await;
                }
                config::HttpMode::Serve => {
                    // Behind a TLS-terminating load balancer: the same pipeline, HTTP/1.1 or h2c.
                    self.pipeline
                        .run(listener, "http", |stream, peer, conn| {
                            let gateway = Arc::clone(gateway);
                            let info = ConnInfo::new(peer, false, index, Arc::clone(&conn.gate));
                            conn.serve_gateway(stream, false, gateway, info)
                        })
                        .await;
                }
            }
        };
        tokio::join!(tls_loop, plain_loop);
        // Accepting has stopped; the connections still open finish on this runtime until the
        // main runtime says the drain is over.
        let mut exit = self.exit;
        stopped(&mut exit).await;
        self.gateway.close_worker_connections(index);
        flusher.abort();
        sweeper.abort();
        crate::logging::flush_access_log();
        Ok(())
    }
}

/// Runs the gateway until `shutdown` resolves, then drains and returns.
pub async fn run(
    config: Config,
    store: SharedStore,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    run_until(config, store, listeners, shutdown, std::future::pending()).await
}

/// [`run`], where `cut_short` resolving during the drain (a second SIGTERM or SIGINT) ends it
/// at once: the connections still open are closed without waiting for `server.shutdown_grace`.
/// Usage is still flushed.
pub async fn run_until(
    mut config: Config,
    store: SharedStore,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
    cut_short: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    if config.server.public_port == 0 {
        // Listening on an ephemeral port: redirect to the port actually bound.
        config.server.public_port = listeners.https_addr().map_or(443, |a| a.port());
    }
    let hosts = [config.server.public_host.clone()];
    let served = tls::ServedCert::load(&config.tls, &hosts)?;
    let acceptor = TlsAcceptor::from(served.server_config()?);
    let metrics = Arc::new(Metrics::new(&config.metrics.latency_buckets));
    metrics
        .tls_certificate_expiry
        .set(served.not_after() as f64);
    // Store connections are born and driven on this runtime, whichever worker calls.
    let store = crate::store::pinned::Pinned::wrap(store, tokio::runtime::Handle::current());
    let cache = Arc::new(KeyCache::new(store, &config.store, Arc::clone(&metrics)));
    cache.refresh_counts().await;
    let workers = listeners.https.len();
    let gateway = Arc::new(Gateway::new(
        &config,
        Arc::clone(&cache),
        Arc::clone(&metrics),
        workers,
    ));
    let redirect = Arc::new(Redirect::new(&config.server, &config.headers));
    let admin = Arc::new(Admin::new(Arc::clone(&gateway), Arc::clone(&metrics)));

    let (stop_tx, stop_rx) = watch::channel(false);
    let background = [
        tokio::spawn(Arc::clone(&cache).poll_changes(config.store.poll_interval, stop_rx.clone())),
        tokio::spawn(
            Arc::clone(&cache)
                .flush_usage_every(config.store.usage_flush_interval, stop_rx.clone()),
        ),
        tokio::spawn(Arc::clone(&cache).refresh_ahead(stop_rx.clone())),
        tokio::spawn(upkeep(
            Arc::clone(&metrics),
            Arc::clone(&gateway),
            stop_rx.clone(),
        )),
        tokio::spawn(reload_certificate(
            Arc::clone(&served),
            config.tls.watch_interval,
            Arc::clone(&metrics),
            stop_rx.clone(),
        )),
    ];

    let max_connections = config.server.max_connections;
    let limit = Arc::new(Semaphore::new(max_connections));
    let pipeline = Accepting {
        stop: stop_rx.clone(),
        limit: Arc::clone(&limit),
        metrics: Arc::clone(&metrics),
        builder: builder(&config.server, false),
        own_http1: (config.server.http1_server == config::Http1Server::Keygate).then_some(
            front::Limits {
                header_read_timeout: config.server.header_read_timeout,
                max_headers: config.server.max_headers,
                max_head_bytes: config.server.max_header_bytes,
            },
        ),
    };
    let plain = Accepting {
        builder: builder(&config.server, true),
        ..pipeline.clone()
    };
    tracing::info!(
        https = %listeners.https_addr().map(|a| a.to_string()).unwrap_or_default(),
        http = %listeners.http_addr().map(|a| a.to_string()).unwrap_or_default(),
        admin = %listeners.admin_addr().map(|a| a.to_string()).unwrap_or_default(),
        upstream = %config.upstream.url,
        workers,
        config = %config.source.as_deref().map(|p| p.display().to_string()).unwrap_or_default(),
        store = %config.store.backend,
        "keygate listening"
    );

    let (exit_tx, exit_rx) = watch::channel(false);
    let mut http = listeners.http.into_iter();
    let mut threads = Vec::with_capacity(workers);
    for (index, https) in listeners.https.into_iter().enumerate() {
        let worker = Worker {
            index,
            https,
            http: http.next(),
            http_mode: config.server.http_mode,
            acceptor: acceptor.clone(),
            handshake_timeout: config.server.handshake_timeout,
            gateway: Arc::clone(&gateway),
            redirect: Arc::clone(&redirect),
            pipeline: pipeline.clone(),
            plain: plain.clone(),
            exit: exit_rx.clone(),
        };
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name(format!("keygate-worker-{index}"))
            .spawn(move || {
                let result = worker.run();
                if let Err(e) = &result {
                    tracing::error!(worker = index, error = %e, "worker stopped with an error");
                }
                let _ = done_tx.send(result);
            })
            .map_err(ServeError::Worker)?;
        threads.push(done_rx);
    }

    let admin_loop = async {
        match listeners.admin.map(TcpListener::from_std).transpose() {
            Ok(Some(listener)) => {
                plain
                    .run(listener, "admin", |stream, _peer, conn| {
                        let admin = Arc::clone(&admin);
                        conn.serve(stream, move |req| {
                            let admin = Arc::clone(&admin);
                            async move { admin.handle(req).await }
                        })
                    })
                    .await;
            }
            Ok(None) => {}
            Err(e) => tracing::error!(error = %e, "admin listener unusable"),
        }
        std::future::pending::<()>().await;
    };

    tokio::select! {
        _ = admin_loop => {}
        _ = shutdown => {}
    }
    tracing::info!(grace = ?config.server.shutdown_grace, "shutting down: no new connections; draining");
    let _ = stop_tx.send(true);
    // Every open connection holds a permit: all of them back means every connection is closed.
    let all = u32::try_from(max_connections).unwrap_or(u32::MAX);
    tokio::select! {
        drained = tokio::time::timeout(config.server.shutdown_grace, limit.acquire_many(all)) => {
            if drained.is_err() {
                tracing::warn!("shutdown grace elapsed; closing the remaining connections");
            }
        }
        () = cut_short => {
            tracing::warn!("second shutdown signal: closing the remaining connections now");
        }
    }
    let _ = exit_tx.send(true);
    for done in threads {
        let _ = done.await;
    }
    for task in background {
        let _ = task.await;
    }
    match cache.flush_usage().await {
        Ok(n) => tracing::info!(keys = n, "usage flushed"),
        Err(e) => {
            tracing::error!(error = %e, "final usage flush failed; recent last_used values are lost")
        }
    }
    tracing::info!("keygate stopped");
    Ok(())
}
/// Reloads the certificate on SIGHUP and when its files change. A bad new certificate is logged
/// and refused; the current one keeps serving.
async fn reload_certificate(
    served: Arc<tls::ServedCert>,
    watch_every: Duration,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
) {
    #[cfg(unix)]
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    let mut ticker = tokio::time::interval(if watch_every.is_zero() {
        Duration::from_secs(3600)
    } else {
        watch_every
    });
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        #[cfg(unix)]
        let sighup = async {
            match hangup.as_mut() {
                Some(h) => {
                    h.recv().await;
                }
                None => std::future::pending().await,
            }
        };
        #[cfg(not(unix))]
        let sighup = std::future::pending::<()>();
        let why = tokio::select! {
            _ = sighup => "SIGHUP",
            _ = ticker.tick() => {
                if watch_every.is_zero() || !served.files_changed() {
                    continue;
                }
                "file change"
            }
            _ = stop.changed() => return,
        };
        match served.reload() {
            Ok(()) => {
                metrics
                    .tls_certificate_expiry
                    .set(served.not_after() as f64);
                tracing::info!(
                    trigger = why,
                    not_after = served.not_after(),
                    "TLS certificate reloaded"
                );
            }
            Err(e) => tracing::error!(
                trigger = why,
                error = %e,
                "TLS certificate reload refused; the current certificate stays in service"
            ),
        }
    }
}

/// Periodic housekeeping: histogram buffers and idle rate-limiter state.
async fn upkeep(metrics: Arc<Metrics>, gateway: Arc<Gateway>, mut stop: watch::Receiver<bool>) {
    let mut ticker = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = ticker.tick() => {
                metrics.upkeep();
                gateway.limits().housekeeping();
            }
            _ = stop.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::proxy::RequestBody;

    /// Counts the polls of the future it wraps.
    struct Counted<F> {
        inner: Pin<Box<F>>,
        polls: Arc<AtomicUsize>,
    }

    impl<F: Future> Future for Counted<F> {
        type Output = F::Output;

        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
            self.polls.fetch_add(1, Ordering::SeqCst);
            self.inner.as_mut().poll(cx)
        }
    }

    /// Serves one POST of `len` bytes on a connection whose task polls it through a gate, as
    /// the pipeline does: the request's own task takes the body (with the gate, or without it
    /// when `gated` is false) and echoes it. Returns how often the connection's task was polled
    /// from start to end, and the echoed body's length.
    async fn serve_one_post(gated: bool, len: usize) -> (usize, usize) {
        let (mut client, server) = tokio::io::duplex(4096);
        let gate: Arc<TaskGate> = Arc::default();
        let service_gate = Arc::clone(&gate);
        let service = service_fn(move |req: hyper::Request<Incoming>| {
            let gate = Arc::clone(&service_gate);
            async move {
                let body = req.into_body();
                let body = RequestBody::new(
                    http_body_util::Either::Right(body),
                    None,
                    gated.then_some(&gate),
                );
                let bytes = body.collect().await.unwrap().to_bytes();
                Ok::<_, Infallible>(hyper::Response::new(http_body_util::Full::new(bytes)))
            }
        });
        let polls = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn(Counted {
            polls: Arc::clone(&polls),
            inner: Box::pin(async move {
                let conn = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(server), service);
                tokio::pin!(conn);
                let (_tx, rx) = watch::channel(false);
                until_stopped(conn.as_mut(), &mut StopWatch::new(rx), &gate).await;
            }),
        });
        let mut request =
            format!("POST / HTTP/1.1\r\nhost: x\r\ncontent-length: {len}\r\n\r\n").into_bytes();
        request.resize(request.len() + len, b'v');
        let (mut read, mut write) = tokio::io::split(&mut client);
        let writing = async { write.write_all(&request).await.unwrap() };
        let reading = async {
            let mut response = Vec::new();
            let mut buf = [0; 8192];
            loop {
                let head = response.windows(4).position(|w| w == b"\r\n\r\n");
                if head.is_some_and(|h| response.len() >= h + 4 + len) {
                    return response;
                }
                let n = read.read(&mut buf).await.unwrap();
                assert!(n > 0, "the connection closed before the response");
                response.extend_from_slice(&buf[..n]);
            }
        };
        let run = async { tokio::join!(writing, reading).1 };
        let response = tokio::time::timeout(Duration::from_secs(10), run)
            .await
            .expect("the body goes through");
        drop(client);
        task.await.unwrap();
        let head = response.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        (polls.load(Ordering::SeqCst), response.len() - head)
    }

    #[tokio::test]
    async fn a_body_taken_whole_does_not_wake_its_own_connection() {
        let (gated, echoed) = serve_one_post(true, 5).await;
        assert_eq!(echoed, 5);
        let (plain, _) = serve_one_post(false, 5).await;
        assert!(
            gated < plain,
            "polls of the connection's task: {gated} gated, {plain} without the gate"
        );
    }

    #[tokio::test]
    async fn a_body_taken_in_parts_still_wakes_its_connection_for_the_rest() {
        // Larger than the pipe between client and server: hyper reads it in several parts, and
        // each part taken must let the next one in.
        let (_, echoed) = serve_one_post(true, 256 * 1024).await;
        assert_eq!(echoed, 256 * 1024);
    }
}
