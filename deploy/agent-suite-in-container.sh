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

status=0
for bin in "${binaries[@]}"; do
  printf '[agent-in-%s] %s\n' "$engine" "$(basename "$bin")" >&2
  # The tests find the agent at its build path, so the target dir is mounted read-only
  # at the same place.
  "$engine" run --rm \
    --cap-drop ALL --cap-add CHOWN --cap-add DAC_OVERRIDE --cap-add FOWNER \
    --cap-add SETUID --cap-add SETGID --cap-add KILL \
    --security-opt no-new-privileges --pids-limit 4096 --memory 2g \
    "${limits[@]}" \
    -v "$target:$target:ro" -w /tmp "$image" \
    "$bin" --test-threads 2 || status=1
done
exit $status
