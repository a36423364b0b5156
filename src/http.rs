//! HTTP helpers shared along the request path: header values prepared once, hop-by-hop
//! removal, and the draining of a request body nobody will read.

use std::time::Duration;

use bytes::{Buf as _, Bytes};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http_body::Body;
use http_body_util::BodyExt as _;

/// At most this much of a request body nobody will read is read and dropped
/// ([`drain_unread`])...
const DRAIN_BYTES: u64 = 4 * 1024 * 1024;
/// ... within this long.
const DRAIN_TIME: Duration = Duration::from_secs(10);

/// Reads and drops, in a task of its own, what a client still sends of a request body that was
/// answered without being read: by the gateway (a 401 to an upload without a key, say), or by
/// an upstream that stopped taking it. The client then gets the whole answer and a clean end:
/// over HTTP/2 its stream ends without a reset, and over HTTP/1.1 the connection can carry its
/// next request. Past [`DRAIN_BYTES`] or [`DRAIN_TIME`] the body is let go: the stream is reset
/// (`RST_STREAM(NO_ERROR)`) or the connection closed, after the complete answer.
///
/// A body declared larger than [`DRAIN_BYTES`] is read too, up to that much: dropping it at once
/// would put the reset in the same write as the answer, and a client still sending then may see
/// the reset before the answer (curl 7.88 over HTTP/2 fails such a request with exit 92 and no
/// status). Read first, the answer leaves on its own, and the client can stop sending on it.
pub fn drain_unread<B>(mut body: B)
where
    B: Body + Send + Unpin + 'static,
    B::Data: Send,
{
    if body.is_end_stream() {
        return;
    }
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    runtime.spawn(async move {
        let drained = async {
            let mut read = 0;
            while let Some(Ok(frame)) = body.frame().await {
                read += frame.data_ref().map_or(0, |d| d.remaining() as u64);
                if read > DRAIN_BYTES {
                    return;
                }
            }
        };
        let _ = tokio::time::timeout(DRAIN_TIME, drained).await;
    });
}

/// A copy of `value` whose clones cost nothing: its bytes live for the rest of the process. For
/// configured values added to every request or response: a clone of an ordinary shared value is an
/// atomic increment (and its drop a decrement) on one counter that every worker thread touches.
/// Leaked once per gateway start, a few bytes each.
pub fn immortal_value(value: &HeaderValue) -> HeaderValue {
    let bytes: &'static [u8] = Box::leak(value.as_bytes().into());
    let mut copy = HeaderValue::from_maybe_shared(Bytes::from_static(bytes))
        .expect("the bytes of a header value are a header value");
    copy.set_sensitive(value.is_sensitive());
    copy
}

/// [`immortal_value`] for a header name (a standard name comes back as its constant).
pub fn immortal_name(name: &HeaderName) -> HeaderName {
    let text: &'static str = Box::leak(name.as_str().into());
    HeaderName::from_static(text)
}

/// Hop-by-hop headers (RFC 9110 §7.6.1), and `Upgrade` (no protocol is tunnelled), never
/// forwarded in either direction.
pub static HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Which of `names` (at most 32) `headers` carries, one bit each: found in one pass over the map's
/// names rather than a hashed lookup per name, as a message rarely carries any of them.
fn present(headers: &HeaderMap, names: &[HeaderName]) -> u32 {
    debug_assert!(names.len() <= 32);
    let mut present = 0;
    for name in headers.keys() {
        if let Some(i) = names.iter().position(|n| n == name) {
            present |= 1 << i;
        }
    }
    present
}

/// Removes the headers of `names` whose bits are set in `present`.
fn remove_present(headers: &mut HeaderMap, names: &[HeaderName], present: u32) {
    for (i, name) in names.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(name);
        }
    }
}

/// Removes every header of `names` (at most 32); only those present cost a hashed removal.
pub fn remove_all(headers: &mut HeaderMap, names: &[HeaderName]) {
    let found = present(headers, names);
    remove_present(headers, names, found);
}

/// Removes hop-by-hop headers, including every header the `Connection` header names (the
/// upstream's response; a request's are dropped as it is written, see [`HeaderEdits`]). A
/// response usually carries only `Connection: keep-alive`, which names nothing more and costs no
/// allocation.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let found = present(headers, &HOP_BY_HOP);
    if found & 1 != 0 {
        for name in connection_named(headers) {
            headers.remove(name);
        }
    }
    remove_present(headers, &HOP_BY_HOP, found);
}

/// The headers a message's `Connection` headers name, besides `close`, `keep-alive`, the
/// hop-by-hop headers (dropped anyway) and `Host` (which a request cannot go without).
pub fn connection_named(headers: &HeaderMap) -> Vec<HeaderName> {
    let mut named = Vec::new();
    for token in headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
    {
        let token = token.trim_ascii();
        if token.is_empty()
            || token.eq_ignore_ascii_case(b"close")
            || token.eq_ignore_ascii_case(b"keep-alive")
        {
            continue;
        }
        if let Ok(name) = HeaderName::from_bytes(token)
            && name != header::HOST
            && !HOP_BY_HOP.contains(&name)
        {
            named.push(name);
        }
    }
    named
}

/// A header map of `pairs`, appended in order (for tests).
#[cfg(test)]
pub(crate) fn header_map(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.append(
            HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    use super::header_map as headers;

    #[test]
    fn immortal_copies_are_equal_and_keep_sensitivity() {
        let mut secret = HeaderValue::from_str("max-age=63072000; includeSubDomains").unwrap();
        secret.set_sensitive(true);
        let copy = immortal_value(&secret);
        assert_eq!(copy, secret);
        assert!(copy.is_sensitive());
        assert_eq!(copy.clone(), secret);
        let name = HeaderName::from_bytes(b"X-API-Key-ID").unwrap();
        assert_eq!(immortal_name(&name), name);
        assert_eq!(immortal_name(&header::HOST), header::HOST);
    }

    #[test]
    fn connection_named_headers_are_removed() {
        let mut h = headers(&[
            ("connection", "keep-alive, X-Secret, x-api-key-id"),
            ("x-secret", "1"),
            ("x-api-key-id", "forged"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("upgrade", "websocket"),
            ("content-type", "application/json"),
        ]);
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("content-type"));

        // Several Connection lines, odd spacing and case, and tokens that name no header.
        let mut h = headers(&[
            ("connection", "Close ,, KEEP-ALIVE"),
            ("connection", " X-Other\t"),
            ("x-other", "1"),
            ("keep-alive", "timeout=5"),
            ("x-kept", "1"),
        ]);
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
    }
}
