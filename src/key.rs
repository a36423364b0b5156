//! API key format: minting, the offline format check, digests, and the redacting secret type.
//!
//! A minted key is `sk_` + 40 base62 characters from the OS CSPRNG + 6 base62 characters of the
//! CRC32 of everything before them (the GitHub token scheme). The checksum lets the gateway refuse a
//! mistyped or made-up key without a cache or store lookup, and lets secret scanners recognise one.
//! Keys are never stored: only their SHA-256 digest is (a single fast hash is right for a
//! 238-bit random secret; a slow password hash would only add latency to every cache miss).

use std::fmt;

use rand::TryRngCore;
use rand::rngs::OsRng;
use sha2::{Digest as _, Sha256};

/// Prefix of every key keygate mints.
pub const PREFIX: &str = "sk_";
/// Number of random base62 characters after the prefix.
pub const BODY_LEN: usize = 40;
/// Number of base62 characters that encode the CRC32 checksum.
pub const CHECKSUM_LEN: usize = 6;
/// Total length of a minted key.
pub const KEY_LEN: usize = PREFIX.len() + BODY_LEN + CHECKSUM_LEN;
/// Longest credential the gateway will even hash (legacy keys included); longer is malformed.
pub const MAX_PRESENTED_LEN: usize = 256;

const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// SHA-256 digest of a key: the only form in which a key is stored, cached or compared.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyDigest(pub [u8; 32]);

impl KeyDigest {
    /// Digest of a presented or minted key.
    pub fn of(key: &[u8]) -> Self {
        Self(Sha256::digest(key).into())
    }

    /// Lower-case hex, as used in exports.
    pub fn to_hex(&self) -> String {
        let mut s = String::with_capacity(64);
        for b in self.0 {
            s.push(char::from(b"0123456789abcdef"[usize::from(b >> 4)]));
            s.push(char::from(b"0123456789abcdef"[usize::from(b & 0xf)]));
        }
        s
    }

    /// Parses 64 hex digits.
    pub fn from_hex(s: &str) -> Option<Self> {
        let bytes = s.as_bytes();
        if bytes.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, pair) in bytes.chunks_exact(2).enumerate() {
            let hi = (pair[0] as char).to_digit(16)?;
            let lo = (pair[1] as char).to_digit(16)?;
            out[i] = u8::try_from(hi * 16 + lo).ok()?;
        }
        Some(Self(out))
    }
}

impl fmt::Debug for KeyDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // A digest is not secret, but eight hex digits are enough to tell two apart in a debug dump.
        write!(f, "KeyDigest({}…)", &self.to_hex()[..8])
    }
}

/// Why a presented credential failed the offline format check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FormatError {
    /// Not `sk_` + 46 characters.
    Shape,
    /// A character outside base62.
    Alphabet,
    /// Well-formed, but the checksum does not match: mistyped or made up.
    Checksum,
}

/// A secret API key. `Debug` and `Display` never show it; use [`Secret::expose`] only to print it
/// once at creation.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a key string (from the CLI or an import).
    pub fn new(key: String) -> Self {
        Self(key)
    }

    /// The key itself. Call sites are the one-time print at creation and hashing.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// SHA-256 of the key.
    pub fn digest(&self) -> KeyDigest {
        KeyDigest::of(self.0.as_bytes())
    }

    /// A non-secret reminder for humans: the first characters and an ellipsis.
    pub fn hint(&self) -> String {
        hint_of(&self.0)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// A credential as presented by a client: borrowed from the request's header, never copied into
/// logs. `Debug`/`Display` redact it.
#[derive(Clone, Copy)]
pub struct Presented<'a>(&'a [u8]);

impl<'a> Presented<'a> {
    /// Wraps the raw header bytes.
    pub fn new(raw: &'a [u8]) -> Self {
        Self(raw)
    }

    /// Checks the minted-key format and checksum without any lookup.
    pub fn check_format(&self) -> Result<(), FormatError> {
        check_format(self.0)
    }

    /// SHA-256 of the presented bytes.
    pub fn digest(&self) -> KeyDigest {
        KeyDigest::of(self.0)
    }

    /// Length in bytes (for the legacy-key sanity bound).
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether nothing was presented.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Presented<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Presented(<redacted>)")
    }
}

impl fmt::Display for Presented<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Error from the operating system's random number generator.
#[derive(Debug, thiserror::Error)]
#[error("the OS random number generator failed: {0}")]
pub struct RngError(String);

/// Mints a new key from the OS CSPRNG.
pub fn generate() -> Result<Secret, RngError> {
    let mut key = String::with_capacity(KEY_LEN);
    key.push_str(PREFIX);
    key.push_str(&random_base62(BODY_LEN)?);
    let checksum = encode_checksum(crc32fast::hash(key.as_bytes()));
    key.push_str(std::str::from_utf8(&checksum).unwrap_or_default());
    Ok(Secret(key))
}

/// `n` uniformly distributed base62 characters from the OS CSPRNG (rejection sampling, no modulo bias).
pub fn random_base62(n: usize) -> Result<String, RngError> {
    let mut out = String::with_capacity(n);
    let mut buf = [0u8; 64];
    while out.len() < n {
        OsRng
            .try_fill_bytes(&mut buf)
            .map_err(|e| RngError(e.to_string()))?;
        // 248 = 4 * 62: bytes at or above it would bias the distribution.
        for &b in buf.iter().filter(|&&b| b < 248) {
            if out.len() == n {
                break;
            }
            out.push(char::from(BASE62[usize::from(b % 62)]));
        }
    }
    Ok(out)
}

/// The 6-character base62 encoding of a CRC32 value, most significant digit first.
fn encode_checksum(mut crc: u32) -> [u8; CHECKSUM_LEN] {
    let mut out = [b'0'; CHECKSUM_LEN];
    for slot in out.iter_mut().rev() {
        *slot = BASE62[(crc % 62) as usize];
        crc /= 62;
    }
    out
}

fn is_base62(b: u8) -> bool {
    b.is_ascii_alphanumeric()
}

/// Checks shape, alphabet and checksum of a presented key. Costs one CRC32 over 43 bytes.
pub fn check_format(key: &[u8]) -> Result<(), FormatError> {
    if key.len() != KEY_LEN || !key.starts_with(PREFIX.as_bytes()) {
        return Err(FormatError::Shape);
    }
    let (signed, checksum) = key.split_at(KEY_LEN - CHECKSUM_LEN);
    if !key[PREFIX.len()..].iter().copied().all(is_base62) {
        return Err(FormatError::Alphabet);
    }
    if encode_checksum(crc32fast::hash(signed)) != checksum {
        return Err(FormatError::Checksum);
    }
    Ok(())
}

/// First characters of a key and an ellipsis: enough for a human to match a key to a record.
pub fn hint_of(key: &str) -> String {
    let visible: String = key.chars().take(PREFIX.len() + 4).collect();
    format!("{visible}…")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_keys_pass_the_format_check() {
        for _ in 0..200 {
            let key = generate().unwrap();
            assert_eq!(key.expose().len(), KEY_LEN);
            assert!(key.expose().starts_with("sk_"));
            assert_eq!(check_format(key.expose().as_bytes()), Ok(()));
        }
    }

    #[test]
    fn minted_keys_differ() {
        let a = generate().unwrap();
        let b = generate().unwrap();
        assert_ne!(a.expose(), b.expose());
    }

    #[test]
    fn a_single_changed_character_fails_the_checksum() {
        let key = generate().unwrap();
        let mut bytes = key.expose().as_bytes().to_vec();
        for i in PREFIX.len()..KEY_LEN {
            let orig = bytes[i];
            bytes[i] = if orig == b'a' { b'b' } else { b'a' };
            assert_eq!(
                check_format(&bytes),
                Err(FormatError::Checksum),
                "position {i}"
            );
            bytes[i] = orig;
        }
        assert_eq!(check_format(&bytes), Ok(()));
    }

    #[test]
    fn shape_and_alphabet_are_checked() {
        let key = generate().unwrap();
        let k = key.expose().as_bytes();
        assert_eq!(check_format(&k[..KEY_LEN - 1]), Err(FormatError::Shape));
        assert_eq!(check_format(b""), Err(FormatError::Shape));
        let mut wrong_prefix = k.to_vec();
        wrong_prefix[0] = b'p';
        assert_eq!(check_format(&wrong_prefix), Err(FormatError::Shape));
        let mut bad_char = k.to_vec();
        bad_char[10] = b'-';
        assert_eq!(check_format(&bad_char), Err(FormatError::Alphabet));
        let mut non_ascii = k.to_vec();
        non_ascii[10] = 0xc3;
        assert_eq!(check_format(&non_ascii), Err(FormatError::Alphabet));
    }

    #[test]
    fn checksum_encoding_is_fixed_width_and_covers_u32() {
        assert_eq!(&encode_checksum(0), b"000000");
        assert_eq!(&encode_checksum(61), b"00000z");
        assert_eq!(&encode_checksum(62), b"000010");
        // 62^6 > 2^32, so the largest CRC still fits in six digits.
        assert_eq!(&encode_checksum(u32::MAX), b"4gfFC3");
    }

    #[test]
    fn secrets_redact_themselves() {
        let key = generate().unwrap();
        assert!(!format!("{key:?}").contains(key.expose()));
        assert!(!format!("{key}").contains(key.expose()));
        let presented = Presented::new(key.expose().as_bytes());
        assert!(!format!("{presented:?} {presented}").contains("sk_"));
    }

    #[test]
    fn hint_shows_only_the_start() {
        let key = generate().unwrap();
        let hint = key.hint();
        assert_eq!(hint.chars().count(), 8);
        assert!(key.expose().starts_with(hint.trim_end_matches('…')));
    }

    #[test]
    fn digest_hex_round_trips() {
        let d = KeyDigest::of(b"sk_test");
        assert_eq!(KeyDigest::from_hex(&d.to_hex()), Some(d));
        assert_eq!(KeyDigest::from_hex("zz"), None);
    }
}
