//! Instruction-count probe for the authentication hot path, run under
//! `valgrind --tool=callgrind` by `scripts/check-hotpath.sh` (the CI regression guard).
//!
//! `hotpath CASE N` sets up a SQLite store with one key and a warm cache, then runs CASE N times
//! inside [`measured`], the only function callgrind counts (`--toggle-collect`), so set-up (random
//! keys, a temporary SQLite file) never moves the figure. The script runs every case with N = 0
//! and N = ITERATIONS and divides the difference: instructions per request.
//!
//! Cases: `sha256` (the yardstick), `reject_malformed`, `cache_hit`, `cache_miss_negative` (an
//! unknown well-formed key answered from the negative cache).

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderValue};
use keygate::auth::Authenticator;
use keygate::cache::KeyCache;
use keygate::config::FileConfig;
use keygate::key::{self, KeyDigest};
use keygate::metrics::Metrics;
use keygate::store::sqlite::SqliteStore;
use keygate::store::{KeyRecord, KeyStore as _};

fn headers(key: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("x-api-key", HeaderValue::from_str(key).unwrap());
    h.insert("user-agent", HeaderValue::from_static("hotpath/1"));
    h
}

/// Everything the callgrind guard counts happens in here.
#[inline(never)]
fn measured<F: std::future::Future>(rt: &tokio::runtime::Runtime, work: F) -> F::Output {
    rt.block_on(work)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(case), Some(n)) = (args.next(), args.next()) else {
        eprintln!("usage: hotpath sha256|reject_malformed|cache_hit|cache_miss_negative N");
        std::process::exit(2);
    };
    let n: u64 = n.parse().expect("N is a number");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = FileConfig::default().validate().unwrap();
    let store =
        Arc::new(SqliteStore::open(&dir.path().join("probe.db"), Duration::from_secs(5)).unwrap());
    let secret = key::generate().unwrap();
    rt.block_on(store.insert(KeyRecord::new("probe", &secret, 0, None).unwrap()))
        .unwrap();
    let metrics = Arc::new(Metrics::new(&config.metrics.latency_buckets));
    let cache = KeyCache::new(store, &config.store, metrics);
    let auth = Authenticator::new(&config.auth);

    let valid = secret.expose().to_owned();
    let mut typo = valid.clone().into_bytes();
    typo[10] = if typo[10] == b'a' { b'b' } else { b'a' };
    let typo = headers(std::str::from_utf8(&typo).unwrap());
    let hit = headers(&valid);
    let unknown = headers(key::generate().unwrap().expose());
    // Warm both cache entries, so every case measures the steady state.
    rt.block_on(async {
        assert!(auth.authenticate(&hit, &cache).await.is_ok());
        assert!(auth.authenticate(&unknown, &cache).await.is_err());
    });

    measured(&rt, async {
        for _ in 0..n {
            match case.as_str() {
                "sha256" => {
                    black_box(KeyDigest::of(black_box(valid.as_bytes())));
                }
                "reject_malformed" => {
                    assert!(auth.authenticate(black_box(&typo), &cache).await.is_err());
                }
                "cache_hit" => {
                    assert!(auth.authenticate(black_box(&hit), &cache).await.is_ok());
                }
                "cache_miss_negative" => {
                    assert!(
                        auth.authenticate(black_box(&unknown), &cache)
                            .await
                            .is_err()
                    );
                }
                other => panic!("unknown case {other}"),
            }
        }
    });
}
