"""Fleet mode, policy half: a 3-member etcd cluster and 2 Envoys (--concurrency 2 each) follow one
policy written by the CLI into etcd. Revocations reach every Envoy within a second, losing an etcd
member changes nothing, losing etcd keeps the last policy enforced, and a restarted Envoy reads
the policy back (and refuses everything until it has)."""

from __future__ import annotations

import json
import time

import pytest

from deployment import error_code, request
from fleet import Fleet


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, mock_mistral, mock_keys):
    f = Fleet(tmp_path_factory.mktemp("fleet"), mock_mistral, {"prod": mock_keys["prod"]},
              fleet_options={"reconcile_interval_ms": 1000, "lease_idle_ms": 1500})
    f.mint("alice")
    f.mint("bob")
    f.mint("carol")
    f.start()
    yield f
    f.close()


def status(fleet: Fleet, i: int, token: str) -> int:
    return request(fleet.url(i), token=fleet.tokens[token])[0]


def wait_status(fleet: Fleet, i: int, token: str, want: int, timeout: float = 5.0) -> float:
    """Seconds until Envoy i answers `want` for the token."""
    started = time.monotonic()
    while True:
        got = status(fleet, i, token)
        if got == want:
            return time.monotonic() - started
        assert time.monotonic() - started < timeout, f"envoy {i}: {token} still gets {got}"
        time.sleep(0.01)


def test_a_token_minted_in_etcd_works_through_every_envoy(fleet, mock_mistral, mock_keys):
    for i in range(2):
        wait_status(fleet, i, "alice", 200)
    # The upstream saw the real key (sealed in etcd, opened by each Envoy), never the token.
    seen = mock_mistral.requests()
    assert seen and all(r["headers"]["authorization"] == f"Bearer {mock_keys['prod']}" for r in seen)
    assert all(fleet.tokens["alice"] not in json.dumps(r) for r in seen)


def test_a_revocation_reaches_every_envoy_within_a_second(fleet):
    for i in range(2):
        wait_status(fleet, i, "bob", 200)
    started = time.monotonic()
    fleet.cli("revoke", "bob")
    cli_s = time.monotonic() - started
    waited = [wait_status(fleet, i, "bob", 401, timeout=3) for i in range(2)]
    assert max(waited) + cli_s < 1.0, (cli_s, waited)
    status_code, _, body = request(fleet.url(0), token=fleet.tokens["bob"])
    assert error_code(body) == "shield_token_revoked"
    fleet.cli("unrevoke", "bob")
    for i in range(2):
        wait_status(fleet, i, "bob", 200, timeout=2)


def test_losing_one_etcd_member_changes_nothing(fleet):
    fleet.etcd.kill(0)
    try:
        fleet.cli("revoke", "carol")
        for i in range(2):
            wait_status(fleet, i, "carol", 401, timeout=3)
        fleet.cli("unrevoke", "carol")
        for i in range(2):
            wait_status(fleet, i, "carol", 200, timeout=3)
    finally:
        fleet.etcd.restart(0)


def test_losing_etcd_keeps_the_last_policy_and_catches_up_when_it_returns(fleet):
    fleet.cli("revoke", "carol")
    for i in range(2):
        wait_status(fleet, i, "carol", 401, timeout=3)
    fleet.etcd.stop_all()
    try:
        time.sleep(1.0)
        for i in range(2):
            assert status(fleet, i, "alice") == 200
            assert status(fleet, i, "carol") == 401
        failures = fleet.envoys[0].stat("wasmcustom.shieldkey.fleet.sync_failures")
        assert failures and failures > 0
    finally:
        for m in range(3):
            fleet.etcd.restart(m, wait=False)
        fleet.etcd.wait_healthy()
    fleet.cli("unrevoke", "carol")
    for i in range(2):
        wait_status(fleet, i, "carol", 200, timeout=5)


def test_a_removed_token_is_refused_after_the_reconcile_listing(fleet):
    fleet.mint("dave")
    for i in range(2):
        wait_status(fleet, i, "dave", 200, timeout=3)
    fleet.cli("remove", "dave")
    for i in range(2):
        wait_status(fleet, i, "dave", 401, timeout=4)


def test_a_token_minted_again_under_its_id_refuses_the_old_secret_on_every_envoy(fleet):
    """An Envoy follows etcd with one configuration, records changing in place: the secrets its
    workers remember (`verified_secrets.rs`) must not outlive the record they verified against."""
    old = fleet.mint("erin")
    for i in range(2):
        wait_status(fleet, i, "erin", 200, timeout=3)
        for _ in range(6):  # new connections: both workers verify (and remember) the secret
            assert status(fleet, i, "erin") == 200
    fleet.cli("remove", "erin")
    new = fleet.mint("erin")
    assert new != old
    for i in range(2):
        wait_status(fleet, i, "erin", 200, timeout=4)
        for _ in range(6):
            status_code, _, body = request(fleet.url(i), token=old)
            assert (status_code, error_code(body)) == (401, "shield_token_invalid")


def test_a_restarted_envoy_reads_the_policy_back_and_refuses_until_it_has(fleet):
    fleet.stop(1)
    fleet.etcd.stop_all()
    try:
        fleet.start(1)
        # No policy yet and no etcd to read it from: fail closed.
        status_code, headers, body = request(fleet.url(1), token=fleet.tokens["alice"])
        assert status_code == 503 and error_code(body) == "shield_policy_unavailable"
    finally:
        for m in range(3):
            fleet.etcd.restart(m, wait=False)
        fleet.etcd.wait_healthy()
    wait_status(fleet, 1, "alice", 200, timeout=5)
    assert status(fleet, 0, "alice") == 200


# --- one ledger ------------------------------------------------------------------------------

COST = 1000 * 150 + 1000 * 600  # the mock's usage (1000 + 1000 tokens) at mistral-small prices
BODY = {"model": "mistral-small-latest", "max_tokens": 1000,
        "messages": [{"role": "user", "content": "hi"}]}


def fleet_spend(fleet: Fleet, token: str) -> int:
    """Spend of the token as the Envoys flushed it to etcd (every node, every window)."""
    total = 0
    for key, value in fleet.etcd.range_prefix("shieldkey/ledger/node/").items():
        if f"/{token}/" in key and key.endswith("/spent"):
            total += json.loads(value)["spent"]
    return total


def wait_flushed(fleet: Fleet, token: str, want: int, timeout: float = 5.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        got = fleet_spend(fleet, token)
        if got == want or time.monotonic() > deadline:
            return got
        time.sleep(0.05)


def spend_until_refused(fleet: Fleet, token: str, envoys: list[int], attempts: int) -> list[int]:
    from concurrent.futures import ThreadPoolExecutor

    def one(n: int) -> int:
        return request(fleet.url(envoys[n % len(envoys)]), token=fleet.tokens[token], body=BODY)[0]

    with ThreadPoolExecutor(max_workers=4) as pool:
        return list(pool.map(one, range(attempts)))


def test_a_budget_spent_through_both_envoys_is_enforced_once(fleet, mock_mistral):
    mock_mistral.behaviour(usage={"prompt_tokens": 1000, "completion_tokens": 1000})
    fleet.mint("team", "--budget-usd", "0.01", "--budget-window", "lifetime")
    fleet.wait_served("team")
    statuses = spend_until_refused(fleet, "team", [0, 1], 40)
    served = statuses.count(200)
    assert set(statuses) <= {200, 429}, statuses
    # $0.01 holds 13 requests of $0.00075; leases left unused on a node can strand at most
    # about one reservation each.
    assert 9 <= served <= 13, statuses
    assert wait_flushed(fleet, "team", served * COST) == served * COST
    assert served * COST <= 10_000_000


def test_an_envoy_restarted_keeps_its_spend(fleet, mock_mistral):
    mock_mistral.behaviour(usage={"prompt_tokens": 1000, "completion_tokens": 1000})
    fleet.mint("persist", "--budget-usd", "0.01", "--budget-window", "lifetime")
    fleet.wait_served("persist")
    first = spend_until_refused(fleet, "persist", [1], 6)
    assert first.count(200) == 6
    assert wait_flushed(fleet, "persist", 6 * COST) == 6 * COST
    fleet.stop(1)
    fleet.start(1)
    fleet.wait_served("persist", envoys=(1,))
    assert fleet_spend(fleet, "persist") == 6 * COST
    rest = spend_until_refused(fleet, "persist", [0, 1], 20)
    assert 429 in rest
    total = 6 + rest.count(200)
    assert total <= 13, (first, rest)
    assert wait_flushed(fleet, "persist", total * COST) == total * COST


def test_without_etcd_only_leases_already_held_are_spent_and_the_ledger_catches_up(fleet, mock_mistral):
    mock_mistral.behaviour(usage={"prompt_tokens": 1000, "completion_tokens": 1000})
    fleet.mint("outage", "--budget-usd", "1", "--budget-window", "lifetime")
    fleet.wait_served("outage")
    for i in range(2):
        # Each Envoy claims a lease (a slice: $0.10).
        assert request(fleet.url(i), token=fleet.tokens["outage"], body=BODY)[0] == 200
    fleet.etcd.stop_all()
    try:
        served = [request(fleet.url(n % 2), token=fleet.tokens["outage"], body=BODY)[0]
                  for n in range(10)]
        assert served == [200] * 10, served
        # A request bigger than what is held needs a claim: etcd is gone, so it is refused.
        big = dict(BODY, max_tokens=200_000)
        code, _, body = request(fleet.url(0), token=fleet.tokens["outage"], body=big)
        assert code == 503 and error_code(body) == "shield_ledger_busy"
    finally:
        for m in range(3):
            fleet.etcd.restart(m, wait=False)
        fleet.etcd.wait_healthy()
    # Nothing lost, nothing counted twice: the ledger equals what the upstream served.
    assert wait_flushed(fleet, "outage", 12 * COST, timeout=8) == 12 * COST


def test_a_rate_limit_holds_across_the_fleet_within_the_sync_tolerance(fleet, mock_mistral):
    """10 requests per minute through two Envoys: per Envoy that would be 20. Each Envoy shares
    its count of the minute and reads the other's every sync interval (200 ms), so the fleet
    admits at most a few more than 10 when requests alternate every 150 ms."""
    fleet.mint("paced", "--rpm", "10")
    fleet.wait_served("paced")
    # Stay inside one minute: the limit is per UTC minute across the fleet.
    if time.time() % 60 > 50:
        time.sleep(61 - time.time() % 60)
    statuses = []
    for n in range(24):
        statuses.append(request(fleet.url(n % 2), token=fleet.tokens["paced"])[0])
        time.sleep(0.15)
    served = statuses.count(200)
    assert set(statuses) <= {200, 429}, statuses
    assert 10 <= served <= 13, statuses
    assert statuses[-4:] == [429] * 4, statuses



def test_an_idle_envoy_gives_its_lease_back_so_another_can_spend_it(fleet, mock_mistral):
    mock_mistral.behaviour(usage={"prompt_tokens": 1000, "completion_tokens": 1000})
    fleet.mint("share", "--budget-usd", "0.01", "--budget-window", "lifetime")
    fleet.wait_served("share")
    assert request(fleet.url(0), token=fleet.tokens["share"], body=BODY)[0] == 200
    pool_key = next(k for k in fleet.etcd.range_prefix("shieldkey/ledger/pool/") if "/share/" in k)
    claimed = json.loads(fleet.etcd.get(pool_key))["claimed"]
    assert claimed > COST, "envoy 0 claimed a lease bigger than what it spent"
    # Idle for longer than lease_idle_ms: the unused part goes back to the pool.
    deadline = time.monotonic() + 8
    while json.loads(fleet.etcd.get(pool_key))["claimed"] != COST:
        assert time.monotonic() < deadline, json.loads(fleet.etcd.get(pool_key))
        time.sleep(0.1)
    # Envoy 1 can now spend the rest, up to where the last request's worst case ($0.00107)
    # no longer fits: 12 of $0.00075 in all.
    rest = spend_until_refused(fleet, "share", [1], 16)
    assert rest.count(200) == 11 and 429 in rest, rest
    assert wait_flushed(fleet, "share", 12 * COST) == 12 * COST


def test_a_team_budget_is_one_ledger_across_the_fleet(fleet, mock_mistral):
    """Two members of one team, each spending through both Envoys: the team's $0.01 is leased
    from etcd like a token's, so the fleet serves it once; a team offboarded in one command is
    refused by every Envoy."""
    mock_mistral.behaviour(usage={"prompt_tokens": 1000, "completion_tokens": 1000})
    fleet.cli("team", "create", "fleet-eng", "--budget-usd", "0.01", "--budget-window", "lifetime")
    fleet.mint("m-one", "--team", "fleet-eng", "--budget-usd", "1", "--budget-window", "lifetime")
    fleet.mint("m-two", "--team", "fleet-eng")
    fleet.wait_served("m-one")
    fleet.wait_served("m-two")
    from concurrent.futures import ThreadPoolExecutor

    def one(n: int) -> tuple[str, int, str | None]:
        token = ("m-one", "m-two")[n % 2]
        code, _, body = request(fleet.url((n // 2) % 2), token=fleet.tokens[token], body=BODY)
        return token, code, (error_code(body) if code != 200 else None)

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(one, range(40)))
    served = sum(1 for r in results if r[1] == 200)
    assert {r[2] for r in results if r[1] != 200} == {"shield_team_budget_exceeded"}, results
    # $0.01 holds 13 requests of $0.00075, less what unused leases strand (about one each).
    assert 9 <= served <= 13, results
    assert wait_flushed(fleet, "team.fleet-eng", served * COST) == served * COST
    assert served * COST <= 10_000_000
    # Each member's own spend is flushed too, and adds up to the team's.
    members = sum(wait_flushed(fleet, t, -1, timeout=0.5) for t in ("m-one",))
    assert members == sum(1 for r in results if r[0] == "m-one" and r[1] == 200) * COST

    revoked = fleet.cli("revoke", "--team", "fleet-eng")
    assert sorted(revoked.split()) == ["m-one", "m-two"]
    for i in range(2):
        for token in ("m-one", "m-two"):
            wait_status(fleet, i, token, 401, timeout=3)
