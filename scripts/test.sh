#!/usr/bin/env bash
# The test command (README.md, after the `<!-- test-command -->` marker; .ci/run
# runs exactly that line). On a fresh Debian machine it sets up everything the
# tests need and then runs every test:
#
#   1. bash scripts/brokers.sh     RabbitMQ, Redis and NATS (JetStream) on loopback,
#                                  installed and started if missing; idempotent
#   2. bash scripts/oslo-venv.sh   the Python oslo.messaging peers of the AMQP
#                                  interop tests; idempotent, well under a second
#                                  when already installed
#   3. cargo test --workspace --all-features [ARGS...]
#   4. a summary of what was skipped (count and lines), printed after cargo test,
#      outside libtest's captured output
#
# A test whose broker, broker program or Python peer is missing FAILS. Setting
# MQRPC_ALLOW_SKIP=1 lets such tests skip instead (and lets a failed set-up step
# go on with a warning); every skip is then listed in the summary. Cases that do
# not apply to a backend (a capability it lacks) are listed there too.
#
# Extra arguments go to cargo test, e.g.
#   bash scripts/test.sh --test conformance -- redis::
#
# Exit status: cargo test's.
set -euo pipefail
cd "$(dirname "$0")/.."

header() { printf '\n==> %s\n' "$*"; }

skip_allowed=0
[ "${MQRPC_ALLOW_SKIP:-}" = 1 ] && skip_allowed=1

# setup NAME COMMAND...: runs a set-up step; its failure stops the run unless
# skipping is allowed.
setup() {
    local name="$1"
    shift
    header "$name: $*"
    if "$@"; then
        return 0
    fi
    if [ "$skip_allowed" = 1 ]; then
        printf 'test.sh: warning: %s failed; going on because MQRPC_ALLOW_SKIP=1\n' "$name" >&2
        return 0
    fi
    printf 'test.sh: error: %s failed (set MQRPC_ALLOW_SKIP=1 to run the tests that do not need it)\n' \
        "$name" >&2
    exit 1
}

setup brokers bash scripts/brokers.sh
setup "oslo.messaging venv" bash scripts/oslo-venv.sh

# Every skip is appended here by the tests (tests/conformance/skips.rs, and its
# copy cli/src/skips.rs); the path is absolute because each test binary runs in
# its own package's directory.
target="${CARGO_TARGET_DIR:-target}"
mkdir -p "$target"
MQRPC_SKIP_LOG="$(cd "$target" && pwd)/mqrpc-skipped.log"
export MQRPC_SKIP_LOG
: >"$MQRPC_SKIP_LOG"

header "test: cargo test --workspace --all-features $*"
status=0
cargo test --workspace --all-features "$@" || status=$?

skipped="$(grep -c . "$MQRPC_SKIP_LOG" || true)"
if [ "$skipped" -eq 0 ]; then
    header "skipped: nothing"
else
    header "skipped: $skipped (from $MQRPC_SKIP_LOG)"
    # Identical lines (one per test of a missing broker) are counted, not repeated.
    sort "$MQRPC_SKIP_LOG" | uniq -c | sort -k1,1nr -k2 | sed 's/^ */  /'
fi
if [ "$status" -ne 0 ]; then
    header "cargo test failed (exit status $status)"
fi
exit "$status"
