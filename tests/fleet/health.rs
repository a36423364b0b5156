//! Health on Redis: honest about a read-only store and per-instance rate limits, and asking the
//! store at most once a second however often it is asked.

use std::time::{Duration, Instant};

use reqwest::StatusCode;

use crate::common::redis::Redis;
use crate::common::{self, Gateway, Upstream, wait_for_async};
use crate::{cli, documented_acl, redis_overrides, status};

/// Health is honest, and cheap: a gateway pointed at a replica answers 503 naming the read-only
/// store (it still authenticates, and the CLI there fails in one line saying why); a gateway
/// whose shared rate limiter is refused (TIME taken from its ACL at run time) answers 200
/// "degraded" naming per-instance limits; and 200 health requests in a burst cost the store at
/// most one check (HELLO and ZCOUNT) per second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_honest_and_asks_the_store_at_most_once_a_second() {
    let dir = tempfile::tempdir().unwrap();
    let primary = Redis::start(&dir.path().join("primary"));
    let replica = Redis::start_replica(&dir.path().join("replica"), &primary);
    let acl = documented_acl("+time");
    let acl: Vec<&str> = acl.iter().map(String::as_str).collect();
    for node in [&primary, &replica] {
        assert_eq!(node.cli(&acl).as_deref(), Some("OK"));
    }
    let user_url = |r: &Redis| format!("redis://keygate:CHANGE-ME@127.0.0.1:{}/0", r.port);
    let (on_primary, on_replica) = (user_url(&primary), user_url(&replica));
    let upstream = Upstream::start().await;
    let extra = [
        ("KEYGATE_RATE_LIMIT_PER_KEY", "100/min"),
        ("KEYGATE_RATE_LIMIT_SHARED_TIMEOUT", "2s"),
    ];
    let a = Gateway::start(&upstream.url(), &redis_overrides(&on_primary, &extra)).await;
    let key = cli(&a, &on_primary, &["create", "--name", "honest"]);
    let b = Gateway::start(&upstream.url(), &redis_overrides(&on_replica, &extra)).await;

    // On the replica: keys are still authenticated, but health and readiness say 503, and why.
    let (code, body) = a.health().await;
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "healthy");
    // The replica has the key once replication has caught up.
    b.wait_for_status(&key, StatusCode::OK, Duration::from_secs(10))
        .await;
    let (code, body) = b.health().await;
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["problems"][0], "store_read_only");
    let (code, body) = b.ready().await;
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(b.metrics().await.contains("keygate_store_read_only 1"));
    let env = [
        ("KEYGATE_STORE_BACKEND", "redis"),
        ("KEYGATE_STORE_URL", on_replica.as_str()),
    ];
    let err = common::keys_cli_result(&b.config_path, &env, &["revoke", "honest"]).unwrap_err();
    eprintln!("revoke on a replica: {err}");
    assert!(
        err.starts_with("keygate: error: key store is read-only:")
            && err.contains("redis-sentinel")
            && !err.contains('\n'),
        "{err}"
    );

    // The shared limiter loses TIME: limits become per instance, and health says so (200).
    assert_eq!(
        primary
            .cli(&["ACL", "SETUSER", "keygate", "-time"])
            .as_deref(),
        Some("OK")
    );
    assert_eq!(status(&a, &key).await, StatusCode::OK);
    let what = "health to report per-instance limits";
    let (code, body) = wait_for_async(Duration::from_secs(2), what, async || {
        let (code, body) = a.health().await;
        if body["status"] == "degraded" {
            Ok((code, body))
        } else {
            Err(body)
        }
    })
    .await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(body["problems"][0], "rate_limits_per_instance");
    assert!(a.metrics().await.contains("keygate_rate_limit_degraded 1"));

    // Health requests as fast as they come for 2.5 s: the store is asked (one HELLO and one
    // ZCOUNT) at most once a second.
    let checks = |calls: &std::collections::BTreeMap<String, u64>| {
        calls.get("hello").copied().unwrap_or(0) + calls.get("zcount").copied().unwrap_or(0)
    };
    let before = checks(&primary.command_calls());
    let client = a.client();
    let started = Instant::now();
    let mut requests = 0;
    while started.elapsed() < Duration::from_millis(2500) {
        let resp = client.get(a.url("/health/api-auth/")).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        requests += 1;
    }
    let asked = checks(&primary.command_calls()) - before;
    eprintln!("{requests} health requests in 2.5 s: {asked} store commands (HELLO + ZCOUNT)");
    assert!(requests > 100, "only {requests} health requests");
    // Three or four computations (at 0-1, 1-2, 2-2.5 s), two commands each.
    assert!(
        (2..=8).contains(&asked),
        "{asked} store commands for {requests} health requests in 2.5 s"
    );
    a.shutdown().await;
    b.shutdown().await;
}
