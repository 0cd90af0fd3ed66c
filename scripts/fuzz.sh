#!/usr/bin/env bash
# Runs the cargo-fuzz targets of fuzz/ for a set time each (default 600 s):
#   scripts/fuzz.sh            # every target, 10 minutes each
#   FUZZ_SECONDS=60 scripts/fuzz.sh dispatch
# cargo-fuzz needs nightly flags; RUSTC_BOOTSTRAP lets the machine's stable toolchain
# accept them. The fuzzer starts from fuzz/seeds/<target> (kept in git) and writes
# what it finds to fuzz/corpus/<target> (not kept); a crash is written
# to fuzz/artifacts/<target>/ and the script fails. Copy a fixed crash's input to
# fuzz/regressions/<target>/ so that `cargo test -p rpc-core` replays it forever.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${FUZZ_SECONDS:-600}"
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(envelope_decode dispatch auth_open server)
fi
if ! command -v cargo-fuzz >/dev/null; then
    cargo install cargo-fuzz --locked
fi
export RUSTC_BOOTSTRAP=1
for target in "${targets[@]}"; do
    echo "== fuzzing $target for ${seconds} s"
    mkdir -p "fuzz/corpus/$target"
    # Findings of an earlier run would be mistaken for this run's.
    rm -rf "fuzz/artifacts/$target"
    status=0
    (cd fuzz && cargo fuzz run "$target" "corpus/$target" "seeds/$target" -- \
        -max_total_time="$seconds" -max_len=65536 -timeout=10 -print_final_stats=1 \
        >"target-$target.log" 2>&1) || status=$?
    grep -E "^(#[0-9]+ +DONE|Done|stat::number_of_executed_units|==[0-9]+==|SUMMARY)" \
        "fuzz/target-$target.log" || true
    # Any finding fails the run: crash, timeout, out-of-memory, leak or slow unit.
    if ls "fuzz/artifacts/$target"/* >/dev/null 2>&1; then
        echo "$target: findings in fuzz/artifacts/$target:" >&2
        ls "fuzz/artifacts/$target" >&2
        exit 1
    fi
    if [ "$status" -ne 0 ]; then
        echo "$target: cargo fuzz failed (exit $status); see fuzz/target-$target.log" >&2
        exit "$status"
    fi
done
