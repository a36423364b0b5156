//! The `keygate` command line: `serve`, `check-config`, and key management on the configured
//! store (safe while the gateway runs: every change goes through the store's change feed).
//!
//! A new key is printed once, alone on stdout, at creation; nothing prints it again.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};

use crate::config::{Config, FileConfig, ProcessEnv};
use crate::store;

mod backup;
mod keys;

/// keygate: API-key authentication gateway.
#[derive(Debug, Parser)]
#[command(name = "keygate", version, about)]
pub struct Cli {
    /// Configuration file.
    #[arg(
        long,
        global = true,
        env = "KEYGATE_CONFIG",
        default_value = "gateway.toml"
    )]
    pub config: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway.
    Serve,
    /// Validate the configuration and print it as the gateway would use it.
    CheckConfig,
    /// Manage API keys in the configured store.
    #[command(subcommand)]
    Keys(KeysCommand),
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
    /// How long the old key keeps working (0s: refused at once).
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
    /// A keygate export, or a Django dumpdata JSON file.
    pub file: PathBuf,
}

/// `keys create` options.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Unique name (letters, digits, space, '.', '_', '-'; at most 64).
    #[arg(long)]
    pub name: String,
    /// Expire the key after this long (e.g. 90d).
    #[arg(long, value_parser = parse_duration, conflicts_with = "expires_at")]
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

fn parse_time(s: &str) -> Result<i64, String> {
    backup::parse_datetime(s)
        .ok_or_else(|| format!("'{s}' is not an RFC 3339 time such as 2027-03-01T00:00:00Z"))
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|_| format!("'{s}' is not a duration such as 7d, 12h or 90m"))
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the chain of causes, joined.
            eprintln!("keygate: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn load_config(path: &Path) -> anyhow::Result<(FileConfig, Config)> {
    let file = FileConfig::load(path, &ProcessEnv)?;
    let config = file.validate()?;
    Ok((file, config))
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let (file, config) = load_config(&cli.config)?;
    match cli.command {
        Command::Serve => serve(config),
        Command::CheckConfig => {
            print!("{}", file.to_toml());
            eprintln!("configuration {} is valid", cli.config.display());
            Ok(())
        }
        Command::Keys(cmd) => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("cannot start the runtime")?;
            runtime.block_on(async {
                let store = store::open(&config.store).context("cannot open the key store")?;
                keys::run(cmd, &store, config.logging.audit_file.as_deref()).await
            })
        }
    }
}

fn serve(config: Config) -> anyhow::Result<()> {
    let _log = crate::logging::init(&config.logging).context("cannot set up logging")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    runtime.block_on(async {
        let store = store::open(&config.store).context("cannot open the key store")?;
        let listeners = crate::server::Listeners::bind(&config.server)?;
        crate::server::run(config, store, listeners, shutdown_signal()).await?;
        Ok(())
    })
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
