#!/usr/bin/env bash
# `make profile`: installs wrk and perf if missing (Debian's wrk and linux-perf), then runs
# tests/bench/profile.py (where the front Envoy's CPU goes per request; see its docstring).
# Expects `make build`; perf needs root or kernel.perf_event_paranoid <= 1.
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=apt_install.sh
source scripts/apt_install.sh
apt_install wrk "wrk (HTTP/1.1 load generator)" wrk
apt_install perf "perf (sampling profiler)" linux-perf

exec .venv/bin/python tests/bench/profile.py "$@"
