//! The real `keygate` binary: key management commands, configuration errors, and `keygate serve`
//! as a child process (CLI revocation seen by a running gateway, logs free of keys, SIGTERM,
//! memory while streaming a large upload).

mod common;

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use common::{Process, Upstream, keygate, write_config};

fn run(config: &Path, args: &[&str]) -> Output {
    keygate()
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8(o.stderr.clone()).unwrap()
}

fn config() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), "http://127.0.0.1:9");
    (dir, path)
}

#[test]
fn create_prints_the_key_alone_once() {
    let (_dir, cfg) = config();
    let out = run(&cfg, &["keys", "create", "--name", "Frontend production"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let printed = stdout(&out);
    let key = printed.trim_end_matches('\n');
    assert_eq!(printed.lines().count(), 1);
    keygate::key::check_format(key.as_bytes()).unwrap();
    assert!(stderr(&out).contains("not shown again"));
    assert!(!stderr(&out).contains(key));

    // Nothing shows it again.
    for args in [
        &["keys", "list"][..],
        &["keys", "list", "--json"],
        &["keys", "show", "Frontend production"],
        &["keys", "show", "Frontend production", "--json"],
        &["keys", "usage"],
        &["keys", "usage", "--json"],
        &["check-config"],
    ] {
        let out = run(&cfg, args);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        assert!(
            !stdout(&out).contains(key) && !stderr(&out).contains(key),
            "{args:?} printed the key"
        );
    }
    // Nor is it in the database file.
    let db = std::fs::read(cfg.parent().unwrap().join("keygate.db")).unwrap();
    assert!(!db.windows(key.len()).any(|w| w == key.as_bytes()));

    let out = run(&cfg, &["keys", "create", "--name", "ci", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    keygate::key::check_format(v["key"].as_str().unwrap().as_bytes()).unwrap();
    assert_eq!(v["name"], "ci");
    assert_eq!(v["status"], "active");
    assert!(v["id"].as_str().unwrap().starts_with("key_"));
}

#[test]
fn list_show_revoke_enable_delete() {
    let (_dir, cfg) = config();
    assert!(
        run(&cfg, &["keys", "create", "--name", "a"])
            .status
            .success()
    );
    assert!(
        run(
            &cfg,
            &["keys", "create", "--name", "b", "--expires-in", "30d"]
        )
        .status
        .success()
    );

    let list: serde_json::Value =
        serde_json::from_slice(&run(&cfg, &["keys", "list", "--json"]).stdout).unwrap();
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 2);
    assert!(list[1]["expires_at"].is_string());
    let id_a = list[0]["id"].as_str().unwrap().to_owned();
    let text = stdout(&run(&cfg, &["keys", "list"]));
    assert!(text.starts_with("ID") && text.contains(&id_a) && text.contains("never"));

    let out = run(&cfg, &["keys", "revoke", &id_a]);
    assert!(out.status.success());
    assert!(stdout(&out).contains("inactive"));
    let shown: serde_json::Value =
        serde_json::from_slice(&run(&cfg, &["keys", "show", "a", "--json"]).stdout).unwrap();
    assert_eq!(shown["status"], "inactive");
    assert!(run(&cfg, &["keys", "enable", "a"]).status.success());
    let shown: serde_json::Value =
        serde_json::from_slice(&run(&cfg, &["keys", "show", &id_a, "--json"]).stdout).unwrap();
    assert_eq!(shown["status"], "active");
    assert!(run(&cfg, &["keys", "delete", "a"]).status.success());
    let out = run(&cfg, &["keys", "show", "a"]);
    assert!(!out.status.success());
}

#[test]
fn bad_input_is_a_one_line_error_and_a_failure_status() {
    let (dir, cfg) = config();
    assert!(
        run(&cfg, &["keys", "create", "--name", "dup"])
            .status
            .success()
    );
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["keys", "create", "--name", "dup"], "already exists"),
        (
            vec!["keys", "create", "--name", "bad\nname"],
            "invalid key name",
        ),
        (
            vec!["keys", "show", "nope"],
            "no API key with id or name 'nope'",
        ),
        (vec!["keys", "revoke", "nope"], "no API key"),
        (vec!["keys", "delete", "nope"], "no API key"),
        (
            vec!["keys", "usage", "--stale-after", "soon"],
            "not a duration",
        ),
    ];
    for (args, expected) in cases {
        let out = run(&cfg, &args);
        assert!(!out.status.success(), "{args:?}");
        let err = stderr(&out);
        assert!(err.contains(expected), "{args:?}: {err}");
        if !args.contains(&"--stale-after") {
            assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        }
        assert!(!err.contains("panicked") && !err.contains("backtrace"));
    }

    // Unreadable and invalid configuration.
    let out = run(&dir.path().join("missing.toml"), &["keys", "list"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("missing.toml"));
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[upstream]\nurl = \"ftp://nowhere\"\n").unwrap();
    for cmd in [&["serve"][..], &["check-config"], &["keys", "list"]] {
        let out = run(&bad, cmd);
        assert!(!out.status.success(), "{cmd:?}");
        let err = stderr(&out);
        assert!(
            err.contains("upstream.url")
                && err.contains("ftp://nowhere")
                && err.contains("expected"),
            "{err}"
        );
        assert_eq!(err.lines().count(), 1, "{err}");
    }
    std::fs::write(&bad, "[server]\nhttps_listn = \"x\"\n").unwrap();
    let err = stderr(&run(&bad, &["check-config"]));
    assert!(err.contains("https_listn"), "{err}");
    // Environment overrides are validated the same way.
    let out = keygate()
        .arg("--config")
        .arg(&cfg)
        .arg("check-config")
        .env("KEYGATE_STORE_POSITIVE_TTL", "forever")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("store.positive_ttl"));
}

#[test]
fn check_config_prints_the_effective_configuration() {
    let (_dir, cfg) = config();
    let out = keygate()
        .arg("--config")
        .arg(&cfg)
        .arg("check-config")
        .env(
            "CORS_ALLOWED_ORIGINS",
            "https://a.example,https://b.example",
        )
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let effective: toml::Table = stdout(&out).parse().unwrap();
    assert_eq!(
        effective["cors"]["allowed_origins"]
            .as_array()
            .unwrap()
            .len(),
        2,
        "{effective:?}"
    );
    assert_eq!(effective["store"]["poll_interval"].as_str(), Some("50ms"));
}

#[test]
fn usage_report_matches_the_old_monitor() {
    let (dir, cfg) = config();
    assert!(
        run(&cfg, &["keys", "create", "--name", "fresh"])
            .status
            .success()
    );
    assert!(
        run(&cfg, &["keys", "create", "--name", "old"])
            .status
            .success()
    );
    assert!(
        run(&cfg, &["keys", "create", "--name", "unused"])
            .status
            .success()
    );
    let db = rusqlite::Connection::open(dir.path().join("keygate.db")).unwrap();
    let now = keygate::store::unix_now();
    db.execute(
        "UPDATE api_keys SET last_used = ?1, use_count = 3 WHERE name = 'fresh'",
        [now - 3600],
    )
    .unwrap();
    db.execute(
        "UPDATE api_keys SET last_used = ?1 WHERE name = 'old'",
        [now - 10 * 86_400],
    )
    .unwrap();

    let text = stdout(&run(&cfg, &["keys", "usage"]));
    assert!(
        text.contains("API Key 'fresh': Last used 0 days ago"),
        "{text}"
    );
    assert!(
        text.contains("API Key 'old': Last used 10 days ago"),
        "{text}"
    );
    assert!(
        text.contains("WARNING: API Key 'old' not used in 10 days"),
        "{text}"
    );
    assert!(!text.contains("WARNING: API Key 'fresh'"), "{text}");
    assert!(
        text.contains("WARNING: API Key 'unused' has never been used"),
        "{text}"
    );
    assert!(text.contains("Status: Active") && text.contains("Created: ") && text.contains("---"));

    let rows: serde_json::Value = serde_json::from_slice(
        &run(&cfg, &["keys", "usage", "--stale-after", "30d", "--json"]).stdout,
    )
    .unwrap();
    let row = |name: &str| {
        rows.as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == name)
            .unwrap()
            .clone()
    };
    assert_eq!(row("old")["days_since_last_use"], 10);
    assert_eq!(row("old")["stale"], false, "30d threshold");
    assert_eq!(row("unused")["never_used"], true);
    assert_eq!(row("fresh")["use_count"], 3);
}

fn wait_status(client: &reqwest::blocking::Client, url: &str, key: &str, want: u16) -> Duration {
    let started = Instant::now();
    loop {
        let status = client
            .get(url)
            .header("X-API-Key", key)
            .send()
            .unwrap()
            .status()
            .as_u16();
        if status == want {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "still {status} after 1 s (want {want})"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn blocking_client(dir: &Path, https: std::net::SocketAddr) -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .use_rustls_tls()
        .add_root_certificate(
            reqwest::Certificate::from_pem(&std::fs::read(dir.join("cert.pem")).unwrap()).unwrap(),
        )
        .resolve("localhost", https)
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

/// The whole operator story through the real binaries: create with the CLI while the gateway
/// runs, use, revoke (felt within 1 s), re-enable, stop with SIGTERM; the key never appears in
/// any log line, and usage is flushed at exit.
#[test]
fn cli_changes_reach_a_running_gateway_and_logs_never_contain_keys() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let upstream = rt.block_on(Upstream::start());
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), &upstream.url());
    let mut gw = Process::start(&cfg, &[("KEYGATE_STORE_USAGE_FLUSH_INTERVAL", "1h")]);
    let client = blocking_client(dir.path(), gw.https);
    let url = format!(
        "https://localhost:{}/api/v1/video/process/",
        gw.https.port()
    );

    let out = run(&cfg, &["keys", "create", "--name", "frontend"]);
    let key = stdout(&out).trim().to_owned();
    wait_status(&client, &url, &key, 200);
    let resp = client
        .get(&url)
        .header("Authorization", format!("Bearer {key}"))
        .header("User-Agent", "it-test/1.0")
        .send()
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut typo = key.clone();
    typo.replace_range(5..6, if &key[5..6] == "x" { "y" } else { "x" });
    assert_eq!(
        client
            .get(&url)
            .header("X-API-Key", &typo)
            .send()
            .unwrap()
            .status(),
        401
    );
    // Access lines are gathered per worker, but reach stdout within 100 ms while it runs.
    let deadline = Instant::now() + Duration::from_secs(3);
    while !gw.output().contains("malformed_checksum") {
        assert!(
            Instant::now() < deadline,
            "no access line while the gateway runs:\n{}",
            gw.output()
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    assert!(run(&cfg, &["keys", "revoke", "frontend"]).status.success());
    let took = wait_status(&client, &url, &key, 401);
    eprintln!("revocation felt after {took:?}");
    assert!(run(&cfg, &["keys", "enable", "frontend"]).status.success());
    wait_status(&client, &url, &key, 200);

    let metrics = reqwest::blocking::get(format!("http://{}/metrics", gw.admin))
        .unwrap()
        .text()
        .unwrap();
    assert!(
        !metrics.contains(&key[3..]),
        "the key leaked into the metrics"
    );
    let status = gw.terminate();
    assert!(status.success(), "exit status {status:?}");
    let output = gw.output();
    // One access event per request, with the fields operators need.
    let access: Vec<serde_json::Value> = output
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == "keygate::access")
        .collect();
    assert!(access.len() >= 5, "{output}");
    let bearer = access
        .iter()
        .find(|v| v["user_agent"] == "it-test/1.0")
        .expect("bearer request logged");
    for field in [
        "request_id",
        "client_ip",
        "method",
        "path",
        "status",
        "latency_ms",
        "key_id",
        "key_name",
    ] {
        assert!(!bearer[field].is_null(), "missing {field} in {bearer}");
    }
    assert_eq!(bearer["key_name"], "frontend");
    assert_eq!(bearer["auth"], "ok");
    assert!(
        access
            .iter()
            .any(|v| v["auth"] == "inactive" && v["key_name"] == "frontend")
    );
    assert!(access.iter().any(|v| v["reason"] == "malformed_checksum"));
    // The secret, and the mistyped variant of it, appear nowhere.
    let body = &key[3..];
    assert!(!output.contains(body), "the key leaked into the logs");
    assert!(
        !output.contains(&typo[3..]),
        "a presented credential leaked into the logs"
    );

    let shown: serde_json::Value =
        serde_json::from_slice(&run(&cfg, &["keys", "show", "frontend", "--json"]).stdout).unwrap();
    assert!(
        shown["last_used"].is_string(),
        "usage not flushed at shutdown: {shown}"
    );
    assert!(shown["use_count"].as_u64().unwrap() >= 3);
}

fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// A 1 GiB upload streams through the gateway: its peak RSS grows by a few MiB at most.
#[test]
fn a_gigabyte_upload_does_not_grow_the_gateway() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let upstream = rt.block_on(Upstream::start());
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), &upstream.url());
    let key = stdout(&run(&cfg, &["keys", "create", "--name", "uploader"]))
        .trim()
        .to_owned();
    let gw = Process::start(&cfg, &[]);
    let client = blocking_client(dir.path(), gw.https);
    let url = format!("https://localhost:{}/upload", gw.https.port());
    // Warm up: connection, TLS, pools and cache exist before the baseline is taken.
    let warm = client
        .post(&url)
        .header("X-API-Key", &key)
        .body(vec![7u8; 4 << 20])
        .send()
        .unwrap();
    assert_eq!(warm.status(), 200);
    let before = peak_rss_kib(gw.child.id());

    const TOTAL: u64 = 1 << 30;
    struct Pattern(u64);
    impl std::io::Read for Pattern {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = buf
                .len()
                .min(usize::try_from(TOTAL - self.0).unwrap_or(usize::MAX));
            for (i, b) in buf[..n].iter_mut().enumerate() {
                *b = ((self.0 + i as u64) % 251) as u8;
            }
            self.0 += n as u64;
            Ok(n)
        }
    }
    let resp = client
        .post(&url)
        .header("X-API-Key", &key)
        .body(reqwest::blocking::Body::sized(Pattern(0), TOTAL))
        .send()
        .unwrap_or_else(|e| panic!("{e:?}\n{}", gw.output()));
    assert_eq!(resp.status(), 200);
    let v: serde_json::Value = resp.json().unwrap();
    assert_eq!(v["bytes"], TOTAL);
    let after = peak_rss_kib(gw.child.id());
    let grew_mib = after.saturating_sub(before) as f64 / 1024.0;
    eprintln!("peak RSS before {before} KiB, after {after} KiB, growth {grew_mib:.1} MiB");
    assert!(
        grew_mib < 8.0,
        "peak RSS grew by {grew_mib:.1} MiB streaming 1 GiB"
    );
}

/// SIGHUP reloads the certificate; the process keeps running and serving.
#[test]
fn sighup_reloads_the_certificate() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let upstream = rt.block_on(Upstream::start());
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), &upstream.url());
    // Only the signal reloads here: no file watching. Logs also go to a daily-rotated file.
    let log_file = dir.path().join("logs/keygate.log");
    let mut gw = Process::start(
        &cfg,
        &[
            ("KEYGATE_TLS_WATCH_INTERVAL", "0s"),
            ("KEYGATE_LOGGING_FILE", log_file.to_str().unwrap()),
        ],
    );
    let next = dir.path().join("next");
    keygate::tls::write_dev_cert(
        &next.join("cert.pem"),
        &next.join("key.pem"),
        &["localhost".into()],
    )
    .unwrap();
    let old_client = blocking_client(dir.path(), gw.https);
    let health = format!("https://localhost:{}/health/api-auth/", gw.https.port());
    assert_eq!(old_client.get(&health).send().unwrap().status(), 200);
    std::fs::copy(next.join("key.pem"), dir.path().join("key.pem")).unwrap();
    std::fs::copy(next.join("cert.pem"), dir.path().join("cert.pem")).unwrap();
    // Still the old certificate until the signal: a client trusting only the new one fails.
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        blocking_client(dir.path(), gw.https)
            .get(&health)
            .send()
            .is_err()
    );
    let pid = nix::unistd::Pid::from_raw(i32::try_from(gw.child.id()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    let started = Instant::now();
    let new_client = blocking_client(dir.path(), gw.https); // trusts the new cert.pem
    loop {
        if new_client.get(&health).send().is_ok() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "SIGHUP did not reload: {}",
            gw.output()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        gw.child.try_wait().unwrap().is_none(),
        "SIGHUP stopped the gateway"
    );
    assert!(gw.output().contains("TLS certificate reloaded"));
    assert!(gw.terminate().success());
    // The log file is named for its day (daily rotation) and has what stdout had.
    let files: Vec<_> = std::fs::read_dir(dir.path().join("logs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    // One file per day (two if the test ran across midnight UTC), named keygate.log.YYYY-MM-DD.
    assert!((1..=2).contains(&files.len()), "{files:?}");
    let dated =
        |f: &String| f.starts_with("keygate.log.20") && f.len() == "keygate.log.2026-01-01".len();
    assert!(files.iter().all(dated), "{files:?}");
    let text: String = files
        .iter()
        .map(|f| std::fs::read_to_string(dir.path().join("logs").join(f)).unwrap())
        .collect();
    assert!(
        text.contains("keygate listening") && text.contains("TLS certificate reloaded"),
        "{text}"
    );
}
