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
#      (but the cluster suites: `-- --skip clusters::`)
#   4. the cluster suites, one cluster at a time (NATS, Redis Cluster, RabbitMQ):
#      bash scripts/cluster-<kind>.sh up, then
#      MQRPC_CLUSTER=<kind> cargo test --workspace --all-features --test conformance --
#        clusters::<kind>::suite        (client and server on different nodes)
#        clusters::<kind>::faults       (node kills, --test-threads=1)
#      and always bash scripts/cluster-<kind>.sh down. Each cluster runs on spare
#      loopback ports with its own data directory; the shared brokers are never
#      touched. With extra arguments (a filtered run) the clusters run only when
#      MQRPC_CLUSTERS names them, e.g. MQRPC_CLUSTERS="nats redis".
#   5. a summary of what was skipped (count and lines), printed after cargo test,
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

# The cluster suites run below, each with its cluster up; the main run leaves them
# out with libtest's --skip (after the `--` that the arguments may hold already).
args=("$@")
has_separator=0
for arg in "${args[@]}"; do
    [ "$arg" = -- ] && has_separator=1
done
[ "$has_separator" = 1 ] || args+=(--)
args+=(--skip clusters::)

header "test: cargo test --workspace --all-features ${args[*]}"
status=0
cargo test --workspace --all-features "${args[@]}" || status=$?

if [ "$#" -eq 0 ]; then
    clusters="${MQRPC_CLUSTERS-nats redis rabbitmq}"
else
    clusters="${MQRPC_CLUSTERS-}"
fi
# run_cluster KIND: brings the cluster up, runs its suites, tears it down (also
# when a suite fails or the run is interrupted).
run_cluster() {
    local kind="$1" script="scripts/cluster-$1.sh"
    header "cluster $kind: bash $script up"
    local up=0
    bash "$script" up || up=$?
    if [ "$up" -ne 0 ]; then
        # 3: a cluster of this checkout already runs (another test run's): leave it.
        [ "$up" -eq 3 ] || bash "$script" down || true
        if [ "$skip_allowed" = 1 ]; then
            printf 'SKIP clusters::%s: the cluster did not come up (bash %s up failed)\n' \
                "$kind" "$script" >>"$MQRPC_SKIP_LOG"
            return 0
        fi
        printf 'test.sh: error: the %s cluster did not come up\n' "$kind" >&2
        return 1
    fi
    trap 'bash "'"$script"'" down' EXIT
    local result=0
    header "cluster $kind: cargo test --workspace --all-features --test conformance -- clusters::$kind::suite"
    MQRPC_CLUSTER="$kind" cargo test --workspace --all-features --test conformance -- \
        "clusters::$kind::suite" || result=1
    header "cluster $kind: cargo test --workspace --all-features --test conformance -- clusters::$kind::faults --test-threads=1"
    MQRPC_CLUSTER="$kind" cargo test --workspace --all-features --test conformance -- \
        "clusters::$kind::faults" --test-threads=1 || result=1
    header "cluster $kind: bash $script down"
    bash "$script" down || true
    trap - EXIT
    return "$result"
}
for kind in $clusters; do
    run_cluster "$kind" || status=1
done

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
