//! What the proxy-wasm host gives every worker's VM and a native module has to keep itself: the
//! shared-data store (ShieldKey's policy records and counters) and the stats.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use shieldkey::store::{SharedStore, StoreError};
use shieldkey::stream::host::MetricKind;

/// Proxy-wasm shared data, one namespace for the whole process (every worker thread): a value
/// and its CAS version per key, and the next version to hand out.
#[derive(Default)]
struct Entries {
    map: HashMap<String, (Vec<u8>, u32)>,
    next_cas: u32,
}

static STORE: Mutex<Option<Entries>> = Mutex::new(None);

/// A poisoned lock (a thread panicked holding it) cannot happen with `panic = "abort"`; taking
/// the data anyway keeps the code total.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The process-wide store, with Envoy's shared-data semantics (`shieldkey::store`): an empty
/// value reads as absent; a write with `cas` fails when the key exists, `cas` is not 0 and the
/// key's version differs; every write gets a new version (never 0).
pub struct ProcessStore;

impl SharedStore for ProcessStore {
    fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        let guard = lock(&STORE);
        let (value, cas) = guard.as_ref()?.map.get(key)?;
        if value.is_empty() {
            return None;
        }
        Some((value.clone(), *cas))
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError> {
        let mut guard = lock(&STORE);
        let entries = guard.get_or_insert_with(Entries::default);
        if let (Some(expected), Some((_, current))) = (cas, entries.map.get(key)) {
            if expected != 0 && expected != *current {
                return Err(StoreError::CasMismatch);
            }
        }
        entries.next_cas = entries.next_cas.wrapping_add(1).max(1);
        let version = entries.next_cas;
        match entries.map.get_mut(key) {
            // Reuses the key's allocation: the counters are rewritten on every request.
            Some(slot) => {
                slot.0.clear();
                slot.0.extend_from_slice(value);
                slot.1 = version;
            }
            None => {
                entries
                    .map
                    .insert(key.to_string(), (value.to_vec(), version));
            }
        }
        Ok(())
    }
}

/// How many stats the process can define; a define beyond it returns no id (the stat is not
/// kept, as when Envoy refuses one).
const MAX_METRICS: usize = 1 << 16;

/// The stats, in process memory only (this prototype does not hand them to Envoy): one atomic per
/// id, so recording is lock-free; names are only looked up when a stat is defined (each worker
/// defines a name once, `MetricIds`).
static VALUES: [AtomicI64; MAX_METRICS] = [const { AtomicI64::new(0) }; MAX_METRICS];
static NAMES: Mutex<Option<HashMap<String, u32>>> = Mutex::new(None);

pub fn define_metric(_kind: MetricKind, name: &str) -> Option<u32> {
    let mut guard = lock(&NAMES);
    let names = guard.get_or_insert_with(HashMap::new);
    if let Some(id) = names.get(name) {
        return Some(*id);
    }
    if names.len() >= MAX_METRICS {
        return None;
    }
    let id = u32::try_from(names.len()).ok()?;
    names.insert(name.to_string(), id);
    Some(id)
}

pub fn increment_metric(id: u32, by: i64) {
    if let Some(value) = VALUES.get(id as usize) {
        value.fetch_add(by, Ordering::Relaxed);
    }
}

pub fn record_metric(id: u32, value: u64) {
    if let Some(slot) = VALUES.get(id as usize) {
        slot.store(i64::try_from(value).unwrap_or(i64::MAX), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cas_semantics_match_envoy() {
        let s = ProcessStore;
        assert!(s.get("test.k").is_none());
        s.set("test.k", b"1", Some(42)).unwrap(); // absent key: CAS not checked
        let (v, cas) = s.get("test.k").unwrap();
        assert_eq!(v, b"1");
        s.set("test.k", b"2", Some(cas)).unwrap();
        assert_eq!(
            s.set("test.k", b"3", Some(cas)),
            Err(StoreError::CasMismatch)
        );
        s.set("test.k", b"3", Some(0)).unwrap(); // 0: not checked
        s.clear("test.k").unwrap();
        assert!(s.get("test.k").is_none());
    }

    #[test]
    fn metrics_are_defined_once_per_name() {
        let a = define_metric(MetricKind::Counter, "test.a").unwrap();
        assert_eq!(define_metric(MetricKind::Counter, "test.a"), Some(a));
        increment_metric(a, 2);
        increment_metric(a, 3);
        assert_eq!(VALUES[a as usize].load(Ordering::Relaxed), 5);
    }
}
