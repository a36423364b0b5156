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

use std::future::Future;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{
    Client, ClientTlsConfig, Cmd, ConnectionAddr, ErrorKind, IntoConnectionInfo, Pipeline,
    RedisError, RedisFuture, RedisResult, Script, ScriptInvocation, ServerErrorKind,
    TlsCertificates, TlsMode, Value,
};
use tokio::sync::{Notify, OnceCell, watch};

use super::{
    Changes, Identity, KeyRecord, KeyStore, Status, StoreError, StoreFuture, Usage, unix_now,
};
use crate::key::KeyDigest;
use crate::logging::Throttle;
use crate::rate::{Rate, Verdict};

/// What `[store]` says about a Redis store (validated with the rest of the configuration).
pub use crate::config::{RedisSettings as Settings, RedisTarget as Target, RedisTls as Tls};

/// Approximate number of change-stream entries kept.
pub const CHANGE_LOG_KEEP: u64 = 10_000;

/// One change-stream entry as XRANGE returns it: id and field/value pairs.
type StreamEntry = (String, Vec<(String, String)>);

/// `tls`'s CA and client certificate, as the Redis client takes them; `None` when it has none.
fn certificates(tls: &Tls) -> Option<TlsCertificates> {
    if tls.ca.is_none() && tls.client.is_none() {
        return None;
    }
    Some(TlsCertificates {
        client_tls: tls.client.as_ref().map(|(cert, key)| ClientTlsConfig {
            client_cert: cert.clone(),
            client_key: key.clone(),
        }),
        root_cert: tls.ca.clone(),
    })
}

/// A client for `url`, with `tls`'s material when there is some.
fn client_for(tls: &Tls, url: &str) -> RedisResult<Client> {
    match certificates(tls) {
        Some(certs) => Client::build_with_tls(url, certs),
        None => Client::open(url),
    }
}

/// One connection of any kind; all reconnect on their own.
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
    Sentinel(Arc<Failover>),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
            Conn::Sentinel(f) => Box::pin(f.command(cmd)),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Sentinel(f) => Box::pin(f.pipeline(pipeline, offset, count)),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
            Conn::Sentinel(f) => f.db,
        }
    }
}

/// How a connection manager to one node reconnects: connecting bounded by the store timeout, a
/// few quick retries, then the caller's error. An answer may take `wait` longer (a `WAIT` for
/// replicas); every round trip is bounded by the caller too ([`RedisStore::within`]).
fn manager_config(timeout: Duration, wait: Duration) -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout + wait))
        .set_min_delay(Duration::from_millis(50))
        .set_max_delay(Duration::from_millis(500))
        .set_number_of_retries(2)
}

/// A broken or refused connection, or one that stopped answering: the node may be gone.
fn is_connection_error(e: &RedisError) -> bool {
    e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() || e.is_timeout()
}

fn is_read_only(e: &RedisError) -> bool {
    e.kind() == ErrorKind::Server(ServerErrorKind::ReadOnly)
}

/// Refused by an ACL: directly (`NOPERM`), or inside a script (where Redis says "can't").
fn is_denied(e: &RedisError) -> bool {
    e.kind() == ErrorKind::Server(ServerErrorKind::NoPerm) || is_denial_text(&e.to_string())
}

fn is_denial_text(text: &str) -> bool {
    text.contains("NOPERM")
        || text.contains("no permissions")
        || text.contains("The user executing the script can't")
}

/// The primary of a Sentinel group, found through the sentinels and followed when it moves.
pub struct Failover {
    master: String,
    sentinel: tokio::sync::Mutex<SentinelClient>,
    current: ArcSwapOption<Primary>,
    /// The current primary's generation, bumped on each move: the change subscription moves with
    /// it, and the `+switch-master` watcher ends when this sender is dropped with the store.
    moved: watch::Sender<u64>,
    timeout: Duration,
    /// How much longer than `timeout` an answer may take (a `WAIT`).
    wait: Duration,
    db: i64,
}

/// One primary, as found.
struct Primary {
    addr: String,
    client: Client,
    manager: ConnectionManager,
    generation: u64,
}

impl Failover {
    fn new(
        sentinels: &[String],
        master: &str,
        node: &str,
        tls: &Tls,
        timeout: Duration,
        wait: Duration,
    ) -> RedisResult<Self> {
        let mut addrs = Vec::with_capacity(sentinels.len());
        let mut auth = None;
        for url in sentinels {
            let info = url.as_str().into_connection_info()?;
            let settings = info.redis_settings();
            if auth.is_none() && settings.password().is_some() {
                auth = Some((
                    settings.username().map(str::to_owned),
                    settings.password().map(str::to_owned),
                ));
            }
            addrs.push(info.addr().clone());
        }
        let node = node.into_connection_info()?;
        let mut builder = SentinelClientBuilder::new(addrs, master, SentinelServerType::Master)?
            .set_client_to_redis_db(node.redis_settings().db());
        if let Some(user) = node.redis_settings().username() {
            builder = builder.set_client_to_redis_username(user);
        }
        if let Some(password) = node.redis_settings().password() {
            builder = builder.set_client_to_redis_password(password);
        }
        if let ConnectionAddr::TcpTls { insecure, .. } = node.addr() {
            builder = builder.set_client_to_redis_tls_mode(if *insecure {
                TlsMode::Insecure
            } else {
                TlsMode::Secure
            });
            if let Some(certs) = certificates(tls) {
                builder = builder.set_client_to_redis_certificates(certs);
            }
        }
        if let Some((user, password)) = auth {
            if let Some(user) = user {
                builder = builder.set_client_to_sentinel_username(user);
            }
            if let Some(password) = password {
                builder = builder.set_client_to_sentinel_password(password);
            }
        }
        if sentinels.iter().any(|s| s.starts_with("rediss://"))
            && let Some(certs) = certificates(tls)
        {
            builder = builder.set_client_to_sentinel_certificates(certs);
        }
        let (moved, _) = watch::channel(0);
        Ok(Self {
            master: master.to_owned(),
            sentinel: tokio::sync::Mutex::new(builder.build()?),
            current: ArcSwapOption::empty(),
            moved,
            timeout,
            wait,
            db: node.redis_settings().db(),
        })
    }

    /// The primary as last found; found now if it never was.
    async fn primary(&self) -> RedisResult<Arc<Primary>> {
        match self.current.load_full() {
            Some(p) => Ok(p),
            None => self.find(None).await,
        }
    }

    /// The primary's address as last found.
    fn addr(&self) -> Option<String> {
        self.current.load().as_ref().map(|p| p.addr.clone())
    }

    /// Asks the sentinels for the primary, unless the one of generation `suspect` (`None`: none
    /// found yet) was already replaced meanwhile. One lookup at a time.
    async fn find(&self, suspect: Option<u64>) -> RedisResult<Arc<Primary>> {
        let mut sentinel = self.sentinel.lock().await;
        let current = self.current.load_full();
        if let Some(p) = &current
            && suspect != Some(p.generation)
        {
            return Ok(Arc::clone(p));
        }
        let client = tokio::time::timeout(self.timeout, sentinel.async_get_client())
            .await
            .map_err(|_| {
                RedisError::from((
                    ErrorKind::Io,
                    "no sentinel named the primary within the store timeout",
                ))
            })?
            .map_err(|e| {
                if is_denied(&e) {
                    // redis-rs asks the primary ROLE to check it really is the primary.
                    RedisError::from((
                        ErrorKind::Server(ServerErrorKind::NoPerm),
                        "the Redis user may not run ROLE, which the Sentinel client needs to check the primary",
                        "grant +role (see the ACL in docs/fleet.md)".to_owned(),
                    ))
                } else {
                    e
                }
            })?;
        let addr = client.get_connection_info().addr().to_string();
        if let Some(p) = &current
            && p.addr == addr
        {
            return Ok(Arc::clone(p));
        }
        let manager = ConnectionManager::new_lazy_with_config(
            client.clone(),
            manager_config(self.timeout, self.wait),
        )?;
        let generation = current.as_ref().map_or(1, |p| p.generation + 1);
        let primary = Arc::new(Primary {
            addr: addr.clone(),
            client,
            manager,
            generation,
        });
        self.current.store(Some(Arc::clone(&primary)));
        self.moved.send_replace(generation);
        match &current {
            Some(old) => tracing::warn!(
                master = %self.master,
                from = %old.addr,
                to = %addr,
                "the Redis primary moved: following it"
            ),
            None => {
                tracing::info!(master = %self.master, primary = %addr, "Redis primary found through the sentinels")
            }
        }
        Ok(primary)
    }

    /// Looks the primary up again in the background (after a broken connection): the caller
    /// gets its error now, and the next call the new primary.
    fn find_soon(self: &Arc<Self>, suspect: u64) {
        let this = Arc::clone(self);
        tokio::spawn(async move {
            if let Err(e) = this.find(Some(suspect)).await {
                tracing::debug!(error = %e, "Redis primary lookup failed");
            }
        });
    }

    async fn command(self: &Arc<Self>, cmd: &Cmd) -> RedisResult<Value> {
        let primary = self.primary().await?;
        match primary.manager.clone().req_packed_command(cmd).await {
            Err(e) if is_read_only(&e) => {
                // The node was demoted: nothing was written. Ask again; retry once if it moved.
                let next = self.find(Some(primary.generation)).await?;
                if next.generation == primary.generation {
                    return Err(e);
                }
                next.manager.clone().req_packed_command(cmd).await
            }
            Err(e) if is_connection_error(&e) => {
                self.find_soon(primary.generation);
                Err(e)
            }
            other => other,
        }
    }

    async fn pipeline(
        self: &Arc<Self>,
        pipeline: &Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisResult<Vec<Value>> {
        let primary = self.primary().await?;
        match primary
            .manager
            .clone()
            .req_packed_commands(pipeline, offset, count)
            .await
        {
            Err(e) if is_read_only(&e) => {
                let next = self.find(Some(primary.generation)).await?;
                if next.generation == primary.generation {
                    return Err(e);
                }
                next.manager
                    .clone()
                    .req_packed_commands(pipeline, offset, count)
                    .await
            }
            Err(e) if is_connection_error(&e) => {
                self.find_soon(primary.generation);
                Err(e)
            }
            other => other,
        }
    }

    /// Listens to the sentinels' `+switch-master` announcements (on the first sentinel that
    /// answers) and follows the primary at each one for this group, until the store is dropped.
    async fn watch_switches(failover: Weak<Failover>) {
        static LOST: Throttle = Throttle::new(Duration::from_secs(30));
        let Some(mut closed) = failover.upgrade().map(|f| f.moved.subscribe()) else {
            return;
        };
        let mut backoff = Duration::from_millis(100);
        loop {
            let result: RedisResult<()> = async {
                let Some(f) = failover.upgrade() else {
                    return Ok(());
                };
                let (master, timeout) = (f.master.clone(), f.timeout);
                let client = {
                    let mut sentinel = f.sentinel.lock().await;
                    tokio::time::timeout(timeout, sentinel.async_get_sentinel_client()).await
                };
                drop(f);
                let client = client
                    .map_err(|_| RedisError::from((ErrorKind::Io, "no sentinel answered")))??;
                let mut pubsub = tokio::time::timeout(timeout, client.get_async_pubsub())
                    .await
                    .map_err(|_| RedisError::from((ErrorKind::Io, "no sentinel answered")))??;
                pubsub.subscribe("+switch-master").await?;
                backoff = Duration::from_millis(100);
                LOST.reset();
                // A switch announced while nobody listened is found by asking now.
                if let Some(f) = failover.upgrade() {
                    let suspect = f.current.load().as_ref().map(|p| p.generation);
                    if suspect.is_some() {
                        let _ = f.find(suspect).await;
                    }
                }
                let mut messages = pubsub.on_message();
                loop {
                    tokio::select! {
                        msg = futures_util::StreamExt::next(&mut messages) => {
                            let Some(msg) = msg else { break };
                            // "<master name> <old ip> <old port> <new ip> <new port>"
                            let payload: String = msg.get_payload().unwrap_or_default();
                            if payload.split(' ').next() != Some(master.as_str()) {
                                continue;
                            }
                            let Some(f) = failover.upgrade() else { return Ok(()) };
                            let suspect = f.current.load().as_ref().map(|p| p.generation);
                            if let Err(e) = f.find(suspect).await {
                                tracing::warn!(error = %e, "Redis primary lookup after +switch-master failed");
                            }
                        }
                        changed = closed.changed() => if changed.is_err() { return Ok(()) },
                    }
                }
                Err(RedisError::from((ErrorKind::Io, "sentinel subscription closed")))
            }
            .await;
            match result {
                Ok(()) => return,
                Err(e) => {
                    if let Some(suppressed) = LOST.allow() {
                        tracing::warn!(error = %e, suppressed, "listening for Redis failovers failed; retrying (commands still follow the primary)");
                    }
                }
            }
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                changed = closed.changed() => if changed.is_err() { return },
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }
}

/// What the gateway reading the change feed has seen of the store's identity.
#[derive(Debug, Default)]
struct Seen {
    marker: Option<Identity>,
    /// Why the store is lost, until a new marker (or generation) is adopted.
    lost: Option<String>,
    /// The Sentinel primary's generation at the last read of the feed (0: not Sentinel).
    primary: u64,
}

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

struct Scripts {
    gcra: Script,
    insert: Script,
    import: Script,
    rotate: Script,
    set_active: Script,
    delete: Script,
    usage: Script,
    init: Script,
    accept: Script,
    probe: Script,
}

/// Lua shared by the mutation scripts.
///
/// `log_change` bumps the counter, appends to the stream and publishes. `mark` writes the
/// identity marker if there is none (the store's first change, or the first after it lost its
/// data). `fields` reads the 13 record arguments starting at `i`; `conflict` and `put_record`
/// check and write one record and its indexes. A rotated (old) key is not in the name index: the
/// name belongs to its successor.
const PRELUDE: &str = r#"
local function log_change(seq_key, stream_key, digest, channel, keep)
  local seq = redis.call('INCR', seq_key)
  redis.call('XADD', stream_key, 'MAXLEN', '~', keep, seq .. '-1', 'd', digest)
  redis.call('PUBLISH', channel, seq .. ' ' .. digest)
  return seq
end
local function mark(store_key, id)
  if redis.call('EXISTS', store_key) == 0 then
    redis.call('HSET', store_key, 'id', id, 'generation', 1)
  end
end
local function fields(argv, i)
  return {digest = argv[i], id = argv[i + 1], name = argv[i + 2], hint = argv[i + 3],
    created_at = argv[i + 4], last_used = argv[i + 5], use_count = argv[i + 6],
    is_active = argv[i + 7], legacy = argv[i + 8], expires_at = argv[i + 9],
    policy = argv[i + 10], rotated_to = argv[i + 11], owner = argv[i + 12]}
end
local function conflict(rec_key, id_key, name_key, f)
  if redis.call('EXISTS', rec_key) == 1 then return 2 end
  if f.rotated_to == '' and redis.call('EXISTS', name_key) == 1 then return 1 end
  if redis.call('EXISTS', id_key) == 1 then return 3 end
  return 0
end
local function put_record(rec_key, id_key, name_key, all_key, active_key, legacy_key, f)
  redis.call('HSET', rec_key, 'id', f.id, 'name', f.name, 'hint', f.hint,
    'created_at', f.created_at, 'last_used', f.last_used, 'use_count', f.use_count,
    'is_active', f.is_active, 'legacy', f.legacy, 'expires_at', f.expires_at,
    'policy', f.policy, 'rotated_to', f.rotated_to, 'owner', f.owner)
  redis.call('SET', id_key, f.digest)
  if f.rotated_to == '' then redis.call('SET', name_key, f.digest) end
  redis.call('ZADD', all_key, f.created_at, f.digest)
  if f.is_active == '1' then
    local score = f.expires_at
    if score == '' then score = '+inf' end
    redis.call('ZADD', active_key, score, f.digest)
  end
  if f.legacy == '1' then redis.call('SADD', legacy_key, f.digest) end
end
"#;

/// Number of script arguments that describe one record.
const RECORD_ARGS: usize = 13;

/// The commands keygate's scripts run inside Redis, each tried once by [`Scripts::probe`] (on
/// scratch keys), with the ACL rule that grants it.
const SCRIPT_COMMANDS: &[(&str, &str)] = &[
    ("TIME", "+time"),
    ("EXISTS", "+@read"),
    ("HGET", "+@read"),
    ("GET", "+@read"),
    ("HSET", "+@write"),
    ("HINCRBY", "+@write"),
    ("SET", "+@write"),
    ("INCR", "+@write"),
    ("ZADD", "+@write"),
    ("ZREM", "+@write"),
    ("SADD", "+@write"),
    ("SREM", "+@write"),
    ("XADD", "+@write"),
    ("PUBLISH", "+@pubsub and the channel pattern &{prefix}:*"),
    ("DEL", "+@write"),
];

impl Scripts {
    fn new() -> Self {
        // KEYS: rec, id, name, all, active, legacy, seq, changes, store;
        // ARGV: record (13), channel, keep, marker id
        let insert = r#"
local f = fields(ARGV, 1)
local c = conflict(KEYS[1], KEYS[2], KEYS[3], f)
if c ~= 0 then return c end
mark(KEYS[9], ARGV[16])
put_record(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], f)
log_change(KEYS[7], KEYS[8], f.digest, ARGV[14], ARGV[15])
return 0
"#;
        // KEYS: all, active, legacy, seq, changes, store, then (rec, id, name) per record;
        // ARGV: channel, keep, marker id, then a record (13) per record. Checks everything, then
        // writes: all or nothing. Returns {0, imported} or {code, index of the failing record}.
        let import = r#"
local n = (#KEYS - 6) / 3
local skip, names, digests = {}, {}, {}
for i = 0, n - 1 do
  local f = fields(ARGV, 4 + i * 13)
  local rk, ik, nk = KEYS[7 + i * 3], KEYS[8 + i * 3], KEYS[9 + i * 3]
  if redis.call('EXISTS', rk) == 1 or digests[f.digest] then
    skip[i] = true
  else
    local c = conflict(rk, ik, nk, f)
    if c == 0 and f.rotated_to == '' and names[f.name] then c = 1 end
    if c ~= 0 then return {c, i} end
    if f.rotated_to == '' then names[f.name] = true end
    digests[f.digest] = true
  end
end
local imported = 0
for i = 0, n - 1 do
  if not skip[i] then
    local f = fields(ARGV, 4 + i * 13)
    if imported == 0 then mark(KEYS[6], ARGV[3]) end
    put_record(KEYS[7 + i * 3], KEYS[8 + i * 3], KEYS[9 + i * 3], KEYS[1], KEYS[2], KEYS[3], f)
    log_change(KEYS[4], KEYS[5], f.digest, ARGV[1], ARGV[2])
    imported = imported + 1
  end
end
return {0, imported}
"#;
        // KEYS: old rec, new rec, new id, name, all, active, legacy, seq, changes, store;
        // ARGV: old digest, grace_until, successor record (13), channel, keep, marker id
        let rotate = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return 5 end
if (redis.call('HGET', KEYS[1], 'rotated_to') or '') ~= '' then return 4 end
local f = fields(ARGV, 3)
if redis.call('EXISTS', KEYS[2]) == 1 then return 2 end
if redis.call('EXISTS', KEYS[3]) == 1 then return 3 end
mark(KEYS[10], ARGV[18])
local grace = tonumber(ARGV[2])
local expires = tonumber(redis.call('HGET', KEYS[1], 'expires_at'))
if expires == nil or expires > grace then expires = grace end
redis.call('HSET', KEYS[1], 'rotated_to', f.id, 'expires_at', expires)
if redis.call('HGET', KEYS[1], 'is_active') == '1' then
  redis.call('ZADD', KEYS[6], expires, ARGV[1])
end
log_change(KEYS[8], KEYS[9], ARGV[1], ARGV[16], ARGV[17])
put_record(KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], f)
log_change(KEYS[8], KEYS[9], f.digest, ARGV[16], ARGV[17])
return 0
"#;
        // KEYS: rec, active, seq, changes, store; ARGV: digest, active (0/1), channel, keep,
        // marker id
        let set_active = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return 1 end
mark(KEYS[5], ARGV[5])
redis.call('HSET', KEYS[1], 'is_active', ARGV[2])
if ARGV[2] == '1' then
  local score = redis.call('HGET', KEYS[1], 'expires_at')
  if not score or score == '' then score = '+inf' end
  redis.call('ZADD', KEYS[2], score, ARGV[1])
else
  redis.call('ZREM', KEYS[2], ARGV[1])
end
log_change(KEYS[3], KEYS[4], ARGV[1], ARGV[3], ARGV[4])
return 0
"#;
        // KEYS: rec, id, name, all, active, legacy, seq, changes, store;
        // ARGV: digest, channel, keep, marker id
        let delete = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return 1 end
mark(KEYS[9], ARGV[4])
redis.call('DEL', KEYS[1], KEYS[2])
if redis.call('GET', KEYS[3]) == ARGV[1] then redis.call('DEL', KEYS[3]) end
redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('ZREM', KEYS[5], ARGV[1])
redis.call('SREM', KEYS[6], ARGV[1])
log_change(KEYS[7], KEYS[8], ARGV[1], ARGV[2], ARGV[3])
return 0
"#;
        // KEYS: one record per usage; ARGV: (last_used, count) per key
        let usage = r#"
for i, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 1 then
    local last = tonumber(ARGV[2 * i - 1])
    local prev = tonumber(redis.call('HGET', key, 'last_used')) or 0
    if last > prev then redis.call('HSET', key, 'last_used', last) end
    redis.call('HINCRBY', key, 'use_count', ARGV[2 * i])
  end
end
return 0
"#;
        // GCRA with Redis's clock, so every instance agrees. KEYS: bucket;
        // ARGV: emission interval (µs), burst. Returns {1, remaining, reset µs} or {0, retry µs}.
        let gcra = r#"
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = interval * (tonumber(ARGV[2]) - 1)
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
if now < tat - tolerance then
  return {0, tat - tolerance - now}
end
local new_tat = tat + interval
redis.call('SET', KEYS[1], new_tat, 'PX', math.ceil((new_tat - now) / 1000) + 1)
return {1, math.floor((tolerance - (new_tat - now)) / interval) + 1, new_tat - now}
"#;
        // A store with changes but no marker was written by a keygate that wrote none: mark it
        // now. KEYS: store, seq; ARGV: marker id. Returns {id, generation} (nils: no marker).
        let init = r#"
if redis.call('EXISTS', KEYS[1]) == 0 and redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('HSET', KEYS[1], 'id', ARGV[1], 'generation', 1)
end
return redis.call('HMGET', KEYS[1], 'id', 'generation')
"#;
        // `keygate store accept`: a new generation of the marker (or a new marker), announced
        // on the change channel so gateways read the feed at once. KEYS: store;
        // ARGV: marker id, channel. Returns {id, generation}.
        let accept = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('HSET', KEYS[1], 'id', ARGV[1], 'generation', 1)
else
  redis.call('HINCRBY', KEYS[1], 'generation', 1)
end
redis.call('PUBLISH', ARGV[2], '0 accept')
return redis.call('HMGET', KEYS[1], 'id', 'generation')
"#;
        // Tries every command the scripts run, on scratch keys, and returns the names of those
        // the ACL refuses (a refusal inside a script is an error `pcall` can catch). KEYS: a
        // hash, a string, a sorted set, a set, a stream; ARGV: the change channel.
        let mut probe = String::from(
            r#"
local denied = {}
local function try(...)
  local r = redis.pcall(...)
  if type(r) == 'table' and r.err and (string.find(r.err, 'The user executing the script', 1, true)
      or string.find(r.err, 'NOPERM', 1, true)) then
    table.insert(denied, (select(1, ...)) .. '\t' .. r.err)
  end
end
"#,
        );
        for (name, _) in SCRIPT_COMMANDS {
            probe.push_str(match *name {
                "TIME" => "try('TIME')\n",
                "EXISTS" => "try('EXISTS', KEYS[1])\n",
                "HGET" => "try('HGET', KEYS[1], 'f')\n",
                "GET" => "try('GET', KEYS[2])\n",
                "HSET" => "try('HSET', KEYS[1], 'f', '1')\n",
                "HINCRBY" => "try('HINCRBY', KEYS[1], 'n', 1)\n",
                "SET" => "try('SET', KEYS[2], '1', 'PX', 60000)\n",
                "INCR" => "try('INCR', KEYS[2])\n",
                "ZADD" => "try('ZADD', KEYS[3], 1, 'm')\n",
                "ZREM" => "try('ZREM', KEYS[3], 'm')\n",
                "SADD" => "try('SADD', KEYS[4], 'm')\n",
                "SREM" => "try('SREM', KEYS[4], 'm')\n",
                "XADD" => "try('XADD', KEYS[5], 'MAXLEN', '~', 10, '*', 'd', 'probe')\n",
                "PUBLISH" => "try('PUBLISH', ARGV[1], '0 probe')\n",
                _ => "try('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5])\n",
            });
        }
        probe.push_str("return denied\n");
        let with_prelude = |body: &str| Script::new(&format!("{PRELUDE}{body}"));
        Self {
            gcra: Script::new(gcra),
            insert: with_prelude(insert),
            import: with_prelude(import),
            rotate: with_prelude(rotate),
            set_active: with_prelude(set_active),
            delete: with_prelude(delete),
            usage: Script::new(usage),
            init: Script::new(init),
            accept: Script::new(accept),
            probe: Script::new(&probe),
        }
    }
}

/// The 13 script arguments of a record, in `fields()` order.
fn record_args(r: &KeyRecord) -> Result<[String; RECORD_ARGS], StoreError> {
    Ok([
        r.digest.to_hex(),
        r.id.clone(),
        r.name.clone(),
        r.hint.clone(),
        r.created_at.to_string(),
        opt_i64(r.last_used),
        r.use_count.to_string(),
        u8::from(r.is_active).to_string(),
        u8::from(r.legacy).to_string(),
        opt_i64(r.expires_at),
        serde_json::to_string(&r.policy)
            .map_err(|e| StoreError::Corrupt(format!("policy of {}: {e}", r.name)))?,
        r.rotated_to.clone().unwrap_or_default(),
        r.owner.clone().unwrap_or_default(),
    ])
}

fn conflict(code: i64, r: &KeyRecord) -> StoreError {
    match code {
        1 => StoreError::Conflict(r.name.clone()),
        2 => StoreError::Conflict(format!("{} (same key digest)", r.name)),
        3 => StoreError::Conflict(format!("{} (id {} taken)", r.name, r.id)),
        4 => StoreError::Conflict(format!("{} (already rotated)", r.name)),
        _ => StoreError::NotFound(r.name.clone()),
    }
}

fn opt_i64(v: Option<i64>) -> String {
    v.map(|n| n.to_string()).unwrap_or_default()
}

/// A fresh marker id.
fn marker_id() -> Result<String, StoreError> {
    crate::key::random_base62(16)
        .map_err(|e| StoreError::Unavailable(format!("cannot draw a marker id: {e}")))
}

/// The marker from `HMGET id generation`, if there is one.
fn parse_marker(fields: &[Option<String>]) -> Option<Identity> {
    match fields {
        [Some(id), generation] => Some(Identity {
            id: id.clone(),
            generation: generation
                .as_deref()
                .and_then(|g| g.parse().ok())
                .unwrap_or(0),
        }),
        _ => None,
    }
}

/// `role` in a `HELLO` answer (a flat list of names and values).
fn hello_role(answer: &Value) -> Option<String> {
    let items: Vec<&Value> = match answer {
        Value::Array(items) => items.iter().collect(),
        Value::Map(pairs) => pairs.iter().flat_map(|(k, v)| [k, v]).collect(),
        _ => return None,
    };
    items.chunks(2).find_map(|pair| match pair {
        [name, value] => {
            let name: String = redis::from_redis_value_ref(name).ok()?;
            if name != "role" {
                return None;
            }
            redis::from_redis_value_ref(value).ok()
        }
        _ => None,
    })
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

    async fn connect(&self) -> Result<Conn, StoreError> {
        match &self.settings.target {
            Target::Single(url) => {
                let client = client_for(&self.settings.tls, url).map_err(|e| self.error(e))?;
                let manager = ConnectionManager::new_lazy_with_config(
                    client,
                    manager_config(self.timeout, self.settings.confirm_timeout),
                )
                .map_err(|e| self.error(e))?;
                Ok(Conn::Single(manager))
            }
            Target::Cluster(nodes) => {
                let mut builder = redis::cluster::ClusterClient::builder(nodes.clone())
                    .connection_timeout(self.timeout)
                    .response_timeout(self.timeout + self.settings.confirm_timeout)
                    .retries(2);
                if let Some(certs) = certificates(&self.settings.tls) {
                    builder = builder.certs(certs);
                }
                let client = builder.build().map_err(|e| self.error(e))?;
                let conn = tokio::time::timeout(self.timeout, client.get_async_connection())
                    .await
                    .map_err(|_| self.no_answer(Duration::ZERO))?
                    .map_err(|e| self.error(e))?;
                Ok(Conn::Cluster(conn))
            }
            Target::Sentinel { .. } => {
                let failover = self.failover.as_ref().ok_or_else(|| {
                    StoreError::Unavailable("Sentinel settings missing".to_owned())
                })?;
                tokio::spawn(Failover::watch_switches(Arc::downgrade(failover)));
                Ok(Conn::Sentinel(Arc::clone(failover)))
            }
        }
    }

    async fn conn(&self) -> Result<Conn, StoreError> {
        self.within(Duration::ZERO, self.conn.get_or_try_init(|| self.connect()))
            .await
            .cloned()
    }

    /// `fut`, or the store's "no answer" error once the store timeout (plus `extra`) has passed.
    async fn within<T>(
        &self,
        extra: Duration,
        fut: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        tokio::time::timeout(self.timeout + extra, fut)
            .await
            .unwrap_or_else(|_| Err(self.no_answer(extra)))
    }

    fn no_answer(&self, extra: Duration) -> StoreError {
        let setting = if extra.is_zero() {
            "store.timeout"
        } else {
            "store.timeout + store.confirm_timeout"
        };
        StoreError::Unavailable(format!(
            "no answer from {} within {:?} ({setting})",
            self.display,
            self.timeout + extra
        ))
    }

    /// A Redis error as the store reports it: what a caller can do about it, in one line.
    fn error(&self, e: RedisError) -> StoreError {
        if is_read_only(&e) {
            let fix = match self.settings.target {
                Target::Sentinel { .. } => "the sentinels have not named a new primary yet",
                _ => {
                    "point store.url at the primary, or use backend = \"redis-sentinel\" to follow it"
                }
            };
            return StoreError::ReadOnly(format!(
                "{} is a replica that takes no writes (READONLY): {fix}",
                self.display
            ));
        }
        if is_denied(&e) {
            return StoreError::Denied(format!(
                "{} refuses a command to keygate's Redis user ({e}); the ACL in docs/fleet.md grants what keygate needs",
                self.display
            ));
        }
        StoreError::Unavailable(format!("{}: {e}", self.display))
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

    /// Runs a read-only command. A connection found broken (Redis restarted since the last call)
    /// is retried once on the fresh connection the manager makes.
    async fn query<T: redis::FromRedisValue>(&self, cmd: &Cmd) -> Result<T, StoreError> {
        let mut conn = self.conn().await?;
        self.within(Duration::ZERO, async {
            match cmd.query_async(&mut conn).await {
                Err(e) if e.is_connection_dropped() || e.is_io_error() => {
                    cmd.query_async(&mut conn).await.map_err(|e| self.error(e))
                }
                other => other.map_err(|e| self.error(e)),
            }
        })
        .await
    }

    /// Runs a pipeline of reads, retried once like [`RedisStore::query`].
    async fn pipe<T: redis::FromRedisValue>(&self, pipe: &Pipeline) -> Result<T, StoreError> {
        let mut conn = self.conn().await?;
        self.within(Duration::ZERO, async {
            match pipe.query_async(&mut conn).await {
                Err(e) if e.is_connection_dropped() || e.is_io_error() => {
                    pipe.query_async(&mut conn).await.map_err(|e| self.error(e))
                }
                other => other.map_err(|e| self.error(e)),
            }
        })
        .await
    }

    /// Reads records for the gateway's cache, with the identity marker in the same round trip
    /// once the change feed has seen one: a store whose marker is gone (or another) since the
    /// feed last read it answers nothing, so a key is never found missing in a store that lost
    /// its data between two polls of the feed.
    async fn lookup_records(
        &self,
        digests: &[KeyDigest],
    ) -> Result<Vec<Option<KeyRecord>>, StoreError> {
        let expected = self
            .seen
            .lock()
            .ok()
            .and_then(|s| s.marker.as_ref().map(|m| m.id.clone()));
        let mut pipe = redis::pipe();
        for digest in digests {
            pipe.cmd("HGETALL").arg(self.rec_key(digest));
        }
        if expected.is_some() {
            pipe.cmd("HGET").arg(self.named("store")).arg("id");
        }
        let mut values: Vec<Value> = self.pipe(&pipe).await?;
        if let Some(expected) = expected {
            let marker: Option<String> = values
                .pop()
                .and_then(|v| redis::from_redis_value(v).ok())
                .flatten();
            if marker.as_deref() != Some(expected.as_str()) {
                return Err(StoreError::Unavailable(format!(
                    "the store's identity marker {} is gone or replaced: {} lost its data",
                    self.named("store"),
                    self.display
                )));
            }
        }
        digests
            .iter()
            .zip(values)
            .map(|(digest, value)| {
                let fields: Vec<(String, String)> = redis::from_redis_value(value)
                    .map_err(|e| StoreError::Corrupt(format!("record {}: {e}", digest.to_hex())))?;
                parse_record(*digest, fields)
            })
            .collect()
    }

    /// A record's own keys, in script order: record, id index, name index.
    fn record_keys(&self, invocation: &mut ScriptInvocation<'_>, r: &KeyRecord) {
        invocation
            .key(self.rec_key(&r.digest))
            .key(self.key("id", &r.id))
            .key(self.key("name", &r.name));
    }

    /// The shared indexes, change feed and marker, in script order: all, active, legacy, seq,
    /// changes, store.
    fn shared_keys(&self, invocation: &mut ScriptInvocation<'_>) {
        for name in ["all", "active", "legacy", "seq", "changes", "store"] {
            invocation.key(self.named(name));
        }
    }

    /// Runs a prepared script that changes nothing that needs confirming.
    async fn invoke<T: redis::FromRedisValue>(
        &self,
        invocation: &ScriptInvocation<'_>,
    ) -> Result<T, StoreError> {
        let mut conn = self.conn().await?;
        self.within(Duration::ZERO, async {
            invocation
                .invoke_async(&mut conn)
                .await
                .map_err(|e| self.error(e))
        })
        .await
    }

    /// Runs a mutation script; with `confirm_replicas` set, followed on the same connection by
    /// `WAIT`, whose count of acknowledging replicas comes back too.
    async fn mutate<T: redis::FromRedisValue>(
        &self,
        invocation: &ScriptInvocation<'_>,
    ) -> Result<(T, Option<u32>), StoreError> {
        let replicas = self.settings.confirm_replicas;
        if replicas == 0 {
            return Ok((self.invoke(invocation).await?, None));
        }
        let wait = self.settings.confirm_timeout;
        let mut conn = self.conn().await?;
        self.within(wait, async {
            let mut pipe = redis::pipe();
            pipe.invoke_script(invocation)
                .cmd("WAIT")
                .arg(replicas)
                .arg(u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1));
            let result = match pipe.query_async::<(T, u32)>(&mut conn).await {
                Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                    invocation
                        .load_async(&mut conn)
                        .await
                        .map_err(|e| self.error(e))?;
                    pipe.query_async(&mut conn).await
                }
                other => other,
            };
            let (value, acked) = result.map_err(|e| self.error(e))?;
            Ok((value, Some(acked)))
        })
        .await
    }

    /// Whether a change made with `acked` replicas acknowledging it is confirmed.
    fn confirmed(&self, acked: Option<u32>) -> Result<(), StoreError> {
        let wanted = self.settings.confirm_replicas;
        match acked {
            Some(n) if n < wanted => Err(StoreError::Unconfirmed(format!(
                "it was written to {}, but {n} of the {wanted} replica(s) required \
                 (store.confirm_replicas) acknowledged it within {:?} (store.confirm_timeout); \
                 it is lost if the primary fails before they catch up: check the replicas, then \
                 run the command again",
                self.display, self.settings.confirm_timeout
            ))),
            _ => Ok(()),
        }
    }

    async fn record(&self, digest: KeyDigest) -> Result<Option<KeyRecord>, StoreError> {
        let fields: Vec<(String, String)> = self
            .query(redis::cmd("HGETALL").arg(self.rec_key(&digest)))
            .await?;
        parse_record(digest, fields)
    }

    async fn resolve(&self, id_or_name: &str) -> Result<KeyDigest, StoreError> {
        for kind in ["id", "name"] {
            let digest: Option<String> = self
                .query(redis::cmd("GET").arg(self.key(kind, id_or_name)))
                .await?;
            if let Some(hex) = digest {
                return KeyDigest::from_hex(&hex).ok_or_else(|| {
                    StoreError::Corrupt(format!("bad digest under {kind} {id_or_name}"))
                });
            }
        }
        Err(StoreError::NotFound(id_or_name.to_owned()))
    }

    async fn find_record(&self, id_or_name: &str) -> Result<KeyRecord, StoreError> {
        let digest = self.resolve(id_or_name).await?;
        self.record(digest)
            .await?
            .ok_or_else(|| StoreError::NotFound(id_or_name.to_owned()))
    }

    /// Where the change subscription connects.
    fn subscription(&self) -> Result<Subscription, StoreError> {
        let tls = &self.settings.tls;
        match (&self.settings.target, &self.failover) {
            (Target::Single(url), _) => Ok(Subscription::Nodes(vec![
                client_for(tls, url).map_err(|e| self.error(e))?,
            ])),
            (Target::Cluster(nodes), _) => Ok(Subscription::Nodes(
                nodes
                    .iter()
                    .map(|n| client_for(tls, n).map_err(|e| self.error(e)))
                    .collect::<Result<_, _>>()?,
            )),
            (Target::Sentinel { .. }, Some(failover)) => {
                Ok(Subscription::Primary(Arc::downgrade(failover)))
            }
            (Target::Sentinel { .. }, None) => Err(StoreError::Unavailable(
                "Sentinel settings missing".to_owned(),
            )),
        }
    }

    /// Keeps a subscription to the change channel, raising `signal` on every message and after
    /// every (re)subscription (events may have been missed meanwhile), until `signal` is
    /// dropped. A cluster's subscription moves to the next seed node when one fails (PUBLISH
    /// reaches every node); a Sentinel group's follows the primary.
    async fn subscribe_loop(
        subscription: Subscription,
        channel: String,
        timeout: Duration,
        signal: Weak<Notify>,
    ) {
        static LOST: Throttle = Throttle::new(Duration::from_secs(30));
        let mut backoff = Duration::from_millis(100);
        let mut at = 0usize;
        loop {
            let result: RedisResult<()> = async {
                let (client, mut moved) = match &subscription {
                    Subscription::Nodes(clients) => {
                        let Some(client) = clients.get(at % clients.len().max(1)) else {
                            return Ok(());
                        };
                        (client.clone(), None)
                    }
                    Subscription::Primary(failover) => {
                        let Some(failover) = failover.upgrade() else {
                            return Ok(());
                        };
                        let mut moved = failover.moved.subscribe();
                        moved.mark_unchanged();
                        (failover.primary().await?.client.clone(), Some(moved))
                    }
                };
                let mut pubsub = tokio::time::timeout(timeout, client.get_async_pubsub())
                    .await
                    .map_err(|_| RedisError::from((ErrorKind::Io, "no answer")))??;
                pubsub.subscribe(&channel).await?;
                backoff = Duration::from_millis(100);
                LOST.reset();
                // (Re)subscribed: events may have been missed meanwhile, so catch up now.
                match signal.upgrade() {
                    Some(s) => s.notify_one(),
                    None => return Ok(()),
                }
                let mut messages = pubsub.on_message();
                loop {
                    let moved_on = async {
                        match moved.as_mut() {
                            Some(m) => m.changed().await.is_ok(),
                            None => std::future::pending().await,
                        }
                    };
                    tokio::select! {
                        msg = futures_util::StreamExt::next(&mut messages) => {
                            if msg.is_none() {
                                break;
                            }
                            match signal.upgrade() {
                                Some(s) => s.notify_one(),
                                None => return Ok(()),
                            }
                        }
                        still = moved_on => {
                            if !still {
                                return Ok(());
                            }
                            // The primary moved: subscribe there.
                            return Err(RedisError::from((ErrorKind::Io, "the primary moved")));
                        }
                    }
                }
                Err(RedisError::from((ErrorKind::Io, "subscription closed")))
            }
            .await;
            if signal.strong_count() == 0 {
                return;
            }
            match result {
                Ok(()) => return,
                Err(e) if e.to_string().contains("the primary moved") => continue,
                Err(e) => {
                    at += 1;
                    if let Some(suppressed) = LOST.allow() {
                        tracing::warn!(error = %e, suppressed, "change subscription lost; resubscribing (polling continues)");
                    }
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    /// Checks the commands keygate runs directly; the first the ACL refuses, as `Denied`.
    async fn check_commands(&self) -> Result<(), StoreError> {
        let mut checks: Vec<(&str, &str, Cmd)> = vec![
            ("PING", "+@connection", redis::cmd("PING")),
            ("HELLO", "+@connection", redis::cmd("HELLO").arg(2).clone()),
            (
                "GET",
                "+@read",
                redis::cmd("GET").arg(self.named("seq")).clone(),
            ),
            (
                "HGETALL",
                "+@read",
                redis::cmd("HGETALL").arg(self.named("store")).clone(),
            ),
            (
                "HMGET",
                "+@read",
                redis::cmd("HMGET")
                    .arg(self.named("store"))
                    .arg("id")
                    .clone(),
            ),
            (
                "ZRANGE",
                "+@read",
                redis::cmd("ZRANGE")
                    .arg(self.named("all"))
                    .arg(0)
                    .arg(0)
                    .clone(),
            ),
            (
                "ZCOUNT",
                "+@read",
                redis::cmd("ZCOUNT")
                    .arg(self.named("active"))
                    .arg(0)
                    .arg(0)
                    .clone(),
            ),
            (
                "SCARD",
                "+@read",
                redis::cmd("SCARD").arg(self.named("legacy")).clone(),
            ),
            (
                "XRANGE",
                "+@read",
                redis::cmd("XRANGE")
                    .arg(self.named("changes"))
                    .arg("-")
                    .arg("+")
                    .arg("COUNT")
                    .arg(1)
                    .clone(),
            ),
        ];
        if self.settings.confirm_replicas > 0 {
            checks.push((
                "WAIT",
                "+@connection",
                redis::cmd("WAIT").arg(0).arg(0).clone(),
            ));
        }
        // One at a time: a cluster pipeline may not mix keyless commands with keyed ones.
        let mut conn = self.conn().await?;
        for (name, grant, cmd) in &checks {
            let result = self
                .within(Duration::ZERO, async {
                    Ok(cmd.query_async::<Value>(&mut conn).await)
                })
                .await?;
            match result {
                Err(e) if is_denied(&e) => return Err(self.denied(name, grant, &e.to_string())),
                Err(e) => return Err(self.error(e)),
                Ok(_) => {}
            }
        }
        let loaded = self
            .within(Duration::ZERO, async {
                Ok(self
                    .scripts
                    .probe
                    .prepare_invoke()
                    .load_async(&mut conn)
                    .await)
            })
            .await?;
        if let Err(e) = loaded
            && is_denied(&e)
        {
            return Err(self.denied("SCRIPT LOAD", "+@scripting", &e.to_string()));
        }
        Ok(())
    }

    fn denied(&self, command: &str, grant: &str, redis_says: &str) -> StoreError {
        let who = format!("{} refuses keygate's Redis user", self.display);
        let text = if redis_says.contains("access a key") || redis_says.contains("of the keys") {
            format!(
                "{who} its keys ({command}: {redis_says}): grant the key pattern ~{}*",
                &self.prefix[..self.prefix.len() - 1]
            )
        } else if redis_says.contains("channel") {
            format!(
                "{who} the channel {} ({command}: {redis_says}): grant &{}:*",
                self.channel, self.prefix
            )
        } else {
            let grant = grant.replace("{prefix}", &self.prefix);
            format!("{who} the command {command} ({redis_says}): grant {grant}")
        };
        StoreError::Denied(format!("{text}; docs/fleet.md has the complete ACL"))
    }

    /// The Sentinel primary's generation (0: not Sentinel, or none found yet).
    fn primary_generation(&self) -> u64 {
        self.failover
            .as_ref()
            .and_then(|f| f.current.load().as_ref().map(|p| p.generation))
            .unwrap_or(0)
    }

    /// The marker and the change counter, as the change feed reads them from position `since`:
    /// what the feed must report instead of changes, if anything (the store is lost, or a new
    /// marker is adopted: a gap).
    ///
    /// `primary` is the Sentinel primary's generation when the feed was read: a counter that
    /// went back across a failover is the new primary missing changes written to the old one
    /// after its replica was promoted. With confirmed writes those were never confirmed (the CLI
    /// said so), so the store is read as it is (a gap), not reported lost.
    fn judge(
        &self,
        marker: Option<Identity>,
        current: u64,
        since: u64,
        primary: u64,
    ) -> Option<Changes> {
        let Ok(mut seen) = self.seen.lock() else {
            return None;
        };
        let failed_over = std::mem::replace(&mut seen.primary, primary) != primary;
        match (&seen.marker, marker) {
            (Some(_), None) => {
                let reason = format!(
                    "the store's identity marker {} is gone: {} lost its data (restarted without \
                     persistence, flushed, or replaced by an empty server); unknown keys get 503 \
                     until the data is restored (`keygate keys import`) or accepted \
                     (`keygate store accept`)",
                    self.named("store"),
                    self.display
                );
                seen.lost = Some(reason.clone());
                Some(Changes::Lost { reason })
            }
            (Some(known), Some(m)) if *known != m => {
                tracing::warn!(
                    old_id = %known.id,
                    old_generation = known.generation,
                    id = %m.id,
                    generation = m.generation,
                    "the store's identity marker changed: adopting the store as it is now"
                );
                seen.marker = Some(m);
                seen.lost = None;
                Some(Changes::Gap { next: current })
            }
            (Some(_), Some(_)) => {
                if let Some(reason) = &seen.lost {
                    return Some(Changes::Lost {
                        reason: reason.clone(),
                    });
                }
                if current < since && failed_over && self.settings.confirm_replicas > 0 {
                    tracing::warn!(
                        from = since,
                        to = current,
                        "the new Redis primary misses the last changes made on the old one \
                         (written after its replica was promoted, and never confirmed): dropping \
                         every cached key decision"
                    );
                    return Some(Changes::Gap { next: current });
                }
                if current < since {
                    let reason = format!(
                        "the change counter {} went back from {since} to {current}: {} was \
                         rolled back (restored from an older copy, or failed over to a replica \
                         that missed changes); unknown keys get 503 until the data is checked \
                         and accepted (`keygate store accept`)",
                        self.named("seq"),
                        self.display
                    );
                    seen.lost = Some(reason.clone());
                    return Some(Changes::Lost { reason });
                }
                None
            }
            (None, m) => {
                // The store's first change (or the first read of it): from now on, a vanishing
                // marker means lost data.
                seen.marker = m;
                None
            }
        }
    }
}

/// Where [`RedisStore::subscribe_loop`] connects.
enum Subscription {
    /// One of these nodes, the next after each failure.
    Nodes(Vec<Client>),
    /// The current Sentinel primary.
    Primary(Weak<Failover>),
}

fn parse_record(
    digest: KeyDigest,
    fields: Vec<(String, String)>,
) -> Result<Option<KeyRecord>, StoreError> {
    if fields.is_empty() {
        return Ok(None);
    }
    let mut r = KeyRecord {
        id: String::new(),
        name: String::new(),
        digest,
        hint: String::new(),
        created_at: 0,
        last_used: None,
        use_count: 0,
        is_active: false,
        legacy: false,
        expires_at: None,
        policy: crate::policy::Policy::default(),
        rotated_to: None,
        owner: None,
    };
    let bad = |f: &str, v: &str| {
        StoreError::Corrupt(format!("field {f} = {v:?} of key {}", digest.to_hex()))
    };
    let int = |f: &str, v: &str| v.parse::<i64>().map_err(|_| bad(f, v));
    let opt = |f: &str, v: &str| {
        if v.is_empty() {
            Ok(None)
        } else {
            int(f, v).map(Some)
        }
    };
    for (f, v) in &fields {
        match f.as_str() {
            "id" => r.id.clone_from(v),
            "name" => r.name.clone_from(v),
            "hint" => r.hint.clone_from(v),
            "created_at" => r.created_at = int(f, v)?,
            "last_used" => r.last_used = opt(f, v)?.filter(|&t| t > 0),
            "use_count" => r.use_count = u64::try_from(int(f, v)?).unwrap_or(0),
            "is_active" => r.is_active = v == "1",
            "legacy" => r.legacy = v == "1",
            "expires_at" => r.expires_at = opt(f, v)?,
            "policy" => r.policy = serde_json::from_str(v).map_err(|_| bad(f, v))?,
            "rotated_to" => r.rotated_to = (!v.is_empty()).then(|| v.clone()),
            "owner" => r.owner = (!v.is_empty()).then(|| v.clone()),
            // Fields written by a newer keygate are ignored, not fatal.
            _ => {}
        }
    }
    Ok(Some(r))
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
            invocation
                .arg(&self.channel)
                .arg(CHANGE_LOG_KEEP)
                .arg(marker_id()?);
            match self.mutate::<i64>(&invocation).await? {
                (0, acked) => self.confirmed(acked),
                (code, _) => Err(conflict(code, &record)),
            }
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
            invocation
                .arg(&self.channel)
                .arg(CHANGE_LOG_KEEP)
                .arg(marker_id()?);
            let (code, acked): (i64, _) = self.mutate(&invocation).await?;
            if code != 0 {
                return Err(conflict(code, &old));
            }
            self.confirmed(acked)?;
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
            invocation
                .arg(&self.channel)
                .arg(CHANGE_LOG_KEEP)
                .arg(marker_id()?);
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
                .arg(u8::from(active))
                .arg(&self.channel)
                .arg(CHANGE_LOG_KEEP)
                .arg(marker_id()?);
            let (code, acked): (i64, _) = self.mutate(&invocation).await?;
            if code != 0 {
                return Err(StoreError::NotFound(id_or_name));
            }
            self.confirmed(acked)?;
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
            invocation
                .arg(record.digest.to_hex())
                .arg(&self.channel)
                .arg(CHANGE_LOG_KEEP)
                .arg(marker_id()?);
            let (code, acked): (i64, _) = self.mutate(&invocation).await?;
            if code != 0 {
                return Err(StoreError::NotFound(id_or_name));
            }
            self.confirmed(acked)?;
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
        Box::pin(async move {
            let mut pipe = redis::pipe();
            pipe.cmd("GET").arg(self.named("seq"));
            pipe.cmd("HMGET")
                .arg(self.named("store"))
                .arg("id")
                .arg("generation");
            let (seq, marker): (Option<u64>, Vec<Option<String>>) = self.pipe(&pipe).await?;
            let seq = seq.unwrap_or(0);
            let mut marker = parse_marker(&marker);
            if marker.is_none() && seq > 0 {
                // Changes without a marker: written by a keygate that wrote none.
                let fields: Vec<Option<String>> = self
                    .invoke(
                        self.scripts
                            .init
                            .key(self.named("store"))
                            .key(self.named("seq"))
                            .arg(marker_id()?),
                    )
                    .await?;
                marker = parse_marker(&fields);
            }
            if let Ok(mut seen) = self.seen.lock() {
                // The feed starts here: whatever the store holds now is what it is trusted as.
                *seen = Seen {
                    marker,
                    lost: None,
                    primary: self.primary_generation(),
                };
            }
            Ok(seq)
        })
    }

    fn changes_since(&self, since: u64) -> StoreFuture<'_, Changes> {
        Box::pin(async move {
            let mut pipe = redis::pipe();
            pipe.cmd("GET").arg(self.named("seq"));
            pipe.cmd("XRANGE")
                .arg(self.named("changes"))
                .arg(format!("{}-0", since.saturating_add(1)))
                .arg("+");
            pipe.cmd("HMGET")
                .arg(self.named("store"))
                .arg("id")
                .arg("generation");
            let primary = self.primary_generation();
            let (seq, entries, marker): (Option<u64>, Vec<StreamEntry>, Vec<Option<String>>) =
                self.pipe(&pipe).await?;
            let current = seq.unwrap_or(0);
            if let Some(verdict) = self.judge(parse_marker(&marker), current, since, primary) {
                return Ok(verdict);
            }
            if current < since {
                // The data was replaced (FLUSHALL, a fresh server): nothing cached can be trusted.
                return Ok(Changes::Gap { next: current });
            }
            if current == since {
                return Ok(Changes::Digests {
                    digests: Vec::new(),
                    next: since,
                });
            }
            let first = entries
                .first()
                .and_then(|(id, _)| id.split('-').next()?.parse::<u64>().ok());
            if first != Some(since + 1) {
                // The stream was trimmed past our position.
                return Ok(Changes::Gap { next: current });
            }
            let mut next = since;
            let mut digests = Vec::with_capacity(entries.len());
            for (id, fields) in entries {
                if let Some(seq) = id.split('-').next().and_then(|s| s.parse::<u64>().ok()) {
                    next = next.max(seq);
                }
                digests.extend(
                    fields
                        .iter()
                        .filter(|(f, _)| f == "d")
                        .filter_map(|(_, v)| KeyDigest::from_hex(v)),
                );
            }
            Ok(Changes::Digests { digests, next })
        })
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
        Box::pin(async move {
            self.check_commands().await?;
            // The commands the scripts run, tried inside a script on scratch keys.
            let denied: Vec<String> = self
                .invoke(
                    self.scripts
                        .probe
                        .key(self.key("probe", "h"))
                        .key(self.key("probe", "s"))
                        .key(self.key("probe", "z"))
                        .key(self.key("probe", "set"))
                        .key(self.key("probe", "x"))
                        .arg(&self.channel),
                )
                .await?;
            if let Some(first) = denied.first() {
                // "<command>\t<what Redis said>"
                let (name, says) = first.split_once('\t').unwrap_or((first, ""));
                let grant = SCRIPT_COMMANDS
                    .iter()
                    .find(|(command, _)| *command == name)
                    .map_or("it", |(_, grant)| grant);
                let says = says.split(" script:").next().unwrap_or(says).trim();
                return Err(self.denied(name, grant, &format!("inside a script: {says}")));
            }
            // The rate limiter's buckets are keys of their own: `{prefix:rl:...}`.
            let bucket = format!("{{{}:rl:probe}}", &self.prefix[1..self.prefix.len() - 1]);
            match self
                .invoke::<Vec<i64>>(self.scripts.gcra.key(bucket).arg(1).arg(1_000_000))
                .await
            {
                Err(StoreError::Denied(_)) => {
                    return Err(self.denied(
                        "the rate limiter's script",
                        "+time and the key pattern ~{prefix}*",
                        "refused on a rate-limit bucket key",
                    ));
                }
                Err(e) => return Err(e),
                Ok(_) => {}
            }
            // The change subscription.
            let client = match self.subscription()? {
                Subscription::Nodes(clients) => clients.into_iter().next(),
                Subscription::Primary(failover) => match failover.upgrade() {
                    Some(f) => Some(f.primary().await.map_err(|e| self.error(e))?.client.clone()),
                    None => None,
                },
            };
            if let Some(client) = client {
                let subscribed = self
                    .within(Duration::ZERO, async {
                        let mut pubsub =
                            client.get_async_pubsub().await.map_err(|e| self.error(e))?;
                        Ok(pubsub.subscribe(&self.channel).await)
                    })
                    .await?;
                if let Err(e) = subscribed
                    && is_denied(&e)
                {
                    return Err(self.denied(
                        "SUBSCRIBE",
                        "+@pubsub and the channel pattern &{prefix}:*",
                        &e.to_string(),
                    ));
                }
            }
            Ok(())
        })
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
