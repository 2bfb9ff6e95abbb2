//! Sealed upstream keys: AES-256-GCM under a key derived from the master key.
//!
//! Text form (versioned, documented in the README): `skseal:v1:<nonce>:<ciphertext>` where both
//! parts are unpadded base64url, the nonce is 96 random bits and the ciphertext carries the
//! 128-bit tag. The upstream key's id (e.g. `prod`) is bound as associated data, so a ciphertext
//! moved to another entry does not open.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;

use crate::secret::SecretBytes;

pub const SEALED_PREFIX: &str = "skseal:v1:";
pub const NONCE_LEN: usize = 12;
const AAD_PREFIX: &[u8] = b"shieldkey/v1/upstream-key:";

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum SealError {
    /// Not in the `skseal:v1:` text form.
    BadFormat,
    /// Authentication failed: wrong master key, wrong key id, or tampered ciphertext.
    /// (AES-GCM cannot tell these apart, by design.)
    CannotOpen,
    /// The opened key is not usable as an HTTP header value.
    BadPlaintext,
}

impl std::fmt::Display for SealError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SealError::BadFormat => "not a sealed key (expected skseal:v1:<nonce>:<ciphertext>)",
            SealError::CannotOpen => {
                "cannot open sealed key: wrong master key, wrong key id, or tampered ciphertext"
            }
            SealError::BadPlaintext => "sealed key opens to a value that is not a valid API key",
        })
    }
}

fn aad(key_id: &str) -> Vec<u8> {
    let mut aad = AAD_PREFIX.to_vec();
    aad.extend_from_slice(key_id.as_bytes());
    aad
}

/// Seals `plaintext` for the entry `key_id`. The caller supplies a fresh random nonce.
pub fn seal(
    seal_key: &[u8],
    key_id: &str,
    plaintext: &[u8],
    nonce: &[u8; NONCE_LEN],
) -> Result<String, SealError> {
    let cipher = Aes256Gcm::new_from_slice(seal_key).map_err(|_| SealError::CannotOpen)?;
    let aad = aad(key_id);
    let ciphertext = cipher
        .encrypt(
            Nonce::from_slice(nonce),
            Payload {
                msg: plaintext,
                aad: &aad,
            },
        )
        .map_err(|_| SealError::CannotOpen)?;
    Ok(format!(
        "{SEALED_PREFIX}{}:{}",
        URL_SAFE_NO_PAD.encode(nonce),
        URL_SAFE_NO_PAD.encode(ciphertext)
    ))
}

/// Checks the text form without opening it (used where the master key is not at hand).
pub fn check_format(sealed: &str) -> Result<(), SealError> {
    split(sealed).map(|_| ())
}

fn split(sealed: &str) -> Result<([u8; NONCE_LEN], Vec<u8>), SealError> {
    let body = sealed
        .trim()
        .strip_prefix(SEALED_PREFIX)
        .ok_or(SealError::BadFormat)?;
    let (nonce_text, ct_text) = body.split_once(':').ok_or(SealError::BadFormat)?;
    let nonce_vec = URL_SAFE_NO_PAD
        .decode(nonce_text)
        .map_err(|_| SealError::BadFormat)?;
    let nonce: [u8; NONCE_LEN] = nonce_vec.try_into().map_err(|_| SealError::BadFormat)?;
    let ciphertext = URL_SAFE_NO_PAD
        .decode(ct_text)
        .map_err(|_| SealError::BadFormat)?;
    // A GCM ciphertext is at least the 16-byte tag; an empty key is useless anyway.
    if ciphertext.len() <= 16 {
        return Err(SealError::BadFormat);
    }
    Ok((nonce, ciphertext))
}

/// Opens a sealed key into wiping memory. The plaintext must be a printable ASCII token,
/// since it goes into an `Authorization` header.
pub fn open(seal_key: &[u8], key_id: &str, sealed: &str) -> Result<SecretBytes, SealError> {
    let (nonce, ciphertext) = split(sealed)?;
    let cipher = Aes256Gcm::new_from_slice(seal_key).map_err(|_| SealError::CannotOpen)?;
    let aad = aad(key_id);
    let plaintext = SecretBytes::new(
        cipher
            .decrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: &ciphertext,
                    aad: &aad,
                },
            )
            .map_err(|_| SealError::CannotOpen)?,
    );
    if !is_header_safe_key(plaintext.expose()) {
        return Err(SealError::BadPlaintext);
    }
    Ok(plaintext)
}

/// An upstream key must be visible ASCII without spaces: anything else would corrupt the header.
pub fn is_header_safe_key(key: &[u8]) -> bool {
    !key.is_empty() && key.len() <= 512 && key.iter().all(|b| b.is_ascii_graphic())
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: [u8; 32] = [5u8; 32];
    const NONCE: [u8; NONCE_LEN] = [1u8; NONCE_LEN];
    const REAL: &[u8] = b"abcdefghijklmnopqrstuvwxyz012345";

    #[test]
    fn seal_then_open() {
        let s = seal(&KEY, "prod", REAL, &NONCE).unwrap();
        assert!(s.starts_with("skseal:v1:"));
        assert!(!s.contains("abcdefghij"));
        assert_eq!(open(&KEY, "prod", &s).unwrap().expose(), REAL);
    }

    #[test]
    fn wrong_key_wrong_id_tampered_all_fail() {
        let s = seal(&KEY, "prod", REAL, &NONCE).unwrap();
        assert_eq!(
            open(&[6u8; 32], "prod", &s).unwrap_err(),
            SealError::CannotOpen
        );
        assert_eq!(open(&KEY, "dev", &s).unwrap_err(), SealError::CannotOpen);
        // Flip one character of the ciphertext part.
        let (head, ct) = s.rsplit_once(':').unwrap();
        let mut bytes = ct.as_bytes().to_vec();
        bytes[3] = if bytes[3] == b'A' { b'B' } else { b'A' };
        let tampered = format!("{head}:{}", String::from_utf8(bytes).unwrap());
        assert_eq!(
            open(&KEY, "prod", &tampered).unwrap_err(),
            SealError::CannotOpen
        );
    }

    #[test]
    fn bad_formats() {
        for bad in [
            "",
            "abc",
            "skseal:v2:AAAA:BBBB",
            "skseal:v1:AAAA",
            "skseal:v1:!!!:BBBB",
            "skseal:v1:AQEBAQEBAQEBAQEB:AAAA",
        ] {
            assert_eq!(
                check_format(bad).unwrap_err(),
                SealError::BadFormat,
                "{bad}"
            );
        }
    }

    #[test]
    fn refuses_plaintext_that_cannot_be_a_header() {
        let s = seal(&KEY, "prod", b"bad key\r\n", &NONCE).unwrap();
        assert_eq!(open(&KEY, "prod", &s).unwrap_err(), SealError::BadPlaintext);
    }
}
