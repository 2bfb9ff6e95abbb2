#!/usr/bin/env bash
# `make bench`: installs the load generators if missing (Debian's wrk, and h2load from
# nghttp2-client for HTTP/2), then runs tests/bench/bench.py with the given options
# (--quick for a smoke test; --seconds S, --rounds N, --json PATH; see its --help).
# Expects `make build` (the filter and the CLI); the minimal comparison filter is built here.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v wrk >/dev/null 2>&1 || need+=(wrk)
command -v h2load >/dev/null 2>&1 || need+=(nghttp2-client)
if [ "${#need[@]}" -gt 0 ]; then
  echo "bench: installing ${need[*]} (apt-get)"
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "bench: ${need[*]} missing and apt-get is missing: install wrk and h2load (nghttp2) by hand" >&2
    exit 1
  fi
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    if ! command -v sudo >/dev/null 2>&1; then
      echo "bench: installing ${need[*]} needs root (or sudo) for apt-get" >&2
      exit 1
    fi
    sudo=sudo
  fi
  aptlog=$(mktemp)
  if ! { $sudo env DEBIAN_FRONTEND=noninteractive apt-get -qq update &&
         $sudo env DEBIAN_FRONTEND=noninteractive apt-get -qq install -y "${need[@]}"; } >"$aptlog" 2>&1; then
    cat "$aptlog" >&2
    rm -f "$aptlog"
    echo "bench: apt-get could not install ${need[*]} (output above)" >&2
    exit 1
  fi
  rm -f "$aptlog"
  for tool in wrk h2load; do
    if ! command -v "$tool" >/dev/null 2>&1; then
      echo "bench: installed ${need[*]} but $tool is still not on PATH" >&2
      exit 1
    fi
  done
fi

exec .venv/bin/python tests/bench/bench.py "$@"
