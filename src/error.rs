//! The request path's one error type, tagged at its creation with where it arose, and the one
//! place it becomes a response.
//!
//! - [`GatewayError::Client`]: the client's request or credential (4xx): [`Refused`] says what.
//! - [`GatewayError::Store`]: the key store could not answer for a key it was asked about (503).
//! - [`GatewayError::Upstream`]: the upstream failed (502, 504): connect, timeout, protocol.
//!
//! (keygate has no failure of its own on the request path: what could fail, such as loading
//! certificates or the upstream's TLS files, fails at start-up.)
//!
//! [`GatewayError::may_retry`] says whether the client may send the same request again: it did
//! not reach the upstream, and waiting may help. The causes of store and upstream failures go
//! to the access log only (the pipeline keeps them beside the error): a response never carries
//! internal error text. Bodies are JSON with a `detail` field in the old Django API's wording,
//! so existing clients keep working. Every `match` here is exhaustive: a new kind of error must
//! choose its status, body, headers and log reason.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};

use crate::key::FormatError;
use crate::metrics::{AuthReason, UpstreamErrorKind};
use crate::policy::Denied;
use crate::ratelimit::{LimitKind, Throttled, ceil_secs, rate_limit_field};

/// Why a presented key is invalid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InvalidReason {
    /// Failed the offline format check.
    Malformed(FormatError),
    /// Too long to be any key.
    TooLong,
    /// More than one credential header value.
    Ambiguous,
    /// Not in the store.
    Unknown,
}

/// What the gateway refuses in a client's request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// No key presented.
    MissingCredentials,
    /// A key that is not valid.
    InvalidKey(InvalidReason),
    /// A known key that was deactivated.
    InactiveKey,
    /// A known key past its expiry.
    ExpiredKey,
    /// An old key whose rotation grace period is over.
    RotatedKey,
    /// A valid key used from outside its networks or scopes.
    Forbidden(Denied),
    /// A method the gateway never forwards (CONNECT, TRACE).
    MethodNotAllowed(&'static str),
    /// A declared body length past 2^63-1.
    BadContentLength,
    /// The request target is longer than `server.max_uri_bytes`.
    UriTooLong,
    /// The body is larger than `server.max_body_bytes` (declared, or found while streaming).
    PayloadTooLarge,
    /// The client's request body broke off or was malformed while it was being forwarded (the
    /// upstream saw an aborted request).
    BadRequestBody,
    /// The client stopped sending its request body for `server.body_read_timeout`.
    BodyTimeout,
    /// Over a rate limit (per key, or failed authentications per client IP).
    RateLimited(Throttled),
}

/// Everything that can stop a request at the gateway, by where it arose.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GatewayError {
    /// The client's request or credential.
    #[error("refused: {}", .0.reason())]
    Client(Refused),
    /// The key store could not answer, and the key was not cached.
    #[error("key store unavailable")]
    Store,
    /// The upstream failed; `retry`: the request never reached it (a failed connect).
    #[error("upstream {} failure", .kind.as_str())]
    Upstream {
        /// What failed.
        kind: UpstreamErrorKind,
        /// The request never reached the upstream.
        retry: bool,
    },
}

impl From<Refused> for GatewayError {
    fn from(refused: Refused) -> Self {
        GatewayError::Client(refused)
    }
}

impl Refused {
    /// HTTP status.
    fn status(&self) -> StatusCode {
        match self {
            Refused::MissingCredentials
            | Refused::InvalidKey(_)
            | Refused::InactiveKey
            | Refused::ExpiredKey
            | Refused::RotatedKey => StatusCode::UNAUTHORIZED,
            Refused::Forbidden(_) => StatusCode::FORBIDDEN,
            Refused::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Refused::UriTooLong => StatusCode::URI_TOO_LONG,
            Refused::BadContentLength | Refused::BadRequestBody => StatusCode::BAD_REQUEST,
            Refused::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            Refused::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Refused::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
        }
    }

    /// Whether this is a failed attempt with a credential (the per-IP brute-force budget).
    pub fn is_failed_attempt(&self) -> bool {
        match self {
            Refused::InvalidKey(_)
            | Refused::InactiveKey
            | Refused::ExpiredKey
            | Refused::RotatedKey => true,
            Refused::MissingCredentials
            | Refused::Forbidden(_)
            | Refused::MethodNotAllowed(_)
            | Refused::BadContentLength
            | Refused::UriTooLong
            | Refused::PayloadTooLarge
            | Refused::BadRequestBody
            | Refused::BodyTimeout
            | Refused::RateLimited(_) => false,
        }
    }

    /// The auth decision this refusal records, if it is one.
    fn auth_reason(&self) -> Option<AuthReason> {
        match self {
            Refused::MissingCredentials => Some(AuthReason::Missing),
            Refused::InvalidKey(InvalidReason::Unknown) => Some(AuthReason::Unknown),
            Refused::InvalidKey(
                InvalidReason::Malformed(_) | InvalidReason::TooLong | InvalidReason::Ambiguous,
            ) => Some(AuthReason::Malformed),
            Refused::InactiveKey => Some(AuthReason::Inactive),
            Refused::ExpiredKey => Some(AuthReason::Expired),
            Refused::RotatedKey => Some(AuthReason::Rotated),
            Refused::Forbidden(_) => Some(AuthReason::Forbidden),
            Refused::MethodNotAllowed(_)
            | Refused::BadContentLength
            | Refused::UriTooLong
            | Refused::PayloadTooLarge
            | Refused::BadRequestBody
            | Refused::BodyTimeout
            | Refused::RateLimited(_) => None,
        }
    }

    /// Short reason for logs.
    fn reason(&self) -> &'static str {
        match self {
            Refused::MissingCredentials => "missing",
            Refused::InvalidKey(InvalidReason::Malformed(FormatError::Shape)) => "malformed_shape",
            Refused::InvalidKey(InvalidReason::Malformed(FormatError::Alphabet)) => {
                "malformed_alphabet"
            }
            Refused::InvalidKey(InvalidReason::Malformed(FormatError::Checksum)) => {
                "malformed_checksum"
            }
            Refused::InvalidKey(InvalidReason::TooLong) => "malformed_too_long",
            Refused::InvalidKey(InvalidReason::Ambiguous) => "ambiguous_credentials",
            Refused::InvalidKey(InvalidReason::Unknown) => "unknown",
            Refused::InactiveKey => "inactive",
            Refused::ExpiredKey => "expired",
            Refused::RotatedKey => "rotated",
            Refused::Forbidden(Denied::Address) => "ip_not_allowed",
            Refused::Forbidden(Denied::Scope) => "out_of_scope",
            Refused::MethodNotAllowed(_) => "method_not_allowed",
            Refused::BadContentLength => "bad_content_length",
            Refused::UriTooLong => "uri_too_long",
            Refused::PayloadTooLarge => "body_too_large",
            Refused::BadRequestBody => "bad_request_body",
            Refused::BodyTimeout => "body_timeout",
            Refused::RateLimited(t) => match t.kind {
                LimitKind::Key => "rate_limited_key",
                LimitKind::IpFailures => "ip_locked_out",
            },
        }
    }

    /// The JSON body (static bytes, but for the throttle's wait time).
    fn body(&self) -> Bytes {
        if let Refused::RateLimited(t) = self {
            // The old API's throttle wording (Django REST Framework).
            return Bytes::from(format!(
                r#"{{"detail":"Request was throttled. Expected available in {} seconds."}}"#,
                ceil_secs(t.retry_after)
            ));
        }
        Bytes::from_static(match self {
            Refused::MissingCredentials => {
                br#"{"detail":"Authentication credentials were not provided."}"#
            }
            Refused::InvalidKey(_) => br#"{"detail":"Invalid API key"}"#,
            Refused::InactiveKey => br#"{"detail":"API key is inactive"}"#,
            Refused::ExpiredKey => br#"{"detail":"API key has expired"}"#,
            Refused::RotatedKey => br#"{"detail":"API key has been rotated; use its replacement"}"#,
            Refused::Forbidden(_) => {
                br#"{"detail":"You do not have permission to perform this action."}"#
            }
            // Django REST Framework's wording for a method a view does not allow.
            Refused::MethodNotAllowed("CONNECT") => {
                br#"{"detail":"Method \"CONNECT\" not allowed."}"#
            }
            Refused::MethodNotAllowed(_) => br#"{"detail":"Method \"TRACE\" not allowed."}"#,
            Refused::BadContentLength => br#"{"detail":"Content-Length out of range."}"#,
            Refused::UriTooLong => br#"{"detail":"Request URI too long."}"#,
            Refused::BadRequestBody => br#"{"detail":"Malformed or incomplete request body."}"#,
            Refused::BodyTimeout => br#"{"detail":"Request body timed out."}"#,
            Refused::PayloadTooLarge => br#"{"detail":"Request body too large."}"#,
            Refused::RateLimited(_) => br#"{"detail":"Request was throttled."}"#,
        })
    }
}

impl GatewayError {
    /// HTTP status for this error.
    pub fn status(&self) -> StatusCode {
        match self {
            GatewayError::Client(refused) => refused.status(),
            GatewayError::Store => StatusCode::SERVICE_UNAVAILABLE,
            GatewayError::Upstream {
                kind: UpstreamErrorKind::Timeout,
                ..
            } => StatusCode::GATEWAY_TIMEOUT,
            GatewayError::Upstream {
                kind: UpstreamErrorKind::Connect | UpstreamErrorKind::Protocol,
                ..
            } => StatusCode::BAD_GATEWAY,
        }
    }

    /// Whether the client may send the same request again: it did not reach the upstream, and
    /// waiting may help (a rate limit, a store or upstream that could not be reached).
    pub fn may_retry(&self) -> bool {
        match self {
            GatewayError::Client(Refused::RateLimited(_)) | GatewayError::Store => true,
            GatewayError::Client(_) => false,
            GatewayError::Upstream { retry, .. } => *retry,
        }
    }

    /// The auth decision this error records, if it is one.
    pub fn auth_reason(&self) -> Option<AuthReason> {
        match self {
            GatewayError::Client(refused) => refused.auth_reason(),
            GatewayError::Store => Some(AuthReason::StoreUnavailable),
            GatewayError::Upstream { .. } => None,
        }
    }

    /// Short reason for logs (never contains request data).
    pub fn reason(&self) -> &'static str {
        match self {
            GatewayError::Client(refused) => refused.reason(),
            GatewayError::Store => "store_unavailable",
            GatewayError::Upstream { kind, .. } => match kind {
                UpstreamErrorKind::Connect => "upstream_connect",
                UpstreamErrorKind::Timeout => "upstream_timeout",
                UpstreamErrorKind::Protocol => "upstream_protocol",
            },
        }
    }

    /// The JSON body.
    fn body(&self) -> Bytes {
        match self {
            GatewayError::Client(refused) => refused.body(),
            GatewayError::Store => Bytes::from_static(
                br#"{"detail":"Authentication service temporarily unavailable. Please retry."}"#,
            ),
            GatewayError::Upstream {
                kind: UpstreamErrorKind::Timeout,
                ..
            } => {
                Bytes::from_static(br#"{"detail":"The upstream service did not respond in time."}"#)
            }
            GatewayError::Upstream {
                kind: UpstreamErrorKind::Connect | UpstreamErrorKind::Protocol,
                ..
            } => Bytes::from_static(br#"{"detail":"The upstream service is unavailable."}"#),
        }
    }
}

/// `RateLimit-Policy` (draft-ietf-httpapi-ratelimit-headers).
pub const RATELIMIT_POLICY: http::HeaderName = http::HeaderName::from_static("ratelimit-policy");
/// `RateLimit` (draft-ietf-httpapi-ratelimit-headers).
pub const RATELIMIT: http::HeaderName = http::HeaderName::from_static("ratelimit");

/// Renders errors: the header values they carry, prepared once from configuration.
#[derive(Debug, Clone)]
pub struct ErrorResponses {
    /// Challenge for a request without credentials.
    challenge: HeaderValue,
    /// Challenge for a request with an invalid, inactive or expired key (RFC 6750
    /// `invalid_token`).
    challenge_invalid: HeaderValue,
    /// `Retry-After` for 503.
    retry_after: HeaderValue,
    /// `Allow` for 405: the methods the gateway forwards.
    allow: HeaderValue,
}

impl ErrorResponses {
    /// Builds the challenges for `realm` (validated by the config loader to be header-safe).
    pub fn new(realm: &str) -> Self {
        let value = |s: String| {
            HeaderValue::from_str(&s).unwrap_or_else(|_| HeaderValue::from_static("Bearer"))
        };
        Self {
            challenge: value(format!("Bearer realm=\"{realm}\"")),
            challenge_invalid: value(format!("Bearer realm=\"{realm}\", error=\"invalid_token\"")),
            retry_after: HeaderValue::from_static("1"),
            allow: HeaderValue::from_static("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"),
        }
    }

    /// The response for `err`: its status, JSON body and the headers it calls for.
    pub fn render(&self, err: &GatewayError) -> Response<Bytes> {
        let mut response = Response::new(err.body());
        *response.status_mut() = err.status();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        match err {
            GatewayError::Client(Refused::MissingCredentials) => {
                headers.insert(header::WWW_AUTHENTICATE, self.challenge.clone());
            }
            GatewayError::Client(
                Refused::InvalidKey(_)
                | Refused::InactiveKey
                | Refused::ExpiredKey
                | Refused::RotatedKey,
            ) => {
                headers.insert(header::WWW_AUTHENTICATE, self.challenge_invalid.clone());
            }
            GatewayError::Store => {
                headers.insert(header::RETRY_AFTER, self.retry_after.clone());
            }
            GatewayError::Client(Refused::RateLimited(t)) => {
                headers.insert(
                    header::RETRY_AFTER,
                    HeaderValue::from(ceil_secs(t.retry_after)),
                );
                headers.insert(RATELIMIT_POLICY, t.policy.clone());
                headers.insert(RATELIMIT, rate_limit_field(t.kind, 0, t.retry_after));
            }
            GatewayError::Client(Refused::MethodNotAllowed(_)) => {
                headers.insert(header::ALLOW, self.allow.clone());
            }
            GatewayError::Client(Refused::BodyTimeout) => {
                // The rest of the body will not be read: the connection cannot carry another
                // request.
                headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            GatewayError::Upstream { .. }
            | GatewayError::Client(
                Refused::Forbidden(_)
                | Refused::BadContentLength
                | Refused::UriTooLong
                | Refused::PayloadTooLarge
                | Refused::BadRequestBody,
            ) => {}
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_follow_the_contract() {
        assert_eq!(
            GatewayError::Client(Refused::MissingCredentials).status(),
            401
        );
        assert_eq!(
            GatewayError::Client(Refused::InvalidKey(InvalidReason::Unknown)).status(),
            401
        );
        assert_eq!(GatewayError::Client(Refused::InactiveKey).status(), 401);
        assert_eq!(GatewayError::Store.status(), 503);
        let upstream = |kind| GatewayError::Upstream { kind, retry: false };
        assert_eq!(upstream(UpstreamErrorKind::Connect).status(), 502);
        assert_eq!(upstream(UpstreamErrorKind::Timeout).status(), 504);
    }

    #[test]
    fn bodies_are_json_with_detail_and_no_internal_text() {
        for e in [
            GatewayError::Client(Refused::MissingCredentials),
            GatewayError::Client(Refused::InvalidKey(InvalidReason::Ambiguous)),
            GatewayError::Client(Refused::InactiveKey),
            GatewayError::Client(Refused::ExpiredKey),
            GatewayError::Store,
            GatewayError::Upstream {
                kind: UpstreamErrorKind::Protocol,
                retry: false,
            },
        ] {
            let v: serde_json::Value = serde_json::from_slice(&e.body()).unwrap();
            assert!(v["detail"].is_string());
            assert_eq!(v.as_object().unwrap().len(), 1, "{v}");
        }
    }

    #[test]
    fn rejections_carry_a_challenge_and_503_a_retry_after() {
        let r = ErrorResponses::new("keygate");
        let resp = r.render(&GatewayError::Client(Refused::InactiveKey));
        assert_eq!(
            resp.headers()[header::WWW_AUTHENTICATE],
            "Bearer realm=\"keygate\", error=\"invalid_token\""
        );
        let resp = r.render(&GatewayError::Store);
        assert_eq!(resp.headers()[header::RETRY_AFTER], "1");
        assert!(!resp.headers().contains_key(header::WWW_AUTHENTICATE));
    }

    #[test]
    fn only_what_never_reached_the_upstream_may_be_retried() {
        assert!(GatewayError::Store.may_retry());
        assert!(
            GatewayError::Upstream {
                kind: UpstreamErrorKind::Connect,
                retry: true
            }
            .may_retry()
        );
        assert!(
            !GatewayError::Upstream {
                kind: UpstreamErrorKind::Timeout,
                retry: false
            }
            .may_retry()
        );
        assert!(!GatewayError::Client(Refused::InvalidKey(InvalidReason::Unknown)).may_retry());
    }
}
