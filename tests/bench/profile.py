"""`make profile`: where the front Envoy's CPU goes per request, plain Envoy against the minimal
wasm filter and ShieldKey, sampled with `perf` (not a test: it prints numbers).

Each setup of `make bench` (tests/bench/bench.py: the same front Envoy, upstream and wrk load at
32 connections, or `--connections N`) runs while `perf record -g` samples the front Envoy. Envoy's binary is stripped and
V8 writes no symbol map, so the samples are split by where they fall, from their call chains:

  kernel                 system calls and the network stack
  Envoy                  Envoy's own code outside any wasm call (codecs, router, access logs,
                         filter state, the V8 entry into the filter's callbacks, ...)
  wasm code              code V8 compiled from the filter (the filter's own work)
  called from wasm       Envoy code a wasm frame called: the host functions (headers, shared
                         data, filter state, stats) and the V8 runtime they go through

Each share times the setup's measured Envoy CPU per request gives microseconds per request.

    make profile                       (builds, installs wrk and perf if missing)
    make profile PROFILE_ARGS="--connections 1"   (where the latency at one connection goes)
    .venv/bin/python tests/bench/profile.py [--seconds S] [--setups a,b] [--connections N]
"""

from __future__ import annotations

import argparse
import collections
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))

import bench  # noqa: E402
import harness  # noqa: E402

SETUPS = ["plain", "minimal", "shieldkey-norules", "shieldkey-allrules"]
PARTS = ["kernel", "Envoy", "wasm code", "called from wasm"]
CONNECTIONS = 32
SAMPLE_HZ = 2000


def classify(perf_data: Path) -> collections.Counter:
    """Counts samples by part; a wasm frame shows as an address in anonymous executable memory,
    which perf names after a /tmp/perf-<pid>.map file that does not exist."""
    out = subprocess.run(["perf", "script", "-i", str(perf_data), "-F", "ip,dso"],
                         capture_output=True, text=True, check=True).stdout
    parts: collections.Counter = collections.Counter()
    for sample in out.split("\n\n"):
        frames = [line.strip() for line in sample.strip().splitlines()]
        if not frames:
            continue
        wasm = ["perf-" in f for f in frames]
        if wasm[0]:
            parts["wasm code"] += 1
        elif any(wasm):
            parts["called from wasm"] += 1
        elif "kernel" in frames[0]:
            parts["kernel"] += 1
        else:
            parts["Envoy"] += 1
    return parts


def profile(front: bench.Front, upstream: bench.Upstream, script: Path, connections: int,
            seconds: float, out: Path) -> tuple[bench.Run, collections.Counter]:
    perf = subprocess.Popen(["perf", "record", "-F", str(SAMPLE_HZ), "-g", "-p",
                             str(front.envoy.pid), "-o", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(0.5)
    try:
        run = bench.wrk_run(front, upstream, script, connections, seconds)
    finally:
        perf.send_signal(signal.SIGINT)
        _, err = perf.communicate(timeout=60)
    if perf.returncode not in (0, -signal.SIGINT) or not out.exists():
        raise bench.BenchError(f"perf record failed: {err.decode(errors='replace')}")
    return run, classify(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--setups", default=",".join(SETUPS))
    p.add_argument("--connections", type=int, default=CONNECTIONS)
    args = p.parse_args()
    for tool in ("wrk", "perf"):
        if not shutil.which(tool):
            print(f"profile: {tool} is missing (make profile installs it)", file=sys.stderr)
            return 2
    bench.build_minimal_filter()
    tmp = Path(tempfile.mkdtemp(prefix="shieldkey-profile-"))
    real_key = harness.random_key()
    upstream = bench.Upstream(tmp / "upstream", real_key)
    rows = []
    try:
        for name in args.setups.split(","):
            print(f"profile: {name}", file=sys.stderr, flush=True)
            front = bench.start_front(name, tmp, upstream, real_key)
            try:
                bench.check_once(front)
                script = bench.wrk_script(tmp, front)
                bench.wrk_run(front, upstream, script, args.connections, 3)  # warm up
                run, parts = profile(front, upstream, script, args.connections, args.seconds,
                                     tmp / f"{name}.data")
                rows.append((name, run, parts))
            finally:
                front.stop()
    finally:
        upstream.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"Envoy CPU per request by part, us (wrk {args.connections} connections, {args.seconds:g} s, "
          f"perf at {SAMPLE_HZ} Hz; shares of the samples times the measured CPU per request)")
    print(f"{'setup':<20} {'req/s':>7} {'CPU/req':>8}" + "".join(f" {p:>17}" for p in PARTS))
    for name, run, parts in rows:
        total = sum(parts.values()) or 1
        us = {p: run.cpu_us * parts[p] / total for p in PARTS}
        print(f"{name:<20} {run.rps:7.0f} {run.cpu_us:8.1f}"
              + "".join(f" {us[p]:17.1f}" for p in PARTS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
