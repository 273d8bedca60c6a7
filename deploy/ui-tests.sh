#!/usr/bin/env bash
# The built-in dashboard (/ui) end to end in headless Chromium (Debian's package) driven
# by Playwright (npm playwright-core, tests/ui): a server that requires its key, a
# template built with `colima-e2b template build`, and tests/ui/dashboard.mjs, which
# checks that the page asks for the key, lists a sandbox created through the API with
# its live usage and processes, runs a command typed into its terminal, shows the
# template's build log, and drops a sandbox killed through the API.
#
#   deploy/ui-tests.sh [docker|podman]
#
# Assumes the engine runs and the template images exist (deploy/engines.sh and
# deploy/images.sh). Installs Chromium (apt) and the npm packages (tests/ui/node_modules)
# when missing; builds like e2b-tests.sh (UI_TESTS_NO_BUILD=1 uses the existing builds).
# UI_TESTS_SCREENSHOT=FILE keeps a screenshot of the page. Sends traffic to 127.0.0.1
# only; on exit stops the server and removes everything of its owner.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
# shellcheck source=deploy/lib/suite.sh
. deploy/lib/suite.sh
suite_engine "${1:-docker}"
started_at=$(date +%s)

if ! command -v chromium >/dev/null 2>&1; then
  step "installing Debian's chromium"
  apt_install chromium
fi
want=$(cat tests/ui/package.json tests/ui/package-lock.json | sha256sum | cut -d' ' -f1)
if [ "$(cat tests/ui/node_modules/.colima-e2b-stamp 2>/dev/null)" != "$want" ]; then
  step "npm packages for tests/ui"
  (cd tests/ui && npm ci --no-audit --no-fund --loglevel=error)
  echo "$want" >tests/ui/node_modules/.colima-e2b-stamp
fi
suite_require_engine
suite_build "${UI_TESTS_NO_BUILD:-0}"

work=$(mktemp -d "${TMPDIR:-/tmp}/colima-e2b-ui-tests.XXXXXX")
owner="ui-test-$$-$(date +%s)"
port=$(free_port)
base="http://127.0.0.1:$port"
server=
template="ui-test-$$"
server_env() {
  exec env -u COLIMA_E2B_CONFIG \
    COLIMA_E2B_OWNER="$owner" COLIMA_E2B_STATE_DIR="$work/state" COLIMA_E2B_LOG_LEVEL=info \
    COLIMA_E2B_BACKEND="$engine" COLIMA_E2B_POOL__BASE=0 COLIMA_E2B_AUTH__MODE=required \
    COLIMA_E2B_HISTORY__METRICS_INTERVAL=1 "$@"
}
# shellcheck disable=SC2317  # invoked by the EXIT trap
cleanup() {
  local rc=$?
  set +e
  [ -n "$server" ] && (server_env "$bin" template --port "$port" rm "$template" >/dev/null 2>&1)
  suite_stop_and_clean
  suite_finish ui-tests "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

step "server on $base ($engine, owner $owner, the key required)"
mkdir -p "$work/state"
server_env "$bin" server --host 127.0.0.1 --port "$port" </dev/null >"$work/server.log" 2>&1 &
server=$!
suite_wait_healthy "$base" || { echo "the server exited or is not healthy" >&2; exit 1; }
key=$(server_env "$bin" env --port "$port" | sed -n 's/^export E2B_API_KEY=//p' | tr -d "'\"")
[ -n "$key" ] || { echo "colima-e2b env printed no E2B_API_KEY" >&2; exit 1; }

step "template $template (colima-e2b template build)"
mkdir -p "$work/ctx"
printf 'FROM colima-e2b/base:latest\nRUN echo ui-build-step-%s > /tmp/ui-build-marker\n' "$$" >"$work/ctx/Dockerfile"
(server_env "$bin" template --port "$port" build "$template" "$work/ctx") >&2

step "the dashboard in headless Chromium (tests/ui/dashboard.mjs)"
UI_BASE_URL=$base UI_API_KEY=$key UI_TEMPLATE=$template UI_BUILD_MARKER="ui-build-step-$$" \
  node tests/ui/dashboard.mjs
