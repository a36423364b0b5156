//! HTTP/1.1 messages to and from the upstream: the request head written, the response head
//! parsed, and the response body's framing decoded (RFC 9112).
//!
//! Narrower than a general HTTP client (hyper's client dispatches every exchange through a
//! request channel, a response one-shot and a body channel): keygate sends requests that hyper's
//! server has already parsed and the pipeline has rewritten, to one configured upstream.
//! [`super::pool`] does the I/O.
//!
//! It is strict where a proxy must be: a request carries exactly one framing header, chosen
//! here; a response whose framing is ambiguous or malformed is an error, and a connection is
//! kept only when the response was framed by its length or by chunks, ended exactly where its
//! framing said, and both sides allow keep-alive. A 2xx answer to CONNECT (a tunnel, RFC 9112
//! §6.3) is an error, so such a connection is never used again.

use std::mem::MaybeUninit;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Version};

/// At most this many header fields in a response head (hyper's client default).
pub const MAX_HEADERS: usize = 100;
/// At most this many bytes of response head, interim responses included.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Header fields a response head's map has room for beyond its own.
const RESPONSE_HEADER_ROOM: usize = 12;
/// At most this many bytes of chunk extensions on one chunk-size line, or of trailer section.
const MAX_CHUNK_META: usize = 16 * 1024;

/// How the response from the upstream broke HTTP/1.1.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtocolError {
    /// The head did not parse.
    #[error("malformed response head: {0}")]
    Head(#[from] httparse::Error),
    /// The head was longer than [`MAX_HEAD_BYTES`].
    #[error("response head larger than {MAX_HEAD_BYTES} bytes")]
    HeadTooLarge,
    /// A status code outside 100-999, or 101 (keygate never asks for a protocol switch).
    #[error("unexpected response status {0}")]
    Status(u16),
    /// A header name `http` does not accept.
    #[error("invalid response header name")]
    HeaderName,
    /// A header value `http` does not accept.
    #[error("invalid response header value")]
    HeaderValue,
    /// `Content-Length` values that are not one decimal number.
    #[error("invalid Content-Length in the response")]
    ContentLength,
    /// A chunked body whose framing is malformed.
    #[error("malformed chunked response body: {0}")]
    Chunked(&'static str),
    /// The connection closed in the middle of the response head.
    #[error("the upstream closed the connection in the middle of the response head")]
    IncompleteHead,
    /// The connection closed before the body's framing said it ended.
    #[error("the upstream closed the connection before the end of the response body")]
    IncompleteBody,
    /// A 2xx answer to CONNECT: the connection would become a tunnel.
    #[error("the upstream accepted a CONNECT tunnel, which keygate does not forward")]
    Tunnel,
}

/// What a request asks of its response's framing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseTo {
    /// An ordinary request: the response's headers frame its body.
    Other,
    /// HEAD: the response has no body, whatever its headers say.
    Head,
    /// CONNECT: a 2xx response opens a tunnel (refused).
    Connect,
}

impl ResponseTo {
    /// What `method` asks.
    pub fn method(method: &Method) -> Self {
        match *method {
            Method::HEAD => Self::Head,
            Method::CONNECT => Self::Connect,
            _ => Self::Other,
        }
    }
}

/// How the request's body is framed on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestFraming {
    /// No body, and no framing header (a GET, HEAD, … without one).
    None,
    /// `Content-Length`.
    Length(u64),
    /// `Transfer-Encoding: chunked`: the client's body has no known length.
    Chunked,
}

impl RequestFraming {
    /// The framing for a body of `exact` bytes if known (`None`: unknown, streamed in chunks).
    /// An empty body is announced as `Content-Length: 0` except for methods whose requests
    /// normally carry none, as hyper did.
    pub fn for_body(method: &Method, exact: Option<u64>) -> Self {
        match exact {
            Some(0) if matches!(*method, Method::GET | Method::HEAD | Method::CONNECT) => {
                Self::None
            }
            Some(n) => Self::Length(n),
            None => Self::Chunked,
        }
    }
}

/// A request head to write: the client's headers as the gateway forwards them.
#[derive(Debug)]
pub struct RequestHead<'a, K> {
    /// The method.
    pub method: &'a Method,
    /// The origin-form request target.
    pub target: &'a str,
    /// A `Host` to write first (the client's own is then not kept).
    pub host: Option<&'a HeaderValue>,
    /// The client's headers.
    pub headers: &'a HeaderMap,
    /// Which of the client's headers are copied.
    pub keep: K,
    /// Headers written after the copied ones.
    pub added: &'a [(HeaderName, HeaderValue)],
}

/// Appends the request head: request line, `Host`, the client's headers that `head.keep`
/// keeps except the framing ones (which `framing` decides alone, so the upstream can never see
/// two), the added headers, the framing header, the blank line. Header names and values are
/// valid by type: a `HeaderValue` cannot hold CR or LF.
pub fn encode_request<K: Fn(&HeaderName) -> bool>(
    out: &mut BytesMut,
    head: &RequestHead<'_, K>,
    framing: RequestFraming,
) {
    out.extend_from_slice(head.method.as_str().as_bytes());
    out.extend_from_slice(b" ");
    out.extend_from_slice(head.target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    if let Some(host) = head.host {
        header_line(out, &header::HOST, host);
    }
    for (name, value) in head.headers {
        if name == header::CONTENT_LENGTH || name == header::TRANSFER_ENCODING || !(head.keep)(name)
        {
            continue;
        }
        header_line(out, name, value);
    }
    for (name, value) in head.added {
        header_line(out, name, value);
    }
    match framing {
        RequestFraming::None => {}
        RequestFraming::Length(n) => content_length_line(out, n),
        RequestFraming::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    out.extend_from_slice(b"\r\n");
}

/// Appends `name: value` and CRLF.
fn header_line(out: &mut BytesMut, name: &HeaderName, value: &HeaderValue) {
    out.extend_from_slice(name.as_str().as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Appends `content-length: n` and CRLF.
fn content_length_line(out: &mut BytesMut, n: u64) {
    out.extend_from_slice(b"content-length: ");
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Appends the line that starts a chunk of `len` bytes: its size in hex, CRLF.
fn chunk_size_line(out: &mut BytesMut, len: usize) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut line = [0u8; 18];
    let mut at = 16;
    let mut n = len;
    loop {
        at -= 1;
        line[at] = DIGITS[n & 0xf];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    line[16..].copy_from_slice(b"\r\n");
    out.extend_from_slice(&line[at..]);
}

/// The line that starts a chunk of `len` bytes, on its own.
pub fn chunk_header(len: usize) -> Bytes {
    let mut line = BytesMut::with_capacity(18);
    chunk_size_line(&mut line, len);
    line.freeze()
}

/// The CRLF after a chunk's data.
pub const CHUNK_END: Bytes = Bytes::from_static(b"\r\n");
/// The last chunk of a chunked body, with no trailers.
pub const LAST_CHUNK: Bytes = Bytes::from_static(b"0\r\n\r\n");

/// A parsed final response head.
#[derive(Debug)]
pub struct ResponseHead {
    /// Status (never 1xx).
    pub status: StatusCode,
    /// `HTTP/1.0` or `HTTP/1.1`.
    pub version: Version,
    /// The reason phrase, when it is not the status's canonical one.
    pub reason: Option<Bytes>,
    /// Every header field, framing and hop-by-hop ones included.
    pub headers: HeaderMap,
    /// How the body is delimited.
    pub body: BodyFraming,
    /// Whether the connection may carry another request after this response's body.
    pub keep_alive: bool,
}

/// How a response's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFraming {
    /// None at all (HEAD, 204, 304).
    Empty,
    /// `Content-Length`.
    Length(u64),
    /// Chunked transfer coding.
    Chunked,
    /// Everything until the upstream closes the connection.
    Close,
}

/// Parses a final response head from the front of `buf`, removing it (and any interim 1xx
/// responses before it). `Ok(None)`: more bytes are needed.
pub fn parse_response(
    buf: &mut BytesMut,
    to: ResponseTo,
) -> Result<Option<ResponseHead>, ProtocolError> {
    loop {
        if buf.is_empty() {
            return Ok(None);
        }
        // Where each header's name and value are in the head, as offsets (a head is at most
        // 64 KiB), so the head can be split off and its values shared rather than copied.
        let mut spans = [(0u16, 0u16, 0u16, 0u16); MAX_HEADERS];
        let (len, code, version, reason, count) = {
            let mut headers = [const { MaybeUninit::uninit() }; MAX_HEADERS];
            let mut response = httparse::Response::new(&mut []);
            let status = httparse::ParserConfig::default().parse_response_with_uninit_headers(
                &mut response,
                buf,
                &mut headers,
            )?;
            let httparse::Status::Complete(len) = status else {
                if buf.len() > MAX_HEAD_BYTES {
                    return Err(ProtocolError::HeadTooLarge);
                }
                return Ok(None);
            };
            if len > MAX_HEAD_BYTES {
                return Err(ProtocolError::HeadTooLarge);
            }
            let base = buf.as_ptr() as usize;
            // Within the first 64 KiB of `buf`, as `len` is. An empty slice need not point into
            // `buf` at all (httparse gives an empty reason phrase as a static `""`), and any
            // offset serves it.
            let offset = |s: &[u8]| {
                if s.is_empty() {
                    0
                } else {
                    (s.as_ptr() as usize - base) as u16
                }
            };
            for (span, h) in spans.iter_mut().zip(response.headers.iter()) {
                *span = (
                    offset(h.name.as_bytes()),
                    h.name.len() as u16,
                    offset(h.value),
                    h.value.len() as u16,
                );
            }
            let reason = response.reason.map(|r| {
                let r = r.as_bytes();
                (offset(r), r.len() as u16)
            });
            (
                len,
                response.code.unwrap_or_default(),
                response.version.unwrap_or_default(),
                reason,
                response.headers.len(),
            )
        };
        let head = buf.split_to(len).freeze();
        let status = match StatusCode::from_u16(code) {
            Ok(s) if s != StatusCode::SWITCHING_PROTOCOLS => s,
            _ => return Err(ProtocolError::Status(code)),
        };
        if status.is_informational() {
            // 100 Continue, 103 Early Hints: nothing keygate passes on; the final head follows.
            continue;
        }
        let span = |at: u16, len: u16| usize::from(at)..usize::from(at) + usize::from(len);
        // With room for what the gateway adds to a response (CORS, security headers, HSTS,
        // request id, rate limit): filling the map past its capacity rebuilds it.
        let mut headers = HeaderMap::with_capacity(count + RESPONSE_HEADER_ROOM);
        // The framing headers are looked at as the map is built, rather than looked up after.
        let mut framing = FramingHeaders::default();
        for &(name_at, name_len, value_at, value_len) in &spans[..count] {
            let name = HeaderName::from_bytes(&head[span(name_at, name_len)])
                .map_err(|_| ProtocolError::HeaderName)?;
            let value = HeaderValue::from_maybe_shared(head.slice(span(value_at, value_len)))
                .map_err(|_| ProtocolError::HeaderValue)?;
            framing.note(&name, &value);
            headers.append(name, value);
        }
        let version = if version == 1 {
            Version::HTTP_11
        } else {
            Version::HTTP_10
        };
        let reason = reason
            .map(|(at, len)| head.slice(span(at, len)))
            .filter(|r| {
                !r.is_empty() && Some(&r[..]) != status.canonical_reason().map(str::as_bytes)
            });
        if to == ResponseTo::Connect && status.is_success() {
            return Err(ProtocolError::Tunnel);
        }
        let (body, framing_ok) = framing.body(status, version, to == ResponseTo::Head)?;
        let keep_alive = framing_ok
            && body != BodyFraming::Close
            && match version {
                Version::HTTP_11 => !framing.close,
                _ => framing.keep_alive,
            };
        return Ok(Some(ResponseHead {
            status,
            version,
            reason,
            headers,
            body,
            keep_alive,
        }));
    }
}

/// What a response's framing headers say.
#[derive(Debug, Default)]
struct FramingHeaders {
    /// `Content-Length`: none, one consistent value, or `Err` (invalid or conflicting).
    length: Option<Result<u64, ()>>,
    /// `Transfer-Encoding` is present, and whether its last coding so far is `chunked`.
    codings: Option<bool>,
    /// `Connection` lists `close` / `keep-alive`.
    close: bool,
    keep_alive: bool,
}

impl FramingHeaders {
    fn note(&mut self, name: &HeaderName, value: &HeaderValue) {
        if *name == header::CONTENT_LENGTH {
            for part in value.as_bytes().split(|&b| b == b',') {
                let n = parse_length(part.trim_ascii());
                self.length = match (self.length, n) {
                    (None, Some(n)) => Some(Ok(n)),
                    (Some(Ok(l)), Some(n)) if l == n => Some(Ok(n)),
                    _ => Some(Err(())),
                };
            }
        } else if *name == header::TRANSFER_ENCODING {
            let last = tokens(value).last();
            self.codings = match last {
                Some(coding) => Some(coding.eq_ignore_ascii_case(b"chunked")),
                None => Some(self.codings.unwrap_or(false)),
            };
        } else if *name == header::CONNECTION {
            for token in tokens(value) {
                self.close |= token.eq_ignore_ascii_case(b"close");
                self.keep_alive |= token.eq_ignore_ascii_case(b"keep-alive");
            }
        }
    }

    /// The body's framing (RFC 9112 §6.3), and whether the connection may stay open after it:
    /// `Transfer-Encoding` beside `Content-Length`, or in an HTTP/1.0 response, is framing that
    /// another hop may read differently, so the connection closes after this response.
    fn body(
        &self,
        status: StatusCode,
        version: Version,
        head_request: bool,
    ) -> Result<(BodyFraming, bool), ProtocolError> {
        if head_request || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
            return Ok((BodyFraming::Empty, true));
        }
        if let Some(chunked) = self.codings {
            let clean = version == Version::HTTP_11 && self.length.is_none();
            let framing = if chunked {
                BodyFraming::Chunked
            } else {
                BodyFraming::Close
            };
            return Ok((framing, clean));
        }
        Ok(match self.length {
            Some(Err(())) => return Err(ProtocolError::ContentLength),
            Some(Ok(0)) => (BodyFraming::Empty, true),
            Some(Ok(n)) => (BodyFraming::Length(n), true),
            None => (BodyFraming::Close, true),
        })
    }
}

/// A `Content-Length` value: 1 to 19 decimal digits (so it fits a `u64`), nothing else (no sign,
/// no list, no whitespace).
fn parse_length(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(digits.iter().fold(0, |n, d| n * 10 + u64::from(d - b'0')))
}

/// The comma-separated, trimmed, non-empty tokens of a header value.
fn tokens(value: &HeaderValue) -> impl Iterator<Item = &[u8]> {
    value
        .as_bytes()
        .split(|&b| b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
}

/// Reads a response body out of the connection's read buffer.
#[derive(Debug)]
pub struct BodyDecoder {
    state: Decode,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decode {
    /// Bytes left in a `Content-Length` body.
    Length(u64),
    /// Until the connection closes.
    Close,
    /// Inside the hex size of a chunk: its value so far, and its digits.
    Size(u64, u8),
    /// After a chunk's size: extensions (ignored), and how many bytes of them so far.
    Extension(u64, usize),
    /// The LF ending a chunk-size line.
    SizeLf(u64),
    /// Bytes left in a chunk's data.
    Data(u64),
    /// The CR after a chunk's data.
    DataCr,
    /// The LF after a chunk's data.
    DataLf,
    /// In the trailer section (after the last chunk): bytes of it so far, and whether the
    /// current line is empty so far.
    Trailer(usize, bool),
    /// The LF ending a trailer line (the section ends when the line was empty).
    TrailerLf(usize, bool),
    /// The body has ended.
    Done,
}

/// What the decoder found in the buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    /// Some of the body.
    Data(Bytes),
    /// The body has ended.
    End,
    /// The buffer holds no more of the body; read more.
    NeedMore,
}

impl BodyDecoder {
    /// A decoder for a body framed as `framing`.
    pub fn new(framing: BodyFraming) -> Self {
        let state = match framing {
            BodyFraming::Empty => Decode::Done,
            BodyFraming::Length(n) => Decode::Length(n),
            BodyFraming::Chunked => Decode::Size(0, 0),
            BodyFraming::Close => Decode::Close,
        };
        Self { state }
    }

    /// Whether the body has ended.
    pub fn is_done(&self) -> bool {
        self.state == Decode::Done
    }

    /// The bytes of the body still to come, when they are known.
    pub fn remaining(&self) -> Option<u64> {
        match self.state {
            Decode::Length(n) => Some(n),
            Decode::Done => Some(0),
            _ => None,
        }
    }

    /// Takes the next part of the body from the front of `buf`.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, ProtocolError> {
        loop {
            match self.state {
                Decode::Done => return Ok(Decoded::End),
                Decode::Length(0) => {
                    self.state = Decode::Done;
                    return Ok(Decoded::End);
                }
                Decode::Length(n) => {
                    if buf.is_empty() {
                        return Ok(Decoded::NeedMore);
                    }
                    let take = usize::try_from(n).unwrap_or(usize::MAX).min(buf.len());
                    let left = n - take as u64;
                    // Done as soon as the last byte is taken: a reader that knows the length
                    // may not ask again, and the connection is free from this moment.
                    self.state = if left == 0 {
                        Decode::Done
                    } else {
                        Decode::Length(left)
                    };
                    return Ok(Decoded::Data(buf.split_to(take).freeze()));
                }
                Decode::Close => {
                    if buf.is_empty() {
                        return Ok(Decoded::NeedMore);
                    }
                    return Ok(Decoded::Data(buf.split().freeze()));
                }
                Decode::Data(n) => {
                    if buf.is_empty() {
                        return Ok(Decoded::NeedMore);
                    }
                    let take = usize::try_from(n).unwrap_or(usize::MAX).min(buf.len());
                    let left = n - take as u64;
                    self.state = if left == 0 {
                        Decode::DataCr
                    } else {
                        Decode::Data(left)
                    };
                    return Ok(Decoded::Data(buf.split_to(take).freeze()));
                }
                _ => {
                    let Some(&byte) = buf.first() else {
                        return Ok(Decoded::NeedMore);
                    };
                    self.state = self.chunk_meta(byte)?;
                    buf.advance(1);
                }
            }
        }
    }

    /// One byte of chunk framing (size lines, CRLFs, trailers) taken in `state`.
    fn chunk_meta(&self, byte: u8) -> Result<Decode, ProtocolError> {
        use ProtocolError::Chunked;
        Ok(match self.state {
            Decode::Size(n, digits) => match byte {
                b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                    if digits == 16 {
                        return Err(Chunked("chunk size too large"));
                    }
                    let d = (byte as char).to_digit(16).unwrap_or(0);
                    Decode::Size(n << 4 | u64::from(d), digits + 1)
                }
                _ if digits == 0 => return Err(Chunked("missing chunk size")),
                b'\r' => Decode::SizeLf(n),
                b';' | b' ' | b'\t' => Decode::Extension(n, 1),
                _ => return Err(Chunked("invalid chunk size")),
            },
            Decode::Extension(n, seen) => match byte {
                b'\r' => Decode::SizeLf(n),
                _ if seen >= MAX_CHUNK_META => return Err(Chunked("chunk extensions too long")),
                b'\t' | b' '..=b'~' | 0x80.. => Decode::Extension(n, seen + 1),
                _ => return Err(Chunked("invalid byte in chunk extension")),
            },
            Decode::SizeLf(n) => match byte {
                b'\n' if n == 0 => Decode::Trailer(0, true),
                b'\n' => Decode::Data(n),
                _ => return Err(Chunked("chunk size line not ended by CRLF")),
            },
            Decode::DataCr => match byte {
                b'\r' => Decode::DataLf,
                _ => return Err(Chunked("chunk data not followed by CRLF")),
            },
            Decode::DataLf => match byte {
                b'\n' => Decode::Size(0, 0),
                _ => return Err(Chunked("chunk data not followed by CRLF")),
            },
            Decode::Trailer(seen, empty) => match byte {
                b'\r' => Decode::TrailerLf(seen, empty),
                _ if seen >= MAX_CHUNK_META => return Err(Chunked("trailer section too long")),
                b'\t' | b' '..=b'~' | 0x80.. => Decode::Trailer(seen + 1, false),
                _ => return Err(Chunked("invalid byte in trailer section")),
            },
            Decode::TrailerLf(seen, empty) => match byte {
                // Trailers are read past, not passed on: nothing keygate serves uses them.
                b'\n' if empty => Decode::Done,
                b'\n' => Decode::Trailer(seen + 2, true),
                _ => return Err(Chunked("trailer line not ended by CRLF")),
            },
            Decode::Length(_) | Decode::Close | Decode::Data(_) | Decode::Done => self.state,
        })
    }

    /// The connection closed with `buf` empty: the end of a close-delimited body, or an error.
    pub fn eof(&mut self) -> Result<(), ProtocolError> {
        match self.state {
            Decode::Close | Decode::Done | Decode::Length(0) => {
                self.state = Decode::Done;
                Ok(())
            }
            _ => Err(ProtocolError::IncompleteBody),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_size_lines_are_hex() {
        for (len, line) in [
            (1, "1\r\n"),
            (15, "f\r\n"),
            (16, "10\r\n"),
            (65_535, "ffff\r\n"),
        ] {
            assert_eq!(&chunk_header(len)[..], line.as_bytes());
        }
        assert_eq!(&chunk_header(usize::MAX)[..], b"ffffffffffffffff\r\n");
    }

    #[test]
    fn content_lengths_are_plain_digits() {
        assert_eq!(parse_length(b"0"), Some(0));
        assert_eq!(parse_length(b"1234"), Some(1234));
        assert_eq!(
            parse_length(b"9999999999999999999"),
            Some(9_999_999_999_999_999_999)
        );
        for bad in [
            &b""[..],
            b"+5",
            b"-1",
            b"5 ",
            b" 5",
            b"5,5",
            b"0x10",
            b"99999999999999999999",
        ] {
            assert_eq!(parse_length(bad), None, "{bad:?}");
        }
    }

    fn parse(bytes: &[u8]) -> Result<Option<ResponseHead>, ProtocolError> {
        parse_response(&mut BytesMut::from(bytes), ResponseTo::Other)
    }

    fn framing(bytes: &str) -> (BodyFraming, bool) {
        let head = parse(bytes.as_bytes()).unwrap().unwrap();
        (head.body, head.keep_alive)
    }

    /// Decodes `wire` fed one byte at a time, then at once; both must give `body`.
    fn decode_all(framing: BodyFraming, wire: &[u8]) -> Result<(Vec<u8>, usize), ProtocolError> {
        let mut whole = Vec::new();
        let mut decoder = BodyDecoder::new(framing);
        let mut buf = BytesMut::new();
        let mut fed = 0;
        loop {
            match decoder.decode(&mut buf)? {
                Decoded::Data(d) => whole.extend_from_slice(&d),
                Decoded::End => break,
                Decoded::NeedMore if fed < wire.len() => {
                    buf.extend_from_slice(&wire[fed..=fed]);
                    fed += 1;
                }
                Decoded::NeedMore => {
                    decoder.eof()?;
                    break;
                }
            }
        }
        let mut at_once = Vec::new();
        let mut decoder = BodyDecoder::new(framing);
        let mut buf = BytesMut::from(wire);
        loop {
            match decoder.decode(&mut buf)? {
                Decoded::Data(d) => at_once.extend_from_slice(&d),
                Decoded::End => break,
                Decoded::NeedMore => {
                    decoder.eof()?;
                    break;
                }
            }
        }
        assert_eq!(whole, at_once);
        Ok((whole, buf.len()))
    }

    #[test]
    fn a_request_head_has_one_framing_header_chosen_by_the_body() {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, HeaderValue::from_static("client"));
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("5"));
        headers.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        headers.append("x-a", HeaderValue::from_static("1"));
        headers.append("x-a", HeaderValue::from_static("2"));
        headers.append("x-dropped", HeaderValue::from_static("3"));
        let added = [(
            HeaderName::from_static("x-added"),
            HeaderValue::from_static("4"),
        )];
        let up = HeaderValue::from_static("up");
        let head = |method, host: Option<&'static HeaderValue>| RequestHead {
            method,
            target: "/p?q=1",
            host,
            headers: &headers,
            keep: move |name: &HeaderName| {
                name != "x-dropped" && (host.is_none() || name != header::HOST)
            },
            added: &added,
        };
        let up: &'static HeaderValue = Box::leak(Box::new(up));
        let mut out = BytesMut::new();
        encode_request(
            &mut out,
            &head(&Method::POST, Some(up)),
            RequestFraming::Length(7),
        );
        assert_eq!(
            &out[..],
            &b"POST /p?q=1 HTTP/1.1\r\nhost: up\r\nx-a: 1\r\nx-a: 2\r\nx-added: 4\r\n\
               content-length: 7\r\n\r\n"[..]
        );
        out.clear();
        encode_request(&mut out, &head(&Method::PUT, None), RequestFraming::Chunked);
        assert_eq!(
            &out[..],
            &b"PUT /p?q=1 HTTP/1.1\r\nhost: client\r\nx-a: 1\r\nx-a: 2\r\nx-added: 4\r\n\
               transfer-encoding: chunked\r\n\r\n"[..]
        );
        out.clear();
        encode_request(
            &mut out,
            &head(&Method::GET, Some(up)),
            RequestFraming::None,
        );
        assert!(out.ends_with(b"x-added: 4\r\n\r\n"));

        assert_eq!(
            RequestFraming::for_body(&Method::GET, Some(0)),
            RequestFraming::None
        );
        assert_eq!(
            RequestFraming::for_body(&Method::POST, Some(0)),
            RequestFraming::Length(0)
        );
        assert_eq!(
            RequestFraming::for_body(&Method::GET, Some(3)),
            RequestFraming::Length(3)
        );
        assert_eq!(
            RequestFraming::for_body(&Method::POST, None),
            RequestFraming::Chunked
        );
    }

    #[test]
    fn a_response_head_is_parsed_and_split_off_with_interim_responses() {
        let mut buf = BytesMut::from(
            &b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n\
               HTTP/1.1 200 Fine\r\nContent-Type: text/plain\r\nSet-Cookie: a=1\r\n\
               Set-Cookie: b=2\r\nContent-Length: 2\r\n\r\nokHTTP/1.1"[..],
        );
        let head = parse_response(&mut buf, ResponseTo::Other)
            .unwrap()
            .unwrap();
        assert_eq!(head.status, StatusCode::OK);
        assert_eq!(head.version, Version::HTTP_11);
        assert_eq!(head.reason.as_deref(), Some(&b"Fine"[..]));
        assert_eq!(head.headers["content-type"], "text/plain");
        assert_eq!(head.headers.get_all("set-cookie").iter().count(), 2);
        assert_eq!(head.body, BodyFraming::Length(2));
        assert!(head.keep_alive);
        assert_eq!(&buf[..], b"okHTTP/1.1");

        let head = parse(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n").unwrap();
        assert_eq!(
            head.unwrap().reason,
            None,
            "the canonical reason is not kept"
        );
        // httparse gives a reason phrase that is not UTF-8 as a static "", outside the buffer
        // (the fuzzer's first finding).
        let head = parse(b"HTTP/1.1 200 Oth: 4,\xa05\r\n\r\nabcde").unwrap();
        assert_eq!(head.unwrap().reason, None);
    }

    #[test]
    fn a_partial_head_needs_more_and_an_endless_one_is_refused() {
        assert!(parse(b"HTTP/1.1 200 OK\r\ncontent-le").unwrap().is_none());
        let mut long = b"HTTP/1.1 200 OK\r\nx: ".to_vec();
        long.resize(MAX_HEAD_BYTES + 1, b'a');
        assert_eq!(parse(&long).unwrap_err(), ProtocolError::HeadTooLarge);
        let mut many = b"HTTP/1.1 200 OK\r\n".to_vec();
        for _ in 0..=MAX_HEADERS {
            many.extend_from_slice(b"x: 1\r\n");
        }
        many.extend_from_slice(b"\r\n");
        assert_eq!(
            parse(&many).unwrap_err(),
            ProtocolError::Head(httparse::Error::TooManyHeaders)
        );
    }

    #[test]
    fn malformed_or_unexpected_heads_are_errors() {
        assert!(matches!(
            parse(b"HTTP/1.1 200 OK\r\nbad header: 1\r\n\r\n"),
            Err(ProtocolError::Head(_))
        ));
        assert!(matches!(
            parse(b"HTTP/2 200 OK\r\n\r\n"),
            Err(ProtocolError::Head(_))
        ));
        assert_eq!(
            parse(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: x\r\n\r\n").unwrap_err(),
            ProtocolError::Status(101)
        );
        assert!(matches!(
            parse(b"HTTP/1.1 099 Low\r\n\r\n"),
            Err(ProtocolError::Status(99) | ProtocolError::Head(_))
        ));
        for cl in [
            "1, 2",
            "-1",
            "+1",
            "0x10",
            "",
            "99999999999999999999",
            "1 2",
        ] {
            let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {cl}\r\n\r\n");
            assert_eq!(
                parse(head.as_bytes()).unwrap_err(),
                ProtocolError::ContentLength,
                "{cl:?}"
            );
        }
        let two = b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ncontent-length: 4\r\n\r\n";
        assert_eq!(parse(two).unwrap_err(), ProtocolError::ContentLength);
    }

    #[test]
    fn a_2xx_to_connect_is_a_tunnel_and_refused() {
        // RFC 9112 §6.3: the connection becomes a tunnel right after the head, whatever its
        // length says; it must never carry another request.
        for head in [
            &b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"[..],
            b"HTTP/1.1 204 No Content\r\n\r\n",
        ] {
            let mut buf = BytesMut::from(head);
            assert_eq!(
                parse_response(&mut buf, ResponseTo::Connect).unwrap_err(),
                ProtocolError::Tunnel
            );
        }
        // A refusal of the tunnel is an ordinary response.
        let mut buf = BytesMut::from(&b"HTTP/1.1 403 Forbidden\r\ncontent-length: 2\r\n\r\nno"[..]);
        let head = parse_response(&mut buf, ResponseTo::Connect)
            .unwrap()
            .unwrap();
        assert_eq!(head.body, BodyFraming::Length(2));
        assert_eq!(ResponseTo::method(&Method::CONNECT), ResponseTo::Connect);
        assert_eq!(ResponseTo::method(&Method::HEAD), ResponseTo::Head);
        assert_eq!(ResponseTo::method(&Method::POST), ResponseTo::Other);
    }

    #[test]
    fn framing_follows_rfc_9112_and_decides_keep_alive() {
        let cases = [
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n",
                (BodyFraming::Length(5), true),
            ),
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 5, 5\r\n\r\n",
                (BodyFraming::Length(5), true),
            ),
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
                (BodyFraming::Empty, true),
            ),
            (
                "HTTP/1.1 204 No Content\r\ncontent-length: 9\r\n\r\n",
                (BodyFraming::Empty, true),
            ),
            (
                "HTTP/1.1 304 Not Modified\r\n\r\n",
                (BodyFraming::Empty, true),
            ),
            (
                "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
                (BodyFraming::Chunked, true),
            ),
            (
                "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, Chunked\r\n\r\n",
                (BodyFraming::Chunked, true),
            ),
            (
                "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 5\r\n\r\n",
                (BodyFraming::Chunked, false),
            ),
            (
                "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n",
                (BodyFraming::Close, false),
            ),
            (
                "HTTP/1.0 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
                (BodyFraming::Chunked, false),
            ),
            ("HTTP/1.1 200 OK\r\n\r\n", (BodyFraming::Close, false)),
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 1\r\nconnection: x, Close\r\n\r\n",
                (BodyFraming::Length(1), false),
            ),
            (
                "HTTP/1.0 200 OK\r\ncontent-length: 1\r\n\r\n",
                (BodyFraming::Length(1), false),
            ),
            (
                "HTTP/1.0 200 OK\r\ncontent-length: 1\r\nconnection: keep-alive\r\n\r\n",
                (BodyFraming::Length(1), true),
            ),
        ];
        let more = [
            (
                "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\ntransfer-encoding: chunked\r\n\r\n",
                (BodyFraming::Chunked, true),
            ),
            (
                "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntransfer-encoding: gzip\r\n\r\n",
                (BodyFraming::Close, false),
            ),
            (
                "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: x\r\n\r\n",
                (BodyFraming::Chunked, false),
            ),
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 4\r\nconnection: keep-alive\r\n\r\n",
                (BodyFraming::Length(4), true),
            ),
        ];
        for (head, expected) in cases.into_iter().chain(more) {
            assert_eq!(framing(head), expected, "{head:?}");
        }
        let mut buf = BytesMut::from(&b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"[..]);
        let head = parse_response(&mut buf, ResponseTo::Head).unwrap().unwrap();
        assert_eq!(
            head.body,
            BodyFraming::Empty,
            "a response to HEAD has no body"
        );
    }

    #[test]
    fn bodies_are_decoded_to_exactly_their_framing() {
        assert_eq!(
            decode_all(BodyFraming::Length(5), b"helloNEXT").unwrap(),
            (b"hello".to_vec(), 4)
        );
        assert_eq!(
            decode_all(BodyFraming::Length(6), b"hello"),
            Err(ProtocolError::IncompleteBody)
        );
        assert_eq!(
            decode_all(BodyFraming::Close, b"all of it").unwrap(),
            (b"all of it".to_vec(), 0)
        );
        assert_eq!(
            decode_all(BodyFraming::Empty, b"NEXT").unwrap(),
            (Vec::new(), 4)
        );
        let chunked =
            b"5\r\nhello\r\n9 ;ext=1\r\n, world!!\r\nA\r\n0123456789\r\n0\r\nx-t: 1\r\n\r\nNEXT";
        assert_eq!(
            decode_all(BodyFraming::Chunked, chunked).unwrap(),
            (b"hello, world!!0123456789".to_vec(), 4)
        );
        assert_eq!(
            decode_all(BodyFraming::Chunked, b"3\r\nabc\r\n0\r\n\r\n").unwrap(),
            (b"abc".to_vec(), 0)
        );
    }

    #[test]
    fn malformed_chunks_are_errors() {
        for wire in [
            &b"\r\n"[..],
            b"g\r\n",
            b"5\nhello\r\n0\r\n\r\n",
            b"5\r\nhelloX\r\n0\r\n\r\n",
            b"5\r\nhello\rX",
            b"11111111111111111\r\n",
            b"0\r\nx\0\r\n\r\n",
            b"1;\x01\r\n",
        ] {
            assert!(
                matches!(
                    decode_all(BodyFraming::Chunked, wire),
                    Err(ProtocolError::Chunked(_))
                ),
                "{wire:?}"
            );
        }
        assert_eq!(
            decode_all(BodyFraming::Chunked, b"5\r\nhel"),
            Err(ProtocolError::IncompleteBody)
        );
        let mut ext = b"1;".to_vec();
        ext.resize(MAX_CHUNK_META + 8, b'a');
        assert!(matches!(
            decode_all(BodyFraming::Chunked, &ext),
            Err(ProtocolError::Chunked("chunk extensions too long"))
        ));
    }
}
