//! Reading `gateway.toml` into a [`FileConfig`], and rendering it back for `check-config`. A
//! syntax error names the line and column; an unknown section, key or variable the nearest valid
//! name; a value of the wrong type (a duration that is none, a choice that is not one of its
//! choices, a number out of range) the key, the value and the type in words.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::env::{self, EnvSource};
use super::file::FileConfig;
use super::{ConfigError, nearest, redact_url};

impl FileConfig {
    /// Reads `path` (a missing file is an error), then applies environment overrides. Relative
    /// paths in it (and in the overrides) are resolved against the file's directory.
    pub fn load(path: &Path, env: &dyn EnvSource) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_owned(),
            error,
        })?;
        // The file's own name, in its directory's real path (no "..": the path is shown).
        let source = std::path::absolute(path)
            .and_then(|abs| {
                let dir = abs
                    .parent()
                    .map_or(Ok(PathBuf::from("/")), std::fs::canonicalize)?;
                Ok(abs.file_name().map_or(dir.clone(), |name| dir.join(name)))
            })
            .map_err(|error| ConfigError::Read {
                path: path.to_owned(),
                error,
            })?;
        let mut file = Self::from_toml(&text, &path.display().to_string(), env)?;
        if let Some(dir) = source.parent() {
            file.resolve_paths(dir)?;
        }
        file.source = Some(source);
        Ok(file)
    }

    /// Parses TOML text, then applies environment overrides. Unknown sections, keys and
    /// `KEYGATE_*` variables are refused with the nearest valid name.
    pub fn from_toml(text: &str, origin: &str, env: &dyn EnvSource) -> Result<Self, ConfigError> {
        let mut table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| syntax_error(text, origin, &e))?;
        let defaults = defaults();
        check_keys(&table, &defaults, origin)?;
        let from_env = env::apply(&mut table, &defaults, env)?;
        deserialize(table, &defaults, &from_env, origin)
    }

    /// The settings that hold file paths: relative ones are resolved against the config file's
    /// directory, not the working directory.
    fn path_settings(&mut self) -> [(&'static str, &mut String); 9] {
        [
            ("store.path", &mut self.store.path),
            ("tls.cert", &mut self.tls.cert),
            ("tls.key", &mut self.tls.key),
            ("upstream.tls_ca_file", &mut self.upstream.tls_ca_file),
            ("upstream.tls_cert_file", &mut self.upstream.tls_cert_file),
            ("upstream.tls_key_file", &mut self.upstream.tls_key_file),
            (
                "upstream.identity_secret_file",
                &mut self.upstream.identity_secret_file,
            ),
            ("logging.file", &mut self.logging.file),
            ("logging.audit_file", &mut self.logging.audit_file),
        ]
    }

    /// Makes every relative path setting absolute, under `dir`.
    fn resolve_paths(&mut self, dir: &Path) -> Result<(), ConfigError> {
        for (key, value) in self.path_settings() {
            if value.trim().is_empty() || Path::new(value.as_str()).is_absolute() {
                continue;
            }
            let joined = dir.join(value.as_str());
            *value = joined
                .to_str()
                .ok_or_else(|| ConfigError::Type {
                    key: key.to_owned(),
                    value: format!("{value:?}"),
                    from: format!(" (relative to {})", dir.display()),
                    expected: "an absolute path (the config file's directory is not UTF-8)".into(),
                })?
                .to_owned();
        }
        Ok(())
    }

    /// The effective configuration as TOML, for `check-config`, with passwords in Redis URLs
    /// replaced by `***`.
    pub fn to_toml(&self) -> String {
        let mut shown = self.clone();
        if !shown.upstream.identity_secret.is_empty() {
            shown.upstream.identity_secret = "***".into();
        }
        shown.store.url = redact_url(&shown.store.url);
        for node in shown
            .store
            .cluster_nodes
            .iter_mut()
            .chain(shown.store.sentinels.iter_mut())
        {
            *node = redact_url(node);
        }
        toml::to_string(&shown).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }
}

/// The default configuration as a TOML table: the schema that file keys and environment
/// variables are checked against (every section, every key, and each key's type).
fn defaults() -> toml::Table {
    match toml::Value::try_from(FileConfig::default()) {
        Ok(toml::Value::Table(table)) => table,
        _ => toml::Table::new(),
    }
}

/// A TOML syntax error in one line: where, and what.
fn syntax_error(text: &str, origin: &str, e: &toml::de::Error) -> ConfigError {
    let at = e.span().map_or(0, |s| s.start).min(text.len());
    let before = text.get(..at).unwrap_or("");
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    ConfigError::Syntax {
        origin: origin.to_owned(),
        line: before.matches('\n').count() + 1,
        column: before[line_start..].chars().count() + 1,
        message: e
            .message()
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join("; "),
    }
}

/// Refuses sections and keys that the schema does not have.
fn check_keys(
    table: &toml::Table,
    defaults: &toml::Table,
    origin: &str,
) -> Result<(), ConfigError> {
    for (section, value) in table {
        let Some(toml::Value::Table(known)) = defaults.get(section) else {
            let hint = match nearest(section, defaults.keys().map(String::as_str)) {
                Some(near) => format!("did you mean [{near}]?"),
                None => format!(
                    "expected one of {}",
                    defaults
                        .keys()
                        .map(|s| format!("[{s}]"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            };
            return Err(ConfigError::Unknown {
                what: format!("section [{section}] in {origin}"),
                hint,
            });
        };
        let toml::Value::Table(fields) = value else {
            return Err(ConfigError::Type {
                key: section.clone(),
                value: value.to_string(),
                from: String::new(),
                expected: format!("a table: [{section}] and its keys"),
            });
        };
        for field in fields.keys() {
            if known.contains_key(field) {
                continue;
            }
            let hint = match nearest(field, known.keys().map(String::as_str)) {
                Some(near) => format!("did you mean {section}.{near}?"),
                None => format!(
                    "expected one of {}",
                    known.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
            };
            return Err(ConfigError::Unknown {
                what: format!("key {section}.{field} in {origin}"),
                hint,
            });
        }
    }
    Ok(())
}

/// Keys whose values may hold a secret (a password in a Redis URL, the identity secret).
const SECRET_KEYS: [&str; 4] = [
    "store.url",
    "store.cluster_nodes",
    "store.sentinels",
    "upstream.identity_secret",
];

/// The table as a [`FileConfig`]. When that fails, each key is tried alone to name the one to
/// blame, with its value and its type in words.
fn deserialize(
    table: toml::Table,
    defaults: &toml::Table,
    from_env: &BTreeMap<String, String>,
    origin: &str,
) -> Result<FileConfig, ConfigError> {
    let whole = match toml::Value::Table(table.clone()).try_into::<FileConfig>() {
        Ok(config) => {
            return Ok(FileConfig {
                from_env: from_env.clone(),
                ..config
            });
        }
        Err(e) => e,
    };
    for (section, fields) in &table {
        let Some(fields) = fields.as_table() else {
            continue;
        };
        for (field, value) in fields {
            let mut alone = toml::Table::new();
            alone.insert(
                section.clone(),
                toml::Value::Table(toml::Table::from_iter([(field.clone(), value.clone())])),
            );
            let Err(e) = toml::Value::Table(alone).try_into::<FileConfig>() else {
                continue;
            };
            let key = format!("{section}.{field}");
            let default = defaults.get(section).and_then(|s| s.get(field));
            // A secret is not shown, even one of the wrong type.
            let secret = SECRET_KEYS.contains(&key.as_str());
            return Err(ConfigError::Type {
                from: from_env
                    .get(&key)
                    .map(|name| format!(" (from {name})"))
                    .unwrap_or_default(),
                key,
                value: if secret {
                    "***".to_owned()
                } else {
                    value.to_string()
                },
                expected: expected_type(e.message(), default),
            });
        }
    }
    Err(ConfigError::Parse {
        origin: format!("in {origin}"),
        message: whole.message().replace('\n', "; "),
    })
}

/// serde's "invalid type: ..., expected u16" in words: "a whole number from 0 to 65535".
fn expected_type(message: &str, default: Option<&toml::Value>) -> String {
    let serde = message
        .rsplit_once(", expected ")
        .map_or(message, |(_, e)| e.trim());
    let words = match serde {
        "u8" => "a whole number from 0 to 255",
        "u16" => "a whole number from 0 to 65535",
        "u32" => "a whole number from 0 to 4294967295",
        "u64" | "usize" => "a whole number, 0 or more",
        "i8" | "i16" | "i32" | "i64" | "isize" => "a whole number",
        "f32" | "f64" => "a number",
        "a boolean" => "true or false",
        "a string" => "a string (in quotes)",
        "a sequence" => "a list such as [\"a\", \"b\"]",
        "a map" => "a table such as { \"/api/\" = 1048576 }",
        other => other,
    };
    match default {
        Some(toml::Value::Array(_)) if serde != "a sequence" => {
            format!("a list in which each item is {words}")
        }
        Some(toml::Value::Table(_)) if serde != "a map" => {
            format!("a table in which each value is {words}")
        }
        _ => words.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use crate::config::tests::{env, load};
    use crate::config::{Backend, FileConfig};
    use std::path::Path;

    #[test]
    fn unknown_keys_are_refused_with_the_nearest_name() {
        let err = load("[server]\nhttps_listn = \"x\"\n", &[])
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "invalid config: unknown key server.https_listn in test: did you mean server.https_listen?"
        );
        let err = load("[upstrem]\nurl = \"x\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("[upstrem]") && err.ends_with("did you mean [upstream]?"),
            "{err}"
        );
        let err = load("", &[("KEYGATE_AUTH_KEYHEADER", "x")])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("KEYGATE_AUTH_KEYHEADER")
                && err.ends_with("did you mean KEYGATE_AUTH_KEY_HEADER?"),
            "{err}"
        );
        // A misspelt section is refused, not passed over in silence.
        let err = load("", &[("KEYGATE_UPSTREM_URL", "http://10.0.0.5:8000")])
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "invalid config: unknown environment variable KEYGATE_UPSTREM_URL: did you mean KEYGATE_UPSTREAM_URL?"
        );
        let err = load("", &[("KEYGATE_NOTHING_LIKE_IT_AT_ALL", "1")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("e.g. KEYGATE_UPSTREAM_URL"), "{err}");
        // Not overrides: the config file's path, the scripts' binary, contrib/django's secret
        // file, the tests' variables.
        load(
            "",
            &[
                ("KEYGATE_CONFIG", "x.toml"),
                ("KEYGATE_BIN", "target/release/keygate"),
                ("KEYGATE_IDENTITY_SECRET_FILE", "/srv/api/.identity.secret"),
                ("KEYGATE_TEST_VENV", "target/test-venv"),
            ],
        )
        .unwrap();
        // Other variables are none of keygate's business.
        load("", &[("PATH", "/usr/bin"), ("KEYGATEWAY", "x")]).unwrap();
    }

    #[test]
    fn type_errors_name_the_key_the_value_and_the_type() {
        type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str);
        let cases: [Case<'_>; 7] = [
            (
                "",
                &[("KEYGATE_SERVER_WORKERS", "abc")],
                "invalid config: server.workers = \"abc\" (from KEYGATE_SERVER_WORKERS): expected a whole number",
            ),
            (
                "",
                &[("KEYGATE_SERVER_PUBLIC_PORT", "70000")],
                "invalid config: server.public_port = 70000 (from KEYGATE_SERVER_PUBLIC_PORT): expected a whole number from 0 to 65535",
            ),
            (
                "[server]\npublic_port = 70000\n",
                &[],
                "invalid config: server.public_port = 70000: expected a whole number from 0 to 65535",
            ),
            (
                "",
                &[("KEYGATE_TLS_GENERATE_DEV_CERT", "yes")],
                "invalid config: tls.generate_dev_cert = \"yes\" (from KEYGATE_TLS_GENERATE_DEV_CERT): expected true or false",
            ),
            (
                "[server]\ntrusted_proxies = \"10.0.0.0/8\"\n",
                &[],
                "invalid config: server.trusted_proxies = \"10.0.0.0/8\": expected a list such as [\"a\", \"b\"]",
            ),
            (
                "[metrics]\nlatency_buckets = [0.1, \"x\"]\n",
                &[],
                "invalid config: metrics.latency_buckets = [0.1, \"x\"]: expected a list in which each item is a number",
            ),
            (
                "server = 1\n",
                &[],
                "invalid config: server = 1: expected a table: [server] and its keys",
            ),
        ];
        for (text, env, want) in cases {
            let err = load(text, env).unwrap_err().to_string();
            assert_eq!(err, want);
            assert!(!err.contains("--config"), "{err}");
        }
        // A secret of the wrong type is not shown.
        let err = load("[upstream]\nidentity_secret = 123456789\n", &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("invalid config: upstream.identity_secret = ***: expected a string")
                && !err.contains("123456789"),
            "{err}"
        );
        // Nor is a URL list that may hold a password, written as one string.
        for key in ["cluster_nodes", "sentinels"] {
            let text = format!("[store]\n{key} = \"redis://:s3cret@10.0.0.1:26379\"\n");
            let err = load(&text, &[]).unwrap_err().to_string();
            assert_eq!(
                err,
                format!(
                    "invalid config: store.{key} = ***: expected a list such as [\"a\", \"b\"]"
                )
            );
        }
        // A value refused by validation names the variable that set it.
        let err = load("", &[("KEYGATE_UPSTREAM_URL", "ftp://x")])
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with(
                "invalid config: upstream.url = \"ftp://x\" (from KEYGATE_UPSTREAM_URL): expected"
            ),
            "{err}"
        );
        let err = load("[upstream]\nurl = \"ftp://x\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(!err.contains("from"), "{err}");
        let err = load("", &[("KEYGATE_SERVER_TRUSTED_PROXIES", "10.0.0.0/33")])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("server.trusted_proxies") && err.contains("10.0.0.0/33"),
            "{err}"
        );
    }

    #[test]
    fn toml_syntax_errors_are_one_line_with_the_place() {
        let err = load("[server]\nworkers = 2\n[tls\n", &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("invalid config: test line 3, column "),
            "{err}"
        );
        assert!(!err.contains('\n'), "{err}");
    }

    #[test]
    fn relative_paths_are_resolved_against_the_config_files_directory() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gateway.toml");
        std::fs::write(
            &path,
            "[store]\npath = \"data/keys.db\"\n[tls]\ncert = \"/etc/tls/c.pem\"\n\
             [logging]\naudit_file = \"audit.log\"\n",
        )
        .unwrap();
        let env = env(&[
            ("KEYGATE_TLS_KEY", "k.pem"),
            ("KEYGATE_UPSTREAM_URL", "https://10.0.0.5:8443"),
            ("KEYGATE_UPSTREAM_TLS_CA_FILE", "ca/upstream.pem"),
        ]);
        let file = FileConfig::load(&path, &env).unwrap();
        assert_eq!(
            Path::new(&file.upstream.tls_ca_file),
            dir.path().join("ca/upstream.pem")
        );
        let c = file.validate().unwrap();
        assert_eq!(c.source.as_deref(), Some(path.as_path()));
        assert_eq!(
            c.store.backend,
            Backend::Sqlite {
                path: dir.path().join("data/keys.db")
            }
        );
        assert_eq!(c.tls.cert, Path::new("/etc/tls/c.pem"));
        assert_eq!(c.tls.key, dir.path().join("k.pem"));
        assert_eq!(c.logging.audit_file, Some(dir.path().join("audit.log")));
        assert_eq!(c.logging.file, None);
        // check-config shows the paths that are used.
        assert!(
            file.to_toml()
                .contains(&dir.path().join("data/keys.db").display().to_string())
        );
        assert_eq!(
            c.store.backend.to_string(),
            format!("sqlite {}", dir.path().join("data/keys.db").display())
        );
    }

    #[test]
    fn durations_and_choices_are_refused_naming_key_value_and_what_is_expected() {
        const DURATION: &str =
            "expected a duration such as \"250ms\", \"30s\", \"5m\" or \"7d\", at most 365d";
        type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], String);
        let cases: [Case<'_>; 12] = [
            (
                "[store]\npositive_ttl = \"soon\"\n",
                &[],
                format!("invalid config: store.positive_ttl = \"soon\": {DURATION}"),
            ),
            (
                "",
                &[("KEYGATE_STORE_POSITIVE_TTL", "forever")],
                format!(
                    "invalid config: store.positive_ttl = \"forever\" (from KEYGATE_STORE_POSITIVE_TTL): {DURATION}"
                ),
            ),
            (
                "[server]\nheader_read_timeout = \"366d\"\n",
                &[],
                format!("invalid config: server.header_read_timeout = \"366d\": {DURATION}"),
            ),
            (
                "[logging]\nformat = \"xml\"\n",
                &[],
                "invalid config: logging.format = \"xml\": expected \"text\" or \"json\"".into(),
            ),
            (
                "",
                &[("KEYGATE_LOGGING_ROTATION", "weekly")],
                "invalid config: logging.rotation = \"weekly\" (from KEYGATE_LOGGING_ROTATION): expected \"daily\", \"hourly\" or \"never\"".into(),
            ),
            (
                "[server]\nhttp_mode = \"proxy\"\n",
                &[],
                "invalid config: server.http_mode = \"proxy\": expected \"redirect\" (308 to HTTPS) or \"serve\" (the pipeline over plain HTTP)".into(),
            ),
            (
                "[store]\nbackend = \"mysql\"\n",
                &[],
                "invalid config: store.backend = \"mysql\": expected \"sqlite\", \"redis\", \"redis-sentinel\" or \"redis-cluster\"".into(),
            ),
            (
                "[upstream]\nresponse_timeout = \"0ms\"\n",
                &[],
                "invalid config: upstream.response_timeout = \"0ms\": expected a duration above 0".into(),
            ),
            (
                "[tls]\nwatch_interval = \"1ms\"\n",
                &[],
                "invalid config: tls.watch_interval = \"1ms\": expected \"0s\" (off) or at least \"100ms\"".into(),
            ),
            (
                "[store]\npoll_interval = \"0s\"\n",
                &[],
                "invalid config: store.poll_interval = \"0s\": expected between 1ms and 60s".into(),
            ),
            (
                "",
                &[("KEYGATE_STORE_POLL_INTERVAL", "2m")],
                "invalid config: store.poll_interval = \"2m\" (from KEYGATE_STORE_POLL_INTERVAL): expected between 1ms and 60s".into(),
            ),
            (
                "[store]\nbackend = \"redis\"\nconfirm_timeout = \"61s\"\n",
                &[],
                "invalid config: store.confirm_timeout = \"61s\": expected between 1ms and 60s".into(),
            ),
        ];
        for (text, env, want) in cases {
            let err = load(text, env).unwrap_err().to_string();
            assert_eq!(err, want);
        }
        // The plain-HTTP mode is read without the spaces around it.
        let c = load("", &[("KEYGATE_SERVER_HTTP_MODE", " serve ")]).unwrap();
        assert_eq!(c.server.http_mode, crate::config::HttpMode::Serve);
    }
}
