//! Publishing a compiled policy into shared data, and reading one token's record back, with a key
//! set bounded by the tokens that exist or have existed, never by the number of reloads (Envoy
//! never frees a shared-data key: a key per configuration would leak on every revocation).
//!
//! Layout (all keys under the filter's `vm_id` namespace):
//! - `shieldkey/2/t/<token id>`: the token's record *history*: up to a few
//!   `(from_generation, record)` entries, newest last; an empty record is a tombstone (the token
//!   was removed). Updated in place.
//! - `shieldkey/2/generations`: the fingerprints of the last `KEEP_GENERATIONS` configurations
//!   with the generation number each was given, and the next number.
//! - `shieldkey/2/ids`: the ids whose history is not empty (to write tombstones for tokens a new
//!   configuration removes, and to clear them once no configuration can read them).
//!
//! A configuration reads, for each token, the newest entry whose generation is not after its
//! own; entries a newer configuration adds are after it, so a worker still on the previous
//! configuration keeps reading exactly its own records while the next one is published: never a
//! mix. Publishing writes only the tokens whose record changed (work proportional to the change;
//! compiling the whole configuration is still O(tokens), since Envoy hands over the whole
//! document). Entries no configuration among the last `KEEP_GENERATIONS` can read are pruned.

use crate::codec::{Reader, Writer};
use crate::policy::{Policy, TokenPolicy};
use crate::store::{SharedStore, StoreError};
use crate::token_record;

/// Configurations whose records stay readable: the newest and the ones before it that a worker
/// may still be switching away from.
pub const KEEP_GENERATIONS: u64 = 3;
const CAS_RETRIES: usize = 16;
const HISTORY_VERSION: u8 = 1;
const GENERATIONS_VERSION: u8 = 1;
const GENERATIONS_KEY: &str = "shieldkey/2/generations";
const IDS_KEY: &str = "shieldkey/2/ids";

pub fn record_key(id: &str) -> String {
    format!("shieldkey/2/t/{id}")
}

/// What publishing did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publication {
    /// The generation this configuration reads its records at.
    pub generation: u64,
    /// Token keys written (0 when another root context had already published it).
    pub written: usize,
}

/// Publishes `policy` (idempotent: every root context of a configuration calls it, and only the
/// first writes anything).
pub fn publish(store: &dyn SharedStore, policy: &Policy) -> Result<Publication, StoreError> {
    let mut publisher = match Publisher::start(store, &policy.fingerprint)? {
        Started::Publishing(p) => p,
        Started::AlreadyPublished(publication) => return Ok(publication),
    };
    for token in policy.tokens.iter().chain(&policy.teams) {
        publisher.put(token)?;
    }
    publisher.finish()
}

/// What `Publisher::start` found.
pub enum Started<'s> {
    /// This root context writes the records, one by one (`put`), then `finish`.
    Publishing(Publisher<'s>),
    /// Another root context of the same configuration published all of it already: nothing to
    /// read, compile or write.
    AlreadyPublished(Publication),
}

/// Publishes one configuration's records as they are compiled, so a configuration with many
/// tokens never holds them all at once (WebAssembly memory never shrinks: a VM's peak while
/// loading stays resident).
pub struct Publisher<'s> {
    store: &'s dyn SharedStore,
    generation: u64,
    oldest_readable: u64,
    ids: Vec<String>,
    written: usize,
}

impl<'s> Publisher<'s> {
    pub fn start(store: &'s dyn SharedStore, fingerprint: &str) -> Result<Started<'s>, StoreError> {
        let (generation, complete) = claim_generation(store, fingerprint)?;
        if complete {
            return Ok(Started::AlreadyPublished(Publication {
                generation,
                written: 0,
            }));
        }
        Ok(Started::Publishing(Publisher {
            store,
            generation,
            oldest_readable: generation.saturating_sub(KEEP_GENERATIONS - 1),
            ids: Vec::new(),
            written: 0,
        }))
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Writes one token's (or team's) record at this generation.
    pub fn put(&mut self, token: &TokenPolicy) -> Result<(), StoreError> {
        self.put_record(&token.id, &token_record::encode(token))
    }

    /// Writes a record already encoded (`token_record::encode`) for `id`.
    pub fn put_record(&mut self, id: &str, record: &[u8]) -> Result<(), StoreError> {
        self.put_record_then(id, record, &mut || Ok(()))
    }

    /// `put_record`, calling `before_write` first when the record is new or changed, and only
    /// then: what a record's readers need must exist before the record does (its counters), and
    /// an unchanged record had that done when it was first written.
    pub fn put_record_then(
        &mut self,
        id: &str,
        record: &[u8],
        before_write: &mut dyn FnMut() -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        if put_entry(
            self.store,
            id,
            self.generation,
            record,
            self.oldest_readable,
            before_write,
        )? {
            self.written += 1;
        }
        self.ids.push(id.to_string());
        Ok(())
    }

    /// Tombstones for the records of earlier configurations this one does not have; they stay
    /// in the id list until no configuration can read them any more and their value is cleared.
    pub fn finish(mut self) -> Result<Publication, StoreError> {
        let (store, generation, oldest_readable) =
            (self.store, self.generation, self.oldest_readable);
        self.ids.sort_unstable();
        let current = self.ids.len();
        let previous = store.get(IDS_KEY).map(|(v, _)| v).unwrap_or_default();
        for old in previous.split(|b| *b == b'\n').filter(|s| !s.is_empty()) {
            let old = String::from_utf8_lossy(old).into_owned();
            if self.ids[..current].binary_search(&old).is_ok() {
                continue;
            }
            if put_entry(
                store,
                &old,
                generation,
                &[],
                oldest_readable,
                &mut || Ok(()),
            )? {
                self.written += 1;
            }
            if store.get(&record_key(&old)).is_some() {
                self.ids.push(old);
            }
        }
        self.ids.sort_unstable();
        let list = self.ids.join("\n").into_bytes();
        if previous != list {
            store.set(IDS_KEY, &list, None)?;
        }
        mark_complete(store, generation)?;
        Ok(Publication {
            generation,
            written: self.written,
        })
    }
}

/// The record of token `id` as configuration `generation` sees it; `None` when unknown, removed,
/// corrupt, or no longer readable at that generation.
pub fn lookup(store: &dyn SharedStore, generation: u64, id: &str) -> Option<TokenPolicy> {
    let (bytes, _) = store.get(&record_key(id))?;
    let history = History::decode(&bytes)?;
    let record = history.at(generation)?;
    token_record::decode(record).filter(|t| t.id == id)
}

/// Fleet mode: sets token `id`'s record (or removes it, `None`) as of etcd revision `generation`,
/// keeping only the newest entry: every reader follows the newest record there.
pub fn put_newest(
    store: &dyn SharedStore,
    id: &str,
    generation: u64,
    record: Option<&[u8]>,
) -> Result<bool, StoreError> {
    put_entry(
        store,
        id,
        generation,
        record.unwrap_or_default(),
        generation,
        &mut || Ok(()),
    )
}

/// Fleet mode: the newest record of token `id`, and the shared-data version it was read at (a
/// cache of the decoded record stays valid while that version does).
pub fn lookup_newest(store: &dyn SharedStore, id: &str) -> Option<(TokenPolicy, u32)> {
    let (bytes, cas) = store.get(&record_key(id))?;
    Some((decode_newest(&bytes, id)?, cas))
}

/// The newest record in the value of `record_key(id)`.
pub fn decode_newest(value: &[u8], id: &str) -> Option<TokenPolicy> {
    let history = History::decode(value)?;
    token_record::decode(history.at(u64::MAX)?).filter(|t| t.id == id)
}

/// The generation of configuration `fingerprint`, and whether it is completely published: the
/// newest one's number when it is the newest (every root context of one configuration agrees),
/// else a new number (a configuration applied again after another gets fresh records, so rolling
/// back is exact).
fn claim_generation(store: &dyn SharedStore, fingerprint: &str) -> Result<(u64, bool), StoreError> {
    for _ in 0..CAS_RETRIES {
        let current = store.get(GENERATIONS_KEY);
        let mut known = current
            .as_ref()
            .and_then(|(v, _)| Generations::decode(v))
            .unwrap_or_default();
        if let Some((fp, generation, complete)) = known.recent.last() {
            if fp == fingerprint {
                return Ok((*generation, *complete));
            }
        }
        let generation = known.next.max(1);
        known.next = generation + 1;
        known
            .recent
            .push((fingerprint.to_string(), generation, false));
        let excess = known.recent.len().saturating_sub(KEEP_GENERATIONS as usize);
        known.recent.drain(..excess);
        match store.set(
            GENERATIONS_KEY,
            &known.encode(),
            current.map(|(_, cas)| cas),
        ) {
            Ok(()) => return Ok((generation, false)),
            Err(StoreError::CasMismatch) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(StoreError::CasMismatch)
}

/// Records that every record of `generation` is written, so the other root contexts of the same
/// configuration skip reading them all again.
fn mark_complete(store: &dyn SharedStore, generation: u64) -> Result<(), StoreError> {
    for _ in 0..CAS_RETRIES {
        let Some((value, cas)) = store.get(GENERATIONS_KEY) else {
            return Ok(());
        };
        let mut known = Generations::decode(&value).unwrap_or_default();
        let Some(entry) = known.recent.iter_mut().find(|(_, g, _)| *g == generation) else {
            return Ok(());
        };
        if entry.2 {
            return Ok(());
        }
        entry.2 = true;
        match store.set(GENERATIONS_KEY, &known.encode(), Some(cas)) {
            Ok(()) => return Ok(()),
            Err(StoreError::CasMismatch) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(StoreError::CasMismatch)
}

/// Adds `(generation, record)` to a token's history unless the history already says exactly
/// that at this generation. Returns whether it wrote; `before_write` runs once, before the first
/// write.
fn put_entry(
    store: &dyn SharedStore,
    id: &str,
    generation: u64,
    record: &[u8],
    oldest_readable: u64,
    before_write: &mut dyn FnMut() -> Result<(), StoreError>,
) -> Result<bool, StoreError> {
    let key = record_key(id);
    let mut prepared = false;
    for _ in 0..CAS_RETRIES {
        let current = store.get(&key);
        let mut history = current
            .as_ref()
            .and_then(|(v, _)| History::decode(v))
            .unwrap_or_default();
        if !record.is_empty() && history.at(generation) == Some(record) {
            // Unchanged: the common case of a reload that changed other tokens.
            return Ok(false);
        }
        // A root context of an older configuration publishing late must not bury newer
        // entries: what is at or after this generation is this configuration's to replace.
        history.entries.retain(|(from, _)| *from < generation);
        let already_removed = history.entries.last().is_none_or(|(_, r)| r.is_empty());
        if !(record.is_empty() && already_removed) {
            history.entries.push((generation, record.to_vec()));
        }
        history.prune(oldest_readable);
        let value = if history.entries.is_empty() || history.only_tombstone() {
            Vec::new()
        } else {
            history.encode()
        };
        if current
            .as_ref()
            .map_or(value.is_empty(), |(v, _)| *v == value)
        {
            return Ok(false);
        }
        if !prepared {
            before_write()?;
            prepared = true;
        }
        match store.set(&key, &value, current.map(|(_, cas)| cas)) {
            Ok(()) => return Ok(true),
            Err(StoreError::CasMismatch) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(StoreError::CasMismatch)
}

#[derive(Debug, Default)]
struct History {
    /// `(from_generation, record)`, ascending; an empty record is a tombstone.
    entries: Vec<(u64, Vec<u8>)>,
}

impl History {
    fn at(&self, generation: u64) -> Option<&[u8]> {
        let (_, record) = self
            .entries
            .iter()
            .rev()
            .find(|(from, _)| *from <= generation)?;
        (!record.is_empty()).then_some(record.as_slice())
    }

    fn only_tombstone(&self) -> bool {
        matches!(self.entries.as_slice(), [(_, record)] if record.is_empty())
    }

    /// Keeps what a generation at or after `oldest_readable` can read: every entry after it,
    /// and the newest entry at or before it.
    fn prune(&mut self, oldest_readable: u64) {
        let keep_from = self
            .entries
            .iter()
            .rposition(|(from, _)| *from <= oldest_readable)
            .unwrap_or(0);
        self.entries.drain(..keep_from);
    }

    fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new(HISTORY_VERSION);
        w.u8(u8::try_from(self.entries.len()).unwrap_or(u8::MAX));
        for (from, record) in self.entries.iter().take(usize::from(u8::MAX)) {
            w.u64(*from).bytes(record);
        }
        w.finish()
    }

    fn decode(data: &[u8]) -> Option<History> {
        let mut r = Reader::new(data, HISTORY_VERSION)?;
        let count = r.u8()?;
        let mut entries = Vec::with_capacity(usize::from(count));
        for _ in 0..count {
            entries.push((r.u64()?, r.bytes()?.to_vec()));
        }
        r.is_done().then_some(History { entries })
    }
}

#[derive(Debug, Default)]
struct Generations {
    next: u64,
    /// (fingerprint, generation, completely published), oldest first.
    recent: Vec<(String, u64, bool)>,
}

impl Generations {
    fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new(GENERATIONS_VERSION);
        w.u64(self.next)
            .u8(u8::try_from(self.recent.len()).unwrap_or(u8::MAX));
        for (fp, generation, complete) in &self.recent {
            w.bytes(fp.as_bytes())
                .u64(*generation)
                .u8(u8::from(*complete));
        }
        w.finish()
    }

    fn decode(data: &[u8]) -> Option<Generations> {
        let mut r = Reader::new(data, GENERATIONS_VERSION)?;
        let next = r.u64()?;
        let count = r.u8()?;
        let mut recent = Vec::with_capacity(usize::from(count));
        for _ in 0..count {
            recent.push((r.string()?, r.u64()?, r.u8()? == 1));
        }
        r.is_done().then_some(Generations { next, recent })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;

    fn token(id: &str, revoked: bool) -> TokenPolicy {
        TokenPolicy {
            id: id.to_string(),
            digest: [1; 32],
            upstream_key: 0,
            owner: String::new(),
            revoked,
            not_before: None,
            expires_at: None,
            team: None,
            rules: Default::default(),
        }
    }

    fn policy(fp: &str, tokens: Vec<TokenPolicy>) -> Policy {
        Policy {
            revision: 1,
            fingerprint: fp.into(),
            master_key_env: "K".into(),
            upstream_keys: vec![],
            settings: Default::default(),
            tokens,
            teams: vec![],
        }
    }

    fn tokens(n: usize, revoked: Option<usize>) -> Vec<TokenPolicy> {
        (0..n)
            .map(|i| token(&format!("t{i}"), Some(i) == revoked))
            .collect()
    }

    #[test]
    fn publish_then_lookup_and_every_root_context_agrees() {
        let s = MemoryStore::new();
        let p = policy("a1", tokens(2, None));
        let first = publish(&s, &p).unwrap();
        assert_eq!(first.written, 2);
        let again = publish(&s, &p).unwrap();
        assert_eq!(
            again,
            Publication {
                generation: first.generation,
                written: 0
            }
        );
        assert_eq!(lookup(&s, first.generation, "t0").unwrap().id, "t0");
        assert!(lookup(&s, first.generation, "zz").is_none());
    }

    #[test]
    fn the_key_set_is_bounded_by_the_tokens_not_by_the_reloads() {
        let s = MemoryStore::new();
        let mut keys_after = Vec::new();
        for reload in 0..200 {
            // Every reload revokes a different token, as a day of revocations would.
            publish(
                &s,
                &policy(&format!("fp{reload}"), tokens(50, Some(reload % 50))),
            )
            .unwrap();
            keys_after.push(s.key_count());
        }
        // 50 token keys, the id list and the generation list; no key per configuration.
        assert_eq!(keys_after[0], 52);
        assert!(keys_after.iter().all(|k| *k == 52), "{keys_after:?}");
        // And each value holds at most a few generations.
        let (bytes, _) = s.get(&record_key("t7")).unwrap();
        assert!(History::decode(&bytes).unwrap().entries.len() <= KEEP_GENERATIONS as usize);
    }

    #[test]
    fn a_change_writes_only_what_changed() {
        let s = MemoryStore::new();
        publish(&s, &policy("a", tokens(1000, None))).unwrap();
        let revoke_one = publish(&s, &policy("b", tokens(1000, Some(3)))).unwrap();
        assert_eq!(revoke_one.written, 1);
        let mut fewer = tokens(1000, Some(3));
        fewer.pop();
        assert_eq!(publish(&s, &policy("c", fewer)).unwrap().written, 1);
    }

    #[test]
    fn a_reader_on_the_old_generation_never_sees_the_new_records() {
        let s = MemoryStore::new();
        let old = publish(
            &s,
            &policy("old", vec![token("a", false), token("b", false)]),
        )
        .unwrap();
        // The next configuration revokes a, removes b and adds c: published while a worker
        // still serves the old one.
        let new = publish(
            &s,
            &policy("new", vec![token("a", true), token("c", false)]),
        )
        .unwrap();
        assert!(new.generation > old.generation);
        assert!(!lookup(&s, old.generation, "a").unwrap().revoked);
        assert!(lookup(&s, old.generation, "b").is_some());
        assert!(lookup(&s, old.generation, "c").is_none());
        assert!(lookup(&s, new.generation, "a").unwrap().revoked);
        assert!(lookup(&s, new.generation, "b").is_none());
        assert!(lookup(&s, new.generation, "c").is_some());
        // A root context of the old configuration configuring late changes nothing for anyone.
        assert_eq!(
            publish(
                &s,
                &policy("old", vec![token("a", false), token("b", false)])
            )
            .unwrap()
            .generation,
            new.generation + 1,
            "applying the old configuration again is a new generation"
        );
        assert!(lookup(&s, new.generation, "a").unwrap().revoked);
    }

    #[test]
    fn rolling_back_to_an_earlier_configuration_is_exact() {
        let s = MemoryStore::new();
        let a = policy("A", vec![token("x", false)]);
        let b = policy("B", vec![token("x", true), token("y", false)]);
        publish(&s, &a).unwrap();
        publish(&s, &b).unwrap();
        let again = publish(&s, &a).unwrap();
        assert!(!lookup(&s, again.generation, "x").unwrap().revoked);
        assert!(lookup(&s, again.generation, "y").is_none());
    }

    #[test]
    fn removed_tokens_leave_no_value_once_nothing_can_read_them() {
        let s = MemoryStore::new();
        publish(
            &s,
            &policy("g1", vec![token("x", false), token("gone", false)]),
        )
        .unwrap();
        for g in 2..=(2 + KEEP_GENERATIONS) {
            publish(&s, &policy(&format!("g{g}"), vec![token("x", g % 2 == 0)])).unwrap();
        }
        assert!(s.get(&record_key("gone")).is_none());
    }
}
