#!/usr/bin/env bash
# The main job: a flannel cluster in network namespaces on this machine.
#   3 hosts (namespaces on a 198.18.0.0/24 underlay bridge), etcd in its own namespace, the
#   release flanneld in each host, one pod per host; pods ping each other across hosts; a table
#   of hosts / subnets / public IPs / VTEP MACs; `flanneld status` from the first host; then
#   everything is removed.
#
#   scripts/demo.sh                   run and clean up
#   scripts/demo.sh --keep            leave it running to explore (prints how)
#   scripts/demo.sh --down            remove what --keep left
#   scripts/demo.sh --backend host-gw | --backend udp | --backend alloc | --hosts 5
#
# Needs root (re-runs itself with sudo when it can). Installs missing tools with apt-get.
# Nothing leaves the namespaces it creates.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null; then
        exec sudo -E env "PATH=$PATH" "$0" "$@"
    fi
    echo "demo.sh: needs root (network namespaces)" >&2
    exit 2
fi

for a in "$@"; do
    if [ "$a" = "--down" ]; then
        n=0
        for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep '^fldemo-' || true); do
            for p in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$p" 2>/dev/null || true; done
            ip netns del "$ns" && n=$((n + 1))
        done
        rm -rf /tmp/flannel-demo
        echo "removed $n namespaces (fldemo-*) and /tmp/flannel-demo"
        exit 0
    fi
done

# tool -> Debian package
declare -A pkg=(
    [etcd]=etcd-server [etcdctl]=etcd-client [ip]=iproute2 [bridge]=iproute2
    [iptables]=iptables [ping]=iputils-ping [protoc]=protobuf-compiler [cc]=build-essential
)
missing=()
for tool in "${!pkg[@]}"; do
    command -v "$tool" >/dev/null || missing+=("${pkg[$tool]}")
done
if [ ${#missing[@]} -gt 0 ]; then
    mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
    echo "== installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
if ! command -v cargo >/dev/null; then
    echo "demo.sh: cargo not found; install Rust (https://rustup.rs) and re-run" >&2
    exit 2
fi

echo "== building release flanneld, the flannel CNI plugin and netns-demo"
cargo build --release --quiet -p flannel --bin flanneld -p flannel-cni --bin flannel -p netns-tests --bin netns-demo
target="${CARGO_TARGET_DIR:-target}"
FLANNELD_BIN="$PWD/$target/release/flanneld"
case "$target" in /*) FLANNELD_BIN="$target/release/flanneld" ;; esac
FLANNEL_CNI_BIN="$(dirname "$FLANNELD_BIN")/flannel"
export FLANNELD_BIN FLANNEL_CNI_BIN
exec "$(dirname "$FLANNELD_BIN")/netns-demo" "$@"
