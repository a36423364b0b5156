//! Forwarding to the upstream: a pooled keep-alive HTTP/1.1 client, request and response header
//! rewriting (hop-by-hop removal, forwarding headers, identity headers), and the response body
//! type that carries either a gateway-made body or the upstream's stream.
//!
//! Bodies are never buffered: the client's request body is handed to the upstream connection as a
//! stream, and the upstream's response body back to the client, with backpressure both ways.

use std::net::IpAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use ipnet::IpNet;

use crate::config;
use crate::metrics::UpstreamErrorKind;

/// The gateway's response body: its own small body, or the upstream's stream.
#[derive(Debug)]
pub enum GatewayBody {
    /// A complete body made by the gateway (errors, health, redirects).
    Full(Option<Bytes>),
    /// The upstream's response body, streamed.
    Upstream(Incoming),
}

impl GatewayBody {
    /// An empty body.
    pub fn empty() -> Self {
        GatewayBody::Full(None)
    }

    /// A complete body.
    pub fn full(bytes: Bytes) -> Self {
        GatewayBody::Full((!bytes.is_empty()).then_some(bytes))
    }
}

impl Body for GatewayBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            GatewayBody::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            GatewayBody::Upstream(incoming) => Pin::new(incoming).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            GatewayBody::Full(bytes) => bytes.is_none(),
            GatewayBody::Upstream(incoming) => incoming.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            GatewayBody::Full(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
            GatewayBody::Upstream(incoming) => incoming.size_hint(),
        }
    }
}

/// The client's request body on its way upstream; says when it has been sent completely, so the
/// response timeout measures the upstream's think time, not the length of an upload.
#[derive(Debug)]
pub struct RequestBody {
    inner: Incoming,
    sent: Option<tokio::sync::oneshot::Sender<()>>,
    /// `server.max_body_bytes`, for bodies without (or lying about) Content-Length.
    limit: Option<u64>,
    seen: u64,
}

/// A request body that went past `server.max_body_bytes` while streaming.
#[derive(Debug, thiserror::Error)]
#[error("request body exceeds server.max_body_bytes")]
pub struct BodyTooLarge;

/// The client's request body failed (bad chunked framing, the client went away): the client's
/// fault, not the upstream's.
#[derive(Debug, thiserror::Error)]
#[error("client request body: {0}")]
pub struct ClientBodyError(#[source] hyper::Error);

impl RequestBody {
    fn new(inner: Incoming, limit: Option<u64>) -> (Self, tokio::sync::oneshot::Receiver<()>) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let mut body = Self {
            inner,
            sent: Some(tx),
            limit,
            seen: 0,
        };
        body.signal_if_sent();
        (body, rx)
    }

    fn signal_if_sent(&mut self) {
        if self.inner.is_end_stream()
            && let Some(tx) = self.sent.take()
        {
            let _ = tx.send(());
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let frame = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(f))) = &frame
            && let Some(data) = f.data_ref()
        {
            this.seen += data.len() as u64;
            if this.limit.is_some_and(|max| this.seen > max) {
                // The upstream sees an aborted request, never a clean end of a cut body.
                return Poll::Ready(Some(Err(Box::new(BodyTooLarge))));
            }
        }
        let frame = frame.map_err(|e| Box::new(ClientBodyError(e)) as Self::Error);
        if let Poll::Ready(None) = frame
            && let Some(tx) = this.sent.take()
        {
            let _ = tx.send(());
        }
        this.signal_if_sent();
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Hop-by-hop headers (RFC 9110 §7.6.1), never forwarded in either direction.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// Removes hop-by-hop headers, including every header the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    headers.remove(header::UPGRADE);
}

/// Everything about a request the forwarding headers need.
#[derive(Debug, Clone, Copy)]
pub struct ClientInfo {
    /// The TCP peer.
    pub peer: IpAddr,
    /// Whether the peer is a trusted proxy (its forwarding headers are kept).
    pub trusted: bool,
    /// The client's address: the peer, or from a trusted proxy's X-Forwarded-For.
    pub client_ip: IpAddr,
    /// Whether the client reached us over TLS.
    pub tls: bool,
    /// The worker serving the request.
    pub worker: usize,
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
/// `X-Forwarded-Proto`: set for the upstream; read from trusted proxies only.
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const FORWARDED: HeaderName = HeaderName::from_static("forwarded");

/// The client's address: the peer, unless the peer is a trusted proxy, in which case the
/// rightmost X-Forwarded-For hop that is not itself a trusted proxy.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> (IpAddr, bool) {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
    if !is_trusted(&peer) {
        return (peer, false);
    }
    let mut client = peer;
    let hops = headers
        .get_all(X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect::<Vec<_>>();
    for hop in hops.into_iter().rev() {
        match hop.parse::<IpAddr>() {
            Ok(ip) => {
                client = ip;
                if !is_trusted(&ip) {
                    break;
                }
            }
            // Garbage in the chain: stop at the last address we could trust.
            Err(_) => break,
        }
    }
    (client, true)
}

/// The upstream and a pooled client to it.
#[derive(Debug, Clone)]
pub struct Upstream {
    client: Client<HttpConnector, RequestBody>,
    scheme: Scheme,
    authority: Authority,
    host_header: HeaderValue,
    base_path: String,
    response_timeout: Duration,
    preserve_host: bool,
}

/// A failed forward.
#[derive(Debug)]
pub enum ForwardError {
    /// The upstream failed.
    Upstream {
        /// What failed.
        kind: UpstreamErrorKind,
        /// Why, for the log line.
        cause: String,
    },
    /// The client's request body broke off or was malformed mid-stream.
    ClientBody {
        /// It went past `server.max_body_bytes`.
        too_large: bool,
        /// Why, for the log line.
        cause: String,
    },
}

/// Whether `e`'s source chain holds an error of type `T`.
fn caused_by<T: std::error::Error + 'static>(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(e);
    while let Some(err) = current {
        if err.is::<T>() {
            return true;
        }
        current = err.source();
    }
    false
}

impl Upstream {
    /// Builds the pooled client from `[upstream]`.
    pub fn new(cfg: &config::Upstream) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(cfg.connect_timeout));
        connector.set_keepalive(Some(Duration::from_secs(60)));
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(cfg.pool_idle_timeout)
            .pool_max_idle_per_host(cfg.pool_max_idle)
            .set_host(false)
            .build(connector);
        let authority = cfg
            .url
            .authority()
            .cloned()
            .unwrap_or_else(|| Authority::from_static("127.0.0.1"));
        let host_header = HeaderValue::from_str(authority.as_str())
            .unwrap_or_else(|_| HeaderValue::from_static("localhost"));
        Self {
            client,
            scheme: cfg.url.scheme().cloned().unwrap_or(Scheme::HTTP),
            authority,
            host_header,
            base_path: cfg.url.path().trim_end_matches('/').to_owned(),
            response_timeout: cfg.response_timeout,
            preserve_host: cfg.preserve_host,
        }
    }

    /// The upstream's `host:port`, for the readiness probe.
    pub fn authority(&self) -> &Authority {
        &self.authority
    }

    fn uri(&self, original: &Uri) -> Uri {
        let pq = original.path_and_query().map_or("/", PathAndQuery::as_str);
        let pq = if self.base_path.is_empty() {
            PathAndQuery::try_from(pq).ok()
        } else {
            PathAndQuery::try_from(format!("{}{pq}", self.base_path)).ok()
        };
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(self.scheme.clone());
        parts.authority = Some(self.authority.clone());
        parts.path_and_query = pq.or_else(|| Some(PathAndQuery::from_static("/")));
        Uri::from_parts(parts).unwrap_or_else(|_| Uri::from_static("/"))
    }

    /// Rewrites `req` for the upstream: URI, Host, hop-by-hop and forwarding headers.
    /// Credential and identity headers are the caller's (they depend on the auth result).
    pub fn prepare(&self, req: &mut Request<Incoming>, client: &ClientInfo) {
        let original_host = req.headers().get(header::HOST).cloned().or_else(|| {
            req.uri()
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        });
        *req.uri_mut() = self.uri(req.uri());
        *req.version_mut() = Version::HTTP_11;
        let headers = req.headers_mut();
        strip_hop_by_hop(headers);
        if !client.trusted {
            // Only trusted proxies may tell us about earlier hops.
            headers.remove(X_FORWARDED_FOR);
            headers.remove(X_FORWARDED_PROTO);
            headers.remove(X_FORWARDED_HOST);
            headers.remove(FORWARDED);
        }
        append_forwarded_for(headers, client.peer);
        if !headers.contains_key(X_FORWARDED_PROTO) {
            let proto = if client.tls { "https" } else { "http" };
            headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
        }
        if !headers.contains_key(X_FORWARDED_HOST)
            && let Some(host) = &original_host
        {
            headers.insert(X_FORWARDED_HOST, host.clone());
        }
        match (self.preserve_host, original_host) {
            (true, Some(host)) => {
                headers.insert(header::HOST, host);
            }
            _ => {
                headers.insert(header::HOST, self.host_header.clone());
            }
        }
    }

    /// Sends the prepared request; returns the response with hop-by-hop headers removed.
    pub async fn send(
        &self,
        req: Request<Incoming>,
        max_body: Option<u64>,
    ) -> Result<(Response<Incoming>, Duration), ForwardError> {
        let started = Instant::now();
        let (parts, body) = req.into_parts();
        let (body, sent) = RequestBody::new(body, max_body);
        let response = self.client.request(Request::from_parts(parts, body));
        // The response timeout runs from the end of the request body: a large upload may take
        // as long as it takes, an upstream that then stays silent may not.
        let timeout = self.response_timeout;
        let deadline = async move {
            if sent.await.is_ok() {
                tokio::time::sleep(timeout).await;
            } else {
                // The body was dropped unfinished; the request itself will fail.
                std::future::pending::<()>().await;
            }
        };
        let result = tokio::select! {
            r = response => Ok(r),
            () = deadline => Err(()),
        };
        let mut resp = match result {
            Err(()) => {
                return Err(ForwardError::Upstream {
                    kind: UpstreamErrorKind::Timeout,
                    cause: format!(
                        "no response headers within {:?} of the request's end",
                        self.response_timeout
                    ),
                });
            }
            Ok(Err(e)) => {
                let cause = error_chain(&e);
                if caused_by::<BodyTooLarge>(&e) || caused_by::<ClientBodyError>(&e) {
                    return Err(ForwardError::ClientBody {
                        too_large: caused_by::<BodyTooLarge>(&e),
                        cause,
                    });
                }
                let kind = if e.is_connect() {
                    UpstreamErrorKind::Connect
                } else {
                    UpstreamErrorKind::Protocol
                };
                return Err(ForwardError::Upstream { kind, cause });
            }
            Ok(Ok(resp)) => resp,
        };
        strip_hop_by_hop(resp.headers_mut());
        Ok((resp, started.elapsed()))
    }
}

fn append_forwarded_for(headers: &mut HeaderMap, peer: IpAddr) {
    let peer = peer.to_string();
    let value = match headers.get(X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(existing) if !existing.trim().is_empty() => format!("{existing}, {peer}"),
        _ => peer,
    };
    headers.remove(X_FORWARDED_FOR);
    if let Ok(v) = HeaderValue::from_str(&value) {
        headers.insert(X_FORWARDED_FOR, v);
    }
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn connection_named_headers_are_removed() {
        let mut h = headers(&[
            ("connection", "keep-alive, X-Secret, x-api-key-id"),
            ("x-secret", "1"),
            ("x-api-key-id", "forged"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("upgrade", "websocket"),
            ("content-type", "application/json"),
        ]);
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("content-type"));
    }

    #[test]
    fn forwarded_for_is_ignored_from_untrusted_peers() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let h = headers(&[("x-forwarded-for", "1.2.3.4")]);
        let peer: IpAddr = "203.0.113.9".parse().unwrap();
        assert_eq!(client_ip(peer, &h, &trusted), (peer, false));
    }

    #[test]
    fn rightmost_untrusted_hop_is_the_client() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let h = headers(&[("x-forwarded-for", "6.6.6.6, 198.51.100.7, 10.1.1.1")]);
        let peer: IpAddr = "10.0.0.2".parse().unwrap();
        let (ip, trusted_peer) = client_ip(peer, &h, &trusted);
        assert!(trusted_peer);
        assert_eq!(ip, "198.51.100.7".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn forwarded_for_appends_the_peer() {
        let mut h = headers(&[("x-forwarded-for", "198.51.100.7")]);
        append_forwarded_for(&mut h, "10.0.0.2".parse().unwrap());
        assert_eq!(h[X_FORWARDED_FOR], "198.51.100.7, 10.0.0.2");
    }
}
