//! Configuration and the key store a command uses: paths relative to the config file, no store
//! created by commands that only read or change keys, `check-config` showing the effective
//! configuration and refusing what `serve` would, and bad input or configuration told in one
//! line that names the key, the value and the variable.

use crate::common::{keygate, write_config};
use crate::{assert_one_line_error, config, run, stderr, stdout};

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
            &[
                "store.path",
                missing.to_str().unwrap(),
                "(from KEYGATE_STORE_PATH)",
                "does not exist",
            ],
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
