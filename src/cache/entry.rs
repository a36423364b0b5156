//! What the cache holds for a digest, and for how long: an [`Entry`] (a [`KnownKey`] or an
//! unknown digest), its timing by `[store]`'s TTLs ([`Timing`]), moka's per-entry expiry, and
//! what a store read makes of the entry it finds ([`Timing::after_read`]).
//!
//! A known key (active or not) is fresh for `positive_ttl` (each entry for a random 75-100% of
//! it, so entries made together do not expire together) and kept `stale_if_error` longer; the
//! first request after its freshness has it re-read in the background. An unknown key is cached
//! for `negative_ttl` (likewise jittered). A re-read that finds a known key deciding as before
//! moves its entry on in place, so that the entry, and every worker's copy of it, stays as it is.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use http::HeaderValue;

use crate::config;
use crate::key::KeyDigest;
use crate::policy::Compiled;
use crate::store::KeyRecord;

/// A key the store knows, as cached: its record, header values prepared for forwarding, and usage
/// not yet flushed.
#[derive(Debug)]
pub struct KnownKey {
    /// The stored record (digest, never the key).
    pub record: KeyRecord,
    /// `record.id` as a header value, prepared once.
    pub id_header: HeaderValue,
    /// `record.name` as a header value, prepared once (names are validated to be header-safe).
    pub name_header: HeaderValue,
    /// `record.owner` as a header value, prepared once; `None` for a key without an owner (or,
    /// failing closed on a record written by hand, one that is not a valid header value).
    pub owner_header: Option<HeaderValue>,
    /// `record.policy`, compiled once.
    pub policy: Compiled,
    /// When the record was first read from the store. The times below are kept as nanoseconds
    /// after it, so that a re-read that finds the key unchanged can move them on in place
    /// ([`KnownKey::extend`]): the entry, and every worker's copy of it, stays as it is.
    origin: Instant,
    /// When the record was last read from the store (found unchanged since `origin`).
    loaded_at: AtomicU64,
    /// Until when the entry is fresh. From then on, a request that finds it has it re-read in
    /// the background, and is served from it meanwhile while the change feed vouches for it (for
    /// `stale_if_error` longer): a key used at least once every `stale_if_error` never makes a
    /// request wait on the store, and through a store outage it keeps working for about
    /// `stale_if_error` after its last use. The re-read is for changes the feed does not carry.
    fresh_until: AtomicU64,
    /// The background re-read was asked for (once per re-read).
    refresh_asked: AtomicBool,
    /// Uses not flushed yet, and the latest (Unix seconds). The first use after a flush queues
    /// the entry for the next one ([`KeyCache::touch`](super::KeyCache::touch)), so a flush reads
    /// only the keys used since the last one, and uses counted in an entry evicted or replaced
    /// meanwhile are flushed all the same.
    uses_pending: AtomicU64,
    used_last: AtomicI64,
}

impl KnownKey {
    /// `record`, read from the store at (or after) `loaded_at`, fresh until `fresh_until`.
    pub(crate) fn new(record: KeyRecord, loaded_at: Instant, fresh_until: Instant) -> Self {
        let id_header = HeaderValue::from_str(&record.id)
            .unwrap_or_else(|_| HeaderValue::from_static("invalid-id"));
        let name_header = HeaderValue::from_str(&record.name)
            .unwrap_or_else(|_| HeaderValue::from_static("invalid-name"));
        let owner_header = record.owner.as_deref().and_then(|owner| {
            let value = crate::store::check_owner(owner)
                .ok()
                .and_then(|()| HeaderValue::from_str(owner).ok());
            if value.is_none() {
                // Written by hand or by a newer keygate: forwarded without an owner rather than
                // with one a backend might read differently.
                tracing::error!(key_id = %record.id, "stored owner is invalid; forwarded without one");
            }
            value
        });
        let policy = record.policy.compile().unwrap_or_else(|e| {
            // Written by a newer keygate or by hand: refuse rather than guess (fail closed).
            tracing::error!(key_id = %record.id, error = %e, "stored policy is invalid; the key is refused");
            Compiled::deny_all()
        });
        let key = Self {
            record,
            id_header,
            name_header,
            owner_header,
            policy,
            origin: loaded_at,
            loaded_at: AtomicU64::new(0),
            fresh_until: AtomicU64::new(0),
            refresh_asked: AtomicBool::new(false),
            uses_pending: AtomicU64::new(0),
            used_last: AtomicI64::new(0),
        };
        key.extend(loaded_at, fresh_until);
        key
    }

    /// Records a re-read at `loaded_at` that found the key deciding as before: fresh until
    /// `fresh_until`. Times only move on. (The record's usage fields stay as first read:
    /// requests are decided without them.)
    fn extend(&self, loaded_at: Instant, fresh_until: Instant) {
        self.loaded_at
            .fetch_max(self.offset(loaded_at), Ordering::Relaxed);
        self.fresh_until
            .fetch_max(self.offset(fresh_until), Ordering::Relaxed);
        // After the new freshness: a request that sees the ask cleared and an older time asks
        // again, and the re-read finds it not needed yet.
        self.refresh_asked.store(false, Ordering::Release);
    }

    fn offset(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.origin).as_nanos()).unwrap_or(u64::MAX)
    }

    fn at(&self, offset: &AtomicU64) -> Instant {
        self.origin + Duration::from_nanos(offset.load(Ordering::Relaxed))
    }

    /// When the record was last read from the store.
    pub(super) fn loaded_at(&self) -> Instant {
        self.at(&self.loaded_at)
    }

    pub(super) fn fresh_until(&self) -> Instant {
        self.at(&self.fresh_until)
    }

    /// Whether a background re-read is due at `now` (the entry is no longer fresh) and not asked
    /// for yet; marks it asked.
    pub(super) fn ask_refresh(&self, now: Instant) -> bool {
        now >= self.fresh_until() && !self.refresh_asked.swap(true, Ordering::Relaxed)
    }

    /// Takes back an ask that was not queued, for a later request to make again.
    pub(super) fn unask_refresh(&self) {
        self.refresh_asked.store(false, Ordering::Relaxed);
    }

    #[cfg(test)]
    pub(super) fn refresh_asked(&self) -> bool {
        self.refresh_asked.load(Ordering::Relaxed)
    }

    /// Adds `count` uses, the latest at `last_used`; true when the key had none pending (the
    /// caller queues it for the next flush).
    pub(super) fn add_uses(&self, count: u64, last_used: i64) -> bool {
        self.used_last.fetch_max(last_used, Ordering::Relaxed);
        self.uses_pending.fetch_add(count, Ordering::Relaxed) == 0
    }

    /// Takes the pending uses: how many, and the latest (Unix seconds); `None` when there are
    /// none.
    pub(super) fn take_uses(&self) -> Option<(u64, i64)> {
        let count = self.uses_pending.swap(0, Ordering::Relaxed);
        (count > 0).then(|| (count, self.used_last.load(Ordering::Relaxed)))
    }

    /// Whether `record` decides requests exactly as this entry's record does: it differs at most
    /// in the usage the flusher writes. Such a re-read moves the entry on in place
    /// ([`KnownKey::extend`]): the entry and the workers' copies of it stay.
    fn same_decision(&self, record: &KeyRecord) -> bool {
        // Destructured, so that a field added to the record must be placed on one side or the
        // other here.
        let KeyRecord {
            id,
            name,
            digest,
            hint,
            created_at,
            last_used: _,
            use_count: _,
            is_active,
            legacy,
            expires_at,
            policy,
            rotated_to,
            owner,
        } = &self.record;
        *id == record.id
            && *name == record.name
            && *digest == record.digest
            && *hint == record.hint
            && *created_at == record.created_at
            && *is_active == record.is_active
            && *legacy == record.legacy
            && *expires_at == record.expires_at
            && *policy == record.policy
            && *rotated_to == record.rotated_to
            && *owner == record.owner
    }
}

/// A cached decision.
#[derive(Debug, Clone)]
pub enum Entry {
    /// The store has this digest.
    Known(Arc<KnownKey>),
    /// The store does not have this digest (as of `fresh_until - negative_ttl`).
    Unknown { fresh_until: Instant },
}

impl Entry {
    pub(super) fn fresh_until(&self) -> Instant {
        match self {
            Entry::Known(k) => k.fresh_until(),
            Entry::Unknown { fresh_until } => *fresh_until,
        }
    }
}

/// How long entries are fresh and kept: `[store]`'s `positive_ttl`, `negative_ttl` and
/// `stale_if_error`.
pub(super) struct Timing {
    positive_ttl: Duration,
    negative_ttl: Duration,
    stale_if_error: Duration,
}

/// What a store read made of an entry.
pub(super) struct Read {
    /// The entry to keep.
    pub entry: Entry,
    /// A known key's decision was replaced (changed, or deleted behind keygate's back): anything
    /// that still holds the old entry holds an out-of-date decision.
    pub replaced: bool,
}

impl Timing {
    pub(super) fn new(cfg: &config::Store) -> Self {
        Self {
            positive_ttl: cfg.positive_ttl,
            negative_ttl: cfg.negative_ttl,
            stale_if_error: cfg.stale_if_error,
        }
    }

    /// The shared cache's per-entry expiry.
    pub(super) fn expiry(&self) -> EntryExpiry {
        EntryExpiry {
            stale_if_error: self.stale_if_error,
        }
    }

    /// Whether `key` is still within `stale_if_error` of its freshness at `now` (the shared
    /// cache keeps it that long).
    pub(super) fn within_stale_if_error(&self, key: &KnownKey, now: Instant) -> bool {
        now < key.fresh_until() + self.stale_if_error
    }

    /// The entry a store read begun at `read_at` makes of `current`, having found `record`. A key
    /// found deciding as before keeps its entry, moved on in place (and put back, so that the
    /// shared cache takes its new expiry).
    pub(super) fn after_read(
        &self,
        current: Option<&Entry>,
        record: Option<KeyRecord>,
        read_at: Instant,
    ) -> Read {
        // `read_at` was taken before the read: an entry is never thought newer than its data.
        let was_known = matches!(current, Some(Entry::Known(_)));
        let Some(record) = record else {
            // Deleted behind keygate's back (the feed shows keygate's changes).
            let fresh_until = read_at + jittered(self.negative_ttl);
            return Read {
                entry: Entry::Unknown { fresh_until },
                replaced: was_known,
            };
        };
        let fresh_until = read_at + jittered(self.positive_ttl);
        if let Some(Entry::Known(old)) = current
            && old.same_decision(&record)
        {
            old.extend(read_at, fresh_until);
            return Read {
                entry: Entry::Known(Arc::clone(old)),
                replaced: false,
            };
        }
        // An unknown entry is served only while fresh, and it is replaced only once it is not:
        // nothing can serve it again, so replacing it replaces no decision in use.
        let known = KnownKey::new(record, read_at, fresh_until);
        Read {
            entry: Entry::Known(Arc::new(known)),
            replaced: was_known,
        }
    }
}

/// moka's per-entry expiry: a known key stays `stale_if_error` past its (jittered) freshness, an
/// unknown one not at all.
pub(super) struct EntryExpiry {
    stale_if_error: Duration,
}

impl moka::Expiry<KeyDigest, Entry> for EntryExpiry {
    fn expire_after_create(&self, _: &KeyDigest, v: &Entry, at: Instant) -> Option<Duration> {
        Some(match v {
            Entry::Known(k) => k.fresh_until().saturating_duration_since(at) + self.stale_if_error,
            Entry::Unknown { fresh_until } => fresh_until.saturating_duration_since(at),
        })
    }

    fn expire_after_update(
        &self,
        k: &KeyDigest,
        v: &Entry,
        at: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        self.expire_after_create(k, v, at)
    }
}

/// A time to live cut to a random 75-100% of itself. Keys first used together (a fleet restart,
/// a cold cache under load) would otherwise all expire together and queue their store lookups in
/// one burst, a latency spike at every such wave.
fn jittered(ttl: Duration) -> Duration {
    ttl.mul_f64(0.75 + 0.25 * rand::random::<f64>())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::Source;
    use super::super::testing::{known, setup_short_ttl, stored_key};
    use super::*;
    use crate::store::KeyStore;

    #[tokio::test]
    async fn a_re_read_keeps_the_copies_and_their_usage_unless_the_key_changed() {
        // The feed is not followed: an entry past its 75-100 ms TTL is re-read.
        let (_dir, store, cache) = setup_short_ttl();
        let rec = stored_key(&store).await;
        let digest = rec.digest;
        let generation = || cache.copies.generation();
        let ttl_passes = || tokio::time::sleep(Duration::from_millis(150));

        let first = known(cache.resolve(digest).await.unwrap().0);
        cache.touch(&first, 1_000);
        assert_eq!(cache.flush_usage().await.unwrap(), 1);
        ttl_passes().await;
        // The re-read finds the flushed usage, nothing else changed: the entry moves on in
        // place, the copies stay, and a use counted through one of them is still flushed.
        let before = generation();
        let (entry, source) = cache.resolve(digest).await.unwrap();
        assert_eq!(source, Source::Store);
        let second = known(entry);
        assert!(
            Arc::ptr_eq(&first, &second)
                && cache.usable(&Entry::Known(first.clone()), Instant::now())
        );
        assert_eq!(
            generation(),
            before,
            "a re-read of an unchanged key emptied the copies"
        );
        cache.touch(&first, 3_000);
        cache.entries.run_pending_tasks().await;
        assert_eq!(cache.flush_usage().await.unwrap(), 1);
        let r = store.find("cache-test").await.unwrap();
        assert_eq!((r.use_count, r.last_used), (2, Some(3_000)));

        // Deactivated where the feed is not seen: the re-read that finds it empties the copies.
        store.set_active(&rec.id, false).await.unwrap();
        ttl_passes().await;
        let third = known(cache.resolve(digest).await.unwrap().0);
        assert!(!third.record.is_active);
        assert!(
            generation() > before,
            "a changed key left the copies in place"
        );
        assert!(!Arc::ptr_eq(&second, &third));
        assert_eq!(store.lookups.load(Ordering::SeqCst), 3);
        // Uses counted through the old entry and the new one are both flushed: one key twice in
        // a batch, which the store adds up.
        cache.touch(&second, 4_000);
        cache.touch(&third, 5_000);
        cache.touch(&third, 5_000);
        assert_eq!(cache.flush_usage().await.unwrap(), 2);
        let r = store.find("cache-test").await.unwrap();
        assert_eq!((r.use_count, r.last_used), (5, Some(5_000)));
    }
}
