//! The `keygate` command line: `serve`, `check-config`, key management on the configured
//! store (safe while the gateway runs: every change goes through the store's change feed), and
//! shell completions.
//!
//! A new key is printed once, alone on stdout, at creation; nothing prints it again. Every
//! command works on the store its config file names (relative paths are relative to that file),
//! and only the commands that add keys, and `serve`, create a store that does not exist. Errors
//! are one line; output into a pipe whose reader has gone ends quietly.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use clap::{Args, CommandFactory as _, Parser, Subcommand};

use crate::config::{Backend, Config, FileConfig, ProcessEnv};
use crate::logging::AuditEvent;
use crate::store;

mod backup;
mod check;
mod keys;
mod store_cmd;

/// Writes a line to stderr. Unlike `eprintln!`, a closed or broken stderr is not a panic.
macro_rules! note {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}
pub(crate) use note;

/// The last second an RFC 3339 timestamp can show, 9999-12-31T23:59:59Z: no time the CLI
/// stores or shows is later.
const MAX_TIMESTAMP: i64 = 253_402_300_799;

/// Unix seconds as RFC 3339. A time past [`MAX_TIMESTAMP`] (written to the store by something
/// other than this CLI) is shown as seconds rather than failing the command.
fn timestamp(secs: i64) -> String {
    if secs > MAX_TIMESTAMP {
        return format!("{secs} (Unix seconds, after 9999-12-31)");
    }
    let t = UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).unwrap_or(0));
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Appends to the audit log, if one is configured. A failure to write it is reported, but does
/// not undo the change (and must not hide a key that was just printed).
fn audit(path: Option<&Path>, event: AuditEvent<'_>) {
    if let Some(path) = path
        && let Err(e) = event.append(path)
    {
        note!(
            "keygate: warning: audit log {} not written: {e}",
            path.display()
        );
    }
}

/// keygate: API-key authentication gateway.
#[derive(Debug, Parser)]
#[command(name = "keygate", version, about)]
pub struct Cli {
    /// Configuration file; relative paths in it are resolved against its directory.
    #[arg(
        long,
        global = true,
        env = "KEYGATE_CONFIG",
        default_value = "gateway.toml"
    )]
    pub config: PathBuf,
    /// Say on stderr which configuration file and key store the command uses.
    #[arg(long, short, global = true)]
    pub verbose: bool,
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway.
    Serve,
    /// Check the configuration as `serve` would (certificate, key store, log paths: every
    /// check short of binding the ports) and print it as the gateway would use it.
    CheckConfig,
    /// Manage API keys in the configured store.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Inspect the configured store, or accept its data after it was found lost.
    #[command(subcommand)]
    Store(StoreCommand),
    /// Print a shell completion script (e.g. `keygate completions bash >
    /// /etc/bash_completion.d/keygate`).
    Completions(CompletionsArgs),
}

/// `keygate store ...`.
#[derive(Debug, Subcommand)]
pub enum StoreCommand {
    /// The store's identity marker, change counter, active keys and whether it takes writes.
    Status(JsonFlag),
    /// Vouch for the store's data as it is now (after restoring it, or checking a rollback):
    /// raises its identity marker's generation, and gateways that found it lost use it again.
    Accept,
}

/// `keygate completions` options.
#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell.
    pub shell: clap_complete::Shell,
}

/// `keygate keys ...`.
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create a key; prints the key alone on stdout (once), details on stderr.
    Create(CreateArgs),
    /// List keys: id, name, hint, status, created, last used, expiry.
    List(JsonFlag),
    /// Show one key.
    Show(Target),
    /// Deactivate a key (emergency revocation; running gateways refuse it within a second).
    Revoke(Target),
    /// Re-activate a revoked key.
    Enable(Target),
    /// Delete a key permanently.
    Delete(Target),
    /// Usage report: last use, never-used and stale keys (the old monitor_api_usage).
    Usage(UsageArgs),
    /// Replace a key with a new one (same name and policy); the old key keeps working until the
    /// grace period ends. Prints the new key alone on stdout, once.
    Rotate(RotateArgs),
    /// Back up every key record (digests, never keys) as JSON.
    Export(ExportArgs),
    /// Restore an export, or import a Django `dumpdata users.APIKey` file (plaintext keys are
    /// hashed). All records or none; records already present are skipped.
    Import(ImportArgs),
}

/// `keys rotate` options.
#[derive(Debug, Args)]
pub struct RotateArgs {
    /// The key's id or name.
    pub key: String,
    /// How long the old key keeps working (0s: refused at once; at most 36500d).
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    pub grace: Duration,
    /// Print the new key and its details as one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
}

/// `keys export` options.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// Write to this file (created with mode 0600) instead of stdout.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// `keys import` options.
#[derive(Debug, Args)]
pub struct ImportArgs {
    /// A keygate export, or a Django dumpdata JSON file; "-" reads standard input.
    pub file: PathBuf,
    /// Django dumps: write the map from each record's Django pk to its keygate id to this file
    /// (JSON, mode 0600) instead of printing it on stdout.
    #[arg(long, value_name = "FILE")]
    pub map: Option<PathBuf>,
}

/// `keys create` options.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Unique name (letters, digits, space, '.', '_', '-'; at most 64).
    #[arg(long)]
    pub name: String,
    /// Expire the key after this long (e.g. 90d; above 0s, at most 36500d).
    #[arg(long, value_parser = parse_lifetime, conflicts_with = "expires_at")]
    pub expires_in: Option<Duration>,
    /// Expire the key at this time (RFC 3339, e.g. 2027-03-01T00:00:00Z).
    #[arg(long, value_parser = parse_time)]
    pub expires_at: Option<i64>,
    /// Allow only these requests: "/path/prefix" or "METHOD:/path/prefix" (repeatable).
    #[arg(long = "allow", value_name = "[METHOD:]PREFIX")]
    pub allow: Vec<String>,
    /// Allow only clients in these networks: CIDR or address, IPv4 or IPv6 (repeatable).
    #[arg(long = "allow-ip", value_name = "CIDR")]
    pub allow_ips: Vec<String>,
    /// This key's rate limit, e.g. 600/min (overrides [rate_limit] per_key).
    #[arg(long)]
    pub rate: Option<String>,
    /// Who the key belongs to, e.g. the Django user's id or username; sent upstream as
    /// X-Api-Key-Owner.
    #[arg(long, value_parser = parse_owner)]
    pub owner: Option<String>,
    /// Print the key and its details as one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
}

/// `--json`.
#[derive(Debug, Args)]
pub struct JsonFlag {
    /// JSON output.
    #[arg(long)]
    pub json: bool,
}

/// A key by id or name.
#[derive(Debug, Args)]
pub struct Target {
    /// The key's id or name.
    pub key: String,
    /// JSON output.
    #[arg(long)]
    pub json: bool,
}

/// `keys usage` options.
#[derive(Debug, Args)]
pub struct UsageArgs {
    /// Warn about keys not used for longer than this.
    #[arg(long, default_value = "7d", value_parser = parse_duration)]
    pub stale_after: Duration,
    /// JSON output.
    #[arg(long)]
    pub json: bool,
}

fn parse_owner(s: &str) -> Result<String, String> {
    crate::store::check_owner(s).map(|()| s.to_owned())
}

fn parse_time(s: &str) -> Result<i64, String> {
    backup::parse_datetime(s)
        .filter(|t| (0..=MAX_TIMESTAMP).contains(t))
        .ok_or_else(|| format!("'{s}' is not an RFC 3339 time such as 2027-03-01T00:00:00Z"))
}

/// The longest duration a flag takes: a key's lifetime, a rotation's grace, the staleness
/// threshold. Every time computed from it stays far inside what the CLI can show.
const MAX_FLAG_DURATION: Duration = Duration::from_secs(36_500 * 86_400);

fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s)
        .map_err(|_| format!("'{s}' is not a duration such as 7d, 12h or 90m"))?;
    if d > MAX_FLAG_DURATION {
        return Err(format!("'{s}' is too long: at most 36500d (100 years)"));
    }
    Ok(d)
}

/// A key's lifetime: above zero (a key that expires as it is made is a mistake).
fn parse_lifetime(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d.as_secs() == 0 {
        return Err(format!(
            "'{s}' would create an expired key: expected at least 1s, e.g. 90d"
        ));
    }
    Ok(d)
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(&e),
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        // The reader went away (`keygate keys usage | head -1`): stop quietly, as a CLI does.
        Err(e) if broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the chain of causes, joined.
            note!("keygate: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Help and version go to stdout; a usage error is one line on stderr, like every other error.
fn usage_error(e: &clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        let _ = e.print();
        return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2));
    }
    let text = e.render().to_string();
    let line = text
        .lines()
        .map(str::trim)
        .filter(|l| {
            !l.is_empty() && !l.starts_with("Usage:") && !l.starts_with("For more information")
        })
        .collect::<Vec<_>>()
        .join(" ");
    note!(
        "keygate: error: {} (see keygate --help)",
        line.trim_start_matches("error: ")
    );
    ExitCode::from(2)
}

/// Whether `e` is, at its root, a write to a pipe whose reader has gone.
fn broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

fn load_config(path: &Path) -> anyhow::Result<(FileConfig, Config)> {
    let file = FileConfig::load(path, &ProcessEnv)?;
    let config = file.validate()?;
    Ok((file, config))
}

/// The config file, as commands name it.
fn source(config: &Config) -> String {
    config
        .source
        .as_deref()
        .map_or_else(|| "-".to_owned(), |p| p.display().to_string())
}

/// Where `store.path` came from, as config errors say it: `from KEYGATE_STORE_PATH` when the
/// environment set it (it overrides the file), else `in <config file>`.
fn store_path_origin(config: &Config) -> String {
    match std::env::var_os("KEYGATE_STORE_PATH") {
        Some(_) => "from KEYGATE_STORE_PATH".to_owned(),
        None => format!("in {}", source(config)),
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    if let Command::Completions(args) = &cli.command {
        // Generated into memory: clap_complete panics on a failed write.
        let mut script = Vec::new();
        clap_complete::generate(args.shell, &mut Cli::command(), "keygate", &mut script);
        let mut stdout = std::io::stdout().lock();
        stdout.write_all(&script)?;
        return Ok(stdout.flush()?);
    }
    let (file, config) = load_config(&cli.config)?;
    if cli.verbose {
        note!(
            "keygate: config {}; store {}",
            source(&config),
            config.store.backend
        );
    }
    match cli.command {
        Command::Serve => serve(config),
        Command::CheckConfig => check::run(&file, &config),
        Command::Keys(cmd) => {
            let runtime = current_thread_runtime()?;
            let creates = matches!(cmd, KeysCommand::Create(_) | KeysCommand::Import(_));
            let prepared = keys::prepare(&cmd)?;
            runtime.block_on(async {
                let store = open_store(&config, creates)?;
                keys::run(cmd, prepared, &store, config.logging.audit_file.as_deref()).await
            })
        }
        Command::Store(cmd) => current_thread_runtime()?.block_on(async {
            let opened = open_store(&config, false)?;
            store_cmd::run(cmd, &opened, config.logging.audit_file.as_deref()).await
        }),
        Command::Completions(_) => Ok(()),
    }
}

/// The runtime a command that talks to the store runs on.
fn current_thread_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")
}

/// Opens the configured store. A SQLite file that does not exist is created only by commands
/// that add keys (`create_ok`) and by `serve`, and never in a directory that does not exist: a
/// command run with the wrong configuration must not work on a new, empty store of its own.
fn open_store(config: &Config, create_ok: bool) -> anyhow::Result<store::SharedStore> {
    if let Backend::Sqlite { path } = &config.store.backend
        && !sqlite_exists(config, path)?
    {
        if !create_ok {
            bail!(
                "no key store at {} (store.path {}): check --config, or create it with \
                 keygate keys create, keygate keys import or keygate serve",
                path.display(),
                store_path_origin(config)
            );
        }
        note!(
            "keygate: creating a new, empty key store at {}",
            path.display()
        );
    }
    store::open(&config.store).context("cannot open the key store")
}

/// Whether the SQLite store exists; an error when it does not and cannot be created because its
/// directory is missing.
fn sqlite_exists(config: &Config, path: &Path) -> anyhow::Result<bool> {
    if path.exists() {
        return Ok(true);
    }
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    if let Some(dir) = dir
        && !dir.is_dir()
    {
        bail!(
            "invalid config: store.path = {:?} ({}): expected a file in an existing \
             directory; {} does not exist",
            path.display().to_string(),
            store_path_origin(config),
            dir.display()
        );
    }
    Ok(false)
}

fn serve(config: Config) -> anyhow::Result<()> {
    // What check-config checks, before anything is opened or created.
    let findings = check::preflight(&config)?;
    let _log = crate::logging::init(&config.logging).context("cannot set up logging")?;
    for finding in findings.iter().filter(|f| f.warning) {
        tracing::warn!("{}", finding.text);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    runtime.block_on(async {
        let created = match &config.store.backend {
            Backend::Sqlite { path } => !sqlite_exists(&config, path)?,
            Backend::Redis { .. } => false,
        };
        let store = store::open(&config.store).context("cannot open the key store")?;
        if created {
            tracing::warn!(
                store = %config.store.backend,
                "created a new, empty key store: every key is refused until keys are created or imported"
            );
        }
        let listeners = crate::server::Listeners::bind(&config.server)?;
        tokio::spawn(check::warn_if_upstream_down(config.upstream.clone()));
        let (shutdown, cut_short) = shutdown_signals()?;
        crate::server::run_until(config, store, listeners, shutdown, cut_short).await?;
        Ok(())
    })
}

/// Two futures: the first resolves on SIGTERM or SIGINT (start the drain), the second on the
/// next one (end the drain at once).
fn shutdown_signals() -> anyhow::Result<(
    impl Future<Output = ()> + Send + 'static,
    impl Future<Output = ()> + Send + 'static,
)> {
    let (count_tx, count) = tokio::sync::watch::channel(0u32);
    let mut signals = Signals::new().context("cannot listen for signals")?;
    tokio::spawn(async move {
        loop {
            signals.recv().await;
            count_tx.send_modify(|n| *n += 1);
        }
    });
    let nth = |n: u32| {
        let mut count = count.clone();
        async move {
            let _ = count.wait_for(|seen| *seen >= n).await;
        }
    };
    Ok((nth(1), nth(2)))
}

/// SIGTERM and SIGINT (Ctrl-C).
struct Signals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> std::io::Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Ok(Self {
                term: signal(SignalKind::terminate())?,
                int: signal(SignalKind::interrupt())?,
            })
        }
        #[cfg(not(unix))]
        Ok(Self {})
    }

    async fn recv(&mut self) {
        #[cfg(unix)]
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
    }
}
