//! The rule flags shared by `mint`, `limit`, `team create` and `team limit`: each sets one field
//! of a token's or a team's rules (the two have the same rule fields), and the value `none`
//! removes it. Values are checked only for shape here; the policy is then validated by the
//! filter's own compiler, whose errors name the field.

use super::args::Args;
use super::error::{usage, CliError};
use crate::config::raw::{RawBudget, RawCountries, RawModels, RawRateLimit, RawTeam, RawToken};

pub const HELP: &str = "\
  rule flags (mint, limit, team create, team limit; the value none removes a rule):
       --budget-usd USD --budget-window lifetime|daily|monthly|hourly|<N>s
       --rpm N  --tpm N                   requests / Mistral tokens per minute
       --cidrs 10.0.0.0/8,2001:db8::/32   allowed client networks
       --countries-allow FR,DE  --countries-deny RU  --countries-unknown allow|deny
       --models 'mistral-small-*,mistral-embed'  --max-tokens N
       --scopes inference,read,manage|all  routes the token reaches (default inference)
       --allow-unmetered true|false       let a token with a budget, tpm or max_tokens limit
                                          use routes ShieldKey cannot cap or meter
       --enforce true|false               false: dry run of these rules (a request they would
                                          refuse is let through, logged and counted as
                                          would_deny); authentication is always enforced";

/// The rule fields of a token or a team, borrowed for `RuleFlags::apply`.
pub struct RuleFields<'a> {
    budget: &'a mut Option<RawBudget>,
    rate_limit: &'a mut Option<RawRateLimit>,
    source_cidrs: &'a mut Option<Vec<String>>,
    countries: &'a mut Option<RawCountries>,
    models: &'a mut Option<RawModels>,
    scopes: &'a mut Option<Vec<String>>,
    allow_unmetered: &'a mut Option<bool>,
    enforce: &'a mut Option<bool>,
}

impl<'a> From<&'a mut RawToken> for RuleFields<'a> {
    fn from(t: &'a mut RawToken) -> Self {
        RuleFields {
            budget: &mut t.budget,
            rate_limit: &mut t.rate_limit,
            source_cidrs: &mut t.source_cidrs,
            countries: &mut t.countries,
            models: &mut t.models,
            scopes: &mut t.scopes,
            allow_unmetered: &mut t.allow_unmetered,
            enforce: &mut t.enforce,
        }
    }
}

impl<'a> From<&'a mut RawTeam> for RuleFields<'a> {
    fn from(t: &'a mut RawTeam) -> Self {
        RuleFields {
            budget: &mut t.budget,
            rate_limit: &mut t.rate_limit,
            source_cidrs: &mut t.source_cidrs,
            countries: &mut t.countries,
            models: &mut t.models,
            scopes: &mut t.scopes,
            allow_unmetered: &mut t.allow_unmetered,
            enforce: &mut t.enforce,
        }
    }
}

/// A flag's value: `None` when absent, `Some(None)` for `none`, `Some(Some(v))` to set.
type Change<T> = Option<Option<T>>;

#[derive(Debug, Clone, Default)]
pub struct RuleFlags {
    budget_usd: Change<String>,
    budget_window: Option<String>,
    rpm: Change<u64>,
    tpm: Change<u64>,
    cidrs: Change<Vec<String>>,
    countries_allow: Change<Vec<String>>,
    countries_deny: Change<Vec<String>>,
    countries_unknown: Option<String>,
    models: Change<Vec<String>>,
    max_tokens: Change<u64>,
    scopes: Change<Vec<String>>,
    allow_unmetered: Change<bool>,
    enforce: Change<bool>,
}

impl RuleFlags {
    pub fn take(args: &mut Args) -> Result<RuleFlags, CliError> {
        // Checked as the policy checks them, so a bad value is a usage error naming the flag,
        // not a rejected policy naming a field.
        let budget_usd = text(args, "budget-usd")?;
        if let Some(Some(usd)) = &budget_usd {
            crate::money::parse_usd(usd).map_err(|e| usage(format!("--budget-usd: {e}")))?;
        }
        let budget_window = args.option("budget-window")?;
        if let Some(window) = &budget_window {
            crate::budget_window::BudgetWindow::parse(window)
                .map_err(|e| usage(format!("--budget-window: {e}")))?;
        }
        Ok(RuleFlags {
            budget_usd,
            budget_window,
            rpm: number(args, "rpm")?,
            tpm: number(args, "tpm")?,
            cidrs: list(args, "cidrs")?,
            countries_allow: list(args, "countries-allow")?,
            countries_deny: list(args, "countries-deny")?,
            countries_unknown: args.option("countries-unknown")?,
            models: list(args, "models")?,
            max_tokens: number(args, "max-tokens")?,
            scopes: list(args, "scopes")?,
            allow_unmetered: boolean(args, "allow-unmetered")?,
            enforce: boolean(args, "enforce")?,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.budget_usd.is_none()
            && self.budget_window.is_none()
            && self.rpm.is_none()
            && self.tpm.is_none()
            && self.cidrs.is_none()
            && self.countries_allow.is_none()
            && self.countries_deny.is_none()
            && self.countries_unknown.is_none()
            && self.models.is_none()
            && self.max_tokens.is_none()
            && self.scopes.is_none()
            && self.allow_unmetered.is_none()
            && self.enforce.is_none()
    }

    /// Applies the flags to a token or a team; sections left with nothing in them are removed.
    pub fn apply<'a>(self, target: impl Into<RuleFields<'a>>) -> Result<(), CliError> {
        let fields = target.into();
        self.apply_budget(fields.budget)?;

        let mut rate = fields.rate_limit.take().unwrap_or_default();
        set(&mut rate.requests_per_minute, self.rpm);
        set(&mut rate.tokens_per_minute, self.tpm);
        if rate.requests_per_minute.is_some() || rate.tokens_per_minute.is_some() {
            *fields.rate_limit = Some(rate);
        }

        set(fields.source_cidrs, self.cidrs);

        let mut countries = fields.countries.take().unwrap_or_default();
        set(&mut countries.allow, self.countries_allow);
        set(&mut countries.deny, self.countries_deny);
        let unknown_given = self.countries_unknown.is_some();
        if let Some(unknown) = self.countries_unknown {
            countries.unknown = Some(unknown);
        }
        if countries.allow.is_some() || countries.deny.is_some() {
            *fields.countries = Some(countries);
        } else if unknown_given {
            return Err(usage(
                "--countries-unknown needs --countries-allow or --countries-deny",
            ));
        }

        let mut models = fields.models.take().unwrap_or_default();
        set(&mut models.allow, self.models);
        set(&mut models.max_tokens, self.max_tokens);
        if models.allow.is_some() || models.max_tokens.is_some() {
            *fields.models = Some(models);
        }
        set(fields.scopes, self.scopes);
        set(fields.allow_unmetered, self.allow_unmetered);
        set(fields.enforce, self.enforce);
        Ok(())
    }

    fn apply_budget(&self, budget: &mut Option<RawBudget>) -> Result<(), CliError> {
        match (&self.budget_usd, &self.budget_window, budget) {
            (Some(None), _, budget) => *budget = None,
            (Some(Some(limit)), window, Some(budget)) => {
                budget.limit_usd = limit.clone();
                if let Some(w) = window {
                    budget.window = w.clone();
                }
            }
            (Some(Some(limit)), Some(window), budget @ None) => {
                *budget = Some(RawBudget {
                    limit_usd: limit.clone(),
                    window: window.clone(),
                });
            }
            (Some(Some(_)), None, None) => {
                return Err(usage("a new budget needs --budget-window as well"));
            }
            (None, Some(window), Some(budget)) => budget.window = window.clone(),
            (None, Some(_), None) => {
                return Err(usage("--budget-window needs a budget: add --budget-usd"));
            }
            (None, None, _) => {}
        }
        Ok(())
    }
}

fn set<T>(field: &mut Option<T>, change: Change<T>) {
    if let Some(value) = change {
        *field = value;
    }
}

fn text(args: &mut Args, name: &str) -> Result<Change<String>, CliError> {
    Ok(args
        .option(name)?
        .map(|v| if v == "none" { None } else { Some(v) }))
}

fn number(args: &mut Args, name: &str) -> Result<Change<u64>, CliError> {
    text(args, name)?
        .map(|v| {
            v.map(|n| {
                n.parse::<u64>()
                    .map_err(|_| usage(format!("--{name}: expected a whole number or none")))
            })
            .transpose()
        })
        .transpose()
}

fn boolean(args: &mut Args, name: &str) -> Result<Change<bool>, CliError> {
    text(args, name)?
        .map(|v| match v.as_deref() {
            None => Ok(None),
            Some("true") => Ok(Some(true)),
            Some("false") => Ok(Some(false)),
            Some(_) => Err(usage(format!("--{name}: expected true, false or none"))),
        })
        .transpose()
}

fn list(args: &mut Args, name: &str) -> Result<Change<Vec<String>>, CliError> {
    Ok(text(args, name)?.map(|v| {
        v.map(|items| {
            items
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect()
        })
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(list: &[&str]) -> RuleFlags {
        let mut args = Args::new(list.iter().map(|s| s.to_string()).collect());
        let flags = RuleFlags::take(&mut args).unwrap();
        args.finish().unwrap();
        flags
    }

    #[test]
    fn sets_changes_and_removes_rules() {
        let mut t = RawToken::default();
        flags(&[
            "--budget-usd=25",
            "--budget-window=monthly",
            "--rpm=60",
            "--cidrs=10.0.0.0/8, 192.168.0.0/16",
            "--countries-allow=FR,DE",
            "--models=mistral-small-*",
        ])
        .apply(&mut t)
        .unwrap();
        assert_eq!(t.budget.as_ref().unwrap().limit_usd, "25");
        assert_eq!(t.rate_limit.as_ref().unwrap().requests_per_minute, Some(60));
        assert_eq!(t.source_cidrs.as_ref().unwrap().len(), 2);
        assert_eq!(
            t.countries.as_ref().unwrap().allow.as_ref().unwrap()[1],
            "DE"
        );

        // Changing one field keeps the others of its section.
        flags(&["--budget-usd=30", "--tpm=1000", "--max-tokens=512"])
            .apply(&mut t)
            .unwrap();
        let budget = t.budget.as_ref().unwrap();
        assert_eq!(
            (budget.limit_usd.as_str(), budget.window.as_str()),
            ("30", "monthly")
        );
        let rate = t.rate_limit.as_ref().unwrap();
        assert_eq!(
            (rate.requests_per_minute, rate.tokens_per_minute),
            (Some(60), Some(1000))
        );
        let models = t.models.as_ref().unwrap();
        assert_eq!(models.max_tokens, Some(512));
        assert!(models.allow.is_some());

        // `none` removes; an emptied section disappears.
        flags(&[
            "--budget-usd=none",
            "--rpm=none",
            "--tpm=none",
            "--cidrs=none",
            "--countries-allow=none",
            "--models=none",
        ])
        .apply(&mut t)
        .unwrap();
        assert!(t.budget.is_none() && t.rate_limit.is_none() && t.source_cidrs.is_none());
        assert!(t.countries.is_none());
        assert_eq!(t.models.as_ref().unwrap().allow, None);
        flags(&["--max-tokens=none"]).apply(&mut t).unwrap();
        assert!(t.models.is_none());
        assert_eq!(t, RawToken::default());
    }

    #[test]
    fn teams_take_the_same_flags_and_enforce_is_one_of_them() {
        let mut team = RawTeam::default();
        let f = flags(&[
            "--budget-usd=100",
            "--budget-window=daily",
            "--tpm=5000",
            "--scopes=inference,read",
            "--enforce=false",
        ]);
        assert!(!f.is_empty());
        f.apply(&mut team).unwrap();
        assert_eq!(team.budget.as_ref().unwrap().window, "daily");
        assert_eq!(
            team.rate_limit.as_ref().unwrap().tokens_per_minute,
            Some(5000)
        );
        assert_eq!(team.scopes.as_ref().unwrap().len(), 2);
        assert_eq!(team.enforce, Some(false));

        // --enforce alone is a change; true is kept as given, none goes back to the default.
        let mut t = RawToken::default();
        let f = flags(&["--enforce=true"]);
        assert!(!f.is_empty());
        f.apply(&mut t).unwrap();
        assert_eq!(t.enforce, Some(true));
        flags(&["--enforce=none"]).apply(&mut t).unwrap();
        assert_eq!(t, RawToken::default());
        let mut args = Args::new(vec!["--enforce=off".into()]);
        assert!(RuleFlags::take(&mut args).is_err());
    }

    #[test]
    fn incomplete_or_malformed_flags_are_usage_errors() {
        let mut t = RawToken::default();
        assert!(flags(&["--budget-usd=5"]).apply(&mut t).is_err());
        assert!(flags(&["--budget-window=daily"]).apply(&mut t).is_err());
        assert!(flags(&["--countries-unknown=allow"]).apply(&mut t).is_err());
        let mut args = Args::new(vec!["--rpm".into(), "lots".into()]);
        assert!(RuleFlags::take(&mut args).is_err());
        assert!(flags(&[]).is_empty());
        // A budget the policy would refuse is refused at the flag, which the message names.
        for (flag, named) in [
            (
                "--budget-window=weekly",
                "--budget-window: must be lifetime",
            ),
            (
                "--budget-usd=ten",
                "--budget-usd: 'ten' is not a decimal USD amount",
            ),
        ] {
            let mut args = Args::new(vec![flag.into()]);
            let err = RuleFlags::take(&mut args).err().map(|e| e.to_string());
            assert!(err.as_deref().is_some_and(|e| e.contains(named)), "{err:?}");
        }
        assert!(flags(&["--budget-usd=none", "--budget-window=3600s"])
            .budget_window
            .is_some());
    }
}
