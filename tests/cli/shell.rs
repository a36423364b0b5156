//! The binary in a shell: output into a closed pipe ends quietly (unless a new key would be
//! lost), and completions for bash, zsh and fish.

use std::process::Stdio;

use crate::common::{keygate, write_config};
use crate::{assert_one_line_error, run, stderr, stdout};

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
