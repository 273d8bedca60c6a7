#!/usr/bin/env bash
# The server's own container image, built offline: a small Debian rootfs (mmdebstrap from
# the machine's apt sources: ca-certificates, nftables for the host firewall, iproute2)
# with this checkout's server and static agent, imported into the engine as
# `colima-e2b:local` (what deploy/compose.yaml runs). No registry and no `docker build`.
#
#   deploy/server-image.sh [docker|podman] [--check]
#
# The binaries: the release build (SERVER_IMAGE_PROFILE=debug takes the debug build, as
# CI does), built when missing. --check then runs the image as documented and exercises
# it: a server in a container on the host's network with the engine socket and
# NET_ADMIN, a sandbox created and driven through its API, `docker stop` (a graceful
# stop that leaves the sandbox running), a second container on the same state volume that
# re-adopts it, and its kill. Sends traffic to 127.0.0.1 only; removes what it made.
#
# Running it (see the README's "Run as a service"):
#
#   docker run -d --name colima-e2b --network host --cap-add NET_ADMIN \
#     -v /var/run/docker.sock:/var/run/docker.sock -v colima-e2b-state:/var/lib/colima-e2b \
#     colima-e2b:local
#
# RISK: the engine socket is root on the host; whoever controls the server (or its key)
# controls the machine. The server never hands the socket to a sandbox.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
# shellcheck source=deploy/lib/suite.sh
. deploy/lib/suite.sh
engine=docker
check=0
for a in "$@"; do
  case "$a" in
    --check) check=1 ;;
    *) suite_engine "$a" ;;
  esac
done
suite_require_engine
log() { printf '[server-image] %s\n' "$*" >&2; }
image=colima-e2b:local
cache=${COLIMA_E2B_CACHE:-/var/cache/colima-e2b}
packages=ca-certificates,nftables,iproute2
recipe=$(printf '%s\n' bookworm "$packages" | sha256sum | cut -c1-12)
rootfs=$cache/server-rootfs-$recipe.tar

# ----------------------------------------------------------------------------- binaries
profile=${SERVER_IMAGE_PROFILE:-release}
target=${CARGO_TARGET_DIR:-$root/target}
bin=$target/$profile/colima-e2b
agent=$(bash deploy/build-agent.sh)
bash deploy/ui-assets.sh
if [ "$profile" = release ]; then
  log "building the server (release)"
  cargo build --release -p colima-e2b --quiet
elif [ ! -x "$bin" ]; then
  cargo build -p colima-e2b --quiet
fi

# ----------------------------------------------------------------------------- rootfs
if [ ! -s "$rootfs" ]; then
  if ! command -v mmdebstrap >/dev/null; then
    log "installing mmdebstrap with apt-get"
    apt_install mmdebstrap
  fi
  mkdir -p "$cache"
  rm -f "$cache"/server-rootfs-*.tar
  log "building the server's Debian rootfs ($packages; cached in $rootfs)"
  mmdebstrap --quiet --variant=essential --include="$packages" \
    --customize-hook='rm -rf "$1/var/cache/apt/archives"/*.deb "$1/var/lib/apt/lists"/*' \
    bookworm "$cache/server-rootfs-partial.tar" >&2
  mv "$cache/server-rootfs-partial.tar" "$rootfs"
fi

# ----------------------------------------------------------------------------- image
work=$(mktemp -d "${TMPDIR:-/tmp}/colima-e2b-server-image.XXXXXX")
owner="image-check-$$-$(date +%s)"
server=
containers=()
# shellcheck disable=SC2317  # invoked by the EXIT trap
cleanup() {
  local rc=$?
  set +e
  if [ ${#containers[@]} -gt 0 ]; then
    [ "$rc" -ne 0 ] && engine_cli logs "${containers[-1]}" 2>&1 | tail -40 >&2
    engine_cli rm -f "${containers[@]}" >/dev/null 2>&1
  fi
  [ "$check" = 1 ] && suite_stop_and_clean
  engine_cli volume rm -f "$owner-state" >/dev/null 2>&1
  rm -rf "$work"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

cp "$rootfs" "$work/image.tar"
mkdir -p "$work/add/usr/local/bin" "$work/add/usr/local/lib/colima-e2b" "$work/add/var/lib/colima-e2b"
install -m 0755 "$bin" "$work/add/usr/local/bin/colima-e2b"
install -m 0755 "$agent" "$work/add/usr/local/lib/colima-e2b/sandbox-agent"
# Only what is new: a second entry for a directory the rootfs has is refused on import.
tar --append -f "$work/image.tar" -C "$work/add" --owner=0 --group=0 --no-recursion \
  ./usr/local/bin/colima-e2b ./usr/local/lib/colima-e2b ./usr/local/lib/colima-e2b/sandbox-agent \
  ./var/lib/colima-e2b
quiet=(); [ "$engine" = podman ] && quiet=(--quiet)
log "importing $image into $engine ($profile build, $(du -h "$work/image.tar" | cut -f1))"
engine_cli import "${quiet[@]}" \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV COLIMA_E2B_AGENT_BINARY=/usr/local/lib/colima-e2b/sandbox-agent' \
  --change 'ENV COLIMA_E2B_STATE_DIR=/var/lib/colima-e2b' \
  --change "ENV COLIMA_E2B_BACKEND=$engine" \
  --change 'ENV HOME=/root' \
  --change 'ENTRYPOINT ["/usr/local/bin/colima-e2b"]' \
  --change 'CMD ["server"]' \
  --change "LABEL dev.colima-e2b.server-rootfs=$recipe" \
  "$work/image.tar" "$image" >/dev/null
log "built $image"
[ "$check" = 1 ] || exit 0

# ----------------------------------------------------------------------------- check
sock=/var/run/docker.sock
[ "$engine" = podman ] && sock=/run/podman/podman.sock
port=$(free_port)
base="http://127.0.0.1:$port"
run_server() { # name
  containers+=("$1")
  engine_cli run -d --name "$1" --network host --cap-add NET_ADMIN \
    -v "$sock:$sock" -v "$owner-state:/var/lib/colima-e2b" \
    -e COLIMA_E2B_OWNER="$owner" -e COLIMA_E2B_PORT="$port" -e COLIMA_E2B_POOL__BASE=0 \
    "$image" >/dev/null
  for _ in $(seq 1 300); do
    curl -fsS --max-time 2 "$base/health" >/dev/null 2>&1 && return 0
    [ "$(engine_cli inspect -f '{{.State.Running}}' "$1" 2>/dev/null)" = true ] || { log "the server's container exited"; return 1; }
    sleep 0.2
  done
  return 1
}
api() { # method path [json]
  curl -fsS --max-time 120 -X "$1" -H "Authorization: Bearer $key" -H 'Content-Type: application/json' \
    ${3:+-d "$3"} "$base$2"
}
log "check: the image as a server on 127.0.0.1:$port"
run_server "$owner-1" || exit 1
# The host firewall works from inside (nft in the image, NET_ADMIN, the host's netns).
curl -fsS "$base/health" | python3 -c '
import json, sys
checks = {c["name"]: c for c in json.load(sys.stdin)["checks"]}
policy = checks.get("network_policy", {})
sys.exit(0 if policy.get("status") == "ok" else "network_policy: %s" % policy)'
key=$(engine_cli exec "$owner-1" colima-e2b env | sed -n 's/^export E2B_API_KEY=//p' | tr -d "'\"")
[ -n "$key" ] || { log "colima-e2b env in the container printed no key"; exit 1; }
id=$(api POST /sandboxes '{"template":"base","timeout":300}' | python3 -c 'import json,sys; print(json.load(sys.stdin)["sandbox_id"])')
out=$(api POST "/sandboxes/$id/commands/run" '{"cmd":"echo from-$(whoami)"}')
case "$out" in *'"stdout":"from-user\n"'*) ;; *) log "unexpected command answer: $out"; exit 1 ;; esac
log "check: sandbox $id runs commands; stopping the server's container (SIGTERM)"
engine_cli stop -t 30 "$owner-1" >/dev/null
engine_cli logs "$owner-1" 2>&1 | grep -q 'sandboxes keep running' ||
  { log "the server did not stop gracefully"; exit 1; }
[ "$(engine_cli ps -q --filter "label=dev.colima-e2b.owner=$owner" | wc -l)" -ge 1 ] ||
  { log "the sandbox did not outlive the server's graceful stop"; exit 1; }
log "check: a new container on the same state re-adopts it"
run_server "$owner-2" || exit 1
api GET "/sandboxes/$id" | grep -q '"state":"running"' || { log "sandbox $id was not re-adopted"; exit 1; }
api POST "/sandboxes/$id/commands/run" '{"cmd":"echo again"}' | grep -q again || { log "the re-adopted sandbox does not run commands"; exit 1; }
api DELETE "/sandboxes/$id" >/dev/null
log "check passed: $image serves, stops gracefully and re-adopts its sandboxes"
