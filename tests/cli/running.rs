//! A running `keygate serve` in use: CLI changes felt within a second, access lines with the
//! fields operators need and never a key, usage flushed at SIGTERM, and memory flat through a
//! 1 GiB upload.

use std::time::{Duration, Instant};

use crate::common::{self, Process, Upstream, write_config};
use crate::{blocking_client, run, stdout};

/// Polls `GET url` with `key` until it answers `want` (within a second); returns how long that
/// took.
fn wait_status(client: &reqwest::blocking::Client, url: &str, key: &str, want: u16) -> Duration {
    let started = Instant::now();
    let what = format!("the answer {want}");
    common::wait_for(Duration::from_secs(1), &what, || {
        let status = client.get(url).header("X-API-Key", key).send();
        match status.unwrap().status().as_u16() {
            status if status == want => Ok(()),
            status => Err(status),
        }
    });
    started.elapsed()
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
    let what = "an access line while the gateway runs";
    common::wait_for(Duration::from_secs(3), what, || {
        let output = gw.output();
        if output.contains("malformed_checksum") {
            Ok(())
        } else {
            Err(output)
        }
    });

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
