//! Hostile clients against the real gateway, over raw TLS sockets: slow and silent clients,
//! request smuggling shapes, oversized requests, and broken uploads. Each case asserts what the
//! client gets and that a recording upstream never sees an ambiguous or unauthorised request.

mod common;

use std::time::{Duration, Instant};

use common::{Gateway, Upstream, eventually_async};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

async fn tls(gw: &Gateway) -> TlsStream<TcpStream> {
    gw.raw_tls().await
}

/// Sends raw bytes on a fresh TLS connection and reads until the server closes it (or 5 s).
async fn raw(gw: &Gateway, request: &[u8]) -> String {
    let mut stream = tls(gw).await;
    stream.write_all(request).await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut buf)).await;
    String::from_utf8_lossy(&buf).into_owned()
}

fn status_of(response: &str) -> Option<u16> {
    response.split(' ').nth(1)?.parse().ok()
}

#[tokio::test]
async fn smuggling_shapes_are_refused_and_never_reach_the_upstream() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream.url(), &[]).await;
    let key = gw.create_key("victim").await;
    let cases: Vec<(&str, String)> = vec![
        (
            "two different Content-Lengths",
            format!(
                "POST /a HTTP/1.1\r\nHost: localhost\r\nX-API-Key: {key}\r\nContent-Length: 3\r\nContent-Length: 5\r\n\r\nabcde"
            ),
        ),
        (
            "Content-Length: +5",
            format!(
                "POST /a HTTP/1.1\r\nHost: localhost\r\nX-API-Key: {key}\r\nContent-Length: +5\r\n\r\nabcde"
            ),
        ),
        (
            "oversized chunk size",
            format!(
                "POST /a HTTP/1.1\r\nHost: localhost\r\nX-API-Key: {key}\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffffffff\r\nabc\r\n0\r\n\r\n"
            ),
        ),
        (
            "obsolete line folding",
            format!(
                "GET /a HTTP/1.1\r\nHost: localhost\r\nX-API-Key: {key}\r\nX-Folded: a\r\n b\r\n\r\n"
            ),
        ),
        (
            "Transfer-Encoding not ending in chunked",
            format!(
                "POST /a HTTP/1.1\r\nHost: localhost\r\nX-API-Key: {key}\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n"
            ),
        ),
        (
            "Transfer-Encoding without chunked",
            format!(
                "POST /a HTTP/1.1\r\nHost: localhost\r\nX-API-Key: {key}\r\nTransfer-Encoding: gzip\r\n\r\nabc"
            ),
        ),
        (
            "Transfer-Encoding on HTTP/1.0",
            format!(
                "POST /a HTTP/1.0\r\nHost: localhost\r\nX-API-Key: {key}\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
            ),
        ),
    ];
    for (what, request) in &cases {
        let response = raw(&gw, request.as_bytes()).await;
        let status = status_of(&response);
        assert!(
            status.is_none_or(|s| s == 400),
            "{what}: expected 400 or a closed connection, got {response:?}"
        );
    }
    // A body that turns out malformed while streaming (the oversized chunk) is cut off: the
    // upstream may have seen it start, but only as an aborted request, never a complete one.
    assert!(
        upstream
            .seen
            .lock()
            .unwrap()
            .iter()
            .all(|s| !s.body_complete),
        "{:?}",
        upstream.seen.lock().unwrap()
    );
    let aborted = upstream.count();
    assert!(aborted <= 1, "{:?}", upstream.seen.lock().unwrap());

    // Both Content-Length and Transfer-Encoding: hyper follows Transfer-Encoding alone and closes
    // the connection after the response, as RFC 9112 §6.1 allows. What matters: the connection
    // ends there (the trailing "X" is never read as a request) and the upstream gets one request
    // framed by keygate alone.
    let both: Vec<(&str, String)> = vec![
        (
            "Content-Length and Transfer-Encoding",
            format!(
                "POST /a HTTP/1.1\r\nHost: localhost\r\nX-API-Key: {key}\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nX"
            ),
        ),
        (
            "Transfer-Encoding then Content-Length",
            format!(
                "POST /a HTTP/1.1\r\nHost: localhost\r\nX-API-Key: {key}\r\nTransfer-Encoding: chunked\r\nContent-Length: 6\r\n\r\n0\r\n\r\nX"
            ),
        ),
    ];
    for (what, request) in &both {
        let response = raw(&gw, request.as_bytes()).await;
        match status_of(&response) {
            None | Some(400) => {}
            Some(200) => assert!(
                response.to_ascii_lowercase().contains("connection: close"),
                "{what}: {response}"
            ),
            other => panic!("{what}: unexpected {other:?}: {response}"),
        }
        assert_eq!(
            response.matches("HTTP/1.1 ").count(),
            1,
            "{what}: {response}"
        );
    }
    for seen in upstream.seen.lock().unwrap().iter().skip(aborted) {
        // Nothing ambiguous reached the upstream: one framing, one complete body.
        assert!(seen.body_complete, "{seen:?}");
        assert!(
            seen.headers.get_all("content-length").iter().count() <= 1,
            "{seen:?}"
        );
        assert!(
            !(seen.headers.contains_key("content-length")
                && seen.headers.contains_key("transfer-encoding")),
            "{seen:?}"
        );
    }
    assert!(
        upstream.count() <= aborted + both.len(),
        "{:?}",
        upstream.seen.lock().unwrap()
    );
    gw.shutdown().await;
}

/// Bare LF line endings: hyper accepts them (RFC 9112 §2.2 lets a recipient), and keygate
/// re-frames the request with CRLF for the upstream, so the two never read it differently. A bare
/// LF cannot hide a second request either: it is one request, one response.
#[tokio::test]
async fn bare_lf_requests_are_reframed_not_passed_through() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream.url(), &[]).await;
    let key = gw.create_key("k").await;
    let response = raw(
        &gw,
        format!("GET /a HTTP/1.1\nHost: localhost\nX-API-Key: {key}\nConnection: close\n\n")
            .as_bytes(),
    )
    .await;
    assert_eq!(status_of(&response), Some(200), "{response}");
    assert_eq!(response.matches("HTTP/1.1 ").count(), 1);
    assert_eq!(upstream.count(), 1);
    assert_eq!(upstream.last().uri, "/a");
    gw.shutdown().await;
}

#[tokio::test]
async fn a_refused_requests_body_is_never_read_as_a_second_request() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream.url(), &[]).await;
    let key = gw.create_key("k").await;
    let smuggled = format!("GET /smuggled HTTP/1.1\r\nHost: localhost\r\nX-API-Key: {key}\r\n\r\n");
    let request = format!(
        "POST /a HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\n\r\n{smuggled}",
        smuggled.len()
    );
    let response = raw(&gw, request.as_bytes()).await;
    assert_eq!(status_of(&response), Some(401), "{response}");
    assert_eq!(
        response.matches("HTTP/1.1 ").count(),
        1,
        "a second response came back: {response}"
    );
    assert_eq!(upstream.count(), 0, "the body was read as a request");
    gw.shutdown().await;
}

#[tokio::test]
async fn oversized_requests_get_431_414_and_413() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(
        &upstream.url(),
        &[("KEYGATE_SERVER_MAX_BODY_BYTES", "1000")],
    )
    .await;
    let key = gw.create_key("k").await;
    let many: String = (0..150).map(|i| format!("X-H{i}: v\r\n")).collect();
    let response = raw(
        &gw,
        format!("GET /a HTTP/1.1\r\nHost: localhost\r\nX-API-Key: {key}\r\n{many}\r\n").as_bytes(),
    )
    .await;
    assert_eq!(status_of(&response), Some(431), "{response}");
    let big = "x".repeat(20_000);
    let response = raw(
        &gw,
        format!("GET /a HTTP/1.1\r\nHost: localhost\r\nX-API-Key: {key}\r\nX-Big: {big}\r\n\r\n")
            .as_bytes(),
    )
    .await;
    assert_eq!(status_of(&response), Some(431), "{response}");
    let resp = gw
        .client()
        .get(gw.url(&format!("/a?{}", "q".repeat(9_000))))
        .header("X-API-Key", &key)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 414);
    let resp = gw
        .client()
        .post(gw.url("/a"))
        .header("X-API-Key", &key)
        .body(vec![0u8; 5_000])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);
    assert_eq!(upstream.count(), 0);
    // A chunked body that grows past the limit is cut off: the upstream sees an aborted request.
    let chunk = format!("{:x}\r\n{}\r\n", 600, "y".repeat(600));
    let request = format!(
        "POST /a HTTP/1.1\r\nHost: localhost\r\nX-API-Key: {key}\r\nTransfer-Encoding: chunked\r\n\r\n{chunk}{chunk}0\r\n\r\n"
    );
    let _ = raw(&gw, request.as_bytes()).await;
    for seen in upstream.seen.lock().unwrap().iter() {
        assert!(
            !seen.body_complete,
            "a cut body was presented as complete: {seen:?}"
        );
    }
    // A body within the limit passes.
    let resp = gw
        .client()
        .post(gw.url("/a"))
        .header("X-API-Key", &key)
        .body(vec![0u8; 900])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    gw.shutdown().await;
}

#[tokio::test]
async fn a_client_dying_mid_upload_is_an_aborted_request_upstream() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream.url(), &[]).await;
    let key = gw.create_key("k").await;
    let mut stream = tls(&gw).await;
    stream
        .write_all(format!("POST /upload HTTP/1.1\r\nHost: localhost\r\nX-API-Key: {key}\r\nContent-Length: 1000000\r\n\r\n").as_bytes())
        .await
        .unwrap();
    stream.write_all(&[7u8; 100_000]).await.unwrap();
    stream.flush().await.unwrap();
    // The client dies once the upload is under way upstream.
    let what = "the upload to reach the upstream";
    eventually_async(Duration::from_secs(5), what, async || {
        upstream.started() > 0
    })
    .await;
    drop(stream);
    let what = "the upstream to see the request end";
    eventually_async(Duration::from_secs(5), what, async || upstream.count() > 0).await;
    let seen = upstream.last();
    assert!(
        !seen.body_complete,
        "a cut upload was presented as complete: {seen:?}"
    );
    assert!(seen.body_len < 1_000_000);
    gw.shutdown().await;
}

#[tokio::test]
async fn slow_and_silent_clients_are_cut_off_while_others_are_served() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(
        &upstream.url(),
        &[
            ("KEYGATE_SERVER_HEADER_READ_TIMEOUT", "1s"),
            ("KEYGATE_SERVER_HANDSHAKE_TIMEOUT", "500ms"),
        ],
    )
    .await;
    let key = gw.create_key("k").await;

    // A TCP connection that never starts TLS is closed at the handshake timeout.
    let mut silent = TcpStream::connect(gw.https).await.unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "closed after {:?}",
        started.elapsed()
    );

    // Slowloris: hundreds of connections trickle header bytes; each is closed at the header
    // timeout.
    const SLOW: usize = 300;
    let mut slow = Vec::new();
    for _ in 0..SLOW {
        let mut s = tls(&gw).await;
        s.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n")
            .await
            .unwrap();
        slow.push(s);
    }
    let trickle = tokio::spawn(async move {
        let started = Instant::now();
        let mut closed = 0;
        for s in &mut slow {
            let mut buf = [0u8; 512];
            // Keep sending a header byte now and then; the server must close anyway.
            let _ = s.write_all(b"X-A: b\r\n").await;
            // EOF, a response (408) or an abrupt TLS close all end the connection; only a
            // timeout means it was left open.
            if tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
                .await
                .is_ok()
            {
                closed += 1;
            }
        }
        (closed, started.elapsed())
    });
    // Meanwhile a normal client is served.
    for _ in 0..10 {
        assert_eq!(gw.get_with_key("/x", &key).await.status(), 200);
    }
    let (closed, took) = trickle.await.unwrap();
    assert_eq!(closed, SLOW, "some slow connections were not closed");
    assert!(
        took < Duration::from_secs(5),
        "slow connections lingered {took:?}"
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn odd_credentials_each_get_a_defined_4xx_and_nothing_is_forwarded() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream.url(), &[]).await;
    let key = gw.create_key("k").await;
    let long = "k".repeat(10 * 1024);
    let cases: Vec<String> = vec![
        "X-API-Key: \r\n".into(),
        "X-API-Key:    \r\n".into(),
        format!("X-API-Key: {long}\r\n"),
        format!("X_API_KEY: {key}\r\n"),
        format!("X-API-Key: {key}\r\nX-API-Key: {key}\r\n"),
        "X-API-Key: sk_\u{e9}\u{e9}\r\n".into(),
        "Authorization: Basic Zm9vOmJhcg==\r\n".into(),
    ];
    for header in &cases {
        let response = raw(
            &gw,
            format!("GET /a HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n{header}\r\n")
                .as_bytes(),
        )
        .await;
        let status = status_of(&response);
        assert!(
            status.is_some_and(|s| (400..500).contains(&s)),
            "{header:?}: {response:?}"
        );
    }
    assert_eq!(upstream.count(), 0);
    gw.shutdown().await;
}

#[tokio::test]
async fn an_upstream_dying_mid_response_is_never_a_complete_response() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream.url(), &[]).await;
    let key = gw.create_key("k").await;
    for client in [gw.client(), gw.h1_client()] {
        let resp = client
            .get(gw.url("/truncated"))
            .header("X-API-Key", &key)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert!(
            resp.bytes().await.is_err(),
            "a truncated body was presented as complete"
        );
    }
    // The gateway is fine afterwards.
    assert_eq!(gw.get_with_key("/x", &key).await.status(), 200);
    gw.shutdown().await;
}

#[tokio::test]
async fn upgrade_requests_are_not_tunnelled() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream.url(), &[]).await;
    let key = gw.create_key("k").await;
    let request = format!(
        "GET /ws HTTP/1.1\r\nHost: localhost\r\nX-API-Key: {key}\r\nConnection: Upgrade, X-Api-Key-Id\r\nUpgrade: websocket\r\n\r\nRAW-TUNNEL-BYTES"
    );
    let response = raw(&gw, request.as_bytes()).await;
    assert_eq!(status_of(&response), Some(200), "{response}");
    let seen = upstream.last();
    assert!(
        !seen.headers.contains_key("upgrade") && !seen.headers.contains_key("connection"),
        "{seen:?}"
    );
    assert_eq!(
        seen.body_len, 0,
        "bytes after the headers were tunnelled to the upstream"
    );
    assert!(
        seen.headers.contains_key("x-api-key-id"),
        "Connection removed the identity header"
    );
    // The trailing bytes were read as a (bad) next request, not passed anywhere.
    assert_eq!(upstream.count(), 1);
    gw.shutdown().await;
}

/// Pipelined requests, framed by length, by chunks and not at all, are answered once each, in
/// order, with their own bodies.
#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream.url(), &[]).await;
    let key = gw.create_key("k").await;
    let head = |method: &str, path: &str, more: &str| {
        format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nX-API-Key: {key}\r\n{more}\r\n")
    };
    let request = [
        head("GET", "/one", ""),
        head("POST", "/two", "Content-Length: 5\r\n") + "hello",
        head("POST", "/three", "Transfer-Encoding: chunked\r\n") + "3\r\nabc\r\n0\r\n\r\n",
        head("GET", "/four", ""),
        head("GET", "/five", "Connection: close\r\n"),
    ]
    .concat();
    let response = raw(&gw, request.as_bytes()).await;
    assert_eq!(
        response.matches("HTTP/1.1 200 OK\r\n").count(),
        5,
        "{response}"
    );
    let mut at = 0;
    for path in ["/one", "/two", "/three", "/four", "/five"] {
        let found = response[at..]
            .find(&format!("\"path\":\"{path}\""))
            .unwrap_or_else(|| panic!("{path} not answered in order: {response}"));
        at += found;
    }
    let seen = upstream.seen.lock().unwrap().clone();
    let got: Vec<(&str, u64)> = seen.iter().map(|s| (s.uri.as_str(), s.body_len)).collect();
    assert_eq!(
        got,
        [
            ("/one", 0),
            ("/two", 5),
            ("/three", 3),
            ("/four", 0),
            ("/five", 0)
        ]
    );
    assert!(seen.iter().all(|s| s.body_complete));
    gw.shutdown().await;
}

/// An HTTP/2 preface after an HTTP/1.1 request is a malformed HTTP/1.1 request: the connection
/// never switches protocol, over TLS (ALPN `http/1.1`) or over plain TCP in `serve` mode (where a
/// connection may start as h2c, but only with its first bytes).
#[tokio::test]
async fn an_http2_preface_after_an_http1_request_is_refused() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream.url(), &[("KEYGATE_SERVER_HTTP_MODE", "serve")]).await;
    let key = gw.create_key("k").await;
    let request = format!(
        "GET /first HTTP/1.1\r\nHost: localhost\r\nX-API-Key: {key}\r\n\r\nPRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    );
    let mut over_tls = Vec::new();
    let mut stream = tls(&gw).await;
    stream.write_all(request.as_bytes()).await.unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut over_tls)).await;
    let mut over_tcp = Vec::new();
    let mut plain = TcpStream::connect(gw.http).await.unwrap();
    plain.write_all(request.as_bytes()).await.unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut over_tcp)).await;
    for (what, bytes) in [("TLS", &over_tls), ("plain TCP", &over_tcp)] {
        // An HTTP/2 server's first frame is SETTINGS: type 4, no flags, stream 0.
        assert!(
            !bytes.windows(6).any(|w| w == [4, 0, 0, 0, 0, 0]),
            "{what}: an HTTP/2 frame came back"
        );
        let response = &String::from_utf8_lossy(bytes).into_owned();
        assert_eq!(status_of(response), Some(200), "{what}: {response}");
        // Whatever follows the first answer is an HTTP/1.1 refusal or nothing: no HTTP/2
        // SETTINGS frame (type 4 after a 3-byte length).
        let first_end = response.find("\r\n\r\n").unwrap() + 4;
        let rest = &response[first_end..];
        let after_body = rest.find("HTTP/1.1 ").map(|i| &rest[i..]);
        if let Some(second) = after_body {
            let status = status_of(second);
            assert!(
                matches!(status, Some(400 | 505)),
                "{what}: the preface got {status:?}: {second}"
            );
        }
    }
    assert_eq!(
        upstream.count(),
        2,
        "only the two GETs reached the upstream"
    );
    gw.shutdown().await;
}

/// CONNECT and TRACE are answered by the gateway with 405, with or without a key, and never
/// forwarded: an upstream that would accept the tunnel never sees the request, and the next
/// client's request on the pool is an ordinary one.
#[tokio::test]
async fn connect_and_trace_are_refused_and_never_reach_the_upstream() {
    // An upstream that accepts every CONNECT as a tunnel and answers anything else with a
    // marker naming what it received.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tunnel_addr = listener.local_addr().unwrap();
    let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let log = std::sync::Arc::clone(&received);
    tokio::spawn(async move {
        loop {
            let Ok((mut conn, _)) = listener.accept().await else {
                return;
            };
            let log = std::sync::Arc::clone(&log);
            tokio::spawn(async move {
                let mut buf = vec![0; 8192];
                loop {
                    let n = match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                    log.lock().unwrap().push(text.clone());
                    let reply: &[u8] = if text.starts_with("CONNECT ") {
                        b"HTTP/1.1 200 Connection established\r\ncontent-length: 0\r\n\r\n"
                    } else {
                        b"HTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\nupstream"
                    };
                    if conn.write_all(reply).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let gw = Gateway::start(&format!("http://{tunnel_addr}"), &[]).await;
    let key = gw.create_key("k").await;
    for request in [
        format!(
            "CONNECT internal.example:22 HTTP/1.1\r\nHost: internal.example:22\r\nX-API-Key: {key}\r\n\r\n"
        ),
        "CONNECT internal.example:22 HTTP/1.1\r\nHost: internal.example:22\r\n\r\n".to_owned(),
        format!(
            "TRACE /a HTTP/1.1\r\nHost: localhost\r\nX-API-Key: {key}\r\nConnection: close\r\n\r\n"
        ),
    ] {
        let mut stream = tls(&gw).await;
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut buf = vec![0; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        let response = String::from_utf8_lossy(&buf[..n]).into_owned();
        assert_eq!(status_of(&response), Some(405), "{request:?}: {response}");
        let lower = response.to_ascii_lowercase();
        assert!(lower.contains("\r\nallow: "), "{response}");
        assert!(lower.contains("not allowed."), "{response}");
    }
    // The upstream saw none of them; an ordinary request goes through as one.
    let resp = gw.get_with_key("/after", &key).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "upstream");
    let seen = received.lock().unwrap().clone();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert!(seen[0].starts_with("GET /after "), "{seen:?}");
    gw.shutdown().await;
}

/// A public path prefix covers only paths that mean what their bytes say: dot segments and
/// encoded separators could reach another path at the upstream, so such paths need a key.
#[tokio::test]
async fn public_paths_do_not_cover_dot_segments() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(
        &upstream.url(),
        &[("KEYGATE_AUTH_PUBLIC_PATHS", "[\"/public/\"]")],
    )
    .await;
    for path in [
        "/public/../admin",
        "/public/%2e%2e/admin",
        "/public/%2E%2E/admin",
        "/public/..%2fadmin",
        "/public/.%2e/admin",
        "/public/./../admin",
    ] {
        let response = raw(
            &gw,
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await;
        assert_eq!(status_of(&response), Some(401), "{path}: {response}");
    }
    assert_eq!(upstream.count(), 0, "{:?}", upstream.seen.lock().unwrap());
    let resp = gw
        .client()
        .get(gw.url("/public/docs"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(upstream.last().uri, "/public/docs");
    gw.shutdown().await;
}

/// A body that stops arriving is given up after `server.body_read_timeout`: the client gets 408
/// and its connection is closed, the upstream sees an aborted request, and neither connection is
/// held any longer.
#[tokio::test]
async fn a_stalled_body_times_out() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(
        &upstream.url(),
        &[("KEYGATE_SERVER_BODY_READ_TIMEOUT", "500ms")],
    )
    .await;
    let key = gw.create_key("k").await;
    for (what, request) in [
        (
            "Content-Length 50, 5 sent",
            format!(
                "POST /stalled HTTP/1.1\r\nHost: localhost\r\nX-API-Key: {key}\r\nContent-Length: 50\r\n\r\nhello"
            ),
        ),
        (
            "chunked without its last chunk",
            format!(
                "POST /stalled HTTP/1.1\r\nHost: localhost\r\nX-API-Key: {key}\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
            ),
        ),
    ] {
        let before = upstream.count();
        let started = Instant::now();
        let response = raw(&gw, request.as_bytes()).await;
        let took = started.elapsed();
        assert_eq!(status_of(&response), Some(408), "{what}: {response}");
        assert!(
            response.contains("Request body timed out."),
            "{what}: {response}"
        );
        // `raw` reads to the end: the connection was closed, well before its 5 s.
        assert!(took < Duration::from_secs(4), "{what}: took {took:?}");
        // The upstream's side of the aborted request ends as the gateway drops it.
        let within = (started + Duration::from_secs(5)).saturating_duration_since(Instant::now());
        let ended = format!("{what}: the upstream to see the request end");
        eventually_async(within, &ended, async || upstream.count() > before).await;
        assert_eq!(upstream.count(), before + 1, "{what}");
        assert!(!upstream.last().body_complete, "{what}");
    }
    gw.shutdown().await;
}

/// A Content-Length past 2^63-1 is refused with 400 before anything is forwarded.
#[tokio::test]
async fn a_content_length_past_i64_is_refused() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream.url(), &[]).await;
    let key = gw.create_key("k").await;
    for length in ["9223372036854775808", "18446744073709551613"] {
        let response = raw(
            &gw,
            format!(
                "POST /a HTTP/1.1\r\nHost: localhost\r\nX-API-Key: {key}\r\nContent-Length: {length}\r\n\r\nabc"
            )
            .as_bytes(),
        )
        .await;
        assert_eq!(status_of(&response), Some(400), "{length}: {response}");
    }
    let response = raw(
        &gw,
        format!(
            "POST /a HTTP/1.1\r\nHost: localhost\r\nX-API-Key: {key}\r\nContent-Length: 9223372036854775808\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    assert!(
        response.contains("Content-Length out of range."),
        "{response}"
    );
    assert_eq!(upstream.count(), 0);
    gw.shutdown().await;
}
