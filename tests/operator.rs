//! What an operator meets, through the real binary: which configuration and key store a command
//! uses, `check-config` as strict as `serve`, errors in one line, output into closed pipes,
//! shell completions, one gateway per port, and a second shutdown signal.

mod common;

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{Process, keygate, keys_cli, write_config};

fn run(config: &Path, args: &[&str]) -> Output {
    keygate()
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A failure with one line on stderr that contains every one of `words`.
fn assert_one_line_error(o: &Output, words: &[&str]) {
    let err = stderr(o);
    assert!(!o.status.success(), "succeeded: {err}");
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(!err.contains("panicked"), "{err}");
    for word in words {
        assert!(err.contains(word), "{word:?} not in {err}");
    }
}

/// Polls `done` every 20 ms until it holds or `within` passes.
fn wait_until(within: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits for `child` to exit; kills it and fails if it is still running after `within`.
fn wait_exit(child: &mut Child, within: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("still running after {within:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `keygate serve` with a config whose `[store] path` is relative: the store belongs beside the
/// config file, whatever the working directory.
#[test]
fn relative_store_paths_follow_the_config_file_not_the_working_directory() {
    let srv = tempfile::tempdir().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let cfg = srv.path().join("gateway.toml");
    std::fs::write(
        &cfg,
        "[store]\npath = \"keys.db\"\n[tls]\ngenerate_dev_cert = true\n",
    )
    .unwrap();
    let cli = |args: &[&str]| {
        keygate()
            .current_dir(elsewhere.path())
            .arg("--config")
            .arg(&cfg)
            .args(args)
            .output()
            .unwrap()
    };

    let out = cli(&["keys", "create", "--name", "frontend"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(srv.path().join("keys.db").exists());
    assert!(!elsewhere.path().join("keys.db").exists());
    let out = cli(&["keys", "list"]);
    assert!(stdout(&out).contains("frontend"), "{}", stdout(&out));

    // --verbose names the config file and the store, as check-config does.
    let out = cli(&["keys", "list", "--verbose"]);
    let real = std::fs::canonicalize(srv.path()).unwrap();
    let named = format!(
        "keygate: config {}; store sqlite {}",
        real.join("gateway.toml").display(),
        real.join("keys.db").display()
    );
    assert!(stderr(&out).contains(&named), "{}", stderr(&out));
    let out = cli(&["check-config"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!(
            "store sqlite {}: 1 API key",
            real.join("keys.db").display()
        )),
        "{}",
        stderr(&out)
    );
    let shown: toml::Table = stdout(&out).parse().unwrap();
    assert_eq!(
        shown["store"]["path"].as_str(),
        Some(real.join("keys.db").to_str().unwrap())
    );
}

#[test]
fn commands_that_only_read_or_change_keys_never_create_a_store() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "http://127.0.0.1:9");
    let db = dir.path().join("keygate.db");
    for args in [
        &["keys", "list"][..],
        &["keys", "list", "--json"],
        &["keys", "usage"],
        &["keys", "show", "x"],
        &["keys", "revoke", "x"],
        &["keys", "export"],
    ] {
        let out = run(&cfg, args);
        assert_one_line_error(&out, &["no key store at", db.to_str().unwrap(), "--config"]);
        assert!(!db.exists(), "{args:?} created the store");
    }

    // A store in a directory that does not exist is not created, directory and all.
    let missing = dir.path().join("nonexistent/dir/keygate.db");
    for args in [
        &["keys", "list"][..],
        &["keys", "create", "--name", "x"],
        &["serve"],
    ] {
        let out = keygate()
            .arg("--config")
            .arg(&cfg)
            .args(args)
            .env("KEYGATE_STORE_PATH", &missing)
            .output()
            .unwrap();
        assert_one_line_error(
            &out,
            &["store.path", missing.to_str().unwrap(), "does not exist"],
        );
    }
    assert!(!dir.path().join("nonexistent").exists());

    // Adding keys may create it, and says so.
    let out = run(&cfg, &["keys", "create", "--name", "first"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("creating a new, empty key store"));
    assert!(db.exists());
}

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
    wait_until(Duration::from_secs(10), "the upstream warning", || {
        gw.output().contains("upstream does not accept connections")
    });
    assert!(gw.output().contains("created a new, empty key store"));
    assert!(gw.terminate().success());
}

/// A key that expires after year 9999 was accepted, and every listing then panicked on it.
#[test]
fn expiry_times_stay_within_what_can_be_shown() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "http://127.0.0.1:9");
    for lifetime in ["99999999999d", "3000000d", "36501d"] {
        let out = run(
            &cfg,
            &["keys", "create", "--name", "x", "--expires-in", lifetime],
        );
        assert!(!out.status.success());
        assert!(stderr(&out).contains("at most 36500d"), "{}", stderr(&out));
    }
    // A key that expires as it is made is a mistake, as a past --expires-at is.
    for args in [
        &["--expires-in", "0s"][..],
        &["--expires-at", "2001-01-01T00:00:00Z"],
    ] {
        let out = run(
            &cfg,
            &[&["keys", "create", "--name", "x"][..], args].concat(),
        );
        assert!(!out.status.success(), "{args:?}");
        assert_eq!(stderr(&out).lines().count(), 1, "{}", stderr(&out));
    }
    assert!(
        run(
            &cfg,
            &["keys", "create", "--name", "long", "--expires-in", "36500d"]
        )
        .status
        .success()
    );

    // A time beyond year 9999 written by another tool is shown, not a panic.
    let db = rusqlite::Connection::open(dir.path().join("keygate.db")).unwrap();
    db.execute(
        "UPDATE api_keys SET expires_at = 8640001796305274, last_used = 8640001796305274",
        [],
    )
    .unwrap();
    for args in [
        &["keys", "list"][..],
        &["keys", "list", "--json"],
        &["keys", "show", "long"],
        &["keys", "show", "long", "--json"],
        &["keys", "usage"],
        &["keys", "usage", "--json"],
        &["keys", "export"],
    ] {
        let out = run(&cfg, args);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        // (The text usage report shows days, not times.)
        if args != ["keys", "usage"] {
            assert!(stdout(&out).contains("8640001796305274"), "{args:?}");
        }
    }
    // ... but an import refuses it.
    let export = run(&cfg, &["keys", "export"]).stdout;
    let other = tempfile::tempdir().unwrap();
    let other_cfg = write_config(other.path(), "http://127.0.0.1:9");
    let mut child = keygate()
        .arg("--config")
        .arg(&other_cfg)
        .args(["keys", "import", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(&export).unwrap();
    let out = child.wait_with_output().unwrap();
    assert_one_line_error(
        &out,
        &["record 1", "= 8640001796305274", "expected Unix seconds"],
    );
    assert!(
        !other.path().join("keygate.db").exists(),
        "a refused import left a store behind"
    );
}

#[test]
fn check_config_refuses_what_serve_would_refuse_or_mis_run() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "http://127.0.0.1:9");
    let base = std::fs::read_to_string(&cfg).unwrap();
    let other_key = dir.path().join("other-key.pem");
    keygate::tls::write_dev_cert(&dir.path().join("other-cert.pem"), &other_key, &[]).unwrap();
    let cases = [
        (
            base.replace("cert.pem", "missing-cert.pem"),
            "tls.cert, tls.key: cannot load certificate chain from",
        ),
        (
            base.replace("cert.pem", "missing-cert.pem")
                .replace("key.pem", "missing-key.pem"),
            "generate_dev_cert = true generates one",
        ),
        (
            base.replace(
                &dir.path().join("key.pem").display().to_string(),
                &other_key.display().to_string(),
            ),
            "invalid certificate/key pair",
        ),
        (
            base.replace("level = \"info\"", "level = \"verbose\""),
            "logging.level = \"verbose\"",
        ),
        (
            base.replace("https://app.example", "HTTP://LOCALHOST:3001"),
            "expected \"http://localhost:3001\"",
        ),
        (
            base.replace("[server]\n", "[server]\nmax_header_bytes = 100\n"),
            "server.max_header_bytes = \"100\"",
        ),
        (
            base.replace(
                "[logging]\n",
                "[logging]\nfile = \"/dev/null/keygate.log\"\n",
            ),
            "logging.file",
        ),
    ];
    assert!(run(&cfg, &["check-config"]).status.success());
    let bad = dir.path().join("bad.toml");
    for (text, expected) in cases {
        std::fs::write(&bad, &text).unwrap();
        for cmd in [&["check-config"][..], &["serve"]] {
            let out = run(&bad, cmd);
            assert_one_line_error(&out, &[expected]);
        }
    }
}

#[test]
fn config_errors_are_one_line_naming_key_value_and_variable() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "http://127.0.0.1:9");
    let cases: [(&str, &str, &[&str]); 4] = [
        (
            "KEYGATE_SERVER_WORKERS",
            "abc",
            &["server.workers = \"abc\" (from KEYGATE_SERVER_WORKERS): expected a whole number"],
        ),
        (
            "KEYGATE_SERVER_PUBLIC_PORT",
            "70000",
            &["server.public_port = 70000", "from 0 to 65535"],
        ),
        (
            "KEYGATE_SERVER_TRUSTED_PROXIES",
            "10.0.0.0/33",
            &[
                "server.trusted_proxies = \"10.0.0.0/33\" (from KEYGATE_SERVER_TRUSTED_PROXIES): expected",
            ],
        ),
        (
            "KEYGATE_UPSTREM_URL",
            "http://10.0.0.5:8000",
            &["KEYGATE_UPSTREM_URL", "did you mean KEYGATE_UPSTREAM_URL?"],
        ),
    ];
    for (name, value, words) in cases {
        let out = keygate()
            .arg("--config")
            .arg(&cfg)
            .arg("check-config")
            .env(name, value)
            .output()
            .unwrap();
        assert_one_line_error(&out, words);
        assert!(!stderr(&out).contains("--config"), "{}", stderr(&out));
    }
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[server]\nworkers = 2\n[tls\n").unwrap();
    let out = run(&bad, &["check-config"]);
    assert_one_line_error(&out, &["bad.toml line 3, column"]);
}

/// `keygate keys usage | head -1`: the reader goes away; a CLI stops quietly.
#[test]
fn output_into_a_closed_pipe_ends_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "http://127.0.0.1:9");
    assert!(
        run(&cfg, &["keys", "create", "--name", "a"])
            .status
            .success()
    );
    for args in [
        &["keys", "usage"][..],
        &["keys", "list"],
        &["keys", "list", "--json"],
        &["keys", "show", "a"],
        &["keys", "export"],
        &["check-config"],
        &["completions", "bash"],
    ] {
        // The read end is closed before the command starts: its first write finds no reader.
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = keygate()
            .arg("--config")
            .arg(&cfg)
            .args(args)
            .stdout(writer)
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(
            !err.contains("error") && !err.contains("panicked"),
            "{args:?}: {err}"
        );
    }
    // A new key that cannot be printed is not a quiet success: nobody has it.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = keygate()
        .arg("--config")
        .arg(&cfg)
        .args(["keys", "create", "--name", "lost"])
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert_one_line_error(
        &out,
        &["'lost'", "could not be printed", "keygate keys delete"],
    );
}

#[test]
fn keys_list_columns_fit_long_names() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "http://127.0.0.1:9");
    let long = "a-rather-long-name-for-the-frontend-production-key";
    for name in [long, "ci"] {
        assert!(
            run(
                &cfg,
                &["keys", "create", "--name", name, "--expires-in", "30d"]
            )
            .status
            .success()
        );
    }
    let text = stdout(&run(&cfg, &["keys", "list"]));
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    // Every column starts at the same character in every line.
    let starts = |line: &str| -> Vec<usize> {
        let chars: Vec<char> = line.chars().collect();
        (0..chars.len())
            .filter(|&i| {
                chars[i] != ' '
                    && (i == 0 || (i >= 2 && chars[i - 1] == ' ' && chars[i - 2] == ' '))
            })
            .collect()
    };
    let header = starts(lines[0]);
    assert_eq!(header.len(), 8, "{text}");
    for line in &lines[1..] {
        assert_eq!(starts(line), header, "{text}");
    }
}

#[test]
fn import_reads_standard_input_for_a_dash() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "http://127.0.0.1:9");
    for name in ["one", "two"] {
        assert!(
            run(&cfg, &["keys", "create", "--name", name])
                .status
                .success()
        );
    }
    let export = run(&cfg, &["keys", "export"]).stdout;
    let other = tempfile::tempdir().unwrap();
    let other_cfg = write_config(other.path(), "http://127.0.0.1:9");
    let mut child = keygate()
        .arg("--config")
        .arg(&other_cfg)
        .args(["keys", "import", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(&export).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("imported 2 API keys from standard input"),
        "{}",
        stderr(&out)
    );
    let listed = stdout(&run(&other_cfg, &["keys", "list"]));
    assert!(listed.contains("one") && listed.contains("two"), "{listed}");
}

#[test]
fn completions_for_bash_zsh_and_fish() {
    for shell in ["bash", "zsh", "fish"] {
        let out = keygate().args(["completions", shell]).output().unwrap();
        assert!(out.status.success(), "{shell}: {}", stderr(&out));
        let script = stdout(&out);
        assert!(
            script.contains("keygate")
                && script.contains("check-config")
                && script.contains("rotate"),
            "{shell}"
        );
    }
    // Completions need no configuration file.
    let out = keygate()
        .args(["--config", "/nonexistent.toml", "completions", "bash"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    // A usage error is one line too.
    let out = keygate().args(["completions", "tcsh"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(stderr(&out).lines().count(), 1, "{}", stderr(&out));
}

/// Two gateways on one port shared it through `SO_REUSEPORT` and split its connections (some
/// answered, some 502). Only the first may listen there; the second is refused in one line.
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

fn signal(child: &Child, sig: nix::sys::signal::Signal) {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
    nix::sys::signal::kill(pid, sig).unwrap();
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
    wait_until(
        Duration::from_secs(10),
        "the request to reach the upstream",
        || accepted.load(Ordering::SeqCst) > 0,
    );

    signal(&gw.child, nix::sys::signal::Signal::SIGINT);
    wait_until(Duration::from_secs(10), "the drain", || {
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
