//! The one place that knows how to start flanneld for a test or a benchmark: which binary,
//! inside which namespace, under which wrapper (e.g. `prlimit`), with which flags and
//! environment. [`crate::Host`], the loopback daemons of the integration tests (`tests/common`,
//! `tests/health_limits.rs`) and the benchmarks build their command with [`FlanneldCommand`]
//! and run it as a [`crate::Daemon`].

use std::ffi::OsString;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};

/// How to start one flanneld. Fields left empty add nothing to the command line.
#[derive(Debug, Clone)]
pub struct FlanneldCommand {
    pub bin: PathBuf,
    /// Named network namespace to run in (`ip netns exec`); `None`: the caller's.
    pub netns: Option<String>,
    /// A program (with its flags) that execs flanneld, e.g. `["prlimit", "--nofile=64"]`. It
    /// must exec, not fork, so that the child's pid stays flanneld's.
    pub wrapper: Vec<OsString>,
    /// Flags, in order (`--etcd-endpoints=...`, `--iface=...`, ...).
    pub args: Vec<String>,
    /// `--subnet-file`, added after `args`.
    pub subnet_file: Option<PathBuf>,
    /// `--healthz-ip` and `--healthz-port`, added after the subnet file.
    pub healthz: Option<(IpAddr, u16)>,
    /// `RUST_LOG` for the daemon.
    pub rust_log: String,
    /// More environment, set last (may override `RUST_LOG`).
    pub env: Vec<(String, String)>,
}

impl FlanneldCommand {
    /// `bin` with no flags yet, logging at `info`.
    pub fn new(bin: impl AsRef<Path>) -> FlanneldCommand {
        FlanneldCommand {
            bin: bin.as_ref().to_path_buf(),
            netns: None,
            wrapper: Vec::new(),
            args: Vec::new(),
            subnet_file: None,
            healthz: None,
            rust_log: "info".into(),
            env: Vec::new(),
        }
    }

    /// flanneld's own flags: `args`, then the subnet file and health server when set.
    pub fn flags(&self) -> Vec<String> {
        let mut a = self.args.clone();
        if let Some(f) = &self.subnet_file {
            a.push(format!("--subnet-file={}", f.display()));
        }
        if let Some((ip, port)) = self.healthz {
            a.push(format!("--healthz-ip={ip}"));
            a.push(format!("--healthz-port={port}"));
        }
        a
    }

    /// The command, stdio left to the caller. The test runner's own `FLANNELD_*` variables
    /// (flanneld reads its flags from them) and `NOTIFY_SOCKET` are not passed on: a daemon
    /// under test sees only what the test sets.
    pub fn command(&self) -> Command {
        let mut program: Vec<OsString> = Vec::new();
        if let Some(ns) = &self.netns {
            program.extend(["ip", "netns", "exec"].map(OsString::from));
            program.push(ns.into());
        }
        program.extend(self.wrapper.iter().cloned());
        program.push(self.bin.clone().into());
        let mut c = Command::new(&program[0]);
        c.args(&program[1..]).args(self.flags());
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("FLANNELD_") {
                c.env_remove(k);
            }
        }
        c.env_remove("NOTIFY_SOCKET")
            .env("RUST_LOG", &self.rust_log)
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        c
    }

    /// Starts it with stdin closed and stdout and stderr appended to `log`.
    /// A [`crate::Daemon`] keeps the log, stops and reaps; prefer it for a daemon under test.
    pub fn spawn_logged(&self, log: &Path) -> std::io::Result<Child> {
        let mut c = self.command();
        crate::daemon::log_to(&mut c, log)?;
        c.spawn()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrapper_and_namespace_come_before_the_binary_and_flags_after() {
        let mut f = FlanneldCommand::new("/bin/flanneld");
        f.netns = Some("ns1".into());
        f.wrapper = vec!["prlimit".into(), "--nofile=64".into()];
        f.args = vec!["--iface=lo".into()];
        f.subnet_file = Some("/d/subnet.env".into());
        f.healthz = Some(("127.0.0.2".parse().unwrap(), 9));
        let c = f.command();
        let argv: Vec<_> = std::iter::once(c.get_program())
            .chain(c.get_args())
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            argv,
            [
                "ip",
                "netns",
                "exec",
                "ns1",
                "prlimit",
                "--nofile=64",
                "/bin/flanneld",
                "--iface=lo",
                "--subnet-file=/d/subnet.env",
                "--healthz-ip=127.0.0.2",
                "--healthz-port=9",
            ]
        );
    }

    #[test]
    fn environment_is_the_tests_own() {
        let mut f = FlanneldCommand::new("flanneld");
        f.env = vec![("FLANNEL_UDP_PLAIN".into(), "1".into())];
        let env: Vec<_> = f
            .command()
            .get_envs()
            .map(|(k, v)| {
                (
                    k.to_string_lossy().into_owned(),
                    v.map(|v| v.to_string_lossy().into_owned()),
                )
            })
            .collect();
        assert!(env.contains(&("NOTIFY_SOCKET".into(), None)));
        assert!(env.contains(&("RUST_LOG".into(), Some("info".into()))));
        assert!(env.contains(&("FLANNEL_UDP_PLAIN".into(), Some("1".into()))));
    }
}
