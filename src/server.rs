//! Listeners, connections and the gateway's lifetime.
//!
//! [`run`] takes already-bound listeners and a shutdown future, so tests start the real gateway on
//! `127.0.0.1:0`. On shutdown it stops accepting, lets in-flight requests finish for up to
//! `server.shutdown_grace`, flushes usage to the store, and returns.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
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

/// The gateway's bound listeners.
#[derive(Debug)]
pub struct Listeners {
    /// HTTPS (the pipeline).
    pub https: TcpListener,
    /// Plain HTTP (redirects to HTTPS, or serves the pipeline: `server.http_mode`).
    pub http: Option<TcpListener>,
    /// Admin (metrics, health, readiness).
    pub admin: Option<TcpListener>,
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
}

impl Listeners {
    /// Binds the listeners `[server]` names.
    pub async fn bind(cfg: &config::Server) -> Result<Self, ServeError> {
        async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, ServeError> {
            TcpListener::bind(addr)
                .await
                .map_err(|source| ServeError::Bind { what, addr, source })
        }
        Ok(Self {
            https: bind("https", cfg.https_listen).await?,
            http: match cfg.http_listen {
                Some(a) => Some(bind("http", a).await?),
                None => None,
            },
            admin: match cfg.admin_listen {
                Some(a) => Some(bind("admin", a).await?),
                None => None,
            },
        })
    }
}

/// Per-connection settings shared by the accept loops.
struct Accepting<'a> {
    graceful: &'a GracefulShutdown,
    stop: watch::Receiver<bool>,
    limit: Arc<Semaphore>,
    metrics: Arc<Metrics>,
    builder: auto::Builder<TokioExecutor>,
}

impl Accepting<'_> {
    /// Accepts until `stop` fires, handing each connection to `serve`.
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
                _ = stop.changed() => return,
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
                watcher: Some(self.graceful.watcher()),
                stop: self.stop.clone(),
                builder: self.builder.clone(),
            };
            conn.metrics.connections_open.increment(1.0);
            tokio::spawn(serve(stream, peer, conn));
        }
    }
}

/// What a spawned connection task owns.
struct Connection {
    /// Held for the connection's lifetime: `server.max_connections` counts it.
    _permit: OwnedSemaphorePermit,
    metrics: Arc<Metrics>,
    watcher: Option<hyper_util::server::graceful::Watcher>,
    stop: watch::Receiver<bool>,
    builder: auto::Builder<TokioExecutor>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.metrics.connections_open.decrement(1.0);
    }
}

impl Connection {
    /// Serves HTTP on `io` until the peer closes or shutdown finishes it gracefully.
    async fn serve<I, F, Fut>(mut self, io: I, handler: F)
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
        F: Fn(hyper::Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = hyper::Response<crate::proxy::GatewayBody>> + Send + 'static,
    {
        let Some(watcher) = self.watcher.take() else {
            return;
        };
        let service = service_fn(move |req| {
            let fut = handler(req);
            async move { Ok::<_, Infallible>(fut.await) }
        });
        let conn = self.builder.serve_connection(TokioIo::new(io), service);
        if let Err(e) = watcher.watch(conn).await {
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

/// Runs the gateway until `shutdown` resolves, then drains and returns.
pub async fn run(
    mut config: Config,
    store: SharedStore,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    if config.server.public_port == 0 {
        // Listening on an ephemeral port: redirect to the port actually bound.
        config.server.public_port = listeners.https.local_addr().map_or(443, |a| a.port());
    }
    let hosts = [config.server.public_host.clone()];
    let served = tls::ServedCert::load(&config.tls, &hosts)?;
    let acceptor = TlsAcceptor::from(served.server_config()?);
    let metrics = Arc::new(Metrics::new(&config.metrics.latency_buckets));
    metrics
        .tls_certificate_expiry
        .set(served.not_after() as f64);
    let cache = Arc::new(KeyCache::new(store, &config.store, Arc::clone(&metrics)));
    cache.refresh_counts().await;
    let gateway = Arc::new(Gateway::new(
        &config,
        Arc::clone(&cache),
        Arc::clone(&metrics),
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

    let graceful = GracefulShutdown::new();
    let limit = Arc::new(Semaphore::new(config.server.max_connections));
    let main = Accepting {
        graceful: &graceful,
        stop: stop_rx.clone(),
        limit: Arc::clone(&limit),
        metrics: Arc::clone(&metrics),
        builder: builder(&config.server, false),
    };
    let plain = Accepting {
        graceful: &graceful,
        stop: stop_rx.clone(),
        limit,
        metrics: Arc::clone(&metrics),
        builder: builder(&config.server, true),
    };
    let handshake_timeout = config.server.handshake_timeout;
    tracing::info!(
        https = %listeners.https.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        http = %listeners.http.as_ref().and_then(|l| l.local_addr().ok()).map(|a| a.to_string()).unwrap_or_default(),
        admin = %listeners.admin.as_ref().and_then(|l| l.local_addr().ok()).map(|a| a.to_string()).unwrap_or_default(),
        upstream = %config.upstream.url,
        "keygate listening"
    );

    let https = main.run(listeners.https, "https", |stream, peer, conn| {
        let acceptor = acceptor.clone();
        let gateway = Arc::clone(&gateway);
        async move {
            let mut stop = conn.stop.clone();
            let handshake = tokio::time::timeout(handshake_timeout, acceptor.accept(stream));
            let tls = tokio::select! {
                r = handshake => r,
                _ = stop.changed() => return,
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
            let info = ConnInfo { peer, tls: true };
            conn.serve(tls, move |req| {
                let gateway = Arc::clone(&gateway);
                async move { gateway.handle(req, info).await }
            })
            .await;
        }
    });
    let http = async {
        let Some(listener) = listeners.http else {
            return;
        };
        match config.server.http_mode {
            config::HttpMode::Redirect => {
                plain
                    .run(listener, "http", |stream, _peer, conn| {
                        let redirect = Arc::clone(&redirect);
                        let metrics = Arc::clone(&metrics);
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
                main.run(listener, "http", |stream, peer, conn| {
                    let gateway = Arc::clone(&gateway);
                    let info = ConnInfo { peer, tls: false };
                    conn.serve(stream, move |req| {
                        let gateway = Arc::clone(&gateway);
                        async move { gateway.handle(req, info).await }
                    })
                })
                .await;
            }
        }
    };
    let admin_loop = async {
        if let Some(listener) = listeners.admin {
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
    };

    tokio::select! {
        _ = async { tokio::join!(https, http, admin_loop) } => {}
        _ = shutdown => {}
    }
    tracing::info!(grace = ?config.server.shutdown_grace, "shutting down: no new connections; draining");
    let _ = stop_tx.send(true);
    drop(main);
    drop(plain);
    if tokio::time::timeout(config.server.shutdown_grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("shutdown grace elapsed; closing the remaining connections");
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
