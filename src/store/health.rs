//! What the gateway knows about its store's health, in one place: the outage breaker, a store
//! found to have lost its data, a read-only node, a missing permission; and the health answer
//! built from it: asking the store at most once a second, whatever the request rate, and built
//! anew at once when what the gateway knows changes (the breaker opens, the data is lost).
//!
//! The breaker: the first store call that fails opens it. While it is open no request calls the
//! store (a known key is answered from the cache within `stale_if_error`, an unknown one gets 503
//! at once), and one background task, the change-feed poller, probes the store at each poll; its
//! first success closes the breaker. So a failing store costs each request nothing, instead of a
//! store timeout per request waiting on the one before it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::StatusCode;

use crate::logging::Throttle;
use crate::metrics::Metrics;

/// How long a computed health answer is reused.
pub const HEALTH_EVERY: Duration = Duration::from_secs(1);

/// Something wrong with the store, as the health answers name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Problem {
    /// The store does not answer (the breaker is open).
    Unavailable,
    /// The store lost its data: its identity marker is gone or its change counter went back.
    DataLost,
    /// The node keygate talks to takes no writes (a replica): key changes and usage writes fail.
    ReadOnly,
    /// The store refuses a command keygate needs (a Redis ACL).
    PermissionDenied,
    /// The shared rate limiter is failing: limits are per gateway.
    RateLimitsPerInstance,
}

impl Problem {
    /// Name in the health answers' `problems` list.
    pub fn as_str(self) -> &'static str {
        match self {
            Problem::Unavailable => "store_unavailable",
            Problem::DataLost => "store_data_lost",
            Problem::ReadOnly => "store_read_only",
            Problem::PermissionDenied => "store_permission_denied",
            Problem::RateLimitsPerInstance => "rate_limits_per_instance",
        }
    }

    /// Whether it makes the gateway unhealthy (503), rather than degraded (200).
    pub fn fatal(self) -> bool {
        match self {
            Problem::Unavailable
            | Problem::DataLost
            | Problem::ReadOnly
            | Problem::PermissionDenied => true,
            Problem::RateLimitsPerInstance => false,
        }
    }
}

/// One computed health answer, shared by `/health/api-auth/` and `/readyz`.
#[derive(Debug)]
pub struct Report {
    /// 200 (healthy or degraded) or 503.
    pub status: StatusCode,
    /// Everything wrong, worst first.
    pub problems: Vec<Problem>,
    /// One line saying what is wrong (empty when nothing is).
    pub error: String,
    /// Active keys, when the store answered.
    pub active_keys: Option<u64>,
    /// The node keygate talks to, when the store finds it itself (the Sentinel primary).
    pub node: Option<String>,
    /// The public health endpoint's body.
    pub body: Bytes,
    computed: Instant,
    /// What it was computed from: [`StoreHealth`]'s version and the rate limiter's state.
    basis: (u64, bool),
}

impl Report {
    /// Builds the answer and its public body.
    pub fn new(
        problems: Vec<Problem>,
        error: String,
        active_keys: Option<u64>,
        node: Option<String>,
    ) -> Self {
        let fatal = problems.iter().any(|p| p.fatal());
        let (status, word) = match (fatal, problems.is_empty()) {
            (true, _) => (StatusCode::SERVICE_UNAVAILABLE, "unhealthy"),
            (false, false) => (StatusCode::OK, "degraded"),
            (false, true) => (StatusCode::OK, "healthy"),
        };
        let timestamp = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
        let mut body = serde_json::json!({"status": word, "timestamp": timestamp});
        if let Some(n) = active_keys {
            body["active_api_keys"] = n.into();
        }
        // Problems by their codes: the public answer carries no internal error text (the
        // admin listener's /readyz and the log have it).
        if !problems.is_empty() {
            body["problems"] = problems.iter().map(|p| p.as_str()).collect();
        }
        Self {
            status,
            body: Bytes::from(body.to_string()),
            problems,
            error,
            active_keys,
            node,
            computed: Instant::now(),
            basis: (0, false),
        }
    }

    /// Whether the store can be relied on (no fatal problem).
    pub fn store_ok(&self) -> bool {
        !self.problems.iter().any(|p| p.fatal())
    }
}

/// The gateway's knowledge of its store's health.
pub struct StoreHealth {
    epoch: Instant,
    /// Milliseconds after `epoch` when the breaker opened, plus one; 0: closed.
    open_since: AtomicU64,
    /// The store lost its data (why is in `lost_reason`).
    lost: AtomicBool,
    lost_reason: std::sync::Mutex<String>,
    read_only: AtomicBool,
    denied: std::sync::Mutex<Option<String>>,
    /// What the store said when the breaker last opened.
    last_error: std::sync::Mutex<String>,
    /// Probes that failed since the breaker opened.
    failed_probes: AtomicU64,
    still_down: Throttle,
    metrics: Arc<Metrics>,
    /// Bumped at every change of what is known (breaker, loss, read-only, permission): a health
    /// answer computed before it is not reused.
    version: AtomicU64,
    report: tokio::sync::Mutex<Option<Arc<Report>>>,
}

impl std::fmt::Debug for StoreHealth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreHealth")
            .field("available", &self.available())
            .finish_non_exhaustive()
    }
}

impl StoreHealth {
    /// A healthy store, reported through `metrics`.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        metrics.store_breaker_open.set(0.0);
        metrics.store_data_lost.set(0.0);
        metrics.store_read_only.set(0.0);
        Self {
            epoch: Instant::now(),
            open_since: AtomicU64::new(0),
            lost: AtomicBool::new(false),
            lost_reason: std::sync::Mutex::new(String::new()),
            read_only: AtomicBool::new(false),
            denied: std::sync::Mutex::new(None),
            last_error: std::sync::Mutex::new(String::new()),
            failed_probes: AtomicU64::new(0),
            still_down: Throttle::new(Duration::from_secs(30)),
            metrics,
            version: AtomicU64::new(0),
            report: tokio::sync::Mutex::new(None),
        }
    }

    fn changed(&self) {
        self.version.fetch_add(1, Ordering::Release);
    }

    /// Keys were created, changed or removed: the next health answer counts them anew instead of
    /// repeating the last one.
    pub fn keys_changed(&self) {
        self.changed();
    }

    /// Whether requests may call the store: the breaker is closed and the data not lost.
    pub fn available(&self) -> bool {
        !self.breaker_open() && !self.lost.load(Ordering::Relaxed)
    }

    /// Whether the breaker is open (the store is failing).
    pub fn breaker_open(&self) -> bool {
        self.open_since.load(Ordering::Relaxed) != 0
    }

    /// Whether the store was found to have lost its data.
    pub fn lost(&self) -> bool {
        self.lost.load(Ordering::Relaxed)
    }

    fn millis(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX - 1) + 1
    }

    /// A store call failed with `error`: opens the breaker (logged once per opening).
    pub fn open(&self, error: &str) {
        if self
            .open_since
            .compare_exchange(0, self.millis(), Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            self.metrics.store_breaker_open.set(1.0);
            self.changed();
            self.failed_probes.store(0, Ordering::Relaxed);
            // This line says it; "still unavailable" follows only if it lasts.
            self.still_down.hold();
            if let Ok(mut last) = self.last_error.lock() {
                error.clone_into(&mut last);
            }
            tracing::warn!(
                error,
                "key store unavailable: cached keys are answered from the cache (stale_if_error), \
                 unknown keys get 503; one background probe checks the store"
            );
        }
    }

    /// A probe of the open breaker failed with `error`: logged at most every 30 s, with a count.
    pub fn probe_failed(&self, error: &str) {
        let failed = self.failed_probes.fetch_add(1, Ordering::Relaxed) + 1;
        if let Some(suppressed) = self.still_down.allow() {
            let down_for = self.down_for().unwrap_or_default();
            tracing::warn!(
                error,
                down_for = ?down_for,
                failed_probes = failed,
                suppressed,
                "key store still unavailable"
            );
        }
    }

    /// How long the breaker has been open.
    fn down_for(&self) -> Option<Duration> {
        let since = self.open_since.load(Ordering::Relaxed);
        (since != 0).then(|| Duration::from_millis(self.millis().saturating_sub(since)))
    }

    /// A probe succeeded: closes the breaker.
    pub fn close(&self) {
        let since = self.open_since.swap(0, Ordering::Relaxed);
        if since != 0 {
            self.metrics.store_breaker_open.set(0.0);
            self.changed();
            let down_for = Duration::from_millis(self.millis().saturating_sub(since));
            tracing::info!(
                down_for = ?down_for,
                failed_probes = self.failed_probes.load(Ordering::Relaxed),
                suppressed = self.still_down.reset(),
                "key store available again"
            );
        }
    }

    /// The store lost its data (`Some(why)`), or is trusted again (`None`).
    pub fn set_lost(&self, reason: Option<&str>) {
        match reason {
            Some(why) => {
                let was = self.lost.swap(true, Ordering::Relaxed);
                if let Ok(mut r) = self.lost_reason.lock() {
                    why.clone_into(&mut r);
                }
                if !was {
                    self.metrics.store_data_lost.set(1.0);
                    self.changed();
                    tracing::error!(
                        reason = why,
                        "key store lost its data: cached keys are served (stale_if_error), unknown \
                         keys get 503, nothing is read from it until the data is restored or \
                         accepted"
                    );
                }
            }
            None => {
                if self.lost.swap(false, Ordering::Relaxed) {
                    self.metrics.store_data_lost.set(0.0);
                    self.changed();
                    tracing::warn!("key store trusted again: cached keys dropped and read anew");
                }
            }
        }
    }

    /// Whether the node keygate talks to takes writes.
    pub fn set_read_only(&self, read_only: bool) {
        if self.read_only.swap(read_only, Ordering::Relaxed) != read_only {
            self.changed();
            self.metrics
                .store_read_only
                .set(if read_only { 1.0 } else { 0.0 });
            if read_only {
                tracing::error!(
                    "key store is read-only (a replica): key changes and usage writes fail"
                );
            } else {
                tracing::info!("key store takes writes again");
            }
        }
    }

    /// A permission the store refuses (`Some(what)`), or none any more.
    pub fn set_denied(&self, denied: Option<&str>) {
        if let Ok(mut d) = self.denied.lock() {
            if let Some(what) = denied
                && d.as_deref() != Some(what)
            {
                tracing::error!(error = what, "key store refuses a command keygate needs");
            }
            if d.as_deref() != denied {
                self.changed();
            }
            *d = denied.map(str::to_owned);
        }
    }

    /// What is wrong now (without asking the store), worst first, with one line saying so.
    pub fn problems(&self, limits_degraded: bool) -> (Vec<Problem>, String) {
        let mut problems = Vec::new();
        let mut lines = Vec::new();
        if self.lost() {
            problems.push(Problem::DataLost);
            lines.push(
                self.lost_reason
                    .lock()
                    .map(|r| r.clone())
                    .unwrap_or_default(),
            );
        }
        if self.breaker_open() {
            problems.push(Problem::Unavailable);
            let last = self
                .last_error
                .lock()
                .map(|r| r.clone())
                .unwrap_or_default();
            let down_for = self.down_for().unwrap_or_default().as_secs();
            lines.push(format!("key store unavailable for {down_for}s: {last}"));
        }
        if let Some(denied) = self.denied.lock().ok().and_then(|d| d.clone()) {
            problems.push(Problem::PermissionDenied);
            lines.push(denied);
        }
        if self.read_only.load(Ordering::Relaxed) {
            problems.push(Problem::ReadOnly);
            lines.push(
                "key store is read-only (a replica): key changes and usage writes fail".to_owned(),
            );
        }
        if limits_degraded {
            problems.push(Problem::RateLimitsPerInstance);
            lines.push(
                "the shared rate limiter is failing: limits are enforced per gateway".to_owned(),
            );
        }
        (problems, lines.join("; "))
    }

    /// The health answer: the last one if it is younger than [`HEALTH_EVERY`] and nothing
    /// known changed since (nor `limits_degraded`), else a new one from `compute`. Concurrent
    /// requests wait for one computation.
    pub async fn report<F>(&self, limits_degraded: bool, compute: impl FnOnce() -> F) -> Arc<Report>
    where
        F: Future<Output = Report>,
    {
        let mut slot = self.report.lock().await;
        let basis = (self.version.load(Ordering::Acquire), limits_degraded);
        if let Some(report) = slot.as_ref()
            && report.computed.elapsed() < HEALTH_EVERY
            && report.basis == basis
        {
            return Arc::clone(report);
        }
        let mut report = compute().await;
        // What it saw, at the latest: a change during the computation makes the next one anew.
        report.basis = basis;
        let report = Arc::new(report);
        *slot = Some(Arc::clone(&report));
        report
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health() -> StoreHealth {
        StoreHealth::new(Arc::new(Metrics::new(&[0.1])))
    }

    #[test]
    fn the_breaker_opens_on_a_failure_and_closes_on_a_probe() {
        let h = health();
        assert!(h.available());
        h.open("refused");
        h.open("refused again");
        assert!(!h.available() && h.breaker_open());
        let (problems, error) = h.problems(false);
        assert_eq!(problems, [Problem::Unavailable]);
        assert!(
            error.contains("refused") && !error.contains("again"),
            "{error}"
        );
        h.close();
        assert!(h.available());
        assert!(h.problems(false).0.is_empty());
    }

    #[test]
    fn lost_data_is_fatal_and_degraded_limits_are_not() {
        let h = health();
        h.set_lost(Some("marker gone"));
        assert!(!h.available() && !h.breaker_open());
        let report = Report::new(h.problems(true).0, "x".into(), None, None);
        assert_eq!(report.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            report.problems,
            [Problem::DataLost, Problem::RateLimitsPerInstance]
        );
        h.set_lost(None);
        let report = Report::new(h.problems(true).0, "x".into(), Some(3), None);
        assert_eq!(report.status, StatusCode::OK);
        let body: serde_json::Value = serde_json::from_slice(&report.body).unwrap();
        assert_eq!(body["status"], "degraded");
        assert_eq!(body["active_api_keys"], 3);
        assert_eq!(body["problems"][0], "rate_limits_per_instance");
    }

    #[tokio::test]
    async fn the_report_is_computed_at_most_once_a_second() {
        let h = health();
        let computed = std::sync::atomic::AtomicUsize::new(0);
        let compute = || async {
            computed.fetch_add(1, Ordering::SeqCst);
            Report::new(Vec::new(), String::new(), Some(1), None)
        };
        for _ in 0..50 {
            h.report(false, compute).await;
        }
        assert_eq!(computed.load(Ordering::SeqCst), 1);
        tokio::time::sleep(HEALTH_EVERY + Duration::from_millis(50)).await;
        h.report(false, compute).await;
        assert_eq!(computed.load(Ordering::SeqCst), 2);
        // A change of what is known is answered at once, not a second later.
        h.open("refused");
        h.report(false, compute).await;
        assert_eq!(computed.load(Ordering::SeqCst), 3);
        h.report(true, compute).await;
        assert_eq!(computed.load(Ordering::SeqCst), 4);
        h.report(true, compute).await;
        assert_eq!(computed.load(Ordering::SeqCst), 4);
    }
}
