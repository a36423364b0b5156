//! What a request carries through the pipeline: the connection it came on, its request id, and
//! its [`RequestContext`], which every stage fills and the last one logs.

use std::cell::Cell;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use http::HeaderMap;
use http::header::{self, Entry, HeaderName, HeaderValue};
use http::request::Parts;

use crate::cache::KnownKey;
use crate::error::GatewayError;
use crate::metrics::{AuthReason, Metrics, Outcome};

pub(crate) const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The status logged for a request whose answer was never sent: the client went away, or the
/// shutdown grace ended first (nginx's "client closed request").
const CANCELLED: u16 = 499;

/// The connection a request arrived on.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// TCP peer address.
    pub peer: SocketAddr,
    /// The peer's IP address as text, formatted once per connection rather than per request
    /// (for `X-Forwarded-For` and the access log).
    pub(super) peer_text: HeaderValue,
    /// Whether the connection is TLS.
    pub tls: bool,
    /// The worker serving it (which upstream pool to use).
    pub worker: usize,
}

impl ConnInfo {
    /// A connection from `peer`, over TLS or not, served by worker `worker`.
    pub fn new(peer: SocketAddr, tls: bool, worker: usize) -> Self {
        let peer_text = HeaderValue::try_from(peer.ip().to_string())
            .expect("an IP address is a valid header value");
        Self {
            peer,
            peer_text,
            tls,
            worker,
        }
    }
}

#[derive(Clone, Copy)]
struct ThreadIds {
    prefix: [u8; 16],
    next: u64,
}

thread_local! {
    static THREAD_IDS: Cell<Option<ThreadIds>> = const { Cell::new(None) };
    /// Set on a worker thread once its shutdown grace has ended: requests dropped from then on
    /// were cut off by the shutdown, not by their clients.
    static GRACE_ENDED: Cell<bool> = const { Cell::new(false) };
}

/// Marks the calling worker thread's remaining requests as cut off by the shutdown (their
/// access-log lines say so).
pub fn grace_ended() {
    GRACE_ENDED.set(true);
}

/// `n` as 16 lowercase hex digits.
fn hex16(n: u64) -> [u8; 16] {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0; 16];
    for (i, digit) in out.iter_mut().enumerate() {
        *digit = DIGITS[((n >> (60 - 4 * i)) & 0xf) as usize];
    }
    out
}

/// A new request id: 32 hex digits, a random prefix drawn once per thread and the thread's own
/// counter. Unique across threads and restarts with no random draw, no shared counter and no
/// formatting per request.
fn new_request_id() -> HeaderValue {
    let ids = THREAD_IDS.get().unwrap_or_else(|| ThreadIds {
        prefix: hex16(rand::random()),
        next: 1,
    });
    THREAD_IDS.set(Some(ThreadIds {
        next: ids.next.wrapping_add(1),
        ..ids
    }));
    let mut id = [0; 32];
    id[..16].copy_from_slice(&ids.prefix);
    id[16..].copy_from_slice(&hex16(ids.next));
    HeaderValue::from_bytes(&id).expect("hex digits are a valid header value")
}

/// A client-sent id is kept when it is short and made of safe characters.
fn acceptable(value: &HeaderValue) -> bool {
    let b = value.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.' | b':'))
}

/// Stage 1: the request's id, the client's when it is acceptable, else a new one; the request
/// then carries exactly that one value (the one logged, answered and signed upstream).
pub(super) fn assign_request_id(headers: &mut HeaderMap) -> HeaderValue {
    match headers.entry(X_REQUEST_ID) {
        Entry::Occupied(mut e) if acceptable(e.get()) => {
            let id = e.get().clone();
            if e.iter().nth(1).is_some() {
                e.insert(id.clone());
            }
            id
        }
        Entry::Occupied(mut e) => {
            let id = new_request_id();
            e.insert(id.clone());
            id
        }
        Entry::Vacant(e) => e.insert(new_request_id()).clone(),
    }
}

/// The request id a response outside the pipeline (the HTTP listener's redirect) carries: the
/// client's when it is acceptable, else a new one.
pub(crate) fn request_id(headers: &HeaderMap) -> HeaderValue {
    match headers.get(X_REQUEST_ID) {
        Some(id) if acceptable(id) => id.clone(),
        _ => new_request_id(),
    }
}

/// One request's way through the pipeline: who sent it and what each stage decided, for the
/// last stage's access-log event and metrics. Dropped before it was logged (the client went
/// away, or the shutdown grace ended), it logs the request as cancelled.
pub(super) struct RequestContext<'a> {
    pub(super) metrics: &'a Metrics,
    pub(super) started: Instant,
    pub(super) request_id: HeaderValue,
    pub(super) parts: &'a Parts,
    pub(super) conn: &'a ConnInfo,
    pub(super) client_ip: IpAddr,
    pub(super) outcome: Outcome,
    pub(super) auth: Option<AuthReason>,
    pub(super) reason: &'static str,
    pub(super) key: Option<Arc<KnownKey>>,
    /// Why a store or upstream failure happened: for the log, never for the client.
    pub(super) cause: Option<String>,
    logged: bool,
}

impl<'a> RequestContext<'a> {
    pub(super) fn new(
        metrics: &'a Metrics,
        started: Instant,
        request_id: HeaderValue,
        parts: &'a Parts,
        conn: &'a ConnInfo,
        client_ip: IpAddr,
    ) -> Self {
        Self {
            metrics,
            started,
            request_id,
            parts,
            conn,
            client_ip,
            outcome: Outcome::Local,
            auth: None,
            reason: "",
            key: None,
            cause: None,
            logged: false,
        }
    }

    /// Records what `err` says of the request: its outcome, auth decision and reason.
    pub(super) fn failed(&mut self, err: &GatewayError) {
        self.outcome = match err {
            GatewayError::Client(_) => Outcome::Rejected,
            GatewayError::Store | GatewayError::Upstream { .. } => Outcome::Failed,
        };
        self.auth = err.auth_reason().or(self.auth);
        self.reason = err.reason();
    }

    /// Records the request's outcome (its metrics and access-log line) with `status`.
    pub(super) fn log(&mut self, status: u16) {
        self.logged = true;
        let elapsed = self.started.elapsed();
        self.metrics.request(self.outcome, status);
        self.metrics.request_duration.record(elapsed.as_secs_f64());
        if let Some(reason) = self.auth {
            self.metrics.auth(reason);
        }
        if !tracing::enabled!(target: "keygate::access", tracing::Level::INFO) {
            return;
        }
        let key = self.key.as_ref().map(|k| &k.record);
        // The peer's address is already text; a trusted proxy's client is formatted here.
        let forwarded_client;
        let client_ip = if self.client_ip == self.conn.peer.ip() {
            self.conn.peer_text.to_str().unwrap_or("")
        } else {
            forwarded_client = self.client_ip.to_string();
            &forwarded_client
        };
        let user_agent = self.parts.headers.get(header::USER_AGENT);
        crate::logging::access(&crate::logging::AccessRecord {
            request_id: self.request_id.to_str().unwrap_or(""),
            client_ip,
            method: self.parts.method.as_str(),
            path: self.parts.uri.path(),
            status,
            latency: elapsed,
            outcome: self.outcome.as_str(),
            auth: self.auth.map(AuthReason::as_str),
            reason: self.reason,
            key_id: key.map(|k| k.id.as_str()),
            key_name: key.map(|k| k.name.as_str()),
            user_agent: user_agent.and_then(|v| v.to_str().ok()),
            cause: self.cause.as_deref(),
        });
    }
}

impl Drop for RequestContext<'_> {
    fn drop(&mut self) {
        if self.logged {
            return;
        }
        self.outcome = Outcome::Cancelled;
        self.reason = if GRACE_ENDED.get() {
            "shutdown_grace_ended"
        } else {
            "client_closed"
        };
        self.log(CANCELLED);
    }
}
