//! TLS: 1.2 and 1.3 handshakes, sessions resumed, non-TLS clients counted and dropped, and
//! certificates reloaded when their files change (a bad pair refused, traffic uninterrupted).

use std::time::Duration;

use reqwest::StatusCode;

use crate::common::{Gateway, Upstream, eventually_async, wait_for_async};

/// TLS 1.2 and 1.3 are served (anything older is not even implemented by rustls), with HSTS.
#[tokio::test]
async fn tls12_and_tls13_handshakes_succeed() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream.url(), &[]).await;
    for (version, expected) in [
        (&rustls::version::TLS12, rustls::ProtocolVersion::TLSv1_2),
        (&rustls::version::TLS13, rustls::ProtocolVersion::TLSv1_3),
    ] {
        let config = client_config(&gw, version, rustls::client::Resumption::default());
        let connector = tokio_rustls::TlsConnector::from(config);
        let tcp = tokio::net::TcpStream::connect(gw.https).await.unwrap();
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        let tls = connector.connect(name, tcp).await.unwrap();
        assert_eq!(tls.get_ref().1.protocol_version(), Some(expected));
    }
    // A client that is not speaking TLS at all is counted and dropped.
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut tcp = tokio::net::TcpStream::connect(gw.https).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = tcp.read_to_end(&mut buf).await;
    assert!(!String::from_utf8_lossy(&buf).contains("200"));
    // The worker counts the failure just after the socket closes: allow it a moment.
    wait_for_async(
        Duration::from_secs(1),
        "the failed handshake's count",
        async || {
            let metrics = gw.metrics().await;
            let counted = metrics
                .lines()
                .any(|l| l == "keygate_tls_handshake_failures_total 1");
            if counted { Ok(()) } else { Err(metrics) }
        },
    )
    .await;
    gw.shutdown().await;
}

/// A client trusting `gw`'s certificate, speaking only `version`, resuming as `resumption` says.
fn client_config(
    gw: &Gateway,
    version: &'static rustls::SupportedProtocolVersion,
    resumption: rustls::client::Resumption,
) -> std::sync::Arc<rustls::ClientConfig> {
    let mut config = gw.tls_client_config(&[version]);
    config.resumption = resumption;
    std::sync::Arc::new(config)
}

/// One request on a new TLS connection with `config`, read to the end: how the handshake went.
async fn handshake_kind(
    gw: &Gateway,
    config: &std::sync::Arc<rustls::ClientConfig>,
) -> rustls::HandshakeKind {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::clone(config));
    let tcp = tokio::net::TcpStream::connect(gw.https).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, tcp).await.unwrap();
    tls.write_all(
        b"GET /health/api-auth/ HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    // Reading the answer reads the session tickets sent before it, so the client keeps them.
    let mut answer = Vec::new();
    let _ = tls.read_to_end(&mut answer).await;
    assert!(
        answer.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    tls.get_ref().1.handshake_kind().unwrap()
}

/// A returning client resumes its TLS session however many others connected in between: 600
/// full handshakes by other clients (more than a server-side cache of a few hundred sessions
/// holds) do not cost it its session, over TLS 1.3 and 1.2.
#[tokio::test]
async fn a_session_is_resumed_after_many_other_handshakes() {
    use rustls::HandshakeKind::{Full, Resumed};
    use rustls::client::Resumption;
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream.url(), &[]).await;
    for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
        let returning = client_config(&gw, version, Resumption::in_memory_sessions(8));
        let others = client_config(&gw, version, Resumption::disabled());
        assert_eq!(handshake_kind(&gw, &returning).await, Full);
        assert_eq!(
            handshake_kind(&gw, &returning).await,
            Resumed,
            "{version:?}, at once"
        );
        for _ in 0..600 {
            assert_eq!(handshake_kind(&gw, &others).await, Full);
        }
        assert_eq!(
            handshake_kind(&gw, &returning).await,
            Resumed,
            "{version:?}, after 600 others"
        );
    }
    gw.shutdown().await;
}

/// Which certificate a fresh connection is served (DER of the leaf).
async fn served_cert(gw: &Gateway, roots: &[Vec<u8>]) -> Result<Vec<u8>, reqwest::Error> {
    let mut builder = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_info(true)
        .pool_max_idle_per_host(0)
        .resolve("localhost", gw.https);
    for pem in roots {
        builder = builder.add_root_certificate(reqwest::Certificate::from_pem(pem).unwrap());
    }
    let resp = builder
        .build()
        .unwrap()
        .get(gw.url("/health/api-auth/"))
        .send()
        .await?;
    let info = resp.extensions().get::<reqwest::tls::TlsInfo>().unwrap();
    Ok(info.peer_certificate().unwrap().to_vec())
}

#[tokio::test]
async fn certificates_are_reloaded_when_their_files_change_and_bad_ones_are_refused() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream.url(), &[]).await;
    let key = gw.create_key("steady").await;
    let dir = gw.dir.path();
    let old_pem = std::fs::read(dir.join("cert.pem")).unwrap();
    let next = dir.join("next");
    keygate::tls::write_dev_cert(
        &next.join("cert.pem"),
        &next.join("key.pem"),
        &["localhost".into()],
    )
    .unwrap();
    let new_pem = std::fs::read(next.join("cert.pem")).unwrap();
    let roots = [old_pem.clone(), new_pem.clone()];
    let before = served_cert(&gw, &roots).await.unwrap();
    let metric = |text: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix("keygate_tls_certificate_expiry_timestamp_seconds "))
            .map(|v| v.parse::<f64>().unwrap())
    };
    let metrics = gw.metrics().await;
    assert!(metric(&metrics).unwrap() > keygate::store::unix_now() as f64);

    // Requests keep flowing on an established connection while the files change.
    let client = gw.client();
    let traffic = {
        let client = client.clone();
        let url = gw.url("/x");
        let key = key.clone();
        tokio::spawn(async move {
            let mut ok = 0;
            for _ in 0..100 {
                let status = client
                    .get(&url)
                    .header("X-API-Key", &key)
                    .send()
                    .await
                    .unwrap()
                    .status();
                assert_eq!(status, StatusCode::OK);
                ok += 1;
                // Paced on purpose: 100 requests spread over a second or more overlap both
                // file changes below.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            ok
        })
    };

    // A broken certificate file: refused, the old certificate keeps serving.
    std::fs::write(
        dir.join("cert.pem"),
        b"-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    // A fixed wait: four watch intervals (100 ms) for the watcher to read the broken file. A
    // refused reload changes nothing a client can see, and that is what is checked.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(served_cert(&gw, &roots).await.unwrap(), before);

    // A good pair: new connections get it.
    std::fs::copy(next.join("key.pem"), dir.join("key.pem")).unwrap();
    std::fs::copy(next.join("cert.pem"), dir.join("cert.pem")).unwrap();
    eventually_async(Duration::from_secs(3), "the new certificate", async || {
        served_cert(&gw, &roots).await.unwrap() != before
    })
    .await;
    // A client that only trusts the old certificate now fails: the new one is really served.
    assert!(served_cert(&gw, &[old_pem]).await.is_err());
    assert_eq!(
        traffic.await.unwrap(),
        100,
        "a request failed during the reload"
    );
    gw.shutdown().await;
}
