#!/usr/bin/env bash
# Installs the cargo subcommands CI needs beyond the toolchain, when they are
# missing: cargo-hack (`.ci/run` checks every Cargo feature on its own with it).
#
# Idempotent: a tool already on the PATH is kept, whatever its version; a missing
# one is built with `cargo install --locked` at the version below, so CI on a
# clean machine gets the same tool each time. The last line of output is always
#
#   tools: cargo-hack X.Y.Z
set -euo pipefail

CARGO_HACK_VERSION="0.6.46"

log() { printf 'tools.sh: %s\n' "$*" >&2; }

if ! cargo hack --version >/dev/null 2>&1; then
    log "installing cargo-hack ${CARGO_HACK_VERSION} (cargo install --locked)"
    cargo install cargo-hack --locked --version "${CARGO_HACK_VERSION}"
fi

echo "tools: $(cargo hack --version)"
