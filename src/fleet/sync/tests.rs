//! The syncer against an in-memory etcd that answers the JSON gateway's range calls.

use std::collections::{BTreeMap, BTreeSet};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde_json::{json, Value};

use super::*;
use crate::alert::BudgetAlert;
use crate::config::raw::{RawFleet, RawPolicy, RawTeam};
use crate::fleet::compile_fleet;
use crate::master_key::MasterKey;
use crate::seal;
use crate::store::MemoryStore;

#[derive(Default)]
struct FakeEtcd {
    revision: u64,
    kvs: BTreeMap<Vec<u8>, (Vec<u8>, u64)>,
    down: bool,
}

impl FakeEtcd {
    fn put(&mut self, key: &str, value: Value) {
        self.revision += 1;
        self.kvs.insert(
            key.as_bytes().to_vec(),
            (value.to_string().into_bytes(), self.revision),
        );
    }

    fn delete(&mut self, key: &str) {
        self.revision += 1;
        self.kvs.remove(key.as_bytes());
    }

    fn answer(&self, body: &[u8]) -> (u32, Vec<u8>) {
        if self.down {
            return (
                503,
                b"upstream connect error or disconnect/reset before headers".to_vec(),
            );
        }
        let req: Value = serde_json::from_slice(body).unwrap();
        let bytes = |name: &str| STANDARD.decode(req[name].as_str().unwrap_or("")).unwrap();
        let num = |name: &str| req[name].as_str().map_or(0, |v| v.parse::<u64>().unwrap());
        let (from, end) = (bytes("key"), bytes("range_end"));
        assert!(num("revision") == 0 || num("revision") <= self.revision);
        let mut selected: Vec<_> = self
            .kvs
            .range(from..end)
            .filter(|(_, (_, m))| *m >= num("min_mod_revision"))
            .collect();
        let limit = num("limit") as usize;
        let more = limit > 0 && selected.len() > limit;
        if more {
            selected.truncate(limit);
        }
        let kvs: Vec<Value> = selected
            .into_iter()
            .map(|(k, (v, m))| {
                let mut kv = json!({"key": STANDARD.encode(k), "mod_revision": m.to_string()});
                if req["keys_only"] != true {
                    kv["value"] = STANDARD.encode(v).into();
                }
                kv
            })
            .collect();
        let mut reply = json!({"header": {"revision": self.revision.to_string()}});
        if !kvs.is_empty() {
            reply["kvs"] = kvs.into();
        }
        if more {
            reply["more"] = true.into();
        }
        (200, reply.to_string().into_bytes())
    }
}

impl FakeEtcd {
    /// A `kv/txn` as etcd applies it: compares on MOD or CREATE revision (0: absent), then the
    /// success ops (puts, deletes and ranges, in order) or else the failure ops.
    fn answer_txn(&mut self, body: &[u8]) -> (u32, Vec<u8>) {
        if self.down {
            return (503, b"upstream connect error".to_vec());
        }
        let req: Value = serde_json::from_slice(body).unwrap();
        let b64 = |v: &Value| STANDARD.decode(v.as_str().unwrap_or("")).unwrap();
        let revision_of = |v: &Value| v.as_str().map_or(0, |r| r.parse::<u64>().unwrap());
        let holds = req["compare"].as_array().into_iter().flatten().all(|c| {
            let current = self.kvs.get(&b64(&c["key"]));
            match c["target"].as_str().unwrap() {
                "MOD" => current.map_or(0, |(_, m)| *m) == revision_of(&c["mod_revision"]),
                "CREATE" => current.is_none() == (revision_of(&c["create_revision"]) == 0),
                other => panic!("compare target {other}"),
            }
        });
        let mut reply = json!({"header": {"revision": self.revision.to_string()}});
        let branch = if holds { "success" } else { "failure" };
        let mut responses = Vec::new();
        for op in req[branch].as_array().into_iter().flatten() {
            if let Some(delete) = op.get("request_delete_range") {
                let from = b64(&delete["key"]);
                let doomed: Vec<Vec<u8>> = match delete.get("range_end") {
                    Some(end) => self
                        .kvs
                        .range(from..b64(end))
                        .map(|(k, _)| k.clone())
                        .collect(),
                    None => self
                        .kvs
                        .get_key_value(&from)
                        .map(|(k, _)| k.clone())
                        .into_iter()
                        .collect(),
                };
                self.revision += 1;
                for key in &doomed {
                    self.kvs.remove(key);
                }
                responses
                    .push(json!({"response_delete_range": {"deleted": doomed.len().to_string()}}));
            } else if let Some(put) = op.get("request_put") {
                self.revision += 1;
                self.kvs
                    .insert(b64(&put["key"]), (b64(&put["value"]), self.revision));
                responses.push(json!({"response_put": {}}));
            } else {
                let range = &op["request_range"];
                let from = b64(&range["key"]);
                let kvs: Vec<Value> = match range.get("range_end") {
                    Some(end) => self.kvs.range(from..b64(end)).collect::<Vec<_>>(),
                    None => self.kvs.get_key_value(&from).into_iter().collect(),
                }
                .into_iter()
                .map(|(k, (v, m))| {
                    json!({"key": STANDARD.encode(k), "value": STANDARD.encode(v),
                           "mod_revision": m.to_string()})
                })
                .collect();
                responses.push(json!({"response_range": {"kvs": kvs}}));
            }
        }
        reply["header"]["revision"] = self.revision.to_string().into();
        if holds {
            reply["succeeded"] = true.into();
        }
        if !responses.is_empty() {
            reply["responses"] = responses.into();
        }
        (200, reply.to_string().into_bytes())
    }
}

fn settings() -> FleetSettings {
    let raw = RawFleet {
        cluster: "etcd".into(),
        prefix: None,
        authority: None,
        sync_interval_ms: Some(100),
        timeout_ms: None,
        reconcile_interval_ms: Some(1_000),
        lease_idle_ms: Some(500),
        sync: Some(true),
    };
    let policy = RawPolicy {
        version: 1,
        revision: 0,
        master_key_env: None,
        upstream_keys: vec![],
        tokens: vec![],
        teams: vec![],
        enforce: None,
        pricing: None,
        requests: None,
        alerts: None,
        fleet: Some(raw.clone()),
    };
    compile_fleet(&policy, &raw).unwrap()
}

fn sealed(id: &str) -> String {
    let master = MasterKey::from_bytes(&[7u8; 32]).unwrap();
    seal::seal(
        master.seal_key(),
        id,
        b"RealKey0123456789abcdefghijklmno",
        &[3; seal::NONCE_LEN],
    )
    .unwrap()
}

fn token(id: &str, status: &str) -> Value {
    json!({"id": id, "digest": STANDARD.encode([9u8; 32]), "upstream_key": "prod", "status": status})
}

/// What every CLI change also does: rewrite the settings with the next revision.
/// The limits of `id`'s record as the syncer wrote it into shared data.
fn limits_of(store: &MemoryStore, id: &str) -> crate::ledger::Limits {
    policy_store::lookup_newest(store, id)
        .expect("the record is in shared data")
        .0
        .rules
        .limits
}

fn bump_settings(etcd: &mut FakeEtcd) {
    let revision = etcd.revision;
    etcd.put(
        "shieldkey/policy/settings",
        json!({"version": 1, "revision": revision}),
    );
}

/// A UTC midnight, half a second before it, and the policy of `etcd_with(0)` with one token,
/// `b`, with a daily $1 budget: the last sync interval of a budget window.
fn half_a_second_before_midnight_with_b_daily() -> (i64, i64, FakeEtcd) {
    let midnight: i64 = 1_790_035_200_000;
    let mut etcd = etcd_with(0);
    etcd.put("shieldkey/policy/tokens/b", budgeted_daily("b", "1"));
    (midnight, midnight - 500, etcd)
}

/// The policy of `etcd_with(0)` and one token, `b`, with a $1 budget.
fn etcd_with_b_budgeted_one_usd() -> FakeEtcd {
    let mut etcd = etcd_with(0);
    etcd.put("shieldkey/policy/tokens/b", budgeted("b", "1"));
    etcd
}

fn etcd_with(tokens: usize) -> FakeEtcd {
    let mut etcd = FakeEtcd::default();
    etcd.put(
        "shieldkey/policy/settings",
        json!({"version": 1, "revision": 1}),
    );
    etcd.put(
        "shieldkey/policy/keys/prod",
        json!({"id": "prod", "sealed": sealed("prod")}),
    );
    for i in 0..tokens {
        etcd.put(
            &format!("shieldkey/policy/tokens/t{i}"),
            token(&format!("t{i}"), "active"),
        );
    }
    etcd
}

/// Drives the syncer until it has nothing due at `now`; returns the outcomes.
fn run(sync: &mut PolicySync, etcd: &FakeEtcd, store: &MemoryStore, now: i64) -> Vec<Outcome> {
    let mut outcomes = Vec::new();
    while let Some(call) = sync.poll(now) {
        assert_eq!(call.path, RANGE_PATH);
        let (status, body) = etcd.answer(&call.body);
        outcomes.push(sync.on_reply(store, now, status, &body));
        assert!(outcomes.len() < 10_000, "the syncer does not settle");
    }
    outcomes
}

fn revoked(store: &MemoryStore, id: &str) -> Option<bool> {
    policy_store::lookup_newest(store, id).map(|(t, _)| t.revoked)
}

#[test]
fn loads_everything_in_pages_then_follows_changes_one_record_at_a_time() {
    let mut etcd = etcd_with(2_500);
    let store = MemoryStore::new();
    let mut sync = PolicySync::new(settings(), "e1".into());
    let outcomes = run(&mut sync, &etcd, &store, 0);
    assert_eq!(
        outcomes.iter().filter(|o| **o == Outcome::Paging).count(),
        2
    );
    assert!(outcomes.contains(&Outcome::Loaded {
        revision: etcd.revision,
        tokens: 2_500,
        teams: 0
    }));
    assert_eq!(outcomes.last(), Some(&Outcome::Restored { tokens: 0 }));
    assert_eq!(revoked(&store, "t7"), Some(false));
    let base: RawPolicy = serde_json::from_slice(&store.get(BASE_KEY).unwrap().0).unwrap();
    assert_eq!(base.upstream_keys[0].id, "prod");

    // What the CLI writes for a revocation: the token and the settings' revision.
    etcd.put("shieldkey/policy/tokens/t7", token("t7", "revoked"));
    etcd.put(
        "shieldkey/policy/settings",
        json!({"version": 1, "revision": 2}),
    );
    let reads = store.reads.get();
    let outcomes = run(&mut sync, &etcd, &store, 100);
    // The probe of the settings key saw it move; the scan applied one record.
    assert_eq!(
        outcomes,
        vec![
            Outcome::Paging,
            Outcome::Applied {
                revision: etcd.revision,
                records: 1
            }
        ]
    );
    assert_eq!(revoked(&store, "t7"), Some(true));
    assert!(
        store.reads.get() - reads < 10,
        "one record read and written, not 2,500"
    );
    // Nothing due before the interval; nothing changed after it.
    assert!(sync.poll(150).is_none());
    assert_eq!(
        run(&mut sync, &etcd, &store, 200),
        vec![Outcome::Applied {
            revision: etcd.revision,
            records: 0
        }]
    );
}

#[test]
fn removed_tokens_are_noticed_by_the_reconcile_listing() {
    let mut etcd = etcd_with(3);
    let store = MemoryStore::new();
    let mut sync = PolicySync::new(settings(), "e1".into());
    run(&mut sync, &etcd, &store, 0);
    etcd.delete("shieldkey/policy/tokens/t1");
    run(&mut sync, &etcd, &store, 100);
    assert_eq!(
        revoked(&store, "t1"),
        Some(false),
        "a deletion is not a modification"
    );
    let outcomes = run(&mut sync, &etcd, &store, 1_000);
    assert!(
        outcomes.contains(&Outcome::Reconciled { removed: 1 }),
        "{outcomes:?}"
    );
    assert_eq!(revoked(&store, "t1"), None);
    assert_eq!(revoked(&store, "t0"), Some(false));
}

#[test]
fn a_new_upstream_key_loads_everything_again_and_bad_settings_change_nothing() {
    let mut etcd = etcd_with(3);
    let store = MemoryStore::new();
    let mut sync = PolicySync::new(settings(), "e1".into());
    run(&mut sync, &etcd, &store, 0);
    // "a-key" sorts before "prod": every token's key index changes.
    etcd.put(
        "shieldkey/policy/keys/a-key",
        json!({"id": "a-key", "sealed": sealed("a-key")}),
    );
    bump_settings(&mut etcd);
    let outcomes = run(&mut sync, &etcd, &store, 100);
    assert!(
        matches!(outcomes.last(), Some(Outcome::Loaded { tokens: 3, .. })),
        "{outcomes:?}"
    );
    let (t0, _) = policy_store::lookup_newest(&store, "t0").unwrap();
    assert_eq!(t0.upstream_key, 1, "prod is now the second key");

    let base_before = store.get(BASE_KEY).unwrap().0;
    etcd.put("shieldkey/policy/settings", json!({"version": 2}));
    let outcomes = run(&mut sync, &etcd, &store, 200);
    assert!(
        matches!(outcomes.last(), Some(Outcome::Rejected(_))),
        "{outcomes:?}"
    );
    assert_eq!(store.get(BASE_KEY).unwrap().0, base_before);
    assert_eq!(
        revoked(&store, "t0"),
        Some(false),
        "the last good policy keeps serving"
    );
}

#[test]
fn a_token_that_does_not_compile_is_removed_not_kept_at_its_old_state() {
    let mut etcd = etcd_with(2);
    let store = MemoryStore::new();
    let mut sync = PolicySync::new(settings(), "e1".into());
    run(&mut sync, &etcd, &store, 0);
    etcd.put(
        "shieldkey/policy/tokens/t0",
        json!({"id": "t0", "digest": "x", "upstream_key": "prod"}),
    );
    bump_settings(&mut etcd);
    run(&mut sync, &etcd, &store, 100);
    assert_eq!(revoked(&store, "t0"), None);
}

#[test]
fn etcd_down_keeps_the_last_policy_and_catches_up_when_it_returns() {
    let mut etcd = etcd_with(2);
    let store = MemoryStore::new();
    let mut sync = PolicySync::new(settings(), "e1".into());
    run(&mut sync, &etcd, &store, 0);
    etcd.down = true;
    let outcomes = run(&mut sync, &etcd, &store, 100);
    assert!(
        matches!(outcomes.as_slice(), [Outcome::Failed(_)]),
        "{outcomes:?}"
    );
    assert_eq!(sync.failures, 1);
    assert_eq!(revoked(&store, "t1"), Some(false));
    etcd.put("shieldkey/policy/tokens/t1", token("t1", "revoked"));
    bump_settings(&mut etcd);
    etcd.down = false;
    run(&mut sync, &etcd, &store, 200);
    assert_eq!(revoked(&store, "t1"), Some(true));
}

#[test]
fn nothing_is_served_before_the_first_load() {
    let etcd = FakeEtcd {
        down: true,
        ..FakeEtcd::default()
    };
    let store = MemoryStore::new();
    let mut sync = PolicySync::new(settings(), "e1".into());
    run(&mut sync, &etcd, &store, 0);
    assert!(store.get(BASE_KEY).is_none());
    assert_eq!(sync.revision(), 0);
}

fn budgeted(id: &str, limit: &str) -> Value {
    json!({"id": id, "digest": STANDARD.encode([9u8; 32]), "upstream_key": "prod",
           "budget": {"limit_usd": limit, "window": "lifetime"}})
}

#[test]
fn spend_flushed_before_a_restart_comes_back_before_the_policy_is_served() {
    let mut etcd = etcd_with_b_budgeted_one_usd();
    etcd.put("shieldkey/ledger/node/e1/b/0/spent", json!({"spent": 300}));
    etcd.put("shieldkey/ledger/node/e2/b/0/spent", json!({"spent": 999}));
    let store = MemoryStore::new();
    let mut sync = PolicySync::new(settings(), "e1".into());
    // Load, but stop before the restore: no policy served yet.
    let call = sync.poll(0).unwrap();
    let (status, body) = etcd.answer(&call.body);
    assert!(matches!(
        sync.on_reply(&store, 0, status, &body),
        Outcome::Loaded { .. }
    ));
    assert!(
        store.get(BASE_KEY).is_none(),
        "served only once the spend is back"
    );
    let outcomes = run(&mut sync, &etcd, &store, 300);
    assert_eq!(outcomes.last(), Some(&Outcome::Restored { tokens: 1 }));
    assert!(store.get(BASE_KEY).is_some());
    let ledger = crate::ledger::SharedDataLedger::fleet(&store);
    assert_eq!(
        ledger.spent("b"),
        Some((0, 300)),
        "its own spend, not another node's"
    );
}

#[test]
fn spend_is_flushed_as_absolute_values_and_kept_until_etcd_takes_it() {
    let etcd = etcd_with_b_budgeted_one_usd();
    let store = MemoryStore::new();
    let mut sync = PolicySync::new(settings(), "e1".into());
    // Nothing is flushed before the restore.
    sync.mark_dirty("b".into());
    assert!(sync.poll_flush(&store, 0).is_none());
    run(&mut sync, &etcd, &store, 0);
    let ledger = crate::ledger::SharedDataLedger::fleet(&store);
    ledger.restore("b", None, 0, 700, 0).unwrap();
    let call = sync.poll_flush(&store, 0).unwrap();
    assert_eq!(call.path, lease::TXN_PATH);
    let doc: Value = serde_json::from_slice(&call.body).unwrap();
    let put = &doc["success"][0]["request_put"];
    assert_eq!(
        STANDARD.decode(put["key"].as_str().unwrap()).unwrap(),
        b"shieldkey/ledger/node/e1/b/0/spent"
    );
    assert_eq!(
        STANDARD.decode(put["value"].as_str().unwrap()).unwrap(),
        br#"{"spent":700}"#
    );
    // etcd down: still owed, flushed on a later try.
    assert!(!sync.on_flush_reply(0, 503, b"upstream connect error"));
    assert_eq!(sync.unflushed(), 1);
    assert!(sync.poll_flush(&store, 100).is_some());
    assert!(sync.on_flush_reply(100, 200, br#"{"header":{"revision":"9"},"succeeded":true}"#));
    assert_eq!(sync.unflushed(), 0);
}

#[test]
fn rate_counts_are_shared_and_the_other_envoys_read_back() {
    let mut etcd = etcd_with(0);
    etcd.put(
        "shieldkey/policy/tokens/r",
        json!({"id": "r", "digest": STANDARD.encode([9u8; 32]), "upstream_key": "prod",
               "rate_limit": {"requests_per_minute": 10}}),
    );
    let store = MemoryStore::new();
    let mut sync = PolicySync::new(settings(), "e1".into());
    let now = 1_790_000_000_000;
    run(&mut sync, &etcd, &store, now);
    let ledger = crate::ledger::SharedDataLedger::fleet(&store);
    let limits = limits_of(&store, "r");
    ledger.admit("r", &limits, 0, now).unwrap();
    sync.mark_dirty("r".into());
    let flush = sync.poll_flush(&store, now).unwrap();
    let doc: Value = serde_json::from_slice(&flush.body).unwrap();
    let minute = now / 60_000;
    assert_eq!(
        STANDARD
            .decode(doc["success"][0]["request_put"]["key"].as_str().unwrap())
            .unwrap(),
        format!("shieldkey/rate/{minute}/r/e1").into_bytes()
    );
    // Another Envoy counted 9 this minute: this one has 0 left.
    etcd.put(
        &format!("shieldkey/rate/{minute}/r/e2"),
        json!({"requests": 9, "tokens": 0}),
    );
    etcd.put(
        &format!("shieldkey/rate/{minute}/r/e1"),
        json!({"requests": 1, "tokens": 0}),
    );
    let first = sync.poll_rates(now).unwrap();
    assert_eq!(
        first.path,
        lease::DELETE_PATH,
        "the minute before last is deleted first"
    );
    sync.on_rates_reply(&store, now, 200, br#"{"header":{"revision":"9"}}"#);
    let read = sync.poll_rates(now + 200).unwrap();
    let (status, body) = etcd.answer(&read.body);
    assert!(sync.on_rates_reply(&store, now + 200, status, &body));
    assert!(matches!(
        ledger.admit("r", &limits, 0, now + 300),
        Err(crate::ledger::LedgerDenial::RequestRate { .. })
    ));
}

#[test]
fn following_reads_one_key_until_the_settings_move_and_a_hand_written_key_waits_for_the_reconcile()
{
    let mut etcd = etcd_with(3);
    let store = MemoryStore::new();
    let mut sync = PolicySync::new(settings(), "e1".into());
    run(&mut sync, &etcd, &store, 0);
    // Idle: each interval is one range of the settings key alone.
    let probe = sync.poll(100).unwrap();
    let doc: Value = serde_json::from_slice(&probe.body).unwrap();
    assert_eq!(
        STANDARD.decode(doc["key"].as_str().unwrap()).unwrap(),
        b"shieldkey/policy/settings"
    );
    let (status, body) = etcd.answer(&probe.body);
    assert_eq!(
        sync.on_reply(&store, 100, status, &body),
        Outcome::Applied {
            revision: sync.revision(),
            records: 0
        }
    );
    // Written by hand without touching the settings: seen after the reconcile listing.
    etcd.put("shieldkey/policy/tokens/t2", token("t2", "revoked"));
    run(&mut sync, &etcd, &store, 300);
    assert_eq!(revoked(&store, "t2"), Some(false));
    run(&mut sync, &etcd, &store, 1_000);
    run(&mut sync, &etcd, &store, 1_100);
    assert_eq!(revoked(&store, "t2"), Some(true));
}

#[test]
fn a_long_reconcile_listing_is_paged_between_probes() {
    let mut etcd = etcd_with(12_000);
    let store = MemoryStore::new();
    let mut sync = PolicySync::new(settings(), "e1".into());
    run(&mut sync, &etcd, &store, 0);
    etcd.delete("shieldkey/policy/tokens/t9999");
    let kind = |call: &Call| -> (&'static str, Vec<u8>) {
        let doc: Value = serde_json::from_slice(&call.body).unwrap();
        let from = STANDARD.decode(doc["key"].as_str().unwrap()).unwrap();
        if doc["keys_only"] == true {
            ("listing", from)
        } else if from == b"shieldkey/policy/settings" {
            ("probe", from)
        } else {
            ("other", from)
        }
    };
    let mut seen = Vec::new();
    let mut listed_from = Vec::new();
    let mut outcomes = Vec::new();
    for now in [1_000, 1_000, 1_100, 1_100, 1_200, 1_200] {
        let Some(call) = sync.poll(now) else {
            seen.push("idle");
            continue;
        };
        let (what, from) = kind(&call);
        seen.push(what);
        if what == "listing" {
            listed_from.push(from);
        }
        let (status, body) = etcd.answer(&call.body);
        outcomes.push(sync.on_reply(&store, now, status, &body));
    }
    // 12,002 names in pages of 5,000: three pages, each going on from the one before.
    assert_eq!(
        seen,
        ["listing", "probe", "listing", "probe", "listing", "idle"],
        "a revocation waits at most one page of the listing"
    );
    assert!(
        listed_from.windows(2).all(|w| w[0] < w[1]),
        "the listing goes on where it stopped, it does not start over"
    );
    assert_eq!(outcomes.last(), Some(&Outcome::Reconciled { removed: 1 }));
    assert_eq!(revoked(&store, "t9999"), None);
    // A revocation made now is applied at the next interval, listing or not.
    etcd.put("shieldkey/policy/tokens/t5", token("t5", "revoked"));
    bump_settings(&mut etcd);
    run(&mut sync, &etcd, &store, 1_300);
    assert_eq!(revoked(&store, "t5"), Some(true));
}

/// etcd's in-memory txn answers for the lease tests: reads of two keys, guarded writes.
fn answer_txn(etcd: &mut FakeEtcd, body: &[u8]) -> (u32, Vec<u8>) {
    let req: Value = serde_json::from_slice(body).unwrap();
    let key = |v: &Value| STANDARD.decode(v.as_str().unwrap()).unwrap();
    let ok = req["compare"].as_array().is_none_or(|cmps| {
        cmps.iter().all(|c| {
            let want: u64 = c["mod_revision"].as_str().unwrap().parse().unwrap();
            etcd.kvs.get(&key(&c["key"])).map_or(0, |(_, m)| *m) == want
        })
    });
    let mut responses = Vec::new();
    if ok {
        for op in req["success"].as_array().unwrap() {
            if let Some(range) = op.get("request_range") {
                let k = key(&range["key"]);
                let kvs: Vec<Value> = etcd.kvs.get(&k).map_or(vec![], |(v, m)| {
                    vec![
                        json!({"key": STANDARD.encode(&k), "value": STANDARD.encode(v),
                                "mod_revision": m.to_string()}),
                    ]
                });
                responses.push(json!({"response_range": {"kvs": kvs}}));
            } else if let Some(put) = op.get("request_put") {
                etcd.revision += 1;
                let rev = etcd.revision;
                etcd.kvs.insert(key(&put["key"]), (key(&put["value"]), rev));
                responses.push(json!({"response_put": {}}));
            }
        }
    }
    let mut reply =
        json!({"header": {"revision": etcd.revision.to_string()}, "responses": responses});
    if ok {
        reply["succeeded"] = true.into();
    }
    (200, reply.to_string().into_bytes())
}

/// Token `b` ($1 lifetime): this node (e1) holds a $0.30 lease of a pool holding `pool` in all,
/// spent $0.10 of it just now (at 0), and flushed.
fn holding_a_lease(pool: u64) -> (FakeEtcd, MemoryStore, PolicySync, crate::ledger::Limits) {
    let mut etcd = etcd_with_b_budgeted_one_usd();
    etcd.put("shieldkey/ledger/pool/b/0", json!({"claimed": pool}));
    etcd.put(
        "shieldkey/ledger/node/e1/b/0/claimed",
        json!({"claimed": 300_000_000u64}),
    );
    let store = MemoryStore::new();
    let mut sync = PolicySync::new(settings(), "e1".into());
    run(&mut sync, &etcd, &store, 0);
    let ledger = crate::ledger::SharedDataLedger::fleet(&store);
    let limits = limits_of(&store, "b");
    ledger
        .grant("b", None, 0, 300_000_000, 1_000_000_000, 0)
        .unwrap();
    let a = ledger.admit("b", &limits, 0, 0).unwrap();
    ledger
        .settle("b", &limits, &[], &a, 100_000_000, 0, 0)
        .unwrap();
    sync.mark_dirty("b".into());
    let flush = sync.poll_flush(&store, 0).unwrap();
    let (status, body) = answer_txn(&mut etcd, &flush.body);
    sync.on_flush_reply(0, status, &body);
    (etcd, store, sync, limits)
}

#[test]
fn an_idle_lease_goes_back_to_the_pool() {
    // Another node claimed $0.20 of the pool besides this one's $0.30.
    let (mut etcd, store, mut sync, limits) = holding_a_lease(500_000_000);
    let ledger = crate::ledger::SharedDataLedger::fleet(&store);
    // Used just now: nothing goes back yet.
    assert!(sync.poll_returns(&store, 100).is_none());
    // Idle for longer than lease_idle_ms: the unused $0.20 goes back.
    let mut now = 700;
    while let Some(call) = sync.poll_returns(&store, now) {
        let (status, body) = answer_txn(&mut etcd, &call.body);
        assert!(sync.on_return_reply(status, &body));
        now += 10;
    }
    let value = |k: &str| -> Value { serde_json::from_slice(&etcd.kvs[k.as_bytes()].0).unwrap() };
    assert_eq!(
        value("shieldkey/ledger/pool/b/0")["claimed"],
        300_000_000u64
    );
    assert_eq!(
        value("shieldkey/ledger/node/e1/b/0/claimed")["claimed"],
        100_000_000u64
    );
    // Locally: what was spent stays; the next request needs a new lease.
    let mut next = ledger.admit("b", &limits, 0, now).unwrap();
    assert!(matches!(
        ledger.reserve("b", &limits, &mut next, 1, now),
        Err(crate::ledger::LedgerDenial::AllowanceShort { short: 1 })
    ));
}

/// A limit lowered below the leases this Envoy holds: the surplus goes back as soon as the
/// change is applied, though the token is busy (an idle interval later, it could be spent).
#[test]
fn a_lowered_limit_sends_the_surplus_of_a_busy_lease_back_at_once() {
    let (mut etcd, store, mut sync, _) = holding_a_lease(300_000_000);
    assert!(sync.poll_returns(&store, 100).is_none(), "busy: kept");

    etcd.put("shieldkey/policy/tokens/b", budgeted("b", "0.15"));
    bump_settings(&mut etcd);
    run(&mut sync, &etcd, &store, 150);
    let mut now = 160;
    let mut returned = 0;
    while let Some(call) = sync.poll_returns(&store, now) {
        let (status, body) = answer_txn(&mut etcd, &call.body);
        assert!(sync.on_return_reply(status, &body));
        now += 10;
        returned += 1;
    }
    assert!(
        returned > 0 && now < 500,
        "returned at once, not after lease_idle_ms"
    );
    let value = |k: &str| -> Value { serde_json::from_slice(&etcd.kvs[k.as_bytes()].0).unwrap() };
    assert_eq!(
        value("shieldkey/ledger/pool/b/0")["claimed"],
        100_000_000u64
    );
}

// Teams: records under `team.<id>`, followed, reconciled and failing closed like tokens, and
// their spend and rate counts shared through etcd like a token's.

fn team(id: &str, limit: &str) -> Value {
    json!({"id": id, "budget": {"limit_usd": limit, "window": "lifetime"}})
}

fn member(id: &str, team: &str) -> Value {
    json!({"id": id, "digest": STANDARD.encode([9u8; 32]), "upstream_key": "prod", "team": team})
}

fn team_limit(store: &MemoryStore, id: &str) -> Option<NanoUsd> {
    policy_store::lookup_newest(store, &crate::team::subject_id(id))
        .and_then(|(t, _)| t.rules.limits.budget)
        .map(|b| b.limit)
}

/// etcd with team `eng` ($1) and its member `alice`, loaded and restored.
fn loaded_team() -> (FakeEtcd, MemoryStore, PolicySync, Vec<Outcome>) {
    let mut etcd = etcd_with(0);
    etcd.put("shieldkey/policy/teams/eng", team("eng", "1"));
    etcd.put("shieldkey/policy/tokens/alice", member("alice", "eng"));
    let store = MemoryStore::new();
    let mut sync = PolicySync::new(settings(), "e1".into());
    let outcomes = run(&mut sync, &etcd, &store, 0);
    (etcd, store, sync, outcomes)
}

#[test]
fn a_team_is_loaded_into_a_record_under_its_subject_id() {
    let (etcd, store, _sync, outcomes) = loaded_team();
    assert!(
        outcomes.contains(&Outcome::Loaded {
            revision: etcd.revision,
            tokens: 1,
            teams: 1
        }),
        "{outcomes:?}"
    );
    let (eng, _) = policy_store::lookup_newest(&store, "team.eng").unwrap();
    assert_eq!(eng.id, "team.eng");
    assert_eq!(team_limit(&store, "eng"), Some(1_000_000_000));
    assert!(
        policy_store::lookup_newest(&store, "eng").is_none(),
        "never under the bare team id"
    );
    let (alice, _) = policy_store::lookup_newest(&store, "alice").unwrap();
    assert_eq!(alice.team.as_deref(), Some("team.eng"));
    // A team with limits has its counters before its first request, as a token does.
    let ledger = crate::ledger::SharedDataLedger::fleet(&store);
    assert_eq!(ledger.spent("team.eng"), Some((0, 0)));
}

#[test]
fn a_team_change_rewrites_its_record_in_place() {
    let (mut etcd, store, mut sync, _) = loaded_team();
    etcd.put("shieldkey/policy/teams/eng", team("eng", "5"));
    bump_settings(&mut etcd);
    let outcomes = run(&mut sync, &etcd, &store, 100);
    assert_eq!(
        outcomes,
        vec![
            Outcome::Paging,
            Outcome::Applied {
                revision: etcd.revision,
                records: 1
            }
        ],
        "one record rewritten, nothing loaded again"
    );
    assert_eq!(team_limit(&store, "eng"), Some(5_000_000_000));
    // A new team is added the same way.
    etcd.put("shieldkey/policy/teams/ops", team("ops", "2"));
    bump_settings(&mut etcd);
    run(&mut sync, &etcd, &store, 200);
    assert_eq!(team_limit(&store, "ops"), Some(2_000_000_000));
}

#[test]
fn a_deleted_team_is_removed_by_the_reconcile_listing_and_the_others_stay() {
    let (mut etcd, store, mut sync, _) = loaded_team();
    etcd.put("shieldkey/policy/teams/ops", team("ops", "2"));
    bump_settings(&mut etcd);
    run(&mut sync, &etcd, &store, 100);
    etcd.delete("shieldkey/policy/teams/eng");
    bump_settings(&mut etcd);
    run(&mut sync, &etcd, &store, 200);
    assert!(
        team_limit(&store, "eng").is_some(),
        "a deletion is not a modification"
    );
    let outcomes = run(&mut sync, &etcd, &store, 1_000);
    assert!(
        outcomes.contains(&Outcome::Reconciled { removed: 1 }),
        "{outcomes:?}"
    );
    assert_eq!(team_limit(&store, "eng"), None);
    assert_eq!(team_limit(&store, "ops"), Some(2_000_000_000));
    assert!(policy_store::lookup_newest(&store, "alice").is_some());
    // Nothing more to remove on the next round (after the scan every listing is followed by):
    // `known` holds what is there.
    let mut outcomes = run(&mut sync, &etcd, &store, 2_000);
    outcomes.extend(run(&mut sync, &etcd, &store, 2_100));
    assert!(
        outcomes.contains(&Outcome::Reconciled { removed: 0 }),
        "{outcomes:?}"
    );
}

#[test]
fn a_team_deleted_while_everything_loads_again_is_removed() {
    let (mut etcd, store, mut sync, _) = loaded_team();
    etcd.delete("shieldkey/policy/teams/eng");
    // A new upstream key: every record is written again from a fresh snapshot.
    etcd.put(
        "shieldkey/policy/keys/a-key",
        json!({"id": "a-key", "sealed": sealed("a-key")}),
    );
    bump_settings(&mut etcd);
    let outcomes = run(&mut sync, &etcd, &store, 100);
    assert!(
        matches!(
            outcomes.last(),
            Some(Outcome::Loaded {
                tokens: 1,
                teams: 0,
                ..
            })
        ),
        "{outcomes:?}"
    );
    assert_eq!(team_limit(&store, "eng"), None);
}

#[test]
fn a_team_key_that_is_not_a_valid_team_removes_its_record() {
    let cases = [
        // Not JSON.
        json!("{not json"),
        // The id inside is another team's.
        team("ops", "1"),
        // Does not compile.
        json!({"id": "eng", "budget": {"limit_usd": "lots", "window": "lifetime"}}),
        // A field no team has.
        json!({"id": "eng", "digest": "x"}),
    ];
    for (i, bad) in cases.into_iter().enumerate() {
        let (mut etcd, store, mut sync, _) = loaded_team();
        etcd.put("shieldkey/policy/teams/eng", bad);
        bump_settings(&mut etcd);
        run(&mut sync, &etcd, &store, 100);
        assert_eq!(team_limit(&store, "eng"), None, "case {i}");
        assert_eq!(team_limit(&store, "ops"), None, "case {i}");
        // Fixed: served again.
        etcd.put("shieldkey/policy/teams/eng", team("eng", "3"));
        bump_settings(&mut etcd);
        run(&mut sync, &etcd, &store, 200);
        assert_eq!(team_limit(&store, "eng"), Some(3_000_000_000), "case {i}");
    }
    // Broken in the snapshot of the first load: no record at all.
    let mut etcd = etcd_with(0);
    etcd.put(
        "shieldkey/policy/teams/eng",
        json!({"id": "eng", "rate_limit": {"requests_per_minute": "ten"}}),
    );
    let store = MemoryStore::new();
    let mut sync = PolicySync::new(settings(), "e1".into());
    let outcomes = run(&mut sync, &etcd, &store, 0);
    assert!(
        outcomes.contains(&Outcome::Loaded {
            revision: etcd.revision,
            tokens: 0,
            teams: 1
        }),
        "{outcomes:?}"
    );
    assert!(policy_store::lookup_newest(&store, "team.eng").is_none());
}

#[test]
fn a_token_key_named_like_a_team_subject_leaves_the_team_alone() {
    let (mut etcd, store, mut sync, _) = loaded_team();
    // Written by hand: no token can have this id, and it must not touch team eng's record.
    etcd.put(
        "shieldkey/policy/tokens/team.eng",
        token("team.eng", "active"),
    );
    bump_settings(&mut etcd);
    run(&mut sync, &etcd, &store, 100);
    assert_eq!(team_limit(&store, "eng"), Some(1_000_000_000));
    etcd.delete("shieldkey/policy/teams/eng");
    let outcomes = run(&mut sync, &etcd, &store, 1_000);
    assert!(
        outcomes.contains(&Outcome::Reconciled { removed: 1 }),
        "the stray token key does not keep the deleted team: {outcomes:?}"
    );
    assert_eq!(team_limit(&store, "eng"), None);

    // Nor when the team goes while everything is loaded again.
    etcd.put("shieldkey/policy/teams/eng", team("eng", "1"));
    bump_settings(&mut etcd);
    run(&mut sync, &etcd, &store, 1_100);
    assert_eq!(team_limit(&store, "eng"), Some(1_000_000_000));
    etcd.delete("shieldkey/policy/teams/eng");
    etcd.put(
        "shieldkey/policy/keys/a-key",
        json!({"id": "a-key", "sealed": sealed("a-key")}),
    );
    bump_settings(&mut etcd);
    let outcomes = run(&mut sync, &etcd, &store, 1_200);
    assert!(
        matches!(outcomes.last(), Some(Outcome::Loaded { teams: 0, .. })),
        "{outcomes:?}"
    );
    assert_eq!(team_limit(&store, "eng"), None);
}

#[test]
fn teams_belong_in_etcd_not_in_the_settings_or_the_plugin_configuration() {
    let (mut etcd, store, mut sync, _) = loaded_team();
    etcd.put(
        "shieldkey/policy/settings",
        json!({"version": 1, "revision": 9, "teams": [{"id": "eng"}]}),
    );
    let outcomes = run(&mut sync, &etcd, &store, 100);
    assert!(
        matches!(outcomes.last(), Some(Outcome::Rejected(why)) if why.contains("teams")),
        "{outcomes:?}"
    );
    assert_eq!(team_limit(&store, "eng"), Some(1_000_000_000));

    let fleet = RawFleet {
        cluster: "etcd".into(),
        prefix: None,
        authority: None,
        sync_interval_ms: None,
        timeout_ms: None,
        reconcile_interval_ms: None,
        lease_idle_ms: None,
        sync: None,
    };
    let policy = RawPolicy {
        version: 1,
        revision: 0,
        master_key_env: None,
        upstream_keys: vec![],
        tokens: vec![],
        teams: vec![RawTeam {
            id: "eng".into(),
            ..RawTeam::default()
        }],
        enforce: None,
        pricing: None,
        requests: None,
        alerts: None,
        fleet: Some(fleet.clone()),
    };
    let err = compile_fleet(&policy, &fleet).unwrap_err().to_string();
    assert!(err.contains("teams"), "{err}");
}

#[test]
fn a_teams_spend_is_flushed_restored_after_a_restart_and_its_idle_lease_returned() {
    let (mut etcd, store, mut sync, _) = loaded_team();
    // This node claimed $0.30 of the team's $1 pool.
    etcd.put(
        "shieldkey/ledger/pool/team.eng/0",
        json!({"claimed": 300_000_000u64}),
    );
    etcd.put(
        "shieldkey/ledger/node/e1/team.eng/0/claimed",
        json!({"claimed": 300_000_000u64}),
    );
    let ledger = crate::ledger::SharedDataLedger::fleet(&store);
    let limits = limits_of(&store, "team.eng");
    ledger
        .grant("team.eng", None, 0, 300_000_000, 1_000_000_000, 0)
        .unwrap();
    let a = ledger.admit("team.eng", &limits, 0, 0).unwrap();
    ledger
        .settle("team.eng", &limits, &[], &a, 100_000_000, 0, 0)
        .unwrap();
    sync.mark_dirty("team.eng".into());
    let flush = sync.poll_flush(&store, 0).unwrap();
    let doc: Value = serde_json::from_slice(&flush.body).unwrap();
    let put = &doc["success"][0]["request_put"];
    assert_eq!(
        STANDARD.decode(put["key"].as_str().unwrap()).unwrap(),
        b"shieldkey/ledger/node/e1/team.eng/0/spent"
    );
    assert_eq!(
        STANDARD.decode(put["value"].as_str().unwrap()).unwrap(),
        br#"{"spent":100000000}"#
    );
    let (status, body) = answer_txn(&mut etcd, &flush.body);
    assert!(sync.on_flush_reply(0, status, &body));

    // Idle for longer than lease_idle_ms: the unused $0.20 goes back to the team's pool.
    let mut now = 700;
    while let Some(call) = sync.poll_returns(&store, now) {
        let (status, body) = answer_txn(&mut etcd, &call.body);
        assert!(sync.on_return_reply(status, &body));
        now += 10;
    }
    let value = |k: &str| -> Value { serde_json::from_slice(&etcd.kvs[k.as_bytes()].0).unwrap() };
    assert_eq!(
        value("shieldkey/ledger/pool/team.eng/0")["claimed"],
        100_000_000u64
    );

    // A restart: a fresh shared data, the team's spend comes back before anything is served.
    let store = MemoryStore::new();
    let mut sync = PolicySync::new(settings(), "e1".into());
    let outcomes = run(&mut sync, &etcd, &store, 1_000);
    assert_eq!(outcomes.last(), Some(&Outcome::Restored { tokens: 1 }));
    let ledger = crate::ledger::SharedDataLedger::fleet(&store);
    assert_eq!(ledger.spent("team.eng"), Some((0, 100_000_000)));
}

#[test]
fn a_teams_rate_counts_are_shared_like_a_tokens() {
    let mut etcd = etcd_with(0);
    etcd.put(
        "shieldkey/policy/teams/eng",
        json!({"id": "eng", "rate_limit": {"requests_per_minute": 10}}),
    );
    let store = MemoryStore::new();
    let mut sync = PolicySync::new(settings(), "e1".into());
    let now = 1_790_000_000_000;
    run(&mut sync, &etcd, &store, now);
    let ledger = crate::ledger::SharedDataLedger::fleet(&store);
    let limits = limits_of(&store, "team.eng");
    ledger.admit("team.eng", &limits, 0, now).unwrap();
    sync.mark_dirty("team.eng".into());
    let flush = sync.poll_flush(&store, now).unwrap();
    let doc: Value = serde_json::from_slice(&flush.body).unwrap();
    let minute = now / 60_000;
    assert_eq!(
        STANDARD
            .decode(doc["success"][0]["request_put"]["key"].as_str().unwrap())
            .unwrap(),
        format!("shieldkey/rate/{minute}/team.eng/e1").into_bytes()
    );
    // Another Envoy counted 9 of the team's requests this minute: this one has 0 left.
    etcd.put(
        &format!("shieldkey/rate/{minute}/team.eng/e2"),
        json!({"requests": 9, "tokens": 0}),
    );
    let first = sync.poll_rates(now).unwrap();
    assert_eq!(first.path, lease::DELETE_PATH);
    sync.on_rates_reply(&store, now, 200, br#"{"header":{"revision":"9"}}"#);
    let read = sync.poll_rates(now + 200).unwrap();
    let (status, body) = etcd.answer(&read.body);
    assert!(sync.on_rates_reply(&store, now + 200, status, &body));
    assert!(matches!(
        ledger.admit("team.eng", &limits, 0, now + 300),
        Err(crate::ledger::LedgerDenial::RequestRate { .. })
    ));
}

#[test]
fn a_team_created_while_a_long_listing_pages_is_not_taken_for_deleted() {
    let mut etcd = etcd_with(12_000);
    let store = MemoryStore::new();
    let mut sync = PolicySync::new(settings(), "e1".into());
    run(&mut sync, &etcd, &store, 0);
    // The first page of the listing, read at the revision of now.
    let call = sync.poll(1_000).unwrap();
    let (status, body) = etcd.answer(&call.body);
    assert_eq!(sync.on_reply(&store, 1_000, status, &body), Outcome::Paging);
    // Created after that revision, applied by the scan between two pages.
    etcd.put("shieldkey/policy/teams/eng", team("eng", "1"));
    etcd.put("shieldkey/policy/tokens/new", token("new", "active"));
    bump_settings(&mut etcd);
    let mut now = 1_100;
    let mut outcomes = Vec::new();
    while !outcomes
        .iter()
        .any(|o| matches!(o, Outcome::Reconciled { .. }))
    {
        outcomes.extend(run(&mut sync, &etcd, &store, now));
        now += 100;
        assert!(now < 5_000, "{outcomes:?}");
    }
    assert!(
        outcomes.contains(&Outcome::Reconciled { removed: 0 }),
        "{outcomes:?}"
    );
    assert_eq!(team_limit(&store, "eng"), Some(1_000_000_000));
    assert_eq!(revoked(&store, "new"), Some(false));
}

/// One Envoy of a test fleet: its syncer and its shared data.
struct Node {
    sync: PolicySync,
    store: MemoryStore,
    /// Moves a sync interval on at every flush (a flush is due once per interval).
    now: i64,
}

impl Node {
    fn start(name: &str, etcd: &FakeEtcd, now: i64) -> Node {
        let mut node = Node {
            sync: PolicySync::new(settings(), name.into()),
            store: MemoryStore::new(),
            now,
        };
        run(&mut node.sync, etcd, &node.store, now);
        node
    }

    /// This Envoy has spent `spent` of `id`'s lifetime budget: flushed, then the alert calls run
    /// to the end. Returns the alerts this node sends.
    fn spend(&mut self, etcd: &mut FakeEtcd, id: &str, spent: NanoUsd) -> Vec<BudgetAlert> {
        self.now += 100;
        let now = self.now;
        let ledger = crate::ledger::SharedDataLedger::fleet(&self.store);
        ledger.restore(id, None, 0, spent, now).unwrap();
        self.sync.mark_dirty(id.into());
        let flush = self.sync.poll_flush(&self.store, now).unwrap();
        let (status, body) = etcd.answer_txn(&flush.body);
        assert!(self.sync.on_flush_reply(now, status, &body));
        self.alert_calls(etcd)
    }

    fn alert_calls(&mut self, etcd: &mut FakeEtcd) -> Vec<BudgetAlert> {
        let now = self.now;
        let mut sent = Vec::new();
        while let Some(call) = self.sync.poll_alerts(now) {
            assert_eq!(call.path, lease::TXN_PATH);
            let (status, body) = etcd.answer_txn(&call.body);
            match self.sync.on_alerts_reply(&self.store, now, status, &body) {
                AlertStep::Send { alert, webhook } => {
                    assert!(!webhook, "no webhook in this policy");
                    sent.push(alert);
                }
                AlertStep::Done => {}
                other => panic!("{other:?}"),
            }
            assert!(sent.len() < 100);
        }
        sent
    }
}

#[test]
fn budget_alerts_are_judged_on_the_fleets_spend_and_sent_by_one_node() {
    let mut etcd = etcd_with_b_budgeted_one_usd();
    let now = 1_790_000_000_000;
    let mut e1 = Node::start("e1", &etcd, now);
    let mut e2 = Node::start("e2", &etcd, now);
    let dollars = |cents: u64| cents * 10_000_000;

    // 30% here and 30% there: neither Envoy alone reaches 50%, the fleet does, and the node whose
    // flush carried it over sends the alert with the fleet's spend.
    assert!(e1.spend(&mut etcd, "b", dollars(30)).is_empty());
    let sent = e2.spend(&mut etcd, "b", dollars(30));
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(sent[0].threshold_percent, 50);
    assert_eq!(sent[0].spent, dollars(60));
    assert_eq!(sent[0].limit, dollars(100));
    assert_eq!(sent[0].token_id, "b");
    // The other node sees 50% crossed too, and finds the alert already claimed.
    assert!(e1.spend(&mut etcd, "b", dollars(40)).is_empty());
    let key = |t: u8| format!("shieldkey/ledger/alerts/b/0/{t}").into_bytes();
    let (claim, _) = etcd.kvs.get(&key(50)).unwrap();
    assert_eq!(
        serde_json::from_slice::<Value>(claim).unwrap()["node"],
        "e2"
    );
    // 70% is under 80: nothing; then 80% and 100% at once from one flush: both, once.
    assert!(e2.spend(&mut etcd, "b", dollars(30)).is_empty());
    let sent = e2.spend(&mut etcd, "b", dollars(60));
    let thresholds: Vec<u8> = sent.iter().map(|a| a.threshold_percent).collect();
    assert_eq!(thresholds, vec![80, 100]);
    assert!(e1.spend(&mut etcd, "b", dollars(40)).is_empty());
    assert!(
        e2.spend(&mut etcd, "b", dollars(60)).is_empty(),
        "never twice"
    );

    // A restarted Envoy reads its spend back and sends nothing already sent.
    let mut e1 = Node::start("e1", &etcd, now);
    assert!(e1.spend(&mut etcd, "b", dollars(41)).is_empty());
    assert_eq!(
        etcd.kvs
            .keys()
            .filter(|k| k.starts_with(b"shieldkey/ledger/alerts/"))
            .count(),
        3
    );
}

/// Token `b` ($1 lifetime): node e1 has spent $0.60 of it and flushed that, at `now`.
fn sixty_percent_flushed(now: i64) -> (FakeEtcd, Node) {
    let mut etcd = etcd_with_b_budgeted_one_usd();
    let mut e1 = Node::start("e1", &etcd, now);
    let ledger = crate::ledger::SharedDataLedger::fleet(&e1.store);
    ledger.restore("b", None, 0, 600_000_000, now).unwrap();
    e1.sync.mark_dirty("b".into());
    let flush = e1.sync.poll_flush(&e1.store, now).unwrap();
    let (status, body) = etcd.answer_txn(&flush.body);
    assert!(e1.sync.on_flush_reply(now, status, &body));
    (etcd, e1)
}

#[test]
fn a_fleet_alert_check_that_fails_is_made_again_and_a_claim_is_retried() {
    let now = 1_790_000_000_000;
    let (mut etcd, mut e1) = sixty_percent_flushed(now);
    // The check fails: it is made again, a sync interval (100 ms here) later, not at once.
    let check = e1.sync.poll_alerts(now).unwrap();
    assert_eq!(
        e1.sync
            .on_alerts_reply(&e1.store, now, 503, b"no healthy upstream"),
        AlertStep::Failed
    );
    assert!(e1.sync.poll_alerts(now + 99).is_none());
    let mut t = now + 100;
    assert_eq!(e1.sync.poll_alerts(t).unwrap().body, check.body);
    let (status, body) = etcd.answer_txn(&check.body);
    assert_eq!(
        e1.sync.on_alerts_reply(&e1.store, t, status, &body),
        AlertStep::Done
    );
    // The claim fails twice, then goes through: sent once.
    for _ in 0..2 {
        assert!(e1.sync.poll_alerts(t).is_some());
        assert_eq!(
            e1.sync.on_alerts_reply(&e1.store, t, 0, b""),
            AlertStep::Failed
        );
        t += 100;
    }
    e1.now = t;
    let sent = e1.alert_calls(&mut etcd);
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].threshold_percent, 50);
}

#[test]
fn a_won_alert_claim_whose_reply_was_lost_is_sent_on_the_retry() {
    let now = 1_790_000_000_000;
    let (mut etcd, mut e1) = sixty_percent_flushed(now);
    let check = e1.sync.poll_alerts(now).unwrap();
    let (status, body) = etcd.answer_txn(&check.body);
    assert_eq!(
        e1.sync.on_alerts_reply(&e1.store, now, status, &body),
        AlertStep::Done
    );
    // etcd applies the claim, but its reply never arrives (a timeout).
    let claim = e1.sync.poll_alerts(now).unwrap();
    etcd.answer_txn(&claim.body);
    assert_eq!(
        e1.sync.on_alerts_reply(&e1.store, now, 0, b""),
        AlertStep::Failed
    );
    // The retry finds the key this node created: it won, and sends the alert.
    e1.now = now + 100;
    let sent = e1.alert_calls(&mut etcd);
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(sent[0].threshold_percent, 50);
    // Another node that finds the key sends nothing.
    let mut e2 = Node::start("e2", &etcd, now);
    assert!(e2.spend(&mut etcd, "b", 100_000_000).is_empty());
}

#[test]
fn a_teams_fleet_alert_names_the_team_and_no_owner() {
    let mut etcd = etcd_with(0);
    etcd.put("shieldkey/policy/teams/eng", team("eng", "1"));
    etcd.put("shieldkey/policy/tokens/alice", member("alice", "eng"));
    let now = 1_790_000_000_000;
    let mut e1 = Node::start("e1", &etcd, now);
    let mut e2 = Node::start("e2", &etcd, now);
    assert!(e1.spend(&mut etcd, "team.eng", 300_000_000).is_empty());
    let sent = e2.spend(&mut etcd, "team.eng", 250_000_000);
    assert_eq!(sent.len(), 1, "{sent:?}");
    let alert = &sent[0];
    assert_eq!(
        (
            alert.token_id.as_str(),
            alert.owner.as_str(),
            alert.team.as_deref()
        ),
        ("team.eng", "", Some("eng"))
    );
    assert_eq!((alert.threshold_percent, alert.spent), (50, 550_000_000));
    assert!(alert.log_line().contains("team eng reached 50%"));
}

#[test]
fn ended_budget_windows_leave_etcd_and_the_current_and_previous_stay() {
    let mut etcd = etcd_with(0);
    let hourly = |id: &str| {
        json!({"id": id, "digest": STANDARD.encode([9u8; 32]), "upstream_key": "prod",
               "budget": {"limit_usd": "1", "window": "hourly"}})
    };
    etcd.put("shieldkey/policy/tokens/h", hourly("h"));
    etcd.put("shieldkey/policy/tokens/l", budgeted("l", "1"));
    let now = 1_790_000_123_000;
    let hour = now / 1000 / 3600 * 3600;
    let windows = [hour, hour - 3600, hour - 7200, hour - 10_800];
    let spent = json!({"spent": 5});
    for w in windows {
        for node in ["e1", "e2"] {
            etcd.put(
                &format!("shieldkey/ledger/node/{node}/h/{w}/claimed"),
                json!({"claimed": 9}),
            );
            etcd.put(
                &format!("shieldkey/ledger/node/{node}/h/{w}/spent"),
                spent.clone(),
            );
            etcd.put(
                &format!("shieldkey/ledger/spent/h/{w}/{node}"),
                spent.clone(),
            );
        }
        etcd.put(
            &format!("shieldkey/ledger/pool/h/{w}"),
            json!({"claimed": 18}),
        );
        etcd.put(
            &format!("shieldkey/ledger/alerts/h/{w}/50"),
            json!({"node": "e2"}),
        );
    }
    // A lifetime budget never ends; a token no longer in the policy keeps its keys.
    etcd.put("shieldkey/ledger/node/e1/l/0/spent", spent.clone());
    etcd.put(
        &format!("shieldkey/ledger/node/e1/gone/{}/spent", hour - 7200),
        spent.clone(),
    );
    let keys_before: BTreeSet<Vec<u8>> = etcd.kvs.keys().cloned().collect();

    let mut e1 = Node::start("e1", &etcd, now);
    assert!(
        e1.sync.poll_sweep(now).is_none(),
        "the first sweep waits a reconcile interval"
    );
    let later = now + 1_000;
    let mut steps = Vec::new();
    while let Some(call) = e1.sync.poll_sweep(later) {
        let (status, body) = if call.path == RANGE_PATH {
            etcd.answer(&call.body)
        } else {
            etcd.answer_txn(&call.body)
        };
        steps.push(e1.sync.on_sweep_reply(&e1.store, later, status, &body));
        assert!(steps.len() < 10);
    }
    assert_eq!(steps, vec![SweepStep::Listed, SweepStep::Deleted(2)]);

    let gone: BTreeSet<String> = keys_before
        .iter()
        .filter(|k| !etcd.kvs.contains_key(*k))
        .map(|k| String::from_utf8(k.clone()).unwrap())
        .collect();
    let mut expected = BTreeSet::new();
    for w in &windows[2..] {
        expected.insert(format!("shieldkey/ledger/node/e1/h/{w}/claimed"));
        expected.insert(format!("shieldkey/ledger/node/e1/h/{w}/spent"));
        expected.insert(format!("shieldkey/ledger/spent/h/{w}/e1"));
        expected.insert(format!("shieldkey/ledger/spent/h/{w}/e2"));
        expected.insert(format!("shieldkey/ledger/pool/h/{w}"));
        expected.insert(format!("shieldkey/ledger/alerts/h/{w}/50"));
    }
    // e2's own keys of those windows are e2's to delete.
    assert_eq!(gone, expected);
    assert!(
        e1.sync.poll_sweep(later + 1_000).is_none(),
        "next one in 60 intervals"
    );
    assert!(e1.sync.poll_sweep(later + 60_000).is_some());
}

#[test]
fn a_flush_backlog_drains_at_once_and_busy_tokens_cannot_starve_the_others() {
    let mut etcd = etcd_with(0);
    let busy: Vec<String> = (0..45).map(|i| format!("b{i:02}")).collect();
    for id in busy.iter().chain([&"zz".to_string()]) {
        etcd.put(&format!("shieldkey/policy/tokens/{id}"), budgeted(id, "1"));
    }
    let store = MemoryStore::new();
    let mut sync = PolicySync::new(settings(), "e1".into());
    run(&mut sync, &etcd, &store, 0);
    let flushed = |call: &Call| -> BTreeSet<String> {
        let doc: Value = serde_json::from_slice(&call.body).unwrap();
        doc["success"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|op| {
                let key = STANDARD
                    .decode(op["request_put"]["key"].as_str().unwrap())
                    .unwrap();
                let key = String::from_utf8(key).unwrap();
                let rest = key.strip_prefix("shieldkey/ledger/node/e1/")?;
                Some(rest.split('/').next().unwrap().to_string())
            })
            .collect()
    };
    let ledger = crate::ledger::SharedDataLedger::fleet(&store);
    for id in busy.iter().chain([&"zz".to_string()]) {
        ledger.restore(id, None, 0, 1, 0).unwrap();
        sync.mark_dirty(id.clone());
    }
    let ok = br#"{"header":{"revision":"9"},"succeeded":true}"#;
    // 46 waiting: 40 now, and the other 6 at the next tick rather than an interval later.
    let first = sync.poll_flush(&store, 1_000).unwrap();
    assert_eq!(flushed(&first).len(), 40);
    // The busy tokens are marked again while the flush is in flight.
    for id in &busy {
        sync.mark_dirty(id.clone());
    }
    assert!(sync.on_flush_reply(1_000, 200, ok));
    let second = sync.poll_flush(&store, 1_000).unwrap();
    let second = flushed(&second);
    assert_eq!(second.len(), 40);
    assert!(
        second.contains("zz"),
        "its turn came before the busy tokens' second"
    );
    assert!(sync.on_flush_reply(1_000, 200, ok));
    // The rest of the backlog, then nothing is due until an interval has passed.
    assert!(sync.poll_flush(&store, 1_000).is_some());
    assert!(sync.on_flush_reply(1_000, 200, ok));
    sync.mark_dirty("zz".into());
    assert!(sync.poll_flush(&store, 1_000).is_none());
    assert!(sync.poll_flush(&store, 1_100).is_some());
}

fn budgeted_daily(id: &str, limit: &str) -> Value {
    json!({"id": id, "digest": STANDARD.encode([9u8; 32]), "upstream_key": "prod",
           "budget": {"limit_usd": limit, "window": "daily"}})
}

fn node_spent(etcd: &FakeEtcd, key: &str) -> Option<u64> {
    let (value, _) = etcd.kvs.get(key.as_bytes())?;
    serde_json::from_slice::<Value>(value).ok()?["spent"].as_u64()
}

/// One request of `cost` on `id` through this Envoy's ledger (its lease granted first), flushed.
fn spend_and_flush(
    sync: &mut PolicySync,
    etcd: &mut FakeEtcd,
    store: &MemoryStore,
    id: &str,
    cost: NanoUsd,
    now: i64,
) {
    let ledger = crate::ledger::SharedDataLedger::fleet(store);
    let limits = limits_of(store, id);
    let window = limits.budget.unwrap().window;
    let limit = limits.budget.unwrap().limit;
    ledger
        .grant(id, Some(window), window.start(now / 1000), cost, limit, now)
        .unwrap();
    let admission = ledger.admit(id, &limits, 0, now).unwrap();
    ledger
        .settle(id, &limits, &[], &admission, cost, 0, now)
        .unwrap();
    sync.mark_dirty(id.into());
    let flush = sync.poll_flush(store, now).unwrap();
    let (status, body) = etcd.answer_txn(&flush.body);
    assert!(sync.on_flush_reply(now, status, &body));
}

/// Token `b` with `record` (a daily budget): this node (e1) spent 300 of it today and flushed
/// it; the etcd key of that spend.
fn spent_300_today(record: Value, now: i64) -> (FakeEtcd, MemoryStore, PolicySync, String) {
    let mut etcd = etcd_with(0);
    etcd.put("shieldkey/policy/tokens/b", record);
    let store = MemoryStore::new();
    let mut sync = PolicySync::new(settings(), "e1".into());
    run(&mut sync, &etcd, &store, now);
    spend_and_flush(&mut sync, &mut etcd, &store, "b", 300, now);
    let day = crate::budget_window::BudgetWindow::Daily.start(now / 1000);
    let key = format!("shieldkey/ledger/node/e1/b/{day}/spent");
    assert_eq!(node_spent(&etcd, &key), Some(300));
    (etcd, store, sync, key)
}

/// README: a token removed and minted again under its id continues its spend. Neither the
/// idle-lease scan while it is out of the policy nor a restart in that time may lose it, and
/// no flush may write less than etcd holds.
#[test]
fn a_token_removed_and_minted_again_continues_its_spend_in_the_ledger() {
    let now = 1_790_000_000_000;
    let (mut etcd, store, mut sync, key) = spent_300_today(budgeted_daily("b", "1"), now);
    let day = crate::budget_window::BudgetWindow::Daily.start(now / 1000);

    // Removed; the idle-lease scan runs while it is out of the policy.
    etcd.delete("shieldkey/policy/tokens/b");
    bump_settings(&mut etcd);
    let mut t = now + 2_000;
    run(&mut sync, &etcd, &store, t);
    assert!(policy_store::lookup_newest(&store, "b").is_none());
    t += 60_000;
    while let Some(_call) = sync.poll_returns(&store, t) {
        sync.on_return_reply(503, b"");
    }
    let ledger = crate::ledger::SharedDataLedger::fleet(&store);
    assert_eq!(ledger.spent("b"), Some((day, 300)));

    // Minted again the same day: one more request of 10 is flushed as 310.
    etcd.put("shieldkey/policy/tokens/b", budgeted_daily("b", "1"));
    bump_settings(&mut etcd);
    t += 2_000;
    run(&mut sync, &etcd, &store, t);
    spend_and_flush(&mut sync, &mut etcd, &store, "b", 10, t);
    assert_eq!(node_spent(&etcd, &key), Some(310));

    // Removed again, and this Envoy restarts meanwhile: minted again, it goes on from 310.
    etcd.delete("shieldkey/policy/tokens/b");
    bump_settings(&mut etcd);
    let store = MemoryStore::new();
    let mut sync = PolicySync::new(settings(), "e1".into());
    t += 2_000;
    run(&mut sync, &etcd, &store, t);
    etcd.put("shieldkey/policy/tokens/b", budgeted_daily("b", "1"));
    bump_settings(&mut etcd);
    for _ in 0..3 {
        t += 1_000;
        run(&mut sync, &etcd, &store, t);
    }
    spend_and_flush(&mut sync, &mut etcd, &store, "b", 5, t);
    assert_eq!(node_spent(&etcd, &key), Some(315));
}

/// Spend settled in the last sync interval of a budget window, and by a request that ends after
/// the window turned, still reaches that window's keys in etcd after a request of the new window
/// rolled the counters.
#[test]
fn the_end_of_a_budget_window_is_flushed_after_it_turned() {
    let (midnight, now, mut etcd) = half_a_second_before_midnight_with_b_daily();
    let store = MemoryStore::new();
    let mut sync = PolicySync::new(settings(), "e1".into());
    run(&mut sync, &etcd, &store, now);
    let day = crate::budget_window::BudgetWindow::Daily.start(now / 1000);
    assert_eq!(day * 1000, midnight - 86_400_000);
    spend_and_flush(&mut sync, &mut etcd, &store, "b", 300, now);
    let ledger = crate::ledger::SharedDataLedger::fleet(&store);
    let limits = limits_of(&store, "b");
    // 200 more just before midnight, and a stream admitted then that ends after it.
    let a = ledger.admit("b", &limits, 0, now + 50).unwrap();
    ledger
        .settle("b", &limits, &[], &a, 200, 0, now + 50)
        .unwrap();
    let stream = ledger.admit("b", &limits, 0, now + 60).unwrap();
    sync.mark_dirty("b".into());
    // A request of the new day rolls the counters before the next flush.
    let _ = ledger.admit("b", &limits, 0, midnight + 10).unwrap();
    ledger
        .settle("b", &limits, &[], &stream, 50, 0, midnight + 20)
        .unwrap();
    let flush = sync.poll_flush(&store, midnight + 100).unwrap();
    let (status, body) = etcd.answer_txn(&flush.body);
    assert!(sync.on_flush_reply(midnight + 100, status, &body));
    let key = format!("shieldkey/ledger/node/e1/b/{day}/spent");
    assert_eq!(node_spent(&etcd, &key), Some(550));
    let by_token = format!("shieldkey/ledger/spent/b/{day}/e1");
    assert_eq!(node_spent(&etcd, &by_token), Some(550));
    // Ten minutes into the new day, the old one is no longer written.
    etcd.put(&key, json!({"spent": 1u64}));
    spend_and_flush(&mut sync, &mut etcd, &store, "b", 1, midnight + 600_000);
    assert_eq!(node_spent(&etcd, &key), Some(1));
}

/// The alert key names the claim (a random marker), not only the node: a node restarted under
/// its id must not take the alerts it sent before for claims it just won.
#[test]
fn a_restarted_node_does_not_send_again_the_alerts_it_sent() {
    let mut etcd = etcd_with_b_budgeted_one_usd();
    let now = 1_790_000_000_000;
    let mut e2 = Node::start("e2", &etcd, now);
    let sent = e2.spend(&mut etcd, "b", 600_000_000);
    assert_eq!(sent.len(), 1, "{sent:?}");
    // e2 restarts under the same node id; one more flush of its spend.
    let mut e2 = Node::start("e2", &etcd, now + 1_000);
    let again = e2.spend(&mut etcd, "b", 610_000_000);
    assert!(again.is_empty(), "sent again after a restart: {again:?}");
}

/// A threshold crossed by the spend of a window's last sync interval (flushed after the
/// turn, as the previous window's) is alerted.
#[test]
fn a_threshold_crossed_at_the_end_of_a_window_is_alerted() {
    let (midnight, now, mut etcd) = half_a_second_before_midnight_with_b_daily();
    let mut e1 = Node::start("e1", &etcd, now);
    spend_and_flush(&mut e1.sync, &mut etcd, &e1.store, "b", 400_000_000, now);
    e1.now = now;
    assert!(e1.alert_calls(&mut etcd).is_empty());
    let ledger = crate::ledger::SharedDataLedger::fleet(&e1.store);
    let limits = limits_of(&e1.store, "b");
    let day = crate::budget_window::BudgetWindow::Daily.start(now / 1000);
    ledger
        .grant(
            "b",
            limits.budget.map(|b| b.window),
            day,
            200_000_000,
            1_000_000_000,
            now + 50,
        )
        .unwrap();
    let a = ledger.admit("b", &limits, 0, now + 50).unwrap();
    ledger
        .settle("b", &limits, &[], &a, 200_000_000, 0, now + 50)
        .unwrap();
    e1.sync.mark_dirty("b".into());
    // A request of the new day rolls the counters before the next flush.
    let _ = ledger.admit("b", &limits, 0, midnight + 10).unwrap();
    let flush = e1.sync.poll_flush(&e1.store, midnight + 100).unwrap();
    let (status, body) = etcd.answer_txn(&flush.body);
    assert!(e1.sync.on_flush_reply(midnight + 100, status, &body));
    assert_eq!(
        node_spent(&etcd, &format!("shieldkey/ledger/spent/b/{day}/e1")),
        Some(600_000_000),
        "the previous window was flushed"
    );
    e1.now = midnight + 100;
    let sent: Vec<u8> = e1
        .alert_calls(&mut etcd)
        .iter()
        .map(|a| a.threshold_percent)
        .collect();
    assert_eq!(sent, vec![50], "the 50% crossing of the day that ended");
}

/// The return scan is due every `lease_idle_ms`, and when a change was applied; a probe that
/// found nothing new does not make it due (each scan rewrites every leased token's counters).
#[test]
fn a_probe_with_no_change_does_not_scan_the_leases_again() {
    let (etcd, store, mut sync, _) = holding_a_lease(300_000_000);
    assert!(sync.poll_returns(&store, 100).is_none());
    let cas = store.get("shieldkey/2/ledger/b").unwrap().1;
    let outcomes = run(&mut sync, &etcd, &store, 200);
    assert!(
        outcomes
            .iter()
            .all(|o| matches!(o, Outcome::Applied { records: 0, .. })),
        "{outcomes:?}"
    );
    assert!(sync.poll_returns(&store, 300).is_none());
    assert_eq!(store.get("shieldkey/2/ledger/b").unwrap().1, cas);
}

/// A token whose budget is taken off (its rate limit stays) and put back the same day: the
/// day's spend is never flushed lower than etcd holds, and no window-0 key is written.
#[test]
fn a_budget_taken_off_and_put_back_keeps_the_days_spend_in_etcd() {
    let now = 1_790_000_000_000;
    let with_budget = json!({"id": "b", "digest": STANDARD.encode([9u8; 32]), "upstream_key": "prod",
        "budget": {"limit_usd": "1", "window": "daily"}, "rate_limit": {"requests_per_minute": 1000}});
    let without = json!({"id": "b", "digest": STANDARD.encode([9u8; 32]), "upstream_key": "prod",
        "rate_limit": {"requests_per_minute": 1000}});
    let (mut etcd, store, mut sync, key) = spent_300_today(with_budget.clone(), now);
    // The budget is taken off; a request runs (rate limit only).
    etcd.put("shieldkey/policy/tokens/b", without);
    bump_settings(&mut etcd);
    let mut t = now + 1_000;
    for _ in 0..3 {
        t += 200;
        run(&mut sync, &etcd, &store, t);
    }
    let ledger = crate::ledger::SharedDataLedger::fleet(&store);
    let off = limits_of(&store, "b");
    assert!(off.budget.is_none());
    let a = ledger.admit("b", &off, 0, t).unwrap();
    ledger.settle("b", &off, &[], &a, 7, 0, t).unwrap();
    sync.mark_dirty("b".into());
    let flush = sync.poll_flush(&store, t).unwrap();
    let (status, body) = etcd.answer_txn(&flush.body);
    assert!(sync.on_flush_reply(t, status, &body));
    let spurious = node_spent(&etcd, "shieldkey/ledger/node/e1/b/0/spent");
    // Put back the same day: one request of 10.
    etcd.put("shieldkey/policy/tokens/b", with_budget);
    bump_settings(&mut etcd);
    for _ in 0..3 {
        t += 200;
        run(&mut sync, &etcd, &store, t);
    }
    assert!(limits_of(&store, "b").budget.is_some());
    spend_and_flush(&mut sync, &mut etcd, &store, "b", 10, t);
    assert_eq!(
        spurious, None,
        "a window-0 spend key for a token without a budget"
    );
    // The day's 300, the 7 spent while the budget was off, and the 10.
    assert_eq!(node_spent(&etcd, &key), Some(317));
}
