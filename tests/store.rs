//! One conformance suite for every `KeyStore`: the embedded SQLite store, a real `redis-server`,
//! and a real three-node Redis Cluster.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::redis::{Cluster, Redis};
use keygate::key;
use keygate::policy::Policy;
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
        Changes::Lost { reason } => panic!("unexpectedly lost: {reason}"),
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
    // Many lookups in one call: in order, an unknown digest as `None`.
    let unknown = key::generate().unwrap().digest();
    assert_eq!(
        store
            .lookup_many(vec![unknown, secret_a.digest(), unknown])
            .await
            .unwrap(),
        vec![None, Some(a.clone()), None]
    );
    assert!(store.lookup_many(Vec::new()).await.unwrap().is_empty());

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

    // Policies are stored as written.
    let (_, mut scoped) = record("scoped");
    scoped.policy = Policy {
        allow: vec!["POST:/api/v1/video/".into()],
        allow_ips: vec!["10.0.0.0/8".into(), "2001:db8::/32".into()],
        rate: Some("5/min".into()),
    };
    store.insert(scoped.clone()).await.unwrap();
    assert_eq!(store.lookup(scoped.digest).await.unwrap().unwrap(), scoped);

    // Owners are stored as written, and a record without one reads back without one.
    let (_, mut owned) = record("owned");
    owned.owner = Some("user 42".into());
    store.insert(owned.clone()).await.unwrap();
    assert_eq!(store.lookup(owned.digest).await.unwrap().unwrap(), owned);
    assert_eq!(
        store.find("owned").await.unwrap().owner.as_deref(),
        Some("user 42")
    );
    assert_eq!(store.find("alpha").await.unwrap().owner, None);
    store.delete("owned").await.unwrap();

    // Rotation: the successor takes the name; the old key keeps its record until grace ends.
    let active_before = store.count_active().await.unwrap();
    let before_rotation = store.change_position().await.unwrap();
    let (_, mut successor) = record("scoped");
    successor.policy = scoped.policy.clone();
    successor.owner = Some("7".into());
    let grace_until = unix_now() + 3600;
    let old = store
        .rotate("scoped", successor.clone(), grace_until)
        .await
        .unwrap();
    assert_eq!(old.rotated_to.as_deref(), Some(successor.id.as_str()));
    assert_eq!(old.expires_at, Some(grace_until));
    assert_eq!(store.find("scoped").await.unwrap(), successor);
    assert_eq!(store.find(&scoped.id).await.unwrap(), old);
    assert_eq!(store.lookup(scoped.digest).await.unwrap().unwrap(), old);
    assert_eq!(
        store.count_active().await.unwrap(),
        active_before + 1,
        "old key counts until grace ends"
    );
    assert!(matches!(
        store
            .rotate(&scoped.id, record("scoped").1, grace_until)
            .await,
        Err(StoreError::Conflict(_))
    ));
    let (_, clash) = record("scoped");
    assert!(matches!(
        store.insert(clash).await,
        Err(StoreError::Conflict(_))
    ));
    let (digests, _) = digests_since(store.as_ref(), before_rotation).await;
    assert_eq!(digests, [scoped.digest, successor.digest]);
    // Deleting the old key leaves the successor findable by name.
    store.delete(&scoped.id).await.unwrap();
    assert_eq!(store.find("scoped").await.unwrap(), successor);

    // Import: all or nothing; what is already there is skipped.
    let everything = store.list().await.unwrap();
    assert_eq!(
        store.import(everything.clone()).await.unwrap(),
        (0, everything.len())
    );
    let (_, fresh) = record("fresh");
    let (_, clashing) = record("alpha");
    let err = store
        .import(vec![fresh.clone(), clashing])
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Conflict(ref n) if n.contains("alpha")),
        "{err:?}"
    );
    assert!(
        store.lookup(fresh.digest).await.unwrap().is_none(),
        "half an import was written"
    );
    let (_, twin_a) = record("twin");
    let (_, twin_b) = record("twin");
    assert!(
        store.import(vec![twin_a.clone(), twin_b]).await.is_err(),
        "duplicate names in one file"
    );
    assert!(store.lookup(twin_a.digest).await.unwrap().is_none());
    assert_eq!(
        store
            .import(vec![fresh.clone(), fresh.clone()])
            .await
            .unwrap(),
        (1, 1)
    );
    assert_eq!(store.lookup(fresh.digest).await.unwrap().unwrap(), fresh);
    let pos = store.change_position().await.unwrap();

    // A position from the future (the store was replaced, or rolled back) is never silence: a
    // gap (drop the cache), or, where the store keeps an identity marker, lost data.
    assert!(matches!(
        store.changes_since(pos + 1_000).await.unwrap(),
        Changes::Gap { .. } | Changes::Lost { .. }
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

/// A Redis store that lost its data is reported lost, never read as empty: its identity marker
/// gone (a restart without persistence), or its change counter gone back (a rollback). A new
/// marker (the first change written after the loss) or a new generation (`keygate store accept`)
/// is adopted as a gap: the gateway drops its cache and reads the store as it is.
#[tokio::test]
async fn redis_store_reports_lost_data_until_a_new_identity_is_adopted() {
    let dir = tempfile::tempdir().unwrap();
    let redis = Redis::start(dir.path());
    let open = || {
        RedisStore::new(
            Target::Single(redis.url()),
            "keygate",
            Duration::from_secs(2),
        )
    };
    // `gateway` reads the change feed; `cli` writes, as the keygate CLI would.
    let (gateway, cli) = (open().unwrap(), open().unwrap());
    assert_eq!(
        gateway.identity().await.unwrap(),
        None,
        "a new store has no marker"
    );
    let mut pos = gateway.change_position().await.unwrap();
    cli.insert(record("first").1).await.unwrap();
    let marker = cli
        .identity()
        .await
        .unwrap()
        .expect("the first change writes the marker");
    assert_eq!(marker.generation, 1);
    (_, pos) = digests_since(&gateway, pos).await;

    // Restarted empty (FLUSHALL does the same to the data): lost, poll after poll.
    redis.cli(&["FLUSHALL"]).unwrap();
    for _ in 0..2 {
        let changes = gateway.changes_since(pos).await.unwrap();
        assert!(
            matches!(&changes, Changes::Lost { reason } if reason.contains("marker")),
            "{changes:?}"
        );
    }
    // The first change written after the loss (the restore) writes a new marker: adopted.
    cli.insert(record("restored").1).await.unwrap();
    let restored = cli.identity().await.unwrap().unwrap();
    assert_ne!(restored.id, marker.id);
    let Changes::Gap { next } = gateway.changes_since(pos).await.unwrap() else {
        panic!("a new marker is not adopted as a gap");
    };
    pos = next;
    assert!(digests_since(&gateway, pos).await.0.is_empty());

    // Rolled back: the counter goes back under the same marker. Lost, and it stays lost when
    // new changes take the counter past where it was.
    cli.insert(record("second").1).await.unwrap();
    (_, pos) = digests_since(&gateway, pos).await;
    // (The counter and the stream go back together, as in a restored snapshot.)
    redis.cli(&["SET", "{keygate}:seq", "0"]).unwrap();
    redis.cli(&["DEL", "{keygate}:changes"]).unwrap();
    assert!(matches!(
        gateway.changes_since(pos).await.unwrap(),
        Changes::Lost { reason } if reason.contains("went back")
    ));
    for i in 0..3 {
        cli.insert(record(&format!("after-{i}")).1).await.unwrap();
    }
    assert!(matches!(
        gateway.changes_since(pos).await.unwrap(),
        Changes::Lost { .. }
    ));
    // Accepted by the operator: a new generation of the same marker, adopted as a gap.
    let accepted = cli.accept_identity().await.unwrap().unwrap();
    assert_eq!(
        (accepted.id.as_str(), accepted.generation),
        (restored.id.as_str(), 2)
    );
    assert!(matches!(
        gateway.changes_since(pos).await.unwrap(),
        Changes::Gap { .. }
    ));
}

/// An export from one store imported into another (SQLite → Redis → SQLite) is the same set of
/// records, field for field: digests, policies, rotation, usage.
#[tokio::test]
async fn export_import_round_trips_between_backends() {
    let dir = tempfile::tempdir().unwrap();
    let sqlite: Arc<dyn KeyStore> =
        Arc::new(SqliteStore::open(&dir.path().join("a.db"), Duration::from_secs(5)).unwrap());
    let (_, mut a) = record("a");
    a.policy.allow = vec!["/api/".into()];
    a.legacy = true;
    sqlite.insert(a.clone()).await.unwrap();
    sqlite
        .rotate("a", record("a").1, unix_now() + 60)
        .await
        .unwrap();
    let (_, mut b) = record("b");
    b.is_active = false;
    b.expires_at = Some(unix_now() + 86_400);
    b.owner = Some("alice".into());
    sqlite.insert(b.clone()).await.unwrap();
    sqlite
        .record_usage(vec![Usage {
            id: b.id.clone(),
            digest: b.digest,
            last_used: 1_234,
            count: 7,
        }])
        .await
        .unwrap();
    let exported = sqlite.list().await.unwrap();
    assert_eq!(exported.len(), 3);

    let redis = Redis::start(&dir.path().join("redis"));
    let shared: Arc<dyn KeyStore> = Arc::new(
        RedisStore::new(
            Target::Single(redis.url()),
            "keygate",
            Duration::from_secs(2),
        )
        .unwrap(),
    );
    assert_eq!(shared.import(exported.clone()).await.unwrap(), (3, 0));
    assert_eq!(shared.list().await.unwrap(), exported);
    let back: Arc<dyn KeyStore> =
        Arc::new(SqliteStore::open(&dir.path().join("b.db"), Duration::from_secs(5)).unwrap());
    assert_eq!(
        back.import(shared.list().await.unwrap()).await.unwrap(),
        (3, 0)
    );
    assert_eq!(back.list().await.unwrap(), exported);
    // JSON (the export file format) round-trips too.
    let json = serde_json::to_string(&exported).unwrap();
    assert_eq!(
        serde_json::from_str::<Vec<KeyRecord>>(&json).unwrap(),
        exported
    );
}

/// A database written by the first schema is migrated in place.
#[tokio::test]
async fn sqlite_v1_databases_are_migrated() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v1.db");
    let secret = key::generate().unwrap();
    {
        let db = rusqlite::Connection::open(&path).unwrap();
        db.execute_batch(
            "CREATE TABLE api_keys (id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, digest BLOB NOT NULL UNIQUE,
               hint TEXT NOT NULL, created_at INTEGER NOT NULL, last_used INTEGER, use_count INTEGER NOT NULL DEFAULT 0,
               is_active INTEGER NOT NULL, legacy INTEGER NOT NULL DEFAULT 0, expires_at INTEGER);
             CREATE TABLE changes (seq INTEGER PRIMARY KEY AUTOINCREMENT, digest BLOB NOT NULL, at INTEGER NOT NULL);
             PRAGMA user_version = 1;",
        )
        .unwrap();
        db.execute(
            "INSERT INTO api_keys (id, name, digest, hint, created_at, is_active) VALUES ('key_old', 'old', ?1, 'sk_x…', 5, 1)",
            [&secret.digest().0[..]],
        )
        .unwrap();
    }
    let store = SqliteStore::open(&path, Duration::from_secs(5)).unwrap();
    let r = store.find("old").await.unwrap();
    assert_eq!(
        (r.id.as_str(), r.created_at, r.policy.is_empty()),
        ("key_old", 5, true)
    );
    store
        .rotate(
            "old",
            KeyRecord::new("old", &key::generate().unwrap(), 6, None).unwrap(),
            100,
        )
        .await
        .unwrap();
}

/// A database written by schema v2 (the schema before owners) is migrated in place: its keys
/// keep working, gain an empty owner, and a change to the owner reaches the change feed.
#[tokio::test]
async fn sqlite_v2_databases_are_migrated() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v2.db");
    let secret = key::generate().unwrap();
    {
        // Schema v2 as keygate wrote it.
        let db = rusqlite::Connection::open(&path).unwrap();
        db.execute_batch(
            "CREATE TABLE IF NOT EXISTS api_keys (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    digest      BLOB NOT NULL UNIQUE,
    hint        TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    last_used   INTEGER,
    use_count   INTEGER NOT NULL DEFAULT 0,
    is_active   INTEGER NOT NULL,
    legacy      INTEGER NOT NULL DEFAULT 0,
    expires_at  INTEGER,
    policy      TEXT NOT NULL DEFAULT '{}',
    rotated_to  TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS api_keys_current_name ON api_keys (name) WHERE rotated_to IS NULL;
CREATE TABLE IF NOT EXISTS changes (
    seq     INTEGER PRIMARY KEY AUTOINCREMENT,
    digest  BLOB NOT NULL,
    at      INTEGER NOT NULL
);
CREATE TRIGGER IF NOT EXISTS api_keys_changed_insert AFTER INSERT ON api_keys
BEGIN
    INSERT INTO changes (digest, at) VALUES (NEW.digest, unixepoch());
END;
CREATE TRIGGER IF NOT EXISTS api_keys_changed_update
AFTER UPDATE OF id, name, digest, hint, created_at, is_active, legacy, expires_at, policy, rotated_to
ON api_keys
BEGIN
    INSERT INTO changes (digest, at) VALUES (OLD.digest, unixepoch());
    INSERT INTO changes (digest, at) SELECT NEW.digest, unixepoch() WHERE NEW.digest != OLD.digest;
END;
CREATE TRIGGER IF NOT EXISTS api_keys_changed_delete AFTER DELETE ON api_keys
BEGIN
    INSERT INTO changes (digest, at) VALUES (OLD.digest, unixepoch());
END;
PRAGMA user_version = 2;",
        )
        .unwrap();
        db.execute(
            "INSERT INTO api_keys (id, name, digest, hint, created_at, is_active, policy)
             VALUES ('key_v2', 'v2', ?1, 'sk_x…', 5, 1, '{\"allow\":[\"/api/\"]}')",
            [&secret.digest().0[..]],
        )
        .unwrap();
    }
    let store = SqliteStore::open(&path, Duration::from_secs(5)).unwrap();
    let r = store.lookup(secret.digest()).await.unwrap().unwrap();
    assert_eq!(
        (r.id.as_str(), r.created_at, r.owner.as_deref()),
        ("key_v2", 5, None)
    );
    assert_eq!(r.policy.allow, ["/api/"]);
    // Opened again (the gateway and the CLI each open it): migrated once only.
    drop(store);
    let store = SqliteStore::open(&path, Duration::from_secs(5)).unwrap();
    let version: i64 = rusqlite::Connection::open(&path)
        .unwrap()
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    assert_eq!(version, 3);
    // An owner set by hand (the sqlite3 shell) is read, and is a change running gateways see.
    let pos = store.change_position().await.unwrap();
    rusqlite::Connection::open(&path)
        .unwrap()
        .execute("UPDATE api_keys SET owner = '42' WHERE id = 'key_v2'", [])
        .unwrap();
    assert_eq!(
        digests_since(&store, pos).await.0,
        [secret.digest()],
        "the owner change is not in the change feed"
    );
    let owned = KeyRecord {
        owner: Some("bob".into()),
        ..KeyRecord::new("new", &key::generate().unwrap(), 6, None).unwrap()
    };
    store.insert(owned.clone()).await.unwrap();
    assert_eq!(store.find("new").await.unwrap(), owned);
    assert_eq!(store.find("v2").await.unwrap().owner.as_deref(), Some("42"));
}

/// With `confirm_replicas`, a change too few replicas acknowledged within `confirm_timeout` is
/// reported unconfirmed (it was written to the primary), on a single server and on a cluster
/// (where the WAIT goes, in one pipeline with the script, to the node holding keygate's slot);
/// with a replica, it is confirmed.
#[tokio::test]
async fn a_change_too_few_replicas_acknowledged_is_unconfirmed() {
    use keygate::store::redis::Settings;
    let dir = tempfile::tempdir().unwrap();
    let primary = Redis::start(&dir.path().join("primary"));
    let cluster = Cluster::start(&dir.path().join("cluster"));
    let confirmed = |target, confirm_timeout| {
        let mut settings = Settings::new(target, "keygate");
        settings.confirm_replicas = 1;
        settings.confirm_timeout = confirm_timeout;
        RedisStore::open(settings, Duration::from_secs(2)).unwrap()
    };
    // Without a replica nothing can acknowledge: a short wait is enough to fail.
    let short = Duration::from_millis(200);
    for store in [
        confirmed(Target::Single(primary.url()), short),
        confirmed(Target::Cluster(cluster.urls()), short),
    ] {
        let (_, r) = record("lonely");
        let err = store.insert(r.clone()).await.unwrap_err();
        assert!(
            matches!(&err, StoreError::Unconfirmed(m) if m.contains("0 of the 1 replica")),
            "{err:?}"
        );
        // Written all the same: the primary has it.
        assert_eq!(store.find("lonely").await.unwrap(), r);
    }
    let _replica = Redis::start_replica(&dir.path().join("replica"), &primary);
    // With one, the acknowledgement is what is checked, not its speed: on a busy machine a
    // replica can take longer than 200 ms to answer WAIT's GETACK.
    let store = confirmed(Target::Single(primary.url()), Duration::from_secs(5));
    store.insert(record("replicated").1).await.unwrap();
    store.set_active("replicated", false).await.unwrap();
}
