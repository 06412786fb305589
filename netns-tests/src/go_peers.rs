//! flannel's own programs, built from their Go modules by `scripts/go-peers.sh`: the peers of
//! the interop tests (mixed clusters of Go and Rust daemons) and of the side-by-side benchmark.
//!
//! [`go_peers`] finds them once per process: the folder `$GO_PEERS_DIR` when set (what
//! `scripts/test.sh` exports), otherwise whatever `scripts/go-peers.sh` prints (it builds them on
//! the first run on a machine, then returns at once). Tests start with
//! [`require_go_peers!`](crate::require_go_peers): when the peers cannot be had the test is
//! skipped with a note, or fails when `CI` is set, like [`crate::privileges`].

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::built;

/// The Go programs of one pinned flannel release.
#[derive(Debug, Clone)]
pub struct GoPeers {
    /// The folder holding them.
    pub dir: PathBuf,
    /// flannel's `flanneld`.
    pub flanneld: PathBuf,
    /// flannel's CNI plugin (`flannel`).
    pub cni_plugin: PathBuf,
    /// flannel's `dist/mk-docker-opts.sh`.
    pub mk_docker_opts: PathBuf,
    /// The `VERSIONS` file: one line per program (module and version) and the Go version.
    pub versions: String,
}

impl GoPeers {
    /// Checks that `dir` holds every program and reads `VERSIONS`.
    pub fn in_dir(dir: &Path) -> Result<GoPeers, String> {
        Ok(GoPeers {
            dir: dir.to_path_buf(),
            flanneld: built::program(dir, "flanneld")?,
            cni_plugin: built::program(dir, "flannel")?,
            mk_docker_opts: built::program(dir, "mk-docker-opts.sh")?,
            versions: built::versions(dir)?,
        })
    }
}

/// The Go peers, found once per process (see the module doc); the error says why not.
pub fn go_peers() -> Result<&'static GoPeers, String> {
    static FOUND: OnceLock<Result<GoPeers, String>> = OnceLock::new();
    FOUND.get_or_init(find).as_ref().map_err(Clone::clone)
}

fn find() -> Result<GoPeers, String> {
    GoPeers::in_dir(&built::folder("GO_PEERS_DIR", "go-peers.sh")?)
}

/// The Go peers for `test`, with their versions printed; when they cannot be had: panics under
/// `CI`, otherwise prints a skip line and returns `None`.
pub fn require(test: &str) -> Option<&'static GoPeers> {
    built::require(
        test,
        "flannel's Go peers (scripts/go-peers.sh)",
        go_peers(),
        |p| {
            format!(
                "flannel's Go peers from {}:\n{}",
                p.dir.display(),
                p.versions
            )
        },
    )
}

/// `let peers = require_go_peers!();`: the [`GoPeers`], or returns from the calling test (a
/// skip; a panic under `CI`) when they cannot be had.
#[macro_export]
macro_rules! require_go_peers {
    () => {
        match $crate::go_peers::require($crate::test_name!()) {
            Some(p) => p,
            None => return,
        }
    };
}

/// The flags of Go flanneld v0.28 (`flanneld --help`), without dashes.
const GO_FLANNELD_FLAGS: &[&str] = &[
    "etcd-cafile",
    "etcd-certfile",
    "etcd-endpoints",
    "etcd-keyfile",
    "etcd-password",
    "etcd-prefix",
    "etcd-username",
    "healthz-ip",
    "healthz-port",
    "iface",
    "iface-can-reach",
    "iface-regex",
    "ip-blackhole-route",
    "ip-masq",
    "ip-masq-fully-random-disable",
    "iptables-forward-rules",
    "iptables-resync",
    "kube-annotation-prefix",
    "kube-api-url",
    "kube-subnet-mgr",
    "kubeconfig-file",
    "net-config-path",
    "public-ip",
    "public-ipv6",
    "set-node-network-unavailable",
    "subnet-file",
    "subnet-lease-renew-margin",
    "v",
    "version",
];

/// The flags of `args` that Go flanneld has, in order. Ours has a few more (e.g.
/// `--subnet-lease-ttl`, `--etcd-insecure-password`) that Go flanneld would refuse to start
/// with; those are left out (with a note), so one host configuration serves both daemons.
pub fn go_flanneld_args(args: &[String]) -> Vec<String> {
    args.iter()
        .filter(|a| {
            let name = a.trim_start_matches('-');
            let name = name.split_once('=').map_or(name, |(n, _)| n);
            let known = GO_FLANNELD_FLAGS.contains(&name);
            if !known {
                eprintln!("netns-tests: {a} left out for Go flanneld (it has no such flag)");
            }
            known
        })
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_go_flanneld_lacks_are_left_out() {
        let ours: Vec<String> = [
            "--etcd-endpoints=http://198.18.0.2:2379",
            "--subnet-lease-ttl=30s",
            "--ip-masq",
            "-iface=eth0",
            "--etcd-insecure-password=true",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(
            go_flanneld_args(&ours),
            [
                "--etcd-endpoints=http://198.18.0.2:2379",
                "--ip-masq",
                "-iface=eth0"
            ]
        );
    }

    #[test]
    fn a_folder_without_the_programs_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("VERSIONS"), "flanneld x v0\n").unwrap();
        let err = GoPeers::in_dir(dir.path()).unwrap_err();
        assert!(err.contains("flanneld is not an executable file"), "{err}");
    }

    #[test]
    fn a_complete_folder_gives_every_path_and_the_versions() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        for name in ["flanneld", "flannel", "mk-docker-opts.sh"] {
            let p = dir.path().join(name);
            std::fs::write(&p, "#!/bin/sh\n").unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        std::fs::write(dir.path().join("VERSIONS"), "flanneld m v0.28.10\n").unwrap();
        let p = GoPeers::in_dir(dir.path()).unwrap();
        assert_eq!(p.flanneld, dir.path().join("flanneld"));
        assert_eq!(p.cni_plugin, dir.path().join("flannel"));
        assert_eq!(p.mk_docker_opts, dir.path().join("mk-docker-opts.sh"));
        assert_eq!(p.versions, "flanneld m v0.28.10");
    }
}
