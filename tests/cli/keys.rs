//! `keygate keys`: a new key printed alone and once (and stored only as a digest), listing,
//! showing, revoking, enabling and deleting, the usage report, import from standard input, and
//! expiry times kept within what can be shown.

use std::io::Write as _;
use std::path::Path;
use std::process::{Output, Stdio};

use crate::common::{keygate, write_config};
use crate::{assert_one_line_error, config, run, stderr, stdout};

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
    let out = import_from_stdin(&other_cfg, &export);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("imported 2 API keys from standard input"),
        "{}",
        stderr(&out)
    );
    let listed = stdout(&run(&other_cfg, &["keys", "list"]));
    assert!(listed.contains("one") && listed.contains("two"), "{listed}");
}

/// Expiry times stay within what can be shown (before year 10000): a longer lifetime is refused
/// at creation, a time past it written by another tool is shown as a number (no panic), and an
/// import refuses it.
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
    let out = import_from_stdin(&other_cfg, &export);
    assert_one_line_error(
        &out,
        &["record 1", "= 8640001796305274", "expected Unix seconds"],
    );
    assert!(
        !other.path().join("keygate.db").exists(),
        "a refused import left a store behind"
    );
}

/// `keygate --config CONFIG keys import -` with `input` on its standard input.
fn import_from_stdin(config: &Path, input: &[u8]) -> Output {
    let mut child = keygate()
        .arg("--config")
        .arg(config)
        .args(["keys", "import", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    child.wait_with_output().unwrap()
}
