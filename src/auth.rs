//! Authentication: find the credential in the request, check its format offline, resolve it through
//! the cache, and apply the key's state (active, expiry).
//!
//! The key is read from the configured key header (`X-API-Key`), else from `Authorization: Bearer`
//! (scheme matched case-insensitively, as RFC 7235 says). Never from the query string. A header
//! present twice is refused rather than guessed at.

use std::sync::Arc;

use http::{HeaderMap, HeaderName, header};

use crate::cache::{Entry, KeyCache, KnownKey, Source};
use crate::config;
use crate::error::{GatewayError, InvalidReason, Refused};
use crate::key::{MAX_PRESENTED_LEN, Presented};
use crate::store::unix_now;

/// Which header carried the credential (so exactly that one is stripped before forwarding).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialSource {
    /// The configured key header.
    KeyHeader,
    /// `Authorization: Bearer`.
    Bearer,
}

/// A successful authentication.
#[derive(Debug, Clone)]
pub struct Authenticated {
    /// The key's cached record.
    pub key: Arc<KnownKey>,
    /// Where the credential was found.
    pub source: CredentialSource,
    /// Whether the decision came from the cache, the store, or a stale entry.
    pub cache: Source,
    /// The key was rotated and is inside its grace period.
    pub in_grace: bool,
}

/// A refused authentication: why, and the key when one was identified (an inactive, expired or
/// rotated key), for the log.
#[derive(Debug)]
pub struct Denial {
    /// Why.
    pub error: GatewayError,
    /// The key involved, if one was found.
    pub key: Option<Arc<KnownKey>>,
}

impl From<Refused> for Denial {
    fn from(refused: Refused) -> Self {
        Self {
            error: refused.into(),
            key: None,
        }
    }
}

/// Reads credentials as `[auth]` says.
#[derive(Debug, Clone)]
pub struct Authenticator {
    key_header: HeaderName,
    bearer_fallback: bool,
}

impl Authenticator {
    /// From the validated `[auth]` section.
    pub fn new(cfg: &config::Auth) -> Self {
        Self {
            key_header: cfg.key_header.clone(),
            bearer_fallback: cfg.bearer_fallback,
        }
    }

    /// The configured key header.
    pub fn key_header(&self) -> &HeaderName {
        &self.key_header
    }

    /// Finds the presented credential, or says why there is none usable.
    pub fn credential<'h>(
        &self,
        headers: &'h HeaderMap,
    ) -> Result<(Presented<'h>, CredentialSource), Refused> {
        let mut values = headers.get_all(&self.key_header).iter();
        if let Some(first) = values.next() {
            if values.next().is_some() {
                return Err(Refused::InvalidKey(InvalidReason::Ambiguous));
            }
            let raw = trim(first.as_bytes());
            // An empty header counts as absent, as in the old API ("if not api_key").
            if !raw.is_empty() {
                return Ok((Presented::new(raw), CredentialSource::KeyHeader));
            }
        }
        if self.bearer_fallback {
            let mut values = headers.get_all(header::AUTHORIZATION).iter();
            if let Some(first) = values.next()
                && let Some(token) = bearer_token(first.as_bytes())
            {
                if values.next().is_some() {
                    return Err(Refused::InvalidKey(InvalidReason::Ambiguous));
                }
                return Ok((Presented::new(token), CredentialSource::Bearer));
            }
        }
        Err(Refused::MissingCredentials)
    }

    /// Authenticates the request's credential against `cache`.
    pub async fn authenticate(
        &self,
        headers: &HeaderMap,
        cache: &KeyCache,
    ) -> Result<Authenticated, Denial> {
        let (presented, source) = self.credential(headers)?;
        if presented.len() > MAX_PRESENTED_LEN {
            return Err(Refused::InvalidKey(InvalidReason::TooLong).into());
        }
        if let Err(e) = presented.check_format() {
            // Imported legacy keys have no checksum: only while some exist does a malformed key
            // earn a (cached) lookup.
            if !cache.legacy_present() {
                return Err(Refused::InvalidKey(InvalidReason::Malformed(e)).into());
            }
        }
        let (entry, cache_source) =
            cache
                .resolve(presented.digest())
                .await
                .map_err(|_| Denial {
                    error: GatewayError::Store,
                    key: None,
                })?;
        let key = match entry {
            Entry::Known(key) => key,
            Entry::Unknown { .. } => {
                return Err(Refused::InvalidKey(InvalidReason::Unknown).into());
            }
        };
        let now = unix_now();
        let refused = if !key.record.is_active {
            Some(Refused::InactiveKey)
        } else if key.record.is_expired(now) {
            Some(match key.record.rotated_to {
                Some(_) => Refused::RotatedKey,
                None => Refused::ExpiredKey,
            })
        } else {
            None
        };
        if let Some(refused) = refused {
            return Err(Denial {
                error: refused.into(),
                key: Some(key),
            });
        }
        let in_grace = key.record.rotated_to.is_some();
        cache.touch(&key, now);
        Ok(Authenticated {
            key,
            source,
            cache: cache_source,
            in_grace,
        })
    }
}

fn trim(mut b: &[u8]) -> &[u8] {
    while let [first, rest @ ..] = b
        && first.is_ascii_whitespace()
    {
        b = rest;
    }
    while let [rest @ .., last] = b
        && last.is_ascii_whitespace()
    {
        b = rest;
    }
    b
}

/// The token of `Bearer <token>`, scheme case-insensitive; `None` for other schemes or no token.
fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    let value = trim(value);
    let (scheme, rest) = value.split_at_checked(6)?;
    if !scheme.eq_ignore_ascii_case(b"bearer")
        || !rest.first().is_some_and(|b| *b == b' ' || *b == b'\t')
    {
        return None;
    }
    let token = trim(rest);
    (!token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth() -> Authenticator {
        Authenticator {
            key_header: HeaderName::from_static("x-api-key"),
            bearer_fallback: true,
        }
    }

    use crate::http::header_map as headers;

    fn found(pairs: &[(&str, &str)]) -> Result<(Vec<u8>, CredentialSource), Refused> {
        let h = headers(pairs);
        auth()
            .credential(&h)
            .map(|(p, s)| (format!("{}", p.len()).into_bytes(), s))
    }

    #[test]
    fn key_header_wins_over_bearer() {
        let (_, source) =
            found(&[("x-api-key", "sk_a"), ("authorization", "Bearer sk_b")]).unwrap();
        assert_eq!(source, CredentialSource::KeyHeader);
    }

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        for v in ["Bearer sk_x", "bearer sk_x", "BEARER  sk_x", "BeArEr\tsk_x"] {
            let (_, source) = found(&[("authorization", v)]).unwrap();
            assert_eq!(source, CredentialSource::Bearer, "{v}");
        }
    }

    #[test]
    fn other_schemes_and_empty_values_are_missing() {
        for pairs in [
            vec![],
            vec![("authorization", "Basic dXNlcjpwYXNz")],
            vec![("authorization", "Bearer")],
            vec![("authorization", "Bearer   ")],
            vec![("authorization", "Bearersk_x")],
            vec![("x-api-key", "")],
            vec![("x-api-key", "   ")],
            vec![("x_api_key", "sk_x")],
        ] {
            assert!(
                matches!(found(&pairs), Err(Refused::MissingCredentials)),
                "{pairs:?}"
            );
        }
    }

    #[test]
    fn repeated_credentials_are_ambiguous() {
        for pairs in [
            vec![("x-api-key", "sk_a"), ("x-api-key", "sk_b")],
            vec![("authorization", "Bearer a"), ("authorization", "Bearer b")],
        ] {
            assert!(
                matches!(
                    found(&pairs),
                    Err(Refused::InvalidKey(InvalidReason::Ambiguous))
                ),
                "{pairs:?}"
            );
        }
    }

    #[test]
    fn surrounding_whitespace_is_trimmed() {
        let h = headers(&[("x-api-key", " sk_abc ")]);
        let (p, _) = auth().credential(&h).unwrap();
        assert_eq!(p.len(), 6);
        assert_eq!(bearer_token(b"Bearer  tok "), Some(&b"tok"[..]));
    }
}
