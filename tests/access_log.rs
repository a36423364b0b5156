//! The access log through the real binary: every request leaves one line, including a request
//! whose answer was never sent (the client went away, or the shutdown grace ended first), and a
//! failure's cause is told once.

mod common;

use std::time::Duration;

use common::{Process, Upstream, keygate, write_config};

/// The JSON access-log lines the gateway has printed so far.
fn access_lines(gw: &Process) -> Vec<serde_json::Value> {
    gw.lines
        .lock()
        .unwrap()
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["fields"]["message"] == "request" || v["message"] == "request")
        .map(|v| {
            if v["fields"].is_object() {
                v["fields"].clone()
            } else {
                v
            }
        })
        .collect()
}

/// Waits until an access-log line for `path` appears; returns it.
fn line_for(gw: &Process, path: &str, within: Duration) -> serde_json::Value {
    let what = format!("an access-log line for {path}");
    common::wait_for(within, &what, || {
        let line = access_lines(gw).into_iter().find(|l| l["path"] == path);
        line.ok_or_else(|| gw.output())
    })
}

fn client(
    dir: &std::path::Path,
    https: std::net::SocketAddr,
    timeout: Duration,
) -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .use_rustls_tls()
        .add_root_certificate(
            reqwest::Certificate::from_pem(&std::fs::read(dir.join("cert.pem")).unwrap()).unwrap(),
        )
        .resolve("localhost", https)
        .timeout(timeout)
        .build()
        .unwrap()
}

fn create_key(cfg: &std::path::Path, name: &str) -> String {
    let out = keygate()
        .arg("--config")
        .arg(cfg)
        .args(["keys", "create", "--name", name])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

#[test]
fn requests_cut_off_before_their_answer_are_logged_as_cancelled() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let upstream = rt.block_on(Upstream::start());
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), &upstream.url());
    let key = create_key(&cfg, "patient");
    let mut gw = Process::start(
        &cfg,
        &[
            ("KEYGATE_SERVER_SHUTDOWN_GRACE", "300ms"),
            // /slow answers after 3 s.
            ("KEYGATE_UPSTREAM_RESPONSE_TIMEOUT", "10s"),
        ],
    );

    // The client gives up while the upstream is still working.
    let impatient = client(dir.path(), gw.https, Duration::from_millis(300));
    let url = |path: &str| format!("https://localhost:{}{path}", gw.https.port());
    assert!(
        impatient
            .get(url("/slow?who=client"))
            .header("X-API-Key", &key)
            .send()
            .is_err()
    );
    let line = line_for(&gw, "/slow", Duration::from_secs(5));
    assert_eq!(line["status"], 499, "{line}");
    assert_eq!(line["outcome"], "cancelled", "{line}");
    assert_eq!(line["reason"], "client_closed", "{line}");
    assert_eq!(line["auth"], "ok", "{line}");
    assert_eq!(line["key_name"], "patient", "{line}");

    // The gateway stops while a request is in flight, and its grace ends first.
    let waiting = std::thread::spawn({
        let patient = client(dir.path(), gw.https, Duration::from_secs(30));
        let url = url("/slow");
        let key = key.clone();
        move || patient.get(url).header("X-API-Key", key).send()
    });
    let what = "the upstream to have the request";
    common::eventually(Duration::from_secs(5), what, || upstream.count() >= 2);
    assert!(gw.terminate().success());
    assert!(waiting.join().unwrap().is_err(), "the request was cut off");
    let lines = access_lines(&gw);
    let cut: Vec<_> = lines
        .iter()
        .filter(|l| l["reason"] == "shutdown_grace_ended")
        .collect();
    assert_eq!(cut.len(), 1, "{lines:?}");
    assert_eq!(cut[0]["status"], 499);
    assert_eq!(cut[0]["outcome"], "cancelled");
    assert_eq!(cut[0]["path"], "/slow");
}

#[test]
fn an_upstream_failure_names_its_cause_once() {
    // A port nobody listens on: bound, then released.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), &format!("http://127.0.0.1:{port}"));
    let key = create_key(&cfg, "k");
    let mut gw = Process::start(&cfg, &[]);
    let resp = client(dir.path(), gw.https, Duration::from_secs(10))
        .get(format!("https://localhost:{}/down", gw.https.port()))
        .header("X-API-Key", &key)
        .send()
        .unwrap();
    assert_eq!(resp.status(), 502);
    let line = line_for(&gw, "/down", Duration::from_secs(5));
    let cause = line["cause"].as_str().unwrap_or_default().to_owned();
    assert!(
        cause.starts_with("cannot connect to the upstream: connect to 127.0.0.1:"),
        "{cause}"
    );
    assert_eq!(
        cause
            .to_ascii_lowercase()
            .matches("connection refused")
            .count(),
        1,
        "{cause}"
    );
    assert!(gw.terminate().success());
}
