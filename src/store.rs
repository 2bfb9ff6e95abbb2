//! The shared key-value store the filter keeps policy records and counters in.
//!
//! In Envoy this is proxy-wasm shared data (one namespace per `vm_id`, visible to every worker,
//! compare-and-swap on a per-key version). The trait keeps the core testable natively and lets a
//! fleet-wide store back the same calls later.

use std::cell::RefCell;
use std::collections::HashMap;

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum StoreError {
    /// Someone else wrote the key since it was read; read again and retry.
    CasMismatch,
    /// The host refused the write for another reason.
    Failed,
}

pub trait SharedStore {
    /// The value and its CAS version. An absent or emptied key is `None`.
    fn get(&self, key: &str) -> Option<(Vec<u8>, u32)>;
    /// Writes `value`; with `cas` it fails with `CasMismatch` if the key changed since that
    /// version. As in Envoy, a CAS on a key that does not exist yet is not checked.
    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError>;
    /// Envoy cannot delete shared data: removal stores an empty value.
    fn clear(&self, key: &str) -> Result<(), StoreError> {
        self.set(key, &[], None)
    }
}

/// An in-memory store with Envoy's semantics, for tests and the CLI.
#[derive(Default)]
pub struct MemoryStore {
    entries: RefCell<HashMap<String, (Vec<u8>, u32)>>,
    next_cas: RefCell<u32>,
    /// How many reads were made (what publishing costs a root context).
    pub reads: std::cell::Cell<usize>,
    /// How many writes were attempted (each a host call in Envoy, compare-and-swap or not).
    pub writes: std::cell::Cell<usize>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn len(&self) -> usize {
        self.entries
            .borrow()
            .values()
            .filter(|(v, _)| !v.is_empty())
            .count()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Every key ever written, emptied ones included: Envoy never frees a shared-data key.
    pub fn key_count(&self) -> usize {
        self.entries.borrow().len()
    }
}

impl SharedStore for MemoryStore {
    fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        self.reads.set(self.reads.get() + 1);
        self.entries
            .borrow()
            .get(key)
            .filter(|(v, _)| !v.is_empty())
            .cloned()
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError> {
        self.writes.set(self.writes.get() + 1);
        let mut entries = self.entries.borrow_mut();
        if let (Some(expected), Some((_, current))) = (cas, entries.get(key)) {
            if expected != 0 && expected != *current {
                return Err(StoreError::CasMismatch);
            }
        }
        let mut next = self.next_cas.borrow_mut();
        *next = next.wrapping_add(1).max(1);
        entries.insert(key.to_string(), (value.to_vec(), *next));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cas_semantics_match_envoy() {
        let s = MemoryStore::new();
        assert!(s.get("k").is_none());
        s.set("k", b"1", Some(42)).unwrap(); // absent key: CAS not checked
        let (v, cas) = s.get("k").unwrap();
        assert_eq!(v, b"1");
        s.set("k", b"2", Some(cas)).unwrap();
        assert_eq!(s.set("k", b"3", Some(cas)), Err(StoreError::CasMismatch));
        s.clear("k").unwrap();
        assert!(s.get("k").is_none());
    }
}
