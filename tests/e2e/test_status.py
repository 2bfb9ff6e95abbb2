"""`shieldkey status --admin URL`: one Envoy's view of every team and token (policy file + the
admin endpoint's /stats), checked against a real Envoy (2 workers) after allowed, denied and
dry-run requests: the JSON matches /stats exactly, the table prints, a budget window that rolled
shows no spend in the new window, and a closed admin port is a clear error (exit 1)."""

from __future__ import annotations

import json
import re
import time

import pytest

from deployment import Deployment, error_code, request

SMALL_IN, SMALL_OUT = 150, 600  # nano-USD per token of mistral-small-latest


def chat(model: str = "mistral-small-latest", max_tokens: int = 500) -> dict:
    return {"model": model, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": "hi"}]}


def settled(dep: Deployment, names: list[str]) -> dict[str, int]:
    """/stats once the accounting of the last responses is done (it happens when each stream is
    logged, just after the response): two equal reads in a row."""
    last, deadline = None, time.monotonic() + 5
    while time.monotonic() < deadline:
        stats = dep.envoy.stats()
        now = {n: stats.get(n, 0) for n in names}
        if now == last:
            return stats
        last = now
        time.sleep(0.1)
    return dep.envoy.stats()


def status(dep: Deployment, *args: str) -> tuple[int, str, str]:
    url = f"http://127.0.0.1:{dep.envoy.admin_port}"
    out = dep.cli("status", "--admin", url, *args, check=False)
    return dep.last_returncode, out, dep.last_stderr


def expected(stats: dict[str, int], prefix: str) -> dict:
    """What status must report for one token or team, read straight from /stats."""
    reasons: dict[str, dict[str, int]] = {"denied": {}, "would_deny": {}}
    pattern = re.compile(re.escape(prefix) + r"reason\.([^.]+)\.(denied|would_deny)$")
    for name, value in stats.items():
        m = pattern.match(name)
        if m and value:
            reasons[m.group(2)][m.group(1)] = value
    return {
        "requests": stats.get(prefix + "requests", 0),
        "spend_total_nano_usd": stats.get(prefix + "spend_nano_usd", 0),
        "denied": reasons["denied"],
        "would_deny": reasons["would_deny"],
    }


@pytest.fixture()
def dep(tmp_path, mock_mistral, mock_keys):
    d = Deployment(tmp_path, mock_mistral, mock_keys)
    d.cli("team", "create", "eng", "--description", "Engineering",
          "--budget-usd", "0.005", "--budget-window", "daily")
    # 500 completion tokens reserve about 0.00055 USD and cost 0.0003: ann's second one does
    # not fit her own budget.
    d.mint("ann", "prod", "--owner", "ann@example.com", "--team", "eng",
           "--budget-usd", "0.0007", "--budget-window", "daily")
    d.mint("ben", "prod", "--owner", "ben@example.com", "--team", "eng",
           "--models", "mistral-small-*")
    d.mint("solo", "prod", "--owner", "solo@example.com", "--rpm", "2")
    d.mint("dry", "prod", "--enforce", "false", "--models", "mistral-small-*")
    d.mint("tick", "prod", "--budget-usd", "1", "--budget-window", "5s")
    d.mint("idle", "prod")
    d.mint("gone", "prod")
    d.cli("revoke", "gone")
    yield d
    d.stop()


def test_status_matches_envoys_stats_and_fails_clearly_without_envoy(dep, mock_mistral):
    dep.start()
    mock_mistral.behaviour(usage={"prompt_tokens": 10, "completion_tokens": 500})
    one = 10 * SMALL_IN + 500 * SMALL_OUT
    traffic = [
        ("ann", chat(), None),
        ("ann", chat(), "shield_budget_exceeded"),
        ("ben", chat(), None),
        ("ben", chat(), None),
        ("ben", chat("mistral-large-latest"), "shield_model_denied"),
        ("solo", chat(), None),
        ("solo", chat(), None),
        ("solo", chat(), "shield_rate_limited"),
        ("dry", chat("mistral-large-latest"), None),  # let through: would_deny
        ("gone", chat(), "shield_token_revoked"),
    ]
    for token_id, body, refusal in traffic:
        status_code, _, reply = request(dep.url, token=dep.tokens[token_id], body=body)
        if refusal is None:
            assert status_code == 200, (token_id, reply)
        else:
            assert error_code(reply) == refusal, (token_id, reply)

    tokens = ["ann", "ben", "solo", "dry", "tick", "idle", "gone"]
    counters = [f"wasmcustom.shieldkey.token_id.{t}.spend_nano_usd" for t in tokens]
    stats = settled(dep, counters + ["wasmcustom.shieldkey.team.eng.spend_nano_usd"])

    code, out, err = status(dep, "--json")
    assert code == 0, err
    assert "warning" not in err, err
    doc = json.loads(out)
    assert [t["id"] for t in doc["teams"]] == ["eng"]
    assert [t["id"] for t in doc["tokens"]] == ["ann", "ben", "solo", "dry", "tick", "idle", "gone"]
    rows = {t["id"]: t for t in doc["tokens"]}

    # Requests, denials by reason, would-deny and spend are exactly Envoy's.
    for token_id, row in rows.items():
        want = expected(stats, f"wasmcustom.shieldkey.token_id.{token_id}.")
        got = {k: row[k] for k in want}
        assert got == want, token_id
    team = doc["teams"][0]
    want = expected(stats, "wasmcustom.shieldkey.team.eng.")
    assert {k: team[k] for k in want} == want
    # ... and what the traffic says they must be.
    assert (rows["ann"]["requests"], rows["ann"]["denied"]) == (1, {"shield_budget_exceeded": 1})
    assert (rows["ben"]["requests"], rows["ben"]["denied"]) == (2, {"shield_model_denied": 1})
    assert (rows["solo"]["requests"], rows["solo"]["denied"]) == (2, {"shield_rate_limited": 1})
    assert (rows["dry"]["requests"], rows["dry"]["would_deny"]) == (1, {"shield_model_denied": 1})
    assert (team["requests"], team["denied"]) == (
        3, {"shield_budget_exceeded": 1, "shield_model_denied": 1})
    # A revoked token's refusals (its secret verified) are counted under it.
    assert (rows["gone"]["status"], rows["gone"]["requests"], rows["gone"]["denied"]) == (
        "revoked", 0, {"shield_token_revoked": 1})
    assert rows["dry"]["status"] == "dry-run"
    assert rows["idle"]["status"] == "active" and rows["idle"]["spent_nano_usd"] == 0

    # Budgets: spend in the current window is what the gauges say (limit − remaining), which
    # since Envoy started today is also the whole spend counter.
    ann_prefix = "wasmcustom.shieldkey.token_id.ann."
    assert rows["ann"]["spent_nano_usd"] == one
    assert rows["ann"]["spent_nano_usd"] == (stats[ann_prefix + "budget_limit_nano_usd"]
                                            - stats[ann_prefix + "budget_remaining_nano_usd"])
    assert rows["ann"]["limit_nano_usd"] == 700_000
    assert rows["ann"]["remaining_nano_usd"] == 700_000 - one
    assert rows["ann"]["percent"] == one * 100 // 700_000
    day = int(time.time()) // 86_400 * 86_400
    assert (rows["ann"]["window"], rows["ann"]["window_start"], rows["ann"]["resets_at"]) == (
        "daily", day, day + 86_400)
    assert team["spent_nano_usd"] == 3 * one
    assert team["spent_nano_usd"] == stats["wasmcustom.shieldkey.team.eng.spend_nano_usd"]
    assert (team["limit_nano_usd"], team["members"]) == (5_000_000, ["ann", "ben"])
    # Without a budget: the spend since Envoy started, no limit.
    assert rows["solo"]["spent_nano_usd"] == 2 * one
    assert rows["solo"]["limit_nano_usd"] is None and rows["solo"]["window"] is None

    # The table: team first, members indented, bars, compact denials, a would-deny column.
    code, table, err = status(dep)
    assert code == 0, err
    lines = table.splitlines()
    assert lines[0].split() == ["TOKEN", "OWNER", "STATUS", "WINDOW", "SPENT", "LIMIT", "USED",
                                "REMAINING", "RESETS", "REQUESTS", "DENIED", "WOULD_DENY"], table
    assert lines[1].startswith("team eng ") and "[#---------] 18%" in lines[1], table
    ann = next(l for l in lines if l.startswith("  ann "))
    assert "[####------] 43%" in ann and "budget_exceeded:1" in ann, table
    assert "(no team)" in lines
    dry = next(l for l in lines if l.startswith("  dry "))
    assert dry.split()[-1] == "model_denied:1" and "dry-run" in dry, table
    assert "7 tokens" in err and "serving policy revision" in err, err
    # The window gauge carries the token's Prometheus label like every per-token stat.
    prometheus = dep.envoy.admin_get("/stats/prometheus")
    assert f'shieldkey_budget_window_start_seconds{{token_id="ann"}} {day}' in prometheus
    assert f'shieldkey_budget_spent_nano_usd{{token_id="ann"}} {one}' in prometheus
    assert f'shieldkey_team_budget_spent_nano_usd{{team="eng"}} {3 * one}' in prometheus
    one_token = status(dep, "--token", "solo")[1].splitlines()
    assert len(one_token) == 2 and one_token[1].startswith("solo "), one_token

    # Envoy gone: the admin port is closed; a clear error naming the URL, exit 1, no table.
    admin = f"http://127.0.0.1:{dep.envoy.admin_port}"
    dep.stop()
    code, out, err = status(dep)
    assert (code, out) == (1, ""), err
    assert f"cannot reach Envoy's admin endpoint at {admin}" in err, err
    assert "check that Envoy is running" in err, err


def test_a_budget_window_that_rolled_shows_no_spend_until_a_request_settles_in_it(
        dep, mock_mistral):
    dep.start()
    mock_mistral.behaviour(usage={"prompt_tokens": 10, "completion_tokens": 500})
    one = 10 * SMALL_IN + 500 * SMALL_OUT
    # Start early in a 5-second window so the request and the first status share it.
    while time.time() % 5 > 1:
        time.sleep(0.05)
    assert request(dep.url, token=dep.tokens["tick"], body=chat())[0] == 200
    settled(dep, ["wasmcustom.shieldkey.token_id.tick.spend_nano_usd"])
    code, out, err = status(dep, "--json", "--token", "tick")
    assert code == 0, err
    row = json.loads(out)["tokens"][0]
    window = row["window_start"]
    assert (row["window"], row["spent_nano_usd"], row["spend_total_nano_usd"]) == ("5s", one, one)
    assert row["resets_at"] == window + 5
    # The next window: the gauges still hold the last settlement's, of the window before.
    while time.time() < window + 5.2:
        time.sleep(0.05)
    assert dep.envoy.stat("wasmcustom.shieldkey.token_id.tick.budget_window_start_seconds") == window
    code, out, err = status(dep, "--json", "--token", "tick")
    row = json.loads(out)["tokens"][0]
    assert row["window_start"] >= window + 5
    assert (row["spent_nano_usd"], row["remaining_nano_usd"], row["spend_total_nano_usd"]) == (
        0, 1_000_000_000, one)
