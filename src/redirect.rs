//! The plain-HTTP listener's only job: a 308 to the same path and query on HTTPS.
//!
//! `Location` is built from the configured public host and port, never from the client's `Host`
//! header, so the redirect cannot be pointed at another site. Nothing is forwarded. Like every
//! other response, the redirect carries `X-Request-Id` and the security headers of `[headers]`
//! (HSTS is for HTTPS responses only: a browser ignores it on plain HTTP).

use http::header::{self, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};

use crate::config;
use crate::pipeline::{GatewayBody, X_REQUEST_ID, request_id};

/// The prepared redirect target and headers.
#[derive(Debug, Clone)]
pub struct Redirect {
    base: String,
    security_headers: Vec<(HeaderName, HeaderValue)>,
}

impl Redirect {
    /// `https://<public_host>[:<port>]`, the port ([`config::Server::redirect_port`]: the
    /// public port, else that of the HTTPS listener, bound at `https`) omitted when it is 443.
    pub fn new(
        cfg: &config::Server,
        https: Option<std::net::SocketAddr>,
        headers: &config::Headers,
    ) -> Self {
        let host = if cfg.public_host.contains(':') && !cfg.public_host.starts_with('[') {
            format!("[{}]", cfg.public_host) // a bare IPv6 address
        } else {
            cfg.public_host.clone()
        };
        let base = match cfg.redirect_port(https) {
            443 => format!("https://{host}"),
            port => format!("https://{host}:{port}"),
        };
        let security_headers = [
            (
                header::X_CONTENT_TYPE_OPTIONS,
                &headers.content_type_options,
            ),
            (header::X_FRAME_OPTIONS, &headers.frame_options),
            (header::REFERRER_POLICY, &headers.referrer_policy),
        ]
        .into_iter()
        .filter_map(|(name, value)| Some((name, value.clone()?)))
        .collect();
        Self {
            base,
            security_headers,
        }
    }

    /// The 308 for `req`.
    pub fn respond<B>(&self, req: &Request<B>) -> Response<GatewayBody> {
        let pq = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
        // Absolute-form and authority-form targets still yield a path; anything else gets "/".
        let pq = if pq.starts_with('/') { pq } else { "/" };
        let location = HeaderValue::from_str(&format!("{}{pq}", self.base))
            .unwrap_or_else(|_| HeaderValue::from_static("/"));
        let mut resp = Response::new(GatewayBody::empty());
        *resp.status_mut() = StatusCode::PERMANENT_REDIRECT;
        let headers = resp.headers_mut();
        headers.insert(header::LOCATION, location);
        for (name, value) in &self.security_headers {
            headers.insert(name.clone(), value.clone());
        }
        headers.insert(X_REQUEST_ID, request_id(req.headers()));
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn redirect(toml: &str) -> Redirect {
        let cfg = config::FileConfig::from_toml(toml, "test", &BTreeMap::new())
            .unwrap()
            .validate()
            .unwrap();
        Redirect::new(&cfg.server, None, &cfg.headers)
    }

    fn location(r: &Redirect, uri: &str, host: &str) -> String {
        let req = Request::builder()
            .uri(uri)
            .header("host", host)
            .body(())
            .unwrap();
        let resp = r.respond(&req);
        assert_eq!(resp.status(), 308);
        resp.headers()[header::LOCATION]
            .to_str()
            .unwrap()
            .to_owned()
    }

    #[test]
    fn keeps_path_and_query_and_ignores_host() {
        let r = redirect("[server]\npublic_host = \"api.example\"\npublic_port = 443\n");
        assert_eq!(
            location(&r, "/api/v1/video/process/?a=1&b=2", "evil.example"),
            "https://api.example/api/v1/video/process/?a=1&b=2"
        );
        assert_eq!(
            location(&r, "http://evil.example/x", "evil.example"),
            "https://api.example/x"
        );
    }

    #[test]
    fn carries_the_request_id_and_the_security_headers() {
        let r = redirect("[headers]\nframe_options = \"\"\n");
        let req = Request::builder()
            .uri("/x")
            .header("x-request-id", "trace-42")
            .body(())
            .unwrap();
        let resp = r.respond(&req);
        let h = resp.headers();
        assert_eq!(h["x-request-id"], "trace-42");
        assert_eq!(h["x-content-type-options"], "nosniff");
        assert_eq!(h["referrer-policy"], "no-referrer");
        assert!(!h.contains_key("x-frame-options"), "configured off");
        assert!(!h.contains_key("strict-transport-security"), "plain HTTP");
        // An unusable client id is replaced by a new one.
        let req = Request::builder()
            .uri("/x")
            .header("x-request-id", "bad id")
            .body(())
            .unwrap();
        let id = r.respond(&req).headers()["x-request-id"].clone();
        assert_eq!(id.len(), 32, "{id:?}");
    }

    #[test]
    fn non_default_port_is_kept() {
        let r = redirect("[server]\nhttps_listen = \"127.0.0.1:8443\"\n");
        assert_eq!(location(&r, "/", "x"), "https://localhost:8443/");
    }
}
