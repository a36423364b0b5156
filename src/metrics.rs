//! Prometheus metrics: every series is registered once at start-up into a per-gateway recorder, and
//! the request path only increments pre-built handles (no label allocation, no registry lookup).
//! No series carries a per-key label, so cardinality is fixed whatever clients send.

use metrics::{
    Counter, Gauge, Histogram, Key, KeyName, Label, Metadata, Recorder, SharedString, Unit,
};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

use crate::rate::LimitKind;

/// How a request ended, for `keygate_requests_total{outcome}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Authenticated (or public) and answered by the upstream.
    Forwarded,
    /// Refused by the gateway's policy (401, 403, 429...).
    Rejected,
    /// CORS preflight answered by the gateway.
    Preflight,
    /// Answered by the gateway itself (health endpoint).
    Local,
    /// The gateway could not do its job (store or upstream failure).
    Failed,
    /// No answer was sent: the client went away first, or the shutdown grace ended.
    Cancelled,
}

impl Outcome {
    const ALL: [Outcome; 6] = [
        Outcome::Forwarded,
        Outcome::Rejected,
        Outcome::Preflight,
        Outcome::Local,
        Outcome::Failed,
        Outcome::Cancelled,
    ];

    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Forwarded => "forwarded",
            Outcome::Rejected => "rejected",
            Outcome::Preflight => "preflight",
            Outcome::Local => "local",
            Outcome::Failed => "failed",
            Outcome::Cancelled => "cancelled",
        }
    }
}

/// Result of authentication, for `keygate_auth_decisions_total{reason}` and the access log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthReason {
    /// Valid, active key.
    Ok,
    /// No credential presented.
    Missing,
    /// Failed the offline format/checksum check (or too long to be a key).
    Malformed,
    /// Well-formed, but not in the store.
    Unknown,
    /// Known but deactivated.
    Inactive,
    /// Known but past its expiry.
    Expired,
    /// Replaced by rotation, and its grace period is over.
    Rotated,
    /// Valid, but outside its allowed networks or scopes (403).
    Forbidden,
    /// The store could not answer.
    StoreUnavailable,
}

impl AuthReason {
    const ALL: [AuthReason; 9] = [
        AuthReason::Ok,
        AuthReason::Missing,
        AuthReason::Malformed,
        AuthReason::Unknown,
        AuthReason::Inactive,
        AuthReason::Expired,
        AuthReason::Rotated,
        AuthReason::Forbidden,
        AuthReason::StoreUnavailable,
    ];

    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthReason::Ok => "ok",
            AuthReason::Missing => "missing",
            AuthReason::Malformed => "malformed",
            AuthReason::Unknown => "unknown",
            AuthReason::Inactive => "inactive",
            AuthReason::Expired => "expired",
            AuthReason::Rotated => "rotated",
            AuthReason::Forbidden => "forbidden",
            AuthReason::StoreUnavailable => "store_unavailable",
        }
    }
}

/// Kind of upstream failure, for `keygate_upstream_errors_total{kind}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamErrorKind {
    /// Could not connect.
    Connect,
    /// No response headers within `response_timeout`.
    Timeout,
    /// Connection broke or the upstream spoke bad HTTP.
    Protocol,
}

impl UpstreamErrorKind {
    const ALL: [UpstreamErrorKind; 3] = [
        UpstreamErrorKind::Connect,
        UpstreamErrorKind::Timeout,
        UpstreamErrorKind::Protocol,
    ];

    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamErrorKind::Connect => "connect",
            UpstreamErrorKind::Timeout => "timeout",
            UpstreamErrorKind::Protocol => "protocol",
        }
    }
}

const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Every metric handle the gateway uses.
pub struct Metrics {
    handle: PrometheusHandle,
    requests: [[Counter; 5]; 6],
    auth: [Counter; 9],
    upstream_errors: [Counter; 3],
    /// End-to-end request latency at the gateway.
    pub request_duration: Histogram,
    /// Time to the upstream's response headers.
    pub upstream_duration: Histogram,
    /// Connections opened to the upstream (a steady stream of new ones means keep-alive fails).
    pub upstream_connections_opened: Counter,
    /// Fresh cache hits.
    pub cache_hits: Counter,
    /// Cache misses (store lookups or coalesced waits).
    pub cache_misses: Counter,
    /// Known keys served past their TTL because the store failed.
    pub cache_stale_served: Counter,
    /// Background re-reads started for keys in steady use (refresh-ahead).
    pub cache_refreshes: Counter,
    /// Cached entries.
    pub cache_entries: Gauge,
    /// Lapses of the change feed's confirmation (late or failed polls).
    pub change_feed_lapses: Counter,
    /// Failed store calls.
    pub store_errors: Counter,
    /// 1 when the last store call succeeded.
    pub store_up: Gauge,
    /// 1 while the outage breaker is open (no request calls the store; one probe does).
    pub store_breaker_open: Gauge,
    /// 1 while the store looks like it lost its data (identity marker gone, change counter back).
    pub store_data_lost: Gauge,
    /// 1 while the node keygate talks to takes no writes (a replica).
    pub store_read_only: Gauge,
    /// Active, unexpired keys in the store.
    pub active_keys: Gauge,
    /// Failed or timed-out TLS handshakes.
    pub tls_handshake_failures: Counter,
    /// Connections refused because `max_connections` was reached.
    pub connections_refused: Counter,
    /// Client connections open now.
    pub connections_open: Gauge,
    /// Plain-HTTP requests redirected to HTTPS.
    pub redirects: Counter,
    rate_limits: [[Counter; 2]; 2],
    /// 1 while the shared (Redis) rate limiter is failing and limits are per instance.
    pub rate_limit_degraded: Gauge,
    /// Requests authenticated by an old key inside its rotation grace period.
    pub rotated_key_uses: Counter,
    /// notAfter of the served certificate, Unix seconds.
    pub tls_certificate_expiry: Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

struct Registrar {
    recorder: PrometheusRecorder,
}

static METADATA: Metadata<'static> =
    Metadata::new("keygate", metrics::Level::INFO, Some("keygate"));

impl Registrar {
    fn counter(
        &self,
        name: &'static str,
        help: &'static str,
        labels: &[(&'static str, &'static str)],
    ) -> Counter {
        self.recorder.describe_counter(
            KeyName::from_const_str(name),
            None,
            SharedString::const_str(help),
        );
        self.recorder
            .register_counter(&key(name, labels), &METADATA)
    }

    fn gauge(
        &self,
        name: &'static str,
        help: &'static str,
        labels: &[(&'static str, &'static str)],
    ) -> Gauge {
        self.recorder.describe_gauge(
            KeyName::from_const_str(name),
            None,
            SharedString::const_str(help),
        );
        self.recorder.register_gauge(&key(name, labels), &METADATA)
    }

    fn histogram(&self, name: &'static str, help: &'static str) -> Histogram {
        self.recorder.describe_histogram(
            KeyName::from_const_str(name),
            Some(Unit::Seconds),
            SharedString::const_str(help),
        );
        self.recorder.register_histogram(&key(name, &[]), &METADATA)
    }
}

fn key(name: &'static str, labels: &[(&'static str, &'static str)]) -> Key {
    let labels: Vec<Label> = labels
        .iter()
        .map(|&(k, v)| Label::from_static_parts(k, v))
        .collect();
    Key::from_parts(name, labels)
}

impl Metrics {
    /// Registers every series in a fresh recorder with these latency buckets (seconds).
    pub fn new(latency_buckets: &[f64]) -> Self {
        let builder = PrometheusBuilder::new();
        // Buckets are validated by the config loader; an empty list falls back to summaries.
        let builder = match builder.set_buckets(latency_buckets) {
            Ok(b) => b,
            Err(_) => PrometheusBuilder::new(),
        };
        let r = Registrar {
            recorder: builder.build_recorder(),
        };
        let requests = Outcome::ALL.map(|o| {
            STATUS_CLASSES.map(|class| {
                r.counter(
                    "keygate_requests_total",
                    "Requests handled, by how they ended and the status class returned.",
                    &[("outcome", o.as_str()), ("status", class)],
                )
            })
        });
        let auth = AuthReason::ALL.map(|reason| {
            r.counter(
                "keygate_auth_decisions_total",
                "Authentication decisions, by reason (ok, missing, malformed, unknown, inactive, expired, rotated, forbidden, store_unavailable).",
                &[("reason", reason.as_str())],
            )
        });
        let upstream_errors = UpstreamErrorKind::ALL.map(|kind| {
            r.counter(
                "keygate_upstream_errors_total",
                "Upstream failures, by kind (connect, timeout, protocol).",
                &[("kind", kind.as_str())],
            )
        });
        let build_info = r.gauge(
            "keygate_build_info",
            "Build information; the value is always 1.",
            &[("version", env!("CARGO_PKG_VERSION"))],
        );
        build_info.set(1.0);
        let store_up = r.gauge(
            "keygate_store_up",
            "1 if the last key store call succeeded, else 0.",
            &[],
        );
        store_up.set(1.0);
        Self {
            requests,
            auth,
            upstream_errors,
            request_duration: r.histogram(
                "keygate_request_duration_seconds",
                "Time from request received to response headers sent.",
            ),
            upstream_duration: r.histogram(
                "keygate_upstream_duration_seconds",
                "Time from forwarding a request to the upstream's response headers.",
            ),
            upstream_connections_opened: r.counter(
                "keygate_upstream_connections_opened_total",
                "TCP connections opened to the upstream; keep-alive reuses them across requests.",
                &[],
            ),
            cache_hits: r.counter(
                "keygate_cache_hits_total",
                "Key lookups answered by a fresh cache entry.",
                &[],
            ),
            cache_misses: r.counter(
                "keygate_cache_misses_total",
                "Key lookups that needed the store (or waited on a concurrent lookup).",
                &[],
            ),
            cache_stale_served: r.counter(
                "keygate_cache_stale_served_total",
                "Known keys served past their TTL because the store was failing (stale_if_error).",
                &[],
            ),
            cache_refreshes: r.counter(
                "keygate_cache_refreshes_total",
                "Background re-reads of known keys started shortly before their cache entry ran out.",
                &[],
            ),
            cache_entries: r.gauge("keygate_cache_entries", "Entries in the key cache.", &[]),
            change_feed_lapses: r.counter(
                "keygate_change_feed_lapses_total",
                "Times the change feed went unconfirmed: no successful poll within two poll intervals (late) or a failed poll. Until the next successful poll, revocations wait for positive_ttl and keys past it are re-read from the store.",
                &[],
            ),
            store_errors: r.counter(
                "keygate_store_errors_total",
                "Failed or timed-out key store calls.",
                &[],
            ),
            store_up,
            store_breaker_open: r.gauge(
                "keygate_store_breaker_open",
                "1 while the key store is failing and the outage breaker is open: no request waits on the store (known keys are answered from the cache, unknown keys get 503) and one background probe checks it.",
                &[],
            ),
            store_data_lost: r.gauge(
                "keygate_store_data_lost",
                "1 while the key store looks like it lost its data (its identity marker is gone, or its change counter went back): unknown keys get 503 until the data is restored or accepted.",
                &[],
            ),
            store_read_only: r.gauge(
                "keygate_store_read_only",
                "1 while the key store node keygate talks to takes no writes (a replica): key changes and usage writes fail.",
                &[],
            ),
            active_keys: r.gauge(
                "keygate_active_keys",
                "Active, unexpired API keys in the store.",
                &[],
            ),
            tls_handshake_failures: r.counter(
                "keygate_tls_handshake_failures_total",
                "TLS handshakes that failed or timed out.",
                &[],
            ),
            connections_refused: r.counter(
                "keygate_connections_refused_total",
                "Connections closed at once because server.max_connections was reached.",
                &[],
            ),
            connections_open: r.gauge(
                "keygate_connections_open",
                "Client connections open now.",
                &[],
            ),
            redirects: r.counter(
                "keygate_redirects_total",
                "Plain-HTTP requests redirected to HTTPS.",
                &[],
            ),
            rate_limits: [LimitKind::Key, LimitKind::IpFailures].map(|kind| {
                ["allowed", "limited"].map(|result| {
                    r.counter(
                        "keygate_rate_limit_decisions_total",
                        "Rate-limit decisions, by limit (key, ip_failures) and result.",
                        &[("limit", kind.as_str()), ("result", result)],
                    )
                })
            }),
            rotated_key_uses: r.counter(
                "keygate_rotated_key_uses_total",
                "Requests authenticated with an old key inside its rotation grace period.",
                &[],
            ),
            tls_certificate_expiry: r.gauge(
                "keygate_tls_certificate_expiry_timestamp_seconds",
                "Expiry (notAfter) of the served TLS certificate, as a Unix timestamp.",
                &[],
            ),
            rate_limit_degraded: r.gauge(
                "keygate_rate_limit_degraded",
                "1 while the shared rate limiter is unavailable and limits are enforced per instance.",
                &[],
            ),
            handle: r.recorder.handle(),
        }
    }

    /// Counts one finished request.
    pub fn request(&self, outcome: Outcome, status: u16) {
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        self.requests[outcome as usize][class].increment(1);
    }

    /// Counts one authentication decision.
    pub fn auth(&self, reason: AuthReason) {
        self.auth[reason as usize].increment(1);
    }

    /// Counts one upstream failure.
    pub fn upstream_error(&self, kind: UpstreamErrorKind) {
        self.upstream_errors[kind as usize].increment(1);
    }

    /// Counts one rate-limit decision.
    pub fn rate_limit(&self, kind: LimitKind, limited: bool) {
        self.rate_limits[kind as usize][usize::from(limited)].increment(1);
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        self.handle.render()
    }

    /// Drains histogram buffers; call every few seconds.
    pub fn upkeep(&self) {
        self.handle.run_upkeep();
    }
}
