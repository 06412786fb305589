#!/usr/bin/env bash
# Builds the Kubernetes control plane of the kube-mode tests and benchmark (the versions in
# scripts/kube-peers.env) from the Go module proxy into a cache folder, once per machine; later
# runs reuse it. Prints the folder, which holds kube-apiserver, kubectl, etcd and VERSIONS.
#   GO_PEERS_CACHE  where the cache lives (default /var/cache/flannel-rs/go-peers, shared with
#                   scripts/go-peers.sh, so the two share one module cache)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=kube-peers.env
source "$here/kube-peers.env"

# shellcheck source=go-cache.sh
source "$here/go-cache.sh"
go_cache_begin kube-peers "kubernetes-$KUBERNETES_VERSION+etcd-$ETCD_VERSION"
mkdir -p "$work/kube/kube-apiserver" "$work/kube/kubectl" "$work/etcd"

# Two mains of a few lines, doing what kubernetes' own cmd/kube-apiserver and cmd/kubectl do.
cat > "$work/kube/kube-apiserver/main.go" <<'GO'
package main

import (
	"os"

	"k8s.io/component-base/cli"
	"k8s.io/kubernetes/cmd/kube-apiserver/app"
)

func main() { os.Exit(cli.Run(app.NewAPIServerCommand())) }
GO
cat > "$work/kube/kubectl/main.go" <<'GO'
package main

import (
	"os"

	"k8s.io/component-base/cli"
	"k8s.io/component-base/logs"
	"k8s.io/kubectl/pkg/cmd"
	"k8s.io/kubectl/pkg/cmd/util"
)

func main() {
	_, _ = logs.GlogSetter(cmd.GetLogVerbosity(os.Args))
	if err := cli.RunNoErrOutput(cmd.NewDefaultKubectlCommand()); err != nil {
		util.CheckErr(err)
	}
}
GO
{
    printf 'module flannelrs.test/kube\n\ngo 1.26\n\nrequire k8s.io/kubernetes %s\n\nreplace (\n' "$KUBERNETES_VERSION"
    for m in $KUBERNETES_STAGING_MODULES; do
        printf '\tk8s.io/%s => k8s.io/%s %s\n' "$m" "$m" "$KUBERNETES_STAGING_VERSION"
    done
    printf ')\n'
} > "$work/kube/go.mod"

echo "kube-peers: building kube-apiserver and kubectl from k8s.io/kubernetes $KUBERNETES_VERSION" >&2
# The version the programs report (/version, kubectl version), as kubernetes' own build sets it.
minor="${KUBERNETES_VERSION#v1.}"
minor="${minor%%.*}"
ldflags=""
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.gitVersion=$KUBERNETES_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    ldflags+=" -X $pkg.gitTreeState=clean"
done
(cd "$work/kube" && go mod tidy &&
    go build -trimpath -ldflags "$ldflags" -o "$work/bin/kube-apiserver" ./kube-apiserver &&
    go build -trimpath -ldflags "$ldflags" -o "$work/bin/kubectl" ./kubectl)

# etcd's own main, over its etcdmain package (a module of its own: its dependency versions
# need not agree with kubernetes').
cat > "$work/etcd/main.go" <<'GO'
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
GO
printf 'module flannelrs.test/etcd\n\ngo 1.26\n\nrequire go.etcd.io/etcd/server/v3 %s\n' "$ETCD_VERSION" > "$work/etcd/go.mod"
echo "kube-peers: building etcd from go.etcd.io/etcd/server/v3 $ETCD_VERSION" >&2
(cd "$work/etcd" && go mod tidy && go build -trimpath -o "$work/bin/etcd" .)

cat > "$work/bin/VERSIONS" <<VERSIONS
kube-apiserver k8s.io/kubernetes/cmd/kube-apiserver/app $KUBERNETES_VERSION
kubectl k8s.io/kubectl/pkg/cmd $KUBERNETES_STAGING_VERSION (k8s.io/kubernetes $KUBERNETES_VERSION)
etcd go.etcd.io/etcd/server/v3/etcdmain $ETCD_VERSION
$(go version)
VERSIONS
go_cache_finish
