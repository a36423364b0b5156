//! The store as the cache calls it ([`GuardedStore`]): each call bounded by `store.timeout` and
//! tracked by the outage breaker of [`StoreHealth`], the start-up permission check, the counts
//! the poller keeps current, and the health answer.
//!
//! While the store is failing (the breaker is open) or has lost its data, no request calls it:
//! [`GuardedStore::call`] fails at once. The change-feed poller is the one task that probes the
//! store then ([`GuardedStore::probe`]); its first success closes the breaker.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::key::KeyDigest;
use crate::metrics::Metrics;
use crate::store::health::{Report, StoreHealth};
use crate::store::{Changes, KeyRecord, SharedStore, StoreError, Usage};

/// The store behind the breaker, and what the cache knows about it.
pub(super) struct GuardedStore {
    store: SharedStore,
    /// `store.timeout`: the longest one call may take.
    timeout: Duration,
    /// The outage breaker, and what else is known to be wrong with the store.
    health: Arc<StoreHealth>,
    /// The last store call succeeded.
    up: AtomicBool,
    /// The store's permissions were checked ([`GuardedStore::check_access`]).
    access_checked: AtomicBool,
    /// Legacy (checksum-less) keys exist, so malformed keys still deserve a lookup.
    legacy_present: AtomicBool,
    metrics: Arc<Metrics>,
}

impl GuardedStore {
    /// `store`, each call bounded by `timeout`.
    pub(super) fn new(store: SharedStore, timeout: Duration, metrics: Arc<Metrics>) -> Self {
        Self {
            store,
            timeout,
            health: Arc::new(StoreHealth::new(Arc::clone(&metrics))),
            up: AtomicBool::new(true),
            access_checked: AtomicBool::new(false),
            legacy_present: AtomicBool::new(false),
            metrics,
        }
    }

    /// The store itself.
    pub(super) fn inner(&self) -> &SharedStore {
        &self.store
    }

    /// The store's health as this gateway knows it (the outage breaker and the rest).
    pub(super) fn health(&self) -> &Arc<StoreHealth> {
        &self.health
    }

    /// Whether requests may call the store: the breaker is closed and the data is not lost.
    pub(super) fn available(&self) -> bool {
        self.health.available()
    }

    /// Whether the last store call succeeded.
    pub(super) fn up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Whether legacy (checksum-less) keys exist, as of the last count.
    pub(super) fn legacy_present(&self) -> bool {
        self.legacy_present.load(Ordering::Relaxed)
    }

    fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::Relaxed);
        self.metrics.store_up.set(if up { 1.0 } else { 0.0 });
    }

    /// The record for `digest`, through the breaker.
    pub(super) async fn lookup(&self, digest: KeyDigest) -> Result<Option<KeyRecord>, StoreError> {
        self.call(|| self.store.lookup(digest)).await
    }

    /// The records for `digests`, in order, in one call through the breaker.
    pub(super) async fn lookup_many(
        &self,
        digests: Vec<KeyDigest>,
    ) -> Result<Vec<Option<KeyRecord>>, StoreError> {
        self.call(|| self.store.lookup_many(digests)).await
    }

    /// Writes a batch of usage, through the breaker.
    pub(super) async fn record_usage(&self, batch: Vec<Usage>) -> Result<(), StoreError> {
        self.call(|| self.store.record_usage(batch)).await
    }

    /// The change feed's current end: a probe, called whatever the breaker says.
    pub(super) async fn change_position(&self) -> Result<u64, StoreError> {
        self.probe(self.store.change_position()).await
    }

    /// The changes after `position`: a probe, called whatever the breaker says.
    pub(super) async fn changes_since(&self, position: u64) -> Result<Changes, StoreError> {
        self.probe(self.store.changes_since(position)).await
    }

    /// The store's signal that it learnt of a change or reconnected, so the poller reads the feed
    /// at once; `None` when changes are only polled.
    pub(super) fn change_signal(&self) -> Option<Arc<tokio::sync::Notify>> {
        self.store.change_signal()
    }

    /// Calls the store with the configured timeout, tracking store health; while the breaker is
    /// open or the store lost its data, fails at once without calling it.
    async fn call<T, F>(&self, make: impl FnOnce() -> F) -> Result<T, StoreError>
    where
        F: Future<Output = Result<T, StoreError>>,
    {
        if !self.health.available() {
            let (_, why) = self.health.problems(false);
            return Err(StoreError::Unavailable(why));
        }
        // Made only now: a store call's future may start its work as soon as it exists.
        self.probe(make()).await
    }

    /// Calls the store with the configured timeout whatever the breaker says (its probe),
    /// tracking store health: an unavailable store opens the breaker.
    async fn probe<T>(
        &self,
        fut: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let result = match tokio::time::timeout(self.timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(StoreError::Unavailable(format!(
                "no answer within {:?} (store.timeout)",
                self.timeout
            ))),
        };
        match &result {
            Ok(_)
            | Err(StoreError::NotFound(_) | StoreError::Conflict(_) | StoreError::Unconfirmed(_)) => {
                self.set_up(true)
            }
            Err(StoreError::ReadOnly(_)) => {
                self.set_up(true);
                self.health.set_read_only(true);
            }
            Err(StoreError::Unavailable(e)) => {
                self.metrics.store_errors.increment(1);
                self.set_up(false);
                self.health.open(e);
            }
            // Credentials refused while running (changed in Redis first): an outage, which
            // ends when they are accepted again.
            Err(e @ StoreError::Unauthenticated(_)) => {
                self.metrics.store_errors.increment(1);
                self.set_up(false);
                self.health.open(&e.to_string());
            }
            Err(StoreError::Denied(e)) => {
                self.metrics.store_errors.increment(1);
                self.set_up(false);
                self.health.set_denied(Some(e));
                self.health.open(e);
            }
            // One record keygate cannot read: not an outage.
            Err(StoreError::Corrupt(_)) => self.metrics.store_errors.increment(1),
        }
        result
    }

    /// Checks at start-up that the store accepts keygate's credentials and permits every
    /// command keygate uses. A refusal is the error to stop with; a store that does not answer
    /// yet is checked by the poller when it first does ([`GuardedStore::recheck_access`]).
    pub(super) async fn check_access(&self) -> Result<(), StoreError> {
        match self.checked_access().await {
            Ok(()) => {
                self.access_checked.store(true, Ordering::Relaxed);
                Ok(())
            }
            Err(e @ (StoreError::Denied(_) | StoreError::Unauthenticated(_))) => Err(e),
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

    /// The permission check that could not run at start-up, once the store answers; nothing
    /// once it has run.
    pub(super) async fn recheck_access(&self) {
        if self.access_checked.load(Ordering::Relaxed) {
            return;
        }
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

    /// The store's permission check, bounded; its failures are not outages, so they leave the
    /// breaker alone.
    async fn checked_access(&self) -> Result<(), StoreError> {
        crate::store::check_access_within(self.store.as_ref(), self.timeout).await
    }

    /// Re-reads the legacy flag and the active-key gauge.
    pub(super) async fn refresh_counts(&self) {
        if let Ok(legacy) = self.call(|| self.store.has_legacy()).await {
            self.legacy_present.store(legacy, Ordering::Relaxed);
        }
        if let Ok(n) = self.call(|| self.store.count_active()).await {
            self.metrics.active_keys.set(n as f64);
        }
    }

    /// Re-reads whether the store's node takes writes.
    pub(super) async fn refresh_status(&self) {
        if let Ok(status) = self.call(|| self.store.status()).await {
            self.health.set_read_only(status.read_only);
        }
    }

    /// The health answer (computed at most once a second): what is wrong with the store, the
    /// active keys and the node, asking the store only when it is available.
    pub(super) async fn report(&self, limits_degraded: bool) -> Arc<Report> {
        self.health
            .report(limits_degraded, || async {
                let mut active_keys = None;
                let mut node = None;
                if self.health.available() {
                    if let Ok(status) = self.call(|| self.store.status()).await {
                        self.health.set_read_only(status.read_only);
                        node = status.node;
                    }
                    if let Ok(n) = self.call(|| self.store.count_active()).await {
                        self.metrics.active_keys.set(n as f64);
                        active_keys = Some(n);
                    }
                }
                let (problems, error) = self.health.problems(limits_degraded);
                Report::new(problems, error, active_keys, node)
            })
            .await
    }
}
