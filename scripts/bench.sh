#!/usr/bin/env bash
# `make bench`: installs the load generators if missing (Debian's wrk, and h2load from
# nghttp2-client for HTTP/2), then runs tests/bench/bench.py with the given options
# (--quick for a smoke test; --seconds S, --rounds N, --json PATH; see its --help).
# Expects `make build` (the filter and the CLI); the minimal comparison filter is built here.
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=apt_install.sh
source scripts/apt_install.sh
apt_install wrk "wrk (HTTP/1.1 load generator)" wrk
apt_install h2load "h2load (HTTP/2 load generator)" nghttp2-client

exec .venv/bin/python tests/bench/bench.py "$@"
