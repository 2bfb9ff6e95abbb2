//! `shieldkey status`: fleet-wide spend per team and token, read from the ledger in etcd.
//!
//! Fleet mode only. For every team and token with a budget it reads the current window of the
//! fleet ledger (`src/fleet/lease.rs`): the pool (`<prefix>ledger/pool/<subject>/<window start>`,
//! what all Envoys claimed) and each Envoy's `…/<node>/<subject>/<window start>/claimed` and
//! `…/spent`. The subject is a token's id, or a team's subject id `team.<id>` (`src/team.rs`). The
//! window start is that budget's window at the current time; keys of other windows are not
//! counted. Spend is what each Envoy last flushed (every `sync_interval_ms`), so it may trail the
//! Envoys' own counters by that much.
//!
//! When the policy has teams the rows are grouped: each team's row, then its members' rows, then
//! the tokens in no team.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::args::Args;
use super::commands::now;
use super::error::{failed, usage, CliError};
use super::etcd::Kv;
use super::policy_store::{etcd_client, PolicyStore};
use super::status_common::{
    self, current_window, grouped_cells, members, signed_difference, signed_usd, summary, table,
    usd, Budget, Select, TeamLine, TeamRef, TokenLine,
};
use super::Target;
use crate::config::raw::{RawPolicy, RawTeam, RawToken};
use crate::money::NanoUsd;
use crate::time::format_rfc3339;

/// One Envoy's share of a subject's current window.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct NodeShare {
    claimed: NanoUsd,
    /// `None`: this Envoy has not flushed spend for the window.
    spent: Option<NanoUsd>,
}

/// One subject's (a token's or a team's) current window across the fleet.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Row {
    /// The token's or the team's id, as shown.
    id: String,
    /// What the ledger keys it by: the token id, or `team.<id>`.
    subject: String,
    owner: Option<String>,
    /// A token's team.
    team: Option<String>,
    budget: Option<Budget>,
    /// Unix seconds; 0 for lifetime budgets and subjects without one (as the ledger keys them).
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
            Some(b) if b.lifetime() => b.window.clone(),
            Some(b) => format!("{} from {}", b.window, format_rfc3339(self.window_start)),
        }
    }

    /// The budget's fields, shared by token and team rows.
    fn budget_json(&self, fields: &mut Map<String, Value>) {
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
        let entries = [
            (
                "window",
                json!(self.budget.as_ref().map(|b| b.window.as_str())),
            ),
            ("window_start", json!(self.window_start)),
            (
                "limit_nano_usd",
                json!(self.budget.as_ref().map(|b| b.limit)),
            ),
            ("spent_nano_usd", json!(self.spent())),
            ("claimed_nano_usd", json!(self.claimed)),
            ("remaining_nano_usd", json!(self.remaining())),
            ("envoys", json!(self.envoys())),
            ("nodes", Value::Array(nodes)),
        ];
        for (name, value) in entries {
            fields.insert(name.to_string(), value);
        }
    }

    fn json(&self) -> Value {
        let mut fields = Map::new();
        fields.insert("id".into(), json!(self.id));
        fields.insert("owner".into(), json!(self.owner));
        self.budget_json(&mut fields);
        fields.insert("team".into(), json!(self.team));
        Value::Object(fields)
    }

    /// The budget columns of the table: window, limit, spent, claimed, remaining, Envoys.
    fn budget_cells(&self) -> Vec<String> {
        let dash = || "-".to_string();
        vec![
            self.window_text(),
            self.budget.as_ref().map_or_else(dash, |b| usd(b.limit)),
            usd(self.spent()),
            usd(self.claimed),
            self.remaining().map_or_else(dash, signed_usd),
            self.envoys().to_string(),
        ]
    }

    /// A token's line of the table; `indent` sets members under their team.
    fn cells(&self, indent: &str) -> Vec<String> {
        let mut cells = vec![
            format!("{indent}{}", self.id),
            self.owner.clone().unwrap_or_else(|| "-".to_string()),
        ];
        cells.extend(self.budget_cells());
        cells
    }
}

/// A team's row: its own budget (shared by its members) under its subject id.
#[derive(Debug, Clone, PartialEq, Eq)]
struct TeamRow {
    row: Row,
    description: Option<String>,
    /// Every member's id (whether its row is shown or not), in policy order.
    members: Vec<String>,
    /// `false`: tokens name this team but the policy has none by that id (a hand-edited policy,
    /// which `shieldkey check` refuses).
    in_policy: bool,
}

impl TeamRow {
    fn json(&self) -> Value {
        let mut fields = Map::new();
        fields.insert("id".into(), json!(self.row.id));
        fields.insert("description".into(), json!(self.description));
        self.row.budget_json(&mut fields);
        fields.insert("members".into(), json!(self.members));
        Value::Object(fields)
    }

    fn cells(&self) -> Vec<String> {
        let mut cells = vec![format!("team {}", self.row.id), "-".to_string()];
        if self.in_policy {
            cells.extend(self.row.budget_cells());
        } else {
            cells.push("no such team (check refuses it)".to_string());
        }
        cells
    }
}

/// The rows to show: teams' and tokens' rows filled from the ledger.
type Plan = status_common::Plan<TeamRow, Row>;

impl TokenLine for Row {
    fn cells(&self, indent: &str) -> Vec<String> {
        Row::cells(self, indent)
    }
}

impl TeamLine for TeamRow {
    fn in_policy(&self) -> bool {
        self.in_policy
    }

    fn cells(&self) -> Vec<String> {
        TeamRow::cells(self)
    }
}

impl Plan {
    /// Every row, teams' and tokens', for the ledger to fill in.
    fn rows_mut(&mut self) -> impl Iterator<Item = &mut Row> {
        self.groups.iter_mut().flat_map(|g| {
            g.team
                .as_mut()
                .map(|t| &mut t.row)
                .into_iter()
                .chain(g.tokens.iter_mut())
        })
    }

    fn json(&self) -> Value {
        json!({
            "teams": self.teams().map(TeamRow::json).collect::<Vec<_>>(),
            "tokens": self.tokens().map(Row::json).collect::<Vec<_>>(),
        })
    }
}

fn token_row(token: &RawToken, now: i64) -> Result<Row, CliError> {
    let (budget, window_start) =
        current_window(token.budget.as_ref(), &format!("token '{}'", token.id), now)?;
    Ok(Row {
        id: token.id.clone(),
        subject: token.id.clone(),
        owner: token.owner.clone(),
        team: token.team.clone(),
        budget,
        window_start,
        claimed: 0,
        nodes: BTreeMap::new(),
    })
}

/// Team `id`'s row: `team` is its entry in the policy (`None`: tokens name a team the policy
/// lacks, shown without a budget).
fn team_row(
    policy: &RawPolicy,
    id: &str,
    team: Option<&RawTeam>,
    now: i64,
) -> Result<TeamRow, CliError> {
    let (budget, window_start) = current_window(
        team.and_then(|t| t.budget.as_ref()),
        &format!("team '{id}'"),
        now,
    )?;
    Ok(TeamRow {
        row: Row {
            id: id.to_string(),
            subject: crate::team::subject_id(id),
            owner: None,
            team: None,
            budget,
            window_start,
            claimed: 0,
            nodes: BTreeMap::new(),
        },
        description: team.and_then(|t| t.description.clone()),
        members: members(policy, id).map(|t| t.id.clone()).collect(),
        in_policy: team.is_some(),
    })
}

/// The rows to show, before the ledger is read.
fn plan(policy: &RawPolicy, select: &Select, now: i64) -> Result<Plan, CliError> {
    status_common::layout(policy, select)?.try_map(
        |TeamRef { id, team }| team_row(policy, id, team, now),
        |token| token_row(token, now),
    )
}

/// A ledger key, without `<prefix>ledger/`. The subject is a token id or a team's `team.<id>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LedgerKey<'k> {
    Pool {
        subject: &'k str,
        window_start: i64,
    },
    Claimed {
        node: &'k str,
        subject: &'k str,
        window_start: i64,
    },
    Spent {
        node: &'k str,
        subject: &'k str,
        window_start: i64,
    },
}

/// Reads a key from the right: subjects (token ids, `team.<id>`) and window starts have no '/',
/// a node id may.
fn parse_key(rest: &str) -> Option<LedgerKey<'_>> {
    if let Some(pool) = rest.strip_prefix("pool/") {
        let (subject, start) = pool.rsplit_once('/')?;
        if subject.is_empty() || subject.contains('/') {
            return None;
        }
        return Some(LedgerKey::Pool {
            subject,
            window_start: start.parse().ok()?,
        });
    }
    let node_key = rest.strip_prefix("node/")?;
    let (rest, kind) = node_key.rsplit_once('/')?;
    let (rest, start) = rest.rsplit_once('/')?;
    let (node, subject) = rest.rsplit_once('/')?;
    if node.is_empty() || subject.is_empty() {
        return None;
    }
    let window_start = start.parse().ok()?;
    match kind {
        "claimed" => Some(LedgerKey::Claimed {
            node,
            subject,
            window_start,
        }),
        "spent" => Some(LedgerKey::Spent {
            node,
            subject,
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

/// Adds the ledger keys of each row's current window, matched by subject; returns warnings about
/// keys that count but cannot be read (they are left out of the sums).
fn tally<'r>(
    rows: impl IntoIterator<Item = &'r mut Row>,
    ledger_prefix: &str,
    kvs: &[Kv],
) -> Vec<String> {
    let mut index: BTreeMap<String, &mut Row> =
        rows.into_iter().map(|r| (r.subject.clone(), r)).collect();
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
        let (subject, window_start, field) = match key {
            LedgerKey::Pool {
                subject,
                window_start,
            }
            | LedgerKey::Claimed {
                subject,
                window_start,
                ..
            } => (subject, window_start, "claimed"),
            LedgerKey::Spent {
                subject,
                window_start,
                ..
            } => (subject, window_start, "spent"),
        };
        let Some(row) = index.get_mut(subject) else {
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

/// The table of the plan: when grouped, each team's row (`team <id>`), its members indented
/// under it, then `(no team)` and the tokens in no team.
fn status_table(plan: &Plan) -> String {
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
        &grouped_cells(plan),
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

/// For the console: the document `status --all --json` prints in fleet mode (every team's and
/// token's spend in its current window, summed over the fleet from the ledger in etcd), and
/// warnings about ledger keys left out.
pub(super) fn fleet_snapshot(
    urls: &str,
    prefix: &str,
    user: Option<String>,
    policy: &RawPolicy,
    now: i64,
) -> Result<(Value, Vec<String>), CliError> {
    let mut plan = plan(policy, &Select::All, now)?;
    let ledger_prefix = format!("{prefix}ledger/");
    let snapshot = etcd_client(urls, user)?
        .range_prefix(ledger_prefix.as_bytes())
        .map_err(|e| failed(format!("cannot read the ledger under {ledger_prefix}: {e}")))?;
    let warnings = tally(plan.rows_mut(), &ledger_prefix, &snapshot.kvs);
    Ok((plan.json(), warnings))
}

/// `status [--token ID | --team ID] [--all] [--json]`: in fleet mode from the ledger in etcd,
/// else from one Envoy's admin endpoint (`status_admin.rs`).
pub fn status(target: Target, mut args: Args) -> Result<(), CliError> {
    let (urls, prefix, user) = match target {
        Target::File(path) => return super::status_admin::status(&path, args),
        Target::Etcd { urls, prefix, user } => (urls, prefix, user),
    };
    if args.option("admin")?.is_some() {
        return Err(usage(
            "--admin reads one Envoy's stats, with the policy file; in fleet mode status reads \
             the fleet's spend from the ledger in etcd (leave out --admin; without --etcd, \
             status --admin URL shows one Envoy)",
        ));
    }
    let select = Select::take(&mut args, Select::Budgeted)?;
    let as_json = args.flag("json");
    args.finish()?;

    let mut store = PolicyStore::etcd(&urls, &prefix, user.clone())?;
    let policy = store.load()?.policy;
    let now = now();
    let mut plan = plan(&policy, &select, now)?;
    let ledger_prefix = format!("{prefix}ledger/");
    let snapshot = etcd_client(&urls, user)?
        .range_prefix(ledger_prefix.as_bytes())
        .map_err(|e| {
            failed(format!(
                "cannot read the ledger under {ledger_prefix}: {e} (status needs read access to \
                 [{ledger_prefix}, {prefix}ledger0))"
            ))
        })?;
    for warning in tally(plan.rows_mut(), &ledger_prefix, &snapshot.kvs) {
        eprintln!("warning: {warning}");
    }

    if as_json {
        println!("{:#}", plan.json());
        return Ok(());
    }
    print!("{}", status_table(&plan));
    // One token or one team: the per-Envoy breakdown of its budget.
    let broken_down = match &select {
        Select::Token(_) => plan.tokens().next(),
        Select::Team(_) => plan.teams().next().map(|t| &t.row),
        Select::Budgeted | Select::All => None,
    };
    if let Some(row) = broken_down {
        println!();
        if row.nodes.is_empty() {
            println!("no Envoy has claimed or reported spend in this window");
        } else {
            print!("{}", nodes_table(row));
        }
    }
    eprintln!(
        "{}; spend as last flushed by each Envoy, current windows at {}; policy revision {}, \
         ledger at etcd revision {}, {}",
        summary(&policy, &select, &plan),
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

    fn member(id: &str, team: &str, budget: Option<(&str, &str)>) -> RawToken {
        RawToken {
            team: Some(team.to_string()),
            ..token(id, budget)
        }
    }

    fn team(id: &str, budget: Option<(&str, &str)>) -> RawTeam {
        RawTeam {
            id: id.to_string(),
            description: Some(format!("team {id}")),
            budget: budget.map(|(limit, window)| RawBudget {
                limit_usd: limit.to_string(),
                window: window.to_string(),
            }),
            ..RawTeam::default()
        }
    }

    fn kv(key: &str, value: &str) -> Kv {
        Kv {
            key: key.as_bytes().to_vec(),
            value: value.as_bytes().to_vec(),
            mod_revision: 1,
        }
    }

    /// The ids of a plan's lines, as the table shows them (`team <id>`, `(no team)`, tokens).
    fn layout(plan: &Plan) -> Vec<String> {
        let mut out = Vec::new();
        for group in &plan.groups {
            match &group.team {
                Some(t) => out.push(format!("team {}", t.row.id)),
                None if plan.grouped => out.push("(no team)".into()),
                None => {}
            }
            out.extend(group.tokens.iter().map(|r| format!("  {}", r.id)));
        }
        out
    }

    #[test]
    fn keys_are_read_from_the_right() {
        assert_eq!(
            parse_key("pool/alice/1793491200"),
            Some(LedgerKey::Pool {
                subject: "alice",
                window_start: 1_793_491_200
            })
        );
        assert_eq!(
            parse_key("node/eu/envoy-1/alice/0/spent"),
            Some(LedgerKey::Spent {
                node: "eu/envoy-1",
                subject: "alice",
                window_start: 0
            })
        );
        assert_eq!(
            parse_key("node/e1/alice/0/claimed"),
            Some(LedgerKey::Claimed {
                node: "e1",
                subject: "alice",
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
    fn team_subjects_parse_like_token_ids() {
        // `team.<id>`: a dot, no '/'; the keys `src/fleet/lease.rs` writes for a team.
        let subject = crate::team::subject_id("eng");
        let prefix = "sk/";
        let rest = |key: String| key.strip_prefix("sk/ledger/").map(str::to_string);
        let pool = rest(crate::fleet::lease::pool_key(
            prefix,
            &subject,
            1_793_491_200,
        ));
        assert_eq!(
            pool.as_deref().and_then(parse_key),
            Some(LedgerKey::Pool {
                subject: "team.eng",
                window_start: 1_793_491_200
            })
        );
        let claimed = rest(crate::fleet::lease::claimed_key(
            prefix,
            "eu/envoy-1",
            &subject,
            0,
        ));
        assert_eq!(
            claimed.as_deref().and_then(parse_key),
            Some(LedgerKey::Claimed {
                node: "eu/envoy-1",
                subject: "team.eng",
                window_start: 0
            })
        );
        let spent = rest(crate::fleet::lease::spent_key(prefix, "e1", &subject, 3600));
        assert_eq!(
            spent.as_deref().and_then(parse_key),
            Some(LedgerKey::Spent {
                node: "e1",
                subject: "team.eng",
                window_start: 3600
            })
        );
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
        let mut plan = plan(&policy, &Select::Budgeted, now).unwrap();
        assert!(!plan.grouped, "no teams: one flat table");
        assert_eq!(plan.tokens().count(), 2);
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
            // The fleet-wide alerts' index and claims repeat spend: never counted twice.
            kv(
                &format!("sk/ledger/spent/alice/{month}/e1"),
                r#"{"spent":1200}"#,
            ),
            kv(
                &format!("sk/ledger/alerts/alice/{month}/50"),
                r#"{"node":"e1","spent":1200,"at":0}"#,
            ),
        ];
        let warnings = tally(plan.rows_mut(), "sk/ledger/", &kvs);
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains("sk/ledger/node/e3/bob/0/spent"));
        let rows: Vec<&Row> = plan.tokens().collect();
        let alice = rows[0];
        assert_eq!(
            (alice.spent(), alice.claimed, alice.envoys()),
            (2000, 5000, 2)
        );
        assert_eq!(alice.remaining(), Some(25_000_000_000 - 2000));
        assert_eq!(alice.window_text(), "monthly from 2026-11-01T00:00:00Z");
        let bob = rows[1];
        assert_eq!(
            (bob.spent(), bob.envoys(), bob.window_text()),
            (0, 0, "lifetime".into())
        );
        assert_eq!(bob.nodes["e3"].claimed, 10);
        assert_eq!(
            summary(&policy, &Select::Budgeted, &plan),
            "2 token(s) (1 without a budget: --all lists them)"
        );

        let mut all = super::plan(&policy, &Select::All, now).unwrap();
        tally(all.rows_mut(), "sk/ledger/", &kvs);
        let carol = all.tokens().nth(2).unwrap();
        assert_eq!(carol.id, "carol");
        assert_eq!((carol.spent(), carol.remaining()), (5, None));
        assert_eq!(carol.window_text(), "no budget");
        assert!(super::plan(&policy, &Select::Token("dave".into()), now)
            .unwrap_err()
            .to_string()
            .contains("no token with id 'dave'"));
    }

    /// eng ($500 monthly): alice (budgeted), bob (no budget); ops (no budget): carol (budgeted);
    /// idle (no budget, no members); dave in no team (budgeted), erin in no team (no budget).
    fn team_policy() -> RawPolicy {
        let mut policy = raw::parse(br#"{"version":1}"#).unwrap();
        policy.teams = vec![
            team("eng", Some(("500", "monthly"))),
            team("ops", None),
            team("idle", None),
        ];
        policy.tokens = vec![
            member("alice", "eng", Some(("150", "monthly"))),
            token("dave", Some(("5", "daily"))),
            member("bob", "eng", None),
            member("carol", "ops", Some(("1", "lifetime"))),
            token("erin", None),
        ];
        policy
    }

    #[test]
    fn rows_are_grouped_by_team() {
        let now = 1_795_548_089;
        let policy = team_policy();
        let budgeted = plan(&policy, &Select::Budgeted, now).unwrap();
        assert!(budgeted.grouped);
        // A budgeted team with its budgeted members; a team without a budget only for the
        // budgeted tokens in it; then the tokens in no team.
        assert_eq!(
            layout(&budgeted),
            [
                "team eng",
                "  alice",
                "team ops",
                "  carol",
                "(no team)",
                "  dave"
            ]
        );
        let eng = budgeted.teams().next().unwrap();
        assert_eq!(eng.row.subject, "team.eng");
        assert_eq!(eng.members, ["alice", "bob"], "every member, shown or not");
        assert_eq!(
            eng.row.window_text(),
            "monthly from 2026-11-01T00:00:00Z",
            "the team's own window"
        );
        assert_eq!(eng.row.remaining(), Some(500_000_000_000));
        assert_eq!(
            summary(&policy, &Select::Budgeted, &budgeted),
            "2 teams, 3 tokens (2 without a budget, 1 team without a budget or a budgeted \
             member: --all lists them)"
        );

        let all = plan(&policy, &Select::All, now).unwrap();
        assert_eq!(
            layout(&all),
            [
                "team eng",
                "  alice",
                "  bob",
                "team ops",
                "  carol",
                "team idle",
                "(no team)",
                "  dave",
                "  erin"
            ]
        );
        assert_eq!(summary(&policy, &Select::All, &all), "3 teams, 5 tokens");

        let one = plan(&policy, &Select::Team("eng".into()), now).unwrap();
        assert_eq!(layout(&one), ["team eng", "  alice", "  bob"]);
        assert!(plan(&policy, &Select::Team("ghost".into()), now)
            .unwrap_err()
            .to_string()
            .contains("no team with id 'ghost'"));
        let token = plan(&policy, &Select::Token("alice".into()), now).unwrap();
        assert_eq!(layout(&token), ["  alice"]);
        assert!(!token.grouped);

        // A team's budget that does not parse names the team.
        let mut bad = team_policy();
        bad.teams[0].budget = Some(RawBudget {
            limit_usd: "lots".into(),
            window: "monthly".into(),
        });
        let err = plan(&bad, &Select::Budgeted, now).unwrap_err().to_string();
        assert!(err.contains("team 'eng': budget limit_usd"), "{err}");

        // A token naming a team the policy lacks is shown under that name.
        let mut orphan = team_policy();
        orphan
            .tokens
            .push(member("frank", "gone", Some(("1", "daily"))));
        let plan = plan(&orphan, &Select::Budgeted, now).unwrap();
        assert_eq!(
            layout(&plan)[4..],
            ["team gone", "  frank", "(no team)", "  dave"]
        );
        let gone = plan.teams().nth(2).unwrap();
        assert!(!gone.in_policy && gone.row.budget.is_none());
        let text = status_table(&plan);
        let line = text.lines().find(|l| l.starts_with("team gone")).unwrap();
        assert_eq!(
            line.split_whitespace().collect::<Vec<_>>(),
            ["team", "gone", "-", "no", "such", "team", "(check", "refuses", "it)"],
            "{text}"
        );
    }

    #[test]
    fn team_rows_read_the_team_subject_and_their_own_window() {
        let now = 1_795_548_089;
        let month = crate::time::month_start(now);
        let day = now - now.rem_euclid(86_400);
        let policy = team_policy();
        let mut plan = plan(&policy, &Select::Budgeted, now).unwrap();
        let kvs = vec![
            kv(
                &format!("sk/ledger/pool/team.eng/{month}"),
                r#"{"claimed":100000000000}"#,
            ),
            kv(
                &format!("sk/ledger/node/e1/team.eng/{month}/claimed"),
                r#"{"claimed":60000000000}"#,
            ),
            kv(
                &format!("sk/ledger/node/e1/team.eng/{month}/spent"),
                r#"{"spent":7000000000}"#,
            ),
            kv(
                &format!("sk/ledger/node/eu/e2/team.eng/{month}/claimed"),
                r#"{"claimed":40000000000}"#,
            ),
            // Another window of the team: not counted.
            kv("sk/ledger/node/e1/team.eng/0/spent", r#"{"spent":1}"#),
            // alice's own keys are hers, not the team's.
            kv(
                &format!("sk/ledger/node/e1/alice/{month}/spent"),
                r#"{"spent":3000000000}"#,
            ),
            // A token with the team's id is not the team.
            kv(
                &format!("sk/ledger/node/e1/eng/{month}/spent"),
                r#"{"spent":9}"#,
            ),
            kv(
                &format!("sk/ledger/node/e1/dave/{day}/spent"),
                r#"{"spent":250000000}"#,
            ),
        ];
        assert!(tally(plan.rows_mut(), "sk/ledger/", &kvs).is_empty());
        let eng = plan.teams().next().unwrap();
        assert_eq!(
            (eng.row.spent(), eng.row.claimed, eng.row.envoys()),
            (7_000_000_000, 100_000_000_000, 1)
        );
        assert_eq!(eng.row.nodes["eu/e2"].spent, None);
        assert_eq!(eng.row.remaining(), Some(493_000_000_000));
        let alice = plan.tokens().next().unwrap();
        assert_eq!(alice.spent(), 3_000_000_000);

        let doc = plan.json();
        let teams = doc["teams"].as_array().unwrap();
        assert_eq!(teams.len(), 2);
        assert_eq!(
            teams[0],
            json!({
                "id": "eng", "description": "team eng", "window": "monthly",
                "window_start": month, "limit_nano_usd": 500_000_000_000u64,
                "spent_nano_usd": 7_000_000_000u64, "claimed_nano_usd": 100_000_000_000u64,
                "remaining_nano_usd": 493_000_000_000u64, "envoys": 1,
                "nodes": [
                    {"node": "e1", "claimed_nano_usd": 60_000_000_000u64,
                     "spent_nano_usd": 7_000_000_000u64, "reported_spend": true},
                    {"node": "eu/e2", "claimed_nano_usd": 40_000_000_000u64,
                     "spent_nano_usd": 0, "reported_spend": false},
                ],
                "members": ["alice", "bob"],
            })
        );
        assert_eq!(teams[1]["id"], "ops");
        assert_eq!(teams[1]["window"], Value::Null);
        assert_eq!(teams[1]["members"], json!(["carol"]));
        let tokens = doc["tokens"].as_array().unwrap();
        let ids: Vec<&str> = tokens.iter().filter_map(|t| t["id"].as_str()).collect();
        assert_eq!(ids, ["alice", "carol", "dave"]);
        // The token rows keep their fields and add their team.
        assert_eq!(
            tokens[0],
            json!({
                "id": "alice", "owner": "alice@x", "window": "monthly", "window_start": month,
                "limit_nano_usd": 150_000_000_000u64, "spent_nano_usd": 3_000_000_000u64,
                "claimed_nano_usd": 0, "remaining_nano_usd": 147_000_000_000u64, "envoys": 1,
                "nodes": [{"node": "e1", "claimed_nano_usd": 0,
                           "spent_nano_usd": 3_000_000_000u64, "reported_spend": true}],
                "team": "eng",
            })
        );
        assert_eq!(tokens[2]["team"], Value::Null);
        assert_eq!(tokens[2]["window_start"], day);

        let text = status_table(&plan);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("TOKEN "), "{text}");
        assert_eq!(
            lines[1].split_whitespace().collect::<Vec<_>>(),
            [
                "team",
                "eng",
                "-",
                "monthly",
                "from",
                "2026-11-01T00:00:00Z",
                "$500.00",
                "$7.00",
                "$100.00",
                "$493.00",
                "1"
            ],
            "{text}"
        );
        assert!(lines[2].starts_with("  alice "), "{text}");
        assert!(lines[3].starts_with("team ops ") && lines[3].contains("no budget"));
        assert_eq!(lines[5], "(no team)", "{text}");
        assert!(lines[6].starts_with("  dave "), "{text}");
    }
}
