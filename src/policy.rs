//! Per-key policy: which client addresses, which methods and path prefixes, and which rate a key
//! is allowed. Stored with the key as written by the operator ([`Policy`], a few strings), checked
//! when it is written, and compiled once when the key enters the cache ([`Compiled`]), so a
//! request only compares prepared values.

use std::net::IpAddr;

use http::Method;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::rate::Rate;

/// A key's policy as stored. Empty lists mean "no restriction".
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Policy {
    /// Allowed requests: `"/path/prefix"` (any method) or `"METHOD:/path/prefix"`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<String>,
    /// Allowed client networks (CIDRs or addresses, IPv4 or IPv6).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub allow_ips: Vec<String>,
    /// This key's rate limit (`"600/min"`), overriding `[rate_limit] per_key`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate: Option<String>,
}

/// One allowed method and path prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    /// `None`: any method.
    pub method: Option<Method>,
    /// Path prefix, starting with '/'.
    pub prefix: String,
}

impl Scope {
    /// Parses `"/prefix"` or `"METHOD:/prefix"`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let (method, prefix) = match s.split_once(':') {
            Some((m, p)) if !m.starts_with('/') => (Some(m), p),
            _ => (None, s),
        };
        if !prefix.starts_with('/') || prefix.contains(['?', '#', ' ']) {
            return Err(format!(
                "scope {s:?}: expected \"/path/prefix\" or \"METHOD:/path/prefix\", e.g. \"POST:/api/v1/video/\""
            ));
        }
        let method = match method {
            None | Some("*") => None,
            Some(m) => Some(
                Method::from_bytes(m.to_ascii_uppercase().as_bytes())
                    .map_err(|_| format!("scope {s:?}: {m:?} is not an HTTP method"))?,
            ),
        };
        Ok(Self {
            method,
            prefix: prefix.to_owned(),
        })
    }

    fn permits(&self, method: &Method, path: &str) -> bool {
        self.method.as_ref().is_none_or(|m| m == method) && path.starts_with(&self.prefix)
    }
}

/// Parses a CIDR or a bare address.
pub fn parse_net(s: &str) -> Result<IpNet, String> {
    s.parse::<IpNet>()
        .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| format!("{s:?} is not a CIDR or IP address (e.g. 10.0.0.0/8, 2001:db8::/32)"))
}

/// Why a valid key was refused by its policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// The client address is outside the key's networks.
    Address,
    /// The method or path is outside the key's scopes.
    Scope,
}

/// A policy ready for requests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Compiled {
    scopes: Vec<Scope>,
    nets: Vec<IpNet>,
    /// The key's own rate, if it has one.
    pub rate: Option<Rate>,
}

impl Policy {
    /// Checks and compiles the policy; the error names the entry that is wrong.
    pub fn compile(&self) -> Result<Compiled, String> {
        Ok(Compiled {
            scopes: self
                .allow
                .iter()
                .map(|s| Scope::parse(s))
                .collect::<Result<_, _>>()?,
            nets: self
                .allow_ips
                .iter()
                .map(|s| parse_net(s))
                .collect::<Result<_, _>>()?,
            rate: self
                .rate
                .as_deref()
                .map(|r| Rate::parse(r).map_err(|e| format!("rate {r:?}: {e}")))
                .transpose()?,
        })
    }

    /// Whether the policy restricts nothing.
    pub fn is_empty(&self) -> bool {
        self.allow.is_empty() && self.allow_ips.is_empty() && self.rate.is_none()
    }
}

impl Compiled {
    /// A policy that refuses everything (for a stored policy that no longer parses: fail closed).
    pub fn deny_all() -> Self {
        Self {
            scopes: vec![Scope {
                method: Some(Method::from_bytes(b"NONE").unwrap_or(Method::CONNECT)),
                prefix: "/\u{0}".into(),
            }],
            nets: Vec::new(),
            rate: None,
        }
    }

    /// Checks a request from `client` for `method` and `path`.
    pub fn check(&self, client: IpAddr, method: &Method, path: &str) -> Result<(), Denied> {
        if !self.nets.is_empty() && !self.nets.iter().any(|n| n.contains(&canonical(client))) {
            return Err(Denied::Address);
        }
        if !self.scopes.is_empty()
            && (!is_plain_path(path) || !self.scopes.iter().any(|s| s.permits(method, path)))
        {
            return Err(Denied::Scope);
        }
        Ok(())
    }
}

/// Whether a path means what its bytes say: no dot segments and no encoded '.', '/', '\\' or '%'
/// (the last for backends that decode twice) that a backend could resolve into another path
/// (`/api/v1/video/../admin/` must not pass a `/api/v1/video/` scope). Scoped keys are refused
/// such paths; browsers and HTTP clients never send them.
pub(crate) fn is_plain_path(path: &str) -> bool {
    let bytes = path.as_bytes();
    let encoded = bytes.iter().enumerate().any(|(i, &b)| {
        b == b'\\' || (b == b'%' && bytes.get(i + 1..i + 3).is_some_and(encodes_separator))
    });
    let dot_segment = path
        .split('/')
        .any(|segment| segment == "." || segment == "..");
    !encoded && !dot_segment
}

/// Whether the two characters after a `%` encode '.', '/', '\\' or '%'.
fn encodes_separator(code: &[u8]) -> bool {
    matches!(
        code,
        [b'2', b'e' | b'E' | b'f' | b'F' | b'5'] | [b'5', b'c' | b'C']
    )
}

/// IPv4-mapped IPv6 addresses (`::ffff:10.0.0.1`, from dual-stack sockets) compare as IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(allow: &[&str], ips: &[&str]) -> Compiled {
        Policy {
            allow: allow.iter().map(|s| (*s).to_owned()).collect(),
            allow_ips: ips.iter().map(|s| (*s).to_owned()).collect(),
            rate: None,
        }
        .compile()
        .unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn empty_policy_allows_everything() {
        assert_eq!(
            policy(&[], &[]).check(ip("203.0.113.1"), &Method::DELETE, "/"),
            Ok(())
        );
    }

    #[test]
    fn scopes_match_method_and_prefix() {
        let p = policy(&["POST:/api/v1/video/", "/health/", "get:/status"], &[]);
        assert_eq!(
            p.check(ip("::1"), &Method::POST, "/api/v1/video/process/"),
            Ok(())
        );
        assert_eq!(
            p.check(ip("::1"), &Method::GET, "/api/v1/video/process/"),
            Err(Denied::Scope)
        );
        assert_eq!(
            p.check(ip("::1"), &Method::POST, "/api/v1/other/"),
            Err(Denied::Scope)
        );
        assert_eq!(p.check(ip("::1"), &Method::DELETE, "/health/x"), Ok(()));
        assert_eq!(p.check(ip("::1"), &Method::GET, "/status"), Ok(()));
        // Prefix boundaries are the operator's: "/api/v1/video/" does not match "/api/v1/videos".
        assert_eq!(
            p.check(ip("::1"), &Method::POST, "/api/v1/videos"),
            Err(Denied::Scope)
        );
    }

    #[test]
    fn dot_segments_and_encoded_separators_cannot_escape_a_scope() {
        let p = policy(&["/api/v1/video/"], &[]);
        for path in [
            "/api/v1/video/../admin/",
            "/api/v1/video/..",
            "/api/v1/video/./x",
            "/api/v1/video/%2e%2e/admin/",
            "/api/v1/video/%2E%2E%2Fadmin",
            "/api/v1/video/..%5cadmin",
            "/api/v1/video/..\\admin",
        ] {
            assert_eq!(
                p.check(ip("::1"), &Method::GET, path),
                Err(Denied::Scope),
                "{path}"
            );
        }
        assert_eq!(
            p.check(ip("::1"), &Method::GET, "/api/v1/video/a.b/c..d"),
            Ok(())
        );
        // Unscoped keys are not affected.
        assert_eq!(
            policy(&[], &[]).check(ip("::1"), &Method::GET, "/a/../b"),
            Ok(())
        );
    }

    #[test]
    fn networks_cover_v4_v6_and_mapped_addresses() {
        let p = policy(&[], &["10.0.0.0/8", "2001:db8::/32", "192.0.2.7"]);
        assert_eq!(p.check(ip("10.255.0.1"), &Method::GET, "/"), Ok(()));
        assert_eq!(
            p.check(ip("11.0.0.1"), &Method::GET, "/"),
            Err(Denied::Address)
        );
        assert_eq!(p.check(ip("2001:db8::1"), &Method::GET, "/"), Ok(()));
        assert_eq!(
            p.check(ip("2001:db9::1"), &Method::GET, "/"),
            Err(Denied::Address)
        );
        assert_eq!(p.check(ip("192.0.2.7"), &Method::GET, "/"), Ok(()));
        assert_eq!(
            p.check(ip("192.0.2.8"), &Method::GET, "/"),
            Err(Denied::Address)
        );
        assert_eq!(p.check(ip("::ffff:10.1.2.3"), &Method::GET, "/"), Ok(()));
    }

    #[test]
    fn bad_entries_are_named() {
        for (allow, ips, rate, needle) in [
            (vec!["api/"], vec![], None, "api/"),
            (vec!["P@ST:/x"], vec![], None, "P@ST"),
            (vec![], vec!["10.0.0.0/33"], None, "10.0.0.0/33"),
            (vec![], vec![], Some("fast"), "fast"),
        ] {
            let err = Policy {
                allow: allow.into_iter().map(String::from).collect(),
                allow_ips: ips.into_iter().map(String::from).collect(),
                rate: rate.map(String::from),
            }
            .compile()
            .unwrap_err();
            assert!(err.contains(needle), "{err}");
        }
    }

    #[test]
    fn deny_all_denies() {
        assert!(
            Compiled::deny_all()
                .check(ip("127.0.0.1"), &Method::GET, "/")
                .is_err()
        );
    }

    #[test]
    fn policy_json_is_compact_and_strict() {
        assert_eq!(serde_json::to_string(&Policy::default()).unwrap(), "{}");
        assert!(serde_json::from_str::<Policy>(r#"{"allow":["/x"],"extra":1}"#).is_err());
    }
}
