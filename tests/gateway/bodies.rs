//! Request bodies: limits by path prefix, refused before anything is forwarded, and large
//! bodies streamed intact both ways.

use reqwest::StatusCode;

use crate::common::{self, Gateway, Upstream};
use crate::json;

#[tokio::test]
async fn body_limits_apply_per_path_prefix() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(
        &upstream.url(),
        &[(
            "KEYGATE_SERVER_MAX_BODY_BYTES_BY_PREFIX",
            r#"{ "/api/" = 10, "/api/v1/video/" = 0 }"#,
        )],
    )
    .await;
    let key = gw.create_key("uploader").await;
    let client = gw.client();
    let post = |path: &str, len: usize| {
        client
            .post(gw.url(path))
            .header("X-API-Key", &key)
            .body(vec![b'x'; len])
            .send()
    };
    // Over the /api/ limit: refused before anything is forwarded.
    assert_eq!(post("/api/jobs/", 11).await.unwrap().status(), 413);
    assert_eq!(upstream.count(), 0);
    assert_eq!(post("/api/jobs/", 10).await.unwrap().status(), 200);
    // The longer prefix wins: uploads are unlimited; other paths have the global (none).
    assert_eq!(
        post("/api/v1/video/process/", 100_000)
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(post("/elsewhere", 100_000).await.unwrap().status(), 200);
    assert_eq!(upstream.count(), 3);
    gw.shutdown().await;
}

#[tokio::test]
async fn large_bodies_stream_intact_both_ways() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream.url(), &[]).await;
    let key = gw.create_key("uploader").await;
    // 64 MiB in 1 MiB chunks of varying content, streamed (never held whole by the client).
    const CHUNKS: usize = 64;
    let chunk = |i: usize| bytes::Bytes::from(vec![(i * 7 % 251) as u8; 1 << 20]);
    let mut expected = sha2::Sha256::default();
    for i in 0..CHUNKS {
        sha2::Digest::update(&mut expected, chunk(i));
    }
    let expected = common::hex(&sha2::Digest::finalize(expected));
    let stream = futures_stream(CHUNKS, chunk);
    let resp = gw
        .client()
        .post(gw.url("/upload"))
        .header("X-API-Key", &key)
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body = json(resp).await;
    assert_eq!(body["bytes"], (CHUNKS << 20) as u64);
    assert_eq!(body["sha256"], expected);
    let seen = upstream.last();
    assert!(seen.body_complete);
    assert_eq!(seen.body_sha256, expected);
    gw.shutdown().await;
}

fn futures_stream(
    n: usize,
    chunk: impl Fn(usize) -> bytes::Bytes + Send + Sync + 'static,
) -> impl futures_util::Stream<Item = Result<bytes::Bytes, std::io::Error>> + Send + 'static {
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    tokio::spawn(async move {
        for i in 0..n {
            if tx.send(Ok(chunk(i))).await.is_err() {
                return;
            }
        }
    });
    tokio_stream_from(rx)
}

fn tokio_stream_from(
    mut rx: tokio::sync::mpsc::Receiver<Result<bytes::Bytes, std::io::Error>>,
) -> impl futures_util::Stream<Item = Result<bytes::Bytes, std::io::Error>> + Send + 'static {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}
