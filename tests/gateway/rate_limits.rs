//! Rate limits: a key's budget answered 429 with `RateLimit` headers and nothing forwarded, and
//! one address's failed guesses locked out while other addresses pass.

use reqwest::StatusCode;

use crate::common::{Gateway, Upstream};
use crate::json;

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
