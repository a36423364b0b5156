//! keygate: an API-key authentication gateway.
//!
//! # Layout
//!
//! A request's way, in the order it meets each module:
//!
//! - [`server`]: listeners (one per worker on a shared port), each worker's runtime, TLS accept,
//!   each connection served by hyper (HTTP/1.1, or HTTP/2 by ALPN) with a lingering close, the
//!   drain on shutdown; [`server::run`] takes bound listeners and a shutdown future.
//! - [`tls`]: rustls configuration: the reloadable served certificate, the development one, the
//!   client side of an `https://` upstream.
//! - [`redirect`]: the plain-HTTP listener's 308 to HTTPS.
//! - [`pipeline`]: the request's stages, one file each (admission, health and preflight,
//!   authentication and policy, forward, answer), the request context they fill and the access
//!   log it ends in.
//! - [`cors`]: the CORS policy, prepared once.
//! - [`auth`]: finding the credential and deciding on it.
//! - [`key`]: the key format, checksum, digest and the redacting secret types.
//! - [`cache`]: the in-process key cache in front of the store, its change feed, usage flushing
//!   and refresh-ahead.
//! - [`store`]: the [`store::KeyStore`] seam and its SQLite and Redis implementations, and the
//!   store's health (breaker, lost data).
//! - [`policy`]: per-key scopes, client networks and rate, compiled once per cached key.
//! - [`ratelimit`]: per-key and per-IP-failure limits (GCRA), shared through the store.
//! - [`rate`]: the rate-limit values ([`rate::Rate`], [`rate::LimitKind`], [`rate::Verdict`])
//!   that configuration, policies, stores, metrics and the limiter share.
//! - [`proxy`]: what is forwarded (header edits, forwarding headers, the client's address).
//! - [`identity`]: the signature over the identity forwarded upstream, which the backend can
//!   verify.
//! - [`upstream`]: the upstream client (keep-alive HTTP/1.1, over TLS for `https://`; a request
//!   in, a streamed response or an error tagged with its side out).
//! - [`error`]: the request path's error, tagged with where it arose, and its one rendering.
//! - [`http`]: header helpers and the draining of a body nobody will read.
//!
//! Around it: [`config`] (two-stage configuration), [`metrics`] (pre-registered Prometheus
//! series), [`admin`] (metrics, liveness, readiness), [`logging`] (log output and the audit
//! log) and [`cli`] (the `keygate` command line: serve, check-config, keys, store, completions).

#![forbid(unsafe_code)]

pub mod admin;
pub mod auth;
pub mod cache;
pub mod cli;
pub mod config;
pub mod cors;
pub mod error;
pub mod http;
pub mod identity;
pub mod key;
pub mod logging;
pub mod metrics;
pub mod pipeline;
pub mod policy;
pub mod proxy;
pub mod rate;
pub mod ratelimit;
pub mod redirect;
pub mod server;
pub mod store;
pub mod tls;
pub mod upstream;
