//! Budget leases: how many Envoys share one budget without overshooting it.
//!
//! etcd holds, per token and budget window, the total every node has claimed (the pool) and what
//! each node claimed and spent. A node admits requests only within what it claimed (its local
//! allowance, in shared data), so the fleet's spend never passes the sum of the claims, and the
//! claims never pass the limit: a claim is one etcd transaction that compares the pool's and the
//! node's modification revisions before adding to both. A request that needs more than its node
//! holds waits for that claim (two calls: read, then the guarded write); every other request is
//! decided locally.
//!
//! Keys (values are JSON `{"claimed": N}` / `{"spent": N}`, nano-USD):
//! - `<prefix>ledger/pool/<token>/<window start>`
//! - `<prefix>ledger/node/<node>/<token>/<window start>/claimed`
//! - `<prefix>ledger/node/<node>/<token>/<window start>/spent` (written by the node's syncer
//!   only, as an absolute value: flushing twice counts nothing twice)
//! - `<prefix>ledger/spent/<token>/<window start>/<node>`: the same spend again, filed by token so
//!   that one range reads the fleet's (for fleet-wide budget alerts, `fleet::alerts`)
//! - `<prefix>ledger/alerts/<token>/<window start>/<threshold>`: created by the one node that
//!   sends that alert (`{"node": .., "spent": N}`)
//! - `<prefix>rate/<unix minute>/<token>/<node>`: `{"requests": N, "tokens": N}`, what this node
//!   admitted and settled in that minute, for fleet-wide rate limits; minutes older than the
//!   previous one are deleted.
//!
//! A budget window's keys are deleted once the window after it has ended too (`fleet::sweep`).

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde::Deserialize;

use crate::money::NanoUsd;

pub const TXN_PATH: &str = "/v3/kv/txn";
/// A claim asks for at least this share of the limit, so a busy token claims rarely.
pub const SLICE_PERCENT: u64 = 10;
/// Read-and-write rounds before a contended claim gives up (fail closed).
pub const CLAIM_ATTEMPTS: u32 = 10;

pub fn pool_key(prefix: &str, token: &str, window: i64) -> String {
    format!("{prefix}ledger/pool/{token}/{window}")
}

pub fn node_prefix(prefix: &str, node: &str) -> String {
    format!("{prefix}ledger/node/{node}/")
}

pub fn claimed_key(prefix: &str, node: &str, token: &str, window: i64) -> String {
    format!("{}{token}/{window}/claimed", node_prefix(prefix, node))
}

pub fn spent_key(prefix: &str, node: &str, token: &str, window: i64) -> String {
    format!("{}{token}/{window}/spent", node_prefix(prefix, node))
}

/// Every node's spend of one token's budget window: `fleet_spent_key`s share this prefix.
pub fn fleet_spent_prefix(prefix: &str, token: &str, window: i64) -> String {
    format!("{prefix}ledger/spent/{token}/{window}/")
}

pub fn fleet_spent_key(prefix: &str, node: &str, token: &str, window: i64) -> String {
    format!("{}{node}", fleet_spent_prefix(prefix, token, window))
}

pub fn alerts_prefix(prefix: &str, token: &str, window: i64) -> String {
    format!("{prefix}ledger/alerts/{token}/{window}/")
}

pub fn alert_key(prefix: &str, token: &str, window: i64, threshold: u8) -> String {
    format!("{}{threshold}", alerts_prefix(prefix, token, window))
}

/// `(subject, window start, "claimed" | "spent")` of a key under `node_prefix`. Subjects and
/// window starts have no '/'.
pub fn parse_node_key<'k>(key: &'k str, node_prefix: &str) -> Option<(&'k str, i64, &'k str)> {
    let (rest, kind) = key.strip_prefix(node_prefix)?.rsplit_once('/')?;
    let (subject, window) = rest.rsplit_once('/')?;
    if subject.is_empty() || subject.contains('/') {
        return None;
    }
    Some((subject, window.parse().ok()?, kind))
}

pub fn rate_prefix(prefix: &str, minute: i64) -> String {
    format!("{prefix}rate/{minute}/")
}

pub fn rate_key(prefix: &str, minute: i64, token: &str, node: &str) -> String {
    format!("{}{token}/{node}", rate_prefix(prefix, minute))
}

pub fn spent_value(spent: NanoUsd) -> String {
    format!("{{\"spent\":{spent}}}")
}

pub fn rate_value(requests: u64, tokens: u64) -> String {
    format!("{{\"requests\":{requests},\"tokens\":{tokens}}}")
}

/// What the other nodes counted in one minute, per token (this node's own keys left out).
pub fn parse_rates(
    kvs: &[super::etcd::Kv],
    rate_prefix: &str,
    me: &str,
) -> Vec<(String, u64, u64)> {
    #[derive(Deserialize)]
    struct Counts {
        #[serde(default)]
        requests: u64,
        #[serde(default)]
        tokens: u64,
    }
    let mut sums: std::collections::BTreeMap<String, (u64, u64)> = Default::default();
    for kv in kvs {
        let Some(rest) = std::str::from_utf8(&kv.key)
            .ok()
            .and_then(|k| k.strip_prefix(rate_prefix))
        else {
            continue;
        };
        let Some((token, node)) = rest.split_once('/') else {
            continue;
        };
        let Ok(counts) = serde_json::from_slice::<Counts>(&kv.value) else {
            continue;
        };
        let entry = sums.entry(token.to_string()).or_default();
        if node != me {
            entry.0 = entry.0.saturating_add(counts.requests);
            entry.1 = entry.1.saturating_add(counts.tokens);
        }
    }
    sums.into_iter().map(|(t, (r, k))| (t, r, k)).collect()
}

pub const DELETE_PATH: &str = "/v3/kv/deleterange";

/// Deletes every key under `prefix`.
pub fn delete_body(prefix: &str) -> Vec<u8> {
    serde_json::json!({
        "key": b64(prefix),
        "range_end": STANDARD.encode(super::etcd::prefix_end(prefix.as_bytes())),
    })
    .to_string()
    .into_bytes()
}

/// What a claim reads before it writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Claims {
    pub pool: NanoUsd,
    pub pool_mod: u64,
    pub node: NanoUsd,
    pub node_mod: u64,
    /// The marker of the claim that last wrote this node's claim (`claim_body`), if any.
    pub node_marker: Option<u64>,
}

fn b64(s: &str) -> String {
    STANDARD.encode(s)
}

/// Call 1 of a claim: read the pool and this node's claim (one txn with no compare).
pub fn read_body(pool_key: &str, claimed_key: &str) -> Vec<u8> {
    serde_json::json!({
        "success": [
            {"request_range": {"key": b64(pool_key)}},
            {"request_range": {"key": b64(claimed_key)}},
        ]
    })
    .to_string()
    .into_bytes()
}

/// How much to claim: at least what the request is short of, at least a slice of the limit,
/// at most what is left in the pool. `None` when the pool cannot cover the shortfall: the
/// fleet's budget is spent.
pub fn grant(limit: NanoUsd, pool: NanoUsd, short: NanoUsd) -> Option<NanoUsd> {
    let left = limit.saturating_sub(pool);
    if left < short {
        return None;
    }
    let slice = limit / 100 * SLICE_PERCENT;
    Some(short.max(slice).min(left))
}

/// Call 2: add `amount` to the pool and to this node's claim, if nobody changed either since
/// `seen` was read (a key that did not exist compares as revision 0).
pub fn write_body(pool_key: &str, claimed_key: &str, seen: &Claims, amount: NanoUsd) -> Vec<u8> {
    guarded_write(pool_key, claimed_key, seen, amount, None)
}

/// A marker for one write, unique with overwhelming odds, so that reading a key back tells
/// whether it holds this very write: std's `RandomState` draws its keys from the host's random
/// source (WASI `random_get` in the filter) once per VM and steps them at every call.
pub fn marker(seed: u32) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u32(seed);
    hasher.finish()
}

/// A claim's write, as `write_body`, with a marker in this node's claim: when the reply is
/// lost, reading the claim back tells whether this very write was applied (`Claims::node_marker`).
pub fn claim_body(
    pool_key: &str,
    claimed_key: &str,
    seen: &Claims,
    amount: NanoUsd,
    marker: u64,
) -> Vec<u8> {
    guarded_write(pool_key, claimed_key, seen, amount, Some(marker))
}

fn guarded_write(
    pool_key: &str,
    claimed_key: &str,
    seen: &Claims,
    amount: NanoUsd,
    marker: Option<u64>,
) -> Vec<u8> {
    let value = |n: NanoUsd| b64(&format!("{{\"claimed\":{n}}}"));
    let node_value = |n: NanoUsd| match marker {
        Some(m) => b64(&format!("{{\"claimed\":{n},\"claim\":\"{m:016x}\"}}")),
        None => value(n),
    };
    serde_json::json!({
        "compare": [
            {"key": b64(pool_key), "target": "MOD", "result": "EQUAL",
             "mod_revision": seen.pool_mod.to_string()},
            {"key": b64(claimed_key), "target": "MOD", "result": "EQUAL",
             "mod_revision": seen.node_mod.to_string()},
        ],
        "success": [
            {"request_put": {"key": b64(pool_key), "value": value(seen.pool.saturating_add(amount))}},
            {"request_put": {"key": b64(claimed_key), "value": node_value(seen.node.saturating_add(amount))}},
        ]
    })
    .to_string()
    .into_bytes()
}

/// Giving `amount` back: subtract it from the pool and from this node's claim, if nobody
/// changed either since `seen` was read.
pub fn return_body(pool_key: &str, claimed_key: &str, seen: &Claims, amount: NanoUsd) -> Vec<u8> {
    let back = Claims {
        pool: seen.pool.saturating_sub(amount),
        node: seen.node.saturating_sub(amount),
        ..*seen
    };
    write_body(pool_key, claimed_key, &back, 0)
}

/// A flush: this node's spend per (token, window) and counts per (minute, token), absolute
/// values (`(key, JSON value)`).
pub fn flush_body(entries: &[(String, String)]) -> Vec<u8> {
    let puts: Vec<serde_json::Value> = entries
        .iter()
        .map(|(key, value)| {
            serde_json::json!({"request_put": {
                "key": b64(key),
                "value": b64(value),
            }})
        })
        .collect();
    serde_json::json!({ "success": puts })
        .to_string()
        .into_bytes()
}

/// Reads every key under each prefix, in one txn with no compare (one `response_range` each, in
/// order).
pub fn ranges_body(prefixes: &[String]) -> Vec<u8> {
    let ranges: Vec<serde_json::Value> = prefixes
        .iter()
        .map(|p| {
            serde_json::json!({"request_range": {
                "key": b64(p),
                "range_end": STANDARD.encode(super::etcd::prefix_end(p.as_bytes())),
            }})
        })
        .collect();
    serde_json::json!({ "success": ranges })
        .to_string()
        .into_bytes()
}

/// The reply to `ranges_body` over `fleet_spent_prefix`es: the sum of the `spent` values under
/// each prefix, in order. `None` unless it is a txn reply with one range per prefix; a value that
/// does not parse counts 0.
pub fn parse_spent_sums(body: &[u8], prefixes: usize) -> Option<Vec<NanoUsd>> {
    let txn: Txn = serde_json::from_slice(body).ok()?;
    txn.header?;
    if txn.responses.len() != prefixes {
        return None;
    }
    txn.responses
        .iter()
        .map(|response| {
            let range = response.get("response_range")?;
            let mut sum: NanoUsd = 0;
            for kv in range
                .get("kvs")
                .and_then(|k| k.as_array())
                .into_iter()
                .flatten()
            {
                let value = STANDARD.decode(kv.get("value")?.as_str()?).ok()?;
                let amount: Amount = serde_json::from_slice(&value).unwrap_or_default();
                sum = sum.saturating_add(amount.spent);
            }
            Some(sum)
        })
        .collect()
}

/// Deletes, in one txn, each of `targets`: every key under it when it ends in '/', else that key.
pub fn delete_ranges_body(targets: &[String]) -> Vec<u8> {
    let ops: Vec<serde_json::Value> = targets
        .iter()
        .map(|t| {
            let mut op = serde_json::json!({"key": b64(t)});
            if t.ends_with('/') {
                op["range_end"] = STANDARD
                    .encode(super::etcd::prefix_end(t.as_bytes()))
                    .into();
            }
            serde_json::json!({ "request_delete_range": op })
        })
        .collect();
    serde_json::json!({ "success": ops })
        .to_string()
        .into_bytes()
}

/// Creates `key` only if it does not exist: the node whose txn succeeds sends the alert.
pub fn create_body(key: &str, value: &str) -> Vec<u8> {
    serde_json::json!({
        "compare": [
            {"key": b64(key), "target": "CREATE", "result": "EQUAL", "create_revision": "0"},
        ],
        "success": [
            {"request_put": {"key": b64(key), "value": b64(value)}},
        ],
        // When the key exists, its value comes back: if this node created it (a retry after a
        // reply that was lost), the caller knows it won.
        "failure": [
            {"request_range": {"key": b64(key)}},
        ]
    })
    .to_string()
    .into_bytes()
}

/// The reply to `create_body`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Created {
    /// This call created the key.
    Now,
    /// The key existed; its value (empty if the reply did not carry it).
    Already(Vec<u8>),
}

pub fn parse_create(body: &[u8]) -> Option<Created> {
    let txn: Txn = serde_json::from_slice(body).ok()?;
    txn.header?;
    if txn.succeeded {
        return Some(Created::Now);
    }
    let value = txn
        .responses
        .first()
        .and_then(|r| r.get("response_range"))
        .and_then(|r| r.get("kvs"))
        .and_then(|kvs| kvs.get(0))
        .and_then(|kv| kv.get("value"))
        .and_then(|v| v.as_str())
        .and_then(|v| STANDARD.decode(v).ok())
        .unwrap_or_default();
    Some(Created::Already(value))
}

#[derive(Deserialize)]
struct Txn {
    #[serde(default)]
    succeeded: bool,
    #[serde(default)]
    responses: Vec<serde_json::Value>,
    header: Option<serde_json::Value>,
}

#[derive(Deserialize, Default)]
struct Amount {
    #[serde(default)]
    claimed: NanoUsd,
    #[serde(default)]
    spent: NanoUsd,
    #[serde(default)]
    claim: Option<String>,
}

fn num(v: &serde_json::Value) -> u64 {
    match v {
        serde_json::Value::String(s) => s.parse().unwrap_or(0),
        other => other.as_u64().unwrap_or(0),
    }
}

/// The (value, mod revision) of a `response_range` of one key: (default, 0) when absent.
fn ranged(response: &serde_json::Value) -> Option<(Amount, u64)> {
    let range = response.get("response_range")?;
    let Some(kv) = range.get("kvs").and_then(|k| k.get(0)) else {
        return Some((Amount::default(), 0));
    };
    let value = STANDARD
        .decode(kv.get("value")?.as_str().unwrap_or(""))
        .ok()?;
    let amount = serde_json::from_slice(&value).ok()?;
    Some((amount, num(kv.get("mod_revision")?)))
}

/// The reply to `read_body`.
pub fn parse_read(body: &[u8]) -> Option<Claims> {
    let txn: Txn = serde_json::from_slice(body).ok()?;
    txn.header?;
    let (pool, pool_mod) = ranged(txn.responses.first()?)?;
    let (node, node_mod) = ranged(txn.responses.get(1)?)?;
    Some(Claims {
        pool: pool.claimed,
        pool_mod,
        node: node.claimed,
        node_mod,
        node_marker: node
            .claim
            .as_deref()
            .and_then(|m| u64::from_str_radix(m, 16).ok()),
    })
}

/// The reply to a guarded write or a flush: `Some(true)` when it was applied, `Some(false)` when
/// a compare failed, `None` when it is not a txn reply at all.
pub fn parse_write(body: &[u8]) -> Option<bool> {
    let txn: Txn = serde_json::from_slice(body).ok()?;
    txn.header?;
    Some(txn.succeeded)
}

/// This node's spend per `(token, window)` from a range of its node prefix.
pub fn parse_spent(kvs: &[super::etcd::Kv], node_prefix: &str) -> Vec<(String, i64, NanoUsd)> {
    kvs.iter()
        .filter_map(|kv| {
            let key = std::str::from_utf8(&kv.key).ok()?;
            let (token, window, kind) = parse_node_key(key, node_prefix)?;
            if kind != "spent" {
                return None;
            }
            let amount: Amount = serde_json::from_slice(&kv.value).ok()?;
            Some((token.to_string(), window, amount.spent))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claim_takes_a_slice_and_never_more_than_is_left() {
        // $1 limit: slices of 10 cents.
        let limit = 1_000_000_000;
        assert_eq!(grant(limit, 0, 5), Some(100_000_000));
        assert_eq!(grant(limit, 0, 300_000_000), Some(300_000_000));
        assert_eq!(grant(limit, 950_000_000, 10), Some(50_000_000));
        assert_eq!(grant(limit, 950_000_000, 60_000_000), None);
        assert_eq!(grant(limit, limit, 1), None);
    }

    #[test]
    fn replies_as_etcd_writes_them() {
        let value = STANDARD.encode(r#"{"claimed":700}"#);
        let read = format!(
            r#"{{"header":{{"revision":"9"}},"succeeded":true,"responses":[{{"response_range":{{"header":{{}},"kvs":[{{"key":"a","mod_revision":"7","value":"{value}"}}],"count":"1"}}}},{{"response_range":{{"header":{{}}}}}}]}}"#
        );
        assert_eq!(
            parse_read(read.as_bytes()),
            Some(Claims {
                pool: 700,
                pool_mod: 7,
                node: 0,
                node_mod: 0,
                node_marker: None,
            })
        );
        assert_eq!(
            parse_write(br#"{"header":{"revision":"10"},"succeeded":true}"#),
            Some(true)
        );
        assert_eq!(parse_write(br#"{"header":{"revision":"10"}}"#), Some(false));
        assert_eq!(parse_write(b"upstream connect error"), None);
    }

    #[test]
    fn writes_are_guarded_by_both_revisions() {
        let seen = Claims {
            pool: 100,
            pool_mod: 4,
            node: 30,
            node_mod: 0,
            node_marker: None,
        };
        let body: serde_json::Value =
            serde_json::from_slice(&write_body("p", "c", &seen, 50)).unwrap();
        assert_eq!(body["compare"][0]["mod_revision"], "4");
        assert_eq!(body["compare"][1]["mod_revision"], "0");
        let put = |i: usize| {
            String::from_utf8(
                STANDARD
                    .decode(body["success"][i]["request_put"]["value"].as_str().unwrap())
                    .unwrap(),
            )
            .unwrap()
        };
        assert_eq!(put(0), r#"{"claimed":150}"#);
        assert_eq!(put(1), r#"{"claimed":80}"#);
    }

    #[test]
    fn other_nodes_counts_are_summed_per_token() {
        let kv = |key: &str, value: &str| super::super::etcd::Kv {
            key: key.as_bytes().to_vec(),
            value: value.as_bytes().to_vec(),
            mod_revision: 1,
        };
        let kvs = vec![
            kv("p/rate/7/alice/e1", r#"{"requests":5,"tokens":50}"#),
            kv("p/rate/7/alice/e2", r#"{"requests":3,"tokens":30}"#),
            kv("p/rate/7/alice/e3", r#"{"requests":1}"#),
            kv("p/rate/7/bob/e1", r#"{"requests":9,"tokens":9}"#),
        ];
        assert_eq!(
            parse_rates(&kvs, "p/rate/7/", "e1"),
            vec![("alice".to_string(), 4, 30), ("bob".to_string(), 0, 0)]
        );
    }

    #[test]
    fn spend_is_read_back_per_token_and_window() {
        let kvs = vec![
            super::super::etcd::Kv {
                key: b"sk/ledger/node/e1/alice/0/spent".to_vec(),
                value: br#"{"spent":42}"#.to_vec(),
                mod_revision: 3,
            },
            super::super::etcd::Kv {
                key: b"sk/ledger/node/e1/alice/0/claimed".to_vec(),
                value: br#"{"claimed":100}"#.to_vec(),
                mod_revision: 3,
            },
        ];
        assert_eq!(
            parse_spent(&kvs, "sk/ledger/node/e1/"),
            vec![("alice".to_string(), 0, 42)]
        );
    }
}
