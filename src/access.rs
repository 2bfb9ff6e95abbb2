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
use crate::routes::{ModelSource, OutputCap, PromptSource, Route, RouteKind, Scope};
use crate::rules::request_body::{parse_request_body, BodyError, RequestFacts, ServerTools};
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
    // A model rule is judged from the body, which these routes' bodies are not read for (a file
    // upload, speech synthesis): like a metered limit, it may not be bypassed through them.
    if !kind.is_capped()
        && (rules.has_metered_limits() || rules.models.is_some())
        && !rules.allow_unmetered
    {
        judge.refuse(Denial::RouteUnmetered)?;
    }
    Ok(kind)
}

/// Whether this request's body must be read (and held) before it can be judged: for the
/// token's body rules, and on routes that generate, for the tools the upstream would run, unless
/// the token may use every such tool.
pub fn needs_body(rules: &TokenRules, kind: RouteKind) -> bool {
    kind.reads_body() && (rules.needs_body() || (kind.generates() && rules.judges_server_tools()))
}

/// Whether a body cannot have a `tools` key: the word is nowhere in it, not even spelt with
/// JSON escapes (which could spell any key: then it is parsed).
fn cannot_name_tools(body: &[u8]) -> bool {
    !body.windows(5).any(|w| w == b"tools") && !body.windows(2).any(|w| w == b"\\u")
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
    if !rules.needs_body() && cannot_name_tools(body) {
        // Read only for the tools it could name, and it names none: nothing else to judge.
        return Ok(BodyVerdict::default());
    }
    let facts = parse_request_body(body).map_err(|e| match e {
        BodyError::BadModelName => Denial::ModelNameInvalid,
        BodyError::NotJson | BodyError::NotObject => Denial::BodyUnreadable,
    })?;
    // The model that runs is not the body's when it comes from an agent or a stored
    // conversation: a `model` there is a name, not what the upstream runs or bills.
    let stored_model = match kind {
        RouteKind::Generation { model, .. } => match model {
            ModelSource::Body => false,
            ModelSource::BodyUnlessAgent => facts.agent_id,
            ModelSource::Stored => true,
        },
        _ => false,
    };
    if let Some(patterns) = &rules.models {
        if stored_model {
            if !patterns.allows_every_model() {
                judge.refuse(Denial::ModelDenied)?;
            }
        } else {
            let model = facts.model.as_deref().ok_or(Denial::BodyUnreadable)?;
            if !patterns.allows(model) {
                judge.refuse(Denial::ModelDenied)?;
            }
        }
    }
    if kind.generates() {
        judge_server_tools(rules, judge, facts.server_tools)?;
    }
    let output_cap = output_cap(kind, &facts, settings.default_max_tokens);
    if let (Some(limit), RouteKind::Generation { .. }) = (rules.max_tokens, kind) {
        // Without its cap field the model may generate up to its context length: refuse rather
        // than let the ceiling be bypassed by leaving the field out.
        if output_cap.asked.is_none_or(|asked| asked > limit) {
            judge.refuse(Denial::MaxTokensExceeded { limit })?;
        }
    }
    let model = if stored_model { None } else { facts.model };
    let mut reservation = 0;
    if rules.limits.budget.is_some() {
        reservation = reserve(
            settings,
            kind,
            model.as_deref(),
            stored_model,
            facts.pages,
            body.len() as u64,
            output_cap.worst,
        )?;
    }
    Ok(BodyVerdict { model, reservation })
}

/// Tools the upstream runs itself: those that reach the workspace need the scope that reaches
/// it (`read` for its libraries, `manage` for its connectors), and since they are billed per
/// call beyond `usage`, a token with metered limits needs `allow_unmetered`.
fn judge_server_tools(
    rules: &TokenRules,
    judge: &mut Judge<'_>,
    tools: ServerTools,
) -> Result<(), Denial> {
    if !tools.any() {
        return Ok(());
    }
    if (tools.reads_workspace && !rules.scopes.allows(Scope::Read))
        || (tools.calls_connectors && !rules.scopes.allows(Scope::Manage))
    {
        judge.refuse(Denial::ToolDenied)?;
    }
    if rules.has_metered_limits() && !rules.allow_unmetered {
        judge.refuse(Denial::ToolUnmetered)?;
    }
    Ok(())
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
    // A cap of 0 is no cap to rely on: the mock reads it as "no cap", and what Mistral does with
    // it is not documented. It counts as absent: refused under a ceiling, reserved at the default.
    let field = field.filter(|t| *t > 0);
    OutputCapOf {
        asked: field.map(|t| t.saturating_mul(choices)),
        worst: field.unwrap_or(default_max_tokens).saturating_mul(choices),
    }
}

/// The worst case of one request, as the route table says to bound it.
#[allow(clippy::too_many_arguments)]
fn reserve(
    settings: &Settings,
    kind: RouteKind,
    model: Option<&str>,
    stored_model: bool,
    pages: Option<u64>,
    body_len: u64,
    max_output: u64,
) -> Result<NanoUsd, Denial> {
    let prompt_bound = |source: PromptSource| match source {
        PromptSource::Body => body_len,
        PromptSource::BodyAndStoredState => body_len.saturating_add(settings.max_context_tokens),
    };
    let price = || {
        let price = settings
            .prices
            .price_for(model)
            .ok_or(Denial::ModelUnpriced)?;
        // A model from stored state is charged at its own price, which the body does not tell:
        // reserved at the most expensive, so its cost stays within the reservation. (Under
        // `unknown_model: deny` it is refused, as an unknown model is.)
        Ok(if stored_model {
            settings.prices.highest()
        } else {
            price
        })
    };
    Ok(match kind {
        RouteKind::Generation { prompt, .. } => {
            pricing::worst_case_cost(price()?, prompt_bound(prompt), max_output)
        }
        RouteKind::PromptOnly => pricing::worst_case_cost(price()?, body_len, 0),
        RouteKind::Ocr => {
            // An empty `pages` list is read as "no selection" (found by fuzzing): reserve as
            // if it were absent.
            let pages = pages
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
        // A cap of 0 is read as no cap (the mock generates its default): refused like none.
        let zero = br#"{"model":"mistral-small-latest","max_tokens":0}"#;
        assert_eq!(
            body_judged(&r, &s, chat(), Some(zero)),
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
        // A model allow-list is judged from the body; audio uploads and speech are not read.
        let picky = rules(r#"{"models":{"allow":["mistral-small-*"]}}"#);
        for (m, p) in [
            ("POST", "/v1/audio/transcriptions"),
            ("POST", "/v1/audio/speech"),
        ] {
            assert_eq!(
                route_check(&picky, route(m, p)),
                Err(Denial::RouteUnmetered)
            );
        }
        let picky_open =
            rules(r#"{"models":{"allow":["mistral-small-*"]},"allow_unmetered":true}"#);
        assert!(route_check(&picky_open, route("POST", "/v1/audio/speech")).is_ok());
        assert!(!needs_body(&budgeted, RouteKind::Free));
        assert!(needs_body(&budgeted, chat()));
        // A token without body rules: read on routes that generate, for the tools the upstream
        // would run, unless its scopes reach every such tool.
        assert!(needs_body(&open, chat()));
        assert!(!needs_body(&open, RouteKind::Free));
        let trusted = rules(r#"{"scopes":["inference","read","manage"]}"#);
        assert!(!needs_body(&trusted, chat()));
    }

    #[test]
    fn tools_the_upstream_runs_need_their_scope_and_metering() {
        let s = Settings::default();
        let body = |tool: &str| {
            format!(
                r#"{{"model":"mistral-small-latest","max_tokens":5,"messages":[],"tools":[{{"type":"function","function":{{"name":"f"}}}},{{"type":"{tool}"}}]}}"#
            )
        };
        let open = rules("{}");
        let reader = rules(r#"{"scopes":["inference","read"]}"#);
        let manager = rules(r#"{"scopes":["inference","manage"]}"#);
        let judged = |r: &TokenRules, tool: &str| {
            body_judged(r, &s, chat(), Some(body(tool).as_bytes())).map(|_| ())
        };
        assert_eq!(judged(&open, "function"), Ok(()));
        assert_eq!(judged(&open, "web_search"), Ok(()));
        assert_eq!(judged(&open, "image_generation"), Ok(()));
        assert_eq!(judged(&open, "document_library"), Err(Denial::ToolDenied));
        assert_eq!(judged(&reader, "document_library"), Ok(()));
        assert_eq!(judged(&reader, "connector"), Err(Denial::ToolDenied));
        assert_eq!(judged(&manager, "connector"), Ok(()));
        // A type this filter does not know reaches as far as a connector.
        assert_eq!(judged(&reader, "mcp_server"), Err(Denial::ToolDenied));
        assert_eq!(judged(&manager, "mcp_server"), Ok(()));
        // Billed per call: not for a token whose limits need metering, unless it says so.
        let budgeted = rules(r#"{"budget":{"limit_usd":"1","window":"daily"}}"#);
        assert_eq!(judged(&budgeted, "web_search"), Err(Denial::ToolUnmetered));
        assert_eq!(judged(&budgeted, "function"), Ok(()));
        let capped = rules(r#"{"models":{"max_tokens":10}}"#);
        assert_eq!(
            judged(&capped, "code_interpreter"),
            Err(Denial::ToolUnmetered)
        );
        let explicit =
            rules(r#"{"allow_unmetered":true,"budget":{"limit_usd":"1","window":"daily"}}"#);
        assert_eq!(judged(&explicit, "web_search"), Ok(()));
        // Every route that generates reads `tools`.
        let conv = br#"{"inputs":"hi","tools":[{"type":"connector","connector_id":"c"}]}"#;
        assert_eq!(
            body_judged(&open, &s, kind("POST", "/v1/conversations"), Some(conv)),
            Err(Denial::ToolDenied)
        );
    }

    #[test]
    fn a_body_read_only_for_tools_is_parsed_only_when_it_could_name_one() {
        let s = Settings::default();
        let open = rules("{}");
        // No `tools` anywhere: not parsed (not even for JSON validity, which no rule needs).
        assert_eq!(
            body_judged(&open, &s, chat(), Some(b"not json at all")),
            Ok(BodyVerdict::default())
        );
        // Spelt with escapes, the key is still found and judged.
        let escaped = br#"{"model":"m","\u0074ools":[{"type":"document_library"}]}"#;
        assert_eq!(
            body_judged(&open, &s, chat(), Some(escaped)),
            Err(Denial::ToolDenied)
        );
        let plain = br#"{"model":"m","tools":[{"type":"connector"}]}"#;
        assert_eq!(
            body_judged(&open, &s, chat(), Some(plain)),
            Err(Denial::ToolDenied)
        );
        // A token with body rules is always parsed.
        let picky = rules(r#"{"models":{"allow":["m"]}}"#);
        assert_eq!(
            body_judged(&picky, &s, chat(), Some(b"not json at all")),
            Err(Denial::BodyUnreadable)
        );
    }

    #[test]
    fn a_model_the_body_does_not_choose_passes_only_an_allow_all_rule() {
        let s = Settings::default();
        let picky = rules(r#"{"models":{"allow":["mistral-small-*"]}}"#);
        let any = rules(r#"{"models":{"allow":["*"]}}"#);
        // The agent's model runs, whatever `model` says.
        let agent = br#"{"agent_id":"ag_1","model":"mistral-small-latest","messages":[]}"#;
        for (m, p) in [
            ("POST", "/v1/agents/completions"),
            ("POST", "/v1/conversations"),
        ] {
            assert_eq!(
                body_judged(&picky, &s, kind(m, p), Some(agent)),
                Err(Denial::ModelDenied),
                "{p}"
            );
            assert!(body_judged(&any, &s, kind(m, p), Some(agent)).is_ok());
        }
        // A stored conversation's model, appended to or restarted.
        let append = br#"{"model":"mistral-small-latest","inputs":"more"}"#;
        for p in ["/v1/conversations/c1", "/v1/conversations/c1/restart"] {
            assert_eq!(
                body_judged(&picky, &s, kind("POST", p), Some(append)),
                Err(Denial::ModelDenied)
            );
        }
        // A conversation started with a model of its own is judged on it.
        let own = br#"{"model":"mistral-small-latest","inputs":"hi"}"#;
        assert_eq!(
            body_judged(&picky, &s, kind("POST", "/v1/conversations"), Some(own)).map(|v| v.model),
            Ok(Some("mistral-small-latest".to_string()))
        );
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
            body_judged(&r, &s, kind("POST", "/v1/conversations"), Some(conv))
                .unwrap()
                .reservation,
            pricing::worst_case_cost(price, conv.len() as u64 + s.max_context_tokens, 10)
        );
        // Appended to a stored conversation, the model is the conversation's: a `model` in the
        // body is not what runs, and the reservation is at the most expensive price.
        let unknown = s.prices.highest();
        assert!(unknown.output_nano_per_mtok > price.output_nano_per_mtok);
        assert_eq!(
            body_judged(&r, &s, kind("POST", "/v1/conversations/c1"), Some(conv))
                .unwrap()
                .reservation,
            pricing::worst_case_cost(unknown, conv.len() as u64 + s.max_context_tokens, 10)
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
