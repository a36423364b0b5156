//! The change feed: its poller, which applies the store's changes to the cache (a revocation
//! reaches the gateway within one poll interval) and is the outage breaker's probe, and whether
//! the feed vouches for entries past their freshness ([`Feed`]).
//!
//! Every change made through keygate reaches the cache on the feed. So while the feed is
//! confirmed (polled successfully within the last two poll intervals), a known key read while
//! the feed has been followed without a break is as current as a re-read would make it, and is
//! served without one for all of `stale_if_error`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use metrics::Counter;

use super::KeyCache;
use crate::store::{Changes, StoreError};

/// Whether the change feed is followed, and since when: the state the poller keeps for requests
/// to read.
pub(super) struct Feed {
    /// The instant the times below count from.
    epoch: Instant,
    poll_interval: Duration,
    /// Until when (nanoseconds after `epoch`) the feed counts as confirmed: two poll intervals
    /// after the last successful poll.
    confirmed_until: AtomicU64,
    /// Since when (nanoseconds after `epoch`) the feed has been followed without a break: only
    /// entries read from the store after it can rely on the feed.
    since: AtomicU64,
    /// `keygate_change_feed_lapses_total`.
    lapses: Counter,
}

impl Feed {
    /// A feed not followed yet, polled every `poll_interval`; lapses counted in `lapses`.
    pub(super) fn new(poll_interval: Duration, lapses: Counter) -> Self {
        Self {
            epoch: Instant::now(),
            poll_interval,
            confirmed_until: AtomicU64::new(0),
            since: AtomicU64::new(u64::MAX),
            lapses,
        }
    }

    fn nanos_since_epoch(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    /// Whether the feed vouches at `now` for an entry read from the store at `loaded_at`: the
    /// feed is confirmed, and it has been followed without a break since before the read.
    pub(super) fn vouches_for(&self, loaded_at: Instant, now: Instant) -> bool {
        self.confirmed(now)
            && self.nanos_since_epoch(loaded_at) >= self.since.load(Ordering::Relaxed)
    }

    /// Whether the change feed was polled successfully within the last two poll intervals.
    fn confirmed(&self, now: Instant) -> bool {
        self.nanos_since_epoch(now) < self.confirmed_until.load(Ordering::Relaxed)
    }

    /// Records a successful poll of the change feed, counting a lapse when the poll came after
    /// the previous confirmation had run out.
    pub(super) fn confirm(&self) {
        let now = Instant::now();
        let until = self.nanos_since_epoch(now + 2 * self.poll_interval);
        let before = self.confirmed_until.swap(until, Ordering::Relaxed);
        if before != 0 && before <= self.nanos_since_epoch(now) {
            self.lapses.increment(1);
        }
    }

    /// Withdraws the confirmation (a failed poll), counting a lapse unless it was already
    /// withdrawn (or never given).
    pub(super) fn unconfirm(&self) {
        if self.confirmed_until.swap(0, Ordering::Relaxed) != 0 {
            self.lapses.increment(1);
        }
    }

    /// Marks the start of an unbroken stretch of the feed: the first position read, or a gap.
    /// Entries read before `at` may predate a change the feed no longer shows.
    pub(super) fn follow_from(&self, at: Instant) {
        self.since
            .store(self.nanos_since_epoch(at), Ordering::Relaxed);
    }
}

impl KeyCache {
    /// Applies one poll of the change feed (a probe of the store: it runs while the breaker is
    /// open); returns the next position, or the same one when the store lost its data.
    pub async fn apply_changes(&self, position: u64) -> Result<u64, StoreError> {
        let changes = self.store.changes_since(position).await?;
        let next = match changes {
            Changes::Digests { digests, next } => {
                self.store.health().set_lost(None);
                if digests.is_empty() {
                    return Ok(next);
                }
                for d in digests {
                    self.evict(d).await;
                }
                self.store.health().keys_changed();
                next
            }
            Changes::Gap { next } => {
                tracing::warn!("change feed gap: dropping every cached key decision");
                // Entries read before now may have missed a change: they never rely on the feed.
                self.feed.follow_from(Instant::now());
                self.entries.invalidate_all();
                // `invalidate_all` notifies the eviction listener lazily, if at all.
                self.copies.invalidate();
                // Adopted as it is now (a new identity marker): trusted again, cache empty.
                self.store.health().set_lost(None);
                next
            }
            Changes::Lost { reason } => {
                // Nothing it answers is trusted, a missing key least of all: the cache keeps
                // serving what it has, and nothing is read from the store.
                self.store.health().set_lost(Some(&reason));
                return Ok(position);
            }
        };
        self.store.refresh_counts().await;
        Ok(next)
    }

    /// One poll of the change feed from `position` (`None`: not followed yet), confirming the
    /// feed on success and withdrawing the confirmation on failure. It is also the outage
    /// breaker's probe: it calls the store whatever the breaker says, and closes it when the
    /// store answers.
    pub async fn poll_once(&self, position: &mut Option<u64>) -> Result<(), StoreError> {
        let result = match *position {
            // Start from the feed's current end; entries read before this may predate a change
            // the feed no longer shows, so they never rely on it (`Feed::follow_from`).
            // The legacy flag and the gauge were read at start; a change committed between
            // that read and this position is not in the feed, so they are read again.
            None => {
                let asked = Instant::now();
                let read = self.store.change_position().await.map(|p| {
                    self.feed.follow_from(asked);
                    *position = Some(p);
                });
                if read.is_ok() {
                    self.store.refresh_counts().await;
                }
                read
            }
            Some(p) => self
                .apply_changes(p)
                .await
                .map(|next| *position = Some(next)),
        };
        match &result {
            Ok(()) => {
                self.store.health().close();
                if self.store.health().lost() {
                    self.feed.unconfirm();
                } else {
                    self.feed.confirm();
                }
                self.store.recheck_access().await;
            }
            Err(_) => self.feed.unconfirm(),
        }
        result
    }

    /// Polls the change feed every `interval` until `shutdown` fires.
    pub async fn poll_changes(
        self: Arc<Self>,
        interval: Duration,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut position = None;
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut since_counts = Instant::now();
        let signal = self.store.change_signal();
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = wait(signal.as_deref()) => {}
                _ = shutdown.changed() => return,
            }
            let was_open = self.store.health().breaker_open();
            if let Err(e) = self.poll_once(&mut position).await {
                if was_open {
                    self.store.health().probe_failed(&e.to_string());
                } else if !self.store.health().breaker_open()
                    && let Some(suppressed) = POLL_FAILED.allow()
                {
                    // (A failure that opened the breaker was logged as that.)
                    tracing::warn!(error = %e, suppressed, "change feed poll failed");
                }
            }
            if since_counts.elapsed() >= Duration::from_secs(15) {
                since_counts = Instant::now();
                self.store.refresh_counts().await;
                self.store.refresh_status().await;
            }
            self.metrics
                .cache_entries
                .set(self.entries.entry_count() as f64);
        }
    }
}

/// Repeated poll failures outside an outage (the breaker's probe failures have their own line).
static POLL_FAILED: crate::logging::Throttle =
    crate::logging::Throttle::new(Duration::from_secs(30));

/// Resolves when `signal` is raised; never without one.
async fn wait(signal: Option<&tokio::sync::Notify>) {
    match signal {
        Some(s) => s.notified().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::super::testing::{record, setup, setup_short_ttl};
    use super::super::{Entry, KeyCache, Source};
    use super::*;
    use crate::store::KeyStore;

    #[tokio::test]
    async fn a_confirmed_feed_keeps_known_keys_past_their_ttl_without_store_reads() {
        let (_dir, store, cache) = setup_short_ttl();
        let secret = crate::key::generate().unwrap();
        let rec = record(&secret);
        store.insert(rec.clone()).await.unwrap();
        let ttl_passes = || tokio::time::sleep(Duration::from_millis(150));

        // Read before the feed is followed: this entry may not rely on the feed.
        let (_, source) = cache.resolve(secret.digest()).await.unwrap();
        assert_eq!(source, Source::Store);
        let mut position = None;
        cache.poll_once(&mut position).await.unwrap();
        ttl_passes().await;
        cache.poll_once(&mut position).await.unwrap();
        let (_, source) = cache.resolve(secret.digest()).await.unwrap();
        assert_eq!(
            source,
            Source::Store,
            "an entry older than the feed was extended"
        );
        assert_eq!(store.lookups.load(Ordering::SeqCst), 2);

        // Read while the feed is followed: past its TTL, with the feed confirmed, it is served
        // from the cache.
        ttl_passes().await;
        cache.poll_once(&mut position).await.unwrap();
        let (_, source) = cache.resolve(secret.digest()).await.unwrap();
        assert_eq!(source, Source::Hit);
        assert_eq!(store.lookups.load(Ordering::SeqCst), 2);

        // A change still reaches it through the feed.
        store.set_active(&rec.id, false).await.unwrap();
        cache.poll_once(&mut position).await.unwrap();
        let (Entry::Known(k), source) = cache.resolve(secret.digest()).await.unwrap() else {
            panic!("not known");
        };
        assert!(!k.record.is_active && source == Source::Store);

        // Unpolled for longer than two poll intervals, the confirmation lapses: an entry past
        // its TTL is read again.
        tokio::time::sleep(Duration::from_millis(700)).await;
        let (_, source) = cache.resolve(secret.digest()).await.unwrap();
        assert_eq!(source, Source::Store);
        assert_eq!(store.lookups.load(Ordering::SeqCst), 4);
    }

    /// `keygate_change_feed_lapses_total` as rendered for Prometheus.
    fn lapses(cache: &KeyCache) -> u64 {
        let text = cache.metrics.render();
        text.lines()
            .find_map(|l| l.strip_prefix("keygate_change_feed_lapses_total "))
            .map_or(0, |v| v.trim().parse().unwrap())
    }

    #[tokio::test]
    async fn each_lapse_of_the_feeds_confirmation_is_counted_once() {
        let (_dir, _store, cache) = setup_short_ttl();
        let mut position = None;
        // The first confirmation, and polls on time, are no lapse.
        cache.poll_once(&mut position).await.unwrap();
        cache.poll_once(&mut position).await.unwrap();
        assert_eq!(lapses(&cache), 0);
        // A poll later than two intervals (600 ms) finds the confirmation run out.
        tokio::time::sleep(Duration::from_millis(700)).await;
        cache.poll_once(&mut position).await.unwrap();
        assert_eq!(lapses(&cache), 1);
        // A failed poll withdraws it: one lapse, however many polls fail in a row.
        cache.feed.unconfirm();
        cache.feed.unconfirm();
        assert_eq!(lapses(&cache), 2);
        cache.poll_once(&mut position).await.unwrap();
        assert_eq!(lapses(&cache), 2);
        // A confirmation that ran out and then a failed poll: one lapse, not two.
        tokio::time::sleep(Duration::from_millis(700)).await;
        cache.feed.unconfirm();
        cache.poll_once(&mut position).await.unwrap();
        assert_eq!(lapses(&cache), 3);
    }

    #[tokio::test]
    async fn a_legacy_import_before_the_first_poll_is_seen_by_it() {
        let (_dir, store, cache) = setup();
        cache.refresh_counts().await;
        assert!(!cache.legacy_present());
        // Imported after the start's read and before the feed's first position: no change in
        // the feed will ever carry it.
        let mut rec = record(&crate::key::generate().unwrap());
        rec.legacy = true;
        store.import(vec![rec]).await.unwrap();
        cache.poll_once(&mut None).await.unwrap();
        assert!(cache.legacy_present());
    }

    #[tokio::test]
    async fn eviction_makes_the_next_request_read_the_store() {
        let (_dir, store, cache) = setup();
        let secret = crate::key::generate().unwrap();
        let digest = secret.digest();
        let (entry, _) = cache.resolve(digest).await.unwrap();
        assert!(matches!(entry, Entry::Unknown { .. }));
        store.insert(record(&secret)).await.unwrap();
        let position = 0;
        cache.apply_changes(position).await.unwrap();
        let (entry, source) = cache.resolve(digest).await.unwrap();
        assert!(matches!(entry, Entry::Known(_)));
        assert_eq!(source, Source::Store);
        assert_eq!(store.lookups.load(Ordering::SeqCst), 2);
    }
}
