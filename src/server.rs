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
use std::task::{Context, Poll, ready};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::admin::Admin;
use crate::cache::KeyCache;
use crate::config::{self, Config};
use crate::gateway::{ConnInfo, Gateway, GatewayBody};
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
    /// The key store refuses a command keygate needs.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
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

/// How long a closing client connection goes on reading what the client still sends.
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
struct Lingering {
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
enum Protocol {
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
struct Builders {
    http1: auto::Builder<TokioExecutor>,
    http2: auto::Builder<TokioExecutor>,
    either: auto::Builder<TokioExecutor>,
}

impl Builders {
    fn new(cfg: &config::Server) -> Self {
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
struct Accepting {
    /// Cancelled when the gateway starts draining: accepting stops, and each connection
    /// finishes the requests it has and closes.
    draining: CancellationToken,
    limit: Arc<Semaphore>,
    metrics: Arc<Metrics>,
    builders: Builders,
}

impl Accepting {
    /// Accepts until draining starts, handing each connection to `serve` on the current
    /// runtime.
    async fn run<F, Fut>(&self, listener: TcpListener, what: &'static str, serve: F)
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
struct Connection {
    /// Held for the connection's lifetime: `server.max_connections` counts it, and shutdown
    /// waits until every permit is back.
    _permit: OwnedSemaphorePermit,
    metrics: Arc<Metrics>,
    draining: CancellationToken,
    builders: Builders,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.metrics.connections_open.decrement(1.0);
    }
}

impl Connection {
    /// Serves HTTP on `io` with hyper until the peer closes; once draining starts, finishes
    /// the requests in flight and closes the connection.
    async fn serve<I, F, Fut>(self, io: I, protocol: Protocol, handler: F)
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
    accepting: Accepting,
    /// Fires when the main runtime has finished draining: the worker's runtime may end.
    exit: watch::Receiver<bool>,
}

impl Worker {
    /// Runs the worker on the calling thread until told to exit. Requests still in flight then
    /// end with the runtime (their access-log lines say the shutdown cut them off).
    fn run(self) -> std::io::Result<()> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let result = runtime.block_on(self.serve());
        crate::gateway::grace_ended();
        drop(runtime);
        crate::logging::flush_access_log();
        result
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
        let tls_loop = self.accepting.run(https, "https", |stream, peer, conn| {
            let acceptor = acceptor.clone();
            let gateway = Arc::clone(gateway);
            async move {
                let handshake = tokio::time::timeout(handshake_timeout, acceptor.accept(stream));
                let tls = tokio::select! {
                    r = handshake => r,
                    () = conn.draining.cancelled() => return,
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
                let protocol = if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
                    Protocol::Http2
                } else {
                    Protocol::Http1
                };
                let info = ConnInfo::new(peer, true, index);
                conn.serve(tls, protocol, move |req| {
                    Arc::clone(&gateway).handle(req, info.clone())
                })
                .await;
            }
        });
        let plain_loop = async {
            let Some(listener) = http else {
                return;
            };
            match self.http_mode {
                config::HttpMode::Redirect => {
                    self.accepting
                        .run(listener, "http", |stream, _peer, conn| {
                            let redirect = Arc::clone(&self.redirect);
                            let metrics = Arc::clone(&conn.metrics);
                            conn.serve(stream, Protocol::Http1, move |req| {
                                metrics.redirects.increment(1);
                                let resp = redirect.respond(&req);
                                crate::http::drain_unread(req.into_body());
                                async move { resp }
                            })
                        })
                        .await;
                }
                config::HttpMode::Serve => {
                    // Behind a TLS-terminating load balancer: the same pipeline, HTTP/1.1 or h2c.
                    self.accepting
                        .run(listener, "http", |stream, peer, conn| {
                            let gateway = Arc::clone(gateway);
                            let info = ConnInfo::new(peer, false, index);
                            conn.serve(stream, Protocol::Either, move |req| {
                                Arc::clone(&gateway).handle(req, info.clone())
                            })
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
    config: Config,
    store: SharedStore,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
    cut_short: impl Future<Output = ()>,
) -> Result<(), ServeError> {
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
    // A missing permission stops the start with one line naming it.
    cache.check_access().await?;
    cache.refresh_counts().await;
    let workers = listeners.https.len();
    let gateway = Arc::new(Gateway::new(
        &config,
        Arc::clone(&cache),
        Arc::clone(&metrics),
        workers,
    )?);
    let redirect = Arc::new(Redirect::new(
        &config.server,
        listeners.https_addr(),
        &config.headers,
    ));
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
    let draining = CancellationToken::new();
    let accepting = Accepting {
        draining: draining.clone(),
        limit: Arc::clone(&limit),
        metrics: Arc::clone(&metrics),
        builders: Builders::new(&config.server),
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
            // Each worker's connections wait on their own token: no lock shared across cores.
            accepting: Accepting {
                draining: draining.child_token(),
                ..accepting.clone()
            },
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
                accepting
                    .run(listener, "admin", |stream, _peer, conn| {
                        let admin = Arc::clone(&admin);
                        conn.serve(stream, Protocol::Http1, move |req| {
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
    draining.cancel();
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
