"""The official TypeScript/JavaScript SDK (@mistralai/mistralai, tests/node) through ShieldKey."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

import harness
from deployment import Deployment

NODE_DIR = harness.PROJECT / "tests" / "node"


@pytest.fixture(scope="module")
def dep(tmp_path_factory, mock_mistral, mock_keys):
    d = Deployment(tmp_path_factory.mktemp("node"), mock_mistral, mock_keys)
    d.mint("ts-app", "prod")
    d.mint("ts-gone", "prod")
    d.cli("revoke", "ts-gone")
    d.start()
    yield d
    d.stop()


def run_sdk(url: str, token: str) -> dict:
    node = shutil.which("node")
    assert node, "node is required (Node 20)"
    proc = subprocess.run([node, "sdk_client.mjs", url, token], cwd=NODE_DIR, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_typescript_sdk_chat_stream_and_embeddings(dep, mock_mistral, mock_keys):
    out = run_sdk(dep.url, dep.tokens["ts-app"])
    assert "error" not in out, out
    assert out["chat"]["content"] and out["chat"]["usage"]["promptTokens"] > 0
    assert out["stream"]["text"] and out["stream"]["usage"]["completionTokens"] > 0
    assert out["embeddings"]["count"] == 2 and out["embeddings"]["usage"]["completionTokens"] == 0
    auths = {r["headers"]["authorization"] for r in mock_mistral.requests()}
    assert auths == {f"Bearer {mock_keys['prod']}"}
    assert dep.envoy.stat("wasmcustom.shieldkey.token_id.ts-app.requests") == 3


def test_typescript_sdk_gets_a_clean_error_for_a_revoked_token(dep, mock_mistral):
    out = run_sdk(dep.url, dep.tokens["ts-gone"])
    assert out["error"]["status"] == 401, out
    assert "shield_token_revoked" in out["error"]["body"]
    assert mock_mistral.requests() == []
