//! The upstream client: a request the pipeline has prepared goes out on a keep-alive HTTP/1.1
//! connection to the configured backend, and its response comes back with the body streamed.
//!
//! The interface is [`Upstream::send`]: the client's request (method, target, headers with the
//! changes to make, body) in, the response or an [`Error`] tagged with the side it arose on and
//! whether the request may be sent again. Nothing here knows about the client-facing server.
//!
//! HTTP/1.1 itself (request heads written, responses parsed, bodies framed) is hyper's client.
//!
//! - [`pool`]: each worker's connections.
//! - [`body`]: the client's body on its way up, held to its limit and idle timeout, saying
//!   when hyper has taken it whole.

mod body;
mod error;
mod pool;

use std::sync::Arc;
use std::time::Duration;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{Method, Response, Uri, Version};
use http_body::Body as _;

pub use body::RequestBody;
pub use error::{Error, ErrorKind, Side};
pub use pool::ResponseBody;

use crate::config;
use body::{Outbound, Sent};
use pool::Pool;

/// The upstream closed the connection before responding.
#[derive(Debug, thiserror::Error)]
#[error("the upstream closed the connection before responding")]
struct Closed;

/// No response head within the response timeout of the request's end.
#[derive(Debug, thiserror::Error)]
#[error("no response headers within {0:?} of the request's end")]
struct NoResponse(Duration);

/// A request for the upstream: the client's, with the gateway's changes to its headers.
#[derive(Debug)]
pub struct Request<'a, K> {
    /// The method.
    pub method: &'a Method,
    /// The client's request target (placed under the upstream URL's base path).
    pub uri: &'a Uri,
    /// A `Host` to write instead of the client's.
    pub host: Option<&'a HeaderValue>,
    /// The client's headers.
    pub headers: &'a HeaderMap,
    /// Which of the client's headers go upstream (framing headers never do: the body's framing
    /// is chosen here).
    pub keep: K,
    /// Headers written after the client's.
    pub added: &'a [(HeaderName, HeaderValue)],
    /// The client's body.
    pub body: RequestBody,
}

/// The upstream and one worker's pool of connections to it.
#[derive(Debug)]
pub struct Upstream {
    pool: Arc<Pool>,
    host_header: HeaderValue,
    base_path: String,
    response_timeout: Duration,
}

impl Upstream {
    /// A pool for `[upstream]`, over TLS with `tls` (the client configuration of an `https://`
    /// upstream, [`crate::tls::upstream_client_config`]); `opened` counts the connections it
    /// opens.
    pub fn new(
        cfg: &config::Upstream,
        tls: Option<Arc<rustls::ClientConfig>>,
        opened: metrics::Counter,
    ) -> Self {
        // The config loader accepts URLs with a host only.
        let host_header = cfg
            .url
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
            .unwrap_or_else(|| HeaderValue::from_static("localhost"));
        let (host, port) = cfg.address();
        let host = host.to_owned();
        // The certificate must be for the URL's host, which is also sent as SNI (an IP address
        // is checked against the certificate's IP addresses, and sends none).
        let tls = match (tls, &cfg.tls) {
            (Some(config), Some(upstream_tls)) => Some(pool::Tls {
                connector: tokio_rustls::TlsConnector::from(config),
                server_name: upstream_tls.server_name.clone(),
            }),
            _ => None,
        };
        Self {
            pool: Arc::new(Pool::new(
                host,
                port,
                tls,
                cfg.connect_timeout,
                cfg.pool_max_idle,
                cfg.pool_idle_timeout,
                opened,
            )),
            host_header,
            base_path: cfg.url.path().trim_end_matches('/').to_owned(),
            response_timeout: cfg.response_timeout,
        }
    }

    /// The host and port connections go to (the scheme's default port when the URL has none),
    /// for the readiness probe.
    pub fn address(&self) -> (&str, u16) {
        self.pool.address()
    }

    /// The upstream's own `Host` value (`host:port` of its URL).
    pub fn host_header(&self) -> &HeaderValue {
        &self.host_header
    }

    /// Closes the pool's idle connections (before the worker's runtime ends).
    pub fn close_idle(&self) {
        self.pool.close_idle();
    }

    /// The request target for the upstream, in origin form (`/path?query`), under the URL's
    /// base path. A client's origin-form target without a base path is used as it is.
    fn target(&self, original: &Uri) -> Uri {
        if self.base_path.is_empty()
            && original.scheme().is_none()
            && original.path().starts_with('/')
        {
            return original.clone();
        }
        let pq = original.path_and_query().map_or("/", PathAndQuery::as_str);
        let pq = if self.base_path.is_empty() {
            PathAndQuery::try_from(pq).ok()
        } else {
            PathAndQuery::try_from(format!("{}{pq}", self.base_path)).ok()
        };
        Uri::from(pq.unwrap_or_else(|| PathAndQuery::from_static("/")))
    }

    /// Sends `req` and returns the response head with its body streaming (hop-by-hop headers
    /// included: what goes back to the client is the caller's to decide).
    ///
    /// The request goes out on the warmest idle connection. If that one turns out closed before
    /// the request went out, the request goes once more on a new connection; if it closes after
    /// the request went out but before any response, only a request that may be repeated (RFC
    /// 9110 §9.2.2: an idempotent method, and no body) does.
    pub async fn send<K: Fn(&HeaderName) -> bool>(
        &self,
        req: Request<'_, K>,
    ) -> Result<Response<ResponseBody>, Error> {
        let body = req.body;
        let length = if body.is_end_stream() {
            Some(0)
        } else {
            body.size_hint().exact()
        };
        // An empty body is announced as `Content-Length: 0` except for methods whose requests
        // normally carry none; a body of unknown length goes in chunks (hyper's choice when no
        // length is given).
        let length = match length {
            Some(0) if matches!(*req.method, Method::GET | Method::HEAD | Method::CONNECT) => None,
            other => other,
        };
        let body = (!body.is_end_stream()).then_some(body);
        let repeatable = body.is_none() && req.method.is_idempotent();
        let target = self.target(req.uri);
        let head = || {
            let mut headers = HeaderMap::with_capacity(req.headers.len() + req.added.len() + 2);
            if let Some(host) = req.host {
                headers.insert(header::HOST, host.clone());
            }
            for (name, value) in req.headers {
                // The body's framing is decided here alone, so the upstream can never see two.
                if name == header::CONTENT_LENGTH
                    || name == header::TRANSFER_ENCODING
                    || !(req.keep)(name)
                {
                    continue;
                }
                headers.append(name, value.clone());
            }
            for (name, value) in req.added {
                headers.append(name, value.clone());
            }
            if let Some(n) = length {
                headers.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
            }
            headers
        };
        let build = |body: Option<RequestBody>| {
            let (outbound, sent) = Outbound::new(body);
            let mut request = http::Request::new(outbound);
            *request.method_mut() = req.method.clone();
            *request.uri_mut() = target.clone();
            *request.version_mut() = Version::HTTP_11;
            *request.headers_mut() = head();
            (request, sent)
        };
        let (mut request, mut sent) = build(body);
        let (mut sender, mut reused) = match self.pool.idle() {
            Some(sender) => (sender, true),
            None => (self.pool.connect().await?, false),
        };
        loop {
            if sender.ready().await.is_err() {
                // The connection closed before it could take the request: nothing was sent.
                if !reused {
                    return Err(Error::new(ErrorKind::Protocol, Closed));
                }
                sender = self.pool.connect().await?;
                reused = false;
                continue;
            }
            let response = sender.try_send_request(request);
            match self.response(response, &mut sent).await {
                Ok(Ok(response)) => {
                    let (parts, incoming) = response.into_parts();
                    let body = ResponseBody::new(incoming, sender, Arc::clone(&self.pool), sent);
                    return Ok(Response::from_parts(parts, body));
                }
                Ok(Err(mut e)) => {
                    let unsent = e.take_message();
                    let error = e.into_error();
                    if !reused {
                        return Err(exchange_error(error));
                    }
                    (request, sent) = match unsent {
                        Some(unsent) => (unsent, sent),
                        None if repeatable && error.is_incomplete_message() => build(None),
                        None => return Err(exchange_error(error)),
                    };
                    sender = self.pool.connect().await?;
                    reused = false;
                }
                Err(_) => {
                    return Err(Error::new(
                        ErrorKind::Timeout,
                        NoResponse(self.response_timeout),
                    ));
                }
            }
        }
    }

    /// Waits for the response; the response timeout runs from when the request's body has been
    /// taken whole (a large upload may take as long as it takes; an upstream that then stays
    /// silent may not).
    async fn response<F: Future>(
        &self,
        response: F,
        sent: &mut Sent,
    ) -> Result<F::Output, tokio::time::error::Elapsed> {
        let mut response = std::pin::pin!(response);
        tokio::select! {
            biased;
            output = &mut response => return Ok(output),
            () = sent.wait() => {}
        }
        tokio::time::timeout(self.response_timeout, response).await
    }
}

/// The error of an exchange that failed: the client's body's own (its limit, its idle timeout,
/// a broken stream), or the upstream's.
fn exchange_error(error: hyper::Error) -> Error {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(&error);
    while let Some(e) = source {
        if let Some(body) = e.downcast_ref::<Error>() {
            return Error::new(body.kind(), error);
        }
        source = e.source();
    }
    Error::new(ErrorKind::Protocol, error)
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::Mutex;

    use http_body_util::BodyExt as _;
    use hyper::body::Incoming;
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
    use tokio::net::TcpListener;
    use tokio::sync::{mpsc, oneshot};

    use super::*;

    /// Reads from `stream` until a request head has arrived: what was read (the head, and any
    /// body bytes after it), or `None` if the peer closed first.
    async fn read_head(stream: &mut tokio::net::TcpStream) -> Option<Vec<u8>> {
        let mut seen = Vec::new();
        let mut buf = [0; 4096];
        while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
        Some(seen)
    }

    /// An upstream that answers the first request on each connection with 200 and keeps the
    /// connection, then reads the next request and closes without a word (as an upstream whose
    /// keep-alive timeout ran out as the request arrived). Sends the connection's number and
    /// each request it read on the channel.
    async fn closing_upstream() -> (u16, mpsc::UnboundedReceiver<(usize, String)>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            for conn in 0.. {
                let (mut stream, _) = listener.accept().await.unwrap();
                let tx = tx.clone();
                tokio::spawn(async move {
                    for answered in [true, false] {
                        let Some(seen) = read_head(&mut stream).await else {
                            return;
                        };
                        let _ = tx.send((conn, String::from_utf8_lossy(&seen).into_owned()));
                        if !answered {
                            return;
                        }
                        let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        if stream.write_all(answer).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (port, rx)
    }

    fn upstream(port: u16) -> Upstream {
        Upstream {
            pool: Arc::new(Pool::new(
                "127.0.0.1".into(),
                port,
                None,
                Duration::from_secs(5),
                4,
                Duration::from_secs(60),
                metrics::Counter::noop(),
            )),
            host_header: HeaderValue::from_static("upstream"),
            base_path: String::new(),
            response_timeout: Duration::from_secs(5),
        }
    }

    /// A client's request as the gateway receives it (from a hyper server, here over an
    /// in-memory pipe), and the client's end of that pipe.
    async fn client_request(head: &str) -> (http::Request<Incoming>, DuplexStream) {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let (tx, rx) = oneshot::channel();
        let tx = Mutex::new(Some(tx));
        tokio::spawn(async move {
            let service = service_fn(move |req: http::Request<Incoming>| {
                if let Some(tx) = tx.lock().unwrap().take() {
                    let _ = tx.send(req);
                }
                std::future::pending::<Result<Response<String>, Infallible>>()
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(server), service)
                .await;
        });
        client.write_all(head.as_bytes()).await.unwrap();
        (rx.await.unwrap(), client)
    }

    /// The client's request as the pipeline hands it to [`Upstream::send`], every header kept.
    fn forwarded(
        parts: &http::request::Parts,
        body: Incoming,
    ) -> Request<'_, fn(&HeaderName) -> bool> {
        Request {
            method: &parts.method,
            uri: &parts.uri,
            host: None,
            headers: &parts.headers,
            keep: |_| true,
            added: &[],
            body: RequestBody::new(body, None, Duration::from_secs(5)),
        }
    }

    /// Sends the client's request `head` through `upstream`; the status and body, or the error.
    async fn send(upstream: &Upstream, head: &str) -> Result<(u16, Vec<u8>), Error> {
        let (req, _client) = client_request(head).await;
        let (parts, body) = req.into_parts();
        let resp = upstream.send(forwarded(&parts, body)).await?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await?.to_bytes().to_vec();
        Ok((status, body))
    }

    #[tokio::test]
    async fn a_request_on_a_closed_reused_connection_goes_again_only_if_it_may_be_repeated() {
        let (port, mut seen) = closing_upstream().await;
        let upstream = upstream(port);

        let first = send(&upstream, "GET /a HTTP/1.1\r\nhost: x\r\n\r\n").await;
        assert_eq!(first.unwrap(), (200, b"ok".to_vec()));
        assert_eq!(seen.recv().await.unwrap().0, 0);

        // Connection 0 is reused and closes on the request: a GET goes again, on connection 1.
        let again = send(&upstream, "GET /b HTTP/1.1\r\nhost: x\r\n\r\n").await;
        assert_eq!(again.unwrap(), (200, b"ok".to_vec()));
        let (conn, req) = seen.recv().await.unwrap();
        assert_eq!(conn, 0);
        assert!(req.starts_with("GET /b "), "{req}");
        let (conn, req) = seen.recv().await.unwrap();
        assert_eq!(conn, 1);
        assert!(req.starts_with("GET /b "), "{req}");

        // Connection 1 is reused and closes on the request: a POST is not sent again.
        let post = "POST /c HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n\r\nhello";
        let error = send(&upstream, post).await.unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Protocol, "{error}");
        let (conn, req) = seen.recv().await.unwrap();
        assert_eq!(conn, 1);
        assert!(req.starts_with("POST /c "), "{req}");
        assert!(seen.try_recv().is_err(), "the POST was sent again");
    }

    /// An upstream that reads one request (its head, and as many body bytes as its
    /// `Content-Length` says), writes `answer` (nothing, when empty), and keeps the connection
    /// open.
    async fn answering_upstream(answer: &'static [u8]) -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let Some(mut seen) = read_head(&mut stream).await else {
                        return;
                    };
                    let end = seen.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                    let head = String::from_utf8_lossy(&seen[..end]).to_lowercase();
                    let length: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length: "))
                        .map_or(0, |v| v.trim().parse().unwrap());
                    let mut buf = [0; 4096];
                    while seen.len() < end + length {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => seen.extend_from_slice(&buf[..n]),
                        }
                    }
                    if stream.write_all(answer).await.is_ok() {
                        std::future::pending::<()>().await;
                    }
                });
            }
        });
        port
    }

    #[tokio::test]
    async fn the_response_timeout_runs_from_the_end_of_the_request_body() {
        let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
        let port = answering_upstream(answer).await;
        let slow = Upstream {
            response_timeout: Duration::from_millis(200),
            ..upstream(port)
        };
        // The body takes 600 ms to arrive, three response timeouts.
        let head = "POST /u HTTP/1.1\r\nhost: x\r\ncontent-length: 6\r\n\r\nab";
        let (req, mut client) = client_request(head).await;
        let (parts, body) = req.into_parts();
        let rest = tokio::spawn(async move {
            for part in [b"cd", b"ef"] {
                tokio::time::sleep(Duration::from_millis(300)).await;
                client.write_all(part).await.unwrap();
            }
            client
        });
        let resp = slow.send(forwarded(&parts, body)).await.unwrap();
        assert_eq!(resp.status(), 200);
        drop(rest.await.unwrap());

        // An upstream that stays silent after the request: 200 ms after its end, a timeout.
        let port = answering_upstream(b"").await;
        let silent = Upstream {
            response_timeout: Duration::from_millis(200),
            ..upstream(port)
        };
        let error = send(&silent, "GET /silent HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Timeout, "{error}");
    }

    #[tokio::test]
    async fn a_malformed_or_cut_response_is_an_upstream_protocol_error() {
        for (answer, what) in [
            (
                &b"HTTP/1.1 200 OK\r\ncontent-length: x\r\n\r\nok"[..],
                "bad length",
            ),
            (b"HTTP/1.1 200 OK\r\nbad header\r\n\r\n", "bad header line"),
            (
                b"HTTP/9.1 200 OK\r\ncontent-length: 0\r\n\r\n",
                "bad version",
            ),
        ] {
            let port = answering_upstream(answer).await;
            let error = send(&upstream(port), "GET / HTTP/1.1\r\nhost: x\r\n\r\n")
                .await
                .unwrap_err();
            assert_eq!(error.kind(), ErrorKind::Protocol, "{what}: {error}");
            assert!(!error.may_retry(), "{what}");
        }
        // A body cut short: the head arrives, the error comes with the body.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut buf = [0; 4096];
            let _ = stream.read(&mut buf).await;
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort")
                .await;
        });
        let error = send(&upstream(port), "GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Protocol, "{error}");
    }

    #[tokio::test]
    async fn an_answer_before_the_body_reaches_the_client_when_the_upstream_then_closes() {
        // Reads a request's head, answers 403 and closes with the body unread: the kernel
        // resets the connection, and writing the rest of the body fails.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    if read_head(&mut stream).await.is_none() {
                        return;
                    }
                    let answer = b"HTTP/1.1 403 Forbidden\r\ncontent-length: 2\r\n\r\nno";
                    let _ = stream.write_all(answer).await;
                });
            }
        });
        let upstream = upstream(port);
        const BODY: usize = 8 << 20;
        for round in 0..10 {
            let head = format!("POST /u HTTP/1.1\r\nhost: x\r\ncontent-length: {BODY}\r\n\r\n");
            let (req, mut client) = client_request(&head).await;
            let (parts, body) = req.into_parts();
            tokio::spawn(async move {
                let chunk = vec![b'x'; 64 * 1024];
                for _ in 0..BODY / chunk.len() {
                    if client.write_all(&chunk).await.is_err() {
                        return;
                    }
                }
            });
            let resp = upstream.send(forwarded(&parts, body)).await;
            let resp = resp.unwrap_or_else(|e| panic!("round {round}: {e}"));
            assert_eq!(resp.status(), 403, "round {round}");
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(&body[..], b"no", "round {round}");
        }
    }
}
