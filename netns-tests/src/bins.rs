//! The binaries under test: `flanneld` and the `flannel` CNI plugin.
//!
//! Each comes from an environment variable when set (`FLANNELD_BIN`, `FLANNEL_CNI_BIN`; a relative
//! path is taken from the workspace root);
//! otherwise the workspace's release build is (re)built once per process with
//! `cargo build --release -p <package> --bin <name>` (a no-op when up to date, so a test never
//! runs a stale binary; `NETNS_TESTS_NO_BUILD=1` skips the build and takes what is there).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::{cmd, Error, Result};

/// The flanneld binary: `$FLANNELD_BIN`, else `<target>/release/flanneld` built from package
/// `flannel`.
pub fn flanneld_bin() -> Result<PathBuf> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    resolve("FLANNELD_BIN", "flannel", "flanneld", &BUILT)
}

/// The CNI plugin: `$FLANNEL_CNI_BIN`, else `<target>/release/flannel` built from package
/// `flannel-cni`.
pub fn cni_plugin_bin() -> Result<PathBuf> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    resolve("FLANNEL_CNI_BIN", "flannel-cni", "flannel", &BUILT)
}

fn resolve(
    var: &str,
    package: &str,
    bin: &str,
    once: &OnceLock<Result<PathBuf, String>>,
) -> Result<PathBuf> {
    if let Some(p) = std::env::var_os(var) {
        let mut p = PathBuf::from(p);
        // `cargo test` runs tests in the package directory: a relative path given on the
        // command line is meant from the workspace root.
        if p.is_relative() && !cmd::is_executable(&p) {
            p = workspace_dir().join(p);
        }
        return if cmd::is_executable(&p) {
            Ok(p)
        } else {
            Err(Error::Other(format!(
                "{var}={} is not an executable file",
                p.display()
            )))
        };
    }
    once.get_or_init(|| build_release(var, package, bin))
        .clone()
        .map_err(Error::Other)
}

/// The workspace root (parent of this crate).
pub fn workspace_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("crate lives in the workspace")
        .to_path_buf()
}

/// `<target dir>/release/<name>` (`$CARGO_TARGET_DIR` or `<workspace>/target`).
pub fn release_binary(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_dir().join("target"));
    target.join("release").join(name)
}

fn build_release(var: &str, package: &str, name: &str) -> Result<PathBuf, String> {
    let bin = release_binary(name);
    if std::env::var_os("NETNS_TESTS_NO_BUILD").is_none() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
        let mut c = std::process::Command::new(cargo);
        c.current_dir(workspace_dir())
            .args(["build", "--release", "-p", package, "--bin", name]);
        eprintln!("netns-tests: {} (set {var} to skip)", cmd::show(&c));
        let out = cmd::output(&mut c).map_err(|e| e.to_string())?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            let lines: Vec<&str> = err.lines().collect();
            let tail = lines[lines.len().saturating_sub(30)..].join("\n");
            return Err(format!("building {name} failed ({}):\n{tail}", out.status));
        }
    }
    if cmd::is_executable(&bin) {
        Ok(bin)
    } else {
        Err(format!(
            "{} does not exist: build it with `cargo build --release -p {package} --bin {name}` \
             or set {var}",
            bin.display()
        ))
    }
}
