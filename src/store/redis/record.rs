//! A key record as Redis holds it (a hash), read back: by digest for the gateway's cache, with
//! the identity marker in the same round trip, and by id or name for the CLI.

use redis::Value;

use super::RedisStore;
use crate::key::KeyDigest;
use crate::store::{KeyRecord, StoreError};

impl RedisStore {
    /// Reads records for the gateway's cache, with the identity marker in the same round trip
    /// once the change feed has seen one: a store whose marker is gone (or another) since the
    /// feed last read it answers nothing, so a key is never found missing in a store that lost
    /// its data between two polls of the feed.
    pub(super) async fn lookup_records(
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

    pub(super) async fn find_record(&self, id_or_name: &str) -> Result<KeyRecord, StoreError> {
        let digest = self.resolve(id_or_name).await?;
        self.record(digest)
            .await?
            .ok_or_else(|| StoreError::NotFound(id_or_name.to_owned()))
    }
}

/// A record from its hash's fields; `None` when the hash is empty (no such key).
pub(super) fn parse_record(
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
