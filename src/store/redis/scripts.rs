//! The Lua scripts: every mutation as one atomic script (with the [`PRELUDE`] they share), the
//! rate limiter's GCRA, the identity marker's and the permission probe's; the keys and
//! arguments they take, and how they run (a mutation followed by `WAIT` when it must reach
//! replicas).

use std::time::Duration;

use redis::{ErrorKind, Script, ScriptInvocation, ServerErrorKind};

use super::RedisStore;
use crate::store::{KeyRecord, StoreError};

/// Every script the store runs, built once with the store.
pub(super) struct Scripts {
    pub(super) gcra: Script,
    pub(super) insert: Script,
    pub(super) import: Script,
    pub(super) rotate: Script,
    pub(super) set_active: Script,
    pub(super) delete: Script,
    pub(super) usage: Script,
    pub(super) init: Script,
    pub(super) accept: Script,
    pub(super) probe: Script,
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
pub(super) const SCRIPT_COMMANDS: &[(&str, &str)] = &[
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
    pub(super) fn new() -> Self {
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
pub(super) fn record_args(r: &KeyRecord) -> Result<[String; RECORD_ARGS], StoreError> {
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

pub(super) fn conflict(code: i64, r: &KeyRecord) -> StoreError {
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
pub(super) fn marker_id() -> Result<String, StoreError> {
    crate::key::random_base62(16)
        .map_err(|e| StoreError::Unavailable(format!("cannot draw a marker id: {e}")))
}

impl RedisStore {
    /// A record's own keys, in script order: record, id index, name index.
    pub(super) fn record_keys(&self, invocation: &mut ScriptInvocation<'_>, r: &KeyRecord) {
        invocation
            .key(self.rec_key(&r.digest))
            .key(self.key("id", &r.id))
            .key(self.key("name", &r.name));
    }

    /// The shared indexes, change feed and marker, in script order: all, active, legacy, seq,
    /// changes, store.
    pub(super) fn shared_keys(&self, invocation: &mut ScriptInvocation<'_>) {
        for name in ["all", "active", "legacy", "seq", "changes", "store"] {
            invocation.key(self.named(name));
        }
    }

    /// The change feed's arguments, in script order: the channel to publish on, how many
    /// changes the log keeps, and a fresh marker id.
    pub(super) fn change_args(
        &self,
        invocation: &mut ScriptInvocation<'_>,
    ) -> Result<(), StoreError> {
        invocation
            .arg(&self.channel)
            .arg(super::CHANGE_LOG_KEEP)
            .arg(marker_id()?);
        Ok(())
    }

    /// Runs a prepared script that changes nothing that needs confirming.
    pub(super) async fn invoke<T: redis::FromRedisValue>(
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
    pub(super) async fn mutate<T: redis::FromRedisValue>(
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

    /// Runs a change whose script answers 0 when it is made and another code when it is refused
    /// (`refused` names the error for that code); a change made is then held to
    /// `confirm_replicas` ([`Self::confirmed`]).
    pub(super) async fn mutate_checked(
        &self,
        invocation: &ScriptInvocation<'_>,
        refused: impl FnOnce(i64) -> StoreError,
    ) -> Result<(), StoreError> {
        match self.mutate::<i64>(invocation).await? {
            (0, acked) => self.confirmed(acked),
            (code, _) => Err(refused(code)),
        }
    }

    /// Whether a change made with `acked` replicas acknowledging it is confirmed.
    pub(super) fn confirmed(&self, acked: Option<u32>) -> Result<(), StoreError> {
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
}
