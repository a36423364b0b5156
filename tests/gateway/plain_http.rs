//! The plain-HTTP listener: a redirect to HTTPS built from configuration (never from `Host`),
//! and `serve` mode behind a TLS-terminating proxy, trusted or not.

use reqwest::StatusCode;

use crate::common::{Gateway, Upstream};

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
