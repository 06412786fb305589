#!/usr/bin/env bash
# Builds flannel's own flanneld and CNI plugin (the versions in scripts/go-peers.env) from the
# Go module proxy into a cache folder, once per machine; later runs reuse it. Prints the folder.
#   GO_PEERS_CACHE  where the cache lives (default /var/cache/flannel-rs/go-peers)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=go-peers.env
source "$here/go-peers.env"

# shellcheck source=go-cache.sh
source "$here/go-cache.sh"
go_cache_begin go-peers "flannel-$FLANNEL_GO_VERSION+cni-$FLANNEL_CNI_GO_VERSION"
export CGO_ENABLED=1 # flannel's udp backend is cgo

module_dir() { go mod download -json "$1@$2" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p'; }

echo "go-peers: building flanneld $FLANNEL_GO_VERSION" >&2
src="$(module_dir github.com/flannel-io/flannel "$FLANNEL_GO_VERSION")"
cp -r "$src" "$work/flannel"
chmod -R u+w "$work/flannel"
# The tencentvpc cloud backend's SDK is not served by the Go module proxy (403 for the pinned
# versions); that backend is irrelevant off Tencent Cloud, so its blank import is left out.
sed -i '/pkg\/backend\/tencentvpc"/d' "$work/flannel/main.go"
(cd "$work/flannel" && go build -trimpath \
    -ldflags "-X github.com/flannel-io/flannel/pkg/version.Version=$FLANNEL_GO_VERSION" \
    -o "$work/bin/flanneld" .)
# flannel's Docker helper, as shipped in the same module.
install -m 0755 "$work/flannel/dist/mk-docker-opts.sh" "$work/bin/mk-docker-opts.sh"

echo "go-peers: building the flannel CNI plugin from $FLANNEL_CNI_GO_MODULE $FLANNEL_CNI_GO_VERSION" >&2
src="$(module_dir "$FLANNEL_CNI_GO_MODULE" "$FLANNEL_CNI_GO_VERSION")"
(cd "$src" && GOFLAGS="-modcacherw -mod=mod" go build -trimpath -o "$work/bin/flannel" ./plugins/meta/flannel)

cat > "$work/bin/VERSIONS" <<VERSIONS
flanneld github.com/flannel-io/flannel $FLANNEL_GO_VERSION
flannel-cni $FLANNEL_CNI_GO_MODULE/plugins/meta/flannel $FLANNEL_CNI_GO_VERSION
mk-docker-opts.sh github.com/flannel-io/flannel/dist $FLANNEL_GO_VERSION
$(go version)
VERSIONS
go_cache_finish
