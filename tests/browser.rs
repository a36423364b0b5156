//! CORS in a real browser: headless Chromium (Debian's) loads pages from a preview-deployment
//! origin that `[cors] allowed_origin_patterns` allows (`https://pr-42.vercel.app`) and from two
//! look-alikes (`https://evil-vercel.app`, `https://x.vercel.app.evil.com`), each served on
//! loopback by this test (Chromium's `--host-resolver-rules` maps the names), and each page calls
//! the real gateway with `fetch`: a preflighted POST with a key and django-cors-headers' default
//! headers, a simple GET, a 2 MB upload with a wrong key (refused before it is read) and a HEAD.
//! The pages report what their script could read to the test.
//!
//! Needs `chromium` (`scripts/install-test-deps.sh` installs it, or `$KEYGATE_TEST_CHROMIUM`
//! names another); without it the test fails, saying so.

mod common;

use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::{Gateway, Upstream};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

const ALLOWED: &str = "https://pr-42.vercel.app";
const LOOK_ALIKES: [&str; 2] = ["https://evil-vercel.app", "https://x.vercel.app.evil.com"];

fn chromium() -> PathBuf {
    let path = std::env::var_os("KEYGATE_TEST_CHROMIUM")
        .map_or_else(|| PathBuf::from("chromium"), PathBuf::from);
    let found = Command::new(&path)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "{} cannot be run: this test needs Chromium; run scripts/install-test-deps.sh (Debian \
         package chromium) or set KEYGATE_TEST_CHROMIUM",
        path.display()
    );
    path
}

/// The page every origin serves. The top page (the allowed origin) frames the look-alikes, so
/// that one browser run covers all three origins.
fn page(gateway: &str, key: &str) -> String {
    let frames = LOOK_ALIKES.map(|o| format!("\"{o}/\"")).join(", ");
    let zeros = "0".repeat(46);
    format!(
        r#"<!doctype html><meta charset="utf-8"><title>keygate CORS</title>
<body>
<script>
const GATEWAY = "{gateway}";
async function report(test, outcome) {{
  await fetch("/result", {{method: "POST", headers: {{"Content-Type": "application/json"}},
    body: JSON.stringify(Object.assign({{origin: location.origin, test}}, outcome))}});
}}
async function run(test, init) {{
  try {{
    const r = await fetch(GATEWAY + "/api/v1/video/process/", init);
    await report(test, {{read: true, status: r.status, body: await r.text()}});
  }} catch (e) {{
    await report(test, {{read: false, error: String(e)}});
  }}
}}
(async () => {{
  if (window === window.top) {{
    for (const src of [{frames}]) {{
      const frame = document.createElement("iframe");
      frame.src = src;
      document.body.appendChild(frame);
    }}
  }}
  await run("preflighted", {{method: "POST", body: "{{}}", headers: {{
    "X-API-Key": "{key}", "Content-Type": "application/json",
    "X-CSRFToken": "token", "X-Requested-With": "XMLHttpRequest"}}}});
  await run("simple", {{method: "GET"}});
  // Answered before the upload arrives: the browser still gets the whole answer.
  await run("rejected_upload", {{method: "POST", body: "v".repeat(2000000), headers: {{
    "X-API-Key": "sk_{zeros}", "Content-Type": "application/octet-stream"}}}});
  await run("head", {{method: "HEAD"}});
}})();
</script>
</body>"#
    )
}

/// An HTTPS server on 127.0.0.1:0 serving `page` at `/` and passing what is POSTed to `/result`
/// to `results`. Its certificate is self-signed; Chromium is told to accept it.
async fn page_server(dir: &std::path::Path, page: String, results: mpsc::Sender<Value>) -> u16 {
    let tls = keygate::config::Tls {
        cert: dir.join("page-cert.pem"),
        key: dir.join("page-key.pem"),
        generate_dev_cert: true,
        watch_interval: Duration::ZERO,
    };
    let hosts = [
        "pr-42.vercel.app",
        "evil-vercel.app",
        "x.vercel.app.evil.com",
    ]
    .map(String::from);
    let served = keygate::tls::ServedCert::load(&tls, &hosts).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(served.server_config().unwrap());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let page = Arc::new(page);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, page, results) = (acceptor.clone(), Arc::clone(&page), results.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = service_fn(move |req: Request<Incoming>| {
                    let (page, results) = (Arc::clone(&page), results.clone());
                    async move {
                        let mut resp = Response::new(Full::new(Bytes::new()));
                        match (req.method().as_str(), req.uri().path()) {
                            ("GET", "/") => {
                                *resp.body_mut() = Full::new(Bytes::from(page.as_str().to_owned()));
                                resp.headers_mut()
                                    .insert("content-type", "text/html".parse().unwrap());
                            }
                            ("POST", "/result") => {
                                let body = req.into_body().collect().await.unwrap().to_bytes();
                                let _ = results.send(serde_json::from_slice(&body).unwrap()).await;
                            }
                            _ => *resp.status_mut() = StatusCode::NOT_FOUND,
                        }
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    port
}

/// Headless Chromium in its own process group, killed (the whole group) when dropped.
struct Browser {
    child: Child,
    stderr: PathBuf,
}

impl Browser {
    fn open(dir: &std::path::Path, page_port: u16, url: &str) -> Self {
        let stderr = dir.join("chromium.log");
        let rules = ["*.vercel.app", "evil-vercel.app", "*.evil.com"]
            .map(|host| format!("MAP {host} 127.0.0.1:{page_port}"))
            .join(", ");
        let child = Command::new(chromium())
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-dev-shm-usage",
                // The test's own self-signed certificates (the pages' and the gateway's).
                "--ignore-certificate-errors",
            ])
            .arg(format!("--user-data-dir={}", dir.join("profile").display()))
            .arg(format!("--host-resolver-rules={rules}"))
            .arg(url)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .process_group(0)
            .spawn()
            .unwrap();
        Self { child, stderr }
    }

    fn log(&self) -> String {
        let text = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        let lines: Vec<_> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_reads_an_allowed_pattern_origin_and_blocks_look_alikes() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(
        &upstream.url(),
        &[(
            "CORS_ALLOWED_ORIGIN_REGEXES",
            r"^https://[a-z0-9-]+\.vercel\.app$",
        )],
    )
    .await;
    let key = gw.create_key("preview frontend").await;
    let dir = tempfile::tempdir().unwrap();
    let (tx, mut rx) = mpsc::channel(16);
    let page_port = page_server(
        dir.path(),
        page(&format!("https://localhost:{}", gw.https.port()), &key),
        tx,
    )
    .await;
    let browser = Browser::open(dir.path(), page_port, &format!("{ALLOWED}/"));

    let mut results = std::collections::BTreeMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while results.len() < 12 {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(r)) => {
                let origin = r["origin"].as_str().unwrap().to_owned();
                let test = r["test"].as_str().unwrap().to_owned();
                results.insert((origin, test), r);
            }
            _ => panic!(
                "Chromium reported {} of 12 results in 60 s: {results:#?}\nits log:\n{}",
                results.len(),
                browser.log()
            ),
        }
    }
    drop(browser);

    // The allowed pattern origin reads the upstream's answer (after a preflight that allowed
    // the key header and django-cors-headers' default headers), and the gateway's own 401.
    let allowed = &results[&(ALLOWED.to_owned(), "preflighted".to_owned())];
    assert_eq!(
        (&allowed["read"], &allowed["status"]),
        (&true.into(), &200.into()),
        "{allowed}"
    );
    let body: Value = serde_json::from_str(allowed["body"].as_str().unwrap()).unwrap();
    assert_eq!(body["path"], "/api/v1/video/process/");
    let simple = &results[&(ALLOWED.to_owned(), "simple".to_owned())];
    assert_eq!(
        (&simple["read"], &simple["status"]),
        (&true.into(), &401.into()),
        "{simple}"
    );
    // An upload the gateway refuses before reading it is answered whole, and HEAD gets the head
    // alone.
    let rejected = &results[&(ALLOWED.to_owned(), "rejected_upload".to_owned())];
    assert_eq!(
        (&rejected["read"], &rejected["status"]),
        (&true.into(), &401.into()),
        "{rejected}"
    );
    let detail: Value = serde_json::from_str(rejected["body"].as_str().unwrap()).unwrap();
    assert_eq!(detail["detail"], "Invalid API key");
    let head = &results[&(ALLOWED.to_owned(), "head".to_owned())];
    assert_eq!(
        (&head["read"], &head["status"], &head["body"]),
        (&true.into(), &401.into(), &"".into()),
        "{head}"
    );
    // The look-alikes read nothing: the preflight gets no Allow-Origin, so the POST is never
    // sent, and the GET's answer is withheld from the script.
    for origin in LOOK_ALIKES {
        for test in ["preflighted", "simple", "rejected_upload", "head"] {
            let r = &results[&(origin.to_owned(), test.to_owned())];
            assert_eq!(r["read"], false, "{origin} {test}: {r}");
            assert!(r["error"].as_str().unwrap().contains("TypeError"), "{r}");
        }
    }
    // Only the allowed origin's POST reached the upstream.
    assert_eq!(upstream.count(), 1);
    assert_eq!(upstream.last().headers["origin"], ALLOWED);
    gw.shutdown().await;
}
