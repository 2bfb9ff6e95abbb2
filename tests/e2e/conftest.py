"""Shared fixtures for the end-to-end suite: the mock upstream and its real keys, and Envoy (and
etcd) logs printed for failed tests."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import etcd_cluster  # noqa: E402
import harness  # noqa: E402


@pytest.fixture(scope="session")
def mock_keys() -> dict[str, str]:
    return {"prod": harness.random_key(), "dev": harness.random_key()}


@pytest.fixture(scope="session")
def mock_mistral(mock_keys):
    """One mock upstream for the session; `_clean_mock` gives every test a fresh record."""
    mock = harness.MockMistral(keys=list(mock_keys.values()))
    yield mock
    mock.stop()


@pytest.fixture(autouse=True)
def _clean_mock(request):
    if "mock_mistral" in request.fixturenames:
        request.getfixturevalue("mock_mistral").reset()
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed:
        # Envoys still running (the test's own and its module's), not every one of the session.
        for envoy in harness.STARTED:
            if envoy.proc is None or envoy.proc.poll() is not None and envoy is not harness.STARTED[-1]:
                continue
            lines = [l for l in envoy.log_text().splitlines() if "[main]" not in l]
            tail = "\n".join(lines[-60:])
            report.sections.append((f"Envoy log {envoy.log_path.name} (last 60 lines)", tail))
        # etcd members still running (fleet mode), the last 30 lines of each.
        for member in etcd_cluster.STARTED_ETCD:
            if not member.running:
                continue
            tail = "\n".join(member.log_text().splitlines()[-30:])
            report.sections.append((f"etcd log {member.log_path.name} (last 30 lines)", tail))
