//! Forwarding to the upstream: request and response header rewriting (hop-by-hop removal,
//! forwarding headers, identity headers), the exchange on a pooled keep-alive connection
//! ([`crate::pool`]), and the response body type that carries either a gateway-made body or the
//! upstream's stream.
//!
//! Bodies are never buffered: the client's request body is handed to the upstream connection as a
//! stream, and the upstream's response body back to the client, with backpressure both ways.

use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, Entry, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery};
use http::{Request, Response, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use ipnet::IpNet;

use crate::config;
use crate::h1::RequestFraming;
use crate::metrics::UpstreamErrorKind;
use crate::pool::{self, ExchangeError, Outgoing, Pool, UpstreamBody, UpstreamError};
use crate::server::TaskGate;

/// The gateway's response body: its own small body, or the upstream's stream.
#[derive(Debug)]
pub enum GatewayBody {
    /// A complete body made by the gateway (errors, health, redirects).
    Full(Option<Bytes>),
    /// The upstream's response body, streamed.
    Upstream(UpstreamBody),
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
    type Error = UpstreamError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, UpstreamError>>> {
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

/// The client's request body on its way upstream, held to `server.max_body_bytes`.
#[derive(Debug)]
pub struct RequestBody {
    inner: Incoming,
    /// The client connection's task gate: taking the body's last bytes need not wake the task.
    gate: Option<Arc<TaskGate>>,
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
    /// `inner`, at most `limit` bytes of it, taken within the task that polls its client
    /// connection through `gate`.
    pub(crate) fn new(inner: Incoming, limit: Option<u64>, gate: Option<&Arc<TaskGate>>) -> Self {
        Self {
            inner,
            gate: gate.cloned(),
            limit,
            seen: 0,
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
        let inner = &mut this.inner;
        let frame = match &this.gate {
            Some(gate) => {
                // Taking a frame wakes the client connection's hyper side, which is the task
                // running this: needed only while more of the body is to come.
                let (frame, dropped) = gate.muted(|| Pin::new(&mut *inner).poll_frame(cx));
                if dropped && !inner.is_end_stream() {
                    gate.wake();
                }
                frame
            }
            None => Pin::new(inner).poll_frame(cx),
        };
        if let Poll::Ready(Some(Ok(f))) = &frame
            && let Some(data) = f.data_ref()
        {
            this.seen += data.len() as u64;
            if this.limit.is_some_and(|max| this.seen > max) {
                // The upstream sees an aborted request, never a clean end of a cut body.
                return Poll::Ready(Some(Err(Box::new(BodyTooLarge))));
            }
        }
        frame.map_err(|e| Box::new(ClientBodyError(e)) as Self::Error)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A copy of `value` whose clones cost nothing: its bytes live for the rest of the process. For
/// configured values added to every request or response: a clone of an ordinary shared value is an
/// atomic increment (and its drop a decrement) on one counter that every worker thread touches.
/// Leaked once per gateway start, a few bytes each.
pub fn immortal_value(value: &HeaderValue) -> HeaderValue {
    let bytes: &'static [u8] = Box::leak(value.as_bytes().into());
    let mut copy = HeaderValue::from_maybe_shared(Bytes::from_static(bytes))
        .expect("the bytes of a header value are a header value");
    copy.set_sensitive(value.is_sensitive());
    copy
}

/// [`immortal_value`] for a header name (a standard name comes back as its constant).
pub fn immortal_name(name: &HeaderName) -> HeaderName {
    let text: &'static str = Box::leak(name.as_str().into());
    HeaderName::from_static(text)
}

/// Hop-by-hop headers (RFC 9110 §7.6.1), and `Upgrade` (no protocol is tunnelled), never
/// forwarded in either direction.
const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Which of `names` (at most 32) `headers` carries, one bit each: found in one pass over the map's
/// names rather than a hashed lookup per name, as a message rarely carries any of them.
fn present(headers: &HeaderMap, names: &[HeaderName]) -> u32 {
    debug_assert!(names.len() <= 32);
    let mut present = 0;
    for name in headers.keys() {
        if let Some(i) = names.iter().position(|n| n == name) {
            present |= 1 << i;
        }
    }
    present
}

/// Removes the headers of `names` whose bits are set in `present`.
fn remove_present(headers: &mut HeaderMap, names: &[HeaderName], present: u32) {
    for (i, name) in names.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(name);
        }
    }
}

/// Removes every header of `names` (at most 32); only those present cost a hashed removal.
pub fn remove_all(headers: &mut HeaderMap, names: &[HeaderName]) {
    let found = present(headers, names);
    remove_present(headers, names, found);
}

/// Removes hop-by-hop headers, including every header the `Connection` header names: most
/// requests carry none, and a response usually only `Connection`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let found = present(headers, &HOP_BY_HOP);
    if found & 1 != 0 {
        // The usual `Connection: keep-alive` or `close` names nothing more to remove, and costs
        // no allocation.
        let mut named = Vec::new();
        for token in headers
            .get_all(header::CONNECTION)
            .iter()
            .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        {
            let token = token.trim_ascii();
            if token.is_empty()
                || token.eq_ignore_ascii_case(b"close")
                || token.eq_ignore_ascii_case(b"keep-alive")
            {
                continue;
            }
            if let Ok(name) = HeaderName::from_bytes(token)
                && !HOP_BY_HOP.contains(&name)
            {
                named.push(name);
            }
        }
        for name in named {
            headers.remove(name);
        }
    }
    remove_present(headers, &HOP_BY_HOP, found);
}

/// Everything about a request the forwarding headers need.
#[derive(Debug, Clone, Copy)]
pub struct ClientInfo<'a> {
    /// The TCP peer's address, as text.
    pub peer: &'a HeaderValue,
    /// Whether the peer is a trusted proxy (its forwarding headers are kept).
    pub trusted: bool,
    /// The client's address: the peer, or from a trusted proxy's X-Forwarded-For.
    pub client_ip: IpAddr,
    /// Whether the client reached us over TLS.
    pub tls: bool,
    /// The worker serving the request.
    pub worker: usize,
    /// What the request's connection task is polled with.
    pub(crate) gate: &'a Arc<TaskGate>,
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

/// The upstream and a pool of connections to it.
#[derive(Debug, Clone)]
pub struct Upstream {
    pool: Arc<Pool>,
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
    /// A pool for `[upstream]`; `opened` counts the connections it opens.
    pub fn new(cfg: &config::Upstream, opened: metrics::Counter) -> Self {
        let authority = cfg
            .url
            .authority()
            .cloned()
            .unwrap_or_else(|| Authority::from_static("127.0.0.1"));
        let host_header = HeaderValue::from_str(authority.as_str())
            .map(|v| immortal_value(&v))
            .unwrap_or_else(|_| HeaderValue::from_static("localhost"));
        // The config loader accepts http:// URLs with a host only; IPv6 literals lose brackets.
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = authority.port_u16().unwrap_or(80);
        Self {
            pool: Arc::new(Pool::new(
                host,
                port,
                cfg.connect_timeout,
                cfg.pool_max_idle,
                cfg.pool_idle_timeout,
                opened,
            )),
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

    /// Closes the pool's idle connections (before the worker's runtime ends).
    pub fn close_idle(&self) {
        self.pool.close_idle();
    }

    /// The request target for the upstream, in origin form (`/path?query`), under the URL's
    /// base path. A client's origin-form target without a base path is used as it is.
    fn uri(&self, original: &Uri) -> Uri {
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

    /// Rewrites `req` for the upstream: URI, Host, hop-by-hop and forwarding headers.
    /// Credential and identity headers are the caller's (they depend on the auth result).
    pub fn prepare(&self, req: &mut Request<Incoming>, client: &ClientInfo<'_>) {
        // Each header-map operation is a hash and a probe, so none is done twice: unless it is
        // preserved, the client's Host comes back from the insert that replaces it.
        let mut original_host = if self.preserve_host {
            req.headers().get(header::HOST).cloned()
        } else {
            req.headers_mut()
                .insert(header::HOST, self.host_header.clone())
        };
        if original_host.is_none() {
            // No Host header (an HTTP/2 request, or HTTP/1.0): the URI's authority, if any.
            original_host = req
                .uri()
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok());
            if self.preserve_host {
                let host = original_host.clone();
                req.headers_mut().insert(
                    header::HOST,
                    host.unwrap_or_else(|| self.host_header.clone()),
                );
            }
        }
        *req.uri_mut() = self.uri(req.uri());
        *req.version_mut() = Version::HTTP_11;
        let headers = req.headers_mut();
        strip_hop_by_hop(headers);
        let proto = HeaderValue::from_static(if client.tls { "https" } else { "http" });
        if client.trusted {
            // A trusted proxy's word on earlier hops is kept, and extended.
            append_forwarded_for(headers, client.peer);
            if let Entry::Vacant(e) = headers.entry(X_FORWARDED_PROTO) {
                e.insert(proto);
            }
            if let Some(host) = original_host
                && let Entry::Vacant(e) = headers.entry(X_FORWARDED_HOST)
            {
                e.insert(host);
            }
            return;
        }
        // Nobody else may tell us about earlier hops: what the client sent is replaced (an
        // insert drops every earlier value) or removed.
        headers.insert(X_FORWARDED_FOR, client.peer.clone());
        headers.insert(X_FORWARDED_PROTO, proto);
        match original_host {
            Some(host) => {
                headers.insert(X_FORWARDED_HOST, host);
                remove_all(headers, &[FORWARDED]);
            }
            None => remove_all(headers, &[FORWARDED, X_FORWARDED_HOST]),
        }
    }

    /// Sends the prepared request; returns the response with hop-by-hop headers removed.
    ///
    /// The request goes out on the warmest idle connection; if that one turns out closed before
    /// any response, and the request may be repeated ([`Outgoing::retryable`]), once more on a
    /// new connection.
    pub(crate) async fn send(
        &self,
        req: Request<Incoming>,
        max_body: Option<u64>,
        gate: &Arc<TaskGate>,
    ) -> Result<(Response<UpstreamBody>, Duration), ForwardError> {
        let started = Instant::now();
        let (parts, body) = req.into_parts();
        let framing = if body.is_end_stream() {
            RequestFraming::for_body(&parts.method, Some(0))
        } else {
            RequestFraming::for_body(&parts.method, body.size_hint().exact())
        };
        let body = (framing != RequestFraming::None && !body.is_end_stream())
            .then(|| RequestBody::new(body, max_body, Some(gate)));
        let (mut conn, mut reused) = match self.pool.idle() {
            Some(conn) => (conn, true),
            None => (self.connect().await?, false),
        };
        let target = parts.uri.path_and_query().map_or("/", PathAndQuery::as_str);
        let mut outgoing = Outgoing {
            head: conn.encode(&parts.method, target, &parts.headers, framing),
            retryable: body.is_none() && parts.method.is_idempotent(),
            body,
            chunked: framing == RequestFraming::Chunked,
            head_request: parts.method == http::Method::HEAD,
        };
        drop(parts);
        loop {
            outgoing.retryable &= reused;
            match pool::exchange(&mut conn, &mut outgoing, self.response_timeout).await {
                Ok(head) => {
                    let body = UpstreamBody::new(&head, conn, Arc::clone(&self.pool));
                    let mut resp = Response::new(body);
                    *resp.status_mut() = head.status;
                    *resp.version_mut() = head.version;
                    *resp.headers_mut() = head.headers;
                    if let Some(reason) = head.reason
                        && let Ok(reason) = hyper::ext::ReasonPhrase::try_from(reason)
                    {
                        resp.extensions_mut().insert(reason);
                    }
                    strip_hop_by_hop(resp.headers_mut());
                    return Ok((resp, started.elapsed()));
                }
                Err(ExchangeError::NotSent(_)) => {
                    conn = self.connect().await?;
                    reused = false;
                }
                Err(ExchangeError::TimedOut) => {
                    return Err(ForwardError::Upstream {
                        kind: UpstreamErrorKind::Timeout,
                        cause: format!(
                            "no response headers within {:?} of the request's end",
                            self.response_timeout
                        ),
                    });
                }
                Err(ExchangeError::Failed(e)) => {
                    let cause = error_chain(&e);
                    if caused_by::<BodyTooLarge>(&e) || caused_by::<ClientBodyError>(&e) {
                        return Err(ForwardError::ClientBody {
                            too_large: caused_by::<BodyTooLarge>(&e),
                            cause,
                        });
                    }
                    return Err(ForwardError::Upstream {
                        kind: UpstreamErrorKind::Protocol,
                        cause,
                    });
                }
            }
        }
    }

    async fn connect(&self) -> Result<pool::Conn, ForwardError> {
        self.pool
            .connect()
            .await
            .map_err(|e| ForwardError::Upstream {
                kind: UpstreamErrorKind::Connect,
                cause: error_chain(&e),
            })
    }
}

/// Appends `peer` to the request's `X-Forwarded-For` (all its values, joined), or sets it.
fn append_forwarded_for(headers: &mut HeaderMap, peer: &HeaderValue) {
    let mut earlier = headers.get_all(X_FORWARDED_FOR).iter().peekable();
    if earlier.peek().is_none() {
        headers.insert(X_FORWARDED_FOR, peer.clone());
        return;
    }
    let mut value = Vec::with_capacity(64);
    for v in earlier {
        let v = v.as_bytes().trim_ascii();
        if !v.is_empty() {
            value.extend_from_slice(v);
            value.extend_from_slice(b", ");
        }
    }
    value.extend_from_slice(peer.as_bytes());
    // Joined from valid header values with ", ": still a valid one.
    if let Ok(v) = HeaderValue::from_maybe_shared(Bytes::from(value)) {
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
    fn immortal_copies_are_equal_and_keep_sensitivity() {
        let mut secret = HeaderValue::from_str("max-age=63072000; includeSubDomains").unwrap();
        secret.set_sensitive(true);
        let copy = immortal_value(&secret);
        assert_eq!(copy, secret);
        assert!(copy.is_sensitive());
        assert_eq!(copy.clone(), secret);
        let name = HeaderName::from_bytes(b"X-API-Key-ID").unwrap();
        assert_eq!(immortal_name(&name), name);
        assert_eq!(immortal_name(&header::HOST), header::HOST);
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

        // Several Connection lines, odd spacing and case, and tokens that name no header.
        let mut h = headers(&[
            ("connection", "Close ,, KEEP-ALIVE"),
            ("connection", " X-Other\t"),
            ("x-other", "1"),
            ("keep-alive", "timeout=5"),
            ("x-kept", "1"),
        ]);
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
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
        let peer = HeaderValue::from_static("10.0.0.2");
        let mut h = headers(&[("x-forwarded-for", "198.51.100.7")]);
        append_forwarded_for(&mut h, &peer);
        assert_eq!(h[X_FORWARDED_FOR], "198.51.100.7, 10.0.0.2");

        // Several X-Forwarded-For lines are one list, in order; blank ones add nothing.
        let mut h = headers(&[
            ("x-forwarded-for", " 6.6.6.6, 198.51.100.7 "),
            ("x-forwarded-for", ""),
            ("x-forwarded-for", "192.0.2.1"),
        ]);
        append_forwarded_for(&mut h, &peer);
        assert_eq!(h.get_all(X_FORWARDED_FOR).iter().count(), 1);
        assert_eq!(
            h[X_FORWARDED_FOR],
            "6.6.6.6, 198.51.100.7, 192.0.2.1, 10.0.0.2"
        );

        let mut h = headers(&[("x-forwarded-for", "  ")]);
        append_forwarded_for(&mut h, &peer);
        assert_eq!(h[X_FORWARDED_FOR], "10.0.0.2");
        let mut h = HeaderMap::new();
        append_forwarded_for(&mut h, &peer);
        assert_eq!(h[X_FORWARDED_FOR], "10.0.0.2");
    }
}
