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
//!
//! - [`listeners`]: the listening sockets, one per worker on a shared port, owned by one process.
//! - [`conn`]: one client connection served by hyper (HTTP/1.1 or HTTP/2), its lingering close,
//!   and the accept loop that hands connections out.
//! - [`worker`]: a worker thread's runtime: TLS accept, the pipeline, the redirect listener.
//! - [`run`]: start-up, the background jobs, the drain and the final usage flush.

mod conn;
mod listeners;
mod run;
mod worker;

use std::net::SocketAddr;

use tokio::sync::watch;

use crate::tls;

pub use listeners::Listeners;
pub use run::{run, run_until};

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

async fn stopped(flag: &mut watch::Receiver<bool>) {
    let _ = flag.wait_for(|set| *set).await;
}
