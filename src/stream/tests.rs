//! One stream driven natively through every phase and every early end. Each test asserts the
//! outcome (what went upstream, what was replied, what was charged), never the order of host
//! calls.

use serde_json::{json, Value};

use super::active::Active;
use super::fake::{Gateway, REAL_KEY};
use super::Flow;
use crate::ledger::SharedDataLedger;

const CHAT: &str = "/v1/chat/completions";

fn budgeted() -> Value {
    json!({"budget": {"limit_usd": "1", "window": "daily"},
           "models": {"allow": ["mistral-small-*"], "max_tokens": 100}})
}

fn gateway() -> Gateway {
    Gateway::new(
        &[
            ("alice", budgeted()),
            ("open", json!({})),
            ("admin", json!({"scopes": ["all"]})),
        ],
        json!({}),
    )
}

fn balance(gw: &Gateway, id: &str) -> (u64, u64) {
    SharedDataLedger::new(&gw.host.store)
        .balance(id)
        .unwrap_or_default()
}

fn code(gw: &Gateway) -> Option<(u32, String)> {
    gw.host
        .replied()
        .map(|(status, body)| (status, body["code"].as_str().unwrap_or("").to_string()))
}

const SMALL: &[u8] = br#"{"model":"mistral-small-latest","max_tokens":50,"messages":[{"role":"user","content":"hi"}]}"#;
const USAGE: &[u8] = br#"{"id":"x","model":"mistral-small-latest","choices":[{"index":0,"message":{"content":"ok"}}],"usage":{"prompt_tokens":10,"completion_tokens":5,"total_tokens":15}}"#;

/// One small chat request of `token` through every phase, answered with `USAGE` unless the
/// filter replied: the status of the filter's reply, if any.
fn serve(gw: &Gateway, token: &str) -> Option<u32> {
    let mut s = gw.request("POST", CHAT, token);
    s.on_request_headers(&gw.host, false);
    gw.body(&mut s, SMALL, true);
    if gw.host.replied().is_none() {
        gw.respond(&mut s, 200, &[("content-type", "application/json")]);
        gw.response_chunk(&mut s, USAGE, true);
    }
    s.on_log(&gw.host);
    gw.host.replied().map(|(status, _)| status)
}

#[test]
fn an_allowed_request_goes_upstream_with_the_real_key_uncompressed_and_is_charged_exactly() {
    let gw = gateway();
    let mut s = gw.request("POST", CHAT, "alice");
    assert_eq!(s.on_request_headers(&gw.host, false), Flow::Continue);
    assert_eq!(gw.body(&mut s, &SMALL[..20], false), Flow::Pause);
    assert_eq!(gw.body(&mut s, &SMALL[20..], true), Flow::Continue);
    assert_eq!(code(&gw), None);
    assert_eq!(
        gw.host.header("authorization"),
        Some(format!("Bearer {REAL_KEY}"))
    );
    assert_eq!(
        gw.host.header("accept-encoding").as_deref(),
        Some("identity")
    );
    assert!(balance(&gw, "alice").1 > 0, "reserved while in flight");
    gw.respond(&mut s, 200, &[("content-type", "application/json")]);
    gw.response_chunk(&mut s, USAGE, true);
    s.on_log(&gw.host);
    // 10 × 0.15 + 5 × 0.60 USD per million tokens.
    assert_eq!(balance(&gw, "alice"), (4_500, 0));
    assert_eq!(gw.spend("alice"), 4_500);
    assert_eq!(
        gw.host.filter_state.borrow()["shieldkey_decision"],
        "allowed"
    );
}

#[test]
fn a_settlement_reports_its_budget_and_the_window_it_was_charged_to() {
    let gw = gateway();
    let gauge =
        |gw: &Gateway, name: &str| gw.host.stat(&format!("shieldkey.token_id.alice.{name}"));
    let day = |ms: i64| ms.div_euclid(1000) - ms.div_euclid(1000).rem_euclid(86_400);
    let start = gw.host.now_ms.get();
    assert_eq!(serve(&gw, "alice"), None);
    assert_eq!(serve(&gw, "alice"), None);
    let report = |gw: &Gateway| {
        [
            "budget_limit_nano_usd",
            "budget_remaining_nano_usd",
            "budget_spent_nano_usd",
            "budget_window_start_seconds",
        ]
        .map(|n| gauge(gw, n))
    };
    assert_eq!(
        report(&gw),
        [1_000_000_000, 1_000_000_000 - 9_000, 9_000, day(start)]
    );
    // The next day: nothing changes the gauges until a request settles there.
    gw.host.now_ms.set(start + 86_400_000);
    assert_eq!(report(&gw)[3], day(start));
    assert_eq!(serve(&gw, "alice"), None);
    assert_eq!(
        report(&gw),
        [
            1_000_000_000,
            1_000_000_000 - 4_500,
            4_500,
            day(start) + 86_400
        ]
    );
    assert_eq!(
        gauge(&gw, "spend_nano_usd"),
        13_500,
        "the counter keeps counting"
    );
}

/// The limit and window-start gauges are sent only when they change (every worker sets the
/// same value); a new policy with another limit is reported on its first settlement.
#[test]
fn budget_gauges_that_rarely_change_are_sent_when_they_change() {
    let mut gw = gateway();
    let limit = |gw: &Gateway| {
        gw.host
            .stat("shieldkey.token_id.alice.budget_limit_nano_usd")
    };
    assert_eq!(serve(&gw, "alice"), None);
    let calls = gw.host.host_calls.get();
    assert_eq!(serve(&gw, "alice"), None);
    let second = gw.host.host_calls.get() - calls;
    assert_eq!(limit(&gw), 1_000_000_000);
    gw.reload(|doc| doc["tokens"][0]["budget"]["limit_usd"] = json!("2"));
    let calls = gw.host.host_calls.get();
    assert_eq!(serve(&gw, "alice"), None);
    assert_eq!(limit(&gw), 2_000_000_000);
    // The first settlement under the new policy sends the limit and the window start again.
    assert_eq!(gw.host.host_calls.get() - calls, second + 2);
}

/// A token's counters are created before its new or changed record is written, and not read
/// again while the record stays the same (counters are never removed): a reload reads each
/// record once, however many tokens have limits.
#[test]
fn counters_come_with_a_changed_record_and_cost_no_read_after() {
    let mut gw = gateway();
    let reads_of_a_reload = |gw: &mut Gateway, owner: &str| {
        let before = gw.host.store.reads.get();
        gw.reload(|doc| doc["tokens"][2]["owner"] = json!(owner));
        gw.host.store.reads.get() - before
    };
    let counters = |gw: &Gateway, id: &str| SharedDataLedger::new(&gw.host.store).balance(id);
    let one_with_limits = reads_of_a_reload(&mut gw, "a@example.com");
    assert_eq!(counters(&gw, "open"), None);
    gw.reload(|doc| doc["tokens"][1]["budget"] = json!({"limit_usd": "1", "window": "daily"}));
    assert_eq!(counters(&gw, "open"), Some((0, 0)), "before any request");
    assert_eq!(reads_of_a_reload(&mut gw, "b@example.com"), one_with_limits);
}

#[test]
fn a_body_ended_by_trailers_is_judged_before_anything_goes_upstream() {
    let gw = gateway();
    let greedy = br#"{"model":"mistral-small-latest","max_tokens":4000}"#;
    let mut s = gw.request("POST", CHAT, "alice");
    assert_eq!(s.on_request_headers(&gw.host, false), Flow::Continue);
    // HTTP/2 DATA without END_STREAM, then trailers.
    assert_eq!(gw.body(&mut s, greedy, false), Flow::Pause);
    assert_eq!(s.on_request_trailers(&gw.host), Flow::Pause);
    assert_eq!(
        code(&gw),
        Some((400, "shield_max_tokens_exceeded".to_string()))
    );
    s.on_log(&gw.host);
    assert_eq!(balance(&gw, "alice"), (0, 0), "admission given back");

    // The same framing with an acceptable body is forwarded at the trailers and charged.
    let mut s = gw.request("POST", CHAT, "alice");
    s.on_request_headers(&gw.host, false);
    gw.body(&mut s, SMALL, false);
    assert_eq!(s.on_request_trailers(&gw.host), Flow::Continue);
    assert_eq!(code(&gw), None);
    gw.respond(&mut s, 200, &[("content-type", "application/json")]);
    gw.response_chunk(&mut s, USAGE, true);
    s.on_log(&gw.host);
    assert_eq!(balance(&gw, "alice").0, 4_500);
}

#[test]
fn a_client_that_leaves_during_the_body_gives_its_reservation_back() {
    let gw = gateway();
    let mut s = gw.request("POST", CHAT, "alice");
    s.on_request_headers(&gw.host, false);
    gw.body(&mut s, &SMALL[..10], false);
    s.on_log(&gw.host);
    assert_eq!(balance(&gw, "alice"), (0, 0));
    assert_eq!(gw.spend("alice"), 0);
}

#[test]
fn a_body_over_the_inspection_limit_is_refused() {
    let gw = Gateway::new(
        &[("alice", budgeted())],
        json!({"requests": {"max_body_bytes": 64}}),
    );
    let mut s = gw.request("POST", CHAT, "alice");
    s.on_request_headers(&gw.host, false);
    assert_eq!(gw.body(&mut s, &[b' '; 65], false), Flow::Pause);
    assert_eq!(code(&gw), Some((413, "shield_body_too_large".to_string())));
    s.on_log(&gw.host);
    assert_eq!(balance(&gw, "alice"), (0, 0));
}

#[test]
fn a_compressed_response_is_charged_its_reservation_and_counted() {
    let gw = gateway();
    let mut s = gw.request("POST", CHAT, "alice");
    s.on_request_headers(&gw.host, false);
    gw.body(&mut s, SMALL, true);
    let (_, reserved) = balance(&gw, "alice");
    gw.respond(
        &mut s,
        200,
        &[
            ("content-type", "application/json"),
            ("content-encoding", "gzip"),
        ],
    );
    gw.response_chunk(&mut s, b"\x1f\x8b\x08\x00garbage", true);
    s.on_log(&gw.host);
    assert!(reserved > 0);
    assert_eq!(balance(&gw, "alice"), (reserved, 0));
    assert_eq!(gw.host.stat("shieldkey.unreadable_responses"), 1);
    assert_eq!(
        gw.host.stat("shieldkey.token_id.alice.estimated_charges"),
        1
    );
}

#[test]
fn an_upstream_reset_mid_stream_is_estimated_within_the_reservation() {
    let gw = gateway();
    let mut s = gw.request("POST", CHAT, "alice");
    s.on_request_headers(&gw.host, false);
    gw.body(&mut s, SMALL, true);
    let (_, reserved) = balance(&gw, "alice");
    gw.respond(&mut s, 200, &[("content-type", "text/event-stream")]);
    let event = br#"data: {"choices":[{"index":0,"delta":{"content":"abcdefgh"}}],"p":"padding-padding-padding"}

"#;
    gw.response_chunk(&mut s, event, false);
    // No end of stream: the upstream reset.
    s.on_log(&gw.host);
    let (spent, held) = balance(&gw, "alice");
    assert_eq!(held, 0);
    // A token per byte: the body's bytes as prompt, the 8 generated bytes (not the padding or
    // the framing) as completion.
    let prompt = SMALL.len() as u64;
    assert_eq!(spent, (prompt * 150 + 8 * 600).min(reserved));
    assert!(spent > 0 && spent <= reserved);
}

#[test]
fn routes_outside_the_table_or_the_scopes_are_refused_before_anything_is_forwarded() {
    let gw = gateway();
    for (method, path, token, want) in [
        (
            "DELETE",
            "/v1/models/ft:x",
            "open",
            (403, "shield_route_denied"),
        ),
        ("GET", "/v1/files", "open", (403, "shield_route_denied")),
        ("POST", "/v1/unknown", "open", (403, "shield_route_denied")),
        (
            "POST",
            "/v1/batch/jobs",
            "alice",
            (403, "shield_route_denied"),
        ),
        (
            "POST",
            "/v1/%63hat/completions",
            "alice",
            (400, "shield_path_not_canonical"),
        ),
        (
            "POST",
            "/v1//chat/completions",
            "open",
            (400, "shield_path_not_canonical"),
        ),
        (
            "POST",
            "/v1/./chat/completions",
            "open",
            (400, "shield_path_not_canonical"),
        ),
    ] {
        let mut s = gw.request(method, path, token);
        assert_eq!(
            s.on_request_headers(&gw.host, false),
            Flow::Pause,
            "{method} {path}"
        );
        assert_eq!(
            code(&gw),
            Some((want.0, want.1.to_string())),
            "{method} {path}"
        );
        assert_eq!(
            gw.host
                .header("authorization")
                .map(|a| a.contains(REAL_KEY)),
            Some(false),
            "{method} {path}: the real key was not swapped in"
        );
        s.on_log(&gw.host);
    }
    // `all` reaches routes ShieldKey does not know; they cost nothing it can see.
    let mut s = gw.request("POST", "/v1/unknown?x=1", "admin");
    assert_eq!(s.on_request_headers(&gw.host, true), Flow::Continue);
    assert_eq!(code(&gw), None);
    assert_eq!(balance(&gw, "alice"), (0, 0));
}

#[test]
fn a_budgeted_token_never_reaches_a_route_it_cannot_meter() {
    let gw = Gateway::new(
        &[(
            "bob",
            json!({"scopes": ["all"], "budget": {"limit_usd": "1", "window": "daily"}}),
        )],
        json!({}),
    );
    let mut s = gw.request("POST", "/v1/batch/jobs", "bob");
    s.on_request_headers(&gw.host, false);
    assert_eq!(code(&gw), Some((403, "shield_route_unmetered".to_string())));
    s.on_log(&gw.host);
    assert_eq!(balance(&gw, "bob"), (0, 0));
}

#[test]
fn n_choices_multiply_the_reservation_and_the_ceiling() {
    let gw = gateway();
    let mut s = gw.request("POST", CHAT, "alice");
    s.on_request_headers(&gw.host, false);
    gw.body(
        &mut s,
        br#"{"model":"mistral-small-latest","max_tokens":50,"n":3}"#,
        true,
    );
    assert_eq!(
        code(&gw),
        Some((400, "shield_max_tokens_exceeded".to_string()))
    );
}

#[test]
fn a_request_that_ends_before_its_decision_is_recorded_without_one() {
    let gw = gateway();
    let mut s = gw.request("POST", CHAT, "alice");
    assert_eq!(s.on_request_headers(&gw.host, false), Flow::Continue);
    assert!(
        gw.host.filter_state.borrow().is_empty(),
        "nothing decided yet"
    );
    // The client goes away while its body is held.
    s.on_log(&gw.host);
    let state = gw.host.filter_state.borrow();
    assert_eq!(state["shieldkey_token_id"], "alice");
    assert_eq!(state["shieldkey_method"], "POST");
    assert!(!state.contains_key("shieldkey_decision"), "{state:?}");
    assert_eq!(balance(&gw, "alice"), (0, 0), "its admission was released");
}

#[test]
fn a_model_name_that_could_forge_a_log_line_is_refused() {
    let gw = gateway();
    let mut s = gw.request("POST", CHAT, "alice");
    s.on_request_headers(&gw.host, false);
    gw.body(
        &mut s,
        b"{\"model\":\"mistral-small-x\\n[x] token=bob decision=allowed\",\"max_tokens\":1}",
        true,
    );
    assert_eq!(code(&gw), Some((400, "shield_model_invalid".to_string())));
    s.on_log(&gw.host);
    let state = gw.host.filter_state.borrow();
    assert!(state.values().all(|v| !v.contains('\n')));
}

#[test]
fn an_upstream_error_costs_nothing_and_releases_the_reservation() {
    let gw = gateway();
    let mut s = gw.request("POST", CHAT, "alice");
    s.on_request_headers(&gw.host, false);
    gw.body(&mut s, SMALL, true);
    gw.respond(&mut s, 503, &[("content-type", "application/json")]);
    gw.response_chunk(&mut s, br#"{"object":"error","message":"busy"}"#, true);
    s.on_log(&gw.host);
    assert_eq!(balance(&gw, "alice"), (0, 0));
}

#[test]
fn a_denied_request_is_never_accounted_and_leaves_no_reservation() {
    let gw = gateway();
    let mut s = gw.request("POST", CHAT, "alice");
    s.on_request_headers(&gw.host, false);
    gw.body(
        &mut s,
        br#"{"model":"mistral-large-latest","max_tokens":5}"#,
        true,
    );
    assert_eq!(code(&gw), Some((403, "shield_model_denied".to_string())));
    // Envoy runs the local reply through the response phases, then logs.
    gw.respond(&mut s, 403, &[("content-type", "application/json")]);
    gw.response_chunk(&mut s, b"{}", true);
    s.on_log(&gw.host);
    assert_eq!(balance(&gw, "alice"), (0, 0));
    assert_eq!(
        gw.host.stat("shieldkey.reason.shield_model_denied.denied"),
        1
    );
    assert_eq!(gw.host.stat("shieldkey.allowed"), 0);
}

#[test]
fn a_request_without_a_token_is_refused_and_nothing_is_swapped() {
    let gw = gateway();
    let mut s = gw.request(
        "POST",
        CHAT,
        "sk_shield_t_nobody_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
    );
    assert_eq!(s.on_request_headers(&gw.host, true), Flow::Pause);
    assert_eq!(code(&gw), Some((401, "shield_token_unknown".to_string())));
    s.on_log(&gw.host);
    assert!(gw.host.stat_names().iter().all(|n| !n.contains("nobody")));
}

#[test]
fn reloads_define_each_stat_once_and_keep_the_shared_data_key_set_flat() {
    let mut gw = gateway();
    assert_eq!(serve(&gw, "alice"), None);
    let keys = gw.host.store.key_count();
    for reload in 0..50 {
        // Every reload changes alice's limit, as `shieldkey limit` would.
        gw.reload(|doc| {
            doc["tokens"][0]["models"]["max_tokens"] = json!(100 + reload);
        });
        assert_eq!(serve(&gw, "alice"), None);
        assert_eq!(serve(&gw, "open"), None);
    }
    assert_eq!(
        gw.host.store.key_count(),
        keys,
        "no shared-data key per reload"
    );
    let defined = gw.host.definitions.borrow();
    assert!(
        defined.values().all(|n| *n == 1),
        "a stat defined twice: {:?}",
        defined.iter().filter(|(_, n)| **n > 1).collect::<Vec<_>>()
    );
    assert_eq!(gw.metric_ids.len(), defined.len());
    // Counters kept counting across all of it.
    assert_eq!(gw.host.stat("shieldkey.token_id.alice.requests"), 51);
    assert_eq!(gw.host.stat("shieldkey.token_id.open.requests"), 50);
}

#[test]
fn a_revocation_reaches_the_next_request_and_a_straggler_keeps_its_own_view() {
    let mut gw = gateway();
    let before = gw.active.clone();
    gw.reload(|doc| doc["tokens"][0]["status"] = json!("revoked"));
    let mut s = gw.request("POST", CHAT, "alice");
    s.on_request_headers(&gw.host, false);
    assert_eq!(code(&gw), Some((401, "shield_token_revoked".to_string())));
    // A worker still on the previous configuration reads the previous record.
    let mut straggler = super::Stream::new(Some(before));
    gw.request("POST", CHAT, "alice");
    assert_eq!(
        straggler.on_request_headers(&gw.host, false),
        Flow::Continue
    );
    assert_eq!(code(&gw), None);
}

/// etcd's reply to a claim's read: nothing claimed yet by anyone.
const NOTHING_CLAIMED: &[u8] = br#"{"header":{"revision":"5"},"succeeded":true,"responses":[{"response_range":{"header":{}}},{"response_range":{"header":{}}}]}"#;
const WRITTEN: &[u8] = br#"{"header":{"revision":"6"},"succeeded":true}"#;

/// A fleet gateway and alice's small request, its whole body in, held while this Envoy claims a
/// lease (it holds none): the first callout, reading the pool, is out.
fn fleet_request_waiting_for_a_claim() -> (Gateway, super::Stream) {
    let gw = gateway().into_fleet();
    let mut s = gw.request("POST", CHAT, "alice");
    assert_eq!(s.on_request_headers(&gw.host, false), Flow::Continue);
    assert_eq!(gw.body(&mut s, SMALL, true), Flow::Pause);
    (gw, s)
}

/// etcd answers callout `call` of `s` with `status` and `body`.
fn etcd_answers(gw: &Gateway, s: &mut super::Stream, call: u32, status: u32, body: &[u8]) {
    *gw.host.call_reply.borrow_mut() = (status, body.to_vec());
    s.on_call_response(&gw.host, call, 0);
}

#[test]
fn fleet_a_request_short_of_its_share_waits_for_one_claim_then_goes_on() {
    // The whole body is in, but this Envoy holds no lease: held while it claims one.
    let (gw, mut s) = fleet_request_waiting_for_a_claim();
    assert_eq!(code(&gw), None);
    assert_eq!(gw.host.calls.borrow().len(), 1, "read the pool");
    etcd_answers(&gw, &mut s, 1, 200, NOTHING_CLAIMED);
    let write: Value = serde_json::from_slice(&gw.host.calls.borrow()[1].1).unwrap();
    assert_eq!(write["compare"][0]["mod_revision"], "0");
    etcd_answers(&gw, &mut s, 2, 200, WRITTEN);
    assert_eq!(gw.host.resumed.get(), 1, "forwarded");
    assert_eq!(gw.host.stat("shieldkey.fleet.lease_claims"), 1);
    assert_eq!(code(&gw), None);
    gw.respond(&mut s, 200, &[("content-type", "application/json")]);
    gw.response_chunk(&mut s, USAGE, true);
    s.on_log(&gw.host);
    assert_eq!(balance(&gw, "alice").0, 4_500);
    assert_eq!(*gw.host.spent_marks.borrow(), vec!["alice".to_string()]);
    // The lease (a tenth of $1) covers the next request: no call at all.
    let mut next = gw.request("POST", CHAT, "alice");
    next.on_request_headers(&gw.host, false);
    assert_eq!(gw.body(&mut next, SMALL, true), Flow::Continue);
    assert_eq!(gw.host.calls.borrow().len(), 2);
}

/// etcd applied the claim's write but its reply never came (a timeout): the claim is read back,
/// and the node's claim carries this write's marker: granted once, the request goes on. A marker
/// of another write (or none) is claimed again, never granted twice.
#[test]
fn fleet_a_claim_applied_whose_reply_was_lost_is_read_back_and_granted() {
    let (gw, mut s) = fleet_request_waiting_for_a_claim();
    etcd_answers(&gw, &mut s, 1, 200, NOTHING_CLAIMED);
    let write: Value = serde_json::from_slice(&gw.host.calls.borrow()[1].1).unwrap();
    let b64 = base64::engine::general_purpose::STANDARD;
    let node_value = base64::Engine::decode(
        &b64,
        write["success"][1]["request_put"]["value"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    // The write is lost: a timeout.
    etcd_answers(&gw, &mut s, 2, 504, b"upstream request timeout");
    assert_eq!(gw.host.calls.borrow().len(), 3, "the claim read back");
    assert_eq!(gw.host.resumed.get(), 0);
    // What etcd holds: exactly that write.
    let stored = base64::Engine::encode(&b64, &node_value);
    let reply = format!(
        r#"{{"header":{{"revision":"6"}},"succeeded":true,"responses":[{{"response_range":{{}}}},{{"response_range":{{"kvs":[{{"key":"c","mod_revision":"6","value":"{stored}"}}]}}}}]}}"#
    );
    etcd_answers(&gw, &mut s, 3, 200, reply.as_bytes());
    assert_eq!(gw.host.resumed.get(), 1, "forwarded");
    assert_eq!(gw.host.stat("shieldkey.fleet.lease_claims"), 1);

    // Another request, same story, but the node's claim carries someone else's marker.
    let mut t = gw.request("POST", CHAT, "alice");
    t.on_request_headers(&gw.host, false);
    let huge = format!(
        r#"{{"model":"mistral-small-latest","max_tokens":200000,"messages":[{{"role":"user","content":"{}"}}]}}"#,
        "x".repeat(10)
    );
    // More than the lease held ($0.10): another claim.
    assert_eq!(gw.body(&mut t, huge.as_bytes(), true), Flow::Pause);
    {
        let n = gw.host.calls.borrow().len();
        etcd_answers(&gw, &mut t, n as u32, 200, NOTHING_CLAIMED);
        etcd_answers(&gw, &mut t, n as u32 + 1, 0, b"");
        let other =
            base64::Engine::encode(&b64, r#"{"claimed":100000000,"claim":"00000000000000ff"}"#);
        let reply = format!(
            r#"{{"header":{{"revision":"7"}},"succeeded":true,"responses":[{{"response_range":{{}}}},{{"response_range":{{"kvs":[{{"key":"c","mod_revision":"7","value":"{other}"}}]}}}}]}}"#
        );
        etcd_answers(&gw, &mut t, n as u32 + 2, 200, reply.as_bytes());
        // Not this write's: claimed again (a fresh read), not granted.
        assert_eq!(gw.host.stat("shieldkey.fleet.lease_claims"), 1);
        let last: Value =
            serde_json::from_slice(&gw.host.calls.borrow().last().unwrap().1).unwrap();
        assert!(last.get("compare").is_none(), "a read: {last}");
    }
}

#[test]
fn fleet_without_etcd_a_request_short_of_its_share_is_refused_and_gives_its_admission_back() {
    let (gw, mut s) = fleet_request_waiting_for_a_claim();
    etcd_answers(&gw, &mut s, 1, 503, b"upstream connect error");
    assert_eq!(code(&gw), Some((503, "shield_ledger_busy".to_string())));
    assert_eq!(gw.host.resumed.get(), 0);
    assert_eq!(gw.host.stat("shieldkey.fleet.lease_claim_failures"), 1);
    s.on_log(&gw.host);
    assert_eq!(balance(&gw, "alice"), (0, 0));
}

#[test]
fn fleet_a_spent_pool_refuses_with_the_budget_code() {
    let (gw, mut s) = fleet_request_waiting_for_a_claim();
    // Other Envoys claimed all of the $1 already.
    let full = base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        r#"{"claimed":1000000000}"#,
    );
    let reply = format!(
        r#"{{"header":{{"revision":"5"}},"succeeded":true,"responses":[{{"response_range":{{"kvs":[{{"key":"a","mod_revision":"3","value":"{full}"}}]}}}},{{"response_range":{{}}}}]}}"#
    );
    etcd_answers(&gw, &mut s, 1, 200, reply.as_bytes());
    assert_eq!(code(&gw), Some((429, "shield_budget_exceeded".to_string())));
}

#[test]
fn fleet_a_client_gone_while_its_request_waits_for_a_claim_leaves_nothing_held() {
    let (gw, mut s) = fleet_request_waiting_for_a_claim();
    s.on_log(&gw.host);
    assert_eq!(balance(&gw, "alice"), (0, 0));
}

/// What one request costs in calls into Envoy: a regression guard for the hot path (each host
/// call crosses the VM boundary). Printed with `--nocapture`; the bounds are today's counts.
#[test]
fn host_calls_per_request() {
    let gw = Gateway::new(
        &[
            ("open", json!({})),
            (
                "ruled",
                json!({"budget": {"limit_usd": "100", "window": "daily"},
                       "rate_limit": {"requests_per_minute": 100000, "tokens_per_minute": 100000000},
                       "source_cidrs": ["127.0.0.0/8"],
                       "models": {"allow": ["mistral-small-*"], "max_tokens": 1000}}),
            ),
        ],
        json!({}),
    );
    let mut counts = Vec::new();
    for token in ["open", "ruled", "open", "ruled"] {
        let (calls, reads, writes) = (
            gw.host.host_calls.get(),
            gw.host.store.reads.get(),
            gw.host.store.writes.get(),
        );
        let mut s = gw.request("POST", CHAT, token);
        if s.on_request_headers(&gw.host, false) == Flow::Continue {
            let _ = gw.body(&mut s, SMALL, true);
        }
        gw.respond(&mut s, 200, &[("content-type", "application/json")]);
        gw.response_chunk(&mut s, USAGE, true);
        s.on_log(&gw.host);
        assert_eq!(code(&gw), None);
        counts.push((
            token,
            gw.host.host_calls.get() - calls,
            gw.host.store.reads.get() - reads,
            gw.host.store.writes.get() - writes,
        ));
    }
    println!("(token, host calls, shared-data reads, shared-data writes): {counts:?}");
    // The second request of each token: stats and records are defined and cached by then.
    let (_, open_calls, open_reads, open_writes) = counts[2];
    let (_, ruled_calls, ruled_reads, ruled_writes) = counts[3];
    // Without rules the body is still read, for the tools the upstream would run. The audit
    // record's fields are one filter-state write.
    assert!(
        open_calls <= 11 && open_reads + open_writes == 0,
        "{counts:?}"
    );
    assert!(
        ruled_calls <= 15 && ruled_reads + ruled_writes <= 6,
        "{counts:?}"
    );
}

/// Tokens are read one at a time when a configuration loads, but published all or nothing: a
/// configuration with an invalid token writes no record and the previous one keeps serving; a
/// configuration already published by another root context is not read again.
#[test]
fn a_configuration_with_an_invalid_token_writes_nothing() {
    let mut gw = gateway();
    let writes = gw.host.store.writes.get();
    let err = gw
        .try_reload(|doc| {
            doc["tokens"][0]["budget"]["limit_usd"] = json!("2");
            doc["tokens"][2]["upstream_key"] = json!("nowhere");
        })
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("tokens[2].upstream_key"), "{err}");
    // Claiming the generation is the only write.
    assert_eq!(gw.host.store.writes.get() - writes, 1);
    let mut s = gw.request("POST", CHAT, "open");
    assert_eq!(s.on_request_headers(&gw.host, true), Flow::Continue);

    // The same document again (another root context of it): no token read, nothing written.
    let doc = gw.document.borrow().clone();
    let bytes = serde_json::to_vec(&doc).unwrap();
    let head = crate::config::token_stream::parse_head(&bytes).unwrap();
    // The failed configuration was the newest: this one is published again, once.
    Active::load(&gw.host, &bytes, &head, &gw.master, &gw.metric_ids, None).unwrap();
    let (reads, writes) = (gw.host.store.reads.get(), gw.host.store.writes.get());
    Active::load(&gw.host, &bytes, &head, &gw.master, &gw.metric_ids, None).unwrap();
    assert_eq!(gw.host.store.writes.get(), writes);
    assert!(
        gw.host.store.reads.get() - reads <= 2,
        "only the generations key"
    );
    assert!(gw
        .host
        .logs
        .borrow()
        .last()
        .is_some_and(|l| l.contains("records published by another root context")));
}

/// Fleet mode keeps one configuration while records change in place: a worker's memory of the
/// secrets that verified (`verified_secrets.rs`) must not outlive the record they verified
/// against. A token removed and minted again under its id refuses the old secret at once, and
/// a revocation in place refuses the remembered new one.
#[test]
fn fleet_a_token_minted_again_in_place_refuses_its_old_secret_though_remembered() {
    use crate::token::format_token;
    use crate::token_digest::TokenVerifier;
    let gw = gateway().into_fleet();
    let old = gw.tokens["open"].clone();
    assert_eq!(serve(&gw, &old), None);
    assert_eq!(serve(&gw, &old), None, "served again from memory");

    let (new, secret) = format_token("open", &[42u8; 32]);
    let new = String::from_utf8(new.expose().to_vec()).unwrap();
    let verifier = TokenVerifier::new(gw.master.digest_key()).unwrap();
    let (mut record, _) = crate::policy_store::lookup_newest(&gw.host.store, "open").unwrap();
    record.digest = verifier.digest("open", secret.expose());
    let encoded = crate::token_record::encode(&record);
    crate::policy_store::put_newest(&gw.host.store, "open", 2, Some(&encoded)).unwrap();
    assert_eq!(serve(&gw, &old), Some(401), "old secret after the re-mint");
    assert_eq!(code(&gw), Some((401, "shield_token_invalid".into())));
    assert_eq!(serve(&gw, &new), None);
    assert_eq!(serve(&gw, &old), Some(401));

    record.revoked = true;
    let encoded = crate::token_record::encode(&record);
    crate::policy_store::put_newest(&gw.host.store, "open", 3, Some(&encoded)).unwrap();
    assert_eq!(serve(&gw, &new), Some(401), "remembered, but revoked");
    assert_eq!(code(&gw), Some((401, "shield_token_revoked".into())));
}
