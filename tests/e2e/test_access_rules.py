"""Issue 4: per-token access rules (networks, countries, rates, models) in a real Envoy with 2
workers. Direct clients use envoy/demo.yaml; clients behind a trusted load balancer (and country
rules, with a MaxMind database built here) use envoy/behind-lb.yaml."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from mistralai.client import Mistral
from mistralai.client.errors import SDKError
from mmdb_writer import MMDBWriter
from netaddr import IPSet

from deployment import Deployment, request, error_code

FR_NET, US_NET, UNKNOWN_IP = "203.0.113.0/24", "198.51.100.0/24", "192.0.2.1"


def rules(**per_token):
    def apply(policy):
        for t in policy["tokens"]:
            t.update(per_token.get(t["id"], {}))
    return apply


@pytest.fixture(scope="module")
def direct(tmp_path_factory, mock_mistral, mock_keys):
    d = Deployment(tmp_path_factory.mktemp("rules-direct"), mock_mistral, mock_keys,
                   policy_extra={"requests": {"max_body_bytes": 4096}})
    for t in ("local", "remote", "rpm", "tpm", "models"):
        d.mint(t, "prod")
    d.edit_policy(rules(
        local={"source_cidrs": ["127.0.0.0/8", "::1/128"]},
        remote={"source_cidrs": [FR_NET]},
        rpm={"rate_limit": {"requests_per_minute": 10}},
        tpm={"rate_limit": {"tokens_per_minute": 1000}},
        models={"models": {"allow": ["mistral-small-*", "mistral-embed"], "max_tokens": 100}},
    ))
    d.start()
    yield d
    d.stop()


@pytest.fixture(scope="module")
def behind_lb(tmp_path_factory, mock_mistral, mock_keys):
    workdir = tmp_path_factory.mktemp("rules-lb")
    (workdir / "geoip").mkdir()
    db = MMDBWriter(ip_version=6, database_type="GeoIP2-Country", ipv4_compatible=True)
    db.insert_network(IPSet([FR_NET]), {"country": {"iso_code": "FR"}})
    db.insert_network(IPSet([US_NET]), {"country": {"iso_code": "US"}})
    db.insert_network(IPSet(["2001:db8:f::/48"]), {"country": {"iso_code": "FR"}})
    db.to_db_file(str(workdir / "geoip" / "country.mmdb"))
    d = Deployment(workdir, mock_mistral, mock_keys, bootstrap="behind-lb.yaml")
    for t in ("fr-office", "v6-office", "fr-only", "not-us"):
        d.mint(t, "prod")
    d.edit_policy(rules(**{
        "fr-office": {"source_cidrs": [FR_NET]},
        "v6-office": {"source_cidrs": ["2001:db8::/32"]},
        "fr-only": {"countries": {"allow": ["fr"]}},
        "not-us": {"countries": {"deny": ["US"], "unknown": "allow"}},
    }))
    d.start()
    yield d
    d.stop()


def code_of(dep, token, **kw):
    status, headers, body = request(dep.url, token=dep.tokens[token], **kw)
    return status, (error_code(body) if status >= 400 else None), headers


# --- source networks -------------------------------------------------------------------------

def test_direct_client_address_is_the_tcp_peer(direct, mock_mistral):
    assert code_of(direct, "local")[:2] == (200, None)
    assert code_of(direct, "remote")[:2] == (403, "shield_ip_denied")
    # Without a trusted hop, X-Forwarded-For is not believed.
    assert code_of(direct, "remote", headers={"x-forwarded-for": "203.0.113.9"})[:2] == (403, "shield_ip_denied")
    assert len(mock_mistral.requests()) == 1
    assert direct.envoy.stat("wasmcustom.shieldkey.reason.shield_ip_denied.denied") == 2


def test_behind_a_trusted_load_balancer(behind_lb, mock_mistral):
    ok = code_of(behind_lb, "fr-office", headers={"x-forwarded-for": "203.0.113.9"})
    assert ok[:2] == (200, None)
    # A client-written entry left of the one the load balancer appended is ignored.
    spoofed = code_of(behind_lb, "fr-office", headers={"x-forwarded-for": "203.0.113.9, 198.51.100.7"})
    assert spoofed[:2] == (403, "shield_ip_denied")
    # No header: the load balancer itself (127.0.0.1) is not in the allowed network.
    assert code_of(behind_lb, "fr-office")[:2] == (403, "shield_ip_denied")
    assert code_of(behind_lb, "v6-office", headers={"x-forwarded-for": "2001:db8:1::5"})[:2] == (200, None)
    assert code_of(behind_lb, "v6-office", headers={"x-forwarded-for": "2001:db9::5"})[:2] == (403, "shield_ip_denied")


# --- countries ----------------------------------------------------------------------------------

def test_country_rules_use_geoip_and_ignore_client_headers(behind_lb, mock_mistral):
    fr, us = {"x-forwarded-for": "203.0.113.9"}, {"x-forwarded-for": "198.51.100.7"}
    assert code_of(behind_lb, "fr-only", headers=fr)[:2] == (200, None)
    assert code_of(behind_lb, "fr-only", headers={"x-forwarded-for": "2001:db8:f::1"})[:2] == (200, None)
    assert code_of(behind_lb, "fr-only", headers=us)[:2] == (403, "shield_geo_denied")
    # Spoofing the country header fails: geoip overwrites it, or it was stripped before geoip.
    assert code_of(behind_lb, "fr-only", headers={**us, "x-shieldkey-country": "FR"})[:2] == (403, "shield_geo_denied")
    assert code_of(behind_lb, "fr-only", headers={"x-forwarded-for": UNKNOWN_IP, "x-shieldkey-country": "FR"})[:2] == \
        (403, "shield_geo_denied")
    # Deny lists, and an explicit "allow" for unknown countries.
    assert code_of(behind_lb, "not-us", headers=us)[:2] == (403, "shield_geo_denied")
    assert code_of(behind_lb, "not-us", headers={"x-forwarded-for": UNKNOWN_IP})[:2] == (200, None)
    assert code_of(behind_lb, "not-us", headers=fr)[:2] == (200, None)
    seen = [r for r in mock_mistral.requests() if r["path"].startswith("/v1/")]
    assert len(seen) == 4
    assert all(r["headers"].get("x-shieldkey-country") in {"FR", None} for r in seen)


# --- rate limits --------------------------------------------------------------------------------

def test_two_workers_share_one_request_rate_limit_exactly(direct, mock_mistral):
    def one(_):
        return code_of(direct, "rpm")

    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(one, range(30)))
    allowed = [r for r in results if r[0] == 200]
    limited = [r for r in results if r[0] == 429]
    # The burst is the limit; refill is 10/min, so a burst taking under 6 s gets exactly 10.
    assert len(allowed) == 10, [r[0] for r in results]
    assert len(limited) == 20
    assert all(r[1] == "shield_rate_limited" for r in limited)
    assert all(1 <= int(r[2]["retry-after"]) <= 6 for r in limited)
    assert len([r for r in mock_mistral.requests() if r["path"].startswith("/v1/")]) == 10


def test_tokens_per_minute_limit_after_large_responses(direct, mock_mistral):
    mock_mistral.behaviour(usage={"prompt_tokens": 600, "completion_tokens": 600})
    assert code_of(direct, "tpm")[0] == 200
    time.sleep(0.2)  # the response is accounted when the stream ends
    status, code, headers = code_of(direct, "tpm")
    assert (status, code) == (429, "shield_rate_limited")
    # 1200 tokens against 1000/min: the window drains for about 12 s before one more fits.
    assert 5 <= int(headers["retry-after"]) <= 60
    assert len(mock_mistral.requests()) == 1


# --- model rules --------------------------------------------------------------------------------

def test_model_rules_through_the_python_sdk(direct, mock_mistral):
    client = Mistral(api_key=direct.tokens["models"], server_url=direct.url, timeout_ms=30_000)
    ok = client.chat.complete(model="mistral-small-latest", max_tokens=50,
                              messages=[{"role": "user", "content": "hi"}])
    assert ok.choices[0].message.content
    assert client.embeddings.create(model="mistral-embed", inputs=["x"]).data

    with pytest.raises(SDKError) as denied:
        client.chat.complete(model="mistral-large-latest", max_tokens=50,
                             messages=[{"role": "user", "content": "hi"}])
    assert denied.value.status_code == 403 and "shield_model_denied" in denied.value.body

    with pytest.raises(SDKError) as too_many:
        client.chat.complete(model="mistral-small-latest", max_tokens=500,
                             messages=[{"role": "user", "content": "hi"}])
    assert too_many.value.status_code == 400 and "shield_max_tokens_exceeded" in too_many.value.body

    with pytest.raises(SDKError) as unset:
        client.chat.complete(model="mistral-small-latest", messages=[{"role": "user", "content": "hi"}])
    assert unset.value.status_code == 400 and "shield_max_tokens_exceeded" in unset.value.body
    assert len(mock_mistral.requests()) == 2


def test_bodies_that_cannot_be_judged(direct, mock_mistral):
    big = {"model": "mistral-small-latest", "max_tokens": 10,
           "messages": [{"role": "user", "content": "x" * 5000}]}
    assert code_of(direct, "models", body=big)[:2] == (413, "shield_body_too_large")
    assert code_of(direct, "models", body=b"not json")[:2] == (400, "shield_body_unreadable")
    assert code_of(direct, "models", body={"max_tokens": 5, "messages": []})[:2] == (400, "shield_body_unreadable")
    # Listing models has no body and nothing to judge.
    assert code_of(direct, "models", path="/v1/models", method="GET", body=None)[0] == 200
    assert [r["path"] for r in mock_mistral.requests()] == ["/v1/models"]
    stats = direct.envoy.stats()
    assert "wasmcustom.shieldkey.token_id.models.reason.shield_body_too_large.denied" in stats
