//! A real Django 5.2 + Django REST Framework 3.18 app (`contrib/django/tests`) behind the real
//! gateway, served by gunicorn on a free loopback port, with `contrib/django` in place of its old
//! API-key authentication: its keys imported from `manage.py dumpdata users.APIKey`, each key's
//! `user` its owner, identity signed by the gateway and verified by Django. `UserRateThrottle`,
//! `IsAuthenticated`, `IsAdminUser`, a per-user queryset and a plain Django view keep working;
//! identity that did not come from the gateway is refused. Also runs contrib/django's own tests.
//!
//! Needs the virtualenv `scripts/install-test-deps.sh` makes (`target/test-venv`, or
//! `$KEYGATE_TEST_VENV`); without it the tests fail, saying so.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Gateway, keys_cli};
use hmac::{Hmac, Mac as _};
use reqwest::StatusCode;
use serde_json::Value;

/// The secret Django holds, and the one the gateway is rotating to: the gateway signs with both,
/// Django knows the old one only.
const OLD: &str = "old-identity-secret-0123456789abcdef0123";
const NEW: &str = "new-identity-secret-0123456789abcdef0123";

fn python() -> PathBuf {
    let venv = std::env::var_os("KEYGATE_TEST_VENV").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-venv"),
        PathBuf::from,
    );
    let python = venv.join("bin/python");
    assert!(
        python.exists(),
        "{} is missing: run scripts/install-test-deps.sh (it makes the Django + DRF virtualenv)",
        python.display()
    );
    python
}

fn project() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/django/tests")
}

/// The Django project's environment: its database and the identity secret file in `dir`.
fn django_env(dir: &Path) -> Vec<(String, String)> {
    vec![
        (
            "KEYGATE_TEST_DB".into(),
            dir.join("db.sqlite3").display().to_string(),
        ),
        (
            "KEYGATE_TEST_IDENTITY_SECRET_FILE".into(),
            dir.join("identity.secret").display().to_string(),
        ),
        ("KEYGATE_TEST_USER_RATE".into(), "5/min".into()),
        ("PYTHONDONTWRITEBYTECODE".into(), "1".into()),
    ]
}

/// `manage.py <args>`; returns stdout, panics with stderr on failure.
fn manage(dir: &Path, args: &[&str]) -> String {
    let out = Command::new(python())
        .arg(project().join("manage.py"))
        .args(args)
        .envs(django_env(dir))
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "manage.py {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// gunicorn serving the project on a free loopback port; killed when dropped.
struct Gunicorn {
    child: Child,
    addr: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
}

impl Gunicorn {
    fn start(dir: &Path) -> Self {
        let mut child = Command::new(python())
            .args(["-m", "gunicorn", "--bind", "127.0.0.1:0", "--workers", "1"])
            .args(["--threads", "4", "--no-control-socket", "--chdir"])
            .arg(project())
            .arg("project.wsgi:application")
            .envs(django_env(dir))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log: Arc<Mutex<Vec<String>>> = Arc::default();
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let sink = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some((_, rest)) = line.split_once("Listening at: http://") {
                    let _ = tx.send(rest.split_whitespace().next().unwrap_or("").to_owned());
                }
                sink.lock().unwrap().push(line);
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("gunicorn did not start: {:?}", log.lock().unwrap()))
            .parse()
            .unwrap();
        // gunicorn listens before its worker has loaded Django: wait until an answer comes.
        let what = "gunicorn's worker to answer";
        common::wait_for(Duration::from_secs(60), what, || answers(addr));
        Self { child, addr, log }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }
}

/// Whether an HTTP server answers `GET /` at `addr` within two seconds; the error says why not.
fn answers(addr: SocketAddr) -> Result<(), String> {
    let mut stream = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    stream
        .write_all(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut head = [0u8; 5];
    stream.read_exact(&mut head).map_err(|e| e.to_string())?;
    if &head == b"HTTP/" {
        Ok(())
    } else {
        Err(format!("not HTTP: {:?}", String::from_utf8_lossy(&head)))
    }
}

impl Drop for Gunicorn {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `X-Keygate-Signature` as the documented text and a secret make it (computed here, not by
/// keygate), for requests sent to Django directly.
fn signature(secret: &str, t: u64, path: &str, fields: [&str; 4]) -> String {
    let [request_id, id, name, owner] = fields;
    let text = [
        "keygate-identity-v1",
        &t.to_string(),
        "GET",
        request_id,
        id,
        name,
        owner,
        "",
        path,
    ]
    .join("\n");
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(text.as_bytes());
    format!("t={t},v1={}", common::hex(&mac.finalize().into_bytes()))
}

fn now() -> u64 {
    u64::try_from(keygate::store::unix_now()).unwrap()
}

#[test]
fn contrib_django_unit_tests_pass() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("identity.secret"), OLD).unwrap();
    let out = Command::new(python())
        .arg(project().join("manage.py"))
        .args(["test", "--noinput", "-v", "1"])
        .envs(django_env(dir.path()))
        // The unit tests set their own secrets.
        .env_remove("KEYGATE_TEST_IDENTITY_SECRET_FILE")
        .current_dir(dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("\nOK"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drf_app_keeps_working_behind_the_gateway() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("identity.secret"), format!("{OLD}\n")).unwrap();
    manage(d, &["migrate", "--noinput", "-v", "0"]);
    let users: Value = serde_json::from_str(&manage(d, &["seed"])).unwrap();
    let dump = d.join("apikeys.json");
    manage(
        d,
        &["dumpdata", "users.APIKey", "-o", dump.to_str().unwrap()],
    );
    let django = Gunicorn::start(d);

    let gw = Gateway::start(
        &django.url(""),
        &[
            ("KEYGATE_UPSTREAM_IDENTITY_SECRET", &format!("{NEW},{OLD}")),
            // Until the gateway learns that legacy keys were imported, each poll below is a
            // failed attempt: on a busy machine enough to lock the test's address out at 20/min.
            ("KEYGATE_RATE_LIMIT_FAILURES_PER_IP", "6000/min"),
        ],
    )
    .await;
    let map_file = d.join("map.json");
    keys_cli(
        &gw.config_path,
        &[],
        &[
            "import",
            dump.to_str().unwrap(),
            "--map",
            map_file.to_str().unwrap(),
        ],
    );
    let map: BTreeMap<String, String> =
        serde_json::from_str(&std::fs::read_to_string(&map_file).unwrap()).unwrap();
    let dumped: Value = serde_json::from_str(&std::fs::read_to_string(&dump).unwrap()).unwrap();
    let key_id = |name: &str| {
        let row = dumped
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["fields"]["name"] == name)
            .unwrap();
        map[&row["pk"].to_string()].clone()
    };
    let alice_pk = users["alice"].to_string();

    let client = gw.client();
    let get = |path: &str, key: &str| client.get(gw.url(path)).header("X-API-Key", key).send();
    const ALICE: &str = "sk_live_alice_0123456789abcdef";
    const ADMIN: &str = "sk_live_admin_0123456789abcdef";
    const CAROL: &str = "sk_live_carol_0123456789abcdef";
    const BOT: &str = "sk_live_bot_0123456789abcdef";
    gw.wait_for_status(ALICE, StatusCode::NOT_FOUND, Duration::from_secs(5))
        .await;

    // The owner is the Django user; request.auth is the key.
    let who: Value = get("/api/whoami/", ALICE)
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (
            &who["pk"],
            &who["username"],
            &who["is_user"],
            &who["signed"]
        ),
        (
            &alice_pk.clone().into(),
            &"alice".into(),
            &true.into(),
            &true.into()
        ),
        "{who}"
    );
    assert_eq!(who["key_id"], key_id("alice laptop").as_str());
    assert_eq!(who["owner"], alice_pk.as_str());

    // A per-user queryset, IsAdminUser, a plain Django view.
    let widgets: Value = get("/api/widgets/", ALICE)
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        widgets,
        serde_json::json!([{"id": 1, "name": "alice-1"}, {"id": 2, "name": "alice-2"}])
    );
    assert_eq!(
        get("/api/admin-only/", ALICE).await.unwrap().status(),
        StatusCode::FORBIDDEN
    );
    let admin: Value = get("/api/admin-only/", ADMIN)
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(admin, serde_json::json!({"admin": "admin"}));
    let plain: Value = get("/plain/", ALICE).await.unwrap().json().await.unwrap();
    assert_eq!(
        plain,
        serde_json::json!({"authenticated": true, "username": "alice"})
    );

    // A key whose owner is no user: an object with what DRF reads, its pk the key's id.
    let who: Value = get("/api/whoami/", BOT)
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(who["pk"], key_id("shared bot").as_str());
    assert_eq!(
        (&who["is_user"], &who["is_staff"]),
        (&false.into(), &false.into())
    );
    assert_eq!(
        get("/api/widgets/", BOT).await.unwrap().status(),
        StatusCode::FORBIDDEN
    );
    // An inactive owner is refused.
    let resp = get("/api/whoami/", CAROL).await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);

    // UserRateThrottle: 5/min per user and per key, a 429 with Retry-After, never a 500.
    for key in [ALICE, BOT] {
        let mut statuses = Vec::new();
        for _ in 0..6 {
            let resp = get("/api/throttled/", key).await.unwrap();
            if resp.status() == StatusCode::TOO_MANY_REQUESTS {
                assert!(resp.headers().contains_key("retry-after"));
            }
            statuses.push(resp.status().as_u16());
        }
        assert_eq!(statuses, [200, 200, 200, 200, 200, 429], "{}", django.log());
    }
    // Without a key, the gateway answers; Django never sees it.
    let resp = client.get(gw.url("/api/whoami/")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);

    // Straight to Django, as any process on its host could: identity without keygate's
    // signature, or with a signature that does not fit, is refused.
    let direct = reqwest::Client::new();
    let admin_id = key_id("admin console");
    let admin_pk = users["admin"].to_string();
    let fields = [
        "forged-1",
        admin_id.as_str(),
        "admin console",
        admin_pk.as_str(),
    ];
    let forged = |path: &str, signature: Option<String>| {
        let mut req = direct
            .get(django.url(path))
            .header("X-Request-Id", fields[0])
            .header("X-Api-Key-Id", fields[1])
            .header("X-Api-Key-Name", fields[2])
            .header("X-Api-Key-Owner", fields[3]);
        if let Some(s) = signature {
            req = req.header("X-Keygate-Signature", s);
        }
        req.send()
    };
    let refusals = [
        None,
        Some(signature(
            "wrong-secret-0123456789abcdef0123456",
            now(),
            "/api/admin-only/",
            fields,
        )),
        // The secret the gateway rotates to, which Django does not hold yet.
        Some(signature(NEW, now(), "/api/admin-only/", fields)),
        Some(signature(OLD, now() - 3600, "/api/admin-only/", fields)),
        Some(signature(OLD, now(), "/api/whoami/", fields)),
    ];
    for s in refusals {
        let resp = forged("/api/admin-only/", s.clone()).await.unwrap();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{s:?}");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(
            body["detail"],
            "Identity headers were not signed by keygate."
        );
    }
    // The same text signed with the secret Django holds is accepted: the documented text is
    // what Django checks.
    let resp = forged(
        "/api/admin-only/",
        Some(signature(OLD, now(), "/api/admin-only/", fields)),
    )
    .await
    .unwrap();
    assert_eq!(resp.status(), StatusCode::OK, "{}", django.log());

    // What the gateway sent, replayed: refused on another path, and on the same one (each
    // signature is accepted once).
    let sent: Value = get("/api/echo/", ALICE)
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let replay = |path: &str| {
        let mut req = direct.get(django.url(path));
        for (name, value) in sent.as_object().unwrap() {
            if let Some(v) = value.as_str() {
                req = req.header(name.as_str(), v);
            }
        }
        req.send()
    };
    for path in ["/api/widgets/", "/api/echo/"] {
        let resp = replay(path).await.unwrap();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{path}");
    }
    assert!(
        django.log().contains("keygate identity refused"),
        "{}",
        django.log()
    );
    gw.shutdown().await;
}
