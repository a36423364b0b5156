//! Test harness: a real recording upstream, the real gateway on ephemeral ports (in-process via
//! `server::run`, or the real binary as a child process), and real TLS clients.

#![allow(dead_code)]

pub mod redis;
pub mod wait;

// Each test binary uses some of them.
#[allow(unused_imports)]
pub use wait::{eventually, eventually_async, poll, wait_for, wait_for_async};

use std::collections::BTreeMap;
use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use keygate::config::FileConfig;
use keygate::key;
use keygate::store::{KeyRecord, KeyStore, unix_now};
use sha2::{Digest as _, Sha256};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// The test upstream's response body.
type UpstreamBody =
    http_body_util::combinators::UnsyncBoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// One request as the upstream saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub uri: String,
    pub headers: HeaderMap,
    pub body_len: u64,
    pub body_sha256: String,
    /// False when the body ended with an error (client aborted mid-upload).
    pub body_complete: bool,
}

/// A real HTTP/1.1 upstream on 127.0.0.1:0 that records what reaches it.
///
/// Routes: `/slow` answers after 3 s; `/hold` after 700 ms; `/chunked` answers `one two three`
/// in chunks; `/truncated` breaks off its body; anything else at once. Every request
/// body is read to the end (hashed, not stored) and the answer is JSON with its length and digest.
pub struct Upstream {
    pub addr: SocketAddr,
    /// Requests whose body has ended (completely or not), in that order.
    pub seen: Arc<Mutex<Vec<Seen>>>,
    /// Requests whose head has arrived (their bodies may still be on the way).
    started: Arc<AtomicUsize>,
    _stop: oneshot::Sender<()>,
}

impl Upstream {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let started: Arc<AtomicUsize> = Arc::default();
        let (stop_tx, mut stop_rx) = oneshot::channel::<()>();
        let record = Arc::clone(&seen);
        let heads = Arc::clone(&started);
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    r = listener.accept() => match r { Ok(a) => a, Err(_) => continue },
                    _ = &mut stop_rx => return,
                };
                let (record, heads) = (Arc::clone(&record), Arc::clone(&heads));
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        heads.fetch_add(1, Ordering::SeqCst);
                        handle(req, Arc::clone(&record))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self {
            addr,
            seen,
            started,
            _stop: stop_tx,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Requests seen whole (their bodies ended).
    pub fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    /// Requests whose head has arrived, bodies ended or not.
    pub fn started(&self) -> usize {
        self.started.load(Ordering::SeqCst)
    }

    pub fn last(&self) -> Seen {
        self.seen
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("upstream saw no request")
    }
}

async fn handle(
    req: Request<Incoming>,
    record: Arc<Mutex<Vec<Seen>>>,
) -> Result<Response<UpstreamBody>, std::convert::Infallible> {
    let (parts, mut body) = req.into_parts();
    let mut hasher = Sha256::new();
    let mut len = 0u64;
    let mut complete = true;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => {
                if let Some(data) = f.data_ref() {
                    hasher.update(data);
                    len += data.len() as u64;
                }
            }
            Err(_) => {
                complete = false;
                break;
            }
        }
    }
    let digest = hex(&hasher.finalize());
    record.lock().unwrap().push(Seen {
        method: parts.method.to_string(),
        uri: parts.uri.to_string(),
        headers: parts.headers.clone(),
        body_len: len,
        body_sha256: digest.clone(),
        body_complete: complete,
    });
    // A slow upstream is what these routes are for: the delay is the behaviour under test.
    match parts.uri.path() {
        "/slow" => tokio::time::sleep(Duration::from_secs(3)).await,
        "/hold" => tokio::time::sleep(Duration::from_millis(700)).await,
        _ => {}
    }
    if parts.uri.path() == "/truncated" {
        // Promises 1000 bytes, sends 10, then the connection breaks.
        use futures_util::StreamExt as _;
        let first = futures_util::stream::iter([Ok::<_, std::io::Error>(http_body::Frame::data(
            Bytes::from_static(b"0123456789"),
        ))]);
        // The headers and first bytes go out; then the upstream dies. The pause is part of
        // that behaviour: the break comes after the first bytes have reached the gateway.
        let death = futures_util::stream::once(async {
            tokio::time::sleep(Duration::from_millis(200)).await;
            Err(std::io::Error::other("upstream died"))
        });
        let body = http_body_util::StreamBody::new(first.chain(death));
        let mut resp = Response::new(http_body_util::BodyExt::boxed_unsync(
            body.map_err(|e| e.into()),
        ));
        resp.headers_mut()
            .insert("content-length", "1000".parse().unwrap());
        return Ok(resp);
    }
    if parts.uri.path() == "/chunked" {
        // No length: hyper sends it in chunks.
        let frames = ["one ", "two ", "three"].map(|s| {
            Ok::<_, std::io::Error>(http_body::Frame::data(Bytes::from_static(s.as_bytes())))
        });
        let body = http_body_util::StreamBody::new(futures_util::stream::iter(frames));
        return Ok(Response::new(http_body_util::BodyExt::boxed_unsync(
            body.map_err(|e| e.into()),
        )));
    }
    let body = serde_json::json!({"path": parts.uri.path(), "bytes": len, "sha256": digest});
    let mut resp = Response::new(
        Full::new(Bytes::from(body.to_string()))
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    resp.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    // A CORS header the gateway must replace with its own policy.
    resp.headers_mut()
        .insert("access-control-allow-origin", "*".parse().unwrap());
    Ok(resp)
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes a gateway.toml for tests into `dir` and returns its path. Listeners on port 0.
pub fn write_config(dir: &Path, upstream_url: &str) -> PathBuf {
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    if !cert.exists() {
        keygate::tls::write_dev_cert(&cert, &key, &["localhost".to_owned()]).unwrap();
    }
    let text = format!(
        r#"
[server]
https_listen = "127.0.0.1:0"
http_listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
public_host = "localhost"
shutdown_grace = "5s"

[tls]
cert = "{cert}"
key = "{key}"
watch_interval = "100ms"

[upstream]
url = "{upstream_url}"
connect_timeout = "1s"
response_timeout = "1s"

[store]
path = "{db}"
poll_interval = "50ms"
usage_flush_interval = "200ms"

[cors]
allowed_origins = ["https://app.example"]

[logging]
format = "json"
level = "info"
audit_file = "{audit}"
"#,
        cert = cert.display(),
        key = key.display(),
        db = dir.join("keygate.db").display(),
        audit = dir.join("audit.log").display(),
    );
    let path = dir.join("gateway.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// The real gateway, in-process, on ephemeral ports.
pub struct Gateway {
    pub https: SocketAddr,
    pub http: SocketAddr,
    pub admin: SocketAddr,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    /// A second connection to the same store, as the CLI would open it.
    pub store: Arc<dyn KeyStore>,
    cert_pem: Vec<u8>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), keygate::server::ServeError>>>,
}

impl Gateway {
    /// Starts a gateway in front of `upstream_url`, with `KEYGATE_*`-style overrides.
    pub async fn start(upstream_url: &str, overrides: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config_path = write_config(dir.path(), upstream_url);
        let env: BTreeMap<String, String> = overrides
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let config = FileConfig::load(&config_path, &env)
            .unwrap()
            .validate()
            .unwrap();
        let store = keygate::store::open(&config.store).unwrap();
        let cli_store = keygate::store::open(&config.store).unwrap();
        let listeners = keygate::server::Listeners::bind(&config.server).unwrap();
        let https = listeners.https_addr().unwrap();
        let http = listeners.http_addr().unwrap();
        let admin = listeners.admin_addr().unwrap();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let task = tokio::spawn(keygate::server::run(config, store, listeners, async {
            let _ = stop_rx.await;
        }));
        let cert_pem = std::fs::read(dir.path().join("cert.pem")).unwrap();
        Self {
            https,
            http,
            admin,
            dir,
            config_path,
            store: cli_store,
            cert_pem,
            stop: Some(stop_tx),
            task: Some(task),
        }
    }

    /// A TLS client that trusts the gateway's certificate; HTTP/2 or 1.1 by ALPN.
    pub fn client(&self) -> reqwest::Client {
        tls_client(&self.cert_pem, self.https)
    }

    /// A TLS client limited to HTTP/1.1 (to send HTTP/1-only headers such as `Connection`).
    pub fn h1_client(&self) -> reqwest::Client {
        reqwest::Client::builder()
            .use_rustls_tls()
            .http1_only()
            .add_root_certificate(reqwest::Certificate::from_pem(&self.cert_pem).unwrap())
            .resolve("localhost", self.https)
            .build()
            .unwrap()
    }

    /// A raw TLS connection to the HTTPS listener (ALPN `http/1.1`), for writing requests byte
    /// by byte.
    pub async fn raw_tls(&self) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
        self.raw_tls_alpn(b"http/1.1").await
    }

    /// A raw TLS connection to the HTTPS listener offering only `alpn`.
    pub async fn raw_tls_alpn(
        &self,
        alpn: &[u8],
    ) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
        let mut config = self.tls_client_config(rustls::DEFAULT_VERSIONS);
        config.alpn_protocols = vec![alpn.to_vec()];
        let tcp = tokio::net::TcpStream::connect(self.https).await.unwrap();
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .unwrap()
    }

    /// A rustls client configuration trusting the gateway's certificate, speaking `versions`.
    pub fn tls_client_config(
        &self,
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> rustls::ClientConfig {
        use rustls_pki_types::pem::PemObject as _;
        let mut roots = rustls::RootCertStore::empty();
        let cert =
            rustls_pki_types::CertificateDer::from_pem_file(self.dir.path().join("cert.pem"))
                .unwrap();
        roots.add(cert).unwrap();
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth()
    }

    /// The admin listener's `/readyz`: status and JSON body.
    pub async fn ready(&self) -> (reqwest::StatusCode, serde_json::Value) {
        let resp = reqwest::get(format!("http://{}/readyz", self.admin))
            .await
            .unwrap();
        (resp.status(), resp.json().await.unwrap())
    }

    /// `/health/api-auth/`: status and JSON body.
    pub async fn health(&self) -> (reqwest::StatusCode, serde_json::Value) {
        let resp = self
            .client()
            .get(self.url("/health/api-auth/"))
            .send()
            .await
            .unwrap();
        (resp.status(), resp.json().await.unwrap())
    }

    /// The admin listener's Prometheus exposition.
    pub async fn metrics(&self) -> String {
        reqwest::get(format!("http://{}/metrics", self.admin))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// `GET <path>` over TLS, with `X-API-Key: key`.
    pub async fn get_with_key(&self, path: &str, key: &str) -> reqwest::Response {
        self.get_with_key_on(&self.client(), path, key).await
    }

    /// `GET path` with `key` on `client` (whose connections the caller keeps).
    pub async fn get_with_key_on(
        &self,
        client: &reqwest::Client,
        path: &str,
        key: &str,
    ) -> reqwest::Response {
        client
            .get(self.url(path))
            .header("X-API-Key", key)
            .send()
            .await
            .unwrap()
    }

    /// Polls `GET /x` with `key` until the gateway answers `want`; panics if that takes longer
    /// than `within`. Returns how long it took (a change's propagation time).
    pub async fn wait_for_status(
        &self,
        key: &str,
        want: reqwest::StatusCode,
        within: Duration,
    ) -> Duration {
        let client = self.client();
        let started = std::time::Instant::now();
        let what = format!("GET /x to answer {want}");
        wait_for_async(within, &what, async || {
            match self.get_with_key_on(&client, "/x", key).await.status() {
                status if status == want => Ok(()),
                status => Err(format!("still {status}")),
            }
        })
        .await;
        started.elapsed()
    }

    /// `https://localhost:<port><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.https.port())
    }

    /// Creates an active key directly in the store (as `keygate keys create` does).
    pub async fn create_key(&self, name: &str) -> String {
        create_key(self.store.as_ref(), name).await
    }

    /// Stops the gateway and waits for it to finish draining.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
    }

    /// Signals shutdown without waiting.
    pub fn begin_shutdown(
        &mut self,
    ) -> tokio::task::JoinHandle<Result<(), keygate::server::ServeError>> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.take().unwrap()
    }
}

pub fn tls_client(cert_pem: &[u8], https: SocketAddr) -> reqwest::Client {
    reqwest::Client::builder()
        .use_rustls_tls()
        .add_root_certificate(reqwest::Certificate::from_pem(cert_pem).unwrap())
        .resolve("localhost", https)
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// Mints a key and stores its record; returns the key.
pub async fn create_key(store: &dyn KeyStore, name: &str) -> String {
    let secret = key::generate().unwrap();
    let record = KeyRecord::new(name, &secret, unix_now(), None).unwrap();
    store.insert(record).await.unwrap();
    secret.expose().to_owned()
}

/// The value of an unlabelled metric in a Prometheus exposition.
pub fn metric_value(exposition: &str, name: &str) -> f64 {
    exposition
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in the exposition"))
}

/// The real `keygate` binary.
pub fn keygate() -> Command {
    Command::new(env!("CARGO_BIN_EXE_keygate"))
}

/// Runs `keygate --config <config> keys <args>` with extra environment; returns stdout trimmed,
/// or panics with stderr.
pub fn keys_cli(config: &Path, envs: &[(&str, &str)], args: &[&str]) -> String {
    keys_cli_result(config, envs, args).unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

/// Runs `keygate --config <config> keys <args>`: stdout trimmed, or stderr trimmed when it
/// exits non-zero.
pub fn keys_cli_result(
    config: &Path,
    envs: &[(&str, &str)],
    args: &[&str],
) -> Result<String, String> {
    let mut all = vec!["keys"];
    all.extend_from_slice(args);
    cli_result(config, envs, &all)
}

/// Runs `keygate --config <config> <args>`: stdout trimmed, or stderr trimmed when it exits
/// non-zero.
pub fn cli_result(config: &Path, envs: &[(&str, &str)], args: &[&str]) -> Result<String, String> {
    let out = keygate()
        .arg("--config")
        .arg(config)
        .args(args)
        .envs(envs.iter().copied())
        .output()
        .unwrap();
    if out.status.success() {
        Ok(String::from_utf8(out.stdout).unwrap().trim().to_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
    }
}

/// `keygate serve` as a child process, with its stdout lines collected.
pub struct Process {
    pub child: Child,
    pub https: SocketAddr,
    pub http: SocketAddr,
    pub admin: SocketAddr,
    pub lines: Arc<Mutex<Vec<String>>>,
    pub stderr: Arc<Mutex<Vec<String>>>,
    /// The threads reading stdout and stderr: they end when the process has exited and every
    /// line it wrote has been kept.
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl Process {
    /// Starts `keygate serve --config <config>` and waits for its "keygate listening" line.
    pub fn start(config: &Path, envs: &[(&str, &str)]) -> Self {
        let mut child = keygate()
            .arg("--config")
            .arg(config)
            .arg("serve")
            .envs(envs.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let lines: Arc<Mutex<Vec<String>>> = Arc::default();
        let stderr: Arc<Mutex<Vec<String>>> = Arc::default();
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let out = child.stdout.take().unwrap();
        let sink = Arc::clone(&lines);
        let out_reader = std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                // Kept before it is announced: once `start` returns, `output()` has the line.
                sink.lock().unwrap().push(line.clone());
                if line.contains("keygate listening") {
                    let _ = tx.send(line);
                }
            }
        });
        let err = child.stderr.take().unwrap();
        let sink = Arc::clone(&stderr);
        let err_reader = std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        let line = rx
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("gateway did not start: {:?}", stderr.lock().unwrap()));
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        let addr = |k: &str| v[k].as_str().unwrap().parse::<SocketAddr>().unwrap();
        Self {
            https: addr("https"),
            http: addr("http"),
            admin: addr("admin"),
            child,
            lines,
            stderr,
            readers: vec![out_reader, err_reader],
        }
    }

    /// Sends SIGTERM and waits for the exit status, and for every line the process wrote.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).unwrap());
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        let status = self.child.wait().unwrap();
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
        status
    }

    /// Everything written to stdout and stderr so far.
    pub fn output(&self) -> String {
        let mut all = self.lines.lock().unwrap().join("\n");
        all.push('\n');
        all.push_str(&self.stderr.lock().unwrap().join("\n"));
        all
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
