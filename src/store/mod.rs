//! The key store: the one trait seam of keygate.
//!
//! [`KeyStore`] is implemented by the embedded SQLite store ([`sqlite`]) and, for fleets, a shared
//! store. The gateway only reads it on a cache miss, polls its change feed, and flushes usage to
//! it in batches; the CLI uses it directly, which is why every mutation records a change.

pub mod health;
pub mod pinned;
pub mod redis;
pub mod sqlite;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::key::{self, KeyDigest, RngError, Secret};
use crate::policy::Policy;

/// A boxed future: store calls happen off the hot path (misses, polls, flushes, the CLI), so the
/// allocation does not matter and the trait stays object-safe.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// One stored key. Holds the digest, never the key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRecord {
    /// Short public identifier, safe to log and to send upstream.
    pub id: String,
    /// Unique human name.
    pub name: String,
    /// SHA-256 of the key.
    #[serde(with = "digest_hex")]
    pub digest: KeyDigest,
    /// Non-secret reminder of the key's first characters.
    pub hint: String,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds of the last authenticated request (flushed in batches).
    pub last_used: Option<i64>,
    /// Authenticated requests counted so far (flushed in batches).
    pub use_count: u64,
    /// Inactive keys are refused with "API key is inactive".
    pub is_active: bool,
    /// Imported plaintext key without keygate's checksum.
    pub legacy: bool,
    /// Unix seconds after which the key is refused as expired.
    pub expires_at: Option<i64>,
    /// Scopes, client networks and rate of this key.
    #[serde(default)]
    pub policy: Policy,
    /// Set when the key was rotated: the id of its successor. It then works until `expires_at`
    /// (the end of the grace period) and is refused after.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotated_to: Option<String>,
    /// Who the key belongs to (free text, e.g. the Django user's id or username), forwarded
    /// upstream as `X-Api-Key-Owner`. Checked by [`check_owner`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}

impl KeyRecord {
    /// A new, active, never-used record for `secret`, with a fresh random id (`key_` + 12 base62).
    pub fn new(
        name: impl Into<String>,
        secret: &Secret,
        created_at: i64,
        expires_at: Option<i64>,
    ) -> Result<Self, RngError> {
        Ok(Self {
            id: format!("key_{}", key::random_base62(12)?),
            name: name.into(),
            digest: secret.digest(),
            hint: secret.hint(),
            created_at,
            last_used: None,
            use_count: 0,
            is_active: true,
            legacy: false,
            expires_at,
            policy: Policy::default(),
            rotated_to: None,
            owner: None,
        })
    }

    /// Whether the key has expired at `now` (Unix seconds).
    pub fn is_expired(&self, now: i64) -> bool {
        self.expires_at.is_some_and(|at| now >= at)
    }
}

/// Checks a key name: 1-64 letters, digits, spaces, '.', '_' or '-', without leading or trailing
/// spaces. It is sent upstream in a header and signed ([`crate::identity`]), so it must be a
/// header value, and short and readable for the operators who type it.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, ' ' | '.' | '_' | '-');
    if name.is_empty() || name.len() > 64 || !name.chars().all(ok_char) || name.trim() != name {
        return Err(format!(
            "invalid key name {name:?}: use 1-64 letters, digits, spaces, '.', '_' or '-', without leading or trailing spaces"
        ));
    }
    Ok(())
}

/// Longest owner accepted (Django's `username` is at most 150 characters).
pub const MAX_OWNER_LEN: usize = 150;

/// Checks an owner: 1-[`MAX_OWNER_LEN`] printable ASCII characters without leading or trailing
/// spaces. It is sent upstream in a header and signed ([`crate::identity`]), so it must be a
/// header value that every backend reads back byte for byte.
pub fn check_owner(owner: &str) -> Result<(), String> {
    if owner.is_empty()
        || owner.len() > MAX_OWNER_LEN
        || !owner.bytes().all(|b| (b' '..=b'~').contains(&b))
        || owner.trim() != owner
    {
        return Err(format!(
            "invalid owner {owner:?}: expected 1-{MAX_OWNER_LEN} printable ASCII characters \
             without leading or trailing spaces, e.g. a user id such as \"42\" or a username"
        ));
    }
    Ok(())
}

mod digest_hex {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    use crate::key::KeyDigest;

    pub fn serialize<S: Serializer>(d: &KeyDigest, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&d.to_hex())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<KeyDigest, D::Error> {
        let s = String::deserialize(d)?;
        KeyDigest::from_hex(&s).ok_or_else(|| D::Error::custom("digest must be 64 hex digits"))
    }
}

/// Usage observed by one gateway since its last flush.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Usage {
    /// The key's id.
    pub id: String,
    /// The key's digest (how the Redis store addresses the record).
    pub digest: KeyDigest,
    /// Latest use, Unix seconds.
    pub last_used: i64,
    /// Number of uses since the last flush.
    pub count: u64,
}

/// What changed since a change-feed position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Changes {
    /// These digests changed (created, revoked, enabled, deleted); `next` is the new position.
    Digests { digests: Vec<KeyDigest>, next: u64 },
    /// The feed no longer reaches back to the position asked for: drop every cached decision.
    Gap { next: u64 },
    /// The store lost data it had (its identity marker is gone, or its change counter went
    /// back): what it answers now cannot be trusted, neither a key found nor a key missing. The
    /// position stays where it was.
    Lost { reason: String },
}

/// A store's identity marker: written with its first key, kept with its data. A marker that
/// vanishes, or a change counter that goes back under it, means the data was lost or rolled back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Identity {
    /// Random id, drawn when the marker is written.
    pub id: String,
    /// Raised by `keygate store accept` (the operator vouches for the data as it is now).
    pub generation: u64,
}

/// What a store says about itself, beyond answering.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Status {
    /// The node answering cannot take writes (a replica): key changes and usage writes fail.
    pub read_only: bool,
    /// The node keygate talks to, when the store finds it by itself (the Sentinel primary).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

/// Errors from a store. Names say what a caller can do about them.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store cannot be reached or read right now; retrying later may work.
    #[error("key store unavailable: {0}")]
    Unavailable(String),
    /// No key with that id or name.
    #[error("no API key with id or name '{0}'")]
    NotFound(String),
    /// A key with that name (or digest) already exists.
    #[error("an API key named '{0}' already exists")]
    Conflict(String),
    /// Stored data that keygate cannot read (a newer schema, corruption).
    #[error("key store data is invalid: {0}")]
    Corrupt(String),
    /// The node answering takes no writes (a Redis replica): says which, and the fix.
    #[error("key store is read-only: {0}")]
    ReadOnly(String),
    /// The store refused a command keygate needs (a Redis ACL): says which, and the fix.
    #[error("key store permission missing: {0}")]
    Denied(String),
    /// The store refused keygate's credentials (a wrong Redis password, or none given where
    /// one is required): says where they are set. At start-up a reason to stop; once running,
    /// an outage that ends when they are accepted again.
    #[error("key store refuses keygate's credentials: {0}")]
    Unauthenticated(String),
    /// A change was written to the primary but not confirmed as durable as configured (too few
    /// replicas acknowledged it in time): it may be lost if the primary fails now.
    #[error("key change not confirmed: {0}")]
    Unconfirmed(String),
}

/// The storage seam. Implementations must make each mutation and its change-feed entry atomic.
pub trait KeyStore: Send + Sync + 'static {
    /// The record with this digest, if any. The gateway's only call on a cache miss.
    fn lookup(&self, digest: KeyDigest) -> StoreFuture<'_, Option<KeyRecord>>;
    /// What [`KeyStore::lookup`] gives for each digest, in order, in one call (the cache's
    /// background re-reads). By default, one lookup after another.
    fn lookup_many(&self, digests: Vec<KeyDigest>) -> StoreFuture<'_, Vec<Option<KeyRecord>>> {
        Box::pin(async move {
            let mut records = Vec::with_capacity(digests.len());
            for digest in digests {
                records.push(self.lookup(digest).await?);
            }
            Ok(records)
        })
    }
    /// Adds a new key; `Conflict` if the name or digest exists.
    fn insert(&self, record: KeyRecord) -> StoreFuture<'_, ()>;
    /// Every record, oldest first.
    fn list(&self) -> StoreFuture<'_, Vec<KeyRecord>>;
    /// The record whose id, or else name, is `id_or_name`.
    fn find(&self, id_or_name: &str) -> StoreFuture<'_, KeyRecord>;
    /// Sets `is_active`; returns the updated record.
    fn set_active(&self, id_or_name: &str, active: bool) -> StoreFuture<'_, KeyRecord>;
    /// Removes a key; returns the removed record.
    fn delete(&self, id_or_name: &str) -> StoreFuture<'_, KeyRecord>;
    /// Rotates the current key `id_or_name`: `successor` (same name) is stored, and the old key
    /// is marked rotated with its expiry brought forward to `grace_until`. Returns the old record
    /// as updated.
    fn rotate(
        &self,
        id_or_name: &str,
        successor: KeyRecord,
        grace_until: i64,
    ) -> StoreFuture<'_, KeyRecord>;
    /// Adds many records atomically: all are stored or none. A record whose digest is already
    /// stored is skipped (importing twice changes nothing); a record whose name belongs to another
    /// current key fails the whole import. Returns (imported, skipped).
    fn import(&self, records: Vec<KeyRecord>) -> StoreFuture<'_, (usize, usize)>;
    /// Number of active, unexpired keys (the health check's figure). Also serves as a liveness probe.
    fn count_active(&self) -> StoreFuture<'_, u64>;
    /// Whether any legacy (checksum-less) key exists.
    fn has_legacy(&self) -> StoreFuture<'_, bool>;
    /// Adds a batch of usage in one transaction.
    fn record_usage(&self, batch: Vec<Usage>) -> StoreFuture<'_, ()>;
    /// Current change-feed position.
    fn change_position(&self) -> StoreFuture<'_, u64>;
    /// Changes after position `since`.
    fn changes_since(&self, since: u64) -> StoreFuture<'_, Changes>;
    /// A signal raised when the store learns of a change (Redis pub/sub) or reconnects, so the
    /// gateway reads the change feed at once instead of at its next poll. `None`: poll only.
    fn change_signal(&self) -> Option<Arc<tokio::sync::Notify>> {
        None
    }
    /// One decision of a limiter shared by every gateway on this store (`kind` and `subject`
    /// name the bucket). `None`: this store shares no limits, decide in-process.
    fn rate_limit(
        &self,
        _kind: &str,
        _subject: &str,
        _rate: crate::rate::Rate,
    ) -> StoreFuture<'_, Option<crate::rate::Verdict>> {
        Box::pin(async { Ok(None) })
    }
    /// Whether the store's connections belong to the runtime that first drives them (Redis), so
    /// calls from other runtimes must go through [`pinned::Pinned`].
    fn runtime_bound(&self) -> bool {
        false
    }
    /// The node keygate talks to, when the store finds it by itself (the Sentinel primary), as
    /// last found: no round trip.
    fn node(&self) -> Option<String> {
        None
    }
    /// Whether the node answering takes writes, and which node it is. By default: writable.
    fn status(&self) -> StoreFuture<'_, Status> {
        Box::pin(async { Ok(Status::default()) })
    }
    /// Checks that the store permits every command keygate uses; `Denied` names the first that
    /// it refuses. By default: nothing to check.
    fn check_access(&self) -> StoreFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }
    /// The store's identity marker; `None`: none written yet, or this store keeps none.
    fn identity(&self) -> StoreFuture<'_, Option<Identity>> {
        Box::pin(async { Ok(None) })
    }
    /// Vouches for the store's data as it is now: raises the marker's generation (writing a
    /// marker if there is none), so gateways that found the store lost adopt it. `None`: this
    /// store keeps no marker.
    fn accept_identity(&self) -> StoreFuture<'_, Option<Identity>> {
        Box::pin(async { Ok(None) })
    }
}

/// Shared handle to the configured store.
pub type SharedStore = Arc<dyn KeyStore>;

/// `store`'s access check ([`KeyStore::check_access`]), bounded by four store timeouts (it makes
/// a dozen round trips): as `serve` runs it before it listens, and `check-config` with it.
pub async fn check_access_within(
    store: &dyn KeyStore,
    timeout: Duration,
) -> Result<(), StoreError> {
    let limit = 4 * timeout;
    tokio::time::timeout(limit, store.check_access())
        .await
        .unwrap_or_else(|_| {
            Err(StoreError::Unavailable(format!(
                "no answer within {limit:?} (4 x store.timeout)"
            )))
        })
}

/// Current time as Unix seconds.
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Opens the store `[store]` configures.
pub fn open(cfg: &crate::config::Store) -> Result<SharedStore, StoreError> {
    match &cfg.backend {
        crate::config::Backend::Sqlite { path } => {
            Ok(Arc::new(sqlite::SqliteStore::open(path, cfg.timeout)?))
        }
        crate::config::Backend::Redis(settings) => Ok(Arc::new(redis::RedisStore::open(
            settings.clone(),
            cfg.timeout,
        )?)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_must_be_header_safe() {
        for ok in ["Frontend production", "ci-bot_2", "a.b"] {
            check_name(ok).unwrap();
        }
        for bad in [
            "",
            " lead",
            "trail ",
            "new\nline",
            "ünï",
            "a\"b",
            &"x".repeat(65),
        ] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }
}
