//! Usage: `last_used` and use counts, counted per request without a lock and written to the
//! store in batches, never per request ([`UsageQueue`], the flusher).
//!
//! A use is two atomic updates on the key's entry ([`KnownKey::add_uses`]); the first use after a
//! flush also queues the key, lock-free, so a flush reads only the keys used since the last one.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;

use super::KeyCache;
use super::entry::KnownKey;
use crate::store::{StoreError, Usage};

/// The keys used since the last flush, each queued by its first use after it.
pub(super) struct UsageQueue {
    tx: mpsc::UnboundedSender<Arc<KnownKey>>,
    /// Drained by the flusher.
    rx: Mutex<mpsc::UnboundedReceiver<Arc<KnownKey>>>,
}

/// A key's uses taken for a flush: the key, how many, the latest (Unix seconds).
type Taken = (Arc<KnownKey>, u64, i64);

impl UsageQueue {
    pub(super) fn new() -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        Self {
            tx,
            rx: Mutex::new(rx),
        }
    }

    /// Adds `count` uses, the latest at `last_used`, to `key`'s unflushed usage, queueing the
    /// key for the next flush when it had none.
    fn add(&self, key: &Arc<KnownKey>, count: u64, last_used: i64) {
        if key.add_uses(count, last_used) {
            // Cannot fail: the receiver lives as long as `self`.
            let _ = self.tx.send(Arc::clone(key));
        }
    }

    /// Takes the usage of the keys queued before this call: each key with its uses (count and
    /// latest), and the batch to write. A key can appear twice (used again while this runs, or
    /// re-read as changed with uses on both entries): the stores add usage up.
    fn take(&self) -> (Vec<Taken>, Vec<Usage>) {
        let Ok(mut queue) = self.rx.lock() else {
            return (Vec::new(), Vec::new());
        };
        // A key used again meanwhile is queued again, for the next flush.
        let queued = queue.len();
        let mut taken = Vec::with_capacity(queued);
        for _ in 0..queued {
            let Ok(key) = queue.try_recv() else { break };
            if let Some((count, last_used)) = key.take_uses() {
                taken.push((key, count, last_used));
            }
        }
        let batch = taken
            .iter()
            .map(|(key, count, last_used)| Usage {
                id: key.record.id.clone(),
                digest: key.record.digest,
                last_used: *last_used,
                count: *count,
            })
            .collect();
        (taken, batch)
    }
}

impl KeyCache {
    /// Records one authenticated use of `key`, for the next [`KeyCache::flush_usage`]. Lock-free:
    /// two atomic updates, and the first use after a flush queues the key for it.
    pub fn touch(&self, key: &Arc<KnownKey>, now_unix: i64) {
        self.usage.add(key, 1, now_unix);
    }

    /// Writes the usage of the keys used since the last flush in one batch. On failure the
    /// usage is given back to the keys, for the next flush.
    pub async fn flush_usage(self: &Arc<Self>) -> Result<usize, StoreError> {
        if !self.store.available() {
            // Kept in the keys for a flush that can succeed.
            let (_, why) = self.store.health().problems(false);
            return Err(StoreError::Unavailable(why));
        }
        // Taken on the blocking pool: with 100,000 keys in use this is milliseconds of work that
        // never yields, which on a runtime thread would hold up the change feed's poller past two
        // poll intervals (withdrawing the feed's confirmation).
        let this = Arc::clone(self);
        let (taken, batch) = tokio::task::spawn_blocking(move || this.usage.take())
            .await
            .map_err(|e| StoreError::Unavailable(format!("usage gathering failed: {e}")))?;
        if taken.is_empty() {
            return Ok(0);
        }
        match self.store.record_usage(batch).await {
            Ok(()) => Ok(taken.len()),
            Err(e) => {
                for (key, count, last_used) in &taken {
                    self.usage.add(key, *count, *last_used);
                }
                Err(e)
            }
        }
    }

    /// Flushes usage every `interval` until `shutdown` fires (the final flush is the caller's).
    pub async fn flush_usage_every(
        self: Arc<Self>,
        interval: Duration,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await;
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = shutdown.changed() => return,
            }
            // While the breaker is open the flush waits, and the breaker's own lines say why.
            if let Err(e) = self.flush_usage().await
                && self.store.available()
                && let Some(suppressed) = FLUSH_FAILED.allow()
            {
                tracing::warn!(error = %e, suppressed, "usage flush failed; will retry");
            }
        }
    }
}

/// Repeated usage-flush failures.
static FLUSH_FAILED: crate::logging::Throttle =
    crate::logging::Throttle::new(Duration::from_secs(30));

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::super::Entry;
    use super::super::testing::{record, setup};
    use super::*;
    use crate::store::KeyStore;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn uses_counted_while_flushes_run_are_each_flushed_once() {
        let (_dir, store, cache) = setup();
        let secret = crate::key::generate().unwrap();
        store.insert(record(&secret)).await.unwrap();
        let (Entry::Known(key), _) = cache.resolve(secret.digest()).await.unwrap() else {
            panic!("not known");
        };
        const THREADS: u64 = 4;
        const USES: u64 = 20_000;
        let done = Arc::new(AtomicBool::new(false));
        let users: Vec<_> = (0..THREADS)
            .map(|t| {
                let (cache, key, done) = (Arc::clone(&cache), Arc::clone(&key), done.clone());
                std::thread::spawn(move || {
                    for i in 0..USES {
                        cache.touch(&key, i64::try_from(t * USES + i).unwrap());
                    }
                    done.store(true, Ordering::Relaxed);
                })
            })
            .collect();
        // Flushes race the uses: each 0 -> 1 of the pending count queues the key again.
        let mut flushes = 0;
        while !done.load(Ordering::Relaxed) || flushes < 3 {
            cache.flush_usage().await.unwrap();
            flushes += 1;
        }
        for u in users {
            u.join().unwrap();
        }
        cache.flush_usage().await.unwrap();
        assert_eq!(cache.flush_usage().await.unwrap(), 0, "flushed twice");
        let r = store.find("cache-test").await.unwrap();
        assert_eq!(r.use_count, THREADS * USES);
        assert_eq!(
            r.last_used,
            Some(i64::try_from(THREADS * USES - 1).unwrap())
        );
    }

    #[tokio::test]
    async fn usage_a_failed_flush_took_is_flushed_by_the_next() {
        let (_dir, store, cache) = setup();
        let secret = crate::key::generate().unwrap();
        store.insert(record(&secret)).await.unwrap();
        let (Entry::Known(key), _) = cache.resolve(secret.digest()).await.unwrap() else {
            panic!("not known");
        };
        cache.touch(&key, 1_000);
        store.usage_fails.store(true, Ordering::SeqCst);
        assert!(cache.flush_usage().await.is_err());
        // The failure opened the breaker: the next flush keeps the uses without a store call.
        assert!(cache.health().breaker_open());
        cache.touch(&key, 2_000);
        assert!(cache.flush_usage().await.is_err());
        store.usage_fails.store(false, Ordering::SeqCst);
        // The poller's probe closes the breaker.
        cache.poll_once(&mut None).await.unwrap();
        assert!(!cache.health().breaker_open());
        // Given back to the key each time: one record, both uses, the latest time.
        assert_eq!(cache.flush_usage().await.unwrap(), 1);
        assert_eq!(cache.flush_usage().await.unwrap(), 0, "flushed twice");
        let r = store.find("cache-test").await.unwrap();
        assert_eq!((r.use_count, r.last_used), (2, Some(2_000)));
    }

    #[tokio::test]
    async fn usage_survives_eviction_and_is_flushed_once() {
        let (_dir, store, cache) = setup();
        let secret = crate::key::generate().unwrap();
        let digest = secret.digest();
        store.insert(record(&secret)).await.unwrap();
        let (Entry::Known(key), _) = cache.resolve(digest).await.unwrap() else {
            panic!("not known");
        };
        cache.touch(&key, 1_000);
        cache.touch(&key, 2_000);
        cache.evict(digest).await;
        cache.entries.run_pending_tasks().await;
        assert_eq!(cache.flush_usage().await.unwrap(), 1);
        assert_eq!(cache.flush_usage().await.unwrap(), 0, "flushed twice");
        let r = store.find("cache-test").await.unwrap();
        assert_eq!((r.use_count, r.last_used), (2, Some(2_000)));
    }
}
