//! `keygate keys ...`: create, list, show, revoke, enable, delete, rotate and the usage report.

use std::io::Write as _;
use std::path::Path;

use anyhow::{Context as _, bail};
use serde::Serialize;

use super::{
    CreateArgs, JsonFlag, KeysCommand, MAX_TIMESTAMP, RotateArgs, UsageArgs, audit, backup, note,
    timestamp,
};
use crate::key;
use crate::logging::AuditEvent;
use crate::policy::Policy;
use crate::store::{KeyRecord, SharedStore, StoreError, check_name, unix_now};

fn status(r: &KeyRecord, now: i64) -> &'static str {
    match (r.is_active, r.is_expired(now), r.rotated_to.is_some()) {
        (false, _, _) => "inactive",
        (true, true, true) => "rotated",
        (true, true, false) => "expired",
        (true, false, true) => "grace",
        (true, false, false) => "active",
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
    #[serde(skip_serializing_if = "Option::is_none")]
    rotated_to: Option<&'a str>,
    owner: Option<&'a str>,
    #[serde(skip_serializing_if = "Policy::is_empty")]
    policy: &'a Policy,
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
            rotated_to: r.rotated_to.as_deref(),
            owner: r.owner.as_deref(),
            policy: &r.policy,
        }
    }
}

pub(super) async fn run(
    cmd: KeysCommand,
    prepared: Prepared,
    store: &SharedStore,
    audit_log: Option<&Path>,
) -> anyhow::Result<()> {
    let now = unix_now();
    let mut out = std::io::stdout().lock();
    let outcome = match cmd {
        KeysCommand::Create(args) => create(args, store, &mut out, audit_log).await,
        KeysCommand::List(JsonFlag { json }) => {
            let records = store.list().await?;
            if json {
                let views: Vec<_> = records.iter().map(|r| KeyView::of(r, now)).collect();
                writeln!(out, "{}", serde_json::to_string_pretty(&views)?)?;
                return Ok(());
            }
            let header = [
                "ID",
                "NAME",
                "HINT",
                "STATUS",
                "CREATED",
                "LAST USED",
                "EXPIRES",
                "OWNER",
            ];
            let rows: Vec<[String; 8]> = records
                .iter()
                .map(|r| {
                    let v = KeyView::of(r, now);
                    [
                        v.id.to_owned(),
                        v.name.to_owned(),
                        v.hint.to_owned(),
                        v.status.to_owned(),
                        v.created_at,
                        v.last_used.unwrap_or_else(|| "never".into()),
                        v.expires_at.unwrap_or_else(|| "-".into()),
                        v.owner.unwrap_or("-").to_owned(),
                    ]
                })
                .collect();
            write_table(&mut out, header, &rows)
        }
        KeysCommand::Show(t) => {
            let r = store.find(&t.key).await?;
            print_one(&mut out, &r, now, t.json)
        }
        KeysCommand::Revoke(t) => {
            let r = store.set_active(&t.key, false).await?;
            audit(
                audit_log,
                AuditEvent::new("revoked", Some(&r.id), Some(&r.name)),
            );
            note!(
                "revoked API key '{}' ({}); running gateways refuse it within a second",
                r.name,
                r.id
            );
            print_one(&mut out, &r, now, t.json)
        }
        KeysCommand::Enable(t) => {
            let r = store.set_active(&t.key, true).await?;
            audit(
                audit_log,
                AuditEvent::new("enabled", Some(&r.id), Some(&r.name)),
            );
            note!("enabled API key '{}' ({})", r.name, r.id);
            print_one(&mut out, &r, now, t.json)
        }
        KeysCommand::Delete(t) => {
            let r = store.delete(&t.key).await?;
            audit(
                audit_log,
                AuditEvent::new("deleted", Some(&r.id), Some(&r.name)),
            );
            note!("deleted API key '{}' ({})", r.name, r.id);
            Ok(())
        }
        KeysCommand::Usage(args) => usage(store, &mut out, now, &args).await,
        KeysCommand::Rotate(args) => rotate(args, store, &mut out, audit_log).await,
        KeysCommand::Export(args) => backup::export(store, args.out.as_deref(), &mut out).await,
        KeysCommand::Import(args) => {
            let file = match prepared.import {
                Some(file) => file,
                None => backup::read(&args.file)?,
            };
            backup::import(store, file, args.map.as_deref(), &mut out, audit_log).await
        }
    };
    outcome?;
    Ok(out.flush()?)
}

/// Columns as wide as their widest cell (a name may be 64 characters), two spaces apart.
fn write_table<const N: usize>(
    out: &mut impl std::io::Write,
    header: [&str; N],
    rows: &[[String; N]],
) -> anyhow::Result<()> {
    let mut widths = header.map(|h| h.chars().count());
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut line = String::new();
    let mut write_row = |cells: [&str; N]| -> std::io::Result<()> {
        line.clear();
        for (i, (cell, width)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == N {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<width$}  "));
            }
        }
        writeln!(out, "{}", line.trim_end())
    };
    write_row(header)?;
    for row in rows {
        write_row(row.each_ref().map(String::as_str))?;
    }
    Ok(())
}

/// A change's outcome: `Ok(Some(_))` when it was written but not confirmed by the replicas.
fn unconfirmed(result: Result<(), StoreError>) -> Result<Option<StoreError>, StoreError> {
    match result {
        Ok(()) => Ok(None),
        Err(e @ StoreError::Unconfirmed(_)) => Ok(Some(e)),
        Err(e) => Err(e),
    }
}

/// What a command reads and checks before the store is opened (and, for `create` and `import`,
/// perhaps created): a refused command leaves nothing behind.
#[derive(Debug, Default)]
pub(super) struct Prepared {
    import: Option<backup::ImportFile>,
}

/// Checks `cmd`'s arguments and reads its input.
pub(super) fn prepare(cmd: &KeysCommand) -> anyhow::Result<Prepared> {
    match cmd {
        KeysCommand::Create(args) => {
            check_name(&args.name).map_err(anyhow::Error::msg)?;
            create_policy(args)?;
            create_expiry(args, unix_now())?;
            Ok(Prepared::default())
        }
        KeysCommand::Import(args) => Ok(Prepared {
            import: Some(backup::read(&args.file)?),
        }),
        _ => Ok(Prepared::default()),
    }
}

fn create_policy(args: &CreateArgs) -> anyhow::Result<Policy> {
    let policy = Policy {
        allow: args.allow.clone(),
        allow_ips: args.allow_ips.clone(),
        rate: args.rate.clone(),
    };
    policy
        .compile()
        .map_err(|e| anyhow::anyhow!("invalid policy: {e}"))?;
    Ok(policy)
}

fn create_expiry(args: &CreateArgs, now: i64) -> anyhow::Result<Option<i64>> {
    Ok(match (args.expires_in, args.expires_at) {
        (Some(d), _) => Some(
            now.saturating_add(i64::try_from(d.as_secs()).context("--expires-in is too long")?)
                .min(MAX_TIMESTAMP),
        ),
        (None, Some(at)) if at <= now => bail!("--expires-at {} is in the past", timestamp(at)),
        (None, at) => at,
    })
}

async fn create(
    args: CreateArgs,
    store: &SharedStore,
    out: &mut impl std::io::Write,
    audit_log: Option<&Path>,
) -> anyhow::Result<()> {
    check_name(&args.name).map_err(anyhow::Error::msg)?;
    let policy = create_policy(&args)?;
    let secret = key::generate()?;
    let now = unix_now();
    let expires_at = create_expiry(&args, now)?;
    let record = KeyRecord {
        policy,
        owner: args.owner,
        ..KeyRecord::new(args.name, &secret, now, expires_at)?
    };
    // Written but not confirmed by the replicas: the key is printed all the same (it works
    // unless the primary fails before they catch up), and the command fails saying so.
    let unconfirmed = unconfirmed(store.insert(record.clone()).await)?;
    audit(
        audit_log,
        AuditEvent::new("created", Some(&record.id), Some(&record.name)),
    );
    let printed = if args.json {
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
        writeln!(out, "{}", serde_json::to_string(&created)?)
    } else {
        writeln!(out, "{}", secret.expose())
    };
    printed.and_then(|()| out.flush()).map_err(|e| {
        let remedy = format!(
            "delete it (keygate keys delete {}) and create it again",
            record.id
        );
        undelivered(&record, &e, &remedy)
    })?;
    note!(
        "created API key '{}' (id {}, hint {}). Store it now: it is not shown again.",
        record.name,
        record.id,
        record.hint
    );
    match unconfirmed {
        Some(e) => Err(anyhow::anyhow!(
            "{e} (the new key printed above is written to the primary)"
        )),
        None => Ok(()),
    }
}

/// A new key that was stored but could not be printed is useless to anyone, and the error must
/// say so (a broken pipe here is not the quiet end of a listing). The message does not carry the
/// I/O error as a cause, so the CLI does not take it for a reader that went away.
fn undelivered(record: &KeyRecord, e: &std::io::Error, remedy: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "API key '{}' ({}) was stored but could not be printed ({e}); nobody has it: {remedy}",
        record.name,
        record.id,
    )
}

async fn rotate(
    args: RotateArgs,
    store: &SharedStore,
    out: &mut impl std::io::Write,
    audit_log: Option<&Path>,
) -> anyhow::Result<()> {
    let old = store.find(&args.key).await?;
    if old.rotated_to.is_some() {
        bail!(
            "API key '{}' ({}) was already rotated; rotate its successor instead",
            old.name,
            old.id
        );
    }
    let now = unix_now();
    let secret = key::generate()?;
    // Same name, policy and owner; an expiring key keeps its lifetime, counted from now.
    let expires_at = old.expires_at.map(|at| {
        now.saturating_add(at.saturating_sub(old.created_at))
            .min(MAX_TIMESTAMP)
    });
    let successor = KeyRecord {
        policy: old.policy.clone(),
        owner: old.owner.clone(),
        ..KeyRecord::new(old.name.clone(), &secret, now, expires_at)?
    };
    let grace_until =
        now.saturating_add(i64::try_from(args.grace.as_secs()).context("--grace is too long")?);
    let (old, unconfirmed) = match store.rotate(&old.id, successor.clone(), grace_until).await {
        Ok(old) => (old, None),
        Err(e @ StoreError::Unconfirmed(_)) => {
            // Written to the primary as the store would have returned it.
            let mut updated = old;
            updated.rotated_to = Some(successor.id.clone());
            updated.expires_at = Some(
                updated
                    .expires_at
                    .map_or(grace_until, |e| e.min(grace_until)),
            );
            (updated, Some(e))
        }
        Err(e) => return Err(e.into()),
    };
    let mut event = AuditEvent::new("rotated", Some(&old.id), Some(&old.name));
    event.detail = Some(format!(
        "new key {}, old key valid until {}",
        successor.id,
        timestamp(old.expires_at.unwrap_or(grace_until))
    ));
    audit(audit_log, event);
    let printed = if args.json {
        #[derive(Serialize)]
        struct Rotated<'a> {
            key: &'a str,
            #[serde(flatten)]
            view: KeyView<'a>,
            old_id: &'a str,
            old_valid_until: String,
        }
        let rotated = Rotated {
            key: secret.expose(),
            view: KeyView::of(&successor, now),
            old_id: &old.id,
            old_valid_until: timestamp(old.expires_at.unwrap_or(grace_until)),
        };
        writeln!(out, "{}", serde_json::to_string(&rotated)?)
    } else {
        writeln!(out, "{}", secret.expose())
    };
    printed.and_then(|()| out.flush()).map_err(|e| {
        let remedy = format!(
            "rotate it at once (keygate keys rotate {} --grace 0s) for a new key",
            successor.id
        );
        undelivered(&successor, &e, &remedy)
    })?;
    note!(
        "rotated API key '{}': new key {} (hint {}); the old key {} works until {}. \
         Deploy the new key, then watch `keygate keys usage` for the old key's last use.",
        successor.name,
        successor.id,
        successor.hint,
        old.id,
        timestamp(old.expires_at.unwrap_or(grace_until))
    );
    match unconfirmed {
        Some(e) => Err(anyhow::anyhow!(
            "{e} (the new key printed above is written to the primary)"
        )),
        None => Ok(()),
    }
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
    if let Some(owner) = v.owner {
        writeln!(out, "owner:      {owner}")?;
    }
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
    if let Some(next) = v.rotated_to {
        writeln!(out, "rotated to: {next} (this key works until its expiry)")?;
    }
    for scope in &r.policy.allow {
        writeln!(out, "allow:      {scope}")?;
    }
    for net in &r.policy.allow_ips {
        writeln!(out, "allow ip:   {net}")?;
    }
    if let Some(rate) = &r.policy.rate {
        writeln!(out, "rate:       {rate}")?;
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
    expires_at: Option<String>,
    expires_in_days: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rotated_to: Option<&'a str>,
}

/// Keys expiring within this many days are flagged by `keys usage`.
const EXPIRING_SOON_DAYS: i64 = 14;

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
                expires_at: r.expires_at.map(timestamp),
                expires_in_days: r
                    .expires_at
                    .filter(|&at| at > now)
                    .map(|at| (at - now) / 86_400),
                rotated_to: r.rotated_to.as_deref(),
            }
        })
        .collect();
    if args.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&rows)?)?;
        return Ok(());
    }
    let stale_days = stale_secs / 86_400;
    for row in &rows {
        if let Some(next) = row.rotated_to {
            // An old key in (or past) its rotation grace: has every client moved to the new one?
            let until = row.expires_at.as_deref().unwrap_or("-");
            let last = row.last_used.as_deref().unwrap_or("never");
            writeln!(
                out,
                "API Key '{}' (old key {}, rotated to {next}): valid until {until}, last used {last}",
                row.name, row.id
            )?;
        }
        match row.days_since_last_use {
            Some(days) => {
                writeln!(out, "API Key '{}': Last used {} ago", row.name, Days(days))?;
                if row.stale {
                    writeln!(
                        out,
                        "WARNING: API Key '{}' not used in {} (stale after {})",
                        row.name,
                        Days(days),
                        Days(stale_days)
                    )?;
                }
            }
            None => writeln!(out, "WARNING: API Key '{}' has never been used", row.name)?,
        }
        if let Some(days) = row.expires_in_days.filter(|d| *d < EXPIRING_SOON_DAYS) {
            writeln!(
                out,
                "WARNING: API Key '{}' expires in {}",
                row.name,
                Days(days)
            )?;
        }
        let status = match row.status {
            "active" => "Active",
            "inactive" => "Inactive",
            "grace" => "Rotated (old key, still valid)",
            "rotated" => "Rotated (old key, refused)",
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

/// A whole number of days as the usage report writes it: "1 day", "10 days".
struct Days(i64);

impl std::fmt::Display for Days {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            1 | -1 => write!(f, "{} day", self.0),
            n => write!(f, "{n} days"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Days;

    #[test]
    fn one_day_is_singular() {
        let shown: Vec<String> = [0, 1, 2, 10].map(|d| Days(d).to_string()).into();
        assert_eq!(shown, ["0 days", "1 day", "2 days", "10 days"]);
    }
}
