//! Replays the fuzzers' corpora (`fuzz/corpus/<target>/`) through the same checks the fuzz
//! targets run, so every input a fuzzer kept (and every crash it once found) stays a test.

#[path = "../fuzz/checks.rs"]
mod checks;

use std::path::Path;

fn replay(target: &str, check: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        if std::panic::catch_unwind(|| check(&data)).is_err() {
            panic!("{target}: {} fails its check", path.display());
        }
        n += 1;
    }
    assert!(
        n >= 5,
        "{target}: only {n} corpus files in {}",
        dir.display()
    );
}

#[test]
fn key_format_corpus() {
    replay("key_format", checks::key_format);
}

#[test]
fn config_load_corpus() {
    replay("config_load", checks::config_load);
}

#[test]
fn request_policy_corpus() {
    replay("request_policy", checks::request_policy);
}
