//! A key never shows up where a program prints by accident: in a panic message built from
//! keygate's own values (`unwrap`, `expect`, `{:?}` in an assertion), or in the errors the request
//! path produces. The log, metric and response-body side of the same promise is tested against
//! the running gateway in `tests/lifecycle.rs` and `tests/cli/`.
//!
//! Its own test binary: it replaces the process-wide panic hook to capture what a panic prints.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{HeaderMap, HeaderValue};
use keygate::auth::Authenticator;
use keygate::cache::KeyCache;
use keygate::config::FileConfig;
use keygate::error::ErrorResponses;
use keygate::key::{self, Presented};
use keygate::metrics::Metrics;
use keygate::store::sqlite::SqliteStore;
use keygate::store::{KeyRecord, KeyStore as _};

/// Runs `f`, which must panic, and returns what the panic hook was given to print.
fn panic_message(f: impl FnOnce() + std::panic::UnwindSafe) -> String {
    let captured = Arc::new(Mutex::new(String::new()));
    let sink = Arc::clone(&captured);
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        *sink.lock().unwrap() = info.to_string();
    }));
    let result = std::panic::catch_unwind(f);
    std::panic::set_hook(previous);
    assert!(result.is_err(), "expected a panic");
    let message = captured.lock().unwrap().clone();
    assert!(!message.is_empty());
    message
}

#[tokio::test]
async fn panics_and_errors_built_from_keygate_values_never_show_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = FileConfig::default().validate().unwrap();
    let store =
        Arc::new(SqliteStore::open(&dir.path().join("r.db"), Duration::from_secs(5)).unwrap());
    let secret = key::generate().unwrap();
    let record = KeyRecord::new("redaction", &secret, 0, None).unwrap();
    store.insert(record.clone()).await.unwrap();
    let cache = KeyCache::new(
        store,
        &config.store,
        Arc::new(Metrics::new(&config.metrics.latency_buckets)),
    );
    let auth = Authenticator::new(&config.auth);
    let key = secret.expose().to_owned();
    // Enough of the key that no hint or digest prefix could contain it by chance.
    let needle = &key[3..23];

    let mut headers = HeaderMap::new();
    headers.insert("x-api-key", HeaderValue::from_str(&key).unwrap());
    let authenticated = auth.authenticate(&headers, &cache).await.unwrap();

    let mut messages = vec![
        panic_message(|| {
            let found = auth.credential(&headers);
            found.unwrap_err();
        }),
        panic_message(|| panic!("{:?}", Presented::new(key.as_bytes()))),
        panic_message(|| panic!("{} {:?}", secret, secret)),
        panic_message(|| panic!("{authenticated:?}")),
        panic_message(|| panic!("{record:?}")),
        panic_message(|| assert_eq!(Presented::new(key.as_bytes()).len(), 0, "{:?}", secret)),
    ];
    // The errors the request path renders for a key that is refused, in every way it can be.
    let mut typo = key.clone().into_bytes();
    typo[10] = if typo[10] == b'a' { b'b' } else { b'a' };
    for bad in [
        typo,
        format!("{key}x").into_bytes(),
        key.repeat(300).into_bytes(),
    ] {
        let mut h = HeaderMap::new();
        h.insert("x-api-key", HeaderValue::from_bytes(&bad).unwrap());
        let err = auth.authenticate(&h, &cache).await.unwrap_err();
        let rendered = ErrorResponses::new("keygate").render(&err.error);
        messages.push(format!("{} {err:?} {rendered:?}", err.error));
    }
    let mut two = HeaderMap::new();
    two.append("x-api-key", HeaderValue::from_str(&key).unwrap());
    two.append("x-api-key", HeaderValue::from_str(&key).unwrap());
    let err = auth.authenticate(&two, &cache).await.unwrap_err();
    let rendered = ErrorResponses::new("keygate").render(&err.error);
    messages.push(format!("{} {err:?} {rendered:?}", err.error));

    for m in &messages {
        assert!(!m.contains(needle), "the key leaked into: {m}");
    }
    assert!(messages[0].contains("<redacted>"), "{}", messages[0]);
    assert!(messages[2].contains("<redacted>"), "{}", messages[2]);
}
