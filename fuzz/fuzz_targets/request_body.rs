//! Request body facts and the body rules built on them.
//!
//! Oracle: an independent full parse (serde_json into an order- and duplicate-preserving tree).
//! - `parse_request_body` accepts only JSON objects with no key given twice at the top level;
//! - what it reports (model, max_tokens, n, max_output_tokens, completion_args.max_tokens, pages,
//!   stream, agent_id, the types of `tools`) is what the document says, and it accepts every
//!   well-typed object it should;
//! - `access::judge_body` never panics, a budgeted token's reservation is > 0 for a priced model
//!   on every capped route, a budgeted token never gets a tool billed per call through, and a
//!   `max_tokens` ceiling and model patterns hold whenever it admits (a model the body does not
//!   choose, an agent's or a stored conversation's, is never admitted under patterns).
//!
//! `SHIELDKEY_FUZZ_STRICT=1` adds a stricter rule whose violations are known and reported (see
//! fuzz/crashes-found/README.md): strictly valid JSON (UTF-8, no lone surrogate) even in the
//! string values that are skipped. Without it such bodies are judged as the JSON they are once
//! those strings are made valid.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use shieldkey::access::{judge_body, BodyVerdict, Judge};
use shieldkey::denial::Denial;
use shieldkey::config::token_rules::{compile_rules, RawTokenRules};
use shieldkey::policy::TokenRules;
use shieldkey::routes::{lookup, OutputCap, RouteKind};
use shieldkey::rules::request_body::{
    is_valid_model_name, parse_request_body, BodyError, RequestFacts,
};
use shieldkey::settings::Settings;
use shieldkey_fuzz::{count_of, tame, Count, J};

fn strict() -> bool {
    static STRICT: OnceLock<bool> = OnceLock::new();
    *STRICT.get_or_init(|| std::env::var_os("SHIELDKEY_FUZZ_STRICT").is_some_and(|v| v == "1"))
}

const CEILING: u64 = 1000;

struct Fixture {
    budget: TokenRules,
    ceiling: TokenRules,
    settings: Settings,
    small: Settings,
    kinds: Vec<RouteKind>,
}

fn rules(json: &str) -> TokenRules {
    let raw: RawTokenRules = serde_json::from_str(json).expect("fixed rules parse");
    compile_rules(&raw, "tokens[0]").expect("fixed rules compile")
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| Fixture {
        budget: rules(r#"{"budget":{"limit_usd":"25","window":"daily"}}"#),
        ceiling: rules(&format!(
            r#"{{"models":{{"allow":["mistral-*","codestral-latest"],"max_tokens":{CEILING}}},
                 "budget":{{"limit_usd":"1","window":"monthly"}}}}"#
        )),
        settings: Settings::default(),
        small: Settings {
            max_body_bytes: 64,
            ..Settings::default()
        },
        kinds: [
            (&b"POST"[..], "/v1/chat/completions"),
            (b"POST", "/v1/fim/completions"),
            (b"POST", "/v1/agents/completions"),
            (b"POST", "/v1/conversations"),
            (b"POST", "/v1/conversations/c1/restart"),
            (b"POST", "/v1/responses"),
            (b"POST", "/v1/embeddings"),
            (b"POST", "/v1/ocr"),
            (b"POST", "/v1/audio/transcriptions"),
            (b"GET", "/v1/models"),
            (b"DELETE", "/v1/files/f1"),
        ]
        .iter()
        .map(|(m, p)| lookup(m, p).expect("a known route").kind)
        .collect(),
    })
}

/// What `parse_request_body` must answer, from the full parse. `None`: the oracle cannot tell.
fn expected(doc: &J) -> Option<Result<RequestFacts, BodyError>> {
    if !matches!(doc, J::Obj(_)) {
        return Some(Err(BodyError::NotObject));
    }
    let given_twice = doc.has_duplicate_key();
    if given_twice {
        return Some(Err(BodyError::NotJson));
    }
    let count = |key: &str| -> Option<Result<Option<u64>, ()>> {
        match doc.get(key) {
            None | Some(J::Null) => Some(Ok(None)),
            v @ Some(J::Num(_)) => match count_of(v) {
                Count::Count(c) => Some(Ok(Some(c))),
                Count::NotACount => Some(Err(())),
                Count::Unknowable => Some(Err(())),
            },
            Some(_) => Some(Err(())),
        }
    };
    let mut facts = RequestFacts::default();
    let mut well_typed = true;
    let mut take = |r: Option<Result<Option<u64>, ()>>| match r {
        Some(Ok(v)) => v,
        _ => {
            well_typed = false;
            None
        }
    };
    facts.max_tokens = take(count("max_tokens"));
    facts.n = take(count("n"));
    facts.max_output_tokens = take(count("max_output_tokens"));
    match doc.get("completion_args") {
        None | Some(J::Null) => {}
        Some(args @ J::Obj(members)) => {
            let named = members.iter().filter(|(k, _)| k == "max_tokens").count();
            if named > 1 {
                well_typed = false;
            }
            facts.completion_args_max_tokens = match args.get("max_tokens") {
                None | Some(J::Null) => None,
                v => match count_of(v) {
                    Count::Count(c) => Some(c),
                    _ => {
                        well_typed = false;
                        None
                    }
                },
            };
        }
        Some(_) => well_typed = false,
    }
    match doc.get("pages") {
        None | Some(J::Null) => {}
        Some(J::Arr(items)) => facts.pages = Some(items.len() as u64),
        Some(_) => well_typed = false,
    }
    match doc.get("stream") {
        None | Some(J::Null) => {}
        Some(J::Bool(b)) => facts.stream = *b,
        Some(_) => well_typed = false,
    }
    match doc.get("model") {
        None | Some(J::Null) => {}
        Some(J::Str(m)) => facts.model = Some(m.clone()),
        Some(_) => well_typed = false,
    }
    facts.agent_id = !matches!(doc.get("agent_id"), None | Some(J::Null));
    match doc.get("tools") {
        None | Some(J::Null) => {}
        Some(J::Arr(items)) => {
            for item in items {
                let J::Obj(members) = item else {
                    well_typed = false;
                    continue;
                };
                if members.iter().filter(|(k, _)| k == "type").count() > 1 {
                    well_typed = false;
                }
                match item.get("type") {
                    None | Some(J::Null) => {}
                    Some(J::Str(t)) => match t.as_str() {
                        "function" => {}
                        "web_search" | "web_search_premium" | "code_interpreter"
                        | "image_generation" => facts.server_tools.billed = true,
                        "document_library" => {
                            facts.server_tools.billed = true;
                            facts.server_tools.reads_workspace = true;
                        }
                        _ => {
                            facts.server_tools.billed = true;
                            facts.server_tools.calls_connectors = true;
                        }
                    },
                    Some(_) => well_typed = false,
                }
            }
        }
        Some(_) => well_typed = false,
    }
    if !well_typed {
        return Some(Err(BodyError::NotJson));
    }
    if facts
        .model
        .as_deref()
        .is_some_and(|m| !is_valid_model_name(m))
    {
        return Some(Err(BodyError::BadModelName));
    }
    Some(Ok(facts))
}

/// Completion tokens a generation request asks for under its route's cap, `n` included.
fn asked(kind: RouteKind, f: &RequestFacts) -> Option<u64> {
    match kind {
        RouteKind::Generation {
            cap: OutputCap::MaxTokensTimesN,
            ..
        } => f
            .max_tokens
            .map(|t| t.saturating_mul(f.n.unwrap_or(1).max(1))),
        RouteKind::Generation {
            cap: OutputCap::CompletionArgsMaxTokens,
            ..
        } => f.completion_args_max_tokens,
        RouteKind::Generation {
            cap: OutputCap::MaxOutputTokens,
            ..
        } => f.max_output_tokens,
        _ => Some(0),
    }
}

fuzz_target!(|data: &[u8]| {
    let got = parse_request_body(data);
    let doc = J::parse(data);

    // A number beyond f64 is valid JSON that serde_json refuses: judge the body with it as 0.
    // Without strict mode, a body that is JSON once its strings' contents are made valid is
    // judged as that JSON (invalid UTF-8 or a lone surrogate in a skipped string is tolerated).
    let lenient = || J::parse(&tame(data, !strict())).filter(|_| got.is_ok());
    match doc.or_else(lenient) {
        None => assert!(got.is_err(), "accepted a body that is not JSON: {got:?}"),
        Some(doc) => {
            if let Some(want) = expected(&doc) {
                assert_eq!(got, want, "parse_request_body disagrees with a full parse");
            }
        }
    }

    let f = fixture();
    let body = (!data.is_empty()).then_some(data);
    // Token-level judging, enforced: every rule's refusal ends the request.
    let judge = |rules: &TokenRules, settings: &Settings, kind: RouteKind, body: Option<&[u8]>| {
        let mut would = Vec::new();
        let out = judge_body(rules, &mut Judge::new(false, false, &mut would), settings, kind, body);
        assert!(would.is_empty(), "an enforcing judge recorded {would:?}");
        out
    };
    // The same in dry run: what enforcement refuses for a rule is let through and recorded.
    let dry_run = |rules: &TokenRules, settings: &Settings, kind: RouteKind, body: Option<&[u8]>| {
        let mut would: Vec<Denial> = Vec::new();
        let out: Result<BodyVerdict, Denial> =
            judge_body(rules, &mut Judge::new(true, true, &mut would), settings, kind, body);
        (out, would)
    };
    for &kind in &f.kinds {
        for settings in [&f.settings, &f.small] {
            let _ = judge(&TokenRules::default(), settings, kind, body);

            let budgeted = judge(&f.budget, settings, kind, body);
            if let (Ok(v), Ok(facts)) = (&budgeted, &got) {
                assert!(data.len() as u64 <= settings.max_body_bytes);
                // A model from stored state is not the body's: the verdict names none.
                assert!(v.model.is_none() || v.model == facts.model);
                assert!(
                    !(kind.generates() && facts.server_tools.any()),
                    "a budgeted token let a billed-per-call tool through"
                );
                let priced = settings
                    .prices
                    .price_for(facts.model.as_deref())
                    .is_some_and(|p| p.input_nano_per_mtok > 0);
                let capped = matches!(kind, RouteKind::Generation { .. } | RouteKind::PromptOnly);
                if capped && priced {
                    assert!(v.reservation > 0, "nothing reserved for {kind:?}");
                }
                if kind == RouteKind::Ocr {
                    assert!(v.reservation > 0, "nothing reserved for OCR");
                }
            }

            let ceiling = judge(&f.ceiling, settings, kind, body);
            // Dry run lets through exactly the rule refusals, as the team's codes, and nothing else.
            let (dry, would) = dry_run(&f.ceiling, settings, kind, body);
            match &ceiling {
                Ok(v) => assert!(would.is_empty() && dry.as_ref() == Ok(v), "{dry:?} {would:?}"),
                Err(d) if d.is_rule() => {
                    assert!(dry.is_ok(), "dry run refused {dry:?}");
                    assert_eq!(would.first(), Some(&d.clone().by_team()));
                }
                // Not a rule (body unreadable, too large, bad model name): refused all the same.
                Err(d) => assert_eq!(dry.as_ref().err().map(Denial::code), Some(d.code())),
            }
            if let (Ok(v), Some(_)) = (&ceiling, body) {
                let facts = got.as_ref().expect("admitted a body that does not parse");
                let model = v.model.as_deref().expect("admitted without a model");
                assert!(
                    model.starts_with("mistral-") || model == "codestral-latest",
                    "{model}"
                );
                if kind.generates() {
                    let asked = asked(kind, facts).expect("admitted without its cap field");
                    assert!(asked <= CEILING, "admitted {asked} > {CEILING}");
                }
            }
        }
    }
});
