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
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery};
use http::{Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use http_body_util::Either;
use hyper::body::Incoming;
use ipnet::IpNet;

use crate::config;
use crate::h1::{self, RequestFraming};
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

/// A client's request body, as the server that read its head gives it: keygate's own HTTP/1.1
/// server ([`crate::front`], `Left`) or hyper (HTTP/2, and HTTP/1.1 requests `front` hands over;
/// `Right`).
pub type ClientBody = Either<crate::front::Body, Incoming>;

/// The client's request body on its way upstream, held to `server.max_body_bytes`.
#[derive(Debug)]
pub struct RequestBody {
    inner: ClientBody,
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
pub struct ClientBodyError(#[source] Box<dyn std::error::Error + Send + Sync>);

impl RequestBody {
    /// `inner`, at most `limit` bytes of it, taken within the task that polls its client
    /// connection through `gate`.
    pub(crate) fn new(inner: ClientBody, limit: Option<u64>, gate: Option<&Arc<TaskGate>>) -> Self {
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
static HOP_BY_HOP: [HeaderName; 9] = [
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

/// Removes hop-by-hop headers, including every header the `Connection` header names (the
/// upstream's response; a request's are dropped as it is written, see [`HeaderEdits`]). A
/// response usually carries only `Connection: keep-alive`, which names nothing more and costs no
/// allocation.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let found = present(headers, &HOP_BY_HOP);
    if found & 1 != 0 {
        for name in connection_named(headers) {
            headers.remove(name);
        }
    }
    remove_present(headers, &HOP_BY_HOP, found);
}

/// How the client's request headers become the upstream's: which of them are not copied, and
/// which headers are written instead. The client's header map is read, never changed: each
/// change to a `HeaderMap` is a hash and a probe (and a regrowth when the map is full), while the
/// request head is written from the map in one pass anyway ([`crate::h1::encode_request`]).
/// Headers the gateway adds can never be removed by what the client sends: `Connection` naming
/// only drops the client's own.
#[derive(Debug)]
pub struct HeaderEdits<'a> {
    /// The upstream's `Host`, written first (the client's is then not copied), or `None` to
    /// copy the client's.
    host: Option<HeaderValue>,
    dropped: [&'a HeaderName; MAX_DROPPED],
    /// Each dropped name's [`signature`], and all of them as bits: most of a client's headers
    /// are told apart from every dropped name by one test, and the rest compared only with the
    /// names of the same signature.
    signatures: [u8; MAX_DROPPED],
    any: u64,
    drops: usize,
    /// The client's headers its `Connection` header names (rare).
    named: Vec<HeaderName>,
    added: Vec<(HeaderName, HeaderValue)>,
}

/// More than the most names ever dropped (hop-by-hop, Host, forwarding, credentials, identity).
const MAX_DROPPED: usize = 24;

/// Six bits from a header name's length and its first and last bytes (names are lower case).
fn signature(name: &HeaderName) -> u8 {
    let name = name.as_str().as_bytes();
    let first = u32::from(name.first().copied().unwrap_or(0));
    let last = u32::from(name.last().copied().unwrap_or(0));
    ((name.len() as u32 * 7 + first + last * 3) & 63) as u8
}

impl<'a> HeaderEdits<'a> {
    fn new() -> Self {
        Self {
            host: None,
            dropped: [&HOP_BY_HOP[0]; MAX_DROPPED],
            signatures: [0; MAX_DROPPED],
            any: 0,
            drops: 0,
            named: Vec::new(),
            added: Vec::with_capacity(6),
        }
    }

    /// The client's `name` headers are not copied.
    pub fn drop(&mut self, name: &'a HeaderName) {
        assert!(
            self.drops < MAX_DROPPED,
            "more dropped header names than MAX_DROPPED"
        );
        let signature = signature(name);
        self.dropped[self.drops] = name;
        self.signatures[self.drops] = signature;
        self.any |= 1 << signature;
        self.drops += 1;
    }

    /// `name: value` is written after the client's headers.
    pub fn add(&mut self, name: HeaderName, value: HeaderValue) {
        self.added.push((name, value));
    }

    /// Whether the client's header `name` is copied.
    pub fn keeps(&self, name: &HeaderName) -> bool {
        let signature = signature(name);
        let dropped = self.any & (1 << signature) != 0
            && self.signatures[..self.drops]
                .iter()
                .zip(&self.dropped)
                .any(|(&s, &d)| s == signature && d == name);
        !dropped && (self.named.is_empty() || !self.named.contains(name))
    }

    /// The `Host` written first, if the client's is not copied.
    pub fn host(&self) -> Option<&HeaderValue> {
        self.host.as_ref()
    }

    /// The headers written after the client's.
    pub fn added(&self) -> &[(HeaderName, HeaderValue)] {
        &self.added
    }

    /// Whether the client's request carries `name` and it will be copied.
    fn copies(&self, headers: &HeaderMap, name: &HeaderName) -> bool {
        self.keeps(name) && headers.contains_key(name)
    }
}

/// The headers a message's `Connection` headers name, besides `close`, `keep-alive`, the
/// hop-by-hop headers (dropped anyway) and `Host` (which a request cannot go without).
fn connection_named(headers: &HeaderMap) -> Vec<HeaderName> {
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
            && name != header::HOST
            && !HOP_BY_HOP.contains(&name)
        {
            named.push(name);
        }
    }
    named
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
/// The names above, and `Host` and `Authorization`, where a reference that lives for the whole
/// program is needed ([`HeaderEdits::drop`]).
static FORWARDING: [HeaderName; 4] = [
    X_FORWARDED_FOR,
    X_FORWARDED_PROTO,
    X_FORWARDED_HOST,
    FORWARDED,
];
static HOST: HeaderName = header::HOST;
/// `Authorization`, for [`HeaderEdits::drop`].
pub static AUTHORIZATION: HeaderName = header::AUTHORIZATION;

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

    /// The changes that make the client's headers the upstream's: Host, hop-by-hop and
    /// forwarding headers. Credential and identity headers are the caller's (they depend on the
    /// auth result).
    pub fn edits(
        &self,
        headers: &HeaderMap,
        uri: &Uri,
        client: &ClientInfo<'_>,
    ) -> HeaderEdits<'_> {
        let mut edits = HeaderEdits::new();
        for name in &HOP_BY_HOP {
            edits.drop(name);
        }
        if headers.contains_key(header::CONNECTION) {
            edits.named = connection_named(headers);
        }
        let client_host = headers.get(header::HOST);
        // No Host header (an HTTP/2 request, or HTTP/1.0): the URI's authority, if any.
        let original_host = client_host.cloned().or_else(|| {
            uri.authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        });
        if !self.preserve_host {
            edits.drop(&HOST);
            edits.host = Some(self.host_header.clone());
        } else if client_host.is_none() {
            edits.host = Some(
                original_host
                    .clone()
                    .unwrap_or_else(|| self.host_header.clone()),
            );
        }
        let [xff, xfp, xfh, forwarded] = &FORWARDING;
        let proto = HeaderValue::from_static(if client.tls { "https" } else { "http" });
        if client.trusted {
            // A trusted proxy's word on earlier hops is kept, and extended.
            let earlier = if edits.keeps(xff) {
                headers.get_all(xff).iter().collect::<Vec<_>>()
            } else {
                Vec::new()
            };
            edits.drop(xff);
            edits.add(X_FORWARDED_FOR, forwarded_for(&earlier, client.peer));
            if !edits.copies(headers, xfp) {
                edits.add(X_FORWARDED_PROTO, proto);
            }
            if let Some(host) = original_host
                && !edits.copies(headers, xfh)
            {
                edits.add(X_FORWARDED_HOST, host);
            }
            return edits;
        }
        // Nobody else may tell us about earlier hops: what the client sent is replaced or
        // dropped.
        for name in [xff, xfp, xfh, forwarded] {
            edits.drop(name);
        }
        edits.add(X_FORWARDED_FOR, client.peer.clone());
        edits.add(X_FORWARDED_PROTO, proto);
        if let Some(host) = original_host {
            edits.add(X_FORWARDED_HOST, host);
        }
        edits
    }

    /// Sends the prepared request; returns the response with hop-by-hop headers removed.
    ///
    /// The request goes out on the warmest idle connection; if that one turns out closed before
    /// any response, and the request may be repeated ([`Outgoing::retryable`]), once more on a
    /// new connection.
    pub(crate) async fn send(
        &self,
        req: Request<ClientBody>,
        edits: &HeaderEdits<'_>,
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
        let uri = self.uri(&parts.uri);
        let head = h1::RequestHead {
            method: &parts.method,
            target: uri.path_and_query().map_or("/", PathAndQuery::as_str),
            host: edits.host(),
            headers: &parts.headers,
            keep: |name: &HeaderName| edits.keeps(name),
            added: edits.added(),
        };
        let mut outgoing = Outgoing {
            head: conn.encode(&head, framing),
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
                Err(ExchangeError::NotSent) => {
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
/// A trusted proxy's `X-Forwarded-For` values, joined, with `peer` after them.
fn forwarded_for(earlier: &[&HeaderValue], peer: &HeaderValue) -> HeaderValue {
    if earlier.is_empty() {
        return peer.clone();
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
    HeaderValue::from_maybe_shared(Bytes::from(value)).unwrap_or_else(|_| peer.clone())
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
        let one = HeaderValue::from_static("198.51.100.7");
        assert_eq!(forwarded_for(&[&one], &peer), "198.51.100.7, 10.0.0.2");
        // Several X-Forwarded-For lines are one list, in order; blank ones add nothing.
        let lines = [
            HeaderValue::from_static(" 6.6.6.6, 198.51.100.7 "),
            HeaderValue::from_static(""),
            HeaderValue::from_static("192.0.2.1"),
        ];
        assert_eq!(
            forwarded_for(&lines.iter().collect::<Vec<_>>(), &peer),
            "6.6.6.6, 198.51.100.7, 192.0.2.1, 10.0.0.2"
        );
        assert_eq!(
            forwarded_for(&[&HeaderValue::from_static("  ")], &peer),
            "10.0.0.2"
        );
        assert_eq!(forwarded_for(&[], &peer), "10.0.0.2");
    }

    /// The head the upstream gets for a GET with `pairs` as its headers, from a client at
    /// 203.0.113.9 over TLS (`trusted`: the peer is a trusted proxy), with or without
    /// `preserve_host`.
    fn upstream_head(pairs: &[(&str, &str)], trusted: bool, preserve_host: bool) -> String {
        let upstream = Upstream::new(
            &config::Upstream {
                url: Uri::from_static("http://10.9.9.9:8000"),
                connect_timeout: Duration::from_secs(1),
                response_timeout: Duration::from_secs(1),
                pool_max_idle: 0,
                pool_idle_timeout: Duration::from_secs(1),
                preserve_host,
                identity_secrets: Vec::new(),
            },
            metrics::Counter::noop(),
        );
        let gate = Arc::default();
        let peer = HeaderValue::from_static("203.0.113.9");
        let client = ClientInfo {
            peer: &peer,
            trusted,
            client_ip: "203.0.113.9".parse().unwrap(),
            tls: true,
            worker: 0,
            gate: &gate,
        };
        let h = headers(pairs);
        let uri = Uri::from_static("/p");
        let edits = upstream.edits(&h, &uri, &client);
        let head = h1::RequestHead {
            method: &http::Method::GET,
            target: "/p",
            host: edits.host(),
            headers: &h,
            keep: |name: &HeaderName| edits.keeps(name),
            added: edits.added(),
        };
        let mut out = bytes::BytesMut::new();
        h1::encode_request(&mut out, &head, RequestFraming::None);
        String::from_utf8(out.to_vec()).unwrap()
    }

    #[test]
    fn the_upstream_gets_the_clients_headers_with_forwarding_rewritten() {
        let forged = [
            ("host", "client.example"),
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-proto", "http"),
            ("x-forwarded-host", "evil.example"),
            ("forwarded", "for=6.6.6.6"),
            ("accept", "*/*"),
        ];
        // From an untrusted peer, every forwarding header is the gateway's own.
        assert_eq!(
            upstream_head(&forged, false, false),
            "GET /p HTTP/1.1\r\nhost: 10.9.9.9:8000\r\naccept: */*\r\n\
             x-forwarded-for: 203.0.113.9\r\nx-forwarded-proto: https\r\n\
             x-forwarded-host: client.example\r\n\r\n"
        );
        // From a trusted proxy, its word on earlier hops is kept and extended.
        assert_eq!(
            upstream_head(&forged, true, false),
            "GET /p HTTP/1.1\r\nhost: 10.9.9.9:8000\r\nx-forwarded-proto: http\r\n\
             x-forwarded-host: evil.example\r\nforwarded: for=6.6.6.6\r\naccept: */*\r\n\
             x-forwarded-for: 6.6.6.6, 203.0.113.9\r\n\r\n"
        );
        // ... and what it does not say is added.
        assert_eq!(
            upstream_head(&[("host", "client.example")], true, false),
            "GET /p HTTP/1.1\r\nhost: 10.9.9.9:8000\r\nx-forwarded-for: 203.0.113.9\r\n\
             x-forwarded-proto: https\r\nx-forwarded-host: client.example\r\n\r\n"
        );
        // preserve_host: the client's Host goes upstream.
        assert!(
            upstream_head(&[("host", "client.example")], false, true)
                .starts_with("GET /p HTTP/1.1\r\nhost: client.example\r\n")
        );
        // Without a Host (HTTP/1.0, HTTP/2 without an authority): the upstream's.
        assert!(
            upstream_head(&[], false, true)
                .starts_with("GET /p HTTP/1.1\r\nhost: 10.9.9.9:8000\r\n")
        );
    }

    #[test]
    fn connection_names_only_the_clients_own_headers() {
        // Hop-by-hop headers and those Connection names are not copied; the gateway's own Host
        // and forwarding headers are written whatever Connection says.
        let head = upstream_head(
            &[
                (
                    "connection",
                    "keep-alive, X-Secret, host, x-forwarded-proto",
                ),
                ("connection", " X-Other\t"),
                ("x-secret", "1"),
                ("x-other", "1"),
                ("keep-alive", "timeout=5"),
                ("te", "trailers"),
                ("upgrade", "websocket"),
                ("proxy-authorization", "Basic eDp5"),
                ("x-forwarded-proto", "http"),
                ("host", "client.example"),
                ("content-type", "application/json"),
            ],
            true,
            true,
        );
        assert_eq!(
            head,
            "GET /p HTTP/1.1\r\nhost: client.example\r\ncontent-type: application/json\r\n\
             x-forwarded-for: 203.0.113.9\r\nx-forwarded-proto: https\r\n\
             x-forwarded-host: client.example\r\n\r\n"
        );
    }
}
