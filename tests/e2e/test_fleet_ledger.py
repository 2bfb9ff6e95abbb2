"""Fleet mode, the ledger over time: budget alerts are judged on the fleet's spend (every Envoy's,
summed in etcd) and each is sent once, by one Envoy, even when no Envoy alone reaches the
threshold; the keys of ended budget windows leave etcd."""

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
    # Reconciling every second: the first sweep of ended windows comes a second after start.
    f = Fleet(tmp_path_factory.mktemp("fleet-ledger"), mock_mistral, {"prod": mock_keys["prod"]},
              etcd_members=1, concurrency=1, fleet_options={"reconcile_interval_ms": 1000})
    f.cli("settings", "set", "-", stdin=json.dumps({"alerts": {
        "thresholds_percent": [50, 80, 100],
        "webhook": {"cluster": "mistral", "path": "/__mock/alerts"}}}))
    f.mint("shared", "--owner", "ml-team", "--budget-usd", "0.00225", "--budget-window", "lifetime")
    f.mint("hourly", "--budget-usd", "1", "--budget-window", "hourly")
    for key, value in old_window_keys().items():
        f.etcd.put(key, value)
    f.start()
    yield f
    f.close()


HOUR = int(time.time()) // 3600 * 3600
# Kept whatever the clock does during the run: this hour (at most the previous one by the time the
# sweep runs) and the next. The previous hour's staying is the unit test's (it could end here).
KEPT_WINDOWS, ENDED_WINDOWS = (HOUR, HOUR + 3600), (HOUR - 7200, HOUR - 30 * 24 * 3600)


def old_window_keys() -> dict[str, str]:
    """What the hourly token's budget windows left in etcd, as the Envoys write it."""
    keys = {}
    for w in (*KEPT_WINDOWS, *ENDED_WINDOWS):
        for node in ("envoy-0", "envoy-1"):
            keys[f"shieldkey/ledger/node/{node}/hourly/{w}/claimed"] = '{"claimed":100000000}'
            keys[f"shieldkey/ledger/node/{node}/hourly/{w}/spent"] = '{"spent":5}'
            keys[f"shieldkey/ledger/spent/hourly/{w}/{node}"] = '{"spent":5}'
        keys[f"shieldkey/ledger/pool/hourly/{w}"] = '{"claimed":200000000}'
        keys[f"shieldkey/ledger/alerts/hourly/{w}/50"] = '{"node":"envoy-0"}'
    return keys


def test_ended_budget_windows_leave_etcd(fleet):
    """Each Envoy deletes its own keys and the shared ones of windows that ended before the
    previous one; the current window (and a future one) stay."""
    deadline = time.monotonic() + 10
    while True:
        left = set(fleet.etcd.range_prefix("shieldkey/ledger/"))
        ended = {k for k in old_window_keys() if any(f"/{w}" in k for w in ENDED_WINDOWS)}
        if not left & ended or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert not left & ended, sorted(left & ended)
    kept = set(old_window_keys()) - ended
    assert kept <= left, sorted(kept - left)
    assert any("ended budget windows removed from etcd" in e.log_text() for e in fleet.envoys)


def posted_alerts(mock) -> list[dict]:
    return [json.loads(r["body"]) for r in mock.requests() if r["path"] == "/__mock/alerts"]


def test_a_threshold_the_fleet_crosses_is_alerted_once_by_one_envoy(fleet, mock_mistral):
    mock_mistral.behaviour(usage=USAGE)
    fleet.wait_served("shared")
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
