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

/// Walks `--flag value` options: `on_flag` gets each flag and a function that takes its value
/// (an error naming the flag when there is none).
pub fn each_option(
    args: &[String],
    mut on_flag: impl FnMut(&str, &mut dyn FnMut() -> Result<String, String>) -> Result<(), String>,
) -> Result<(), String> {
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{flag} needs a value"))
        };
        on_flag(flag, &mut value)?;
    }
    Ok(())
}

/// `value` as a count for `flag`, or an error naming both.
pub fn count(flag: &str, value: String) -> Result<usize, String> {
    value
        .parse()
        .map_err(|_| format!("{flag}: {value:?} is not a number"))
}

/// `ip` arguments that add a flannel-style VXLAN device `flannel.1` (VNI 1, port 8472, no
/// learning: the neighbour and FDB entries are written by hand) on `dev`, sending from `local`.
pub fn vxlan_link_args<'a>(local: &'a str, dev: &'a str) -> [&'a str; 14] {
    [
        "link",
        "add",
        "flannel.1",
        "type",
        "vxlan",
        "id",
        "1",
        "local",
        local,
        "dev",
        dev,
        "dstport",
        "8472",
        "nolearning",
    ]
}
