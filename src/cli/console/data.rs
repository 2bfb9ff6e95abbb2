//! What the console's pages show, gathered the way `shieldkey status` and `shieldkey audit`
//! gather it: the policy (file or etcd), spend and counters from one Envoy's admin stats (or the
//! fleet's ledger in etcd), and the newest records of the audit log. Never a digest, a sealed
//! key or any secret: rows are built from chosen fields only.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use super::super::audit::{read_log, Record};
use super::super::error::CliError;
use super::super::policy_store::PolicyStore;
use super::super::status_admin::{self, team_status, token_status};
use super::super::status_common::{current_window, layout, Select, TeamRef};
use super::Config;
use crate::config::raw::{RawPolicy, RawToken};
use crate::money::NanoUsd;

/// How much of the end of the audit log is read (its newest records).
pub const AUDIT_TAIL_BYTES: u64 = 16 << 20;
/// Audit records shown on a token's page.
pub const RECENT_RECORDS: usize = 50;

/// One team's or token's line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Row {
    pub id: String,
    pub owner: Option<String>,
    pub team: Option<String>,
    pub status: String,
    /// The budget window as the policy spells it.
    pub window: Option<String>,
    pub limit: Option<NanoUsd>,
    /// When the current window ends (Unix seconds).
    pub resets_at: Option<i64>,
    /// Spend in the current window (with a budget; since Envoy started without one); `None`
    /// when no Envoy or ledger was read.
    pub spent: Option<NanoUsd>,
    pub requests: Option<u64>,
    pub denied: BTreeMap<String, u64>,
    pub would_deny: BTreeMap<String, u64>,
    /// Fleet mode: Envoys that reported spend in the window.
    pub envoys: Option<u64>,
    /// The time of the newest audit record of this token.
    pub last_use: Option<String>,
}

impl Row {
    /// Percent of the limit spent, rounded down; a limit of 0 is full.
    pub fn percent(&self) -> Option<u64> {
        let (spent, limit) = (self.spent?, self.limit?);
        if limit == 0 {
            return Some(100);
        }
        u64::try_from(u128::from(spent) * 100 / u128::from(limit)).ok()
    }
}

/// A team's row and its members' rows; `team: None` for tokens in no team.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    pub team: Option<Row>,
    pub tokens: Vec<Row>,
}

/// Where the numbers come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// One Envoy's admin stats, and the revision it serves (`""` before any).
    Envoy { url: String, served: Option<String> },
    /// The fleet's ledger in etcd.
    Ledger,
    /// Nothing was read: no `--admin`.
    None,
}

/// The tokens overview.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overview {
    pub revision: u64,
    pub grouped: bool,
    pub groups: Vec<Group>,
    pub source: Source,
    /// Warnings to show (an unreadable audit log, an Envoy serving another revision, ...).
    pub notes: Vec<String>,
    pub upstream_keys: Vec<String>,
    pub teams: Vec<String>,
}

/// The fields of a `status --json` row the console uses.
#[derive(Debug, Default, Deserialize)]
struct Live {
    #[serde(default)]
    spent_nano_usd: Option<NanoUsd>,
    #[serde(default)]
    requests: Option<u64>,
    #[serde(default)]
    denied: BTreeMap<String, u64>,
    #[serde(default)]
    would_deny: BTreeMap<String, u64>,
    #[serde(default)]
    envoys: Option<u64>,
}

/// `status --json`'s rows by id: (teams, tokens).
type LiveRows = (BTreeMap<String, Live>, BTreeMap<String, Live>);

fn live_rows(doc: &Value) -> LiveRows {
    let rows = |key: &str| -> BTreeMap<String, Live> {
        doc.get(key)
            .and_then(Value::as_array)
            .map(|list| {
                list.iter()
                    .filter_map(|row| {
                        let id = row.get("id")?.as_str()?.to_string();
                        let live = Live::deserialize(row).ok()?;
                        Some((id, live))
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    (rows("teams"), rows("tokens"))
}

fn fill(row: &mut Row, live: Option<&Live>, have_live: bool) {
    if !have_live {
        return;
    }
    let Some(live) = live else {
        row.spent = Some(0);
        row.requests = Some(0);
        return;
    };
    row.spent = Some(live.spent_nano_usd.unwrap_or(0));
    row.requests = live.requests;
    row.denied = live.denied.clone();
    row.would_deny = live.would_deny.clone();
    row.envoys = live.envoys;
}

fn token_row(policy: &RawPolicy, token: &RawToken, now: i64) -> Result<Row, CliError> {
    let (budget, _) = current_window(token.budget.as_ref(), &format!("token '{}'", token.id), now)?;
    Ok(Row {
        id: token.id.clone(),
        owner: token.owner.clone(),
        team: token.team.clone(),
        status: token_status(policy, token, now).to_string(),
        window: budget.as_ref().map(|b| b.window.clone()),
        limit: budget.as_ref().map(|b| b.limit),
        resets_at: budget.as_ref().and_then(|b| b.kind.reset_at(now)),
        ..Row::default()
    })
}

/// The rows of every team and token in `status`'s layout, filled from `live` when given.
pub fn rows(
    policy: &RawPolicy,
    live: Option<&Value>,
    now: i64,
) -> Result<(bool, Vec<Group>), CliError> {
    let have_live = live.is_some();
    let (live_teams, live_tokens) = live.map(live_rows).unwrap_or_default();
    let plan = layout(policy, &Select::All)?;
    let mut groups = Vec::new();
    for group in plan.groups {
        let team = match group.team {
            None => None,
            Some(TeamRef { id, team }) => {
                let (budget, _) = current_window(
                    team.and_then(|t| t.budget.as_ref()),
                    &format!("team '{id}'"),
                    now,
                )?;
                let mut row = Row {
                    id: id.to_string(),
                    owner: None,
                    status: team_status(policy, team).to_string(),
                    window: budget.as_ref().map(|b| b.window.clone()),
                    limit: budget.as_ref().map(|b| b.limit),
                    resets_at: budget.as_ref().and_then(|b| b.kind.reset_at(now)),
                    ..Row::default()
                };
                fill(&mut row, live_teams.get(id), have_live);
                Some(row)
            }
        };
        let mut tokens = Vec::new();
        for token in group.tokens {
            let mut row = token_row(policy, token, now)?;
            fill(&mut row, live_tokens.get(&token.id), have_live);
            tokens.push(row);
        }
        groups.push(Group { team, tokens });
    }
    Ok((plan.grouped, groups))
}

/// The newest records of the audit log at `path` (its last `max_bytes`), in the order written;
/// a first line cut by the start of that tail is skipped.
pub fn read_audit_tail(path: &Path, max_bytes: u64) -> Result<Vec<Record>, String> {
    let mut file = File::open(path).map_err(|e| format!("cannot read the audit log: {e}"))?;
    let len = file
        .metadata()
        .map_err(|e| format!("cannot read the audit log: {e}"))?
        .len();
    let start = len.saturating_sub(max_bytes);
    file.seek(SeekFrom::Start(start))
        .map_err(|e| format!("cannot read the audit log: {e}"))?;
    let mut reader = BufReader::new(file.take(max_bytes));
    if start > 0 {
        let mut skipped = Vec::new();
        std::io::BufRead::read_until(&mut reader, b'\n', &mut skipped)
            .map_err(|e| format!("cannot read the audit log: {e}"))?;
    }
    read_log(reader)
        .map(|(records, _)| records)
        .map_err(|e| format!("cannot read the audit log: {e}"))
}

/// The time of each token's newest record.
pub fn last_uses(records: &[Record]) -> BTreeMap<String, (i64, String)> {
    let mut last: BTreeMap<String, (i64, String)> = BTreeMap::new();
    for r in records {
        let (Some(token), Some(time)) = (r.text("token_id"), r.text("time")) else {
            continue;
        };
        let newer = last.get(token).is_none_or(|(ms, _)| r.time_ms >= *ms);
        if newer {
            last.insert(token.to_string(), (r.time_ms, time.to_string()));
        }
    }
    last
}

/// A token's newest records, newest first.
pub fn recent_records<'r>(records: &'r [Record], token: &str, count: usize) -> Vec<&'r Record> {
    let mut mine: Vec<&Record> = records
        .iter()
        .filter(|r| r.text("token_id") == Some(token))
        .collect();
    mine.sort_by_key(|r| std::cmp::Reverse(r.time_ms));
    mine.truncate(count);
    mine
}

/// Everything the pages show: the policy, and the rows with what was read.
pub struct Snapshot {
    pub policy: RawPolicy,
    pub overview: Overview,
    pub records: Vec<Record>,
}

/// Reads the policy, the stats (Envoy's or the ledger's) and the audit log's tail.
pub fn snapshot(config: &Config, store: &mut PolicyStore, now: i64) -> Result<Snapshot, CliError> {
    let policy = store.load()?.policy;
    let mut notes = Vec::new();
    let (live, source) = if let Some(fleet) = &config.fleet {
        match super::super::status::fleet_snapshot(
            &fleet.urls,
            &fleet.prefix,
            fleet.user.clone(),
            &policy,
            now,
        ) {
            Ok((doc, warnings)) => {
                notes.extend(warnings);
                (Some(doc), Source::Ledger)
            }
            Err(e) => {
                notes.push(format!("spend could not be read from the ledger: {e}"));
                (None, Source::None)
            }
        }
    } else if let Some(admin) = &config.admin {
        match status_admin::snapshot(&policy, admin, &config.filter_name, now) {
            Ok((doc, served)) => {
                match &served {
                    Some(v) if v.is_empty() => notes.push(
                        "Envoy has not accepted any ShieldKey configuration yet: it answers \
                         every request with 500"
                            .to_string(),
                    ),
                    Some(v) if *v != policy.revision.to_string() => notes.push(format!(
                        "Envoy serves policy revision {v}, the policy is at revision {}: \
                         statuses and limits follow the policy (publish it to apply it)",
                        policy.revision
                    )),
                    _ => {}
                }
                (
                    Some(doc),
                    Source::Envoy {
                        url: admin.url().to_string(),
                        served,
                    },
                )
            }
            Err(e) => {
                notes.push(format!("{e}"));
                (None, Source::None)
            }
        }
    } else {
        (None, Source::None)
    };
    let records = match &config.audit_log {
        None => Vec::new(),
        Some(path) => match read_audit_tail(path, AUDIT_TAIL_BYTES) {
            Ok(records) => records,
            Err(e) => {
                notes.push(format!("{e} ({})", path.display()));
                Vec::new()
            }
        },
    };
    let (grouped, mut groups) = rows(&policy, live.as_ref(), now)?;
    if config.audit_log.is_some() {
        let last = last_uses(&records);
        for row in groups.iter_mut().flat_map(|g| g.tokens.iter_mut()) {
            row.last_use = last.get(&row.id).map(|(_, t)| t.clone());
        }
    }
    let overview = Overview {
        revision: policy.revision,
        grouped,
        groups,
        source,
        notes,
        upstream_keys: policy.upstream_keys.iter().map(|k| k.id.clone()).collect(),
        teams: policy.teams.iter().map(|t| t.id.clone()).collect(),
    };
    Ok(Snapshot {
        policy,
        overview,
        records,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::audit::parse_line;
    use crate::cli::audit::Line;
    use crate::config::raw::{RawBudget, RawStatus, RawTeam};
    use serde_json::json;

    fn policy() -> RawPolicy {
        let empty = crate::config::raw::parse(br#"{"version":1}"#).unwrap();
        RawPolicy {
            revision: 7,
            teams: vec![RawTeam {
                id: "eng".into(),
                ..RawTeam::default()
            }],
            tokens: vec![
                RawToken {
                    id: "ann".into(),
                    digest: "SECRET-DIGEST".into(),
                    owner: Some("ann@x".into()),
                    team: Some("eng".into()),
                    budget: Some(RawBudget {
                        limit_usd: "2".into(),
                        window: "daily".into(),
                    }),
                    ..RawToken::default()
                },
                RawToken {
                    id: "bob".into(),
                    status: RawStatus::Revoked,
                    ..RawToken::default()
                },
            ],
            ..empty
        }
    }

    #[test]
    fn rows_follow_status_layout_and_its_numbers() {
        let live = json!({
            "teams": [{"id": "eng", "spent_nano_usd": 5, "requests": 1}],
            "tokens": [{"id": "ann", "spent_nano_usd": 500_000_000u64, "requests": 3,
                        "denied": {"shield_budget_exceeded": 2}}],
        });
        let (grouped, groups) = rows(&policy(), Some(&live), 86_400 * 100 + 5).unwrap();
        assert!(grouped);
        assert_eq!(groups.len(), 2);
        let eng = groups[0].team.as_ref().unwrap();
        assert_eq!((eng.id.as_str(), eng.spent), ("eng", Some(5)));
        let ann = &groups[0].tokens[0];
        assert_eq!(ann.owner.as_deref(), Some("ann@x"));
        assert_eq!(
            (ann.spent, ann.limit),
            (Some(500_000_000), Some(2_000_000_000))
        );
        assert_eq!(ann.percent(), Some(25));
        assert_eq!(ann.resets_at, Some(86_400 * 101));
        assert_eq!(ann.denied.get("shield_budget_exceeded"), Some(&2));
        // Not in Envoy's stats: nothing spent.
        let bob = &groups[1].tokens[0];
        assert_eq!(
            (bob.status.as_str(), bob.spent, bob.requests),
            ("revoked", Some(0), Some(0))
        );
        // Without live numbers: unknown, not zero.
        let (_, groups) = rows(&policy(), None, 0).unwrap();
        assert_eq!(groups[0].tokens[0].spent, None);
        assert_eq!(groups[0].tokens[0].percent(), None);
    }

    fn record(token: &str, time: &str) -> Record {
        let line = json!({"time": time, "token_id": token, "decision": "allowed"}).to_string();
        match parse_line(line.as_bytes()) {
            Line::Record(r) => r,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn last_use_and_recent_records_are_the_newest() {
        let records = vec![
            record("ann", "2026-01-01T00:00:02.000Z"),
            record("bob", "2026-01-01T00:00:01.000Z"),
            record("ann", "2026-01-01T00:00:03.000Z"),
            record("ann", "2026-01-01T00:00:01.000Z"),
        ];
        let last = last_uses(&records);
        assert_eq!(last["ann"].1, "2026-01-01T00:00:03.000Z");
        assert_eq!(last["bob"].1, "2026-01-01T00:00:01.000Z");
        let recent = recent_records(&records, "ann", 2);
        let times: Vec<_> = recent.iter().map(|r| r.text("time").unwrap()).collect();
        assert_eq!(
            times,
            ["2026-01-01T00:00:03.000Z", "2026-01-01T00:00:02.000Z"]
        );
    }

    #[test]
    fn the_audit_tail_skips_a_cut_first_line() {
        let dir =
            std::env::temp_dir().join(format!("shieldkey-console-tail-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("audit.log");
        let a = json!({"time": "2026-01-01T00:00:01Z", "token_id": "a"}).to_string();
        let b = json!({"time": "2026-01-01T00:00:02Z", "token_id": "b"}).to_string();
        std::fs::write(&path, format!("{a}\n{b}\n")).unwrap();
        let all = read_audit_tail(&path, 1 << 20).unwrap();
        assert_eq!(all.len(), 2);
        let tail = read_audit_tail(&path, u64::try_from(b.len() + 5).unwrap()).unwrap();
        assert_eq!(tail.len(), 1);
        assert_eq!(tail[0].text("token_id"), Some("b"));
        assert!(read_audit_tail(&dir.join("missing"), 10).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
