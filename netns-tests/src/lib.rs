//! A reusable test bed that builds whole flannel clusters out of network namespaces.
//!
//! ```text
//!   <p>-br   bridge namespace: br0 ── h0, h1, ... , etcd  (198.18.0.0/24 underlay)
//!   <p>-etcd etcd on 198.18.0.2:2379
//!   <p>-h0   "host" 0: eth0 198.18.0.10, flanneld, cni0 bridge ── pods
//!   <p>-h0p0 "pod" 0 on host 0: eth0 with an address from host 0's subnet
//! ```
//!
//! Every object is owned by a guard ([`Netns`], [`Etcd`], [`Host`], [`Pod`], [`Cluster`]) whose
//! `Drop` kills the processes inside and deletes the namespace, also when a test panics. Every
//! long-lived process (etcd, flanneld) runs as a [`Daemon`]; [`Etcd`] also runs on loopback for
//! the integration tests ([`Etcd::start_local`]). Names
//! carry the test process's pid and a counter, so tests run in parallel; namespaces left behind
//! by a process that died (SIGKILL, Ctrl-C) are swept at the next start ([`sweep_stale`]).
//!
//! The flanneld binary comes from [`flanneld_bin`]: `$FLANNELD_BIN` when set, otherwise the
//! workspace's release build, which is (re)built once per test process with
//! `cargo build --release -p flannel --bin flanneld` (a no-op when up to date). Pods are made by
//! the `flannel` CNI plugin ([`cni_plugin_bin`], `$FLANNEL_CNI_BIN`, same rule) unless
//! `NETNS_TESTS_CNI=0`, which makes them by hand (see [`PodMode`]).
//!
//! Everything needs root. Tests start with [`require_test_bed!`] (or [`require_root!`],
//! [`require!`]): without root it prints a skip note and returns from the test, unless `CI` is
//! set, where it panics (see [`privileges`]).

pub mod bins;
mod built;
pub mod capture;
pub mod charon;
pub mod cluster;
pub mod cmd;
pub mod daemon;
pub mod etcd;
pub mod etcd_cmd;
pub mod flanneld_cmd;
pub mod go_peers;
pub mod hash;
pub mod host;
pub mod kube;
pub mod netns;
pub mod packet;
pub mod pod;
pub mod privileges;
pub mod traffic;
pub mod underlay;
pub mod wg_flood;
pub mod wireguard_go;

use std::time::{Duration, Instant};

pub use bins::{cni_plugin_bin, flanneld_bin};
pub use cluster::{par_map, ping_pairs, Backend, Cluster, ClusterBuilder, KernelState, LeaseInfo};
pub use daemon::Daemon;
pub use etcd::{free_port, CertKey, Etcd, LocalEtcd, ServerTls, WatchEvent, WatchLog};
pub use etcd_cmd::{etcd_bin, EtcdSpec, EtcdTls};
pub use flanneld_cmd::FlanneldCommand;
pub use go_peers::{go_peers, GoPeers};
pub use host::{Host, HostOptions, KubeMode, ProcStats};
pub use kube::{kube_peers, ControlPlane, KubeOptions, KubePeers};
pub use netns::{sweep_stale, unique_prefix, Netns};
pub use pod::{Pod, PodMode};
pub use privileges::Need;
pub use traffic::{
    fill_pseudo_random, http_get, tcp_transfer, tcp_transfer_to, PacedReport, PacedTransfer,
    PingRun, PingStats, Transfer,
};
pub use underlay::Underlay;
pub use wg_flood::{FloodReport, HandshakeFlood};
pub use wireguard_go::WireguardGo;

/// Held while a heavy or timing-sensitive test runs (see [`heavy_lock`]).
#[derive(Debug)]
pub struct HeavyLock {
    _file: nix::fcntl::Flock<std::fs::File>,
}

/// Serializes heavy tests (many hosts, or loss measured at 10 ms resolution) across threads
/// and test processes: an exclusive `flock` on `$TMPDIR/netns-tests-heavy.lock`, released when
/// the guard is dropped (or the process dies). Each call opens the file anew, so two threads of
/// one process exclude each other too.
pub fn heavy_lock() -> HeavyLock {
    use nix::errno::Errno;
    use nix::fcntl::{Flock, FlockArg};
    let path = std::env::temp_dir().join("netns-tests-heavy.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    let start = Instant::now();
    let mut file = file;
    let file = loop {
        match Flock::lock(file, FlockArg::LockExclusive) {
            Ok(locked) => break locked,
            Err((unlocked, Errno::EINTR)) => file = unlocked,
            Err((_, errno)) => panic!("flock {}: {errno}", path.display()),
        }
    };
    if start.elapsed() > Duration::from_secs(1) {
        eprintln!(
            "netns-tests: waited {:?} for the heavy-test lock",
            start.elapsed()
        );
    }
    HeavyLock { _file: file }
}

/// Clock ticks per second (`_SC_CLK_TCK`): the unit of the CPU times in `/proc/<pid>/stat`.
pub fn clock_ticks_per_second() -> f64 {
    use nix::unistd::{sysconf, SysconfVar};
    // Linux has always reported 100 here; the fallback only guards the division.
    let ticks = sysconf(SysconfVar::CLK_TCK).ok().flatten().unwrap_or(100);
    ticks.max(1) as f64
}

/// Errors of the test bed. Messages say what was being done and what was seen. `Debug` prints
/// the message too, so `.expect()` in a test shows logs with their line breaks.
#[derive(thiserror::Error)]
pub enum Error {
    /// A command exited non-zero.
    #[error("`{cmd}` failed ({status}): {stderr}")]
    Command {
        cmd: String,
        status: String,
        stderr: String,
    },
    /// An I/O error while doing `what`.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// A condition did not become true in time.
    #[error("timed out after {waited:?} waiting for {what}; last observation: {last}")]
    Timeout {
        what: String,
        waited: Duration,
        last: String,
    },
    /// Anything else, with a sentence that explains it.
    #[error("{0}")]
    Other(String),
}

impl std::fmt::Debug for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

impl Error {
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            what: what.into(),
            source,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a poll did not succeed (see [`wait_for`]).
#[derive(Debug)]
pub enum Wait {
    /// Not yet; poll again (the reason ends up in the timeout error).
    NotYet(String),
    /// It will never happen (e.g. the process died): stop polling now.
    Fatal(Error),
}

impl From<String> for Wait {
    fn from(s: String) -> Wait {
        Wait::NotYet(s)
    }
}

/// Polls `probe` every 100 ms until it returns `Ok(value)` or `timeout` passes. The probe returns
/// `Err(reason)` for "not yet"; the last reason ends up in the timeout error.
pub fn wait_until<T>(
    timeout: Duration,
    what: &str,
    mut probe: impl FnMut() -> Result<T, String>,
) -> Result<T> {
    wait_for(timeout, Duration::from_millis(100), what, || {
        probe().map_err(Wait::NotYet)
    })
}

/// Polls `probe` every `every` until it returns `Ok`, returns [`Wait::Fatal`], or `timeout`
/// passes.
pub fn wait_for<T>(
    timeout: Duration,
    every: Duration,
    what: &str,
    mut probe: impl FnMut() -> Result<T, Wait>,
) -> Result<T> {
    let start = Instant::now();
    loop {
        match probe() {
            Ok(v) => return Ok(v),
            Err(Wait::Fatal(e)) => return Err(e),
            Err(Wait::NotYet(last)) => {
                if start.elapsed() >= timeout {
                    return Err(Error::Timeout {
                        what: what.to_string(),
                        waited: start.elapsed(),
                        last,
                    });
                }
            }
        }
        std::thread::sleep(every);
    }
}
