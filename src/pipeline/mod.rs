//! The request pipeline of the HTTPS listener (and of the HTTP one in `serve` mode), as a short
//! list of named stages, each in its own file:
//!
//! 1. request id and client address ([`Gateway::handle`], [`context`]);
//! 2. admission: methods never forwarded (CONNECT, TRACE: 405), the target's length (414), the
//!    declared body (400 past 2^63-1, 413 past the limit) ([`admission`]);
//! 3. own routes: `/health/api-auth/` ([`local`]);
//! 4. CORS preflight, answered here, never authenticated or forwarded ([`local`]);
//! 5. client lockout (too many failed keys), then authentication; public paths skip both
//!    ([`authorize`]);
//! 6. the key's policy (networks, scopes: 403) and rate limit (429) ([`authorize`]);
//! 7. forwarding, with credential and identity headers rewritten ([`forward`]);
//! 8. the answer: an error rendered, the headers every answer carries, HEAD answered with the
//!    head only ([`answer`]); then one access-log event and the metrics ([`context`]).
//!
//! A [`context::RequestContext`] goes through every stage, which records in it what it
//! decided; the last one logs it (a request dropped before that, because its client went away
//! or the shutdown grace ended, is logged as cancelled). Stages return a [`GatewayError`]; the
//! answer stage alone turns it into a response. A body nobody will read (an answer given before
//! it arrived) is drained so the answer reaches the client whole.

mod admission;
mod answer;
mod authorize;
mod body;
mod context;
mod forward;
mod local;

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::{self, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Method, Request, Response};
use http_body::Body as _;
use hyper::body::Incoming;
use ipnet::IpNet;

pub use body::GatewayBody;
pub use context::{ConnInfo, grace_ended};
pub(crate) use context::{X_REQUEST_ID, request_id};

use crate::auth::{Authenticated, Authenticator};
use crate::cache::KeyCache;
use crate::config::Config;
use crate::cors::CorsPolicy;
use crate::error::{ErrorResponses, GatewayError};
use crate::http::{drain_unread, immortal_name, immortal_value};
use crate::metrics::Metrics;
use crate::proxy::{ClientInfo, client_ip};
use crate::ratelimit::{Allowance, RateLimits};
use crate::tls::TlsError;
use crate::upstream::Upstream;
use context::RequestContext;

/// Path of the public health endpoint (the old API's URL).
pub const HEALTH_PATH: &str = "/health/api-auth/";

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

/// Everything the pipeline needs, prepared at start-up.
pub struct Gateway {
    cache: Arc<KeyCache>,
    auth: Authenticator,
    cors: CorsPolicy,
    /// One upstream pool per worker, so a request is forwarded on the core it arrived on.
    upstreams: Box<[Upstream]>,
    preserve_host: bool,
    errors: ErrorResponses,
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
            errors: ErrorResponses::new(&config.auth.realm),
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
        let request_id = context::assign_request_id(&mut parts.headers);
        let (client, trusted) = client_ip(conn.peer.ip(), &parts.headers, &self.trusted_proxies);
        let client = ClientInfo {
            peer: &conn.peer_text,
            trusted,
            client_ip: client,
            tls: conn.tls,
        };
        let mut ctx = RequestContext::new(
            &self.metrics,
            started,
            request_id,
            &parts,
            &conn,
            client.client_ip,
        );
        let declared = body.size_hint().lower();
        let forwarded = match self.decide(&parts, declared, &client, &mut ctx).await {
            Ok(Decision::Forward(forward)) => {
                self.forward(&parts, body, &client, forward, &mut ctx).await
            }
            Ok(Decision::Answer(response)) => {
                // Answered without reading the body: what the client still sends is read and
                // dropped, so the answer reaches it whole before the stream or connection
                // closes.
                drain_unread(body);
                Ok(response)
            }
            Err(e) => {
                drain_unread(body);
                Err(e)
            }
        };
        let mut response = forwarded.unwrap_or_else(|e| self.reject(e, &mut ctx));
        self.decorate(&parts, &client, &ctx, &mut response);
        ctx.log(response.status().as_u16());
        response
    }

    /// Stages 2 to 6: the gateway's own answer, or the go-ahead to forward.
    async fn decide(
        &self,
        parts: &Parts,
        declared: u64,
        client: &ClientInfo<'_>,
        ctx: &mut RequestContext<'_>,
    ) -> Result<Decision, GatewayError> {
        let body_limit = self.admit(parts, declared)?;
        let path = parts.uri.path();
        if path == HEALTH_PATH && matches!(parts.method, Method::GET | Method::HEAD) {
            return Ok(Decision::Answer(self.health(ctx).await));
        }
        if CorsPolicy::is_preflight(&parts.method, &parts.headers) {
            return Ok(Decision::Answer(self.preflight(parts, ctx)));
        }
        if self.is_public(path) {
            ctx.reason = "public_path";
            return Ok(Decision::Forward(Forward {
                key: None,
                body_limit,
                allowance: None,
            }));
        }
        let authenticated = self.authenticate(parts, client, ctx).await?;
        let allowance = self.authorize(parts, client, &authenticated).await?;
        ctx.reason = if authenticated.in_grace {
            self.metrics.rotated_key_uses.increment(1);
            "ok_rotated_key_in_grace"
        } else {
            "ok"
        };
        Ok(Decision::Forward(Forward {
            key: Some(authenticated),
            body_limit,
            allowance,
        }))
    }
}
