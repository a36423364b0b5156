//! Health and the admin listener: the public health answer and readiness following the store
//! (and cached keys served through a store outage), metrics, liveness and readiness.

use std::time::Duration;

use reqwest::StatusCode;

use crate::common::{Gateway, Upstream, eventually_async, wait_for_async};
use crate::json;

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
    // A fixed wait: the cached entry must outlive positive_ttl (100 ms), so that what serves it
    // below is stale_if_error, not a fresh entry; nothing outside the cache shows its age.
    tokio::time::sleep(Duration::from_millis(150)).await;

    // The health answer asks the store at most once a second: unhealthy within that.
    let what = "health to report the broken store";
    let resp = wait_for_async(Duration::from_secs(2), what, async || {
        let resp = client
            .get(gw.url("/health/api-auth/"))
            .send()
            .await
            .unwrap();
        match resp.status() {
            StatusCode::SERVICE_UNAVAILABLE => Ok(resp),
            status => Err(status),
        }
    })
    .await;
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
    eventually_async(
        Duration::from_secs(2),
        "health to recover after the repair",
        async || {
            let health = client.get(gw.url("/health/api-auth/")).send().await;
            health.unwrap().status() == StatusCode::OK
        },
    )
    .await;
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
