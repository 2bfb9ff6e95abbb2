//! `shieldkey --etcd URLS release-node NODE --stopped`: gives back to the fleet's pools what a
//! stopped Envoy claimed and did not spend.
//!
//! An Envoy restarting reads back only what it had spent (what it claimed but had not flushed
//! may have been spent), so the unused part of the leases it held stays claimed in etcd: until
//! its window ends, or for good for a lifetime budget. The same holds for an Envoy gone for good
//! (a pod whose name was its node id). Only an operator knows the Envoy is stopped: a running one
//! holds that allowance in memory and may spend it, so the command refuses without `--stopped`.
//!
//! For each budget window the node has keys in: the pool gives back `claimed - spent` (never
//! more than the pool holds) and the node's claim becomes its spend, in one transaction guarded on
//! both keys (re-read on contention). A window whose pool is gone (ended and swept by another
//! Envoy) has nothing to give back: the node's own keys of it are deleted, which no other Envoy
//! does for it.

use std::collections::BTreeMap;

use serde_json::Value;

use super::args::Args;
use super::error::{failed, usage, CliError};
use super::etcd::{Change, Etcd, Snapshot};
use super::policy_store::etcd_client;
use super::Target;
use crate::fleet::lease;
use crate::money::NanoUsd;

/// Re-reads after a transaction lost to another writer (a claim of another Envoy).
const ATTEMPTS: usize = 10;

pub fn release_node(target: Target, mut args: Args) -> Result<(), CliError> {
    let Target::Etcd { urls, prefix, user } = target else {
        return Err(usage(
            "release-node works on the ledger of a fleet: give --etcd URLS (or SHIELDKEY_ETCD)",
        ));
    };
    let stopped = args.flag("stopped");
    let node = args.positional("node id")?;
    args.finish()?;
    if node.is_empty() || node.contains('/') {
        return Err(usage(format!("'{node}' is not a node id")));
    }
    if !stopped {
        return Err(usage(format!(
            "release-node gives back what Envoy '{node}' claimed and did not spend; a running \
             Envoy holds that in memory and may still spend it. Stop it first (or make sure it is \
             gone), then run this again with --stopped"
        )));
    }
    let mut etcd = etcd_client(&urls, user)?;
    let released = release(&mut etcd, &prefix, &node)?;
    for line in released.lines() {
        println!("{line}");
    }
    eprintln!("{}", released.summary(&node));
    Ok(())
}

/// What one node held in one budget window.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Held {
    claimed: NanoUsd,
    claimed_seen: i64,
    spent: NanoUsd,
    spent_seen: i64,
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Released {
    /// (token or team subject, window start, amount given back).
    pub returned: Vec<(String, i64, NanoUsd)>,
    /// (subject, window start) whose keys were deleted: their pool was gone.
    pub cleared: Vec<(String, i64)>,
}

impl Released {
    fn lines(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .returned
            .iter()
            .map(|(subject, window, amount)| {
                format!(
                    "{subject}\twindow {window}\treleased {}",
                    crate::money::format_usd(*amount)
                )
            })
            .collect();
        out.extend(
            self.cleared
                .iter()
                .map(|(subject, window)| format!("{subject}\twindow {window}\tkeys deleted")),
        );
        out
    }

    fn summary(&self, node: &str) -> String {
        let total: NanoUsd = self.returned.iter().map(|(_, _, a)| *a).sum();
        format!(
            "released {} in {} budget windows from Envoy '{node}'; deleted its keys of {} ended \
             windows",
            crate::money::format_usd(total),
            self.returned.len(),
            self.cleared.len()
        )
    }
}

fn amount(value: &[u8], field: &str) -> Option<NanoUsd> {
    serde_json::from_slice::<Value>(value)
        .ok()?
        .get(field)?
        .as_u64()
}

/// The node's claims and spend per (subject, window), from its keys.
fn held_by_window(
    snapshot: &Snapshot,
    node_prefix: &str,
) -> Result<BTreeMap<(String, i64), Held>, CliError> {
    let mut out: BTreeMap<(String, i64), Held> = BTreeMap::new();
    for kv in &snapshot.kvs {
        let key = String::from_utf8_lossy(&kv.key);
        let Some((subject, window, kind)) = lease::parse_node_key(&key, node_prefix) else {
            continue;
        };
        let entry = out.entry((subject.to_string(), window)).or_default();
        let unreadable = || failed(format!("{key}: not a ledger amount; nothing was changed"));
        match kind {
            "claimed" => {
                entry.claimed = amount(&kv.value, "claimed").ok_or_else(unreadable)?;
                entry.claimed_seen = kv.mod_revision;
            }
            "spent" => {
                entry.spent = amount(&kv.value, "spent").ok_or_else(unreadable)?;
                entry.spent_seen = kv.mod_revision;
            }
            _ => {}
        }
    }
    Ok(out)
}

pub fn release(etcd: &mut Etcd, prefix: &str, node: &str) -> Result<Released, CliError> {
    let node_prefix = lease::node_prefix(prefix, node);
    let snapshot = read(etcd, &node_prefix)?;
    if snapshot.kvs.is_empty() {
        return Err(failed(format!(
            "no ledger keys under {node_prefix}: no Envoy '{node}' has claimed or spent in this fleet"
        )));
    }
    let mut released = Released::default();
    for ((subject, window), mut held) in held_by_window(&snapshot, &node_prefix)? {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match release_window(etcd, prefix, node, &subject, window, held)? {
                Step::Nothing => break,
                Step::Returned(amount) => {
                    released.returned.push((subject.clone(), window, amount));
                    break;
                }
                Step::Cleared => {
                    released.cleared.push((subject.clone(), window));
                    break;
                }
                Step::Lost if attempt < ATTEMPTS => {
                    // Another Envoy claimed from the pool meanwhile: read again.
                    held = held_by_window(&read(etcd, &node_prefix)?, &node_prefix)?
                        .remove(&(subject.clone(), window))
                        .unwrap_or_default();
                }
                Step::Lost => {
                    return Err(failed(format!(
                        "the ledger of '{subject}' (window {window}) kept changing while it was \
                         released ({ATTEMPTS} tries): is Envoy '{node}' still running? Nothing of \
                         this window was changed; the windows before it are released"
                    )))
                }
            }
        }
    }
    Ok(released)
}

fn read(etcd: &mut Etcd, prefix: &str) -> Result<Snapshot, CliError> {
    etcd.range_prefix(prefix.as_bytes())
        .map_err(|e| failed(format!("cannot read {prefix}: {e}")))
}

enum Step {
    Nothing,
    Returned(NanoUsd),
    Cleared,
    /// A key changed since it was read: nothing was written.
    Lost,
}

/// One window of one subject, in one transaction guarded on every key it read.
fn release_window(
    etcd: &mut Etcd,
    prefix: &str,
    node: &str,
    subject: &str,
    window: i64,
    held: Held,
) -> Result<Step, CliError> {
    let pool_key = lease::pool_key(prefix, subject, window);
    let claimed_key = lease::claimed_key(prefix, node, subject, window);
    let spent_key = lease::spent_key(prefix, node, subject, window);
    let pool = read(etcd, &pool_key)?;
    let pool = pool.kvs.iter().find(|kv| kv.key == pool_key.as_bytes());
    let key = |k: &str| k.as_bytes().to_vec();
    let (changes, step) = match pool {
        // A claim was made, so the pool existed: gone, the window ended and was swept. The
        // node's own keys of it are left to delete (without a claim, the keys may be of a
        // window no one has claimed in yet: left alone).
        None if held.claimed > 0 => (
            vec![
                Change {
                    key: key(&claimed_key),
                    seen: held.claimed_seen,
                    value: None,
                },
                Change {
                    key: key(&spent_key),
                    seen: held.spent_seen,
                    value: None,
                },
            ],
            Step::Cleared,
        ),
        None => return Ok(Step::Nothing),
        Some(kv) => {
            let in_pool = amount(&kv.value, "claimed").ok_or_else(|| {
                failed(format!(
                    "{pool_key}: not a ledger amount; nothing was changed"
                ))
            })?;
            let unspent = held.claimed.saturating_sub(held.spent).min(in_pool);
            if unspent == 0 {
                return Ok(Step::Nothing);
            }
            (
                vec![
                    Change {
                        key: key(&pool_key),
                        seen: kv.mod_revision,
                        value: Some(claimed_value(in_pool - unspent)),
                    },
                    Change {
                        key: key(&claimed_key),
                        seen: held.claimed_seen,
                        value: Some(claimed_value(held.claimed - unspent)),
                    },
                ],
                Step::Returned(unspent),
            )
        }
    };
    let mut guards: Vec<(&[u8], i64)> =
        changes.iter().map(|c| (c.key.as_slice(), c.seen)).collect();
    guards.push((spent_key.as_bytes(), held.spent_seen));
    guards.dedup_by(|a, b| a.0 == b.0);
    let refs: Vec<&Change> = changes.iter().collect();
    let applied = etcd
        .txn(&guards, &refs)
        .map_err(|e| failed(format!("cannot write the ledger of '{subject}': {e}")))?;
    Ok(if applied { step } else { Step::Lost })
}

/// A ledger claim amount, as the filter writes it.
fn claimed_value(claimed: NanoUsd) -> Vec<u8> {
    format!("{{\"claimed\":{claimed}}}").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::etcd::fake::{etcd, Fake};

    fn put(fake: &Fake, key: &str, value: &str) {
        fake.0.borrow_mut().put(key.as_bytes(), value.as_bytes());
    }

    fn amount_at(fake: &Fake, key: &str, field: &str) -> Option<u64> {
        let state = fake.0.borrow();
        state
            .kvs
            .get(key.as_bytes())
            .and_then(|(v, _)| amount(v, field))
    }

    #[test]
    fn a_stopped_envoys_unspent_claims_go_back_to_the_pools() {
        let fake = Fake::default();
        // A lifetime budget: the pool holds 700, e1 claimed 500 and spent 200, e2 claimed 200.
        put(&fake, "p/ledger/pool/a/0", r#"{"claimed":700}"#);
        put(&fake, "p/ledger/node/e1/a/0/claimed", r#"{"claimed":500}"#);
        put(&fake, "p/ledger/node/e1/a/0/spent", r#"{"spent":200}"#);
        put(&fake, "p/ledger/node/e2/a/0/claimed", r#"{"claimed":200}"#);
        // A window swept since (its pool is gone): e1's own keys of it are deleted.
        put(
            &fake,
            "p/ledger/node/e1/b/1000/claimed",
            r#"{"claimed":50}"#,
        );
        put(&fake, "p/ledger/node/e1/b/1000/spent", r#"{"spent":10}"#);
        // Spend restored without a claim, in a window with no pool yet: left alone.
        put(&fake, "p/ledger/node/e1/c/2000/spent", r#"{"spent":5}"#);
        // All spent: nothing to give back.
        put(&fake, "p/ledger/pool/d/0", r#"{"claimed":100}"#);
        put(&fake, "p/ledger/node/e1/d/0/claimed", r#"{"claimed":100}"#);
        put(&fake, "p/ledger/node/e1/d/0/spent", r#"{"spent":100}"#);

        let released = release(&mut etcd(&fake, 100), "p/", "e1").unwrap();
        assert_eq!(
            released,
            Released {
                returned: vec![("a".into(), 0, 300)],
                cleared: vec![("b".into(), 1000)],
            }
        );
        assert_eq!(amount_at(&fake, "p/ledger/pool/a/0", "claimed"), Some(400));
        assert_eq!(
            amount_at(&fake, "p/ledger/node/e1/a/0/claimed", "claimed"),
            Some(200)
        );
        assert_eq!(
            amount_at(&fake, "p/ledger/node/e1/a/0/spent", "spent"),
            Some(200)
        );
        assert_eq!(
            amount_at(&fake, "p/ledger/node/e2/a/0/claimed", "claimed"),
            Some(200)
        );
        assert!(!fake
            .0
            .borrow()
            .kvs
            .keys()
            .any(|k| k.starts_with(b"p/ledger/node/e1/b/")));
        assert_eq!(
            amount_at(&fake, "p/ledger/node/e1/c/2000/spent", "spent"),
            Some(5)
        );
        assert_eq!(amount_at(&fake, "p/ledger/pool/d/0", "claimed"), Some(100));
        // Run again: nothing left to give back.
        assert_eq!(
            release(&mut etcd(&fake, 100), "p/", "e1").unwrap(),
            Released::default()
        );
    }

    #[test]
    fn a_claim_made_meanwhile_is_read_again_never_overwritten() {
        let fake = Fake::default();
        put(&fake, "p/ledger/pool/a/0", r#"{"claimed":500}"#);
        put(&fake, "p/ledger/node/e1/a/0/claimed", r#"{"claimed":500}"#);
        put(&fake, "p/ledger/node/e1/a/0/spent", r#"{"spent":100}"#);
        // Another Envoy claims 100 just before the first write.
        fake.0.borrow_mut().before_txn = Some(Box::new(|n, state| {
            if n == 0 {
                state.put(b"p/ledger/pool/a/0", br#"{"claimed":600}"#);
            }
        }));
        let released = release(&mut etcd(&fake, 100), "p/", "e1").unwrap();
        assert_eq!(released.returned, vec![("a".to_string(), 0, 400)]);
        assert_eq!(amount_at(&fake, "p/ledger/pool/a/0", "claimed"), Some(200));
    }

    #[test]
    fn an_unknown_node_or_unreadable_amount_changes_nothing() {
        let fake = Fake::default();
        put(&fake, "p/ledger/pool/a/0", r#"{"claimed":500}"#);
        put(
            &fake,
            "p/ledger/node/e1/a/0/claimed",
            r#"{"claimed":"lots"}"#,
        );
        let unknown = release(&mut etcd(&fake, 100), "p/", "e9").unwrap_err();
        assert!(unknown.to_string().contains("no Envoy 'e9'"), "{unknown}");
        let bad = release(&mut etcd(&fake, 100), "p/", "e1").unwrap_err();
        assert!(bad.to_string().contains("not a ledger amount"), "{bad}");
        assert_eq!(amount_at(&fake, "p/ledger/pool/a/0", "claimed"), Some(500));
    }
}
