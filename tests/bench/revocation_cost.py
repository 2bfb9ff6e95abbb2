"""Benchmark (not a test): what one revocation costs at 10,000 and 100,000 tokens.

For each size, one Envoy (envoy/demo.yaml, ECDS, --concurrency 2, debug log level so every VM's
load line is visible) loads a policy of N tokens (one minted by the CLI, the rest filler records),
then 10 revocations are published one after another (a different token each, written straight into
the ECDS file as `shieldkey publish` would). Reports, per size:
  load ms        - per VM, from the filter's "loaded ... in T ms" line: first load, and revocations
                   (parse + compile the whole document, which ECDS always delivers whole, plus the
                   shared-data publish that writes only the changed record)
  records        - records written by a revocation (the first VM to configure writes; others 0)
  applied ms     - file moved to Envoy reporting the new version (version_text): the main
                   thread took the configuration; the workers' VMs load it after that
  every VM ms    - file moved to the last VM's "loaded" log line for that revision (Envoy's log
                   timestamps, milliseconds): the revocation is in force on every worker
  heap growth    - server.memory_allocated after the 10 revocations minus before

    .venv/bin/python tests/bench/revocation_cost.py [sizes...]
"""

from __future__ import annotations

import json
import re
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402
from deployment import Deployment  # noqa: E402
from policy_scale import add_filler_tokens  # noqa: E402

# The VM that publishes logs the records it wrote; the others that another root context did.
LOADED = re.compile(r"policy revision (\d+) loaded \(.*?generation \d+, "
                    r"(?:(\d+) records written|records published by another root context)\)"
                    r".* in (-?\d+) ms")
# Envoy's default log line starts with its local time: `[2026-11-26 07:56:19.123]`.
STAMPED_LOAD = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3})\].*policy revision (\d+) loaded",
                          re.MULTILINE)


def last_load_at(envoy, revision: int) -> float:
    """The wall-clock time of the last VM's load line for `revision` (seconds since the epoch)."""
    stamps = [datetime.strptime(at, "%Y-%m-%d %H:%M:%S.%f").timestamp()
              for at, rev in STAMPED_LOAD.findall(envoy.log_text()) if int(rev) == revision]
    return max(stamps, default=float("nan"))


def loads_of(envoy, revision: int, vms: int = 3, timeout: float = 60) -> list[tuple[int, int]]:
    """(records written, ms) of each VM's load of `revision`."""
    deadline = time.monotonic() + timeout
    found: list[tuple[int, int]] = []
    while time.monotonic() < deadline:
        found = [(int(w or 0), int(ms)) for rev, w, ms in LOADED.findall(envoy.log_text())
                 if int(rev) == revision]
        if len(found) >= vms:
            break
        time.sleep(0.1)
    return found


def run(size: int, mock, key: str, tmp: Path) -> dict:
    dep = Deployment(tmp / f"n{size}", mock, {"prod": key}, concurrency=2)
    dep.mint("bench", "prod")
    dep.edit_policy(lambda p: add_filler_tokens(p, size - 1))
    dep.publish()
    dep.start(publish=False, log_level="debug")
    try:
        policy = json.loads(dep.policy.read_text())
        first = loads_of(dep.envoy, policy["revision"])
        heap_before = dep.envoy.stat("server.memory_allocated") or 0
        revocations, applied, everywhere = [], [], []
        for i in range(10):
            policy["tokens"][1 + i]["status"] = "revoked"
            policy["revision"] += 1
            applied.append(dep.apply_policy(policy, timeout=60) * 1000)
            revocations.extend(loads_of(dep.envoy, policy["revision"]))
            everywhere.append((last_load_at(dep.envoy, policy["revision"]) - dep.moved_at) * 1000)
        time.sleep(1)
        heap_after = dep.envoy.stat("server.memory_allocated") or 0
    finally:
        dep.stop()
    return {
        "first_ms": sorted(ms for _, ms in first),
        "revoke_ms": sorted(ms for _, ms in revocations),
        "records": sorted({w for w, _ in revocations}),
        "applied_ms": sorted(applied),
        "every_vm_ms": sorted(everywhere),
        "heap_growth_mib": (heap_after - heap_before) / 1024 / 1024,
        "policy_mb": dep.policy.stat().st_size / 1e6,
    }


def main() -> None:
    sizes = [int(a) for a in sys.argv[1:]] or [10_000, 100_000]
    key = harness.random_key()
    mock = harness.MockMistral(keys=[key])
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for size in sizes:
                r = run(size, mock, key, Path(tmp))
                med = lambda xs: xs[len(xs) // 2] if xs else -1  # noqa: E731
                print(f"{size:>7} tokens ({r['policy_mb']:.1f} MB): first load {med(r['first_ms'])} ms/VM; "
                      f"revocation: load {med(r['revoke_ms'])} ms/VM (max {max(r['revoke_ms'], default=-1)}), "
                      f"records written {r['records']}, applied in {med(r['applied_ms']):.0f} ms "
                      f"(max {max(r['applied_ms']):.0f}), on every VM in {med(r['every_vm_ms']):.0f} ms "
                      f"(max {max(r['every_vm_ms']):.0f}); heap after 10 revocations {r['heap_growth_mib']:+.2f} MiB")
    finally:
        mock.stop()


if __name__ == "__main__":
    main()
