#!/usr/bin/env bash
# Runs a ShieldKey fleet on loopback: 3 etcd members holding the policy, 2 Envoys (envoy/fleet.yaml)
# following it, and the bundled mock Mistral upstream. `make fleet` builds first, then runs this.
#
# The fleet demo always uses the mock upstream (MISTRAL_API_KEY is not used; `make run` talks to
# the real API). Each run starts etcd from empty data dirs, writes a fresh policy into it with the
# CLI in fleet mode (`shieldkey --etcd ...`: init, seal the mock's key, mint a demo token) and
# prints the token once. The master key and the mock's key are kept in the state directory.
#
# Overridable (the test suite runs this script on free ports):
#   SHIELDKEY_FLEET_DIR          state directory (default .run-fleet)
#   SHIELDKEY_ETCD_PORT_BASE     etcd ports: clients base+1..3, peers base+11..13 (default 23790)
#   SHIELDKEY_FLEET_PORT_1/_2    the Envoys' listeners (10001, 10002)
#   SHIELDKEY_FLEET_ADMIN_PORT_1/_2  their admin ports (9911, 9912)
#   SHIELDKEY_FLEET_MOCK_PORT    the mock upstream (8090; `make run`'s mock uses 8089)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

CLI=$ROOT/target/release/shieldkey
WASM=$ROOT/target/wasm32-wasip1/release/shieldkey.wasm
ENVOY=$ROOT/.venv/bin/envoy
PYTHON=$ROOT/.venv/bin/python
ETCD=$(command -v etcd || echo /usr/bin/etcd)
for f in "$CLI" "$WASM" "$ENVOY" "$PYTHON"; do
  if [ ! -e "$f" ]; then echo "missing $f: run \`make fleet\` (it builds and sets up first)" >&2; exit 1; fi
done
if [ ! -x "$ETCD" ]; then echo "etcd is not installed (Debian: apt-get install etcd-server)" >&2; exit 1; fi

STATE=${SHIELDKEY_FLEET_DIR:-$ROOT/.run-fleet}
mkdir -p "$STATE"
chmod 700 "$STATE"
STATE=$(cd "$STATE" && pwd)
# How the printed commands name the state directory: short when it is the default.
SHOWN=$STATE
if [ "$STATE" = "$ROOT/.run-fleet" ]; then SHOWN=.run-fleet; fi

ETCD_BASE=${SHIELDKEY_ETCD_PORT_BASE:-23790}
LISTEN_PORTS=("${SHIELDKEY_FLEET_PORT_1:-10001}" "${SHIELDKEY_FLEET_PORT_2:-10002}")
ADMIN_PORTS=("${SHIELDKEY_FLEET_ADMIN_PORT_1:-9911}" "${SHIELDKEY_FLEET_ADMIN_PORT_2:-9912}")
MOCK_PORT=${SHIELDKEY_FLEET_MOCK_PORT:-8090}
ETCD_CLIENT_PORTS=($((ETCD_BASE + 1)) $((ETCD_BASE + 2)) $((ETCD_BASE + 3)))
ETCD_PEER_PORTS=($((ETCD_BASE + 11)) $((ETCD_BASE + 12)) $((ETCD_BASE + 13)))
ETCD_URLS=http://127.0.0.1:${ETCD_CLIENT_PORTS[0]},http://127.0.0.1:${ETCD_CLIENT_PORTS[1]},http://127.0.0.1:${ETCD_CLIENT_PORTS[2]}
INITIAL_CLUSTER=m1=http://127.0.0.1:${ETCD_PEER_PORTS[0]},m2=http://127.0.0.1:${ETCD_PEER_PORTS[1]},m3=http://127.0.0.1:${ETCD_PEER_PORTS[2]}
ALL_PORTS=("${ETCD_CLIENT_PORTS[@]}" "${ETCD_PEER_PORTS[@]}" "${LISTEN_PORTS[@]}" "${ADMIN_PORTS[@]}" "$MOCK_PORT")

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for p in "${ALL_PORTS[@]}"; do
  if port_in_use "$p"; then
    echo "port $p is already in use (another \`make fleet\`?); see the SHIELDKEY_* variables in $0" >&2
    exit 1
  fi
done

# Children die with this script even if it is killed without a chance to clean up.
DIE_WITH_US=()
if command -v setpriv >/dev/null && setpriv --help 2>&1 | grep -q -- --pdeathsig; then
  DIE_WITH_US=(setpriv --pdeathsig TERM --)
fi

# Stopping: Envoys and the mock first, then etcd, the followers before the leader (a leader
# stopped while its followers run hands leadership over first, for up to 7 s when they are
# stopping too); then wait until every port is free. SIGTERM, and SIGKILL after 10 s.
#
# It runs as its own bash process from the EXIT trap: after a Ctrl-C that also ended one of this
# script's children, bash ends itself at the next function return or command substitution, which
# would cut a cleanup written in this shell short. Without `wait` (these are not its children),
# a process counts as gone once it is a zombie; it has released its ports then.
stop_fleet() {
  local p i leader="" s pids etcd_pids ports etcd_ports others=()
  read -ra pids <<< "$FLEET_PIDS"
  read -ra etcd_pids <<< "$FLEET_ETCD_PIDS"
  read -ra etcd_ports <<< "$FLEET_ETCD_PORTS"
  read -ra ports <<< "$FLEET_PORTS"
  alive() {
    local stat=""
    read -r stat 2>/dev/null < "/proc/$1/stat" || return 1
    stat=${stat##*) }
    [ "${stat%% *}" != Z ]
  }
  stop() {
    local p i any
    for p in "$@"; do kill "$p" 2>/dev/null || true; done
    for ((i = 0; i < 200; i++)); do
      any=0
      for p in "$@"; do if alive "$p"; then any=1; fi; done
      if [ "$any" = 0 ]; then return; fi
      sleep 0.05
    done
    for p in "$@"; do if alive "$p"; then kill -9 "$p" 2>/dev/null || true; fi; done
  }
  stop "${pids[@]}"
  for i in "${!etcd_pids[@]}"; do
    if s=$(curl -fs --max-time 0.5 -X POST -d '{}' "http://127.0.0.1:${etcd_ports[$i]}/v3/maintenance/status" 2>/dev/null) \
        && [[ $s =~ \"member_id\":\"([0-9]+)\" ]] && [[ $s == *"\"leader\":\"${BASH_REMATCH[1]}\""* ]]; then
      leader=$i
      break
    fi
  done
  for i in "${!etcd_pids[@]}"; do
    if [ "$i" != "$leader" ]; then others+=("${etcd_pids[$i]}"); fi
  done
  stop "${others[@]}"
  if [ -n "$leader" ]; then stop "${etcd_pids[$leader]}"; fi
  for p in "${ports[@]}"; do
    for ((i = 0; i < 50; i++)); do
      (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null || break
      sleep 0.1
    done
  done
}
STOP_FLEET="$(declare -f stop_fleet)
stop_fleet"
pids=()       # Envoys and the mock
etcd_pids=()
trap 'FLEET_PIDS="${pids[*]}" FLEET_ETCD_PIDS="${etcd_pids[*]}" FLEET_ETCD_PORTS="${ETCD_CLIENT_PORTS[*]}" \
  FLEET_PORTS="${ALL_PORTS[*]}" bash -c "$STOP_FLEET" || true' EXIT
# A Ctrl-C (or SIGTERM) during the start ends the start at the next check; once running, it ends
# the final wait. The EXIT trap stops what was started.
interrupted=""
trap 'interrupted=130' INT
trap 'interrupted=143' TERM
check_interrupted() { if [ -n "$interrupted" ]; then exit "$interrupted"; fi; }

fail() {
  echo "$1; the last lines of $2:" >&2
  tail -30 "$2" >&2
  exit 1
}

# --- etcd: 3 members from empty data dirs ---------------------------------------------------------
rm -rf "$STATE/etcd"
mkdir -p "$STATE/etcd"
# etcd also reads its flags from ETCD_* variables and refuses to start when one conflicts.
UNSET_ETCD_VARS=()
for v in $(compgen -e | grep '^ETCD_' || true); do UNSET_ETCD_VARS+=(-u "$v"); done
for i in 0 1 2; do
  name=m$((i + 1))
  client=http://127.0.0.1:${ETCD_CLIENT_PORTS[$i]}
  peer=http://127.0.0.1:${ETCD_PEER_PORTS[$i]}
  # Own session: a Ctrl-C in the terminal reaches this script, which stops the members in order.
  env "${UNSET_ETCD_VARS[@]}" setsid "${DIE_WITH_US[@]}" "$ETCD" --name "$name" --data-dir "$STATE/etcd/$name.data" \
    --listen-client-urls "$client" --advertise-client-urls "$client" \
    --listen-peer-urls "$peer" --initial-advertise-peer-urls "$peer" \
    --initial-cluster "$INITIAL_CLUSTER" --initial-cluster-token shieldkey-fleet-demo \
    --initial-cluster-state new --logger=zap --log-outputs=stderr \
    < /dev/null > "$STATE/etcd/$name.log" 2>&1 &
  etcd_pids+=($!)
  # One after the other, each once its peer port serves: a member that finds a peer with its
  # port bound but not serving yet waits a second for it.
  for _ in $(seq 1 100); do
    check_interrupted
    curl -fs --max-time 0.5 "$peer/members" >/dev/null 2>&1 && break
    kill -0 "${etcd_pids[$i]}" 2>/dev/null || fail "etcd member $name exited" "$STATE/etcd/$name.log"
    sleep 0.05
  done
done
for i in 0 1 2; do
  for _ in $(seq 1 200); do
    check_interrupted
    curl -fs --max-time 1 "http://127.0.0.1:${ETCD_CLIENT_PORTS[$i]}/health" 2>/dev/null | grep -q '"health":"true"' && break
    kill -0 "${etcd_pids[$i]}" 2>/dev/null || fail "etcd member m$((i + 1)) exited" "$STATE/etcd/m$((i + 1)).log"
    sleep 0.05
  done
  curl -fs --max-time 1 "http://127.0.0.1:${ETCD_CLIENT_PORTS[$i]}/health" 2>/dev/null | grep -q '"health":"true"' \
    || fail "etcd member m$((i + 1)) is not healthy" "$STATE/etcd/m$((i + 1)).log"
done

# --- the policy, written into etcd by the CLI in fleet mode ---------------------------------------
if [ ! -s "$STATE/master.key" ]; then
  (umask 077 && SHIELDKEY_ETCD='' "$CLI" keygen > "$STATE/master.key")
fi
SHIELDKEY_MASTER_KEY=$(cat "$STATE/master.key")
export SHIELDKEY_MASTER_KEY
export SHIELDKEY_ETCD=$ETCD_URLS
unset SHIELDKEY_POLICY SHIELDKEY_ETCD_PREFIX SHIELDKEY_ETCD_USER
if [ ! -s "$STATE/mock-upstream.key" ]; then
  (umask 077 && head -c 512 /dev/urandom | tr -dc 'A-Za-z0-9' | head -c 32 > "$STATE/mock-upstream.key")
fi
check_interrupted
"$CLI" init --force >/dev/null
"$CLI" seal --id prod < "$STATE/mock-upstream.key" >/dev/null
TOKEN=$("$CLI" mint --id demo --upstream-key prod --owner "demo user" --description "make fleet" --ttl 24h)

# --- the mock upstream and 2 Envoys ------------------------------------------------------------
check_interrupted
env -u SHIELDKEY_MASTER_KEY "${DIE_WITH_US[@]}" "$PYTHON" examples/mock_mistral/mock_mistral.py --port "$MOCK_PORT" \
  --key-file "$STATE/mock-upstream.key" < /dev/null > "$STATE/mock.log" 2>&1 &
pids+=($!)

cp "$WASM" "$STATE/shieldkey.wasm"
for i in 0 1; do
  n=$((i + 1))
  # envoy/fleet.yaml with this Envoy's node id, ports, etcd members, mock and wasm path.
  "$PYTHON" - "$ROOT/envoy/fleet.yaml" "$STATE/envoy-$n.yaml" "envoy-$n" "${LISTEN_PORTS[$i]}" \
    "${ADMIN_PORTS[$i]}" "$MOCK_PORT" "$STATE/shieldkey.wasm" "${ETCD_CLIENT_PORTS[@]}" <<'PY'
import sys
import yaml

src, dst, node_id, listen, admin, mock, wasm, *etcd_ports = sys.argv[1:]
doc = yaml.safe_load(open(src))
doc["node"]["id"] = node_id
doc["admin"]["address"]["socket_address"]["port_value"] = int(admin)
for listener in doc["static_resources"]["listeners"]:
    listener["address"]["socket_address"]["port_value"] = int(listen)
for cluster in doc["static_resources"]["clusters"]:
    if cluster["name"] == "mistral":
        for group in cluster["load_assignment"]["endpoints"]:
            for ep in group["lb_endpoints"]:
                ep["endpoint"]["address"]["socket_address"].update(address="127.0.0.1", port_value=int(mock))
    elif cluster["name"] == "etcd":
        cluster["load_assignment"]["endpoints"] = [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": int(p)}}}}
            for p in etcd_ports]}]
text = yaml.safe_dump(doc, sort_keys=False)
assert text.count("filename: shieldkey.wasm") == 2, "envoy/fleet.yaml: expected the wasm path twice"
# Both Envoys run in one directory: each writes its own audit log.
assert text.count("path: shieldkey-audit.log") == 1, "envoy/fleet.yaml: expected the audit log path"
text = text.replace("path: shieldkey-audit.log", f"path: shieldkey-audit-{node_id}.log")
open(dst, "w").write(f"# Generated by scripts/fleet.sh from envoy/fleet.yaml for {node_id}.\n"
                     + text.replace("filename: shieldkey.wasm", f"filename: {wasm}"))
PY
  (cd "$STATE" && exec "${DIE_WITH_US[@]}" "$ENVOY" -c "envoy-$n.yaml" --concurrency 2 --disable-hot-restart \
     --log-level info --file-flush-interval-msec 1000 < /dev/null > "$STATE/envoy-$n.log" 2>&1) &
  pids+=($!)
done

# Ready: both Envoys live, each one's syncer has loaded the policy from etcd, and every filter
# root context (the main thread's and one per worker: 3 at --concurrency 2) has taken it from
# shared data on its next tick; before that, a worker answers 503 shield_policy_unavailable.
for i in 0 1; do
  n=$((i + 1))
  admin=http://127.0.0.1:${ADMIN_PORTS[$i]}
  for _ in $(seq 1 300); do
    check_interrupted
    revision=$(curl -fsg --max-time 1 "$admin/stats?filter=shieldkey[.]fleet[.]revision$" 2>/dev/null | awk '{print $2}' || true)
    applied=$(grep -c 'fleet policy revision [0-9]* applied' "$STATE/envoy-$n.log" 2>/dev/null || true)
    if [ "${revision:-0}" -gt 0 ] 2>/dev/null && [ "${applied:-0}" -ge 3 ] \
       && curl -fs --max-time 1 "$admin/ready" 2>/dev/null | grep -q LIVE; then break; fi
    kill -0 "${pids[$n]}" 2>/dev/null || fail "envoy-$n exited" "$STATE/envoy-$n.log"
    sleep 0.1
  done
  if ! curl -fs --max-time 1 "$admin/ready" 2>/dev/null | grep -q LIVE; then
    fail "envoy-$n did not become ready" "$STATE/envoy-$n.log"
  fi
  if ! [ "${revision:-0}" -gt 0 ] 2>/dev/null || ! [ "${applied:-0}" -ge 3 ]; then
    fail "envoy-$n did not load the policy from etcd" "$STATE/envoy-$n.log"
  fi
done

NOTE=""
if [ -n "${MISTRAL_API_KEY:-}" ]; then
  NOTE="
Note: MISTRAL_API_KEY is not used: the fleet demo always uses the bundled mock (\`make run\` uses the real API)."
fi
curl_for() {
  cat <<CURL
  curl -s http://127.0.0.1:$1/v1/chat/completions \\
    -H "Authorization: Bearer $TOKEN" -H "Content-Type: application/json" \\
    -d '{"model":"mistral-small-latest","messages":[{"role":"user","content":"Hello"}]}'
CURL
}

cat <<MSG

ShieldKey fleet is running: 2 Envoys following one policy in a 3-member etcd cluster
  envoy-1: http://127.0.0.1:${LISTEN_PORTS[0]}  (stats: http://127.0.0.1:${ADMIN_PORTS[0]}/stats?filter=shieldkey)  log: $SHOWN/envoy-1.log
  envoy-2: http://127.0.0.1:${LISTEN_PORTS[1]}  (stats: http://127.0.0.1:${ADMIN_PORTS[1]}/stats?filter=shieldkey)  log: $SHOWN/envoy-2.log
  etcd:    $ETCD_URLS  logs: $SHOWN/etcd/
  upstream: bundled mock Mistral on 127.0.0.1:$MOCK_PORT (the fleet demo always uses the mock)$NOTE

Your demo token (shown once): $TOKEN

curl through envoy-1:
$(curl_for "${LISTEN_PORTS[0]}")

curl through envoy-2:
$(curl_for "${LISTEN_PORTS[1]}")

Revoke it on every Envoy at once (another shell, in this directory):
  SHIELDKEY_ETCD=$ETCD_URLS target/release/shieldkey revoke demo
(\`unrevoke demo\` and \`list\` work the same way; \`mint\` also needs SHIELDKEY_MASTER_KEY=\$(cat $SHOWN/master.key).)

Ctrl-C stops the Envoys, the mock and etcd.
MSG
check_interrupted
wait "${pids[@]}" "${etcd_pids[@]}" || true
exit "${interrupted:-1}"
