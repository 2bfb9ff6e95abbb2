"""Issue 3: spend accounting and budgets from Mistral usage, in a real Envoy with 2 workers."""

from __future__ import annotations

import http.client
import json
import socket
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from mistralai.client import Mistral

from deployment import Deployment, request, error_code, WASM
from deployment import token_stat as stat, wait_token_stat as wait_stat

# Built-in prices (USD per 1M tokens) from the dated table, in nano-USD per token × 1e6.
SMALL_IN, SMALL_OUT = 150_000_000, 600_000_000      # mistral-small-latest: 0.15 / 0.60
EMBED_IN = 100_000_000                              # mistral-embed: 0.10
CODE_IN, CODE_OUT = 300_000_000, 900_000_000        # codestral-latest: 0.30 / 0.90
MEDIUM_IN, MEDIUM_OUT = 1_500_000_000, 7_500_000_000  # mistral-medium-latest: 1.50 / 7.50
# The default for models the table does not know: the highest input and output prices in it
# (pixtral-large / magistral-medium input 2.00, mistral-medium-latest output 7.50).
MAX_IN, MAX_OUT = 2_000_000_000, 7_500_000_000


def cost(prompt, completion, pin=SMALL_IN, pout=SMALL_OUT, cached=0, priority=False):
    """Independent re-implementation of the documented billing rule: cached prompt tokens at 10%,
    priority at 1.75x, integer nano-USD rounded up once."""
    tenths = (prompt - cached) * pin * 10 + cached * pin + completion * pout * 10
    scaled = tenths * (175 if priority else 100)
    return -(-scaled // (1_000_000 * 10 * 100))


@pytest.fixture(scope="module")
def dep(tmp_path_factory, mock_mistral, mock_keys):
    d = Deployment(tmp_path_factory.mktemp("spend"), mock_mistral, mock_keys, policy_extra={
        "alerts": {"thresholds_percent": [50, 80, 100],
                   "webhook": {"cluster": "mistral", "path": "/__mock/alerts"}},
        "pricing": {"models": [{"model": "ft:small:acme", "input_usd_per_mtok": "0.5",
                                "output_usd_per_mtok": "2"}]},
    })
    d.mint("meter", "prod")
    d.mint("capped", "prod")
    d.mint("resetting", "prod")
    d.mint("crowd", "prod")
    d.mint("reloaded", "prod")
    d.mint("alerting", "prod", "--owner", "team-ml")
    d.mint("tiers", "prod")
    d.mint("cut", "prod")
    d.mint("agent", "prod")
    d.mint("priced", "prod")
    budgets = {
        "capped": ("0.001", "lifetime"),
        "resetting": ("0.0005", "3s"),
        "crowd": ("0.01", "monthly"),
        "reloaded": ("1.00", "daily"),
        "alerting": ("0.001", "daily"),
        "cut": ("1.00", "lifetime"),
    }

    def set_budgets(policy):
        for t in policy["tokens"]:
            if t["id"] in budgets:
                limit, window = budgets[t["id"]]
                t["budget"] = {"limit_usd": limit, "window": window}
    d.edit_policy(set_budgets)
    d.start()
    yield d
    d.stop()


def sdk(dep, token):
    return Mistral(api_key=dep.tokens[token], server_url=dep.url, timeout_ms=30_000)



def test_exact_spend_for_chat_stream_and_embeddings_via_sdk(dep, mock_mistral):
    client = sdk(dep, "meter")
    mock_mistral.behaviour(usage={"prompt_tokens": 1000, "completion_tokens": 500})
    r = client.chat.complete(model="mistral-small-latest", messages=[{"role": "user", "content": "hi"}])
    assert r.usage.prompt_tokens == 1000
    expected = cost(1000, 500)
    assert wait_stat(dep, "meter", "spend_nano_usd", expected) == expected

    mock_mistral.behaviour(usage={"prompt_tokens": 300, "completion_tokens": 700}, stream_chunks=5)
    chunks = list(client.chat.stream(model="mistral-small-latest", messages=[{"role": "user", "content": "hi"}]))
    assert chunks and chunks[-1].data.usage.completion_tokens == 700
    expected += cost(300, 700)
    assert wait_stat(dep, "meter", "spend_nano_usd", expected) == expected

    mock_mistral.behaviour(usage={"prompt_tokens": 40, "completion_tokens": 0})
    e = client.embeddings.create(model="mistral-embed", inputs=["a", "b"])
    assert e.usage.prompt_tokens == 40
    expected += cost(40, 0, pin=EMBED_IN)
    assert wait_stat(dep, "meter", "spend_nano_usd", expected) == expected
    assert stat(dep, "meter", "prompt_tokens") == 1340
    assert stat(dep, "meter", "completion_tokens") == 1200
    assert stat(dep, "meter", "requests") == 3


def test_fim_cached_prompt_tokens_and_priority_tier_are_billed_exactly(dep, mock_mistral):
    client = sdk(dep, "tiers")
    mock_mistral.behaviour(usage={"prompt_tokens": 200, "completion_tokens": 100})
    r = client.fim.complete(model="codestral-latest", prompt="def add(a, b):", suffix="return c")
    assert r.usage.completion_tokens == 100
    expected = cost(200, 100, pin=CODE_IN, pout=CODE_OUT)
    assert wait_stat(dep, "tiers", "spend_nano_usd", expected) == expected

    # 800 of 1000 prompt tokens from the cache (10%), priority tier (x1.75).
    mock_mistral.behaviour(usage={"prompt_tokens": 1000, "completion_tokens": 100, "cached_tokens": 800},
                           service_tier="priority")
    r = client.chat.complete(model="mistral-small-latest", messages=[{"role": "user", "content": "hi"}])
    assert r.usage.prompt_tokens_details["cached_tokens"] == 800
    expected += cost(1000, 100, cached=800, priority=True)
    assert wait_stat(dep, "tiers", "spend_nano_usd", expected) == expected
    assert stat(dep, "tiers", "prompt_tokens") == 1200
    assert stat(dep, "tiers", "completion_tokens") == 200


def test_agents_are_billed_at_the_model_the_response_names(dep, mock_mistral):
    # An agents request names no model; the price comes from the model in the response.
    client = sdk(dep, "agent")
    mock_mistral.behaviour(usage={"prompt_tokens": 100, "completion_tokens": 50})
    r = client.agents.complete(agent_id="ag_0123", messages=[{"role": "user", "content": "hi"}])
    assert r.model == "mistral-medium-latest"
    expected = cost(100, 50, pin=MEDIUM_IN, pout=MEDIUM_OUT)
    assert wait_stat(dep, "agent", "spend_nano_usd", expected) == expected

    mock_mistral.behaviour(usage={"prompt_tokens": 30, "completion_tokens": 70}, stream_chunks=4)
    chunks = list(client.agents.stream(agent_id="ag_0123", messages=[{"role": "user", "content": "hi"}]))
    assert chunks[-1].data.usage.completion_tokens == 70
    expected += cost(30, 70, pin=MEDIUM_IN, pout=MEDIUM_OUT)
    assert wait_stat(dep, "agent", "spend_nano_usd", expected) == expected
    assert dep.envoy.stat("wasmcustom.shieldkey.model.mistral-medium-latest.requests") == 2


def test_price_overrides_and_unknown_models(dep, mock_mistral):
    mock_mistral.behaviour(usage={"prompt_tokens": 1000, "completion_tokens": 1000})
    tiny = {"messages": [{"role": "user", "content": "hi"}]}
    assert request(dep.url, token=dep.tokens["priced"], body={**tiny, "model": "ft:small:acme"})[0] == 200
    expected = cost(1000, 1000, pin=500_000_000, pout=2_000_000_000)
    assert wait_stat(dep, "priced", "spend_nano_usd", expected) == expected
    # Unknown to the table and to the overrides: billed at the safe default, never under.
    assert request(dep.url, token=dep.tokens["priced"], body={**tiny, "model": "mystery-model"})[0] == 200
    expected += cost(1000, 1000, pin=MAX_IN, pout=MAX_OUT)
    assert wait_stat(dep, "priced", "spend_nano_usd", expected) == expected
    assert dep.envoy.stat("wasmcustom.shieldkey.model.ft:small:acme.requests") == 1
    assert dep.envoy.stat("wasmcustom.shieldkey.model.unpriced.requests") == 1


def test_error_responses_cost_nothing(dep, mock_mistral):
    before = stat(dep, "meter", "spend_nano_usd")
    mock_mistral.behaviour(status=500)
    status, _, _ = request(dep.url, token=dep.tokens["meter"])
    assert status == 500
    time.sleep(0.2)
    assert stat(dep, "meter", "spend_nano_usd") == before


def test_exhausted_budget_is_refused_before_the_upstream(dep, mock_mistral):
    # 0.001 USD; each response costs 150_000 + 1_200_000 nano = more than the whole budget.
    mock_mistral.behaviour(usage={"prompt_tokens": 1000, "completion_tokens": 2000})
    status, _, _ = request(dep.url, token=dep.tokens["capped"],
                           body={"model": "mistral-small-latest", "max_tokens": 50,
                                 "messages": [{"role": "user", "content": "hi"}]})
    assert status == 200
    wait_stat(dep, "capped", "spend_nano_usd", 1)
    mock_mistral.reset()
    status, headers, body = request(dep.url, token=dep.tokens["capped"])
    assert status == 429, body
    assert error_code(body) == "shield_budget_exceeded"
    assert "lifetime" in json.loads(body)["message"]
    assert mock_mistral.requests() == []
    assert stat(dep, "capped", "budget_remaining_nano_usd") == 0
    assert stat(dep, "capped", "budget_limit_nano_usd") == 1_000_000


def test_budget_window_reset_restores_access(dep, mock_mistral):
    mock_mistral.behaviour(usage={"prompt_tokens": 1000, "completion_tokens": 1000})
    deadline = time.monotonic() + 10
    while True:
        status, headers, body = request(dep.url, token=dep.tokens["resetting"],
                                        body={"model": "mistral-small-latest", "max_tokens": 10,
                                              "messages": [{"role": "user", "content": "x"}]})
        if status == 429:
            break
        assert status == 200 and time.monotonic() < deadline
    assert error_code(body) == "shield_budget_exceeded"
    reset = headers["x-shieldkey-budget-reset"]
    assert reset in json.loads(body)["message"]
    reset_at = time.mktime(time.strptime(reset, "%Y-%m-%dT%H:%M:%SZ")) - time.timezone
    time.sleep(max(0.0, reset_at - time.time()) + 0.3)
    status, _, body = request(dep.url, token=dep.tokens["resetting"],
                              body={"model": "mistral-small-latest", "max_tokens": 10,
                                    "messages": [{"role": "user", "content": "x"}]})
    assert status == 200, body


def test_concurrent_requests_never_overshoot_the_budget(dep, mock_mistral):
    """64 requests at once against 0.01 USD. Each asks max_tokens=2000 and really uses all of it
    (the worst case the reservation covers), so recorded spend must stay within the limit: the
    documented bound is zero overshoot when responses stay within max_tokens."""
    limit = 10_000_000
    mock_mistral.behaviour(usage={"prompt_tokens": 20, "completion_tokens": 2000}, chunk_delay_ms=0)
    body = {"model": "mistral-small-latest", "max_tokens": 2000,
            "messages": [{"role": "user", "content": "count"}]}

    def one(_):
        return request(dep.url, token=dep.tokens["crowd"], body=body)[0]

    with ThreadPoolExecutor(max_workers=64) as pool:
        statuses = list(pool.map(one, range(64)))
    ok = statuses.count(200)
    assert ok >= 1 and statuses.count(429) >= 1, statuses
    assert set(statuses) <= {200, 429}
    per_request = cost(20, 2000)
    spent = wait_stat(dep, "crowd", "spend_nano_usd", ok * per_request)
    assert spent == ok * per_request
    assert spent <= limit, (spent, limit)


def test_client_abort_mid_stream_is_still_charged(dep, mock_mistral):
    mock_mistral.behaviour(usage={"prompt_tokens": 10, "completion_tokens": 400},
                           stream_chunks=40, chunk_delay_ms=50)
    before = stat(dep, "meter", "spend_nano_usd")
    est_before = stat(dep, "meter", "estimated_charges")
    payload = json.dumps({"model": "mistral-small-latest", "stream": True, "max_tokens": 400,
                          "messages": [{"role": "user", "content": "long story"}]}).encode()
    host, port = dep.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                  + f"authorization: Bearer {dep.tokens['meter']}\r\ncontent-length: {len(payload)}\r\n\r\n".encode()
                  + payload)
        got = b""
        while got.count(b"data:") < 3:
            got += s.recv(4096)
        assert b" 200 " in got.split(b"\r\n", 1)[0]
    # The client is gone; Envoy resets the stream and the filter charges an estimate.
    assert wait_stat(dep, "meter", "estimated_charges", est_before + 1) == est_before + 1
    assert stat(dep, "meter", "spend_nano_usd") > before


def test_upstream_reset_mid_stream_is_charged_an_estimate_within_its_reservation(dep, mock_mistral):
    # The upstream sends two chunks, then drops the connection: no usage ever arrives.
    mock_mistral.behaviour(usage={"prompt_tokens": 10, "completion_tokens": 10},
                           stream_chunks=10, abort_after_chunks=2)
    payload = json.dumps({"model": "mistral-small-latest", "stream": True, "max_tokens": 300,
                          "messages": [{"role": "user", "content": "cut me off"}]}).encode()
    host, port = dep.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request("POST", "/v1/chat/completions", body=payload,
                 headers={"content-type": "application/json",
                          "authorization": f"Bearer {dep.tokens['cut']}"})
    resp = conn.getresponse()
    try:
        got = resp.read()
    except http.client.IncompleteRead as cut:
        got = cut.partial
    conn.close()
    assert resp.status == 200 and b"[DONE]" not in got
    # The estimate (README, "Spend and budgets"): a token per byte of the request body (prompt)
    # and of the generated text (completion), never more than the reservation.
    generated = 0
    for line in got.decode().splitlines():
        if line.startswith("data: {"):
            for choice in json.loads(line[6:]).get("choices", []):
                content = choice.get("delta", {}).get("content")
                generated += len(content) if isinstance(content, str) else 0
    assert generated > 0
    estimate = cost(len(payload), generated)
    reservation = cost(len(payload), 300, priority=True)
    assert 0 < estimate < reservation
    assert wait_stat(dep, "cut", "estimated_charges", 1) == 1
    assert wait_stat(dep, "cut", "spend_nano_usd", estimate) == estimate
    # The estimate also counts toward tokens-per-minute limits: aborting does not dodge them.
    assert stat(dep, "cut", "completion_tokens") == generated


def test_spend_survives_a_configuration_reload(dep, mock_mistral):
    mock_mistral.behaviour(usage={"prompt_tokens": 1000, "completion_tokens": 1000})
    assert request(dep.url, token=dep.tokens["reloaded"])[0] == 200
    one = cost(1000, 1000)
    limit = 1_000_000_000
    wait_stat(dep, "reloaded", "spend_nano_usd", one)
    assert stat(dep, "reloaded", "budget_remaining_nano_usd") == limit - one

    dep.mint("newcomer", "prod", "--publish", str(dep.ecds), "--wasm", str(WASM))
    dep.wait_for_config_version(dep.revision())
    assert request(dep.url, token=dep.tokens["reloaded"])[0] == 200
    wait_stat(dep, "reloaded", "spend_nano_usd", 2 * one)
    # Had the counters been reset by the reload, remaining would be limit - one again.
    deadline = time.monotonic() + 5
    while stat(dep, "reloaded", "budget_remaining_nano_usd") != limit - 2 * one:
        assert time.monotonic() < deadline, stat(dep, "reloaded", "budget_remaining_nano_usd")
        time.sleep(0.02)


def test_threshold_alerts_reach_the_webhook_once(dep, mock_mistral):
    # 0.001 USD daily; each request costs 0.00045 USD: 45%, 90%, then 135%.
    mock_mistral.behaviour(usage={"prompt_tokens": 1000, "completion_tokens": 500})
    small = {"model": "mistral-small-latest", "max_tokens": 10, "messages": [{"role": "user", "content": "x"}]}
    statuses = [request(dep.url, token=dep.tokens["alerting"], body=small)[0] for _ in range(4)]
    assert statuses[:3] == [200, 200, 200] and statuses[3] == 429, statuses

    def alerts():
        # Other tokens of this module cross thresholds too; only this token's alerts count here.
        posted = [json.loads(r["body"]) for r in mock_mistral.requests() if r["path"] == "/__mock/alerts"]
        return [a for a in posted if a["token_id"] == "alerting"]
    deadline = time.monotonic() + 5
    while len(alerts()) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    got = alerts()
    assert sorted(a["threshold_percent"] for a in got) == [50, 80, 100], got
    assert all(a["owner"] == "team-ml" and a["limit_usd"] == "0.001" for a in got)
    assert stat(dep, "alerting", "budget_alerts") == 3
    assert "budget alert: token alerting" in dep.envoy.log_text()


def test_prometheus_labels_for_token_model_and_reason(dep, mock_mistral):
    mock_mistral.behaviour(usage={"prompt_tokens": 10, "completion_tokens": 10})
    assert request(dep.url, token=dep.tokens["meter"])[0] == 200
    wait_stat(dep, "meter", "requests", 1)
    text = dep.envoy.admin_get("/stats/prometheus")
    lines = [l for l in text.splitlines() if l.startswith("shieldkey_")]
    assert any(l.startswith('shieldkey_spend_nano_usd{token_id="meter"}') for l in lines), lines[:20]
    assert any(l.startswith('shieldkey_requests{model="mistral-small-latest"}') for l in lines), lines[:20]
    assert any(l.startswith('shieldkey_denied{reason="shield_budget_exceeded"}') for l in lines), lines[:20]
    assert any('token_id="capped"' in l and 'reason="shield_budget_exceeded"' in l for l in lines), lines[:20]
    # One series set per configured token: nothing keyed by client input.
    token_ids = {l.split('token_id="')[1].split('"')[0] for l in lines if 'token_id="' in l}
    assert token_ids <= set(dep.tokens)


def test_the_audit_trail_records_each_request_exactly(dep, mock_mistral):
    """One JSON object per request, allowed or refused, in the file and on stdout, whose fields
    match the requests exactly; never a secret, a prompt or a completion."""
    mock_mistral.behaviour(usage={"prompt_tokens": 1000, "completion_tokens": 500})
    prompt = "the secret recipe is 42"
    body = {"model": "mistral-small-latest", "messages": [{"role": "user", "content": prompt}]}
    status, headers, reply = request(dep.url, token=dep.tokens["meter"], body=body)
    assert status == 200
    status, denied_headers, _ = request(dep.url, token=dep.tokens["capped"])
    assert status == 429
    # Envoy returns its request id (`always_set_request_id_in_response`): it finds the record.
    ids = (headers["x-request-id"], denied_headers["x-request-id"])
    deadline = time.monotonic() + 5
    while True:
        by_id = {r["request_id"]: r for r in dep.envoy.audit_records()}
        if all(i in by_id for i in ids) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    allowed, denied = by_id[ids[0]], by_id[ids[1]]
    sent = len(json.dumps(body).encode())
    assert allowed["host"] == socket.gethostname()
    assert {k: v for k, v in allowed.items()
            if k not in ("time", "duration_ms", "bytes_sent", "host")} == {
        "token_id": "meter", "owner": None, "team": None, "decision": "allowed",
        "would_deny": None, "client_address": "127.0.0.1", "country": None, "method": "POST",
        "route": "v1/chat/completions", "model": "mistral-small-latest", "upstream_key": "prod",
        "prompt_tokens": "1000", "completion_tokens": "500",
        "cost_nano_usd": str(cost(1000, 500)), "cost_estimated": "false", "status": 200,
        "bytes_received": sent, "request_id": headers["x-request-id"]}
    assert allowed["bytes_sent"] == len(reply)
    assert isinstance(allowed["duration_ms"], int)
    assert allowed["time"].endswith("Z") and allowed["time"][:4].isdigit()
    assert denied["decision"] == "shield_budget_exceeded" and denied["status"] == 429
    assert denied["token_id"] == "capped" and denied["cost_nano_usd"] is None
    # stdout carries the same records.
    stdout = {r["request_id"]: r for r in dep.envoy.audit_records(source="stdout")}
    assert stdout[ids[0]] == allowed and stdout[ids[1]] == denied
    # Nothing secret or private in the trail.
    text = (dep.workdir / "shieldkey-audit.log").read_text()
    for secret in [*dep.tokens.values(), *dep.keys.values(), dep.master_key, prompt, "Hello"]:
        assert secret not in text

def test_a_failing_webhook_never_blocks_traffic(tmp_path, mock_mistral, mock_keys):
    # The webhook answers 401 (the mock wants a Mistral key): every alert call fails.
    d = Deployment(tmp_path, mock_mistral, mock_keys, policy_extra={
        "alerts": {"webhook": {"cluster": "mistral", "path": "/hooks/refusing", "timeout_ms": 500}}})
    d.mint("loud")
    d.edit_policy(lambda p: p["tokens"][0].update(budget={"limit_usd": "0.001", "window": "daily"}))
    d.start()
    try:
        mock_mistral.behaviour(usage={"prompt_tokens": 1000, "completion_tokens": 500})
        small = {"model": "mistral-small-latest", "max_tokens": 10, "messages": [{"role": "user", "content": "x"}]}
        assert [request(d.url, token=d.tokens["loud"], body=small)[0] for _ in range(3)] == [200] * 3
        deadline = time.monotonic() + 5
        while (d.envoy.stat("wasmcustom.shieldkey.webhook_failures") or 0) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert d.envoy.stat("wasmcustom.shieldkey.webhook_failures") == 3
        assert d.envoy.stat("wasmcustom.shieldkey.token_id.loud.budget_alerts") == 3
        assert "budget alert webhook failed (status 401)" in d.envoy.log_text()
        hooks = [r for r in mock_mistral.requests() if r["path"] == "/hooks/refusing"]
        assert len(hooks) == 3 and all(json.loads(h["body"])["token_id"] == "loud" for h in hooks)
    finally:
        d.stop()
