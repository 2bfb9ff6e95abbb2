#!/usr/bin/env bash
# Runs ShieldKey: Envoy with the filter and a demo policy.
#
# Without MISTRAL_API_KEY: against the bundled mock Mistral upstream (envoy/demo.yaml).
# With MISTRAL_API_KEY set: against https://api.mistral.ai (envoy/mistral.yaml); the key is sealed
# into the demo policy and never written anywhere in clear.
#
# State lives in .run/ (master key, policy, published filter config). Each run mints a fresh demo
# token and prints it once.
#
# Overridable (the test suite runs this script on free ports): SHIELDKEY_RUN_DIR (default .run),
# SHIELDKEY_LISTEN_PORT (10000), SHIELDKEY_ADMIN_PORT (9901), SHIELDKEY_MOCK_PORT (8089).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

scripts/setup.sh
scripts/build.sh

RUN=${SHIELDKEY_RUN_DIR:-$ROOT/.run}
mkdir -p "$RUN/filter"
chmod 700 "$RUN"
RUN=$(cd "$RUN" && pwd)
# How the printed commands name the state directory: short when it is the default.
SHOWN_RUN=$RUN
if [ "$RUN" = "$ROOT/.run" ]; then SHOWN_RUN=.run; fi
CLI=$ROOT/target/release/shieldkey
ENVOY=$ROOT/.venv/bin/envoy
LISTEN_PORT=${SHIELDKEY_LISTEN_PORT:-10000}
ADMIN_PORT=${SHIELDKEY_ADMIN_PORT:-9901}
MOCK_PORT=${SHIELDKEY_MOCK_PORT:-8089}

if [ ! -s "$RUN/master.key" ]; then
  (umask 077 && "$CLI" keygen > "$RUN/master.key")
fi
SHIELDKEY_MASTER_KEY=$(cat "$RUN/master.key")
export SHIELDKEY_MASTER_KEY
export SHIELDKEY_POLICY=$RUN/policy.json
cp target/wasm32-wasip1/release/shieldkey.wasm "$RUN/shieldkey.wasm"

# A fresh policy each run keeps the demo simple; production keeps its policy file.
"$CLI" init --force >/dev/null
if [ -n "${MISTRAL_API_KEY:-}" ]; then
  BOOTSTRAP=$ROOT/envoy/mistral.yaml
  UPSTREAM="https://api.mistral.ai (real)"
  "$CLI" seal --id prod --from-env MISTRAL_API_KEY >/dev/null
else
  BOOTSTRAP=$ROOT/envoy/demo.yaml
  UPSTREAM="bundled mock Mistral on 127.0.0.1:$MOCK_PORT"
  if [ ! -s "$RUN/mock-upstream.key" ]; then
    (umask 077 && head -c 512 /dev/urandom | tr -dc 'A-Za-z0-9' | head -c 32 > "$RUN/mock-upstream.key")
  fi
  "$CLI" seal --id prod < "$RUN/mock-upstream.key" >/dev/null
fi
TOKEN=$("$CLI" mint --id demo --upstream-key prod --owner "demo user" --description "make run" --ttl 24h)
"$CLI" publish --to "$RUN/filter/shieldkey.json" --wasm shieldkey.wasm

pids=()
# Stops Envoy and the mock, and waits for them, so Ctrl-C returns with the ports released.
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
}
trap cleanup EXIT INT TERM

if [ -z "${MISTRAL_API_KEY:-}" ]; then
  .venv/bin/python examples/mock_mistral/mock_mistral.py --port "$MOCK_PORT" --key-file "$RUN/mock-upstream.key" > "$RUN/mock.log" 2>&1 &
  pids+=($!)
fi
# The shipped bootstrap with the chosen ports (identical to it on the defaults).
sed -e "s/port_value: 10000}/port_value: $LISTEN_PORT}/" \
    -e "s/port_value: 9901}/port_value: $ADMIN_PORT}/" \
    -e "s/port_value: 8089}/port_value: $MOCK_PORT}/" "$BOOTSTRAP" > "$RUN/envoy.yaml"
(cd "$RUN" && exec "$ENVOY" -c envoy.yaml --concurrency 2 --disable-hot-restart --log-level info --file-flush-interval-msec 1000 > "$RUN/envoy.log" 2>&1) &
pids+=($!)

for _ in $(seq 1 100); do
  if curl -fs "http://127.0.0.1:$ADMIN_PORT/ready" 2>/dev/null | grep -q LIVE; then break; fi
  sleep 0.2
done
if ! curl -fs "http://127.0.0.1:$ADMIN_PORT/ready" 2>/dev/null | grep -q LIVE; then
  echo "Envoy did not become ready; its log:" >&2
  tail -50 "$RUN/envoy.log" >&2
  exit 1
fi

cat <<MSG

ShieldKey is running: Envoy on http://127.0.0.1:$LISTEN_PORT -> $UPSTREAM
Admin (stats): http://127.0.0.1:$ADMIN_PORT/stats?filter=shieldkey    Envoy log: $SHOWN_RUN/envoy.log

Your demo token (shown once): $TOKEN

curl:
  curl -s http://127.0.0.1:$LISTEN_PORT/v1/chat/completions \\
    -H "Authorization: Bearer $TOKEN" -H "Content-Type: application/json" \\
    -d '{"model":"mistral-small-latest","messages":[{"role":"user","content":"Hello"}]}'

Python SDK (pip install mistralai):
  from mistralai.client import Mistral
  client = Mistral(api_key="$TOKEN", server_url="http://127.0.0.1:$LISTEN_PORT")
  print(client.chat.complete(model="mistral-small-latest",
        messages=[{"role": "user", "content": "Hello"}]).choices[0].message.content)

Revoke it live (another shell, in this directory):
  SHIELDKEY_POLICY=$SHOWN_RUN/policy.json target/release/shieldkey revoke demo --publish $SHOWN_RUN/filter/shieldkey.json --admin http://127.0.0.1:$ADMIN_PORT

Ctrl-C stops Envoy and the mock.
MSG
wait "${pids[@]}"
