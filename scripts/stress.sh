#!/usr/bin/env bash
# Stress mode of the conformance suite (issue #7): every case of the suite runs
# MQRPC_STRESS copies at once (default 20) against the same broker, one case at a
# time, for each backend. Not run by CI (see docs/reliability.md, "Stress"): it
# takes about five minutes and loads both cores. Needs the brokers of
# scripts/brokers.sh.
#
#   scripts/stress.sh                 # all backends, 20 copies
#   MQRPC_STRESS=5 scripts/stress.sh redis::
set -euo pipefail
cd "$(dirname "$0")/.."
export MQRPC_STRESS="${MQRPC_STRESS:-20}"
# A missing broker fails the run (no MQRPC_ALLOW_SKIP here).
unset MQRPC_ALLOW_SKIP
backends=("$@")
if [ ${#backends[@]} -eq 0 ]; then
    backends=(memory:: amqp:: redis:: nats::core:: nats::jetstream::)
fi
cargo test --workspace --all-features --test conformance --no-run
logs="${CARGO_TARGET_DIR:-target}/stress"
mkdir -p "$logs"
failed=0
for backend in "${backends[@]}"; do
    echo "== stress: ${MQRPC_STRESS} copies of every case on ${backend%::}"
    started=$(date +%s)
    # Only the generic suite: the fault, load and interop tests are not stressed.
    if ! cargo test --workspace --all-features --test conformance -- "$backend" \
        --skip reliability --skip interop_amqp --skip leaves_no --skip tls:: --skip redaction \
        --test-threads=1 >"$logs/${backend//:/}.log" 2>&1; then
        failed=1
        # CI shows only this output: the failures' messages, not just their names.
        sed -n '/^failures:/,$p' "$logs/${backend//:/}.log" | head -n 120
    fi
    grep -E '^test result|FAILED|a copy' "$logs/${backend//:/}.log" || true
    echo "   ${backend%::}: $(( $(date +%s) - started )) s (log: $logs/${backend//:/}.log)"
done
exit "$failed"
