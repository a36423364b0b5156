//! The `keygate` command line: `serve`, `check-config`, and key management on the configured
//! store (safe while the gateway runs: every change goes through the store's change feed).
//!
//! A new key is printed once, alone on stdout, at creation; nothing prints it again.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use clap::{Args, Parser, Subcommand};
use serde::Serialize;

use crate::config::{Config, FileConfig, ProcessEnv};
use crate::key;
use crate::store::{self, KeyRecord, SharedStore, unix_now};

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
}

/// `keys create` options.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Unique name (letters, digits, space, '.', '_', '-'; at most 64).
    #[arg(long)]
    pub name: String,
    /// Expire the key after this long (e.g. 90d).
    #[arg(long, value_parser = parse_duration)]
    pub expires_in: Option<Duration>,
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
    let file = FileConfig::load(path, &ProcessEnv)
        .map_err(|e| anyhow::anyhow!("{e} (pass --config PATH or set KEYGATE_CONFIG)"))?;
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
                keys(cmd, &store).await
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
        let listeners = crate::server::Listeners::bind(&config.server).await?;
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

/// Checks a key name: header-safe (it is sent upstream), short, and readable.
pub fn validate_name(name: &str) -> anyhow::Result<()> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, ' ' | '.' | '_' | '-');
    if name.is_empty() || name.len() > 64 || !name.chars().all(ok_char) || name.trim() != name {
        bail!(
            "invalid key name {name:?}: use 1-64 letters, digits, spaces, '.', '_' or '-', without leading or trailing spaces"
        );
    }
    Ok(())
}

fn timestamp(secs: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).unwrap_or(0));
    humantime::format_rfc3339_seconds(t).to_string()
}

fn status(r: &KeyRecord, now: i64) -> &'static str {
    if !r.is_active {
        "inactive"
    } else if r.is_expired(now) {
        "expired"
    } else {
        "active"
    }
}

/// A record as the CLI shows it (never a secret: the digest is not shown either).
#[derive(Debug, Serialize)]
struct KeyView<'a> {
    id: &'a str,
    name: &'a str,
    hint: &'a str,
    status: &'static str,
    created_at: String,
    last_used: Option<String>,
    use_count: u64,
    expires_at: Option<String>,
    legacy: bool,
}

impl<'a> KeyView<'a> {
    fn of(r: &'a KeyRecord, now: i64) -> Self {
        Self {
            id: &r.id,
            name: &r.name,
            hint: &r.hint,
            status: status(r, now),
            created_at: timestamp(r.created_at),
            last_used: r.last_used.map(timestamp),
            use_count: r.use_count,
            expires_at: r.expires_at.map(timestamp),
            legacy: r.legacy,
        }
    }
}

async fn keys(cmd: KeysCommand, store: &SharedStore) -> anyhow::Result<()> {
    let now = unix_now();
    let mut out = std::io::stdout().lock();
    match cmd {
        KeysCommand::Create(args) => create(args, store, &mut out).await,
        KeysCommand::List(JsonFlag { json }) => {
            let records = store.list().await?;
            if json {
                let views: Vec<_> = records.iter().map(|r| KeyView::of(r, now)).collect();
                writeln!(out, "{}", serde_json::to_string_pretty(&views)?)?;
                return Ok(());
            }
            writeln!(
                out,
                "{:<16} {:<24} {:<10} {:<8} {:<20} {:<20} EXPIRES",
                "ID", "NAME", "HINT", "STATUS", "CREATED", "LAST USED"
            )?;
            for r in &records {
                let v = KeyView::of(r, now);
                writeln!(
                    out,
                    "{:<16} {:<24} {:<10} {:<8} {:<20} {:<20} {}",
                    v.id,
                    v.name,
                    v.hint,
                    v.status,
                    v.created_at,
                    v.last_used.as_deref().unwrap_or("never"),
                    v.expires_at.as_deref().unwrap_or("-"),
                )?;
            }
            Ok(())
        }
        KeysCommand::Show(t) => {
            let r = store.find(&t.key).await?;
            print_one(&mut out, &r, now, t.json)
        }
        KeysCommand::Revoke(t) => {
            let r = store.set_active(&t.key, false).await?;
            eprintln!(
                "revoked API key '{}' ({}); running gateways refuse it within a second",
                r.name, r.id
            );
            print_one(&mut out, &r, now, t.json)
        }
        KeysCommand::Enable(t) => {
            let r = store.set_active(&t.key, true).await?;
            eprintln!("enabled API key '{}' ({})", r.name, r.id);
            print_one(&mut out, &r, now, t.json)
        }
        KeysCommand::Delete(t) => {
            let r = store.delete(&t.key).await?;
            eprintln!("deleted API key '{}' ({})", r.name, r.id);
            Ok(())
        }
        KeysCommand::Usage(args) => usage(store, &mut out, now, &args).await,
    }
}

async fn create(
    args: CreateArgs,
    store: &SharedStore,
    out: &mut impl std::io::Write,
) -> anyhow::Result<()> {
    validate_name(&args.name)?;
    let secret = key::generate()?;
    let now = unix_now();
    let expires_at = match args.expires_in {
        Some(d) => Some(
            now.saturating_add(i64::try_from(d.as_secs()).context("--expires-in is too long")?),
        ),
        None => None,
    };
    let record = KeyRecord::new(args.name, &secret, now, expires_at)?;
    store.insert(record.clone()).await?;
    if args.json {
        #[derive(Serialize)]
        struct Created<'a> {
            key: &'a str,
            #[serde(flatten)]
            view: KeyView<'a>,
        }
        let created = Created {
            key: secret.expose(),
            view: KeyView::of(&record, now),
        };
        writeln!(out, "{}", serde_json::to_string(&created)?)?;
    } else {
        writeln!(out, "{}", secret.expose())?;
    }
    eprintln!(
        "created API key '{}' (id {}, hint {}). Store it now: it is not shown again.",
        record.name, record.id, record.hint
    );
    Ok(())
}

fn print_one(
    out: &mut impl std::io::Write,
    r: &KeyRecord,
    now: i64,
    json: bool,
) -> anyhow::Result<()> {
    let v = KeyView::of(r, now);
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
        return Ok(());
    }
    writeln!(out, "id:         {}", v.id)?;
    writeln!(out, "name:       {}", v.name)?;
    writeln!(out, "hint:       {}", v.hint)?;
    writeln!(out, "status:     {}", v.status)?;
    writeln!(out, "created:    {}", v.created_at)?;
    writeln!(
        out,
        "last used:  {}",
        v.last_used.as_deref().unwrap_or("never")
    )?;
    writeln!(out, "uses:       {}", v.use_count)?;
    writeln!(
        out,
        "expires:    {}",
        v.expires_at.as_deref().unwrap_or("never")
    )?;
    if v.legacy {
        writeln!(out, "legacy:     yes (imported plaintext key, no checksum)")?;
    }
    Ok(())
}

/// One line of the usage report.
#[derive(Debug, Serialize)]
struct UsageRow<'a> {
    id: &'a str,
    name: &'a str,
    status: &'static str,
    created_at: String,
    last_used: Option<String>,
    days_since_last_use: Option<i64>,
    never_used: bool,
    stale: bool,
    use_count: u64,
}

async fn usage(
    store: &SharedStore,
    out: &mut impl std::io::Write,
    now: i64,
    args: &UsageArgs,
) -> anyhow::Result<()> {
    let records = store.list().await?;
    let stale_secs = i64::try_from(args.stale_after.as_secs()).unwrap_or(i64::MAX);
    let rows: Vec<UsageRow<'_>> = records
        .iter()
        .map(|r| {
            let since = r.last_used.map(|t| now.saturating_sub(t).max(0));
            UsageRow {
                id: &r.id,
                name: &r.name,
                status: status(r, now),
                created_at: timestamp(r.created_at),
                last_used: r.last_used.map(timestamp),
                days_since_last_use: since.map(|s| s / 86_400),
                never_used: r.last_used.is_none(),
                stale: since.is_some_and(|s| s > stale_secs),
                use_count: r.use_count,
            }
        })
        .collect();
    if args.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&rows)?)?;
        return Ok(());
    }
    let stale_days = stale_secs / 86_400;
    for row in &rows {
        match row.days_since_last_use {
            Some(days) => {
                writeln!(out, "API Key '{}': Last used {days} days ago", row.name)?;
                if row.stale {
                    writeln!(
                        out,
                        "WARNING: API Key '{}' not used in {days} days (stale after {stale_days} days)",
                        row.name
                    )?;
                }
            }
            None => writeln!(out, "WARNING: API Key '{}' has never been used", row.name)?,
        }
        let status = match row.status {
            "active" => "Active",
            "inactive" => "Inactive",
            _ => "Expired",
        };
        writeln!(out, "Status: {status}")?;
        writeln!(out, "Created: {}", row.created_at)?;
        writeln!(out, "Uses: {}", row.use_count)?;
        writeln!(out, "---")?;
    }
    if rows.is_empty() {
        writeln!(
            out,
            "No API keys. Create one with: keygate keys create --name NAME"
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_must_be_header_safe() {
        for ok in ["Frontend production", "ci-bot_2", "a.b"] {
            validate_name(ok).unwrap();
        }
        for bad in [
            "",
            " lead",
            "trail ",
            "new\nline",
            "ünï",
            "a\"b",
            &"x".repeat(65),
        ] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
    }
}
