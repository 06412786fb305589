//! Test bed for the plugin: a "host" network namespace the plugin runs in (so the bridge and
//! iptables rules never touch the real host), pod namespaces, a temp subnet file and temp stores.
//! Everything is removed by `Drop`, even when a test fails.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use netns_tests::Need;
use serde_json::{json, Value};

pub const PLUGIN: &str = env!("CARGO_BIN_EXE_flannel");
pub const CNI_DIR: &str = "/usr/lib/cni";

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A short unique name: prefix + pid + counter (bridge names must stay ≤ 15 characters).
pub fn unique(prefix: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    format!("{prefix}{}x{n}", std::process::id() % 100_000)
}

/// What the plugin tests need: root, iproute2 and the reference plugins. Not there: fail under
/// CI, skip otherwise (`netns_tests::require_all!(common::PRIVILEGED)`).
pub const PRIVILEGED: &[Need] = &[
    Need::Root,
    Need::Tool("ip"),
    Need::File("/usr/lib/cni/bridge"),
    Need::File("/usr/lib/cni/host-local"),
];

pub fn sh(args: &[&str]) -> Output {
    Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {args:?}: {e}"))
}

pub fn sh_ok(args: &[&str]) -> String {
    let out = sh(args);
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace, deleted on drop (by the test bed's guard).
pub struct Netns {
    pub name: String,
    _guard: netns_tests::Netns,
}

impl Netns {
    pub fn new(prefix: &str) -> Netns {
        let name = unique(prefix);
        let guard = netns_tests::Netns::create(&name).unwrap();
        Netns {
            name,
            _guard: guard,
        }
    }
    pub fn path(&self) -> String {
        format!("/var/run/netns/{}", self.name)
    }
    /// Run a command inside.
    pub fn exec(&self, args: &[&str]) -> Output {
        let mut all = vec!["ip", "netns", "exec", &self.name];
        all.extend_from_slice(args);
        sh(&all)
    }
    /// Link names in this namespace.
    pub fn links(&self) -> Vec<String> {
        let out = sh_ok(&["ip", "-n", &self.name, "-o", "link", "show"]);
        out.lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n).to_string())
            .collect()
    }
    pub fn addr_show(&self, dev: &str) -> String {
        sh_ok(&["ip", "-n", &self.name, "addr", "show", "dev", dev])
    }
    pub fn ping(&self, ip: &str) -> bool {
        self.exec(&["ping", "-c1", "-W1", ip]).status.success()
    }
}

/// What one plugin run returned.
#[derive(Debug)]
pub struct Run {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "stdout is not JSON ({e}): {:?} / {}",
                self.stdout, self.stderr
            )
        })
    }
    /// Assert success and return the result JSON (if any).
    pub fn expect_ok(&self) -> Value {
        assert!(self.ok, "plugin failed: {} {}", self.stdout, self.stderr);
        if self.stdout.trim().is_empty() {
            Value::Null
        } else {
            self.json()
        }
    }
    /// Assert failure with this code; return the message.
    pub fn expect_err(&self, code: u64) -> String {
        assert!(
            !self.ok,
            "plugin succeeded, expected error {code}: {}",
            self.stdout
        );
        let v = self.json();
        assert_eq!(v["code"], code, "wrong code: {v}");
        let msg = v["msg"].as_str().unwrap_or_default().to_string();
        assert!(!msg.is_empty(), "error without msg: {v}");
        assert!(v["cniVersion"].is_string(), "error without cniVersion: {v}");
        msg
    }
}

/// A flannel "host": its namespace, subnet file, data dirs and a conf for the plugin.
pub struct Host {
    pub ns: Netns,
    pub dir: tempfile::TempDir,
    pub bridge: String,
    pub conf: Value,
}

pub const SUBNET_ENV: &str = "FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.72.1/24\n\
                              FLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n";

impl Host {
    pub fn new(version: &str) -> Host {
        Host::with_subnet_env(version, SUBNET_ENV)
    }

    pub fn with_subnet_env(version: &str, subnet_env: &str) -> Host {
        let ns = Netns::new("fch");
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("subnet.env"), subnet_env).unwrap();
        let bridge = unique("fcb");
        let conf = json!({
            "cniVersion": version,
            "name": "cbr0",
            "type": "flannel",
            "subnetFile": dir.path().join("subnet.env"),
            "dataDir": dir.path().join("flannel"),
            "ipam": { "dataDir": dir.path().join("networks") },
            "delegate": { "bridge": bridge, "hairpinMode": true, "isDefaultGateway": true },
        });
        Host {
            ns,
            dir,
            bridge,
            conf,
        }
    }

    pub fn subnet_file(&self) -> PathBuf {
        self.dir.path().join("subnet.env")
    }

    /// The host-local store directory of this network.
    pub fn store(&self) -> PathBuf {
        self.dir.path().join("networks").join("cbr0")
    }

    /// Address files in the store: (ip, content).
    pub fn store_entries(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let Ok(rd) = std::fs::read_dir(self.store()) else {
            return out;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.parse::<std::net::IpAddr>().is_ok() {
                out.push((name, std::fs::read_to_string(e.path()).unwrap_or_default()));
            }
        }
        out.sort();
        out
    }

    /// Run a plugin binary inside the host namespace.
    pub fn run_bin(&self, bin: &str, env: &[(&str, &str)], stdin: &[u8]) -> Run {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns.name, bin]);
        for k in [
            "CNI_COMMAND",
            "CNI_CONTAINERID",
            "CNI_NETNS",
            "CNI_IFNAME",
            "CNI_PATH",
            "CNI_ARGS",
        ] {
            cmd.env_remove(k);
        }
        cmd.envs(env.iter().copied());
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn plugin");
        {
            use std::io::Write;
            let mut si = child.stdin.take().unwrap();
            let _ = si.write_all(stdin);
        }
        let out = child.wait_with_output().expect("wait plugin");
        Run {
            ok: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Run our plugin with the usual environment.
    pub fn cni(&self, cmd: &str, id: &str, netns: &str, ifname: &str, conf: &Value) -> Run {
        let stdin = serde_json::to_vec(conf).unwrap();
        self.run_bin(
            PLUGIN,
            &[
                ("CNI_COMMAND", cmd),
                ("CNI_CONTAINERID", id),
                ("CNI_NETNS", netns),
                ("CNI_IFNAME", ifname),
                ("CNI_PATH", CNI_DIR),
            ],
            &stdin,
        )
    }

    pub fn add(&self, id: &str, pod: &Netns) -> Run {
        self.cni("ADD", id, &pod.path(), "eth0", &self.conf)
    }

    pub fn del(&self, id: &str, pod: &Netns) -> Run {
        self.cni("DEL", id, &pod.path(), "eth0", &self.conf)
    }

    /// Host-side links other than lo and the bridge.
    pub fn veths(&self) -> Vec<String> {
        self.ns
            .links()
            .into_iter()
            .filter(|l| l.starts_with("veth"))
            .collect()
    }
}

/// The address in a result JSON, e.g. "10.5.72.2/24".
pub fn result_address(v: &Value) -> String {
    v["ips"][0]["address"]
        .as_str()
        .unwrap_or_else(|| panic!("no address in {v}"))
        .to_string()
}

pub fn strip_prefix(cidr: &str) -> &str {
    cidr.split('/').next().unwrap()
}
