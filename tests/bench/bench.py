"""`make bench`: what ShieldKey costs per request, against plain Envoy and a minimal proxy-wasm
filter, measured in one run with a real load generator (not a test: it prints numbers, and fails
only when a response was not a 200 that reached the upstream with the real key).

Setups, each a front Envoy from envoy/demo.yaml (`--concurrency 1`, ports substituted) in front
of the same fast upstream (a second Envoy answering from `direct_response` routes,
bench/upstream.yaml):
  plain               the ShieldKey filter removed from the chain; the client sends the real key
  minimal             a header-swap wasm filter (bench/minimal-filter) in ShieldKey's place,
                      delivered the same way (ECDS file, V8): reads `authorization`, sets it to the
                      real key. The floor any proxy-wasm filter pays. Its client sends a
                      shield-shaped token, so a 200 proves the swap happened.
  minimal-native      the same header swap as a native Envoy dynamic module (bench/minimal-module,
                      a Rust cdylib Envoy loads with dlopen) in ShieldKey's place: the floor of a
                      filter that runs in Envoy's process instead of a Wasm VM, for comparison
  shieldkey-norules   ShieldKey, a token without rules (token check, key swap, usage scan, stats)
  shieldkey-allrules  ShieldKey, a token with every rule on, none of them refusing: budget,
                      requests and tokens per minute (very high), source CIDR, model allow-list,
                      max_tokens ceiling (the body is read and judged, reservation and settlement
                      in shared data)
  shieldkey-100k      shieldkey-allrules in a policy of 100,000 tokens
  shieldkey-native    shieldkey-allrules' policy and token, run by bench/shieldkey-module:
                      ShieldKey's unchanged core (src/stream) as a native dynamic module, a
                      prototype for comparison, not the product (no ECDS reload, stats kept in
                      the module, shared data in process memory)
The ShieldKey setups have 10 tokens (the one used and 9 others with the same rules), the 100k
setup 100,000; ShieldKey is delivered as `shieldkey publish` writes it (tests/e2e/deployment.py).

Measured, rounds alternating the setups (round 1: every setup, round 2: every setup, ...; the
order rotates each round), medians and the spread (min-max) over the rounds:
  HTTP/1.1  wrk, 1 thread, 1, 8 and 32 keep-alive connections, `--seconds` each: req/s, p50 and
            p99 latency, Envoy CPU time per request (utime+stime of the front Envoy from
            /proc/<pid>/stat over the run, divided by the requests it completed), RSS at the end
  HTTP/2    h2load (h2c with prior knowledge), 8 connections x 4 streams: plain and allrules
  streaming SSE of 2,000 events (~483 kB), a keep-alive Python client alternating plain and
            allrules: time to the first event and to the end of the stream, every event
            checked; the upstream sends the stream in one burst, then paced (~27 kB every 50 ms,
            as a stream arrives over time)
  memory    RSS and heap at `--concurrency 2`: plain, allrules with 10 and with 100,000 tokens
            (the others with the same rules, then without rules)
Every run checks that every response was a 200 (wrk's and h2load's error counts, the front
Envoy's 2xx count) and that none reached the upstream without the real key (the upstream answers
401 to anything else, and its 4xx count must stay 0).

    make bench [BENCH_ARGS="--quick"]           (builds, then scripts/bench.sh)
    scripts/bench.sh [--quick] [--seconds S] [--rounds N] [--json PATH] ...  (installs wrk, h2load)
    .venv/bin/python tests/bench/bench.py ...   (expects them; --help for every option)
    .venv/bin/python tests/bench/bench.py --report PATH   (the report of a run saved with --json)
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import re
import resource
import secrets
import shutil
import statistics
import string
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402
from accounting_overhead import cpu_seconds, plain_envoy  # noqa: E402
from deployment import CLI, WASM, Deployment, request  # noqa: E402

PROJECT = harness.PROJECT
MINIMAL_CRATE = PROJECT / "bench" / "minimal-filter"
MINIMAL_WASM = MINIMAL_CRATE / "target" / "wasm32-wasip1" / "release" / "minimal_filter.wasm"
NATIVE_CRATE = PROJECT / "bench" / "minimal-module"
NATIVE_MODULE = NATIVE_CRATE / "target" / "release" / "libminimal_module.so"
SHIELDKEY_NATIVE_CRATE = PROJECT / "bench" / "shieldkey-module"
SHIELDKEY_NATIVE_MODULE = SHIELDKEY_NATIVE_CRATE / "target" / "release" / "libshieldkey_module.so"
UPSTREAM_TEMPLATE = PROJECT / "bench" / "upstream.yaml"
PATH = "/v1/chat/completions"

# The logs are truncated between runs (every request writes two audit lines).
harness.EnvoyProcess.log_mode = "ab"

SETUPS = ["plain", "minimal", "minimal-native", "shieldkey-norules", "shieldkey-allrules",
          "shieldkey-100k", "shieldkey-native"]
CONNECTIONS = [1, 8, 32]
H2_SETUPS = ["plain", "shieldkey-allrules"]
H2_CONNECTIONS, H2_STREAMS = 8, 4
STREAM_EVENTS = 2000
TOKENS_SMALL, TOKENS_LARGE = 10, 100_000

MODEL = "mistral-small-latest"
BODY = json.dumps({
    "model": MODEL,
    "max_tokens": 256,
    "temperature": 0.3,
    "messages": [
        {"role": "system", "content": "You are a concise assistant for an engineering team."},
        {"role": "user", "content": "Summarise in two sentences why a proxy should keep API keys "
                                    "away from clients, and what a revocable token adds."},
    ],
}, separators=(",", ":"))
STREAM_BODY = json.dumps({**json.loads(BODY), "stream": True}, separators=(",", ":"))

# Every rule on, none refusing the benchmark's requests.
ALL_RULES = {
    "budget": {"limit_usd": "1000000", "window": "monthly"},
    "rate_limit": {"requests_per_minute": 1_000_000_000, "tokens_per_minute": 1_000_000_000_000},
    "source_cidrs": ["127.0.0.0/8", "::1/128"],
    "models": {"allow": ["mistral-small-*", "codestral-*"], "max_tokens": 4096},
}

TARGETS_TEXT = {
    "allrules_rps": "every rule on >= 0.85x plain req/s at 8 and 32 connections",
    "allrules_cpu": "every rule on <= +10 us Envoy CPU/req over the minimal filter",
    "allrules_p50": "every rule on <= +40 us p50 over plain at 1 connection",
    "norules_rps": "token without rules >= 0.88x plain req/s at 8 and 32 connections",
    "tokens_cpu": "100,000 tokens: Envoy CPU/req within 5% of 10 tokens",
    "tokens_rss": "100,000 tokens: RSS growth <= 150 MiB over 10 tokens at 2 workers",
    "stream_ttfb": "streaming time to first event within 0.5 ms of plain",
}


class BenchError(Exception):
    """A run whose responses were not all 200s through to the upstream, or a broken tool."""


# --- tools -----------------------------------------------------------------------------------

def require_tools() -> None:
    missing = [tool for tool in ("wrk", "h2load") if shutil.which(tool) is None]
    if missing:
        raise BenchError(f"{' and '.join(missing)} not on PATH: run scripts/bench.sh (or `make "
                         "bench`), which installs Debian's wrk and nghttp2-client")
    for path, what in ((CLI, "the CLI"), (WASM, "the filter")):
        if not path.exists():
            raise BenchError(f"{path} ({what}) is missing: run scripts/build.sh first")


def build_minimal_filter() -> None:
    proc = subprocess.run(["cargo", "build", "--quiet", "--release", "--target", "wasm32-wasip1",
                           "--manifest-path", str(MINIMAL_CRATE / "Cargo.toml")],
                          capture_output=True, text=True)
    if proc.returncode != 0 or not MINIMAL_WASM.exists():
        raise BenchError(f"building bench/minimal-filter failed:\n{proc.stderr}")


def build_native_module(crate: Path, module: Path) -> None:
    # Its own target directory, so the module is where NATIVE_MODULE says whatever
    # CARGO_TARGET_DIR says.
    proc = subprocess.run(["cargo", "build", "--quiet", "--release",
                           "--manifest-path", str(crate / "Cargo.toml"),
                           "--target-dir", str(crate / "target")],
                          capture_output=True, text=True)
    if proc.returncode != 0 or not module.exists():
        raise BenchError(f"building bench/{crate.name} failed:\n{proc.stderr}")


# --- the upstream ----------------------------------------------------------------------------

def stream_events(events: int = STREAM_EVENTS) -> bytes:
    """A Mistral chat stream as the mock sends it: a role chunk, `events` content chunks (with
    the `p` padding field), usage on the chunk with finish_reason, then [DONE]."""
    base = {"id": secrets.token_hex(16), "object": "chat.completion.chunk",
            "created": 1790000000, "model": MODEL}
    words = ["one", " two", " three", " four", " five"]
    out = [b"data: " + json.dumps({**base, "choices": [
        {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}).encode()]
    for i in range(events):
        last = i == events - 1
        doc = {**base, "choices": [{"index": 0, "delta": {"content": words[i % 5]},
                                    "finish_reason": "stop" if last else None}],
               "p": "abcdefghijklmnopqrst"[: 1 + i % 20]}
        if last:
            doc["usage"] = {"prompt_tokens": 38, "total_tokens": 38 + events,
                            "completion_tokens": events,
                            "prompt_tokens_details": {"cached_tokens": 0},
                            "service_tier": "standard"}
        out.append(b"data: " + json.dumps(doc).encode())
    out.append(b"data: [DONE]")
    return b"\n\n".join(out) + b"\n\n"


class Upstream:
    """The fast upstream: bench/upstream.yaml with the real key, started."""

    def __init__(self, workdir: Path, real_key: str):
        workdir.mkdir(parents=True, exist_ok=True)
        self.stream_file = workdir / "stream.sse"
        self.stream_file.write_bytes(stream_events())
        self.port = harness.free_port()
        admin = harness.free_port()
        text = string.Template(UPSTREAM_TEMPLATE.read_text()).substitute(
            PORT=self.port, ADMIN_PORT=admin, REAL_KEY=real_key, STREAM_BODY=self.stream_file)
        bootstrap = workdir / "upstream.yaml"
        bootstrap.write_text(text)
        self.envoy = harness.EnvoyProcess(bootstrap, workdir, admin_port=admin,
                                          listener_ports={"upstream": self.port},
                                          cluster_endpoints={}, concurrency=1, env={})
        self.envoy.start()

    def counts(self) -> tuple[int, int]:
        s = self.envoy.stats()
        return s.get("http.upstream.downstream_rq_2xx", 0), s.get("http.upstream.downstream_rq_4xx", 0)

    def stop(self) -> None:
        self.envoy.stop()


# --- the front Envoys ------------------------------------------------------------------------

@dataclass
class Front:
    name: str
    envoy: "harness.EnvoyProcess"
    authorization: str
    workdir: Path
    tokens: int = 0

    @property
    def url(self) -> str:
        return self.envoy.url

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def stop(self) -> None:
        self.envoy.stop()

    def truncate_logs(self) -> None:
        """Drops the access log lines of a run (two per request); fails on Envoy errors."""
        log = self.envoy.log_path
        data = log.read_bytes() if log.exists() else b""
        bad = [line for line in data.splitlines()
               if not line.startswith(b"{") and (b"][critical][" in line or b"][error][" in line)]
        if bad:
            raise BenchError(f"{self.name}: Envoy logged errors:\n"
                             + b"\n".join(bad[:10]).decode(errors="replace"))
        os.truncate(log, 0)
        audit = self.workdir / "shieldkey-audit.log"
        if audit.exists():
            os.truncate(audit, 0)


def filler_tokens(policy: dict, count: int, template_id: str, with_rules: bool = True) -> None:
    """`count` more tokens shaped like `template_id` (same upstream key, and its rules unless
    not `with_rules`), with random digests: what `shieldkey mint` would write, without running
    the CLI that many times."""
    template = next(t for t in policy["tokens"] if t["id"] == template_id)
    rules = {k: v for k, v in template.items()
             if k not in ("id", "digest", "owner", "description", "status")}
    if not with_rules:
        rules = {"upstream_key": template["upstream_key"]}
    for i in range(count):
        policy["tokens"].append({
            **rules,
            "id": f"filler-{i}",
            "digest": base64.b64encode(secrets.token_bytes(32)).decode(),
            "owner": f"user-{i}@example.com",
        })


def shieldkey_deployment(workdir: Path, upstream: Upstream, real_key: str, tokens: int,
                         rules: dict | None, concurrency: int = 1,
                         filler_rules: bool = True) -> Deployment:
    """A policy of `tokens` tokens, the benchmark's `bench` with `rules`, published by the CLI
    into the ECDS file (not started)."""
    dep = Deployment(workdir, upstream, {"prod": real_key}, concurrency=concurrency)
    dep.mint("bench", "prod")

    def shape(policy: dict) -> None:
        if rules:
            next(t for t in policy["tokens"] if t["id"] == "bench").update(rules)
        filler_tokens(policy, tokens - 1, "bench", filler_rules)
    dep.edit_policy(shape)
    dep.publish()
    return dep


def shieldkey_front(name: str, workdir: Path, upstream: Upstream, real_key: str, tokens: int,
                    rules: dict | None, concurrency: int = 1, filler_rules: bool = True) -> Front:
    dep = shieldkey_deployment(workdir, upstream, real_key, tokens, rules, concurrency,
                               filler_rules)
    dep.start(publish=False)
    return Front(name, dep.envoy, f"Bearer {dep.tokens['bench']}", workdir, tokens)


def in_shieldkeys_place(workdir: Path, upstream: Upstream, filter_: dict, concurrency: int,
                        env: dict) -> "harness.EnvoyProcess":
    """envoy/demo.yaml with `filter_` in the `shieldkey` filter's place, started."""
    doc = yaml.safe_load((PROJECT / "envoy" / "demo.yaml").read_text())
    hcm = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    filters = hcm["http_filters"]
    hcm["http_filters"] = [filter_ if f["name"] == "shieldkey" else f for f in filters]
    if hcm["http_filters"] == filters:
        raise BenchError("envoy/demo.yaml has no filter named shieldkey to replace")
    workdir.mkdir(parents=True, exist_ok=True)
    bootstrap = workdir / f"{filter_['name']}.yaml"
    bootstrap.write_text(yaml.safe_dump(doc))
    envoy = harness.EnvoyProcess(bootstrap, workdir, admin_port=harness.free_port(),
                                 listener_ports={"shieldkey": harness.free_port()},
                                 cluster_endpoints={"mistral": ("127.0.0.1", upstream.port)},
                                 concurrency=concurrency, env=env)
    envoy.start()
    return envoy


def dynamic_module(name: str, module: Path, config: dict) -> dict:
    """An HTTP filter running `module` (a native Envoy dynamic module) with `config`."""
    return {
        "name": name,
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3."
                     "DynamicModuleFilter",
            "dynamic_module_config": {"module": {"local": {"filename": str(module)}}},
            "filter_name": name,
            "filter_config": config,
        },
    }


def shieldkey_native_front(workdir: Path, upstream: Upstream, real_key: str,
                           concurrency: int = 1) -> Front:
    """shieldkey-allrules' policy and token, run by bench/shieldkey-module (ShieldKey's core as
    a native dynamic module, a prototype) in the filter's place, given the plugin configuration
    `shieldkey publish` wrote for the wasm filter."""
    dep = shieldkey_deployment(workdir, upstream, real_key, TOKENS_SMALL, ALL_RULES, concurrency)
    ecds = json.loads(dep.ecds.read_text())
    configuration = ecds["resources"][0]["typed_config"]["config"]["configuration"]
    envoy = in_shieldkeys_place(workdir, upstream,
                                dynamic_module("shieldkey", SHIELDKEY_NATIVE_MODULE, configuration),
                                concurrency, dep.env)
    return Front("shieldkey-native", envoy, f"Bearer {dep.tokens['bench']}", workdir,
                 TOKENS_SMALL)


def minimal_front(workdir: Path, upstream: Upstream, real_key: str, concurrency: int = 1,
                  extra: str = "") -> Front:
    """envoy/demo.yaml with the minimal filter delivered by ECDS in ShieldKey's place; `extra`:
    the kind of extra work it does per request (`host_costs.py`), none by default."""
    (workdir / "filter").mkdir(parents=True, exist_ok=True)
    ecds = {
        "version_info": "1",
        "resources": [{
            "@type": "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig",
            "name": "shieldkey",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
                "config": {
                    "name": "minimal",
                    "root_id": "minimal",
                    "vm_config": {"vm_id": "minimal", "runtime": "envoy.wasm.runtime.v8",
                                  "code": {"local": {"filename": str(MINIMAL_WASM)}}},
                    "configuration": {"@type": "type.googleapis.com/google.protobuf.StringValue",
                                      "value": f"Bearer {real_key}" + (f"\n{extra}" if extra else "")},
                    "fail_open": False,
                },
            },
        }],
    }
    (workdir / "filter" / "shieldkey.json").write_text(json.dumps(ecds))
    envoy = harness.EnvoyProcess(PROJECT / "envoy" / "demo.yaml", workdir,
                                 admin_port=harness.free_port(),
                                 listener_ports={"shieldkey": harness.free_port()},
                                 cluster_endpoints={"mistral": ("127.0.0.1", upstream.port)},
                                 concurrency=concurrency, env={})
    envoy.start()
    # The client sends a shield-shaped token, not the real key: a 200 proves the filter swapped it.
    fake = "sk_shield_t_bench_" + "A" * 43
    return Front(f"minimal+{extra}" if extra else "minimal", envoy, f"Bearer {fake}", workdir)


def native_front(workdir: Path, upstream: Upstream, real_key: str, concurrency: int = 1) -> Front:
    """envoy/demo.yaml with the minimal native module (bench/minimal-module) in ShieldKey's place,
    configured inline (a dynamic module's configuration is read when Envoy starts)."""
    config = {"@type": "type.googleapis.com/google.protobuf.StringValue",
              "value": f"Bearer {real_key}"}
    envoy = in_shieldkeys_place(workdir, upstream,
                                dynamic_module("minimal-native", NATIVE_MODULE, config),
                                concurrency, {})
    # A shield-shaped token, as for the minimal filter: a 200 proves the module swapped it.
    fake = "sk_shield_t_bench_" + "A" * 43
    return Front("minimal-native", envoy, f"Bearer {fake}", workdir)


def plain_front(workdir: Path, upstream: Upstream, real_key: str, concurrency: int = 1) -> Front:
    envoy = plain_envoy(workdir, upstream, concurrency=concurrency)
    return Front("plain", envoy, f"Bearer {real_key}", workdir)


def start_front(name: str, tmp: Path, upstream: Upstream, real_key: str,
                concurrency: int = 1, filler_rules: bool = True) -> Front:
    work = tmp / f"{name}-c{concurrency}{'' if filler_rules else '-bare'}"
    if name == "plain":
        return plain_front(work, upstream, real_key, concurrency)
    if name == "minimal":
        return minimal_front(work, upstream, real_key, concurrency)
    if name == "minimal-native":
        return native_front(work, upstream, real_key, concurrency)
    if name == "shieldkey-native":
        return shieldkey_native_front(work, upstream, real_key, concurrency)
    if name == "shieldkey-norules":
        return shieldkey_front(name, work, upstream, real_key, TOKENS_SMALL, None, concurrency)
    if name == "shieldkey-allrules":
        return shieldkey_front(name, work, upstream, real_key, TOKENS_SMALL, ALL_RULES, concurrency)
    if name == "shieldkey-100k":
        return shieldkey_front(name, work, upstream, real_key, TOKENS_LARGE, ALL_RULES, concurrency,
                               filler_rules)
    raise ValueError(name)


def check_once(front: Front) -> None:
    status, _, body = request(front.url, PATH, body=BODY.encode(), timeout=30,
                                      headers={"authorization": front.authorization})
    if status != 200:
        raise BenchError(f"{front.name}: a first request answered {status}: {body[:300]!r}")


# --- measurements ----------------------------------------------------------------------------

def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def front_counts(front: Front) -> tuple[int, int]:
    s = front.envoy.stats()
    return s.get("http.shieldkey.downstream_rq_completed", 0), s.get("http.shieldkey.downstream_rq_2xx", 0)


WRK_DONE = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK {"requests":%d,"duration_us":%d,"status_errors":%d,"connect":%d,"read":%d,' ..
    '"write":%d,"timeout":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"mean_us":%.1f,"max_us":%d}\\n',
    summary.requests, summary.duration, e.status, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean,
    latency.max))
end
"""


def wrk_script(workdir: Path, front: Front) -> Path:
    path = workdir / f"wrk-{front.name}.lua"
    path.write_text(
        'wrk.method = "POST"\n'
        f"wrk.body = [[{BODY}]]\n"
        'wrk.headers["content-type"] = "application/json"\n'
        f'wrk.headers["authorization"] = "{front.authorization}"\n' + WRK_DONE)
    return path


@dataclass
class Run:
    rps: float
    p50_us: float
    p99_us: float
    cpu_us: float
    requests: int
    rss_kib: int
    # Cores busy during the run: the front Envoy, the upstream Envoy, the load generator.
    cores: tuple[float, float, float] = (0.0, 0.0, 0.0)


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def measured(front: Front, upstream: Upstream, command: list[str], timeout: float,
             parse) -> tuple[dict, float, tuple[float, float, float]]:
    """Runs a load generator against `front`; checks every response; returns its parsed
    output, Envoy CPU us per request, and the cores the front Envoy, the upstream and the load
    generator kept busy."""
    done0, ok0 = front_counts(front)
    up_ok0, up_bad0 = upstream.counts()
    cpu0, up0, gen0 = (cpu_seconds(front.envoy.pid), cpu_seconds(upstream.envoy.pid),
                       children_cpu())
    wall0 = time.monotonic()
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    wall = time.monotonic() - wall0
    cpu = cpu_seconds(front.envoy.pid) - cpu0
    cores = (cpu / wall, (cpu_seconds(upstream.envoy.pid) - up0) / wall,
             (children_cpu() - gen0) / wall)
    # Responses still in flight when the load generator stopped finish within milliseconds.
    time.sleep(0.2)
    done1, ok1 = front_counts(front)
    up_ok1, up_bad1 = upstream.counts()
    if proc.returncode != 0:
        raise BenchError(f"{front.name}: {command[0]} failed ({proc.returncode}):\n"
                         f"{proc.stdout}\n{proc.stderr}")
    out = parse(proc.stdout)
    done, ok = done1 - done0, ok1 - ok0
    if done == 0 or ok != done:
        raise BenchError(f"{front.name}: {done - ok} of {done} responses were not 2xx:\n"
                         f"{proc.stdout}")
    if up_bad1 - up_bad0:
        raise BenchError(f"{front.name}: {up_bad1 - up_bad0} requests reached the upstream "
                         "without the real key (401)")
    if up_ok1 - up_ok0 < done:
        raise BenchError(f"{front.name}: {done} answered by Envoy, only {up_ok1 - up_ok0} by the "
                         "upstream")
    front.truncate_logs()
    return out, cpu / done * 1e6, cores


def parse_wrk(stdout: str) -> dict:
    m = re.search(r"^WRK (\{.*\})$", stdout, re.M)
    if not m:
        raise BenchError(f"no summary in wrk's output:\n{stdout}")
    out = json.loads(m.group(1))
    errors = {k: out[k] for k in ("status_errors", "connect", "read", "write", "timeout") if out[k]}
    if errors or out["requests"] == 0:
        raise BenchError(f"wrk saw errors {errors} (status_errors: non-2xx/3xx responses):\n{stdout}")
    return out


def wrk_run(front: Front, upstream: Upstream, script: Path, connections: int,
            seconds: float) -> Run:
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--timeout", "5s",
           "-s", str(script), front.url + PATH]
    out, cpu_us, cores = measured(front, upstream, cmd, seconds + 60, parse_wrk)
    return Run(rps=out["requests"] / (out["duration_us"] / 1e6), p50_us=out["p50_us"],
               p99_us=out["p99_us"], cpu_us=cpu_us, requests=out["requests"],
               rss_kib=rss_kib(front.envoy.pid), cores=cores)


def _duration_us(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if not m:
        return float("nan")
    return float(m.group(1)) * {"us": 1, "ms": 1e3, "s": 1e6}[m.group(2)]


def parse_h2load(stdout: str) -> dict:
    rps = re.search(r"finished in [\d.]+s, ([\d.]+) req/s", stdout)
    reqs = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
                     r"(\d+) failed, (\d+) errored, (\d+) timeout", stdout)
    codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", stdout)
    lat = re.search(r"time for request:\s+(\S+)\s+(\S+)\s+(\S+)", stdout)
    if not (rps and reqs and codes and lat):
        raise BenchError(f"cannot read h2load's output:\n{stdout}")
    failed, errored, timeouts = (int(reqs.group(i)) for i in (5, 6, 7))
    bad = sum(int(codes.group(i)) for i in (2, 3, 4))
    if failed or errored or timeouts or bad or int(reqs.group(4)) == 0:
        raise BenchError(f"h2load: {failed} failed, {errored} errored, {timeouts} timeouts, "
                         f"{bad} non-2xx:\n{stdout}")
    return {"rps": float(rps.group(1)), "requests": int(reqs.group(4)),
            "mean_us": _duration_us(lat.group(3))}


def h2load_run(front: Front, upstream: Upstream, body_file: Path, seconds: float) -> Run:
    cmd = ["h2load", "-t1", f"-c{H2_CONNECTIONS}", f"-m{H2_STREAMS}", "-D", f"{int(seconds * 1000)}ms",
           "--warm-up-time", "500ms", "-d", str(body_file),
           "-H", "content-type: application/json", "-H", f"authorization: {front.authorization}",
           front.url + PATH]
    out, cpu_us, cores = measured(front, upstream, cmd, seconds + 60, parse_h2load)
    return Run(rps=out["rps"], p50_us=out["mean_us"], p99_us=float("nan"), cpu_us=cpu_us,
               requests=out["requests"], rss_kib=rss_kib(front.envoy.pid), cores=cores)


def stream_once(conn: http.client.HTTPConnection, front: Front, paced: bool) -> tuple[float, float]:
    """One streamed chat completion: (seconds to the first event, seconds to the end)."""
    headers = {"authorization": front.authorization, "content-type": "application/json",
               "x-bench-stream": "1", "x-bench-pace": "1" if paced else "0"}
    start = time.perf_counter()
    conn.request("POST", PATH, STREAM_BODY, headers)
    resp = conn.getresponse()
    first = resp.readline()
    t_first = time.perf_counter() - start
    rest = resp.read()
    t_end = time.perf_counter() - start
    body = first + rest
    if resp.status != 200 or not first.startswith(b"data: {"):
        raise BenchError(f"{front.name}: stream answered {resp.status}: {body[:300]!r}")
    events = body.count(b"data: ")
    if (events < STREAM_EVENTS + 2 or not body.endswith(b"data: [DONE]\n\n")
            or b'"completion_tokens": %d' % STREAM_EVENTS not in body):
        raise BenchError(f"{front.name}: incomplete stream ({events} events, {len(body)} bytes)")
    return t_first, t_end


def streaming(fronts: list[Front], upstream: Upstream, requests: int,
              paced: bool) -> dict[str, dict]:
    """Streams alternating between the setups, on one keep-alive connection each; the whole
    stream in one burst from the upstream, or `paced` (about 27 kB every 50 ms)."""
    conns = {f.name: http.client.HTTPConnection("127.0.0.1", f.port, timeout=60) for f in fronts}
    times: dict[str, list[tuple[float, float]]] = {f.name: [] for f in fronts}
    up_bad0 = upstream.counts()[1]
    try:
        for f in fronts:  # warm up
            for _ in range(2 if paced else 10):
                stream_once(conns[f.name], f, paced)
        for i in range(requests):
            order = fronts if i % 2 == 0 else fronts[::-1]
            for f in order:
                times[f.name].append(stream_once(conns[f.name], f, paced))
    finally:
        for c in conns.values():
            c.close()
    if upstream.counts()[1] != up_bad0:
        raise BenchError("a streamed request reached the upstream without the real key")
    for f in fronts:
        f.truncate_logs()
    out = {}
    for name, samples in times.items():
        firsts = sorted(t for t, _ in samples)
        ends = sorted(t for _, t in samples)
        out[name] = {"ttfb_ms": statistics.median(firsts) * 1e3,
                     "ttfb_p90_ms": firsts[max(0, int(len(firsts) * 0.9) - 1)] * 1e3,
                     "total_ms": statistics.median(ends) * 1e3, "requests": len(samples)}
    return out


MEMORY_ROWS = [
    # (label, setup, other tokens with the measured token's rules)
    ("plain", "plain", True),
    ("10 tokens", "shieldkey-allrules", True),
    ("100,000 tokens", "shieldkey-100k", True),
    ("100,000 bare tokens", "shieldkey-100k", False),
]


def memory_at_two_workers(tmp: Path, upstream: Upstream, real_key: str, seconds: float) -> dict:
    """RSS and heap of plain Envoy and allrules with 10 and 100,000 tokens at --concurrency 2,
    each after a short load; also 100,000 tokens whose others have no rules (bare records, as
    policy_scale.py writes them)."""
    out = {}
    for label, name, filler_rules in MEMORY_ROWS:
        started = time.monotonic()
        front = start_front(name, tmp, upstream, real_key, concurrency=2,
                            filler_rules=filler_rules)
        try:
            check_once(front)
            load_s = time.monotonic() - started
            wrk_run(front, upstream, wrk_script(tmp, front), 8, seconds)
            time.sleep(0.5)
            out[label] = {"rss_mib": rss_kib(front.envoy.pid) / 1024,
                          "heap_mib": (front.envoy.stat("server.memory_allocated") or 0) / 2**20,
                          "start_s": load_s}
        finally:
            front.stop()
            shutil.rmtree(front.workdir, ignore_errors=True)
    return out


# --- the report ------------------------------------------------------------------------------

def med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def spread(values: list[float], fmt: str = "{:.0f}") -> str:
    if len(values) < 2:
        return ""
    return f"({fmt.format(min(values))}-{fmt.format(max(values))})"


@dataclass
class Results:
    seconds: float
    rounds: int
    http1: dict[str, dict[int, list[Run]]] = field(default_factory=dict)
    http2: dict[str, list[Run]] = field(default_factory=dict)
    stream: dict[str, dict[str, dict]] = field(default_factory=dict)
    memory: dict[str, dict] = field(default_factory=dict)
    start_s: dict[str, float] = field(default_factory=dict)

    def m(self, setup: str, conns: int, attr: str) -> float:
        return med([getattr(r, attr) for r in self.http1.get(setup, {}).get(conns, [])])

    def values(self, setup: str, conns: int, attr: str) -> list[float]:
        return [getattr(r, attr) for r in self.http1.get(setup, {}).get(conns, [])]

    def report(self) -> str:
        lines = []
        setups = [s for s in SETUPS if s in self.http1]
        lines.append(f"HTTP/1.1, wrk 1 thread, {self.seconds:g} s per run, {self.rounds} "
                     f"alternating rounds; medians (min-max); Envoy --concurrency 1")
        lines.append(f"{'setup':<19} {'req/s @8':>8} {'(min-max)':>13} {'x plain':>7}   "
                     f"{'req/s @32':>9} {'(min-max)':>13} {'x plain':>7}")
        for s in setups:
            row = f"{s:<19}"
            for c, w in ((8, 8), (32, 9)):
                v = self.values(s, c, "rps")
                base = self.m("plain", c, "rps")
                row += f" {med(v):>{w}.0f} {spread(v):>13} {med(v) / base:>7.2f}  "
            lines.append(row.rstrip())
        lines.append("")
        lines.append(f"{'setup':<19} {'p50 @1':>6} {'+plain':>6} {'p50 @8':>6} {'p99 @8':>6} "
                     f"{'p50 @32':>7} {'p99 @32':>7} {'CPU/req @8':>10} {'(min-max)':>13} "
                     f"{'@32':>5} {'(min-max)':>13} {'+plain':>6} {'+minimal':>8} {'RSS MiB':>7}")
        for s in setups:
            p1 = self.m(s, 1, "p50_us")
            cpu8, cpu32 = self.values(s, 8, "cpu_us"), self.values(s, 32, "cpu_us")
            rss = med([r.rss_kib / 1024 for c in CONNECTIONS for r in self.http1[s].get(c, [])])
            lines.append(
                f"{s:<19} {p1:>6.0f} {p1 - self.m('plain', 1, 'p50_us'):>+6.0f} "
                f"{self.m(s, 8, 'p50_us'):>6.0f} {self.m(s, 8, 'p99_us'):>6.0f} "
                f"{self.m(s, 32, 'p50_us'):>7.0f} {self.m(s, 32, 'p99_us'):>7.0f} "
                f"{med(cpu8):>10.1f} {spread(cpu8, '{:.1f}'):>13} "
                f"{med(cpu32):>5.1f} {spread(cpu32, '{:.1f}'):>13} "
                f"{med(cpu32) - self.m('plain', 32, 'cpu_us'):>+6.1f} "
                f"{med(cpu32) - self.m('minimal', 32, 'cpu_us'):>+8.1f} {rss:>7.1f}")
        lines.append("(latencies in us; CPU: Envoy CPU us per request; +plain, +minimal: CPU at 32 "
                     "connections over that setup's)")
        lines.append(f"Cores busy during the runs at 32 connections (median; {os.cpu_count()} on "
                     "this machine): front Envoy / upstream Envoy / wrk")
        for s in setups:
            runs = self.http1[s].get(32, [])
            lines.append(f"  {s:<19} " + " / ".join(
                f"{med([r.cores[i] for r in runs]):.2f}" for i in range(3)))
        if self.start_s:
            lines.append("Envoy start to the first 200, s: " + ", ".join(
                f"{s} {t:.1f}" for s, t in self.start_s.items()))
        if self.http2:
            lines.append("")
            lines.append(f"HTTP/2 (h2c), h2load {H2_CONNECTIONS} connections x {H2_STREAMS} "
                         f"streams, {self.seconds:g} s per run")
            lines.append(f"{'setup':<19} {'req/s':>20} {'x plain':>7} {'mean latency us':>16} "
                         f"{'CPU us/req':>11} {'+plain':>7}")
            base_rps = med([r.rps for r in self.http2.get("plain", [])])
            base_cpu = med([r.cpu_us for r in self.http2.get("plain", [])])
            for s, runs in self.http2.items():
                v = [r.rps for r in runs]
                cpu = med([r.cpu_us for r in runs])
                lines.append(f"{s:<19} {med(v):>7.0f} {spread(v):>12} {med(v) / base_rps:>7.2f} "
                             f"{med([r.p50_us for r in runs]):>16.0f} {cpu:>11.1f} "
                             f"{cpu - base_cpu:>+7.1f}")
        for mode, rows in self.stream.items():
            lines.append("")
            n = next(iter(rows.values()))["requests"]
            how = ("the upstream sends it in one burst" if mode == "burst" else
                   "paced by the upstream, ~27 kB every 50 ms")
            lines.append(f"Streaming, {mode}: {STREAM_EVENTS} SSE events (~"
                         f"{len(stream_events()) / 1e3:.0f} kB) per response, {how}; "
                         f"{n} requests per setup, alternating, keep-alive")
            lines.append(f"{'setup':<19} {'first event ms':>15} {'p90':>7} {'+plain ms':>10} "
                         f"{'whole stream ms':>16} {'+plain ms':>10}")
            base = rows.get("plain", {})
            for s, r in rows.items():
                lines.append(f"{s:<19} {r['ttfb_ms']:>15.3f} {r['ttfb_p90_ms']:>7.3f} "
                             f"{r['ttfb_ms'] - base.get('ttfb_ms', 0):>+10.3f} "
                             f"{r['total_ms']:>16.3f} {r['total_ms'] - base.get('total_ms', 0):>+10.3f}")
        if self.memory:
            lines.append("")
            lines.append("Memory at --concurrency 2, every rule on, after a short load")
            lines.append(f"{'policy':<19} {'RSS MiB':>8} {'heap MiB':>9} {'start->200 s':>13}")
            for label, r in self.memory.items():
                lines.append(f"{label:<19} {r['rss_mib']:>8.1f} {r['heap_mib']:>9.1f} "
                             f"{r['start_s']:>13.2f}")
        lines.append("")
        lines.extend(self.targets())
        return "\n".join(lines)

    def targets(self) -> list[str]:
        out = ["Targets:"]

        def line(key: str, ok: bool | None, detail: str) -> None:
            mark = "n/a   " if ok is None else ("met   " if ok else "MISSED")
            out.append(f"  {mark} {TARGETS_TEXT[key]}: {detail}")

        def ratio(setup: str, c: int) -> float:
            return self.m(setup, c, "rps") / self.m("plain", c, "rps")

        have = set(self.http1)
        if {"plain", "shieldkey-allrules"} <= have:
            r8, r32 = ratio("shieldkey-allrules", 8), ratio("shieldkey-allrules", 32)
            line("allrules_rps", min(r8, r32) >= 0.85, f"{r8:.2f}x @8, {r32:.2f}x @32")
            d = self.m("shieldkey-allrules", 1, "p50_us") - self.m("plain", 1, "p50_us")
            line("allrules_p50", d <= 40, f"{d:+.0f} us")
        if {"minimal", "shieldkey-allrules"} <= have:
            d8 = self.m("shieldkey-allrules", 8, "cpu_us") - self.m("minimal", 8, "cpu_us")
            d32 = self.m("shieldkey-allrules", 32, "cpu_us") - self.m("minimal", 32, "cpu_us")
            line("allrules_cpu", max(d8, d32) <= 10, f"{d8:+.1f} us @8, {d32:+.1f} us @32")
        if {"plain", "shieldkey-norules"} <= have:
            r8, r32 = ratio("shieldkey-norules", 8), ratio("shieldkey-norules", 32)
            line("norules_rps", min(r8, r32) >= 0.88, f"{r8:.2f}x @8, {r32:.2f}x @32")
        if {"shieldkey-allrules", "shieldkey-100k"} <= have:
            q8 = self.m("shieldkey-100k", 8, "cpu_us") / self.m("shieldkey-allrules", 8, "cpu_us")
            q32 = self.m("shieldkey-100k", 32, "cpu_us") / self.m("shieldkey-allrules", 32, "cpu_us")
            line("tokens_cpu", max(abs(q8 - 1), abs(q32 - 1)) <= 0.05,
                 f"{(q8 - 1) * 100:+.1f}% @8, {(q32 - 1) * 100:+.1f}% @32")
        if {"10 tokens", "100,000 tokens"} <= set(self.memory):
            base = self.memory["10 tokens"]["rss_mib"]
            g = self.memory["100,000 tokens"]["rss_mib"] - base
            detail = f"{g:+.1f} MiB"
            if "100,000 bare tokens" in self.memory:
                detail += (f" (others without rules: "
                           f"{self.memory['100,000 bare tokens']['rss_mib'] - base:+.1f} MiB)")
            line("tokens_rss", g <= 150, detail)
        for mode, rows in self.stream.items():
            if {"plain", "shieldkey-allrules"} <= set(rows):
                d = rows["shieldkey-allrules"]["ttfb_ms"] - rows["plain"]["ttfb_ms"]
                line("stream_ttfb", d <= 0.5, f"{d:+.3f} ms ({mode})")
        if {"plain", "minimal", "shieldkey-native"} <= have:
            # Not the product: what the same core does as a native module, against the same bars.
            r8, r32 = ratio("shieldkey-native", 8), ratio("shieldkey-native", 32)
            d1 = self.m("shieldkey-native", 1, "p50_us") - self.m("plain", 1, "p50_us")
            d32 = self.m("shieldkey-native", 32, "cpu_us") - self.m("minimal", 32, "cpu_us")
            out.append(f"  (shieldkey-native, the prototype, on the every-rule bars: "
                       f"{r8:.2f}x @8, {r32:.2f}x @32; {d1:+.0f} us p50 at 1 connection; "
                       f"{d32:+.1f} us CPU/req over the minimal filter @32)")
        return out

    @classmethod
    def from_json(cls, doc: dict) -> "Results":
        def runs(items: list[dict]) -> list[Run]:
            return [Run(**{**r, "cores": tuple(r.get("cores", (0.0, 0.0, 0.0)))}) for r in items]
        return cls(seconds=doc["seconds"], rounds=doc["rounds"],
                   http1={s: {int(c): runs(v) for c, v in per.items()}
                          for s, per in doc["http1"].items()},
                   http2={s: runs(v) for s, v in doc["http2"].items()},
                   stream=doc["stream"], memory=doc["memory"], start_s=doc["start_s"])

    def to_json(self) -> dict:
        return {
            "seconds": self.seconds, "rounds": self.rounds,
            "http1": {s: {str(c): [r.__dict__ for r in runs] for c, runs in per.items()}
                      for s, per in self.http1.items()},
            "http2": {s: [r.__dict__ for r in runs] for s, runs in self.http2.items()},
            "stream": self.stream, "memory": self.memory, "start_s": self.start_s,
            "targets": self.targets()[1:],
        }


# --- the run ---------------------------------------------------------------------------------

def run(args: argparse.Namespace, tmp: Path) -> Results:
    res = Results(seconds=args.seconds, rounds=args.rounds)
    real_key = harness.random_key()
    upstream = Upstream(tmp / "upstream", real_key)
    fronts: dict[str, Front] = {}
    try:
        for name in args.setups:
            started = time.monotonic()
            print(f"bench: starting {name}", file=sys.stderr, flush=True)
            fronts[name] = start_front(name, tmp, upstream, real_key)
            check_once(fronts[name])
            res.start_s[name] = time.monotonic() - started
        scripts = {name: wrk_script(tmp, f) for name, f in fronts.items()}
        body_file = tmp / "body.json"
        body_file.write_text(BODY)
        for name, f in fronts.items():  # warm up (V8 tiers up, caches fill)
            wrk_run(f, upstream, scripts[name], 8, args.warmup)
        names = list(fronts)
        for rnd in range(args.rounds):
            order = names[rnd % len(names):] + names[:rnd % len(names)]
            for conns in args.connections:
                for name in order:
                    r = wrk_run(fronts[name], upstream, scripts[name], conns, args.seconds)
                    res.http1.setdefault(name, {}).setdefault(conns, []).append(r)
                    print(f"bench: round {rnd + 1} http/1.1 @{conns:<2} {name:<19} "
                          f"{r.rps:8.0f} req/s  p50 {r.p50_us:6.0f} us  p99 {r.p99_us:6.0f} us  "
                          f"{r.cpu_us:6.1f} CPU us/req", file=sys.stderr, flush=True)
            if not args.no_h2:
                for name in [n for n in order if n in H2_SETUPS]:
                    r = h2load_run(fronts[name], upstream, body_file, args.seconds)
                    res.http2.setdefault(name, []).append(r)
                    print(f"bench: round {rnd + 1} http/2 {name:<19} {r.rps:8.0f} req/s  "
                          f"{r.cpu_us:6.1f} CPU us/req", file=sys.stderr, flush=True)
        stream_fronts = [fronts[n] for n in H2_SETUPS if n in fronts]
        if not args.no_stream and stream_fronts:
            print("bench: streaming", file=sys.stderr, flush=True)
            res.stream["burst"] = streaming(stream_fronts, upstream, args.stream_requests, False)
            res.stream["paced"] = streaming(stream_fronts, upstream, args.paced_requests, True)
    finally:
        for f in fronts.values():
            f.stop()
            shutil.rmtree(f.workdir, ignore_errors=True)
    try:
        if not args.no_memory:
            print("bench: memory at 2 workers", file=sys.stderr, flush=True)
            res.memory = memory_at_two_workers(tmp, upstream, real_key, min(args.seconds, 3))
    finally:
        upstream.stop()
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke test: 1 round of 3 s")
    p.add_argument("--seconds", type=float, help="per wrk/h2load run (default 10; --quick 3)")
    p.add_argument("--rounds", type=int, help="alternating rounds (default 3; --quick 1)")
    p.add_argument("--setups", default=",".join(SETUPS), help="comma-separated subset")
    p.add_argument("--stream-requests", type=int,
                   help="streams in one burst, per setup (default 300; --quick 30)")
    p.add_argument("--paced-requests", type=int,
                   help="paced streams (~0.9 s each), per setup (default 20; --quick 4)")
    p.add_argument("--no-h2", action="store_true")
    p.add_argument("--no-stream", action="store_true")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--report", type=Path, metavar="JSON",
                   help="print the report of a run saved with --json, and nothing else")
    args = p.parse_args()
    if args.report:
        print(Results.from_json(json.loads(args.report.read_text())).report())
        return 0
    args.seconds = args.seconds or (3.0 if args.quick else 10.0)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.stream_requests = args.stream_requests or (30 if args.quick else 300)
    args.paced_requests = args.paced_requests or (4 if args.quick else 20)
    args.warmup = 1.0 if args.quick else 3.0
    args.connections = CONNECTIONS
    args.setups = [s for s in args.setups.split(",") if s]
    unknown = set(args.setups) - set(SETUPS)
    if unknown:
        p.error(f"unknown setups {sorted(unknown)}; known: {', '.join(SETUPS)}")
    try:
        require_tools()
        build_minimal_filter()
        if "minimal-native" in args.setups:
            build_native_module(NATIVE_CRATE, NATIVE_MODULE)
        if "shieldkey-native" in args.setups:
            build_native_module(SHIELDKEY_NATIVE_CRATE, SHIELDKEY_NATIVE_MODULE)
        tmp = Path(tempfile.mkdtemp(prefix="shieldkey-bench-"))
        try:
            res = run(args, tmp)
        finally:
            if args.keep:
                print(f"bench: work directory kept: {tmp}", file=sys.stderr)
            else:
                shutil.rmtree(tmp, ignore_errors=True)
    except BenchError as e:
        print(f"bench: FAILED: {e}", file=sys.stderr)
        return 1
    print(f"\n{os.cpu_count()} CPUs, Envoy {envoy_version()}, wrk 1 thread, "
          f"{time.strftime('%Y-%m-%d %H:%M')}")
    print(res.report())
    if args.json:
        args.json.write_text(json.dumps(res.to_json(), indent=2))
    return 0


def envoy_version() -> str:
    out = subprocess.run([str(harness.ENVOY), "--version"], capture_output=True, text=True).stdout
    m = re.search(r"/(\d+\.\d+\.\d+)/", out)
    return m.group(1) if m else "?"


if __name__ == "__main__":
    sys.exit(main())
