"""A fleet for end-to-end tests: an etcd cluster, several Envoys running envoy/fleet.yaml (each
with its own node id, all following the same policy in etcd), the CLI writing the policy into
etcd, and the mock Mistral upstream."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import yaml

import harness
from deployment import CLI, WASM, error_code, request
from etcd_cluster import EtcdCluster


class Fleet:
    def __init__(self, workdir: Path, mock: "harness.MockMistral", keys: dict[str, str], *,
                 envoys: int = 2, etcd_members: int = 3, fleet_options: dict | None = None,
                 concurrency: int = 2):
        self.workdir = Path(workdir)
        self.mock = mock
        self.fleet_options = fleet_options or {}
        self.concurrency = concurrency
        self.etcd = EtcdCluster(self.workdir / "etcd", etcd_members).start()
        self.master_key = self.cli("keygen", env_extra={"SHIELDKEY_ETCD": ""}).strip()
        self.cli("init")
        for key_id, key in keys.items():
            self.cli("seal", "--id", key_id, stdin=key)
        self.tokens: dict[str, str] = {}
        self.envoys: list[harness.EnvoyProcess | None] = [None] * envoys
        self.ports = [(harness.free_port(), harness.free_port()) for _ in range(envoys)]

    # --- CLI, pointed at etcd -------------------------------------------------------------
    def env(self) -> dict:
        env = dict(os.environ)
        env.update(SHIELDKEY_MASTER_KEY=getattr(self, "master_key", ""),
                   SHIELDKEY_ETCD=",".join(self.etcd.client_urls))
        env.pop("SHIELDKEY_POLICY", None)
        return env

    def cli(self, *args: str, stdin: str | None = None, check: bool = True,
            env_extra: dict | None = None) -> str:
        env = self.env()
        for k, v in (env_extra or {}).items():
            if v:
                env[k] = v
            else:
                env.pop(k, None)
        proc = subprocess.run([str(CLI), *args], input=stdin, capture_output=True, text=True,
                              env=env, cwd=self.workdir)
        self.last = proc
        if check and proc.returncode != 0:
            raise AssertionError(f"shieldkey {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
        return proc.stdout

    def mint(self, token_id: str, *extra: str) -> str:
        token = self.cli("mint", "--id", token_id, "--upstream-key", "prod", *extra).strip()
        assert token.startswith(f"sk_shield_t_{token_id}_"), token
        self.tokens[token_id] = token
        return token

    # --- Envoys ---------------------------------------------------------------------------
    def bootstrap(self, i: int) -> Path:
        doc = yaml.safe_load((harness.PROJECT / "envoy" / "fleet.yaml").read_text())
        doc["node"]["id"] = f"envoy-{i}"
        for cluster in doc["static_resources"]["clusters"]:
            if cluster["name"] == "etcd":
                cluster["load_assignment"]["endpoints"][0]["lb_endpoints"] = [
                    {"endpoint": {"address": {"socket_address": {"address": h, "port_value": p}}}}
                    for h, p in self.etcd.endpoints]
        text = yaml.safe_dump(doc).replace("filename: shieldkey.wasm", f"filename: {WASM}")
        # The Envoys share a working directory: one audit log each.
        text = text.replace("path: shieldkey-audit.log", f"path: shieldkey-audit-{i}.log")
        if self.fleet_options:
            # Both the syncer's and the filter's configuration carry the fleet section.
            extra = "".join(f',"{k}":{v}' for k, v in self.fleet_options.items())
            text = text.replace('"fleet":{"cluster":"etcd"', '"fleet":{"cluster":"etcd"' + extra)
        path = self.workdir / f"fleet-{i}.yaml"
        path.write_text(text)
        return path

    def start(self, i: int | None = None, wait_ready: bool = True) -> None:
        for n in ([i] if i is not None else range(len(self.envoys))):
            admin, listen = self.ports[n]
            envoy = harness.EnvoyProcess(
                self.bootstrap(n), self.workdir, admin_port=admin,
                listener_ports={"shieldkey": listen},
                cluster_endpoints={"mistral": ("127.0.0.1", self.mock.port)},
                env={"SHIELDKEY_MASTER_KEY": self.master_key}, wait_ready=wait_ready,
                concurrency=self.concurrency)
            self.envoys[n] = envoy.start()

    def stop(self, i: int | None = None) -> None:
        for n in ([i] if i is not None else range(len(self.envoys))):
            envoy = self.envoys[n]
            if envoy:
                envoy.stop()
                self.envoys[n] = None

    def url(self, i: int) -> str:
        envoy = self.envoys[i]
        assert envoy is not None
        return envoy.url

    def close(self) -> None:
        self.stop()
        self.etcd.stop_all()

    def wait_served(self, token_id: str, envoys=None, timeout: float = 10.0) -> None:
        """Until the Envoys serve a policy that knows `token_id`, without using it: a wrong
        secret is `shield_token_invalid` for a known token, `shield_token_unknown` before, and
        503 `shield_policy_unavailable` from a worker that has not applied the policy yet. Each
        worker applies it on its own tick, and a new connection goes to either worker: so until
        20 probes in a row (new connections) say known."""
        token = self.tokens[token_id]
        wrong = token[:-4] + ("BBBB" if token.endswith("AAAA") else "AAAA")
        for i in (range(len(self.envoys)) if envoys is None else envoys):
            deadline = time.monotonic() + timeout
            in_a_row = 0
            while in_a_row < 20:
                code = error_code(request(self.url(i), token=wrong)[2])
                in_a_row = in_a_row + 1 if code == "shield_token_invalid" else 0
                if not in_a_row:
                    assert time.monotonic() < deadline, f"envoy {i} does not serve {token_id} ({code})"
                    time.sleep(0.02)
