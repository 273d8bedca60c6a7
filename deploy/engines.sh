#!/usr/bin/env bash
# Install (when absent) and start Docker Engine and Podman, then wait for their sockets.
# Idempotent: an engine that already answers is left alone.
# Usage: deploy/engines.sh [docker] [podman]   (default: both)
set -euo pipefail

want=("$@")
[ ${#want[@]} -eq 0 ] && want=(docker podman)

log() { printf '[engines] %s\n' "$*" >&2; }

need_pkgs=()
command -v dockerd >/dev/null 2>&1 || need_pkgs+=(docker.io)
command -v podman >/dev/null 2>&1 || need_pkgs+=(podman)
command -v runc >/dev/null 2>&1 || need_pkgs+=(runc)
[ -x /bin/busybox ] || need_pkgs+=(busybox-static)
command -v mmdebstrap >/dev/null 2>&1 || need_pkgs+=(mmdebstrap)
if [ ${#need_pkgs[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    log "missing packages: ${need_pkgs[*]}; run as root or install them yourself"
    exit 1
  fi
  log "installing ${need_pkgs[*]} (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
fi

wait_sock() { # $1 socket path, $2 name, $3 log file
  for _ in $(seq 1 120); do
    if curl -fsS --unix-socket "$1" http://localhost/_ping >/dev/null 2>&1; then
      log "$2 is up at $1"
      return 0
    fi
    sleep 0.5
  done
  log "$2 did not come up at $1; see $3"
  tail -n 20 "$3" >&2 || true
  return 1
}

start_docker() {
  if curl -fsS --unix-socket /var/run/docker.sock http://localhost/_ping >/dev/null 2>&1; then
    log "docker already running"
    return 0
  fi
  log "starting dockerd"
  setsid dockerd >/tmp/dockerd.log 2>&1 < /dev/null &
  wait_sock /var/run/docker.sock docker /tmp/dockerd.log
}

configure_podman() {
  # crun refuses the hybrid cgroup layout of these VMs and the default ulimits exceed
  # the hard limit; runc + cgroupfs work on both this layout and cgroup v2.
  local conf=/etc/containers/containers.conf
  if ! grep -q 'colima-e2b' "$conf" 2>/dev/null; then
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
  fi
}

start_podman() {
  if curl -fsS --unix-socket /run/podman/podman.sock http://localhost/_ping >/dev/null 2>&1; then
    log "podman already running"
    return 0
  fi
  configure_podman
  mkdir -p /run/podman
  log "starting podman system service"
  setsid podman system service --time=0 unix:///run/podman/podman.sock >/tmp/podman.log 2>&1 < /dev/null &
  wait_sock /run/podman/podman.sock podman /tmp/podman.log
}

for e in "${want[@]}"; do
  case "$e" in
    docker) start_docker ;;
    podman) start_podman ;;
    *) log "unknown engine $e"; exit 2 ;;
  esac
done
