//! The syncer: follows `<prefix>policy/` in etcd and writes it into shared data. A state machine
//! with no host calls of its own: the glue asks it for the next call on every tick, sends it
//! through Envoy's callout, and hands it the reply. One call is in flight at a time.
//!
//! Records are keyed by *subject id*: a token's id, or `team.<id>` for a team (`crate::team`);
//! token ids cannot contain a dot, so the two never collide. A team is a record like a token's,
//! so everything below (and the leases, flushed spend and rate counts, which look limits up by
//! subject id) treats the two alike.
//!
//! - Loading: every policy key, page by page at one store revision (a consistent snapshot); then
//!   the base document (settings + sealed upstream keys) and every team's and token's compiled
//!   record are written, subjects no longer there are removed, and it follows from that revision.
//! - Following: every `sync_interval_ms`, the keys modified after the followed revision
//!   (`min_mod_revision`); a changed token or team rewrites its one record in place; a change to
//!   the settings or the upstream keys loads everything again (token records name keys by index).
//! - Reconciling: every `reconcile_interval_ms`, the names of the policy keys (no values), to
//!   notice removed tokens and teams (a range by modification revision cannot show a deletion).
//!
//! A token or team key that does not parse, names another id, or does not compile removes its
//! record (fail closed) rather than leaving the previous state in force.
//!
//! Failures (etcd down, no quorum, a bad reply) leave shared data as it was: Envoy keeps enforcing
//! the last policy it read, and the syncer tries again on the next tick.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::alerts::{AlertStep, FleetAlerts};
use super::etcd::{parse_range, prefix_end, Kv, Range, RANGE_PATH};
use super::flush_queue::FlushQueue;
use super::lease;
use super::sweep::{LedgerSweep, SweepStep};
use super::{FleetSettings, BASE_KEY};
use crate::config::compile::{compile, compile_token, CompileOptions};
use crate::config::raw::{RawPolicy, RawTeam, RawToken, RawUpstreamKey};
use crate::ledger::{Ledger, SharedDataLedger};
use crate::money::NanoUsd;
use crate::policy::TokenPolicy;
use crate::policy_store;
use crate::store::SharedStore;
use crate::{team, token, token_record};

/// Keys per page.
pub const PAGE: u64 = 1_000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    pub path: &'static str,
    pub body: Vec<u8>,
}

#[derive(Debug, Default)]
struct Snapshot {
    settings: Option<Vec<u8>>,
    settings_mod: u64,
    keys: Vec<(String, Vec<u8>)>,
    tokens: Vec<(String, Vec<u8>, u64)>,
    teams: Vec<(String, Vec<u8>, u64)>,
}

#[derive(Debug)]
enum Phase {
    Loading {
        at: u64,
        next: Vec<u8>,
        snapshot: Snapshot,
    },
    /// Reading the settings key alone, which the CLI rewrites with every change: a change scan
    /// runs only when it moved, so following costs etcd one key per interval, not a scan of
    /// the whole policy.
    Probing,
    Following {
        /// Paging through one batch of changes: (snapshot revision, next key).
        page: Option<(u64, Vec<u8>)>,
    },
    Reconciling {
        at: u64,
        next: Vec<u8>,
        seen: BTreeSet<String>,
    },
    /// After the first load: this Envoy's spend as flushed before a restart comes back into the
    /// local counters before the policy is served (`fleet::lease`).
    Restoring {
        at: u64,
        next: Vec<u8>,
        restored: usize,
    },
}

/// What the last reply did, for logs and stats.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The call failed (status, or an unreadable reply): retried on a later tick.
    Failed(String),
    /// A page was read; more follow.
    Paging,
    /// The whole policy was loaded at `revision`.
    Loaded {
        revision: u64,
        tokens: usize,
        teams: usize,
    },
    /// Changes after the followed revision were applied.
    Applied { revision: u64, records: usize },
    /// Removed tokens and teams were noticed and cleared.
    Reconciled { removed: usize },
    /// This Envoy's spend was read back from etcd; the policy is served from now on.
    Restored { tokens: usize },
    /// The policy in etcd is not usable (no settings, invalid settings or keys): nothing changed.
    Rejected(String),
}

pub struct PolicySync {
    settings: FleetSettings,
    /// This Envoy's `node.id`: its budget leases and spend in etcd are its own.
    node: String,
    /// The base document of the first load, written once the spend is restored.
    pending_base: Option<Vec<u8>>,
    /// Spend may be flushed only after it was restored (or the flush would lower it).
    restored: bool,
    /// Tokens whose spend changed since the last flush, and the ones being flushed.
    dirty: FlushQueue,
    flushing: Option<Flushing>,
    next_flush_ms: i64,
    /// Budgeted tokens this Envoy spent on (and so may hold a lease of), the leases being given
    /// back, and the return in progress.
    leased: BTreeSet<String>,
    to_return: std::collections::VecDeque<(String, i64, NanoUsd)>,
    returning: Option<Return>,
    next_return_scan_ms: i64,
    /// Fleet-wide budget alerts, judged on the fleet's spend after each flush.
    alerts: FleetAlerts,
    /// Ended budget windows' keys leaving etcd.
    sweep: LedgerSweep,
    /// Fleet-wide rate limits: the read of the other Envoys' counts.
    rates_in_flight: bool,
    next_rates_ms: i64,
    rates_minute: i64,
    cleaned_minute: i64,
    phase: Phase,
    /// The store revision shared data reflects (0: nothing loaded yet).
    revision: u64,
    in_flight: bool,
    next_due_ms: i64,
    next_reconcile_ms: i64,
    /// Subject ids (token ids, `team.<id>`) with a record in shared data, and the modification
    /// revision of the etcd key it was compiled from: a listing read at an older revision has
    /// not seen what was created after it, which is not a deletion.
    known: BTreeMap<String, u64>,
    /// Upstream key ids of the current base, in index order.
    key_ids: Vec<String>,
    /// The settings of the current base without their `revision`: every CLI change bumps the
    /// revision, which alone must not reload everything.
    settings_doc: Option<Vec<u8>>,
    /// The settings key's modification revision as last seen, and whether a change scan is due
    /// (the settings moved, or the reconcile interval came round).
    settings_mod: u64,
    scan_due: bool,
    /// The reconcile listing in progress (snapshot revision, next key, subject ids seen), paged
    /// between probes, and whose turn it is.
    listing: Option<(u64, Vec<u8>, BTreeSet<String>)>,
    list_turn: bool,
    pub failures: u64,
    pub last_success_ms: Option<i64>,
}

fn after(key: &[u8]) -> Vec<u8> {
    let mut next = key.to_vec();
    next.push(0);
    next
}

impl PolicySync {
    pub fn new(settings: FleetSettings, node: String) -> Self {
        let start = settings.policy_prefix().into_bytes();
        PolicySync {
            settings,
            node,
            pending_base: None,
            restored: false,
            dirty: FlushQueue::default(),
            flushing: None,
            next_flush_ms: 0,
            leased: BTreeSet::new(),
            to_return: std::collections::VecDeque::new(),
            returning: None,
            next_return_scan_ms: 0,
            alerts: FleetAlerts::default(),
            sweep: LedgerSweep::default(),
            rates_in_flight: false,
            next_rates_ms: 0,
            rates_minute: 0,
            cleaned_minute: 0,
            phase: Phase::Loading {
                at: 0,
                next: start,
                snapshot: Snapshot::default(),
            },
            revision: 0,
            in_flight: false,
            next_due_ms: 0,
            next_reconcile_ms: 0,
            known: BTreeMap::new(),
            key_ids: Vec::new(),
            settings_doc: None,
            settings_mod: 0,
            scan_due: false,
            listing: None,
            list_turn: false,
            failures: 0,
            last_success_ms: None,
        }
    }

    pub fn has_node(&self) -> bool {
        !self.node.is_empty()
    }

    /// Names this Envoy (its `node.id`); nothing is read or written in etcd before.
    pub fn set_node(&mut self, node: String) {
        self.node = node;
    }

    /// The store revision shared data reflects (0 before the first load).
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// The next call, when one is due and none is in flight.
    pub fn poll(&mut self, now_ms: i64) -> Option<Call> {
        if self.in_flight || now_ms < self.next_due_ms || self.node.is_empty() {
            return None;
        }
        if matches!(self.phase, Phase::Following { page: None }) {
            if self.listing.is_none() && now_ms >= self.next_reconcile_ms {
                self.listing = Some((
                    0,
                    self.settings.policy_prefix().into_bytes(),
                    BTreeSet::new(),
                ));
                self.list_turn = true;
            }
            if self.scan_due {
                // The change scan (Following) goes first.
            } else if let Some((at, next, seen)) =
                self.list_turn.then(|| self.listing.take()).flatten()
            {
                // A page of the listing, then a probe: a long listing never delays following
                // by more than a page. (The listing is taken only on its turn: dropped on the
                // probe's, it would start over and never reach its last page.)
                self.phase = Phase::Reconciling { at, next, seen };
                self.list_turn = false;
            } else {
                self.phase = Phase::Probing;
                self.list_turn = true;
            }
        }
        let policy_prefix = self.settings.policy_prefix().into_bytes();
        let range = match &self.phase {
            Phase::Loading { at, next, .. } => Range {
                from: next.clone(),
                end: prefix_end(&policy_prefix),
                limit: PAGE,
                revision: *at,
                ..Range::default()
            },
            Phase::Following { page } => {
                let (at, from) = page.clone().unwrap_or((0, policy_prefix.clone()));
                Range {
                    from,
                    end: prefix_end(&policy_prefix),
                    limit: PAGE,
                    min_mod_revision: self.revision + 1,
                    revision: at,
                    ..Range::default()
                }
            }
            Phase::Probing => {
                let key = self.settings.settings_key().into_bytes();
                Range {
                    end: after(&key),
                    from: key,
                    ..Range::default()
                }
            }
            // The whole policy prefix, keys only: tokens and teams in one snapshot (the settings
            // and upstream keys in it are a few hundred names at most).
            Phase::Reconciling { at, next, .. } => Range {
                from: next.clone(),
                end: prefix_end(&policy_prefix),
                limit: PAGE * 5,
                revision: *at,
                keys_only: true,
                ..Range::default()
            },
            Phase::Restoring { at, next, .. } => Range {
                from: next.clone(),
                end: prefix_end(lease::node_prefix(&self.settings.prefix, &self.node).as_bytes()),
                limit: PAGE,
                revision: *at,
                ..Range::default()
            },
        };
        self.in_flight = true;
        Some(Call {
            path: RANGE_PATH,
            body: range.body(),
        })
    }

    /// The reply to the call in flight: `status` 0 when the call could not be sent.
    pub fn on_reply(
        &mut self,
        store: &dyn SharedStore,
        now_ms: i64,
        status: u32,
        body: &[u8],
    ) -> Outcome {
        self.in_flight = false;
        let reply = (status == 200).then(|| parse_range(body)).flatten();
        let Some(reply) = reply else {
            self.failures += 1;
            self.next_due_ms = now_ms.saturating_add(self.settings.sync_interval_ms as i64);
            // A snapshot read that fails (e.g. its revision was compacted) starts over.
            self.restart_paging();
            // An error body (etcd's or Envoy's) says why; a 200 body that does not parse is not
            // echoed (it would be policy data).
            let what = if status == 200 {
                "unreadable reply".to_string()
            } else {
                crate::audit::printable(&String::from_utf8_lossy(
                    body.get(..body.len().min(120)).unwrap_or_default(),
                ))
            };
            return Outcome::Failed(format!("status {status}: {what}"));
        };
        self.last_success_ms = Some(now_ms);
        let outcome = match std::mem::replace(&mut self.phase, Phase::Following { page: None }) {
            Phase::Loading {
                at,
                snapshot,
                next: _,
            } => self.on_load_page(store, at, snapshot, reply),
            Phase::Probing => self.on_probe(&reply),
            Phase::Following { page } => self.on_changes(store, page, reply),
            Phase::Reconciling { at, seen, next: _ } => self.on_listing(store, at, seen, reply),
            Phase::Restoring {
                at,
                restored,
                next: _,
            } => self.on_restore_page(store, now_ms, at, restored, reply),
        };
        // The restore right after the first load goes at once: nothing is served until it is done.
        if !matches!(outcome, Outcome::Paging) && !matches!(self.phase, Phase::Restoring { .. }) {
            self.next_due_ms = now_ms.saturating_add(self.settings.sync_interval_ms as i64);
        }
        if matches!(outcome, Outcome::Reconciled { .. } | Outcome::Loaded { .. }) {
            self.next_reconcile_ms =
                now_ms.saturating_add(self.settings.reconcile_interval_ms as i64);
        }
        if matches!(
            outcome,
            Outcome::Loaded { .. } | Outcome::Applied { records: 1.., .. }
        ) {
            // A budget limit changed from the one the leases this Envoy holds were claimed under:
            // their surplus goes back at the next return scan, so scan now rather than an idle
            // interval later. (A probe that found nothing new changes nothing.)
            self.next_return_scan_ms = now_ms;
        }
        outcome
    }

    fn restart_paging(&mut self) {
        match &mut self.phase {
            Phase::Loading { at, next, snapshot } => {
                *at = 0;
                *next = self.settings.policy_prefix().into_bytes();
                *snapshot = Snapshot::default();
            }
            Phase::Following { page } => *page = None,
            Phase::Probing | Phase::Reconciling { .. } => {
                self.phase = Phase::Following { page: None }
            }
            Phase::Restoring { at, next, restored } => {
                *at = 0;
                *next = lease::node_prefix(&self.settings.prefix, &self.node).into_bytes();
                *restored = 0;
            }
        }
    }

    fn load_again(&mut self) {
        self.phase = Phase::Loading {
            at: 0,
            next: self.settings.policy_prefix().into_bytes(),
            snapshot: Snapshot::default(),
        };
    }

    fn on_load_page(
        &mut self,
        store: &dyn SharedStore,
        at: u64,
        mut snapshot: Snapshot,
        reply: super::etcd::RangeReply,
    ) -> Outcome {
        let at = if at == 0 { reply.revision } else { at };
        let last = reply.kvs.last().map(|kv| kv.key.clone());
        for kv in reply.kvs {
            self.classify(kv, &mut snapshot);
        }
        if let (true, Some(last)) = (reply.more, last) {
            self.phase = Phase::Loading {
                at,
                next: after(&last),
                snapshot,
            };
            return Outcome::Paging;
        }
        match self.apply_snapshot(store, snapshot, at) {
            Ok((tokens, teams)) => {
                self.revision = at;
                if self.pending_base.is_some() {
                    self.phase = Phase::Restoring {
                        at: 0,
                        next: lease::node_prefix(&self.settings.prefix, &self.node).into_bytes(),
                        restored: 0,
                    };
                }
                Outcome::Loaded {
                    revision: at,
                    tokens,
                    teams,
                }
            }
            Err(why) => {
                // Nothing written; keep enforcing what shared data holds, read again later.
                self.load_again();
                Outcome::Rejected(why)
            }
        }
    }

    fn classify(&self, kv: Kv, snapshot: &mut Snapshot) {
        let key = String::from_utf8_lossy(&kv.key).into_owned();
        if key == self.settings.settings_key() {
            snapshot.settings = Some(kv.value);
            snapshot.settings_mod = kv.mod_revision;
        } else if let Some(id) = key.strip_prefix(&self.settings.keys_prefix()) {
            snapshot.keys.push((id.to_string(), kv.value));
        } else if let Some(id) = key.strip_prefix(&self.settings.tokens_prefix()) {
            snapshot
                .tokens
                .push((id.to_string(), kv.value, kv.mod_revision));
        } else if let Some(id) = key.strip_prefix(&self.settings.teams_prefix()) {
            snapshot
                .teams
                .push((id.to_string(), kv.value, kv.mod_revision));
        }
    }

    /// Writes a whole snapshot: the base first (so no record names a key the base lacks), then
    /// every record, then removes what is gone. Returns the number of tokens and teams.
    fn apply_snapshot(
        &mut self,
        store: &dyn SharedStore,
        snapshot: Snapshot,
        at: u64,
    ) -> Result<(usize, usize), String> {
        let settings = snapshot
            .settings
            .ok_or_else(|| format!("no {} in etcd", self.settings.settings_key()))?;
        self.settings_mod = snapshot.settings_mod;
        let mut base: RawPolicy = serde_json::from_slice(&settings)
            .map_err(|e| format!("{}: {e}", self.settings.settings_key()))?;
        let settings_doc = without_revision(&settings);
        if !base.tokens.is_empty()
            || !base.teams.is_empty()
            || !base.upstream_keys.is_empty()
            || base.fleet.is_some()
        {
            return Err(format!(
                "{}: tokens, teams, upstream keys and fleet do not belong in the settings",
                self.settings.settings_key()
            ));
        }
        let mut keys = Vec::with_capacity(snapshot.keys.len());
        for (id, value) in &snapshot.keys {
            let key: RawUpstreamKey = serde_json::from_slice(value)
                .map_err(|e| format!("{}{id}: {e}", self.settings.keys_prefix()))?;
            if key.id != *id {
                return Err(format!(
                    "{}{id}: the id inside is {}",
                    self.settings.keys_prefix(),
                    key.id
                ));
            }
            keys.push(key);
        }
        keys.sort_by(|a, b| a.id.cmp(&b.id));
        base.upstream_keys = keys;
        // The same validation as a plugin configuration (keys are opened by the HTTP filter,
        // which has the master key).
        let compiled =
            compile(&base, String::new(), &CompileOptions::default()).map_err(|e| e.to_string())?;
        self.alerts.configure(
            &compiled.settings.alert_thresholds,
            compiled.settings.webhook.is_some(),
        );
        let base_json = serde_json::to_vec(&base).map_err(|e| e.to_string())?;
        if !self.restored {
            // First load: the policy is served once this Envoy's spend is back.
            self.pending_base = Some(base_json);
        } else if store.get(BASE_KEY).map(|(v, _)| v) != Some(base_json.clone()) {
            store
                .set(BASE_KEY, &base_json, None)
                .map_err(|e| format!("shared data: {e:?}"))?;
        }
        self.key_ids = base.upstream_keys.iter().map(|k| k.id.clone()).collect();
        self.settings_doc = settings_doc;

        // `known` is rebuilt from what compiles; what had a record and is no longer in etcd at
        // all is removed below (what is there but does not compile is removed as it is applied).
        let before = std::mem::take(&mut self.known);
        let mut present = BTreeSet::new();
        // Teams first: a token naming its team never finds the team missing while this runs.
        for (id, value, mod_revision) in &snapshot.teams {
            self.apply_team(store, id, value, *mod_revision);
            present.extend(team_subject(id));
        }
        for (id, value, mod_revision) in &snapshot.tokens {
            self.apply_token(store, id, value, *mod_revision);
            present.extend(token_subject(id));
        }
        for id in before.keys().filter(|id| !present.contains(*id)) {
            let _ = policy_store::put_newest(store, id, at, None);
        }
        Ok((snapshot.tokens.len(), snapshot.teams.len()))
    }

    /// Compiles and writes one token's record; a token that does not compile is removed (fail
    /// closed) rather than left at its previous state.
    fn apply_token(&mut self, store: &dyn SharedStore, id: &str, value: &[u8], mod_revision: u64) {
        let Some(subject) = token_subject(id) else {
            return;
        };
        let index: HashMap<&str, u16> = self
            .key_ids
            .iter()
            .enumerate()
            .filter_map(|(i, k)| Some((k.as_str(), u16::try_from(i).ok()?)))
            .collect();
        let path = format!("{}{id}", self.settings.tokens_prefix());
        let compiled = serde_json::from_slice::<RawToken>(value)
            .ok()
            .filter(|t| t.id == id)
            .and_then(|t| compile_token(&t, &index, &path).ok());
        self.write_record(store, subject, mod_revision, compiled);
    }

    /// Compiles and writes one team's record under `team.<id>`; a team that does not compile is
    /// removed (fail closed), as a token is.
    fn apply_team(&mut self, store: &dyn SharedStore, id: &str, value: &[u8], mod_revision: u64) {
        let Some(subject) = team_subject(id) else {
            return;
        };
        let path = format!("{}{id}", self.settings.teams_prefix());
        let compiled = serde_json::from_slice::<RawTeam>(value)
            .ok()
            .filter(|t| t.id == id)
            .and_then(|t| team::compile_team(&t, &path).ok());
        self.write_record(store, subject, mod_revision, compiled);
    }

    /// Writes (or, for `None`, removes) the record of `subject` and keeps `known` in step.
    fn write_record(
        &mut self,
        store: &dyn SharedStore,
        subject: String,
        mod_revision: u64,
        compiled: Option<TokenPolicy>,
    ) {
        if let Some(record) = compiled.as_ref().filter(|t| t.rules.limits.is_tracked()) {
            // Counters exist before the first request, so every update is a compare-and-swap.
            let _ = SharedDataLedger::new(store).ensure(&record.id);
        }
        let record = compiled.as_ref().map(token_record::encode);
        let _ = policy_store::put_newest(store, &subject, mod_revision, record.as_deref());
        if record.is_some() {
            self.known.insert(subject, mod_revision);
        } else {
            self.known.remove(&subject);
        }
    }

    fn on_probe(&mut self, reply: &super::etcd::RangeReply) -> Outcome {
        let moved = reply.kvs.first().map_or(0, |kv| kv.mod_revision);
        if moved != self.settings_mod {
            self.settings_mod = moved;
            self.scan_due = true;
            // Scan at once.
            return Outcome::Paging;
        }
        Outcome::Applied {
            revision: self.revision,
            records: 0,
        }
    }

    fn on_changes(
        &mut self,
        store: &dyn SharedStore,
        page: Option<(u64, Vec<u8>)>,
        reply: super::etcd::RangeReply,
    ) -> Outcome {
        let at = page.map_or(reply.revision, |(at, _)| at);
        let tokens_prefix = self.settings.tokens_prefix();
        let teams_prefix = self.settings.teams_prefix();
        let last = reply.kvs.last().map(|kv| kv.key.clone());
        let mut records = 0;
        for kv in &reply.kvs {
            let key = String::from_utf8_lossy(&kv.key);
            if let Some(id) = key.strip_prefix(&tokens_prefix) {
                self.apply_token(store, id, &kv.value, kv.mod_revision);
                records += 1;
                continue;
            }
            // A team's record is self-contained (it names no upstream key): rewritten in place.
            if let Some(id) = key.strip_prefix(&teams_prefix) {
                self.apply_team(store, id, &kv.value, kv.mod_revision);
                records += 1;
                continue;
            }
            let same_settings = key == self.settings.settings_key()
                && without_revision(&kv.value).is_some()
                && without_revision(&kv.value) == self.settings_doc;
            if !same_settings {
                // Settings or upstream keys changed: token records name keys by index, so
                // everything is read again.
                self.load_again();
                return Outcome::Paging;
            }
        }
        if let (true, Some(last)) = (reply.more, last) {
            self.phase = Phase::Following {
                page: Some((at, after(&last))),
            };
            return Outcome::Paging;
        }
        self.revision = self.revision.max(at);
        self.scan_due = false;
        Outcome::Applied {
            revision: self.revision,
            records,
        }
    }

    fn on_listing(
        &mut self,
        store: &dyn SharedStore,
        at: u64,
        mut seen: BTreeSet<String>,
        reply: super::etcd::RangeReply,
    ) -> Outcome {
        let at = if at == 0 { reply.revision } else { at };
        let tokens_prefix = self.settings.tokens_prefix();
        let teams_prefix = self.settings.teams_prefix();
        let last = reply.kvs.last().map(|kv| kv.key.clone());
        for kv in &reply.kvs {
            let key = String::from_utf8_lossy(&kv.key);
            if let Some(id) = key.strip_prefix(&tokens_prefix) {
                seen.extend(token_subject(id));
            } else if let Some(id) = key.strip_prefix(&teams_prefix) {
                seen.extend(team_subject(id));
            }
        }
        if let (true, Some(last)) = (reply.more, last) {
            self.listing = Some((at, after(&last), seen));
            return Outcome::Paging;
        }
        // Only what the listing no longer has and was applied from a key no newer than the
        // listing's revision (created after it, a key is missing from it without being deleted).
        let gone: Vec<String> = self
            .known
            .iter()
            .filter(|(id, applied)| **applied <= at && !seen.contains(*id))
            .map(|(id, _)| id.clone())
            .collect();
        for id in &gone {
            let _ = policy_store::put_newest(store, id, at.max(self.revision), None);
            self.known.remove(id);
        }
        // Keys written without the settings key moving (by hand, not by the CLI) are picked up
        // by the scan that follows every reconcile.
        self.scan_due = true;
        Outcome::Reconciled {
            removed: gone.len(),
        }
    }
}

/// Tokens per flush transaction, and operations (etcd allows 128 in a txn).
const FLUSH_BATCH: usize = 40;
const FLUSH_OPS: usize = 120;
/// For this long after a budget window turns, a flush also writes the previous window's spend.
const PREVIOUS_WINDOW_FLUSH_MS: i64 = 10 * 60 * 1000;

impl PolicySync {
    fn on_restore_page(
        &mut self,
        store: &dyn SharedStore,
        now_ms: i64,
        at: u64,
        mut restored: usize,
        reply: super::etcd::RangeReply,
    ) -> Outcome {
        let at = if at == 0 { reply.revision } else { at };
        let node_prefix = lease::node_prefix(&self.settings.prefix, &self.node);
        let ledger = SharedDataLedger::fleet(store);
        for (token, window_start, spent) in lease::parse_spent(&reply.kvs, &node_prefix) {
            let window = policy_store::lookup_newest(store, &token)
                .and_then(|(t, _)| t.rules.limits.budget)
                .map(|b| b.window);
            let now = now_ms.div_euclid(1000);
            match window {
                // Only the current window of a token with a budget matters.
                Some(w) if w.start(now) == window_start => {
                    let _ = ledger.restore(&token, window, window_start, spent, now_ms);
                    restored += 1;
                }
                Some(_) => {}
                // Not in the policy (or without a budget) now: its newest window's spend comes
                // back as it is, so that minted again in that window it continues from there
                // and its next flush does not write less than etcd holds.
                None => {
                    let _ = ledger.restore(&token, None, window_start, spent, now_ms);
                }
            }
        }
        if let (true, Some(last)) = (reply.more, reply.kvs.last()) {
            self.phase = Phase::Restoring {
                at,
                next: after(&last.key),
                restored,
            };
            return Outcome::Paging;
        }
        if let Some(base) = self.pending_base.take() {
            let _ = store.set(BASE_KEY, &base, None);
        }
        self.restored = true;
        self.sweep
            .start_after(now_ms, self.settings.reconcile_interval_ms as i64);
        Outcome::Restored { tokens: restored }
    }

    /// A token's spend changed (the HTTP filter said so through the spent queue).
    pub fn mark_dirty(&mut self, token_id: String) {
        self.dirty.push(token_id);
    }

    /// The next flush of this Envoy's spend to etcd, when one is due: at most 40 tokens, each
    /// as an absolute value (idempotent), every `sync_interval_ms`.
    pub fn poll_flush(&mut self, store: &dyn SharedStore, now_ms: i64) -> Option<Call> {
        if !self.restored
            || self.flushing.is_some()
            || self.dirty.is_empty()
            || now_ms < self.next_flush_ms
        {
            return None;
        }
        let ledger = SharedDataLedger::fleet(store);
        // At most five puts per token (spend twice, the previous window's spend twice, the rate
        // counts): 120 operations per transaction at most (etcd allows 128).
        let mut batch = Vec::new();
        let mut entries = Vec::new();
        let mut budgets = Vec::new();
        let prefix = &self.settings.prefix;
        while batch.len() < FLUSH_BATCH && entries.len() + 5 <= FLUSH_OPS {
            let Some(id) = self.dirty.take(1).pop() else {
                break;
            };
            let limits = policy_store::lookup_newest(store, &id).map(|(t, _)| t.rules.limits);
            let budgeted = limits.as_ref().is_some_and(|l| l.budget.is_some());
            if budgeted {
                self.leased.insert(id.clone());
            }
            // A token with a budget until lately (removed with requests in flight) still has
            // their spend written, to the window it is in.
            if budgeted || self.leased.contains(&id) {
                if let Some(((window_start, spent), previous)) = ledger.spent_with_previous(&id) {
                    let mut windows = vec![(window_start, spent)];
                    // The end of the window that just turned: what was spent in it after the
                    // last flush before the turn, and by requests that ended after it.
                    let turned_lately = now_ms
                        < window_start
                            .saturating_mul(1000)
                            .saturating_add(PREVIOUS_WINDOW_FLUSH_MS);
                    if turned_lately {
                        windows.extend(previous);
                    }
                    for &(window_start, spent) in &windows {
                        entries.push((
                            lease::spent_key(prefix, &self.node, &id, window_start),
                            lease::spent_value(spent),
                        ));
                        entries.push((
                            lease::fleet_spent_key(prefix, &self.node, &id, window_start),
                            lease::spent_value(spent),
                        ));
                    }
                    if budgeted {
                        // Each window written is checked for alerts: a threshold can be crossed
                        // by the last spend of the window that turned.
                        budgets.extend(windows.iter().map(|&(w, _)| (id.clone(), w)));
                    }
                }
            }
            let rated = limits
                .as_ref()
                .is_some_and(|l| l.requests_per_minute.is_some() || l.tokens_per_minute.is_some());
            if let (true, Some((minute, requests, tokens))) = (rated, ledger.minute_counts(&id)) {
                entries.push((
                    lease::rate_key(prefix, minute, &id, &self.node),
                    lease::rate_value(requests, tokens),
                ));
            }
            batch.push(id);
        }
        // What was waiting beyond this batch goes next, at the next tick, not an interval later.
        let backlog = !self.dirty.is_empty();
        if entries.is_empty() {
            return None;
        }
        self.flushing = Some(Flushing {
            batch,
            budgets,
            backlog,
        });
        Some(Call {
            path: lease::TXN_PATH,
            body: lease::flush_body(&entries),
        })
    }

    /// The reply to a flush: on failure the tokens stay dirty and are flushed again (nothing is
    /// lost, and an absolute value cannot be counted twice). On success the fleet's spend of the
    /// budgets flushed is read next, for alerts.
    pub fn on_flush_reply(&mut self, now_ms: i64, status: u32, body: &[u8]) -> bool {
        let flushing = self.flushing.take().unwrap_or_default();
        let ok = status == 200 && lease::parse_write(body) == Some(true);
        if ok {
            for (subject, window_start) in &flushing.budgets {
                self.alerts.flushed(subject, *window_start);
            }
        } else {
            self.failures += 1;
            self.dirty.put_back(flushing.batch);
        }
        self.next_flush_ms = if ok && flushing.backlog {
            now_ms
        } else {
            now_ms.saturating_add(self.settings.sync_interval_ms as i64)
        };
        ok
    }

    /// The next call of the fleet-wide budget alerts (`fleet::alerts`).
    pub fn poll_alerts(&mut self, now_ms: i64) -> Option<Call> {
        if !self.restored {
            return None;
        }
        self.alerts.poll(&self.settings.prefix, &self.node, now_ms)
    }

    /// The reply to `poll_alerts`' call.
    pub fn on_alerts_reply(
        &mut self,
        store: &dyn SharedStore,
        now_ms: i64,
        status: u32,
        body: &[u8],
    ) -> AlertStep {
        let retry_ms = self.settings.sync_interval_ms as i64;
        let step = self.alerts.on_reply(store, now_ms, retry_ms, status, body);
        if matches!(step, AlertStep::Failed | AlertStep::GaveUp { .. }) {
            self.failures += 1;
        }
        step
    }

    /// The next call of the sweep of ended budget windows (`fleet::sweep`): a listing of this
    /// node's ledger keys every 60 reconcile intervals (10 minutes by default), the first one a
    /// reconcile interval after the restore, then the deletions.
    pub fn poll_sweep(&mut self, now_ms: i64) -> Option<Call> {
        if !self.restored {
            return None;
        }
        let interval = (self.settings.reconcile_interval_ms as i64).saturating_mul(60);
        self.sweep
            .poll(&self.settings.prefix, &self.node, interval, now_ms)
    }

    /// The reply to `poll_sweep`'s call.
    pub fn on_sweep_reply(
        &mut self,
        store: &dyn SharedStore,
        now_ms: i64,
        status: u32,
        body: &[u8],
    ) -> SweepStep {
        let step = self.sweep.on_reply(
            store,
            &self.settings.prefix,
            &self.node,
            now_ms,
            status,
            body,
        );
        if step == SweepStep::Failed {
            self.failures += 1;
        }
        step
    }

    /// The next read of the other Envoys' counts of this minute (every `sync_interval_ms`), or
    /// once a minute the deletion of the minute before the previous one.
    pub fn poll_rates(&mut self, now_ms: i64) -> Option<Call> {
        if !self.restored || self.rates_in_flight || now_ms < self.next_rates_ms {
            return None;
        }
        let minute = now_ms.div_euclid(60_000);
        self.rates_in_flight = true;
        if self.cleaned_minute < minute {
            self.cleaned_minute = minute;
            return Some(Call {
                path: lease::DELETE_PATH,
                body: lease::delete_body(&lease::rate_prefix(&self.settings.prefix, minute - 2)),
            });
        }
        self.rates_minute = minute;
        let prefix = lease::rate_prefix(&self.settings.prefix, minute);
        Some(Call {
            path: RANGE_PATH,
            body: Range {
                from: prefix.clone().into_bytes(),
                end: prefix_end(prefix.as_bytes()),
                ..Range::default()
            }
            .body(),
        })
    }

    /// The reply to `poll_rates`: the other Envoys' counts go into the local counters, which
    /// admission checks against the fleet-wide limits.
    pub fn on_rates_reply(
        &mut self,
        store: &dyn SharedStore,
        now_ms: i64,
        status: u32,
        body: &[u8],
    ) -> bool {
        self.rates_in_flight = false;
        self.next_rates_ms = now_ms.saturating_add(self.settings.sync_interval_ms as i64);
        let Some(reply) = (status == 200).then(|| parse_range(body)).flatten() else {
            // A deletion's reply is not a range: only a failure counts.
            let deleted = status == 200;
            if !deleted {
                self.failures += 1;
            }
            return deleted;
        };
        let prefix = lease::rate_prefix(&self.settings.prefix, self.rates_minute);
        let ledger = SharedDataLedger::fleet(store);
        for (token, requests, tokens) in lease::parse_rates(&reply.kvs, &prefix, &self.node) {
            let _ = ledger.set_remote(&token, self.rates_minute, requests, tokens, now_ms);
        }
        true
    }

    /// The next call giving an idle lease back to the pool: every `lease_idle_ms` the tokens this
    /// Envoy spent on are checked, and the allowance no request holds on a token idle that long
    /// is taken back locally (first) and then subtracted from the pool and this node's claim
    /// (read, then a guarded write). A return that fails strands that budget, never overspends.
    pub fn poll_returns(&mut self, store: &dyn SharedStore, now_ms: i64) -> Option<Call> {
        if !self.restored {
            return None;
        }
        if let Some(r) = self.returning.as_mut() {
            if r.in_flight {
                return None;
            }
            r.in_flight = true;
            let prefix = &self.settings.prefix;
            let pool = lease::pool_key(prefix, &r.token, r.window);
            let claimed = lease::claimed_key(prefix, &self.node, &r.token, r.window);
            let body = match &r.seen {
                None => lease::read_body(&pool, &claimed),
                Some(seen) => lease::return_body(&pool, &claimed, seen, r.amount),
            };
            return Some(Call {
                path: lease::TXN_PATH,
                body,
            });
        }
        if self.to_return.is_empty() && now_ms >= self.next_return_scan_ms {
            self.next_return_scan_ms = now_ms.saturating_add(self.settings.lease_idle_ms as i64);
            let ledger = SharedDataLedger::fleet(store);
            let idle = self.settings.lease_idle_ms as i64;
            for id in std::mem::take(&mut self.leased) {
                let budget = policy_store::lookup_newest(store, &id)
                    .and_then(|(t, _)| t.rules.limits.budget);
                match ledger.take_unused(&id, budget, idle, now_ms) {
                    Ok(Some((window_start, amount))) => {
                        if budget.is_none() {
                            // Out of the policy: its late spend is still flushed (`poll_flush`).
                            self.leased.insert(id.clone());
                        }
                        self.to_return.push_back((id, window_start, amount))
                    }
                    // Still in use (or nothing to give back): checked again next time.
                    _ => {
                        self.leased.insert(id);
                    }
                }
            }
        }
        let (token, window, amount) = self.to_return.pop_front()?;
        self.returning = Some(Return {
            token,
            window,
            amount,
            seen: None,
            attempts: 0,
            in_flight: false,
        });
        self.poll_returns(store, now_ms)
    }

    /// The reply to a return call; `false` when it failed.
    pub fn on_return_reply(&mut self, status: u32, body: &[u8]) -> bool {
        let Some(mut r) = self.returning.take() else {
            return true;
        };
        r.in_flight = false;
        let ok = status == 200;
        match r.seen {
            None => match ok.then(|| lease::parse_read(body)).flatten() {
                Some(seen) => {
                    // Never give back more than the pool or this node's claim holds.
                    r.amount = r.amount.min(seen.pool).min(seen.node);
                    r.seen = Some(seen);
                    if r.amount > 0 {
                        self.returning = Some(r);
                    }
                    true
                }
                None => {
                    self.failures += 1;
                    false
                }
            },
            Some(_) => match ok.then(|| lease::parse_write(body)).flatten() {
                Some(true) => true,
                // Someone claimed in between: read again, a few times.
                Some(false) if r.attempts + 1 < lease::CLAIM_ATTEMPTS => {
                    r.attempts += 1;
                    r.seen = None;
                    self.returning = Some(r);
                    true
                }
                _ => {
                    self.failures += 1;
                    false
                }
            },
        }
    }

    /// Tokens whose spend is not in etcd yet.
    pub fn unflushed(&self) -> usize {
        self.dirty.len() + self.flushing.as_ref().map_or(0, |f| f.batch.len())
    }
}

/// A flush in flight: its tokens, and the budget windows whose spend it writes.
#[derive(Debug, Default)]
struct Flushing {
    batch: Vec<String>,
    budgets: Vec<(String, i64)>,
    /// Tokens were waiting beyond this batch when it was taken.
    backlog: bool,
}

/// A lease being given back.
#[derive(Debug)]
struct Return {
    token: String,
    window: i64,
    amount: NanoUsd,
    /// The pool and this node's claim as read (then the guarded write is next).
    seen: Option<lease::Claims>,
    attempts: u32,
    in_flight: bool,
}

/// The record id of the token key `id`. `None` for an id no token can have: no record of ours is
/// under it, and a hand-written `tokens/team.eng` must not remove team eng's record.
fn token_subject(id: &str) -> Option<String> {
    token::validate_id(id).ok().map(|()| id.to_string())
}

/// The record id (`team.<id>`) of the team key `id`; `None` for an id no team can have.
fn team_subject(id: &str) -> Option<String> {
    team::validate_id(id).ok().map(|()| team::subject_id(id))
}

/// The settings document with its `revision` left out, for comparing what matters.
fn without_revision(settings: &[u8]) -> Option<Vec<u8>> {
    let mut doc: RawPolicy = serde_json::from_slice(settings).ok()?;
    doc.revision = 0;
    serde_json::to_vec(&doc).ok()
}

#[cfg(test)]
mod tests;
