//! One conformance suite for every `KeyStore`: the embedded SQLite store, a real `redis-server`,
//! and a real three-node Redis Cluster.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::redis::{Cluster, Redis};
use keygate::key;
use keygate::store::redis::{RedisStore, Target};
use keygate::store::sqlite::SqliteStore;
use keygate::store::{Changes, KeyRecord, KeyStore, StoreError, Usage, unix_now};

fn record(name: &str) -> (key::Secret, KeyRecord) {
    let secret = key::generate().unwrap();
    let record = KeyRecord::new(name, &secret, unix_now(), None).unwrap();
    (secret, record)
}

async fn digests_since(store: &dyn KeyStore, pos: u64) -> (Vec<key::KeyDigest>, u64) {
    match store.changes_since(pos).await.unwrap() {
        Changes::Digests { digests, next } => (digests, next),
        Changes::Gap { next } => panic!("unexpected gap (next {next})"),
    }
}

/// The contract every store keeps.
async fn conformance(store: Arc<dyn KeyStore>) {
    let start = store.change_position().await.unwrap();
    assert_eq!(store.count_active().await.unwrap(), 0);
    assert!(store.list().await.unwrap().is_empty());
    assert!(!store.has_legacy().await.unwrap());

    // Insert, lookup by digest, find by id and by name.
    let (secret_a, a) = record("alpha");
    store.insert(a.clone()).await.unwrap();
    assert_eq!(
        store.lookup(secret_a.digest()).await.unwrap(),
        Some(a.clone())
    );
    assert_eq!(store.find(&a.id).await.unwrap(), a);
    assert_eq!(store.find("alpha").await.unwrap(), a);
    assert!(
        store
            .lookup(key::generate().unwrap().digest())
            .await
            .unwrap()
            .is_none()
    );
    assert!(matches!(
        store.find("nope").await,
        Err(StoreError::NotFound(_))
    ));

    // Names are unique.
    let (_, dup) = record("alpha");
    assert!(matches!(
        store.insert(dup).await,
        Err(StoreError::Conflict(_))
    ));

    // Expired and legacy keys; list is oldest first.
    let (_, mut b) = record("beta");
    b.created_at = a.created_at + 1;
    b.expires_at = Some(unix_now() - 10);
    store.insert(b.clone()).await.unwrap();
    let (_, mut c) = record("gamma");
    c.created_at = a.created_at + 2;
    c.legacy = true;
    c.expires_at = Some(unix_now() + 3600);
    store.insert(c.clone()).await.unwrap();
    let names: Vec<String> = store
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.name)
        .collect();
    assert_eq!(names, ["alpha", "beta", "gamma"]);
    assert_eq!(
        store.count_active().await.unwrap(),
        2,
        "alpha and gamma (beta expired)"
    );
    assert!(store.has_legacy().await.unwrap());

    // Every mutation is in the change feed, in order.
    let (digests, pos) = digests_since(store.as_ref(), start).await;
    assert_eq!(digests, [a.digest, b.digest, c.digest]);
    assert_eq!(digests_since(store.as_ref(), pos).await, (vec![], pos));

    // Revoke, enable.
    let revoked = store.set_active("alpha", false).await.unwrap();
    assert!(!revoked.is_active);
    assert!(!store.lookup(a.digest).await.unwrap().unwrap().is_active);
    assert_eq!(store.count_active().await.unwrap(), 1);
    store.set_active(&a.id, true).await.unwrap();
    assert!(store.lookup(a.digest).await.unwrap().unwrap().is_active);
    assert!(matches!(
        store.set_active("nope", true).await,
        Err(StoreError::NotFound(_))
    ));
    let (digests, pos) = digests_since(store.as_ref(), pos).await;
    assert_eq!(digests, [a.digest, a.digest]);

    // Usage batches add up and keep the latest time.
    let usage = |last_used, count| Usage {
        id: a.id.clone(),
        digest: a.digest,
        last_used,
        count,
    };
    store.record_usage(vec![usage(1_000, 2)]).await.unwrap();
    store.record_usage(vec![usage(900, 3)]).await.unwrap();
    let after = store.lookup(a.digest).await.unwrap().unwrap();
    assert_eq!((after.last_used, after.use_count), (Some(1_000), 5));
    // Usage is not a change: no cache needs to drop anything for it.
    assert_eq!(digests_since(store.as_ref(), pos).await, (vec![], pos));

    // Delete.
    let deleted = store.delete("gamma").await.unwrap();
    assert_eq!(deleted.id, c.id);
    assert!(store.lookup(c.digest).await.unwrap().is_none());
    assert!(matches!(
        store.find("gamma").await,
        Err(StoreError::NotFound(_))
    ));
    assert!(!store.has_legacy().await.unwrap());
    let (digests, pos) = digests_since(store.as_ref(), pos).await;
    assert_eq!(digests, [c.digest]);
    // A deleted name can be used again.
    let (_, again) = record("gamma");
    store.insert(again).await.unwrap();
    assert_eq!(store.change_position().await.unwrap(), pos + 1);

    // A position from the future (the store was replaced) is a gap, never silence.
    assert!(matches!(
        store.changes_since(pos + 1_000).await.unwrap(),
        Changes::Gap { .. }
    ));
}

#[tokio::test]
async fn sqlite_store_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("k.db"), Duration::from_secs(5)).unwrap();
    conformance(Arc::new(store)).await;
}

#[tokio::test]
async fn redis_store_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let redis = Redis::start(dir.path());
    let store = RedisStore::new(
        Target::Single(redis.url()),
        "keygate",
        Duration::from_secs(2),
    )
    .unwrap();
    conformance(Arc::new(store)).await;
    // Every key sits in one slot (the hash tag), which is what makes the scripts cluster-safe.
    let keys = redis.cli(&["KEYS", "*"]).unwrap();
    assert!(keys.lines().all(|k| k.starts_with("{keygate}:")), "{keys}");
}

#[tokio::test]
async fn redis_cluster_store_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(dir.path());
    let store = RedisStore::new(
        Target::Cluster(cluster.urls()),
        "keygate",
        Duration::from_secs(2),
    )
    .unwrap();
    conformance(Arc::new(store)).await;
}

#[tokio::test]
async fn redis_trimmed_change_stream_is_a_gap() {
    let dir = tempfile::tempdir().unwrap();
    let redis = Redis::start(dir.path());
    let store = RedisStore::new(
        Target::Single(redis.url()),
        "keygate",
        Duration::from_secs(2),
    )
    .unwrap();
    let pos = store.change_position().await.unwrap();
    for i in 0..3 {
        store.insert(record(&format!("k{i}")).1).await.unwrap();
    }
    redis
        .cli(&["XTRIM", "{keygate}:changes", "MAXLEN", "1"])
        .unwrap();
    assert!(matches!(
        store.changes_since(pos).await.unwrap(),
        Changes::Gap { next: 3 }
    ));
}
