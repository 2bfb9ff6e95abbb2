//! A worker's memory of the token secrets that verified: a token presented again with the same
//! secret is checked by a constant-time comparison with the secret that verified, instead of a
//! new HMAC-SHA256 (three SHA-256 blocks, the largest single cost of a request's own code in
//! the VM, which has no SHA instructions).
//!
//! Why this is as strong as verifying every time: the HMAC is deterministic, so a secret equal
//! byte for byte to one that verified against the same digest verifies again. An entry is used
//! only while the record's digest is the one it verified against (a token re-minted under the
//! same id, or changed in place by fleet mode, has a new digest, and the entry is then dropped),
//! and a different secret for the
//! same id is verified in full, never accepted from memory. The comparison takes the same time
//! wherever the bytes differ (`subtle`). Only secrets that verified are kept (a client guessing fills
//! nothing), at most `CAPACITY` of them per worker and configuration, in `SecretBytes` (wiped
//! when dropped, never printed).

use std::cell::RefCell;
use std::collections::HashMap;

use subtle::ConstantTimeEq;

use crate::secret::SecretBytes;
use crate::token_digest::{TokenVerifier, DIGEST_LEN};

/// Past this many remembered secrets, the memory starts again empty: a bound on memory, not an
/// eviction policy (a policy with more tokens in use than this only verifies more often).
pub const CAPACITY: usize = 4096;

/// Checks a presented secret against a token record's digest.
pub trait SecretCheck {
    fn verify(&self, id: &str, secret_text: &[u8], expected: &[u8; DIGEST_LEN]) -> bool;
}

impl SecretCheck for TokenVerifier {
    fn verify(&self, id: &str, secret_text: &[u8], expected: &[u8; DIGEST_LEN]) -> bool {
        TokenVerifier::verify(self, id, secret_text, expected)
    }
}

struct Verified {
    digest: [u8; DIGEST_LEN],
    secret_text: SecretBytes,
}

/// A `TokenVerifier` with this worker's memory of the secrets that verified.
pub struct RememberingVerifier {
    verifier: TokenVerifier,
    verified: RefCell<HashMap<String, Verified>>,
    /// Full verifications done, for the tests that show the memory is used.
    #[cfg(test)]
    hashed: std::cell::Cell<usize>,
}

impl RememberingVerifier {
    pub fn new(verifier: TokenVerifier) -> Self {
        RememberingVerifier {
            verifier,
            verified: RefCell::new(HashMap::new()),
            #[cfg(test)]
            hashed: std::cell::Cell::new(0),
        }
    }

    /// Whether `secret_text` is the one that verified against `expected` for `id`. An entry for
    /// another digest is dropped: its record changed (fleet mode changes records in place), and a
    /// secret of a record that is gone is not kept.
    fn remembers(&self, id: &str, secret_text: &[u8], expected: &[u8; DIGEST_LEN]) -> bool {
        let mut verified = self.verified.borrow_mut();
        match verified.get(id) {
            // The digest is public (it is in the record); the secret is compared in constant time.
            Some(v) if v.digest == *expected => {
                bool::from(v.secret_text.expose().ct_eq(secret_text))
            }
            Some(_) => {
                verified.remove(id);
                false
            }
            None => false,
        }
    }

    fn remember(&self, id: &str, secret_text: &[u8], expected: &[u8; DIGEST_LEN]) {
        let mut verified = self.verified.borrow_mut();
        if verified.len() >= CAPACITY && !verified.contains_key(id) {
            verified.clear();
        }
        verified.insert(
            id.to_string(),
            Verified {
                digest: *expected,
                secret_text: SecretBytes::new(secret_text.to_vec()),
            },
        );
    }

    #[cfg(test)]
    fn remembered(&self) -> usize {
        self.verified.borrow().len()
    }
}

impl SecretCheck for RememberingVerifier {
    fn verify(&self, id: &str, secret_text: &[u8], expected: &[u8; DIGEST_LEN]) -> bool {
        if self.remembers(id, secret_text, expected) {
            return true;
        }
        #[cfg(test)]
        self.hashed.set(self.hashed.get() + 1);
        let verified = self.verifier.verify(id, secret_text, expected);
        if verified {
            self.remember(id, secret_text, expected);
        }
        verified
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verifier() -> (RememberingVerifier, TokenVerifier) {
        let keyed = TokenVerifier::new(&[5u8; 32]).unwrap();
        (RememberingVerifier::new(keyed.clone()), keyed)
    }

    #[test]
    fn a_secret_that_verified_verifies_again_and_only_that_secret() {
        let (remembering, plain) = verifier();
        let digest = plain.digest("alice", b"right-secret");
        assert!(!remembering.verify("alice", b"wrong-secret", &digest));
        assert_eq!(
            remembering.remembered(),
            0,
            "a failed guess is not remembered"
        );
        assert!(remembering.verify("alice", b"right-secret", &digest));
        assert_eq!(remembering.remembered(), 1);
        assert!(remembering.verify("alice", b"right-secret", &digest));
        // A remembered secret does not let another one through, for the same id or another.
        assert!(!remembering.verify("alice", b"right-secreT", &digest));
        assert!(!remembering.verify("alice", b"right-secret-and-more", &digest));
        assert!(!remembering.verify("alice", b"", &digest));
        assert!(!remembering.verify("bob", b"right-secret", &digest));
    }

    #[test]
    fn a_new_digest_for_the_id_is_verified_in_full() {
        let (remembering, plain) = verifier();
        let old = plain.digest("alice", b"old-secret");
        assert!(remembering.verify("alice", b"old-secret", &old));
        // The token was re-minted under the same id: the old secret must stop working at once.
        let new = plain.digest("alice", b"new-secret");
        assert!(!remembering.verify("alice", b"old-secret", &new));
        assert!(remembering.verify("alice", b"new-secret", &new));
        assert!(!remembering.verify("alice", b"old-secret", &new));
    }

    #[test]
    fn a_digest_the_secret_does_not_match_is_refused_even_when_remembered() {
        // Memory is consulted only together with the digest it verified against.
        let (remembering, plain) = verifier();
        let digest = plain.digest("alice", b"secret");
        assert!(remembering.verify("alice", b"secret", &digest));
        let forged = [0u8; DIGEST_LEN];
        assert!(!remembering.verify("alice", b"secret", &forged));
    }

    #[test]
    fn memory_is_bounded() {
        let (remembering, plain) = verifier();
        for n in 0..CAPACITY + 10 {
            let id = format!("t{n}");
            let digest = plain.digest(&id, b"s");
            assert!(remembering.verify(&id, b"s", &digest));
            assert!(remembering.remembered() <= CAPACITY);
        }
        // Full at CAPACITY: started again empty, then the last 10 were remembered.
        assert_eq!(remembering.remembered(), 10);
    }

    #[test]
    fn a_secret_presented_again_is_compared_not_hashed() {
        let (remembering, plain) = verifier();
        let digest = plain.digest("alice", b"right-secret");
        for _ in 0..5 {
            assert!(remembering.verify("alice", b"right-secret", &digest));
        }
        assert_eq!(remembering.hashed.get(), 1, "hashed once, then compared");
        // A wrong secret is always hashed: memory never answers for it.
        assert!(!remembering.verify("alice", b"wrong-secret", &digest));
        assert!(!remembering.verify("alice", b"wrong-secret", &digest));
        assert_eq!(remembering.hashed.get(), 3);
    }

    #[test]
    fn a_changed_record_drops_the_remembered_secret() {
        let (remembering, plain) = verifier();
        let old = plain.digest("alice", b"old-secret");
        assert!(remembering.verify("alice", b"old-secret", &old));
        let new = plain.digest("alice", b"new-secret");
        assert!(!remembering.verify("alice", b"someone-else", &new));
        assert_eq!(
            remembering.remembered(),
            0,
            "the old record's secret is not kept"
        );
    }
}
