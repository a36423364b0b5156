//! Signals to `keygate serve`: SIGHUP reloads the certificate, and a second SIGINT or SIGTERM
//! ends the drain at once.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::common::{self, Process, Upstream, keys_cli, write_config};
use crate::{blocking_client, signal, wait_exit};

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
    // Still the old certificate until the signal: a client trusting only the new one fails. A
    // fixed wait, three times the tests' usual watch interval: that nothing reloads in it is
    // what is checked.
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        blocking_client(dir.path(), gw.https)
            .get(&health)
            .send()
            .is_err()
    );
    let pid = nix::unistd::Pid::from_raw(i32::try_from(gw.child.id()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    let new_client = blocking_client(dir.path(), gw.https); // trusts the new cert.pem
    common::wait_for(Duration::from_secs(3), "the reload on SIGHUP", || {
        new_client.get(&health).send().map_err(|_| gw.output())
    });
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

/// An upstream that reads requests and never answers: a request to it stays in flight. Counts
/// the connections that sent a request (not the start-up reachability probe's).
fn silent_upstream() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let requests = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&requests);
    std::thread::spawn(move || {
        for mut stream in listener.incoming().map_while(Result::ok) {
            let count = Arc::clone(&count);
            std::thread::spawn(move || {
                let mut buf = [0; 4096];
                let mut counted = false;
                while let Ok(n @ 1..) = std::io::Read::read(&mut stream, &mut buf) {
                    if !counted {
                        counted = true;
                        count.fetch_add(1, Ordering::SeqCst);
                    }
                    let _ = n;
                }
            });
        }
    });
    (addr, requests)
}

/// A second Ctrl-C (or SIGTERM) while requests drain ends the drain at once.
#[test]
fn a_second_signal_ends_the_drain_at_once() {
    let (upstream, accepted) = silent_upstream();
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), &format!("http://{upstream}"));
    let envs = [
        ("KEYGATE_SERVER_SHUTDOWN_GRACE", "60s"),
        ("KEYGATE_UPSTREAM_RESPONSE_TIMEOUT", "60s"),
    ];
    let key = keys_cli(&cfg, &envs, &["create", "--name", "held"]);
    let mut gw = Process::start(&cfg, &envs);
    let client = reqwest::blocking::Client::builder()
        .use_rustls_tls()
        .add_root_certificate(
            reqwest::Certificate::from_pem(&std::fs::read(dir.path().join("cert.pem")).unwrap())
                .unwrap(),
        )
        .resolve("localhost", gw.https)
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap();
    let url = format!("https://localhost:{}/held", gw.https.port());
    std::thread::spawn(move || client.get(url).header("X-API-Key", key).send());
    common::eventually(
        Duration::from_secs(10),
        "the request to reach the upstream",
        || accepted.load(Ordering::SeqCst) > 0,
    );

    signal(&gw.child, nix::sys::signal::Signal::SIGINT);
    common::eventually(Duration::from_secs(10), "the drain", || {
        gw.output().contains("draining")
    });
    let second = Instant::now();
    signal(&gw.child, nix::sys::signal::Signal::SIGINT);
    let status = wait_exit(&mut gw.child, Duration::from_secs(10));
    assert!(status.success(), "{status:?}");
    assert!(
        second.elapsed() < Duration::from_secs(5),
        "took {:?}",
        second.elapsed()
    );
    let output = gw.output();
    assert!(
        output.contains("second shutdown signal: closing the remaining connections now"),
        "{output}"
    );
    assert!(output.contains("keygate stopped"), "{output}");
}
