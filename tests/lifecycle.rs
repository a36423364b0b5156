//! Key lifecycle and per-key policy through the real CLI and the real gateway: expiry, rotation
//! with a grace period, scopes, IP allowlists, per-key rates, export/import and the Django
//! migration.

mod common;

use std::time::Duration;

use common::{Gateway, Upstream, keygate, wait_for_async};
use reqwest::StatusCode;
use serde_json::Value;

/// Runs `keygate keys ...` on the gateway's store; returns stdout, panics with stderr on failure.
fn cli(gw: &Gateway, args: &[&str]) -> String {
    common::keys_cli(&gw.config_path, &[], args)
}

/// Like `cli`, for a command expected to fail; returns stderr.
fn cli_err(gw: &Gateway, args: &[&str]) -> String {
    let out = keygate()
        .arg("--config")
        .arg(&gw.config_path)
        .arg("keys")
        .args(args)
        .output()
        .unwrap();
    assert!(!out.status.success(), "{args:?} succeeded");
    String::from_utf8(out.stderr).unwrap()
}

async fn request(
    gw: &Gateway,
    method: reqwest::Method,
    path: &str,
    key: &str,
    xff: Option<&str>,
) -> reqwest::Response {
    let mut req = gw
        .client()
        .request(method, gw.url(path))
        .header("X-API-Key", key);
    if let Some(ip) = xff {
        req = req.header("X-Forwarded-For", ip);
    }
    req.send().await.unwrap()
}

async fn detail(resp: reqwest::Response) -> String {
    let v: Value = resp.json().await.unwrap();
    v["detail"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn expiry_from_the_cli() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream.url(), &[]).await;
    let soon = cli(&gw, &["create", "--name", "soon", "--expires-in", "2s"]);
    let dated = cli(
        &gw,
        &[
            "create",
            "--name",
            "dated",
            "--expires-at",
            "2099-01-01T00:00:00Z",
        ],
    );
    cli(&gw, &["create", "--name", "month", "--expires-in", "10d"]);
    assert_eq!(gw.get_with_key("/x", &soon).await.status(), StatusCode::OK);
    assert_eq!(gw.get_with_key("/x", &dated).await.status(), StatusCode::OK);
    let usage = cli(&gw, &["usage"]);
    assert!(
        usage.contains("WARNING: API Key 'month' expires in 9 days")
            || usage.contains("WARNING: API Key 'month' expires in 10 days"),
        "{usage}"
    );
    assert!(!usage.contains("API Key 'dated' expires"), "{usage}");
    assert!(
        cli_err(
            &gw,
            &[
                "create",
                "--name",
                "past",
                "--expires-at",
                "2001-01-01T00:00:00Z"
            ]
        )
        .contains("in the past")
    );
    // A fixed wait: the key's two-second lifetime must run out.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let resp = gw.get_with_key("/x", &soon).await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(detail(resp).await, "API key has expired");
    let list: Value = serde_json::from_str(&cli(&gw, &["list", "--json"])).unwrap();
    let soon_row = list
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "soon")
        .unwrap();
    assert_eq!(soon_row["status"], "expired");
    gw.shutdown().await;
}

#[tokio::test]
async fn rotation_keeps_the_old_key_for_the_grace_period_and_shows_its_use() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream.url(), &[]).await;
    let old = cli(&gw, &["create", "--name", "frontend", "--allow", "/api/"]);
    let old_id = serde_json::from_str::<Value>(&cli(&gw, &["show", "frontend", "--json"])).unwrap()
        ["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        request(&gw, reqwest::Method::GET, "/api/x", &old, None)
            .await
            .status(),
        StatusCode::OK
    );

    let new = cli(&gw, &["rotate", "frontend", "--grace", "3s"]);
    assert_ne!(new, old);
    keygate::key::check_format(new.as_bytes()).unwrap();
    gw.wait_for_status(&new, StatusCode::FORBIDDEN, Duration::from_secs(3))
        .await; // the policy came along: /x is out of scope
    assert_eq!(
        request(&gw, reqwest::Method::GET, "/api/x", &new, None)
            .await
            .status(),
        StatusCode::OK
    );
    // The old key still works; once the change feed (50 ms polls in tests) has brought its new
    // state to the cache, a use of it counts as a rotated key's.
    let what = "a use counted as the rotated key's";
    wait_for_async(Duration::from_secs(3), what, async || {
        let old_use = request(&gw, reqwest::Method::GET, "/api/old", &old, None).await;
        assert_eq!(old_use.status(), StatusCode::OK);
        let metrics = gw.metrics().await;
        if metrics
            .lines()
            .any(|l| l == "keygate_rotated_key_uses_total 1")
        {
            Ok(())
        } else {
            Err(metrics)
        }
    })
    .await;
    // The upstream sees the same key name for both.
    assert_eq!(upstream.last().headers["x-api-key-name"], "frontend");
    assert_eq!(upstream.last().headers["x-api-key-id"], old_id.as_str());
    // The name now means the new key; the old one is reachable by id, and shows its last use.
    let shown: Value = serde_json::from_str(&cli(&gw, &["show", "frontend", "--json"])).unwrap();
    assert_ne!(shown["id"], old_id.as_str());
    wait_for_async(
        Duration::from_secs(3),
        "the old key's last use",
        async || {
            let usage = cli(&gw, &["usage"]);
            if usage.contains(&format!("(old key {old_id}, rotated to"))
                && !usage.contains("last used never")
            {
                Ok(())
            } else {
                Err(usage)
            }
        },
    )
    .await;
    assert!(cli_err(&gw, &["rotate", &old_id]).contains("already rotated"));

    // After the grace period the old key is refused, with its own reason. A fixed wait: the
    // three-second grace period must run out.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let resp = request(&gw, reqwest::Method::GET, "/api/old", &old, None).await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        detail(resp).await,
        "API key has been rotated; use its replacement"
    );
    assert_eq!(
        request(&gw, reqwest::Method::GET, "/api/x", &new, None)
            .await
            .status(),
        StatusCode::OK
    );

    // --grace 0s: an immediate replacement (compromised key).
    let newer = cli(&gw, &["rotate", "frontend", "--grace", "0s"]);
    gw.wait_for_status(&new, StatusCode::UNAUTHORIZED, Duration::from_secs(3))
        .await;
    assert_eq!(
        request(&gw, reqwest::Method::GET, "/api/x", &newer, None)
            .await
            .status(),
        StatusCode::OK
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn scopes_refuse_with_403_and_forward_nothing() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream.url(), &[]).await;
    let key = cli(
        &gw,
        &[
            "create",
            "--name",
            "video",
            "--allow",
            "POST:/api/v1/video/",
            "--allow",
            "GET:/status",
        ],
    );
    let post = reqwest::Method::POST;
    let get = reqwest::Method::GET;
    assert_eq!(
        request(&gw, post.clone(), "/api/v1/video/process/", &key, None)
            .await
            .status(),
        StatusCode::OK
    );
    assert_eq!(
        request(&gw, get.clone(), "/status", &key, None)
            .await
            .status(),
        StatusCode::OK
    );
    let forwarded = upstream.count();
    for (method, path) in [
        (get.clone(), "/api/v1/video/process/"),
        (post.clone(), "/api/v1/other/"),
        (post, "/status"),
    ] {
        let resp = request(&gw, method.clone(), path, &key, None).await;
        assert_eq!(resp.status(), StatusCode::FORBIDDEN, "{method} {path}");
        assert_eq!(
            detail(resp).await,
            "You do not have permission to perform this action."
        );
    }
    assert_eq!(
        upstream.count(),
        forwarded,
        "an out-of-scope request was forwarded"
    );
    assert!(
        cli_err(&gw, &["create", "--name", "bad", "--allow", "api/"]).contains("invalid policy")
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn ip_allowlists_use_the_real_client_address() {
    let upstream = Upstream::start().await;
    // Behind a trusted proxy (the test client plays it): the client is the X-Forwarded-For hop.
    let gw = Gateway::start(
        &upstream.url(),
        &[("KEYGATE_SERVER_TRUSTED_PROXIES", "[\"127.0.0.1\"]")],
    )
    .await;
    let key = cli(
        &gw,
        &[
            "create",
            "--name",
            "office",
            "--allow-ip",
            "203.0.113.0/24",
            "--allow-ip",
            "2001:db8::/32",
        ],
    );
    let get = reqwest::Method::GET;
    for (xff, want) in [
        ("203.0.113.5", StatusCode::OK),
        ("2001:db8::1", StatusCode::OK),
        ("198.51.100.1", StatusCode::FORBIDDEN),
        ("2001:db9::1", StatusCode::FORBIDDEN),
        // The rightmost untrusted hop counts, not a client-supplied leftmost one.
        ("203.0.113.5, 198.51.100.1", StatusCode::FORBIDDEN),
    ] {
        assert_eq!(
            request(&gw, get.clone(), "/x", &key, Some(xff))
                .await
                .status(),
            want,
            "{xff}"
        );
    }
    // Straight from loopback (no X-Forwarded-For): not in the list.
    assert_eq!(
        gw.get_with_key("/x", &key).await.status(),
        StatusCode::FORBIDDEN
    );
    gw.shutdown().await;

    // Without trusted proxies, a forged X-Forwarded-For changes nothing.
    let gw = Gateway::start(&upstream.url(), &[]).await;
    let key = cli(
        &gw,
        &["create", "--name", "lan", "--allow-ip", "10.0.0.0/8"],
    );
    assert_eq!(
        request(&gw, get.clone(), "/x", &key, Some("10.1.2.3"))
            .await
            .status(),
        StatusCode::FORBIDDEN
    );
    let local = cli(
        &gw,
        &["create", "--name", "local", "--allow-ip", "127.0.0.1"],
    );
    assert_eq!(
        request(&gw, get, "/x", &local, Some("10.1.2.3"))
            .await
            .status(),
        StatusCode::OK
    );
    assert_eq!(upstream.last().headers["x-forwarded-for"], "127.0.0.1");
    gw.shutdown().await;
}

#[tokio::test]
async fn a_key_with_its_own_rate_is_limited_at_that_rate() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(
        &upstream.url(),
        &[("KEYGATE_RATE_LIMIT_PER_KEY", "100/min")],
    )
    .await;
    let slow = cli(&gw, &["create", "--name", "slow", "--rate", "3/min"]);
    let normal = cli(&gw, &["create", "--name", "normal"]);
    for _ in 0..3 {
        assert_eq!(gw.get_with_key("/x", &slow).await.status(), StatusCode::OK);
    }
    let resp = gw.get_with_key("/x", &slow).await;
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(resp.headers()["ratelimit-policy"], "\"key\";q=3;w=60");
    let resp = gw.get_with_key("/x", &normal).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["ratelimit-policy"], "\"key\";q=100;w=60");
    assert!(
        cli_err(&gw, &["create", "--name", "bad", "--rate", "lots"]).contains("invalid policy")
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn export_then_import_restores_every_record_exactly() {
    let upstream = Upstream::start().await;
    let a = Gateway::start(&upstream.url(), &[]).await;
    let key = cli(
        &a,
        &[
            "create",
            "--name",
            "kept",
            "--allow",
            "/api/",
            "--allow-ip",
            "127.0.0.0/8",
            "--rate",
            "50/min",
        ],
    );
    cli(&a, &["create", "--name", "revoked"]);
    cli(&a, &["revoke", "revoked"]);
    cli(&a, &["rotate", "kept", "--grace", "1h"]);
    let file = a.dir.path().join("backup.json");
    cli(&a, &["export", "--out", file.to_str().unwrap()]);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(
            std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(!text.contains(&key[3..]), "an export contains a key");

    let b = Gateway::start(&upstream.url(), &[]).await;
    cli(&b, &["import", file.to_str().unwrap()]);
    let records = |gw: &Gateway| {
        let export: Value = serde_json::from_str(&cli(gw, &["export"])).unwrap();
        export["keys"].clone()
    };
    assert_eq!(records(&a), records(&b));
    // Importing twice changes nothing.
    let out = keygate()
        .arg("--config")
        .arg(&b.config_path)
        .args(["keys", "import"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("imported 0 API keys"),
        "{out:?}"
    );
    assert_eq!(records(&a), records(&b));
    // The restored old key works on the new gateway, inside its grace period.
    assert_eq!(
        request(&b, reqwest::Method::GET, "/api/x", &key, None)
            .await
            .status(),
        StatusCode::OK
    );
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test]
async fn a_django_dump_is_imported_and_its_keys_work_at_once() {
    let upstream = Upstream::start().await;
    // Until the gateway learns of the import, each poll below is a failed attempt: on a busy
    // machine enough of them to lock the test's address out at the default 20/min.
    let gw = Gateway::start(
        &upstream.url(),
        &[("KEYGATE_RATE_LIMIT_FAILURES_PER_IP", "6000/min")],
    )
    .await;
    let legacy = "sk_3f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c"; // the old create_api_key format, no checksum
    let dump = serde_json::json!([
        {"model": "users.apikey", "pk": 1, "fields": {"name": "Frontend production", "key": legacy,
          "is_active": true, "created_at": "2024-03-01T09:00:00.123456Z", "last_used": "2024-05-01T10:00:00Z"}},
        {"model": "users.apikey", "pk": 2, "fields": {"name": "retired", "key": "sk_0000000000000000retired",
          "is_active": false, "created_at": "2023-01-01T00:00:00Z", "last_used": null}}
    ]);
    let file = gw.dir.path().join("apikeys.json");
    std::fs::write(&file, dump.to_string()).unwrap();

    // Before the import the old key is refused by its format alone.
    assert_eq!(
        gw.get_with_key("/x", legacy).await.status(),
        StatusCode::UNAUTHORIZED
    );
    cli(&gw, &["import", file.to_str().unwrap()]);
    gw.wait_for_status(legacy, StatusCode::OK, Duration::from_secs(3))
        .await;
    assert_eq!(
        upstream.last().headers["x-api-key-name"],
        "Frontend production"
    );
    let resp = gw.get_with_key("/x", "sk_0000000000000000retired").await;
    assert_eq!(detail(resp).await, "API key is inactive");
    let shown: Value =
        serde_json::from_str(&cli(&gw, &["show", "Frontend production", "--json"])).unwrap();
    assert_eq!(shown["legacy"], true);
    assert_eq!(shown["created_at"], "2024-03-01T09:00:00Z");
    assert!(
        !std::fs::read(gw.dir.path().join("keygate.db"))
            .unwrap()
            .windows(legacy.len())
            .any(|w| w == legacy.as_bytes())
    );

    // Twice: no duplicates.
    cli(&gw, &["import", file.to_str().unwrap()]);
    let list: Value = serde_json::from_str(&cli(&gw, &["list", "--json"])).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 2);

    // A malformed file is refused whole, naming the record; nothing is written.
    let bad = serde_json::json!([
        {"model": "users.apikey", "pk": 3, "fields": {"name": "fine", "key": "sk_fine_key_1234567890"}},
        {"model": "users.apikey", "pk": 4, "fields": {"name": "broken", "key": "sk_x", "created_at": "last tuesday"}}
    ]);
    std::fs::write(&file, bad.to_string()).unwrap();
    let err = cli_err(&gw, &["import", file.to_str().unwrap()]);
    assert!(
        err.contains("record 2") && err.contains("pk 4") && err.contains("created_at"),
        "{err}"
    );
    assert!(err.contains("nothing imported"), "{err}");
    let list: Value = serde_json::from_str(&cli(&gw, &["list", "--json"])).unwrap();
    assert_eq!(
        list.as_array().unwrap().len(),
        2,
        "half an import was written"
    );
    gw.shutdown().await;
}

/// A key's owner: set by `create --owner` or from the Django `user` field on import, shown by
/// list/show/export, kept by rotate, forwarded as `X-Api-Key-Owner` (a client's copy never is),
/// and the import's Django pk → keygate id map, printed or written with `--map`.
#[tokio::test]
async fn owners_are_carried_from_django_to_the_backend() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream.url(), &[]).await;
    let dump = serde_json::json!([
        {"model": "users.apikey", "pk": 11, "fields": {"name": "alice laptop", "key": "sk_alice_0123456789abcdef",
          "user": 7, "created_at": "2024-03-01T09:00:00Z"}},
        {"model": "users.apikey", "pk": 12, "fields": {"name": "bob ci", "key": "sk_bob_0123456789abcdef",
          "user": ["bob"]}},
        {"model": "users.apikey", "pk": 13, "fields": {"name": "shared", "key": "sk_shared_0123456789abcdef",
          "user": null}}
    ]);
    let file = gw.dir.path().join("apikeys.json");
    std::fs::write(&file, dump.to_string()).unwrap();
    let map_file = gw.dir.path().join("map.json");
    let printed = cli(
        &gw,
        &[
            "import",
            file.to_str().unwrap(),
            "--map",
            map_file.to_str().unwrap(),
        ],
    );
    assert!(printed.is_empty(), "{printed}");
    let map: Value = serde_json::from_str(&std::fs::read_to_string(&map_file).unwrap()).unwrap();
    let map = map.as_object().unwrap();
    assert_eq!(map.keys().collect::<Vec<_>>(), ["11", "12", "13"]);
    let alice_id = map["11"].as_str().unwrap();
    let shown: Value = serde_json::from_str(&cli(&gw, &["show", alice_id, "--json"])).unwrap();
    assert_eq!(
        (&shown["name"], &shown["owner"]),
        (&"alice laptop".into(), &"7".into())
    );
    let shown: Value = serde_json::from_str(&cli(&gw, &["show", "bob ci", "--json"])).unwrap();
    assert_eq!(shown["owner"], "bob");
    assert_eq!(shown["id"], map["12"]);
    // Imported again: nothing new, and the same map on stdout.
    let again: Value =
        serde_json::from_str(&cli(&gw, &["import", file.to_str().unwrap()])).unwrap();
    assert_eq!(again.as_object().unwrap(), map);

    // Forwarded as X-Api-Key-Owner; a client's copy is dropped, with or without an owner.
    let forged = |req: reqwest::RequestBuilder| {
        req.header("X-Api-Key-Owner", "1")
            .header("X-Api-Key-Id", "key_forged")
    };
    let client = gw.client();
    let resp = forged(client.get(gw.url("/x")))
        .header("X-API-Key", "sk_alice_0123456789abcdef")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let seen = upstream.last().headers;
    assert_eq!(
        seen.get_all("x-api-key-owner").iter().collect::<Vec<_>>(),
        ["7"]
    );
    assert_eq!(seen["x-api-key-id"], alice_id);
    let resp = forged(client.get(gw.url("/x")))
        .header("X-API-Key", "sk_shared_0123456789abcdef")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let seen = upstream.last().headers;
    assert!(!seen.contains_key("x-api-key-owner"), "{seen:?}");
    assert_eq!(seen["x-api-key-id"], map["13"].as_str().unwrap());

    // create --owner; rotate keeps the owner; list and export show it.
    let key = cli(
        &gw,
        &["create", "--name", "carol", "--owner", "carol@example.com"],
    );
    gw.get_with_key("/x", &key).await;
    assert_eq!(
        upstream.last().headers["x-api-key-owner"],
        "carol@example.com"
    );
    let rotated = cli(&gw, &["rotate", "carol", "--json"]);
    let rotated: Value = serde_json::from_str(&rotated).unwrap();
    assert_eq!(rotated["owner"], "carol@example.com");
    gw.get_with_key("/x", rotated["key"].as_str().unwrap())
        .await;
    assert_eq!(
        upstream.last().headers["x-api-key-owner"],
        "carol@example.com"
    );
    let list = cli(&gw, &["list"]);
    let header = list.lines().next().unwrap();
    assert!(header.ends_with("OWNER"), "{header}");
    assert!(
        list.lines()
            .any(|l| l.contains("alice laptop") && l.ends_with(" 7")),
        "{list}"
    );
    let export: Value = serde_json::from_str(&cli(&gw, &["export"])).unwrap();
    let mut owners: Vec<_> = export["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["owner"].as_str().unwrap_or("-"))
        .collect();
    owners.sort_unstable();
    assert_eq!(
        owners,
        ["-", "7", "bob", "carol@example.com", "carol@example.com"]
    );

    // Bad owners are refused before anything is stored; --map is for Django dumps only.
    let err = cli_err(&gw, &["create", "--name", "x", "--owner", " padded"]);
    assert!(err.contains("invalid owner"), "{err}");
    let backup = gw.dir.path().join("backup.json");
    cli(&gw, &["export", "--out", backup.to_str().unwrap()]);
    let err = cli_err(
        &gw,
        &[
            "import",
            backup.to_str().unwrap(),
            "--map",
            map_file.to_str().unwrap(),
        ],
    );
    assert!(err.contains("--map is for Django dumps"), "{err}");
    gw.shutdown().await;
}
