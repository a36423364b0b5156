//! What the upstream receives: the credential removed, the key's identity and the forwarding
//! headers set by the gateway (never the client's copies), the request id kept or made, and the
//! identity signed for the backend to verify when a secret is configured.

use reqwest::StatusCode;

use crate::common::{self, Gateway, Upstream};

#[tokio::test]
async fn forwarding_rewrites_credentials_identity_and_forwarding_headers() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream.url(), &[]).await;
    let key = gw.create_key("video-app").await;
    let record = gw.store.find("video-app").await.unwrap();
    let client = gw.client();

    let resp = client
        .post(gw.url("/api/v1/video/process/?q=1"))
        .header("X-API-Key", &key)
        .header("X-Api-Key-Id", "forged-id")
        .header("X-Api-Key-Name", "forged-name")
        .header("X-Forwarded-For", "6.6.6.6")
        .header("X-Forwarded-Proto", "http")
        .header("X-Forwarded-Host", "evil.example")
        .header("Forwarded", "for=6.6.6.6")
        .header("X-Request-Id", "trace-abc-123")
        .header("Authorization", "Basic dXNlcjpwYXNz")
        .body("{\"video_url\":\"https://example.com/v.mp4\"}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["x-request-id"], "trace-abc-123");
    let seen = upstream.last();
    let h = &seen.headers;
    assert_eq!(seen.uri, "/api/v1/video/process/?q=1");
    assert!(!h.contains_key("x-api-key"), "the key was forwarded");
    // The Authorization header did not carry the key, so it is the upstream's business.
    assert_eq!(h["authorization"], "Basic dXNlcjpwYXNz");
    assert_eq!(h.get_all("x-api-key-id").iter().count(), 1);
    assert_eq!(h["x-api-key-id"], record.id.as_str());
    assert_eq!(h["x-api-key-name"], "video-app");
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "https");
    assert_eq!(
        h["x-forwarded-host"],
        format!("localhost:{}", gw.https.port())
    );
    assert!(!h.contains_key("forwarded"));
    assert_eq!(h["x-request-id"], "trace-abc-123");
    assert_eq!(h["host"], upstream.addr.to_string());

    // Bearer: the Authorization header carried the key and is stripped; an id is generated.
    // `Connection: X-Api-Key-Id` cannot remove the gateway's identity header.
    let resp = client
        .get(gw.url("/plain"))
        .header("Authorization", format!("Bearer {key}"))
        .header("X-Request-Id", "bad id with spaces")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let generated = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert_eq!(generated.len(), 32);
    let seen = upstream.last();
    assert!(!seen.headers.contains_key("authorization"));
    assert_eq!(seen.headers["x-request-id"], generated.as_str());

    let h1 = gw.h1_client();
    let resp = h1
        .get(gw.url("/conn"))
        .header("X-API-Key", &key)
        .header("Connection", "X-Api-Key-Id, X-Api-Key-Name, keep-alive")
        .header("Keep-Alive", "timeout=5")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let seen = upstream.last();
    assert_eq!(seen.headers["x-api-key-id"], record.id.as_str());
    assert_eq!(seen.headers["x-api-key-name"], "video-app");
    assert!(!seen.headers.contains_key("keep-alive"));
    gw.shutdown().await;
}

/// What a backend rebuilds from a request it received (`contrib/django` does the same): the
/// documented text, each secret's HMAC-SHA256 over it, and the header's `t=` and `v1=` values.
fn signature_matches(seen: &common::Seen, secret: &[u8], path_decoded: &str) -> bool {
    use hmac::{Hmac, Mac as _};
    let h = |name: &str| {
        seen.headers
            .get(name)
            .map_or("", |v| v.to_str().unwrap())
            .to_owned()
    };
    let header = h("x-keygate-signature");
    let mut parts = header.split(',');
    let t = parts.next().unwrap().strip_prefix("t=").unwrap().to_owned();
    let uri: http::Uri = seen.uri.parse().unwrap();
    let text = [
        "keygate-identity-v1",
        &t,
        &seen.method,
        &h("x-request-id"),
        &h("x-api-key-id"),
        &h("x-api-key-name"),
        &h("x-api-key-owner"),
        uri.query().unwrap_or(""),
        path_decoded,
    ]
    .join("\n");
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret).unwrap();
    mac.update(text.as_bytes());
    let want = common::hex(&mac.finalize().into_bytes());
    parts.any(|p| p.strip_prefix("v1=") == Some(&want))
}

#[tokio::test]
async fn forwarded_identity_is_signed_for_the_backend_to_verify() {
    const NEW: &str = "new-secret-0123456789abcdef0123456789";
    const OLD: &str = "old-secret-0123456789abcdef0123456789";
    let upstream = Upstream::start().await;
    // A base path, as the backend sees it in front of the client's path; two secrets while
    // rotating.
    let gw = Gateway::start(
        &format!("{}/base", upstream.url()),
        &[
            ("KEYGATE_UPSTREAM_IDENTITY_SECRET", &format!("{NEW},{OLD}")),
            ("KEYGATE_AUTH_PUBLIC_PATHS", r#"["/static/"]"#),
        ],
    )
    .await;
    let secret = keygate::key::generate().unwrap();
    let record = keygate::store::KeyRecord {
        owner: Some("42".into()),
        ..keygate::store::KeyRecord::new("frontend", &secret, keygate::store::unix_now(), None)
            .unwrap()
    };
    gw.store.insert(record.clone()).await.unwrap();
    let before = keygate::store::unix_now();
    let resp = gw
        .client()
        .post(gw.url("/api/a%20b/?x=1&y=%41"))
        .header("X-API-Key", secret.expose())
        .header("X-Request-Id", "client-req-1")
        // A second request id is dropped: the backend sees the one that is signed.
        .header("X-Request-Id", "client-req-2")
        // A client's own signature and identity are dropped, never forwarded.
        .header("X-Keygate-Signature", "t=1,v1=00")
        .header("X-Api-Key-Owner", "1")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let seen = upstream.last();
    assert_eq!(seen.uri, "/base/api/a%20b/?x=1&y=%41");
    assert_eq!(
        seen.headers.get_all("x-keygate-signature").iter().count(),
        1
    );
    assert_eq!(seen.headers["x-api-key-owner"], "42");
    assert_eq!(seen.headers["x-api-key-id"], record.id.as_str());
    assert_eq!(
        seen.headers
            .get_all("x-request-id")
            .iter()
            .collect::<Vec<_>>(),
        ["client-req-1"]
    );
    assert_eq!(resp.headers()["x-request-id"], "client-req-1");
    let header = seen.headers["x-keygate-signature"].to_str().unwrap();
    let t: u64 = header
        .split(',')
        .next()
        .and_then(|t| t.strip_prefix("t="))
        .unwrap()
        .parse()
        .unwrap();
    assert!((before as u64..=before as u64 + 5).contains(&t), "{header}");
    assert_eq!(header.matches(",v1=").count(), 2, "{header}");
    // Either secret verifies it; another secret, path or owner does not.
    for s in [NEW, OLD] {
        assert!(
            signature_matches(&seen, s.as_bytes(), "/base/api/a b/"),
            "{header}"
        );
    }
    assert!(!signature_matches(
        &seen,
        b"another-secret-0123456789abcdef01234",
        "/base/api/a b/"
    ));
    assert!(!signature_matches(
        &seen,
        NEW.as_bytes(),
        "/base/api/a%20b/"
    ));
    let mut altered = seen.clone();
    altered
        .headers
        .insert("x-api-key-owner", http::HeaderValue::from_static("1"));
    assert!(!signature_matches(
        &altered,
        NEW.as_bytes(),
        "/base/api/a b/"
    ));

    // A public path is signed too, with empty identity: the backend can tell that it came
    // through keygate, and that no key was presented.
    let resp = gw
        .client()
        .get(gw.url("/static/app.js"))
        .header("X-Api-Key-Id", "key_forged")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let seen = upstream.last();
    assert!(!seen.headers.contains_key("x-api-key-id"));
    assert!(signature_matches(
        &seen,
        OLD.as_bytes(),
        "/base/static/app.js"
    ));
    gw.shutdown().await;
}

#[tokio::test]
async fn without_an_identity_secret_nothing_is_signed() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream.url(), &[]).await;
    let key = gw.create_key("frontend").await;
    let resp = gw
        .client()
        .get(gw.url("/x"))
        .header("X-API-Key", &key)
        .header("X-Keygate-Signature", "t=1,v1=00")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let seen = upstream.last();
    assert!(
        !seen.headers.contains_key("x-keygate-signature"),
        "{seen:?}"
    );
    assert!(!seen.headers.contains_key("x-api-key-owner"));
    gw.shutdown().await;
}
