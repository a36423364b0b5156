//! The first stage: what `gateway.toml` (and the environment, `env.rs`) may say, as serde
//! types. Unknown keys are refused (`deny_unknown_fields`); durations ([`DurationSetting`]) and
//! the settings that name one of a few choices ([`HttpMode`], [`BackendKind`], [`LogFormat`],
//! [`Rotation`]) are typed here, so a value that is none of them is refused while the file is
//! read, naming the key. Every field has a default; the shipped `gateway.toml` documents them.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::de::{self, Unexpected};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::{ConfigError, invalid};

/// The longest duration any setting takes. Far past any sensible timeout, TTL or interval, and it
/// keeps every deadline the gateway computes (`now + ttl + stale_if_error`, timers) far from the
/// overflow that panics `Instant` arithmetic: an unbounded value such as "300000000000y" parses,
/// and adding it to an `Instant` panics.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 86_400);

/// A duration setting: "250ms", "30s", "5m", "7d" (humantime's units), at most
/// [`MAX_DURATION`]. Read with the file, so text that is no such duration is refused there; the
/// text is kept as written, for `check-config` to show and for errors about the value to quote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DurationSetting {
    text: String,
    value: Duration,
}

impl DurationSetting {
    /// What a duration setting takes, in the words of the error that refuses one.
    const EXPECTED: &str = "a duration such as \"250ms\", \"30s\", \"5m\" or \"7d\", at most 365d";

    /// `text` as a duration setting; `None` when it is not one.
    pub fn parse(text: &str) -> Option<Self> {
        let value = humantime::parse_duration(text.trim())
            .ok()
            .filter(|d| *d <= MAX_DURATION)?;
        Some(Self {
            text: text.to_owned(),
            value,
        })
    }

    /// `n` milliseconds, written `"<n>ms"`.
    pub fn millis(n: u64) -> Self {
        Self {
            text: format!("{n}ms"),
            value: Duration::from_millis(n),
        }
    }

    /// `n` seconds, written `"<n>s"`.
    pub fn secs(n: u64) -> Self {
        Self {
            text: format!("{n}s"),
            value: Duration::from_secs(n),
        }
    }

    /// `n` minutes, written `"<n>m"`.
    pub fn minutes(n: u64) -> Self {
        Self {
            text: format!("{n}m"),
            value: Duration::from_secs(n.saturating_mul(60)),
        }
    }

    /// The duration.
    pub fn get(&self) -> Duration {
        self.value
    }

    /// The text as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The duration, refusing zero: for timeouts and intervals where no time at all would fail
    /// every request (a 0 s handshake timeout refuses every TLS client) or spin.
    pub(super) fn positive(&self, key: &'static str) -> Result<Duration, ConfigError> {
        if self.get().is_zero() {
            return Err(invalid(key, self.as_str(), "a duration above 0"));
        }
        Ok(self.get())
    }

    /// The duration, from 1 ms to 60 s: for a poll or a wait that must neither spin nor stall.
    pub(super) fn within_a_minute(&self, key: &'static str) -> Result<Duration, ConfigError> {
        let d = self.get();
        if d.is_zero() || d > Duration::from_secs(60) {
            return Err(invalid(key, self.as_str(), "between 1ms and 60s"));
        }
        Ok(d)
    }
}

impl Serialize for DurationSetting {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for DurationSetting {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl de::Visitor<'_> for Visitor {
            type Value = DurationSetting;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(DurationSetting::EXPECTED)
            }
            fn visit_str<E: de::Error>(self, text: &str) -> Result<DurationSetting, E> {
                DurationSetting::parse(text)
                    .ok_or_else(|| E::invalid_value(Unexpected::Str(text), &self))
            }
        }
        deserializer.deserialize_str(Visitor)
    }
}

/// A setting's text that names none of its choices. Worded as serde words an invalid value, so
/// the error that names the key and the value can take the choices from its `expected ...`.
#[derive(Debug)]
pub struct NotAChoice {
    text: String,
    expected: &'static str,
}

impl std::fmt::Display for NotAChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "invalid value: string {:?}, expected {}",
            self.text, self.expected
        )
    }
}

/// `server.http_mode`: what the plain-HTTP listener does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", try_from = "String")]
pub enum HttpMode {
    /// Answer every request with 308 to the HTTPS URL.
    Redirect,
    /// Run the authenticated pipeline over plain HTTP (TLS terminated by a load balancer).
    Serve,
}

impl TryFrom<String> for HttpMode {
    type Error = NotAChoice;
    fn try_from(text: String) -> Result<Self, NotAChoice> {
        match text.trim() {
            "redirect" => Ok(Self::Redirect),
            "serve" => Ok(Self::Serve),
            _ => Err(NotAChoice {
                text,
                expected: "\"redirect\" (308 to HTTPS) or \"serve\" (the pipeline over plain HTTP)",
            }),
        }
    }
}

/// `store.backend`: which store keeps the keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", try_from = "String")]
pub enum BackendKind {
    /// An embedded SQLite file (one host).
    Sqlite,
    /// One Redis server, shared by a fleet.
    Redis,
    /// A Redis primary that Redis Sentinel manages.
    RedisSentinel,
    /// A Redis Cluster.
    RedisCluster,
}

impl TryFrom<String> for BackendKind {
    type Error = NotAChoice;
    fn try_from(text: String) -> Result<Self, NotAChoice> {
        match text.as_str() {
            "sqlite" => Ok(Self::Sqlite),
            "redis" => Ok(Self::Redis),
            "redis-sentinel" => Ok(Self::RedisSentinel),
            "redis-cluster" => Ok(Self::RedisCluster),
            _ => Err(NotAChoice {
                text,
                expected: "\"sqlite\", \"redis\", \"redis-sentinel\" or \"redis-cluster\"",
            }),
        }
    }
}

/// `logging.format`: how log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", try_from = "String")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

impl TryFrom<String> for LogFormat {
    type Error = NotAChoice;
    fn try_from(text: String) -> Result<Self, NotAChoice> {
        match text.as_str() {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            _ => Err(NotAChoice {
                text,
                expected: "\"text\" or \"json\"",
            }),
        }
    }
}

/// `logging.rotation`: when the log file is rotated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", try_from = "String")]
pub enum Rotation {
    Daily,
    Hourly,
    Never,
}

impl TryFrom<String> for Rotation {
    type Error = NotAChoice;
    fn try_from(text: String) -> Result<Self, NotAChoice> {
        match text.as_str() {
            "daily" => Ok(Self::Daily),
            "hourly" => Ok(Self::Hourly),
            "never" => Ok(Self::Never),
            _ => Err(NotAChoice {
                text,
                expected: "\"daily\", \"hourly\" or \"never\"",
            }),
        }
    }
}

/// `gateway.toml` as written. Every field has a default; see the shipped `gateway.toml` for docs.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FileConfig {
    /// The file this was read from (absolute), if any; not a setting.
    #[serde(skip)]
    pub source: Option<PathBuf>,
    /// Which environment variable set which key (`"server.workers"`); not a setting.
    #[serde(skip)]
    pub from_env: BTreeMap<String, String>,
    pub server: ServerSection,
    pub tls: TlsSection,
    pub upstream: UpstreamSection,
    pub auth: AuthSection,
    pub store: StoreSection,
    pub cors: CorsSection,
    pub headers: HeadersSection,
    pub logging: LoggingSection,
    pub metrics: MetricsSection,
    pub rate_limit: RateLimitSection,
}

/// `[server]`: listeners and connection limits.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerSection {
    /// HTTPS listener address.
    pub https_listen: String,
    /// Plain HTTP listener; empty string disables it.
    pub http_listen: String,
    /// What the plain HTTP listener does: "redirect" (308 to HTTPS) or "serve" (the whole
    /// pipeline, for a load balancer that terminates TLS in front of the gateway).
    pub http_mode: HttpMode,
    /// Admin listener (/metrics, /healthz, /readyz); empty string disables it.
    pub admin_listen: String,
    /// Host name used in HTTP→HTTPS redirects (never the client's Host header).
    pub public_host: String,
    /// Port used in redirects; 0 means "the HTTPS listener's port". Omitted from the URL when 443.
    pub public_port: u16,
    /// Time allowed for a TLS handshake.
    pub handshake_timeout: DurationSetting,
    /// Time allowed for a client to send a request's headers.
    pub header_read_timeout: DurationSetting,
    /// Longest pause allowed between the bytes of a request body being forwarded (longer: 408
    /// and the forward is aborted), like nginx's `client_body_timeout`.
    pub body_read_timeout: DurationSetting,
    /// How long in-flight requests may run after SIGTERM/SIGINT before connections are closed.
    pub shutdown_grace: DurationSetting,
    /// Maximum simultaneous client connections across listeners; excess connections are closed at once.
    pub max_connections: usize,
    /// CIDRs of proxies whose X-Forwarded-For / X-Forwarded-Proto are trusted.
    pub trusted_proxies: Vec<String>,
    /// Most header fields in one request (more: 431).
    pub max_headers: usize,
    /// Most bytes of request line and headers (more: 431; HTTP/2: the header list size).
    pub max_header_bytes: usize,
    /// Longest request target (path and query) in bytes (longer: 414).
    pub max_uri_bytes: usize,
    /// Largest request body in bytes (larger: 413, or the upload is cut off); 0: unlimited.
    pub max_body_bytes: u64,
    /// Per path prefix, overriding `max_body_bytes` (the longest matching prefix wins; 0:
    /// unlimited), e.g. `{ "/api/v1/video/" = 0, "/api/" = 1048576 }`.
    pub max_body_bytes_by_prefix: BTreeMap<String, u64>,
    /// HTTP/2: most concurrent streams per connection.
    pub h2_max_concurrent_streams: u32,
    /// HTTP/2: flow-control window of each request stream, in bytes: how much of a body a
    /// client may send ahead of what the upstream has taken.
    pub h2_stream_window_bytes: u32,
    /// HTTP/2: flow-control window of each connection, across its streams, in bytes: the most
    /// request body one connection can hold in the gateway.
    pub h2_connection_window_bytes: u32,
    /// Worker threads serving the pipeline, each with its own runtime, listening sockets and
    /// upstream pool; 0: one per CPU.
    pub workers: usize,
}

impl Default for ServerSection {
    fn default() -> Self {
        Self {
            https_listen: "127.0.0.1:8443".into(),
            http_listen: "127.0.0.1:8080".into(),
            http_mode: HttpMode::Redirect,
            admin_listen: "127.0.0.1:9090".into(),
            public_host: "localhost".into(),
            public_port: 0,
            handshake_timeout: DurationSetting::secs(10),
            header_read_timeout: DurationSetting::secs(10),
            body_read_timeout: DurationSetting::secs(60),
            shutdown_grace: DurationSetting::secs(30),
            max_connections: 10_000,
            trusted_proxies: Vec::new(),
            max_headers: 100,
            max_header_bytes: 16 * 1024,
            max_uri_bytes: 8 * 1024,
            max_body_bytes: 0,
            max_body_bytes_by_prefix: BTreeMap::new(),
            h2_max_concurrent_streams: 256,
            h2_stream_window_bytes: 4 << 20,
            h2_connection_window_bytes: 8 << 20,
            workers: 0,
        }
    }
}

/// `[tls]`: the served certificate.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsSection {
    /// PEM certificate chain.
    pub cert: String,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: String,
    /// When the files are missing, generate a self-signed development certificate there.
    pub generate_dev_cert: bool,
    /// How often the files are checked for changes (a change reloads them, as SIGHUP does);
    /// "0s" disables the check.
    pub watch_interval: DurationSetting,
}

impl Default for TlsSection {
    fn default() -> Self {
        Self {
            cert: "certs/dev-cert.pem".into(),
            key: "certs/dev-key.pem".into(),
            generate_dev_cert: false,
            watch_interval: DurationSetting::secs(10),
        }
    }
}

/// `[upstream]`: the protected backend.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamSection {
    /// Base URL (`http://host:port[/prefix]`, or `https://` for TLS to the upstream).
    pub url: String,
    /// TCP connect timeout.
    pub connect_timeout: DurationSetting,
    /// Time to the upstream's response headers.
    pub response_timeout: DurationSetting,
    /// Idle keep-alive connections kept per upstream host.
    pub pool_max_idle: usize,
    /// How long an idle upstream connection is kept.
    pub pool_idle_timeout: DurationSetting,
    /// Send the client's Host header upstream instead of the upstream's own authority.
    pub preserve_host: bool,
    /// `https://` upstreams: PEM file of the CA certificates the upstream's certificate must
    /// chain to; empty: the system's roots.
    pub tls_ca_file: String,
    /// `https://` upstreams: PEM certificate chain presented to an upstream that asks for a
    /// client certificate (with `tls_key_file`); empty: none.
    pub tls_cert_file: String,
    /// The private key of `tls_cert_file` (PEM).
    pub tls_key_file: String,
    /// Secret(s) signing each forwarded request's identity (`auth.signature_header`): one, or two
    /// separated by a comma while rotating. Better set through the environment
    /// (`KEYGATE_UPSTREAM_IDENTITY_SECRET`) or `identity_secret_file` than written here.
    pub identity_secret: String,
    /// File holding the identity secret(s), one per line; empty: `identity_secret`.
    pub identity_secret_file: String,
}

impl Default for UpstreamSection {
    fn default() -> Self {
        Self {
            url: "http://127.0.0.1:8000".into(),
            connect_timeout: DurationSetting::secs(5),
            response_timeout: DurationSetting::secs(60),
            pool_max_idle: 256,
            pool_idle_timeout: DurationSetting::secs(90),
            preserve_host: false,
            tls_ca_file: String::new(),
            tls_cert_file: String::new(),
            tls_key_file: String::new(),
            identity_secret: String::new(),
            identity_secret_file: String::new(),
        }
    }
}

/// `[auth]`: where keys are read from and what is sent upstream.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthSection {
    /// Header carrying the key.
    pub key_header: String,
    /// Also accept `Authorization: Bearer <key>` when the key header is absent.
    pub bearer_fallback: bool,
    /// Forward the credential headers to the upstream (off: they are stripped).
    pub forward_credentials: bool,
    /// Path prefixes forwarded without a key (e.g. "/static/").
    pub public_paths: Vec<String>,
    /// Header that tells the upstream the key's id.
    pub id_header: String,
    /// Header that tells the upstream the key's name.
    pub name_header: String,
    /// Header that tells the upstream the key's owner (only for keys that have one).
    pub owner_header: String,
    /// Header carrying the signature over the identity (with `upstream.identity_secret`).
    pub signature_header: String,
    /// `realm` of the WWW-Authenticate challenge.
    pub realm: String,
}

impl Default for AuthSection {
    fn default() -> Self {
        Self {
            key_header: "X-API-Key".into(),
            bearer_fallback: true,
            forward_credentials: false,
            public_paths: Vec::new(),
            id_header: "X-Api-Key-Id".into(),
            name_header: "X-Api-Key-Name".into(),
            owner_header: "X-Api-Key-Owner".into(),
            signature_header: "X-Keygate-Signature".into(),
            realm: "keygate".into(),
        }
    }
}

/// `[store]`: key storage and the in-process cache in front of it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreSection {
    /// `sqlite` (embedded, one host), `redis` (one server, shared by a fleet), `redis-sentinel`
    /// (a primary that Redis Sentinel manages) or `redis-cluster`.
    pub backend: BackendKind,
    /// SQLite database file.
    pub path: String,
    /// Redis URL for `redis`: `redis://[user:password@]host:port/db`, or `rediss://` for TLS.
    /// For `redis-sentinel`: the primary's user, password, database and scheme (the host is not
    /// used: the sentinels name the primary).
    pub url: String,
    /// Seed nodes for `redis-cluster` (URLs as for `url`).
    pub cluster_nodes: Vec<String>,
    /// Sentinels for `redis-sentinel`: `redis://[user:password@]host:26379` (the user and
    /// password are the sentinels' own, if they require one).
    pub sentinels: Vec<String>,
    /// The name the sentinels monitor the primary under (`sentinel monitor <name> ...`).
    pub master_name: String,
    /// PEM file of the CAs that sign the Redis servers' certificates (`rediss://` only), instead
    /// of the system's roots.
    pub tls_ca_file: String,
    /// PEM certificate chain keygate presents to Redis (`tls-auth-clients`), with
    /// `tls_key_file`.
    pub tls_cert_file: String,
    /// PEM private key of `tls_cert_file`.
    pub tls_key_file: String,
    /// Allows `rediss://...#insecure` URLs, which turn certificate verification off.
    pub tls_allow_insecure: bool,
    /// Replicas that must acknowledge a key change (`WAIT`) before the CLI confirms it; unset: 1
    /// with `redis-sentinel`, 0 (none) otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub confirm_replicas: Option<u32>,
    /// How long a key change waits for those replicas before it is reported unconfirmed.
    pub confirm_timeout: DurationSetting,
    /// Redis key prefix; keys are `{prefix}:...`, all in one cluster slot.
    pub key_prefix: String,
    /// Maximum cached keys (valid and unknown together).
    pub cache_capacity: u64,
    /// How long a valid key's decision is cached without re-reading the store (while the change
    /// feed is confirmed, `stale_if_error` longer, with keys in use re-read in the background).
    pub positive_ttl: DurationSetting,
    /// How long an unknown key's rejection is cached.
    pub negative_ttl: DurationSetting,
    /// How long past `positive_ttl` a cached valid key keeps working while the store is failing
    /// (or while the change feed is confirmed).
    pub stale_if_error: DurationSetting,
    /// How often the change feed is polled (revocations take effect within this).
    pub poll_interval: DurationSetting,
    /// How often `last_used` and usage counts are written.
    pub usage_flush_interval: DurationSetting,
    /// Longest a store call may take before it counts as a failure.
    pub timeout: DurationSetting,
}

impl Default for StoreSection {
    fn default() -> Self {
        Self {
            backend: BackendKind::Sqlite,
            path: "keygate.db".into(),
            url: "redis://127.0.0.1:6379/0".into(),
            cluster_nodes: Vec::new(),
            sentinels: Vec::new(),
            master_name: String::new(),
            tls_ca_file: String::new(),
            tls_cert_file: String::new(),
            tls_key_file: String::new(),
            tls_allow_insecure: false,
            confirm_replicas: None,
            confirm_timeout: DurationSetting::secs(1),
            key_prefix: "keygate".into(),
            cache_capacity: 100_000,
            positive_ttl: DurationSetting::secs(60),
            negative_ttl: DurationSetting::secs(30),
            stale_if_error: DurationSetting::minutes(5),
            poll_interval: DurationSetting::millis(250),
            usage_flush_interval: DurationSetting::secs(5),
            timeout: DurationSetting::secs(2),
        }
    }
}

/// `[cors]`: browser cross-origin policy.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CorsSection {
    /// Exact origins (`scheme://host[:port]`) allowed; env `CORS_ALLOWED_ORIGINS` overrides.
    pub allowed_origins: Vec<String>,
    /// Origins allowed by regular expression, matched as django-cors-headers'
    /// `CORS_ALLOWED_ORIGIN_REGEXES` are (`re.match`: anchored at the start only, so end a
    /// pattern with `$`); env `CORS_ALLOWED_ORIGIN_REGEXES` overrides.
    pub allowed_origin_patterns: Vec<String>,
    /// Methods allowed in preflights.
    pub allowed_methods: Vec<String>,
    /// Request headers allowed besides the key headers (which are always allowed).
    pub allowed_headers: Vec<String>,
    /// Response headers a browser may read.
    pub expose_headers: Vec<String>,
    /// Send `Access-Control-Allow-Credentials: true`.
    pub allow_credentials: bool,
    /// Seconds a browser may cache a preflight.
    pub max_age: u64,
}

impl Default for CorsSection {
    fn default() -> Self {
        Self {
            allowed_origins: Vec::new(),
            allowed_origin_patterns: Vec::new(),
            allowed_methods: ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
                .map(String::from)
                .into(),
            // django-cors-headers' default_headers, and keygate's request id.
            allowed_headers: [
                "Accept",
                "Authorization",
                "Content-Type",
                "User-Agent",
                "X-CSRFToken",
                "X-Requested-With",
                "X-Request-Id",
            ]
            .map(String::from)
            .into(),
            expose_headers: vec!["X-Request-Id".into()],
            allow_credentials: false,
            max_age: 86_400,
        }
    }
}

/// `[headers]`: security headers set on every response; an empty string omits one.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HeadersSection {
    /// `Strict-Transport-Security` on HTTPS responses.
    pub strict_transport_security: String,
    /// `X-Content-Type-Options`.
    pub content_type_options: String,
    /// `X-Frame-Options`.
    pub frame_options: String,
    /// `Referrer-Policy`.
    pub referrer_policy: String,
}

impl Default for HeadersSection {
    fn default() -> Self {
        Self {
            strict_transport_security: "max-age=31536000; includeSubDomains".into(),
            content_type_options: "nosniff".into(),
            frame_options: "DENY".into(),
            referrer_policy: "no-referrer".into(),
        }
    }
}

/// `[rate_limit]`: GCRA limits, shared by the fleet when the store is Redis.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimitSection {
    /// Requests per key, e.g. "600/min"; empty: unlimited.
    pub per_key: String,
    /// Failed authentications per client IP before it is locked out, e.g. "20/min"; empty: off.
    pub failures_per_ip: String,
    /// Longest wait for the shared limiter before deciding in-process.
    pub shared_timeout: DurationSetting,
}

impl Default for RateLimitSection {
    fn default() -> Self {
        Self {
            per_key: String::new(),
            failures_per_ip: "20/min".into(),
            shared_timeout: DurationSetting::millis(50),
        }
    }
}

/// `[logging]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoggingSection {
    /// `text` or `json`.
    pub format: LogFormat,
    /// Filter directive (`info`, `keygate=debug`, ...).
    pub level: String,
    /// Also append logs to this file; empty: stdout only.
    pub file: String,
    /// Rotation of `file`: "daily", "hourly" or "never".
    pub rotation: Rotation,
    /// Rotated files kept (older ones are deleted); 0 keeps all.
    pub max_files: usize,
    /// Key-management audit log (JSON lines written by the CLI); empty: none.
    pub audit_file: String,
}

impl Default for LoggingSection {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: "info".into(),
            file: String::new(),
            rotation: Rotation::Daily,
            max_files: 14,
            audit_file: String::new(),
        }
    }
}

/// `[metrics]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsSection {
    /// Histogram buckets for latencies, in seconds.
    pub latency_buckets: Vec<f64>,
}

impl Default for MetricsSection {
    fn default() -> Self {
        Self {
            latency_buckets: vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0,
            ],
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Validated configuration.

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::config::tests::load;

    #[test]
    fn durations_up_to_a_year_are_taken() {
        let c = load(
            "[store]\npositive_ttl = \"365d\"\nstale_if_error = \"365d\"\n",
            &[],
        )
        .unwrap();
        assert_eq!(c.store.positive_ttl, MAX_DURATION);
        assert_eq!(c.store.stale_if_error, MAX_DURATION);
    }

    #[test]
    fn durations_keep_their_text() {
        let d = DurationSetting::parse(" 90s").unwrap();
        assert_eq!(d.get(), Duration::from_secs(90));
        assert_eq!(d.as_str(), " 90s");
        for (made, text) in [
            (DurationSetting::millis(250), "250ms"),
            (DurationSetting::secs(60), "60s"),
            (DurationSetting::minutes(5), "5m"),
        ] {
            assert_eq!(Some(made), DurationSetting::parse(text));
        }
        for bad in ["soon", "", "366d", "300000000000y", "-1s"] {
            assert_eq!(DurationSetting::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_defaults_render_as_written_and_read_back() {
        let shown = FileConfig::default().to_toml();
        for line in [
            "http_mode = \"redirect\"",
            "handshake_timeout = \"10s\"",
            "backend = \"sqlite\"",
            "positive_ttl = \"60s\"",
            "stale_if_error = \"5m\"",
            "poll_interval = \"250ms\"",
            "format = \"text\"",
            "rotation = \"daily\"",
        ] {
            assert!(shown.lines().any(|l| l == line), "{line}: {shown}");
        }
        let read = FileConfig::from_toml(&shown, "test", &BTreeMap::new()).unwrap();
        assert_eq!(read.to_toml(), shown);
    }

    #[test]
    fn every_choice_reads_back_as_it_is_written() {
        fn written<T: Serialize>(value: T) -> String {
            match toml::Value::try_from(value) {
                Ok(toml::Value::String(s)) => s,
                other => panic!("{other:?}"),
            }
        }
        for mode in [HttpMode::Redirect, HttpMode::Serve] {
            assert_eq!(HttpMode::try_from(written(mode)).unwrap(), mode);
        }
        for kind in [
            BackendKind::Sqlite,
            BackendKind::Redis,
            BackendKind::RedisSentinel,
            BackendKind::RedisCluster,
        ] {
            assert_eq!(BackendKind::try_from(written(kind)).unwrap(), kind);
        }
        for format in [LogFormat::Text, LogFormat::Json] {
            assert_eq!(LogFormat::try_from(written(format)).unwrap(), format);
        }
        for rotation in [Rotation::Daily, Rotation::Hourly, Rotation::Never] {
            assert_eq!(Rotation::try_from(written(rotation)).unwrap(), rotation);
        }
        assert_eq!(written(BackendKind::RedisSentinel), "redis-sentinel");
    }
}
