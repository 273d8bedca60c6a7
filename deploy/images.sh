#!/usr/bin/env bash
# Build the default template images offline (no registry needed) and load them into
# every running engine. Idempotent: an engine that already has an image is skipped.
#
#   deploy/images.sh [docker] [podman]    (default: every engine that answers)
#
# base   - Debian bookworm with bash, python3, coreutils, procps and the user `user`
#          (uid 1000, home /home/user): E2B's default template name.
# python - the seed's example template name; the same rootfs (python3 is included).
#
# The rootfs tarball is cached in ${COLIMA_E2B_CACHE:-/var/cache/colima-e2b}.
set -euo pipefail

log() { printf '[images] %s\n' "$*" >&2; }
cache=${COLIMA_E2B_CACHE:-/var/cache/colima-e2b}
tarball=$cache/base-rootfs.tar
images=(colima-e2b/base:latest colima-e2b/python:latest)

engines=("$@")
if [ ${#engines[@]} -eq 0 ]; then
  curl -fsS --unix-socket /var/run/docker.sock http://localhost/_ping >/dev/null 2>&1 && engines+=(docker)
  curl -fsS --unix-socket /run/podman/podman.sock http://localhost/_ping >/dev/null 2>&1 && engines+=(podman)
fi
if [ ${#engines[@]} -eq 0 ]; then
  log "no engine answers; run deploy/engines.sh first"
  exit 1
fi

# The CLIs talk to the engines' sockets, so images land in the storage the running
# service uses (deploy/engines.sh may start podman on a storage of its own).
cli() { # engine args...
  local e=$1; shift
  case "$e" in
    podman) podman --remote --url unix:///run/podman/podman.sock "$@" ;;
    *) "$e" "$@" ;;
  esac
}

missing_in() { # engine -> prints images the engine lacks
  local e=$1 img
  for img in "${images[@]}"; do
    cli "$e" image inspect "$img" >/dev/null 2>&1 || echo "$img"
  done
}

build_rootfs() {
  [ -s "$tarball" ] && return 0
  if ! command -v mmdebstrap >/dev/null; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
      log "installing mmdebstrap with apt-get"
      apt-get update -qq >/dev/null
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends mmdebstrap >/dev/null
    else
      log "mmdebstrap is missing: install it (apt-get install mmdebstrap), or pull the templates from a registry"
      exit 1
    fi
  fi
  mkdir -p "$cache"
  log "building the Debian rootfs with mmdebstrap (about 30 s; cached in $tarball)"
  # The essential variant has no passwd tools, so the user is written directly.
  mmdebstrap --quiet --variant=essential \
    --include=bash,python3-minimal,python3,procps,coreutils,ca-certificates \
    --customize-hook='echo "user:x:1000:1000:user:/home/user:/bin/bash" >> "$1/etc/passwd"' \
    --customize-hook='echo "user:x:1000:" >> "$1/etc/group"' \
    --customize-hook='echo "user:*:19000:0:99999:7:::" >> "$1/etc/shadow" && chmod 0640 "$1/etc/shadow"' \
    --customize-hook='mkdir -p "$1/home/user" && chown 1000:1000 "$1/home/user" && chmod 755 "$1/home/user"' \
    --customize-hook='rm -rf "$1/var/cache/apt/archives"/*.deb "$1/var/lib/apt/lists"/*' \
    bookworm "$cache/partial.tar"
  mv "$cache/partial.tar" "$tarball"
}

for e in "${engines[@]}"; do
  mapfile -t missing < <(missing_in "$e")
  if [ ${#missing[@]} -eq 0 ]; then
    log "$e already has ${images[*]}"
    continue
  fi
  build_rootfs
  for img in "${missing[@]}"; do
    log "importing $img into $e"
    quiet=(); [ "$e" = podman ] && quiet=(--quiet)
    cli "$e" import "${quiet[@]}" \
      --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
      --change 'WORKDIR /home/user' \
      --change 'CMD ["sleep","infinity"]' \
      "$tarball" "$img" >/dev/null
  done
done
log "templates ready: ${images[*]}"
