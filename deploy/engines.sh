#!/usr/bin/env bash
# Make Docker Engine and/or Podman answer on their standard sockets, installing them
# with apt-get when absent (Debian/Ubuntu, as root). Idempotent: an engine that already
# answers is left alone. Engines this script starts are recorded in /run/colima-e2b so
# that `deploy/engines.sh stop` stops only those.
#
#   deploy/engines.sh [docker] [podman]      start (default: both)
#   deploy/engines.sh stop [docker] [podman] stop what this script started
set -euo pipefail

log() { printf '[engines] %s\n' "$*" >&2; }
run_dir=/run/colima-e2b
docker_sock=/var/run/docker.sock
podman_sock=/run/podman/podman.sock

answers() { curl -fsS --max-time 2 --unix-socket "$1" http://localhost/_ping >/dev/null 2>&1; }

stop=false
if [ "${1:-}" = stop ]; then stop=true; shift; fi
want=("$@")
[ ${#want[@]} -eq 0 ] && want=(docker podman)

if $stop; then
  for e in "${want[@]}"; do
    pidfile=$run_dir/$e.pid
    [ -f "$pidfile" ] || continue
    pid=$(cat "$pidfile")
    if kill "$pid" 2>/dev/null; then
      log "stopping $e (pid $pid)"
      for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    fi
    rm -f "$pidfile"
  done
  exit 0
fi

install_packages() { # engines...
  local pkgs=() e
  for e in "$@"; do
    case "$e" in
      docker) command -v dockerd >/dev/null 2>&1 || pkgs+=(docker.io) ;;
      podman) command -v podman >/dev/null 2>&1 || pkgs+=(podman) ;;
    esac
  done
  command -v runc >/dev/null 2>&1 || pkgs+=(runc)
  command -v curl >/dev/null 2>&1 || pkgs+=(curl)
  [ ${#pkgs[@]} -eq 0 ] && return 0
  if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    log "missing: ${pkgs[*]}. Install them (or start Colima: \`colima start\`) and run again."
    exit 1
  fi
  log "installing ${pkgs[*]} with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
}

wait_for() { # socket name logfile
  for _ in $(seq 1 120); do
    if answers "$1"; then log "$2 is up at $1"; return 0; fi
    sleep 0.5
  done
  log "$2 did not come up at $1; last lines of $3:"
  tail -n 20 "$3" >&2 || true
  return 1
}

configure_podman() {
  # crun refuses the hybrid cgroup layout of these VMs and the default ulimits exceed
  # the hard limit; runc with cgroupfs works on this layout and on cgroup v2.
  local conf=/etc/containers/containers.conf
  grep -q 'colima-e2b' "$conf" 2>/dev/null && return 0
  mkdir -p /etc/containers
  cat >>"$conf" <<'CONF'
# colima-e2b: settings for hybrid-cgroup VMs
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=20000:20000"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
CONF
}

start() { # name socket logfile command...
  local name=$1 sock=$2 logfile=$3; shift 3
  if answers "$sock"; then log "$name already answers at $sock"; return 0; fi
  if [ "$(id -u)" -ne 0 ]; then
    log "$name does not answer at $sock and starting it needs root (or use Colima: \`colima start\`)"
    return 1
  fi
  mkdir -p "$run_dir" "$(dirname "$sock")"
  log "starting $name"
  setsid "$@" >"$logfile" 2>&1 </dev/null &
  echo $! >"$run_dir/$name.pid"
  wait_for "$sock" "$name" "$logfile"
}

missing=()
for e in "${want[@]}"; do
  case "$e" in
    docker) answers "$docker_sock" || missing+=(docker) ;;
    podman) answers "$podman_sock" || missing+=(podman) ;;
    *) log "unknown engine $e (docker or podman)"; exit 2 ;;
  esac
done
if [ ${#missing[@]} -gt 0 ]; then
  install_packages "${missing[@]}"
fi
for e in "${want[@]}"; do
  case "$e" in
    docker) start docker "$docker_sock" /tmp/colima-e2b-dockerd.log dockerd ;;
    podman) answers "$podman_sock" || configure_podman
            start podman "$podman_sock" /tmp/colima-e2b-podman.log \
              podman system service --time=0 "unix://$podman_sock" ;;
  esac
done
