//! HTTP toward clients: HTTP/2 or HTTP/1.1 by ALPN, HTTP/1.1 framing (length or chunks, `HEAD`,
//! `Date`) and `Expect: 100-continue`.

use std::time::Duration;

use reqwest::StatusCode;

use crate::common::{Gateway, Upstream};

#[tokio::test]
async fn http2_and_http1_are_negotiated_by_alpn() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream.url(), &[]).await;
    let key = gw.create_key("alpn").await;
    let resp = gw.get_with_key("/x", &key).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    let h1 = gw.h1_client();
    let resp = h1
        .get(gw.url("/x"))
        .header("X-API-Key", &key)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.version(), reqwest::Version::HTTP_11);
    // The upstream is always spoken to in HTTP/1.1.
    assert_eq!(upstream.count(), 2);
    gw.shutdown().await;
}

/// Over HTTP/1.1 a response is framed by its length when it is known and in chunks when it is
/// not, a HEAD's response says the GET's length and carries no body, and every response has a
/// `Date`, the gateway's own included.
#[tokio::test]
async fn http1_responses_are_framed_by_length_or_chunks_and_heads_carry_no_body() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream.url(), &[]).await;
    let key = gw.create_key("k").await;
    let client = gw.h1_client();
    let get = |path: &str| client.get(gw.url(path)).header("X-API-Key", &key);

    let resp = get("/chunked").send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["transfer-encoding"], "chunked");
    assert!(!resp.headers().contains_key("content-length"));
    assert_eq!(resp.text().await.unwrap(), "one two three");

    let resp = get("/x").send().await.unwrap();
    assert!(resp.headers().contains_key("date"));
    let length = resp.headers()["content-length"].clone();
    assert_eq!(
        resp.bytes().await.unwrap().len().to_string(),
        length.to_str().unwrap()
    );
    let resp = client
        .head(gw.url("/x"))
        .header("X-API-Key", &key)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-length"], length);
    assert!(resp.bytes().await.unwrap().is_empty());

    let resp = client.get(gw.url("/x")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert!(resp.headers().contains_key("date"));
    // The connection carried all of them.
    assert_eq!(
        gw.get_with_key_on(&client, "/x", &key).await.status(),
        StatusCode::OK
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn a_client_that_waits_for_100_continue_gets_it_and_its_upload_goes_through() {
    use tokio::io::AsyncWriteExt as _;
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream.url(), &[]).await;
    let key = gw.create_key("k").await;
    let mut tls = gw.raw_tls().await;
    tls.write_all(
        format!(
            "POST /expect HTTP/1.1\r\nHost: localhost\r\nX-API-Key: {key}\r\n\
             Content-Length: 5\r\nExpect: 100-continue\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let interim = read_until(&mut tls, b"\r\n\r\n").await;
    assert!(
        interim.starts_with("HTTP/1.1 100 Continue\r\n"),
        "no 100 Continue before the body was sent: {interim}"
    );
    tls.write_all(b"hello").await.unwrap();
    let response = read_until(&mut tls, b"\"bytes\":5").await;
    assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
    // The upstream saw the body, and no interim response of its own reached the client.
    assert_eq!(upstream.last().body_len, 5);
    assert!(!response.contains("100 Continue"), "{response}");
    gw.shutdown().await;
}

/// An HTTP/2 client may send a whole stream window of body before the gateway has passed any
/// of it on: the configured window, not hyper's 1 MiB, is what the gateway announces, and the
/// connection's window is opened wide enough for it. The body then reaches the upstream whole.
#[tokio::test]
async fn http2_uploads_get_the_configured_flow_control_windows() {
    const STREAM_WINDOW: u32 = 3_000_000;
    let upstream = Upstream::start().await;
    let gw = Gateway::start(
        &upstream.url(),
        &[
            ("KEYGATE_SERVER_H2_STREAM_WINDOW_BYTES", "3000000"),
            ("KEYGATE_SERVER_H2_CONNECTION_WINDOW_BYTES", "5000000"),
        ],
    )
    .await;
    let key = gw.create_key("h2-window").await;
    let tls = gw.raw_tls_alpn(b"h2").await;
    // h2 assigns a stream no more capacity than it would buffer (400 KiB by default).
    let (client, connection) = h2::client::Builder::new()
        .max_send_buffer_size(2 * STREAM_WINDOW as usize)
        .handshake::<_, bytes::Bytes>(tls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let mut client = client.ready().await.unwrap();
    let request = http::Request::post("https://localhost/api/v1/video/upload/")
        .header("x-api-key", &key)
        .body(())
        .unwrap();
    let (response, mut body) = client.send_request(request, false).unwrap();
    body.reserve_capacity(2 * STREAM_WINDOW as usize);
    let granted = tokio::time::timeout(Duration::from_secs(5), async {
        // Capacity arrives as the gateway's SETTINGS and connection WINDOW_UPDATE do; it stops
        // growing at the smaller of the two windows.
        loop {
            let granted = std::future::poll_fn(|cx| body.poll_capacity(cx))
                .await
                .unwrap()
                .unwrap();
            if granted >= STREAM_WINDOW as usize {
                return granted;
            }
        }
    })
    .await
    .expect("the gateway never opened a 3,000,000-byte window");
    assert_eq!(granted, STREAM_WINDOW as usize);
    body.send_data(vec![7u8; granted].into(), true).unwrap();
    let response = response.await.unwrap();
    assert_eq!(response.status(), http::StatusCode::OK);
    let seen = upstream.last();
    assert_eq!(seen.body_len, u64::from(STREAM_WINDOW));
    assert!(seen.body_complete);
    gw.shutdown().await;
}

/// Reads from `stream` until what has come contains `pattern` (5 s at most), and returns it.
async fn read_until(stream: &mut (impl tokio::io::AsyncRead + Unpin), pattern: &[u8]) -> String {
    use tokio::io::AsyncReadExt as _;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let read = async {
        while !buf.windows(pattern.len()).any(|w| w == pattern) {
            let n = stream.read(&mut chunk).await.unwrap();
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    let timed_out = tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .is_err();
    let text = String::from_utf8_lossy(&buf).into_owned();
    assert!(
        !timed_out,
        "no {:?} within 5 s: {text}",
        String::from_utf8_lossy(pattern)
    );
    assert!(
        buf.windows(pattern.len()).any(|w| w == pattern),
        "closed before {:?}: {text}",
        String::from_utf8_lossy(pattern)
    );
    text
}
