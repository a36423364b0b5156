//! The second stage: [`Config`], the validated and typed configuration the gateway runs on
//! (socket addresses, header names, parsed origins, rates, store settings), made from a
//! [`FileConfig`] by [`FileConfig::validate`]. Each field means what the key of the same name in
//! `gateway.toml` does (`file.rs`). Every error names the key, the value and what is expected;
//! one about a value that an environment variable set names the variable too.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Uri};
use ipnet::IpNet;

use super::backend::Backend;
use super::file::{
    AuthSection, CorsSection, DurationSetting, FileConfig, HeadersSection, HttpMode, LogFormat,
    LoggingSection, MetricsSection, RateLimitSection, Rotation, ServerSection, StoreSection,
    TlsSection, UpstreamSection,
};
use super::{ConfigError, invalid};
use crate::identity::IdentitySecret;
use crate::rate::Rate;

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
    pub per_key: Option<Rate>,
    pub failures_per_ip: Option<Rate>,
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
    /// The port in redirects' URLs; `None`: the HTTPS listener's ([`Server::redirect_port`]).
    pub public_port: Option<u16>,
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
    pub h2_stream_window_bytes: u32,
    pub h2_connection_window_bytes: u32,
    pub workers: usize,
}

impl Server {
    /// The port redirects send clients to: `public_port`, else the HTTPS listener's. `https` is
    /// that listener's address once bound, which tells the port when `https_listen` asks for an
    /// ephemeral one (port 0).
    pub fn redirect_port(&self, https: Option<SocketAddr>) -> u16 {
        self.public_port
            .unwrap_or_else(|| match self.https_listen.port() {
                0 => https.map_or(443, |a| a.port()),
                port => port,
            })
    }
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
    pub identity_secrets: Vec<IdentitySecret>,
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

/// Validated `[metrics]`.
#[derive(Debug, Clone)]
pub struct Metrics {
    pub latency_buckets: Vec<f64>,
}

impl FileConfig {
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
}

/// `tls.watch_interval`: 0 (SIGHUP only) or at least 100 ms, not a busy loop over the files.
fn watch_interval(every: &DurationSetting) -> Result<Duration, ConfigError> {
    if !every.get().is_zero() && every.get() < Duration::from_millis(100) {
        return Err(invalid(
            "tls.watch_interval",
            every.as_str(),
            "\"0s\" (off) or at least \"100ms\"",
        ));
    }
    Ok(every.get())
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

/// An HTTP/2 flow-control window: from the protocol's initial 65,535 bytes to its largest,
/// 2^31-1 (RFC 9113 §6.9).
fn h2_window(key: &'static str, bytes: u32) -> Result<u32, ConfigError> {
    match bytes {
        n @ 65_535..=0x7fff_ffff => Ok(n),
        n => Err(invalid(key, n, "from 65535 to 2147483647 bytes")),
    }
}

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
            http_mode: self.http_mode,
            admin_listen: optional_addr("server.admin_listen", &self.admin_listen)?,
            public_host: self.public_host.trim().to_owned(),
            public_port: (self.public_port != 0).then_some(self.public_port),
            handshake_timeout: self
                .handshake_timeout
                .positive("server.handshake_timeout")?,
            header_read_timeout: self
                .header_read_timeout
                .positive("server.header_read_timeout")?,
            body_read_timeout: self
                .body_read_timeout
                .positive("server.body_read_timeout")?,
            shutdown_grace: self.shutdown_grace.get(),
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
            h2_stream_window_bytes: h2_window(
                "server.h2_stream_window_bytes",
                self.h2_stream_window_bytes,
            )?,
            h2_connection_window_bytes: h2_window(
                "server.h2_connection_window_bytes",
                self.h2_connection_window_bytes,
            )?,
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
            connect_timeout: self.connect_timeout.positive("upstream.connect_timeout")?,
            response_timeout: self
                .response_timeout
                .positive("upstream.response_timeout")?,
            pool_max_idle: self.pool_max_idle,
            pool_idle_timeout: self.pool_idle_timeout.get(),
            preserve_host: self.preserve_host,
            tls,
            identity_secrets: self.identity_secrets()?,
        })
    }

    /// The identity secrets from `identity_secret` or `identity_secret_file` (not both). Errors
    /// name the setting and what is wrong, never a secret.
    fn identity_secrets(&self) -> Result<Vec<IdentitySecret>, ConfigError> {
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
            (false, true) => IdentitySecret::parse_list(&self.identity_secret).map_err(|why| {
                ConfigError::Invalid {
                    key: "upstream.identity_secret",
                    value: format!("*** ({why})"),
                    from: String::new(),
                    expected: EXPECTED.into(),
                }
            }),
            (true, false) => {
                let text = std::fs::read_to_string(file).map_err(|e| ConfigError::Invalid {
                    key: "upstream.identity_secret_file",
                    value: format!("{file} ({e})"),
                    from: String::new(),
                    expected: "a readable file holding the identity secret(s)".into(),
                })?;
                IdentitySecret::parse_list(&text).map_err(|why| ConfigError::Invalid {
                    key: "upstream.identity_secret_file",
                    value: format!("{file} ({why})"),
                    from: String::new(),
                    expected: EXPECTED.into(),
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
    fn validate(&self) -> Result<Store, ConfigError> {
        let backend = self.validate_backend()?;
        if self.cache_capacity == 0 {
            return Err(invalid("store.cache_capacity", 0, "a number above 0"));
        }
        let poll_interval = self.poll_interval.within_a_minute("store.poll_interval")?;
        let usage_flush_interval = self
            .usage_flush_interval
            .positive("store.usage_flush_interval")?;
        let timeout = self.timeout.positive("store.timeout")?;
        Ok(Store {
            backend,
            cache_capacity: self.cache_capacity,
            positive_ttl: self.positive_ttl.get(),
            negative_ttl: self.negative_ttl.get(),
            stale_if_error: self.stale_if_error.get(),
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
        if !log_filter_ok(&self.level) {
            return Err(invalid(
                "logging.level",
                &self.level,
                "a level (off, error, warn, info, debug, trace) or a filter of levels and \
                 TARGET=LEVEL such as \"keygate::access=off,info\"",
            ));
        }
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
            format: self.format,
            level: self.level.clone(),
            file,
            rotation: self.rotation,
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
            Rate::parse(v).map(Some).map_err(|_| {
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
            shared_timeout: self.shared_timeout.positive("rate_limit.shared_timeout")?,
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
    use crate::config::tests::{env, load};

    #[test]
    fn defaults_are_valid() {
        let c = load("", &[]).unwrap();
        assert_eq!(c.server.https_listen.port(), 8443);
        assert_eq!(c.server.public_port, None);
        assert_eq!(c.server.redirect_port(None), 8443);
        assert_eq!(c.cors.max_age, 86_400);
        assert!(!c.cors.allow_credentials);
        assert_eq!(c.auth.key_header, "x-api-key");
    }

    #[test]
    fn redirects_go_to_the_public_port_else_the_https_listeners() {
        let bound: SocketAddr = "127.0.0.1:40123".parse().unwrap();
        let c = load("", &[]).unwrap();
        assert_eq!(c.server.redirect_port(None), 8443);
        let ephemeral = load("[server]\nhttps_listen = \"127.0.0.1:0\"\n", &[]).unwrap();
        assert_eq!(ephemeral.server.public_port, None);
        assert_eq!(ephemeral.server.redirect_port(Some(bound)), 40123);
        assert_eq!(ephemeral.server.redirect_port(None), 443);
        let public = load(
            "[server]\nhttps_listen = \"127.0.0.1:0\"\npublic_port = 443\n",
            &[],
        )
        .unwrap();
        assert_eq!(public.server.redirect_port(Some(bound)), 443);
    }

    #[test]
    fn shipped_gateway_toml_is_valid() {
        let text = include_str!("../../gateway.toml");
        load(text, &[]).unwrap();
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
                "[server]\nh2_stream_window_bytes = 1024\n",
                "server.h2_stream_window_bytes",
                "from 65535",
            ),
            (
                "[server]\nh2_connection_window_bytes = 4294967295\n",
                "server.h2_connection_window_bytes",
                "to 2147483647 bytes",
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
