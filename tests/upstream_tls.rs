//! TLS to the upstream, through the real binary: an `https://` upstream whose certificate comes
//! from a private CA, one that requires a client certificate, and one whose certificate does not
//! verify (a 502 with the cause in the log, never a plain-text fallback). Connections are pooled
//! over TLS as over plain TCP.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;

use common::{Process, keygate, write_config};

/// A private CA: its certificate as PEM, and an issuer for leaf certificates.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Self { issuer }
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A leaf certificate for `names` (PEM chain, PEM key).
    fn leaf(&self, names: &[&str], common_name: &str) -> (String, String) {
        let mut params =
            CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())
                .unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, common_name);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &*self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// An HTTPS upstream on 127.0.0.1:0 with a certificate from `ca` for localhost; when
/// `client_ca` is given it requires a client certificate from that CA. It answers with the path
/// and the common name of the client certificate it saw, and counts the connections it
/// accepted.
async fn tls_upstream(
    ca: &Ca,
    client_ca: Option<&Ca>,
) -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    let (cert, key) = ca.leaf(&["localhost", "127.0.0.1"], "upstream");
    let chain = CertificateDer::pem_slice_iter(cert.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .unwrap();
    let builder = match client_ca {
        Some(client_ca) => {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(client_ca.issuer.der().clone()).unwrap();
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                    .build()
                    .unwrap();
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let config = builder.with_single_cert(chain, key).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = Arc::clone(&accepted);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let count = Arc::clone(&count);
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let client = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(|c| {
                        x509_parser::parse_x509_certificate(c)
                            .ok()
                            .and_then(|(_, c)| {
                                c.subject()
                                    .iter_common_name()
                                    .next()
                                    .and_then(|cn| cn.as_str().ok().map(str::to_owned))
                            })
                    })
                    .unwrap_or_default();
                let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let body = serde_json::json!({"path": req.uri().path(), "client": client});
                    async move {
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                            Bytes::from(body.to_string()),
                        )))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    (addr, accepted)
}

fn create_key(cfg: &Path) -> String {
    let out = keygate()
        .arg("--config")
        .arg(cfg)
        .args(["keys", "create", "--name", "tls"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

fn get(dir: &Path, gw: &Process, key: &str, path: &str) -> (u16, serde_json::Value) {
    let client = reqwest::blocking::Client::builder()
        .use_rustls_tls()
        .add_root_certificate(
            reqwest::Certificate::from_pem(&std::fs::read(dir.join("cert.pem")).unwrap()).unwrap(),
        )
        .resolve("localhost", gw.https)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let resp = client
        .get(format!("https://localhost:{}{path}", gw.https.port()))
        .header("X-API-Key", key)
        .send()
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().unwrap_or_default())
}

/// The access-log line for `path`, once it is there.
fn logged(gw: &Process, path: &str) -> serde_json::Value {
    let what = format!("the access-log line for {path}");
    common::wait_for(Duration::from_secs(5), &what, || {
        let found = gw.lines.lock().unwrap().iter().find_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            let fields = if v["fields"].is_object() {
                v["fields"].clone()
            } else {
                v
            };
            (fields["path"] == path).then_some(fields)
        });
        found.ok_or_else(|| gw.output())
    })
}

#[test]
fn https_upstreams_are_verified_and_pooled() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ca = Ca::new("keygate test CA");
    let (addr, accepted) = rt.block_on(tls_upstream(&ca, None));
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
    let url = format!("https://localhost:{}", addr.port());
    let cfg = write_config(dir.path(), &url);
    let key = create_key(&cfg);

    // Trusting the private CA: answered, over one pooled connection (one worker, one pool).
    let ca_file = dir.path().join("ca.pem");
    let mut gw = Process::start(
        &cfg,
        &[
            ("KEYGATE_UPSTREAM_TLS_CA_FILE", ca_file.to_str().unwrap()),
            ("KEYGATE_SERVER_WORKERS", "1"),
        ],
    );
    for i in 0..3 {
        let (status, body) = get(dir.path(), &gw, &key, &format!("/over-tls/{i}"));
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["path"], format!("/over-tls/{i}"));
    }
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert!(gw.terminate().success());

    // With the system's roots only, the private CA's certificate does not verify: 502, and the
    // log says why.
    let mut gw = Process::start(&cfg, &[]);
    let (status, body) = get(dir.path(), &gw, &key, "/untrusted");
    assert_eq!(status, 502, "{body}");
    assert_eq!(body["detail"], "The upstream service is unavailable.");
    let line = logged(&gw, "/untrusted");
    let cause = line["cause"].as_str().unwrap_or_default();
    assert!(
        cause.contains("TLS handshake with localhost:") && cause.contains("certificate"),
        "{cause}"
    );
    assert!(gw.terminate().success());
}

#[test]
fn an_upstream_that_requires_a_client_certificate_gets_the_configured_one() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ca = Ca::new("keygate test CA");
    let clients = Ca::new("keygate client CA");
    let (addr, _) = rt.block_on(tls_upstream(&ca, Some(&clients)));
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let (cert, key_pem) = clients.leaf(&["keygate"], "keygate-gateway");
    let cert_file = dir.path().join("client.pem");
    let key_file = dir.path().join("client-key.pem");
    std::fs::write(&cert_file, cert).unwrap();
    std::fs::write(&key_file, key_pem).unwrap();
    let cfg = write_config(dir.path(), &format!("https://localhost:{}", addr.port()));
    let key = create_key(&cfg);

    // Without a client certificate the upstream refuses the connection: 502.
    let mut gw = Process::start(
        &cfg,
        &[("KEYGATE_UPSTREAM_TLS_CA_FILE", ca_file.to_str().unwrap())],
    );
    let (status, _) = get(dir.path(), &gw, &key, "/anonymous");
    assert_eq!(status, 502);
    assert!(gw.terminate().success());

    // With it, the upstream sees who is calling.
    let mut gw = Process::start(
        &cfg,
        &[
            ("KEYGATE_UPSTREAM_TLS_CA_FILE", ca_file.to_str().unwrap()),
            (
                "KEYGATE_UPSTREAM_TLS_CERT_FILE",
                cert_file.to_str().unwrap(),
            ),
            ("KEYGATE_UPSTREAM_TLS_KEY_FILE", key_file.to_str().unwrap()),
        ],
    );
    let (status, body) = get(dir.path(), &gw, &key, "/mutual");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["client"], "keygate-gateway");
    assert!(gw.terminate().success());
}

#[test]
fn tls_settings_without_an_https_url_are_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "http://127.0.0.1:9");
    let out = keygate()
        .arg("--config")
        .arg(&cfg)
        .arg("check-config")
        .env(
            "KEYGATE_UPSTREAM_TLS_CA_FILE",
            "/etc/ssl/certs/ca-certificates.crt",
        )
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("upstream.url") && err.contains("https://"),
        "{err}"
    );
    // A missing CA file is named when the gateway starts.
    let cfg = write_config(dir.path(), "https://localhost:9");
    let out = keygate()
        .arg("--config")
        .arg(&cfg)
        .arg("serve")
        .env("KEYGATE_UPSTREAM_TLS_CA_FILE", "/nonexistent/ca.pem")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/ca.pem"), "{err}");
}
