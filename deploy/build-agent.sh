#!/usr/bin/env bash
# Builds the in-sandbox agent as a static x86_64 Linux binary (glibc, crt-static: no
# musl target is available here) and prints its path.
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET=x86_64-unknown-linux-gnu
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --profile agent -p sandbox-agent --target "$TARGET" >&2
BIN="$CARGO_TARGET_DIR/$TARGET/agent/sandbox-agent"
if ldd "$BIN" 2>&1 | grep -qv -e 'statically linked' -e 'not a dynamic executable'; then
    echo "error: $BIN is dynamically linked" >&2
    exit 1
fi
echo "$BIN"
