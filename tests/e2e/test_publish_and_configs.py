"""Publishing that cannot silently fail, and the shipped configs' request hygiene, in a real Envoy.

- `--publish` keeps the settings of the ECDS file it replaces (a revocation without `--wasm` must
  not point Envoy at another wasm file), and with `--admin` the CLI waits for Envoy's verdict.
- Every shipped config removes a client-sent country header before geoip and ShieldKey, makes
  paths canonical in the HttpConnectionManager, and compresses JSON responses for clients after
  ShieldKey has read them.

envoy/mistral.yaml talks TLS to api.mistral.ai; here its `mistral` cluster is rewritten to the
mock (plain TCP, static address). Everything else in it (listener, HttpConnectionManager,
filter chain) is loaded as shipped.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from mmdb_writer import MMDBWriter
from netaddr import IPSet

import deployment
import harness
from deployment import Deployment, request, error_code

FR_NET, UNKNOWN_IP = "203.0.113.0/24", "192.0.2.1"
REJECTED = "extension_config_discovery.http_filter.shieldkey.update_rejected"
SHIPPED = ["demo.yaml", "mistral.yaml", "behind-lb.yaml"]


@pytest.fixture(autouse=True)
def _binaries(monkeypatch):
    """The CLI and filter under test (overridable to test a build from another target dir)."""
    if os.environ.get("SHIELDKEY_E2E_CLI"):
        monkeypatch.setattr(deployment, "CLI", Path(os.environ["SHIELDKEY_E2E_CLI"]))
    if os.environ.get("SHIELDKEY_E2E_WASM"):
        monkeypatch.setattr(deployment, "WASM", Path(os.environ["SHIELDKEY_E2E_WASM"]))


def admin_url(d: Deployment) -> str:
    return f"http://127.0.0.1:{d.envoy.admin_port}"


def published_wasm(d: Deployment) -> str:
    doc = json.loads(d.ecds.read_text())
    return doc["resources"][0]["typed_config"]["config"]["vm_config"]["code"]["local"]["filename"]


def first_status(d: Deployment, token: str, within: float = 1.0) -> tuple[int, bytes]:
    """The answer for `token` once it is no longer 200, waiting at most `within` seconds.

    Envoy counts an ECDS update as applied when its main thread has it; the workers switch
    right after (well under a millisecond here)."""
    deadline = time.monotonic() + within
    while True:
        status, _, body = request(d.url, token=token)
        if status != 200 or time.monotonic() > deadline:
            return status, body
        time.sleep(0.005)


@pytest.fixture
def live(tmp_path, mock_mistral, mock_keys):
    d = Deployment(tmp_path, mock_mistral, mock_keys)
    for name in ("carol", "dave"):
        d.mint(name)
    d.start()  # publishes with --wasm <absolute path of the built filter>
    yield d
    d.stop()


def test_revoke_without_wasm_keeps_the_published_wasm_and_waits_for_envoy(live):
    d = live
    assert Path(published_wasm(d)).is_absolute()
    wasm = published_wasm(d)
    assert request(d.url, token=d.tokens["carol"])[0] == 200
    rejected = d.envoy.stat(REJECTED)

    # The documented revocation: no --wasm.
    d.cli("revoke", "carol", "--publish", str(d.ecds), "--admin", admin_url(d))
    assert f"published revision {d.revision()} to {d.ecds}; Envoy applied it" in d.last_stderr
    assert published_wasm(d) == wasm
    assert d.envoy.stat(REJECTED) == rejected
    status, body = first_status(d, d.tokens["carol"])
    assert (status, error_code(body)) == (401, "shield_token_revoked")
    assert request(d.url, token=d.tokens["dave"])[0] == 200

    # SHIELDKEY_ADMIN is the default for --admin; publishing the same revision again is
    # confirmed too.
    d.cli("publish", "--to", str(d.ecds), env={"SHIELDKEY_ADMIN": admin_url(d)})
    assert "Envoy applied it" in d.last_stderr


def test_a_publish_envoy_rejects_fails_the_cli_and_the_old_policy_keeps_serving(live):
    d = live
    rejected = d.envoy.stat(REJECTED)
    serving = d.revision()
    good = d.ecds.read_bytes()

    d.cli("revoke", "carol", "--publish", str(d.ecds), "--admin", admin_url(d),
          "--wasm", "/nonexistent.wasm", check=False)
    assert d.last_returncode == 1, d.last_stderr
    revision = d.revision()
    assert revision == serving + 1
    assert (f"Envoy rejected revision {revision} (see its log: update_rejected went "
            f"{rejected} -> {rejected + 1}); the previous policy (revision {serving}) is still "
            f"serving") in d.last_stderr, d.last_stderr
    assert "run `shieldkey publish`" in d.last_stderr
    assert d.envoy.stat(REJECTED) == rejected + 1
    # The previous configuration serves: carol is not revoked.
    for _ in range(10):
        assert request(d.url, token=d.tokens["carol"])[0] == 200
    # The file is back to what Envoy serves, so the next publish starts from working settings.
    assert d.ecds.read_bytes() == good

    d.cli("publish", "--to", str(d.ecds), "--admin", admin_url(d))
    assert f"published revision {revision} to {d.ecds}; Envoy applied it" in d.last_stderr
    status, body = first_status(d, d.tokens["carol"])
    assert (status, error_code(body)) == (401, "shield_token_revoked")


# --- the shipped configs ------------------------------------------------------------------------

def bootstrap_for(name: str, workdir: Path) -> Path:
    """The shipped config; for mistral.yaml, its upstream cluster pointed at the mock instead."""
    shipped = harness.PROJECT / "envoy" / name
    if name != "mistral.yaml":
        return shipped
    doc = yaml.safe_load(shipped.read_text())
    [cluster] = [c for c in doc["static_resources"]["clusters"] if c["name"] == "mistral"]
    cluster["type"] = "STATIC"
    cluster.pop("dns_lookup_family", None)
    cluster.pop("transport_socket", None)
    out = workdir / "mistral-to-mock.yaml"
    out.write_text(yaml.safe_dump(doc))
    return out


def write_geoip_db(workdir: Path) -> None:
    (workdir / "geoip").mkdir(exist_ok=True)
    db = MMDBWriter(ip_version=6, database_type="GeoIP2-Country", ipv4_compatible=True)
    db.insert_network(IPSet([FR_NET]), {"country": {"iso_code": "FR"}})
    db.to_db_file(str(workdir / "geoip" / "country.mmdb"))


def hcm_of(envoy: harness.EnvoyProcess) -> dict:
    dump = json.loads(envoy.admin_get("/config_dump?resource=static_listeners"))
    [entry] = [c for c in dump["configs"] if c["listener"]["name"] == "shieldkey"]
    [hcm] = [f for f in entry["listener"]["filter_chains"][0]["filters"]
             if f["name"] == "envoy.filters.network.http_connection_manager"]
    return hcm["typed_config"]


@pytest.fixture(params=SHIPPED)
def shipped(request, tmp_path, mock_mistral, mock_keys):
    name = request.param
    if name == "behind-lb.yaml":
        write_geoip_db(tmp_path)
    d = Deployment(tmp_path, mock_mistral, mock_keys, bootstrap=str(bootstrap_for(name, tmp_path)))
    d.mint("fr-only", "prod", "--countries-allow", "FR")
    d.mint("anyone", "prod")
    d.start()
    d.name = name
    yield d
    d.stop()


def test_a_client_cannot_claim_a_country(shipped, mock_mistral):
    d = shipped
    # Behind the load balancer the client's address comes from X-Forwarded-For; one geoip does
    # not know, so only a spoofed header could make it French.
    via = {"x-forwarded-for": UNKNOWN_IP} if d.name == "behind-lb.yaml" else {}
    for spoof in ("FR", "fr"):
        status, _, body = request(d.url, token=d.tokens["fr-only"],
                                  headers={**via, "x-shieldkey-country": spoof})
        assert (status, error_code(body)) == (403, "shield_geo_denied"), (d.name, body)
    assert d.envoy.stat("wasmcustom.shieldkey.reason.shield_geo_denied.denied") == 2

    # The chain forwards allowed requests, without the client's country header.
    status, _, body = request(d.url, token=d.tokens["anyone"],
                              headers={**via, "x-shieldkey-country": "FR"})
    assert status == 200, body
    [seen] = [r for r in mock_mistral.requests() if r["path"].startswith("/v1/")]
    assert "x-shieldkey-country" not in seen["headers"], seen["headers"]
    if d.name == "behind-lb.yaml":
        # geoip, after the removal, still sets the real country.
        status, _, _ = request(d.url, token=d.tokens["fr-only"],
                               headers={"x-forwarded-for": "203.0.113.9", "x-shieldkey-country": "US"})
        assert status == 200


def test_paths_are_canonical_and_json_is_compressed_after_shieldkey(shipped, mock_mistral):
    d = shipped
    hcm = hcm_of(d.envoy)
    assert hcm.get("normalize_path") is True, hcm
    assert hcm.get("merge_slashes") is True, hcm
    assert hcm.get("path_with_escaped_slashes_action") == "REJECT_REQUEST", hcm

    names = [f["name"] for f in hcm["http_filters"]]
    expected = ["envoy.filters.http.compressor", "strip-client-country", "shieldkey",
                "envoy.filters.http.buffer", "envoy.filters.http.router"]
    if d.name == "behind-lb.yaml":
        expected.insert(2, "envoy.filters.http.geoip")
    assert names == expected
    [strip] = [f for f in hcm["http_filters"] if f["name"] == "strip-client-country"]
    assert strip["typed_config"]["mutations"]["request_mutations"] == [{"remove": "x-shieldkey-country"}]

    # Escaped slashes are refused by Envoy itself; dot segments and doubled slashes are resolved
    # before ShieldKey and the route see the path.
    status, _, _ = request(d.url, "/v1/chat%2Fcompletions", token=d.tokens["anyone"])
    assert status == 400
    assert request(d.url, "/v1//chat/./completions", token=d.tokens["anyone"])[0] == 200
    assert [r["path"] for r in mock_mistral.requests()] == ["/v1/chat/completions"]

    # JSON answers are gzip for a client that accepts it; the upstream was asked for none, so
    # ShieldKey read plain usage; event streams stay uncompressed.
    mock_mistral.reset()
    status, headers, body = request(d.url, token=d.tokens["anyone"],
                                    headers={"accept-encoding": "gzip"})
    assert status == 200
    assert headers.get("content-encoding") == "gzip", headers
    assert json.loads(gzip.decompress(body))["object"] == "chat.completion"
    [seen] = mock_mistral.requests()
    assert seen["headers"].get("accept-encoding") in (None, "identity"), seen["headers"]
    stream = {"model": "mistral-small-latest", "stream": True,
              "messages": [{"role": "user", "content": "hi"}]}
    status, headers, body = request(d.url, token=d.tokens["anyone"], body=stream,
                                    headers={"accept-encoding": "gzip"})
    assert status == 200 and "content-encoding" not in headers, headers
    assert body.startswith(b"data: ")
    time.sleep(0.2)  # usage is accounted when each stream ends
    assert d.envoy.stat("wasmcustom.shieldkey.token_id.anyone.prompt_tokens") > 0


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_chains_are_the_rendered_chain(name, tmp_path):
    """The configs carry exactly what `shieldkey render http-filters` recommends."""
    doc = yaml.safe_load((harness.PROJECT / "envoy" / name).read_text())
    hcm = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    args = ["render", "http-filters", "--json"]
    if name == "behind-lb.yaml":
        args += ["--geoip", "geoip/country.mmdb"]
    out = subprocess.run([str(deployment.CLI), *args], capture_output=True, text=True, check=True,
                         cwd=tmp_path, env={**os.environ, "SHIELDKEY_POLICY": str(tmp_path / "none.json")})
    assert hcm["http_filters"] == json.loads(out.stdout)["http_filters"]


@pytest.mark.parametrize("name", [*SHIPPED, "fleet.yaml"])
def test_shipped_configs_read_the_upstream_a_slice_at_a_time(name):
    """A response that arrives in one burst must reach the client before the filter has scanned
    all of it: Envoy reads the upstream until its buffer limit per event-loop pass and writes to the
    client in between (README "Envoy configuration"; `make bench` measures the first event)."""
    doc = yaml.safe_load((harness.PROJECT / "envoy" / name).read_text())
    mistral = next(c for c in doc["static_resources"]["clusters"] if c["name"] == "mistral")
    assert mistral.get("per_connection_buffer_limit_bytes") == 32768
