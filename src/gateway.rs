//! The request pipeline of the HTTPS listener, as a short list of named stages:
//!
//! 1. request id (propagated when sane, else generated) and client address ([`Gateway::handle`]);
//! 2. request checks: methods the gateway never forwards (CONNECT, TRACE: 405), the target's
//!    length (414), the declared body size (400 past 2^63-1, 413 past the limit);
//! 3. own routes (`/health/api-auth/`);
//! 4. CORS preflight, answered here, never authenticated or forwarded;
//! 5. client lockout (too many failed keys), then authentication (public paths skip both);
//! 6. the key's policy (networks, scopes: 403) and rate limit (429);
//! 7. forwarding, with credential and identity headers rewritten;
//! 8. the answer: response decoration (CORS, security headers, request id), HEAD answered with
//!    the head only, an unread request body drained, one access-log event and the metrics
//!    ([`Passage`]).
//!
//! Errors from any stage are a [`GatewayError`], rendered in one place ([`Gateway::reject`]).

use std::cell::Cell;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, Entry, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Method, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use ipnet::IpNet;

use crate::auth::{Authenticated, Authenticator, CredentialSource};
use crate::cache::{KeyCache, KnownKey};
use crate::config::Config;
use crate::cors::{CorsPolicy, Preflight};
use crate::error::{ErrorHeaders, GatewayError, RATELIMIT, RATELIMIT_POLICY};
use crate::http::{drain_unread, immortal_name, immortal_value, strip_hop_by_hop};
use crate::metrics::{AuthReason, Metrics, Outcome, UpstreamErrorKind};
use crate::policy::is_plain_path;
use crate::proxy::{ClientInfo, X_FORWARDED_PROTO, client_ip};
use crate::ratelimit::{Allowance, RateLimits};
use crate::tls::TlsError;
use crate::upstream::{self, ErrorKind, RequestBody, Upstream};

/// The gateway's response body: its own small body, or the upstream's stream.
#[derive(Debug)]
pub enum GatewayBody {
    /// A complete body made by the gateway (errors, health, redirects).
    Full(Option<Bytes>),
    /// The upstream's response body, streamed.
    Upstream(upstream::ResponseBody),
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
    type Error = upstream::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, upstream::Error>>> {
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

/// Makes a gateway-made response an answer to HEAD: its headers as they are, with the length
/// its body would have had, and no body. A response streamed from the upstream is left alone
/// (the upstream client already reads no body after HEAD).
fn head_only(response: &mut Response<GatewayBody>) {
    if let GatewayBody::Full(full) = response.body_mut()
        && let Some(bytes) = full.take()
    {
        response
            .headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
    }
}

/// Path of the public health endpoint (the old API's URL).
pub const HEALTH_PATH: &str = "/health/api-auth/";

pub(crate) const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The largest `Content-Length` accepted: 2^63-1, what a signed 64-bit length holds (nginx's
/// limit too). A larger one is refused by some hops and misread by others (RFC 9110 §8.6).
const MAX_CONTENT_LENGTH: u64 = i64::MAX as u64;

/// The status logged for a request whose answer was never sent: the client went away, or the
/// shutdown grace ended first (nginx's "client closed request").
const CANCELLED: u16 = 499;

/// What stages 2 to 6 decided.
enum Decision {
    /// The gateway answers itself.
    Answer(Response<GatewayBody>),
    /// The request goes upstream.
    Forward(Forward),
}

/// The go-ahead to forward: with which key (none on a public path), under which body limit, and
/// the rate-limit state to report.
struct Forward {
    key: Option<Authenticated>,
    body_limit: Option<u64>,
    allowance: Option<Allowance>,
}

/// The connection a request arrived on.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// TCP peer address.
    pub peer: SocketAddr,
    /// The peer's IP address as text, formatted once per connection rather than per request
    /// (for `X-Forwarded-For` and the access log).
    peer_text: HeaderValue,
    /// Whether the connection is TLS.
    pub tls: bool,
    /// The worker serving it (which upstream pool to use).
    pub worker: usize,
}

impl ConnInfo {
    /// A connection from `peer`, over TLS or not, served by worker `worker`.
    pub fn new(peer: SocketAddr, tls: bool, worker: usize) -> Self {
        let peer_text = HeaderValue::try_from(peer.ip().to_string())
            .expect("an IP address is a valid header value");
        Self {
            peer,
            peer_text,
            tls,
            worker,
        }
    }
}

/// Generates request ids: 32 hex digits, a random prefix drawn once per thread and the thread's
/// own counter. Ids are unique across threads and restarts with no random draw, no shared counter
/// and no formatting per request.
#[derive(Debug)]
struct RequestIds;

#[derive(Clone, Copy)]
struct ThreadIds {
    prefix: [u8; 16],
    next: u64,
}

thread_local! {
    static THREAD_IDS: Cell<Option<ThreadIds>> = const { Cell::new(None) };
    /// Set on a worker thread once its shutdown grace has ended: requests dropped from then on
    /// were cut off by the shutdown, not by their clients.
    static GRACE_ENDED: Cell<bool> = const { Cell::new(false) };
}

/// Marks the calling worker thread's remaining requests as cut off by the shutdown (their
/// access-log lines say so).
pub fn grace_ended() {
    GRACE_ENDED.set(true);
}

/// `n` as 16 lowercase hex digits.
fn hex16(n: u64) -> [u8; 16] {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0; 16];
    for (i, digit) in out.iter_mut().enumerate() {
        *digit = DIGITS[((n >> (60 - 4 * i)) & 0xf) as usize];
    }
    out
}

impl RequestIds {
    fn next() -> HeaderValue {
        let ids = THREAD_IDS.get().unwrap_or_else(|| ThreadIds {
            prefix: hex16(rand::random()),
            next: 1,
        });
        THREAD_IDS.set(Some(ThreadIds {
            next: ids.next.wrapping_add(1),
            ..ids
        }));
        let mut id = [0; 32];
        id[..16].copy_from_slice(&ids.prefix);
        id[16..].copy_from_slice(&hex16(ids.next));
        HeaderValue::from_bytes(&id).expect("hex digits are a valid header value")
    }

    /// A client-sent id is kept when it is short and made of safe characters.
    fn accept(value: &HeaderValue) -> bool {
        let b = value.as_bytes();
        !b.is_empty()
            && b.len() <= 128
            && b.iter()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.' | b':'))
    }
}

/// The request id a response outside the pipeline (the HTTP listener's redirect) carries: the
/// client's when it is acceptable, else a new one.
pub(crate) fn request_id(headers: &http::HeaderMap) -> HeaderValue {
    match headers.get(X_REQUEST_ID) {
        Some(id) if RequestIds::accept(id) => id.clone(),
        _ => RequestIds::next(),
    }
}

/// One request's passage through the pipeline: who sent it and what each stage decided, for
/// the last stage's access-log event and metrics. A passage dropped before it was logged (the
/// client went away, or the shutdown grace ended) logs the request as cancelled.
struct Passage<'a> {
    metrics: &'a Metrics,
    started: Instant,
    request_id: HeaderValue,
    parts: &'a Parts,
    conn: &'a ConnInfo,
    client_ip: IpAddr,
    outcome: Outcome,
    auth: Option<AuthReason>,
    reason: &'static str,
    key: Option<Arc<KnownKey>>,
    cause: Option<String>,
    logged: bool,
}

impl Passage<'_> {
    /// Records the request's outcome (its metrics and access-log line) with `status`.
    fn log(&mut self, status: u16) {
        self.logged = true;
        let elapsed = self.started.elapsed();
        self.metrics.request(self.outcome, status);
        self.metrics.request_duration.record(elapsed.as_secs_f64());
        if let Some(reason) = self.auth {
            self.metrics.auth(reason);
        }
        if !tracing::enabled!(target: "keygate::access", tracing::Level::INFO) {
            return;
        }
        let key = self.key.as_ref().map(|k| &k.record);
        // The peer's address is already text; a trusted proxy's client is formatted here.
        let forwarded_client;
        let client_ip = if self.client_ip == self.conn.peer.ip() {
            self.conn.peer_text.to_str().unwrap_or("")
        } else {
            forwarded_client = self.client_ip.to_string();
            &forwarded_client
        };
        let user_agent = self.parts.headers.get(header::USER_AGENT);
        crate::logging::access(&crate::logging::AccessRecord {
            request_id: self.request_id.to_str().unwrap_or(""),
            client_ip,
            method: self.parts.method.as_str(),
            path: self.parts.uri.path(),
            status,
            latency: elapsed,
            outcome: self.outcome.as_str(),
            auth: self.auth.map(AuthReason::as_str),
            reason: self.reason,
            key_id: key.map(|k| k.id.as_str()),
            key_name: key.map(|k| k.name.as_str()),
            user_agent: user_agent.and_then(|v| v.to_str().ok()),
            cause: self.cause.as_deref(),
        });
    }
}

impl Drop for Passage<'_> {
    fn drop(&mut self) {
        if self.logged {
            return;
        }
        self.outcome = Outcome::Cancelled;
        self.reason = if GRACE_ENDED.get() {
            "shutdown_grace_ended"
        } else {
            "client_closed"
        };
        self.log(CANCELLED);
    }
}

/// Whether an authentication error is a failed attempt with a credential (brute-force budget).
fn is_failed_attempt(e: &GatewayError) -> bool {
    match e {
        GatewayError::InvalidKey(_)
        | GatewayError::InactiveKey(_)
        | GatewayError::ExpiredKey(_)
        | GatewayError::RotatedKey(_) => true,
        GatewayError::MissingCredentials
        | GatewayError::Forbidden(..)
        | GatewayError::MethodNotAllowed(_)
        | GatewayError::BadContentLength
        | GatewayError::UriTooLong
        | GatewayError::PayloadTooLarge
        | GatewayError::BadRequestBody
        | GatewayError::BodyTimeout
        | GatewayError::StoreUnavailable
        | GatewayError::Upstream(_)
        | GatewayError::RateLimited(_) => false,
    }
}

/// Everything the HTTPS pipeline needs, prepared at start-up.
pub struct Gateway {
    cache: Arc<KeyCache>,
    auth: Authenticator,
    cors: CorsPolicy,
    /// One upstream pool per worker, so a request is forwarded on the core it arrived on.
    upstreams: Box<[Upstream]>,
    preserve_host: bool,
    errors: ErrorHeaders,
    security_headers: Vec<(HeaderName, HeaderValue)>,
    hsts: Option<HeaderValue>,
    metrics: Arc<Metrics>,
    trusted_proxies: Vec<IpNet>,
    forward_credentials: bool,
    id_header: HeaderName,
    name_header: HeaderName,
    owner_header: HeaderName,
    signature_header: HeaderName,
    /// Signs the identity forwarded upstream, when `upstream.identity_secret` is set.
    signer: Option<crate::identity::Signer>,
    public_paths: Vec<String>,
    limits: RateLimits,
    max_uri_bytes: usize,
    max_body_bytes: Option<u64>,
    max_body_bytes_by_prefix: Vec<(String, Option<u64>)>,
    body_read_timeout: Duration,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway").finish_non_exhaustive()
    }
}

impl Gateway {
    /// Prepares the pipeline from validated configuration, for `workers` workers. Fails when
    /// an `https://` upstream's TLS files cannot be loaded.
    pub fn new(
        config: &Config,
        cache: Arc<KeyCache>,
        metrics: Arc<Metrics>,
        workers: usize,
    ) -> Result<Self, TlsError> {
        let upstream_tls = config
            .upstream
            .tls
            .as_ref()
            .map(crate::tls::upstream_client_config)
            .transpose()?;
        let limits = RateLimits::new(
            config.rate_limit.per_key,
            config.rate_limit.failures_per_ip,
            config.rate_limit.shared_timeout,
            Arc::clone(cache.store()),
            Arc::clone(cache.health()),
            Arc::clone(&metrics),
        );
        let h = &config.headers;
        let security_headers = [
            (header::X_CONTENT_TYPE_OPTIONS, &h.content_type_options),
            (header::X_FRAME_OPTIONS, &h.frame_options),
            (header::REFERRER_POLICY, &h.referrer_policy),
        ]
        .into_iter()
        .filter_map(|(name, value)| value.as_ref().map(|v| (name, immortal_value(v))))
        .collect();
        Ok(Self {
            cache,
            auth: Authenticator::new(&config.auth),
            cors: CorsPolicy::new(
                &config.cors,
                &config.auth.key_header,
                config.auth.bearer_fallback,
            ),
            upstreams: (0..workers.max(1))
                .map(|_| {
                    Upstream::new(
                        &config.upstream,
                        upstream_tls.clone(),
                        metrics.upstream_connections_opened.clone(),
                    )
                })
                .collect(),
            preserve_host: config.upstream.preserve_host,
            errors: ErrorHeaders::new(&config.auth.realm),
            security_headers,
            hsts: h.strict_transport_security.as_ref().map(immortal_value),
            metrics,
            trusted_proxies: config.server.trusted_proxies.clone(),
            forward_credentials: config.auth.forward_credentials,
            id_header: immortal_name(&config.auth.id_header),
            name_header: immortal_name(&config.auth.name_header),
            owner_header: immortal_name(&config.auth.owner_header),
            signature_header: immortal_name(&config.auth.signature_header),
            signer: (!config.upstream.identity_secrets.is_empty()).then(|| {
                crate::identity::Signer::new(
                    &config.upstream.identity_secrets,
                    config.upstream.url.path(),
                )
            }),
            public_paths: config.auth.public_paths.clone(),
            limits,
            max_uri_bytes: config.server.max_uri_bytes,
            max_body_bytes: config.server.max_body_bytes,
            max_body_bytes_by_prefix: config.server.max_body_bytes_by_prefix.clone(),
            body_read_timeout: config.server.body_read_timeout,
        })
    }

    /// The rate limits (for their housekeeping task).
    pub fn limits(&self) -> &RateLimits {
        &self.limits
    }

    /// The key cache (shared with the background jobs and the admin listener).
    pub fn cache(&self) -> &Arc<KeyCache> {
        &self.cache
    }

    /// The upstream (for the readiness probe).
    pub fn upstream(&self) -> &Upstream {
        &self.upstreams[0]
    }

    /// Closes worker `worker`'s idle upstream connections; the worker calls this before its
    /// runtime ends, so no pooled socket outlives the reactor it is registered with.
    pub fn close_worker_connections(&self, worker: usize) {
        self.upstreams[worker % self.upstreams.len()].close_idle();
    }

    /// Handles one request from the HTTPS listener (or the HTTP one in `serve` mode).
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        conn: ConnInfo,
    ) -> Response<GatewayBody> {
        let started = Instant::now();
        let (mut parts, body) = req.into_parts();
        let request_id = match parts.headers.entry(X_REQUEST_ID) {
            Entry::Occupied(mut e) if RequestIds::accept(e.get()) => {
                // One value upstream: the one logged, answered and signed.
                let id = e.get().clone();
                if e.iter().nth(1).is_some() {
                    e.insert(id.clone());
                }
                id
            }
            Entry::Occupied(mut e) => {
                let id = RequestIds::next();
                e.insert(id.clone());
                id
            }
            Entry::Vacant(e) => e.insert(RequestIds::next()).clone(),
        };
        let (client, trusted) = client_ip(conn.peer.ip(), &parts.headers, &self.trusted_proxies);
        let client = ClientInfo {
            peer: &conn.peer_text,
            trusted,
            client_ip: client,
            tls: conn.tls,
        };
        let mut passage = Passage {
            metrics: &self.metrics,
            started,
            request_id,
            parts: &parts,
            conn: &conn,
            client_ip: client.client_ip,
            outcome: Outcome::Local,
            auth: None,
            reason: "",
            key: None,
            cause: None,
            logged: false,
        };
        let declared = body.size_hint().lower();
        let mut response = match self.decide(&parts, declared, &client, &mut passage).await {
            Decision::Answer(response) => {
                // Answered without reading the body: what the client still sends is read and
                // dropped, so the answer reaches it whole before the stream or connection
                // closes.
                drain_unread(body);
                response
            }
            Decision::Forward(forward) => {
                self.forward(&parts, body, &client, forward, &mut passage)
                    .await
            }
        };
        self.decorate(&parts, &client, &passage, &mut response);
        passage.log(response.status().as_u16());
        response
    }

    /// Stage 8: the headers every answer carries, and HEAD answered with the head alone.
    fn decorate(
        &self,
        parts: &Parts,
        client: &ClientInfo<'_>,
        passage: &Passage<'_>,
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
            // The gateway's own answers to HEAD: the head the GET would get, no body. HTTP/2
            // has no framing that drops a body for HEAD (a DATA frame there is an error), so it
            // is never made.
            head_only(response);
        }
        let headers = response.headers_mut();
        if passage.outcome != Outcome::Preflight {
            self.cors
                .decorate(parts.headers.get(header::ORIGIN), headers);
        }
        for (name, value) in &self.security_headers {
            headers.insert(name.clone(), value.clone());
        }
        if secure && let Some(hsts) = &self.hsts {
            headers.insert(header::STRICT_TRANSPORT_SECURITY, hsts.clone());
        }
        headers.insert(X_REQUEST_ID, passage.request_id.clone());
    }

    /// Stages 2 to 6: the gateway's own answer, or the go-ahead to forward.
    async fn decide(
        &self,
        parts: &Parts,
        declared: u64,
        client: &ClientInfo<'_>,
        passage: &mut Passage<'_>,
    ) -> Decision {
        let body_limit = match self.check(parts, declared) {
            Ok(limit) => limit,
            Err(e) => return Decision::Answer(self.reject(e, passage)),
        };
        let path = parts.uri.path();
        if path == HEALTH_PATH && matches!(parts.method, Method::GET | Method::HEAD) {
            return Decision::Answer(self.health(passage).await);
        }
        if CorsPolicy::is_preflight(&parts.method, &parts.headers) {
            return Decision::Answer(self.preflight(parts, passage));
        }
        if self.is_public(path) {
            passage.reason = "public_path";
            return Decision::Forward(Forward {
                key: None,
                body_limit,
                allowance: None,
            });
        }
        if let Some(locked) = self.limits.ip_locked(client.client_ip) {
            return Decision::Answer(self.reject(GatewayError::RateLimited(locked), passage));
        }
        let authenticated = match self.auth.authenticate(&parts.headers, &self.cache).await {
            Ok(authenticated) => authenticated,
            Err(e) => {
                if is_failed_attempt(&e)
                    && let Some(locked) = self.limits.record_failure(client.client_ip).await
                {
                    let auth = e.auth_reason();
                    let response = self.reject(GatewayError::RateLimited(locked), passage);
                    passage.auth = auth;
                    return Decision::Answer(response);
                }
                return Decision::Answer(self.reject(e, passage));
            }
        };
        passage.auth = Some(AuthReason::Ok);
        passage.key = Some(Arc::clone(&authenticated.key));
        match self.authorize(parts, client, &authenticated, passage).await {
            Ok(allowance) => {
                passage.reason = if authenticated.in_grace {
                    self.metrics.rotated_key_uses.increment(1);
                    "ok_rotated_key_in_grace"
                } else {
                    "ok"
                };
                Decision::Forward(Forward {
                    key: Some(authenticated),
                    body_limit,
                    allowance,
                })
            }
            Err(response) => Decision::Answer(response),
        }
    }

    /// Stage 2: what the gateway refuses before looking at the credential. Returns the body
    /// limit that applies to the request.
    fn check(&self, parts: &Parts, declared: u64) -> Result<Option<u64>, GatewayError> {
        if matches!(parts.method, Method::CONNECT | Method::TRACE) {
            // CONNECT would make the upstream connection a tunnel; TRACE would echo the
            // gateway's added headers back to whoever asked.
            return Err(GatewayError::MethodNotAllowed(
                if parts.method == Method::CONNECT {
                    "CONNECT"
                } else {
                    "TRACE"
                },
            ));
        }
        if parts.uri.path_and_query().map_or(0, |pq| pq.as_str().len()) > self.max_uri_bytes {
            return Err(GatewayError::UriTooLong);
        }
        if declared > MAX_CONTENT_LENGTH {
            return Err(GatewayError::BadContentLength);
        }
        let limit = self.body_limit(parts.uri.path());
        if limit.is_some_and(|max| declared > max) {
            // Refused before a byte of the body is read or forwarded.
            return Err(GatewayError::PayloadTooLarge);
        }
        Ok(limit)
    }

    /// Stage 6: a valid key's policy (networks, scopes) and its rate limit.
    async fn authorize(
        &self,
        parts: &Parts,
        client: &ClientInfo<'_>,
        authenticated: &Authenticated,
        passage: &mut Passage<'_>,
    ) -> Result<Option<Allowance>, Response<GatewayBody>> {
        let key = &authenticated.key;
        if let Err(denied) = key
            .policy
            .check(client.client_ip, &parts.method, parts.uri.path())
        {
            return Err(self.reject(GatewayError::Forbidden(denied, Arc::clone(key)), passage));
        }
        match self.limits.admit_key(&key.record.id, key.policy.rate).await {
            Some(Err(throttled)) => Err(self.reject(GatewayError::RateLimited(throttled), passage)),
            Some(Ok(allowance)) => Ok(Some(allowance)),
            None => Ok(None),
        }
    }

    /// The body limit for `path`: its longest `max_body_bytes_by_prefix` entry, else the global.
    /// A path that could resolve into another one (dot segments, encoded separators) gets the
    /// smallest limit of all: it cannot be told which prefix the upstream will see it under.
    fn body_limit(&self, path: &str) -> Option<u64> {
        if self.max_body_bytes_by_prefix.is_empty() {
            return self.max_body_bytes;
        }
        if !is_plain_path(path) {
            return self
                .max_body_bytes_by_prefix
                .iter()
                .map(|(_, limit)| *limit)
                .chain([self.max_body_bytes])
                .min_by_key(|limit| limit.unwrap_or(u64::MAX))
                .flatten();
        }
        self.max_body_bytes_by_prefix
            .iter()
            .find(|(prefix, _)| path.starts_with(prefix.as_str()))
            .map_or(self.max_body_bytes, |(_, limit)| *limit)
    }

    /// Whether `path` is under a public prefix. A path with dot segments or encoded separators
    /// never is: `/public/../admin` would reach `/admin` at the upstream.
    fn is_public(&self, path: &str) -> bool {
        !self.public_paths.is_empty()
            && is_plain_path(path)
            && self
                .public_paths
                .iter()
                .any(|p| path.starts_with(p.as_str()))
    }

    /// Renders a gateway error: the one place errors become responses.
    fn reject(&self, err: GatewayError, passage: &mut Passage<'_>) -> Response<GatewayBody> {
        let mut response = Response::new(GatewayBody::full(err.body()));
        *response.status_mut() = err.status();
        self.errors.apply(&err, response.headers_mut());
        passage.outcome = match &err {
            GatewayError::MissingCredentials
            | GatewayError::InvalidKey(_)
            | GatewayError::InactiveKey(_)
            | GatewayError::ExpiredKey(_)
            | GatewayError::RotatedKey(_)
            | GatewayError::Forbidden(..)
            | GatewayError::MethodNotAllowed(_)
            | GatewayError::BadContentLength
            | GatewayError::UriTooLong
            | GatewayError::PayloadTooLarge
            | GatewayError::BadRequestBody
            | GatewayError::BodyTimeout
            | GatewayError::RateLimited(_) => Outcome::Rejected,
            GatewayError::StoreUnavailable | GatewayError::Upstream(_) => Outcome::Failed,
        };
        if let GatewayError::Upstream(kind) = err {
            self.metrics.upstream_error(kind);
        }
        passage.auth = err.auth_reason().or(passage.auth);
        passage.reason = err.reason();
        if let Some(key) = err.key() {
            passage.key = Some(Arc::clone(key));
        }
        response
    }

    fn preflight(&self, parts: &Parts, passage: &mut Passage<'_>) -> Response<GatewayBody> {
        let (headers, reason) = match self.cors.preflight(&parts.headers) {
            Preflight::Allowed(h) => (h, "cors_allowed"),
            Preflight::Refused(h) => (h, "cors_origin_not_allowed"),
        };
        let mut response = Response::new(GatewayBody::empty());
        *response.status_mut() = StatusCode::NO_CONTENT;
        *response.headers_mut() = headers;
        passage.outcome = Outcome::Preflight;
        passage.reason = reason;
        response
    }

    async fn health(&self, passage: &mut Passage<'_>) -> Response<GatewayBody> {
        // Computed at most once a second, whatever the request rate.
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
        passage.outcome = Outcome::Local;
        passage.reason = "health";
        response
    }

    /// Stage 7: the request goes upstream with its headers rewritten, its body streamed.
    async fn forward(
        &self,
        parts: &Parts,
        body: Incoming,
        client: &ClientInfo<'_>,
        forward: Forward,
        passage: &mut Passage<'_>,
    ) -> Response<GatewayBody> {
        let upstream = &self.upstreams[passage.conn.worker % self.upstreams.len()];
        let mut edits = crate::proxy::edits(
            &parts.headers,
            &parts.uri,
            client,
            upstream.host_header(),
            self.preserve_host,
        );
        // Client-sent identity headers are never trusted, whatever the auth outcome: dropped,
        // and replaced when a key authenticated the request.
        edits.drop(&self.id_header);
        edits.drop(&self.name_header);
        edits.drop(&self.owner_header);
        edits.drop(&self.signature_header);
        if let Some(a) = &forward.key {
            if !self.forward_credentials {
                edits.drop(self.auth.key_header());
                if a.source == CredentialSource::Bearer {
                    edits.drop(&crate::proxy::AUTHORIZATION);
                }
            }
            edits.add(self.id_header.clone(), a.key.id_header.clone());
            edits.add(self.name_header.clone(), a.key.name_header.clone());
            if let Some(owner) = &a.key.owner_header {
                edits.add(self.owner_header.clone(), owner.clone());
            }
        }
        if let Some(signer) = &self.signer {
            let key = forward.key.as_ref().map_or(crate::identity::NO_KEY, |a| {
                let owner = a.key.owner_header.as_ref();
                [
                    a.key.id_header.as_bytes(),
                    a.key.name_header.as_bytes(),
                    owner.map_or(&b""[..], HeaderValue::as_bytes),
                ]
            });
            let signature = signer.sign(
                &parts.method,
                &parts.uri,
                passage.request_id.as_bytes(),
                key,
            );
            edits.add(self.signature_header.clone(), signature);
        }
        let sent = Instant::now();
        let request = upstream::Request {
            method: &parts.method,
            uri: &parts.uri,
            host: edits.host(),
            headers: &parts.headers,
            keep: |name: &HeaderName| edits.keeps(name),
            added: edits.added(),
            body: RequestBody::new(body, forward.body_limit, self.body_read_timeout),
        };
        match upstream.send(request).await {
            Ok(mut response) => {
                self.metrics
                    .upstream_duration
                    .record(sent.elapsed().as_secs_f64());
                let headers = response.headers_mut();
                strip_hop_by_hop(headers);
                if let Some(allowance) = forward.allowance {
                    headers.insert(RATELIMIT_POLICY, allowance.policy);
                    headers.insert(RATELIMIT, allowance.state);
                }
                passage.outcome = Outcome::Forwarded;
                response.map(GatewayBody::Upstream)
            }
            Err(e) => {
                let err = match e.kind() {
                    ErrorKind::Connect => GatewayError::Upstream(UpstreamErrorKind::Connect),
                    ErrorKind::Timeout => GatewayError::Upstream(UpstreamErrorKind::Timeout),
                    ErrorKind::Protocol => GatewayError::Upstream(UpstreamErrorKind::Protocol),
                    ErrorKind::BodyTooLarge => GatewayError::PayloadTooLarge,
                    ErrorKind::BodyTimeout => GatewayError::BodyTimeout,
                    ErrorKind::BodyBroken => GatewayError::BadRequestBody,
                };
                passage.cause = Some(e.to_string());
                self.reject(err, passage)
            }
        }
    }
}
