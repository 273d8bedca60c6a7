#!/usr/bin/env bash
# The whole test suite on real engines. On a fresh Debian/Ubuntu machine (as root) it
# installs and starts Docker Engine and Podman, builds the template images offline
# (code-interpreter-v1 too, with wheels downloaded on the host) and the static agent,
# then runs formatting and lint checks, every unit test, both backends' conformance
# suites, the agent's suite, the server suites, the "Run as a service" checks (a real
# Prometheus, the systemd unit, the server's image, the dashboard in Chromium) and the
# official E2B SDK suites on Docker (every pinned version) and on Podman (the newest).
# Engines it had to start are stopped again at the end (KEEP_ENGINES=1 keeps them).
#
#   deploy/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*" >&2; }
started=()
for e in docker podman; do
  sock=/var/run/docker.sock; [ "$e" = podman ] && sock=/run/podman/podman.sock
  curl -fsS --max-time 2 --unix-socket "$sock" http://localhost/_ping >/dev/null 2>&1 || started+=("$e")
done
# The conformance suite derives small probe images that the backend trait cannot remove
# (and a check that fails leaves its probe volume).
remove_probe_images() {
  local e cli
  for e in docker podman; do
    cli=("$e"); [ "$e" = podman ] && cli=(podman --remote --url unix:///run/podman/podman.sock)
    "${cli[@]}" images --format '{{.Repository}}:{{.Tag}}' 2>/dev/null |
      grep 'colima-e2b-conformance/' | xargs -r "${cli[@]}" rmi -f >/dev/null 2>&1 || true
    "${cli[@]}" volume ls -q --filter label=dev.colima-e2b.conformance 2>/dev/null |
      xargs -r "${cli[@]}" volume rm -f >/dev/null 2>&1 || true
  done
}
cleanup() {
  remove_probe_images
  if [ "${KEEP_ENGINES:-0}" != 1 ] && [ ${#started[@]} -gt 0 ]; then
    bash deploy/engines.sh stop "${started[@]}" || true
  fi
}
trap cleanup EXIT

step "container engines"
bash deploy/engines.sh docker podman
step "template images (offline)"
bash deploy/images.sh docker podman
step "test tools"
python3 -c 'import websocket' 2>/dev/null || python3 -m pip install --quiet --disable-pip-version-check websocket-client
# The network tests' DNS server for test names (tests/src/testhosts.rs).
if ! command -v dnsmasq >/dev/null 2>&1; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends dnsmasq-base >/dev/null 2>&1 ||
    { apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends dnsmasq-base >/dev/null; }
fi
step "static agent, the dashboard's xterm.js"
bash deploy/ui-assets.sh
COLIMA_E2B_AGENT_BINARY=$(bash deploy/build-agent.sh)
export COLIMA_E2B_AGENT_BINARY
step "the code-interpreter-v1 template (offline build with the server's builder)"
cargo run --quiet -p colima-e2b -- prepare --backend docker
cargo run --quiet -p colima-e2b -- prepare --backend podman
step "format and lints"
cargo fmt --all --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
step "unit, agent, conformance (Docker and Podman) and server suites on Docker"
cargo build --workspace --all-targets --quiet
cargo test --workspace --no-fail-fast
# Docker only: on Podman with CNI an offline sandbox is a declared 501 (Unsupported).
step "schemathesis against the served OpenAPI document (Docker)"
bash deploy/schemathesis.sh docker
step "Run as a service (Docker): Prometheus, the unit, compose, the image, the dashboard"
bash deploy/prometheus-check.sh docker
bash deploy/service-check.sh docker
bash deploy/ui-tests.sh docker
step "the official E2B SDKs (Python, two pinned versions; JS) on Docker"
bash deploy/e2b-tests.sh docker
step "the agent's suite inside sandbox containers (Docker, Podman)"
bash deploy/agent-suite-in-container.sh docker
bash deploy/agent-suite-in-container.sh podman
step "server suites on Podman"
COLIMA_E2B_TEST_BACKEND=podman cargo test -p tests --no-fail-fast
step "Run as a service (Podman): Prometheus, the unit, the image, the dashboard"
bash deploy/prometheus-check.sh podman
bash deploy/service-check.sh podman
bash deploy/ui-tests.sh podman
# The older pinned SDK differs from the newest on the wire, not per engine: Docker runs
# every pinned version, Podman the newest (and the JS SDK).
step "the official E2B SDKs (newest Python, JS) on Podman"
newest=$(find tests/e2b -maxdepth 1 -name 'requirements-*.txt' -printf '%f\n' |
  sed -e 's/^requirements-//' -e 's/\.txt$//' | sort -rV | head -1)
E2B_SDK_VERSIONS=$newest bash deploy/e2b-tests.sh podman
step "all suites passed"
