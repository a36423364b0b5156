//! `keygate keys export` and `keygate keys import`: backups of the key records (digests, never
//! keys), and migration from the old Django `APIKey` table (`manage.py dumpdata users.APIKey`),
//! whose plaintext keys are hashed on the way in and never stored.
//!
//! An import is checked whole before anything is written, and written in one store transaction:
//! a bad record refuses the file, naming the record; a record already present is skipped, so
//! importing the same file twice changes nothing. A Django record's `user` becomes the key's
//! owner, and the import gives the map from each Django pk to the keygate id of its key (on
//! stdout, or in `--map FILE`), so the backend can link its own rows to keygate's ids.

use std::io::Write as _;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, anyhow, bail};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{MAX_TIMESTAMP, audit, note, timestamp};
use crate::key::{self, MAX_PRESENTED_LEN, Secret};
use crate::logging::AuditEvent;
use crate::store::{KeyRecord, SharedStore, check_name, check_owner, unix_now};

/// `format` of a keygate export.
const EXPORT_FORMAT: &str = "keygate-export";

/// The export file.
#[derive(Debug, Serialize, Deserialize)]
struct Export {
    format: String,
    version: u32,
    exported_at: String,
    keys: Vec<Value>,
}

/// Writes every record as JSON to `out_file` (mode 0600) or stdout.
pub(super) async fn export(
    store: &SharedStore,
    out_file: Option<&Path>,
    stdout: &mut impl std::io::Write,
) -> anyhow::Result<()> {
    let records = store.list().await?;
    let export = Export {
        format: EXPORT_FORMAT.into(),
        version: 1,
        exported_at: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        keys: records
            .iter()
            .map(serde_json::to_value)
            .collect::<Result<_, _>>()?,
    };
    let text = serde_json::to_string_pretty(&export)?;
    match out_file {
        Some(path) => {
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create(true).truncate(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::OpenOptionsExt as _;
                options.mode(0o600);
            }
            let mut file = options
                .open(path)
                .with_context(|| format!("cannot write {}", path.display()))?;
            writeln!(file, "{text}").with_context(|| format!("cannot write {}", path.display()))?;
            note!(
                "exported {} API key records to {}",
                records.len(),
                path.display()
            );
        }
        None => writeln!(stdout, "{text}")?,
    }
    Ok(())
}

/// What an import file holds: checked records and, for a Django dump, each record's Django pk
/// (in the same order; `None` for an object without one).
#[derive(Debug)]
struct Parsed {
    records: Vec<KeyRecord>,
    django_pks: Option<Vec<Option<String>>>,
}

/// The Django pk → keygate id map, in file order, written as one JSON object.
struct PkMap(Vec<(String, String)>);

impl Serialize for PkMap {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.0.iter().map(|(pk, id)| (pk, id)))
    }
}

/// An import file read and checked before the store is opened.
#[derive(Debug)]
pub(super) struct ImportFile {
    parsed: Parsed,
    /// The file's name, or "standard input".
    name: String,
}

/// Reads and checks `file` (a keygate export or a Django dump; `-`: standard input).
pub(super) fn read(file: &Path) -> anyhow::Result<ImportFile> {
    let (text, name) = if file == Path::new("-") {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin().lock(), &mut text)
            .context("cannot read standard input")?;
        (text, "standard input".to_owned())
    } else {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("cannot read {}", file.display()))?;
        (text, file.display().to_string())
    };
    let parsed = parse(&text).with_context(|| format!("{name} refused, nothing imported"))?;
    Ok(ImportFile { parsed, name })
}

/// Imports what [`read`] checked, all records or none. For a Django dump, the pk → id map goes
/// to `map_file`, or else to `stdout`.
pub(super) async fn import(
    store: &SharedStore,
    file: ImportFile,
    map_file: Option<&Path>,
    stdout: &mut impl std::io::Write,
    audit_log: Option<&Path>,
) -> anyhow::Result<()> {
    let ImportFile {
        parsed: Parsed {
            records,
            django_pks,
        },
        name,
    } = file;
    if map_file.is_some() && django_pks.is_none() {
        bail!("--map is for Django dumps; {name} is a keygate export (its records keep their ids)");
    }
    let total = records.len();
    let digests: Vec<_> = records.iter().map(|r| r.digest).collect();
    let (imported, skipped) = store
        .import(records)
        .await
        .with_context(|| format!("{name} refused, nothing imported"))?;
    let mut event = AuditEvent::new("imported", None, None);
    event.detail = Some(format!(
        "{imported} imported, {skipped} already present, from {name}"
    ));
    audit(audit_log, event);
    note!(
        "imported {imported} API keys from {name} ({skipped} already present, {total} in the file)"
    );
    if let Some(pks) = django_pks {
        // A key already present keeps the id it has: read back what the store holds.
        let stored = store.lookup_many(digests).await?;
        let mut map = Vec::with_capacity(pks.len());
        let mut without_pk = 0;
        for (pk, record) in pks.into_iter().zip(stored) {
            match (pk, record) {
                (Some(pk), Some(record)) => map.push((pk, record.id)),
                _ => without_pk += 1,
            }
        }
        if without_pk > 0 {
            note!("keygate: warning: {without_pk} records have no pk and are not in the map");
        }
        let text = serde_json::to_string_pretty(&PkMap(map))?;
        match map_file {
            Some(path) => {
                std::fs::write(path, format!("{text}\n"))
                    .with_context(|| format!("cannot write the pk map to {}", path.display()))?;
                note!(
                    "wrote the Django pk -> keygate id map to {}",
                    path.display()
                );
            }
            None => writeln!(stdout, "{text}")?,
        }
    }
    Ok(())
}

/// Parses either format into checked records.
fn parse(text: &str) -> anyhow::Result<Parsed> {
    let value: Value = serde_json::from_str(text).map_err(|e| anyhow!("not valid JSON: {e}"))?;
    match value {
        Value::Object(ref o) if o.get("format").and_then(Value::as_str) == Some(EXPORT_FORMAT) => {
            let export: Export =
                serde_json::from_value(value).map_err(|e| anyhow!("not a keygate export: {e}"))?;
            if export.version != 1 {
                bail!(
                    "export version {} is newer than this keygate understands (1)",
                    export.version
                );
            }
            let records = export
                .keys
                .into_iter()
                .enumerate()
                .map(|(i, v)| {
                    let record: KeyRecord =
                        serde_json::from_value(v).map_err(|e| anyhow!("record {}: {e}", i + 1))?;
                    check(&record)
                        .map_err(|e| anyhow!("record {} ({:?}): {e}", i + 1, record.name))?;
                    Ok(record)
                })
                .collect::<anyhow::Result<_>>()?;
            Ok(Parsed {
                records,
                django_pks: None,
            })
        }
        Value::Array(items) => {
            let now = unix_now();
            let (pks, records) = items
                .into_iter()
                .enumerate()
                .map(|(i, item)| django(item, now).map_err(|e| anyhow!("record {}: {e}", i + 1)))
                .collect::<anyhow::Result<(Vec<_>, Vec<_>)>>()?;
            Ok(Parsed {
                records,
                django_pks: Some(pks),
            })
        }
        _ => bail!(
            "expected a keygate export (an object with \"format\": \"{EXPORT_FORMAT}\") or a Django dumpdata array"
        ),
    }
}

fn check(record: &KeyRecord) -> anyhow::Result<()> {
    check_name(&record.name).map_err(|e| anyhow!(e))?;
    if let Some(owner) = &record.owner {
        check_owner(owner).map_err(|e| anyhow!(e))?;
    }
    record
        .policy
        .compile()
        .map_err(|e| anyhow!("invalid policy: {e}"))?;
    if !record.id.starts_with("key_") || record.id.len() > 64 {
        bail!("invalid id {:?}", record.id);
    }
    for (field, at) in [
        ("created_at", Some(record.created_at)),
        ("last_used", record.last_used),
        ("expires_at", record.expires_at),
    ] {
        if let Some(at) = at.filter(|at| !(0..=MAX_TIMESTAMP).contains(at)) {
            bail!(
                "{field} = {at}: expected Unix seconds from 0 to {MAX_TIMESTAMP} ({})",
                timestamp(MAX_TIMESTAMP)
            );
        }
    }
    Ok(())
}

/// One `users.apikey` object of a Django dump.
#[derive(Debug, Deserialize)]
struct DjangoObject {
    model: String,
    #[serde(default)]
    pk: Value,
    fields: DjangoFields,
}

#[derive(Debug, Deserialize)]
struct DjangoFields {
    name: String,
    key: String,
    #[serde(default = "yes")]
    is_active: bool,
    created_at: Option<String>,
    last_used: Option<String>,
    /// The user the key belongs to: a pk (number or string), a natural key (`["alice"]`, from
    /// `dumpdata --natural-foreign`), or null.
    #[serde(default)]
    user: Value,
}

fn yes() -> bool {
    true
}

/// A pk or natural key as text: `7` and `"7"` are `7`, `["alice"]` is `alice`.
fn key_text(v: &Value) -> Option<String> {
    match v {
        Value::Number(n) => Some(n.to_string()),
        Value::String(s) => Some(s.clone()),
        Value::Array(parts) if parts.len() == 1 => key_text(&parts[0]),
        _ => None,
    }
}

/// A Django `users.apikey` object: its pk as text, and its record.
fn django(item: Value, now: i64) -> anyhow::Result<(Option<String>, KeyRecord)> {
    let object: DjangoObject = serde_json::from_value(item)
        .map_err(|e| anyhow!("not a Django users.apikey object: {e}"))?;
    let at = format!("pk {}, name {:?}", object.pk, object.fields.name);
    if !object.model.eq_ignore_ascii_case("users.apikey") {
        bail!(
            "({at}): model is {:?}, expected \"users.apikey\"",
            object.model
        );
    }
    let f = object.fields;
    check_name(&f.name).map_err(|e| anyhow!("({at}): {e}; rename it in the file"))?;
    let plaintext = f.key.trim();
    if plaintext.is_empty()
        || plaintext.len() > MAX_PRESENTED_LEN
        || !plaintext.bytes().all(|b| b.is_ascii_graphic())
    {
        // The key itself is never echoed back.
        bail!(
            "({at}): field key is empty, longer than {MAX_PRESENTED_LEN} characters, or not printable ASCII"
        );
    }
    let time = |field: &str, v: &Option<String>| -> anyhow::Result<Option<i64>> {
        v.as_deref()
            .map(|s| {
                parse_datetime(s)
                    .ok_or_else(|| anyhow!("({at}): field {field} {s:?} is not a date and time"))
            })
            .transpose()
    };
    let owner = match &f.user {
        Value::Null => None,
        user => {
            let owner = key_text(user).ok_or_else(|| {
                anyhow!(
                    "({at}): field user {user} is not a pk or a one-field natural key such as [\"alice\"]"
                )
            })?;
            check_owner(&owner).map_err(|e| anyhow!("({at}): field user: {e}"))?;
            Some(owner)
        }
    };
    let created_at = time("created_at", &f.created_at)?.unwrap_or(now);
    let last_used = time("last_used", &f.last_used)?;
    let secret = Secret::new(plaintext.to_owned());
    let mut record = KeyRecord::new(f.name, &secret, created_at, None)?;
    record.is_active = f.is_active;
    record.last_used = last_used;
    // A key that happens to carry keygate's checksum needs no legacy lookups.
    record.legacy = key::check_format(plaintext.as_bytes()).is_err();
    record.owner = owner;
    Ok((key_text(&object.pk), record))
}

/// Parses RFC 3339 / ISO 8601 as Django writes it: `2024-01-15T10:30:00Z`,
/// `2024-01-15T10:30:00.123456+02:00`, `2024-01-15 10:30:00`. Returns Unix seconds.
pub(super) fn parse_datetime(s: &str) -> Option<i64> {
    let s = s.trim();
    let (base, offset_secs) = if let Some(base) = s.strip_suffix(['Z', 'z']) {
        (base, 0)
    } else if s.len() > 6
        && matches!(s.as_bytes()[s.len() - 6], b'+' | b'-')
        && s.as_bytes()[s.len() - 3] == b':'
    {
        let (base, offset) = s.split_at(s.len() - 6);
        let sign = if offset.starts_with('-') { -1 } else { 1 };
        let hours: i64 = offset[1..3].parse().ok()?;
        let minutes: i64 = offset[4..6].parse().ok()?;
        (base, sign * (hours * 3600 + minutes * 60))
    } else {
        (s, 0)
    };
    let t = humantime::parse_rfc3339_weak(base).ok()?;
    let secs = i64::try_from(
        t.duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .as_secs(),
    )
    .ok()?;
    Some(secs - offset_secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn django_datetimes_parse() {
        assert_eq!(parse_datetime("2024-01-15T10:30:00Z"), Some(1_705_314_600));
        assert_eq!(
            parse_datetime("2024-01-15T10:30:00.123456Z"),
            Some(1_705_314_600)
        );
        assert_eq!(
            parse_datetime("2024-01-15T12:30:00+02:00"),
            Some(1_705_314_600)
        );
        assert_eq!(
            parse_datetime("2024-01-15T05:30:00-05:00"),
            Some(1_705_314_600)
        );
        assert_eq!(parse_datetime("2024-01-15 10:30:00"), Some(1_705_314_600));
        assert_eq!(parse_datetime("yesterday"), None);
    }

    #[test]
    fn django_dump_records_are_hashed_and_marked_legacy() {
        let dump = r#"[{"model": "users.apikey", "pk": 1, "fields": {"name": "Frontend", "key": "sk_live_abcdef0123456789",
            "is_active": true, "created_at": "2024-01-15T10:30:00Z", "last_used": null}},
            {"model": "users.apikey", "pk": 2, "fields": {"name": "old", "key": "sk_old_key_value",
            "is_active": false, "created_at": "2023-06-01T00:00:00.5+00:00", "last_used": "2023-07-01T00:00:00Z"}}]"#;
        let Parsed {
            records,
            django_pks,
        } = parse(dump).unwrap();
        assert_eq!(django_pks, Some(vec![Some("1".into()), Some("2".into())]));
        assert_eq!(records.len(), 2);
        assert_eq!(
            records[0].digest,
            key::KeyDigest::of(b"sk_live_abcdef0123456789")
        );
        assert!(records[0].legacy && records[0].is_active);
        assert_eq!(records[0].created_at, 1_705_314_600);
        assert!(!records[1].is_active);
        assert_eq!(records[1].last_used, Some(1_688_169_600));
        assert!(
            !format!("{records:?}").contains("sk_live_abcdef"),
            "the plaintext key was kept"
        );
    }

    #[test]
    fn django_users_become_owners() {
        let dump = r#"[
            {"model": "users.apikey", "pk": 10, "fields": {"name": "a", "key": "sk_a_0123456789", "user": 7}},
            {"model": "users.apikey", "pk": "0b6f", "fields": {"name": "b", "key": "sk_b_0123456789", "user": ["alice"]}},
            {"model": "users.apikey", "fields": {"name": "c", "key": "sk_c_0123456789", "user": null}},
            {"model": "users.apikey", "pk": 12, "fields": {"name": "d", "key": "sk_d_0123456789"}}]"#;
        let Parsed {
            records,
            django_pks,
        } = parse(dump).unwrap();
        let owners: Vec<_> = records.iter().map(|r| r.owner.as_deref()).collect();
        assert_eq!(owners, [Some("7"), Some("alice"), None, None]);
        assert_eq!(
            django_pks.unwrap(),
            [
                Some("10".into()),
                Some("0b6f".into()),
                None,
                Some("12".into())
            ]
        );
        for (user, needle) in [
            (r#"{"id": 1}"#, "field user"),
            (r#"["a", "b"]"#, "field user"),
            (r#""bad\nowner""#, "invalid owner"),
            (r#""""#, "invalid owner"),
        ] {
            let dump = format!(
                r#"[{{"model": "users.apikey", "pk": 3, "fields": {{"name": "x", "key": "sk_abc", "user": {user}}}}}]"#
            );
            let err = format!("{:#}", parse(&dump).unwrap_err());
            assert!(
                err.contains(needle) && err.contains("pk 3"),
                "{user}: {err}"
            );
            assert!(!err.contains("sk_abc"), "{err}");
        }
    }

    #[test]
    fn bad_records_are_named_and_keys_never_echoed() {
        let cases = [
            (
                r#"[{"model": "users.apikey", "pk": 7, "fields": {"name": "ok", "key": ""}}]"#,
                "pk 7",
            ),
            (
                r#"[{"model": "auth.user", "pk": 1, "fields": {"name": "x", "key": "sk_abc"}}]"#,
                "auth.user",
            ),
            (
                r#"[{"model": "users.apikey", "pk": 2, "fields": {"name": "bad\nname", "key": "sk_abc"}}]"#,
                "invalid key name",
            ),
            (
                r#"[{"model": "users.apikey", "pk": 3, "fields": {"name": "x", "key": "sk_abc", "created_at": "soon"}}]"#,
                "created_at",
            ),
            (
                r#"{"format": "keygate-export", "version": 9, "exported_at": "", "keys": []}"#,
                "version 9",
            ),
            (r#"{"nope": 1}"#, "expected a keygate export"),
            ("[1, 2", "not valid JSON"),
        ];
        for (text, needle) in cases {
            let err = format!("{:#}", parse(text).unwrap_err());
            assert!(err.contains(needle), "{text}: {err}");
            assert!(!err.contains("sk_abc"), "{err}");
        }
    }
}
