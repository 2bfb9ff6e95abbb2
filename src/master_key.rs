//! The master key and the keys derived from it.
//!
//! One 32-byte master key (base64 in `SHIELDKEY_MASTER_KEY`) protects a deployment. It is never
//! used directly: two independent subkeys are derived from it with HMAC-SHA256 under fixed labels,
//! one for token digests and one for sealing upstream keys, so that a digest can never be confused
//! with (or help attack) a ciphertext.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::secret::SecretBytes;

pub const MASTER_KEY_LEN: usize = 32;
pub const DEFAULT_MASTER_KEY_ENV: &str = "SHIELDKEY_MASTER_KEY";

const TOKEN_DIGEST_LABEL: &[u8] = b"shieldkey/v1/token-digest";
const SEAL_LABEL: &[u8] = b"shieldkey/v1/seal";

#[derive(Debug)]
pub struct MasterKey {
    digest_key: SecretBytes,
    seal_key: SecretBytes,
}

#[derive(Debug, PartialEq, Eq)]
pub enum MasterKeyError {
    Missing,
    NotBase64,
    WrongLength(usize),
}

impl std::fmt::Display for MasterKeyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MasterKeyError::Missing => write!(f, "master key is not set"),
            MasterKeyError::NotBase64 => write!(f, "master key is not valid base64"),
            MasterKeyError::WrongLength(n) => {
                write!(f, "master key must be {MASTER_KEY_LEN} bytes, got {n}")
            }
        }
    }
}

impl MasterKey {
    /// Parses the base64 text form (standard alphabet, padding optional, surrounding whitespace
    /// ignored so that a trailing newline from a file or `echo` does not matter).
    pub fn from_base64(text: &str) -> Result<Self, MasterKeyError> {
        let trimmed = text.trim();
        if trimmed.is_empty() {
            return Err(MasterKeyError::Missing);
        }
        let raw = SecretBytes::new(
            base64::engine::general_purpose::STANDARD_NO_PAD
                .decode(trimmed.trim_end_matches('='))
                .map_err(|_| MasterKeyError::NotBase64)?,
        );
        Self::from_bytes(raw.expose())
    }

    pub fn from_bytes(raw: &[u8]) -> Result<Self, MasterKeyError> {
        if raw.len() != MASTER_KEY_LEN {
            return Err(MasterKeyError::WrongLength(raw.len()));
        }
        Ok(MasterKey {
            digest_key: derive(raw, TOKEN_DIGEST_LABEL),
            seal_key: derive(raw, SEAL_LABEL),
        })
    }

    pub fn to_base64(raw: &[u8]) -> String {
        STANDARD.encode(raw)
    }

    pub fn digest_key(&self) -> &[u8] {
        self.digest_key.expose()
    }

    pub fn seal_key(&self) -> &[u8] {
        self.seal_key.expose()
    }
}

fn derive(master: &[u8], label: &[u8]) -> SecretBytes {
    // HMAC accepts keys of any length, so this cannot fail; the fallback keeps the code
    // panic-free and would only ever produce a key that opens nothing (fail closed).
    match <Hmac<Sha256> as Mac>::new_from_slice(master) {
        Ok(mut mac) => {
            mac.update(label);
            SecretBytes::new(mac.finalize().into_bytes().to_vec())
        }
        Err(_) => SecretBytes::new(vec![0u8; 32]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_derives_distinct_subkeys() {
        let text = STANDARD.encode([7u8; 32]);
        let key = MasterKey::from_base64(&format!("{text}\n")).unwrap();
        assert_eq!(key.digest_key().len(), 32);
        assert_ne!(key.digest_key(), key.seal_key());
        assert_ne!(key.digest_key(), &[7u8; 32][..]);
    }

    #[test]
    fn rejects_bad_input() {
        assert_eq!(
            MasterKey::from_base64("").unwrap_err(),
            MasterKeyError::Missing
        );
        assert_eq!(
            MasterKey::from_base64("  \n").unwrap_err(),
            MasterKeyError::Missing
        );
        assert_eq!(
            MasterKey::from_base64("%%%").unwrap_err(),
            MasterKeyError::NotBase64
        );
        let short = STANDARD.encode([1u8; 16]);
        assert_eq!(
            MasterKey::from_base64(&short).unwrap_err(),
            MasterKeyError::WrongLength(16)
        );
    }

    #[test]
    fn different_masters_give_different_subkeys() {
        let a = MasterKey::from_bytes(&[1u8; 32]).unwrap();
        let b = MasterKey::from_bytes(&[2u8; 32]).unwrap();
        assert_ne!(a.seal_key(), b.seal_key());
        assert_ne!(a.digest_key(), b.digest_key());
    }
}
