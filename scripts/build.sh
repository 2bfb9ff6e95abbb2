#!/usr/bin/env bash
# Builds the filter (target/wasm32-wasip1/release/shieldkey.wasm) and the CLI
# (target/release/shieldkey).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --quiet --release --target wasm32-wasip1 --lib
cargo build --quiet --release --bin shieldkey
ls -l target/wasm32-wasip1/release/shieldkey.wasm | awk '{print "build: shieldkey.wasm " $5 " bytes"}'
