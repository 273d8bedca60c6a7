#!/usr/bin/env bash
# Template build times through colima-e2b next to the engine's own build of the same
# Dockerfile and context, in one run: a three-step template (RUN, COPY, ENV) on the base
# image, cold (no cache) and cached (unchanged), per engine. Prints medians and the ratio
# to the engine floor.
#
#   deploy/template-bench.sh [N] [docker] [podman]     (N iterations, default 3)
#
# Needs the engines running (deploy/engines.sh), the base image (deploy/images.sh), the
# static agent and a colima-e2b build (COLIMA_E2B_BIN, default target/release/colima-e2b).
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-3}
shift || true
engines=("$@")
[ ${#engines[@]} -gt 0 ] || engines=(docker podman)
bin=$(realpath "${COLIMA_E2B_BIN:-${CARGO_TARGET_DIR:-target}/release/colima-e2b}")
export COLIMA_E2B_AGENT_BINARY=${COLIMA_E2B_AGENT_BINARY:-$(bash deploy/build-agent.sh)}
work=$(mktemp -d)
trap 'kill "${server:-0}" 2>/dev/null || true; rm -rf "$work"' EXIT

mkdir -p "$work/ctx"
printf 'bench data\n' >"$work/ctx/data.txt"
printf 'FROM colima-e2b/base:latest\nRUN echo bench > /tmp/bench\nCOPY data.txt /home/user/data.txt\nENV BENCH=1\n' \
  >"$work/ctx/Dockerfile"

now() { date +%s.%N; }
since() { awk -v a="$(now)" -v b="$1" 'BEGIN { print a - b }'; }
median() { sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
engine_cli() {
  if [ "$1" = podman ]; then echo "podman --remote --url unix:///run/podman/podman.sock"; else echo docker; fi
}

printf '%-8s %-7s %12s %12s %7s\n' engine build colima-e2b engine ratio
for engine in "${engines[@]}"; do
  cli=$(engine_cli "$engine")
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  export COLIMA_E2B_OWNER="tbench-$$" COLIMA_E2B_STATE_DIR="$work/state-$engine" COLIMA_E2B_PORT=$port
  "$bin" server --backend "$engine" >"$work/server-$engine.log" 2>&1 &
  server=$!
  for _ in $(seq 100); do curl -fs "localhost:$port/health" >/dev/null 2>&1 && break; sleep 0.2; done
  declare -A times=()
  for i in $(seq "$n"); do
    # Cold: nothing cached (the engine's own cache is bypassed on both sides).
    t=$(now); "$bin" template build "bench-$i" --no-cache "$work/ctx" >/dev/null 2>&1
    times[ours_cold]+="$(since "$t") "
    t=$(now); "$bin" template build "bench-$i" "$work/ctx" >/dev/null 2>&1
    times[ours_cached]+="$(since "$t") "
    t=$(now); DOCKER_BUILDKIT=0 $cli build -q --no-cache -t "colima-e2b-bench/floor:$i" "$work/ctx" >/dev/null
    times[raw_cold]+="$(since "$t") "
    t=$(now); DOCKER_BUILDKIT=0 $cli build -q -t "colima-e2b-bench/floor:$i" "$work/ctx" >/dev/null
    times[raw_cached]+="$(since "$t") "
    "$bin" template rm "bench-$i" >/dev/null
    $cli rmi -f "colima-e2b-bench/floor:$i" >/dev/null 2>&1 || true
  done
  for kind in cold cached; do
    ours=$(tr ' ' '\n' <<<"${times[ours_$kind]}" | grep . | median)
    raw=$(tr ' ' '\n' <<<"${times[raw_$kind]}" | grep . | median)
    printf '%-8s %-7s %10.2f s %10.2f s %6.2fx\n' "$engine" "$kind" "$ours" "$raw" "$(awk -v a="$ours" -v b="$raw" 'BEGIN { print a / b }')"
  done
  kill "$server"
  wait "$server" 2>/dev/null || true
  server=
  unset times
done
