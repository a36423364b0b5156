//! What the cache's unit tests share: a counting store in front of a real SQLite one, caches
//! built on it, and ways to look at a cache's state.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::{Entry, KeyCache, KnownKey};
use crate::key::KeyDigest;
use crate::metrics::Metrics;
use crate::store::sqlite::SqliteStore;
use crate::store::{Changes, KeyRecord, KeyStore, StoreError, StoreFuture, Usage};

/// The real SQLite store, with lookups counted and slowed so concurrent misses overlap.
pub(super) struct Counting {
    inner: SqliteStore,
    pub(super) lookups: AtomicUsize,
    /// Usage writes fail while set.
    pub(super) usage_fails: AtomicBool,
    /// Lookups hang (past any store timeout) while set, as on a paused Redis.
    pub(super) lookups_hang: AtomicBool,
}

impl KeyStore for Counting {
    fn lookup(&self, digest: KeyDigest) -> StoreFuture<'_, Option<KeyRecord>> {
        self.lookups.fetch_add(1, Ordering::SeqCst);
        let hang = self.lookups_hang.load(Ordering::SeqCst);
        Box::pin(async move {
            if hang {
                tokio::time::sleep(Duration::from_secs(3600)).await;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            self.inner.lookup(digest).await
        })
    }
    fn insert(&self, r: KeyRecord) -> StoreFuture<'_, ()> {
        self.inner.insert(r)
    }
    fn rotate(&self, s: &str, r: KeyRecord, g: i64) -> StoreFuture<'_, KeyRecord> {
        self.inner.rotate(s, r, g)
    }
    fn import(&self, r: Vec<KeyRecord>) -> StoreFuture<'_, (usize, usize)> {
        self.inner.import(r)
    }
    fn list(&self) -> StoreFuture<'_, Vec<KeyRecord>> {
        self.inner.list()
    }
    fn find(&self, s: &str) -> StoreFuture<'_, KeyRecord> {
        self.inner.find(s)
    }
    fn set_active(&self, s: &str, a: bool) -> StoreFuture<'_, KeyRecord> {
        self.inner.set_active(s, a)
    }
    fn delete(&self, s: &str) -> StoreFuture<'_, KeyRecord> {
        self.inner.delete(s)
    }
    fn count_active(&self) -> StoreFuture<'_, u64> {
        self.inner.count_active()
    }
    fn has_legacy(&self) -> StoreFuture<'_, bool> {
        self.inner.has_legacy()
    }
    fn record_usage(&self, b: Vec<Usage>) -> StoreFuture<'_, ()> {
        if self.usage_fails.load(Ordering::SeqCst) {
            return Box::pin(async { Err(StoreError::Unavailable("down".into())) });
        }
        self.inner.record_usage(b)
    }
    fn change_position(&self) -> StoreFuture<'_, u64> {
        self.inner.change_position()
    }
    fn changes_since(&self, p: u64) -> StoreFuture<'_, Changes> {
        self.inner.changes_since(p)
    }
}

pub(super) fn setup() -> (tempfile::TempDir, Arc<Counting>, Arc<KeyCache>) {
    setup_with(|_| {})
}

/// A cache with the default `[store]` settings as `adjust` changes them, in front of a
/// counting SQLite store in a temporary directory.
pub(super) fn setup_with(
    adjust: impl FnOnce(&mut crate::config::Store),
) -> (tempfile::TempDir, Arc<Counting>, Arc<KeyCache>) {
    let dir = tempfile::tempdir().unwrap();
    let inner = SqliteStore::open(&dir.path().join("k.db"), Duration::from_secs(5)).unwrap();
    let store = Arc::new(Counting {
        inner,
        lookups: AtomicUsize::new(0),
        usage_fails: AtomicBool::new(false),
        lookups_hang: AtomicBool::new(false),
    });
    let mut cfg = crate::config::FileConfig::default()
        .validate()
        .unwrap()
        .store;
    adjust(&mut cfg);
    let metrics = Arc::new(Metrics::new(&[0.1, 1.0]));
    let cache = Arc::new(KeyCache::new(store.clone(), &cfg, metrics));
    (dir, store, cache)
}

pub(super) fn record(secret: &crate::key::Secret) -> KeyRecord {
    KeyRecord::new("cache-test", secret, 0, None).unwrap()
}

/// A new key's record, stored in `store`.
pub(super) async fn stored_key(store: &Counting) -> KeyRecord {
    let rec = record(&crate::key::generate().unwrap());
    store.insert(rec.clone()).await.unwrap();
    rec
}

/// The known key `entry` holds.
pub(super) fn known(entry: Entry) -> Arc<KnownKey> {
    match entry {
        Entry::Known(k) => k,
        Entry::Unknown { .. } => panic!("not known"),
    }
}

/// A cache whose known keys are fresh for 75-100 ms, with a 300 ms poll interval (the poll is
/// driven by the test).
pub(super) fn setup_short_ttl() -> (tempfile::TempDir, Arc<Counting>, Arc<KeyCache>) {
    setup_with(|cfg| {
        cfg.positive_ttl = Duration::from_millis(100);
        cfg.poll_interval = Duration::from_millis(300);
    })
}

/// The known entry in this thread's copy.
pub(super) fn known_local(cache: &KeyCache, digest: &KeyDigest) -> Arc<KnownKey> {
    match in_copy(cache, digest) {
        Some(Entry::Known(k)) => k,
        _ => panic!("no known entry in the thread's copy"),
    }
}

/// The entry for `digest` in this thread's copy of `cache`, if it is there and usable now.
pub(super) fn in_copy(cache: &KeyCache, digest: &KeyDigest) -> Option<Entry> {
    let now = Instant::now();
    cache.copies.get(digest, |e| cache.usable(e, now))
}
