//! CORS: preflights answered at the gateway without a key, and the gateway's own policy on
//! actual requests and rejections (replacing the upstream's headers).

use reqwest::StatusCode;

use crate::assert_security_headers;
use crate::common::{Gateway, Upstream};

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
