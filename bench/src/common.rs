//! Pieces the benchmarks share.

use std::path::{Path, PathBuf};

/// The flanneld a benchmark runs unless told otherwise: `$FLANNELD_BIN`, else the one next to
/// this executable (both are built into `target/release`).
pub fn default_flanneld() -> PathBuf {
    if let Some(p) = std::env::var_os("FLANNELD_BIN") {
        return PathBuf::from(p);
    }
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_default()
        .join("flanneld")
}

/// Arguments for a one-member etcd named `name` with its data in `data_dir`, serving clients
/// on `client_url` (its peer port stays on loopback).
pub fn etcd_args(name: &str, data_dir: &Path, client_url: &str) -> Vec<String> {
    netns_tests::EtcdSpec::single(name, data_dir, client_url, "http://127.0.0.1:2380").args()
}
