"""Benchmark (not a test): what ShieldKey costs per request, against plain Envoy, in one run.

Three Envoys with the same bootstrap (envoy/demo.yaml, --concurrency 1) in front of the same mock
upstream, loaded the same way:
  plain     - the ShieldKey filter removed; clients send the real key
  check     - ShieldKey, a token without limits (token check + key swap + usage scan + stats)
  account   - ShieldKey, a token with a budget and rate limits (also: body read, reservation
              and settlement by compare-and-swap in shared data)
Reports requests/s and Envoy CPU time per request (from /proc, so the Python clients and mock do
not blur it), each as a ratio against plain.

    .venv/bin/python tests/bench/accounting_overhead.py [requests_per_setup]
"""

from __future__ import annotations

import http.client
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))

import harness  # noqa: E402
from deployment import Deployment  # noqa: E402

CLIENTS = 4
BODY = json.dumps({"model": "mistral-small-latest", "max_tokens": 16,
                   "messages": [{"role": "user", "content": "hello there"}]}).encode()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load(url: str, key: str, total: int) -> float:
    host, port = url.removeprefix("http://").split(":")
    per_client = total // CLIENTS
    errors: list[str] = []

    def client():
        conn = http.client.HTTPConnection(host, int(port))
        for _ in range(per_client):
            conn.request("POST", "/v1/chat/completions", BODY,
                         {"authorization": f"Bearer {key}", "content-type": "application/json"})
            resp = conn.getresponse()
            resp.read()
            if resp.status != 200:
                errors.append(str(resp.status))
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise AssertionError(f"{len(errors)} failed requests, e.g. {errors[:3]}")
    return time.monotonic() - start


def measure(envoy: "harness.EnvoyProcess", key: str, total: int) -> tuple[float, float]:
    load(envoy.url, key, 200)  # warm up
    cpu0 = cpu_seconds(envoy.pid)
    wall = load(envoy.url, key, total)
    cpu = cpu_seconds(envoy.pid) - cpu0
    return total / wall, cpu / total * 1e6


def plain_envoy(workdir: Path, mock: "harness.MockMistral", concurrency: int) -> "harness.EnvoyProcess":
    """The baseline: envoy/demo.yaml without the ShieldKey filter, started."""
    doc = yaml.safe_load((harness.PROJECT / "envoy" / "demo.yaml").read_text())
    hcm = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["http_filters"] = [f for f in hcm["http_filters"] if f["name"] != "shieldkey"]
    workdir.mkdir(parents=True, exist_ok=True)
    bootstrap = workdir / "plain.yaml"
    bootstrap.write_text(yaml.safe_dump(doc))
    plain = harness.EnvoyProcess(bootstrap, workdir, admin_port=harness.free_port(),
                                 listener_ports={"shieldkey": harness.free_port()},
                                 cluster_endpoints={"mistral": ("127.0.0.1", mock.port)},
                                 concurrency=concurrency, env={})
    return plain.start()


def main() -> None:
    total = int(sys.argv[1]) if len(sys.argv) > 1 else 4000
    real_key = harness.random_key()
    mock = harness.MockMistral(keys=[real_key])
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        plain = plain_envoy(tmp / "plain", mock, concurrency=1)
        try:
            results["plain"] = measure(plain, real_key, total)
        finally:
            plain.stop()

        (tmp / "filter").mkdir()
        dep = Deployment(tmp / "filter", mock, {"prod": real_key}, concurrency=1)
        dep.mint("free", "prod")
        dep.mint("metered", "prod")

        def limits(policy):
            for t in policy["tokens"]:
                if t["id"] == "metered":
                    t["budget"] = {"limit_usd": "1000000", "window": "monthly"}
                    t["rate_limit"] = {"requests_per_minute": 10_000_000}
        dep.edit_policy(limits)
        dep.start()
        try:
            results["check"] = measure(dep.envoy, dep.tokens["free"], total)
            results["account"] = measure(dep.envoy, dep.tokens["metered"], total)
        finally:
            dep.stop()
    mock.stop()

    base_rps, base_cpu = results["plain"]
    print(f"{total} requests per setup, {CLIENTS} keep-alive clients, Envoy --concurrency 1")
    print(f"{'setup':<9} {'req/s':>8} {'vs plain':>9} {'Envoy CPU us/req':>17} {'over plain':>11}")
    for name, (rps, cpu) in results.items():
        print(f"{name:<9} {rps:8.0f} {rps / base_rps:9.2f} {cpu:17.1f} {cpu - base_cpu:+11.1f}")
    print("(req/s is bounded by the Python clients and mock on a small machine; the CPU column is "
          "the filter's cost)")


if __name__ == "__main__":
    main()
