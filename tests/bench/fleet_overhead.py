"""Benchmark (not a test): what fleet mode costs per request, against single-Envoy mode and plain
Envoy, in one run. Same mock upstream, same load (tests/bench/accounting_overhead.py), Envoy
--concurrency 1:
  plain           - the ShieldKey filter removed
  single, budget  - envoy/demo.yaml, a token with a budget (body read, reservation, settlement)
  fleet, budget   - envoy/fleet.yaml against a 3-member etcd cluster, the same token: records
                    read from shared data per request, admission within the Envoy's lease (a
                    claim through etcd about every tenth of the budget), spend flushed by the
                    syncer in the background
Reports requests/s and Envoy CPU time per request (from /proc), each against plain.

    .venv/bin/python tests/bench/fleet_overhead.py [requests_per_setup]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402
from accounting_overhead import CLIENTS, measure, plain_envoy  # noqa: E402
from deployment import Deployment, request  # noqa: E402
from fleet import Fleet  # noqa: E402

BUDGET = ("--budget-usd", "1000000", "--budget-window", "monthly")


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

        (tmp / "single").mkdir()
        single = Deployment(tmp / "single", mock, {"prod": real_key}, concurrency=1)
        single.mint("metered", "prod", *BUDGET)
        single.start()
        try:
            results["single, budget"] = measure(single.envoy, single.tokens["metered"], total)
        finally:
            single.stop()

        fleet = Fleet(tmp / "fleet", mock, {"prod": real_key}, envoys=1, concurrency=1)
        try:
            fleet.mint("metered", *BUDGET)
            fleet.start()
            envoy = fleet.envoys[0]
            # Served once the syncer has read the policy (and this Envoy's spend) from etcd.
            deadline = time.monotonic() + 10
            while request(envoy.url, token=fleet.tokens["metered"])[0] != 200:
                assert time.monotonic() < deadline, "the fleet Envoy never served"
                time.sleep(0.05)
            results["fleet, budget"] = measure(envoy, fleet.tokens["metered"], total)
        finally:
            fleet.close()
    mock.stop()

    base_rps, base_cpu = results["plain"]
    print(f"{total} requests per setup, {CLIENTS} keep-alive clients, Envoy --concurrency 1")
    print(f"{'setup':<15} {'req/s':>8} {'vs plain':>9} {'Envoy CPU us/req':>17} {'over plain':>11}")
    for name, (rps, cpu) in results.items():
        print(f"{name:<15} {rps:8.0f} {rps / base_rps:9.2f} {cpu:17.1f} {cpu - base_cpu:+11.1f}")
    print("(req/s is bounded by the Python clients and mock on a small machine; the CPU column is "
          "the filter's cost; the fleet row includes the syncer's polling of etcd)")


if __name__ == "__main__":
    main()
