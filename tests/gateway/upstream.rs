//! The upstream side: its failures answered 502 and 504 while the gateway keeps serving, and its
//! connections kept alive, replaced when the upstream closes them, and kept usable when it
//! answers before reading a body.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use reqwest::StatusCode;

use crate::common::{Gateway, Upstream, eventually_async, metric_value};
use crate::{assert_security_headers, json};

#[tokio::test]
async fn upstream_failures_are_502_and_504_and_the_gateway_keeps_serving() {
    // An upstream that hangs up on every connection. The port stays ours, so no other test's
    // listener can take it (a dropped listener's port is free for a parallel test to bind).
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            drop(stream);
        }
    });
    let gw = Gateway::start(&format!("http://{dead}"), &[]).await;
    let key = gw.create_key("k").await;

    let resp = gw.get_with_key("/x", &key).await;
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    assert_security_headers(&resp);
    assert_eq!(
        json(resp).await["detail"],
        "The upstream service is unavailable."
    );
    gw.shutdown().await;

    let upstream = Upstream::start().await;
    let gw = Gateway::start(
        &upstream.url(),
        &[("KEYGATE_UPSTREAM_RESPONSE_TIMEOUT", "300ms")],
    )
    .await;
    let key = gw.create_key("k").await;

    let started = Instant::now();
    let resp = gw.get_with_key("/slow", &key).await;
    assert_eq!(resp.status(), StatusCode::GATEWAY_TIMEOUT);
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(
        json(resp).await["detail"],
        "The upstream service did not respond in time."
    );
    let resp = gw.get_with_key("/fast", &key).await;
    assert_eq!(resp.status(), StatusCode::OK);
    gw.shutdown().await;
}

#[tokio::test]
async fn upstream_connections_are_kept_alive_across_requests() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream.url(), &[]).await;
    let key = gw.create_key("k").await;
    let client = gw.h1_client();
    for i in 0..40 {
        let req = if i % 2 == 0 {
            client.get(gw.url("/get"))
        } else {
            client.post(gw.url("/post")).body(vec![b'x'; 10_000])
        };
        let resp = req.header("X-API-Key", &key).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let body = json(resp).await;
        assert_eq!(body["bytes"], if i % 2 == 0 { 0 } else { 10_000 });
    }
    let opened = metric_value(
        &gw.metrics().await,
        "keygate_upstream_connections_opened_total",
    );
    // One client connection is served by one worker, and each request after the first reuses
    // that worker's upstream connection.
    assert_eq!(
        opened, 1.0,
        "40 sequential requests opened {opened} connections"
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn idle_upstream_connections_closed_by_the_upstream_are_replaced() {
    // An upstream that keeps a connection open for 50 ms after each answer, then hangs up, as
    // servers with a short keep-alive timeout do; it never says `Connection: close`. Counts the
    // connections it has answered and closed.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hung_up = Arc::new(AtomicUsize::new(0));
    let closes = Arc::clone(&hung_up);
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        while let Ok((mut stream, _)) = listener.accept().await {
            let closes = Arc::clone(&closes);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await;
                // The upstream's keep-alive timeout: the behaviour under test.
                tokio::time::sleep(Duration::from_millis(50)).await;
                drop(stream);
                closes.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    let gw = Gateway::start(&format!("http://{addr}"), &[]).await;
    let key = gw.create_key("k").await;
    let client = gw.h1_client();
    for answered in 1..=3 {
        let resp = gw.get_with_key_on(&client, "/x", &key).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.text().await.unwrap(), "ok");
        // The next request goes out once the upstream has closed the connection this one used.
        let what = "the upstream to close the idle connection";
        let closed = async || hung_up.load(Ordering::SeqCst) == answered;
        eventually_async(Duration::from_secs(5), what, closed).await;
    }
    let opened = metric_value(
        &gw.metrics().await,
        "keygate_upstream_connections_opened_total",
    );
    assert_eq!(opened, 3.0, "each request needed a new connection");
    gw.shutdown().await;
}

#[tokio::test]
async fn an_upstream_that_answers_before_reading_the_body_still_gets_it_and_the_client_keeps_its_connection()
 {
    // Answers PAUSE ms after it has a request's head, then reads and discards the body (as
    // nginx's `return` does) before the next request on the connection; reports each body's
    // length. The uploads grow from 2 to 5.75 MiB, so that in some of them the answer comes
    // while the end of the body waits in the gateway's write buffer, the socket being full; the
    // upstream connection must still take the next request (without the wake in
    // src/upstream/pool.rs's `Io`, about half the runs hang there).
    const ROUNDS: usize = 16;
    const PAUSE: u64 = 10;
    fn body_length(round: usize) -> usize {
        (2 << 20) + round * (256 << 10)
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, mut bodies) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        while let Ok((mut stream, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 65536];
                loop {
                    let end = loop {
                        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break end + 4;
                        }
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
                    let length: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length: "))
                        .map_or(0, |v| v.trim().parse().unwrap());
                    buf.drain(..end);
                    tokio::time::sleep(Duration::from_millis(PAUSE)).await;
                    if stream
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                        .await
                        .is_err()
                    {
                        return;
                    }
                    while buf.len() < length {
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    buf.drain(..length);
                    let _ = tx.send(length);
                }
            });
        }
    });
    let gw = Gateway::start(&format!("http://{addr}"), &[]).await;
    let key = gw.create_key("k").await;
    // One client connection carries all three uploads, written whole, one after the other; the
    // three responses must come back on it. Had the gateway left a body unread, it would have
    // to close the connection after that response.
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let tls = gw.raw_tls().await;
    let (mut reader, mut writer) = tokio::io::split(tls);
    let uploads = tokio::spawn(async move {
        for round in 0..ROUNDS {
            let length = body_length(round);
            let head = format!(
                "POST /upload HTTP/1.1\r\nHost: localhost\r\nX-API-Key: {key}\r\nContent-Length: {length}\r\n\r\n"
            );
            writer.write_all(head.as_bytes()).await?;
            writer.write_all(&vec![b'x'; length]).await?;
        }
        writer.flush().await
    });
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 65536];
    for round in 0..ROUNDS {
        let response = async {
            loop {
                if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
                    let length: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length: "))
                        .map_or(0, |v| v.trim().parse().unwrap());
                    if buf.len() >= end + 4 + length {
                        let body = buf[end + 4..end + 4 + length].to_vec();
                        buf.drain(..end + 4 + length);
                        return (head, body);
                    }
                }
                let n = reader.read(&mut chunk).await.unwrap();
                assert!(
                    n > 0,
                    "round {round}: the gateway closed the client's connection"
                );
                buf.extend_from_slice(&chunk[..n]);
            }
        };
        let (head, body) = tokio::time::timeout(Duration::from_secs(20), response)
            .await
            .unwrap_or_else(|_| panic!("round {round}: no response"));
        assert!(head.starts_with("http/1.1 200"), "round {round}: {head}");
        assert_eq!(body, b"ok");
        let got = tokio::time::timeout(Duration::from_secs(10), bodies.recv()).await;
        assert_eq!(
            got.unwrap(),
            Some(body_length(round)),
            "round {round}: the upstream got the whole body"
        );
    }
    uploads.await.unwrap().unwrap();
    gw.shutdown().await;
}
