"""`shieldkey audit` on the audit trail a real Envoy wrote (demo.yaml, 2 workers): allowed and
refused requests, a stream, the official Python SDK and a dry run; the command's answers match
the requests, the log itself, the filter's stats and what the mock upstream saw."""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone

import pytest
from mistralai.client import Mistral

from deployment import Deployment, error_code, request
from deployment import token_stat as stat, wait_token_stat as wait_stat

# Every request the mock answers reports this usage (prices: mistral-small-latest 0.15 / 0.60 USD
# per 1M tokens): 150_000 + 1_200_000 nano-USD, more than capped's whole budget of 0.001 USD.
PROMPT, COMPLETION = 1000, 2000
NUMBERS = ("prompt_tokens", "completion_tokens", "cost_nano_usd", "status", "duration_ms",
           "bytes_received", "bytes_sent")


def chat(model: str = "mistral-small-latest", **extra) -> dict:
    return {"model": model, "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}], **extra}


def normalized(record: dict) -> dict:
    """A record as `audit --json` promises it: numbers as numbers, booleans as booleans."""
    out = dict(record)
    for name in NUMBERS:
        if isinstance(out.get(name), str):
            out[name] = int(out[name])
    if out.get("cost_estimated") in ("true", "false"):
        out["cost_estimated"] = out["cost_estimated"] == "true"
    return out


def now_rfc3339() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@pytest.fixture(scope="module")
def run(tmp_path_factory, mock_mistral, mock_keys):
    """A deployment and a run of requests; returns (deployment, request ids by name, t_mid, the
    mock's requests)."""
    d = Deployment(tmp_path_factory.mktemp("audit-command"), mock_mistral, mock_keys)
    d.cli("team", "create", "ml", "--description", "machine learning")
    d.mint("app", "prod", "--owner", "app@example.com", "--team", "ml")
    d.mint("sdk", "prod", "--owner", "sdk@example.com")
    d.mint("capped", "prod", "--budget-usd", "0.001", "--budget-window", "lifetime")
    d.mint("gone", "prod")
    d.cli("revoke", "gone")
    d.mint("dry", "prod", "--models", "mistral-small-*", "--enforce", "false")
    d.start()
    try:
        mock_mistral.reset()
        mock_mistral.behaviour(usage={"prompt_tokens": PROMPT, "completion_tokens": COMPLETION},
                               stream_chunks=3)
        ids: dict[str, str] = {}

        def send(name: str, token: str | None, body: dict, want: int, code: str | None = None):
            status, headers, reply = request(d.url, token=d.tokens[token] if token else None, body=body)
            assert status == want, (name, status, reply)
            if code:
                assert error_code(reply) == code, (name, reply)
            ids[name] = headers["x-request-id"]
            return reply

        # Phase A.
        send("app-chat", "app", chat(), 200)
        send("capped-first", "capped", chat(), 200)
        wait_stat(d, "capped", "spend_nano_usd", 1)
        sdk = Mistral(api_key=d.tokens["sdk"], server_url=d.url, timeout_ms=30_000)
        r = sdk.chat.complete(model="mistral-small-latest",
                              messages=[{"role": "user", "content": "hi"}])
        assert r.usage.prompt_tokens == PROMPT
        send("gone", "gone", chat(), 401, "shield_token_revoked")

        # The window boundary, well clear of both phases.
        time.sleep(0.6)
        t_mid = now_rfc3339()
        time.sleep(0.6)

        # Phase B.
        reply = send("app-stream", "app", chat(stream=True), 200)
        assert b"data: " in reply and b"[DONE]" in reply
        send("capped-denied", "capped", chat(), 429, "shield_budget_exceeded")
        send("missing", None, chat(), 401, "shield_token_missing")
        send("dry", "dry", chat("mistral-large-latest"), 200)

        records = d.envoy.wait_audit(8)
        assert len(records) == 8, records
        assert len(d.envoy.wait_audit(8, source="stdout")) == 8
        yield d, ids, t_mid, mock_mistral.requests()
    finally:
        d.stop()


def audit(d: Deployment, *args: str) -> str:
    return d.cli("audit", *args)


def audit_json(d: Deployment, *args: str) -> list[dict]:
    return [json.loads(l) for l in audit(d, *args, "--json").splitlines()]


def test_json_records_are_the_logs_records_normalized_in_time_order(run):
    d, ids, _, _ = run
    log = d.workdir / "shieldkey-audit.log"
    expected = sorted((normalized(r) for r in d.envoy.audit_records()), key=lambda r: r["time"])
    # The default file (Envoy's working directory), and the file by name: the same records.
    assert audit_json(d) == expected
    assert audit_json(d, str(log)) == expected
    assert {r["request_id"] for r in expected} >= set(ids.values())
    allowed = next(r for r in expected if r["request_id"] == ids["app-chat"])
    assert allowed["prompt_tokens"] == PROMPT and allowed["cost_estimated"] is False
    assert isinstance(allowed["cost_nano_usd"], int) and isinstance(allowed["status"], int)
    # Envoy's stdout capture, mixed with Envoy's own log lines: the same records, and the other
    # lines skipped and counted.
    assert audit_json(d, str(d.envoy.log_path)) == expected
    assert "lines that are not JSON objects" in d.last_stderr
    # Nothing secret in the output.
    text = audit(d) + audit(d, "--json") + audit(d, "--summary", "--json")
    for secret in [*d.tokens.values(), *d.keys.values(), d.master_key]:
        assert secret not in text


def test_filters_answer_who_used_what_when_and_from_where(run):
    d, ids, t_mid, _ = run

    def request_ids(*args: str) -> list[str]:
        return [r["request_id"] for r in audit_json(d, *args)]

    assert request_ids("--token", "app") == [ids["app-chat"], ids["app-stream"]]
    assert request_ids("--team", "ml") == [ids["app-chat"], ids["app-stream"]]
    assert request_ids("--owner", "app@example.com") == [ids["app-chat"], ids["app-stream"]]
    sdk = audit_json(d, "--token", "sdk")
    assert [(r["decision"], r["route"], r["model"], r["status"], r["owner"]) for r in sdk] == [
        ("allowed", "v1/chat/completions", "mistral-small-latest", 200, "sdk@example.com")]
    denied = audit_json(d, "--decision", "denied")
    assert [(r["request_id"], r["decision"], r["status"]) for r in denied] == [
        (ids["gone"], "shield_token_revoked", 401),
        (ids["capped-denied"], "shield_budget_exceeded", 429),
        (ids["missing"], "shield_token_missing", 401)]
    assert request_ids("--decision", "shield_budget_exceeded") == [ids["capped-denied"]]
    dry = audit_json(d, "--decision", "would-deny")
    assert [(r["request_id"], r["token_id"], r["decision"], r["would_deny"]) for r in dry] == [
        (ids["dry"], "dry", "allowed", "shield_model_denied")]
    assert len(request_ids("--decision", "allowed")) == 5
    # The time window: phase B from t_mid on, phase A before it; relative times.
    assert set(request_ids("--since", t_mid)) == {
        ids["app-stream"], ids["capped-denied"], ids["missing"], ids["dry"]}
    before = audit_json(d, "--until", t_mid)
    assert len(before) == 4 and {r["request_id"] for r in before} >= {
        ids["app-chat"], ids["capped-first"], ids["gone"]}
    assert len(request_ids("--since", "1h")) == 8
    assert request_ids("--until", "1h") == []
    # From where: every client is local.
    assert len(request_ids("--client", "127.0.0.0/8")) == 8
    assert len(request_ids("--client", "127.0.0.1")) == 8
    assert request_ids("--client", "10.0.0.0/8") == []
    assert len(request_ids("--country", "unknown")) == 8
    assert request_ids("--route", "v1/embeddings") == []
    assert request_ids("--model", "mistral-large-latest") == [ids["dry"]]
    assert request_ids("--request-id", ids["missing"]) == [ids["missing"]]

    # The table: one row per request, the stream's included.
    table = audit(d, "--token", "app").splitlines()
    assert len(table) == 3 and table[0].startswith("TIME"), table
    for row in table[1:]:
        assert "app@example.com" in row and " ml " in row and "allowed" in row
    assert "allowed [shield_model_denied]" in audit(d, "--token", "dry")


def test_summary_totals_equal_the_stats_and_the_upstream(run):
    d, ids, _, upstream = run
    summary = json.loads(audit(d, "--summary", "--json"))
    tokens = {t["token_id"]: t for t in summary["tokens"]}
    # A revoked token whose secret verified is named in its refusal's record.
    assert set(tokens) == {"app", "sdk", "capped", "dry", "gone", None}
    assert tokens["gone"]["denied_by_code"] == {"shield_token_revoked": 1}
    assert tokens["gone"]["allowed"] == 0
    for token_id in ("app", "sdk", "capped", "dry"):
        row = tokens[token_id]
        spend = wait_stat(d, token_id, "spend_nano_usd", row["cost_nano_usd"])
        assert row["cost_nano_usd"] == spend > 0, token_id
        assert row["prompt_tokens"] == stat(d, token_id, "prompt_tokens"), token_id
        assert row["completion_tokens"] == stat(d, token_id, "completion_tokens"), token_id
        assert row["allowed"] == stat(d, token_id, "requests"), token_id
        assert row["clients"] == ["127.0.0.1"]
    assert tokens["app"]["requests"] == 2 and tokens["app"]["teams"] == ["ml"]
    assert tokens["app"]["owners"] == ["app@example.com"]
    assert tokens["capped"]["denied_by_code"] == {"shield_budget_exceeded": 1}
    assert stat(d, "capped", "reason.shield_budget_exceeded.denied") == 1
    assert tokens["dry"]["would_deny_by_code"] == {"shield_model_denied": 1}
    assert tokens[None]["denied_by_code"] == {"shield_token_missing": 1}
    assert [t["team"] for t in summary["teams"]] == ["ml"]
    assert summary["teams"][0]["tokens"] == ["app"]
    assert summary["teams"][0]["cost_nano_usd"] == tokens["app"]["cost_nano_usd"]

    # What the mock upstream saw: one request per allowed record, each with the forced usage.
    metered = [r for r in upstream if r["path"].startswith("/v1/")]
    total = summary["total"]
    assert total["requests"] == 8 and total["denied"] == 3 and total["would_deny"] == 1
    assert total["allowed"] == len(metered) == 5
    assert total["prompt_tokens"] == PROMPT * len(metered)
    assert total["completion_tokens"] == COMPLETION * len(metered)
    assert total["cost_nano_usd"] == sum(t["cost_nano_usd"] for t in summary["tokens"])
    assert total["cost_usd"] == usd(total["cost_nano_usd"])

    # The same totals as a table.
    table = audit(d, "--summary").splitlines()
    assert table[0].startswith("TEAM") and table[-1].startswith("(total)")


def usd(nano: int) -> str:
    """format_usd, re-implemented: at least 2 decimals, no trailing zeros beyond them."""
    whole, frac = divmod(nano, 1_000_000_000)
    frac_text = f"{frac:09d}".rstrip("0")
    return f"{whole}.{frac_text.ljust(2, '0')}"
