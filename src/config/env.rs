//! Environment overrides: `KEYGATE_<SECTION>_<FIELD>` for every key of `gateway.toml` (e.g.
//! `KEYGATE_UPSTREAM_URL`), plus the names a Django deployment with django-cors-headers already
//! sets: `CORS_ALLOWED_ORIGINS` (comma-separated), `CORS_ALLOWED_ORIGIN_REGEXES` (comma-separated;
//! a comma inside a `{m,n}` or `[...]` stays in its pattern) and `CORS_ALLOW_CREDENTIALS`
//! (`true`/`false`, as django-environ reads booleans). They are read through [`EnvSource`], so
//! tests pass a map instead of mutating the process environment, and applied to the parsed TOML
//! before it is typed: a variable's value is read as its key's type and checked as if the file
//! said it. A `KEYGATE_*` variable that names no key is refused with the nearest valid name.

use std::collections::BTreeMap;

use super::{ConfigError, invalid, nearest};

/// Where environment variables come from.
pub trait EnvSource {
    /// All variables, as (name, value).
    fn vars(&self) -> Vec<(String, String)>;
}

/// The process environment.
pub struct ProcessEnv;

impl EnvSource for ProcessEnv {
    fn vars(&self) -> Vec<(String, String)> {
        std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
            .collect()
    }
}

impl EnvSource for BTreeMap<String, String> {
    fn vars(&self) -> Vec<(String, String)> {
        self.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }
}

/// `KEYGATE_*` variables that are not overrides, though they share the prefix: the config
/// file's path (read by the command line), the binary the repository's scripts run, and the
/// identity secret file contrib/django's settings read (often exported in the shell that also
/// runs keygate). `KEYGATE_TEST_*` belong to the test suite.
const NOT_OVERRIDES: [&str; 3] = [
    "KEYGATE_CONFIG",
    "KEYGATE_BIN",
    "KEYGATE_IDENTITY_SECRET_FILE",
];

/// Applies `KEYGATE_<SECTION>_<KEY>` and the CORS names to the parsed table. Each value is read
/// as the key's type (a string key takes the text as it is). Returns which variable set which
/// key, for error messages.
pub(super) fn apply(
    table: &mut toml::Table,
    defaults: &toml::Table,
    env: &dyn EnvSource,
) -> Result<BTreeMap<String, String>, ConfigError> {
    let known: Vec<(&str, &str, &toml::Value)> = defaults
        .iter()
        .filter_map(|(section, fields)| Some((section, fields.as_table()?)))
        .flat_map(|(section, fields)| {
            fields
                .iter()
                .map(move |(field, default)| (section.as_str(), field.as_str(), default))
        })
        .collect();
    let mut vars = env.vars();
    vars.sort();
    let mut from_env = BTreeMap::new();
    for (name, raw) in vars {
        let (section, field, value) = if name == "CORS_ALLOWED_ORIGINS" {
            ("cors", "allowed_origins", list_value(&raw, None))
        } else if name == "CORS_ALLOWED_ORIGIN_REGEXES" {
            let patterns = split_patterns(&raw)
                .into_iter()
                .map(toml::Value::String)
                .collect();
            (
                "cors",
                "allowed_origin_patterns",
                toml::Value::Array(patterns),
            )
        } else if name == "CORS_ALLOW_CREDENTIALS" {
            let allow = match raw.trim().to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" | "y" | "on" | "ok" => true,
                "false" | "0" | "no" | "n" | "off" | "" => false,
                _ => {
                    return Err(invalid(
                        "CORS_ALLOW_CREDENTIALS",
                        raw,
                        "true or false (also 1/0, yes/no, on/off)",
                    ));
                }
            };
            ("cors", "allow_credentials", toml::Value::Boolean(allow))
        } else if let Some(rest) = name.strip_prefix("KEYGATE_") {
            if NOT_OVERRIDES.contains(&name.as_str()) || name.starts_with("KEYGATE_TEST_") {
                continue;
            }
            let lower = rest.to_ascii_lowercase();
            // Section names may contain '_' (rate_limit): match section and key whole.
            let Some(&(section, field, default)) = known.iter().find(|(section, field, _)| {
                lower
                    .strip_prefix(section)
                    .and_then(|r| r.strip_prefix('_'))
                    == Some(field)
            }) else {
                let names: Vec<String> = known
                    .iter()
                    .map(|(s, f, _)| format!("KEYGATE_{s}_{f}").to_ascii_uppercase())
                    .collect();
                let hint = match nearest(&name, names.iter().map(String::as_str)) {
                    Some(near) => format!("did you mean {near}?"),
                    None => "expected KEYGATE_<SECTION>_<KEY> for a key of gateway.toml, \
                             e.g. KEYGATE_UPSTREAM_URL"
                        .to_owned(),
                };
                return Err(ConfigError::Unknown {
                    what: format!("environment variable {name}"),
                    hint,
                });
            };
            let value = env_value(&raw, default).ok_or_else(|| ConfigError::Type {
                key: format!("{section}.{field}"),
                value: format!("{raw:?}"),
                from: format!(" (from {name})"),
                expected: env_expected(default).to_owned(),
            })?;
            (section, field, value)
        } else {
            continue;
        };
        let entry = table
            .entry(section)
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if let toml::Value::Table(section_table) = entry {
            section_table.insert(field.to_owned(), value);
        }
        from_env.insert(format!("{section}.{field}"), name);
    }
    Ok(from_env)
}

/// `CORS_ALLOWED_ORIGIN_REGEXES`: patterns separated by commas, except those inside a group,
/// a `{m,n}` repetition or a `[...]` class, or escaped.
fn split_patterns(value: &str) -> Vec<String> {
    let mut patterns = Vec::new();
    let mut current = String::new();
    let (mut depth, mut in_class, mut escaped) = (0usize, false, false);
    for c in value.chars() {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '[' if !in_class => in_class = true,
            ']' if in_class => in_class = false,
            '(' | '{' if !in_class => depth += 1,
            ')' | '}' if !in_class => depth = depth.saturating_sub(1),
            ',' if depth == 0 && !in_class => {
                patterns.push(std::mem::take(&mut current));
                continue;
            }
            _ => {}
        }
        current.push(c);
    }
    patterns.push(current);
    patterns
        .into_iter()
        .map(|p| p.trim().to_owned())
        .filter(|p| !p.is_empty())
        .collect()
}

/// An environment variable's text as a value of the type of `default` (the key's default), or
/// `None` when it is not one.
fn env_value(raw: &str, default: &toml::Value) -> Option<toml::Value> {
    use toml::Value;
    let trimmed = raw.trim();
    match default {
        // A string key takes the text as it is; a quoted TOML string is unquoted.
        Value::String(_) => Some(Value::String(match toml_value(trimmed) {
            Some(Value::String(s)) if trimmed.starts_with(['"', '\'']) => s,
            _ => raw.to_owned(),
        })),
        Value::Integer(_) => trimmed.parse().ok().map(Value::Integer),
        Value::Float(_) => trimmed.parse().ok().map(Value::Float),
        Value::Boolean(_) => match trimmed.to_ascii_lowercase().as_str() {
            "true" => Some(Value::Boolean(true)),
            "false" => Some(Value::Boolean(false)),
            _ => None,
        },
        Value::Array(items) => Some(list_value(raw, items.first())),
        Value::Table(_) => toml_value(trimmed).filter(Value::is_table),
        Value::Datetime(_) => toml_value(trimmed),
    }
}

/// A list: a TOML array (`["a", "b"]`), or comma-separated items (`a, b`), each read as TOML
/// when the list's items are not strings.
fn list_value(raw: &str, item: Option<&toml::Value>) -> toml::Value {
    let trimmed = raw.trim();
    if trimmed.starts_with('[')
        && let Some(array) = toml_value(trimmed).filter(toml::Value::is_array)
    {
        return array;
    }
    let typed = item.is_some_and(|i| !i.is_str());
    toml::Value::Array(
        trimmed
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| {
                typed
                    .then(|| toml_value(s))
                    .flatten()
                    .unwrap_or_else(|| toml::Value::String(s.to_owned()))
            })
            .collect(),
    )
}

/// `raw` parsed as one TOML value.
fn toml_value(raw: &str) -> Option<toml::Value> {
    format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
}

/// What an environment variable for a key with this default must look like.
fn env_expected(default: &toml::Value) -> &'static str {
    match default {
        toml::Value::Integer(_) => "a whole number",
        toml::Value::Float(_) => "a number",
        toml::Value::Boolean(_) => "true or false",
        toml::Value::Table(_) => "a TOML inline table such as { \"/api/\" = 1048576 }",
        _ => "a value of this key's type",
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::config::tests::load;

    #[test]
    fn env_overrides_fields_and_cors_origins() {
        let c = load(
            "[upstream]\nurl = \"http://127.0.0.1:1\"\n",
            &[
                ("KEYGATE_UPSTREAM_URL", "http://10.1.2.3:9000"),
                ("KEYGATE_SERVER_MAX_CONNECTIONS", "7"),
                ("KEYGATE_STORE_POSITIVE_TTL", "5s"),
                ("KEYGATE_RATE_LIMIT_PER_KEY", "10/s"),
                ("KEYGATE_CONFIG", "ignored.toml"),
                (
                    "CORS_ALLOWED_ORIGINS",
                    "https://a.example, https://b.example",
                ),
            ],
        )
        .unwrap();
        assert_eq!(c.upstream.url, "http://10.1.2.3:9000/");
        assert_eq!(c.server.max_connections, 7);
        assert_eq!(c.store.positive_ttl, Duration::from_secs(5));
        assert_eq!(c.rate_limit.per_key.map(|r| r.count), Some(10));
        assert_eq!(
            c.cors.allowed_origins,
            ["https://a.example", "https://b.example"]
        );
    }

    #[test]
    fn django_cors_environment_names_are_read() {
        let c = load(
            "",
            &[
                (
                    "CORS_ALLOWED_ORIGIN_REGEXES",
                    r"^https://[a-z0-9-]{1,63}\.vercel\.app$, ^https://(a|b)\.example\.com$,^http://[0-9,]+$",
                ),
                ("CORS_ALLOW_CREDENTIALS", "True"),
                ("CORS_ALLOWED_ORIGINS", "https://app.example"),
            ],
        )
        .unwrap();
        let set = c.cors.allowed_origin_patterns.as_ref().unwrap();
        assert_eq!(
            set.patterns(),
            [
                r"\A(?:^https://[a-z0-9-]{1,63}\.vercel\.app$)",
                r"\A(?:^https://(a|b)\.example\.com$)",
                r"\A(?:^http://[0-9,]+$)",
            ]
        );
        assert!(c.cors.allow_credentials);
        assert!(c.cors.warnings().is_empty());
        for off in ["false", "0", "no", "False"] {
            let c = load(
                "[cors]\nallow_credentials = true\n",
                &[("CORS_ALLOW_CREDENTIALS", off)],
            )
            .unwrap();
            assert!(!c.cors.allow_credentials, "{off}");
        }
        let err = load("", &[("CORS_ALLOW_CREDENTIALS", "maybe")])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("CORS_ALLOW_CREDENTIALS")
                && err.contains("maybe")
                && err.contains("expected"),
            "{err}"
        );
    }

    #[test]
    fn env_values_are_read_as_their_keys_type() {
        let c = load(
            "",
            &[
                (
                    "KEYGATE_SERVER_TRUSTED_PROXIES",
                    "10.0.0.0/8, 192.168.0.0/16",
                ),
                ("KEYGATE_METRICS_LATENCY_BUCKETS", "0.1, 1, 10"),
                ("KEYGATE_SERVER_PUBLIC_HOST", "1234"),
                ("KEYGATE_LOGGING_LEVEL", "\"warn\""),
                ("KEYGATE_TLS_GENERATE_DEV_CERT", "TRUE"),
                (
                    "KEYGATE_SERVER_MAX_BODY_BYTES_BY_PREFIX",
                    "{ \"/api/\" = 10 }",
                ),
                ("KEYGATE_AUTH_PUBLIC_PATHS", "[\"/static/\", \"/docs/\"]"),
            ],
        )
        .unwrap();
        assert_eq!(c.server.trusted_proxies.len(), 2);
        assert_eq!(c.metrics.latency_buckets, [0.1, 1.0, 10.0]);
        assert_eq!(c.server.public_host, "1234");
        assert_eq!(c.logging.level, "warn");
        assert!(c.tls.generate_dev_cert);
        assert_eq!(
            c.server.max_body_bytes_by_prefix,
            [("/api/".to_owned(), Some(10))]
        );
        assert_eq!(c.auth.public_paths, ["/static/", "/docs/"]);
    }
}
