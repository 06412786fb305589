#!/usr/bin/env bash
# The whole test suite: installs what is missing, checks formatting and lints, builds, and runs
# unit, etcd, namespace and fuzz tests. Needs root for the namespace tests.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
need_pkgs

echo "== format and lints"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings

echo "== build (release binaries for the namespace tests)"
cargo build --release --workspace --bins
export FLANNELD_BIN="$PWD/target/release/flanneld"
export FLANNEL_CNI_BIN="$PWD/target/release/flannel"

echo "== tests"
cargo test --workspace -- --test-threads="${TEST_THREADS:-4}"

echo "== fuzz (short runs of every target; seed corpora in fuzz/corpus)"
bash scripts/fuzz.sh "${FUZZ_SECONDS:-15}"
