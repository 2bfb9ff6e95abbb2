"""Fleet mode, budget alerts: thresholds are judged on the fleet's spend (every Envoy's, summed in
etcd), and each alert is sent once, by one Envoy, even when no Envoy alone reaches the threshold."""

from __future__ import annotations

import json
import time

import pytest

from deployment import request
from fleet import Fleet

# mistral-small-latest, 1000 prompt + 500 completion tokens: 0.00045 USD, 20% of 0.00225 USD.
USAGE = {"prompt_tokens": 1000, "completion_tokens": 500}
COST = 450_000
LIMIT = 5 * COST
BODY = {"model": "mistral-small-latest", "max_tokens": 10,
        "messages": [{"role": "user", "content": "x"}]}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, mock_mistral, mock_keys):
    f = Fleet(tmp_path_factory.mktemp("fleet-alerts"), mock_mistral, {"prod": mock_keys["prod"]},
              etcd_members=1, concurrency=1)
    # No CLI command edits `alerts` in etcd yet (README): the settings key is written by hand.
    key = "shieldkey/policy/settings"
    settings = json.loads(f.etcd.get(key))
    settings["alerts"] = {"thresholds_percent": [50, 80, 100],
                          "webhook": {"cluster": "mistral", "path": "/__mock/alerts"}}
    f.etcd.put(key, json.dumps(settings))
    f.cli("check")
    f.mint("shared", "--owner", "ml-team", "--budget-usd", "0.00225", "--budget-window", "lifetime")
    f.start()
    yield f
    f.close()


def posted_alerts(mock) -> list[dict]:
    return [json.loads(r["body"]) for r in mock.requests() if r["path"] == "/__mock/alerts"]


def test_a_threshold_the_fleet_crosses_is_alerted_once_by_one_envoy(fleet, mock_mistral):
    mock_mistral.behaviour(usage=USAGE)
    # Alternating Envoys: after five requests one Envoy spent 60% and the other 40%, so on its
    # own spend neither would have alerted at 80% or 100%.
    statuses = []
    for n in range(5):
        statuses.append(request(fleet.url(n % 2), token=fleet.tokens["shared"], body=BODY)[0])
        time.sleep(0.3)  # a flush apart, so each threshold is crossed by one request
    assert statuses == [200] * 5

    deadline = time.monotonic() + 5
    while len(posted_alerts(mock_mistral)) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)  # five more sync intervals: a duplicate would have come by now
    alerts = posted_alerts(mock_mistral)
    assert sorted(a["threshold_percent"] for a in alerts) == [50, 80, 100], alerts
    for a in alerts:
        assert a["event"] == "shieldkey.budget_threshold"
        assert a["token_id"] == "shared" and a["owner"] == "ml-team" and a["team"] is None
        assert a["limit_nano_usd"] == LIMIT and a["window"] == "lifetime"
        # The fleet's spend when the threshold was seen crossed: over it, never over the total.
        assert LIMIT * a["threshold_percent"] // 100 <= a["spent_nano_usd"] <= 5 * COST, a

    # One Envoy logged and counted each alert; together exactly three.
    lines = sum(envoy.log_text().count("budget alert: token shared") for envoy in fleet.envoys)
    counted = sum(envoy.stat("wasmcustom.shieldkey.token_id.shared.budget_alerts") or 0
                  for envoy in fleet.envoys)
    assert (lines, counted) == (3, 3)
    # The claims in etcd name the Envoy that sent each.
    claims = fleet.etcd.range_prefix("shieldkey/ledger/alerts/shared/0/")
    assert sorted(int(k.rsplit("/", 1)[1]) for k in claims) == [50, 80, 100]
    assert {json.loads(v)["node"] for v in claims.values()} <= {"envoy-0", "envoy-1"}
