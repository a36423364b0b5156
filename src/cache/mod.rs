//! The in-process key cache in front of the store, and the background jobs that keep it true and
//! current: the change-feed poller (revocations reach the gateway within one poll interval), the
//! usage flusher (`last_used` and use counts written in batches, never per request), the
//! refresher (keys in use re-read before their entries run out) and each worker's sweep of its
//! own copy.
//!
//! Entries are keyed by digest. A known key (active or not) is fresh for `positive_ttl` (each
//! entry for a random 75-100% of it, so entries made together do not expire together) and kept
//! `stale_if_error` longer; an unknown key is cached for `negative_ttl` (likewise jittered). For
//! all of that longer window a known key is served without a store read while the change feed is
//! confirmed (polled successfully within the last two poll intervals): every change made through
//! keygate reaches the cache on the feed, so the entry is as current as a re-read would make it.
//! Without that confirmation, as while the store is failing, it is re-read, and served stale only
//! if the store cannot answer. A key in use is still re-read, in the background, to bound how long
//! a change made behind keygate's back (in the database itself) goes unseen: a request that finds
//! it in the last quarter of a random 75-100% of the window (random per entry, so keys read
//! together are not re-read together), or later, has it re-read, and is served from the entry
//! meanwhile. A cache hit touches no lock and no store: a probe of the worker
//! thread's own copy of the entries it has used (emptied whenever the shared cache changes in a
//! way the copy could outlive), else one concurrent-map read; and two atomic updates for usage
//! (the first use after a flush also queues the key, lock-free, so a flush reads only the keys
//! used since the last one).
//! Misses for one digest are serialised through moka's per-key compute, so a burst of requests
//! with the same unknown key costs one store lookup.
//!
//! While the store is failing (the outage breaker of [`StoreHealth`] is open) or has lost its
//! data, no request calls it: a known key is answered from its entry (within `stale_if_error`),
//! anything else gets 503 at once, and requests queued behind a failed lookup of the same digest
//! do not try again in turn. The change-feed poller is the one task that probes the store then;
//! its first success closes the breaker.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::HeaderValue;
use moka::future::Cache;
use moka::ops::compute::{CompResult, Op};
use tokio::sync::mpsc;

use crate::config;
use crate::key::KeyDigest;
use crate::metrics::Metrics;
use crate::policy::Compiled;
use crate::store::health::{Report, StoreHealth};
use crate::store::{Changes, KeyRecord, SharedStore, StoreError, Usage};

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
    fresh_until: AtomicU64,
    /// From when a request that finds this entry has it re-read in the background: the last
    /// quarter of the time to its `reread_by` (a random 75-100% of `stale_if_error` past
    /// `fresh_until`, so keys read together are re-read over a spread, not in one wave). A key in
    /// use at least once from then on is re-read while the entry stays usable (a confirmed
    /// change feed keeps it for all of `stale_if_error`), never by a request waiting on the
    /// store; the re-read is for changes the feed does not carry.
    refresh_at: AtomicU64,
    /// The background re-read was asked for (once per re-read).
    refresh_asked: AtomicBool,
    /// Uses not flushed yet, and the latest (Unix seconds). The first use after a flush queues
    /// the entry for the next one ([`KeyCache::touch`]), so a flush reads only the keys used
    /// since the last one, and uses counted in an entry evicted or replaced meanwhile are
    /// flushed all the same.
    uses_pending: AtomicU64,
    used_last: AtomicI64,
}

impl KnownKey {
    /// `record`, read from the store at (or after) `loaded_at`, fresh until `fresh_until`, and
    /// re-read in the background by `reread_by` if in use.
    pub(crate) fn new(
        record: KeyRecord,
        loaded_at: Instant,
        fresh_until: Instant,
        reread_by: Instant,
    ) -> Self {
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
            refresh_at: AtomicU64::new(0),
            refresh_asked: AtomicBool::new(false),
            uses_pending: AtomicU64::new(0),
            used_last: AtomicI64::new(0),
        };
        key.extend(loaded_at, fresh_until, reread_by);
        key
    }

    /// Records a re-read at `loaded_at` that found the key deciding as before: fresh until
    /// `fresh_until`, re-read in the background by `reread_by` if in use. Times only move on.
    /// (The record's usage fields stay as first read: requests are decided without them.)
    fn extend(&self, loaded_at: Instant, fresh_until: Instant, reread_by: Instant) {
        let refresh_at = reread_by
            .checked_sub(reread_by.saturating_duration_since(loaded_at) / 4)
            .unwrap_or(loaded_at);
        self.loaded_at
            .fetch_max(self.offset(loaded_at), Ordering::Relaxed);
        self.fresh_until
            .fetch_max(self.offset(fresh_until), Ordering::Relaxed);
        self.refresh_at
            .fetch_max(self.offset(refresh_at), Ordering::Relaxed);
        // After the new re-read time: a request that sees the ask cleared and an older time
        // asks again, and the re-read finds it not needed yet.
        self.refresh_asked.store(false, Ordering::Release);
    }

    fn offset(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.origin).as_nanos()).unwrap_or(u64::MAX)
    }

    fn at(&self, offset: &AtomicU64) -> Instant {
        self.origin + Duration::from_nanos(offset.load(Ordering::Relaxed))
    }

    /// When the record was last read from the store.
    fn loaded_at(&self) -> Instant {
        self.at(&self.loaded_at)
    }

    fn fresh_until(&self) -> Instant {
        self.at(&self.fresh_until)
    }

    fn refresh_at(&self) -> Instant {
        self.at(&self.refresh_at)
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
    fn fresh_until(&self) -> Instant {
        match self {
            Entry::Known(k) => k.fresh_until(),
            Entry::Unknown { fresh_until } => *fresh_until,
        }
    }
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

struct EntryExpiry {
    stale_if_error: Duration,
}

impl moka::Expiry<KeyDigest, Entry> for EntryExpiry {
    /// A known key stays `stale_if_error` past its (jittered) freshness, an unknown one not at all.
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
/// one burst: the load benchmark's 100,000-key store showed p99 latency of 190-610 ms at every
/// such wave before this.
fn jittered(ttl: Duration) -> Duration {
    ttl.mul_f64(0.75 + 0.25 * rand::random::<f64>())
}

/// Shared state of the cache and its background jobs.
pub struct KeyCache {
    cache: Cache<KeyDigest, Entry>,
    store: SharedStore,
    positive_ttl: Duration,
    negative_ttl: Duration,
    stale_if_error: Duration,
    store_timeout: Duration,
    /// The keys used since the last flush, each queued by its first use after it
    /// ([`KeyCache::touch`]); the flusher drains the receiver.
    used_tx: mpsc::UnboundedSender<Arc<KnownKey>>,
    used_rx: Mutex<mpsc::UnboundedReceiver<Arc<KnownKey>>>,
    legacy_present: AtomicBool,
    store_up: AtomicBool,
    /// Until when (nanoseconds after `epoch`) the change feed counts as confirmed: two poll
    /// intervals after the last successful poll.
    feed_confirmed_until: AtomicU64,
    /// Since when (nanoseconds after `epoch`) the feed has been followed without a break: only
    /// entries read from the store after it can rely on the feed.
    feed_since: AtomicU64,
    epoch: Instant,
    poll_interval: Duration,
    metrics: Arc<Metrics>,
    /// Tells this cache's entries apart from another's in a thread's [`Local`] copy.
    id: u64,
    /// Bumped after a change to the shared cache that a thread's [`Local`] copy could otherwise
    /// outlive: a copy made under an older generation is dropped whole.
    generation: AtomicU64,
    /// The most entries a thread's [`Local`] copy holds: the shared cache's capacity.
    local_capacity: usize,
    /// Digests of known keys due for a background re-read ([`KeyCache::refresh_ahead`]).
    refresh_tx: mpsc::Sender<KeyDigest>,
    refresh_rx: Mutex<Option<mpsc::Receiver<KeyDigest>>>,
    /// The outage breaker, and what else is known to be wrong with the store.
    health: Arc<StoreHealth>,
    /// The store's permissions were checked ([`KeyCache::check_access`]).
    access_checked: AtomicBool,
}

/// Background re-reads waiting at most; beyond that a key is re-read by the request that finds
/// its entry run out, as without refresh-ahead.
const REFRESH_QUEUE: usize = 4096;

/// Keys re-read in one store call at most ([`KeyStore::lookup_many`]).
const REFRESH_BATCH: usize = 256;

/// A worker thread's own copy of the entries it found in the shared cache, looked at first. A
/// hit here is one probe of a map no other thread touches; the shared (moka) cache's read costs
/// several times that, and its read bookkeeping is shared by every worker. The copy never serves
/// a decision the gateway knows to be out of date: it is emptied whenever the cache's generation
/// moves (an eviction for a change, a gap in the feed, a re-read that found the key changed), and
/// each entry passes the same [`KeyCache::usable`] test as in the shared cache. The generation
/// stays put when an entry leaves by expiry (it is unusable by then), is re-read and found
/// unchanged (the entry moves on in place, so the copy's entry is the current one), or is
/// evicted to make room: the copy may go on serving that entry as the shared cache would have,
/// had it had the room. Emptying every copy at each capacity eviction made a store as large as
/// the cache (100,000 keys in use with the default capacity) read each key from the shared cache
/// again, on each worker, after every store read that pushed another key out.
struct Local {
    cache: u64,
    generation: u64,
    /// Hashed with the standard, randomly keyed SipHash: a client chooses which digests are
    /// looked up (any well-formed unknown key), so it must not be able to choose collisions.
    entries: HashMap<KeyDigest, Entry>,
}

thread_local! {
    static LOCAL: RefCell<Local> = RefCell::new(Local {
        cache: 0,
        generation: 0,
        entries: HashMap::new(),
    });
}

/// How often each worker sweeps its copy ([`KeyCache::sweep_local`]).
pub const LOCAL_SWEEP_INTERVAL: Duration = Duration::from_secs(2);

/// Ids for [`KeyCache::id`]; 0 is no cache.
static NEXT_CACHE_ID: AtomicU64 = AtomicU64::new(1);

impl KeyCache {
    /// A cache in front of `store`, sized and timed by `[store]`.
    pub fn new(store: SharedStore, cfg: &config::Store, metrics: Arc<Metrics>) -> Self {
        let (used_tx, used_rx) = mpsc::unbounded_channel();
        let generation = AtomicU64::new(0);
        let (refresh_tx, refresh_rx) = mpsc::channel(REFRESH_QUEUE);
        let cache = Cache::builder()
            .max_capacity(cfg.cache_capacity)
            .expire_after(EntryExpiry {
                stale_if_error: cfg.stale_if_error,
            })
            .build();
        Self {
            cache,
            store,
            positive_ttl: cfg.positive_ttl,
            negative_ttl: cfg.negative_ttl,
            stale_if_error: cfg.stale_if_error,
            store_timeout: cfg.timeout,
            used_tx,
            used_rx: Mutex::new(used_rx),
            legacy_present: AtomicBool::new(false),
            store_up: AtomicBool::new(true),
            feed_confirmed_until: AtomicU64::new(0),
            feed_since: AtomicU64::new(u64::MAX),
            epoch: Instant::now(),
            poll_interval: cfg.poll_interval,
            id: NEXT_CACHE_ID.fetch_add(1, Ordering::Relaxed),
            generation,
            local_capacity: usize::try_from(cfg.cache_capacity).unwrap_or(usize::MAX),
            refresh_tx,
            refresh_rx: Mutex::new(Some(refresh_rx)),
            health: Arc::new(StoreHealth::new(Arc::clone(&metrics))),
            access_checked: AtomicBool::new(false),
            metrics,
        }
    }

    /// Empties every thread's [`Local`] copy (at its next lookup). Called after the shared cache
    /// changed, so a thread that reads the generation before the shared cache and keeps what it
    /// read under that generation never keeps an entry from before the change.
    fn moved(&self) {
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// The entry for `digest` in this thread's copy, if it is there and usable at `now`.
    fn local(&self, digest: &KeyDigest, now: Instant) -> Option<Entry> {
        LOCAL.with(|local| {
            let mut local = local.try_borrow_mut().ok()?;
            let generation = self.generation.load(Ordering::Acquire);
            if local.cache != self.id || local.generation != generation {
                local.entries.clear();
                local.cache = self.id;
                local.generation = generation;
                return None;
            }
            local
                .entries
                .get(digest)
                .filter(|e| self.usable(e, now))
                .cloned()
        })
    }

    /// Drops from this thread's copy the entries it can no longer serve (run out), which makes
    /// room for new keys in a full copy, and gives back the memory of a copy that has shrunk:
    /// entries in a copy keep their records alive after the shared cache has let go of them.
    /// Each worker runs it every [`LOCAL_SWEEP_INTERVAL`].
    pub fn sweep_local(&self, now: Instant) {
        LOCAL.with(|local| {
            let Ok(mut local) = local.try_borrow_mut() else {
                return;
            };
            if local.cache != self.id {
                return;
            }
            local.entries.retain(|_, e| self.usable(e, now));
            let len = local.entries.len();
            if local.entries.capacity() > 4 * len.max(1024) {
                local.entries.shrink_to(2 * len);
            }
        });
    }

    /// Keeps `entry`, read from the shared cache under `generation`, in this thread's copy.
    fn keep_local(&self, digest: KeyDigest, entry: &Entry, generation: u64) {
        LOCAL.with(|local| {
            let Ok(mut local) = local.try_borrow_mut() else {
                return;
            };
            if local.cache != self.id || local.generation != generation {
                // Moved since it was read (or another cache's copy): not kept.
                return;
            }
            // Full: a new key stays in the shared cache only, until a sweep makes room.
            if local.entries.len() < self.local_capacity || local.entries.contains_key(&digest) {
                local.entries.insert(digest, entry.clone());
            }
        });
    }

    fn nanos_since_epoch(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    /// Whether the change feed was polled successfully within the last two poll intervals.
    fn feed_confirmed(&self, now: Instant) -> bool {
        self.nanos_since_epoch(now) < self.feed_confirmed_until.load(Ordering::Relaxed)
    }

    /// Records a successful poll of the change feed, counting a lapse when the poll came after
    /// the previous confirmation had run out.
    fn confirm_feed(&self) {
        let now = Instant::now();
        let until = self.nanos_since_epoch(now + 2 * self.poll_interval);
        let before = self.feed_confirmed_until.swap(until, Ordering::Relaxed);
        if before != 0 && before <= self.nanos_since_epoch(now) {
            self.metrics.change_feed_lapses.increment(1);
        }
    }

    /// Withdraws the confirmation (a failed poll), counting a lapse unless it was already
    /// withdrawn (or never given).
    fn unconfirm_feed(&self) {
        if self.feed_confirmed_until.swap(0, Ordering::Relaxed) != 0 {
            self.metrics.change_feed_lapses.increment(1);
        }
    }

    /// Marks the start of an unbroken stretch of the feed: the first position read, or a gap.
    /// Entries read before `at` may predate a change the feed no longer shows.
    fn follow_feed_from(&self, at: Instant) {
        self.feed_since
            .store(self.nanos_since_epoch(at), Ordering::Relaxed);
    }

    /// Whether `entry` may be served without a store read at `now`: it is fresh, or it is a
    /// known key within `stale_if_error` of its freshness (as long as the shared cache keeps it),
    /// read while the feed has been followed, and the feed is confirmed.
    fn usable(&self, entry: &Entry, now: Instant) -> bool {
        if entry.fresh_until() > now {
            return true;
        }
        match entry {
            Entry::Known(k) => {
                now < k.fresh_until() + self.stale_if_error
                    && self.feed_confirmed(now)
                    && self.nanos_since_epoch(k.loaded_at())
                        >= self.feed_since.load(Ordering::Relaxed)
            }
            Entry::Unknown { .. } => false,
        }
    }

    /// The store behind the cache.
    pub fn store(&self) -> &SharedStore {
        &self.store
    }

    /// Whether legacy (checksum-less) keys exist, so malformed keys still deserve a lookup.
    pub fn legacy_present(&self) -> bool {
        self.legacy_present.load(Ordering::Relaxed)
    }

    /// Whether the last store call succeeded.
    pub fn store_up(&self) -> bool {
        self.store_up.load(Ordering::Relaxed)
    }

    fn set_store_up(&self, up: bool) {
        self.store_up.store(up, Ordering::Relaxed);
        self.metrics.store_up.set(if up { 1.0 } else { 0.0 });
    }

    /// Number of cached entries (approximate, as moka reports it).
    pub fn entry_count(&self) -> u64 {
        self.cache.entry_count()
    }

    /// The store's health as this gateway knows it (the outage breaker and the rest).
    pub fn health(&self) -> &Arc<StoreHealth> {
        &self.health
    }

    /// Calls the store with the configured timeout, tracking store health; while the breaker is
    /// open or the store lost its data, fails at once without calling it.
    pub async fn call<T>(
        &self,
        fut: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        if !self.health.available() {
            let (_, why) = self.health.problems(false);
            return Err(StoreError::Unavailable(why));
        }
        self.call_store(fut).await
    }

    /// Calls the store with the configured timeout whatever the breaker says (its probe),
    /// tracking store health: an unavailable store opens the breaker.
    async fn call_store<T>(
        &self,
        fut: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let result = match tokio::time::timeout(self.store_timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(StoreError::Unavailable(format!(
                "no answer within {:?} (store.timeout)",
                self.store_timeout
            ))),
        };
        match &result {
            Ok(_)
            | Err(StoreError::NotFound(_) | StoreError::Conflict(_) | StoreError::Unconfirmed(_)) => {
                self.set_store_up(true)
            }
            Err(StoreError::ReadOnly(_)) => {
                self.set_store_up(true);
                self.health.set_read_only(true);
            }
            Err(StoreError::Unavailable(e)) => {
                self.metrics.store_errors.increment(1);
                self.set_store_up(false);
                self.health.open(e);
            }
            Err(StoreError::Denied(e)) => {
                self.metrics.store_errors.increment(1);
                self.set_store_up(false);
                self.health.set_denied(Some(e));
                self.health.open(e);
            }
            // One record keygate cannot read: not an outage.
            Err(StoreError::Corrupt(_)) => self.metrics.store_errors.increment(1),
        }
        result
    }

    /// Checks at start-up that the store permits every command keygate uses. A refusal is the
    /// error to stop with; a store that does not answer yet is checked by the poller when it
    /// first does.
    pub async fn check_access(&self) -> Result<(), StoreError> {
        match self.checked_access().await {
            Ok(()) => {
                self.access_checked.store(true, Ordering::Relaxed);
                Ok(())
            }
            Err(e @ StoreError::Denied(_)) => Err(e),
            Err(e @ StoreError::ReadOnly(_)) => {
                // Checked as far as a replica allows; the health answers report it read-only.
                self.access_checked.store(true, Ordering::Relaxed);
                self.health.set_read_only(true);
                tracing::warn!(error = %e, "store permissions checked for reads only");
                Ok(())
            }
            Err(e) => {
                tracing::warn!(error = %e, "store permissions not checked yet: checked when the store answers");
                Ok(())
            }
        }
    }

    /// The store's permission check, bounded by a few store timeouts (it makes a dozen round
    /// trips); its failures are not outages, so they leave the breaker alone.
    async fn checked_access(&self) -> Result<(), StoreError> {
        tokio::time::timeout(4 * self.store_timeout, self.store.check_access())
            .await
            .unwrap_or_else(|_| {
                Err(StoreError::Unavailable(format!(
                    "no answer within {:?}",
                    4 * self.store_timeout
                )))
            })
    }

    /// The health answer (computed at most once a second): what is wrong with the store, the
    /// active keys and the node, asking the store only when it is available.
    pub async fn health_report(&self, limits_degraded: bool) -> Arc<Report> {
        self.health
            .report(limits_degraded, || async {
                let mut active_keys = None;
                let mut node = None;
                if self.health.available() {
                    if let Ok(status) = self.call(self.store.status()).await {
                        self.health.set_read_only(status.read_only);
                        node = status.node;
                    }
                    if let Ok(n) = self.call(self.store.count_active()).await {
                        self.metrics.active_keys.set(n as f64);
                        active_keys = Some(n);
                    }
                }
                let (problems, error) = self.health.problems(limits_degraded);
                Report::new(problems, error, active_keys, node)
            })
            .await
    }

    /// The decision for `digest`: from the cache when fresh, else from the store (one lookup per
    /// digest at a time), else a stale known entry while the store is failing.
    pub async fn resolve(&self, digest: KeyDigest) -> Result<(Entry, Source), Unavailable> {
        let now = Instant::now();
        if let Some(entry) = self.local(&digest, now) {
            self.hit(&entry, now);
            return Ok((entry, Source::Hit));
        }
        // Read before the shared cache: what is kept under it predates no change after it.
        let generation = self.generation.load(Ordering::Acquire);
        let current = match self.cache.get(&digest).await {
            Some(entry) if self.usable(&entry, now) => {
                self.keep_local(digest, &entry, generation);
                self.hit(&entry, now);
                return Ok((entry, Source::Hit));
            }
            other => other,
        };
        self.metrics.cache_misses.increment(1);
        if !self.health.available() {
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

    /// Records one authenticated use of `key`, for the next [`KeyCache::flush_usage`]. Lock-free:
    /// two atomic updates, and the first use after a flush queues the key for it.
    pub fn touch(&self, key: &Arc<KnownKey>, now_unix: i64) {
        self.add_uses(key, 1, now_unix);
    }

    /// Adds `count` uses, the latest at `last_used`, to `key`'s unflushed usage, queueing the
    /// key for the next flush when it had none.
    fn add_uses(&self, key: &Arc<KnownKey>, count: u64, last_used: i64) {
        key.used_last.fetch_max(last_used, Ordering::Relaxed);
        if key.uses_pending.fetch_add(count, Ordering::Relaxed) == 0 {
            // Cannot fail: the receiver lives as long as `self`.
            let _ = self.used_tx.send(Arc::clone(key));
        }
    }

    /// Counts a hit on `entry` and, once a known key's entry is due for a re-read
    /// ([`KnownKey::refresh_at`]), asks (once) for it in the background. When the queue is full
    /// the ask is left to a later request.
    fn hit(&self, entry: &Entry, now: Instant) {
        self.metrics.cache_hits.increment(1);
        if let Entry::Known(k) = entry
            && now >= k.refresh_at()
            && !k.refresh_asked.swap(true, Ordering::Relaxed)
            && let Err(mpsc::error::TrySendError::Full(_)) =
                self.refresh_tx.try_send(k.record.digest)
        {
            k.refresh_asked.store(false, Ordering::Relaxed);
        }
    }

    /// Reads `digest` from the store into the cache for a request that found no usable entry,
    /// serialised with every other read of it (moka's per-key compute), unless a read ahead of
    /// it in that queue made the entry usable. Returns the entry after it, and whether the store
    /// failed.
    async fn load(&self, digest: KeyDigest) -> (Option<Entry>, bool) {
        let mut failed = false;
        let failed_flag = &mut failed;
        let mut changed = false;
        let changed_flag = &mut changed;
        let result = self
            .cache
            .entry(digest)
            .and_compute_with(|current| {
                let current = current.map(|e| e.into_value());
                async move {
                    let now = Instant::now();
                    if current.as_ref().is_some_and(|e| self.usable(e, now)) {
                        // A request ahead of us in this digest's queue read it.
                        return Op::Nop;
                    }
                    if !self.health.available() {
                        // The read ahead of us failed and opened the breaker: not again.
                        *failed_flag = true;
                        return Op::Nop;
                    }
                    match self.call(self.store.lookup(digest)).await {
                        Ok(record) => {
                            let (entry, changed) = self.after_read(current.as_ref(), record, now);
                            *changed_flag = changed;
                            Op::Put(entry)
                        }
                        Err(_) => {
                            *failed_flag = true;
                            Op::Nop
                        }
                    }
                }
            })
            .await;
        if changed {
            // A known entry can become usable again in a copy (when the feed is confirmed
            // again), so copies must not keep what this read found changed.
            self.moved();
        }
        let entry = match result {
            CompResult::Inserted(e) | CompResult::ReplacedWith(e) | CompResult::Unchanged(e) => {
                Some(e.into_value())
            }
            CompResult::Removed(_) | CompResult::StillNone(_) => None,
        };
        (entry, failed)
    }

    /// The entry a store read begun at `read_at` makes of `current`, having found `record`, and
    /// whether the workers' copies must be emptied. A key found deciding as before keeps its
    /// entry, moved on in place (and put back, so that the shared cache takes its new expiry).
    fn after_read(
        &self,
        current: Option<&Entry>,
        record: Option<KeyRecord>,
        read_at: Instant,
    ) -> (Entry, bool) {
        // `read_at` was taken before the read: an entry is never thought newer than its data.
        let was_known = matches!(current, Some(Entry::Known(_)));
        let Some(record) = record else {
            // Deleted behind keygate's back (the feed shows keygate's changes).
            let fresh_until = read_at + jittered(self.negative_ttl);
            return (Entry::Unknown { fresh_until }, was_known);
        };
        let fresh_until = read_at + jittered(self.positive_ttl);
        let reread_by = fresh_until + jittered(self.stale_if_error);
        if let Some(Entry::Known(old)) = current
            && old.same_decision(&record)
        {
            old.extend(read_at, fresh_until, reread_by);
            return (Entry::Known(Arc::clone(old)), false);
        }
        // A changed known key empties the copies. An unknown entry is served only while fresh,
        // and it is replaced only once it is not: no copy can serve it again.
        let known = KnownKey::new(record, read_at, fresh_until, reread_by);
        (Entry::Known(Arc::new(known)), was_known)
    }

    /// Re-reads, in the background, the known keys that requests found near the end of their
    /// entries ([`KnownKey::refresh_at`]), up to [`REFRESH_BATCH`] in one store call, until
    /// `shutdown`. The requests go on being served from the entries meanwhile.
    pub async fn refresh_ahead(self: Arc<Self>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let Some(mut rx) = self.refresh_rx.lock().ok().and_then(|mut rx| rx.take()) else {
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
        if !self.health.available() {
            // Served from the entries meanwhile; a request asks again later.
            for digest in digests {
                if let Some(Entry::Known(k)) = self.cache.get(digest).await {
                    k.refresh_asked.store(false, Ordering::Relaxed);
                }
            }
            return;
        }
        let read_at = Instant::now();
        let mut due = Vec::with_capacity(digests.len());
        for digest in digests {
            if let Some(Entry::Known(k)) = self.cache.get(digest).await
                && read_at >= k.refresh_at()
            {
                due.push(*digest);
            }
        }
        if due.is_empty() {
            return;
        }
        self.metrics.cache_refreshes.increment(due.len() as u64);
        let Ok(records) = self.call(self.store.lookup_many(due.clone())).await else {
            return;
        };
        for (digest, record) in due.into_iter().zip(records) {
            let mut changed = false;
            let changed_flag = &mut changed;
            self.cache
                .entry(digest)
                .and_compute_with(|current| {
                    let current = current.map(|e| e.into_value());
                    async move {
                        match &current {
                            Some(Entry::Known(k)) if k.loaded_at() < read_at => {
                                let (entry, changed) =
                                    self.after_read(current.as_ref(), record, read_at);
                                *changed_flag = changed;
                                Op::Put(entry)
                            }
                            _ => Op::Nop,
                        }
                    }
                })
                .await;
            if changed {
                self.moved();
            }
        }
    }

    /// Drops the cached decision for `digest`. Serialised with lookups of the same digest, so a
    /// lookup that read the store before a change cannot re-insert the old decision afterwards.
    pub async fn evict(&self, digest: KeyDigest) {
        self.cache
            .entry(digest)
            .and_compute_with(|_| async { Op::Remove })
            .await;
        // Not left to the eviction listener, which moka may call later: a revocation must empty
        // the workers' copies now.
        self.moved();
    }

    /// Applies one poll of the change feed (a probe of the store: it runs while the breaker is
    /// open); returns the next position, or the same one when the store lost its data.
    pub async fn apply_changes(&self, position: u64) -> Result<u64, StoreError> {
        let changes = self.call_store(self.store.changes_since(position)).await?;
        let next = match changes {
            Changes::Digests { digests, next } => {
                self.health.set_lost(None);
                if digests.is_empty() {
                    return Ok(next);
                }
                for d in digests {
                    self.evict(d).await;
                }
                self.health.keys_changed();
                next
            }
            Changes::Gap { next } => {
                tracing::warn!("change feed gap: dropping every cached key decision");
                // Entries read before now may have missed a change: they never rely on the feed.
                self.follow_feed_from(Instant::now());
                self.cache.invalidate_all();
                // `invalidate_all` notifies the eviction listener lazily, if at all.
                self.moved();
                // Adopted as it is now (a new identity marker): trusted again, cache empty.
                self.health.set_lost(None);
                next
            }
            Changes::Lost { reason } => {
                // Nothing it answers is trusted, a missing key least of all: the cache keeps
                // serving what it has, and nothing is read from the store.
                self.health.set_lost(Some(&reason));
                return Ok(position);
            }
        };
        self.refresh_counts().await;
        Ok(next)
    }

    /// Re-reads the legacy flag and the active-key gauge.
    pub async fn refresh_counts(&self) {
        if let Ok(legacy) = self.call(self.store.has_legacy()).await {
            self.legacy_present.store(legacy, Ordering::Relaxed);
        }
        if let Ok(n) = self.call(self.store.count_active()).await {
            self.metrics.active_keys.set(n as f64);
        }
    }

    /// Re-reads whether the store's node takes writes.
    async fn refresh_status(&self) {
        if let Ok(status) = self.call(self.store.status()).await {
            self.health.set_read_only(status.read_only);
        }
    }

    /// One poll of the change feed from `position` (`None`: not followed yet), confirming the
    /// feed on success and withdrawing the confirmation on failure. It is also the outage
    /// breaker's probe: it calls the store whatever the breaker says, and closes it when the
    /// store answers.
    pub async fn poll_once(&self, position: &mut Option<u64>) -> Result<(), StoreError> {
        let result = match *position {
            // Start from the feed's current end; entries read before this may predate a change
            // the feed no longer shows, so they never rely on it (`follow_feed_from`).
            None => {
                let asked = Instant::now();
                self.call_store(self.store.change_position())
                    .await
                    .map(|p| {
                        self.follow_feed_from(asked);
                        *position = Some(p);
                    })
            }
            Some(p) => self
                .apply_changes(p)
                .await
                .map(|next| *position = Some(next)),
        };
        match &result {
            Ok(()) => {
                self.health.close();
                if self.health.lost() {
                    self.unconfirm_feed();
                } else {
                    self.confirm_feed();
                }
                if !self.access_checked.load(Ordering::Relaxed) {
                    self.recheck_access().await;
                }
            }
            Err(_) => self.unconfirm_feed(),
        }
        result
    }

    /// The permission check that could not run at start-up, now that the store answers.
    async fn recheck_access(&self) {
        match self.checked_access().await {
            Ok(()) => {
                self.access_checked.store(true, Ordering::Relaxed);
                self.health.set_denied(None);
            }
            Err(StoreError::Denied(e)) => {
                self.access_checked.store(true, Ordering::Relaxed);
                self.health.set_denied(Some(&e));
            }
            // A replica cannot run the write checks; that it is read-only is reported as such.
            Err(StoreError::ReadOnly(_)) => self.access_checked.store(true, Ordering::Relaxed),
            Err(_) => {}
        }
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
            let was_open = self.health.breaker_open();
            if let Err(e) = self.poll_once(&mut position).await {
                if was_open {
                    self.health.probe_failed(&e.to_string());
                } else if !self.health.breaker_open()
                    && let Some(suppressed) = POLL_FAILED.allow()
                {
                    // (A failure that opened the breaker was logged as that.)
                    tracing::warn!(error = %e, suppressed, "change feed poll failed");
                }
            }
            if since_counts.elapsed() >= Duration::from_secs(15) {
                since_counts = Instant::now();
                self.refresh_counts().await;
                self.refresh_status().await;
            }
            self.metrics
                .cache_entries
                .set(self.cache.entry_count() as f64);
        }
    }

    /// Takes the usage of the keys queued before this call: each key with its uses (count and
    /// latest), and the batch to write. A key can appear twice (used again while this runs, or
    /// re-read as changed with uses on both entries): the stores add usage up.
    fn take_usage(&self) -> (Vec<Taken>, Vec<Usage>) {
        let Ok(mut queue) = self.used_rx.lock() else {
            return (Vec::new(), Vec::new());
        };
        // A key used again meanwhile is queued again, for the next flush.
        let queued = queue.len();
        let mut taken = Vec::with_capacity(queued);
        for _ in 0..queued {
            let Ok(key) = queue.try_recv() else { break };
            let count = key.uses_pending.swap(0, Ordering::Relaxed);
            if count > 0 {
                let last_used = key.used_last.load(Ordering::Relaxed);
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

    /// Writes the usage of the keys used since the last flush in one batch. On failure the
    /// usage is given back to the keys, for the next flush.
    pub async fn flush_usage(self: &Arc<Self>) -> Result<usize, StoreError> {
        if !self.health.available() {
            // Kept in the keys for a flush that can succeed.
            let (_, why) = self.health.problems(false);
            return Err(StoreError::Unavailable(why));
        }
        // Taken on the blocking pool: with 100,000 keys in use this is milliseconds of work
        // that never yields, and on a runtime thread such work held up the change feed's poller
        // past two poll intervals (withdrawing the feed's confirmation).
        let this = Arc::clone(self);
        let (taken, batch) = tokio::task::spawn_blocking(move || this.take_usage())
            .await
            .map_err(|e| StoreError::Unavailable(format!("usage gathering failed: {e}")))?;
        if taken.is_empty() {
            return Ok(0);
        }
        match self.call(self.store.record_usage(batch)).await {
            Ok(()) => Ok(taken.len()),
            Err(e) => {
                for (key, count, last_used) in &taken {
                    self.add_uses(key, *count, *last_used);
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
                && self.health.available()
                && let Some(suppressed) = FLUSH_FAILED.allow()
            {
                tracing::warn!(error = %e, suppressed, "usage flush failed; will retry");
            }
        }
    }
}

/// Repeated poll failures outside an outage (the breaker's probe failures have their own line).
static POLL_FAILED: crate::logging::Throttle =
    crate::logging::Throttle::new(Duration::from_secs(30));

/// Repeated usage-flush failures.
static FLUSH_FAILED: crate::logging::Throttle =
    crate::logging::Throttle::new(Duration::from_secs(30));

/// Resolves when `signal` is raised; never without one.
async fn wait(signal: Option<&tokio::sync::Notify>) {
    match signal {
        Some(s) => s.notified().await,
        None => std::future::pending().await,
    }
}

/// A key's uses taken for a flush: the key, how many, the latest (Unix seconds).
type Taken = (Arc<KnownKey>, u64, i64);

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;
    use crate::store::sqlite::SqliteStore;
    use crate::store::{KeyStore, StoreFuture};

    /// The real SQLite store, with lookups counted and slowed so concurrent misses overlap.
    struct Counting {
        inner: SqliteStore,
        lookups: AtomicUsize,
        /// Usage writes fail while set.
        usage_fails: AtomicBool,
        /// Lookups hang (past any store timeout) while set, as on a paused Redis.
        lookups_hang: AtomicBool,
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

    fn setup() -> (tempfile::TempDir, Arc<Counting>, Arc<KeyCache>) {
        setup_with(|_| {})
    }

    /// A cache with the default `[store]` settings as `adjust` changes them, in front of a
    /// counting SQLite store in a temporary directory.
    fn setup_with(
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

    fn record(secret: &crate::key::Secret) -> KeyRecord {
        KeyRecord::new("cache-test", secret, 0, None).unwrap()
    }

    /// A new key's record, stored in `store`.
    async fn stored_key(store: &Counting) -> KeyRecord {
        let rec = record(&crate::key::generate().unwrap());
        store.insert(rec.clone()).await.unwrap();
        rec
    }

    /// The known key `entry` holds.
    fn known(entry: Entry) -> Arc<KnownKey> {
        match entry {
            Entry::Known(k) => k,
            Entry::Unknown { .. } => panic!("not known"),
        }
    }

    /// A cache whose known keys are fresh for 75-100 ms, with a 300 ms poll interval (the poll is
    /// driven by the test).
    fn setup_short_ttl() -> (tempfile::TempDir, Arc<Counting>, Arc<KeyCache>) {
        setup_with(|cfg| {
            cfg.positive_ttl = Duration::from_millis(100);
            cfg.poll_interval = Duration::from_millis(300);
        })
    }

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
        cache.unconfirm_feed();
        cache.unconfirm_feed();
        assert_eq!(lapses(&cache), 2);
        cache.poll_once(&mut position).await.unwrap();
        assert_eq!(lapses(&cache), 2);
        // A confirmation that ran out and then a failed poll: one lapse, not two.
        tokio::time::sleep(Duration::from_millis(700)).await;
        cache.unconfirm_feed();
        cache.poll_once(&mut position).await.unwrap();
        assert_eq!(lapses(&cache), 3);
    }

    #[tokio::test]
    async fn a_confirmed_feed_keeps_a_known_key_for_all_of_stale_if_error() {
        let (_dir, _store, cache) = setup_with(|cfg| cfg.stale_if_error = Duration::from_secs(2));
        let secret = crate::key::generate().unwrap();
        let now = Instant::now();
        // Read `ago`, fresh and due for a re-read until then: being past its re-read time asks
        // for a background re-read, it does not end the entry.
        let read = |ago| {
            let at = now - ago;
            Entry::Known(Arc::new(KnownKey::new(record(&secret), at, at, at)))
        };
        cache.follow_feed_from(now - Duration::from_secs(3));
        cache.confirm_feed();
        let ms = Duration::from_millis;
        assert!(cache.usable(&read(ms(1)), now));
        assert!(cache.usable(&read(ms(1_999)), now));
        // Not once the shared cache drops it.
        assert!(!cache.usable(&read(ms(2_000)), now));
        // And never without the feed's confirmation.
        cache.unconfirm_feed();
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
        cache.cache.run_pending_tasks().await;
        assert_eq!(cache.flush_usage().await.unwrap(), 1);
        assert_eq!(cache.flush_usage().await.unwrap(), 0, "flushed twice");
        let r = store.find("cache-test").await.unwrap();
        assert_eq!((r.use_count, r.last_used), (2, Some(2_000)));
    }

    #[tokio::test]
    async fn a_threads_own_copy_never_outlives_a_change() {
        // A current-thread runtime: every resolve below runs on this thread, so uses its copy.
        let (_dir, store, cache) = setup();
        let rec = stored_key(&store).await;
        let digest = rec.digest;
        let mut position = None;
        cache.poll_once(&mut position).await.unwrap();
        let source = |r: Result<(Entry, Source), Unavailable>| r.unwrap().1;
        assert_eq!(source(cache.resolve(digest).await), Source::Store);
        assert!(cache.local(&digest, Instant::now()).is_none());
        // A hit in the shared cache is kept in the thread's copy, and served from it.
        assert_eq!(source(cache.resolve(digest).await), Source::Hit);
        assert!(cache.local(&digest, Instant::now()).is_some());
        assert_eq!(source(cache.resolve(digest).await), Source::Hit);

        // A change through the feed empties the copy with the shared entry.
        store.set_active(&rec.id, false).await.unwrap();
        cache.poll_once(&mut position).await.unwrap();
        assert!(cache.local(&digest, Instant::now()).is_none());
        let (entry, source_now) = cache.resolve(digest).await.unwrap();
        assert!(!known(entry).record.is_active && source_now == Source::Store);
        assert_eq!(source(cache.resolve(digest).await), Source::Hit);
        assert!(!known_local(&cache, &digest).record.is_active);

        // Another cache on the same thread never sees this one's copy.
        let (_dir2, _store2, other) = setup();
        let (entry, source_now) = other.resolve(digest).await.unwrap();
        assert!(matches!(entry, Entry::Unknown { .. }) && source_now == Source::Store);
        assert!(cache.local(&digest, Instant::now()).is_none());
        assert!(matches!(
            cache.resolve(digest).await.unwrap().0,
            Entry::Known(_)
        ));
        assert_eq!(store.lookups.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_capacity_eviction_leaves_the_copies_serving() {
        // A current-thread runtime: every resolve below runs on this thread, so uses its copy.
        let (_dir, store, cache) = setup_with(|s| s.cache_capacity = 2);
        let mut digests = Vec::new();
        for _ in 0..3 {
            let secret = crate::key::generate().unwrap();
            let mut r = record(&secret);
            r.name = format!("capacity-{}", digests.len());
            r.id = format!("id-{}", digests.len());
            store.insert(r).await.unwrap();
            digests.push(secret.digest());
        }
        let source = |r: Result<(Entry, Source), Unavailable>| r.unwrap().1;
        for d in &digests[..2] {
            assert_eq!(source(cache.resolve(*d).await), Source::Store);
            assert_eq!(source(cache.resolve(*d).await), Source::Hit); // now in the copy
        }
        let before = cache.generation.load(Ordering::Acquire);
        // A third key: the shared cache holds two, so one of the three is evicted.
        assert_eq!(source(cache.resolve(digests[2]).await), Source::Store);
        cache.cache.run_pending_tasks().await;
        assert!(cache.entry_count() <= 2);
        assert_eq!(cache.generation.load(Ordering::Acquire), before);
        // The copy (full at two) still serves the first two keys, with no store read.
        for d in &digests[..2] {
            assert!(cache.local(d, Instant::now()).is_some());
            assert_eq!(source(cache.resolve(*d).await), Source::Hit);
        }
        assert_eq!(store.lookups.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_re_read_keeps_the_copies_and_their_usage_unless_the_key_changed() {
        // The feed is not followed: an entry past its 75-100 ms TTL is re-read.
        let (_dir, store, cache) = setup_short_ttl();
        let rec = stored_key(&store).await;
        let digest = rec.digest;
        let generation = || cache.generation.load(Ordering::Acquire);
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
        cache.cache.run_pending_tasks().await;
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

    /// The known entry in this thread's copy.
    fn known_local(cache: &KeyCache, digest: &KeyDigest) -> Arc<KnownKey> {
        match cache.local(digest, Instant::now()) {
            Some(Entry::Known(k)) => k,
            _ => panic!("no known entry in the thread's copy"),
        }
    }

    /// A stored key whose cached entry is due for a background re-read: read 80 s ago with the
    /// feed followed since before then and confirmed, to be re-read within 5 s.
    async fn due_for_refresh(store: &Counting, cache: &KeyCache) -> Arc<KnownKey> {
        cached_for_80s(store, cache, Instant::now() + Duration::from_secs(5)).await
    }

    /// A stored key whose cached entry was read 80 s ago (fresh for 10 s, to be re-read by
    /// `reread_by`) with the feed followed since before then and confirmed.
    async fn cached_for_80s(
        store: &Counting,
        cache: &KeyCache,
        reread_by: Instant,
    ) -> Arc<KnownKey> {
        let rec = stored_key(store).await;
        let now = Instant::now();
        cache.follow_feed_from(now - Duration::from_secs(100));
        cache.confirm_feed();
        let digest = rec.digest;
        let old = Arc::new(KnownKey::new(
            rec,
            now - Duration::from_secs(80),
            now - Duration::from_secs(70),
            reread_by,
        ));
        cache.cache.insert(digest, Entry::Known(old.clone())).await;
        old
    }

    #[tokio::test]
    async fn past_its_re_read_time_a_key_is_served_while_it_is_re_read() {
        let (_dir, store, cache) = setup();
        let mut queue = cache.refresh_rx.lock().unwrap().take().unwrap();
        // Past the time to re-read it (no request came in the last quarter before it, as when
        // the key was idle then), with the feed confirmed: no request waits on the store.
        let old = cached_for_80s(&store, &cache, Instant::now() - Duration::from_secs(1)).await;
        let digest = old.record.digest;
        for _ in 0..3 {
            assert_eq!(cache.resolve(digest).await.unwrap().1, Source::Hit);
        }
        assert_eq!(queue.try_recv(), Ok(digest));
        assert!(queue.try_recv().is_err(), "asked for twice");
        assert_eq!(store.lookups.load(Ordering::SeqCst), 0);

        // Without the feed's confirmation the request reads the store itself.
        cache.unconfirm_feed();
        assert_eq!(cache.resolve(digest).await.unwrap().1, Source::Store);
        assert_eq!(store.lookups.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_re_read_not_queued_is_asked_for_by_a_later_request() {
        let (_dir, store, cache) = setup();
        let mut queue = cache.refresh_rx.lock().unwrap().take().unwrap();
        let old = due_for_refresh(&store, &cache).await;
        let digest = old.record.digest;
        let other = KeyDigest::of(b"sk_other");
        while cache.refresh_tx.try_send(other).is_ok() {}

        assert_eq!(cache.resolve(digest).await.unwrap().1, Source::Hit);
        assert!(
            !old.refresh_asked.load(Ordering::Relaxed),
            "lost to a full queue"
        );
        while queue.try_recv() == Ok(other) {}
        assert_eq!(cache.resolve(digest).await.unwrap().1, Source::Hit);
        assert_eq!(queue.try_recv(), Ok(digest));
        assert!(old.refresh_asked.load(Ordering::Relaxed));
    }

    #[tokio::test]
    async fn a_key_in_use_is_re_read_in_the_background_before_its_entry_runs_out() {
        let (_dir, store, cache) = setup();
        let mut queue = cache.refresh_rx.lock().unwrap().take().unwrap();
        let old = due_for_refresh(&store, &cache).await;
        let digest = old.record.digest;

        // Served from the cache; the re-read is asked for once, and done off the request.
        for _ in 0..3 {
            assert_eq!(cache.resolve(digest).await.unwrap().1, Source::Hit);
        }
        assert_eq!(queue.try_recv(), Ok(digest));
        assert!(queue.try_recv().is_err(), "asked for twice");
        // The thread's copy stays while the re-read is pending: it is still the current entry.
        let in_copy = || LOCAL.with(|l| l.borrow().entries.contains_key(&digest));
        assert!(in_copy());
        cache.sweep_local(Instant::now());
        assert!(in_copy());
        assert_eq!(store.lookups.load(Ordering::SeqCst), 0);
        let (loaded_before, fresh_before) = (old.loaded_at(), old.fresh_until());
        let generation = cache.generation.load(Ordering::Acquire);
        cache.refresh(&[digest]).await;
        assert_eq!(store.lookups.load(Ordering::SeqCst), 1);

        // Found unchanged: the same entry moves on in place, in the shared cache and in the
        // thread's copy (which is not emptied), and asks for nothing.
        let (entry, source) = cache.resolve(digest).await.unwrap();
        let new = known(entry);
        assert_eq!(source, Source::Hit);
        assert!(Arc::ptr_eq(&new, &old) && Arc::ptr_eq(&new, &known_local(&cache, &digest)));
        assert!(new.loaded_at() > loaded_before && new.fresh_until() > fresh_before);
        assert!(Instant::now() < new.refresh_at() && !new.refresh_asked.load(Ordering::Relaxed));
        assert_eq!(cache.generation.load(Ordering::Acquire), generation);
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
        cache.cache.run_pending_tasks().await;
        assert_eq!(store.lookups.load(Ordering::SeqCst), 1);
        assert!(
            cache.cache.get(&digest).await.is_none(),
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
            let current = known(cache.cache.get(&digest).await.expect("cached"));
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
