//! TLS: termination (the rustls server configuration: TLS 1.2 and 1.3 only, ALPN h2 and
//! http/1.1, ring provider; the served certificate and its reload without restart on SIGHUP or a
//! changed file; the development certificate generated on first run), and the client
//! configuration for an `https://` upstream.

use std::io::Write as _;
use std::path::Path;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config;

/// A TLS set-up error, naming the file involved.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate or key file could not be read or parsed.
    #[error("cannot load {what} from {path}: {reason}")]
    Load {
        what: &'static str,
        path: String,
        reason: String,
    },
    /// The certificate and key do not form a usable pair.
    #[error("invalid certificate/key pair: {0}")]
    Config(String),
    /// The development certificate could not be generated or written.
    #[error("cannot generate development certificate: {0}")]
    Generate(String),
}

/// The served certificate, swappable while the gateway runs.
///
/// rustls asks [`ResolvesServerCert::resolve`] for the certificate at every handshake; the answer
/// is one atomic load. [`ServedCert::reload`] reads the files again and swaps only when they form
/// a valid pair, so a bad new certificate never replaces a good one.
pub struct ServedCert {
    cfg: config::Tls,
    provider: Arc<CryptoProvider>,
    current: ArcSwap<CertifiedKey>,
    /// notAfter of the current certificate, Unix seconds.
    not_after: AtomicI64,
    /// Modification times of the files when last loaded.
    loaded: Mutex<(Option<SystemTime>, Option<SystemTime>)>,
}

impl std::fmt::Debug for ServedCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServedCert")
            .field("cert", &self.cfg.cert)
            .finish_non_exhaustive()
    }
}

impl ResolvesServerCert for ServedCert {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

fn mtime(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

impl ServedCert {
    /// Loads `[tls]`, generating a development certificate first when the files are missing and
    /// `generate_dev_cert` is on. `hosts` are the names a generated certificate is valid for.
    pub fn load(cfg: &config::Tls, hosts: &[String]) -> Result<Arc<Self>, TlsError> {
        if cfg.generate_dev_cert && !cfg.cert.exists() && !cfg.key.exists() {
            write_dev_cert(&cfg.cert, &cfg.key, hosts)?;
            tracing::warn!(
                cert = %cfg.cert.display(),
                "generated a self-signed development certificate; configure [tls] cert/key for production"
            );
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let stamps = (mtime(&cfg.cert), mtime(&cfg.key));
        let (key, not_after) = read_pair(cfg, &provider)?;
        Ok(Arc::new(Self {
            cfg: cfg.clone(),
            provider,
            current: ArcSwap::from_pointee(key),
            not_after: AtomicI64::new(not_after),
            loaded: Mutex::new(stamps),
        }))
    }

    /// The rustls server configuration serving this certificate: TLS 1.3 and 1.2 only, ALPN h2
    /// and http/1.1, sessions resumed from stateless tickets.
    ///
    /// Build it once per process: every worker must share it, because it holds the ticket key.
    /// Tickets (ChaCha20-Poly1305 under a key rotated every 6 hours, the previous one kept) let a
    /// returning client resume for up to 12 hours however many others connected meanwhile;
    /// rustls's default, a 256-entry session cache, forgets a session after a few hundred other
    /// handshakes (about a second at a few hundred new connections a second). TLS 1.3 resumption
    /// still does a fresh key exchange (rustls resumes only with `psk_dhe_ke`); a TLS 1.2
    /// resumption does not, so a TLS 1.2 session is as safe as the ticket key of its 12 hours.
    /// The cache still serves TLS 1.2 clients that resume by session id.
    pub fn server_config(self: &Arc<Self>) -> Result<Arc<ServerConfig>, TlsError> {
        let mut config = ServerConfig::builder_with_provider(Arc::clone(&self.provider))
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(Arc::clone(self) as Arc<dyn ResolvesServerCert>);
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        config.ticketer = rustls::crypto::ring::Ticketer::new()
            .map_err(|e| TlsError::Config(format!("cannot create the session ticket key: {e}")))?;
        Ok(Arc::new(config))
    }

    /// Expiry (notAfter) of the served certificate, Unix seconds.
    pub fn not_after(&self) -> i64 {
        self.not_after.load(Ordering::Relaxed)
    }

    /// Whether either file changed since it was loaded.
    pub fn files_changed(&self) -> bool {
        let now = (mtime(&self.cfg.cert), mtime(&self.cfg.key));
        self.loaded.lock().map(|l| *l != now).unwrap_or(false)
    }

    /// Reads the files again; on success the new certificate serves every new connection. On
    /// failure the current certificate stays and the error says why.
    pub fn reload(&self) -> Result<(), TlsError> {
        let stamps = (mtime(&self.cfg.cert), mtime(&self.cfg.key));
        // Remember the attempt either way, so a bad file is reported once, not every poll.
        if let Ok(mut loaded) = self.loaded.lock() {
            *loaded = stamps;
        }
        let (key, not_after) = read_pair(&self.cfg, &self.provider)?;
        self.current.store(Arc::new(key));
        self.not_after.store(not_after, Ordering::Relaxed);
        Ok(())
    }
}

/// What [`check`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertCheck {
    /// Both files are missing and `generate_dev_cert` is on: `serve` will generate them.
    WillGenerate,
    /// The certificate and key load and belong together; the certificate's notAfter (Unix
    /// seconds).
    Usable { not_after: i64 },
}

/// The checks [`ServedCert::load`] makes at start-up, without writing anything: for
/// `check-config`.
pub fn check(cfg: &config::Tls) -> Result<CertCheck, TlsError> {
    if !cfg.cert.exists() && !cfg.key.exists() {
        if cfg.generate_dev_cert {
            return Ok(CertCheck::WillGenerate);
        }
        return Err(TlsError::Load {
            what: "certificate chain",
            path: cfg.cert.display().to_string(),
            reason: "no such file (for development, tls.generate_dev_cert = true generates one)"
                .into(),
        });
    }
    let (_, not_after) = read_pair(cfg, &rustls::crypto::ring::default_provider())?;
    Ok(CertCheck::Usable { not_after })
}

/// Reads a PEM certificate chain (at least one certificate); `what` names it in errors.
fn read_chain(path: &Path, what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let load = |reason: String| TlsError::Load {
        what,
        path: path.display().to_string(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| load(e.to_string()))?;
    if certs.is_empty() {
        return Err(load("no CERTIFICATE block found".into()));
    }
    Ok(certs)
}

/// Reads a PEM private key.
fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::Load {
        what: "private key",
        path: path.display().to_string(),
        reason: e.to_string(),
    })
}

/// Reads and checks the certificate chain and key: they must parse and belong together.
fn read_pair(
    cfg: &config::Tls,
    provider: &CryptoProvider,
) -> Result<(CertifiedKey, i64), TlsError> {
    let certs = read_chain(&cfg.cert, "certificate chain")?;
    let not_after = x509_parser::parse_x509_certificate(&certs[0])
        .map(|(_, cert)| cert.validity().not_after.timestamp())
        .map_err(|e| TlsError::Load {
            what: "certificate",
            path: cfg.cert.display().to_string(),
            reason: e.to_string(),
        })?;
    let signer = provider
        .key_provider
        .load_private_key(read_key(&cfg.key)?)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let certified = CertifiedKey::new(certs, signer);
    certified.keys_match().map_err(|e| {
        TlsError::Config(format!(
            "{} and {}: {e}",
            cfg.cert.display(),
            cfg.key.display()
        ))
    })?;
    Ok((certified, not_after))
}

/// The rustls client configuration for an `https://` upstream: TLS 1.3 and 1.2, ALPN
/// `http/1.1`, the upstream's certificate checked against `tls.ca_file` (else the system's
/// roots), and a client certificate when one is configured.
pub fn upstream_client_config(
    tls: &config::UpstreamTls,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    match &tls.ca_file {
        Some(path) => {
            for cert in read_chain(path, "upstream CA certificates (upstream.tls_ca_file)")? {
                roots.add(cert).map_err(|e| TlsError::Load {
                    what: "upstream CA certificates (upstream.tls_ca_file)",
                    path: path.display().to_string(),
                    reason: e.to_string(),
                })?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                return Err(TlsError::Config(
                    "no system root certificates found for the https:// upstream; set \
                     upstream.tls_ca_file"
                        .into(),
                ));
            }
        }
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
    .map_err(|e| TlsError::Config(e.to_string()))?
    .with_root_certificates(roots);
    let mut config = match &tls.client_cert {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                read_chain(cert, "upstream client certificate (upstream.tls_cert_file)")?,
                read_key(key)?,
            )
            .map_err(|e| {
                TlsError::Config(format!("{} and {}: {e}", cert.display(), key.display()))
            })?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Writes a self-signed certificate for `hosts` (plus localhost and loopback addresses) and its
/// private key (mode 0600 on Unix).
pub fn write_dev_cert(cert_path: &Path, key_path: &Path, hosts: &[String]) -> Result<(), TlsError> {
    let mut names: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
    for h in hosts {
        if !names.contains(h) {
            names.push(h.clone());
        }
    }
    let certified =
        rcgen::generate_simple_self_signed(names).map_err(|e| TlsError::Generate(e.to_string()))?;
    for path in [cert_path, key_path] {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| TlsError::Generate(format!("{}: {e}", dir.display())))?;
        }
    }
    std::fs::write(cert_path, certified.cert.pem())
        .map_err(|e| TlsError::Generate(format!("{}: {e}", cert_path.display())))?;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    options
        .open(key_path)
        .and_then(|mut f| f.write_all(certified.signing_key.serialize_pem().as_bytes()))
        .map_err(|e| TlsError::Generate(format!("{}: {e}", key_path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_cert_is_generated_once_and_loads() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config::Tls {
            cert: dir.path().join("c/cert.pem"),
            key: dir.path().join("c/key.pem"),
            generate_dev_cert: true,
            watch_interval: std::time::Duration::ZERO,
        };
        let hosts = ["api.example".to_owned()];
        let first = ServedCert::load(&cfg, &hosts).unwrap();
        let config = first.server_config().unwrap();
        assert_eq!(
            config.alpn_protocols,
            [b"h2".to_vec(), b"http/1.1".to_vec()]
        );
        assert!(first.not_after() > crate::store::unix_now());
        let pem = std::fs::read(&cfg.cert).unwrap();
        ServedCert::load(&cfg, &hosts).unwrap();
        assert_eq!(
            std::fs::read(&cfg.cert).unwrap(),
            pem,
            "regenerated an existing cert"
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&cfg.key).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn a_bad_new_certificate_is_refused_and_the_old_one_stays() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config::Tls {
            cert: dir.path().join("cert.pem"),
            key: dir.path().join("key.pem"),
            generate_dev_cert: true,
            watch_interval: std::time::Duration::ZERO,
        };
        let served = ServedCert::load(&cfg, &[]).unwrap();
        let before = served.current.load_full();
        // A key that does not belong to the certificate.
        let other = dir.path().join("other");
        write_dev_cert(&other.join("c.pem"), &other.join("k.pem"), &[]).unwrap();
        std::fs::copy(other.join("k.pem"), &cfg.key).unwrap();
        assert!(served.files_changed() || cfg!(not(unix)));
        let err = served.reload().unwrap_err().to_string();
        assert!(err.contains("key.pem"), "{err}");
        assert!(Arc::ptr_eq(&before, &served.current.load_full()));
        assert!(!served.files_changed(), "a refused file is reported once");
        // Garbage is refused too.
        std::fs::write(&cfg.cert, "not a certificate").unwrap();
        assert!(served.reload().is_err());
        // A good pair is taken.
        std::fs::copy(other.join("c.pem"), &cfg.cert).unwrap();
        served.reload().unwrap();
        assert!(!Arc::ptr_eq(&before, &served.current.load_full()));
    }

    #[test]
    fn missing_files_are_named() {
        let cfg = config::Tls {
            cert: "/nonexistent/cert.pem".into(),
            key: "/nonexistent/key.pem".into(),
            generate_dev_cert: false,
            watch_interval: std::time::Duration::ZERO,
        };
        let err = ServedCert::load(&cfg, &[]).unwrap_err().to_string();
        assert!(err.contains("/nonexistent/cert.pem"), "{err}");
    }
}
