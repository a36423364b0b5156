//! CORS policy: exact-match origins and origin patterns, preflights answered at the gateway, and
//! the headers that decorate every response, as django-cors-headers decides them (its default
//! allowed headers; patterns anchored at the start only, as Python's `re.match` is). Header
//! values are joined once when the policy is built; the request path only compares bytes, runs
//! the prepared pattern set for an origin the list does not hold, and copies prepared values.

use http::Method;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use crate::config;
use crate::http::{immortal_value, remove_all};

/// The prepared CORS policy.
#[derive(Debug, Clone)]
pub struct CorsPolicy {
    origins: Vec<HeaderValue>,
    patterns: Option<regex::RegexSet>,
    allow_methods: HeaderValue,
    allow_headers: HeaderValue,
    expose_headers: Option<HeaderValue>,
    max_age: HeaderValue,
    allow_credentials: bool,
}

/// What a preflight gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Preflight {
    /// The origin is allowed: these headers go on the 204.
    Allowed(HeaderMap),
    /// The origin is not allowed: a 204 with only `Vary`, so the browser refuses the request.
    Refused(HeaderMap),
}

fn join<'a>(items: impl Iterator<Item = &'a str>) -> Option<HeaderValue> {
    let mut joined = String::new();
    for item in items {
        if !joined.split(", ").any(|x| x.eq_ignore_ascii_case(item)) {
            if !joined.is_empty() {
                joined.push_str(", ");
            }
            joined.push_str(item);
        }
    }
    (!joined.is_empty())
        .then(|| HeaderValue::from_str(&joined).ok())
        .flatten()
        .map(|v| immortal_value(&v))
}

fn vary_origin() -> HeaderValue {
    HeaderValue::from_static("Origin")
}

impl CorsPolicy {
    /// Builds the policy; the key headers (`key_header`, and `Authorization` when bearer is
    /// accepted) are always allowed so browsers can send keys.
    pub fn new(cfg: &config::Cors, key_header: &HeaderName, bearer: bool) -> Self {
        let mut headers: Vec<&str> = vec![key_header.as_str()];
        if bearer {
            headers.push(header::AUTHORIZATION.as_str());
        }
        headers.extend(cfg.allowed_headers.iter().map(HeaderName::as_str));
        for warning in cfg.warnings() {
            tracing::warn!("{warning}");
        }
        Self {
            origins: cfg.allowed_origins.clone(),
            patterns: cfg.allowed_origin_patterns.clone(),
            allow_methods: join(cfg.allowed_methods.iter().map(Method::as_str))
                .unwrap_or_else(|| HeaderValue::from_static("GET, POST")),
            allow_headers: join(headers.into_iter())
                .unwrap_or_else(|| HeaderValue::from_static("x-api-key")),
            expose_headers: join(cfg.expose_headers.iter().map(HeaderName::as_str)),
            max_age: immortal_value(&HeaderValue::from(cfg.max_age)),
            allow_credentials: cfg.allow_credentials,
        }
    }

    /// Whether any origin is configured (otherwise the gateway leaves CORS headers alone).
    pub fn enabled(&self) -> bool {
        !self.origins.is_empty() || self.patterns.is_some()
    }

    fn allowed<'a>(&self, origin: Option<&'a HeaderValue>) -> Option<&'a HeaderValue> {
        origin.filter(|o| {
            self.origins
                .iter()
                .any(|allowed| allowed.as_bytes() == o.as_bytes())
                || self.patterns.as_ref().is_some_and(|patterns| {
                    // An origin that is not text matches no pattern, as in Django (it cannot be
                    // a browser's serialised origin).
                    o.to_str().is_ok_and(|o| patterns.is_match(o))
                })
        })
    }

    /// Whether a request is a CORS preflight (OPTIONS with Origin and
    /// Access-Control-Request-Method).
    pub fn is_preflight(method: &Method, headers: &HeaderMap) -> bool {
        method == Method::OPTIONS
            && headers.contains_key(header::ORIGIN)
            && headers.contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
    }

    /// The answer to a preflight with these request headers.
    pub fn preflight(&self, req: &HeaderMap) -> Preflight {
        let mut h = HeaderMap::with_capacity(7);
        h.insert(header::VARY, vary_origin());
        h.append(
            header::VARY,
            HeaderValue::from_static(
                "Access-Control-Request-Method, Access-Control-Request-Headers",
            ),
        );
        let Some(origin) = self.allowed(req.get(header::ORIGIN)) else {
            return Preflight::Refused(h);
        };
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
        h.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            self.allow_methods.clone(),
        );
        h.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            self.allow_headers.clone(),
        );
        h.insert(header::ACCESS_CONTROL_MAX_AGE, self.max_age.clone());
        if self.allow_credentials {
            h.insert(
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
        Preflight::Allowed(h)
    }

    /// Adds CORS headers to an actual (non-preflight) response for a request from `origin`.
    /// Any CORS headers the upstream set are replaced: the gateway owns the policy.
    pub fn decorate(&self, origin: Option<&HeaderValue>, resp: &mut HeaderMap) {
        if !self.enabled() {
            return;
        }
        remove_all(
            resp,
            &[
                header::ACCESS_CONTROL_ALLOW_ORIGIN,
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                header::ACCESS_CONTROL_EXPOSE_HEADERS,
                header::ACCESS_CONTROL_ALLOW_METHODS,
                header::ACCESS_CONTROL_ALLOW_HEADERS,
                header::ACCESS_CONTROL_MAX_AGE,
            ],
        );
        resp.append(header::VARY, vary_origin());
        let Some(origin) = self.allowed(origin) else {
            return;
        };
        resp.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
        if let Some(expose) = &self.expose_headers {
            resp.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, expose.clone());
        }
        if self.allow_credentials {
            resp.insert(
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::FileConfig;
    use std::collections::BTreeMap;

    fn policy(toml: &str) -> CorsPolicy {
        let cfg = FileConfig::from_toml(toml, "test", &BTreeMap::new())
            .unwrap()
            .validate()
            .unwrap();
        CorsPolicy::new(&cfg.cors, &cfg.auth.key_header, cfg.auth.bearer_fallback)
    }

    fn req(origin: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::ORIGIN, HeaderValue::from_str(origin).unwrap());
        h.insert(
            header::ACCESS_CONTROL_REQUEST_METHOD,
            HeaderValue::from_static("POST"),
        );
        h
    }

    const APP: &str = "[cors]\nallowed_origins = [\"https://app.example\"]\n";

    #[test]
    fn allowed_origin_gets_the_full_preflight() {
        let Preflight::Allowed(h) = policy(APP).preflight(&req("https://app.example")) else {
            panic!("refused");
        };
        assert_eq!(
            h[header::ACCESS_CONTROL_ALLOW_ORIGIN],
            "https://app.example"
        );
        assert_eq!(h[header::ACCESS_CONTROL_MAX_AGE], "86400");
        let allowed = h[header::ACCESS_CONTROL_ALLOW_HEADERS].to_str().unwrap();
        assert!(
            allowed.contains("x-api-key") && allowed.contains("authorization"),
            "{allowed}"
        );
        assert!(
            h[header::ACCESS_CONTROL_ALLOW_METHODS]
                .to_str()
                .unwrap()
                .contains("POST")
        );
        assert!(!h.contains_key(header::ACCESS_CONTROL_ALLOW_CREDENTIALS));
        assert!(h.get_all(header::VARY).iter().any(|v| v == "Origin"));
    }

    #[test]
    fn other_origins_get_no_allow_origin() {
        for origin in [
            "https://evil.example",
            "https://app.example.evil",
            "http://app.example",
            "null",
        ] {
            let Preflight::Refused(h) = policy(APP).preflight(&req(origin)) else {
                panic!("{origin} allowed");
            };
            assert!(!h.contains_key(header::ACCESS_CONTROL_ALLOW_ORIGIN));
            assert!(h.get_all(header::VARY).iter().any(|v| v == "Origin"));
        }
    }

    #[test]
    fn decorate_replaces_upstream_cors_and_varies_on_origin() {
        let p = policy(APP);
        let mut resp = HeaderMap::new();
        resp.insert(
            header::ACCESS_CONTROL_ALLOW_ORIGIN,
            HeaderValue::from_static("*"),
        );
        p.decorate(
            Some(&HeaderValue::from_static("https://app.example")),
            &mut resp,
        );
        assert_eq!(
            resp[header::ACCESS_CONTROL_ALLOW_ORIGIN],
            "https://app.example"
        );
        assert_eq!(resp[header::ACCESS_CONTROL_EXPOSE_HEADERS], "x-request-id");
        let mut resp = HeaderMap::new();
        resp.insert(
            header::ACCESS_CONTROL_ALLOW_ORIGIN,
            HeaderValue::from_static("*"),
        );
        p.decorate(
            Some(&HeaderValue::from_static("https://evil.example")),
            &mut resp,
        );
        assert!(!resp.contains_key(header::ACCESS_CONTROL_ALLOW_ORIGIN));
        assert_eq!(resp[header::VARY], "Origin");
    }

    #[test]
    fn default_allowed_headers_are_django_cors_headers_ones() {
        let Preflight::Allowed(h) = policy(APP).preflight(&req("https://app.example")) else {
            panic!("refused");
        };
        let allowed = h[header::ACCESS_CONTROL_ALLOW_HEADERS].to_str().unwrap();
        for name in [
            "accept",
            "authorization",
            "content-type",
            "user-agent",
            "x-csrftoken",
            "x-requested-with",
            "x-api-key",
            "x-request-id",
        ] {
            assert!(allowed.split(", ").any(|a| a == name), "{name}: {allowed}");
        }
        assert_eq!(
            h[header::ACCESS_CONTROL_ALLOW_METHODS],
            "GET, POST, PUT, PATCH, DELETE, OPTIONS"
        );
    }

    /// What django-cors-headers allows with the same settings (Python's `re.match`: anchored at
    /// the start, not at the end).
    #[test]
    fn origin_patterns_match_as_django_cors_headers_does() {
        let p = policy(
            r#"[cors]
allowed_origin_patterns = ['^https://[a-z0-9-]+\.vercel\.app$', 'https://.*\.example\.com', '^http://localhost:\d+\Z']
"#,
        );
        assert!(p.enabled());
        let allowed = |origin: &str| matches!(p.preflight(&req(origin)), Preflight::Allowed(_));
        for origin in [
            "https://my-app-git-feature-x.vercel.app",
            "https://a.example.com",
            // No '$': a look-alike that starts the same way is allowed, as in Django.
            "https://a.example.com.evil.net",
            "http://localhost:3000",
        ] {
            assert!(allowed(origin), "{origin} refused");
        }
        for origin in [
            "https://evil-vercel.app",
            "https://x.vercel.app.evil.com",
            "http://x.vercel.app",
            "https://X.vercel.app",
            "https://a.b.vercel.app",
            // Anchored at the start: a match further in does not count.
            "evil https://a.example.com",
            "http://localhost:3000x",
            "http://localhost:",
            "null",
        ] {
            assert!(!allowed(origin), "{origin} allowed");
        }
        let mut resp = HeaderMap::new();
        p.decorate(
            Some(&HeaderValue::from_static("https://pr-1.vercel.app")),
            &mut resp,
        );
        assert_eq!(
            resp[header::ACCESS_CONTROL_ALLOW_ORIGIN],
            "https://pr-1.vercel.app"
        );
    }

    #[test]
    fn credentials_are_opt_in() {
        let p = policy(
            "[cors]\nallowed_origins = [\"https://app.example\"]\nallow_credentials = true\n",
        );
        let Preflight::Allowed(h) = p.preflight(&req("https://app.example")) else {
            panic!("refused");
        };
        assert_eq!(h[header::ACCESS_CONTROL_ALLOW_CREDENTIALS], "true");
    }

    #[test]
    fn no_origins_means_no_cors_headers() {
        let p = policy("");
        assert!(!p.enabled());
        let mut resp = HeaderMap::new();
        p.decorate(
            Some(&HeaderValue::from_static("https://app.example")),
            &mut resp,
        );
        assert!(resp.is_empty());
    }
}
