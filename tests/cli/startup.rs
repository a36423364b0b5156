//! `keygate serve` starting: the config and store it names, a warning for an upstream that is
//! down, the store beside its config whatever the working directory, one gateway per port, and
//! an expired certificate served with a warning.

use std::io::{BufRead as _, BufReader};
use std::process::Stdio;
use std::time::Duration;

use crate::common::{self, Process, keygate, write_config};
use crate::{run, signal, stderr, wait_exit};

#[test]
fn serve_names_its_config_and_store_and_warns_of_a_down_upstream() {
    let dir = tempfile::tempdir().unwrap();
    // Nothing listens on the discard port.
    let cfg = write_config(dir.path(), "http://127.0.0.1:9");
    let mut gw = Process::start(&cfg, &[]);
    let line = gw
        .output()
        .lines()
        .find(|l| l.contains("keygate listening"))
        .unwrap()
        .to_owned();
    let start: serde_json::Value = serde_json::from_str(&line).unwrap();
    let real = std::fs::canonicalize(dir.path()).unwrap();
    assert_eq!(start["config"], real.join("gateway.toml").to_str().unwrap());
    assert_eq!(
        start["store"],
        format!("sqlite {}", real.join("keygate.db").display())
    );
    common::eventually(Duration::from_secs(10), "the upstream warning", || {
        gw.output().contains("upstream does not accept connections")
    });
    assert!(gw.output().contains("created a new, empty key store"));
    assert!(gw.terminate().success());
}

/// The store named by a relative path in a file read through `KEYGATE_CONFIG`, from the start
/// line of a real `serve` run in another directory.
#[test]
fn serve_started_elsewhere_uses_the_store_beside_its_config() {
    let srv = tempfile::tempdir().unwrap();
    let cfg = write_config(srv.path(), "http://127.0.0.1:9");
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        &srv.path().join("keygate.db").display().to_string(),
        "keygate.db",
    );
    std::fs::write(&cfg, text).unwrap();
    assert!(
        run(&cfg, &["keys", "create", "--name", "x"])
            .status
            .success()
    );
    let elsewhere = tempfile::tempdir().unwrap();
    let mut child = keygate()
        .current_dir(elsewhere.path())
        .arg("serve")
        .env("KEYGATE_CONFIG", &cfg)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Read on until the end, so the gateway's last lines do not meet a closed pipe.
    let mut lines = BufReader::new(child.stdout.take().unwrap())
        .lines()
        .map_while(Result::ok);
    let line = lines.find(|l| l.contains("keygate listening")).unwrap();
    signal(&child, nix::sys::signal::Signal::SIGTERM);
    assert!(lines.any(|l| l.contains("keygate stopped")));
    assert!(wait_exit(&mut child, Duration::from_secs(20)).success());
    let start: serde_json::Value = serde_json::from_str(&line).unwrap();
    let real = std::fs::canonicalize(srv.path()).unwrap();
    assert_eq!(
        start["store"],
        format!("sqlite {}", real.join("keygate.db").display())
    );
    assert!(!elsewhere.path().join("keygate.db").exists());
}

/// A port is one gateway's: two sharing it through `SO_REUSEPORT` would split its connections
/// (some answered, some 502). Only the first may listen there; the second is refused in one line.
#[test]
fn a_second_gateway_cannot_listen_on_a_port_the_first_owns() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let upstream = rt.block_on(common::Upstream::start());
    let first_dir = tempfile::tempdir().unwrap();
    let first_cfg = write_config(first_dir.path(), &upstream.url());
    let first = Process::start(&first_cfg, &[("KEYGATE_SERVER_WORKERS", "2")]);

    let second_dir = tempfile::tempdir().unwrap();
    let second_cfg = write_config(second_dir.path(), "http://127.0.0.1:9");
    for (name, port) in [
        ("KEYGATE_SERVER_HTTPS_LISTEN", first.https.port()),
        ("KEYGATE_SERVER_HTTP_LISTEN", first.http.port()),
    ] {
        let taken = format!("127.0.0.1:{port}");
        let mut second = keygate()
            .arg("--config")
            .arg(&second_cfg)
            .arg("serve")
            .env("KEYGATE_SERVER_WORKERS", "2")
            .env(name, &taken)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let status = wait_exit(&mut second, Duration::from_secs(20));
        let out = second.wait_with_output().unwrap();
        assert!(!status.success(), "the second gateway ran on {taken}");
        let err = stderr(&out);
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(
            err.contains(&format!("cannot listen on {taken}"))
                && err.contains("another process listens there"),
            "{err}"
        );
    }

    // The first still answers every request itself.
    let client = reqwest::blocking::Client::builder()
        .use_rustls_tls()
        .add_root_certificate(
            reqwest::Certificate::from_pem(
                &std::fs::read(first_dir.path().join("cert.pem")).unwrap(),
            )
            .unwrap(),
        )
        .resolve("localhost", first.https)
        .build()
        .unwrap();
    for _ in 0..20 {
        let resp = client
            .get(format!(
                "https://localhost:{}/health/api-auth/",
                first.https.port()
            ))
            .send()
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
}

/// A certificate past its notAfter still loads (serve starts with it), but check-config and
/// serve's log warn: clients refuse it.
#[test]
fn an_expired_certificate_is_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "http://127.0.0.1:9");
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    params.not_before = rcgen::date_time_ymd(2019, 1, 1);
    params.not_after = rcgen::date_time_ymd(2020, 1, 1);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    std::fs::write(dir.path().join("cert.pem"), cert.pem()).unwrap();
    std::fs::write(dir.path().join("key.pem"), key.serialize_pem()).unwrap();
    let out = run(&cfg, &["check-config"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("warning: tls ")
            && stderr(&out).contains("the certificate expired at 2020-01-01T00:00:00Z"),
        "{}",
        stderr(&out)
    );
    let mut gw = Process::start(&cfg, &[]);
    assert!(
        gw.output()
            .contains("the certificate expired at 2020-01-01")
    );
    assert!(gw.terminate().success());
}
