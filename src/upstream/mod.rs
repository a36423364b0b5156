//! The upstream client: a request the pipeline has prepared goes out on a keep-alive HTTP/1.1
//! connection to the configured backend, and its response comes back with the body streamed.
//!
//! The interface is [`Upstream::send`]: the client's request (method, target, headers with the
//! changes to make, body) in, the response or an [`Error`] tagged with the side it arose on and
//! whether the request may be sent again. Nothing here knows about the client-facing server.
//!
//! - [`h1`]: the HTTP/1.1 messages (request head written, response head parsed, body framing).
//! - [`pool`]: each worker's connections and the I/O of one exchange.
//! - [`body`]: the client's body on its way up, held to its limit and idle timeout.

mod body;
mod error;
pub mod h1; // public for the fuzz targets (fuzz/checks.rs)
mod pool;

use std::sync::Arc;
use std::time::Duration;

use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{Method, Response, Uri};
use http_body::Body as _;

pub use body::RequestBody;
pub use error::{Error, ErrorKind, Side};
pub use pool::ResponseBody;

use crate::config;
use h1::{RequestFraming, ResponseTo};
use pool::{Outgoing, Pool};

/// A request for the upstream: the client's, with the gateway's changes to its headers.
#[derive(Debug)]
pub struct Request<'a, K> {
    /// The method.
    pub method: &'a Method,
    /// The client's request target (placed under the upstream URL's base path).
    pub uri: &'a Uri,
    /// A `Host` to write instead of the client's.
    pub host: Option<&'a HeaderValue>,
    /// The client's headers.
    pub headers: &'a HeaderMap,
    /// Which of the client's headers go upstream (framing headers never do: the body's framing
    /// is chosen here).
    pub keep: K,
    /// Headers written after the client's.
    pub added: &'a [(HeaderName, HeaderValue)],
    /// The client's body.
    pub body: RequestBody,
}

/// The upstream and one worker's pool of connections to it.
#[derive(Debug)]
pub struct Upstream {
    pool: Arc<Pool>,
    host_header: HeaderValue,
    base_path: String,
    response_timeout: Duration,
}

impl Upstream {
    /// A pool for `[upstream]`, over TLS with `tls` (the client configuration of an `https://`
    /// upstream, [`crate::tls::upstream_client_config`]); `opened` counts the connections it
    /// opens.
    pub fn new(
        cfg: &config::Upstream,
        tls: Option<Arc<rustls::ClientConfig>>,
        opened: metrics::Counter,
    ) -> Self {
        // The config loader accepts URLs with a host only.
        let host_header = cfg
            .url
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
            .unwrap_or_else(|| HeaderValue::from_static("localhost"));
        let (host, port) = cfg.address();
        let host = host.to_owned();
        // The certificate must be for the URL's host, which is also sent as SNI (an IP address
        // is checked against the certificate's IP addresses, and sends none).
        let tls = match (tls, &cfg.tls) {
            (Some(config), Some(upstream_tls)) => Some(pool::Tls {
                connector: tokio_rustls::TlsConnector::from(config),
                server_name: upstream_tls.server_name.clone(),
            }),
            _ => None,
        };
        Self {
            pool: Arc::new(Pool::new(
                host,
                port,
                tls,
                cfg.connect_timeout,
                cfg.pool_max_idle,
                cfg.pool_idle_timeout,
                opened,
            )),
            host_header,
            base_path: cfg.url.path().trim_end_matches('/').to_owned(),
            response_timeout: cfg.response_timeout,
        }
    }

    /// The host and port connections go to (the scheme's default port when the URL has none),
    /// for the readiness probe.
    pub fn address(&self) -> (&str, u16) {
        self.pool.address()
    }

    /// The upstream's own `Host` value (`host:port` of its URL).
    pub fn host_header(&self) -> &HeaderValue {
        &self.host_header
    }

    /// Closes the pool's idle connections (before the worker's runtime ends).
    pub fn close_idle(&self) {
        self.pool.close_idle();
    }

    /// The request target for the upstream, in origin form (`/path?query`), under the URL's
    /// base path. A client's origin-form target without a base path is used as it is.
    fn target(&self, original: &Uri) -> Uri {
        if self.base_path.is_empty()
            && original.scheme().is_none()
            && original.path().starts_with('/')
        {
            return original.clone();
        }
        let pq = original.path_and_query().map_or("/", PathAndQuery::as_str);
        let pq = if self.base_path.is_empty() {
            PathAndQuery::try_from(pq).ok()
        } else {
            PathAndQuery::try_from(format!("{}{pq}", self.base_path)).ok()
        };
        Uri::from(pq.unwrap_or_else(|| PathAndQuery::from_static("/")))
    }

    /// Sends `req` and returns the response head with its body streaming (hop-by-hop headers
    /// included: what goes back to the client is the caller's to decide).
    ///
    /// The request goes out on the warmest idle connection; if that one turns out closed before
    /// any response, and the request may be repeated (an idempotent method with no body sent
    /// yet), once more on a new connection.
    pub async fn send<K: Fn(&HeaderName) -> bool>(
        &self,
        req: Request<'_, K>,
    ) -> Result<Response<ResponseBody>, Error> {
        let body = req.body;
        let framing = if body.is_end_stream() {
            RequestFraming::for_body(req.method, Some(0))
        } else {
            RequestFraming::for_body(req.method, body.size_hint().exact())
        };
        let body = (framing != RequestFraming::None && !body.is_end_stream()).then_some(body);
        let (mut conn, mut reused) = match self.pool.idle() {
            Some(conn) => (conn, true),
            None => (self.pool.connect().await?, false),
        };
        let target = self.target(req.uri);
        let head = h1::RequestHead {
            method: req.method,
            target: target.path_and_query().map_or("/", PathAndQuery::as_str),
            host: req.host,
            headers: req.headers,
            keep: req.keep,
            added: req.added,
        };
        let mut outgoing = Outgoing {
            head: conn.encode(&head, framing),
            retryable: body.is_none() && req.method.is_idempotent(),
            body,
            chunked: framing == RequestFraming::Chunked,
            responds_to: ResponseTo::method(req.method),
        };
        loop {
            outgoing.retryable &= reused;
            match pool::exchange(&mut conn, &mut outgoing, self.response_timeout).await {
                Ok(head) => {
                    let body = ResponseBody::new(&head, conn, Arc::clone(&self.pool));
                    let mut resp = Response::new(body);
                    *resp.status_mut() = head.status;
                    *resp.version_mut() = head.version;
                    *resp.headers_mut() = head.headers;
                    if let Some(reason) = head.reason
                        && let Ok(reason) = hyper::ext::ReasonPhrase::try_from(reason)
                    {
                        resp.extensions_mut().insert(reason);
                    }
                    return Ok(resp);
                }
                Err(e) if e.may_retry() => {
                    conn = self.pool.connect().await?;
                    reused = false;
                }
                Err(e) => return Err(e),
            }
        }
    }
}
