//! Teams through the stream: both levels judged and charged, refusals named by level, dry runs
//! that let exactly the would-be refusals through, and the two-level overshoot bound over random
//! interleavings of concurrent requests.

use proptest::prelude::*;
use serde_json::{json, Value};

use super::fake::Gateway;
use super::Flow;
use crate::ledger::SharedDataLedger;

const CHAT: &str = "/v1/chat/completions";
const USD: u64 = 1_000_000_000;

fn body(max_tokens: u64) -> Vec<u8> {
    format!(r#"{{"model":"mistral-small-latest","max_tokens":{max_tokens},"messages":[{{"role":"user","content":"hi"}}]}}"#)
        .into_bytes()
}

fn usage(prompt: u64, completion: u64) -> Vec<u8> {
    format!(r#"{{"id":"x","model":"mistral-small-latest","choices":[{{"index":0,"message":{{"content":"ok"}}}}],"usage":{{"prompt_tokens":{prompt},"completion_tokens":{completion},"total_tokens":{}}}}}"#, prompt + completion)
        .into_bytes()
}

fn spent(gw: &Gateway, subject: &str) -> (u64, u64) {
    SharedDataLedger::new(&gw.host.store)
        .balance(subject)
        .unwrap_or_default()
}

fn code(gw: &Gateway) -> Option<String> {
    gw.host
        .replied()
        .map(|(_, body)| body["code"].as_str().unwrap_or("").to_string())
}

fn team_gateway(team: Value, members: Value) -> Gateway {
    Gateway::new(
        &[
            ("ann", members.clone()),
            ("ben", members),
            ("solo", json!({})),
        ],
        json!({"teams": [team]}),
    )
}

/// One whole request: headers, body, a response with `usage`, end. Returns the refusal code.
fn call(gw: &Gateway, token: &str, max_tokens: u64, completion: u64) -> Option<String> {
    let mut s = gw.request("POST", CHAT, token);
    if s.on_request_headers(&gw.host, false) == Flow::Continue {
        let b = body(max_tokens);
        let _ = gw.body(&mut s, &b, true);
    }
    let refused = code(gw);
    if refused.is_none() {
        gw.respond(&mut s, 200, &[("content-type", "application/json")]);
        gw.response_chunk(&mut s, &usage(10, completion), true);
    }
    s.on_log(&gw.host);
    refused
}

#[test]
fn a_member_is_judged_by_the_team_and_charged_at_both_levels() {
    let gw = team_gateway(
        json!({"id": "eng", "models": {"allow": ["mistral-small-*"]},
               "budget": {"limit_usd": "1", "window": "daily"}}),
        json!({"team": "eng"}),
    );
    assert_eq!(call(&gw, "ann", 50, 5), None);
    let cost = 10 * 150 + 5 * 600;
    assert_eq!(spent(&gw, "team.eng"), (cost, 0));
    assert_eq!(
        gw.host.stat("shieldkey.team.eng.spend_nano_usd"),
        cost as i64
    );
    assert_eq!(gw.host.stat("shieldkey.team.eng.requests"), 1);
    assert_eq!(gw.spend("ann"), cost as i64);
    assert_eq!(gw.host.filter_state.borrow()["shieldkey_team"], "eng");

    let mut s = gw.request("POST", CHAT, "ben");
    assert_eq!(s.on_request_headers(&gw.host, false), Flow::Continue);
    let large = br#"{"model":"mistral-large-latest","max_tokens":5}"#;
    assert_eq!(gw.body(&mut s, large, true), Flow::Pause);
    assert_eq!(code(&gw).as_deref(), Some("shield_team_model_denied"));
    s.on_log(&gw.host);
    assert_eq!(
        gw.host
            .stat("shieldkey.team.eng.reason.shield_team_model_denied.denied"),
        1
    );
    assert_eq!(spent(&gw, "team.eng"), (cost, 0), "nothing held");
    // A token outside the team is not judged by it.
    assert_eq!(call(&gw, "solo", 50, 5), None);
}

#[test]
fn the_team_budget_refuses_members_and_gives_their_own_reservation_back() {
    // Each member may spend 1 USD, the team 0.004 together.
    let gw = team_gateway(
        json!({"id": "eng", "budget": {"limit_usd": "0.004", "window": "daily"}}),
        json!({"team": "eng", "budget": {"limit_usd": "1", "window": "daily"}}),
    );
    // Reserving 3000 completion tokens (0.0018 USD, 0.0032 with the reservation's margin) fits
    // the team once.
    let mut first = gw.request("POST", CHAT, "ann");
    assert_eq!(first.on_request_headers(&gw.host, false), Flow::Continue);
    let f = gw.body(&mut first, &body(3000), true);
    assert_eq!(f, Flow::Continue, "{:?}", gw.host.replied());
    let held = spent(&gw, "team.eng").1;
    assert!(held > 0);
    assert_eq!(
        spent(&gw, "ann").1,
        held,
        "the same worst case at both levels"
    );

    let mut second = gw.request("POST", CHAT, "ben");
    assert_eq!(second.on_request_headers(&gw.host, false), Flow::Continue);
    assert_eq!(gw.body(&mut second, &body(3000), true), Flow::Pause);
    assert_eq!(code(&gw).as_deref(), Some("shield_team_budget_exceeded"));
    second.on_log(&gw.host);
    assert_eq!(
        spent(&gw, "ben"),
        (0, 0),
        "ben's own reservation was given back"
    );

    gw.respond(&mut first, 200, &[("content-type", "application/json")]);
    gw.response_chunk(&mut first, &usage(10, 2000), true);
    first.on_log(&gw.host);
    let cost = 10 * 150 + 2000 * 600;
    assert_eq!(spent(&gw, "team.eng"), (cost, 0));
    assert_eq!(spent(&gw, "ann"), (cost, 0));
}

#[test]
fn a_member_over_their_own_budget_is_refused_while_the_other_keeps_working() {
    let gw = team_gateway(
        json!({"id": "eng", "budget": {"limit_usd": "1", "window": "daily"}}),
        json!({"team": "eng", "budget": {"limit_usd": "0.002", "window": "daily"}}),
    );
    // 1500 tokens reserve about 0.0016 USD and cost 0.0009: the second does not fit.
    assert_eq!(call(&gw, "ann", 1500, 1500), None);
    assert_eq!(
        call(&gw, "ann", 1500, 1).as_deref(),
        Some("shield_budget_exceeded")
    );
    assert_eq!(call(&gw, "ben", 1500, 1), None);
}

#[test]
fn a_dry_run_lets_exactly_the_refusals_through_and_counts_them() {
    let team = json!({"id": "eng", "enforce": false,
                      "models": {"allow": ["mistral-small-*"]},
                      "rate_limit": {"requests_per_minute": 2}});
    let gw = team_gateway(team.clone(), json!({"team": "eng"}));
    // Three requests against a team limit of two per minute: the third would be refused.
    let mut would = Vec::new();
    for _ in 0..3 {
        assert_eq!(call(&gw, "ann", 10, 1), None);
        would.push(
            gw.host
                .filter_state
                .borrow()
                .get("shieldkey_would_deny")
                .cloned(),
        );
    }
    assert_eq!(
        would,
        [None, None, Some("shield_team_rate_limited".to_string())]
    );
    assert_eq!(
        gw.host
            .stat("shieldkey.reason.shield_team_rate_limited.would_deny"),
        1
    );
    assert_eq!(
        gw.host
            .stat("shieldkey.team.eng.reason.shield_team_rate_limited.would_deny"),
        1
    );
    assert_eq!(gw.host.stat("shieldkey.allowed"), 3);
    assert!(gw
        .host
        .logs
        .borrow()
        .iter()
        .any(|l| l.contains("dry run") && l.contains("shield_team_rate_limited")));
    // Authentication is never a dry run.
    let mut s = gw.request(
        "POST",
        CHAT,
        "sk_shield_t_ann_wrongwrongwrongwrongwrongwrongwrongwrongwro",
    );
    assert_eq!(s.on_request_headers(&gw.host, false), Flow::Pause);

    // The same policy enforced refuses the third.
    let mut enforced = team;
    enforced["enforce"] = json!(true);
    let gw = team_gateway(enforced, json!({"team": "eng"}));
    let codes: Vec<Option<String>> = (0..3).map(|_| call(&gw, "ann", 10, 1)).collect();
    assert_eq!(
        codes,
        [None, None, Some("shield_team_rate_limited".to_string())]
    );
}

#[test]
fn a_dry_run_budget_still_charges_what_the_requests_cost() {
    let gw = Gateway::new(
        &[(
            "ann",
            json!({"enforce": false, "budget": {"limit_usd": "0.001", "window": "daily"}}),
        )],
        json!({}),
    );
    assert_eq!(call(&gw, "ann", 3000, 3000), None);
    let over = spent(&gw, "ann").0;
    assert!(over > USD / 1000, "spend passes the limit: {over}");
    assert_eq!(
        gw.host.filter_state.borrow()["shieldkey_would_deny"],
        "shield_budget_exceeded"
    );
    // A policy-wide dry run covers a token that enforces on its own.
    let gw = Gateway::new(
        &[("ann", json!({"models": {"allow": ["codestral-*"]}}))],
        json!({"enforce": false}),
    );
    assert_eq!(call(&gw, "ann", 10, 1), None);
    assert_eq!(
        gw.host.filter_state.borrow()["shieldkey_would_deny"],
        "shield_model_denied"
    );
}

/// The two-level bound: however the phases of concurrent requests interleave, a team never
/// spends more than its limit, nor a member more than theirs, when every response costs at most
/// what was reserved for it; and every forwarded request is charged at both levels.
mod two_level_bound {
    use super::*;

    #[derive(Debug, Clone)]
    struct Req {
        member: usize,
        max_tokens: u64,
        completion_permille: u64,
    }

    enum Phase {
        New,
        Headers(super::super::Stream),
        Forwarded(super::super::Stream),
        Done,
    }

    /// Runs the requests with the team's and each member's limit (USD text), in the order the
    /// schedule picks, each advancing one phase; the rest are finished one by one.
    fn run(limits: (&str, &str), reqs: &[Req], schedule: &[usize]) -> (u64, [u64; 2], u64) {
        let gw = team_gateway(
            json!({"id": "eng", "budget": {"limit_usd": limits.0, "window": "daily"}}),
            json!({"team": "eng", "budget": {"limit_usd": limits.1, "window": "daily"}}),
        );
        let members = ["ann", "ben"];
        let mut phases: Vec<Phase> = reqs.iter().map(|_| Phase::New).collect();
        let mut charged = 0u64;
        let order = schedule
            .iter()
            .map(|i| i % reqs.len())
            .chain((0..reqs.len()).flat_map(|i| [i, i, i]));
        for i in order {
            let r = &reqs[i];
            phases[i] = match std::mem::replace(&mut phases[i], Phase::Done) {
                Phase::New => {
                    let mut s = gw.request("POST", CHAT, members[r.member]);
                    match s.on_request_headers(&gw.host, false) {
                        Flow::Continue => Phase::Headers(s),
                        Flow::Pause => {
                            s.on_log(&gw.host);
                            Phase::Done
                        }
                    }
                }
                Phase::Headers(mut s) => {
                    gw.host.reply.borrow_mut().take();
                    gw.host.request_body.borrow_mut().clear();
                    match gw.body(&mut s, &body(r.max_tokens), true) {
                        Flow::Continue => Phase::Forwarded(s),
                        Flow::Pause => {
                            s.on_log(&gw.host);
                            Phase::Done
                        }
                    }
                }
                Phase::Forwarded(mut s) => {
                    let completion = r.max_tokens * r.completion_permille / 1000;
                    gw.respond(&mut s, 200, &[("content-type", "application/json")]);
                    gw.response_chunk(&mut s, &usage(10, completion), true);
                    s.on_log(&gw.host);
                    charged += 10 * 150 + completion * 600;
                    Phase::Done
                }
                Phase::Done => Phase::Done,
            };
        }
        let team = spent(&gw, "team.eng");
        assert_eq!(team.1, 0, "nothing left reserved at the team");
        let ann = spent(&gw, "ann");
        let ben = spent(&gw, "ben");
        assert_eq!(
            (ann.1, ben.1),
            (0, 0),
            "nothing left reserved at the members"
        );
        (team.0, [ann.0, ben.0], charged)
    }

    fn requests() -> impl Strategy<Value = Vec<Req>> {
        prop::collection::vec(
            (0..2usize, 200..2000u64, 300..=1000u64).prop_map(
                |(member, max_tokens, completion_permille)| Req {
                    member,
                    max_tokens,
                    completion_permille,
                },
            ),
            1..24,
        )
    }

    fn check(limits: (u64, u64), got: (u64, [u64; 2], u64)) -> Result<(), TestCaseError> {
        let (team, members, charged) = got;
        prop_assert!(team <= limits.0, "team spent {team} > {}", limits.0);
        prop_assert!(
            members.iter().all(|m| *m <= limits.1),
            "members {members:?} > {}",
            limits.1
        );
        prop_assert_eq!(team, charged, "every forwarded request charged to the team");
        prop_assert_eq!(members[0] + members[1], charged, "and to its member");
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// The team's limit is below the sum of its members': the team level binds.
        #[test]
        fn the_team_is_not_overshot(
            reqs in requests(),
            schedule in prop::collection::vec(0usize..1000, 0..120),
        ) {
            let got = run(("0.003", "0.0025"), &reqs, &schedule);
            check((3 * USD / 1000, 25 * USD / 10_000), got)?;
        }

        /// Generous team, tight members: the member level binds.
        #[test]
        fn no_member_is_overshot(
            reqs in requests(),
            schedule in prop::collection::vec(0usize..1000, 0..120),
        ) {
            let got = run(("0.006", "0.0015"), &reqs, &schedule);
            check((6 * USD / 1000, 15 * USD / 10_000), got)?;
        }
    }
}

/// The audit record says who was refused and what they asked for: a revoked token whose secret
/// verified is named (and counted under the token), a refused request keeps its model, and what
/// a dry run let through before an enforced refusal is kept.
#[test]
fn refusals_are_audited_with_who_and_what() {
    let mut gw = Gateway::new(
        &[
            (
                "ann",
                json!({"team": "eng", "owner": "ann@example.com",
                           "models": {"allow": ["codestral-*"]}, "enforce": false}),
            ),
            ("ben", json!({})),
        ],
        json!({"teams": [{"id": "eng", "models": {"allow": ["mistral-small-*"], "max_tokens": 10}}]}),
    );
    let mut s = gw.request("POST", CHAT, "ann");
    assert_eq!(s.on_request_headers(&gw.host, false), Flow::Continue);
    assert_eq!(gw.body(&mut s, &body(50), true), Flow::Pause);
    assert_eq!(
        code(&gw).as_deref(),
        Some("shield_team_max_tokens_exceeded")
    );
    s.on_log(&gw.host);
    {
        let state = gw.host.filter_state.borrow();
        assert_eq!(state["shieldkey_model"], "mistral-small-latest");
        assert_eq!(state["shieldkey_would_deny"], "shield_model_denied");
        assert_eq!(state["shieldkey_owner"], "ann@example.com");
        assert_eq!(state["shieldkey_team"], "eng");
        assert_eq!(state["shieldkey_method"], "POST");
        assert!(!state.contains_key("shieldkey_cost_nano_usd"));
    }

    gw.reload(|doc| doc["tokens"][1]["status"] = json!("revoked"));
    let mut s = gw.request("POST", CHAT, "ben");
    assert_eq!(s.on_request_headers(&gw.host, false), Flow::Pause);
    assert_eq!(code(&gw).as_deref(), Some("shield_token_revoked"));
    s.on_log(&gw.host);
    assert_eq!(gw.host.filter_state.borrow()["shieldkey_token_id"], "ben");
    assert_eq!(
        gw.host
            .stat("shieldkey.token_id.ben.reason.shield_token_revoked.denied"),
        1
    );
    // A wrong secret names nobody.
    let mut s = gw.request(
        "POST",
        CHAT,
        "sk_shield_t_ben_wrongwrongwrongwrongwrongwrongwrongwrongwro",
    );
    assert_eq!(s.on_request_headers(&gw.host, false), Flow::Pause);
    s.on_log(&gw.host);
    let state = gw.host.filter_state.borrow();
    assert_eq!(state["shieldkey_decision"], "shield_token_invalid");
    assert!(!state.contains_key("shieldkey_token_id"));
}
