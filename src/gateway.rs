//! The request pipeline of the HTTPS listener, as a short list of named stages:
//!
//! 1. request id (propagated when sane, else generated) and client address;
//! 2. request limits (URI length 414, declared body size 413);
//! 3. own routes (`/health/api-auth/`);
//! 4. CORS preflight, answered here, never authenticated or forwarded;
//! 5. client lockout (too many failed keys), then authentication (public paths skip both);
//! 6. the key's policy (networks, scopes: 403) and rate limit (429);
//! 7. forwarding, with credential and identity headers rewritten;
//! 8. response decoration (CORS, security headers, request id), one access-log event, metrics.
//!
//! Errors from any stage are a [`GatewayError`], rendered in one place ([`Gateway::reject`]).

use std::cell::Cell;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use http::header::{self, Entry, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use ipnet::IpNet;

use crate::auth::{Authenticated, Authenticator, CredentialSource};
use crate::cache::{KeyCache, KnownKey};
use crate::config::Config;
use crate::cors::{CorsPolicy, Preflight};
use crate::error::{ErrorHeaders, GatewayError, RATELIMIT, RATELIMIT_POLICY};
use crate::metrics::{AuthReason, Metrics, Outcome};
use crate::proxy::{
    ClientBody, ClientInfo, ForwardError, GatewayBody, Upstream, X_FORWARDED_PROTO, client_ip,
    immortal_name, immortal_value,
};
use crate::ratelimit::RateLimits;
use crate::server::TaskGate;

/// Path of the public health endpoint (the old API's URL).
pub const HEALTH_PATH: &str = "/health/api-auth/";

pub(crate) const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

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
    /// What the connection's task is polled with.
    gate: Arc<TaskGate>,
}

impl ConnInfo {
    /// A connection from `peer`, over TLS or not, served by worker `worker`, its task polled
    /// through `gate`.
    pub(crate) fn new(peer: SocketAddr, tls: bool, worker: usize, gate: Arc<TaskGate>) -> Self {
        let peer_text = HeaderValue::try_from(peer.ip().to_string())
            .expect("an IP address is a valid header value");
        Self {
            peer,
            peer_text,
            tls,
            worker,
            gate,
        }
    }
}

/// Generates request ids: 32 hex digits, a random prefix drawn once per thread and the thread's
/// own counter. Ids are unique across threads and restarts with no random draw, no shared counter
/// (no cache line passed between cores) and no formatting per request.
#[derive(Debug)]
struct RequestIds;

#[derive(Clone, Copy)]
struct ThreadIds {
    prefix: [u8; 16],
    next: u64,
}

thread_local! {
    static THREAD_IDS: Cell<Option<ThreadIds>> = const { Cell::new(None) };
}

/// `make()`'s future, boxed and pinned, built in its allocation: the allocation comes first, so
/// the optimiser can write the future's fields straight into it. `Box::pin(make())` builds the
/// value before the allocation exists and then copies all of it, at its largest state's size.
#[inline(always)]
fn boxed_in_place<F: Future>(make: impl FnOnce() -> F) -> Pin<Box<F>> {
    Box::into_pin(Box::write(Box::new_uninit(), make()))
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

/// What the pipeline decided, for logging and metrics.
struct Handled {
    response: Response<GatewayBody>,
    outcome: Outcome,
    auth: Option<AuthReason>,
    reason: &'static str,
    key: Option<Arc<KnownKey>>,
    cause: Option<String>,
}

impl Handled {
    fn new(response: Response<GatewayBody>, outcome: Outcome, reason: &'static str) -> Self {
        Self {
            response,
            outcome,
            auth: None,
            reason,
            key: None,
            cause: None,
        }
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
        | GatewayError::UriTooLong
        | GatewayError::PayloadTooLarge
        | GatewayError::BadRequestBody
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
    errors: ErrorHeaders,
    security_headers: Vec<(HeaderName, HeaderValue)>,
    hsts: Option<HeaderValue>,
    metrics: Arc<Metrics>,
    trusted_proxies: Vec<IpNet>,
    forward_credentials: bool,
    id_header: HeaderName,
    name_header: HeaderName,
    public_paths: Vec<String>,
    limits: RateLimits,
    max_uri_bytes: usize,
    max_body_bytes: Option<u64>,
    max_body_bytes_by_prefix: Vec<(String, Option<u64>)>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway").finish_non_exhaustive()
    }
}

impl Gateway {
    /// Prepares the pipeline from validated configuration, for `workers` workers.
    pub fn new(
        config: &Config,
        cache: Arc<KeyCache>,
        metrics: Arc<Metrics>,
        workers: usize,
    ) -> Self {
        let limits = RateLimits::new(
            config.rate_limit.per_key,
            config.rate_limit.failures_per_ip,
            config.rate_limit.shared_timeout,
            Arc::clone(cache.store()),
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
        Self {
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
                        metrics.upstream_connections_opened.clone(),
                    )
                })
                .collect(),
            errors: ErrorHeaders::new(&config.auth.realm),
            security_headers,
            hsts: h.strict_transport_security.as_ref().map(immortal_value),
            metrics,
            trusted_proxies: config.server.trusted_proxies.clone(),
            forward_credentials: config.auth.forward_credentials,
            id_header: immortal_name(&config.auth.id_header),
            name_header: immortal_name(&config.auth.name_header),
            public_paths: config.auth.public_paths.clone(),
            limits,
            max_uri_bytes: config.server.max_uri_bytes,
            max_body_bytes: config.server.max_body_bytes,
            max_body_bytes_by_prefix: config.server.max_body_bytes_by_prefix.clone(),
        }
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

    /// Handles one request from the HTTPS listener (or the HTTP one in `serve` mode). Takes the
    /// gateway by `Arc` so that the future it returns is the one hyper keeps for the request
    /// (moved by value, once per request): a wrapping `async move` block would hold the captures
    /// and the awaited future side by side, more than doubling what is moved.
    pub async fn handle(
        self: Arc<Self>,
        mut req: Request<ClientBody>,
        conn: ConnInfo,
    ) -> Response<GatewayBody> {
        let started = Instant::now();
        let request_id = match req.headers_mut().entry(X_REQUEST_ID) {
            Entry::Occupied(e) if RequestIds::accept(e.get()) => e.get().clone(),
            Entry::Occupied(mut e) => {
                let id = RequestIds::next();
                e.insert(id.clone());
                id
            }
            Entry::Vacant(e) => e.insert(RequestIds::next()).clone(),
        };
        let (client, trusted) = client_ip(conn.peer.ip(), req.headers(), &self.trusted_proxies);
        let client = ClientInfo {
            peer: &conn.peer_text,
            trusted,
            client_ip: client,
            tls: conn.tls,
            worker: conn.worker,
            gate: &conn.gate,
        };
        // HSTS only on responses the client received over HTTPS: its own TLS, or a trusted TLS-
        // terminating proxy's word for it.
        let secure = conn.tls
            || (trusted
                && req
                    .headers()
                    .get(X_FORWARDED_PROTO)
                    .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"https")));
        let origin = req.headers().get(header::ORIGIN).cloned();
        let user_agent = req.headers().get(header::USER_AGENT).cloned();
        let method = req.method().clone();
        // Cheap: the URI's bytes are shared with the request, not copied.
        let uri = req.uri().clone();

        // Boxed: the pipeline's future is several KiB, and hyper moves the request's future into
        // place by value; behind a pointer, that move is 8 bytes instead of a copy of all of it.
        // Built in place in its box: `Box::pin(future)` would build it first and then copy all
        // of its bytes (its largest state's size, though only the arguments are set yet) into
        // freshly allocated memory, a few KiB of cache misses per request.
        let mut handled = boxed_in_place(|| self.route(req, &client)).await;

        let headers = handled.response.headers_mut();
        if handled.outcome != Outcome::Preflight {
            self.cors.decorate(origin.as_ref(), headers);
        }
        for (name, value) in &self.security_headers {
            headers.insert(name.clone(), value.clone());
        }
        if secure && let Some(hsts) = &self.hsts {
            headers.insert(header::STRICT_TRANSPORT_SECURITY, hsts.clone());
        }
        headers.insert(X_REQUEST_ID, request_id.clone());

        let status = handled.response.status();
        let elapsed = started.elapsed();
        self.metrics.request(handled.outcome, status);
        self.metrics.request_duration.record(elapsed.as_secs_f64());
        if let Some(reason) = handled.auth {
            self.metrics.auth(reason);
        }
        if tracing::enabled!(target: "keygate::access", tracing::Level::INFO) {
            let key = handled.key.as_ref().map(|k| &k.record);
            // The peer's address is already text; a trusted proxy's client is formatted here.
            let forwarded_client;
            let client_ip = if client.client_ip == conn.peer.ip() {
                conn.peer_text.to_str().unwrap_or("")
            } else {
                forwarded_client = client.client_ip.to_string();
                &forwarded_client
            };
            let record = crate::logging::AccessRecord {
                request_id: request_id.to_str().unwrap_or(""),
                client_ip,
                method: method.as_str(),
                path: uri.path(),
                status: status.as_u16(),
                latency: elapsed,
                outcome: handled.outcome.as_str(),
                auth: handled.auth.map(AuthReason::as_str),
                reason: handled.reason,
                key_id: key.map(|k| k.id.as_str()),
                key_name: key.map(|k| k.name.as_str()),
                user_agent: user_agent.as_ref().and_then(|v| v.to_str().ok()),
                cause: handled.cause.as_deref(),
            };
            crate::logging::access(&record);
        }
        handled.response
    }

    async fn route(&self, req: Request<ClientBody>, client: &ClientInfo<'_>) -> Handled {
        if req.uri().path_and_query().map_or(0, |pq| pq.as_str().len()) > self.max_uri_bytes {
            return self.reject(GatewayError::UriTooLong, None);
        }
        let body_limit = self.body_limit(req.uri().path());
        if let Some(max) = body_limit
            && http_body::Body::size_hint(req.body()).lower() > max
        {
            // Refused before a byte of the body is read or forwarded.
            return self.reject(GatewayError::PayloadTooLarge, None);
        }
        if req.uri().path() == HEALTH_PATH && matches!(*req.method(), Method::GET | Method::HEAD) {
            return self.health().await;
        }
        if CorsPolicy::is_preflight(&req) {
            return self.preflight(&req);
        }
        if self.is_public(req.uri().path()) {
            return self.forward(req, client, None, body_limit).await;
        }
        if let Some(locked) = self.limits.ip_locked(client.client_ip) {
            return self.reject(GatewayError::RateLimited(locked), None);
        }
        match self.auth.authenticate(req.headers(), &self.cache).await {
            Ok(authenticated) => {
                self.authorize_and_forward(req, client, authenticated, body_limit)
                    .await
            }
            Err(e) => {
                if is_failed_attempt(&e)
                    && let Some(locked) = self.limits.record_failure(client.client_ip).await
                {
                    let mut handled = self.reject(GatewayError::RateLimited(locked), None);
                    handled.auth = e.auth_reason();
                    return handled;
                }
                self.reject(e, None)
            }
        }
    }

    /// A valid key's policy (networks, scopes), its rate limit, then the forward.
    async fn authorize_and_forward(
        &self,
        req: Request<ClientBody>,
        client: &ClientInfo<'_>,
        authenticated: Authenticated,
        body_limit: Option<u64>,
    ) -> Handled {
        let key = &authenticated.key;
        if let Err(denied) = key
            .policy
            .check(client.client_ip, req.method(), req.uri().path())
        {
            return self.reject(GatewayError::Forbidden(denied, Arc::clone(key)), None);
        }
        let allowance = match self.limits.admit_key(&key.record.id, key.policy.rate).await {
            Some(Err(throttled)) => {
                let mut handled = self.reject(GatewayError::RateLimited(throttled), None);
                handled.key = Some(Arc::clone(key));
                return handled;
            }
            Some(Ok(allowance)) => Some(allowance),
            None => None,
        };
        if authenticated.in_grace {
            self.metrics.rotated_key_uses.increment(1);
        }
        let mut handled = self
            .forward(req, client, Some(authenticated), body_limit)
            .await;
        if let Some(allowance) = allowance {
            let h = handled.response.headers_mut();
            h.insert(RATELIMIT_POLICY, allowance.policy);
            h.insert(RATELIMIT, allowance.state);
        }
        handled
    }

    /// The body limit for `path`: its longest `max_body_bytes_by_prefix` entry, else the global.
    fn body_limit(&self, path: &str) -> Option<u64> {
        self.max_body_bytes_by_prefix
            .iter()
            .find(|(prefix, _)| path.starts_with(prefix.as_str()))
            .map_or(self.max_body_bytes, |(_, limit)| *limit)
    }

    fn is_public(&self, path: &str) -> bool {
        self.public_paths
            .iter()
            .any(|p| path.starts_with(p.as_str()))
    }

    /// Renders a gateway error: the one place errors become responses.
    fn reject(&self, err: GatewayError, cause: Option<String>) -> Handled {
        let mut response = Response::new(GatewayBody::full(err.body()));
        *response.status_mut() = err.status();
        self.errors.apply(&err, response.headers_mut());
        let outcome = match &err {
            GatewayError::MissingCredentials
            | GatewayError::InvalidKey(_)
            | GatewayError::InactiveKey(_)
            | GatewayError::ExpiredKey(_)
            | GatewayError::RotatedKey(_)
            | GatewayError::Forbidden(..)
            | GatewayError::UriTooLong
            | GatewayError::PayloadTooLarge
            | GatewayError::BadRequestBody
            | GatewayError::RateLimited(_) => Outcome::Rejected,
            GatewayError::StoreUnavailable | GatewayError::Upstream(_) => Outcome::Failed,
        };
        if let GatewayError::Upstream(kind) = err {
            self.metrics.upstream_error(kind);
        }
        let key = err.key().cloned();
        Handled {
            response,
            outcome,
            auth: err.auth_reason(),
            reason: err.reason(),
            key,
            cause,
        }
    }

    fn preflight<B>(&self, req: &Request<B>) -> Handled {
        let (headers, reason) = match self.cors.preflight(req.headers()) {
            Preflight::Allowed(h) => (h, "cors_allowed"),
            Preflight::Refused(h) => (h, "cors_origin_not_allowed"),
        };
        let mut response = Response::new(GatewayBody::empty());
        *response.status_mut() = StatusCode::NO_CONTENT;
        *response.headers_mut() = headers;
        Handled::new(response, Outcome::Preflight, reason)
    }

    async fn health(&self) -> Handled {
        let timestamp = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
        let store = self.cache.store();
        let (status, body) = match self.cache.call(store.count_active()).await {
            Ok(n) => (
                StatusCode::OK,
                serde_json::json!({"status": "healthy", "active_api_keys": n, "timestamp": timestamp}),
            ),
            Err(e) => (
                StatusCode::SERVICE_UNAVAILABLE,
                serde_json::json!({"status": "unhealthy", "error": e.to_string(), "timestamp": timestamp}),
            ),
        };
        let mut response = Response::new(GatewayBody::full(Bytes::from(body.to_string())));
        *response.status_mut() = status;
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        response
            .headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        Handled::new(response, Outcome::Local, "health")
    }

    async fn forward(
        &self,
        req: Request<ClientBody>,
        client: &ClientInfo<'_>,
        authenticated: Option<Authenticated>,
        body_limit: Option<u64>,
    ) -> Handled {
        let upstream = &self.upstreams[client.worker % self.upstreams.len()];
        let mut edits = upstream.edits(req.headers(), req.uri(), client);
        // Client-sent identity headers are never trusted, whatever the auth outcome: dropped,
        // and replaced when a key authenticated the request.
        edits.drop(&self.id_header);
        edits.drop(&self.name_header);
        if let Some(a) = &authenticated {
            if !self.forward_credentials {
                edits.drop(self.auth.key_header());
                if a.source == CredentialSource::Bearer {
                    edits.drop(&crate::proxy::AUTHORIZATION);
                }
            }
            edits.add(self.id_header.clone(), a.key.id_header.clone());
            edits.add(self.name_header.clone(), a.key.name_header.clone());
        }
        let (auth, reason) = match &authenticated {
            Some(a) if a.in_grace => (Some(AuthReason::Ok), "ok_rotated_key_in_grace"),
            Some(_) => (Some(AuthReason::Ok), "ok"),
            None => (None, "public_path"),
        };
        match upstream.send(req, &edits, body_limit, client.gate).await {
            Ok((resp, upstream_latency)) => {
                self.metrics
                    .upstream_duration
                    .record(upstream_latency.as_secs_f64());
                Handled {
                    response: resp.map(GatewayBody::Upstream),
                    outcome: Outcome::Forwarded,
                    auth,
                    reason,
                    key: authenticated.map(|a| a.key),
                    cause: None,
                }
            }
            Err(e) => {
                let (err, cause) = match e {
                    ForwardError::Upstream { kind, cause } => (GatewayError::Upstream(kind), cause),
                    ForwardError::ClientBody {
                        too_large: true,
                        cause,
                    } => (GatewayError::PayloadTooLarge, cause),
                    ForwardError::ClientBody {
                        too_large: false,
                        cause,
                    } => (GatewayError::BadRequestBody, cause),
                };
                let mut handled = self.reject(err, Some(cause));
                handled.auth = auth;
                handled.key = authenticated.map(|a| a.key);
                handled
            }
        }
    }
}
