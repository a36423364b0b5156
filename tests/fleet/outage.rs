//! Redis unavailable: killed, paused, or restarted empty. Cached keys keep working (a key in use
//! for `stale_if_error` after its last use), unseen keys get 503 within the store timeout
//! (concurrent requests too), health and readiness say so, the outage is logged in a few lines,
//! the CLI fails in one, and everything recovers without a restart.

use std::time::{Duration, Instant};

use reqwest::StatusCode;

use crate::common::redis::Redis;
use crate::common::{self, Gateway, Upstream, eventually_async, wait_for_async};
use crate::{
    WITHIN_A_SECOND, all_within, check_config, cli, outage_waves, outlive_positive_ttl,
    redis_overrides, status,
};

#[tokio::test]
async fn redis_killed_then_restarted() {
    let dir = tempfile::tempdir().unwrap();
    let mut redis = Redis::start(dir.path());
    let url = redis.url();
    let upstream = Upstream::start().await;
    let gw = outage_gateway(&upstream, &url, &[]).await;
    let cached = gw.create_key("cached").await;
    let later = gw.create_key("later").await;
    assert_eq!(status(&gw, &cached).await, StatusCode::OK);

    redis.kill();
    outlive_positive_ttl().await;
    outage_behaviour(&gw, &cached, &later).await;

    redis.restart();
    // Within 2 s everything is normal again, without a restart of the gateway.
    let what = "the gateway to recover after Redis came back";
    let took = eventually_async(Duration::from_secs(2), what, async || {
        let health = gw
            .client()
            .get(gw.url("/health/api-auth/"))
            .send()
            .await
            .unwrap()
            .status();
        health == StatusCode::OK && status(&gw, &later).await == StatusCode::OK
    })
    .await;
    eprintln!("recovered {took:?} after Redis restarted");
    cli(&gw, &url, &["revoke", "cached"]);
    all_within(&[&gw], &cached, StatusCode::UNAUTHORIZED, WITHIN_A_SECOND).await;
    gw.shutdown().await;
}

#[tokio::test]
async fn redis_paused_behaves_like_redis_down() {
    let dir = tempfile::tempdir().unwrap();
    let redis = Redis::start(dir.path());
    let url = redis.url();
    let upstream = Upstream::start().await;
    let gw = outage_gateway(&upstream, &url, &[]).await;
    let cached = gw.create_key("cached").await;
    let later = gw.create_key("later").await;
    assert_eq!(status(&gw, &cached).await, StatusCode::OK);
    outlive_positive_ttl().await;

    redis.cli(&["CLIENT", "PAUSE", "2500", "ALL"]).unwrap();
    outage_behaviour(&gw, &cached, &later).await;
    // After the pause everything is normal again.
    eventually_async(
        Duration::from_secs(5),
        "recovery after the pause",
        async || status(&gw, &later).await == StatusCode::OK,
    )
    .await;
    gw.shutdown().await;
}

/// A key in use keeps working through an outage for `stale_if_error` after its last use, not
/// after its first read: a request past `positive_ttl` has it re-read in the background, which
/// moves the end of its entry on. Here `positive_ttl` is 100 ms and `stale_if_error` 4 s; the key
/// is read at 0 s, used at 1.5 s, Redis is killed, and the key still works at 4.8 s, past the
/// 4.1 s its first read alone would have given it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_in_use_outlives_its_first_read_in_an_outage() {
    let dir = tempfile::tempdir().unwrap();
    let mut redis = Redis::start(dir.path());
    let url = redis.url();
    let upstream = Upstream::start().await;
    let gw = outage_gateway(
        &upstream,
        &url,
        &[
            ("KEYGATE_STORE_STALE_IF_ERROR", "4s"),
            // Each poll confirms the feed for 2 s: a busy machine does not make it lapse.
            ("KEYGATE_STORE_POLL_INTERVAL", "1s"),
        ],
    )
    .await;
    let key = gw.create_key("in-use").await;
    // The gateway applies the creation's change (at its next poll, within 1 s) before the key is
    // read: applied after, it would evict the entry and the next request would read the store.
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let counter = async |name: &str| common::metric_value(&gw.metrics().await, name);

    let read = Instant::now();
    assert_eq!(status(&gw, &key).await, StatusCode::OK);
    tokio::time::sleep_until((read + Duration::from_millis(1500)).into()).await;
    let misses = counter("keygate_cache_misses_total").await;
    assert_eq!(status(&gw, &key).await, StatusCode::OK);
    assert_eq!(
        counter("keygate_cache_misses_total").await,
        misses,
        "past positive_ttl, with the change feed confirmed, the key was read by its request"
    );
    eventually_async(
        Duration::from_secs(1),
        "the background re-read of the key in use",
        async || counter("keygate_cache_refreshes_total").await == 1.0,
    )
    .await;

    redis.kill();
    let down = Instant::now();
    tokio::time::sleep_until((read + Duration::from_millis(4800)).into()).await;
    let resp = gw.get_with_key("/x", &key).await;
    assert_eq!(
        resp.status(),
        StatusCode::OK,
        "{:?} after the first read, {:?} into the outage",
        read.elapsed(),
        down.elapsed()
    );
    assert_eq!(counter("keygate_cache_stale_served_total").await, 1.0);
    gw.shutdown().await;
}

/// A gateway on Redis with a short store timeout and TTL, and a long stale_if_error; then
/// `extra` overrides, which take precedence.
async fn outage_gateway(upstream: &Upstream, redis_url: &str, extra: &[(&str, &str)]) -> Gateway {
    let mut o = redis_overrides(
        redis_url,
        &[
            ("KEYGATE_STORE_TIMEOUT", "300ms"),
            ("KEYGATE_STORE_POSITIVE_TTL", "100ms"),
            ("KEYGATE_STORE_STALE_IF_ERROR", "1m"),
        ],
    );
    o.extend_from_slice(extra);
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

/// The outage case, measured: a key used once, Redis killed (`kill -9`, then in a second
/// round paused with `CLIENT PAUSE`), positive_ttl passed, then 8 concurrent requests for that
/// key and 8 for keys this gateway never saw. Each is answered within the store timeout, not one
/// after another (the known key 200 from the cache, the unseen ones 503), and once the breaker is
/// open, at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_concurrent_requests_in_an_outage_are_each_answered_within_the_store_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let mut redis = Redis::start(dir.path());
    let url = redis.url();
    let upstream = Upstream::start().await;
    let timeout = Duration::from_millis(500);
    let gw = Gateway::start(
        &upstream.url(),
        &redis_overrides(
            &url,
            &[
                ("KEYGATE_STORE_TIMEOUT", "500ms"),
                ("KEYGATE_STORE_POSITIVE_TTL", "100ms"),
                ("KEYGATE_STORE_STALE_IF_ERROR", "1m"),
                ("KEYGATE_RATE_LIMIT_FAILURES_PER_IP", ""),
            ],
        ),
    )
    .await;
    let known = gw.create_key("used-once").await;
    let mut rounds = Vec::new();
    for round in 0..2 {
        let mut unseen = Vec::new();
        for i in 0..8 {
            unseen.push(gw.create_key(&format!("unseen-{round}-{i}")).await);
        }
        rounds.push(unseen);
    }
    for (outage, unseen) in ["kill -9", "CLIENT PAUSE"].into_iter().zip(rounds) {
        assert_eq!(status(&gw, &known).await, StatusCode::OK);
        let pause = Duration::from_secs(3);
        let began = Instant::now();
        match outage {
            "kill -9" => redis.kill(),
            _ => {
                let ms = pause.as_millis().to_string();
                redis.cli(&["CLIENT", "PAUSE", &ms, "ALL"]).unwrap();
            }
        }
        outlive_positive_ttl().await;
        // Within the store timeout, plus what a TLS request costs on a busy machine.
        outage_waves(
            &gw,
            &known,
            &unseen,
            outage,
            timeout + Duration::from_millis(400),
        )
        .await;
        assert!(gw.metrics().await.contains("keygate_store_breaker_open 1"));
        let back = if outage == "kill -9" {
            redis.restart();
            Instant::now()
        } else {
            began + pause
        };
        // Recovered within 5 s of Redis being back (for the pause, a moment still to come).
        let within = (back + Duration::from_secs(5)).saturating_duration_since(Instant::now());
        let what = format!("recovery after the {outage}");
        eventually_async(within, &what, async || {
            status(&gw, &unseen[0]).await == StatusCode::OK
        })
        .await;
        eprintln!(
            "{outage}: an unseen key served again {:?} after Redis was back",
            Instant::now().saturating_duration_since(back)
        );
        assert!(gw.metrics().await.contains("keygate_store_breaker_open 0"));
    }
    gw.shutdown().await;
}

/// Redis restarted empty (no persistence) is a store that lost its data, not an empty one:
/// unknown keys get 503 (never 401, so clients retrying their keys are not locked out with 429),
/// cached keys are served, health and readiness say 503 with the reason, and
/// `keygate_store_data_lost` is 1. Restoring the backup (`keygate keys import`) writes a new
/// identity marker, which every gateway adopts: everything works again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_empty_is_unavailable_not_empty() {
    let dir = tempfile::tempdir().unwrap();
    let mut redis = Redis::start_volatile(dir.path());
    let url = redis.url();
    let upstream = Upstream::start().await;
    let o = redis_overrides(
        &url,
        &[
            ("KEYGATE_STORE_POSITIVE_TTL", "100ms"),
            ("KEYGATE_STORE_STALE_IF_ERROR", "1m"),
            // The default failure budget: a wave of 401s would lock the client out.
            ("KEYGATE_RATE_LIMIT_FAILURES_PER_IP", "20/min"),
        ],
    );
    let a = Gateway::start(&upstream.url(), &o).await;
    let b = Gateway::start(&upstream.url(), &o).await;
    let cached = cli(&a, &url, &["create", "--name", "cached"]);
    let uncached = cli(&a, &url, &["create", "--name", "uncached"]);
    let backup = a.dir.path().join("backup.json");
    cli(&a, &url, &["export", "--out", backup.to_str().unwrap()]);
    all_within(&[&a, &b], &cached, StatusCode::OK, Duration::from_secs(2)).await;

    redis.restart();
    assert_eq!(redis.cli(&["DBSIZE"]).as_deref(), Some("0"), "not empty");
    let lost_at = Instant::now();
    for gw in [&a, &b] {
        let within = (lost_at + Duration::from_secs(5)).saturating_duration_since(Instant::now());
        let body = wait_for_async(within, "health to report the loss", async || {
            let (code, body) = gw.health().await;
            let lost = body["problems"]
                .as_array()
                .is_some_and(|p| p.iter().any(|p| p == "store_data_lost"));
            if code == StatusCode::SERVICE_UNAVAILABLE && lost {
                Ok(body)
            } else {
                Err(format!("{code} {body}"))
            }
        })
        .await;
        // The public answer names the problem by its code, never by internal text.
        assert!(body.get("error").is_none(), "{body}");
        let (code, body) = gw.ready().await;
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert_eq!(body["store"], "down");
        // The admin listener (loopback) says why.
        assert!(
            body["error"].as_str().unwrap().contains("identity marker"),
            "{body}"
        );
        assert!(gw.metrics().await.contains("keygate_store_data_lost 1"));
    }
    // 30 requests each: the cached key is served, the uncached one 503, nothing 401 or 429.
    for gw in [&a, &b] {
        for _ in 0..30 {
            assert_eq!(status(gw, &cached).await, StatusCode::OK);
            let resp = gw.get_with_key("/x", &uncached).await;
            assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(resp.headers()["retry-after"], "1");
        }
    }

    // `keygate store status` shows the marker gone.
    let store_cli = |args: &[&str]| {
        let env = [
            ("KEYGATE_STORE_BACKEND", "redis"),
            ("KEYGATE_STORE_URL", url.as_str()),
        ];
        common::cli_result(&a.config_path, &env, args).unwrap()
    };
    let status_json = |text: String| serde_json::from_str::<serde_json::Value>(&text).unwrap();
    let lost = status_json(store_cli(&["store", "status", "--json"]));
    assert!(lost["identity"].is_null(), "{lost}");

    // The restore writes a new identity marker; the gateways adopt the store as restored.
    cli(&a, &url, &["import", backup.to_str().unwrap()]);
    let restored = status_json(store_cli(&["store", "status", "--json"]));
    assert_eq!(restored["identity"]["generation"], 1, "{restored}");
    assert_eq!(restored["read_only"], false);
    all_within(&[&a, &b], &uncached, StatusCode::OK, Duration::from_secs(2)).await;
    for gw in [&a, &b] {
        assert!(gw.metrics().await.contains("keygate_store_data_lost 0"));
        // The health answer is computed at most once a second: healthy within that.
        eventually_async(
            Duration::from_secs(2),
            "health to recover after the restore",
            async || gw.health().await.0 == StatusCode::OK,
        )
        .await;
    }
    // `keygate store accept` raises the generation: the gateways adopt the store again (a gap:
    // their caches are read anew), and keys keep working.
    store_cli(&["store", "accept"]);
    let accepted = status_json(store_cli(&["store", "status", "--json"]));
    assert_eq!(accepted["identity"]["generation"], 2, "{accepted}");
    assert_eq!(accepted["identity"]["id"], restored["identity"]["id"]);
    all_within(&[&a, &b], &uncached, StatusCode::OK, WITHIN_A_SECOND).await;
    // And the feed works on the restored store.
    cli(&a, &url, &["revoke", "cached"]);
    all_within(
        &[&a, &b],
        &cached,
        StatusCode::UNAUTHORIZED,
        WITHIN_A_SECOND,
    )
    .await;
    a.shutdown().await;
    b.shutdown().await;
}

/// A Redis outage is logged when it begins (and then at most every 30 s, with counts), not
/// several lines a second while requests, polls and the subscription keep failing; the
/// recovery line says how long it lasted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_logs_a_few_lines_not_several_a_second() {
    let dir = tempfile::tempdir().unwrap();
    let mut redis = Redis::start(&dir.path().join("redis"));
    let url = redis.url();
    let upstream = Upstream::start().await;
    let config = common::write_config(dir.path(), &upstream.url());
    let env = [
        ("KEYGATE_STORE_BACKEND", "redis"),
        ("KEYGATE_STORE_URL", url.as_str()),
        ("KEYGATE_STORE_TIMEOUT", "300ms"),
        ("KEYGATE_STORE_POSITIVE_TTL", "100ms"),
        ("KEYGATE_RATE_LIMIT_PER_KEY", "1000/min"),
    ];
    // Created before the gateway starts, so that its feed begins after the creation: a change
    // the gateway applied after the first request would drop the entry the outage relies on.
    let key = common::keys_cli(&config, &env, &["create", "--name", "logged"]);
    let gw = common::Process::start(&config, &env);
    let cert = std::fs::read(dir.path().join("cert.pem")).unwrap();
    let client = common::tls_client(&cert, gw.https);
    let url_x = format!("https://localhost:{}/x", gw.https.port());
    let get = |key: String| {
        let (client, url_x) = (client.clone(), url_x.clone());
        async move {
            client
                .get(url_x)
                .header("X-API-Key", key)
                .send()
                .await
                .unwrap()
                .status()
        }
    };
    assert_eq!(get(key.clone()).await, StatusCode::OK);
    let warnings = || {
        gw.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains("\"level\":\"WARN\""))
            .cloned()
            .collect::<Vec<_>>()
    };
    let before = warnings().len();

    // Three seconds of outage under traffic: 10 requests a second, cached and unknown keys.
    redis.kill();
    let down = Instant::now();
    while down.elapsed() < Duration::from_secs(3) {
        let unknown = keygate::key::generate().unwrap().expose().to_owned();
        let answers = (get(key.clone()).await, get(unknown).await);
        assert_eq!(
            answers,
            (StatusCode::OK, StatusCode::SERVICE_UNAVAILABLE),
            "{:?} into the outage (cached key, unknown key); the gateway wrote:\n{}",
            down.elapsed(),
            gw.output()
        );
        // Paced on purpose: the traffic's rate is part of what the log must not follow.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let during: Vec<String> = warnings().split_off(before);
    eprintln!("{} WARN lines in 3 s of outage:", during.len());
    for line in &during {
        eprintln!("  {line}");
    }
    assert!(
        during.len() <= 4,
        "{} WARN lines in 3 s of outage",
        during.len()
    );
    assert!(
        during.iter().any(|l| l.contains("key store unavailable")),
        "the outage itself is not logged"
    );

    redis.restart();
    eventually_async(Duration::from_secs(5), "the recovery line", async || {
        gw.lines
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("key store available again") && l.contains("failed_probes"))
    })
    .await;
}

/// The CLI against a paused Redis fails within the store timeout, with one line saying so,
/// instead of waiting in silence; `check-config` warns that the store does not answer (serve
/// starts without it).
#[test]
fn the_cli_against_a_paused_redis_fails_within_the_store_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let redis = Redis::start(dir.path());
    let url = redis.url();
    let config = common::write_config(dir.path(), "http://127.0.0.1:9");
    let env = [
        ("KEYGATE_STORE_BACKEND", "redis"),
        ("KEYGATE_STORE_URL", url.as_str()),
        ("KEYGATE_STORE_TIMEOUT", "1s"),
    ];
    common::keys_cli(&config, &env, &["create", "--name", "paused"]);
    redis.cli(&["CLIENT", "PAUSE", "20000", "ALL"]).unwrap();
    for args in [
        &["list"][..],
        &["revoke", "paused"],
        &["create", "--name", "other"],
    ] {
        let started = Instant::now();
        let err = common::keys_cli_result(&config, &env, args).unwrap_err();
        let took = started.elapsed();
        eprintln!("keygate keys {args:?} against a paused Redis: {took:?}: {err}");
        assert!(took < Duration::from_secs(3), "{args:?} took {took:?}");
        assert!(
            err.starts_with(
                "keygate: error: key store unavailable: no answer from Redis at 127.0.0.1:"
            ) && err.contains("within 1s (store.timeout)")
                && !err.contains('\n'),
            "{err}"
        );
    }
    // check-config: a warning, as serve starts without the store.
    let started = Instant::now();
    let (checked, said) = check_config(&config, &env);
    eprintln!(
        "check-config against a paused Redis: {:?}",
        started.elapsed()
    );
    assert!(
        checked
            && said.contains("keygate: warning: key store unavailable: no answer from Redis at ")
            && said.contains("serve starts without it and reports it down"),
        "{said}"
    );
    // Dropped with the test: the server is killed, paused or not.
}
