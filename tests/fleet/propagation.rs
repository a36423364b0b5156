//! Changes reaching every gateway: a revocation within a second on every instance, also after
//! the subscriptions are killed; missed messages and a trimmed change stream caught up by
//! polling; and cached keys served without a single Redis round trip.

use std::time::{Duration, Instant};

use reqwest::StatusCode;

use crate::common::redis::Redis;
use crate::common::{Gateway, Upstream, eventually_async, wait_for_async};
use crate::{WITHIN_A_SECOND, all_within, cli, redis_overrides, status};

// On a multi-threaded runtime, as `keygate serve` runs: the gateways' background tasks (the
// subscriptions, the change poller) run beside this test's blocking calls to the CLI and
// `redis-cli` instead of waiting for them: on a busy machine those calls can take a good part
// of the one-second budget.
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
    all_within(&[&a, &b], &key, StatusCode::OK, WITHIN_A_SECOND).await;
    cli(&a, &url, &["revoke", "fleet"]);
    let took = all_within(&[&a, &b], &key, StatusCode::UNAUTHORIZED, WITHIN_A_SECOND).await;
    eprintln!("revocation reached both instances in {took:?}");

    // Kill every subscription; change the key while the instances are (re)subscribing.
    redis.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]).unwrap();
    cli(&a, &url, &["enable", "fleet"]);
    all_within(&[&a, &b], &key, StatusCode::OK, WITHIN_A_SECOND).await;
    cli(&a, &url, &["revoke", "fleet"]);
    all_within(&[&a, &b], &key, StatusCode::UNAUTHORIZED, WITHIN_A_SECOND).await;
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
    all_within(&[&gw], &key, StatusCode::UNAUTHORIZED, WITHIN_A_SECOND).await;

    // Re-enabled, and the stream entry is lost too (trimmed): a gap, so everything is re-read.
    silent_change("1", false);
    redis
        .cli(&["XTRIM", "{keygate}:changes", "MAXLEN", "0"])
        .unwrap();
    all_within(&[&gw], &key, StatusCode::OK, WITHIN_A_SECOND).await;
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
    // Usage scripts run so far (`command_calls` leaves out its own INFO).
    let scripts_run = || {
        let calls = redis.command_calls();
        calls.get("evalsha").copied().unwrap_or(0) + calls.get("eval").copied().unwrap_or(0)
    };
    let before = redis.command_calls();
    let started = Instant::now();
    let client = gw.client();
    for _ in 0..300 {
        let resp = gw.get_with_key_on(&client, "/x", &key).await;
        assert_eq!(resp.status(), StatusCode::OK);
    }
    // The window measured ends with a usage flush that began after the last request.
    let at_end = scripts_run();
    let what = "a usage flush after the requests";
    eventually_async(Duration::from_secs(5), what, async || {
        scripts_run() > at_end
    })
    .await;
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
    // Read after the window: every use is counted (a flush under way as the requests ended may
    // leave the last few to the next one).
    wait_for_async(Duration::from_secs(2), "301 uses counted", async || {
        let r = gw.store.find("hot").await.unwrap();
        if r.use_count == 301 {
            Ok(())
        } else {
            Err(format!("{r:?}"))
        }
    })
    .await;
    gw.shutdown().await;
}
