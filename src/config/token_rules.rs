//! Compiling one token's optional rules: budget, rate limits, networks, countries, models.
//!
//! The same function compiles a token's rules when the configuration is loaded (with the field
//! path of the token for errors) and when a worker first reads the token's shared-data record
//! (whose rule section was validated at load time, so it cannot fail there in practice).

use serde::{Deserialize, Serialize};

use super::error::ConfigError;
use super::raw::{RawBudget, RawCountries, RawModels, RawRateLimit};
use crate::budget_window::BudgetWindow;
use crate::ledger::{Budget, Limits};
use crate::money;
use crate::policy::TokenRules;
use crate::routes::Scopes;
use crate::rules::country::CountryRule;
use crate::rules::model_pattern::ModelPatterns;
use crate::rules::source_ip::SourceNetworks;

super::raw::with_rule_fields! {
    /// The rule section of a token or team, as configured (what a shared-data record carries).
    /// Field names match `RawToken` and `RawTeam`.
    #[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
    #[serde(deny_unknown_fields)]
    pub struct RawTokenRules {}
}

impl RawTokenRules {
    fn is_empty(&self) -> bool {
        *self == RawTokenRules::default()
    }
}

/// `path` is the token's field path, e.g. `tokens[3]`.
pub fn compile_rules(raw: &RawTokenRules, path: &str) -> Result<TokenRules, ConfigError> {
    let mut rules = TokenRules::default();
    if raw.is_empty() {
        return Ok(rules);
    }
    // Serializing a value we just deserialized cannot fail; fail closed anyway.
    rules.spec = serde_json::to_vec(raw)
        .map_err(|_| ConfigError::at(path, "cannot encode the token's rules"))?;

    if let Some(budget) = &raw.budget {
        rules.limits.budget = Some(compile_budget(budget, &format!("{path}.budget"))?);
    }
    if let Some(rate) = &raw.rate_limit {
        let rpm = positive(
            rate.requests_per_minute,
            &format!("{path}.rate_limit.requests_per_minute"),
        )?;
        let tpm = positive(
            rate.tokens_per_minute,
            &format!("{path}.rate_limit.tokens_per_minute"),
        )?;
        if rpm.is_none() && tpm.is_none() {
            return Err(ConfigError::at(
                format!("{path}.rate_limit"),
                "set requests_per_minute, tokens_per_minute or both",
            ));
        }
        rules.limits = Limits {
            requests_per_minute: rpm,
            tokens_per_minute: tpm,
            ..rules.limits
        };
    }
    if let Some(cidrs) = &raw.source_cidrs {
        rules.source_networks = Some(
            SourceNetworks::parse(cidrs)
                .map_err(|e| ConfigError::at(format!("{path}.source_cidrs"), e))?,
        );
    }
    if let Some(countries) = &raw.countries {
        rules.countries = Some(compile_countries(countries, &format!("{path}.countries"))?);
    }
    if let Some(models) = &raw.models {
        let mpath = format!("{path}.models");
        if models.allow.is_none() && models.max_tokens.is_none() {
            return Err(ConfigError::at(mpath, "set allow, max_tokens or both"));
        }
        if let Some(allow) = &models.allow {
            rules.models = Some(
                ModelPatterns::parse(allow)
                    .map_err(|e| ConfigError::at(format!("{mpath}.allow"), e))?,
            );
        }
        rules.max_tokens = positive(models.max_tokens, &format!("{mpath}.max_tokens"))?;
    }
    if let Some(scopes) = &raw.scopes {
        rules.scopes =
            Scopes::parse(scopes).map_err(|e| ConfigError::at(format!("{path}.scopes"), e))?;
    }
    rules.allow_unmetered = raw.allow_unmetered.unwrap_or(false);
    rules.dry_run = raw.enforce == Some(false);
    Ok(rules)
}

/// Rebuilds rules from a shared-data record's rule section.
pub fn rules_from_spec(spec: &[u8]) -> Option<TokenRules> {
    if spec.is_empty() {
        return Some(TokenRules::default());
    }
    let raw: RawTokenRules = serde_json::from_slice(spec).ok()?;
    compile_rules(&raw, "record").ok()
}

fn compile_budget(raw: &RawBudget, path: &str) -> Result<Budget, ConfigError> {
    let limit = money::parse_usd(&raw.limit_usd)
        .map_err(|e| ConfigError::at(format!("{path}.limit_usd"), e))?;
    let window = BudgetWindow::parse(&raw.window)
        .map_err(|e| ConfigError::at(format!("{path}.window"), e))?;
    Ok(Budget { limit, window })
}

fn compile_countries(raw: &RawCountries, path: &str) -> Result<CountryRule, ConfigError> {
    CountryRule::parse(
        raw.allow.as_deref(),
        raw.deny.as_deref(),
        raw.unknown.as_deref(),
    )
    .map_err(|e| ConfigError::at(path, e))
}

fn positive(value: Option<u64>, path: &str) -> Result<Option<u64>, ConfigError> {
    match value {
        Some(0) => Err(ConfigError::at(path, "must be at least 1")),
        other => Ok(other),
    }
}
