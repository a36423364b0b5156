//! `keygate check-config`: every check `serve` makes before it binds its ports (the
//! configuration, the TLS certificate and key, the key store, the log paths), without changing
//! anything (a Redis store is tried on scratch keys, removed again); then the effective
//! configuration on stdout. An unreachable upstream is a warning, here and at `serve`'s start:
//! the gateway runs without it and answers 502. So is a Redis store that does not answer; one
//! that refuses keygate's credentials or a command is an error, as it stops `serve`.

use std::io::Write as _;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, bail};

use super::{current_thread_runtime, note, source, sqlite_exists, timestamp};
use crate::config::{self, Backend, Config, FileConfig};
use crate::store::{StoreError, unix_now};
use crate::tls::{self, CertCheck};

/// Runs the checks; the report goes to stderr, the effective configuration to stdout.
pub(super) fn run(file: &FileConfig, config: &Config) -> anyhow::Result<()> {
    let mut report = vec![Finding::fine(format!("config {}", source(config)))];
    report.extend(preflight(config)?);
    report.extend(redis_access(config)?);
    // (serve logs these when it builds the CORS policy.)
    report.extend(config.cors.warnings().into_iter().map(Finding::warning));
    if let Err(e) = upstream_reachable(&config.upstream) {
        report.push(Finding::warning(format!(
            "upstream {} does not accept connections ({e}); requests get 502 until it does",
            config.upstream.url
        )));
    }

    let mut stdout = std::io::stdout().lock();
    stdout.write_all(file.to_toml().as_bytes())?;
    stdout.flush()?;
    for finding in report {
        let warning = if finding.warning { "warning: " } else { "" };
        note!("keygate: {warning}{}", finding.text);
    }
    note!("configuration {} is valid", source(config));
    Ok(())
}

/// One thing a check found that is not an error.
#[derive(Debug)]
pub(super) struct Finding {
    /// Worth a warning: the gateway runs, but not as the operator would want.
    pub(super) warning: bool,
    pub(super) text: String,
}

impl Finding {
    fn fine(text: String) -> Self {
        Self {
            warning: false,
            text,
        }
    }

    fn warning(text: String) -> Self {
        Self {
            warning: true,
            text,
        }
    }
}

/// The checks `serve` makes before it opens anything, also run by `check-config`: the key store
/// (exists, or can be created), the TLS certificate and key, the upstream's TLS files, the log
/// files' directories.
/// Returns what was found, one line each.
pub(super) fn preflight(config: &Config) -> anyhow::Result<Vec<Finding>> {
    let mut report = Vec::new();

    match &config.store.backend {
        Backend::Sqlite { path } if sqlite_exists(config, path)? => {
            let keys = crate::store::sqlite::SqliteStore::inspect(path)
                .with_context(|| format!("key store {}", config.store.backend))?;
            let plural = if keys == 1 { "" } else { "s" };
            report.push(Finding::fine(format!(
                "store {}: {keys} API key{plural}",
                config.store.backend
            )));
        }
        Backend::Sqlite { .. } => report.push(Finding::fine(format!(
            "store {}: does not exist yet (keygate serve, keys create or keys import creates it)",
            config.store.backend
        ))),
        // Tried once opened: by `serve`, and by `check-config` ([`redis_access`]).
        Backend::Redis { .. } => {}
    }

    let cert = config.tls.cert.display();
    report.push(
        match tls::check(&config.tls).context("tls.cert, tls.key")? {
            CertCheck::WillGenerate => Finding::fine(format!(
                "tls {cert}: missing; keygate serve generates a development certificate \
             (tls.generate_dev_cert = true)"
            )),
            CertCheck::Usable { not_after } if not_after <= unix_now() => {
                Finding::warning(format!(
                    "tls {cert}: the certificate expired at {}; clients refuse it",
                    timestamp(not_after)
                ))
            }
            CertCheck::Usable { not_after } => Finding::fine(format!(
                "tls {cert}: certificate and key match, valid until {}",
                timestamp(not_after)
            )),
        },
    );

    if let Some(upstream_tls) = &config.upstream.tls {
        tls::upstream_client_config(upstream_tls)?;
        report.push(Finding::fine(format!(
            "upstream TLS for {}: CA and client certificate files load",
            config.upstream.url
        )));
    }

    for (key, path) in [
        ("logging.file", &config.logging.file),
        ("logging.audit_file", &config.logging.audit_file),
    ] {
        if let Some(path) = path {
            check_file_path(key, path)?;
        }
    }
    Ok(report)
}

/// A Redis store, tried as `serve` tries it before it listens: keygate's credentials, and every
/// command it uses (on scratch keys, removed again). A refusal is the error `serve` would stop
/// with; a store that does not answer, or a replica, is a warning, as `serve` starts with it.
fn redis_access(config: &Config) -> anyhow::Result<Option<Finding>> {
    if !matches!(config.store.backend, Backend::Redis { .. }) {
        return Ok(None);
    }
    let checked = current_thread_runtime()?.block_on(async {
        let store = crate::store::open(&config.store).context("cannot open the key store")?;
        anyhow::Ok(crate::store::check_access_within(store.as_ref(), config.store.timeout).await)
    })?;
    Ok(Some(match checked {
        Ok(()) => Finding::fine(format!(
            "store {}: answers, and accepts keygate's credentials and every command it uses",
            config.store.backend
        )),
        Err(e @ (StoreError::Denied(_) | StoreError::Unauthenticated(_))) => return Err(e.into()),
        Err(e @ StoreError::ReadOnly(_)) => Finding::warning(format!(
            "{e}: serve starts on it; key changes fail until it takes writes"
        )),
        Err(e) => Finding::warning(format!("{e}: serve starts without it and reports it down")),
    }))
}

/// A file that `serve` or the CLI creates (with its directory) when it is missing: it must be
/// a file, and the nearest existing ancestor of its directory a directory.
fn check_file_path(key: &str, path: &Path) -> anyhow::Result<()> {
    if path.is_dir() {
        bail!(
            "invalid config: {key} = {:?}: expected a file, not a directory",
            path.display().to_string()
        );
    }
    let mut dir = path.parent();
    while let Some(d) = dir.filter(|d| !d.as_os_str().is_empty()) {
        if d.exists() {
            if !d.is_dir() {
                bail!(
                    "invalid config: {key} = {:?}: expected a path under a directory; {} is not one",
                    path.display().to_string(),
                    d.display()
                );
            }
            break;
        }
        dir = d.parent();
    }
    Ok(())
}

/// Connects to the upstream's address (as the readiness probe does), within its connect timeout.
fn upstream_reachable(upstream: &config::Upstream) -> std::io::Result<()> {
    use std::net::ToSocketAddrs as _;
    let (host, port) = upstream.address();
    let timeout = upstream.connect_timeout.min(Duration::from_secs(5));
    let mut last = std::io::Error::other("the host name resolves to no address");
    for addr in (host, port).to_socket_addrs()? {
        match std::net::TcpStream::connect_timeout(&addr, timeout) {
            Ok(_) => return Ok(()),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// At `serve`'s start: a warning when the upstream does not accept connections (the gateway
/// starts anyway; requests get 502 until it does).
pub(super) async fn warn_if_upstream_down(upstream: config::Upstream) {
    let url = upstream.url.to_string();
    let outcome = tokio::task::spawn_blocking(move || upstream_reachable(&upstream)).await;
    if let Ok(Err(e)) = outcome {
        tracing::warn!(
            upstream = %url,
            error = %e,
            "upstream does not accept connections; requests get 502 until it does"
        );
    }
}
