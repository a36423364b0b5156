//! How keygate gets into Redis: the ACL user of docs/fleet.md is enough (and a missing
//! permission stops the start in one line), and TLS with a private CA and a client
//! certificate.

use std::time::Duration;

use reqwest::StatusCode;

use crate::common::redis::Redis;
use crate::common::{self, Gateway, Upstream, wait_for_async};
use crate::{
    WITHIN_A_SECOND, all_within, check_config, cli, documented_acl, healthy_again,
    not_ready_for_refused_credentials, redis_overrides, refused_start, status,
};

/// A Redis with keygate's user as docs/fleet.md defines it, and the URL that logs in as it.
fn redis_with_documented_user(dir: &std::path::Path) -> (Redis, String) {
    let redis = Redis::start(dir);
    let acl = documented_acl("+time");
    let args: Vec<&str> = acl.iter().map(String::as_str).collect();
    assert_eq!(redis.cli(&args).as_deref(), Some("OK"), "{acl:?}");
    let url = format!("redis://keygate:CHANGE-ME@127.0.0.1:{}/0", redis.port);
    (redis, url)
}

/// The ACL of docs/fleet.md, used verbatim, is all keygate needs: the gateway starts (its
/// permission check passes), the CLI creates and revokes, the shared rate limits stay shared
/// (the limiter's TIME is granted), usage is written. A user without TIME makes `keygate serve`
/// refuse to start with one line naming it; so does a wrong password. `check-config` says the
/// same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_acl_is_enough_and_a_missing_permission_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let (redis, url) = redis_with_documented_user(dir.path());
    let upstream = Upstream::start().await;
    let o = redis_overrides(
        &url,
        &[
            ("KEYGATE_RATE_LIMIT_PER_KEY", "5/min"),
            ("KEYGATE_RATE_LIMIT_SHARED_TIMEOUT", "2s"),
            ("KEYGATE_STORE_USAGE_FLUSH_INTERVAL", "200ms"),
        ],
    );
    let gw = Gateway::start(&upstream.url(), &o).await;
    let (checked, said) = check_config(&gw.config_path, &o);
    assert!(
        checked && said.contains("accepts keygate's credentials and every command it uses"),
        "{said}"
    );
    let key = cli(&gw, &url, &["create", "--name", "acl"]);
    let mut admitted = 0;
    for _ in 0..8 {
        match status(&gw, &key).await {
            StatusCode::OK => admitted += 1,
            StatusCode::TOO_MANY_REQUESTS => {}
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(
        admitted, 5,
        "limits are not shared under the documented ACL"
    );
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains("keygate_rate_limit_degraded 0"),
        "{metrics}"
    );
    let (code, body) = gw.health().await;
    assert_eq!(code, StatusCode::OK, "{body}");
    // Usage is written (a script), and the revocation reaches the gateway (pub/sub).
    wait_for_async(
        Duration::from_secs(5),
        "the usage to be written",
        async || {
            let list = cli(&gw, &url, &["list", "--json"]);
            let keys: serde_json::Value = serde_json::from_str(&list).unwrap();
            if keys[0]["use_count"].as_u64() >= Some(5) {
                Ok(())
            } else {
                Err(list)
            }
        },
    )
    .await;
    cli(&gw, &url, &["revoke", "acl"]);
    all_within(&[&gw], &key, StatusCode::UNAUTHORIZED, WITHIN_A_SECOND).await;
    gw.shutdown().await;

    // The ACL without +time: refused at start, in one line that names the command and the fix.
    let acl = documented_acl("+time");
    let mut without_time: Vec<&str> = acl.iter().map(String::as_str).collect();
    without_time[2] = "notime";
    assert_eq!(without_time.pop(), Some("+time"));
    assert_eq!(redis.cli(&without_time).as_deref(), Some("OK"));
    let url = format!("redis://notime:CHANGE-ME@127.0.0.1:{}/0", redis.port);
    let config = common::write_config(dir.path(), &upstream.url());
    let line = refused_start(&config, &redis_overrides(&url, &[]), "CHANGE-ME");
    assert!(
        line.starts_with("keygate: error: key store permission missing:")
            && line.contains("TIME")
            && line.contains("grant +time"),
        "{line}"
    );

    // A wrong password: refused at start, in one line that says where to look, with no
    // password in it.
    let url = format!(
        "redis://keygate:NOT-THE-PASSWORD@127.0.0.1:{}/0",
        redis.port
    );
    let line = refused_start(&config, &redis_overrides(&url, &[]), "NOT-THE-PASSWORD");
    assert!(
        line.starts_with("keygate: error: key store refuses keygate's credentials: Redis at ")
            && line.contains("check the user and password in store.url"),
        "{line}"
    );
}

/// A Redis that speaks TLS only, with a certificate from a private CA (made by the test) and
/// client certificates required: `store.tls_ca_file` trusts the CA (not the system roots),
/// `store.tls_cert_file`/`tls_key_file` present keygate's certificate, and gateway and CLI work
/// (lookups, changes, the subscription). Without the client certificate the CLI fails in one
/// line; `check-config` refuses `#insecure` unless `store.tls_allow_insecure` allows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_redis_with_a_private_ca_and_a_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let tls = common::redis::TlsFiles::generate(&dir.path().join("tls"));
    let redis = Redis::start_tls(&dir.path().join("redis"), &tls);
    let url = redis.url();
    assert!(url.starts_with("rediss://"));
    let mut extra = tls.store_settings().to_vec();
    extra.push(("KEYGATE_STORE_POLL_INTERVAL", "30s"));
    let o = redis_overrides(&url, &extra);
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream.url(), &o).await;
    let config = gw.config_path.clone();
    let key_one = common::keys_cli(&config, &o, &["create", "--name", "over-tls"]);
    all_within(&[&gw], &key_one, StatusCode::OK, Duration::from_secs(2)).await;
    // Polling every 30 s: the revocation arrives on the subscription, over TLS too.
    common::keys_cli(&config, &o, &["revoke", "over-tls"]);
    all_within(&[&gw], &key_one, StatusCode::UNAUTHORIZED, WITHIN_A_SECOND).await;
    assert_eq!(gw.health().await.0, StatusCode::OK);

    // No client certificate: refused by the server, said in one line.
    let err = common::keys_cli_result(&config, &o[..3], &["list"])
        .expect_err("listed without a certificate");
    eprintln!("without a client certificate: {err}");
    assert!(
        err.starts_with("keygate: error: key store unavailable:") && !err.contains('\n'),
        "{err}"
    );
    // Trusting the system roots instead of the private CA: the server's certificate is refused.
    let no_ca: Vec<(&str, &str)> = o
        .iter()
        .copied()
        .filter(|(k, _)| *k != "KEYGATE_STORE_TLS_CA_FILE")
        .collect();
    let err = common::keys_cli_result(&config, &no_ca, &["list"]).expect_err("an unknown CA");
    eprintln!("without the private CA: {err}");
    assert!(
        err.starts_with("keygate: error: key store unavailable:"),
        "{err}"
    );

    // `#insecure` turns verification off: check-config refuses it, unless allowed explicitly.
    let insecure = format!("{url}#insecure");
    let mut env = o.clone();
    env[1] = ("KEYGATE_STORE_URL", insecure.as_str());
    let err = common::cli_result(&config, &env, &["check-config"]).unwrap_err();
    assert!(
        err.contains("store.url") && err.contains("tls_allow_insecure"),
        "{err}"
    );
    env.push(("KEYGATE_STORE_TLS_ALLOW_INSECURE", "true"));
    common::cli_result(&config, &env, &["check-config"]).unwrap();
    // And, allowed, it works: any certificate is accepted.
    let listed = common::keys_cli_result(&config, &env, &["list"]).unwrap();
    assert!(listed.contains("over-tls"), "{listed}");
    gw.shutdown().await;
}

/// Credentials Redis stops accepting while the gateway runs (the password changed in Redis
/// before keygate's configuration was): an outage, not a reason to stop. The key in use is
/// still answered from the cache, a key the gateway has not seen gets 503, and the readiness
/// answer gives Redis's refusal; once Redis accepts the password again, the gateway recovers
/// by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_refused_while_running_are_an_outage_that_ends() {
    let dir = tempfile::tempdir().unwrap();
    let (redis, url) = redis_with_documented_user(dir.path());
    let upstream = Upstream::start().await;
    let o = redis_overrides(&url, &[("KEYGATE_STORE_TIMEOUT", "300ms")]);
    let gw = Gateway::start(&upstream.url(), &o).await;
    let key = cli(&gw, &url, &["create", "--name", "in-use"]);
    assert_eq!(status(&gw, &key).await, StatusCode::OK);
    let unseen = keygate::key::generate().unwrap().expose().to_owned();

    // The password changes in Redis, and keygate's connections are cut: every reconnect is
    // refused.
    let rotate = ["ACL", "SETUSER", "keygate", "resetpass", ">ROTATED"];
    assert_eq!(redis.cli(&rotate).as_deref(), Some("OK"));
    assert!(redis.cli(&["CLIENT", "KILL", "USER", "keygate"]).is_some());
    not_ready_for_refused_credentials(&gw).await;
    assert_eq!(status(&gw, &key).await, StatusCode::OK);
    assert_eq!(status(&gw, &unseen).await, StatusCode::SERVICE_UNAVAILABLE);

    // Redis accepts keygate's password again.
    let restore = ["ACL", "SETUSER", "keygate", ">CHANGE-ME"];
    assert_eq!(redis.cli(&restore).as_deref(), Some("OK"));
    healthy_again(&gw).await;
    assert_eq!(status(&gw, &unseen).await, StatusCode::UNAUTHORIZED);
    assert_eq!(status(&gw, &key).await, StatusCode::OK);
    gw.shutdown().await;
}
