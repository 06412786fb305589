//! Named network namespaces (`ip netns`) with a guard that removes them.

use std::fs::File;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Once;
use std::time::Duration;

use nix::sched::CloneFlags;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::{cmd, Error, Result};

/// Prefix of every name made by [`unique_prefix`]: `nt<pid>x<n>`.
const PREFIX: &str = "nt";

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A name prefix unique to this process and call: `nt<pid>x<n>`. Namespaces named
/// `<prefix>-...` are swept by [`sweep_stale`] once the process `<pid>` is gone.
pub fn unique_prefix() -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{PREFIX}{}x{n}", std::process::id())
}

/// A network namespace `/run/netns/<name>`; dropping it kills every process inside and deletes it.
#[derive(Debug)]
pub struct Netns {
    name: String,
    keep: bool,
}

impl Netns {
    /// `ip netns add <name>` and bring `lo` up.
    pub fn create(name: &str) -> Result<Netns> {
        cmd::run("ip", &["netns", "add", name])?;
        let ns = Netns {
            name: name.to_string(),
            keep: false,
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/<name>`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// `ip -n <name> args...` → stdout.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut c = Command::new("ip");
        c.arg("-n").arg(&self.name).args(args);
        cmd::check(&mut c)
    }

    /// `ip -j -n <name> args...` parsed as JSON (an empty output is an empty array).
    pub fn ip_json(&self, args: &[&str]) -> Result<serde_json::Value> {
        let mut c = Command::new("ip");
        c.arg("-j").arg("-n").arg(&self.name).args(args);
        parse_json(&cmd::check(&mut c)?)
    }

    /// `bridge -j -netns <name> args...` parsed as JSON.
    pub fn bridge_json(&self, args: &[&str]) -> Result<serde_json::Value> {
        let mut c = Command::new("bridge");
        c.arg("-j").arg("-netns").arg(&self.name).args(args);
        parse_json(&cmd::check(&mut c)?)
    }

    /// A command that runs `program` inside the namespace (`ip netns exec <name> program`).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        command_in(Some(&self.name), program)
    }

    /// Runs `program args...` inside the namespace → stdout, error on non-zero exit.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<String> {
        cmd::check(self.command(program).args(args))
    }

    /// `sysctl -w key=value` inside the namespace.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        self.exec("sysctl", &["-q", "-w", &format!("{key}={value}")])
            .map(drop)
    }

    /// Pids of the processes in the namespace.
    pub fn pids(&self) -> Vec<i32> {
        pids_in(&self.name)
    }

    /// Moves the *calling thread* into this namespace. Only call it on a thread you spawned
    /// for that purpose (never the test's main thread); [`Netns::run_in`] does it for you.
    pub fn enter_current_thread(&self) -> Result<()> {
        enter(&self.name)
    }

    /// Runs `f` on a fresh thread that has entered this namespace (sockets it opens live there).
    pub fn run_in<T: Send, F: FnOnce() -> T + Send>(&self, f: F) -> Result<T> {
        run_in(&self.name, f)
    }

    /// Leaves the namespace (and whatever runs inside) in place when the guard is dropped.
    pub fn keep(&mut self) {
        self.keep = true;
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if !self.keep {
            if let Err(e) = destroy(&self.name) {
                eprintln!("netns-tests: removing namespace {}: {e}", self.name);
            }
        }
    }
}

/// A command that runs `program` inside the named namespace (`ip netns exec <name> program`)
/// or, with `None`, in the caller's.
pub fn command_in(netns: Option<&str>, program: impl AsRef<std::ffi::OsStr>) -> Command {
    match netns {
        Some(name) => {
            let mut c = Command::new("ip");
            c.arg("netns").arg("exec").arg(name).arg(program);
            c
        }
        None => Command::new(program),
    }
}

/// Opens `/run/netns/<name>`, to enter it later with [`enter_file`] (e.g. from a thread that
/// must not fail half-way).
pub fn open(name: &str) -> Result<File> {
    let path = PathBuf::from("/run/netns").join(name);
    File::open(&path).map_err(|e| Error::io(format!("opening {}", path.display()), e))
}

/// Moves the *calling thread* into the network namespace `file` (opened by [`open`]); `what`
/// names it in the error. The one `setns` of the test bed: only the thread changes namespace,
/// so call it on a thread spawned for that purpose.
pub fn enter_file(file: &File, what: &str) -> Result<()> {
    nix::sched::setns(file, CloneFlags::CLONE_NEWNET)
        .map_err(|e| Error::Other(format!("setns into {what}: {e}")))
}

/// The calling thread inside a network namespace until this is dropped, then back in the one
/// it came from (see [`enter_scoped`]).
#[derive(Debug)]
pub struct EnteredNetns {
    orig: File,
}

/// Moves the calling thread into the named namespace until the returned guard is dropped.
/// Threads spawned meanwhile start in the namespace (and stay there).
pub fn enter_scoped(name: &str) -> Result<EnteredNetns> {
    let orig = File::open("/proc/thread-self/ns/net")
        .map_err(|e| Error::io("opening /proc/thread-self/ns/net", e))?;
    enter(name)?;
    Ok(EnteredNetns { orig })
}

impl Drop for EnteredNetns {
    fn drop(&mut self) {
        if let Err(e) = enter_file(&self.orig, "the original namespace") {
            eprintln!("netns-tests: {e}");
        }
    }
}

/// Moves the *calling thread* into the named network namespace `/run/netns/<name>`.
pub fn enter(name: &str) -> Result<()> {
    enter_file(&open(name)?, name)
}

/// Runs `f` on a fresh thread that has entered the named namespace (sockets and netlink
/// handles it opens live there); a panic in `f` is re-raised here.
pub fn run_in<T: Send, F: FnOnce() -> T + Send>(name: &str, f: F) -> Result<T> {
    std::thread::scope(|s| {
        let h = s.spawn(|| -> Result<T> {
            enter(name)?;
            Ok(f())
        });
        match h.join() {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

fn parse_json(out: &str) -> Result<serde_json::Value> {
    if out.trim().is_empty() {
        return Ok(serde_json::Value::Array(Vec::new()));
    }
    serde_json::from_str(out).map_err(|e| Error::Other(format!("bad JSON from ip/bridge: {e}")))
}

fn pids_in(name: &str) -> Vec<i32> {
    cmd::run("ip", &["netns", "pids", name])
        .map(|out| {
            out.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Kills every process in namespace `name` (SIGKILL) and deletes it.
pub fn destroy(name: &str) -> Result<()> {
    let me = std::process::id() as i32;
    for _ in 0..40 {
        let pids: Vec<i32> = pids_in(name).into_iter().filter(|&p| p != me).collect();
        if pids.is_empty() {
            break;
        }
        for p in pids {
            let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    cmd::run("ip", &["netns", "del", name]).map(drop)
}

/// Names of all named network namespaces.
pub fn list() -> Vec<String> {
    cmd::run("ip", &["netns", "list"])
        .map(|out| {
            out.lines()
                .filter_map(|l| l.split_whitespace().next())
                .map(String::from)
                .collect()
        })
        .unwrap_or_default()
}

/// Pid of the process that made namespace `name` (`nt<pid>x<n>-...`), if it is one of ours.
fn owner(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(PREFIX)?;
    let (pid, rest) = rest.split_once('x')?;
    let (n, _) = rest.split_once('-')?;
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    pid.parse().ok()
}

/// Removes namespaces left by test processes that no longer exist (killed before their guards
/// ran). Runs once per process; called by [`crate::Cluster`] before building anything.
pub fn sweep_stale() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        for name in list() {
            if let Some(pid) = owner(&name) {
                if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                    eprintln!("netns-tests: removing stale namespace {name}");
                    let _ = destroy(&name);
                }
            }
        }
    });
}

/// Removes every namespace whose name starts with `prefix` (used by `netns-demo --down`).
/// Returns the names removed.
pub fn sweep_prefix(prefix: &str) -> Vec<String> {
    let mut removed = Vec::new();
    for name in list() {
        if name.starts_with(prefix) {
            match destroy(&name) {
                Ok(()) => removed.push(name),
                Err(e) => eprintln!("removing namespace {name}: {e}"),
            }
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_parses_our_names_only() {
        assert_eq!(owner("nt1234x0-h1"), Some(1234));
        assert_eq!(owner("nt1234x12-br"), Some(1234));
        assert_eq!(owner("nt1234-h1"), None);
        assert_eq!(owner("fldemo-h0"), None);
        assert_eq!(owner("ntfoox1-h0"), None);
    }

    #[test]
    fn prefixes_are_unique() {
        assert_ne!(unique_prefix(), unique_prefix());
    }
}
