"""Soak: memory stays flat across policy changes.

One Envoy (envoy/demo.yaml, ECDS, --concurrency 2) with a policy of N tokens serves mixed traffic
from client threads (allowed, streamed, denied, rate-limited, cut short by the client, upstream
500s) while the policy changes every `interval` seconds (a different token revoked or its limit
changed each time: what a day of `shieldkey revoke` does). It samples Envoy's heap in use
(`server.memory_allocated`, not RSS: allocator caching cannot flake it), its RSS and the size of
/stats, and checks that every complete response was charged exactly what the upstream reported,
that no 5xx came from the filter, and that nothing panicked. It prints the heap slope per reload
after warm-up.

    .venv/bin/python tests/soak/soak.py [--reloads 1000] [--interval 0.3] [--tokens 2000]

Loopback only; bounded in reloads, requests and time.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import harness  # noqa: E402
from deployment import Deployment  # noqa: E402
from policy_scale import add_filler_tokens  # noqa: E402

SMALL_IN, SMALL_OUT = 150, 600  # nano-USD per token, mistral-small-latest


@dataclass
class Result:
    reloads: int = 0
    requests: int = 0
    statuses: dict = field(default_factory=dict)
    filter_5xx: int = 0
    heap: list = field(default_factory=list)  # (reload index, bytes)
    rss: list = field(default_factory=list)
    stats_lines: list = field(default_factory=list)
    expected_spend: int = 0
    recorded_spend: int = 0
    panics: int = 0
    apply_ms: list = field(default_factory=list)

    def heap_growth_after_warmup(self, warmup: float = 0.25) -> tuple[int, float]:
        """(bytes grown, bytes per reload by least squares) over the samples after warm-up."""
        samples = self.heap[int(len(self.heap) * warmup):]
        if len(samples) < 2:
            return 0, 0.0
        xs = [x for x, _ in samples]
        ys = [y for _, y in samples]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        var = sum((x - mx) ** 2 for x in xs) or 1
        slope = sum((x - mx) * (y - my) for x, y in samples) / var
        return ys[-1] - ys[0], slope

    def report(self) -> str:
        grown, slope = self.heap_growth_after_warmup()
        mib = 1024 * 1024
        apply = sorted(self.apply_ms)
        return "\n".join([
            f"reloads: {self.reloads}, requests: {self.requests}, statuses: {dict(sorted(self.statuses.items()))}",
            f"heap (server.memory_allocated): {self.heap[0][1] / mib:.1f} -> {self.heap[-1][1] / mib:.1f} MiB; "
            f"after warm-up {grown / mib:+.2f} MiB, slope {slope / 1024:+.1f} KiB per reload",
            f"RSS: {self.rss[0] / mib:.1f} -> {self.rss[-1] / mib:.1f} MiB; "
            f"/stats lines: {self.stats_lines[0]} -> {self.stats_lines[-1]}",
            f"reload applied in: median {apply[len(apply) // 2] if apply else 0:.0f} ms, "
            f"max {apply[-1] if apply else 0:.0f} ms",
            f"spend: recorded {self.recorded_spend} nano-USD, expected from upstream usage "
            f"{self.expected_spend}; filter 5xx: {self.filter_5xx}; panics: {self.panics}",
        ])


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class Traffic:
    """Client threads sending a fixed mix until told to stop."""

    def __init__(self, dep: Deployment, threads: int = 3):
        self.dep = dep
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.statuses: dict[int, int] = {}
        self.filter_5xx = 0
        self.expected = 0  # nano-USD the "exact" token must have been charged
        self.requests = 0
        self.threads = [threading.Thread(target=self.run, args=(i,), daemon=True) for i in range(threads)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def join(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=30)

    def send(self, token: str, body: dict | None, headers: dict | None = None,
             abort: bool = False) -> tuple[int, bytes, dict]:
        host, port = self.dep.url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        try:
            conn.request("POST", "/v1/chat/completions", body=json.dumps(body or {}).encode(),
                         headers={"content-type": "application/json",
                                  "authorization": f"Bearer {token}", **(headers or {})})
            resp = conn.getresponse()
            if abort:
                resp.read(64)  # a little of the stream, then gone
                return resp.status, b"", dict(resp.getheaders())
            return resp.status, resp.read(), dict(resp.getheaders())
        finally:
            conn.close()

    def run(self, seed: int) -> None:
        rnd = random.Random(seed)
        tokens = self.dep.tokens
        chat = {"model": "mistral-small-latest", "max_tokens": 16,
                "messages": [{"role": "user", "content": "soak"}]}
        while not self.stop.is_set():
            kind = rnd.choice(["exact", "exact", "stream", "denied", "limited", "abort", "fail"])
            try:
                if kind == "exact":
                    status, raw, _ = self.send(tokens["exact"], chat)
                    if status == 200:
                        usage = json.loads(raw)["usage"]
                        with self.lock:
                            self.expected += (usage["prompt_tokens"] * SMALL_IN
                                              + usage["completion_tokens"] * SMALL_OUT)
                elif kind == "stream":
                    status, _, _ = self.send(tokens["stream"], {**chat, "stream": True})
                elif kind == "denied":
                    status, _, _ = self.send(tokens["exact"] + "x", chat)
                elif kind == "limited":
                    status, _, _ = self.send(tokens["limited"], chat)
                elif kind == "abort":
                    status, _, _ = self.send(tokens["stream"], {**chat, "stream": True,
                                                                "max_tokens": 200}, abort=True)
                else:
                    status, _, headers = self.send(tokens["stream"], chat, {"x-mock-status": "500"})
            except (OSError, http.client.HTTPException):
                status = -1
            with self.lock:
                self.requests += 1
                self.statuses[status] = self.statuses.get(status, 0) + 1


def run(reloads: int = 200, interval: float = 0.05, tokens: int = 2000,
        workdir: Path | None = None) -> Result:
    own_tmp = None
    if workdir is None:
        own_tmp = tempfile.TemporaryDirectory()
        workdir = Path(own_tmp.name)
    key = harness.random_key()
    mock = harness.MockMistral(keys=[key])
    mock.behaviour(stream_chunks=4)
    dep = Deployment(workdir, mock, {"prod": key}, concurrency=2)
    result = Result()
    try:
        dep.mint("exact", "prod", "--budget-usd", "1000", "--budget-window", "lifetime")
        dep.mint("stream", "prod", "--budget-usd", "1000", "--budget-window", "daily",
                 "--models", "mistral-small-*", "--max-tokens", "400")
        dep.mint("limited", "prod", "--rpm", "30")
        dep.edit_policy(lambda p: add_filler_tokens(p, tokens - len(p["tokens"]), "exact"))
        dep.start()
        policy = json.loads(dep.policy.read_text())
        traffic = Traffic(dep)
        traffic.start()
        envoy = dep.envoy
        fillers = [t for t in policy["tokens"] if t["id"].startswith("filler-")]
        for i in range(reloads):
            # Each reload changes a different token: revoke one, restore the one before.
            victim = fillers[i % len(fillers)]
            victim["status"] = "revoked"
            fillers[(i - 1) % len(fillers)]["status"] = "active"
            if i % 3 == 0:
                victim["rate_limit"] = {"requests_per_minute": 10 + i}
            policy["revision"] += 1
            result.apply_ms.append(dep.apply_policy(policy) * 1000)
            result.reloads += 1
            if i % 5 == 0 or i == reloads - 1:
                result.heap.append((i, envoy.stat("server.memory_allocated") or 0))
                result.rss.append(rss_bytes(envoy.pid))
                result.stats_lines.append(envoy.admin_get("/stats").count("\n"))
            time.sleep(interval)
        traffic.join()
        time.sleep(0.5)
        result.requests = traffic.requests
        result.statuses = traffic.statuses
        result.expected_spend = traffic.expected
        result.recorded_spend = envoy.stat("wasmcustom.shieldkey.token_id.exact.spend_nano_usd") or 0
        result.filter_5xx = sum(envoy.stat(f"wasmcustom.shieldkey.reason.{code}.denied") or 0
                                for code in ("shield_key_unavailable", "shield_policy_unavailable",
                                             "shield_ledger_busy"))
        log = envoy.log_text()
        result.panics = log.count("panicked") + log.count("wasm trap") + log.count("Function: proxy_on")
    finally:
        dep.stop()
        mock.stop()
        if own_tmp:
            own_tmp.cleanup()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reloads", type=int, default=1000)
    parser.add_argument("--interval", type=float, default=0.25, help="seconds between reloads")
    parser.add_argument("--tokens", type=int, default=2000)
    args = parser.parse_args()
    print(run(args.reloads, args.interval, args.tokens).report())


if __name__ == "__main__":
    main()
