//! Identity the backend can verify: an HMAC-SHA256 signature, sent upstream in
//! `X-Keygate-Signature`, over the identity headers and what identifies the request. A backend
//! that checks it (`contrib/django` does) refuses identity headers that did not come from
//! keygate, even from a process on its own host, and refuses a signed request replayed later
//! or on another path.
//!
//! The signed text (`docs/django.md` has it for backend authors) is nine fields, each ended by a
//! newline except the last:
//!
//! ```text
//! keygate-identity-v1
//! <timestamp: Unix seconds, decimal>
//! <method, upper case>
//! <X-Request-Id>
//! <X-Api-Key-Id, or empty>
//! <X-Api-Key-Name, or empty>
//! <X-Api-Key-Owner, or empty>
//! <query string as sent, without '?', or empty>
//! <path as the backend receives it, percent-decoded>
//! ```
//!
//! Every field but the path is a header value or query string, which cannot hold a newline;
//! the path (whose `%0A` decodes to one) is last, so the text reads one way only. The path is
//! percent-decoded because that is what a WSGI or ASGI server hands the application
//! (`SCRIPT_NAME + PATH_INFO`, `scope["path"]`), byte for byte; the query string is passed on
//! raw by both. The header is `t=<timestamp>,v1=<64 hex digits>`, with one `v1=` per configured
//! secret: during a rotation keygate signs with both, and a backend holding either accepts.

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{BufMut as _, BytesMut};
use hmac::{Hmac, Mac as _};
use http::{HeaderValue, Method, Uri};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// First field of the signed text: names the scheme, so a later one cannot be confused with it.
pub const VERSION: &str = "keygate-identity-v1";

/// The shortest secret accepted, in bytes (256 bits, HMAC-SHA256's own strength).
pub const MIN_SECRET_LEN: usize = 32;

/// How many secrets may be configured at once: the current one and, during a rotation, the next.
pub const MAX_SECRETS: usize = 2;

/// The key fields of the signed text for a request that no key authenticated (a public path):
/// empty, so that the backend can tell it came through keygate all the same.
pub const NO_KEY: [&[u8]; 3] = [b"", b"", b""];

/// A signing secret. Its `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct IdentitySecret(Box<[u8]>);

impl std::fmt::Debug for IdentitySecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IdentitySecret(*** {} bytes)", self.0.len())
    }
}

impl IdentitySecret {
    /// The secrets in `text`: one or two, separated by commas, spaces or newlines (the format of
    /// `upstream.identity_secret`, its environment variable and its file alike). The error says
    /// what is wrong without showing any secret.
    pub fn parse_list(text: &str) -> Result<Vec<Self>, String> {
        let secrets: Vec<Self> = text
            .split(|c: char| c == ',' || c.is_whitespace())
            .filter(|s| !s.is_empty())
            .map(|s| Self(s.as_bytes().into()))
            .collect();
        if secrets.is_empty() {
            return Err("no secret found".into());
        }
        if secrets.len() > MAX_SECRETS {
            return Err(format!(
                "{} secrets found, at most {MAX_SECRETS} (the current one and, while rotating, the next)",
                secrets.len()
            ));
        }
        if let Some((i, s)) = secrets
            .iter()
            .enumerate()
            .find(|(_, s)| s.0.len() < MIN_SECRET_LEN)
        {
            return Err(format!(
                "secret {} is {} bytes, fewer than {MIN_SECRET_LEN}; make one with `openssl rand -hex 32`",
                i + 1,
                s.0.len()
            ));
        }
        Ok(secrets)
    }
}

/// Signs forwarded requests with the configured secrets; prepared once at start-up.
#[derive(Clone)]
pub struct Signer {
    /// One keyed HMAC per secret, cloned per request (the key schedule is done here, once).
    macs: Vec<HmacSha256>,
    /// The upstream URL's base path, which the backend sees in front of the client's path.
    base_path: String,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("secrets", &self.macs.len())
            .field("base_path", &self.base_path)
            .finish()
    }
}

/// Feeds `path` to `mac` percent-decoded (`%XX` with two hex digits becomes that byte; any other
/// `%` stays as it is, as Python's `urllib.parse.unquote_to_bytes` does).
fn update_decoded(mac: &mut HmacSha256, path: &[u8]) {
    let hex = |b: u8| char::from(b).to_digit(16).map(|d| d as u8);
    let mut rest = path;
    while let Some(at) = rest.iter().position(|&b| b == b'%') {
        mac.update(&rest[..at]);
        match (
            rest.get(at + 1).copied().and_then(hex),
            rest.get(at + 2).copied().and_then(hex),
        ) {
            (Some(high), Some(low)) => {
                mac.update(&[high << 4 | low]);
                rest = &rest[at + 3..];
            }
            _ => {
                mac.update(b"%");
                rest = &rest[at + 1..];
            }
        }
    }
    mac.update(rest);
}

impl Signer {
    /// A signer with `secrets` (at least one) for an upstream whose URL has path `base_path`
    /// (`/` or empty for none).
    pub fn new(secrets: &[IdentitySecret], base_path: &str) -> Self {
        Self {
            macs: secrets
                .iter()
                .map(|s| HmacSha256::new_from_slice(&s.0).expect("HMAC takes a key of any length"))
                .collect(),
            base_path: base_path.trim_end_matches('/').to_owned(),
        }
    }

    /// The signature header's value for a request with `method` and client-side `uri`, as
    /// forwarded with `request_id` and the key's identity header values `[id, name, owner]`
    /// ([`NO_KEY`] for a request that no key authenticated, on a public path; an empty owner for
    /// a key without one).
    pub fn sign(
        &self,
        method: &Method,
        uri: &Uri,
        request_id: &[u8],
        key: [&[u8]; 3],
    ) -> HeaderValue {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.sign_at(now, method, uri, request_id, key)
    }

    /// [`Signer::sign`] at Unix time `now`, with the key fields given (id, name, owner).
    pub fn sign_at(
        &self,
        now: u64,
        method: &Method,
        uri: &Uri,
        request_id: &[u8],
        [id, name, owner]: [&[u8]; 3],
    ) -> HeaderValue {
        let mut timestamp = itoa::Buffer::new();
        let timestamp = timestamp.format(now).as_bytes();
        // The standard methods are upper case already; an extension method is signed in upper
        // case, as WSGI and ASGI servers hand it to the application.
        let upper;
        let method = if method.as_str().bytes().any(|b| b.is_ascii_lowercase()) {
            upper = method.as_str().to_ascii_uppercase();
            upper.as_bytes()
        } else {
            method.as_str().as_bytes()
        };
        let mut out = BytesMut::with_capacity(2 + timestamp.len() + self.macs.len() * 68);
        out.put_slice(b"t=");
        out.put_slice(timestamp);
        for keyed in &self.macs {
            let mut mac = keyed.clone();
            for field in [
                VERSION.as_bytes(),
                timestamp,
                method,
                request_id,
                id,
                name,
                owner,
                uri.query().unwrap_or("").as_bytes(),
            ] {
                mac.update(field);
                mac.update(b"\n");
            }
            update_decoded(&mut mac, self.base_path.as_bytes());
            update_decoded(&mut mac, uri.path().as_bytes());
            out.put_slice(b",v1=");
            const DIGITS: &[u8; 16] = b"0123456789abcdef";
            for b in mac.finalize().into_bytes() {
                out.put_slice(&[DIGITS[usize::from(b >> 4)], DIGITS[usize::from(b & 15)]]);
            }
        }
        HeaderValue::from_maybe_shared(out.freeze())
            .expect("digits, letters, '=' and ',' are a valid header value")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(s: &str) -> IdentitySecret {
        IdentitySecret::parse_list(s).unwrap().remove(0)
    }

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    /// The vector `contrib/django`'s tests check too: both sides must produce these bytes.
    #[test]
    fn signs_the_documented_text() {
        let signer = Signer::new(&[secret(SECRET)], "");
        let uri: Uri = "/api/v1/video/process/?a=1&b=%20x".parse().unwrap();
        let got = signer.sign_at(
            1_700_000_000,
            &Method::POST,
            &uri,
            b"req-1",
            [b"key_abc", b"frontend", b"42"],
        );
        let text = "keygate-identity-v1\n1700000000\nPOST\nreq-1\nkey_abc\nfrontend\n42\n\
                    a=1&b=%20x\n/api/v1/video/process/";
        let mut mac = HmacSha256::new_from_slice(SECRET.as_bytes()).unwrap();
        mac.update(text.as_bytes());
        let want = format!(
            "t=1700000000,v1={}",
            mac.finalize()
                .into_bytes()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        );
        assert_eq!(got, want.as_str());
        assert_eq!(
            got,
            "t=1700000000,v1=0e279a9041408f3976030a187fea4a50ca67ffba8aac760eb57c80c53014c818"
        );
    }

    #[test]
    fn the_path_is_signed_decoded_under_the_base_path() {
        let plain = Signer::new(&[secret(SECRET)], "");
        let based = Signer::new(&[secret(SECRET)], "/base/");
        let sign = |s: &Signer, target: &str| {
            s.sign_at(
                1,
                &Method::GET,
                &target.parse().unwrap(),
                b"r",
                [b"", b"", b""],
            )
        };
        // What the backend sees: "/base" in front, and the path decoded ("%zz" is no escape).
        assert_eq!(sign(&based, "/a%20b/%zz"), sign(&plain, "/base/a%20b/%zz"));
        assert_eq!(sign(&plain, "/a%2fb/%41%4A"), sign(&plain, "/a/b/AJ"));
        assert_ne!(sign(&plain, "/a%2"), sign(&plain, "/a"));
        assert_ne!(sign(&plain, "/a"), sign(&plain, "/b"));
        assert_ne!(sign(&plain, "/a?x=1"), sign(&plain, "/a?x=2"));
    }

    #[test]
    fn every_field_changes_the_signature() {
        let signer = Signer::new(&[secret(SECRET)], "");
        let uri: Uri = "/x".parse().unwrap();
        let base = signer.sign_at(5, &Method::GET, &uri, b"r", [b"i", b"n", b"o"]);
        let variants = [
            signer.sign_at(6, &Method::GET, &uri, b"r", [b"i", b"n", b"o"]),
            signer.sign_at(5, &Method::PUT, &uri, b"r", [b"i", b"n", b"o"]),
            signer.sign_at(5, &Method::GET, &uri, b"s", [b"i", b"n", b"o"]),
            signer.sign_at(5, &Method::GET, &uri, b"r", [b"j", b"n", b"o"]),
            signer.sign_at(5, &Method::GET, &uri, b"r", [b"i", b"m", b"o"]),
            signer.sign_at(5, &Method::GET, &uri, b"r", [b"i", b"n", b"p"]),
            // A field's end moved into the next one.
            signer.sign_at(5, &Method::GET, &uri, b"r", [b"in", b"", b"o"]),
        ];
        for v in variants {
            assert_ne!(v, base);
        }
        let other = Signer::new(&[secret(&SECRET.replace('0', "1"))], "");
        assert_ne!(
            other.sign_at(5, &Method::GET, &uri, b"r", [b"i", b"n", b"o"]),
            base
        );
    }

    #[test]
    fn two_secrets_sign_twice() {
        let first = secret(SECRET);
        let second = secret(&SECRET.to_uppercase());
        let uri: Uri = "/x".parse().unwrap();
        let fields = [&b"i"[..], b"n", b"o"];
        let one = Signer::new(std::slice::from_ref(&first), "").sign_at(
            5,
            &Method::GET,
            &uri,
            b"r",
            fields,
        );
        let other = Signer::new(std::slice::from_ref(&second), "").sign_at(
            5,
            &Method::GET,
            &uri,
            b"r",
            fields,
        );
        let both = Signer::new(&[first, second], "").sign_at(5, &Method::GET, &uri, b"r", fields);
        let v1 = |h: &HeaderValue| h.to_str().unwrap().split_once(",v1=").unwrap().1.to_owned();
        assert_eq!(
            both.to_str().unwrap(),
            format!("t=5,v1={},v1={}", v1(&one), v1(&other))
        );
    }

    #[test]
    fn secret_lists_are_checked_without_showing_them() {
        assert_eq!(IdentitySecret::parse_list(SECRET).unwrap().len(), 1);
        let two = format!("{SECRET}\n{}\n", SECRET.to_uppercase());
        assert_eq!(IdentitySecret::parse_list(&two).unwrap().len(), 2);
        assert_eq!(
            IdentitySecret::parse_list(&format!(" {SECRET} , {SECRET}x "))
                .unwrap()
                .len(),
            2
        );
        for (text, needle) in [
            ("", "no secret"),
            ("  \n", "no secret"),
            ("short-secret", "fewer than 32"),
            (&format!("{SECRET},{SECRET},{SECRET}") as &str, "at most 2"),
        ] {
            let err = IdentitySecret::parse_list(text).unwrap_err();
            assert!(err.contains(needle), "{text:?}: {err}");
            assert!(
                !err.contains("short-secret") && !err.contains(SECRET),
                "{err}"
            );
        }
        assert!(!format!("{:?}", secret(SECRET)).contains(SECRET));
    }
}
