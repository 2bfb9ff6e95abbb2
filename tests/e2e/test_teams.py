"""Issue 16: teams in a real Envoy (2 workers): shared team budgets and limits above each member's
own, checked together under concurrency; offboarding by owner and by team, live; dry runs that let
exactly the would-be refusals through, counted and logged, until switched to enforce; team
counters that survive reloads; team stats with a Prometheus label."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from deployment import Deployment, error_code, request

USD = 1_000_000_000
SMALL_IN, SMALL_OUT = 150, 600  # nano-USD per token of mistral-small-latest


def cost(prompt: int, completion: int) -> int:
    return prompt * SMALL_IN + completion * SMALL_OUT


def chat(model: str = "mistral-small-latest", max_tokens: int = 1000) -> dict:
    return {"model": model, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": "hi"}]}


def team_stat(dep: Deployment, team: str, name: str) -> int:
    return dep.envoy.stat(f"wasmcustom.shieldkey.team.{team}.{name}") or 0


def stat(dep: Deployment, name: str) -> int:
    return dep.envoy.stat(f"wasmcustom.shieldkey.{name}") or 0


def settle(dep: Deployment, name: str, value_of) -> int:
    """Accounting happens when a stream is logged, just after the response: wait until stable."""
    last, deadline = None, time.monotonic() + 5
    while time.monotonic() < deadline:
        value = value_of()
        if value == last:
            return value
        last = value
        time.sleep(0.1)
    return last


def members(**per_token):
    def apply(policy):
        for t in policy["tokens"]:
            t.update(per_token.get(t["id"], {}))
    return apply


@pytest.fixture()
def dep(tmp_path, mock_mistral, mock_keys):
    d = Deployment(tmp_path, mock_mistral, mock_keys)
    d.mint("ann", "prod", "--owner", "ann@example.com")
    d.mint("ben", "prod", "--owner", "ben@example.com")
    d.mint("cat", "prod", "--owner", "cat@example.com")
    d.mint("solo", "prod", "--owner", "solo@example.com")
    yield d
    d.stop()


def test_concurrent_members_never_overshoot_the_team_or_themselves(dep, mock_mistral):
    # Each member may spend 0.004 USD, the team 0.005 together: the team binds first.
    dep.edit_policy(lambda p: p.update(teams=[
        {"id": "eng", "budget": {"limit_usd": "0.005", "window": "daily"}}]))
    own = {"team": "eng", "budget": {"limit_usd": "0.004", "window": "daily"}}
    dep.edit_policy(members(ann=own, ben=own))
    dep.start()
    mock_mistral.behaviour(usage={"prompt_tokens": 10, "completion_tokens": 800},
                           chunk_delay_ms=20)

    def one(token_id: str):
        status, _, body = request(dep.url, token=dep.tokens[token_id], body=chat(max_tokens=1000))
        return token_id, status, (error_code(body) if status != 200 else None)

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, ["ann", "ben"] * 20))
    allowed = {t: sum(1 for r in results if r[0] == t and r[1] == 200) for t in ("ann", "ben")}
    codes = {r[2] for r in results if r[1] != 200}
    assert codes <= {"shield_team_budget_exceeded", "shield_budget_exceeded"}, codes
    assert "shield_team_budget_exceeded" in codes, results

    team_spend = settle(dep, "team", lambda: team_stat(dep, "eng", "spend_nano_usd"))
    each = {t: dep.envoy.stat(f"wasmcustom.shieldkey.token_id.{t}.spend_nano_usd") or 0
            for t in ("ann", "ben")}
    assert team_spend <= 5 * USD // 1000, team_spend
    assert all(v <= 4 * USD // 1000 for v in each.values()), each
    # Every forwarded request was charged exactly, at both levels.
    assert each == {t: n * cost(10, 800) for t, n in allowed.items()}
    assert team_spend == sum(each.values())
    assert team_stat(dep, "eng", "requests") == sum(allowed.values())
    refused = sum(1 for r in results if r[2] == "shield_team_budget_exceeded")
    assert team_stat(dep, "eng", "reason.shield_team_budget_exceeded.denied") == refused
    # The team's budget alerts fire once per threshold crossed, for the whole team.
    crossed = [t for t in (50, 80, 100) if team_spend * 100 >= t * 5 * USD // 1000]
    assert team_stat(dep, "eng", "budget_alerts") == len(crossed) >= 1
    log = dep.envoy.log_text()
    for t in crossed:
        assert log.count(f"budget alert: team eng reached {t}%") == 1, log
    # The upstream saw exactly the allowed requests, each with the real key.
    assert len(mock_mistral.requests()) == sum(allowed.values())


def test_a_member_over_their_own_budget_is_refused_the_other_keeps_working(dep, mock_mistral):
    dep.edit_policy(lambda p: p.update(teams=[
        {"id": "eng", "budget": {"limit_usd": "1", "window": "daily"}}]))
    dep.edit_policy(members(
        ann={"team": "eng", "budget": {"limit_usd": "0.0007", "window": "daily"}},
        ben={"team": "eng"}))
    # 500 completion tokens reserve about 0.00055 USD (with the reservation's margin) and cost
    # 0.0003: a second one does not fit ann's own budget.
    dep.start()
    mock_mistral.behaviour(usage={"prompt_tokens": 10, "completion_tokens": 500})
    assert request(dep.url, token=dep.tokens["ann"], body=chat(max_tokens=500))[0] == 200
    status, _, body = request(dep.url, token=dep.tokens["ann"], body=chat(max_tokens=500))
    assert (status, error_code(body)) == (429, "shield_budget_exceeded")
    for _ in range(3):
        assert request(dep.url, token=dep.tokens["ben"], body=chat(max_tokens=500))[0] == 200


def test_offboarding_by_owner_and_by_team_is_live_and_spares_the_rest(dep, mock_mistral):
    # The operator's path: teams and membership through the CLI.
    dep.cli("team", "create", "eng", "--description", "Engineering")
    dep.cli("team", "create", "ops")
    for token_id, team in (("ann", "eng"), ("ben", "eng"), ("cat", "ops")):
        dep.cli("limit", token_id, "--team", team)
    dep.start()
    for t in ("ann", "ben", "cat", "solo"):
        assert request(dep.url, token=dep.tokens[t])[0] == 200

    out = dep.cli("revoke", "--owner", "cat@example.com", "--publish", str(dep.ecds))
    assert out.split() == ["cat"]
    dep.wait_for_config_version(dep.revision())
    out = dep.cli("revoke", "--team", "eng", "--publish", str(dep.ecds))
    assert sorted(out.split()) == ["ann", "ben"]
    dep.wait_for_config_version(dep.revision())
    for t in ("ann", "ben", "cat"):
        status, _, body = request(dep.url, token=dep.tokens[t])
        assert (status, error_code(body)) == (401, "shield_token_revoked"), t
    assert request(dep.url, token=dep.tokens["solo"])[0] == 200


def test_dry_run_lets_exactly_the_refusals_through_then_enforcing_refuses_them(dep, mock_mistral):
    dep.cli("team", "create", "eng", "--enforce", "false",
            "--models", "mistral-small-*", "--max-tokens", "100")
    dep.cli("limit", "ann", "--team", "eng")
    dep.cli("limit", "ben", "--team", "eng", "--enforce", "false",
            "--models", "mistral-small-*,codestral-*")
    dep.start()
    sequence = [
        ("ann", chat(max_tokens=50), None),
        ("ann", chat("mistral-large-latest", 50), "shield_team_model_denied"),
        ("ann", chat(max_tokens=500), "shield_team_max_tokens_exceeded"),
        ("ben", chat("codestral-latest", 50), "shield_team_model_denied"),
        ("ben", chat("mistral-large-latest", 50), "shield_model_denied,shield_team_model_denied"),
        ("solo", chat("mistral-large-latest", 50), None),
    ]
    for token_id, body, _ in sequence:
        assert request(dep.url, token=dep.tokens[token_id], body=body)[0] == 200, (token_id, body)
    assert len(mock_mistral.requests()) == len(sequence)

    expected_counts: dict[str, int] = {}
    for _, _, would in sequence:
        for code in (would or "").split(",") if would else []:
            expected_counts[code] = expected_counts.get(code, 0) + 1
    for code, n in expected_counts.items():
        assert settle(dep, code, lambda: stat(dep, f"reason.{code}.would_deny")) == n, code
    assert team_stat(dep, "eng", "reason.shield_team_model_denied.would_deny") == 3
    assert stat(dep, "reason.shield_team_model_denied.denied") == 0

    # One audit record per request, allowed, with the team and what would have refused it.
    records = dep.envoy.wait_audit(len(sequence))
    assert [(r["token_id"], r["decision"], r["team"], r["would_deny"]) for r in records] == [
        (t, "allowed", None if t == "solo" else "eng", w) for t, _, w in sequence]
    assert [r["owner"] for r in records] == [f"{t}@example.com" for t, _, _ in sequence]
    log = dep.envoy.log_text()
    assert log.count("dry run: request of token") == sum(1 for s in sequence if s[2]), log

    # Enforced: exactly the requests that would have been refused are, with the same code.
    dep.cli("team", "limit", "eng", "--enforce", "true")
    dep.cli("limit", "ben", "--enforce", "true", "--publish", str(dep.ecds))
    dep.wait_for_config_version(dep.revision())
    for token_id, body, would in sequence:
        status, _, reply = request(dep.url, token=dep.tokens[token_id], body=body)
        if would is None:
            assert status == 200, (token_id, body, reply)
        else:
            assert error_code(reply) == would.split(",")[0], (token_id, body, reply)


def test_dry_run_rate_limit_counts_what_enforcement_would_refuse(dep, mock_mistral):
    dep.edit_policy(lambda p: p.update(teams=[
        {"id": "ops", "enforce": False, "rate_limit": {"requests_per_minute": 2}}]))
    dep.edit_policy(members(ann={"team": "ops"}, ben={"team": "ops"}))
    dep.start()
    statuses = [request(dep.url, token=dep.tokens[t])[0] for t in ("ann", "ben", "ann", "ben")]
    assert statuses == [200] * 4
    assert settle(dep, "w", lambda: stat(dep, "reason.shield_team_rate_limited.would_deny")) == 2


def test_team_counters_survive_reloads_and_follow_limit_changes(dep, mock_mistral):
    # 1000 completion tokens reserve about 0.0011 USD and cost 0.0006: one fits, two do not.
    dep.edit_policy(lambda p: p.update(teams=[
        {"id": "eng", "budget": {"limit_usd": "0.0015", "window": "daily"}}]))
    dep.edit_policy(members(ann={"team": "eng"}, ben={"team": "eng"}))
    dep.start()
    mock_mistral.behaviour(usage={"prompt_tokens": 10, "completion_tokens": 1000})
    assert request(dep.url, token=dep.tokens["ann"], body=chat(max_tokens=1000))[0] == 200
    status, _, body = request(dep.url, token=dep.tokens["ben"], body=chat(max_tokens=1000))
    assert (status, error_code(body)) == (429, "shield_team_budget_exceeded")

    # An unrelated change reloads the filter: the team's spend is still there.
    dep.edit_policy(members(solo={"description": "reloaded"}))
    dep.publish()
    dep.wait_for_config_version(dep.revision())
    status, _, body = request(dep.url, token=dep.tokens["ben"], body=chat(max_tokens=1000))
    assert (status, error_code(body)) == (429, "shield_team_budget_exceeded")
    # Raising the team's limit lets members through again, counting what was spent.
    dep.edit_policy(lambda p: p["teams"][0].update(budget={"limit_usd": "0.003", "window": "daily"}))
    dep.publish()
    dep.wait_for_config_version(dep.revision())
    assert request(dep.url, token=dep.tokens["ben"], body=chat(max_tokens=1000))[0] == 200
    spent = settle(dep, "s", lambda: team_stat(dep, "eng", "spend_nano_usd"))
    assert spent == 2 * cost(10, 1000)
    assert team_stat(dep, "eng", "budget_remaining_nano_usd") == 3 * USD // 1000 - spent


def test_team_metrics_carry_a_prometheus_label(dep, mock_mistral):
    dep.edit_policy(lambda p: p.update(teams=[
        {"id": "eng", "enforce": False, "models": {"allow": ["codestral-*"]},
         "budget": {"limit_usd": "1", "window": "daily"}}]))
    dep.edit_policy(members(ann={"team": "eng"}))
    dep.start()
    assert request(dep.url, token=dep.tokens["ann"])[0] == 200
    settle(dep, "s", lambda: team_stat(dep, "eng", "requests"))
    text = dep.envoy.admin_get("/stats/prometheus")
    lines = [l for l in text.splitlines() if l.startswith("shieldkey_")]
    assert any(l.startswith('shieldkey_team_spend_nano_usd{team="eng"}') for l in lines), lines
    assert any(l.startswith('shieldkey_team_requests{team="eng"}') for l in lines), lines
    assert any(l.startswith('shieldkey_team_budget_remaining_nano_usd{team="eng"}') for l in lines)
    assert any(l.startswith('shieldkey_would_deny{reason="shield_team_model_denied"} 1')
               for l in lines), lines
    assert any('team="eng"' in l and 'reason="shield_team_model_denied"' in l
               and l.startswith("shieldkey_team_would_deny") for l in lines), lines
    # Token series never carry a team label and team series never a token id.
    assert not any('team="' in l and 'token_id="' in l for l in lines)
