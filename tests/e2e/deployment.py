"""A ShieldKey deployment for end-to-end tests: the CLI writes the policy and publishes the ECDS
file, a real Envoy runs a shipped bootstrap from envoy/ (ports substituted), and the mock Mistral
upstream plays api.mistral.ai."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import harness

PROJECT = harness.PROJECT
CLI = PROJECT / "target" / "release" / "shieldkey"
WASM = PROJECT / "target" / "wasm32-wasip1" / "release" / "shieldkey.wasm"


class Deployment:
    """Owns a work directory with the master key, the policy and the published filter config."""

    def __init__(self, workdir: Path, mock: "harness.MockMistral", keys: dict[str, str],
                 bootstrap: str = "demo.yaml", concurrency: int = 2,
                 policy_extra: dict | None = None):
        self.workdir = workdir
        self.mock = mock
        self.keys = keys
        self.bootstrap = PROJECT / "envoy" / bootstrap
        self.concurrency = concurrency
        (workdir / "filter").mkdir(parents=True, exist_ok=True)
        self.policy = workdir / "policy.json"
        self.ecds = workdir / "filter" / "shieldkey.json"
        self.master_key = self.cli("keygen").strip()
        self.env = {"SHIELDKEY_MASTER_KEY": self.master_key}
        self.cli("init")
        for key_id, key in keys.items():
            self.cli("seal", "--id", key_id, stdin=key)
        if policy_extra:
            self.edit_policy(lambda p: p.update(policy_extra))
        self.tokens: dict[str, str] = {}
        self.envoy: harness.EnvoyProcess | None = None

    # --- CLI -----------------------------------------------------------------------------
    def cli(self, *args: str, stdin: str | None = None, check: bool = True,
            env: dict | None = None) -> str:
        full_env = dict(os.environ)
        full_env.update(getattr(self, "env", {}))
        full_env.update(env or {})
        full_env["SHIELDKEY_POLICY"] = str(self.policy)
        proc = subprocess.run([str(CLI), *args], input=stdin, capture_output=True, text=True,
                              env=full_env, cwd=self.workdir)
        if check and proc.returncode != 0:
            raise AssertionError(f"shieldkey {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
        self.last_stderr = proc.stderr
        self.last_returncode = proc.returncode
        return proc.stdout

    def mint(self, token_id: str, upstream_key: str = "prod", *extra: str) -> str:
        token = self.cli("mint", "--id", token_id, "--upstream-key", upstream_key, *extra).strip()
        assert token.startswith(f"sk_shield_t_{token_id}_"), token
        self.tokens[token_id] = token
        return token

    def edit_policy(self, change) -> None:
        """Hand-edits the policy file (for fields the CLI has no flag for), like an operator would."""
        doc = json.loads(self.policy.read_text())
        change(doc)
        doc["revision"] = doc.get("revision", 0) + 1
        tmp = self.policy.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=2))
        tmp.replace(self.policy)

    def publish(self) -> None:
        self.cli("publish", "--to", str(self.ecds), "--wasm", str(WASM))

    # --- Envoy ---------------------------------------------------------------------------
    def start(self, publish: bool = True, **kw) -> "harness.EnvoyProcess":
        if publish:
            self.publish()
        self.envoy = harness.EnvoyProcess(
            self.bootstrap, self.workdir,
            admin_port=harness.free_port(),
            listener_ports={"shieldkey": harness.free_port()},
            cluster_endpoints={"mistral": ("127.0.0.1", self.mock.port)},
            concurrency=self.concurrency,
            env=self.env,
            **kw,
        )
        self.envoy.start()
        return self.envoy

    def stop(self) -> None:
        if self.envoy:
            self.envoy.stop()

    @property
    def url(self) -> str:
        assert self.envoy is not None
        return self.envoy.url

    def wait_for_config_version(self, version: int, timeout: float = 5.0) -> float:
        """Waits until Envoy applied ECDS version_info == revision; returns seconds waited."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            stats = self.envoy.admin_get("/stats?filter=extension_config_discovery.http_filter.shieldkey.version_text")
            if f'"{version}"' in stats:
                return time.monotonic() - start
            time.sleep(0.01)
        raise AssertionError(f"Envoy did not apply filter config version {version}: {stats}")

    def revision(self) -> int:
        return json.loads(self.policy.read_text())["revision"]

    def apply_policy(self, policy: dict, timeout: float = 20.0) -> float:
        """Publishes `policy` by rewriting the ECDS file directly, atomically, as `shieldkey publish`
        does but without the CLI (for soaks and benchmarks that reload hundreds of times); returns
        the seconds until Envoy reported the new revision applied."""
        ecds = json.loads(self.ecds.read_text())
        ecds["version_info"] = str(policy["revision"])
        set_published_policy(ecds, policy)
        tmp = self.ecds.with_suffix(".tmp")
        tmp.write_text(json.dumps(ecds))
        started = time.monotonic()
        # Wall clock too: Envoy's log lines are stamped with it (revocation_cost.py).
        self.moved_at = time.time()
        os.replace(tmp, self.ecds)
        self.wait_for_config_version(policy["revision"], timeout)
        return time.monotonic() - started


def policy_of_configuration(cfg: dict) -> dict:
    """The policy in a Wasm filter `configuration`: zlib-compressed JSON in a BytesValue (what
    `shieldkey publish` writes) or plain JSON in a StringValue (hand-written configurations)."""
    if cfg["@type"].endswith("BytesValue"):
        return json.loads(zlib.decompress(base64.b64decode(cfg["value"])))
    return json.loads(cfg["value"])


def published_policy(ecds: dict) -> dict:
    """The policy inside an ECDS file."""
    return policy_of_configuration(ecds["resources"][0]["typed_config"]["config"]["configuration"])


def set_published_policy(ecds: dict, policy: dict) -> None:
    """Puts `policy` into an ECDS file as `shieldkey publish` does (compressed)."""
    packed = zlib.compress(json.dumps(policy, separators=(",", ":")).encode())
    ecds["resources"][0]["typed_config"]["config"]["configuration"] = {
        "@type": "type.googleapis.com/google.protobuf.BytesValue",
        "value": base64.b64encode(packed).decode(),
    }


def token_stat(dep: Deployment, token: str, name: str) -> int:
    """A per-token stat of the filter (0 before it exists)."""
    return dep.envoy.stat(f"wasmcustom.shieldkey.token_id.{token}.{name}") or 0


def wait_token_stat(dep: Deployment, token: str, name: str, at_least: int, timeout: float = 5.0) -> int:
    """Waits until the stat reaches `at_least` (accounting happens when the stream is logged)."""
    deadline = time.monotonic() + timeout
    while True:
        value = token_stat(dep, token, name)
        if value >= at_least or time.monotonic() > deadline:
            return value
        time.sleep(0.02)


def request(url: str, path: str = "/v1/chat/completions", *, token: str | None = None,
            body: dict | bytes | None = None, headers: dict | None = None,
            method: str | None = None, timeout: float = 10.0) -> tuple[int, dict, bytes]:
    """A raw HTTP request; returns (status, lowercased headers, body)."""
    if body is None and method is None:
        body = {"model": "mistral-small-latest", "messages": [{"role": "user", "content": "hi"}]}
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, method=method or ("POST" if data is not None else "GET"))
    req.add_header("content-type", "application/json")
    if token is not None:
        req.add_header("authorization", f"Bearer {token}")
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def error_code(body: bytes) -> str:
    doc = json.loads(body)
    assert doc["object"] == "error" and doc["param"] is None, doc
    return doc["code"]
