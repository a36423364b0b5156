//! Stage 8: the answer. An error becomes its response in one place ([`Gateway::reject`]); every
//! answer gets the headers the gateway adds (CORS, security headers, HSTS over HTTPS, the
//! request id), and an answer to HEAD keeps only its head.

use http::header::{self};
use http::request::Parts;
use http::{Method, Response};

use super::body::head_only;
use super::context::{RequestContext, X_REQUEST_ID};
use super::{Gateway, GatewayBody};
use crate::error::GatewayError;
use crate::metrics::Outcome;
use crate::proxy::{ClientInfo, X_FORWARDED_PROTO};

impl Gateway {
    /// Renders a gateway error, and records it in the request's context: the one place errors
    /// become responses.
    pub(super) fn reject(
        &self,
        err: GatewayError,
        ctx: &mut RequestContext<'_>,
    ) -> Response<GatewayBody> {
        if let GatewayError::Upstream { kind, .. } = err {
            self.metrics.upstream_error(kind);
        }
        ctx.failed(&err);
        self.errors.render(&err).map(GatewayBody::full)
    }

    /// The headers every answer carries, and HEAD answered with the head alone.
    pub(super) fn decorate(
        &self,
        parts: &Parts,
        client: &ClientInfo<'_>,
        ctx: &RequestContext<'_>,
        response: &mut Response<GatewayBody>,
    ) {
        // HSTS only on responses the client received over HTTPS: its own TLS, or a trusted TLS-
        // terminating proxy's word for it.
        let secure = client.tls
            || (client.trusted
                && parts
                    .headers
                    .get(X_FORWARDED_PROTO)
                    .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"https")));
        if parts.method == Method::HEAD {
            head_only(response);
        }
        let headers = response.headers_mut();
        if ctx.outcome != Outcome::Preflight {
            self.cors
                .decorate(parts.headers.get(header::ORIGIN), headers);
        }
        for (name, value) in &self.security_headers {
            headers.insert(name.clone(), value.clone());
        }
        if secure && let Some(hsts) = &self.hsts {
            headers.insert(header::STRICT_TRANSPORT_SECURITY, hsts.clone());
        }
        headers.insert(X_REQUEST_ID, ctx.request_id.clone());
    }
}
