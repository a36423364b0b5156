//! TLS termination: the rustls server configuration (TLS 1.2 and 1.3 only, ALPN h2 and
//! http/1.1, ring provider) and the development certificate generated on first run.

use std::io::Write as _;
use std::path::Path;
use std::sync::Arc;

use rustls::ServerConfig;
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

/// Builds the server configuration from `[tls]`, generating a development certificate first when
/// the files are missing and `generate_dev_cert` is on. `hosts` are the names it is valid for.
pub fn server_config(cfg: &config::Tls, hosts: &[String]) -> Result<Arc<ServerConfig>, TlsError> {
    if cfg.generate_dev_cert && !cfg.cert.exists() && !cfg.key.exists() {
        write_dev_cert(&cfg.cert, &cfg.key, hosts)?;
        tracing::warn!(
            cert = %cfg.cert.display(),
            "generated a self-signed development certificate; configure [tls] cert/key for production"
        );
    }
    let certs = CertificateDer::pem_file_iter(&cfg.cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::Load {
            what: "certificate chain",
            path: cfg.cert.display().to_string(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Load {
            what: "certificate chain",
            path: cfg.cert.display().to_string(),
            reason: "no CERTIFICATE block found".into(),
        });
    }
    let key = PrivateKeyDer::from_pem_file(&cfg.key).map_err(|e| TlsError::Load {
        what: "private key",
        path: cfg.key.display().to_string(),
        reason: e.to_string(),
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
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
        };
        let hosts = ["api.example".to_owned()];
        let first = server_config(&cfg, &hosts).unwrap();
        assert_eq!(first.alpn_protocols, [b"h2".to_vec(), b"http/1.1".to_vec()]);
        let pem = std::fs::read(&cfg.cert).unwrap();
        server_config(&cfg, &hosts).unwrap();
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
    fn missing_files_are_named() {
        let cfg = config::Tls {
            cert: "/nonexistent/cert.pem".into(),
            key: "/nonexistent/key.pem".into(),
            generate_dev_cert: false,
        };
        let err = server_config(&cfg, &[]).unwrap_err().to_string();
        assert!(err.contains("/nonexistent/cert.pem"), "{err}");
    }
}
