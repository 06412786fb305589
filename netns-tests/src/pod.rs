//! "Pods": namespaces with one interface on a host's `cni0` bridge.

use std::io::Write;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use ipnetwork::Ipv4Network;

use crate::traffic::{parse_ping, PingRun, PingStats};
use crate::{cmd, cni_plugin_bin, wait_until, Error, Host, Netns, Result};

/// How pods get their network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodMode {
    /// The test bed does it: bridge `cni0` in the host with the subnet's first address, a veth
    /// `vp<n>` on it, the pod's `eth0` with the subnet's `n + 2`-th address, MTU from the subnet
    /// file, default route via the bridge address.
    Static,
    /// The flannel CNI plugin does it (`CNI_COMMAND=ADD` run in the host namespace with a
    /// flannel conf pointing at the host's subnet file; DEL when the pod is dropped).
    Cni {
        /// The `flannel` plugin binary.
        plugin: PathBuf,
        /// `CNI_PATH`: where the delegate plugins (`bridge`, `host-local`) are.
        cni_path: String,
    },
}

impl PodMode {
    /// The flannel CNI plugin with `CNI_PATH` = its directory, `/usr/lib/cni`, `/opt/cni/bin`.
    pub fn cni(plugin: PathBuf) -> PodMode {
        let dir = plugin
            .parent()
            .map(|d| d.display().to_string())
            .unwrap_or_default();
        PodMode::Cni {
            plugin,
            cni_path: format!("{dir}:/usr/lib/cni:/opt/cni/bin"),
        }
    }

    /// From `$NETNS_TESTS_CNI`: `0` or `static` → [`PodMode::Static`]; unset, empty or `1` →
    /// the CNI plugin from [`cni_plugin_bin`]; anything else → the plugin at that path.
    pub fn from_env() -> Result<PodMode> {
        let v = std::env::var("NETNS_TESTS_CNI").unwrap_or_default();
        Ok(match v.as_str() {
            "0" | "static" => PodMode::Static,
            "" | "1" => PodMode::cni(cni_plugin_bin()?),
            p => PodMode::cni(PathBuf::from(p)),
        })
    }
}

/// A pod: namespace `<host ns>p<n>` with `eth0` on its host's bridge. Dropping it deletes the
/// namespace (after a CNI DEL in [`PodMode::Cni`]).
#[derive(Debug)]
pub struct Pod {
    cni: Option<CniAttachment>,
    ns: Netns,
    ip: Ipv4Addr,
    network: Ipv4Network,
    gateway: Ipv4Addr,
    mtu: u32,
    host: usize,
    host_ns: String,
}

#[derive(Debug)]
struct CniAttachment {
    plugin: PathBuf,
    cni_path: String,
    conf: String,
}

impl Pod {
    pub(crate) fn create(host: &Host, n: usize) -> Result<Pod> {
        let subnet = host.subnet()?;
        let mtu = host.mtu()?;
        let name = format!("{}p{n}", host.name());
        let ns = Netns::create(&name)?;
        match host.pod_mode().clone() {
            PodMode::Static => Self::create_static(host, ns, n, subnet, mtu),
            PodMode::Cni { plugin, cni_path } => {
                Self::create_cni(host, ns, subnet, mtu, plugin, cni_path)
            }
        }
    }

    fn create_static(
        host: &Host,
        ns: Netns,
        n: usize,
        subnet: Ipv4Network,
        mtu: u32,
    ) -> Result<Pod> {
        let gateway = nth(subnet, 1)?;
        let ip = nth(subnet, n as u32 + 2)?;
        let h = host.netns();
        let len = subnet.prefix();
        let mtu_s = mtu.to_string();
        if h.ip(&["link", "show", "cni0"]).is_err() {
            h.ip(&["link", "add", "cni0", "mtu", &mtu_s, "type", "bridge"])?;
            h.ip(&["addr", "add", &format!("{gateway}/{len}"), "dev", "cni0"])?;
            h.ip(&["link", "set", "cni0", "up"])?;
        }
        plug_into_cni0(h, &format!("vp{n}"), mtu, &ns)?;
        ns.ip(&["addr", "add", &format!("{ip}/{len}"), "dev", "eth0"])?;
        ns.ip(&["link", "set", "eth0", "up"])?;
        ns.ip(&["route", "add", "default", "via", &gateway.to_string()])?;
        Ok(Pod {
            cni: None,
            ns,
            ip,
            network: subnet,
            gateway,
            mtu,
            host: host.index(),
            host_ns: host.name().to_string(),
        })
    }

    fn create_cni(
        host: &Host,
        ns: Netns,
        subnet: Ipv4Network,
        mtu: u32,
        plugin: PathBuf,
        cni_path: String,
    ) -> Result<Pod> {
        let conf = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": host.name(),
            "type": "flannel",
            "subnetFile": host.subnet_file(),
            "dataDir": host.dir().join("cni"),
            "delegate": {"hairpinMode": true, "isDefaultGateway": true},
            "ipam": {"type": "host-local", "dataDir": host.dir().join("ipam")},
        })
        .to_string();
        let att = CniAttachment {
            plugin,
            cni_path,
            conf,
        };
        let out = att.run(host.name(), ns.name(), "ADD")?;
        let result: serde_json::Value = serde_json::from_str(&out)
            .map_err(|e| Error::Other(format!("CNI ADD result is not JSON ({e}): {out}")))?;
        let addr = result["ips"][0]["address"].as_str().unwrap_or_default();
        let net: Ipv4Network = addr
            .parse()
            .map_err(|_| Error::Other(format!("CNI ADD result has no IPv4 address: {out}")))?;
        let gateway = result["ips"][0]["gateway"]
            .as_str()
            .and_then(|g| g.parse().ok())
            .unwrap_or(nth(subnet, 1)?);
        Ok(Pod {
            cni: Some(att),
            ns,
            ip: net.ip(),
            network: subnet,
            gateway,
            mtu,
            host: host.index(),
            host_ns: host.name().to_string(),
        })
    }

    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// Whether the CNI plugin made this pod.
    pub fn via_cni(&self) -> bool {
        self.cni.is_some()
    }

    pub fn name(&self) -> &str {
        self.ns.name()
    }

    pub fn netns(&self) -> &Netns {
        &self.ns
    }

    /// Index of the host the pod lives on.
    pub fn host_index(&self) -> usize {
        self.host
    }

    /// The host's lease subnet the pod's address comes from.
    pub fn subnet(&self) -> Ipv4Network {
        self.network
    }

    pub fn gateway(&self) -> Ipv4Addr {
        self.gateway
    }

    /// MTU of the pod's `eth0` as read from the kernel after it was made.
    pub fn mtu(&self) -> u32 {
        self.mtu
    }

    /// `count` pings to `dst`, 0.2 s apart, each waiting up to 1 s.
    pub fn ping(&self, dst: Ipv4Addr, count: u32) -> Result<PingStats> {
        let out = cmd::output(self.ns.command("ping").args([
            "-n",
            "-q",
            "-c",
            &count.to_string(),
            "-i",
            "0.2",
            "-W",
            "1",
            &dst.to_string(),
        ]))?;
        parse_ping(&String::from_utf8_lossy(&out.stdout)).ok_or_else(|| Error::Command {
            cmd: format!("ping {dst} in {}", self.name()),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }

    /// Polls until one ping to `dst` is answered.
    pub fn wait_reaches(&self, dst: Ipv4Addr, timeout: Duration) -> Result<()> {
        wait_until(
            timeout,
            &format!("{} ({}) to reach {dst}", self.name(), self.ip),
            || {
                let out = cmd::output(self.ns.command("ping").args([
                    "-n",
                    "-c",
                    "1",
                    "-W",
                    "1",
                    &dst.to_string(),
                ]))
                .map_err(|e| e.to_string())?;
                if out.status.success() {
                    Ok(())
                } else {
                    Err(String::from_utf8_lossy(&out.stdout).trim().to_string())
                }
            },
        )
    }

    /// Pings `dst` with DF set and `payload` bytes of ICMP data (IP packet = payload + 28):
    /// `true` when a reply comes back (up to 3 tries), `false` when none does or the kernel
    /// refuses to send it (too big for the path).
    pub fn ping_df(&self, dst: Ipv4Addr, payload: u32) -> Result<bool> {
        let out = cmd::output(self.ns.command("ping").args([
            "-n",
            "-q",
            "-c",
            "3",
            "-i",
            "0.2",
            "-W",
            "1",
            "-M",
            "do",
            "-s",
            &payload.to_string(),
            &dst.to_string(),
        ]))?;
        Ok(out.status.success())
    }

    /// Starts `ping -i <interval>` to `dst` in the background; [`PingRun::stop`] gives the
    /// statistics. Intervals under 0.2 s need root (we are).
    pub fn start_ping(&self, dst: Ipv4Addr, interval: Duration) -> Result<PingRun> {
        PingRun::start(self.ns.command("ping"), dst, interval)
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        if let Some(att) = &self.cni {
            if let Err(e) = att.run(&self.host_ns, self.ns.name(), "DEL") {
                eprintln!("netns-tests: CNI DEL of {}: {e}", self.ns.name());
            }
        }
    }
}

impl CniAttachment {
    fn run(&self, host_ns: &str, pod_ns: &str, command: &str) -> Result<String> {
        let mut c = std::process::Command::new("ip");
        c.args(["netns", "exec", host_ns])
            .arg(&self.plugin)
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", pod_ns)
            .env("CNI_NETNS", format!("/run/netns/{pod_ns}"))
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", &self.cni_path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let what = format!("CNI {command} of {pod_ns} with {}", self.plugin.display());
        let mut child = c.spawn().map_err(|e| Error::io(what.clone(), e))?;
        child
            .stdin
            .take()
            .expect("piped")
            .write_all(self.conf.as_bytes())
            .map_err(|e| Error::io(what.clone(), e))?;
        let out = child
            .wait_with_output()
            .map_err(|e| Error::io(what.clone(), e))?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            Ok(stdout)
        } else {
            Err(Error::Command {
                cmd: what,
                status: out.status.to_string(),
                stderr: format!("{stdout}{}", String::from_utf8_lossy(&out.stderr)),
            })
        }
    }
}

/// The `n`-th address of `net` (0 = network address).
/// A veth pair with MTU `mtu`: `port` on the host's `cni0` bridge (up), its peer `eth0` in
/// `pod` (left down).
pub fn plug_into_cni0(host: &Netns, port: &str, mtu: u32, pod: &Netns) -> Result<()> {
    let mtu = mtu.to_string();
    host.ip(&[
        "link",
        "add",
        port,
        "mtu",
        &mtu,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "mtu",
        &mtu,
        "netns",
        pod.name(),
    ])?;
    host.ip(&["link", "set", port, "master", "cni0", "up"])
        .map(drop)
}

fn nth(net: Ipv4Network, n: u32) -> Result<Ipv4Addr> {
    if u64::from(n) + 1 >= u64::from(net.size()) {
        return Err(Error::Other(format!("{net} has no room for address #{n}")));
    }
    Ok(Ipv4Addr::from(u32::from(net.network()) + n))
}
