#!/usr/bin/env bash
# Fuzzes the native API from its own OpenAPI document with schemathesis against a real
# server on a real engine: no 5xx, every status documented, every response matching its
# schema. Uses a fixed seed so a failure reproduces; removes what it created.
#
# Two runs:
#   1. unseeded: every operation, with whatever ids schemathesis makes up (mostly 404s
#      for the per-sandbox operations);
#   2. seeded: the per-sandbox operations (files, commands, get) against one live
#      sandbox, its id fixed as the `sandbox_id` path parameter (schemathesis.toml
#      `[parameters]`), plus the stateful phase (schemathesis infers links, e.g. the
#      pid of a background command into kill_command). kill_sandbox and
#      set_sandbox_timeout are left out of this run:
#      either could end the sandbox halfway (a fuzzed timeout of 1 s expires it).
#      The sandbox must still be alive at the end, else the run did not test it.
#
#   deploy/schemathesis.sh [docker|podman]      (needs a debug build of colima-e2b)
#
# SCHEMATHESIS_MAX_EXAMPLES (20) sets the cases per operation and phase.
set -euo pipefail
cd "$(dirname "$0")/.."
engine=${1:-docker}
# The engine's CLI on its standard socket: podman's local CLI may use another storage
# than the service (deploy/engines.sh starts it on a storage of its own).
engine_cli() {
  if [ "$engine" = podman ]; then podman --remote --url unix:///run/podman/podman.sock "$@"; else docker "$@"; fi
}
command -v schemathesis >/dev/null 2>&1 ||
  python3 -m pip install --quiet --disable-pip-version-check schemathesis
bin=${COLIMA_E2B_BIN:-${CARGO_TARGET_DIR:-target}/debug/colima-e2b}
bin=$(realpath "$bin")
max_examples=${SCHEMATHESIS_MAX_EXAMPLES:-20}
owner="schemathesis-$$"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
base="http://127.0.0.1:$port"
state=$(mktemp -d)
log="$state/server.log"
server=
sandbox=
cleanup() {
  local rc=$?
  if [ -n "$sandbox" ]; then
    curl -sS -o /dev/null -X DELETE "$base/sandboxes/$sandbox" 2>/dev/null || true
  fi
  if [ -n "$server" ]; then
    kill "$server" 2>/dev/null || true
    wait "$server" 2>/dev/null || true
  fi
  ids=$(engine_cli ps -aq --filter "label=dev.colima-e2b.owner=$owner" 2>/dev/null || true)
  if [ -n "$ids" ]; then
    # shellcheck disable=SC2086
    engine_cli rm -f $ids >/dev/null 2>&1 || true
  fi
  vols=$(engine_cli volume ls -q --filter "label=dev.colima-e2b.owner=$owner" 2>/dev/null || true)
  if [ -n "$vols" ]; then
    # shellcheck disable=SC2086
    engine_cli volume rm -f $vols >/dev/null 2>&1 || true
  fi
  # Its sandboxes' egress rules: a server keeps them through a stop and drops them at
  # its next start, which this owner never has (sandbox_core::network::egress_table).
  nft delete table inet "colima_e2b_egress_$(printf %s "$owner" | sha256sum | cut -c1-10)" 2>/dev/null || true
  if [ "$rc" -ne 0 ] && [ -f "$log" ]; then
    echo "--- server log (last 40 lines) ---" >&2
    tail -n 40 "$log" >&2
  fi
  rm -rf "$state"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

COLIMA_E2B_OWNER=$owner COLIMA_E2B_STATE_DIR=$state COLIMA_E2B_MAX_SANDBOXES=5 \
  "$bin" server --port "$port" --backend "$engine" >"$log" 2>&1 &
server=$!
for _ in $(seq 1 150); do
  curl -fsS "$base/health" >/dev/null 2>&1 && break
  kill -0 "$server" 2>/dev/null || { echo "server exited" >&2; exit 1; }
  sleep 0.2
done
curl -fsS "$base/health" >/dev/null || { echo "server is not healthy" >&2; exit 1; }

# schemathesis keeps caches in its working directory: keep them out of the repository.
cd "$state"
checks=not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance
st() {
  schemathesis "$@" --checks "$checks" --max-examples "$max_examples" --seed 1 --workers 1 \
    --generation-database none
}
failed=0

echo "=== 1/2 unseeded: every operation ==="
st run "$base/openapi.json" --phases examples,coverage,fuzzing || failed=1

# Whatever run 1 created goes, so that the seeded sandbox fits under the limit.
curl -fsS "$base/sandboxes/" | python3 -c 'import json,sys; [print(s["sandbox_id"]) for s in json.load(sys.stdin)]' |
  while read -r id; do curl -sS -o /dev/null -X DELETE "$base/sandboxes/$id"; done

sandbox=$(curl -fsS -X POST "$base/sandboxes/" -H 'Content-Type: application/json' \
  -d '{"template": "base", "timeout": 3600, "metadata": {"purpose": "schemathesis"}}' |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["sandbox_id"])')
echo "=== 2/2 seeded: per-sandbox operations on live sandbox $sandbox ==="
cat >"$state/schemathesis.toml" <<EOF
[parameters]
"path.sandbox_id" = "$sandbox"
EOF
st --config-file "$state/schemathesis.toml" run "$base/openapi.json" \
  --phases examples,coverage,fuzzing,stateful --include-path-regex '\{sandbox_id\}' \
  --exclude-operation-id kill_sandbox --exclude-operation-id set_sandbox_timeout || failed=1

status=$(curl -sS -o /dev/null -w '%{http_code}' "$base/sandboxes/$sandbox")
if [ "$status" != 200 ]; then
  echo "the seeded sandbox $sandbox did not survive the run (GET answered $status)" >&2
  failed=1
fi
exit "$failed"
