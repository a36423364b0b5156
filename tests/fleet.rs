//! Fleet mode: several real gateways sharing one real `redis-server` (started by the harness on
//! its own port): revocation everywhere within a second, a hot path that never touches Redis, and
//! the defined behaviour while Redis is killed or paused.

mod common;

use std::time::{Duration, Instant};

use common::redis::Redis;
use common::{Gateway, Upstream};
use reqwest::StatusCode;

fn redis_overrides<'a>(redis: &'a str, extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut o = vec![
        ("KEYGATE_STORE_BACKEND", "redis"),
        ("KEYGATE_STORE_URL", redis),
    ];
    o.extend_from_slice(extra);
    o
}

/// Runs `keygate keys ...` against the Redis store, as an operator would.
fn cli(gw: &Gateway, redis_url: &str, args: &[&str]) -> String {
    let env = [
        ("KEYGATE_STORE_BACKEND", "redis"),
        ("KEYGATE_STORE_URL", redis_url),
    ];
    common::keys_cli(&gw.config_path, &env, args)
}

async fn status(gw: &Gateway, key: &str) -> StatusCode {
    gw.get_with_key("/x", key).await.status()
}

async fn all_within(gws: &[&Gateway], key: &str, want: StatusCode, limit: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let mut done = true;
        for gw in gws {
            done &= status(gw, key).await == want;
        }
        if done {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < limit,
            "not every instance answers {want} after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// On a multi-threaded runtime, as `keygate serve` runs: the gateways' background tasks (the
// subscriptions, the change poller) run beside this test's blocking calls to the CLI and
// `redis-cli` instead of waiting for them. On the current-thread runtime this test failed about
// one run in twelve on a busy machine; the stall is the likely cause, not a proven one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_reaches_every_instance_within_a_second_even_after_a_lost_subscription() {
    let dir = tempfile::tempdir().unwrap();
    let redis = Redis::start(dir.path());
    let url = redis.url();
    let upstream = Upstream::start().await;
    // Polling is slowed to 30 s: what is measured here is the pub/sub path and its recovery.
    let o = redis_overrides(&url, &[("KEYGATE_STORE_POLL_INTERVAL", "30s")]);
    let a = Gateway::start(&upstream.url(), &o).await;
    let b = Gateway::start(&upstream.url(), &o).await;

    let key = cli(&a, &url, &["create", "--name", "fleet"]);
    all_within(&[&a, &b], &key, StatusCode::OK, Duration::from_secs(1)).await;
    cli(&a, &url, &["revoke", "fleet"]);
    let took = all_within(
        &[&a, &b],
        &key,
        StatusCode::UNAUTHORIZED,
        Duration::from_secs(1),
    )
    .await;
    eprintln!("revocation reached both instances in {took:?}");

    // Kill every subscription; change the key while the instances are (re)subscribing.
    redis.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]).unwrap();
    cli(&a, &url, &["enable", "fleet"]);
    all_within(&[&a, &b], &key, StatusCode::OK, Duration::from_secs(1)).await;
    cli(&a, &url, &["revoke", "fleet"]);
    all_within(
        &[&a, &b],
        &key,
        StatusCode::UNAUTHORIZED,
        Duration::from_secs(1),
    )
    .await;
    a.shutdown().await;
    b.shutdown().await;
}

/// Pub/sub is at-most-once: a message can be lost. Changes written without their message, and
/// then a change stream trimmed past the gateway's position, are still picked up by polling the
/// change counter (the gap drops the whole cache).
#[tokio::test]
async fn an_instance_that_misses_events_resynchronises_by_polling() {
    let dir = tempfile::tempdir().unwrap();
    let redis = Redis::start(dir.path());
    let url = redis.url();
    let upstream = Upstream::start().await;
    let gw = Gateway::start(
        &upstream.url(),
        &redis_overrides(&url, &[("KEYGATE_STORE_POLL_INTERVAL", "200ms")]),
    )
    .await;
    let key = gw.create_key("missed").await;
    assert_eq!(status(&gw, &key).await, StatusCode::OK);
    let digest = keygate::key::KeyDigest::of(key.as_bytes()).to_hex();
    let record = format!("{{keygate}}:k:{digest}");

    // A revocation whose pub/sub message never arrives.
    let silent_change = |active: &str, log: bool| {
        redis.cli(&["HSET", &record, "is_active", active]).unwrap();
        let seq = redis.cli(&["INCR", "{keygate}:seq"]).unwrap();
        if log {
            redis
                .cli(&[
                    "XADD",
                    "{keygate}:changes",
                    &format!("{seq}-1"),
                    "d",
                    &digest,
                ])
                .unwrap();
        }
    };
    silent_change("0", true);
    all_within(
        &[&gw],
        &key,
        StatusCode::UNAUTHORIZED,
        Duration::from_secs(1),
    )
    .await;

    // Re-enabled, and the stream entry is lost too (trimmed): a gap, so everything is re-read.
    silent_change("1", false);
    redis
        .cli(&["XTRIM", "{keygate}:changes", "MAXLEN", "0"])
        .unwrap();
    all_within(&[&gw], &key, StatusCode::OK, Duration::from_secs(1)).await;
    gw.shutdown().await;
}

#[tokio::test]
async fn cached_keys_make_no_redis_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let redis = Redis::start(dir.path());
    let url = redis.url();
    let upstream = Upstream::start().await;
    let gw = Gateway::start(
        &upstream.url(),
        &redis_overrides(
            &url,
            &[
                ("KEYGATE_STORE_POLL_INTERVAL", "30s"),
                ("KEYGATE_STORE_USAGE_FLUSH_INTERVAL", "400ms"),
            ],
        ),
    )
    .await;
    // The key's creation reaches the gateway on the change feed and evicts its digest: wait
    // until it has, before the key is first cached. A marker key, looked up (and cached as
    // unknown) first and created after it, answers 200 only once the feed got that far.
    let marker = keygate::key::generate().unwrap();
    assert_eq!(status(&gw, marker.expose()).await, StatusCode::UNAUTHORIZED);
    let key = gw.create_key("hot").await;
    let record = keygate::store::KeyRecord::new("marker", &marker, 0, None).unwrap();
    gw.store.insert(record).await.unwrap();
    all_within(
        &[&gw],
        marker.expose(),
        StatusCode::OK,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(status(&gw, &key).await, StatusCode::OK);
    let before = redis.command_calls();
    let started = Instant::now();
    let client = gw.client();
    for _ in 0..300 {
        let resp = gw.get_with_key_on(&client, "/x", &key).await;
        assert_eq!(resp.status(), StatusCode::OK);
    }
    tokio::time::sleep(Duration::from_millis(500)).await; // at least one usage flush
    let elapsed = started.elapsed();
    let after = redis.command_calls();
    let delta: std::collections::BTreeMap<&str, u64> = after
        .iter()
        .map(|(name, n)| (name.as_str(), n - before.get(name).copied().unwrap_or(0)))
        .filter(|(_, n)| *n > 0)
        .collect();
    eprintln!("300 requests in {elapsed:?}: Redis commands {delta:?}");
    // The only commands are the batched usage writes: one script per flush (the first also
    // loads it after EVALSHA's NOSCRIPT), and the commands the script runs inside Redis.
    let flushes = u64::try_from(elapsed.as_millis() / 400 + 1).unwrap();
    let scripts =
        delta.get("evalsha").copied().unwrap_or(0) + delta.get("eval").copied().unwrap_or(0);
    assert!(
        scripts >= 1 && scripts <= 2 * flushes,
        "usage is written per batch: {delta:?}"
    );
    assert!(
        delta.keys().all(|c| matches!(
            *c,
            "evalsha" | "eval" | "script|load" | "exists" | "hget" | "hset" | "hincrby"
        )),
        "cached keys caused Redis round trips: {delta:?}"
    );
    assert_eq!(delta.get("hgetall"), None, "a cached key was looked up");
    let r = gw.store.find("hot").await.unwrap();
    assert_eq!(r.use_count, 301);
    gw.shutdown().await;
}

#[tokio::test]
async fn redis_killed_then_restarted() {
    let dir = tempfile::tempdir().unwrap();
    let mut redis = Redis::start(dir.path());
    let url = redis.url();
    let upstream = Upstream::start().await;
    let gw = outage_gateway(&upstream, &url).await;
    let cached = gw.create_key("cached").await;
    let later = gw.create_key("later").await;
    assert_eq!(status(&gw, &cached).await, StatusCode::OK);

    redis.kill();
    tokio::time::sleep(Duration::from_millis(150)).await; // past positive_ttl
    outage_behaviour(&gw, &cached, &later).await;

    redis.restart();
    let started = Instant::now();
    // Within 2 s everything is normal again, without a restart of the gateway.
    loop {
        let health = gw
            .client()
            .get(gw.url("/health/api-auth/"))
            .send()
            .await
            .unwrap()
            .status();
        if health == StatusCode::OK && status(&gw, &later).await == StatusCode::OK {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "not recovered 2 s after Redis came back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("recovered {:?} after Redis restarted", started.elapsed());
    cli(&gw, &url, &["revoke", "cached"]);
    all_within(
        &[&gw],
        &cached,
        StatusCode::UNAUTHORIZED,
        Duration::from_secs(1),
    )
    .await;
    gw.shutdown().await;
}

#[tokio::test]
async fn redis_paused_behaves_like_redis_down() {
    let dir = tempfile::tempdir().unwrap();
    let redis = Redis::start(dir.path());
    let url = redis.url();
    let upstream = Upstream::start().await;
    let gw = outage_gateway(&upstream, &url).await;
    let cached = gw.create_key("cached").await;
    let later = gw.create_key("later").await;
    assert_eq!(status(&gw, &cached).await, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(150)).await;

    redis.cli(&["CLIENT", "PAUSE", "2500", "ALL"]).unwrap();
    outage_behaviour(&gw, &cached, &later).await;
    // After the pause everything is normal again.
    let started = Instant::now();
    while status(&gw, &later).await != StatusCode::OK {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "not recovered after the pause"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    gw.shutdown().await;
}

/// A gateway on Redis with a short store timeout and TTL, and a long stale_if_error.
async fn outage_gateway(upstream: &Upstream, redis_url: &str) -> Gateway {
    let o = redis_overrides(
        redis_url,
        &[
            ("KEYGATE_STORE_TIMEOUT", "300ms"),
            ("KEYGATE_STORE_POSITIVE_TTL", "100ms"),
            ("KEYGATE_STORE_STALE_IF_ERROR", "1m"),
        ],
    );
    Gateway::start(&upstream.url(), &o).await
}

/// With the store unreachable: a recently validated key still works, a key the gateway has not
/// seen gets 503 with Retry-After within the store timeout, and health and readiness say so.
async fn outage_behaviour(gw: &Gateway, cached: &str, unseen: &str) {
    let resp = gw.get_with_key("/x", cached).await;
    let code = resp.status();
    let headers = format!("{:?}", resp.headers());
    assert_eq!(
        code,
        StatusCode::OK,
        "stale_if_error not honoured: {headers} {}",
        resp.text().await.unwrap_or_default()
    );
    let started = Instant::now();
    let resp = gw.get_with_key("/x", unseen).await;
    // Bounded by the 300 ms store timeout (plus a TLS handshake on a possibly loaded machine).
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_millis(1500),
        "a request hung for {waited:?}"
    );
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(resp.headers()["retry-after"], "1");
    let health = gw
        .client()
        .get(gw.url("/health/api-auth/"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), StatusCode::SERVICE_UNAVAILABLE);
    let ready = reqwest::get(format!("http://{}/readyz", gw.admin))
        .await
        .unwrap();
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: serde_json::Value = ready.json().await.unwrap();
    assert_eq!(body["store"], "down");
}

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

#[tokio::test]
async fn a_gateway_on_a_redis_cluster_authenticates_and_sees_revocations() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = common::redis::Cluster::start(dir.path());
    let nodes = format!(
        "[{}]",
        cluster
            .urls()
            .iter()
            .map(|u| format!("\"{u}\""))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let upstream = Upstream::start().await;
    let gw = Gateway::start(
        &upstream.url(),
        &[
            ("KEYGATE_STORE_BACKEND", "redis-cluster"),
            ("KEYGATE_STORE_CLUSTER_NODES", &nodes),
            ("KEYGATE_STORE_POLL_INTERVAL", "30s"),
            ("KEYGATE_RATE_LIMIT_PER_KEY", "100/min"),
        ],
    )
    .await;
    let key = gw.create_key("clustered").await;
    all_within(&[&gw], &key, StatusCode::OK, Duration::from_secs(1)).await;
    gw.store.set_active("clustered", false).await.unwrap();
    let took = all_within(
        &[&gw],
        &key,
        StatusCode::UNAUTHORIZED,
        Duration::from_secs(1),
    )
    .await;
    eprintln!("revocation through the cluster took {took:?}");
    gw.shutdown().await;
}
