//! Programs of other projects built from their Go modules by a script of ours
//! (`scripts/go-peers.sh`, `scripts/kube-peers.sh`) into a per-machine cache folder: finding
//! that folder, checking its programs, and the rule for tests that need them (a skip with a
//! note, or a failure when `CI` is set, like [`crate::privileges`]).

use std::path::{Path, PathBuf};

use crate::bins::workspace_dir;
use crate::cmd;

/// The folder `$env_var` names when set (what `scripts/test.sh` exports), otherwise the one
/// `scripts/<script>` prints (it builds on a machine's first run, then returns at once).
pub(crate) fn folder(env_var: &str, script: &str) -> Result<PathBuf, String> {
    if let Some(dir) = std::env::var_os(env_var).filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir));
    }
    let script = workspace_dir().join("scripts").join(script);
    let mut c = std::process::Command::new("bash");
    c.arg(&script);
    eprintln!("netns-tests: {} (set {env_var} to skip)", cmd::show(&c));
    let out = cmd::output(&mut c).map_err(|e| e.to_string())?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = err.lines().collect();
        let tail = lines[lines.len().saturating_sub(20)..].join("\n");
        return Err(format!(
            "{} failed ({}):\n{tail}",
            script.display(),
            out.status
        ));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout
        .lines()
        .last()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(PathBuf::from)
        .ok_or_else(|| format!("{} printed no folder", script.display()))
}

/// `dir/name`, when it is an executable file.
pub(crate) fn program(dir: &Path, name: &str) -> Result<PathBuf, String> {
    let p = dir.join(name);
    if cmd::is_executable(&p) {
        Ok(p)
    } else {
        Err(format!("{} is not an executable file", p.display()))
    }
}

/// The folder's `VERSIONS` file: one line per program (module and version) and the Go version.
pub(crate) fn versions(dir: &Path) -> Result<String, String> {
    let path = dir.join("VERSIONS");
    std::fs::read_to_string(&path)
        .map(|v| v.trim_end().to_string())
        .map_err(|e| format!("reading {}: {e}", path.display()))
}

/// What `test` needs, as `found`: printed with `describe` when there; when not, panics under
/// `CI`, otherwise prints a skip line naming `needs` and returns `None`.
pub(crate) fn require<T>(
    test: &str,
    needs: &str,
    found: Result<&'static T, String>,
    describe: impl FnOnce(&T) -> String,
) -> Option<&'static T> {
    match found {
        Ok(p) => {
            eprintln!("{test}: {}", describe(p));
            Some(p)
        }
        Err(e) => {
            let msg = format!("{test}: needs {needs}: {e}");
            if std::env::var_os("CI").is_some() {
                panic!("{msg}; CI is set, so this is a failure, not a skip");
            }
            eprintln!("SKIPPED {msg}");
            None
        }
    }
}
