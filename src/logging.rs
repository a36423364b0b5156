//! Log output: text or JSON lines, to stdout and optionally a rotated file, written off the request
//! path by a background thread (`tracing-appender`'s non-blocking writer); and the key-management
//! audit log the CLI appends to.
//!
//! Access events use the target `keygate::access`; their fields are documented in the README.
//! No event carries a key: only its id and name.

use std::cell::RefCell;
use std::fmt::Write as _;
use std::fs::OpenOptions;
use std::io::{self, Write as _};
use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tracing_appender::non_blocking::{NonBlocking, NonBlockingBuilder, WorkerGuard};
use tracing_appender::rolling::RollingFileAppender;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::writer::MakeWriterExt as _;

use crate::config::{LogFormat, Logging, Rotation};

/// Bytes of log lines gathered into one write.
const BUFFER: usize = 64 * 1024;

/// Messages (access-line batches or single events) a writer thread may fall behind before new
/// ones are dropped rather than slow requests down: at most 64 MiB of batches, about four seconds
/// of a busy gateway's log. (tracing-appender's default, 128,000, would allow 8 GiB.)
const BACKLOG: usize = 1024;

/// A writer thread in front of `writer`, buffered by [`BUFFER`], lossy past [`BACKLOG`].
fn non_blocking<W: io::Write + Send + 'static>(writer: W) -> (NonBlocking, WorkerGuard) {
    NonBlockingBuilder::default()
        .buffered_lines_limit(BACKLOG)
        .lossy(true)
        .finish(io::BufWriter::with_capacity(BUFFER, writer))
}

/// Keeps the log writers flushing; drop it last, at exit.
#[must_use = "logs stop being written when the guard is dropped"]
pub struct LogGuard {
    _guards: Vec<WorkerGuard>,
}

/// Installs the global subscriber described by `[logging]`.
pub fn init(cfg: &Logging) -> io::Result<LogGuard> {
    let filter = EnvFilter::try_new(&cfg.level).unwrap_or_else(|_| EnvFilter::new("info"));
    // The writer thread drains many lines per wake-up: buffer them, so a burst costs one write
    // system call instead of one per line. (tracing-appender flushes whenever its queue is empty,
    // so nothing waits in the buffer while the gateway is idle.)
    let (stdout, stdout_guard) = non_blocking(io::stdout());
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
            let (writer, guard) = non_blocking(appender);
            guards.push(guard);
            Some(writer)
        }
        None => None,
    };
    let _ = ACCESS.set(AccessSink {
        format: cfg.format,
        stdout: stdout.clone(),
        file: file.clone(),
    });
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

/// The access log's fast path: lines formatted straight into a reused per-thread buffer and
/// handed to the same non-blocking writers as every other event, without tracing's field
/// visitor and serde machinery (which cost about a tenth of a worker's time under load). The
/// output is byte-for-byte the format documented in docs/logging.md. Installed by [`init`];
/// without it (keygate embedded, or in tests) [`access`] emits an ordinary tracing event with the
/// same fields.
struct AccessSink {
    format: LogFormat,
    stdout: NonBlocking,
    file: Option<NonBlocking>,
}

static ACCESS: OnceLock<AccessSink> = OnceLock::new();

/// A batching thread writes its access lines once this many bytes have gathered (the writers'
/// buffer size: a batch that fills it is written straight through, not copied into it)...
const BATCH_BYTES: usize = BUFFER;
/// ...or when its worker's flush tick comes, every this often.
pub const ACCESS_FLUSH_INTERVAL: Duration = Duration::from_millis(100);

/// A thread's access lines not yet handed to the writers.
struct Lines {
    buf: String,
    /// Lines gather until [`BATCH_BYTES`] or [`flush_access_log`]; otherwise each is written at
    /// once.
    batching: bool,
    clock: Clock,
}

impl Lines {
    fn write_out(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        if let Some(sink) = ACCESS.get() {
            // One message to each writer thread; a full queue ([`BACKLOG`]) drops it rather than
            // stall the request, as for every other event.
            let _ = sink.stdout.clone().write_all(self.buf.as_bytes());
            if let Some(file) = &sink.file {
                let _ = file.clone().write_all(self.buf.as_bytes());
            }
        }
        self.buf.clear();
    }
}

impl Drop for Lines {
    /// A thread that ends with lines gathered (a worker whose last requests outlived the drain)
    /// still writes them.
    fn drop(&mut self) {
        self.write_out();
    }
}

thread_local! {
    static LINES: RefCell<Lines> = RefCell::new(Lines {
        buf: String::with_capacity(512),
        batching: false,
        clock: Clock::default(),
    });
}

/// Makes the calling thread gather its access lines and write them in batches: each gathered
/// line then costs no hand-off to the writer thread. The thread must call [`flush_access_log`]
/// every [`ACCESS_FLUSH_INTERVAL`] and when it stops (the workers do).
pub fn batch_access_log() {
    LINES.with(|lines| {
        if let Ok(mut lines) = lines.try_borrow_mut() {
            lines.batching = true;
            lines.buf.reserve(BATCH_BYTES);
        }
    });
}

/// Writes the access lines the calling thread has gathered.
pub fn flush_access_log() {
    LINES.with(|lines| {
        if let Ok(mut lines) = lines.try_borrow_mut() {
            lines.write_out();
        }
    });
}

/// One request, as the access log records it. Field meanings: docs/logging.md.
#[derive(Debug)]
pub struct AccessRecord<'a> {
    pub request_id: &'a str,
    pub client_ip: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    pub status: u16,
    /// Logged as `latency_ms`, to the microsecond.
    pub latency: Duration,
    pub outcome: &'a str,
    pub auth: Option<&'a str>,
    pub reason: &'a str,
    pub key_id: Option<&'a str>,
    pub key_name: Option<&'a str>,
    pub user_agent: Option<&'a str>,
    pub cause: Option<&'a str>,
}

/// Writes the access line for `record` (the caller checks that the access log is enabled). With
/// keygate's own logging installed the line is formatted here; otherwise (keygate embedded, or in
/// tests) it becomes an ordinary tracing event with the same fields.
pub fn access(record: &AccessRecord<'_>) {
    if !write_access(record) {
        tracing::info!(
            target: "keygate::access",
            request_id = record.request_id,
            client_ip = %record.client_ip,
            method = %record.method,
            path = record.path,
            status = record.status,
            latency_ms = record.latency.as_micros() as f64 / 1000.0,
            outcome = record.outcome,
            auth = record.auth,
            reason = record.reason,
            key_id = record.key_id,
            key_name = record.key_name,
            user_agent = record.user_agent,
            cause = record.cause,
            "request"
        );
    }
}

/// The fast path; `false` when it is not installed (or the thread's buffer is in use).
fn write_access(record: &AccessRecord<'_>) -> bool {
    let Some(sink) = ACCESS.get() else {
        return false;
    };
    LINES.with(|lines| {
        let Ok(mut lines) = lines.try_borrow_mut() else {
            return false;
        };
        let lines = &mut *lines;
        let now = SystemTime::now();
        match sink.format {
            LogFormat::Json => json_line(&mut lines.buf, &mut lines.clock, now, record),
            LogFormat::Text => text_line(&mut lines.buf, &mut lines.clock, now, record),
        }
        if !lines.batching || lines.buf.len() >= BATCH_BYTES {
            lines.write_out();
        }
        true
    })
}

fn json_line(out: &mut String, clock: &mut Clock, now: SystemTime, r: &AccessRecord<'_>) {
    out.push_str("{\"timestamp\":\"");
    clock.write(out, now);
    out.push_str("\",\"level\":\"INFO\",\"message\":\"request\"");
    json_field(out, "request_id", r.request_id);
    json_field(out, "client_ip", r.client_ip);
    json_field(out, "method", r.method);
    json_field(out, "path", r.path);
    out.push_str(",\"status\":");
    out.push_str(itoa::Buffer::new().format(r.status));
    out.push_str(",\"latency_ms\":");
    write_millis(out, r.latency);
    json_field(out, "outcome", r.outcome);
    if let Some(auth) = r.auth {
        json_field(out, "auth", auth);
    }
    json_field(out, "reason", r.reason);
    for (name, value) in [
        ("key_id", r.key_id),
        ("key_name", r.key_name),
        ("user_agent", r.user_agent),
        ("cause", r.cause),
    ] {
        if let Some(v) = value {
            json_field(out, name, v);
        }
    }
    out.push_str(",\"target\":\"keygate::access\"}\n");
}

/// `d` in milliseconds to the microsecond: `12.345`, `0.042`.
fn write_millis(out: &mut String, d: Duration) {
    let micros = d.as_micros();
    out.push_str(itoa::Buffer::new().format(micros / 1000));
    out.push('.');
    push_padded(out, (micros % 1000) as u32, 3);
}

/// `n` as exactly `width` decimal digits, zero-padded (`n` must fit).
fn push_padded(out: &mut String, n: u32, width: u32) {
    let mut divisor = 10u32.pow(width - 1);
    while divisor > 0 {
        out.push(char::from(b'0' + (n / divisor % 10) as u8));
        divisor /= 10;
    }
}

/// The access log's clock: RFC 3339 UTC timestamps with microseconds, as humantime writes them,
/// with the date and time of day formatted once a second rather than once a line.
#[derive(Default)]
struct Clock {
    second: u64,
    /// `YYYY-MM-DDTHH:MM:SS` of `second`; empty until the first line.
    formatted: String,
}

impl Clock {
    fn write(&mut self, out: &mut String, at: SystemTime) {
        let since = at.duration_since(UNIX_EPOCH).unwrap_or_default();
        if self.formatted.is_empty() || since.as_secs() != self.second {
            self.second = since.as_secs();
            let whole = UNIX_EPOCH + Duration::from_secs(self.second);
            self.formatted.clear();
            let _ = write!(
                self.formatted,
                "{}",
                humantime::format_rfc3339_seconds(whole)
            );
            self.formatted.pop(); // the "Z"
        }
        out.push_str(&self.formatted);
        out.push('.');
        push_padded(out, since.subsec_micros(), 6);
        out.push('Z');
    }
}

fn json_field(out: &mut String, name: &str, value: &str) {
    out.push_str(",\"");
    out.push_str(name);
    out.push_str("\":\"");
    json_escape(out, value);
    out.push('"');
}

/// Bytes that must be escaped inside a JSON string (and DEL, which the documented format escapes
/// too).
static JSON_ESCAPE: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 0x20 {
        table[b] = true;
        b += 1;
    }
    table[b'"' as usize] = true;
    table[b'\\' as usize] = true;
    table[0x7f] = true;
    table
};

/// Where the first byte that JSON needs escaped is ([`JSON_ESCAPE`]), looked for eight bytes at a
/// time. Per word, a byte's high bit is set in `hits` when it is below 0x20 or equal to `"`, `\`
/// or DEL. These tests can also flag a byte above a true match (a borrow runs upward), never below
/// one, so the lowest flagged byte is the first match. Bytes from 0x80 up are never flagged.
fn first_to_escape(bytes: &[u8]) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    let equal = |word: u64, byte: u8| {
        let x = word ^ (ONES * u64::from(byte));
        x.wrapping_sub(ONES) & !x
    };
    let mut words = bytes.chunks_exact(8);
    let mut start = 0;
    for chunk in words.by_ref() {
        let word = u64::from_le_bytes(chunk.try_into().expect("eight bytes"));
        let below_space = word.wrapping_sub(ONES * 0x20) & !word;
        let hits =
            (below_space | equal(word, b'"') | equal(word, b'\\') | equal(word, 0x7f)) & HIGHS;
        if hits != 0 {
            return Some(start + hits.trailing_zeros() as usize / 8);
        }
        start += 8;
    }
    words
        .remainder()
        .iter()
        .position(|&b| JSON_ESCAPE[usize::from(b)])
        .map(|i| start + i)
}

/// Appends `value` as the inside of a JSON string. Runs that need no escaping (nearly every
/// value) are copied whole; everything escaped is ASCII, so the slice bounds are char bounds.
fn json_escape(out: &mut String, value: &str) {
    let mut copied = 0;
    let bytes = value.as_bytes();
    while let Some(offset) = first_to_escape(&bytes[copied..]) {
        let i = copied + offset;
        out.push_str(&value[copied..i]);
        match bytes[i] {
            b'"' => out.push_str("\\\""),
            b'\\' => out.push_str("\\\\"),
            b'\n' => out.push_str("\\n"),
            b'\r' => out.push_str("\\r"),
            b'\t' => out.push_str("\\t"),
            b => {
                let _ = write!(out, "\\u{b:04x}");
            }
        }
        copied = i + 1;
    }
    out.push_str(&value[copied..]);
}

fn text_line(out: &mut String, clock: &mut Clock, now: SystemTime, r: &AccessRecord<'_>) {
    // tracing's text format: Display (`%`) fields bare, string fields Debug-quoted and escaped.
    clock.write(out, now);
    let _ = write!(
        out,
        "  INFO keygate::access: request request_id={:?} client_ip={} method={} path={:?} \
         status={} latency_ms=",
        r.request_id, r.client_ip, r.method, r.path, r.status
    );
    write_millis(out, r.latency);
    let _ = write!(out, " outcome={:?}", r.outcome);
    if let Some(auth) = r.auth {
        let _ = write!(out, " auth={auth:?}");
    }
    let _ = write!(out, " reason={:?}", r.reason);
    for (name, value) in [
        ("key_id", r.key_id),
        ("key_name", r.key_name),
        ("user_agent", r.user_agent),
        ("cause", r.cause),
    ] {
        if let Some(v) = value {
            let _ = write!(out, " {name}={v:?}");
        }
    }
    out.push('\n');
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

/// Holds a repeated warning to one line per interval: the first occurrence is logged at once,
/// repeats within the interval are counted, and the next line says how many were suppressed. A
/// failing dependency (Redis down) would otherwise log a line per retry, several a second.
#[derive(Debug)]
pub struct Throttle {
    every: Duration,
    /// When the last line was let through, and the repeats held back since.
    state: std::sync::Mutex<(Option<std::time::Instant>, u64)>,
}

impl Throttle {
    /// At most one line per `every`.
    pub const fn new(every: Duration) -> Self {
        Self {
            every,
            state: std::sync::Mutex::new((None, 0)),
        }
    }

    /// `Some(suppressed)` when a line may be logged now (with the number of repeats held back
    /// since the last one), `None` when this repeat is to be held back.
    pub fn allow(&self) -> Option<u64> {
        let Ok(mut state) = self.state.lock() else {
            return Some(0);
        };
        let now = std::time::Instant::now();
        match state.0 {
            Some(last) if now.duration_since(last) < self.every => {
                state.1 += 1;
                None
            }
            _ => {
                let suppressed = std::mem::take(&mut state.1);
                state.0 = Some(now);
                Some(suppressed)
            }
        }
    }

    /// A line about the condition was just logged elsewhere: the next one is let through one
    /// interval from now.
    pub fn hold(&self) {
        if let Ok(mut state) = self.state.lock() {
            *state = (Some(std::time::Instant::now()), 0);
        }
    }

    /// The condition ended: its next occurrence is logged at once. Returns the repeats held back
    /// since the last line.
    pub fn reset(&self) -> u64 {
        let Ok(mut state) = self.state.lock() else {
            return 0;
        };
        state.0 = None;
        std::mem::take(&mut state.1)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_throttle_lets_one_line_through_per_interval_and_counts_the_rest() {
        let throttle = super::Throttle::new(Duration::from_millis(200));
        assert_eq!(throttle.allow(), Some(0));
        assert_eq!(throttle.allow(), None);
        assert_eq!(throttle.allow(), None);
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(
            throttle.allow(),
            Some(2),
            "the next line counts what was held back"
        );
        assert_eq!(throttle.allow(), None);
        assert_eq!(throttle.reset(), 1);
        assert_eq!(
            throttle.allow(),
            Some(0),
            "after a reset the next line goes at once"
        );
    }
    use super::*;

    fn record<'a>(path: &'a str, agent: Option<&'a str>) -> AccessRecord<'a> {
        AccessRecord {
            request_id: "7f3c9a2e-frontend",
            client_ip: "127.0.0.1",
            method: "GET",
            path,
            status: 200,
            latency: Duration::from_nanos(8_845_426),
            outcome: "forwarded",
            auth: Some("ok"),
            reason: "ok",
            key_id: Some("key_SuOG3wMXJAa3"),
            key_name: Some("frontend"),
            user_agent: agent,
            cause: None,
        }
    }

    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_micros(1_795_817_451_514_937)
    }

    #[test]
    fn json_lines_are_the_documented_format() {
        let mut line = String::new();
        json_line(
            &mut line,
            &mut Clock::default(),
            now(),
            &record("/index.html", Some("frontend/2.1")),
        );
        // The line docs/logging.md shows, as tracing-subscriber's JSON formatter wrote it.
        assert_eq!(
            line,
            "{\"timestamp\":\"2026-11-27T22:10:51.514937Z\",\"level\":\"INFO\",\"message\":\"request\",\
             \"request_id\":\"7f3c9a2e-frontend\",\"client_ip\":\"127.0.0.1\",\"method\":\"GET\",\
             \"path\":\"/index.html\",\"status\":200,\"latency_ms\":8.845,\"outcome\":\"forwarded\",\
             \"auth\":\"ok\",\"reason\":\"ok\",\"key_id\":\"key_SuOG3wMXJAa3\",\"key_name\":\"frontend\",\
             \"user_agent\":\"frontend/2.1\",\"target\":\"keygate::access\"}\n"
        );
    }

    #[test]
    fn json_strings_are_escaped_and_absent_fields_omitted() {
        let mut line = String::new();
        let odd = "/a\"b\\c\u{1}\té";
        json_line(&mut line, &mut Clock::default(), now(), &record(odd, None));
        assert_eq!(line.matches('\n').count(), 1);
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["path"], odd);
        assert!(v.get("user_agent").is_none() && v.get("cause").is_none());
    }

    #[test]
    fn json_escaping_round_trips_every_kind_of_character() {
        let cases = [
            "",
            "plain",
            "\"",
            "\\",
            "a\"b\\c\nd\re\tf",
            "\u{0}\u{1f}\u{7f}",
            "\u{1}start and end\u{1}",
            "é∂😀 mixed \" with \u{2} escapes",
        ];
        for case in cases {
            let mut out = String::from("\"");
            json_escape(&mut out, case);
            out.push('"');
            let back: String = serde_json::from_str(&out).unwrap();
            assert_eq!(back, case, "{out}");
            assert!(!out.chars().any(|c| c.is_control()), "{out:?}");
        }
    }

    #[test]
    fn text_lines_quote_strings_and_never_break_a_line() {
        let mut line = String::new();
        text_line(
            &mut line,
            &mut Clock::default(),
            now(),
            &record("/a b\r\nX: y", Some("curl/7.88.1")),
        );
        assert_eq!(
            line,
            "2026-11-27T22:10:51.514937Z  INFO keygate::access: request request_id=\"7f3c9a2e-frontend\" \
             client_ip=127.0.0.1 method=GET path=\"/a b\\r\\nX: y\" status=200 latency_ms=8.845 \
             outcome=\"forwarded\" auth=\"ok\" reason=\"ok\" key_id=\"key_SuOG3wMXJAa3\" \
             key_name=\"frontend\" user_agent=\"curl/7.88.1\"\n"
        );
    }

    #[test]
    fn the_clock_writes_what_humantime_writes_across_seconds() {
        let mut clock = Clock::default();
        let start = now();
        // Steps of 0.3 s, 1 µs and whole days: the cached second is reused, then replaced.
        for step in [
            Duration::from_millis(300),
            Duration::from_micros(1),
            Duration::from_secs(86_400),
        ] {
            for i in 0..12 {
                let at = start + step * i;
                let mut out = String::new();
                clock.write(&mut out, at);
                assert_eq!(out, humantime::format_rfc3339_micros(at).to_string());
            }
        }
        let mut out = String::new();
        clock.write(&mut out, UNIX_EPOCH + Duration::from_micros(7));
        assert_eq!(out, "1970-01-01T00:00:00.000007Z");
    }

    #[test]
    fn latency_is_milliseconds_to_the_microsecond() {
        for (latency, text) in [
            (Duration::ZERO, "0.000"),
            (Duration::from_nanos(999), "0.000"),
            (Duration::from_micros(42), "0.042"),
            (Duration::from_micros(1_500), "1.500"),
            (Duration::from_nanos(8_845_426), "8.845"),
            (Duration::from_secs(61), "61000.000"),
        ] {
            let mut out = String::new();
            write_millis(&mut out, latency);
            assert_eq!(out, text);
            assert!(serde_json::from_str::<f64>(&out).is_ok());
        }
    }

    #[test]
    fn the_word_scan_finds_what_the_table_finds() {
        let reference = |b: &[u8]| b.iter().position(|&c| JSON_ESCAPE[usize::from(c)]);
        // Every byte value at every position of words and remainders, alone and after another.
        for len in 1..=19 {
            for at in 0..len {
                for byte in 0..=255u8 {
                    let mut buf = vec![b'a'; len];
                    buf[at] = byte;
                    assert_eq!(first_to_escape(&buf), reference(&buf), "{buf:?}");
                    for later in at + 1..len {
                        let mut two = buf.clone();
                        two[later] = b'"';
                        assert_eq!(first_to_escape(&two), reference(&two), "{two:?}");
                    }
                }
            }
        }
        // Bytes that borrow into their neighbours: zero, 0x20, 0x21, 0x80 and up.
        for buf in [
            &b"\x00\x20\x21\x80\xff\x22\x5c\x7f"[..],
            b"\x20\x20\x20\x20\x20\x20\x20\x1f",
            b"\x80\x81\xa0\xa2\xdc\xff\x7e\x5d\x23",
            b"",
        ] {
            assert_eq!(first_to_escape(buf), reference(buf), "{buf:?}");
        }
    }
}
