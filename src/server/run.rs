//! The gateway's lifetime: start-up (certificate, store check, cache, pipeline), the workers,
//! the admin listener, the background jobs, the drain on shutdown and the final usage flush.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::conn::{Accepting, Builders, Protocol};
use super::worker::Worker;
use super::{Listeners, ServeError};
use crate::admin::Admin;
use crate::cache::KeyCache;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::pipeline::Gateway;
use crate::redirect::Redirect;
use crate::store::SharedStore;
use crate::tls;

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
