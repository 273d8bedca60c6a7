#!/usr/bin/env bash
# Run the colima-e2b server: make the engine answer (installing and starting Docker or
# Podman when absent, as root on Debian/Ubuntu; Colima users run `colima start` first),
# build the default template images offline when they are missing (and the
# code-interpreter-v1 template, `colima-e2b prepare`), build the static agent, the
# dashboard's xterm.js (deploy/ui-assets.sh) and the server, and start it. Arguments
# go to `colima-e2b server`.
#
#   deploy/serve.sh [--port 8000] [--backend docker|podman|colima|auto] ...
set -euo pipefail
cd "$(dirname "$0")/.."

backend=docker
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[$i]}" in
    --backend) backend=${args[$((i + 1))]:-docker} ;;
    --backend=*) backend=${args[$i]#--backend=} ;;
  esac
done
case "$backend" in
  podman) engines=(podman) ;;
  auto) engines=(docker) ;;
  *) engines=(docker) ;;
esac
if [ "$backend" != colima ]; then
  bash deploy/engines.sh "${engines[@]}"
  bash deploy/images.sh "${engines[@]}"
fi
COLIMA_E2B_AGENT_BINARY=$(bash deploy/build-agent.sh)
export COLIMA_E2B_AGENT_BINARY
bash deploy/ui-assets.sh
printf '[serve] building the server (release)\n' >&2
cargo build --release -p colima-e2b --quiet
if [ "$backend" != colima ]; then
  # The code-interpreter-v1 template; the server runs without it if this fails.
  target/release/colima-e2b prepare "$@" ||
    printf '[serve] the code-interpreter-v1 template is not built (see above); other templates work\n' >&2
fi
# `env` takes the same flags as `server` and prints the E2B SDK settings.
printf '[serve] E2B SDKs: eval "$(%s env%s)"\n' target/release/colima-e2b "${*:+ $*}" >&2
exec target/release/colima-e2b server "$@"
