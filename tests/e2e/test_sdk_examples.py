"""The SDK examples (examples/python, examples/typescript): the official Mistral SDKs, unchanged
but for the base URL and the key, run as separate processes through ShieldKey."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

import harness
from deployment import Deployment

EXAMPLES = harness.PROJECT / "examples"


def python_command() -> list[str]:
    return [str(harness.PROJECT / ".venv" / "bin" / "python"), "sdk_client.py"]


def node_command() -> list[str]:
    node = shutil.which("node")
    assert node, "node is required (Node 20)"
    return [node, "sdk_client.mjs"]


# (directory, command, the SDK's spelling of usage fields)
SDKS = {
    "python": ("python", python_command, ("prompt_tokens", "completion_tokens")),
    "typescript": ("typescript", node_command, ("promptTokens", "completionTokens")),
}


@pytest.fixture(scope="module")
def dep(tmp_path_factory, mock_mistral, mock_keys):
    d = Deployment(tmp_path_factory.mktemp("sdk-examples"), mock_mistral, mock_keys)
    for lang in SDKS:
        d.mint(f"{lang}-app", "prod")
        d.mint(f"{lang}-gone", "prod")
        d.cli("revoke", f"{lang}-gone")
    d.start()
    yield d
    d.stop()


def run_example(lang: str, url: str, token: str) -> dict:
    directory, command, _ = SDKS[lang]
    proc = subprocess.run([*command(), url, token], cwd=EXAMPLES / directory, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("lang", SDKS)
def test_sdk_example_chat_stream_and_embeddings(lang, dep, mock_mistral, mock_keys):
    prompt, completion = SDKS[lang][2]
    out = run_example(lang, dep.url, dep.tokens[f"{lang}-app"])
    assert "error" not in out, out
    assert out["chat"]["content"] and out["chat"]["usage"][prompt] > 0
    assert out["stream"]["text"] and out["stream"]["usage"][completion] > 0
    assert out["embeddings"]["count"] == 2 and out["embeddings"]["usage"][completion] == 0
    auths = {r["headers"]["authorization"] for r in mock_mistral.requests()}
    assert auths == {f"Bearer {mock_keys['prod']}"}
    assert dep.envoy.stat(f"wasmcustom.shieldkey.token_id.{lang}-app.requests") == 3


@pytest.mark.parametrize("lang", SDKS)
def test_sdk_example_gets_a_clean_error_for_a_revoked_token(lang, dep, mock_mistral):
    out = run_example(lang, dep.url, dep.tokens[f"{lang}-gone"])
    assert out["error"]["status"] == 401, out
    assert "shield_token_revoked" in out["error"]["body"]
    assert mock_mistral.requests() == []
