//! Each worker thread's own copy of the entries it found in the shared cache, looked at before
//! it ([`ThreadCopies`]).
//!
//! A hit here is one probe of a map no other thread touches; the shared (moka) cache's read
//! costs several times that, and its read bookkeeping is shared by every worker. The copy never
//! serves a decision the gateway knows to be out of date: it is emptied whenever the copies'
//! generation moves ([`ThreadCopies::invalidate`]: an eviction for a change, a gap in the feed, a
//! re-read that found the key changed), and each entry passes the same usability test as in the
//! shared cache. The generation stays put when an entry leaves by expiry (it is unusable by
//! then), is re-read and found unchanged (the entry moves on in place, so the copy's entry is the
//! current one), or is evicted to make room: the copy may go on serving that entry as the shared
//! cache would have, had it had the room. Emptying every copy at each capacity eviction would
//! make a store as large as the cache (100,000 keys in use with the default capacity) read each
//! key from the shared cache again, on each worker, after every store read that pushed another
//! key out.
//!
//! The copies are a seam: the cache decides the same without them, only each hit costs a shared
//! cache read. [`KeyCache`] meets them in [`KeyCache::resolve`] (a look here
//! first, and what the shared cache answered kept here), wherever it changes the shared cache
//! in a way a copy could outlive ([`ThreadCopies::invalidate`]), and in each worker's sweep
//! ([`KeyCache::sweep_local`]).

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::KeyCache;
use super::entry::Entry;
use crate::key::KeyDigest;

/// How often each worker sweeps its copy ([`KeyCache::sweep_local`]).
pub const LOCAL_SWEEP_INTERVAL: Duration = Duration::from_secs(2);

/// One cache's view of the worker threads' copies: which copies are its own, and which are
/// current.
pub(super) struct ThreadCopies {
    /// Tells this cache's entries apart from another's in a thread's copy.
    id: u64,
    /// Bumped after a change to the shared cache that a copy could otherwise outlive: a copy made
    /// under an older generation is dropped whole.
    generation: AtomicU64,
    /// The most entries a thread's copy holds: the shared cache's capacity.
    capacity: usize,
}

/// A worker thread's copy.
struct Local {
    /// The [`ThreadCopies::id`] of the cache the entries are from; 0 for none.
    cache: u64,
    /// The generation the entries were read under.
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

/// Ids for [`ThreadCopies::id`]; 0 is no cache.
static NEXT_CACHE_ID: AtomicU64 = AtomicU64::new(1);

impl ThreadCopies {
    /// Copies of up to `capacity` entries each.
    pub(super) fn new(capacity: u64) -> Self {
        Self {
            id: NEXT_CACHE_ID.fetch_add(1, Ordering::Relaxed),
            generation: AtomicU64::new(0),
            capacity: usize::try_from(capacity).unwrap_or(usize::MAX),
        }
    }

    /// The current generation. Read before the shared cache, and given back to
    /// [`ThreadCopies::keep`] with what was read there: what is kept under it predates no change
    /// after it.
    pub(super) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Empties every thread's copy (at its next lookup). Called after the shared cache changed,
    /// so a thread that reads the generation before the shared cache and keeps what it read under
    /// that generation never keeps an entry from before the change.
    pub(super) fn invalidate(&self) {
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// The entry for `digest` in this thread's copy, if it is there and `usable`.
    pub(super) fn get(&self, digest: &KeyDigest, usable: impl Fn(&Entry) -> bool) -> Option<Entry> {
        LOCAL.with(|local| {
            let mut local = local.try_borrow_mut().ok()?;
            let generation = self.generation.load(Ordering::Acquire);
            if local.cache != self.id || local.generation != generation {
                local.entries.clear();
                local.cache = self.id;
                local.generation = generation;
                return None;
            }
            local.entries.get(digest).filter(|e| usable(e)).cloned()
        })
    }

    /// Keeps `entry`, read from the shared cache under `generation`, in this thread's copy.
    pub(super) fn keep(&self, digest: KeyDigest, entry: &Entry, generation: u64) {
        LOCAL.with(|local| {
            let Ok(mut local) = local.try_borrow_mut() else {
                return;
            };
            if local.cache != self.id || local.generation != generation {
                // Moved since it was read (or another cache's copy): not kept.
                return;
            }
            // Full: a new key stays in the shared cache only, until a sweep makes room.
            if local.entries.len() < self.capacity || local.entries.contains_key(&digest) {
                local.entries.insert(digest, entry.clone());
            }
        });
    }

    /// Drops from this thread's copy the entries that are no longer `usable`, and gives back the
    /// memory of a copy that has shrunk.
    pub(super) fn sweep(&self, usable: impl Fn(&Entry) -> bool) {
        LOCAL.with(|local| {
            let Ok(mut local) = local.try_borrow_mut() else {
                return;
            };
            if local.cache != self.id {
                return;
            }
            local.entries.retain(|_, e| usable(e));
            let len = local.entries.len();
            if local.entries.capacity() > 4 * len.max(1024) {
                local.entries.shrink_to(2 * len);
            }
        });
    }

    /// Whether this thread's copy holds an entry for `digest`, usable or not, current or not.
    #[cfg(test)]
    pub(super) fn holds(&self, digest: &KeyDigest) -> bool {
        LOCAL.with(|l| l.borrow().entries.contains_key(digest))
    }
}

impl KeyCache {
    /// Drops from this thread's copy the entries it can no longer serve (run out), which makes
    /// room for new keys in a full copy, and gives back the memory of a copy that has shrunk:
    /// entries in a copy keep their records alive after the shared cache has let go of them.
    /// Each worker runs it every [`LOCAL_SWEEP_INTERVAL`].
    pub fn sweep_local(&self, now: Instant) {
        self.copies.sweep(|e| self.usable(e, now));
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{
        in_copy, known, known_local, record, setup, setup_with, stored_key,
    };
    use super::super::{Source, Unavailable};
    use super::*;
    use crate::store::KeyStore;

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
        assert!(in_copy(&cache, &digest).is_none());
        // A hit in the shared cache is kept in the thread's copy, and served from it.
        assert_eq!(source(cache.resolve(digest).await), Source::Hit);
        assert!(in_copy(&cache, &digest).is_some());
        assert_eq!(source(cache.resolve(digest).await), Source::Hit);

        // A change through the feed empties the copy with the shared entry.
        store.set_active(&rec.id, false).await.unwrap();
        cache.poll_once(&mut position).await.unwrap();
        assert!(in_copy(&cache, &digest).is_none());
        let (entry, source_now) = cache.resolve(digest).await.unwrap();
        assert!(!known(entry).record.is_active && source_now == Source::Store);
        assert_eq!(source(cache.resolve(digest).await), Source::Hit);
        assert!(!known_local(&cache, &digest).record.is_active);

        // Another cache on the same thread never sees this one's copy.
        let (_dir2, _store2, other) = setup();
        let (entry, source_now) = other.resolve(digest).await.unwrap();
        assert!(matches!(entry, Entry::Unknown { .. }) && source_now == Source::Store);
        assert!(in_copy(&cache, &digest).is_none());
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
        let before = cache.copies.generation();
        // A third key: the shared cache holds two, so one of the three is evicted.
        assert_eq!(source(cache.resolve(digests[2]).await), Source::Store);
        cache.entries.run_pending_tasks().await;
        assert!(cache.entry_count() <= 2);
        assert_eq!(cache.copies.generation(), before);
        // The copy (full at two) still serves the first two keys, with no store read.
        for d in &digests[..2] {
            assert!(in_copy(&cache, d).is_some());
            assert_eq!(source(cache.resolve(*d).await), Source::Hit);
        }
        assert_eq!(store.lookups.load(Ordering::SeqCst), 3);
    }
}
