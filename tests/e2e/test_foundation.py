"""Issue 2: token check and sealed key swap in a real Envoy, with the official Python SDK."""

from __future__ import annotations

import json
import subprocess
import time

import pytest
from mmdb_writer import MMDBWriter
from netaddr import IPSet

import harness
from deployment import (WASM, Deployment, error_code, policy_of_configuration, published_policy,
                        request)

PAST = "2020-01-01T00:00:00Z"
FUTURE = "2099-01-01T00:00:00Z"


@pytest.fixture(scope="module")
def dep(tmp_path_factory, mock_mistral, mock_keys):
    d = Deployment(tmp_path_factory.mktemp("foundation"), mock_mistral, mock_keys)
    d.mint("alice", "prod", "--owner", "alice@example.com")
    d.mint("bob", "prod")
    d.mint("carol", "dev")
    d.mint("gone", "prod")
    d.cli("revoke", "gone")
    d.mint("old", "prod", "--not-before", "2019-01-01T00:00:00Z", "--expires-at", PAST)
    d.mint("later", "prod", "--not-before", FUTURE)
    d.start()
    yield d
    d.stop()


def upstream_auth_headers(mock) -> list[str]:
    return [r["headers"].get("authorization") for r in mock.requests()]


def test_shipped_configs_pass_envoy_validate(dep):
    (dep.workdir / "geoip").mkdir(exist_ok=True)
    db = MMDBWriter(ip_version=6, database_type="GeoIP2-Country", ipv4_compatible=True)
    db.insert_network(IPSet(["203.0.113.0/24"]), {"country": {"iso_code": "FR"}})
    db.to_db_file(str(dep.workdir / "geoip" / "country.mmdb"))
    # fleet.yaml loads the filter from shieldkey.wasm in Envoy's working directory.
    wasm = dep.workdir / "shieldkey.wasm"
    if not wasm.exists():
        wasm.symlink_to(WASM)
    shipped = sorted(p.name for p in (harness.PROJECT / "envoy").glob("*.yaml"))
    assert shipped == ["behind-lb.yaml", "demo.yaml", "fleet.yaml", "mistral.yaml"]
    for name in shipped:
        ok, out = harness.validate(harness.PROJECT / "envoy" / name, dep.workdir, dep.env)
        assert ok, out


def test_allowed_request_reaches_upstream_with_the_real_key_only(dep, mock_mistral, mock_keys):
    status, _, body = request(dep.url, token=dep.tokens["alice"], headers={"x-api-key": dep.tokens["alice"]})
    assert status == 200, body
    assert json.loads(body)["object"] == "chat.completion"
    [seen] = mock_mistral.requests()
    assert seen["headers"]["authorization"] == f"Bearer {mock_keys['prod']}"
    assert "x-api-key" not in seen["headers"]
    assert "sk_shield_t_" not in json.dumps(seen)


def test_each_token_uses_its_own_upstream_key(dep, mock_mistral, mock_keys):
    assert request(dep.url, token=dep.tokens["carol"])[0] == 200
    assert upstream_auth_headers(mock_mistral) == [f"Bearer {mock_keys['dev']}"]


def test_x_api_key_is_accepted_and_stripped(dep, mock_mistral, mock_keys):
    status, _, _ = request(dep.url, headers={"x-api-key": dep.tokens["bob"]})
    assert status == 200
    [seen] = mock_mistral.requests()
    assert seen["headers"]["authorization"] == f"Bearer {mock_keys['prod']}"
    assert "x-api-key" not in seen["headers"]


def _secret_of(token: str) -> str:
    """The secret part of `sk_shield_t_<id>_<secret>` (ids have no `_`; secrets may)."""
    parts = token.split("_", 4)
    return parts[4] if token.startswith("sk_shield_t_") and len(parts) == 5 else token


def _wrong_secret(token: str) -> str:
    last = token[-1]
    return token[:-1] + ("A" if last != "A" else "B")


@pytest.mark.parametrize("case,expected", [
    ("missing", "shield_token_missing"),
    ("malformed", "shield_token_malformed"),
    ("raw_mistral_key", "shield_token_malformed"),
    ("unknown", "shield_token_unknown"),
    ("wrong_secret", "shield_token_invalid"),
    ("revoked", "shield_token_revoked"),
    ("expired", "shield_token_expired"),
    ("not_yet_valid", "shield_token_not_yet_valid"),
])
def test_denials_are_401_mistral_shaped_and_never_reach_upstream(dep, mock_mistral, mock_keys, case, expected):
    alice = dep.tokens["alice"]
    token = {
        "missing": None,
        "malformed": "sk_shield_t_alice",
        "raw_mistral_key": mock_keys["prod"],
        "unknown": alice.replace("_alice_", "_nobody_"),
        "wrong_secret": _wrong_secret(alice),
        "revoked": dep.tokens["gone"],
        "expired": dep.tokens["old"],
        "not_yet_valid": dep.tokens["later"],
    }[case]
    status, headers, body = request(dep.url, token=token)
    assert status == 401, body
    assert headers["content-type"] == "application/json"
    assert error_code(body) == expected
    doc = json.loads(body)
    assert doc["type"] == "authentication_error"
    if token:
        assert token not in body.decode()
        assert _secret_of(token) not in body.decode()
    assert mock_mistral.requests() == []
    assert dep.envoy.stat(f"wasmcustom.shieldkey.reason.{expected}.denied") >= 1


def test_revoking_one_token_leaves_the_others_working(dep):
    assert request(dep.url, token=dep.tokens["gone"])[0] == 401
    for t in ("alice", "bob", "carol"):
        assert request(dep.url, token=dep.tokens[t])[0] == 200, t


def test_python_sdk_chat_stream_and_embeddings(dep, mock_mistral, mock_keys):
    from mistralai.client import Mistral

    client = Mistral(api_key=dep.tokens["alice"], server_url=dep.url, timeout_ms=30_000)
    res = client.chat.complete(model="mistral-small-latest", messages=[{"role": "user", "content": "Hello"}])
    assert res.choices[0].message.content
    assert res.usage.prompt_tokens > 0

    chunks = list(client.chat.stream(model="mistral-small-latest",
                                     messages=[{"role": "user", "content": "Count"}]))
    assert chunks, "stream yielded nothing"
    assert chunks[-1].data.usage is not None
    text = "".join(c.data.choices[0].delta.content or "" for c in chunks if c.data.choices)
    assert text

    emb = client.embeddings.create(model="mistral-embed", inputs=["a", "b"])
    assert len(emb.data) == 2 and emb.usage.completion_tokens == 0

    assert set(upstream_auth_headers(mock_mistral)) == {f"Bearer {mock_keys['prod']}"}


def test_python_sdk_gets_a_clean_error_for_a_revoked_token(dep, mock_mistral):
    from mistralai.client import Mistral
    from mistralai.client.errors import SDKError

    client = Mistral(api_key=dep.tokens["gone"], server_url=dep.url, timeout_ms=30_000)
    with pytest.raises(SDKError) as err:
        client.chat.complete(model="mistral-small-latest", messages=[{"role": "user", "content": "Hi"}])
    assert err.value.status_code == 401
    assert "shield_token_revoked" in err.value.body
    assert mock_mistral.requests() == []


def configurations(doc) -> list[dict]:
    """Every Wasm filter `configuration` (a StringValue or BytesValue) in a config dump."""
    found = []
    if isinstance(doc, dict):
        if doc.get("@type", "").endswith(("google.protobuf.BytesValue", "google.protobuf.StringValue")):
            found.append(doc)
        for v in doc.values():
            found += configurations(v)
    elif isinstance(doc, list):
        for v in doc:
            found += configurations(v)
    return found


def test_no_secret_reaches_logs_stats_or_bodies(dep, mock_keys):
    # Exercise every path once more so the log has something to leak from.
    bodies = [request(dep.url, token=t)[2] for t in dep.tokens.values()]
    bodies.append(request(dep.url, token=_wrong_secret(dep.tokens["alice"]))[2])
    secrets = list(mock_keys.values()) + [dep.master_key]
    secrets += [_secret_of(t) for t in dep.tokens.values()]
    assert all(len(s) == 43 for s in secrets[-len(dep.tokens):])
    haystacks = {
        "envoy log": dep.envoy.log_text(),
        "/stats": dep.envoy.admin_get("/stats"),
        "/stats/prometheus": dep.envoy.admin_get("/stats/prometheus"),
        # The admin config dump holds the policy: digests and sealed keys only.
        "/config_dump": dep.envoy.admin_get("/config_dump"),
        "bodies": b"".join(bodies).decode(errors="replace"),
    }
    # The policy inside the dump is compressed (as `shieldkey publish` writes it): decoded here.
    haystacks["/config_dump policy"] = "\n".join(
        json.dumps(policy_of_configuration(c)) for c in configurations(json.loads(haystacks["/config_dump"])))
    assert "skseal:v1:" in haystacks["/config_dump policy"], "the dump should show the (sealed) policy"
    for where, text in haystacks.items():
        for s in secrets:
            assert s not in text, f"a secret leaked into {where}"
    # The real key must not be recoverable from the policy or the published filter config.
    published = json.dumps(published_policy(json.loads(dep.ecds.read_text())))
    for name, text in ((dep.policy.name, dep.policy.read_text()), (dep.ecds.name, published)):
        for s in secrets:
            assert s not in text, f"a secret is stored in clear in {name}"


def test_filter_logs_the_loaded_policy_without_secrets(dep):
    log = dep.envoy.log_text()
    assert "shieldkey: policy revision" in log
    assert "tokens (1 revoked), 0 teams, 2 upstream keys" in log


@pytest.mark.parametrize("master_key,rejection", [
    ("another", "upstream_keys[0].sealed: cannot open sealed key"),
    ("not base64!", "master_key_env: SHIELDKEY_MASTER_KEY:"),
    (None, "master_key_env: environment variable SHIELDKEY_MASTER_KEY is not visible"),
])
def test_a_wrong_or_missing_master_key_rejects_the_config_and_nothing_is_forwarded(
        tmp_path, mock_mistral, mock_keys, master_key, rejection):
    d = Deployment(tmp_path, mock_mistral, mock_keys)
    token = d.mint("alice")
    d.publish()
    if master_key == "another":
        master_key = d.cli("keygen").strip()  # valid, but not the one that sealed the keys
    d.env = {"SHIELDKEY_MASTER_KEY": master_key}
    d.start(publish=False, wait_ready=False)
    try:
        deadline = time.monotonic() + 10
        while "configuration rejected" not in d.envoy.log_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert f"configuration rejected: {rejection}" in d.envoy.log_text()
        assert master_key is None or master_key not in d.envoy.log_text()
        # No filter configuration was ever accepted: Envoy answers for the missing filter
        # (500, response flag NC) instead of running the chain without it.
        assert request(d.url, token=token, timeout=2)[0] == 500
        assert mock_mistral.requests() == []
    finally:
        d.stop()


def test_inline_filter_config_serves_and_an_unloadable_one_stops_envoy(tmp_path, mock_mistral, mock_keys):
    """Without ECDS: `render wasm-filter` is the filter's typed_config in a static listener."""
    import yaml

    d = Deployment(tmp_path, mock_mistral, mock_keys)
    token = d.mint("alice")
    doc = yaml.safe_load((harness.PROJECT / "envoy" / "demo.yaml").read_text())
    hcm = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    index = [f["name"] for f in hcm["http_filters"]].index("shieldkey")
    hcm["http_filters"][index] = {"name": "shieldkey",
                                  "typed_config": json.loads(d.cli("render", "wasm-filter", "--wasm", str(WASM)))}
    d.bootstrap = tmp_path / "inline.yaml"
    d.bootstrap.write_text(yaml.safe_dump(doc))

    d.start(publish=False)
    try:
        assert request(d.url, token=token)[0] == 200
    finally:
        d.stop()

    d.env = {"SHIELDKEY_MASTER_KEY": d.cli("keygen").strip()}  # cannot open the sealed key
    with pytest.raises(RuntimeError, match="Envoy exited") as refused:
        d.start(publish=False)
    assert "configuration rejected: upstream_keys[0].sealed" in str(refused.value)
    assert len(mock_mistral.requests()) == 1
