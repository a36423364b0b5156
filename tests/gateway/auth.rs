//! Authentication and its rejections: every way of presenting a key, the 401s for a missing,
//! malformed, unknown, repeated, inactive or expired key (with the old API's wording and a
//! challenge), and that no rejected request reaches the upstream.

use std::time::Duration;

use reqwest::StatusCode;

use crate::common::{Gateway, Upstream, wait_for_async};
use crate::{assert_security_headers, json};

#[tokio::test]
async fn every_header_form_is_authenticated_and_rejections_never_reach_upstream() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream.url(), &[]).await;
    let key = gw.create_key("frontend").await;
    let client = gw.client();
    let url = gw.url("/api/v1/video/process/");

    // Missing: 401, the old API's wording, a challenge.
    let resp = client.post(&url).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        resp.headers()["www-authenticate"],
        "Bearer realm=\"keygate\""
    );
    assert_security_headers(&resp);
    assert_eq!(
        json(resp).await["detail"],
        "Authentication credentials were not provided."
    );

    // Malformed (fails the checksum) and well-formed but unknown: "Invalid API key".
    let mut mistyped = key.clone().into_bytes();
    mistyped[10] = if mistyped[10] == b'a' { b'b' } else { b'a' };
    let mistyped = String::from_utf8(mistyped).unwrap();
    let unknown = keygate::key::generate().unwrap().expose().to_owned();
    for bad in [mistyped.as_str(), unknown.as_str(), "sk_short", "not-a-key"] {
        let resp = client
            .post(&url)
            .header("X-API-Key", bad)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{bad}");
        assert!(
            resp.headers()["www-authenticate"]
                .to_str()
                .unwrap()
                .contains("invalid_token"),
            "{bad}"
        );
        assert_eq!(json(resp).await["detail"], "Invalid API key");
    }
    // Repeated key headers are refused, not guessed at.
    let resp = client
        .post(&url)
        .header("X-API-Key", &key)
        .header("X-API-Key", &unknown)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    // Keys in the query string are not credentials.
    let resp = client
        .post(format!("{url}?api_key={key}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        upstream.count(),
        0,
        "a rejected request reached the upstream"
    );

    // Valid: X-API-Key, Bearer, bearer in lower case.
    for (name, value) in [
        ("X-API-Key", key.clone()),
        ("Authorization", format!("Bearer {key}")),
        ("Authorization", format!("bearer {key}")),
    ] {
        let resp = client
            .post(&url)
            .header(name, &value)
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{name}");
        assert_security_headers(&resp);
    }
    assert_eq!(upstream.count(), 3);

    // Inactive: 401 "API key is inactive".
    gw.store.set_active("frontend", false).await.unwrap();
    let refused = wait_for_async(Duration::from_secs(1), "the revocation", async || {
        let resp = client
            .post(&url)
            .header("X-API-Key", &key)
            .send()
            .await
            .unwrap();
        match resp.status() {
            StatusCode::UNAUTHORIZED => Ok(resp),
            status => Err(status),
        }
    })
    .await;
    assert_eq!(json(refused).await["detail"], "API key is inactive");
    let forwarded = upstream.count();
    let resp = client
        .post(&url)
        .header("X-API-Key", &key)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        upstream.count(),
        forwarded,
        "an inactive key's request was forwarded"
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn expired_keys_are_refused_with_their_own_reason() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream.url(), &[]).await;
    let secret = keygate::key::generate().unwrap();
    let now = keygate::store::unix_now();
    gw.store
        .insert(keygate::store::KeyRecord {
            created_at: now - 100,
            ..keygate::store::KeyRecord::new("expired", &secret, now - 100, Some(now - 1)).unwrap()
        })
        .await
        .unwrap();
    let resp = gw.get_with_key("/x", secret.expose()).await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert!(
        resp.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .contains("invalid_token")
    );
    assert_eq!(json(resp).await["detail"], "API key has expired");
    assert_eq!(upstream.count(), 0);
    // Expired keys do not count as active in the health report.
    let health = json(
        gw.client()
            .get(gw.url("/health/api-auth/"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(health["active_api_keys"], 0);
    gw.shutdown().await;
}
