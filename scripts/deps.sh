# Installs what building and running flanneld here needs, only when missing.
# Sourced by scripts/demo.sh and scripts/test.sh.
need_pkgs() {
    local missing=()
    command -v protoc >/dev/null || missing+=(protobuf-compiler)
    # etcd-client's protos import protobuf's well-known types, which protoc alone lacks.
    [ -f /usr/include/google/protobuf/descriptor.proto ] || missing+=(libprotobuf-dev)
    command -v etcd >/dev/null || missing+=(etcd-server)
    command -v etcdctl >/dev/null || missing+=(etcd-client)
    command -v ip >/dev/null || missing+=(iproute2)
    command -v bridge >/dev/null || missing+=(iproute2)
    command -v iptables >/dev/null || missing+=(iptables)
    command -v nft >/dev/null || missing+=(nftables)
    command -v iperf3 >/dev/null || missing+=(iperf3)
    command -v openssl >/dev/null || missing+=(openssl)
    # The kube test bed sends flanneld's own requests (a PATCH without a GET first) with curl.
    command -v curl >/dev/null || missing+=(curl)
    command -v ping >/dev/null || missing+=(iputils-ping)
    [ -x /usr/lib/cni/bridge ] || missing+=(containernetworking-plugins)
    command -v cc >/dev/null || missing+=(gcc)
    # The ipsec backend's tests: charon with the VICI plugin (swanctl's package), openssl/gcm
    # for flannel's ESP proposal, kernel-libipsec for kernels without ESP.
    [ -x /usr/lib/ipsec/charon ] || missing+=(strongswan-charon)
    [ -x /usr/sbin/swanctl ] || missing+=(strongswan-swanctl)
    [ -f /usr/lib/ipsec/plugins/libstrongswan-openssl.so ] || missing+=(libstrongswan-standard-plugins)
    [ -f /usr/lib/ipsec/plugins/libstrongswan-kernel-libipsec.so ] || missing+=(libcharon-extra-plugins)
    # The foreign WireGuard peer of the wireguard interop tests and `flannel-bench wireguard`.
    command -v wireguard-go >/dev/null || missing+=(wireguard-go)
    command -v wg >/dev/null || missing+=(wireguard-tools)
    if [ ${#missing[@]} -gt 0 ]; then
        echo "installing: ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
    if ! command -v cargo >/dev/null; then
        echo "cargo (Rust) is required and not installed" >&2
        exit 1
    fi
}
