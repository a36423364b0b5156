//! Embedded store: one SQLite file in WAL mode, shared safely by the running gateway and the CLI.
//!
//! Every mutation appends the affected digest to a `changes` table in the same transaction (triggers
//! on `api_keys` do it, so edits made outside keygate are included; the usage columns fire none); the
//! gateway polls that table (one indexed read) and evicts exactly those digests from its cache. The
//! feed is trimmed to its last [`CHANGE_LOG_KEEP`] entries; a gateway that fell further behind sees
//! a gap and drops its whole cache.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, params};

use super::{Changes, KeyRecord, KeyStore, StoreError, StoreFuture, Usage, unix_now};
use crate::key::KeyDigest;

/// How many change-feed entries are kept.
pub const CHANGE_LOG_KEEP: i64 = 10_000;
const SCHEMA_VERSION: i64 = 3;

/// The keys table of schema v3. Names are unique among current keys only: a rotated key keeps its
/// name (so the upstream sees the same `X-Api-Key-Name` during the grace period) beside its
/// successor.
macro_rules! api_keys_table {
    () => {
        "CREATE TABLE IF NOT EXISTS api_keys (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    digest      BLOB NOT NULL UNIQUE,
    hint        TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    last_used   INTEGER,
    use_count   INTEGER NOT NULL DEFAULT 0,
    is_active   INTEGER NOT NULL,
    legacy      INTEGER NOT NULL DEFAULT 0,
    expires_at  INTEGER,
    policy      TEXT NOT NULL DEFAULT '{}',
    rotated_to  TEXT,
    owner       TEXT
);
"
    };
}

/// Schema v3.
const SCHEMA: &str = concat!(
    api_keys_table!(),
    "CREATE UNIQUE INDEX IF NOT EXISTS api_keys_current_name ON api_keys (name) WHERE rotated_to IS NULL;
CREATE TABLE IF NOT EXISTS changes (
    seq     INTEGER PRIMARY KEY AUTOINCREMENT,
    digest  BLOB NOT NULL,
    at      INTEGER NOT NULL
);
CREATE TRIGGER IF NOT EXISTS api_keys_changed_insert AFTER INSERT ON api_keys
BEGIN
    INSERT INTO changes (digest, at) VALUES (NEW.digest, unixepoch());
END;
CREATE TRIGGER IF NOT EXISTS api_keys_changed_update
AFTER UPDATE OF id, name, digest, hint, created_at, is_active, legacy, expires_at, policy, rotated_to,
    owner
ON api_keys
BEGIN
    INSERT INTO changes (digest, at) VALUES (OLD.digest, unixepoch());
    INSERT INTO changes (digest, at) SELECT NEW.digest, unixepoch() WHERE NEW.digest != OLD.digest;
END;
CREATE TRIGGER IF NOT EXISTS api_keys_changed_delete AFTER DELETE ON api_keys
BEGIN
    INSERT INTO changes (digest, at) VALUES (OLD.digest, unixepoch());
END;
"
);

/// v1 → v2: v1 declared `name UNIQUE` on the column, which SQLite cannot drop in place.
const MIGRATE_V1: &str = concat!(
    "ALTER TABLE api_keys RENAME TO api_keys_v1;\n",
    api_keys_table!(),
    "INSERT INTO api_keys (id, name, digest, hint, created_at, last_used, use_count, is_active, legacy, expires_at)
    SELECT id, name, digest, hint, created_at, last_used, use_count, is_active, legacy, expires_at FROM api_keys_v1;
DROP TABLE api_keys_v1;
"
);

/// v2 → v3: the owner column, and the update trigger again so that it fires on an owner change
/// too (`SCHEMA` creates it).
const MIGRATE_V2: &str = "ALTER TABLE api_keys ADD COLUMN owner TEXT;
DROP TRIGGER IF EXISTS api_keys_changed_update;
";

const COLUMNS: &str = "id, name, digest, hint, created_at, last_used, use_count, is_active, legacy, \
     expires_at, policy, rotated_to, owner";

/// SQLite-backed [`KeyStore`].
#[derive(Clone)]
pub struct SqliteStore {
    // Two connections: one for writes, and one for reads (lookups on a miss, the health check's
    // count, the change feed's polls). In WAL mode a reader never waits for a writer, so a usage
    // flush of 100,000 keys (a transaction of a few hundred ms) cannot stall requests; the load
    // benchmark's 100,000-key store showed p99 of 300-540 ms before. Nor can it hold up the
    // change feed's poll: a poll waiting on the flush for more than two intervals withdrew the
    // feed's confirmation, and every request for a key past `positive_ttl` then read the store.
    // Calls run on tokio's blocking pool, and no mutex is held across an `.await`.
    conn: Arc<Mutex<Connection>>,
    reader: Arc<Mutex<Connection>>,
    path: PathBuf,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .finish()
    }
}

fn unavailable(e: rusqlite::Error) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

impl SqliteStore {
    /// Opens the database at `path` in WAL mode, creating the file (not its directory) if
    /// needed.
    pub fn open(path: &Path, busy_timeout: Duration) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
            && !dir.is_dir()
        {
            return Err(StoreError::Unavailable(format!(
                "cannot open {}: directory {} does not exist",
                path.display(),
                dir.display()
            )));
        }
        let mut conn = Connection::open(path)
            .map_err(|e| StoreError::Unavailable(format!("cannot open {}: {e}", path.display())))?;
        conn.busy_timeout(busy_timeout).map_err(unavailable)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(unavailable)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(unavailable)?;
        // A usage flush updates one row per key used since the last flush: with 100,000 keys in
        // use, SQLite's default 2 MB page cache spills mid-transaction. Pages are allocated
        // only as they are used, so a small store never grows to this.
        conn.pragma_update(None, "cache_size", -16_384)
            .map_err(unavailable)?;
        // One immediate transaction: a CLI and a gateway opening the same old database at once
        // migrate it once, and a crash mid-migration leaves the old schema whole.
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(unavailable)?;
        let version: i64 = tx
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(unavailable)?;
        if version > SCHEMA_VERSION {
            return Err(StoreError::Corrupt(format!(
                "{} has schema version {version}; this keygate understands up to {SCHEMA_VERSION}",
                path.display()
            )));
        }
        // v1 is rebuilt as the current table (owner included); v2 gains the owner column.
        match version {
            1 => tx.execute_batch(MIGRATE_V1).map_err(unavailable)?,
            2 => tx.execute_batch(MIGRATE_V2).map_err(unavailable)?,
            _ => {}
        }
        tx.execute_batch(SCHEMA).map_err(unavailable)?;
        if version != SCHEMA_VERSION {
            tx.pragma_update(None, "user_version", SCHEMA_VERSION)
                .map_err(unavailable)?;
        }
        tx.commit().map_err(unavailable)?;
        let reader = Connection::open_with_flags(
            path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| StoreError::Unavailable(format!("cannot open {}: {e}", path.display())))?;
        reader.busy_timeout(busy_timeout).map_err(unavailable)?;
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
            reader: Arc::new(Mutex::new(reader)),
            path: path.to_owned(),
        })
    }

    /// Opens the existing database at `path` (never creating it) as `open` would, checks its
    /// schema version, and counts its keys: for `check-config`.
    pub fn inspect(path: &Path) -> Result<u64, StoreError> {
        let conn = Connection::open_with_flags(
            path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| StoreError::Unavailable(format!("cannot open {}: {e}", path.display())))?;
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(|e| StoreError::Unavailable(format!("cannot read {}: {e}", path.display())))?;
        if version > SCHEMA_VERSION {
            return Err(StoreError::Corrupt(format!(
                "{} has schema version {version}; this keygate understands up to {SCHEMA_VERSION}",
                path.display()
            )));
        }
        let has_keys: bool = conn
            .query_row(
                "SELECT count(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = 'api_keys'",
                [],
                |r| r.get(0),
            )
            .map_err(unavailable)?;
        if !has_keys {
            return Ok(0);
        }
        let keys: i64 = conn
            .query_row("SELECT count(*) FROM api_keys", [], |r| r.get(0))
            .map_err(unavailable)?;
        Ok(u64::try_from(keys).unwrap_or(0))
    }

    /// Runs `f` with the connection on the blocking pool.
    fn with_conn<T, F>(&self, f: F) -> StoreFuture<'_, T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    {
        Self::on(&self.conn, f)
    }

    /// Runs a read `f` with the read-only connection on the blocking pool.
    fn with_reader<T, F>(&self, f: F) -> StoreFuture<'_, T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    {
        Self::on(&self.reader, f)
    }

    fn on<T, F>(conn: &Arc<Mutex<Connection>>, f: F) -> StoreFuture<'static, T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let conn = Arc::clone(conn);
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                let mut guard = conn
                    .lock()
                    .map_err(|_| StoreError::Unavailable("store connection poisoned".into()))?;
                f(&mut guard)
            })
            .await
            .map_err(|e| StoreError::Unavailable(format!("store task failed: {e}")))?
        })
    }
}

/// The record with each digest, in order.
fn lookup_in(
    conn: &Connection,
    digests: &[KeyDigest],
) -> Result<Vec<Option<KeyRecord>>, StoreError> {
    let mut stmt = conn
        .prepare_cached(&format!("SELECT {COLUMNS} FROM api_keys WHERE digest = ?1"))
        .map_err(unavailable)?;
    digests
        .iter()
        .map(|digest| {
            stmt.query_row(params![&digest.0[..]], row_to_record)
                .optional()
                .map_err(unavailable)
        })
        .collect()
}

fn row_to_record(row: &rusqlite::Row<'_>) -> rusqlite::Result<KeyRecord> {
    let digest: Vec<u8> = row.get(2)?;
    let digest: [u8; 32] = digest.try_into().map_err(|_| {
        rusqlite::Error::FromSqlConversionFailure(
            2,
            rusqlite::types::Type::Blob,
            "digest is not 32 bytes".into(),
        )
    })?;
    Ok(KeyRecord {
        id: row.get(0)?,
        name: row.get(1)?,
        digest: KeyDigest(digest),
        hint: row.get(3)?,
        created_at: row.get(4)?,
        last_used: row.get(5)?,
        use_count: u64::try_from(row.get::<_, i64>(6)?).unwrap_or(0),
        is_active: row.get(7)?,
        legacy: row.get(8)?,
        expires_at: row.get(9)?,
        policy: serde_json::from_str(&row.get::<_, String>(10)?).map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(10, rusqlite::types::Type::Text, e.into())
        })?,
        rotated_to: row.get(11)?,
        owner: row.get(12)?,
    })
}

fn find_in(conn: &Connection, id_or_name: &str) -> Result<KeyRecord, StoreError> {
    // By id any key; by name only the current one (a rotated key shares its successor's name).
    let by = |condition: &str| {
        conn.query_row(
            &format!("SELECT {COLUMNS} FROM api_keys WHERE {condition}"),
            params![id_or_name],
            row_to_record,
        )
        .optional()
        .map_err(unavailable)
    };
    match by("id = ?1")? {
        Some(r) => Ok(r),
        None => by("name = ?1 AND rotated_to IS NULL")?
            .ok_or_else(|| StoreError::NotFound(id_or_name.to_owned())),
    }
}

/// Inserts one record inside `tx`, mapping constraint violations to `Conflict`.
fn insert_in(tx: &rusqlite::Transaction<'_>, record: &KeyRecord) -> Result<(), StoreError> {
    let policy = serde_json::to_string(&record.policy)
        .map_err(|e| StoreError::Corrupt(format!("policy of {}: {e}", record.name)))?;
    let inserted = tx.execute(
        &format!("INSERT INTO api_keys ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)"),
        params![
            record.id,
            record.name,
            &record.digest.0[..],
            record.hint,
            record.created_at,
            record.last_used,
            i64::try_from(record.use_count).unwrap_or(i64::MAX),
            record.is_active,
            record.legacy,
            record.expires_at,
            policy,
            record.rotated_to,
            record.owner,
        ],
    );
    match inserted {
        Ok(_) => trim_changes(tx),
        Err(rusqlite::Error::SqliteFailure(e, _))
            if e.code == rusqlite::ErrorCode::ConstraintViolation =>
        {
            Err(StoreError::Conflict(record.name.clone()))
        }
        Err(e) => Err(unavailable(e)),
    }
}

/// Trims the change feed after a mutation. The feed itself is written by triggers on `api_keys`,
/// in the mutation's transaction, so an edit made outside keygate (the `sqlite3` shell) reaches
/// running gateways within a poll interval too; the usage columns fire no trigger.
fn trim_changes(tx: &rusqlite::Transaction<'_>) -> Result<(), StoreError> {
    tx.execute(
        "DELETE FROM changes WHERE seq <= (SELECT max(seq) FROM changes) - ?1",
        params![CHANGE_LOG_KEEP],
    )
    .map_err(unavailable)?;
    Ok(())
}

impl KeyStore for SqliteStore {
    fn lookup(&self, digest: KeyDigest) -> StoreFuture<'_, Option<KeyRecord>> {
        self.with_reader(move |conn| Ok(lookup_in(conn, &[digest])?.pop().flatten()))
    }

    fn lookup_many(&self, digests: Vec<KeyDigest>) -> StoreFuture<'_, Vec<Option<KeyRecord>>> {
        // One blocking task and one prepared statement for the lot.
        self.with_reader(move |conn| lookup_in(conn, &digests))
    }

    fn insert(&self, record: KeyRecord) -> StoreFuture<'_, ()> {
        self.with_conn(move |conn| {
            let tx = conn.transaction().map_err(unavailable)?;
            insert_in(&tx, &record)?;
            tx.commit().map_err(unavailable)
        })
    }

    fn rotate(
        &self,
        id_or_name: &str,
        successor: KeyRecord,
        grace_until: i64,
    ) -> StoreFuture<'_, KeyRecord> {
        let id_or_name = id_or_name.to_owned();
        self.with_conn(move |conn| {
            let tx = conn.transaction().map_err(unavailable)?;
            let mut old = find_in(&tx, &id_or_name)?;
            if old.rotated_to.is_some() {
                return Err(StoreError::Conflict(format!(
                    "{} (already rotated)",
                    old.name
                )));
            }
            old.rotated_to = Some(successor.id.clone());
            old.expires_at = Some(old.expires_at.map_or(grace_until, |e| e.min(grace_until)));
            tx.execute(
                "UPDATE api_keys SET rotated_to = ?2, expires_at = ?3 WHERE id = ?1",
                params![old.id, old.rotated_to, old.expires_at],
            )
            .map_err(unavailable)?;
            // The successor's insert trims the feed once for both rows.
            insert_in(&tx, &successor)?;
            tx.commit().map_err(unavailable)?;
            Ok(old)
        })
    }

    fn import(&self, records: Vec<KeyRecord>) -> StoreFuture<'_, (usize, usize)> {
        self.with_conn(move |conn| {
            let tx = conn.transaction().map_err(unavailable)?;
            let (mut imported, mut skipped) = (0, 0);
            for record in &records {
                let exists: bool = tx
                    .query_row(
                        "SELECT EXISTS (SELECT 1 FROM api_keys WHERE digest = ?1)",
                        params![&record.digest.0[..]],
                        |r| r.get(0),
                    )
                    .map_err(unavailable)?;
                if exists {
                    skipped += 1;
                } else {
                    // Any error rolls the whole transaction back: nothing is half-imported.
                    insert_in(&tx, record)?;
                    imported += 1;
                }
            }
            tx.commit().map_err(unavailable)?;
            Ok((imported, skipped))
        })
    }

    fn list(&self) -> StoreFuture<'_, Vec<KeyRecord>> {
        self.with_conn(|conn| {
            let mut stmt = conn
                .prepare(&format!(
                    "SELECT {COLUMNS} FROM api_keys ORDER BY created_at, name, id"
                ))
                .map_err(unavailable)?;
            let rows = stmt.query_map([], row_to_record).map_err(unavailable)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(unavailable)
        })
    }

    fn find(&self, id_or_name: &str) -> StoreFuture<'_, KeyRecord> {
        let id_or_name = id_or_name.to_owned();
        self.with_conn(move |conn| find_in(conn, &id_or_name))
    }

    fn set_active(&self, id_or_name: &str, active: bool) -> StoreFuture<'_, KeyRecord> {
        let id_or_name = id_or_name.to_owned();
        self.with_conn(move |conn| {
            let tx = conn.transaction().map_err(unavailable)?;
            let mut record = find_in(&tx, &id_or_name)?;
            tx.execute(
                "UPDATE api_keys SET is_active = ?2 WHERE id = ?1",
                params![record.id, active],
            )
            .map_err(unavailable)?;
            trim_changes(&tx)?;
            tx.commit().map_err(unavailable)?;
            record.is_active = active;
            Ok(record)
        })
    }

    fn delete(&self, id_or_name: &str) -> StoreFuture<'_, KeyRecord> {
        let id_or_name = id_or_name.to_owned();
        self.with_conn(move |conn| {
            let tx = conn.transaction().map_err(unavailable)?;
            let record = find_in(&tx, &id_or_name)?;
            tx.execute("DELETE FROM api_keys WHERE id = ?1", params![record.id])
                .map_err(unavailable)?;
            trim_changes(&tx)?;
            tx.commit().map_err(unavailable)?;
            Ok(record)
        })
    }

    fn count_active(&self) -> StoreFuture<'_, u64> {
        self.with_reader(|conn| {
            conn.query_row(
                "SELECT count(*) FROM api_keys
                 WHERE is_active AND (expires_at IS NULL OR expires_at > ?1)",
                params![unix_now()],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| u64::try_from(n).unwrap_or(0))
            .map_err(unavailable)
        })
    }

    fn has_legacy(&self) -> StoreFuture<'_, bool> {
        self.with_reader(|conn| {
            conn.query_row(
                "SELECT EXISTS (SELECT 1 FROM api_keys WHERE legacy)",
                [],
                |r| r.get(0),
            )
            .map_err(unavailable)
        })
    }

    fn record_usage(&self, mut batch: Vec<Usage>) -> StoreFuture<'_, ()> {
        // In key order, the updates walk the id index and the table in order: each page is read
        // and dirtied once per flush instead of once per key.
        batch.sort_unstable_by(|a, b| a.id.cmp(&b.id));
        self.with_conn(move |conn| {
            let tx = conn.transaction().map_err(unavailable)?;
            {
                let mut stmt = tx
                    .prepare_cached(
                        "UPDATE api_keys
                         SET last_used = max(coalesce(last_used, 0), ?2),
                             use_count = use_count + ?3
                         WHERE id = ?1",
                    )
                    .map_err(unavailable)?;
                for u in &batch {
                    stmt.execute(params![
                        u.id,
                        u.last_used,
                        i64::try_from(u.count).unwrap_or(i64::MAX)
                    ])
                    .map_err(unavailable)?;
                }
            }
            tx.commit().map_err(unavailable)
        })
    }

    fn change_position(&self) -> StoreFuture<'_, u64> {
        self.with_reader(|conn| {
            conn.query_row("SELECT coalesce(max(seq), 0) FROM changes", [], |r| {
                r.get::<_, i64>(0)
            })
            .map(|n| u64::try_from(n).unwrap_or(0))
            .map_err(unavailable)
        })
    }

    fn changes_since(&self, since: u64) -> StoreFuture<'_, Changes> {
        self.with_reader(move |conn| {
            let since_i = i64::try_from(since).unwrap_or(i64::MAX);
            let mut stmt = conn
                .prepare_cached("SELECT seq, digest FROM changes WHERE seq > ?1 ORDER BY seq")
                .map_err(unavailable)?;
            let rows = stmt
                .query_map(params![since_i], |r| {
                    Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?))
                })
                .map_err(unavailable)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(unavailable)?;
            let Some(&(first, _)) = rows.first() else {
                let current: i64 = conn
                    .query_row("SELECT coalesce(max(seq), 0) FROM changes", [], |r| {
                        r.get(0)
                    })
                    .map_err(unavailable)?;
                if current < since_i {
                    // The database was replaced by an older or different one.
                    return Ok(Changes::Gap {
                        next: u64::try_from(current).unwrap_or(0),
                    });
                }
                return Ok(Changes::Digests {
                    digests: Vec::new(),
                    next: since,
                });
            };
            let next = rows
                .last()
                .map_or(since, |(seq, _)| u64::try_from(*seq).unwrap_or(since));
            if first > since_i + 1 {
                // Entries between `since` and `first` were trimmed (or the database was replaced).
                return Ok(Changes::Gap { next });
            }
            let digests = rows
                .into_iter()
                .filter_map(|(_, d)| <[u8; 32]>::try_from(d).ok().map(KeyDigest))
                .collect();
            Ok(Changes::Digests { digests, next })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A usage flush holds the write connection for its whole transaction (a few hundred ms with
    /// 100,000 keys in use). The change feed's polls and the reads a request or the health check
    /// waits on use the read connection, and finish while the write connection is held. (The
    /// timeout only turns a wait that never ends into a failure.)
    #[tokio::test]
    async fn reads_and_the_change_feed_never_wait_for_the_write_connection() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("k.db"), Duration::from_secs(5)).unwrap();
        let writer = Arc::clone(&store.conn);
        let (held_tx, held) = std::sync::mpsc::channel();
        let (release, release_rx) = std::sync::mpsc::channel::<()>();
        let holder = std::thread::spawn(move || {
            let _flushing = writer.lock().unwrap();
            held_tx.send(()).unwrap();
            let _ = release_rx.recv();
        });
        held.recv().unwrap();

        assert_eq!(unblocked(store.change_position()).await, 0);
        let changes = unblocked(store.changes_since(0)).await;
        assert!(matches!(changes, Changes::Digests { ref digests, next: 0 } if digests.is_empty()));
        assert!(!unblocked(store.has_legacy()).await);
        assert_eq!(unblocked(store.count_active()).await, 0);
        let unknown = KeyDigest::of(b"sk_unknown");
        assert!(unblocked(store.lookup(unknown)).await.is_none());

        release.send(()).unwrap();
        holder.join().unwrap();
    }

    async fn unblocked<T>(call: StoreFuture<'_, T>) -> T {
        tokio::time::timeout(Duration::from_secs(10), call)
            .await
            .expect("waited for the write connection")
            .unwrap()
    }
}
