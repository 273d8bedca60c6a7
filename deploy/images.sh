#!/usr/bin/env bash
# Build the default template images offline (no registry needed) and load them into
# every running engine. Idempotent: an engine that already has an image of the current
# recipe is skipped; one of an older recipe is replaced.
#
#   deploy/images.sh [docker] [podman]    (default: every engine that answers)
#
# base   - what E2B's base template offers, on Debian bookworm: bash, python3 with pip,
#          venv and the `python` name, node and npm, git, curl, wget, procps, coreutils,
#          ca-certificates, less, unzip, xz, passwd (useradd, for templates' USER
#          steps), iproute2 (`ss`, for the SDKs' wait_for_port); the user `user` (uid
#          1000, home /home/user, in group `sudo`). `sudo` is the sandbox agent's (no setuid binary: see the
#          README's Templates section). pip may install outside a venv (as E2B's).
# python - the seed's example template name; the same rootfs.
#
# The rootfs tarball is cached in ${COLIMA_E2B_CACHE:-/var/cache/colima-e2b}, under a
# name that hashes the recipe, so a changed recipe builds anew.
set -euo pipefail

log() { printf '[images] %s\n' "$*" >&2; }
cache=${COLIMA_E2B_CACHE:-/var/cache/colima-e2b}
images=(colima-e2b/base:latest colima-e2b/python:latest)
packages=bash,coreutils,procps,passwd,iproute2,ca-certificates,python3-minimal,python3,python3-pip,python3-venv,python-is-python3,nodejs,npm,git,curl,wget,less,unzip,xz-utils
hooks=(
  # The essential variant has no passwd tools, so the user is written directly.
  'echo "user:x:1000:1000:user:/home/user:/bin/bash" >> "$1/etc/passwd"'
  'echo "user:x:1000:" >> "$1/etc/group"'
  'sed -i -E "s/^(sudo:[^:]*:[0-9]+:)\$/\\1user/" "$1/etc/group" && grep -q "^sudo:.*:user\$" "$1/etc/group"'
  'echo "user:*:19000:0:99999:7:::" >> "$1/etc/shadow" && chmod 0640 "$1/etc/shadow"'
  'mkdir -p "$1/home/user" && chown 1000:1000 "$1/home/user" && chmod 755 "$1/home/user"'
  # As in E2B's base: `pip install` works outside a venv (for `user`: into ~/.local).
  'rm -f "$1"/usr/lib/python3*/EXTERNALLY-MANAGED'
  'rm -rf "$1/var/cache/apt/archives"/*.deb "$1/var/lib/apt/lists"/*'
)
recipe=$(printf '%s\n' bookworm "$packages" "${hooks[@]}" | sha256sum | cut -c1-12)
tarball=$cache/base-rootfs-$recipe.tar
recipe_label=dev.colima-e2b.template-recipe

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

missing_in() { # engine -> prints images the engine lacks (or has of another recipe)
  local e=$1 img have
  for img in "${images[@]}"; do
    have=$(cli "$e" image inspect --format "{{ index .Config.Labels \"$recipe_label\" }}" "$img" 2>/dev/null) || have=none
    case "$have" in
      "$recipe") ;;
      none) echo "$img" ;;
      '<no value>') log "$e has $img of an older recipe; replacing it"; echo "$img" ;;
      *) log "$e has $img of another recipe (${have:-unlabelled}); replacing it"; echo "$img" ;;
    esac
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
  rm -f "$cache"/base-rootfs*.tar "$cache/partial.tar" # older recipes
  log "building the Debian rootfs with mmdebstrap (recipe $recipe; 1-3 min: python, node, git; cached in $tarball)"
  local args=() h
  for h in "${hooks[@]}"; do args+=(--customize-hook="$h"); done
  # Progress: mmdebstrap's phases, one line each; the whole log stays in the cache.
  set +e
  mmdebstrap --verbose --variant=essential --include="$packages" "${args[@]}" \
    bookworm "$cache/partial.tar" 2>&1 | tee "$cache/mmdebstrap.log" |
    grep --line-buffered -E '^I: (running|downloading|extracting|installing|creating|cleaning|success)' |
    sed -u 's/^/[images]   /' >&2
  local rc=${PIPESTATUS[0]}
  set -e
  if [ "$rc" -ne 0 ] || [ ! -s "$cache/partial.tar" ]; then
    tail -20 "$cache/mmdebstrap.log" >&2
    log "mmdebstrap failed (exit $rc; log: $cache/mmdebstrap.log): it needs the machine's apt sources"
    rm -f "$cache/partial.tar"
    exit 1
  fi
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
      --change "LABEL $recipe_label=$recipe" \
      "$tarball" "$img" >/dev/null
  done
done
log "templates ready: ${images[*]}"
