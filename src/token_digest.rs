//! The stored form of a token secret: an HMAC-SHA256 digest, never the secret itself.
//!
//! `digest = HMAC-SHA256(digest_key, "shieldkey/v1\0" || id || "\0" || secret_text)`, where
//! `digest_key` is derived from the master key. Binding the id means a digest copied onto another
//! token record verifies nothing. Keying with a secret derived from the master key means a leaked
//! policy file cannot be brute-forced offline without the master key (though 256-bit secrets
//! would make that hopeless anyway).

use hmac::{Hmac, Mac};
use sha2::Sha256;

pub const DIGEST_LEN: usize = 32;
const DOMAIN: &[u8] = b"shieldkey/v1\0";

/// A keyed HMAC prepared once per configuration; cloning it per request skips re-keying.
#[derive(Clone)]
pub struct TokenVerifier {
    keyed: Hmac<Sha256>,
}

impl std::fmt::Debug for TokenVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenVerifier(<keyed>)")
    }
}

impl TokenVerifier {
    pub fn new(digest_key: &[u8]) -> Option<Self> {
        <Hmac<Sha256> as Mac>::new_from_slice(digest_key)
            .ok()
            .map(|keyed| TokenVerifier { keyed })
    }

    fn mac_for(&self, id: &str, secret_text: &[u8]) -> Hmac<Sha256> {
        let mut mac = self.keyed.clone();
        mac.update(DOMAIN);
        mac.update(id.as_bytes());
        mac.update(b"\0");
        mac.update(secret_text);
        mac
    }

    pub fn digest(&self, id: &str, secret_text: &[u8]) -> [u8; DIGEST_LEN] {
        self.mac_for(id, secret_text).finalize().into_bytes().into()
    }

    /// Constant-time comparison (the `hmac` crate compares with `subtle`).
    pub fn verify(&self, id: &str, secret_text: &[u8], expected: &[u8; DIGEST_LEN]) -> bool {
        self.mac_for(id, secret_text).verify_slice(expected).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verifies_only_the_right_secret_and_id() {
        let v = TokenVerifier::new(&[3u8; 32]).unwrap();
        let d = v.digest("alice", b"secret-one");
        assert!(v.verify("alice", b"secret-one", &d));
        assert!(!v.verify("alice", b"secret-two", &d));
        assert!(!v.verify("bob", b"secret-one", &d));
        let other = TokenVerifier::new(&[4u8; 32]).unwrap();
        assert!(!other.verify("alice", b"secret-one", &d));
    }

    #[test]
    fn id_and_secret_boundary_is_unambiguous() {
        let v = TokenVerifier::new(&[3u8; 32]).unwrap();
        assert_ne!(v.digest("ab", b"c"), v.digest("a", b"bc"));
    }
}
