//! Stages 3 and 4: what the gateway answers itself: the health endpoint, and CORS preflights
//! (never authenticated, never forwarded).

use http::header::{self, HeaderValue};
use http::request::Parts;
use http::{Response, StatusCode};

use super::context::RequestContext;
use super::{Gateway, GatewayBody};
use crate::cors::Preflight;
use crate::metrics::Outcome;

impl Gateway {
    /// `/health/api-auth/`: the old API's health answer, computed at most once a second
    /// whatever the request rate. Its body names problems by code, never by their internal
    /// text.
    pub(super) async fn health(&self, ctx: &mut RequestContext<'_>) -> Response<GatewayBody> {
        let report = self.cache.health_report(self.limits.degraded()).await;
        let mut response = Response::new(GatewayBody::full(report.body.clone()));
        *response.status_mut() = report.status;
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        response
            .headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        ctx.outcome = Outcome::Local;
        ctx.reason = "health";
        response
    }

    /// A CORS preflight's answer: 204, with the allow headers for an allowed origin only.
    pub(super) fn preflight(
        &self,
        parts: &Parts,
        ctx: &mut RequestContext<'_>,
    ) -> Response<GatewayBody> {
        let (headers, reason) = match self.cors.preflight(&parts.headers) {
            Preflight::Allowed(h) => (h, "cors_allowed"),
            Preflight::Refused(h) => (h, "cors_origin_not_allowed"),
        };
        let mut response = Response::new(GatewayBody::empty());
        *response.status_mut() = StatusCode::NO_CONTENT;
        *response.headers_mut() = headers;
        ctx.outcome = Outcome::Preflight;
        ctx.reason = reason;
        response
    }
}
