//! Authentication hot path: the offline format check, a cache hit (with one key in use, and with
//! 90,000), a malformed-key rejection and a cache miss that reads SQLite; and, off the hot path,
//! one usage flush after each of the 90,000 keys was used (what a busy gateway's background does
//! every `usage_flush_interval`); and, with `[upstream] identity_secret` set, the signature added
//! to each forwarded request (`identity/sign_*`). `baseline/sha256` (one
//! SHA-256 of a key, which every lookup needs) is the yardstick: report the others as ratios to it
//! from the same run.
//!
//! Run: `cargo bench --bench auth`

mod support;

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use keygate::key::{self, KeyDigest};
use support::{AuthFixture, headers};

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
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

    c.bench_function("baseline/sha256", |b| {
        b.iter(|| KeyDigest::of(black_box(valid.as_bytes())))
    });
    c.bench_function("format_check/valid", |b| {
        b.iter(|| key::check_format(black_box(valid.as_bytes())))
    });
    c.bench_function("format_check/bad_checksum", |b| {
        b.iter(|| key::check_format(black_box(typo.as_bytes())))
    });

    let hit = headers(valid);
    rt.block_on(auth.authenticate(&hit, cache)).unwrap();
    c.bench_function("authenticate/cache_hit", |b| {
        b.to_async(&rt)
            .iter(|| async { auth.authenticate(black_box(&hit), cache).await.is_ok() })
    });
    // 90,000 keys in use, each presented in turn: every lookup is of a different key than the
    // last, all of them cached (the cache holds 100,000 by default).
    let many = fixture.more_keys(&rt, 90_000);
    for h in &many {
        rt.block_on(auth.authenticate(h, cache)).unwrap();
    }
    let mut next = many.iter().cycle();
    c.bench_function("authenticate/cache_hit_90k_keys", |b| {
        b.to_async(&rt).iter(|| {
            let h = next.next().expect("cycles");
            async move { auth.authenticate(black_box(h), cache).await.is_ok() }
        })
    });
    // Each of the 90,000 keys used once (untimed), then one flush: gathering the usage and
    // writing it to SQLite in one transaction.
    let mut group = c.benchmark_group("usage_flush");
    group.sample_size(10);
    group.bench_function("90k_keys", |b| {
        b.iter_custom(|iters| {
            let mut spent = Duration::ZERO;
            for _ in 0..iters {
                rt.block_on(async {
                    for h in &many {
                        auth.authenticate(h, cache).await.unwrap();
                    }
                });
                let start = Instant::now();
                rt.block_on(cache.flush_usage()).unwrap();
                spent += start.elapsed();
            }
            spent
        })
    });
    group.finish();
    // The signature over a forwarded request's identity, with one secret and with two (while
    // one is rotated): what `[upstream] identity_secret` adds per forwarded request.
    let secrets = keygate::identity::IdentitySecret::parse_list(
        "bench-secret-0123456789abcdef0123456789,next-secret-0123456789abcdef01234567",
    )
    .unwrap();
    let uri: http::Uri = "/api/v1/video/process/?page=2".parse().unwrap();
    for (name, n) in [
        ("identity/sign_one_secret", 1),
        ("identity/sign_two_secrets", 2),
    ] {
        let signer = keygate::identity::Signer::new(&secrets[..n], "");
        c.bench_function(name, |b| {
            b.iter(|| {
                signer.sign_at(
                    black_box(1_700_000_000),
                    &http::Method::POST,
                    black_box(&uri),
                    b"0f3c9a1b2c3d4e5f0000000000000001",
                    [b"key_5X3cA2eUOSXA", b"Frontend production", b"42"],
                )
            })
        });
    }

    let malformed = headers(typo);
    c.bench_function("authenticate/reject_malformed", |b| {
        b.to_async(&rt).iter(|| async {
            auth.authenticate(black_box(&malformed), cache)
                .await
                .is_err()
        })
    });
    // Every iteration presents a new well-formed key: a miss, one SQLite read, a negative entry.
    // (Minting the key happens in the untimed setup.)
    c.bench_function("authenticate/cache_miss_store", |b| {
        b.to_async(&rt).iter_batched(
            || headers(key::generate().unwrap().expose()),
            |h| {
                let (auth, cache) = (&auth, &cache);
                async move { auth.authenticate(black_box(&h), cache).await.is_err() }
            },
            BatchSize::SmallInput,
        )
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    targets = bench
}
criterion_main!(benches);
