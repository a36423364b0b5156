//! The properties the fuzz targets check, shared by `fuzz/fuzz_targets/*` (run by `cargo fuzz`)
//! and `tests/fuzz_corpus.rs` (which replays every file under `fuzz/corpus/` in `cargo test`).
//!
//! Each check takes arbitrary bytes and panics only when keygate breaks a promise: a crash, a key
//! that passes the format check without its checksum, a configuration that does not survive its
//! own rendering, a CORS answer for an origin that is not configured, a scoped key let through to
//! a path a backend could resolve outside its scope, or a redacting type that shows a secret.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use http::{HeaderMap, HeaderName, HeaderValue, Method, header};
use keygate::auth::Authenticator;
use keygate::config::FileConfig;
use keygate::cors::{CorsPolicy, Preflight};
use keygate::key::{self, Presented};
use keygate::policy::Policy;

/// The key parser: format check, checksum, digest and redaction.
pub fn key_format(data: &[u8]) {
    let presented = Presented::new(data);
    let verdict = presented.check_format();
    if verdict.is_ok() {
        assert_eq!(
            data.len(),
            49,
            "a key that passes is sk_ + 40 + 6 characters"
        );
        assert!(data.starts_with(b"sk_"));
        assert!(data[3..].iter().all(u8::is_ascii_alphanumeric));
        // The checksum is over everything before it: changing any one character of the body must
        // make the check fail (CRC32 detects every single-character error).
        let mut mutated = data.to_vec();
        let i = 3 + usize::from(data[3]) % 40;
        mutated[i] = if mutated[i] == b'a' { b'b' } else { b'a' };
        assert!(
            key::check_format(&mutated).is_err(),
            "checksum missed a change"
        );
    }
    assert_eq!(key::check_format(data), verdict);
    assert_eq!(presented.digest(), key::KeyDigest::of(data));
    assert_eq!(format!("{presented:?}"), "Presented(<redacted>)");
    assert_eq!(presented.to_string(), "<redacted>");
    if let Ok(text) = std::str::from_utf8(data) {
        let secret = key::Secret::new(text.to_owned());
        assert_eq!(format!("{secret:?}"), "Secret(<redacted>)");
        assert_eq!(secret.to_string(), "<redacted>");
        let hint = key::hint_of(text);
        assert!(
            hint.chars().count() <= 8,
            "a hint shows at most 7 characters"
        );
        let digest = secret.digest();
        assert_eq!(key::KeyDigest::from_hex(&digest.to_hex()), Some(digest));
        let _ = key::KeyDigest::from_hex(text);
    }
}

/// The config loader: TOML, then `KEY=value` lines after a NUL byte as environment overrides.
/// Whatever loads and validates must render (`check-config`) to TOML that loads, validates and
/// renders to the same text.
pub fn config_load(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (toml_text, env_text) = text.split_once('\0').unwrap_or((text, ""));
    let env: BTreeMap<String, String> = env_text
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let Ok(file) = FileConfig::from_toml(toml_text, "fuzz", &env) else {
        return;
    };
    // Errors are one readable line naming the key; they must never panic.
    let Ok(_config) = file.validate() else {
        return;
    };
    let shown = file.to_toml();
    let none = BTreeMap::<String, String>::new();
    let again = FileConfig::from_toml(&shown, "rendered", &none)
        .unwrap_or_else(|e| panic!("rendered config does not load: {e}\n{shown}"));
    if let Err(e) = again.validate() {
        panic!("rendered config does not validate: {e}\n{shown}");
    }
    assert_eq!(again.to_toml(), shown, "rendering is not stable");
}

const ORIGINS: [&str; 2] = ["https://app.example.com", "http://localhost:3000"];
const SCOPES: [&str; 2] = ["POST:/api/v1/video/", "/health/"];

/// A request shape from bytes: first line the method, second the path, the rest `name: value`
/// headers (invalid names or values are skipped, as hyper would refuse them).
fn request(data: &[u8]) -> (Method, Vec<u8>, HeaderMap) {
    let mut lines = data.split(|&b| b == b'\n');
    let method = Method::from_bytes(lines.next().unwrap_or_default()).unwrap_or(Method::GET);
    let path = lines.next().unwrap_or_default().to_vec();
    let mut headers = HeaderMap::new();
    for line in lines {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        let value = value.strip_prefix(b" ").unwrap_or(value);
        if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(name), HeaderValue::from_bytes(value)) {
            headers.append(n, v);
        }
    }
    (method, path, headers)
}

/// RFC 3986 §5.2.4 after one round of percent-decoding: the path a backend may act on.
fn resolved(path: &str) -> String {
    let bytes = path.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| char::from(b).to_digit(16);
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
        {
            decoded.push((h * 16 + l) as u8);
            i += 3;
            continue;
        }
        decoded.push(bytes[i]);
        i += 1;
    }
    let decoded = String::from_utf8_lossy(&decoded).replace('\\', "/");
    let mut out: Vec<&str> = Vec::new();
    for segment in decoded.split('/') {
        match segment {
            "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    out.join("/")
}

/// Whether `origin` matches the harness's origin pattern, `^https://[a-z0-9-]+\.preview\.example$`,
/// decided without a regular expression.
fn matches_pattern(origin: &[u8]) -> bool {
    origin
        .strip_prefix(b"https://")
        .and_then(|rest| rest.strip_suffix(b".preview.example"))
        .is_some_and(|label| {
            !label.is_empty()
                && label
                    .iter()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        })
}

/// The CORS and header policy: preflight answers, response decoration, credential extraction
/// and scope checks on arbitrary request shapes.
pub fn request_policy(data: &[u8]) {
    let cfg_text = format!(
        "[cors]\nallowed_origins = [\"{}\", \"{}\"]\nallow_credentials = true\n\
         allowed_origin_patterns = ['^https://[a-z0-9-]+\\.preview\\.example$']\n",
        ORIGINS[0], ORIGINS[1]
    );
    let config = FileConfig::from_toml(&cfg_text, "fuzz", &BTreeMap::<String, String>::new())
        .and_then(|f| f.validate())
        .expect("the fuzz harness's config is valid");
    let auth = Authenticator::new(&config.auth);
    let cors = CorsPolicy::new(&config.cors, auth.key_header(), config.auth.bearer_fallback);
    let (method, path, headers) = request(data);
    let origin = headers.get(header::ORIGIN);
    let allowed = origin.is_some_and(|o| {
        ORIGINS.iter().any(|a| a.as_bytes() == o.as_bytes()) || matches_pattern(o.as_bytes())
    });

    // Preflight: an answer with Access-Control-Allow-Origin only for a configured origin (or
    // one the pattern matches), and then exactly that origin.
    match cors.preflight(&headers) {
        Preflight::Allowed(h) => {
            assert!(allowed, "preflight allowed an unconfigured origin");
            assert_eq!(h.get(header::ACCESS_CONTROL_ALLOW_ORIGIN), origin);
        }
        Preflight::Refused(h) => {
            assert!(!h.contains_key(header::ACCESS_CONTROL_ALLOW_ORIGIN));
        }
    }

    // Decoration of an upstream response that sets its own CORS headers: the gateway's policy
    // replaces them.
    let mut resp = headers.clone();
    cors.decorate(origin, &mut resp);
    let acao: Vec<_> = resp
        .get_all(header::ACCESS_CONTROL_ALLOW_ORIGIN)
        .iter()
        .collect();
    if allowed {
        assert_eq!(acao, vec![origin.expect("allowed implies present")]);
    } else {
        assert!(acao.is_empty(), "decorated an unconfigured origin");
    }

    // Credentials: found in at most one place, never shown by Debug.
    if let Ok((presented, _source)) = auth.credential(&headers) {
        assert!(!presented.is_empty());
        assert_eq!(format!("{presented:?}"), "Presented(<redacted>)");
    }

    // Scopes: a path let through for a scoped key still lies inside a scope after one round of
    // percent-decoding and dot-segment removal.
    let Ok(path) = std::str::from_utf8(&path) else {
        return;
    };
    let policy = Policy {
        allow: SCOPES.iter().map(|s| (*s).to_owned()).collect(),
        allow_ips: vec!["10.0.0.0/8".into()],
        rate: None,
    }
    .compile()
    .expect("the fuzz harness's policy compiles");
    let client = IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3));
    if policy.check(client, &method, path).is_ok() {
        let effective = resolved(path);
        assert!(
            (method == Method::POST && effective.starts_with("/api/v1/video/"))
                || effective.starts_with("/health/"),
            "{method} {path:?} passed the scope check but resolves to {effective:?}"
        );
    }
}
