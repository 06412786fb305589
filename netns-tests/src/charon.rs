//! strongSwan's charon (Debian's `strongswan-charon`) as a host's IKE daemon, for the ipsec
//! backend: one charon per host namespace with its own `strongswan.conf`, VICI socket and log.
//!
//! charon writes its pid file to the fixed `/var/run/charon.pid` and refuses to start when it
//! exists, so each one runs in a private mount namespace with a tmpfs of its own on `/run`;
//! everything the test reads (the VICI socket, the log) lives in the host's directory instead.
//!
//! On a kernel without ESP (`CONFIG_INET_ESP`), charon's userspace ESP (`kernel-libipsec`, a
//! TUN device `ipsec0`, ESP always in UDP 4500) stands in for the kernel's.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::{cmd, wait_until, Daemon, Error, Netns, Result};

/// Where Debian installs charon and swanctl.
pub const CHARON_BIN: &str = "/usr/lib/ipsec/charon";
pub const SWANCTL_BIN: &str = "/usr/sbin/swanctl";

/// A charon running in one host namespace. Dropping it kills charon.
#[derive(Debug)]
pub struct Charon {
    daemon: Daemon,
    netns: String,
    dir: PathBuf,
    userspace_esp: bool,
}

/// Whether charon and swanctl are installed (`scripts/deps.sh` installs them).
pub fn installed() -> bool {
    Path::new(CHARON_BIN).exists() && Path::new(SWANCTL_BIN).exists()
}

/// Writes `<dir>/strongswan.conf` for the charon flannel's Go flanneld starts itself in `ns`
/// (it finds it through `STRONGSWAN_CONF`): VICI at flannel's fixed `/var/run/charon.vici`,
/// so that flanneld must run in a mount namespace with a `/run` of its own. Returns the path.
pub fn conf_for_go_flanneld(ns: &Netns, dir: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(format!("mkdir {}", dir.display()), e))?;
    let path = dir.join("strongswan.conf");
    let text = conf_text(None, &dir.join("charon.log"), !kernel_has_esp(ns));
    std::fs::write(&path, text).map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
    Ok(path)
}

/// The wrapper that gives a process a `/run` of its own (charon's fixed pid file and flannel's
/// fixed VICI socket live there): `sh -c '...' <program> <args>`.
pub const PRIVATE_RUN: &[&str] = &[
    "unshare",
    "--mount",
    "--propagation",
    "private",
    "sh",
    "-c",
    "mount -t tmpfs tmpfs /run && exec \"$0\" \"$@\"",
];

/// A `strongswan.conf` with only the plugins IKEv2 with a PSK and flannel's proposals need (kdf:
/// strongSwan 5.9.8 derives keys through it), no modular loading (the host's /etc/strongswan.d
/// does not matter), VICI at `socket` (charon's default when `None`), the log at `log`.
fn conf_text(socket: Option<&Path>, log: &Path, userspace_esp: bool) -> String {
    let kernel = if userspace_esp {
        "kernel-libipsec kernel-netlink"
    } else {
        "kernel-netlink"
    };
    let vici = match socket {
        Some(s) => format!(
            "    vici {{\n      socket = unix://{}\n    }}\n",
            s.display()
        ),
        None => String::new(),
    };
    format!(
        "charon {{\n  load_modular = no\n  load = random nonce openssl aes sha1 sha2 hmac gmp gcm \
         kdf pem pkcs1 x509 pubkey {kernel} socket-default vici\n  plugins {{\n{vici}  }}\n  \
         filelog {{\n    log {{\n      path = {log}\n      time_format = %T\n      \
         default = 1\n    }}\n  }}\n}}\n",
        log = log.display(),
    )
}

/// Whether the kernel of `ns` can do ESP: an ESP state can be added (and is removed again).
pub fn kernel_has_esp(ns: &Netns) -> bool {
    let state = [
        "xfrm",
        "state",
        "add",
        "src",
        "198.18.255.1",
        "dst",
        "198.18.255.2",
        "proto",
        "esp",
        "spi",
        "0x4242",
        "mode",
        "tunnel",
        "enc",
        "cbc(aes)",
        "0x00112233445566778899aabbccddeeff",
        "auth",
        "hmac(sha256)",
        "0x00112233445566778899aabbccddeeff",
    ];
    let added = ns.ip(&state).is_ok();
    if added {
        let _ = ns.ip(&[
            "xfrm",
            "state",
            "delete",
            "src",
            "198.18.255.1",
            "dst",
            "198.18.255.2",
            "proto",
            "esp",
            "spi",
            "0x4242",
        ]);
    }
    added
}

impl Charon {
    /// Writes `<dir>/strongswan.conf` and starts charon in `ns`; returns once its VICI socket
    /// answers.
    pub fn start(ns: &Netns, dir: &Path) -> Result<Charon> {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io(format!("mkdir {}", dir.display()), e))?;
        let userspace_esp = !kernel_has_esp(ns);
        let c = Charon {
            daemon: Daemon::new(
                format!("charon on {}", ns.name()),
                dir.join("charon.out"),
                30,
            ),
            netns: ns.name().to_string(),
            dir: dir.to_path_buf(),
            userspace_esp,
        };
        std::fs::write(c.conf_path(), c.conf())
            .map_err(|e| Error::io(format!("writing {}", c.conf_path().display()), e))?;
        c.launch()?;
        Ok(c)
    }

    fn conf_path(&self) -> PathBuf {
        self.dir.join("strongswan.conf")
    }

    /// The VICI socket flanneld talks to (`FLANNELD_IPSEC_VICI_SOCKET`).
    pub fn vici_socket(&self) -> PathBuf {
        self.dir.join("charon.vici")
    }

    /// The environment a process needs to run this charon's configuration (flannel's Go
    /// flanneld starts a charon of its own, which inherits it).
    pub fn strongswan_conf_env(&self) -> (String, String) {
        (
            "STRONGSWAN_CONF".into(),
            self.conf_path().display().to_string(),
        )
    }

    /// Whether ESP runs in charon (no kernel ESP here) rather than in the kernel.
    pub fn userspace_esp(&self) -> bool {
        self.userspace_esp
    }

    fn conf(&self) -> String {
        conf_text(
            Some(&self.vici_socket()),
            &self.log_path(),
            self.userspace_esp,
        )
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("charon.log")
    }

    fn launch(&self) -> Result<()> {
        let _ = std::fs::remove_file(self.vici_socket());
        let mut c = crate::netns::command_in(Some(&self.netns), PRIVATE_RUN[0]);
        c.args(&PRIVATE_RUN[1..])
            .arg(CHARON_BIN)
            .env("STRONGSWAN_CONF", self.conf_path());
        self.daemon.start(c)?;
        wait_until(Duration::from_secs(20), "charon's VICI socket", || {
            self.daemon.check_alive()?;
            self.swanctl(&["--stats"]).map_err(|e| e.to_string())
        })?;
        Ok(())
    }

    /// Stops charon (SIGTERM: it removes its SAs and policies) and starts it again, empty.
    pub fn restart(&self) -> Result<()> {
        self.daemon.stop(Duration::from_secs(10));
        self.launch()
    }

    /// Kills charon without letting it clean up.
    pub fn kill9(&self) {
        self.daemon.kill9()
    }

    /// Runs `swanctl <args>` against this charon → stdout.
    pub fn swanctl(&self, args: &[&str]) -> Result<String> {
        let mut c: Command = crate::netns::command_in(Some(&self.netns), SWANCTL_BIN);
        c.args(args)
            .arg("--uri")
            .arg(format!("unix://{}", self.vici_socket().display()));
        cmd::check(&mut c)
    }

    /// The IKE SAs charon holds, as `swanctl --list-sas --raw` prints them (one per line).
    pub fn sas(&self) -> Result<String> {
        self.swanctl(&["--list-sas", "--raw"])
    }

    /// The names of the connections charon has loaded.
    pub fn conns(&self) -> Result<Vec<String>> {
        let out = self.swanctl(&["--list-conns", "--raw"])?;
        Ok(out
            .lines()
            .filter_map(|l| l.strip_prefix("list-conn event {"))
            .filter_map(|l| l.split_whitespace().next())
            .map(|s| s.trim_end_matches('=').trim_end_matches('{').to_string())
            .collect())
    }

    /// Whether charon holds an installed child SA with the peer at `peer_ip`.
    pub fn has_child_sa_with(&self, peer_ip: std::net::Ipv4Addr) -> Result<bool> {
        let out = self.sas()?;
        Ok(out.lines().any(|l| {
            l.contains(&format!("remote-host={peer_ip} "))
                && l.contains("child-sas {")
                && l.contains("state=INSTALLED")
        }))
    }

    pub fn log_tail(&self, lines: usize) -> String {
        cmd::tail(&self.log_path(), lines)
    }
}
