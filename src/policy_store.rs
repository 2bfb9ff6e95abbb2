//! Publishing a compiled policy into shared data, and reading one token's record back.
//!
//! Layout (all keys under the filter's `vm_id` namespace):
//! - `shieldkey/1/t/<fingerprint>/<token id>`: the token's record (`token_record`);
//! - `shieldkey/1/ids/<fingerprint>`: the ids published under that fingerprint (for clean-up);
//! - `shieldkey/1/ready/<fingerprint>`: written last, so a half-published policy is never used
//!   to skip publishing;
//! - `shieldkey/1/published`: the most recent fingerprints, newest last.
//!
//! Every root context of a configuration publishes the same deterministic records, so the race
//! between workers configuring at once is harmless. Records are namespaced by fingerprint, so a
//! worker still on the previous configuration keeps reading consistent, older records until
//! Envoy switches it over; records older than the last `KEEP_PUBLISHED` configurations are cleared.

use crate::policy::{Policy, TokenPolicy};
use crate::store::{SharedStore, StoreError};
use crate::token_record;

pub const KEEP_PUBLISHED: usize = 3;
const CAS_RETRIES: usize = 16;

pub fn record_key(fingerprint: &str, id: &str) -> String {
    format!("shieldkey/1/t/{fingerprint}/{id}")
}

fn ids_key(fingerprint: &str) -> String {
    format!("shieldkey/1/ids/{fingerprint}")
}

fn ready_key(fingerprint: &str) -> String {
    format!("shieldkey/1/ready/{fingerprint}")
}

const PUBLISHED_KEY: &str = "shieldkey/1/published";

#[derive(Debug, PartialEq, Eq)]
pub enum Published {
    /// This call wrote the records.
    Written,
    /// Another root context (another worker) had already published this configuration.
    AlreadyThere,
}

pub fn publish(store: &dyn SharedStore, policy: &Policy) -> Result<Published, StoreError> {
    let fp = policy.fingerprint.as_str();
    let outcome = if store.get(&ready_key(fp)).is_some() {
        Published::AlreadyThere
    } else {
        let mut ids = Vec::with_capacity(policy.tokens.len() * 12);
        for token in &policy.tokens {
            store.set(
                &record_key(fp, &token.id),
                &token_record::encode(token),
                None,
            )?;
            ids.extend_from_slice(token.id.as_bytes());
            ids.push(b'\n');
        }
        store.set(&ids_key(fp), &ids, None)?;
        store.set(&ready_key(fp), &policy.revision.to_le_bytes(), None)?;
        Published::Written
    };
    let evicted = mark_most_recent(store, fp)?;
    for old in evicted {
        clear_fingerprint(store, &old)?;
    }
    Ok(outcome)
}

/// Moves `fp` to the end of the published list; returns the fingerprints that fell off it.
fn mark_most_recent(store: &dyn SharedStore, fp: &str) -> Result<Vec<String>, StoreError> {
    for _ in 0..CAS_RETRIES {
        let (current, cas) = match store.get(PUBLISHED_KEY) {
            Some((v, cas)) => (String::from_utf8_lossy(&v).into_owned(), Some(cas)),
            None => (String::new(), None),
        };
        let mut list: Vec<&str> = current
            .split('\n')
            .filter(|s| !s.is_empty() && *s != fp)
            .collect();
        list.push(fp);
        let cut = list.len().saturating_sub(KEEP_PUBLISHED);
        let evicted: Vec<String> = list.drain(..cut).map(str::to_string).collect();
        match store.set(PUBLISHED_KEY, list.join("\n").as_bytes(), cas) {
            Ok(()) => return Ok(evicted),
            Err(StoreError::CasMismatch) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(StoreError::CasMismatch)
}

fn clear_fingerprint(store: &dyn SharedStore, fp: &str) -> Result<(), StoreError> {
    store.clear(&ready_key(fp))?;
    if let Some((ids, _)) = store.get(&ids_key(fp)) {
        for id in ids.split(|b| *b == b'\n').filter(|s| !s.is_empty()) {
            store.clear(&record_key(fp, &String::from_utf8_lossy(id)))?;
        }
    }
    store.clear(&ids_key(fp))
}

/// The record of token `id` under configuration `fingerprint`; `None` when unknown or corrupt.
pub fn lookup(store: &dyn SharedStore, fingerprint: &str, id: &str) -> Option<TokenPolicy> {
    let (bytes, _) = store.get(&record_key(fingerprint, id))?;
    token_record::decode(&bytes).filter(|t| t.id == id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;

    fn policy(fp: &str, ids: &[&str]) -> Policy {
        Policy {
            revision: 1,
            fingerprint: fp.into(),
            master_key_env: "K".into(),
            upstream_keys: vec![],
            settings: Default::default(),
            tokens: ids
                .iter()
                .map(|id| TokenPolicy {
                    id: id.to_string(),
                    digest: [1; 32],
                    upstream_key: 0,
                    owner: String::new(),
                    revoked: false,
                    not_before: None,
                    expires_at: None,
                    rules: Default::default(),
                })
                .collect(),
        }
    }

    #[test]
    fn publish_then_lookup() {
        let s = MemoryStore::new();
        assert_eq!(
            publish(&s, &policy("a1", &["x", "y"])).unwrap(),
            Published::Written
        );
        assert_eq!(
            publish(&s, &policy("a1", &["x", "y"])).unwrap(),
            Published::AlreadyThere
        );
        assert_eq!(lookup(&s, "a1", "x").unwrap().id, "x");
        assert!(lookup(&s, "a1", "z").is_none());
        assert!(lookup(&s, "b2", "x").is_none());
    }

    #[test]
    fn old_configurations_are_cleared_but_recent_ones_kept() {
        let s = MemoryStore::new();
        for fp in ["f1", "f2", "f3", "f4"] {
            publish(&s, &policy(fp, &["x"])).unwrap();
        }
        assert!(lookup(&s, "f1", "x").is_none(), "oldest cleared");
        for fp in ["f2", "f3", "f4"] {
            assert!(lookup(&s, fp, "x").is_some(), "{fp} kept");
        }
        // Re-applying an older configuration makes it the most recent again instead of
        // letting it be evicted while it serves.
        publish(&s, &policy("f2", &["x"])).unwrap();
        publish(&s, &policy("f5", &["x"])).unwrap();
        assert!(lookup(&s, "f2", "x").is_some());
        assert!(lookup(&s, "f3", "x").is_none());
    }
}
