//! Real clients against the real gateway: curl over HTTP/1.1 and HTTP/2, and nghttp. Each sends
//! GET, HEAD and POST (a small JSON body, a 2 MB body, a 16 MiB body: larger than the gateway
//! reads of a body it answered without forwarding, and than an HTTP/2 stream's window, so the
//! client is still sending when the answer comes) with no key, a wrong key and a good key,
//! a CORS preflight, the health check (GET and HEAD), and requests the gateway refuses on their
//! size (413, 414, 431). Every answer must arrive complete: the expected status, the JSON
//! `detail` where there is a body, no body after HEAD, and the client's exit status 0. With
//! nghttp the frames are checked too: each answer ends with END_STREAM before any
//! `RST_STREAM` (RFC 9113 §8.1), and an answer to HEAD has no DATA frame.
//!
//! curl and nghttp come from Debian (`curl`, `nghttp2-client`); `scripts/install-test-deps.sh`
//! installs them.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Gateway, Upstream};

/// The clients under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Client {
    Curl1,
    Curl2,
    Nghttp,
}

const CLIENTS: [Client; 3] = [Client::Curl1, Client::Curl2, Client::Nghttp];

/// A request body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Body {
    None,
    Json,
    Big,
    Huge,
}

const BIG: usize = 2_000_000;
const HUGE: usize = 16 * 1024 * 1024;

/// One request: what is sent and what must come back.
#[derive(Debug, Clone)]
struct Case {
    method: &'static str,
    path: String,
    headers: Vec<String>,
    body: Body,
    status: u16,
    /// A `detail` the JSON body must carry; `None`: no check of the body's JSON.
    detail: Option<&'static str>,
}

/// What a client got.
#[derive(Debug)]
struct Answer {
    status: u16,
    body: Vec<u8>,
    /// For nghttp: every frame it received for the request's stream, in order.
    frames: Vec<String>,
}

struct Files {
    _dir: tempfile::TempDir,
    json: PathBuf,
    big: PathBuf,
    huge: PathBuf,
    body: PathBuf,
    cert: PathBuf,
}

impl Files {
    fn new(gw: &Gateway) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let json = dir.path().join("request.json");
        std::fs::write(&json, br#"{"video_url":"https://example.com/v.mp4"}"#).unwrap();
        let big = dir.path().join("request.bin");
        std::fs::write(&big, vec![b'v'; BIG]).unwrap();
        let huge = dir.path().join("upload.bin");
        std::fs::write(&huge, vec![b'u'; HUGE]).unwrap();
        let body = dir.path().join("response");
        Self {
            json,
            big,
            huge,
            body,
            cert: gw.dir.path().join("cert.pem"),
            _dir: dir,
        }
    }

    fn for_body(&self, body: Body) -> Option<&Path> {
        match body {
            Body::None => None,
            Body::Json => Some(&self.json),
            Body::Big => Some(&self.big),
            Body::Huge => Some(&self.huge),
        }
    }
}

/// Fails the test with a clear message when a client is not installed.
fn require(program: &str, package: &str) {
    let found = Command::new(program)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "{program} is not installed: run scripts/install-test-deps.sh (Debian package {package})"
    );
}

fn curl(client: Client, gw: &Gateway, files: &Files, case: &Case) -> Answer {
    let port = gw.https.port();
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "30", "--cacert"])
        .arg(&files.cert)
        .args(["--resolve", &format!("localhost:{port}:127.0.0.1")])
        .arg(if client == Client::Curl1 {
            "--http1.1"
        } else {
            "--http2"
        })
        .arg("-o")
        .arg(&files.body)
        .args(["-w", "%{http_code}"]);
    match case.method {
        "HEAD" => {
            cmd.arg("--head");
        }
        method => {
            cmd.args(["-X", method]);
        }
    }
    for h in &case.headers {
        cmd.args(["-H", h]);
    }
    if let Some(file) = files.for_body(case.body) {
        cmd.arg("--data-binary").arg(format!("@{}", file.display()));
        cmd.args(["-H", "Content-Type: application/octet-stream"]);
    }
    cmd.arg(format!("https://localhost:{port}{}", case.path));
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{client:?} {case:?}: curl exited with {} ({})",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let status = String::from_utf8_lossy(&out.stdout).parse().unwrap();
    let mut body = std::fs::read(&files.body).unwrap_or_default();
    if case.method == "HEAD" {
        // `--head` writes the response head to the output file: what follows it is body.
        let text = String::from_utf8_lossy(&body).into_owned();
        body = text
            .split_once("\r\n\r\n")
            .map(|(_, rest)| rest.as_bytes().to_vec())
            .unwrap_or_default();
    }
    Answer {
        status,
        body,
        frames: Vec::new(),
    }
}

fn nghttp(gw: &Gateway, files: &Files, case: &Case) -> Answer {
    let port = gw.https.port();
    let mut cmd = Command::new("nghttp");
    // nghttp does not verify certificates; the connection goes to the gateway's port on
    // loopback, with `localhost` as the authority.
    cmd.args(["-v", "-n", "-t", "30"])
        .args(["-H", &format!(":authority: localhost:{port}")]);
    if !matches!(case.method, "GET" | "POST") || (case.method == "POST" && case.body == Body::None)
    {
        cmd.args(["-H", &format!(":method: {}", case.method)]);
    }
    for h in &case.headers {
        cmd.args(["-H", h]);
    }
    if let Some(file) = files.for_body(case.body) {
        cmd.arg("-d").arg(file);
    }
    cmd.arg(format!("https://127.0.0.1:{port}{}", case.path));
    let out = cmd.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{case:?}: nghttp exited with {}:\n{text}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    // The request's stream is the first client stream nghttp opens after its priority streams.
    let stream = text
        .lines()
        .find(|l| l.contains("send HEADERS frame"))
        .and_then(|l| l.split("stream_id=").nth(1))
        .and_then(|s| s.trim_end_matches('>').parse::<u32>().ok())
        .unwrap_or_else(|| panic!("no request stream in:\n{text}"));
    let marker = format!("stream_id={stream}>");
    let frames: Vec<String> = text
        .lines()
        .filter(|l| l.contains(" recv ") && l.contains(" frame ") && l.contains(&marker))
        .map(|l| l[l.find("recv ").unwrap_or(0)..].to_owned())
        .collect();
    let status = text
        .lines()
        .find_map(|l| {
            l.split(&format!("recv (stream_id={stream}) :status: "))
                .nth(1)
        })
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| panic!("{case:?}: no :status in:\n{text}"));
    Answer {
        status,
        body: Vec::new(),
        frames,
    }
}

/// Sends `case` with `client` and checks the answer is whole; returns it.
fn check(client: Client, gw: &Gateway, files: &Files, case: &Case) -> Answer {
    let answer = match client {
        Client::Curl1 | Client::Curl2 => curl(client, gw, files, case),
        Client::Nghttp => nghttp(gw, files, case),
    };
    assert_eq!(answer.status, case.status, "{client:?} {case:?}");
    if client == Client::Nghttp {
        let end = answer
            .frames
            .iter()
            .position(|f| {
                (f.contains("HEADERS") || f.contains("DATA"))
                    && f.split("flags=0x")
                        .nth(1)
                        .and_then(|x| u8::from_str_radix(&x[..2], 16).ok())
                        .is_some_and(|flags| flags & 0x1 != 0)
            })
            .unwrap_or_else(|| panic!("{case:?}: no END_STREAM in {:?}", answer.frames));
        if let Some(reset) = answer.frames.iter().position(|f| f.contains("RST_STREAM")) {
            assert!(
                reset > end,
                "{case:?}: RST_STREAM before the answer ended: {:?}",
                answer.frames
            );
        }
        if case.method == "HEAD" {
            assert!(
                !answer.frames.iter().any(|f| f.contains("DATA")),
                "{case:?}: DATA after HEAD: {:?}",
                answer.frames
            );
        }
        return answer;
    }
    if case.method == "HEAD" {
        assert!(
            answer.body.is_empty(),
            "{client:?} {case:?}: a body after HEAD"
        );
    } else if let Some(detail) = case.detail {
        let json: serde_json::Value = serde_json::from_slice(&answer.body).unwrap_or_else(|e| {
            panic!(
                "{client:?} {case:?}: not JSON ({e}): {:?}",
                String::from_utf8_lossy(&answer.body)
            )
        });
        assert_eq!(json["detail"], detail, "{client:?} {case:?}");
    }
    answer
}

fn case(method: &'static str, path: &str, headers: &[String], body: Body, status: u16) -> Case {
    Case {
        method,
        path: path.to_owned(),
        headers: headers.to_vec(),
        body,
        status,
        detail: None,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_client_gets_every_answer_whole() {
    require("curl", "curl");
    require("nghttp", "nghttp2-client");
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream.url(), &[]).await;
    let key = gw.create_key("clients").await;
    let files = Files::new(&gw);

    let path = "/api/v1/video/process/";
    let no_key: Vec<String> = Vec::new();
    let wrong = vec![format!("X-API-Key: sk_{}", "0".repeat(46))];
    let good = vec![format!("X-API-Key: {key}")];
    let mut cases = Vec::new();
    for (headers, status, detail) in [
        (
            &no_key,
            401,
            Some("Authentication credentials were not provided."),
        ),
        (&wrong, 401, Some("Invalid API key")),
        (&good, 200, None),
    ] {
        for (method, body) in [
            ("GET", Body::None),
            ("HEAD", Body::None),
            ("POST", Body::Json),
            ("POST", Body::Big),
            ("POST", Body::Huge),
        ] {
            cases.push(Case {
                detail,
                ..case(method, path, headers, body, status)
            });
        }
    }
    let preflight = vec![
        "Origin: https://app.example".to_owned(),
        "Access-Control-Request-Method: POST".to_owned(),
        "Access-Control-Request-Headers: x-api-key, content-type".to_owned(),
    ];
    cases.push(case("OPTIONS", path, &preflight, Body::None, 204));
    cases.push(case("GET", "/health/api-auth/", &no_key, Body::None, 200));
    cases.push(case("HEAD", "/health/api-auth/", &no_key, Body::None, 200));

    for client in CLIENTS {
        for case in &cases {
            let gw = &gw;
            let files = &files;
            let answer = tokio::task::block_in_place(|| check(client, gw, files, case));
            if client != Client::Nghttp && case.status == 200 && case.method == "POST" {
                // The upstream got the whole body.
                let json: serde_json::Value = serde_json::from_slice(&answer.body).unwrap();
                let len = std::fs::metadata(files.for_body(case.body).unwrap())
                    .unwrap()
                    .len();
                assert_eq!(json["bytes"], len, "{client:?} {case:?}");
            }
        }
    }
    let seen = upstream.seen.lock().unwrap();
    for (size, what) in [(BIG, "2 MB"), (HUGE, "16 MiB")] {
        let whole = seen.iter().filter(|s| s.body_len == size as u64).count();
        assert_eq!(
            whole, 3,
            "each client's authenticated {what} upload reached the upstream whole"
        );
    }
    assert!(seen.iter().all(|s| s.body_complete));
}

#[tokio::test(flavor = "multi_thread")]
async fn refusals_for_size_arrive_whole() {
    require("curl", "curl");
    require("nghttp", "nghttp2-client");
    let upstream = Upstream::start().await;
    let gw = Gateway::start(
        &upstream.url(),
        &[
            ("KEYGATE_SERVER_MAX_BODY_BYTES", "1000"),
            ("KEYGATE_SERVER_MAX_URI_BYTES", "100"),
        ],
    )
    .await;
    let key = gw.create_key("sizes").await;
    let files = Files::new(&gw);
    let good = vec![format!("X-API-Key: {key}")];
    let long_path = format!("/api/{}", "a".repeat(200));
    let huge_header = vec![format!("X-Filler: {}", "f".repeat(20_000)), good[0].clone()];
    let cases = [
        Case {
            detail: Some("Request body too large."),
            ..case("POST", "/api/v1/video/process/", &good, Body::Big, 413)
        },
        Case {
            detail: Some("Request URI too long."),
            ..case("GET", &long_path, &good, Body::None, 414)
        },
        // hyper refuses the head itself: no body to check.
        case("GET", "/api/", &huge_header, Body::None, 431),
    ];
    for client in CLIENTS {
        for case in &cases {
            let gw = &gw;
            let files = &files;
            tokio::task::block_in_place(|| check(client, gw, files, case));
        }
    }
    assert_eq!(upstream.count(), 0, "nothing refused was forwarded");
}
