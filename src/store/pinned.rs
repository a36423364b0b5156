//! A store whose connections belong to one runtime, used from many.
//!
//! The Redis client's connections (and its reconnect timers) live on the runtime that first
//! drives them. The gateway's workers each run their own runtime, and a worker's runtime ends at
//! shutdown while the main one still flushes usage: a connection born on a worker would then be
//! driven by a runtime that is gone. [`Pinned`] runs every store call as a task on the main
//! runtime instead, so connections are born and driven there. Only stores that need it
//! ([`KeyStore::runtime_bound`]) are wrapped; SQLite's calls are blocking-pool jobs that any
//! runtime can run.

use std::future::Future;

use tokio::runtime::Handle;

use super::{
    Changes, Identity, KeyRecord, KeyStore, SharedStore, Status, StoreError, StoreFuture, Usage,
};
use crate::key::KeyDigest;
use crate::rate::{Rate, Verdict};

/// Runs `inner`'s calls on `handle`'s runtime.
pub struct Pinned {
    inner: SharedStore,
    handle: Handle,
}

impl std::fmt::Debug for Pinned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pinned").finish_non_exhaustive()
    }
}

impl Pinned {
    /// Wraps `inner` when it is runtime-bound; returns it unchanged otherwise.
    pub fn wrap(inner: SharedStore, handle: Handle) -> SharedStore {
        if inner.runtime_bound() {
            std::sync::Arc::new(Self { inner, handle })
        } else {
            inner
        }
    }

    fn run<T, F>(&self, call: impl FnOnce(SharedStore) -> F) -> StoreFuture<'_, T>
    where
        T: Send + 'static,
        F: Future<Output = Result<T, StoreError>> + Send + 'static,
    {
        let task = self.handle.spawn(call(SharedStore::clone(&self.inner)));
        Box::pin(async move {
            task.await
                .unwrap_or_else(|e| Err(StoreError::Unavailable(format!("store task: {e}"))))
        })
    }
}

impl KeyStore for Pinned {
    fn lookup(&self, digest: KeyDigest) -> StoreFuture<'_, Option<KeyRecord>> {
        self.run(move |s| async move { s.lookup(digest).await })
    }
    fn lookup_many(&self, digests: Vec<KeyDigest>) -> StoreFuture<'_, Vec<Option<KeyRecord>>> {
        self.run(move |s| async move { s.lookup_many(digests).await })
    }
    fn insert(&self, record: KeyRecord) -> StoreFuture<'_, ()> {
        self.run(move |s| async move { s.insert(record).await })
    }
    fn list(&self) -> StoreFuture<'_, Vec<KeyRecord>> {
        self.run(|s| async move { s.list().await })
    }
    fn find(&self, id_or_name: &str) -> StoreFuture<'_, KeyRecord> {
        let id = id_or_name.to_owned();
        self.run(move |s| async move { s.find(&id).await })
    }
    fn set_active(&self, id_or_name: &str, active: bool) -> StoreFuture<'_, KeyRecord> {
        let id = id_or_name.to_owned();
        self.run(move |s| async move { s.set_active(&id, active).await })
    }
    fn delete(&self, id_or_name: &str) -> StoreFuture<'_, KeyRecord> {
        let id = id_or_name.to_owned();
        self.run(move |s| async move { s.delete(&id).await })
    }
    fn rotate(
        &self,
        id_or_name: &str,
        successor: KeyRecord,
        grace_until: i64,
    ) -> StoreFuture<'_, KeyRecord> {
        let id = id_or_name.to_owned();
        self.run(move |s| async move { s.rotate(&id, successor, grace_until).await })
    }
    fn import(&self, records: Vec<KeyRecord>) -> StoreFuture<'_, (usize, usize)> {
        self.run(move |s| async move { s.import(records).await })
    }
    fn count_active(&self) -> StoreFuture<'_, u64> {
        self.run(|s| async move { s.count_active().await })
    }
    fn has_legacy(&self) -> StoreFuture<'_, bool> {
        self.run(|s| async move { s.has_legacy().await })
    }
    fn record_usage(&self, batch: Vec<Usage>) -> StoreFuture<'_, ()> {
        self.run(move |s| async move { s.record_usage(batch).await })
    }
    fn change_position(&self) -> StoreFuture<'_, u64> {
        self.run(|s| async move { s.change_position().await })
    }
    fn changes_since(&self, since: u64) -> StoreFuture<'_, Changes> {
        self.run(move |s| async move { s.changes_since(since).await })
    }
    fn change_signal(&self) -> Option<std::sync::Arc<tokio::sync::Notify>> {
        self.inner.change_signal()
    }
    fn rate_limit(
        &self,
        kind: &str,
        subject: &str,
        rate: Rate,
    ) -> StoreFuture<'_, Option<Verdict>> {
        let (kind, subject) = (kind.to_owned(), subject.to_owned());
        self.run(move |s| async move { s.rate_limit(&kind, &subject, rate).await })
    }
    fn runtime_bound(&self) -> bool {
        false
    }
    fn node(&self) -> Option<String> {
        self.inner.node()
    }
    fn status(&self) -> StoreFuture<'_, Status> {
        self.run(|s| async move { s.status().await })
    }
    fn check_access(&self) -> StoreFuture<'_, ()> {
        self.run(|s| async move { s.check_access().await })
    }
    fn identity(&self) -> StoreFuture<'_, Option<Identity>> {
        self.run(|s| async move { s.identity().await })
    }
    fn accept_identity(&self) -> StoreFuture<'_, Option<Identity>> {
        self.run(|s| async move { s.accept_identity().await })
    }
}
