//! Rate limits shared by the fleet through Redis, and per-instance limits while Redis is gone.

use std::time::Duration;

use reqwest::StatusCode;

use crate::common::redis::Redis;
use crate::common::{Gateway, Upstream};
use crate::{redis_overrides, status};

#[tokio::test]
async fn rate_limits_are_shared_by_the_fleet_and_degrade_to_local_limits() {
    let dir = tempfile::tempdir().unwrap();
    let mut redis = Redis::start(dir.path());
    let url = redis.url();
    let upstream = Upstream::start().await;
    let o = redis_overrides(
        &url,
        &[
            ("KEYGATE_RATE_LIMIT_PER_KEY", "10/min"),
            ("KEYGATE_RATE_LIMIT_FAILURES_PER_IP", "4/min"),
            ("KEYGATE_STORE_TIMEOUT", "300ms"),
            ("KEYGATE_STORE_STALE_IF_ERROR", "1m"),
            ("KEYGATE_SERVER_TRUSTED_PROXIES", "[\"127.0.0.1\"]"),
            // Sharing is what is tested here: a loaded CI machine must not turn a slow (but
            // working) Redis into the degraded per-instance mode. A dead Redis still fails fast.
            ("KEYGATE_RATE_LIMIT_SHARED_TIMEOUT", "2s"),
        ],
    );
    let a = Gateway::start(&upstream.url(), &o).await;
    let b = Gateway::start(&upstream.url(), &o).await;
    let key = a.create_key("shared").await;

    // 30 requests alternating between the instances: the fleet admits exactly the limit.
    let mut admitted = 0;
    for i in 0..30 {
        let gw = if i % 2 == 0 { &a } else { &b };
        match status(gw, &key).await {
            StatusCode::OK => admitted += 1,
            StatusCode::TOO_MANY_REQUESTS => {}
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(
        admitted, 10,
        "two instances together admitted {admitted} of a 10/min limit"
    );
    assert_eq!(upstream.count(), 10);

    // Failed attempts from one IP count fleet-wide too: 4 guesses, then the lockout.
    let mut unauthorized = 0;
    for i in 0..8 {
        let gw = if i % 2 == 0 { &a } else { &b };
        let guess = keygate::key::generate().unwrap();
        let resp = gw
            .client()
            .get(gw.url("/x"))
            .header("X-Forwarded-For", "203.0.113.9")
            .header("X-API-Key", guess.expose())
            .send()
            .await
            .unwrap();
        match resp.status() {
            StatusCode::UNAUTHORIZED => unauthorized += 1,
            StatusCode::TOO_MANY_REQUESTS => {}
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(
        unauthorized, 4,
        "the fleet let {unauthorized} guesses through a 4/min budget"
    );

    // Redis gone: limits are enforced per instance, and the gateway says so.
    redis.kill();
    let before = std::time::Instant::now();
    let resp = a.get_with_key("/x", &key).await;
    assert!(
        before.elapsed() < Duration::from_secs(3),
        "a request waited {:?}",
        before.elapsed()
    );
    // The shared budget is spent, but this instance's own budget is not: served by the local
    // limiter (the key itself is served from the cache, stale_if_error).
    assert_eq!(resp.status(), StatusCode::OK);
    let metrics = a.metrics().await;
    assert!(
        metrics
            .lines()
            .any(|l| l == "keygate_rate_limit_degraded 1"),
        "{metrics}"
    );
    let mut local = 1;
    while a.get_with_key("/x", &key).await.status() == StatusCode::OK {
        local += 1;
        assert!(
            local <= 10,
            "the local limiter admitted more than the limit"
        );
    }
    assert_eq!(local, 10, "per-instance limit while degraded");
    a.shutdown().await;
    b.shutdown().await;
}
