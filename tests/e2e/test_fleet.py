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
              fleet_options={"reconcile_interval_ms": 1000})
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
