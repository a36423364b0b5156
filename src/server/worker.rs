//! A worker thread: its own single-threaded runtime, its sockets, the TLS handshake, and the
//! pipeline (or the redirect) for every connection it accepts.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use super::conn::{Accepting, Protocol};
use super::stopped;
use crate::config;
use crate::pipeline::{ConnInfo, Gateway};
use crate::redirect::Redirect;

pub(super) struct Worker {
    pub(super) index: usize,
    pub(super) https: std::net::TcpListener,
    pub(super) http: Option<std::net::TcpListener>,
    pub(super) http_mode: config::HttpMode,
    pub(super) acceptor: TlsAcceptor,
    pub(super) handshake_timeout: Duration,
    pub(super) gateway: Arc<Gateway>,
    pub(super) redirect: Arc<Redirect>,
    pub(super) accepting: Accepting,
    /// Fires when the main runtime has finished draining: the worker's runtime may end.
    pub(super) exit: watch::Receiver<bool>,
}

impl Worker {
    /// Runs the worker on the calling thread until told to exit. Requests still in flight then
    /// end with the runtime (their access-log lines say the shutdown cut them off).
    pub(super) fn run(self) -> std::io::Result<()> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let result = runtime.block_on(self.serve());
        crate::pipeline::grace_ended();
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
