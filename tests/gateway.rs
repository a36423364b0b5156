//! The real gateway (in-process, ephemeral ports) in front of a real upstream, through a real TLS
//! client: authentication, forwarding, CORS, redirects, health, failures and shutdown.

mod common;

use std::time::{Duration, Instant};

use common::{Gateway, Upstream};
use reqwest::StatusCode;
use serde_json::Value;

async fn json(resp: reqwest::Response) -> Value {
    resp.json().await.unwrap()
}

fn assert_security_headers(resp: &reqwest::Response) {
    let h = resp.headers();
    assert_eq!(h["x-content-type-options"], "nosniff");
    assert_eq!(h["x-frame-options"], "DENY");
    assert!(h.contains_key("referrer-policy"));
    assert!(
        h["strict-transport-security"]
            .to_str()
            .unwrap()
            .starts_with("max-age=")
    );
    assert!(h.contains_key("x-request-id"));
}

#[tokio::test]
async fn every_header_form_is_authenticated_and_rejections_never_reach_upstream() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream.url(), &[]).await;
    let key = gw.create_key("frontend").await;
    let client = gw.client();
    let url = gw.url("/api/v1/video/process/");

    // Missing: 401, the old API's wording, a challenge.
    let resp = client.post(&url).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        resp.headers()["www-authenticate"],
        "Bearer realm=\"keygate\""
    );
    assert_security_headers(&resp);
    assert_eq!(
        json(resp).await["detail"],
        "Authentication credentials were not provided."
    );

    // Malformed (fails the checksum) and well-formed but unknown: "Invalid API key".
    let mut mistyped = key.clone().into_bytes();
    mistyped[10] = if mistyped[10] == b'a' { b'b' } else { b'a' };
    let mistyped = String::from_utf8(mistyped).unwrap();
    let unknown = keygate::key::generate().unwrap().expose().to_owned();
    for bad in [mistyped.as_str(), unknown.as_str(), "sk_short", "not-a-key"] {
        let resp = client
            .post(&url)
            .header("X-API-Key", bad)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{bad}");
        assert!(
            resp.headers()["www-authenticate"]
                .to_str()
                .unwrap()
                .contains("invalid_token"),
            "{bad}"
        );
        assert_eq!(json(resp).await["detail"], "Invalid API key");
    }
    // Repeated key headers are refused, not guessed at.
    let resp = client
        .post(&url)
        .header("X-API-Key", &key)
        .header("X-API-Key", &unknown)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    // Keys in the query string are not credentials.
    let resp = client
        .post(format!("{url}?api_key={key}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        upstream.count(),
        0,
        "a rejected request reached the upstream"
    );

    // Valid: X-API-Key, Bearer, bearer in lower case.
    for (name, value) in [
        ("X-API-Key", key.clone()),
        ("Authorization", format!("Bearer {key}")),
        ("Authorization", format!("bearer {key}")),
    ] {
        let resp = client
            .post(&url)
            .header(name, &value)
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{name}");
        assert_security_headers(&resp);
    }
    assert_eq!(upstream.count(), 3);

    // Inactive: 401 "API key is inactive".
    gw.store.set_active("frontend", false).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        let resp = client
            .post(&url)
            .header("X-API-Key", &key)
            .send()
            .await
            .unwrap();
        if resp.status() == StatusCode::UNAUTHORIZED {
            assert_eq!(json(resp).await["detail"], "API key is inactive");
            break;
        }
        assert!(Instant::now() < deadline, "revocation not seen within 1 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let forwarded = upstream.count();
    let resp = client
        .post(&url)
        .header("X-API-Key", &key)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        upstream.count(),
        forwarded,
        "an inactive key's request was forwarded"
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn expired_keys_are_refused_with_their_own_reason() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream.url(), &[]).await;
    let secret = keygate::key::generate().unwrap();
    let now = keygate::store::unix_now();
    gw.store
        .insert(keygate::store::KeyRecord {
            created_at: now - 100,
            ..keygate::store::KeyRecord::new("expired", &secret, now - 100, Some(now - 1)).unwrap()
        })
        .await
        .unwrap();
    let resp = gw.get_with_key("/x", secret.expose()).await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert!(
        resp.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .contains("invalid_token")
    );
    assert_eq!(json(resp).await["detail"], "API key has expired");
    assert_eq!(upstream.count(), 0);
    // Expired keys do not count as active in the health report.
    let health = json(
        gw.client()
            .get(gw.url("/health/api-auth/"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(health["active_api_keys"], 0);
    gw.shutdown().await;
}

#[tokio::test]
async fn http2_and_http1_are_negotiated_by_alpn() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream.url(), &[]).await;
    let key = gw.create_key("alpn").await;
    let resp = gw.get_with_key("/x", &key).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    let h1 = gw.h1_client();
    let resp = h1
        .get(gw.url("/x"))
        .header("X-API-Key", &key)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.version(), reqwest::Version::HTTP_11);
    // The upstream is always spoken to in HTTP/1.1.
    assert_eq!(upstream.count(), 2);
    gw.shutdown().await;
}

#[tokio::test]
async fn forwarding_rewrites_credentials_identity_and_forwarding_headers() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream.url(), &[]).await;
    let key = gw.create_key("video-app").await;
    let record = gw.store.find("video-app").await.unwrap();
    let client = gw.client();

    let resp = client
        .post(gw.url("/api/v1/video/process/?q=1"))
        .header("X-API-Key", &key)
        .header("X-Api-Key-Id", "forged-id")
        .header("X-Api-Key-Name", "forged-name")
        .header("X-Forwarded-For", "6.6.6.6")
        .header("X-Forwarded-Proto", "http")
        .header("X-Forwarded-Host", "evil.example")
        .header("Forwarded", "for=6.6.6.6")
        .header("X-Request-Id", "trace-abc-123")
        .header("Authorization", "Basic dXNlcjpwYXNz")
        .body("{\"video_url\":\"https://example.com/v.mp4\"}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["x-request-id"], "trace-abc-123");
    let seen = upstream.last();
    let h = &seen.headers;
    assert_eq!(seen.uri, "/api/v1/video/process/?q=1");
    assert!(!h.contains_key("x-api-key"), "the key was forwarded");
    // The Authorization header did not carry the key, so it is the upstream's business.
    assert_eq!(h["authorization"], "Basic dXNlcjpwYXNz");
    assert_eq!(h.get_all("x-api-key-id").iter().count(), 1);
    assert_eq!(h["x-api-key-id"], record.id.as_str());
    assert_eq!(h["x-api-key-name"], "video-app");
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "https");
    assert_eq!(
        h["x-forwarded-host"],
        format!("localhost:{}", gw.https.port())
    );
    assert!(!h.contains_key("forwarded"));
    assert_eq!(h["x-request-id"], "trace-abc-123");
    assert_eq!(h["host"], upstream.addr.to_string());

    // Bearer: the Authorization header carried the key and is stripped; an id is generated.
    // `Connection: X-Api-Key-Id` cannot remove the gateway's identity header.
    let resp = client
        .get(gw.url("/plain"))
        .header("Authorization", format!("Bearer {key}"))
        .header("X-Request-Id", "bad id with spaces")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let generated = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert_eq!(generated.len(), 32);
    let seen = upstream.last();
    assert!(!seen.headers.contains_key("authorization"));
    assert_eq!(seen.headers["x-request-id"], generated.as_str());

    let h1 = gw.h1_client();
    let resp = h1
        .get(gw.url("/conn"))
        .header("X-API-Key", &key)
        .header("Connection", "X-Api-Key-Id, X-Api-Key-Name, keep-alive")
        .header("Keep-Alive", "timeout=5")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let seen = upstream.last();
    assert_eq!(seen.headers["x-api-key-id"], record.id.as_str());
    assert_eq!(seen.headers["x-api-key-name"], "video-app");
    assert!(!seen.headers.contains_key("keep-alive"));
    gw.shutdown().await;
}

#[tokio::test]
async fn preflights_are_answered_at_the_gateway_without_a_key() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream.url(), &[]).await;
    let client = gw.client();
    let url = gw.url("/api/v1/video/process/");

    let resp = client
        .request(reqwest::Method::OPTIONS, &url)
        .header("Origin", "https://app.example")
        .header("Access-Control-Request-Method", "POST")
        .header("Access-Control-Request-Headers", "x-api-key, content-type")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    let h = resp.headers();
    assert_eq!(h["access-control-allow-origin"], "https://app.example");
    assert_eq!(h["access-control-max-age"], "86400");
    let allowed = h["access-control-allow-headers"].to_str().unwrap();
    assert!(allowed.contains("x-api-key") && allowed.contains("authorization"));
    assert!(!h.contains_key("access-control-allow-credentials"));
    assert!(h.get_all("vary").iter().any(|v| v == "Origin"));
    assert_security_headers(&resp);

    let resp = client
        .request(reqwest::Method::OPTIONS, &url)
        .header("Origin", "https://evil.example")
        .header("Access-Control-Request-Method", "POST")
        .send()
        .await
        .unwrap();
    assert!(!resp.headers().contains_key("access-control-allow-origin"));
    assert!(resp.headers().get_all("vary").iter().any(|v| v == "Origin"));
    assert_eq!(upstream.count(), 0, "a preflight was forwarded");

    // Actual requests: the gateway's CORS headers replace the upstream's "*".
    let key = gw.create_key("browser").await;
    let resp = client
        .post(&url)
        .header("Origin", "https://app.example")
        .header("X-API-Key", &key)
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.headers()["access-control-allow-origin"],
        "https://app.example"
    );
    assert!(resp.headers().get_all("vary").iter().any(|v| v == "Origin"));
    let resp = client
        .post(&url)
        .header("Origin", "https://evil.example")
        .header("X-API-Key", &key)
        .send()
        .await
        .unwrap();
    assert!(!resp.headers().contains_key("access-control-allow-origin"));
    // Rejections carry CORS headers too, so a browser can read the 401.
    let resp = client
        .post(&url)
        .header("Origin", "https://app.example")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        resp.headers()["access-control-allow-origin"],
        "https://app.example"
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn plain_http_is_redirected_from_configuration_not_the_host_header() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream.url(), &[]).await;
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let resp = client
        .post(format!(
            "http://{}/api/v1/video/process/?a=1&b=two",
            gw.http
        ))
        .header("Host", "evil.example")
        .header("X-API-Key", "sk_whatever")
        .header("X-Request-Id", "trace-308")
        .body("payload")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::PERMANENT_REDIRECT);
    // Like every response: the request id and the security headers (HSTS is for HTTPS).
    let h = resp.headers();
    assert_eq!(h["x-request-id"], "trace-308");
    assert_eq!(h["x-content-type-options"], "nosniff");
    assert_eq!(h["x-frame-options"], "DENY");
    assert_eq!(h["referrer-policy"], "no-referrer");
    assert_eq!(
        resp.headers()["location"],
        format!(
            "https://localhost:{}/api/v1/video/process/?a=1&b=two",
            gw.https.port()
        )
    );
    assert!(!resp.headers().contains_key("strict-transport-security"));
    let generated = client
        .get(format!("http://{}/", gw.http))
        .send()
        .await
        .unwrap();
    assert_eq!(generated.headers()["x-request-id"].len(), 32);
    assert_eq!(upstream.count(), 0);
    gw.shutdown().await;
}

#[tokio::test]
async fn serve_mode_runs_the_pipeline_over_plain_http_behind_a_tls_proxy() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream.url(), &[("KEYGATE_SERVER_HTTP_MODE", "serve")]).await;
    let key = gw.create_key("behind-lb").await;
    let client = reqwest::Client::new();
    let url = format!("http://{}/api/v1/video/process/", gw.http);

    // No key: refused as on HTTPS, nothing forwarded.
    let resp = client.post(&url).body("x").send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(upstream.count(), 0);

    // A client that is not a trusted proxy cannot claim HTTPS: its X-Forwarded-Proto is replaced
    // and no HSTS is sent over plain HTTP.
    let resp = client
        .post(&url)
        .header("X-API-Key", &key)
        .header("X-Forwarded-Proto", "https")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(!resp.headers().contains_key("strict-transport-security"));
    assert_eq!(resp.headers()["x-content-type-options"], "nosniff");
    assert_eq!(upstream.last().headers["x-forwarded-proto"], "http");
    assert_eq!(upstream.last().headers["x-api-key-name"], "behind-lb");
    gw.shutdown().await;

    // From a trusted proxy that terminated TLS: its X-Forwarded-Proto and client address are
    // kept, and HSTS goes back to the browser.
    let gw = Gateway::start(
        &upstream.url(),
        &[
            ("KEYGATE_SERVER_HTTP_MODE", "serve"),
            ("KEYGATE_SERVER_TRUSTED_PROXIES", "[\"127.0.0.1/32\"]"),
        ],
    )
    .await;
    let key = gw.create_key("behind-lb").await;
    let resp = client
        .post(format!("http://{}/api/v1/video/process/", gw.http))
        .header("X-API-Key", &key)
        .header("X-Forwarded-Proto", "https")
        .header("X-Forwarded-For", "203.0.113.9")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.headers().contains_key("strict-transport-security"));
    let seen = upstream.last();
    assert_eq!(seen.headers["x-forwarded-proto"], "https");
    assert_eq!(seen.headers["x-forwarded-for"], "203.0.113.9, 127.0.0.1");
    gw.shutdown().await;
}

#[tokio::test]
async fn body_limits_apply_per_path_prefix() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(
        &upstream.url(),
        &[(
            "KEYGATE_SERVER_MAX_BODY_BYTES_BY_PREFIX",
            r#"{ "/api/" = 10, "/api/v1/video/" = 0 }"#,
        )],
    )
    .await;
    let key = gw.create_key("uploader").await;
    let client = gw.client();
    let post = |path: &str, len: usize| {
        client
            .post(gw.url(path))
            .header("X-API-Key", &key)
            .body(vec![b'x'; len])
            .send()
    };
    // Over the /api/ limit: refused before anything is forwarded.
    assert_eq!(post("/api/jobs/", 11).await.unwrap().status(), 413);
    assert_eq!(upstream.count(), 0);
    assert_eq!(post("/api/jobs/", 10).await.unwrap().status(), 200);
    // The longer prefix wins: uploads are unlimited; other paths have the global (none).
    assert_eq!(
        post("/api/v1/video/process/", 100_000)
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(post("/elsewhere", 100_000).await.unwrap().status(), 200);
    assert_eq!(upstream.count(), 3);
    gw.shutdown().await;
}

#[tokio::test]
async fn large_bodies_stream_intact_both_ways() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream.url(), &[]).await;
    let key = gw.create_key("uploader").await;
    // 64 MiB in 1 MiB chunks of varying content, streamed (never held whole by the client).
    const CHUNKS: usize = 64;
    let chunk = |i: usize| bytes::Bytes::from(vec![(i * 7 % 251) as u8; 1 << 20]);
    let mut expected = sha2::Sha256::default();
    for i in 0..CHUNKS {
        sha2::Digest::update(&mut expected, chunk(i));
    }
    let expected = common::hex(&sha2::Digest::finalize(expected));
    let stream = futures_stream(CHUNKS, chunk);
    let resp = gw
        .client()
        .post(gw.url("/upload"))
        .header("X-API-Key", &key)
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body = json(resp).await;
    assert_eq!(body["bytes"], (CHUNKS << 20) as u64);
    assert_eq!(body["sha256"], expected);
    let seen = upstream.last();
    assert!(seen.body_complete);
    assert_eq!(seen.body_sha256, expected);
    gw.shutdown().await;
}

fn futures_stream(
    n: usize,
    chunk: impl Fn(usize) -> bytes::Bytes + Send + Sync + 'static,
) -> impl futures_util::Stream<Item = Result<bytes::Bytes, std::io::Error>> + Send + 'static {
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    tokio::spawn(async move {
        for i in 0..n {
            if tx.send(Ok(chunk(i))).await.is_err() {
                return;
            }
        }
    });
    tokio_stream_from(rx)
}

fn tokio_stream_from(
    mut rx: tokio::sync::mpsc::Receiver<Result<bytes::Bytes, std::io::Error>>,
) -> impl futures_util::Stream<Item = Result<bytes::Bytes, std::io::Error>> + Send + 'static {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

#[tokio::test]
async fn upstream_failures_are_502_and_504_and_the_gateway_keeps_serving() {
    // An upstream that hangs up on every connection. The port stays ours, so no other test's
    // listener can take it (a dropped listener's port was once reused by a parallel test).
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            drop(stream);
        }
    });
    let gw = Gateway::start(&format!("http://{dead}"), &[]).await;
    let key = gw.create_key("k").await;

    let resp = gw.get_with_key("/x", &key).await;
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    assert_security_headers(&resp);
    assert_eq!(
        json(resp).await["detail"],
        "The upstream service is unavailable."
    );
    gw.shutdown().await;

    let upstream = Upstream::start().await;
    let gw = Gateway::start(
        &upstream.url(),
        &[("KEYGATE_UPSTREAM_RESPONSE_TIMEOUT", "300ms")],
    )
    .await;
    let key = gw.create_key("k").await;

    let started = Instant::now();
    let resp = gw.get_with_key("/slow", &key).await;
    assert_eq!(resp.status(), StatusCode::GATEWAY_TIMEOUT);
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(
        json(resp).await["detail"],
        "The upstream service did not respond in time."
    );
    let resp = gw.get_with_key("/fast", &key).await;
    assert_eq!(resp.status(), StatusCode::OK);
    gw.shutdown().await;
}

#[tokio::test]
async fn keys_created_revoked_and_enabled_elsewhere_take_effect_within_a_second() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream.url(), &[]).await;

    // A key tried before it exists is cached as unknown; creating it must still work at once.
    let secret = keygate::key::generate().unwrap();
    let resp = gw.get_with_key("/x", secret.expose()).await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let record =
        keygate::store::KeyRecord::new("late", &secret, keygate::store::unix_now(), None).unwrap();
    gw.store.insert(record).await.unwrap();
    let key = secret.expose();
    let second = Duration::from_secs(1);
    gw.wait_for_status(key, StatusCode::OK, second).await;
    gw.store.set_active("late", false).await.unwrap();
    gw.wait_for_status(key, StatusCode::UNAUTHORIZED, second)
        .await;
    gw.store.set_active("late", true).await.unwrap();
    gw.wait_for_status(key, StatusCode::OK, second).await;
    gw.store.delete("late").await.unwrap();
    gw.wait_for_status(key, StatusCode::UNAUTHORIZED, second)
        .await;
    gw.shutdown().await;
}

#[tokio::test]
async fn hand_edits_of_the_sqlite_store_reach_the_gateway_within_a_second() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream.url(), &[]).await;
    let key = gw.create_key("edited").await;
    let second = Duration::from_secs(1);
    gw.wait_for_status(&key, StatusCode::OK, second).await;
    // An operator's emergency switch-off in the sqlite3 shell, bypassing keygate entirely; the
    // gateway's cache would otherwise keep the key for positive_ttl + stale_if_error.
    let db = rusqlite::Connection::open(gw.dir.path().join("keygate.db")).unwrap();
    let edit = |sql: &str| {
        assert_eq!(db.execute(sql, []).unwrap(), 1);
    };
    edit("UPDATE api_keys SET is_active = 0 WHERE name = 'edited'");
    gw.wait_for_status(&key, StatusCode::UNAUTHORIZED, second)
        .await;
    // The usage columns fire nothing: the flush writing them does not churn every gateway's cache.
    let position = gw.store.change_position().await.unwrap();
    edit("UPDATE api_keys SET use_count = use_count + 1, last_used = 1 WHERE name = 'edited'");
    assert_eq!(gw.store.change_position().await.unwrap(), position);
    edit("UPDATE api_keys SET is_active = 1 WHERE name = 'edited'");
    gw.wait_for_status(&key, StatusCode::OK, second).await;
    gw.shutdown().await;
}

#[tokio::test]
async fn health_reports_the_store_and_cached_keys_survive_a_store_outage() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(
        &upstream.url(),
        &[
            ("KEYGATE_STORE_POSITIVE_TTL", "100ms"),
            ("KEYGATE_STORE_STALE_IF_ERROR", "1m"),
        ],
    )
    .await;
    let key = gw.create_key("cached").await;
    gw.create_key("second").await;
    let client = gw.client();

    let resp = client
        .get(gw.url("/health/api-auth/"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body = json(resp).await;
    assert_eq!(body["status"], "healthy");
    assert_eq!(body["active_api_keys"], 2);
    assert!(body["timestamp"].as_str().unwrap().starts_with("20"));
    let resp = gw.get_with_key("/x", &key).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(upstream.count(), 1, "the health endpoint was forwarded");

    // Break the store for real: the table the gateway reads disappears.
    let db = rusqlite::Connection::open(gw.dir.path().join("keygate.db")).unwrap();
    db.execute_batch("ALTER TABLE api_keys RENAME TO api_keys_away")
        .unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await; // past positive_ttl

    // The health answer asks the store at most once a second: unhealthy within that.
    let broken = std::time::Instant::now();
    let resp = loop {
        let resp = client
            .get(gw.url("/health/api-auth/"))
            .send()
            .await
            .unwrap();
        if resp.status() == StatusCode::SERVICE_UNAVAILABLE {
            break resp;
        }
        assert!(broken.elapsed() < Duration::from_secs(2), "still healthy");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let body = json(resp).await;
    assert_eq!(body["status"], "unhealthy");
    assert_eq!(body["problems"][0], "store_unavailable");
    // The recently validated key keeps working (stale_if_error) ...
    let resp = gw.get_with_key("/x", &key).await;
    assert_eq!(resp.status(), StatusCode::OK);
    // ... an unknown key is 503 with Retry-After: never 401, never 200.
    let other = keygate::key::generate().unwrap();
    let resp = gw.get_with_key("/x", other.expose()).await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(resp.headers()["retry-after"], "1");
    let readyz = reqwest::get(format!("http://{}/readyz", gw.admin))
        .await
        .unwrap();
    assert_eq!(readyz.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(json(readyz).await["store"], "down");

    // Repair: everything is normal again without a restart.
    db.execute_batch("ALTER TABLE api_keys_away RENAME TO api_keys")
        .unwrap();
    let repaired = std::time::Instant::now();
    while client
        .get(gw.url("/health/api-auth/"))
        .send()
        .await
        .unwrap()
        .status()
        != StatusCode::OK
    {
        assert!(
            repaired.elapsed() < Duration::from_secs(2),
            "still unhealthy"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let resp = gw.get_with_key("/x", other.expose()).await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    gw.shutdown().await;
}

#[tokio::test]
async fn admin_listener_serves_metrics_liveness_and_readiness() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream.url(), &[]).await;
    let key = gw.create_key("m").await;
    let client = gw.client();
    gw.get_with_key("/x", &key).await;
    gw.get_with_key("/x", &key).await;
    client.get(gw.url("/x")).send().await.unwrap();

    let admin = format!("http://{}", gw.admin);
    let metrics = reqwest::get(format!("{admin}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        "keygate_requests_total{outcome=\"forwarded\",status=\"2xx\"} 2",
        "keygate_requests_total{outcome=\"rejected\",status=\"4xx\"} 1",
        "keygate_auth_decisions_total{reason=\"ok\"} 2",
        "keygate_auth_decisions_total{reason=\"missing\"} 1",
        "keygate_cache_hits_total 1",
        "keygate_cache_misses_total 1",
        "keygate_store_up 1",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "missing {line:?} in\n{metrics}"
        );
    }
    for name in [
        "keygate_request_duration_seconds_bucket",
        "keygate_upstream_duration_seconds_bucket",
        "keygate_build_info",
        "keygate_tls_handshake_failures_total",
        "keygate_active_keys",
    ] {
        assert!(metrics.contains(name), "missing {name}");
    }
    assert!(!metrics.contains(&key));
    assert_eq!(
        reqwest::get(format!("{admin}/healthz"))
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
    let ready = reqwest::get(format!("{admin}/readyz")).await.unwrap();
    assert_eq!(ready.status(), StatusCode::OK);
    assert_eq!(json(ready).await["upstream"], "up");
    gw.shutdown().await;
}

#[tokio::test]
async fn usage_is_flushed_in_batches() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream.url(), &[]).await;
    let key = gw.create_key("counted").await;

    for _ in 0..5 {
        let resp = gw.get_with_key("/x", &key).await;
        assert_eq!(resp.status(), StatusCode::OK);
    }
    let started = Instant::now();
    loop {
        let r = gw.store.find("counted").await.unwrap();
        if r.use_count == 5 {
            assert!(r.last_used.is_some());
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "usage not flushed: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    gw.shutdown().await;
}

#[tokio::test]
async fn shutdown_lets_in_flight_requests_finish_and_flushes_usage() {
    let upstream = Upstream::start().await;
    let mut gw = Gateway::start(
        &upstream.url(),
        &[("KEYGATE_STORE_USAGE_FLUSH_INTERVAL", "1h")],
    )
    .await;
    let key = gw.create_key("inflight").await;
    let client = gw.client();
    let in_flight = {
        let client = client.clone();
        let url = gw.url("/hold");
        let key = key.clone();
        tokio::spawn(async move { client.get(url).header("X-API-Key", key).send().await })
    };
    // Wait until the upstream holds the request, then shut down.
    let started = Instant::now();
    while upstream.count() == 0 {
        assert!(started.elapsed() < Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let done = gw.begin_shutdown();
    let resp = in_flight.await.unwrap().unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(json(resp).await["path"], "/hold");
    done.await.unwrap().unwrap();
    // The listener is closed: new connections fail.
    assert!(
        common::tls_client(
            &std::fs::read(gw.dir.path().join("cert.pem")).unwrap(),
            gw.https
        )
        .get(gw.url("/x"))
        .send()
        .await
        .is_err()
    );
    // The final flush wrote last_used although the flush interval never elapsed.
    let r = gw.store.find("inflight").await.unwrap();
    assert_eq!(r.use_count, 1);
    assert!(r.last_used.is_some());
}

/// An idle keep-alive connection does not hold shutdown up: it hears the stop signal and closes at
/// once, long before the grace period or its idle timeout would end it.
#[tokio::test]
async fn shutdown_closes_idle_keep_alive_connections_at_once() {
    let upstream = Upstream::start().await;
    let mut gw = Gateway::start(
        &upstream.url(),
        &[
            ("KEYGATE_SERVER_SHUTDOWN_GRACE", "60s"),
            ("KEYGATE_SERVER_HEADER_READ_TIMEOUT", "60s"),
        ],
    )
    .await;
    let key = gw.create_key("idle").await;
    let client = gw.client();
    // Several requests on the client's pooled connections, which then sit idle.
    for _ in 0..3 {
        let resp = gw.get_with_key_on(&client, "/x", &key).await;
        assert_eq!(resp.status(), StatusCode::OK);
    }
    let started = Instant::now();
    let done = gw.begin_shutdown();
    tokio::time::timeout(Duration::from_secs(10), done)
        .await
        .expect("shutdown waited for an idle connection")
        .unwrap()
        .unwrap();
    eprintln!(
        "shutdown with idle connections took {:?}",
        started.elapsed()
    );
}

/// TLS 1.2 and 1.3 are served (anything older is not even implemented by rustls), with HSTS.
#[tokio::test]
async fn tls12_and_tls13_handshakes_succeed() {
    use rustls_pki_types::pem::PemObject as _;
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream.url(), &[]).await;
    let mut roots = rustls::RootCertStore::empty();
    let cert =
        rustls_pki_types::CertificateDer::from_pem_file(gw.dir.path().join("cert.pem")).unwrap();
    roots.add(cert).unwrap();
    for (version, expected) in [
        (&rustls::version::TLS12, rustls::ProtocolVersion::TLSv1_2),
        (&rustls::version::TLS13, rustls::ProtocolVersion::TLSv1_3),
    ] {
        let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[version])
        .unwrap()
        .with_root_certificates(roots.clone())
        .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
        let tcp = tokio::net::TcpStream::connect(gw.https).await.unwrap();
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        let tls = connector.connect(name, tcp).await.unwrap();
        assert_eq!(tls.get_ref().1.protocol_version(), Some(expected));
    }
    // A client that is not speaking TLS at all is counted and dropped.
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut tcp = tokio::net::TcpStream::connect(gw.https).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = tcp.read_to_end(&mut buf).await;
    assert!(!String::from_utf8_lossy(&buf).contains("200"));
    // The worker counts the failure just after the socket closes: allow it a moment.
    let counted = |m: &str| {
        m.lines()
            .any(|l| l == "keygate_tls_handshake_failures_total 1")
    };
    let mut metrics = gw.metrics().await;
    for _ in 0..50 {
        if counted(&metrics) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        metrics = gw.metrics().await;
    }
    assert!(counted(&metrics), "{metrics}");
    gw.shutdown().await;
}

#[tokio::test]
async fn per_key_rate_limit_answers_429_with_headers_and_forwards_nothing() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream.url(), &[("KEYGATE_RATE_LIMIT_PER_KEY", "5/min")]).await;
    let key = gw.create_key("limited").await;
    let other = gw.create_key("other").await;
    for remaining in (0..5).rev() {
        let resp = gw.get_with_key("/x", &key).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()["ratelimit-policy"], "\"key\";q=5;w=60");
        let state = resp.headers()["ratelimit"].to_str().unwrap().to_owned();
        assert!(
            state.starts_with(&format!("\"key\";r={remaining};t=")),
            "{state}"
        );
    }
    let resp = gw.get_with_key("/x", &key).await;
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=12).contains(&retry), "{retry}");
    assert_eq!(resp.headers()["ratelimit-policy"], "\"key\";q=5;w=60");
    assert!(
        resp.headers()["ratelimit"]
            .to_str()
            .unwrap()
            .starts_with("\"key\";r=0;t=")
    );
    let body = json(resp).await;
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .starts_with("Request was throttled.")
    );
    assert_eq!(upstream.count(), 5, "a throttled request was forwarded");
    // Another key has its own budget.
    assert_eq!(gw.get_with_key("/x", &other).await.status(), StatusCode::OK);
    gw.shutdown().await;
}

#[tokio::test]
async fn brute_force_from_one_ip_is_locked_out_while_other_ips_pass() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(
        &upstream.url(),
        &[
            ("KEYGATE_RATE_LIMIT_FAILURES_PER_IP", "3/min"),
            // The test client is the "load balancer": X-Forwarded-For names the client.
            ("KEYGATE_SERVER_TRUSTED_PROXIES", "[\"127.0.0.1\"]"),
        ],
    )
    .await;
    let key = gw.create_key("victim").await;
    let client = gw.client();
    let from = |ip: &'static str, key: String| {
        let client = client.clone();
        let url = gw.url("/x");
        async move {
            client
                .get(url)
                .header("X-Forwarded-For", ip)
                .header("X-API-Key", key)
                .send()
                .await
                .unwrap()
                .status()
        }
    };
    let guess = || keygate::key::generate().unwrap().expose().to_owned();
    for _ in 0..3 {
        assert_eq!(
            from("203.0.113.66", guess()).await,
            StatusCode::UNAUTHORIZED
        );
    }
    assert_eq!(
        from("203.0.113.66", guess()).await,
        StatusCode::TOO_MANY_REQUESTS
    );
    // Locked out since the third failure: even the right key is not tried.
    assert_eq!(
        from("203.0.113.66", key.clone()).await,
        StatusCode::TOO_MANY_REQUESTS
    );
    // Another client, and its valid traffic, are unaffected; so is a mistyped key from it.
    assert_eq!(from("198.51.100.7", key.clone()).await, StatusCode::OK);
    assert_eq!(
        from("198.51.100.7", guess()).await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(from("198.51.100.7", key.clone()).await, StatusCode::OK);
    // Missing credentials are not guesses.
    for _ in 0..5 {
        let status = client
            .get(gw.url("/x"))
            .header("X-Forwarded-For", "192.0.2.1")
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains(
            "keygate_rate_limit_decisions_total{limit=\"ip_failures\",result=\"limited\"} 2"
        ),
        "{metrics}"
    );
    gw.shutdown().await;
}

/// Which certificate a fresh connection is served (DER of the leaf).
async fn served_cert(gw: &Gateway, roots: &[Vec<u8>]) -> Result<Vec<u8>, reqwest::Error> {
    let mut builder = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_info(true)
        .pool_max_idle_per_host(0)
        .resolve("localhost", gw.https);
    for pem in roots {
        builder = builder.add_root_certificate(reqwest::Certificate::from_pem(pem).unwrap());
    }
    let resp = builder
        .build()
        .unwrap()
        .get(gw.url("/health/api-auth/"))
        .send()
        .await?;
    let info = resp.extensions().get::<reqwest::tls::TlsInfo>().unwrap();
    Ok(info.peer_certificate().unwrap().to_vec())
}

#[tokio::test]
async fn certificates_are_reloaded_when_their_files_change_and_bad_ones_are_refused() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream.url(), &[]).await;
    let key = gw.create_key("steady").await;
    let dir = gw.dir.path();
    let old_pem = std::fs::read(dir.join("cert.pem")).unwrap();
    let next = dir.join("next");
    keygate::tls::write_dev_cert(
        &next.join("cert.pem"),
        &next.join("key.pem"),
        &["localhost".into()],
    )
    .unwrap();
    let new_pem = std::fs::read(next.join("cert.pem")).unwrap();
    let roots = [old_pem.clone(), new_pem.clone()];
    let before = served_cert(&gw, &roots).await.unwrap();
    let metric = |text: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix("keygate_tls_certificate_expiry_timestamp_seconds "))
            .map(|v| v.parse::<f64>().unwrap())
    };
    let metrics = gw.metrics().await;
    assert!(metric(&metrics).unwrap() > keygate::store::unix_now() as f64);

    // Requests keep flowing on an established connection while the files change.
    let client = gw.client();
    let traffic = {
        let client = client.clone();
        let url = gw.url("/x");
        let key = key.clone();
        tokio::spawn(async move {
            let mut ok = 0;
            for _ in 0..100 {
                let status = client
                    .get(&url)
                    .header("X-API-Key", &key)
                    .send()
                    .await
                    .unwrap()
                    .status();
                assert_eq!(status, StatusCode::OK);
                ok += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            ok
        })
    };

    // A broken certificate file: refused, the old certificate keeps serving.
    std::fs::write(
        dir.join("cert.pem"),
        b"-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(served_cert(&gw, &roots).await.unwrap(), before);

    // A good pair: new connections get it.
    std::fs::copy(next.join("key.pem"), dir.join("key.pem")).unwrap();
    std::fs::copy(next.join("cert.pem"), dir.join("cert.pem")).unwrap();
    let started = Instant::now();
    loop {
        let now = served_cert(&gw, &roots).await.unwrap();
        if now != before {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "the new certificate was not picked up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A client that only trusts the old certificate now fails: the new one is really served.
    assert!(served_cert(&gw, &[old_pem]).await.is_err());
    assert_eq!(
        traffic.await.unwrap(),
        100,
        "a request failed during the reload"
    );
    gw.shutdown().await;
}

/// The value of an unlabelled metric in a Prometheus exposition.
fn metric_value(exposition: &str, name: &str) -> f64 {
    exposition
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in the exposition"))
}

#[tokio::test]
async fn upstream_connections_are_kept_alive_across_requests() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream.url(), &[]).await;
    let key = gw.create_key("k").await;
    let client = gw.h1_client();
    for i in 0..40 {
        let req = if i % 2 == 0 {
            client.get(gw.url("/get"))
        } else {
            client.post(gw.url("/post")).body(vec![b'x'; 10_000])
        };
        let resp = req.header("X-API-Key", &key).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let body = json(resp).await;
        assert_eq!(body["bytes"], if i % 2 == 0 { 0 } else { 10_000 });
    }
    let opened = metric_value(
        &gw.metrics().await,
        "keygate_upstream_connections_opened_total",
    );
    // One client connection is served by one worker, and each request after the first reuses
    // that worker's upstream connection.
    assert_eq!(
        opened, 1.0,
        "40 sequential requests opened {opened} connections"
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn idle_upstream_connections_closed_by_the_upstream_are_replaced() {
    // An upstream that keeps a connection open for 50 ms after each answer, then hangs up, as
    // servers with a short keep-alive timeout do; it never says `Connection: close`.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            });
        }
    });
    let gw = Gateway::start(&format!("http://{addr}"), &[]).await;
    let key = gw.create_key("k").await;
    let client = gw.h1_client();
    for _ in 0..3 {
        let resp = gw.get_with_key_on(&client, "/x", &key).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.text().await.unwrap(), "ok");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let opened = metric_value(
        &gw.metrics().await,
        "keygate_upstream_connections_opened_total",
    );
    assert_eq!(opened, 3.0, "each request needed a new connection");
    gw.shutdown().await;
}

#[tokio::test]
async fn an_upstream_that_answers_before_reading_the_body_still_gets_it_and_the_client_keeps_its_connection()
 {
    // Answers as soon as it has a request's head, then reads and discards the body (as nginx's
    // `return` does) before the next request on the connection. Reports each body's length.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, mut bodies) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        while let Ok((mut stream, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 65536];
                loop {
                    let end = loop {
                        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break end + 4;
                        }
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
                    let length: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length: "))
                        .map_or(0, |v| v.trim().parse().unwrap());
                    buf.drain(..end);
                    if stream
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                        .await
                        .is_err()
                    {
                        return;
                    }
                    while buf.len() < length {
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    buf.drain(..length);
                    let _ = tx.send(length);
                }
            });
        }
    });
    let gw = Gateway::start(&format!("http://{addr}"), &[]).await;
    let key = gw.create_key("k").await;
    // One client connection carries all three uploads, written whole, one after the other; the
    // three responses must come back on it. Had the gateway left a body unread, it would have
    // to close the connection after that response.
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let tls = gw.raw_tls().await;
    let (mut reader, mut writer) = tokio::io::split(tls);
    const BODY: usize = 4 << 20;
    let head = format!(
        "POST /upload HTTP/1.1\r\nHost: localhost\r\nX-API-Key: {key}\r\nContent-Length: {BODY}\r\n\r\n"
    );
    let uploads = tokio::spawn(async move {
        for _ in 0..3 {
            writer.write_all(head.as_bytes()).await?;
            writer.write_all(&vec![b'x'; BODY]).await?;
        }
        writer.flush().await
    });
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 65536];
    for round in 0..3 {
        let response = async {
            loop {
                if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
                    let length: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length: "))
                        .map_or(0, |v| v.trim().parse().unwrap());
                    if buf.len() >= end + 4 + length {
                        let body = buf[end + 4..end + 4 + length].to_vec();
                        buf.drain(..end + 4 + length);
                        return (head, body);
                    }
                }
                let n = reader.read(&mut chunk).await.unwrap();
                assert!(
                    n > 0,
                    "round {round}: the gateway closed the client's connection"
                );
                buf.extend_from_slice(&chunk[..n]);
            }
        };
        let (head, body) = tokio::time::timeout(Duration::from_secs(20), response)
            .await
            .unwrap_or_else(|_| panic!("round {round}: no response"));
        assert!(head.starts_with("http/1.1 200"), "round {round}: {head}");
        assert_eq!(body, b"ok");
        let got = tokio::time::timeout(Duration::from_secs(10), bodies.recv()).await;
        assert_eq!(
            got.unwrap(),
            Some(BODY),
            "round {round}: the upstream got the whole body"
        );
    }
    uploads.await.unwrap().unwrap();
    gw.shutdown().await;
}

#[tokio::test]
async fn a_client_that_waits_for_100_continue_gets_it_and_its_upload_goes_through() {
    use tokio::io::AsyncWriteExt as _;
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream.url(), &[]).await;
    let key = gw.create_key("k").await;
    let mut tls = gw.raw_tls().await;
    tls.write_all(
        format!(
            "POST /expect HTTP/1.1\r\nHost: localhost\r\nX-API-Key: {key}\r\n\
             Content-Length: 5\r\nExpect: 100-continue\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let interim = read_until(&mut tls, b"\r\n\r\n").await;
    assert!(
        interim.starts_with("HTTP/1.1 100 Continue\r\n"),
        "no 100 Continue before the body was sent: {interim}"
    );
    tls.write_all(b"hello").await.unwrap();
    let response = read_until(&mut tls, b"\"bytes\":5").await;
    assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
    // The upstream saw the body, and no interim response of its own reached the client.
    assert_eq!(upstream.last().body_len, 5);
    assert!(!response.contains("100 Continue"), "{response}");
    gw.shutdown().await;
}

/// Reads from `stream` until what has come contains `pattern` (5 s at most), and returns it.
async fn read_until(stream: &mut (impl tokio::io::AsyncRead + Unpin), pattern: &[u8]) -> String {
    use tokio::io::AsyncReadExt as _;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let read = async {
        while !buf.windows(pattern.len()).any(|w| w == pattern) {
            let n = stream.read(&mut chunk).await.unwrap();
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    let timed_out = tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .is_err();
    let text = String::from_utf8_lossy(&buf).into_owned();
    assert!(
        !timed_out,
        "no {:?} within 5 s: {text}",
        String::from_utf8_lossy(pattern)
    );
    assert!(
        buf.windows(pattern.len()).any(|w| w == pattern),
        "closed before {:?}: {text}",
        String::from_utf8_lossy(pattern)
    );
    text
}

/// Over HTTP/1.1 a response is framed by its length when it is known and in chunks when it is
/// not, a HEAD's response says the GET's length and carries no body, and every response has a
/// `Date`, the gateway's own included.
#[tokio::test]
async fn http1_responses_are_framed_by_length_or_chunks_and_heads_carry_no_body() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream.url(), &[]).await;
    let key = gw.create_key("k").await;
    let client = gw.h1_client();
    let get = |path: &str| client.get(gw.url(path)).header("X-API-Key", &key);

    let resp = get("/chunked").send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["transfer-encoding"], "chunked");
    assert!(!resp.headers().contains_key("content-length"));
    assert_eq!(resp.text().await.unwrap(), "one two three");

    let resp = get("/x").send().await.unwrap();
    assert!(resp.headers().contains_key("date"));
    let length = resp.headers()["content-length"].clone();
    assert_eq!(
        resp.bytes().await.unwrap().len().to_string(),
        length.to_str().unwrap()
    );
    let resp = client
        .head(gw.url("/x"))
        .header("X-API-Key", &key)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-length"], length);
    assert!(resp.bytes().await.unwrap().is_empty());

    let resp = client.get(gw.url("/x")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert!(resp.headers().contains_key("date"));
    // The connection carried all of them.
    assert_eq!(
        gw.get_with_key_on(&client, "/x", &key).await.status(),
        StatusCode::OK
    );
    gw.shutdown().await;
}

/// What a backend rebuilds from a request it received (`contrib/django` does the same): the
/// documented text, each secret's HMAC-SHA256 over it, and the header's `t=` and `v1=` values.
fn signature_matches(seen: &common::Seen, secret: &[u8], path_decoded: &str) -> bool {
    use hmac::{Hmac, Mac as _};
    let h = |name: &str| {
        seen.headers
            .get(name)
            .map_or("", |v| v.to_str().unwrap())
            .to_owned()
    };
    let header = h("x-keygate-signature");
    let mut parts = header.split(',');
    let t = parts.next().unwrap().strip_prefix("t=").unwrap().to_owned();
    let uri: http::Uri = seen.uri.parse().unwrap();
    let text = [
        "keygate-identity-v1",
        &t,
        &seen.method,
        &h("x-request-id"),
        &h("x-api-key-id"),
        &h("x-api-key-name"),
        &h("x-api-key-owner"),
        uri.query().unwrap_or(""),
        path_decoded,
    ]
    .join("\n");
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret).unwrap();
    mac.update(text.as_bytes());
    let want = common::hex(&mac.finalize().into_bytes());
    parts.any(|p| p.strip_prefix("v1=") == Some(&want))
}

#[tokio::test]
async fn forwarded_identity_is_signed_for_the_backend_to_verify() {
    const NEW: &str = "new-secret-0123456789abcdef0123456789";
    const OLD: &str = "old-secret-0123456789abcdef0123456789";
    let upstream = Upstream::start().await;
    // A base path, as the backend sees it in front of the client's path; two secrets while
    // rotating.
    let gw = Gateway::start(
        &format!("{}/base", upstream.url()),
        &[
            ("KEYGATE_UPSTREAM_IDENTITY_SECRET", &format!("{NEW},{OLD}")),
            ("KEYGATE_AUTH_PUBLIC_PATHS", r#"["/static/"]"#),
        ],
    )
    .await;
    let secret = keygate::key::generate().unwrap();
    let record = keygate::store::KeyRecord {
        owner: Some("42".into()),
        ..keygate::store::KeyRecord::new("frontend", &secret, keygate::store::unix_now(), None)
            .unwrap()
    };
    gw.store.insert(record.clone()).await.unwrap();
    let before = keygate::store::unix_now();
    let resp = gw
        .client()
        .post(gw.url("/api/a%20b/?x=1&y=%41"))
        .header("X-API-Key", secret.expose())
        .header("X-Request-Id", "client-req-1")
        // A second request id is dropped: the backend sees the one that is signed.
        .header("X-Request-Id", "client-req-2")
        // A client's own signature and identity are dropped, never forwarded.
        .header("X-Keygate-Signature", "t=1,v1=00")
        .header("X-Api-Key-Owner", "1")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let seen = upstream.last();
    assert_eq!(seen.uri, "/base/api/a%20b/?x=1&y=%41");
    assert_eq!(
        seen.headers.get_all("x-keygate-signature").iter().count(),
        1
    );
    assert_eq!(seen.headers["x-api-key-owner"], "42");
    assert_eq!(seen.headers["x-api-key-id"], record.id.as_str());
    assert_eq!(
        seen.headers
            .get_all("x-request-id")
            .iter()
            .collect::<Vec<_>>(),
        ["client-req-1"]
    );
    assert_eq!(resp.headers()["x-request-id"], "client-req-1");
    let header = seen.headers["x-keygate-signature"].to_str().unwrap();
    let t: u64 = header
        .split(',')
        .next()
        .and_then(|t| t.strip_prefix("t="))
        .unwrap()
        .parse()
        .unwrap();
    assert!((before as u64..=before as u64 + 5).contains(&t), "{header}");
    assert_eq!(header.matches(",v1=").count(), 2, "{header}");
    // Either secret verifies it; another secret, path or owner does not.
    for s in [NEW, OLD] {
        assert!(
            signature_matches(&seen, s.as_bytes(), "/base/api/a b/"),
            "{header}"
        );
    }
    assert!(!signature_matches(
        &seen,
        b"another-secret-0123456789abcdef01234",
        "/base/api/a b/"
    ));
    assert!(!signature_matches(
        &seen,
        NEW.as_bytes(),
        "/base/api/a%20b/"
    ));
    let mut altered = seen.clone();
    altered
        .headers
        .insert("x-api-key-owner", http::HeaderValue::from_static("1"));
    assert!(!signature_matches(
        &altered,
        NEW.as_bytes(),
        "/base/api/a b/"
    ));

    // A public path is signed too, with empty identity: the backend can tell that it came
    // through keygate, and that no key was presented.
    let resp = gw
        .client()
        .get(gw.url("/static/app.js"))
        .header("X-Api-Key-Id", "key_forged")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let seen = upstream.last();
    assert!(!seen.headers.contains_key("x-api-key-id"));
    assert!(signature_matches(
        &seen,
        OLD.as_bytes(),
        "/base/static/app.js"
    ));
    gw.shutdown().await;
}

#[tokio::test]
async fn without_an_identity_secret_nothing_is_signed() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream.url(), &[]).await;
    let key = gw.create_key("frontend").await;
    let resp = gw
        .client()
        .get(gw.url("/x"))
        .header("X-API-Key", &key)
        .header("X-Keygate-Signature", "t=1,v1=00")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let seen = upstream.last();
    assert!(
        !seen.headers.contains_key("x-keygate-signature"),
        "{seen:?}"
    );
    assert!(!seen.headers.contains_key("x-api-key-owner"));
    gw.shutdown().await;
}
