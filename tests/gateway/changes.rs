//! The gateway and its store: keys created, revoked, enabled or deleted elsewhere (by the CLI's
//! store connection or by hand in `sqlite3`) take effect within a second, and usage goes back
//! to the store in batches.

use std::time::Duration;

use reqwest::StatusCode;

use crate::common::{Gateway, Upstream, wait_for_async};

#[tokio::test]
async fn keys_created_revoked_and_enabled_elsewhere_take_effect_within_a_second() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream.url(), &[]).await;

    // A key tried before it exists is cached as unknown; creating it must still work at once.
    let secret = keygate::key::generate().unwrap();
    let resp = gw.get_with_key("/x", secret.expose()).await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let record =
        keygate::store::KeyRecord::new("late", &secret, keygate::store::unix_now(), None).unwrap();
    gw.store.insert(record).await.unwrap();
    let key = secret.expose();
    let second = Duration::from_secs(1);
    gw.wait_for_status(key, StatusCode::OK, second).await;
    gw.store.set_active("late", false).await.unwrap();
    gw.wait_for_status(key, StatusCode::UNAUTHORIZED, second)
        .await;
    gw.store.set_active("late", true).await.unwrap();
    gw.wait_for_status(key, StatusCode::OK, second).await;
    gw.store.delete("late").await.unwrap();
    gw.wait_for_status(key, StatusCode::UNAUTHORIZED, second)
        .await;
    gw.shutdown().await;
}

#[tokio::test]
async fn hand_edits_of_the_sqlite_store_reach_the_gateway_within_a_second() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream.url(), &[]).await;
    let key = gw.create_key("edited").await;
    let second = Duration::from_secs(1);
    gw.wait_for_status(&key, StatusCode::OK, second).await;
    // An operator's emergency switch-off in the sqlite3 shell, bypassing keygate entirely; the
    // gateway's cache would otherwise keep the key for positive_ttl + stale_if_error.
    let db = rusqlite::Connection::open(gw.dir.path().join("keygate.db")).unwrap();
    let edit = |sql: &str| {
        assert_eq!(db.execute(sql, []).unwrap(), 1);
    };
    edit("UPDATE api_keys SET is_active = 0 WHERE name = 'edited'");
    gw.wait_for_status(&key, StatusCode::UNAUTHORIZED, second)
        .await;
    // The usage columns fire nothing: the flush writing them does not churn every gateway's cache.
    let position = gw.store.change_position().await.unwrap();
    edit("UPDATE api_keys SET use_count = use_count + 1, last_used = 1 WHERE name = 'edited'");
    assert_eq!(gw.store.change_position().await.unwrap(), position);
    edit("UPDATE api_keys SET is_active = 1 WHERE name = 'edited'");
    gw.wait_for_status(&key, StatusCode::OK, second).await;
    gw.shutdown().await;
}

#[tokio::test]
async fn usage_is_flushed_in_batches() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream.url(), &[]).await;
    let key = gw.create_key("counted").await;

    for _ in 0..5 {
        let resp = gw.get_with_key("/x", &key).await;
        assert_eq!(resp.status(), StatusCode::OK);
    }
    let flushed = wait_for_async(Duration::from_secs(3), "the usage flush", async || {
        let r = gw.store.find("counted").await.unwrap();
        if r.use_count == 5 {
            Ok(r)
        } else {
            Err(format!("{r:?}"))
        }
    })
    .await;
    assert!(flushed.last_used.is_some());
    gw.shutdown().await;
}
