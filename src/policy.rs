//! The compiled policy: validated, with references resolved and upstream keys opened.
//!
//! A `Policy` is built once per configuration (`config::compile`). Its per-token part is
//! published into Envoy shared data as compact records (`token_record`, `policy_store`), so the
//! request path reads only the record of the token presented.

use crate::secret::SecretBytes;
use crate::token_digest::DIGEST_LEN;

#[derive(Debug)]
pub struct Policy {
    pub revision: u64,
    /// Hex prefix of SHA-256 over the configuration bytes: the namespace its token records are
    /// published under, so two configurations can never read each other's records.
    pub fingerprint: String,
    pub master_key_env: String,
    pub upstream_keys: Vec<UpstreamKey>,
    pub tokens: Vec<TokenPolicy>,
}

#[derive(Debug)]
pub struct UpstreamKey {
    pub id: String,
    /// The full `Authorization` header value (`Bearer <key>`), prepared once per configuration so
    /// the request path neither decrypts nor formats. `None` when compiled without the master key
    /// (the CLI's offline `check`).
    pub authorization: Option<SecretBytes>,
}

/// Everything the request path needs to judge one token. This is what a shared-data record holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenPolicy {
    pub id: String,
    pub digest: [u8; DIGEST_LEN],
    /// Index into `Policy::upstream_keys` of the same configuration.
    pub upstream_key: u16,
    pub owner: String,
    pub revoked: bool,
    /// Unix seconds.
    pub not_before: Option<i64>,
    /// Unix seconds.
    pub expires_at: Option<i64>,
}

impl Policy {
    pub fn revoked_count(&self) -> usize {
        self.tokens.iter().filter(|t| t.revoked).count()
    }

    pub fn authorization_for(&self, index: u16) -> Option<&SecretBytes> {
        self.upstream_keys
            .get(usize::from(index))
            .and_then(|k| k.authorization.as_ref())
    }
}
