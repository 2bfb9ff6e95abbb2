//! The per-request rules after authentication, as pure functions of the token's rules and the
//! request facts the glue gathered. Order (cheapest first, see the README):
//! 1. source network (`source.address` as Envoy resolved it),
//! 2. country (the header Envoy's geoip filter set),
//! 3. request body, when a rule needs it: size cap, JSON, model patterns, `max_tokens` ceiling,
//!    price (for the reservation),
//! 4. rate limits and budget, in one atomic ledger update (`ledger::Ledger::admit`).

use std::net::IpAddr;

use crate::denial::Denial;
use crate::money::NanoUsd;
use crate::policy::TokenRules;
use crate::rules::request_body::parse_request_body;
use crate::settings::Settings;
use crate::spend;

/// Rules that need only the connection and headers.
pub fn check_connection(
    rules: &TokenRules,
    source: Option<IpAddr>,
    country: Option<&[u8]>,
) -> Result<(), Denial> {
    if let Some(networks) = &rules.source_networks {
        // An address Envoy did not give us (or not an IP, e.g. a unix socket) is not allowed.
        if !source.is_some_and(|ip| networks.allows(ip)) {
            return Err(Denial::SourceIpDenied);
        }
    }
    if let Some(countries) = &rules.countries {
        if !countries.check(country) {
            return Err(Denial::CountryDenied);
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

/// Whether a request path generates a completion (and so has `max_tokens` to judge and to
/// reserve for). Anything else (embeddings, moderation, OCR, ...) is billed on its prompt only.
pub fn generates_completion(path: &[u8]) -> bool {
    let path = path.split(|b| *b == b'?').next().unwrap_or_default();
    [
        &b"/v1/chat/completions"[..],
        b"/v1/fim/completions",
        b"/v1/agents/completions",
        b"/v1/conversations",
    ]
    .iter()
    .any(|p| path.starts_with(p))
}

/// Judges the request body. `None` (or empty) means the request has no body, like
/// `GET /v1/models`: there is nothing to generate, so no model rule applies and nothing is
/// reserved.
pub fn judge_body(
    rules: &TokenRules,
    settings: &Settings,
    body: Option<&[u8]>,
    generates: bool,
) -> Result<BodyVerdict, Denial> {
    let Some(body) = body.filter(|b| !b.is_empty()) else {
        return Ok(BodyVerdict::default());
    };
    if body.len() as u64 > settings.max_body_bytes {
        return Err(Denial::BodyTooLarge {
            limit: settings.max_body_bytes,
        });
    }
    let facts = parse_request_body(body).map_err(|_| Denial::BodyUnreadable)?;
    if let Some(patterns) = &rules.models {
        let model = facts.model.as_deref().ok_or(Denial::BodyUnreadable)?;
        if !patterns.allows(model) {
            return Err(Denial::ModelDenied);
        }
    }
    // Embeddings and other endpoints that generate no completion have no max_tokens to judge.
    let max_tokens = if generates { facts.max_tokens } else { Some(0) };
    if let (Some(limit), true) = (rules.max_tokens, generates) {
        // Without max_tokens the model may generate up to its context length: refuse rather
        // than let the ceiling be bypassed by leaving the field out.
        if facts.max_tokens.is_none_or(|asked| asked > limit) {
            return Err(Denial::MaxTokensExceeded { limit });
        }
    }
    let mut reservation = 0;
    if rules.limits.budget.is_some() {
        let price = settings
            .prices
            .price_for(facts.model.as_deref())
            .ok_or(Denial::ModelUnpriced)?;
        reservation = spend::reservation(
            price,
            body.len() as u64,
            max_tokens,
            settings.default_max_tokens,
        );
    }
    Ok(BodyVerdict {
        model: facts.model,
        reservation,
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

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn networks_and_countries() {
        let r = rules(
            r#"{"source_cidrs":["10.0.0.0/8","2001:db8::/32"],"countries":{"allow":["FR"]}}"#,
        );
        assert_eq!(check_connection(&r, ip("10.1.2.3"), Some(b"FR")), Ok(()));
        assert_eq!(check_connection(&r, ip("2001:db8::1"), Some(b"FR")), Ok(()));
        assert_eq!(
            check_connection(&r, ip("11.0.0.1"), Some(b"FR")),
            Err(Denial::SourceIpDenied)
        );
        assert_eq!(
            check_connection(&r, None, Some(b"FR")),
            Err(Denial::SourceIpDenied)
        );
        assert_eq!(
            check_connection(&r, ip("10.0.0.1"), Some(b"US")),
            Err(Denial::CountryDenied)
        );
        assert_eq!(
            check_connection(&r, ip("10.0.0.1"), None),
            Err(Denial::CountryDenied)
        );
        let open = TokenRules::default();
        assert_eq!(check_connection(&open, None, None), Ok(()));
    }

    #[test]
    fn model_rules_read_the_body() {
        let r = rules(r#"{"models":{"allow":["mistral-small-*"],"max_tokens":100}}"#);
        let s = Settings::default();
        let ok = br#"{"model":"mistral-small-latest","max_tokens":50,"messages":[]}"#;
        assert_eq!(
            judge_body(&r, &s, Some(ok), true).map(|v| v.model),
            Ok(Some("mistral-small-latest".to_string()))
        );
        let other = br#"{"model":"mistral-large-latest","max_tokens":50}"#;
        assert_eq!(
            judge_body(&r, &s, Some(other), true),
            Err(Denial::ModelDenied)
        );
        let greedy = br#"{"model":"mistral-small-latest","max_tokens":101}"#;
        assert_eq!(
            judge_body(&r, &s, Some(greedy), true),
            Err(Denial::MaxTokensExceeded { limit: 100 })
        );
        let unset = br#"{"model":"mistral-small-latest"}"#;
        assert_eq!(
            judge_body(&r, &s, Some(unset), true),
            Err(Denial::MaxTokensExceeded { limit: 100 })
        );
        assert_eq!(
            judge_body(&r, &s, Some(b"nope"), true),
            Err(Denial::BodyUnreadable)
        );
        assert_eq!(
            judge_body(&r, &s, Some(br#"{"max_tokens":1}"#), true),
            Err(Denial::BodyUnreadable)
        );
        assert_eq!(judge_body(&r, &s, None, true), Ok(BodyVerdict::default()));
        // Embeddings have no max_tokens: the ceiling does not apply.
        let embed = br#"{"model":"mistral-small-x","input":["a"]}"#;
        assert!(judge_body(&r, &s, Some(embed), false).is_ok());
        assert!(generates_completion(b"/v1/chat/completions?x=1"));
        assert!(generates_completion(b"/v1/conversations/abc/restart"));
        assert!(!generates_completion(b"/v1/embeddings"));
        assert!(!generates_completion(b"/v1/models"));
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
            judge_body(&r, &s, Some(body), true),
            Err(Denial::BodyTooLarge { limit: 16 })
        );
    }

    #[test]
    fn a_budget_reserves_the_worst_case_and_can_refuse_unpriced_models() {
        let r = rules(r#"{"budget":{"limit_usd":"1","window":"daily"}}"#);
        let s = Settings::default();
        let body = br#"{"model":"mistral-small-latest","max_tokens":100}"#;
        let v = judge_body(&r, &s, Some(body), true).unwrap();
        let price = s.prices.price_for(Some("mistral-small-latest")).unwrap();
        assert_eq!(
            v.reservation,
            spend::reservation(price, body.len() as u64, Some(100), s.default_max_tokens)
        );
        assert!(v.reservation > 0);

        let deny_unknown = Settings {
            prices: crate::spend::Prices::new(
                crate::pricing::PriceTable::builtin(),
                crate::spend::UnknownModel::Deny,
            ),
            ..Settings::default()
        };
        let unknown = br#"{"model":"homegrown-7b"}"#;
        assert_eq!(
            judge_body(&r, &deny_unknown, Some(unknown), true),
            Err(Denial::ModelUnpriced)
        );
    }
}
