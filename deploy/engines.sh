#!/usr/bin/env bash
# Make Docker Engine and/or Podman answer on their standard sockets, installing them
# with apt-get when absent (Debian/Ubuntu, as root). Idempotent: an engine that already
# answers is left alone. Engines this script starts are recorded in /run/colima-e2b so
# that `deploy/engines.sh stop` stops only those.
#
# An engine this script starts gets its data root on a quota-capable filesystem in a
# sparse loop file (deploy/storage.sh: XFS with project quotas for the overlay drivers,
# else btrfs with qgroups for the btrfs drivers), so that per-sandbox disk quotas
# (`--storage-opt size=`) work: dockerd --data-root /var/lib/colima-e2b/docker, podman
# graphroot /var/lib/colima-e2b/podman (CONTAINERS_STORAGE_CONF=
# /var/lib/colima-e2b/podman-storage.conf; or use `podman --remote`). An engine that
# already answers keeps its own storage. COLIMA_E2B_QUOTA_STORAGE=off starts them on
# their default data roots instead, as does a machine where neither filesystem works.
#
#   deploy/engines.sh [docker] [podman]      start (default: both)
#   deploy/engines.sh stop [docker] [podman] stop what this script started
set -euo pipefail

log() { printf '[engines] %s\n' "$*" >&2; }
run_dir=/run/colima-e2b
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
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
      for _ in $(seq 1 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
      kill -0 "$pid" 2>/dev/null && log "$e (pid $pid) is still running after 30 s"
    fi
    rm -f "$pidfile"
  done
  exit 0
fi

quota_storage_on() { case "${COLIMA_E2B_QUOTA_STORAGE:-on}" in off|0|false|no) return 1 ;; esac; }

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
  # The server's host firewall for sandbox networks (sandbox_core::network::firewall).
  command -v nft >/dev/null 2>&1 || pkgs+=(nftables)
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1 && quota_storage_on; then # deploy/storage.sh
    command -v mkfs.xfs >/dev/null 2>&1 || pkgs+=(xfsprogs)
    command -v mkfs.btrfs >/dev/null 2>&1 || pkgs+=(btrfs-progs)
  fi
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

# Quota-capable storage for an engine about to be started: prints its mount point,
# or nothing (default data root) when it is turned off or cannot be prepared.
quota_storage() { # name
  quota_storage_on && [ "$(id -u)" -eq 0 ] || return 0
  local dir
  if dir=$("$here/storage.sh" "$1"); then
    echo "$dir"
  else
    log "no quota-capable storage for $1; it starts on its default data root (no disk quotas)"
  fi
}

storage_driver() { # mount point -> the graph driver for its filesystem (docker's name)
  case "$(findmnt -n -o FSTYPE --mountpoint "$1")" in
    btrfs) echo btrfs ;;
    *) echo overlay2 ;;
  esac
}

podman_storage_conf() { # graphroot driver -> path of a storage.conf for it
  local conf=/var/lib/colima-e2b/podman-storage.conf
  cat >"$conf.tmp" <<CONF
# colima-e2b: podman storage with quota support (written by deploy/engines.sh)
[storage]
driver = "$2"
graphroot = "$1"
runroot = "$run_dir/podman-storage"
CONF
  mv "$conf.tmp" "$conf"
  echo "$conf"
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
    docker) cmd=(dockerd)
            if ! answers "$docker_sock"; then
              root=$(quota_storage docker)
              if [ -n "$root" ] && grep -qsE '"(data-root|storage-driver)"' /etc/docker/daemon.json; then
                log "/etc/docker/daemon.json sets data-root or storage-driver; dockerd keeps them"
              elif [ -n "$root" ]; then
                driver=$(storage_driver "$root")
                log "docker data root: $root (storage driver $driver)"
                cmd+=(--data-root "$root" --storage-driver "$driver")
              fi
            fi
            start docker "$docker_sock" /tmp/colima-e2b-dockerd.log "${cmd[@]}" ;;
    podman) cmd=(podman)
            if ! answers "$podman_sock"; then
              configure_podman
              root=$(quota_storage podman)
              if [ -n "$root" ]; then
                driver=$(storage_driver "$root"); [ "$driver" = overlay2 ] && driver=overlay
                conf=$(podman_storage_conf "$root" "$driver")
                log "podman graphroot: $root (driver $driver, CONTAINERS_STORAGE_CONF=$conf)"
                # A tmpdir of its own, so that it never shares state with a podman
                # on the default storage (its /run/libpod).
                cmd=(env "CONTAINERS_STORAGE_CONF=$conf" podman --tmpdir "$run_dir/libpod")
              fi
            fi
            start podman "$podman_sock" /tmp/colima-e2b-podman.log \
              "${cmd[@]}" system service --time=0 "unix://$podman_sock" ;;
  esac
done
