//! A flood of random keys against the real gateway, in its own test binary: it runs for a minute
//! or two on both cores, and test binaries run one after another, so it never starves the timing-
//! sensitive cases in `tests/adversarial.rs`.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Gateway, Upstream, eventually_async};

fn vm_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// A flood of a million well-formed random keys from a thousand client addresses (a trusted load
/// balancer in front, over plain HTTP, says which): the failure limiter locks each address out
/// after its allowance, so store lookups are bounded by addresses × rate × time; the key cache stays
/// within its capacity; memory stays flat; no metric series is added per key or address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_million_random_keys_cost_bounded_lookups_flat_memory_and_no_new_series() {
    const REQUESTS: usize = 1_000_000;
    const ADDRESSES: usize = 1_000;
    const ALLOWANCE: usize = 20;
    const CAPACITY: usize = 5_000;
    const CONNECTIONS: usize = 16;
    let upstream = Upstream::start().await;
    let gw = Gateway::start(
        &upstream.url(),
        &[
            ("KEYGATE_SERVER_HTTP_MODE", "serve"),
            ("KEYGATE_SERVER_TRUSTED_PROXIES", "[\"127.0.0.1/32\"]"),
            ("KEYGATE_RATE_LIMIT_FAILURES_PER_IP", "20/min"),
            ("KEYGATE_STORE_CACHE_CAPACITY", "5000"),
            ("KEYGATE_LOGGING_LEVEL", "warn"),
        ],
    )
    .await;
    let metric = |text: &str, name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .map_or(0.0, |v| v.parse::<f64>().unwrap())
    };
    let series = |text: &str| {
        text.lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .count()
    };
    let before = gw.metrics().await;
    let started = Instant::now();
    let url = format!("http://{}/api/v1/video/process/", gw.http);
    let sent = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let statuses = Arc::new(std::sync::Mutex::new(std::collections::BTreeMap::new()));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..CONNECTIONS {
        let (url, sent, statuses) = (url.clone(), Arc::clone(&sent), Arc::clone(&statuses));
        workers.spawn(async move {
            let client = reqwest::Client::builder()
                .pool_max_idle_per_host(1)
                .build()
                .unwrap();
            let mut mine = std::collections::BTreeMap::<u16, usize>::new();
            loop {
                let i = sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= REQUESTS {
                    break;
                }
                let guess = keygate::key::generate().unwrap();
                let ip = i % ADDRESSES;
                let resp = client
                    .get(&url)
                    .header("X-API-Key", guess.expose())
                    .header(
                        "X-Forwarded-For",
                        format!("198.18.{}.{}", ip / 250, ip % 250),
                    )
                    .send()
                    .await
                    .unwrap();
                *mine.entry(resp.status().as_u16()).or_default() += 1;
            }
            let mut all = statuses.lock().unwrap();
            for (status, n) in mine {
                *all.entry(status).or_insert(0) += n;
            }
        });
    }
    // Memory is compared from the point where every address is locked out and the caches hold
    // what they will hold (a tenth of the flood in), to the end.
    let warm = async || sent.load(std::sync::atomic::Ordering::Relaxed) >= REQUESTS / 10;
    eventually_async(Duration::from_secs(600), "a tenth of the flood", warm).await;
    let rss_after_warmup = vm_rss_kib();
    while let Some(done) = workers.join_next().await {
        done.unwrap();
    }
    let rss_end = vm_rss_kib();
    let elapsed = started.elapsed();
    let after = gw.metrics().await;
    // Each address may fail ALLOWANCE times at once and once more every 3 s (20/min) after that;
    // requests already in flight when a lockout starts add at most one per connection.
    let allowed = ADDRESSES * (ALLOWANCE + 1 + elapsed.as_secs() as usize / 3) + CONNECTIONS;
    let statuses = statuses.lock().unwrap().clone();
    let lookups = metric(&after, "keygate_cache_misses_total")
        - metric(&before, "keygate_cache_misses_total");
    let entries = metric(&after, "keygate_cache_entries");
    let grown_mib = (rss_end as f64 - rss_after_warmup as f64) / 1024.0;
    println!(
        "{REQUESTS} random keys from {ADDRESSES} addresses in {elapsed:.1?}: {statuses:?}; \
         {lookups} store lookups (limit {allowed}); {entries} cache entries; \
         RSS {} MiB after 10%, {} MiB at the end ({grown_mib:+.1} MiB)",
        rss_after_warmup / 1024,
        rss_end / 1024
    );
    assert_eq!(statuses.values().sum::<usize>(), REQUESTS);
    assert!(
        statuses.keys().all(|s| *s == 401 || *s == 429),
        "{statuses:?}"
    );
    assert!(
        statuses.get(&401).copied().unwrap_or(0) <= allowed,
        "the failure limiter let too many guesses through: {statuses:?}"
    );
    assert!(
        lookups <= allowed as f64,
        "store lookups were not bounded: {lookups}"
    );
    assert!(
        entries <= CAPACITY as f64 * 1.1,
        "the key cache outgrew its capacity: {entries}"
    );
    assert!(
        grown_mib < 32.0,
        "memory grew by {grown_mib:.1} MiB during the flood"
    );
    assert_eq!(
        series(&before),
        series(&after),
        "metric series grew with the flood"
    );
    assert_eq!(upstream.count(), 0);
    gw.shutdown().await;
}
