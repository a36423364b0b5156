//! Configuration in two stages: [`FileConfig`] is what `gateway.toml` and the environment say
//! (serde, unknown keys refused, durations and choices typed); [`Config`] is the validated, typed
//! form the gateway runs on. In the order a setting meets them:
//!
//! - `file.rs`: the first stage's types, one per section, with their defaults.
//! - `load.rs`: reading the file (syntax, unknown keys, types), and rendering it for
//!   `check-config`.
//! - `env.rs`: the `KEYGATE_*` and django-cors-headers overrides, read through an injectable
//!   [`EnvSource`] and applied before the values are typed.
//! - `validate.rs`: the second stage's types and the checks that make them; `backend.rs`: the
//!   store's part of it (SQLite, or Redis with its TLS material).
//!
//! Every error names the key, the value and what is expected, in one line. Everything other
//! modules use is re-exported here, as `crate::config::X`.

mod backend;
mod env;
mod file;
mod load;
mod validate;

use std::borrow::Cow;
use std::path::PathBuf;

pub use backend::{Backend, RedisSettings, RedisTarget, RedisTls};
pub use env::{EnvSource, ProcessEnv};
pub use file::{
    AuthSection, BackendKind, CorsSection, DurationSetting, FileConfig, HeadersSection, HttpMode,
    LogFormat, LoggingSection, MAX_DURATION, MetricsSection, NotAChoice, RateLimitSection,
    Rotation, ServerSection, StoreSection, TlsSection, UpstreamSection,
};
pub use validate::{
    Auth, Config, Cors, Headers, Logging, Metrics, RateLimit, Server, Store, Tls, Upstream,
    UpstreamTls,
};

/// A configuration error: which key, which value, what is expected, in one line.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {}: {error} (pass --config PATH or set KEYGATE_CONFIG)", path.display())]
    Read {
        path: PathBuf,
        /// Shown in the message, not chained: the message is the whole line.
        error: std::io::Error,
    },
    /// The file is not valid TOML.
    #[error("invalid config: {origin} line {line}, column {column}: {message}")]
    Syntax {
        origin: String,
        line: usize,
        column: usize,
        message: String,
    },
    /// A section, key or `KEYGATE_*` variable that keygate does not know.
    #[error("invalid config: unknown {what}: {hint}")]
    Unknown { what: String, hint: String },
    /// A value of the wrong type, or out of its type's range.
    #[error("invalid config: {key} = {value}{from}: expected {expected}")]
    Type {
        key: String,
        /// As TOML (`"abc"`, `70000`), or the variable's text.
        value: String,
        /// ` (from KEYGATE_...)` when an environment variable set it.
        from: String,
        expected: String,
    },
    /// The values do not form a configuration (what serde said, when no single key is to blame).
    #[error("invalid config {origin}: {message}")]
    Parse { origin: String, message: String },
    /// A value that parses but is not acceptable.
    #[error("invalid config: {key} = {value:?}{from}: expected {expected}")]
    Invalid {
        key: &'static str,
        value: String,
        /// ` (from KEYGATE_...)` when an environment variable set it.
        from: String,
        expected: Cow<'static, str>,
    },
}

/// A value that parses but is not acceptable: [`ConfigError::Invalid`].
fn invalid(
    key: &'static str,
    value: impl std::fmt::Display,
    expected: impl Into<Cow<'static, str>>,
) -> ConfigError {
    ConfigError::Invalid {
        key,
        value: value.to_string(),
        from: String::new(),
        expected: expected.into(),
    }
}

/// The candidate nearest to `name`, if it is near enough to be a misspelling of it.
fn nearest<'a>(name: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let (distance, best) = candidates
        .into_iter()
        .map(|c| (strsim::levenshtein(name, c), c))
        .min_by_key(|(d, _)| *d)?;
    (distance <= 2 + name.len() / 4).then_some(best)
}

/// `scheme://user:***@host...`: the password of a URL, hidden.
pub fn redact_url(url: &str) -> String {
    // Where the URL parses, the password is exactly what a URL parser (and so the Redis client)
    // takes for one, whatever '#', '?' or '@' the URL holds.
    if let Ok(mut parsed) = url::Url::parse(url) {
        if parsed.password().is_some() {
            let _ = parsed.set_password(Some("***"));
        }
        return parsed.into();
    }
    // Where it does not (an error message about that very URL), hide everything up to the last
    // '@' after the scheme: whatever the password was meant to be is in there.
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    match rest.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) if !user.contains(['/', '?', '#']) => {
                format!("{scheme}://{user}:***@{host}")
            }
            _ => format!("{scheme}://***@{host}"),
        },
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    /// An environment of `pairs`.
    pub(super) fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    /// `text` with the environment `pairs`, read and validated.
    pub(super) fn load(text: &str, pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        FileConfig::from_toml(text, "test", &env(pairs))?.validate()
    }

    #[test]
    fn passwords_in_urls_are_hidden() {
        assert_eq!(redact_url("rediss://:pw@h:1"), "rediss://:***@h:1");
        assert_eq!(redact_url("redis://h:1/0"), "redis://h:1/0");
        // The authority ends at '#' or '?' too: the password is what a URL parser calls one.
        assert_eq!(redact_url("redis://u:p@h#x@y/0"), "redis://u:***@h#x@y/0");
        assert_eq!(redact_url("redis://u:p@h?q=a@b"), "redis://u:***@h?q=a@b");
        // An unparsable URL (in an error message) hides everything up to the last '@'.
        assert_eq!(redact_url("redis://u:pa#ss@h:x"), "redis://u:***@h:x");
    }
}
