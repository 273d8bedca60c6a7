#!/usr/bin/env bash
# Runs the agent's own test suite inside a real sandbox container, with the sandbox
# profile (capabilities dropped to the agent's set, no-new-privileges, pids limit), so
# the agent is exercised on the engine's kernel namespaces, cgroups and seccomp rather
# than only as a host process. The template image's glibc must match the host's (Debian
# bookworm here), since the test binaries are the host's.
#
#   deploy/agent-suite-in-container.sh [docker|podman]   (default docker)
set -euo pipefail
cd "$(dirname "$0")/.."
engine=${1:-docker}
# The engine's CLI on its standard socket: podman's local CLI may use another storage
# than the service (deploy/engines.sh starts it on a storage of its own).
engine_cli() {
  if [ "$engine" = podman ]; then podman --remote --url unix:///run/podman/podman.sock "$@"; else docker "$@"; fi
}
image=${COLIMA_E2B_TEST_IMAGE:-colima-e2b/base:latest}
target=${CARGO_TARGET_DIR:-$PWD/target}
target=$(cd "$target" && pwd)

# The test executables, built as usual (cargo prints their paths as JSON).
mapfile -t binaries < <(cargo test -p sandbox-agent --no-run --message-format=json 2>/dev/null \
  | python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["executable"])')
[ ${#binaries[@]} -gt 0 ] || { echo "no agent test binaries found" >&2; exit 1; }

# Podman's CLI (4.3 with runc) cannot set rlimits once capabilities are dropped; its
# defaults from containers.conf apply there.
limits=()
[ "$engine" = docker ] && limits=(--ulimit nofile=8192:8192)

# One sandbox: the tests find the agent at its build path, so the target dir is mounted
# read-only at the same place. A 1 MiB tmpfs is the full disk the spill tests need (the
# sandbox cannot mount one itself).
sandbox() {
  local pids=$1
  shift
  engine_cli run --rm \
    --cap-drop ALL --cap-add CHOWN --cap-add DAC_OVERRIDE --cap-add FOWNER \
    --cap-add SETUID --cap-add SETGID --cap-add KILL \
    --security-opt no-new-privileges --pids-limit "$pids" --memory 2g \
    "${limits[@]}" \
    --tmpfs /spill-tiny:rw,size=1m -e COLIMA_E2B_TEST_TINY_FS=/spill-tiny \
    -v "$target:$target:ro" -w /tmp "$image" \
    "$@"
}

status=0
for bin in "${binaries[@]}"; do
  printf '[agent-in-%s] %s\n' "$engine" "$(basename "$bin")" >&2
  sandbox 4096 "$bin" --test-threads 2 || status=1
  # The fork bomb fills its sandbox's pids limit, so it runs alone, in a sandbox of its
  # own with a small limit (the test refuses to run where pids.max is not small).
  ignored=$("$bin" --list --ignored 2>/dev/null || true)
  if grep -q '^fork_bomb_is_stopped' <<<"$ignored"; then
    printf '[agent-in-%s] %s: fork bomb, --pids-limit 512\n' "$engine" "$(basename "$bin")" >&2
    sandbox 512 "$bin" --ignored --exact \
      fork_bomb_is_stopped_and_starting_at_the_process_limit_is_resource_exhausted \
      --test-threads 1 || status=1
  fi
done
exit $status
