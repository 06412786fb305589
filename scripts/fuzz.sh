#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/fuzz_targets for N seconds each (default 20).
#
#   scripts/fuzz.sh [SECONDS]
#
# cargo-fuzz needs nightly compiler features; on a stable toolchain RUSTC_BOOTSTRAP=1 unlocks
# them. Installs cargo-fuzz when it is missing. Each target starts from its seed corpus in
# fuzz/corpus/<target>/ (new inputs found go to a scratch copy, not into the repository);
# a crash fails the script and leaves the input in fuzz/artifacts/<target>/.
set -euo pipefail

secs="${1:-20}"
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root/fuzz"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi
export RUSTC_BOOTSTRAP=1

targets=$(ls fuzz_targets/*.rs | xargs -n1 basename | sed 's/\.rs$//')
# Build all targets once (the first build compiles the whole crate with coverage).
cargo fuzz build

scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
for t in $targets; do
    mkdir -p "$scratch/$t"
    seeds="corpus/$t"
    [ -d "$seeds" ] || mkdir -p "$seeds"
    echo "fuzz.sh: $t for ${secs}s"
    status=0
    cargo fuzz run "$t" "$scratch/$t" "$seeds" -- \
        -max_total_time="$secs" -print_final_stats=1 >"$scratch/$t.log" 2>&1 || status=$?
    grep -E "^(stat::number_of_executed_units|Done)" "$scratch/$t.log" || true
    if [ "$status" -ne 0 ]; then
        tail -n 60 "$scratch/$t.log" >&2
        echo "fuzz.sh: $t FAILED (crash input in fuzz/artifacts/$t/)" >&2
        exit 1
    fi
done
echo "fuzz.sh: all targets ran ${secs}s without a crash"
