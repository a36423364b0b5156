//! Shutdown: requests in flight finish and usage is flushed; idle keep-alive connections do
//! not hold it up.

use std::time::{Duration, Instant};

use reqwest::StatusCode;

use crate::common::{self, Gateway, Upstream, eventually_async};
use crate::json;

#[tokio::test]
async fn shutdown_lets_in_flight_requests_finish_and_flushes_usage() {
    let upstream = Upstream::start().await;
    let mut gw = Gateway::start(
        &upstream.url(),
        &[("KEYGATE_STORE_USAGE_FLUSH_INTERVAL", "1h")],
    )
    .await;
    let key = gw.create_key("inflight").await;
    let client = gw.client();
    let in_flight = {
        let client = client.clone();
        let url = gw.url("/hold");
        let key = key.clone();
        tokio::spawn(async move { client.get(url).header("X-API-Key", key).send().await })
    };
    // Wait until the upstream holds the request, then shut down.
    let what = "the upstream to hold the request";
    eventually_async(Duration::from_secs(5), what, async || upstream.count() > 0).await;
    let done = gw.begin_shutdown();
    let resp = in_flight.await.unwrap().unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(json(resp).await["path"], "/hold");
    done.await.unwrap().unwrap();
    // The listener is closed: new connections fail.
    assert!(
        common::tls_client(
            &std::fs::read(gw.dir.path().join("cert.pem")).unwrap(),
            gw.https
        )
        .get(gw.url("/x"))
        .send()
        .await
        .is_err()
    );
    // The final flush wrote last_used although the flush interval never elapsed.
    let r = gw.store.find("inflight").await.unwrap();
    assert_eq!(r.use_count, 1);
    assert!(r.last_used.is_some());
}

/// An idle keep-alive connection does not hold shutdown up: it hears the stop signal and closes at
/// once, long before the grace period or its idle timeout would end it.
#[tokio::test]
async fn shutdown_closes_idle_keep_alive_connections_at_once() {
    let upstream = Upstream::start().await;
    let mut gw = Gateway::start(
        &upstream.url(),
        &[
            ("KEYGATE_SERVER_SHUTDOWN_GRACE", "60s"),
            ("KEYGATE_SERVER_HEADER_READ_TIMEOUT", "60s"),
        ],
    )
    .await;
    let key = gw.create_key("idle").await;
    let client = gw.client();
    // Several requests on the client's pooled connections, which then sit idle.
    for _ in 0..3 {
        let resp = gw.get_with_key_on(&client, "/x", &key).await;
        assert_eq!(resp.status(), StatusCode::OK);
    }
    let started = Instant::now();
    let done = gw.begin_shutdown();
    tokio::time::timeout(Duration::from_secs(10), done)
        .await
        .expect("shutdown waited for an idle connection")
        .unwrap()
        .unwrap();
    eprintln!(
        "shutdown with idle connections took {:?}",
        started.elapsed()
    );
}
