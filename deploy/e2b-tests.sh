#!/usr/bin/env bash
# The official E2B SDKs, unchanged, against a real colima-e2b server on a real engine:
# the Python suite (tests/e2b/test_sdk.py and test_templates.py, the template-build API)
# once per pinned `e2b` version (tests/e2b/requirements-<version>.txt) and the JS tests
# (tests/e2b/js, npm `e2b` and `@e2b/code-interpreter`): smoke.mjs, templates.mjs,
# parity.mjs, parity_files.mjs, code_interpreter.mjs, network.mjs, persistence.mjs,
# volumes.mjs.
#
#   deploy/e2b-tests.sh [docker|podman]
#
# Assumes the engine runs and the template images exist (deploy/engines.sh and
# deploy/images.sh; deploy/test.sh runs both first). Builds the static agent and the
# server, keeps one virtualenv per SDK version under $E2B_TESTS_CACHE
# (/var/cache/colima-e2b) and the npm packages in tests/e2b/js/node_modules, both reused
# while their pins are unchanged. Starts one server on a free port with its own owner and
# state directory, points the SDKs at it with `colima-e2b env`, and on exit stops the
# server and removes every container of that owner. Exits non-zero if any suite failed.
#
# E2B_SDK_VERSIONS="2.63.0" narrows the Python versions; PYTEST_ARGS passes more
# arguments to pytest, run in tests/e2b (e.g. "-k files -x", or "test_templates.py" for
# that file only); E2B_SKIP_JS=1 skips the JS tests;
# E2B_JUNIT_DIR keeps the pytest JUnit XML reports there; E2B_TESTS_NO_BUILD=1 uses the
# existing builds (COLIMA_E2B_BIN or target/debug/colima-e2b, COLIMA_E2B_AGENT_BINARY or
# the build-agent.sh output path).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
# shellcheck source=deploy/lib/suite.sh
. deploy/lib/suite.sh
suite_engine "${1:-docker}"
cache=${E2B_TESTS_CACHE:-/var/cache/colima-e2b}
mkdir -p "$cache"

versions=${E2B_SDK_VERSIONS:-}
if [ -z "$versions" ]; then
  versions=$(find tests/e2b -maxdepth 1 -name 'requirements-*.txt' -printf '%f\n' |
    sed -e 's/^requirements-//' -e 's/\.txt$//' | sort -rV | tr '\n' ' ')
fi
[ -n "${versions// /}" ] || { echo "no tests/e2b/requirements-<version>.txt" >&2; exit 2; }

suite_require_engine

# ----------------------------------------------------------------------------- build
suite_build "${E2B_TESTS_NO_BUILD:-0}"

# ----------------------------------------------------------------------------- Python venvs
python=${PYTHON:-python3}
"$python" -c 'import sys; assert sys.version_info >= (3, 11), sys.version' 2>/dev/null || {
  echo "$python is older than 3.11 (e2b 2.63.0 needs 3.11): set PYTHON=" >&2
  exit 1
}
make_venv() { # dir
  "$python" -m venv "$1" 2>/dev/null && return 0
  # Debian's python3 needs python3-venv (ensurepip) for `-m venv`.
  if command -v apt-get >/dev/null 2>&1; then
    rm -rf "$1"
    apt-get install -y -qq python3-venv >/dev/null 2>&1 ||
      { apt-get update -qq >/dev/null && apt-get install -y -qq python3-venv >/dev/null; }
    "$python" -m venv "$1"
  else
    return 1
  fi
}
venv_for() { # version -> prints the venv dir, creating or refreshing it
  local ver=$1 req="$root/tests/e2b/requirements-$1.txt" dir="$cache/venv-e2b-$1" want
  want="$(sha256sum "$req" | cut -d' ' -f1) $("$python" -c 'import sys; print(sys.executable, sys.version.split()[0])')"
  if [ -x "$dir/bin/python" ] && [ "$(cat "$dir/.colima-e2b-stamp" 2>/dev/null)" = "$want" ]; then
    echo "$dir"
    return
  fi
  echo "creating $dir" >&2
  rm -rf "$dir"
  make_venv "$dir" >&2
  "$dir/bin/python" -m pip install --quiet --disable-pip-version-check -r "$req" >&2
  echo "$want" >"$dir/.colima-e2b-stamp"
  echo "$dir"
}
declare -A venv
for ver in $versions; do
  step "virtualenv for e2b==$ver"
  venv[$ver]=$(venv_for "$ver")
done

# ----------------------------------------------------------------------------- npm
if [ "${E2B_SKIP_JS:-0}" != 1 ]; then
  step "npm packages for tests/e2b/js"
  if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    echo "node and npm are needed for the JS tests (E2B_SKIP_JS=1 skips them)" >&2
    exit 1
  fi
  js=tests/e2b/js
  want=$(cat "$js/package.json" "$js/package-lock.json" | sha256sum | cut -d' ' -f1)
  if [ "$(cat "$js/node_modules/.colima-e2b-stamp" 2>/dev/null)" != "$want" ]; then
    (cd "$js" && npm ci --no-audit --no-fund --loglevel=error)
    echo "$want" >"$js/node_modules/.colima-e2b-stamp"
  fi
fi

# ----------------------------------------------------------------------------- server
owner="e2b-sdk-$$-$(date +%s)"
state=$(mktemp -d "${TMPDIR:-/tmp}/colima-e2b-e2b-tests.XXXXXX")
log="$state.log"
port=$(free_port)
server=
results=()
failed=0

# A ready command that never passes fails a create after this long (test_templates.py).
ready_timeout=15
export E2B_TEST_READY_TIMEOUT=$ready_timeout
# The engine the tests may ask about a sandbox's container (conftest.container_state).
export COLIMA_E2B_TEST_BACKEND=$engine
# Only ever called in a subshell (`&`, `$(...)`): it execs, so that `$!` is the server's
# own pid and the EXIT trap's kill reaches the server, not a wrapper shell.
server_env() {
  exec env -u COLIMA_E2B_CONFIG \
    COLIMA_E2B_OWNER="$owner" COLIMA_E2B_STATE_DIR="$state" COLIMA_E2B_LOG_LEVEL=info \
    COLIMA_E2B_BACKEND="$engine" COLIMA_E2B_BUILDS__READY_TIMEOUT="$ready_timeout" "$@"
}
# shellcheck disable=SC2317  # invoked by the EXIT trap
cleanup() {
  local rc=$?
  set +e
  suite_stop_and_clean
  if [ "$failed" -ne 0 ] || [ "$rc" -ne 0 ]; then
    echo "--- server log (last 200 lines of $log, kept) ---" >&2
    tail -n 200 "$log" >&2 2>/dev/null
  else
    rm -f "$log"
  fi
  rm -rf "$state"
  echo >&2
  echo "==> E2B SDK suites on $engine:" >&2
  local pass=0 fail=0 r
  for r in "${results[@]}"; do
    echo "    $r" >&2
    case "$r" in PASS*) pass=$((pass + 1)) ;; *) fail=$((fail + 1)) ;; esac
  done
  if [ "$rc" -ne 0 ] && [ "$failed" -eq 0 ]; then
    echo "    ERROR the script stopped early (exit $rc)" >&2
    fail=$((fail + 1))
  fi
  echo "e2b-suites: $pass passed, $fail failed"
  if [ "$fail" -ne 0 ]; then exit 1; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

step "server on 127.0.0.1:$port ($engine, owner $owner, log $log)"
server_env "$bin" server --port "$port" --backend "$engine" </dev/null >"$log" 2>&1 &
server=$!
if ! suite_wait_healthy "http://127.0.0.1:$port"; then
  echo "the server did not become healthy (its log follows)" >&2
  results+=("FAIL server startup")
  failed=1
  exit 1
fi

# Only what `colima-e2b env` prints configures the SDKs.
unset E2B_API_KEY E2B_API_URL E2B_SANDBOX_URL E2B_VOLUME_API_URL E2B_DOMAIN E2B_DEBUG E2B_ACCESS_TOKEN
envout=$(server_env "$bin" env --port "$port")
eval "$envout"
export E2B_API_KEY E2B_API_URL E2B_SANDBOX_URL E2B_VOLUME_API_URL E2B_DOMAIN
for k in E2B_API_KEY E2B_API_URL E2B_SANDBOX_URL E2B_VOLUME_API_URL E2B_DOMAIN; do
  [ -n "${!k:-}" ] || { echo "colima-e2b env did not set $k; it printed:" >&2; echo "$envout" >&2; exit 1; }
done
echo "E2B_API_URL=$E2B_API_URL E2B_SANDBOX_URL=$E2B_SANDBOX_URL E2B_DOMAIN=$E2B_DOMAIN" >&2

# ----------------------------------------------------------------------------- suites
if [ -n "${E2B_JUNIT_DIR:-}" ]; then
  mkdir -p "$E2B_JUNIT_DIR"
  reports=$(realpath "$E2B_JUNIT_DIR")
else
  reports=$(mktemp -d "${TMPDIR:-/tmp}/e2b-junit.XXXXXX")
fi
newest=${versions%% *}
for ver in $versions; do
  step "Python SDK e2b==$ver: tests/e2b (pytest.ini testpaths)"
  # The 50-create burst exercises the server's admission and pool, not the SDK (whose
  # create is one call in every version), and costs minutes of container deletion on
  # btrfs: it runs with the newest SDK only.
  only_newest=()
  [ "$ver" = "$newest" ] || only_newest=(--deselect test_sdk.py::test_burst_of_50_creates_all_succeed)
  if ! "${venv[$ver]}/bin/python" tests/e2b/check_sdk_api.py; then
    results+=("FAIL python e2b==$ver (the SDK lacks calls the suite makes: check_sdk_api.py)")
    failed=1
    continue
  fi
  set +e
  # shellcheck disable=SC2086
  (cd tests/e2b && "${venv[$ver]}/bin/python" -m pytest -q -p no:cacheprovider \
    --junitxml="$reports/junit-e2b-$ver.xml" -o junit_suite_name="e2b-$ver" \
    "${only_newest[@]}" ${PYTEST_ARGS:-})
  rc=$?
  set -e
  summary=$("${venv[$ver]}/bin/python" - "$reports/junit-e2b-$ver.xml" <<'EOF' 2>/dev/null || echo "no junit report"
import sys, xml.etree.ElementTree as ET
r = ET.parse(sys.argv[1]).getroot()
s = r if r.tag == "testsuite" else r.find("testsuite")
t, f, e, k = (int(s.get(a, 0)) for a in ("tests", "failures", "errors", "skipped"))
print(f"{t - f - e - k} passed, {f + e} failed, {k} skipped")
EOF
)
  if [ "$rc" -eq 0 ]; then
    results+=("PASS python e2b==$ver ($summary)")
  else
    results+=("FAIL python e2b==$ver ($summary, pytest exit $rc)")
    failed=1
  fi
done

if [ "${E2B_SKIP_JS:-0}" != 1 ]; then
  jsver=$(node -p 'require("./tests/e2b/js/node_modules/e2b/package.json").version')
  for js in smoke templates parity parity_files code_interpreter network persistence volumes; do
    step "JS SDK e2b@$jsver: tests/e2b/js/$js.mjs"
    if (cd tests/e2b/js && node "$js.mjs"); then
      results+=("PASS js e2b@$jsver $js")
    else
      results+=("FAIL js e2b@$jsver $js")
      failed=1
    fi
  done
fi
[ -n "${E2B_JUNIT_DIR:-}" ] || rm -rf "$reports"
exit "$failed"
