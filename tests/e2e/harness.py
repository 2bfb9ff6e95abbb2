"""Test harness: free ports, a real Envoy process started from a shipped bootstrap, and the
bundled mock Mistral upstream running in-process."""

from __future__ import annotations

import itertools
import json
import os
import secrets
import signal
import socket
import string
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import yaml

# The filter sends its counters every 100 ms (glue::root's timer); a read after this long sees
# every request that finished before it.
STATS_FLUSH_S = 0.25

PROJECT = Path(__file__).resolve().parents[2]
ENVOY = PROJECT / ".venv" / "bin" / "envoy"

sys.path.insert(0, str(PROJECT / "examples" / "mock_mistral"))
import mock_mistral  # noqa: E402

# Every Envoy started by this process, so a failing test can print their logs.
STARTED: list["EnvoyProcess"] = []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_is_free(port: int) -> bool:
    """True when nothing listens on 127.0.0.1:port any more."""
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def random_key() -> str:
    """A key shaped like a real Mistral key: 32 characters of [A-Za-z0-9]."""
    alphabet = string.ascii_letters + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(32))


def rewrite_ports(doc: dict, admin_port: int, listener_ports: dict[str, int],
                  cluster_endpoints: dict[str, tuple[str, int]]) -> dict:
    doc["admin"]["address"]["socket_address"]["port_value"] = admin_port
    for listener in doc["static_resources"].get("listeners", []):
        if listener["name"] in listener_ports:
            listener["address"]["socket_address"]["port_value"] = listener_ports[listener["name"]]
    for cluster in doc["static_resources"].get("clusters", []):
        if cluster["name"] in cluster_endpoints:
            host, port = cluster_endpoints[cluster["name"]]
            for group in cluster["load_assignment"]["endpoints"]:
                for ep in group["lb_endpoints"]:
                    ep["endpoint"]["address"]["socket_address"].update(address=host, port_value=port)
    return doc


def validate(bootstrap: Path, workdir: Path, env: dict | None = None) -> tuple[bool, str]:
    """`envoy --mode validate` on a shipped config, run where its relative paths resolve (an
    inline Wasm filter is configured too, so it needs the master key in `env`)."""
    proc = subprocess.run([str(ENVOY), "--mode", "validate", "-c", str(bootstrap)],
                          cwd=workdir, capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})
    return proc.returncode == 0, proc.stdout + proc.stderr


class EnvoyProcess:
    _ids = itertools.count()
    # How the log (Envoy's stdout and stderr) is opened: "wb" starts it afresh on every start;
    # benchmarks use "ab" so they can truncate it between runs while Envoy keeps writing.
    log_mode = "wb"

    def __init__(self, bootstrap: Path, workdir: Path, *, admin_port: int,
                 listener_ports: dict[str, int], cluster_endpoints: dict[str, tuple[str, int]],
                 concurrency: int = 2, env: dict | None = None, log_level: str = "info",
                 wait_ready: bool = True):
        self.workdir = Path(workdir)
        self.admin_port = admin_port
        self.listener_ports = listener_ports
        self.concurrency = concurrency
        self.wait_ready = wait_ready
        self.env = dict(os.environ)
        for name, value in (env or {}).items():
            # None removes a variable (e.g. to start Envoy without the master key).
            if value is None:
                self.env.pop(name, None)
            else:
                self.env[name] = value
        self.log_level = log_level
        n = next(self._ids)
        doc = rewrite_ports(yaml.safe_load(Path(bootstrap).read_text()), admin_port,
                            listener_ports, cluster_endpoints)
        self.config = self.workdir / f"envoy-{n}.yaml"
        self.config.write_text(yaml.safe_dump(doc))
        self.log_path = self.workdir / f"envoy-{n}.log"
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{next(iter(self.listener_ports.values()))}"

    def start(self) -> "EnvoyProcess":
        log = open(self.log_path, self.log_mode)
        self.proc = subprocess.Popen(
            [str(ENVOY), "-c", str(self.config), "--concurrency", str(self.concurrency),
             "--log-level", self.log_level, "--use-dynamic-base-id", "--drain-time-s", "1",
             # Access log lines reach the log file within 100 ms (default: 10 s).
             "--file-flush-interval-msec", "100"],
            cwd=self.workdir, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        STARTED.append(self)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Envoy exited with {self.proc.returncode}:\n{self.log_text()}")
            try:
                ready = self.admin_get("/ready", timeout=1).strip()
                if ready == "LIVE" or not self.wait_ready:
                    return self
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"Envoy did not become ready:\n{self.log_text()}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def admin_get(self, path: str, timeout: float = 5) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}{path}", timeout=timeout) as r:
            return r.read().decode()

    def stats(self) -> dict[str, int]:
        """Counters and gauges from /stats as integers (histograms are left out)."""
        time.sleep(STATS_FLUSH_S)
        out = {}
        for line in self.admin_get("/stats").splitlines():
            name, _, value = line.partition(": ")
            if value.strip().lstrip("-").isdigit():
                out[name] = int(value)
        return out

    def stat(self, name: str) -> int | None:
        if name.startswith("wasmcustom."):
            # The filter adds its counters up in each worker and sends them every 100 ms: wait
            # for a tick, so what happened before this call is counted.
            time.sleep(STATS_FLUSH_S)
        text = self.admin_get(f"/stats?filter=^{name.replace('.', '[.]')}$")
        for line in text.splitlines():
            key, _, value = line.partition(": ")
            if key == name and value.strip().lstrip("-").isdigit():
                return int(value)
        return None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def audit_records(self, source: str = "file") -> list[dict]:
        """The JSON access-log records: from `shieldkey-audit.log` in Envoy's working directory
        (`file`), or the lines of Envoy's stdout that are JSON objects (`stdout`)."""
        if source == "file":
            path = self.workdir / "shieldkey-audit.log"
            text = path.read_text(errors="replace") if path.exists() else ""
        else:
            text = self.log_text()
        return [json.loads(l) for l in text.splitlines() if l.startswith("{")]

    def wait_audit(self, count: int, timeout: float = 5.0, source: str = "file") -> list[dict]:
        """Waits until at least `count` records were written (access logs are flushed
        asynchronously, every 100 ms with this harness's `--file-flush-interval-msec`)."""
        deadline = time.monotonic() + timeout
        while True:
            records = self.audit_records(source)
            if len(records) >= count or time.monotonic() > deadline:
                return records
            time.sleep(0.05)


class MockMistral:
    """The bundled mock upstream (examples/mock_mistral), served from a thread of this process."""

    def __init__(self, keys: list[str]):
        self.server = mock_mistral.serve(0, keys)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.state = self.server.RequestHandlerClass.state
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def requests(self) -> list[dict]:
        with self.state.lock:
            return list(self.state.requests)

    def reset(self) -> None:
        with self.state.lock:
            self.state.requests.clear()
            self.state.behaviour.clear()

    def behaviour(self, **kw) -> None:
        with self.state.lock:
            self.state.behaviour.update(kw)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
