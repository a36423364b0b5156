//! The real `keygate` binary, run as an operator runs it. One test binary, one module per
//! feature:
//!
//! - `keys`: the key management commands
//! - `config`: which configuration and store a command uses, `check-config`, one-line errors
//! - `shell`: closed pipes and shell completions
//! - `startup`: `keygate serve` starting: what it names and warns of, one gateway per port
//! - `signals`: SIGHUP reloads the certificate; a second stop signal ends the drain
//! - `running`: a running gateway: CLI changes, access logs without keys, memory

#[path = "../common/mod.rs"]
mod common;

mod config;
mod keys;
mod running;
mod shell;
mod signals;
mod startup;

use std::path::Path;
use std::process::{Child, Output};
use std::time::Duration;

use common::{keygate, write_config};

/// Runs `keygate --config <config> <args>` to the end.
fn run(config: &Path, args: &[&str]) -> Output {
    keygate()
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .unwrap()
}

/// A command's standard output.
fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).unwrap()
}

/// A command's standard error.
fn stderr(o: &Output) -> String {
    String::from_utf8(o.stderr.clone()).unwrap()
}

/// A test configuration (in a new directory) whose upstream does not listen.
fn config() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), "http://127.0.0.1:9");
    (dir, path)
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

/// Waits for `child` to exit; kills it and fails if it is still running after `within`.
fn wait_exit(child: &mut Child, within: Duration) -> std::process::ExitStatus {
    common::poll(within, || child.try_wait().unwrap()).unwrap_or_else(|| {
        let _ = child.kill();
        let _ = child.wait();
        panic!("still running after {within:?}");
    })
}

/// A blocking TLS client that trusts `dir`'s `cert.pem` and reaches `localhost` at `https`.
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

/// Sends `sig` to `child`.
fn signal(child: &Child, sig: nix::sys::signal::Signal) {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
    nix::sys::signal::kill(pid, sig).unwrap();
}
