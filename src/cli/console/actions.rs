//! The console's actions: revoke, unrevoke, change limits, mint. Each goes through the CLI's own
//! core (`commands::set_token_status`, `change_token`, `mint_token`), publishing as the console
//! was started to (`--publish PATH [--admin URL]`, or etcd in fleet mode); form fields become the
//! CLI's rule flags and are parsed by the CLI's own parser (`RuleFlags::take`).

use serde::Deserialize;

use super::super::args::Args;
use super::super::commands::{
    change_token, mint_token, set_token_status, Changed, Context, MintSpec, TokenChange,
};
use super::super::error::CliError;
use super::super::rule_flags::RuleFlags;
use super::session::{Flash, FlashKind};
use super::Config;
use crate::config::raw::{RawStatus, RawToken};
use crate::secret::SecretBytes;

/// The change-limits form of a token's page.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct LimitsForm {
    #[serde(default)]
    pub csrf: String,
    #[serde(default)]
    pub budget_usd: String,
    #[serde(default)]
    pub budget_window: String,
    #[serde(default)]
    pub rpm: String,
    #[serde(default)]
    pub tpm: String,
    #[serde(default)]
    pub models: String,
    #[serde(default)]
    pub max_tokens: String,
    /// The team; empty: none.
    #[serde(default)]
    pub team: String,
    /// The limits the form showed (`limits_baseline`): a form opened before another change to
    /// the token is refused instead of silently undoing that change.
    #[serde(default)]
    pub baseline: String,
}

/// The mint form of the overview.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct MintForm {
    #[serde(default)]
    pub csrf: String,
    /// The one-time id of this form (`Session::use_mint_form`).
    #[serde(default)]
    pub form_id: String,
    #[serde(default)]
    pub id: String,
    #[serde(default)]
    pub upstream_key: String,
    #[serde(default)]
    pub owner: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub team: String,
    #[serde(default)]
    pub ttl: String,
    #[serde(default)]
    pub budget_usd: String,
    #[serde(default)]
    pub budget_window: String,
    #[serde(default)]
    pub rpm: String,
    #[serde(default)]
    pub tpm: String,
    #[serde(default)]
    pub models: String,
    #[serde(default)]
    pub max_tokens: String,
}

/// A form value: trimmed, `None` when empty.
fn value(text: &str) -> Option<String> {
    let t = text.trim();
    (!t.is_empty()).then(|| t.to_string())
}

/// A comma-separated list as the CLI reads it.
fn list(text: &str) -> Vec<String> {
    text.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// Rule flags from `(flag, value)` pairs, parsed by the CLI's parser. Every item is
/// `--flag=value`, so no value can be read as another flag.
fn rule_flags(pairs: &[(&str, String)]) -> Result<RuleFlags, CliError> {
    let mut args = Args::new(
        pairs
            .iter()
            .map(|(flag, v)| format!("--{flag}={v}"))
            .collect(),
    );
    let rules = RuleFlags::take(&mut args)?;
    args.finish()?;
    Ok(rules)
}

/// The current values of a token's limits, as the form shows them (with their baseline).
pub fn current_limits(token: &RawToken) -> LimitsForm {
    let mut form = shown_limits(token);
    form.baseline = limits_baseline(&form);
    form
}

/// A fingerprint of the limits a form shows: every field, SHA-256, hex.
fn limits_baseline(form: &LimitsForm) -> String {
    use sha2::{Digest, Sha256};
    let mut hash = Sha256::new();
    for field in [
        &form.budget_usd,
        &form.budget_window,
        &form.rpm,
        &form.tpm,
        &form.models,
        &form.max_tokens,
        &form.team,
    ] {
        // Length-prefixed: no two different forms hash the same text.
        hash.update((field.len() as u64).to_le_bytes());
        hash.update(field.as_bytes());
    }
    hash.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

fn shown_limits(token: &RawToken) -> LimitsForm {
    let num = |n: Option<u64>| n.map(|n| n.to_string()).unwrap_or_default();
    let rate = token.rate_limit.as_ref();
    let models = token.models.as_ref();
    LimitsForm {
        csrf: String::new(),
        budget_usd: token
            .budget
            .as_ref()
            .map(|b| b.limit_usd.clone())
            .unwrap_or_default(),
        budget_window: token
            .budget
            .as_ref()
            .map(|b| b.window.clone())
            .unwrap_or_default(),
        rpm: num(rate.and_then(|r| r.requests_per_minute)),
        tpm: num(rate.and_then(|r| r.tokens_per_minute)),
        models: models
            .and_then(|m| m.allow.as_ref())
            .map(|a| a.join(","))
            .unwrap_or_default(),
        max_tokens: num(models.and_then(|m| m.max_tokens)),
        team: token.team.clone().unwrap_or_default(),
        baseline: String::new(),
    }
}

/// What the limits form changes: only the fields that differ from the token as it is (an
/// emptied field removes that limit, `none` to the CLI). Refused when the token's limits are no
/// longer those the form showed (changed from the CLI or another page meanwhile): the form's
/// other fields would put back what was there.
pub fn limits_change(token: &RawToken, form: &LimitsForm) -> Result<TokenChange, CliError> {
    let now = current_limits(token);
    if form.baseline != now.baseline {
        return Err(super::super::error::usage(
            "the token's limits changed since this page was opened (from the CLI or another \
             page): nothing was changed; reload the page to see them, then change them again",
        ));
    }
    let mut pairs: Vec<(&str, String)> = Vec::new();
    let mut simple = |flag: &'static str, old: &str, new: &str| {
        if old.trim() != new.trim() {
            pairs.push((flag, value(new).unwrap_or_else(|| "none".to_string())));
        }
    };
    simple("rpm", &now.rpm, &form.rpm);
    simple("tpm", &now.tpm, &form.tpm);
    simple("max-tokens", &now.max_tokens, &form.max_tokens);
    if list(&now.models) != list(&form.models) {
        pairs.push((
            "models",
            if list(&form.models).is_empty() {
                "none".to_string()
            } else {
                list(&form.models).join(",")
            },
        ));
    }
    let budget_changed = now.budget_usd.trim() != form.budget_usd.trim()
        || (value(&form.budget_usd).is_some()
            && now.budget_window.trim() != form.budget_window.trim());
    if budget_changed {
        match value(&form.budget_usd) {
            None => pairs.push(("budget-usd", "none".to_string())),
            Some(usd) => {
                pairs.push(("budget-usd", usd));
                if let Some(window) = value(&form.budget_window) {
                    pairs.push(("budget-window", window));
                }
            }
        }
    }
    let rules = rule_flags(&pairs)?;
    let team = value(&form.team);
    let membership = (team != token.team).then_some(team);
    Ok(TokenChange { rules, membership })
}

/// The mint form as `mint` takes it.
pub fn mint_spec(form: &MintForm) -> Result<MintSpec, CliError> {
    let mut pairs: Vec<(&str, String)> = Vec::new();
    for (flag, text) in [
        ("budget-usd", &form.budget_usd),
        ("budget-window", &form.budget_window),
        ("rpm", &form.rpm),
        ("tpm", &form.tpm),
        ("models", &form.models),
        ("max-tokens", &form.max_tokens),
    ] {
        if let Some(v) = value(text) {
            pairs.push((flag, v));
        }
    }
    // A window alone (the form preselects one) is no budget.
    if value(&form.budget_usd).is_none() {
        pairs.retain(|(flag, _)| *flag != "budget-window");
    }
    Ok(MintSpec {
        id: form.id.trim().to_string(),
        upstream_key: form.upstream_key.trim().to_string(),
        owner: value(&form.owner),
        description: value(&form.description),
        team: value(&form.team),
        not_before: None,
        expires_at: None,
        ttl: value(&form.ttl),
        rules: rule_flags(&pairs)?,
    })
}

/// "revoked token 'a'" → "Revoked token 'a'".
fn sentence(text: &str) -> String {
    let mut chars = text.chars();
    match chars.next() {
        Some(c) => c.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// What the result page says about a written change, and how it went with Envoy.
pub fn changed_flash<T>(config: &Config, changed: &Changed<T>) -> Flash {
    let mut lines = vec![format!(
        "{} (policy revision {}).",
        sentence(&changed.done),
        changed.revision
    )];
    let mut kind = FlashKind::Ok;
    match &changed.published {
        None if config.fleet.is_some() => lines.push(
            "Written to etcd: every Envoy of the fleet applies it within its sync interval."
                .to_string(),
        ),
        None => {
            kind = FlashKind::Warn;
            lines.push(
                "Written to the policy file only, not published: start the console with \
                 --publish PATH to apply changes live."
                    .to_string(),
            );
        }
        Some(Ok(p)) => lines.push(match p.applied_after {
            Some(took) => format!(
                "Applied by Envoy: revision {} ({} ms).",
                p.revision,
                took.as_millis()
            ),
            None => format!(
                "Published revision {} (not confirmed: start the console with --admin URL to \
                 see Envoy apply it).",
                p.revision
            ),
        }),
        Some(Err(e)) => {
            kind = FlashKind::Error;
            lines.push(format!("Not applied by Envoy: {e}"));
            lines.push(format!(
                "The policy is at revision {} but Envoy does not serve it: fix the problem and \
                 publish again (shieldkey publish).",
                changed.revision
            ));
        }
    }
    Flash { kind, lines }
}

/// The flash of a change that could not be made.
pub fn failed_flash(what: &str, e: &CliError) -> Flash {
    Flash {
        kind: FlashKind::Error,
        lines: vec![format!("{what}: {e}"), "Nothing was changed.".to_string()],
    }
}

/// Revoke or unrevoke one token.
pub fn set_status(config: &Config, ctx: &mut Context, id: &str, status: RawStatus) -> Flash {
    let what = match status {
        RawStatus::Revoked => "Cannot revoke",
        RawStatus::Active => "Cannot re-enable",
    };
    match set_token_status(ctx, &config.publish, id, status) {
        Ok(changed) => changed_flash(config, &changed),
        Err(e) => failed_flash(what, &e),
    }
}

/// Change a token's limits (and team) from the form.
pub fn change_limits(config: &Config, ctx: &mut Context, id: &str, form: &LimitsForm) -> Flash {
    let token = match ctx
        .store
        .load_scoped(&super::super::policy_store::Scope::Token(id.to_string()))
    {
        Ok(loaded) => loaded.policy.tokens.into_iter().find(|t| t.id == id),
        Err(e) => return failed_flash("Cannot change the limits", &e),
    };
    let Some(token) = token else {
        return Flash {
            kind: FlashKind::Error,
            lines: vec![format!("No token with id '{id}'.")],
        };
    };
    let change = match limits_change(&token, form) {
        Ok(change) => change,
        Err(e) => return failed_flash("Cannot change the limits", &e),
    };
    if change.rules.is_empty() && change.membership.is_none() {
        return Flash {
            kind: FlashKind::Warn,
            lines: vec!["Nothing to change: the form shows the limits the token has.".to_string()],
        };
    }
    match change_token(ctx, &config.publish, id, &change) {
        Ok(changed) => changed_flash(config, &changed),
        Err(e) => failed_flash("Cannot change the limits", &e),
    }
}

/// Mint a token from the form: the flash and the token, shown once.
pub fn mint(
    config: &Config,
    ctx: &mut Context,
    form: &MintForm,
) -> Result<(Flash, SecretBytes), Flash> {
    let spec = mint_spec(form).map_err(|e| failed_flash("Cannot mint", &e))?;
    let (changed, token) =
        mint_token(ctx, &config.publish, spec).map_err(|e| failed_flash("Cannot mint", &e))?;
    Ok((changed_flash(config, &changed), token))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::raw::{RawBudget, RawModels, RawRateLimit};

    fn token() -> RawToken {
        RawToken {
            id: "ann".into(),
            budget: Some(RawBudget {
                limit_usd: "5".into(),
                window: "daily".into(),
            }),
            rate_limit: Some(RawRateLimit {
                requests_per_minute: Some(60),
                tokens_per_minute: None,
            }),
            models: Some(RawModels {
                allow: Some(vec!["mistral-small-*".into(), "mistral-embed".into()]),
                max_tokens: None,
            }),
            team: Some("eng".into()),
            ..RawToken::default()
        }
    }

    fn apply(t: &RawToken, form: &LimitsForm) -> RawToken {
        let change = limits_change(t, form).unwrap();
        let mut out = t.clone();
        change.rules.apply(&mut out).unwrap();
        if let Some(team) = change.membership {
            out.team = team;
        }
        out
    }

    #[test]
    fn an_unchanged_form_changes_nothing() {
        let t = token();
        let change = limits_change(&t, &current_limits(&t)).unwrap();
        assert!(change.rules.is_empty() && change.membership.is_none());
        // Spaces in a list are not a change.
        let mut form = current_limits(&t);
        form.models = " mistral-small-* , mistral-embed ".into();
        assert!(limits_change(&t, &form).unwrap().rules.is_empty());
    }

    #[test]
    fn changed_and_emptied_fields_set_and_remove_limits() {
        let t = token();
        let mut form = current_limits(&t);
        form.budget_usd = "7.5".into();
        form.rpm = String::new();
        form.tpm = "1000".into();
        form.max_tokens = "256".into();
        form.team = String::new();
        let out = apply(&t, &form);
        let budget = out.budget.as_ref().unwrap();
        assert_eq!(
            (budget.limit_usd.as_str(), budget.window.as_str()),
            ("7.5", "daily")
        );
        let rate = out.rate_limit.as_ref().unwrap();
        assert_eq!(
            (rate.requests_per_minute, rate.tokens_per_minute),
            (None, Some(1000))
        );
        assert_eq!(out.models.as_ref().unwrap().max_tokens, Some(256));
        assert_eq!(out.team, None);

        let mut form = current_limits(&t);
        form.budget_usd = String::new();
        form.models = String::new();
        let out = apply(&t, &form);
        assert!(out.budget.is_none() && out.models.is_none());

        let mut form = current_limits(&t);
        form.budget_window = "monthly".into();
        assert_eq!(apply(&t, &form).budget.unwrap().window, "monthly");
    }

    #[test]
    fn a_form_opened_before_another_change_is_refused_not_applied() {
        let t = token();
        // The page is opened; then the CLI tightens the rate limit.
        let mut form = current_limits(&t);
        let mut changed = t.clone();
        changed.rate_limit.as_mut().unwrap().requests_per_minute = Some(5);
        // Saving the old page (another field edited) would put the old rate limit back.
        form.max_tokens = "256".into();
        let err = limits_change(&changed, &form).unwrap_err();
        assert!(
            err.to_string()
                .contains("changed since this page was opened"),
            "{err}"
        );
        // A form without a baseline (crafted, or from an older console) is refused too.
        let mut bare = current_limits(&changed);
        bare.baseline = String::new();
        assert!(limits_change(&changed, &bare).is_err());
        // Reloaded, the same edit applies and keeps the CLI's change.
        let mut form = current_limits(&changed);
        form.max_tokens = "256".into();
        let out = apply(&changed, &form);
        assert_eq!(out.rate_limit.unwrap().requests_per_minute, Some(5));
        assert_eq!(out.models.unwrap().max_tokens, Some(256));
    }

    #[test]
    fn values_are_checked_by_the_cli_parser_and_cannot_inject_flags() {
        let t = token();
        let mut form = current_limits(&t);
        form.rpm = "lots".into();
        assert!(limits_change(&t, &form).is_err());
        let mut form = current_limits(&t);
        form.models = "--rpm=1".into();
        let out = apply(&t, &form);
        assert_eq!(
            out.models.unwrap().allow.unwrap(),
            vec!["--rpm=1".to_string()]
        );
        assert_eq!(out.rate_limit.unwrap().requests_per_minute, Some(60));
    }

    #[test]
    fn the_mint_form_becomes_mints_arguments() {
        let form = MintForm {
            id: " new ".into(),
            upstream_key: "prod".into(),
            owner: "o@x".into(),
            ttl: "30d".into(),
            budget_window: "monthly".into(),
            rpm: "10".into(),
            ..MintForm::default()
        };
        let spec = mint_spec(&form).unwrap();
        assert_eq!(
            (spec.id.as_str(), spec.owner.as_deref()),
            ("new", Some("o@x"))
        );
        assert_eq!(spec.description, None);
        let mut t = RawToken::default();
        spec.rules.apply(&mut t).unwrap();
        assert!(t.budget.is_none(), "a window alone is no budget");
        assert_eq!(t.rate_limit.unwrap().requests_per_minute, Some(10));
        assert!(mint_spec(&MintForm {
            max_tokens: "x".into(),
            ..MintForm::default()
        })
        .is_err());
    }
}
