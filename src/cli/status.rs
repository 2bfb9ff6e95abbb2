//! `shieldkey status`: fleet-wide spend per token, read from the ledger in etcd.
//!
//! Fleet mode only. For every token with a budget it reads the current window of the fleet ledger
//! (`src/fleet/lease.rs`): the pool (`<prefix>ledger/pool/<token>/<window start>`, what all
//! Envoys claimed) and each Envoy's `…/<node>/<token>/<window start>/claimed` and `…/spent`. The
//! window start is the token's budget window at the current time; keys of other windows are not
//! counted. Spend is what each Envoy last flushed (every `sync_interval_ms`), so it may trail the
//! Envoys' own counters by that much.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::{json, Value};

use super::args::Args;
use super::commands::now;
use super::error::{failed, usage, CliError};
use super::etcd::Kv;
use super::policy_store::{etcd_client, PolicyStore};
use super::Target;
use crate::budget_window::BudgetWindow;
use crate::config::raw::{RawPolicy, RawToken};
use crate::money::{format_usd, parse_usd, NanoUsd};
use crate::time::format_rfc3339;

const FILE_MODE: &str = "status shows the spend of a fleet, read from etcd: it needs fleet mode \
(--etcd URLS or SHIELDKEY_ETCD). Without etcd every Envoy keeps its own spend: see its admin \
/stats, e.g. `curl -s 'http://127.0.0.1:9901/stats?filter=shieldkey.token_id'` \
(wasmcustom.shieldkey.token_id.<id>.spend_nano_usd, nano-USD charged since that Envoy started; \
.budget_remaining_nano_usd, the budget left in the current window)";

/// Which tokens to show.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Select {
    /// Tokens with a budget.
    Budgeted,
    /// Every token.
    All,
    /// One token, with the per-Envoy breakdown.
    One(String),
}

/// A token's budget as the policy states it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Budget {
    /// The policy's spelling (`monthly`, `hourly`, `300s`, …).
    window: String,
    lifetime: bool,
    limit: NanoUsd,
}

/// One Envoy's share of a token's current window.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct NodeShare {
    claimed: NanoUsd,
    /// `None`: this Envoy has not flushed spend for the window.
    spent: Option<NanoUsd>,
}

/// One token's current window across the fleet.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Row {
    id: String,
    owner: Option<String>,
    budget: Option<Budget>,
    /// Unix seconds; 0 for lifetime budgets and tokens without one (as the ledger keys them).
    window_start: i64,
    /// The pool: what all Envoys claimed.
    claimed: NanoUsd,
    nodes: BTreeMap<String, NodeShare>,
}

impl Row {
    fn spent(&self) -> NanoUsd {
        self.nodes
            .values()
            .filter_map(|n| n.spent)
            .fold(0, NanoUsd::saturating_add)
    }

    /// Envoys that reported spend for the window.
    fn envoys(&self) -> usize {
        self.nodes.values().filter(|n| n.spent.is_some()).count()
    }

    /// `limit − spent`, negative when the fleet spent more than the (perhaps lowered) limit.
    fn remaining(&self) -> Option<i64> {
        self.budget
            .as_ref()
            .map(|b| signed_difference(b.limit, self.spent()))
    }

    fn window_text(&self) -> String {
        match &self.budget {
            None => "no budget".to_string(),
            Some(b) if b.lifetime => b.window.clone(),
            Some(b) => format!("{} from {}", b.window, format_rfc3339(self.window_start)),
        }
    }

    fn json(&self) -> Value {
        let nodes: Vec<Value> = self
            .nodes
            .iter()
            .map(|(node, share)| {
                json!({
                    "node": node,
                    "claimed_nano_usd": share.claimed,
                    "spent_nano_usd": share.spent.unwrap_or(0),
                    "reported_spend": share.spent.is_some(),
                })
            })
            .collect();
        json!({
            "id": self.id,
            "owner": self.owner,
            "window": self.budget.as_ref().map(|b| b.window.as_str()),
            "window_start": self.window_start,
            "limit_nano_usd": self.budget.as_ref().map(|b| b.limit),
            "spent_nano_usd": self.spent(),
            "claimed_nano_usd": self.claimed,
            "remaining_nano_usd": self.remaining(),
            "envoys": self.envoys(),
            "nodes": nodes,
        })
    }
}

fn signed_difference(a: NanoUsd, b: NanoUsd) -> i64 {
    if a >= b {
        i64::try_from(a - b).unwrap_or(i64::MAX)
    } else {
        i64::try_from(b - a).map_or(i64::MIN, |d| -d)
    }
}

fn usd(value: NanoUsd) -> String {
    format!("${}", format_usd(value))
}

fn signed_usd(value: i64) -> String {
    if value < 0 {
        format!("-{}", usd(value.unsigned_abs()))
    } else {
        usd(value.unsigned_abs())
    }
}

/// The token's budget and the start of its window at `now`.
fn current_window(token: &RawToken, now: i64) -> Result<(Option<Budget>, i64), CliError> {
    let Some(budget) = &token.budget else {
        return Ok((None, 0));
    };
    let bad = |what: &str, m: String| {
        failed(format!(
            "token '{}': budget {what}: {m} (`shieldkey check` validates the whole policy)",
            token.id
        ))
    };
    let window = BudgetWindow::parse(&budget.window).map_err(|m| bad("window", m))?;
    let limit = parse_usd(&budget.limit_usd).map_err(|m| bad("limit_usd", m))?;
    Ok((
        Some(Budget {
            window: budget.window.clone(),
            lifetime: window == BudgetWindow::Lifetime,
            limit,
        }),
        window.start(now),
    ))
}

/// The rows to show, before the ledger is read.
fn plan(policy: &RawPolicy, select: &Select, now: i64) -> Result<Vec<Row>, CliError> {
    let mut rows = Vec::new();
    for token in &policy.tokens {
        let wanted = match select {
            Select::Budgeted => token.budget.is_some(),
            Select::All => true,
            Select::One(id) => token.id == *id,
        };
        if !wanted {
            continue;
        }
        let (budget, window_start) = current_window(token, now)?;
        rows.push(Row {
            id: token.id.clone(),
            owner: token.owner.clone(),
            budget,
            window_start,
            claimed: 0,
            nodes: BTreeMap::new(),
        });
    }
    if let (Select::One(id), true) = (select, rows.is_empty()) {
        return Err(failed(format!("no token with id '{id}'")));
    }
    Ok(rows)
}

/// A ledger key, without `<prefix>ledger/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LedgerKey<'k> {
    Pool {
        token: &'k str,
        window_start: i64,
    },
    Claimed {
        node: &'k str,
        token: &'k str,
        window_start: i64,
    },
    Spent {
        node: &'k str,
        token: &'k str,
        window_start: i64,
    },
}

/// Reads a key from the right: token ids and window starts have no '/', a node id may.
fn parse_key(rest: &str) -> Option<LedgerKey<'_>> {
    if let Some(pool) = rest.strip_prefix("pool/") {
        let (token, start) = pool.rsplit_once('/')?;
        if token.is_empty() || token.contains('/') {
            return None;
        }
        return Some(LedgerKey::Pool {
            token,
            window_start: start.parse().ok()?,
        });
    }
    let node_key = rest.strip_prefix("node/")?;
    let (rest, kind) = node_key.rsplit_once('/')?;
    let (rest, start) = rest.rsplit_once('/')?;
    let (node, token) = rest.rsplit_once('/')?;
    if node.is_empty() || token.is_empty() {
        return None;
    }
    let window_start = start.parse().ok()?;
    match kind {
        "claimed" => Some(LedgerKey::Claimed {
            node,
            token,
            window_start,
        }),
        "spent" => Some(LedgerKey::Spent {
            node,
            token,
            window_start,
        }),
        _ => None,
    }
}

#[derive(Deserialize)]
struct Amount {
    claimed: Option<NanoUsd>,
    spent: Option<NanoUsd>,
}

fn amount(value: &[u8], field: &str) -> Option<NanoUsd> {
    let amount: Amount = serde_json::from_slice(value).ok()?;
    if field == "spent" {
        amount.spent
    } else {
        amount.claimed
    }
}

/// Adds the ledger keys of each row's current window; returns warnings about keys that count but
/// cannot be read (they are left out of the sums).
fn tally(rows: &mut [Row], ledger_prefix: &str, kvs: &[Kv]) -> Vec<String> {
    let index: BTreeMap<String, usize> = rows
        .iter()
        .enumerate()
        .map(|(i, r)| (r.id.clone(), i))
        .collect();
    let mut warnings = Vec::new();
    for kv in kvs {
        let Some(rest) = std::str::from_utf8(&kv.key)
            .ok()
            .and_then(|k| k.strip_prefix(ledger_prefix))
        else {
            continue;
        };
        let Some(key) = parse_key(rest) else {
            continue;
        };
        let (token, window_start, field) = match key {
            LedgerKey::Pool {
                token,
                window_start,
            }
            | LedgerKey::Claimed {
                token,
                window_start,
                ..
            } => (token, window_start, "claimed"),
            LedgerKey::Spent {
                token,
                window_start,
                ..
            } => (token, window_start, "spent"),
        };
        let Some(row) = index.get(token).and_then(|i| rows.get_mut(*i)) else {
            continue;
        };
        if row.window_start != window_start {
            continue; // another window: not counted
        }
        let Some(value) = amount(&kv.value, field) else {
            warnings.push(format!(
                "etcd key {ledger_prefix}{rest}: not {{\"{field}\":N}} (nano-USD); left out"
            ));
            continue;
        };
        match key {
            LedgerKey::Pool { .. } => row.claimed = value,
            LedgerKey::Claimed { node, .. } => {
                row.nodes.entry(node.to_string()).or_default().claimed = value;
            }
            LedgerKey::Spent { node, .. } => {
                row.nodes.entry(node.to_string()).or_default().spent = Some(value);
            }
        }
    }
    warnings
}

/// Columns padded to their widest cell; `right` aligns numbers.
fn table(headers: &[&str], right: &[bool], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| -> String {
        let last = cells.len().saturating_sub(1);
        let mut out = String::new();
        for (i, cell) in cells.into_iter().enumerate() {
            let width = widths.get(i).copied().unwrap_or(0);
            let pad = " ".repeat(width.saturating_sub(cell.chars().count()));
            if i > 0 {
                out.push_str("  ");
            }
            if right.get(i).copied().unwrap_or(false) {
                out.push_str(&pad);
                out.push_str(cell);
            } else {
                out.push_str(cell);
                if i < last {
                    out.push_str(&pad);
                }
            }
        }
        out.push('\n');
        out
    };
    let mut out = line(headers.to_vec());
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

fn tokens_table(rows: &[Row]) -> String {
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let dash = || "-".to_string();
            vec![
                r.id.clone(),
                r.owner.clone().unwrap_or_else(dash),
                r.window_text(),
                r.budget.as_ref().map_or_else(dash, |b| usd(b.limit)),
                usd(r.spent()),
                usd(r.claimed),
                r.remaining().map_or_else(dash, signed_usd),
                r.envoys().to_string(),
            ]
        })
        .collect();
    table(
        &[
            "TOKEN",
            "OWNER",
            "WINDOW",
            "LIMIT",
            "SPENT",
            "CLAIMED",
            "REMAINING",
            "ENVOYS",
        ],
        &[false, false, false, true, true, true, true, true],
        &cells,
    )
}

fn nodes_table(row: &Row) -> String {
    let cells: Vec<Vec<String>> = row
        .nodes
        .iter()
        .map(|(node, share)| {
            vec![
                node.clone(),
                usd(share.claimed),
                share.spent.map_or_else(|| "-".to_string(), usd),
            ]
        })
        .collect();
    table(&["ENVOY", "CLAIMED", "SPENT"], &[false, true, true], &cells)
}

/// `status [--token ID] [--all] [--json]`.
pub fn status(target: Target, mut args: Args) -> Result<(), CliError> {
    let Target::Etcd { urls, prefix, user } = target else {
        return Err(usage(FILE_MODE));
    };
    let one = args.option("token")?;
    let all = args.flag("all");
    let as_json = args.flag("json");
    args.finish()?;
    let select = match one {
        Some(id) => Select::One(id),
        None if all => Select::All,
        None => Select::Budgeted,
    };

    let mut store = PolicyStore::etcd(&urls, &prefix, user.clone())?;
    let policy = store.load()?.policy;
    let now = now();
    let mut rows = plan(&policy, &select, now)?;
    let ledger_prefix = format!("{prefix}ledger/");
    let snapshot = etcd_client(&urls, user)?
        .range_prefix(ledger_prefix.as_bytes())
        .map_err(|e| {
            failed(format!(
                "cannot read the ledger under {ledger_prefix}: {e} (status needs read access to \
                 [{ledger_prefix}, {prefix}ledger0))"
            ))
        })?;
    for warning in tally(&mut rows, &ledger_prefix, &snapshot.kvs) {
        eprintln!("warning: {warning}");
    }

    if as_json {
        let doc = Value::Array(rows.iter().map(Row::json).collect());
        println!("{doc:#}");
        return Ok(());
    }
    print!("{}", tokens_table(&rows));
    if let (Select::One(_), Some(row)) = (&select, rows.first()) {
        println!();
        if row.nodes.is_empty() {
            println!("no Envoy has claimed or reported spend in this window");
        } else {
            print!("{}", nodes_table(row));
        }
    }
    let without = policy.tokens.iter().filter(|t| t.budget.is_none()).count();
    let hidden = if select == Select::Budgeted && without > 0 {
        format!(" ({without} without a budget: --all lists them)")
    } else {
        String::new()
    };
    eprintln!(
        "{} token(s){hidden}; spend as last flushed by each Envoy, current windows at {}; \
         policy revision {}, ledger at etcd revision {}, {}",
        rows.len(),
        format_rfc3339(now),
        policy.revision,
        snapshot.revision,
        store.describe()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::raw::{self, RawBudget};

    fn token(id: &str, budget: Option<(&str, &str)>) -> RawToken {
        RawToken {
            id: id.to_string(),
            owner: Some(format!("{id}@x")),
            budget: budget.map(|(limit, window)| RawBudget {
                limit_usd: limit.to_string(),
                window: window.to_string(),
            }),
            ..RawToken::default()
        }
    }

    fn kv(key: &str, value: &str) -> Kv {
        Kv {
            key: key.as_bytes().to_vec(),
            value: value.as_bytes().to_vec(),
            mod_revision: 1,
        }
    }

    #[test]
    fn keys_are_read_from_the_right() {
        assert_eq!(
            parse_key("pool/alice/1793491200"),
            Some(LedgerKey::Pool {
                token: "alice",
                window_start: 1_793_491_200
            })
        );
        assert_eq!(
            parse_key("node/eu/envoy-1/alice/0/spent"),
            Some(LedgerKey::Spent {
                node: "eu/envoy-1",
                token: "alice",
                window_start: 0
            })
        );
        assert_eq!(
            parse_key("node/e1/alice/0/claimed"),
            Some(LedgerKey::Claimed {
                node: "e1",
                token: "alice",
                window_start: 0
            })
        );
        for bad in [
            "pool/alice",
            "pool/a/b/0",
            "node/alice/0/spent",
            "node/e1/alice/x/spent",
            "node/e1/alice/0/other",
            "other/e1/alice/0/spent",
        ] {
            assert_eq!(parse_key(bad), None, "{bad}");
        }
    }

    #[test]
    fn only_the_current_window_counts_summed_over_envoys() {
        // 2026-11-24T19:21:29Z: the monthly window started 2026-11-01.
        let now = 1_795_548_089;
        let month = crate::time::month_start(now);
        let mut policy = raw::parse(br#"{"version":1}"#).unwrap();
        policy.tokens = vec![
            token("alice", Some(("25", "monthly"))),
            token("bob", Some(("1", "lifetime"))),
            token("carol", None),
        ];
        let mut rows = plan(&policy, &Select::Budgeted, now).unwrap();
        assert_eq!(rows.len(), 2);
        let kvs = vec![
            kv(
                &format!("sk/ledger/pool/alice/{month}"),
                r#"{"claimed":5000}"#,
            ),
            kv("sk/ledger/pool/alice/1000", r#"{"claimed":99999}"#),
            kv(
                &format!("sk/ledger/node/e1/alice/{month}/claimed"),
                r#"{"claimed":3000}"#,
            ),
            kv(
                &format!("sk/ledger/node/e1/alice/{month}/spent"),
                r#"{"spent":1200}"#,
            ),
            kv(
                &format!("sk/ledger/node/e2/alice/{month}/claimed"),
                r#"{"claimed":2000}"#,
            ),
            kv(
                &format!("sk/ledger/node/e2/alice/{month}/spent"),
                r#"{"spent":800}"#,
            ),
            kv("sk/ledger/node/e2/alice/1000/spent", r#"{"spent":77777}"#),
            kv("sk/ledger/node/e3/bob/0/claimed", r#"{"claimed":10}"#),
            kv("sk/ledger/node/e3/bob/0/spent", "garbage"),
            kv("sk/ledger/node/e3/carol/0/spent", r#"{"spent":5}"#),
            kv("sk/ledger/node/e3/gone/0/spent", r#"{"spent":5}"#),
        ];
        let warnings = tally(&mut rows, "sk/ledger/", &kvs);
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains("sk/ledger/node/e3/bob/0/spent"));
        let alice = &rows[0];
        assert_eq!(
            (alice.spent(), alice.claimed, alice.envoys()),
            (2000, 5000, 2)
        );
        assert_eq!(alice.remaining(), Some(25_000_000_000 - 2000));
        assert_eq!(alice.window_text(), "monthly from 2026-11-01T00:00:00Z");
        let bob = &rows[1];
        assert_eq!(
            (bob.spent(), bob.envoys(), bob.window_text()),
            (0, 0, "lifetime".into())
        );
        assert_eq!(bob.nodes["e3"].claimed, 10);

        let mut all = plan(&policy, &Select::All, now).unwrap();
        tally(&mut all, "sk/ledger/", &kvs);
        assert_eq!(all[2].id, "carol");
        assert_eq!((all[2].spent(), all[2].remaining()), (5, None));
        assert_eq!(all[2].window_text(), "no budget");
        assert!(plan(&policy, &Select::One("dave".into()), now)
            .unwrap_err()
            .to_string()
            .contains("no token with id 'dave'"));
    }

    #[test]
    fn overspend_shows_as_negative_remaining() {
        assert_eq!(signed_difference(5, 7), -2);
        assert_eq!(signed_difference(7, 5), 2);
        assert_eq!(signed_difference(0, u64::MAX), i64::MIN);
        assert_eq!(signed_usd(-1_500_000_000), "-$1.50");
        assert_eq!(signed_usd(250_000_000), "$0.25");
    }

    #[test]
    fn tables_align() {
        let t = table(
            &["A", "NUM"],
            &[false, true],
            &[
                vec!["long-name".into(), "1".into()],
                vec!["x".into(), "1234".into()],
            ],
        );
        assert_eq!(t, "A           NUM\nlong-name     1\nx          1234\n");
    }
}
