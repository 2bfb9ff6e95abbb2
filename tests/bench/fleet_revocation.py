"""Benchmark (not a test): fleet mode at 10,000 and 100,000 tokens: how long 2 Envoys take to load
the policy from etcd, and how long a revocation takes to reach each of them.

For each size, a 3-member etcd cluster (tests/e2e/etcd_cluster.py) holds a policy of N tokens: one
minted by the CLI (`shieldkey --etcd ... mint`), the rest filler records (the token JSON of
`add_filler_tokens`, what `shieldkey mint` would write) put straight into etcd under
`shieldkey/policy/tokens/<id>` by `kv/txn` calls of at most 100 puts. Then 2 Envoys
(envoy/fleet.yaml, --concurrency 2, default sync settings) start at the same time. Reports:
  initial load  - per Envoy, from starting its process to the first 200 for the minted token
  memory        - each Envoy's server.memory_allocated once both serve the token (read after a
                  stats flush: the gauge is updated every 5 s)
  idle CPU      - over those 6 s with no change in etcd: the CPU the 3 etcd members (together)
                  and each Envoy use to follow the policy (syncer reads every 200 ms)
  revoke        - `shieldkey --etcd ... revoke` of the minted token, from the start of the CLI call
                  to the first 401 on EACH Envoy (each polled every 5 ms by its own keep-alive
                  client, GET /v1/models); `both` is the later of the two per revocation
  unrevoke      - the same to the first 200 again; revoke and unrevoke alternate, each after a
                  random pause of 0-250 ms (the syncers read etcd every 200 ms)
  CLI           - the CLI call's own duration (process start to exit); `after CLI` is `both`
                  minus it (what the Envoys add once etcd has the change; 0 when an Envoy saw it
                  before the CLI process had exited)
Timings are printed, never asserted.

    .venv/bin/python tests/bench/fleet_revocation.py [--rounds 20] [sizes...]
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402
from fleet import Fleet  # noqa: E402
from policy_scale import add_filler_tokens  # noqa: E402

POLL_S = 0.005
TXN_OPS = 100
TOKENS_PREFIX = "shieldkey/policy/tokens/"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class Poller:
    """One keep-alive HTTP/1.1 client to one Envoy."""

    def __init__(self, port: int, token: str):
        self.port = port
        self.headers = {"authorization": f"Bearer {token}"}
        self.conn: http.client.HTTPConnection | None = None

    def status(self) -> int | None:
        """The status of GET /v1/models with the token; None when the connection fails."""
        for _ in range(2):
            try:
                if self.conn is None:
                    self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                self.conn.request("GET", "/v1/models", headers=self.headers)
                resp = self.conn.getresponse()
                resp.read()
                if resp.getheader("connection", "").lower() == "close":
                    self.close()
                return resp.status
            except (OSError, http.client.HTTPException):
                self.close()
        return None

    def wait_for(self, want: int, since: float, timeout: float) -> float | None:
        """Seconds from `since` to the first `want`, polling every 5 ms; None on timeout."""
        while True:
            if self.status() == want:
                return time.monotonic() - since
            if time.monotonic() - since > timeout:
                return None
            time.sleep(POLL_S)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


class MockProcess:
    """The bundled mock upstream in its own process, so that serving the pollers' 200s does not
    compete with them for this process's GIL."""

    def __init__(self, key: str):
        self.port = harness.free_port()
        self.proc = subprocess.Popen(
            [sys.executable, str(harness.PROJECT / "examples" / "mock_mistral" / "mock_mistral.py"),
             "--port", str(self.port), "--key", key],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while harness.port_is_free(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the mock upstream did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def write_fillers(fleet: Fleet, count: int) -> float:
    """Puts `count` filler token records into etcd, TXN_OPS per `kv/txn`; returns seconds."""
    policy = {"tokens": [{"id": "bench", "upstream_key": "prod"}]}
    add_filler_tokens(policy, count)
    records = policy["tokens"][1:]
    started = time.monotonic()
    for i in range(0, len(records), TXN_OPS):
        ops = [{"request_put": {"key": b64(f"{TOKENS_PREFIX}{t['id']}".encode()),
                                "value": b64(json.dumps(t, separators=(",", ":")).encode())}}
               for t in records[i:i + TXN_OPS]]
        res = fleet.etcd.call("kv/txn", {"success": ops}, timeout=30)
        if not res.get("succeeded", False):
            raise RuntimeError(f"kv/txn did not succeed: {res}")
    return time.monotonic() - started


def start_and_time(fleet: Fleet, pollers: list[Poller], timeout: float = 300) -> list[float | None]:
    """Starts every Envoy; per Envoy, seconds from its start to the first 200. Envoys are started
    from the main thread (an Envoy ends when the thread that started it does), one right after the
    other (each start returns as soon as its admin port answers), each polled by its own thread."""
    loaded: list[float | None] = [None] * len(pollers)

    def poll(i: int, started: float) -> None:
        loaded[i] = pollers[i].wait_for(200, started, timeout)

    threads = []
    for i in range(len(pollers)):
        started = time.monotonic()
        fleet.start(i, wait_ready=False)
        threads.append(threading.Thread(target=poll, args=(i, started)))
        threads[-1].start()
    for t in threads:
        t.join()
    return loaded


def flip(fleet: Fleet, pollers: list[Poller], command: str, want: int,
         timeout: float = 30) -> tuple[list[float | None], float]:
    """Runs `shieldkey <command> bench` while every Envoy is polled from the call's start; returns
    (seconds to the first `want` per Envoy, the CLI's own seconds)."""
    results: list[float | None] = [None] * len(pollers)
    started = time.monotonic()

    def one(i: int) -> None:
        results[i] = pollers[i].wait_for(want, started, timeout)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(pollers))]
    for t in threads:
        t.start()
    fleet.cli(command, "bench")
    cli_s = time.monotonic() - started
    for t in threads:
        t.join()
    return results, cli_s


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(values: list[float], p: float) -> float:
    xs = sorted(values)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def summary(values_s: list[float]) -> str:
    ms = [v * 1000 for v in values_s]
    if not ms:
        return "no samples"
    return (f"p50 {pct(ms, 50):6.0f}  p95 {pct(ms, 95):6.0f}  p99 {pct(ms, 99):6.0f}  "
            f"max {max(ms):6.0f} ms")


def run(size: int, rounds: int, mock: MockProcess, key: str, tmp: Path) -> None:
    fleet = Fleet(tmp / f"n{size}", mock, {"prod": key})
    pollers: list[Poller] = []
    try:
        fleet.mint("bench")
        fill_s = write_fillers(fleet, size - 1)
        pollers = [Poller(listen, fleet.tokens["bench"]) for _, listen in fleet.ports]
        loaded = start_and_time(fleet, pollers)
        etcd_pids = [m.proc.pid for m in fleet.etcd.members]
        envoy_pids = [e.proc.pid for e in fleet.envoys]
        before = [cpu_seconds(p) for p in etcd_pids + envoy_pids]
        idle_started = time.monotonic()
        time.sleep(6)
        idle_s = time.monotonic() - idle_started
        used = [cpu_seconds(p) - b for p, b in zip(etcd_pids + envoy_pids, before)]
        idle_cpu = {"etcd": sum(used[:len(etcd_pids)]) / idle_s,
                    **{f"envoy-{i}": u / idle_s for i, u in enumerate(used[len(etcd_pids):])}}
        memory = [envoy.stat("server.memory_allocated") if envoy else None for envoy in fleet.envoys]

        revoke: list[list[float]] = [[] for _ in pollers]
        unrevoke: list[list[float]] = [[] for _ in pollers]
        both: dict[str, list[float]] = {"revoke": [], "unrevoke": []}
        after_cli: dict[str, list[float]] = {"revoke": [], "unrevoke": []}
        cli: dict[str, list[float]] = {"revoke": [], "unrevoke": []}
        missed = 0
        if all(x is not None for x in loaded):
            for _ in range(rounds):
                for command, want, per_envoy in (("revoke", 401, revoke), ("unrevoke", 200, unrevoke)):
                    # Each Envoy's syncer reads etcd on its own 200 ms tick: a random pause keeps
                    # the calls from locking onto one phase of those ticks.
                    time.sleep(random.uniform(0, 0.25))
                    times, cli_s = flip(fleet, pollers, command, want)
                    cli[command].append(cli_s)
                    for i, t in enumerate(times):
                        if t is None:
                            missed += 1
                        else:
                            per_envoy[i].append(t)
                    if all(t is not None for t in times):
                        both[command].append(max(times))
                        after_cli[command].append(max(0.0, max(times) - cli_s))
    finally:
        for p in pollers:
            p.close()
        fleet.close()

    print(f"\n{size} tokens ({size - 1} fillers written in {fill_s:.1f} s, {TXN_OPS} puts per kv/txn); "
          f"3 etcd members, 2 Envoys --concurrency 2")
    for i, t in enumerate(loaded):
        mem = f"{memory[i] / 1024 / 1024:.1f} MiB" if memory[i] is not None else "?"
        shown = f"{t * 1000:.0f} ms" if t is not None else "never (timeout)"
        print(f"  envoy-{i}: initial load (process start to first 200) {shown}; "
              f"server.memory_allocated after load {mem}")
    print("  idle CPU, % of one core: " + ", ".join(f"{k} {v * 100:.1f}" for k, v in idle_cpu.items()))
    for command in ("revoke", "unrevoke"):
        per_envoy = revoke if command == "revoke" else unrevoke
        first = 401 if command == "revoke" else 200
        print(f"  {command:8} ({rounds}x, CLI call start to first {first}):")
        for i, values in enumerate(per_envoy):
            print(f"    {f'envoy-{i}':10} {summary(values)}")
        print(f"    {'both':10} {summary(both[command])}")
        print(f"    {'CLI':10} {summary(cli[command])}")
        print(f"    {'after CLI':10} {summary(after_cli[command])}")
    if missed:
        print(f"  {missed} flips not seen within 30 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=20, help="revocations per size (each undone)")
    parser.add_argument("sizes", type=int, nargs="*", default=[10_000, 100_000])
    args = parser.parse_args()
    key = harness.random_key()
    mock = MockProcess(key)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for size in args.sizes:
                run(size, args.rounds, mock, key, Path(tmp))
    finally:
        mock.stop()


if __name__ == "__main__":
    main()
