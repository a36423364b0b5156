//! keygate: an API-key authentication gateway.
//!
//! # Layout
//!
//! The request path, in the order a request meets it:
//!
//! - [`server`]: listeners, TLS accept, connection limits, each connection served by hyper
//!   (HTTP/1.1, or HTTP/2 by ALPN), lingering close, graceful shutdown; [`server::run`] takes
//!   bound listeners and a shutdown future.
//! - [`tls`]: rustls configuration, the reloadable served certificate, the development one.
//! - [`redirect`]: the plain-HTTP listener's 308 to HTTPS.
//! - [`gateway`]: the HTTPS pipeline's stages (request id, limits, health, preflight, auth,
//!   policy and rate, forward, decorate, log).
//! - [`cors`]: the CORS policy, prepared once.
//! - [`auth`]: finding the credential and deciding on it.
//! - [`key`]: the key format, checksum, digest and the redacting secret types.
//! - [`cache`]: the in-process key cache, change-feed poller and usage flusher.
//! - [`store`]: the [`store::KeyStore`] seam and its SQLite and Redis implementations.
//! - [`proxy`]: what is forwarded (header edits, forwarding headers, the client's address).
//! - [`upstream`]: the upstream client (keep-alive HTTP/1.1 connections per worker; a request in,
//!   a streamed response or a tagged error out).
//! - [`http`]: the response body type and header helpers shared along the path.
//! - [`identity`]: the signature over the identity forwarded upstream, which the backend can
//!   verify.
//! - [`error`]: the request path's error type and its one rendering.
//! - [`policy`]: per-key scopes, client networks and rate, compiled once per cached key.
//! - [`ratelimit`]: per-key and per-IP-failure limits (GCRA), shared through the store.
//! - [`rate`]: the rate-limit values ([`rate::Rate`], [`rate::LimitKind`], [`rate::Verdict`])
//!   that configuration, policies, stores, metrics and the limiter share.
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
pub mod gateway;
pub mod http;
pub mod identity;
pub mod key;
pub mod logging;
pub mod metrics;
pub mod policy;
pub mod proxy;
pub mod rate;
pub mod ratelimit;
pub mod redirect;
pub mod server;
pub mod store;
pub mod tls;
pub mod upstream;
