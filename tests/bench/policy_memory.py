"""Benchmark (not a test): Envoy's memory with a 10-token and a 100,000-token policy.

One Envoy (envoy/demo.yaml through ECDS, --concurrency 2) per policy size; after it loaded the
policy and served a few requests, its resident memory (VmRSS and VmHWM from /proc) is read. The
difference between the two sizes is what the policy costs: Envoy's own copies of the plugin
configuration (compressed, as `shieldkey publish` writes it), the records in shared data, and
whatever a VM held at its peak while loading (WebAssembly memory never shrinks; the filter reads
the configuration 64 KiB at a time, so that peak is small).

    .venv/bin/python tests/bench/policy_memory.py [largest_policy]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402
from deployment import Deployment, request  # noqa: E402
from policy_scale import add_filler_tokens, load_times  # noqa: E402


def memory_kib(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def run(tmp: Path, mock: "harness.MockMistral", key: str, size: int) -> dict:
    dep = Deployment(tmp / f"policy-{size}", mock, {"prod": key}, concurrency=2)
    dep.mint("bench", "prod")
    dep.edit_policy(lambda p: add_filler_tokens(p, size - 1))
    dep.start(log_level="debug")
    try:
        loads = load_times(dep.envoy, size)
        for _ in range(20):
            assert request(dep.url, token=dep.tokens["bench"])[0] == 200
        time.sleep(0.5)
        return {"size": size, "mb": dep.policy.stat().st_size / 1e6, "loads": loads,
                **memory_kib(dep.envoy.pid)}
    finally:
        dep.stop()


def main() -> None:
    largest = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    key = harness.random_key()
    mock = harness.MockMistral(keys=[key])
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run(Path(tmp), mock, key, size) for size in (10, largest)]
    mock.stop()
    print("Envoy --concurrency 2 (3 VMs: main thread + 2 workers)")
    print(f"{'tokens':>8} {'policy MB':>10} {'RSS MiB':>8} {'peak MiB':>9} {'load ms per VM':>24}")
    for r in rows:
        loads = "/".join(str(t) for t in r["loads"]) or "?"
        print(f"{r['size']:>8} {r['mb']:>10.1f} {r['VmRSS'] / 1024:>8.0f} {r['VmHWM'] / 1024:>9.0f} "
              f"{loads:>24}")
    grow = (rows[1]["VmRSS"] - rows[0]["VmRSS"]) / 1024
    print(f"RSS growth for {largest} tokens: {grow:.0f} MiB")


if __name__ == "__main__":
    main()
