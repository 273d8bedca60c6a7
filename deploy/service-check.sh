#!/usr/bin/env bash
# The README's "Run as a service" on a real engine, as far as this machine can run it:
#
#   1. the systemd unit: `systemd-analyze verify` (with this build as ExecStart), then
#      its ExecStart run with the unit's own Environment= lines (on a free port, a state
#      directory and owner of its own): it serves, a sandbox made through it outlives
#      KillSignal, the stop takes less than TimeoutStopSec and exits 0 (so
#      Restart=on-failure leaves a stopped service stopped), and a restart re-adopts the
#      sandbox. (No systemd runs here as PID 1, so systemctl itself is not exercised.)
#   2. deploy/compose.yaml parsed by docker-compose (its images cannot be pulled here);
#   3. the server's image: deploy/server-image.sh --check.
#
#   deploy/service-check.sh [docker|podman]
#
# Installs Debian's systemd (for systemd-analyze) and docker-compose when missing.
# Builds like e2b-tests.sh (SERVICE_CHECK_NO_BUILD=1 uses the existing builds).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
# shellcheck source=deploy/lib/suite.sh
. deploy/lib/suite.sh
suite_engine "${1:-docker}"
suite_require_engine
started_at=$(date +%s)
command -v systemd-analyze >/dev/null 2>&1 || { step "installing Debian's systemd (systemd-analyze)"; apt_install systemd; }
command -v docker-compose >/dev/null 2>&1 || docker compose version >/dev/null 2>&1 ||
  { step "installing Debian's docker-compose"; apt_install docker-compose; }
suite_build "${SERVICE_CHECK_NO_BUILD:-0}"

unit=deploy/systemd/colima-e2b.service
work=$(mktemp -d "${TMPDIR:-/tmp}/colima-e2b-service-check.XXXXXX")
owner="service-check-$$-$(date +%s)"
server=
# shellcheck disable=SC2317  # invoked by the EXIT trap
cleanup() {
  local rc=$?
  set +e
  suite_stop_and_clean
  suite_finish service-check "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ----------------------------------------------------------------------------- unit: verify
# It wants the ExecStart binary and the required unit to exist: checked with this build
# as ExecStart and, on podman, with the documented switch to podman.socket.
unit_dep=docker.service
[ "$engine" = podman ] && unit_dep=podman.socket
found=0
for d in /etc/systemd/system /lib/systemd/system /usr/lib/systemd/system; do
  [ -e "$d/$unit_dep" ] && found=1
done
if [ "$found" = 0 ]; then
  # The engine was not installed from a Debian package: a stand-in unit of that name.
  mkdir -p /run/systemd/system
  printf '[Unit]\nDescription=stand-in for %s (deploy/service-check.sh)\n[Service]\nExecStart=/bin/true\n' \
    "$unit_dep" >"/run/systemd/system/$unit_dep"
fi
step "systemd unit: systemd-analyze verify"
mkdir -p "$work/unit"
sed -e "s|^ExecStart=/usr/local/bin/colima-e2b |ExecStart=$bin |" -e "s|docker\.service|$unit_dep|g" \
  "$unit" >"$work/unit/colima-e2b.service"
# It exits 0 on lines it ignores (a misspelt value): any output is a failure.
verify=$(cd "$work/unit" && systemd-analyze verify colima-e2b.service 2>&1) || { echo "$verify" >&2; exit 1; }
[ -z "$verify" ] || { echo "systemd-analyze verify: $verify" >&2; exit 1; }

# ----------------------------------------------------------------------------- unit: run
# What systemd would run: ExecStart with the unit's Environment= lines; only the port,
# the state directory and the owner are this check's own.
mapfile -t unit_env < <(sed -n 's/^Environment=//p' "$unit")
exec_start=$(sed -n 's/^ExecStart=//p' "$unit")
stop_timeout=$(sed -n 's/^TimeoutStopSec=//p' "$unit")
kill_signal=$(sed -n 's/^KillSignal=//p' "$unit")
[ -n "$exec_start" ] && [ -n "$stop_timeout" ] && [ -n "$kill_signal" ] ||
  { echo "$unit lacks ExecStart, TimeoutStopSec or KillSignal" >&2; exit 1; }
read -r -a argv <<<"${exec_start/#\/usr\/local\/bin\/colima-e2b/$bin}"
port=$(free_port)
base="http://127.0.0.1:$port"
start_unit() {
  env -i PATH="$PATH" "${unit_env[@]}" COLIMA_E2B_STATE_DIR="$work/state" COLIMA_E2B_PORT="$port" \
    COLIMA_E2B_OWNER="$owner" COLIMA_E2B_BACKEND="$engine" COLIMA_E2B_POOL__BASE=0 \
    COLIMA_E2B_AGENT_BINARY="$COLIMA_E2B_AGENT_BINARY" "${argv[@]}" </dev/null >>"$work/server.log" 2>&1 &
  server=$!
  suite_wait_healthy "$base" || { echo "the unit's ExecStart did not serve" >&2; exit 1; }
}
api() { # method path [json]
  curl -fsS --max-time 120 -X "$1" -H 'Content-Type: application/json' ${3:+-d "$3"} "$base$2"
}
step "systemd unit: its ExecStart with its Environment (${unit_env[*]})"
start_unit
id=$(api POST /sandboxes '{"template":"base","timeout":300}' | python3 -c 'import json,sys; print(json.load(sys.stdin)["sandbox_id"])')
api POST "/sandboxes/$id/commands/run" '{"cmd":"echo ok"}' | grep -q '"stdout":"ok\\n"' || { echo "sandbox $id runs no command" >&2; exit 1; }
step "systemd unit: stop ($kill_signal, TimeoutStopSec=$stop_timeout)"
t0=$(date +%s)
kill "-${kill_signal#SIG}" "$server"
limit=${stop_timeout%s}
for _ in $(seq 1 $((limit * 5))); do kill -0 "$server" 2>/dev/null || break; sleep 0.2; done
if kill -0 "$server" 2>/dev/null; then echo "the server outlived TimeoutStopSec=$stop_timeout" >&2; exit 1; fi
set +e; wait "$server"; status=$?; set -e
server=
[ "$status" -eq 0 ] || { echo "a stopped server exits $status, which Restart=on-failure would restart" >&2; exit 1; }
echo "stopped in $(($(date +%s) - t0)) s, exit 0" >&2
[ "$(engine_cli inspect -f '{{.State.Running}}' "$(engine_cli ps -q --filter "label=dev.colima-e2b.owner=$owner" | head -1)" 2>/dev/null)" = true ] ||
  { echo "the sandbox did not outlive the stop" >&2; exit 1; }
step "systemd unit: started again, it re-adopts sandbox $id"
start_unit
api GET "/sandboxes/$id" | grep -q '"state":"running"' || { echo "sandbox $id was not re-adopted" >&2; exit 1; }
api DELETE "/sandboxes/$id" >/dev/null
suite_stop_and_clean

# ----------------------------------------------------------------------------- compose
step "deploy/compose.yaml: parsed (its images cannot be pulled here)"
if docker compose version >/dev/null 2>&1; then
  docker compose -f deploy/compose.yaml config -q
else
  docker-compose -f deploy/compose.yaml config -q
fi

# ----------------------------------------------------------------------------- image
step "the server's image (deploy/server-image.sh --check)"
SERVER_IMAGE_PROFILE=debug bash deploy/server-image.sh "$engine" --check
