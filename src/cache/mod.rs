//! The in-process key cache in front of the store ([`KeyCache`]), and the background jobs that
//! keep it true and current.
//!
//! Entries are keyed by digest. A known key (active or not) is fresh for `positive_ttl` and kept
//! `stale_if_error` longer; an unknown key is cached for `negative_ttl` (each jittered). For all
//! of that longer window a known key is served without a store read while the change feed is
//! confirmed: every change made through keygate reaches the cache on the feed, so the entry is as
//! current as a re-read would make it. Without that confirmation, as while the store is failing,
//! it is re-read, and served stale only if the store cannot answer. A key in use is still re-read,
//! in the background, to bound how long a change made behind keygate's back goes unseen.
//!
//! A cache hit touches no lock and no store: a probe of the worker thread's own copy of the
//! entries it has used, else one concurrent-map read; and two atomic updates for usage. Misses
//! for one digest are serialised through moka's per-key compute, so a burst of requests with the
//! same unknown key costs one store lookup.
//!
//! While the store is failing (the outage breaker of [`StoreHealth`] is open) or has lost its
//! data, no request calls it: a known key is answered from its entry (within `stale_if_error`),
//! anything else gets 503 at once, and requests queued behind a failed lookup of the same digest
//! do not try again in turn.
//!
//! # Layout
//!
//! [`KeyCache`] is the facade the pipeline and the server call; each part of it owns its state:
//!
//! - this file: the shared (moka) cache, [`KeyCache::resolve`] (a request's decision) and its
//!   miss path, eviction, and the store's health as the pipeline and admin see it.
//! - `entry`: [`KnownKey`], [`Entry`], their timing by `[store]`'s TTLs, moka's expiry, and what a
//!   store read makes of an entry.
//! - `local`: each worker thread's copy of the entries it has used (a seam: the cache decides
//!   the same without it), and the workers' sweep ([`KeyCache::sweep_local`]).
//! - `feed`: the change feed's poller ([`KeyCache::poll_changes`]) and whether the feed vouches
//!   for an entry past its freshness.
//! - `usage`: usage counting ([`KeyCache::touch`]) and the flusher
//!   ([`KeyCache::flush_usage_every`]).
//! - `refresh`: refresh-ahead, the background re-read of keys in use
//!   ([`KeyCache::refresh_ahead`]).
//! - `guarded`: the store behind the outage breaker: every call timed and tracked, the
//!   permission check, the counts and the health answer.

mod entry;
mod feed;
mod guarded;
mod local;
mod refresh;
mod usage;

#[cfg(test)]
mod testing;

use std::sync::Arc;
use std::time::Instant;

use moka::future::Cache;
use moka::ops::compute::{CompResult, Op};

use self::entry::Timing;
pub use self::entry::{Entry, KnownKey};
use self::feed::Feed;
use self::guarded::GuardedStore;
pub use self::local::LOCAL_SWEEP_INTERVAL;
use self::local::ThreadCopies;
use self::refresh::RefreshQueue;
use self::usage::UsageQueue;
use crate::config;
use crate::key::KeyDigest;
use crate::metrics::Metrics;
use crate::store::health::{Report, StoreHealth};
use crate::store::{SharedStore, StoreError};

/// The key cache and the state of its background jobs, grouped by the part that owns it.
pub struct KeyCache {
    /// The shared cache: each digest's decision, expired by `timing`.
    entries: Cache<KeyDigest, Entry>,
    /// How long entries are fresh and kept (`entry`).
    timing: Timing,
    /// The store, behind the outage breaker (`guarded`).
    store: GuardedStore,
    /// Whether the change feed vouches for entries past their freshness (`feed`).
    feed: Feed,
    /// The worker threads' copies of the shared cache (`local`).
    copies: ThreadCopies,
    /// The keys used since the last usage flush (`usage`).
    usage: UsageQueue,
    /// The keys due for a background re-read (`refresh`).
    refresh: RefreshQueue,
    metrics: Arc<Metrics>,
}

/// Where a resolved entry came from (for metrics and logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A fresh cache entry.
    Hit,
    /// Read from the store just now (or by a concurrent request for the same digest).
    Store,
    /// A known key past its TTL, served because the store is failing.
    Stale,
}

/// The store could not answer and no usable cached decision exists.
#[derive(Debug, Clone, thiserror::Error)]
#[error("key store unavailable")]
pub struct Unavailable;

impl KeyCache {
    /// A cache in front of `store`, sized and timed by `[store]`.
    pub fn new(store: SharedStore, cfg: &config::Store, metrics: Arc<Metrics>) -> Self {
        let timing = Timing::new(cfg);
        let entries = Cache::builder()
            .max_capacity(cfg.cache_capacity)
            .expire_after(timing.expiry())
            .build();
        Self {
            entries,
            timing,
            store: GuardedStore::new(store, cfg.timeout, Arc::clone(&metrics)),
            feed: Feed::new(cfg.poll_interval, metrics.change_feed_lapses.clone()),
            copies: ThreadCopies::new(cfg.cache_capacity),
            usage: UsageQueue::new(),
            refresh: RefreshQueue::new(),
            metrics,
        }
    }

    /// The store behind the cache.
    pub fn store(&self) -> &SharedStore {
        self.store.inner()
    }

    /// Whether legacy (checksum-less) keys exist, so malformed keys still deserve a lookup.
    pub fn legacy_present(&self) -> bool {
        self.store.legacy_present()
    }

    /// Whether the last store call succeeded.
    pub fn store_up(&self) -> bool {
        self.store.up()
    }

    /// Number of cached entries (approximate, as moka reports it).
    pub fn entry_count(&self) -> u64 {
        self.entries.entry_count()
    }

    /// The store's health as this gateway knows it (the outage breaker and the rest).
    pub fn health(&self) -> &Arc<StoreHealth> {
        self.store.health()
    }

    /// Checks at start-up that the store permits every command keygate uses. A refusal is the
    /// error to stop with; a store that does not answer yet is checked by the poller when it
    /// first does.
    pub async fn check_access(&self) -> Result<(), StoreError> {
        self.store.check_access().await
    }

    /// Re-reads the legacy flag and the active-key gauge.
    pub async fn refresh_counts(&self) {
        self.store.refresh_counts().await;
    }

    /// The health answer (computed at most once a second): what is wrong with the store, the
    /// active keys and the node, asking the store only when it is available.
    pub async fn health_report(&self, limits_degraded: bool) -> Arc<Report> {
        self.store.report(limits_degraded).await
    }

    /// Whether `entry` may be served without a store read at `now`: it is fresh, or it is a
    /// known key within `stale_if_error` of its freshness (as long as the shared cache keeps it)
    /// for which the change feed vouches.
    fn usable(&self, entry: &Entry, now: Instant) -> bool {
        if entry.fresh_until() > now {
            return true;
        }
        match entry {
            Entry::Known(k) => {
                self.timing.within_stale_if_error(k, now)
                    && self.feed.vouches_for(k.loaded_at(), now)
            }
            Entry::Unknown { .. } => false,
        }
    }

    /// The decision for `digest`: from the cache when fresh, else from the store (one lookup per
    /// digest at a time), else a stale known entry while the store is failing.
    pub async fn resolve(&self, digest: KeyDigest) -> Result<(Entry, Source), Unavailable> {
        let now = Instant::now();
        if let Some(entry) = self.copies.get(&digest, |e| self.usable(e, now)) {
            self.hit(&entry, now);
            return Ok((entry, Source::Hit));
        }
        // Read before the shared cache: what is kept under it predates no change after it.
        let generation = self.copies.generation();
        let current = match self.entries.get(&digest).await {
            Some(entry) if self.usable(&entry, now) => {
                self.copies.keep(digest, &entry, generation);
                self.hit(&entry, now);
                return Ok((entry, Source::Hit));
            }
            other => other,
        };
        self.metrics.cache_misses.increment(1);
        if !self.store.available() {
            // The breaker is open (or the data lost): no request waits on the store.
            return match current {
                Some(e @ Entry::Known(_)) => {
                    self.metrics.cache_stale_served.increment(1);
                    Ok((e, Source::Stale))
                }
                Some(Entry::Unknown { .. }) | None => Err(Unavailable),
            };
        }
        let (entry, failed) = self.load(digest).await;
        match (entry, failed) {
            (Some(e), false) => Ok((e, Source::Store)),
            // Only a known key may outlive its TTL; moka drops it after `stale_if_error`.
            (Some(e @ Entry::Known(_)), true) => {
                self.metrics.cache_stale_served.increment(1);
                Ok((e, Source::Stale))
            }
            (Some(Entry::Unknown { .. }) | None, _) => Err(Unavailable),
        }
    }

    /// Counts a hit on `entry` and, once a known key's entry is due for a re-read, asks (once)
    /// for it in the background.
    fn hit(&self, entry: &Entry, now: Instant) {
        self.metrics.cache_hits.increment(1);
        if let Entry::Known(k) = entry {
            self.refresh.ask(k, now);
        }
    }

    /// Reads `digest` from the store into the cache for a request that found no usable entry,
    /// serialised with every other read of it (moka's per-key compute), unless a read ahead of
    /// it in that queue made the entry usable. Returns the entry after it, and whether the store
    /// failed.
    async fn load(&self, digest: KeyDigest) -> (Option<Entry>, bool) {
        let mut failed = false;
        let failed_flag = &mut failed;
        let mut replaced = false;
        let replaced_flag = &mut replaced;
        let result = self
            .entries
            .entry(digest)
            .and_compute_with(|current| {
                let current = current.map(|e| e.into_value());
                async move {
                    let now = Instant::now();
                    if current.as_ref().is_some_and(|e| self.usable(e, now)) {
                        // A request ahead of us in this digest's queue read it.
                        return Op::Nop;
                    }
                    if !self.store.available() {
                        // The read ahead of us failed and opened the breaker: not again.
                        *failed_flag = true;
                        return Op::Nop;
                    }
                    match self.store.lookup(digest).await {
                        Ok(record) => {
                            let read = self.timing.after_read(current.as_ref(), record, now);
                            *replaced_flag = read.replaced;
                            Op::Put(read.entry)
                        }
                        Err(_) => {
                            *failed_flag = true;
                            Op::Nop
                        }
                    }
                }
            })
            .await;
        if replaced {
            // A known entry can become usable again in a copy (when the feed is confirmed
            // again), so copies must not keep what this read found changed.
            self.copies.invalidate();
        }
        let entry = match result {
            CompResult::Inserted(e) | CompResult::ReplacedWith(e) | CompResult::Unchanged(e) => {
                Some(e.into_value())
            }
            CompResult::Removed(_) | CompResult::StillNone(_) => None,
        };
        (entry, failed)
    }

    /// Drops the cached decision for `digest`. Serialised with lookups of the same digest, so a
    /// lookup that read the store before a change cannot re-insert the old decision afterwards.
    pub async fn evict(&self, digest: KeyDigest) {
        self.entries
            .entry(digest)
            .and_compute_with(|_| async { Op::Remove })
            .await;
        // Not left to the eviction listener, which moka may call later: a revocation must empty
        // the workers' copies now.
        self.copies.invalidate();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    use super::testing::{record, setup, setup_with, stored_key};
    use super::*;

    #[tokio::test]
    async fn a_confirmed_feed_keeps_a_known_key_for_all_of_stale_if_error() {
        let (_dir, _store, cache) = setup_with(|cfg| cfg.stale_if_error = Duration::from_secs(2));
        let secret = crate::key::generate().unwrap();
        let now = Instant::now();
        // Read `ago`, fresh until then: being past its freshness asks for a background re-read,
        // it does not end the entry.
        let read = |ago| {
            let at = now - ago;
            Entry::Known(Arc::new(KnownKey::new(record(&secret), at, at)))
        };
        cache.feed.follow_from(now - Duration::from_secs(3));
        cache.feed.confirm();
        let ms = Duration::from_millis;
        assert!(cache.usable(&read(ms(1)), now));
        assert!(cache.usable(&read(ms(1_999)), now));
        // Not once the shared cache drops it.
        assert!(!cache.usable(&read(ms(2_000)), now));
        // And never without the feed's confirmation.
        cache.feed.unconfirm();
        assert!(!cache.usable(&read(ms(1)), now));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn while_the_store_hangs_no_request_waits_on_it_in_turn() {
        let timeout = Duration::from_millis(300);
        let (_dir, store, cache) = setup_with(|cfg| {
            cfg.timeout = timeout;
            cfg.positive_ttl = Duration::from_millis(100);
            cfg.stale_if_error = Duration::from_secs(60);
        });
        let known = stored_key(&store).await;
        assert_eq!(cache.resolve(known.digest).await.unwrap().1, Source::Store);
        tokio::time::sleep(Duration::from_millis(150)).await; // past positive_ttl
        store.lookups_hang.store(true, Ordering::SeqCst);
        let lookups_before = store.lookups.load(Ordering::SeqCst);

        // Eight requests for the known key and eight for an unknown one, at once: the first
        // lookup of each digest waits for the store timeout and opens the breaker; the requests
        // queued behind it, and every one after, are answered without calling the store.
        let unknown = KeyDigest::of(b"sk_never_seen");
        let started = Instant::now();
        let tasks: Vec<_> = (0..16)
            .map(|i| {
                let cache = Arc::clone(&cache);
                let digest = if i % 2 == 0 { known.digest } else { unknown };
                tokio::spawn(async move {
                    let result = cache.resolve(digest).await;
                    (digest, result.map(|(_, source)| source), Instant::now())
                })
            })
            .collect();
        for t in tasks {
            let (digest, result, done) = t.await.unwrap();
            let took = done - started;
            assert!(took < timeout * 2, "a request waited {took:?}");
            if digest == known.digest {
                assert_eq!(result.unwrap(), Source::Stale);
            } else {
                assert!(result.is_err(), "an unknown key was answered: {result:?}");
            }
        }
        assert!(cache.health().breaker_open());
        assert!(store.lookups.load(Ordering::SeqCst) - lookups_before <= 2);
        // Later requests do not call the store at all.
        let calls = store.lookups.load(Ordering::SeqCst);
        let started = Instant::now();
        assert_eq!(cache.resolve(known.digest).await.unwrap().1, Source::Stale);
        assert!(cache.resolve(unknown).await.is_err());
        assert!(started.elapsed() < Duration::from_millis(50));
        assert_eq!(store.lookups.load(Ordering::SeqCst), calls);

        // The probe (a poll) closes the breaker once the store answers; lookups resume.
        store.lookups_hang.store(false, Ordering::SeqCst);
        cache.poll_once(&mut None).await.unwrap();
        assert!(!cache.health().breaker_open());
        assert_eq!(cache.resolve(known.digest).await.unwrap().1, Source::Store);
    }

    #[tokio::test]
    async fn concurrent_misses_for_one_digest_cost_one_lookup() {
        let (_dir, store, cache) = setup();
        let digest = KeyDigest::of(b"sk_unknown");
        let tasks: Vec<_> = (0..64)
            .map(|_| {
                let cache = Arc::clone(&cache);
                tokio::spawn(async move { cache.resolve(digest).await })
            })
            .collect();
        for t in tasks {
            let (entry, _) = t.await.unwrap().unwrap();
            assert!(matches!(entry, Entry::Unknown { .. }));
        }
        assert_eq!(store.lookups.load(Ordering::SeqCst), 1);
        // Later requests are hits.
        let (_, source) = cache.resolve(digest).await.unwrap();
        assert_eq!(source, Source::Hit);
        assert_eq!(store.lookups.load(Ordering::SeqCst), 1);
    }
}
