# shellcheck shell=bash
# What the deploy/ suites that start a server of their own share (e2b-tests.sh,
# prometheus-check.sh, service-check.sh, ui-tests.sh, server-image.sh): the engine
# argument and its CLI, Debian packages, the builds, a free port, waiting for health,
# and stopping the server and removing everything its owner left on the engine.
# Sourced, after `cd` to the repository root; uses and sets the globals `engine`,
# `root`, `bin`, `owner`, `server`, `work` and `started_at`.

step() { printf '\n==> %s\n' "$*" >&2; }

# apt_install PACKAGE...: Debian packages, without recommends; the package lists are
# refreshed only when the install fails without it.
apt_install() {
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null 2>&1 ||
    { apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null; }
}

# suite_engine [docker|podman]: sets `engine` (default docker); exits 2 on anything else.
suite_engine() {
  engine=${1:-docker}
  case "$engine" in
    docker | podman) ;;
    *)
      echo "usage: $0 [docker|podman]" >&2
      exit 2
      ;;
  esac
}

# The engine's CLI on its standard socket: podman's local CLI may use another storage
# than the service (deploy/engines.sh starts it on a storage of its own).
engine_cli() {
  if [ "$engine" = podman ]; then podman --remote --url unix:///run/podman/podman.sock "$@"; else docker "$@"; fi
}

# Exits unless the engine answers on its socket.
suite_require_engine() {
  local sock=/var/run/docker.sock
  [ "$engine" = podman ] && sock=/run/podman/podman.sock
  if ! curl -fsS --max-time 5 --unix-socket "$sock" http://localhost/_ping >/dev/null 2>&1; then
    echo "$engine does not answer on $sock: run deploy/engines.sh $engine first" >&2
    exit 1
  fi
}

# suite_build NO_BUILD: builds the static agent and the server unless NO_BUILD is 1
# (then COLIMA_E2B_BIN or target/debug/colima-e2b, and COLIMA_E2B_AGENT_BINARY or the
# build-agent.sh output path, are used as they are); sets `bin`, exports the agent.
suite_build() {
  if [ "${1:-0}" = 1 ]; then
    export COLIMA_E2B_AGENT_BINARY=${COLIMA_E2B_AGENT_BINARY:-${CARGO_TARGET_DIR:-$root/target}/x86_64-unknown-linux-gnu/agent/sandbox-agent}
  else
    step "static agent and server"
    COLIMA_E2B_AGENT_BINARY=$(bash deploy/build-agent.sh)
    export COLIMA_E2B_AGENT_BINARY
    bash deploy/ui-assets.sh
    cargo build -p colima-e2b --quiet
  fi
  bin=${COLIMA_E2B_BIN:-${CARGO_TARGET_DIR:-$root/target}/debug/colima-e2b}
  bin=$(realpath "$bin")
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# suite_wait_healthy URL: waits (60 s at most) until URL/health answers while the server
# (`server`, a pid) runs; fails otherwise. Any answer counts: a server that wants a key
# answers 401, which is up.
suite_wait_healthy() {
  local code
  for _ in $(seq 1 300); do
    code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$1/health" 2>/dev/null || true)
    case "$code" in 200 | 401) return 0 ;; esac
    kill -0 "$server" 2>/dev/null || return 1
    sleep 0.2
  done
  return 1
}

# Stops `server` (SIGTERM, then SIGKILL after 10 s) and removes what `owner` left on
# the engine: the server leaves sandboxes running when it stops (its next start would
# re-adopt them, and this owner has none), and its volumes and egress rules.
suite_stop_and_clean() {
  local ids vols
  if [ -n "${server:-}" ]; then
    kill "$server" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$server" 2>/dev/null || break; sleep 0.2; done
    kill -9 "$server" 2>/dev/null || true
    wait "$server" 2>/dev/null || true
    server=
  fi
  ids=$(engine_cli ps -aq --filter "label=dev.colima-e2b.owner=$owner" 2>/dev/null)
  if [ -n "$ids" ]; then
    echo "removing $(echo "$ids" | wc -w) leftover container(s) of $owner" >&2
    # shellcheck disable=SC2086
    engine_cli rm -f $ids >/dev/null 2>&1 || true
  fi
  vols=$(engine_cli volume ls -q --filter "label=dev.colima-e2b.owner=$owner" 2>/dev/null)
  if [ -n "$vols" ]; then
    echo "removing $(echo "$vols" | wc -w) leftover volume(s) of $owner" >&2
    # shellcheck disable=SC2086
    engine_cli volume rm -f $vols >/dev/null 2>&1 || true
  fi
  # Its sandboxes' egress rules: a server keeps them through a stop and drops them at
  # its next start (sandbox_core::network::egress_table).
  nft delete table inet "colima_e2b_egress_$(printf %s "$owner" | sha256sum | cut -c1-10)" 2>/dev/null || true
}

# suite_finish NAME RC: the end of a suite's EXIT trap, after suite_stop_and_clean: on a
# failure the last lines of every log in `work`, then `work` removed and one line with
# the outcome and the time since `started_at`; exits RC.
suite_finish() {
  local name=$1 rc=$2 log
  if [ "$rc" -ne 0 ]; then
    for log in "$work"/*.log; do
      [ -f "$log" ] || continue
      echo "--- $(basename "$log") (last 60 lines) ---" >&2
      tail -n 60 "$log" >&2
    done
  fi
  rm -rf "$work"
  echo "$name: $([ "$rc" -eq 0 ] && echo passed || echo FAILED) in $(($(date +%s) - started_at)) s" >&2
  exit "$rc"
}
