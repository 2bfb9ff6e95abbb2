//! `team create|limit|list|remove` and the policy-wide `enforce` switch.
//!
//! A team has the rule fields a token has (`rule_flags` sets them the same way) plus a
//! description; tokens join it with `mint --team` / `limit --team`. In fleet mode each team is
//! one etcd key, `<prefix>policy/teams/<id>`, and every scoped read loads all of them
//! (`policy_store::Scope`), so any change can check the team a token names.

use serde_json::json;

use super::args::Args;
use super::commands::{change, enforce_text, publish_options, Context};
use super::error::{failed, usage, CliError};
use super::policy_store::Scope;
use super::rule_flags::RuleFlags;
use crate::config::raw::{RawPolicy, RawStatus, RawTeam, RawToken};
use crate::config::token_rules::RawTokenRules;
use crate::team;

pub fn team(ctx: &mut Context, mut args: Args) -> Result<(), CliError> {
    let what = args.positional("team command (create, limit, list or remove)")?;
    match what.as_str() {
        "create" => create(ctx, args),
        "limit" => limit(ctx, args),
        "list" => list(ctx, args),
        "remove" => remove(ctx, args),
        other => Err(usage(format!(
            "unknown team command '{other}': choose create, limit, list or remove"
        ))),
    }
}

fn team_id(args: &mut Args) -> Result<String, CliError> {
    let id = args.positional("team id")?;
    team::validate_id(&id).map_err(|m| usage(format!("team id '{id}': {m}")))?;
    Ok(id)
}

/// `--description D`: `None` when absent, `Some(None)` for `none` (remove it), else the text.
fn description(args: &mut Args) -> Result<Option<Option<String>>, CliError> {
    match args.option("description")? {
        None => Ok(None),
        Some(d) if d == "none" => Ok(Some(None)),
        Some(d) if d.is_empty() => Err(usage(
            "--description must not be empty (the value none removes it)",
        )),
        Some(d) if d.len() > team::MAX_DESCRIPTION_LEN => Err(usage(format!(
            "--description: at most {} bytes",
            team::MAX_DESCRIPTION_LEN
        ))),
        Some(d) => Ok(Some(Some(d))),
    }
}

fn team_mut<'p>(policy: &'p mut RawPolicy, id: &str) -> Result<&'p mut RawTeam, CliError> {
    policy
        .teams
        .iter_mut()
        .find(|t| t.id == id)
        .ok_or_else(|| failed(format!("no team with id '{id}' (see shieldkey team list)")))
}

/// `team create ID [--description D] [rule flags]`.
fn create(ctx: &mut Context, mut args: Args) -> Result<(), CliError> {
    let publish = publish_options(&mut args, "publish")?;
    let description = description(&mut args)?;
    let rules = RuleFlags::take(&mut args)?;
    let id = team_id(&mut args)?;
    args.finish()?;
    // No token can name a team that does not exist yet: the tokens need not be read.
    change(ctx, publish, Scope::NoTokens, false, |policy, _| {
        if policy.teams.iter().any(|t| t.id == id) {
            return Err(failed(format!(
                "a team with id '{id}' exists (change it with shieldkey team limit {id})"
            )));
        }
        let mut created = RawTeam {
            id: id.clone(),
            description: description.clone().flatten(),
            ..RawTeam::default()
        };
        rules.clone().apply(&mut created)?;
        policy.teams.push(created);
        Ok(format!("created team '{id}'"))
    })
}

/// `team limit ID [rule flags] [--description D]`: the same semantics as `limit` for a token
/// (a flag sets a field, `none` removes it, untouched fields stay).
fn limit(ctx: &mut Context, mut args: Args) -> Result<(), CliError> {
    let publish = publish_options(&mut args, "publish")?;
    let description = description(&mut args)?;
    let rules = RuleFlags::take(&mut args)?;
    let id = team_id(&mut args)?;
    args.finish()?;
    if rules.is_empty() && description.is_none() {
        return Err(usage(
            "nothing to change: give at least one rule flag or --description (see --help)",
        ));
    }
    // A team's rules do not depend on its members: the tokens need not be read.
    change(ctx, publish, Scope::NoTokens, false, |policy, _| {
        let team = team_mut(policy, &id)?;
        rules.clone().apply(&mut *team)?;
        if let Some(d) = &description {
            team.description = d.clone();
        }
        Ok(format!("changed team '{id}'"))
    })
}

/// `team remove ID`: only a team no token names. There is no `--force`: removing a team from
/// under its members would silently lift the team's limits from them, so they are moved
/// (`limit ID --team OTHER`), taken out (`limit ID --no-team`) or removed first.
fn remove(ctx: &mut Context, mut args: Args) -> Result<(), CliError> {
    let publish = publish_options(&mut args, "publish")?;
    if args.flag("force") {
        return Err(usage(
            "team remove has no --force: removing a team from under its members would lift its \
             limits from them; move them (shieldkey limit ID --team OTHER), take them out \
             (shieldkey limit ID --no-team) or remove them first; nothing was changed",
        ));
    }
    let id = team_id(&mut args)?;
    args.finish()?;
    // Every token is read: the change must know whether any still names the team.
    change(ctx, publish, Scope::Whole, false, |policy, _| {
        team_mut(policy, &id)?;
        let members: Vec<&str> = policy
            .tokens
            .iter()
            .filter(|t| t.team.as_deref() == Some(id.as_str()))
            .map(|t| t.id.as_str())
            .collect();
        if !members.is_empty() {
            return Err(failed(format!(
                "team '{id}' still has {} member token{}: {}; move them (shieldkey limit ID \
                 --team OTHER), take them out (shieldkey limit ID --no-team) or remove them \
                 first; nothing was changed",
                members.len(),
                if members.len() == 1 { "" } else { "s" },
                members.join(", ")
            )));
        }
        policy.teams.retain(|t| t.id != id);
        Ok(format!("removed team '{id}'"))
    })
}

/// A team's members, by status.
struct Members<'p> {
    ids: Vec<&'p str>,
    active: usize,
    revoked: usize,
}

fn members<'p>(tokens: &'p [RawToken], team: &str) -> Members<'p> {
    let mut m = Members {
        ids: Vec::new(),
        active: 0,
        revoked: 0,
    };
    for t in tokens.iter().filter(|t| t.team.as_deref() == Some(team)) {
        m.ids.push(&t.id);
        match t.status {
            RawStatus::Active => m.active += 1,
            RawStatus::Revoked => m.revoked += 1,
        }
    }
    m
}

/// One line of what a team's (or token's) rules are, `none` when it has none. `enforce` is shown
/// by its own column.
pub(super) fn rules_summary(rules: &RawTokenRules) -> String {
    let mut parts = Vec::new();
    if let Some(b) = &rules.budget {
        parts.push(format!("budget {} USD {}", b.limit_usd, b.window));
    }
    if let Some(r) = &rules.rate_limit {
        if let Some(n) = r.requests_per_minute {
            parts.push(format!("rpm {n}"));
        }
        if let Some(n) = r.tokens_per_minute {
            parts.push(format!("tpm {n}"));
        }
    }
    if let Some(c) = &rules.source_cidrs {
        parts.push(format!("cidrs {}", c.join(",")));
    }
    if let Some(c) = &rules.countries {
        if let Some(allow) = &c.allow {
            parts.push(format!("countries allow {}", allow.join(",")));
        }
        if let Some(deny) = &c.deny {
            parts.push(format!("countries deny {}", deny.join(",")));
        }
        if let Some(unknown) = &c.unknown {
            parts.push(format!("unknown country {unknown}"));
        }
    }
    if let Some(m) = &rules.models {
        if let Some(allow) = &m.allow {
            parts.push(format!("models {}", allow.join(",")));
        }
        if let Some(n) = m.max_tokens {
            parts.push(format!("max_tokens {n}"));
        }
    }
    if let Some(s) = &rules.scopes {
        parts.push(format!("scopes {}", s.join(",")));
    }
    if rules.allow_unmetered == Some(true) {
        parts.push("allow_unmetered".to_string());
    }
    if parts.is_empty() {
        "none".to_string()
    } else {
        parts.join("; ")
    }
}

/// `team list [--json]`: every team, its rules, enforce state and members.
fn list(ctx: &mut Context, mut args: Args) -> Result<(), CliError> {
    let as_json = args.flag("json");
    args.finish()?;
    // Every token is read, to count the members.
    let policy = ctx.store.load()?.policy;
    if as_json {
        let mut teams = Vec::with_capacity(policy.teams.len());
        for t in &policy.teams {
            let m = members(&policy.tokens, &t.id);
            let mut entry = serde_json::to_value(t)
                .map_err(|e| failed(format!("cannot encode team '{}': {e}", t.id)))?;
            if let Some(fields) = entry.as_object_mut() {
                fields.insert("enforce".into(), json!(t.enforce != Some(false)));
                fields.insert("members".into(), json!(m.ids.len()));
                fields.insert("active".into(), json!(m.active));
                fields.insert("revoked".into(), json!(m.revoked));
                fields.insert("member_ids".into(), json!(m.ids));
            }
            teams.push(entry);
        }
        let doc = json!({
            "revision": policy.revision,
            "enforce": policy.enforce != Some(false),
            "teams": teams,
        });
        println!("{doc:#}");
        return Ok(());
    }
    println!(
        "{:<32} {:<8} {:<7} {:<8} {:<16} DESCRIPTION",
        "ID", "MEMBERS", "ACTIVE", "REVOKED", "ENFORCE"
    );
    for t in &policy.teams {
        let m = members(&policy.tokens, &t.id);
        println!(
            "{:<32} {:<8} {:<7} {:<8} {:<16} {}",
            t.id,
            m.ids.len(),
            m.active,
            m.revoked,
            enforce_text(t.enforce),
            t.description.as_deref().unwrap_or("-")
        );
        println!("{:<32} rules: {}", "", rules_summary(&t.rules()));
    }
    let in_teams = policy.tokens.iter().filter(|t| t.team.is_some()).count();
    let mut summary = format!(
        "revision {}, {} teams, {in_teams} of {} tokens in a team",
        policy.revision,
        policy.teams.len(),
        policy.tokens.len()
    );
    if policy.enforce == Some(false) {
        summary.push_str(
            "; policy-wide enforce=false: every rule of every token and team is in dry run",
        );
    }
    eprintln!("{summary}");
    Ok(())
}

/// `enforce true|false`: the policy-wide switch (`RawPolicy.enforce`; in fleet mode it lives in
/// the settings key). Without a value, prints the current one.
pub fn enforce(ctx: &mut Context, mut args: Args) -> Result<(), CliError> {
    let publish = publish_options(&mut args, "publish")?;
    let value = match args.positional("true or false") {
        Err(_) => None,
        Ok(v) if v == "true" => Some(true),
        Ok(v) if v == "false" => Some(false),
        Ok(_) => {
            // Not echoed: like any stray argument, it may be a pasted secret.
            return Err(usage("enforce takes true or false"));
        }
    };
    args.finish()?;
    let Some(value) = value else {
        if publish.given() {
            return Err(usage("--publish needs a value to set: enforce true|false"));
        }
        let policy = ctx.store.load_scoped(&Scope::NoTokens)?.policy;
        println!("{}", policy.enforce != Some(false));
        return Ok(());
    };
    change(ctx, publish, Scope::NoTokens, false, |policy, _| {
        let was = policy.enforce != Some(false);
        policy.enforce = Some(value);
        Ok(match (was, value) {
            (_, false) => format!(
                "policy-wide enforce=false{}: every rule of every token and team is in dry run \
                 (requests they would refuse are let through and counted as would_deny; \
                 authentication is still enforced)",
                if was { "" } else { " (it already was)" }
            ),
            (true, true) => "policy-wide enforce=true (it already was): rules are enforced, \
                             except those of tokens and teams with enforce=false"
                .to_string(),
            (false, true) => "policy-wide enforce=true: rules are enforced again, except those \
                              of tokens and teams with enforce=false"
                .to_string(),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::raw::{RawBudget, RawModels, RawRateLimit};

    #[test]
    fn a_rules_summary_names_every_rule_set() {
        assert_eq!(rules_summary(&RawTokenRules::default()), "none");
        let team = RawTeam {
            id: "eng".into(),
            budget: Some(RawBudget {
                limit_usd: "25.00".into(),
                window: "monthly".into(),
            }),
            rate_limit: Some(RawRateLimit {
                requests_per_minute: Some(60),
                tokens_per_minute: None,
            }),
            models: Some(RawModels {
                allow: Some(vec!["mistral-small-*".into()]),
                max_tokens: Some(512),
            }),
            allow_unmetered: Some(true),
            enforce: Some(false),
            ..RawTeam::default()
        };
        assert_eq!(
            rules_summary(&team.rules()),
            "budget 25.00 USD monthly; rpm 60; models mistral-small-*; max_tokens 512; \
             allow_unmetered"
        );
    }

    #[test]
    fn members_are_counted_by_status() {
        let token = |id: &str, team: Option<&str>, status| RawToken {
            id: id.into(),
            team: team.map(str::to_string),
            status,
            ..RawToken::default()
        };
        let tokens = [
            token("a", Some("eng"), RawStatus::Active),
            token("b", Some("eng"), RawStatus::Revoked),
            token("c", Some("ops"), RawStatus::Active),
            token("d", None, RawStatus::Active),
        ];
        let m = members(&tokens, "eng");
        assert_eq!((m.ids, m.active, m.revoked), (vec!["a", "b"], 1, 1));
        assert!(members(&tokens, "none").ids.is_empty());
    }
}
