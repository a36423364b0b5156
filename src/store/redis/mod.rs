//! Shared store for a fleet of gateways: Redis as a single server, as a primary that Redis
//! Sentinel manages, or as a Redis Cluster.
//!
//! Every keygate key carries the hash tag `{<prefix>}`, so all of them live in one cluster slot
//! and every mutation is one atomic Lua script: the record, the id and name indexes, the active
//! and legacy indexes, the change counter, the change stream, the identity marker and the
//! pub/sub event change together or not at all. The data is small (a few hundred bytes per key),
//! so one slot is no capacity limit; the cluster brings availability.
//!
//! Layout (`P` = `{keygate}`):
//! - `P:k:<digest hex>` hash: the record;
//! - `P:id:<id>`, `P:name:<name>` strings: digest of the key with that id or name;
//! - `P:all` sorted set of digests by creation time; `P:active` by expiry (`+inf`: none);
//!   `P:legacy` set of legacy digests;
//! - `P:seq` change counter; `P:changes` stream of `(seq, digest)` (trimmed to about
//!   [`CHANGE_LOG_KEEP`]); channel `P:changes` carries `"<seq> <digest>"` to subscribers;
//! - `P:store` hash: the identity marker (`id`, `generation`), written with the first change. A
//!   gateway that has seen it and then finds it gone, or finds the change counter gone back
//!   under it, reports the store as lost ([`Changes::Lost`]) instead of trusting an empty or
//!   rolled-back copy.
//!
//! Connections reconnect by themselves: a single server through redis-rs's `ConnectionManager`, a
//! cluster through its cluster client, a Sentinel group through [`Failover`], which asks the
//! sentinels for the primary and asks again when a command meets `READONLY` or a broken
//! connection, or a sentinel announces `+switch-master`; the change subscription moves with it.
//! Every round trip is bounded by the store timeout (a key change that waits for replicas, by
//! that plus `confirm_timeout`).
//!
//! The code, one concern per file:
//! - this file: [`RedisStore`], its constructors, the key names, and the [`KeyStore`] methods;
//! - `client`: clients for one node (TLS material, how a connection manager reconnects) and what
//!   a node's errors say (broken connection, replica, refused by the ACL);
//! - `conn`: the store's connection of any kind and its round trips, each bounded by the store
//!   timeout;
//! - `sentinel`: [`Failover`], the Sentinel primary as found and followed;
//! - `scripts`: the Lua scripts, their keys and arguments, and how a mutation runs (with `WAIT`
//!   when it must reach replicas);
//! - `record`: a record read back from its hash, by digest (with the marker) or by id or name;
//! - `feed`: the change feed read from a position and judged against the identity marker, and
//!   the change channel's subscription;
//! - `access`: the permission check against keygate's Redis user's ACL.

mod access;
mod client;
mod conn;
mod feed;
mod record;
mod scripts;
mod sentinel;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::{RedisError, Value};
use tokio::sync::{Notify, OnceCell};

use self::client::{client_for, hello_role};
use self::conn::Conn;
use self::feed::{Seen, parse_marker};
use self::record::parse_record;
use self::scripts::{Scripts, conflict, marker_id, record_args};
pub use self::sentinel::Failover;
use super::{
    Changes, Identity, KeyRecord, KeyStore, Status, StoreError, StoreFuture, Usage, unix_now,
};
use crate::key::KeyDigest;
use crate::rate::{Rate, Verdict};

/// What `[store]` says about a Redis store (validated with the rest of the configuration).
pub use crate::config::{RedisSettings as Settings, RedisTarget as Target, RedisTls as Tls};

/// Approximate number of change-stream entries kept.
pub const CHANGE_LOG_KEEP: u64 = 10_000;

/// Redis-backed [`KeyStore`].
pub struct RedisStore {
    settings: Settings,
    timeout: Duration,
    /// The store as messages name it (no password).
    display: String,
    conn: OnceCell<Conn>,
    failover: Option<Arc<Failover>>,
    prefix: String,
    channel: String,
    scripts: Scripts,
    seen: Mutex<Seen>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The target may hold a password: never print it.
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// A store at `target` with keys under `{prefix}` and no TLS files or confirmation (see
    /// [`RedisStore::open`]).
    pub fn new(target: Target, prefix: &str, timeout: Duration) -> Result<Self, StoreError> {
        Self::open(Settings::new(target, prefix), timeout)
    }

    /// A store as `settings` describe it. Connects lazily: the gateway starts (and reports the
    /// store down) while Redis is unreachable.
    pub fn open(settings: Settings, timeout: Duration) -> Result<Self, StoreError> {
        let invalid = |e: RedisError| StoreError::Unavailable(format!("invalid Redis URL: {e}"));
        let mut failover = None;
        let display = match &settings.target {
            Target::Single(url) => {
                let client = client_for(&settings.tls, url).map_err(invalid)?;
                format!("Redis at {}", client.get_connection_info().addr())
            }
            Target::Cluster(nodes) => {
                for node in nodes {
                    client_for(&settings.tls, node).map_err(invalid)?;
                }
                "the Redis Cluster".to_owned()
            }
            Target::Sentinel {
                sentinels,
                master,
                node,
            } => {
                failover = Some(Arc::new(
                    Failover::new(
                        sentinels,
                        master,
                        node,
                        &settings.tls,
                        timeout,
                        settings.confirm_timeout,
                    )
                    .map_err(invalid)?,
                ));
                format!("the Redis primary of {master:?}")
            }
        };
        let tag = format!("{{{}}}", settings.prefix);
        Ok(Self {
            timeout,
            display,
            conn: OnceCell::new(),
            failover,
            channel: format!("{tag}:changes"),
            prefix: tag,
            scripts: Scripts::new(),
            seen: Mutex::new(Seen::default()),
            settings,
        })
    }

    fn key(&self, kind: &str, rest: &str) -> String {
        format!("{}:{kind}:{rest}", self.prefix)
    }

    fn rec_key(&self, digest: &KeyDigest) -> String {
        self.key("k", &digest.to_hex())
    }

    fn named(&self, name: &str) -> String {
        format!("{}:{name}", self.prefix)
    }
}

impl KeyStore for RedisStore {
    fn lookup(&self, digest: KeyDigest) -> StoreFuture<'_, Option<KeyRecord>> {
        Box::pin(async move {
            let mut records = self.lookup_records(&[digest]).await?;
            Ok(records.pop().flatten())
        })
    }

    fn lookup_many(&self, digests: Vec<KeyDigest>) -> StoreFuture<'_, Vec<Option<KeyRecord>>> {
        Box::pin(async move {
            if digests.is_empty() {
                return Ok(Vec::new());
            }
            // One round trip for the lot.
            self.lookup_records(&digests).await
        })
    }

    fn insert(&self, record: KeyRecord) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            let mut invocation = self.scripts.insert.prepare_invoke();
            self.record_keys(&mut invocation, &record);
            self.shared_keys(&mut invocation);
            for a in record_args(&record)? {
                invocation.arg(a);
            }
            self.change_args(&mut invocation)?;
            self.mutate_checked(&invocation, |code| conflict(code, &record))
                .await
        })
    }

    fn rotate(
        &self,
        id_or_name: &str,
        successor: KeyRecord,
        grace_until: i64,
    ) -> StoreFuture<'_, KeyRecord> {
        let id_or_name = id_or_name.to_owned();
        Box::pin(async move {
            let mut old = self.find_record(&id_or_name).await?;
            let mut invocation = self.scripts.rotate.prepare_invoke();
            invocation.key(self.rec_key(&old.digest));
            self.record_keys(&mut invocation, &successor);
            self.shared_keys(&mut invocation);
            invocation.arg(old.digest.to_hex()).arg(grace_until);
            for a in record_args(&successor)? {
                invocation.arg(a);
            }
            self.change_args(&mut invocation)?;
            self.mutate_checked(&invocation, |code| conflict(code, &old))
                .await?;
            old.rotated_to = Some(successor.id.clone());
            old.expires_at = Some(old.expires_at.map_or(grace_until, |e| e.min(grace_until)));
            Ok(old)
        })
    }

    fn import(&self, records: Vec<KeyRecord>) -> StoreFuture<'_, (usize, usize)> {
        Box::pin(async move {
            if records.is_empty() {
                return Ok((0, 0));
            }
            let mut invocation = self.scripts.import.prepare_invoke();
            self.shared_keys(&mut invocation);
            self.change_args(&mut invocation)?;
            for r in &records {
                self.record_keys(&mut invocation, r);
                for a in record_args(r)? {
                    invocation.arg(a);
                }
            }
            let (reply, acked): (Vec<i64>, _) = self.mutate(&invocation).await?;
            match reply.as_slice() {
                [0, imported] => {
                    let imported = usize::try_from(*imported).unwrap_or(0);
                    if imported > 0 {
                        self.confirmed(acked)?;
                    }
                    Ok((imported, records.len() - imported))
                }
                [code, index] => {
                    let r = usize::try_from(*index).ok().and_then(|i| records.get(i));
                    Err(r.map_or_else(
                        || StoreError::Corrupt("import failed".into()),
                        |r| conflict(*code, r),
                    ))
                }
                _ => Err(StoreError::Corrupt(format!(
                    "unexpected import reply {reply:?}"
                ))),
            }
        })
    }

    fn list(&self) -> StoreFuture<'_, Vec<KeyRecord>> {
        Box::pin(async move {
            let digests: Vec<String> = self
                .query(redis::cmd("ZRANGE").arg(self.named("all")).arg(0).arg(-1))
                .await?;
            let digests: Vec<KeyDigest> = digests
                .iter()
                .filter_map(|h| KeyDigest::from_hex(h))
                .collect();
            if digests.is_empty() {
                return Ok(Vec::new());
            }
            let mut pipe = redis::pipe();
            for d in &digests {
                pipe.cmd("HGETALL").arg(self.rec_key(d));
            }
            let rows: Vec<Vec<(String, String)>> = self.pipe(&pipe).await?;
            let mut out = Vec::with_capacity(rows.len());
            for (d, fields) in digests.into_iter().zip(rows) {
                if let Some(r) = parse_record(d, fields)? {
                    out.push(r);
                }
            }
            // The same order as the SQLite store: oldest first, then by name and id.
            out.sort_by(|a, b| (a.created_at, &a.name, &a.id).cmp(&(b.created_at, &b.name, &b.id)));
            Ok(out)
        })
    }

    fn find(&self, id_or_name: &str) -> StoreFuture<'_, KeyRecord> {
        let id_or_name = id_or_name.to_owned();
        Box::pin(async move { self.find_record(&id_or_name).await })
    }

    fn set_active(&self, id_or_name: &str, active: bool) -> StoreFuture<'_, KeyRecord> {
        let id_or_name = id_or_name.to_owned();
        Box::pin(async move {
            let mut record = self.find_record(&id_or_name).await?;
            let mut invocation = self.scripts.set_active.prepare_invoke();
            invocation
                .key(self.rec_key(&record.digest))
                .key(self.named("active"))
                .key(self.named("seq"))
                .key(self.named("changes"))
                .key(self.named("store"))
                .arg(record.digest.to_hex())
                .arg(u8::from(active));
            self.change_args(&mut invocation)?;
            self.mutate_checked(&invocation, |_| StoreError::NotFound(id_or_name))
                .await?;
            record.is_active = active;
            Ok(record)
        })
    }

    fn delete(&self, id_or_name: &str) -> StoreFuture<'_, KeyRecord> {
        let id_or_name = id_or_name.to_owned();
        Box::pin(async move {
            let record = self.find_record(&id_or_name).await?;
            let mut invocation = self.scripts.delete.prepare_invoke();
            self.record_keys(&mut invocation, &record);
            self.shared_keys(&mut invocation);
            invocation.arg(record.digest.to_hex());
            self.change_args(&mut invocation)?;
            self.mutate_checked(&invocation, |_| StoreError::NotFound(id_or_name))
                .await?;
            Ok(record)
        })
    }

    fn count_active(&self) -> StoreFuture<'_, u64> {
        Box::pin(async move {
            self.query(
                redis::cmd("ZCOUNT")
                    .arg(self.named("active"))
                    .arg(format!("({}", unix_now()))
                    .arg("+inf"),
            )
            .await
        })
    }

    fn has_legacy(&self) -> StoreFuture<'_, bool> {
        Box::pin(async move {
            let n: u64 = self
                .query(redis::cmd("SCARD").arg(self.named("legacy")))
                .await?;
            Ok(n > 0)
        })
    }

    fn record_usage(&self, batch: Vec<Usage>) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            let mut invocation = self.scripts.usage.prepare_invoke();
            for u in &batch {
                invocation
                    .key(self.rec_key(&u.digest))
                    .arg(u.last_used)
                    .arg(u.count);
            }
            let _: i64 = self.invoke(&invocation).await?;
            Ok(())
        })
    }

    fn change_position(&self) -> StoreFuture<'_, u64> {
        Box::pin(self.read_position())
    }

    fn changes_since(&self, since: u64) -> StoreFuture<'_, Changes> {
        Box::pin(self.read_changes(since))
    }

    fn rate_limit(
        &self,
        kind: &str,
        subject: &str,
        rate: Rate,
    ) -> StoreFuture<'_, Option<Verdict>> {
        // Each bucket is its own hash tag: limiter traffic spreads over the cluster's slots.
        let bucket = format!(
            "{{{}:rl:{kind}:{subject}}}",
            &self.prefix[1..self.prefix.len() - 1]
        );
        Box::pin(async move {
            let interval = u64::try_from(rate.emission_interval().as_micros()).unwrap_or(u64::MAX);
            let reply: Vec<i64> = self
                .invoke(self.scripts.gcra.key(bucket).arg(interval).arg(rate.count))
                .await?;
            let micros = |v: Option<&i64>| {
                Duration::from_micros(v.copied().unwrap_or(0).max(0).unsigned_abs())
            };
            Ok(Some(match reply.first() {
                Some(1) => Verdict::Allowed {
                    remaining: u32::try_from(reply.get(1).copied().unwrap_or(0).max(0))
                        .unwrap_or(0),
                    reset: micros(reply.get(2)),
                },
                _ => Verdict::Limited {
                    retry_after: micros(reply.get(1)),
                },
            }))
        })
    }

    fn runtime_bound(&self) -> bool {
        true
    }

    fn change_signal(&self) -> Option<Arc<Notify>> {
        let subscription = match self.subscription() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "no change subscription (polling only)");
                return None;
            }
        };
        let notify = Arc::new(Notify::new());
        tokio::spawn(Self::subscribe_loop(
            subscription,
            self.channel.clone(),
            self.timeout,
            Arc::downgrade(&notify),
        ));
        Some(notify)
    }

    fn node(&self) -> Option<String> {
        self.failover.as_ref().and_then(|f| f.addr())
    }

    fn status(&self) -> StoreFuture<'_, Status> {
        Box::pin(async move {
            if matches!(self.settings.target, Target::Cluster(_)) {
                // The cluster client sends writes to the slot's primary, wherever it is.
                return Ok(Status::default());
            }
            let answer: Value = self.query(redis::cmd("HELLO").arg(2)).await?;
            let read_only = hello_role(&answer).is_some_and(|role| role != "master");
            let node = self.failover.as_ref().and_then(|f| f.addr());
            if read_only && let Some(failover) = &self.failover {
                // Talking to a demoted primary: the sentinels may know better already.
                if let Some(g) = failover.current.load().as_ref().map(|p| p.generation) {
                    failover.find_soon(g);
                }
            }
            Ok(Status { read_only, node })
        })
    }

    fn check_access(&self) -> StoreFuture<'_, ()> {
        Box::pin(self.check_permissions())
    }

    fn identity(&self) -> StoreFuture<'_, Option<Identity>> {
        Box::pin(async move {
            let fields: Vec<Option<String>> = self
                .query(
                    redis::cmd("HMGET")
                        .arg(self.named("store"))
                        .arg("id")
                        .arg("generation"),
                )
                .await?;
            Ok(parse_marker(&fields))
        })
    }

    fn accept_identity(&self) -> StoreFuture<'_, Option<Identity>> {
        Box::pin(async move {
            let mut invocation = self.scripts.accept.prepare_invoke();
            invocation
                .key(self.named("store"))
                .arg(marker_id()?)
                .arg(&self.channel);
            let (fields, acked): (Vec<Option<String>>, _) = self.mutate(&invocation).await?;
            self.confirmed(acked)?;
            Ok(parse_marker(&fields))
        })
    }
}
