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

#[path = "../benches/support/mod.rs"]
mod support;

use std::hint::black_box;

use keygate::key::{self, KeyDigest};
use support::{AuthFixture, headers};

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
    let fixture = AuthFixture::new(&rt);
    let AuthFixture {
        cache,
        auth,
        valid,
        typo,
        ..
    } = &fixture;
    let typo = headers(typo);
    let hit = headers(valid);
    let unknown = headers(key::generate().unwrap().expose());
    // Warm both cache entries, so every case measures the steady state.
    rt.block_on(async {
        assert!(auth.authenticate(&hit, cache).await.is_ok());
        assert!(auth.authenticate(&unknown, cache).await.is_err());
    });

    measured(&rt, async {
        for _ in 0..n {
            match case.as_str() {
                "sha256" => {
                    black_box(KeyDigest::of(black_box(valid.as_bytes())));
                }
                "reject_malformed" => {
                    assert!(auth.authenticate(black_box(&typo), cache).await.is_err());
                }
                "cache_hit" => {
                    assert!(auth.authenticate(black_box(&hit), cache).await.is_ok());
                }
                "cache_miss_negative" => {
                    assert!(auth.authenticate(black_box(&unknown), cache).await.is_err());
                }
                other => panic!("unknown case {other}"),
            }
        }
    });
}
