//! `shieldkey status` without etcd: one Envoy's view of every team and token, from the policy
//! file and that Envoy's admin endpoint (`--admin URL` or `SHIELDKEY_ADMIN`).
//!
//! The policy gives each row its owner, status and budget; one `GET /stats?format=json` (filtered
//! to the filter's per-token and per-team stats, `src/stream/metrics.rs`) gives the rest:
//! - `requests` (forwarded requests), `reason.<code>.denied`, `reason.<code>.would_deny`,
//!   `spend_nano_usd`: counters since that Envoy started.
//! - Spend in the current budget window: the budget gauges as the last settlement of that token
//!   (or team) left them. They change only when a request settles (nothing resets them when a
//!   window ends), so `budget_window_start_seconds` says which window they are about: when it is
//!   not the current window, nothing has been charged in the current one and its spend is 0.
//!   Spend is `budget_spent_nano_usd`; from a filter that reports neither of those two gauges
//!   (older than this CLI), `budget_limit_nano_usd − budget_remaining_nano_usd`, capped at the
//!   limit and possibly of an earlier window (a warning says so).
//!
//! Nothing is printed unless the stats could be read: an unreachable admin endpoint is an error
//! (exit 1) naming the URL.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Map, Value};

use super::admin::{Admin, AdminError};
use super::args::Args;
use super::commands::{now, token_state};
use super::error::{failed, usage, CliError};
use super::policy_file;
use super::status_common::{
    self, current_window, grouped_cells, members, signed_difference, signed_usd, summary, table,
    usd, Budget, Select, TeamLine, TeamRef, TokenLine,
};
use crate::config::raw::{RawPolicy, RawTeam, RawToken};
use crate::money::NanoUsd;
use crate::time::format_rfc3339;

const NO_ADMIN: &str = "status without etcd shows one Envoy's view: it needs that Envoy's \
admin endpoint (--admin URL or SHIELDKEY_ADMIN, e.g. --admin http://127.0.0.1:9901), read next to \
the policy file. A fleet's spend is in etcd: that needs fleet mode (--etcd URLS or \
SHIELDKEY_ETCD). The raw counters are in each Envoy's admin /stats, e.g. \
`curl -s 'http://127.0.0.1:9901/stats?filter=shieldkey.token_id'` \
(wasmcustom.shieldkey.token_id.<id>.spend_nano_usd, nano-USD charged since that Envoy started; \
.budget_remaining_nano_usd, the budget left after its last request settled)";

/// The stats read: the filter's per-token and per-team stats, and the ECDS versions (which
/// policy revision Envoy serves).
const STATS_FILTER: &str =
    r"^(wasmcustom\.shieldkey\.(token_id|team)\.|extension_config_discovery\.http_filter\.)";
const STATS_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest `/stats` answer read: about 1 KiB per token and team, so room for tens of thousands.
const MAX_STATS: u64 = 64 << 20;
const BAR_WIDTH: usize = 10;

/// One token's or team's stats, as one Envoy reports them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct SubjectStats {
    /// Forwarded requests.
    requests: u64,
    /// Everything charged since Envoy started.
    spend_total: NanoUsd,
    budget_limit: Option<NanoUsd>,
    budget_remaining: Option<NanoUsd>,
    budget_spent: Option<NanoUsd>,
    /// Unix seconds; 0 for a lifetime budget (and before any settlement).
    budget_window_start: Option<i64>,
    /// By denial code; codes with a count of 0 are left out.
    denied: BTreeMap<String, u64>,
    would_deny: BTreeMap<String, u64>,
}

/// What one `/stats` answer says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct EnvoyStats {
    tokens: BTreeMap<String, SubjectStats>,
    teams: BTreeMap<String, SubjectStats>,
    /// ECDS `version_text` by HTTP filter name: the policy revision serving (`""` before any).
    served: BTreeMap<String, String>,
}

impl EnvoyStats {
    /// From `GET /stats?format=json`: `{"stats": [{"name": …, "value": …}, …]}` (entries that
    /// are not a name and a number or a text, such as histograms, are skipped).
    fn parse(body: &str) -> Result<EnvoyStats, String> {
        let doc: Value = serde_json::from_str(body).map_err(|e| format!("not JSON: {e}"))?;
        let entries = doc
            .get("stats")
            .and_then(Value::as_array)
            .ok_or_else(|| "no \"stats\" list".to_string())?;
        let mut stats = EnvoyStats::default();
        for entry in entries {
            let Some(name) = entry.get("name").and_then(Value::as_str) else {
                continue;
            };
            match entry.get("value") {
                Some(Value::Number(n)) => {
                    if let Some(value) = n.as_u64() {
                        stats.add(name, value);
                    }
                }
                Some(Value::String(text)) => {
                    if let Some(filter) = name
                        .strip_prefix("extension_config_discovery.http_filter.")
                        .and_then(|rest| rest.strip_suffix(".version_text"))
                    {
                        stats.served.insert(filter.to_string(), text.clone());
                    }
                }
                _ => {}
            }
        }
        Ok(stats)
    }

    fn add(&mut self, name: &str, value: u64) {
        let Some(rest) = name.strip_prefix("wasmcustom.shieldkey.") else {
            return;
        };
        // Token and team ids have no dot: the id ends at the first one.
        let (map, rest) = if let Some(rest) = rest.strip_prefix("token_id.") {
            (&mut self.tokens, rest)
        } else if let Some(rest) = rest.strip_prefix("team.") {
            (&mut self.teams, rest)
        } else {
            return;
        };
        let Some((id, metric)) = rest.split_once('.') else {
            return;
        };
        if id.is_empty() {
            return;
        }
        let subject = map.entry(id.to_string()).or_default();
        match metric {
            "requests" => subject.requests = value,
            "spend_nano_usd" => subject.spend_total = value,
            "budget_limit_nano_usd" => subject.budget_limit = Some(value),
            "budget_remaining_nano_usd" => subject.budget_remaining = Some(value),
            "budget_spent_nano_usd" => subject.budget_spent = Some(value),
            "budget_window_start_seconds" => {
                subject.budget_window_start = i64::try_from(value).ok();
            }
            _ => {
                let Some((code, kind)) = metric
                    .strip_prefix("reason.")
                    .and_then(|r| r.rsplit_once('.'))
                else {
                    return;
                };
                let counts = match kind {
                    "denied" => &mut subject.denied,
                    "would_deny" => &mut subject.would_deny,
                    _ => return,
                };
                if value > 0 && !code.is_empty() {
                    counts.insert(code.to_string(), value);
                }
            }
        }
    }
}

/// Spend in a budget's current window, from the gauges of the last settlement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct WindowSpend {
    spent: NanoUsd,
    /// `false`: a filter without the window gauges; `spent` is the last settlement's, whatever
    /// its window, and capped at the limit.
    known: bool,
}

fn window_spend(stats: &SubjectStats, window_start: i64) -> WindowSpend {
    match stats.budget_window_start {
        Some(settled) if settled == window_start => WindowSpend {
            spent: stats.budget_spent.unwrap_or_else(|| {
                let limit = stats.budget_limit.unwrap_or(0);
                limit.saturating_sub(stats.budget_remaining.unwrap_or(limit))
            }),
            known: true,
        },
        // The last settlement was in another window: nothing was charged in this one.
        Some(_) => WindowSpend {
            spent: 0,
            known: true,
        },
        // Nothing settled since Envoy started (or this token was never used there).
        None if stats.budget_limit.is_none() => WindowSpend {
            spent: 0,
            known: true,
        },
        None => {
            let limit = stats.budget_limit.unwrap_or(0);
            WindowSpend {
                spent: limit.saturating_sub(stats.budget_remaining.unwrap_or(limit)),
                known: false,
            }
        }
    }
}

/// Percent of the limit spent (rounded down); a limit of 0 is full.
fn percent(spent: NanoUsd, limit: NanoUsd) -> u64 {
    if limit == 0 {
        return 100;
    }
    u64::try_from(u128::from(spent) * 100 / u128::from(limit)).unwrap_or(u64::MAX)
}

/// `[#######---] 70%`: one `#` per whole tenth of the limit, full past it.
fn bar(percent: u64) -> String {
    let filled = usize::try_from(percent / 10)
        .unwrap_or(BAR_WIDTH)
        .min(BAR_WIDTH);
    format!(
        "[{}{}] {percent}%",
        "#".repeat(filled),
        "-".repeat(BAR_WIDTH - filled)
    )
}

/// `budget_exceeded:3 rate_limited:1` (codes without their `shield_` prefix), or `-`.
fn counts_text(counts: &BTreeMap<String, u64>) -> String {
    if counts.is_empty() {
        return "-".to_string();
    }
    counts
        .iter()
        .map(|(code, n)| format!("{}:{n}", code.strip_prefix("shield_").unwrap_or(code)))
        .collect::<Vec<_>>()
        .join(" ")
}

/// One token's or team's line: its policy and what this Envoy reports.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Row {
    id: String,
    owner: Option<String>,
    /// A token's team.
    team: Option<String>,
    /// `active`, `revoked`, `expired`, `not-yet-valid`, `dry-run`.
    status: &'static str,
    budget: Option<Budget>,
    /// Unix seconds; 0 for lifetime budgets and subjects without one.
    window_start: i64,
    /// When the current window ends; `None` for lifetime budgets and subjects without one.
    resets_at: Option<i64>,
    /// Spend in the current window with a budget, since Envoy started without one.
    spent: NanoUsd,
    /// `false`: the filter does not say which window the spend is of.
    window_known: bool,
    stats: SubjectStats,
}

impl Row {
    fn new(
        id: &str,
        status: &'static str,
        budget: Option<Budget>,
        window_start: i64,
        stats: SubjectStats,
        now: i64,
    ) -> Row {
        let (spent, window_known) = match &budget {
            None => (stats.spend_total, true),
            Some(_) => {
                let w = window_spend(&stats, window_start);
                (w.spent, w.known)
            }
        };
        Row {
            id: id.to_string(),
            owner: None,
            team: None,
            status,
            resets_at: budget.as_ref().and_then(|b| b.kind.reset_at(now)),
            budget,
            window_start,
            spent,
            window_known,
            stats,
        }
    }

    fn limit(&self) -> Option<NanoUsd> {
        self.budget.as_ref().map(|b| b.limit)
    }

    fn percent(&self) -> Option<u64> {
        self.limit().map(|limit| percent(self.spent, limit))
    }

    /// `limit − spent`, negative past the limit (a dry-run budget, a lowered limit).
    fn remaining(&self) -> Option<i64> {
        self.limit()
            .map(|limit| signed_difference(limit, self.spent))
    }

    /// The fields of a token's and a team's JSON.
    fn common_json(&self, fields: &mut Map<String, Value>) {
        let entries = [
            ("status", json!(self.status)),
            (
                "window",
                json!(self.budget.as_ref().map(|b| b.window.as_str())),
            ),
            ("window_start", json!(self.window_start)),
            ("resets_at", json!(self.resets_at)),
            ("limit_nano_usd", json!(self.limit())),
            ("spent_nano_usd", json!(self.spent)),
            ("remaining_nano_usd", json!(self.remaining())),
            ("percent", json!(self.percent())),
            ("spend_total_nano_usd", json!(self.stats.spend_total)),
            ("requests", json!(self.stats.requests)),
            ("denied", json!(self.stats.denied)),
            ("would_deny", json!(self.stats.would_deny)),
        ];
        for (name, value) in entries {
            fields.insert(name.to_string(), value);
        }
    }

    fn json(&self) -> Value {
        let mut fields = Map::new();
        fields.insert("id".into(), json!(self.id));
        fields.insert("owner".into(), json!(self.owner));
        fields.insert("team".into(), json!(self.team));
        self.common_json(&mut fields);
        Value::Object(fields)
    }

    /// The columns after TOKEN and OWNER.
    fn common_cells(&self, would_deny: bool) -> Vec<String> {
        let dash = || "-".to_string();
        let mut cells = vec![
            self.status.to_string(),
            self.budget
                .as_ref()
                .map_or_else(|| "-".to_string(), |b| b.window.clone()),
            usd(self.spent),
            self.limit().map_or_else(dash, usd),
            self.percent().map_or_else(dash, bar),
            self.remaining().map_or_else(dash, signed_usd),
            self.resets_at.map_or_else(dash, format_rfc3339),
            self.stats.requests.to_string(),
            counts_text(&self.stats.denied),
        ];
        if would_deny {
            cells.push(counts_text(&self.stats.would_deny));
        }
        cells
    }
}

/// A token's row, with whether the table has a WOULD_DENY column.
#[derive(Debug, Clone, PartialEq, Eq)]
struct TokenRow {
    row: Row,
    would_deny: bool,
}

impl TokenLine for TokenRow {
    fn cells(&self, indent: &str) -> Vec<String> {
        let mut cells = vec![
            format!("{indent}{}", self.row.id),
            self.row.owner.clone().unwrap_or_else(|| "-".to_string()),
        ];
        cells.extend(self.row.common_cells(self.would_deny));
        cells
    }
}

/// A team's row: its own budget (shared by its members) and its stats (over all members).
#[derive(Debug, Clone, PartialEq, Eq)]
struct TeamRow {
    row: Row,
    description: Option<String>,
    /// Every member's id (whether its row is shown or not), in policy order.
    members: Vec<String>,
    /// `false`: tokens name this team but the policy has none by that id.
    in_policy: bool,
    would_deny: bool,
}

impl TeamRow {
    fn json(&self) -> Value {
        let mut fields = Map::new();
        fields.insert("id".into(), json!(self.row.id));
        fields.insert("description".into(), json!(self.description));
        self.row.common_json(&mut fields);
        fields.insert("members".into(), json!(self.members));
        Value::Object(fields)
    }
}

impl TeamLine for TeamRow {
    fn in_policy(&self) -> bool {
        self.in_policy
    }

    fn cells(&self) -> Vec<String> {
        let mut cells = vec![format!("team {}", self.row.id), "-".to_string()];
        if self.in_policy {
            cells.extend(self.row.common_cells(self.would_deny));
        } else {
            cells.push("no such team (check refuses it)".to_string());
        }
        cells
    }
}

type Plan = status_common::Plan<TeamRow, TokenRow>;

/// A token's status: revoked, expired, not yet valid, else in dry run when its own rules are
/// (its `enforce` or the policy's is false), else active.
pub(super) fn token_status(policy: &RawPolicy, token: &RawToken, now: i64) -> &'static str {
    match token_state(token, now) {
        "active" if token.enforce == Some(false) || policy.enforce == Some(false) => "dry-run",
        state => state,
    }
}

pub(super) fn team_status(policy: &RawPolicy, team: Option<&RawTeam>) -> &'static str {
    match team {
        None => "-",
        Some(t) if t.enforce == Some(false) || policy.enforce == Some(false) => "dry-run",
        Some(_) => "active",
    }
}

/// The rows, from the policy and the stats; `would_deny`: the table shows that column.
fn plan(
    policy: &RawPolicy,
    select: &Select,
    stats: &EnvoyStats,
    now: i64,
) -> Result<Plan, CliError> {
    let layout = status_common::layout(policy, select)?;
    let would_deny = layout
        .teams()
        .filter_map(|t| stats.teams.get(t.id))
        .chain(layout.tokens().filter_map(|t| stats.tokens.get(&t.id)))
        .any(|s| !s.would_deny.is_empty());
    layout.try_map(
        |TeamRef { id, team }| {
            let (budget, window_start) = current_window(
                team.and_then(|t| t.budget.as_ref()),
                &format!("team '{id}'"),
                now,
            )?;
            let stats = stats.teams.get(id).cloned().unwrap_or_default();
            Ok(TeamRow {
                row: Row::new(
                    id,
                    team_status(policy, team),
                    budget,
                    window_start,
                    stats,
                    now,
                ),
                description: team.and_then(|t| t.description.clone()),
                members: members(policy, id).map(|t| t.id.clone()).collect(),
                in_policy: team.is_some(),
                would_deny,
            })
        },
        |token| {
            let (budget, window_start) =
                current_window(token.budget.as_ref(), &format!("token '{}'", token.id), now)?;
            let stats = stats.tokens.get(&token.id).cloned().unwrap_or_default();
            let mut row = Row::new(
                &token.id,
                token_status(policy, token, now),
                budget,
                window_start,
                stats,
                now,
            );
            row.owner = token.owner.clone();
            row.team = token.team.clone();
            Ok(TokenRow { row, would_deny })
        },
    )
}

fn plan_json(plan: &Plan) -> Value {
    json!({
        "teams": plan.teams().map(TeamRow::json).collect::<Vec<_>>(),
        "tokens": plan.tokens().map(|t| t.row.json()).collect::<Vec<_>>(),
    })
}

fn status_table(plan: &Plan) -> String {
    let would_deny = plan
        .tokens()
        .next()
        .map(|t| t.would_deny)
        .or_else(|| plan.teams().next().map(|t| t.would_deny))
        .unwrap_or(false);
    let mut headers = vec![
        "TOKEN",
        "OWNER",
        "STATUS",
        "WINDOW",
        "SPENT",
        "LIMIT",
        "USED",
        "REMAINING",
        "RESETS",
        "REQUESTS",
        "DENIED",
    ];
    let mut right = vec![
        false, false, false, false, true, true, false, true, false, true, false,
    ];
    if would_deny {
        headers.push("WOULD_DENY");
        right.push(false);
    }
    table(&headers, &right, &grouped_cells(plan))
}

/// `%XX` for every byte outside the unreserved set of RFC 3986.
fn query_escape(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// The stats of the Envoy at `admin`, or why they cannot be read.
fn read_stats(admin: &Admin) -> Result<EnvoyStats, CliError> {
    let url = admin.url();
    let path = format!("/stats?format=json&filter={}", query_escape(STATS_FILTER));
    let body = admin
        .fetch(&path, "application/json", STATS_TIMEOUT, MAX_STATS)
        .map_err(|e| match e {
            AdminError::Unreachable(m) => failed(format!(
                "cannot reach Envoy's admin endpoint at {url} ({m}): check that Envoy is \
                 running, that {url} is the address of its admin listener (admin.address in \
                 its bootstrap; --admin URL or SHIELDKEY_ADMIN), and that this host may connect \
                 to it"
            )),
            AdminError::Failed(m) => failed(format!(
                "cannot read the stats of Envoy's admin endpoint at {url}: {m} (is {url} \
                 Envoy's admin address?)"
            )),
        })?;
    EnvoyStats::parse(&body).map_err(|m| {
        failed(format!(
            "the answer of {url}{path} is not Envoy's stats JSON ({m}): is {url} Envoy's admin \
             address?"
        ))
    })
}

/// Tokens and teams Envoy has stats of that the policy file does not have: removed since Envoy
/// started, or a policy Envoy serves that was not published from this file.
fn strangers(policy: &RawPolicy, stats: &EnvoyStats) -> Option<String> {
    let tokens: Vec<&str> = stats
        .tokens
        .keys()
        .filter(|id| !policy.tokens.iter().any(|t| t.id == **id))
        .map(String::as_str)
        .collect();
    let teams: Vec<&str> = stats
        .teams
        .keys()
        .filter(|id| !policy.teams.iter().any(|t| t.id == **id))
        .map(String::as_str)
        .collect();
    let list = |what: &str, ids: &[&str]| {
        const SHOWN: usize = 10;
        let more = ids.len().saturating_sub(SHOWN);
        let mut text = format!(
            "{} {what}{} ({}",
            ids.len(),
            if ids.len() == 1 { "" } else { "s" },
            ids.iter()
                .take(SHOWN)
                .copied()
                .collect::<Vec<_>>()
                .join(", ")
        );
        if more > 0 {
            text.push_str(&format!(", {more} more"));
        }
        text.push(')');
        text
    };
    let mut parts = Vec::new();
    if !tokens.is_empty() {
        parts.push(list("token", &tokens));
    }
    if !teams.is_empty() {
        parts.push(list("team", &teams));
    }
    (!parts.is_empty()).then(|| {
        format!(
            "Envoy has stats of {} that the policy file does not have (removed since Envoy \
             started, or Envoy serves a policy not published from this file); not shown",
            parts.join(" and ")
        )
    })
}

/// For the console: the document `status --all --json` prints, from the stats of the Envoy at
/// `admin`, and the policy revision that Envoy serves in the ECDS filter `filter_name` (`""`
/// before any; `None`: no such filter).
pub(super) fn snapshot(
    policy: &RawPolicy,
    admin: &Admin,
    filter_name: &str,
    now: i64,
) -> Result<(Value, Option<String>), CliError> {
    let stats = read_stats(admin)?;
    let plan = plan(policy, &Select::All, &stats, now)?;
    Ok((plan_json(&plan), stats.served.get(filter_name).cloned()))
}

/// `status [--token ID | --team ID] [--all] [--json] [--admin URL] [--filter-name NAME]`, with
/// the policy file at `path`.
pub fn status(path: &Path, mut args: Args) -> Result<(), CliError> {
    let admin = args
        .option("admin")?
        .or_else(|| super::env_var("SHIELDKEY_ADMIN"));
    let filter_name = args
        .option("filter-name")?
        .unwrap_or_else(|| "shieldkey".to_string());
    // Every team and token by default: each has requests and denials, budget or not.
    let select = Select::take(&mut args, Select::All)?;
    let as_json = args.flag("json");
    args.finish()?;
    let Some(admin) = admin else {
        return Err(usage(NO_ADMIN));
    };
    let admin = Admin::parse(&admin)?;
    let policy = policy_file::load(path)?;
    // The selection is checked before Envoy is asked.
    status_common::layout(&policy, &select)?;
    let stats = read_stats(&admin)?;
    let now = now();
    let plan = plan(&policy, &select, &stats, now)?;

    let mut notes = Vec::new();
    let unknown_window: Vec<&str> = plan
        .teams()
        .map(|t| &t.row)
        .chain(plan.tokens().map(|t| &t.row))
        .filter(|r| !r.window_known)
        .map(|r| r.id.as_str())
        .collect();
    if !unknown_window.is_empty() {
        notes.push(format!(
            "warning: this Envoy's filter does not report budget_window_start_seconds (it is \
             older than this CLI): the spend of {} is as its last settlement left it, which may \
             be in an earlier window, and at most the limit",
            unknown_window.join(", ")
        ));
    }
    let served = stats.served.get(&filter_name);
    match served {
        Some(version) if version.is_empty() => notes.push(format!(
            "warning: Envoy has not accepted any configuration of the ECDS filter \
             '{filter_name}': it answers every request with 500"
        )),
        Some(version) if *version != policy.revision.to_string() => notes.push(format!(
            "warning: Envoy serves policy revision {version}, the policy file {} is at revision \
             {}: statuses and budgets follow the file (publish it to apply it)",
            path.display(),
            policy.revision
        )),
        _ => {}
    }
    if matches!(select, Select::All) {
        if let Some(note) = strangers(&policy, &stats) {
            notes.push(format!("note: {note}"));
        }
    }

    if as_json {
        println!("{:#}", plan_json(&plan));
    } else {
        print!("{}", status_table(&plan));
    }
    for note in notes {
        eprintln!("{note}");
    }
    let serving = served
        .filter(|v| !v.is_empty())
        .map(|v| format!(" (serving policy revision {v})"))
        .unwrap_or_default();
    eprintln!(
        "{}; Envoy at {}{serving}, policy revision {} from {}; requests and denials since Envoy \
         started, spend in each budget's window at {} as of its last settled request",
        summary(&policy, &select, &plan),
        admin.url(),
        policy.revision,
        path.display(),
        format_rfc3339(now),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::raw::{self, RawBudget};

    const USD: u64 = 1_000_000_000;
    /// 2026-11-24T19:21:29Z.
    const NOW: i64 = 1_795_548_089;

    fn day_start(now: i64) -> i64 {
        now - now.rem_euclid(86_400)
    }

    fn budget(limit: &str, window: &str) -> Option<RawBudget> {
        Some(RawBudget {
            limit_usd: limit.to_string(),
            window: window.to_string(),
        })
    }

    /// eng ($10 daily, dry run): alice ($5 daily), bob (no budget); ops (no team budget):
    /// carol (revoked); dave in no team ($1 lifetime).
    fn policy() -> RawPolicy {
        let mut policy = raw::parse(br#"{"version":1,"revision":7}"#).unwrap();
        policy.teams = vec![
            RawTeam {
                id: "eng".into(),
                description: Some("Engineering".into()),
                budget: budget("10", "daily"),
                enforce: Some(false),
                ..RawTeam::default()
            },
            RawTeam {
                id: "ops".into(),
                ..RawTeam::default()
            },
        ];
        let token = |id: &str, team: Option<&str>, b: Option<RawBudget>| RawToken {
            id: id.into(),
            owner: Some(format!("{id}@x")),
            team: team.map(str::to_string),
            budget: b,
            ..RawToken::default()
        };
        policy.tokens = vec![
            token("alice", Some("eng"), budget("5", "daily")),
            token("bob", Some("eng"), None),
            RawToken {
                status: raw::RawStatus::Revoked,
                ..token("carol", Some("ops"), None)
            },
            token("dave", None, budget("1", "lifetime")),
        ];
        policy
    }

    fn stat(name: &str, value: u64) -> Value {
        json!({"name": name, "value": value})
    }

    /// What Envoy answers for the policy above after some traffic today.
    fn envoy_answer() -> String {
        let today = u64::try_from(day_start(NOW)).unwrap();
        let t = |id: &str, m: &str| format!("wasmcustom.shieldkey.token_id.{id}.{m}");
        let team = |m: &str| format!("wasmcustom.shieldkey.team.eng.{m}");
        let stats = vec![
            stat(&t("alice", "requests"), 4),
            stat(&t("alice", "spend_nano_usd"), 4 * USD),
            stat(&t("alice", "budget_limit_nano_usd"), 5 * USD),
            stat(&t("alice", "budget_remaining_nano_usd"), 2 * USD),
            stat(&t("alice", "budget_spent_nano_usd"), 3 * USD),
            stat(&t("alice", "budget_window_start_seconds"), today),
            stat(&t("alice", "reason.shield_budget_exceeded.denied"), 3),
            stat(&t("alice", "reason.shield_rate_limited.denied"), 1),
            stat(&t("alice", "reason.shield_model_denied.denied"), 0),
            stat(&t("bob", "requests"), 2),
            stat(&t("bob", "spend_nano_usd"), 250_000_000),
            stat(&t("bob", "budget_limit_nano_usd"), 0),
            stat(&t("bob", "budget_remaining_nano_usd"), 0),
            stat(&t("bob", "reason.shield_team_model_denied.would_deny"), 2),
            stat(&team("requests"), 6),
            stat(&team("spend_nano_usd"), 4_250_000_000),
            stat(&team("budget_limit_nano_usd"), 10 * USD),
            stat(&team("budget_remaining_nano_usd"), 0),
            stat(&team("budget_spent_nano_usd"), 12 * USD),
            stat(&team("budget_window_start_seconds"), today),
            stat(&team("reason.shield_team_model_denied.would_deny"), 2),
            stat(&team("reason.shield_budget_exceeded.denied"), 3),
            stat(&t("gone", "requests"), 9),
            json!({"name": "extension_config_discovery.http_filter.shieldkey.version_text",
                   "value": "7"}),
            json!({"histograms": {"supported_quantiles": [0.5], "computed_quantiles": []}}),
        ];
        json!({ "stats": stats }).to_string()
    }

    #[test]
    fn envoys_stats_json_is_read_by_token_and_team() {
        let stats = EnvoyStats::parse(&envoy_answer()).unwrap();
        let alice = &stats.tokens["alice"];
        assert_eq!(
            (
                alice.requests,
                alice.spend_total,
                alice.budget_spent,
                alice.budget_window_start
            ),
            (4, 4 * USD, Some(3 * USD), Some(day_start(NOW)))
        );
        assert_eq!(
            alice.denied,
            BTreeMap::from([
                ("shield_budget_exceeded".to_string(), 3),
                ("shield_rate_limited".to_string(), 1)
            ]),
            "codes counted 0 are left out"
        );
        assert_eq!(
            stats.tokens["bob"].would_deny,
            BTreeMap::from([("shield_team_model_denied".to_string(), 2)])
        );
        assert_eq!(stats.teams["eng"].requests, 6);
        assert!(!stats.teams.contains_key("alice"));
        assert_eq!(stats.tokens["gone"].requests, 9);
        assert_eq!(stats.served["shieldkey"], "7");

        // Other stats, text readouts and malformed entries are skipped; a body that is not
        // stats JSON is an error.
        let odd = json!({"stats": [
            stat("wasmcustom.shieldkey.allowed", 5),
            stat("wasmcustom.shieldkey.token_id.x", 1),
            stat("wasmcustom.shieldkey.token_id..requests", 1),
            stat("wasmcustom.shieldkey.token_id.x.reason.shield_ip_denied.other", 1),
            stat("wasmcustom.shieldkey.model.codestral.requests", 1),
            json!({"name": "wasmcustom.shieldkey.token_id.y.requests", "value": -1}),
            json!({"name": "wasmcustom.shieldkey.token_id.y.requests", "value": "3"}),
            json!({"value": 3}),
        ]})
        .to_string();
        let stats = EnvoyStats::parse(&odd).unwrap();
        assert!(stats.tokens.values().all(|s| *s == SubjectStats::default()));
        assert!(stats.teams.is_empty());
        for bad in ["", "x: 1", "{\"stats\": 3}", "[]"] {
            assert!(EnvoyStats::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn spend_counts_only_when_the_last_settlement_was_in_the_current_window() {
        let today = day_start(NOW);
        let settled = |spent: Option<u64>, start: Option<i64>| SubjectStats {
            budget_limit: Some(5 * USD),
            budget_remaining: Some(5 * USD - 3 * USD),
            budget_spent: spent,
            budget_window_start: start,
            ..SubjectStats::default()
        };
        let known = |spent| WindowSpend { spent, known: true };
        // This window: the spent gauge, uncapped (a dry-run budget may pass its limit).
        assert_eq!(
            window_spend(&settled(Some(3 * USD), Some(today)), today),
            known(3 * USD)
        );
        assert_eq!(
            window_spend(&settled(Some(7 * USD), Some(today)), today),
            known(7 * USD)
        );
        // The window rolled since: nothing settled in this one yet.
        assert_eq!(
            window_spend(&settled(Some(3 * USD), Some(today - 86_400)), today),
            known(0)
        );
        // Never settled (the gauges exist from the token's first request, at 0): a day window
        // never starts at 0, a lifetime window does and its spent gauge is 0.
        let fresh = SubjectStats {
            budget_limit: Some(0),
            budget_remaining: Some(0),
            budget_spent: Some(0),
            budget_window_start: Some(0),
            ..SubjectStats::default()
        };
        assert_eq!(window_spend(&fresh, today), known(0));
        assert_eq!(window_spend(&fresh, 0), known(0));
        assert_eq!(window_spend(&SubjectStats::default(), today), known(0));
        // Without the spent gauge: limit − remaining.
        assert_eq!(
            window_spend(&settled(None, Some(today)), today),
            known(3 * USD)
        );
        // An older filter (no window gauge): limit − remaining, window unknown.
        assert_eq!(
            window_spend(&settled(None, None), today),
            WindowSpend {
                spent: 3 * USD,
                known: false
            }
        );
    }

    #[test]
    fn bars_and_percentages() {
        assert_eq!(bar(percent(7 * USD, 10 * USD)), "[#######---] 70%");
        assert_eq!(bar(percent(0, 10 * USD)), "[----------] 0%");
        assert_eq!(bar(percent(999, 10_000)), "[----------] 9%");
        assert_eq!(bar(percent(10 * USD, 10 * USD)), "[##########] 100%");
        assert_eq!(bar(percent(13 * USD, 10 * USD)), "[##########] 130%");
        assert_eq!(
            bar(percent(0, 0)),
            "[##########] 100%",
            "nothing fits a $0 limit"
        );
        assert_eq!(percent(u64::MAX, 1), u64::MAX);
        assert_eq!(percent(u64::MAX, u64::MAX), 100);
        assert_eq!(counts_text(&BTreeMap::new()), "-");
        assert_eq!(
            counts_text(&BTreeMap::from([
                ("shield_budget_exceeded".into(), 3),
                ("shield_rate_limited".into(), 1)
            ])),
            "budget_exceeded:3 rate_limited:1"
        );
    }

    #[test]
    fn rows_are_grouped_by_team_with_their_stats() {
        let policy = policy();
        let stats = EnvoyStats::parse(&envoy_answer()).unwrap();
        let plan = plan(&policy, &Select::All, &stats, NOW).unwrap();
        let text = status_table(&plan);
        let lines: Vec<Vec<&str>> = text
            .lines()
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(
            lines[0],
            [
                "TOKEN",
                "OWNER",
                "STATUS",
                "WINDOW",
                "SPENT",
                "LIMIT",
                "USED",
                "REMAINING",
                "RESETS",
                "REQUESTS",
                "DENIED",
                "WOULD_DENY"
            ],
            "{text}"
        );
        let reset = format_rfc3339(day_start(NOW) + 86_400);
        assert_eq!(
            lines[1],
            [
                "team",
                "eng",
                "-",
                "dry-run",
                "daily",
                "$12.00",
                "$10.00",
                "[##########]",
                "120%",
                "-$2.00",
                &reset,
                "6",
                "budget_exceeded:3",
                "team_model_denied:2"
            ],
            "{text}"
        );
        assert_eq!(
            lines[2],
            [
                "alice",
                "alice@x",
                "active",
                "daily",
                "$3.00",
                "$5.00",
                "[######----]",
                "60%",
                "$2.00",
                &reset,
                "4",
                "budget_exceeded:3",
                "rate_limited:1",
                "-"
            ],
            "{text}"
        );
        assert!(
            text.lines().nth(2).unwrap().starts_with("  alice "),
            "{text}"
        );
        // No budget: the spend since Envoy started, no limit, no window.
        assert_eq!(
            lines[3],
            [
                "bob",
                "bob@x",
                "active",
                "-",
                "$0.25",
                "-",
                "-",
                "-",
                "-",
                "2",
                "-",
                "team_model_denied:2"
            ],
            "{text}"
        );
        assert_eq!(lines[4][..4], ["team", "ops", "-", "active"], "{text}");
        assert_eq!(lines[5][..3], ["carol", "carol@x", "revoked"], "{text}");
        assert_eq!(lines[6], ["(no", "team)"]);
        // Never used on this Envoy: nothing spent, nothing counted.
        assert_eq!(
            lines[7],
            [
                "dave",
                "dave@x",
                "active",
                "lifetime",
                "$0.00",
                "$1.00",
                "[----------]",
                "0%",
                "$1.00",
                "-",
                "0",
                "-",
                "-"
            ],
            "{text}"
        );
        assert_eq!(lines.len(), 8);
        assert_eq!(summary(&policy, &Select::All, &plan), "2 teams, 4 tokens");
        assert!(strangers(&policy, &stats)
            .unwrap()
            .contains("1 token (gone)"));

        // One team: it and all its members; one token: its row alone.
        let one = super::plan(&policy, &Select::Team("eng".into()), &stats, NOW).unwrap();
        assert_eq!(
            one.tokens().map(|t| t.row.id.as_str()).collect::<Vec<_>>(),
            ["alice", "bob"]
        );
        let alone = super::plan(&policy, &Select::Token("dave".into()), &stats, NOW).unwrap();
        let text = status_table(&alone);
        assert!(!text.contains("WOULD_DENY"), "{text}");
        assert!(text.lines().nth(1).unwrap().starts_with("dave "), "{text}");
        assert!(super::plan(&policy, &Select::Token("nobody".into()), &stats, NOW).is_err());
    }

    #[test]
    fn json_has_the_fleet_shape_with_this_envoys_stats() {
        let policy = policy();
        let stats = EnvoyStats::parse(&envoy_answer()).unwrap();
        let doc = plan_json(&plan(&policy, &Select::All, &stats, NOW).unwrap());
        let today = day_start(NOW);
        assert_eq!(
            doc["teams"][0],
            json!({
                "id": "eng", "description": "Engineering", "status": "dry-run",
                "window": "daily", "window_start": today, "resets_at": today + 86_400,
                "limit_nano_usd": 10 * USD, "spent_nano_usd": 12 * USD,
                "remaining_nano_usd": -2_000_000_000i64, "percent": 120,
                "spend_total_nano_usd": 4_250_000_000u64, "requests": 6,
                "denied": {"shield_budget_exceeded": 3},
                "would_deny": {"shield_team_model_denied": 2},
                "members": ["alice", "bob"],
            })
        );
        assert_eq!(doc["teams"][1]["status"], "active");
        assert_eq!(doc["teams"][1]["limit_nano_usd"], Value::Null);
        let tokens = doc["tokens"].as_array().unwrap();
        assert_eq!(
            tokens
                .iter()
                .map(|t| t["id"].as_str().unwrap())
                .collect::<Vec<_>>(),
            ["alice", "bob", "carol", "dave"]
        );
        assert_eq!(
            tokens[0],
            json!({
                "id": "alice", "owner": "alice@x", "team": "eng", "status": "active",
                "window": "daily", "window_start": today, "resets_at": today + 86_400,
                "limit_nano_usd": 5 * USD, "spent_nano_usd": 3 * USD,
                "remaining_nano_usd": 2 * USD, "percent": 60,
                "spend_total_nano_usd": 4 * USD, "requests": 4,
                "denied": {"shield_budget_exceeded": 3, "shield_rate_limited": 1},
                "would_deny": {},
            })
        );
        assert_eq!(
            tokens[1],
            json!({
                "id": "bob", "owner": "bob@x", "team": "eng", "status": "active",
                "window": null, "window_start": 0, "resets_at": null,
                "limit_nano_usd": null, "spent_nano_usd": 250_000_000u64,
                "remaining_nano_usd": null, "percent": null,
                "spend_total_nano_usd": 250_000_000u64, "requests": 2,
                "denied": {}, "would_deny": {"shield_team_model_denied": 2},
            })
        );
        assert_eq!(tokens[2]["status"], "revoked");
        assert_eq!(
            (
                &tokens[3]["window"],
                &tokens[3]["resets_at"],
                &tokens[3]["spent_nano_usd"]
            ),
            (&json!("lifetime"), &Value::Null, &json!(0))
        );
    }

    #[test]
    fn statuses_follow_the_policy() {
        let mut policy = policy();
        let carol = policy.tokens[2].clone();
        assert_eq!(token_status(&policy, &carol, NOW), "revoked");
        let mut t = policy.tokens[0].clone();
        t.expires_at = Some("2026-01-01T00:00:00Z".into());
        assert_eq!(token_status(&policy, &t, NOW), "expired");
        t.expires_at = None;
        t.not_before = Some("2027-01-01T00:00:00Z".into());
        assert_eq!(token_status(&policy, &t, NOW), "not-yet-valid");
        t.not_before = None;
        assert_eq!(token_status(&policy, &t, NOW), "active");
        t.enforce = Some(false);
        assert_eq!(token_status(&policy, &t, NOW), "dry-run");
        t.enforce = None;
        policy.enforce = Some(false);
        assert_eq!(token_status(&policy, &t, NOW), "dry-run", "policy-wide");
        assert_eq!(token_status(&policy, &carol, NOW), "revoked");
        assert_eq!(team_status(&policy, policy.teams.get(1)), "dry-run");
        assert_eq!(team_status(&policy, None), "-");
    }

    #[test]
    fn the_stats_query_is_escaped() {
        assert_eq!(query_escape(r"^a\.b(c|d)"), "%5Ea%5C.b%28c%7Cd%29");
    }
}
