//! The request path's one error type, and the one place it becomes a response.
//!
//! Bodies are JSON with a `detail` field in the old Django API's wording, so existing clients keep
//! working. The match from error to status is exhaustive: a new variant must choose its status.

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, StatusCode, header};

use crate::cache::KnownKey;
use crate::policy::Denied;
use crate::ratelimit::{LimitKind, Throttled, ceil_secs, rate_limit_field};

use crate::key::FormatError;
use crate::metrics::{AuthReason, UpstreamErrorKind};

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

/// Everything that can stop a request at the gateway.
#[derive(Debug, Clone, thiserror::Error)]
pub enum GatewayError {
    /// No key presented.
    #[error("no credentials")]
    MissingCredentials,
    /// A key that is not valid.
    #[error("invalid API key ({0:?})")]
    InvalidKey(InvalidReason),
    /// A known key that was deactivated (carried for the log line: which key was tried).
    #[error("inactive API key")]
    InactiveKey(Arc<KnownKey>),
    /// A known key past its expiry.
    #[error("expired API key")]
    ExpiredKey(Arc<KnownKey>),
    /// An old key whose rotation grace period is over.
    #[error("rotated API key")]
    RotatedKey(Arc<KnownKey>),
    /// A valid key used from outside its networks or scopes.
    #[error("forbidden by the key's policy ({0:?})")]
    Forbidden(Denied, Arc<KnownKey>),
    /// The store could not answer and the key was not cached.
    #[error("key store unavailable")]
    StoreUnavailable,
    /// The upstream failed.
    #[error("upstream {0:?} failure")]
    Upstream(UpstreamErrorKind),
    /// A method the gateway never forwards (CONNECT, TRACE).
    #[error("method {0} not allowed")]
    MethodNotAllowed(&'static str),
    /// A declared body length past 2^63-1.
    #[error("Content-Length out of range")]
    BadContentLength,
    /// The client's request body broke off or was malformed while it was being forwarded (the
    /// upstream saw an aborted request).
    #[error("bad request body")]
    BadRequestBody,
    /// The client stopped sending its request body for `server.body_read_timeout`.
    #[error("request body timed out")]
    BodyTimeout,
    /// The request target is longer than `server.max_uri_bytes`.
    #[error("request target too long")]
    UriTooLong,
    /// The declared body is larger than `server.max_body_bytes`.
    #[error("request body too large")]
    PayloadTooLarge,
    /// Over a rate limit (per key, or failed authentications per client IP).
    #[error("rate limited ({})", .0.kind.as_str())]
    RateLimited(Throttled),
}

impl GatewayError {
    /// HTTP status for this error.
    pub fn status(&self) -> StatusCode {
        match self {
            GatewayError::MissingCredentials
            | GatewayError::InvalidKey(_)
            | GatewayError::InactiveKey(_)
            | GatewayError::ExpiredKey(_)
            | GatewayError::RotatedKey(_) => StatusCode::UNAUTHORIZED,
            GatewayError::Forbidden(..) => StatusCode::FORBIDDEN,
            GatewayError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            GatewayError::UriTooLong => StatusCode::URI_TOO_LONG,
            GatewayError::BadContentLength | GatewayError::BadRequestBody => {
                StatusCode::BAD_REQUEST
            }
            GatewayError::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            GatewayError::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            GatewayError::StoreUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            GatewayError::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            GatewayError::Upstream(UpstreamErrorKind::Timeout) => StatusCode::GATEWAY_TIMEOUT,
            GatewayError::Upstream(UpstreamErrorKind::Connect | UpstreamErrorKind::Protocol) => {
                StatusCode::BAD_GATEWAY
            }
        }
    }

    /// The auth decision this error records, if it is one.
    pub fn auth_reason(&self) -> Option<AuthReason> {
        match self {
            GatewayError::MissingCredentials => Some(AuthReason::Missing),
            GatewayError::InvalidKey(InvalidReason::Unknown) => Some(AuthReason::Unknown),
            GatewayError::InvalidKey(
                InvalidReason::Malformed(_) | InvalidReason::TooLong | InvalidReason::Ambiguous,
            ) => Some(AuthReason::Malformed),
            GatewayError::InactiveKey(_) => Some(AuthReason::Inactive),
            GatewayError::ExpiredKey(_) => Some(AuthReason::Expired),
            GatewayError::RotatedKey(_) => Some(AuthReason::Rotated),
            GatewayError::Forbidden(..) => Some(AuthReason::Forbidden),
            GatewayError::StoreUnavailable => Some(AuthReason::StoreUnavailable),
            GatewayError::Upstream(_)
            | GatewayError::RateLimited(_)
            | GatewayError::MethodNotAllowed(_)
            | GatewayError::BadContentLength
            | GatewayError::UriTooLong
            | GatewayError::PayloadTooLarge
            | GatewayError::BadRequestBody
            | GatewayError::BodyTimeout => None,
        }
    }

    /// The known key involved in a rejection, if any.
    pub fn key(&self) -> Option<&Arc<KnownKey>> {
        match self {
            GatewayError::InactiveKey(k)
            | GatewayError::ExpiredKey(k)
            | GatewayError::RotatedKey(k)
            | GatewayError::Forbidden(_, k) => Some(k),
            GatewayError::MissingCredentials
            | GatewayError::InvalidKey(_)
            | GatewayError::StoreUnavailable
            | GatewayError::Upstream(_)
            | GatewayError::RateLimited(_)
            | GatewayError::MethodNotAllowed(_)
            | GatewayError::BadContentLength
            | GatewayError::UriTooLong
            | GatewayError::PayloadTooLarge
            | GatewayError::BadRequestBody
            | GatewayError::BodyTimeout => None,
        }
    }

    /// Short reason for logs (never contains request data).
    pub fn reason(&self) -> &'static str {
        match self {
            GatewayError::InvalidKey(InvalidReason::Malformed(FormatError::Shape)) => {
                "malformed_shape"
            }
            GatewayError::InvalidKey(InvalidReason::Malformed(FormatError::Alphabet)) => {
                "malformed_alphabet"
            }
            GatewayError::InvalidKey(InvalidReason::Malformed(FormatError::Checksum)) => {
                "malformed_checksum"
            }
            GatewayError::InvalidKey(InvalidReason::TooLong) => "malformed_too_long",
            GatewayError::InvalidKey(InvalidReason::Ambiguous) => "ambiguous_credentials",
            GatewayError::Upstream(kind) => match kind {
                UpstreamErrorKind::Connect => "upstream_connect",
                UpstreamErrorKind::Timeout => "upstream_timeout",
                UpstreamErrorKind::Protocol => "upstream_protocol",
            },
            GatewayError::RateLimited(t) => match t.kind {
                LimitKind::Key => "rate_limited_key",
                LimitKind::IpFailures => "ip_locked_out",
            },
            GatewayError::Forbidden(Denied::Address, _) => "ip_not_allowed",
            GatewayError::Forbidden(Denied::Scope, _) => "out_of_scope",
            GatewayError::MethodNotAllowed(_) => "method_not_allowed",
            GatewayError::BadContentLength => "bad_content_length",
            GatewayError::UriTooLong => "uri_too_long",
            GatewayError::BadRequestBody => "bad_request_body",
            GatewayError::BodyTimeout => "body_timeout",
            GatewayError::PayloadTooLarge => "body_too_large",
            GatewayError::MissingCredentials
            | GatewayError::InvalidKey(InvalidReason::Unknown)
            | GatewayError::InactiveKey(_)
            | GatewayError::ExpiredKey(_)
            | GatewayError::RotatedKey(_)
            | GatewayError::StoreUnavailable => {
                self.auth_reason().map_or("error", AuthReason::as_str)
            }
        }
    }

    /// The JSON body (static bytes, but for the throttle's wait time).
    pub fn body(&self) -> Bytes {
        if let GatewayError::RateLimited(t) = self {
            // The old API's throttle wording (Django REST Framework).
            return Bytes::from(format!(
                r#"{{"detail":"Request was throttled. Expected available in {} seconds."}}"#,
                ceil_secs(t.retry_after)
            ));
        }
        Bytes::from_static(match self {
            GatewayError::MissingCredentials => {
                br#"{"detail":"Authentication credentials were not provided."}"#
            }
            GatewayError::InvalidKey(_) => br#"{"detail":"Invalid API key"}"#,
            GatewayError::InactiveKey(_) => br#"{"detail":"API key is inactive"}"#,
            GatewayError::ExpiredKey(_) => br#"{"detail":"API key has expired"}"#,
            GatewayError::RotatedKey(_) => {
                br#"{"detail":"API key has been rotated; use its replacement"}"#
            }
            GatewayError::Forbidden(..) => {
                br#"{"detail":"You do not have permission to perform this action."}"#
            }
            // Django REST Framework's wording for a method a view does not allow.
            GatewayError::MethodNotAllowed("CONNECT") => {
                br#"{"detail":"Method \"CONNECT\" not allowed."}"#
            }
            GatewayError::MethodNotAllowed(_) => br#"{"detail":"Method \"TRACE\" not allowed."}"#,
            GatewayError::BadContentLength => br#"{"detail":"Content-Length out of range."}"#,
            GatewayError::UriTooLong => br#"{"detail":"Request URI too long."}"#,
            GatewayError::BadRequestBody => {
                br#"{"detail":"Malformed or incomplete request body."}"#
            }
            GatewayError::BodyTimeout => br#"{"detail":"Request body timed out."}"#,
            GatewayError::PayloadTooLarge => br#"{"detail":"Request body too large."}"#,
            GatewayError::StoreUnavailable => {
                br#"{"detail":"Authentication service temporarily unavailable. Please retry."}"#
            }
            GatewayError::Upstream(UpstreamErrorKind::Timeout) => {
                br#"{"detail":"The upstream service did not respond in time."}"#
            }
            GatewayError::Upstream(UpstreamErrorKind::Connect | UpstreamErrorKind::Protocol) => {
                br#"{"detail":"The upstream service is unavailable."}"#
            }
            GatewayError::RateLimited(_) => br#"{"detail":"Request was throttled."}"#,
        })
    }
}

/// `RateLimit-Policy` (draft-ietf-httpapi-ratelimit-headers).
pub const RATELIMIT_POLICY: http::HeaderName = http::HeaderName::from_static("ratelimit-policy");
/// `RateLimit` (draft-ietf-httpapi-ratelimit-headers).
pub const RATELIMIT: http::HeaderName = http::HeaderName::from_static("ratelimit");

/// Header values used when rendering errors, prepared once from configuration.
#[derive(Debug, Clone)]
pub struct ErrorHeaders {
    /// Challenge for a request without credentials.
    pub challenge: HeaderValue,
    /// Challenge for a request with an invalid, inactive or expired key (RFC 6750 `invalid_token`).
    pub challenge_invalid: HeaderValue,
    /// `Retry-After` for 503.
    pub retry_after: HeaderValue,
    /// `Allow` for 405: the methods the gateway forwards.
    pub allow: HeaderValue,
}

impl ErrorHeaders {
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

    /// Adds the headers `err` calls for.
    pub fn apply(&self, err: &GatewayError, headers: &mut http::HeaderMap) {
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        match err {
            GatewayError::MissingCredentials => {
                headers.insert(header::WWW_AUTHENTICATE, self.challenge.clone());
            }
            GatewayError::InvalidKey(_)
            | GatewayError::InactiveKey(_)
            | GatewayError::ExpiredKey(_)
            | GatewayError::RotatedKey(_) => {
                headers.insert(header::WWW_AUTHENTICATE, self.challenge_invalid.clone());
            }
            GatewayError::StoreUnavailable => {
                headers.insert(header::RETRY_AFTER, self.retry_after.clone());
            }
            GatewayError::RateLimited(t) => {
                headers.insert(
                    header::RETRY_AFTER,
                    HeaderValue::from(ceil_secs(t.retry_after)),
                );
                headers.insert(RATELIMIT_POLICY, t.policy.clone());
                headers.insert(RATELIMIT, rate_limit_field(t.kind, 0, t.retry_after));
            }
            GatewayError::MethodNotAllowed(_) => {
                headers.insert(header::ALLOW, self.allow.clone());
            }
            GatewayError::BodyTimeout => {
                // The rest of the body will not be read: the connection cannot carry another
                // request.
                headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            GatewayError::Upstream(_)
            | GatewayError::Forbidden(..)
            | GatewayError::BadContentLength
            | GatewayError::UriTooLong
            | GatewayError::PayloadTooLarge
            | GatewayError::BadRequestBody => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn known() -> Arc<KnownKey> {
        let secret = crate::key::generate().unwrap();
        let record = crate::store::KeyRecord {
            is_active: false,
            ..crate::store::KeyRecord::new("test", &secret, 0, None).unwrap()
        };
        let now = std::time::Instant::now();
        Arc::new(KnownKey::new(record, now, now, now))
    }

    #[test]
    fn statuses_follow_the_contract() {
        assert_eq!(GatewayError::MissingCredentials.status(), 401);
        assert_eq!(
            GatewayError::InvalidKey(InvalidReason::Unknown).status(),
            401
        );
        assert_eq!(GatewayError::InactiveKey(known()).status(), 401);
        assert_eq!(GatewayError::StoreUnavailable.status(), 503);
        assert_eq!(
            GatewayError::Upstream(UpstreamErrorKind::Connect).status(),
            502
        );
        assert_eq!(
            GatewayError::Upstream(UpstreamErrorKind::Timeout).status(),
            504
        );
    }

    #[test]
    fn bodies_are_json_with_detail() {
        for e in [
            GatewayError::MissingCredentials,
            GatewayError::InvalidKey(InvalidReason::Ambiguous),
            GatewayError::InactiveKey(known()),
            GatewayError::ExpiredKey(known()),
            GatewayError::StoreUnavailable,
            GatewayError::Upstream(UpstreamErrorKind::Protocol),
        ] {
            let v: serde_json::Value = serde_json::from_slice(&e.body()).unwrap();
            assert!(v["detail"].is_string());
        }
    }

    #[test]
    fn rejections_carry_a_challenge_and_503_a_retry_after() {
        let h = ErrorHeaders::new("keygate");
        let mut map = http::HeaderMap::new();
        h.apply(&GatewayError::InactiveKey(known()), &mut map);
        assert_eq!(
            map[header::WWW_AUTHENTICATE],
            "Bearer realm=\"keygate\", error=\"invalid_token\""
        );
        let mut map = http::HeaderMap::new();
        h.apply(&GatewayError::StoreUnavailable, &mut map);
        assert_eq!(map[header::RETRY_AFTER], "1");
        assert!(!map.contains_key(header::WWW_AUTHENTICATE));
    }
}
