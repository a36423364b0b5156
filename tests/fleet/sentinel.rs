//! Redis Sentinel: a planned failover and a crash of the primary, with clients and revocations
//! all through them; every gateway follows the primary by itself and no confirmed revocation
//! is lost. Sentinels that require a password, and sentinels and servers over TLS.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use reqwest::StatusCode;

use crate::common::redis::{Redis, Sentinels};
use crate::common::{self, Gateway, Upstream, eventually_async, wait_for_async};
use crate::{WITHIN_A_SECOND, all_within, documented_acl, refused_start, status};

/// Polls every gateway's `/readyz` until it names `node` as the store's node; returns how long
/// after `since` each got there.
async fn each_on_node(gws: &[&Gateway], node: &str, since: Instant, limit: Duration) -> Vec<f64> {
    let mut took = Vec::new();
    let what = format!("every gateway on {node}");
    for gw in gws {
        let within = (since + limit).saturating_duration_since(Instant::now());
        wait_for_async(within, &what, async || {
            let (_, body) = gw.ready().await;
            if body["store_node"] == node {
                Ok(())
            } else {
                Err(body)
            }
        })
        .await;
        took.push(since.elapsed().as_secs_f64());
    }
    took
}

/// Polls the sentinels until they name `node` the primary; returns how long after `since`.
async fn sentinels_name(sentinels: &Sentinels, node: &str, since: Instant) -> f64 {
    let within = (since + Duration::from_secs(30)).saturating_duration_since(Instant::now());
    let what = format!("the sentinels to promote {node}");
    eventually_async(within, &what, async || {
        sentinels.primary().as_deref() == Some(node)
    })
    .await;
    since.elapsed().as_secs_f64()
}

/// Three gateways on a Sentinel group while clients use them: a `SENTINEL FAILOVER` with
/// revocations issued one after another all through it, then a crash (`kill -9`) of the new
/// primary. Every gateway follows the primary by itself each time (no restart); every
/// revocation the CLI confirmed holds everywhere, also after the old primary resynced as a
/// replica (a refused one says why in one line, and is run again); the CLI and the shared rate
/// limits work against the new primary; a change no replica acknowledged fails the CLI; and the
/// cached key in use is answered 200 throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_failover_moves_every_gateway_and_loses_no_revocation() {
    let dir = tempfile::tempdir().unwrap();
    let primary = Redis::start(&dir.path().join("primary"));
    let mut replica = Redis::start_replica(&dir.path().join("replica"), &primary);
    let sentinels = Sentinels::start(&dir.path().join("sentinels"), "keygate-ha", &primary, 3);
    let urls = sentinels.urls_toml();
    // keygate's user as docs/fleet.md defines it for Sentinel, on each node (ACLs are not
    // replicated).
    let acl = documented_acl("+role");
    let acl: Vec<&str> = acl.iter().map(String::as_str).collect();
    for node in [&primary, &replica] {
        assert_eq!(node.cli(&acl).as_deref(), Some("OK"));
    }
    let upstream = Upstream::start().await;
    let o = [
        ("KEYGATE_STORE_BACKEND", "redis-sentinel"),
        ("KEYGATE_STORE_SENTINELS", urls.as_str()),
        ("KEYGATE_STORE_MASTER_NAME", "keygate-ha"),
        // The primary's credentials and database; the sentinels name its address.
        (
            "KEYGATE_STORE_URL",
            "redis://keygate:CHANGE-ME@keygate-ha/0",
        ),
        ("KEYGATE_STORE_TIMEOUT", "500ms"),
        ("KEYGATE_STORE_CONFIRM_TIMEOUT", "1s"),
        ("KEYGATE_RATE_LIMIT_SHARED_TIMEOUT", "2s"),
        // The test checks revoked keys hundreds of times from one address.
        ("KEYGATE_RATE_LIMIT_FAILURES_PER_IP", ""),
    ];
    let gateways = [
        Gateway::start(&upstream.url(), &o).await,
        Gateway::start(&upstream.url(), &o).await,
        Gateway::start(&upstream.url(), &o).await,
    ];
    let gws: Vec<&Gateway> = gateways.iter().collect();
    let config = gws[0].config_path.clone();
    let env: Vec<(String, String)> = o
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    let cli = move |args: &[&str]| {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        common::keys_cli_result(&config, &env, args)
    };
    let steady = cli(&["create", "--name", "steady"]).unwrap();
    let victims: Vec<String> = (0..12)
        .map(|i| cli(&["create", "--name", &format!("victim-{i}")]).unwrap())
        .collect();
    all_within(&gws, &steady, StatusCode::OK, Duration::from_secs(2)).await;
    for victim in &victims {
        all_within(&gws, victim, StatusCode::OK, Duration::from_secs(2)).await;
    }
    each_on_node(
        &gws,
        &primary.addr(),
        Instant::now(),
        Duration::from_secs(5),
    )
    .await;

    // Clients keep using `steady` on every gateway throughout.
    let stop = Arc::new(AtomicBool::new(false));
    let targets: Vec<(reqwest::Client, String)> =
        gws.iter().map(|gw| (gw.client(), gw.url("/x"))).collect();
    let traffic = tokio::spawn({
        let (stop, steady) = (Arc::clone(&stop), steady.clone());
        async move {
            let (mut served, mut failed) = (0u32, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                for (client, url) in &targets {
                    let resp = client.get(url).header("X-API-Key", &steady).send().await;
                    match resp.map(|r| r.status()) {
                        Ok(StatusCode::OK) => served += 1,
                        other => failed.push(format!("{other:?}")),
                    }
                }
                // Paced on purpose: a steady client, not a flood.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (served, failed)
        }
    });

    // A planned failover, and revocations issued one after another all through it. The CLI
    // either confirms a revocation or fails saying why; an operator runs it again until it is
    // confirmed.
    let started = Instant::now();
    sentinels
        .cli(&["SENTINEL", "FAILOVER", "keygate-ha"])
        .unwrap();
    let revoke = tokio::task::spawn_blocking({
        let cli = cli.clone();
        move || {
            let (mut confirmed, mut refused) = (Vec::new(), Vec::new());
            for i in 0..12 {
                let name = format!("victim-{i}");
                let within =
                    (started + Duration::from_secs(30)).saturating_duration_since(Instant::now());
                common::wait_for(within, "a confirmed revocation", || {
                    cli(&["revoke", &name]).map_err(|e| {
                        refused.push((started.elapsed().as_secs_f64(), e));
                        format!("{refused:?}")
                    })
                });
                confirmed.push(started.elapsed().as_secs_f64());
                // Paced on purpose: the revocations are spread over the whole failover.
                std::thread::sleep(Duration::from_millis(100));
            }
            (confirmed, refused)
        }
    });
    let promoted = sentinels_name(&sentinels, &replica.addr(), started).await;
    let followed = each_on_node(&gws, &replica.addr(), started, Duration::from_secs(20)).await;
    let (confirmed, refused) = revoke.await.unwrap();
    for (_, e) in &refused {
        assert!(
            e.starts_with("keygate: error: ") && !e.contains('\n'),
            "not one clear line: {e}"
        );
    }
    eprintln!(
        "SENTINEL FAILOVER: sentinels named the new primary after {promoted:.2} s; gateways on it \
         after {followed:.2?} s; revocations confirmed at {confirmed:.2?} s; refused attempts: \
         {refused:?}"
    );
    for victim in &victims {
        all_within(
            &gws,
            victim,
            StatusCode::UNAUTHORIZED,
            Duration::from_secs(2),
        )
        .await;
    }

    // The old primary resyncs as a replica of the new one: every revocation is still there.
    let resynced = |node: &Redis| {
        node.cli(&["INFO", "replication"])
            .is_some_and(|i| i.contains("role:slave") && i.contains("master_link_status:up"))
    };
    let what = "the old primary to resync";
    eventually_async(Duration::from_secs(30), what, async || resynced(&primary)).await;
    for _ in 0..3 {
        for gw in &gws {
            for victim in &victims {
                assert_eq!(status(gw, victim).await, StatusCode::UNAUTHORIZED);
            }
        }
        // Spread on purpose: a revocation that holds keeps holding after the resync.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for victim in &victims {
        for node in [&replica, &primary] {
            assert_eq!(
                node.cli(&["HGET", &record_key(victim), "is_active"])
                    .as_deref(),
                Some("0"),
                "a confirmed revocation is missing on {}",
                node.addr()
            );
        }
    }

    // The CLI and the shared limits work against the new primary, with no restart: a key it
    // creates is found by every gateway, and 18 requests over three gateways under 6/min admit
    // exactly 6.
    let limited = cli(&["create", "--name", "limited", "--rate", "6/min"]).unwrap();
    let mut admitted = 0;
    for i in 0..18 {
        match status(gws[i % 3], &limited).await {
            StatusCode::OK => admitted += 1,
            StatusCode::TOO_MANY_REQUESTS => {}
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(admitted, 6, "the fleet admitted {admitted} under 6/min");
    for gw in &gws {
        assert!(gw.metrics().await.contains("keygate_rate_limit_degraded 0"));
    }

    // A crash: the new primary is killed. The sentinels promote the old one (now its replica)
    // and every gateway follows again.
    let crashed = Instant::now();
    replica.kill();
    let promoted = sentinels_name(&sentinels, &primary.addr(), crashed).await;
    let followed = each_on_node(&gws, &primary.addr(), crashed, Duration::from_secs(30)).await;
    eprintln!(
        "kill -9 of the primary: sentinels named the new primary after {promoted:.2} s; gateways \
         on it after {followed:.2?} s"
    );
    // No replica is left: a change is written but not confirmed, and the CLI says so (printing
    // the new key, which works unless the primary fails too).
    let unconfirmed = cli(&["create", "--name", "lonely"]).unwrap_err();
    assert!(
        unconfirmed.contains("not confirmed") && unconfirmed.contains("0 of the 1 replica"),
        "{unconfirmed}"
    );
    // The killed node comes back as a replica: changes are confirmed again.
    replica.restart();
    assert_eq!(replica.cli(&acl).as_deref(), Some("OK"));
    let what = "the restarted node to resync";
    eventually_async(Duration::from_secs(30), what, async || resynced(&replica)).await;
    let after = cli(&["create", "--name", "after-crash"]).unwrap();
    all_within(&gws, &after, StatusCode::OK, Duration::from_secs(2)).await;
    for victim in &victims {
        all_within(
            &gws,
            victim,
            StatusCode::UNAUTHORIZED,
            Duration::from_secs(2),
        )
        .await;
    }

    stop.store(true, Ordering::Relaxed);
    let (served, failed) = traffic.await.unwrap();
    eprintln!("steady traffic: {served} requests answered 200, {failed:?} otherwise");
    assert!(
        failed.is_empty(),
        "a cached key in use was refused: {failed:?}"
    );
    for gw in gateways {
        gw.shutdown().await;
    }
}

/// A gateway on `sentinels` with `o` (its `KEYGATE_*` settings) serves a key created with the
/// CLI from `primary`, follows a `SENTINEL FAILOVER` to `replica` by itself, and feels a
/// revocation confirmed on the new primary within a second.
async fn serves_through_a_failover(
    sentinels: &Sentinels,
    (primary, replica): (&Redis, &Redis),
    upstream: &Upstream,
    o: &[(&str, &str)],
) {
    let gw = Gateway::start(&upstream.url(), o).await;
    let key = common::keys_cli(&gw.config_path, o, &["create", "--name", "failover"]);
    all_within(&[&gw], &key, StatusCode::OK, Duration::from_secs(2)).await;
    each_on_node(
        &[&gw],
        &primary.addr(),
        Instant::now(),
        Duration::from_secs(5),
    )
    .await;

    let started = Instant::now();
    let master = sentinels.master.as_str();
    sentinels.cli(&["SENTINEL", "FAILOVER", master]).unwrap();
    sentinels_name(sentinels, &replica.addr(), started).await;
    each_on_node(&[&gw], &replica.addr(), started, Duration::from_secs(20)).await;
    assert_eq!(status(&gw, &key).await, StatusCode::OK);
    // Confirmed once the old primary, now a replica, has resynced: until then the CLI says so
    // and is run again.
    common::wait_for(Duration::from_secs(30), "a confirmed revocation", || {
        common::keys_cli_result(&gw.config_path, o, &["revoke", "failover"])
    });
    let took = all_within(&[&gw], &key, StatusCode::UNAUTHORIZED, WITHIN_A_SECOND).await;
    eprintln!("{master}: a revocation on the new primary was felt in {took:?}");
    gw.shutdown().await;
}

/// Sentinels that require a password of their clients (`requirepass`, and `sentinel
/// sentinel-pass` among themselves): keygate reaches them with the password in its sentinel
/// URLs and serves through a failover ([`serves_through_a_failover`]). With a wrong password,
/// `keygate serve` stops at start with one line that names the sentinels' refusal, and no
/// password in it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinels_that_require_a_password_are_reached_with_it() {
    const PASSWORD: &str = "sentinel-SECRET";
    let dir = tempfile::tempdir().unwrap();
    let primary = Redis::start(&dir.path().join("primary"));
    let replica = Redis::start_replica(&dir.path().join("replica"), &primary);
    let sentinels = Sentinels::start_with_password(
        &dir.path().join("sentinels"),
        "keygate-pw",
        &primary,
        3,
        PASSWORD,
    );
    let urls = sentinels.urls_toml_with(&format!(":{PASSWORD}@"));
    let upstream = Upstream::start().await;
    let o = [
        ("KEYGATE_STORE_BACKEND", "redis-sentinel"),
        ("KEYGATE_STORE_SENTINELS", urls.as_str()),
        ("KEYGATE_STORE_MASTER_NAME", "keygate-pw"),
        ("KEYGATE_STORE_URL", "redis://keygate-pw/0"),
        ("KEYGATE_STORE_TIMEOUT", "500ms"),
    ];
    serves_through_a_failover(&sentinels, (&primary, &replica), &upstream, &o).await;

    let wrong = sentinels.urls_toml_with(":not-the-password@");
    let config = common::write_config(dir.path(), &upstream.url());
    let mut env = o.to_vec();
    env[1].1 = wrong.as_str();
    let line = refused_start(&config, &env, "not-the-password");
    assert!(
        line.starts_with("keygate: error: key store refuses keygate's credentials: ")
            && line.contains("store.sentinels"),
        "{line}"
    );
}

/// Sentinels that give keygate an ACL user of its own (docs/fleet.md's line, run on each
/// sentinel): keygate serves through a failover as that user. A user without `+role` stops the
/// start in one line that names the command.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_acl_user_of_keygate_s_own_is_enough() {
    let dir = tempfile::tempdir().unwrap();
    let primary = Redis::start(&dir.path().join("primary"));
    let replica = Redis::start_replica(&dir.path().join("replica"), &primary);
    let sentinels = Sentinels::start_with_password(
        &dir.path().join("sentinels"),
        "keygate-acl",
        &primary,
        3,
        "sentinel-SECRET",
    );
    let acl = documented_acl("&+switch-master");
    let args: Vec<&str> = acl.iter().map(String::as_str).collect();
    for port in &sentinels.ports {
        assert_eq!(
            sentinels.cli_at(*port, &args).as_deref(),
            Some("OK"),
            "{acl:?}"
        );
    }
    let urls = sentinels.urls_toml_with("keygate:CHANGE-ME@");
    let upstream = Upstream::start().await;
    let o = [
        ("KEYGATE_STORE_BACKEND", "redis-sentinel"),
        ("KEYGATE_STORE_SENTINELS", urls.as_str()),
        ("KEYGATE_STORE_MASTER_NAME", "keygate-acl"),
        ("KEYGATE_STORE_URL", "redis://keygate-acl/0"),
        ("KEYGATE_STORE_TIMEOUT", "500ms"),
    ];
    serves_through_a_failover(&sentinels, (&primary, &replica), &upstream, &o).await;

    for port in &sentinels.ports {
        let revoke = ["ACL", "SETUSER", "keygate", "-role"];
        assert_eq!(sentinels.cli_at(*port, &revoke).as_deref(), Some("OK"));
    }
    let config = common::write_config(dir.path(), &upstream.url());
    let line = refused_start(&config, &o, "CHANGE-ME");
    assert!(
        line.starts_with("keygate: error: key store permission missing: ")
            && line.contains("ROLE")
            && line.contains("grant +role"),
        "{line}"
    );
}

/// Sentinels and Redis servers that speak TLS only and require client certificates: keygate
/// asks the sentinels (`rediss://` in `store.sentinels`) and talks to the primary they name over
/// TLS, with `store.tls_*`'s CA and certificate for both, through a failover
/// ([`serves_through_a_failover`]).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinels_over_tls_are_reached_with_the_store_s_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let tls = common::redis::TlsFiles::generate(&dir.path().join("tls"));
    let primary = Redis::start_tls(&dir.path().join("primary"), &tls);
    let replica = Redis::start_replica(&dir.path().join("replica"), &primary);
    let sentinels = Sentinels::start(&dir.path().join("sentinels"), "keygate-tls", &primary, 3);
    let urls = sentinels.urls_toml();
    let upstream = Upstream::start().await;
    let mut o = vec![
        ("KEYGATE_STORE_BACKEND", "redis-sentinel"),
        ("KEYGATE_STORE_SENTINELS", urls.as_str()),
        ("KEYGATE_STORE_MASTER_NAME", "keygate-tls"),
        ("KEYGATE_STORE_URL", "rediss://keygate-tls/0"),
        ("KEYGATE_STORE_TIMEOUT", "500ms"),
        ("KEYGATE_STORE_POLL_INTERVAL", "30s"),
    ];
    o.extend(tls.store_settings());
    serves_through_a_failover(&sentinels, (&primary, &replica), &upstream, &o).await;
}

/// The Redis key of `key`'s record.
fn record_key(key: &str) -> String {
    format!(
        "{{keygate}}:k:{}",
        keygate::key::KeyDigest::of(key.as_bytes()).to_hex()
    )
}
