#!/usr/bin/env bash
# Pause, resume, snapshot and fork times of a sandbox holding 100 MB of files, and
# volume times (create, a create that mounts one, the content API's first request and a
# 100 MB read, delete), through colima-e2b's native and volume content APIs, next to the
# engine's own calls on plain containers of the same image holding the same files, in
# one run. Prints medians and the ratio to the engine floor.
#
#   deploy/persistence-bench.sh [N] [docker] [podman]     (N iterations, default 3)
#
# Floors: pause/resume with memory = `pause` + `unpause`; a filesystem pause = `kill`
# (+ waiting until it stopped); its resume = `start`; a snapshot = `commit`; a fork of
# 3 = one `commit` + 3 x (`run -d` of the commit). colima-e2b's resume from the
# filesystem also waits for the agent, and a fork's sandboxes answer a command.
# Volumes: `volume create`; `run -d -v` + `exec true`; the content API's first request
# (a keeper container starts) = `run -d -v` + `exec stat`; a 100 MB read = `exec cat`;
# delete = `volume rm`.
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
floor=colima-e2b-pbench-floor-$$
cleanup() {
  kill "${server:-0}" 2>/dev/null || true
  for e in "${engines[@]}"; do
    cli=$(engine_cli "$e")
    $cli rm -f "$floor" >/dev/null 2>&1 || true
    $cli ps -aq --filter "label=colima-e2b-pbench=$$" | xargs -r $cli rm -f >/dev/null 2>&1 || true
    $cli images -q "colima-e2b-pbench/floor" | xargs -r $cli rmi -f >/dev/null 2>&1 || true
    $cli volume ls -q --filter "label=colima-e2b-pbench=$$" | xargs -r $cli volume rm -f >/dev/null 2>&1 || true
    $cli volume ls -q --filter "label=dev.colima-e2b.owner=pbench-$$" | xargs -r $cli volume rm -f >/dev/null 2>&1 || true
  done
  rm -rf "$work"
}
trap cleanup EXIT

now() { date +%s.%N; }
since() { awk -v a="$(now)" -v b="$1" 'BEGIN { print a - b }'; }
median() { sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
engine_cli() {
  if [ "$1" = podman ]; then echo "podman --remote --url unix:///run/podman/podman.sock"; else echo docker; fi
}
json() { python3 -c "import json,sys; v=json.load(sys.stdin); print($1)"; }
fill='head -c 104857600 /dev/urandom > /home/user/fill.bin && sync'
fillv='head -c 104857600 /dev/urandom > /mnt/v/fill.bin && sync'

printf '%-8s %-22s %10s %10s %7s\n' engine operation colima-e2b engine ratio
for engine in "${engines[@]}"; do
  cli=$(engine_cli "$engine")
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  export COLIMA_E2B_OWNER="pbench-$$" COLIMA_E2B_STATE_DIR="$work/state-$engine" COLIMA_E2B_PORT=$port
  COLIMA_E2B_POOL__BASE=0 "$bin" server --backend "$engine" >"$work/server-$engine.log" 2>&1 &
  server=$!
  for _ in $(seq 100); do curl -fs "localhost:$port/health" >/dev/null 2>&1 && break; sleep 0.2; done
  api="http://localhost:$port"
  post() { curl -fsS -X POST "$api$1" -H 'Content-Type: application/json' -d "${2:-{\}}"; }
  declare -A times=()

  # colima-e2b: one sandbox with 100 MB of files.
  id=$(post /sandboxes/ '{"template": "base", "timeout": 3600}' | json 'v["sandbox_id"]')
  post "/sandboxes/$id/commands/run" "{\"cmd\": \"$fill\", \"timeout\": 120}" >/dev/null
  # The floor: a plain container of the same image, same files.
  $cli run -d --name "$floor" --label "colima-e2b-pbench=$$" --entrypoint sleep colima-e2b/base:latest infinity >/dev/null
  $cli exec "$floor" sh -c "mkdir -p /home/user && $fill"
  for i in $(seq "$n"); do
    t=$(now); post "/sandboxes/$id/pause" >/dev/null; times[ours_pause_mem]+="$(since "$t") "
    t=$(now); post "/sandboxes/$id/resume" >/dev/null; times[ours_resume_mem]+="$(since "$t") "
    t=$(now); post "/sandboxes/$id/pause?keep_memory=false" >/dev/null; times[ours_pause_fs]+="$(since "$t") "
    t=$(now); post "/sandboxes/$id/resume" >/dev/null; times[ours_resume_fs]+="$(since "$t") "
    t=$(now); snap=$(post "/sandboxes/$id/snapshots" '{}' | json 'v["snapshot_id"]'); times[ours_snapshot]+="$(since "$t") "
    t=$(now); from=$(post /sandboxes/ "{\"template\": \"$snap\"}" | json 'v["sandbox_id"]')
    post "/sandboxes/$from/commands/run" '{"cmd": "true"}' >/dev/null; times[ours_from_snapshot]+="$(since "$t") "
    curl -fsS -X DELETE "$api/sandboxes/$from" >/dev/null
    t=$(now); forks=$(post "/sandboxes/$id/fork" '{"count": 3}' | json '" ".join(f["sandbox"]["sandbox_id"] for f in v)')
    for f in $forks; do post "/sandboxes/$f/commands/run" '{"cmd": "true"}' >/dev/null; done
    times[ours_fork3]+="$(since "$t") "
    for f in $forks; do curl -fsS -X DELETE "$api/sandboxes/$f" >/dev/null; done
    curl -fsS -X DELETE "$api/snapshots/$snap" >/dev/null

    t=$(now); $cli pause "$floor" >/dev/null; times[raw_pause_mem]+="$(since "$t") "
    t=$(now); $cli unpause "$floor" >/dev/null; times[raw_resume_mem]+="$(since "$t") "
    t=$(now); $cli kill "$floor" >/dev/null
    until [ "$($cli inspect -f '{{.State.Running}}' "$floor")" = false ]; do sleep 0.01; done
    times[raw_pause_fs]+="$(since "$t") "
    t=$(now); $cli start "$floor" >/dev/null; times[raw_resume_fs]+="$(since "$t") "
    t=$(now); $cli commit "$floor" "colima-e2b-pbench/floor:$i" >/dev/null; times[raw_snapshot]+="$(since "$t") "
    t=$(now); c=$($cli run -d --label "colima-e2b-pbench=$$" --entrypoint sleep "colima-e2b-pbench/floor:$i" infinity)
    $cli exec "$c" true; times[raw_from_snapshot]+="$(since "$t") "
    $cli rm -f "$c" >/dev/null
    t=$(now); $cli commit "$floor" "colima-e2b-pbench/floor:fork$i" >/dev/null
    cs=()
    for _ in 1 2 3; do cs+=("$($cli run -d --label "colima-e2b-pbench=$$" --entrypoint sleep "colima-e2b-pbench/floor:fork$i" infinity)"); done
    for c in "${cs[@]}"; do $cli exec "$c" true; done
    times[raw_fork3]+="$(since "$t") "
    $cli rm -f "${cs[@]}" >/dev/null

    name="pbench-$$-$i"
    t=$(now); vol=$(post /volumes "{\"name\": \"$name\"}"); times[ours_vol_create]+="$(since "$t") "
    vid=$(json 'v["volume_id"]' <<<"$vol"); tok=$(json 'v["token"]' <<<"$vol")
    t=$(now); m=$(post /sandboxes/ "{\"template\": \"base\", \"volume_mounts\": [{\"name\": \"$name\", \"path\": \"/mnt/v\"}]}" | json 'v["sandbox_id"]')
    post "/sandboxes/$m/commands/run" '{"cmd": "true"}' >/dev/null; times[ours_create_mounted]+="$(since "$t") "
    post "/sandboxes/$m/commands/run" "{\"cmd\": \"$fillv\", \"timeout\": 120}" >/dev/null
    content() { curl -fsS -H "Authorization: Bearer $tok" "$api/volumecontent/$vid/$1"; }
    t=$(now); content "path?path=fill.bin" >/dev/null; times[ours_content_first]+="$(since "$t") "
    t=$(now); content "file?path=fill.bin" >/dev/null; times[ours_content_read]+="$(since "$t") "
    curl -fsS -X DELETE "$api/sandboxes/$m" >/dev/null
    t=$(now); curl -fsS -X DELETE "$api/volumes/$vid" >/dev/null; times[ours_vol_delete]+="$(since "$t") "

    rv="colima-e2b-pbench-vol-$$-$i"
    t=$(now); $cli volume create --label "colima-e2b-pbench=$$" "$rv" >/dev/null; times[raw_vol_create]+="$(since "$t") "
    t=$(now); c=$($cli run -d --label "colima-e2b-pbench=$$" -v "$rv:/mnt/v" --entrypoint sleep colima-e2b/base:latest infinity)
    $cli exec "$c" true; times[raw_create_mounted]+="$(since "$t") "
    $cli exec "$c" sh -c "$fillv"
    t=$(now); k=$($cli run -d --label "colima-e2b-pbench=$$" -v "$rv:/v" --entrypoint sleep colima-e2b/base:latest infinity)
    $cli exec "$k" stat /v/fill.bin >/dev/null; times[raw_content_first]+="$(since "$t") "
    t=$(now); $cli exec "$k" cat /v/fill.bin >/dev/null; times[raw_content_read]+="$(since "$t") "
    $cli rm -f "$c" "$k" >/dev/null
    t=$(now); $cli volume rm "$rv" >/dev/null; times[raw_vol_delete]+="$(since "$t") "
  done
  for op in pause_mem resume_mem pause_fs resume_fs snapshot from_snapshot fork3 \
    vol_create create_mounted content_first content_read vol_delete; do
    ours=$(tr ' ' '\n' <<<"${times[ours_$op]}" | grep . | median)
    raw=$(tr ' ' '\n' <<<"${times[raw_$op]}" | grep . | median)
    printf '%-8s %-22s %8.2f s %8.2f s %6.2fx\n' "$engine" "$op" "$ours" "$raw" "$(awk -v a="$ours" -v b="$raw" 'BEGIN { print a / b }')"
  done
  curl -fsS -X DELETE "$api/sandboxes/$id" >/dev/null
  $cli rm -f "$floor" >/dev/null
  kill "$server"
  wait "$server" 2>/dev/null || true
  server=
  unset times
done
