//! What is forwarded: how the client's request headers become the upstream's (hop-by-hop
//! removal, `Host`, forwarding headers; the pipeline adds the identity headers), and who the
//! client is (`X-Forwarded-For` from trusted proxies only).

use std::net::IpAddr;

use bytes::Bytes;
use http::Uri;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use ipnet::IpNet;

use crate::http::{HOP_BY_HOP, connection_named};

/// How the client's request headers become the upstream's: which of them are not copied, and
/// which headers are written instead. The client's header map is read, never changed: each
/// change to a `HeaderMap` is a hash and a probe (and a regrowth when the map is full), while the
/// upstream request's map is built from it in one pass anyway (by [`crate::upstream`]).
/// Headers the gateway adds can never be removed by what the client sends: `Connection` naming
/// only drops the client's own.
#[derive(Debug)]
pub struct HeaderEdits<'a> {
    /// The upstream's `Host`, written first (the client's is then not copied), or `None` to
    /// copy the client's.
    host: Option<HeaderValue>,
    dropped: [&'a HeaderName; MAX_DROPPED],
    /// Each dropped name's [`signature`], and all of them as bits: most of a client's headers
    /// are told apart from every dropped name by one test, and the rest compared only with the
    /// names of the same signature.
    signatures: [u8; MAX_DROPPED],
    any: u64,
    drops: usize,
    /// The client's headers its `Connection` header names (rare).
    named: Vec<HeaderName>,
    added: Vec<(HeaderName, HeaderValue)>,
}

/// More than the most names ever dropped (hop-by-hop, Host, forwarding, credentials, identity).
const MAX_DROPPED: usize = 24;

/// Six bits from a header name's length and its first and last bytes (names are lower case).
fn signature(name: &HeaderName) -> u8 {
    let name = name.as_str().as_bytes();
    let first = u32::from(name.first().copied().unwrap_or(0));
    let last = u32::from(name.last().copied().unwrap_or(0));
    ((name.len() as u32 * 7 + first + last * 3) & 63) as u8
}

impl<'a> HeaderEdits<'a> {
    fn new() -> Self {
        Self {
            host: None,
            dropped: [&HOP_BY_HOP[0]; MAX_DROPPED],
            signatures: [0; MAX_DROPPED],
            any: 0,
            drops: 0,
            named: Vec::new(),
            added: Vec::with_capacity(6),
        }
    }

    /// The client's `name` headers are not copied.
    pub fn drop(&mut self, name: &'a HeaderName) {
        assert!(
            self.drops < MAX_DROPPED,
            "more dropped header names than MAX_DROPPED"
        );
        let signature = signature(name);
        self.dropped[self.drops] = name;
        self.signatures[self.drops] = signature;
        self.any |= 1 << signature;
        self.drops += 1;
    }

    /// `name: value` is written after the client's headers.
    pub fn add(&mut self, name: HeaderName, value: HeaderValue) {
        self.added.push((name, value));
    }

    /// Whether the client's header `name` is copied.
    pub fn keeps(&self, name: &HeaderName) -> bool {
        let signature = signature(name);
        let dropped = self.any & (1 << signature) != 0
            && self.signatures[..self.drops]
                .iter()
                .zip(&self.dropped)
                .any(|(&s, &d)| s == signature && d == name);
        !dropped && (self.named.is_empty() || !self.named.contains(name))
    }

    /// The `Host` written first, if the client's is not copied.
    pub fn host(&self) -> Option<&HeaderValue> {
        self.host.as_ref()
    }

    /// The headers written after the client's.
    pub fn added(&self) -> &[(HeaderName, HeaderValue)] {
        &self.added
    }

    /// Whether the client's request carries `name` and it will be copied.
    fn copies(&self, headers: &HeaderMap, name: &HeaderName) -> bool {
        self.keeps(name) && headers.contains_key(name)
    }
}

/// Everything about a request the forwarding headers need.
#[derive(Debug, Clone, Copy)]
pub struct ClientInfo<'a> {
    /// The TCP peer's address, as text.
    pub peer: &'a HeaderValue,
    /// Whether the peer is a trusted proxy (its forwarding headers are kept).
    pub trusted: bool,
    /// The client's address: the peer, or from a trusted proxy's X-Forwarded-For.
    pub client_ip: IpAddr,
    /// Whether the client reached us over TLS.
    pub tls: bool,
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
/// `X-Forwarded-Proto`: set for the upstream; read from trusted proxies only.
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const FORWARDED: HeaderName = HeaderName::from_static("forwarded");
/// The names above, and `Host` and `Authorization`, where a reference that lives for the whole
/// program is needed ([`HeaderEdits::drop`]).
static FORWARDING: [HeaderName; 4] = [
    X_FORWARDED_FOR,
    X_FORWARDED_PROTO,
    X_FORWARDED_HOST,
    FORWARDED,
];
static HOST: HeaderName = header::HOST;
/// `Authorization`, for [`HeaderEdits::drop`].
pub static AUTHORIZATION: HeaderName = header::AUTHORIZATION;

/// The client's address: the peer, unless the peer is a trusted proxy, in which case the
/// rightmost X-Forwarded-For hop that is not itself a trusted proxy.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> (IpAddr, bool) {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
    if !is_trusted(&peer) {
        return (peer, false);
    }
    let mut client = peer;
    let hops = headers
        .get_all(X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect::<Vec<_>>();
    for hop in hops.into_iter().rev() {
        match hop.parse::<IpAddr>() {
            Ok(ip) => {
                client = ip;
                if !is_trusted(&ip) {
                    break;
                }
            }
            // Garbage in the chain: stop at the last address we could trust.
            Err(_) => break,
        }
    }
    (client, true)
}

/// The changes that make the client's headers the upstream's: Host (the upstream's own,
/// `upstream_host`, unless `preserve_host`), hop-by-hop and forwarding headers. Credential and
/// identity headers are the caller's (they depend on the auth result).
pub fn edits<'a>(
    headers: &HeaderMap,
    uri: &Uri,
    client: &ClientInfo<'_>,
    upstream_host: &HeaderValue,
    preserve_host: bool,
) -> HeaderEdits<'a> {
    let mut edits = HeaderEdits::new();
    for name in &HOP_BY_HOP {
        edits.drop(name);
    }
    if headers.contains_key(header::CONNECTION) {
        edits.named = connection_named(headers);
    }
    let client_host = headers.get(header::HOST);
    // No Host header (an HTTP/2 request, or HTTP/1.0): the URI's authority, if any.
    let original_host = client_host.cloned().or_else(|| {
        uri.authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    });
    if !preserve_host {
        edits.drop(&HOST);
        edits.host = Some(upstream_host.clone());
    } else if client_host.is_none() {
        edits.host = Some(
            original_host
                .clone()
                .unwrap_or_else(|| upstream_host.clone()),
        );
    }
    let [xff, xfp, xfh, forwarded] = &FORWARDING;
    let proto = HeaderValue::from_static(if client.tls { "https" } else { "http" });
    if client.trusted {
        // A trusted proxy's word on earlier hops is kept, and extended.
        let earlier = if edits.keeps(xff) {
            headers.get_all(xff).iter().collect::<Vec<_>>()
        } else {
            Vec::new()
        };
        edits.drop(xff);
        edits.add(X_FORWARDED_FOR, forwarded_for(&earlier, client.peer));
        if !edits.copies(headers, xfp) {
            edits.add(X_FORWARDED_PROTO, proto);
        }
        if let Some(host) = original_host
            && !edits.copies(headers, xfh)
        {
            edits.add(X_FORWARDED_HOST, host);
        }
        return edits;
    }
    // Nobody else may tell us about earlier hops: what the client sent is replaced or
    // dropped.
    for name in [xff, xfp, xfh, forwarded] {
        edits.drop(name);
    }
    edits.add(X_FORWARDED_FOR, client.peer.clone());
    edits.add(X_FORWARDED_PROTO, proto);
    if let Some(host) = original_host {
        edits.add(X_FORWARDED_HOST, host);
    }
    edits
}

/// Appends `peer` to the request's `X-Forwarded-For` (all its values, joined), or sets it.
/// A trusted proxy's `X-Forwarded-For` values, joined, with `peer` after them.
fn forwarded_for(earlier: &[&HeaderValue], peer: &HeaderValue) -> HeaderValue {
    if earlier.is_empty() {
        return peer.clone();
    }
    let mut value = Vec::with_capacity(64);
    for v in earlier {
        let v = v.as_bytes().trim_ascii();
        if !v.is_empty() {
            value.extend_from_slice(v);
            value.extend_from_slice(b", ");
        }
    }
    value.extend_from_slice(peer.as_bytes());
    // Joined from valid header values with ", ": still a valid one.
    HeaderValue::from_maybe_shared(Bytes::from(value)).unwrap_or_else(|_| peer.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::http::header_map as headers;

    #[test]
    fn forwarded_for_is_ignored_from_untrusted_peers() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let h = headers(&[("x-forwarded-for", "1.2.3.4")]);
        let peer: IpAddr = "203.0.113.9".parse().unwrap();
        assert_eq!(client_ip(peer, &h, &trusted), (peer, false));
    }

    #[test]
    fn rightmost_untrusted_hop_is_the_client() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let h = headers(&[("x-forwarded-for", "6.6.6.6, 198.51.100.7, 10.1.1.1")]);
        let peer: IpAddr = "10.0.0.2".parse().unwrap();
        let (ip, trusted_peer) = client_ip(peer, &h, &trusted);
        assert!(trusted_peer);
        assert_eq!(ip, "198.51.100.7".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn forwarded_for_appends_the_peer() {
        let peer = HeaderValue::from_static("10.0.0.2");
        let one = HeaderValue::from_static("198.51.100.7");
        assert_eq!(forwarded_for(&[&one], &peer), "198.51.100.7, 10.0.0.2");
        // Several X-Forwarded-For lines are one list, in order; blank ones add nothing.
        let lines = [
            HeaderValue::from_static(" 6.6.6.6, 198.51.100.7 "),
            HeaderValue::from_static(""),
            HeaderValue::from_static("192.0.2.1"),
        ];
        assert_eq!(
            forwarded_for(&lines.iter().collect::<Vec<_>>(), &peer),
            "6.6.6.6, 198.51.100.7, 192.0.2.1, 10.0.0.2"
        );
        assert_eq!(
            forwarded_for(&[&HeaderValue::from_static("  ")], &peer),
            "10.0.0.2"
        );
        assert_eq!(forwarded_for(&[], &peer), "10.0.0.2");
    }

    /// The head the upstream gets for a GET with `pairs` as its headers, from a client at
    /// 203.0.113.9 over TLS (`trusted`: the peer is a trusted proxy), with or without
    /// `preserve_host`.
    /// The head the upstream gets for a GET with `pairs` as its headers, from a client at
    /// 203.0.113.9 over TLS (`trusted`: the peer is a trusted proxy), with or without
    /// `preserve_host`, in the order the upstream request's headers are built: `Host`, the
    /// client's headers that are kept, the added ones.
    fn upstream_head(pairs: &[(&str, &str)], trusted: bool, preserve_host: bool) -> String {
        let peer = HeaderValue::from_static("203.0.113.9");
        let client = ClientInfo {
            peer: &peer,
            trusted,
            client_ip: "203.0.113.9".parse().unwrap(),
            tls: true,
        };
        let h = headers(pairs);
        let uri = Uri::from_static("/p");
        let upstream_host = HeaderValue::from_static("10.9.9.9:8000");
        let edits = edits(&h, &uri, &client, &upstream_host, preserve_host);
        let mut head = String::from("GET /p HTTP/1.1\r\n");
        let mut line = |name: &HeaderName, value: &HeaderValue| {
            head.push_str(&format!("{name}: {}\r\n", value.to_str().unwrap()));
        };
        if let Some(host) = edits.host() {
            line(&header::HOST, host);
        }
        for (name, value) in &h {
            if edits.keeps(name) {
                line(name, value);
            }
        }
        for (name, value) in edits.added() {
            line(name, value);
        }
        head.push_str("\r\n");
        head
    }

    #[test]
    fn the_upstream_gets_the_clients_headers_with_forwarding_rewritten() {
        let forged = [
            ("host", "client.example"),
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-proto", "http"),
            ("x-forwarded-host", "evil.example"),
            ("forwarded", "for=6.6.6.6"),
            ("accept", "*/*"),
        ];
        // From an untrusted peer, every forwarding header is the gateway's own.
        assert_eq!(
            upstream_head(&forged, false, false),
            "GET /p HTTP/1.1\r\nhost: 10.9.9.9:8000\r\naccept: */*\r\n\
             x-forwarded-for: 203.0.113.9\r\nx-forwarded-proto: https\r\n\
             x-forwarded-host: client.example\r\n\r\n"
        );
        // From a trusted proxy, its word on earlier hops is kept and extended.
        assert_eq!(
            upstream_head(&forged, true, false),
            "GET /p HTTP/1.1\r\nhost: 10.9.9.9:8000\r\nx-forwarded-proto: http\r\n\
             x-forwarded-host: evil.example\r\nforwarded: for=6.6.6.6\r\naccept: */*\r\n\
             x-forwarded-for: 6.6.6.6, 203.0.113.9\r\n\r\n"
        );
        // ... and what it does not say is added.
        assert_eq!(
            upstream_head(&[("host", "client.example")], true, false),
            "GET /p HTTP/1.1\r\nhost: 10.9.9.9:8000\r\nx-forwarded-for: 203.0.113.9\r\n\
             x-forwarded-proto: https\r\nx-forwarded-host: client.example\r\n\r\n"
        );
        // preserve_host: the client's Host goes upstream.
        assert!(
            upstream_head(&[("host", "client.example")], false, true)
                .starts_with("GET /p HTTP/1.1\r\nhost: client.example\r\n")
        );
        // Without a Host (HTTP/1.0, HTTP/2 without an authority): the upstream's.
        assert!(
            upstream_head(&[], false, true)
                .starts_with("GET /p HTTP/1.1\r\nhost: 10.9.9.9:8000\r\n")
        );
    }

    #[test]
    fn connection_names_only_the_clients_own_headers() {
        // Hop-by-hop headers and those Connection names are not copied; the gateway's own Host
        // and forwarding headers are written whatever Connection says.
        let head = upstream_head(
            &[
                (
                    "connection",
                    "keep-alive, X-Secret, host, x-forwarded-proto",
                ),
                ("connection", " X-Other\t"),
                ("x-secret", "1"),
                ("x-other", "1"),
                ("keep-alive", "timeout=5"),
                ("te", "trailers"),
                ("upgrade", "websocket"),
                ("proxy-authorization", "Basic eDp5"),
                ("x-forwarded-proto", "http"),
                ("host", "client.example"),
                ("content-type", "application/json"),
            ],
            true,
            true,
        );
        assert_eq!(
            head,
            "GET /p HTTP/1.1\r\nhost: client.example\r\ncontent-type: application/json\r\n\
             x-forwarded-for: 203.0.113.9\r\nx-forwarded-proto: https\r\n\
             x-forwarded-host: client.example\r\n\r\n"
        );
    }
}
