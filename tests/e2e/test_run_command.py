"""Issue 2: the README's first command. `scripts/run.sh` (what `make run` runs) is started as a
user would, on free ports, and the curl command, the Python snippet and the revoke command it
prints are executed exactly as printed."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time

import pytest

import harness
from printed_script import PrintedScript

PROJECT = harness.PROJECT


class RunCommand(PrintedScript):
    def __init__(self, run_dir, mistral_api_key: str | None = None):
        self.ports = {"listen": harness.free_port(), "admin": harness.free_port(), "mock": harness.free_port()}
        env = {k: v for k, v in os.environ.items() if k != "MISTRAL_API_KEY"}
        if mistral_api_key:
            env["MISTRAL_API_KEY"] = mistral_api_key
        env.update(SHIELDKEY_RUN_DIR=str(run_dir), SHIELDKEY_LISTEN_PORT=str(self.ports["listen"]),
                   SHIELDKEY_ADMIN_PORT=str(self.ports["admin"]), SHIELDKEY_MOCK_PORT=str(self.ports["mock"]))
        super().__init__("scripts/run.sh", env)


@pytest.fixture
def running(tmp_path):
    run = RunCommand(tmp_path / "run")
    try:
        assert run.ready.wait(180), run.output
        assert run.proc.poll() is None, f"run.sh exited early:\n{run.output}"
        yield run
    finally:
        run.stop()
        print(run.output)


def sh(command: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", command], cwd=PROJECT, capture_output=True, text=True, timeout=60)


def test_the_first_command_runs_shieldkey_and_its_printed_snippets_work(running):
    token = re.search(r"Your demo token \(shown once\): (sk_shield_t_demo_\S+)", running.output).group(1)

    curl = running.block_after("curl:")
    assert token in curl and str(running.ports["listen"]) in curl
    result = sh(curl)
    reply = json.loads(result.stdout)
    assert reply["object"] == "chat.completion" and reply["choices"][0]["message"]["content"], reply

    snippet = running.block_after("Python SDK")
    result = subprocess.run([str(PROJECT / ".venv" / "bin" / "python"), "-c", snippet],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip(), "the SDK snippet printed no completion"

    # The mock saw the sealed demo upstream key, never the token.
    mock = f"http://127.0.0.1:{running.ports['mock']}"
    seen = json.loads(urllib_get(f"{mock}/__mock/requests"))
    assert seen and all(token not in json.dumps(r) for r in seen)

    revoke = running.block_after("Revoke it live")
    result = sh(revoke)
    assert result.returncode == 0, result.stderr
    # With --admin the CLI returns only once Envoy reports the revision applied.
    assert "Envoy applied it" in result.stderr, result.stderr
    deadline = time.monotonic() + 2
    while True:
        reply = json.loads(sh(curl).stdout)
        if reply.get("code") == "shield_token_revoked":
            break
        assert time.monotonic() < deadline, reply
        time.sleep(0.05)

    # Printed once as such and once in each snippet; nowhere else (e.g. not by the CLI's steps).
    assert running.output.count(token) == 3, running.output
    assert running.stop() is not None
    for port in running.ports.values():
        assert harness.port_is_free(port), f"port {port} still in use after Ctrl-C"


def urllib_get(url: str) -> str:
    import urllib.request
    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.read().decode()


def test_with_mistral_api_key_the_first_command_targets_api_mistral_ai(tmp_path):
    """No real key or network here: a made-up key is sealed and swapped in, and the request leaves
    for api.mistral.ai over TLS. Whatever answers (Mistral refusing the made-up key, or Envoy
    unable to reach it), it is not a ShieldKey denial, and the key is never stored in clear."""
    fake_key = harness.random_key()
    run = RunCommand(tmp_path / "run", mistral_api_key=fake_key)
    try:
        assert run.ready.wait(180), run.output
        assert "-> https://api.mistral.ai (real)" in run.output
        assert "mock" not in run.block_after("curl:")
        result = sh(run.block_after("curl:").replace("curl -s ", "curl -s --max-time 30 ", 1))
        assert "shield_" not in result.stdout, result.stdout
        admin = f"http://127.0.0.1:{run.ports['admin']}"
        # Stats reach Envoy on the filter's next timer tick (every 100 ms).
        deadline = time.monotonic() + 5
        while "wasmcustom.shieldkey.allowed: 1" not in (
                stats := urllib_get(f"{admin}/stats?filter=shieldkey.allowed")):
            assert time.monotonic() < deadline, stats
            time.sleep(0.05)
        assert not harness.port_is_free(run.ports["listen"])
        for path in (tmp_path / "run").rglob("*"):
            if path.is_file():
                assert fake_key.encode() not in path.read_bytes(), f"{path} holds the key in clear"
        assert fake_key not in run.output
    finally:
        run.stop()
        print(run.output)
