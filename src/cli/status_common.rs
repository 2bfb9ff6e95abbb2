//! What both forms of `shieldkey status` share: which teams and tokens to show and how they are
//! grouped (`layout`), budgets as the policy states them, and the table and money formatting.
//!
//! The fleet form (`status.rs`) fills the rows from the ledger in etcd, the single-Envoy form
//! (`status_admin.rs`) from one Envoy's admin `/stats`; both lay them out the same way: when the
//! policy has teams, each team's row, its members' rows indented under it, then `(no team)` and
//! the tokens in no team.

use super::args::Args;
use super::error::{failed, usage, CliError};
use crate::budget_window::BudgetWindow;
use crate::config::raw::{RawBudget, RawPolicy, RawTeam, RawToken};
use crate::money::{format_usd, parse_usd, NanoUsd};

/// Which teams and tokens to show.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Select {
    /// Teams and tokens with a budget (and the teams of budgeted tokens).
    Budgeted,
    /// Every team and token.
    All,
    /// One token.
    Token(String),
    /// One team and all its members.
    Team(String),
}

impl Select {
    /// `[--token ID | --team ID] [--all]`; without any, `default`.
    pub(super) fn take(args: &mut Args, default: Select) -> Result<Select, CliError> {
        let one_token = args.option("token")?;
        let one_team = args.option("team")?;
        let all = args.flag("all");
        match (one_token, one_team) {
            (Some(_), Some(_)) => Err(usage(
                "--token and --team exclude each other (--team shows the team and its members)",
            )),
            (Some(id), None) => Ok(Select::Token(id)),
            (None, Some(id)) => Ok(Select::Team(id)),
            (None, None) if all => Ok(Select::All),
            (None, None) => Ok(default),
        }
    }
}

/// A budget as the policy states it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Budget {
    /// The policy's spelling (`monthly`, `hourly`, `300s`, …).
    pub window: String,
    pub kind: BudgetWindow,
    pub limit: NanoUsd,
}

impl Budget {
    pub fn lifetime(&self) -> bool {
        self.kind == BudgetWindow::Lifetime
    }
}

/// A budget and the start of its window at `now` (0 without a budget); `whom` names its owner in
/// errors (`token 'alice'`, `team 'eng'`).
pub(super) fn current_window(
    budget: Option<&RawBudget>,
    whom: &str,
    now: i64,
) -> Result<(Option<Budget>, i64), CliError> {
    let Some(budget) = budget else {
        return Ok((None, 0));
    };
    let bad = |what: &str, m: String| {
        failed(format!(
            "{whom}: budget {what}: {m} (`shieldkey check` validates the whole policy)"
        ))
    };
    let kind = BudgetWindow::parse(&budget.window).map_err(|m| bad("window", m))?;
    let limit = parse_usd(&budget.limit_usd).map_err(|m| bad("limit_usd", m))?;
    Ok((
        Some(Budget {
            window: budget.window.clone(),
            kind,
            limit,
        }),
        kind.start(now),
    ))
}

/// A team and its members' rows shown; or (`team: None`) the tokens in no team.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Group<T, R> {
    pub team: Option<T>,
    pub tokens: Vec<R>,
}

/// The rows to show, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Plan<T, R> {
    /// Rows are grouped by team (the policy has teams, or `--team`).
    pub grouped: bool,
    pub groups: Vec<Group<T, R>>,
}

impl<T, R> Plan<T, R> {
    pub fn teams(&self) -> impl Iterator<Item = &T> {
        self.groups.iter().filter_map(|g| g.team.as_ref())
    }

    pub fn tokens(&self) -> impl Iterator<Item = &R> {
        self.groups.iter().flat_map(|g| &g.tokens)
    }

    /// The same layout with every team and token turned into its row.
    pub fn try_map<T2, R2>(
        self,
        mut team: impl FnMut(T) -> Result<T2, CliError>,
        mut token: impl FnMut(R) -> Result<R2, CliError>,
    ) -> Result<Plan<T2, R2>, CliError> {
        let mut groups = Vec::with_capacity(self.groups.len());
        for group in self.groups {
            groups.push(Group {
                team: group.team.map(&mut team).transpose()?,
                tokens: group
                    .tokens
                    .into_iter()
                    .map(&mut token)
                    .collect::<Result<_, _>>()?,
            });
        }
        Ok(Plan {
            grouped: self.grouped,
            groups,
        })
    }
}

/// A team of the layout: its id, and its entry in the policy (`None`: tokens name a team the
/// policy lacks, a hand-edited policy `shieldkey check` refuses; shown, not hidden).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct TeamRef<'p> {
    pub id: &'p str,
    pub team: Option<&'p RawTeam>,
}

pub(super) fn members<'p>(
    policy: &'p RawPolicy,
    team: &'p str,
) -> impl Iterator<Item = &'p RawToken> {
    policy
        .tokens
        .iter()
        .filter(move |t| t.team.as_deref() == Some(team))
}

/// Which teams and tokens are shown, and how they are grouped.
pub(super) fn layout<'p>(
    policy: &'p RawPolicy,
    select: &Select,
) -> Result<Plan<TeamRef<'p>, &'p RawToken>, CliError> {
    match select {
        Select::Token(id) => {
            let token = policy
                .tokens
                .iter()
                .find(|t| t.id == *id)
                .ok_or_else(|| failed(format!("no token with id '{id}'")))?;
            return Ok(Plan {
                grouped: false,
                groups: vec![Group {
                    team: None,
                    tokens: vec![token],
                }],
            });
        }
        Select::Team(id) => {
            let team = policy
                .teams
                .iter()
                .find(|t| t.id == *id)
                .ok_or_else(|| failed(format!("no team with id '{id}'")))?;
            return Ok(Plan {
                grouped: true,
                groups: vec![Group {
                    team: Some(TeamRef {
                        id: &team.id,
                        team: Some(team),
                    }),
                    tokens: members(policy, &team.id).collect(),
                }],
            });
        }
        Select::Budgeted | Select::All => {}
    }
    let all = *select == Select::All;
    let shown = |t: &&RawToken| all || t.budget.is_some();
    let grouped = !policy.teams.is_empty() || policy.tokens.iter().any(|t| t.team.is_some());
    let mut groups = Vec::new();
    if grouped {
        for team in &policy.teams {
            let tokens: Vec<&RawToken> = members(policy, &team.id).filter(shown).collect();
            if all || team.budget.is_some() || !tokens.is_empty() {
                groups.push(Group {
                    team: Some(TeamRef {
                        id: &team.id,
                        team: Some(team),
                    }),
                    tokens,
                });
            }
        }
        // Tokens naming a team the policy lacks: shown under that name, not hidden.
        let mut unknown: Vec<&str> = Vec::new();
        for name in policy.tokens.iter().filter_map(|t| t.team.as_deref()) {
            if !policy.teams.iter().any(|t| t.id == name) && !unknown.contains(&name) {
                unknown.push(name);
            }
        }
        for name in unknown {
            let tokens: Vec<&RawToken> = members(policy, name).filter(shown).collect();
            if !tokens.is_empty() {
                groups.push(Group {
                    team: Some(TeamRef {
                        id: name,
                        team: None,
                    }),
                    tokens,
                });
            }
        }
    }
    let loose: Vec<&RawToken> = policy
        .tokens
        .iter()
        .filter(|t| !grouped || t.team.is_none())
        .filter(shown)
        .collect();
    if !grouped || !loose.is_empty() {
        groups.push(Group {
            team: None,
            tokens: loose,
        });
    }
    Ok(Plan { grouped, groups })
}

/// A team's line of the table.
pub(super) trait TeamLine {
    /// `false`: tokens name this team but the policy has none by that id.
    fn in_policy(&self) -> bool;
    fn cells(&self) -> Vec<String>;
}

/// A token's line of the table; `indent` sets members under their team.
pub(super) trait TokenLine {
    fn cells(&self, indent: &str) -> Vec<String>;
}

/// The lines of the plan: when grouped, each team's row, its members indented under it, then
/// `(no team)` and the tokens in no team.
pub(super) fn grouped_cells<T: TeamLine, R: TokenLine>(plan: &Plan<T, R>) -> Vec<Vec<String>> {
    let indent = if plan.grouped { "  " } else { "" };
    let mut cells: Vec<Vec<String>> = Vec::new();
    for group in &plan.groups {
        match &group.team {
            Some(team) => cells.push(team.cells()),
            None if plan.grouped => cells.push(vec!["(no team)".to_string()]),
            None => {}
        }
        cells.extend(group.tokens.iter().map(|r| r.cells(indent)));
    }
    cells
}

/// `a − b`, negative when `b` is larger (saturating at the ends of `i64`).
pub(super) fn signed_difference(a: NanoUsd, b: NanoUsd) -> i64 {
    if a >= b {
        i64::try_from(a - b).unwrap_or(i64::MAX)
    } else {
        i64::try_from(b - a).map_or(i64::MIN, |d| -d)
    }
}

pub(super) fn usd(value: NanoUsd) -> String {
    format!("${}", format_usd(value))
}

pub(super) fn signed_usd(value: i64) -> String {
    if value < 0 {
        format!("-{}", usd(value.unsigned_abs()))
    } else {
        usd(value.unsigned_abs())
    }
}

/// Columns padded to their widest cell; `right` aligns numbers.
pub(super) fn table(headers: &[&str], right: &[bool], rows: &[Vec<String>]) -> String {
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

pub(super) fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// The summary on stderr: what is shown, and what `--all` would add.
pub(super) fn summary<T: TeamLine, R>(
    policy: &RawPolicy,
    select: &Select,
    plan: &Plan<T, R>,
) -> String {
    let tokens = plan.tokens().count();
    let teams = plan.teams().filter(|t| t.in_policy()).count();
    let mut hidden = Vec::new();
    if *select == Select::Budgeted {
        let without = policy.tokens.iter().filter(|t| t.budget.is_none()).count();
        if without > 0 {
            hidden.push(format!("{without} without a budget"));
        }
        let teams_hidden = policy.teams.len().saturating_sub(teams);
        if teams_hidden > 0 {
            hidden.push(format!(
                "{} without a budget or a budgeted member",
                plural(teams_hidden, "team", "teams")
            ));
        }
    }
    let hidden = if hidden.is_empty() {
        String::new()
    } else {
        format!(" ({}: --all lists them)", hidden.join(", "))
    };
    if plan.grouped {
        format!(
            "{}, {}{hidden}",
            plural(teams, "team", "teams"),
            plural(tokens, "token", "tokens")
        )
    } else {
        format!("{tokens} token(s){hidden}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn selection_flags() {
        let take = |list: &[&str]| {
            let mut args = Args::new(list.iter().map(|s| s.to_string()).collect());
            Select::take(&mut args, Select::Budgeted)
        };
        assert_eq!(take(&[]).unwrap(), Select::Budgeted);
        assert_eq!(take(&["--all"]).unwrap(), Select::All);
        assert_eq!(
            take(&["--token", "a", "--all"]).unwrap(),
            Select::Token("a".into())
        );
        assert_eq!(
            take(&["--team", "eng"]).unwrap(),
            Select::Team("eng".into())
        );
        assert!(take(&["--team", "eng", "--token", "a"]).is_err());
    }
}
