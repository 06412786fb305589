# Sourced by the scripts that build other projects' Go programs into the per-machine cache
# (go-peers.sh, kube-peers.sh): one cache root, one module cache, one way to mark a folder done.
#   GO_PEERS_CACHE  where the cache lives (default /var/cache/flannel-rs/go-peers)

# go_cache_begin <who> <folder>: prints the finished folder and exits when it is already built;
# otherwise sets $out (the folder) and $work (a scratch folder, with $work/bin for the programs,
# removed on exit), with a private GOPATH and module cache so the build neither needs nor
# touches the user's.
go_cache_begin() {
    export PATH="/usr/local/go/bin:$PATH"
    command -v go >/dev/null || { echo "$1: the go command is required (Go 1.26)" >&2; exit 1; }
    local cache="${GO_PEERS_CACHE:-/var/cache/flannel-rs/go-peers}"
    out="$cache/$2"
    if [ -f "$out/.complete" ]; then
        echo "$out"
        exit 0
    fi
    export GOPATH="$cache/gopath" GOMODCACHE="$cache/gomodcache" GOFLAGS=-modcacherw
    mkdir -p "$cache"
    work="$(mktemp -d "$cache/build.XXXXXX")"
    trap 'rm -rf "$work"' EXIT
    mkdir -p "$work/bin"
}

# go_cache_finish: moves $work/bin (with its VERSIONS file) to $out, marks it done, prints it.
go_cache_finish() {
    rm -rf "$out"
    mkdir -p "$(dirname "$out")"
    mv "$work/bin" "$out"
    touch "$out/.complete"
    echo "$out"
}
