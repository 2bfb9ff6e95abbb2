#!/usr/bin/env bash
# Runs every check and test: formatting, clippy (native and wasm), Rust unit and integration
# tests, then the end-to-end suite against a real Envoy with the official SDKs as clients.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
echo "== rustfmt"
cargo fmt --check
echo "== clippy (native, all targets)"
cargo clippy --quiet --all-targets -- -D warnings
echo "== clippy (wasm filter)"
cargo clippy --quiet --target wasm32-wasip1 --lib -- -D warnings
echo "== rustfmt and clippy (the benchmark's comparison crates, so they keep building)"
for crate in bench/envoy-module-abi bench/minimal-module bench/shieldkey-module; do
  cargo fmt --check --manifest-path "$crate/Cargo.toml"
  # The main target directory: shieldkey-module builds the core and its dependencies again.
  cargo clippy --quiet --manifest-path "$crate/Cargo.toml" --target-dir target -- -D warnings
done
cargo fmt --check --manifest-path bench/minimal-filter/Cargo.toml
cargo clippy --quiet --manifest-path bench/minimal-filter/Cargo.toml --target wasm32-wasip1 \
  --target-dir target -- -D warnings
echo "== build"
scripts/build.sh
echo "== cargo test"
cargo test --quiet
echo "== fuzzing (10 s per target; scripts/fuzz.sh 600 for the long run)"
scripts/fuzz.sh 10
echo "== end-to-end (real Envoy)"
.venv/bin/python -m pytest tests/e2e -q -p no:cacheprovider "$@"
