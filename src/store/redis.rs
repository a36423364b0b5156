//! Shared store for a fleet of gateways: Redis (a single server, or a Redis Cluster).
//!
//! Every keygate key carries the hash tag `{<prefix>}`, so all of them live in one cluster slot
//! and every mutation is one atomic Lua script: the record, the id and name indexes, the active
//! and legacy indexes, the change counter, the change stream and the pub/sub event change
//! together or not at all. The data is small (a few hundred bytes per key), so one slot is no
//! capacity limit; the cluster brings availability.
//!
//! Layout (`P` = `{keygate}`):
//! - `P:k:<digest hex>` hash: the record;
//! - `P:id:<id>`, `P:name:<name>` strings: digest of the key with that id or name;
//! - `P:all` sorted set of digests by creation time; `P:active` by expiry (`+inf`: none);
//!   `P:legacy` set of legacy digests;
//! - `P:seq` change counter; `P:changes` stream of `(seq, digest)` (trimmed to about
//!   [`CHANGE_LOG_KEEP`]); channel `P:changes` carries `"<seq> <digest>"` to subscribers.
//!
//! Connections reconnect by themselves: a single server through redis-rs's `ConnectionManager`, a
//! cluster through its cluster client. Nothing here waits longer than the caller's store timeout.

use std::sync::{Arc, Weak};
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Script, ScriptInvocation, Value};
use tokio::sync::{Notify, OnceCell};

use super::{Changes, KeyRecord, KeyStore, StoreError, StoreFuture, Usage, unix_now};
use crate::key::KeyDigest;
use crate::ratelimit::{Rate, Verdict};

/// Approximate number of change-stream entries kept.
pub const CHANGE_LOG_KEEP: u64 = 10_000;

/// One change-stream entry as XRANGE returns it: id and field/value pairs.
type StreamEntry = (String, Vec<(String, String)>);

/// Where the store lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// One server (or a proxy in front of several): `redis://` or `rediss://` URL.
    Single(String),
    /// Redis Cluster seed nodes.
    Cluster(Vec<String>),
}

/// One connection of either kind; both reconnect on their own.
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
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
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// Redis-backed [`KeyStore`].
pub struct RedisStore {
    target: Target,
    timeout: Duration,
    conn: OnceCell<Conn>,
    prefix: String,
    channel: String,
    scripts: Scripts,
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
}

/// Lua shared by the mutation scripts.
///
/// `log_change` bumps the counter, appends to the stream and publishes. `fields` reads the 13
/// record arguments starting at `i`; `conflict` and `put_record` check and write one record and
/// its indexes. A rotated (old) key is not in the name index: the name belongs to its successor.
const PRELUDE: &str = r#"
local function log_change(seq_key, stream_key, digest, channel, keep)
  local seq = redis.call('INCR', seq_key)
  redis.call('XADD', stream_key, 'MAXLEN', '~', keep, seq .. '-1', 'd', digest)
  redis.call('PUBLISH', channel, seq .. ' ' .. digest)
  return seq
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

impl Scripts {
    fn new() -> Self {
        // KEYS: rec, id, name, all, active, legacy, seq, changes; ARGV: record (13), channel, keep
        let insert = r#"
local f = fields(ARGV, 1)
local c = conflict(KEYS[1], KEYS[2], KEYS[3], f)
if c ~= 0 then return c end
put_record(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], f)
log_change(KEYS[7], KEYS[8], f.digest, ARGV[14], ARGV[15])
return 0
"#;
        // KEYS: all, active, legacy, seq, changes, then (rec, id, name) per record;
        // ARGV: channel, keep, then a record (13) per record. Checks everything, then writes:
        // all or nothing. Returns {0, imported} or {code, index of the failing record}.
        let import = r#"
local n = (#KEYS - 5) / 3
local skip, names, digests = {}, {}, {}
for i = 0, n - 1 do
  local f = fields(ARGV, 3 + i * 13)
  local rk, ik, nk = KEYS[6 + i * 3], KEYS[7 + i * 3], KEYS[8 + i * 3]
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
    local f = fields(ARGV, 3 + i * 13)
    put_record(KEYS[6 + i * 3], KEYS[7 + i * 3], KEYS[8 + i * 3], KEYS[1], KEYS[2], KEYS[3], f)
    log_change(KEYS[4], KEYS[5], f.digest, ARGV[1], ARGV[2])
    imported = imported + 1
  end
end
return {0, imported}
"#;
        // KEYS: old rec, new rec, new id, name, all, active, legacy, seq, changes;
        // ARGV: old digest, grace_until, successor record (13), channel, keep
        let rotate = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return 5 end
if (redis.call('HGET', KEYS[1], 'rotated_to') or '') ~= '' then return 4 end
local f = fields(ARGV, 3)
if redis.call('EXISTS', KEYS[2]) == 1 then return 2 end
if redis.call('EXISTS', KEYS[3]) == 1 then return 3 end
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
        // KEYS: rec, active, seq, changes; ARGV: digest, active (0/1), channel, keep
        let set_active = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return 1 end
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
        // KEYS: rec, id, name, all, active, legacy, seq, changes; ARGV: digest, channel, keep
        let delete = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return 1 end
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
        let with_prelude = |body: &str| Script::new(&format!("{PRELUDE}{body}"));
        Self {
            gcra: Script::new(gcra),
            insert: with_prelude(insert),
            import: with_prelude(import),
            rotate: with_prelude(rotate),
            set_active: with_prelude(set_active),
            delete: with_prelude(delete),
            usage: Script::new(usage),
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

fn unavailable(e: redis::RedisError) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn opt_i64(v: Option<i64>) -> String {
    v.map(|n| n.to_string()).unwrap_or_default()
}

impl RedisStore {
    /// A store at `target` with keys under `{prefix}`. Connects lazily: the gateway starts (and
    /// reports the store down) while Redis is unreachable.
    pub fn new(target: Target, prefix: &str, timeout: Duration) -> Result<Self, StoreError> {
        let check = |url: &str| {
            redis::Client::open(url)
                .map(|_| ())
                .map_err(|e| StoreError::Unavailable(format!("invalid Redis URL: {e}")))
        };
        match &target {
            Target::Single(url) => check(url)?,
            Target::Cluster(nodes) => nodes.iter().try_for_each(|n| check(n))?,
        }
        let tag = format!("{{{prefix}}}");
        Ok(Self {
            target,
            timeout,
            conn: OnceCell::new(),
            channel: format!("{tag}:changes"),
            prefix: tag,
            scripts: Scripts::new(),
        })
    }

    async fn connect(&self) -> Result<Conn, StoreError> {
        match &self.target {
            Target::Single(url) => {
                let client = redis::Client::open(url.as_str()).map_err(unavailable)?;
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(self.timeout))
                    .set_response_timeout(Some(self.timeout))
                    .set_min_delay(Duration::from_millis(50))
                    .set_max_delay(Duration::from_millis(500))
                    .set_number_of_retries(2);
                let manager =
                    ConnectionManager::new_lazy_with_config(client, config).map_err(unavailable)?;
                Ok(Conn::Single(manager))
            }
            Target::Cluster(nodes) => {
                let client = redis::cluster::ClusterClient::builder(nodes.clone())
                    .connection_timeout(self.timeout)
                    .response_timeout(self.timeout)
                    .retries(2)
                    .build()
                    .map_err(unavailable)?;
                let conn = tokio::time::timeout(self.timeout, client.get_async_connection())
                    .await
                    .map_err(|_| StoreError::Unavailable("Redis Cluster unreachable".into()))?
                    .map_err(unavailable)?;
                Ok(Conn::Cluster(conn))
            }
        }
    }

    async fn conn(&self) -> Result<Conn, StoreError> {
        self.conn.get_or_try_init(|| self.connect()).await.cloned()
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
        match cmd.query_async(&mut conn).await {
            Err(e) if e.is_connection_dropped() || e.is_io_error() => {
                cmd.query_async(&mut conn).await.map_err(unavailable)
            }
            other => other.map_err(unavailable),
        }
    }

    /// A record's own keys, in script order: record, id index, name index.
    fn record_keys(&self, invocation: &mut ScriptInvocation<'_>, r: &KeyRecord) {
        invocation
            .key(self.rec_key(&r.digest))
            .key(self.key("id", &r.id))
            .key(self.key("name", &r.name));
    }

    /// The shared indexes and change feed, in script order: all, active, legacy, seq, changes.
    fn shared_keys(&self, invocation: &mut ScriptInvocation<'_>) {
        for name in ["all", "active", "legacy", "seq", "changes"] {
            invocation.key(self.named(name));
        }
    }

    /// Runs a prepared script.
    async fn invoke<T: redis::FromRedisValue>(
        &self,
        invocation: &ScriptInvocation<'_>,
    ) -> Result<T, StoreError> {
        let mut conn = self.conn().await?;
        invocation
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)
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

    async fn subscribe_loop(target: Target, channel: String, signal: Weak<Notify>) {
        let url = match &target {
            Target::Single(url) => url.clone(),
            // PUBLISH reaches every node of a cluster: any seed node will do.
            Target::Cluster(nodes) => nodes.first().cloned().unwrap_or_default(),
        };
        let mut backoff = Duration::from_millis(100);
        loop {
            let result: Result<(), redis::RedisError> = async {
                let client = redis::Client::open(url.as_str())?;
                let mut pubsub = client.get_async_pubsub().await?;
                pubsub.subscribe(&channel).await?;
                backoff = Duration::from_millis(100);
                // (Re)subscribed: events may have been missed meanwhile, so catch up now.
                match signal.upgrade() {
                    Some(s) => s.notify_one(),
                    None => return Ok(()),
                }
                let mut messages = pubsub.on_message();
                while let Some(_msg) = futures_util::StreamExt::next(&mut messages).await {
                    match signal.upgrade() {
                        Some(s) => s.notify_one(),
                        None => return Ok(()),
                    }
                }
                Err(redis::RedisError::from((
                    redis::ErrorKind::Io,
                    "subscription closed",
                )))
            }
            .await;
            if signal.strong_count() == 0 {
                return;
            }
            if let Err(e) = result {
                tracing::warn!(error = %e, "change subscription lost; resubscribing (polling continues)");
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }
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
        Box::pin(self.record(digest))
    }

    fn lookup_many(&self, digests: Vec<KeyDigest>) -> StoreFuture<'_, Vec<Option<KeyRecord>>> {
        Box::pin(async move {
            if digests.is_empty() {
                return Ok(Vec::new());
            }
            // One round trip for the lot.
            let mut pipe = redis::pipe();
            for digest in &digests {
                pipe.cmd("HGETALL").arg(self.rec_key(digest));
            }
            let mut conn = self.conn().await?;
            let all: Vec<Vec<(String, String)>> =
                pipe.query_async(&mut conn).await.map_err(unavailable)?;
            digests
                .into_iter()
                .zip(all)
                .map(|(digest, fields)| parse_record(digest, fields))
                .collect()
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
            invocation.arg(&self.channel).arg(CHANGE_LOG_KEEP);
            match self.invoke::<i64>(&invocation).await? {
                0 => Ok(()),
                code => Err(conflict(code, &record)),
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
            invocation.arg(&self.channel).arg(CHANGE_LOG_KEEP);
            let code: i64 = self.invoke(&invocation).await?;
            if code != 0 {
                return Err(conflict(code, &old));
            }
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
            invocation.arg(&self.channel).arg(CHANGE_LOG_KEEP);
            for r in &records {
                self.record_keys(&mut invocation, r);
                for a in record_args(r)? {
                    invocation.arg(a);
                }
            }
            let reply: Vec<i64> = self.invoke(&invocation).await?;
            match reply.as_slice() {
                [0, imported] => {
                    let imported = usize::try_from(*imported).unwrap_or(0);
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
            let mut conn = self.conn().await?;
            let rows: Vec<Vec<(String, String)>> =
                pipe.query_async(&mut conn).await.map_err(unavailable)?;
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
            let mut conn = self.conn().await?;
            let code: i64 = self
                .scripts
                .set_active
                .key(self.rec_key(&record.digest))
                .key(self.named("active"))
                .key(self.named("seq"))
                .key(self.named("changes"))
                .arg(record.digest.to_hex())
                .arg(u8::from(active))
                .arg(&self.channel)
                .arg(CHANGE_LOG_KEEP)
                .invoke_async(&mut conn)
                .await
                .map_err(unavailable)?;
            if code != 0 {
                return Err(StoreError::NotFound(id_or_name));
            }
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
                .arg(CHANGE_LOG_KEEP);
            let code: i64 = self.invoke(&invocation).await?;
            if code != 0 {
                return Err(StoreError::NotFound(id_or_name));
            }
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
            let mut conn = self.conn().await?;
            let _: i64 = invocation
                .invoke_async(&mut conn)
                .await
                .map_err(unavailable)?;
            Ok(())
        })
    }

    fn change_position(&self) -> StoreFuture<'_, u64> {
        Box::pin(async move {
            let seq: Option<u64> = self.query(redis::cmd("GET").arg(self.named("seq"))).await?;
            Ok(seq.unwrap_or(0))
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
            let mut conn = self.conn().await?;
            let (seq, entries): (Option<u64>, Vec<StreamEntry>) =
                pipe.query_async(&mut conn).await.map_err(unavailable)?;
            let current = seq.unwrap_or(0);
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
            let mut conn = self.conn().await?;
            let reply: Vec<i64> = self
                .scripts
                .gcra
                .key(bucket)
                .arg(interval)
                .arg(rate.count)
                .invoke_async(&mut conn)
                .await
                .map_err(unavailable)?;
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
        let notify = Arc::new(Notify::new());
        tokio::spawn(Self::subscribe_loop(
            self.target.clone(),
            self.channel.clone(),
            Arc::downgrade(&notify),
        ));
        Some(notify)
    }
}
