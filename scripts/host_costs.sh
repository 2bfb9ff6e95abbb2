#!/usr/bin/env bash
# `make host-costs`: installs wrk if missing (Debian's wrk), then runs tests/bench/host_costs.py
# (what each kind of proxy-wasm host operation costs Envoy per request; see its docstring).
# Expects `make setup` (Envoy in the project's venv); the minimal filter is built there.
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=apt_install.sh
source scripts/apt_install.sh
apt_install wrk "wrk (HTTP/1.1 load generator)" wrk

exec .venv/bin/python tests/bench/host_costs.py "$@"
