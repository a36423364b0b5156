//! The admin listener (loopback by default): `/metrics` for Prometheus, `/healthz` (the process
//! is alive) and `/readyz` (the store can be relied on and the upstream accepts connections;
//! the store part is the health answer computed at most once a second).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};

use crate::metrics::Metrics;
use crate::pipeline::Gateway;
use crate::pipeline::GatewayBody;

/// How long the readiness probe waits for the upstream's TCP accept.
const UPSTREAM_PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Admin routes.
#[derive(Debug, Clone)]
pub struct Admin {
    gateway: Arc<Gateway>,
    metrics: Arc<Metrics>,
}

fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<GatewayBody> {
    let mut resp = Response::new(GatewayBody::full(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

impl Admin {
    /// Admin routes over this gateway's state.
    pub fn new(gateway: Arc<Gateway>, metrics: Arc<Metrics>) -> Self {
        Self { gateway, metrics }
    }

    /// Handles one admin request.
    pub async fn handle<B>(&self, req: Request<B>) -> Response<GatewayBody> {
        if !matches!(*req.method(), Method::GET | Method::HEAD) {
            return respond(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                "method not allowed\n",
            );
        }
        match req.uri().path() {
            "/metrics" => {
                let cache = self.gateway.cache();
                self.metrics.cache_entries.set(cache.entry_count() as f64);
                respond(
                    StatusCode::OK,
                    "text/plain; version=0.0.4; charset=utf-8",
                    self.metrics.render(),
                )
            }
            "/healthz" => respond(StatusCode::OK, "application/json", r#"{"status":"alive"}"#),
            "/readyz" => self.ready().await,
            _ => respond(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
        }
    }

    async fn ready(&self) -> Response<GatewayBody> {
        let cache = self.gateway.cache();
        let report = cache.health_report(self.gateway.limits().degraded()).await;
        let store_ok = report.store_ok();
        let upstream_ok = matches!(
            tokio::time::timeout(
                UPSTREAM_PROBE_TIMEOUT,
                tokio::net::TcpStream::connect(self.gateway.upstream().address())
            )
            .await,
            Ok(Ok(_))
        );
        let word = |ok: bool| if ok { "up" } else { "down" };
        let status = if store_ok && upstream_ok {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        let mut body = serde_json::json!({
            "status": if status == StatusCode::OK { "ready" } else { "not_ready" },
            "store": word(store_ok),
            "upstream": word(upstream_ok),
        });
        if !report.problems.is_empty() {
            body["problems"] = report.problems.iter().map(|p| p.as_str()).collect();
            body["error"] = report.error.as_str().into();
        }
        // As of now, not of the last health computation: a failover shows at once.
        if let Some(node) = cache.store().node() {
            body["store_node"] = node.into();
        }
        respond(status, "application/json", body.to_string())
    }
}
