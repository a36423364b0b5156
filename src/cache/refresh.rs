//! Refresh-ahead: known keys in use are re-read in the background before their entries run out
//! ([`RefreshQueue`], the refresher), so no request waits on the store for them, and a change
//! made behind keygate's back (in the database itself, which the change feed does not carry) is
//! seen within a bounded time.
//!
//! A request that finds a known key past its freshness asks for a re-read (once per re-read) and
//! is served from the entry meanwhile, while the change feed vouches for it.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use moka::ops::compute::Op;
use tokio::sync::mpsc;

use super::KeyCache;
use super::entry::{Entry, KnownKey};
use crate::key::KeyDigest;

/// Background re-reads waiting at most; beyond that a key is re-read by the request that finds
/// its entry run out, as without refresh-ahead.
const REFRESH_QUEUE: usize = 4096;

/// Keys re-read in one store call at most
/// ([`KeyStore::lookup_many`](crate::store::KeyStore::lookup_many)).
const REFRESH_BATCH: usize = 256;

/// Digests of known keys due for a background re-read, asked for by requests and taken by the
/// refresher ([`KeyCache::refresh_ahead`]).
pub(super) struct RefreshQueue {
    tx: mpsc::Sender<KeyDigest>,
    /// Taken by the one refresher.
    rx: Mutex<Option<mpsc::Receiver<KeyDigest>>>,
}

impl RefreshQueue {
    pub(super) fn new() -> Self {
        let (tx, rx) = mpsc::channel(REFRESH_QUEUE);
        Self {
            tx,
            rx: Mutex::new(Some(rx)),
        }
    }

    /// Asks (once) for a background re-read of `key` when its entry is due for one at `now`.
    /// When the queue is full the ask is left to a later request.
    pub(super) fn ask(&self, key: &KnownKey, now: Instant) {
        if key.ask_refresh(now)
            && let Err(mpsc::error::TrySendError::Full(_)) = self.tx.try_send(key.record.digest)
        {
            key.unask_refresh();
        }
    }
}

impl KeyCache {
    /// Re-reads, in the background, the known keys that requests found past their freshness, up
    /// to `REFRESH_BATCH` in one store call, until `shutdown`. The requests go on being served
    /// from the entries meanwhile.
    pub async fn refresh_ahead(self: Arc<Self>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let Some(mut rx) = self.refresh.rx.lock().ok().and_then(|mut rx| rx.take()) else {
            return; // another refresher has it
        };
        let mut batch = Vec::with_capacity(REFRESH_BATCH);
        loop {
            tokio::select! {
                n = rx.recv_many(&mut batch, REFRESH_BATCH) => if n == 0 { return },
                _ = shutdown.changed() => return,
            }
            tokio::select! {
                () = self.refresh(&batch) => {}
                _ = shutdown.changed() => return,
            }
            batch.clear();
        }
    }

    /// Re-reads the keys of `digests` whose entries are still due in one store call, then
    /// applies what it found to each entry, serialised with every other read of the key (moka's
    /// per-key compute): only to an entry that was not read again since this read began (by a
    /// request's miss), and not to a key evicted meanwhile (a change on the feed, or for room;
    /// its next request reads it). A failed read leaves the entries as they were.
    async fn refresh(&self, digests: &[KeyDigest]) {
        if !self.store.available() {
            // Served from the entries meanwhile; a request asks again later.
            for digest in digests {
                if let Some(Entry::Known(k)) = self.entries.get(digest).await {
                    k.unask_refresh();
                }
            }
            return;
        }
        let read_at = Instant::now();
        let mut due = Vec::with_capacity(digests.len());
        for digest in digests {
            if let Some(Entry::Known(k)) = self.entries.get(digest).await
                && read_at >= k.fresh_until()
            {
                due.push(*digest);
            }
        }
        if due.is_empty() {
            return;
        }
        self.metrics.cache_refreshes.increment(due.len() as u64);
        let Ok(records) = self.store.lookup_many(due.clone()).await else {
            return;
        };
        for (digest, record) in due.into_iter().zip(records) {
            let mut replaced = false;
            let replaced_flag = &mut replaced;
            self.entries
                .entry(digest)
                .and_compute_with(|current| {
                    let current = current.map(|e| e.into_value());
                    async move {
                        match &current {
                            Some(Entry::Known(k)) if k.loaded_at() < read_at => {
                                let read =
                                    self.timing.after_read(current.as_ref(), record, read_at);
                                *replaced_flag = read.replaced;
                                Op::Put(read.entry)
                            }
                            _ => Op::Nop,
                        }
                    }
                })
                .await;
            if replaced {
                self.copies.invalidate();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    use super::super::Source;
    use super::super::testing::{Counting, known, known_local, setup, stored_key};
    use super::*;

    /// A stored key whose cached entry was read `age` ago, fresh for 10 s, with the feed
    /// followed since before then and confirmed.
    async fn cached(store: &Counting, cache: &KeyCache, age: Duration) -> Arc<KnownKey> {
        let rec = stored_key(store).await;
        let now = Instant::now();
        cache.feed.follow_from(now - age - Duration::from_secs(20));
        cache.feed.confirm();
        let digest = rec.digest;
        let loaded_at = now - age;
        let old = Arc::new(KnownKey::new(
            rec,
            loaded_at,
            loaded_at + Duration::from_secs(10),
        ));
        cache
            .entries
            .insert(digest, Entry::Known(old.clone()))
            .await;
        old
    }

    /// A stored key whose cached entry is due for a background re-read: read 80 s ago, fresh for
    /// 10 s, with the feed followed since before then and confirmed.
    async fn due_for_refresh(store: &Counting, cache: &KeyCache) -> Arc<KnownKey> {
        cached(store, cache, Duration::from_secs(80)).await
    }

    #[tokio::test]
    async fn a_fresh_key_asks_for_no_re_read() {
        let (_dir, store, cache) = setup();
        let mut queue = cache.refresh.rx.lock().unwrap().take().unwrap();
        let key = cached(&store, &cache, Duration::from_secs(5)).await;
        assert_eq!(
            cache.resolve(key.record.digest).await.unwrap().1,
            Source::Hit
        );
        assert!(queue.try_recv().is_err() && !key.refresh_asked());
        assert_eq!(store.lookups.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn past_its_freshness_without_the_feed_a_key_is_read_by_its_request() {
        let (_dir, store, cache) = setup();
        let mut queue = cache.refresh.rx.lock().unwrap().take().unwrap();
        let old = due_for_refresh(&store, &cache).await;
        cache.feed.unconfirm();
        assert_eq!(
            cache.resolve(old.record.digest).await.unwrap().1,
            Source::Store
        );
        assert_eq!(store.lookups.load(Ordering::SeqCst), 1);
        assert!(queue.try_recv().is_err(), "a re-read asked for besides");
    }

    #[tokio::test]
    async fn a_re_read_not_queued_is_asked_for_by_a_later_request() {
        let (_dir, store, cache) = setup();
        let mut queue = cache.refresh.rx.lock().unwrap().take().unwrap();
        let old = due_for_refresh(&store, &cache).await;
        let digest = old.record.digest;
        let other = KeyDigest::of(b"sk_other");
        while cache.refresh.tx.try_send(other).is_ok() {}

        assert_eq!(cache.resolve(digest).await.unwrap().1, Source::Hit);
        assert!(!old.refresh_asked(), "lost to a full queue");
        while queue.try_recv() == Ok(other) {}
        assert_eq!(cache.resolve(digest).await.unwrap().1, Source::Hit);
        assert_eq!(queue.try_recv(), Ok(digest));
        assert!(old.refresh_asked());
    }

    #[tokio::test]
    async fn a_key_in_use_is_re_read_in_the_background_before_its_entry_runs_out() {
        let (_dir, store, cache) = setup();
        let mut queue = cache.refresh.rx.lock().unwrap().take().unwrap();
        let old = due_for_refresh(&store, &cache).await;
        let digest = old.record.digest;

        // Served from the cache; the re-read is asked for once, and done off the request.
        for _ in 0..3 {
            assert_eq!(cache.resolve(digest).await.unwrap().1, Source::Hit);
        }
        assert_eq!(queue.try_recv(), Ok(digest));
        assert!(queue.try_recv().is_err(), "asked for twice");
        // The thread's copy stays while the re-read is pending: it is still the current entry.
        let in_copy = || cache.copies.holds(&digest);
        assert!(in_copy());
        cache.sweep_local(Instant::now());
        assert!(in_copy());
        assert_eq!(store.lookups.load(Ordering::SeqCst), 0);
        let (loaded_before, fresh_before) = (old.loaded_at(), old.fresh_until());
        let generation = cache.copies.generation();
        cache.refresh(&[digest]).await;
        assert_eq!(store.lookups.load(Ordering::SeqCst), 1);

        // Found unchanged: the same entry moves on in place, in the shared cache and in the
        // thread's copy (which is not emptied), and asks for nothing.
        let (entry, source) = cache.resolve(digest).await.unwrap();
        let new = known(entry);
        assert_eq!(source, Source::Hit);
        assert!(Arc::ptr_eq(&new, &old) && Arc::ptr_eq(&new, &known_local(&cache, &digest)));
        assert!(new.loaded_at() > loaded_before && new.fresh_until() > fresh_before);
        assert!(Instant::now() < new.fresh_until() && !new.refresh_asked());
        assert_eq!(cache.copies.generation(), generation);
        assert!(queue.try_recv().is_err(), "asked for again");
        // A second refresh of the same digest finds it done.
        cache.refresh(&[digest]).await;
        assert_eq!(store.lookups.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_key_evicted_while_its_re_read_is_in_flight_stays_out() {
        let (_dir, store, cache) = setup();
        let old = due_for_refresh(&store, &cache).await;
        let digest = old.record.digest;
        // The counting store answers after 50 ms; the eviction (a change on the feed) comes
        // while the re-read waits for it.
        let evict = async {
            tokio::time::sleep(Duration::from_millis(10)).await;
            cache.evict(digest).await;
        };
        let batch = [digest];
        tokio::join!(cache.refresh(&batch), evict);
        cache.entries.run_pending_tasks().await;
        assert_eq!(store.lookups.load(Ordering::SeqCst), 1);
        assert!(
            cache.entries.get(&digest).await.is_none(),
            "the re-read put back an evicted key"
        );
    }

    #[tokio::test]
    async fn the_refresher_re_reads_what_requests_ask_for_until_shutdown() {
        let (_dir, store, cache) = setup();
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let refresher = tokio::spawn(Arc::clone(&cache).refresh_ahead(stopped));
        let old = due_for_refresh(&store, &cache).await;
        let digest = old.record.digest;
        let loaded_before = old.loaded_at();
        assert_eq!(cache.resolve(digest).await.unwrap().1, Source::Hit);

        // The re-read moves the entry on without another request (waited for, not timed).
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let current = known(cache.entries.get(&digest).await.expect("cached"));
            if current.loaded_at() > loaded_before {
                break;
            }
            assert!(Instant::now() < deadline, "no background re-read");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(store.lookups.load(Ordering::SeqCst), 1);

        stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(10), refresher)
            .await
            .expect("the refresher stops on shutdown")
            .unwrap();
    }
}
