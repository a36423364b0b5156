//! Rate limits: requests per key, and failed authentications per client IP (brute-force
//! protection), both GCRA.
//!
//! With a store that shares limits (Redis) every decision is one atomic script in Redis, so a
//! fleet together admits no more than the limit. When that call fails or is slower than
//! `rate_limit.shared_timeout`, the gateway decides with its own in-process limiter for a second
//! ("degraded": per-instance limits), says so in a log line and `keygate_rate_limit_degraded`,
//! and tries Redis again afterwards. With the embedded store the in-process limiter is the only
//! one.
//!
//! A client IP that exceeds its failure budget is locked out locally until the budget refills:
//! its requests get 429 without a key check, and without a store or Redis round trip.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use governor::clock::{Clock as _, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};
use http::HeaderValue;

use crate::logging::Throttle;
use crate::metrics::Metrics;
use crate::store::health::StoreHealth;
use crate::store::{SharedStore, StoreError};

/// The values the limiter's API takes and gives (defined with the other rate values).
pub use crate::rate::{LimitKind, Rate, Verdict};

type Local<K> = RateLimiter<K, DefaultKeyedStateStore<K>, DefaultClock, StateInformationMiddleware>;

/// `rate` as the in-process limiter's quota: a burst of `count`, one more every emission interval.
fn quota(rate: Rate) -> Quota {
    let burst = NonZeroU32::new(rate.count).unwrap_or(NonZeroU32::MIN);
    Quota::with_period(rate.emission_interval())
        .unwrap_or_else(|| Quota::per_second(burst))
        .allow_burst(burst)
}

/// One limit: its rate, the prepared `RateLimit-Policy` value, and the in-process limiter.
struct Limit<K: Clone + std::hash::Hash + Eq> {
    kind: LimitKind,
    rate: Rate,
    policy: HeaderValue,
    local: Local<K>,
}

impl<K: Clone + std::hash::Hash + Eq> Limit<K> {
    fn new(kind: LimitKind, rate: Rate) -> Self {
        let policy = HeaderValue::from_str(&format!(
            "\"{}\";q={};w={}",
            kind.as_str(),
            rate.count,
            rate.period.as_secs().max(1)
        ))
        .unwrap_or_else(|_| HeaderValue::from_static("\"default\""));
        Self {
            kind,
            rate,
            policy,
            local: RateLimiter::keyed(quota(rate)).with_middleware::<StateInformationMiddleware>(),
        }
    }

    fn decide_locally(&self, subject: &K) -> Verdict {
        match self.local.check_key(subject) {
            Ok(snapshot) => Verdict::Allowed {
                remaining: snapshot.remaining_burst_capacity(),
                reset: self.rate.emission_interval()
                    * (self.rate.count - snapshot.remaining_burst_capacity()),
            },
            Err(not_until) => Verdict::Limited {
                retry_after: not_until.wait_time_from(DefaultClock::default().now()),
            },
        }
    }
}

/// A 429's details, for the response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Throttled {
    /// Which limit.
    pub kind: LimitKind,
    /// When to retry.
    pub retry_after: Duration,
    /// `RateLimit-Policy` value.
    pub policy: HeaderValue,
}

/// Headers for an allowed request under a limit.
#[derive(Debug, Clone)]
pub struct Allowance {
    /// `RateLimit-Policy`.
    pub policy: HeaderValue,
    /// `RateLimit`.
    pub state: HeaderValue,
}

/// `"<name>";r=<remaining>;t=<seconds>`: the draft `RateLimit` field.
pub fn rate_limit_field(kind: LimitKind, remaining: u32, reset: Duration) -> HeaderValue {
    HeaderValue::from_str(&format!(
        "\"{}\";r={remaining};t={}",
        kind.as_str(),
        ceil_secs(reset)
    ))
    .unwrap_or_else(|_| HeaderValue::from_static("\"default\""))
}

/// Whole seconds, rounded up, at least 1 (for `Retry-After`).
pub fn ceil_secs(d: Duration) -> u64 {
    (d.as_millis().div_ceil(1000) as u64).max(1)
}

/// All of the gateway's rate limits.
pub struct RateLimits {
    per_key: Option<Limit<String>>,
    /// In-process limiters for keys with their own rate, one per distinct rate.
    overrides: moka::sync::Cache<Rate, Arc<Limit<String>>>,
    failures: Option<Limit<IpAddr>>,
    /// Client IPs over their failure budget, with when the lockout ends.
    locked: moka::sync::Cache<IpAddr, Instant>,
    /// Milliseconds since `started` when the last lockout ends: until some address is locked
    /// out, a request's lockout check is one atomic load, not a cache lookup.
    lockouts_until: AtomicU64,
    store: SharedStore,
    /// While its breaker is open, decisions are local without asking the store.
    health: Arc<StoreHealth>,
    shared_timeout: Duration,
    started: Instant,
    /// Milliseconds since `started` until which decisions are local; 0 = not degraded.
    degraded_until: AtomicU64,
    degraded: AtomicBool,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for RateLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimits").finish_non_exhaustive()
    }
}

/// Repeats of a permission the shared limiter is refused.
static DENIED: Throttle = Throttle::new(Duration::from_secs(30));

/// How long decisions stay local after the shared limiter failed.
const DEGRADED_FOR: Duration = Duration::from_secs(1);

impl RateLimits {
    /// Limits from `[rate_limit]`; `store` decides whether they are shared, and `health` says
    /// when it is failing (decisions are then local, without a store round trip).
    pub fn new(
        per_key: Option<Rate>,
        failures_per_ip: Option<Rate>,
        shared_timeout: Duration,
        store: SharedStore,
        health: Arc<StoreHealth>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            per_key: per_key.map(|r| Limit::new(LimitKind::Key, r)),
            overrides: moka::sync::Cache::new(1_000),
            failures: failures_per_ip.map(|r| Limit::new(LimitKind::IpFailures, r)),
            locked: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(failures_per_ip.map_or(Duration::from_secs(60), |r| r.period))
                .build(),
            store,
            health,
            shared_timeout,
            started: Instant::now(),
            lockouts_until: AtomicU64::new(0),
            degraded_until: AtomicU64::new(0),
            degraded: AtomicBool::new(false),
            metrics,
        }
    }

    /// Whether `ip` is locked out for failed authentications; if so, for how long still.
    /// Local only: no await, no round trip.
    pub fn ip_locked(&self, ip: IpAddr) -> Option<Throttled> {
        let limit = self.failures.as_ref()?;
        if self.now_ms() >= self.lockouts_until.load(Ordering::Relaxed) {
            return None;
        }
        let until = self.locked.get(&ip)?;
        let left = until.checked_duration_since(Instant::now())?;
        // A refusal during a lockout is the failure limit at work: counted as "limited".
        self.metrics.rate_limit(LimitKind::IpFailures, true);
        Some(Throttled {
            kind: LimitKind::IpFailures,
            retry_after: left,
            policy: limit.policy.clone(),
        })
    }

    /// Counts one failed authentication from `ip`. Returns the lockout when this failure is over
    /// the budget.
    pub async fn record_failure(&self, ip: IpAddr) -> Option<Throttled> {
        let limit = self.failures.as_ref()?;
        let verdict = self.decide(limit, &ip, || ip.to_string()).await;
        match verdict {
            Verdict::Allowed {
                remaining: 0,
                reset,
            } => {
                // That was the last failure the budget allows: lock the address out until the
                // next one is earned, so its next guess is refused before it costs a lookup.
                let next = reset.saturating_sub(
                    limit.rate.emission_interval() * limit.rate.count.saturating_sub(1),
                );
                if !next.is_zero() {
                    self.lock_out(ip, next);
                }
                None
            }
            Verdict::Allowed { .. } => None,
            Verdict::Limited { retry_after } => {
                self.lock_out(ip, retry_after);
                Some(Throttled {
                    kind: LimitKind::IpFailures,
                    retry_after,
                    policy: limit.policy.clone(),
                })
            }
        }
    }

    /// Admits one request for the key with id `key_id`, under its own rate if it has one, else
    /// `[rate_limit] per_key`: the `RateLimit` headers to send, or the 429. `None` when the key
    /// is not limited.
    pub async fn admit_key(
        &self,
        key_id: &str,
        own: Option<Rate>,
    ) -> Option<Result<Allowance, Throttled>> {
        let own = own.map(|rate| {
            self.overrides
                .get_with(rate, || Arc::new(Limit::new(LimitKind::Key, rate)))
        });
        let limit = match &own {
            Some(limit) => limit.as_ref(),
            None => self.per_key.as_ref()?,
        };
        let subject = key_id.to_owned();
        Some(
            match self.decide(limit, &subject, || subject.clone()).await {
                Verdict::Allowed { remaining, reset } => Ok(Allowance {
                    policy: limit.policy.clone(),
                    state: rate_limit_field(LimitKind::Key, remaining, reset),
                }),
                Verdict::Limited { retry_after } => Err(Throttled {
                    kind: LimitKind::Key,
                    retry_after,
                    policy: limit.policy.clone(),
                }),
            },
        )
    }

    /// Locks `ip` out for `lasting`.
    fn lock_out(&self, ip: IpAddr, lasting: Duration) {
        let until = Instant::now() + lasting;
        self.locked.insert(ip, until);
        // Rounded up: the check may end a millisecond late, never early.
        let until_ms = u64::try_from(until.duration_since(self.started).as_millis())
            .unwrap_or(u64::MAX)
            .saturating_add(1);
        self.lockouts_until.fetch_max(until_ms, Ordering::Relaxed);
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    async fn decide<K: Clone + std::hash::Hash + Eq>(
        &self,
        limit: &Limit<K>,
        subject: &K,
        bucket: impl FnOnce() -> String,
    ) -> Verdict {
        let verdict = if self.now_ms() < self.degraded_until.load(Ordering::Relaxed) {
            limit.decide_locally(subject)
        } else if self.health.breaker_open() {
            // The store is failing: no request waits on it.
            self.set_degraded(true, Some("the key store is unavailable"));
            limit.decide_locally(subject)
        } else {
            let shared = tokio::time::timeout(
                self.shared_timeout,
                self.store
                    .rate_limit(limit.kind.as_str(), &bucket(), limit.rate),
            )
            .await;
            match shared {
                Ok(Ok(Some(v))) => {
                    self.set_degraded(false, None);
                    v
                }
                // The store keeps no shared limits (embedded SQLite): in-process is the design.
                Ok(Ok(None)) => limit.decide_locally(subject),
                Ok(Err(e)) => {
                    if let StoreError::Denied(what) = &e
                        && let Some(suppressed) = DENIED.allow()
                    {
                        tracing::error!(error = %what, suppressed, "the shared rate limiter is refused a command it needs");
                    }
                    self.set_degraded(true, Some(&e.to_string()));
                    limit.decide_locally(subject)
                }
                Err(_) => {
                    self.set_degraded(true, Some("shared limiter timed out"));
                    limit.decide_locally(subject)
                }
            }
        };
        self.metrics
            .rate_limit(limit.kind, matches!(verdict, Verdict::Limited { .. }));
        verdict
    }

    fn set_degraded(&self, degraded: bool, why: Option<&str>) {
        if degraded {
            let until = self.now_ms() + u64::try_from(DEGRADED_FOR.as_millis()).unwrap_or(1000);
            self.degraded_until.store(until, Ordering::Relaxed);
        }
        if self.degraded.swap(degraded, Ordering::Relaxed) != degraded {
            self.metrics
                .rate_limit_degraded
                .set(if degraded { 1.0 } else { 0.0 });
            if degraded {
                tracing::warn!(
                    error = why.unwrap_or(""),
                    "shared rate limiter unavailable: enforcing per-instance limits"
                );
            } else {
                tracing::info!("shared rate limiter available again: fleet-wide limits restored");
            }
        }
    }

    /// Whether the last shared decision failed, so limits are per instance (until a shared
    /// decision succeeds again).
    pub fn degraded(&self) -> bool {
        self.degraded.load(Ordering::Relaxed)
    }

    /// Drops in-process limiter state for subjects whose budget is full again (bounded memory).
    pub fn housekeeping(&self) {
        if let Some(l) = &self.per_key {
            l.local.retain_recent();
        }
        for (_, l) in &self.overrides {
            l.local.retain_recent();
        }
        if let Some(l) = &self.failures {
            l.local.retain_recent();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_limits_allow_the_burst_then_refuse() {
        let limit: Limit<String> = Limit::new(LimitKind::Key, Rate::parse("3/min").unwrap());
        let k = "key_a".to_owned();
        let remaining: Vec<u32> = (0..3)
            .map(|_| match limit.decide_locally(&k) {
                Verdict::Allowed { remaining, .. } => remaining,
                Verdict::Limited { .. } => panic!("limited too early"),
            })
            .collect();
        assert_eq!(remaining, [2, 1, 0]);
        let Verdict::Limited { retry_after } = limit.decide_locally(&k) else {
            panic!("not limited");
        };
        assert!(retry_after > Duration::from_secs(15) && retry_after <= Duration::from_secs(20));
        // Another subject has its own budget.
        assert!(matches!(
            limit.decide_locally(&"key_b".to_owned()),
            Verdict::Allowed { .. }
        ));
    }

    #[test]
    fn header_fields_follow_the_draft() {
        let limit: Limit<String> = Limit::new(LimitKind::Key, Rate::parse("600/min").unwrap());
        assert_eq!(limit.policy, "\"key\";q=600;w=60");
        assert_eq!(
            rate_limit_field(LimitKind::Key, 5, Duration::from_millis(1500)),
            "\"key\";r=5;t=2"
        );
        assert_eq!(ceil_secs(Duration::ZERO), 1);
    }
}
