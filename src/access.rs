//! The per-request rules after authentication, as pure functions of the token's rules and the
//! request facts the glue gathered. Order (cheapest first, see the README):
//! 1. source network (`source.address` as Envoy resolved it),
//! 2. country (the header Envoy's geoip filter set),
//! 3. request body, when a rule needs it: size cap, JSON, model patterns, `max_tokens` ceiling,
//!    price (for the reservation),
//! 4. rate limits and budget, in one atomic ledger update (`ledger::Ledger::admit`).
//!
//! A token in a team is judged twice, by its own rules and by its team's, each through a
//! `Judge` that says which level refuses and whether that level is in dry run.

use std::net::IpAddr;

use crate::denial::Denial;
use crate::money::NanoUsd;
use crate::policy::TokenRules;
use crate::pricing;
use crate::routes::{OutputCap, PromptSource, Route, RouteKind};
use crate::rules::request_body::{parse_request_body, BodyError, RequestFacts};
use crate::settings::Settings;

/// Where one level's refusals go: the token's own rules or its team's (`team`), enforced or in
/// dry run. In dry run a rule's refusal (`Denial::is_rule`) is kept in `would_deny` and judging
/// goes on as if it had passed; anything else, and every refusal of an enforced level, ends the
/// request.
pub struct Judge<'a> {
    pub team: bool,
    pub dry_run: bool,
    pub would_deny: &'a mut Vec<Denial>,
}

impl<'a> Judge<'a> {
    pub fn new(team: bool, dry_run: bool, would_deny: &'a mut Vec<Denial>) -> Self {
        Judge {
            team,
            dry_run,
            would_deny,
        }
    }

    /// `Err` to refuse the request, `Ok` when the level is in dry run and `denial` is a rule's.
    pub fn refuse(&mut self, denial: Denial) -> Result<(), Denial> {
        let denial = if self.team { denial.by_team() } else { denial };
        if self.dry_run && denial.is_rule() {
            self.would_deny.push(denial);
            Ok(())
        } else {
            Err(denial)
        }
    }
}

/// Rules that need only the connection and headers.
pub fn check_connection(
    rules: &TokenRules,
    judge: &mut Judge<'_>,
    source: Option<IpAddr>,
    country: Option<&[u8]>,
) -> Result<(), Denial> {
    if let Some(networks) = &rules.source_networks {
        // An address Envoy did not give us (or not an IP, e.g. a unix socket) is not allowed.
        if !source.is_some_and(|ip| networks.allows(ip)) {
            judge.refuse(Denial::SourceIpDenied)?;
        }
    }
    if let Some(countries) = &rules.countries {
        if !countries.check(country) {
            judge.refuse(Denial::CountryDenied)?;
        }
    }
    Ok(())
}

/// What the body told us, for admission and accounting.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BodyVerdict {
    pub model: Option<String>,
    /// Worst-case cost reserved against the budget (0 without a budget).
    pub reservation: NanoUsd,
}

/// The route rules, judged from the method and path alone: the route must be in the table (or
/// the token must have the `all` scope), within the token's scopes, and a token whose limits
/// depend on metering may only reach routes that can be capped and metered.
pub fn check_route(
    rules: &TokenRules,
    judge: &mut Judge<'_>,
    route: Option<&Route>,
) -> Result<RouteKind, Denial> {
    let kind = match route {
        Some(r) if rules.scopes.allows(r.scope) => r.kind,
        None if rules.scopes.allows_unknown_routes() => RouteKind::Unmetered,
        _ => {
            judge.refuse(Denial::RouteDenied)?;
            // Dry run: the request goes on as what it is (a route outside the table is unmetered).
            route.map_or(RouteKind::Unmetered, |r| r.kind)
        }
    };
    if !kind.is_capped() && rules.has_metered_limits() && !rules.allow_unmetered {
        judge.refuse(Denial::RouteUnmetered)?;
    }
    Ok(kind)
}

/// Whether this request's body must be read (and held) before it can be judged.
pub fn needs_body(rules: &TokenRules, kind: RouteKind) -> bool {
    rules.needs_body() && kind.reads_body()
}

/// Judges the request body of a route that reads one (see `needs_body`). `None` (or empty)
/// means the request has no body: there is nothing to generate, so no model rule applies and
/// nothing is reserved (the upstream refuses such a request).
pub fn judge_body(
    rules: &TokenRules,
    judge: &mut Judge<'_>,
    settings: &Settings,
    kind: RouteKind,
    body: Option<&[u8]>,
) -> Result<BodyVerdict, Denial> {
    let Some(body) = body.filter(|b| !b.is_empty()) else {
        return Ok(BodyVerdict::default());
    };
    if body.len() as u64 > settings.max_body_bytes {
        return Err(Denial::BodyTooLarge {
            limit: settings.max_body_bytes,
        });
    }
    let facts = parse_request_body(body).map_err(|e| match e {
        BodyError::BadModelName => Denial::ModelNameInvalid,
        BodyError::NotJson | BodyError::NotObject => Denial::BodyUnreadable,
    })?;
    if let Some(patterns) = &rules.models {
        let model = facts.model.as_deref().ok_or(Denial::BodyUnreadable)?;
        if !patterns.allows(model) {
            judge.refuse(Denial::ModelDenied)?;
        }
    }
    let output_cap = output_cap(kind, &facts, settings.default_max_tokens);
    if let (Some(limit), RouteKind::Generation { .. }) = (rules.max_tokens, kind) {
        // Without its cap field the model may generate up to its context length: refuse rather
        // than let the ceiling be bypassed by leaving the field out.
        if output_cap.asked.is_none_or(|asked| asked > limit) {
            judge.refuse(Denial::MaxTokensExceeded { limit })?;
        }
    }
    let mut reservation = 0;
    if rules.limits.budget.is_some() {
        reservation = reserve(settings, kind, &facts, body.len() as u64, output_cap.worst)?;
    }
    Ok(BodyVerdict {
        model: facts.model,
        reservation,
    })
}

/// The completion tokens a request asks for (`None` when its cap field is absent), and the
/// most it can generate (the default cap when absent), `n` choices included.
struct OutputCapOf {
    asked: Option<u64>,
    worst: u64,
}

fn output_cap(kind: RouteKind, facts: &RequestFacts, default_max_tokens: u64) -> OutputCapOf {
    let RouteKind::Generation { cap, .. } = kind else {
        return OutputCapOf {
            asked: Some(0),
            worst: 0,
        };
    };
    let (field, choices) = match cap {
        OutputCap::MaxTokensTimesN => (facts.max_tokens, facts.n.unwrap_or(1).max(1)),
        OutputCap::CompletionArgsMaxTokens => (facts.completion_args_max_tokens, 1),
        OutputCap::MaxOutputTokens => (facts.max_output_tokens, 1),
    };
    OutputCapOf {
        asked: field.map(|t| t.saturating_mul(choices)),
        worst: field.unwrap_or(default_max_tokens).saturating_mul(choices),
    }
}

/// The worst case of one request, as the route table says to bound it.
fn reserve(
    settings: &Settings,
    kind: RouteKind,
    facts: &RequestFacts,
    body_len: u64,
    max_output: u64,
) -> Result<NanoUsd, Denial> {
    let prompt_bound = |source: PromptSource| match source {
        PromptSource::Body => body_len,
        PromptSource::BodyAndStoredState => body_len.saturating_add(settings.max_context_tokens),
    };
    let price = || {
        settings
            .prices
            .price_for(facts.model.as_deref())
            .ok_or(Denial::ModelUnpriced)
    };
    Ok(match kind {
        RouteKind::Generation { prompt, .. } => {
            pricing::worst_case_cost(price()?, prompt_bound(prompt), max_output)
        }
        RouteKind::PromptOnly => pricing::worst_case_cost(price()?, body_len, 0),
        RouteKind::Ocr => {
            // An empty `pages` list is read as "no selection" (found by fuzzing): reserve as
            // if it were absent.
            let pages = facts
                .pages
                .filter(|p| *p > 0)
                .unwrap_or(pricing::OCR_MAX_PAGES)
                .min(pricing::OCR_MAX_PAGES);
            pricing::unit_cost(pages, pricing::OCR_NANO_PER_PAGE)
        }
        RouteKind::Audio | RouteKind::Free | RouteKind::Unmetered => 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::token_rules::{compile_rules, RawTokenRules};

    fn rules(json: &str) -> TokenRules {
        let raw: RawTokenRules = serde_json::from_str(json).unwrap();
        compile_rules(&raw, "tokens[0]").unwrap()
    }

    /// Runs `f` with an enforcing token-level judge.
    fn enforced<T>(f: impl FnOnce(&mut Judge<'_>) -> T) -> T {
        let mut would = Vec::new();
        let out = f(&mut Judge::new(false, false, &mut would));
        assert!(would.is_empty());
        out
    }

    fn conn(r: &TokenRules, source: Option<IpAddr>, country: Option<&[u8]>) -> Result<(), Denial> {
        enforced(|j| check_connection(r, j, source, country))
    }

    fn route_check(r: &TokenRules, route: Option<&Route>) -> Result<RouteKind, Denial> {
        enforced(|j| check_route(r, j, route))
    }

    fn body_judged(
        r: &TokenRules,
        s: &Settings,
        kind: RouteKind,
        body: Option<&[u8]>,
    ) -> Result<BodyVerdict, Denial> {
        enforced(|j| judge_body(r, j, s, kind, body))
    }

    #[test]
    fn a_dry_run_level_records_its_refusals_and_goes_on() {
        let r = rules(
            r#"{"source_cidrs":["10.0.0.0/8"],"models":{"allow":["mistral-small-*"],"max_tokens":10},"budget":{"limit_usd":"1","window":"daily"}}"#,
        );
        let s = Settings::default();
        let mut would = Vec::new();
        let mut team = Judge::new(true, true, &mut would);
        assert_eq!(
            check_connection(&r, &mut team, ip("11.0.0.1"), None),
            Ok(())
        );
        let body = br#"{"model":"mistral-large-latest","max_tokens":50}"#;
        let verdict = judge_body(&r, &mut team, &s, chat(), Some(body)).unwrap();
        assert!(verdict.reservation > 0, "the reservation is still computed");
        // Checks that keep accounting sound are never waived.
        assert_eq!(
            judge_body(&r, &mut team, &s, chat(), Some(b"nope")),
            Err(Denial::BodyUnreadable)
        );
        let codes: Vec<&str> = would.iter().map(Denial::code).collect();
        assert_eq!(
            codes,
            [
                "shield_team_ip_denied",
                "shield_team_model_denied",
                "shield_team_max_tokens_exceeded"
            ]
        );
        // Enforced, the same team refuses with the team's code.
        let mut none = Vec::new();
        let mut enforcing = Judge::new(true, false, &mut none);
        assert_eq!(
            check_connection(&r, &mut enforcing, ip("11.0.0.1"), None).map_err(|d| d.code()),
            Err("shield_team_ip_denied")
        );
        assert!(none.is_empty());
    }

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn networks_and_countries() {
        let r = rules(
            r#"{"source_cidrs":["10.0.0.0/8","2001:db8::/32"],"countries":{"allow":["FR"]}}"#,
        );
        assert_eq!(conn(&r, ip("10.1.2.3"), Some(b"FR")), Ok(()));
        assert_eq!(conn(&r, ip("2001:db8::1"), Some(b"FR")), Ok(()));
        assert_eq!(
            conn(&r, ip("11.0.0.1"), Some(b"FR")),
            Err(Denial::SourceIpDenied)
        );
        assert_eq!(conn(&r, None, Some(b"FR")), Err(Denial::SourceIpDenied));
        assert_eq!(
            conn(&r, ip("10.0.0.1"), Some(b"US")),
            Err(Denial::CountryDenied)
        );
        assert_eq!(conn(&r, ip("10.0.0.1"), None), Err(Denial::CountryDenied));
        let open = TokenRules::default();
        assert_eq!(conn(&open, None, None), Ok(()));
    }

    fn kind(method: &str, path: &str) -> RouteKind {
        crate::routes::lookup(method.as_bytes(), path).unwrap().kind
    }

    fn chat() -> RouteKind {
        kind("POST", "/v1/chat/completions")
    }

    #[test]
    fn model_rules_read_the_body() {
        let r = rules(r#"{"models":{"allow":["mistral-small-*"],"max_tokens":100}}"#);
        let s = Settings::default();
        let ok = br#"{"model":"mistral-small-latest","max_tokens":50,"messages":[]}"#;
        assert_eq!(
            body_judged(&r, &s, chat(), Some(ok)).map(|v| v.model),
            Ok(Some("mistral-small-latest".to_string()))
        );
        let other = br#"{"model":"mistral-large-latest","max_tokens":50}"#;
        assert_eq!(
            body_judged(&r, &s, chat(), Some(other)),
            Err(Denial::ModelDenied)
        );
        let greedy = br#"{"model":"mistral-small-latest","max_tokens":101}"#;
        assert_eq!(
            body_judged(&r, &s, chat(), Some(greedy)),
            Err(Denial::MaxTokensExceeded { limit: 100 })
        );
        let unset = br#"{"model":"mistral-small-latest"}"#;
        assert_eq!(
            body_judged(&r, &s, chat(), Some(unset)),
            Err(Denial::MaxTokensExceeded { limit: 100 })
        );
        // n choices multiply what a request can generate.
        let many = br#"{"model":"mistral-small-latest","max_tokens":50,"n":3}"#;
        assert_eq!(
            body_judged(&r, &s, chat(), Some(many)),
            Err(Denial::MaxTokensExceeded { limit: 100 })
        );
        assert_eq!(
            body_judged(&r, &s, chat(), Some(b"nope")),
            Err(Denial::BodyUnreadable)
        );
        assert_eq!(
            body_judged(&r, &s, chat(), Some(br#"{"max_tokens":1}"#)),
            Err(Denial::BodyUnreadable)
        );
        assert_eq!(
            body_judged(&r, &s, chat(), Some(b"{\"model\":\"m\\nx\"}")),
            Err(Denial::ModelNameInvalid)
        );
        assert_eq!(
            body_judged(&r, &s, chat(), None),
            Ok(BodyVerdict::default())
        );
        // Embeddings have no max_tokens: the ceiling does not apply.
        let embed = br#"{"model":"mistral-small-x","input":["a"]}"#;
        assert!(body_judged(&r, &s, kind("POST", "/v1/embeddings"), Some(embed)).is_ok());
    }

    #[test]
    fn each_route_reads_its_own_output_cap() {
        let r = rules(r#"{"models":{"max_tokens":100}}"#);
        let s = Settings::default();
        let conv = kind("POST", "/v1/conversations/c1");
        // Mistral reads completion_args.max_tokens; a top-level max_tokens is not a cap.
        let top_level = br#"{"model":"mistral-small-latest","max_tokens":10,"inputs":"hi"}"#;
        assert_eq!(
            body_judged(&r, &s, conv, Some(top_level)),
            Err(Denial::MaxTokensExceeded { limit: 100 })
        );
        let args = br#"{"inputs":"hi","completion_args":{"max_tokens":100}}"#;
        assert!(body_judged(&r, &s, conv, Some(args)).is_ok());
        let resp = kind("POST", "/v1/responses");
        let over = br#"{"model":"mistral-small-latest","max_output_tokens":101}"#;
        assert_eq!(
            body_judged(&r, &s, resp, Some(over)),
            Err(Denial::MaxTokensExceeded { limit: 100 })
        );
        let fine = br#"{"model":"mistral-small-latest","max_output_tokens":99}"#;
        assert!(body_judged(&r, &s, resp, Some(fine)).is_ok());
    }

    #[test]
    fn routes_follow_scopes_and_metering() {
        let open = rules("{}");
        let route = |m: &str, p: &str| crate::routes::lookup(m.as_bytes(), p);
        assert_eq!(
            route_check(&open, route("POST", "/v1/chat/completions")),
            Ok(chat())
        );
        assert_eq!(
            route_check(&open, route("DELETE", "/v1/models/m1")),
            Err(Denial::RouteDenied)
        );
        assert_eq!(
            route_check(&open, route("GET", "/v1/files")),
            Err(Denial::RouteDenied)
        );
        assert_eq!(route_check(&open, None), Err(Denial::RouteDenied));
        let manage = rules(r#"{"scopes":["manage"]}"#);
        assert_eq!(
            route_check(&manage, route("POST", "/v1/batch/jobs")),
            Ok(RouteKind::Unmetered)
        );
        assert_eq!(
            route_check(&manage, route("POST", "/v1/chat/completions")),
            Err(Denial::RouteDenied)
        );
        let budgeted = rules(r#"{"scopes":["all"],"budget":{"limit_usd":"1","window":"daily"}}"#);
        assert_eq!(
            route_check(&budgeted, route("POST", "/v1/batch/jobs")),
            Err(Denial::RouteUnmetered)
        );
        assert_eq!(route_check(&budgeted, None), Err(Denial::RouteUnmetered));
        assert_eq!(
            route_check(&budgeted, route("POST", "/v1/audio/transcriptions")),
            Err(Denial::RouteUnmetered)
        );
        let explicit = rules(
            r#"{"scopes":["all"],"allow_unmetered":true,"budget":{"limit_usd":"1","window":"daily"}}"#,
        );
        assert_eq!(route_check(&explicit, None), Ok(RouteKind::Unmetered));
        let ceiling = rules(r#"{"models":{"max_tokens":5}}"#);
        assert_eq!(
            route_check(&ceiling, route("POST", "/v1/audio/transcriptions")),
            Err(Denial::RouteUnmetered)
        );
        assert!(!needs_body(&budgeted, RouteKind::Free));
        assert!(needs_body(&budgeted, chat()));
        assert!(!needs_body(&open, chat()));
    }

    #[test]
    fn body_size_is_capped() {
        let r = rules(r#"{"models":{"allow":["*"]}}"#);
        let s = Settings {
            max_body_bytes: 16,
            ..Settings::default()
        };
        let body = br#"{"model":"mistral-small-latest"}"#;
        assert_eq!(
            body_judged(&r, &s, chat(), Some(body)),
            Err(Denial::BodyTooLarge { limit: 16 })
        );
    }

    #[test]
    fn a_budget_reserves_the_worst_case_of_each_route() {
        let r = rules(r#"{"budget":{"limit_usd":"1","window":"daily"}}"#);
        let s = Settings::default();
        let price = s.prices.price_for(Some("mistral-small-latest")).unwrap();
        let body = br#"{"model":"mistral-small-latest","max_tokens":100}"#;
        let v = body_judged(&r, &s, chat(), Some(body)).unwrap();
        assert_eq!(
            v.reservation,
            pricing::worst_case_cost(price, body.len() as u64, 100)
        );
        let n = br#"{"model":"mistral-small-latest","max_tokens":100,"n":20}"#;
        assert_eq!(
            body_judged(&r, &s, chat(), Some(n)).unwrap().reservation,
            pricing::worst_case_cost(price, n.len() as u64, 2_000)
        );
        let none = br#"{"model":"mistral-small-latest"}"#;
        assert_eq!(
            body_judged(&r, &s, chat(), Some(none)).unwrap().reservation,
            pricing::worst_case_cost(price, none.len() as u64, s.default_max_tokens)
        );
        // Stored state (a conversation's history) is bounded by the context, not the body.
        let conv =
            br#"{"model":"mistral-small-latest","inputs":"x","completion_args":{"max_tokens":10}}"#;
        assert_eq!(
            body_judged(&r, &s, kind("POST", "/v1/conversations/c1"), Some(conv))
                .unwrap()
                .reservation,
            pricing::worst_case_cost(price, conv.len() as u64 + s.max_context_tokens, 10)
        );
        let embed = br#"{"model":"mistral-small-latest","input":"abc"}"#;
        assert_eq!(
            body_judged(&r, &s, kind("POST", "/v1/embeddings"), Some(embed))
                .unwrap()
                .reservation,
            pricing::worst_case_cost(price, embed.len() as u64, 0)
        );
        let ocr = kind("POST", "/v1/ocr");
        let pages = br#"{"model":"mistral-ocr-latest","document":{},"pages":[0,1]}"#;
        assert_eq!(
            body_judged(&r, &s, ocr, Some(pages)).unwrap().reservation,
            2 * pricing::OCR_NANO_PER_PAGE
        );
        let all_pages = br#"{"model":"mistral-ocr-latest","document":{}}"#;
        assert_eq!(
            body_judged(&r, &s, ocr, Some(all_pages))
                .unwrap()
                .reservation,
            pricing::OCR_MAX_PAGES * pricing::OCR_NANO_PER_PAGE
        );

        let deny_unknown = Settings {
            prices: crate::spend::Prices::new(
                crate::pricing::PriceTable::builtin(),
                crate::spend::UnknownModel::Deny,
            ),
            ..Settings::default()
        };
        let unknown = br#"{"model":"homegrown-7b"}"#;
        assert_eq!(
            body_judged(&r, &deny_unknown, chat(), Some(unknown)),
            Err(Denial::ModelUnpriced)
        );
    }
}
