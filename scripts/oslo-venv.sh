#!/usr/bin/env bash
# Create (or reuse) the Python virtualenv that holds oslo.messaging for the
# Rust <-> Python interop tests (tests/interop/oslo_peer.py).
#
#   venv path: ${MQRPC_OSLO_VENV:-$HOME/.cache/mqrpc/oslo-venv}
#
# oslo.messaging >= 18.2 is required: versions 14.8 to 18.1 add a 0.5 s
# polling delay to every RPC call.
#
# The tracing interop tests (oslo_peer.py --trace) also need OpenTelemetry:
# opentelemetry-instrumentation-oslo-messaging 0.13.x and the SDK, pinned below
# (the instrumentation itself leaves its opentelemetry-* versions open).
#
# Idempotent: if the venv already imports oslo_messaging at a version >= 18.2
# and the OpenTelemetry packages at the pinned versions, nothing is installed;
# the version is printed either way. The last line of output is always
#
#   oslo venv: <venv>/bin/python (oslo.messaging X.Y.Z)
#
# Environment:
#   MQRPC_OSLO_VENV   venv directory (default $HOME/.cache/mqrpc/oslo-venv)
#   PYTHON            interpreter used to create the venv (default python3)
set -euo pipefail

VENV="${MQRPC_OSLO_VENV:-$HOME/.cache/mqrpc/oslo-venv}"
PYTHON="${PYTHON:-python3}"
MIN_VERSION="18.2"
REQUIREMENT="oslo.messaging>=${MIN_VERSION}"
# The instrumentation's 0.13.x line with the SDK and instrumentation base of one
# release (opentelemetry-sdk 1.45.2 goes with the 0.66b2 contrib packages).
OTEL_INSTRUMENTATION_VERSION="0.13.1"
OTEL_SDK_VERSION="1.45.2"
OTEL_CONTRIB_VERSION="0.66b2"
OTEL_REQUIREMENTS=(
    "opentelemetry-instrumentation-oslo-messaging~=${OTEL_INSTRUMENTATION_VERSION}"
    "opentelemetry-sdk==${OTEL_SDK_VERSION}"
    "opentelemetry-instrumentation==${OTEL_CONTRIB_VERSION}"
)

log() { printf 'oslo-venv.sh: %s\n' "$*" >&2; }
die() { printf 'oslo-venv.sh: error: %s\n' "$*" >&2; exit 1; }

SUDO=()
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then
    SUDO=(sudo)
fi

# installed_version: print the oslo.messaging version importable from the
# venv's python, or fail if it is not importable.
installed_version() {
    [ -x "$VENV/bin/python" ] || return 1
    "$VENV/bin/python" - <<'EOF' 2>/dev/null
import importlib.metadata
import oslo_messaging  # noqa: F401  (must really import, not just be listed)
print(importlib.metadata.version("oslo.messaging"))
EOF
}

# otel_ok: true if the venv imports the OpenTelemetry SDK and the oslo.messaging
# instrumentation at the pinned versions.
otel_ok() {
    [ -x "$VENV/bin/python" ] || return 1
    "$VENV/bin/python" - "$OTEL_INSTRUMENTATION_VERSION" "$OTEL_SDK_VERSION" \
        >/dev/null 2>&1 <<'EOF'
import importlib.metadata
import sys
import warnings

warnings.simplefilter("ignore")
import opentelemetry.sdk.trace  # noqa: F401,E402
from opentelemetry.instrumentation.oslo_messaging import (  # noqa: F401,E402
    OsloMessagingInstrumentor,
)

instrumentation = importlib.metadata.version(
    "opentelemetry-instrumentation-oslo-messaging")
sdk = importlib.metadata.version("opentelemetry-sdk")
wanted_instrumentation, wanted_sdk = sys.argv[1], sys.argv[2]
same_minor = instrumentation.split(".")[:2] == wanted_instrumentation.split(".")[:2]
sys.exit(0 if same_minor and sdk == wanted_sdk else 1)
EOF
}

# version_ok VERSION: true if VERSION >= MIN_VERSION (numeric, dotted).
version_ok() {
    "$PYTHON" - "$1" "$MIN_VERSION" <<'EOF'
import re
import sys

def key(v):
    parts = []
    for p in v.split("."):
        m = re.match(r"\d+", p)
        if not m:
            break
        parts.append(int(m.group()))
    return tuple(parts)

sys.exit(0 if key(sys.argv[1]) >= key(sys.argv[2]) else 1)
EOF
}

report() {
    echo "oslo venv: $VENV/bin/python (oslo.messaging $1)"
}

command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found"

# Fast path: already set up.
if version="$(installed_version)" && [ -n "$version" ] && version_ok "$version" \
    && otel_ok; then
    report "$version"
    exit 0
fi

# The venv module (and ensurepip, which `python3 -m venv` needs) ships with
# pyenv's CPython; Debian's system python3 splits it out into python3-venv.
if ! "$PYTHON" -c 'import venv, ensurepip' >/dev/null 2>&1; then
    command -v apt-get >/dev/null 2>&1 \
        || die "$PYTHON lacks the venv/ensurepip modules and apt-get is unavailable"
    log "$PYTHON lacks the venv module; installing python3-venv"
    ${SUDO[@]+"${SUDO[@]}"} apt-get update
    ${SUDO[@]+"${SUDO[@]}"} env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y --no-install-recommends python3-venv
    "$PYTHON" -c 'import venv, ensurepip' >/dev/null 2>&1 \
        || die "python3-venv installed but $PYTHON still cannot import venv"
fi

# A venv that does not work (half-created, or built by an interpreter that no
# longer exists) is rebuilt from scratch. Only something that looks like a
# venv (has pyvenv.cfg) or an empty directory is ever removed.
if [ -e "$VENV" ] && ! "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1; then
    if [ -f "$VENV/pyvenv.cfg" ]; then
        log "removing broken venv at $VENV"
        rm -rf "$VENV"
    elif [ -d "$VENV" ] && [ -z "$(ls -A "$VENV")" ]; then
        rmdir "$VENV"
    else
        die "$VENV exists but is not a virtualenv; remove it or set MQRPC_OSLO_VENV"
    fi
fi

if [ ! -x "$VENV/bin/python" ]; then
    log "creating venv at $VENV"
    mkdir -p "$(dirname "$VENV")"
    "$PYTHON" -m venv "$VENV"
fi

log "installing $REQUIREMENT ${OTEL_REQUIREMENTS[*]}"
"$VENV/bin/python" -m pip install --quiet --upgrade "$REQUIREMENT" "${OTEL_REQUIREMENTS[@]}"

version="$(installed_version)" || die "oslo_messaging does not import after installation"
version_ok "$version" || die "installed oslo.messaging $version is older than $MIN_VERSION"
otel_ok || die "the OpenTelemetry packages (${OTEL_REQUIREMENTS[*]}) do not import after installation"
report "$version"
