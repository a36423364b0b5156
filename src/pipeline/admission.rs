//! Stage 2: what the gateway refuses before it looks at the credential (a method it never
//! forwards, a target too long, a declared body too large or out of range), and what a path
//! allows (its body limit, whether it is public).

use http::Method;
use http::request::Parts;

use super::Gateway;
use crate::error::Refused;
use crate::policy::is_plain_path;

/// The largest `Content-Length` accepted: 2^63-1, what a signed 64-bit length holds (nginx's
/// limit too). A larger one is refused by some hops and misread by others (RFC 9110 §8.6).
const MAX_CONTENT_LENGTH: u64 = i64::MAX as u64;

impl Gateway {
    /// Checks the request line and the declared body length (`declared`); returns the body
    /// limit that applies to the request.
    pub(super) fn admit(&self, parts: &Parts, declared: u64) -> Result<Option<u64>, Refused> {
        if matches!(parts.method, Method::CONNECT | Method::TRACE) {
            // CONNECT would make the upstream connection a tunnel; TRACE would echo the
            // gateway's added headers back to whoever asked.
            return Err(Refused::MethodNotAllowed(
                if parts.method == Method::CONNECT {
                    "CONNECT"
                } else {
                    "TRACE"
                },
            ));
        }
        if parts.uri.path_and_query().map_or(0, |pq| pq.as_str().len()) > self.max_uri_bytes {
            return Err(Refused::UriTooLong);
        }
        if declared > MAX_CONTENT_LENGTH {
            return Err(Refused::BadContentLength);
        }
        let limit = self.body_limit(parts.uri.path());
        if limit.is_some_and(|max| declared > max) {
            // Refused before a byte of the body is read or forwarded.
            return Err(Refused::PayloadTooLarge);
        }
        Ok(limit)
    }

    /// The body limit for `path`: its longest `max_body_bytes_by_prefix` entry, else the global.
    /// A path that could resolve into another one (dot segments, encoded separators) gets the
    /// smallest limit of all: it cannot be told which prefix the upstream will see it under.
    fn body_limit(&self, path: &str) -> Option<u64> {
        if self.max_body_bytes_by_prefix.is_empty() {
            return self.max_body_bytes;
        }
        if !is_plain_path(path) {
            return self
                .max_body_bytes_by_prefix
                .iter()
                .map(|(_, limit)| *limit)
                .chain([self.max_body_bytes])
                .min_by_key(|limit| limit.unwrap_or(u64::MAX))
                .flatten();
        }
        self.max_body_bytes_by_prefix
            .iter()
            .find(|(prefix, _)| path.starts_with(prefix.as_str()))
            .map_or(self.max_body_bytes, |(_, limit)| *limit)
    }

    /// Whether `path` is under a public prefix. A path with dot segments or encoded separators
    /// never is: `/public/../admin` would reach `/admin` at the upstream.
    pub(super) fn is_public(&self, path: &str) -> bool {
        !self.public_paths.is_empty()
            && is_plain_path(path)
            && self
                .public_paths
                .iter()
                .any(|p| path.starts_with(p.as_str()))
    }
}
