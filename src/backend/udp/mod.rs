//! `udp`: flannel's userspace encapsulation. Pods' packets leave through the TUN device
//! `flannel0`; each one travels as the bare payload of one UDP datagram to the peer's public
//! IP on `Port` (8285), and is written into the peer's `flannel0`.
//!
//! Wire-compatible with flannel's udp backend (whose leases carry no `BackendType`), on a
//! faster data path: dedicated threads, TUN offloads (virtio-net header, TSO/USO), UDP GSO/GRO,
//! batched system calls, coalescing before the TUN write. Whatever the kernel lacks is turned
//! off at start. `FLANNEL_UDP_PLAIN=1` in the environment (or `"Plain": true` in the Backend
//! object) forces the plain path: one packet per system call, no offloads, like flannel.
//!
//! Modules: [`wire`] and [`offload`] are pure packet code, [`pipeline`] what the threads do
//! per packet, [`peers`] the lock-free peer table, [`device`] and [`socket`] the system
//! calls, [`fastpath`] the threads, [`counters`] the metrics.

pub mod counters;
pub mod device;
pub mod fastpath;
pub mod fuzzing;
pub mod kernel;
pub mod offload;
pub mod peers;
pub mod pipeline;
pub mod socket;
pub mod wire;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;

use async_trait::async_trait;
use ipnetwork::Ipv4Network;
use netlink_packet_route::route::RouteProtocol;
use rtnetlink::Handle;

use super::common;
use super::{Backend, BackendContext, BackendError, Publish, ReconcileReport};
use crate::netlink::{self, Route4, RT_TABLE_MAIN};
use crate::subnet::{Lease, PeerSet};
use counters::Counters;
use device::Tun;
use fastpath::{Features, Shared};
use kernel::KernelError;
use peers::PeerTable;
use socket::UdpSock;

const BACKEND: &str = "udp";
/// The TUN device's name, as flannel names it.
pub const DEVICE: &str = "flannel0";
pub const DEFAULT_PORT: u16 = 8285;
/// Environment variable that forces the plain path when `1`, `true` or `yes`.
pub const PLAIN_ENV: &str = "FLANNEL_UDP_PLAIN";
/// IPv4 + UDP headers: the device MTU is the external MTU less this.
pub const OVERHEAD: u32 = 28;
/// Frames (datagrams) per batch on the fast path.
const BATCH: usize = 64;

pub use counters::current as current_counters;

/// The data path while it runs.
struct Running {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    index: u32,
    features: Features,
}

impl Running {
    fn alive(&self) -> bool {
        self.threads.iter().all(|t| !t.is_finished())
    }

    fn stop(self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
    }
}

pub struct UdpBackend {
    ctx: BackendContext,
    network: Ipv4Network,
    port: u16,
    plain: bool,
    mtu: u32,
    nl: Option<Handle>,
    run: Option<Running>,
    own: Option<Ipv4Network>,
    table: Arc<PeerTable>,
    skipped: BTreeMap<String, String>,
    counters: Arc<Counters>,
}

fn setup(why: String) -> BackendError {
    BackendError::Setup {
        backend: BACKEND,
        why,
    }
}

fn nl_err(e: KernelError) -> BackendError {
    BackendError::Netlink {
        backend: BACKEND,
        why: e.to_string(),
    }
}

/// What one pass changed, and the changes that failed (the pass goes on after a failure).
#[derive(Default)]
struct Tally {
    report: ReconcileReport,
    errors: Vec<String>,
}

impl Tally {
    fn failed(&mut self, e: KernelError) {
        tracing::warn!("udp: {e}");
        self.errors.push(e.to_string());
    }

    fn finish(self) -> Result<ReconcileReport, BackendError> {
        if self.errors.is_empty() {
            Ok(self.report)
        } else {
            Err(BackendError::Netlink {
                backend: BACKEND,
                why: format!(
                    "{} change(s) failed (the others were applied): {}",
                    self.errors.len(),
                    self.errors.join("; ")
                ),
            })
        }
    }
}

/// Whether the environment forces the plain path.
pub fn plain_from_env() -> bool {
    std::env::var(PLAIN_ENV)
        .map(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes"))
        .unwrap_or(false)
}

impl UdpBackend {
    pub fn new(ctx: BackendContext) -> Result<Self, BackendError> {
        let network = ctx.config.network.ok_or_else(|| {
            setup("needs an IPv4 Network (IPv6-only networks are not supported)".into())
        })?;
        let opts = &ctx.config.backend;
        let port = common::uint_option(BACKEND, opts, "Port", 65535)?
            .filter(|p| *p != 0)
            .map_or(DEFAULT_PORT, |p| p as u16);
        let plain = plain_from_env() || common::bool_option(BACKEND, opts, "Plain")?;
        let mtu = ctx
            .ext
            .mtu
            .checked_sub(OVERHEAD)
            .filter(|m| *m >= 68)
            .ok_or_else(|| {
                setup(format!(
                    "interface {} has MTU {}, too small for {} bytes of encapsulation",
                    ctx.ext.name, ctx.ext.mtu, OVERHEAD
                ))
            })?;
        let counters = Arc::new(Counters::default());
        counters::publish(&counters);
        Ok(UdpBackend {
            ctx,
            network,
            port,
            plain,
            mtu,
            nl: None,
            run: None,
            own: None,
            table: Arc::new(PeerTable::default()),
            skipped: BTreeMap::new(),
            counters,
        })
    }

    /// The counters of this backend's data path.
    pub fn counters(&self) -> Arc<Counters> {
        self.counters.clone()
    }

    /// The data-path features in use, once started.
    pub fn features(&self) -> Option<Features> {
        self.run.as_ref().map(|r| r.features)
    }

    fn handle(&mut self) -> Result<Handle, BackendError> {
        if self.nl.is_none() {
            self.nl = Some(kernel::connect().map_err(nl_err)?);
        }
        Ok(self.nl.clone().expect("set above"))
    }

    fn bind_socket(&self) -> Result<UdpSock, BackendError> {
        let ext = &self.ctx.ext;
        let candidates: Vec<Ipv4Addr> = ext
            .public_ip
            .into_iter()
            .chain(ext.iface_addr.filter(|a| Some(*a) != ext.public_ip))
            .collect();
        if candidates.is_empty() {
            return Err(setup(format!("interface {} has no IPv4 address", ext.name)));
        }
        let mut errors = Vec::new();
        for ip in candidates {
            let addr = SocketAddrV4::new(ip, self.port);
            match UdpSock::bind(addr, !self.plain) {
                Ok(s) => return Ok(s),
                Err(e) => errors.push(format!("binding UDP socket to {addr}: {e}")),
            }
        }
        Err(setup(errors.join("; ")))
    }

    /// Opens the device and the socket and starts the threads.
    async fn start(&mut self) -> Result<(), BackendError> {
        if let Some(old) = self.run.take() {
            old.stop();
        }
        let tun = Tun::open(DEVICE, !self.plain)
            .map_err(|e| setup(format!("opening TUN device {DEVICE}: {e}")))?;
        let index = nix::net::if_::if_nametoindex(DEVICE)
            .map_err(|e| setup(format!("index of {DEVICE}: {e}")))?;
        // The device carries IPv4 only: no IPv6 link-local address, router or multicast
        // listener messages for the data path to count as malformed.
        let _ = std::fs::write(
            format!("/proc/sys/net/ipv6/conf/{DEVICE}/disable_ipv6"),
            "1",
        );
        let h = self.handle()?;
        kernel::set_up(&h, DEVICE, index, self.mtu)
            .await
            .map_err(nl_err)?;
        let sock = self.bind_socket()?;
        let features = if self.plain {
            Features::PLAIN
        } else {
            Features {
                vnet: tun.offloads.vnet,
                tso: tun.offloads.tso,
                uso: tun.offloads.uso,
                udp_gso: sock.gso,
                udp_gro: sock.gro,
                batch: BATCH,
            }
        };
        let why = if self.plain {
            format!(" (forced by {PLAIN_ENV} or the Plain option)")
        } else {
            String::new()
        };
        tracing::info!(
            "udp: {DEVICE} (MTU {}) ↔ {}: {}{why}",
            self.mtu,
            sock.local,
            features.describe()
        );
        let shared = Arc::new(Shared::new(self.counters.clone()));
        shared.peers.store(self.table.clone());
        let threads = fastpath::spawn(Arc::new(tun), Arc::new(sock), shared.clone(), features)
            .map_err(|e| setup(format!("starting the data-path threads: {e}")))?;
        self.run = Some(Running {
            shared,
            threads,
            index,
            features,
        });
        Ok(())
    }

    /// Gives the device our address and the route for the Network; removes stale ones.
    async fn program_device(&mut self, tally: &mut Tally) -> Result<(), BackendError> {
        let (Some(own), Some(index)) = (self.own, self.run.as_ref().map(|r| r.index)) else {
            return Ok(());
        };
        let h = self.handle()?;
        let want = Ipv4Network::new(own.network(), 32).expect("/32 is valid");
        let have = netlink::addresses::<Ipv4Network>(&h, index)
            .await
            .map_err(nl_err)?;
        if !have.contains(&want) {
            netlink::replace_address(&h, index, want)
                .await
                .map_err(nl_err)?;
            tracing::info!("udp: address {want} on {DEVICE}");
            tally.report.added += 1;
        }
        for stale in have.iter().filter(|a| **a != want) {
            match netlink::delete_address(&h, index, *stale).await {
                Ok(()) => {
                    tracing::info!("udp: stale address {stale} removed from {DEVICE}");
                    tally.report.removed += 1;
                }
                Err(e) if e.is_not_found() => {}
                Err(e) => tally.failed(e),
            }
        }
        let network = self.network;
        let want = Route4::new(network, None, index, false);
        // Device routes through flannel0 that someone made (not the kernel's own).
        let routes: Vec<Route4> = netlink::routes::<Ipv4Network>(&h, RT_TABLE_MAIN, Some(index))
            .await
            .map_err(nl_err)?
            .into_iter()
            .filter(|r| r.gateway.is_none() && r.protocol != RouteProtocol::Kernel)
            .collect();
        // The kernel identifies a route by destination and metric: a route there without our
        // protocol number (an older flanneld's, one made by hand) is rewritten as ours.
        let is_want = |r: &Route4| r.dst == want.dst && r.priority == want.priority;
        let have = routes.iter().find(|r| is_want(r));
        if !have.is_some_and(|r| r.protocol == want.protocol) {
            match netlink::replace_route(&h, &want).await {
                Ok(()) => {
                    tracing::info!("udp: route {network} dev {DEVICE}");
                    if have.is_some() {
                        tally.report.repaired += 1;
                    } else {
                        tally.report.added += 1;
                    }
                }
                Err(e) => tally.failed(e),
            }
        }
        for stale in routes.iter().filter(|r| !is_want(r)) {
            let dst = stale.dst;
            if dst.prefix() < network.prefix() || !network.contains(dst.network()) {
                continue;
            }
            match netlink::delete_route(&h, stale).await {
                Ok(()) => {
                    tracing::info!("udp: stale route {dst} dev {DEVICE} removed");
                    tally.report.removed += 1;
                }
                Err(e) if e.is_not_found() => {}
                Err(e) => tally.failed(e),
            }
        }
        Ok(())
    }

    /// Brings the device and threads back when the device was deleted or a thread ended, and
    /// the device up with the right MTU when someone changed it.
    async fn repair_device(&mut self, tally: &mut Tally) -> Result<(), BackendError> {
        let h = self.handle()?;
        let link = netlink::link_by_name(&h, DEVICE).await.map_err(nl_err)?;
        let healthy = self
            .run
            .as_ref()
            .is_some_and(|r| r.alive() && link.as_ref().is_some_and(|l| l.index == r.index));
        if !healthy {
            tracing::warn!("udp: {DEVICE} or its data-path threads are gone; starting again");
            self.start().await?;
            tally.report.repaired += 1;
            return Ok(());
        }
        let link = link.expect("healthy implies present");
        if !link.up || link.mtu != Some(self.mtu) {
            kernel::set_up(&h, DEVICE, link.index, self.mtu)
                .await
                .map_err(nl_err)?;
            tracing::info!("udp: {DEVICE} set up again with MTU {}", self.mtu);
            tally.report.repaired += 1;
        }
        Ok(())
    }

    fn publish_table(&mut self, peers: &PeerSet, tally: &mut Tally) {
        let (table, skipped) = PeerTable::build(peers, self.port, self.own);
        let old: BTreeSet<_> = self.table.entries().iter().copied().collect();
        let new: BTreeSet<_> = table.entries().iter().copied().collect();
        for e in new.difference(&old) {
            tracing::info!("udp: peer {} via {}", fmt_route(e), e.2);
            tally.report.added += 1;
        }
        for e in old.difference(&new) {
            tracing::info!("udp: peer {} via {} removed", fmt_route(e), e.2);
            tally.report.removed += 1;
        }
        let skipped: BTreeMap<String, String> = skipped.into_iter().collect();
        for (key, why) in &skipped {
            if self.skipped.get(key) != Some(why) {
                tracing::info!("udp: ignoring peer {key}: {why}");
            }
        }
        self.skipped = skipped;
        // Also when only our own subnet changed: the table rejects inner sources inside it.
        if *self.table != table {
            self.table = Arc::new(table);
            if let Some(run) = &self.run {
                run.shared.peers.store(self.table.clone());
            }
        }
    }
}

fn fmt_route(e: &(u32, u32, SocketAddrV4)) -> String {
    format!("{}/{}", Ipv4Addr::from(e.0), e.1.count_ones())
}

impl Drop for UdpBackend {
    fn drop(&mut self) {
        if let Some(run) = self.run.take() {
            run.stop();
        }
    }
}

#[async_trait]
impl Backend for UdpBackend {
    async fn prepare(&mut self) -> Result<Publish, BackendError> {
        if self.run.is_none() {
            self.start().await?;
        }
        Ok(Publish {
            // flannel's udp backend leaves BackendType out of its leases; so do we.
            backend_type: String::new(),
            backend_data: None,
            backend_v6_data: None,
            mtu: self.mtu,
        })
    }

    async fn lease_acquired(&mut self, own: &Lease) -> Result<(), BackendError> {
        let subnet = own
            .key
            .ipv4
            .ok_or_else(|| setup(format!("our lease {} has no IPv4 subnet", own.key)))?;
        self.own = Some(subnet);
        if self.run.is_none() {
            self.start().await?;
        }
        let mut tally = Tally::default();
        self.program_device(&mut tally).await?;
        tally.finish().map(|_| ())
    }

    async fn reconcile(&mut self, peers: &PeerSet) -> Result<ReconcileReport, BackendError> {
        let mut tally = Tally::default();
        self.repair_device(&mut tally).await?;
        self.program_device(&mut tally).await?;
        self.publish_table(peers, &mut tally);
        tally.finish()
    }
}
