#!/usr/bin/env bash
# The dashboard's third-party files (xterm.js and its fit addon, pinned in
# crates/sandbox-api/ui/package-lock.json) from the npm registry into
# crates/sandbox-api/ui/node_modules, where the server's build embeds them. Run before
# building the server; without them /ui works but has no terminal. Does nothing when the
# installed files match the lock.
#
#   deploy/ui-assets.sh
set -euo pipefail
cd "$(dirname "$0")/../crates/sandbox-api/ui"
if ! command -v npm >/dev/null 2>&1; then
  printf '[ui-assets] installing Node.js and npm (Debian packages)\n' >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null 2>&1 ||
    { apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null; }
fi
stamp=node_modules/.colima-e2b-lock
if [ -f node_modules/@xterm/xterm/lib/xterm.js ] && cmp -s package-lock.json "$stamp" 2>/dev/null; then
  exit 0
fi
printf '[ui-assets] installing xterm.js for the dashboard (npm ci)\n' >&2
npm ci --no-audit --no-fund --loglevel=error >/dev/null
cp package-lock.json "$stamp"
