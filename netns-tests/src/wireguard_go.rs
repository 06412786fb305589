//! A foreign WireGuard peer: Debian's `wireguard-go` configured with `wg`, standing in for a
//! flannel node with the `wireguard` backend (flannel's device, address, route, MTU and lease),
//! for the interop tests and `flannel-bench wireguard`.
//!
//! wireguard-go's control socket lives in `/run/wireguard/<device>.sock`, a directory that is
//! not per network namespace: two instances named `flannel-wg` in two namespaces would take
//! each other's socket. Each instance therefore runs in a mount namespace of its own with a
//! private tmpfs on `/run/wireguard`, and every `wg` command enters that mount namespace (and
//! the network namespace) of the running daemon with `nsenter`. Dropping a [`WireguardGo`]
//! kills the daemon; its TUN device, socket and tmpfs go with it.
//!
//! A node with an IPv6 half ([`NodeSpec::v6`]) is flannel's `Mode: separate` in a dual-stack
//! network: a second wireguard-go runs `flannel-wg-v6` with the same key on `ListenPortV6`,
//! carrying IPv6 over the IPv6 underlay, and the lease has `PublicIPv6` and `BackendV6Data`.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use ipnetwork::{IpNetwork, Ipv4Network, Ipv6Network};
use serde_json::json;

use crate::cluster::LeaseInfo;
use crate::privileges::Need;
use crate::{cmd, wait_until, Daemon, Error, Etcd, Host, Result};

/// What a test running wireguard-go needs besides the namespace test bed.
pub const NEEDS: &[Need<'static>] = &[
    Need::Tool("wireguard-go"),
    Need::Tool("wg"),
    Need::Tool("nsenter"),
    Need::Tool("unshare"),
];

/// flannel's device name for IPv4 (`flannel-wg`).
pub const DEVICE: &str = "flannel-wg";
/// flannel's device name for IPv6 in `Mode: separate` (`flannel-wg-v6`).
pub const DEVICE_V6: &str = "flannel-wg-v6";
/// flannel's default `ListenPort`.
pub const DEFAULT_PORT: u16 = 51820;
/// flannel's default `ListenPortV6`.
pub const DEFAULT_PORT_V6: u16 = 51821;
/// flannel's constant WireGuard overhead: device MTU = link MTU − 80.
pub const OVERHEAD: u32 = 80;

/// A Curve25519 key pair in WireGuard's base64 form.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyPair {
    pub private: String,
    pub public: String,
}

impl std::fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Test logs may be shared: the private half stays out of them.
        f.debug_struct("KeyPair")
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}

impl KeyPair {
    /// `wg genkey` and `wg pubkey`.
    pub fn generate() -> Result<KeyPair> {
        let private = cmd::run("wg", &["genkey"])?.trim().to_string();
        let public = public_key_of(&private)?;
        Ok(KeyPair { private, public })
    }
}

/// `wg pubkey` of a base64 private key.
pub fn public_key_of(private: &str) -> Result<String> {
    let mut c = Command::new("wg");
    c.arg("pubkey")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().map_err(|e| Error::io("starting wg pubkey", e))?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(private.as_bytes())
        .map_err(|e| Error::io("writing to wg pubkey", e))?;
    let out = child
        .wait_with_output()
        .map_err(|e| Error::io("wg pubkey", e))?;
    if !out.status.success() {
        return Err(Error::Command {
            cmd: "wg pubkey".into(),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// `wg genpsk`: a random preshared key (base64).
pub fn generate_psk() -> Result<String> {
    Ok(cmd::run("wg", &["genpsk"])?.trim().to_string())
}

/// A base64 WireGuard key as its 32 bytes.
pub fn key_bytes(key: &str) -> Result<[u8; 32]> {
    let raw = crate::etcd::base64_decode(key.trim())?;
    raw.try_into()
        .map_err(|v: Vec<u8>| Error::Other(format!("key {key:?} is {} bytes, not 32", v.len())))
}

/// Where and how a wireguard-go node runs (see [`WireguardGo::start`]).
#[derive(Debug, Clone)]
pub struct NodeSpec {
    /// The network namespace to run in (it must exist and have the underlay address).
    pub netns: String,
    /// Directory for the key files and the daemon's log (must exist).
    pub dir: PathBuf,
    /// The underlay address: the lease's `PublicIP` and the peers' endpoint.
    pub public_ip: Ipv4Addr,
    /// The node's lease subnet; the device gets its network address `/32`, as flannel does.
    pub subnet: Ipv4Network,
    /// The flannel Network, routed into the device.
    pub network: Ipv4Network,
    /// `ListenPort`.
    pub port: u16,
    /// Device MTU (flannel: link MTU − 80).
    pub mtu: u32,
    /// `LOG_LEVEL` of wireguard-go: `verbose` (every handshake is logged), `error`, `silent`.
    pub log_level: String,
    /// The key pair to use; `None` generates one.
    pub keys: Option<KeyPair>,
    /// The IPv6 half (device [`DEVICE_V6`]); `None` for an IPv4-only node.
    pub v6: Option<V6Spec>,
}

/// The IPv6 half of a dual-stack node in flannel's `Mode: separate`.
#[derive(Debug, Clone)]
pub struct V6Spec {
    /// The IPv6 underlay address: the lease's `PublicIPv6`.
    pub public_ip: Ipv6Addr,
    /// The node's IPv6 lease subnet; the device gets its network address `/128`.
    pub subnet: Ipv6Network,
    /// flannel's `IPv6Network`, routed into the device.
    pub network: Ipv6Network,
    /// `ListenPortV6`.
    pub port: u16,
}

impl NodeSpec {
    /// A node in host `h`'s namespace with `subnet` of `network`, flannel's port and MTU for a
    /// 1500-byte underlay, keys and log in the host's directory.
    pub fn on_host(h: &Host, network: Ipv4Network, subnet: Ipv4Network) -> NodeSpec {
        NodeSpec {
            netns: h.name().to_string(),
            dir: h.dir().to_path_buf(),
            public_ip: h.public_ip(),
            subnet,
            network,
            port: DEFAULT_PORT,
            mtu: 1500 - OVERHEAD,
            log_level: "verbose".into(),
            keys: None,
            v6: None,
        }
    }
}

/// A peer as flannel configures it from a lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub public_key: String,
    /// An IPv6 endpoint makes it a peer of [`DEVICE_V6`].
    pub endpoint: SocketAddr,
    pub allowed_ips: Vec<IpNetwork>,
    /// The network's `PSK` (base64), `None` for none.
    pub psk: Option<String>,
    /// `PersistentKeepaliveInterval` in seconds (0: off).
    pub keepalive: u16,
}

/// `{"PublicKey", "Port"}` of a lease's `field` (`BackendData`, `BackendV6Data`); a port of 0
/// or none means `default`, as flannel reads leases written before 2025.
fn key_and_port(lease: &LeaseInfo, field: &str, default: u16) -> Result<(String, u16)> {
    let bad = |why: String| Error::Other(format!("lease {}: {why}: {}", lease.key, lease.value));
    let data = &lease.value[field];
    let key = data["PublicKey"]
        .as_str()
        .ok_or_else(|| bad(format!("{field} has no PublicKey")))?;
    let port = match data["Port"].as_u64().unwrap_or(0) {
        0 => default,
        p => u16::try_from(p).map_err(|_| bad(format!("{field}.Port {p} is not a port")))?,
    };
    Ok((key.to_string(), port))
}

impl Peer {
    /// The peer flannel makes of a `wireguard` lease: its key, `PublicIP:Port` (flannel's
    /// default port when the lease says 0, as flannel before 2025 wrote), its subnet.
    pub fn from_lease(lease: &LeaseInfo, psk: Option<&str>, keepalive: u16) -> Result<Peer> {
        let (public_key, port) = key_and_port(lease, "BackendData", DEFAULT_PORT)?;
        Ok(Peer {
            public_key,
            endpoint: SocketAddrV4::new(lease.public_ip, port).into(),
            allowed_ips: vec![lease.subnet.into()],
            psk: psk.map(str::to_string),
            keepalive,
        })
    }

    /// The peer of `flannel-wg-v6` flannel makes of a dual-stack `wireguard` lease in
    /// `Mode: separate`: `BackendV6Data`'s key, `[PublicIPv6]:Port` (`ListenPortV6`'s default
    /// when 0), the IPv6 subnet.
    pub fn from_lease_v6(lease: &LeaseInfo, psk: Option<&str>, keepalive: u16) -> Result<Peer> {
        let (public_key, port) = key_and_port(lease, "BackendV6Data", DEFAULT_PORT_V6)?;
        let bad = |why: &str| Error::Other(format!("lease {}: {why}: {}", lease.key, lease.value));
        let ip = lease.public_ipv6.ok_or_else(|| bad("no PublicIPv6"))?;
        let subnet = lease
            .subnet_v6
            .ok_or_else(|| bad("no IPv6 subnet in the key"))?;
        Ok(Peer {
            public_key,
            endpoint: SocketAddrV6::new(ip, port, 0, 0).into(),
            allowed_ips: vec![subnet.into()],
            psk: psk.map(str::to_string),
            keepalive,
        })
    }

    /// The device flannel adds this peer to: the one of its endpoint's family.
    pub fn device(&self) -> &'static str {
        if self.endpoint.is_ipv6() {
            DEVICE_V6
        } else {
            DEVICE
        }
    }
}

/// One peer in `wg show <dev> dump`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerState {
    pub public_key: String,
    pub has_psk: bool,
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: Vec<String>,
    /// Unix seconds of the last completed handshake (0: none yet).
    pub latest_handshake: u64,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    /// Persistent keepalive in seconds (`None`: off).
    pub keepalive: Option<u16>,
}

/// `wg show <dev> dump`, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dump {
    pub public_key: String,
    pub listen_port: u16,
    pub peers: Vec<PeerState>,
}

impl Dump {
    /// Parses the tab-separated output of `wg show <dev> dump`.
    pub fn parse(text: &str) -> Result<Dump> {
        let bad = |line: &str| Error::Other(format!("unexpected line in wg show dump: {line:?}"));
        let mut lines = text.lines().filter(|l| !l.trim().is_empty());
        let head = lines.next().ok_or_else(|| bad("(empty)"))?;
        let f: Vec<&str> = head.split('\t').collect();
        if f.len() < 4 {
            return Err(bad(head));
        }
        let mut dump = Dump {
            public_key: f[1].to_string(),
            listen_port: f[2].parse().map_err(|_| bad(head))?,
            peers: Vec::new(),
        };
        for line in lines {
            let f: Vec<&str> = line.split('\t').collect();
            if f.len() < 8 {
                return Err(bad(line));
            }
            let num = |s: &str| s.parse::<u64>().map_err(|_| bad(line));
            dump.peers.push(PeerState {
                public_key: f[0].to_string(),
                has_psk: f[1] != "(none)",
                endpoint: f[2].parse().ok(),
                allowed_ips: match f[3] {
                    "(none)" => Vec::new(),
                    list => list.split(',').map(str::to_string).collect(),
                },
                latest_handshake: num(f[4])?,
                rx_bytes: num(f[5])?,
                tx_bytes: num(f[6])?,
                keepalive: f[7].parse().ok(),
            });
        }
        Ok(dump)
    }

    pub fn peer(&self, public_key: &str) -> Option<&PeerState> {
        self.peers.iter().find(|p| p.public_key == public_key)
    }
}

/// Kinds of handshake messages wireguard-go logs at `LOG_LEVEL=verbose`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HandshakeLog {
    pub initiations_sent: usize,
    pub initiations_received: usize,
    pub responses_sent: usize,
    pub responses_received: usize,
    pub cookies_sent: usize,
    pub cookies_received: usize,
}

impl HandshakeLog {
    /// Counts the handshake lines of a wireguard-go log.
    pub fn parse(log: &str) -> HandshakeLog {
        let count = |what: &str| log.lines().filter(|l| l.contains(what)).count();
        HandshakeLog {
            initiations_sent: count("Sending handshake initiation"),
            initiations_received: count("Received handshake initiation"),
            responses_sent: count("Sending handshake response"),
            responses_received: count("Received handshake response"),
            cookies_sent: count("Sending cookie response"),
            cookies_received: count("Received cookie response"),
        }
    }

    /// Handshakes that completed (either side's initiation answered).
    pub fn completed(&self) -> usize {
        self.responses_sent + self.responses_received
    }

    /// Asserts who started the handshake: the flannel node (`we_initiate`, wireguard-go
    /// answered) or wireguard-go (the flannel node answered).
    pub fn assert_started_by(&self, we_initiate: bool) {
        if we_initiate {
            assert!(
                self.initiations_received >= 1 && self.responses_sent >= 1,
                "we initiated, wireguard-go answered: {self:?}"
            );
        } else {
            assert!(
                self.initiations_sent >= 1 && self.responses_received >= 1,
                "wireguard-go initiated, we answered: {self:?}"
            );
        }
    }
}

/// One wireguard-go daemon: a device of the node.
#[derive(Debug)]
struct Device {
    name: &'static str,
    port: u16,
    daemon: Daemon,
}

/// A running wireguard-go node (see the module doc).
#[derive(Debug)]
pub struct WireguardGo {
    /// [`DEVICE`], then [`DEVICE_V6`] when the node has an IPv6 half.
    devices: Vec<Device>,
    spec: NodeSpec,
    keys: Mutex<KeyPair>,
    /// Numbers the PSK files (a file per `wg set`, so a change never rewrites one in use).
    files: AtomicU32,
}

impl WireguardGo {
    /// Starts wireguard-go with device [`DEVICE`] in `spec.netns` and sets it up as flannel's
    /// backend does: private key and listen port, address `<subnet network>/32`, MTU, link up,
    /// one route for the whole Network on the device. No peers yet. With `spec.v6`, the same
    /// for [`DEVICE_V6`] with the IPv6 subnet, network and port.
    pub fn start(spec: NodeSpec) -> Result<WireguardGo> {
        let keys = match spec.keys.clone() {
            Some(k) => k,
            None => KeyPair::generate()?,
        };
        let device = |name, port, log: &str| Device {
            name,
            port,
            daemon: Daemon::new(
                format!("wireguard-go {name} in {}", spec.netns),
                spec.dir.join(log),
                40,
            ),
        };
        let mut devices = vec![device(DEVICE, spec.port, "wireguard-go.log")];
        if let Some(v6) = &spec.v6 {
            devices.push(device(DEVICE_V6, v6.port, "wireguard-go-v6.log"));
        }
        let node = WireguardGo {
            devices,
            spec,
            keys: Mutex::new(keys),
            files: AtomicU32::new(0),
        };
        for d in &node.devices {
            d.daemon.start(node.daemon_command(d.name))?;
            node.wait_control_socket(d)?;
        }
        node.set_private_key()?;
        let s = &node.spec;
        let mtu = s.mtu.to_string();
        let addr = format!("{}/32", s.subnet.network());
        let network = s.network.to_string();
        let mut setup = vec![
            vec!["addr", "add", &addr, "dev", DEVICE],
            vec!["link", "set", DEVICE, "mtu", &mtu, "up"],
            vec!["route", "replace", &network, "dev", DEVICE, "scope", "link"],
        ];
        let v6 = s.v6.as_ref().map(|v6| {
            (
                format!("{}/128", v6.subnet.network()),
                v6.network.to_string(),
            )
        });
        if let Some((addr6, network6)) = &v6 {
            setup.extend([
                vec!["-6", "addr", "add", addr6, "dev", DEVICE_V6, "nodad"],
                vec!["link", "set", DEVICE_V6, "mtu", &mtu, "up"],
                vec!["-6", "route", "replace", network6, "dev", DEVICE_V6],
            ]);
        }
        for args in setup {
            node.ip(&args)?;
        }
        Ok(node)
    }

    /// `wireguard-go -f <device>` in its own mount namespace with a private `/run/wireguard`.
    fn daemon_command(&self, device: &str) -> Command {
        let mut c = crate::netns::command_in(Some(&self.spec.netns), "unshare");
        c.args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg(
                "mkdir -p /run/wireguard && \
                 mount -t tmpfs -o mode=0700 flannel-wg-bed /run/wireguard && \
                 exec wireguard-go -f \"$1\"",
            )
            .args(["wireguard-go", device])
            .env("LOG_LEVEL", &self.spec.log_level)
            // wireguard-go would otherwise fork into the background.
            .env("WG_PROCESS_FOREGROUND", "1");
        c.process_group(0);
        c
    }

    fn wait_control_socket(&self, d: &Device) -> Result<()> {
        wait_until(
            Duration::from_secs(10),
            &format!("wireguard-go's {} in {} to answer", d.name, self.spec.netns),
            || {
                d.daemon.check_alive()?;
                self.wg_on(d.name, &["show", d.name, "public-key"])
                    .map(drop)
                    .map_err(|e| e.to_string())
            },
        )
    }

    fn device(&self, name: &str) -> Result<&Device> {
        self.devices
            .iter()
            .find(|d| d.name == name)
            .ok_or_else(|| Error::Other(format!("this wireguard-go node has no {name}")))
    }

    fn v4(&self) -> &Device {
        &self.devices[0]
    }

    /// The pid of [`DEVICE`]'s daemon while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.v4().daemon.pid()
    }

    /// The daemon's pid (the namespaces `wg` enters), or why it does not run.
    fn running_pid(d: &Device) -> Result<u32> {
        d.daemon.check_alive().map_err(Error::Other).and_then(|()| {
            d.daemon
                .pid()
                .ok_or_else(|| Error::Other(format!("wireguard-go {} is not running", d.name)))
        })
    }

    /// `wg args...` inside the mount and network namespaces of [`DEVICE`]'s daemon → stdout.
    pub fn wg(&self, args: &[&str]) -> Result<String> {
        self.wg_on(DEVICE, args)
    }

    /// `wg args...` inside the namespaces of `device`'s daemon → stdout.
    pub fn wg_on(&self, device: &str, args: &[&str]) -> Result<String> {
        let pid = Self::running_pid(self.device(device)?)?.to_string();
        let mut c = Command::new("nsenter");
        c.args(["--target", &pid, "--mount", "--net", "wg"])
            .args(args);
        cmd::check(&mut c)
    }

    /// `ip -n <netns> args...`.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut c = Command::new("ip");
        c.arg("-n").arg(&self.spec.netns).args(args);
        cmd::check(&mut c)
    }

    pub fn netns(&self) -> &str {
        &self.spec.netns
    }

    pub fn spec(&self) -> &NodeSpec {
        &self.spec
    }

    pub fn public_key(&self) -> String {
        self.keys.lock().unwrap().public.clone()
    }

    pub fn keys(&self) -> KeyPair {
        self.keys.lock().unwrap().clone()
    }

    /// The underlay endpoint peers send to.
    pub fn endpoint(&self) -> SocketAddrV4 {
        SocketAddrV4::new(self.spec.public_ip, self.spec.port)
    }

    /// The IPv6 underlay endpoint of [`DEVICE_V6`], if the node has one.
    pub fn endpoint_v6(&self) -> Option<SocketAddrV6> {
        let v6 = self.spec.v6.as_ref()?;
        Some(SocketAddrV6::new(v6.public_ip, v6.port, 0, 0))
    }

    /// Whether every daemon runs; otherwise why not.
    pub fn check_alive(&self) -> Result<(), String> {
        self.devices.iter().try_for_each(|d| d.daemon.check_alive())
    }

    /// The whole log of [`DEVICE`]'s daemon.
    pub fn log(&self) -> String {
        self.v4().daemon.log()
    }

    /// Counts of the handshake messages in [`DEVICE`]'s log so far.
    pub fn handshake_log(&self) -> HandshakeLog {
        HandshakeLog::parse(&self.v4().daemon.log())
    }

    /// Counts of the handshake messages in `device`'s log so far.
    pub fn handshake_log_on(&self, device: &str) -> Result<HandshakeLog> {
        Ok(HandshakeLog::parse(&self.device(device)?.daemon.log()))
    }

    /// wireguard-go's CPU seconds so far (user + system) for [`DEVICE`].
    pub fn cpu_secs(&self) -> Result<f64> {
        crate::host::ProcStats::read(Self::running_pid(self.v4())?).map(|s| s.cpu_secs)
    }

    /// A fresh file under the node's directory holding `secret`, readable by root only.
    fn secret_file(&self, what: &str, secret: &str) -> Result<PathBuf> {
        let n = self.files.fetch_add(1, Ordering::Relaxed);
        let path = self.spec.dir.join(format!("wg-{what}-{n}"));
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| Error::io(format!("creating {}", path.display()), e))?;
        f.write_all(secret.as_bytes())
            .map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
        Ok(path)
    }

    /// Every device gets the node's key (flannel uses one key for both) and its port.
    fn set_private_key(&self) -> Result<()> {
        let private = self.keys.lock().unwrap().private.clone();
        let file = self.secret_file("key", &private)?;
        let r = self.devices.iter().try_for_each(|d| {
            let port = d.port.to_string();
            self.wg_on(
                d.name,
                &[
                    "set",
                    d.name,
                    "private-key",
                    &file.to_string_lossy(),
                    "listen-port",
                    &port,
                ],
            )
            .map(drop)
        });
        let _ = std::fs::remove_file(&file);
        r
    }

    /// Replaces the node's key with a new one (the lease must be put again for peers to
    /// learn it); returns the new public key.
    pub fn rotate_key(&self) -> Result<String> {
        let new = KeyPair::generate()?;
        let public = new.public.clone();
        *self.keys.lock().unwrap() = new;
        self.set_private_key()?;
        Ok(public)
    }

    /// `wg set <device> peer ...` as flannel's `addPeer`, on the device of the peer's endpoint
    /// family: endpoint, allowed IPs (replacing the old ones), PSK (removed when `None`),
    /// persistent keepalive.
    pub fn set_peer(&self, peer: &Peer) -> Result<()> {
        let device = peer.device();
        self.device(device)?;
        let psk = self.secret_file("psk", peer.psk.as_deref().unwrap_or(""))?;
        let endpoint = peer.endpoint.to_string();
        let allowed = peer
            .allowed_ips
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let keepalive = peer.keepalive.to_string();
        let r = self.wg_on(
            device,
            &[
                "set",
                device,
                "peer",
                &peer.public_key,
                "preshared-key",
                &psk.to_string_lossy(),
                "endpoint",
                &endpoint,
                "allowed-ips",
                &allowed,
                "persistent-keepalive",
                &keepalive,
            ],
        );
        let _ = std::fs::remove_file(&psk);
        r.map(drop)
    }

    /// `wg set <device> peer <key> remove` on every device.
    pub fn remove_peer(&self, public_key: &str) -> Result<()> {
        self.devices.iter().try_for_each(|d| {
            self.wg_on(d.name, &["set", d.name, "peer", public_key, "remove"])
                .map(drop)
        })
    }

    /// What flannel's backend does with a full listing: a peer for every `wireguard` lease
    /// other than this node's (by subnet) on each device whose family the lease has, and no
    /// peer whose key no lease holds any more (the removal flannel skips after a key change).
    /// Returns the peers set.
    pub fn sync_peers(
        &self,
        leases: &[LeaseInfo],
        psk: Option<&str>,
        keepalive: u16,
    ) -> Result<Vec<Peer>> {
        let mut peers = Vec::new();
        for l in leases {
            if l.subnet == self.spec.subnet || l.backend_type.as_deref() != Some("wireguard") {
                continue;
            }
            peers.push(Peer::from_lease(l, psk, keepalive)?);
            if self.spec.v6.is_some() && l.subnet_v6.is_some() {
                peers.push(Peer::from_lease_v6(l, psk, keepalive)?);
            }
        }
        for p in &peers {
            self.set_peer(p)?;
        }
        for d in &self.devices {
            for have in self.dump_on(d.name)?.peers {
                let wanted = peers
                    .iter()
                    .any(|p| p.device() == d.name && p.public_key == have.public_key);
                if !wanted {
                    self.wg_on(d.name, &["set", d.name, "peer", &have.public_key, "remove"])?;
                }
            }
        }
        Ok(peers)
    }

    /// `wg show flannel-wg dump`, parsed.
    pub fn dump(&self) -> Result<Dump> {
        self.dump_on(DEVICE)
    }

    /// `wg show <device> dump`, parsed.
    pub fn dump_on(&self, device: &str) -> Result<Dump> {
        Dump::parse(&self.wg_on(device, &["show", device, "dump"])?)
    }

    /// The state of the peer with `public_key` on [`DEVICE`], if configured.
    pub fn peer_state(&self, public_key: &str) -> Result<Option<PeerState>> {
        self.peer_state_on(DEVICE, public_key)
    }

    /// The state of the peer with `public_key` on `device`, if configured.
    pub fn peer_state_on(&self, device: &str, public_key: &str) -> Result<Option<PeerState>> {
        Ok(self.dump_on(device)?.peer(public_key).cloned())
    }

    /// Polls until a handshake with `public_key` on [`DEVICE`] newer than `after` (unix
    /// seconds) completed; the peer's state then.
    pub fn wait_handshake(
        &self,
        public_key: &str,
        after: u64,
        timeout: Duration,
    ) -> Result<PeerState> {
        self.wait_handshake_on(DEVICE, public_key, after, timeout)
    }

    /// [`WireguardGo::wait_handshake`] on `device`.
    pub fn wait_handshake_on(
        &self,
        device: &str,
        public_key: &str,
        after: u64,
        timeout: Duration,
    ) -> Result<PeerState> {
        wait_until(
            timeout,
            &format!("a handshake with {public_key} on {device} after {after}"),
            || {
                self.check_alive()?;
                let state = self
                    .peer_state_on(device, public_key)
                    .map_err(|e| e.to_string())?
                    .ok_or_else(|| format!("no peer {public_key}"))?;
                if state.latest_handshake > after {
                    Ok(state)
                } else {
                    Err(format!("{state:?}"))
                }
            },
        )
    }

    /// The lease key flannel writes: `<subnets prefix>10.5.1.0-24`, with
    /// `&fc00:0:0:1::-64` after it for a dual-stack node.
    pub fn lease_key(&self, subnets_prefix: &str) -> String {
        let s = self.spec.subnet;
        let mut key = format!("{subnets_prefix}{}-{}", s.network(), s.prefix());
        if let Some(v6) = &self.spec.v6 {
            let _ = write!(key, "&{}-{}", v6.subnet.network(), v6.subnet.prefix());
        }
        key
    }

    /// The lease value flannel's `wireguard` backend writes for this node: Go's encoding of
    /// `LeaseAttrs`, field for field (`BackendV6Data` only for a dual-stack node).
    pub fn lease_value(&self) -> String {
        let mut v = json!({
            "PublicIP": self.spec.public_ip.to_string(),
            "PublicIPv6": null,
            "BackendType": "wireguard",
            "BackendData": {"PublicKey": self.public_key(), "Port": self.spec.port},
        });
        if let Some(v6) = &self.spec.v6 {
            v["PublicIPv6"] = json!(v6.public_ip.to_string());
            v["BackendV6Data"] = json!({"PublicKey": self.public_key(), "Port": v6.port});
        }
        v.to_string()
    }

    /// Writes this node's lease into etcd under a fresh etcd lease of `ttl` (as flannel's
    /// `createSubnet` and `updateSubnet` do, each with a new grant).
    pub fn put_lease(&self, etcd: &Etcd, subnets_prefix: &str, ttl: Duration) -> Result<()> {
        put_with_ttl(
            etcd,
            &self.lease_key(subnets_prefix),
            &self.lease_value(),
            ttl,
        )
    }

    /// Writes flannel's subnet file for this node (what the CNI plugin reads).
    pub fn write_subnet_file(&self, path: &Path) -> Result<()> {
        let s = &self.spec;
        let mut text = String::new();
        let _ = writeln!(text, "FLANNEL_NETWORK={}", s.network);
        let first = Ipv4Addr::from(u32::from(s.subnet.network()) + 1);
        let _ = writeln!(text, "FLANNEL_SUBNET={first}/{}", s.subnet.prefix());
        if let Some(v6) = &s.v6 {
            let _ = writeln!(text, "FLANNEL_IPV6_NETWORK={}", v6.network);
            let first = Ipv6Addr::from(u128::from(v6.subnet.network()) + 1);
            let _ = writeln!(text, "FLANNEL_IPV6_SUBNET={first}/{}", v6.subnet.prefix());
        }
        let _ = writeln!(text, "FLANNEL_MTU={}", s.mtu);
        let _ = writeln!(text, "FLANNEL_IPMASQ=false");
        std::fs::write(path, text).map_err(|e| Error::io(format!("writing {}", path.display()), e))
    }
}

/// `etcdctl lease grant <ttl>` then `etcdctl put --lease=<id> key value`.
pub fn put_with_ttl(etcd: &Etcd, key: &str, value: &str, ttl: Duration) -> Result<()> {
    let ttl = ttl.as_secs().max(1).to_string();
    let out = etcd.etcdctl(&["lease", "grant", &ttl])?;
    // "lease 694d8b2b5d1f3c0a granted with TTL(3600s)"
    let id = out
        .split_whitespace()
        .nth(1)
        .filter(|id| id.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| Error::Other(format!("etcdctl lease grant: unexpected output {out:?}")))?;
    etcd.etcdctl(&["put", &format!("--lease={id}"), key, value])
        .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_wg_show_dump() {
        let text = "aPriv=\tIfacePub=\t51820\toff\n\
                    PeerA=\t(none)\t198.18.0.11:51820\t10.5.2.0/24\t1764596000\t1234\t5678\t25\n\
                    PeerB=\tPSK=\t(none)\t(none)\t0\t0\t0\toff\n";
        let d = Dump::parse(text).unwrap();
        assert_eq!(d.public_key, "IfacePub=");
        assert_eq!(d.listen_port, 51820);
        let a = d.peer("PeerA=").unwrap();
        assert!(!a.has_psk);
        assert_eq!(a.endpoint, Some("198.18.0.11:51820".parse().unwrap()));
        assert_eq!(a.allowed_ips, ["10.5.2.0/24"]);
        assert_eq!(
            (a.latest_handshake, a.rx_bytes, a.tx_bytes, a.keepalive),
            (1_764_596_000, 1234, 5678, Some(25))
        );
        let b = d.peer("PeerB=").unwrap();
        assert!(b.has_psk);
        assert_eq!((b.endpoint, b.keepalive), (None, None));
        assert!(b.allowed_ips.is_empty());
        assert!(Dump::parse("").is_err());
        assert!(Dump::parse("a\tb\t51820\toff\nshort\tline\n").is_err());
    }

    #[test]
    fn a_peer_from_a_flannel_lease() {
        let lease = LeaseInfo::parse(
            "/coreos.com/network/subnets/10.5.7.0-24",
            r#"{"PublicIP":"198.18.0.12","PublicIPv6":null,"BackendType":"wireguard","BackendData":{"PublicKey":"K=","Port":0}}"#,
        )
        .unwrap();
        let p = Peer::from_lease(&lease, Some("P="), 25).unwrap();
        // Port 0 (flannel before 2025) means flannel's default.
        assert_eq!(p.endpoint, "198.18.0.12:51820".parse().unwrap());
        assert_eq!(p.allowed_ips, ["10.5.7.0/24".parse().unwrap()]);
        assert_eq!(
            (p.public_key.as_str(), p.psk.as_deref()),
            ("K=", Some("P="))
        );
        let vxlan = LeaseInfo::parse(
            "/coreos.com/network/subnets/10.5.8.0-24",
            r#"{"PublicIP":"198.18.0.13","BackendType":"vxlan","BackendData":{"VtepMAC":"aa:bb:cc:dd:ee:ff"}}"#,
        )
        .unwrap();
        let e = Peer::from_lease(&vxlan, None, 0).unwrap_err().to_string();
        assert!(e.contains("PublicKey") && e.contains("10.5.8.0-24"), "{e}");
    }

    #[test]
    fn a_flannel_wg_v6_peer_from_a_dual_stack_lease() {
        let lease = LeaseInfo::parse(
            "/coreos.com/network/subnets/10.5.7.0-24&fc00:0:0:7::-64",
            r#"{"PublicIP":"198.18.0.12","PublicIPv6":"fd00:18::12","BackendType":"wireguard","BackendData":{"PublicKey":"K=","Port":51820},"BackendV6Data":{"PublicKey":"K=","Port":51821}}"#,
        )
        .unwrap();
        let p = Peer::from_lease_v6(&lease, None, 0).unwrap();
        assert_eq!(p.endpoint, "[fd00:18::12]:51821".parse().unwrap());
        assert_eq!(p.allowed_ips, ["fc00:0:0:7::/64".parse().unwrap()]);
        assert_eq!(p.device(), DEVICE_V6);
        assert_eq!(Peer::from_lease(&lease, None, 0).unwrap().device(), DEVICE);
        let v4_only = LeaseInfo::parse(
            "/coreos.com/network/subnets/10.5.7.0-24",
            r#"{"PublicIP":"198.18.0.12","BackendType":"wireguard","BackendData":{"PublicKey":"K=","Port":51820}}"#,
        )
        .unwrap();
        let e = Peer::from_lease_v6(&v4_only, None, 0)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("BackendV6Data") && e.contains("10.5.7.0-24"),
            "{e}"
        );
    }

    #[test]
    fn counts_handshake_lines() {
        let log = "DEBUG: 2026/12/01 13:00:00 peer(abcd…wxyz) - Sending handshake initiation\n\
                   DEBUG: 2026/12/01 13:00:00 peer(abcd…wxyz) - Received handshake response\n\
                   DEBUG: 2026/12/01 13:00:09 peer(abcd…wxyz) - Received handshake initiation\n\
                   DEBUG: 2026/12/01 13:00:09 peer(abcd…wxyz) - Sending handshake response\n";
        let h = HandshakeLog::parse(log);
        assert_eq!((h.initiations_sent, h.initiations_received), (1, 1));
        assert_eq!(h.completed(), 2);
    }
}
