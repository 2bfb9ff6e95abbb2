"""Benchmark (not a test): what the size of the policy costs, at load time and per request.

For each policy size, one Envoy (envoy/demo.yaml through ECDS, --concurrency 2) loads a policy of
N tokens: one minted by the CLI and used by the clients, the rest filler records with random
digests (what `shieldkey mint` would write, without 100,000 CLI runs). Reports:
  load ms   - per VM, from the filter's own "loaded ... in T ms" log line (parse, compile, open
              keys, publish per-token records into shared data or find them published), read
              from a first Envoy run at debug level
  req/s, CPU - from a second run at info level
  Envoy CPU - per request with the minted token, from /proc (as in accounting_overhead.py)
A plain Envoy (no filter) in the same run gives the baseline.

    .venv/bin/python tests/bench/policy_scale.py [requests_per_setup] [largest_policy]
"""

from __future__ import annotations

import base64
import re
import secrets
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402
from accounting_overhead import measure, plain_envoy  # noqa: E402
from deployment import Deployment  # noqa: E402

# The root context that publishes the records logs the token count; the others find them
# published ("records published by another root context") and read no token.
LOADED = re.compile(r"policy revision \d+ loaded .*?(?:: (\d+) tokens .*?|by another root context\)).* in (-?\d+) ms")


def add_filler_tokens(policy: dict, count: int, template_id: str = "bench") -> None:
    template = next(t for t in policy["tokens"] if t["id"] == template_id)
    for i in range(count):
        policy["tokens"].append({
            "id": f"filler-{i}",
            "digest": base64.b64encode(secrets.token_bytes(32)).decode(),
            "upstream_key": template["upstream_key"],
            "owner": f"user-{i}@example.com",
        })


def load_times(envoy: "harness.EnvoyProcess", tokens: int, timeout: float = 120) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        times = [int(ms) for n, ms in LOADED.findall(envoy.log_text()) if n in ("", str(tokens))]
        # The main thread's root context and one per worker.
        if len(times) >= 3:
            return times
        time.sleep(0.2)
    return [int(ms) for n, ms in LOADED.findall(envoy.log_text()) if n in ("", str(tokens))]


def run_plain(tmp: Path, mock: "harness.MockMistral", key: str, total: int) -> tuple[float, float]:
    plain = plain_envoy(tmp / "plain", mock, concurrency=2)
    try:
        return measure(plain, key, total)
    finally:
        plain.stop()


def run_policy(tmp: Path, mock: "harness.MockMistral", key: str, size: int, total: int):
    work = tmp / f"policy-{size}"
    dep = Deployment(work, mock, {"prod": key}, concurrency=2)
    dep.mint("bench", "prod")
    dep.edit_policy(lambda p: add_filler_tokens(p, size - 1))
    started = time.monotonic()
    dep.publish()
    publish_s = time.monotonic() - started
    policy_mb = dep.policy.stat().st_size / 1e6
    # Every VM's load line needs debug level (only the publishing VM logs at info); debug
    # logging would also slow every request, so requests are measured in a second run at info.
    dep.start(publish=False, log_level="debug")
    try:
        times = load_times(dep.envoy, size)
    finally:
        dep.stop()
    dep.start(publish=False)
    try:
        rps, cpu = measure(dep.envoy, dep.tokens["bench"], total)
    finally:
        dep.stop()
    return {"size": size, "mb": policy_mb, "publish_s": publish_s, "load_ms": times, "rps": rps, "cpu": cpu}


def main() -> None:
    total = int(sys.argv[1]) if len(sys.argv) > 1 else 3000
    largest = int(sys.argv[2]) if len(sys.argv) > 2 else 100_000
    key = harness.random_key()
    mock = harness.MockMistral(keys=[key])
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base_rps, base_cpu = run_plain(tmp, mock, key, total)
        rows = [run_policy(tmp, mock, key, size, total) for size in (10, largest)]
    mock.stop()

    print(f"{total} requests per setup, Envoy --concurrency 2, 4 keep-alive clients, one token used")
    print(f"plain Envoy: {base_rps:.0f} req/s, {base_cpu:.1f} Envoy CPU us/req")
    print(f"{'tokens':>8} {'policy MB':>10} {'CLI publish s':>14} {'load ms per VM':>22} "
          f"{'req/s':>7} {'CPU us/req':>11} {'over plain':>11}")
    for r in rows:
        loads = "/".join(str(t) for t in r["load_ms"]) or "?"
        print(f"{r['size']:>8} {r['mb']:>10.1f} {r['publish_s']:>14.2f} {loads:>22} "
              f"{r['rps']:>7.0f} {r['cpu']:>11.1f} {r['cpu'] - base_cpu:>+11.1f}")


if __name__ == "__main__":
    main()
