#!/usr/bin/env bash
# Fuzzes the native API from its own OpenAPI document with schemathesis against a real
# server on a real engine: no 5xx, every status documented, every response matching its
# schema. Uses a fixed seed so a failure reproduces; removes what it created.
#
#   deploy/schemathesis.sh [docker|podman]      (needs a debug build of colima-e2b)
set -euo pipefail
cd "$(dirname "$0")/.."
engine=${1:-docker}
python3 -c 'import schemathesis' 2>/dev/null || python3 -m pip install --quiet --disable-pip-version-check schemathesis
bin=${COLIMA_E2B_BIN:-${CARGO_TARGET_DIR:-target}/debug/colima-e2b}
owner="schemathesis-$$"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
state=$(mktemp -d)
log="$state/server.log"
COLIMA_E2B_OWNER=$owner COLIMA_E2B_STATE_DIR=$state COLIMA_E2B_MAX_SANDBOXES=5 \
  "$bin" server --port "$port" --backend "$engine" >"$log" 2>&1 &
server=$!
cleanup() {
  kill "$server" 2>/dev/null || true
  ids=$("$engine" ps -aq --filter "label=dev.colima-e2b.owner=$owner" || true)
  [ -n "$ids" ] && "$engine" rm -f $ids >/dev/null 2>&1 || true
  rm -rf "$state"
}
trap cleanup EXIT
for _ in $(seq 1 100); do
  curl -fsS "http://127.0.0.1:$port/health" >/dev/null 2>&1 && break
  sleep 0.2
done
schemathesis run "http://127.0.0.1:$port/openapi.json" \
  --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance \
  --phases examples,coverage,fuzzing --max-examples 20 --seed 1 --workers 1
