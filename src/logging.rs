//! Log output: text or JSON lines, to stdout and optionally a file, written off the request path
//! by a background thread (`tracing-appender`'s non-blocking writer).
//!
//! Access events use the target `keygate::access`; their fields are documented in the README.
//! No event carries a key: only its id and name.

use std::fs::OpenOptions;
use std::io;

use tracing_appender::non_blocking::WorkerGuard;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::writer::MakeWriterExt as _;

use crate::config::{LogFormat, Logging};

/// Keeps the log writers flushing; drop it last, at exit.
#[must_use = "logs stop being written when the guard is dropped"]
pub struct LogGuard {
    _guards: Vec<WorkerGuard>,
}

/// Installs the global subscriber described by `[logging]`.
pub fn init(cfg: &Logging) -> io::Result<LogGuard> {
    let filter = EnvFilter::try_new(&cfg.level).unwrap_or_else(|_| EnvFilter::new("info"));
    let (stdout, stdout_guard) = tracing_appender::non_blocking(io::stdout());
    let mut guards = vec![stdout_guard];
    let file = match &cfg.file {
        Some(path) => {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)?;
            }
            let f = OpenOptions::new().create(true).append(true).open(path)?;
            let (writer, guard) = tracing_appender::non_blocking(f);
            guards.push(guard);
            Some(writer)
        }
        None => None,
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(true);
    let result = match (cfg.format, file) {
        (LogFormat::Json, Some(f)) => builder
            .json()
            .flatten_event(true)
            .with_writer(stdout.and(f))
            .try_init(),
        (LogFormat::Json, None) => builder
            .json()
            .flatten_event(true)
            .with_writer(stdout)
            .try_init(),
        (LogFormat::Text, Some(f)) => builder
            .with_ansi(false)
            .with_writer(stdout.and(f))
            .try_init(),
        (LogFormat::Text, None) => builder.with_ansi(false).with_writer(stdout).try_init(),
    };
    result.map_err(|e| io::Error::other(e.to_string()))?;
    Ok(LogGuard { _guards: guards })
}
