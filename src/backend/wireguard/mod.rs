//! `wireguard`: flannel's encrypted backend. Leases carry `{"PublicKey","Port"}`; each peer's
//! allowed IPs are its lease subnet; the device `flannel-wg` holds our subnet's network
//! address as a /32 and one route for the whole Network.
//!
//! flannel needs the kernel module. We probe for it ([`kernel`]) and otherwise run a
//! userspace WireGuard ([`engine`]) on a TUN device with the udp fast path's socket machinery;
//! the protocol itself is gotatun's audited `noise` layer.
//!
//! Modules: [`config`] the options, [`keyfile`] the private key file, [`peers`] the lock-free
//! peer table, [`engine`] the threads, [`counters`] the metrics, [`kernel`] the probe.

pub mod config;
pub mod counters;
pub mod engine;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
mod heap;
pub mod kernel;
pub mod kernel_device;
pub mod keyfile;
pub mod peers;

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;

use async_trait::async_trait;
use ipnetwork::Ipv4Network;
use serde_json::json;

use super::common::{self, fatal, ReconcileTally, Skipped};
use super::udp::device::Tun;
use super::udp::socket::UdpSock;
use super::{Backend, BackendContext, BackendError, Publish, ReconcileReport};
use crate::netlink::{self, Netlink};
use crate::subnet::{Lease, PeerSet};
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

/// The kernel device while it is ours.
struct KernelRun {
    dev: kernel_device::KernelDevice,
    index: u32,
    public: [u8; 32],
    /// What the device was told: key → (lease endpoint, allowed IPs).
    peers: BTreeMap<[u8; 32], (SocketAddrV4, Vec<Ipv4Network>)>,
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

/// What one peer's lease says.
#[derive(Debug, Clone, PartialEq, Eq)]
struct LeasePeer {
    key: [u8; 32],
    endpoint: SocketAddrV4,
}

pub struct WireguardBackend {
    ctx: BackendContext,
    cfg: WgConfig,
    network: Ipv4Network,
    mtu: u32,
    key_file: PathBuf,
    nl: Option<Netlink>,
    run: Option<Running>,
    kernel: Option<KernelRun>,
    own: Option<Ipv4Network>,
    /// The endpoint each peer's lease named when the table was last built: the engine's
    /// endpoint (which roams) is only reset when the lease itself changes.
    lease_endpoints: HashMap<[u8; 32], SocketAddrV4>,
    skipped: Skipped,
    counters: Arc<Counters>,
    kernel_logged: bool,
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

/// A peer lease's `BackendData`: its key and port (0 or absent: our own port, as flannel
/// before 2025-03 published no port).
fn lease_peer(
    data: Option<&serde_json::value::RawValue>,
    public_ip: Ipv4Addr,
    own_port: u16,
) -> Result<LeasePeer, String> {
    let data = data.ok_or("lease has no BackendData")?;
    let v: serde_json::Value =
        serde_json::from_str(data.get()).map_err(|e| format!("BackendData is not JSON: {e}"))?;
    let key = v
        .get("PublicKey")
        .and_then(|k| k.as_str())
        .ok_or("BackendData has no PublicKey")?;
    let key =
        config::decode_key(key).map_err(|why| format!("BackendData PublicKey {key:?}: {why}"))?;
    let port = match v.get("Port") {
        None | Some(serde_json::Value::Null) => 0,
        Some(p) => {
            p.as_u64()
                .filter(|p| *p <= 65535)
                .ok_or_else(|| format!("BackendData Port {p} is not a port"))? as u16
        }
    };
    let port = if port == 0 { own_port } else { port };
    Ok(LeasePeer {
        key,
        endpoint: SocketAddrV4::new(public_ip, port),
    })
}

impl WireguardBackend {
    pub fn new(ctx: BackendContext) -> Result<Self, BackendError> {
        let cfg = WgConfig::parse(&ctx.config.backend)?;
        let network = ctx.config.v4.map(|f| f.network).ok_or_else(|| {
            setup("needs an IPv4 Network (IPv6 underlays are not supported yet)".into())
        })?;
        if cfg.mode == Mode::Ipv6 {
            return Err(setup(
                "Mode ipv6 (an IPv6 underlay) is not supported yet; use separate, auto or ipv4"
                    .into(),
            ));
        }
        if ctx.config.v6.is_some() {
            tracing::warn!(
                "wireguard: the IPv6 half of the network is not carried yet (no {DEVICE_V6}); \
                 only IPv4 subnets are reached"
            );
        }
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
        let counters = Arc::new(Counters::default());
        ctx.metrics.wireguard.store(Some(counters.clone()));
        Ok(WireguardBackend {
            ctx,
            cfg,
            network,
            mtu,
            key_file: keyfile::path_from_env(),
            nl: None,
            run: None,
            kernel: None,
            own: None,
            lease_endpoints: HashMap::new(),
            skipped: Skipped::new(),
            counters,
            kernel_logged: false,
        })
    }

    pub fn counters(&self) -> Arc<Counters> {
        self.counters.clone()
    }

    fn bind_socket(&self) -> Result<UdpSock, BackendError> {
        let ext = &self.ctx.ext;
        let ip = ext
            .public_ip
            .or(ext.iface_addr)
            .ok_or_else(|| setup(format!("interface {} has no IPv4 address", ext.name)))?;
        // Bound to the port on every address, as WireGuard binds: peers may reach us at
        // the public IP even when it is not the interface's (NAT).
        let addr = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, self.cfg.listen_port);
        UdpSock::bind(addr, true).map_err(|e| {
            setup(format!(
                "binding UDP port {} (public IP {ip}): {e}",
                self.cfg.listen_port
            ))
        })
    }

    async fn start(&mut self) -> Result<(), BackendError> {
        if let Some(old) = self.run.take() {
            old.stop();
        }
        self.kernel = None;
        let nl = common::connect(BACKEND, &mut self.nl)?;
        let (key, origin) = keyfile::load_or_create(&self.key_file).map_err(io_failed(format!(
            "private key file {}",
            self.key_file.display()
        )))?;
        let origin = match origin {
            keyfile::Origin::Read => "read from",
            keyfile::Origin::Created => "created in",
        };
        let secret = gotatun::x25519::StaticSecret::from(*key);
        let public = *gotatun::x25519::PublicKey::from(&secret).as_bytes();
        match kernel::probe(&nl.h).await {
            kernel::KernelWireguard::Available => {
                match self.start_kernel(&nl, &key, public).await {
                    Ok(()) => {
                        tracing::info!(
                        "wireguard: kernel WireGuard on {DEVICE} (MTU {}), port {}, public key {} \
                         (private key {origin} {})",
                        self.mtu,
                        self.cfg.listen_port,
                        config::encode_key(&public),
                        self.key_file.display()
                    );
                        self.lease_endpoints.clear();
                        return Ok(());
                    }
                    Err(e) => {
                        if !self.kernel_logged {
                            tracing::warn!(
                                "wireguard: kernel WireGuard could not be set up ({}); using the \
                             userspace engine",
                                crate::error_chain::Chain(&e)
                            );
                        }
                    }
                }
            }
            kernel::KernelWireguard::Unavailable(why) => {
                if !self.kernel_logged {
                    tracing::info!(
                        "wireguard: kernel WireGuard unavailable ({why}); using the userspace engine"
                    );
                }
            }
        }
        self.kernel_logged = true;
        // flannel deletes and recreates the device; a TUN device of ours is adopted.
        if let Ok(Some(link)) = netlink::link_by_name(&nl.h, DEVICE).await {
            if link.kind.as_deref().is_some_and(|k| k != "tun") {
                netlink::delete_link(&nl.h, link.index)
                    .await
                    .map_err(fatal(BACKEND, "deleting the old device"))?;
            }
        }
        // The virtio-net header and TSO/USO: super-packets are split before encryption.
        let tun =
            Tun::open(DEVICE, true).map_err(io_failed(format!("opening TUN device {DEVICE}")))?;
        let index = nix::net::if_::if_nametoindex(DEVICE)
            .map_err(|e| io_failed(format!("index of {DEVICE}"))(e.into()))?;
        let _ = std::fs::write(
            format!("/proc/sys/net/ipv6/conf/{DEVICE}/disable_ipv6"),
            "1",
        );
        super::udp::kernel::set_up(&nl.h, DEVICE, index, self.mtu)
            .await
            .map_err(fatal(BACKEND, "setting the device up"))?;
        let sock = self.bind_socket()?;
        let engine = Arc::new(Engine::new(
            secret,
            self.cfg.psk,
            self.cfg.keepalive,
            self.mtu as u16,
            self.counters.clone(),
        ));
        tracing::info!(
            "wireguard: userspace engine on {DEVICE} (MTU {}) ↔ {}, public key {} \
             (private key {origin} {})",
            self.mtu,
            sock.local,
            config::encode_key(&public),
            self.key_file.display()
        );
        self.lease_endpoints.clear();
        let threads = engine::spawn(Arc::new(tun), Arc::new(sock), engine.clone())
            .map_err(io_failed("starting the data-path threads".into()))?;
        self.run = Some(Running {
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
        key: &[u8; 32],
        public: [u8; 32],
    ) -> Result<(), BackendError> {
        if let Some(link) = netlink::link_by_name(&nl.h, DEVICE)
            .await
            .map_err(fatal(BACKEND, "reading the device"))?
        {
            netlink::delete_link(&nl.h, link.index)
                .await
                .map_err(fatal(BACKEND, "deleting the old device"))?;
        }
        kernel::create(&nl.h, DEVICE)
            .await
            .map_err(fatal(BACKEND, "creating the device"))?;
        let index = netlink::link_by_name(&nl.h, DEVICE)
            .await
            .map_err(fatal(BACKEND, "reading the device"))?
            .ok_or_else(|| setup(format!("{DEVICE} vanished after its creation")))?
            .index;
        let mut dev = kernel_device::KernelDevice::connect(DEVICE)
            .map_err(io_failed("generic netlink".into()))?;
        dev.configure(*key, self.cfg.listen_port)
            .await
            .map_err(io_failed(format!("configuring {DEVICE}")))?;
        super::udp::kernel::set_up(&nl.h, DEVICE, index, self.mtu)
            .await
            .map_err(fatal(BACKEND, "setting the device up"))?;
        self.kernel = Some(KernelRun {
            dev,
            index,
            public,
            peers: BTreeMap::new(),
        });
        Ok(())
    }

    fn device_index(&self) -> Option<u32> {
        self.run
            .as_ref()
            .map(|r| r.index)
            .or(self.kernel.as_ref().map(|k| k.index))
    }

    fn public_key(&self) -> Option<[u8; 32]> {
        self.run
            .as_ref()
            .map(|r| r.engine.public_key())
            .or(self.kernel.as_ref().map(|k| k.public))
    }

    /// Gives the device our address and the route for the Network; removes stale ones.
    async fn program_device(&mut self, tally: &mut ReconcileTally) -> Result<(), BackendError> {
        let (Some(own), Some(index)) = (self.own, self.device_index()) else {
            return Ok(());
        };
        let nl = common::connect(BACKEND, &mut self.nl)?;
        let ext_index = self.ctx.ext.index;
        common::program_network_device(&nl, DEVICE, index, own, self.network, ext_index, tally)
            .await
    }

    async fn repair_device(&mut self, tally: &mut ReconcileTally) -> Result<(), BackendError> {
        let nl = common::connect(BACKEND, &mut self.nl)?;
        let link = netlink::link_by_name(&nl.h, DEVICE)
            .await
            .map_err(fatal(BACKEND, "reading the device"))?;
        let same = |index: u32| link.as_ref().is_some_and(|l| l.index == index);
        let healthy = match (&self.run, &self.kernel) {
            (Some(r), _) => r.alive() && same(r.index),
            (None, Some(k)) => same(k.index),
            (None, None) => false,
        };
        if !healthy {
            tracing::warn!("wireguard: {DEVICE} or its threads are gone; starting again");
            self.start().await?;
            tally.report.repaired += 1;
            return Ok(());
        }
        let link = link.expect("healthy implies present");
        if !link.up || link.mtu != Some(self.mtu) {
            super::udp::kernel::set_up(&nl.h, DEVICE, link.index, self.mtu)
                .await
                .map_err(fatal(BACKEND, "setting the device up"))?;
            tally.report.repaired += 1;
        }
        Ok(())
    }

    /// Builds the peer table from the leases. A peer whose key is unchanged keeps its
    /// tunnel (a lease renewal resets no session); a new key under a subnet is a new peer
    /// and the old key's peer goes (no stale peer).
    async fn publish_table(
        &mut self,
        peers: &PeerSet,
        tally: &mut ReconcileTally,
    ) -> Result<(), BackendError> {
        let Some(public) = self.public_key() else {
            return Ok(());
        };
        let mut skipped = Skipped::new();
        let candidates = common::candidates::<Ipv4Network>(peers, BACKEND, &mut skipped);
        let mut wanted: BTreeMap<[u8; 32], (SocketAddrV4, Vec<Ipv4Network>)> = BTreeMap::new();
        for c in &candidates {
            match lease_peer(
                c.lease.attrs.backend_data.as_deref(),
                c.public_ip,
                self.cfg.listen_port,
            ) {
                Ok(lp) if lp.key == public => {
                    skipped.insert(c.key, "lease carries our own public key".into());
                }
                Ok(lp) => {
                    let e = wanted.entry(lp.key).or_insert((lp.endpoint, Vec::new()));
                    e.1.push(c.subnet);
                }
                Err(why) => {
                    skipped.insert(c.key, why);
                }
            }
        }
        common::log_skipped(BACKEND, "", &mut self.skipped, skipped);
        if let Some(k) = &mut self.kernel {
            let (changed, removed) = kernel_changes(&k.peers, &wanted);
            k.dev
                .update(&changed, self.cfg.psk, self.cfg.keepalive, &removed)
                .await
                .map_err(io_failed(format!("setting the peers of {DEVICE}")))?;
            for p in &changed {
                let name = config::encode_key(&p.key);
                tracing::info!(
                    "wireguard: peer {name} for {:?} at {:?}",
                    p.allowed,
                    p.endpoint
                );
            }
            for key in &removed {
                tracing::info!("wireguard: peer {} removed", config::encode_key(key));
            }
            tally.report.added += changed
                .iter()
                .filter(|p| !k.peers.contains_key(&p.key))
                .count();
            tally.report.removed += removed.len();
            k.peers = wanted;
            return Ok(());
        }
        let Some(run) = &self.run else { return Ok(()) };
        let engine = &run.engine;
        let old = engine.peers.load_full();
        let (table, changes) = next_table(engine, &old, wanted, &mut self.lease_endpoints);
        tally.report.added += changes.added;
        tally.report.removed += changes.removed;
        tally.report.repaired += changes.changed;
        engine.peers.store(Arc::new(table));
        Ok(())
    }

    /// The current peer table (tests).
    pub fn peer_table(&self) -> Option<Arc<PeerTable>> {
        self.run.as_ref().map(|r| r.engine.peers.load_full())
    }
}

/// What to tell the kernel device: peers new or changed since `told` (the endpoint only
/// when the lease's changed, so a roamed peer stays where it is), and keys to remove.
fn kernel_changes(
    told: &BTreeMap<[u8; 32], (SocketAddrV4, Vec<Ipv4Network>)>,
    wanted: &BTreeMap<[u8; 32], (SocketAddrV4, Vec<Ipv4Network>)>,
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
    wanted: BTreeMap<[u8; 32], (SocketAddrV4, Vec<Ipv4Network>)>,
    lease_endpoints: &mut HashMap<[u8; 32], SocketAddrV4>,
) -> (PeerTable, TableChanges) {
    let mut changes = TableChanges::default();
    let mut list: Vec<(Arc<Peer>, Vec<Ipv4Network>)> = Vec::new();
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

fn sorted(nets: &[Ipv4Network]) -> Vec<Ipv4Network> {
    let mut v = nets.to_vec();
    v.sort_by(|a, b| {
        b.prefix()
            .cmp(&a.prefix())
            .then(a.network().cmp(&b.network()))
    });
    v
}

impl Drop for WireguardBackend {
    fn drop(&mut self) {
        if let Some(run) = self.run.take() {
            run.stop();
        }
    }
}

#[async_trait]
impl Backend for WireguardBackend {
    async fn prepare(&mut self) -> Result<Publish, BackendError> {
        if self.run.is_none() && self.kernel.is_none() {
            self.start().await?;
        }
        let key = config::encode_key(&self.public_key().expect("started"));
        // No IPv6 device yet: advertising BackendV6Data would invite peers to a port where
        // nothing listens.
        let v6 = None;
        Ok(Publish {
            backend_type: BACKEND.into(),
            backend_data: Some(json!({"PublicKey": key, "Port": self.cfg.listen_port})),
            backend_v6_data: v6,
            mtu: self.mtu,
        })
    }

    async fn lease_acquired(&mut self, own: &Lease) -> Result<(), BackendError> {
        let subnet = own
            .key
            .ipv4
            .ok_or_else(|| setup(format!("our lease {} has no IPv4 subnet", own.key)))?;
        self.own = Some(subnet);
        if self.run.is_none() && self.kernel.is_none() {
            self.start().await?;
        }
        let mut tally = ReconcileTally::new(BACKEND);
        self.program_device(&mut tally).await?;
        tally.finish().map(|_| ())
    }

    async fn reconcile(&mut self, peers: &PeerSet) -> Result<ReconcileReport, BackendError> {
        let mut tally = ReconcileTally::new(BACKEND);
        self.repair_device(&mut tally).await?;
        self.program_device(&mut tally).await?;
        self.publish_table(peers, &mut tally).await?;
        tally.finish()
    }
}
