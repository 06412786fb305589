//! `flanneld install-cni`: the DaemonSet's init step (dist/kube-flannel.yml) that puts our CNI
//! plugin into the node's plugin folder and the conflist into its CNI config folder.
//!
//! Each file is written to a hidden temporary file in the destination folder, flushed, and
//! renamed over the destination, so the kubelet and container runtime (which read these folders
//! at any time) see either the old file or the whole new one, never half of it. That also
//! replaces a plugin binary that is being executed (a plain copy would fail with ETXTBSY).
//! The conflist is checked to be a JSON object with a `name` first: a broken one installed would
//! stop every Pod on the node from starting.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

const USAGE: &str = "usage: flanneld install-cni --plugin=<file> --plugin-dir=<dir> \
                     [--conflist=<file> --conflist-dest=<file>]";

/// What to install.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Install {
    /// The plugin binary to install, and the folder it goes into (under its own file name).
    pub plugin: PathBuf,
    pub plugin_dir: PathBuf,
    /// The conflist to install and where.
    pub conflist: Option<(PathBuf, PathBuf)>,
}

/// Entry point of the subcommand; `args` are those after `install-cni`.
pub fn main(args: &[String]) -> ExitCode {
    let install = match parse_args(args) {
        Ok(i) => i,
        Err(why) => {
            eprintln!("flanneld install-cni: {why}\n{USAGE}");
            return ExitCode::FAILURE;
        }
    };
    match run(&install) {
        Ok(done) => {
            for line in done {
                println!("flanneld install-cni: {line}");
            }
            ExitCode::SUCCESS
        }
        Err(why) => {
            eprintln!("flanneld install-cni: {why}");
            ExitCode::FAILURE
        }
    }
}

/// Parses `--name=value` or `--name value` flags.
pub fn parse_args(args: &[String]) -> Result<Install, String> {
    let (mut plugin, mut plugin_dir, mut conflist, mut conflist_dest) = (None, None, None, None);
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let (name, value) = match arg.split_once('=') {
            Some((n, v)) => (n.to_string(), v.to_string()),
            None => {
                let v = it
                    .next()
                    .ok_or_else(|| format!("{arg} needs a value"))?
                    .clone();
                (arg.clone(), v)
            }
        };
        if value.is_empty() {
            return Err(format!("{name} needs a value, got \"\""));
        }
        let slot = match name.trim_start_matches('-') {
            "plugin" => &mut plugin,
            "plugin-dir" => &mut plugin_dir,
            "conflist" => &mut conflist,
            "conflist-dest" => &mut conflist_dest,
            _ => return Err(format!("unknown flag {name:?}")),
        };
        *slot = Some(PathBuf::from(value));
    }
    let conflist = match (conflist, conflist_dest) {
        (Some(src), Some(dest)) => Some((src, dest)),
        (None, None) => None,
        (Some(_), None) => return Err("--conflist needs --conflist-dest".into()),
        (None, Some(_)) => return Err("--conflist-dest needs --conflist".into()),
    };
    Ok(Install {
        plugin: plugin.ok_or("--plugin is required")?,
        plugin_dir: plugin_dir.ok_or("--plugin-dir is required")?,
        conflist,
    })
}

/// Installs the plugin, then the conflist (so no conflist ever names a plugin not there yet);
/// one line per file installed.
pub fn run(install: &Install) -> Result<Vec<String>, String> {
    let mut done = Vec::new();
    let name = install
        .plugin
        .file_name()
        .ok_or_else(|| format!("--plugin {} names no file", install.plugin.display()))?;
    let plugin = std::fs::read(&install.plugin)
        .map_err(|e| format!("reading the plugin {}: {e}", install.plugin.display()))?;
    let dest = install.plugin_dir.join(name);
    replace_atomically(&dest, &plugin, 0o755)?;
    done.push(format!(
        "{} -> {}",
        install.plugin.display(),
        dest.display()
    ));
    if let Some((src, dest)) = &install.conflist {
        let text = std::fs::read(src)
            .map_err(|e| format!("reading the conflist {}: {e}", src.display()))?;
        check_conflist(&text).map_err(|why| format!("conflist {}: {why}", src.display()))?;
        replace_atomically(dest, &text, 0o644)?;
        done.push(format!("{} -> {}", src.display(), dest.display()));
    }
    Ok(done)
}

/// A CNI network configuration list must be a JSON object with a non-empty `name` and a
/// `plugins` list.
fn check_conflist(text: &[u8]) -> Result<(), String> {
    let v: serde_json::Value =
        serde_json::from_slice(text).map_err(|e| format!("not JSON: {e}"))?;
    if v["name"].as_str().is_none_or(|n| n.is_empty()) {
        return Err("no \"name\"".into());
    }
    if v["plugins"].as_array().is_none_or(|p| p.is_empty()) {
        return Err("no \"plugins\" list".into());
    }
    Ok(())
}

/// Writes `bytes` to `.<file name>.tmp` next to `dest`, flushes it, sets `mode`, and renames it
/// over `dest` (one filesystem, so the rename is atomic).
pub fn replace_atomically(dest: &Path, bytes: &[u8], mode: u32) -> Result<(), String> {
    let dir = dest
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = dest
        .file_name()
        .ok_or_else(|| format!("{} names no file", dest.display()))?;
    let tmp = dir.join(format!(".{}.tmp", name.to_string_lossy()));
    let write = || -> std::io::Result<()> {
        let _ = std::fs::remove_file(&tmp);
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(bytes)?;
        // The umask may have cut bits off the mode given at creation.
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.sync_all()?;
        std::fs::rename(&tmp, dest)?;
        // The rename itself is durable once the folder is synced.
        File::open(dir)?.sync_all()
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        format!("installing {}: {e}", dest.display())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    const CONFLIST: &str = r#"{"name":"cbr0","cniVersion":"0.3.1","plugins":[{"type":"flannel"}]}"#;

    #[test]
    fn both_flag_forms_are_read() {
        let i = parse_args(&args(&[
            "--plugin=/bin/flannel",
            "--plugin-dir",
            "/opt/cni/bin",
            "--conflist=/etc/kube-flannel/cni-conf.json",
            "--conflist-dest=/etc/cni/net.d/10-flannel.conflist",
        ]))
        .unwrap();
        assert_eq!(i.plugin, PathBuf::from("/bin/flannel"));
        assert_eq!(i.plugin_dir, PathBuf::from("/opt/cni/bin"));
        assert_eq!(
            i.conflist,
            Some((
                PathBuf::from("/etc/kube-flannel/cni-conf.json"),
                PathBuf::from("/etc/cni/net.d/10-flannel.conflist")
            ))
        );
    }

    #[test]
    fn bad_flags_are_named() {
        let err = |a: &[&str]| parse_args(&args(a)).unwrap_err();
        assert_eq!(err(&["--plugin-dir=/x"]), "--plugin is required");
        assert_eq!(
            err(&["--plugin=/x", "--bogus=1"]),
            "unknown flag \"--bogus\""
        );
        assert_eq!(
            err(&["--plugin=/x", "--plugin-dir=/y", "--conflist=/c"]),
            "--conflist needs --conflist-dest"
        );
        assert_eq!(err(&["--plugin="]), "--plugin needs a value, got \"\"");
    }

    #[test]
    fn installs_plugin_and_conflist_replacing_old_files_with_no_temporary_left() {
        let src = tempfile::tempdir().unwrap();
        let bin = tempfile::tempdir().unwrap();
        let net = tempfile::tempdir().unwrap();
        let plugin = src.path().join("flannel");
        std::fs::write(&plugin, b"\x7fELF new plugin").unwrap();
        let conf = src.path().join("cni-conf.json");
        std::fs::write(&conf, CONFLIST).unwrap();
        // Old versions in place: both are replaced.
        std::fs::write(bin.path().join("flannel"), b"old").unwrap();
        let dest = net.path().join("10-flannel.conflist");
        std::fs::write(&dest, "{}").unwrap();

        let install = Install {
            plugin: plugin.clone(),
            plugin_dir: bin.path().to_path_buf(),
            conflist: Some((conf, dest.clone())),
        };
        let done = run(&install).unwrap();
        assert_eq!(done.len(), 2);
        let installed = bin.path().join("flannel");
        assert_eq!(std::fs::read(&installed).unwrap(), b"\x7fELF new plugin");
        let mode = std::fs::metadata(&installed).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o755, "the plugin is executable");
        assert_eq!(std::fs::read_to_string(&dest).unwrap(), CONFLIST);
        let mode = std::fs::metadata(&dest).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o644);
        for dir in [bin.path(), net.path()] {
            let names: Vec<_> = std::fs::read_dir(dir)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            assert_eq!(
                names.len(),
                1,
                "only the installed file in {dir:?}: {names:?}"
            );
        }
    }

    #[test]
    fn a_broken_conflist_is_refused_and_the_old_one_kept() {
        let src = tempfile::tempdir().unwrap();
        let plugin = src.path().join("flannel");
        std::fs::write(&plugin, b"plugin").unwrap();
        let conf = src.path().join("cni-conf.json");
        std::fs::write(&conf, r#"{"name":"cbr0","plugins":[{"type":"flannel"}"#).unwrap();
        let dest = src.path().join("10-flannel.conflist");
        std::fs::write(&dest, CONFLIST).unwrap();
        let bin = tempfile::tempdir().unwrap();
        let err = run(&Install {
            plugin,
            plugin_dir: bin.path().to_path_buf(),
            conflist: Some((conf.clone(), dest.clone())),
        })
        .unwrap_err();
        assert!(
            err.starts_with(&format!("conflist {}: not JSON", conf.display())),
            "{err}"
        );
        assert_eq!(std::fs::read_to_string(&dest).unwrap(), CONFLIST);
    }

    #[test]
    fn replacing_a_running_binary_works() {
        // A plain copy onto an executing file fails with ETXTBSY; a rename does not.
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("sleeper");
        std::fs::copy("/bin/sleep", &dest).unwrap();
        let mut child = std::process::Command::new(&dest).arg("5").spawn().unwrap();
        let result = replace_atomically(&dest, b"new", 0o755);
        let _ = child.kill();
        let _ = child.wait();
        result.unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"new");
    }
}
