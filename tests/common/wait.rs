//! Waiting for something to happen: a test polls the condition it waits for, with a deadline,
//! instead of sleeping a fixed time (too short on a busy machine, needlessly long elsewhere).
//!
//! Synchronous tests use [`eventually`], [`wait_for`] and [`poll`]; async tests use
//! [`eventually_async`] and [`wait_for_async`], which sleep on the runtime's timer so that the
//! in-process gateway keeps running between two looks.

use std::fmt::Display;
use std::time::{Duration, Instant};

/// How often a condition is looked at.
pub const EVERY: Duration = Duration::from_millis(20);

/// How long to wait before the next look, or `None` once the deadline has passed (the last look
/// is taken at the deadline itself).
fn next_look(deadline: Instant) -> Option<Duration> {
    let left = deadline.checked_duration_since(Instant::now())?;
    (!left.is_zero()).then(|| EVERY.min(left))
}

/// Looks at `probe` every [`EVERY`] until it gives `Some`, for at most `within`; `None` if it
/// never did. For a caller that must clean up before it fails.
pub fn poll<T>(within: Duration, mut probe: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(found) = probe() {
            return Some(found);
        }
        std::thread::sleep(next_look(deadline)?);
    }
}

/// Polls `probe` until it gives `Ok`, and returns that value; panics if it has not within
/// `within`, naming `what` was awaited and the last `Err` (what was seen instead).
pub fn wait_for<T, E: Display>(
    within: Duration,
    what: &str,
    mut probe: impl FnMut() -> Result<T, E>,
) -> T {
    let mut last = None;
    poll(within, || probe().map_err(|seen| last = Some(seen)).ok()).unwrap_or_else(|| {
        let seen = last.map_or_else(String::new, |seen| format!("; last seen: {seen}"));
        panic!("waited {within:?} for {what}{seen}")
    })
}

/// Polls `done` until it holds, and returns how long that took; panics naming `what` if it does
/// not within `within`.
pub fn eventually(within: Duration, what: &str, mut done: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    if poll(within, || done().then_some(())).is_none() {
        panic!("waited {within:?} for {what}");
    }
    started.elapsed()
}

/// [`wait_for`] for async tests.
pub async fn wait_for_async<T, E: Display>(
    within: Duration,
    what: &str,
    mut probe: impl AsyncFnMut() -> Result<T, E>,
) -> T {
    let deadline = Instant::now() + within;
    loop {
        let seen = match probe().await {
            Ok(found) => return found,
            Err(seen) => seen,
        };
        match next_look(deadline) {
            Some(pause) => tokio::time::sleep(pause).await,
            None => panic!("waited {within:?} for {what}; last seen: {seen}"),
        }
    }
}

/// [`eventually`] for async tests.
pub async fn eventually_async(
    within: Duration,
    what: &str,
    mut done: impl AsyncFnMut() -> bool,
) -> Duration {
    let started = Instant::now();
    let deadline = started + within;
    while !done().await {
        match next_look(deadline) {
            Some(pause) => tokio::time::sleep(pause).await,
            None => panic!("waited {within:?} for {what}"),
        }
    }
    started.elapsed()
}
