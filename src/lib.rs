//! keygate: an API-key authentication gateway.
//!
//! # Layout
//!
//! The request path, in the order a request meets it:
//!
//! - [`server`]: listeners, TLS accept, connection limits, graceful shutdown; [`server::run`]
//!   takes bound listeners and a shutdown future.
//! - [`tls`]: rustls configuration, the reloadable served certificate, the development one.
//! - [`front`]: keygate's own HTTP/1.1 server for the plain requests of the pipeline's
//!   listeners; everything else (HTTP/2, chunked uploads, `Expect`, odd or malformed heads) is
//!   handed to hyper.
//! - [`redirect`]: the plain-HTTP listener's 308 to HTTPS.
//! - [`gateway`]: the HTTPS pipeline's stages (request id, limits, health, preflight, auth,
//!   policy and rate, forward, decorate, log).
//! - [`cors`]: the CORS policy, prepared once.
//! - [`auth`]: finding the credential and deciding on it.
//! - [`key`]: the key format, checksum, digest and the redacting secret types.
//! - [`cache`]: the in-process key cache, change-feed poller and usage flusher.
//! - [`store`]: the [`store::KeyStore`] seam and its SQLite and Redis implementations.
//! - [`proxy`]: what is forwarded (header edits, forwarding headers, request and response
//!   bodies) and the upstream's error mapping; it sends through [`pool`] (keep-alive
//!   connections, each exchange's I/O) and [`h1`] (the HTTP/1.1 messages to and from the
//!   upstream).
//! - [`error`]: the request path's error type and its one rendering.
//! - [`policy`]: per-key scopes, client networks and rate, compiled once per cached key.
//! - [`ratelimit`]: per-key and per-IP-failure limits (GCRA), shared through the store.
//!
//! Around it: [`config`] (two-stage configuration), [`metrics`] (pre-registered Prometheus
//! series), [`admin`] (metrics, liveness, readiness), [`logging`] (log output and the audit
//! log) and [`cli`] (the `keygate` command line: serve, check-config, keys, backup/import,
//! completions).

#![forbid(unsafe_code)]

pub mod admin;
pub mod auth;
pub mod cache;
pub mod cli;
pub mod config;
pub mod cors;
pub mod error;
pub mod front;
pub mod gateway;
pub mod h1;
pub mod key;
pub mod logging;
pub mod metrics;
pub mod policy;
pub mod pool;
pub mod proxy;
pub mod ratelimit;
pub mod redirect;
pub mod server;
pub mod store;
pub mod tls;
