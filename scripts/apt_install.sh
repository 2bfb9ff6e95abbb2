#!/usr/bin/env bash
# Sourced by setup.sh, bench.sh and profile.sh.
# Installs Debian packages with apt-get (sudo only when not root) when `command` is missing.
apt_install() {
  local command=$1 what=$2
  shift 2
  if command -v "$command" >/dev/null 2>&1; then
    return 0
  fi
  echo "setup: installing $what (apt-get: $*)"
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "setup: $command is not on PATH and apt-get is missing: install $what by hand" >&2
    exit 1
  fi
  local sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    if ! command -v sudo >/dev/null 2>&1; then
      echo "setup: installing $what needs root (or sudo) for apt-get" >&2
      exit 1
    fi
    sudo=sudo
  fi
  local aptlog
  aptlog=$(mktemp)
  if ! { $sudo env DEBIAN_FRONTEND=noninteractive apt-get -qq update &&
         $sudo env DEBIAN_FRONTEND=noninteractive apt-get -qq install -y "$@"; } >"$aptlog" 2>&1; then
    cat "$aptlog" >&2
    rm -f "$aptlog"
    echo "setup: apt-get could not install $* (output above)" >&2
    exit 1
  fi
  rm -f "$aptlog"
  if ! command -v "$command" >/dev/null 2>&1; then
    echo "setup: $* was installed but $command is still not on PATH" >&2
    exit 1
  fi
}
