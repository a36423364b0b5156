//! Configuration in two stages: [`FileConfig`] is what `gateway.toml` and the environment say
//! (serde, unknown keys refused); [`Config`] is the validated, typed form the gateway runs on.
//!
//! Environment overrides are `KEYGATE_<SECTION>_<FIELD>` (e.g. `KEYGATE_UPSTREAM_URL`), plus the
//! names a Django deployment with django-cors-headers already sets: `CORS_ALLOWED_ORIGINS`
//! (comma-separated), `CORS_ALLOWED_ORIGIN_REGEXES` (comma-separated; a comma inside a
//! `{m,n}` or `[...]` stays in its pattern) and `CORS_ALLOW_CREDENTIALS` (`true`/`false`, as
//! django-environ reads booleans). They are read through [`EnvSource`]
//! so tests pass a map instead of mutating the process environment. Every validation error names
//! the key, the value and what is expected.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::{HeaderName, HeaderValue, Uri};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// Where environment variables come from.
pub trait EnvSource {
    /// All variables, as (name, value).
    fn vars(&self) -> Vec<(String, String)>;
}

/// The process environment.
pub struct ProcessEnv;

impl EnvSource for ProcessEnv {
    fn vars(&self) -> Vec<(String, String)> {
        std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
            .collect()
    }
}

impl EnvSource for BTreeMap<String, String> {
    fn vars(&self) -> Vec<(String, String)> {
        self.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }
}

/// A configuration error: which key, which value, what is expected, in one line.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {}: {error} (pass --config PATH or set KEYGATE_CONFIG)", path.display())]
    Read {
        path: PathBuf,
        /// Shown in the message, not chained: the message is the whole line.
        error: std::io::Error,
    },
    /// The file is not valid TOML.
    #[error("invalid config: {origin} line {line}, column {column}: {message}")]
    Syntax {
        origin: String,
        line: usize,
        column: usize,
        message: String,
    },
    /// A section, key or `KEYGATE_*` variable that keygate does not know.
    #[error("invalid config: unknown {what}: {hint}")]
    Unknown { what: String, hint: String },
    /// A value of the wrong type, or out of its type's range.
    #[error("invalid config: {key} = {value}{from}: expected {expected}")]
    Type {
        key: String,
        /// As TOML (`"abc"`, `70000`), or the variable's text.
        value: String,
        /// ` (from KEYGATE_...)` when an environment variable set it.
        from: String,
        expected: String,
    },
    /// The values do not form a configuration (what serde said, when no single key is to blame).
    #[error("invalid config {origin}: {message}")]
    Parse { origin: String, message: String },
    /// A value that parses but is not acceptable.
    #[error("invalid config: {key} = {value:?}{from}: expected {expected}")]
    Invalid {
        key: &'static str,
        value: String,
        /// ` (from KEYGATE_...)` when an environment variable set it.
        from: String,
        expected: Cow<'static, str>,
    },
}

fn invalid(
    key: &'static str,
    value: impl std::fmt::Display,
    expected: impl Into<Cow<'static, str>>,
) -> ConfigError {
    ConfigError::Invalid {
        key,
        value: value.to_string(),
        from: String::new(),
        expected: expected.into(),
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
    pub http_mode: String,
    /// Admin listener (/metrics, /healthz, /readyz); empty string disables it.
    pub admin_listen: String,
    /// Host name used in HTTP→HTTPS redirects (never the client's Host header).
    pub public_host: String,
    /// Port used in redirects; 0 means "the HTTPS listener's port". Omitted from the URL when 443.
    pub public_port: u16,
    /// Time allowed for a TLS handshake.
    pub handshake_timeout: String,
    /// Time allowed for a client to send a request's headers.
    pub header_read_timeout: String,
    /// Longest pause allowed between the bytes of a request body being forwarded (longer: 408
    /// and the forward is aborted), like nginx's `client_body_timeout`.
    pub body_read_timeout: String,
    /// How long in-flight requests may run after SIGTERM/SIGINT before connections are closed.
    pub shutdown_grace: String,
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
    pub max_body_bytes_by_prefix: std::collections::BTreeMap<String, u64>,
    /// HTTP/2: most concurrent streams per connection.
    pub h2_max_concurrent_streams: u32,
    /// Worker threads serving the pipeline, each with its own runtime, listening sockets and
    /// upstream pool; 0: one per CPU.
    pub workers: usize,
}

impl Default for ServerSection {
    fn default() -> Self {
        Self {
            https_listen: "127.0.0.1:8443".into(),
            http_listen: "127.0.0.1:8080".into(),
            http_mode: "redirect".into(),
            admin_listen: "127.0.0.1:9090".into(),
            public_host: "localhost".into(),
            public_port: 0,
            handshake_timeout: "10s".into(),
            header_read_timeout: "10s".into(),
            body_read_timeout: "60s".into(),
            shutdown_grace: "30s".into(),
            max_connections: 10_000,
            trusted_proxies: Vec::new(),
            max_headers: 100,
            max_header_bytes: 16 * 1024,
            max_uri_bytes: 8 * 1024,
            max_body_bytes: 0,
            max_body_bytes_by_prefix: std::collections::BTreeMap::new(),
            h2_max_concurrent_streams: 256,
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
    pub watch_interval: String,
}

impl Default for TlsSection {
    fn default() -> Self {
        Self {
            cert: "certs/dev-cert.pem".into(),
            key: "certs/dev-key.pem".into(),
            generate_dev_cert: false,
            watch_interval: "10s".into(),
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
    pub connect_timeout: String,
    /// Time to the upstream's response headers.
    pub response_timeout: String,
    /// Idle keep-alive connections kept per upstream host.
    pub pool_max_idle: usize,
    /// How long an idle upstream connection is kept.
    pub pool_idle_timeout: String,
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
            connect_timeout: "5s".into(),
            response_timeout: "60s".into(),
            pool_max_idle: 256,
            pool_idle_timeout: "90s".into(),
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
    pub backend: String,
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
    pub confirm_timeout: String,
    /// Redis key prefix; keys are `{prefix}:...`, all in one cluster slot.
    pub key_prefix: String,
    /// Maximum cached keys (valid and unknown together).
    pub cache_capacity: u64,
    /// How long a valid key's decision is cached without re-reading the store (while the change
    /// feed is confirmed, `stale_if_error` longer, with keys in use re-read in the background).
    pub positive_ttl: String,
    /// How long an unknown key's rejection is cached.
    pub negative_ttl: String,
    /// How long past `positive_ttl` a cached valid key keeps working while the store is failing
    /// (or while the change feed is confirmed).
    pub stale_if_error: String,
    /// How often the change feed is polled (revocations take effect within this).
    pub poll_interval: String,
    /// How often `last_used` and usage counts are written.
    pub usage_flush_interval: String,
    /// Longest a store call may take before it counts as a failure.
    pub timeout: String,
}

impl Default for StoreSection {
    fn default() -> Self {
        Self {
            backend: "sqlite".into(),
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
            confirm_timeout: "1s".into(),
            key_prefix: "keygate".into(),
            cache_capacity: 100_000,
            positive_ttl: "60s".into(),
            negative_ttl: "30s".into(),
            stale_if_error: "5m".into(),
            poll_interval: "250ms".into(),
            usage_flush_interval: "5s".into(),
            timeout: "2s".into(),
        }
    }
}

/// `[cors]`: browser cross-origin policy.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CorsSection {
    /// Exact origins (scheme://host[:port]) allowed; env `CORS_ALLOWED_ORIGINS` overrides.
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
    pub shared_timeout: String,
}

impl Default for RateLimitSection {
    fn default() -> Self {
        Self {
            per_key: String::new(),
            failures_per_ip: "20/min".into(),
            shared_timeout: "50ms".into(),
        }
    }
}

/// `[logging]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoggingSection {
    /// `text` or `json`.
    pub format: String,
    /// Filter directive (`info`, `keygate=debug`, ...).
    pub level: String,
    /// Also append logs to this file; empty: stdout only.
    pub file: String,
    /// Rotation of `file`: "daily", "hourly" or "never".
    pub rotation: String,
    /// Rotated files kept (older ones are deleted); 0 keeps all.
    pub max_files: usize,
    /// Key-management audit log (JSON lines written by the CLI); empty: none.
    pub audit_file: String,
}

impl Default for LoggingSection {
    fn default() -> Self {
        Self {
            format: "text".into(),
            level: "info".into(),
            file: String::new(),
            rotation: "daily".into(),
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

/// The validated configuration the gateway runs on.
#[derive(Debug, Clone)]
pub struct Config {
    /// The config file it came from (absolute), if any.
    pub source: Option<PathBuf>,
    pub server: Server,
    pub tls: Tls,
    pub upstream: Upstream,
    pub auth: Auth,
    pub store: Store,
    pub cors: Cors,
    pub headers: Headers,
    pub logging: Logging,
    pub metrics: Metrics,
    pub rate_limit: RateLimit,
}

/// Validated `[rate_limit]`.
#[derive(Debug, Clone)]
pub struct RateLimit {
    pub per_key: Option<crate::ratelimit::Rate>,
    pub failures_per_ip: Option<crate::ratelimit::Rate>,
    pub shared_timeout: Duration,
}

/// Validated `[server]`.
#[derive(Debug, Clone)]
pub struct Server {
    pub https_listen: SocketAddr,
    pub http_listen: Option<SocketAddr>,
    pub http_mode: HttpMode,
    pub admin_listen: Option<SocketAddr>,
    pub public_host: String,
    pub public_port: u16,
    pub handshake_timeout: Duration,
    pub header_read_timeout: Duration,
    pub body_read_timeout: Duration,
    pub shutdown_grace: Duration,
    pub max_connections: usize,
    pub trusted_proxies: Vec<IpNet>,
    pub max_headers: usize,
    pub max_header_bytes: usize,
    pub max_uri_bytes: usize,
    pub max_body_bytes: Option<u64>,
    /// `(prefix, limit)`, longest prefix first.
    pub max_body_bytes_by_prefix: Vec<(String, Option<u64>)>,
    pub h2_max_concurrent_streams: u32,
    pub workers: usize,
}

/// What the plain-HTTP listener does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpMode {
    /// Answer every request with 308 to the HTTPS URL.
    Redirect,
    /// Run the authenticated pipeline over plain HTTP (TLS terminated by a load balancer).
    Serve,
}

/// Validated `[tls]`.
#[derive(Debug, Clone)]
pub struct Tls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub generate_dev_cert: bool,
    pub watch_interval: Duration,
}

/// Validated `[upstream]`.
#[derive(Debug, Clone)]
pub struct Upstream {
    pub url: Uri,
    pub connect_timeout: Duration,
    pub response_timeout: Duration,
    pub pool_max_idle: usize,
    pub pool_idle_timeout: Duration,
    pub preserve_host: bool,
    /// TLS to the upstream (`https://` URLs).
    pub tls: Option<UpstreamTls>,
    /// Empty: forwarded requests are not signed.
    pub identity_secrets: Vec<crate::identity::IdentitySecret>,
}

impl Upstream {
    /// The host (without an IPv6 literal's brackets) and port connections go to: the URL's
    /// port, else the scheme's (443 for `https://`, 80 for `http://`).
    pub fn address(&self) -> (&str, u16) {
        let host = self.url.host().unwrap_or("").trim_matches(['[', ']']);
        let default = if self.tls.is_some() { 443 } else { 80 };
        (host, self.url.port_u16().unwrap_or(default))
    }
}

/// How the upstream's TLS is checked, and what keygate presents to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamTls {
    /// The name the upstream's certificate must carry (the URL's host), also sent as SNI.
    pub server_name: rustls_pki_types::ServerName<'static>,
    /// CA certificates to trust instead of the system's roots.
    pub ca_file: Option<PathBuf>,
    /// Client certificate chain and key.
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

/// Validated `[auth]`.
#[derive(Debug, Clone)]
pub struct Auth {
    pub key_header: HeaderName,
    pub bearer_fallback: bool,
    pub forward_credentials: bool,
    pub public_paths: Vec<String>,
    pub id_header: HeaderName,
    pub name_header: HeaderName,
    pub owner_header: HeaderName,
    pub signature_header: HeaderName,
    pub realm: String,
}

/// Which store backs the gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// Embedded SQLite file.
    Sqlite { path: PathBuf },
    /// Redis (one server, a Sentinel group or a cluster).
    Redis(crate::store::redis::Settings),
}

impl std::fmt::Display for Backend {
    /// What a command or the start line names as its store, passwords hidden.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use crate::store::redis::Target;
        match self {
            Self::Sqlite { path } => write!(f, "sqlite {}", path.display()),
            Self::Redis(settings) => {
                let prefix = &settings.prefix;
                match &settings.target {
                    Target::Single(url) => {
                        write!(f, "redis {} (prefix {prefix})", redact_url(url))
                    }
                    Target::Cluster(nodes) => {
                        let nodes: Vec<String> = nodes.iter().map(|n| redact_url(n)).collect();
                        write!(f, "redis-cluster {} (prefix {prefix})", nodes.join(","))
                    }
                    Target::Sentinel {
                        sentinels, master, ..
                    } => {
                        let sentinels: Vec<String> =
                            sentinels.iter().map(|n| redact_url(n)).collect();
                        write!(
                            f,
                            "redis-sentinel {master} via {} (prefix {prefix})",
                            sentinels.join(",")
                        )
                    }
                }
            }
        }
    }
}

/// Validated `[store]`.
#[derive(Debug, Clone)]
pub struct Store {
    pub backend: Backend,
    pub cache_capacity: u64,
    pub positive_ttl: Duration,
    pub negative_ttl: Duration,
    pub stale_if_error: Duration,
    pub poll_interval: Duration,
    pub usage_flush_interval: Duration,
    pub timeout: Duration,
}

/// Validated `[cors]`.
#[derive(Debug, Clone)]
pub struct Cors {
    pub allowed_origins: Vec<HeaderValue>,
    /// `allowed_origin_patterns`, each anchored at the start, in one set; `None` when empty.
    pub allowed_origin_patterns: Option<regex::RegexSet>,
    /// Patterns that a match need not reach the end of (no `$`): they allow look-alikes such as
    /// `https://app.example.com.evil.net`, in keygate as in django-cors-headers.
    pub unanchored_origin_patterns: Vec<String>,
    pub allowed_methods: Vec<http::Method>,
    pub allowed_headers: Vec<HeaderName>,
    pub expose_headers: Vec<HeaderName>,
    pub allow_credentials: bool,
    pub max_age: u64,
}

/// Validated `[headers]`: `None` omits the header.
#[derive(Debug, Clone)]
pub struct Headers {
    pub strict_transport_security: Option<HeaderValue>,
    pub content_type_options: Option<HeaderValue>,
    pub frame_options: Option<HeaderValue>,
    pub referrer_policy: Option<HeaderValue>,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Validated `[logging]`.
#[derive(Debug, Clone)]
pub struct Logging {
    pub format: LogFormat,
    pub level: String,
    pub file: Option<PathBuf>,
    pub rotation: Rotation,
    pub max_files: usize,
    pub audit_file: Option<PathBuf>,
}

/// When the log file is rotated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rotation {
    Daily,
    Hourly,
    Never,
}

/// Validated `[metrics]`.
#[derive(Debug, Clone)]
pub struct Metrics {
    pub latency_buckets: Vec<f64>,
}

/// `KEYGATE_*` variables that are not overrides, though they share the prefix: the config
/// file's path (read by the command line), the binary the repository's scripts run, and the
/// identity secret file contrib/django's settings read (often exported in the shell that also
/// runs keygate). `KEYGATE_TEST_*` belong to the test suite.
const NOT_OVERRIDES: [&str; 3] = [
    "KEYGATE_CONFIG",
    "KEYGATE_BIN",
    "KEYGATE_IDENTITY_SECRET_FILE",
];

impl FileConfig {
    /// Reads `path` (a missing file is an error), then applies environment overrides. Relative
    /// paths in it (and in the overrides) are resolved against the file's directory.
    pub fn load(path: &Path, env: &dyn EnvSource) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_owned(),
            error,
        })?;
        // The file's own name, in its directory's real path (no "..": the path is shown).
        let source = std::path::absolute(path)
            .and_then(|abs| {
                let dir = abs
                    .parent()
                    .map_or(Ok(PathBuf::from("/")), std::fs::canonicalize)?;
                Ok(abs.file_name().map_or(dir.clone(), |name| dir.join(name)))
            })
            .map_err(|error| ConfigError::Read {
                path: path.to_owned(),
                error,
            })?;
        let mut file = Self::from_toml(&text, &path.display().to_string(), env)?;
        if let Some(dir) = source.parent() {
            file.resolve_paths(dir)?;
        }
        file.source = Some(source);
        Ok(file)
    }

    /// Parses TOML text, then applies environment overrides. Unknown sections, keys and
    /// `KEYGATE_*` variables are refused with the nearest valid name.
    pub fn from_toml(text: &str, origin: &str, env: &dyn EnvSource) -> Result<Self, ConfigError> {
        let mut table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| syntax_error(text, origin, &e))?;
        let defaults = defaults();
        check_keys(&table, &defaults, origin)?;
        let from_env = apply_env(&mut table, &defaults, env)?;
        deserialize(table, &defaults, &from_env, origin)
    }

    /// The settings that hold file paths: relative ones are resolved against the config file's
    /// directory, not the working directory.
    fn path_settings(&mut self) -> [(&'static str, &mut String); 9] {
        [
            ("store.path", &mut self.store.path),
            ("tls.cert", &mut self.tls.cert),
            ("tls.key", &mut self.tls.key),
            ("upstream.tls_ca_file", &mut self.upstream.tls_ca_file),
            ("upstream.tls_cert_file", &mut self.upstream.tls_cert_file),
            ("upstream.tls_key_file", &mut self.upstream.tls_key_file),
            (
                "upstream.identity_secret_file",
                &mut self.upstream.identity_secret_file,
            ),
            ("logging.file", &mut self.logging.file),
            ("logging.audit_file", &mut self.logging.audit_file),
        ]
    }

    /// Makes every relative path setting absolute, under `dir`.
    fn resolve_paths(&mut self, dir: &Path) -> Result<(), ConfigError> {
        for (key, value) in self.path_settings() {
            if value.trim().is_empty() || Path::new(value.as_str()).is_absolute() {
                continue;
            }
            let joined = dir.join(value.as_str());
            *value = joined
                .to_str()
                .ok_or_else(|| ConfigError::Type {
                    key: key.to_owned(),
                    value: format!("{value:?}"),
                    from: format!(" (relative to {})", dir.display()),
                    expected: "an absolute path (the config file's directory is not UTF-8)".into(),
                })?
                .to_owned();
        }
        Ok(())
    }

    /// Validates into the typed [`Config`]. An error about a value that an environment variable
    /// set names the variable too.
    pub fn validate(&self) -> Result<Config, ConfigError> {
        self.validate_values().map_err(|e| match e {
            ConfigError::Invalid {
                key,
                value,
                from,
                expected,
            } => ConfigError::Invalid {
                from: self
                    .from_env
                    .get(key)
                    .map_or(from, |name| format!(" (from {name})")),
                key,
                value,
                expected,
            },
            other => other,
        })
    }

    fn validate_values(&self) -> Result<Config, ConfigError> {
        Ok(Config {
            source: self.source.clone(),
            server: self.server.validate()?,
            tls: self.tls.validate()?,
            upstream: self.upstream.validate()?,
            auth: self.auth.validate()?,
            store: self.store.validate()?,
            cors: self.cors.validate()?,
            headers: self.headers.validate()?,
            logging: self.logging.validate()?,
            metrics: self.metrics.validate()?,
            rate_limit: self.rate_limit.validate()?,
        })
    }

    /// The effective configuration as TOML, for `check-config`, with passwords in Redis URLs
    /// replaced by `***`.
    pub fn to_toml(&self) -> String {
        let mut shown = self.clone();
        if !shown.upstream.identity_secret.is_empty() {
            shown.upstream.identity_secret = "***".into();
        }
        shown.store.url = redact_url(&shown.store.url);
        for node in shown
            .store
            .cluster_nodes
            .iter_mut()
            .chain(shown.store.sentinels.iter_mut())
        {
            *node = redact_url(node);
        }
        toml::to_string(&shown).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }
}

/// The default configuration as a TOML table: the schema that file keys and environment
/// variables are checked against (every section, every key, and each key's type).
fn defaults() -> toml::Table {
    match toml::Value::try_from(FileConfig::default()) {
        Ok(toml::Value::Table(table)) => table,
        _ => toml::Table::new(),
    }
}

/// A TOML syntax error in one line: where, and what.
fn syntax_error(text: &str, origin: &str, e: &toml::de::Error) -> ConfigError {
    let at = e.span().map_or(0, |s| s.start).min(text.len());
    let before = text.get(..at).unwrap_or("");
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    ConfigError::Syntax {
        origin: origin.to_owned(),
        line: before.matches('\n').count() + 1,
        column: before[line_start..].chars().count() + 1,
        message: e
            .message()
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join("; "),
    }
}

/// The candidate nearest to `name`, if it is near enough to be a misspelling of it.
fn nearest<'a>(name: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let (distance, best) = candidates
        .into_iter()
        .map(|c| (strsim::levenshtein(name, c), c))
        .min_by_key(|(d, _)| *d)?;
    (distance <= 2 + name.len() / 4).then_some(best)
}

/// Refuses sections and keys that the schema does not have.
fn check_keys(
    table: &toml::Table,
    defaults: &toml::Table,
    origin: &str,
) -> Result<(), ConfigError> {
    for (section, value) in table {
        let Some(toml::Value::Table(known)) = defaults.get(section) else {
            let hint = match nearest(section, defaults.keys().map(String::as_str)) {
                Some(near) => format!("did you mean [{near}]?"),
                None => format!(
                    "expected one of {}",
                    defaults
                        .keys()
                        .map(|s| format!("[{s}]"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            };
            return Err(ConfigError::Unknown {
                what: format!("section [{section}] in {origin}"),
                hint,
            });
        };
        let toml::Value::Table(fields) = value else {
            return Err(ConfigError::Type {
                key: section.clone(),
                value: value.to_string(),
                from: String::new(),
                expected: format!("a table: [{section}] and its keys"),
            });
        };
        for field in fields.keys() {
            if known.contains_key(field) {
                continue;
            }
            let hint = match nearest(field, known.keys().map(String::as_str)) {
                Some(near) => format!("did you mean {section}.{near}?"),
                None => format!(
                    "expected one of {}",
                    known.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
            };
            return Err(ConfigError::Unknown {
                what: format!("key {section}.{field} in {origin}"),
                hint,
            });
        }
    }
    Ok(())
}

/// Applies `KEYGATE_<SECTION>_<KEY>` and `CORS_ALLOWED_ORIGINS` to the parsed table. Each value
/// is read as the key's type (a string key takes the text as it is). Returns which variable set
/// which key, for error messages.
fn apply_env(
    table: &mut toml::Table,
    defaults: &toml::Table,
    env: &dyn EnvSource,
) -> Result<BTreeMap<String, String>, ConfigError> {
    let known: Vec<(&str, &str, &toml::Value)> = defaults
        .iter()
        .filter_map(|(section, fields)| Some((section, fields.as_table()?)))
        .flat_map(|(section, fields)| {
            fields
                .iter()
                .map(move |(field, default)| (section.as_str(), field.as_str(), default))
        })
        .collect();
    let mut vars = env.vars();
    vars.sort();
    let mut from_env = BTreeMap::new();
    for (name, raw) in vars {
        let (section, field, value) = if name == "CORS_ALLOWED_ORIGINS" {
            ("cors", "allowed_origins", list_value(&raw, None))
        } else if name == "CORS_ALLOWED_ORIGIN_REGEXES" {
            let patterns = split_patterns(&raw)
                .into_iter()
                .map(toml::Value::String)
                .collect();
            (
                "cors",
                "allowed_origin_patterns",
                toml::Value::Array(patterns),
            )
        } else if name == "CORS_ALLOW_CREDENTIALS" {
            let allow = match raw.trim().to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" | "y" | "on" | "ok" => true,
                "false" | "0" | "no" | "n" | "off" | "" => false,
                _ => {
                    return Err(invalid(
                        "CORS_ALLOW_CREDENTIALS",
                        raw,
                        "true or false (also 1/0, yes/no, on/off)",
                    ));
                }
            };
            ("cors", "allow_credentials", toml::Value::Boolean(allow))
        } else if let Some(rest) = name.strip_prefix("KEYGATE_") {
            if NOT_OVERRIDES.contains(&name.as_str()) || name.starts_with("KEYGATE_TEST_") {
                continue;
            }
            let lower = rest.to_ascii_lowercase();
            // Section names may contain '_' (rate_limit): match section and key whole.
            let Some(&(section, field, default)) = known.iter().find(|(section, field, _)| {
                lower
                    .strip_prefix(section)
                    .and_then(|r| r.strip_prefix('_'))
                    == Some(field)
            }) else {
                let names: Vec<String> = known
                    .iter()
                    .map(|(s, f, _)| format!("KEYGATE_{s}_{f}").to_ascii_uppercase())
                    .collect();
                let hint = match nearest(&name, names.iter().map(String::as_str)) {
                    Some(near) => format!("did you mean {near}?"),
                    None => "expected KEYGATE_<SECTION>_<KEY> for a key of gateway.toml, \
                             e.g. KEYGATE_UPSTREAM_URL"
                        .to_owned(),
                };
                return Err(ConfigError::Unknown {
                    what: format!("environment variable {name}"),
                    hint,
                });
            };
            let value = env_value(&raw, default).ok_or_else(|| ConfigError::Type {
                key: format!("{section}.{field}"),
                value: format!("{raw:?}"),
                from: format!(" (from {name})"),
                expected: env_expected(default).to_owned(),
            })?;
            (section, field, value)
        } else {
            continue;
        };
        let entry = table
            .entry(section)
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if let toml::Value::Table(section_table) = entry {
            section_table.insert(field.to_owned(), value);
        }
        from_env.insert(format!("{section}.{field}"), name);
    }
    Ok(from_env)
}

/// `CORS_ALLOWED_ORIGIN_REGEXES`: patterns separated by commas, except those inside a group,
/// a `{m,n}` repetition or a `[...]` class, or escaped.
fn split_patterns(value: &str) -> Vec<String> {
    let mut patterns = Vec::new();
    let mut current = String::new();
    let (mut depth, mut in_class, mut escaped) = (0usize, false, false);
    for c in value.chars() {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '[' if !in_class => in_class = true,
            ']' if in_class => in_class = false,
            '(' | '{' if !in_class => depth += 1,
            ')' | '}' if !in_class => depth = depth.saturating_sub(1),
            ',' if depth == 0 && !in_class => {
                patterns.push(std::mem::take(&mut current));
                continue;
            }
            _ => {}
        }
        current.push(c);
    }
    patterns.push(current);
    patterns
        .into_iter()
        .map(|p| p.trim().to_owned())
        .filter(|p| !p.is_empty())
        .collect()
}

/// An environment variable's text as a value of the type of `default` (the key's default), or
/// `None` when it is not one.
fn env_value(raw: &str, default: &toml::Value) -> Option<toml::Value> {
    use toml::Value;
    let trimmed = raw.trim();
    match default {
        // A string key takes the text as it is; a quoted TOML string is unquoted.
        Value::String(_) => Some(Value::String(match toml_value(trimmed) {
            Some(Value::String(s)) if trimmed.starts_with(['"', '\'']) => s,
            _ => raw.to_owned(),
        })),
        Value::Integer(_) => trimmed.parse().ok().map(Value::Integer),
        Value::Float(_) => trimmed.parse().ok().map(Value::Float),
        Value::Boolean(_) => match trimmed.to_ascii_lowercase().as_str() {
            "true" => Some(Value::Boolean(true)),
            "false" => Some(Value::Boolean(false)),
            _ => None,
        },
        Value::Array(items) => Some(list_value(raw, items.first())),
        Value::Table(_) => toml_value(trimmed).filter(Value::is_table),
        Value::Datetime(_) => toml_value(trimmed),
    }
}

/// A list: a TOML array (`["a", "b"]`), or comma-separated items (`a, b`), each read as TOML
/// when the list's items are not strings.
fn list_value(raw: &str, item: Option<&toml::Value>) -> toml::Value {
    let trimmed = raw.trim();
    if trimmed.starts_with('[')
        && let Some(array) = toml_value(trimmed).filter(toml::Value::is_array)
    {
        return array;
    }
    let typed = item.is_some_and(|i| !i.is_str());
    toml::Value::Array(
        trimmed
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| {
                typed
                    .then(|| toml_value(s))
                    .flatten()
                    .unwrap_or_else(|| toml::Value::String(s.to_owned()))
            })
            .collect(),
    )
}

/// `raw` parsed as one TOML value.
fn toml_value(raw: &str) -> Option<toml::Value> {
    format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
}

/// What an environment variable for a key with this default must look like.
fn env_expected(default: &toml::Value) -> &'static str {
    match default {
        toml::Value::Integer(_) => "a whole number",
        toml::Value::Float(_) => "a number",
        toml::Value::Boolean(_) => "true or false",
        toml::Value::Table(_) => "a TOML inline table such as { \"/api/\" = 1048576 }",
        _ => "a value of this key's type",
    }
}

/// Keys whose values may hold a secret (a password in a Redis URL, the identity secret).
const SECRET_KEYS: [&str; 3] = [
    "store.url",
    "store.cluster_nodes",
    "upstream.identity_secret",
];

/// The table as a [`FileConfig`]. When that fails, each key is tried alone to name the one to
/// blame, with its value and its type in words.
fn deserialize(
    table: toml::Table,
    defaults: &toml::Table,
    from_env: &BTreeMap<String, String>,
    origin: &str,
) -> Result<FileConfig, ConfigError> {
    let whole = match toml::Value::Table(table.clone()).try_into::<FileConfig>() {
        Ok(config) => {
            return Ok(FileConfig {
                from_env: from_env.clone(),
                ..config
            });
        }
        Err(e) => e,
    };
    for (section, fields) in &table {
        let Some(fields) = fields.as_table() else {
            continue;
        };
        for (field, value) in fields {
            let mut alone = toml::Table::new();
            alone.insert(
                section.clone(),
                toml::Value::Table(toml::Table::from_iter([(field.clone(), value.clone())])),
            );
            let Err(e) = toml::Value::Table(alone).try_into::<FileConfig>() else {
                continue;
            };
            let key = format!("{section}.{field}");
            let default = defaults.get(section).and_then(|s| s.get(field));
            // A secret is not shown, even one of the wrong type.
            let secret = SECRET_KEYS.contains(&key.as_str());
            return Err(ConfigError::Type {
                from: from_env
                    .get(&key)
                    .map(|name| format!(" (from {name})"))
                    .unwrap_or_default(),
                key,
                value: if secret {
                    "***".to_owned()
                } else {
                    value.to_string()
                },
                expected: expected_type(e.message(), default),
            });
        }
    }
    Err(ConfigError::Parse {
        origin: format!("in {origin}"),
        message: whole.message().replace('\n', "; "),
    })
}

/// serde's "invalid type: ..., expected u16" in words: "a whole number from 0 to 65535".
fn expected_type(message: &str, default: Option<&toml::Value>) -> String {
    let serde = message
        .rsplit_once(", expected ")
        .map_or(message, |(_, e)| e.trim());
    let words = match serde {
        "u8" => "a whole number from 0 to 255",
        "u16" => "a whole number from 0 to 65535",
        "u32" => "a whole number from 0 to 4294967295",
        "u64" | "usize" => "a whole number, 0 or more",
        "i8" | "i16" | "i32" | "i64" | "isize" => "a whole number",
        "f32" | "f64" => "a number",
        "a boolean" => "true or false",
        "a string" => "a string (in quotes)",
        "a sequence" => "a list such as [\"a\", \"b\"]",
        "a map" => "a table such as { \"/api/\" = 1048576 }",
        other => other,
    };
    match default {
        Some(toml::Value::Array(_)) if serde != "a sequence" => {
            format!("a list in which each item is {words}")
        }
        Some(toml::Value::Table(_)) if serde != "a map" => {
            format!("a table in which each value is {words}")
        }
        _ => words.to_owned(),
    }
}

fn check_redis_url(key: &'static str, value: &str) -> Result<(), ConfigError> {
    const EXPECTED: &str = "a redis:// or rediss:// URL such as \"redis://127.0.0.1:6379/0\"";
    if !(value.starts_with("redis://") || value.starts_with("rediss://")) {
        return Err(invalid(key, redact_url(value), EXPECTED));
    }
    redis::Client::open(value)
        .map(|_| ())
        .map_err(|_| invalid(key, redact_url(value), EXPECTED))
}

/// What a PEM file must hold.
#[derive(Clone, Copy)]
enum PemKind {
    Certificates,
    PrivateKey,
}

/// The contents of the PEM file at `path` (`None` when unset), checked to hold `kind`.
fn pem_file(key: &'static str, path: &str, kind: PemKind) -> Result<Option<Vec<u8>>, ConfigError> {
    use rustls_pki_types::pem::PemObject as _;
    if path.is_empty() {
        return Ok(None);
    }
    let expected = match kind {
        PemKind::Certificates => "a readable PEM file with at least one certificate",
        PemKind::PrivateKey => "a readable PEM file with a private key",
    };
    // A regular file of sensible size: not a FIFO that blocks, nor /dev/zero that never ends.
    const MAX_PEM_BYTES: u64 = 1 << 20;
    let meta =
        std::fs::metadata(path).map_err(|e| invalid(key, format!("{path} ({e})"), expected))?;
    if !meta.is_file() || meta.len() > MAX_PEM_BYTES {
        return Err(invalid(key, path, expected));
    }
    let bytes = std::fs::read(path).map_err(|e| invalid(key, format!("{path} ({e})"), expected))?;
    let ok = match kind {
        PemKind::Certificates => {
            let certs: Result<Vec<_>, _> =
                rustls_pki_types::CertificateDer::pem_slice_iter(&bytes).collect();
            certs.is_ok_and(|c| !c.is_empty())
        }
        PemKind::PrivateKey => rustls_pki_types::PrivateKeyDer::from_pem_slice(&bytes).is_ok(),
    };
    if !ok {
        return Err(invalid(key, path, expected));
    }
    Ok(Some(bytes))
}

/// `scheme://user:***@host...`: the password of a URL, hidden.
pub fn redact_url(url: &str) -> String {
    // Where the URL parses, the password is exactly what a URL parser (and so the Redis client)
    // takes for one. (A split on the text once moved the host into the userinfo for a URL with a
    // '#' in it; found by the config_load fuzz target.)
    if let Ok(mut parsed) = url::Url::parse(url) {
        if parsed.password().is_some() {
            let _ = parsed.set_password(Some("***"));
        }
        return parsed.into();
    }
    // Where it does not (an error message about that very URL), hide everything up to the last
    // '@' after the scheme: whatever the password was meant to be is in there.
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    match rest.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) if !user.contains(['/', '?', '#']) => {
                format!("{scheme}://{user}:***@{host}")
            }
            _ => format!("{scheme}://***@{host}"),
        },
        None => url.to_owned(),
    }
}

/// The longest duration any setting takes. Far past any sensible timeout, TTL or interval, and it
/// keeps every deadline the gateway computes (`now + ttl + stale_if_error`, timers) far from the
/// overflow that panics `Instant` arithmetic: an unbounded value such as "300000000000y" parses,
/// and adding it to an `Instant` panics.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 86_400);

/// Parses "250ms", "30s", "5m", "7d", at most [`MAX_DURATION`].
pub fn parse_duration(key: &'static str, value: &str) -> Result<Duration, ConfigError> {
    humantime::parse_duration(value.trim())
        .ok()
        .filter(|d| *d <= MAX_DURATION)
        .ok_or_else(|| {
            invalid(
                key,
                value,
                "a duration such as \"250ms\", \"30s\", \"5m\" or \"7d\", at most 365d",
            )
        })
}

/// [`parse_duration`], refusing zero: for timeouts and intervals where no time at all would fail
/// every request (a 0 s handshake timeout refuses every TLS client) or spin.
fn positive_duration(key: &'static str, value: &str) -> Result<Duration, ConfigError> {
    let d = parse_duration(key, value)?;
    if d.is_zero() {
        return Err(invalid(key, value, "a duration above 0"));
    }
    Ok(d)
}

/// `tls.watch_interval`: 0 (SIGHUP only) or at least 100 ms, not a busy loop over the files.
fn watch_interval(value: &str) -> Result<Duration, ConfigError> {
    let every = parse_duration("tls.watch_interval", value)?;
    if !every.is_zero() && every < Duration::from_millis(100) {
        return Err(invalid(
            "tls.watch_interval",
            value,
            "\"0s\" (off) or at least \"100ms\"",
        ));
    }
    Ok(every)
}

fn parse_addr(key: &'static str, value: &str) -> Result<SocketAddr, ConfigError> {
    value.parse().map_err(|_| {
        invalid(
            key,
            value,
            "a socket address such as \"0.0.0.0:443\" or \"[::]:443\"",
        )
    })
}

fn optional_addr(key: &'static str, value: &str) -> Result<Option<SocketAddr>, ConfigError> {
    if value.trim().is_empty() {
        Ok(None)
    } else {
        parse_addr(key, value).map(Some)
    }
}

fn header_name(key: &'static str, value: &str) -> Result<HeaderName, ConfigError> {
    HeaderName::from_bytes(value.trim().as_bytes())
        .map_err(|_| invalid(key, value, "an HTTP header name such as \"X-API-Key\""))
}

fn optional_header_value(
    key: &'static str,
    value: &str,
) -> Result<Option<HeaderValue>, ConfigError> {
    if value.is_empty() {
        return Ok(None);
    }
    HeaderValue::from_str(value)
        .map(Some)
        .map_err(|_| invalid(key, value, "a header value of visible ASCII characters"))
}

/// The smallest `server.max_header_bytes`: hyper's HTTP/1 read buffer is at least 8 KiB.
const MIN_HEADER_BYTES: usize = 8 * 1024;

/// The most `server.workers`.
const MAX_WORKERS: usize = 1024;

impl ServerSection {
    fn validate(&self) -> Result<Server, ConfigError> {
        let https_listen = parse_addr("server.https_listen", &self.https_listen)?;
        if self.public_host.trim().is_empty()
            || self.public_host.contains(['/', '?', '#', '@', ' '])
            || Uri::try_from(format!("https://{}/", self.public_host)).is_err()
        {
            return Err(invalid(
                "server.public_host",
                &self.public_host,
                "a host name or IP address (no scheme, port or path), e.g. \"api.example.com\"",
            ));
        }
        if self.max_connections == 0 {
            return Err(invalid("server.max_connections", 0, "a number above 0"));
        }
        let trusted_proxies = self
            .trusted_proxies
            .iter()
            .map(|s| {
                s.parse::<IpNet>()
                    .or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from))
                    .map_err(|_| {
                        invalid(
                            "server.trusted_proxies",
                            s,
                            "CIDRs such as \"10.0.0.0/8\" or IPs",
                        )
                    })
            })
            .collect::<Result<_, _>>()?;
        Ok(Server {
            https_listen,
            http_listen: optional_addr("server.http_listen", &self.http_listen)?,
            http_mode: match self.http_mode.trim() {
                "redirect" => HttpMode::Redirect,
                "serve" => HttpMode::Serve,
                other => {
                    return Err(invalid(
                        "server.http_mode",
                        other,
                        "\"redirect\" (308 to HTTPS) or \"serve\" (the pipeline over plain HTTP)",
                    ));
                }
            },
            admin_listen: optional_addr("server.admin_listen", &self.admin_listen)?,
            public_host: self.public_host.trim().to_owned(),
            public_port: if self.public_port == 0 {
                https_listen.port()
            } else {
                self.public_port
            },
            handshake_timeout: positive_duration(
                "server.handshake_timeout",
                &self.handshake_timeout,
            )?,
            header_read_timeout: positive_duration(
                "server.header_read_timeout",
                &self.header_read_timeout,
            )?,
            body_read_timeout: positive_duration(
                "server.body_read_timeout",
                &self.body_read_timeout,
            )?,
            shutdown_grace: parse_duration("server.shutdown_grace", &self.shutdown_grace)?,
            max_connections: self.max_connections,
            trusted_proxies,
            max_headers: match self.max_headers {
                // An `http::HeaderMap` holds at most 32,768 fields (more is a panic).
                n @ 1..=10_000 => n,
                n => {
                    return Err(invalid(
                        "server.max_headers",
                        n,
                        "from 1 to 10000 header fields",
                    ));
                }
            },
            // hyper's HTTP/1 read buffer cannot be smaller than 8 KiB: a smaller setting would
            // be shown by check-config but not enforced.
            max_header_bytes: match self.max_header_bytes {
                n @ MIN_HEADER_BYTES.. => n,
                n => {
                    return Err(invalid(
                        "server.max_header_bytes",
                        n,
                        "at least 8192 bytes (the smallest head the HTTP/1 server reads)",
                    ));
                }
            },
            max_uri_bytes: match self.max_uri_bytes {
                0 => return Err(invalid("server.max_uri_bytes", 0, "a number above 0")),
                n => n,
            },
            max_body_bytes: (self.max_body_bytes > 0).then_some(self.max_body_bytes),
            max_body_bytes_by_prefix: {
                let mut routes = Vec::with_capacity(self.max_body_bytes_by_prefix.len());
                for (prefix, &limit) in &self.max_body_bytes_by_prefix {
                    if !prefix.starts_with('/') {
                        return Err(invalid(
                            "server.max_body_bytes_by_prefix",
                            prefix,
                            "path prefixes starting with '/', e.g. { \"/api/\" = 1048576 }",
                        ));
                    }
                    routes.push((prefix.clone(), (limit > 0).then_some(limit)));
                }
                routes.sort_by_key(|(prefix, _)| std::cmp::Reverse(prefix.len()));
                routes
            },
            h2_max_concurrent_streams: match self.h2_max_concurrent_streams {
                0 => {
                    return Err(invalid(
                        "server.h2_max_concurrent_streams",
                        0,
                        "a number above 0",
                    ));
                }
                n => n,
            },
            workers: match self.workers {
                0 => std::thread::available_parallelism().map_or(1, usize::from),
                n @ 1..=MAX_WORKERS => n,
                n => {
                    return Err(invalid(
                        "server.workers",
                        n,
                        "0 (one per CPU) or a number of threads up to 1024",
                    ));
                }
            },
        })
    }
}

impl TlsSection {
    fn validate(&self) -> Result<Tls, ConfigError> {
        for (key, value) in [("tls.cert", &self.cert), ("tls.key", &self.key)] {
            if value.trim().is_empty() {
                return Err(invalid(key, value, "a PEM file path"));
            }
        }
        Ok(Tls {
            cert: PathBuf::from(&self.cert),
            key: PathBuf::from(&self.key),
            generate_dev_cert: self.generate_dev_cert,
            watch_interval: watch_interval(&self.watch_interval)?,
        })
    }
}

impl UpstreamSection {
    fn validate(&self) -> Result<Upstream, ConfigError> {
        const EXPECTED: &str =
            "an http:// or https:// URL with a host, e.g. \"http://127.0.0.1:8000\"";
        let url: Uri = self
            .url
            .parse()
            .map_err(|_| invalid("upstream.url", &self.url, EXPECTED))?;
        let https = match url.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => return Err(invalid("upstream.url", &self.url, EXPECTED)),
        };
        if url.host().is_none() || url.query().is_some() {
            return Err(invalid("upstream.url", &self.url, EXPECTED));
        }
        let file = |value: &str| (!value.trim().is_empty()).then(|| PathBuf::from(value.trim()));
        let ca_file = file(&self.tls_ca_file);
        let client_cert = match (file(&self.tls_cert_file), file(&self.tls_key_file)) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => None,
            (Some(_), None) => {
                return Err(invalid(
                    "upstream.tls_key_file",
                    "",
                    "the private key of upstream.tls_cert_file",
                ));
            }
            (None, Some(_)) => {
                return Err(invalid(
                    "upstream.tls_cert_file",
                    "",
                    "the certificate chain for upstream.tls_key_file",
                ));
            }
        };
        let tls = if https {
            let host = url.host().unwrap_or("").trim_matches(['[', ']']).to_owned();
            let server_name = rustls_pki_types::ServerName::try_from(host).map_err(|_| {
                invalid(
                    "upstream.url",
                    &self.url,
                    "an https:// URL whose host is a DNS name or an IP address its certificate \
                     can be checked against",
                )
            })?;
            Some(UpstreamTls {
                server_name,
                ca_file,
                client_cert,
            })
        } else {
            if ca_file.is_some() || client_cert.is_some() {
                return Err(invalid(
                    "upstream.url",
                    &self.url,
                    "an https:// URL: upstream.tls_ca_file, tls_cert_file and tls_key_file are \
                     for TLS to the upstream",
                ));
            }
            None
        };
        if self.pool_max_idle == 0 {
            return Err(invalid("upstream.pool_max_idle", 0, "a number above 0"));
        }
        Ok(Upstream {
            url,
            connect_timeout: positive_duration("upstream.connect_timeout", &self.connect_timeout)?,
            response_timeout: positive_duration(
                "upstream.response_timeout",
                &self.response_timeout,
            )?,
            pool_max_idle: self.pool_max_idle,
            pool_idle_timeout: parse_duration(
                "upstream.pool_idle_timeout",
                &self.pool_idle_timeout,
            )?,
            preserve_host: self.preserve_host,
            tls,
            identity_secrets: self.identity_secrets()?,
        })
    }

    /// The identity secrets from `identity_secret` or `identity_secret_file` (not both). Errors
    /// name the setting and what is wrong, never a secret.
    fn identity_secrets(&self) -> Result<Vec<crate::identity::IdentitySecret>, ConfigError> {
        const EXPECTED: &str = "one or two secrets of at least 32 bytes, separated by a comma \
             or newline (e.g. the output of `openssl rand -hex 32`)";
        let file = self.identity_secret_file.trim();
        match (self.identity_secret.is_empty(), file.is_empty()) {
            (true, true) => Ok(Vec::new()),
            (false, false) => Err(invalid(
                "upstream.identity_secret_file",
                file,
                "either upstream.identity_secret or upstream.identity_secret_file, not both",
            )),
            (false, true) => crate::identity::IdentitySecret::parse_list(&self.identity_secret)
                .map_err(|why| ConfigError::Invalid {
                    key: "upstream.identity_secret",
                    value: format!("*** ({why})"),
                    from: String::new(),
                    expected: EXPECTED.into(),
                }),
            (true, false) => {
                let text = std::fs::read_to_string(file).map_err(|e| ConfigError::Invalid {
                    key: "upstream.identity_secret_file",
                    value: format!("{file} ({e})"),
                    from: String::new(),
                    expected: "a readable file holding the identity secret(s)".into(),
                })?;
                crate::identity::IdentitySecret::parse_list(&text).map_err(|why| {
                    ConfigError::Invalid {
                        key: "upstream.identity_secret_file",
                        value: format!("{file} ({why})"),
                        from: String::new(),
                        expected: EXPECTED.into(),
                    }
                })
            }
        }
    }
}

impl AuthSection {
    fn validate(&self) -> Result<Auth, ConfigError> {
        let key_header = header_name("auth.key_header", &self.key_header)?;
        if key_header == http::header::AUTHORIZATION {
            return Err(invalid(
                "auth.key_header",
                &self.key_header,
                "a dedicated header; Authorization is covered by auth.bearer_fallback",
            ));
        }
        for p in &self.public_paths {
            if !p.starts_with('/') {
                return Err(invalid(
                    "auth.public_paths",
                    p,
                    "path prefixes starting with '/'",
                ));
            }
        }
        if self.realm.contains(['"', '\\']) || HeaderValue::from_str(&self.realm).is_err() {
            return Err(invalid(
                "auth.realm",
                &self.realm,
                "printable ASCII without quotes",
            ));
        }
        let identity = [
            ("auth.id_header", &self.id_header),
            ("auth.name_header", &self.name_header),
            ("auth.owner_header", &self.owner_header),
            ("auth.signature_header", &self.signature_header),
        ];
        let mut names: Vec<HeaderName> = Vec::with_capacity(identity.len());
        for (key, value) in identity {
            let name = header_name(key, value)?;
            if name == key_header || name == http::header::AUTHORIZATION || names.contains(&name) {
                return Err(invalid(
                    key,
                    value,
                    "a header name of its own, not the key header nor another identity header",
                ));
            }
            names.push(name);
        }
        let [id_header, name_header, owner_header, signature_header] =
            <[HeaderName; 4]>::try_from(names).expect("four identity headers");
        Ok(Auth {
            key_header,
            bearer_fallback: self.bearer_fallback,
            forward_credentials: self.forward_credentials,
            public_paths: self.public_paths.clone(),
            id_header,
            name_header,
            owner_header,
            signature_header,
            realm: self.realm.clone(),
        })
    }
}

impl StoreSection {
    fn redis_prefix(&self) -> Result<String, ConfigError> {
        let p = &self.key_prefix;
        if p.is_empty() || p.contains(['{', '}', ' ', ':']) {
            return Err(invalid(
                "store.key_prefix",
                p,
                "a non-empty name without braces, spaces or ':'",
            ));
        }
        Ok(p.clone())
    }

    /// The Redis settings for `target`, whose URLs are `urls` (key, URL); `confirm_default`
    /// replicas confirm a change unless `confirm_replicas` says otherwise.
    fn redis(
        &self,
        target: crate::store::redis::Target,
        urls: &[(&'static str, &String)],
        confirm_default: u32,
    ) -> Result<Backend, ConfigError> {
        let secure = |u: &str| u.starts_with("rediss://");
        for (key, url) in urls {
            let insecure = url::Url::parse(url)
                .ok()
                .is_some_and(|u| u.fragment() == Some("insecure"));
            if insecure && !self.tls_allow_insecure {
                return Err(invalid(
                    key,
                    redact_url(url),
                    "a URL without #insecure, which turns certificate verification off: trust a private CA with store.tls_ca_file, or set store.tls_allow_insecure = true to accept any certificate",
                ));
            }
        }
        let files = [
            ("store.tls_ca_file", &self.tls_ca_file),
            ("store.tls_cert_file", &self.tls_cert_file),
            ("store.tls_key_file", &self.tls_key_file),
        ];
        if let Some((key, path)) = files.iter().find(|(_, p)| !p.is_empty())
            && !urls.iter().any(|(_, u)| secure(u))
        {
            return Err(invalid(
                key,
                path,
                "no TLS file unless the store's URLs are rediss:// (TLS)",
            ));
        }
        if self.tls_cert_file.is_empty() != self.tls_key_file.is_empty() {
            let (key, value) = if self.tls_cert_file.is_empty() {
                ("store.tls_cert_file", &self.tls_cert_file)
            } else {
                ("store.tls_key_file", &self.tls_key_file)
            };
            return Err(invalid(
                key,
                value,
                "both store.tls_cert_file and store.tls_key_file (a client certificate and its key), or neither",
            ));
        }
        let ca = pem_file(
            "store.tls_ca_file",
            &self.tls_ca_file,
            PemKind::Certificates,
        )?;
        let cert = pem_file(
            "store.tls_cert_file",
            &self.tls_cert_file,
            PemKind::Certificates,
        )?;
        let key = pem_file(
            "store.tls_key_file",
            &self.tls_key_file,
            PemKind::PrivateKey,
        )?;
        Ok(Backend::Redis(crate::store::redis::Settings {
            target,
            prefix: self.redis_prefix()?,
            tls: crate::store::redis::Tls {
                ca,
                client: cert.zip(key),
            },
            confirm_replicas: self.confirm_replicas.unwrap_or(confirm_default),
            confirm_timeout: {
                let d = positive_duration("store.confirm_timeout", &self.confirm_timeout)?;
                if d > Duration::from_secs(60) {
                    return Err(invalid(
                        "store.confirm_timeout",
                        &self.confirm_timeout,
                        "between 1ms and 60s",
                    ));
                }
                d
            },
        }))
    }

    fn validate(&self) -> Result<Store, ConfigError> {
        let backend = match self.backend.as_str() {
            "sqlite" => {
                if self.path.trim().is_empty() {
                    return Err(invalid("store.path", &self.path, "a database file path"));
                }
                Backend::Sqlite {
                    path: PathBuf::from(&self.path),
                }
            }
            "redis" => {
                check_redis_url("store.url", &self.url)?;
                self.redis(
                    crate::store::redis::Target::Single(self.url.clone()),
                    &[("store.url", &self.url)],
                    0,
                )?
            }
            "redis-cluster" => {
                if self.cluster_nodes.is_empty() {
                    return Err(invalid(
                        "store.cluster_nodes",
                        "[]",
                        "at least one redis:// seed node for backend \"redis-cluster\"",
                    ));
                }
                let mut urls = Vec::new();
                for node in &self.cluster_nodes {
                    check_redis_url("store.cluster_nodes", node)?;
                    urls.push(("store.cluster_nodes", node));
                }
                self.redis(
                    crate::store::redis::Target::Cluster(self.cluster_nodes.clone()),
                    &urls,
                    0,
                )?
            }
            "redis-sentinel" => {
                if self.sentinels.is_empty() {
                    return Err(invalid(
                        "store.sentinels",
                        "[]",
                        "at least one sentinel URL such as \"redis://10.0.0.1:26379\" for backend \"redis-sentinel\"",
                    ));
                }
                let mut urls = vec![("store.url", &self.url)];
                let mut auth = None;
                for sentinel in &self.sentinels {
                    check_redis_url("store.sentinels", sentinel)?;
                    let parsed = url::Url::parse(sentinel).ok();
                    let this = parsed
                        .as_ref()
                        .map(|u| (u.username().to_owned(), u.password().map(str::to_owned)));
                    if auth.get_or_insert_with(|| this.clone()) != &this {
                        return Err(invalid(
                            "store.sentinels",
                            redact_url(sentinel),
                            "the same user and password in every sentinel URL (the sentinels' own credentials)",
                        ));
                    }
                    urls.push(("store.sentinels", sentinel));
                }
                check_redis_url("store.url", &self.url)?;
                let name = self.master_name.trim();
                if name.is_empty() || name.contains(char::is_whitespace) {
                    return Err(invalid(
                        "store.master_name",
                        &self.master_name,
                        "the name the sentinels monitor the primary under (`sentinel monitor <name> ...`), e.g. \"mymaster\"",
                    ));
                }
                self.redis(
                    crate::store::redis::Target::Sentinel {
                        sentinels: self.sentinels.clone(),
                        master: name.to_owned(),
                        node: self.url.clone(),
                    },
                    &urls,
                    1,
                )?
            }
            other => {
                return Err(invalid(
                    "store.backend",
                    other,
                    "\"sqlite\", \"redis\", \"redis-sentinel\" or \"redis-cluster\"",
                ));
            }
        };
        if self.cache_capacity == 0 {
            return Err(invalid("store.cache_capacity", 0, "a number above 0"));
        }
        let poll_interval = parse_duration("store.poll_interval", &self.poll_interval)?;
        if poll_interval.is_zero() || poll_interval > Duration::from_secs(60) {
            return Err(invalid(
                "store.poll_interval",
                &self.poll_interval,
                "between 1ms and 60s",
            ));
        }
        let usage_flush_interval =
            positive_duration("store.usage_flush_interval", &self.usage_flush_interval)?;
        let timeout = positive_duration("store.timeout", &self.timeout)?;
        Ok(Store {
            backend,
            cache_capacity: self.cache_capacity,
            positive_ttl: parse_duration("store.positive_ttl", &self.positive_ttl)?,
            negative_ttl: parse_duration("store.negative_ttl", &self.negative_ttl)?,
            stale_if_error: parse_duration("store.stale_if_error", &self.stale_if_error)?,
            poll_interval,
            usage_flush_interval,
            timeout,
        })
    }
}

impl CorsSection {
    fn validate(&self) -> Result<Cors, ConfigError> {
        const ORIGIN: &str = "exact origins such as \"https://app.example.com\" (scheme://host[:port], no path, no \"*\")";
        let allowed_origins = self
            .allowed_origins
            .iter()
            .map(|o| {
                let o = o.trim().trim_end_matches('/');
                let uri: Uri = o
                    .parse()
                    .map_err(|_| invalid("cors.allowed_origins", o, ORIGIN))?;
                let ok = matches!(uri.scheme_str(), Some("http" | "https"))
                    && uri.host().is_some()
                    && uri
                        .path_and_query()
                        .is_none_or(|p| p.as_str().is_empty() || p == "/");
                if !ok || o.contains('*') {
                    return Err(invalid("cors.allowed_origins", o, ORIGIN));
                }
                // A browser sends the origin serialised: scheme and host in lowercase, no
                // default port. Any other spelling would never match it.
                let serialised = serialised_origin(&uri);
                if serialised != o {
                    return Err(invalid(
                        "cors.allowed_origins",
                        o,
                        format!(
                            "{serialised:?}, as browsers send it (scheme and host in lowercase, \
                             no default port)"
                        ),
                    ));
                }
                HeaderValue::from_str(o).map_err(|_| invalid("cors.allowed_origins", o, ORIGIN))
            })
            .collect::<Result<_, _>>()?;
        let (allowed_origin_patterns, unanchored_origin_patterns) = self.origin_patterns()?;
        let allowed_methods = self
            .allowed_methods
            .iter()
            .map(|m| {
                http::Method::from_bytes(m.trim().to_ascii_uppercase().as_bytes()).map_err(|_| {
                    invalid("cors.allowed_methods", m, "HTTP methods such as \"POST\"")
                })
            })
            .collect::<Result<_, _>>()?;
        let allowed_headers = self
            .allowed_headers
            .iter()
            .map(|h| header_name("cors.allowed_headers", h))
            .collect::<Result<_, _>>()?;
        let expose_headers = self
            .expose_headers
            .iter()
            .map(|h| header_name("cors.expose_headers", h))
            .collect::<Result<_, _>>()?;
        Ok(Cors {
            allowed_origins,
            allowed_origin_patterns,
            unanchored_origin_patterns,
            allowed_methods,
            allowed_headers,
            expose_headers,
            allow_credentials: self.allow_credentials,
            max_age: self.max_age,
        })
    }
}

/// An origin as a browser serialises it (RFC 6454): lowercase scheme and host, the port only
/// when it is not the scheme's default.
fn serialised_origin(uri: &Uri) -> String {
    let scheme = uri.scheme_str().unwrap_or("").to_ascii_lowercase();
    let host = uri.host().unwrap_or("").to_ascii_lowercase();
    match (scheme.as_str(), uri.port_u16()) {
        ("http", Some(80)) | ("https", Some(443)) | (_, None) => format!("{scheme}://{host}"),
        (_, Some(port)) => format!("{scheme}://{host}:{port}"),
    }
}

impl CorsSection {
    /// The origin patterns as one set, each anchored at the start as Python's `re.match` does,
    /// and those a match need not reach the end of.
    fn origin_patterns(&self) -> Result<(Option<regex::RegexSet>, Vec<String>), ConfigError> {
        const EXPECTED: &str = "regular expressions such as \"^https://[a-z0-9-]+\\.vercel\\.app$\" \
             (Rust regex syntax: no look-around or back-references)";
        let mut anchored = Vec::with_capacity(self.allowed_origin_patterns.len());
        let mut unanchored = Vec::new();
        for pattern in &self.allowed_origin_patterns {
            let rust = python_to_rust_regex(pattern);
            let hir = regex_syntax::Parser::new()
                .parse(&rust)
                .map_err(|_| invalid("cors.allowed_origin_patterns", pattern, EXPECTED))?;
            // Python's `$` also matches before a final newline; an origin holds none.
            if !hir
                .properties()
                .look_set_suffix()
                .contains(regex_syntax::hir::Look::End)
            {
                unanchored.push(pattern.clone());
            }
            anchored.push(format!("\\A(?:{rust})"));
        }
        if anchored.is_empty() {
            return Ok((None, unanchored));
        }
        let set = regex::RegexSet::new(&anchored).map_err(|e| {
            let pattern = match &e {
                regex::Error::CompiledTooBig(_) => "(all of them together)",
                _ => "(one of them)",
            };
            invalid("cors.allowed_origin_patterns", pattern, EXPECTED)
        })?;
        Ok((Some(set), unanchored))
    }
}

/// Python's `\Z` (end of text) in Rust's spelling, `\z`; the rest of the syntax the two share.
fn python_to_rust_regex(pattern: &str) -> String {
    let mut out = String::with_capacity(pattern.len());
    let mut escaped = false;
    for c in pattern.chars() {
        if escaped {
            out.push(if c == 'Z' { 'z' } else { c });
            escaped = false;
        } else {
            escaped = c == '\\';
            out.push(c);
        }
    }
    out
}

impl Cors {
    /// What the operator should hear about this policy: patterns that allow look-alike origins.
    pub fn warnings(&self) -> Vec<String> {
        self.unanchored_origin_patterns
            .iter()
            .map(|p| {
                format!(
                    "cors.allowed_origin_patterns: {p:?} does not end with '$', so it also allows \
                     any origin that merely starts like one it allows (e.g. \
                     https://app.example.com.evil.net); django-cors-headers matches it the same way"
                )
            })
            .collect()
    }
}

impl HeadersSection {
    fn validate(&self) -> Result<Headers, ConfigError> {
        Ok(Headers {
            strict_transport_security: optional_header_value(
                "headers.strict_transport_security",
                &self.strict_transport_security,
            )?,
            content_type_options: optional_header_value(
                "headers.content_type_options",
                &self.content_type_options,
            )?,
            frame_options: optional_header_value("headers.frame_options", &self.frame_options)?,
            referrer_policy: optional_header_value(
                "headers.referrer_policy",
                &self.referrer_policy,
            )?,
        })
    }
}

impl LoggingSection {
    fn validate(&self) -> Result<Logging, ConfigError> {
        let format = match self.format.as_str() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => return Err(invalid("logging.format", other, "\"text\" or \"json\"")),
        };
        if !log_filter_ok(&self.level) {
            return Err(invalid(
                "logging.level",
                &self.level,
                "a level (off, error, warn, info, debug, trace) or a filter of levels and \
                 TARGET=LEVEL such as \"keygate::access=off,info\"",
            ));
        }
        let rotation = match self.rotation.as_str() {
            "daily" => Rotation::Daily,
            "hourly" => Rotation::Hourly,
            "never" => Rotation::Never,
            other => {
                return Err(invalid(
                    "logging.rotation",
                    other,
                    "\"daily\", \"hourly\" or \"never\"",
                ));
            }
        };
        let path = |s: &str| (!s.trim().is_empty()).then(|| PathBuf::from(s));
        let file = path(&self.file);
        if file.as_ref().is_some_and(|f| f.file_name().is_none()) {
            return Err(invalid(
                "logging.file",
                &self.file,
                "a file path, e.g. \"/var/log/keygate/access.log\"",
            ));
        }
        Ok(Logging {
            format,
            level: self.level.clone(),
            file,
            rotation,
            max_files: self.max_files,
            audit_file: path(&self.audit_file),
        })
    }
}

/// Whether `filter` is a log filter whose every directive names a level: `info`,
/// `keygate::access=off,info`. A bare word such as `verbose` is a valid tracing directive (all
/// levels of a target named "verbose") that silences everything else, so it is refused.
fn log_filter_ok(filter: &str) -> bool {
    const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
    let is_level = |s: &str| LEVELS.iter().any(|l| l.eq_ignore_ascii_case(s.trim()));
    !filter.trim().is_empty()
        && filter
            .split(',')
            .all(|directive| match directive.rsplit_once('=') {
                None => is_level(directive),
                Some((target, level)) => !target.trim().is_empty() && is_level(level),
            })
        && tracing_subscriber::EnvFilter::try_new(filter).is_ok()
}

impl RateLimitSection {
    fn validate(&self) -> Result<RateLimit, ConfigError> {
        let rate = |key: &'static str, v: &str| {
            if v.trim().is_empty() {
                return Ok(None);
            }
            crate::ratelimit::Rate::parse(v).map(Some).map_err(|_| {
                invalid(
                    key,
                    v,
                    "COUNT/PERIOD such as \"600/min\", \"10/s\" or \"20/30s\", or \"\" for none",
                )
            })
        };
        Ok(RateLimit {
            per_key: rate("rate_limit.per_key", &self.per_key)?,
            failures_per_ip: rate("rate_limit.failures_per_ip", &self.failures_per_ip)?,
            shared_timeout: positive_duration("rate_limit.shared_timeout", &self.shared_timeout)?,
        })
    }
}

impl MetricsSection {
    fn validate(&self) -> Result<Metrics, ConfigError> {
        let b = &self.latency_buckets;
        if b.is_empty()
            || b.iter().any(|v| !v.is_finite() || *v <= 0.0)
            || b.windows(2).any(|w| w[0] >= w[1])
        {
            return Err(invalid(
                "metrics.latency_buckets",
                format!("{b:?}"),
                "a non-empty, strictly increasing list of positive seconds",
            ));
        }
        Ok(Metrics {
            latency_buckets: b.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn load(text: &str, pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        FileConfig::from_toml(text, "test", &env(pairs))?.validate()
    }

    #[test]
    fn defaults_are_valid() {
        let c = load("", &[]).unwrap();
        assert_eq!(c.server.https_listen.port(), 8443);
        assert_eq!(c.server.public_port, 8443);
        assert_eq!(c.cors.max_age, 86_400);
        assert!(!c.cors.allow_credentials);
        assert_eq!(c.auth.key_header, "x-api-key");
    }

    #[test]
    fn shipped_gateway_toml_is_valid() {
        let text = include_str!("../gateway.toml");
        load(text, &[]).unwrap();
    }

    #[test]
    fn env_overrides_fields_and_cors_origins() {
        let c = load(
            "[upstream]\nurl = \"http://127.0.0.1:1\"\n",
            &[
                ("KEYGATE_UPSTREAM_URL", "http://10.1.2.3:9000"),
                ("KEYGATE_SERVER_MAX_CONNECTIONS", "7"),
                ("KEYGATE_STORE_POSITIVE_TTL", "5s"),
                ("KEYGATE_RATE_LIMIT_PER_KEY", "10/s"),
                ("KEYGATE_CONFIG", "ignored.toml"),
                (
                    "CORS_ALLOWED_ORIGINS",
                    "https://a.example, https://b.example",
                ),
            ],
        )
        .unwrap();
        assert_eq!(c.upstream.url, "http://10.1.2.3:9000/");
        assert_eq!(c.server.max_connections, 7);
        assert_eq!(c.store.positive_ttl, Duration::from_secs(5));
        assert_eq!(c.rate_limit.per_key.map(|r| r.count), Some(10));
        assert_eq!(
            c.cors.allowed_origins,
            ["https://a.example", "https://b.example"]
        );
    }

    #[test]
    fn identity_secrets_come_from_the_environment_or_a_file() {
        let secret = "0123456789abcdef0123456789abcdef";
        let c = load("", &[("KEYGATE_UPSTREAM_IDENTITY_SECRET", secret)]).unwrap();
        assert_eq!(c.upstream.identity_secrets.len(), 1);
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("identity.secret");
        std::fs::write(&file, format!("{secret}\n{}\n", secret.to_uppercase())).unwrap();
        let text = format!("[upstream]\nidentity_secret_file = {:?}\n", file.display());
        assert_eq!(load(&text, &[]).unwrap().upstream.identity_secrets.len(), 2);
        assert!(load("", &[]).unwrap().upstream.identity_secrets.is_empty());

        let cases = [
            (
                text.clone(),
                vec![("KEYGATE_UPSTREAM_IDENTITY_SECRET", secret)],
                "not both",
            ),
            (
                String::new(),
                vec![("KEYGATE_UPSTREAM_IDENTITY_SECRET", "too-short")],
                "fewer than 32",
            ),
            (
                "[upstream]\nidentity_secret_file = \"/nonexistent/identity.secret\"\n".into(),
                vec![],
                "/nonexistent/identity.secret",
            ),
        ];
        for (text, env, needle) in cases {
            let err = load(&text, &env).unwrap_err().to_string();
            assert!(
                err.contains("upstream.identity_secret") && err.contains(needle),
                "{err}"
            );
            assert!(!err.contains(secret) && !err.contains("too-short"), "{err}");
        }
        // check-config never prints it.
        let file_config = FileConfig::from_toml(
            "",
            "test",
            &env(&[("KEYGATE_UPSTREAM_IDENTITY_SECRET", secret)]),
        )
        .unwrap();
        let shown = file_config.to_toml();
        assert!(
            !shown.contains(secret) && shown.contains("identity_secret = \"***\""),
            "{shown}"
        );
    }

    #[test]
    fn identity_headers_are_distinct() {
        let c = load("", &[]).unwrap();
        assert_eq!(c.auth.owner_header, "x-api-key-owner");
        assert_eq!(c.auth.signature_header, "x-keygate-signature");
        for text in [
            "[auth]\nowner_header = \"X-Api-Key-Id\"\n",
            "[auth]\nsignature_header = \"X-API-Key\"\n",
            "[auth]\nname_header = \"Authorization\"\n",
        ] {
            let err = load(text, &[]).unwrap_err().to_string();
            assert!(err.contains("auth.") && err.contains("of its own"), "{err}");
        }
    }

    #[test]
    fn django_cors_environment_names_are_read() {
        let c = load(
            "",
            &[
                (
                    "CORS_ALLOWED_ORIGIN_REGEXES",
                    r"^https://[a-z0-9-]{1,63}\.vercel\.app$, ^https://(a|b)\.example\.com$,^http://[0-9,]+$",
                ),
                ("CORS_ALLOW_CREDENTIALS", "True"),
                ("CORS_ALLOWED_ORIGINS", "https://app.example"),
            ],
        )
        .unwrap();
        let set = c.cors.allowed_origin_patterns.as_ref().unwrap();
        assert_eq!(
            set.patterns(),
            [
                r"\A(?:^https://[a-z0-9-]{1,63}\.vercel\.app$)",
                r"\A(?:^https://(a|b)\.example\.com$)",
                r"\A(?:^http://[0-9,]+$)",
            ]
        );
        assert!(c.cors.allow_credentials);
        assert!(c.cors.warnings().is_empty());
        for off in ["false", "0", "no", "False"] {
            let c = load(
                "[cors]\nallow_credentials = true\n",
                &[("CORS_ALLOW_CREDENTIALS", off)],
            )
            .unwrap();
            assert!(!c.cors.allow_credentials, "{off}");
        }
        let err = load("", &[("CORS_ALLOW_CREDENTIALS", "maybe")])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("CORS_ALLOW_CREDENTIALS")
                && err.contains("maybe")
                && err.contains("expected"),
            "{err}"
        );
    }

    #[test]
    fn origin_patterns_are_checked_and_unanchored_ones_named() {
        let c = load(
            "[cors]\nallowed_origin_patterns = ['https://.*\\.example\\.com', '^https://a\\.example\\Z', '(^https://b\\.example$)']\n",
            &[],
        )
        .unwrap();
        let warnings = c.cors.warnings();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].contains(r"https://.*\\.example\\.com"),
            "{warnings:?}"
        );
        for bad in [r"^https://(?=a)", r"^(a)\1$", r"^https://[a-"] {
            let text = format!("[cors]\nallowed_origin_patterns = ['{bad}']\n");
            let err = load(&text, &[]).unwrap_err().to_string();
            assert!(
                err.contains("cors.allowed_origin_patterns") && err.contains("expected"),
                "{err}"
            );
        }
    }

    #[test]
    fn unknown_keys_are_refused_with_the_nearest_name() {
        let err = load("[server]\nhttps_listn = \"x\"\n", &[])
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "invalid config: unknown key server.https_listn in test: did you mean server.https_listen?"
        );
        let err = load("[upstrem]\nurl = \"x\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("[upstrem]") && err.ends_with("did you mean [upstream]?"),
            "{err}"
        );
        let err = load("", &[("KEYGATE_AUTH_KEYHEADER", "x")])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("KEYGATE_AUTH_KEYHEADER")
                && err.ends_with("did you mean KEYGATE_AUTH_KEY_HEADER?"),
            "{err}"
        );
        // A misspelt section is no longer passed over in silence.
        let err = load("", &[("KEYGATE_UPSTREM_URL", "http://10.0.0.5:8000")])
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "invalid config: unknown environment variable KEYGATE_UPSTREM_URL: did you mean KEYGATE_UPSTREAM_URL?"
        );
        let err = load("", &[("KEYGATE_NOTHING_LIKE_IT_AT_ALL", "1")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("e.g. KEYGATE_UPSTREAM_URL"), "{err}");
        // Not overrides: the config file's path, the scripts' binary, contrib/django's secret
        // file, the tests' variables.
        load(
            "",
            &[
                ("KEYGATE_CONFIG", "x.toml"),
                ("KEYGATE_BIN", "target/release/keygate"),
                ("KEYGATE_IDENTITY_SECRET_FILE", "/srv/api/.identity.secret"),
                ("KEYGATE_TEST_VENV", "target/test-venv"),
            ],
        )
        .unwrap();
        // Other variables are none of keygate's business.
        load("", &[("PATH", "/usr/bin"), ("KEYGATEWAY", "x")]).unwrap();
    }

    #[test]
    fn type_errors_name_the_key_the_value_and_the_type() {
        type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str);
        let cases: [Case<'_>; 7] = [
            (
                "",
                &[("KEYGATE_SERVER_WORKERS", "abc")],
                "invalid config: server.workers = \"abc\" (from KEYGATE_SERVER_WORKERS): expected a whole number",
            ),
            (
                "",
                &[("KEYGATE_SERVER_PUBLIC_PORT", "70000")],
                "invalid config: server.public_port = 70000 (from KEYGATE_SERVER_PUBLIC_PORT): expected a whole number from 0 to 65535",
            ),
            (
                "[server]\npublic_port = 70000\n",
                &[],
                "invalid config: server.public_port = 70000: expected a whole number from 0 to 65535",
            ),
            (
                "",
                &[("KEYGATE_TLS_GENERATE_DEV_CERT", "yes")],
                "invalid config: tls.generate_dev_cert = \"yes\" (from KEYGATE_TLS_GENERATE_DEV_CERT): expected true or false",
            ),
            (
                "[server]\ntrusted_proxies = \"10.0.0.0/8\"\n",
                &[],
                "invalid config: server.trusted_proxies = \"10.0.0.0/8\": expected a list such as [\"a\", \"b\"]",
            ),
            (
                "[metrics]\nlatency_buckets = [0.1, \"x\"]\n",
                &[],
                "invalid config: metrics.latency_buckets = [0.1, \"x\"]: expected a list in which each item is a number",
            ),
            (
                "server = 1\n",
                &[],
                "invalid config: server = 1: expected a table: [server] and its keys",
            ),
        ];
        for (text, env, want) in cases {
            let err = load(text, env).unwrap_err().to_string();
            assert_eq!(err, want);
            assert!(!err.contains("--config"), "{err}");
        }
        // A secret of the wrong type is not shown.
        let err = load("[upstream]\nidentity_secret = 123456789\n", &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("invalid config: upstream.identity_secret = ***: expected a string")
                && !err.contains("123456789"),
            "{err}"
        );
        // A value refused by validation names the variable that set it.
        let err = load("", &[("KEYGATE_UPSTREAM_URL", "ftp://x")])
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with(
                "invalid config: upstream.url = \"ftp://x\" (from KEYGATE_UPSTREAM_URL): expected"
            ),
            "{err}"
        );
        let err = load("[upstream]\nurl = \"ftp://x\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(!err.contains("from"), "{err}");
        let err = load("", &[("KEYGATE_SERVER_TRUSTED_PROXIES", "10.0.0.0/33")])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("server.trusted_proxies") && err.contains("10.0.0.0/33"),
            "{err}"
        );
    }

    #[test]
    fn env_values_are_read_as_their_keys_type() {
        let c = load(
            "",
            &[
                (
                    "KEYGATE_SERVER_TRUSTED_PROXIES",
                    "10.0.0.0/8, 192.168.0.0/16",
                ),
                ("KEYGATE_METRICS_LATENCY_BUCKETS", "0.1, 1, 10"),
                ("KEYGATE_SERVER_PUBLIC_HOST", "1234"),
                ("KEYGATE_LOGGING_LEVEL", "\"warn\""),
                ("KEYGATE_TLS_GENERATE_DEV_CERT", "TRUE"),
                (
                    "KEYGATE_SERVER_MAX_BODY_BYTES_BY_PREFIX",
                    "{ \"/api/\" = 10 }",
                ),
                ("KEYGATE_AUTH_PUBLIC_PATHS", "[\"/static/\", \"/docs/\"]"),
            ],
        )
        .unwrap();
        assert_eq!(c.server.trusted_proxies.len(), 2);
        assert_eq!(c.metrics.latency_buckets, [0.1, 1.0, 10.0]);
        assert_eq!(c.server.public_host, "1234");
        assert_eq!(c.logging.level, "warn");
        assert!(c.tls.generate_dev_cert);
        assert_eq!(
            c.server.max_body_bytes_by_prefix,
            [("/api/".to_owned(), Some(10))]
        );
        assert_eq!(c.auth.public_paths, ["/static/", "/docs/"]);
    }

    #[test]
    fn toml_syntax_errors_are_one_line_with_the_place() {
        let err = load("[server]\nworkers = 2\n[tls\n", &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("invalid config: test line 3, column "),
            "{err}"
        );
        assert!(!err.contains('\n'), "{err}");
    }

    #[test]
    fn relative_paths_are_resolved_against_the_config_files_directory() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gateway.toml");
        std::fs::write(
            &path,
            "[store]\npath = \"data/keys.db\"\n[tls]\ncert = \"/etc/tls/c.pem\"\n\
             [logging]\naudit_file = \"audit.log\"\n",
        )
        .unwrap();
        let env = env(&[
            ("KEYGATE_TLS_KEY", "k.pem"),
            ("KEYGATE_UPSTREAM_URL", "https://10.0.0.5:8443"),
            ("KEYGATE_UPSTREAM_TLS_CA_FILE", "ca/upstream.pem"),
        ]);
        let file = FileConfig::load(&path, &env).unwrap();
        assert_eq!(
            Path::new(&file.upstream.tls_ca_file),
            dir.path().join("ca/upstream.pem")
        );
        let c = file.validate().unwrap();
        assert_eq!(c.source.as_deref(), Some(path.as_path()));
        assert_eq!(
            c.store.backend,
            Backend::Sqlite {
                path: dir.path().join("data/keys.db")
            }
        );
        assert_eq!(c.tls.cert, Path::new("/etc/tls/c.pem"));
        assert_eq!(c.tls.key, dir.path().join("k.pem"));
        assert_eq!(c.logging.audit_file, Some(dir.path().join("audit.log")));
        assert_eq!(c.logging.file, None);
        // check-config shows the paths that are used.
        assert!(
            file.to_toml()
                .contains(&dir.path().join("data/keys.db").display().to_string())
        );
        assert_eq!(
            c.store.backend.to_string(),
            format!("sqlite {}", dir.path().join("data/keys.db").display())
        );
    }

    #[test]
    fn values_that_would_be_changed_or_never_match_are_refused() {
        let cases = [
            (
                "[server]\nmax_header_bytes = 100\n",
                "server.max_header_bytes",
                "at least 8192",
            ),
            (
                "[server]\nmax_headers = 0\n",
                "server.max_headers",
                "from 1",
            ),
            (
                "[server]\nmax_uri_bytes = 0\n",
                "server.max_uri_bytes",
                "above 0",
            ),
            ("[server]\nworkers = 5000\n", "server.workers", "up to 1024"),
            (
                "[server]\nh2_max_concurrent_streams = 0\n",
                "server.h2_max_concurrent_streams",
                "above 0",
            ),
            (
                "[logging]\nlevel = \"verbose\"\n",
                "logging.level",
                "a level",
            ),
            ("[logging]\nlevel = \"\"\n", "logging.level", "a level"),
            (
                "[logging]\nlevel = \"keygate=loud\"\n",
                "logging.level",
                "a level",
            ),
            (
                "[cors]\nallowed_origins = [\"HTTP://LOCALHOST:3001\"]\n",
                "cors.allowed_origins",
                "expected \"http://localhost:3001\", as browsers send it",
            ),
            (
                "[cors]\nallowed_origins = [\"https://app.example:443\"]\n",
                "cors.allowed_origins",
                "expected \"https://app.example\"",
            ),
        ];
        for (text, key, expected) in cases {
            let err = load(text, &[]).unwrap_err().to_string();
            assert!(err.contains(key) && err.contains(expected), "{text}: {err}");
        }
        for level in [
            "warn",
            "keygate::access=off,info",
            "INFO",
            "keygate=debug, info",
        ] {
            let text = format!("[logging]\nlevel = {level:?}\n");
            load(&text, &[]).unwrap_or_else(|e| panic!("{level}: {e}"));
        }
        let c = load(
            "[cors]\nallowed_origins = [\"http://localhost:3001\", \"https://[::1]:8443\"]\n",
            &[],
        )
        .unwrap();
        assert_eq!(c.cors.allowed_origins.len(), 2);
    }

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
    fn invalid_values_name_key_value_and_expectation() {
        let cases = [
            (
                "[server]\nhttps_listen = \"nope\"\n",
                "server.https_listen",
                "nope",
            ),
            ("[upstream]\nurl = \"ftp://x\"\n", "upstream.url", "ftp://x"),
            (
                "[store]\npositive_ttl = \"soon\"\n",
                "store.positive_ttl",
                "soon",
            ),
            (
                "[store]\nstale_if_error = \"300000000000y\"\n",
                "store.stale_if_error",
                "300000000000y",
            ),
            (
                "[server]\nmax_headers = 40000\n",
                "server.max_headers",
                "40000",
            ),
            (
                "[server]\nheader_read_timeout = \"366d\"\n",
                "server.header_read_timeout",
                "366d",
            ),
            (
                "[server]\nhandshake_timeout = \"0s\"\n",
                "server.handshake_timeout",
                "0s",
            ),
            (
                "[upstream]\nresponse_timeout = \"0ms\"\n",
                "upstream.response_timeout",
                "0ms",
            ),
            (
                "[rate_limit]\nshared_timeout = \"0s\"\n",
                "rate_limit.shared_timeout",
                "0s",
            ),
            (
                "[tls]\nwatch_interval = \"1ms\"\n",
                "tls.watch_interval",
                "1ms",
            ),
            (
                "[cors]\nallowed_origins = [\"*\"]\n",
                "cors.allowed_origins",
                "*",
            ),
            (
                "[cors]\nallowed_origins = [\"https://a.example/path\"]\n",
                "cors.allowed_origins",
                "https://a.example/path",
            ),
            ("[logging]\nformat = \"xml\"\n", "logging.format", "xml"),
            ("[store]\nbackend = \"mysql\"\n", "store.backend", "mysql"),
            (
                "[server]\ntrusted_proxies = [\"10.0.0.0/33\"]\n",
                "server.trusted_proxies",
                "10.0.0.0/33",
            ),
            (
                "[auth]\nkey_header = \"Authorization\"\n",
                "auth.key_header",
                "Authorization",
            ),
        ];
        for (text, key, value) in cases {
            let err = load(text, &[]).unwrap_err().to_string();
            assert!(
                err.contains(key) && err.contains(value) && err.contains("expected"),
                "{err}"
            );
        }
    }

    #[test]
    fn redis_backends_and_password_redaction() {
        let c = load(
            "[store]\nbackend = \"redis\"\nurl = \"redis://app:s3cret@10.0.0.9:6380/2\"\n",
            &[],
        )
        .unwrap();
        assert!(matches!(c.store.backend, Backend::Redis { .. }));
        let file = FileConfig::from_toml(
            "[store]\nbackend = \"redis\"\nurl = \"redis://app:s3cret@10.0.0.9:6380/2\"\n",
            "test",
            &BTreeMap::new(),
        )
        .unwrap();
        let shown = file.to_toml();
        assert!(
            !shown.contains("s3cret") && shown.contains("redis://app:***@10.0.0.9:6380/2"),
            "{shown}"
        );
        assert_eq!(redact_url("rediss://:pw@h:1"), "rediss://:***@h:1");
        assert_eq!(redact_url("redis://h:1/0"), "redis://h:1/0");
        // The authority ends at '#' or '?' too: the password is what a URL parser calls one.
        assert_eq!(redact_url("redis://u:p@h#x@y/0"), "redis://u:***@h#x@y/0");
        assert_eq!(redact_url("redis://u:p@h?q=a@b"), "redis://u:***@h?q=a@b");
        // An unparsable URL (in an error message) hides everything up to the last '@'.
        assert_eq!(redact_url("redis://u:pa#ss@h:x"), "redis://u:***@h:x");
        let err = load(
            "[store]\nbackend = \"redis\"\nurl = \"http://x:pw@h\"\n",
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("store.url") && !err.contains("pw"), "{err}");
        let err = load("[store]\nbackend = \"redis-cluster\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("store.cluster_nodes"), "{err}");
    }

    #[test]
    fn a_sentinel_backend_needs_sentinels_and_a_master_name() {
        let sentinel =
            "[store]\nbackend = \"redis-sentinel\"\nurl = \"redis://kg:pw@mymaster/1\"\n";
        let err = load(sentinel, &[]).unwrap_err().to_string();
        assert!(err.contains("store.sentinels"), "{err}");
        let with_sentinels = format!(
            "{sentinel}sentinels = [\"redis://:spw@10.0.0.1:26379\", \"redis://:spw@10.0.0.2:26379\"]\n"
        );
        let err = load(&with_sentinels, &[]).unwrap_err().to_string();
        assert!(err.contains("store.master_name"), "{err}");
        let c = load(
            &format!("{with_sentinels}master_name = \"mymaster\"\n"),
            &[],
        )
        .unwrap();
        let Backend::Redis(settings) = &c.store.backend else {
            panic!("not redis");
        };
        assert!(matches!(
            &settings.target,
            crate::store::redis::Target::Sentinel { master, sentinels, .. }
                if master == "mymaster" && sentinels.len() == 2
        ));
        // Confirmed by one replica by default: a Sentinel group has replicas.
        assert_eq!(settings.confirm_replicas, 1);
        // The sentinels' credentials are one set, and never printed.
        let err = load(
            &format!(
                "{sentinel}master_name = \"m\"\nsentinels = [\"redis://:a@h1:26379\", \"redis://:b@h2:26379\"]\n"
            ),
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("same user and password") && !err.contains(":a@"),
            "{err}"
        );
        let file = FileConfig::from_toml(
            &format!("{with_sentinels}master_name = \"m\"\n"),
            "test",
            &BTreeMap::new(),
        )
        .unwrap();
        let shown = file.to_toml();
        assert!(!shown.contains("spw") && !shown.contains(":pw@"), "{shown}");
    }

    #[test]
    fn redis_tls_settings_are_checked_when_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        let cert = dir.path().join("cert.pem");
        let key = dir.path().join("key.pem");
        crate::tls::write_dev_cert(&cert, &key, &["localhost".to_owned()]).unwrap();
        std::fs::copy(&cert, &ca).unwrap();
        let store = |extra: &str| {
            format!("[store]\nbackend = \"redis\"\nurl = \"rediss://h:6380/0\"\n{extra}")
        };
        let path = |p: &std::path::Path| p.display().to_string();
        let c = load(
            &store(&format!(
                "tls_ca_file = \"{}\"\ntls_cert_file = \"{}\"\ntls_key_file = \"{}\"\n",
                path(&ca),
                path(&cert),
                path(&key)
            )),
            &[],
        )
        .unwrap();
        let Backend::Redis(settings) = &c.store.backend else {
            panic!("not redis");
        };
        assert!(settings.tls.ca.is_some() && settings.tls.client.is_some());
        for (extra, wanted) in [
            (
                format!("tls_cert_file = \"{}\"\n", path(&cert)),
                "store.tls_key_file",
            ),
            (
                format!("tls_ca_file = \"{}\"\n", path(&key)),
                "store.tls_ca_file",
            ),
            (
                "tls_ca_file = \"/nonexistent/ca.pem\"\n".to_owned(),
                "store.tls_ca_file",
            ),
            // Not a regular file: never read (a FIFO would block, /dev/zero never end).
            (
                "tls_ca_file = \"/dev/zero\"\n".to_owned(),
                "store.tls_ca_file",
            ),
        ] {
            let err = load(&store(&extra), &[]).unwrap_err().to_string();
            assert!(err.contains(wanted), "{extra}: {err}");
        }
        // TLS files with a plain redis:// URL: a mistake, said so.
        let err = load(
            &format!(
                "[store]\nbackend = \"redis\"\nurl = \"redis://h:6379/0\"\ntls_ca_file = \"{}\"\n",
                path(&ca)
            ),
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("rediss://"), "{err}");
        // `#insecure` turns verification off: refused unless allowed in so many words.
        let insecure = "[store]\nbackend = \"redis\"\nurl = \"rediss://u:pw@h:6380/0#insecure\"\n";
        let err = load(insecure, &[]).unwrap_err().to_string();
        assert!(
            err.contains("store.url") && err.contains("tls_allow_insecure") && !err.contains("pw"),
            "{err}"
        );
        load(&format!("{insecure}tls_allow_insecure = true\n"), &[]).unwrap();
    }

    #[test]
    fn empty_listen_disables_a_listener() {
        let c = load("[server]\nhttp_listen = \"\"\nadmin_listen = \"\"\n", &[]).unwrap();
        assert!(c.server.http_listen.is_none() && c.server.admin_listen.is_none());
    }

    #[test]
    fn trusted_proxies_accept_ips_and_cidrs() {
        let c = load(
            "[server]\ntrusted_proxies = [\"10.0.0.0/8\", \"::1\"]\n",
            &[],
        )
        .unwrap();
        assert_eq!(c.server.trusted_proxies.len(), 2);
    }
}
