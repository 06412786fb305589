//! `wireguard`: flannel's encrypted backend. Leases carry `{"PublicKey","Port"}` (and the
//! same for IPv6 in `BackendV6Data`); each peer's allowed IPs are its lease subnets; a device
//! holds our subnet's network address (/32, /128) and one route per Network it carries.
//!
//! Devices by `Mode` ([`device_specs`]): `separate` has `flannel-wg` for IPv4 over an IPv4
//! underlay and `flannel-wg-v6` for IPv6 over an IPv6 underlay; `ipv4`, `ipv6` and `auto`
//! have one `flannel-wg` carrying both families over one underlay (`auto`: chosen per peer
//! as flannel's `selectMode`, [`select_underlay`]).
//!
//! flannel needs the kernel module. We probe for it ([`kernel`]) and otherwise run a
//! userspace WireGuard ([`engine`]) on a TUN device with the udp fast path's socket machinery;
//! the protocol itself is gotatun's audited `noise` layer.
//!
//! Modules: [`config`] the options, [`keyfile`] the private key file, [`peers`] the lock-free
//! peer table, [`engine`] the threads, [`inner6`] IPv6 packets on the device, [`counters`]
//! the metrics, [`kernel`] the probe.

pub mod config;
pub mod counters;
pub mod engine;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
mod heap;
pub mod inner6;
pub mod kernel;
pub mod kernel_device;
pub mod keyfile;
pub mod peers;

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;

use async_trait::async_trait;
use ipnetwork::{IpNetwork, Ipv4Network, Ipv6Network};
use serde_json::json;
use zeroize::Zeroizing;

use super::common::{self, fatal, ReconcileTally, Skipped};
use super::udp::device::Tun;
use super::udp::socket::UdpSock;
use super::{Backend, BackendContext, BackendError, Publish, ReconcileReport};
use crate::netlink::{self, Netlink};
use crate::subnet::{Lease, LeaseAttrs, PeerSet, SubnetKey};
use config::{Mode, WgConfig};
use counters::Counters;
use engine::Engine;
use peers::{Peer, PeerTable};

#[cfg(test)]
mod tests;

pub const BACKEND: &str = "wireguard";
/// flannel's device names.
pub const DEVICE: &str = "flannel-wg";
pub const DEVICE_V6: &str = "flannel-wg-v6";

/// Which underlay a device reaches its peers over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Underlay {
    V4,
    V6,
    /// Per peer, as [`select_underlay`] chooses (one socket for both families).
    Auto,
}

/// One WireGuard device and what it carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSpec {
    pub name: &'static str,
    pub port: u16,
    pub underlay: Underlay,
    /// The Networks routed through it.
    pub v4: Option<Ipv4Network>,
    pub v6: Option<Ipv6Network>,
}

/// flannel's devices for `cfg.mode` and the Networks the config enables.
pub fn device_specs(
    cfg: &WgConfig,
    v4: Option<Ipv4Network>,
    v6: Option<Ipv6Network>,
) -> Vec<DeviceSpec> {
    let one = |underlay| DeviceSpec {
        name: DEVICE,
        port: cfg.listen_port,
        underlay,
        v4,
        v6,
    };
    match cfg.mode {
        Mode::Separate => {
            let mut specs = Vec::new();
            if v4.is_some() {
                specs.push(DeviceSpec {
                    v6: None,
                    ..one(Underlay::V4)
                });
            }
            if v6.is_some() {
                specs.push(DeviceSpec {
                    name: DEVICE_V6,
                    port: cfg.listen_port_v6,
                    underlay: Underlay::V6,
                    v4: None,
                    v6,
                });
            }
            specs
        }
        Mode::Ipv4 => vec![one(Underlay::V4)],
        Mode::Ipv6 => vec![one(Underlay::V6)],
        Mode::Auto => vec![one(Underlay::Auto)],
    }
}

/// `BackendData` and `BackendV6Data` for the families the config enables, as flannel
/// publishes them (the v6 port: see [`WgConfig::advertised_v6_port`]).
pub fn lease_data(
    cfg: &WgConfig,
    public_key: &[u8; 32],
    v4: bool,
    v6: bool,
) -> (Option<serde_json::Value>, Option<serde_json::Value>) {
    let key = config::encode_key(public_key);
    (
        v4.then(|| json!({"PublicKey": key, "Port": cfg.listen_port})),
        v6.then(|| json!({"PublicKey": key, "Port": cfg.advertised_v6_port()})),
    )
}

/// RFC 1918, as flannel's `IP4.IsPrivate`.
fn private_v4(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    a == 10 || (a == 172 && b & 0xf0 == 16) || (a == 192 && b == 168)
}

/// RFC 4193 (`fc00::/7`), as flannel's `IP6.IsPrivate`.
fn private_v6(ip: Ipv6Addr) -> bool {
    ip.octets()[0] & 0xfe == 0xfc
}

/// flannel's `selectMode` for `auto`: IPv4 unless the peer's IPv4 address is private (or
/// we have none) and both its and our IPv6 addresses are public. One addition: a peer
/// that publishes no IPv4 address is reached over IPv6 (flannel would dial `0.0.0.0`).
pub fn select_underlay(
    peer_v4: Option<Ipv4Addr>,
    peer_v6: Option<Ipv6Addr>,
    our_v4: Option<Ipv4Addr>,
    our_v6: Option<Ipv6Addr>,
) -> Underlay {
    let Some(peer_v6) = peer_v6 else {
        return Underlay::V4;
    };
    let Some(peer_v4) = peer_v4 else {
        return Underlay::V6;
    };
    if !private_v4(peer_v4) && our_v4.is_some() {
        return Underlay::V4;
    }
    if !private_v6(peer_v6) && our_v6.is_some_and(|o| !private_v6(o)) {
        return Underlay::V6;
    }
    Underlay::V4
}

/// Peer key → (lease endpoint, allowed IPs): what one device should hold.
type Wanted = BTreeMap<[u8; 32], (SocketAddr, Vec<IpNetwork>)>;

/// One peer from its lease: key, endpoint, allowed IPs.
type LeasePeer = ([u8; 32], SocketAddr, Vec<IpNetwork>);

/// The kernel device while it is ours.
struct KernelRun {
    dev: kernel_device::KernelDevice,
    index: u32,
    public: [u8; 32],
    /// What the device was told.
    peers: Wanted,
}

struct Running {
    engine: Arc<Engine>,
    threads: Vec<JoinHandle<()>>,
    index: u32,
}

impl Running {
    fn alive(&self) -> bool {
        self.threads.iter().all(|t| !t.is_finished())
    }

    fn stop(self) {
        self.engine.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// One device and its state.
struct Device {
    spec: DeviceSpec,
    run: Option<Running>,
    kernel: Option<KernelRun>,
    /// The endpoint each peer's lease named when the table was last built: the engine's
    /// endpoint (which roams) is only reset when the lease itself changes.
    lease_endpoints: HashMap<[u8; 32], SocketAddr>,
    skipped: Skipped,
}

impl Device {
    fn index(&self) -> Option<u32> {
        self.run
            .as_ref()
            .map(|r| r.index)
            .or(self.kernel.as_ref().map(|k| k.index))
    }

    fn stop(&mut self) {
        if let Some(run) = self.run.take() {
            run.stop();
        }
        self.kernel = None;
    }
}

/// Our addresses on the underlay, for [`select_underlay`].
#[derive(Debug, Clone, Copy, Default)]
struct OurAddrs {
    v4: Option<Ipv4Addr>,
    v6: Option<Ipv6Addr>,
}

pub struct WireguardBackend {
    ctx: BackendContext,
    cfg: WgConfig,
    network: Option<Ipv4Network>,
    network_v6: Option<Ipv6Network>,
    mtu: u32,
    key_file: PathBuf,
    nl: Option<Netlink>,
    devices: Vec<Device>,
    /// Our private key and where it came from, once read.
    key: Option<(Zeroizing<[u8; 32]>, &'static str)>,
    /// Whether the kernel's WireGuard is used (decided once, at the first start).
    kernel_wanted: Option<bool>,
    own: Option<Ipv4Network>,
    own_v6: Option<Ipv6Network>,
    counters: Arc<Counters>,
}

fn setup(why: String) -> BackendError {
    BackendError::Setup {
        backend: BACKEND,
        why,
    }
}

fn io_failed(context: String) -> impl FnOnce(std::io::Error) -> BackendError {
    move |source| BackendError::Io {
        backend: BACKEND,
        context,
        source,
    }
}

/// One of a lease's `BackendData` / `BackendV6Data` (`field`): its key and port (0 when
/// absent: flannel before 2025-03 published no port).
fn lease_key_port(
    data: Option<&serde_json::value::RawValue>,
    field: &str,
) -> Result<([u8; 32], u16), String> {
    let data = data.ok_or_else(|| format!("lease has no {field}"))?;
    let v: serde_json::Value =
        serde_json::from_str(data.get()).map_err(|e| format!("{field} is not JSON: {e}"))?;
    let key = v
        .get("PublicKey")
        .and_then(|k| k.as_str())
        .ok_or_else(|| format!("{field} has no PublicKey"))?;
    let key = config::decode_key(key).map_err(|why| format!("{field} PublicKey {key:?}: {why}"))?;
    let port = match v.get("Port") {
        None | Some(serde_json::Value::Null) => 0,
        Some(p) => p
            .as_u64()
            .filter(|p| *p <= 65535)
            .ok_or_else(|| format!("{field} Port {p} is not a port"))? as u16,
    };
    Ok((key, port))
}

/// What device `spec` needs of one peer lease: its key, the endpoint to reach it at and
/// its allowed IPs (the lease's subnets of the families the device carries); `Ok(None)` when
/// the lease has no subnet the device carries.
fn lease_peer(
    spec: &DeviceSpec,
    ours: OurAddrs,
    key: &SubnetKey,
    attrs: &LeaseAttrs,
) -> Result<Option<LeasePeer>, String> {
    let v4 = spec.v4.and(key.ipv4);
    let v6 = spec.v6.and(key.ipv6);
    if v4.is_none() && v6.is_none() {
        return Ok(None);
    }
    let kind = attrs.effective_backend_type();
    if kind != BACKEND {
        return Err(format!("backend type {kind:?} is not {BACKEND}"));
    }
    let d4 = v4
        .map(|_| lease_key_port(attrs.backend_data.as_deref(), "BackendData"))
        .transpose()?;
    let d6 = v6
        .map(|_| lease_key_port(attrs.backend_v6_data.as_deref(), "BackendV6Data"))
        .transpose()?;
    let public_key = d4.or(d6).map(|(k, _)| k).expect("one family at least");
    // A single device listens on ListenPort, which BackendData carries; flannel puts
    // ListenPortV6 into BackendV6Data there (nothing listens on it), so BackendData's port
    // comes first. 0 (an old flannel) means our own port.
    let port = [d4, d6]
        .into_iter()
        .flatten()
        .map(|(_, p)| p)
        .find(|p| *p != 0)
        .unwrap_or(spec.port);
    let underlay = match spec.underlay {
        Underlay::Auto => select_underlay(attrs.public_ip, attrs.public_ipv6, ours.v4, ours.v6),
        u => u,
    };
    let endpoint = match underlay {
        Underlay::V6 => SocketAddrV6::new(
            attrs.public_ipv6.ok_or("lease has no PublicIPv6")?,
            port,
            0,
            0,
        )
        .into(),
        _ => SocketAddrV4::new(attrs.public_ip.ok_or("lease has no PublicIP")?, port).into(),
    };
    let allowed = v4
        .map(IpNetwork::V4)
        .into_iter()
        .chain(v6.map(IpNetwork::V6))
        .collect();
    Ok(Some((public_key, endpoint, allowed)))
}

/// What device `spec` should hold for `peers`; leases it cannot use go to `skipped`.
fn wanted_peers(
    spec: &DeviceSpec,
    ours: OurAddrs,
    public: &[u8; 32],
    peers: &PeerSet,
    skipped: &mut Skipped,
) -> Wanted {
    let mut wanted = Wanted::new();
    for (key, lease) in peers {
        match lease_peer(spec, ours, key, &lease.attrs) {
            Ok(None) => {}
            Ok(Some((k, _, _))) if &k == public => {
                skipped.insert(*key, "lease carries our own public key".into());
            }
            Ok(Some((k, endpoint, nets))) => {
                wanted
                    .entry(k)
                    .or_insert((endpoint, Vec::new()))
                    .1
                    .extend(nets);
            }
            Err(why) => {
                skipped.insert(*key, why);
            }
        }
    }
    wanted
}

impl WireguardBackend {
    pub fn new(ctx: BackendContext) -> Result<Self, BackendError> {
        let cfg = WgConfig::parse(&ctx.config.backend)?;
        let network = ctx.config.v4.map(|f| f.network);
        let network_v6 = ctx.config.v6.map(|f| f.network);
        common::some_family(BACKEND, network, network_v6)?;
        let base = cfg.mtu.unwrap_or(ctx.ext.mtu);
        let mtu = base
            .checked_sub(config::OVERHEAD)
            .filter(|m| *m >= 576)
            .ok_or_else(|| {
                setup(format!(
                    "MTU {base} is too small for {} bytes of WireGuard overhead",
                    config::OVERHEAD
                ))
            })?;
        let devices = device_specs(&cfg, network, network_v6)
            .into_iter()
            .map(|spec| Device {
                spec,
                run: None,
                kernel: None,
                lease_endpoints: HashMap::new(),
                skipped: Skipped::new(),
            })
            .collect();
        let counters = Arc::new(Counters::default());
        ctx.metrics.wireguard.store(Some(counters.clone()));
        Ok(WireguardBackend {
            ctx,
            cfg,
            network,
            network_v6,
            mtu,
            key_file: keyfile::path_from_env(),
            nl: None,
            devices,
            key: None,
            kernel_wanted: None,
            own: None,
            own_v6: None,
            counters,
        })
    }

    pub fn counters(&self) -> Arc<Counters> {
        self.counters.clone()
    }

    fn our_addrs(&self) -> OurAddrs {
        let ext = &self.ctx.ext;
        OurAddrs {
            v4: ext.public_ip.or(ext.iface_addr),
            v6: ext.public_ipv6.or(ext.iface_v6_addr),
        }
    }

    /// The device's socket on its port of every address of its underlay's family: peers may
    /// reach us at the public IP even when it is not the interface's (NAT).
    fn bind_socket(&self, spec: &DeviceSpec) -> Result<UdpSock, BackendError> {
        let ext = &self.ctx.ext;
        let ours = self.our_addrs();
        let port = spec.port;
        let failed = |what: &str, e: std::io::Error| {
            setup(format!(
                "binding UDP port {port} of {}: {what}: {e}",
                spec.name
            ))
        };
        match spec.underlay {
            Underlay::V4 => {
                let ip = ours
                    .v4
                    .ok_or_else(|| setup(format!("interface {} has no IPv4 address", ext.name)))?;
                UdpSock::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port), true)
                    .map_err(|e| failed(&format!("IPv4 (public IP {ip})"), e))
            }
            Underlay::V6 => {
                let ip = ours
                    .v6
                    .ok_or_else(|| setup(format!("interface {} has no IPv6 address", ext.name)))?;
                UdpSock::bind(SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, port, 0, 0), true)
                    .map_err(|e| failed(&format!("IPv6 (public IPv6 {ip})"), e))
            }
            // Both families on one IPv6 socket; IPv4 alone where the host has no IPv6.
            Underlay::Auto => UdpSock::bind_dual_stack(port, true).or_else(|e6| {
                tracing::warn!(
                    "wireguard: {}: no IPv6 socket ({e6}); peers are reached over IPv4",
                    spec.name
                );
                UdpSock::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port), true)
                    .map_err(|e| failed("IPv4", e))
            }),
        }
    }

    /// Reads (or creates) the key and starts every device not running.
    async fn start(&mut self) -> Result<(), BackendError> {
        if self.key.is_none() {
            let (key, origin) = keyfile::load_or_create(&self.key_file).map_err(io_failed(
                format!("private key file {}", self.key_file.display()),
            ))?;
            let origin = match origin {
                keyfile::Origin::Read => "read from",
                keyfile::Origin::Created => "created in",
            };
            self.key = Some((key, origin));
        }
        for i in 0..self.devices.len() {
            if self.devices[i].index().is_none() {
                self.start_device(i).await?;
            }
        }
        Ok(())
    }

    async fn start_device(&mut self, i: usize) -> Result<(), BackendError> {
        self.devices[i].stop();
        let nl = common::connect(BACKEND, &mut self.nl)?;
        let (key, origin) = self.key.clone().expect("read by start");
        let spec = self.devices[i].spec.clone();
        let name = spec.name;
        let secret = gotatun::x25519::StaticSecret::from(*key);
        let public = *gotatun::x25519::PublicKey::from(&secret).as_bytes();
        if self.kernel_wanted.is_none() {
            let available = match kernel::probe(&nl.h).await {
                kernel::KernelWireguard::Available => true,
                kernel::KernelWireguard::Unavailable(why) => {
                    tracing::info!(
                        "wireguard: kernel WireGuard unavailable ({why}); using the userspace engine"
                    );
                    false
                }
            };
            self.kernel_wanted = Some(available);
        }
        if self.kernel_wanted == Some(true) {
            match self.start_kernel(&nl, i, &key, public).await {
                Ok(()) => {
                    tracing::info!(
                        "wireguard: kernel WireGuard on {name} (MTU {}), port {}, public key {} \
                         (private key {origin} {})",
                        self.mtu,
                        spec.port,
                        config::encode_key(&public),
                        self.key_file.display()
                    );
                    self.devices[i].lease_endpoints.clear();
                    return Ok(());
                }
                Err(e) => {
                    tracing::warn!(
                        "wireguard: kernel WireGuard could not be set up ({}); using the \
                         userspace engine",
                        crate::error_chain::Chain(&e)
                    );
                    self.kernel_wanted = Some(false);
                }
            }
        }
        // flannel deletes and recreates the device; a TUN device of ours is adopted.
        if let Ok(Some(link)) = netlink::link_by_name(&nl.h, name).await {
            if link.kind.as_deref().is_some_and(|k| k != "tun") {
                netlink::delete_link(&nl.h, link.index)
                    .await
                    .map_err(fatal(BACKEND, "deleting the old device"))?;
            }
        }
        // The virtio-net header and TSO/USO: super-packets are split before encryption.
        let tun = Tun::open(name, true).map_err(io_failed(format!("opening TUN device {name}")))?;
        let index = nix::net::if_::if_nametoindex(name)
            .map_err(|e| io_failed(format!("index of {name}"))(e.into()))?;
        // IPv6 off on a device that carries none (no link-local, router or multicast
        // packets from the kernel); on again on one that does (an adopted device may have
        // been a single-family one).
        let v6_off = if spec.v6.is_none() { "1" } else { "0" };
        let _ = std::fs::write(
            format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"),
            v6_off,
        );
        super::udp::kernel::set_up(&nl.h, name, index, self.mtu)
            .await
            .map_err(fatal(BACKEND, "setting the device up"))?;
        let sock = self.bind_socket(&spec)?;
        let engine = Arc::new(Engine::new(
            secret,
            self.cfg.psk,
            self.cfg.keepalive,
            self.mtu as u16,
            self.counters.clone(),
        ));
        tracing::info!(
            "wireguard: userspace engine on {name} (MTU {}) ↔ {}, public key {} \
             (private key {origin} {})",
            self.mtu,
            sock.local,
            config::encode_key(&public),
            self.key_file.display()
        );
        let threads = engine::spawn(Arc::new(tun), Arc::new(sock), engine.clone())
            .map_err(io_failed("starting the data-path threads".into()))?;
        let dev = &mut self.devices[i];
        dev.lease_endpoints.clear();
        dev.run = Some(Running {
            engine,
            threads,
            index,
        });
        Ok(())
    }

    /// The kernel device: flannel's steps (an existing device is deleted and created anew,
    /// our key and port set, every old peer dropped).
    async fn start_kernel(
        &mut self,
        nl: &Netlink,
        i: usize,
        key: &[u8; 32],
        public: [u8; 32],
    ) -> Result<(), BackendError> {
        let spec = &self.devices[i].spec;
        let name = spec.name;
        if let Some(link) = netlink::link_by_name(&nl.h, name)
            .await
            .map_err(fatal(BACKEND, "reading the device"))?
        {
            netlink::delete_link(&nl.h, link.index)
                .await
                .map_err(fatal(BACKEND, "deleting the old device"))?;
        }
        kernel::create(&nl.h, name)
            .await
            .map_err(fatal(BACKEND, "creating the device"))?;
        let index = netlink::link_by_name(&nl.h, name)
            .await
            .map_err(fatal(BACKEND, "reading the device"))?
            .ok_or_else(|| setup(format!("{name} vanished after its creation")))?
            .index;
        let mut dev = kernel_device::KernelDevice::connect(name)
            .map_err(io_failed("generic netlink".into()))?;
        dev.configure(*key, spec.port)
            .await
            .map_err(io_failed(format!("configuring {name}")))?;
        super::udp::kernel::set_up(&nl.h, name, index, self.mtu)
            .await
            .map_err(fatal(BACKEND, "setting the device up"))?;
        self.devices[i].kernel = Some(KernelRun {
            dev,
            index,
            public,
            peers: BTreeMap::new(),
        });
        Ok(())
    }

    fn public_key(&self) -> Option<[u8; 32]> {
        self.devices.iter().find_map(|d| {
            d.run
                .as_ref()
                .map(|r| r.engine.public_key())
                .or(d.kernel.as_ref().map(|k| k.public))
        })
    }

    /// Gives each device our addresses and the routes for its Networks; removes stale ones.
    async fn program_devices(&mut self, tally: &mut ReconcileTally) -> Result<(), BackendError> {
        let nl = common::connect(BACKEND, &mut self.nl)?;
        let ext_index = self.ctx.ext.index;
        for d in &self.devices {
            let Some(index) = d.index() else { continue };
            let name = d.spec.name;
            if let (Some(own), Some(network)) = (self.own, d.spec.v4) {
                common::program_network_device(&nl, name, index, own, network, ext_index, tally)
                    .await?;
            }
            if let (Some(own), Some(network)) = (self.own_v6, d.spec.v6) {
                common::program_network_device(&nl, name, index, own, network, ext_index, tally)
                    .await?;
            }
        }
        Ok(())
    }

    async fn repair_devices(&mut self, tally: &mut ReconcileTally) -> Result<(), BackendError> {
        let nl = common::connect(BACKEND, &mut self.nl)?;
        for i in 0..self.devices.len() {
            let name = self.devices[i].spec.name;
            let link = netlink::link_by_name(&nl.h, name)
                .await
                .map_err(fatal(BACKEND, "reading the device"))?;
            let same = |index: u32| link.as_ref().is_some_and(|l| l.index == index);
            let d = &self.devices[i];
            let healthy = match (&d.run, &d.kernel) {
                (Some(r), _) => r.alive() && same(r.index),
                (None, Some(k)) => same(k.index),
                (None, None) => false,
            };
            if !healthy {
                tracing::warn!("wireguard: {name} or its threads are gone; starting again");
                self.start_device(i).await?;
                tally.report.repaired += 1;
                continue;
            }
            let link = link.expect("healthy implies present");
            if !link.up || link.mtu != Some(self.mtu) {
                super::udp::kernel::set_up(&nl.h, name, link.index, self.mtu)
                    .await
                    .map_err(fatal(BACKEND, "setting the device up"))?;
                tally.report.repaired += 1;
            }
        }
        Ok(())
    }

    /// Builds each device's peers from the leases. A peer whose key is unchanged keeps its
    /// tunnel (a lease renewal resets no session); a new key under a subnet is a new peer
    /// and the old key's peer goes (no stale peer).
    async fn publish_tables(
        &mut self,
        peers: &PeerSet,
        tally: &mut ReconcileTally,
    ) -> Result<(), BackendError> {
        let Some(public) = self.public_key() else {
            return Ok(());
        };
        let ours = self.our_addrs();
        let (psk, keepalive) = (self.cfg.psk, self.cfg.keepalive);
        for d in &mut self.devices {
            let mut skipped = Skipped::new();
            let wanted = wanted_peers(&d.spec, ours, &public, peers, &mut skipped);
            let name = d.spec.name;
            common::log_skipped(BACKEND, &format!(" on {name}"), &mut d.skipped, skipped);
            if let Some(k) = &mut d.kernel {
                let (changed, removed) = kernel_changes(&k.peers, &wanted);
                k.dev
                    .update(&changed, psk, keepalive, &removed)
                    .await
                    .map_err(io_failed(format!("setting the peers of {name}")))?;
                for p in &changed {
                    let key = config::encode_key(&p.key);
                    tracing::info!(
                        "wireguard: {name}: peer {key} for {:?} at {:?}",
                        p.allowed,
                        p.endpoint
                    );
                }
                for key in &removed {
                    tracing::info!(
                        "wireguard: {name}: peer {} removed",
                        config::encode_key(key)
                    );
                }
                tally.report.added += changed
                    .iter()
                    .filter(|p| !k.peers.contains_key(&p.key))
                    .count();
                tally.report.removed += removed.len();
                k.peers = wanted;
                continue;
            }
            let Some(run) = &d.run else { continue };
            let engine = &run.engine;
            let old = engine.peers.load_full();
            let (table, changes) = next_table(engine, &old, wanted, &mut d.lease_endpoints);
            tally.report.added += changes.added;
            tally.report.removed += changes.removed;
            tally.report.repaired += changes.changed;
            engine.peers.store(Arc::new(table));
        }
        Ok(())
    }

    /// The current peer table of device `name` (tests).
    pub fn peer_table(&self, name: &str) -> Option<Arc<PeerTable>> {
        self.devices
            .iter()
            .find(|d| d.spec.name == name)
            .and_then(|d| d.run.as_ref())
            .map(|r| r.engine.peers.load_full())
    }
}

/// What to tell the kernel device: peers new or changed since `told` (the endpoint only
/// when the lease's changed, so a roamed peer stays where it is), and keys to remove.
fn kernel_changes(
    told: &Wanted,
    wanted: &Wanted,
) -> (Vec<kernel_device::KernelPeer>, Vec<[u8; 32]>) {
    let mut changed = Vec::new();
    for (key, (endpoint, nets)) in wanted {
        let endpoint = match told.get(key) {
            Some((e, n)) if e == endpoint && sorted(n) == sorted(nets) => continue,
            Some((e, _)) => (e != endpoint).then_some(*endpoint),
            None => Some(*endpoint),
        };
        changed.push(kernel_device::KernelPeer {
            key: *key,
            endpoint,
            allowed: nets.clone(),
        });
    }
    let removed = told
        .keys()
        .filter(|k| !wanted.contains_key(*k))
        .copied()
        .collect();
    (changed, removed)
}

/// What [`next_table`] changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct TableChanges {
    pub added: usize,
    pub removed: usize,
    pub changed: usize,
}

/// The peer table for `wanted` (key → lease endpoint and allowed IPs), given the `old` one.
/// A key already present keeps its peer, and with it its sessions: a lease renewal or
/// re-put resets nothing. Its endpoint is set again only when its lease names a different one
/// than last time (so a roamed peer stays where it was seen). A key not wanted any more
/// is dropped with its sessions: a new key under a subnet leaves no stale peer.
fn next_table(
    engine: &Engine,
    old: &PeerTable,
    wanted: Wanted,
    lease_endpoints: &mut HashMap<[u8; 32], SocketAddr>,
) -> (PeerTable, TableChanges) {
    let mut changes = TableChanges::default();
    let mut list: Vec<(Arc<Peer>, Vec<IpNetwork>)> = Vec::new();
    let mut endpoints = HashMap::new();
    for (key, (endpoint, nets)) in wanted {
        let name = config::encode_key(&key);
        let peer = match old.by_key(&key) {
            Some(p) => {
                if lease_endpoints.get(&key) != Some(&endpoint) {
                    tracing::info!("wireguard: peer {name} endpoint {endpoint} (from its lease)");
                    p.set_endpoint(endpoint);
                    changes.changed += 1;
                }
                if old.allowed_ips(&key) != sorted(&nets) {
                    tracing::info!("wireguard: peer {name} allowed IPs {nets:?}");
                    changes.changed += 1;
                }
                p.clone()
            }
            None => {
                tracing::info!("wireguard: peer {name} at {endpoint} for {nets:?}");
                changes.added += 1;
                engine.new_peer(key, endpoint)
            }
        };
        endpoints.insert(key, endpoint);
        list.push((peer, nets));
    }
    for p in old.peers() {
        if !endpoints.contains_key(&p.public_key) {
            tracing::info!(
                "wireguard: peer {} removed",
                config::encode_key(&p.public_key)
            );
            changes.removed += 1;
        }
    }
    *lease_endpoints = endpoints;
    (PeerTable::new(list), changes)
}

/// In [`PeerTable::allowed_ips`]' order: IPv4 first, longest prefix first.
fn sorted(nets: &[IpNetwork]) -> Vec<IpNetwork> {
    let mut v = nets.to_vec();
    v.sort_by_key(|n| (n.is_ipv6(), std::cmp::Reverse(n.prefix()), n.network()));
    v
}

impl Drop for WireguardBackend {
    fn drop(&mut self) {
        for d in &mut self.devices {
            d.stop();
        }
    }
}

#[async_trait]
impl Backend for WireguardBackend {
    async fn prepare(&mut self) -> Result<Publish, BackendError> {
        self.start().await?;
        let key = self.public_key().expect("started");
        let (v4, v6) = lease_data(
            &self.cfg,
            &key,
            self.network.is_some(),
            self.network_v6.is_some(),
        );
        Ok(Publish {
            backend_type: BACKEND.into(),
            backend_data: v4,
            backend_v6_data: v6,
            mtu: self.mtu,
        })
    }

    async fn lease_acquired(&mut self, own: &Lease) -> Result<(), BackendError> {
        if self.network.is_some() {
            let subnet = own
                .key
                .ipv4
                .ok_or_else(|| setup(format!("our lease {} has no IPv4 subnet", own.key)))?;
            self.own = Some(subnet);
        }
        if self.network_v6.is_some() {
            let subnet = own
                .key
                .ipv6
                .ok_or_else(|| setup(format!("our lease {} has no IPv6 subnet", own.key)))?;
            self.own_v6 = Some(subnet);
        }
        self.start().await?;
        let mut tally = ReconcileTally::new(BACKEND);
        self.program_devices(&mut tally).await?;
        tally.finish().map(|_| ())
    }

    async fn reconcile(&mut self, peers: &PeerSet) -> Result<ReconcileReport, BackendError> {
        let mut tally = ReconcileTally::new(BACKEND);
        self.repair_devices(&mut tally).await?;
        self.program_devices(&mut tally).await?;
        self.publish_tables(peers, &mut tally).await?;
        tally.finish()
    }
}
