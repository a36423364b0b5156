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
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use futures_util::task::AtomicWaker;
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

/// `n` sockets on `addr` (one port, also when `addr` asks for port 0).
fn listen_group(
    what: &'static str,
    addr: SocketAddr,
    n: usize,
) -> Result<Vec<std::net::TcpListener>, ServeError> {
    let err = |addr, source| ServeError::Bind { what, addr, source };
    let first = listen(addr, n > 1).map_err(|e| err(addr, e))?;
    let bound = first.local_addr().map_err(|e| err(addr, e))?;
    let mut group = vec![first];
    for _ in 1..n {
        group.push(listen(bound, true).map_err(|e| err(bound, e))?);
    }
    Ok(group)
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

/// Runs `conn` to its end, or until `stop` resolves first (`None`). A connection's future is
/// polled several times per request and its stop signal almost never fires, so `stop` is polled
/// only on the first poll and when it woke the task itself (polling a watch receiver takes its
/// lock; `tokio::select!` would poll it on every wake-up).
async fn until_stopped<C: Future>(
    mut conn: Pin<&mut C>,
    stop: impl Future<Output = ()>,
) -> Option<C::Output> {
    let mut stop = std::pin::pin!(stop);
    let signal = Arc::new(StopSignal {
        woken: AtomicBool::new(true),
        task: AtomicWaker::new(),
    });
    let signal_waker = Waker::from(Arc::clone(&signal));
    std::future::poll_fn(|cx| {
        if let Poll::Ready(r) = conn.as_mut().poll(cx) {
            return Poll::Ready(Some(r));
        }
        signal.task.register(cx.waker());
        if signal.woken.swap(false, Ordering::AcqRel)
            && stop
                .as_mut()
                .poll(&mut Context::from_waker(&signal_waker))
                .is_ready()
        {
            return Poll::Ready(None);
        }
        Poll::Pending
    })
    .await
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
                metrics: Arc::clone(&self.metrics),
                stop: self.stop.clone(),
                builder: self.builder.clone(),
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
    metrics: Arc<Metrics>,
    stop: watch::Receiver<bool>,
    builder: auto::Builder<TokioExecutor>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.metrics.connections_open.decrement(1.0);
    }
}

impl Connection {
    /// Serves HTTP on `io` until the peer closes; on shutdown, finishes the requests in flight
    /// and closes the connection.
    async fn serve<I, F, Fut>(self, io: I, handler: F)
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
        F: Fn(hyper::Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = hyper::Response<crate::proxy::GatewayBody>> + Send + 'static,
    {
        let service = service_fn(move |req| {
            let fut = handler(req);
            async move { Ok::<_, Infallible>(fut.await) }
        });
        let mut stop = self.stop.clone();
        let conn = self.builder.serve_connection(TokioIo::new(io), service);
        tokio::pin!(conn);
        let result = match until_stopped(conn.as_mut(), stopped(&mut stop)).await {
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
                let info = ConnInfo::new(peer, true, index);
                conn.serve(tls, move |req| {
                    let gateway = Arc::clone(&gateway);
                    let info = info.clone();
                    async move { gateway.handle(req, info).await }
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
                            let info = ConnInfo::new(peer, false, index);
                            conn.serve(stream, move |req| {
                                let gateway = Arc::clone(&gateway);
                                let info = info.clone();
                                async move { gateway.handle(req, info).await }
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
    mut config: Config,
    store: SharedStore,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
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
    let redirect = Arc::new(Redirect::new(&config.server));
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
    if tokio::time::timeout(config.server.shutdown_grace, limit.acquire_many(all))
        .await
        .is_err()
    {
        tracing::warn!("shutdown grace elapsed; closing the remaining connections");
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
