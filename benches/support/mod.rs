//! The authentication set-up shared by `benches/auth.rs` (criterion, time) and
//! `examples/hotpath.rs` (callgrind, instructions): a SQLite store holding one freshly minted key
//! (and, for the large-store bench, many more), with the cache and authenticator the gateway would
//! put in front of it.

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderValue};
use keygate::auth::Authenticator;
use keygate::cache::KeyCache;
use keygate::config::FileConfig;
use keygate::key;
use keygate::metrics::Metrics;
use keygate::store::sqlite::SqliteStore;
use keygate::store::{KeyRecord, KeyStore as _};

/// One stored key and what authenticates against it.
pub struct AuthFixture {
    /// Keeps the SQLite file alive.
    _dir: tempfile::TempDir,
    pub cache: Arc<KeyCache>,
    pub auth: Authenticator,
    /// The stored key.
    pub valid: String,
    /// The stored key with one character changed: fails its checksum.
    pub typo: String,
    store: Arc<SqliteStore>,
}

impl AuthFixture {
    /// Sets up the store on `rt` (which must also run the cache's calls).
    pub fn new(rt: &tokio::runtime::Runtime) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = FileConfig::default().validate().unwrap();
        let store = Arc::new(
            SqliteStore::open(&dir.path().join("auth.db"), Duration::from_secs(5)).unwrap(),
        );
        let secret = key::generate().unwrap();
        rt.block_on(store.insert(KeyRecord::new("bench", &secret, 0, None).unwrap()))
            .unwrap();
        let metrics = Arc::new(Metrics::new(&config.metrics.latency_buckets));
        let valid = secret.expose().to_owned();
        let mut typo = valid.clone().into_bytes();
        typo[10] = if typo[10] == b'a' { b'b' } else { b'a' };
        Self {
            _dir: dir,
            cache: Arc::new(KeyCache::new(store.clone(), &config.store, metrics)),
            auth: Authenticator::new(&config.auth),
            valid,
            typo: String::from_utf8(typo).unwrap(),
            store,
        }
    }

    /// Stores `n` more keys (one transaction) and returns request headers for each.
    #[allow(dead_code)] // benches/auth.rs uses it; examples/hotpath.rs does not
    pub fn more_keys(&self, rt: &tokio::runtime::Runtime, n: usize) -> Vec<HeaderMap> {
        let secrets: Vec<_> = (0..n).map(|_| key::generate().unwrap()).collect();
        let records = secrets
            .iter()
            .enumerate()
            .map(|(i, s)| KeyRecord::new(format!("bench-{i}"), s, 0, None).unwrap())
            .collect();
        rt.block_on(self.store.import(records)).unwrap();
        secrets.iter().map(|s| headers(s.expose())).collect()
    }
}

/// Request headers carrying `key` in `X-API-Key`.
pub fn headers(key: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("x-api-key", HeaderValue::from_str(key).unwrap());
    h
}
