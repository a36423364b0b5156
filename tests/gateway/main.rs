//! The real gateway (in-process, on ephemeral ports) in front of a real upstream, through real
//! TLS clients. One test binary, one module per feature:
//!
//! - `auth`: every way of presenting a key, and every rejection (none reaches the upstream)
//! - `forwarding`: what the upstream receives: identity and forwarding headers, the signature
//! - `cors`: preflights and the gateway's CORS policy
//! - `plain_http`: the HTTP listener: redirect to HTTPS, or `serve` behind a TLS proxy
//! - `protocol`: ALPN, HTTP/1.1 framing, `Expect: 100-continue`
//! - `bodies`: body limits by path, large bodies streamed intact
//! - `upstream`: upstream failures (502, 504) and upstream keep-alive
//! - `changes`: changes made elsewhere take effect within a second; usage written in batches
//! - `health`: the health endpoint, the admin listener (metrics, liveness, readiness)
//! - `shutdown`: draining in-flight requests, closing idle connections
//! - `tls`: handshakes and certificate reloads
//! - `rate_limits`: per-key budgets and the per-address lockout of failed guesses

#[path = "../common/mod.rs"]
mod common;

mod auth;
mod bodies;
mod changes;
mod cors;
mod forwarding;
mod health;
mod plain_http;
mod protocol;
mod rate_limits;
mod shutdown;
mod tls;
mod upstream;

use serde_json::Value;

/// The response's JSON body.
async fn json(resp: reqwest::Response) -> Value {
    resp.json().await.unwrap()
}

/// The headers every HTTPS response carries, the gateway's own and the upstream's alike.
fn assert_security_headers(resp: &reqwest::Response) {
    let h = resp.headers();
    assert_eq!(h["x-content-type-options"], "nosniff");
    assert_eq!(h["x-frame-options"], "DENY");
    assert!(h.contains_key("referrer-policy"));
    assert!(
        h["strict-transport-security"]
            .to_str()
            .unwrap()
            .starts_with("max-age=")
    );
    assert!(h.contains_key("x-request-id"));
}
