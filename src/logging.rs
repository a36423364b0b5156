//! Log output: text or JSON lines, to stdout and optionally a rotated file, written off the request
//! path by a background thread (`tracing-appender`'s non-blocking writer); and the key-management
//! audit log the CLI appends to.
//!
//! Access events use the target `keygate::access`; their fields are documented in the README.
//! No event carries a key: only its id and name.

use std::fs::OpenOptions;
use std::io::{self, Write as _};
use std::path::Path;

use serde::Serialize;
use tracing_appender::non_blocking::WorkerGuard;
use tracing_appender::rolling::RollingFileAppender;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::writer::MakeWriterExt as _;

use crate::config::{LogFormat, Logging, Rotation};

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
            let dir = path
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            std::fs::create_dir_all(dir)?;
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .ok_or_else(|| io::Error::other("logging.file has no file name"))?;
            let rotation = match cfg.rotation {
                Rotation::Daily => tracing_appender::rolling::Rotation::DAILY,
                Rotation::Hourly => tracing_appender::rolling::Rotation::HOURLY,
                Rotation::Never => tracing_appender::rolling::Rotation::NEVER,
            };
            // Rotated files are named <file>.<date>[-<hour>]; with "never", <file> itself.
            let mut builder = RollingFileAppender::builder()
                .rotation(rotation)
                .filename_prefix(name);
            if cfg.max_files > 0 {
                builder = builder.max_log_files(cfg.max_files);
            }
            let appender = builder.build(dir).map_err(io::Error::other)?;
            let (writer, guard) = tracing_appender::non_blocking(appender);
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

/// One key-management event, as a line of the audit log.
#[derive(Debug, Serialize)]
pub struct AuditEvent<'a> {
    /// RFC 3339, UTC.
    pub timestamp: String,
    /// `created`, `revoked`, `enabled`, `deleted`, `rotated`, `imported`.
    pub event: &'a str,
    /// The key's id (for `imported`: absent).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_id: Option<&'a str>,
    /// The key's name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_name: Option<&'a str>,
    /// Who ran the command: `SUDO_USER`, else `USER`, else `LOGNAME`.
    pub actor: String,
    /// The host it ran on.
    pub host: String,
    /// Event details (for `rotated`: the new key's id; for `imported`: counts and file).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl<'a> AuditEvent<'a> {
    /// An event about one key, stamped now, by the current user on this host.
    pub fn new(event: &'a str, key_id: Option<&'a str>, key_name: Option<&'a str>) -> Self {
        let actor = ["SUDO_USER", "USER", "LOGNAME"]
            .iter()
            .find_map(|v| std::env::var(v).ok().filter(|s| !s.is_empty()))
            .unwrap_or_else(|| "unknown".into());
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .or_else(|_| std::fs::read_to_string("/etc/hostname"))
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| "unknown".into());
        Self {
            timestamp: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
            event,
            key_id,
            key_name,
            actor,
            host,
            detail: None,
        }
    }

    /// Appends the event to `path` (created with mode 0640) as one JSON line.
    pub fn append(&self, path: &Path) -> io::Result<()> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let mut options = OpenOptions::new();
        options.create(true).append(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt as _;
            options.mode(0o640);
        }
        let mut line = serde_json::to_vec(self).map_err(io::Error::other)?;
        line.push(b'\n');
        // One write of a whole line: concurrent CLI runs append whole lines (O_APPEND).
        options.open(path)?.write_all(&line)
    }
}
