//! `[store]`'s backend, validated: an SQLite file, or a Redis server, Sentinel group or cluster
//! with its key prefix, TLS material (read and checked when the configuration is) and how many
//! replicas confirm a key change. [`crate::store`] opens what this describes; [`Backend`]'s
//! `Display` names it with its passwords hidden.

use std::path::PathBuf;
use std::time::Duration;

use super::file::{BackendKind, StoreSection};
use super::{ConfigError, invalid, redact_url};

/// Which store backs the gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// Embedded SQLite file.
    Sqlite { path: PathBuf },
    /// Redis (one server, a Sentinel group or a cluster).
    Redis(RedisSettings),
}

impl std::fmt::Display for Backend {
    /// What a command or the start line names as its store, passwords hidden.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Sqlite { path } => write!(f, "sqlite {}", path.display()),
            Self::Redis(settings) => {
                let prefix = &settings.prefix;
                match &settings.target {
                    RedisTarget::Single(url) => {
                        write!(f, "redis {} (prefix {prefix})", redact_url(url))
                    }
                    RedisTarget::Cluster(nodes) => {
                        let nodes: Vec<String> = nodes.iter().map(|n| redact_url(n)).collect();
                        write!(f, "redis-cluster {} (prefix {prefix})", nodes.join(","))
                    }
                    RedisTarget::Sentinel {
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

/// Everything `[store]` says about a Redis store but its timeout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisSettings {
    /// Where it lives.
    pub target: RedisTarget,
    /// Keys are `{prefix}:...`.
    pub prefix: String,
    /// CA and client certificate for `rediss://` connections.
    pub tls: RedisTls,
    /// Replicas that must acknowledge a key change (`WAIT`) before it is confirmed; 0: none.
    pub confirm_replicas: u32,
    /// How long a key change waits for them.
    pub confirm_timeout: Duration,
}

impl RedisSettings {
    /// `target`, keys under `{prefix}`, no TLS files, no confirmation by replicas.
    pub fn new(target: RedisTarget, prefix: &str) -> Self {
        Self {
            target,
            prefix: prefix.to_owned(),
            tls: RedisTls::default(),
            confirm_replicas: 0,
            confirm_timeout: Duration::from_secs(1),
        }
    }
}

/// Where a Redis store lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisTarget {
    /// One server (or a proxy in front of several): `redis://` or `rediss://` URL.
    Single(String),
    /// Redis Cluster seed nodes.
    Cluster(Vec<String>),
    /// A primary that Redis Sentinel manages: the sentinels' URLs (their user and password, if
    /// any, are the sentinels' own), the group's name, and a URL whose user, password, database
    /// and scheme are the primary's (its host is not used: the sentinels name the primary).
    Sentinel {
        sentinels: Vec<String>,
        master: String,
        node: String,
    },
}

/// TLS material for the connections to Redis (and to the sentinels), PEM.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct RedisTls {
    /// The CAs that sign the servers' certificates, instead of the system's roots.
    pub ca: Option<Vec<u8>>,
    /// Certificate chain and private key presented to the servers.
    pub client: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for RedisTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The private key is never printed.
        f.debug_struct("RedisTls")
            .field("ca", &self.ca.is_some())
            .field("client", &self.client.is_some())
            .finish()
    }
}

impl StoreSection {
    /// The backend `[store]` names, with the settings it needs.
    pub(super) fn validate_backend(&self) -> Result<Backend, ConfigError> {
        Ok(match self.backend {
            BackendKind::Sqlite => {
                if self.path.trim().is_empty() {
                    return Err(invalid("store.path", &self.path, "a database file path"));
                }
                Backend::Sqlite {
                    path: PathBuf::from(&self.path),
                }
            }
            BackendKind::Redis => {
                check_redis_url("store.url", &self.url)?;
                self.redis(
                    RedisTarget::Single(self.url.clone()),
                    &[("store.url", &self.url)],
                    0,
                )?
            }
            BackendKind::RedisCluster => {
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
                self.redis(RedisTarget::Cluster(self.cluster_nodes.clone()), &urls, 0)?
            }
            BackendKind::RedisSentinel => {
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
                    RedisTarget::Sentinel {
                        sentinels: self.sentinels.clone(),
                        master: name.to_owned(),
                        node: self.url.clone(),
                    },
                    &urls,
                    1,
                )?
            }
        })
    }

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
        target: RedisTarget,
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
        Ok(Backend::Redis(RedisSettings {
            target,
            prefix: self.redis_prefix()?,
            tls: RedisTls {
                ca,
                client: cert.zip(key),
            },
            confirm_replicas: self.confirm_replicas.unwrap_or(confirm_default),
            confirm_timeout: {
                self.confirm_timeout.positive("store.confirm_timeout")?;
                self.confirm_timeout
                    .within_a_minute("store.confirm_timeout")?
            },
        }))
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::config::FileConfig;
    use crate::config::tests::load;

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
}
