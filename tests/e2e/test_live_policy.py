"""Issue 5: instant revocation and live policy changes through ECDS, without restarting Envoy."""

from __future__ import annotations

import base64
import json
import threading
import time

import pytest

import harness
from deployment import Deployment, error_code, published_policy, request, set_published_policy


class Load:
    """Clients hammering Envoy with their own tokens until stopped (bounded by max_seconds)."""

    def __init__(self, url: str, tokens: dict[str, str], max_seconds: float = 20.0):
        self.url, self.tokens, self.max_seconds = url, tokens, max_seconds
        self.results: dict[str, list[tuple[float, int]]] = {t: [] for t in tokens}
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(name,), daemon=True) for name in tokens]

    def _run(self, name: str) -> None:
        deadline = time.monotonic() + self.max_seconds
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                status = request(self.url, token=self.tokens[name], timeout=5)[0]
            except Exception:  # noqa: BLE001 - a connection error is a failed request too
                status = -1
            self.results[name].append((time.monotonic(), status))

    def __enter__(self):
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for t in self._threads:
            t.join()


@pytest.fixture
def dep(tmp_path, mock_mistral, mock_keys):
    d = Deployment(tmp_path, mock_mistral, mock_keys)
    for name in ("alice", "bob", "carol"):
        d.mint(name)
    d.start()
    yield d
    d.stop()


def test_revocation_reaches_every_worker_within_a_second_without_disturbing_others(dep, mock_mistral):
    # A slow stream for alice, in flight while she is revoked: it must complete.
    mock_mistral.behaviour(stream_chunks=12, chunk_delay_ms=100)
    stream_result = {}

    def stream():
        from mistralai.client import Mistral
        client = Mistral(api_key=dep.tokens["alice"], server_url=dep.url, timeout_ms=30_000)
        chunks = list(client.chat.stream(model="mistral-small-latest", messages=[{"role": "user", "content": "x"}]))
        stream_result["chunks"] = chunks

    streamer = threading.Thread(target=stream)
    streamer.start()
    time.sleep(0.3)

    with Load(dep.url, {k: dep.tokens[k] for k in ("bob", "carol")}) as load:
        time.sleep(0.5)
        dep.cli("revoke", "alice", "--publish", str(dep.ecds), "--wasm", str(__import__("deployment").WASM))
        revoked_at = time.monotonic()
        first_401 = None
        while time.monotonic() - revoked_at < 2.0:
            status, _, body = request(dep.url, token=dep.tokens["alice"])
            if status == 401:
                assert error_code(body) == "shield_token_revoked"
                first_401 = time.monotonic() - revoked_at
                break
        assert first_401 is not None and first_401 < 1.0, f"revocation took {first_401}"
        # Every later request, on fresh connections spread over both workers, is refused.
        statuses = [request(dep.url, token=dep.tokens["alice"])[0] for _ in range(40)]
        assert set(statuses) == {401}, statuses
        time.sleep(0.5)

    for name, results in load.results.items():
        assert len(results) > 10, f"{name} made too few requests to mean anything"
        failed = [s for _, s in results if s != 200]
        assert failed == [], f"{name} saw failures during the reload: {failed[:5]}"

    streamer.join(timeout=10)
    chunks = stream_result.get("chunks")
    assert chunks, "the in-flight stream did not complete"
    assert chunks[-1].data.usage is not None, "the in-flight stream was cut short"


def test_unrevoke_and_mint_apply_live(dep):
    wasm = str(__import__("deployment").WASM)
    dep.cli("revoke", "bob", "--publish", str(dep.ecds), "--wasm", wasm)
    dep.wait_for_config_version(dep.revision())
    assert request(dep.url, token=dep.tokens["bob"])[0] == 401
    dep.cli("unrevoke", "bob", "--publish", str(dep.ecds), "--wasm", wasm)
    dep.wait_for_config_version(dep.revision())
    assert request(dep.url, token=dep.tokens["bob"])[0] == 200
    dave = dep.mint("dave")
    dep.publish()
    dep.wait_for_config_version(dep.revision())
    assert request(dep.url, token=dave)[0] == 200


def test_a_token_minted_again_under_its_id_refuses_the_old_secret_at_once(dep):
    """Workers remember secrets that verified (`verified_secrets.rs`): that memory must never let
    a wrong secret through, nor the old secret of a token removed and minted again."""
    old = dep.tokens["alice"]
    # Several connections, so that both workers verified (and remember) the secret.
    for _ in range(8):
        assert request(dep.url, token=old)[0] == 200
    wrong = old[:-1] + ("A" if old[-1] != "A" else "B")
    for _ in range(8):
        status, _, body = request(dep.url, token=wrong)
        assert (status, error_code(body)) == (401, "shield_token_invalid")
    assert request(dep.url, token=old)[0] == 200
    dep.cli("remove", "alice")
    new = dep.mint("alice")
    assert new != old
    dep.publish()
    dep.wait_for_config_version(dep.revision())
    for _ in range(8):
        status, _, body = request(dep.url, token=old)
        assert (status, error_code(body)) == (401, "shield_token_invalid")
        assert request(dep.url, token=new)[0] == 200


def test_changing_a_limit_applies_live(dep):
    wasm = str(__import__("deployment").WASM)
    large = {"model": "mistral-large-latest", "messages": [{"role": "user", "content": "hi"}]}
    small = {"model": "mistral-small-latest", "messages": [{"role": "user", "content": "hi"}]}
    assert request(dep.url, token=dep.tokens["bob"], body=large)[0] == 200
    dep.cli("limit", "bob", "--models", "mistral-small-*", "--publish", str(dep.ecds), "--wasm", wasm)
    dep.wait_for_config_version(dep.revision())
    status, _, body = request(dep.url, token=dep.tokens["bob"], body=large)
    assert (status, error_code(body)) == (403, "shield_model_denied")
    assert request(dep.url, token=dep.tokens["bob"], body=small)[0] == 200
    assert request(dep.url, token=dep.tokens["carol"], body=large)[0] == 200, "other tokens unchanged"
    dep.cli("limit", "bob", "--models", "none", "--publish", str(dep.ecds), "--wasm", wasm)
    dep.wait_for_config_version(dep.revision())
    assert request(dep.url, token=dep.tokens["bob"], body=large)[0] == 200


def write_ecds(dep: Deployment, ecds: dict, version: str) -> None:
    """Publishes an ECDS file by hand (atomically, as `shieldkey publish` does)."""
    ecds["version_info"] = version
    tmp = dep.ecds.with_suffix(".tmp")
    tmp.write_text(json.dumps(ecds))
    tmp.replace(dep.ecds)


def publish_refused(dep: Deployment, ecds: dict, version: str) -> None:
    """Publishes `ecds` by hand and waits for Envoy to refuse it."""
    stat = "extension_config_discovery.http_filter.shieldkey.update_rejected"
    rejected_before = dep.envoy.stat(stat)
    write_ecds(dep, ecds, version)
    deadline = time.monotonic() + 5
    while dep.envoy.stat(stat) <= rejected_before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert dep.envoy.stat(stat) > rejected_before


def test_invalid_policy_is_refused_by_the_cli_and_by_envoy_and_the_old_one_keeps_serving(dep):
    before = dep.policy.read_text()
    dep.cli("mint", "--id", "x", "--upstream-key", "nope", check=False)
    assert dep.last_returncode != 0
    assert "upstream" in dep.last_stderr
    assert dep.policy.read_text() == before, "the CLI wrote an invalid policy"

    # An operator bypasses the CLI and publishes a broken configuration by hand.
    ecds = json.loads(dep.ecds.read_text())
    good = published_policy(ecds)
    policy = published_policy(ecds)
    policy["tokens"][0]["digest"] = "not base64!"
    set_published_policy(ecds, policy)
    publish_refused(dep, ecds, "broken")
    assert "tokens[0].digest" in dep.envoy.log_text()
    for name in ("alice", "bob", "carol"):
        assert request(dep.url, token=dep.tokens[name])[0] == 200

    # A compressed configuration cut short is refused, never read as a shorter policy.
    set_published_policy(ecds, good)
    cfg = ecds["resources"][0]["typed_config"]["config"]["configuration"]
    cfg["value"] = base64.b64encode(base64.b64decode(cfg["value"])[:-40]).decode()
    publish_refused(dep, ecds, "truncated")
    assert "compressed configuration is truncated" in dep.envoy.log_text()
    assert request(dep.url, token=dep.tokens["carol"])[0] == 200

    # Plain JSON in a StringValue, as a hand-written configuration carries it, is read as well.
    carol = next(t for t in good["tokens"] if t["id"] == "carol")
    carol["status"] = "revoked"
    ecds["resources"][0]["typed_config"]["config"]["configuration"] = {
        "@type": "type.googleapis.com/google.protobuf.StringValue", "value": json.dumps(good)}
    write_ecds(dep, ecds, "plain")
    deadline = time.monotonic() + 5
    while request(dep.url, token=dep.tokens["carol"])[0] == 200 and time.monotonic() < deadline:
        time.sleep(0.02)
    status, _, body = request(dep.url, token=dep.tokens["carol"])
    assert (status, error_code(body)) == (401, "shield_token_revoked")
    assert request(dep.url, token=dep.tokens["bob"])[0] == 200


def test_rotating_the_upstream_key_switches_without_a_failed_request(tmp_path):
    old, new = harness.random_key(), harness.random_key()
    mock = harness.MockMistral(keys=[old, new])
    try:
        d = Deployment(tmp_path, mock, {"prod": old})
        d.mint("alice")
        d.start()
        try:
            with Load(d.url, {"alice": d.tokens["alice"]}, max_seconds=10) as load:
                time.sleep(0.5)
                d.cli("seal", "--id", "prod", stdin=new)
                d.publish()
                d.wait_for_config_version(d.revision())
                time.sleep(0.5)
            statuses = [s for _, s in load.results["alice"]]
            assert statuses and set(statuses) == {200}, statuses
            auths = [r["headers"]["authorization"] for r in mock.requests()]
            assert auths[0] == f"Bearer {old}" and auths[-1] == f"Bearer {new}"
            assert set(auths) == {f"Bearer {old}", f"Bearer {new}"}
        finally:
            d.stop()
    finally:
        mock.stop()


def test_rate_counters_are_unchanged_by_a_reload(tmp_path, mock_mistral, mock_keys):
    d = Deployment(tmp_path, mock_mistral, mock_keys)
    d.mint("metered", "prod", "--rpm", "5")
    d.start()
    try:
        # A burst of 5, refilled at one request per 12 s: the test finishes well inside that.
        assert [request(d.url, token=d.tokens["metered"])[0] for _ in range(3)] == [200] * 3
        d.mint("newcomer")
        d.publish()
        d.wait_for_config_version(d.revision())
        assert request(d.url, token=d.tokens["newcomer"])[0] == 200
        # Had the reload reset the counter, five more requests would pass.
        statuses = [request(d.url, token=d.tokens["metered"])[0] for _ in range(3)]
        assert statuses == [200, 200, 429], statuses
    finally:
        d.stop()
