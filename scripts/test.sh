#!/usr/bin/env bash
# The whole test suite: installs what is missing, checks formatting and lints, builds, and runs
# unit, etcd, namespace and fuzz tests. Needs root for the namespace tests.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
need_pkgs
# flannel's own flanneld and CNI plugin, the interop tests' peers (built once per machine).
GO_PEERS_DIR="$(bash scripts/go-peers.sh)"
export GO_PEERS_DIR
# kube-apiserver, kubectl and etcd 3.6 for the Kubernetes-mode tests (built once per machine).
KUBE_PEERS_DIR="$(bash scripts/kube-peers.sh)"
export KUBE_PEERS_DIR

echo "== format and lints"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings

echo "== build (release binaries for the namespace tests)"
cargo build --release --workspace --bins
export FLANNELD_BIN="$PWD/target/release/flanneld"
export FLANNEL_CNI_BIN="$PWD/target/release/flannel"

echo "== tests"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
cargo test --workspace -- --test-threads="${TEST_THREADS:-4}" 2>&1 | tee "$log"

echo "== fuzz (short runs of every target; seed corpora in fuzz/corpus)"
bash scripts/fuzz.sh "${FUZZ_SECONDS:-15}"

# One closing line for the whole suite: the sum of every cargo test binary's result line.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
