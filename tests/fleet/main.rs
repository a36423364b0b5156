//! Fleet mode: several real gateways (in-process) sharing real Redis servers that the harness
//! starts on their own ports (a single server, replicas under Sentinel, a three-node Cluster).
//! One test binary, one module per feature:
//!
//! - `propagation`: changes on every instance within a second; no Redis round trip on a hit
//! - `outage`: Redis killed, paused or restarted empty, and the recovery
//! - `rate_limits`: limits shared by the fleet, per instance while Redis is gone
//! - `cluster`: Redis Cluster, its nodes failing
//! - `sentinel`: failover and crash under Sentinel, no revocation lost
//! - `access`: the documented ACL user, TLS with client certificates
//! - `health`: honest and cheap health on Redis

#[path = "../common/mod.rs"]
mod common;

mod access;
mod cluster;
mod health;
mod outage;
mod propagation;
mod rate_limits;
mod sentinel;

use std::time::{Duration, Instant};

use common::{Gateway, wait_for_async};
use reqwest::StatusCode;

/// `KEYGATE_*` overrides for a gateway on the Redis at `redis`, then `extra`.
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

/// Runs `keygate serve` with `env`, which must refuse to start (exit within 20 s, and not with
/// success) in one line on stderr without `secret` in it; returns that line. `keygate
/// check-config` must refuse with the same line.
fn refused_start(config: &std::path::Path, env: &[(&str, &str)], secret: &str) -> String {
    let mut env = env.to_vec();
    env.push(("KEYGATE_LOGGING_LEVEL", "error"));
    let mut child = common::keygate()
        .arg("--config")
        .arg(config)
        .arg("serve")
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let status = common::poll(Duration::from_secs(20), || child.try_wait().unwrap());
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    match status {
        None => panic!("keygate serve did not exit; it wrote: {stderr}"),
        Some(s) if s.success() => panic!("keygate serve started: {stderr}"),
        Some(_) => {}
    }
    let line = stderr.trim().to_owned();
    eprintln!("refused start: {line}");
    assert!(
        line.starts_with("keygate: error: ") && !line.contains('\n') && !line.contains(secret),
        "not one line, or with {secret:?} in it: {line}"
    );
    let (checked, said) = check_config(config, &env);
    assert!(!checked && said == line, "check-config said: {said}");
    line
}

/// Runs `keygate check-config` with `env`: whether it found the configuration valid, and what it
/// wrote on stderr.
fn check_config(config: &std::path::Path, env: &[(&str, &str)]) -> (bool, String) {
    let out = common::keygate()
        .arg("--config")
        .arg(config)
        .arg("check-config")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    (out.status.success(), stderr)
}

/// The status `GET /x` with `key` gets.
async fn status(gw: &Gateway, key: &str) -> StatusCode {
    gw.get_with_key("/x", key).await.status()
}

/// How soon a revocation (or any key change) must be felt by every gateway.
const WITHIN_A_SECOND: Duration = Duration::from_secs(1);

/// Polls every gateway with `key` until all of them, in one round, answer `want`; panics after
/// `limit`. Returns how long it took (a change's propagation time).
async fn all_within(gws: &[&Gateway], key: &str, want: StatusCode, limit: Duration) -> Duration {
    let started = Instant::now();
    let what = format!("every instance to answer {want}");
    wait_for_async(limit, &what, async || {
        let mut answers = Vec::new();
        for gw in gws {
            answers.push(status(gw, key).await);
        }
        if answers.iter().all(|&a| a == want) {
            Ok(())
        } else {
            Err(format!("{answers:?}"))
        }
    })
    .await;
    started.elapsed()
}

/// Waits (10 s at most) until `gw`'s readiness answer is 503 with Redis's refusal of keygate's
/// credentials in it.
async fn not_ready_for_refused_credentials(gw: &Gateway) {
    wait_for_async(
        Duration::from_secs(10),
        "the readiness answer to give Redis's refusal",
        async || match gw.ready().await {
            (StatusCode::SERVICE_UNAVAILABLE, body)
                if body.to_string().contains("refuses keygate's credentials") =>
            {
                Ok(())
            }
            (code, body) => Err(format!("{code} {body}")),
        },
    )
    .await;
}

/// Waits (10 s at most) until `gw`'s health answer is 200.
async fn healthy_again(gw: &Gateway) {
    wait_for_async(
        Duration::from_secs(10),
        "the gateway to recover",
        async || match gw.health().await {
            (StatusCode::OK, _) => Ok(()),
            (code, body) => Err(format!("{code} {body}")),
        },
    )
    .await;
}

/// Waits until a cached key's entry has outlived `positive_ttl` (100 ms in these gateways), so
/// that what serves it next is `stale_if_error`. A fixed wait: nothing outside the cache shows
/// an entry's age.
async fn outlive_positive_ttl() {
    tokio::time::sleep(Duration::from_millis(150)).await;
}

/// Sends two bursts (`burst`) while the store is down, the first opening the breaker and the
/// second meeting it open: in each, the known key gets 200 and the unseen ones 503, every answer
/// within `limit`. Prints each wave's latencies under `label`.
async fn outage_waves(gw: &Gateway, known: &str, unseen: &[String], label: &str, limit: Duration) {
    for wave in ["first", "breaker open"] {
        let results = burst(gw, known, unseen).await;
        let mut latencies: Vec<f64> = Vec::new();
        for (is_known, code, took) in &results {
            let want = if *is_known {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            assert_eq!(*code, want, "{label}, {wave} wave: {results:?}");
            assert!(
                *took < limit,
                "{label}, {wave} wave: a request took {took:?}: {results:?}"
            );
            latencies.push(took.as_secs_f64() * 1000.0);
        }
        latencies.sort_by(f64::total_cmp);
        eprintln!(
            "{label}, {wave} wave (8 known + 8 unseen, at once): latencies {latencies:.0?} ms"
        );
    }
}

/// Sends, all at once, 8 requests with `known` and one with each key of `unseen`; returns each
/// request's key (true: `known`), status and latency.
async fn burst(gw: &Gateway, known: &str, unseen: &[String]) -> Vec<(bool, StatusCode, Duration)> {
    let client = gw.client();
    let mut tasks = Vec::new();
    let keys = std::iter::repeat_n(known.to_owned(), 8).chain(unseen.iter().cloned());
    for key in keys {
        let (client, url) = (client.clone(), gw.url("/x"));
        let is_known = key == known;
        tasks.push(tokio::spawn(async move {
            let started = Instant::now();
            let resp = client.get(url).header("X-API-Key", key).send().await;
            (is_known, resp.unwrap().status(), started.elapsed())
        }));
    }
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap());
    }
    results
}

/// The `ACL SETUSER keygate ...` line of docs/fleet.md whose last rule is `last`, split into
/// arguments: the tests use the documented ACL verbatim, so the two cannot drift apart.
fn documented_acl(last: &str) -> Vec<String> {
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/fleet.md")).unwrap();
    let line = doc
        .lines()
        .find(|l| l.starts_with("ACL SETUSER keygate ") && l.ends_with(&format!(" {last}")))
        .unwrap_or_else(|| panic!("docs/fleet.md has no ACL line ending in {last}"));
    line.split_whitespace().map(str::to_owned).collect()
}
