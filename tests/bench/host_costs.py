"""`make host-costs`: what each kind of proxy-wasm host operation costs Envoy per request (not a
test: it prints numbers).

The minimal filter of `make bench` (bench/minimal-filter) is run as it is, and again with one
kind of extra work per request named in its plugin configuration, each in its own front Envoy
(`envoy/demo.yaml`, `--concurrency 1`, the same upstream and wrk load as `make bench`), in
alternating rounds. The difference in the front Envoy's CPU per request against the plain
minimal filter is that work's cost, inside Envoy and the VM both:

  host-calls     10 host calls that only return a number (`get_current_time`)
  filter-state   10 filter-state writes (`set_property`)
  reads          every request header, the request body, every response header and the
                 response body, each read into the VM in one call
  shared-data    3 shared-data reads, each followed by a compare-and-swap write (120 bytes)
  gauges         2 gauge updates
  property       the client's address (`source.address`)

    make host-costs                    (builds, installs wrk if missing)
    .venv/bin/python tests/bench/host_costs.py [--seconds S] [--rounds N] [--connections N]
                                               [--extras a,b]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))

import bench  # noqa: E402
import harness  # noqa: E402

# The extra work, and how many operations of it one request does.
EXTRAS = {"host-calls": 10, "filter-state": 10, "reads": 4, "shared-data": 3, "gauges": 2,
          "property": 1}
UNITS = {"host-calls": "call", "filter-state": "write", "reads": "read",
         "shared-data": "read + CAS write", "gauges": "update", "property": "read"}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=5)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--extras", default=",".join(EXTRAS))
    args = p.parse_args()
    extras = [e for e in args.extras.split(",") if e]
    unknown = set(extras) - set(EXTRAS)
    if unknown:
        p.error(f"unknown extras {sorted(unknown)}; known: {', '.join(EXTRAS)}")
    try:
        if shutil.which("wrk") is None:
            raise bench.BenchError("wrk is not on PATH: run `make host-costs`, which installs it")
        bench.build_minimal_filter()
        cpu = measure(extras, args)
    except bench.BenchError as e:
        print(f"host-costs: FAILED: {e}", file=sys.stderr)
        return 1
    base = statistics.median(cpu[""])
    print(f"\nEnvoy CPU per request, wrk {args.connections} connections, {args.rounds} alternating "
          f"rounds of {args.seconds:g} s; medians (min-max)")
    print(f"{'minimal filter +':<16} {'CPU us/req':>10} {'(min-max)':>13} {'added':>7}  per operation")
    for extra in ["", *extras]:
        values = cpu[extra]
        m = statistics.median(values)
        row = (f"{extra or '(nothing)':<16} {m:>10.1f} {bench.spread(values, '{:.1f}'):>13} "
               f"{m - base:>+7.1f}")
        if extra:
            row += f"  {(m - base) / EXTRAS[extra]:+.2f} us per {UNITS[extra]} ({EXTRAS[extra]} per request)"
        print(row)
    return 0


def measure(extras: list[str], args: argparse.Namespace) -> dict[str, list[float]]:
    tmp = Path(tempfile.mkdtemp(prefix="shieldkey-host-costs-"))
    real_key = harness.random_key()
    upstream = bench.Upstream(tmp / "upstream", real_key)
    fronts: dict[str, bench.Front] = {}
    try:
        for extra in ["", *extras]:
            print(f"host-costs: starting minimal{'+' + extra if extra else ''}", file=sys.stderr,
                  flush=True)
            front = bench.minimal_front(tmp / (extra or "none"), upstream, real_key, extra=extra)
            fronts[extra] = front
            bench.check_once(front)
        scripts = {e: bench.wrk_script(tmp, f) for e, f in fronts.items()}
        for e, f in fronts.items():  # warm up (V8 tiers up, caches fill)
            bench.wrk_run(f, upstream, scripts[e], 8, 2)
        cpu: dict[str, list[float]] = {e: [] for e in fronts}
        names = list(fronts)
        for rnd in range(args.rounds):
            for e in names[rnd % len(names):] + names[:rnd % len(names)]:
                run = bench.wrk_run(fronts[e], upstream, scripts[e], args.connections, args.seconds)
                cpu[e].append(run.cpu_us)
                print(f"host-costs: round {rnd + 1} {fronts[e].name:<22} {run.cpu_us:6.1f} CPU us/req",
                      file=sys.stderr, flush=True)
        return cpu
    finally:
        for f in fronts.values():
            f.stop()
        upstream.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
